//! The command line (a contract: scripts and Jobs depend on it), and one handler per command:
//! resolve the configuration, open the store, run one job, render its result.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::catalog::manifest::{DumpFormat, Manifest, SourceFacts};
use crate::catalog::{self, BackupId, Kind, Selector};
use crate::config::{Config, Overrides, StoreLocation};
use crate::error::Failure;
use crate::jobs::{self, pg_dump::PgDumpRequest, restore_pg_dump::RestoreTarget};
use crate::store::{OpenMode, Store};

#[derive(Debug, Parser)]
#[command(
    name = "gc-backup",
    version,
    about = "Backup and restore agent of GC Storage: PostgreSQL, streamed through zstd into S3",
    long_about = None
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// TOML configuration file [env: GC_BACKUP_CONFIG]
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Where backups are stored: s3://BUCKET/PREFIX or file:///PATH [env: GC_BACKUP_STORE]
    #[arg(long, global = true, value_name = "URL")]
    pub store: Option<String>,
    /// zstd level, 1-19 [env: GC_BACKUP_ZSTD_LEVEL]
    #[arg(long, global = true, value_name = "N")]
    pub zstd_level: Option<i32>,
    /// Size of each uploaded part, e.g. 8MiB [env: GC_BACKUP_PART_SIZE]
    #[arg(long, global = true, value_name = "SIZE")]
    pub part_size: Option<String>,
    /// Parts uploaded at once [env: GC_BACKUP_PARALLEL_UPLOADS]
    #[arg(long, global = true, value_name = "N")]
    pub parallel_uploads: Option<usize>,
    /// Log format on stderr
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "GC_BACKUP_LOG_FORMAT")]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Take a backup; prints the new backup's id as the last line on stdout
    #[command(subcommand)]
    Backup(BackupCommand),
    /// List the backups in the store
    List(ListArgs),
    /// Restore a backup
    #[command(subcommand)]
    Restore(RestoreCommand),
    /// Archive one WAL file: PostgreSQL's archive_command = 'gc-backup wal-push %p'
    WalPush(WalPushArgs),
    /// The sidecar: look-ahead WAL archiving, scheduled backups and retention, /metrics
    /// and /health; runs until SIGTERM
    Run,
    /// Restore one archived WAL file: restore_command = 'gc-backup wal-fetch %f %p'.
    /// Exits 1 when the archive does not have it, 255 on any other failure.
    WalFetch(WalFetchArgs),
    /// Check backups: re-read every object against its checksums, and the WAL chain of each
    /// base backup; with --restore, run a restore drill
    Verify(VerifyArgs),
    /// Delete what the retention policy says has expired (backups, their data, old WAL, data
    /// of runs that never finished), printing the plan with a reason for each item
    Retention(RetentionArgs),
    /// Check a deployment: the store (credentials, bucket, create-only PUT, multipart,
    /// checksums, delete, versioning, object lock), PostgreSQL's archiving into this store,
    /// Redis and etcd. Exit 0 all good, 2 a setting or credential is wrong, 3 anything else
    Check(CheckArgs),
    /// Started by wal-fetch: downloads the next segments into its spool
    #[command(hide = true)]
    WalPrefetch(WalPrefetchArgs),
    /// recovery_end_command: stops the prefetcher and removes its spool in ./pg_wal
    #[command(hide = true)]
    WalPrefetchStop,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Print the findings as a JSON array (area, check, status, detail) instead of a table
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct WalPrefetchArgs {
    /// The segment PostgreSQL asked for last
    pub name: String,
    /// The spool directory
    pub dir: PathBuf,
}

#[derive(Debug, Args)]
pub struct RetentionArgs {
    /// Print the plan, delete nothing
    #[arg(long)]
    pub dry_run: bool,
    /// Plan as if it were this time (with a zone, e.g. 2026-12-31T00:00:00Z): "what would
    /// happen on date X"
    #[arg(long, value_name = "TIME", value_parser = parse_now)]
    pub now: Option<chrono::DateTime<chrono::Utc>>,
}

fn parse_now(text: &str) -> Result<chrono::DateTime<chrono::Utc>, String> {
    pitr::target::parse_time(text).map_err(|e| e.to_string())
}

#[derive(Debug, Args)]
pub struct WalPushArgs {
    /// The WAL file (PostgreSQL's %p, relative to PGDATA)
    pub path: PathBuf,
}

