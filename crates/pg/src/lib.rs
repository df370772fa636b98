//! PostgreSQL knowledge for pgvault: connections, WAL file names and headers, data
//! pages and their checksums, the control file, restore points in WAL records, the data
//! directory's backup rules, configuration files and their includes, backup start/stop
//! and recovery settings per server version. Nothing here knows about storage or
//! repositories.

pub mod backup;
mod bytes;
pub mod config;
pub mod conn;
pub mod control;
pub mod page;
pub mod pgdata;
pub mod recovery;
pub mod summary;
pub mod tools;
pub mod wal;
pub mod walrecords;
