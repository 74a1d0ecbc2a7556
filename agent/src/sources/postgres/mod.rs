//! PostgreSQL as a source: the server's facts (through tokio-postgres), and `pg_dump` as a
//! child process whose stdout is the stream and whose exit status decides the backup.

pub mod backup_mode;
pub mod recovery;
pub mod replication;
pub mod tls;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdout, Command};

use crate::config::PostgresConfig;

pub use super::SourceError;

/// What the server says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerFacts {
    pub database: String,
    pub server_version: String,
    pub server_version_num: u32,
}

impl ServerFacts {
    pub fn major(&self) -> u32 {
        self.server_version_num / 10_000
    }
}

/// Where libpq would connect, for messages: `host:port/db` without credentials.
pub fn describe(config: &PostgresConfig) -> String {
    format!(
        "{}:{}/{}",
        config.host.as_deref().unwrap_or("(default socket)"),
        config.port.unwrap_or(5432),
        effective_dbname(config)
    )
}

fn effective_user(config: &PostgresConfig) -> String {
    config
        .user
        .clone()
        .or_else(|| config.login_user.clone())
        .unwrap_or_else(|| "postgres".to_string())
}

fn effective_dbname(config: &PostgresConfig) -> String {
    config
        .dbname
        .clone()
        .unwrap_or_else(|| effective_user(config))
}

/// Opens a session for queries and for the base backup protocol, with TLS as libpq's
/// settings say (`config.tls`). The connection task ends when the client is dropped, which
/// also ends a backup left in progress.
pub async fn connect(config: &PostgresConfig) -> Result<tokio_postgres::Client, SourceError> {
    let mut pg = tokio_postgres::Config::new();
    pg.application_name("gc-backup")
        .connect_timeout(Duration::from_secs(10))
        .user(effective_user(config))
        .dbname(effective_dbname(config));
    let socket = match config.host.as_deref() {
        Some(host) if host.starts_with('/') => {
            pg.host_path(host);
            true
        }
        Some(host) => {
            pg.host(host);
            false
        }
        // libpq's default on Debian is the socket directory, then localhost.
        None if Path::new("/var/run/postgresql").is_dir() => {
            pg.host_path("/var/run/postgresql");
            true
        }
        None => {
            pg.host("localhost");
            false
        }
    };
    pg.port(config.port.unwrap_or(5432));
    if let Some(password) = &config.password {
        pg.password(password.expose());
    }
    // Unix sockets never use TLS (libpq ignores sslmode there too).
    let mode = if socket {
        tokio_postgres::config::SslMode::Disable
    } else {
        config.tls.protocol_mode()
    };
    pg.ssl_mode(mode);
    let connector = config.tls.connector().map_err(|detail| {
        SourceError::Config(format!(
            "cannot connect to PostgreSQL at {}: {detail}",
            describe(config)
        ))
    })?;
    let (client, connection) = pg
        .connect(connector)
        .await
        .map_err(|e| connect_error(config, &e))?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, "PostgreSQL connection ended");
        }
    });
    Ok(client)
}

/// A query error, naming the server.
pub fn query_error(
    config: &PostgresConfig,
    what: &str,
    error: &tokio_postgres::Error,
) -> SourceError {
    let detail = error
        .as_db_error()
        .map_or_else(|| error.to_string(), |db| db.message().to_string());
    SourceError::Failed(format!(
        "{what} on PostgreSQL at {} failed: {detail}",
        describe(config)
    ))
}

/// Connects once, checks that the database is there and reachable, and reads its version.
pub async fn server_facts(config: &PostgresConfig) -> Result<ServerFacts, SourceError> {
    let client = connect(config).await?;
    let row = client
        .query_one(
            "SELECT current_database(), current_setting('server_version'), \
             current_setting('server_version_num')::int4",
            &[],
        )
        .await
        .map_err(|e| query_error(config, "reading the server version", &e))?;
    let num: i32 = row.get(2);
    Ok(ServerFacts {
        database: row.get(0),
        server_version: row.get(1),
        server_version_num: u32::try_from(num).unwrap_or_default(),
    })
}

fn connect_error(config: &PostgresConfig, error: &tokio_postgres::Error) -> SourceError {
    let target = describe(config);
    if let Some(db) = error.as_db_error() {
        let message = format!(
            "PostgreSQL at {target} refused the connection: {}",
            db.message()
        );
        // 3D000 no such database, 28xxx authentication, 42704 no such role.
        let code = db.code().code();
        if code == "3D000" || code.starts_with("28") || code == "42704" {
            return SourceError::Config(message);
        }
        return SourceError::Failed(message);
    }
    if let Some(hint) = tls::explain(error, config.tls.mode) {
        return SourceError::Config(format!("cannot connect to PostgreSQL at {target}: {hint}"));
    }
    let detail =
        std::error::Error::source(error).map_or_else(|| error.to_string(), ToString::to_string);
    if mode_requires_tls(config) && detail.contains("does not support TLS") {
        return SourceError::Config(format!(
            "cannot connect to PostgreSQL at {target}: the server does not offer TLS and \
             sslmode={} requires it",
            config.tls.mode.as_str()
        ));
    }
    SourceError::Failed(format!(
        "cannot connect to PostgreSQL at {target}: {detail}"
    ))
}

