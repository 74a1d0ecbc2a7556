//! `gc-backup retention`: reads what the store holds, asks the pure `retention` planner what
//! to delete at `now`, and deletes it — manifests first, then data, then WAL, so that a run
//! interrupted anywhere leaves only usable backups — and aborts multipart uploads that killed
//! runs left open for longer than the grace period.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use futures::StreamExt;
use retention::{Backup, DataObject, Decision, Inventory, Plan, Policy, Target, WalObject};

use crate::catalog::manifest::SourceFacts;
use crate::catalog::{self, Kind, Manifest, layout};
use crate::config::S3Location;
use crate::error::Failure;
use crate::store::multipart::{self, PendingUpload};
use crate::store::{ObjectKey, Store};
use crate::wal::receiver;

/// Deletes in flight at once.
const DELETE_CONCURRENCY: usize = 16;

fn backup_of(manifest: &Manifest) -> Backup {
    let wal_start = match &manifest.source {
        SourceFacts::PgBase(facts) => pitr::WalFile::parse(&facts.start_wal)
            .ok()
            .filter(|file| matches!(file, pitr::WalFile::Segment { .. })),
        _ => None,
    };
    let (block_map, parent) = match &manifest.source {
        SourceFacts::PgBase(facts) => (facts.block_map.as_ref(), facts.parent.clone()),
        _ => (None, None),
    };
    Backup {
        kind: manifest.kind,
        id: manifest.id.clone(),
        start_time: manifest.start_time,
        end_time: manifest.end_time,
        objects: manifest
            .objects
            .iter()
            .chain(block_map)
            .map(|o| o.key.clone())
            .collect(),
        wal_start,
        parent,
    }
}

/// Everything in the store the planner needs. Refuses to go on when a manifest cannot be
/// read: its backup's objects (and objects it shares) could not be told from orphans.
pub async fn inventory(store: &Store) -> anyhow::Result<Inventory> {
    let (manifests, unreadable) = catalog::list(store, None).await?;
    if !unreadable.is_empty() {
        let names: Vec<String> = unreadable.iter().map(ToString::to_string).collect();
        return Err(Failure::Corrupt(format!(
            "retention will not run while a manifest is unreadable (its data could not be told \
             from orphans): {}",
            names.join("; ")
        ))
        .into());
    }
    let mut inventory = Inventory {
        backups: manifests.iter().map(backup_of).collect(),
        ..Inventory::default()
    };
    for meta in store.list(&layout::data_root()).await? {
        let Some((kind, id, _)) = layout::parse_data_key(&meta.location) else {
            continue; // not ours to judge
        };
        inventory.data.push(DataObject {
            kind,
            id,
            key: meta.location.to_string(),
            last_modified: meta.last_modified,
        });
    }
    for meta in store.list(&layout::wal_prefix()).await? {
        if let Some(file) = layout::parse_wal_key(&meta.location) {
            inventory.wal.push(WalObject {
                key: meta.location.to_string(),
                file,
            });
        }
    }
    for meta in store.list(&ObjectKey::from(receiver::STREAM_ROOT)).await? {
        if let Some((file, _, _)) = receiver::parse_chunk_key(&meta.location) {
            inventory.streamed.push(WalObject {
                key: meta.location.to_string(),
                file,
            });
        }
    }
    Ok(inventory)
}

#[derive(Debug)]
pub struct RetentionReport {
    pub plan: Plan,
    pub now: DateTime<Utc>,
    /// Backups deleted, by kind (all zero on a dry run).
    pub deleted_backups: BTreeMap<Kind, usize>,
    pub deleted_objects: usize,
    pub deleted_wal: usize,
    /// Multipart uploads older than the grace period (aborted unless a dry run).
    pub stale_uploads: Vec<PendingUpload>,
    /// Why stale uploads could not be looked for, if they could not.
    pub uploads_unchecked: Option<String>,
}

