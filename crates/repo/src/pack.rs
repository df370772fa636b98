//! Pack objects: many blobs in one storage object, so that small blobs do not become
//! millions of tiny objects.
//!
//! ```text
//! pack   = blob* sealed_header header_length:u32le magic:"PVK1"
//! header = "PVH1" count:u32le entry*            (sealed like every object)
//! entry  = type:u8 id:[32] offset:u32le length:u32le raw_length:u32le base:[32]?
//! ```
//! Each blob is `seal(compress(plaintext))`; `raw_length` is the plaintext length. The
//! header makes every pack self-describing, so indexes can be rebuilt from packs alone.
//! Packs are named by the unkeyed BLAKE3 of their bytes.
//!
//! Type 2 is a data blob stored as a delta (format version 2): its stored plaintext is
//! the blob XOR the data blob `base` (same length, itself never a delta), which is mostly
//! zeros when a few pages of a 128 KiB chunk changed and compresses to almost nothing.
//! The id is still the keyed hash of the whole blob, so deduplication is unaffected.

use crate::crypto::Crypto;
use crate::id::Id;

const PACK_MAGIC: &[u8; 4] = b"PVK1";
const HEADER_MAGIC: &[u8; 4] = b"PVH1";
/// Length of an entry without a delta base; a delta entry adds the 32-byte base id.
pub const ENTRY_LEN: usize = 1 + 32 + 4 + 4 + 4;
const DELTA_TYPE: u8 = 2;
/// Bytes after the sealed header: its length and the magic.
pub const TRAILER_LEN: usize = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BlobType {
    Data,
    Tree,
}

