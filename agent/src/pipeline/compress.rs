//! The compressor: runs on a blocking thread, hashes the raw bytes, compresses them with zstd
//! and cuts the compressed stream into parts.
//!
//! At the fast levels without zstd workers (the defaults) the stream is a sequence of
//! independent frames of `frame_bytes` raw bytes each (at most [`FRAME_BYTES`]; smaller
//! when the memory limit asks for it), compressed in one call: 1.4× the
//! speed of zstd's streaming API, whose ring buffer sends most blocks down its slower
//! external-dictionary path, for 0.1% more bytes (measured on the bench cluster's PGDATA).
//! Every zstd decoder, `zstd -d` included, reads concatenated frames as one stream.
//!
//! With recipients, the compressed stream is encrypted (age, 64 KiB chunks) on its way into
//! the parts, on the same thread: the stored object is one age file of the zstd stream.

use std::io::Write;

use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc::{Receiver, Sender};

use super::{MAX_PARTS, PartSlots, Piece, PipelineError, RawDigest, part_size_for};
use crate::config::{MIB, PipelineConfig};
use crate::seal::Recipients;

/// Raw bytes per frame when compressing in frames, unless the memory budget asks for less
/// (see the module's doc and [`super::budget`]).
pub const FRAME_BYTES: usize = 4 * MIB;

/// Whether `settings` compress in frames: fast levels only, where the window (≤ 2 MiB) is
/// well inside a frame, and no zstd workers, which bring their own job splitting.
pub fn uses_frames(settings: &PipelineConfig) -> bool {
    settings.zstd_level <= 3 && settings.zstd_workers == 0
}

pub(super) struct Compressed {
    pub raw_bytes: u64,
    pub raw_sha256: Option<String>,
    pub stored_bytes: u64,
    pub sealed: bool,
}

/// Consumes raw chunks until [`Piece::End`], then finishes the zstd frame and sends the last
/// part and the end. Returns `Stopped` if the reader or the uploader went away; then the
/// uploader sees its queue close without an end, and aborts.
pub(super) fn run(
    mut chunks: Receiver<Piece>,
    parts: Sender<Piece>,
    slots: std::sync::Arc<PartSlots>,
    settings: &PipelineConfig,
    digest: RawDigest,
    seal: Option<&Recipients>,
    key: &str,
) -> Result<Compressed, PipelineError> {
    let mut writer = CompressingWriter::new(parts, slots, settings, digest, seal, key)?;
    loop {
        let chunk = match chunks.blocking_recv() {
            Some(Piece::Data(chunk)) => chunk,
            Some(Piece::End) => break,
            None => return Err(PipelineError::Stopped),
        };
        writer
            .write_all(&chunk)
            .map_err(|e| writer.faults.classify(e))?;
    }
    writer.finish()
}

/// The compressing end of a pipeline as a blocking `Write`: hashes (if asked), compresses and
/// hands full parts to the uploader, blocking while its queue is full. A producer that runs on
/// a blocking thread anyway (the tar writer of a base backup) writes into it directly, without
/// a channel of raw chunks and the copies and thread hand-offs that come with one.
///
/// Dropped unfinished (its producer failed), the uploader sees its queue close without an end,
/// and aborts the upload.
pub struct CompressingWriter {
    encoder: Encoder,
    sealed: bool,
    faults: Faults,
    hasher: Option<Sha256>,
    raw_bytes: u64,
}

impl std::fmt::Debug for CompressingWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompressingWriter")
            .field("raw_bytes", &self.raw_bytes)
            .finish_non_exhaustive()
    }
}

