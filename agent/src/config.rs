//! Configuration, resolved once before any I/O: TOML file < environment < flags.
//!
//! [`FileConfig`] is the TOML shape (unknown keys are errors). [`Config::resolve`] merges it
//! with the environment (read through an injected lookup, so tests never touch the process
//! environment) and the command-line [`Overrides`], validates everything, and returns the
//! [`Config`] that the rest of the agent uses without re-checking. Secrets live in [`Secret`],
//! whose `Debug` and `Display` never show the value.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// A configuration error: always a usage problem (exit 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

fn err(message: impl Into<String>) -> ConfigError {
    ConfigError(message.into())
}

/// A password, key or token. Shown as `***` everywhere.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    /// The value, for the one place that must hand it to a client library or child process.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

// ---------------------------------------------------------------------------------------------
// The file

/// The TOML file. Every section and key is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct FileConfig {
    pub store: StoreSection,
    pub pipeline: PipelineSection,
    pub postgres: PostgresSection,
    pub redis: RedisSection,
    pub etcd: EtcdSection,
    pub schedule: ScheduleSection,
    pub retention: RetentionSection,
    pub metrics: MetricsSection,
}

/// Cron expressions for `gc-backup run`: 5 fields, or 6 with seconds first. A kind without
/// one is not scheduled.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct ScheduleSection {
    pub pg_dump: Option<String>,
    pub pg_base: Option<String>,
    pub redis: Option<String>,
    pub etcd: Option<String>,
    pub retention: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct RetentionSection {
    /// pg-dump and pg-base (a recovery window), and the WAL they need.
    pub pg: Option<String>,
    pub redis: Option<String>,
    pub etcd: Option<String>,
    /// How old data without a manifest must be before retention removes it.
    pub orphan_grace: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct MetricsSection {
    /// Where `gc-backup run` serves /metrics, /health and /health/ready.
    pub listen: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct StoreSection {
    /// `s3://bucket/prefix` or `file:///path`.
    pub url: Option<String>,
    /// S3 endpoint for MinIO, SeaweedFS or any S3-compatible server.
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<Secret>,
    pub session_token: Option<Secret>,
    /// Bucket in the host name (AWS style) instead of the path (MinIO style, the default).
    pub virtual_hosted_style: Option<bool>,
    /// Ask the server to verify a CRC-64/NVME of every uploaded part (default true).
    pub verify_uploads: Option<bool>,
    /// PEM file of extra CA certificates to trust for an https endpoint (a private CA).
    pub ca_file: Option<PathBuf>,
    pub max_retries: Option<usize>,
    /// Total time a request may spend in retries, e.g. "60s".
    pub retry_timeout: Option<String>,
    pub connect_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct PipelineSection {
    pub zstd_level: Option<i32>,
    /// zstd worker threads; 0 compresses on the pipeline's own thread. Default: 0 up to
    /// level 3 (one thread outpaces pg_dump there), else one per spare core, at most 4.
    pub zstd_workers: Option<u32>,
    /// Size of each uploaded part, e.g. "8MiB".
    pub part_size: Option<String>,
    /// Parts uploading at once; memory is about part size × (this + 2).
    pub parallel_uploads: Option<usize>,
    /// What the process may hold, e.g. "64MiB" (the default): streams, parts in flight and
    /// zstd frames are chosen to fit it at any core count.
    pub memory_limit: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct PostgresSection {
    pub host: Option<String>,
    pub port: Option<u16>,
    pub user: Option<String>,
    pub password: Option<Secret>,
    pub dbname: Option<String>,
    /// Directory holding pg_dump, pg_restore and psql; default: the one matching the server.
    pub bin_dir: Option<PathBuf>,
    /// Where PGDATA is (used by base backups; the sidecar shares the volume).
    pub pgdata: Option<PathBuf>,
    /// How long a base backup waits for its WAL to reach the store (default 5m).
    pub archive_timeout: Option<String>,
    /// libpq's TLS settings (PGSSLMODE, PGSSLROOTCERT, PGSSLCERT, PGSSLKEY win over these).
    pub sslmode: Option<String>,
    pub sslrootcert: Option<PathBuf>,
    pub sslcert: Option<PathBuf>,
    pub sslkey: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct RedisSection {
    /// `redis://[user[:password]@]host[:port]`.
    pub url: Option<String>,
    /// Used when the URL carries none.
    pub password: Option<Secret>,
    /// For `rediss://`: extra CA certificates (PEM), and a client certificate and key.
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// Redis 7's AOF directory (`dir`/`appenddirname`), shared with the sidecar.
    pub aof_dir: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct EtcdSection {
    /// `https://etcd-0:2379`, …: tried in order, the snapshot comes from the first that answers.
    pub endpoints: Vec<String>,
    pub user: Option<String>,
    pub password: Option<Secret>,
    /// For https:// endpoints: the cluster's CA, and the client certificate and key.
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

impl FileConfig {
    pub fn parse(text: &str, origin: &Path) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| {
            // toml's message spans lines; keep the first, which names the key.
            let first = e
                .message()
                .lines()
                .next()
                .unwrap_or("invalid TOML")
                .to_string();
            err(format!("config file {}: {first}", origin.display()))
        })
    }

    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| err(format!("cannot read config file {}: {e}", path.display())))?;
        Self::parse(&text, path)
    }
}

// ---------------------------------------------------------------------------------------------
// Flags

/// Command-line settings that override file and environment.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub config_file: Option<PathBuf>,
    pub store_url: Option<String>,
    pub zstd_level: Option<i32>,
    pub part_size: Option<String>,
    pub parallel_uploads: Option<usize>,
}

// ---------------------------------------------------------------------------------------------
// The resolved configuration

#[derive(Debug, Clone)]
pub struct Config {
    pub store: StoreConfig,
    pub pipeline: PipelineConfig,
    pub postgres: PostgresConfig,
    pub redis: RedisConfig,
    pub etcd: EtcdConfig,
    pub schedule: Schedules,
    pub retention: retention::Policy,
    pub metrics_listen: std::net::SocketAddr,
}

/// The daemon's schedules, parsed.
#[derive(Debug, Clone, Default)]
pub struct Schedules {
    pub pg_dump: Option<Schedule>,
    pub pg_base: Option<Schedule>,
    pub redis: Option<Schedule>,
    pub etcd: Option<Schedule>,
    pub retention: Option<Schedule>,
}

/// A cron expression, checked when the configuration is read.
#[derive(Debug, Clone)]
pub struct Schedule {
    pub expression: String,
    pub cron: croner::Cron,
}

impl Schedule {
    pub fn parse(key: &str, expression: &str) -> Result<Self, ConfigError> {
        let fields = expression.split_whitespace().count();
        if !(5..=6).contains(&fields) {
            return Err(err(format!(
                "schedule.{key} '{expression}' has {fields} fields; use 5 (minute hour day month \
                 weekday) or 6 (seconds first)"
            )));
        }
        let parser = croner::parser::CronParser::builder()
            .seconds(croner::parser::Seconds::Optional)
            .year(croner::parser::Year::Disallowed)
            .build();
        let cron = parser.parse(expression).map_err(|e| {
            err(format!(
                "schedule.{key} '{expression}' is not a cron expression: {e}"
            ))
        })?;
        Ok(Self {
            expression: expression.to_string(),
            cron,
        })
    }

    /// The first run strictly after `after`.
    pub fn next_after(
        &self,
        after: chrono::DateTime<chrono::Utc>,
    ) -> Option<chrono::DateTime<chrono::Utc>> {
        self.cron.find_next_occurrence(&after, false).ok()
    }
}

/// The runbook's retention: PostgreSQL 30 days, Redis 7, etcd 14.
pub const DEFAULT_RETENTION: retention::Policy = retention::Policy {
    pg: chrono::TimeDelta::days(30),
    redis: chrono::TimeDelta::days(7),
    etcd: chrono::TimeDelta::days(14),
    orphan_grace: chrono::TimeDelta::hours(24),
};

pub const DEFAULT_METRICS_LISTEN: &str = "0.0.0.0:9188";

/// Where etcd is and how to authenticate; environment names follow etcdctl's (`ETCDCTL_*`), so
/// the secrets an etcd backup CronJob already mounts work unchanged.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EtcdConfig {
    pub endpoints: Vec<String>,
    pub user: Option<String>,
    pub password: Option<Secret>,
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

/// Where Redis is: the URL as given (flags may still override it) and a password for URLs
/// without one.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RedisConfig {
    pub url: Option<String>,
    pub password: Option<Secret>,
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub aof_dir: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub location: StoreLocation,
    /// Extra CA certificates (PEM) for https endpoints.
    pub ca_file: Option<PathBuf>,
    pub max_retries: usize,
    pub retry_timeout: Duration,
    pub connect_timeout: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub enum StoreLocation {
    /// A directory. `embedded_default` says nobody configured it, so commands say where it is.
    Local {
        root: PathBuf,
        embedded_default: bool,
    },
    S3(S3Location),
}

#[derive(Debug, Clone, PartialEq)]
pub struct S3Location {
    pub bucket: String,
    pub prefix: String,
    pub endpoint: Option<String>,
    pub region: String,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<Secret>,
    pub session_token: Option<Secret>,
    pub virtual_hosted_style: bool,
    pub verify_uploads: bool,
}

impl StoreLocation {
    /// The S3 bucket and prefix, when the store is S3.
    pub fn s3(&self) -> Option<&S3Location> {
        match self {
            StoreLocation::S3(location) => Some(location),
            StoreLocation::Local { .. } => None,
        }
    }
}

impl fmt::Display for StoreLocation {
    /// The location without any credential: safe for logs and messages.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Local { root, .. } => write!(f, "file://{}", root.display()),
            Self::S3(s3) => {
                write!(f, "s3://{}", s3.bucket)?;
                if !s3.prefix.is_empty() {
                    write!(f, "/{}", s3.prefix)?;
                }
                if let Some(endpoint) = &s3.endpoint {
                    write!(f, " at {endpoint}")?;
                }
                Ok(())
            }
        }
    }
}

