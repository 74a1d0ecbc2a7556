//! `backup redis` and `restore redis`: an RDB snapshot from the replication protocol through
//! the pipeline into the store, committed only when the snapshot's CRC-64 checked out; and back
//! into `DIR/dump.rdb`, checked against its SHA-256.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::Utc;
use tokio_util::sync::CancellationToken;

use super::redis_aof;
use crate::catalog::manifest::{Manifest, RedisFacts, SourceFacts};
use crate::catalog::{self, Kind, Selector, layout};
use crate::config::Config;
use crate::error::Failure;
use crate::sources::aof::{AofError, AofManifest};
use crate::sources::redis::{RedisEndpoint, Session};
use crate::store::Store;

/// Chunks queued between the socket reader and the pipeline.
const CHUNK_QUEUE: usize = 4;
const OBJECT: &str = "dump.rdb.zst";

/// The server to back up: `--redis-url`, else the configuration; a password from the
/// configuration (or `REDISCLI_AUTH`) when the URL has none.
pub fn endpoint(config: &Config, flag: Option<&str>) -> anyhow::Result<RedisEndpoint> {
    let url = flag
        .map(str::to_string)
        .or_else(|| config.redis.url.clone())
        .ok_or_else(|| {
            Failure::Config(
                "no Redis to back up: give --redis-url, GC_BACKUP_REDIS_URL or [redis] url".into(),
            )
        })?;
    let mut endpoint = RedisEndpoint::parse(&url)?;
    if endpoint.password.is_none() {
        endpoint.password.clone_from(&config.redis.password);
    }
    if let Some(files) = &mut endpoint.tls {
        files.ca_file.clone_from(&config.redis.ca_file);
        files.cert_file.clone_from(&config.redis.cert_file);
        files.key_file.clone_from(&config.redis.key_file);
    }
    Ok(endpoint)
}

/// Takes an RDB snapshot of `endpoint`, then (with `aof_dir`) copies its AOF set, and returns
/// the committed manifest.
pub async fn backup(
    config: &Config,
    store: &Store,
    endpoint: &RedisEndpoint,
    aof_dir: Option<&Path>,
    cancel: &CancellationToken,
) -> anyhow::Result<Manifest> {
    // A directory that is not an AOF set is a configuration error, found before anything runs.
    if let Some(dir) = aof_dir {
        AofManifest::read(dir).map_err(|error| match error {
            AofError::NotAof(message) => anyhow::Error::new(Failure::Config(message)),
            other => anyhow::Error::new(Failure::Config(other.to_string())),
        })?;
    }
    // Connect and authenticate first: a wrong password fails before anything is stored.
    let mut session = Session::open(endpoint).await?;
    let redis_version = session.server_version().await?;

    let start_time = Utc::now();
    catalog::sweep_abandoned(store, Kind::Redis, start_time).await?;
    let id = catalog::claim_id(store, Kind::Redis, start_time).await?;
    tracing::info!(kind = "redis", id = %id, server = %endpoint, %redis_version, "backup started");
    let key = layout::data_key(Kind::Redis, &id, OBJECT);

    let stored = async {
        let snapshot = session.sync().await?;
        let (facts, summary) = super::upload_snapshot(
            config,
            store,
            &key,
            CHUNK_QUEUE,
            |chunks| async {
                let facts = snapshot.stream(chunks).await?;
                let bytes = facts.bytes;
                Ok((facts, bytes))
            },
            cancel,
        )
        .await?;
        let aof = match aof_dir {
            Some(dir) => Some(redis_aof::copy_set(config, store, &id, dir, cancel).await?),
            None => None,
        };
        anyhow::Ok((facts, summary, aof))
    }
    .await;
    let (facts, summary, aof) = match stored {
        Ok(done) => done,
        Err(error) => {
            super::discard(store, Kind::Redis, &id).await;
            return Err(error.context(format!("redis backup {id} failed; nothing was committed")));
        }
    };

    let source = SourceFacts::Redis(RedisFacts {
        server: endpoint.to_string(),
        redis_version,
        rdb_version: facts.rdb_version,
        crc64: facts.crc64.clone(),
        diskless: facts.diskless,
        aof: aof.as_ref().map(|copy| copy.facts.clone()),
    });
    let mut manifest =
        super::single_object_manifest(Kind::Redis, &id, start_time, config, source, &key, &summary);
    if let Some(copy) = aof {
        tracing::info!(
            kind = "redis",
            id = %id,
            files = copy.objects.len(),
            reused = copy.facts.files.iter().filter(|f| f.reused).count(),
            uploaded_raw_bytes = copy.uploaded_raw_bytes,
            attempts = copy.facts.attempts,
            "AOF set copied"
        );
        for object in copy.objects {
            manifest.raw_bytes += object.raw_bytes;
            manifest.stored_bytes += object.stored_bytes;
            manifest.objects.push(object);
        }
    }
    super::commit_or_discard(store, &manifest).await?;
    tracing::info!(
        kind = "redis",
        id = %id,
        raw_bytes = summary.raw_bytes,
        stored_bytes = summary.stored_bytes,
        rdb_version = facts.rdb_version,
        diskless = facts.diskless,
        seconds = summary.elapsed.as_secs_f64(),
        peak_rss_bytes = super::peak_rss_bytes().unwrap_or_default(),
        "backup completed"
    );
    Ok(manifest)
}

