//! Source bytes → SHA-256 → zstd → parts → the store, and back.
//!
//! ```text
//!  source (AsyncRead)          compressor thread                 uploader (async)
//!  read 256 KiB chunks ──[4]──▶ sha256(raw) → zstd → part ──[1]──▶ put_part × parallel_uploads
//! ```
//!
//! Each arrow is a bounded channel (capacity in brackets); a full channel blocks the side that
//! sends, so a slow store slows the source instead of growing memory. Parts take a slot
//! (`PartSlots`) before they are filled, so memory is about `part_size × (parallel_uploads
//! + 1)` plus zstd's buffers ([`FRAME_BYTES`] twice at the
//! fast levels, where zstd compresses whole frames; its window otherwise): nothing depends on
//! the size of the source, and nothing is written to local disk. Any failure drops the
//! channels, which stops every stage, and aborts the multipart upload. See [`upload`] and [`download`].

pub mod budget;
mod compress;
mod download;
pub mod rate;
mod upload;

use std::time::Duration;

use tokio::io::AsyncRead;
use tokio_util::sync::CancellationToken;

use crate::config::PipelineConfig;
use crate::store::{ObjectKey, Store, StoreError};

pub use compress::{CompressingWriter, FRAME_BYTES, uses_frames};
pub use download::{Expected, Sink, download};

/// Raw bytes read from the source per message to the compressor.
pub(crate) const CHUNK_SIZE: usize = 256 * 1024;
/// Chunks waiting for the compressor (1 MiB). When full, the source reader waits.
pub(crate) const CHUNK_QUEUE: usize = 4;
/// Finished parts waiting for an upload slot. When full, the compressor waits.
const PART_QUEUE: usize = 1;

/// How many compressed parts may exist at once: `parallel_uploads + 1` (those uploading and
/// the one being filled). The compressor takes a slot before it starts filling a part and
/// the uploader gives it back when that part's upload has finished, so a part waiting in the
/// queue counts too. This is what makes a pipeline's memory `part_size × (parallel + 1)`.
#[derive(Debug)]
pub(crate) struct PartSlots {
    free: std::sync::Mutex<usize>,
    freed: std::sync::Condvar,
}

impl PartSlots {
    pub(crate) fn new(slots: usize) -> std::sync::Arc<Self> {
        std::sync::Arc::new(Self {
            free: std::sync::Mutex::new(slots.max(2)),
            freed: std::sync::Condvar::new(),
        })
    }

