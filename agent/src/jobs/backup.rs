//! What every backup kind shares: one [`BackupRun`] from claim to commit, the single-object
//! upload of a snapshot source, and the one dispatcher ([`backup`]) that the CLI and the
//! sidecar both call.
//!
//! A run's life: [`BackupRun::begin`] sweeps what abandoned runs of the kind left and claims an
//! id; the job streams its data under [`BackupRun::data_key`] inside [`BackupRun::guard`];
//! [`BackupRun::commit`] writes the manifest that makes the backup exist. A failure inside the
//! guard, a failed commit, or a run dropped before either (the job's future cancelled) removes
//! the run's data; should that removal fail too, the claim marks the leftovers for the next
//! run's sweep. No path leaves data that looks like a backup.

use std::future::Future;

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

use crate::catalog::manifest::{Compression, SourceFacts, StoredObject};
use crate::catalog::{self, BackupId, Kind, Manifest, layout};
use crate::config::Config;
use crate::error::Failure;
use crate::pipeline::UploadSummary;
use crate::sources::{SnapshotSent, SourceError};
use crate::store::{ObjectKey, Store};

use super::pg_dump::PgDumpRequest;

/// Which backup to take. The sources' endpoints come from the resolved configuration.
#[derive(Debug, Clone)]
pub enum BackupRequest {
    PgDump(PgDumpRequest),
    /// Incremental: only what changed since the newest base backup (`--incremental`).
    PgBase {
        incremental: bool,
    },
    Redis,
    Etcd,
    /// A point across the engines (`mark`); none: named after its id.
    Mark {
        name: Option<String>,
    },
}

impl BackupRequest {
    /// What the sidecar takes on the kind's schedule: the defaults of each command.
    pub fn scheduled(kind: Kind) -> Self {
        match kind {
            Kind::PgDump => Self::PgDump(PgDumpRequest::default()),
            Kind::PgBase => Self::PgBase { incremental: false },
            Kind::Redis => Self::Redis,
            Kind::Etcd => Self::Etcd,
            Kind::Point => Self::Mark { name: None },
        }
    }
}

/// Takes one backup and returns its committed manifest.
pub async fn backup(
    config: &Config,
    store: &Store,
    request: &BackupRequest,
    cancel: &CancellationToken,
) -> anyhow::Result<Manifest> {
    match request {
        BackupRequest::PgDump(request) => {
            super::pg_dump::backup(config, store, request, cancel).await
        }
        BackupRequest::PgBase { incremental } => {
            super::pg_base::backup(config, store, *incremental, cancel).await
        }
        BackupRequest::Redis => {
            let endpoint = config.redis.endpoint()?;
            let aof_dir = config.redis.aof_dir.as_deref();
            super::redis::backup(config, store, endpoint, aof_dir, cancel).await
        }
        BackupRequest::Etcd => {
            super::etcd::backup(config, store, config.etcd_endpoints()?, cancel).await
        }
        BackupRequest::Mark { name } => {
            super::mark::mark(config, store, name.as_deref(), cancel).await
        }
    }
}

/// One backup from its claimed id to its manifest.
#[derive(Debug)]
pub struct BackupRun<'a> {
    config: &'a Config,
    store: &'a Store,
    kind: Kind,
    id: BackupId,
    start_time: DateTime<Utc>,
    /// Committed, or its data already discarded: nothing left for `Drop` to do.
    settled: bool,
}

impl<'a> BackupRun<'a> {
    /// Removes what abandoned runs of `kind` left behind, then claims a new id.
    pub async fn begin(config: &'a Config, store: &'a Store, kind: Kind) -> anyhow::Result<Self> {
        let start_time = Utc::now();
        catalog::check_encryption(store).await?;
        catalog::sweep_abandoned(store, kind, start_time).await?;
        let id = catalog::claim_id(store, kind, start_time).await?;
        Ok(Self {
            config,
            store,
            kind,
            id,
            start_time,
            settled: false,
        })
    }

    pub fn id(&self) -> &BackupId {
        &self.id
    }

    /// The key of one of this run's data objects.
    pub fn data_key(&self, name: &str) -> ObjectKey {
        layout::data_key(self.kind, &self.id, name)
    }

    /// Runs `work`; if it fails, discards the run's data and says that nothing was committed.
    pub async fn guard<T>(
        &mut self,
        work: impl Future<Output = anyhow::Result<T>>,
    ) -> anyhow::Result<T> {
        match work.await {
            Ok(done) => Ok(done),
            Err(error) => {
                self.discard().await;
                Err(error.context(format!(
                    "{} backup {} failed; nothing was committed",
                    self.kind, self.id
                )))
            }
        }
    }

