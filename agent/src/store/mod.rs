//! Where backups live: an `object_store` (S3 and S3-compatible servers, Azure Blob Storage, a
//! local directory, or memory in tests) behind one small [`Store`] type.
//!
//! Every store error is turned into a [`StoreError`] that says what the operator can do: fix
//! credentials or the bucket name (a configuration problem), wait for the server (unreachable),
//! or look at the named object. Messages name the store without credentials.

pub mod lock;
pub mod multipart;
pub mod versions;

use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use object_store::aws::{AmazonS3Builder, Checksum};
use object_store::azure::MicrosoftAzureBuilder;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path as Key;
use object_store::prefix::PrefixStore;
use object_store::{
    BackoffConfig, ClientOptions, MultipartUpload, ObjectMeta, ObjectStore, ObjectStoreExt,
    PutMode, PutOptions, PutPayload, RetryConfig,
};

use crate::config::{StoreConfig, StoreLocation};

pub use object_store::path::Path as ObjectKey;

/// A store failure, sorted by what the caller can do about it.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{key} does not exist in {store}")]
    NotFound { store: String, key: String },
    #[error("{key} already exists in {store}")]
    AlreadyExists { store: String, key: String },
    #[error(
        "{store} refused access to {key} ({detail}). Check AWS_ACCESS_KEY_ID and \
         AWS_SECRET_ACCESS_KEY, and that the key may read and write this bucket."
    )]
    Denied {
        store: String,
        key: String,
        detail: String,
    },
    #[error("the bucket of {store} does not exist. Create it, or fix the store URL.")]
    NoBucket { store: String },
    #[error("{operation} {key} in {store} failed: {detail}")]
    Failed {
        store: String,
        operation: &'static str,
        key: String,
        detail: String,
    },
    #[error("cannot use {store}: {detail}")]
    Setup { store: String, detail: String },
    /// The store cannot be reached at all (a local store's directory is missing: a volume not
    /// mounted, a typo). Never "not found": `wal-fetch` would end recovery early.
    #[error("{store} cannot be reached: {detail}")]
    Unreachable { store: String, detail: String },
}

impl StoreError {
    /// Configuration problems (exit 2): wrong credentials, no such bucket, unusable location.
    pub fn is_config(&self) -> bool {
        matches!(
            self,
            Self::Denied { .. } | Self::NoBucket { .. } | Self::Setup { .. }
        )
    }
}

/// A handle on the configured store. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    inner: Arc<dyn ObjectStore>,
    /// The directory of a local store: object_store does not fsync, so [`Store::sync`] does.
    local_root: Option<std::path::PathBuf>,
    /// Shown in messages; never holds a credential.
    name: String,
    /// Whom this process encrypts to, and the keys it opens objects with.
    keys: crate::seal::Keys,
    /// Object lock on what this process writes (`store.object-lock`).
    lock: Option<lock::Locker>,
    /// `--as-of`: every read sees the bucket as it was then, and nothing is written.
    as_of: Option<Arc<versions::AsOf>>,
}

/// Whether opening a local store may create its directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenMode {
    /// The store must exist already: reading, restoring, archiving WAL. An absent directory is
    /// [`StoreError::Unreachable`], so that a mount that is missing is never taken for an
    /// empty archive.
    Existing,
    /// A backup may create the directory of a new local store.
    CreateRoot,
}

fn retry_config(config: &StoreConfig) -> RetryConfig {
    RetryConfig {
        backoff: BackoffConfig::default(),
        max_retries: config.max_retries,
        retry_timeout: config.retry_timeout,
    }
}

/// The HTTP client of a network store: timeouts, and the extra CA certificates of
/// `store.ca-file`. Plain http only when the store's own endpoint is an `http://` one (S3's
/// builder decides that itself).
fn client_options(
    config: &StoreConfig,
    endpoint: Option<&str>,
) -> Result<ClientOptions, StoreError> {
    let setup = |detail: String| StoreError::Setup {
        store: config.location.to_string(),
        detail,
    };
    let mut client = ClientOptions::new()
        .with_connect_timeout(config.connect_timeout)
        .with_timeout(std::time::Duration::from_secs(120))
        .with_allow_http(endpoint.is_some_and(|e| e.starts_with("http://")));
    if let Some(ca_file) = &config.ca_file {
        let pem = std::fs::read(ca_file)
            .map_err(|e| setup(format!("cannot read {}: {e}", ca_file.display())))?;
        let certificates = object_store::Certificate::from_pem_bundle(&pem).map_err(|e| {
            setup(format!(
                "{} holds no usable certificate: {e}",
                ca_file.display()
            ))
        })?;
        for certificate in certificates {
            client = client.with_root_certificate(certificate);
        }
    }
    Ok(client)
}

