//! A throwaway `redis-server` on a free loopback port, with a password, in its own temp dir.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{free_port, private_ca, run_ok, shared_temp_dir, signed_certificate};

pub const PASSWORD: &str = "gcb-redis-secret";

pub struct Redis {
    dir: tempfile::TempDir,
    child: Option<Child>,
    pub port: u16,
    /// TLS only (`--tls-port`), requiring client certificates from [`Redis::ca_file`]'s CA.
    tls: bool,
}

fn binary(name: &str) -> PathBuf {
    let path = PathBuf::from("/usr/bin").join(name);
    assert!(
        path.exists(),
        "{name} is missing: apt-get install redis-server redis-tools (scripts/test does)"
    );
    path
}

impl Redis {
    /// Starts a server; `diskless` chooses how it sends snapshots to replicas (`$EOF:` framing
    /// or a length).
    pub fn start(diskless: bool) -> Self {
        Self::start_in(shared_temp_dir("redis"), None, diskless, false, false, &[])
    }

    /// A server with `appendonly yes`: its AOF set is in [`Redis::aof_dir`].
    pub fn start_aof() -> Self {
        Self::start_in(shared_temp_dir("redis-aof"), None, true, false, true, &[])
    }

    /// [`Redis::start_aof`] with `aof-timestamp-enabled yes`: `#TS:` annotations in the AOF.
    pub fn start_aof_timestamped() -> Self {
        Self::start_in(
            shared_temp_dir("redis-aof"),
            None,
            true,
            false,
            true,
            &["--aof-timestamp-enabled", "yes"],
        )
    }

    /// Starts a server with `appendonly yes` on `data_dir` (a restored AOF set).
    pub fn start_on_aof(data_dir: &Path) -> Self {
        Self::start_in(
            shared_temp_dir("redis-restored"),
            Some(data_dir),
            false,
            false,
            true,
            &[],
        )
    }

    /// Redis' `appendonlydir` (with [`Redis::start_aof`]).
    pub fn aof_dir(&self) -> PathBuf {
        self.dir.path().join("appendonlydir")
    }

