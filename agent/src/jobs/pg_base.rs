//! `backup pg-base [--incremental]`: a physical base backup of the running cluster through the
//! non-exclusive backup API, PGDATA's files streamed as several compressed tar objects at once
//! (a full backup), or as delta streams of what changed since a parent (an incremental one,
//! see `sources::blocks`). Both write a block map for the next incremental.
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
    BaseFile, Delta, MANIFEST_FORMAT_BLOCKS, Manifest, PgBaseFacts, SourceFacts, StoredObject,
};
use crate::catalog::{BackupId, Kind, layout};
use crate::config::{Config, PipelineConfig, PostgresConfig};
use crate::error::Failure;
use crate::pipeline::{self, RawDigest, WrittenError};
use crate::sources::blocks::{FileMap, MapWriter};
use crate::sources::pgdata::{self, CopiedFile, Entry, MapSink};
use crate::sources::postgres;
use crate::sources::postgres::backup_mode::{self, Stopped, timeline_of};
use crate::store::Store;

/// How long the backup waits for its WAL to be archived unless `postgres.archive-timeout`
/// says otherwise. Normally this is one segment's upload; a broken archive should fail the
/// backup loudly, not after an hour.
const ARCHIVE_WAIT: Duration = Duration::from_secs(300);
/// The longest pause between two looks at the archive while waiting for the backup's WAL.
const ARCHIVE_POLL: Duration = Duration::from_millis(250);

/// Block maps waiting for the map's writer, from all streams. A map is 16 bytes a block
/// (2 MiB for a 1 GiB relation segment), so queues of them are kept short.
const MAP_QUEUE: usize = 2;

/// What the server says before the backup starts.
struct Preflight {
    server_version: String,
    server_version_num: u32,
    system_identifier: u64,
    wal_segment_size: u64,
    block_size: u32,
}

/// The backup an incremental applies to.
#[derive(Debug, Clone)]
struct Parent {
    id: BackupId,
    depth: u32,
    block_map: StoredObject,
}

pub async fn backup(
    config: &Config,
    store: &Store,
    incremental: bool,
    cancel: &CancellationToken,
) -> anyhow::Result<Manifest> {
    let pgdata = config.postgres.pgdata.clone().ok_or_else(|| {
        Failure::Config(
            "say where the data directory is: --pgdata DIR, PGDATA or [postgres] pgdata".into(),
        )
    })?;
    let client = postgres::connect(&config.postgres).await?;
    let preflight = preflight(&client, &config.postgres, &pgdata).await?;
    let parent = match incremental {
        true => choose_parent(config, store, &preflight).await?,
        false => None,
    };

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
    tracing::info!(
        kind = "pg-base",
        id = %id,
        start_lsn = %start_lsn,
        pgdata = %pgdata.display(),
        parent = parent.as_ref().map(|p| p.id.to_string()),
        "backup started"
    );

    let copy = BaseCopy {
        config,
        store,
        pgdata: &pgdata,
        id: &id,
        cancel,
    };
    let outcome = run
        .guard(copy_and_stop(
            &copy,
            &client,
            &preflight,
            start_lsn,
            parent.as_ref(),
        ))
        .await;
    drop(client); // ends backup mode if it is still on
    let Copied {
        objects,
        files,
        stopped: stop,
        block_map,
    } = outcome?;

    let timeline = timeline_of(&stop.label).unwrap_or(1);
    let segment_size = preflight.wal_segment_size;
    let (map_raw, map_stored) = (block_map.raw_bytes, block_map.stored_bytes);
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
        block_size: preflight.block_size,
        depth: parent.as_ref().map_or(0, |p| p.depth + 1),
        parent: parent.map(|p| p.id),
        block_map: Some(block_map),
    }));
    let mut manifest = run.manifest(MANIFEST_FORMAT_BLOCKS, source, objects);
    // What the backup costs in the store includes its block map.
    manifest.raw_bytes += map_raw;
    manifest.stored_bytes += map_stored;
    run.commit(&manifest).await?;
    Ok(manifest)
}

