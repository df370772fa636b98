//! WAL file names, LSNs, timeline history files and segment headers.
//!
//! File names (see PostgreSQL's `xlog_internal.h`):
//! ```text
//! TTTTTTTTXXXXXXXXYYYYYYYY                    segment: timeline, log id, segment in log
//! TTTTTTTTXXXXXXXXYYYYYYYY.partial            last segment of a timeline, cut short at promotion
//! TTTTTTTTXXXXXXXXYYYYYYYY.OOOOOOOO.backup    backup history file (start segment and offset)
//! TTTTTTTT.history                            timeline history file
//! ```
//! Every WAL page starts with a header; the first page of a segment has the long form
//! that names the cluster (system identifier), the segment size and the page size. Those
//! are what archive-push checks before accepting a segment.

use std::fmt;

use crate::bytes::{u16_at, u32_at, u64_at};

/// Errors about WAL files. Messages name what is wrong, for one-line CLI errors.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WalError {
    #[error("{0:?} is not a WAL file name (segment, .partial, .backup or .history)")]
    BadName(String),
    #[error("{0:?} is not an LSN (expected two hex numbers like 0/16B3748)")]
    BadLsn(String),
    #[error("WAL segment size {0} is not a power of two between 1 MiB and 1 GiB")]
    BadSegmentSize(u64),
    #[error("{name} is {actual} bytes, but this cluster's WAL segments are {expected} bytes: the file is truncated or from another cluster")]
    WrongLength {
        name: String,
        actual: u64,
        expected: u64,
    },
    #[error("{name} has page magic {found:#06X}, which is {found_version}, not PostgreSQL {expected_major} (magic {expected:#06X}): the file is damaged or from another server version")]
    WrongMagic {
        name: String,
        found: u16,
        found_version: String,
        expected: u16,
        expected_major: u32,
    },
    #[error("{name} does not start with a long page header: the file is damaged")]
    NoLongHeader { name: String },
    #[error("{name} belongs to system identifier {found}, but this cluster is {expected}: it comes from another cluster")]
    WrongSystem {
        name: String,
        found: u64,
        expected: u64,
    },
    #[error("{name} says its segment size is {found} bytes, but this cluster's is {expected}")]
    WrongSegmentSize {
        name: String,
        found: u64,
        expected: u64,
    },
    #[error("{name} starts at WAL position {found}, but its name says {expected}: the file is damaged or misnamed")]
    WrongPosition {
        name: String,
        found: Lsn,
        expected: Lsn,
    },
    #[error("timeline history line {line}: {text:?} is not \"<timeline> <LSN> <reason>\"")]
    BadHistory { line: usize, text: String },
}

/// A WAL position (XLogRecPtr).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl Lsn {
    /// Parses PostgreSQL's `X/X` notation.
    pub fn parse(text: &str) -> Result<Lsn, WalError> {
        let bad = || WalError::BadLsn(text.to_string());
        let (high, low) = text.trim().split_once('/').ok_or_else(bad)?;
        if high.is_empty() || low.is_empty() || high.len() > 8 || low.len() > 8 {
            return Err(bad());
        }
        let high = u32::from_str_radix(high, 16).map_err(|_| bad())?;
        let low = u32::from_str_radix(low, 16).map_err(|_| bad())?;
        Ok(Lsn((u64::from(high) << 32) | u64::from(low)))
    }

    /// The number of the segment holding this position.
    pub fn segno(self, segment_size: u64) -> u64 {
        self.0 / segment_size
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

/// Checks a WAL segment size as initdb allows them: a power of two, 1 MiB to 1 GiB.
pub fn check_segment_size(size: u64) -> Result<u64, WalError> {
    if size.is_power_of_two() && (1 << 20..=1 << 30).contains(&size) {
        Ok(size)
    } else {
        Err(WalError::BadSegmentSize(size))
    }
}

fn segments_per_xlog_id(segment_size: u64) -> u64 {
    0x1_0000_0000 / segment_size
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Kind {
    Segment,
    Partial,
    /// Backup history file; the offset of the backup start within the segment.
    Backup(u32),
    History,
}

/// A file name PostgreSQL's archiver hands to `archive_command`. Orders by timeline,
/// then position, then kind, which is the order recovery needs them in.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WalFileName {
    timeline: u32,
    log: u32,
    seg: u32,
    kind: Kind,
}

fn parse_hex8(text: &str) -> Option<u32> {
    if text.len() == 8 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
        u32::from_str_radix(text, 16).ok()
    } else {
        None
    }
}