impl CompressingWriter {
    pub(super) fn new(
        parts: Sender<Piece>,
        slots: std::sync::Arc<PartSlots>,
        settings: &PipelineConfig,
        digest: RawDigest,
        seal: Option<&Recipients>,
        key: &str,
    ) -> Result<Self, PipelineError> {
        let faults = Faults {
            failure: std::sync::Arc::new(std::sync::OnceLock::new()),
            key: key.to_string(),
            base_part_size: settings.part_size,
        };
        let writer = PartWriter::new(parts, slots, settings.part_size, faults.failure.clone());
        let output = match seal {
            None => Output::Clear(writer),
            Some(recipients) => {
                Output::Sealed(recipients.seal(writer).map_err(|e| faults.classify(e))?)
            }
        };
        Ok(Self {
            // Sealed, age authenticates every 64 KiB of the compressed stream, which catches
            // whatever zstd's XXH64 of each frame would: that hash is work for nothing.
            encoder: Encoder::new(output, settings, seal.is_none())
                .map_err(PipelineError::Compress)?,
            faults,
            sealed: seal.is_some(),
            hasher: (digest == RawDigest::Sha256).then(Sha256::new),
            raw_bytes: 0,
        })
    }

    /// Ends the stream: the last frame, the last part, then the end of the part queue.
    pub(super) fn finish(self) -> Result<Compressed, PipelineError> {
        let faults = self.faults;
        let mut writer = self.encoder.finish(&faults)?;
        writer.send_part().map_err(|e| faults.classify(e))?;
        if writer.parts.blocking_send(Piece::End).is_err() {
            return Err(PipelineError::Stopped);
        }
        Ok(Compressed {
            raw_bytes: self.raw_bytes,
            raw_sha256: self.hasher.map(|hasher| hex::encode(hasher.finalize())),
            stored_bytes: writer.stored_bytes,
            sealed: self.sealed,
        })
    }
}

impl Write for CompressingWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.encoder.write_all(data)?;
        if let Some(hasher) = &mut self.hasher {
            hasher.update(data);
        }
        self.raw_bytes += data.len() as u64;
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// zstd's streaming encoder, or frames of `frame_bytes` compressed one at a time.
enum Encoder {
    Stream(zstd::stream::write::Encoder<'static, Output>),
    Frames(FrameEncoder),
}

/// Where compressed bytes go: straight into parts, or through age first.
enum Output {
    Clear(PartWriter),
    Sealed(age::stream::StreamWriter<PartWriter>),
}

impl Output {
    /// Ends the age file (its last chunk), if any; what is left is the part writer.
    fn finish(self) -> std::io::Result<PartWriter> {
        match self {
            Self::Clear(writer) => Ok(writer),
            Self::Sealed(writer) => writer.finish(),
        }
    }
}

impl Write for Output {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        match self {
            Self::Clear(writer) => writer.write(data),
            Self::Sealed(writer) => writer.write(data),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

struct FrameEncoder {
    compressor: zstd::bulk::Compressor<'static>,
    frame_bytes: usize,
    raw: Vec<u8>,
    compressed: Vec<u8>,
    frames: u64,
    writer: Output,
}

impl FrameEncoder {
    fn write_all(&mut self, mut data: &[u8]) -> std::io::Result<()> {
        while !data.is_empty() {
            let taken = (self.frame_bytes - self.raw.len()).min(data.len());
            self.raw.extend_from_slice(&data[..taken]);
            data = &data[taken..];
            if self.raw.len() == self.frame_bytes {
                self.frame()?;
            }
        }
        Ok(())
    }

    /// Compresses the raw bytes gathered so far as one frame and hands it to the writer.
    fn frame(&mut self) -> std::io::Result<()> {
        self.compressed.clear();
        self.compressor
            .compress_to_buffer(self.raw.as_slice(), &mut self.compressed)?;
        self.raw.clear();
        self.frames += 1;
        self.writer.write_all(&self.compressed)
    }
}

impl Encoder {
    fn new(writer: Output, settings: &PipelineConfig, checksum: bool) -> std::io::Result<Self> {
        if uses_frames(settings) {
            let mut compressor = zstd::bulk::Compressor::new(settings.zstd_level)?;
            compressor.include_checksum(checksum)?;
            let frame_bytes = settings.frame_bytes.clamp(64 * 1024, FRAME_BYTES);
            return Ok(Self::Frames(FrameEncoder {
                compressor,
                frame_bytes,
                raw: Vec::with_capacity(frame_bytes),
                compressed: Vec::with_capacity(zstd::zstd_safe::compress_bound(frame_bytes)),
                frames: 0,
                writer,
            }));
        }
        let mut encoder = zstd::stream::write::Encoder::new(writer, settings.zstd_level)?;
        encoder.include_checksum(checksum)?;
        if settings.zstd_workers > 0 {
            encoder.multithread(settings.zstd_workers)?;
        }
        Ok(Self::Stream(encoder))
    }

