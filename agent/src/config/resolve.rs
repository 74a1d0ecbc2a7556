//! file < environment < flags, merged and validated.

use std::path::PathBuf;
use std::time::Duration;

use super::file::*;
use super::resolved::*;
use super::{Config, ConfigError, Overrides, Schedule, Secret, err};
use crate::catalog::Kind;
use crate::sources::etcd::EtcdEndpoints;
use crate::sources::redis::RedisEndpoint;

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
        let postgres = resolve_postgres(file.postgres, &env, flags)?;
        let redis = resolve_redis(file.redis, &env, flags)?;
        let etcd = resolve_etcd(file.etcd, &env, flags)?;
        let schedule = resolve_schedules(&file.schedule)?;
        let drill = resolve_drill(&file.drill, &schedule, &etcd)?;
        let retention = resolve_retention(&file.retention)?;
        let encryption = resolve_encryption(file.encryption, &env)?;
        let as_of = resolve_as_of(&env, flags)?;
        let rate = |key: &str, variable: &str, file: &Option<String>| {
            env(variable)
                .or_else(|| file.clone())
                .map(|text| parse_rate(key, &text))
                .transpose()
        };
        let max_upload_rate = rate(
            "pipeline.max-upload-rate",
            "GC_BACKUP_MAX_UPLOAD_RATE",
            &file.pipeline.max_upload_rate,
        )?;
        let max_download_rate = rate(
            "pipeline.max-download-rate",
            "GC_BACKUP_MAX_DOWNLOAD_RATE",
            &file.pipeline.max_download_rate,
        )?;
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
            drill,
            retention,
            metrics_listen,
            encryption,
            as_of,
            // On unless 0, off, false or no.
            wal_prefetch: !env("GC_BACKUP_WAL_PREFETCH").is_some_and(|value| {
                matches!(
                    value.to_ascii_lowercase().as_str(),
                    "0" | "off" | "false" | "no"
                )
            }),
            max_upload_rate,
            max_download_rate,
            origin: Overrides {
                config_file: flags.config_file(&env),
                ..flags.clone()
            },
        })
    }
}

/// `--as-of`, else `GC_BACKUP_AS_OF`: a moment with its zone, not in the future.
fn resolve_as_of(
    env: &dyn Fn(&str) -> Option<String>,
    flags: &Overrides,
) -> Result<Option<chrono::DateTime<chrono::Utc>>, ConfigError> {
    let Some(text) = flags.as_of.clone().or_else(|| env("GC_BACKUP_AS_OF")) else {
        return Ok(None);
    };
    let time = pitr::target::parse_time(&text).map_err(|e| err(format!("--as-of: {e}")))?;
    if time > chrono::Utc::now() {
        return Err(err(format!(
            "--as-of {text} is in the future: the store cannot be read as it will be"
        )));
    }
    Ok(Some(time))
}

/// Recipients parsed here (a bad key is exit 2 before any I/O); identity files only made
/// absolute, since only readers load them (`Config::keys`).
fn resolve_encryption(
    file: EncryptionSection,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<EncryptionConfig, ConfigError> {
    let list = |text: String| -> Vec<String> {
        text.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect()
    };
    let recipients = env("GC_BACKUP_AGE_RECIPIENTS")
        .map(list)
        .unwrap_or(file.recipients);
    let recipients = crate::seal::Recipients::parse(&recipients).map_err(|e| err(e.to_string()))?;
    let identity_files: Vec<PathBuf> = match env("GC_BACKUP_AGE_IDENTITY_FILE") {
        Some(text) => list(text).into_iter().map(PathBuf::from).collect(),
        None => file
            .identity_file
            .map(OneOrMany::into_vec)
            .unwrap_or_default(),
    };
    let identity_files = identity_files
        .into_iter()
        .map(|path| {
            std::path::absolute(&path)
                .map_err(|e| err(format!("encryption.identity-file {}: {e}", path.display())))
        })
        .collect::<Result<_, _>>()?;
    Ok(EncryptionConfig {
        recipients,
        identity_files,
    })
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
        ca_file: env("GC_BACKUP_CA_FILE")
            .map(PathBuf::from)
            .or_else(|| file.ca_file.clone()),
        max_retries: file.max_retries.unwrap_or(5),
        retry_timeout: parse_duration("store.retry-timeout", file.retry_timeout.as_deref())?
            .unwrap_or(Duration::from_secs(60)),
        connect_timeout: parse_duration("store.connect-timeout", file.connect_timeout.as_deref())?
            .unwrap_or(Duration::from_secs(5)),
        object_lock: resolve_object_lock(file, env, &location)?,
        location,
    })
}

