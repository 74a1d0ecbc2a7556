//! `gc-backup check`: what an SRE runs after deploying. The store is reachable with these
//! credentials, its bucket exists, and it does what the agent relies on (create-only PUT,
//! multipart upload and abort, a part checksum it accepts, delete); its versioning and
//! object-lock state. PostgreSQL is reachable, archives, and archives through gc-backup into
//! **this** store (a forced segment switch is looked for here). Redis and etcd answer when
//! they are configured.
//!
//! Every probe object lives under `check/<run>/` and is deleted before the check ends. The
//! sidecar runs the store part at start ([`store_checks`]) and uploads without a part
//! checksum if the store refused CRC-64/NVME.

use std::time::{Duration, Instant};

use bytes::Bytes;
use object_store::PutPayload;
use serde::Serialize;

use crate::catalog::layout;
use crate::config::{Config, StoreLocation};
use crate::store::{ObjectKey, OpenMode, Store, StoreError};

/// How one check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Warn,
    Fail,
}

/// One line of the report.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    pub area: &'static str,
    pub check: &'static str,
    pub status: Status,
    pub detail: String,
    /// A failure the settings or credentials cause (exit 2 rather than 3).
    #[serde(skip)]
    pub config: bool,
}

impl Finding {
    fn ok(area: &'static str, check: &'static str, detail: impl Into<String>) -> Self {
        Self {
            area,
            check,
            status: Status::Ok,
            detail: detail.into(),
            config: false,
        }
    }

    fn warn(area: &'static str, check: &'static str, detail: impl Into<String>) -> Self {
        Self {
            status: Status::Warn,
            ..Self::ok(area, check, detail)
        }
    }

    fn fail(
        area: &'static str,
        check: &'static str,
        detail: impl Into<String>,
        config: bool,
    ) -> Self {
        Self {
            status: Status::Fail,
            config,
            ..Self::ok(area, check, detail)
        }
    }
}

/// What was found, in order.
#[derive(Debug, Clone, Default)]
pub struct CheckReport {
    pub findings: Vec<Finding>,
}

impl CheckReport {
    /// 0 all good (warnings included), 2 a setting or credential is wrong, 3 anything else.
    pub fn exit_code(&self) -> u8 {
        let failed: Vec<&Finding> = self
            .findings
            .iter()
            .filter(|f| f.status == Status::Fail)
            .collect();
        if failed.is_empty() {
            0
        } else if failed.iter().any(|f| f.config) {
            crate::error::EXIT_CONFIG
        } else {
            crate::error::EXIT_FAILURE
        }
    }
}

/// The store as the checks found it: the handle to upload with from now on.
#[derive(Debug)]
pub struct StoreFindings {
    pub findings: Vec<Finding>,
    /// A store reopened without part checksums when the configured one was refused.
    pub adapted: Option<Store>,
}

/// Runs every check that applies to `config`.
pub async fn check(config: &Config) -> CheckReport {
    let mut report = CheckReport::default();
    let keys = config.keys().unwrap_or_else(|error| {
        report
            .findings
            .push(Finding::fail("encryption", "keys", error.to_string(), true));
        crate::seal::Keys::default()
    });
    match Store::open(&config.store, OpenMode::Existing) {
        Ok(store) => {
            let store = store.with_keys(keys);
            let found = store_checks(config, &store).await;
            let store = found.adapted.clone().unwrap_or(store);
            report.findings.extend(found.findings);
            if uses_postgres(config) {
                report
                    .findings
                    .extend(postgres_checks(config, &store).await);
            }
        }
        Err(error) => report.findings.push(Finding::fail(
            "store",
            "access",
            error.to_string(),
            error.is_config(),
        )),
    }
    if let Some(endpoint) = &config.redis.endpoint {
        report.findings.push(redis_check(endpoint).await);
    }
    if !config.etcd.urls.is_empty() {
        report.findings.push(etcd_check(&config.etcd).await);
    }
    report
}

fn uses_postgres(config: &Config) -> bool {
    let pg = &config.postgres;
    pg.host.is_some()
        || pg.pgdata.is_some()
        || pg.dbname.is_some()
        || config.schedule.pg_dump.is_some()
        || config.schedule.pg_base.is_some()
        || pg.stream.is_some()
}