/// The directory of client binaries for this server: the configured one, else Debian's
/// directory for the server's major version (pg_dump must not be older than the server), else
/// the newest installed, else whatever is on PATH.
pub fn client_bin_dir(config: &PostgresConfig, server_major: Option<u32>) -> Option<PathBuf> {
    if let Some(dir) = &config.bin_dir {
        return Some(dir.clone());
    }
    let installed = installed_majors();
    let pick = match server_major {
        Some(major) => installed
            .iter()
            .copied()
            .find(|m| *m == major)
            .or_else(|| installed.iter().copied().filter(|m| *m > major).max()),
        None => installed.iter().copied().max(),
    };
    pick.map(|m| PathBuf::from(format!("/usr/lib/postgresql/{m}/bin")))
}

fn installed_majors() -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/usr/lib/postgresql") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|m| Path::new(&format!("/usr/lib/postgresql/{m}/bin/pg_dump")).exists())
        .collect()
}

/// The path of a client binary in `dir`, or its bare name for a PATH lookup.
pub fn client_binary(dir: Option<&Path>, name: &str) -> PathBuf {
    match dir {
        Some(dir) => dir.join(name),
        None => PathBuf::from(name),
    }
}

fn mode_requires_tls(config: &PostgresConfig) -> bool {
    config.tls.protocol_mode() == tokio_postgres::config::SslMode::Require
}

/// Sets libpq's environment for a child from the resolved settings, TLS included, so that
/// pg_dump, pg_restore and psql connect as the agent does. The password goes through the
/// environment, never the command line.
pub fn apply_libpq_env(command: &mut Command, config: &PostgresConfig) {
    let path = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string());
    let settings = [
        ("PGHOST", config.host.clone()),
        ("PGPORT", config.port.map(|p| p.to_string())),
        ("PGUSER", config.user.clone()),
        ("PGDATABASE", config.dbname.clone()),
        (
            "PGPASSWORD",
            config.password.as_ref().map(|p| p.expose().to_string()),
        ),
        ("PGSSLMODE", Some(config.tls.mode.as_str().to_string())),
        ("PGSSLROOTCERT", path(&config.tls.root_cert)),
        ("PGSSLCERT", path(&config.tls.cert)),
        ("PGSSLKEY", path(&config.tls.key)),
    ];
    for (name, value) in settings {
        if let Some(value) = value {
            command.env(name, value);
        }
    }
}

/// `pg_dump --version`, e.g. "pg_dump (PostgreSQL) 15.18".
pub async fn tool_version(binary: &Path) -> Result<String, SourceError> {
    let output = Command::new(binary)
        .arg("--version")
        .output()
        .await
        .map_err(|e| SourceError::Config(format!("cannot run {}: {e}", binary.display())))?;
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
}

/// pg_dump's output formats that a backup can take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PgDumpFormat {
    /// The custom archive: pg_restore can pick tables from it.
    Custom,
    /// Plain SQL, for psql.
    Plain,
}

/// Starts pg_dump with its stdout as the backup stream. [`Supervised::finish`] decides
/// whether the stream was a whole dump.
pub fn spawn_pg_dump(
    binary: &Path,
    config: &PostgresConfig,
    format: PgDumpFormat,
    tables: &[String],
) -> Result<(Supervised, ChildStdout), SourceError> {
    let mut command = Command::new(binary);
    apply_libpq_env(&mut command, config);
    let format_arg = match format {
        PgDumpFormat::Custom => "--format=custom",
        PgDumpFormat::Plain => "--format=plain",
    };
    command.arg(format_arg).arg("--no-password");
    if format == PgDumpFormat::Custom {
        // Our zstd does the compressing, faster and smaller.
        command.arg("--compress=0");
    }
    for table in tables {
        command.arg(format!("--table={table}"));
    }
    command.stdin(Stdio::null()).stdout(Stdio::piped());
    let mut child = Supervised::spawn("pg_dump", command)?;
    let stdout = child
        .child
        .stdout
        .take()
        .ok_or_else(|| SourceError::Failed("pg_dump has no stdout".into()))?;
    widen_pipe(&stdout);
    Ok((child, stdout))
}

