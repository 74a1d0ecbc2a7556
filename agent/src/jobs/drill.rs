//! Restore drills (`verify --restore`, `[schedule] drill`): a backup restored into a temporary
//! directory and checked by its engine's own server or tool, timed from the first byte read to
//! the engine's answer: the RTO an SRE would see.
//!
//! A drill only reads the store. The PostgreSQL server it recovers with archives nothing (its
//! promotion must not reach the archive as a new timeline); the Redis server listens only on
//! a socket inside the directory and saves nothing; the directory goes when the drill ends,
//! however it ends (the servers are killed first).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context;
use pitr::{RecoveryTarget, TargetAction};
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

use super::restore_pg::{self, RestorePgReport, RestorePgRequest, StartOptions};
use crate::catalog::{BackupId, Kind, Selector};
use crate::config::Config;
use crate::error::Failure;
use crate::sources::redis::Session;
use crate::store::Store;

/// The kinds a drill restores, in the order a scheduled drill takes them.
pub const DRILLED: [Kind; 3] = [Kind::PgBase, Kind::Redis, Kind::Etcd];

/// How often a drill asks the Redis server it started whether it has loaded the data.
const REDIS_POLL: Duration = Duration::from_millis(50);

/// What a drill restored, what checked it, and how long it took.
#[derive(Debug)]
pub struct DrillReport {
    pub kind: Kind,
    pub backup: BackupId,
    /// From the first byte read from the store to the engine's answer on what was restored.
    pub rto: Duration,
    pub checked: Checked,
}

#[derive(Debug)]
pub enum Checked {
    /// Restored, recovered to the end of the archive, and run through pg_amcheck.
    Pg(Box<RestorePgReport>),
    /// Restored, then loaded by a temporary `redis-server`, which counted the keys.
    Redis {
        restore: Duration,
        raw_bytes: u64,
        server_version: String,
        /// `dump.rdb`, or the AOF set (what Redis loads when both are there).
        loaded: &'static str,
        keys: u64,
    },
    /// Restored, then `snapshot status` read it and `snapshot restore` (which checks etcd's
    /// own hash) built the data directory an etcd member starts from.
    Etcd {
        restore: Duration,
        raw_bytes: u64,
        tool: String,
        revision: u64,
        keys: u64,
    },
}

/// Restores the backup `selector` names of `kind` into a temporary directory, checks it, and
/// removes it all.
pub async fn drill(
    config: &Config,
    store: &Store,
    kind: Kind,
    selector: Selector,
    cancel: &CancellationToken,
) -> anyhow::Result<DrillReport> {
    match kind {
        Kind::PgBase => pg(config, store, selector, cancel).await,
        Kind::Redis => redis(store, selector, cancel).await,
        Kind::Etcd => etcd(store, selector, cancel).await,
        other => Err(not_drilled(other).into()),
    }
}

fn not_drilled(kind: Kind) -> Failure {
    Failure::Config(format!(
        "a restore drill restores pg-base, redis or etcd backups, not {kind}"
    ))
}

/// The program a drill of `kind` runs besides PostgreSQL's (whose major version is known only
/// from the backup), found on `PATH`: the sidecar refuses at start a drill it could never run.
pub fn tool(kind: Kind) -> Result<Option<PathBuf>, Failure> {
    let found = match kind {
        Kind::PgBase => return Ok(None),
        Kind::Redis => crate::host::on_path("redis-server"),
        Kind::Etcd => etcd_tool(),
        other => return Err(not_drilled(other)),
    };
    match found {
        Some(path) => Ok(Some(path)),
        None => Err(Failure::Config(match kind {
            Kind::Redis => "a redis drill loads the backup with redis-server, which is not on PATH (install redis-server)".into(),
            _ => "an etcd drill checks the snapshot with etcdutl (or etcdctl before etcd 3.5), and neither is on PATH".into(),
        })),
    }
}

