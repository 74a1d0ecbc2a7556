//! Every object key the agent uses is built here, and nowhere else.
//!
//! ```text
//! manifests/<kind>/<id>.json      one per complete backup, written last, create-only
//! data/<kind>/<id>/_claim.json    written first: reserves the id, marks a run in progress
//! data/<kind>/<id>/<object>       the backup's data objects
//! wal/<TTTTTTTTXXXXXXXX>/<name>.zst   WAL segments, .partial and .backup files, by timeline
//!                                     and xlog id (at most 256 per directory)
//! wal/<TTTTTTTT>.history.zst          timeline history files
//! check/<run>/<probe>             `gc-backup check`'s probe objects, deleted before it ends
//! ```
//!
//! Keys are relative to the store's root (the bucket prefix or directory).

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, NaiveDateTime, TimeDelta, Utc};
use serde::{Deserialize, Serialize};

use crate::store::ObjectKey;

/// What a backup is a backup of (defined with the retention planner, which reasons about it).
pub use retention::Kind;

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
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

pub fn manifests_prefix(kind: Option<Kind>) -> ObjectKey {
    match kind {
        Some(kind) => ObjectKey::from(format!("manifests/{kind}")),
        None => ObjectKey::from("manifests"),
    }
}

pub fn manifest_key(kind: Kind, id: &BackupId) -> ObjectKey {
    ObjectKey::from(format!("manifests/{kind}/{id}.json"))
}

/// The kind and id a manifest key names, or `None` for anything else under `manifests/`.
pub fn parse_manifest_key(key: &ObjectKey) -> Option<(Kind, BackupId)> {
    let text = key.as_ref();
    let rest = text.strip_prefix("manifests/")?;
    let (kind, file) = rest.split_once('/')?;
    let id = file.strip_suffix(".json")?;
    Some((kind.parse().ok()?, id.parse().ok()?))
}

/// Everything any backup stored besides its manifest.
pub fn data_root() -> ObjectKey {
    ObjectKey::from("data")
}

/// The data of every backup of one kind.
pub fn data_kind_prefix(kind: Kind) -> ObjectKey {
    ObjectKey::from(format!("data/{kind}"))
}