    /// The manifest of this run with `objects` as its data.
    pub fn manifest(
        &self,
        format: u32,
        source: SourceFacts,
        objects: Vec<StoredObject>,
    ) -> Manifest {
        let sealed = objects.iter().any(|object| object.sealed);
        let encryption = match &self.store.keys().recipients {
            Some(recipients) if sealed => Some(crate::catalog::manifest::Encryption {
                algorithm: "age".to_string(),
                recipients: recipients.names().to_vec(),
            }),
            _ => None,
        };
        Manifest {
            format: if sealed {
                format.max(crate::catalog::manifest::MANIFEST_FORMAT_SEALED)
            } else {
                format
            },
            id: self.id.clone(),
            kind: self.kind,
            start_time: self.start_time,
            end_time: Utc::now(),
            tool_version: env!("CARGO_PKG_VERSION").to_string(),
            raw_bytes: objects.iter().map(|o| o.raw_bytes).sum(),
            stored_bytes: objects.iter().map(|o| o.stored_bytes).sum(),
            compression: Compression {
                algorithm: "zstd".to_string(),
                level: self.config.pipeline.zstd_level,
            },
            source,
            objects,
            encryption,
        }
    }

    /// Writes the manifest that makes the backup exist, and logs the completion; if the write
    /// fails, removes the run's data so nothing half-committed is left.
    pub async fn commit(mut self, manifest: &Manifest) -> anyhow::Result<()> {
        if let Err(error) = catalog::commit(self.store, manifest).await {
            self.discard().await;
            return Err(anyhow::Error::new(error).context(format!(
                "{} backup {} failed while writing its manifest; nothing was committed",
                self.kind, self.id
            )));
        }
        self.settled = true;
        tracing::info!(
            kind = %self.kind,
            id = %self.id,
            raw_bytes = manifest.raw_bytes,
            stored_bytes = manifest.stored_bytes,
            objects = manifest.objects.len(),
            seconds = (manifest.end_time - self.start_time).as_seconds_f64(),
            peak_rss_bytes = crate::host::peak_rss_bytes().unwrap_or_default(),
            "backup completed"
        );
        Ok(())
    }

    async fn discard(&mut self) {
        self.settled = true;
        discard(self.store, self.kind, &self.id).await;
    }
}

impl Drop for BackupRun<'_> {
    /// A run dropped unsettled was cancelled mid-flight: its data goes in the background
    /// (a process that exits first leaves it to the next run's sweep).
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let (store, kind, id) = (self.store.clone(), self.kind, self.id.clone());
            runtime.spawn(async move { discard(&store, kind, &id).await });
        }
    }
}

/// Removes what a failed run stored. If the store is unreachable this fails too; the claim
/// object then marks the leftovers for the next run's sweep.
async fn discard(store: &Store, kind: Kind, id: &BackupId) {
    if let Err(error) = catalog::remove_data(store, kind, id).await {
        tracing::warn!(
            kind = %kind,
            id = %id,
            %error,
            "could not remove the data of the failed backup; the next run of this kind removes it"
        );
    }
}

/// The manifest entry of one object that the pipeline stored.
pub fn stored_object(key: &ObjectKey, summary: &UploadSummary) -> StoredObject {
    StoredObject {
        key: key.to_string(),
        raw_bytes: summary.raw_bytes,
        stored_bytes: summary.stored_bytes,
        raw_sha256: summary.raw_sha256.clone(),
        parts: summary.parts,
        sealed: summary.sealed,
    }
}

/// Uploads as `key` what a source pushes into a channel (at most `queue` chunks waiting), and
/// checks the result: the source's verdict first (it explains an upload that stopped because
/// of it), then the upload's, then that both counted the same bytes and the store holds them.
pub async fn upload_snapshot<T, F>(
    config: &Config,
    store: &Store,
    key: &ObjectKey,
    queue: usize,
    source: impl FnOnce(tokio::sync::mpsc::Sender<std::io::Result<bytes::Bytes>>) -> F,
    cancel: &CancellationToken,
) -> anyhow::Result<(T, UploadSummary)>
where
    F: Future<Output = Result<T, SourceError>>,
    T: SnapshotSent,
{
    let (chunks, received) = tokio::sync::mpsc::channel(queue);
    let reader =
        tokio_util::io::StreamReader::new(tokio_stream::wrappers::ReceiverStream::new(received));
    let (read, uploaded) = tokio::join!(
        source(chunks),
        crate::pipeline::upload(store, key, reader, &config.pipeline, cancel)
    );
    let facts = read?;
    let bytes = facts.bytes_sent();
    let summary = uploaded?;
    if summary.raw_bytes != bytes {
        return Err(anyhow::Error::new(Failure::Corrupt(format!(
            "{key}: the pipeline took {} bytes, but the source sent {bytes}",
            summary.raw_bytes
        ))));
    }
    check_stored_size(store, key, summary.stored_bytes).await?;
    Ok((facts, summary))
}

/// Asks the store for the object's size after upload: a store that kept fewer (or more) bytes
/// than were sent must not get a manifest.
pub async fn check_stored_size(store: &Store, key: &ObjectKey, sent: u64) -> anyhow::Result<()> {
    let meta = store.head(key).await?;
    if meta.size != sent {
        return Err(Failure::Corrupt(format!(
            "{key} is {} bytes in the store after upload, but {sent} bytes were sent",
            meta.size
        ))
        .into());
    }
    Ok(())
}
