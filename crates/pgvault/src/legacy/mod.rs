//! Backups written by older backup managers: `pg_dumpall | gzip | openssl enc | split`,
//! uploaded per instance as `<id>-<timestamp>.json` (metadata; the backup id is the
//! name without `.json`) plus data as parts `<backup>-<index>` (from 0 or 1, numeric
//! order) or one object `<backup>`.

pub mod openssl;

use std::collections::{BTreeMap, VecDeque};
use std::io::{self, Read};
use std::thread::JoinHandle;

use chrono::{DateTime, NaiveDateTime, Utc};
use repo::storage::{DynStorage, ObjectMeta};

/// One data object of a backup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    pub key: String,
    /// `None` for a backup stored as one object.
    pub index: Option<u64>,
    pub size: u64,
}

#[derive(Debug, Clone)]
pub struct LegacyBackup {
    pub id: String,
    pub metadata_key: String,
    pub time: Option<DateTime<Utc>>,
    /// In numeric order.
    pub parts: Vec<Part>,
    /// Indexes missing between the first and the last part.
    pub missing: Vec<u64>,
}

impl LegacyBackup {
    pub fn size(&self) -> u64 {
        self.parts.iter().map(|p| p.size).sum()
    }

    pub fn contiguous(&self) -> bool {
        self.missing.is_empty() && !self.parts.is_empty()
    }
}

/// A timestamp in a backup id, in the forms backup managers use.
fn time_in_name(stamp: &str) -> Option<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(stamp) {
        return Some(t.with_timezone(&Utc));
    }
    if let Ok(secs) = stamp.parse::<i64>() {
        // Unix seconds (10 digits) or milliseconds (13).
        return match stamp.len() {
            10 => DateTime::from_timestamp(secs, 0),
            13 => DateTime::from_timestamp_millis(secs),
            _ => None,
        };
    }
    for format in [
        "%Y%m%dT%H%M%SZ",
        "%Y%m%dT%H%M%S",
        "%Y%m%d%H%M%S",
        "%Y-%m-%dT%H-%M-%S",
        "%Y-%m-%d-%H-%M-%S",
        "%Y-%m-%d_%H-%M-%S",
        "%Y-%m-%dT%H:%M:%S",
    ] {
        if let Ok(t) = NaiveDateTime::parse_from_str(stamp, format) {
            return Some(t.and_utc());
        }
    }
    None
}

/// Groups the objects of `instance` into backups, oldest first.
pub fn discover(objects: &[ObjectMeta], instance: &str) -> Vec<LegacyBackup> {
    let prefix = format!("{instance}-");
    let name_of = |key: &str| key.rsplit('/').next().unwrap_or(key).to_string();
    let mut backups: BTreeMap<String, LegacyBackup> = BTreeMap::new();
    for meta in objects {
        let name = name_of(&meta.key);
        if let Some(id) = name.strip_suffix(".json") {
            if id.starts_with(&prefix) {
                let stamp = &id[prefix.len()..];
                backups.insert(
                    id.to_string(),
                    LegacyBackup {
                        id: id.to_string(),
                        metadata_key: meta.key.clone(),
                        time: time_in_name(stamp).or(meta.modified),
                        parts: Vec::new(),
                        missing: Vec::new(),
                    },
                );
            }
        }
    }
    for meta in objects {
        let name = name_of(&meta.key);
        if name.ends_with(".json") {
            continue;
        }
        if let Some(backup) = backups.get_mut(&name) {
            backup.parts.push(Part {
                key: meta.key.clone(),
                index: None,
                size: meta.size,
            });
            continue;
        }
        // `<backup>-<digits>`, where <backup> has a metadata file.
        let Some((base, digits)) = name.rsplit_once('-') else {
            continue;
        };
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let (Some(backup), Ok(index)) = (backups.get_mut(base), digits.parse::<u64>()) else {
            continue;
        };
        backup.parts.push(Part {
            key: meta.key.clone(),
            index: Some(index),
            size: meta.size,
        });
    }
    let mut out: Vec<LegacyBackup> = backups.into_values().collect();
    for backup in &mut out {
        backup.parts.sort_by_key(|p| p.index);
        let indexes: Vec<u64> = backup.parts.iter().filter_map(|p| p.index).collect();
        if let (Some(&first), Some(&last)) = (indexes.first(), indexes.last()) {
            // Numbering starts at 0 or 1; anything else means the first part is missing.
            let start = first.min(1);
            backup.missing = (start..=last).filter(|i| !indexes.contains(i)).collect();
        }
    }
    out.sort_by(|a, b| a.time.cmp(&b.time).then(a.id.cmp(&b.id)));
    out
}

