//! The TOML file's shape. Every section and key is optional; unknown keys are errors that
//! name the key.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{ConfigError, Secret, err};

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
    pub encryption: EncryptionSection,
    pub drill: DrillSection,
}

/// What `[schedule] drill` restores, and how long each restore may take before it alerts.
#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct DrillSection {
    /// pg-base, redis, etcd; default: the kinds the sidecar backs up.
    pub kinds: Option<Vec<String>>,
    /// Per kind, an RTO above which `GcBackupDrillSlow` fires (e.g. `pg-base = "2h"`).
    pub rto_bound: std::collections::BTreeMap<String, String>,
}

/// age encryption of every data and WAL object (see `crate::seal`).
#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct EncryptionSection {
    /// Public keys (`age1…`) to encrypt to: all a writer needs.
    pub recipients: Vec<String>,
    /// One age identity file, or several (key rotation): what readers need.
    pub identity_file: Option<OneOrMany<PathBuf>>,
}

/// A key that takes one value or a list of them.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

impl<T> OneOrMany<T> {
    pub fn into_vec(self) -> Vec<T> {
        match self {
            Self::One(one) => vec![one],
            Self::Many(many) => many,
        }
    }
}

/// Cron expressions for `gc-backup run`: 5 fields, or 6 with seconds first. A kind without
/// one is not scheduled.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct ScheduleSection {
    pub pg_dump: Option<String>,
    pub pg_base: Option<String>,
    /// Incremental base backups (`backup pg-base --incremental`), beside `pg-base`'s fulls.
    pub pg_base_incremental: Option<String>,
    pub redis: Option<String>,
    pub etcd: Option<String>,
    /// `gc-backup mark scheduled-<id>`: a point across the engines (before a nightly batch).
    pub mark: Option<String>,
    /// Restore drills of the newest backups (`[drill]`), like `verify --restore`.
    pub drill: Option<String>,
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
    /// `s3://bucket/prefix`, `az://container/prefix` or `file:///path`.
    pub url: Option<String>,
    /// S3 endpoint for MinIO, SeaweedFS or any S3-compatible server; Azure's account URL.
    pub endpoint: Option<String>,
    /// Azure storage account.
    pub account: Option<String>,
    /// Azure storage account key.
    pub account_key: Option<Secret>,
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
    /// `governance` or `compliance`: every object written gets a retain-until date.
    pub object_lock: Option<String>,
    /// Added to a kind's retention window for its retain-until date (default 7d).
    pub object_lock_margin: Option<String>,
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
    /// Bytes per second the process may upload, all backups together, e.g. "50MiB/s".
    pub max_upload_rate: Option<String>,
    /// Bytes per second restores may download, e.g. "200MiB/s".
    pub max_download_rate: Option<String>,
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
    /// Incrementals after a full before the next `--incremental` run takes a full (default 7).
    pub max_incremental_chain: Option<u32>,
    /// `gc-backup run` streams WAL through a replication slot as it is written.
    pub stream_wal: Option<bool>,
    /// The physical replication slot the stream uses (default `gc_backup`).
    pub slot_name: Option<String>,
    /// The longest a streamed byte waits before it is stored, while WAL flows (default 1s).
    pub stream_flush: Option<String>,
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
