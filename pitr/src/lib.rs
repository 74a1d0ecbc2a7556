//! PostgreSQL recovery knowledge, as pure functions: no I/O, no clock.
//!
//! - [`Lsn`]: a WAL position, written `16/B374D848` as PostgreSQL does.
//! - [`WalFile`]: what an archived file's name says — a segment, a `.partial` segment, a
//!   timeline `.history` file or a `.backup` history file — and its timeline.
//! - [`SegmentNo`]: segment arithmetic for a given segment size, so that the segment holding an
//!   LSN, and the names of the segments after it, can be computed.
//!
//! - [`history::TimelinePath`]: a timeline history file, as the spans recovery follows.
//! - [`target`]: recovery targets as operators write them, and the settings PostgreSQL needs.
//! - [`plan::plan`]: which base backup a target needs, and whether the archived WAL reaches it.

use std::fmt;
use std::str::FromStr;

pub mod history;
pub mod plan;
pub mod target;

pub use history::{TimelinePath, TimelineSpan};
pub use plan::{Archive, BaseBackup, PlanError, RestorePlan};
pub use target::{RecoveryTarget, TargetAction, TargetTimeline};

/// PostgreSQL's default WAL segment size (`--wal-segsize` can change it per cluster).
pub const DEFAULT_SEGMENT_SIZE: u64 = 16 * 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PitrError {
    #[error("'{0}' is not a WAL file name (segment, .partial, .history or .backup)")]
    NotWalName(String),
    #[error("'{0}' is not an LSN (expected e.g. 16/B374D848)")]
    NotLsn(String),
    #[error("WAL segment size {0} is not a power of two between 1 MiB and 1 GiB")]
    BadSegmentSize(u64),
    #[error("history file of timeline {0} has a line PostgreSQL would not write: '{1}'")]
    BadHistory(u32, String),
    #[error(
        "'{0}' has no time zone; write it with one, e.g. '{0}+09' or '{0}Z' (UTC), \
         so that the restore does not guess"
    )]
    TimeWithoutZone(String),
    #[error("'{0}' is not a time (expected e.g. '2024-01-15 10:30:00+09' or RFC 3339)")]
    NotTime(String),
}

/// A write-ahead log position.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

impl FromStr for Lsn {
    type Err = PitrError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || PitrError::NotLsn(s.to_string());
        let (high, low) = s.split_once('/').ok_or_else(bad)?;
        if high.is_empty() || low.is_empty() || high.len() > 8 || low.len() > 8 {
            return Err(bad());
        }
        let high = u64::from_str_radix(high, 16).map_err(|_| bad())?;
        let low = u64::from_str_radix(low, 16).map_err(|_| bad())?;
        Ok(Lsn((high << 32) | low))
    }
}

/// A segment number: the LSN divided by the segment size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SegmentNo(pub u64);

/// Checks a segment size the way initdb does.
pub fn check_segment_size(size: u64) -> Result<u64, PitrError> {
    if size.is_power_of_two() && (1 << 20..=1 << 30).contains(&size) {
        Ok(size)
    } else {
        Err(PitrError::BadSegmentSize(size))
    }
}

impl SegmentNo {
    /// The segment that holds `lsn`.
    pub fn of(lsn: Lsn, segment_size: u64) -> Self {
        SegmentNo(lsn.0 / segment_size)
    }

    pub fn next(self) -> Self {
        SegmentNo(self.0 + 1)
    }

    /// The first LSN of this segment.
    pub fn start(self, segment_size: u64) -> Lsn {
        Lsn(self.0 * segment_size)
    }

    /// The file name of this segment on `timeline`, e.g. `000000010000000000000003`.
    pub fn file_name(self, timeline: u32, segment_size: u64) -> String {
        let per_id = segments_per_xlog_id(segment_size);
        format!(
            "{timeline:08X}{:08X}{:08X}",
            self.0 / per_id,
            self.0 % per_id
        )
    }
}

/// How many segments share the middle 8 hex digits of a name (the "xlog id").
fn segments_per_xlog_id(segment_size: u64) -> u64 {
    0x1_0000_0000 / segment_size
}

