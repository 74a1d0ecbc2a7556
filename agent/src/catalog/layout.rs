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
//! encryption.json                 written by the first encrypted write: clear writes refused
//! ```
//!
//! Keys are relative to the store's root (the bucket prefix or directory).

use crate::store::ObjectKey;

pub use ids::{BackupId, Kind};

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

/// What a key holds, as object lock sees it: how long it must outlive an attacker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Held {
    /// A backup's manifest or data object: kept for its kind's window.
    Backup(Kind),
    /// Archived WAL: kept as long as the PostgreSQL backups that need it.
    Wal,
    /// The encryption marker: kept as long as anything.
    Marker,
    /// Claims and `check`'s probes: deleted by gc-backup itself, never locked.
    Transient,
}

pub fn held(key: &ObjectKey) -> Held {
    if *key == encryption_marker_key() {
        return Held::Marker;
    }
    if parse_wal_key(key).is_some() {
        return Held::Wal;
    }
    if let Some((kind, _)) = parse_manifest_key(key) {
        return Held::Backup(kind);
    }
    match parse_data_key(key) {
        Some((_, _, CLAIM)) | None => Held::Transient,
        Some((kind, _, _)) => Held::Backup(kind),
    }
}

/// The marker that says the store is encrypted ([`super::check_encryption`]).
pub fn encryption_marker_key() -> ObjectKey {
    ObjectKey::from("encryption.json")
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
