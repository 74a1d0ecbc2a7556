//! Jobs: the only place where a source, the pipeline and the store meet. Each job takes the
//! resolved configuration, an open store and a cancellation token, and returns what happened;
//! the CLI renders it.
//!
//! Errors leave here as `anyhow::Error` carrying a [`Failure`] where the caller can act on
//! them (exit codes), with the object, backup or database named in the message.

pub mod backup;
pub mod base_chain;
pub mod base_delta;
pub mod base_tar;
pub mod check;
pub mod drill;
pub mod etcd;
pub mod mark;
pub mod pg_base;
pub mod pg_dump;
pub mod redis;
pub mod redis_aof;
pub mod restore_all;
pub mod restore_pg;
pub mod restore_pg_dump;
pub mod retention;
pub mod verify;

use anyhow::Context;

use crate::error::Failure;
use crate::store::Store;

/// The object lock of `config`: every backup object and manifest retained for its kind's window
/// plus the margin from when it is written, WAL for PostgreSQL's window plus the margin (a
/// segment is needed as long as a restore target after it is inside the window, and the
/// segments before the window's start as long as the base backup they follow, one backup
/// interval more: the margin), the encryption marker for the longest window.
pub fn locker(
    config: &crate::config::Config,
) -> anyhow::Result<Option<crate::store::lock::Locker>> {
    use crate::catalog::layout::{Held, held};
    use crate::config::StoreLocation;
    let (Some(lock), StoreLocation::S3(s3)) = (config.store.object_lock, &config.store.location)
    else {
        return Ok(None);
    };
    let policy = config.retention;
    let until = std::sync::Arc::new(move |key: &crate::store::ObjectKey| {
        let window = match held(key) {
            Held::Backup(kind) => policy.window(kind),
            Held::Wal => policy.pg,
            Held::Marker => policy.pg.max(policy.redis).max(policy.etcd),
            Held::Transient => return None,
        };
        Some(chrono::Utc::now() + window + lock.margin)
    });
    let name = config.store.location.to_string();
    Ok(Some(crate::store::lock::Locker::new(
        s3, &name, lock.mode, until,
    )?))
}

/// Checked by every restore before it writes anything: an encrypted backup needs identities
/// (exit 2, one line, nothing written).
pub(crate) fn can_open(store: &Store, manifest: &crate::catalog::Manifest) -> anyhow::Result<()> {
    if manifest.objects.iter().any(|object| object.sealed) {
        let what = format!("{} backup {}", manifest.kind, manifest.id);
        store.keys().identities_for(&what)?;
    }
    Ok(())
}

/// What the pipeline must find when it reads `object` back.
/// A pipe between a download and the thread that reads it, as large as Linux allows an
/// unprivileged process by default (1 MiB, not 64 KiB): 16 times fewer wake-ups of either side.
pub(crate) fn pipe() -> anyhow::Result<(std::io::PipeReader, std::io::PipeWriter)> {
    use anyhow::Context;
    let (reader, writer) = std::io::pipe().context("creating a pipe")?;
    let _ = nix::fcntl::fcntl(&writer, nix::fcntl::FcntlArg::F_SETPIPE_SZ(1 << 20));
    Ok((reader, writer))
}

/// Downloads `object` into a pipe that `read` consumes on a blocking thread. `read` must read
/// to the end even after it fails (the checkers do), so that a download error is the
/// download's own, and reported first: it is the cause of whatever the reader met after it.
pub(crate) async fn download_into<T: Send + 'static>(
    store: &crate::store::Store,
    object: &crate::catalog::StoredObject,
    read: impl FnOnce(std::io::PipeReader) -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    use anyhow::Context;
    let (reader, writer) = pipe()?;
    let reading = tokio::task::spawn_blocking(move || read(reader));
    let downloaded = crate::pipeline::download(store, &expected(object), Box::new(writer))
        .await
        .map(drop)
        .map_err(anyhow::Error::from);
    let read = reading.await.context("reading worker failed")?;
    downloaded.and(read)
}

pub(crate) fn expected(object: &crate::catalog::StoredObject) -> crate::pipeline::Expected {
    crate::pipeline::Expected {
        key: crate::store::ObjectKey::from(object.key.as_str()),
        raw_bytes: object.raw_bytes,
        stored_bytes: object.stored_bytes,
        raw_sha256: object.raw_sha256.clone(),
        sealed: object.sealed,
    }
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
    let sink = crate::pipeline::download(store, &expected(object), sink).await?;
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
