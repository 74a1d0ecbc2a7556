//! The resolved configuration: what the agent runs with, checked once.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use super::{ConfigError, Overrides, Schedule, Secret, err};
use crate::sources::etcd::EtcdEndpoints;
use crate::sources::redis::RedisEndpoint;

#[derive(Debug, Clone)]
pub struct Config {
    pub store: StoreConfig,
    pub pipeline: PipelineConfig,
    pub postgres: PostgresConfig,
    pub redis: RedisConfig,
    /// The etcd cluster; `urls` is empty when none is configured.
    pub etcd: EtcdEndpoints,
    pub schedule: Schedules,
    pub drill: DrillConfig,
    pub retention: retention::Policy,
    pub metrics_listen: std::net::SocketAddr,
    pub encryption: EncryptionConfig,
    /// `--as-of`: read the store as it was then (a versioned bucket's older versions).
    pub as_of: Option<chrono::DateTime<chrono::Utc>>,
    /// Whether `wal-fetch` reads the next segments ahead (`GC_BACKUP_WAL_PREFETCH`).
    pub wal_prefetch: bool,
    /// `pipeline.max-upload-rate` and `max-download-rate`, bytes per second for the process.
    pub max_upload_rate: Option<u64>,
    pub max_download_rate: Option<u64>,
    /// The flags this was resolved with (see [`Config::child_env`]).
    pub origin: Overrides,
}

/// `[encryption]`: whom writers encrypt to, and where readers find the keys.
#[derive(Debug, Clone, Default)]
pub struct EncryptionConfig {
    /// `None`: objects are written in the clear (refused once the store is encrypted).
    pub recipients: Option<crate::seal::Recipients>,
    /// Absolute paths; loaded by [`Config::keys`] only where something is read.
    pub identity_files: Vec<PathBuf>,
}

/// The daemon's schedules, parsed.
#[derive(Debug, Clone, Default)]
pub struct Schedules {
    pub pg_dump: Option<Schedule>,
    pub pg_base: Option<Schedule>,
    pub pg_base_incremental: Option<Schedule>,
    pub redis: Option<Schedule>,
    pub etcd: Option<Schedule>,
    pub mark: Option<Schedule>,
    pub drill: Option<Schedule>,
    pub retention: Option<Schedule>,
}

/// `[drill]`, resolved.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DrillConfig {
    /// What a scheduled drill restores, in order: the configured kinds, else the ones the
    /// sidecar backs up.
    pub kinds: Vec<ids::Kind>,
    /// The RTO above which a kind's drill is too slow.
    pub rto_bound: std::collections::BTreeMap<ids::Kind, Duration>,
}

/// The runbook's retention: PostgreSQL 30 days, Redis 7, etcd 14.
pub const DEFAULT_RETENTION: retention::Policy = retention::Policy {
    pg: chrono::TimeDelta::days(30),
    redis: chrono::TimeDelta::days(7),
    etcd: chrono::TimeDelta::days(14),
    orphan_grace: chrono::TimeDelta::hours(24),
};

pub const DEFAULT_METRICS_LISTEN: &str = "0.0.0.0:9188";

/// Where Redis is (URL, password and TLS files resolved into one endpoint) and its AOF set.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RedisConfig {
    pub endpoint: Option<RedisEndpoint>,
    /// Redis 7's AOF directory, shared with the sidecar.
    pub aof_dir: Option<PathBuf>,
}

impl RedisConfig {
    /// The server to back up or check; an error that says how to configure one.
    pub fn endpoint(&self) -> Result<&RedisEndpoint, ConfigError> {
        self.endpoint.as_ref().ok_or_else(|| {
            err("no Redis to back up: give --redis-url, GC_BACKUP_REDIS_URL or [redis] url")
        })
    }
}

impl Config {
    /// The etcd cluster to back up or check; an error that says how to configure one.
    pub fn etcd_endpoints(&self) -> Result<&EtcdEndpoints, ConfigError> {
        if self.etcd.urls.is_empty() {
            return Err(err(
                "no etcd to back up: give --endpoints, GC_BACKUP_ETCD_ENDPOINTS (or \
                 ETCDCTL_ENDPOINTS) or [etcd] endpoints",
            ));
        }
        Ok(&self.etcd)
    }
}

