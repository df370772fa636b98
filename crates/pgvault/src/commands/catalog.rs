//! What the repository holds for one cluster, read with a handful of LIST calls (no
//! request per object): backups, pins, WAL per timeline with gaps, timeline histories,
//! and how far each backup can recover by replaying the archive.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Context as _, Result};
use chrono::{DateTime, Utc};
use pg::wal::{parse_history, Lsn, TimelineSwitch, WalFileName};
use repo::snapshot::Snapshot;
use repo::{Id, Repository};

use super::archive::{find_identity, ClusterIdentity};
use super::backup::{list_backups, BackupMeta};

/// One archived WAL file.
#[derive(Debug, Clone)]
pub struct ArchivedWal {
    pub name: WalFileName,
    /// The repository name of the file (for reading or deleting it).
    pub key: String,
    pub size: u64,
    /// When it was archived (the object's time), where the backend reports it.
    pub archived: Option<DateTime<Utc>>,
}

/// The WAL archive of a cluster.
#[derive(Debug, Default)]
pub struct WalArchive {
    pub segment_size: u64,
    pub files: Vec<ArchivedWal>,
    /// Segment numbers present per timeline, with their archive times.
    pub segments: BTreeMap<u32, BTreeMap<u64, Option<DateTime<Utc>>>>,
    /// Parsed history files per timeline.
    pub histories: BTreeMap<u32, Vec<TimelineSwitch>>,
    /// History files that could not be read or parsed.
    pub unreadable_histories: Vec<(u32, String)>,
}

/// A run of missing segments on one timeline, both ends inclusive.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Gap {
    pub timeline: u32,
    pub from: String,
    pub to: String,
}

/// A timeline with WAL past the point where a later timeline left it: see
/// [`WalArchive::left_behind`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeftBehind {
    pub timeline: u32,
    pub left_at: Lsn,
    pub last_segment: WalFileName,
    pub archived: Option<DateTime<Utc>>,
}

/// Archived WAL of one timeline that recovery to the latest timeline does not replay:
/// see [`WalArchive::off_latest`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct OffLatest {
    pub timeline: u32,
    /// Where the latest timeline's history left this one; `None` when it is not in that
    /// history at all (a sibling: another server promoted from the same past).
    pub left_at: Option<String>,
    pub first: String,
    pub last: String,
}

/// How far a backup recovers by replaying the archive.
#[derive(Debug, Clone, Default)]
pub struct Reach {
    /// Files the backup itself needs (its WAL range, its timeline's history) that are
    /// missing: it cannot be restored.
    pub missing: Vec<String>,
    /// The last segment replay reaches without a gap, following later timelines that
    /// branched after the backup.
    pub last_segment: Option<WalFileName>,
    /// When that segment was archived: no transaction in it is later than this.
    pub until: Option<DateTime<Utc>>,
}

impl Reach {
    pub fn restorable(&self) -> bool {
        self.missing.is_empty()
    }
}

impl WalArchive {
    /// Lists the archive; reads only the (few, small) history files.
    pub fn load(repo: &Repository, cluster: &str, segment_size: u64) -> Result<WalArchive> {
        let prefix = format!("wal/{cluster}/");
        let mut archive = WalArchive {
            segment_size,
            ..WalArchive::default()
        };
        for meta in repo.list_files(&prefix)? {
            let Some(name) = meta.key.rsplit('/').next() else {
                continue;
            };
            let Ok(wal) = WalFileName::parse(name) else {
                continue;
            };
            archive.files.push(ArchivedWal {
                name: wal,
                key: meta.key.clone(),
                size: meta.size,
                archived: meta.modified,
            });
        }
        archive.files.sort_by(|a, b| a.name.cmp(&b.name));
        for file in &archive.files {
            if file.name.is_segment() {
                if let Some(segno) = file.name.segno(segment_size) {
                    archive
                        .segments
                        .entry(file.name.timeline())
                        .or_default()
                        .insert(segno, file.archived);
                }
            } else if file.name.is_history() {
                let parsed = repo
                    .find_file(&file.key)
                    .map_err(anyhow::Error::from)
                    .and_then(|f| f.context("vanished"))
                    .and_then(|f| {
                        parse_history(&String::from_utf8_lossy(&f.data)).map_err(Into::into)
                    });
                match parsed {
                    Ok(switches) => {
                        archive.histories.insert(file.name.timeline(), switches);
                    }
                    Err(e) => archive
                        .unreadable_histories
                        .push((file.name.timeline(), format!("{e:#}"))),
                }
            }
        }
        Ok(archive)
    }