/// `etcdutl` (etcd 3.5 and later), else `etcdctl`, whose `snapshot` commands 3.6 removed.
fn etcd_tool() -> Option<PathBuf> {
    crate::host::on_path("etcdutl").or_else(|| crate::host::on_path("etcdctl"))
}

fn scratch(kind: Kind) -> anyhow::Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix(&format!("gc-backup-drill-{kind}-"))
        .tempdir()
        .context("creating the drill's temporary directory (set TMPDIR to choose where)")
}

/// Restores `selector` to the end of the archive, recovers it with a temporary server that
/// archives nothing, runs pg_amcheck.
async fn pg(
    config: &Config,
    store: &Store,
    selector: Selector,
    cancel: &CancellationToken,
) -> anyhow::Result<DrillReport> {
    let scratch = scratch(Kind::PgBase)?;
    let pgdata: PathBuf = scratch.path().join("data");
    std::fs::create_dir(&pgdata).with_context(|| format!("creating {}", pgdata.display()))?;
    if crate::host::running_as_root() {
        let user = nix::unistd::User::from_name("postgres")
            .ok()
            .flatten()
            .ok_or_else(|| Failure::Config("a drill as root runs PostgreSQL as the user 'postgres', which does not exist here".into()))?;
        for path in [scratch.path(), pgdata.as_path()] {
            std::os::unix::fs::chown(path, Some(user.uid.as_raw()), Some(user.gid.as_raw()))
                .with_context(|| format!("changing the owner of {}", path.display()))?;
        }
    }
    let request = RestorePgRequest {
        pgdata,
        backup: selector,
        target: RecoveryTarget::Latest,
        action: TargetAction::Promote,
        timeline: None,
        archive_off: true,
        start: Some(StartOptions { amcheck: true }),
    };
    let started = Instant::now();
    let restore = restore_pg::restore(config, store, &request, cancel).await?;
    let rto = started.elapsed();
    drop(scratch);
    Ok(DrillReport {
        kind: Kind::PgBase,
        backup: restore.manifest.id.clone(),
        rto,
        checked: Checked::Pg(Box::new(restore)),
    })
}

async fn redis(
    store: &Store,
    selector: Selector,
    cancel: &CancellationToken,
) -> anyhow::Result<DrillReport> {
    let server = tool(Kind::Redis)?.unwrap_or_else(|| PathBuf::from("redis-server"));
    let scratch = scratch(Kind::Redis)?;
    let data = scratch.path().join("data");
    let started = Instant::now();
    let restored = super::redis::restore(store, &selector, &data, cancel).await?;
    let restore = started.elapsed();
    let id = restored.manifest.id.clone();
    let aof = match (&restored.aof_dir, &restored.manifest.source) {
        (Some(dir), crate::catalog::manifest::SourceFacts::Redis(facts)) => Some(AofSet {
            dirname: dir.file_name().map_or_else(
                || "appendonlydir".into(),
                |n| n.to_string_lossy().into_owned(),
            ),
            filename: facts
                .aof
                .as_ref()
                .and_then(|aof| aof.manifest_name.strip_suffix(".manifest"))
                .unwrap_or("appendonly.aof")
                .to_string(),
        }),
        _ => None,
    };
    let mut loading = TemporaryRedis::start(&server, scratch.path(), &data, aof.as_ref())?;
    let (server_version, keys) = tokio::select! {
        loaded = loading.wait_loaded() => loaded.with_context(|| format!("redis drill of backup {id}"))?,
        () = cancel.cancelled() => {
            return Err(Failure::Interrupted(format!("redis drill of backup {id} interrupted")).into());
        }
    };
    let rto = started.elapsed();
    drop(loading);
    Ok(DrillReport {
        kind: Kind::Redis,
        backup: id,
        rto,
        checked: Checked::Redis {
            restore,
            raw_bytes: restored.manifest.raw_bytes,
            server_version,
            loaded: if restored.aof_dir.is_some() {
                "the AOF set"
            } else {
                "dump.rdb"
            },
            keys,
        },
    })
}