/// An archived WAL file, as its name describes it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum WalFile {
    /// A complete segment: `TTTTTTTTXXXXXXXXYYYYYYYY`.
    Segment { timeline: u32, log: u32, seg: u32 },
    /// The last, incomplete segment of a timeline that ended in a promotion: `….partial`.
    Partial { timeline: u32, log: u32, seg: u32 },
    /// A timeline history file: `TTTTTTTT.history`.
    History { timeline: u32 },
    /// A backup history file: `TTTTTTTTXXXXXXXXYYYYYYYY.OOOOOOOO.backup`.
    BackupHistory {
        timeline: u32,
        log: u32,
        seg: u32,
        offset: u32,
    },
}

fn hex8(text: &str) -> Option<u32> {
    // PostgreSQL writes upper-case hex; anything else is not one of its names.
    let upper_hex = |b: u8| b.is_ascii_digit() || (b'A'..=b'F').contains(&b);
    (text.len() == 8 && text.bytes().all(upper_hex))
        .then(|| u32::from_str_radix(text, 16).ok())
        .flatten()
}

fn segment_parts(text: &str) -> Option<(u32, u32, u32)> {
    // ASCII first: byte offsets 8 and 16 of any other 24-byte string may fall inside a
    // character, and slicing there would panic (a key from the store is outside input).
    if text.len() != 24 || !text.is_ascii() {
        return None;
    }
    Some((
        hex8(&text[0..8])?,
        hex8(&text[8..16])?,
        hex8(&text[16..24])?,
    ))
}

impl WalFile {
    /// Parses a file name (no directory).
    pub fn parse(name: &str) -> Result<Self, PitrError> {
        let bad = || PitrError::NotWalName(name.to_string());
        if let Some(timeline) = name.strip_suffix(".history") {
            return Ok(WalFile::History {
                timeline: hex8(timeline).ok_or_else(bad)?,
            });
        }
        if let Some(segment) = name.strip_suffix(".partial") {
            let (timeline, log, seg) = segment_parts(segment).ok_or_else(bad)?;
            return Ok(WalFile::Partial { timeline, log, seg });
        }
        if let Some(rest) = name.strip_suffix(".backup") {
            let (segment, offset) = rest.split_once('.').ok_or_else(bad)?;
            let (timeline, log, seg) = segment_parts(segment).ok_or_else(bad)?;
            return Ok(WalFile::BackupHistory {
                timeline,
                log,
                seg,
                offset: hex8(offset).ok_or_else(bad)?,
            });
        }
        let (timeline, log, seg) = segment_parts(name).ok_or_else(bad)?;
        Ok(WalFile::Segment { timeline, log, seg })
    }

    pub fn timeline(&self) -> u32 {
        match *self {
            WalFile::Segment { timeline, .. }
            | WalFile::Partial { timeline, .. }
            | WalFile::History { timeline }
            | WalFile::BackupHistory { timeline, .. } => timeline,
        }
    }

    /// Where a segment-like file sits in the WAL, as `(xlog id, segment)`: comparable across
    /// timelines and without knowing the segment size. `None` for a timeline history file.
    pub fn position(&self) -> Option<(u32, u32)> {
        match *self {
            WalFile::Segment { log, seg, .. }
            | WalFile::Partial { log, seg, .. }
            | WalFile::BackupHistory { log, seg, .. } => Some((log, seg)),
            WalFile::History { .. } => None,
        }
    }

    /// The segment number of a segment-like file, for a given segment size.
    pub fn segment_no(&self, segment_size: u64) -> Option<SegmentNo> {
        match *self {
            WalFile::Segment { log, seg, .. }
            | WalFile::Partial { log, seg, .. }
            | WalFile::BackupHistory { log, seg, .. } => Some(SegmentNo(
                u64::from(log) * segments_per_xlog_id(segment_size) + u64::from(seg),
            )),
            WalFile::History { .. } => None,
        }
    }

