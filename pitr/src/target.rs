//! Recovery targets as the operator gives them, and the settings PostgreSQL needs for them.

use std::fmt;

use chrono::{DateTime, FixedOffset, Utc};

use crate::{Lsn, PitrError};

/// Where recovery stops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecoveryTarget {
    /// The end of the archive, on the newest timeline.
    Latest,
    Time(DateTime<Utc>),
    Lsn(Lsn),
    Xid(u64),
    /// A restore point made with `pg_create_restore_point`.
    Name(String),
}

/// Which timeline recovery follows: PostgreSQL's `recovery_target_timeline`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TargetTimeline {
    /// The newest one the archive's history files lead to.
    #[default]
    Latest,
    /// The base backup's own.
    Current,
    Exact(u32),
}

impl fmt::Display for TargetTimeline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TargetTimeline::Latest => f.write_str("latest"),
            TargetTimeline::Current => f.write_str("current"),
            TargetTimeline::Exact(timeline) => write!(f, "{timeline}"),
        }
    }
}

impl std::str::FromStr for TargetTimeline {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.trim() {
            "latest" => Ok(TargetTimeline::Latest),
            "current" => Ok(TargetTimeline::Current),
            number => match number.parse::<u32>() {
                Ok(timeline) if timeline >= 1 => Ok(TargetTimeline::Exact(timeline)),
                _ => Err(format!(
                    "'{text}' is not a timeline: a number from 1, current or latest"
                )),
            },
        }
    }
}

/// What the server does once the target is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TargetAction {
    #[default]
    Promote,
    Pause,
    Shutdown,
}

impl TargetAction {
    pub fn as_str(self) -> &'static str {
        match self {
            TargetAction::Promote => "promote",
            TargetAction::Pause => "pause",
            TargetAction::Shutdown => "shutdown",
        }
    }
}

impl fmt::Display for RecoveryTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RecoveryTarget::Latest => f.write_str("the end of the archive"),
            RecoveryTarget::Time(time) => write!(f, "time {}", postgres_time(*time)),
            RecoveryTarget::Lsn(lsn) => write!(f, "LSN {lsn}"),
            RecoveryTarget::Xid(xid) => write!(f, "transaction {xid}"),
            RecoveryTarget::Name(name) => write!(f, "restore point '{name}'"),
        }
    }
}

/// Parses a time target. The zone is required: a restore is the wrong moment to guess whether
/// "10:30" meant UTC, the server's zone or the operator's.
pub fn parse_time(text: &str) -> Result<DateTime<Utc>, PitrError> {
    let trimmed = text.trim();
    let with_t = trimmed.replacen(' ', "T", 1);
    let candidates = [
        trimmed.to_string(),
        with_t.clone(),
        expand_short_offset(&with_t),
    ];
    for candidate in &candidates {
        if let Ok(time) = DateTime::parse_from_rfc3339(candidate) {
            return Ok(time.with_timezone(&Utc));
        }
        for format in ["%Y-%m-%dT%H:%M:%S%.f%:z", "%Y-%m-%dT%H:%M:%S%.f%z"] {
            if let Ok(time) = DateTime::<FixedOffset>::parse_from_str(candidate, format) {
                return Ok(time.with_timezone(&Utc));
            }
        }
    }
    let naive = ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%dT%H:%M"]
        .iter()
        .any(|format| chrono::NaiveDateTime::parse_from_str(&with_t, format).is_ok());
    Err(if naive {
        PitrError::TimeWithoutZone(trimmed.to_string())
    } else {
        PitrError::NotTime(trimmed.to_string())
    })
}

/// `+09` → `+09:00`, the short offset PostgreSQL prints and chrono does not read.
fn expand_short_offset(text: &str) -> String {
    let bytes = text.as_bytes();
    let n = bytes.len();
    if n > 3
        && (bytes[n - 3] == b'+' || bytes[n - 3] == b'-')
        && text[n - 2..].bytes().all(|b| b.is_ascii_digit())
    {
        format!("{text}:00")
    } else {
        text.to_string()
    }
}

