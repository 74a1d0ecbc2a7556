//! `restore pg --start`: recovery run to its end by a temporary server that cannot clash with
//! anything else on the host — no TCP listener, its socket in a private directory, its own
//! authentication file — watched through its log until the target is reached and the action
//! done, then stopped cleanly.
//!
//! The log is the source of truth because it is what PostgreSQL says about the recovery itself
//! (`recovery stopping before commit …`, `redo done at …`, `selected new timeline ID`), and it is
//! there even for the `shutdown` action, when no connection is possible. `lc_messages = 'C'`
//! keeps it in the English this parser reads.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use pitr::{RecoveryTarget, TargetAction};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio_util::sync::CancellationToken;

use crate::error::Failure;

/// The socket port of the temporary server: only a file name in its private directory.
const PORT: u16 = 5432;
/// How long an interrupted server gets before the next, harder, shutdown signal.
const GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct RecoveryOptions {
    /// Where `postgres` (and `pg_amcheck`) of the backup's major version are.
    pub bin_dir: PathBuf,
    pub target: RecoveryTarget,
    pub action: TargetAction,
    /// Run `pg_amcheck --all` as this role once the server accepts connections.
    pub amcheck_as: Option<String>,
    /// The server's major version: which settings it knows.
    pub major: u32,
    /// The restored cluster's size.
    pub data_bytes: u64,
}

/// Settings the temporary server recovers with, on top of the cluster's own. Given with `-c`
/// on its command line, so nothing of them stays in the cluster: it starts later with its own.
///
/// - `shared_buffers`: a quarter of what the container may use, at most 16 GiB: replay reads
///   every page it changes, and a page evicted between two changes is read again. Left to the
///   cluster when a quarter is below PostgreSQL's 128 MB default (a small container, the
///   drill in a sidecar): the server's memory counts against the same limit as ours.
/// - `max_wal_size`, `checkpoint_timeout` at their maxima: no restartpoint during replay (each
///   one writes every dirty buffer); the shutdown at the end writes them once.
/// - `fsync = off`: the server is ours until it stops; once it has, the data directory's file
///   system is flushed (`syncfs`) before the restore reports success. A host that crashes
///   during `--start` means restoring again, as it would without it.
/// - `recovery_prefetch` (15+): read ahead the blocks the next records need, only when the
///   cluster is larger than half the memory. The restore has just written every file, so a
///   smaller cluster is in the page cache and the read-ahead's system calls only cost: on the
///   bench cluster (2.9 GiB, 24 GiB of RAM) replay took 6.3 s without it, 8.6 s with it.
///   `wal_decode_buffer_size` (15+) and `maintenance_io_concurrency` let it look far ahead.
///
/// `GC_BACKUP_RECOVERY_SETTINGS` overrides: `none` for the cluster's own settings only, or
/// `name=value,…` added to (or replacing) these; the benchmark measures each this way.
pub fn tuning(
    major: u32,
    memory: Option<u64>,
    data_bytes: u64,
    overrides: Option<&str>,
) -> Vec<(String, String)> {
    const MB: u64 = 1024 * 1024;
    let quarter_mb = memory.map(|bytes| bytes / 4 / MB).filter(|mb| *mb >= 128);
    let mut settings: Vec<(String, String)> = quarter_mb
        .map(|mb| {
            (
                "shared_buffers".to_string(),
                format!("{}MB", mb.min(16 * 1024)),
            )
        })
        .into_iter()
        .collect();
    settings.extend([
        ("max_wal_size".into(), "1TB".into()),
        ("checkpoint_timeout".into(), "1d".into()),
        ("fsync".into(), "off".into()),
        ("maintenance_io_concurrency".into(), "64".into()),
    ]);
    if major >= 15 {
        let cached = memory.is_some_and(|memory| data_bytes < memory / 2);
        let prefetch = if cached { "off" } else { "on" };
        settings.push(("recovery_prefetch".into(), prefetch.into()));
        settings.push(("wal_decode_buffer_size".into(), "4MB".into()));
    }
    match overrides.map(str::trim) {
        Some("none") => Vec::new(),
        Some(list) if !list.is_empty() => {
            for item in list.split(',') {
                if let Some((name, value)) = item.split_once('=') {
                    let (name, value) = (name.trim().to_string(), value.trim().to_string());
                    settings.retain(|(n, _)| *n != name);
                    settings.push((name, value));
                }
            }
            settings
        }
        _ => settings,
    }
}