    fn write_all(&mut self, data: &[u8]) -> std::io::Result<()> {
        match self {
            Self::Stream(encoder) => encoder.write_all(data),
            Self::Frames(frames) => frames.write_all(data),
        }
    }

    /// Ends the stream: the last frame, or the streaming encoder's epilogue.
    fn finish(self, faults: &Faults) -> Result<PartWriter, PipelineError> {
        let output = match self {
            Self::Stream(encoder) => encoder.try_finish().map_err(|(_, e)| faults.classify(e))?,
            Self::Frames(mut frames) => {
                // An empty stream still gets one (empty) frame: the object must decompress.
                if !frames.raw.is_empty() || frames.frames == 0 {
                    frames.frame().map_err(|e| faults.classify(e))?;
                }
                frames.writer
            }
        };
        output.finish().map_err(|e| faults.classify(e))
    }
}

/// What the part writer ran into, seen from above zstd and age, whose write errors hide it.
struct Faults {
    failure: std::sync::Arc<std::sync::OnceLock<Failure>>,
    key: String,
    base_part_size: usize,
}

impl Faults {
    /// A write error from inside zstd or age may be ours (the uploader stopped, too many
    /// parts); tell which.
    fn classify(&self, error: std::io::Error) -> PipelineError {
        match self.failure.get() {
            Some(Failure::Stopped) => PipelineError::Stopped,
            Some(Failure::TooLarge) => PipelineError::TooLarge {
                key: self.key.clone(),
                part_size: self.base_part_size,
            },
            None => PipelineError::Compress(error),
        }
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
    slots: std::sync::Arc<PartSlots>,
    /// The part being filled has its slot.
    holding: bool,
    buffer: Vec<u8>,
    base_part_size: usize,
    index: u32,
    stored_bytes: u64,
    failure: std::sync::Arc<std::sync::OnceLock<Failure>>,
}

impl PartWriter {
    fn new(
        parts: Sender<Piece>,
        slots: std::sync::Arc<PartSlots>,
        base_part_size: usize,
        failure: std::sync::Arc<std::sync::OnceLock<Failure>>,
    ) -> Self {
        Self {
            parts,
            slots,
            holding: false,
            buffer: Vec::with_capacity(base_part_size),
            base_part_size,
            index: 0,
            stored_bytes: 0,
            failure,
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
            let _ = self.failure.set(Failure::TooLarge);
            return Err(std::io::Error::other("too many parts"));
        }
        self.index += 1;
        let next_capacity = self.target();
        let part = std::mem::replace(&mut self.buffer, Vec::with_capacity(next_capacity));
        self.stored_bytes += part.len() as u64;
        // The slot goes with the part: the uploader frees it once the part is stored. (An
        // empty stream's one empty part never took one; the extra slot it frees is harmless.)
        self.holding = false;
        if self
            .parts
            .blocking_send(Piece::Data(Bytes::from(part)))
            .is_err()
        {
            let _ = self.failure.set(Failure::Stopped);
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
        if !self.holding {
            // A new part: wait until the uploader has room for one more in memory.
            let parts = &self.parts;
            if !self.slots.acquire(|| parts.is_closed()) {
                let _ = self.failure.set(Failure::Stopped);
                return Err(std::io::Error::new(
                    std::io::ErrorKind::BrokenPipe,
                    "uploader stopped",
                ));
            }
            self.holding = true;
        }
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
