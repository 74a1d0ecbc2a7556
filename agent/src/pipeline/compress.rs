//! The compressor: runs on a blocking thread, hashes the raw bytes, compresses them with zstd
//! and cuts the compressed stream into parts.

use std::io::Write;

use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc::{Receiver, Sender};

use super::{MAX_PARTS, Piece, PipelineError, RawDigest, part_size_for};
use crate::config::PipelineConfig;

pub(super) struct Compressed {
    pub raw_bytes: u64,
    pub raw_sha256: Option<String>,
    pub stored_bytes: u64,
}

/// Consumes raw chunks until [`Piece::End`], then finishes the zstd frame and sends the last
/// part and the end. Returns `Stopped` if the reader or the uploader went away; then the
/// uploader sees its queue close without an end, and aborts.
pub(super) fn run(
    mut chunks: Receiver<Piece>,
    parts: Sender<Piece>,
    settings: &PipelineConfig,
    digest: RawDigest,
    key: &str,
) -> Result<Compressed, PipelineError> {
    let writer = PartWriter::new(parts, settings.part_size, key);
    let mut encoder = zstd::stream::write::Encoder::new(writer, settings.zstd_level)
        .map_err(PipelineError::Compress)?;
    encoder
        .include_checksum(true)
        .map_err(PipelineError::Compress)?;
    if settings.zstd_workers > 0 {
        encoder
            .multithread(settings.zstd_workers)
            .map_err(PipelineError::Compress)?;
    }
    let mut hasher = (digest == RawDigest::Sha256).then(Sha256::new);
    let mut raw_bytes = 0u64;
    loop {
        let chunk = match chunks.blocking_recv() {
            Some(Piece::Data(chunk)) => chunk,
            Some(Piece::End) => break,
            None => return Err(PipelineError::Stopped),
        };
        if let Some(hasher) = &mut hasher {
            hasher.update(&chunk);
        }
        raw_bytes += chunk.len() as u64;
        encoder
            .write_all(&chunk)
            .map_err(|e| classify(e, encoder.get_ref()))?;
    }
    let mut writer = encoder.finish().map_err(PipelineError::Compress)?;
    writer.send_part().map_err(|e| classify(e, &writer))?;
    if writer.parts.blocking_send(Piece::End).is_err() {
        return Err(PipelineError::Stopped);
    }
    Ok(Compressed {
        raw_bytes,
        raw_sha256: hasher.map(|hasher| hex::encode(hasher.finalize())),
        stored_bytes: writer.stored_bytes,
    })
}

/// A write error from inside zstd may be ours (the uploader stopped, too many parts); tell
/// which.
fn classify(error: std::io::Error, writer: &PartWriter) -> PipelineError {
    match &writer.failure {
        Some(Failure::Stopped) => PipelineError::Stopped,
        Some(Failure::TooLarge) => PipelineError::TooLarge {
            key: writer.key.clone(),
            part_size: writer.base_part_size,
        },
        None => PipelineError::Compress(error),
    }
}

enum Failure {
    Stopped,
    TooLarge,
}

/// Collects compressed bytes into parts and hands each full part to the uploader, blocking
/// while the part queue is full.
struct PartWriter {
    parts: Sender<Piece>,
    buffer: Vec<u8>,
    base_part_size: usize,
    index: u32,
    stored_bytes: u64,
    key: String,
    failure: Option<Failure>,
}

impl PartWriter {
    fn new(parts: Sender<Piece>, base_part_size: usize, key: &str) -> Self {
        Self {
            parts,
            buffer: Vec::with_capacity(base_part_size),
            base_part_size,
            index: 0,
            stored_bytes: 0,
            key: key.to_string(),
            failure: None,
        }
    }

    fn target(&self) -> usize {
        part_size_for(self.index, self.base_part_size)
    }

    fn send_part(&mut self) -> std::io::Result<()> {
        if self.buffer.is_empty() && self.index > 0 {
            return Ok(());
        }
        if self.index >= MAX_PARTS {
            self.failure = Some(Failure::TooLarge);
            return Err(std::io::Error::other("too many parts"));
        }
        self.index += 1;
        let next_capacity = self.target();
        let part = std::mem::replace(&mut self.buffer, Vec::with_capacity(next_capacity));
        self.stored_bytes += part.len() as u64;
        if self
            .parts
            .blocking_send(Piece::Data(Bytes::from(part)))
            .is_err()
        {
            self.failure = Some(Failure::Stopped);
            return Err(std::io::Error::new(
                std::io::ErrorKind::BrokenPipe,
                "uploader stopped",
            ));
        }
        Ok(())
    }
}

impl Write for PartWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        // Fill the current part exactly, so every part but the last has its target size.
        let room = self.target() - self.buffer.len();
        let taken = room.min(data.len());
        self.buffer.extend_from_slice(&data[..taken]);
        if self.buffer.len() == self.target() {
            self.send_part()?;
        }
        Ok(taken)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
