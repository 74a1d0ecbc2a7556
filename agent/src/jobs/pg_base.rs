//! `backup pg-base`: a physical base backup of the running cluster through the non-exclusive
//! backup API, PGDATA's files streamed as several compressed tar objects at once.
//!
//! Order: refuse if archiving does not work → claim the id → start backup mode (one session,
//! kept open throughout) → stream the tars → stop backup mode → wait until every WAL segment
//! from the start to the stop is in the store → check the stored sizes → commit. A failure or
//! a kill closes the session, and PostgreSQL leaves backup mode by itself.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use futures::future::join_all;
use pitr::{Lsn, SegmentNo};
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use super::backup::{BackupRun, check_stored_size, stored_object};
use crate::catalog::manifest::{
    BaseFile, MANIFEST_FORMAT_UNHASHED, Manifest, PgBaseFacts, SourceFacts, StoredObject,
};
use crate::catalog::{BackupId, Kind, layout};
use crate::config::{Config, PipelineConfig, PostgresConfig};
use crate::error::Failure;
use crate::pipeline::{self, RawDigest, WrittenError};
use crate::sources::pgdata::{self, CopiedFile, Entry};
use crate::sources::postgres;
use crate::sources::postgres::backup_mode::{self, Stopped, timeline_of};
use crate::store::Store;

/// How long the backup waits for its WAL to be archived unless `postgres.archive-timeout`
/// says otherwise. Normally this is one segment's upload; a broken archive should fail the
/// backup loudly, not after an hour.
const ARCHIVE_WAIT: Duration = Duration::from_secs(300);
/// The longest pause between two looks at the archive while waiting for the backup's WAL.
const ARCHIVE_POLL: Duration = Duration::from_millis(250);

/// What the server says before the backup starts.
struct Preflight {
    server_version: String,
    server_version_num: u32,
    system_identifier: u64,
    wal_segment_size: u64,
}

pub async fn backup(
    config: &Config,
    store: &Store,
    cancel: &CancellationToken,
) -> anyhow::Result<Manifest> {
    let pgdata = config.postgres.pgdata.clone().ok_or_else(|| {
        Failure::Config(
            "say where the data directory is: --pgdata DIR, PGDATA or [postgres] pgdata".into(),
        )
    })?;
    let client = postgres::connect(&config.postgres).await?;
    let preflight = preflight(&client, &config.postgres, &pgdata).await?;

    let mut run = BackupRun::begin(config, store, Kind::PgBase).await?;
    let id = run.id().clone();
    let label = format!("gc-backup {id}");
    let start_lsn = backup_mode::start(
        &client,
        &config.postgres,
        preflight.server_version_num,
        &label,
    )
    .await?;
    tracing::info!(kind = "pg-base", id = %id, start_lsn = %start_lsn, pgdata = %pgdata.display(), "backup started");

    let copy = BaseCopy {
        config,
        store,
        pgdata: &pgdata,
        id: &id,
        cancel,
    };
    let outcome = run
        .guard(copy_and_stop(&copy, &client, &preflight, start_lsn))
        .await;
    drop(client); // ends backup mode if it is still on
    let (objects, files, stop) = outcome?;

    let timeline = timeline_of(&stop.label).unwrap_or(1);
    let segment_size = preflight.wal_segment_size;
    let source = SourceFacts::PgBase(Box::new(PgBaseFacts {
        system_identifier: preflight.system_identifier.to_string(),
        server_version: preflight.server_version.clone(),
        server_version_num: preflight.server_version_num,
        timeline,
        start_lsn: start_lsn.to_string(),
        stop_lsn: stop.lsn.to_string(),
        start_wal: SegmentNo::of(start_lsn, segment_size).file_name(timeline, segment_size),
        stop_wal: SegmentNo::of(stop.lsn, segment_size).file_name(timeline, segment_size),
        wal_segment_size: segment_size,
        pgdata: pgdata.display().to_string(),
        backup_label: stop.label,
        tablespace_map: stop.tablespace_map,
        files,
    }));
    let manifest = run.manifest(MANIFEST_FORMAT_UNHASHED, source, objects);
    run.commit(&manifest).await?;
    Ok(manifest)
}