impl BlobType {
    fn to_byte(self) -> u8 {
        match self {
            BlobType::Data => 0,
            BlobType::Tree => 1,
        }
    }
    fn from_byte(b: u8) -> Option<BlobType> {
        match b {
            0 => Some(BlobType::Data),
            1 => Some(BlobType::Tree),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackEntry {
    pub blob_type: BlobType,
    pub id: Id,
    pub offset: u32,
    pub length: u32,
    pub raw_length: u32,
    /// For a data blob stored as a delta: the blob it is XORed with.
    pub base: Option<Id>,
}

impl PackEntry {
    pub(crate) fn encoded_len(&self) -> usize {
        ENTRY_LEN + if self.base.is_some() { 32 } else { 0 }
    }

    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        out.push(match self.base {
            Some(_) => DELTA_TYPE,
            None => self.blob_type.to_byte(),
        });
        out.extend_from_slice(&self.id.0);
        out.extend_from_slice(&self.offset.to_le_bytes());
        out.extend_from_slice(&self.length.to_le_bytes());
        out.extend_from_slice(&self.raw_length.to_le_bytes());
        if let Some(base) = &self.base {
            out.extend_from_slice(&base.0);
        }
    }

    /// Decodes `count` entries from the front of `buf`; returns them and the rest.
    pub(crate) fn decode_many(buf: &[u8], count: usize) -> Result<(Vec<PackEntry>, &[u8]), String> {
        let mut rest = buf;
        let mut entries = Vec::with_capacity(count.min(buf.len() / ENTRY_LEN));
        for _ in 0..count {
            if rest.len() < ENTRY_LEN {
                return Err("entries are truncated".into());
            }
            let u32_at =
                |i: usize| u32::from_le_bytes([rest[i], rest[i + 1], rest[i + 2], rest[i + 3]]);
            let id_at = |i: usize| {
                let mut id = [0u8; 32];
                id.copy_from_slice(&rest[i..i + 32]);
                Id(id)
            };
            let (blob_type, base) = match rest[0] {
                DELTA_TYPE => {
                    if rest.len() < ENTRY_LEN + 32 {
                        return Err("entries are truncated".into());
                    }
                    (BlobType::Data, Some(id_at(ENTRY_LEN)))
                }
                byte => (
                    BlobType::from_byte(byte).ok_or_else(|| format!("bad blob type {byte}"))?,
                    None,
                ),
            };
            let entry = PackEntry {
                blob_type,
                id: id_at(1),
                offset: u32_at(33),
                length: u32_at(37),
                raw_length: u32_at(41),
                base,
            };
            rest = &rest[entry.encoded_len()..];
            entries.push(entry);
        }
        Ok((entries, rest))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PackError {
    #[error("pack is too short or has no trailer")]
    Truncated,
    #[error("pack header cannot be opened: {0}")]
    Header(String),
    #[error("pack header is malformed: {0}")]
    Malformed(String),
}

/// Accumulates sealed blobs until the pack is big enough to upload.
#[derive(Debug, Default)]
pub struct PackBuilder {
    buf: Vec<u8>,
    entries: Vec<PackEntry>,
}

/// A finished pack, ready to upload.
#[derive(Debug)]
pub struct FinishedPack {
    pub id: Id,
    pub bytes: Vec<u8>,
    pub entries: Vec<PackEntry>,
}

impl PackBuilder {
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Adds a sealed blob; `base` for a data blob stored as a delta against that blob.
    pub fn add(
        &mut self,
        blob_type: BlobType,
        id: Id,
        sealed: &[u8],
        raw_length: usize,
        base: Option<Id>,
    ) {
        self.entries.push(PackEntry {
            blob_type,
            id,
            offset: self.buf.len() as u32,
            length: sealed.len() as u32,
            raw_length: raw_length as u32,
            base,
        });
        self.buf.extend_from_slice(sealed);
    }

    pub fn finish(self, crypto: &Crypto) -> FinishedPack {
        let entries_len: usize = self.entries.iter().map(PackEntry::encoded_len).sum();
        let mut header = Vec::with_capacity(8 + entries_len);
        header.extend_from_slice(HEADER_MAGIC);
        header.extend_from_slice(&(self.entries.len() as u32).to_le_bytes());
        for entry in &self.entries {
            entry.encode(&mut header);
        }
        let sealed = crypto.seal(&header);
        let mut bytes = self.buf;
        bytes.extend_from_slice(&sealed);
        bytes.extend_from_slice(&(sealed.len() as u32).to_le_bytes());
        bytes.extend_from_slice(PACK_MAGIC);
        FinishedPack {
            id: Id::of_bytes(&bytes),
            bytes,
            entries: self.entries,
        }
    }
}

/// Length of the sealed header, read from a pack's last [`TRAILER_LEN`] bytes.
pub fn header_length(trailer: &[u8]) -> Result<usize, PackError> {
    if trailer.len() < TRAILER_LEN || &trailer[trailer.len() - 4..] != PACK_MAGIC {
        return Err(PackError::Truncated);
    }
    let n = trailer.len();
    Ok(u32::from_le_bytes([
        trailer[n - 8],
        trailer[n - 7],
        trailer[n - 6],
        trailer[n - 5],
    ]) as usize)
}

/// Parses a pack's blob list from its sealed header.
pub fn parse_header(crypto: &Crypto, sealed_header: &[u8]) -> Result<Vec<PackEntry>, PackError> {
    let header = crypto
        .open(sealed_header)
        .map_err(|e| PackError::Header(e.to_string()))?;
    if header.len() < 8 || &header[..4] != HEADER_MAGIC {
        return Err(PackError::Malformed("bad header magic".into()));
    }
    let count = u32::from_le_bytes([header[4], header[5], header[6], header[7]]) as usize;
    let (entries, rest) =
        PackEntry::decode_many(&header[8..], count).map_err(PackError::Malformed)?;
    if !rest.is_empty() {
        return Err(PackError::Malformed(format!(
            "{} header bytes left after {count} entries",
            rest.len()
        )));
    }
    Ok(entries)
}

/// Parses the header of a whole pack held in memory, checking entries stay in bounds.
pub fn parse_pack(crypto: &Crypto, pack: &[u8]) -> Result<Vec<PackEntry>, PackError> {
    let header_len = header_length(pack)?;
    let header_start = pack
        .len()
        .checked_sub(TRAILER_LEN + header_len)
        .ok_or(PackError::Truncated)?;
    let entries = parse_header(crypto, &pack[header_start..pack.len() - TRAILER_LEN])?;
    for entry in &entries {
        let end = entry.offset as usize + entry.length as usize;
        if end > header_start {
            return Err(PackError::Malformed(format!(
                "blob {} extends past the blob area",
                entry.id.short()
            )));
        }
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::{Encryption, MasterKey};

    #[test]
    fn pack_round_trip() {
        let crypto = Crypto::new(Encryption::Xchacha20Poly1305, MasterKey::generate());
        let mut builder = PackBuilder::default();
        let a = crypto.seal(b"first");
        let b = crypto.seal(b"second blob");
        builder.add(BlobType::Data, crypto.blob_id(b"first"), &a, 5, None);
        builder.add(BlobType::Tree, crypto.blob_id(b"second blob"), &b, 11, None);
        let delta = crypto.seal(b"xor");
        let base = Some(crypto.blob_id(b"first"));
        builder.add(BlobType::Data, crypto.blob_id(b"third"), &delta, 5, base);
        let pack = builder.finish(&crypto);
        assert_eq!(pack.id, Id::of_bytes(&pack.bytes));
        let entries = parse_pack(&crypto, &pack.bytes).expect("parse");
        assert_eq!(entries, pack.entries);
        assert_eq!(entries[2].base, base);
        let e = entries[1];
        let sealed = &pack.bytes[e.offset as usize..(e.offset + e.length) as usize];
        assert_eq!(crypto.open(sealed).expect("open"), b"second blob");
        assert!(parse_pack(&crypto, &pack.bytes[..pack.bytes.len() - 1]).is_err());
    }
}
