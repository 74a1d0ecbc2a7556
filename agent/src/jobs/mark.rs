//! `gc-backup mark NAME`: one moment for all of GC Storage. A PostgreSQL restore point, a Redis
//! backup started the moment after it and an etcd snapshot (when etcd is configured), recorded
//! together in a *point* manifest (`manifests/point/<id>.json`) that `restore all --target-name`
//! restores from.
//!
//! The point is written last, through the same claim-and-commit run as every backup: a failure
//! of any part leaves no point (the parts that did complete stay as ordinary backups).

use anyhow::Context;
use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

use super::backup::BackupRun;
use crate::catalog::manifest::{
    MANIFEST_FORMAT, Manifest, PartPoint, PointFacts, PostgresPoint, SourceFacts,
};
use crate::catalog::{self, Kind};
use crate::config::Config;
use crate::error::Failure;
use crate::store::Store;

/// PostgreSQL's limit for a restore point's name (MAXFNAMELEN − 1).
const MAX_NAME: usize = 63;

/// The points in the store whose name is `name`, newest last.
pub async fn find_named(store: &Store, name: &str) -> anyhow::Result<Vec<Manifest>> {
    let (mut points, unreadable) = catalog::list(store, Some(Kind::Point)).await?;
    for problem in &unreadable {
        tracing::warn!("{problem}");
    }
    points.retain(|m| matches!(&m.source, SourceFacts::Point(p) if p.name == name));
    points.sort_by_key(|m| (m.end_time, m.id.clone()));
    Ok(points)
}

/// The facts of a point manifest.
pub fn facts(manifest: &Manifest) -> anyhow::Result<&PointFacts> {
    match &manifest.source {
        SourceFacts::Point(facts) => Ok(facts),
        _ => Err(Failure::Corrupt(format!("{} is not a point manifest", manifest.id)).into()),
    }
}

/// Makes the point `name` (none: `scheduled-<id>`, for the sidecar's `[schedule] mark`) and
/// returns its committed manifest.
pub async fn mark(
    config: &Config,
    store: &Store,
    name: Option<&str>,
    cancel: &CancellationToken,
) -> anyhow::Result<Manifest> {
    // Everything the parts need is checked before PostgreSQL is asked for anything.
    let redis = config
        .redis
        .endpoint()
        .context("a point includes a Redis backup")?;
    let etcd = (!config.etcd.urls.is_empty()).then_some(&config.etcd);
    if let Some(name) = name {
        check_name(name)?;
        if let Some(existing) = find_named(store, name).await?.last() {
            return Err(Failure::Config(format!(
                "a point named '{name}' exists already ({}): names must be unique, or a restore \
                 to it by name would be ambiguous",
                existing.id
            ))
            .into());
        }
    }
    let mut run = BackupRun::begin(config, store, Kind::Point).await?;
    let name = name.map_or_else(|| format!("scheduled-{}", run.id()), str::to_string);
    tracing::info!(kind = "point", id = %run.id(), %name, "mark started");
    let facts = run
        .guard(async {
            let client = crate::sources::postgres::connect(&config.postgres).await?;
            let postgres = create_restore_point(config, &client, &name).await?;
            // The Redis snapshot is taken while the point's segment is switched and archived:
            // the two moments are as close as a fork of Redis is to the query's answer.
            let archived = async {
                switch_wal(config, &client).await?;
                super::pg_base::await_wal(
                    config,
                    store,
                    config.postgres.pgdata.as_deref(),
                    vec![postgres.wal.clone()],
                    &format!("point '{name}' needs"),
                    cancel,
                )
                .await
            };
            let redis_backup = super::redis::backup(
                config,
                store,
                redis,
                config.redis.aof_dir.as_deref(),
                cancel,
            );
            let ((), redis) = tokio::try_join!(archived, redis_backup)?;
            let etcd = match etcd {
                Some(endpoints) => {
                    Some(super::etcd::backup(config, store, endpoints, cancel).await?)
                }
                None => None,
            };
            let part = |m: &Manifest| PartPoint {
                id: m.id.clone(),
                time: m.start_time,
            };
            anyhow::Ok(PointFacts {
                name: name.clone(),
                postgres,
                redis: part(&redis),
                etcd: etcd.as_ref().map(part),
            })
        })
        .await
        .with_context(|| {
            format!(
                "mark '{name}' failed and no point was written (a restore point of this name \
                 may be in PostgreSQL's WAL already: give the next mark another name)"
            )
        })?;
    let manifest = run.manifest(MANIFEST_FORMAT, SourceFacts::Point(facts), Vec::new());
    run.commit(&manifest).await?;
    Ok(manifest)
}

fn check_name(name: &str) -> anyhow::Result<()> {
    if name.trim().is_empty() || name.len() > MAX_NAME || name.chars().any(char::is_control) {
        return Err(Failure::Config(format!(
            "'{name}' cannot name a point: 1 to {MAX_NAME} bytes, no control characters \
             (PostgreSQL's limit for restore points)"
        ))
        .into());
    }
    Ok(())
}

async fn create_restore_point(
    config: &Config,
    client: &tokio_postgres::Client,
    name: &str,
) -> anyhow::Result<PostgresPoint> {
    const QUERY: &str = "WITH point AS (SELECT pg_create_restore_point($1) AS lsn) \
         SELECT point.lsn::text, pg_walfile_name(point.lsn), \
                extract(epoch FROM clock_timestamp())::float8, \
                (SELECT system_identifier::text FROM pg_control_system()) \
         FROM point";
    let row = client.query_one(QUERY, &[&name]).await.map_err(|error| {
        crate::sources::postgres::query_error(&config.postgres, "pg_create_restore_point()", &error)
    })?;
    let (lsn, wal, epoch, system_identifier): (String, String, f64, String) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    let file = pitr::WalFile::parse(&wal)
        .map_err(|e| anyhow::anyhow!("the server named the point's segment {wal:?}: {e}"))?;
    let pitr::WalFile::Segment { timeline, .. } = file else {
        anyhow::bail!("the server named the point's segment {wal:?}");
    };
    let time = DateTime::<Utc>::from_timestamp_micros((epoch * 1e6).round() as i64)
        .unwrap_or_else(Utc::now);
    tracing::info!(kind = "point", %name, %lsn, %wal, "restore point created");
    Ok(PostgresPoint {
        lsn,
        timeline,
        wal,
        time,
        system_identifier,
    })
}

/// Ends the segment that holds the point, so that it is archived now rather than when it fills.
async fn switch_wal(config: &Config, client: &tokio_postgres::Client) -> anyhow::Result<()> {
    client
        .execute("SELECT pg_switch_wal()", &[])
        .await
        .map_err(|error| {
            crate::sources::postgres::query_error(&config.postgres, "pg_switch_wal()", &error)
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_postgres_would_refuse_are_refused_first() {
        assert!(check_name("before-nightly-batch").is_ok());
        assert!(check_name(&"x".repeat(63)).is_ok());
        for bad in ["", "  ", "a\nb", &"x".repeat(64)] {
            let error = check_name(bad).unwrap_err();
            assert!(error.to_string().contains("cannot name a point"), "{bad:?}");
        }
    }
}
