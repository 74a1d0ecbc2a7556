//! `backup pg-dump`: pg_dump's stdout through the pipeline into the store, committed only when
//! pg_dump exited 0 and the stored object has the size the pipeline counted.

use chrono::Utc;
use tokio_util::sync::CancellationToken;

use crate::catalog::manifest::{DumpFormat, Manifest, PgDumpFacts, SourceFacts};
use crate::catalog::{self, Kind, layout};
use crate::config::Config;
use crate::pipeline;
use crate::sources::postgres;
use crate::store::Store;

#[derive(Debug, Clone)]
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

    let start_time = Utc::now();
    catalog::sweep_abandoned(store, Kind::PgDump, start_time).await?;
    let id = catalog::claim_id(store, Kind::PgDump, start_time).await?;
    tracing::info!(
        kind = "pg-dump",
        id = %id,
        database = %facts.database,
        server_version = %facts.server_version,
        store = %store.name(),
        "backup started"
    );
    let object_name = match request.format {
        DumpFormat::Custom => "dump.custom.zst",
        DumpFormat::Plain => "dump.sql.zst",
    };
    let key = layout::data_key(Kind::PgDump, &id, object_name);

    let stored = async {
        let (dump, stdout) =
            postgres::spawn_pg_dump(&pg_dump, &config.postgres, request.format, &request.tables)?;
        let summary = match pipeline::upload(store, &key, stdout, &config.pipeline, cancel).await {
            Ok(summary) => summary,
            Err(error) => {
                dump.kill().await;
                return Err(anyhow::Error::new(error));
            }
        };
        // The stream ended; only pg_dump's exit status says whether it was the whole dump.
        dump.finish().await?;
        super::check_stored_size(store, &key, summary.stored_bytes).await?;
        Ok(summary)
    }
    .await;

    let summary = match stored {
        Ok(summary) => summary,
        Err(error) => {
            super::discard(store, Kind::PgDump, &id).await;
            return Err(error.context(format!("pg-dump backup {id} failed; nothing was committed")));
        }
    };

    let source = SourceFacts::PgDump(PgDumpFacts {
        database: facts.database.clone(),
        server_version: Some(facts.server_version.clone()),
        server_version_num: Some(facts.server_version_num),
        pg_dump_version,
        format: request.format,
        tables: request.tables.clone(),
    });
    let manifest = super::single_object_manifest(
        Kind::PgDump,
        &id,
        start_time,
        config,
        source,
        &key,
        &summary,
    );
    super::commit_or_discard(store, &manifest).await?;
    tracing::info!(
        kind = "pg-dump",
        id = %id,
        raw_bytes = summary.raw_bytes,
        stored_bytes = summary.stored_bytes,
        parts = summary.parts,
        seconds = summary.elapsed.as_secs_f64(),
        peak_rss_bytes = super::peak_rss_bytes().unwrap_or_default(),
        "backup completed"
    );
    Ok(manifest)
}
