//! Cron scheduling like a Kubernetes CronJob with `concurrencyPolicy: Forbid`: one task per
//! scheduled kind; at each time the schedule names, a run starts unless the previous run of
//! the same kind is still going, in which case the time is counted as skipped. Kinds run
//! independently: one that fails or hangs does not hold back the others.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::metrics::{self, JobKind, RunResult};

use crate::catalog::{Kind, Selector};
use crate::config::{Config, Schedule};
use crate::jobs;
use crate::store::Store;

/// How long a run may take to stop after SIGTERM before the daemon stops waiting for it.
pub const STOP_GRACE: Duration = Duration::from_secs(10);

/// Runs `job` on `schedule` until `shutdown`; then cancels the run in flight and waits for it
/// (at most [`STOP_GRACE`]).
///
/// A backup takes one of `backup_slots` first: the memory limit holds only so many backups at
/// once, and a run that has to wait for one still runs (it is not skipped).
pub async fn run_on_schedule(
    job: JobKind,
    schedule: Schedule,
    config: Arc<Config>,
    store: Store,
    backup_slots: Arc<tokio::sync::Semaphore>,
    shutdown: CancellationToken,
) {
    metrics::register(job);
    tracing::info!(kind = %job, schedule = %schedule.expression, "scheduled");
    let runs = shutdown.child_token();
    let mut running: Option<JoinHandle<()>> = None;
    loop {
        let Some(next) = schedule.next_after(Utc::now()) else {
            tracing::error!(kind = %job, schedule = %schedule.expression, "the schedule has no next time");
            break;
        };
        let wait = (next - Utc::now()).to_std().unwrap_or_default();
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = shutdown.cancelled() => break,
        }
        if running.as_ref().is_some_and(|run| !run.is_finished()) {
            tracing::warn!(kind = %job, "skipped: the previous run is still going");
            metrics::run_finished(job, RunResult::Skipped, 0.0);
            continue;
        }
        let (config, store, cancel) = (config.clone(), store.clone(), runs.child_token());
        let slots = backup_slots.clone();
        running = Some(tokio::spawn(async move {
            let _slot = match job.uses_memory() {
                true => tokio::select! {
                    slot = slots.acquire_owned() => slot.ok(),
                    () = cancel.cancelled() => return,
                },
                false => None,
            };
            run_once(job, &config, &store, &cancel).await;
        }));
    }
    runs.cancel();
    if let Some(run) = running
        && tokio::time::timeout(STOP_GRACE, run).await.is_err()
    {
        tracing::warn!(kind = %job, "the run in flight did not stop in time");
    }
}

/// Held by the base backup in flight: the full and the incremental schedules share it, so that
/// one of them coming round while the other runs is skipped, as a second run of one kind is.
static BASE_BACKUP: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Held by each backup of a kind a drill restores, and by that drill: a drill never runs
/// beside a backup of its kind (they would compete for the node, the store and the memory
/// limit, and the drill would time what it shared). Each waits for the other to finish; a
/// backup is never skipped for a drill.
static BUSY: std::sync::LazyLock<[Arc<tokio::sync::Mutex<()>>; 3]> =
    std::sync::LazyLock::new(Default::default);

fn busy(kind: Kind) -> Option<Arc<tokio::sync::Mutex<()>>> {
    let index = match kind {
        Kind::PgBase => 0,
        Kind::Redis => 1,
        Kind::Etcd => 2,
        Kind::PgDump | Kind::Point => return None,
    };
    Some(BUSY[index].clone())
}

/// The kinds a backup job writes that a drill restores (a point takes a Redis backup and an
/// etcd snapshot).
fn drilled_kinds_written(job: JobKind, config: &Config) -> Vec<Kind> {
    match job.backup_kind() {
        Some(Kind::Point) if config.etcd.urls.is_empty() => vec![Kind::Redis],
        Some(Kind::Point) => vec![Kind::Redis, Kind::Etcd],
        Some(kind) => vec![kind],
        None => Vec::new(),
    }
}

/// Takes `kind`'s lock, waiting (and saying so) while a backup or drill of it holds it;
/// `None` when cancelled.
async fn hold(
    kind: Kind,
    job: JobKind,
    cancel: &CancellationToken,
) -> Option<Option<tokio::sync::OwnedMutexGuard<()>>> {
    let Some(lock) = busy(kind) else {
        return Some(None);
    };
    if let Ok(guard) = lock.clone().try_lock_owned() {
        return Some(Some(guard));
    }
    tracing::info!(kind = %job, busy = %kind, "waiting: a {kind} backup or drill is running");
    tokio::select! {
        guard = lock.lock_owned() => Some(Some(guard)),
        () = cancel.cancelled() => None,
    }
}

