//! Prefetching for restore_command: PostgreSQL asks for one segment at a time and waits for
//! each, so wal-fetch starts a detached `gc-backup wal-prefetch NAME` that downloads the next
//! [`AHEAD`] segments in parallel into a spool beside DEST. The next wal-fetch then only
//! renames a file that was already checked.
//!
//! The spool (`<DEST dir>/gc-backup-prefetch/`) holds at most [`AHEAD`] segments plus those
//! being written (under temporary names). A lock file keeps one prefetcher at a time; one
//! whose process is gone is replaced. At the end of the archive the spool is emptied.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use futures::StreamExt;
use pitr::{SegmentNo, WalFile};

use super::wal;
use crate::config::Config;
use crate::error::Failure;
use crate::store::Store;

/// Segments fetched ahead of the one PostgreSQL asked for.
pub const AHEAD: u64 = 8;
/// Downloads at once.
const PARALLEL: usize = 4;
const SPOOL_DIR: &str = "gc-backup-prefetch";
const LOCK: &str = "prefetch.lock";

pub fn spool_dir(dest: &Path) -> PathBuf {
    dest.parent().unwrap_or(Path::new(".")).join(SPOOL_DIR)
}

/// Moves a prefetched `name` to `dest`. True if it was there.
pub fn take(dest: &Path, name: &str) -> bool {
    let spooled = spool_dir(dest).join(name);
    std::fs::rename(&spooled, dest).is_ok()
}

/// Removes spooled segments before `name` (recovery has moved past them).
pub fn forget_before(dest: &Path, name: &str) {
    let Ok(entries) = std::fs::read_dir(spool_dir(dest)) else {
        return;
    };
    for entry in entries.flatten() {
        let file = entry.file_name().to_string_lossy().into_owned();
        if file.len() == 24 && file.as_str() < name {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Empties the spool: the archive has no more segments.
pub fn clear(dest: &Path) {
    let dir = spool_dir(dest);
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for entry in entries.flatten() {
            if entry.file_name() != LOCK {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
}

/// Whether `GC_BACKUP_WAL_PREFETCH` leaves prefetching on (it is, unless 0, off or false).
fn enabled() -> bool {
    std::env::var("GC_BACKUP_WAL_PREFETCH")
        .map(|v| {
            !matches!(
                v.to_ascii_lowercase().as_str(),
                "0" | "off" | "false" | "no"
            )
        })
        .unwrap_or(true)
}

/// Starts a detached prefetcher for the segments after `name`, unless one is running.
pub fn start_behind(dest: &Path, name: &str, config_file: Option<&Path>, store_url: Option<&str>) {
    if !matches!(WalFile::parse(name), Ok(WalFile::Segment { .. })) || !enabled() {
        return;
    }
    let dir = spool_dir(dest);
    if std::fs::create_dir_all(&dir).is_err() || !take_lock(&dir) {
        return;
    }
    let Ok(exe) = std::env::current_exe() else {
        release_lock(&dir);
        return;
    };
    let mut command = std::process::Command::new(exe);
    if let Some(file) = config_file {
        command.arg("--config").arg(file);
    }
    if let Some(url) = store_url {
        command.arg("--store").arg(url);
    }
    command
        .arg("wal-prefetch")
        .arg(name)
        .arg(&dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // Its own process group: PostgreSQL's signals to restore_command do not reach it.
    std::os::unix::process::CommandExt::process_group(&mut command, 0);
    if command.spawn().is_err() {
        release_lock(&dir);
    }
}

/// Takes the lock for a new prefetcher (pid filled in by the prefetcher itself).
fn take_lock(dir: &Path) -> bool {
    let lock = dir.join(LOCK);
    for _ in 0..2 {
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&lock)
        {
            Ok(_) => return true,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let holder = std::fs::read_to_string(&lock)
                    .ok()
                    .and_then(|t| t.trim().parse::<u32>().ok());
                let fresh = std::fs::metadata(&lock)
                    .and_then(|m| m.modified())
                    .is_ok_and(|t| t.elapsed().is_ok_and(|age| age.as_secs() < 10));
                let alive = holder.is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
                if alive || (holder.is_none() && fresh) {
                    return false;
                }
                let _ = std::fs::remove_file(&lock);
            }
            Err(_) => return false,
        }
    }
    false
}

fn release_lock(dir: &Path) {
    let _ = std::fs::remove_file(dir.join(LOCK));
}

/// The prefetcher: downloads the [`AHEAD`] segments after `name` that are not spooled yet.
pub async fn run(config: &Config, store: &Store, name: &str, dir: &Path) -> anyhow::Result<()> {
    let _ = std::fs::write(dir.join(LOCK), std::process::id().to_string());
    let result = prefetch(config, store, name, dir).await;
    release_lock(dir);
    result
}

async fn prefetch(_config: &Config, store: &Store, name: &str, dir: &Path) -> anyhow::Result<()> {
    let file = WalFile::parse(name).map_err(|e| Failure::Config(e.to_string()))?;
    let size = pitr::DEFAULT_SEGMENT_SIZE;
    let (timeline, first) = (
        file.timeline(),
        file.segment_no(size).unwrap_or(SegmentNo(0)),
    );
    let wanted: Vec<String> = (1..=AHEAD)
        .map(|i| SegmentNo(first.0 + i).file_name(timeline, size))
        .filter(|n| !dir.join(n).exists())
        .collect();
    futures::stream::iter(wanted)
        .map(|segment| async move {
            let target = dir.join(&segment);
            // wal::fetch writes through a temporary name and renames: never a partial file.
            let _ = wal::fetch(store, &segment, &target).await;
        })
        .buffer_unordered(PARALLEL)
        .collect::<Vec<()>>()
        .await;
    Ok(())
}
