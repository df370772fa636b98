//! WAL records, as far as pgvault reads them: the restore points `pg_create_restore_point`
//! writes, to choose the backup a `--target-name` restore starts from.
//!
//! A segment is pages of XLOG_BLCKSZ bytes, each beginning with a page header (the long
//! one on a segment's first page). Records follow one another at 8-byte boundaries and
//! run across pages, their bytes interrupted by the page headers; a page whose first
//! bytes continue a record from before says so (XLP_FIRST_IS_CONTRECORD) with the count
//! of bytes that remain. Each record starts with a 24-byte header and is protected by a
//! CRC-32C of its body, then of its header up to the CRC field.

use crate::bytes::{u16_at, u32_at, u64_at};
use crate::wal::{Lsn, SegmentHeader, WalFileName, LONG_HEADER_LEN, XLP_LONG_HEADER};

const XLP_FIRST_IS_CONTRECORD: u16 = 0x0001;
const SHORT_PAGE_HEADER_LEN: usize = 24;
const RECORD_HEADER_LEN: usize = 24;
/// offsetof(XLogRecord, xl_crc): the CRC covers the header up to here.
const RECORD_CRC_OFFSET: usize = 20;
const RM_XLOG_ID: u8 = 0;
const XLOG_RESTORE_POINT: u8 = 0x70;
/// Block ids of the data headers that follow a record header (xlogrecord.h).
const BLOCK_ID_DATA_SHORT: u8 = 255;
const BLOCK_ID_DATA_LONG: u8 = 254;
const BLOCK_ID_ORIGIN: u8 = 253;
const BLOCK_ID_TOPLEVEL_XID: u8 = 252;
/// sizeof(TimestampTz) before rp_name in xl_restore_point.
const RESTORE_POINT_NAME_OFFSET: usize = 8;
/// A record continuing into the next segment is kept for joining only up to this size:
/// restore points are about 100 bytes; full-page images and large commits are not needed.
const MAX_JOINED_RECORD: usize = 64 * 1024;

/// A restore point: its name and the position of its record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestorePoint {
    pub name: String,
    pub lsn: Lsn,
}

/// The start of a record that continues in the next segment.
struct Unfinished {
    lsn: Lsn,
    bytes: Vec<u8>,
    total: usize,
    /// Where the next segment must start for the rest to be there.
    next_segment: Lsn,
}

/// Finds restore points in the segments of one timeline, given in order. A record split
/// across two segments is joined when the second one is the next given.
#[derive(Default)]
pub struct RestorePointScanner {
    unfinished: Option<Unfinished>,
}

fn align8(n: usize) -> usize {
    (n + 7) & !7
}

impl RestorePointScanner {
    pub fn new() -> RestorePointScanner {
        RestorePointScanner::default()
    }

    /// The start of the segment holding the rest of a record begun at the end of the last
    /// segment scanned: scanning that segment next completes the record.
    pub fn awaits(&self) -> Option<Lsn> {
        self.unfinished
            .as_ref()
            .map(|unfinished| unfinished.next_segment)
    }