fn with_prefix(store: impl ObjectStore, prefix: &str) -> Arc<dyn ObjectStore> {
    if prefix.is_empty() {
        Arc::new(store)
    } else {
        Arc::new(PrefixStore::new(store, prefix))
    }
}

impl Store {
    /// Builds the client. Only a local store touches the disk here: it checks its directory,
    /// and creates it with [`OpenMode::CreateRoot`].
    pub fn open(config: &StoreConfig, mode: OpenMode) -> Result<Self, StoreError> {
        let name = config.location.to_string();
        let setup = |detail: String| StoreError::Setup {
            store: name.clone(),
            detail,
        };
        let mut local_root = None;
        let inner: Arc<dyn ObjectStore> = match &config.location {
            StoreLocation::Local { root, .. } => {
                if mode == OpenMode::CreateRoot {
                    std::fs::create_dir_all(root)
                        .map_err(|e| setup(format!("cannot create {}: {e}", root.display())))?;
                } else if !root.is_dir() {
                    return Err(missing_root(&name, root));
                }
                let local = LocalFileSystem::new_with_prefix(root)
                    .map_err(|e| setup(e.to_string()))?
                    .with_automatic_cleanup(true);
                local_root = Some(root.clone());
                Arc::new(local)
            }
            StoreLocation::Azure(az) => {
                let mut builder = MicrosoftAzureBuilder::from_env()
                    .with_container_name(&az.container)
                    .with_retry(retry_config(config))
                    .with_client_options(client_options(config, az.endpoint.as_deref())?);
                if let Some(account) = &az.account {
                    builder = builder.with_account(account);
                }
                if let Some(key) = &az.access_key {
                    builder = builder.with_access_key(key.expose());
                }
                if let Some(endpoint) = &az.endpoint {
                    builder = builder
                        .with_endpoint(endpoint.clone())
                        .with_allow_http(endpoint.starts_with("http://"));
                }
                let azure = builder.build().map_err(|e| setup(e.to_string()))?;
                with_prefix(azure, &az.prefix)
            }
            StoreLocation::S3(s3) => {
                let retry = retry_config(config);
                let client = client_options(config, None)?;
                // from_env picks up web-identity and container credentials (IRSA); every
                // setting we resolved ourselves is applied on top of it.
                let mut builder = AmazonS3Builder::from_env()
                    .with_bucket_name(&s3.bucket)
                    .with_region(&s3.region)
                    .with_virtual_hosted_style_request(s3.virtual_hosted_style)
                    .with_retry(retry)
                    .with_client_options(client);
                if let Some(endpoint) = &s3.endpoint {
                    builder = builder
                        .with_endpoint(endpoint)
                        .with_allow_http(endpoint.starts_with("http://"));
                }
                if let Some(key) = &s3.access_key_id {
                    builder = builder.with_access_key_id(key);
                }
                if let Some(secret) = &s3.secret_access_key {
                    builder = builder.with_secret_access_key(secret.expose());
                }
                if let Some(token) = &s3.session_token {
                    builder = builder.with_token(token.expose());
                }
                if s3.verify_uploads {
                    // CRC-64/NVME costs next to nothing (SIMD) where SHA-256 of every part was
                    // 6% of a base backup's CPU on our side and more on the server's.
                    builder = builder.with_checksum_algorithm(Checksum::CRC64NVME);
                }
                // Over TLS the signature need not cover a hash of the body as well: TLS already
                // protects it in transit, and the checksum above lets the server check it. Over
                // plain http the signed SHA-256 stays.
                let tls = s3
                    .endpoint
                    .as_deref()
                    .is_none_or(|endpoint| endpoint.starts_with("https://"));
                builder = builder.with_unsigned_payload(tls);
                let s3_store = builder.build().map_err(|e| setup(e.to_string()))?;
                with_prefix(s3_store, &s3.prefix)
            }
        };
        Ok(Self {
            inner,
            local_root,
            name,
            keys: crate::seal::Keys::default(),
            lock: None,
            as_of: None,
        })
    }