    fn name(&self, timeline: u32, segno: u64) -> WalFileName {
        WalFileName::segment(timeline, segno, self.segment_size)
    }

    fn has(&self, timeline: u32, segno: u64) -> bool {
        self.segments
            .get(&timeline)
            .is_some_and(|s| s.contains_key(&segno))
    }

    /// Missing segments between the first and last archived one of each timeline.
    pub fn gaps(&self) -> Vec<Gap> {
        let mut gaps = Vec::new();
        for (&timeline, present) in &self.segments {
            let mut previous: Option<u64> = None;
            for &segno in present.keys() {
                if let Some(prev) = previous {
                    if segno > prev + 1 {
                        gaps.push(Gap {
                            timeline,
                            from: self.name(timeline, prev + 1).to_string(),
                            to: self.name(timeline, segno - 1).to_string(),
                        });
                    }
                }
                previous = Some(segno);
            }
        }
        gaps
    }

    /// First and last segment per timeline.
    pub fn ranges(&self) -> Vec<(u32, String, String)> {
        self.segments
            .iter()
            .filter_map(|(&tli, present)| {
                let first = *present.keys().next()?;
                let last = *present.keys().next_back()?;
                Some((
                    tli,
                    self.name(tli, first).to_string(),
                    self.name(tli, last).to_string(),
                ))
            })
            .collect()
    }

    /// The newest archive time of any file.
    pub fn last_archived(&self) -> Option<(DateTime<Utc>, WalFileName)> {
        self.files
            .iter()
            .filter_map(|f| f.archived.map(|t| (t, f.name.clone())))
            .max_by(|a, b| a.0.cmp(&b.0).then(a.1.cmp(&b.1)))
    }

    /// What a backup needs and how far it reaches: along `follow` (the timeline recovery
    /// follows, see [`WalArchive::descends`]), or along whichever timeline reaches furthest.
    pub fn reach(&self, timeline: u32, start: Lsn, stop: Lsn, follow: Option<u32>) -> Reach {
        let first = start.segno(self.segment_size);
        let last = stop.segno(self.segment_size);
        let mut reach = Reach::default();
        for segno in first..=last {
            if !self.has(timeline, segno) {
                reach.missing.push(self.name(timeline, segno).to_string());
            }
        }
        if timeline > 1 && !self.histories.contains_key(&timeline) {
            reach
                .missing
                .push(WalFileName::history(timeline).to_string());
        }
        if !reach.restorable() {
            return reach;
        }
        // Paths: the backup's own timeline, and every later timeline whose history
        // passes through it after the backup ended.
        let mut best: Option<(u64, u32)> = None;
        let mut consider = |segno: u64, tli: u32| {
            if best.is_none_or(|(s, t)| (segno, tli) > (s, t)) {
                best = Some((segno, tli));
            }
        };
        if follow.is_none_or(|f| f == timeline) {
            consider(self.run_from(timeline, last, None), timeline);
        }
        for (&child, switches) in &self.histories {
            if follow.is_some_and(|f| f != child) {
                continue;
            }
            let Some(pos) = switches.iter().position(|s| s.parent == timeline) else {
                continue;
            };
            if switches[pos].switch_point < stop {
                continue;
            }
            // Walk timeline by timeline: each piece must be complete up to its switch.
            let mut tli = timeline;
            let mut segno = last;
            let mut complete = true;
            for (i, switch) in switches.iter().enumerate().skip(pos) {
                let next_tli = switches.get(i + 1).map(|s| s.parent).unwrap_or(child);
                let switch_seg = switch.switch_point.segno(self.segment_size);
                let end = self.run_from(tli, segno, Some(switch_seg.saturating_sub(1)));
                if end + 1 < switch_seg {
                    consider(end, tli);
                    complete = false;
                    break;
                }
                tli = next_tli;
                segno = switch_seg;
                if !self.has(tli, segno) {
                    consider(end, switch.parent);
                    complete = false;
                    break;
                }
            }
            if complete {
                consider(self.run_from(tli, segno, None), tli);
            }
        }
        if let Some((segno, tli)) = best {
            reach.last_segment = Some(self.name(tli, segno));
            reach.until = self
                .segments
                .get(&tli)
                .and_then(|s| s.get(&segno).copied().flatten());
        }
        reach
    }