impl WalFileName {
    /// Parses any of the four file name forms (upper-case hex, as PostgreSQL writes them;
    /// lower case is accepted and normalised).
    pub fn parse(name: &str) -> Result<WalFileName, WalError> {
        let bad = || WalError::BadName(name.to_string());
        if let Some(tli) = name.strip_suffix(".history") {
            let timeline = parse_hex8(tli).ok_or_else(bad)?;
            return Ok(WalFileName {
                timeline,
                log: 0,
                seg: 0,
                kind: Kind::History,
            });
        }
        let (base, kind) = if let Some(base) = name.strip_suffix(".partial") {
            (base, Kind::Partial)
        } else if let Some(rest) = name.strip_suffix(".backup") {
            let (base, offset) = rest.split_once('.').ok_or_else(bad)?;
            (base, Kind::Backup(parse_hex8(offset).ok_or_else(bad)?))
        } else {
            (name, Kind::Segment)
        };
        if base.len() != 24 {
            return Err(bad());
        }
        let timeline = parse_hex8(&base[0..8]).ok_or_else(bad)?;
        let log = parse_hex8(&base[8..16]).ok_or_else(bad)?;
        let seg = parse_hex8(&base[16..24]).ok_or_else(bad)?;
        if timeline == 0 {
            return Err(bad());
        }
        Ok(WalFileName {
            timeline,
            log,
            seg,
            kind,
        })
    }

    /// The plain segment file name of segment `segno` on `timeline`.
    pub fn segment(timeline: u32, segno: u64, segment_size: u64) -> WalFileName {
        let per_id = segments_per_xlog_id(segment_size);
        WalFileName {
            timeline,
            log: (segno / per_id) as u32,
            seg: (segno % per_id) as u32,
            kind: Kind::Segment,
        }
    }

    /// The segment holding the WAL that ends at `end` (exclusive), as `pg_walfile_name`
    /// names it: for a position on a segment boundary, the segment before it.
    pub fn holding_end_of(end: Lsn, timeline: u32, segment_size: u64) -> WalFileName {
        WalFileName::segment(
            timeline,
            end.0.saturating_sub(1) / segment_size,
            segment_size,
        )
    }

    /// The timeline history file of `timeline`.
    pub fn history(timeline: u32) -> WalFileName {
        WalFileName {
            timeline,
            log: 0,
            seg: 0,
            kind: Kind::History,
        }
    }

    pub fn timeline(&self) -> u32 {
        self.timeline
    }

    /// A complete segment (not `.partial`, `.backup` or `.history`).
    pub fn is_segment(&self) -> bool {
        self.kind == Kind::Segment
    }

    pub fn is_history(&self) -> bool {
        self.kind == Kind::History
    }

    pub fn is_partial(&self) -> bool {
        self.kind == Kind::Partial
    }

    pub fn is_backup_history(&self) -> bool {
        matches!(self.kind, Kind::Backup(_))
    }

    /// Segments and `.partial` files are raw WAL and start with a long page header.
    pub fn has_segment_header(&self) -> bool {
        matches!(self.kind, Kind::Segment | Kind::Partial)
    }

    /// The segment number this file is about; `None` for history files.
    pub fn segno(&self, segment_size: u64) -> Option<u64> {
        if self.kind == Kind::History {
            return None;
        }
        Some(u64::from(self.log) * segments_per_xlog_id(segment_size) + u64::from(self.seg))
    }

    /// The WAL position where this file's segment starts; `None` for history files.
    pub fn start_lsn(&self, segment_size: u64) -> Option<Lsn> {
        self.segno(segment_size).map(|s| Lsn(s * segment_size))
    }

    /// The segment after this one on the same timeline; `None` for history files and
    /// at the end of the WAL address space.
    pub fn next_segment(&self, segment_size: u64) -> Option<WalFileName> {
        let next = self.segno(segment_size)?.checked_add(1)?;
        next.checked_mul(segment_size)?;
        Some(WalFileName::segment(self.timeline, next, segment_size))
    }
}