async fn preflight(
    client: &Client,
    config: &PostgresConfig,
    pgdata: &Path,
) -> anyhow::Result<Preflight> {
    let facts = backup_mode::archive_facts(client, config).await?;
    let (archive_mode, wal_level) = (&facts.archive_mode, &facts.wal_level);
    if archive_mode == "off" || wal_level == "minimal" {
        return Err(Failure::Config(format!(
            "WAL archiving is off (archive_mode = {archive_mode}, wal_level = {wal_level}): a base \
             backup without archived WAL cannot be restored. Set archive_mode = on and \
             archive_command = 'gc-backup wal-push %p'."
        ))
        .into());
    }
    if let Some((wal, when)) = &facts.failing {
        return Err(Failure::Config(format!(
            "WAL archiving is failing (segment {wal} failed at {when}, with no success since): a \
             base backup now could not be restored. Fix archive_command first; the server log \
             says why it fails."
        ))
        .into());
    }
    let system_identifier = facts.system_identifier;
    let wal_segment_size =
        pitr::check_segment_size(facts.wal_segment_size).map_err(|e| anyhow::anyhow!("{e}"))?;
    let on_disk = tokio::task::spawn_blocking({
        let pgdata = pgdata.to_path_buf();
        move || pgdata::system_identifier(&pgdata)
    })
    .await
    .context("worker failed")?
    .map_err(|e| {
        Failure::Config(format!(
            "{} is not a PostgreSQL data directory: {e}",
            pgdata.display()
        ))
    })?;
    if on_disk != system_identifier {
        return Err(Failure::Config(format!(
            "{} belongs to cluster {on_disk}, but the server at {} is cluster {system_identifier}: \
             --pgdata must be the data directory of the server being backed up",
            pgdata.display(),
            postgres::describe(config)
        ))
        .into());
    }
    Ok(Preflight {
        server_version: facts.server_version,
        server_version_num: facts.server_version_num,
        system_identifier,
        wal_segment_size,
    })
}

/// How many tar streams to write at once, and each one's settings: one per core (at most 4),
/// as many as `pipeline.memory-limit` holds (see `pipeline::budget`).
fn stream_plan(pipeline: &PipelineConfig) -> anyhow::Result<(usize, PipelineConfig)> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    crate::pipeline::budget::streams(pipeline, pipeline.memory_limit, cores)
        .map_err(|e| Failure::Config(e.to_string()).into())
}

/// What every stage of one base backup needs.
struct BaseCopy<'a> {
    config: &'a Config,
    store: &'a Store,
    pgdata: &'a Path,
    id: &'a BackupId,
    cancel: &'a CancellationToken,
}

async fn copy_and_stop(
    run: &BaseCopy<'_>,
    client: &Client,
    preflight: &Preflight,
    start_lsn: Lsn,
) -> anyhow::Result<(Vec<StoredObject>, Vec<BaseFile>, Stopped)> {
    let BaseCopy {
        config,
        store,
        pgdata,
        cancel,
        ..
    } = *run;
    let entries = tokio::task::spawn_blocking({
        let pgdata = pgdata.to_path_buf();
        move || pgdata::walk(&pgdata)
    })
    .await
    .context("walking worker failed")?
    .map_err(|e| match e {
        pgdata::PgDataError::Unsupported(message) => anyhow::Error::new(Failure::Config(message)),
        other => anyhow::Error::new(other),
    })?;
    let (dirs, files) = pgdata::partition(entries);
    let files = std::sync::Arc::new(files);
    let (streams, settings) = stream_plan(&config.pipeline)?;
    tracing::debug!(
        streams,
        part_size = settings.part_size,
        frame_bytes = settings.frame_bytes,
        memory_limit = config.pipeline.memory_limit,
        "base backup streams planned"
    );
    let uploads = (0..streams).map(|index| {
        let settings = settings.clone();
        // Stream 0 holds the directories, so that they are restored first.
        let dirs = if index == 0 { dirs.clone() } else { Vec::new() };
        let files = files.clone();
        async move { upload_stream(run, index, dirs, files, &settings).await }
    });
    let mut objects = Vec::new();
    let mut files = Vec::new();
    for result in join_all(uploads).await {
        let (object, copied) = result?;
        objects.push(object);
        files.extend(copied.into_iter().map(|file| BaseFile {
            path: file.path,
            size: file.size,
            crc32c: file.crc32c,
            stream: file.stream,
            padded: file.padded,
        }));
    }
    for object in &objects {
        let key = crate::store::ObjectKey::from(object.key.as_str());
        check_stored_size(store, &key, object.stored_bytes).await?;
    }
    let stopped = tokio::select! {
        stopped = backup_mode::stop(client, &config.postgres, preflight.server_version_num) => stopped?,
        () = cancel.cancelled() => return Err(Failure::Interrupted("interrupted while stopping the backup".into()).into()),
    };
    let timeline = timeline_of(&stopped.label).unwrap_or(1);
    let segment_size = preflight.wal_segment_size;
    let first = SegmentNo::of(start_lsn, segment_size);
    // The last segment holds the byte before the stop LSN (PostgreSQL's XLByteToPrevSeg).
    let last = SegmentNo::of(Lsn(stopped.lsn.0.saturating_sub(1)), segment_size).max(first);
    let needed: Vec<String> = std::iter::successors(Some(first), |s| Some(s.next()))
        .take_while(|s| *s <= last)
        .map(|s| s.file_name(timeline, segment_size))
        .collect();
    await_wal(run, needed).await?;
    tracing::info!(kind = "pg-base", stop_lsn = %stopped.lsn, "backup mode ended; its WAL is archived");
    files.sort_by(|a, b| a.path.cmp(&b.path));
    Ok((objects, files, stopped))
}