/// PEM files for a TLS connection to Redis or etcd; all optional.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFiles {
    /// Extra CA certificates to trust (a private CA).
    pub ca_file: Option<PathBuf>,
    /// A client certificate and its key, for servers that require one.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub location: StoreLocation,
    /// Extra CA certificates (PEM) for https endpoints.
    pub ca_file: Option<PathBuf>,
    pub max_retries: usize,
    pub retry_timeout: Duration,
    pub connect_timeout: Duration,
    /// S3 object lock on every object written (`store.object-lock`).
    pub object_lock: Option<ObjectLock>,
}

/// How objects are locked: the mode, and what is added to each kind's retention window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ObjectLock {
    pub mode: LockMode,
    pub margin: chrono::TimeDelta,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    /// Users with s3:BypassGovernanceRetention may still delete; gc-backup never asks to.
    Governance,
    /// Nobody can delete a version before its date, the account's root included.
    Compliance,
}

impl LockMode {
    pub fn as_s3(self) -> &'static str {
        match self {
            Self::Governance => "GOVERNANCE",
            Self::Compliance => "COMPLIANCE",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum StoreLocation {
    /// A directory. `embedded_default` says nobody configured it, so commands say where it is.
    Local {
        root: PathBuf,
        embedded_default: bool,
    },
    S3(S3Location),
    /// `az://container/prefix`: Azure Blob Storage.
    Azure(AzureLocation),
}

#[derive(Debug, Clone, PartialEq)]
pub struct AzureLocation {
    pub container: String,
    pub prefix: String,
    /// The storage account; without it object_store's own `AZURE_*` variables must name one.
    pub account: Option<String>,
    pub access_key: Option<Secret>,
    /// The account's blob URL when it is not `https://ACCOUNT.blob.core.windows.net` (Azurite,
    /// a private endpoint): `http://127.0.0.1:10000/devstoreaccount1`.
    pub endpoint: Option<String>,
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
    /// `store.ca-file` again, for the aws-sdk-s3 client of the S3-only corners (multipart
    /// cleanup, object lock, versions), which does not share object_store's TLS setup.
    pub ca_file: Option<PathBuf>,
}

impl StoreLocation {
    /// The S3 bucket and prefix, when the store is S3.
    pub fn s3(&self) -> Option<&S3Location> {
        match self {
            StoreLocation::S3(location) => Some(location),
            _ => None,
        }
    }

    /// Says why an S3-only path (stale multipart uploads, object lock, bucket versions) does
    /// nothing here, for a network store that is not S3.
    pub fn s3_only(&self, what: &str) -> Option<String> {
        let kind = match self {
            Self::Azure(_) => "Azure Blob Storage",
            Self::S3(_) | Self::Local { .. } => return None,
        };
        Some(format!("{what} is S3-only: not done on {kind} ({self})"))
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
            Self::Azure(az) => {
                write!(f, "az://{}", az.container)?;
                if !az.prefix.is_empty() {
                    write!(f, "/{}", az.prefix)?;
                }
                match (&az.endpoint, &az.account) {
                    (Some(endpoint), _) => write!(f, " at {endpoint}"),
                    (None, Some(account)) => write!(f, " in account {account}"),
                    (None, None) => Ok(()),
                }
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
pub(super) fn default_zstd_workers(level: i32) -> u32 {
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
    pub tls: crate::sources::postgres::tls::PgTls,
    /// The login name (`USER`): libpq's default role when none is configured.
    pub login_user: Option<String>,
    /// Incrementals after a full before `--incremental` takes a full again.
    pub max_incremental_chain: u32,
    /// WAL streaming in `gc-backup run`, when on.
    pub stream: Option<WalStreamConfig>,
}

/// `[postgres] stream-wal` and its settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalStreamConfig {
    pub slot: String,
    pub flush: Duration,
}

pub const DEFAULT_SLOT_NAME: &str = "gc_backup";
pub const DEFAULT_STREAM_FLUSH: Duration = Duration::from_secs(1);

/// Incrementals after a full before the next is a full: a week of dailies, or 7 hours of
/// hourlies beside a daily full. Each link adds one delta stream to read on restore.
pub const DEFAULT_MAX_INCREMENTAL_CHAIN: u32 = 7;

pub const MIB: usize = 1024 * 1024;
/// S3's smallest allowed part (all but the last).
pub const S3_MIN_PART_SIZE: usize = 5 * MIB;