#[derive(Debug, Clone)]
pub struct PipelineConfig {
    pub zstd_level: i32,
    pub zstd_workers: u32,
    pub part_size: usize,
    pub parallel_uploads: usize,
    /// Raw bytes per zstd frame at the fast levels (see `pipeline::compress`).
    pub frame_bytes: usize,
    /// What this process may hold in buffers and itself: jobs fit their streams, parts in
    /// flight and frames to it (`pipeline::budget`).
    pub memory_limit: usize,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            zstd_level: DEFAULT_ZSTD_LEVEL,
            zstd_workers: default_zstd_workers(DEFAULT_ZSTD_LEVEL),
            part_size: 8 * MIB,
            parallel_uploads: 3,
            frame_bytes: crate::pipeline::FRAME_BYTES,
            memory_limit: DEFAULT_MEMORY_LIMIT,
        }
    }
}

/// What a sidecar container is usually given room for; see `pipeline::budget`.
pub const DEFAULT_MEMORY_LIMIT: usize = 64 * MIB;

/// Level 1 keeps up with pg_dump on one core and stores no more than `zstd -1`; higher levels
/// are a choice of CPU for space.
pub const DEFAULT_ZSTD_LEVEL: i32 = 1;

/// Up to level 3 one thread compresses faster than pg_dump produces (measured: 1.85 GB dump,
/// level 1, 7.6 s on one thread vs 8.7 s with a worker, which also stored 1% more), so extra
/// threads only take cores from PostgreSQL. Above that, one worker per core beyond the two
/// that PostgreSQL and pg_dump use, at most 4.
fn default_zstd_workers(level: i32) -> u32 {
    if level <= 3 {
        return 0;
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    u32::try_from(cores.saturating_sub(2).min(4)).unwrap_or(0)
}

/// How to reach PostgreSQL, as libpq would be told. Unset fields are left to libpq's defaults.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PostgresConfig {
    pub host: Option<String>,
    pub port: Option<u16>,
    pub user: Option<String>,
    pub password: Option<Secret>,
    pub dbname: Option<String>,
    pub bin_dir: Option<PathBuf>,
    pub pgdata: Option<PathBuf>,
    /// How long a base backup waits for its WAL to reach the store; `None`: the default.
    pub archive_timeout: Option<Duration>,
    /// TLS to the server, as libpq's sslmode and certificate settings say.
    pub tls: crate::sources::postgres_tls::PgTls,
}

