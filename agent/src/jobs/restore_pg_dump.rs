//! `restore pg-dump`: the stored dump back through zstd and its SHA-256 check into a file,
//! stdout, or `pg_restore`/`psql` running in one transaction.

use std::io::BufWriter;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::process::Command;
use tokio_util::io::SyncIoBridge;
use tokio_util::sync::CancellationToken;

use crate::catalog::manifest::{DumpFormat, Manifest, SourceFacts};
use crate::catalog::{self, Kind, Selector};
use crate::config::Config;
use crate::error::Failure;
use crate::pipeline::{self, PipelineError, Sink};
use crate::sources::postgres::redact_conninfo;
use crate::sources::postgres::{self, Supervised};
use crate::store::Store;

/// Where the restored dump goes.
#[derive(Debug, Clone)]
pub enum RestoreTarget {
    /// A new file; written beside as `<file>.partial` and renamed once checked.
    File(PathBuf),
    Stdout,
    /// A database (libpq connection string or name), loaded in a single transaction.
    Database(String),
}

#[derive(Debug)]
pub struct RestoreReport {
    pub manifest: Manifest,
    pub raw_bytes: u64,
    pub elapsed: Duration,
}

pub async fn restore(
    config: &Config,
    store: &Store,
    selector: &Selector,
    target: &RestoreTarget,
    cancel: &CancellationToken,
) -> anyhow::Result<RestoreReport> {
    let manifest = catalog::find(store, Kind::PgDump, selector).await?;
    super::can_open(store, &manifest)?;
    let SourceFacts::PgDump(facts) = &manifest.source else {
        anyhow::bail!("backup {} is not a pg-dump backup", manifest.id);
    };
    let [object] = manifest.objects.as_slice() else {
        anyhow::bail!(
            "pg-dump backup {} has {} objects, expected 1",
            manifest.id,
            manifest.objects.len()
        );
    };
    let started = Instant::now();
    tracing::info!(kind = "pg-dump", id = %manifest.id, "restore started");
    let work = async {
        match target {
            RestoreTarget::File(path) => super::restore_to_file(store, object, path).await,
            RestoreTarget::Stdout => {
                let sink: Sink = Box::new(BufWriter::with_capacity(256 * 1024, std::io::stdout()));
                pipeline::download(store, &super::expected(object), sink)
                    .await
                    .map(drop)
                    .map_err(anyhow::Error::from)
            }
            RestoreTarget::Database(conninfo) => {
                let major = facts.server_version_num.map(|n| n / 10_000);
                restore_to_database(config, store, object, facts.format, conninfo, major).await
            }
        }
    };
    tokio::select! {
        result = work => result.with_context(|| format!("restore of pg-dump backup {} failed", manifest.id))?,
        () = cancel.cancelled() => {
            return Err(anyhow::Error::new(Failure::Interrupted(format!(
                "restore of pg-dump backup {} interrupted", manifest.id
            ))));
        }
    }
    Ok(RestoreReport {
        raw_bytes: object.raw_bytes,
        manifest,
        elapsed: started.elapsed(),
    })
}

async fn restore_to_database(
    config: &Config,
    store: &Store,
    object: &catalog::StoredObject,
    format: DumpFormat,
    conninfo: &str,
    server_major: Option<u32>,
) -> anyhow::Result<()> {
    let bin_dir = postgres::client_bin_dir(&config.postgres, server_major);
    let (name, mut command) = match format {
        DumpFormat::Custom => {
            let mut command =
                Command::new(postgres::client_binary(bin_dir.as_deref(), "pg_restore"));
            command.arg(format!("--dbname={conninfo}")).args([
                "--single-transaction",
                "--exit-on-error",
                "--no-password",
            ]);
            ("pg_restore", command)
        }
        DumpFormat::Plain => {
            let mut command = Command::new(postgres::client_binary(bin_dir.as_deref(), "psql"));
            command
                .arg(format!("--dbname={conninfo}"))
                .args(["-X", "--quiet", "--no-password", "--single-transaction"])
                .args(["--set", "ON_ERROR_STOP=1"]);
            ("psql", command)
        }
    };
    postgres::apply_libpq_env(&mut command, &config.postgres);
    command.stdin(Stdio::piped()).stdout(Stdio::null());
    let mut loader = Supervised::spawn(name, command)?;
    let stdin = loader
        .stdin()
        .ok_or_else(|| anyhow::anyhow!("{name} has no stdin"))?;
    let sink: Sink = Box::new(SyncIoBridge::new(stdin));
    tracing::info!(program = name, database = %redact_conninfo(conninfo), "loading into the database");
    match pipeline::download(store, &super::expected(object), sink).await {
        Ok(sink) => {
            // Closing stdin lets the loader reach the end and commit.
            drop(sink);
            loader.finish().await.map_err(anyhow::Error::from)
        }
        Err(error) => {
            // Killed before it saw the end of input: its transaction is rolled back.
            let said = loader.kill().await;
            match error {
                PipelineError::Sink(_) if !said.is_empty() => {
                    Err(anyhow::anyhow!("{name} stopped: {said}"))
                }
                other => Err(anyhow::Error::new(other).context(format!(
                    "nothing was committed to the database ({name} was stopped)"
                ))),
            }
        }
    }
}
