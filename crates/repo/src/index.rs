//! Indexes: where each blob lives (pack, offset, length).
//!
//! Index objects (`index/<id>`) are written after the packs they describe, so a blob is
//! visible to readers only once it is durable. They hold nothing a pack header does not
//! also hold, so `rebuild-index` can recreate them from the packs alone.
//!
//! ```text
//! index = "PVI1" pack_count:u32le (pack_id:[32] entry_count:u32le entry*)*
//! ```
//! (entries as in pack headers, delta bases included). The whole object is compressed
//! and sealed.

use std::collections::HashMap;

use crate::id::Id;
use crate::pack::{BlobType, PackEntry};

const INDEX_MAGIC: &[u8; 4] = b"PVI1";

/// The contents of one index object.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct IndexFile {
    pub packs: Vec<(Id, Vec<PackEntry>)>,
}

impl IndexFile {
    pub fn encode(&self) -> Vec<u8> {
        let entries: usize = self
            .packs
            .iter()
            .flat_map(|(_, e)| e.iter().map(PackEntry::encoded_len))
            .sum();
        let mut out = Vec::with_capacity(8 + self.packs.len() * 36 + entries);
        out.extend_from_slice(INDEX_MAGIC);
        out.extend_from_slice(&(self.packs.len() as u32).to_le_bytes());
        for (pack, entries) in &self.packs {
            out.extend_from_slice(&pack.0);
            out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
            for entry in entries {
                entry.encode(&mut out);
            }
        }
        out
    }

    pub fn decode(buf: &[u8]) -> Result<IndexFile, String> {
        let mut rest = buf
            .strip_prefix(INDEX_MAGIC)
            .ok_or_else(|| "bad index magic".to_string())?;
        let pack_count = take_u32(&mut rest)?;
        let mut packs = Vec::with_capacity(pack_count.min(1 << 20));
        for _ in 0..pack_count {
            let mut pack = [0u8; 32];
            pack.copy_from_slice(take(&mut rest, 32)?);
            let count = take_u32(&mut rest)?;
            let (entries, tail) = PackEntry::decode_many(rest, count)
                .map_err(|e| format!("index of pack {}: {e}", Id(pack).short()))?;
            rest = tail;
            packs.push((Id(pack), entries));
        }
        if !rest.is_empty() {
            return Err("trailing bytes after index".to_string());
        }
        Ok(IndexFile { packs })
    }
}

fn take<'b>(rest: &mut &'b [u8], n: usize) -> Result<&'b [u8], String> {
    if rest.len() < n {
        return Err("index is truncated".to_string());
    }
    let (head, tail) = rest.split_at(n);
    *rest = tail;
    Ok(head)
}

fn take_u32(rest: &mut &[u8]) -> Result<usize, String> {
    let b = take(rest, 4)?;
    Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
}

/// Where a blob is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlobLocation {
    pub pack: Id,
    pub blob_type: BlobType,
    pub offset: u32,
    pub length: u32,
    pub raw_length: u32,
    /// For a delta: the blob whose plaintext XORs with this one's to give the blob.
    pub base: Option<Id>,
}

#[derive(Debug, Clone, Copy)]
struct CompactLocation {
    pack: u32,
    blob_type: BlobType,
    offset: u32,
    length: u32,
    raw_length: u32,
}

/// The in-memory index of the whole repository. Pack ids are interned so an entry
/// costs about 60 bytes, i.e. ~60 MB per million blobs.
#[derive(Debug, Default)]
pub struct Index {
    packs: Vec<Id>,
    pack_numbers: HashMap<Id, u32>,
    blobs: HashMap<Id, CompactLocation>,
    /// Bases of the blobs stored as deltas (few, so kept apart from `blobs`).
    bases: HashMap<Id, Id>,
    /// Index objects this index was loaded from.
    pub files: Vec<Id>,
}

impl Index {
    pub fn add_pack(&mut self, pack: Id, entries: &[PackEntry]) {
        let number = *self.pack_numbers.entry(pack).or_insert_with(|| {
            self.packs.push(pack);
            (self.packs.len() - 1) as u32
        });
        for entry in entries {
            let location = CompactLocation {
                pack: number,
                blob_type: entry.blob_type,
                offset: entry.offset,
                length: entry.length,
                raw_length: entry.raw_length,
            };
            // The first location wins: duplicates (after an interrupted gc) are harmless.
            // Except that a whole copy beats a delta, which depends on a second blob.
            let replaces_delta = entry.base.is_none() && self.bases.contains_key(&entry.id);
            if replaces_delta {
                self.bases.remove(&entry.id);
                self.blobs.insert(entry.id, location);
            } else if let std::collections::hash_map::Entry::Vacant(slot) =
                self.blobs.entry(entry.id)
            {
                slot.insert(location);
                if let Some(base) = entry.base {
                    self.bases.insert(entry.id, base);
                }
            }
        }
    }

