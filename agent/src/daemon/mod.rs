//! The sidecar, `gc-backup run`: everything that runs beside PostgreSQL for months unattended.
//! Look-ahead WAL archiving ([`crate::wal::archiver`]) all the time; every backup kind and retention on
//! their cron schedules ([`schedule`]), restore drills too; metrics and health over HTTP ([`http`], [`metrics`]).
//!
//! Shutdown is a parameter: [`run`] returns once `shutdown` fires and the work in flight has
//! stopped (backups aborted with nothing committed, WAL uploads finished), so tests pass their
//! own token and SIGTERM is handled in `main`.

pub mod http;
pub mod metrics;
pub mod schedule;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use self::metrics::JobKind;
use crate::catalog::{self, Kind};
use crate::config::Config;
use crate::error::Failure;
use crate::store::{Store, StoreError};

/// How often the newest backup of each kind is read from the store for the metrics (backups
/// made elsewhere, like the etcd CronJob's, count too).
const CATALOG_REFRESH: Duration = Duration::from_secs(300);
/// How often the archiver's state is copied into the metrics.
const WAL_METRICS_EVERY: Duration = Duration::from_secs(5);
/// How long the start-up store check may take before the sidecar goes on without it.
const STORE_CHECK_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one readiness check may wait for the store or PostgreSQL.
const READY_TIMEOUT: Duration = Duration::from_secs(3);

pub async fn run(config: Config, store: Store, shutdown: CancellationToken) -> anyhow::Result<()> {
    let schedules = schedules(&config);
    refuse_what_cannot_run(&config, &schedules)?;
    let pgdata = config.postgres.pgdata.clone();
    let (config, plan) = plan_memory(config, &schedules)?;
    let backup_slots = Arc::new(tokio::sync::Semaphore::new(plan.backups_at_once));
    // A sidecar that only drills reads the store, and runs best with credentials that cannot
    // write (README, "Least privilege"): the start-up check's probes would write.
    let only_reads = pgdata.is_none()
        && config.postgres.stream.is_none()
        && schedules.iter().all(|(job, _)| *job == JobKind::Drill);
    let store = if only_reads {
        tracing::info!(
            "this sidecar only drills: it never writes to the store, whose write checks are skipped"
        );
        store
    } else {
        check_store(&config, store).await
    };
    let listener = tokio::net::TcpListener::bind(config.metrics_listen)
        .await
        .map_err(|e| Failure::Config(format!("cannot listen on {}: {e}", config.metrics_listen)))?;
    let address = listener
        .local_addr()
        .context("reading the HTTP listener's address")?;
    let handle = metrics::install()?;
    if config.schedule.drill.is_some() {
        metrics::register_drills(&config.drill);
    }
    let config = Arc::new(config);
    let uses_postgres = pgdata.is_some()
        || config.schedule.pg_dump.is_some()
        || config.schedule.pg_base.is_some()
        || config.postgres.stream.is_some();

    let mut tasks = JoinSet::new();
    let endpoints = Arc::new(http::Endpoints {
        metrics: handle,
        ready: readiness(config.clone(), store.clone(), uses_postgres),
    });
    tasks.spawn(http::serve(listener, endpoints, shutdown.clone()));
    tracing::info!(%address, "serving /metrics, /health and /health/ready");
    let scheduled: Vec<Kind> = schedules
        .iter()
        .filter_map(|(job, _)| job.backup_kind())
        .collect::<std::collections::BTreeSet<Kind>>()
        .into_iter()
        .collect();
    tasks.spawn(refresh_catalog(store.clone(), scheduled, shutdown.clone()));
    for (job, schedule) in schedules {
        tasks.spawn(schedule::run_on_schedule(
            job,
            schedule,
            config.clone(),
            store.clone(),
            backup_slots.clone(),
            shutdown.clone(),
        ));
    }
    if config.postgres.stream.is_some() {
        let status = Arc::new(Mutex::new(crate::wal::receiver::StreamStatus::default()));
        tasks.spawn(copy_stream_metrics(status.clone(), shutdown.clone()));
        let (config, store, shutdown) = (config.clone(), store.clone(), shutdown.clone());
        tasks.spawn(async move {
            if let Err(error) = crate::wal::receiver::run(&config, &store, status, shutdown).await {
                tracing::error!(error = %format!("{error:#}"), "WAL streaming stopped");
            }
        });
    }
    let mut archiver_result = Ok(());
    if let Some(pgdata) = pgdata {
        let status = Arc::new(Mutex::new(crate::wal::archiver::ArchiverStatus::default()));
        tasks.spawn(copy_wal_metrics(status.clone(), shutdown.clone()));
        archiver_result = crate::wal::archiver::run(
            config.clone(),
            store,
            pgdata,
            status,
            plan.wal_uploads,
            shutdown.clone(),
        )
        .await;
        if archiver_result.is_err() {
            // Without archiving the sidecar is useless: stop everything and say why.
            shutdown.cancel();
        }
    } else {
        shutdown.cancelled().await;
    }
    while tasks.join_next().await.is_some() {}
    archiver_result
}

