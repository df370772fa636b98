//! WAL summaries (PostgreSQL 17+ with `summarize_wal = on`): which blocks of which
//! relation forks WAL records modified in an LSN range. A backup whose previous backup
//! started at LSN A, starting itself at B, needs to read only the blocks modified in
//! [A, B]; pages modified after B are rewritten by WAL replay (full-page images), exactly
//! as the server's own incremental backups rely on.
//!
//! What the summaries cannot tell is treated as changed: the free space map (not fully
//! WAL-logged), temporary relations, blocks at or past a fork's *limit block* (created,
//! truncated or dropped), and every relation of a database/tablespace pair that was
//! created or dropped (relfilenode 0 in the summary).

use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::conn::{ConnError, Connection};
use crate::page::{BLOCKS_PER_SEGMENT, PAGE_SIZE};
use crate::pgdata::{Fork, RelationFile};
use crate::wal::Lsn;

/// The default tablespace (`base/`) and the shared one (`global/`).
pub const DEFAULT_TABLESPACE: u32 = 1663;
pub const GLOBAL_TABLESPACE: u32 = 1664;

/// One summary file the server has: WAL of `timeline` from `start` to `end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SummaryRange {
    pub timeline: u32,
    pub start: Lsn,
    pub end: Lsn,
}

/// The summaries that together cover `from..=to` on `timeline`, in order; `None` when
/// there is a hole (summarization was off, or old summaries were removed).
pub fn covering(
    available: &[SummaryRange],
    timeline: u32,
    from: Lsn,
    to: Lsn,
) -> Option<Vec<SummaryRange>> {
    let mut ranges: Vec<SummaryRange> = available
        .iter()
        .filter(|s| s.timeline == timeline && s.end > from && s.start < to)
        .copied()
        .collect();
    ranges.sort_by_key(|s| s.start);
    let mut reached = from;
    for range in &ranges {
        if range.start > reached {
            return None;
        }
        reached = reached.max(range.end);
    }
    (reached >= to).then_some(ranges)
}

#[derive(Debug, Default, Clone)]
struct ForkChanges {
    blocks: Vec<u32>,
    /// Blocks from here on are new or gone: treat them all as changed.
    limit: Option<u32>,
}

/// Key of one relation fork: tablespace, database, relfilenode, fork number.
type ForkKey = (u32, u32, u32, u8);

/// Blocks modified in an LSN range, from the server's WAL summaries.
#[derive(Debug, Default, Clone)]
pub struct ChangedBlocks {
    forks: HashMap<ForkKey, ForkChanges>,
    /// (tablespace, database) pairs whose relations were all recreated or dropped.
    recreated: HashSet<(u32, u32)>,
}

fn fork_number(fork: Fork) -> u8 {
    match fork {
        Fork::Main => 0,
        Fork::FreeSpace => 1,
        Fork::VisibilityMap => 2,
        Fork::Init => 3,
    }
}

impl ChangedBlocks {
    /// Records one row of `pg_wal_summary_contents()`.
    pub fn add(
        &mut self,
        tablespace: u32,
        database: u32,
        file_node: u32,
        fork: u8,
        block: u32,
        is_limit: bool,
    ) {
        if file_node == 0 {
            self.recreated.insert((tablespace, database));
            return;
        }
        let entry = self
            .forks
            .entry((tablespace, database, file_node, fork))
            .or_default();
        if is_limit {
            entry.limit = Some(entry.limit.map_or(block, |l| l.min(block)));
        } else {
            entry.blocks.push(block);
        }
    }

    /// Number of modified blocks recorded (limit blocks not counted).
    pub fn block_count(&self) -> usize {
        self.forks.values().map(|f| f.blocks.len()).sum()
    }

