//! `backup etcd` and `restore etcd`: one member's snapshot through the pipeline into the
//! store, committed only when its SHA-256 trailer checked out; and back into a new file that
//! `etcdctl snapshot restore` takes, checked against the SHA-256 of what was stored.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use chrono::Utc;
use tokio_util::sync::CancellationToken;

use crate::catalog::manifest::{EtcdFacts, Manifest, SourceFacts};
use crate::catalog::{self, Kind, Selector, layout};
use crate::config::Config;
use crate::error::Failure;
use crate::sources::etcd::{EtcdEndpoints, Member};
use crate::store::Store;

/// Snapshot chunks (32 KiB from etcd) queued between the gRPC stream and the pipeline.
const CHUNK_QUEUE: usize = 16;
const OBJECT: &str = "snapshot.db.zst";

/// The cluster to back up: `--endpoints`, else the environment or configuration.
pub fn endpoints(config: &Config, flag: Option<&str>) -> anyhow::Result<EtcdEndpoints> {
    let urls = match flag {
        Some(list) => EtcdEndpoints::parse_urls(list)?,
        None if config.etcd.endpoints.is_empty() => {
            return Err(Failure::Config(
                "no etcd to back up: give --endpoints, GC_BACKUP_ETCD_ENDPOINTS (or \
                 ETCDCTL_ENDPOINTS) or [etcd] endpoints"
                    .into(),
            )
            .into());
        }
        None => config.etcd.endpoints.clone(),
    };
    EtcdEndpoints::check_urls(&urls)?;
    let user = match (&config.etcd.user, &config.etcd.password) {
        (Some(name), Some(password)) => Some((name.clone(), password.clone())),
        (Some(name), None) => {
            return Err(Failure::Config(format!(
                "etcd user {name} has no password: set ETCDCTL_PASSWORD or [etcd] password"
            ))
            .into());
        }
        (None, _) => None,
    };
    Ok(EtcdEndpoints {
        urls,
        user,
        ca_file: config.etcd.ca_file.clone(),
        cert_file: config.etcd.cert_file.clone(),
        key_file: config.etcd.key_file.clone(),
    })
}

/// Takes a snapshot of the first member of `endpoints` that answers; returns the manifest.
pub async fn backup(
    config: &Config,
    store: &Store,
    endpoints: &EtcdEndpoints,
    cancel: &CancellationToken,
) -> anyhow::Result<Manifest> {
    // Connect first: unreachable members and refused credentials fail before anything is stored.
    let member = Member::connect(endpoints).await?;
    let member_facts = member.facts.clone();

    let start_time = Utc::now();
    catalog::sweep_abandoned(store, Kind::Etcd, start_time).await?;
    let id = catalog::claim_id(store, Kind::Etcd, start_time).await?;
    tracing::info!(
        kind = "etcd",
        id = %id,
        endpoint = %member_facts.endpoint,
        etcd_version = %member_facts.version,
        revision = member_facts.revision,
        db_size = member_facts.db_size,
        "backup started"
    );
    let key = layout::data_key(Kind::Etcd, &id, OBJECT);

    let stored = super::upload_snapshot(
        config,
        store,
        &key,
        CHUNK_QUEUE,
        |chunks| async {
            let snapshot = member.stream(chunks).await?;
            let bytes = snapshot.bytes;
            Ok((snapshot, bytes))
        },
        cancel,
    )
    .await;
    let (snapshot, summary) = match stored {
        Ok(done) => done,
        Err(error) => {
            super::discard(store, Kind::Etcd, &id).await;
            return Err(error.context(format!("etcd backup {id} failed; nothing was committed")));
        }
    };

    let source = SourceFacts::Etcd(EtcdFacts {
        endpoint: member_facts.endpoint,
        etcd_version: member_facts.version,
        cluster_id: format!("{:x}", member_facts.cluster_id),
        member_id: format!("{:x}", member_facts.member_id),
        revision: member_facts.revision,
        sha256: snapshot.sha256,
    });
    let manifest =
        super::single_object_manifest(Kind::Etcd, &id, start_time, config, source, &key, &summary);
    super::commit_or_discard(store, &manifest).await?;
    tracing::info!(
        kind = "etcd",
        id = %id,
        raw_bytes = summary.raw_bytes,
        stored_bytes = summary.stored_bytes,
        seconds = summary.elapsed.as_secs_f64(),
        peak_rss_bytes = super::peak_rss_bytes().unwrap_or_default(),
        "backup completed"
    );
    Ok(manifest)
}

#[derive(Debug)]
pub struct RestoreEtcdReport {
    pub manifest: Manifest,
    pub path: PathBuf,
    pub elapsed: Duration,
}

/// Writes the snapshot to the new file `output`, checked before it gets its name.
pub async fn restore(
    store: &Store,
    selector: &Selector,
    output: &Path,
    cancel: &CancellationToken,
) -> anyhow::Result<RestoreEtcdReport> {
    let manifest = catalog::find(store, Kind::Etcd, selector).await?;
    let [object] = manifest.objects.as_slice() else {
        return Err(Failure::Corrupt(format!(
            "etcd backup {} has {} objects, expected 1",
            manifest.id,
            manifest.objects.len()
        ))
        .into());
    };
    let started = Instant::now();
    tokio::select! {
        result = super::restore_to_file(store, object, output) => {
            anyhow::Context::with_context(result, || format!("restore of etcd backup {} failed", manifest.id))?;
        }
        () = cancel.cancelled() => {
            return Err(Failure::Interrupted(format!("restore of etcd backup {} interrupted", manifest.id)).into());
        }
    }
    Ok(RestoreEtcdReport {
        manifest,
        path: output.to_path_buf(),
        elapsed: started.elapsed(),
    })
}