/// The parent of an incremental: the newest base backup of this cluster, unless the chain
/// would grow past `postgres.max-incremental-chain` or the parent cannot be compared against
/// (no block map, another block size); then `None`, a full backup, and the log says why.
///
/// Timelines do not matter here: blocks are compared by content, so any earlier copy of the
/// cluster is a correct parent (see ARCHITECTURE.md, "Incremental base backups").
async fn choose_parent(
    config: &Config,
    store: &Store,
    preflight: &Preflight,
) -> anyhow::Result<Option<Parent>> {
    let (manifests, unreadable) = crate::catalog::list(store, Some(Kind::PgBase)).await?;
    for problem in &unreadable {
        tracing::warn!("{problem}");
    }
    let system = preflight.system_identifier.to_string();
    let newest = manifests
        .iter()
        .filter_map(|m| match &m.source {
            SourceFacts::PgBase(facts) if facts.system_identifier == system => Some((m, facts)),
            _ => None,
        })
        .max_by(|(a, _), (b, _)| (a.end_time, &a.id).cmp(&(b.end_time, &b.id)));
    let full = |why: String| {
        tracing::info!(kind = "pg-base", "taking a full backup: {why}");
        Ok(None)
    };
    let Some((manifest, facts)) = newest else {
        return full("no base backup of this cluster in the store yet".into());
    };
    let id = &manifest.id;
    let Some(block_map) = &facts.block_map else {
        return full(format!(
            "the newest base backup, {id}, has no block map (an older gc-backup took it)"
        ));
    };
    if facts.block_size != preflight.block_size {
        return full(format!(
            "the newest base backup, {id}, has {}-byte blocks, the server {}",
            facts.block_size, preflight.block_size
        ));
    }
    let limit = config.postgres.max_incremental_chain;
    if facts.depth >= limit {
        return full(format!(
            "the newest base backup, {id}, ends a chain of {} incremental(s), \
             postgres.max-incremental-chain is {limit}",
            facts.depth
        ));
    }
    // A map deleted by hand (or by a lifecycle rule) would fail every incremental until the
    // next scheduled full: take that full now instead.
    match store
        .head(&crate::store::ObjectKey::from(block_map.key.as_str()))
        .await
    {
        Ok(_) => {}
        Err(crate::store::StoreError::NotFound { .. }) => {
            return full(format!(
                "the block map of the newest base backup, {id}, is missing from the store ({})",
                block_map.key
            ));
        }
        Err(error) => {
            return Err(anyhow::Error::new(error).context("looking for the parent's block map"));
        }
    }
    if block_map.sealed {
        store
            .keys()
            .identities_for(&format!(
                "an incremental backup, which reads the block map of its parent {id} (or run \
                 a full one: without --incremental)"
            ))
            .map_err(|e| Failure::Config(e.to_string()))?;
    }
    Ok(Some(Parent {
        id: id.clone(),
        depth: facts.depth,
        block_map: block_map.clone(),
    }))
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
        block_size: facts.block_size,
    })
}

/// How many tar streams to write at once, and each one's settings: one per core (at most 4),
/// as many as `pipeline.memory-limit` holds (see `pipeline::budget`).
fn stream_plan(pipeline: &PipelineConfig, limit: usize) -> anyhow::Result<(usize, PipelineConfig)> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    crate::pipeline::budget::streams(pipeline, limit, cores)
        .map_err(|e| Failure::Config(e.to_string()).into())
}

/// The block map's one pipeline: minimum parts, 1 MiB frames, one part in flight; and the
/// limit left for the streams. What it holds is at most its two parts and a frame, and never
/// more than the map itself and a frame: a map of up to [`MAP_IN_RESERVE`] (a cluster of
/// about 512 MiB) is left to the process reserve, so that the smallest limit still backs up
/// a small cluster.
fn map_plan(pipeline: &PipelineConfig, map_bytes: usize) -> (PipelineConfig, usize) {
    use crate::config::{MIB, S3_MIN_PART_SIZE};
    let mut settings = pipeline.clone();
    settings.part_size = S3_MIN_PART_SIZE.min(pipeline.part_size.max(MIB));
    settings.parallel_uploads = 1;
    settings.frame_bytes = MIB;
    let reserve = if map_bytes <= MAP_IN_RESERVE {
        0
    } else {
        (2 * settings.part_size).min(map_bytes) + 2 * MIB
    };
    (settings, pipeline.memory_limit.saturating_sub(reserve))
}

/// Block maps this small fit in `pipeline::budget::PROCESS_RESERVE`'s slack.
const MAP_IN_RESERVE: usize = crate::config::MIB;

/// What every stage of one base backup needs.
struct BaseCopy<'a> {
    config: &'a Config,
    store: &'a Store,
    pgdata: &'a Path,
    id: &'a BackupId,
    cancel: &'a CancellationToken,
}

/// What the copy stage produced.
struct Copied {
    objects: Vec<StoredObject>,
    files: Vec<BaseFile>,
    stopped: Stopped,
    block_map: StoredObject,
}