    /// An in-memory store, for unit tests and benchmarks.
    pub fn memory() -> Self {
        Self {
            inner: Arc::new(InMemory::new()),
            local_root: None,
            name: "memory://".to_string(),
            keys: crate::seal::Keys::default(),
            lock: None,
            as_of: None,
        }
    }

    /// Wraps any object store (tests use this to inject throttling or faults).
    pub fn from_object_store(inner: Arc<dyn ObjectStore>, name: impl Into<String>) -> Self {
        Self {
            inner,
            local_root: None,
            name: name.into(),
            keys: crate::seal::Keys::default(),
            lock: None,
            as_of: None,
        }
    }

    /// This store as a process with `keys` writes and reads it.
    pub fn with_keys(mut self, keys: crate::seal::Keys) -> Self {
        self.keys = keys;
        self
    }

    pub fn keys(&self) -> &crate::seal::Keys {
        &self.keys
    }

    /// This store as it was at the view's moment: read-only.
    pub fn with_as_of(mut self, view: Option<versions::AsOf>) -> Self {
        self.as_of = view.map(Arc::new);
        self
    }

    /// The moment this store is read as, when it is a `--as-of` view.
    pub fn as_of(&self) -> Option<chrono::DateTime<chrono::Utc>> {
        self.as_of.as_ref().map(|view| view.time())
    }

    /// Writes are refused in a `--as-of` view: it shows the past.
    fn writable(&self, key: &Key) -> Result<(), StoreError> {
        match &self.as_of {
            None => Ok(()),
            Some(view) => Err(StoreError::Setup {
                store: self.name.clone(),
                detail: format!(
                    "cannot write {key}: --as-of {} reads the store as it was",
                    view.time().to_rfc3339()
                ),
            }),
        }
    }

    /// How to read `key`: its version at the view's moment, or the current object.
    async fn read_options(&self, key: &Key) -> Result<object_store::GetOptions, StoreError> {
        let Some(view) = &self.as_of else {
            return Ok(object_store::GetOptions::default());
        };
        match view.resolve(key).await? {
            Some(meta) => Ok(object_store::GetOptions {
                version: meta.version,
                ..Default::default()
            }),
            None => Err(StoreError::NotFound {
                store: self.name.clone(),
                key: format!("{key} (as of {})", view.time().to_rfc3339()),
            }),
        }
    }

    /// This store with every write locked as `locker` says.
    pub fn with_lock(mut self, locker: Option<lock::Locker>) -> Self {
        self.lock = locker;
        self
    }