/// One run, with its outcome logged (one line) and recorded in the metrics.
pub async fn run_once(job: JobKind, config: &Config, store: &Store, cancel: &CancellationToken) {
    let started = Instant::now();
    let _base = match job.backup_kind() {
        Some(Kind::PgBase) => match BASE_BACKUP.try_lock() {
            Ok(guard) => Some(guard),
            Err(_) => {
                tracing::warn!(kind = %job, "skipped: another base backup is still going");
                metrics::run_finished(job, RunResult::Skipped, 0.0);
                return;
            }
        },
        _ => None,
    };
    let mut _busy = Vec::new();
    for kind in drilled_kinds_written(job, config) {
        match hold(kind, job, cancel).await {
            Some(guard) => _busy.push(guard),
            // Shut down while waiting: nothing ran.
            None => return,
        }
    }
    let outcome = match job.backup_kind() {
        None if job == JobKind::Drill => drills(config, store, cancel).await,
        Some(kind) => {
            let request = match job {
                JobKind::IncrementalBase => {
                    jobs::backup::BackupRequest::PgBase { incremental: true }
                }
                _ => jobs::backup::BackupRequest::scheduled(kind),
            };
            jobs::backup::backup(config, store, &request, cancel)
                .await
                .map(|manifest| {
                    metrics::backup_stored(
                        kind,
                        manifest.raw_bytes,
                        manifest.stored_bytes,
                        manifest.end_time,
                    );
                })
        }
        None => {
            let report = tokio::select! {
                report = jobs::retention::run(store, config.store.location.s3(), &config.retention, Utc::now(), false) => report,
                () = cancel.cancelled() => Err(anyhow::anyhow!("retention interrupted")),
            };
            report.map(|report| {
                tracing::info!(
                    deleted_backups = report.deleted_backups.values().sum::<usize>(),
                    deleted_objects = report.deleted_objects,
                    deleted_wal = report.deleted_wal,
                    aborted_uploads = report.stale_uploads.len(),
                    "retention completed"
                );
                metrics::retention_done(&report.deleted_backups);
            })
        }
    };
    let seconds = started.elapsed().as_secs_f64();
    metrics::peak_rss();
    match outcome {
        Ok(()) => metrics::run_finished(job, RunResult::Success, seconds),
        // Shutdown stopped it (nothing was committed): not a failure to alert on.
        Err(error) if cancel.is_cancelled() => {
            tracing::warn!(kind = %job, error = format!("{error:#}"), "run interrupted by shutdown");
        }
        Err(error) => {
            tracing::error!(kind = %job, error = format!("{error:#}"), "run failed");
            metrics::run_finished(job, RunResult::Failure, seconds);
        }
    }
}

/// A restore drill of the newest backup of each `[drill]` kind, one after the other, each
/// holding its kind's lock; a kind that fails does not stop the others.
async fn drills(config: &Config, store: &Store, cancel: &CancellationToken) -> anyhow::Result<()> {
    let mut failed = Vec::new();
    for kind in config.drill.kinds.clone() {
        let Some(_busy) = hold(kind, JobKind::Drill, cancel).await else {
            anyhow::bail!("drills interrupted");
        };
        match jobs::drill::drill(config, store, kind, Selector::Latest, cancel).await {
            Ok(report) => {
                tracing::info!(
                    kind = %kind,
                    backup = %report.backup,
                    rto_seconds = report.rto.as_secs_f64(),
                    "restore drill passed"
                );
                metrics::drill_succeeded(kind, report.rto);
            }
            // Stopped by SIGTERM: not a verdict on the backup.
            Err(error) if cancel.is_cancelled() => {
                return Err(error.context(format!("the {kind} drill was interrupted")));
            }
            Err(error) => {
                tracing::error!(kind = %kind, error = format!("{error:#}"), "restore drill failed");
                metrics::drill_failed(kind);
                failed.push(kind.to_string());
            }
        }
    }
    match failed.is_empty() {
        true => Ok(()),
        false => Err(anyhow::anyhow!(
            "restore drills failed: {}",
            failed.join(", ")
        )),
    }
}
