//! Prefetching for restore_command: PostgreSQL asks for one segment at a time and waits for
//! each, so wal-fetch starts a detached `gc-backup wal-prefetch NAME` that keeps the next
//! [`AHEAD`] segments downloaded (`PARALLEL` at a time) in a spool beside DEST. The
//! restore_command that `restore pg` writes renames a spooled segment in the shell
//! ([`shell_take`]) and starts wal-fetch only for the rest; wal-fetch too renames from the
//! spool before anything else. Either way a file that was already checked.
//!
//! One prefetcher follows the whole recovery: each wal-fetch records the segment asked for
//! (`position`), a spooled segment that disappeared was taken by the shell, and the
//! prefetcher tops the spool up as recovery consumes it, so recovery
//! costs one process and one connection pool instead of one of each per segment. It exits at
//! the end of the archive (or of the timeline it follows), or after `IDLE` without progress
//! (a paused recovery). The spool (`<DEST dir>/gc-backup-prefetch/`) holds at most [`AHEAD`]
//! segments plus those being written (under temporary names). A lock file keeps one
//! prefetcher at a time; one whose process is gone is replaced. At the end of the archive the
//! spool is emptied.
//!
//! The spool is keyed: `gc-backup-prefetch/<key>/`, where the key is a hash of the store's
//! location and the system identifier in `global/pg_control`. A wal-fetch that reads another
//! store (or recovers another cluster into the same place) never takes a segment that came
//! from elsewhere. The shell's test names the key computed when `restore pg` wrote it: whoever
//! edits the store in that restore_command by hand must drop the test with it (README).
//! Once recovery has ended (no `recovery.signal` nor `standby.signal`, or
//! PostgreSQL's `recovery_end_command`), the spool is removed: nothing will read it again.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use futures::StreamExt;
use pitr::{SegmentNo, WalFile};

use sha2::Digest;

use crate::config::Config;
use crate::error::Failure;
use crate::store::Store;
use crate::wal;

/// Segments fetched ahead of the one PostgreSQL asked for.
pub const AHEAD: u64 = 8;
/// Downloads at once.
const PARALLEL: usize = 4;
const SPOOL_DIR: &str = "gc-backup-prefetch";
const LOCK: &str = "prefetch.lock";
const POSITION: &str = "position";
/// A prefetcher whose spool has not moved for this long exits.
const IDLE: std::time::Duration = std::time::Duration::from_secs(10);
/// How often a prefetcher with a full spool looks again.
const POLL: std::time::Duration = std::time::Duration::from_millis(10);

/// Where the prefetched segments for a wal-fetch into `dest` from the store named `store`
/// ([`Store::name`]) live. `dest` is in `pg_wal`, so the data directory being recovered is
/// two levels up.
pub fn spool_dir(dest: &Path, store: &str) -> PathBuf {
    let pg_wal = dest.parent().unwrap_or(Path::new("."));
    let pgdata = pg_wal.parent().unwrap_or(Path::new("."));
    let cluster = crate::sources::pgdata::system_identifier(pgdata)
        .map_or_else(|_| "unknown".to_string(), |id| id.to_string());
    pg_wal.join(SPOOL_DIR).join(spool_key(store, &cluster))
}

/// A short, stable name for (store, cluster): the spool must never serve one store's or one
/// cluster's segments to a recovery that reads another.
fn spool_key(store: &str, cluster: &str) -> String {
    let digest = sha2::Sha256::digest(format!("{store}\n{cluster}").as_bytes());
    hex::encode(&digest[..8])
}

/// restore_command's own fast path, put before `wal-fetch`: a segment already in the spool
/// (`spool`, relative to the data directory, PostgreSQL's working directory) is renamed by the
/// shell, and this binary is not started at all. PostgreSQL waits for every call: on the
/// bench host a spool hit cost ~5 ms of CPU through gc-backup and ~2 ms through `mv` (its
/// shell included), and replay spent a fifth of its time waiting for restore_command. Anything else (not spooled, a history
/// file, a rename that fails) goes on to `wal-fetch`, so a failure here is never taken for
/// the end of the archive. The prefetcher notices taken segments itself.
pub fn shell_take(spool: &Path) -> Option<String> {
    let spool = spool.to_str()?;
    // Only names that need no quoting inside double quotes: ours are hex and slashes.
    let plain = spool
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"/._-".contains(&b));
    plain.then(|| format!("f={spool}/%f; [ -f \"$f\" ] && mv -f \"$f\" %p 2>/dev/null && exit 0; "))
}

