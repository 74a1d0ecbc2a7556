//! `backup redis` and `restore redis`: an RDB snapshot from the replication protocol through
//! the pipeline into the store, committed only when the snapshot's CRC-64 checked out; and back
//! into `DIR/dump.rdb`, checked against its SHA-256.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use super::backup::{BackupRun, stored_object, upload_snapshot};
use super::redis_aof;
use crate::catalog::manifest::{MANIFEST_FORMAT, Manifest, RedisFacts, SourceFacts};
use crate::catalog::{self, Kind, Selector};
use crate::config::Config;
use crate::error::Failure;
use crate::sources::aof::{AofError, AofManifest};
use crate::sources::redis::{RedisEndpoint, Session};
use crate::store::Store;

/// Chunks queued between the socket reader and the pipeline.
const CHUNK_QUEUE: usize = 4;
const OBJECT: &str = "dump.rdb.zst";

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

    let mut run = BackupRun::begin(config, store, Kind::Redis).await?;
    let id = run.id().clone();
    tracing::info!(kind = "redis", id = %id, server = %endpoint, %redis_version, "backup started");
    let key = run.data_key(OBJECT);
    let (facts, summary, aof) = run
        .guard(async {
            let snapshot = session.sync().await?;
            let (facts, summary) = upload_snapshot(
                config,
                store,
                &key,
                CHUNK_QUEUE,
                |chunks| snapshot.stream(chunks),
                cancel,
            )
            .await?;
            let aof = match aof_dir {
                Some(dir) => Some(redis_aof::copy_set(config, store, &id, dir, cancel).await?),
                None => None,
            };
            anyhow::Ok((facts, summary, aof))
        })
        .await?;
    tracing::info!(
        kind = "redis",
        id = %id,
        rdb_version = facts.rdb_version,
        diskless = facts.diskless,
        rdb_bytes = summary.raw_bytes,
        "RDB snapshot stored"
    );

    let mut objects = vec![stored_object(&key, &summary)];
    if let Some(copy) = &aof {
        tracing::info!(
            kind = "redis",
            id = %id,
            files = copy.objects.len(),
            reused = copy.facts.files.iter().filter(|f| f.reused).count(),
            uploaded_raw_bytes = copy.uploaded_raw_bytes,
            attempts = copy.facts.attempts,
            "AOF set copied"
        );
        objects.extend(copy.objects.iter().cloned());
    }
    let source = SourceFacts::Redis(RedisFacts {
        server: endpoint.to_string(),
        redis_version,
        rdb_version: facts.rdb_version,
        crc64: facts.crc64.clone(),
        diskless: facts.diskless,
        aof: aof.map(|copy| copy.facts),
    });
    let manifest = run.manifest(MANIFEST_FORMAT, source, objects);
    run.commit(&manifest).await?;
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
    super::can_open(store, &manifest)?;
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

/// How a restore to a moment got there.
#[derive(Debug)]
pub enum Reached {
    /// The AOF set of the backup, cut at the first `#TS:` annotation after the moment.
    Aof(redis_aof::AofCut),
    /// The snapshot of the newest backup that ended before the moment, and why not the AOF.
    Snapshot { path: PathBuf, why: String },
}

#[derive(Debug)]
pub struct RestoreRedisToTime {
    pub manifest: Manifest,
    pub target: chrono::DateTime<chrono::Utc>,
    pub reached: Reached,
    pub elapsed: Duration,
}

/// What a restore to a moment writes, decided before anything is written.
#[derive(Debug, Clone)]
pub struct RedisPlan {
    pub target: chrono::DateTime<chrono::Utc>,
    pub choice: RedisChoice,
    /// For the refusal when the AOF set turns out to have no annotation to cut at.
    oldest: Manifest,
}

#[derive(Debug, Clone)]
pub enum RedisChoice {
    /// The AOF set of the first backup that ended at or after the moment, cut there; without
    /// annotations, the snapshot of `fallback`.
    Aof {
        manifest: Manifest,
        fallback: Option<Box<Manifest>>,
    },
    /// A snapshot, and why not an AOF set.
    Snapshot { manifest: Manifest, why: String },
}

impl RedisPlan {
    /// The snapshot of `manifest` and nothing else (a point's own Redis backup).
    pub fn snapshot(manifest: Manifest, why: String) -> Self {
        Self {
            target: manifest.start_time,
            oldest: manifest.clone(),
            choice: RedisChoice::Snapshot { manifest, why },
        }
    }

    /// The backup whose data is written.
    pub fn manifest(&self) -> &Manifest {
        choice_manifest(&self.choice)
    }
}

fn when(time: chrono::DateTime<chrono::Utc>) -> String {
    crate::wal::archive::human_time(time)
}

/// The refusal when nothing reaches `target`.
fn unreachable(
    target: chrono::DateTime<chrono::Utc>,
    oldest: &Manifest,
    why: &str,
) -> anyhow::Error {
    let problem = if target < oldest.start_time {
        format!(
            "the target {} is before the oldest redis backup ({}, started {}), and its AOF \
             set does not reach back to it: {why}",
            when(target),
            oldest.id,
            when(oldest.start_time)
        )
    } else {
        format!(
            "no redis backup ended at or before {}, and {why}",
            when(target)
        )
    };
    Failure::Config(format!("{problem}; nothing in the store reaches it")).into()
}

