//! The uploader: one PUT for a stream that fits in one part, otherwise a multipart upload with
//! at most `parallel` parts in flight. Any failure or cancellation aborts the multipart upload,
//! so the store keeps no parts of it.

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use object_store::{MultipartUpload, PutPayload};
use tokio::sync::mpsc::Receiver;
use tokio_util::sync::CancellationToken;

use super::{PartSlots, Piece, PipelineError};
use crate::store::{ObjectKey, Store};

pub(super) struct Uploaded {
    pub stored_bytes: u64,
    pub parts: u32,
}

/// Each part's slot in `slots` is freed once that part is stored.
pub(super) async fn run(
    store: &Store,
    key: &ObjectKey,
    mut parts: Receiver<Piece>,
    slots: &PartSlots,
    parallel: usize,
    cancel: &CancellationToken,
) -> Result<Uploaded, PipelineError> {
    let cancelled = || PipelineError::Cancelled {
        key: key.to_string(),
    };
    let first = match next(&mut parts, cancel, key).await? {
        Some(part) => part,
        None => return Err(PipelineError::Stopped),
    };
    let Some(second) = next(&mut parts, cancel, key).await? else {
        // The whole stream fits in one part: a plain PUT is one request instead of three.
        let stored_bytes = first.len() as u64;
        let put = async {
            super::rate::upload(first.len()).await;
            store.put(key, PutPayload::from(first)).await
        };
        tokio::select! {
            put = put => put?,
            () = cancel.cancelled() => return Err(cancelled()),
        }
        slots.release();
        return Ok(Uploaded {
            stored_bytes,
            parts: 1,
        });
    };

    let mut upload = store.start_multipart(key).await?;
    let result = upload_parts(
        store,
        key,
        upload.as_mut(),
        [first, second],
        &mut parts,
        Room { slots, parallel },
        cancel,
    )
    .await;
    match result {
        Ok(uploaded) => Ok(uploaded),
        Err(error) => {
            // Close the queue first so the compressor stops instead of waiting on us.
            parts.close();
            if let Err(abort_error) = upload.abort().await {
                tracing::warn!(
                    key = %key,
                    error = %store.error("abort multipart upload of", key, abort_error),
                    "could not abort the multipart upload; `gc-backup retention` removes \
                     stale uploads"
                );
            }
            Err(error)
        }
    }
}

/// The next part, `None` at the end of the stream, or an error if the compressor stopped
/// without reaching the end or the run was cancelled.
async fn next(
    parts: &mut Receiver<Piece>,
    cancel: &CancellationToken,
    key: &ObjectKey,
) -> Result<Option<Bytes>, PipelineError> {
    tokio::select! {
        piece = parts.recv() => match piece {
            Some(Piece::Data(part)) => Ok(Some(part)),
            Some(Piece::End) => Ok(None),
            None => Err(PipelineError::Stopped),
        },
        () = cancel.cancelled() => Err(PipelineError::Cancelled {
            key: key.to_string(),
        }),
    }
}

/// How many parts may upload at once, and the slots their memory is counted in.
struct Room<'a> {
    slots: &'a PartSlots,
    parallel: usize,
}

async fn upload_parts(
    store: &Store,
    key: &ObjectKey,
    upload: &mut dyn MultipartUpload,
    first_two: [Bytes; 2],
    parts: &mut Receiver<Piece>,
    room: Room<'_>,
    cancel: &CancellationToken,
) -> Result<Uploaded, PipelineError> {
    let Room { slots, parallel } = room;
    let mut in_flight = FuturesUnordered::new();
    let mut stored_bytes = 0u64;
    let mut count = 0u32;
    let mut start = |part: Bytes, in_flight: &mut FuturesUnordered<_>| {
        count += 1;
        stored_bytes += part.len() as u64;
        let (number, bytes) = (count, part.len());
        // Numbered now, in order; sent once the rate limit lets it.
        let future = upload.put_part(PutPayload::from(part));
        in_flight.push(async move {
            super::rate::upload(bytes).await;
            future.await.map_err(|e| (number, e))
        });
    };
    for part in first_two {
        start(part, &mut in_flight);
    }
    let part_error = |(part, error): (u32, object_store::Error)| PipelineError::Part {
        part,
        key: key.to_string(),
        source: store.error("upload part of", key, error),
    };
    let mut input_open = true;
    while input_open || !in_flight.is_empty() {
        let room = in_flight.len() < parallel;
        tokio::select! {
            // Take a new part only while there is room: this is the back-pressure.
            piece = parts.recv(), if input_open && room => match piece {
                Some(Piece::Data(part)) => start(part, &mut in_flight),
                Some(Piece::End) => input_open = false,
                None => return Err(PipelineError::Stopped),
            },
            Some(done) = in_flight.next(), if !in_flight.is_empty() => {
                done.map_err(part_error)?;
                slots.release();
            }
            () = cancel.cancelled() => {
                return Err(PipelineError::Cancelled { key: key.to_string() });
            }
        }
    }
    let written = upload
        .complete()
        .await
        .map_err(|e| store.error("complete multipart upload of", key, e))?;
    store.retain(key, written.version.as_deref()).await?;
    Ok(Uploaded {
        stored_bytes,
        parts: count,
    })
}