#[derive(Debug, Args)]
pub struct WalFetchArgs {
    /// The file name to restore (PostgreSQL's %f)
    pub name: String,
    /// Where to write it (PostgreSQL's %p)
    pub dest: PathBuf,
}

#[derive(Debug, Subcommand)]
pub enum BackupCommand {
    /// Logical backup with pg_dump (connection from PG*/DB_* environment or the postgres section)
    PgDump(PgDumpArgs),
    /// Physical base backup of the running cluster (needs WAL archiving through wal-push)
    PgBase(PgBaseArgs),
    /// RDB snapshot of Redis over the replication protocol, checked (CRC-64) while it streams;
    /// with --aof-dir, also Redis 7's AOF files as a consistent set
    Redis(RedisArgs),
    /// etcd snapshot of one member (Maintenance.Snapshot), its SHA-256 trailer checked while it
    /// streams
    Etcd(EtcdArgs),
}

#[derive(Debug, Args)]
pub struct EtcdArgs {
    /// Comma-separated http(s)://host:port, tried in order [env: GC_BACKUP_ETCD_ENDPOINTS or ETCDCTL_ENDPOINTS; TLS: ETCDCTL_CACERT, ETCDCTL_CERT, ETCDCTL_KEY; auth: ETCDCTL_USER]
    #[arg(long, value_name = "URLS")]
    pub endpoints: Option<String>,
}

