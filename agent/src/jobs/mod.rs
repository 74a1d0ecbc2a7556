//! Jobs: the only place where a source, the pipeline and the store meet. Each job takes the
//! resolved configuration, an open store and a cancellation token, and returns what happened;
//! the CLI renders it.
//!
//! Errors leave here as `anyhow::Error` carrying a [`Failure`] where the caller can act on
//! them (exit codes), with the object, backup or database named in the message.

pub mod archive;
pub mod base_tar;
pub mod check;
pub mod etcd;
pub mod pg_base;
pub mod pg_dump;
pub mod prefetch;
pub mod recovery;
pub mod redis;
pub mod redis_aof;
pub mod restore_pg;
pub mod restore_pg_dump;
pub mod retention;
pub mod verify;
pub mod wal;

use anyhow::Context;

use crate::catalog::{self, BackupId, Kind};
use crate::error::Failure;
use crate::store::Store;

/// Writes the manifest that makes a backup exist; if that fails, removes the run's data so
/// nothing half-committed is left.
pub(crate) async fn commit_or_discard(
    store: &Store,
    manifest: &crate::catalog::Manifest,
) -> anyhow::Result<()> {
    if let Err(error) = catalog::commit(store, manifest).await {
        discard(store, manifest.kind, &manifest.id).await;
        return Err(anyhow::Error::new(error).context(format!(
            "{} backup {} failed while writing its manifest; nothing was committed",
            manifest.kind, manifest.id
        )));
    }
    Ok(())
}

/// The manifest of a backup made of one object that the pipeline stored.
pub(crate) fn single_object_manifest(
    kind: Kind,
    id: &BackupId,
    start_time: chrono::DateTime<chrono::Utc>,
    config: &crate::config::Config,
    source: crate::catalog::manifest::SourceFacts,
    key: &crate::store::ObjectKey,
    summary: &crate::pipeline::UploadSummary,
) -> crate::catalog::Manifest {
    use crate::catalog::manifest::{Compression, MANIFEST_FORMAT, StoredObject};
    crate::catalog::Manifest {
        format: MANIFEST_FORMAT,
        id: id.clone(),
        kind,
        start_time,
        end_time: chrono::Utc::now(),
        tool_version: env!("CARGO_PKG_VERSION").to_string(),
        raw_bytes: summary.raw_bytes,
        stored_bytes: summary.stored_bytes,
        compression: Compression {
            algorithm: "zstd".to_string(),
            level: config.pipeline.zstd_level,
        },
        source,
        objects: vec![StoredObject {
            key: key.to_string(),
            raw_bytes: summary.raw_bytes,
            stored_bytes: summary.stored_bytes,
            raw_sha256: summary.raw_sha256.clone(),
            parts: summary.parts,
        }],
    }
}

/// Uploads as `key` what a source pushes into a channel (at most `queue` chunks waiting), and
/// checks the result: the source's verdict first (it explains an upload that stopped because
/// of it), then the upload's, then that both counted the same bytes and the store holds them.
/// The source returns its facts and the bytes it sent.
pub(crate) async fn upload_snapshot<T, F>(
    config: &crate::config::Config,
    store: &Store,
    key: &crate::store::ObjectKey,
    queue: usize,
    source: impl FnOnce(tokio::sync::mpsc::Sender<std::io::Result<bytes::Bytes>>) -> F,
    cancel: &tokio_util::sync::CancellationToken,
) -> anyhow::Result<(T, crate::pipeline::UploadSummary)>
where
    F: std::future::Future<Output = anyhow::Result<(T, u64)>>,
{
    let (chunks, received) = tokio::sync::mpsc::channel(queue);
    let reader =
        tokio_util::io::StreamReader::new(tokio_stream::wrappers::ReceiverStream::new(received));
    let (read, uploaded) = tokio::join!(
        source(chunks),
        crate::pipeline::upload(store, key, reader, &config.pipeline, cancel)
    );
    let (facts, bytes) = read?;
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
pub(crate) async fn check_stored_size(
    store: &Store,
    key: &crate::store::ObjectKey,
    sent: u64,
) -> anyhow::Result<()> {
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

/// Removes what a failed run stored. If the store is unreachable this fails too; the claim
/// object then marks the leftovers for the next run's sweep.
pub(crate) async fn discard(store: &Store, kind: Kind, id: &BackupId) {
    if let Err(error) = catalog::remove_data(store, kind, id).await {
        tracing::warn!(
            kind = %kind,
            id = %id,
            %error,
            "could not remove the data of the failed backup; the next run of this kind removes it"
        );
    }
}

/// This process's peak resident memory (VmHWM), for the completion log and the benchmarks.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Whether this process runs as root (then files it writes for PostgreSQL need chown).
pub(crate) fn running_as_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Writes `object` to the new file `path`, through `<path>.partial`, fsynced and renamed only
/// once its checks passed.
pub(crate) async fn restore_to_file(
    store: &Store,
    object: &crate::catalog::StoredObject,
    path: &std::path::Path,
) -> anyhow::Result<()> {
    if path.exists() {
        return Err(anyhow::Error::new(Failure::Config(format!(
            "{} already exists; restore writes only new files",
            path.display()
        ))));
    }
    let mut partial_path = path.as_os_str().to_owned();
    partial_path.push(".partial");
    let partial_path = std::path::PathBuf::from(partial_path);
    let file = std::fs::File::options()
        .write(true)
        .create_new(true)
        .open(&partial_path)
        .with_context(|| format!("cannot create {}", partial_path.display()))?;
    // Only a file this run created is removed on failure.
    let mut partial = PartialFile {
        path: partial_path,
        renamed: false,
    };
    let sink: crate::pipeline::Sink = Box::new(std::io::BufWriter::with_capacity(256 * 1024, file));
    let sink = crate::pipeline::download(store, object, sink).await?;
    drop(sink);
    let file = std::fs::File::open(&partial.path)
        .with_context(|| format!("reopening {}", partial.path.display()))?;
    file.sync_all()
        .with_context(|| format!("syncing {}", partial.path.display()))?;
    std::fs::rename(&partial.path, path)
        .with_context(|| format!("renaming {} to {}", partial.path.display(), path.display()))?;
    partial.renamed = true;
    Ok(())
}

/// Removes a half-written restore file when the restore fails or is interrupted (dropped).
struct PartialFile {
    path: std::path::PathBuf,
    renamed: bool,
}

impl Drop for PartialFile {
    fn drop(&mut self) {
        if !self.renamed {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}