/// Moves a prefetched `name` to `dest`. True if it was there.
pub fn take(dir: &Path, dest: &Path, name: &str) -> bool {
    std::fs::rename(dir.join(name), dest).is_ok()
}

/// Records that recovery asked for `name`, and removes spooled segments before it.
pub fn forget_before(dir: &Path, name: &str) {
    if dir.is_dir() {
        let _ = std::fs::write(dir.join(POSITION), name);
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
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
pub fn clear(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_name() != LOCK {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
}

/// Starts a detached prefetcher for the segments after `name` into the spool `dir`, unless
/// one is running there or prefetching is off (`GC_BACKUP_WAL_PREFETCH=0`).
pub fn start_behind(dir: &Path, name: &str, config: &crate::config::Config) {
    start(dir, name, config, None);
}

/// [`start_behind`], the prefetcher and its spool belonging to `owner` (uid, gid) when given.
fn start(dir: &Path, name: &str, config: &Config, owner: Option<(u32, u32)>) {
    if !matches!(WalFile::parse(name), Ok(WalFile::Segment { .. })) || !config.wal_prefetch {
        return;
    }
    if std::fs::create_dir_all(dir).is_err() || !take_lock(dir) {
        return;
    }
    if let Some((uid, gid)) = owner {
        // The spool's two directories and the lock, which the prefetcher writes its pid into.
        let chowned = [dir.parent(), Some(dir), Some(&dir.join(LOCK))]
            .into_iter()
            .flatten()
            .all(|path| std::os::unix::fs::chown(path, Some(uid), Some(gid)).is_ok());
        if !chowned {
            release_lock(dir);
            return;
        }
    }
    let Ok(exe) = std::env::current_exe() else {
        release_lock(dir);
        return;
    };
    let mut command = std::process::Command::new(exe);
    command
        .envs(config.child_env())
        .arg("wal-prefetch")
        .arg(name)
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // Its own process group: PostgreSQL's signals to restore_command do not reach it.
    std::os::unix::process::CommandExt::process_group(&mut command, 0);
    if let Some((uid, gid)) = owner {
        std::os::unix::process::CommandExt::uid(&mut command, uid);
        std::os::unix::process::CommandExt::gid(&mut command, gid);
    }
    if command.spawn().is_err() {
        release_lock(dir);
    }
}

/// Starts the prefetcher of a data directory about to recover (`restore pg --start`), before
/// its server asks for `first`: recovery's first segments are then spooled by the time it
/// asks, instead of each costing a download of its own while the prefetcher starts up.
pub fn start_before(pgdata: &Path, first: &str, store: &Store, config: &Config) {
    // The prefetcher fetches what follows the segment it is given.
    let Some(before) = segment_before(first) else {
        return;
    };
    // The server runs as PGDATA's owner, whose restore_command must be able to take spooled
    // segments out of the spool: root starts the prefetcher as that owner too.
    let owner = crate::host::running_as_root()
        .then(|| std::fs::metadata(pgdata).ok())
        .flatten()
        .map(|meta| (meta.uid(), meta.gid()))
        .filter(|(uid, _)| *uid != 0);
    let spool = spool_dir(&pgdata.join("pg_wal/RECOVERYXLOG"), store.name());
    start(&spool, &before, config, owner);
}

/// The segment before `name` on its timeline (none before the first, or for a file that is
/// not a segment).
fn segment_before(name: &str) -> Option<String> {
    let size = pitr::DEFAULT_SEGMENT_SIZE;
    let file = WalFile::parse(name).ok()?;
    let before = file.segment_no(size)?.0.checked_sub(1)?;
    Some(SegmentNo(before).file_name(file.timeline(), size))
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
                let alive = holder.is_some_and(crate::host::pid_alive);
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
    yield_to_replay();
    let result = prefetch(config, store, name, dir).await;
    if recovery_ended(dir) {
        // Promoted (or never in archive recovery): nobody will take these segments.
        let _ = std::fs::remove_dir_all(dir);
        if let Some(root) = dir.parent() {
            let _ = std::fs::remove_dir(root);
        }
    } else {
        release_lock(dir);
    }
    result
}

/// Lowers this process's CPU priority (nice 10). Replay is PostgreSQL's one startup process,
/// the critical path of a recovery; the prefetcher only has to stay a few segments ahead of it,
/// and on a node short of cores took CPU time the startup process was waiting for.
#[allow(unsafe_code)]
fn yield_to_replay() {
    // SAFETY: setpriority only changes this process's scheduling niceness; raising it needs no
    // privilege and cannot fail in a way that matters (the prefetcher then runs as before).
    let _ = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 10) };
}

/// Whether the data directory that holds the spool `dir` (`PGDATA/pg_wal/SPOOL_DIR/key`) has
/// left archive recovery: PostgreSQL removes its signal files when recovery ends.
fn recovery_ended(dir: &Path) -> bool {
    let pgdata = dir.join("../../..");
    !pgdata.join("recovery.signal").exists() && !pgdata.join("standby.signal").exists()
}

async fn prefetch(_config: &Config, store: &Store, name: &str, dir: &Path) -> anyhow::Result<()> {
    let file = WalFile::parse(name).map_err(|e| Failure::Config(e.to_string()))?;
    let size = pitr::DEFAULT_SEGMENT_SIZE;
    let timeline = file.timeline();
    let segment_of = |name: &str| match WalFile::parse(name) {
        Ok(file) if file.timeline() == timeline => file.segment_no(size),
        _ => None,
    };
    let start = file.segment_no(size).unwrap_or(SegmentNo(0));
    let mut next = start.next();
    let mut downloads = futures::stream::FuturesUnordered::new();
    let mut end_of_archive = false;
    let mut last_position = String::new();
    let mut moved = std::time::Instant::now();
    // Segments this prefetcher put in the spool and not yet seen taken.
    let mut spooled_by_us = std::collections::BTreeSet::new();
    let mut taken = start;
    loop {
        // Recovery may have fetched past us directly: never download what it has read.
        let position = std::fs::read_to_string(dir.join(POSITION)).unwrap_or_default();
        if position != last_position {
            last_position.clone_from(&position);
            moved = std::time::Instant::now();
        }
        // restore_command's shell takes spooled segments without writing the position: one
        // of ours that is gone was taken, so recovery has reached it.
        let before = taken;
        spooled_by_us.retain(|segment: &SegmentNo| {
            let there = dir.join(segment.file_name(timeline, size)).exists();
            if !there {
                taken = taken.max(*segment);
            }
            there
        });
        if taken != before {
            moved = std::time::Instant::now();
        }
        let current = segment_of(position.trim())
            .unwrap_or(start)
            .max(start)
            .max(taken);
        next = next.max(current.next());
        // Never more than AHEAD past recovery's position, even while downloads fail.
        let horizon = current.0 + AHEAD;
        let spooled = spooled_count(dir);
        while !end_of_archive
            && next.0 <= horizon
            && downloads.len() < PARALLEL
            && spooled + downloads.len() < AHEAD as usize
        {
            let number = next;
            let segment = number.file_name(timeline, size);
            next = next.next();
            let target = dir.join(&segment);
            if target.exists() {
                continue;
            }
            downloads.push(async move {
                // wal::fetch writes through a temporary name and renames: never a partial file.
                let result = wal::fetch(store, &segment, &target).await;
                let found = !result.as_ref().is_err_and(crate::error::is_not_found);
                (number, found, result.is_ok())
            });
        }
        if downloads.is_empty() {
            if end_of_archive || moved.elapsed() > IDLE {
                return Ok(());
            }
            tokio::time::sleep(POLL).await;
            continue;
        }
        tokio::select! {
            Some((segment, found, stored)) = downloads.next() => {
                end_of_archive |= !found;
                if stored {
                    spooled_by_us.insert(segment);
                }
            }
            () = tokio::time::sleep(POLL) => {}
        }
    }
}

/// Segments waiting in the spool.
fn spooled_count(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |entries| {
        entries
            .flatten()
            .filter(|e| e.file_name().len() == 24)
            .count()
    })
}

