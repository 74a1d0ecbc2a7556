//! The WAL receiver of `gc-backup run` (`[postgres] stream-wal`): WAL streamed from
//! PostgreSQL through a physical replication slot into the store as it is written, so that
//! the recovery point is seconds old instead of `archive_timeout` old.
//!
//! The segment being written is stored as **chunk objects**, each the WAL that arrived since
//! the previous one, at least every `stream-flush` while WAL flows
//! (`wal-stream/<timeline+xlog id>/<segment>/<from>-<to>.zst`, offsets in hex). A finished
//! segment becomes the ordinary archived object, the very one `wal-push` would store (a
//! create-only PUT, then the same comparison of content: both may store it, never two different
//! objects under one name), and its chunks are deleted. Chunks of one segment may overlap
//! (a restarted receiver starts again at the segment's beginning); the WAL at an LSN never
//! changes, so any that cover a byte agree on it. `wal-fetch` assembles a segment the archive
//! does not have from its chunks ([`read_streamed`]).
//!
//! PostgreSQL is told (the flush position of the standby status update) only what is stored,
//! so the slot keeps every byte the store does not have. A restart resumes at the slot's
//! `restart_lsn`. The receiver records what it stored in `wal-stream/receiver.json`; a slot
//! that has been dropped or invalidated behind its back shows as a slot that begins after that
//! point, and the WAL in between, unless `archive_command` stored it, is reported as a gap and
//! counted, never skipped silently.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use pitr::{Lsn, SegmentNo, TimelinePath, WalFile};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::object::FrameEncoder;
use crate::catalog::layout;
use crate::config::Config;
use crate::error::Failure;
use crate::sources::postgres::replication::{Replication, Streamed};
use crate::store::{ObjectKey, Store, StoreError};

/// Uploads in flight at once (finished segments and chunks, in LSN order).
const IN_FLIGHT: usize = 2;
/// Finished segments whose chunks are being deleted at once; more and the stream waits.
const CLEANUPS: usize = 4;
/// WAL that waits for a chunk beyond this is chunked at once, whatever the flush interval.
const CHUNK_MAX: usize = 2 << 20;
/// Room kept under the memory share for one message (≤ 128 KiB) and a frame's compression.
const MESSAGE_ROOM: usize = 2 << 20;
/// A status update at least this often (PostgreSQL's `wal_sender_timeout` is 60 s).
const STATUS_INTERVAL: Duration = Duration::from_secs(10);
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(30);
const SEGMENT_SIZE: u64 = pitr::DEFAULT_SEGMENT_SIZE;

/// What the metrics and `check` show of the receiver.
#[derive(Debug, Clone, Default)]
pub struct StreamStatus {
    pub streaming: bool,
    /// The end of WAL on the server, as it last said.
    pub server_lsn: Option<Lsn>,
    /// Everything before this is in the store.
    pub stored_lsn: Option<Lsn>,
    pub last_flush_at: Option<DateTime<Utc>>,
    /// WAL the server keeps for the slot, as last read.
    pub slot_retained_bytes: Option<u64>,
    pub failures: u64,
    /// WAL ranges found missing from the store (a slot dropped or invalidated).
    pub gaps: u64,
    pub last_error: Option<String>,
}

/// What the receiver last stored, kept in the store for the next start.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReceiverState {
    pub system_identifier: String,
    pub timeline: u32,
    /// Everything of `timeline` before this LSN is stored.
    pub stored: String,
}

