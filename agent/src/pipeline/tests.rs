//! The pipeline against in-memory stores: round trips, back-pressure, failures, corruption.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use object_store::ObjectStoreExt;
use object_store::memory::InMemory;
use object_store::throttle::{ThrottleConfig, ThrottledStore};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, ReadBuf};
use tokio_util::sync::CancellationToken;

use super::*;
use crate::testing::{SharedSink, noise};

fn settings(part_size: usize) -> PipelineConfig {
    PipelineConfig {
        zstd_level: 1,
        zstd_workers: 0,
        part_size,
        parallel_uploads: 2,
        frame_bytes: compress::FRAME_BYTES,
        memory_limit: crate::config::DEFAULT_MEMORY_LIMIT,
    }
}

/// A source of endless noise that counts what was read from it, and can fail on demand.
struct NoiseSource {
    read: Arc<AtomicU64>,
    fail_after: Option<u64>,
    seed: u64,
}

impl AsyncRead for NoiseSource {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let done = self.read.load(Ordering::SeqCst);
        if self.fail_after.is_some_and(|limit| done >= limit) {
            return Poll::Ready(Err(std::io::Error::other("source died")));
        }
        self.seed += 1;
        let chunk = noise(buf.remaining().min(64 * 1024), self.seed);
        buf.put_slice(&chunk);
        self.read.fetch_add(chunk.len() as u64, Ordering::SeqCst);
        Poll::Ready(Ok(()))
    }
}

/// A failed or cancelled upload commits no object.
async fn assert_nothing_stored(store: &Store) {
    let left = store.list(&ObjectKey::from("data")).await.unwrap();
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// XORs `mask` into the stored byte at `at(length)` of `key`.
async fn flip(inner: &InMemory, key: &ObjectKey, at: impl Fn(usize) -> usize, mask: u8) {
    let mut stored = inner
        .get(key)
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap()
        .to_vec();
    let index = at(stored.len());
    stored[index] ^= mask;
    inner.put(key, Bytes::from(stored).into()).await.unwrap();
}

fn object_of(key: &ObjectKey, summary: &UploadSummary) -> Expected {
    Expected {
        key: key.clone(),
        raw_bytes: summary.raw_bytes,
        stored_bytes: summary.stored_bytes,
        raw_sha256: summary.raw_sha256.clone(),
        sealed: summary.sealed,
    }
}

async fn round_trip(data: Vec<u8>, part_size: usize, workers: u32) -> UploadSummary {
    let store = Store::memory();
    let key = ObjectKey::from("data/test/object.zst");
    let mut settings = settings(part_size);
    settings.zstd_workers = workers;
    let summary = upload(
        &store,
        &key,
        &data[..],
        &settings,
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    assert_eq!(summary.raw_bytes, data.len() as u64);
    assert_eq!(summary.raw_sha256, Some(hex::encode(Sha256::digest(&data))));
    let stored = store.head(&key).await.unwrap();
    assert_eq!(stored.size, summary.stored_bytes);

    let sink = SharedSink::default();
    download(&store, &object_of(&key, &summary), Box::new(sink.clone()))
        .await
        .unwrap();
    assert!(sink.contents() == data, "restored bytes differ");
    summary
}

#[tokio::test]
async fn empty_small_and_multipart_streams_round_trip() {
    let empty = round_trip(Vec::new(), 64 * 1024, 0).await;
    assert_eq!(empty.parts, 1);
    let small = round_trip(b"hello, backup".repeat(100), 64 * 1024, 0).await;
    assert_eq!(small.parts, 1);
    assert!(small.stored_bytes < small.raw_bytes);
    let large = round_trip(noise(1_000_000, 7), 64 * 1024, 0).await;
    assert!(large.parts > 10, "{} parts", large.parts);
    let threaded = round_trip(noise(700_000, 9), 64 * 1024, 2).await;
    assert!(threaded.parts > 5);
}

#[tokio::test]
async fn a_stalled_store_stops_the_source_within_the_memory_bound() {
    let part_size = 64 * 1024;
    let throttle = ThrottleConfig {
        wait_put_per_call: Duration::from_secs(3600),
        ..ThrottleConfig::default()
    };
    let store = Store::from_object_store(
        Arc::new(ThrottledStore::new(InMemory::new(), throttle)),
        "stalled",
    );
    let read = Arc::new(AtomicU64::new(0));
    let source = NoiseSource {
        read: read.clone(),
        fail_after: None,
        seed: 1,
    };
    let key = ObjectKey::from("data/test/stalled.zst");
    let settings = settings(part_size);
    let cancel = CancellationToken::new();
    let run = upload(&store, &key, source, &settings, &cancel);
    let outcome = tokio::time::timeout(Duration::from_millis(800), run).await;
    assert!(
        outcome.is_err(),
        "the upload cannot finish against a stalled store"
    );
    // Parts uploading (or queued) and the one being filled: parallel + 1 slots, plus queued
    // raw chunks and the reader's chunk, plus the frame being gathered or cut into parts;
    // noise does not compress, so raw ≈ stored.
    assert!(compress::uses_frames(&settings));
    let bound = (settings.parallel_uploads + 1) * part_size
        + (CHUNK_QUEUE + 2) * CHUNK_SIZE
        + compress::FRAME_BYTES;
    let read = read.load(Ordering::SeqCst);
    assert!(read <= bound as u64, "read {read} bytes, bound {bound}");
    assert!(read > 0);
}

#[tokio::test]
async fn a_failing_source_aborts_and_leaves_nothing() {
    let store = Store::memory();
    let key = ObjectKey::from("data/test/failed.zst");
    let source = NoiseSource {
        read: Arc::new(AtomicU64::new(0)),
        fail_after: Some(600_000),
        seed: 3,
    };
    let error = upload(
        &store,
        &key,
        source,
        &settings(64 * 1024),
        &CancellationToken::new(),
    )
    .await
    .unwrap_err();
    assert!(matches!(error, PipelineError::Source(_)), "{error}");
    assert_nothing_stored(&store).await;
}

#[tokio::test]
async fn cancelling_aborts_the_upload() {
    let store = Store::memory();
    let key = ObjectKey::from("data/test/cancelled.zst");
    let source = NoiseSource {
        read: Arc::new(AtomicU64::new(0)),
        fail_after: None,
        seed: 4,
    };
    let cancel = CancellationToken::new();
    let trigger = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        trigger.cancel();
    });
    let error = upload(&store, &key, source, &settings(64 * 1024), &cancel)
        .await
        .unwrap_err();
    assert!(matches!(error, PipelineError::Cancelled { .. }), "{error}");
    assert_nothing_stored(&store).await;
}