/// What recovery reached, from the server's own log.
#[derive(Debug, Clone, Default)]
pub struct RecoveryReport {
    /// PostgreSQL's "recovery stopping …" line, when a target stopped it.
    pub stopped: Option<String>,
    /// The LSN replay ended at.
    pub redo_done: Option<String>,
    /// The commit time of the last transaction replayed.
    pub last_transaction: Option<String>,
    /// The timeline the cluster is on when recovery ended (new after a promotion).
    pub timeline: Option<u32>,
    /// "promoted", "paused", or "shut down".
    pub action_done: String,
    pub segments_restored: u64,
    pub elapsed: Duration,
    /// pg_amcheck's summary, when it ran.
    pub amcheck: Option<String>,
}

/// What the log has said so far.
#[derive(Debug, Default)]
struct LogState {
    report: RecoveryReport,
    ready: bool,
    paused: bool,
    shutdown_at_target: bool,
    /// The timeline of the last WAL file restored: where recovery is without a promotion.
    restored_timeline: Option<u32>,
    last_fatal: Option<String>,
    last_fetch_error: Option<String>,
    tail: Vec<String>,
}

impl LogState {
    fn observe(&mut self, line: &str) {
        if self.tail.len() == 20 {
            self.tail.remove(0);
        }
        self.tail.push(line.to_string());
        // restore_command's own error line, which says why a WAL file could not be restored.
        if let Some(error) = line.strip_prefix("gc-backup: error: ") {
            self.last_fetch_error = Some(error.trim_end().to_string());
            return;
        }
        let Some((level, message)) = split_level(line) else {
            return;
        };
        if matches!(level, "FATAL" | "PANIC") {
            self.last_fatal = Some(message.to_string());
            return;
        }
        if level != "LOG" {
            return;
        }
        if message.starts_with("recovery stopping ") {
            self.report.stopped = Some(message.to_string());
        } else if let Some(rest) = message.strip_prefix("redo done at ") {
            self.report.redo_done = rest.split_whitespace().next().map(str::to_string);
        } else if let Some(rest) =
            message.strip_prefix("last completed transaction was at log time ")
        {
            self.report.last_transaction = Some(rest.to_string());
        } else if let Some(rest) = message.strip_prefix("selected new timeline ID: ") {
            self.report.timeline = rest.trim().parse().ok();
        } else if let Some(rest) = message.strip_prefix("restored log file \"") {
            self.report.segments_restored += 1;
            if let Some(Ok(file)) = rest.split('"').next().map(pitr::WalFile::parse) {
                self.restored_timeline = Some(file.timeline());
            }
        } else if message.starts_with("pausing at the end of recovery")
            || message.starts_with("recovery has paused")
        {
            self.paused = true;
        } else if message.starts_with("database system is ready to accept connections") {
            self.ready = true;
        } else if message.starts_with("shutdown at recovery target") {
            self.shutdown_at_target = true;
        }
    }

    fn reason(&self) -> String {
        let reason = self
            .last_fatal
            .clone()
            .or_else(|| self.tail.last().cloned())
            .unwrap_or_else(|| "no message".into());
        match &self.last_fetch_error {
            Some(fetch) if reason.contains("could not restore file") => {
                format!("{reason} (wal-fetch: {fetch})")
            }
            _ => reason,
        }
    }
}

/// `… LOG:  message` → ("LOG", "message"), whatever the line prefix.
fn split_level(line: &str) -> Option<(&str, &str)> {
    ["LOG", "FATAL", "PANIC", "ERROR", "WARNING"]
        .iter()
        .find_map(|level| {
            let marker = format!("{level}:  ");
            line.find(&marker)
                .map(|at| (*level, line[at + marker.len()..].trim_end()))
        })
}