/// The kinds with a `[schedule]` entry, with it.
fn schedules(config: &Config) -> Vec<(JobKind, crate::config::Schedule)> {
    [
        (JobKind::Backup(Kind::PgDump), &config.schedule.pg_dump),
        (JobKind::Backup(Kind::PgBase), &config.schedule.pg_base),
        (
            JobKind::IncrementalBase,
            &config.schedule.pg_base_incremental,
        ),
        (JobKind::Backup(Kind::Redis), &config.schedule.redis),
        (JobKind::Backup(Kind::Etcd), &config.schedule.etcd),
        (JobKind::Backup(Kind::Point), &config.schedule.mark),
        (JobKind::Drill, &config.schedule.drill),
        (JobKind::Retention, &config.schedule.retention),
    ]
    .into_iter()
    .filter_map(|(job, schedule)| schedule.clone().map(|s| (job, s)))
    .collect()
}

/// A scheduled kind that cannot run is a configuration error now, not a failure at 02:00.
fn refuse_what_cannot_run(
    config: &Config,
    schedules: &[(JobKind, crate::config::Schedule)],
) -> anyhow::Result<()> {
    let pgdata = config.postgres.pgdata.as_deref();
    if let Some(pgdata) = pgdata
        && !pgdata.join("pg_wal/archive_status").is_dir()
    {
        return Err(Failure::Config(format!(
            "{} has no pg_wal/archive_status: is it a PostgreSQL data directory?",
            pgdata.display()
        ))
        .into());
    }
    for (job, _) in schedules {
        match job {
            JobKind::Backup(Kind::Redis) => {
                config.redis.endpoint().context("schedule.redis is set")?;
            }
            JobKind::Backup(Kind::Etcd) => {
                config.etcd_endpoints().context("schedule.etcd is set")?;
            }
            JobKind::Backup(Kind::Point) => {
                config.redis.endpoint().context("schedule.mark is set")?;
            }
            JobKind::Drill => {
                if config.drill.kinds.is_empty() {
                    return Err(Failure::Config(
                        "schedule.drill is set but there is nothing to drill: the sidecar \
                         schedules no pg-base, redis or etcd backup; name them in [drill] kinds"
                            .into(),
                    )
                    .into());
                }
                for &kind in &config.drill.kinds {
                    crate::jobs::drill::tool(kind).context("schedule.drill is set")?;
                }
            }
            JobKind::Backup(Kind::PgBase) | JobKind::IncrementalBase if pgdata.is_none() => {
                return Err(Failure::Config(format!(
                    "schedule.{job} is set but the data directory is not: PGDATA or \
                     [postgres] pgdata"
                ))
                .into());
            }
            _ => {}
        }
    }
    if pgdata.is_none() && schedules.is_empty() && config.postgres.stream.is_none() {
        return Err(Failure::Config(
            "nothing to run: set the data directory (PGDATA or [postgres] pgdata) for WAL \
             archiving, [postgres] stream-wal, or a [schedule]"
                .into(),
        )
        .into());
    }
    Ok(())
}

/// One memory limit for the whole process: the archiver's segments first, then the backups,
/// whose pipeline settings are fitted to what is left.
fn plan_memory(
    mut config: Config,
    schedules: &[(JobKind, crate::config::Schedule)],
) -> anyhow::Result<(Config, crate::pipeline::budget::SidecarPlan)> {
    let backup_kinds = schedules
        .iter()
        .filter(|(job, _)| job.uses_memory())
        .count();
    let plan = crate::pipeline::budget::sidecar(
        config.pipeline.memory_limit,
        config.postgres.pgdata.is_some(),
        config.postgres.stream.is_some(),
        backup_kinds,
        pitr::DEFAULT_SEGMENT_SIZE as usize,
    )
    .map_err(Failure::Config)?;
    config.pipeline.memory_limit = plan.backup_limit;
    config.pipeline = crate::pipeline::budget::single(&config.pipeline, plan.backup_limit)
        .map_err(|e| Failure::Config(e.to_string()))?;
    tracing::info!(
        wal_uploads = plan.wal_uploads,
        backups_at_once = plan.backups_at_once,
        backup_limit = plan.backup_limit,
        "memory planned"
    );
    Ok((config, plan))
}

