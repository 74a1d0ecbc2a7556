//! One moment for PostgreSQL, Redis and etcd: `gc-backup mark NAME` against real servers (an
//! archiving PostgreSQL 15, Redis 7 with timestamped AOF, etcd), then `restore all` by the
//! point's name and by a time, each engine checked on a server started on what was restored;
//! the refusals that leave every destination untouched; a damaged etcd snapshot found after
//! Redis' part was written, which takes that part back; a mark whose Redis part fails leaves
//! no point.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use std::path::{Path, PathBuf};
use std::time::Duration;

use harness::etcd::Etcd;
use harness::redis::Redis;
use harness::{Agent, Postgres, Seaweed, archiving_cluster, assert_fails};

struct Engines {
    weed: Seaweed,
    pg: Postgres,
    redis: Redis,
    etcd: Etcd,
    agent: Agent,
}

fn engines(prefix: &str) -> Engines {
    let weed = Seaweed::start();
    let (pg, config) = archiving_cluster(&weed, prefix);
    pg.psql("postgres", "CREATE TABLE markers (id int PRIMARY KEY)");
    let redis = Redis::start_aof_timestamped();
    let etcd = Etcd::start();
    let agent = Agent::for_cluster(&pg, &weed, prefix)
        .with("GC_BACKUP_CONFIG", config.to_str().unwrap())
        .with("GC_BACKUP_REDIS_URL", &redis.url())
        .with("GC_BACKUP_REDIS_AOF_DIR", redis.aof_dir().to_str().unwrap())
        .with("GC_BACKUP_ETCD_ENDPOINTS", &etcd.endpoint());
    Engines {
        weed,
        pg,
        redis,
        etcd,
        agent,
    }
}

impl Engines {
    /// Marker `n` in every engine.
    fn write(&self, n: u32) {
        self.pg
            .psql("postgres", &format!("INSERT INTO markers VALUES ({n})"));
        self.redis.cli(&["SET", &format!("m{n}"), "1"]);
        self.etcd.put(&format!("/m/{n}"), "1");
    }
}

/// What each restored engine holds of markers 1..=3, as "pg|redis|etcd".
fn restored_markers(pgdata: tempfile::TempDir, redis_dir: &Path, etcd_file: &Path) -> String {
    let pg = Postgres::start_restored(pgdata);
    let pg_rows = pg.psql(
        "postgres",
        "SELECT string_agg(id::text, ',' ORDER BY id) FROM markers",
    );
    let redis = if redis_dir.join("dump.rdb").exists() {
        Redis::start_on(redis_dir)
    } else {
        Redis::start_on_aof(redis_dir)
    };
    let redis_keys: Vec<String> = (1..=3)
        .filter(|n| redis.cli(&["EXISTS", &format!("m{n}")]) == "1")
        .map(|n| n.to_string())
        .collect();
    let etcd = Etcd::start_restored(etcd_file);
    let etcd_keys: Vec<String> = (1..=3)
        .filter(|n| etcd.get(&format!("/m/{n}")).is_some())
        .map(|n| n.to_string())
        .collect();
    format!("{pg_rows}|{}|{}", redis_keys.join(","), etcd_keys.join(","))
}

/// Destinations for one `restore all`: the data directory (owned by postgres), and a Redis
/// directory and an etcd file that do not exist yet.
fn destinations(agent: &Agent, tag: &str) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let pgdata = harness::empty_pgdata(&format!("all-{tag}"));
    (
        pgdata,
        agent.home().join(format!("redis-{tag}")),
        agent.home().join(format!("etcd-{tag}.db")),
    )
}

fn restore_all(
    agent: &Agent,
    moment: &[&str],
    pgdata: &Path,
    redis: &Path,
    etcd: &Path,
) -> std::process::Output {
    let mut args = vec!["restore", "all"];
    args.extend_from_slice(moment);
    let data = pgdata.join("data");
    args.extend_from_slice(&[
        "--pgdata",
        data.to_str().unwrap(),
        "--redis-output",
        redis.to_str().unwrap(),
        "--etcd-output",
        etcd.to_str().unwrap(),
        "--start",
        "--archive-mode",
        "off",
    ]);
    agent.run(&args)
}

/// The current second, as a `--target-time`, once the clock has moved into a new one.
fn next_second() -> (i64, String) {
    let now = chrono::Utc::now().timestamp();
    while chrono::Utc::now().timestamp() <= now {
        std::thread::sleep(Duration::from_millis(20));
    }
    let second = now + 1;
    let text = chrono::DateTime::from_timestamp(second, 0)
        .unwrap()
        .to_rfc3339();
    (second, text)
}