/// The user the server must run as: the owner of `dir`. Root may start it as that user; nobody
/// may start it as root.
pub fn server_owner(dir: &Path) -> anyhow::Result<(u32, u32)> {
    let meta = std::fs::metadata(dir).with_context(|| format!("reading {}", dir.display()))?;
    if meta.uid() == 0 {
        return Err(Failure::Config(format!(
            "{} is owned by root, and PostgreSQL does not run as root: create it owned by the \
             database user (e.g. install -d -o postgres -m 700 {}) and run again",
            dir.display(),
            dir.display()
        ))
        .into());
    }
    if !crate::host::running_as_root() && meta.uid() != nix::unistd::getuid().as_raw() {
        return Err(Failure::Config(format!(
            "{} belongs to another user; run as its owner or as root",
            dir.display()
        ))
        .into());
    }
    Ok((meta.uid(), meta.gid()))
}

/// The server binaries of exactly `major`: a physical backup starts only on its own major.
pub fn server_bin_dir(configured: Option<&Path>, major: u32) -> anyhow::Result<PathBuf> {
    let dir = configured.map_or_else(
        || PathBuf::from(format!("/usr/lib/postgresql/{major}/bin")),
        Path::to_path_buf,
    );
    let postgres = dir.join("postgres");
    if !postgres.is_file() {
        return Err(Failure::Config(format!(
            "the backup is of PostgreSQL {major}, and {} has no postgres binary: install \
             PostgreSQL {major}'s server, or set GC_BACKUP_PG_BIN_DIR",
            dir.display()
        ))
        .into());
    }
    // A directory of another major would start and then refuse the data directory, after the
    // whole base backup was downloaded: ask the binary first.
    let output = std::process::Command::new(&postgres)
        .arg("--version")
        .output()
        .with_context(|| format!("running {} --version", postgres.display()))?;
    let text = String::from_utf8_lossy(&output.stdout);
    match version_major(&text) {
        Some(found) if found == major => Ok(dir),
        found => Err(Failure::Config(format!(
            "the backup is of PostgreSQL {major}, and {} is {}: point [postgres] bin-dir \
             (GC_BACKUP_PG_BIN_DIR) at PostgreSQL {major}'s server binaries",
            postgres.display(),
            found.map_or_else(
                || format!("{:?}", text.trim()),
                |m| format!("PostgreSQL {m}")
            )
        ))
        .into()),
    }
}

