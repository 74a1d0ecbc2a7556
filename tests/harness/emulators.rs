//! Another cloud's storage on loopback: Azurite (Azure Blob Storage) on a free port in its own
//! temp dir with one container, killed on drop. `scripts/test` installs it under
//! `GC_BACKUP_TEST_EMULATORS_DIR`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{BUCKET, free_port, run_ok};

/// Azurite's well-known development account (documented by Microsoft; not a secret).
pub const AZURITE_ACCOUNT: &str = "devstoreaccount1";
pub const AZURITE_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// A store server a test can point the agent at: the environment of a process that stores
/// into `prefix` of it, and the same as a config file for programs that do not get ours
/// (archive_command, restore_command).
pub trait StoreServer {
    fn env(&self, prefix: &str) -> Vec<(String, String)>;
    fn config_file(&self, dir: &Path, prefix: &str) -> PathBuf;
}

fn emulators_dir() -> PathBuf {
    std::env::var_os("GC_BACKUP_TEST_EMULATORS_DIR").map_or_else(
        || PathBuf::from("/var/lib/gc-backup-test/emulators"),
        PathBuf::from,
    )
}

fn program(name: &str) -> PathBuf {
    let path = emulators_dir().join("bin").join(name);
    assert!(
        path.exists(),
        "{} is missing: run scripts/test (it installs Azurite from npm)",
        path.display()
    );
    path
}

/// One emulator process with its log, and the port it serves on.
struct Emulator {
    dir: tempfile::TempDir,
    child: Child,
    port: u16,
}

impl Emulator {
    /// Starts `command` (given its dir and port) until it listens.
    fn start(name: &str, command: impl Fn(&Path, u16) -> Command) -> Self {
        let dir = tempfile::Builder::new()
            .prefix(&format!("gcb-{name}-"))
            .tempdir()
            .expect("temp dir");
        let log_path = dir.path().join("server.log");
        let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
        for _attempt in 0..3 {
            let port = free_port();
            let log_file = std::fs::File::create(&log_path).expect("log");
            let mut child = command(dir.path(), port)
                .current_dir(dir.path())
                .stdin(Stdio::null())
                .stdout(log_file.try_clone().expect("log"))
                .stderr(log_file)
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Self { dir, child, port };
                }
                if child.try_wait().is_ok_and(|s| s.is_some()) {
                    break;
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    panic!("{name} did not listen in 60 s; log:\n{}", log());
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            // Someone took the port between choosing and binding: choose again.
        }
        panic!("{name} failed to start three times; log:\n{}", log());
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// One plain HTTP/1.1 request; the status code and the body.
    fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, String)],
        body: &[u8],
    ) -> (u16, String) {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        let mut request = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nConnection: close\r\n\
             Content-Length: {}\r\n",
            self.port,
            body.len()
        );
        for (name, value) in headers {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        request.push_str("\r\n");
        stream.write_all(request.as_bytes()).expect("send");
        stream.write_all(body).expect("send body");
        let mut response = Vec::new();
        stream.read_to_end(&mut response).expect("read");
        let text = String::from_utf8_lossy(&response).into_owned();
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .unwrap_or_else(|| panic!("not an HTTP response: {text}"));
        (status, text)
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Azurite's blob service with container [`BUCKET`] in the development account.
pub struct Azurite {
    server: Emulator,
}

impl Azurite {
    pub fn start() -> Self {
        let azurite = program("azurite-blob");
        let server = Emulator::start("azurite", |dir, port| {
            let mut command = Command::new(&azurite);
            command
                .args(["--blobHost", "127.0.0.1", "--blobPort", &port.to_string()])
                .arg("--location")
                .arg(dir)
                .args(["--silent", "--skipApiVersionCheck", "--disableTelemetry"]);
            command
        });
        let azurite = Self { server };
        azurite.create_container();
        azurite
    }

    /// The account's blob URL, path style (`http://127.0.0.1:PORT/devstoreaccount1`).
    pub fn account_url(&self) -> String {
        format!("{}/{AZURITE_ACCOUNT}", self.server.endpoint())
    }

    /// Every key under `prefix` of the container, sorted, read behind the agent's back.
    pub fn keys(&self, prefix: &str) -> Vec<String> {
        let azure = object_store::azure::MicrosoftAzureBuilder::new()
            .with_account(AZURITE_ACCOUNT)
            .with_access_key(AZURITE_KEY)
            .with_endpoint(self.account_url())
            .with_allow_http(true)
            .with_container_name(BUCKET)
            .build()
            .expect("azure client");
        super::sorted_keys(&azure, prefix)
    }

    /// Create Container, signed with the account key (Shared Key): object_store has no call for
    /// it, and Azurite creates nothing by itself.
    fn create_container(&self) {
        use base64::Engine;
        use hmac::{KeyInit, Mac};
        let engine = base64::engine::general_purpose::STANDARD;
        let date = chrono::Utc::now()
            .format("%a, %d %b %Y %H:%M:%S GMT")
            .to_string();
        let version = "2021-08-06";
        let path = format!("/{AZURITE_ACCOUNT}/{BUCKET}");
        // VERB, eleven empty standard headers, Content-Length "0" counts as empty since 2015.
        let to_sign = format!(
            "PUT\n\n\n\n\n\n\n\n\n\n\n\nx-ms-date:{date}\nx-ms-version:{version}\n\
             /{AZURITE_ACCOUNT}{path}\nrestype:container"
        );
        let key = engine.decode(AZURITE_KEY).expect("the key is base64");
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&key).expect("hmac key");
        mac.update(to_sign.as_bytes());
        let signature = engine.encode(mac.finalize().into_bytes());
        let (status, response) = self.server.request(
            "PUT",
            &format!("{path}?restype=container"),
            &[
                ("x-ms-date", date),
                ("x-ms-version", version.to_string()),
                (
                    "Authorization",
                    format!("SharedKey {AZURITE_ACCOUNT}:{signature}"),
                ),
            ],
            b"",
        );
        assert_eq!(status, 201, "Azurite refused Create Container: {response}");
    }
}

impl StoreServer for Azurite {
    fn env(&self, prefix: &str) -> Vec<(String, String)> {
        vec![
            ("GC_BACKUP_STORE".into(), format!("az://{BUCKET}/{prefix}")),
            ("AZURE_STORAGE_ACCOUNT_NAME".into(), AZURITE_ACCOUNT.into()),
            ("AZURE_STORAGE_ACCOUNT_KEY".into(), AZURITE_KEY.into()),
            ("AZURE_STORAGE_ENDPOINT".into(), self.account_url()),
        ]
    }

    fn config_file(&self, dir: &Path, prefix: &str) -> PathBuf {
        let path = dir.join(format!("gc-backup-{prefix}.toml"));
        std::fs::write(
            &path,
            format!(
                "[store]\nurl = \"azure://{BUCKET}/{prefix}\"\nendpoint = \"{}\"\n\
                 account = \"{AZURITE_ACCOUNT}\"\naccount-key = \"{AZURITE_KEY}\"\n\
                 max-retries = 2\nretry-timeout = \"3s\"\nconnect-timeout = \"1s\"\n",
                self.account_url()
            ),
        )
        .expect("write config");
        run_ok(Command::new("chmod").arg("0644").arg(&path));
        path
    }
}
