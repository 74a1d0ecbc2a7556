//! Every metric `gc-backup run` exports, named here and nowhere else. Labels are bounded:
//! `kind` is a backup kind, `pg-base-incremental`, `drill` or `retention`, `result` one of
//! three, `stage` two.

use chrono::{DateTime, Utc};
use metrics::{Unit, counter, describe_counter, describe_gauge, gauge};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::catalog::Kind;

pub const LAST_SUCCESS: &str = "gc_backup_last_success_timestamp_seconds";
pub const PEAK_RSS: &str = "gc_backup_peak_rss_bytes";
pub const LAST_FAILURE: &str = "gc_backup_last_failure_timestamp_seconds";
pub const RUNS: &str = "gc_backup_runs_total";
pub const DURATION: &str = "gc_backup_duration_seconds";
pub const BYTES: &str = "gc_backup_bytes_total";
pub const LAST_SIZE: &str = "gc_backup_last_size_bytes";
pub const WAL_LAST_ARCHIVED: &str = "gc_backup_wal_last_archived_timestamp_seconds";
pub const WAL_PENDING: &str = "gc_backup_wal_pending_segments";
pub const WAL_FAILURES: &str = "gc_backup_wal_archive_failures_total";
pub const STREAM_UP: &str = "gc_backup_wal_stream_up";
pub const STREAM_LAG: &str = "gc_backup_wal_stream_lag_bytes";
pub const STREAM_STORED: &str = "gc_backup_wal_stream_stored_position_bytes";
pub const STREAM_LAST_FLUSH: &str = "gc_backup_wal_stream_last_flush_timestamp_seconds";
pub const STREAM_FAILURES: &str = "gc_backup_wal_stream_failures_total";
pub const STREAM_GAPS: &str = "gc_backup_wal_stream_gaps_total";
pub const SLOT_RETAINED: &str = "gc_backup_wal_slot_retained_bytes";
pub const RETENTION_DELETED: &str = "gc_backup_retention_deleted_total";
pub const RETENTION_LAST_RUN: &str = "gc_backup_retention_last_run_timestamp_seconds";
pub const START_TIME: &str = "gc_backup_start_time_seconds";
pub const DRILL_LAST_SUCCESS: &str = "gc_backup_drill_last_success_timestamp_seconds";
pub const DRILL_RTO: &str = "gc_backup_drill_rto_seconds";
pub const DRILL_RTO_BOUND: &str = "gc_backup_drill_rto_bound_seconds";
pub const DRILL_FAILURES: &str = "gc_backup_drill_failures_total";

/// What the scheduler runs: a backup kind, or retention.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobKind {
    Backup(Kind),
    /// `[schedule] pg-base-incremental`: a pg-base backup that stores what changed.
    IncrementalBase,
    /// `[schedule] drill`: restore drills of the newest backups of `[drill] kinds`.
    Drill,
    Retention,
}

impl JobKind {
    pub fn label(self) -> &'static str {
        match self {
            JobKind::Backup(kind) => kind.as_str(),
            JobKind::IncrementalBase => "pg-base-incremental",
            JobKind::Drill => "drill",
            JobKind::Retention => "retention",
        }
    }
}

impl JobKind {
    /// The kind of backup the job takes, if it takes one.
    pub fn backup_kind(self) -> Option<Kind> {
        match self {
            JobKind::Backup(kind) => Some(kind),
            JobKind::IncrementalBase => Some(Kind::PgBase),
            JobKind::Drill | JobKind::Retention => None,
        }
    }

    /// Whether the job runs a pipeline (a backup's or a restore's) within the memory limit.
    pub fn uses_memory(self) -> bool {
        self.backup_kind().is_some() || self == JobKind::Drill
    }
}

impl std::fmt::Display for JobKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunResult {
    Success,
    Failure,
    /// The previous run of the kind was still going when the schedule came round.
    Skipped,
}

impl RunResult {
    fn label(self) -> &'static str {
        match self {
            RunResult::Success => "success",
            RunResult::Failure => "failure",
            RunResult::Skipped => "skipped",
        }
    }
}

fn seconds(time: DateTime<Utc>) -> f64 {
    time.timestamp_millis() as f64 / 1000.0
}