/// The kind and backup id a data key belongs to, and the object's name within the backup;
/// `None` for a key that is not a backup's data object.
pub fn parse_data_key(key: &ObjectKey) -> Option<(Kind, BackupId, &str)> {
    let mut parts = key.as_ref().splitn(4, '/');
    let (Some("data"), Some(kind), Some(id), Some(object)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    Some((kind.parse().ok()?, id.parse().ok()?, object))
}

pub fn data_prefix(kind: Kind, id: &BackupId) -> ObjectKey {
    ObjectKey::from(format!("data/{kind}/{id}"))
}

pub fn data_key(kind: Kind, id: &BackupId, object: &str) -> ObjectKey {
    ObjectKey::from(format!("data/{kind}/{id}/{object}"))
}

/// Where an archived WAL file lives.
pub fn wal_key(file: &pitr::WalFile) -> ObjectKey {
    match file.directory() {
        Some(directory) => ObjectKey::from(format!("wal/{directory}/{}.zst", file.name())),
        None => ObjectKey::from(format!("wal/{}.zst", file.name())),
    }
}

/// The WAL file an archive key holds, or `None` for anything else under `wal/`.
pub fn parse_wal_key(key: &ObjectKey) -> Option<pitr::WalFile> {
    let rest = key.as_ref().strip_prefix("wal/")?;
    let name = rest.rsplit('/').next()?.strip_suffix(".zst")?;
    let file = pitr::WalFile::parse(name).ok()?;
    // Only where wal_key would have put it: a stray copy elsewhere is not the archive's.
    (wal_key(&file) == *key).then_some(file)
}

pub fn wal_prefix() -> ObjectKey {
    ObjectKey::from("wal")
}

/// A probe object of one `gc-backup check` run.
pub fn check_key(run: &str, probe: &str) -> ObjectKey {
    ObjectKey::from(format!("check/{run}/{probe}").as_str())
}

const CLAIM: &str = "_claim.json";

pub fn claim_key(kind: Kind, id: &BackupId) -> ObjectKey {
    data_key(kind, id, CLAIM)
}

/// The backup a claim key claims, if `key` is one.
pub fn parse_claim_key(key: &ObjectKey) -> Option<(Kind, BackupId)> {
    match parse_data_key(key)? {
        (kind, id, CLAIM) => Some((kind, id)),
        _ => None,
    }
}

/// What the sidecar's readiness probe asks the store for: a HEAD that may well be "not found".
pub fn readiness_probe_key() -> ObjectKey {
    ObjectKey::from("manifests/.ready-probe")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_and_claim_keys_parse_back_to_what_built_them() {
        let id: BackupId = "20260115T020000Z".parse().unwrap();
        let key = data_key(Kind::PgBase, &id, "base.0.tar.zst");
        assert_eq!(
            parse_data_key(&key),
            Some((Kind::PgBase, id.clone(), "base.0.tar.zst"))
        );
        assert_eq!(
            parse_claim_key(&claim_key(Kind::Redis, &id)),
            Some((Kind::Redis, id.clone()))
        );
        assert_eq!(parse_claim_key(&key), None);
        for foreign in [
            "data/x/20260115T020000Z/a",
            "data/redis/not-an-id/a",
            "data/redis",
            "wal/a",
        ] {
            assert_eq!(parse_data_key(&ObjectKey::from(foreign)), None, "{foreign}");
        }
        assert!(
            key.as_ref()
                .starts_with(data_kind_prefix(Kind::PgBase).as_ref())
        );
    }

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
    fn manifest_keys_parse_back() {
        let id: BackupId = "20260115T020000Z".parse().unwrap();
        let key = manifest_key(Kind::PgDump, &id);
        assert_eq!(key.as_ref(), "manifests/pg-dump/20260115T020000Z.json");
        assert_eq!(parse_manifest_key(&key), Some((Kind::PgDump, id.clone())));
        assert_eq!(
            parse_manifest_key(&ObjectKey::from("manifests/pg-dump/x.tmp")),
            None
        );
        let segment = pitr::WalFile::parse("0000000200000016000000B3").unwrap();
        assert_eq!(
            wal_key(&segment).as_ref(),
            "wal/0000000200000016/0000000200000016000000B3.zst"
        );
        let history = pitr::WalFile::parse("00000002.history").unwrap();
        assert_eq!(wal_key(&history).as_ref(), "wal/00000002.history.zst");
        assert_eq!(parse_wal_key(&wal_key(&segment)), Some(segment));
        assert_eq!(parse_wal_key(&wal_key(&history)), Some(history));
        for stray in [
            "wal/0000000200000016000000B3.zst",
            "wal/0000000200000017/0000000200000016000000B3.zst",
            "wal/0000000200000016/0000000200000016000000B3",
            "wal/0000000200000016/x.zst",
        ] {
            assert_eq!(parse_wal_key(&ObjectKey::from(stray)), None, "{stray}");
        }
        assert_eq!(
            data_key(Kind::PgDump, &id, "dump.zst").as_ref(),
            "data/pg-dump/20260115T020000Z/dump.zst"
        );
    }

    mod outside_input {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// Keys come from a store anyone with its credentials can write to.
            #[test]
            fn any_key_parses_to_what_its_builder_makes_or_to_nothing(key in "\\PC{0,80}") {
                let key = ObjectKey::from(key.as_str());
                if let Some(file) = parse_wal_key(&key) {
                    prop_assert_eq!(wal_key(&file), key.clone());
                }
                if let Some((kind, id)) = parse_manifest_key(&key) {
                    prop_assert_eq!(manifest_key(kind, &id), key);
                }
            }

            #[test]
            fn wal_keys_of_24_characters_of_any_script_never_panic(
                name in "[0-9A-Fé€🙂]{8,24}",
            ) {
                let key = ObjectKey::from(format!("wal/0000000100000000/{name}.zst").as_str());
                let _ = parse_wal_key(&key);
            }
        }
    }
}