impl fmt::Display for WalFileName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.kind == Kind::History {
            return write!(f, "{:08X}.history", self.timeline);
        }
        write!(f, "{:08X}{:08X}{:08X}", self.timeline, self.log, self.seg)?;
        match self.kind {
            Kind::Segment | Kind::History => Ok(()),
            Kind::Partial => f.write_str(".partial"),
            Kind::Backup(offset) => write!(f, ".{offset:08X}.backup"),
        }
    }
}

/// WAL page magic (XLOG_PAGE_MAGIC) per server major version. It changes whenever the
/// WAL format does, so a segment from another major version is recognisable.
const PAGE_MAGIC: &[(u32, u16)] = &[
    (12, 0xD101),
    (13, 0xD106),
    (14, 0xD10D),
    (15, 0xD110),
    (16, 0xD113),
    (17, 0xD116),
    (18, 0xD118),
];

/// The page magic a server of `major` writes; `None` for versions pgvault does not know.
pub fn page_magic(major: u32) -> Option<u16> {
    PAGE_MAGIC
        .iter()
        .find(|(m, _)| *m == major)
        .map(|(_, magic)| *magic)
}

/// The server major version that writes `magic`.
pub fn major_for_magic(magic: u16) -> Option<u32> {
    PAGE_MAGIC
        .iter()
        .find(|(_, m)| *m == magic)
        .map(|(major, _)| *major)
}

/// XLP_LONG_HEADER in xlp_info: this page header carries the long fields.
pub(crate) const XLP_LONG_HEADER: u16 = 0x0002;
/// sizeof(XLogLongPageHeaderData): short header (20 bytes, padded to 24) + sysid, seg size, page size.
pub(crate) const LONG_HEADER_LEN: usize = 40;
/// Bytes of a segment [`validate_segment`] looks at.
pub const SEGMENT_HEAD_LEN: usize = LONG_HEADER_LEN;

/// The long header at the start of a segment. WAL is written in the server's byte
/// order; pgvault runs on the database host, so that is ours (little-endian on x86-64
/// and ARM64, the platforms pgvault is built for).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    pub magic: u16,
    pub info: u16,
    pub timeline: u32,
    pub page_address: Lsn,
    pub system_identifier: u64,
    pub segment_size: u32,
    pub page_size: u32,
}

impl SegmentHeader {
    /// Reads the header; `None` when `data` is too short to hold one.
    pub fn read(data: &[u8]) -> Option<SegmentHeader> {
        if data.len() < LONG_HEADER_LEN {
            return None;
        }
        Some(SegmentHeader {
            magic: u16_at(data, 0),
            info: u16_at(data, 2),
            timeline: u32_at(data, 4),
            page_address: Lsn(u64_at(data, 8)),
            system_identifier: u64_at(data, 24),
            segment_size: u32_at(data, 32),
            page_size: u32_at(data, 36),
        })
    }

    pub fn is_long(&self) -> bool {
        self.info & XLP_LONG_HEADER != 0
    }
}

/// What a segment of a registered cluster must look like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentExpectation {
    pub system_identifier: u64,
    pub segment_size: u64,
    pub server_major: u32,
}