/// Installs the Prometheus recorder (once per process) and describes every metric.
pub fn install() -> anyhow::Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .install_recorder()
        .map_err(|e| anyhow::anyhow!("cannot install the metrics recorder: {e}"))?;
    describe_gauge!(
        LAST_SUCCESS,
        Unit::Seconds,
        "End time of the newest successful backup of a kind (from the store)"
    );
    describe_gauge!(
        LAST_FAILURE,
        Unit::Seconds,
        "When a run of this kind last failed in this process"
    );
    describe_counter!(
        RUNS,
        "Scheduled runs by kind and result (success, failure, skipped)"
    );
    describe_gauge!(
        DURATION,
        Unit::Seconds,
        "Duration of the last run of a kind"
    );
    describe_counter!(
        BYTES,
        Unit::Bytes,
        "Bytes backed up: stage=raw as the source produced them, stage=stored after compression"
    );
    describe_gauge!(
        LAST_SIZE,
        Unit::Bytes,
        "Stored size of the last successful backup of a kind"
    );
    describe_gauge!(
        WAL_LAST_ARCHIVED,
        Unit::Seconds,
        "When the look-ahead archiver last stored a WAL segment"
    );
    describe_gauge!(
        WAL_PENDING,
        "WAL segments PostgreSQL has marked .ready and not yet stored"
    );
    describe_counter!(
        WAL_FAILURES,
        "WAL uploads by the look-ahead archiver that failed"
    );
    describe_gauge!(
        STREAM_UP,
        "1 while the WAL receiver streams from its replication slot, else 0"
    );
    describe_gauge!(
        STREAM_LAG,
        Unit::Bytes,
        "WAL the server has written that the receiver has not stored yet"
    );
    describe_gauge!(
        STREAM_STORED,
        Unit::Bytes,
        "The WAL position (LSN as a byte count) before which all streamed WAL is stored"
    );
    describe_gauge!(
        STREAM_LAST_FLUSH,
        Unit::Seconds,
        "When the WAL receiver last stored streamed WAL"
    );
    describe_counter!(
        STREAM_FAILURES,
        "WAL receiver sessions that failed (each is retried)"
    );
    describe_counter!(
        STREAM_GAPS,
        "WAL the receiver found missing from the store: a replication slot dropped or \
         invalidated before its WAL was stored"
    );
    describe_gauge!(
        SLOT_RETAINED,
        Unit::Bytes,
        "WAL PostgreSQL keeps for the receiver's replication slot (it grows while the \
         receiver is down, until max_slot_wal_keep_size)"
    );
    describe_counter!(RETENTION_DELETED, "Backups deleted by retention, by kind");
    describe_gauge!(
        RETENTION_LAST_RUN,
        Unit::Seconds,
        "When retention last completed without error"
    );
    describe_gauge!(
        START_TIME,
        Unit::Seconds,
        "When this gc-backup run process started"
    );
    describe_gauge!(
        PEAK_RSS,
        Unit::Bytes,
        "Peak resident memory of this process since it started (VmHWM), to compare with \
         pipeline.memory-limit"
    );
    describe_gauge!(
        DRILL_LAST_SUCCESS,
        Unit::Seconds,
        "When a restore drill of a kind last succeeded in this process (0 until one has)"
    );
    describe_gauge!(
        DRILL_RTO,
        Unit::Seconds,
        "How long the last successful restore drill of a kind took, from the first byte read \
         to the engine's answer on what was restored"
    );
    describe_gauge!(
        DRILL_RTO_BOUND,
        Unit::Seconds,
        "The RTO a kind's drill may take ([drill] rto-bound) before GcBackupDrillSlow fires"
    );
    describe_counter!(
        DRILL_FAILURES,
        "Restore drills of a kind that failed: a backup that did not restore or load"
    );
    gauge!(START_TIME).set(seconds(Utc::now()));
    peak_rss();
    Ok(handle)
}

/// Makes a scheduled kind's series exist from the start (at zero), so that dashboards and
/// `increase()` see the first failure as one.
pub fn register(job: JobKind) {
    for result in [RunResult::Success, RunResult::Failure, RunResult::Skipped] {
        counter!(RUNS, "kind" => job.label(), "result" => result.label()).increment(0);
    }
    if let Some(kind) = job.backup_kind() {
        for stage in ["raw", "stored"] {
            counter!(BYTES, "kind" => kind.as_str(), "stage" => stage).increment(0);
        }
    }
}