    /// Byte ranges of the file `relative` that may differ from the previous backup's
    /// copy. `tablespace` is the OID when `relative` is inside a tablespace's directory,
    /// `None` inside the data directory. `None` means "unknown: read it all" (not a
    /// relation file, the free space map, a temporary relation).
    pub fn changed_ranges(
        &self,
        tablespace: Option<u32>,
        relative: &Path,
    ) -> Option<Vec<Range<u64>>> {
        let relation = RelationFile::parse(relative)?;
        if relation.temporary || relation.fork == Fork::FreeSpace {
            return None;
        }
        let parts = crate::pgdata::path_parts(relative)?;
        let (tablespace, database) = match (tablespace, parts.as_slice()) {
            (None, ["global", _]) => (GLOBAL_TABLESPACE, 0),
            (None, ["base", db, _]) => (DEFAULT_TABLESPACE, db.parse().ok()?),
            (Some(oid), [_, db, _]) => (oid, db.parse().ok()?),
            _ => return None,
        };
        if self.recreated.contains(&(tablespace, database)) {
            return Some(std::iter::once(0..u64::MAX).collect());
        }
        let key = (
            tablespace,
            database,
            relation.file_node,
            fork_number(relation.fork),
        );
        let Some(changes) = self.forks.get(&key) else {
            return Some(Vec::new());
        };
        let first = u64::from(relation.segment) * BLOCKS_PER_SEGMENT;
        let past = first + BLOCKS_PER_SEGMENT;
        let offset = |block: u64| (block - first) * PAGE_SIZE as u64;
        let mut ranges: Vec<Range<u64>> = changes
            .blocks
            .iter()
            .map(|&b| u64::from(b))
            .filter(|b| (first..past).contains(b))
            .map(|b| offset(b)..offset(b) + PAGE_SIZE as u64)
            .collect();
        if let Some(limit) = changes.limit.map(u64::from) {
            if limit < past {
                ranges.push(offset(limit.max(first))..u64::MAX);
            }
        }
        Some(ranges)
    }
}

fn answer(sql: &str, message: impl Into<String>) -> ConnError {
    ConnError::Answer {
        sql: sql.to_string(),
        message: message.into(),
    }
}

fn number<T: std::str::FromStr>(sql: &str, value: Option<&Option<String>>) -> Result<T, ConnError> {
    value
        .cloned()
        .flatten()
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| answer(sql, "unexpected value"))
}

fn lsn(sql: &str, value: Option<&Option<String>>) -> Result<Lsn, ConnError> {
    let text = value
        .cloned()
        .flatten()
        .ok_or_else(|| answer(sql, "no LSN"))?;
    Lsn::parse(&text).map_err(|e| answer(sql, e.to_string()))
}

/// Whether the server summarizes WAL (`summarize_wal`, PostgreSQL 17+).
pub fn enabled(conn: &mut Connection, major: u32) -> Result<bool, ConnError> {
    if major < 17 {
        return Ok(false);
    }
    Ok(conn.query_one_value("SHOW summarize_wal")?.as_deref() == Some("on"))
}