#[tokio::test]
async fn a_flipped_byte_fails_the_restore_before_the_end_reaches_the_sink() {
    let inner = Arc::new(InMemory::new());
    let store = Store::from_object_store(inner.clone(), "memory");
    let key = ObjectKey::from("data/test/flipped.zst");
    let data = b"row 1\nrow 2\n".repeat(5000);
    let summary = upload(
        &store,
        &key,
        &data[..],
        &settings(64 * 1024),
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    let object = object_of(&key, &summary);

    // Corrupt a byte in the middle of the stored object.
    flip(&inner, &key, |len| len / 2, 0x40).await;
    let sink = SharedSink::default();
    let error = download(&store, &object, Box::new(sink.clone()))
        .await
        .err()
        .unwrap();
    assert!(matches!(error, PipelineError::Corrupt(_)), "{error}");
    assert!(sink.contents().len() < data.len());

    // A manifest that lies about the content is caught by the SHA-256 alone.
    let mut wrong = object.clone();
    wrong.raw_sha256 = Some(hex::encode(Sha256::digest(b"something else")));
    inner
        .put(
            &key,
            Bytes::from(zstd::encode_all(&data[..], 1).unwrap()).into(),
        )
        .await
        .unwrap();
    wrong.stored_bytes = inner.head(&key).await.unwrap().size;
    let sink = SharedSink::default();
    let error = download(&store, &wrong, Box::new(sink.clone()))
        .await
        .err()
        .unwrap();
    assert!(error.to_string().contains("fails its check"), "{error}");
    assert!(
        sink.contents().len() < data.len(),
        "the held-back tail was released"
    );
}

/// Base backups upload what their tar writer writes, without SHA-256: a flipped byte must
/// still fail the restore, through zstd's own content checksum.
#[tokio::test]
async fn an_unhashed_stream_round_trips_and_its_corruption_is_still_caught() {
    let inner = Arc::new(InMemory::new());
    let store = Store::from_object_store(inner.clone(), "memory");
    let key = ObjectKey::from("data/test/unhashed.zst");
    let data = noise(300_000, 11);
    let written = data.clone();
    let (summary, ()) = upload_written(
        &store,
        &key,
        &settings(64 * 1024),
        RawDigest::Skip,
        &CancellationToken::new(),
        move |out| std::io::Write::write_all(out, &written),
    )
    .await
    .unwrap();
    assert_eq!(summary.raw_sha256, None);
    let object = object_of(&key, &summary);
    let sink = SharedSink::default();
    download(&store, &object, Box::new(sink.clone()))
        .await
        .unwrap();
    assert!(sink.contents() == data, "restored bytes differ");

    // Flip one bit in the last block's data: only the frame's XXH64 can catch that.
    flip(&inner, &key, |len| len - 100, 0x01).await;
    let error = download(&store, &object, Box::new(SharedSink::default()))
        .await
        .err()
        .unwrap();
    assert!(matches!(error, PipelineError::Corrupt(_)), "{error}");
}

#[tokio::test]
async fn a_failing_producer_aborts_its_upload_and_is_the_error_reported() {
    let store = Store::memory();
    let key = ObjectKey::from("data/test/producer-failed.zst");
    let error = upload_written(
        &store,
        &key,
        &settings(64 * 1024),
        RawDigest::Skip,
        &CancellationToken::new(),
        |out| -> Result<(), &'static str> {
            // Several parts uploaded already, then the source fails.
            std::io::Write::write_all(out, &noise(600_000, 5)).map_err(|_| "write failed")?;
            Err("disk gone")
        },
    )
    .await
    .unwrap_err();
    assert!(
        matches!(error, WrittenError::Producer("disk gone")),
        "{error:?}"
    );
    assert_nothing_stored(&store).await;
}