    /// Sets the retention of what was just written at `key` (`version`, from the write), when
    /// object lock is on. Part of the write: a write whose retention fails has failed.
    pub async fn retain(&self, key: &Key, version: Option<&str>) -> Result<(), StoreError> {
        match &self.lock {
            Some(locker) => locker.retain(&self.name, key, version).await,
            None => Ok(()),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Writes `bytes` at `key` only if nothing is there yet.
    pub async fn put_new(&self, key: &Key, bytes: Bytes) -> Result<(), StoreError> {
        self.writable(key)?;
        let options = PutOptions::from(PutMode::Create);
        let written = self
            .inner
            .put_opts(key, PutPayload::from(bytes), options)
            .await
            .map_err(|e| self.error("put", key, e))?;
        self.retain(key, written.version.as_deref()).await
    }

    pub async fn put(&self, key: &Key, payload: PutPayload) -> Result<(), StoreError> {
        self.writable(key)?;
        let written = self
            .inner
            .put(key, payload)
            .await
            .map_err(|e| self.error("put", key, e))?;
        self.retain(key, written.version.as_deref()).await
    }

    pub async fn start_multipart(&self, key: &Key) -> Result<Box<dyn MultipartUpload>, StoreError> {
        self.writable(key)?;
        self.inner
            .put_multipart(key)
            .await
            .map_err(|e| self.error("start multipart upload of", key, e))
    }

    /// Makes a stored object durable. S3 is durable when a PUT returns; a local directory
    /// needs the file and its directory fsynced.
    pub async fn sync(&self, key: &Key) -> Result<(), StoreError> {
        let Some(root) = &self.local_root else {
            return Ok(());
        };
        let path = root.join(key.as_ref());
        let result = tokio::task::spawn_blocking(move || {
            std::fs::File::open(&path)?.sync_all()?;
            match path.parent() {
                Some(dir) => std::fs::File::open(dir)?.sync_all(),
                None => Ok(()),
            }
        })
        .await
        .map_err(std::io::Error::other)
        .and_then(|r| r);
        result.map_err(|e| StoreError::Failed {
            store: self.name.clone(),
            operation: "fsync",
            key: key.to_string(),
            detail: e.to_string(),
        })
    }

    pub async fn get_range(
        &self,
        key: &Key,
        range: std::ops::Range<u64>,
    ) -> Result<Bytes, StoreError> {
        let options = object_store::GetOptions {
            range: Some(object_store::GetRange::Bounded(range)),
            ..self.read_options(key).await?
        };
        let result = self
            .inner
            .get_opts(key, options)
            .await
            .map_err(|e| self.error("get", key, e))?;
        result.bytes().await.map_err(|e| self.error("read", key, e))
    }

    pub async fn get_bytes(&self, key: &Key) -> Result<Bytes, StoreError> {
        let options = self.read_options(key).await?;
        let result = self
            .inner
            .get_opts(key, options)
            .await
            .map_err(|e| self.error("get", key, e))?;
        result.bytes().await.map_err(|e| self.error("read", key, e))
    }

    /// The object's size and a stream of its bytes.
    pub async fn get_stream(
        &self,
        key: &Key,
    ) -> Result<(u64, BoxStream<'static, Result<Bytes, StoreError>>), StoreError> {
        let options = self.read_options(key).await?;
        let result = self
            .inner
            .get_opts(key, options)
            .await
            .map_err(|e| self.error("get", key, e))?;
        let size = result.meta.size;
        let this = self.clone();
        let owned_key = key.clone();
        let stream = result
            .into_stream()
            .map(move |chunk| chunk.map_err(|e| this.error("read", &owned_key, e)))
            .boxed();
        Ok((size, stream))
    }

    pub async fn head(&self, key: &Key) -> Result<ObjectMeta, StoreError> {
        if let Some(view) = &self.as_of {
            return view
                .resolve(key)
                .await?
                .ok_or_else(|| StoreError::NotFound {
                    store: self.name.clone(),
                    key: format!("{key} (as of {})", view.time().to_rfc3339()),
                });
        }
        self.inner
            .head(key)
            .await
            .map_err(|e| self.error("head", key, e))
    }

    /// Every object under `prefix`, following pagination to the end.
    pub async fn list(&self, prefix: &Key) -> Result<Vec<ObjectMeta>, StoreError> {
        if let Some(view) = &self.as_of {
            return view.list(prefix).await;
        }
        let mut stream = self.inner.list(Some(prefix));
        let mut objects = Vec::new();
        while let Some(item) = stream.next().await {
            objects.push(item.map_err(|e| self.error("list", prefix, e))?);
        }
        Ok(objects)
    }

    /// Deletes `key`; a key that is already gone is not an error.
    pub async fn delete(&self, key: &Key) -> Result<(), StoreError> {
        self.writable(key)?;
        match self.inner.delete(key).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.error("delete", key, e)),
        }
    }

    /// Converts an `object_store` error into one that names this store and the key.
    pub fn error(
        &self,
        operation: &'static str,
        key: &Key,
        error: object_store::Error,
    ) -> StoreError {
        let store = self.name.clone();
        if let Some(root) = &self.local_root
            && !root.is_dir()
        {
            return missing_root(&store, root);
        }
        let key = key.to_string();
        let text = error.to_string();
        if text.contains("NoSuchBucket") {
            return StoreError::NoBucket { store };
        }
        // Some operations (LIST) report HTTP errors as generic ones: read S3's error code.
        const AUTH_CODES: [&str; 5] = [
            "SignatureDoesNotMatch",
            "InvalidAccessKeyId",
            "AccessDenied",
            "InvalidToken",
            "ExpiredToken",
        ];
        if let Some(code) = s3_error_code(&text).filter(|code| AUTH_CODES.contains(code)) {
            return StoreError::Denied {
                store,
                key,
                detail: code.to_string(),
            };
        }
        match error {
            object_store::Error::NotFound { .. } => StoreError::NotFound { store, key },
            object_store::Error::AlreadyExists { .. }
            | object_store::Error::Precondition { .. } => StoreError::AlreadyExists { store, key },
            object_store::Error::PermissionDenied { .. }
            | object_store::Error::Unauthenticated { .. } => StoreError::Denied {
                store,
                key,
                detail: s3_error_code(&text).unwrap_or("403").to_string(),
            },
            _ => StoreError::Failed {
                store,
                operation,
                key,
                detail: one_line(&text),
            },
        }
    }
}