/// At start: what the store can do (`gc-backup check`'s store part), logged, and the store to
/// upload with (without part checksums if the store refused them). A store that does not
/// answer in time is used as configured: archiving must not wait for the check.
async fn check_store(config: &Config, store: Store) -> Store {
    use crate::jobs::check::{Status, store_checks};
    match tokio::time::timeout(STORE_CHECK_TIMEOUT, store_checks(config, &store)).await {
        Ok(found) => {
            for finding in &found.findings {
                let (check, detail) = (finding.check, finding.detail.as_str());
                match finding.status {
                    Status::Ok => tracing::info!(check, detail, "store check"),
                    Status::Warn => tracing::warn!(check, detail, "store check"),
                    Status::Fail => tracing::error!(check, detail, "store check"),
                }
            }
            found.adapted.unwrap_or(store)
        }
        Err(_) => {
            tracing::warn!(
                seconds = STORE_CHECK_TIMEOUT.as_secs(),
                "the store did not finish its start-up check in time; using it as configured"
            );
            store
        }
    }
}

/// The store answers (a HEAD of a key that need not exist), and PostgreSQL does when the
/// sidecar uses it.
fn readiness(config: Arc<Config>, store: Store, uses_postgres: bool) -> http::ReadinessCheck {
    Arc::new(move || {
        let (config, store) = (config.clone(), store.clone());
        Box::pin(async move {
            let probe = crate::catalog::layout::readiness_probe_key();
            match tokio::time::timeout(READY_TIMEOUT, store.head(&probe)).await {
                Ok(Ok(_) | Err(StoreError::NotFound { .. })) => {}
                Ok(Err(error)) => return Err(format!("store: {error}")),
                Err(_) => return Err(format!("store: no answer within {READY_TIMEOUT:?}")),
            }
            if uses_postgres {
                let facts = crate::sources::postgres::server_facts(&config.postgres);
                match tokio::time::timeout(READY_TIMEOUT, facts).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(error)) => return Err(format!("postgres: {error}")),
                    Err(_) => return Err(format!("postgres: no answer within {READY_TIMEOUT:?}")),
                }
            }
            Ok(())
        })
    })
}

/// Keeps `gc_backup_last_success_timestamp_seconds` true to the store: read at start-up (so a
/// restart does not reset it) and every few minutes. A `scheduled` kind with no backup at all
/// is exported as 0: without the series, `GcBackupMissing` could never fire for a kind that
/// has never once succeeded.
async fn refresh_catalog(store: Store, scheduled: Vec<Kind>, shutdown: CancellationToken) {
    loop {
        for kind in Kind::ALL {
            match catalog::newest(&store, kind, 1).await {
                Ok(newest) => match newest.first() {
                    Some(manifest) => metrics::last_success(kind, manifest.end_time),
                    None if scheduled.contains(&kind) => metrics::never_succeeded(kind),
                    None => {}
                },
                Err(error) => {
                    tracing::warn!(kind = %kind, %error, "cannot read the newest backup for the metrics");
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(CATALOG_REFRESH) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

async fn copy_stream_metrics(
    status: Arc<Mutex<crate::wal::receiver::StreamStatus>>,
    shutdown: CancellationToken,
) {
    loop {
        if let Ok(status) = status.lock() {
            metrics::wal_stream(&status);
        }
        tokio::select! {
            () = tokio::time::sleep(WAL_METRICS_EVERY) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

async fn copy_wal_metrics(
    status: Arc<Mutex<crate::wal::archiver::ArchiverStatus>>,
    shutdown: CancellationToken,
) {
    loop {
        if let Ok(status) = status.lock() {
            metrics::wal(status.last_archived_at, status.pending, status.failures);
        }
        metrics::peak_rss();
        tokio::select! {
            () = tokio::time::sleep(WAL_METRICS_EVERY) => {}
            () = shutdown.cancelled() => return,
        }
    }
}