pub const MIB: usize = 1024 * 1024;
/// S3's smallest allowed part (all but the last).
pub const S3_MIN_PART_SIZE: usize = 5 * MIB;

impl Config {
    /// Merges file < environment < flags and validates the result.
    pub fn resolve(
        file: FileConfig,
        env: &dyn Fn(&str) -> Option<String>,
        flags: &Overrides,
    ) -> Result<Self, ConfigError> {
        // Empty environment variables count as unset, as in libpq.
        let env = |name: &str| env(name).filter(|v| !v.is_empty());
        let store = resolve_store(&file.store, &env, flags)?;
        let pipeline = resolve_pipeline(&file.pipeline, &env, flags)?;
        if matches!(store.location, StoreLocation::S3(_)) && pipeline.part_size < S3_MIN_PART_SIZE {
            return Err(err(format!(
                "part-size {} is below S3's minimum of 5MiB",
                pipeline.part_size
            )));
        }
        let postgres = resolve_postgres(file.postgres, &env)?;
        let redis = RedisConfig {
            url: env("GC_BACKUP_REDIS_URL").or(file.redis.url),
            // redis-cli's variable, so an existing secret mount works unchanged.
            password: env("REDISCLI_AUTH")
                .map(Secret::new)
                .or(file.redis.password),
            ca_file: env("GC_BACKUP_REDIS_CA_FILE")
                .map(PathBuf::from)
                .or(file.redis.ca_file),
            cert_file: env("GC_BACKUP_REDIS_CERT_FILE")
                .map(PathBuf::from)
                .or(file.redis.cert_file),
            key_file: env("GC_BACKUP_REDIS_KEY_FILE")
                .map(PathBuf::from)
                .or(file.redis.key_file),
            aof_dir: env("GC_BACKUP_REDIS_AOF_DIR")
                .map(PathBuf::from)
                .or(file.redis.aof_dir),
        };
        let etcd = resolve_etcd(file.etcd, &env);
        let schedule = resolve_schedules(&file.schedule)?;
        let retention = resolve_retention(&file.retention)?;
        let listen = env("GC_BACKUP_METRICS_LISTEN")
            .or(file.metrics.listen)
            .unwrap_or_else(|| DEFAULT_METRICS_LISTEN.to_string());
        let metrics_listen = listen.parse().map_err(|_| {
            err(format!(
                "metrics.listen '{listen}' is not an address:port (e.g. 0.0.0.0:9188)"
            ))
        })?;
        Ok(Self {
            store,
            pipeline,
            postgres,
            redis,
            etcd,
            schedule,
            retention,
            metrics_listen,
        })
    }

    /// Reads the file named by `--config` or `GC_BACKUP_CONFIG` (if any) and the process
    /// environment.
    pub fn load(flags: &Overrides) -> Result<Self, ConfigError> {
        let env = |name: &str| std::env::var(name).ok();
        let path = flags.config_file.clone().or_else(|| {
            env("GC_BACKUP_CONFIG")
                .filter(|p| !p.is_empty())
                .map(PathBuf::from)
        });
        let file = match path {
            Some(path) => FileConfig::load(&path)?,
            None => FileConfig::default(),
        };
        Self::resolve(file, &env, flags)
    }
}

fn resolve_store(
    file: &StoreSection,
    env: &dyn Fn(&str) -> Option<String>,
    flags: &Overrides,
) -> Result<StoreConfig, ConfigError> {
    let url = flags
        .store_url
        .clone()
        .or_else(|| env("GC_BACKUP_STORE"))
        .or_else(|| file.url.clone());
    let location = match url {
        None => StoreLocation::Local {
            root: embedded_default_root(env),
            embedded_default: true,
        },
        Some(url) => parse_store_url(&url, file, env)?,
    };
    Ok(StoreConfig {
        location,
        ca_file: env("GC_BACKUP_CA_FILE")
            .map(PathBuf::from)
            .or_else(|| file.ca_file.clone()),
        max_retries: file.max_retries.unwrap_or(5),
        retry_timeout: parse_duration("store.retry-timeout", file.retry_timeout.as_deref())?
            .unwrap_or(Duration::from_secs(60)),
        connect_timeout: parse_duration("store.connect-timeout", file.connect_timeout.as_deref())?
            .unwrap_or(Duration::from_secs(5)),
    })
}