/// Plans at `now` and, unless `dry_run`, carries the plan out. `s3` is the store's location
/// when it is S3: multipart uploads that killed runs left open are found and aborted there.
pub async fn run(
    store: &Store,
    s3: Option<&S3Location>,
    policy: &Policy,
    now: DateTime<Utc>,
    dry_run: bool,
) -> anyhow::Result<RetentionReport> {
    let inventory = inventory(store).await?;
    let plan = retention::plan(&inventory, policy, now);
    let mut report = RetentionReport {
        plan,
        now,
        deleted_backups: BTreeMap::new(),
        deleted_objects: 0,
        deleted_wal: 0,
        stale_uploads: Vec::new(),
        uploads_unchecked: None,
    };
    if let Some(location) = s3 {
        match multipart::pending(location).await {
            Ok(Some(uploads)) => {
                report.stale_uploads = uploads
                    .into_iter()
                    .filter(|u| u.initiated.is_none_or(|t| now - t > policy.orphan_grace))
                    .collect();
            }
            Ok(None) => {
                report.uploads_unchecked =
                    Some("no static S3 credentials to list multipart uploads with".into());
            }
            // Stale uploads cost money, not backups: never a reason to skip the rest.
            Err(error) => report.uploads_unchecked = Some(error.to_string()),
        }
    }
    if dry_run {
        return Ok(report);
    }
    let deletions: Vec<Decision> = report.plan.deletions().cloned().collect();
    // Manifests one by one, in order, before any data: a backup stops existing first.
    for decision in deletions
        .iter()
        .filter(|d| matches!(d.target, Target::Backup { .. }))
    {
        let Target::Backup { kind, id } = &decision.target else {
            continue;
        };
        let kind = *kind;
        delete_tolerating_absence(store, &layout::manifest_key(kind, id)).await?;
        tracing::info!(kind = %kind, id = %id, reason = %decision.reason, "backup deleted");
        *report.deleted_backups.entry(kind).or_default() += 1;
    }
    let keys = |wal: bool| -> Vec<ObjectKey> {
        deletions
            .iter()
            .filter_map(|d| match (&d.target, wal) {
                (Target::Object { key }, false) | (Target::Wal { key }, true) => {
                    Some(ObjectKey::from(key.as_str()))
                }
                _ => None,
            })
            .collect()
    };
    report.deleted_objects = delete_all(store, keys(false)).await?;
    report.deleted_wal = delete_all(store, keys(true)).await?;
    if let Some(location) = s3 {
        // Afterwards the list holds only what was aborted.
        let mut aborted = Vec::new();
        for upload in std::mem::take(&mut report.stale_uploads) {
            match multipart::abort(location, &upload).await {
                Ok(()) => {
                    tracing::info!(key = %upload.key, "stale multipart upload aborted");
                    aborted.push(upload);
                }
                Err(error) => {
                    tracing::warn!(%error, "a stale multipart upload stays open");
                    report.uploads_unchecked = Some(error.to_string());
                }
            }
        }
        report.stale_uploads = aborted;
    }
    Ok(report)
}

/// A key already gone (another retention run, a manual delete) is not an error.
async fn delete_tolerating_absence(store: &Store, key: &ObjectKey) -> anyhow::Result<()> {
    match store.delete(key).await {
        Ok(()) | Err(crate::store::StoreError::NotFound { .. }) => Ok(()),
        Err(error) => Err(anyhow::Error::new(error)),
    }
}

async fn delete_all(store: &Store, keys: Vec<ObjectKey>) -> anyhow::Result<usize> {
    let count = keys.len();
    let results: Vec<anyhow::Result<()>> = futures::stream::iter(keys)
        .map(|key| async move { delete_tolerating_absence(store, &key).await })
        .buffer_unordered(DELETE_CONCURRENCY)
        .collect()
        .await;
    results.into_iter().collect::<anyhow::Result<Vec<()>>>()?;
    Ok(count)
}