/// Linux pipes hold 64 KiB; pg_dump writes in small pieces and stalls whenever the pipe is
/// full. A 1 MiB pipe lets it run ahead while the compressor works. Best effort: the kernel
/// may refuse more than /proc/sys/fs/pipe-max-size for unprivileged users.
fn widen_pipe(pipe: &ChildStdout) {
    const PIPE_SIZE: i32 = 1 << 20;
    if let Err(error) = nix::fcntl::fcntl(pipe, nix::fcntl::FcntlArg::F_SETPIPE_SZ(PIPE_SIZE)) {
        tracing::debug!(%error, "could not widen pg_dump's stdout pipe");
    }
}

/// A client program (pg_dump, pg_restore, psql) whose exit status decides the job and whose
/// last stderr lines explain a failure.
#[derive(Debug)]
pub struct Supervised {
    name: &'static str,
    child: Child,
    stderr: Arc<Mutex<StderrTail>>,
    stderr_task: tokio::task::JoinHandle<()>,
}

impl Supervised {
    /// Spawns `command` with stderr captured; stdin and stdout are the caller's to set.
    pub fn spawn(name: &'static str, mut command: Command) -> Result<Self, SourceError> {
        command.stderr(Stdio::piped()).kill_on_drop(true);
        let mut child = command
            .spawn()
            .map_err(|e| SourceError::Config(format!("cannot start {name}: {e}")))?;
        let stderr_pipe = child
            .stderr
            .take()
            .ok_or_else(|| SourceError::Failed(format!("{name} has no stderr")))?;
        let stderr = Arc::new(Mutex::new(StderrTail::default()));
        let sink = stderr.clone();
        let stderr_task = tokio::spawn(async move {
            let mut lines = BufReader::new(stderr_pipe).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                tracing::debug!(program = name, "{line}");
                if let Ok(mut tail) = sink.lock() {
                    tail.push(line);
                }
            }
        });
        Ok(Self {
            name,
            child,
            stderr,
            stderr_task,
        })
    }

    pub fn stdin(&mut self) -> Option<tokio::process::ChildStdin> {
        self.child.stdin.take()
    }

    /// Waits for the program and checks its exit status.
    pub async fn finish(mut self) -> Result<(), SourceError> {
        let status = self
            .child
            .wait()
            .await
            .map_err(|e| SourceError::Failed(format!("waiting for {}: {e}", self.name)))?;
        // stderr closes when the program exits; its last lines explain a failure.
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut self.stderr_task).await;
        if status.success() {
            return Ok(());
        }
        let reason = self.reason();
        let message = if reason.is_empty() {
            format!("{} failed ({status})", self.name)
        } else {
            format!("{} failed ({status}): {reason}", self.name)
        };
        if reason.contains("does not exist") || reason.contains("no matching") {
            return Err(SourceError::Config(message));
        }
        Err(SourceError::Failed(message))
    }

    /// Stops the program after a failure elsewhere, and returns what it said last.
    pub async fn kill(mut self) -> String {
        let _ = self.child.kill().await;
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut self.stderr_task).await;
        self.reason()
    }

    fn reason(&self) -> String {
        self.stderr
            .lock()
            .map(|tail| tail.reason())
            .unwrap_or_default()
    }
}

/// The last lines of a child's stderr, bounded.
#[derive(Debug, Default)]
pub struct StderrTail {
    lines: std::collections::VecDeque<String>,
}

impl StderrTail {
    const KEEP: usize = 20;

    pub fn push(&mut self, line: String) {
        if self.lines.len() == Self::KEEP {
            self.lines.pop_front();
        }
        self.lines.push_back(line);
    }

    /// The line that explains a failure: the last one saying "error", else the last one.
    pub fn reason(&self) -> String {
        self.lines
            .iter()
            .rev()
            .find(|l| l.contains("error") || l.contains("FATAL"))
            .or_else(|| self.lines.back())
            .map(|l| l.trim().to_string())
            .unwrap_or_default()
    }
}

/// A libpq connection string (URL or `key=value` form) without its password.
pub fn redact_conninfo(conninfo: &str) -> String {
    if conninfo.contains("://") {
        let url = crate::config::redact_url(conninfo);
        return match url.split_once('?') {
            Some((base, query)) => {
                let params: Vec<String> = query
                    .split('&')
                    .map(|p| {
                        if p.to_ascii_lowercase().starts_with("password=") {
                            "password=***".to_string()
                        } else {
                            p.to_string()
                        }
                    })
                    .collect();
                format!("{base}?{}", params.join("&"))
            }
            None => url,
        };
    }
    let mut out = Vec::new();
    let mut in_quoted_password = false;
    for token in conninfo.split_whitespace() {
        if in_quoted_password {
            in_quoted_password = !token.ends_with('\'');
            continue;
        }
        let lower = token.to_ascii_lowercase();
        if let Some(value) = lower.strip_prefix("password") {
            let value = value.trim_start().trim_start_matches('=').trim_start();
            in_quoted_password =
                value.starts_with('\'') && (value.len() == 1 || !value.ends_with('\''));
            out.push("password=***".to_string());
            continue;
        }
        out.push(token.to_string());
    }
    out.join(" ")
}
