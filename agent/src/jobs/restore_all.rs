//! `restore all (--target-time T | --target-name NAME)`: PostgreSQL, Redis and etcd to one
//! moment. Every part is planned and checked before anything is written, with the checks each
//! engine's own restore makes; then Redis, etcd and PostgreSQL (the longest) are written, and a
//! failure of any part removes what the others wrote: the directories are as they were.
//!
//! The moment of each part: PostgreSQL's is the target itself (the point's restore point for a
//! name); Redis' is the target when its AOF set is cut there, else the snapshot it fell back to
//! (a point's own snapshot for a name); etcd's is the newest snapshot not after the target (the
//! point's own for a name).

use std::path::PathBuf;

use chrono::{DateTime, Utc};
use pitr::RecoveryTarget;
use tokio_util::sync::CancellationToken;

use super::redis::{RedisPlan, RestoreRedisToTime};
use super::restore_pg::{RestorePgReport, RestorePgRequest};
use crate::catalog::{self, Kind, Manifest, Selector};
use crate::config::Config;
use crate::error::Failure;
use crate::store::{Store, StoreError};

/// The one moment of a `restore all`.
#[derive(Debug, Clone)]
pub enum AllTarget {
    Time(DateTime<Utc>),
    /// A point made with `gc-backup mark`.
    Name(String),
}

#[derive(Debug, Clone)]
pub struct RestoreAllRequest {
    pub target: AllTarget,
    /// PostgreSQL's part: everything but the target, which is `target`'s.
    pub pg: RestorePgRequest,
    pub redis_output: PathBuf,
    pub etcd_output: Option<PathBuf>,
}

#[derive(Debug)]
pub struct RestoreAllReport {
    pub pg: RestorePgReport,
    pub pg_request: RestorePgRequest,
    /// The moment PostgreSQL recovers to.
    pub pg_moment: DateTime<Utc>,
    pub redis: RestoreRedisToTime,
    pub redis_moment: DateTime<Utc>,
    pub etcd: Option<(super::etcd::RestoreEtcdReport, DateTime<Utc>)>,
    /// The point restored, for a name.
    pub point: Option<Manifest>,
}

impl RestoreAllReport {
    /// How far apart the moments of the parts are.
    pub fn spread(&self) -> chrono::TimeDelta {
        let moments = [self.pg_moment, self.redis_moment]
            .into_iter()
            .chain(self.etcd.as_ref().map(|(_, moment)| *moment));
        let (low, high) = moments.fold(
            (DateTime::<Utc>::MAX_UTC, DateTime::<Utc>::MIN_UTC),
            |(l, h), m| (l.min(m), h.max(m)),
        );
        high - low
    }
}

