//! A throwaway single-member etcd (Debian's `etcd-server`) on free loopback ports in its own
//! temp dir; optionally TLS-only with client certificates required, as Kubernetes runs it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use etcd_client::{Certificate, Client, ConnectOptions, GetOptions, Identity, TlsOptions};
use sha2::{Digest, Sha256};

use super::{free_ports, private_ca, run_ok, shared_temp_dir, signed_certificate};

pub struct Etcd {
    dir: tempfile::TempDir,
    child: Option<Child>,
    pub client_port: u16,
    tls: bool,
}

fn binary(name: &str) -> PathBuf {
    let path = PathBuf::from("/usr/bin").join(name);
    assert!(
        path.exists(),
        "{name} is missing: apt-get install etcd-server etcd-client (scripts/test does)"
    );
    path
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

impl Etcd {
    pub fn start() -> Self {
        Self::start_in(shared_temp_dir("etcd"), None, false)
    }

    /// TLS only, requiring a client certificate from [`Etcd::ca_file`]'s CA.
    pub fn start_tls() -> Self {
        let dir = shared_temp_dir("etcd-tls");
        private_ca(dir.path());
        signed_certificate(dir.path(), "server", "subjectAltName=IP:127.0.0.1");
        signed_certificate(dir.path(), "client", "extendedKeyUsage=clientAuth");
        Self::start_in(dir, None, true)
    }

    /// Restores `snapshot` with `etcdctl snapshot restore` (which checks its hash) and starts a
    /// member on it.
    pub fn start_restored(snapshot: &Path) -> Self {
        let dir = shared_temp_dir("etcd-restored");
        let data = dir.path().join("restored.etcd");
        let [_, peer] = free_ports(2)[..] else {
            unreachable!()
        };
        let peer_url = format!("http://127.0.0.1:{peer}");
        run_ok(
            Command::new(binary("etcdctl"))
                .env("ETCDCTL_API", "3")
                .args(["snapshot", "restore"])
                .arg(snapshot)
                .arg("--data-dir")
                .arg(&data)
                .args(["--name", "restored"])
                .arg(format!("--initial-cluster=restored={peer_url}"))
                .arg(format!("--initial-advertise-peer-urls={peer_url}")),
        );
        Self::start_in(dir, Some((data, peer)), false)
    }

    fn start_in(dir: tempfile::TempDir, restored: Option<(PathBuf, u16)>, tls: bool) -> Self {
        let ports = free_ports(2);
        let client_port = ports[0];
        let (data, peer_port, name) = match restored {
            Some((data, peer)) => (data, peer, "restored"),
            None => (dir.path().join("data.etcd"), ports[1], "gcb"),
        };
        let scheme = if tls { "https" } else { "http" };
        let client_url = format!("{scheme}://127.0.0.1:{client_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let mut command = Command::new(binary("etcd"));
        command
            .args(["--name", name])
            .arg("--data-dir")
            .arg(&data)
            .arg(format!("--listen-client-urls={client_url}"))
            .arg(format!("--advertise-client-urls={client_url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster={name}={peer_url}"))
            .args(["--log-level", "warn", "--logger", "zap"]);
        if tls {
            let file = |name: &str| dir.path().join(name);
            command
                .arg("--cert-file")
                .arg(file("server.pem"))
                .arg("--key-file")
                .arg(file("server.key"))
                .arg("--trusted-ca-file")
                .arg(file("ca.pem"))
                .arg("--client-cert-auth");
        }
        let log = std::fs::File::create(dir.path().join("etcd.log")).expect("etcd log");
        let child = command
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start etcd");
        let etcd = Etcd {
            dir,
            child: Some(child),
            client_port,
            tls,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while runtime().block_on(etcd.try_connect()).is_err() {
            assert!(
                Instant::now() < deadline,
                "etcd did not start: {}",
                std::fs::read_to_string(etcd.dir.path().join("etcd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        etcd
    }

    pub fn endpoint(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// The client certificate and key the server accepts.
    pub fn client_certificate(&self) -> (PathBuf, PathBuf) {
        (
            self.dir.path().join("client.pem"),
            self.dir.path().join("client.key"),
        )
    }

    async fn try_connect(&self) -> Result<Client, etcd_client::Error> {
        let mut options = ConnectOptions::new().with_connect_timeout(Duration::from_secs(2));
        if self.tls {
            let read = |path: PathBuf| std::fs::read(path).expect("read PEM");
            let (cert, key) = self.client_certificate();
            options = options.with_tls(
                TlsOptions::new()
                    .ca_certificate(Certificate::from_pem(read(self.ca_file())))
                    .identity(Identity::from_pem(read(cert), read(key))),
            );
        }
        let mut client = Client::connect([self.endpoint()], Some(options)).await?;
        client.status().await?;
        Ok(client)
    }

    /// `count` keys under `/registry/` with values of `value_len` bytes, plus a key that was
    /// overwritten and one that was deleted (so the history has revisions).
    pub fn populate(&self, count: usize, value_len: usize) {
        runtime().block_on(async {
            let mut client = self.try_connect().await.expect("connect");
            for n in 0..count {
                let value: String = (0..value_len)
                    .map(|i| char::from(b'a' + ((n * 7 + i * 13) % 26) as u8))
                    .collect();
                client
                    .put(format!("/registry/pods/default/pod-{n:06}"), value, None)
                    .await
                    .expect("put");
            }
            client
                .put("/registry/overwritten", "1", None)
                .await
                .expect("put");
            client
                .put("/registry/overwritten", "2", None)
                .await
                .expect("put");
            client
                .put("/registry/deleted", "x", None)
                .await
                .expect("put");
            client
                .delete("/registry/deleted", None)
                .await
                .expect("delete");
        });
    }

    pub fn put(&self, key: &str, value: &str) {
        runtime().block_on(async {
            let mut client = self.try_connect().await.expect("connect");
            client.put(key, value, None).await.expect("put");
        });
    }

    /// The value of `key`, if it has one.
    pub fn get(&self, key: &str) -> Option<String> {
        runtime().block_on(async {
            let mut client = self.try_connect().await.expect("connect");
            let response = client.get(key, None).await.expect("get");
            response
                .kvs()
                .first()
                .map(|kv| String::from_utf8_lossy(kv.value()).into_owned())
        })
    }

    /// SHA-256 over every key and value, in key order: equal fingerprints, equal datasets.
    pub fn fingerprint(&self) -> String {
        runtime().block_on(async {
            let mut client = self.try_connect().await.expect("connect");
            let response = client
                .get("", Some(GetOptions::new().with_all_keys()))
                .await
                .expect("get all");
            let mut hasher = Sha256::new();
            for kv in response.kvs() {
                hasher.update((kv.key().len() as u64).to_le_bytes());
                hasher.update(kv.key());
                hasher.update((kv.value().len() as u64).to_le_bytes());
                hasher.update(kv.value());
            }
            format!(
                "{}:{}",
                response.kvs().len(),
                hex::encode(hasher.finalize())
            )
        })
    }
}

/// `etcdctl snapshot status FILE -w json`, parsed.
pub fn snapshot_status(file: &Path) -> serde_json::Value {
    let output = run_ok(
        Command::new(binary("etcdctl"))
            .env("ETCDCTL_API", "3")
            .args(["snapshot", "status", "-w", "json"])
            .arg(file),
    );
    serde_json::from_slice(&output.stdout).expect("snapshot status JSON")
}

impl Drop for Etcd {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
