//! Compression of blobs before encryption. The first byte of a compressed buffer names
//! the algorithm, so every blob says how to decompress it and the setting can change at
//! any time without rewriting old data.

use std::cell::RefCell;
use std::fmt;
use std::io::{Read, Write};

const TAG_NONE: u8 = 0;
const TAG_ZSTD: u8 = 1;
const TAG_LZ4: u8 = 2;
const TAG_GZIP: u8 = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Zstd(i32),
    Lz4,
    Gzip(u32),
}

impl Default for Compression {
    fn default() -> Self {
        Compression::Zstd(3)
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Compression::None => f.write_str("none"),
            Compression::Zstd(level) => write!(f, "zstd:{level}"),
            Compression::Lz4 => f.write_str("lz4"),
            Compression::Gzip(level) => write!(f, "gzip:{level}"),
        }
    }
}

impl std::str::FromStr for Compression {
    type Err = String;
    /// Accepts `none`, `lz4`, `zstd`, `zstd:N` (1–19), `gzip`, `gzip:N` (1–9).
    fn from_str(s: &str) -> Result<Compression, String> {
        let (name, level) = match s.split_once(':') {
            Some((name, level)) => {
                let level: i32 = level
                    .parse()
                    .map_err(|_| format!("compression {s:?}: level {level:?} is not a number"))?;
                (name, Some(level))
            }
            None => (s, None),
        };
        match (name, level) {
            ("none", None) => Ok(Compression::None),
            ("lz4", None) => Ok(Compression::Lz4),
            ("zstd", None) => Ok(Compression::Zstd(3)),
            ("zstd", Some(l)) if (1..=19).contains(&l) => Ok(Compression::Zstd(l)),
            ("gzip", None) => Ok(Compression::Gzip(6)),
            ("gzip", Some(l)) if (1..=9).contains(&l) => Ok(Compression::Gzip(l as u32)),
            ("zstd", Some(l)) => Err(format!(
                "compression {s:?}: zstd level {l} is out of range 1-19"
            )),
            ("gzip", Some(l)) => Err(format!(
                "compression {s:?}: gzip level {l} is out of range 1-9"
            )),
            _ => Err(format!(
                "unknown compression {s:?}: use zstd[:N], lz4, gzip[:N] or none"
            )),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DecompressError {
    #[error("empty compressed buffer")]
    Empty,
    #[error("unknown compression tag {0}")]
    UnknownTag(u8),
    #[error("corrupt compressed data: {0}")]
    Corrupt(String),
}

thread_local! {
    /// One zstd context per thread and level: creating one per blob (and zeroing its
    /// tables) was a tenth of a backup's CPU time.
    static ZSTD_COMPRESSOR: RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
        const { RefCell::new(None) };
    static ZSTD_DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { RefCell::new(None) };
}

fn zstd_compress(data: &[u8], level: i32) -> Option<Vec<u8>> {
    ZSTD_COMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.as_ref().map(|(l, _)| *l) != Some(level) {
            *slot = Some((level, zstd::bulk::Compressor::new(level).ok()?));
        }
        slot.as_mut()?.1.compress(data).ok()
    })
}

/// Decompresses a zstd frame that records its size (every frame pgvault writes); `None`
/// for frames without one, which the streaming decoder handles.
fn zstd_decompress_sized(body: &[u8]) -> Option<std::io::Result<Vec<u8>>> {
    let size = zstd::zstd_safe::get_frame_content_size(body).ok()??;
    // The frame is authenticated before it gets here; the cap still keeps a wrong size
    // field from allocating more than the largest blob (a 1 GiB WAL segment).
    let size = usize::try_from(size).ok().filter(|&s| s <= 1 << 30)?;
    Some(ZSTD_DECOMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(zstd::bulk::Decompressor::new()?);
        }
        match slot.as_mut() {
            Some(decompressor) => decompressor.decompress(body, size),
            None => Err(std::io::Error::other("no zstd decompressor")),
        }
    }))
}

impl Compression {
    /// Compresses `data`, prefixed with the algorithm tag. Stores it uncompressed when
    /// compression would not save space (restores of such blobs then cost no CPU).
    pub fn compress(&self, data: &[u8]) -> Vec<u8> {
        let compressed = match self {
            Compression::None => None,
            Compression::Zstd(level) => zstd_compress(data, *level).map(|c| (TAG_ZSTD, c)),
            Compression::Lz4 => Some((TAG_LZ4, lz4_flex::compress_prepend_size(data))),
            Compression::Gzip(level) => {
                let mut enc =
                    flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(*level));
                enc.write_all(data)
                    .and_then(|_| enc.finish())
                    .ok()
                    .map(|c| (TAG_GZIP, c))
            }
        };
        match compressed {
            Some((tag, c)) if c.len() < data.len() => {
                let mut out = Vec::with_capacity(c.len() + 1);
                out.push(tag);
                out.extend_from_slice(&c);
                out
            }
            _ => {
                let mut out = Vec::with_capacity(data.len() + 1);
                out.push(TAG_NONE);
                out.extend_from_slice(data);
                out
            }
        }
    }
}

/// Reverses [`Compression::compress`]; `size_hint` is the expected plaintext length.
pub fn decompress(buf: &[u8], size_hint: usize) -> Result<Vec<u8>, DecompressError> {
    let (&tag, body) = buf.split_first().ok_or(DecompressError::Empty)?;
    let corrupt = |e: std::io::Error| DecompressError::Corrupt(e.to_string());
    match tag {
        TAG_NONE => Ok(body.to_vec()),
        TAG_ZSTD => {
            if let Some(result) = zstd_decompress_sized(body) {
                return result.map_err(corrupt);
            }
            let mut out = Vec::with_capacity(size_hint);
            zstd::stream::read::Decoder::with_buffer(body)
                .map_err(corrupt)?
                .read_to_end(&mut out)
                .map_err(corrupt)?;
            Ok(out)
        }
        TAG_LZ4 => lz4_flex::decompress_size_prepended(body)
            .map_err(|e| DecompressError::Corrupt(e.to_string())),
        TAG_GZIP => {
            let mut out = Vec::with_capacity(size_hint);
            flate2::read::GzDecoder::new(body)
                .read_to_end(&mut out)
                .map_err(corrupt)?;
            Ok(out)
        }
        other => Err(DecompressError::UnknownTag(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        for s in ["none", "lz4", "zstd:1", "zstd:19", "gzip:9"] {
            let c: Compression = s.parse().expect(s);
            assert_eq!(c.to_string(), s);
        }
        assert_eq!("zstd".parse::<Compression>(), Ok(Compression::Zstd(3)));
        assert!("zstd:0".parse::<Compression>().is_err());
        assert!("brotli".parse::<Compression>().is_err());
        assert!("gzip:x".parse::<Compression>().is_err());
    }

    #[test]
    fn incompressible_data_is_stored_raw() {
        let mut data = vec![0u8; 4096];
        crate::crypto::fill_random(&mut data);
        let out = Compression::Zstd(3).compress(&data);
        assert_eq!(out[0], TAG_NONE);
        assert_eq!(decompress(&out, data.len()).expect("decompress"), data);
    }
}
