//! Data pages: the page checksum (`storage/checksum_impl.h`), the page LSN, and which
//! block of a relation a file offset is.
//!
//! The checksum is FNV-1a-like over the page viewed as 32 interleaved lanes of u32
//! words, with pd_checksum counted as zero, then mixed with the block number and reduced
//! to 1..=65535. Pages are read in the server's byte order: little-endian here, as on
//! every platform pgvault is built for.

use crate::bytes::{u16_at, u32_at};
use crate::wal::Lsn;

pub const PAGE_SIZE: usize = 8192;
/// Blocks per relation segment file (1 GiB / 8 KiB), PostgreSQL's default RELSEG_SIZE.
pub const BLOCKS_PER_SEGMENT: u64 = 131_072;

const N_SUMS: usize = 32;
const FNV_PRIME: u32 = 16_777_619;
const CHECKSUM_BASE_OFFSETS: [u32; N_SUMS] = [
    0x5B1F36E9, 0xB8525960, 0x02AB50AA, 0x1DE66D2A, 0x79FF467A, 0x9BB9F8A3, 0x217E7CD2, 0x83E13D2C,
    0xF8D4474F, 0xE39EB970, 0x42C6AE16, 0x993216FA, 0x7B093B5D, 0x98DAFF3C, 0xF718902A, 0x0B1C9CDB,
    0xE58F764B, 0x187636BC, 0x5D7B3BB1, 0xE73DE7DE, 0x92BEC979, 0xCCA6C0B2, 0x304A0979, 0x85AA43D4,
    0x783125BB, 0x6CA8EAA2, 0xE407EAC6, 0x4B5CFC3E, 0x9FBF8C76, 0x15CA20BE, 0xF2CA9FD3, 0x959BD756,
];
/// Byte offset of pd_checksum in the page header.
const CHECKSUM_OFFSET: usize = 8;

fn mix(sum: u32, value: u32) -> u32 {
    let tmp = sum ^ value;
    tmp.wrapping_mul(FNV_PRIME) ^ (tmp >> 17)
}

/// The checksum PostgreSQL stores in pd_checksum for `page` at block number `block`.
pub fn checksum(page: &[u8; PAGE_SIZE], block: u32) -> u16 {
    let mut sums = CHECKSUM_BASE_OFFSETS;
    for (row, words) in page.chunks_exact(4 * N_SUMS).enumerate() {
        for (lane, word) in words.chunks_exact(4).enumerate() {
            let mut value = u32::from_le_bytes([word[0], word[1], word[2], word[3]]);
            // pd_checksum (bytes 8..10) counts as zero: it is the low half of word 2.
            if row == 0 && lane == CHECKSUM_OFFSET / 4 {
                value &= 0xFFFF_0000;
            }
            sums[lane] = mix(sums[lane], value);
        }
    }
    for _ in 0..2 {
        for sum in sums.iter_mut() {
            *sum = mix(*sum, 0);
        }
    }
    let folded = sums.iter().fold(0u32, |acc, s| acc ^ s) ^ block;
    ((folded % 65_535) + 1) as u16
}

/// What a page header says, as far as verification needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageHeader {
    pub lsn: Lsn,
    pub checksum: u16,
    pub upper: u16,
}

impl PageHeader {
    pub fn read(page: &[u8; PAGE_SIZE]) -> PageHeader {
        // pd_lsn is stored as two u32 halves: xlogid (high) then xrecoff (low).
        let high = u32_at(page, 0);
        let low = u32_at(page, 4);
        PageHeader {
            lsn: Lsn((u64::from(high) << 32) | u64::from(low)),
            checksum: u16_at(page, CHECKSUM_OFFSET),
            upper: u16_at(page, 14),
        }
    }
}

/// The verdict on one page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageCheck {
    Valid,
    /// Never initialised (all zeros): no checksum to check.
    New,
    /// Changed after the backup started; WAL replay rewrites it, so it is not judged.
    NewerThanBackup,
    /// The stored checksum does not match.
    Mismatch {
        stored: u16,
        computed: u16,
    },
}

/// Checks one page of a relation, as the server would on read, except that pages
/// written after `backup_start` are not judged (they may be torn while being written).
pub fn check_page(page: &[u8; PAGE_SIZE], block: u32, backup_start: Lsn) -> PageCheck {
    let header = PageHeader::read(page);
    if header.upper == 0 && page.iter().all(|b| *b == 0) {
        return PageCheck::New;
    }
    if header.lsn >= backup_start {
        return PageCheck::NewerThanBackup;
    }
    let computed = checksum(page, block);
    if computed == header.checksum {
        PageCheck::Valid
    } else {
        PageCheck::Mismatch {
            stored: header.checksum,
            computed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page_with(fill: impl Fn(usize) -> u8) -> [u8; PAGE_SIZE] {
        let mut page = [0u8; PAGE_SIZE];
        for (i, b) in page.iter_mut().enumerate() {
            *b = fill(i);
        }
        page
    }

    #[test]
    fn checksum_ignores_its_own_field_and_depends_on_the_block() {
        let mut page = page_with(|i| (i * 31 % 251) as u8);
        let sum = checksum(&page, 7);
        page[CHECKSUM_OFFSET] ^= 0xFF;
        page[CHECKSUM_OFFSET + 1] ^= 0x0F;
        assert_eq!(checksum(&page, 7), sum);
        assert_ne!(checksum(&page, 8), sum);
        page[100] ^= 1;
        assert_ne!(checksum(&page, 7), sum);
        assert_ne!(sum, 0);
    }

    #[test]
    fn pages_are_judged_like_the_server() {
        let zero = [0u8; PAGE_SIZE];
        assert_eq!(check_page(&zero, 0, Lsn(1)), PageCheck::New);
        let mut page = page_with(|i| (i % 7) as u8);
        // LSN 0/100, upper non-zero.
        page[0..8].copy_from_slice(&[0, 0, 0, 0, 0x00, 0x01, 0, 0]);
        let sum = checksum(&page, 3);
        page[8..10].copy_from_slice(&sum.to_le_bytes());
        assert_eq!(check_page(&page, 3, Lsn(0x1000)), PageCheck::Valid);
        assert_eq!(check_page(&page, 3, Lsn(0x50)), PageCheck::NewerThanBackup);
        assert!(matches!(
            check_page(&page, 4, Lsn(0x1000)),
            PageCheck::Mismatch { .. }
        ));
    }
}
