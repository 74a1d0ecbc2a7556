//! `backup pg-dump`: pg_dump's stdout through the pipeline into the store, committed only when
//! pg_dump exited 0 and the stored object has the size the pipeline counted.

use tokio_util::sync::CancellationToken;

use super::backup::{BackupRun, check_stored_size, stored_object};
use crate::catalog::Kind;
use crate::catalog::manifest::{DumpFormat, MANIFEST_FORMAT, Manifest, PgDumpFacts, SourceFacts};
use crate::config::Config;
use crate::pipeline;
use crate::sources::postgres;
use crate::store::Store;

#[derive(Debug, Clone, Default)]
pub struct PgDumpRequest {
    pub format: DumpFormat,
    pub tables: Vec<String>,
}

/// Takes a logical backup and returns its committed manifest.
pub async fn backup(
    config: &Config,
    store: &Store,
    request: &PgDumpRequest,
    cancel: &CancellationToken,
) -> anyhow::Result<Manifest> {
    // Ask the server first: a wrong database or password fails here, before any upload.
    let facts = postgres::server_facts(&config.postgres).await?;
    let bin_dir = postgres::client_bin_dir(&config.postgres, Some(facts.major()));
    let pg_dump = postgres::client_binary(bin_dir.as_deref(), "pg_dump");
    let pg_dump_version = postgres::tool_version(&pg_dump).await?;

    let mut run = BackupRun::begin(config, store, Kind::PgDump).await?;
    tracing::info!(
        kind = "pg-dump",
        id = %run.id(),
        database = %facts.database,
        server_version = %facts.server_version,
        store = %store.name(),
        "backup started"
    );
    let key = run.data_key(match request.format {
        DumpFormat::Custom => "dump.custom.zst",
        DumpFormat::Plain => "dump.sql.zst",
    });
    let summary = run
        .guard(async {
            let format = match request.format {
                DumpFormat::Custom => postgres::PgDumpFormat::Custom,
                DumpFormat::Plain => postgres::PgDumpFormat::Plain,
            };
            let (dump, stdout) =
                postgres::spawn_pg_dump(&pg_dump, &config.postgres, format, &request.tables)?;
            let summary =
                match pipeline::upload(store, &key, stdout, &config.pipeline, cancel).await {
                    Ok(summary) => summary,
                    Err(error) => {
                        dump.kill().await;
                        return Err(error.into());
                    }
                };
            // The stream ended; only pg_dump's exit status says whether it was the whole dump.
            dump.finish().await?;
            check_stored_size(store, &key, summary.stored_bytes).await?;
            Ok(summary)
        })
        .await?;

    let source = SourceFacts::PgDump(PgDumpFacts {
        database: facts.database.clone(),
        server_version: Some(facts.server_version.clone()),
        server_version_num: Some(facts.server_version_num),
        pg_dump_version,
        format: request.format,
        tables: request.tables.clone(),
    });
    let manifest = run.manifest(MANIFEST_FORMAT, source, vec![stored_object(&key, &summary)]);
    run.commit(&manifest).await?;
    Ok(manifest)
}