async fn copy_and_stop(
    run: &BaseCopy<'_>,
    client: &Client,
    preflight: &Preflight,
    start_lsn: Lsn,
    parent: Option<&Parent>,
) -> anyhow::Result<Copied> {
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
    let map_bytes = estimated_map_bytes(&entries, preflight.block_size);
    let (dirs, files): (Vec<Entry>, Vec<Entry>) = entries
        .into_iter()
        .partition(|e| e.kind == pgdata::EntryKind::Dir);
    let (map_settings, limit) = map_plan(&config.pipeline, map_bytes);
    let (streams, settings) = stream_plan(&config.pipeline, limit)?;
    tracing::debug!(
        streams,
        part_size = settings.part_size,
        frame_bytes = settings.frame_bytes,
        memory_limit = config.pipeline.memory_limit,
        map_bytes,
        "base backup streams planned"
    );
    let (map_sink, map_queue) = std::sync::mpsc::sync_channel::<FileMap>(MAP_QUEUE);
    let map_key = layout::data_key(Kind::PgBase, run.id, "blockmap.zst");
    let block_size = preflight.block_size;
    let map_upload = pipeline::upload_written(
        store,
        &map_key,
        &map_settings,
        RawDigest::Sha256,
        cancel,
        move |out| -> std::io::Result<()> {
            let mut writer = MapWriter::new(out, block_size)?;
            for file in map_queue {
                writer.write(&file)?;
            }
            writer.finish().map(drop)
        },
    );
    let (queue, parent_map): (Queue, ParentMapReading) = match parent {
        None => (
            Queue::Full(std::sync::Arc::new(pgdata::FileQueue::new(files))),
            None,
        ),
        Some(parent) => {
            let (work_sender, work) = std::sync::mpsc::sync_channel(streams);
            let (reader, writer) = super::pipe()?;
            let dispatcher = tokio::task::spawn_blocking(move || {
                pgdata::dispatch(reader, block_size, files, work_sender)
            });
            (
                Queue::Delta(std::sync::Arc::new(pgdata::WorkQueue::new(work))),
                Some((parent.block_map.clone(), writer, dispatcher)),
            )
        }
    };
    let uploads: Vec<_> =
        (0..streams)
            .map(|index| {
                let settings = settings.clone();
                // Stream 0 holds the directories, so that they are restored first.
                let dirs = if index == 0 { dirs.clone() } else { Vec::new() };
                let queue = queue.clone();
                let map_sink = map_sink.clone();
                async move {
                    upload_stream(run, index, dirs, queue, &settings, map_sink, block_size).await
                }
            })
            .collect();
    // The streams hold the only senders of the map, and the only handles on the work queue:
    // the map ends when they do, and should they all fail, the dispatcher's next send fails
    // instead of waiting for a reader that is gone.
    drop(map_sink);
    drop(queue);
    let reading_parent = async {
        let Some((parent, writer, dispatcher)) = parent_map else {
            return Ok(());
        };
        let downloaded = pipeline::download(store, &super::expected(&parent), Box::new(writer))
            .await
            .map(drop);
        let dispatched = dispatcher.await.context("dispatching worker failed")?;
        // The dispatcher drains the map after a failure: a download error is the cause.
        downloaded.with_context(|| format!("reading the parent's block map {}", parent.key))?;
        dispatched.with_context(|| format!("reading the parent's block map {}", parent.key))
    };
    let (streamed, mapped, read_parent) =
        tokio::join!(join_all(uploads), map_upload, reading_parent);
    read_parent?;
    let mut objects = Vec::new();
    let mut files = Vec::new();
    let mut map_gone = None;
    for result in streamed {
        let (object, copied) = match result {
            Err(error) if is_map_gone(&error) => {
                map_gone = Some(error);
                continue;
            }
            other => other?,
        };
        objects.push(object);
        files.extend(copied.into_iter().map(|file| BaseFile {
            path: file.path,
            size: file.size,
            crc32c: file.crc32c,
            stream: file.stream,
            padded: file.padded,
            delta: file.delta.map(|delta| match delta {
                pgdata::Delta::Unchanged => Delta::Unchanged,
                pgdata::Delta::Changed { blocks } => Delta::Changed { blocks },
                pgdata::Delta::Whole => Delta::Whole,
            }),
        }));
    }
    let block_map = match mapped {
        Ok((summary, ())) => stored_object(&map_key, &summary),
        Err(WrittenError::Producer(error)) => {
            return Err(anyhow::Error::new(error).context(format!("writing {map_key}")));
        }
        Err(WrittenError::Pipeline(error)) => return Err(anyhow::Error::new(error)),
    };
    if let Some(error) = map_gone {
        return Err(error);
    }
    for object in objects.iter().chain([&block_map]) {
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
    await_wal(
        config,
        store,
        Some(run.pgdata),
        needed,
        "this backup needs",
        run.cancel,
    )
    .await?;
    tracing::info!(kind = "pg-base", stop_lsn = %stopped.lsn, "backup mode ended; its WAL is archived");
    files.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(Copied {
        objects,
        files,
        stopped,
        block_map,
    })
}

fn is_map_gone(error: &anyhow::Error) -> bool {
    matches!(
        error.downcast_ref::<pgdata::PgDataError>(),
        Some(pgdata::PgDataError::MapGone)
    )
}

/// The queue the streams share (cheap to clone).
#[derive(Clone)]
enum Queue {
    Full(std::sync::Arc<pgdata::FileQueue>),
    Delta(std::sync::Arc<pgdata::WorkQueue>),
}

/// An incremental's parent map: the object, the pipe it is downloaded into, and the thread
/// that reads it and hands out the files.
type ParentMapReading = Option<(
    StoredObject,
    std::io::PipeWriter,
    tokio::task::JoinHandle<Result<(), pgdata::PgDataError>>,
)>;

/// A rough size of the block map: 16 bytes per block of the relation files, and their names.
fn estimated_map_bytes(entries: &[Entry], block_size: u32) -> usize {
    entries
        .iter()
        .filter(|e| crate::sources::blocks::is_relation_file(&e.path))
        .map(|e| {
            let blocks = crate::sources::blocks::blocks_in(e.size, block_size.max(1));
            usize::try_from(blocks).unwrap_or(usize::MAX / 32) * crate::sources::blocks::HASH_BYTES
                + e.path.len()
                + 16
        })
        .fold(0usize, usize::saturating_add)
}

/// Waits until every segment in `needed` is in the store. A segment PostgreSQL has finished
/// (`.ready`) but not archived yet is stored here with wal-push's own code (PostgreSQL's
/// wal-push of it then finds the same content archived and returns 0); the rest is up to
/// archive_command. No sidecar marker is written: without a running sidecar nobody would
/// remove it. Checking the store rather than PostgreSQL's archive status also catches an
/// archive_command that archives somewhere else: such a backup could never be restored from
/// this store. Without the data directory (a command run outside the pod) only the store is
/// watched. `why` ends the sentences that name a segment: "… that {why}".
pub(super) async fn await_wal(
    config: &Config,
    store: &Store,
    pgdata: Option<&Path>,
    mut needed: Vec<String>,
    why: &str,
    cancel: &CancellationToken,
) -> anyhow::Result<()> {
    use futures::StreamExt;
    let wal_dir = pgdata.map(|dir| dir.join("pg_wal"));
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
                    Err(error) => Err(anyhow::Error::new(error)
                        .context(format!("checking that {name}, which {why}, is archived"))),
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
            let Some(wal_dir) = &wal_dir else {
                still.push(name);
                continue;
            };
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
                "{first} (and {} more WAL segments) that {why} did not reach {} \
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

/// One stream: a blocking tar (full) or delta (incremental) writer compressing into its
/// pipeline, sending the block map of every relation file it reads to `map_sink`.
async fn upload_stream(
    run: &BaseCopy<'_>,
    index: usize,
    dirs: Vec<Entry>,
    queue: Queue,
    settings: &PipelineConfig,
    map_sink: MapSink,
    block_size: u32,
) -> anyhow::Result<(StoredObject, Vec<CopiedFile>)> {
    let BaseCopy {
        store,
        pgdata,
        id,
        cancel,
        ..
    } = *run;
    let name = match queue {
        Queue::Full(_) => format!("base.{index}.tar.zst"),
        Queue::Delta(_) => format!("delta.{index}.zst"),
    };
    let key = layout::data_key(Kind::PgBase, id, &name);
    let stream_no = u32::try_from(index).unwrap_or(u32::MAX);
    let pgdata = pgdata.to_path_buf();
    // The writer compresses on its own thread: no raw queue between it and zstd.
    let written = pipeline::upload_written(store, &key, settings, RawDigest::Skip, cancel, {
        move |out| match queue {
            Queue::Full(files) => pgdata::write_tar(
                &pgdata,
                &dirs,
                &files,
                stream_no,
                out,
                Some((&map_sink, block_size)),
            ),
            Queue::Delta(work) => pgdata::write_delta(
                &pgdata,
                &dirs,
                &work,
                stream_no,
                out,
                (&map_sink, block_size),
            ),
        }
    })
    .await;
    let (summary, copied) = match written {
        Ok(done) => done,
        Err(WrittenError::Producer(pgdata::PgDataError::MapGone)) => {
            return Err(anyhow::Error::new(pgdata::PgDataError::MapGone));
        }
        Err(WrittenError::Producer(error)) => {
            return Err(anyhow::Error::new(error).context(format!("copying PGDATA into {key}")));
        }
        Err(WrittenError::Pipeline(error)) => return Err(anyhow::Error::new(error)),
    };
    tracing::debug!(key = %key, raw_bytes = summary.raw_bytes, stored_bytes = summary.stored_bytes, elapsed_ms = summary.elapsed.as_millis(), "stream stored");
    Ok((stored_object(&key, &summary), copied))
}
