//! `gc-backup run` as the sidecar, with schedules of seconds: it takes backups on time, never
//! overlaps runs of a kind (a late one is counted as skipped), exports metrics that pass
//! `promtool check metrics`, turns not-ready while the store is down and ready again when it
//! returns, and stops cleanly on SIGTERM.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use harness::daemon::{Daemon, get, sample, wait_for};
use harness::etcd::Etcd;
use harness::redis::Redis;
use harness::{Agent, Seaweed};

#[test]
fn the_sidecar_schedules_backups_exports_metrics_and_follows_the_store() {
    let mut weed = Seaweed::start();
    let redis = Redis::start(true);
    redis.populate(200);
    // Each Redis snapshot waits 3 s for more replicas, so a 1 s schedule must skip.
    redis.cli(&["CONFIG", "SET", "repl-diskless-sync-delay", "3"]);
    let etcd = Etcd::start();
    etcd.populate(20, 32);

    let mut agent = Agent::for_store(&weed, "daemon");
    agent.set("GC_BACKUP_REDIS_URL", &redis.url());
    agent.set("GC_BACKUP_ETCD_ENDPOINTS", &etcd.endpoint());
    agent.with_config("[schedule]\nredis = \"* * * * * *\"\netcd = \"*/2 * * * * *\"\nretention = \"*/3 * * * * *\"\n");

    let mut daemon = Daemon::start(&agent);
    assert_eq!(get(daemon.port, "/health/ready").0, 200);
    wait_for("two etcd and two redis backups", 60, || {
        let listed = agent.list_json();
        let count = |kind: &str| listed.iter().filter(|e| e["kind"] == kind).count();
        count("etcd") >= 2 && count("redis") >= 2
    });
    let metrics = daemon.metrics();
    assert!(
        sample(
            &metrics,
            r#"gc_backup_runs_total{kind="etcd",result="success"}"#
        ) >= 2.0,
        "{metrics}"
    );
    assert!(
        sample(
            &metrics,
            r#"gc_backup_runs_total{kind="redis",result="success"}"#
        ) >= 2.0,
        "{metrics}"
    );
    assert!(
        sample(
            &metrics,
            r#"gc_backup_runs_total{kind="redis",result="skipped"}"#
        ) >= 1.0,
        "a 1 s schedule of 3 s runs must skip: {metrics}"
    );
    assert_eq!(
        sample(
            &metrics,
            r#"gc_backup_runs_total{kind="etcd",result="failure"}"#
        ),
        0.0
    );
    let now = chrono::Utc::now().timestamp() as f64;
    let last_etcd = sample(
        &metrics,
        r#"gc_backup_last_success_timestamp_seconds{kind="etcd"}"#,
    );
    assert!(
        (now - last_etcd).abs() < 30.0,
        "etcd last success {last_etcd}, now {now}"
    );
    assert!(sample(&metrics, r#"gc_backup_last_size_bytes{kind="redis"}"#) > 0.0);
    assert!(
        sample(
            &metrics,
            r#"gc_backup_bytes_total{kind="etcd",stage="raw"}"#
        ) > 0.0
    );
    assert!(
        sample(&metrics, "gc_backup_retention_last_run_timestamp_seconds") > 0.0,
        "{metrics}"
    );
    assert!(sample(&metrics, "gc_backup_start_time_seconds") > 0.0);
    let rss = sample(&metrics, "gc_backup_peak_rss_bytes");
    assert!(
        rss > 1e6 && rss < 64.0 * 1024.0 * 1024.0,
        "peak RSS {rss} against the 64 MiB default limit"
    );

    // The exposition is valid Prometheus text, names and help included.
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (scripts/test installs the prometheus package)");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(metrics.as_bytes())
        .unwrap();
    let checked = promtool.wait_with_output().unwrap();
    assert!(
        checked.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );

    // The store goes away: not ready, and backups fail (counted); it returns: ready again.
    weed.kill();
    wait_for("not ready", 20, || {
        get(daemon.port, "/health/ready").0 == 503
    });
    let (_, reason) = get(daemon.port, "/health/ready");
    assert!(reason.contains("store"), "{reason}");
    assert_eq!(
        get(daemon.port, "/health").0,
        200,
        "alive while the store is down"
    );
    wait_for("a failed etcd run", 60, || {
        sample(
            &daemon.metrics(),
            r#"gc_backup_runs_total{kind="etcd",result="failure"}"#,
        ) >= 1.0
    });
    assert!(
        sample(
            &daemon.metrics(),
            r#"gc_backup_last_failure_timestamp_seconds{kind="etcd"}"#
        ) > 0.0
    );
    weed.restart();
    wait_for("ready again", 30, || {
        get(daemon.port, "/health/ready").0 == 200
    });

    let (status, took) = daemon.terminate();
    assert!(status.success(), "exit after SIGTERM: {status:?}");
    assert!(took < Duration::from_secs(12), "SIGTERM took {took:?}");
    // Whatever was in flight was aborted: every listed backup is whole.
    agent.ok(&["verify"]);
}

#[test]
fn the_sidecar_beside_postgresql_archives_wal_takes_both_backups_and_watches_postgres() {
    let weed = Seaweed::start();
    let (pg, _) = harness::archiving_cluster(&weed, "sidecar");
    let mut agent = Agent::for_cluster(&pg, &weed, "sidecar");
    agent.with_config("[schedule]\npg-dump = \"*/2 * * * * *\"\npg-base = \"*/3 * * * * *\"\n");

    let mut daemon = Daemon::start(&agent);
    assert_eq!(get(daemon.port, "/health/ready").0, 200);
    pg.psql(
        "postgres",
        "CREATE TABLE t AS SELECT generate_series(1, 10000) AS n",
    );
    for _ in 0..3 {
        pg.psql("postgres", "SELECT pg_switch_wal()");
    }
    wait_for("a pg-dump and a pg-base backup", 90, || {
        let listed = agent.list_json();
        let count = |kind: &str| listed.iter().filter(|e| e["kind"] == kind).count();
        count("pg-dump") >= 1 && count("pg-base") >= 1
    });
    wait_for("the archiver's metrics", 30, || {
        sample(
            &daemon.metrics(),
            "gc_backup_wal_last_archived_timestamp_seconds",
        ) > 0.0
    });
    let metrics = daemon.metrics();
    assert!(
        metrics.contains("gc_backup_wal_pending_segments "),
        "{metrics}"
    );
    assert!(
        metrics.contains("gc_backup_wal_archive_failures_total "),
        "{metrics}"
    );
    assert!(
        sample(
            &metrics,
            r#"gc_backup_runs_total{kind="pg-base",result="success"}"#
        ) >= 1.0
    );

    // PostgreSQL goes away: not ready, saying why; the process stays alive.
    pg.stop("fast");
    wait_for("not ready", 20, || {
        get(daemon.port, "/health/ready").0 == 503
    });
    let (_, reason) = get(daemon.port, "/health/ready");
    assert!(reason.contains("postgres"), "{reason}");
    assert_eq!(get(daemon.port, "/health").0, 200);

    let (status, _) = daemon.terminate();
    assert!(status.success(), "exit after SIGTERM: {status:?}");
    agent.ok(&["verify", "--kind", "pg-dump"]);
}

#[test]
fn the_sidecar_marks_points_on_its_schedule() {
    let weed = Seaweed::start();
    let (pg, _) = harness::archiving_cluster(&weed, "marks");
    let redis = Redis::start(false);
    let mut agent =
        Agent::for_cluster(&pg, &weed, "marks").with("GC_BACKUP_REDIS_URL", &redis.url());
    agent.with_config("[schedule]\nmark = \"*/4 * * * * *\"\n");
    let mut daemon = Daemon::start(&agent);
    wait_for("a scheduled point", 90, || {
        agent
            .ok(&["list", "--kind", "point"])
            .contains("'scheduled-")
    });
    wait_for("the point's run in the metrics", 30, || {
        sample(
            &daemon.metrics(),
            r#"gc_backup_runs_total{kind="point",result="success"}"#,
        ) >= 1.0
    });
    assert!(
        sample(
            &daemon.metrics(),
            r#"gc_backup_last_success_timestamp_seconds{kind="point"}"#
        ) > 0.0
    );
    let (status, _) = daemon.terminate();
    assert!(status.success(), "exit after SIGTERM: {status:?}");
    // Every point names a Redis backup that is in the store.
    let listed = agent.list_json();
    for point in listed.iter().filter(|e| e["kind"] == "point") {
        let redis_id = &point["redis"]["id"];
        assert!(
            listed
                .iter()
                .any(|e| e["kind"] == "redis" && e["id"] == *redis_id),
            "{point}"
        );
    }
}

/// The drills' temporary directories left in `tmp`.
fn drill_dirs(tmp: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(tmp)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("gc-backup-drill-"))
        .collect()
}

#[test]
fn the_sidecar_drills_every_kind_on_its_schedule_exports_the_rto_and_stops_mid_drill() {
    let weed = Seaweed::start();
    let (pg, _) = harness::archiving_cluster(&weed, "drills");
    pg.psql("postgres", "CREATE TABLE t AS SELECT 1 AS n");
    let redis = Redis::start(false);
    redis.cli(&["SET", "k", "v"]);
    let etcd = Etcd::start();
    etcd.put("/k", "v");
    // Where the drills restore to: PostgreSQL (run as its own user) must reach it.
    let tmp = harness::shared_temp_dir("drill-tmp");
    let mut agent = Agent::for_cluster(&pg, &weed, "drills")
        .with("GC_BACKUP_REDIS_URL", &redis.url())
        .with("GC_BACKUP_ETCD_ENDPOINTS", &etcd.endpoint())
        .with("TMPDIR", tmp.path().to_str().unwrap());
    agent.backup(&["backup", "pg-base"]);
    agent.backup(&["backup", "redis"]);
    agent.backup(&["backup", "etcd"]);
    let histories = || {
        weed.keys("drills/wal")
            .into_iter()
            .filter(|k| k.contains(".history"))
            .count()
    };
    agent.with_config(
        "[schedule]\ndrill = \"*/2 * * * * *\"\n\
         [drill]\nkinds = [\"redis\", \"etcd\", \"pg-base\"]\n\
         [drill.rto-bound]\npg-base = \"2h\"\nredis = \"10m\"\n",
    );
    let mut daemon = Daemon::start(&agent);
    let series =
        |name: &str, kind: &str| sample(&daemon.metrics(), &format!("{name}{{kind=\"{kind}\"}}"));
    // Exported from the start: never drilled yet is the oldest success.
    assert_eq!(
        series("gc_backup_drill_last_success_timestamp_seconds", "pg-base"),
        0.0
    );
    assert_eq!(
        series("gc_backup_drill_rto_bound_seconds", "pg-base"),
        7200.0
    );
    assert_eq!(series("gc_backup_drill_rto_bound_seconds", "redis"), 600.0);
    wait_for("a drill of every kind", 180, || {
        ["redis", "etcd", "pg-base"]
            .iter()
            .all(|kind| series("gc_backup_drill_last_success_timestamp_seconds", kind) > 0.0)
    });
    let metrics = daemon.metrics();
    for kind in ["redis", "etcd", "pg-base"] {
        let rto = sample(
            &metrics,
            &format!("gc_backup_drill_rto_seconds{{kind=\"{kind}\"}}"),
        );
        assert!(rto > 0.0, "{kind}: {metrics}");
        assert_eq!(
            sample(
                &metrics,
                &format!("gc_backup_drill_failures_total{{kind=\"{kind}\"}}")
            ),
            0.0,
            "{metrics}"
        );
    }
    assert!(
        sample(
            &metrics,
            r#"gc_backup_runs_total{kind="drill",result="success"}"#
        ) >= 1.0,
        "{metrics}"
    );
    // The drills' servers promoted and loaded; none of it reached the store.
    assert_eq!(histories(), 0, "a drill archived a timeline");

    // SIGTERM in the middle of a PostgreSQL drill: it gives up, its server and directory go.
    wait_for("a pg-base drill in progress", 120, || {
        drill_dirs(tmp.path())
            .iter()
            .any(|name| name.starts_with("gc-backup-drill-pg-base-"))
    });
    let (status, _) = daemon.terminate();
    assert!(status.success(), "exit after SIGTERM: {status:?}");
    // Stopped by the shutdown, not failed: one warning, no error line to page anyone.
    let log = std::fs::read_to_string(agent.home().join("daemon.log")).unwrap();
    assert!(log.contains("run interrupted by shutdown"), "{log}");
    assert!(!log.contains("run failed"), "{log}");
    assert_eq!(drill_dirs(tmp.path()), Vec::<String>::new());
    let servers = Command::new("pgrep")
        .args(["-f", &tmp.path().to_string_lossy()])
        .output()
        .unwrap();
    assert!(
        servers.stdout.is_empty(),
        "a drill's process outlived the sidecar: {}",
        String::from_utf8_lossy(&servers.stdout)
    );
    assert_eq!(histories(), 0, "a drill archived a timeline");
}

#[test]
fn a_drill_of_a_damaged_backup_fails_and_is_counted() {
    let weed = Seaweed::start();
    let redis = Redis::start(false);
    redis.cli(&["SET", "k", "v"]);
    let mut agent =
        Agent::for_store(&weed, "damaged-drill").with("GC_BACKUP_REDIS_URL", &redis.url());
    let id = agent.backup(&["backup", "redis"]);
    let object = weed
        .keys(&format!("damaged-drill/data/redis/{id}"))
        .into_iter()
        .find(|k| k.ends_with("dump.rdb.zst"))
        .unwrap();
    weed.flip_byte(&object);
    agent.with_config("[schedule]\ndrill = \"*/2 * * * * *\"\n[drill]\nkinds = [\"redis\"]\n");
    let mut daemon = Daemon::start(&agent);
    wait_for("a failed drill", 60, || {
        sample(
            &daemon.metrics(),
            r#"gc_backup_drill_failures_total{kind="redis"}"#,
        ) >= 1.0
    });
    let metrics = daemon.metrics();
    assert_eq!(
        sample(
            &metrics,
            r#"gc_backup_drill_last_success_timestamp_seconds{kind="redis"}"#
        ),
        0.0,
        "{metrics}"
    );
    assert!(
        sample(
            &metrics,
            r#"gc_backup_runs_total{kind="drill",result="failure"}"#
        ) >= 1.0,
        "{metrics}"
    );
    let (status, _) = daemon.terminate();
    assert!(status.success(), "exit after SIGTERM: {status:?}");
}

/// The drill Deployment (docker/k8s) runs with the restore identity, which can read and list
/// the bucket and nothing else: a sidecar that only drills must work with it, and write nothing.
#[test]
fn a_sidecar_that_only_drills_works_with_credentials_that_cannot_write() {
    let weed = Seaweed::start();
    let (pg, _) = harness::archiving_cluster(&weed, "drill-ro");
    pg.psql("postgres", "CREATE TABLE t AS SELECT 1 AS n");
    let redis = Redis::start(false);
    redis.cli(&["SET", "k", "v"]);
    let writer =
        Agent::for_cluster(&pg, &weed, "drill-ro").with("GC_BACKUP_REDIS_URL", &redis.url());
    writer.backup(&["backup", "pg-base"]);
    writer.backup(&["backup", "redis"]);

    // Neither PGDATA nor a PostgreSQL to back up: only the store, as the restore identity.
    let tmp = harness::shared_temp_dir("drill-ro-tmp");
    let mut reader = Agent::for_store(&weed, "drill-ro")
        .with("AWS_ACCESS_KEY_ID", harness::READER_ACCESS_KEY)
        .with("AWS_SECRET_ACCESS_KEY", harness::READER_SECRET_KEY)
        .with("TMPDIR", tmp.path().to_str().unwrap());
    let refused = reader
        .clone_with("GC_BACKUP_REDIS_URL", &redis.url())
        .run(&["backup", "redis"]);
    assert!(!refused.status.success(), "the reader could write a backup");
    // Production's archive_command goes on storing WAL beside the drills: the rest is compared.
    let backups = || {
        let mut keys = weed.keys("drill-ro");
        keys.retain(|key| !key.starts_with("drill-ro/wal/") || key.ends_with(".history"));
        keys
    };
    let stored = backups();

    reader.with_config(
        "[schedule]\ndrill = \"*/2 * * * * *\"\n[drill]\nkinds = [\"redis\", \"pg-base\"]\n",
    );
    let mut daemon = Daemon::start(&reader);
    wait_for("a drill of both kinds", 180, || {
        let metrics = daemon.metrics();
        ["redis", "pg-base"].iter().all(|kind| {
            sample(
                &metrics,
                &format!("gc_backup_drill_last_success_timestamp_seconds{{kind=\"{kind}\"}}"),
            ) > 0.0
        })
    });
    assert_eq!(get(daemon.port, "/health/ready").0, 200);
    let metrics = daemon.metrics();
    assert_eq!(
        sample(
            &metrics,
            r#"gc_backup_drill_failures_total{kind="pg-base"}"#
        ),
        0.0,
        "{metrics}"
    );
    let (status, _) = daemon.terminate();
    assert!(status.success(), "exit after SIGTERM: {status:?}");
    let log = std::fs::read_to_string(reader.home().join("daemon.log")).unwrap();
    assert!(!log.contains("ERROR"), "{log}");
    assert!(log.contains("only drills"), "{log}");
    assert_eq!(backups(), stored, "a drill wrote to the store");
}

#[test]
fn a_scheduled_kind_without_its_settings_is_refused_at_start() {
    let mut agent = Agent::new(Vec::new());
    let store = agent.home().join("store");
    for (schedule, needle) in [
        ("redis", "no Redis to back up"),
        ("etcd", "no etcd to back up"),
        ("mark", "schedule.mark is set"),
        ("drill", "nothing to drill"),
        (
            "pg-base",
            "schedule.pg-base is set but the data directory is not",
        ),
    ] {
        let config = agent.with_config(&format!(
            "[store]\nurl = \"file://{}\"\n[schedule]\n{schedule} = \"0 2 * * *\"\n",
            store.display()
        ));
        // Through --config, as a Job would give it.
        let output = agent.run(&["--config", config.to_str().unwrap(), "run"]);
        harness::assert_fails(&output, 2, needle);
    }
}

#[test]
fn a_scheduled_kind_never_backed_up_is_exported_as_the_oldest_success() {
    let mut agent = Agent::new(Vec::new());
    let store = agent.home().join("store");
    // Redis once a year: it is scheduled, and nothing has ever been backed up.
    agent.with_config(&format!(
        "[store]\nurl = \"file://{}\"\n[redis]\nurl = \"redis://127.0.0.1:1\"\n\
         [schedule]\nredis = \"0 0 1 1 *\"\n",
        store.display()
    ));
    let daemon = Daemon::start(&agent);
    let series = r#"gc_backup_last_success_timestamp_seconds{kind="redis"}"#;
    wait_for("the redis series", 30, || {
        daemon
            .metrics()
            .lines()
            .any(|line| line.starts_with(series))
    });
    let metrics = daemon.metrics();
    assert!(
        metrics.lines().any(|line| line == format!("{series} 0")),
        "{metrics}"
    );
    // A kind that is not scheduled has no series: nobody expects it.
    assert!(
        !metrics.contains(r#"gc_backup_last_success_timestamp_seconds{kind="pg-dump"}"#),
        "{metrics}"
    );
}

#[test]
fn the_sidecar_is_ready_over_tls_with_verify_full_and_says_why_not_with_another_ca() {
    let weed = Seaweed::start();
    let (pg, _) = harness::archiving_cluster(&weed, "sidecar-tls");
    let certs = harness::shared_temp_dir("pgtls");
    let ca = pg.require_tls(certs.path());
    let mut agent = Agent::for_cluster(&pg, &weed, "sidecar-tls");
    agent.set("PGHOST", "localhost");
    agent.set("PGSSLMODE", "verify-full");
    agent.set("PGSSLROOTCERT", ca.to_str().unwrap());
    // Each probe opens a new TLS connection within 3 s; on a loaded CI machine one may miss
    // that (seen: "postgres: no answer within 3s"), and kubelet probes again: so does this.
    let daemon = Daemon::start(&agent);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = get(daemon.port, "/health/ready");
        if status == 200 {
            break;
        }
        assert!(
            body.contains("no answer within") && std::time::Instant::now() < deadline,
            "not ready over TLS: {status} {body}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    drop(daemon);

    let other = harness::shared_temp_dir("othertls");
    harness::private_ca(other.path());
    agent.set(
        "PGSSLROOTCERT",
        other.path().join("ca.pem").to_str().unwrap(),
    );
    let daemon = Daemon::start(&agent);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = get(daemon.port, "/health/ready");
        assert_eq!(
            status, 503,
            "ready with a CA that did not sign the server's: {body}"
        );
        if body.contains("no answer within") && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(500));
            continue;
        }
        assert!(
            body.contains("postgres") && body.contains("PGSSLROOTCERT"),
            "{body}"
        );
        break;
    }
}

#[test]
fn a_memory_limit_too_small_is_refused_with_what_it_needs() {
    let mut agent = Agent::new(Vec::new());
    agent.set(
        "GC_BACKUP_STORE",
        &format!("file://{}", agent.home().display()),
    );
    agent.set("GC_BACKUP_MEMORY_LIMIT", "16MiB");
    let output = agent.run(&["list"]);
    harness::assert_fails(&output, 2, "pipeline.memory-limit 16 MiB is too small");

    // The sidecar also archives: 40 MiB holds a backup, not a backup and a WAL segment.
    let pgdata = agent.home().join("pgdata");
    std::fs::create_dir_all(pgdata.join("pg_wal/archive_status")).unwrap();
    agent.set("PGDATA", pgdata.to_str().unwrap());
    agent.with_config("[schedule]\npg-base = \"0 3 * * *\"\n");
    agent.set("GC_BACKUP_MEMORY_LIMIT", "40MiB");
    let output = agent.run(&["run"]);
    harness::assert_fails(&output, 2, "too small for the sidecar");
}
