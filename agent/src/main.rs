//! The `gc-backup` binary: parse, set up logging and signals, run one command, exit with the
//! contract's code and one clear line on failure.

use std::process::ExitCode;

use clap::Parser;
use gc_backup::cli::{self, Cli, LogFormat};
use gc_backup::error::exit_code_for;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.global.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("gc-backup: error: cannot start the async runtime: {error}");
            return ExitCode::from(gc_backup::error::EXIT_FAILURE);
        }
    };
    let result = runtime.block_on(async {
        let cancel = CancellationToken::new();
        watch_signals(cancel.clone());
        cli::run(cli, cancel).await
    });
    // Blocking workers (zstd, restore sinks) stop by themselves once their channels close.
    runtime.shutdown_timeout(std::time::Duration::from_secs(5));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("gc-backup: error: {error:#}");
            exit_code_for(&error)
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_env("GC_BACKUP_LOG")
        .unwrap_or_else(|_| EnvFilter::new("gc_backup=info,warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.compact().init(),
    }
}

/// SIGINT and SIGTERM cancel the job: uploads in flight are aborted, nothing is committed.
fn watch_signals(cancel: CancellationToken) {
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut interrupt), Ok(mut terminate)) = (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) else {
            tracing::warn!("cannot watch signals; SIGTERM will kill without cleanup");
            return;
        };
        tokio::select! {
            _ = interrupt.recv() => tracing::warn!("SIGINT: stopping"),
            _ = terminate.recv() => tracing::warn!("SIGTERM: stopping"),
        }
        cancel.cancel();
    });
}