/// The store's part: access, create-only PUT, multipart and abort, part checksum, delete,
/// versioning and object lock.
pub async fn store_checks(config: &Config, store: &Store) -> StoreFindings {
    let run = format!(
        "{}-{}-{}",
        crate::host::hostname(),
        std::process::id(),
        chrono::Utc::now().format("%Y%m%dT%H%M%S%.3fZ")
    );
    let key = |name: &str| layout::check_key(&run, name);
    let mut findings = Vec::new();
    let probe = key("probe");
    if let Err(error) = store
        .put(&probe, PutPayload::from_static(b"gc-backup check"))
        .await
    {
        findings.push(Finding::fail(
            "store",
            "access",
            error.to_string(),
            error.is_config(),
        ));
        return StoreFindings {
            findings,
            adapted: None,
        };
    }
    let access = match &config.store.location {
        StoreLocation::S3(_) => "the bucket exists and these credentials may write to it",
        StoreLocation::Azure(_) => "the container exists and these credentials may write to it",
        StoreLocation::Local { .. } => "the directory exists and is writable",
    };
    findings.push(Finding::ok(
        "store",
        "access",
        format!("{}: {access}", store.name()),
    ));
    findings.push(
        match store.put_new(&probe, Bytes::from_static(b"again")).await {
            Err(StoreError::AlreadyExists { .. }) => Finding::ok(
                "store",
                "create-only PUT",
                "a second write of the same key was refused (If-None-Match: *)",
            ),
            Ok(()) => Finding::fail(
                "store",
                "create-only PUT",
                "the store overwrote an object on a create-only PUT: wal-push could not refuse \
             a different segment of the same name, nor manifests be protected. Use a store \
             with conditional writes (S3, MinIO, SeaweedFS do)",
                false,
            ),
            Err(error) => Finding::fail("store", "create-only PUT", error.to_string(), false),
        },
    );

    let (multipart, adapted) = multipart_checks(config, store, &key("multipart")).await;
    findings.extend(multipart);
    let store = adapted.as_ref().unwrap_or(store);

    let mut deleted = true;
    for object in [probe, key("multipart"), key("aborted")] {
        if let Err(error) = store.delete(&object).await {
            findings.push(Finding::fail("store", "delete", error.to_string(), false));
            deleted = false;
            break;
        }
    }
    if deleted {
        findings.push(match store.head(&key("probe")).await {
            Err(StoreError::NotFound { .. }) => {
                Finding::ok("store", "delete", "the probe objects are gone")
            }
            Ok(_) => Finding::fail(
                "store",
                "delete",
                "a deleted object is still there: retention could not free space",
                false,
            ),
            Err(error) => Finding::fail("store", "delete", error.to_string(), false),
        });
    }
    findings.extend(bucket_state(config).await);
    findings.push(encryption_state(store).await);
    StoreFindings { findings, adapted }
}

/// Whether this process would write encrypted, and whether the store expects it to.
async fn encryption_state(store: &Store) -> Finding {
    let marker = crate::catalog::layout::encryption_marker_key();
    let marked = match store.head(&marker).await {
        Ok(_) => true,
        Err(StoreError::NotFound { .. }) => false,
        Err(error) => return Finding::fail("store", "encryption", error.to_string(), false),
    };
    let keys = store.keys();
    let readers = keys.identities.as_ref().map_or(String::new(), |ids| {
        format!("; {} identity file(s) to read with", ids.files().len())
    });
    match (&keys.recipients, marked) {
        (Some(recipients), _) => Finding::ok(
            "store",
            "encryption",
            format!(
                "objects are encrypted (age) to {} recipient(s){readers}",
                recipients.names().len()
            ),
        ),
        (None, true) => Finding::fail(
            "store",
            "encryption",
            format!(
                "the store is encrypted ({marker} exists) and no recipients are configured: \
                 backups and wal-push would be refused; set [encryption] recipients"
            ),
            true,
        ),
        (None, false) => Finding::ok(
            "store",
            "encryption",
            format!("objects are stored in the clear (no [encryption] recipients){readers}"),
        ),
    }
}