/// The major version in `postgres --version`'s "postgres (PostgreSQL) 17.10" (10 and later).
fn version_major(text: &str) -> Option<u32> {
    let version = text.split_whitespace().nth(2)?;
    version
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// Starts the server on `dir`, waits for the outcome, stops it.
pub async fn run(
    dir: &Path,
    options: &RecoveryOptions,
    cancel: &CancellationToken,
) -> anyhow::Result<RecoveryReport> {
    let started = Instant::now();
    let (uid, gid) = server_owner(dir)?;
    let private = tempfile::Builder::new()
        .prefix("gc-backup-recovery-")
        .tempdir()
        .context("creating the temporary server's socket directory")?;
    let socket_dir = private.path().to_path_buf();
    let hba = socket_dir.join("pg_hba.conf");
    std::fs::write(
        &hba,
        "# Only this private socket directory: trust its owner.\nlocal all all trust\n",
    )
    .with_context(|| format!("writing {}", hba.display()))?;
    // Root runs the server as DIR's owner, who must own its socket directory; anyone else
    // runs it as themselves and owns it already.
    if crate::host::running_as_root() {
        for path in [&socket_dir, &hba] {
            std::os::unix::fs::chown(path, Some(uid), Some(gid))
                .with_context(|| format!("changing the owner of {}", path.display()))?;
        }
    }
    std::fs::set_permissions(&socket_dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("setting the mode of {}", socket_dir.display()))?;

    let mut command = tokio::process::Command::new(options.bin_dir.join("postgres"));
    command.arg("-D").arg(dir);
    let fixed = [
        ("listen_addresses", String::new()),
        ("unix_socket_directories", socket_dir.display().to_string()),
        ("port", PORT.to_string()),
        ("hba_file", hba.display().to_string()),
        ("hot_standby", "on".into()),
        // Never archive from here: this server's promotion and its `.partial` must not reach
        // the archive before someone starts the cluster for real (it may be an inspection
        // copy). Archiving stays on with no command, so PostgreSQL still marks the new
        // timeline's history file and the rest `.ready` and the cluster's own
        // `archive_command` archives them when it starts; a cluster with archiving off never
        // looks at the marks.
        ("archive_mode", "on".into()),
        ("archive_command", String::new()),
        ("lc_messages", "C".into()),
        ("logging_collector", "off".into()),
        ("log_destination", "stderr".into()),
        ("log_min_messages", "warning".into()),
        ("log_line_prefix", "%m [%p] ".into()),
    ];
    let tuned = tuning(
        options.major,
        crate::host::memory_bytes(),
        options.data_bytes,
        std::env::var("GC_BACKUP_RECOVERY_SETTINGS").ok().as_deref(),
    );
    let fsync_off = tuned.iter().any(|(n, v)| n == "fsync" && v == "off");
    tracing::debug!(?tuned, "recovery settings");
    // 15+ may archive through a library instead; both empty is "not configured" there.
    let no_library = (options.major >= 15).then(|| ("archive_library", String::new()));
    let fixed = fixed
        .into_iter()
        .chain(no_library)
        .map(|(name, value)| (name.to_string(), value));
    for (name, value) in fixed.chain(tuned) {
        command.arg("-c").arg(format!("{name}={value}"));
    }
    command
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        // Ctrl-C reaches us, not the server: we stop it, in order.
        .process_group(0)
        .kill_on_drop(true);
    if crate::host::running_as_root() {
        command.uid(uid).gid(gid);
    }
    let mut child = command
        .spawn()
        .with_context(|| format!("starting {}", options.bin_dir.join("postgres").display()))?;
    let pid = child
        .id()
        .and_then(|id| i32::try_from(id).ok())
        .map(Pid::from_raw)
        .context("the server exited at once")?;
    let stderr = child.stderr.take().context("no stderr pipe")?;
    // The log is read on its own task so that the server never blocks on a full pipe, even
    // while pg_amcheck runs; it publishes only "ready" and "paused", which never waits.
    let (events_tx, mut events) = tokio::sync::watch::channel((false, false));
    // Shared, because the pipe can outlive the server: restore_command's children inherit it.
    let log = std::sync::Arc::new(std::sync::Mutex::new(LogState::default()));
    let reader_log = log.clone();
    let reader = tokio::spawn(async move {
        let mut lines = BufReader::new(stderr).split(b'\n');
        while let Ok(Some(bytes)) = lines.next_segment().await {
            let line = String::from_utf8_lossy(&bytes);
            tracing::debug!(target: "postgres", "{line}");
            let Ok(mut state) = reader_log.lock() else {
                break;
            };
            let before = state.report.segments_restored;
            state.observe(&line);
            let restored = state.report.segments_restored;
            if restored != before && restored % 64 == 0 {
                tracing::info!(segments = restored, "replaying archived WAL");
            }
            let now = (state.ready, state.paused);
            drop(state);
            events_tx.send_if_modified(|flags| {
                let changed = *flags != now;
                *flags = now;
                changed
            });
        }
    });
    let mut stopping = false;
    let mut interrupted = false;
    let mut log_open = true;
    let mut amcheck_report = None;
    let stop = |pid: Pid| kill(pid, Signal::SIGINT);
    // After SIGTERM: a fast shutdown first; a server that has not stopped after GRACE (its
    // startup process can sit in restore_command, waiting on a store that does not answer)
    // gets an immediate shutdown, which is harmless for a cluster still in recovery.
    let escalation = tokio::time::sleep(Duration::MAX);
    tokio::pin!(escalation);
    let mut escalations = [Signal::SIGQUIT, Signal::SIGKILL].into_iter();
    let status = loop {
        tokio::select! {
            status = child.wait() => break status.context("waiting for the server")?,
            changed = events.changed(), if !stopping && log_open => {
                log_open = changed.is_ok();
                let (ready, paused) = *events.borrow_and_update();
                if !(ready || paused) {
                    continue;
                }
                if ready && let Some(role) = &options.amcheck_as {
                    amcheck_report = Some(amcheck(&options.bin_dir, &socket_dir, role).await);
                }
                stopping = true;
                let _ = stop(pid);
            }
            () = cancel.cancelled(), if !interrupted => {
                interrupted = true;
                stopping = true;
                let _ = stop(pid);
                escalation.as_mut().reset(tokio::time::Instant::now() + GRACE);
            }
            () = &mut escalation, if interrupted => {
                match escalations.next() {
                    Some(signal) => {
                        tracing::warn!(?signal, "the recovery server did not stop; escalating");
                        let _ = kill(pid, signal);
                        escalation.as_mut().reset(tokio::time::Instant::now() + GRACE);
                    }
                    None => escalation.as_mut().reset(tokio::time::Instant::now() + Duration::from_secs(3600)),
                }
            }
        }
    };
    if interrupted {
        // restore_command's shell and wal-fetch are still in the server's process group.
        let _ = kill(Pid::from_raw(-pid.as_raw()), Signal::SIGKILL);
    }
    // The server's last lines are in the pipe; a straggler holding it open is not waited for.
    let _ = tokio::time::timeout(Duration::from_secs(2), reader).await;
    let mut state = std::mem::take(
        &mut *log
            .lock()
            .map_err(|_| anyhow::anyhow!("the log reader failed"))?,
    );
    state.report.amcheck = amcheck_report;
    if fsync_off {
        // Everything the server wrote without fsync reaches the disk before we say it is done.
        let flushing = Instant::now();
        flush_file_system(dir)?;
        tracing::info!(
            elapsed_ms = flushing.elapsed().as_millis(),
            "the restored cluster's file system flushed to disk"
        );
    }
    state.report.elapsed = started.elapsed();
    if interrupted {
        return Err(Failure::Interrupted(format!(
            "recovery interrupted; the server on {} was stopped",
            dir.display()
        ))
        .into());
    }
    judge(state, status.success(), stopping, options)
}

/// Flushes the file system that holds `dir` (syncfs: one call, whatever the number of files).
fn flush_file_system(dir: &Path) -> anyhow::Result<()> {
    let handle = std::fs::File::open(dir).with_context(|| format!("opening {}", dir.display()))?;
    nix::unistd::syncfs(&handle)
        .with_context(|| format!("flushing the file system of {} to disk", dir.display()))
}

/// Exit 0 only when the target was reached and the action done.
fn judge(
    state: LogState,
    exited_cleanly: bool,
    we_stopped_it: bool,
    options: &RecoveryOptions,
) -> anyhow::Result<RecoveryReport> {
    let mut report = state.report.clone();
    report.timeline = report.timeline.or(state.restored_timeline);
    let has_target = options.target != RecoveryTarget::Latest;
    let action_done = if state.shutdown_at_target {
        "shut down"
    } else if state.paused {
        "paused"
    } else if state.ready {
        "promoted"
    } else {
        ""
    };
    let reached = !has_target || report.stopped.is_some();
    let finished = exited_cleanly && (we_stopped_it || state.shutdown_at_target);
    if !action_done.is_empty() && reached && finished {
        if let Some(amcheck) = &report.amcheck
            && !amcheck.starts_with("ok")
        {
            anyhow::bail!("pg_amcheck found problems in the recovered cluster: {amcheck}");
        }
        report.action_done = action_done.to_string();
        return Ok(report);
    }
    let reason = state.reason();
    if reason.contains("recovery ended before configured recovery target was reached") {
        // Where a transaction or restore point lies cannot be known before replay.
        let hint = match options.target {
            RecoveryTarget::Xid(_) | RecoveryTarget::Name(_) => {
                "; if the target lies before the base backup, name an older one with --backup"
            }
            _ => "",
        };
        anyhow::bail!(
            "recovery ended before reaching the target {}: the archive ends at {} (last \
             transaction {}); the data directory is left as recovery left it{hint}",
            options.target,
            report.redo_done.as_deref().unwrap_or("an unknown LSN"),
            report.last_transaction.as_deref().unwrap_or("unknown"),
        );
    }
    anyhow::bail!("the recovery server stopped before recovery finished: {reason}")
}

/// Runs pg_amcheck on every database; "ok" or the end of its report.
async fn amcheck(bin_dir: &Path, socket_dir: &Path, role: &str) -> String {
    let output = tokio::process::Command::new(bin_dir.join("pg_amcheck"))
        .arg("--host")
        .arg(socket_dir)
        .args(["--port", &PORT.to_string(), "--username", role])
        .args([
            "--all",
            "--install-missing",
            "--heapallindexed",
            "--no-password",
        ])
        .stdin(Stdio::null())
        .output()
        .await;
    match output {
        Ok(output) if output.status.success() => {
            "ok: every relation of every database checked".into()
        }
        Ok(output) => {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
            let lines: Vec<&str> = text.lines().rev().take(5).collect();
            format!(
                "failed: {}",
                lines.into_iter().rev().collect::<Vec<_>>().join(" / ")
            )
        }
        Err(error) => format!("failed: cannot run pg_amcheck: {error}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state_after(lines: &[&str]) -> LogState {
        let mut state = LogState::default();
        for line in lines {
            state.observe(line);
        }
        state
    }

    fn options(target: RecoveryTarget) -> RecoveryOptions {
        RecoveryOptions {
            bin_dir: PathBuf::new(),
            target,
            action: TargetAction::Promote,
            amcheck_as: None,
            major: 15,
            data_bytes: 0,
        }
    }

    #[test]
    fn recovery_settings_fit_the_host_and_the_major_and_can_be_overridden() {
        let gib = 1024 * 1024 * 1024;
        let value = |settings: &[(String, String)], name: &str| {
            settings
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.clone())
        };
        let big = tuning(17, Some(24 * gib), 3 * gib, None);
        assert_eq!(value(&big, "shared_buffers").as_deref(), Some("6144MB"));
        // In the page cache after the restore: no read-ahead; larger than memory: read ahead.
        assert_eq!(value(&big, "recovery_prefetch").as_deref(), Some("off"));
        let huge = tuning(17, Some(24 * gib), 100 * gib, None);
        assert_eq!(value(&huge, "recovery_prefetch").as_deref(), Some("on"));
        let most = tuning(17, Some(256 * gib), 0, None);
        assert_eq!(value(&most, "shared_buffers").as_deref(), Some("16384MB"));
        // A small container: the cluster's own setting, not more than it can hold.
        let least = tuning(17, Some(gib / 4), 0, None);
        assert_eq!(value(&least, "shared_buffers"), None);
        assert_eq!(value(&tuning(17, None, 0, None), "shared_buffers"), None);
        // 13 and 14 know neither setting: the server would refuse to start.
        let old = tuning(13, None, 0, None);
        assert_eq!(value(&old, "recovery_prefetch"), None);
        assert_eq!(value(&old, "wal_decode_buffer_size"), None);
        assert!(tuning(17, None, 0, Some("none")).is_empty());
        let custom = tuning(17, None, 0, Some("fsync=on, shared_buffers=1GB"));
        assert_eq!(value(&custom, "fsync").as_deref(), Some("on"));
        assert_eq!(value(&custom, "shared_buffers").as_deref(), Some("1GB"));
        assert_eq!(custom.iter().filter(|(n, _)| n == "fsync").count(), 1);
    }

    const PROMOTED: &[&str] = &[
        "2026-11-28 16:00:00.001 UTC [7] LOG:  starting point-in-time recovery to 2026-11-28 15:59:00+00",
        "2026-11-28 16:00:00.002 UTC [7] LOG:  restored log file \"000000010000000000000005\" from archive",
        "2026-11-28 16:00:00.003 UTC [7] LOG:  consistent recovery state reached at 0/5000100",
        "2026-11-28 16:00:00.004 UTC [7] LOG:  recovery stopping before commit of transaction 745, time 2026-11-28 15:59:01.5+00",
        "2026-11-28 16:00:00.005 UTC [7] LOG:  redo done at 0/6000A28 system usage: CPU: user: 0.00 s",
        "2026-11-28 16:00:00.006 UTC [7] LOG:  last completed transaction was at log time 2026-11-28 15:58:59.9+00",
        "2026-11-28 16:00:00.007 UTC [7] LOG:  selected new timeline ID: 2",
        "2026-11-28 16:00:00.008 UTC [7] LOG:  archive recovery complete",
        "2026-11-28 16:00:00.009 UTC [6] LOG:  database system is ready to accept connections",
    ];

    #[test]
    fn a_promotion_at_the_target_is_read_from_the_log() {
        let state = state_after(PROMOTED);
        let time = pitr::target::parse_time("2026-11-28 15:59:00+00").unwrap();
        let report = judge(state, true, true, &options(RecoveryTarget::Time(time))).unwrap();
        assert_eq!(report.action_done, "promoted");
        assert_eq!(report.redo_done.as_deref(), Some("0/6000A28"));
        assert_eq!(report.timeline, Some(2));
        assert_eq!(report.segments_restored, 1);
        assert!(report.stopped.unwrap().contains("transaction 745"));
        assert_eq!(
            report.last_transaction.as_deref(),
            Some("2026-11-28 15:58:59.9+00")
        );
    }

    #[test]
    fn recovery_that_ends_early_is_a_failure_said_plainly() {
        let state = state_after(&[
            "2026-11-28 16:00:00.002 UTC [7] LOG:  restored log file \"000000010000000000000005\" from archive",
            "2026-11-28 16:00:00.005 UTC [7] LOG:  redo done at 0/6000A28 system usage: CPU: user: 0.00 s",
            "2026-11-28 16:00:00.006 UTC [7] FATAL:  recovery ended before configured recovery target was reached",
            "2026-11-28 16:00:00.007 UTC [6] LOG:  startup process (PID 7) exited with exit code 1",
        ]);
        let error = judge(state, false, false, &options(RecoveryTarget::Xid(99))).unwrap_err();
        let text = error.to_string();
        assert!(
            text.contains("before reaching the target transaction 99"),
            "{text}"
        );
        assert!(text.contains("0/6000A28"), "{text}");
    }

    #[test]
    fn a_promotion_without_the_target_line_is_not_success() {
        // PostgreSQL before 13 promoted at the end of WAL even with a target set.
        let lines: Vec<&str> = PROMOTED
            .iter()
            .copied()
            .filter(|l| !l.contains("recovery stopping"))
            .collect();
        let state = state_after(&lines);
        assert!(judge(state, true, true, &options(RecoveryTarget::Xid(745))).is_err());
        let state = state_after(&lines);
        assert!(judge(state, true, true, &options(RecoveryTarget::Latest)).is_ok());
    }

    #[test]
    fn the_shutdown_action_and_a_crash_are_told_apart() {
        let mut lines = PROMOTED[..5].to_vec();
        lines.push("2026-11-28 16:00:00.009 UTC [6] LOG:  shutdown at recovery target");
        let target = RecoveryTarget::Lsn("0/6000A28".parse().unwrap());
        let report = judge(state_after(&lines), true, false, &options(target.clone())).unwrap();
        assert_eq!(report.action_done, "shut down");
        let crashed = state_after(&[
            "2026-11-28 16:00:00.002 UTC [7] FATAL:  could not open file \"pg_wal/x\": Permission denied",
        ]);
        let unreachable = state_after(&[
            "gc-backup: error: fetching 00000002.history failed: s3://b is unreachable",
            "2026-11-28 16:00:00.002 UTC [7] FATAL:  could not restore file \"00000002.history\" from archive: child process exited with exit code 255",
        ]);
        let error = judge(unreachable, false, false, &options(RecoveryTarget::Latest)).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("(wal-fetch: fetching 00000002.history failed: s3://b is unreachable)"),
            "{error}"
        );
        let error = judge(crashed, false, false, &options(target)).unwrap_err();
        assert!(error.to_string().contains("Permission denied"), "{error}");
    }

    #[test]
    fn the_major_is_read_from_postgres_version() {
        assert_eq!(version_major("postgres (PostgreSQL) 17.10\n"), Some(17));
        assert_eq!(
            version_major("postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)\n"),
            Some(15)
        );
        assert_eq!(version_major("postgres (PostgreSQL) 18beta1"), Some(18));
        assert_eq!(version_major("nonsense"), None);
    }
}
