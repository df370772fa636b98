//! One module per group of verbs; each takes the resolved [`crate::context::Context`].

pub mod admin;
pub mod snapshot;