    /// The restore points whose records are in `segment` (the whole file of the segment
    /// starting at `start`), including one begun in the previous segment given. Reading
    /// stops at the first page or record that is not valid WAL: the unused end of a
    /// `.partial` segment, or damage.
    pub fn scan(&mut self, segment: &[u8], start: Lsn) -> Vec<RestorePoint> {
        let unfinished = self.unfinished.take().filter(|u| u.next_segment == start);
        let Some(head) = SegmentHeader::read(segment) else {
            return Vec::new();
        };
        let page_size = head.page_size as usize;
        if !head.is_long()
            || head.page_address != start
            || !page_size.is_power_of_two()
            || !(1024..=65536).contains(&page_size)
        {
            return Vec::new();
        }

        // The records' bytes without the page headers, and where each page's part begins
        // in them and in WAL.
        let mut stream = Vec::with_capacity(segment.len());
        let mut parts: Vec<(usize, u64)> = Vec::new();
        let mut continued = None;
        for (index, page) in segment.chunks_exact(page_size).enumerate() {
            let info = u16_at(page, 2);
            let address = start.0 + (index * page_size) as u64;
            if u16_at(page, 0) != head.magic || u64_at(page, 8) != address {
                break;
            }
            let header_len = if info & XLP_LONG_HEADER != 0 {
                LONG_HEADER_LEN
            } else {
                SHORT_PAGE_HEADER_LEN
            };
            if index == 0 && info & XLP_FIRST_IS_CONTRECORD != 0 {
                continued = Some(u32_at(page, 16) as usize);
            }
            parts.push((stream.len(), address + header_len as u64));
            stream.extend_from_slice(&page[header_len..]);
        }
        let whole = parts.len() * page_size == segment.len();
        let lsn_at = |offset: usize| {
            let part = parts.partition_point(|(begin, _)| *begin <= offset) - 1;
            Lsn(parts[part].1 + (offset - parts[part].0) as u64)
        };

        let mut points = Vec::new();
        let mut offset = 0;
        if let Some(remaining) = continued {
            if let Some(mut unfinished) = unfinished {
                if unfinished.bytes.len() + remaining == unfinished.total
                    && remaining <= stream.len()
                {
                    unfinished.bytes.extend_from_slice(&stream[..remaining]);
                    let name = crc_matches(&unfinished.bytes)
                        .then(|| restore_point_name(&unfinished.bytes))
                        .flatten();
                    if let Some(name) = name {
                        points.push(RestorePoint {
                            name,
                            lsn: unfinished.lsn,
                        });
                    }
                }
            }
            offset = align8(remaining);
        }
        while offset + 4 <= stream.len() {
            let total = u32_at(&stream, offset) as usize;
            // Zero: no record here (the rest of a segment ended by a WAL switch).
            if total < RECORD_HEADER_LEN {
                break;
            }
            if offset + total > stream.len() {
                if whole && total <= MAX_JOINED_RECORD {
                    self.unfinished = Some(Unfinished {
                        lsn: lsn_at(offset),
                        bytes: stream[offset..].to_vec(),
                        total,
                        next_segment: Lsn(start.0 + segment.len() as u64),
                    });
                }
                break;
            }
            let record = &stream[offset..offset + total];
            if !crc_matches(record) {
                break;
            }
            if let Some(name) = restore_point_name(record) {
                points.push(RestorePoint {
                    name,
                    lsn: lsn_at(offset),
                });
            }
            offset = align8(offset + total);
        }
        points
    }
}

/// A backup as the choice of a restore's backup sees it: recovery from it replays from
/// `start` on and is consistent once it has replayed to `stop`, on `timeline`.
#[derive(Debug, Clone, Copy)]
pub struct BackupRange {
    pub start: Lsn,
    pub stop: Lsn,
    pub timeline: u32,
}