#[derive(Debug, Args)]
pub struct RedisArgs {
    /// redis://host:port or rediss://host:port, with user:password@ optional [env: GC_BACKUP_REDIS_URL; password: REDISCLI_AUTH]
    #[arg(long, value_name = "URL")]
    pub redis_url: Option<String>,
    /// Redis 7's AOF directory, shared with Redis (unchanged files are not uploaded again) [env: GC_BACKUP_REDIS_AOF_DIR]
    #[arg(long, value_name = "DIR")]
    pub aof_dir: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct PgBaseArgs {
    /// The cluster's data directory (shared with the sidecar) [env: PGDATA]
    #[arg(long, value_name = "DIR")]
    pub pgdata: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct PgDumpArgs {
    /// Dump only these tables (pg_dump --table patterns); repeatable
    #[arg(long = "table", value_name = "T")]
    pub tables: Vec<String>,
    /// custom (pg_restore, selective) or plain SQL (psql)
    #[arg(long, value_enum, default_value_t = DumpFormat::Custom)]
    pub format: DumpFormat,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only this kind: pg-dump, pg-base, redis, etcd
    #[arg(long, value_parser = parse_kind)]
    pub kind: Option<Kind>,
    /// A JSON array instead of a table
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum RestoreCommand {
    /// Restore a pg_dump backup to a file, stdout, or a database
    PgDump(RestorePgDumpArgs),
    /// Point-in-time restore: a base backup into an empty directory, set up to recover from the
    /// WAL archive to the target (default: the end of the archive, on the newest timeline);
    /// with --start, the recovery runs now
    Pg(RestorePgArgs),
    /// Restore a Redis backup as DIR/dump.rdb, and its AOF set as DIR/appendonlydir (new files
    /// only, each checked before it is named)
    Redis(RestoreRedisArgs),
    /// Restore an etcd snapshot to a new file, for `etcdctl snapshot restore` (checked before
    /// it is named)
    Etcd(RestoreEtcdArgs),
}

#[derive(Debug, Args)]
pub struct RestoreEtcdArgs {
    /// A backup id or "latest"
    #[arg(value_parser = parse_selector)]
    pub backup: Selector,
    /// The snapshot file to write (must not exist)
    #[arg(long, value_name = "FILE")]
    pub output: PathBuf,
}

#[derive(Debug, Args)]
pub struct RestoreRedisArgs {
    /// A backup id or "latest"
    #[arg(value_parser = parse_selector)]
    pub backup: Selector,
    /// The directory for dump.rdb and the AOF directory (created if missing; existing ones are
    /// refused)
    #[arg(long, value_name = "DIR")]
    pub output: PathBuf,
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("target").multiple(false)))]
pub struct RestorePgArgs {
    /// The new data directory (absent or empty)
    #[arg(long, value_name = "DIR")]
    pub pgdata: PathBuf,
    /// Recover to this moment; a time zone is required, e.g. '2024-01-15 10:30:00+09'
    #[arg(long, value_name = "T", group = "target", value_parser = parse_time)]
    pub target_time: Option<chrono::DateTime<chrono::Utc>>,
    /// Recover to this WAL position, e.g. 16/B374D848
    #[arg(long, value_name = "L", group = "target", value_parser = parse_lsn)]
    pub target_lsn: Option<pitr::Lsn>,
    /// Recover to the commit of this transaction id
    #[arg(long, value_name = "X", group = "target")]
    pub target_xid: Option<u64>,
    /// Recover to this restore point (pg_create_restore_point)
    #[arg(long, value_name = "N", group = "target")]
    pub target_name: Option<String>,
    /// What the server does at the target
    #[arg(long, value_enum, default_value_t = ActionArg::Promote, requires = "target")]
    pub target_action: ActionArg,
    /// The base backup to start from (default: the newest that ended before the target)
    #[arg(long, value_name = "ID", value_parser = parse_selector, default_value = "latest")]
    pub backup: Selector,
    /// Run the recovery now with a temporary server, and report what it reached
    #[arg(long)]
    pub start: bool,
    /// off: the restored cluster does not archive (a restore for inspection must not push a
    /// timeline of its own into this archive); preserve: its own archive settings apply
    #[arg(long, value_enum, default_value_t = ArchiveMode::Preserve)]
    pub archive_mode: ArchiveMode,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ArchiveMode {
    Preserve,
    Off,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ActionArg {
    Promote,
    Pause,
    Shutdown,
}

impl RestorePgArgs {
    fn target(&self) -> pitr::RecoveryTarget {
        use pitr::RecoveryTarget;
        if let Some(time) = self.target_time {
            RecoveryTarget::Time(time)
        } else if let Some(lsn) = self.target_lsn {
            RecoveryTarget::Lsn(lsn)
        } else if let Some(xid) = self.target_xid {
            RecoveryTarget::Xid(xid)
        } else if let Some(name) = &self.target_name {
            RecoveryTarget::Name(name.clone())
        } else {
            RecoveryTarget::Latest
        }
    }

    fn action(&self) -> pitr::TargetAction {
        match self.target_action {
            ActionArg::Promote => pitr::TargetAction::Promote,
            ActionArg::Pause => pitr::TargetAction::Pause,
            ActionArg::Shutdown => pitr::TargetAction::Shutdown,
        }
    }
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Only this kind: pg-dump, pg-base, redis, etcd
    #[arg(long, value_parser = parse_kind)]
    pub kind: Option<Kind>,
    /// Only this backup
    #[arg(value_parser = parse_backup_id)]
    pub id: Option<BackupId>,
    /// Restore drill: restore the base backup (default: the latest) to the end of the archive in
    /// a temporary directory, recover it, run pg_amcheck, report the time taken, clean up
    #[arg(long)]
    pub restore: bool,
}

fn parse_time(text: &str) -> Result<chrono::DateTime<chrono::Utc>, String> {
    pitr::target::parse_time(text).map_err(|e| e.to_string())
}

fn parse_lsn(text: &str) -> Result<pitr::Lsn, String> {
    text.parse().map_err(|e: pitr::PitrError| e.to_string())
}

fn parse_backup_id(text: &str) -> Result<BackupId, String> {
    text.parse()
}

#[derive(Debug, Args)]
pub struct RestorePgDumpArgs {
    /// A backup id (e.g. 20260115T020000Z) or "latest"
    #[arg(value_parser = parse_selector)]
    pub backup: Selector,
    /// Write the dump to this new file, or "-" for stdout
    #[arg(long, value_name = "FILE|-", conflicts_with = "dbname")]
    pub output: Option<String>,
    /// Load into this database (name or libpq connection string) in one transaction
    #[arg(long, value_name = "CONNSTR")]
    pub dbname: Option<String>,
}

fn parse_kind(text: &str) -> Result<Kind, String> {
    text.parse()
}

fn parse_selector(text: &str) -> Result<Selector, String> {
    text.parse()
}

impl GlobalArgs {
    fn overrides(&self) -> Overrides {
        Overrides {
            config_file: self.config.clone(),
            store_url: self.store.clone(),
            zstd_level: self.zstd_level,
            part_size: self.part_size.clone(),
            parallel_uploads: self.parallel_uploads,
        }
    }
}

/// Runs one command. `cancel` fires on SIGINT/SIGTERM.
pub async fn run(cli: Cli, cancel: CancellationToken) -> anyhow::Result<()> {
    // PostgreSQL calls wal-push once per segment, serially: when the sidecar has already
    // stored this very file, answer before building any client.
    if let Command::WalPush(args) = &cli.command
        && crate::daemon::archiver::stored_by_archiver(&args.path)
    {
        return Ok(());
    }
    // recovery_end_command runs in the data directory and needs no store: answer before the
    // configuration is read, so that a configuration problem cannot keep a spool behind.
    if let Command::WalPrefetchStop = &cli.command {
        jobs::prefetch::stop_in(std::path::Path::new("pg_wal"));
        return Ok(());
    }
    let config = Config::load(&cli.global.overrides()).map_err(|e| Failure::Config(e.0))?;
    // check reports an unusable store as a finding, so it opens the store itself.
    if let Command::Check(args) = &cli.command {
        let report = jobs::check::check(&config).await;
        print_check(&report, args.json)?;
        return match report.exit_code() {
            0 => Ok(()),
            code => {
                let failed = report
                    .findings
                    .iter()
                    .filter(|f| f.status == jobs::check::Status::Fail)
                    .count();
                let message = format!("check: {failed} of {} checks failed", report.findings.len());
                Err(if code == crate::error::EXIT_CONFIG {
                    Failure::Config(message).into()
                } else {
                    anyhow::anyhow!(message)
                })
            }
        };
    }
    // Only a backup (or the sidecar that takes them) may create a new local store: for every
    // other command an absent directory is a store that cannot be reached, never an empty one.
    let mode = match cli.command {
        Command::Backup(_) | Command::Run => OpenMode::CreateRoot,
        _ => OpenMode::Existing,
    };
    let store = Store::open(&config.store, mode)?;
    match cli.command {
        Command::Backup(BackupCommand::PgDump(args)) => {
            let request = PgDumpRequest {
                format: args.format,
                tables: args.tables,
            };
            let manifest = jobs::pg_dump::backup(&config, &store, &request, &cancel).await?;
            say_where(&config, &manifest);
            print_last_line(manifest.id.as_str())
        }
        Command::Backup(BackupCommand::PgBase(args)) => {
            let request = jobs::pg_base::PgBaseRequest {
                pgdata: args.pgdata,
            };
            let manifest = jobs::pg_base::backup(&config, &store, &request, &cancel).await?;
            say_where(&config, &manifest);
            print_last_line(manifest.id.as_str())
        }
        Command::Backup(BackupCommand::Redis(args)) => {
            let endpoint = jobs::redis::endpoint(&config, args.redis_url.as_deref())?;
            let aof_dir = args.aof_dir.or_else(|| config.redis.aof_dir.clone());
            let manifest =
                jobs::redis::backup(&config, &store, &endpoint, aof_dir.as_deref(), &cancel)
                    .await?;
            say_where(&config, &manifest);
            print_last_line(manifest.id.as_str())
        }
        Command::Backup(BackupCommand::Etcd(args)) => {
            let endpoints = jobs::etcd::endpoints(&config, args.endpoints.as_deref())?;
            let manifest = jobs::etcd::backup(&config, &store, &endpoints, &cancel).await?;
            say_where(&config, &manifest);
            print_last_line(manifest.id.as_str())
        }
        Command::Restore(RestoreCommand::Etcd(args)) => {
            let report = jobs::etcd::restore(&store, &args.backup, &args.output, &cancel).await?;
            eprintln!(
                "Restored etcd backup {} to {} in {:.1}s; checksum verified. Next: \
                 etcdctl snapshot restore {} --data-dir DIR (one per member).",
                report.manifest.id,
                report.path.display(),
                report.elapsed.as_secs_f64(),
                report.path.display()
            );
            Ok(())
        }
        Command::Restore(RestoreCommand::Redis(args)) => {
            let report = jobs::redis::restore(&store, &args.backup, &args.output, &cancel).await?;
            let aof = report.aof_dir.as_ref().map_or(String::new(), |dir| {
                format!(
                    " and its AOF set to {} (a Redis with appendonly yes loads the AOF)",
                    dir.display()
                )
            });
            eprintln!(
                "Restored redis backup {} to {}{aof} in {:.1}s; checksums verified.",
                report.manifest.id,
                report.path.display(),
                report.elapsed.as_secs_f64()
            );
            Ok(())
        }
        Command::List(args) => {
            let (manifests, unreadable) = catalog::list(&store, args.kind).await?;
            for problem in &unreadable {
                tracing::warn!("{problem}");
            }
            if args.json {
                print_json(&manifests)
            } else {
                print_table(&store, &manifests)
            }
        }
        Command::Restore(RestoreCommand::PgDump(args)) => {
            let target = restore_target(args.output, args.dbname)?;
            let report =
                jobs::restore_pg_dump::restore(&config, &store, &args.backup, &target, &cancel)
                    .await?;
            tracing::info!(
                kind = "pg-dump",
                id = %report.manifest.id,
                raw_bytes = report.raw_bytes,
                seconds = report.elapsed.as_secs_f64(),
                "restore completed; checksums verified"
            );
            Ok(())
        }
        Command::Restore(RestoreCommand::Pg(args)) => {
            let request = jobs::restore_pg::RestorePgRequest {
                pgdata: std::path::absolute(&args.pgdata).unwrap_or(args.pgdata.clone()),
                backup: args.backup.clone(),
                target: args.target(),
                action: args.action(),
                archive_off: args.archive_mode == ArchiveMode::Off,
                start: args.start.then(jobs::restore_pg::StartOptions::default),
                restore_env: restore_env(&cli.global),
            };
            let report = jobs::restore_pg::restore(&config, &store, &request, &cancel).await?;
            report_restore(&report, &request);
            Ok(())
        }
        Command::Verify(args) => {
            if args.restore {
                if args.kind.is_some_and(|k| k != Kind::PgBase) {
                    return Err(
                        Failure::Config("a restore drill restores pg-base backups".into()).into(),
                    );
                }
                let selector = args.id.map_or(Selector::Latest, Selector::Id);
                let drill = jobs::verify::drill(
                    &config,
                    &store,
                    selector,
                    restore_env(&cli.global),
                    &cancel,
                )
                .await?;
                report_drill(&drill);
                return Ok(());
            }
            let checked =
                jobs::verify::verify(&store, args.kind, args.id.as_ref(), &cancel).await?;
            report_verify(&checked)
        }
        Command::WalPush(args) => {
            let pushed = jobs::wal::push(&config, &store, &args.path).await?;
            tracing::debug!(path = %args.path.display(), outcome = ?pushed.outcome, "WAL archived");
            Ok(())
        }
        Command::Run => crate::daemon::run(config, store, cancel).await,
        Command::Retention(args) => {
            let now = args.now.unwrap_or_else(chrono::Utc::now);
            let s3 = config.store.location.s3();
            let report =
                jobs::retention::run(&store, s3, &config.retention, now, args.dry_run).await?;
            print_retention(&report, args.dry_run);
            Ok(())
        }
        // PostgreSQL signals restore_command on shutdown: stop at once (exit 255), never
        // leave it waiting on a store that does not answer.
        // A segment the prefetcher already checked, from this very store, is a rename away.
        Command::WalFetch(args)
            if jobs::prefetch::take(
                &jobs::prefetch::spool_dir(&args.dest, &store),
                &args.dest,
                &args.name,
            ) =>
        {
            let spool = jobs::prefetch::spool_dir(&args.dest, &store);
            jobs::prefetch::forget_before(&spool, &args.name);
            start_prefetch(&cli.global, &spool, &args.name);
            Ok(())
        }
        Command::WalFetch(args) => match tokio::select! {
            fetched = jobs::wal::fetch(&store, &args.name, &args.dest) => fetched,
            () = cancel.cancelled() => Err(Failure::Interrupted(format!("fetching {} interrupted", args.name)).into()),
        } {
            Ok(bytes) => {
                tracing::debug!(name = %args.name, bytes, "WAL restored");
                let spool = jobs::prefetch::spool_dir(&args.dest, &store);
                jobs::prefetch::forget_before(&spool, &args.name);
                start_prefetch(&cli.global, &spool, &args.name);
                Ok(())
            }
            Err(error) => {
                if crate::error::is_not_found(&error) {
                    // The end of the archive: nothing more to prefetch.
                    jobs::prefetch::clear(&jobs::prefetch::spool_dir(&args.dest, &store));
                }
                Err(error)
            }
        },
        Command::WalPrefetch(args) => {
            jobs::prefetch::run(&config, &store, &args.name, &args.dir).await
        }
        Command::Check(_) => Ok(()),
        Command::WalPrefetchStop => {
            jobs::prefetch::stop_in(std::path::Path::new("pg_wal"));
            Ok(())
        }
    }
}

impl Command {
    /// Called by PostgreSQL, where log lines land in the server log: only warnings and errors.
    pub fn is_postgres_hook(&self) -> bool {
        matches!(self, Command::WalPush(_) | Command::WalFetch(_))
    }
}

/// What wal-fetch needs to find the store when PostgreSQL runs it: the config file and a
/// store URL given as flags (the environment reaches it anyway when `--start` runs it).
fn restore_env(global: &GlobalArgs) -> Vec<(String, String)> {
    let config_file = global.config.clone().or_else(|| {
        std::env::var_os("GC_BACKUP_CONFIG")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    });
    let mut env = Vec::new();
    if let Some(file) = config_file {
        let file = std::path::absolute(&file).unwrap_or(file);
        env.push(("GC_BACKUP_CONFIG".to_string(), file.display().to_string()));
    }
    if let Some(url) = &global.store {
        env.push(("GC_BACKUP_STORE".to_string(), url.clone()));
    }
    env
}

fn report_restore(
    report: &jobs::restore_pg::RestorePgReport,
    request: &jobs::restore_pg::RestorePgRequest,
) {
    let plan = &report.plan;
    eprintln!(
        "Restored pg-base backup {} into {}: {} in {:.1}s ({}/s); WAL {} .. {} checked ({} segments, timeline {}).",
        report.manifest.id,
        request.pgdata.display(),
        human_bytes(report.raw_bytes),
        report.restore_elapsed.as_secs_f64(),
        human_bytes(
            (report.raw_bytes as f64 / report.restore_elapsed.as_secs_f64().max(0.001)) as u64
        ),
        plan.first_wal,
        plan.last_wal,
        plan.segments,
        plan.timeline,
    );
    match &report.recovery {
        None => eprintln!(
            "Start PostgreSQL on {} to recover to {}.",
            request.pgdata.display(),
            request.target
        ),
        Some(recovery) => {
            let stopped = recovery
                .stopped
                .as_deref()
                .map_or(String::new(), |line| format!(" {line};"));
            eprintln!(
                "Recovered to {} in {:.1}s ({} WAL files replayed):{stopped} replay ended at {}; last transaction {}; timeline {}; {}.",
                request.target,
                recovery.elapsed.as_secs_f64(),
                recovery.segments_restored,
                recovery.redo_done.as_deref().unwrap_or("?"),
                recovery
                    .last_transaction
                    .as_deref()
                    .unwrap_or("none replayed"),
                recovery.timeline.map_or("?".into(), |t| t.to_string()),
                recovery.action_done,
            );
        }
    }
}

fn report_drill(drill: &jobs::verify::Drill) {
    let restore = &drill.restore;
    let recovery = restore.recovery.as_ref();
    println!(
        "Restore drill of pg-base {}: base restore {:.1}s ({}), recovery {:.1}s ({} WAL files), \
         recovery point {} (last transaction {}), pg_amcheck {}; RTO {:.1}s",
        restore.manifest.id,
        restore.restore_elapsed.as_secs_f64(),
        human_bytes(restore.raw_bytes),
        recovery.map_or(0.0, |r| r.elapsed.as_secs_f64()),
        recovery.map_or(0, |r| r.segments_restored),
        recovery.and_then(|r| r.redo_done.as_deref()).unwrap_or("?"),
        recovery
            .and_then(|r| r.last_transaction.as_deref())
            .unwrap_or("none replayed"),
        recovery
            .and_then(|r| r.amcheck.as_deref())
            .unwrap_or("not run"),
        drill.elapsed.as_secs_f64(),
    );
}

fn report_verify(report: &jobs::verify::VerifyReport) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    for problem in &report.unreadable {
        writeln!(out, "unreadable manifest: {problem}").context("writing to stdout")?;
    }
    for backup in &report.checked {
        let verdict = if backup.problems.is_empty() {
            "ok"
        } else {
            "FAILED"
        };
        let mut line = format!(
            "{:<8} {:<17} {:<6} {} objects, {} checked",
            backup.kind,
            backup.id,
            verdict,
            backup.objects,
            human_bytes(backup.raw_bytes)
        );
        if let Some(wal) = &backup.wal {
            line.push_str(&format!("; {wal}"));
        }
        for problem in &backup.problems {
            line.push_str(&format!("\n    {problem}"));
        }
        writeln!(out, "{line}").context("writing to stdout")?;
    }
    out.flush().context("writing to stdout")?;
    let total = report.checked.len() + report.unreadable.len();
    match report.problems() {
        0 => {
            eprintln!("Verified {total} backups: all good.");
            Ok(())
        }
        bad => Err(
            Failure::Corrupt(format!("verify found problems in {bad} of {total} backups")).into(),
        ),
    }
}

fn start_prefetch(global: &GlobalArgs, spool: &std::path::Path, name: &str) {
    jobs::prefetch::start_behind(
        spool,
        name,
        global.config.as_deref(),
        global.store.as_deref(),
    );
}

fn restore_target(output: Option<String>, dbname: Option<String>) -> anyhow::Result<RestoreTarget> {
    use std::io::IsTerminal;
    Ok(match (output.as_deref(), dbname) {
        (_, Some(db)) => RestoreTarget::Database(db),
        (Some("-"), None) => RestoreTarget::Stdout,
        (Some(file), None) => RestoreTarget::File(PathBuf::from(file)),
        (None, None) if !std::io::stdout().is_terminal() => RestoreTarget::Stdout,
        (None, None) => {
            return Err(Failure::Config(
                "say where to restore: --output FILE, --output - for stdout, or --dbname CONNSTR"
                    .into(),
            )
            .into());
        }
    })
}

fn say_where(config: &Config, manifest: &Manifest) {
    if let StoreLocation::Local {
        embedded_default: true,
        root,
    } = &config.store.location
    {
        eprintln!(
            "Stored in the default local store {} (set GC_BACKUP_STORE or [store] url to use S3).",
            root.display()
        );
    }
    eprintln!(
        "{} backup {}: {} raw, {} stored",
        manifest.kind,
        manifest.id,
        human_bytes(manifest.raw_bytes),
        human_bytes(manifest.stored_bytes)
    );
}

fn print_last_line(line: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")
        .and_then(|()| out.flush())
        .context("writing to stdout")
}

/// One entry of `list --json`: the contract's fields first, then the source's facts.
#[derive(Debug, Serialize)]
struct ListEntry<'a> {
    id: &'a str,
    kind: Kind,
    start_time: String,
    end_time: String,
    raw_bytes: u64,
    stored_bytes: u64,
    compression: String,
    tool_version: &'a str,
    #[serde(flatten)]
    source: serde_json::Value,
}

/// The source facts `list` shows: all of a dump's, a base backup's without its file list.
fn list_facts(source: &SourceFacts) -> serde_json::Value {
    match source {
        SourceFacts::PgDump(facts) => serde_json::to_value(facts).unwrap_or_default(),
        SourceFacts::Redis(facts) => serde_json::to_value(facts).unwrap_or_default(),
        SourceFacts::Etcd(facts) => serde_json::to_value(facts).unwrap_or_default(),
        SourceFacts::PgBase(facts) => serde_json::json!({
            "system_identifier": facts.system_identifier,
            "server_version": facts.server_version,
            "timeline": facts.timeline,
            "start_lsn": facts.start_lsn,
            "stop_lsn": facts.stop_lsn,
            "start_wal": facts.start_wal,
            "stop_wal": facts.stop_wal,
            "files": facts.files.len(),
        }),
    }
}

fn rfc3339(time: chrono::DateTime<chrono::Utc>) -> String {
    time.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn print_json(manifests: &[Manifest]) -> anyhow::Result<()> {
    let entries: Vec<ListEntry<'_>> = manifests
        .iter()
        .map(|m| ListEntry {
            id: m.id.as_str(),
            kind: m.kind,
            start_time: rfc3339(m.start_time),
            end_time: rfc3339(m.end_time),
            raw_bytes: m.raw_bytes,
            stored_bytes: m.stored_bytes,
            compression: format!("{}-{}", m.compression.algorithm, m.compression.level),
            tool_version: &m.tool_version,
            source: list_facts(&m.source),
        })
        .collect();
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, &entries).context("writing JSON")?;
    writeln!(out).context("writing to stdout")
}

fn print_table(store: &Store, manifests: &[Manifest]) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    if manifests.is_empty() {
        writeln!(out, "No backups in {}.", store.name()).context("writing to stdout")?;
        return Ok(());
    }
    writeln!(
        out,
        "{:<17} {:<8} {:<20} {:>9} {:>10} {:>10} {:>6}  SOURCE",
        "ID", "KIND", "STARTED (UTC)", "DURATION", "RAW", "STORED", "RATIO"
    )
    .context("writing to stdout")?;
    for m in manifests {
        let seconds = (m.end_time - m.start_time).num_milliseconds() as f64 / 1000.0;
        let ratio = if m.stored_bytes == 0 {
            0.0
        } else {
            m.raw_bytes as f64 / m.stored_bytes as f64
        };
        let source = match &m.source {
            SourceFacts::PgDump(facts) => {
                let tables = if facts.tables.is_empty() {
                    String::new()
                } else {
                    format!(" tables={}", facts.tables.join(","))
                };
                format!("{} ({}){tables}", facts.database, facts.format.as_str())
            }
            SourceFacts::Redis(facts) => {
                let aof = facts.aof.as_ref().map_or(String::new(), |aof| {
                    format!(" + AOF ({} files)", aof.files.len())
                });
                format!(
                    "{} (Redis {}, RDB {}){aof}",
                    facts.server, facts.redis_version, facts.rdb_version
                )
            }
            SourceFacts::Etcd(facts) => format!(
                "{} (etcd {}, revision {})",
                facts.endpoint, facts.etcd_version, facts.revision
            ),
            SourceFacts::PgBase(facts) => format!(
                "timeline {} {}..{} ({} files)",
                facts.timeline,
                facts.start_lsn,
                facts.stop_lsn,
                facts.files.len()
            ),
        };
        writeln!(
            out,
            "{:<17} {:<8} {:<20} {:>8.1}s {:>10} {:>10} {:>5.1}x  {source}",
            m.id.as_str(),
            m.kind.as_str(),
            m.start_time.format("%Y-%m-%d %H:%M:%S"),
            seconds,
            human_bytes(m.raw_bytes),
            human_bytes(m.stored_bytes),
            ratio
        )
        .context("writing to stdout")?;
    }
    Ok(())
}

fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// The plan, one line per backup and deleted object; WAL in one line (there can be thousands).
/// The findings as a table for people (one line each), or JSON for scripts.
fn print_check(report: &jobs::check::CheckReport, json: bool) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, &report.findings).context("writing JSON")?;
        writeln!(out).context("writing to stdout")?;
        return Ok(());
    }
    writeln!(out, "{:<9} {:<27} {:<6} DETAIL", "AREA", "CHECK", "RESULT")
        .context("writing to stdout")?;
    for finding in &report.findings {
        let status = match finding.status {
            jobs::check::Status::Ok => "ok",
            jobs::check::Status::Warn => "WARN",
            jobs::check::Status::Fail => "FAIL",
        };
        writeln!(
            out,
            "{:<9} {:<27} {:<6} {}",
            finding.area, finding.check, status, finding.detail
        )
        .context("writing to stdout")?;
    }
    Ok(())
}

fn print_retention(report: &jobs::retention::RetentionReport, dry_run: bool) {
    use retention::Target;
    let mut out = std::io::stdout().lock();
    let mut wal: Vec<&str> = Vec::new();
    let mut wal_reason = "";
    for decision in &report.plan.decisions {
        let verb = match (decision.delete, dry_run) {
            (false, _) => "keep",
            (true, true) => "would delete",
            (true, false) => "deleted",
        };
        match &decision.target {
            Target::Wal { key } => {
                wal.push(key);
                wal_reason = &decision.reason;
            }
            target => {
                let _ = writeln!(out, "{verb:<12} {target:<48} {}", decision.reason);
            }
        }
    }
    if let (Some(first), Some(last)) = (wal.iter().min(), wal.iter().max()) {
        let verb = if dry_run { "would delete" } else { "deleted" };
        let _ = writeln!(
            out,
            "{verb:<12} {} WAL files, {first} … {last}: {wal_reason}",
            wal.len()
        );
    }
    for upload in &report.stale_uploads {
        let verb = if dry_run { "would abort" } else { "aborted" };
        let started = upload
            .initiated
            .map_or_else(|| "at an unknown time".to_string(), |t| t.to_rfc3339());
        let _ = writeln!(
            out,
            "{verb:<12} {:<48} multipart upload started {started}, never finished",
            upload.key
        );
    }
    if let Some(reason) = &report.uploads_unchecked {
        tracing::warn!("stale multipart uploads not checked: {reason}");
    }
    let backups = report
        .plan
        .deletions()
        .filter(|d| matches!(d.target, Target::Backup { .. }))
        .count();
    let objects = report
        .plan
        .deletions()
        .filter(|d| matches!(d.target, Target::Object { .. }))
        .count();
    let summary = format!(
        "retention at {}: {} {backups} backups, {objects} data objects, {} WAL files, {} \
         stale multipart uploads",
        report
            .now
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        if dry_run { "would delete" } else { "deleted" },
        wal.len(),
        report.stale_uploads.len()
    );
    eprintln!("{summary}");
}
