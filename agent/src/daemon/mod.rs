//! The sidecar, `gc-backup run`: long-running work beside PostgreSQL. Today that is
//! look-ahead WAL archiving ([`archiver`]); schedules, retention, metrics and health come next.
//!
//! Shutdown is a parameter: [`run`] returns once `shutdown` fires and the work in flight has
//! finished, so tests pass their own token and SIGTERM is handled in `main`.

pub mod archiver;

use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::error::Failure;
use crate::store::Store;

pub async fn run(config: Config, store: Store, shutdown: CancellationToken) -> anyhow::Result<()> {
    let pgdata = config.postgres.pgdata.clone().ok_or_else(|| {
        Failure::Config("the sidecar needs the data directory: PGDATA or [postgres] pgdata".into())
    })?;
    if !pgdata.join("pg_wal/archive_status").is_dir() {
        return Err(Failure::Config(format!(
            "{} has no pg_wal/archive_status: is it a PostgreSQL data directory?",
            pgdata.display()
        ))
        .into());
    }
    let status = Arc::new(Mutex::new(archiver::ArchiverStatus::default()));
    archiver::run(Arc::new(config), store, pgdata, status, shutdown).await
}