fn missing_root(store: &str, root: &std::path::Path) -> StoreError {
    StoreError::Unreachable {
        store: store.to_string(),
        detail: format!(
            "the directory {} does not exist (a volume not mounted, or a typo in the store \
             URL?). Only a backup creates a new local store.",
            root.display()
        ),
    }
}

/// The `<Code>` of an S3 XML error body, if the message carries one.
fn s3_error_code(text: &str) -> Option<&str> {
    let start = text.find("<Code>")? + "<Code>".len();
    let end = text[start..].find("</Code>")? + start;
    Some(&text[start..end])
}

/// Error text from HTTP clients can span lines and carry whole XML bodies; keep one line.
fn one_line(text: &str) -> String {
    let first = text.lines().next().unwrap_or_default();
    let mut line = match s3_error_code(text) {
        Some(code) if !first.contains(code) => format!("{first} ({code})"),
        _ => first.to_string(),
    };
    if line.len() > 400 {
        let mut cut = 400;
        while !line.is_char_boundary(cut) {
            cut -= 1;
        }
        line.truncate(cut);
        line.push('…');
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local(root: &std::path::Path) -> StoreConfig {
        StoreConfig {
            location: StoreLocation::Local {
                root: root.to_path_buf(),
                embedded_default: false,
            },
            ca_file: None,
            max_retries: 0,
            retry_timeout: std::time::Duration::from_secs(1),
            connect_timeout: std::time::Duration::from_secs(1),
            object_lock: None,
        }
    }

    #[tokio::test]
    async fn an_absent_local_store_is_unreachable_and_only_a_backup_creates_it() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("not-mounted");
        let error = Store::open(&local(&root), OpenMode::Existing).unwrap_err();
        assert!(matches!(error, StoreError::Unreachable { .. }), "{error:?}");
        assert!(!root.exists(), "opening to read created the store");

        let store = Store::open(&local(&root), OpenMode::CreateRoot).unwrap();
        assert!(root.is_dir());
        let key = Key::from("wal/x");
        let missing = store.get_bytes(&key).await.unwrap_err();
        assert!(
            matches!(missing, StoreError::NotFound { .. }),
            "{missing:?}"
        );
        // The directory vanishes under a running process: still never "not found".
        std::fs::remove_dir(&root).unwrap();
        let gone = store.get_bytes(&key).await.unwrap_err();
        assert!(matches!(gone, StoreError::Unreachable { .. }), "{gone:?}");
        assert!(!root.exists());
    }

    #[test]
    fn s3_error_codes_are_pulled_out_of_xml_bodies() {
        let text = "Client error with status 403: <?xml version=\"1.0\"?><Error>\
                    <Code>SignatureDoesNotMatch</Code><Message>...</Message></Error>";
        assert_eq!(s3_error_code(text), Some("SignatureDoesNotMatch"));
        assert_eq!(s3_error_code("connection refused"), None);
    }

    #[tokio::test]
    async fn put_new_refuses_to_overwrite() {
        let store = Store::memory();
        let key = Key::from("manifests/x.json");
        store
            .put_new(&key, Bytes::from_static(b"one"))
            .await
            .unwrap();
        let second = store.put_new(&key, Bytes::from_static(b"two")).await;
        assert!(
            matches!(second, Err(StoreError::AlreadyExists { .. })),
            "{second:?}"
        );
        assert_eq!(
            store.get_bytes(&key).await.unwrap(),
            Bytes::from_static(b"one")
        );
    }
}