const RANGE: u64 = 8 * 1024 * 1024;

/// Reads the parts of a backup as one stream, fetching up to `ahead` ranges of 8 MiB in
/// parallel ahead of the reader (memory: `ahead` × 8 MiB).
pub struct PartsReader {
    storage: DynStorage,
    /// (key, offset, length) still to request, in order.
    todo: VecDeque<(String, u64, u64)>,
    in_flight: VecDeque<JoinHandle<io::Result<Vec<u8>>>>,
    ahead: usize,
    current: Vec<u8>,
    at: usize,
}

impl PartsReader {
    pub fn new(storage: DynStorage, parts: &[Part], ahead: usize) -> PartsReader {
        let mut todo = VecDeque::new();
        for part in parts {
            let mut offset = 0;
            while offset < part.size {
                let length = RANGE.min(part.size - offset);
                todo.push_back((part.key.clone(), offset, length));
                offset += length;
            }
        }
        let mut reader = PartsReader {
            storage,
            todo,
            in_flight: VecDeque::new(),
            ahead: ahead.max(1),
            current: Vec::new(),
            at: 0,
        };
        reader.top_up();
        reader
    }

    fn top_up(&mut self) {
        while self.in_flight.len() < self.ahead {
            let Some((key, offset, length)) = self.todo.pop_front() else {
                break;
            };
            let storage = self.storage.clone();
            self.in_flight.push_back(std::thread::spawn(move || {
                let data = storage
                    .get_range(&key, offset, length)
                    .map_err(|e| io::Error::other(format!("{key}: {e}")))?;
                if data.len() as u64 != length {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("{key} is shorter than listed (changed while reading?)"),
                    ));
                }
                Ok(data)
            }));
        }
    }
}

impl Read for PartsReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.at == self.current.len() {
            let Some(next) = self.in_flight.pop_front() else {
                return Ok(0);
            };
            self.current = next
                .join()
                .map_err(|_| io::Error::other("a download thread panicked"))??;
            self.at = 0;
            self.top_up();
        }
        let n = out.len().min(self.current.len() - self.at);
        out[..n].copy_from_slice(&self.current[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(key: &str, size: u64) -> ObjectMeta {
        ObjectMeta {
            key: key.into(),
            size,
            modified: None,
        }
    }

    #[test]
    fn parts_are_ordered_numerically_and_gaps_found() {
        let mut objects = vec![object("pg1-20260101T020000.json", 10)];
        for i in [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11] {
            objects.push(object(&format!("pg1-20260101T020000-{i}"), 100));
        }
        objects.push(object("pg1-20260102T020000.json", 10));
        objects.push(object("pg1-20260102T020000", 500));
        objects.push(object("pg1-20260103T020000.json", 10));
        objects.push(object("pg1-20260103T020000-0", 5));
        objects.push(object("pg1-20260103T020000-2", 5));
        objects.push(object("other-20260101T020000.json", 10));
        let found = discover(&objects, "pg1");
        assert_eq!(found.len(), 3);
        let first = &found[0];
        assert_eq!(first.id, "pg1-20260101T020000");
        let order: Vec<u64> = first.parts.iter().filter_map(|p| p.index).collect();
        assert_eq!(order, (1..=11).collect::<Vec<_>>());
        assert!(first.contiguous());
        assert_eq!(first.size(), 1100);
        assert_eq!(found[1].parts.len(), 1);
        assert_eq!(found[1].parts[0].index, None);
        assert_eq!(found[2].missing, vec![1]);
        assert!(found[0].time < found[1].time);
    }

    #[test]
    fn a_missing_first_part_is_a_gap() {
        let objects = vec![
            object("x-1700000000.json", 1),
            object("x-1700000000-2", 1),
            object("x-1700000000-3", 1),
        ];
        let found = discover(&objects, "x");
        assert_eq!(found[0].missing, vec![1]);
        assert_eq!(found[0].time, DateTime::from_timestamp(1_700_000_000, 0));
    }
}
