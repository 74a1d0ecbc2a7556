//! What is in the store: manifests, read and written.
//!
//! A backup exists when, and only when, its manifest exists. A run first claims its id with a
//! create-only claim object, writes its data, and writes the manifest last with a create-only
//! put, so a crash at any point leaves either a complete backup or no backup at all.

pub mod layout;
pub mod manifest;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde::Serialize;

pub use layout::{BackupId, Kind};
pub use manifest::{Manifest, StoredObject};

use crate::host::hostname;
use crate::store::{ObjectKey, Store, StoreError};

/// How many manifests are fetched at once when listing.
const LIST_CONCURRENCY: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("no {kind} backup with id {id} in {store}")]
    NoSuchBackup {
        kind: Kind,
        id: BackupId,
        store: String,
    },
    #[error("there is no {kind} backup in {store} yet")]
    NoBackups { kind: Kind, store: String },
    #[error("manifest {key} is unreadable: {reason}")]
    BadManifest { key: String, reason: String },
    #[error("could not claim a {kind} backup id in {store}: ids from {first} on are all taken")]
    NoFreeId {
        kind: Kind,
        first: BackupId,
        store: String,
    },
    /// A clear write into a store whose marker says it is encrypted.
    #[error(
        "{store} is an encrypted store ({marker} since {since}), and this gc-backup has no \
         encryption recipients: set [encryption] recipients or GC_BACKUP_AGE_RECIPIENTS. Nothing \
         was written."
    )]
    Encrypted {
        store: String,
        marker: String,
        since: String,
    },
    /// An incremental whose parent (or an older ancestor) has no manifest any more.
    #[error(
        "pg-base backup {id} is an incremental on top of {missing}, which is not in {store} \
         (deleted?): it cannot be restored; restore {full_hint}"
    )]
    BrokenChain {
        id: BackupId,
        missing: BackupId,
        store: String,
        full_hint: String,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The chain an incremental base backup restores from, oldest (its full backup) first and
/// `manifest` last; a full backup alone is a chain of one. `manifests` is the catalog.
pub fn chain<'a>(
    store: &Store,
    manifests: &'a [Manifest],
    manifest: &'a Manifest,
) -> Result<Vec<&'a Manifest>, CatalogError> {
    let mut chain = vec![manifest];
    let mut at = manifest;
    while let manifest::SourceFacts::PgBase(facts) = &at.source
        && let Some(parent) = &facts.parent
    {
        let found = manifests
            .iter()
            .find(|m| &m.id == parent && m.kind == Kind::PgBase);
        let Some(found) = found else {
            return Err(CatalogError::BrokenChain {
                id: manifest.id.clone(),
                missing: parent.clone(),
                store: store.name().to_string(),
                full_hint: "a full backup or another chain (`gc-backup list --kind pg-base`)"
                    .into(),
            });
        };
        if chain.len() > manifests.len() {
            // A loop of parents: no writer makes one; a hostile store might.
            return Err(CatalogError::BadManifest {
                key: layout::manifest_key(Kind::PgBase, &manifest.id).to_string(),
                reason: "its chain of parents loops".into(),
            });
        }
        chain.push(found);
        at = found;
    }
    chain.reverse();
    Ok(chain)
}

/// Which backup a command means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    Latest,
    Id(BackupId),
}

impl std::str::FromStr for Selector {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "latest" {
            Ok(Selector::Latest)
        } else {
            s.parse().map(Selector::Id)
        }
    }
}

/// The claim object's content: who is writing this backup, for whoever finds it orphaned.
#[derive(Debug, Serialize)]
struct Claim<'a> {
    kind: Kind,
    id: &'a BackupId,
    started: DateTime<Utc>,
    host: String,
    pid: u32,
    tool_version: &'static str,
}

/// A claim read back: enough to tell whether its writer is gone.
#[derive(Debug, serde::Deserialize)]
struct ClaimRecord {
    started: DateTime<Utc>,
    host: String,
    pid: u32,
}

/// A claim older than this is abandoned whoever wrote it: no backup runs this long.
const CLAIM_EXPIRY_HOURS: i64 = 24;

impl ClaimRecord {
    fn abandoned(&self, now: DateTime<Utc>) -> bool {
        if now - self.started > chrono::TimeDelta::hours(CLAIM_EXPIRY_HOURS) {
            return true;
        }
        // On this host we can look: is the writer still a running gc-backup?
        self.host == hostname() && !crate::host::pid_runs(self.pid, "gc-backup")
    }
}