/// A two-part multipart upload (5 MiB and 1 KiB), completed and read back; another one
/// aborted. A store that refuses the part checksum header is tried again without it.
async fn multipart_checks(
    config: &Config,
    store: &Store,
    key: &ObjectKey,
) -> (Vec<Finding>, Option<Store>) {
    let mut findings = Vec::new();
    let checksummed = matches!(&config.store.location, StoreLocation::S3(s3) if s3.verify_uploads);
    let mut adapted = None;
    let mut result = multipart_upload(store, key).await;
    let refusal = match &result {
        Err(error) if checksummed && is_checksum_refusal(error) => Some(error.to_string()),
        _ => None,
    };
    if let Some(error) = refusal {
        let mut plain = config.store.clone();
        if let StoreLocation::S3(s3) = &mut plain.location {
            s3.verify_uploads = false;
        }
        if let Ok(reopened) = Store::open(&plain, OpenMode::Existing) {
            result = multipart_upload(&reopened, key).await;
            if result.is_ok() {
                findings.push(Finding::warn(
                    "store",
                    "part checksum",
                    format!(
                        "the store refused CRC-64/NVME part checksums ({error}); uploads go \
                         without one (the zstd frames' checksums still protect every byte). \
                         Set [store] verify-uploads = false to say so."
                    ),
                ));
                adapted = Some(reopened);
            }
        }
    } else if result.is_ok() {
        findings.push(match &config.store.location {
            StoreLocation::S3(_) if checksummed => Finding::ok(
                "store",
                "part checksum",
                "CRC-64/NVME, checked by the store on every part",
            ),
            StoreLocation::S3(_) => Finding::warn(
                "store",
                "part checksum",
                "none (verify-uploads = false): only the zstd frames' checksums protect parts",
            ),
            StoreLocation::Local { .. } => Finding::ok(
                "store",
                "part checksum",
                "not needed: a local directory, fsynced",
            ),
            StoreLocation::Azure(_) => Finding::ok(
                "store",
                "part checksum",
                "none asked of the store (its CRC-64/NVME is S3-only): the zstd frames' \
                 checksums protect every part",
            ),
        });
    }
    findings.insert(
        0,
        match &result {
            Ok(()) => Finding::ok(
                "store",
                "multipart upload",
                "two parts uploaded, completed and read back",
            ),
            Err(error) => Finding::fail("store", "multipart upload", error.to_string(), false),
        },
    );
    let store = adapted.as_ref().unwrap_or(store);
    let aborted = key.as_ref().replace("multipart", "aborted");
    findings.push(
        match abort_upload(store, &ObjectKey::from(aborted.as_str())).await {
            Ok(()) => Finding::ok(
                "store",
                "multipart abort",
                "an unfinished upload was aborted",
            ),
            Err(error) => Finding::fail("store", "multipart abort", error.to_string(), false),
        },
    );
    (findings, adapted)
}

const PART: usize = 5 * 1024 * 1024;

async fn multipart_upload(store: &Store, key: &ObjectKey) -> Result<(), StoreError> {
    let failed = |e: object_store::Error| store.error("multipart upload of", key, e);
    let mut upload = store.start_multipart(key).await?;
    for part in [vec![0x5a; PART], vec![0xa5; 1024]] {
        if let Err(error) = upload.put_part(PutPayload::from(part)).await {
            let _ = upload.abort().await;
            return Err(failed(error));
        }
    }
    upload.complete().await.map_err(failed)?;
    let size = store.head(key).await?.size;
    if size != (PART + 1024) as u64 {
        return Err(StoreError::Failed {
            store: store.name().to_string(),
            operation: "multipart upload of",
            key: key.to_string(),
            detail: format!("the completed object has {size} bytes, not {}", PART + 1024),
        });
    }
    Ok(())
}

async fn abort_upload(store: &Store, key: &ObjectKey) -> Result<(), StoreError> {
    let failed = |e: object_store::Error| store.error("abort of multipart upload", key, e);
    let mut upload = store.start_multipart(key).await?;
    let part = upload.put_part(PutPayload::from(vec![0u8; 1024])).await;
    upload.abort().await.map_err(failed)?;
    part.map_err(failed)?;
    match store.head(key).await {
        Err(StoreError::NotFound { .. }) => Ok(()),
        Ok(_) => Err(StoreError::Failed {
            store: store.name().to_string(),
            operation: "abort of multipart upload",
            key: key.to_string(),
            detail: "an aborted upload left an object".into(),
        }),
        Err(error) => Err(error),
    }
}