    /// The name PostgreSQL gives this file.
    pub fn name(&self) -> String {
        match *self {
            WalFile::Segment { timeline, log, seg } => format!("{timeline:08X}{log:08X}{seg:08X}"),
            WalFile::Partial { timeline, log, seg } => {
                format!("{timeline:08X}{log:08X}{seg:08X}.partial")
            }
            WalFile::History { timeline } => format!("{timeline:08X}.history"),
            WalFile::BackupHistory {
                timeline,
                log,
                seg,
                offset,
            } => format!("{timeline:08X}{log:08X}{seg:08X}.{offset:08X}.backup"),
        }
    }

    /// Sixteen hex digits that group segments into directories of at most 256 (16 MiB
    /// segments) files: timeline and xlog id. History files have none.
    pub fn directory(&self) -> Option<String> {
        match *self {
            WalFile::Segment { timeline, log, .. }
            | WalFile::Partial { timeline, log, .. }
            | WalFile::BackupHistory { timeline, log, .. } => {
                Some(format!("{timeline:08X}{log:08X}"))
            }
            WalFile::History { .. } => None,
        }
    }
}

impl fmt::Display for WalFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsns_parse_and_print_like_postgresql() {
        let lsn: Lsn = "16/B374D848".parse().unwrap();
        assert_eq!(lsn.0, 0x16_B374_D848);
        assert_eq!(lsn.to_string(), "16/B374D848");
        assert_eq!("0/0".parse::<Lsn>().unwrap(), Lsn(0));
        for bad in ["", "16", "/1", "1/", "G/0", "123456789/0", "0/123456789"] {
            assert!(bad.parse::<Lsn>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn segment_names_follow_the_lsn() {
        let size = DEFAULT_SEGMENT_SIZE;
        let lsn: Lsn = "16/B374D848".parse().unwrap();
        let segment = SegmentNo::of(lsn, size);
        assert_eq!(segment.file_name(1, size), "0000000100000016000000B3");
        assert_eq!(
            segment.next().file_name(1, size),
            "0000000100000016000000B4"
        );
        // The last segment of an xlog id rolls over into the next id.
        let last = SegmentNo::of("16/FFFFFFFF".parse().unwrap(), size);
        assert_eq!(last.next().file_name(2, size), "000000020000001700000000");
        // 64 MiB segments: 64 per xlog id.
        let big = 64 * 1024 * 1024;
        assert_eq!(
            SegmentNo::of(Lsn(0x1_0400_0000), big).file_name(1, big),
            "000000010000000100000001"
        );
        assert_eq!(segment.start(size), "16/B3000000".parse().unwrap());
    }

    #[test]
    fn every_kind_of_archived_name_round_trips() {
        for name in [
            "000000010000000000000003",
            "0000000200000016000000B3.partial",
            "00000002.history",
            "000000010000000000000002.00000028.backup",
        ] {
            let file = WalFile::parse(name).unwrap();
            assert_eq!(file.name(), name);
        }
        let file = WalFile::parse("0000000200000016000000B3").unwrap();
        assert_eq!(file.timeline(), 2);
        assert_eq!(file.directory().as_deref(), Some("0000000200000016"));
        assert_eq!(
            file.segment_no(DEFAULT_SEGMENT_SIZE),
            Some(SegmentNo::of(
                "16/B3000000".parse().unwrap(),
                DEFAULT_SEGMENT_SIZE
            ))
        );
        assert_eq!(
            WalFile::parse("00000002.history").unwrap().directory(),
            None
        );
    }

    #[test]
    fn anything_else_is_refused() {
        for name in [
            "",
            "RECOVERYXLOG",
            "00000001000000000000003",
            "0000000100000000000000030",
            "000000010000000000000003.ready",
            "0000000100000000000000ab",
            "../00000001.history",
            "000000010000000000000002.backup",
            "archive_status",
        ] {
            assert!(WalFile::parse(name).is_err(), "{name:?} parsed");
        }
    }

    #[test]
    fn segment_sizes_are_checked() {
        assert!(check_segment_size(DEFAULT_SEGMENT_SIZE).is_ok());
        assert!(check_segment_size(1 << 30).is_ok());
        assert!(check_segment_size(3 << 20).is_err());
        assert!(check_segment_size(1 << 19).is_err());
    }
}
