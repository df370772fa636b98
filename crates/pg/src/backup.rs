//! The non-exclusive backup API, per server version: `pg_backup_start`/`pg_backup_stop`
//! from 15, `pg_start_backup`/`pg_stop_backup` (non-exclusive form) before. Both calls
//! must run in one session that stays open for the whole backup.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::conn::{quote_literal, ConnError, Connection};
use crate::wal::{Lsn, WalFileName};

/// What the start call returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupStart {
    pub lsn: Lsn,
    pub timeline: u32,
    /// The WAL segment the backup starts in.
    pub segment: WalFileName,
}

/// What the stop call returned: the files the restored data directory needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupStop {
    pub lsn: Lsn,
    /// The segment holding the stop position: recovery needs WAL up to it.
    pub segment: WalFileName,
    pub backup_label: String,
    /// Empty when the cluster has no tablespaces.
    pub tablespace_map: String,
    /// The xmax of a snapshot taken just after the stop call returned, epoch-qualified
    /// (as `pg_current_xact_id()` shows ids): no transaction with this id or a later one
    /// had ended then, so each of them commits after the backup's end.
    pub next_xid: u64,
    /// No commit before the stop position has a later timestamp: the server's clock
    /// just after the stop call, or on a standby the replayed commit's (the primary's
    /// clock) when that is later.
    pub latest_commit_bound: SystemTime,
}

fn answer(sql: &str, message: impl Into<String>) -> ConnError {
    ConnError::Answer {
        sql: sql.to_string(),
        message: message.into(),
    }
}

fn lsn_of(sql: &str, text: Option<String>) -> Result<Lsn, ConnError> {
    let text = text.ok_or_else(|| answer(sql, "no LSN"))?;
    Lsn::parse(&text).map_err(|e| answer(sql, e.to_string()))
}

/// The fields of the first row `sql` returns; no row is an error.
fn first_row(
    conn: &mut Connection,
    sql: &str,
) -> Result<std::vec::IntoIter<Option<String>>, ConnError> {
    let row = conn.query_rows(sql)?.into_iter().next();
    Ok(row.ok_or_else(|| answer(sql, "no row"))?.into_iter())
}

/// Switches off, for this session only, the timeouts that would end a backup: a role or
/// database may set `statement_timeout` or `transaction_timeout` (17+), which cancel a
/// start call waiting for a spread checkpoint, or `idle_session_timeout` (14+), which
/// ends the session, and the backup with it, while the files are read. Settings a
/// server does not have are not in `pg_settings`, so one statement serves every version.
pub fn keep_session_open(conn: &mut Connection) -> Result<(), ConnError> {
    conn.query_rows(
        "SELECT set_config(name, '0', false) FROM pg_settings \
         WHERE name IN ('statement_timeout', 'transaction_timeout', 'idle_session_timeout')",
    )?;
    Ok(())
}

/// Starts a backup. `fast` asks for an immediate checkpoint instead of a spread one.
pub fn start(
    conn: &mut Connection,
    major: u32,
    label: &str,
    fast: bool,
    segment_size: u64,
) -> Result<BackupStart, ConnError> {
    let sql = if major >= 15 {
        format!(
            "SELECT pg_backup_start({}, {fast})::text",
            quote_literal(label)
        )
    } else {
        format!(
            "SELECT pg_start_backup({}, {fast}, false)::text",
            quote_literal(label)
        )
    };
    let lsn = lsn_of(&sql, conn.query_one_value(&sql)?)?;
    // The checkpoint the backup starts from carries the timeline the backup is on.
    let timeline_sql = "SELECT timeline_id::text FROM pg_control_checkpoint()";
    let timeline: u32 = conn
        .query_one_value(timeline_sql)?
        .and_then(|t| t.parse().ok())
        .ok_or_else(|| answer(timeline_sql, "no timeline"))?;
    Ok(BackupStart {
        lsn,
        timeline,
        segment: WalFileName::segment(timeline, lsn.0 / segment_size, segment_size),
    })
}

