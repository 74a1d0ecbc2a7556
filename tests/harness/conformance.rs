//! One suite that every store kind must pass (memory, local directory, S3, Azure): what the pipeline
//! and the catalog rely on.

use bytes::Bytes;
use futures::StreamExt;
use gc_backup::config::PipelineConfig;
use gc_backup::pipeline;
use gc_backup::store::{ObjectKey, Store, StoreError};
use gc_backup::testing::{SharedSink, noise};
use object_store::PutPayload;
use tokio_util::sync::CancellationToken;

pub async fn run_all(store: &Store) {
    create_only_put(store).await;
    missing_objects(store).await;
    multipart_through_the_pipeline(store).await;
    aborted_multipart_leaves_nothing(store).await;
    listing_follows_pagination(store).await;
}

async fn create_only_put(store: &Store) {
    let key = ObjectKey::from("conformance/create-only");
    store.delete(&key).await.unwrap();
    store
        .put_new(&key, Bytes::from_static(b"first"))
        .await
        .unwrap();
    let again = store.put_new(&key, Bytes::from_static(b"second")).await;
    assert!(
        matches!(again, Err(StoreError::AlreadyExists { .. })),
        "create-only put overwrote: {again:?}"
    );
    assert_eq!(
        store.get_bytes(&key).await.unwrap(),
        Bytes::from_static(b"first")
    );
    assert_eq!(store.head(&key).await.unwrap().size, 5);
    store.delete(&key).await.unwrap();
}

async fn missing_objects(store: &Store) {
    let key = ObjectKey::from("conformance/never-written");
    assert!(matches!(
        store.get_bytes(&key).await,
        Err(StoreError::NotFound { .. })
    ));
    assert!(matches!(
        store.head(&key).await,
        Err(StoreError::NotFound { .. })
    ));
    store
        .delete(&key)
        .await
        .expect("deleting a missing key is not an error");
}

async fn multipart_through_the_pipeline(store: &Store) {
    let key = ObjectKey::from("conformance/pipeline.zst");
    let data = noise(12 * 1024 * 1024 + 12345, 11);
    let settings = PipelineConfig {
        zstd_level: 1,
        zstd_workers: 1,
        part_size: 5 * 1024 * 1024,
        parallel_uploads: 2,
        ..PipelineConfig::default()
    };
    let summary = pipeline::upload(store, &key, &data[..], &settings, &CancellationToken::new())
        .await
        .unwrap();
    assert!(summary.parts >= 3, "{} parts", summary.parts);
    assert_eq!(store.head(&key).await.unwrap().size, summary.stored_bytes);
    let object = pipeline::Expected {
        key: key.clone(),
        raw_bytes: summary.raw_bytes,
        stored_bytes: summary.stored_bytes,
        raw_sha256: summary.raw_sha256.clone(),
        sealed: summary.sealed,
    };
    let sink = SharedSink::default();
    pipeline::download(store, &object, Box::new(sink.clone()))
        .await
        .unwrap();
    assert!(sink.contents() == data, "restored bytes differ");
    store.delete(&key).await.unwrap();
}

async fn aborted_multipart_leaves_nothing(store: &Store) {
    let key = ObjectKey::from("conformance/aborted");
    let mut upload = store.start_multipart(&key).await.unwrap();
    upload
        .put_part(PutPayload::from(noise(5 * 1024 * 1024, 3)))
        .await
        .unwrap();
    upload.abort().await.unwrap();
    assert!(matches!(
        store.head(&key).await,
        Err(StoreError::NotFound { .. })
    ));
}

async fn listing_follows_pagination(store: &Store) {
    // S3 pages at 1,000 keys.
    let count = 1_010;
    futures::stream::iter(0..count)
        .map(|i| async move {
            let key = ObjectKey::from(format!("conformance/many/{i:05}"));
            store.put(&key, PutPayload::from_static(b"x")).await
        })
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let listed = store
        .list(&ObjectKey::from("conformance/many"))
        .await
        .unwrap();
    assert_eq!(listed.len(), count);
    futures::stream::iter(listed)
        .map(|meta| async move { store.delete(&meta.location).await })
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await;
    assert!(
        store
            .list(&ObjectKey::from("conformance/many"))
            .await
            .unwrap()
            .is_empty()
    );
}
