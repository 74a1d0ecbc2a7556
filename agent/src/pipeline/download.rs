//! The way back: store → age (when sealed) → zstd (XXH64 of each frame) → size and SHA-256
//! check → a sink, on a blocking thread.
//!
//! The last chunk is held back until the whole object has been checked, so a consumer that
//! commits at end of input (`pg_restore --single-transaction`, `psql --single-transaction`)
//! never sees the end of a stream that failed its check, and a failed check can kill it before
//! it commits anything.

use std::io::{Read, Write};

use bytes::Bytes;
use futures::StreamExt;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use super::PipelineError;
use crate::store::{ObjectKey, Store, StoreError};

/// Decompressed bytes handed to the sink at a time.
const OUT_CHUNK: usize = 256 * 1024;
/// Compressed chunks fetched ahead of the decompressor. When full, the fetch waits.
const FETCH_QUEUE: usize = 8;

/// Where restored bytes go. It runs on a blocking thread, so plain `Write` is right.
pub type Sink = Box<dyn Write + Send>;

/// What a stored object must turn out to be: what its upload counted (a manifest keeps it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expected {
    pub key: ObjectKey,
    pub raw_bytes: u64,
    pub stored_bytes: u64,
    /// SHA-256 of the raw bytes, hex; `None`: the content carries its own checks.
    pub raw_sha256: Option<String>,
    /// Encrypted with age: only the store's identities open it.
    pub sealed: bool,
}

/// Downloads `object`, decompresses it into `sink` and checks size and SHA-256 against what
/// was expected. Returns the sink after a flush, so the caller decides how to close it.
pub async fn download(store: &Store, object: &Expected, sink: Sink) -> Result<Sink, PipelineError> {
    let (size, mut stream) = store.get_stream(&object.key).await?;
    if size != object.stored_bytes {
        return Err(PipelineError::Corrupt(format!(
            "{} is {size} bytes in the store but {} bytes in its manifest",
            object.key, object.stored_bytes
        )));
    }
    let (tx, rx) = mpsc::channel::<Result<Bytes, StoreError>>(FETCH_QUEUE);
    let expected = object.clone();
    let identities = if object.sealed {
        let what = format!("{} in {}", object.key, store.name());
        Some(store.keys().identities_for(&what)?.clone())
    } else {
        None
    };
    let decoder = tokio::task::spawn_blocking(move || decode(rx, sink, &expected, identities));
    let fetching = async {
        while let Some(chunk) = stream.next().await {
            if let Ok(bytes) = &chunk {
                // Not reading is what slows the sender: TCP's window does the rest.
                super::rate::download(bytes.len()).await;
            }
            let failed = chunk.is_err();
            if tx.send(chunk).await.is_err() || failed {
                break;
            }
        }
        drop(tx);
    };
    let ((), decoded) = tokio::join!(fetching, decoder);
    decoded.map_err(|e| PipelineError::Worker(e.to_string()))?
}

fn decode(
    chunks: mpsc::Receiver<Result<Bytes, StoreError>>,
    mut sink: Sink,
    expected: &Expected,
    identities: Option<crate::seal::Identities>,
) -> Result<Sink, PipelineError> {
    let mut reader = ChannelReader {
        chunks,
        current: Bytes::new(),
        error: None,
    };
    let what = expected.key.to_string();
    let compressed: Box<dyn Read + '_> = match &identities {
        None => Box::new(&mut reader),
        Some(identities) => match identities.open(&mut reader, &what) {
            Ok(clear) => Box::new(clear),
            Err(error) => {
                return Err(match reader.error.take() {
                    Some(store_error) => PipelineError::Store(store_error),
                    None => PipelineError::Seal(error),
                });
            }
        },
    };
    let mut decoder =
        zstd::stream::read::Decoder::new(compressed).map_err(PipelineError::Compress)?;
    let mut hasher = expected.raw_sha256.as_ref().map(|_| Sha256::new());
    let mut raw_bytes = 0u64;
    let mut held: Vec<u8> = Vec::with_capacity(OUT_CHUNK);
    let mut buffer = vec![0u8; OUT_CHUNK];
    loop {
        let read = match decoder.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => n,
            Err(error) => {
                drop(decoder);
                return Err(match reader.error.take() {
                    Some(store_error) => PipelineError::Store(store_error),
                    None if expected.sealed => PipelineError::Corrupt(format!(
                        "{} does not decrypt and decompress (damaged, truncated or tampered \
                         with): {error}",
                        expected.key
                    )),
                    None => PipelineError::Corrupt(format!(
                        "{} does not decompress: {error}",
                        expected.key
                    )),
                });
            }
        };
        if let Some(hasher) = &mut hasher {
            hasher.update(&buffer[..read]);
        }
        raw_bytes += read as u64;
        if !held.is_empty() {
            sink.write_all(&held).map_err(sink_error)?;
            held.clear();
        }
        held.extend_from_slice(&buffer[..read]);
    }
    if raw_bytes != expected.raw_bytes {
        return Err(PipelineError::Corrupt(format!(
            "{} fails its check: it decompresses to {raw_bytes} bytes, but its manifest says {}",
            expected.key, expected.raw_bytes
        )));
    }
    if let (Some(hasher), Some(want)) = (hasher, &expected.raw_sha256) {
        let sha256 = hex::encode(hasher.finalize());
        if &sha256 != want {
            return Err(PipelineError::Corrupt(format!(
                "{} fails its check: SHA-256 {sha256}, but its manifest says {want}",
                expected.key
            )));
        }
    }
    sink.write_all(&held).map_err(sink_error)?;
    sink.flush().map_err(sink_error)?;
    Ok(sink)
}

fn sink_error(error: std::io::Error) -> PipelineError {
    PipelineError::Sink(error)
}

/// A blocking `Read` over the fetched chunks. A store error is kept aside so that it is
/// reported as itself rather than as a decompression error.
struct ChannelReader {
    chunks: mpsc::Receiver<Result<Bytes, StoreError>>,
    current: Bytes,
    error: Option<StoreError>,
}

impl Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.current.is_empty() {
            match self.chunks.blocking_recv() {
                Some(Ok(chunk)) => self.current = chunk,
                Some(Err(error)) => {
                    self.error = Some(error);
                    return Err(std::io::Error::other("store read failed"));
                }
                None => return Ok(0),
            }
        }
        let n = out.len().min(self.current.len());
        out[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}