/// Removes what runs of `kind` that were killed left behind: data under a claim that has no
/// manifest and whose writer is gone. Returns the ids cleaned. Runs before each backup, so
/// the next run cleans up after a killed one.
pub async fn sweep_abandoned(
    store: &Store,
    kind: Kind,
    now: DateTime<Utc>,
) -> Result<Vec<BackupId>, CatalogError> {
    let mut cleaned = Vec::new();
    for object in store.list(&layout::data_kind_prefix(kind)).await? {
        let Some((_, id)) = layout::parse_claim_key(&object.location) else {
            continue;
        };
        let committed = match store.head(&layout::manifest_key(kind, &id)).await {
            Ok(_) => true,
            Err(StoreError::NotFound { .. }) => false,
            Err(other) => return Err(other.into()),
        };
        let claim = match store.get_bytes(&object.location).await {
            Ok(bytes) => serde_json::from_slice::<ClaimRecord>(&bytes).ok(),
            Err(StoreError::NotFound { .. }) => continue,
            Err(other) => return Err(other.into()),
        };
        if committed {
            // A committed backup whose claim was not deleted: just the claim goes.
            store.delete(&object.location).await?;
        } else if claim.is_none_or(|c| c.abandoned(now)) {
            tracing::warn!(kind = %kind, id = %id, "removing the data of an abandoned run");
            remove_data(store, kind, &id).await?;
            cleaned.push(id);
        }
    }
    Ok(cleaned)
}

/// Reserves a fresh id for a backup starting at `now`, moving on by a second while ids are
/// taken. The claim also proves, before any source is started, that the store is writable.
pub async fn claim_id(
    store: &Store,
    kind: Kind,
    now: DateTime<Utc>,
) -> Result<BackupId, CatalogError> {
    let first = BackupId::at(now);
    let mut id = first.clone();
    for _ in 0..30 {
        let claim = Claim {
            kind,
            id: &id,
            started: now,
            host: hostname(),
            pid: std::process::id(),
            tool_version: env!("CARGO_PKG_VERSION"),
        };
        let body = serde_json::to_vec(&claim).unwrap_or_default();
        let claim_key = layout::claim_key(kind, &id);
        match store.put_new(&claim_key, Bytes::from(body)).await {
            // A committed backup's claim is gone, so its manifest must be asked too: a run
            // that finished within the same second had this id.
            Ok(()) => match store.head(&layout::manifest_key(kind, &id)).await {
                Err(StoreError::NotFound { .. }) => return Ok(id),
                Ok(_) => {
                    store.delete(&claim_key).await?;
                    id = id.next();
                }
                Err(other) => return Err(other.into()),
            },
            Err(StoreError::AlreadyExists { .. }) => id = id.next(),
            Err(other) => return Err(other.into()),
        }
    }
    Err(CatalogError::NoFreeId {
        kind,
        first,
        store: store.name().to_string(),
    })
}

/// Deletes everything a run wrote under its data prefix: used when a run fails, and after a
/// successful run for the claim alone.
pub async fn remove_data(store: &Store, kind: Kind, id: &BackupId) -> Result<(), StoreError> {
    for object in store.list(&layout::data_prefix(kind, id)).await? {
        store.delete(&object.location).await?;
    }
    Ok(())
}

/// The store's encryption marker, public like the manifests.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct EncryptionMarker {
    algorithm: String,
    since: DateTime<Utc>,
    recipients: Vec<String>,
    host: String,
}

/// Before any write of data or WAL: an encrypted writer makes sure the store's marker exists
/// (the first one writes it, create-only); a clear writer is refused once it does, so a sidecar
/// deployed without its recipients cannot put clear text into an encrypted store.
pub async fn check_encryption(store: &Store) -> Result<(), CatalogError> {
    let key = layout::encryption_marker_key();
    let found = match store.get_bytes(&key).await {
        Ok(bytes) => Some(bytes),
        Err(StoreError::NotFound { .. }) => None,
        Err(error) => return Err(error.into()),
    };
    match (&store.keys().recipients, found) {
        (Some(_), Some(_)) | (None, None) => Ok(()),
        (Some(recipients), None) => {
            let marker = EncryptionMarker {
                algorithm: "age".to_string(),
                since: Utc::now(),
                recipients: recipients.names().to_vec(),
                host: hostname(),
            };
            let json = serde_json::to_vec_pretty(&marker).unwrap_or_default();
            match store.put_new(&key, Bytes::from(json)).await {
                Ok(()) | Err(StoreError::AlreadyExists { .. }) => Ok(()),
                Err(error) => Err(error.into()),
            }
        }
        (None, Some(bytes)) => {
            let since = serde_json::from_slice::<EncryptionMarker>(&bytes)
                .map(|marker| marker.since.to_rfc3339())
                .unwrap_or_else(|_| "an unreadable date".to_string());
            Err(CatalogError::Encrypted {
                store: store.name().to_string(),
                marker: key.to_string(),
                since,
            })
        }
    }
}