pub async fn restore_all(
    config: &Config,
    store: &Store,
    request: &RestoreAllRequest,
    cancel: &CancellationToken,
) -> anyhow::Result<RestoreAllReport> {
    let point = match &request.target {
        AllTarget::Time(_) => None,
        AllTarget::Name(name) => {
            let Some(point) = super::mark::find_named(store, name).await?.pop() else {
                return Err(Failure::Config(format!(
                    "there is no point named '{name}' in {} (gc-backup list --kind point); a \
                     restore point that gc-backup mark did not make has no Redis or etcd part: \
                     restore pg --target-name for PostgreSQL alone",
                    store.name()
                ))
                .into());
            };
            Some(point)
        }
    };
    let point_facts = point.as_ref().map(super::mark::facts).transpose()?;
    let (pg_target, pg_moment) = match (&request.target, point_facts) {
        (AllTarget::Time(time), _) => (RecoveryTarget::Time(*time), *time),
        (AllTarget::Name(name), Some(facts)) => {
            (RecoveryTarget::Name(name.clone()), facts.postgres.time)
        }
        (AllTarget::Name(_), None) => anyhow::bail!("a point without its facts"),
    };
    let pg_request = RestorePgRequest {
        target: pg_target,
        ..request.pg.clone()
    };

    // Up front, in the order of the cheapest check: the destinations, then each engine's plan.
    super::restore_pg::check_empty(&request.pg.pgdata)?;
    let redis_existed = super::restore_pg::check_empty(&request.redis_output)?;
    if let Some(output) = &request.etcd_output
        && output.exists()
    {
        return Err(Failure::Config(format!(
            "{} already exists; restore writes only new files",
            output.display()
        ))
        .into());
    }
    super::restore_pg::choose(
        store,
        &pg_request.backup,
        &pg_request.target,
        pg_request.timeline,
    )
    .await?;
    let redis_plan = match (point_facts, &request.target) {
        (Some(facts), _) => {
            let manifest = part_backup(store, Kind::Redis, &facts.redis.id, &facts.name).await?;
            super::can_open(store, &manifest)?;
            RedisPlan::snapshot(
                manifest,
                format!("the snapshot taken for point '{}'", facts.name),
            )
        }
        (None, AllTarget::Time(time)) => super::redis::plan_to_time(store, *time).await?,
        (None, AllTarget::Name(_)) => anyhow::bail!("a name without its point"),
    };
    let etcd_plan = match (&request.etcd_output, point_facts) {
        (None, _) => None,
        (Some(output), Some(facts)) => {
            let Some(part) = &facts.etcd else {
                return Err(Failure::Config(format!(
                    "point '{}' has no etcd snapshot (etcd was not configured when it was \
                     made): leave out --etcd-output",
                    facts.name
                ))
                .into());
            };
            Some((
                output,
                part_backup(store, Kind::Etcd, &part.id, &facts.name).await?,
            ))
        }
        (Some(output), None) => Some((output, etcd_before(store, pg_moment).await?)),
    };
    if let Some((_, manifest)) = &etcd_plan {
        super::can_open(store, manifest)?;
    }
    tracing::info!(
        target = %pg_request.target,
        redis = %redis_plan.manifest().id,
        etcd = etcd_plan.as_ref().map(|(_, m)| m.id.to_string()).unwrap_or_default(),
        "restore of all engines planned"
    );

    // Then the writes; whatever fails takes back what was written before it.
    let undo_redis = |_: &anyhow::Error| {
        let _ = super::restore_pg::clear(&request.redis_output, !redis_existed);
    };
    let redis = super::redis::restore_planned(store, &redis_plan, &request.redis_output, cancel)
        .await
        .inspect_err(undo_redis)?;
    let redis_moment = match &redis.reached {
        super::redis::Reached::Aof(_) => redis.target,
        super::redis::Reached::Snapshot { .. } => redis.manifest.start_time,
    };
    let etcd = match &etcd_plan {
        Some((output, manifest)) => {
            let selector = Selector::Id(manifest.id.clone());
            let written = super::etcd::restore(store, &selector, output, cancel)
                .await
                .inspect_err(undo_redis)?;
            Some((written, manifest.start_time))
        }
        None => None,
    };
    let undo_etcd = |error: &anyhow::Error| {
        undo_redis(error);
        if let Some((written, _)) = &etcd {
            let _ = std::fs::remove_file(&written.path);
        }
    };
    let pg = super::restore_pg::restore(config, store, &pg_request, cancel)
        .await
        .inspect_err(undo_etcd)?;
    Ok(RestoreAllReport {
        pg,
        pg_request,
        pg_moment,
        redis,
        redis_moment,
        etcd,
        point,
    })
}

/// One part of a point, which must still be in the store.
async fn part_backup(
    store: &Store,
    kind: Kind,
    id: &catalog::BackupId,
    point: &str,
) -> anyhow::Result<Manifest> {
    match catalog::find(store, kind, &Selector::Id(id.clone())).await {
        Ok(manifest) => Ok(manifest),
        Err(catalog::CatalogError::NoSuchBackup { .. })
        | Err(catalog::CatalogError::Store(StoreError::NotFound { .. })) => {
            Err(Failure::Config(format!(
                "the {kind} backup {id} of point '{point}' is not in {} any more (retention \
                 keeps {kind} backups for their own window): the point cannot be restored as a \
                 whole; nothing was written",
                store.name()
            ))
            .into())
        }
        Err(other) => Err(other.into()),
    }
}

/// The newest etcd snapshot asked for at or before `moment`.
async fn etcd_before(store: &Store, moment: DateTime<Utc>) -> anyhow::Result<Manifest> {
    let (mut manifests, unreadable) = catalog::list(store, Some(Kind::Etcd)).await?;
    for problem in &unreadable {
        tracing::warn!("{problem}");
    }
    manifests.retain(|m| m.start_time <= moment);
    manifests.sort_by_key(|m| (m.start_time, m.id.clone()));
    manifests.pop().ok_or_else(|| {
        Failure::Config(format!(
            "no etcd snapshot in {} was taken at or before {}: nothing reaches it; leave out \
             --etcd-output to restore the others",
            store.name(),
            crate::wal::archive::human_time(moment)
        ))
        .into()
    })
}