fn resolve_object_lock(
    file: &StoreSection,
    env: &dyn Fn(&str) -> Option<String>,
    location: &StoreLocation,
) -> Result<Option<ObjectLock>, ConfigError> {
    let Some(mode) = env("GC_BACKUP_OBJECT_LOCK").or_else(|| file.object_lock.clone()) else {
        return Ok(None);
    };
    let mode = match mode.to_ascii_lowercase().as_str() {
        "governance" => LockMode::Governance,
        "compliance" => LockMode::Compliance,
        "off" | "none" | "" => return Ok(None),
        other => {
            return Err(err(format!(
                "store.object-lock '{other}' is not governance, compliance or off"
            )));
        }
    };
    if let Some(note) = location.s3_only("store.object-lock") {
        return Err(err(note));
    }
    if !matches!(location, StoreLocation::S3(_)) {
        return Err(err(
            "store.object-lock needs an s3:// store: a local directory has no object lock",
        ));
    }
    let margin = parse_duration(
        "store.object-lock-margin",
        file.object_lock_margin.as_deref(),
    )?
    .map_or(Ok(chrono::TimeDelta::days(7)), |d| {
        chrono::TimeDelta::from_std(d).map_err(|_| err("store.object-lock-margin is too long"))
    })?;
    Ok(Some(ObjectLock { mode, margin }))
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
            "store URL '{}' is not supported: use s3://BUCKET[/PREFIX], az://CONTAINER[/PREFIX] \
             or file:///ABSOLUTE/PATH",
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
    if let Some(rest) = url
        .strip_prefix("az://")
        .or_else(|| url.strip_prefix("azure://"))
    {
        let (container, prefix) = bucket_and_prefix(url, rest, "container", b"-")?;
        let endpoint = env("AZURE_STORAGE_ENDPOINT").or_else(|| file.endpoint.clone());
        check_endpoint("Azure", endpoint.as_deref())?;
        return Ok(StoreLocation::Azure(AzureLocation {
            container,
            prefix,
            account: env("AZURE_STORAGE_ACCOUNT_NAME").or_else(|| file.account.clone()),
            access_key: env("AZURE_STORAGE_ACCOUNT_KEY")
                .or_else(|| env("AZURE_STORAGE_ACCESS_KEY"))
                .map(Secret::new)
                .or_else(|| file.account_key.clone()),
            endpoint,
        }));
    }
    let rest = url.strip_prefix("s3://").ok_or_else(unsupported)?;
    let (bucket, prefix) = bucket_and_prefix(url, rest, "bucket", b".-")?;
    let endpoint = env("AWS_ENDPOINT_URL_S3")
        .or_else(|| env("AWS_ENDPOINT_URL"))
        .or_else(|| file.endpoint.clone());
    check_endpoint("S3", endpoint.as_deref())?;
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
        ca_file: env("GC_BACKUP_CA_FILE")
            .map(PathBuf::from)
            .or_else(|| file.ca_file.clone()),
    }))
}