    /// Rewrites the AOF (the dataset moves into a new base file) and waits until it is done.
    pub fn rewrite_aof(&self) {
        self.cli(&["BGREWRITEAOF"]);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let info = self.cli(&["INFO", "persistence"]);
            if info.contains("aof_rewrite_in_progress:0")
                && info.contains("aof_rewrite_scheduled:0")
            {
                return;
            }
            assert!(Instant::now() < deadline, "the AOF rewrite did not finish");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts a server on `dump.rdb` of `data_dir` (a restored snapshot).
    pub fn start_on(data_dir: &Path) -> Self {
        Self::start_in(
            shared_temp_dir("redis-restored"),
            Some(data_dir),
            false,
            false,
            false,
            &[],
        )
    }

    /// A server that speaks only TLS and requires a client certificate (Redis' default).
    pub fn start_tls() -> Self {
        let dir = shared_temp_dir("redis-tls");
        private_ca(dir.path());
        signed_certificate(dir.path(), "server", "subjectAltName=IP:127.0.0.1");
        signed_certificate(dir.path(), "client", "extendedKeyUsage=clientAuth");
        Self::start_in(dir, None, true, true, false, &[])
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

    fn start_in(
        dir: tempfile::TempDir,
        data_dir: Option<&Path>,
        diskless: bool,
        tls: bool,
        appendonly: bool,
        extra: &[&str],
    ) -> Self {
        let port = free_port();
        let data = data_dir.map_or_else(|| dir.path().to_path_buf(), Path::to_path_buf);
        let mut command = Command::new(binary("redis-server"));
        if tls {
            let file = |name: &str| dir.path().join(name);
            command
                .args(["--port", "0", "--tls-port", &port.to_string()])
                .arg("--tls-cert-file")
                .arg(file("server.pem"))
                .arg("--tls-key-file")
                .arg(file("server.key"))
                .arg("--tls-ca-cert-file")
                .arg(file("ca.pem"))
                .args(["--tls-auth-clients", "yes"]);
        } else {
            command.args(["--port", &port.to_string()]);
        }
        let child = command
            .args(["--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(&data)
            .args(["--dbfilename", "dump.rdb", "--requirepass", PASSWORD])
            .args([
                "--save",
                "",
                "--appendonly",
                if appendonly { "yes" } else { "no" },
                "--enable-debug-command",
                "yes",
            ])
            .args(["--repl-diskless-sync", if diskless { "yes" } else { "no" }])
            .args(["--repl-diskless-sync-delay", "0"])
            .args(extra)
            .arg("--logfile")
            .arg(dir.path().join("redis.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        let redis = Redis {
            dir,
            child: Some(child),
            port,
            tls,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while redis.try_cli(&["PING"]).as_deref() != Some("PONG") {
            assert!(
                Instant::now() < deadline,
                "redis-server did not start: {}",
                std::fs::read_to_string(redis.dir.path().join("redis.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        redis
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls { "rediss" } else { "redis" };
        format!("{scheme}://:{PASSWORD}@127.0.0.1:{}", self.port)
    }

    fn try_cli(&self, args: &[&str]) -> Option<String> {
        let mut command = Command::new(binary("redis-cli"));
        command
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "--no-auth-warning",
            ])
            .args(["-a", PASSWORD]);
        if self.tls {
            let (cert, key) = self.client_certificate();
            command
                .arg("--tls")
                .arg("--cacert")
                .arg(self.ca_file())
                .arg("--cert")
                .arg(cert)
                .arg("--key")
                .arg(key);
        }
        let output = command.args(args).output().ok()?;
        output
            .status
            .success()
            .then(|| String::from_utf8_lossy(&output.stdout).trim().to_string())
    }

    /// Runs one redis-cli command and returns its output.
    pub fn cli(&self, args: &[&str]) -> String {
        self.try_cli(args)
            .unwrap_or_else(|| panic!("redis-cli {args:?} failed"))
    }

    /// Keys of every type, binary values, expiries, and ~`bulk_keys` strings in bulk.
    pub fn populate(&self, bulk_keys: u32) {
        self.cli(&["DEBUG", "POPULATE", &bulk_keys.to_string(), "bulk", "512"]);
        self.cli(&["RPUSH", "list:1", "a", "b", "c", "ファイル"]);
        self.cli(&[
            "HSET", "file:42", "name", "a.txt", "size", "1024", "owner", "7",
        ]);
        self.cli(&["SADD", "set:tags", "x", "y", "z"]);
        self.cli(&["ZADD", "zset:scores", "1", "one", "2.5", "two"]);
        self.cli(&["XADD", "stream:events", "*", "kind", "upload", "id", "42"]);
        self.cli(&["SET", "session:1", "token", "EX", "3600"]);
        self.cli(&["SETRANGE", "binary", "3", "\u{1}\u{2}\r\n\u{ff}"]);
    }

    /// A plain-TCP connection that speaks RESP: for writers that must not pay a process per
    /// command.
    pub fn connect(&self) -> Connection {
        assert!(!self.tls, "connect() speaks plain TCP");
        let stream = std::net::TcpStream::connect(("127.0.0.1", self.port)).expect("connect");
        let mut connection = Connection {
            reader: std::io::BufReader::new(stream.try_clone().expect("clone socket")),
            writer: stream,
        };
        assert_eq!(connection.call(&["AUTH", PASSWORD]), "+OK");
        connection
    }

    /// `DEBUG DIGEST`: equal digests, equal datasets.
    pub fn digest(&self) -> String {
        self.cli(&["DEBUG", "DIGEST"])
    }
}

/// `redis-check-rdb FILE` succeeds.
pub fn check_rdb(file: &Path) {
    run_ok(Command::new(binary("redis-check-rdb")).arg(file));
}

impl Drop for Redis {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = &self.dir;
    }
}

pub struct Connection {
    reader: std::io::BufReader<std::net::TcpStream>,
    writer: std::net::TcpStream,
}

impl Connection {
    /// Sends a command and returns the reply's first line (`+OK`, `:42`, `*3`, …), reading and
    /// discarding the rest of the reply.
    pub fn call(&mut self, args: &[&str]) -> String {
        use std::io::Write;
        let mut request = format!("*{}\r\n", args.len());
        for arg in args {
            request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
        }
        self.writer.write_all(request.as_bytes()).expect("send");
        let first = self.line();
        self.skip_rest(&first);
        first
    }

    fn line(&mut self) -> String {
        use std::io::BufRead;
        let mut line = String::new();
        self.reader.read_line(&mut line).expect("reply");
        line.trim_end().to_string()
    }

    fn skip_rest(&mut self, first: &str) {
        use std::io::Read;
        let count = |s: &str| s[1..].parse::<i64>().unwrap_or(-1);
        match first.as_bytes().first() {
            Some(b'$') if count(first) >= 0 => {
                let mut payload = vec![0; count(first) as usize + 2];
                self.reader.read_exact(&mut payload).expect("bulk reply");
            }
            Some(b'*') => {
                for _ in 0..count(first).max(0) {
                    let next = self.line();
                    self.skip_rest(&next);
                }
            }
            _ => {}
        }
    }
}

/// `redis-check-aof MANIFEST` succeeds.
pub fn check_aof(manifest: &Path) {
    run_ok(Command::new(binary("redis-check-aof")).arg(manifest));
}