/// Waits until every segment in `needed` is in the store. A segment PostgreSQL has finished
/// (`.ready`) but not archived yet is stored here with wal-push's own code (PostgreSQL's
/// wal-push of it then finds the same content archived and returns 0); the rest is up to
/// archive_command. No sidecar marker is written: without a running sidecar nobody would
/// remove it. Checking the store rather than PostgreSQL's archive status also catches an
/// archive_command that archives somewhere else: such a backup could never be restored from
/// this store.
async fn await_wal(run: &BaseCopy<'_>, mut needed: Vec<String>) -> anyhow::Result<()> {
    let (config, store, cancel) = (run.config, run.store, run.cancel);
    use futures::StreamExt;
    let wal_dir = run.pgdata.join("pg_wal");
    let timeout = config.postgres.archive_timeout.unwrap_or(ARCHIVE_WAIT);
    let deadline = tokio::time::Instant::now() + timeout;
    let mut pause = Duration::from_millis(20);
    // Our own upload may lose a race with PostgreSQL's archiver (which may then recycle the
    // file): not a failure as long as the segment reaches the store before the deadline.
    let mut own_failure: Option<String> = None;
    loop {
        let looks = futures::stream::iter(needed)
            .map(|name| async move {
                let file = pitr::WalFile::parse(&name).map_err(|e| anyhow::anyhow!("{e}"))?;
                match store.head(&layout::wal_key(&file)).await {
                    Ok(_) => Ok(None),
                    Err(crate::store::StoreError::NotFound { .. }) => Ok(Some(name)),
                    Err(error) => Err(anyhow::Error::new(error).context(format!(
                        "checking that {name}, which this backup needs, is archived"
                    ))),
                }
            })
            .buffered(8)
            .collect::<Vec<anyhow::Result<Option<String>>>>()
            .await;
        needed = looks
            .into_iter()
            .collect::<anyhow::Result<Vec<_>>>()?
            .into_iter()
            .flatten()
            .collect();
        let mut still = Vec::new();
        for name in needed {
            let ready = wal_dir.join("archive_status").join(format!("{name}.ready"));
            if !tokio::fs::try_exists(&ready).await.unwrap_or(false) {
                still.push(name); // not finished by PostgreSQL yet, or archived elsewhere
                continue;
            }
            let path = wal_dir.join(&name);
            if let Err(error) = crate::wal::push(config, store, &path).await {
                own_failure = Some(format!("{name}: {error:#}"));
                still.push(name);
            }
        }
        needed = still;
        let Some(first) = needed.first() else {
            return Ok(());
        };
        if tokio::time::Instant::now() >= deadline {
            return Err(Failure::Config(format!(
                "{first} (and {} more WAL segments) that this backup needs did not reach {} \
                 within {}: check that archive_command is `gc-backup wal-push %p` with this \
                 store, and pg_stat_archiver (last attempt here: {})",
                needed.len() - 1,
                store.name(),
                humantime::format_duration(timeout),
                own_failure.as_deref().unwrap_or("none")
            ))
            .into());
        }
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            () = cancel.cancelled() => return Err(Failure::Interrupted("interrupted while waiting for WAL archiving".into()).into()),
        }
        pause = (pause * 2).min(ARCHIVE_POLL);
    }
}

/// One tar stream: a blocking tar writer feeding a pipeline through a bounded channel.
async fn upload_stream(
    run: &BaseCopy<'_>,
    index: usize,
    dirs: Vec<Entry>,
    files: std::sync::Arc<pgdata::FileQueue>,
    settings: &PipelineConfig,
) -> anyhow::Result<(StoredObject, Vec<CopiedFile>)> {
    let BaseCopy {
        store,
        pgdata,
        id,
        cancel,
        ..
    } = *run;
    let key = layout::data_key(Kind::PgBase, id, &format!("base.{index}.tar.zst"));
    let stream_no = u32::try_from(index).unwrap_or(u32::MAX);
    let pgdata = pgdata.to_path_buf();
    // The tar writer compresses on its own thread: no raw queue between it and zstd.
    let written = pipeline::upload_written(store, &key, settings, RawDigest::Skip, cancel, {
        move |out| pgdata::write_tar(&pgdata, &dirs, &files, stream_no, out)
    })
    .await;
    let (summary, copied) = match written {
        Ok(done) => done,
        Err(WrittenError::Producer(tar_error)) => {
            return Err(anyhow::Error::new(tar_error).context(format!("copying PGDATA into {key}")));
        }
        Err(WrittenError::Pipeline(error)) => return Err(anyhow::Error::new(error)),
    };
    tracing::debug!(key = %key, raw_bytes = summary.raw_bytes, stored_bytes = summary.stored_bytes, elapsed_ms = summary.elapsed.as_millis(), "tar stream stored");
    Ok((stored_object(&key, &summary), copied))
}