/// `$XDG_DATA_HOME/gc-backup`, else `~/.local/share/gc-backup`, else `/var/lib/gc-backup`.
fn embedded_default_root(env: &dyn Fn(&str) -> Option<String>) -> PathBuf {
    if let Some(data) = env("XDG_DATA_HOME") {
        return PathBuf::from(data).join("gc-backup");
    }
    match env("HOME") {
        Some(home) => PathBuf::from(home).join(".local/share/gc-backup"),
        None => PathBuf::from("/var/lib/gc-backup"),
    }
}

fn parse_store_url(
    url: &str,
    file: &StoreSection,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<StoreLocation, ConfigError> {
    let unsupported = || {
        err(format!(
            "store URL '{}' is not supported: use s3://BUCKET[/PREFIX] or file:///ABSOLUTE/PATH",
            redact_url(url)
        ))
    };
    if let Some(path) = url.strip_prefix("file://") {
        if !path.starts_with('/') {
            return Err(unsupported());
        }
        return Ok(StoreLocation::Local {
            root: PathBuf::from(path),
            embedded_default: false,
        });
    }
    if url.starts_with('/') {
        return Ok(StoreLocation::Local {
            root: PathBuf::from(url),
            embedded_default: false,
        });
    }
    let rest = url.strip_prefix("s3://").ok_or_else(unsupported)?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if !valid_bucket_name(bucket) {
        return Err(err(format!(
            "store URL '{}': '{bucket}' is not a valid bucket name (3 to 63 characters: \
             lower-case letters, digits, dots and hyphens)",
            redact_url(url)
        )));
    }
    let prefix = prefix.trim_matches('/').to_string();
    if prefix
        .split('/')
        .any(|segment| segment == "." || segment == "..")
    {
        return Err(err(format!(
            "store URL '{url}': the prefix may not contain . or .."
        )));
    }
    let endpoint = env("AWS_ENDPOINT_URL_S3")
        .or_else(|| env("AWS_ENDPOINT_URL"))
        .or_else(|| file.endpoint.clone());
    if let Some(endpoint) = &endpoint
        && !(endpoint.starts_with("http://") || endpoint.starts_with("https://"))
    {
        return Err(err(format!(
            "S3 endpoint '{}' must start with http:// or https://",
            redact_url(endpoint)
        )));
    }
    let region = env("AWS_REGION")
        .or_else(|| env("AWS_DEFAULT_REGION"))
        .or_else(|| file.region.clone())
        .unwrap_or_else(|| "us-east-1".to_string());
    Ok(StoreLocation::S3(S3Location {
        bucket: bucket.to_string(),
        prefix,
        endpoint,
        region,
        access_key_id: env("AWS_ACCESS_KEY_ID").or_else(|| file.access_key_id.clone()),
        secret_access_key: env("AWS_SECRET_ACCESS_KEY")
            .map(Secret::new)
            .or_else(|| file.secret_access_key.clone()),
        session_token: env("AWS_SESSION_TOKEN")
            .map(Secret::new)
            .or_else(|| file.session_token.clone()),
        virtual_hosted_style: file.virtual_hosted_style.unwrap_or(false),
        verify_uploads: file.verify_uploads.unwrap_or(true),
    }))
}

fn valid_bucket_name(name: &str) -> bool {
    (3..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name.as_bytes()[name.len() - 1].is_ascii_alphanumeric()
}

/// Drops any `user:password@` from a URL before it is shown.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            format!("{}://***@{}", &url[..scheme_end], &url[at + 1..])
        }
        _ => url.to_string(),
    }
}

