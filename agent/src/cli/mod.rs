//! The command line: [`args`] says what may be typed, [`run`] picks one short function per
//! command that resolves what it needs, calls one job and renders the result with [`render`].
//!
//! The contract for every command: results on stdout (a new backup's id as the last line),
//! progress and the one-line error on stderr, and the exit code from `error::meaning`.

pub mod args;
pub mod render;

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use args::{
    ArchiveMode, BackupCommand, CheckArgs, ListArgs, RestoreAllArgs, RestoreCommand, RestorePgArgs,
    RestorePgDumpArgs, RetentionArgs, VerifyArgs, WalFetchArgs,
};
pub use args::{Cli, Command, LogFormat};

use crate::catalog::{self, Kind, Selector};
use crate::config::Config;
use crate::error::Failure;
use crate::jobs::backup::BackupRequest;
use crate::jobs::{self, pg_dump::PgDumpRequest, restore_pg_dump::RestoreTarget};
use crate::store::{OpenMode, Store};

/// Runs one command. `cancel` fires on SIGINT/SIGTERM.
pub async fn run(cli: Cli, cancel: CancellationToken) -> anyhow::Result<()> {
    // PostgreSQL calls wal-push once per segment, serially: when the sidecar has already
    // stored this very file, answer before building any client.
    if let Command::WalPush(args) = &cli.command
        && crate::wal::archiver::stored_by_archiver(&args.path)
    {
        return Ok(());
    }
    // recovery_end_command runs in the data directory and needs no store: answer before the
    // configuration is read, so that a configuration problem cannot keep a spool behind.
    if let Command::WalPrefetchStop = &cli.command {
        crate::wal::prefetch::stop_in(Path::new("pg_wal"));
        return Ok(());
    }
    let config = Config::load(&cli.overrides())?;
    crate::pipeline::rate::install(config.max_upload_rate, config.max_download_rate);
    // PostgreSQL calls wal-fetch once per segment and waits for each: a segment the
    // prefetcher has spooled is handed over before any client is built (that took longer
    // than the rename).
    if let Command::WalFetch(args) = &cli.command
        && config.wal_prefetch
    {
        let spool = crate::wal::prefetch::spool_dir(&args.dest, &config.store.location.to_string());
        if crate::wal::prefetch::take(&spool, &args.dest, &args.name) {
            tracing::debug!(name = %args.name, "WAL handed over from the prefetch spool");
            crate::wal::prefetch::forget_before(&spool, &args.name);
            crate::wal::prefetch::start_behind(&spool, &args.name, &config);
            return Ok(());
        }
    }
    // check reports an unusable store as a finding, so it opens the store itself.
    if let Command::Check(args) = &cli.command {
        return check(&config, args).await;
    }
    // Only a backup (or the sidecar that takes them) may create a new local store: for every
    // other command an absent directory is a store that cannot be reached, never an empty one.
    let mode = match cli.command {
        Command::Backup(_) | Command::Mark(_) | Command::Run => OpenMode::CreateRoot,
        _ => OpenMode::Existing,
    };
    let store = Store::open(&config.store, mode)?
        .with_keys(config.keys()?)
        .with_lock(jobs::locker(&config)?)
        .with_as_of(as_of_view(&config, &cli.command).await?);
    match cli.command {
        Command::Backup(command) => backup(&config, &store, command, &cancel).await,
        Command::List(args) => list(&store, &args).await,
        Command::Restore(RestoreCommand::PgDump(args)) => {
            restore_pg_dump(&config, &store, args, &cancel).await
        }
        Command::Restore(RestoreCommand::Pg(args)) => {
            restore_pg(&config, &store, &args, &cancel).await
        }
        Command::Restore(RestoreCommand::Redis(args)) => {
            if let Some(target) = args.target_time {
                if args.backup != crate::catalog::Selector::Latest {
                    return Err(crate::error::Failure::Config(
                        "--target-time chooses the redis backup itself: give latest".into(),
                    )
                    .into());
                }
                let report =
                    jobs::redis::restore_to_time(&store, target, &args.output, &cancel).await?;
                eprintln!("{}", render::restore_redis_to_time(&report));
                return Ok(());
            }
            let report = jobs::redis::restore(&store, &args.backup, &args.output, &cancel).await?;
            eprintln!("{}", render::restore_redis(&report));
            Ok(())
        }
        Command::Mark(args) => {
            let manifest = jobs::mark::mark(&config, &store, Some(&args.name), &cancel).await?;
            eprintln!("{}", render::mark_done(&manifest));
            print_stdout(&format!("{}\n", manifest.id))
        }
        Command::Restore(RestoreCommand::All(args)) => {
            restore_all(&config, &store, &args, &cancel).await
        }
        Command::Restore(RestoreCommand::Etcd(args)) => {
            let report = jobs::etcd::restore(&store, &args.backup, &args.output, &cancel).await?;
            eprintln!("{}", render::restore_etcd(&report));
            Ok(())
        }
        Command::Verify(args) => verify(&config, &store, args, &cancel).await,
        Command::WalPush(args) => {
            let pushed = crate::wal::push(&config, &store, &args.path).await?;
            tracing::debug!(path = %args.path.display(), outcome = ?pushed.outcome, "WAL archived");
            Ok(())
        }
        Command::WalFetch(args) => wal_fetch(&config, &store, &args, &cancel).await,
        Command::Run => crate::daemon::run(config, store, cancel).await,
        Command::Retention(args) => retention(&config, &store, &args).await,
        Command::WalPrefetch(args) => {
            crate::wal::prefetch::run(&config, &store, &args.name, &args.dir).await
        }
        Command::Check(_) => Ok(()),
        Command::WalPrefetchStop => {
            crate::wal::prefetch::stop_in(Path::new("pg_wal"));
            Ok(())
        }
    }
}