/// A store that does not know the checksum header answers 400/501 naming it; a checksum
/// that does not match (BadDigest) is damage in transit, not a refusal.
fn is_checksum_refusal(error: &StoreError) -> bool {
    let text = error.to_string().to_ascii_lowercase();
    text.contains("checksum") && !text.contains("baddigest") && !text.contains("mismatch")
}

/// Versioning and object lock, asked with S3's own API (static credentials only).
async fn bucket_state(config: &Config) -> Vec<Finding> {
    if let Some(note) = config
        .store
        .location
        .s3_only("checking versioning, object lock and stale multipart uploads")
    {
        return vec![Finding::ok("store", "versioning", note)];
    }
    let StoreLocation::S3(s3) = &config.store.location else {
        return Vec::new();
    };
    match crate::store::multipart::bucket_state(s3).await {
        Ok(Some(state)) => {
            let found = format!(
                "versioning {}; object lock {}",
                state.versioning, state.object_lock
            );
            let locked = state.object_lock != "off" && !state.object_lock.starts_with("unknown");
            match config.store.object_lock {
                Some(lock) if !locked || state.versioning != "Enabled" => vec![Finding::fail(
                    "store",
                    "versioning and object lock",
                    format!(
                        "{found}: store.object-lock = {} needs a bucket created with object \
                         lock (which turns versioning on)",
                        lock.mode.as_s3().to_lowercase()
                    ),
                    true,
                )],
                Some(lock) => vec![Finding::ok(
                    "store",
                    "versioning and object lock",
                    format!(
                        "{found}; every object written is locked ({}, its kind's retention \
                         window + {} days)",
                        lock.mode.as_s3(),
                        lock.margin.num_days()
                    ),
                )],
                None => vec![Finding::ok("store", "versioning and object lock", found)],
            }
        }
        Ok(None) => vec![Finding::warn(
            "store",
            "versioning and object lock",
            "not asked: no static credentials (instance or web-identity credentials)",
        )],
        Err(error) => vec![Finding::warn(
            "store",
            "versioning and object lock",
            error.to_string(),
        )],
    }
}

/// PostgreSQL: reachable, archive_mode, archive_command, and a forced switch archived here.
async fn postgres_checks(config: &Config, store: &Store) -> Vec<Finding> {
    use crate::sources::postgres;
    let pg = &config.postgres;
    let mut findings = Vec::new();
    let client = match postgres::connect(pg).await {
        Ok(client) => client,
        Err(error) => {
            let config_error = matches!(error, crate::sources::SourceError::Config(_));
            findings.push(Finding::fail(
                "postgres",
                "reachable",
                error.to_string(),
                config_error,
            ));
            return findings;
        }
    };
    let setting = |name: &'static str| {
        let client = &client;
        async move {
            client
                .query_one(&format!("SELECT current_setting('{name}')"), &[])
                .await
                .map(|row| row.get::<_, String>(0))
                .map_err(|e| postgres::query_error(pg, name, &e).to_string())
        }
    };
    match setting("server_version").await {
        Ok(version) => findings.push(Finding::ok(
            "postgres",
            "reachable",
            format!(
                "PostgreSQL {version} at {} (sslmode {})",
                postgres::describe(pg),
                pg.tls.mode.as_str()
            ),
        )),
        Err(error) => findings.push(Finding::fail("postgres", "reachable", error, false)),
    }
    let archive_mode = setting("archive_mode").await;
    let archiving = matches!(archive_mode.as_deref(), Ok("on" | "always"));
    findings.push(match archive_mode {
        Ok(_) if archiving => Finding::ok("postgres", "archive_mode", "on"),
        Ok(mode) => Finding::fail(
            "postgres",
            "archive_mode",
            format!("archive_mode is {mode}: set archive_mode = on (a restart is needed); without it there is no WAL archive and no point-in-time restore"),
            true,
        ),
        Err(error) => Finding::fail("postgres", "archive_mode", error, false),
    });
    findings.push(match setting("archive_command").await {
        Ok(command) if command.contains("gc-backup") && command.contains("wal-push") => {
            Finding::ok("postgres", "archive_command", command)
        }
        Ok(command) => Finding::fail(
            "postgres",
            "archive_command",
            format!("archive_command is '{command}', which does not run gc-backup wal-push %p"),
            true,
        ),
        Err(error) => Finding::fail("postgres", "archive_command", error, false),
    });
    if archiving {
        findings.push(switched_segment_arrives(config, store, &client).await);
    }
    if let Some(stream) = &pg.stream {
        findings.push(replication_session(config).await);
        findings.push(slot_state(&client, &stream.slot).await);
    }
    findings
}