/// A libpq connection string (URL or `key=value` form) without its password.
pub fn redact_conninfo(conninfo: &str) -> String {
    if conninfo.contains("://") {
        let url = redact_url(conninfo);
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

fn resolve_pipeline(
    file: &PipelineSection,
    env: &dyn Fn(&str) -> Option<String>,
    flags: &Overrides,
) -> Result<PipelineConfig, ConfigError> {
    let defaults = PipelineConfig::default();
    let env_level = env("GC_BACKUP_ZSTD_LEVEL")
        .map(|v| {
            v.parse::<i32>()
                .map_err(|_| err(format!("GC_BACKUP_ZSTD_LEVEL '{v}' is not a number")))
        })
        .transpose()?;
    let zstd_level = flags
        .zstd_level
        .or(env_level)
        .or(file.zstd_level)
        .unwrap_or(defaults.zstd_level);
    if !(1..=19).contains(&zstd_level) {
        return Err(err(format!("zstd level {zstd_level} is outside 1..=19")));
    }
    let part_size_text = flags
        .part_size
        .clone()
        .or_else(|| env("GC_BACKUP_PART_SIZE"))
        .or_else(|| file.part_size.clone());
    let part_size = match part_size_text {
        Some(text) => parse_size(&text)?,
        None => defaults.part_size,
    };
    if !(64 * 1024..=512 * MIB).contains(&part_size) {
        return Err(err(format!(
            "part-size {part_size} is outside 64KiB..=512MiB"
        )));
    }
    let env_parallel = env("GC_BACKUP_PARALLEL_UPLOADS")
        .map(|v| {
            v.parse::<usize>()
                .map_err(|_| err(format!("GC_BACKUP_PARALLEL_UPLOADS '{v}' is not a number")))
        })
        .transpose()?;
    let parallel_uploads = flags
        .parallel_uploads
        .or(env_parallel)
        .or(file.parallel_uploads)
        .unwrap_or(defaults.parallel_uploads);
    if !(1..=64).contains(&parallel_uploads) {
        return Err(err(format!(
            "parallel-uploads {parallel_uploads} is outside 1..=64"
        )));
    }
    let zstd_workers = file
        .zstd_workers
        .unwrap_or_else(|| default_zstd_workers(zstd_level));
    if zstd_workers > 64 {
        return Err(err(format!("zstd-workers {zstd_workers} is above 64")));
    }
    let memory_limit = match env("GC_BACKUP_MEMORY_LIMIT").or_else(|| file.memory_limit.clone()) {
        Some(text) => parse_size(&text)?,
        None => defaults.memory_limit,
    };
    let wanted = PipelineConfig {
        zstd_level,
        zstd_workers,
        part_size,
        parallel_uploads,
        frame_bytes: defaults.frame_bytes,
        memory_limit,
    };
    // The settings above are maxima: one pipeline is fitted to the limit here, once; base
    // backups and the sidecar fit their streams from these (see pipeline::budget).
    crate::pipeline::budget::single(&wanted, memory_limit).map_err(|e| err(e.to_string()))
}

fn resolve_postgres(
    file: PostgresSection,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<PostgresConfig, ConfigError> {
    // libpq's names first, then the runbook's, then the file.
    let pick = |libpq: &str, runbook: &str| env(libpq).or_else(|| env(runbook));
    let port = match pick("PGPORT", "DB_PORT") {
        Some(text) => Some(
            text.parse::<u16>()
                .map_err(|_| err(format!("PGPORT '{text}' is not a port number")))?,
        ),
        None => file.port,
    };
    Ok(PostgresConfig {
        host: pick("PGHOST", "DB_HOST").or(file.host),
        port,
        user: pick("PGUSER", "DB_USER").or(file.user),
        password: pick("PGPASSWORD", "DB_PASSWORD")
            .map(Secret::new)
            .or(file.password),
        dbname: pick("PGDATABASE", "DB_NAME").or(file.dbname),
        bin_dir: env("GC_BACKUP_PG_BIN_DIR")
            .map(PathBuf::from)
            .or(file.bin_dir),
        pgdata: env("PGDATA").map(PathBuf::from).or(file.pgdata),
        archive_timeout: parse_duration(
            "postgres.archive-timeout",
            env("GC_BACKUP_ARCHIVE_TIMEOUT")
                .or(file.archive_timeout)
                .as_deref(),
        )?,
        tls: resolve_pg_tls(
            file.sslmode,
            file.sslrootcert,
            file.sslcert,
            file.sslkey,
            env,
        )?,
    })
}

/// libpq's TLS settings: its environment, then the file, then libpq's own defaults (the
/// files in `~/.postgresql/`, where they exist).
fn resolve_pg_tls(
    mode: Option<String>,
    root_cert: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<crate::sources::postgres_tls::PgTls, ConfigError> {
    let mode = match env("PGSSLMODE").or(mode) {
        Some(text) => text
            .parse()
            .map_err(|e| err(format!("PGSSLMODE / postgres.sslmode: {e}")))?,
        None => Default::default(),
    };
    let home_default = |name: &str| {
        env("HOME")
            .map(|home| PathBuf::from(home).join(".postgresql").join(name))
            .filter(|path| path.is_file())
    };
    let pick = |var: &str, file: Option<PathBuf>, default: &str| {
        env(var)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .or(file)
            .or_else(|| home_default(default))
    };
    Ok(crate::sources::postgres_tls::PgTls {
        mode,
        root_cert: pick("PGSSLROOTCERT", root_cert, "root.crt"),
        cert: pick("PGSSLCERT", cert, "postgresql.crt"),
        key: pick("PGSSLKEY", key, "postgresql.key"),
    })
}

/// "8MiB", "512KiB", "1GiB", "8M", or a plain number of bytes.
pub fn parse_size(text: &str) -> Result<usize, ConfigError> {
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (digits, unit) = trimmed.split_at(split);
    let multiplier = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1024,
        "m" | "mb" | "mib" => MIB,
        "g" | "gb" | "gib" => 1024 * MIB,
        _ => {
            return Err(err(format!(
                "size '{text}' has an unknown unit (use KiB, MiB or GiB)"
            )));
        }
    };
    digits
        .parse::<usize>()
        .ok()
        .and_then(|n| n.checked_mul(multiplier))
        .ok_or_else(|| err(format!("size '{text}' is not a size")))
}

fn parse_duration(key: &str, text: Option<&str>) -> Result<Option<Duration>, ConfigError> {
    text.map(|t| {
        humantime::parse_duration(t)
            .map_err(|e| err(format!("{key} '{t}' is not a duration (e.g. \"30s\"): {e}")))
    })
    .transpose()
}

fn resolve_schedules(file: &ScheduleSection) -> Result<Schedules, ConfigError> {
    let parse = |key: &str, value: &Option<String>| {
        value
            .as_deref()
            .map(|expression| Schedule::parse(key, expression))
            .transpose()
    };
    Ok(Schedules {
        pg_dump: parse("pg-dump", &file.pg_dump)?,
        pg_base: parse("pg-base", &file.pg_base)?,
        redis: parse("redis", &file.redis)?,
        etcd: parse("etcd", &file.etcd)?,
        retention: parse("retention", &file.retention)?,
    })
}

fn resolve_retention(file: &RetentionSection) -> Result<retention::Policy, ConfigError> {
    let window = |key: &str, value: &Option<String>, default: chrono::TimeDelta| {
        let Some(duration) = parse_duration(&format!("retention.{key}"), value.as_deref())? else {
            return Ok(default);
        };
        let delta = chrono::TimeDelta::from_std(duration)
            .map_err(|_| err(format!("retention.{key} is too long")))?;
        if delta < chrono::TimeDelta::hours(1) {
            return Err(err(format!(
                "retention.{key} must be at least 1h (got {})",
                value.as_deref().unwrap_or_default()
            )));
        }
        Ok(delta)
    };
    Ok(retention::Policy {
        pg: window("pg", &file.pg, DEFAULT_RETENTION.pg)?,
        redis: window("redis", &file.redis, DEFAULT_RETENTION.redis)?,
        etcd: window("etcd", &file.etcd, DEFAULT_RETENTION.etcd)?,
        orphan_grace: window(
            "orphan-grace",
            &file.orphan_grace,
            DEFAULT_RETENTION.orphan_grace,
        )?,
    })
}

fn resolve_etcd(file: EtcdSection, env: &dyn Fn(&str) -> Option<String>) -> EtcdConfig {
    let endpoints = env("GC_BACKUP_ETCD_ENDPOINTS")
        .or_else(|| env("ETCDCTL_ENDPOINTS"))
        .map(|list| {
            list.split(',')
                .map(str::trim)
                .filter(|url| !url.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or(file.endpoints);
    // etcdctl's ETCDCTL_USER is `name` or `name:password`.
    let (user, password) = match env("ETCDCTL_USER") {
        Some(user) => match user.split_once(':') {
            Some((name, password)) => (Some(name.to_string()), Some(Secret::new(password))),
            None => (Some(user), env("ETCDCTL_PASSWORD").map(Secret::new)),
        },
        None => (
            file.user,
            env("ETCDCTL_PASSWORD").map(Secret::new).or(file.password),
        ),
    };
    EtcdConfig {
        endpoints,
        user,
        password,
        ca_file: env("ETCDCTL_CACERT").map(PathBuf::from).or(file.ca_file),
        cert_file: env("ETCDCTL_CERT").map(PathBuf::from).or(file.cert_file),
        key_file: env("ETCDCTL_KEY").map(PathBuf::from).or(file.key_file),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn resolve_with(
        toml: &str,
        env: &[(&str, &str)],
        flags: Overrides,
    ) -> Result<Config, ConfigError> {
        let file = FileConfig::parse(toml, Path::new("test.toml"))?;
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::resolve(file, &|name| env.get(name).cloned(), &flags)
    }

    #[test]
    fn flags_beat_environment_which_beats_the_file() {
        let toml = "[store]\nurl = \"s3://from-file/p\"\n[pipeline]\nzstd-level = 5\n";
        let only_file = resolve_with(toml, &[], Overrides::default()).unwrap();
        assert!(
            matches!(&only_file.store.location, StoreLocation::S3(s) if s.bucket == "from-file")
        );
        assert_eq!(only_file.pipeline.zstd_level, 5);

        let env = [
            ("GC_BACKUP_STORE", "s3://from-env"),
            ("GC_BACKUP_ZSTD_LEVEL", "7"),
        ];
        let with_env = resolve_with(toml, &env, Overrides::default()).unwrap();
        assert!(matches!(&with_env.store.location, StoreLocation::S3(s) if s.bucket == "from-env"));
        assert_eq!(with_env.pipeline.zstd_level, 7);

        let flags = Overrides {
            store_url: Some("file:///srv/backups".into()),
            zstd_level: Some(1),
            ..Overrides::default()
        };
        let with_flags = resolve_with(toml, &env, flags).unwrap();
        assert_eq!(
            with_flags.store.location,
            StoreLocation::Local {
                root: PathBuf::from("/srv/backups"),
                embedded_default: false
            }
        );
        assert_eq!(with_flags.pipeline.zstd_level, 1);
    }

    #[test]
    fn postgres_tls_follows_libpq_s_environment_over_the_file() {
        use crate::sources::postgres_tls::SslMode;
        let toml = "[postgres]\nsslmode = \"verify-ca\"\nsslrootcert = \"/etc/ca.pem\"\n";
        let from_file = resolve_with(toml, &[], Overrides::default()).unwrap();
        assert_eq!(from_file.postgres.tls.mode, SslMode::VerifyCa);
        assert_eq!(
            from_file.postgres.tls.root_cert.as_deref(),
            Some(Path::new("/etc/ca.pem"))
        );
        let env = [
            ("PGSSLMODE", "verify-full"),
            ("PGSSLROOTCERT", "/run/ca.pem"),
            ("PGSSLCERT", "/run/client.pem"),
            ("PGSSLKEY", "/run/client.key"),
        ];
        let from_env = resolve_with(toml, &env, Overrides::default()).unwrap();
        assert_eq!(from_env.postgres.tls.mode, SslMode::VerifyFull);
        assert_eq!(
            from_env.postgres.tls.root_cert.as_deref(),
            Some(Path::new("/run/ca.pem"))
        );
        assert_eq!(
            from_env.postgres.tls.key.as_deref(),
            Some(Path::new("/run/client.key"))
        );
        // libpq's default when nothing is said.
        let nothing = resolve_with("", &[("HOME", "/nonexistent")], Overrides::default()).unwrap();
        assert_eq!(nothing.postgres.tls.mode, SslMode::Prefer);
        let error = resolve_with("", &[("PGSSLMODE", "on")], Overrides::default()).unwrap_err();
        assert!(error.0.contains("PGSSLMODE"), "{}", error.0);
    }

    #[test]
    fn etcd_settings_come_from_etcdctl_names_over_the_file() {
        let toml = r#"
            [etcd]
            endpoints = ["https://etcd-0:2379", "https://etcd-1:2379"]
            user = "backup"
            password = "from-file"
            ca-file = "/etc/etcd/ca.crt"
        "#;
        let file_only = resolve_with(toml, &[], Overrides::default()).unwrap().etcd;
        assert_eq!(file_only.endpoints.len(), 2);
        assert_eq!(file_only.user.as_deref(), Some("backup"));
        assert_eq!(
            file_only.password.as_ref().map(Secret::expose),
            Some("from-file")
        );

        let env = [
            ("ETCDCTL_ENDPOINTS", "https://a:2379, https://b:2379"),
            ("ETCDCTL_USER", "root:pw"),
            ("ETCDCTL_CACERT", "/ca.pem"),
            ("ETCDCTL_CERT", "/c.pem"),
            ("ETCDCTL_KEY", "/c.key"),
        ];
        let etcd = resolve_with(toml, &env, Overrides::default()).unwrap().etcd;
        assert_eq!(etcd.endpoints, ["https://a:2379", "https://b:2379"]);
        assert_eq!(etcd.user.as_deref(), Some("root"));
        assert_eq!(etcd.password.as_ref().map(Secret::expose), Some("pw"));
        assert_eq!(etcd.ca_file, Some(PathBuf::from("/ca.pem")));
        assert_eq!(etcd.key_file, Some(PathBuf::from("/c.key")));

        let ours = [
            ("GC_BACKUP_ETCD_ENDPOINTS", "http://c:2379"),
            ("ETCDCTL_ENDPOINTS", "http://d:2379"),
        ];
        let etcd = resolve_with("", &ours, Overrides::default()).unwrap().etcd;
        assert_eq!(etcd.endpoints, ["http://c:2379"]);
    }

    #[test]
    fn the_daemon_configuration_of_the_runbook_parses() {
        let toml = r#"
            [store]
            url = "s3://gc-storage-backup/prod"
            [postgres]
            pgdata = "/var/lib/postgresql/data"
            [redis]
            url = "redis://redis:6379"
            aof-dir = "/data/appendonlydir"
            [etcd]
            endpoints = ["https://etcd:2379"]
            [schedule]
            pg-dump = "0 2 * * *"
            pg-base = "0 3 * * *"
            redis = "*/5 * * * *"
            etcd = "0 2 * * *"
            retention = "0 * * * *"
            [retention]
            pg = "30d"
            redis = "7d"
            etcd = "14d"
            [metrics]
            listen = "0.0.0.0:9188"
        "#;
        let config = resolve_with(toml, &[], Overrides::default()).unwrap();
        let redis = config.schedule.redis.as_ref().unwrap();
        let at: chrono::DateTime<chrono::Utc> = "2026-01-15T02:03:10Z".parse().unwrap();
        assert_eq!(
            redis.next_after(at).unwrap().to_rfc3339(),
            "2026-01-15T02:05:00+00:00"
        );
        assert_eq!(config.retention, DEFAULT_RETENTION);
        assert_eq!(config.metrics_listen.port(), 9188);

        // Six fields: seconds first.
        let fast = resolve_with(
            "[schedule]\nredis = \"*/2 * * * * *\"\n",
            &[],
            Overrides::default(),
        )
        .unwrap();
        let next = fast.schedule.redis.unwrap().next_after(at).unwrap();
        assert_eq!(next.to_rfc3339(), "2026-01-15T02:03:12+00:00");
    }

    /// The `gc-backup.toml` block of a ConfigMap manifest, as Kubernetes mounts it.
    fn configmap_toml(yaml: &str) -> String {
        let (_, block) = yaml.split_once("gc-backup.toml: |\n").unwrap();
        block
            .lines()
            .take_while(|line| line.is_empty() || line.starts_with("    "))
            .map(|line| format!("{}\n", line.strip_prefix("    ").unwrap_or(line)))
            .collect()
    }

    #[test]
    fn the_kubernetes_configmaps_parse() {
        let postgres_pod = configmap_toml(include_str!("../../docker/k8s/configmap.yaml"));
        let config = resolve_with(&postgres_pod, &[], Overrides::default()).unwrap();
        assert!(config.schedule.pg_dump.is_some() && config.schedule.retention.is_some());
        assert_eq!(config.retention, DEFAULT_RETENTION);
        assert_eq!(config.metrics_listen.port(), 9188);
        assert!(config.postgres.pgdata.is_some());
        assert_eq!(config.etcd.endpoints.len(), 1);

        let redis_pod = configmap_toml(include_str!("../../docker/k8s/redis-deployment.yaml"));
        let config = resolve_with(&redis_pod, &[], Overrides::default()).unwrap();
        assert!(config.schedule.redis.is_some() && config.schedule.retention.is_none());
        assert_eq!(
            config.redis.aof_dir.as_deref(),
            Some(Path::new("/data/appendonlydir"))
        );
    }

    #[test]
    fn bad_schedules_and_windows_are_refused_with_the_key() {
        let bad = |toml: &str, needle: &str| {
            let error = resolve_with(toml, &[], Overrides::default())
                .unwrap_err()
                .to_string();
            assert!(error.contains(needle), "{error}");
        };
        bad("[schedule]\nredis = \"*/5 * *\"\n", "schedule.redis");
        bad("[schedule]\netcd = \"61 * * * *\"\n", "schedule.etcd");
        bad("[schedule]\netcd = \"0 0 1 1 * 2030\"\n", "schedule.etcd");
        bad("[retention]\npg = \"soon\"\n", "retention.pg");
        bad("[retention]\nredis = \"5m\"\n", "at least 1h");
        bad("[metrics]\nlisten = \"9188\"\n", "metrics.listen");
    }

    #[test]
    fn unknown_keys_are_errors_that_name_the_key() {
        let error = resolve_with("[store]\nurll = \"x\"\n", &[], Overrides::default()).unwrap_err();
        assert!(error.0.contains("urll"), "{error}");
        let error = resolve_with("[stor]\n", &[], Overrides::default()).unwrap_err();
        assert!(error.0.contains("stor"), "{error}");
    }

    #[test]
    fn no_store_configured_means_the_embedded_local_directory() {
        let config = resolve_with("", &[("HOME", "/home/sre")], Overrides::default()).unwrap();
        assert_eq!(
            config.store.location,
            StoreLocation::Local {
                root: PathBuf::from("/home/sre/.local/share/gc-backup"),
                embedded_default: true
            }
        );
    }

    #[test]
    fn malformed_store_urls_are_refused() {
        for url in [
            "http://bucket",
            "s3://",
            "s3://UPPER",
            "file://relative",
            "bucket/x",
            "s3://a",
        ] {
            let flags = Overrides {
                store_url: Some(url.into()),
                ..Overrides::default()
            };
            assert!(resolve_with("", &[], flags).is_err(), "{url} was accepted");
        }
    }

    #[test]
    fn s3_settings_come_from_the_aws_environment() {
        let env = [
            ("GC_BACKUP_STORE", "s3://gc-storage-backup/prod/"),
            ("AWS_ENDPOINT_URL", "http://minio:9000"),
            ("AWS_ACCESS_KEY_ID", "AKIA"),
            ("AWS_SECRET_ACCESS_KEY", "very-secret"),
            ("AWS_REGION", "eu-west-1"),
        ];
        let config = resolve_with("", &env, Overrides::default()).unwrap();
        let StoreLocation::S3(s3) = &config.store.location else {
            panic!("not s3")
        };
        assert_eq!(s3.prefix, "prod");
        assert_eq!(s3.endpoint.as_deref(), Some("http://minio:9000"));
        assert_eq!(s3.region, "eu-west-1");
        assert_eq!(
            s3.secret_access_key.as_ref().map(Secret::expose),
            Some("very-secret")
        );
        assert_eq!(
            config.store.location.to_string(),
            "s3://gc-storage-backup/prod at http://minio:9000"
        );
    }

    #[test]
    fn secrets_never_show_in_debug_output() {
        let env = [
            ("GC_BACKUP_STORE", "s3://bucket"),
            ("AWS_SECRET_ACCESS_KEY", "s3-secret-value"),
            ("PGPASSWORD", "pg-secret-value"),
        ];
        let config = resolve_with("", &env, Overrides::default()).unwrap();
        let debug = format!("{config:?}");
        assert!(!debug.contains("s3-secret-value") && !debug.contains("pg-secret-value"));
        assert!(debug.contains("***"));
        assert_eq!(
            redact_url("postgres://u:pw@host/db"),
            "postgres://***@host/db"
        );
    }

    #[test]
    fn libpq_names_win_over_the_runbook_aliases() {
        let env = [
            ("DB_HOST", "postgres-primary"),
            ("DB_USER", "gc"),
            ("DB_NAME", "gc_storage"),
        ];
        let config = resolve_with("", &env, Overrides::default()).unwrap();
        assert_eq!(config.postgres.host.as_deref(), Some("postgres-primary"));
        assert_eq!(config.postgres.dbname.as_deref(), Some("gc_storage"));
        let env = [("DB_HOST", "alias"), ("PGHOST", "libpq")];
        let config = resolve_with("", &env, Overrides::default()).unwrap();
        assert_eq!(config.postgres.host.as_deref(), Some("libpq"));
    }

    #[test]
    fn the_example_config_shipped_in_docker_parses() {
        let text = include_str!("../../docker/gc-backup.toml");
        let config = resolve_with(text, &[], Overrides::default()).unwrap();
        let StoreLocation::S3(s3) = &config.store.location else {
            panic!("the example stores in S3")
        };
        assert_eq!(
            (s3.bucket.as_str(), s3.prefix.as_str()),
            ("gc-storage-backup", "prod")
        );
        assert_eq!(config.postgres.dbname.as_deref(), Some("gc_storage"));
        assert_eq!(config.pipeline.part_size, 8 * MIB);
        assert_eq!(
            config.redis.aof_dir.as_deref(),
            Some(Path::new("/data/appendonlydir"))
        );
        assert_eq!(config.etcd.endpoints.len(), 1);
        assert!(config.etcd.key_file.is_some());
    }

    #[test]
    fn sizes_and_limits_are_checked() {
        assert_eq!(parse_size("8MiB").unwrap(), 8 * MIB);
        assert_eq!(parse_size("512k").unwrap(), 512 * 1024);
        assert_eq!(parse_size("1048576").unwrap(), MIB);
        assert!(parse_size("8 parsecs").is_err());
        let small_parts = "[store]\nurl = \"s3://bucket\"\n[pipeline]\npart-size = \"1MiB\"\n";
        assert!(resolve_with(small_parts, &[], Overrides::default()).is_err());
        assert!(resolve_with("[pipeline]\nzstd-level = 30\n", &[], Overrides::default()).is_err());
    }
}