/// Checks that a file of `file_len` bytes starting with `head` (at least its first
/// [`SEGMENT_HEAD_LEN`] bytes), archived as `name`, is a whole segment of the expected
/// cluster: length, page magic, long header, system identifier, segment size and start
/// position.
/// The timeline in the header is not checked: after a promotion the first segment of the
/// new timeline legitimately starts with pages written on the old one.
pub fn validate_segment(
    head: &[u8],
    file_len: u64,
    expected: &SegmentExpectation,
    name: &WalFileName,
) -> Result<SegmentHeader, WalError> {
    let name_text = name.to_string();
    if file_len != expected.segment_size {
        return Err(WalError::WrongLength {
            name: name_text,
            actual: file_len,
            expected: expected.segment_size,
        });
    }
    let header = SegmentHeader::read(head).ok_or_else(|| WalError::NoLongHeader {
        name: name_text.clone(),
    })?;
    if let Some(magic) = page_magic(expected.server_major) {
        if header.magic != magic {
            return Err(WalError::WrongMagic {
                name: name_text,
                found: header.magic,
                found_version: match major_for_magic(header.magic) {
                    Some(major) => format!("PostgreSQL {major}"),
                    None => "no known PostgreSQL version".to_string(),
                },
                expected: magic,
                expected_major: expected.server_major,
            });
        }
    }
    if !header.is_long() {
        return Err(WalError::NoLongHeader { name: name_text });
    }
    if header.system_identifier != expected.system_identifier {
        return Err(WalError::WrongSystem {
            name: name_text,
            found: header.system_identifier,
            expected: expected.system_identifier,
        });
    }
    if u64::from(header.segment_size) != expected.segment_size {
        return Err(WalError::WrongSegmentSize {
            name: name_text,
            found: u64::from(header.segment_size),
            expected: expected.segment_size,
        });
    }
    if let Some(start) = name.start_lsn(expected.segment_size) {
        if header.page_address != start {
            return Err(WalError::WrongPosition {
                name: name_text,
                found: header.page_address,
                expected: start,
            });
        }
    }
    Ok(header)
}

/// One line of a timeline history file: timeline `parent` ended at `switch_point`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimelineSwitch {
    pub parent: u32,
    pub switch_point: Lsn,
    pub reason: String,
}