/// `stream-wal`: a replication session opens (the role may replicate, `pg_hba.conf` lets it).
async fn replication_session(config: &Config) -> Finding {
    use crate::sources::postgres::replication::Replication;
    const CHECK: &str = "replication session";
    let opened = async {
        let mut session = Replication::connect(&config.postgres).await?;
        session.identify_system().await
    };
    match opened.await {
        Ok(identity) => Finding::ok(
            "postgres",
            CHECK,
            format!(
                "system {}, timeline {}, WAL flushed to {}",
                identity.system_id, identity.timeline, identity.flushed
            ),
        ),
        Err(error) => {
            let config_error = matches!(error, crate::sources::SourceError::Config(_));
            Finding::fail("postgres", CHECK, error.to_string(), config_error)
        }
    }
}

/// `stream-wal`: the replication slot, and how much WAL it holds back.
async fn slot_state(client: &tokio_postgres::Client, slot: &str) -> Finding {
    const CHECK: &str = "replication slot";
    let row = client
        .query_opt(
            "SELECT slot_type, active, wal_status, \
             pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::int8 \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await;
    let row = match row {
        Ok(Some(row)) => row,
        Ok(None) => {
            return Finding::warn(
                "postgres",
                CHECK,
                format!("{slot} does not exist yet: `gc-backup run` creates it when it starts"),
            );
        }
        Err(error) => return Finding::fail("postgres", CHECK, error.to_string(), false),
    };
    let kind: String = row.get(0);
    let active: bool = row.get(1);
    let wal_status: Option<String> = row.get(2);
    let retained = row
        .get::<_, Option<i64>>(3)
        .map_or_else(|| "no".to_string(), human_bytes);
    if kind != "physical" {
        return Finding::fail(
            "postgres",
            CHECK,
            format!("{slot} is a {kind} slot: set [postgres] slot-name to a free name"),
            true,
        );
    }
    match wal_status.as_deref() {
        Some("lost") => Finding::fail(
            "postgres",
            CHECK,
            format!(
                "{slot} was invalidated (max_slot_wal_keep_size): WAL it held is gone; the \
                 receiver creates it again and reports the gap"
            ),
            false,
        ),
        _ if !active => Finding::warn(
            "postgres",
            CHECK,
            format!(
                "{slot} is not in use: no receiver streams from it, and PostgreSQL keeps {retained} \
                 of WAL for it"
            ),
        ),
        status => Finding::ok(
            "postgres",
            CHECK,
            format!(
                "{slot} streaming, holds {retained} of WAL (wal_status {})",
                status.unwrap_or("unknown")
            ),
        ),
    }
}

fn human_bytes(bytes: i64) -> String {
    const MIB: f64 = 1024.0 * 1024.0;
    format!("{:.1} MiB", bytes as f64 / MIB)
}

/// Forces a segment switch and waits for that segment in this store: proof that the WAL of
/// this server reaches the archive the backups will be restored from.
async fn switched_segment_arrives(
    config: &Config,
    store: &Store,
    client: &tokio_postgres::Client,
) -> Finding {
    const CHECK: &str = "WAL reaches this store";
    // A little WAL first, so that the switch really ends a segment.
    let _ = client
        .execute(
            "SELECT pg_logical_emit_message(false, 'gc-backup', 'check')",
            &[],
        )
        .await;
    let name: String = match client
        .query_one("SELECT pg_walfile_name(pg_switch_wal())", &[])
        .await
    {
        Ok(row) => row.get(0),
        Err(error) => {
            return Finding::fail(
                "postgres",
                CHECK,
                crate::sources::postgres::query_error(&config.postgres, "pg_switch_wal()", &error)
                    .to_string(),
                false,
            );
        }
    };
    let Ok(file) = pitr::WalFile::parse(&name) else {
        return Finding::fail(
            "postgres",
            CHECK,
            format!("the server named its segment {name:?}"),
            false,
        );
    };
    let key = layout::wal_key(&file);
    let timeout = config
        .postgres
        .archive_timeout
        .unwrap_or(Duration::from_secs(300));
    let started = Instant::now();
    loop {
        match store.head(&key).await {
            Ok(_) => {
                return Finding::ok(
                    "postgres",
                    CHECK,
                    format!(
                        "{name} was archived into {} in {:.1}s",
                        store.name(),
                        started.elapsed().as_secs_f64()
                    ),
                );
            }
            Err(StoreError::NotFound { .. }) if started.elapsed() < timeout => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(StoreError::NotFound { .. }) => {
                return Finding::fail(
                    "postgres",
                    CHECK,
                    format!(
                        "{name} was not archived into {} within {}s (postgres.archive-timeout): \
                         archive_command stores somewhere else, or fails (see the server log \
                         and pg_stat_archiver)",
                        store.name(),
                        timeout.as_secs()
                    ),
                    true,
                );
            }
            Err(error) => {
                return Finding::fail("postgres", CHECK, error.to_string(), false);
            }
        }
    }
}

async fn redis_check(endpoint: &crate::sources::redis::RedisEndpoint) -> Finding {
    let answer = async {
        let mut session = crate::sources::redis::Session::open(endpoint).await?;
        session.server_version().await
    };
    match answer.await {
        Ok(version) => Finding::ok(
            "redis",
            "reachable",
            format!("Redis {version} at {endpoint}"),
        ),
        Err(error) => {
            let config_error = matches!(error, crate::sources::SourceError::Config(_));
            Finding::fail("redis", "reachable", error.to_string(), config_error)
        }
    }
}

async fn etcd_check(endpoints: &crate::sources::etcd::EtcdEndpoints) -> Finding {
    match crate::sources::etcd::Member::connect(endpoints).await {
        Ok(member) => Finding::ok(
            "etcd",
            "reachable",
            format!("etcd {} at {}", member.facts.version, member.facts.endpoint),
        ),
        Err(error) => {
            let config_error = matches!(error, crate::sources::SourceError::Config(_));
            Finding::fail("etcd", "reachable", error.to_string(), config_error)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_checksum_header_is_told_from_a_damaged_part() {
        let failed = |detail: &str| StoreError::Failed {
            store: "s3://b".into(),
            operation: "put",
            key: "k".into(),
            detail: detail.into(),
        };
        assert!(is_checksum_refusal(&failed(
            "Client error with status 400: InvalidArgument: x-amz-checksum-crc64nvme is not supported"
        )));
        assert!(is_checksum_refusal(&failed(
            "501 NotImplemented: Header 'x-amz-checksum-algorithm' with value 'CRC64NVME' not implemented"
        )));
        assert!(!is_checksum_refusal(&failed(
            "400 BadDigest: the CRC64NVME checksum you specified did not match"
        )));
        assert!(!is_checksum_refusal(&failed("connection refused")));
    }

    #[tokio::test]
    async fn a_local_store_passes_every_store_check_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config::resolve(
            crate::config::FileConfig::default(),
            &|name| (name == "GC_BACKUP_STORE").then(|| format!("file://{}", dir.path().display())),
            &crate::config::Overrides::default(),
        )
        .unwrap();
        let store = Store::open(&config.store, OpenMode::Existing).unwrap();
        let found = store_checks(&config, &store).await;
        let failed: Vec<_> = found
            .findings
            .iter()
            .filter(|f| f.status != Status::Ok)
            .collect();
        assert!(failed.is_empty(), "{failed:?}");
        let names: Vec<&str> = found.findings.iter().map(|f| f.check).collect();
        for check in [
            "access",
            "create-only PUT",
            "multipart upload",
            "multipart abort",
            "delete",
        ] {
            assert!(names.contains(&check), "{names:?}");
        }
        let left: Vec<_> = walk(dir.path());
        assert!(left.is_empty(), "probe objects left: {left:?}");
    }

    fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
        let mut files = Vec::new();
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            if entry.path().is_dir() {
                files.extend(walk(&entry.path()));
            } else {
                files.push(entry.path());
            }
        }
        files
    }
}
