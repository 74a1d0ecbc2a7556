//! `backup etcd` and `restore etcd`: one member's snapshot through the pipeline into the
//! store, committed only when its SHA-256 trailer checked out; and back into a new file that
//! `etcdctl snapshot restore` takes, checked against the SHA-256 of what was stored.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::backup::{BackupRun, stored_object, upload_snapshot};
use crate::catalog::manifest::{EtcdFacts, MANIFEST_FORMAT, Manifest, SourceFacts};
use crate::catalog::{self, Kind, Selector};
use crate::config::Config;
use crate::error::Failure;
use crate::sources::etcd::{EtcdEndpoints, Member};
use crate::store::Store;

/// Snapshot chunks (32 KiB from etcd) queued between the gRPC stream and the pipeline.
const CHUNK_QUEUE: usize = 16;
const OBJECT: &str = "snapshot.db.zst";

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

    let mut run = BackupRun::begin(config, store, Kind::Etcd).await?;
    tracing::info!(
        kind = "etcd",
        id = %run.id(),
        endpoint = %member_facts.endpoint,
        etcd_version = %member_facts.version,
        revision = member_facts.revision,
        db_size = member_facts.db_size,
        "backup started"
    );
    let key = run.data_key(OBJECT);
    let stored = upload_snapshot(
        config,
        store,
        &key,
        CHUNK_QUEUE,
        |chunks| member.stream(chunks),
        cancel,
    );
    let (snapshot, summary) = run.guard(stored).await?;

    let source = SourceFacts::Etcd(EtcdFacts {
        endpoint: member_facts.endpoint,
        etcd_version: member_facts.version,
        cluster_id: format!("{:x}", member_facts.cluster_id),
        member_id: format!("{:x}", member_facts.member_id),
        revision: member_facts.revision,
        sha256: snapshot.sha256,
    });
    let manifest = run.manifest(MANIFEST_FORMAT, source, vec![stored_object(&key, &summary)]);
    run.commit(&manifest).await?;
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
    super::can_open(store, &manifest)?;
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