/// Commits a backup: the manifest is written create-only, so it never replaces another.
pub async fn commit(store: &Store, manifest: &Manifest) -> Result<(), CatalogError> {
    let key = layout::manifest_key(manifest.kind, &manifest.id);
    store.put_new(&key, Bytes::from(manifest.to_json())).await?;
    // The claim has done its job; a leftover one is harmless (retention ignores claims of
    // committed backups), so failing to delete it is not a failed backup.
    if let Err(error) = store
        .delete(&layout::claim_key(manifest.kind, &manifest.id))
        .await
    {
        tracing::warn!(%error, "could not delete the claim object of a committed backup");
    }
    Ok(())
}

/// The backups in the store (of one kind, or all), oldest first. Manifests that cannot be
/// read are returned separately so that callers can warn without hiding the rest.
pub async fn list(
    store: &Store,
    kind: Option<Kind>,
) -> Result<(Vec<Manifest>, Vec<CatalogError>), CatalogError> {
    let keys: Vec<ObjectKey> = store
        .list(&layout::manifests_prefix(kind))
        .await?
        .into_iter()
        .map(|meta| meta.location)
        .filter(|key| layout::parse_manifest_key(key).is_some())
        .collect();
    let results: Vec<Result<Manifest, CatalogError>> = futures::stream::iter(keys)
        .map(|key| async move { read_manifest(store, &key).await })
        .buffer_unordered(LIST_CONCURRENCY)
        .collect()
        .await;
    let mut manifests = Vec::new();
    let mut unreadable = Vec::new();
    for result in results {
        match result {
            Ok(manifest) => manifests.push(manifest),
            Err(CatalogError::Store(error)) if !matches!(error, StoreError::NotFound { .. }) => {
                return Err(error.into());
            }
            // Deleted between list and get: retention ran meanwhile. Not an error.
            Err(CatalogError::Store(_)) => {}
            Err(other) => unreadable.push(other),
        }
    }
    manifests.sort_by(|a, b| (a.start_time, &a.id).cmp(&(b.start_time, &b.id)));
    Ok((manifests, unreadable))
}

async fn read_manifest(store: &Store, key: &ObjectKey) -> Result<Manifest, CatalogError> {
    let bytes = store.get_bytes(key).await?;
    let manifest = Manifest::from_json(&bytes).map_err(|reason| CatalogError::BadManifest {
        key: key.to_string(),
        reason,
    })?;
    // A manifest must describe the backup its key names.
    if layout::parse_manifest_key(key) != Some((manifest.kind, manifest.id.clone())) {
        return Err(CatalogError::BadManifest {
            key: key.to_string(),
            reason: format!("it describes {} {}", manifest.kind, manifest.id),
        });
    }
    Ok(manifest)
}

/// Up to `count` manifests of `kind`, newest id first, reading only those: cheap enough to run
/// before every backup however long the history. Unreadable ones are skipped.
pub async fn newest(
    store: &Store,
    kind: Kind,
    count: usize,
) -> Result<Vec<Manifest>, CatalogError> {
    let mut keys: Vec<(BackupId, ObjectKey)> = store
        .list(&layout::manifests_prefix(Some(kind)))
        .await?
        .into_iter()
        .filter_map(|meta| {
            let (_, id) = layout::parse_manifest_key(&meta.location)?;
            Some((id, meta.location))
        })
        .collect();
    keys.sort_by(|a, b| b.0.cmp(&a.0));
    let mut manifests = Vec::new();
    for (_, key) in keys.into_iter().take(count) {
        match read_manifest(store, &key).await {
            Ok(manifest) => manifests.push(manifest),
            Err(CatalogError::Store(error)) if !matches!(error, StoreError::NotFound { .. }) => {
                return Err(error.into());
            }
            Err(error) => tracing::warn!(%error, "skipping an unreadable manifest"),
        }
    }
    Ok(manifests)
}