/// `restore redis --target-time T`'s choice, from the catalog alone: the AOF set of the first
/// backup that ended at or after T, else the snapshot of the newest that ended before T.
/// Refused (exit 2) when no backup reaches T.
pub async fn plan_to_time(
    store: &Store,
    target: chrono::DateTime<chrono::Utc>,
) -> anyhow::Result<RedisPlan> {
    let (mut manifests, unreadable) = catalog::list(store, Some(Kind::Redis)).await?;
    for problem in &unreadable {
        tracing::warn!("{problem}");
    }
    manifests.sort_by_key(|m| (m.end_time, m.id.clone()));
    let (Some(oldest), Some(newest)) = (manifests.first(), manifests.last()) else {
        return Err(Failure::NotFound(format!("no redis backup in {}", store.name())).into());
    };
    let has_aof =
        |m: &Manifest| matches!(&m.source, SourceFacts::Redis(facts) if facts.aof.is_some());
    // An AOF set reaches back to its base, which may be older than the backup: its own
    // check, while it is cut, says whether it reaches T.
    if target < oldest.start_time && !has_aof(oldest) {
        return Err(Failure::Config(format!(
            "the target {} is before the oldest redis backup ({}, started {}): nothing in the \
             store reaches it",
            when(target),
            oldest.id,
            when(oldest.start_time)
        ))
        .into());
    }
    if target > newest.end_time {
        return Err(Failure::Config(format!(
            "the target {} is after the newest redis backup ({}, ended {}): nothing in the \
             store reaches it yet; restore latest for that",
            when(target),
            newest.id,
            when(newest.end_time)
        ))
        .into());
    }
    let before = manifests
        .iter()
        .rev()
        .find(|m| m.end_time <= target)
        .cloned();
    let choice = match manifests
        .iter()
        .find(|m| m.end_time >= target && has_aof(m))
    {
        Some(covering) => RedisChoice::Aof {
            manifest: covering.clone(),
            fallback: before.map(Box::new),
        },
        None => {
            let why = format!(
                "no backup with an AOF set ended at or after {}",
                when(target)
            );
            match before {
                Some(manifest) => RedisChoice::Snapshot { manifest, why },
                None => return Err(unreachable(target, oldest, &why)),
            }
        }
    };
    for manifest in [Some(choice_manifest(&choice)), fallback_of(&choice)]
        .into_iter()
        .flatten()
    {
        super::can_open(store, manifest)?;
    }
    Ok(RedisPlan {
        target,
        choice,
        oldest: oldest.clone(),
    })
}

fn choice_manifest(choice: &RedisChoice) -> &Manifest {
    match choice {
        RedisChoice::Aof { manifest, .. } | RedisChoice::Snapshot { manifest, .. } => manifest,
    }
}

fn fallback_of(choice: &RedisChoice) -> Option<&Manifest> {
    match choice {
        RedisChoice::Aof { fallback, .. } => fallback.as_deref(),
        RedisChoice::Snapshot { .. } => None,
    }
}

/// `restore redis --target-time T`: the AOF set of the first backup that ended at or after T,
/// cut at T (Redis 7's `aof-timestamp-enabled` annotations), written as `DIR/<its directory>`
/// alone (that backup's snapshot is later than T); without annotations, or without an AOF set,
/// the snapshot of the newest backup that ended before T as `DIR/dump.rdb`, saying so.
pub async fn restore_to_time(
    store: &Store,
    target: chrono::DateTime<chrono::Utc>,
    dir: &Path,
    cancel: &CancellationToken,
) -> anyhow::Result<RestoreRedisToTime> {
    let plan = plan_to_time(store, target).await?;
    restore_planned(store, &plan, dir, cancel).await
}

/// Writes what `plan` chose into `dir`; on failure, removes what it wrote.
pub async fn restore_planned(
    store: &Store,
    plan: &RedisPlan,
    dir: &Path,
    cancel: &CancellationToken,
) -> anyhow::Result<RestoreRedisToTime> {
    let created = !dir.exists();
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let started = Instant::now();
    let target = plan.target;
    let (snapshot, why) = match &plan.choice {
        RedisChoice::Snapshot { manifest, why } => (manifest, why.clone()),
        RedisChoice::Aof { manifest, fallback } => {
            let SourceFacts::Redis(RedisFacts { aof: Some(aof), .. }) = &manifest.source else {
                anyhow::bail!("redis backup {} has no AOF set", manifest.id);
            };
            let seconds = u64::try_from(target.timestamp()).unwrap_or(0);
            let work = redis_aof::restore_set_until(store, manifest, aof, dir, Some(seconds));
            let done = tokio::select! {
                done = work => done.with_context(|| format!("restore of redis backup {} failed", manifest.id))?,
                () = cancel.cancelled() => {
                    return Err(Failure::Interrupted(format!("restore of redis backup {} interrupted", manifest.id)).into());
                }
            };
            match (done, fallback) {
                (Ok(cut), _) => {
                    return Ok(RestoreRedisToTime {
                        manifest: manifest.clone(),
                        target,
                        reached: Reached::Aof(cut),
                        elapsed: started.elapsed(),
                    });
                }
                (Err(why), Some(fallback)) => (&**fallback, why),
                (Err(why), None) => {
                    if created {
                        let _ = std::fs::remove_dir(dir);
                    }
                    return Err(unreachable(target, &plan.oldest, &why));
                }
            }
        }
    };
    let Some(object) = snapshot.objects.first() else {
        anyhow::bail!("redis backup {} has no objects", snapshot.id);
    };
    let path = dir.join("dump.rdb");
    tokio::select! {
        done = super::restore_to_file(store, object, &path) => {
            done.with_context(|| format!("restore of redis backup {} failed", snapshot.id))?;
        }
        () = cancel.cancelled() => {
            let _ = std::fs::remove_file(&path);
            return Err(Failure::Interrupted(format!("restore of redis backup {} interrupted", snapshot.id)).into());
        }
    }
    Ok(RestoreRedisToTime {
        manifest: snapshot.clone(),
        target,
        reached: Reached::Snapshot { path, why },
        elapsed: started.elapsed(),
    })
}