/// The drilled kinds' series exist from the start: the last success at 0 (so that
/// `GcBackupDrillMissing` can fire for a kind never drilled), no failures, the bound.
pub fn register_drills(drill: &crate::config::DrillConfig) {
    for &kind in &drill.kinds {
        gauge!(DRILL_LAST_SUCCESS, "kind" => kind.as_str()).set(0.0);
        counter!(DRILL_FAILURES, "kind" => kind.as_str()).increment(0);
        if let Some(bound) = drill.rto_bound.get(&kind) {
            gauge!(DRILL_RTO_BOUND, "kind" => kind.as_str()).set(bound.as_secs_f64());
        }
    }
}

pub fn drill_succeeded(kind: Kind, rto: std::time::Duration) {
    gauge!(DRILL_LAST_SUCCESS, "kind" => kind.as_str()).set(seconds(Utc::now()));
    gauge!(DRILL_RTO, "kind" => kind.as_str()).set(rto.as_secs_f64());
}

pub fn drill_failed(kind: Kind) {
    counter!(DRILL_FAILURES, "kind" => kind.as_str()).increment(1);
}

/// The newest backup of `kind` in the store ended at `end_time`.
pub fn last_success(kind: Kind, end_time: DateTime<Utc>) {
    gauge!(LAST_SUCCESS, "kind" => kind.as_str()).set(seconds(end_time));
}

/// The store holds no backup of a scheduled `kind`: the oldest possible success, so that the
/// missing-backup alert fires.
pub fn never_succeeded(kind: Kind) {
    gauge!(LAST_SUCCESS, "kind" => kind.as_str()).set(0.0);
}

pub fn run_finished(job: JobKind, result: RunResult, seconds_taken: f64) {
    counter!(RUNS, "kind" => job.label(), "result" => result.label()).increment(1);
    if result == RunResult::Skipped {
        return;
    }
    gauge!(DURATION, "kind" => job.label()).set(seconds_taken);
    if result == RunResult::Failure {
        gauge!(LAST_FAILURE, "kind" => job.label()).set(seconds(Utc::now()));
    }
}

pub fn backup_stored(kind: Kind, raw_bytes: u64, stored_bytes: u64, end_time: DateTime<Utc>) {
    counter!(BYTES, "kind" => kind.as_str(), "stage" => "raw").increment(raw_bytes);
    counter!(BYTES, "kind" => kind.as_str(), "stage" => "stored").increment(stored_bytes);
    gauge!(LAST_SIZE, "kind" => kind.as_str()).set(stored_bytes as f64);
    last_success(kind, end_time);
}

pub fn retention_done(deleted: &std::collections::BTreeMap<Kind, usize>) {
    for kind in Kind::ALL {
        let count = deleted.get(&kind).copied().unwrap_or(0) as u64;
        counter!(RETENTION_DELETED, "kind" => kind.as_str()).increment(count);
    }
    gauge!(RETENTION_LAST_RUN).set(seconds(Utc::now()));
}

pub fn wal(last_archived: Option<DateTime<Utc>>, pending: usize, failures: u64) {
    if let Some(time) = last_archived {
        gauge!(WAL_LAST_ARCHIVED).set(seconds(time));
    }
    gauge!(WAL_PENDING).set(pending as f64);
    counter!(WAL_FAILURES).absolute(failures);
}

pub fn wal_stream(status: &crate::wal::receiver::StreamStatus) {
    gauge!(STREAM_UP).set(if status.streaming { 1.0 } else { 0.0 });
    if let Some(stored) = status.stored_lsn {
        gauge!(STREAM_STORED).set(stored.0 as f64);
        if let Some(server) = status.server_lsn {
            gauge!(STREAM_LAG).set(server.0.saturating_sub(stored.0) as f64);
        }
    }
    if let Some(time) = status.last_flush_at {
        gauge!(STREAM_LAST_FLUSH).set(seconds(time));
    }
    if let Some(bytes) = status.slot_retained_bytes {
        gauge!(SLOT_RETAINED).set(bytes as f64);
    }
    counter!(STREAM_FAILURES).absolute(status.failures);
    counter!(STREAM_GAPS).absolute(status.gaps);
}

/// Copies this process's peak resident memory into its gauge.
pub fn peak_rss() {
    if let Some(bytes) = crate::host::peak_rss_bytes() {
        gauge!(PEAK_RSS).set(bytes as f64);
    }
}