#[test]
fn mark_then_restore_all_by_name_and_by_time_bring_every_engine_to_the_same_moment() {
    let e = engines("points");
    e.agent.backup(&["backup", "pg-base"]);
    e.write(1);
    let point = e.agent.backup(&["mark", "before-batch"]);

    // The point names every part.
    let listed = e.agent.ok(&["list", "--kind", "point", "--json"]);
    let listed: Vec<serde_json::Value> = serde_json::from_str(&listed).unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["id"], point.as_str());
    assert_eq!(listed[0]["name"], "before-batch");
    let redis_id = listed[0]["redis"]["id"].as_str().unwrap().to_string();
    assert!(listed[0]["etcd"]["id"].is_string(), "{listed:?}");
    assert!(
        listed[0]["postgres"]["lsn"]
            .as_str()
            .is_some_and(|l| l.contains('/'))
    );
    let all = e.agent.list_json();
    assert!(
        all.iter()
            .any(|m| m["kind"] == "redis" && m["id"] == redis_id.as_str())
    );
    // Names are unique.
    assert_fails(&e.agent.run(&["mark", "before-batch"]), 2, "exists already");

    // T: a second of its own after the point, before marker 2.
    let (_, target) = next_second();
    next_second();
    e.write(2);
    e.agent.backup(&["backup", "redis"]);
    e.agent.backup(&["backup", "etcd"]);
    e.write(3);
    e.agent.backup(&["backup", "redis"]);
    e.pg.archive_everything();

    let (pgdata, redis_dir, etcd_file) = destinations(&e.agent, "name");
    let output = restore_all(
        &e.agent,
        &["--target-name", "before-batch"],
        pgdata.path(),
        &redis_dir,
        &etcd_file,
    );
    let report = String::from_utf8_lossy(&output.stderr).to_string();
    assert!(output.status.success(), "{report}");
    assert!(report.contains("Moments (point "), "{report}");
    assert!(report.contains(&redis_id), "{report}");
    assert_eq!(restored_markers(pgdata, &redis_dir, &etcd_file), "1|1|1");

    let (pgdata, redis_dir, etcd_file) = destinations(&e.agent, "time");
    let output = restore_all(
        &e.agent,
        &["--target-time", &target],
        pgdata.path(),
        &redis_dir,
        &etcd_file,
    );
    let report = String::from_utf8_lossy(&output.stderr).to_string();
    assert!(output.status.success(), "{report}");
    assert!(report.contains("the AOF set of backup"), "{report}");
    assert!(report.contains("apart"), "{report}");
    assert_eq!(restored_markers(pgdata, &redis_dir, &etcd_file), "1|1|1");
}

/// Nothing was written: the data directory is still empty, the others do not exist.
fn assert_untouched(pgdata: &Path, redis: &Path, etcd: &Path) {
    let entries = std::fs::read_dir(pgdata.join("data")).unwrap().count();
    assert_eq!(entries, 0, "the data directory was written to");
    assert!(!redis.exists(), "{} was created", redis.display());
    assert!(!etcd.exists(), "{} was created", etcd.display());
}

#[test]
fn a_part_that_cannot_reach_the_moment_refuses_the_whole_restore_before_anything_is_written() {
    let e = engines("points-refused");
    e.agent.backup(&["backup", "pg-base"]);
    e.write(1);
    e.agent.backup(&["mark", "p1"]);
    e.write(2);
    e.pg.archive_everything();
    // After the newest Redis backup: PostgreSQL's archive reaches it, Redis does not.
    let (_, after) = next_second();
    next_second();
    e.pg.psql("postgres", "INSERT INTO markers VALUES (9)");
    e.pg.archive_everything();
    let (pgdata, redis_dir, etcd_file) = destinations(&e.agent, "refused");
    let output = restore_all(
        &e.agent,
        &["--target-time", &after],
        pgdata.path(),
        &redis_dir,
        &etcd_file,
    );
    assert_fails(&output, 2, "after the newest redis backup");
    assert_untouched(pgdata.path(), &redis_dir, &etcd_file);

    let output = restore_all(
        &e.agent,
        &["--target-name", "no-such-point"],
        pgdata.path(),
        &redis_dir,
        &etcd_file,
    );
    assert_fails(&output, 2, "no point named 'no-such-point'");
    assert_untouched(pgdata.path(), &redis_dir, &etcd_file);

    let listed = e.agent.ok(&["list", "--kind", "point", "--json"]);
    let listed: Vec<serde_json::Value> = serde_json::from_str(&listed).unwrap();
    let redis_id = listed[0]["redis"]["id"].as_str().unwrap();
    let etcd_id = listed[0]["etcd"]["id"].as_str().unwrap();

    // A bit flipped in the point's etcd snapshot: found while it is written, after Redis' part
    // was; the whole restore fails and what Redis' part wrote is removed again.
    let etcd_object = e
        .weed
        .keys(&format!("points-refused/data/etcd/{etcd_id}"))
        .into_iter()
        .find(|k| k.ends_with(".zst"))
        .unwrap();
    e.weed.flip_byte(&etcd_object);
    let output = restore_all(
        &e.agent,
        &["--target-name", "p1"],
        pgdata.path(),
        &redis_dir,
        &etcd_file,
    );
    assert_fails(&output, 3, &format!("etcd backup {etcd_id}"));
    assert_untouched(pgdata.path(), &redis_dir, &etcd_file);

    // The point's Redis backup deleted by hand: the point cannot be restored as a whole.
    e.weed
        .delete(&format!("points-refused/manifests/redis/{redis_id}.json"));
    let output = restore_all(
        &e.agent,
        &["--target-name", "p1"],
        pgdata.path(),
        &redis_dir,
        &etcd_file,
    );
    assert_fails(
        &output,
        2,
        &format!("redis backup {redis_id} of point 'p1'"),
    );
    assert_untouched(pgdata.path(), &redis_dir, &etcd_file);
}

#[test]
fn a_mark_whose_redis_part_fails_leaves_no_point() {
    let mut e = engines("points-failed");
    e.agent.backup(&["backup", "pg-base"]);
    e.agent.set("GC_BACKUP_REDIS_URL", "redis://127.0.0.1:1");
    let output = e.agent.run(&["mark", "lost"]);
    assert_fails(&output, 3, "no point was written");
    let listed = e.agent.ok(&["list", "--kind", "point", "--json"]);
    assert_eq!(listed.trim(), "[]", "a point was written: {listed}");
    let leftovers = e.weed.keys("points-failed/data/point");
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // The same agent with Redis back makes the point.
    let url = e.redis.url();
    e.agent.set("GC_BACKUP_REDIS_URL", &url);
    e.agent.backup(&["mark", "found"]);
    let listed = e.agent.ok(&["list", "--kind", "point"]);
    assert!(listed.contains("'found'"), "{listed}");
}