/// Where a restored AOF set is, in Redis' terms.
struct AofSet {
    /// `appenddirname`, inside the data directory.
    dirname: String,
    /// `appendfilename`: the manifest's name without `.manifest`.
    filename: String,
}

/// A `redis-server` on restored files, reachable only through a socket in the drill's
/// directory, saving nothing; killed when dropped.
struct TemporaryRedis {
    child: tokio::process::Child,
    socket: PathBuf,
    log: PathBuf,
}

impl TemporaryRedis {
    fn start(
        server: &Path,
        scratch: &Path,
        data: &Path,
        aof: Option<&AofSet>,
    ) -> anyhow::Result<Self> {
        let socket = scratch.join("redis.sock");
        // sun_path holds 107 bytes and a NUL.
        if socket.as_os_str().len() > 107 {
            return Err(Failure::Config(format!(
                "the drill's socket path {} is too long for a Unix socket: set TMPDIR to a shorter directory",
                socket.display()
            ))
            .into());
        }
        let log = scratch.join("redis.log");
        let mut command = Command::new(server);
        command
            .args(["--port", "0", "--unixsocketperm", "700"])
            .arg("--unixsocket")
            .arg(&socket)
            .arg("--dir")
            .arg(data)
            .args(["--dbfilename", "dump.rdb", "--save", ""])
            .arg("--logfile")
            .arg(&log);
        match aof {
            Some(aof) => {
                command
                    .args(["--appendonly", "yes", "--appendfilename", &aof.filename])
                    .args(["--appenddirname", &aof.dirname])
                    // A damaged AOF fails the drill instead of loading what precedes the damage.
                    .args(["--aof-load-truncated", "no"]);
            }
            None => {
                command.args(["--appendonly", "no"]);
            }
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", server.display()))?;
        Ok(TemporaryRedis { child, socket, log })
    }

    /// Waits until the server has loaded the data and answers; its version and key count.
    async fn wait_loaded(&mut self) -> anyhow::Result<(String, u64)> {
        loop {
            if let Some(status) = self.child.try_wait().context("waiting for redis-server")? {
                return Err(Failure::Corrupt(format!(
                    "redis-server could not load what was restored ({status}): {}",
                    last_lines(&self.log, 3)
                ))
                .into());
            }
            if let Ok(mut session) = Session::open_socket(&self.socket).await {
                match ask(&mut session).await {
                    Ok(answer) => return Ok(answer),
                    // A server that stopped answering because it exited: its log says why.
                    Err(error) => {
                        let exited =
                            tokio::time::timeout(Duration::from_secs(2), self.child.wait()).await;
                        if exited.is_err() {
                            return Err(error.into());
                        }
                        continue;
                    }
                }
            }
            tokio::time::sleep(REDIS_POLL).await;
        }
    }
}

/// The server's version and, once it has loaded, its keys.
async fn ask(session: &mut Session) -> Result<(String, u64), crate::sources::SourceError> {
    let version = session.server_version().await?;
    loop {
        if let Some(keys) = session.loaded_keys().await? {
            return Ok((version, keys));
        }
        tokio::time::sleep(REDIS_POLL).await;
    }
}

/// The last `n` lines of a server's log, joined, for an error line.
fn last_lines(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    match lines.len() {
        0 => format!("nothing in {}", path.display()),
        len => lines[len.saturating_sub(n)..].join(" | "),
    }
}

async fn etcd(
    store: &Store,
    selector: Selector,
    cancel: &CancellationToken,
) -> anyhow::Result<DrillReport> {
    let tool = tool(Kind::Etcd)?.unwrap_or_else(|| PathBuf::from("etcdutl"));
    let scratch = scratch(Kind::Etcd)?;
    let snapshot = scratch.path().join("snapshot.db");
    let started = Instant::now();
    let restored = super::etcd::restore(store, &selector, &snapshot, cancel).await?;
    let restore = started.elapsed();
    let id = restored.manifest.id.clone();
    let checks = async {
        let status = run_tool(&tool, &["snapshot", "status"], &snapshot, &["-w", "json"]).await?;
        let status: SnapshotStatus = serde_json::from_str(status.trim())
            .with_context(|| format!("reading what `snapshot status` said: {}", status.trim()))?;
        let member = scratch.path().join("member.etcd");
        run_tool(
            &tool,
            &["snapshot", "restore"],
            &snapshot,
            &[
                "--data-dir",
                &member.to_string_lossy(),
                "--name",
                "drill",
                "--initial-cluster",
                "drill=http://127.0.0.1:2380",
                "--initial-advertise-peer-urls",
                "http://127.0.0.1:2380",
            ],
        )
        .await?;
        Ok::<_, anyhow::Error>(status)
    };
    let status = tokio::select! {
        status = checks => status.with_context(|| format!("etcd drill of backup {id}"))?,
        () = cancel.cancelled() => {
            return Err(Failure::Interrupted(format!("etcd drill of backup {id} interrupted")).into());
        }
    };
    let rto = started.elapsed();
    Ok(DrillReport {
        kind: Kind::Etcd,
        backup: id,
        rto,
        checked: Checked::Etcd {
            restore,
            raw_bytes: restored.manifest.raw_bytes,
            tool: tool
                .file_name()
                .map_or_else(|| "etcdutl".into(), |n| n.to_string_lossy().into_owned()),
            revision: status.revision,
            keys: status.total_key,
        },
    })
}

/// What `snapshot status -w json` prints.
#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct SnapshotStatus {
    revision: u64,
    total_key: u64,
}

