//! PostgreSQL knowledge for pgvault: connections, WAL file names and headers, server
//! versions. Nothing here knows about storage or repositories.

pub mod conn;
pub mod wal;