    /// Forgets deltas whose base is not indexed (its pack was deleted by `gc` because
    /// nothing used either blob), so such a blob counts as absent and is stored again
    /// whole rather than referenced and found unreadable later. Returns how many.
    pub fn drop_orphan_deltas(&mut self) -> usize {
        let orphans: Vec<Id> = self
            .bases
            .iter()
            .filter(|(_, base)| !self.blobs.contains_key(base) || self.bases.contains_key(base))
            .map(|(id, _)| *id)
            .collect();
        for id in &orphans {
            self.bases.remove(id);
            self.blobs.remove(id);
        }
        orphans.len()
    }

    pub fn add_file(&mut self, file_id: Id, file: &IndexFile) {
        for (pack, entries) in &file.packs {
            self.add_pack(*pack, entries);
        }
        self.files.push(file_id);
    }

    pub fn get(&self, id: &Id) -> Option<BlobLocation> {
        self.blobs.get(id).map(|loc| BlobLocation {
            pack: self.packs[loc.pack as usize],
            blob_type: loc.blob_type,
            offset: loc.offset,
            length: loc.length,
            raw_length: loc.raw_length,
            base: self.bases.get(id).copied(),
        })
    }

    pub fn contains(&self, id: &Id) -> bool {
        self.blobs.contains_key(id)
    }

    pub fn len(&self) -> usize {
        self.blobs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.blobs.is_empty()
    }

    pub fn packs(&self) -> &[Id] {
        &self.packs
    }

    /// Every blob with its location, grouped by nothing in particular.
    pub fn iter(&self) -> impl Iterator<Item = (Id, BlobLocation)> + '_ {
        self.blobs
            .keys()
            .filter_map(|id| self.get(id).map(|loc| (*id, loc)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(n: u8) -> PackEntry {
        PackEntry {
            blob_type: BlobType::Data,
            id: Id([n; 32]),
            offset: n as u32 * 10,
            length: 10,
            raw_length: 20,
            base: None,
        }
    }

    fn delta(n: u8, base: u8) -> PackEntry {
        PackEntry {
            base: Some(Id([base; 32])),
            ..entry(n)
        }
    }

    #[test]
    fn deltas_round_trip_and_whole_copies_win() {
        let file = IndexFile {
            packs: vec![(Id([1; 32]), vec![entry(1), delta(2, 1), delta(3, 7)])],
        };
        let decoded = IndexFile::decode(&file.encode()).expect("decode");
        assert_eq!(decoded, file);
        let mut index = Index::default();
        index.add_file(Id([9; 32]), &decoded);
        assert_eq!(
            index.get(&Id([2; 32])).and_then(|l| l.base),
            Some(Id([1; 32]))
        );
        // Blob 3's base was never stored: it must not look present.
        assert_eq!(index.drop_orphan_deltas(), 1);
        assert!(!index.contains(&Id([3; 32])));
        // A whole copy of blob 2 replaces the delta; another delta does not replace it.
        index.add_pack(Id([2; 32]), &[entry(2)]);
        index.add_pack(Id([3; 32]), &[delta(2, 1)]);
        let location = index.get(&Id([2; 32])).expect("indexed");
        assert_eq!((location.pack, location.base), (Id([2; 32]), None));
    }

    #[test]
    fn encode_decode_and_lookup() {
        let file = IndexFile {
            packs: vec![
                (Id([1; 32]), vec![entry(1), entry(2)]),
                (Id([2; 32]), vec![entry(3)]),
            ],
        };
        let decoded = IndexFile::decode(&file.encode()).expect("decode");
        assert_eq!(decoded, file);
        let mut index = Index::default();
        index.add_file(Id([9; 32]), &decoded);
        assert_eq!(index.len(), 3);
        assert_eq!(index.get(&Id([3; 32])).map(|l| l.pack), Some(Id([2; 32])));
        let mut truncated = file.encode();
        truncated.pop();
        assert!(IndexFile::decode(&truncated).is_err());
    }
}