    /// The timeline recovery from `timeline` follows to the latest: PostgreSQL takes the
    /// highest one whose history file it finds counting up from there.
    pub fn latest_timeline(&self, timeline: u32) -> u32 {
        let mut latest = timeline;
        while self.histories.contains_key(&(latest + 1)) {
            latest += 1;
        }
        latest
    }

    /// The archived WAL that recovery to the latest timeline (PostgreSQL's default) does
    /// not replay: every segment of a timeline outside the latest one's history, and of
    /// an ancestor the segments past where the history left it (when the timeline that
    /// left it has segments of its own from there, as in [`WalArchive::left_behind`]).
    pub fn off_latest(&self) -> Vec<OffLatest> {
        let latest = self.latest_timeline(1);
        let history = self.histories.get(&latest).map_or(&[][..], Vec::as_slice);
        let path: Vec<u32> = (history.iter().map(|s| s.parent).skip(1))
            .chain([latest])
            .collect();
        let mut off = Vec::new();
        for (&timeline, present) in &self.segments {
            if timeline == latest {
                continue;
            }
            let on_path = history.iter().position(|s| s.parent == timeline);
            let from = match on_path {
                None => 0,
                Some(i) => {
                    let switch_seg = history[i].switch_point.segno(self.segment_size);
                    let child_has_own = (self.segments.get(&path[i]))
                        .is_some_and(|child| child.range(switch_seg..).next().is_some());
                    if !child_has_own {
                        continue;
                    }
                    switch_seg + 1
                }
            };
            let mut past = present.range(from..).map(|(&segno, _)| segno);
            let Some(first) = past.next() else {
                continue;
            };
            let last = past.next_back().unwrap_or(first);
            off.push(OffLatest {
                timeline,
                left_at: on_path.map(|i| history[i].switch_point.to_string()),
                first: self.name(timeline, first).to_string(),
                last: self.name(timeline, last).to_string(),
            });
        }
        off
    }

    /// Whether recovery of a backup on `timeline` that ended at `stop` can follow
    /// `follow`: PostgreSQL refuses to start ("requested timeline … is not a child of this
    /// server's history") unless `follow` is that timeline or, by its history file,
    /// branched from it after the backup ended.
    pub fn descends(&self, timeline: u32, stop: Lsn, follow: u32) -> bool {
        follow == timeline
            || self.histories.get(&follow).is_some_and(|switches| {
                (switches.iter()).any(|s| s.parent == timeline && s.switch_point >= stop)
            })
    }

    /// Histories that recovery from a backup on `timeline` that ended at `stop` leaves
    /// behind when it follows `follow`: each timeline on the way that `follow` left after
    /// `stop` and that has WAL archived past the segment where it was left (the work of
    /// another server: a restored copy promoted while archiving here, or the old primary
    /// after a failover), when the timeline that left it has segments of its own from
    /// there. With where it was left and its last archived segment.
    pub fn left_behind(&self, timeline: u32, stop: Lsn, follow: u32) -> Vec<LeftBehind> {
        let Some(switches) = self.histories.get(&follow) else {
            return Vec::new();
        };
        let Some(pos) = switches.iter().position(|s| s.parent == timeline) else {
            return Vec::new();
        };
        let path = switches.iter().map(|s| s.parent).skip(1).chain([follow]);
        (switches.iter().zip(path).skip(pos))
            .filter(|(switch, _)| switch.switch_point >= stop)
            .filter_map(|(switch, child)| {
                let switch_seg = switch.switch_point.segno(self.segment_size);
                // Without files of its own from there on, recovery reads on in the
                // parent's files, and so does replay that WAL.
                self.segments.get(&child)?.range(switch_seg..).next()?;
                let (&last, &archived) = self.segments.get(&switch.parent)?.last_key_value()?;
                (last > switch_seg).then(|| LeftBehind {
                    timeline: switch.parent,
                    left_at: switch.switch_point,
                    last_segment: self.name(switch.parent, last),
                    archived,
                })
            })
            .collect()
    }

    /// The last segment of an unbroken run on `timeline` starting at `from` (which is
    /// present), not beyond `limit`.
    fn run_from(&self, timeline: u32, from: u64, limit: Option<u64>) -> u64 {
        let mut segno = from;
        while limit.is_none_or(|l| segno < l) && self.has(timeline, segno + 1) {
            segno += 1;
        }
        segno
    }
}

/// A backup with what it needs from the archive.
#[derive(Debug, Clone)]
pub struct BackupState {
    pub id: Id,
    pub snapshot: Snapshot,
    pub meta: BackupMeta,
    pub pinned: bool,
    /// The latest end of a restore's hold on it still in force (see [`Hold`]).
    pub held_until: Option<DateTime<Utc>>,
    pub reach: Reach,
}