/// Stops the prefetcher of the data directory whose `pg_wal` is given, and removes its spool:
/// once the server that recovered from it is down, nothing may go on writing there.
pub fn stop_in(pg_wal: &Path) {
    let root = pg_wal.join(SPOOL_DIR);
    if let Ok(entries) = std::fs::read_dir(&root) {
        for entry in entries.flatten() {
            stop_prefetcher(&entry.path());
        }
    }
    let _ = std::fs::remove_dir_all(&root);
}

/// Kills the prefetcher that holds the lock of spool `dir`, if it is still ours.
fn stop_prefetcher(dir: &Path) {
    let holder = std::fs::read_to_string(dir.join(LOCK))
        .ok()
        .and_then(|text| text.trim().parse::<u32>().ok())
        .filter(|pid| *pid > 0 && i32::try_from(*pid).is_ok());
    // Only our own prefetcher: the pid must still be a gc-backup wal-prefetch.
    if let Some(pid) = holder.filter(|pid| crate::host::pid_runs(*pid, "wal-prefetch")) {
        let raw = nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap_or_default());
        let _ = nix::sys::signal::kill(raw, nix::sys::signal::Signal::SIGKILL);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while crate::host::pid_alive(pid) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_store_and_cluster_has_its_own_spool() {
        let a = spool_key("s3://backups/prod at https://minio:9000", "7301");
        assert_eq!(
            a,
            spool_key("s3://backups/prod at https://minio:9000", "7301")
        );
        assert_ne!(
            a,
            spool_key("s3://backups/prod at https://s3.amazonaws.com", "7301")
        );
        assert_ne!(
            a,
            spool_key("s3://backups/prod at https://minio:9000", "7302")
        );
        assert_eq!(a.len(), 16);
    }

    /// restore_command as PostgreSQL runs it: `%f`/`%p` substituted, `sh -c` in the data
    /// directory, with `exit 7` standing for the wal-fetch it falls through to.
    fn run_take(pgdata: &Path, name: &str, dest: &str) -> i32 {
        let command = shell_take(Path::new("pg_wal/gc-backup-prefetch/0123abcd"))
            .unwrap()
            .replace("%f", name)
            .replace("%p", dest)
            + "exit 7";
        std::process::Command::new("sh")
            .arg("-c")
            .arg(command)
            .current_dir(pgdata)
            .status()
            .unwrap()
            .code()
            .unwrap()
    }

    #[test]
    fn the_shell_takes_a_spooled_segment_and_leaves_everything_else_to_wal_fetch() {
        let pgdata = tempfile::tempdir().unwrap();
        let spool = pgdata.path().join("pg_wal/gc-backup-prefetch/0123abcd");
        std::fs::create_dir_all(&spool).unwrap();
        let segment = "000000010000000000000003";
        std::fs::write(spool.join(segment), b"segment three").unwrap();

        assert_eq!(run_take(pgdata.path(), segment, "pg_wal/RECOVERYXLOG"), 0);
        let restored = pgdata.path().join("pg_wal/RECOVERYXLOG");
        assert_eq!(std::fs::read(&restored).unwrap(), b"segment three");
        assert!(!spool.join(segment).exists(), "moved, not copied");
        // Taken once: the next call for it is wal-fetch's.
        assert_eq!(run_take(pgdata.path(), segment, "pg_wal/RECOVERYXLOG"), 7);
        assert_eq!(
            run_take(pgdata.path(), "00000002.history", "pg_wal/RECOVERYHISTORY"),
            7
        );
        // A rename that fails is wal-fetch's too, never an exit PostgreSQL would read as
        // "not in the archive".
        std::fs::write(spool.join(segment), b"again").unwrap();
        assert_eq!(
            run_take(pgdata.path(), segment, "no/such/dir/RECOVERYXLOG"),
            7
        );
        assert!(spool.join(segment).exists());
        // A spool path that would need quoting gets no shell path at all.
        assert_eq!(shell_take(Path::new("pg wal/x")), None);
        assert_eq!(shell_take(Path::new("pg_wal/$(rm)")), None);
    }

    #[test]
    fn a_prefetcher_started_before_recovery_begins_at_its_first_segment() {
        assert_eq!(
            segment_before("000000030000000100000000").as_deref(),
            Some("0000000300000000000000FF")
        );
        assert_eq!(
            segment_before("000000010000000000000007").as_deref(),
            Some("000000010000000000000006")
        );
        assert_eq!(segment_before("000000010000000000000000"), None);
        assert_eq!(segment_before("00000002.history"), None);
    }

    #[test]
    fn recovery_has_ended_when_the_signal_files_are_gone() {
        let pgdata = tempfile::tempdir().unwrap();
        let dir = pgdata.path().join("pg_wal").join(SPOOL_DIR).join("key");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(pgdata.path().join("recovery.signal"), "").unwrap();
        assert!(!recovery_ended(&dir));
        std::fs::remove_file(pgdata.path().join("recovery.signal")).unwrap();
        std::fs::write(pgdata.path().join("standby.signal"), "").unwrap();
        assert!(!recovery_ended(&dir));
        std::fs::remove_file(pgdata.path().join("standby.signal")).unwrap();
        assert!(recovery_ended(&dir));
    }
}