/// A time as PostgreSQL reads it back without ambiguity, in UTC to the microsecond.
pub fn postgres_time(time: DateTime<Utc>) -> String {
    time.format("%Y-%m-%d %H:%M:%S%.6f+00").to_string()
}

/// The `recovery_target*` lines for `postgresql.auto.conf`.
pub fn recovery_settings(
    target: &RecoveryTarget,
    action: TargetAction,
    timeline: TargetTimeline,
) -> Vec<(String, String)> {
    let setting = match target {
        RecoveryTarget::Latest => None,
        RecoveryTarget::Time(time) => Some(("recovery_target_time", postgres_time(*time))),
        RecoveryTarget::Lsn(lsn) => Some(("recovery_target_lsn", lsn.to_string())),
        RecoveryTarget::Xid(xid) => Some(("recovery_target_xid", xid.to_string())),
        RecoveryTarget::Name(name) => Some(("recovery_target_name", name.clone())),
    };
    let mut settings = vec![("recovery_target_timeline".to_string(), timeline.to_string())];
    if let Some((name, value)) = setting {
        settings.push((name.to_string(), value));
        settings.push((
            "recovery_target_action".to_string(),
            action.as_str().to_string(),
        ));
    }
    settings
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_with_a_zone_are_instants() {
        let expected = DateTime::parse_from_rfc3339("2024-01-15T01:30:00Z")
            .unwrap()
            .with_timezone(&Utc);
        for text in [
            "2024-01-15 10:30:00+09",
            "2024-01-15 10:30:00+09:00",
            "2024-01-15T10:30:00+09:00",
            "2024-01-15T01:30:00Z",
            "2024-01-15 01:30:00.000+00",
            "2024-01-14 20:30:00-0500",
        ] {
            assert_eq!(parse_time(text).unwrap(), expected, "{text}");
        }
        let fraction = parse_time("2024-01-15 10:30:00.25+09").unwrap();
        assert_eq!(fraction.timestamp_subsec_millis(), 250);
    }

    #[test]
    fn a_time_without_a_zone_is_refused_with_a_hint() {
        assert_eq!(
            parse_time("2024-01-15 10:30:00"),
            Err(PitrError::TimeWithoutZone("2024-01-15 10:30:00".into()))
        );
        assert!(
            PitrError::TimeWithoutZone(String::new())
                .to_string()
                .contains("+09")
        );
        assert_eq!(
            parse_time("yesterday"),
            Err(PitrError::NotTime("yesterday".into()))
        );
    }

    #[test]
    fn settings_name_the_target_and_always_follow_the_newest_timeline() {
        let time = parse_time("2024-01-15 10:30:00.5+09").unwrap();
        let settings = recovery_settings(
            &RecoveryTarget::Time(time),
            TargetAction::Pause,
            TargetTimeline::Latest,
        );
        assert_eq!(
            settings,
            vec![
                ("recovery_target_timeline".into(), "latest".into()),
                (
                    "recovery_target_time".into(),
                    "2024-01-15 01:30:00.500000+00".into()
                ),
                ("recovery_target_action".into(), "pause".into()),
            ]
        );
        assert_eq!(
            recovery_settings(
                &RecoveryTarget::Latest,
                TargetAction::Shutdown,
                TargetTimeline::Latest
            )
            .len(),
            1
        );
        assert_eq!(
            recovery_settings(
                &RecoveryTarget::Name("x".into()),
                TargetAction::Promote,
                "1".parse().unwrap()
            )[0],
            ("recovery_target_timeline".into(), "1".into())
        );
        assert!("0".parse::<TargetTimeline>().is_err());
        assert_eq!("current".parse(), Ok(TargetTimeline::Current));
    }
}