    /// Blocks (on the compressor's thread) until a slot is free; `false` once `gone()` says
    /// the uploader is no longer there to free one.
    fn acquire(&self, gone: impl Fn() -> bool) -> bool {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if *free > 0 {
                *free -= 1;
                return true;
            }
            if gone() {
                return false;
            }
            free = self
                .freed
                .wait_timeout(free, Duration::from_millis(50))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn release(&self) {
        *self.free.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        self.freed.notify_one();
    }
}

/// What travels between stages. The end of a stream is said explicitly: a channel that closes
/// without [`Piece::End`] means the stage before failed, and the next one must abort rather
/// than commit a truncated stream.
#[derive(Debug)]
pub(crate) enum Piece {
    Data(bytes::Bytes),
    End,
}
/// S3 allows at most this many parts in one upload.
const MAX_PARTS: u32 = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("reading the source failed: {0}")]
    Source(#[source] std::io::Error),
    #[error("compressing failed: {0}")]
    Compress(#[source] std::io::Error),
    #[error("upload of part {part} of {key} failed: {source}")]
    Part {
        part: u32,
        key: String,
        #[source]
        source: StoreError,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(
        "{key} would need more than {MAX_PARTS} parts; raise pipeline.part-size (now {part_size} bytes)"
    )]
    TooLarge { key: String, part_size: usize },
    #[error("{0}")]
    Corrupt(String),
    #[error(transparent)]
    Seal(#[from] crate::seal::SealError),
    #[error("writing the restored data failed: {0}")]
    Sink(#[source] std::io::Error),
    #[error("interrupted; the upload of {key} was aborted")]
    Cancelled { key: String },
    /// A stage stopped because another one failed; never the error reported to the user.
    #[error("pipeline stage stopped because another stage failed")]
    Stopped,
    #[error("pipeline worker failed: {0}")]
    Worker(String),
}

/// Whether the compressor hashes the raw stream with SHA-256 for the manifest.
///
/// Base backups skip it: every file in their tars carries its own CRC-32C and every zstd frame
/// an XXH64 of its content (encrypted: age's tag on every 64 KiB instead), which the decoder
/// checks, and SHA-256 of a 2.5 GB cluster was a
/// fifth of the backup's CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RawDigest {
    Sha256,
    Skip,
}

/// What was stored, for the manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadSummary {
    pub raw_bytes: u64,
    /// `None` when the upload was asked not to hash ([`RawDigest::Skip`]).
    pub raw_sha256: Option<String>,
    pub stored_bytes: u64,
    pub parts: u32,
    pub elapsed: Duration,
    /// Encrypted to the store's recipients.
    pub sealed: bool,
}

/// Streams `source` through the pipeline into `key`.
///
/// Returns when the object is completely stored, or with the first real error after aborting
/// the upload. `cancel` aborts the upload in flight (SIGTERM, shutdown).
pub async fn upload<R>(
    store: &Store,
    key: &ObjectKey,
    source: R,
    settings: &PipelineConfig,
    cancel: &CancellationToken,
) -> Result<UploadSummary, PipelineError>
where
    R: AsyncRead + Unpin + Send,
{
    let started = std::time::Instant::now();
    let (chunk_tx, chunk_rx) = tokio::sync::mpsc::channel(CHUNK_QUEUE);
    let (part_tx, part_rx) = tokio::sync::mpsc::channel(PART_QUEUE);
    let slots = PartSlots::new(settings.parallel_uploads + 1);
    let compressor = {
        let settings = settings.clone();
        let key = key.to_string();
        let slots = slots.clone();
        let seal = store.keys().recipients.clone();
        tokio::task::spawn_blocking(move || {
            let seal = seal.as_ref();
            compress::run(
                chunk_rx,
                part_tx,
                slots,
                &settings,
                RawDigest::Sha256,
                seal,
                &key,
            )
        })
    };
    let reading = read_source(source, chunk_tx, cancel);
    let uploading = upload::run(
        store,
        key,
        part_rx,
        &slots,
        settings.parallel_uploads,
        cancel,
    );
    let (read_result, upload_result) = tokio::join!(reading, uploading);
    let compress_result = compressor
        .await
        .map_err(|e| PipelineError::Worker(e.to_string()))
        .and_then(|r| r);

    // Report the cause, not the stages that stopped because of it.
    let stored = match (upload_result, compress_result, read_result) {
        (Ok(stored), Ok(compressed), Ok(())) => (stored, compressed),
        (Err(e), _, _) if !matches!(e, PipelineError::Stopped) => return Err(e),
        (_, Err(e), _) if !matches!(e, PipelineError::Stopped) => return Err(e),
        (_, _, Err(e)) if !matches!(e, PipelineError::Stopped) => return Err(e),
        _ => return Err(PipelineError::Stopped),
    };
    let (upload, compressed) = stored;
    Ok(summary(upload, compressed, started))
}

fn summary(
    upload: upload::Uploaded,
    compressed: compress::Compressed,
    started: std::time::Instant,
) -> UploadSummary {
    debug_assert_eq!(upload.stored_bytes, compressed.stored_bytes);
    UploadSummary {
        sealed: compressed.sealed,
        raw_bytes: compressed.raw_bytes,
        raw_sha256: compressed.raw_sha256,
        stored_bytes: upload.stored_bytes,
        parts: upload.parts,
        elapsed: started.elapsed(),
    }
}

/// Why [`upload_written`] failed: its producer, or the pipeline (the cause, not a stage that
/// stopped because of it).
#[derive(Debug)]
pub enum WrittenError<E> {
    Producer(E),
    Pipeline(PipelineError),
}

/// Uploads as `key` what `produce` writes into a [`CompressingWriter`] on a blocking thread,
/// which compresses there: no channel of raw chunks, no copies between stages. `produce`
/// failing aborts the upload; a failing upload makes `produce`'s writes fail.
pub async fn upload_written<T, E>(
    store: &Store,
    key: &ObjectKey,
    settings: &PipelineConfig,
    digest: RawDigest,
    cancel: &CancellationToken,
    produce: impl FnOnce(&mut CompressingWriter) -> Result<T, E> + Send + 'static,
) -> Result<(UploadSummary, T), WrittenError<E>>
where
    T: Send + 'static,
    E: Send + 'static,
{
    let started = std::time::Instant::now();
    let (part_tx, part_rx) = tokio::sync::mpsc::channel(PART_QUEUE);
    let slots = PartSlots::new(settings.parallel_uploads + 1);
    let producer = {
        let settings = settings.clone();
        let key = key.to_string();
        let slots = slots.clone();
        let seal = store.keys().recipients.clone();
        tokio::task::spawn_blocking(move || {
            let mut writer =
                CompressingWriter::new(part_tx, slots, &settings, digest, seal.as_ref(), &key)
                    .map_err(WrittenError::Pipeline)?;
            // On failure the writer is dropped unfinished: the uploader aborts.
            let produced = produce(&mut writer).map_err(WrittenError::Producer)?;
            let compressed = writer.finish().map_err(WrittenError::Pipeline)?;
            Ok((compressed, produced))
        })
    };
    let uploaded = upload::run(
        store,
        key,
        part_rx,
        &slots,
        settings.parallel_uploads,
        cancel,
    )
    .await;
    let produced = producer
        .await
        .map_err(|e| WrittenError::Pipeline(PipelineError::Worker(e.to_string())))
        .and_then(|r| r);
    match (uploaded, produced) {
        (Ok(upload), Ok((compressed, value))) => Ok((summary(upload, compressed, started), value)),
        (Err(e), _) if !matches!(e, PipelineError::Stopped) => Err(WrittenError::Pipeline(e)),
        (_, Err(e)) => Err(e),
        (Err(e), Ok(_)) => Err(WrittenError::Pipeline(e)),
    }
}

/// Reads the source in chunks and queues them for the compressor.
async fn read_source<R>(
    mut source: R,
    chunks: tokio::sync::mpsc::Sender<Piece>,
    cancel: &CancellationToken,
) -> Result<(), PipelineError>
where
    R: AsyncRead + Unpin,
{
    use tokio::io::AsyncReadExt;
    loop {
        let mut chunk = bytes::BytesMut::with_capacity(CHUNK_SIZE);
        let mut at_end = false;
        while chunk.len() < CHUNK_SIZE {
            let read = tokio::select! {
                read = source.read_buf(&mut chunk) => read.map_err(PipelineError::Source)?,
                () = cancel.cancelled() => return Err(PipelineError::Stopped),
            };
            if read == 0 {
                at_end = true;
                break;
            }
        }
        if !chunk.is_empty() && chunks.send(Piece::Data(chunk.freeze())).await.is_err() {
            return Err(PipelineError::Stopped);
        }
        if at_end {
            return chunks
                .send(Piece::End)
                .await
                .map_err(|_| PipelineError::Stopped);
        }
    }
}

/// The size of part `index` (0-based): `base` for the first 2,000 parts, then doubling every
/// 2,000, so that the 10,000-part limit of S3 is reached only past 62,000 × `base` (about
/// 484 GiB stored with 8 MiB parts) while small and medium backups keep small parts.
pub(crate) fn part_size_for(index: u32, base: usize) -> usize {
    base << (index / 2_000).min(4)
}

#[cfg(test)]
mod tests;
