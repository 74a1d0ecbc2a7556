//! `gc-backup check` against real servers: everything in order (SeaweedFS, a cluster that
//! archives through gc-backup, Redis, etcd) exits 0 with every check passed and no probe
//! left in the store; wrong credentials and a missing bucket exit 2; a cluster whose WAL goes
//! elsewhere fails the archiving checks; an unreachable server is named.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use harness::etcd::Etcd;
use harness::redis::Redis;
use harness::{Agent, Postgres, Seaweed, archiving_cluster};

fn findings(agent: &Agent) -> (Option<i32>, Vec<serde_json::Value>, String) {
    let output = agent.run(&["check", "--json"]);
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    let parsed = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("check --json printed no JSON ({e}):\n{stderr}"));
    (output.status.code(), parsed, stderr)
}

fn status_of<'a>(found: &'a [serde_json::Value], check: &str) -> &'a str {
    found
        .iter()
        .find(|f| f["check"] == check)
        .unwrap_or_else(|| panic!("no {check} in {found:?}"))["status"]
        .as_str()
        .unwrap()
}

#[test]
fn a_sound_deployment_passes_every_check_and_leaves_no_probe() {
    let weed = Seaweed::start();
    let (pg, config) = archiving_cluster(&weed, "check");
    let redis = Redis::start(true);
    let etcd = Etcd::start();
    let mut agent = Agent::for_cluster(&pg, &weed, "check");
    agent.set("GC_BACKUP_CONFIG", config.to_str().unwrap());
    agent.set("GC_BACKUP_REDIS_URL", &redis.url());
    agent.set("GC_BACKUP_ETCD_ENDPOINTS", &etcd.endpoint());

    let (code, found, stderr) = findings(&agent);
    assert_eq!(code, Some(0), "{found:#?}\n{stderr}");
    for check in [
        "access",
        "create-only PUT",
        "multipart upload",
        "part checksum",
        "multipart abort",
        "delete",
        "versioning and object lock",
        "archive_mode",
        "archive_command",
        "WAL reaches this store",
    ] {
        assert_eq!(status_of(&found, check), "ok", "{check}: {found:#?}");
    }
    let areas: Vec<&str> = found.iter().map(|f| f["area"].as_str().unwrap()).collect();
    assert!(
        areas.contains(&"redis") && areas.contains(&"etcd"),
        "{areas:?}"
    );
    assert!(found.iter().all(|f| f["status"] == "ok"), "{found:#?}");
    assert!(
        weed.keys("check/check").is_empty(),
        "{:?}",
        weed.keys("check/check")
    );

    // The same for people: a table.
    let table = agent.ok(&["check"]);
    assert!(
        table
            .lines()
            .any(|l| l.contains("create-only PUT") && l.contains(" ok ")),
        "{table}"
    );
}

#[test]
fn wrong_credentials_and_a_missing_bucket_are_configuration_errors() {
    let weed = Seaweed::start();
    let mut agent = Agent::for_store(&weed, "creds");
    agent.set("AWS_SECRET_ACCESS_KEY", "wrong");
    let (code, found, stderr) = findings(&agent);
    assert_eq!(code, Some(2), "{stderr}");
    assert_eq!(status_of(&found, "access"), "fail");
    assert!(stderr.contains("gc-backup: error: check:"), "{stderr}");

    let mut agent = Agent::for_store(&weed, "creds");
    agent.set("GC_BACKUP_STORE", "s3://no-such-bucket/x");
    let (code, found, _) = findings(&agent);
    assert_eq!(code, Some(2));
    let access = found.iter().find(|f| f["check"] == "access").unwrap();
    assert!(
        access["detail"]
            .as_str()
            .unwrap()
            .contains("does not exist"),
        "{access}"
    );
}

#[test]
fn a_cluster_that_archives_elsewhere_fails_the_archiving_checks() {
    let weed = Seaweed::start();
    let pg = Postgres::start_with(&[("archive_mode", "on"), ("archive_command", "true")]);
    let mut agent = Agent::for_store(&weed, "elsewhere");
    for (name, value) in pg.env() {
        agent.set(&name, &value);
    }
    agent.set("PGDATABASE", "postgres");
    agent.set("GC_BACKUP_ARCHIVE_TIMEOUT", "2s");
    let (code, found, _) = findings(&agent);
    assert_eq!(code, Some(2), "{found:#?}");
    assert_eq!(status_of(&found, "access"), "ok");
    assert_eq!(status_of(&found, "archive_mode"), "ok");
    assert_eq!(status_of(&found, "archive_command"), "fail");
    assert_eq!(status_of(&found, "WAL reaches this store"), "fail");

    // PostgreSQL gone: named, and the store part still reported.
    pg.stop("fast");
    let (code, found, _) = findings(&agent);
    assert_eq!(code, Some(3), "{found:#?}");
    assert_eq!(status_of(&found, "reachable"), "fail");
    assert_eq!(status_of(&found, "delete"), "ok");
}