/// Parses a `.history` file: the ancestors of its timeline, oldest first.
pub fn parse_history(text: &str) -> Result<Vec<TimelineSwitch>, WalError> {
    let mut out = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let bad = || WalError::BadHistory {
            line: index + 1,
            text: line.to_string(),
        };
        let mut fields = trimmed.splitn(3, char::is_whitespace);
        let parent = fields
            .next()
            .and_then(|t| t.parse::<u32>().ok())
            .ok_or_else(bad)?;
        let switch_point = fields
            .next()
            .and_then(|t| Lsn::parse(t).ok())
            .ok_or_else(bad)?;
        let reason = fields.next().unwrap_or("").trim().to_string();
        out.push(TimelineSwitch {
            parent,
            switch_point,
            reason,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEG: u64 = 16 << 20;

    #[test]
    fn file_names_round_trip() {
        for name in [
            "000000010000000000000001",
            "0000000200000003000000FF",
            "00000001000000000000000A.partial",
            "000000010000000000000002.00000028.backup",
            "0000000A.history",
        ] {
            assert_eq!(WalFileName::parse(name).expect(name).to_string(), name);
        }
        assert_eq!(
            WalFileName::parse("00000001000000000000000a")
                .expect("lower case")
                .to_string(),
            "00000001000000000000000A"
        );
        for bad in [
            "",
            "00000001",
            "0000000100000000000000011",
            "00000000000000000000000A",
            "00000001000000000000000G",
            "000000010000000000000001.backup",
            "00000001.history.x",
            "archive_status",
        ] {
            assert!(WalFileName::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn segment_numbers_follow_the_segment_size() {
        let name = WalFileName::parse("0000000100000001000000FF").expect("name");
        assert_eq!(name.segno(SEG), Some(256 + 255));
        assert_eq!(
            name.next_segment(SEG).expect("next").to_string(),
            "000000010000000200000000"
        );
        // 64 MiB segments: 64 per log id.
        let big = 64 << 20;
        let name = WalFileName::parse("00000001000000010000003F").expect("name");
        assert_eq!(
            name.next_segment(big).expect("next").to_string(),
            "000000010000000200000000"
        );
        assert_eq!(
            WalFileName::segment(3, 64 + 2, big).to_string(),
            "000000030000000100000002"
        );
        assert!(WalFileName::history(2).next_segment(SEG).is_none());
        assert_eq!(
            WalFileName::holding_end_of(Lsn(3 * SEG), 1, SEG).to_string(),
            "000000010000000000000002"
        );
        assert_eq!(
            WalFileName::holding_end_of(Lsn(3 * SEG + 1), 1, SEG).to_string(),
            "000000010000000000000003"
        );
        assert_eq!(
            name.start_lsn(big),
            Some(Lsn::parse("1/FC000000").expect("lsn"))
        );
    }

    #[test]
    fn order_is_timeline_then_position() {
        let mut names: Vec<_> = [
            "000000020000000000000001",
            "000000010000000000000003",
            "00000002.history",
            "000000010000000000000002",
        ]
        .iter()
        .map(|n| WalFileName::parse(n).expect("name"))
        .collect();
        names.sort();
        let texts: Vec<String> = names.iter().map(ToString::to_string).collect();
        assert_eq!(
            texts,
            [
                "000000010000000000000002",
                "000000010000000000000003",
                "00000002.history",
                "000000020000000000000001"
            ]
        );
    }

    #[test]
    fn lsns_parse_and_print_like_postgres() {
        let lsn = Lsn::parse("16/B374D848").expect("lsn");
        assert_eq!(lsn.0, 0x16_B374_D848);
        assert_eq!(lsn.to_string(), "16/B374D848");
        assert_eq!(Lsn(0).to_string(), "0/0");
        for bad in ["", "16", "/1", "1/", "x/1", "1/123456789"] {
            assert!(Lsn::parse(bad).is_err(), "{bad}");
        }
    }

    fn segment(sysid: u64, start: u64, magic: u16) -> Vec<u8> {
        let mut data = vec![0u8; SEG as usize];
        data[0..2].copy_from_slice(&magic.to_le_bytes());
        data[2..4].copy_from_slice(&(XLP_LONG_HEADER | 0x0004).to_le_bytes());
        data[4..8].copy_from_slice(&1u32.to_le_bytes());
        data[8..16].copy_from_slice(&start.to_le_bytes());
        data[24..32].copy_from_slice(&sysid.to_le_bytes());
        data[32..36].copy_from_slice(&(SEG as u32).to_le_bytes());
        data[36..40].copy_from_slice(&8192u32.to_le_bytes());
        data
    }

    #[test]
    fn segments_are_validated_against_the_cluster() {
        let expected = SegmentExpectation {
            system_identifier: 7_300_000_000_000_000_001,
            segment_size: SEG,
            server_major: 15,
        };
        let name = WalFileName::parse("000000010000000000000003").expect("name");
        let good = segment(expected.system_identifier, 3 * SEG, 0xD110);
        let header = validate_segment(&good, good.len() as u64, &expected, &name).expect("valid");
        assert_eq!(header.page_size, 8192);

        let err = validate_segment(&good[..1000], 1000, &expected, &name).expect_err("short");
        assert!(matches!(err, WalError::WrongLength { actual: 1000, .. }));
        let other = segment(42, 3 * SEG, 0xD110);
        assert!(matches!(
            validate_segment(&other, other.len() as u64, &expected, &name),
            Err(WalError::WrongSystem { found: 42, .. })
        ));
        let pg16 = segment(expected.system_identifier, 3 * SEG, 0xD113);
        let err = validate_segment(&pg16, pg16.len() as u64, &expected, &name).expect_err("magic");
        assert!(err.to_string().contains("PostgreSQL 16"), "{err}");
        let moved = segment(expected.system_identifier, 4 * SEG, 0xD110);
        assert!(matches!(
            validate_segment(&moved, moved.len() as u64, &expected, &name),
            Err(WalError::WrongPosition { .. })
        ));
        let mut short_header = good.clone();
        short_header[2] = 0;
        assert!(matches!(
            validate_segment(&short_header, short_header.len() as u64, &expected, &name),
            Err(WalError::NoLongHeader { .. })
        ));
    }

    #[test]
    fn history_files_parse() {
        let text =
            "1\t0/3000000\tno recovery target specified\n\n2\t1/A0000028\tat restore point \"x\"\n";
        let switches = parse_history(text).expect("history");
        assert_eq!(switches.len(), 2);
        assert_eq!(switches[1].parent, 2);
        assert_eq!(switches[1].switch_point, Lsn(0x1_A000_0028));
        assert_eq!(switches[1].reason, "at restore point \"x\"");
        assert!(parse_history("one 0/0 x").is_err());
    }

    #[test]
    fn segment_sizes_are_checked() {
        assert!(check_segment_size(16 << 20).is_ok());
        assert!(check_segment_size(3 << 20).is_err());
        assert!(check_segment_size(2 << 30).is_err());
    }
}
