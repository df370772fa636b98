//! One module per group of verbs; each takes the resolved [`crate::context::Context`].

pub mod admin;
pub mod archive;
pub mod backup;
pub mod catalog;
pub mod config_files;
pub mod copy;
pub mod daemon;
pub mod dump;
pub mod dump_restore;
pub mod expire;
pub mod get;
pub mod info;
pub mod legacy;
pub mod push;
pub mod replication;
pub mod restore;
pub mod setup;
pub mod snapshot;
pub mod verify;
