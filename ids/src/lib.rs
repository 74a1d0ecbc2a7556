//! What names a backup: its [`Kind`] and its [`BackupId`]. The catalog's vocabulary, in a
//! crate of its own so that the retention planner speaks it too without depending on the agent.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, NaiveDateTime, TimeDelta, Utc};
use serde::{Deserialize, Serialize};

/// What a backup is a backup of; serialized as in manifests (`pg-dump`, …).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    PgDump,
    PgBase,
    Redis,
    Etcd,
    /// A restore point across the engines (`gc-backup mark`): a manifest without data that
    /// names the PostgreSQL restore point and the Redis and etcd backups taken with it.
    Point,
}

impl Kind {
    pub const ALL: [Kind; 5] = [
        Kind::PgDump,
        Kind::PgBase,
        Kind::Redis,
        Kind::Etcd,
        Kind::Point,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::PgDump => "pg-dump",
            Kind::PgBase => "pg-base",
            Kind::Redis => "redis",
            Kind::Etcd => "etcd",
            Kind::Point => "point",
        }
    }
}

impl fmt::Display for Kind {
    /// Honours width and alignment (`{:<8}`), for tables.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

impl FromStr for Kind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Kind::ALL
            .into_iter()
            .find(|kind| kind.as_str() == s)
            .ok_or_else(|| {
                format!("unknown kind '{s}' (kinds: pg-dump, pg-base, redis, etcd, point)")
            })
    }
}

/// A backup id: its start time in UTC to the second, e.g. `20260115T020000Z`. Ids sort in
/// time order, and the claim object makes each one unique per kind.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct BackupId(String);

const ID_FORMAT: &str = "%Y%m%dT%H%M%SZ";

impl BackupId {
    pub fn at(time: DateTime<Utc>) -> Self {
        Self(time.format(ID_FORMAT).to_string())
    }

    pub fn time(&self) -> DateTime<Utc> {
        // The constructor only admits strings that parse.
        NaiveDateTime::parse_from_str(&self.0, ID_FORMAT)
            .map(|t| t.and_utc())
            .unwrap_or_default()
    }

    /// The id one second later: used when an id is already taken.
    pub fn next(&self) -> Self {
        Self::at(self.time() + TimeDelta::seconds(1))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for BackupId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        NaiveDateTime::parse_from_str(s, ID_FORMAT)
            .map(|_| Self(s.to_string()))
            .map_err(|_| format!("'{s}' is not a backup id (expected e.g. 20260115T020000Z)"))
    }
}

impl TryFrom<String> for BackupId {
    type Error = String;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        value.parse()
    }
}

impl From<BackupId> for String {
    fn from(id: BackupId) -> Self {
        id.0
    }
}

impl fmt::Display for BackupId {
    /// Honours width and alignment, for tables.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_sort_by_time() {
        let time = DateTime::parse_from_rfc3339("2026-01-15T02:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let id = BackupId::at(time);
        assert_eq!(id.as_str(), "20260115T020000Z");
        assert_eq!(id.time(), time);
        assert_eq!(id.next().as_str(), "20260115T020001Z");
        assert!(id < id.next());
        assert!("2026-01-15".parse::<BackupId>().is_err());
        assert!("../../etc".parse::<BackupId>().is_err());
    }

    #[test]
    fn kinds_and_ids_fill_a_table_column() {
        let id: BackupId = "20260115T020000Z".parse().unwrap();
        assert_eq!(
            format!("[{:<8}][{id:>18}]", Kind::Redis),
            "[redis   ][  20260115T020000Z]"
        );
    }

    #[test]
    fn kinds_are_named_as_in_manifests_and_keys() {
        for kind in Kind::ALL {
            assert_eq!(kind.as_str().parse::<Kind>(), Ok(kind));
            assert_eq!(
                serde_json::to_string(&kind).unwrap(),
                format!("\"{}\"", kind.as_str())
            );
        }
        assert!("postgres".parse::<Kind>().is_err());
    }

    proptest::proptest! {
        /// Ids come from the store's keys and manifests: anything is an id or an error.
        #[test]
        fn any_text_is_an_id_that_prints_back_or_an_error(text in "\\PC{0,24}") {
            if let Ok(id) = text.parse::<BackupId>() {
                proptest::prop_assert_eq!(id.as_str(), text.as_str());
            }
        }
    }
}
