//! `gc-backup retention` against real backups of every kind in SeaweedFS, planned with `--now`
//! in the future: at +8 days only Redis' window has passed, at +31 days every window has.
//! Checks that exactly what the rules say goes: never the newest backup of a kind, never an AOF
//! file a kept backup names, never WAL the kept base backup needs; and that a dry run changes
//! nothing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use chrono::{TimeDelta, Utc};
use harness::etcd::Etcd;
use harness::redis::Redis;
use harness::{Agent, Seaweed, archiving_cluster, assert_exit};

fn ids(listed: &[serde_json::Value], kind: &str) -> Vec<String> {
    listed
        .iter()
        .filter(|e| e["kind"] == kind)
        .map(|e| e["id"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn retention_in_the_future_deletes_exactly_what_the_rules_say() {
    let weed = Seaweed::start();
    let (pg, config) = archiving_cluster(&weed, "ret");
    let redis = Redis::start_aof();
    redis.populate(500);
    redis.rewrite_aof();
    let etcd = Etcd::start();
    etcd.populate(50, 64);

    let mut agent = Agent::for_cluster(&pg, &weed, "ret");
    agent.set("GC_BACKUP_CONFIG", config.to_str().unwrap());
    agent.set("GC_BACKUP_REDIS_URL", &redis.url());
    agent.set("GC_BACKUP_REDIS_AOF_DIR", redis.aof_dir().to_str().unwrap());
    agent.set("GC_BACKUP_ETCD_ENDPOINTS", &etcd.endpoint());

    for round in 0..2 {
        pg.psql(
            "postgres",
            &format!("CREATE TABLE t{round} AS SELECT generate_series(1, 1000) AS n"),
        );
        pg.psql("postgres", "SELECT pg_switch_wal()");
        agent.backup(&["backup", "pg-base"]);
        agent.backup(&["backup", "pg-dump"]);
        redis.cli(&["SET", "round", &round.to_string()]);
        agent.backup(&["backup", "redis"]);
        agent.backup(&["backup", "etcd"]);
    }
    pg.psql("postgres", "SELECT pg_switch_wal()");
    pg.archive_everything();
    let before = agent.list_json();
    assert_eq!(before.len(), 8);
    let (old_redis, new_redis) = {
        let ids = ids(&before, "redis");
        (ids[0].clone(), ids[1].clone())
    };
    // The second redis backup names the first one's unchanged AOF base file.
    let shared_base = before
        .iter()
        .find(|e| e["kind"] == "redis" && e["id"] == new_redis.as_str())
        .unwrap()["aof"]["files"][0]["key"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(shared_base.contains(&old_redis), "{shared_base}");
    // What a killed run leaves: data without a manifest.
    weed.put("ret/data/etcd/20200101T000000Z/snapshot.db.zst", b"half");
    weed.leave_multipart_open("ret/data/pg-base/20200101T000000Z/base-1.tar.zst");
    let wal_before = weed.keys("ret/wal").len();

    let at = |days: i64| (Utc::now() + TimeDelta::days(days)).to_rfc3339();
    let plan = agent.ok(&["retention", "--dry-run", "--now", &at(8)]);
    assert!(
        plan.contains(&format!("would delete redis {old_redis}")),
        "{plan}"
    );
    assert!(
        plan.contains("data/etcd/20200101T000000Z/snapshot.db.zst"),
        "{plan}"
    );
    assert!(
        plan.contains("would abort  data/pg-base/20200101T000000Z/base-1.tar.zst"),
        "{plan}"
    );
    assert_eq!(agent.list_json().len(), 8, "a dry run deleted something");
    // Not yet stale today.
    let today = agent.ok(&["retention", "--dry-run"]);
    assert!(!today.contains("would abort"), "{today}");
    assert!(!weed.keys("ret/data/etcd/20200101T000000Z").is_empty());

    // +8 days: Redis' 7-day window has passed, no other.
    let done = agent.ok(&["retention", "--now", &at(8)]);
    assert!(
        done.contains("aborted      data/pg-base/20200101T000000Z/base-1.tar.zst"),
        "{done}"
    );
    let after_abort = agent.ok(&["retention", "--dry-run", "--now", &at(8)]);
    assert!(
        !after_abort.contains("abort"),
        "the upload is still open: {after_abort}"
    );
    let after = agent.list_json();
    assert_eq!(ids(&after, "redis"), std::slice::from_ref(&new_redis));
    assert_eq!(ids(&after, "etcd").len(), 2);
    assert_eq!(ids(&after, "pg-base").len(), 2);
    assert_eq!(ids(&after, "pg-dump").len(), 2);
    assert!(
        weed.keys("ret/data/etcd/20200101T000000Z").is_empty(),
        "the orphan stayed"
    );
    assert!(
        weed.keys(&format!("ret/data/redis/{old_redis}"))
            .contains(&format!("ret/{shared_base}")),
        "an AOF file the kept backup names was deleted with its first backup"
    );
    assert!(
        !weed
            .keys(&format!("ret/data/redis/{old_redis}"))
            .iter()
            .any(|k| k.ends_with("dump.rdb.zst")),
        "the deleted backup's own snapshot stayed"
    );
    let out = agent.home().join("redis-restored");
    agent.ok(&[
        "restore",
        "redis",
        "latest",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert_eq!(Redis::start_on_aof(&out).cli(&["GET", "round"]), "1");

    // +31 days: every window has passed; the newest of each kind stays, and WAL from the
    // newest base backup's start on.
    agent.ok(&["retention", "--now", &at(31)]);
    let last = agent.list_json();
    for kind in ["pg-base", "pg-dump", "redis", "etcd"] {
        assert_eq!(ids(&last, kind).len(), 1, "{kind}: {last:?}");
    }
    assert_eq!(ids(&last, "pg-base"), [ids(&before, "pg-base")[1].clone()]);
    let wal_after = weed.keys("ret/wal").len();
    assert!(
        wal_after < wal_before,
        "no WAL deleted ({wal_before} → {wal_after})"
    );
    assert!(
        weed.keys("ret/wal")
            .iter()
            .any(|k| k.ends_with(".history.zst"))
            || !weed.keys("ret/wal").iter().any(|k| k.contains(".history")),
        "history files are kept"
    );
    // The kept base backup's WAL chain is whole: verify checks it from its start segment.
    agent.ok(&["verify"]);
    // Nothing left to do.
    let again = agent.ok(&["retention", "--now", &at(31)]);
    assert!(!again.contains("deleted "), "{again}");

    // A time without a zone is refused by the argument parser (exit 2), as for restore pg.
    let bad = agent.run(&["retention", "--now", "2026-01-01 00:00:00"]);
    assert_exit(&bad, 2);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("has no time zone"));
}