/// Everything known about a cluster.
#[derive(Debug)]
pub struct ClusterState {
    pub identity: ClusterIdentity,
    /// Oldest first.
    pub backups: Vec<BackupState>,
    pub wal: WalArchive,
    /// Every hold on its backups, ended or not.
    pub holds: Vec<Hold>,
}

/// Instants a restore can reach: from the oldest restorable backup's end to the last
/// WAL reachable from any restorable backup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Window {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
}

impl ClusterState {
    pub fn load(repo: &Repository, cluster: &str) -> Result<Option<ClusterState>> {
        let Some(identity) = find_identity(repo, cluster)? else {
            return Ok(None);
        };
        let wal = WalArchive::load(repo, cluster, identity.wal_segment_size)?;
        let pins = pinned(repo, cluster)?;
        let holds = holds(repo, cluster)?;
        let now = Utc::now();
        let mut backups = Vec::new();
        for (id, snapshot, meta) in list_backups(repo, cluster)? {
            let reach = wal.reach(meta.timeline, meta.start_lsn()?, meta.stop_lsn()?, None);
            let hex = id.to_hex();
            let held_until = (holds.iter())
                .filter(|h| h.backup == hex && h.until > now)
                .map(|h| h.until)
                .max();
            backups.push(BackupState {
                pinned: pins.contains(&hex),
                held_until,
                id,
                snapshot,
                meta,
                reach,
            });
        }
        Ok(Some(ClusterState {
            identity,
            backups,
            wal,
            holds,
        }))
    }

    pub fn window(&self) -> Option<Window> {
        let restorable: Vec<&BackupState> = self
            .backups
            .iter()
            .filter(|b| b.reach.restorable())
            .collect();
        // The first whole microsecond (PostgreSQL's resolution) after the oldest end, so
        // that the printed instant is one a restore can start from that backup for.
        let from = restorable.iter().map(|b| b.meta.stop_time).min()?;
        let sub_micro = i64::from(from.timestamp_subsec_nanos() % 1000);
        let from = from + chrono::Duration::nanoseconds(1000 - sub_micro);
        let to = restorable
            .iter()
            .map(|b| {
                b.reach
                    .until
                    .unwrap_or(b.meta.stop_time)
                    .max(b.meta.stop_time)
            })
            .max()?;
        Some(Window { from, to })
    }
}

/// Names of the registered clusters.
pub fn cluster_names(repo: &Repository) -> Result<Vec<String>> {
    Ok(repo
        .list_files("clusters/")?
        .into_iter()
        .filter_map(|m| m.key.strip_prefix("clusters/").map(str::to_string))
        .collect())
}

pub fn pin_name(cluster: &str, id: &Id) -> String {
    format!("pins/{cluster}/{}", id.to_hex())
}

/// Hex ids of the pinned backups of `cluster`.
pub fn pinned(repo: &Repository, cluster: &str) -> Result<BTreeSet<String>> {
    let prefix = format!("pins/{cluster}/");
    Ok(repo
        .list_files(&prefix)?
        .into_iter()
        .filter_map(|m| m.key.strip_prefix(&prefix).map(str::to_string))
        .collect())
}

/// A restore's hold on the backup it restored: the restored server fetches the WAL from
/// that backup's start through `archive-get` for as long as it recovers, so `expire`
/// keeps the backup, and with it that WAL, until the hold ends. The end is in the name,
/// so that the holds are known from one LIST.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hold {
    /// Its repository name.
    pub name: String,
    /// Hex id of the held backup.
    pub backup: String,
    pub until: DateTime<Utc>,
}

/// What a hold says of the restore that wrote it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct HoldRecord {
    pub host: String,
    pub restored_into: String,
    pub created: DateTime<Utc>,
    pub until: DateTime<Utc>,
}

/// A new hold's name: two restores of one backup hold it each on their own.
pub fn hold_name(cluster: &str, backup: &Id, until: DateTime<Utc>) -> String {
    let nonce = Id::random().to_hex();
    format!(
        "holds/{cluster}/{}.{}.{}",
        backup.to_hex(),
        until.timestamp(),
        &nonce[..16]
    )
}

/// Every hold on backups of `cluster`, ended or not; names that are not holds are skipped.
pub fn holds(repo: &Repository, cluster: &str) -> Result<Vec<Hold>> {
    let prefix = format!("holds/{cluster}/");
    Ok((repo.list_files(&prefix)?.into_iter())
        .filter_map(|m| hold_named(&prefix, &m.key))
        .collect())
}

