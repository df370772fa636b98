//! The repository layer of pgvault: a deduplicating, compressed, encrypted,
//! content-addressed blob store. It knows nothing about PostgreSQL.

pub mod storage;