async fn backup(
    config: &Config,
    store: &Store,
    command: BackupCommand,
    cancel: &CancellationToken,
) -> anyhow::Result<()> {
    // The commands' endpoint flags are in the configuration already (`Cli::overrides`).
    let request = match command {
        BackupCommand::PgDump(args) => BackupRequest::PgDump(PgDumpRequest {
            format: args.format.into(),
            tables: args.tables,
        }),
        BackupCommand::PgBase(args) => BackupRequest::PgBase {
            incremental: args.incremental,
        },
        BackupCommand::Redis(_) => BackupRequest::Redis,
        BackupCommand::Etcd(_) => BackupRequest::Etcd,
    };
    let manifest = jobs::backup::backup(config, store, &request, cancel).await?;
    eprintln!("{}", render::backup_done(&config.store.location, &manifest));
    print_stdout(&format!("{}\n", manifest.id))
}

async fn check(config: &Config, args: &CheckArgs) -> anyhow::Result<()> {
    let report = jobs::check::check(config).await;
    print_stdout(&render::check(&report, args.json)?)?;
    let failed = report
        .findings
        .iter()
        .filter(|f| f.status == jobs::check::Status::Fail)
        .count();
    let message = format!("check: {failed} of {} checks failed", report.findings.len());
    match report.exit_code() {
        0 => Ok(()),
        crate::error::EXIT_CONFIG => Err(Failure::Config(message).into()),
        _ => Err(anyhow::anyhow!(message)),
    }
}

async fn list(store: &Store, args: &ListArgs) -> anyhow::Result<()> {
    let (manifests, unreadable) = catalog::list(store, args.kind).await?;
    for problem in &unreadable {
        tracing::warn!("{problem}");
    }
    let text = if args.json {
        render::list_json(&manifests)?
    } else {
        render::list_table(store.name(), &manifests)
    };
    print_stdout(&text)
}

async fn restore_pg_dump(
    config: &Config,
    store: &Store,
    args: RestorePgDumpArgs,
    cancel: &CancellationToken,
) -> anyhow::Result<()> {
    let target = restore_target(args.output, args.dbname)?;
    let report =
        jobs::restore_pg_dump::restore(config, store, &args.backup, &target, cancel).await?;
    tracing::info!(
        kind = "pg-dump",
        id = %report.manifest.id,
        raw_bytes = report.raw_bytes,
        seconds = report.elapsed.as_secs_f64(),
        "restore completed; checksums verified"
    );
    Ok(())
}

/// Where `restore pg-dump` writes: a database, a new file, or stdout (never a terminal unasked).
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

async fn restore_all(
    config: &Config,
    store: &Store,
    args: &RestoreAllArgs,
    cancel: &CancellationToken,
) -> anyhow::Result<()> {
    use jobs::restore_all::AllTarget;
    let target = match (args.target_time, &args.target_name) {
        (Some(time), _) => AllTarget::Time(time),
        (None, Some(name)) => AllTarget::Name(name.clone()),
        (None, None) => {
            return Err(Failure::Config("give --target-time or --target-name".into()).into());
        }
    };
    let request = jobs::restore_all::RestoreAllRequest {
        target,
        pg: jobs::restore_pg::RestorePgRequest {
            pgdata: std::path::absolute(&args.pgdata).unwrap_or(args.pgdata.clone()),
            backup: Selector::Latest,
            target: pitr::RecoveryTarget::Latest,
            action: pitr::TargetAction::Promote,
            timeline: args.target_timeline,
            archive_off: args.archive_mode == ArchiveMode::Off,
            start: args.start.then(jobs::restore_pg::StartOptions::default),
        },
        redis_output: args.redis_output.clone(),
        etcd_output: args.etcd_output.clone(),
    };
    let report = jobs::restore_all::restore_all(config, store, &request, cancel).await?;
    eprintln!("{}", render::restore_all(&report));
    Ok(())
}

