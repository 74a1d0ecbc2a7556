//! Look-ahead WAL archiving: the sidecar uploads segments as soon as PostgreSQL marks them
//! `.ready`, several at a time, so that PostgreSQL's serial `archive_command` (wal-push) finds
//! each one already stored and returns at once.
//!
//! After a durable upload the archiver writes a marker beside the `.ready` file,
//! `archive_status/<name>.gc-stored`, holding the identity of the local file it read (size,
//! mtime, inode) and its SHA-256. wal-push trusts a marker only if the file it is asked to
//! archive still has that identity. The archiver never renames `.ready` to `.done`: that is
//! PostgreSQL's, once wal-push has returned 0. Markers whose `.ready` is gone are removed.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use notify::Watcher;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::store::Store;
use crate::wal;

const MARKER_SUFFIX: &str = ".gc-stored";
/// A rescan also runs on this period, in case a file event was missed.
const RESCAN: Duration = Duration::from_secs(5);
/// Events queued between the watcher thread and the loop; when full, events are dropped
/// (the next rescan finds the files anyway).
const EVENT_QUEUE: usize = 256;

/// Facts the metrics need.
#[derive(Debug, Clone, Default)]
pub struct ArchiverStatus {
    pub last_archived: Option<String>,
    pub last_archived_at: Option<chrono::DateTime<chrono::Utc>>,
    pub pending: usize,
    pub failures: u64,
}

/// The identity of the local file a marker vouches for.
fn identity(path: &Path) -> std::io::Result<String> {
    let meta = std::fs::metadata(path)?;
    Ok(format!(
        "{} {} {} {}",
        meta.len(),
        meta.mtime(),
        meta.mtime_nsec(),
        meta.ino()
    ))
}

/// `pg_wal/archive_status/<name>.gc-stored` for `pg_wal/<name>`.
pub fn marker_path(wal_path: &Path) -> Option<PathBuf> {
    let name = wal_path.file_name()?.to_str()?;
    let dir = wal_path.parent().unwrap_or(Path::new(""));
    Some(
        dir.join("archive_status")
            .join(format!("{name}{MARKER_SUFFIX}")),
    )
}

/// True when the archiver stored exactly this file: wal-push may return 0 without the store.
pub fn stored_by_archiver(wal_path: &Path) -> bool {
    let Some(marker) = marker_path(wal_path) else {
        return false;
    };
    let (Ok(recorded), Ok(current)) = (std::fs::read_to_string(&marker), identity(wal_path)) else {
        return false;
    };
    recorded.lines().next() == Some(current.as_str())
}

fn write_marker(wal_path: &Path, identity: &str, sha256: &str) -> std::io::Result<()> {
    let marker = marker_path(wal_path).ok_or_else(|| std::io::Error::other("no marker path"))?;
    let temporary = marker.with_extension("gc-tmp");
    std::fs::write(&temporary, format!("{identity}\n{sha256}\n"))?;
    std::fs::rename(&temporary, &marker)
}

/// Runs until `shutdown`; uploads in flight are finished (they are short) before returning.
/// `uploads` segments are read, compressed and stored at once (1 to 4): each is in memory
/// with its compressed copy while it uploads, so the sidecar's memory budget sets it.
pub async fn run(
    config: Arc<Config>,
    store: Store,
    pgdata: PathBuf,
    status: Arc<Mutex<ArchiverStatus>>,
    uploads: usize,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let wal_dir = pgdata.join("pg_wal");
    let status_dir = wal_dir.join("archive_status");
    let (events_tx, mut events) = mpsc::channel::<()>(EVENT_QUEUE);
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok() {
            let _ = events_tx.try_send(());
        }
    })?;
    watcher.watch(&status_dir, notify::RecursiveMode::NonRecursive)?;
    tracing::info!(dir = %status_dir.display(), "look-ahead WAL archiving started");

    let slots = Arc::new(Semaphore::new(uploads.max(1)));
    let mut uploads: JoinSet<(String, anyhow::Result<()>)> = JoinSet::new();
    let mut in_flight: HashSet<String> = HashSet::new();
    loop {
        let ready = scan(&status_dir)?;
        if let Ok(mut s) = status.lock() {
            s.pending = ready.len();
        }
        for name in ready {
            if in_flight.contains(&name) || stored_by_archiver(&wal_dir.join(&name)) {
                continue;
            }
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                break;
            };
            in_flight.insert(name.clone());
            let (config, store, path) = (config.clone(), store.clone(), wal_dir.join(&name));
            uploads.spawn(async move {
                let _permit = permit;
                (name, upload_one(&config, &store, &path).await)
            });
        }
        tokio::select! {
            Some(done) = uploads.join_next(), if !uploads.is_empty() => {
                if let Ok((name, result)) = done {
                    in_flight.remove(&name);
                    record(&status, &name, result);
                }
            }
            Some(()) = events.recv() => {}
            () = tokio::time::sleep(RESCAN) => {}
            () = shutdown.cancelled() => break,
        }
    }
    // Finish what is uploading: each is one small PUT.
    while let Some(done) = uploads.join_next().await {
        if let Ok((name, result)) = done {
            record(&status, &name, result);
        }
    }
    Ok(())
}

fn record(status: &Mutex<ArchiverStatus>, name: &str, result: anyhow::Result<()>) {
    let Ok(mut s) = status.lock() else { return };
    match result {
        Ok(()) => {
            s.last_archived = Some(name.to_string());
            s.last_archived_at = Some(chrono::Utc::now());
        }
        Err(error) => {
            s.failures += 1;
            tracing::warn!(
                segment = name,
                error = format!("{error:#}"),
                "look-ahead upload failed; will retry"
            );
        }
    }
}

async fn upload_one(config: &Config, store: &Store, path: &Path) -> anyhow::Result<()> {
    let before = identity(path)?;
    let outcome = wal::push(config, store, path).await?;
    // Only a file that did not change while we read it is vouched for.
    if identity(path)? == before {
        let sha = outcome.sha256;
        let path = path.to_path_buf();
        tokio::task::spawn_blocking(move || write_marker(&path, &before, &sha)).await??;
    }
    Ok(())
}

/// The `.ready` files' WAL names, history files first (PostgreSQL archives them first too),
/// then in name order; and removes markers whose `.ready` is gone.
fn scan(status_dir: &Path) -> anyhow::Result<Vec<String>> {
    let mut ready = Vec::new();
    let mut markers = Vec::new();
    for entry in std::fs::read_dir(status_dir)? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if let Some(wal) = name.strip_suffix(".ready") {
            ready.push(wal.to_string());
        } else if let Some(wal) = name.strip_suffix(MARKER_SUFFIX) {
            markers.push(wal.to_string());
        }
    }
    for wal in markers {
        if !ready.contains(&wal) {
            let _ = std::fs::remove_file(status_dir.join(format!("{wal}{MARKER_SUFFIX}")));
        }
    }
    ready.sort_by_key(|name| (!name.ends_with(".history"), name.clone()));
    Ok(ready)
}