/// Stops the backup without waiting for archiving (the caller waits for the stop
/// segment in its repository, with a timeout and a clear error).
pub fn stop(
    conn: &mut Connection,
    major: u32,
    timeline: u32,
    segment_size: u64,
) -> Result<BackupStop, ConnError> {
    let sql = if major >= 15 {
        "SELECT lsn::text, labelfile, spcmapfile FROM pg_backup_stop(false)"
    } else {
        "SELECT lsn::text, labelfile, spcmapfile FROM pg_stop_backup(false, false)"
    };
    let mut fields = first_row(conn, sql)?;
    let lsn = lsn_of(sql, fields.next().flatten())?;
    let backup_label = fields
        .next()
        .flatten()
        .ok_or_else(|| answer(sql, "no backup label"))?;
    let tablespace_map = fields.next().flatten().unwrap_or_default();
    // A statement of its own, so that its snapshot and clock are read after the stop
    // call returned. GREATEST skips the replay time's NULL on a primary.
    let xmax = if major >= 13 {
        "pg_snapshot_xmax(pg_current_snapshot())"
    } else {
        "txid_snapshot_xmax(txid_current_snapshot())"
    };
    let after_sql = &format!(
        "SELECT {xmax}::text, (extract(epoch FROM \
         GREATEST(clock_timestamp(), pg_last_xact_replay_timestamp())) * 1000000)::bigint::text"
    );
    let mut fields = first_row(conn, after_sql)?;
    let next_xid = fields
        .next()
        .flatten()
        .and_then(|x| x.parse().ok())
        .ok_or_else(|| answer(after_sql, "no transaction id"))?;
    let latest_commit_bound = fields
        .next()
        .flatten()
        .and_then(|micros| micros.parse::<u64>().ok())
        .map(|micros| UNIX_EPOCH + Duration::from_micros(micros))
        .ok_or_else(|| answer(after_sql, "no time"))?;
    Ok(BackupStop {
        lsn,
        segment: WalFileName::holding_end_of(lsn, timeline, segment_size),
        backup_label,
        tablespace_map,
        next_xid,
        latest_commit_bound,
    })
}

/// On a primary, ends the WAL segment `segment` if it is still being written, so that
/// it is archived now instead of when it fills up. Returns whether it switched.
pub fn switch_wal_past(
    conn: &mut Connection,
    segment: &WalFileName,
    segment_size: u64,
) -> Result<bool, ConnError> {
    let sql = "SELECT pg_current_wal_lsn()::text";
    let current = lsn_of(sql, conn.query_one_value(sql)?)?;
    let Some(needed) = segment.segno(segment_size) else {
        return Ok(false);
    };
    if current.segno(segment_size) > needed {
        return Ok(false);
    }
    conn.query_one_value("SELECT pg_switch_wal()::text")?;
    Ok(true)
}

/// A user tablespace: `pg_tblspc/<oid>` links to `location`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TablespaceInfo {
    pub oid: u32,
    pub name: String,
    pub location: String,
}

pub fn tablespaces(conn: &mut Connection) -> Result<Vec<TablespaceInfo>, ConnError> {
    let sql = "SELECT oid::text, spcname, pg_tablespace_location(oid) FROM pg_tablespace \
               WHERE spcname NOT IN ('pg_default', 'pg_global') ORDER BY pg_tablespace.oid";
    conn.query_rows(sql)?
        .into_iter()
        .map(|row| {
            let oid = row
                .first()
                .cloned()
                .flatten()
                .and_then(|o| o.parse().ok())
                .ok_or_else(|| answer(sql, "bad oid"))?;
            let name = row.get(1).cloned().flatten().unwrap_or_default();
            let location = row.get(2).cloned().flatten().unwrap_or_default();
            Ok(TablespaceInfo {
                oid,
                name,
                location,
            })
        })
        .collect()
}

/// A database of the cluster: its files are `base/<oid>/` and, in each tablespace,
/// `PG_<version>_<catalog version>/<oid>/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatabaseInfo {
    pub oid: u32,
    pub name: String,
    /// Its default tablespace (`dattablespace`), where `base/<oid>/` or the tablespace's
    /// `<oid>/` directory is.
    pub tablespace_oid: u32,
    pub tablespace: String,
}

/// The databases and tablespaces of a cluster: listed before a backup starts and again
/// before it stops, to find what changed meanwhile that recovery cannot repair.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Layout {
    pub databases: Vec<DatabaseInfo>,
    pub tablespaces: Vec<TablespaceInfo>,
}

pub fn layout(conn: &mut Connection) -> Result<Layout, ConnError> {
    Ok(Layout {
        databases: databases(conn)?,
        tablespaces: tablespaces(conn)?,
    })
}

/// A change made while a backup read the files, after which a restore of that backup is
/// broken although every file was copied as the server documents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UnrepairableChange {
    /// `ALTER DATABASE … SET TABLESPACE`: recovery redoes the move
    /// (`XLOG_DBASE_CREATE_FILE_COPY`) by copying the old directory as the backup holds
    /// it, and the server removes that directory once the move commits: a backup that
    /// read it meanwhile holds part of it, and the restored database is missing files.
    /// PostgreSQL documents the same hazard for `CREATE DATABASE … STRATEGY FILE_COPY`.
    DatabaseMoved {
        name: String,
        from: String,
        to: String,
    },
    /// `CREATE TABLESPACE`: recovery creates it again at the location written in its
    /// WAL record, wherever the backup is restored (on the same host, the live
    /// tablespace of the server backed up, which the restored server then writes into),
    /// and the backup holds none of its files.
    TablespaceCreated { name: String, location: String },
}