/// Runs the receiver until `shutdown`: sessions one after another, each failure counted and
/// retried after a pause that doubles up to 30 s.
pub async fn run(
    config: &Config,
    store: &Store,
    status: Arc<Mutex<StreamStatus>>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut pause = RETRY_FIRST;
    let mut from_slot = false;
    loop {
        let result = session(config, store, &status, &shutdown, from_slot).await;
        // The server no longer has the WAL the store lacks: the next session starts at the
        // slot, and reports the gap.
        from_slot = result.as_ref().is_err_and(wal_removed);
        if let Ok(mut status) = status.lock() {
            status.streaming = false;
        }
        if shutdown.is_cancelled() {
            return result;
        }
        match result {
            Ok(()) => pause = RETRY_FIRST,
            Err(error) => {
                let line = format!("{error:#}");
                tracing::error!(error = %line, "WAL streaming failed; retrying");
                if let Ok(mut status) = status.lock() {
                    status.failures += 1;
                    status.last_error = Some(line);
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            () = shutdown.cancelled() => return Ok(()),
        }
        pause = (pause * 2).min(RETRY_MAX);
    }
}

/// The slot as the receiver found it.
#[derive(Debug)]
struct Slot {
    restart_lsn: Option<Lsn>,
}

async fn session(
    config: &Config,
    store: &Store,
    status: &Arc<Mutex<StreamStatus>>,
    shutdown: &CancellationToken,
    from_slot: bool,
) -> anyhow::Result<()> {
    let pg = &config.postgres;
    let settings = pg
        .stream
        .as_ref()
        .ok_or_else(|| Failure::Config("WAL streaming is not configured".into()))?;
    let sql = crate::sources::postgres::connect(pg).await?;
    let slot = ensure_slot(&sql, &settings.slot, status).await?;
    let mut replication = Replication::connect(pg).await?;
    let identity = replication.identify_system().await?;
    let path = if identity.timeline > 1 {
        let (_, content) = replication.timeline_history(identity.timeline).await?;
        store_history(store, identity.timeline, &content).await?;
        TimelinePath::parse(identity.timeline, &String::from_utf8_lossy(&content)).map_err(|e| {
            anyhow::anyhow!(
                "the server's history of timeline {}: {e}",
                identity.timeline
            )
        })?
    } else {
        TimelinePath::first()
    };
    let restart = slot.restart_lsn.unwrap_or(identity.flushed);
    let system = identity.system_id.to_string();
    let store_end = store_end(store, &system, &path).await?;
    // Where the store's WAL of this server's history ends, if the slot begins later (a
    // slot dropped and created again, a new timeline whose first segment nobody stored):
    // the server may still have that WAL. When it has not, from the slot, and the WAL in
    // between is looked for in the archive and reported missing.
    let resume = match store_end {
        Some(end) if end < restart && !from_slot => end,
        _ => restart,
    };
    if let Some(end) = store_end.filter(|end| *end < resume) {
        report_gap(store, &path, end, resume, status).await?;
    }
    let timeline = path.timeline_at(resume);
    let start = SegmentNo::of(resume, SEGMENT_SIZE).start(SEGMENT_SIZE);
    tracing::info!(
        slot = %settings.slot,
        %start,
        timeline,
        "WAL streaming starts"
    );
    let mut stream = Stream {
        store,
        level: config.pipeline.zstd_level,
        system,
        timeline,
        segment: Segment::new(start, config.pipeline.zstd_level),
        received: start,
        // Nothing older than where this session resumes is ever confirmed.
        stored: resume,
        recorded: resume,
        uploads: futures::stream::FuturesOrdered::new(),
        record: futures::stream::FuturesOrdered::new(),
        cleanups: futures::stream::FuturesUnordered::new(),
        flush_due: false,
        uploads_hold: 0,
        memory_share: crate::pipeline::budget::wal_stream_cost(SEGMENT_SIZE as usize),
        status: status.clone(),
    };
    replication.start(&settings.slot, start, timeline).await?;
    if let Ok(mut status) = status.lock() {
        status.streaming = true;
    }
    stream
        .follow(
            &mut replication,
            &sql,
            &settings.slot,
            settings.flush,
            shutdown,
        )
        .await
}

/// The slot, created (reserving WAL from now) when it is not there. A slot whose WAL the server
/// removed (`wal_status = 'lost'`, past `max_slot_wal_keep_size`) is dropped and created
/// again: the continuity check then reports the gap.
async fn ensure_slot(
    sql: &tokio_postgres::Client,
    name: &str,
    status: &Arc<Mutex<StreamStatus>>,
) -> anyhow::Result<Slot> {
    let row = sql
        .query_opt(
            "SELECT slot_type, restart_lsn::text, wal_status FROM pg_replication_slots \
             WHERE slot_name = $1",
            &[&name],
        )
        .await
        .context("reading the replication slot")?;
    if let Some(row) = row {
        let kind: String = row.get(0);
        if kind != "physical" {
            return Err(Failure::Config(format!(
                "replication slot {name} is a {kind} slot: WAL streaming needs a physical one \
                 (set [postgres] slot-name to another name)"
            ))
            .into());
        }
        let wal_status: Option<String> = row.get(2);
        if wal_status.as_deref() != Some("lost") {
            let restart: Option<String> = row.get(1);
            return Ok(Slot {
                restart_lsn: restart.and_then(|text| text.parse().ok()),
            });
        }
        tracing::error!(
            slot = name,
            "the replication slot lost WAL the store did not have yet (max_slot_wal_keep_size): \
             creating it again"
        );
        if let Ok(mut status) = status.lock() {
            status.gaps += 1;
        }
        sql.execute("SELECT pg_drop_replication_slot($1)", &[&name])
            .await
            .context("dropping the invalidated replication slot")?;
    }
    let row = sql
        .query_one(
            "SELECT lsn::text FROM pg_create_physical_replication_slot($1, true)",
            &[&name],
        )
        .await
        .with_context(|| format!("creating the replication slot {name}"))?;
    let restart: Option<String> = row.get(0);
    tracing::info!(slot = name, restart_lsn = ?restart, "replication slot created");
    Ok(Slot {
        restart_lsn: restart.and_then(|text| text.parse().ok()),
    })
}

/// Whether a session failed because the server had removed WAL it was asked for.
fn wal_removed(error: &anyhow::Error) -> bool {
    format!("{error:#}").contains("has already been removed")
}

/// Where the store's WAL of this server's history ends, as the receiver last recorded it: its
/// position on its timeline, or the point where this server's history left that timeline.
/// `None` without a record, or when the recorded timeline is not on this server's history.
/// A record of another cluster is refused.
async fn store_end(
    store: &Store,
    system: &str,
    path: &TimelinePath,
) -> anyhow::Result<Option<Lsn>> {
    let Some(state) = read_state(store).await? else {
        return Ok(None);
    };
    if state.system_identifier != system {
        return Err(Failure::Config(format!(
            "the store's WAL stream is of cluster {}, this server is cluster {system}: two \
             clusters must not stream into one store (check GC_BACKUP_STORE)",
            state.system_identifier
        ))
        .into());
    }
    let Ok(stored) = state.stored.parse::<Lsn>() else {
        return Ok(None);
    };
    Ok(path
        .span_of(state.timeline)
        .map(|span| span.end.map_or(stored, |end| stored.min(end))))
}

/// The store's WAL ends at `end` and streaming resumes at `resume`: each segment in between
/// that the archive does not have (archive_command may have stored it) is missing, which is
/// logged as an error and counted.
async fn report_gap(
    store: &Store,
    path: &TimelinePath,
    end: Lsn,
    resume: Lsn,
    status: &Arc<Mutex<StreamStatus>>,
) -> anyhow::Result<()> {
    let first = SegmentNo::of(end, SEGMENT_SIZE);
    let last = SegmentNo::of(resume, SEGMENT_SIZE);
    let mut missing = Vec::new();
    for number in first.0..last.0 {
        let segment = SegmentNo(number);
        let timeline = path.timeline_at(segment.start(SEGMENT_SIZE));
        let file = WalFile::parse(&segment.file_name(timeline, SEGMENT_SIZE))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        match store.head(&layout::wal_key(&file)).await {
            Ok(_) => {}
            Err(StoreError::NotFound { .. }) => missing.push(file.name()),
            Err(error) => return Err(error.into()),
        }
    }
    let Some(first_missing) = missing.first() else {
        return Ok(());
    };
    let error = format!(
        "the replication slot begins at {resume}, but the store's WAL ends at {end}: {} \
         segment(s), {first_missing} first, are in neither the stream nor the archive, and \
         the server no longer has them. The slot was dropped or invalidated; restores cannot \
         pass this gap: take a base backup now",
        missing.len()
    );
    tracing::error!(%error, "WAL gap");
    if let Ok(mut status) = status.lock() {
        status.gaps += 1;
        status.last_error = Some(error);
    }
    Ok(())
}

const STATE_KEY: &str = "wal-stream/receiver.json";

async fn read_state(store: &Store) -> anyhow::Result<Option<ReceiverState>> {
    match store.get_bytes(&ObjectKey::from(STATE_KEY)).await {
        Ok(bytes) => Ok(serde_json::from_slice(&bytes).ok()),
        Err(StoreError::NotFound { .. }) => Ok(None),
        Err(error) => Err(anyhow::Error::new(error).context("reading the receiver's state")),
    }
}

/// The segment being received.
struct Segment {
    number: SegmentNo,
    encoder: FrameEncoder,
    /// Received, in bytes from the segment's start.
    received: u64,
    /// Raw bytes not yet in a chunk, from `chunked`.
    unchunked: Vec<u8>,
    chunked: u64,
}

impl Segment {
    fn new(start: Lsn, level: i32) -> Self {
        Self {
            number: SegmentNo::of(start, SEGMENT_SIZE),
            encoder: FrameEncoder::new(level),
            received: 0,
            unchunked: Vec::new(),
            chunked: 0,
        }
    }
}

/// What one upload stored.
struct Uploaded {
    /// Everything before it is stored once this and the uploads before it are.
    end: Lsn,
    /// The segment it archived, whose chunks can go.
    archived: Option<WalFile>,
    /// The bytes it held, given back to the memory share.
    held: usize,
}

type Upload<'a> = futures::future::BoxFuture<'a, anyhow::Result<Uploaded>>;

struct Stream<'a> {
    store: &'a Store,
    level: i32,
    system: String,
    timeline: u32,
    segment: Segment,
    received: Lsn,
    stored: Lsn,
    /// What the receiver's record in the store says is stored: all the slot is ever told.
    recorded: Lsn,
    uploads: futures::stream::FuturesOrdered<Upload<'a>>,
    /// The record being written (one at a time), resolved to the LSN it records.
    record: futures::stream::FuturesOrdered<futures::future::BoxFuture<'a, anyhow::Result<Lsn>>>,
    /// Chunks of archived segments being deleted.
    cleanups: futures::stream::FuturesUnordered<futures::future::BoxFuture<'a, ()>>,
    /// A flush came round while the uploads were full: chunk as soon as one completes.
    flush_due: bool,
    /// Bytes the uploads in flight hold.
    uploads_hold: usize,
    /// What the receiver may hold in all (`budget::wal_stream_cost`).
    memory_share: usize,
    status: Arc<Mutex<StreamStatus>>,
}

enum Event {
    Stop,
    Stored(anyhow::Result<Uploaded>),
    Recorded(anyhow::Result<Lsn>),
    Cleaned,
    Flush,
    Status,
    Message(Result<Streamed, crate::sources::SourceError>),
}

impl<'a> Stream<'a> {
    async fn follow(
        &mut self,
        replication: &mut Replication,
        sql: &tokio_postgres::Client,
        slot: &str,
        flush: Duration,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<()> {
        let mut flush_tick = tokio::time::interval(flush);
        let mut status_tick = tokio::time::interval(STATUS_INTERVAL);
        // A busy stream must not make up for missed ticks with a burst of tiny chunks.
        flush_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        status_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let room = self.has_room();
            let event = tokio::select! {
                biased;
                () = shutdown.cancelled() => Event::Stop,
                Some(done) = self.uploads.next(), if !self.uploads.is_empty() => Event::Stored(done),
                Some(done) = self.record.next(), if !self.record.is_empty() => Event::Recorded(done),
                Some(()) = self.cleanups.next(), if !self.cleanups.is_empty() => Event::Cleaned,
                _ = flush_tick.tick() => Event::Flush,
                _ = status_tick.tick() => Event::Status,
                message = replication.next(), if room => Event::Message(message),
            };
            match event {
                Event::Stop => {
                    // What arrived reaches the store before the receiver goes.
                    self.chunk()?;
                    self.drain().await?;
                    while self.cleanups.next().await.is_some() {}
                    let _ = replication
                        .status(self.received, self.recorded, false)
                        .await;
                    return Ok(());
                }
                Event::Stored(done) => {
                    let done = done?;
                    self.uploads_hold -= done.held;
                    self.stored_up_to(done.end);
                    if let Some(file) = done.archived {
                        // Not in the way of the WAL after it, and never before it is archived.
                        let store = self.store;
                        self.cleanups
                            .push(Box::pin(async move { remove_chunks(store, &file).await }));
                    }
                    if self.flush_due {
                        self.chunk()?;
                    }
                    self.record_stored();
                }
                Event::Recorded(done) => {
                    // The slot is told only what the record says: the record a restart
                    // resumes from is never behind the slot, or a killed receiver would
                    // look like a gap.
                    self.recorded = self.recorded.max(done?);
                    replication
                        .status(self.received, self.recorded, false)
                        .await?;
                    self.record_stored();
                }
                Event::Cleaned => {}
                Event::Flush => {
                    if self.uploads.len() < IN_FLIGHT {
                        self.chunk()?;
                    } else {
                        self.flush_due = !self.segment.unchunked.is_empty();
                    }
                }
                Event::Status => {
                    read_retained(sql, slot, &self.status).await;
                    replication
                        .status(self.received, self.recorded, false)
                        .await?;
                }
                Event::Message(message) => match message? {
                    Streamed::Wal {
                        start,
                        server_end,
                        data,
                    } => {
                        if let Ok(mut status) = self.status.lock() {
                            status.server_lsn = Some(server_end);
                        }
                        self.take(start, &data).await?;
                    }
                    Streamed::Keepalive { server_end, reply } => {
                        if let Ok(mut status) = self.status.lock() {
                            status.server_lsn = Some(server_end);
                        }
                        if reply {
                            replication
                                .status(self.received, self.recorded, false)
                                .await?;
                        }
                    }
                    Streamed::TimelineEnd => {
                        let (next, at) = replication.end_of_timeline().await?;
                        self.switch_timeline(replication, slot, next, at).await?;
                    }
                },
            }
        }
    }

    /// Whether the stream may be read: an upload slot free, the memory share not used up
    /// (PostgreSQL keeps what is not read, for the slot). With nothing in flight it is always
    /// read, or nothing would ever free room.
    fn has_room(&self) -> bool {
        if self.uploads.is_empty() {
            return true;
        }
        let held = self.uploads_hold + self.segment.encoder.held() + self.segment.unchunked.len();
        self.uploads.len() < IN_FLIGHT
            && self.cleanups.len() < CLEANUPS
            && held + MESSAGE_ROOM <= self.memory_share
    }

    /// Starts writing the record of what is stored, unless one is being written (its
    /// completion starts the next) or it already says so. Written beside the stream, never
    /// awaited in its way: a record per upload would otherwise stop the stream for one PUT
    /// each time.
    fn record_stored(&mut self) {
        if !self.record.is_empty() || self.stored <= self.recorded {
            return;
        }
        let (store, state, stored) = (self.store, self.state(), self.stored);
        self.record.push_back(Box::pin(async move {
            save_state(store, state).await?;
            Ok(stored)
        }));
    }

    /// Waits for every upload and records what they stored.
    async fn drain(&mut self) -> anyhow::Result<()> {
        while let Some(done) = self.uploads.next().await {
            let done = done?;
            self.uploads_hold -= done.held;
            self.stored_up_to(done.end);
            if let Some(file) = done.archived {
                remove_chunks(self.store, &file).await;
            }
        }
        while let Some(done) = self.record.next().await {
            self.recorded = self.recorded.max(done?);
        }
        save_state(self.store, self.state()).await?;
        self.recorded = self.stored;
        Ok(())
    }

    fn stored_up_to(&mut self, lsn: Lsn) {
        self.stored = self.stored.max(lsn);
        if let Ok(mut status) = self.status.lock() {
            status.stored_lsn = Some(self.stored);
            status.last_flush_at = Some(Utc::now());
        }
    }

    /// Appends WAL that begins at `start` (where the last message ended).
    async fn take(&mut self, start: Lsn, mut data: &[u8]) -> anyhow::Result<()> {
        if start != self.received {
            return Err(anyhow::anyhow!(
                "the WAL stream jumped from {} to {start}",
                self.received
            ));
        }
        while !data.is_empty() {
            let room = usize::try_from(SEGMENT_SIZE - self.segment.received).unwrap_or(usize::MAX);
            let (now, later) = data.split_at(data.len().min(room));
            let mut rest = now;
            while !rest.is_empty() {
                let taken = self.segment.encoder.take(rest);
                rest = &rest[taken..];
                if self.segment.encoder.frame_is_full() {
                    let mut encoder =
                        std::mem::replace(&mut self.segment.encoder, FrameEncoder::new(self.level));
                    encoder = tokio::task::spawn_blocking(move || {
                        encoder.compress_frame().map(|()| encoder)
                    })
                    .await
                    .context("compression worker failed")?
                    .context("compressing streamed WAL")?;
                    self.segment.encoder = encoder;
                }
            }
            self.segment.unchunked.extend_from_slice(now);
            self.segment.received += now.len() as u64;
            self.received = Lsn(self.received.0 + now.len() as u64);
            data = later;
            if self.segment.received == SEGMENT_SIZE {
                self.finish_segment()?;
            }
        }
        if self.segment.unchunked.len() >= CHUNK_MAX && self.uploads.len() < IN_FLIGHT {
            self.chunk()?;
        }
        Ok(())
    }

    /// Queues the WAL received since the last chunk as a chunk object.
    fn chunk(&mut self) -> anyhow::Result<()> {
        self.flush_due = false;
        if self.segment.unchunked.is_empty() {
            return Ok(());
        }
        let from = self.segment.chunked;
        let to = self.segment.received;
        let raw = Bytes::from(std::mem::take(&mut self.segment.unchunked));
        // The raw chunk and its compressed form, at most as large.
        let held = 2 * raw.len();
        self.uploads_hold += held;
        self.segment.chunked = to;
        let file = self.segment_file()?;
        let key = chunk_key(&file, from, to);
        let end = Lsn(self.segment.number.start(SEGMENT_SIZE).0 + to);
        let store = self.store;
        let level = self.level;
        self.uploads.push_back(Box::pin(async move {
            let seal = store.keys().recipients.clone();
            let stored = tokio::task::spawn_blocking(move || {
                let (header, stored) = super::object::encode(&raw, level, 0)?;
                super::object::seal_stored(&header, stored, seal.as_ref())
            })
            .await
            .context("compression worker failed")?
            .context("compressing streamed WAL")?;
            let started = std::time::Instant::now();
            crate::pipeline::rate::upload_now(stored.len());
            store
                .put(&key, stored.into())
                .await
                .with_context(|| format!("storing streamed WAL {key}"))?;
            store.sync(&key).await?;
            tracing::debug!(%key, elapsed_ms = started.elapsed().as_millis(), "chunk stored");
            Ok(Uploaded {
                end,
                archived: None,
                held,
            })
        }));
        Ok(())
    }

    /// Queues the finished segment as the archived object, and starts the next one.
    fn finish_segment(&mut self) -> anyhow::Result<()> {
        let file = self.segment_file()?;
        let number = self.segment.number;
        let received = self.segment.received;
        let done = std::mem::replace(
            &mut self.segment,
            Segment::new(number.next().start(SEGMENT_SIZE), self.level),
        );
        let end = Lsn(number.start(SEGMENT_SIZE).0 + received);
        let store = self.store;
        let held = done.encoder.held() + done.unchunked.len();
        self.uploads_hold += held;
        self.uploads.push_back(Box::pin(async move {
            let seal = store.keys().recipients.clone();
            let encoder = done.encoder;
            let (header, stored) =
                tokio::task::spawn_blocking(move || encoder.finish(seal.as_ref()))
                    .await
                    .context("compression worker failed")?
                    .context("compressing streamed WAL")?;
            let started = std::time::Instant::now();
            super::store_archived(store, &file, &header, stored).await?;
            tracing::debug!(
                segment = %file.name(),
                elapsed_ms = started.elapsed().as_millis(),
                "segment archived"
            );
            Ok(Uploaded {
                end,
                archived: Some(file),
                held,
            })
        }));
        Ok(())
    }

    /// The WAL file the current segment is.
    fn segment_file(&self) -> anyhow::Result<WalFile> {
        WalFile::parse(&self.segment.number.file_name(self.timeline, SEGMENT_SIZE))
            .map_err(|e| anyhow::anyhow!("{e}"))
    }

    /// The server ended the timeline being streamed (an older one of its history): what came
    /// of its last segment is stored as chunks, and streaming goes on with the next timeline
    /// from that segment's start, whose file on the new timeline begins with the same WAL.
    /// The old timeline's `.partial` is PostgreSQL's archiver's to store (its content runs
    /// past the switch), so that the two never store different objects under one name.
    async fn switch_timeline(
        &mut self,
        replication: &mut Replication,
        slot: &str,
        next: u32,
        at: Lsn,
    ) -> anyhow::Result<()> {
        self.chunk()?;
        self.drain().await?;
        let (_, content) = replication.timeline_history(next).await?;
        store_history(self.store, next, &content).await?;
        self.timeline = next;
        let start = SegmentNo::of(at, SEGMENT_SIZE).start(SEGMENT_SIZE);
        self.segment = Segment::new(start, self.level);
        self.received = start;
        tracing::info!(timeline = next, %start, "WAL streaming follows the next timeline");
        replication.start(slot, start, next).await?;
        Ok(())
    }

    fn state(&self) -> ReceiverState {
        ReceiverState {
            system_identifier: self.system.clone(),
            timeline: self.timeline,
            stored: self.stored.to_string(),
        }
    }
}

/// How much WAL the server keeps for the slot, for the metrics (a failed read leaves the last
/// figure: the stream itself says whether the server is there).
async fn read_retained(sql: &tokio_postgres::Client, slot: &str, status: &Mutex<StreamStatus>) {
    let row = sql
        .query_opt(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::int8 \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await;
    if let Ok(Some(row)) = row
        && let Ok(Some(bytes)) = row.try_get::<_, Option<i64>>(0)
        && let Ok(mut status) = status.lock()
    {
        status.slot_retained_bytes = u64::try_from(bytes).ok();
    }
}

async fn save_state(store: &Store, state: ReceiverState) -> anyhow::Result<()> {
    let bytes = serde_json::to_vec(&state).context("encoding the receiver's state")?;
    store
        .put(&ObjectKey::from(STATE_KEY), Bytes::from(bytes).into())
        .await
        .context("storing the receiver's state")?;
    Ok(())
}

/// Stores a history file the server sent, as the archive holds it.
async fn store_history(store: &Store, timeline: u32, content: &[u8]) -> anyhow::Result<()> {
    let file = WalFile::History { timeline };
    let (header, stored) =
        super::object::encode(content, 3, 0).context("compressing a history file")?;
    let stored = super::object::seal_stored(&header, stored, store.keys().recipients.as_ref())
        .context("encrypting a history file")?;
    super::store_archived(store, &file, &header, stored).await?;
    Ok(())
}

/// `wal-stream/<dir>/<segment>/<from>-<to>.zst`.
fn chunk_key(file: &WalFile, from: u64, to: u64) -> ObjectKey {
    ObjectKey::from(format!("{}{from:08X}-{to:08X}.zst", chunks_prefix(file)))
}

/// Where the receiver keeps its chunks and its record.
pub(crate) const STREAM_ROOT: &str = "wal-stream";

fn chunks_prefix(file: &WalFile) -> String {
    let directory = file.directory().unwrap_or_default();
    format!("{STREAM_ROOT}/{directory}/{}/", file.name())
}

/// Deletes a finished segment's chunks; one left behind only costs space (retention removes
/// it later) and is never read while the segment is archived.
async fn remove_chunks(store: &Store, file: &WalFile) {
    let prefix = ObjectKey::from(chunks_prefix(file).trim_end_matches('/'));
    let Ok(listed) = store.list(&prefix).await else {
        return;
    };
    for meta in listed {
        let _ = store.delete(&meta.location).await;
    }
}

/// Every segment with a chunk at its start, and when its newest chunk was stored.
pub async fn streamed_segments(store: &Store) -> anyhow::Result<Vec<(WalFile, DateTime<Utc>)>> {
    let listed = store
        .list(&ObjectKey::from(STREAM_ROOT))
        .await
        .map_err(anyhow::Error::from)
        .context("listing the streamed WAL")?;
    let mut segments: std::collections::BTreeMap<String, (bool, DateTime<Utc>)> =
        std::collections::BTreeMap::new();
    for meta in listed {
        let Some((file, from, _)) = parse_chunk_key(&meta.location) else {
            continue;
        };
        let entry = segments
            .entry(file.name())
            .or_insert((false, meta.last_modified));
        entry.0 |= from == 0;
        entry.1 = entry.1.max(meta.last_modified);
    }
    Ok(segments
        .into_iter()
        .filter(|(_, (begun, _))| *begun)
        .filter_map(|(name, (_, stored))| Some((WalFile::parse(&name).ok()?, stored)))
        .collect())
}

/// (segment, from, to) of a chunk key that [`chunk_key`] would build.
pub(crate) fn parse_chunk_key(key: &ObjectKey) -> Option<(WalFile, u64, u64)> {
    let mut parts = key.as_ref().rsplit('/');
    let range = parts.next()?.strip_suffix(".zst")?;
    let file = WalFile::parse(parts.next()?).ok()?;
    let (from, to) = range.split_once('-')?;
    let from = u64::from_str_radix(from, 16).ok()?;
    let to = u64::from_str_radix(to, 16).ok()?;
    let valid = from < to && to <= SEGMENT_SIZE && matches!(file, WalFile::Segment { .. });
    (valid && chunk_key(&file, from, to) == *key).then_some((file, from, to))
}

/// The streamed content of segment `file`, assembled from its chunks from the segment's start
/// as far as they reach without a gap, zero-filled to the segment's size (PostgreSQL reads the
/// zeros as the end of WAL). `None` when no chunk begins the segment.
pub async fn read_streamed(store: &Store, file: &WalFile) -> anyhow::Result<Option<Vec<u8>>> {
    let prefix = ObjectKey::from(chunks_prefix(file).trim_end_matches('/'));
    let listed = store
        .list(&prefix)
        .await
        .map_err(anyhow::Error::from)
        .with_context(|| format!("listing the streamed WAL of {}", file.name()))?;
    let mut chunks: Vec<(u64, u64, ObjectKey)> = listed
        .into_iter()
        .filter_map(|meta| {
            let (_, from, to) = parse_chunk_key(&meta.location)?;
            Some((from, to, meta.location))
        })
        .collect();
    chunks.sort_by_key(|(from, to, _)| (*from, std::cmp::Reverse(*to)));
    let mut content = Vec::new();
    let mut reached = 0u64;
    for (from, to, key) in chunks {
        if from > reached {
            break;
        }
        if to <= reached {
            continue;
        }
        let raw = super::read_object(store, &key).await?;
        if raw.len() as u64 != to - from {
            return Err(Failure::Corrupt(format!(
                "{key} in {} holds {} bytes, its name says {}",
                store.name(),
                raw.len(),
                to - from
            ))
            .into());
        }
        let skip = usize::try_from(reached - from).unwrap_or(usize::MAX);
        content.extend_from_slice(&raw[skip..]);
        reached = to;
    }
    if reached == 0 {
        return Ok(None);
    }
    content.resize(usize::try_from(SEGMENT_SIZE).unwrap_or(usize::MAX), 0);
    Ok(Some(content))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_keys_name_their_segment_and_range_and_nothing_else_parses() {
        let file = WalFile::parse("000000010000000000000003").unwrap();
        let key = chunk_key(&file, 0, 0x2000);
        assert_eq!(
            key.as_ref(),
            "wal-stream/0000000100000000/000000010000000000000003/00000000-00002000.zst"
        );
        assert_eq!(parse_chunk_key(&key), Some((file, 0, 0x2000)));
        for stray in [
            // Empty, backwards, past the segment, another directory, not a segment.
            "wal-stream/0000000100000000/000000010000000000000003/00002000-00002000.zst",
            "wal-stream/0000000100000000/000000010000000000000003/00003000-00002000.zst",
            "wal-stream/0000000100000000/000000010000000000000003/00000000-01000001.zst",
            "wal-stream/0000000100000001/000000010000000000000003/00000000-00002000.zst",
            "wal-stream/00000002.history/00000000-00002000.zst",
            "wal-stream/receiver.json",
        ] {
            assert_eq!(parse_chunk_key(&ObjectKey::from(stray)), None, "{stray}");
        }
    }
}