#[tokio::test]
async fn a_cancelled_upload_stops_its_producer_and_leaves_nothing() {
    let store = Store::memory();
    let key = ObjectKey::from("data/test/producer-cancelled.zst");
    let cancel = CancellationToken::new();
    let later = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        later.cancel();
    });
    // The producer would write forever: only a failing write can stop it.
    let error = upload_written(
        &store,
        &key,
        &settings(64 * 1024),
        RawDigest::Skip,
        &cancel,
        |out| -> Result<(), std::io::Error> {
            let chunk = noise(64 * 1024, 6);
            loop {
                std::io::Write::write_all(out, &chunk)?;
            }
        },
    )
    .await
    .unwrap_err();
    assert!(
        matches!(
            error,
            WrittenError::Pipeline(PipelineError::Cancelled { .. })
        ),
        "{error:?}"
    );
    assert_nothing_stored(&store).await;
}

#[test]
fn parts_grow_only_past_two_thousand() {
    let base = 8 << 20;
    assert_eq!(part_size_for(0, base), base);
    assert_eq!(part_size_for(1_999, base), base);
    assert_eq!(part_size_for(2_000, base), 2 * base);
    assert_eq!(part_size_for(9_999, base), 16 * base);
    let total: usize = (0..MAX_PARTS).map(|i| part_size_for(i, base)).sum();
    assert_eq!(total, 62_000 * base);
}

/// A memory store whose writer encrypts to a fresh key, and one that reads with `secret`.
fn sealed_stores(secret_dir: &std::path::Path) -> (Store, Store, Arc<InMemory>) {
    let (secret, public) = crate::seal::tests::key_pair();
    let inner = Arc::new(InMemory::new());
    let writer =
        Store::from_object_store(inner.clone(), "memory://").with_keys(crate::seal::Keys {
            recipients: crate::seal::Recipients::parse(&[public]).unwrap(),
            identities: None,
        });
    let reader =
        Store::from_object_store(inner.clone(), "memory://").with_keys(crate::seal::Keys {
            recipients: None,
            identities: Some(crate::seal::tests::identities(secret_dir, &secret)),
        });
    (writer, reader, inner)
}

#[tokio::test]
async fn sealed_objects_round_trip_in_several_parts_and_fail_closed() {
    let dir = tempfile::tempdir().unwrap();
    let (writer, reader, inner) = sealed_stores(dir.path());
    let key = ObjectKey::from("data/test/sealed.zst");
    // Text that compresses, in several parts: every part boundary cuts the age stream.
    let data: Vec<u8> = b"GC-STORAGE-ROW owner=alice file=/photos/1.jpg\n"
        .iter()
        .copied()
        .cycle()
        .take(3 << 20)
        .chain(noise(12 << 20, 9))
        .collect();
    let summary = upload(
        &writer,
        &key,
        &data[..],
        &settings(5 * 1024 * 1024),
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    assert!(summary.sealed && summary.parts >= 2, "{summary:?}");
    let stored = inner.get(&key).await.unwrap().bytes().await.unwrap();
    assert!(crate::seal::is_sealed(&stored));
    assert!(memchr::memmem::find(&stored, b"GC-STORAGE-ROW").is_none());

    let expected = object_of(&key, &summary);
    let out = SharedSink::default();
    download(&reader, &expected, Box::new(out.clone()))
        .await
        .unwrap();
    assert!(
        out.contents() == data,
        "the sealed object did not come back as it was"
    );

    // Without identities: a configuration error before any byte reaches the sink.
    let error = download(&writer, &expected, Box::new(std::io::sink()))
        .await
        .err()
        .expect("must fail");
    assert!(
        matches!(&error, PipelineError::Seal(seal) if seal.is_config()),
        "{error}"
    );
    // A wrong identity, a flipped byte: corrupt, and the sink gets nothing.
    let (other, _) = crate::seal::tests::key_pair();
    let other_dir = tempfile::tempdir().unwrap();
    let wrong = reader.clone().with_keys(crate::seal::Keys {
        recipients: None,
        identities: Some(crate::seal::tests::identities(other_dir.path(), &other)),
    });
    let out = SharedSink::default();
    let error = download(&wrong, &expected, Box::new(out.clone()))
        .await
        .err()
        .expect("must fail");
    assert!(error.to_string().contains("wrong identity"), "{error}");
    assert!(out.contents().is_empty());
    flip(&inner, &key, |len| len / 2, 0x01).await;
    let out = SharedSink::default();
    let error = download(&reader, &expected, Box::new(out.clone()))
        .await
        .err()
        .expect("must fail");
    assert!(
        crate::error::meaning(&anyhow::Error::new(error)) == Some(crate::error::Meaning::Corrupt)
    );
    assert!(out.contents().len() < data.len());
}