fn hold_named(prefix: &str, name: &str) -> Option<Hold> {
    let mut parts = name.strip_prefix(prefix)?.split('.');
    let backup = parts.next()?.parse::<Id>().ok()?.to_hex();
    let until = DateTime::from_timestamp(parts.next()?.parse().ok()?, 0)?;
    Some(Hold {
        name: name.to_string(),
        backup,
        until,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_holds_name_says_what_it_holds_and_until_when() {
        let backup = Id::random();
        let until = DateTime::from_timestamp(1_800_000_000, 0).expect("time");
        let name = hold_name("main", &backup, until);
        let hold = hold_named("holds/main/", &name).expect("a hold");
        assert_eq!((hold.backup, hold.until), (backup.to_hex(), until));
        assert_ne!(
            name,
            hold_name("main", &backup, until),
            "one name per restore"
        );
        for other in [
            "holds/main/x.1.y",
            "holds/main/",
            "pins/main/ab",
            "holds/other/a.1.b",
        ] {
            assert_eq!(hold_named("holds/main/", other), None, "{other}");
        }
        let truncated = name.rsplit_once('.').expect("dots").0;
        assert!(hold_named("holds/main/", truncated).is_some());
        let no_time = format!("holds/main/{}.soon.abc", backup.to_hex());
        assert_eq!(hold_named("holds/main/", &no_time), None);
    }

    const SEG: u64 = 16 * 1024 * 1024;

    fn archive(present: &[(u32, std::ops::RangeInclusive<u64>)]) -> WalArchive {
        let mut a = WalArchive {
            segment_size: SEG,
            ..WalArchive::default()
        };
        for (tli, range) in present {
            for segno in range.clone() {
                a.segments.entry(*tli).or_default().insert(segno, None);
            }
        }
        a
    }

    fn lsn(segno: u64) -> Lsn {
        Lsn(segno * SEG + 40)
    }

    #[test]
    fn a_backup_needs_its_whole_range() {
        let a = archive(&[(1, 2..=4), (1, 6..=9)]);
        let r = a.reach(1, lsn(3), lsn(4), None);
        assert!(r.restorable());
        assert_eq!(
            r.last_segment.map(|n| n.to_string()).as_deref(),
            Some("000000010000000000000004")
        );
        let r = a.reach(1, lsn(4), lsn(6), None);
        assert_eq!(r.missing, vec!["000000010000000000000005".to_string()]);
        assert_eq!(
            a.gaps(),
            vec![Gap {
                timeline: 1,
                from: "000000010000000000000005".into(),
                to: "000000010000000000000005".into()
            }]
        );
    }

    #[test]
    fn wal_left_behind_by_the_latest_timeline_is_named() {
        let switch = |parent: u32, segno: u64| TimelineSwitch {
            parent,
            switch_point: lsn(segno),
            reason: String::new(),
        };
        // Timeline 2 left 1 in segment 7, timeline 3 left 2 in segment 9.
        let mut a = archive(&[(1, 2..=10), (2, 7..=9), (3, 9..=9)]);
        a.histories.insert(2, vec![switch(1, 7)]);
        a.histories.insert(3, vec![switch(1, 7), switch(2, 9)]);
        assert_eq!(a.latest_timeline(1), 3);
        let left = a.left_behind(1, lsn(3), 3);
        assert_eq!(
            left.iter()
                .map(|l| (l.timeline, l.last_segment.to_string()))
                .collect::<Vec<_>>(),
            vec![(1, "00000001000000000000000A".to_string())]
        );
        assert_eq!(left[0].left_at, lsn(7));
        // Nothing past the branch: nothing left behind; nor for a backup after it.
        let mut b = archive(&[(1, 2..=7), (2, 7..=9)]);
        b.histories.insert(2, vec![switch(1, 7)]);
        assert_eq!(b.left_behind(1, lsn(3), 2), Vec::new());
        assert_eq!(a.left_behind(1, lsn(8), 3), Vec::new());
        // A child without segments of its own: recovery reads on in its parent's.
        let mut c = archive(&[(1, 2..=10)]);
        c.histories.insert(2, vec![switch(1, 7)]);
        assert_eq!(c.left_behind(1, lsn(3), 2), Vec::new());
        assert_eq!(c.latest_timeline(1), 2);
        assert_eq!(c.left_behind(1, lsn(3), 1), Vec::new());
    }

    #[test]
    fn wal_off_the_latest_timelines_history_is_named() {
        let switch = |parent: u32, segno: u64| TimelineSwitch {
            parent,
            switch_point: lsn(segno),
            reason: String::new(),
        };
        // 2 left 1 in segment 5; 3 left 1 in segment 7 and has its own segments from
        // there; 4 left 3 in segment 9 and has none yet (recovery reads on in 3's).
        let mut a = archive(&[(1, 2..=10), (2, 5..=12), (3, 7..=11)]);
        a.histories.insert(2, vec![switch(1, 5)]);
        a.histories.insert(3, vec![switch(1, 7)]);
        a.histories.insert(4, vec![switch(1, 7), switch(3, 9)]);
        let off = a.off_latest();
        let named = |timeline: u32, left: Option<u64>, first: &str, last: &str| OffLatest {
            timeline,
            left_at: left.map(|segno| lsn(segno).to_string()),
            first: first.to_string(),
            last: last.to_string(),
        };
        assert_eq!(
            off,
            vec![
                named(
                    1,
                    Some(7),
                    "000000010000000000000008",
                    "00000001000000000000000A"
                ),
                named(
                    2,
                    None,
                    "000000020000000000000005",
                    "00000002000000000000000C"
                ),
            ]
        );
        // One timeline only: nothing is off.
        assert_eq!(archive(&[(1, 2..=10)]).off_latest(), Vec::new());
    }

    #[test]
    fn recovery_follows_only_a_timeline_that_branched_after_the_backup() {
        let switch = |parent: u32, segno: u64| TimelineSwitch {
            parent,
            switch_point: lsn(segno),
            reason: String::new(),
        };
        // Timelines 2 and 3 both left 1: 2 in segment 5, 3 in segment 7.
        let mut a = archive(&[(1, 2..=10), (2, 5..=12), (3, 7..=8)]);
        a.histories.insert(2, vec![switch(1, 5)]);
        a.histories.insert(3, vec![switch(1, 7)]);
        assert!(a.descends(1, lsn(3), 3) && a.descends(1, lsn(3), 2) && a.descends(2, lsn(6), 2));
        // Not a sibling, nor a timeline that left before the backup ended, nor one unknown.
        assert!(!a.descends(2, lsn(6), 3));
        assert!(!a.descends(1, lsn(6), 2));
        assert!(!a.descends(1, lsn(3), 4));
        let last = |follow: Option<u32>| {
            let reach = a.reach(1, lsn(2), lsn(3), follow);
            reach.last_segment.map(|n| n.to_string())
        };
        assert_eq!(last(None).as_deref(), Some("00000002000000000000000C"));
        assert_eq!(last(Some(3)).as_deref(), Some("000000030000000000000008"));
        assert_eq!(last(Some(1)).as_deref(), Some("00000001000000000000000A"));
    }

    #[test]
    fn reach_follows_a_later_timeline() {
        // Timeline 2 branched from 1 in segment 7.
        let mut a = archive(&[(1, 2..=7), (2, 7..=12)]);
        a.histories.insert(
            2,
            vec![TimelineSwitch {
                parent: 1,
                switch_point: lsn(7),
                reason: String::new(),
            }],
        );
        let r = a.reach(1, lsn(2), lsn(3), None);
        assert_eq!(
            r.last_segment.map(|n| n.to_string()).as_deref(),
            Some("00000002000000000000000C")
        );
        // A backup after the switch point on timeline 1 cannot follow timeline 2.
        let r = a.reach(1, lsn(7), Lsn(7 * SEG + 1000), None);
        assert_eq!(r.last_segment.map(|n| n.timeline()), Some(1));
        // A backup on timeline 2 needs its history file.
        a.histories.clear();
        let r = a.reach(2, lsn(8), lsn(9), None);
        assert_eq!(r.missing, vec!["00000002.history".to_string()]);
    }

    #[test]
    fn a_gap_before_the_switch_stops_the_reach() {
        let mut a = archive(&[(1, 2..=4), (1, 6..=7), (2, 7..=12)]);
        a.histories.insert(
            2,
            vec![TimelineSwitch {
                parent: 1,
                switch_point: lsn(7),
                reason: String::new(),
            }],
        );
        let r = a.reach(1, lsn(2), lsn(3), None);
        assert_eq!(
            r.last_segment.map(|n| n.to_string()).as_deref(),
            Some("000000010000000000000004")
        );
    }
}