/// The manifest a selector means: an exact id, or the backup of that kind that ended last.
pub async fn find(
    store: &Store,
    kind: Kind,
    selector: &Selector,
) -> Result<Manifest, CatalogError> {
    match selector {
        Selector::Id(id) => {
            let key = layout::manifest_key(kind, id);
            match read_manifest(store, &key).await {
                Err(CatalogError::Store(StoreError::NotFound { .. })) => {
                    Err(CatalogError::NoSuchBackup {
                        kind,
                        id: id.clone(),
                        store: store.name().to_string(),
                    })
                }
                other => other,
            }
        }
        Selector::Latest => {
            let (manifests, _) = list(store, Some(kind)).await?;
            manifests
                .into_iter()
                .max_by(|a, b| (a.end_time, &a.id).cmp(&(b.end_time, &b.id)))
                .ok_or_else(|| CatalogError::NoBackups {
                    kind,
                    store: store.name().to_string(),
                })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::manifest::*;
    use super::*;

    fn manifest(id: &str, start: &str, end: &str) -> Manifest {
        Manifest {
            format: MANIFEST_FORMAT,
            id: id.parse().unwrap(),
            kind: Kind::PgDump,
            start_time: start.parse().unwrap(),
            end_time: end.parse().unwrap(),
            tool_version: "test".into(),
            raw_bytes: 10,
            stored_bytes: 5,
            compression: Compression {
                algorithm: "zstd".into(),
                level: 3,
            },
            source: SourceFacts::PgDump(PgDumpFacts {
                database: "db".into(),
                server_version: None,
                server_version_num: None,
                pg_dump_version: "pg_dump (PostgreSQL) 15".into(),
                format: DumpFormat::Custom,
                tables: vec![],
            }),
            encryption: None,
            objects: vec![],
        }
    }

    #[tokio::test]
    async fn latest_is_the_backup_that_ended_last_and_ids_are_exact() {
        let store = Store::memory();
        let older = manifest(
            "20260101T000000Z",
            "2026-01-01T00:00:00Z",
            "2026-01-01T00:10:00Z",
        );
        let newer = manifest(
            "20260102T000000Z",
            "2026-01-02T00:00:00Z",
            "2026-01-02T00:10:00Z",
        );
        commit(&store, &newer).await.unwrap();
        commit(&store, &older).await.unwrap();
        let latest = find(&store, Kind::PgDump, &Selector::Latest).await.unwrap();
        assert_eq!(latest, newer);
        let exact = find(&store, Kind::PgDump, &Selector::Id(older.id.clone()))
            .await
            .unwrap();
        assert_eq!(exact, older);
        let missing = find(&store, Kind::PgDump, &"20250101T000000Z".parse().unwrap()).await;
        assert!(matches!(missing, Err(CatalogError::NoSuchBackup { .. })));
        let none = find(&store, Kind::Redis, &Selector::Latest).await;
        assert!(matches!(none, Err(CatalogError::NoBackups { .. })));
        let (all, bad) = list(&store, None).await.unwrap();
        assert_eq!(all, vec![older, newer]);
        assert!(bad.is_empty());
    }

    #[tokio::test]
    async fn a_manifest_is_never_overwritten() {
        let store = Store::memory();
        let first = manifest(
            "20260101T000000Z",
            "2026-01-01T00:00:00Z",
            "2026-01-01T00:10:00Z",
        );
        commit(&store, &first).await.unwrap();
        let mut second = first.clone();
        second.raw_bytes = 999;
        assert!(commit(&store, &second).await.is_err());
        let kept = find(&store, Kind::PgDump, &Selector::Latest).await.unwrap();
        assert_eq!(kept.raw_bytes, 10);
    }

    #[tokio::test]
    async fn claims_make_ids_unique() {
        let store = Store::memory();
        let now: DateTime<Utc> = "2026-01-15T02:00:00Z".parse().unwrap();
        let a = claim_id(&store, Kind::PgDump, now).await.unwrap();
        let b = claim_id(&store, Kind::PgDump, now).await.unwrap();
        assert_eq!(a.as_str(), "20260115T020000Z");
        assert_eq!(b.as_str(), "20260115T020001Z");
        let other_kind = claim_id(&store, Kind::Redis, now).await.unwrap();
        assert_eq!(other_kind, a);
    }

    #[tokio::test]
    async fn an_id_committed_within_the_same_second_is_not_claimed_again() {
        let store = Store::memory();
        let now: DateTime<Utc> = "2026-01-15T02:00:00Z".parse().unwrap();
        let first = claim_id(&store, Kind::Redis, now).await.unwrap();
        let mut done = manifest(
            first.as_str(),
            "2026-01-15T02:00:00Z",
            "2026-01-15T02:00:00Z",
        );
        done.kind = Kind::Redis;
        commit(&store, &done).await.unwrap();
        // The commit removed the claim; the manifest still holds the id.
        let second = claim_id(&store, Kind::Redis, now).await.unwrap();
        assert_eq!(second.as_str(), "20260115T020001Z");
        assert!(
            store
                .head(&layout::claim_key(Kind::Redis, &first))
                .await
                .is_err(),
            "the probe claim was left behind"
        );
    }

    #[tokio::test]
    async fn abandoned_runs_are_swept_and_live_or_committed_ones_kept() {
        let store = Store::memory();
        let now: DateTime<Utc> = "2026-01-15T02:00:00Z".parse().unwrap();
        let put_claim = |id: &str, started: &str, pid: u32| {
            let store = store.clone();
            let body = format!(
                r#"{{"kind":"pg-base","id":"{id}","started":"{started}","host":"{}","pid":{pid},"tool_version":"t"}}"#,
                hostname()
            );
            let id: BackupId = id.parse().unwrap();
            async move {
                store
                    .put_new(&layout::claim_key(Kind::PgBase, &id), Bytes::from(body))
                    .await
                    .unwrap();
                store
                    .put_new(
                        &layout::data_key(Kind::PgBase, &id, "base.0.tar.zst"),
                        Bytes::from_static(b"x"),
                    )
                    .await
                    .unwrap();
            }
        };
        // Dead writer on this host (no such pid), a live one (this test process is not
        // gc-backup, so use an old claim for the expiry rule instead), and a fresh claim of
        // another host that must be left alone.
        put_claim("20260115T010000Z", "2026-01-15T01:00:00Z", u32::MAX).await;
        put_claim(
            "20260113T010000Z",
            "2026-01-13T01:00:00Z",
            std::process::id(),
        )
        .await;
        let other_host = r#"{"kind":"pg-base","id":"20260115T015900Z","started":"2026-01-15T01:59:00Z","host":"elsewhere","pid":1,"tool_version":"t"}"#;
        let live: BackupId = "20260115T015900Z".parse().unwrap();
        store
            .put_new(
                &layout::claim_key(Kind::PgBase, &live),
                Bytes::from_static(other_host.as_bytes()),
            )
            .await
            .unwrap();
        let cleaned = sweep_abandoned(&store, Kind::PgBase, now).await.unwrap();
        assert_eq!(
            cleaned.iter().map(BackupId::as_str).collect::<Vec<_>>(),
            vec!["20260113T010000Z", "20260115T010000Z"]
        );
        let left = store.list(&ObjectKey::from("data")).await.unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].location, layout::claim_key(Kind::PgBase, &live));
    }

    #[test]
    fn every_manifest_format_is_read_and_a_newer_one_is_refused_clearly() {
        let mut unhashed = manifest(
            "20260101T000000Z",
            "2026-01-01T00:00:00Z",
            "2026-01-01T00:01:00Z",
        );
        unhashed.format = manifest::MANIFEST_FORMAT_UNHASHED;
        for object in &mut unhashed.objects {
            object.raw_sha256 = None;
        }
        let read = Manifest::from_json(&unhashed.to_json()).unwrap();
        assert_eq!(read, unhashed);
        let old = manifest(
            "20260101T000000Z",
            "2026-01-01T00:00:00Z",
            "2026-01-01T00:01:00Z",
        );
        assert_eq!(Manifest::from_json(&old.to_json()).unwrap(), old);
        let mut sealed = old.clone();
        sealed.format = manifest::MANIFEST_FORMAT_SEALED;
        sealed.encryption = Some(manifest::Encryption {
            algorithm: "age".into(),
            recipients: vec!["age1example".into()],
        });
        assert_eq!(Manifest::from_json(&sealed.to_json()).unwrap(), sealed);
        let mut newer = old.clone();
        newer.format = manifest::MANIFEST_FORMAT_NEWEST + 1;
        let error = Manifest::from_json(&newer.to_json()).unwrap_err();
        assert!(error.contains("use a newer gc-backup"), "{error}");
    }

    #[tokio::test]
    async fn unreadable_manifests_are_reported_not_hidden() {
        let store = Store::memory();
        let key = layout::manifest_key(Kind::PgDump, &"20260101T000000Z".parse().unwrap());
        store
            .put_new(&key, Bytes::from_static(b"{not json"))
            .await
            .unwrap();
        let (ok, bad) = list(&store, None).await.unwrap();
        assert!(ok.is_empty());
        assert_eq!(bad.len(), 1);
    }
}
