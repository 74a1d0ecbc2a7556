//! The store conformance suite against every store kind: memory, a local directory, S3
//! (SeaweedFS on loopback) and Azure Blob Storage (Azurite).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use gc_backup::config::{StoreConfig, StoreLocation};
use gc_backup::store::{ObjectKey, OpenMode, Store};
use harness::{Azurite, Seaweed, StoreServer, conformance};

#[tokio::test]
async fn memory_store_conforms() {
    conformance::run_all(&Store::memory()).await;
}

#[tokio::test]
async fn local_directory_store_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let config = StoreConfig {
        location: StoreLocation::Local {
            root: dir.path().join("store"),
            embedded_default: false,
        },
        ca_file: None,
        max_retries: 1,
        retry_timeout: std::time::Duration::from_secs(5),
        connect_timeout: std::time::Duration::from_secs(5),
        object_lock: None,
    };
    conformance::run_all(&Store::open(&config, OpenMode::CreateRoot).unwrap()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn s3_store_conforms() {
    let weed = tokio::task::spawn_blocking(Seaweed::start).await.unwrap();
    // Through the agent's own S3 configuration path, not the harness's client.
    let env = weed.env("conformance-prefix");
    let lookup = |name: &str| env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    let config =
        gc_backup::config::Config::resolve(Default::default(), &lookup, &Default::default())
            .unwrap();
    let store = Store::open(&config.store, OpenMode::Existing).unwrap();
    conformance::run_all(&store).await;
    let keys = tokio::task::spawn_blocking(move || {
        let keys = weed.keys("");
        drop(weed);
        keys
    })
    .await
    .unwrap();
    assert!(keys.is_empty(), "the suite left objects behind: {keys:?}");
}

/// The store as the agent opens it from `server`'s environment for `prefix`.
fn agent_store(server: &dyn StoreServer, prefix: &str) -> Store {
    let env = server.env(prefix);
    let lookup = |name: &str| env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    let config =
        gc_backup::config::Config::resolve(Default::default(), &lookup, &Default::default())
            .unwrap();
    Store::open(&config.store, OpenMode::Existing).unwrap()
}

/// Every key a fresh view of the store lists under the suite's prefix: none may be left.
async fn assert_empty(store: &Store) {
    let left = store.list(&ObjectKey::from("")).await.unwrap();
    assert!(left.is_empty(), "the suite left objects behind: {left:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn azure_store_conforms() {
    let azurite = tokio::task::spawn_blocking(Azurite::start).await.unwrap();
    let store = agent_store(&azurite, "conformance-prefix");
    assert!(store.name().starts_with("az://"), "{}", store.name());
    conformance::run_all(&store).await;
    assert_empty(&agent_store(&azurite, "")).await;
    tokio::task::spawn_blocking(move || drop(azurite))
        .await
        .unwrap();
}
