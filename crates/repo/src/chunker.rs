//! Splitting data into blobs.
//!
//! - Fixed-size chunks for files whose changes happen in place at page granularity
//!   (PostgreSQL relation files): a changed 8 KiB page changes exactly one chunk, and
//!   chunk boundaries never shift. The size must be a multiple of the page size. The
//!   archive reads them at their offsets, several stretches of a file at once.
//! - Content-defined chunks (FastCDC) for streams such as dumps, where an insertion
//!   shifts everything after it: boundaries follow content, so unchanged regions keep
//!   producing the same chunks.

use serde::{Deserialize, Serialize};
use std::io::{self, Read};

/// PostgreSQL's default block size; fixed chunks are multiples of it.
pub const PAGE_SIZE: u32 = 8192;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ChunkerParams {
    /// Size of fixed chunks for files (bytes, multiple of 8 KiB).
    pub fixed_size: u32,
    pub cdc_min: u32,
    pub cdc_avg: u32,
    pub cdc_max: u32,
}

impl Default for ChunkerParams {
    /// Chosen by measurement (docs/benchmarks.md, "chunk size", bench/chunk-size.sh):
    /// after a small pgbench workload 128 KiB chunks store 1.5× what 8 KiB chunks store,
    /// after a larger one 30% less (larger chunks compress better), with a twelfth of
    /// the index entries — which is what bounds memory on terabyte clusters.
    fn default() -> Self {
        ChunkerParams {
            fixed_size: 128 * 1024,
            // Streams are mostly pg_dump archives, where a changed row costs the whole
            // chunk around it: 256 KiB on average keeps a second dump after a handful of
            // scattered updates at a few percent of the first (tests/dump.rs).
            cdc_min: 64 * 1024,
            cdc_avg: 256 * 1024,
            cdc_max: 1024 * 1024,
        }
    }
}

impl ChunkerParams {
    pub fn validate(&self) -> Result<(), String> {
        if self.fixed_size == 0
            || !self.fixed_size.is_multiple_of(PAGE_SIZE)
            || self.fixed_size > 16 << 20
        {
            return Err(format!(
                "fixed chunk size {} must be a positive multiple of {PAGE_SIZE} up to 16 MiB",
                self.fixed_size
            ));
        }
        let in_range = (fastcdc::v2020::MINIMUM_MIN..=fastcdc::v2020::MINIMUM_MAX)
            .contains(&self.cdc_min)
            && (fastcdc::v2020::AVERAGE_MIN..=fastcdc::v2020::AVERAGE_MAX).contains(&self.cdc_avg)
            && (fastcdc::v2020::MAXIMUM_MIN..=fastcdc::v2020::MAXIMUM_MAX).contains(&self.cdc_max)
            && self.cdc_min <= self.cdc_avg
            && self.cdc_avg <= self.cdc_max;
        if !in_range {
            return Err(format!(
                "content-defined chunk sizes min {} avg {} max {} are out of range",
                self.cdc_min, self.cdc_avg, self.cdc_max
            ));
        }
        Ok(())
    }
}

/// Yields the content-defined chunks of a reader.
pub struct Chunker<R: Read>(fastcdc::v2020::StreamCDC<R>);

impl<R: Read> Chunker<R> {
    pub fn content_defined(reader: R, params: &ChunkerParams) -> Self {
        Chunker(fastcdc::v2020::StreamCDC::new(
            reader,
            params.cdc_min,
            params.cdc_avg,
            params.cdc_max,
        ))
    }
}

impl<R: Read> Iterator for Chunker<R> {
    type Item = io::Result<Vec<u8>>;

    fn next(&mut self) -> Option<io::Result<Vec<u8>>> {
        self.0.next().map(|res| match res {
            Ok(chunk) => Ok(chunk.data),
            Err(fastcdc::v2020::Error::IoError(e)) => Err(e),
            Err(e) => Err(io::Error::other(e.to_string())),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect<R: Read>(c: Chunker<R>) -> Vec<Vec<u8>> {
        c.map(|r| r.expect("chunk")).collect()
    }

    #[test]
    fn cdc_resynchronises_after_an_insertion() {
        let params = ChunkerParams {
            cdc_min: 4096,
            cdc_avg: 16384,
            cdc_max: 65536,
            ..Default::default()
        };
        let mut data = vec![0u8; 1 << 20];
        crate::crypto::fill_random(&mut data);
        let before = collect(Chunker::content_defined(&data[..], &params));
        let mut shifted = b"inserted bytes".to_vec();
        shifted.extend_from_slice(&data);
        let after = collect(Chunker::content_defined(&shifted[..], &params));
        assert_eq!(after.concat(), shifted);
        let same = after.iter().filter(|c| before.contains(c)).count();
        assert!(
            same + 2 >= before.len(),
            "only {same} of {} chunks shared",
            before.len()
        );
        assert!(params.validate().is_ok());
        assert!(ChunkerParams {
            fixed_size: 1000,
            ..params
        }
        .validate()
        .is_err());
    }
}