async fn restore_pg(
    config: &Config,
    store: &Store,
    args: &RestorePgArgs,
    cancel: &CancellationToken,
) -> anyhow::Result<()> {
    let request = jobs::restore_pg::RestorePgRequest {
        pgdata: std::path::absolute(&args.pgdata).unwrap_or(args.pgdata.clone()),
        backup: args.backup.clone(),
        target: args.target(),
        action: args.action(),
        timeline: args.target_timeline,
        archive_off: args.archive_mode == ArchiveMode::Off,
        start: args.start.then(jobs::restore_pg::StartOptions::default),
    };
    let report = jobs::restore_pg::restore(config, store, &request, cancel).await?;
    eprintln!("{}", render::restore_pg(&report, &request));
    Ok(())
}

async fn verify(
    config: &Config,
    store: &Store,
    args: VerifyArgs,
    cancel: &CancellationToken,
) -> anyhow::Result<()> {
    if args.restore {
        let kind = args.kind.unwrap_or(Kind::PgBase);
        let selector = args.id.map_or(Selector::Latest, Selector::Id);
        let drill = jobs::drill::drill(config, store, kind, selector, cancel).await?;
        return print_stdout(&format!("{}\n", render::drill(&drill)));
    }
    let report = jobs::verify::verify(store, args.kind, args.id.as_ref(), cancel).await?;
    print_stdout(&render::verify(&report))?;
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

async fn retention(config: &Config, store: &Store, args: &RetentionArgs) -> anyhow::Result<()> {
    let now = args.now.unwrap_or_else(chrono::Utc::now);
    let s3 = config.store.location.s3();
    let report = jobs::retention::run(store, s3, &config.retention, now, args.dry_run).await?;
    if let Some(reason) = &report.uploads_unchecked {
        tracing::warn!("stale multipart uploads not checked: {reason}");
    }
    if let Some(note) = config
        .store
        .location
        .s3_only("aborting stale multipart uploads")
    {
        tracing::info!("{note}: Azure drops uncommitted blocks by itself after 7 days");
    }
    print_stdout(&render::retention_plan(&report, args.dry_run))?;
    eprintln!("{}", render::retention_summary(&report, args.dry_run));
    Ok(())
}

/// restore_command. PostgreSQL signals it on shutdown: stop at once (exit 255), never leave it
/// waiting on a store that does not answer. A segment the prefetcher already checked, from
/// this very store, is a rename away.
/// The `--as-of` view of the store, for the commands that only read it; refused for the rest
/// and for a store that keeps no versions.
async fn as_of_view(
    config: &Config,
    command: &Command,
) -> anyhow::Result<Option<crate::store::versions::AsOf>> {
    let Some(time) = config.as_of else {
        return Ok(None);
    };
    // wal-prefetch is wal-fetch's helper: it reads as of the same moment.
    let reads_only = matches!(
        command,
        Command::List(_)
            | Command::Restore(_)
            | Command::Verify(_)
            | Command::WalFetch(_)
            | Command::WalPrefetch(_)
    );
    if !reads_only {
        return Err(Failure::Config(
            "--as-of is for list, restore, verify and wal-fetch: this command writes to the store"
                .to_string(),
        )
        .into());
    }
    if let Some(note) = config.store.location.s3_only("--as-of") {
        return Err(Failure::Config(note).into());
    }
    let crate::config::StoreLocation::S3(s3) = &config.store.location else {
        return Err(Failure::Config(format!(
            "--as-of needs a versioned S3 bucket; {} is a directory",
            config.store.location
        ))
        .into());
    };
    let name = config.store.location.to_string();
    Ok(Some(
        crate::store::versions::AsOf::open(s3, &name, time).await?,
    ))
}

async fn wal_fetch(
    config: &Config,
    store: &Store,
    args: &WalFetchArgs,
    cancel: &CancellationToken,
) -> anyhow::Result<()> {
    let spool = crate::wal::prefetch::spool_dir(&args.dest, store.name());
    if !(config.wal_prefetch && crate::wal::prefetch::take(&spool, &args.dest, &args.name)) {
        let fetched = tokio::select! {
            fetched = crate::wal::fetch(store, &args.name, &args.dest) => fetched,
            () = cancel.cancelled() => Err(Failure::Interrupted(format!("fetching {} interrupted", args.name)).into()),
        };
        match fetched {
            Ok(bytes) => tracing::debug!(name = %args.name, bytes, "WAL restored"),
            Err(error) => {
                if crate::error::is_not_found(&error) {
                    // The end of the archive: nothing more to prefetch.
                    crate::wal::prefetch::clear(&spool);
                }
                return Err(error);
            }
        }
    }
    crate::wal::prefetch::forget_before(&spool, &args.name);
    crate::wal::prefetch::start_behind(&spool, &args.name, config);
    Ok(())
}

fn print_stdout(text: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .context("writing to stdout")
}