fn check_endpoint(what: &str, endpoint: Option<&str>) -> Result<(), ConfigError> {
    match endpoint {
        Some(endpoint)
            if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) =>
        {
            Err(err(format!(
                "{what} endpoint '{}' must start with http:// or https://",
                redact_url(endpoint)
            )))
        }
        _ => Ok(()),
    }
}

/// `BUCKET[/PREFIX]` after the scheme: a bucket (or container) name of 3 to 63 lower-case
/// letters, digits and the `extra` punctuation, and a prefix without `.` or `..` segments.
fn bucket_and_prefix(
    url: &str,
    rest: &str,
    what: &str,
    extra: &[u8],
) -> Result<(String, String), ConfigError> {
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    let valid = (3..=63).contains(&bucket.len())
        && bucket
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || extra.contains(&b))
        && bucket.as_bytes()[0].is_ascii_alphanumeric()
        && bucket.as_bytes()[bucket.len() - 1].is_ascii_alphanumeric();
    if !valid {
        let punctuation: Vec<String> = extra.iter().map(|b| format!("'{}'", *b as char)).collect();
        return Err(err(format!(
            "store URL '{}': '{bucket}' is not a valid {what} name (3 to 63 characters: \
             lower-case letters, digits and {})",
            redact_url(url),
            punctuation.join(" ")
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
    Ok((bucket.to_string(), prefix))
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

/// A number from the environment; a value that is not one is refused with the variable's name.
fn env_number<T: std::str::FromStr>(
    env: &dyn Fn(&str) -> Option<String>,
    name: &str,
) -> Result<Option<T>, ConfigError> {
    env(name)
        .map(|v| {
            v.parse::<T>()
                .map_err(|_| err(format!("{name} '{v}' is not a number")))
        })
        .transpose()
}

fn resolve_pipeline(
    file: &PipelineSection,
    env: &dyn Fn(&str) -> Option<String>,
    flags: &Overrides,
) -> Result<PipelineConfig, ConfigError> {
    let defaults = PipelineConfig::default();
    let zstd_level = flags
        .zstd_level
        .or(env_number(env, "GC_BACKUP_ZSTD_LEVEL")?)
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
    let parallel_uploads = flags
        .parallel_uploads
        .or(env_number(env, "GC_BACKUP_PARALLEL_UPLOADS")?)
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
    flags: &Overrides,
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
        pgdata: flags
            .pgdata
            .clone()
            .or_else(|| env("PGDATA").map(PathBuf::from))
            .or(file.pgdata),
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
        login_user: env("USER"),
        max_incremental_chain: match env("GC_BACKUP_MAX_INCREMENTAL_CHAIN") {
            Some(text) => text.trim().parse().map_err(|_| {
                err(format!(
                    "GC_BACKUP_MAX_INCREMENTAL_CHAIN '{text}' is not a number of backups"
                ))
            })?,
            None => file
                .max_incremental_chain
                .unwrap_or(super::resolved::DEFAULT_MAX_INCREMENTAL_CHAIN),
        },
        stream: resolve_stream(
            env("GC_BACKUP_STREAM_WAL"),
            file.stream_wal,
            env("GC_BACKUP_SLOT_NAME").or(file.slot_name),
            env("GC_BACKUP_STREAM_FLUSH").or(file.stream_flush),
        )?,
    })
}

/// `stream-wal` (the environment's `GC_BACKUP_STREAM_WAL` first) and its slot and flush
/// interval, checked even when streaming is off so that a typo shows at once.
fn resolve_stream(
    from_env: Option<String>,
    from_file: Option<bool>,
    slot: Option<String>,
    flush: Option<String>,
) -> Result<Option<super::resolved::WalStreamConfig>, ConfigError> {
    let on = match from_env.as_deref().map(str::to_ascii_lowercase).as_deref() {
        Some("1" | "on" | "true" | "yes") => true,
        Some("0" | "off" | "false" | "no" | "") => false,
        Some(other) => {
            return Err(err(format!(
                "GC_BACKUP_STREAM_WAL '{other}' is not true or false"
            )));
        }
        None => from_file.unwrap_or(false),
    };
    let slot = slot.unwrap_or_else(|| super::resolved::DEFAULT_SLOT_NAME.to_string());
    // PostgreSQL's own rule for slot names.
    let valid = !slot.is_empty()
        && slot.len() <= 63
        && slot
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if !valid {
        return Err(err(format!(
            "postgres.slot-name '{slot}' is not a slot name: lower-case letters, digits and _, \
             at most 63"
        )));
    }
    let flush = parse_duration("postgres.stream-flush", flush.as_deref())?
        .unwrap_or(super::resolved::DEFAULT_STREAM_FLUSH);
    if !(Duration::from_millis(100)..=Duration::from_secs(60)).contains(&flush) {
        return Err(err(format!(
            "postgres.stream-flush {} is outside 100ms..=60s",
            humantime::format_duration(flush)
        )));
    }
    Ok(on.then_some(super::resolved::WalStreamConfig { slot, flush }))
}

/// libpq's TLS settings: its environment, then the file, then libpq's own defaults (the
/// files in `~/.postgresql/`, where they exist).
fn resolve_pg_tls(
    mode: Option<String>,
    root_cert: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<crate::sources::postgres::tls::PgTls, ConfigError> {
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
    Ok(crate::sources::postgres::tls::PgTls {
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

/// A rate such as `50MiB/s` (the `/s` may be left out); at least 1 MiB/s, below which a
/// base backup would take days and WAL would outrun it.
fn parse_rate(key: &str, text: &str) -> Result<u64, ConfigError> {
    let size = text.trim();
    let size = size.strip_suffix("/s").unwrap_or(size);
    let bytes = parse_size(size).map_err(|e| err(format!("{key}: {e}")))?;
    if bytes < MIB {
        return Err(err(format!(
            "{key} '{text}' is below 1MiB/s (write it as e.g. 50MiB/s)"
        )));
    }
    Ok(bytes as u64)
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
        pg_base_incremental: parse("pg-base-incremental", &file.pg_base_incremental)?,
        redis: parse("redis", &file.redis)?,
        etcd: parse("etcd", &file.etcd)?,
        mark: parse("mark", &file.mark)?,
        drill: parse("drill", &file.drill)?,
        retention: parse("retention", &file.retention)?,
    })
}

/// The kinds a drill restores: those named (pg-base, redis, etcd), else the ones the
/// sidecar's own schedules back up (a point backs up Redis, and etcd when it is configured).
fn resolve_drill(
    file: &DrillSection,
    schedule: &Schedules,
    etcd: &EtcdEndpoints,
) -> Result<DrillConfig, ConfigError> {
    let drilled = |key: &str, name: &str| {
        name.parse::<Kind>()
            .ok()
            .filter(|kind| crate::jobs::drill::DRILLED.contains(kind))
            .ok_or_else(|| {
                err(format!(
                    "{key}: '{name}' is not a kind a drill restores (pg-base, redis, etcd)"
                ))
            })
    };
    let kinds = match &file.kinds {
        Some(names) => {
            let mut kinds = Vec::new();
            for name in names {
                let kind = drilled("drill.kinds", name)?;
                if !kinds.contains(&kind) {
                    kinds.push(kind);
                }
            }
            kinds
        }
        None => {
            let marks = schedule.mark.is_some();
            crate::jobs::drill::DRILLED
                .into_iter()
                .filter(|kind| match kind {
                    Kind::PgBase => {
                        schedule.pg_base.is_some() || schedule.pg_base_incremental.is_some()
                    }
                    Kind::Redis => schedule.redis.is_some() || marks,
                    _ => schedule.etcd.is_some() || (marks && !etcd.urls.is_empty()),
                })
                .collect()
        }
    };
    let mut rto_bound = std::collections::BTreeMap::new();
    for (name, text) in &file.rto_bound {
        let key = format!("drill.rto-bound.{name}");
        let kind = drilled(&key, name)?;
        if let Some(bound) = parse_duration(&key, Some(text))? {
            rto_bound.insert(kind, bound);
        }
    }
    Ok(DrillConfig { kinds, rto_bound })
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

/// A TLS triple: each file from its variable, else from the file's key.
fn tls_files(
    env: &dyn Fn(&str) -> Option<String>,
    [ca, cert, key]: [&str; 3],
    file: [Option<PathBuf>; 3],
) -> TlsFiles {
    let [ca_file, cert_file, key_file] = file;
    let pick = |name: &str, from_file: Option<PathBuf>| env(name).map(PathBuf::from).or(from_file);
    TlsFiles {
        ca_file: pick(ca, ca_file),
        cert_file: pick(cert, cert_file),
        key_file: pick(key, key_file),
    }
}

/// `--redis-url`, else the environment, else the file; a password from `REDISCLI_AUTH` (redis-cli's
/// variable, so an existing secret mount works unchanged) or the file when the URL has none.
fn resolve_redis(
    file: RedisSection,
    env: &dyn Fn(&str) -> Option<String>,
    flags: &Overrides,
) -> Result<RedisConfig, ConfigError> {
    let url = flags
        .redis_url
        .clone()
        .or_else(|| env("GC_BACKUP_REDIS_URL"))
        .or(file.url);
    let endpoint = match url {
        None => None,
        Some(url) => {
            let mut endpoint = RedisEndpoint::parse(&url).map_err(|e| err(e.to_string()))?;
            if endpoint.password.is_none() {
                endpoint.password = env("REDISCLI_AUTH").map(Secret::new).or(file.password);
            }
            if endpoint.tls.is_some() {
                endpoint.tls = Some(tls_files(
                    env,
                    [
                        "GC_BACKUP_REDIS_CA_FILE",
                        "GC_BACKUP_REDIS_CERT_FILE",
                        "GC_BACKUP_REDIS_KEY_FILE",
                    ],
                    [file.ca_file, file.cert_file, file.key_file],
                ));
            }
            Some(endpoint)
        }
    };
    Ok(RedisConfig {
        endpoint,
        aof_dir: flags
            .redis_aof_dir
            .clone()
            .or_else(|| env("GC_BACKUP_REDIS_AOF_DIR").map(PathBuf::from))
            .or(file.aof_dir),
    })
}

/// Environment names follow etcdctl's (`ETCDCTL_*`), so the secrets an etcd backup CronJob
/// already mounts work unchanged.
fn resolve_etcd(
    file: EtcdSection,
    env: &dyn Fn(&str) -> Option<String>,
    flags: &Overrides,
) -> Result<EtcdEndpoints, ConfigError> {
    let urls = match flags
        .etcd_endpoints
        .clone()
        .or_else(|| env("GC_BACKUP_ETCD_ENDPOINTS"))
        .or_else(|| env("ETCDCTL_ENDPOINTS"))
    {
        Some(list) => EtcdEndpoints::parse_urls(&list).map_err(|e| err(e.to_string()))?,
        None if file.endpoints.is_empty() => Vec::new(),
        None => {
            EtcdEndpoints::check_urls(&file.endpoints).map_err(|e| err(e.to_string()))?;
            file.endpoints
        }
    };
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
    let user = match (user, password) {
        (Some(name), Some(password)) => Some((name, password)),
        (Some(name), None) => {
            return Err(err(format!(
                "etcd user {name} has no password: set ETCDCTL_PASSWORD or [etcd] password"
            )));
        }
        (None, _) => None,
    };
    Ok(EtcdEndpoints {
        urls,
        user,
        tls: tls_files(
            env,
            ["ETCDCTL_CACERT", "ETCDCTL_CERT", "ETCDCTL_KEY"],
            [file.ca_file, file.cert_file, file.key_file],
        ),
    })
}
