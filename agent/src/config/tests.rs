use std::path::{Path, PathBuf};

use super::file::*;
use super::*;
use crate::catalog::Kind;
use std::collections::HashMap;

fn resolve_with(toml: &str, env: &[(&str, &str)], flags: Overrides) -> Result<Config, ConfigError> {
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
    assert!(matches!(&only_file.store.location, StoreLocation::S3(s) if s.bucket == "from-file"));
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
    use crate::sources::postgres::tls::SslMode;
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
    assert_eq!(file_only.urls.len(), 2);
    let (name, password) = file_only.user.as_ref().expect("a user");
    assert_eq!(name, "backup");
    assert_eq!(password.expose(), "from-file");

    let env = [
        ("ETCDCTL_ENDPOINTS", "https://a:2379, https://b:2379"),
        ("ETCDCTL_USER", "root:pw"),
        ("ETCDCTL_CACERT", "/ca.pem"),
        ("ETCDCTL_CERT", "/c.pem"),
        ("ETCDCTL_KEY", "/c.key"),
    ];
    let etcd = resolve_with(toml, &env, Overrides::default()).unwrap().etcd;
    assert_eq!(etcd.urls, ["https://a:2379", "https://b:2379"]);
    let (name, password) = etcd.user.as_ref().expect("a user");
    assert_eq!(name, "root");
    assert_eq!(password.expose(), "pw");
    assert_eq!(etcd.tls.ca_file, Some(PathBuf::from("/ca.pem")));
    assert_eq!(etcd.tls.key_file, Some(PathBuf::from("/c.key")));

    let ours = [
        ("GC_BACKUP_ETCD_ENDPOINTS", "http://c:2379"),
        ("ETCDCTL_ENDPOINTS", "http://d:2379"),
    ];
    let etcd = resolve_with("", &ours, Overrides::default()).unwrap().etcd;
    assert_eq!(etcd.urls, ["http://c:2379"]);
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
    let postgres_pod = configmap_toml(include_str!("../../../docker/k8s/configmap.yaml"));
    let config = resolve_with(&postgres_pod, &[], Overrides::default()).unwrap();
    assert!(config.schedule.pg_dump.is_some() && config.schedule.retention.is_some());
    assert_eq!(config.retention, DEFAULT_RETENTION);
    assert_eq!(config.metrics_listen.port(), 9188);
    assert!(config.postgres.pgdata.is_some());
    assert_eq!(config.etcd.urls.len(), 1);
    // Streaming, and a limit that holds the receiver, the archiver and both scheduled backups.
    assert!(config.postgres.stream.is_some());
    let plan = crate::pipeline::budget::sidecar(
        config.pipeline.memory_limit,
        true,
        true,
        2,
        pitr::DEFAULT_SEGMENT_SIZE as usize,
    )
    .unwrap();
    assert_eq!((plan.wal_uploads, plan.backups_at_once), (4, 2), "{plan:?}");

    let redis_pod = configmap_toml(include_str!("../../../docker/k8s/redis-deployment.yaml"));
    let config = resolve_with(&redis_pod, &[], Overrides::default()).unwrap();
    assert!(config.schedule.redis.is_some() && config.schedule.retention.is_none());
    assert_eq!(
        config.redis.aof_dir.as_deref(),
        Some(Path::new("/data/appendonlydir"))
    );

    let drill_pod = configmap_toml(include_str!(
        "../../../docker/k8s/restore-drill-deployment.yaml"
    ));
    let config = resolve_with(&drill_pod, &[], Overrides::default()).unwrap();
    assert!(config.schedule.drill.is_some() && config.schedule.pg_base.is_none());
    assert_eq!(
        config.drill.kinds,
        vec![Kind::PgBase, Kind::Redis, Kind::Etcd]
    );
    assert_eq!(
        config.drill.rto_bound.get(&Kind::PgBase),
        Some(&std::time::Duration::from_secs(7200))
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
        "az://",
        "az://Upper-Case",
        "azure://a.b.c",
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
fn azure_settings_come_from_the_file_or_the_azure_environment() {
    let toml = "[store]\nurl = \"azure://backups/prod\"\naccount = \"fromfile\"\n\
                account-key = \"file-key\"\n";
    let config = resolve_with(toml, &[], Overrides::default()).unwrap();
    let StoreLocation::Azure(az) = &config.store.location else {
        panic!("not azure: {:?}", config.store.location)
    };
    assert_eq!(
        (az.container.as_str(), az.prefix.as_str()),
        ("backups", "prod")
    );
    assert_eq!(az.account.as_deref(), Some("fromfile"));
    assert_eq!(az.access_key.as_ref().map(Secret::expose), Some("file-key"));
    assert_eq!(
        config.store.location.to_string(),
        "az://backups/prod in account fromfile"
    );
    let env = [
        ("GC_BACKUP_STORE", "az://backups"),
        ("AZURE_STORAGE_ACCOUNT_NAME", "fromenv"),
        ("AZURE_STORAGE_ACCOUNT_KEY", "env-key"),
        ("AZURE_STORAGE_ENDPOINT", "http://127.0.0.1:10000/fromenv"),
    ];
    let config = resolve_with(toml, &env, Overrides::default()).unwrap();
    let StoreLocation::Azure(az) = &config.store.location else {
        panic!("not azure")
    };
    assert_eq!(az.account.as_deref(), Some("fromenv"));
    assert_eq!(az.access_key.as_ref().map(Secret::expose), Some("env-key"));
    assert_eq!(
        config.store.location.to_string(),
        "az://backups at http://127.0.0.1:10000/fromenv"
    );
    assert!(!format!("{config:?}").contains("env-key"));
    // S3's endpoint variable is not Azure's.
    let env = [
        ("GC_BACKUP_STORE", "az://backups"),
        ("AWS_ENDPOINT_URL", "http://minio:9000"),
    ];
    let config = resolve_with("", &env, Overrides::default()).unwrap();
    assert!(!config.store.location.to_string().contains("minio"));
    // Object lock is S3's: refused in one line that says so.
    let locked = "[store]\nurl = \"az://backups\"\nobject-lock = \"compliance\"\n";
    let refused = resolve_with(locked, &[], Overrides::default()).unwrap_err();
    assert!(refused.to_string().contains("S3-only"), "{refused}");
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
    let text = include_str!("../../../docker/gc-backup.toml");
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
    assert_eq!(config.etcd.urls.len(), 1);
    assert!(config.etcd.tls.key_file.is_some());
    assert!(config.schedule.drill.is_some());
    assert_eq!(config.drill.kinds, vec![Kind::PgBase, Kind::Redis]);
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

#[test]
fn command_flags_beat_the_environment_and_endpoints_arrive_resolved() {
    let toml = r#"
        [postgres]
        pgdata = "/file/pgdata"
        [redis]
        url = "rediss://redis-file:6380"
        password = "from-file"
        ca-file = "/etc/redis/ca.pem"
        [etcd]
        endpoints = ["http://etcd-file:2379"]
    "#;
    let env = [
        ("PGDATA", "/env/pgdata"),
        ("GC_BACKUP_REDIS_CERT_FILE", "/run/redis/client.pem"),
    ];
    let from_file = resolve_with(toml, &env, Overrides::default()).unwrap();
    assert_eq!(
        from_file.postgres.pgdata.as_deref(),
        Some(Path::new("/env/pgdata"))
    );
    let redis = from_file.redis.endpoint().unwrap();
    assert_eq!(redis.to_string(), "rediss://redis-file:6380");
    assert_eq!(
        redis.password.as_ref().map(Secret::expose),
        Some("from-file")
    );
    let tls = redis.tls.as_ref().expect("rediss:// is TLS");
    assert_eq!(tls.ca_file.as_deref(), Some(Path::new("/etc/redis/ca.pem")));
    assert_eq!(
        tls.cert_file.as_deref(),
        Some(Path::new("/run/redis/client.pem"))
    );
    assert_eq!(
        from_file.etcd_endpoints().unwrap().urls,
        ["http://etcd-file:2379"]
    );

    let flags = Overrides {
        pgdata: Some("/flag/pgdata".into()),
        redis_url: Some("redis://:from-url@redis-flag:6379".into()),
        etcd_endpoints: Some("http://e1:2379,http://e2:2379".into()),
        ..Overrides::default()
    };
    let with_flags = resolve_with(toml, &env, flags).unwrap();
    assert_eq!(
        with_flags.postgres.pgdata.as_deref(),
        Some(Path::new("/flag/pgdata"))
    );
    let redis = with_flags.redis.endpoint().unwrap();
    assert_eq!(redis.to_string(), "redis://redis-flag:6379");
    assert_eq!(
        redis.password.as_ref().map(Secret::expose),
        Some("from-url")
    );
    assert_eq!(redis.tls, None);
    assert_eq!(with_flags.etcd.urls.len(), 2);

    let nothing = resolve_with("", &[], Overrides::default()).unwrap();
    assert!(
        nothing
            .redis
            .endpoint()
            .unwrap_err()
            .0
            .contains("--redis-url")
    );
    assert!(
        nothing
            .etcd_endpoints()
            .unwrap_err()
            .0
            .contains("--endpoints")
    );
    let bad = resolve_with(
        "",
        &[("GC_BACKUP_REDIS_URL", "http://x")],
        Overrides::default(),
    );
    assert!(bad.unwrap_err().0.contains("redis URL"));
    let no_password = resolve_with(
        "[etcd]\nendpoints = [\"http://e:2379\"]\nuser = \"backup\"\n",
        &[],
        Overrides::default(),
    );
    assert!(no_password.unwrap_err().0.contains("has no password"));
}

#[test]
fn the_configuration_remembers_how_to_start_this_binary_again() {
    let flags = Overrides {
        config_file: Some("relative.toml".into()),
        store_url: Some("s3://bucket/prefix".into()),
        ..Overrides::default()
    };
    let config = resolve_with("", &[], flags).unwrap();
    let env = config.child_env();
    let (name, file) = &env[0];
    assert_eq!(name, "GC_BACKUP_CONFIG");
    assert!(Path::new(file).is_absolute(), "{file}");
    assert!(file.ends_with("relative.toml"));
    assert_eq!(
        env[1],
        ("GC_BACKUP_STORE".into(), "s3://bucket/prefix".into())
    );
    let from_env = resolve_with(
        "",
        &[("GC_BACKUP_CONFIG", "/etc/gc-backup.toml")],
        Overrides::default(),
    )
    .unwrap();
    assert_eq!(
        from_env.child_env(),
        [(
            "GC_BACKUP_CONFIG".to_string(),
            "/etc/gc-backup.toml".to_string()
        )]
    );
}

#[test]
fn wal_prefetch_is_on_unless_the_environment_turns_it_off() {
    assert!(
        resolve_with("", &[], Overrides::default())
            .unwrap()
            .wal_prefetch
    );
    for off in ["0", "off", "FALSE", "no"] {
        let config = resolve_with("", &[("GC_BACKUP_WAL_PREFETCH", off)], Overrides::default());
        assert!(!config.unwrap().wal_prefetch, "{off}");
    }
    let on = resolve_with("", &[("GC_BACKUP_WAL_PREFETCH", "1")], Overrides::default());
    assert!(on.unwrap().wal_prefetch);
}

#[test]
fn numbers_from_the_environment_that_are_not_numbers_name_their_variable() {
    for name in ["GC_BACKUP_ZSTD_LEVEL", "GC_BACKUP_PARALLEL_UPLOADS"] {
        let error = resolve_with("", &[(name, "three")], Overrides::default()).unwrap_err();
        assert_eq!(error.0, format!("{name} 'three' is not a number"));
    }
    let config = resolve_with(
        "",
        &[("GC_BACKUP_PARALLEL_UPLOADS", "2")],
        Overrides::default(),
    );
    assert_eq!(config.unwrap().pipeline.parallel_uploads, 2);
}

#[test]
fn encryption_object_lock_and_as_of_resolve_and_reach_the_restore_command() {
    let identity = age::x25519::Identity::generate();
    let recipient = identity.to_public().to_string();
    let config = resolve_with(
        &format!(
            "[store]\nurl = \"s3://bucket/p\"\nobject-lock = \"compliance\"\n\
             [encryption]\nrecipients = [\"{recipient}\"]\nidentity-file = \"key.txt\"\n"
        ),
        &[],
        Overrides {
            as_of: Some("2026-01-15 10:30:00+09".into()),
            ..Overrides::default()
        },
    )
    .unwrap();
    assert_eq!(
        config.encryption.recipients.as_ref().unwrap().names(),
        std::slice::from_ref(&recipient)
    );
    assert!(config.encryption.identity_files[0].is_absolute());
    let lock = config.store.object_lock.unwrap();
    assert_eq!(lock.mode, LockMode::Compliance);
    assert_eq!(lock.margin, chrono::TimeDelta::days(7));
    let as_of = config.as_of.unwrap();
    assert_eq!(as_of.to_rfc3339(), "2026-01-15T01:30:00+00:00");
    let env: HashMap<String, String> = config.child_env().into_iter().collect();
    assert_eq!(env["GC_BACKUP_AS_OF"], "2026-01-15T01:30:00Z");
    assert!(env["GC_BACKUP_AGE_IDENTITY_FILE"].ends_with("/key.txt"));

    // The environment's comma-separated lists win over the file.
    let from_env = resolve_with(
        "[encryption]\nidentity-file = [\"a\", \"b\"]\n",
        &[
            (
                "GC_BACKUP_AGE_RECIPIENTS",
                &format!("{recipient}, {recipient}"),
            ),
            ("GC_BACKUP_AGE_IDENTITY_FILE", "/k/one,/k/two"),
        ],
        Overrides::default(),
    )
    .unwrap();
    assert_eq!(from_env.encryption.recipients.unwrap().names().len(), 2);
    assert_eq!(
        from_env.encryption.identity_files,
        [PathBuf::from("/k/one"), PathBuf::from("/k/two")]
    );
}

#[test]
fn bad_encryption_lock_and_as_of_settings_are_refused_with_their_key() {
    let refused = |toml: &str, env: &[(&str, &str)], as_of: Option<&str>| {
        let flags = Overrides {
            as_of: as_of.map(String::from),
            ..Overrides::default()
        };
        resolve_with(toml, env, flags).unwrap_err().to_string()
    };
    let error = refused("[encryption]\nrecipients = [\"age1nope\"]\n", &[], None);
    assert!(error.contains("not an age public key"), "{error}");
    let error = refused("", &[("GC_BACKUP_OBJECT_LOCK", "forever")], None);
    assert!(
        error.contains("not governance, compliance or off"),
        "{error}"
    );
    let error = refused(
        "[store]\nurl = \"file:///var/backups\"\nobject-lock = \"governance\"\n",
        &[],
        None,
    );
    assert!(error.contains("has no object lock"), "{error}");
    let error = refused("", &[], Some("2999-01-01T00:00:00Z"));
    assert!(error.contains("in the future"), "{error}");
    let error = refused("", &[("GC_BACKUP_AS_OF", "2026-01-15 10:30")], None);
    assert!(error.contains("--as-of"), "{error}");
}

#[test]
fn wal_streaming_is_off_until_asked_for_and_its_settings_are_checked() {
    let off = resolve_with("", &[], Overrides::default()).unwrap();
    assert_eq!(off.postgres.stream, None);
    let file =
        "[postgres]\nstream-wal = true\nslot-name = \"sidecar_1\"\nstream-flush = \"500ms\"\n";
    let on = resolve_with(file, &[], Overrides::default()).unwrap();
    assert_eq!(
        on.postgres.stream,
        Some(crate::config::resolved::WalStreamConfig {
            slot: "sidecar_1".into(),
            flush: std::time::Duration::from_millis(500),
        })
    );
    // The environment wins over the file, both ways.
    let env_off = resolve_with(
        file,
        &[("GC_BACKUP_STREAM_WAL", "false")],
        Overrides::default(),
    );
    assert_eq!(env_off.unwrap().postgres.stream, None);
    let env_on = resolve_with("", &[("GC_BACKUP_STREAM_WAL", "1")], Overrides::default()).unwrap();
    assert_eq!(env_on.postgres.stream.unwrap().slot, "gc_backup");
    for (name, value, needle) in [
        ("GC_BACKUP_STREAM_WAL", "sometimes", "is not true or false"),
        ("GC_BACKUP_SLOT_NAME", "Gc-Backup", "is not a slot name"),
        ("GC_BACKUP_STREAM_FLUSH", "10ms", "outside 100ms..=60s"),
        ("GC_BACKUP_STREAM_FLUSH", "soon", "is not a duration"),
    ] {
        let error = resolve_with("", &[(name, value)], Overrides::default()).unwrap_err();
        assert!(error.0.contains(needle), "{name}={value}: {}", error.0);
    }
}

#[test]
fn a_drill_restores_what_the_sidecar_backs_up_unless_told_which_kinds() {
    let kinds = |toml: &str, env: &[(&str, &str)]| {
        resolve_with(toml, env, Overrides::default())
            .unwrap()
            .drill
            .kinds
    };
    assert_eq!(kinds("", &[]), Vec::<Kind>::new());
    assert_eq!(
        kinds(
            "[schedule]\npg-base-incremental = \"0 * * * *\"\nredis = \"*/5 * * * *\"\n",
            &[]
        ),
        vec![Kind::PgBase, Kind::Redis]
    );
    // A point backs up Redis, and etcd only where etcd is configured.
    assert_eq!(
        kinds("[schedule]\nmark = \"0 1 * * *\"\n", &[]),
        vec![Kind::Redis]
    );
    assert_eq!(
        kinds(
            "[schedule]\nmark = \"0 1 * * *\"\n",
            &[("ETCDCTL_ENDPOINTS", "http://127.0.0.1:2379")]
        ),
        vec![Kind::Redis, Kind::Etcd]
    );
    let config = resolve_with(
        "[drill]\nkinds = [\"etcd\", \"pg-base\", \"etcd\"]\n[drill.rto-bound]\npg-base = \"2h\"\nredis = \"90s\"\n",
        &[],
        Overrides::default(),
    )
    .unwrap();
    assert_eq!(config.drill.kinds, vec![Kind::Etcd, Kind::PgBase]);
    assert_eq!(
        config.drill.rto_bound.get(&Kind::PgBase),
        Some(&std::time::Duration::from_secs(7200))
    );
    assert_eq!(
        config.drill.rto_bound.get(&Kind::Redis),
        Some(&std::time::Duration::from_secs(90))
    );
    for (toml, needle) in [
        ("[drill]\nkinds = [\"pg-dump\"]\n", "drill.kinds: 'pg-dump'"),
        (
            "[drill.rto-bound]\nmysql = \"1h\"\n",
            "drill.rto-bound.mysql",
        ),
        (
            "[drill.rto-bound]\nredis = \"soon\"\n",
            "drill.rto-bound.redis",
        ),
        ("[schedule]\ndrill = \"every sunday\"\n", "schedule.drill"),
    ] {
        let error = resolve_with(toml, &[], Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(error.contains(needle), "{toml}: {error}");
    }
}

#[test]
fn rates_are_bytes_per_second_from_the_file_or_the_environment() {
    let toml = "[pipeline]\nmax-upload-rate = \"50MiB/s\"\nmax-download-rate = \"1GiB\"\n";
    let config = resolve_with(toml, &[], Overrides::default()).unwrap();
    assert_eq!(config.max_upload_rate, Some(50 * MIB as u64));
    assert_eq!(config.max_download_rate, Some(1024 * MIB as u64));
    let env = [("GC_BACKUP_MAX_UPLOAD_RATE", "20MiB/s")];
    let config = resolve_with(toml, &env, Overrides::default()).unwrap();
    assert_eq!(config.max_upload_rate, Some(20 * MIB as u64));
    assert_eq!(
        resolve_with("", &[], Overrides::default())
            .unwrap()
            .max_upload_rate,
        None
    );
    for (bad, needle) in [
        ("512KiB/s", "below 1MiB/s"),
        ("fast", "pipeline.max-upload-rate"),
        ("50MiB/h", "unknown unit"),
    ] {
        let toml = format!("[pipeline]\nmax-upload-rate = \"{bad}\"\n");
        let error = resolve_with(&toml, &[], Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(error.contains(needle), "{bad}: {error}");
    }
}