/// The newest of `backups` (oldest first) that recovery can take to a restore point
/// named `name`, as its index: one with such a restore point in the WAL after its end,
/// and none between its start and its end (recovery stops at the first one it replays,
/// and stopping before the end is refused as inconsistent; names can repeat).
/// `segments` are the archived WAL files; `fetch` reads one (`None`: gone). The WAL is
/// read from the newest backup's start on, up to the first restore point found after its
/// end (as far as recovery would replay anyway), then back to each older backup's start
/// only while no backup is found usable; each segment is read once.
pub fn newest_backup_before_restore_point<E>(
    backups: &[BackupRange],
    segments: &[WalFileName],
    segment_size: u64,
    name: &str,
    mut fetch: impl FnMut(&WalFileName) -> Result<Option<Vec<u8>>, E>,
) -> Result<Option<usize>, E> {
    let mut segments: Vec<(u32, u64, &WalFileName)> = segments
        .iter()
        .filter(|wal| wal.is_segment())
        .filter_map(|wal| Some((wal.timeline(), wal.segno(segment_size)?, wal)))
        .collect();
    segments.sort_by_key(|(timeline, segno, _)| (*timeline, *segno));
    // Restore points of that name: position and timeline.
    let mut found: Vec<(Lsn, u32)> = Vec::new();
    let mut scan = |wal: &WalFileName, scanner: &mut RestorePointScanner, found: &mut Vec<_>| {
        if let (Some(data), Some(start)) = (fetch(wal)?, wal.start_lsn(segment_size)) {
            let named = scanner.scan(&data, start).into_iter();
            found.extend(
                named
                    .filter(|point| point.name == name)
                    .map(|point| (point.lsn, wal.timeline())),
            );
        }
        Ok(())
    };
    let mut read_from = u64::MAX;
    for (index, backup) in backups.iter().enumerate().rev() {
        let after_backup = |found: &[(Lsn, u32)]| {
            found
                .iter()
                .any(|(lsn, timeline)| *lsn >= backup.stop && *timeline >= backup.timeline)
        };
        // Read from the backup's start: recovery replays its own WAL too.
        let first = backup.start.segno(segment_size);
        let last_own = backup.stop.segno(segment_size);
        if first < read_from {
            let range: Vec<_> = segments
                .iter()
                .filter(|(_, segno, _)| (first..read_from).contains(segno))
                .collect();
            tracing::info!(
                "looking for restore point {name:?} in {} archived WAL segments",
                range.len()
            );
            let mut scanner = RestorePointScanner::new();
            let mut scanned_timeline = None;
            for (timeline, segno, wal) in range {
                if scanned_timeline != Some(*timeline) {
                    scanner = RestorePointScanner::new();
                    scanned_timeline = Some(*timeline);
                }
                scan(wal, &mut scanner, &mut found)?;
                // Reading on would only cost time: recovery stops at the first one.
                let own_read = *timeline >= backup.timeline && *segno >= last_own;
                if own_read && after_backup(&found) {
                    break;
                }
            }
            // A record begun at the end of this range goes on in the newer backup's first
            // segment, whose scan could not see where it began.
            let unfinished = scanner.awaits().filter(|_| !after_backup(&found));
            if let (Some(rest), Some(timeline)) = (unfinished, scanned_timeline) {
                let next = segments.iter().find(|(on, _, wal)| {
                    *on == timeline && wal.start_lsn(segment_size) == Some(rest)
                });
                if let Some((_, _, wal)) = next {
                    scan(wal, &mut scanner, &mut found)?;
                }
            }
            read_from = first;
        }
        let inside = found.iter().any(|(lsn, timeline)| {
            *timeline == backup.timeline && (backup.start..backup.stop).contains(lsn)
        });
        if after_backup(&found) && !inside {
            return Ok(Some(index));
        }
    }
    Ok(None)
}

fn crc_matches(record: &[u8]) -> bool {
    let body = crc32c::crc32c(&record[RECORD_HEADER_LEN..]);
    let crc = crc32c::crc32c_append(body, &record[..RECORD_CRC_OFFSET]);
    crc == u32_at(record, RECORD_CRC_OFFSET)
}

