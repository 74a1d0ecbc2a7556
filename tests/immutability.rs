//! Backups that stolen credentials cannot destroy, against SeaweedFS with a bucket created with
//! object lock (it enforces retention): every object written gets its retain-until date; an
//! attacker with the agent's own credentials cannot delete a version; retention still works
//! (its deletes leave delete markers); after the attacker deletes and overwrites everything,
//! `list --as-of` and `restore … --as-of` (a point-in-time restore among them, whose
//! restore_command reads as of the same moment) restore from the moment before. And the
//! refusals: `--as-of` in the future, unparseable, for a command that writes, on a bucket
//! without versions; object lock on a bucket without it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use std::process::Command;
use std::time::Duration;

use harness::{
    Agent, Postgres, Seaweed, archiving_cluster_configured, assert_fails, pg_bin_dir, run_ok,
};

const LOCK: &str = "object-lock = \"governance\"\nobject-lock-margin = \"1d\"\n";

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

#[test]
fn locked_versions_survive_an_attacker_and_as_of_restores_from_before_the_attack() {
    let weed = Seaweed::start_locked();
    let (pg, config) = archiving_cluster_configured(pg_bin_dir(), &weed, "lock", LOCK);
    pg.psql(
        "postgres",
        "CREATE TABLE files (id int PRIMARY KEY, name text); \
         INSERT INTO files SELECT g, 'file-' || g FROM generate_series(1, 1000) g; \
         CREATE EXTENSION pgcrypto; \
         CREATE TABLE noise AS SELECT gen_random_bytes(1024) AS b FROM generate_series(1, 16000)",
    );
    // 16 MB that does not compress, in 5 MiB parts: the base backup's object is a multipart
    // upload, whose completion must lock it as a single PUT does.
    let agent = Agent::for_cluster(&pg, &weed, "lock")
        .with("GC_BACKUP_CONFIG", config.to_str().unwrap())
        .with("GC_BACKUP_PART_SIZE", "5MiB");
    let dump = agent.backup(&["backup", "pg-dump"]);
    agent.backup(&["backup", "pg-base"]);
    pg.psql(
        "postgres",
        "INSERT INTO files VALUES (0, 'after the base backup')",
    );
    pg.archive_everything();

    // Every data object, manifest and WAL file is locked until its window + the margin.
    let keys = weed.keys("lock");
    let pg_window = 30 * 86_400 + 86_400;
    let mut locked = 0;
    for key in &keys {
        if key.ends_with("_claim.json") {
            continue;
        }
        let (mode, until) = weed
            .retention(key)
            .unwrap_or_else(|| panic!("{key} has no retention"));
        assert_eq!(mode, "GOVERNANCE", "{key}");
        assert!(
            (until - now() - pg_window).abs() < 3_600,
            "{key} is retained until {until}, not about 31 days from now"
        );
        locked += 1;
    }
    assert!(locked >= 5, "{keys:?}");
    assert!(
        keys.iter()
            .any(|k| k.contains("/data/pg-base/") && weed.get(k).len() > 5 << 20),
        "no base backup object took more than one part: {keys:?}"
    );

    // The moment to come back to (the listing's times have whole seconds).
    std::thread::sleep(Duration::from_millis(1_500));
    let before_attack = chrono::Utc::now().to_rfc3339();
    std::thread::sleep(Duration::from_millis(1_500));

    // Retention runs on the locked bucket, decades later: its deletes leave delete markers
    // and every version stays.
    let versions_before = weed.versions("lock/");
    agent.ok(&["retention", "--now", "2099-01-01T00:00:00Z"]);
    let after = weed.versions("lock/");
    let kept = |all: &[(String, String, bool)]| all.iter().filter(|v| !v.2).count();
    assert_eq!(
        kept(&after),
        kept(&versions_before),
        "retention removed a version"
    );
    assert!(after.iter().any(|v| v.2), "retention deleted nothing");

    // The attacker has the agent's credentials: no version can be deleted for good...
    let versions = weed.versions("lock/");
    let refused = versions
        .iter()
        .filter(|(_, _, marker)| !marker)
        .filter(|(key, version, _)| !weed.delete_version(key, version))
        .count();
    let kept_versions = versions.iter().filter(|(_, _, marker)| !marker).count();
    let claims_and_probes = versions
        .iter()
        .filter(|(key, _, marker)| !marker && key.ends_with("_claim.json"))
        .count();
    assert!(
        refused >= kept_versions - claims_and_probes,
        "{refused} of {kept_versions} locked versions resisted deletion"
    );
    // ...but every current object can be hidden behind a delete marker, and one overwritten.
    for key in weed.keys("lock") {
        weed.delete(&key);
    }
    let manifest = format!("lock/manifests/pg-dump/{dump}.json");
    weed.put(&manifest, b"{\"format\": 1, \"ransom\": true}");
    let now_listed = agent.run(&["list", "--json"]);
    let now_listed = String::from_utf8_lossy(&now_listed.stdout);
    assert!(!now_listed.contains(&format!("\"{dump}\"")), "{now_listed}");

    // As of before the attack, everything is there.
    let listed = agent.ok(&["list", "--as-of", &before_attack]);
    assert!(listed.contains(&dump), "{listed}");
    let restored = agent.home().join("dump.out");
    agent.ok(&[
        "restore",
        "pg-dump",
        &dump,
        "--as-of",
        &before_attack,
        "--output",
        restored.to_str().unwrap(),
    ]);
    assert!(std::fs::read(&restored).unwrap().starts_with(b"PGDMP"));
    let dir = harness::shared_temp_dir("asof-restored");
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    run_ok(Command::new("chown").arg("postgres:postgres").arg(&data));
    let output = agent.run(&[
        "restore",
        "pg",
        "--as-of",
        &before_attack,
        "--pgdata",
        data.to_str().unwrap(),
        "--start",
    ]);
    assert!(
        output.status.success(),
        "restore pg --as-of failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let recovered = Postgres::start_restored(dir);
    assert_eq!(
        recovered.psql(
            "postgres",
            "SELECT count(*), max(name) FILTER (WHERE id = 0) FROM files"
        ),
        "1001|after the base backup"
    );

    // Refusals, one line each, exit 2.
    assert_fails(
        &agent.run(&["list", "--as-of", "2999-01-01T00:00:00Z"]),
        2,
        "in the future",
    );
    assert_fails(&agent.run(&["list", "--as-of", "yesterday"]), 2, "--as-of");
    assert_fails(
        &agent.run(&["backup", "pg-dump", "--as-of", &before_attack]),
        2,
        "this command writes",
    );
}

#[test]
fn as_of_and_object_lock_are_refused_where_the_bucket_cannot_keep_versions() {
    let weed = Seaweed::start();
    let agent = Agent::for_store(&weed, "plain");
    let time = chrono::Utc::now().to_rfc3339();
    assert_fails(&agent.run(&["list", "--as-of", &time]), 2, "versioning off");
    let locked = agent.clone_with("GC_BACKUP_OBJECT_LOCK", "compliance");
    let segment = locked.home().join("000000010000000000000001");
    std::fs::write(&segment, vec![0u8; 1 << 20]).unwrap();
    assert_fails(
        &locked.run(&["wal-push", segment.to_str().unwrap()]),
        2,
        "object lock must be enabled when the bucket is created",
    );
    let check = locked.run(&["check"]);
    let report = String::from_utf8_lossy(&check.stdout);
    assert!(
        report.contains("needs a bucket created with object lock"),
        "{report}"
    );
    // Over HTTPS with a private CA, S3's own API (versions, retention) trusts store.ca-file as
    // the store does: the answer is about versioning, not an unknown certificate.
    let tls = Seaweed::start_tls();
    let over_tls = Agent::for_store(&tls, "plain")
        .with("AWS_ENDPOINT_URL", &tls.https_endpoint())
        .with("GC_BACKUP_CA_FILE", tls.ca_file().to_str().unwrap());
    assert_fails(
        &over_tls.run(&["list", "--as-of", &time]),
        2,
        "versioning off",
    );
    let root = tempfile::tempdir().unwrap();
    let url = format!("file://{}", root.path().display());
    let local = Agent::new(vec![("GC_BACKUP_STORE".into(), url)]);
    assert_fails(
        &local.run(&["list", "--as-of", &time]),
        2,
        "versioned S3 bucket",
    );
    let local_lock = local.clone_with("GC_BACKUP_OBJECT_LOCK", "governance");
    assert_fails(&local_lock.run(&["list"]), 2, "has no object lock");
}