impl std::fmt::Display for UnrepairableChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UnrepairableChange::DatabaseMoved { name, from, to } => write!(
                f,
                "database {name} was moved from tablespace {from} to {to} while the backup ran (ALTER DATABASE … SET TABLESPACE): recovery redoes the move by copying the old directory, which the backup may have read while PostgreSQL removed it"
            ),
            UnrepairableChange::TablespaceCreated { name, location } => write!(
                f,
                "tablespace {name} was created while the backup ran: recovery would create it again at {location} wherever the backup is restored (on this host, in the live tablespace of this server), and the backup holds none of its files"
            ),
        }
    }
}

/// What changed from `before` to `after` that a backup taken across it cannot restore.
pub fn unrepairable_changes(before: &Layout, after: &Layout) -> Vec<UnrepairableChange> {
    let moved = (before.databases.iter()).filter_map(|old| {
        let new = (after.databases.iter()).find(|new| new.oid == old.oid)?;
        (new.tablespace_oid != old.tablespace_oid).then(|| UnrepairableChange::DatabaseMoved {
            name: new.name.clone(),
            from: old.tablespace.clone(),
            to: new.tablespace.clone(),
        })
    });
    let created = (after.tablespaces.iter())
        .filter(|new| !before.tablespaces.iter().any(|old| old.oid == new.oid))
        .map(|new| UnrepairableChange::TablespaceCreated {
            name: new.name.clone(),
            location: new.location.clone(),
        });
    moved.chain(created).collect()
}

/// Objects below this oid are created by `initdb` (`FirstNormalObjectId`).
const FIRST_NORMAL_OBJECT_ID: u32 = 16_384;

/// Whether `initdb` created the database of this oid: template0, template1 or postgres,
/// which a server needs to start, to connect and to drop other databases.
pub fn is_system_database(oid: u32) -> bool {
    oid < FIRST_NORMAL_OBJECT_ID
}

pub fn databases(conn: &mut Connection) -> Result<Vec<DatabaseInfo>, ConnError> {
    let sql = "SELECT d.oid::text, d.datname, t.oid::text, t.spcname \
               FROM pg_database d JOIN pg_tablespace t ON t.oid = d.dattablespace \
               ORDER BY d.oid";
    conn.query_rows(sql)?
        .into_iter()
        .map(|row| {
            let oid_at = |column: usize| {
                (row.get(column).cloned().flatten())
                    .and_then(|o| o.parse().ok())
                    .ok_or_else(|| answer(sql, "bad oid"))
            };
            let text_at = |column: usize| row.get(column).cloned().flatten().unwrap_or_default();
            Ok(DatabaseInfo {
                oid: oid_at(0)?,
                name: text_at(1),
                tablespace_oid: oid_at(2)?,
                tablespace: text_at(3),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn database(oid: u32, name: &str, tablespace_oid: u32, tablespace: &str) -> DatabaseInfo {
        DatabaseInfo {
            oid,
            name: name.into(),
            tablespace_oid,
            tablespace: tablespace.into(),
        }
    }

    fn tablespace(oid: u32, name: &str) -> TablespaceInfo {
        TablespaceInfo {
            oid,
            name: name.into(),
            location: format!("/srv/{name}"),
        }
    }

    #[test]
    fn a_move_of_a_database_in_both_listings_and_a_created_tablespace_cannot_be_restored() {
        let before = Layout {
            databases: vec![
                database(5, "postgres", 1663, "pg_default"),
                database(16385, "app", 1663, "pg_default"),
                database(16386, "dropped", 1663, "pg_default"),
                database(16387, "renamed", 16384, "fast"),
            ],
            tablespaces: vec![tablespace(16384, "fast"), tablespace(16388, "dropped")],
        };
        let after = Layout {
            databases: vec![
                database(5, "postgres", 1663, "pg_default"),
                database(16385, "app", 16384, "fast"),
                database(16387, "renamed_now", 16384, "fast"),
                database(16390, "created", 16384, "fast"),
            ],
            tablespaces: vec![tablespace(16384, "fast"), tablespace(16391, "new")],
        };
        let changes = unrepairable_changes(&before, &after);
        assert_eq!(
            changes,
            [
                UnrepairableChange::DatabaseMoved {
                    name: "app".into(),
                    from: "pg_default".into(),
                    to: "fast".into(),
                },
                UnrepairableChange::TablespaceCreated {
                    name: "new".into(),
                    location: "/srv/new".into(),
                },
            ]
        );
        assert!(changes[1].to_string().contains("at /srv/new"));
        assert!(unrepairable_changes(&after, &after).is_empty());
    }
}