/// Runs `tool` with `args`, the snapshot, then `more`; its standard output, or an error line
/// with the last thing it said.
async fn run_tool(
    tool: &Path,
    args: &[&str],
    snapshot: &Path,
    more: &[&str],
) -> anyhow::Result<String> {
    let output = Command::new(tool)
        .args(args)
        .arg(snapshot)
        .args(more)
        .env("ETCDCTL_API", "3")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .with_context(|| format!("running {}", tool.display()))?;
    if !output.status.success() {
        let said = String::from_utf8_lossy(&output.stderr);
        let said = said
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("no message");
        return Err(Failure::Corrupt(format!(
            "{} {} refused the snapshot ({}): {said}",
            tool.display(),
            args.join(" "),
            output.status
        ))
        .into());
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_status_is_read_from_etcds_json() {
        let status: SnapshotStatus = serde_json::from_str(
            r#"{"hash":2417543225,"revision":7,"totalKey":12,"totalSize":20480}"#,
        )
        .unwrap();
        assert_eq!((status.revision, status.total_key), (7, 12));
    }

    /// What redis-server cannot load fails the drill with the server's own last words.
    #[tokio::test]
    async fn a_snapshot_redis_cannot_load_fails_with_its_log() {
        let server = crate::host::on_path("redis-server")
            .expect("redis-server (scripts/test installs redis-server)");
        let scratch = tempfile::tempdir().unwrap();
        let data = scratch.path().join("data");
        std::fs::create_dir(&data).unwrap();
        std::fs::write(data.join("dump.rdb"), b"REDIS0010 not an rdb at all").unwrap();
        let mut redis = TemporaryRedis::start(&server, scratch.path(), &data, None).unwrap();
        let error = redis.wait_loaded().await.unwrap_err();
        let text = format!("{error:#}");
        assert!(text.starts_with("redis-server could not load"), "{text}");
        assert!(!text.contains("nothing in"), "the log was not read: {text}");
    }

    #[test]
    fn a_log_is_cut_to_its_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("redis.log");
        std::fs::write(&log, "one\n\ntwo\nthree\n").unwrap();
        assert_eq!(last_lines(&log, 2), "two | three");
        assert!(last_lines(&dir.path().join("none"), 2).starts_with("nothing in"));
    }
}
