//! The command line's arguments: a contract, since scripts, Jobs and PostgreSQL's
//! `archive_command`/`restore_command` depend on it. Flags that override a setting become
//! [`Overrides`] here, so the configuration is resolved in one place.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::catalog::manifest::DumpFormat;
use crate::catalog::{BackupId, Kind, Selector};
use crate::config::Overrides;

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
    /// Read the store as it was at TIME (a versioned bucket's older versions): list, restore,
    /// verify and wal-fetch only [env: GC_BACKUP_AS_OF]
    #[arg(long, global = true, value_name = "TIME")]
    pub as_of: Option<String>,
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
    /// A restore point across the engines: pg_create_restore_point(NAME) (its WAL archived),
    /// a Redis backup and, with etcd configured, an etcd snapshot, recorded as one point
    /// (`list --kind point`) only when every part succeeded; prints the point's id
    Mark(MarkArgs),
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
pub struct MarkArgs {
    /// The point's name, also the PostgreSQL restore point's (unique, at most 63 bytes)
    pub name: String,
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
    /// Store only what changed since the newest base backup (a full when there is none, or the chain is max-incremental-chain long)
    #[arg(long)]
    pub incremental: bool,
}

#[derive(Debug, Args)]
pub struct PgDumpArgs {
    /// Dump only these tables (pg_dump --table patterns); repeatable
    #[arg(long = "table", value_name = "T")]
    pub tables: Vec<String>,
    /// custom (pg_restore, selective) or plain SQL (psql)
    #[arg(long, value_enum, default_value_t = FormatArg::Custom)]
    pub format: FormatArg,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FormatArg {
    Custom,
    Plain,
}

impl From<FormatArg> for DumpFormat {
    fn from(format: FormatArg) -> Self {
        match format {
            FormatArg::Custom => DumpFormat::Custom,
            FormatArg::Plain => DumpFormat::Plain,
        }
    }
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only this kind: pg-dump, pg-base, redis, etcd, point
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
    /// PostgreSQL, Redis and (with --etcd-output) etcd to one moment: a time, or a point made
    /// with `mark`. Every part is checked before anything is written; one line per engine says
    /// what it reached, and how far apart the engines are
    All(RestoreAllArgs),
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("moment").required(true).multiple(false)))]
pub struct RestoreAllArgs {
    /// The moment, with a time zone: PostgreSQL recovers to it, Redis' AOF set is cut at it
    /// (else its newest snapshot before it), etcd gets its newest snapshot before it
    #[arg(long, value_name = "T", group = "moment", value_parser = parse_time)]
    pub target_time: Option<chrono::DateTime<chrono::Utc>>,
    /// A point made with `gc-backup mark`: its restore point, its Redis and etcd backups
    #[arg(long, value_name = "NAME", group = "moment")]
    pub target_name: Option<String>,
    /// PostgreSQL's new data directory (absent or empty)
    #[arg(long, value_name = "DIR")]
    pub pgdata: PathBuf,
    /// Redis' directory for dump.rdb or the AOF directory (absent or empty)
    #[arg(long, value_name = "DIR")]
    pub redis_output: PathBuf,
    /// etcd's snapshot file to write (must not exist); without it etcd is not restored
    #[arg(long, value_name = "FILE")]
    pub etcd_output: Option<PathBuf>,
    /// PostgreSQL's timeline, as for restore pg
    #[arg(long, value_name = "N|current|latest", value_parser = parse_timeline)]
    pub target_timeline: Option<pitr::TargetTimeline>,
    /// Run PostgreSQL's recovery now with a temporary server, and report what it reached
    #[arg(long)]
    pub start: bool,
    /// As for restore pg: off keeps the restored cluster from archiving into this store
    #[arg(long, value_enum, default_value_t = ArchiveMode::Preserve)]
    pub archive_mode: ArchiveMode,
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
    /// A backup id or "latest" ("latest" with --target-time, which chooses the backup)
    #[arg(value_parser = parse_selector)]
    pub backup: Selector,
    /// The directory for dump.rdb and the AOF directory (created if missing; existing ones are
    /// refused)
    #[arg(long, value_name = "DIR")]
    pub output: PathBuf,
    /// Restore the dataset as it was at T: the AOF set cut at its last #TS annotation not
    /// after T (aof-timestamp-enabled), else the newest snapshot taken before T; a time zone
    /// is required
    #[arg(long, value_name = "T", value_parser = parse_time)]
    pub target_time: Option<chrono::DateTime<chrono::Utc>>,
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
    /// The timeline to recover along: a number, current (the base backup's) or latest.
    /// Without it, the newest, unless an older timeline also reaches the target: then the
    /// restore is refused and says which to choose
    #[arg(long, value_name = "N|current|latest", value_parser = parse_timeline)]
    pub target_timeline: Option<pitr::TargetTimeline>,
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
    pub fn target(&self) -> pitr::RecoveryTarget {
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

    pub fn action(&self) -> pitr::TargetAction {
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
    /// Restore drill: restore the backup (default: the latest pg-base; --kind redis or etcd
    /// for theirs) into a temporary directory and check it with the engine (PostgreSQL
    /// recovered to the end of the archive and pg_amcheck; redis-server loading it; etcd's
    /// snapshot status and restore), report the time taken (RTO), clean up
    #[arg(long)]
    pub restore: bool,
}

fn parse_time(text: &str) -> Result<chrono::DateTime<chrono::Utc>, String> {
    pitr::target::parse_time(text).map_err(|e| e.to_string())
}

fn parse_lsn(text: &str) -> Result<pitr::Lsn, String> {
    text.parse().map_err(|e: pitr::PitrError| e.to_string())
}

fn parse_timeline(text: &str) -> Result<pitr::TargetTimeline, String> {
    text.parse()
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

impl Cli {
    /// The settings this command line overrides: the global flags and the command's own.
    pub fn overrides(&self) -> Overrides {
        let global = &self.global;
        let mut overrides = Overrides {
            config_file: global.config.clone(),
            store_url: global.store.clone(),
            zstd_level: global.zstd_level,
            part_size: global.part_size.clone(),
            parallel_uploads: global.parallel_uploads,
            as_of: global.as_of.clone(),
            ..Overrides::default()
        };
        match &self.command {
            Command::Backup(BackupCommand::PgBase(args)) => {
                overrides.pgdata.clone_from(&args.pgdata);
            }
            Command::Backup(BackupCommand::Redis(args)) => {
                overrides.redis_url.clone_from(&args.redis_url);
                overrides.redis_aof_dir.clone_from(&args.aof_dir);
            }
            Command::Backup(BackupCommand::Etcd(args)) => {
                overrides.etcd_endpoints.clone_from(&args.endpoints);
            }
            _ => {}
        }
        overrides
    }
}

impl Command {
    /// Called by PostgreSQL, where log lines land in the server log: only warnings and errors.
    pub fn is_postgres_hook(&self) -> bool {
        matches!(self, Command::WalPush(_) | Command::WalFetch(_))
    }
}