/// The name in a whole record, when it is a restore point.
fn restore_point_name(record: &[u8]) -> Option<String> {
    if record.len() < RECORD_HEADER_LEN
        || record[17] != RM_XLOG_ID
        || record[16] & 0xF0 != XLOG_RESTORE_POINT
    {
        return None;
    }
    // The data headers come first; the main data is the record's last bytes.
    let mut at = RECORD_HEADER_LEN;
    let main_len = loop {
        match *record.get(at)? {
            BLOCK_ID_DATA_SHORT => break usize::from(*record.get(at + 1)?),
            BLOCK_ID_DATA_LONG => {
                record.get(at + 1..at + 5)?;
                break u32_at(record, at + 1) as usize;
            }
            BLOCK_ID_ORIGIN => at += 3,
            BLOCK_ID_TOPLEVEL_XID => at += 5,
            _ => return None,
        }
    };
    let data = record.get(record.len().checked_sub(main_len)?..)?;
    let name = data.get(RESTORE_POINT_NAME_OFFSET..)?;
    let name = name.split(|b| *b == 0).next()?;
    Some(String::from_utf8_lossy(name).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: usize = 8192;
    const SEGMENT: usize = 16 * PAGE;
    const MAGIC: u16 = 0xD110;

    fn record(rmid: u8, info: u8, main_data: &[u8]) -> Vec<u8> {
        let mut body = Vec::new();
        if main_data.len() < 256 {
            body.push(BLOCK_ID_DATA_SHORT);
            body.push(main_data.len() as u8);
        } else {
            body.push(BLOCK_ID_DATA_LONG);
            body.extend_from_slice(&(main_data.len() as u32).to_le_bytes());
        }
        body.extend_from_slice(main_data);
        let mut header = Vec::new();
        header.extend_from_slice(&((RECORD_HEADER_LEN + body.len()) as u32).to_le_bytes());
        header.extend_from_slice(&7u32.to_le_bytes()); // xid
        header.extend_from_slice(&0u64.to_le_bytes()); // prev
        header.push(info);
        header.push(rmid);
        header.extend_from_slice(&[0, 0]);
        let crc = crc32c::crc32c_append(crc32c::crc32c(&body), &header);
        header.extend_from_slice(&crc.to_le_bytes());
        header.extend_from_slice(&body);
        header
    }

    /// A record of another resource manager, `n` bytes of data.
    fn filler(n: usize) -> Vec<u8> {
        record(10, 0x00, &vec![0xAB; n])
    }

    fn restore_point(name: &str) -> Vec<u8> {
        let mut data = 1234i64.to_le_bytes().to_vec();
        let mut field = [0u8; 64];
        field[..name.len()].copy_from_slice(name.as_bytes());
        data.extend_from_slice(&field);
        record(RM_XLOG_ID, XLOG_RESTORE_POINT, &data)
    }

    /// Lays records out as the server does, from `first` on, into segments; returns the
    /// segments and where each record starts.
    fn write_wal(first: u64, records: &[Vec<u8>]) -> (Vec<Vec<u8>>, Vec<Lsn>) {
        let mut wal: Vec<u8> = Vec::new();
        let base = first - first % SEGMENT as u64;
        let mut position = first;
        let mut starts = Vec::new();
        let header_len = |lsn: u64| {
            if lsn.is_multiple_of(SEGMENT as u64) {
                LONG_HEADER_LEN
            } else {
                SHORT_PAGE_HEADER_LEN
            }
        };
        // Page headers are written when a page is begun; `remaining` is what is left of
        // the record being written then.
        let begin_page = |wal: &mut Vec<u8>, lsn: u64, remaining: usize| {
            let at = (lsn - base) as usize;
            wal.resize(at + PAGE, 0);
            let mut info = if remaining > 0 {
                XLP_FIRST_IS_CONTRECORD
            } else {
                0
            };
            if header_len(lsn) == LONG_HEADER_LEN {
                info |= XLP_LONG_HEADER;
            }
            wal[at..at + 2].copy_from_slice(&MAGIC.to_le_bytes());
            wal[at + 2..at + 4].copy_from_slice(&info.to_le_bytes());
            wal[at + 4..at + 8].copy_from_slice(&1u32.to_le_bytes());
            wal[at + 8..at + 16].copy_from_slice(&lsn.to_le_bytes());
            wal[at + 16..at + 20].copy_from_slice(&(remaining as u32).to_le_bytes());
            if info & XLP_LONG_HEADER != 0 {
                wal[at + 32..at + 36].copy_from_slice(&(SEGMENT as u32).to_le_bytes());
                wal[at + 36..at + 40].copy_from_slice(&(PAGE as u32).to_le_bytes());
            }
        };
        let mut page = base + ((first - base) / PAGE as u64) * PAGE as u64;
        let mut lsn = page;
        while lsn < position {
            begin_page(&mut wal, lsn, 0);
            lsn += PAGE as u64;
        }
        for record in records {
            starts.push(Lsn(position));
            let mut written = 0;
            while written < record.len() {
                if position.is_multiple_of(PAGE as u64) {
                    page = position;
                    begin_page(&mut wal, page, record.len() - written);
                    position += header_len(page) as u64;
                }
                let room = PAGE - (position % PAGE as u64) as usize;
                let n = room.min(record.len() - written);
                let at = (position - base) as usize;
                wal[at..at + n].copy_from_slice(&record[written..written + n]);
                written += n;
                position += n as u64;
            }
            position = align8(position as usize) as u64;
            if position.is_multiple_of(PAGE as u64) {
                // The next record begins a new page, without a continuation.
                begin_page(&mut wal, position, 0);
                position += header_len(position) as u64;
            }
        }
        let len = align8(wal.len()).div_ceil(SEGMENT) * SEGMENT;
        let mut lsn = base + wal.len() as u64;
        while (lsn - base) < len as u64 {
            begin_page(&mut wal, lsn, 0);
            lsn += PAGE as u64;
        }
        (wal.chunks(SEGMENT).map(<[u8]>::to_vec).collect(), starts)
    }

    /// Whether a restore point's record (about 90 bytes) starting at `lsn` runs across a
    /// boundary of `unit`-byte pages or segments.
    fn crosses(lsn: Lsn, unit: usize) -> bool {
        lsn.0 / unit as u64 != (lsn.0 + 90) / unit as u64
    }

    /// `records(extra)` laid out from `first` on, for the first `extra` (a filler's size)
    /// that makes record `crossing` cross from one segment into the next.
    fn lay_out_across_segments(
        first: u64,
        records: impl Fn(usize) -> Vec<Vec<u8>>,
        crossing: usize,
    ) -> (Vec<Vec<u8>>, Vec<Lsn>) {
        (0..2 * PAGE)
            .step_by(8)
            .map(|extra| write_wal(first, &records(extra)))
            .find(|(_, starts)| crosses(starts[crossing], SEGMENT))
            .expect("a filler size that makes a record cross segments")
    }

    /// The choice among `backups` over `segments` (numbered from `first_segno`, on
    /// timeline 1), and the indexes of the segments it read, in order.
    fn choose_among(
        segments: &[Vec<u8>],
        first_segno: u64,
        backups: &[BackupRange],
        name: &str,
    ) -> (Option<usize>, Vec<usize>) {
        let names: Vec<WalFileName> = (0..segments.len())
            .map(|i| WalFileName::segment(1, first_segno + i as u64, SEGMENT as u64))
            .collect();
        let mut fetched = Vec::new();
        let chosen = newest_backup_before_restore_point(
            backups,
            &names,
            SEGMENT as u64,
            name,
            |wal| -> Result<_, std::convert::Infallible> {
                let index = names
                    .iter()
                    .position(|n| n == wal)
                    .expect("a listed segment");
                fetched.push(index);
                Ok(Some(segments[index].clone()))
            },
        );
        (chosen.unwrap_or_else(|never| match never {}), fetched)
    }

    fn scan_all(segments: &[Vec<u8>], base: u64) -> Vec<RestorePoint> {
        let mut scanner = RestorePointScanner::new();
        segments
            .iter()
            .enumerate()
            .flat_map(|(i, s)| scanner.scan(s, Lsn(base + (i * SEGMENT) as u64)))
            .collect()
    }

    #[test]
    fn finds_restore_points_across_pages_and_segments() {
        let base = 3 * SEGMENT as u64;
        // The first restore point straddles a page boundary, its header split; the second
        // crosses into the next segment (the filler before it sized to make it so); the
        // other records are skipped.
        let (segments, starts) = lay_out_across_segments(
            base + 40,
            |extra| {
                vec![
                    filler(8100),
                    restore_point("across-a-page"),
                    filler(300),
                    filler(SEGMENT - 2 * PAGE + extra),
                    restore_point("across-segments"),
                    filler(40),
                    restore_point("plain"),
                ]
            },
            4,
        );
        assert!(crosses(starts[1], PAGE), "{starts:?}");
        let found = scan_all(&segments, base);
        let expected: Vec<RestorePoint> =
            [(1, "across-a-page"), (4, "across-segments"), (6, "plain")]
                .iter()
                .map(|(i, name)| RestorePoint {
                    name: name.to_string(),
                    lsn: starts[*i],
                })
                .collect();
        assert_eq!(found, expected);

        // After the first segment alone, the scanner says where the rest is.
        let mut scanner = RestorePointScanner::new();
        assert_eq!(scanner.awaits(), None);
        let first = scanner.scan(&segments[0], Lsn(base));
        assert_eq!(first, expected[..1].to_vec());
        assert_eq!(scanner.awaits(), Some(Lsn(base + SEGMENT as u64)));
        scanner.scan(&segments[1], Lsn(base + SEGMENT as u64));
        assert_eq!(scanner.awaits(), None);

        // Without the first segment, the continued record is skipped, not misread.
        let mut scanner = RestorePointScanner::new();
        let later = scanner.scan(&segments[1], Lsn(base + SEGMENT as u64));
        assert_eq!(later, expected[2..].to_vec());

        // A joined record is checked like any other: a flipped byte in its continuation
        // (here in the zeros after the name, so the name itself would still read right).
        let mut damaged = segments.clone();
        damaged[1][LONG_HEADER_LEN] ^= 1;
        let found = scan_all(&damaged, base);
        assert_eq!(found, vec![expected[0].clone(), expected[2].clone()]);
    }

    #[test]
    fn chooses_the_newest_backup_before_a_restore_point() {
        let base = 3 * SEGMENT as u64;
        // "split" begins in the first segment and ends in the second, where the newer
        // backup ends; "later" comes after that backup's end.
        let (segments, starts) = lay_out_across_segments(
            base + 40,
            |extra| {
                vec![
                    filler(SEGMENT - 2 * PAGE + extra),
                    restore_point("split"),
                    filler(40),
                    restore_point("later"),
                ]
            },
            1,
        );
        let backups = [
            BackupRange {
                start: Lsn(base + 40),
                stop: Lsn(base + 40),
                timeline: 1,
            },
            BackupRange {
                start: starts[2],
                stop: starts[2],
                timeline: 1,
            },
        ];
        let choose = |name: &str| choose_among(&segments, 3, &backups, name);
        // The newer backup's WAL holds only the end of "split": the older backup's range
        // is read on into that segment to join it.
        assert_eq!(choose("split"), (Some(0), vec![1, 0, 1]));
        // Found after the newest backup's end, without reading older WAL.
        assert_eq!(choose("later"), (Some(1), vec![1]));
        assert_eq!(choose("elsewhere"), (None, vec![1, 0, 1]));
    }

    #[test]
    fn a_backup_with_the_restore_point_inside_is_passed_over() {
        let base = 7 * SEGMENT as u64;
        let (segments, starts) = write_wal(
            base + 40,
            &[
                filler(100),
                restore_point("deploy"),
                filler(100),
                restore_point("deploy"),
                filler(100),
                restore_point("deploy"),
            ],
        );
        let choose = |backups: &[BackupRange]| choose_among(&segments, 7, backups, "deploy").0;
        let range = |start: usize, stop: usize| BackupRange {
            start: starts[start],
            stop: starts[stop],
            timeline: 1,
        };
        // Recovery from the newer backup would stop at the "deploy" it ran across, before
        // its end: the older one, which the first "deploy" follows, is chosen.
        assert_eq!(choose(&[range(0, 1), range(2, 4)]), Some(0));
        // With a "deploy" inside each, neither can be taken there.
        assert_eq!(choose(&[range(0, 2), range(2, 4)]), None);
        // Without one inside, the newest backup is chosen as before.
        assert_eq!(choose(&[range(0, 1), range(4, 5)]), Some(1));
    }

    #[test]
    fn stops_at_damage_and_at_stale_pages() {
        let records = vec![restore_point("first"), restore_point("second")];
        let base = 5 * SEGMENT as u64;
        let (segments, starts) = write_wal(base + 40, &records);
        // A flipped byte in the second record fails its CRC.
        let mut damaged = segments[0].clone();
        let second = (starts[1].0 - base) as usize;
        damaged[second + 40] ^= 1;
        let found = RestorePointScanner::new().scan(&damaged, Lsn(base));
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].name, "first");
        // A page from an older use of the file (recycled segment) ends the reading.
        let mut stale = segments[0].clone();
        stale[8..16].copy_from_slice(&0u64.to_le_bytes());
        assert!(RestorePointScanner::new()
            .scan(&stale, Lsn(base))
            .is_empty());
        // The wrong start is no match either.
        assert!(RestorePointScanner::new()
            .scan(&segments[0], Lsn(base + SEGMENT as u64))
            .is_empty());
    }
}