/// Waits until the summarizer has summarized WAL up to `lsn` (it ends summaries at
/// checkpoint redo points, such as a backup's start). False after `timeout`.
pub fn wait_summarized(
    conn: &mut Connection,
    lsn: Lsn,
    timeout: Duration,
) -> Result<bool, ConnError> {
    let sql = "SELECT summarized_lsn::text FROM pg_get_wal_summarizer_state()";
    let deadline = Instant::now() + timeout;
    loop {
        let rows = conn.query_rows(sql)?;
        let summarized = self::lsn(sql, rows.first().and_then(|r| r.first()))?;
        if summarized >= lsn {
            return Ok(true);
        }
        if Instant::now() > deadline {
            return Ok(false);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The blocks modified on `timeline` between `from` and `to`, or `None` when the
/// server's summaries do not cover that range.
pub fn changed_blocks(
    conn: &mut Connection,
    timeline: u32,
    from: Lsn,
    to: Lsn,
) -> Result<Option<ChangedBlocks>, ConnError> {
    let sql = "SELECT tli::text, start_lsn::text, end_lsn::text FROM pg_available_wal_summaries()";
    let available = conn
        .query_rows(sql)?
        .iter()
        .map(|row| {
            Ok(SummaryRange {
                timeline: number(sql, row.first())?,
                start: lsn(sql, row.get(1))?,
                end: lsn(sql, row.get(2))?,
            })
        })
        .collect::<Result<Vec<_>, ConnError>>()?;
    let Some(ranges) = covering(&available, timeline, from, to) else {
        return Ok(None);
    };
    let mut changed = ChangedBlocks::default();
    for range in ranges {
        let sql = format!(
            "SELECT reltablespace::text, reldatabase::text, relfilenode::text, relforknumber::text, \
             relblocknumber::text, is_limit_block::text \
             FROM pg_wal_summary_contents({}, '{}', '{}')",
            range.timeline, range.start, range.end
        );
        for row in conn.query_rows(&sql)? {
            changed.add(
                number(&sql, row.first())?,
                number(&sql, row.get(1))?,
                number(&sql, row.get(2))?,
                number(&sql, row.get(3))?,
                number(&sql, row.get(4))?,
                row.get(5).cloned().flatten().as_deref() == Some("true"),
            );
        }
    }
    Ok(Some(changed))
}

#[cfg(test)]
#[allow(clippy::single_range_in_vec_init)] // lists of ranges that happen to hold one
mod tests {
    use super::*;

    fn range(timeline: u32, start: u64, end: u64) -> SummaryRange {
        SummaryRange {
            timeline,
            start: Lsn(start),
            end: Lsn(end),
        }
    }

    #[test]
    fn covering_needs_contiguous_summaries_on_the_timeline() {
        let available = [range(1, 100, 200), range(1, 200, 300), range(2, 300, 400)];
        assert_eq!(
            covering(&available, 1, Lsn(150), Lsn(250)),
            Some(vec![range(1, 100, 200), range(1, 200, 300)])
        );
        assert_eq!(
            covering(&available, 1, Lsn(150), Lsn(350)),
            None,
            "past the end"
        );
        assert_eq!(
            covering(&available, 1, Lsn(50), Lsn(250)),
            None,
            "before the start"
        );
        assert_eq!(
            covering(&available, 2, Lsn(150), Lsn(350)),
            None,
            "other timeline"
        );
        let holed = [range(1, 100, 200), range(1, 210, 300)];
        assert_eq!(covering(&holed, 1, Lsn(150), Lsn(250)), None, "hole");
    }

    #[test]
    fn changed_ranges_map_blocks_to_the_segment_files() {
        let mut changed = ChangedBlocks::default();
        changed.add(DEFAULT_TABLESPACE, 5, 16384, 0, 3, false);
        changed.add(DEFAULT_TABLESPACE, 5, 16384, 0, 131_072 + 1, false);
        changed.add(DEFAULT_TABLESPACE, 5, 16385, 0, 10, true);
        changed.add(GLOBAL_TABLESPACE, 0, 1262, 0, 0, false);
        changed.add(20000, 5, 16400, 2, 0, false);
        let page = PAGE_SIZE as u64;
        let ranges = |ts, path: &str| changed.changed_ranges(ts, Path::new(path));
        assert_eq!(ranges(None, "base/5/16384"), Some(vec![3 * page..4 * page]));
        assert_eq!(ranges(None, "base/5/16384.1"), Some(vec![page..2 * page]));
        assert_eq!(
            ranges(None, "base/5/16384_vm"),
            Some(vec![]),
            "other fork untouched"
        );
        assert_eq!(
            ranges(None, "base/5/16384_fsm"),
            None,
            "the FSM is not WAL-logged"
        );
        assert_eq!(
            ranges(None, "base/5/16385"),
            Some(vec![10 * page..u64::MAX])
        );
        assert_eq!(ranges(None, "base/5/16385.1"), Some(vec![0..u64::MAX]));
        assert_eq!(ranges(None, "global/1262"), Some(vec![0..page]));
        assert_eq!(
            ranges(Some(20000), "PG_17_202406281/5/16400_vm"),
            Some(vec![0..page])
        );
        assert_eq!(ranges(None, "base/5/t3_16384"), None, "temporary");
        assert_eq!(ranges(None, "base/5/PG_VERSION"), None, "not a relation");
        changed.add(DEFAULT_TABLESPACE, 5, 0, 0, 0, true);
        assert_eq!(
            changed.changed_ranges(None, Path::new("base/5/99999")),
            Some(vec![0..u64::MAX]),
            "database recreated"
        );
    }
}