#[derive(Debug)]
pub struct RestoreRedisReport {
    pub manifest: Manifest,
    /// `DIR/dump.rdb`.
    pub path: PathBuf,
    /// `DIR/<appenddirname>`, when the backup has an AOF set.
    pub aof_dir: Option<PathBuf>,
    pub elapsed: Duration,
}

/// Writes the snapshot to `DIR/dump.rdb` and the AOF set, if any, to `DIR/<its directory>`:
/// new files only, each checked before it gets its name.
pub async fn restore(
    store: &Store,
    selector: &Selector,
    dir: &Path,
    cancel: &CancellationToken,
) -> anyhow::Result<RestoreRedisReport> {
    let manifest = catalog::find(store, Kind::Redis, selector).await?;
    let SourceFacts::Redis(facts) = &manifest.source else {
        anyhow::bail!("backup {} is not a redis backup", manifest.id);
    };
    let (Some(object), expected) = (
        manifest.objects.first(),
        1 + facts.aof.as_ref().map_or(0, |a| a.files.len()),
    ) else {
        anyhow::bail!("redis backup {} has no objects", manifest.id);
    };
    if manifest.objects.len() != expected {
        return Err(Failure::Corrupt(format!(
            "redis backup {} has {} objects, expected {expected}",
            manifest.id,
            manifest.objects.len()
        ))
        .into());
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join("dump.rdb");
    let aof_target = facts.aof.as_ref().map(|aof| dir.join(&aof.dir));
    // Refuse before writing anything, so that a refused restore leaves DIR as it was.
    for existing in std::iter::once(&path).chain(aof_target.as_ref()) {
        if existing.exists() {
            return Err(Failure::Config(format!(
                "{} already exists; restore writes only new files",
                existing.display()
            ))
            .into());
        }
    }
    let started = Instant::now();
    let work = async {
        super::restore_to_file(store, object, &path).await?;
        match &facts.aof {
            Some(aof) => {
                let written = redis_aof::restore_set(store, &manifest, aof, dir).await;
                if written.is_err() {
                    // All or nothing: the snapshot goes too.
                    let _ = std::fs::remove_file(&path);
                }
                written.map(Some)
            }
            None => Ok(None),
        }
    };
    let aof_dir = tokio::select! {
        result = work => {
            result.with_context(|| format!("restore of redis backup {} failed", manifest.id))?
        }
        () = cancel.cancelled() => {
            let _ = std::fs::remove_file(&path);
            return Err(Failure::Interrupted(format!("restore of redis backup {} interrupted", manifest.id)).into());
        }
    };
    Ok(RestoreRedisReport {
        manifest,
        path,
        aof_dir,
        elapsed: started.elapsed(),
    })
}
