//! Point-in-time restore end to end: marker rows written between timestamps, restore points,
//! WAL switches and pgbench traffic; `restore pg --start` to a time, a restore point, an xid
//! and an LSN, each holding exactly the rows it should; a promoted restore becoming timeline 2
//! that a later restore to latest follows; the refusals; verify and the restore drill. The
//! source cluster keeps running on the same host throughout.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use std::process::Command;
use std::time::Duration;

use harness::{Agent, Postgres, Seaweed, archiving_cluster, assert_exit, assert_fails};

fn insert_marker(pg: &Postgres, id: u32) {
    pg.psql("postgres", &format!("INSERT INTO markers VALUES ({id})"));
}

fn markers(pg: &Postgres) -> String {
    pg.psql(
        "postgres",
        "SELECT string_agg(id::text, ',' ORDER BY id) FROM markers",
    )
}

fn empty_pgdata() -> tempfile::TempDir {
    harness::empty_pgdata("pitr-restored")
}

fn restore(agent: &Agent, args: &[&str]) -> (Postgres, String) {
    harness::restore_started(agent, "pitr-restored", args)
}

#[test]
fn restores_to_a_time_a_restore_point_an_xid_and_an_lsn_hold_exactly_their_rows() {
    let weed = Seaweed::start();
    let (pg, config) = archiving_cluster(&weed, "pitr");
    pg.pgbench(&["-i", "-s", "2", "-q"]);
    pg.psql(
        "postgres",
        "CREATE EXTENSION amcheck; CREATE TABLE markers (id int PRIMARY KEY)",
    );
    let agent =
        Agent::for_cluster(&pg, &weed, "pitr").with("GC_BACKUP_CONFIG", config.to_str().unwrap());
    let first = agent.backup(&["backup", "pg-base"]);

    insert_marker(&pg, 1);
    std::thread::sleep(Duration::from_millis(300));
    let after_1 = pg.psql("postgres", "SELECT clock_timestamp()::text");
    std::thread::sleep(Duration::from_millis(300));
    pg.pgbench(&["-c", "2", "-T", "2", "-n"]);
    insert_marker(&pg, 2);
    pg.psql("postgres", "SELECT pg_create_restore_point('after_2')");
    pg.archive_everything();
    // A second backup, after the restore point: the name target must be told to use the first.
    let second = agent.backup(&["backup", "pg-base"]);
    insert_marker(&pg, 3);
    let after_3 = pg.psql("postgres", "SELECT pg_current_wal_insert_lsn()::text");
    pg.psql("postgres", "SELECT pg_switch_wal()");
    pg.pgbench(&["-c", "2", "-T", "2", "-n"]);
    let xid_4 = pg.psql(
        "postgres",
        "BEGIN; INSERT INTO markers VALUES (4); SELECT pg_current_xact_id(); COMMIT;",
    );
    insert_marker(&pg, 5);
    pg.archive_everything();
    assert_eq!(markers(&pg), "1,2,3,4,5");

    // A time, answered by the first backup (the second ended after it); the server pauses.
    let (at_time, report) = restore(
        &agent,
        &[
            "--target-time",
            &after_1,
            "--target-action",
            "pause",
            "--archive-mode",
            "off",
        ],
    );
    assert!(
        report.contains(&format!("pg-base backup {first}")),
        "{report}"
    );
    assert!(report.contains("paused"), "{report}");
    assert_eq!(markers(&at_time), "1");
    assert_eq!(at_time.psql("postgres", "SHOW archive_mode"), "off");
    at_time.assert_amcheck("postgres", &[]);
    drop(at_time);

    // A restore point made before the second backup: named with --backup.
    let (at_name, report) = restore(
        &agent,
        &[
            "--target-name",
            "after_2",
            "--backup",
            &first,
            "--target-action",
            "pause",
        ],
    );
    assert!(report.contains("restore point \"after_2\""), "{report}");
    assert_eq!(markers(&at_name), "1,2");
    at_name.assert_amcheck("postgres", &[]);
    drop(at_name);

    // An xid, from the newest backup; the server shuts down at the target. Starting it again
    // with the pause action replays to the same point.
    let dir = empty_pgdata();
    let data = dir.path().join("data");
    let output = agent.run(&[
        "restore",
        "pg",
        "--pgdata",
        data.to_str().unwrap(),
        "--start",
        "--target-xid",
        &xid_4,
        "--target-action",
        "shutdown",
    ]);
    let report = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{report}");
    assert!(
        report.contains(&format!("pg-base backup {second}")),
        "{report}"
    );
    assert!(report.contains("shut down"), "{report}");
    let auto_conf = data.join("postgresql.auto.conf");
    let mut text = std::fs::read_to_string(&auto_conf).unwrap();
    // archive_mode off: the promotion below must not put a timeline into the archive.
    text.push_str("recovery_target_action = 'pause'\narchive_mode = 'off'\n");
    std::fs::write(&auto_conf, text).unwrap();
    let at_xid = Postgres::start_restored(dir);
    at_xid.wait_for(
        "postgres",
        "SELECT pg_get_wal_replay_pause_state()",
        "paused",
        60,
    );
    assert_eq!(markers(&at_xid), "1,2,3,4");
    at_xid.assert_amcheck("postgres", &[]);
    // Promoted by hand, as an SRE would after looking: recovery_end_command removes the
    // prefetcher's spool, so no segment of the old recovery stays behind in pg_wal.
    at_xid.psql("postgres", "SELECT pg_wal_replay_resume()");
    at_xid.wait_for("postgres", "SELECT pg_is_in_recovery()", "f", 60);
    assert!(
        !at_xid.data_dir().join("pg_wal/gc-backup-prefetch").exists(),
        "the prefetch spool outlived the promotion"
    );
    drop(at_xid);

    // An LSN, promoted: a new timeline, whose history file reaches the archive once the
    // cluster runs, and not before: the temporary server of --start archives nothing.
    // (The source cluster still archives its own segments meanwhile.)
    let histories = || -> Vec<String> {
        let keys = weed.keys("pitr/wal");
        keys.into_iter()
            .filter(|k| k.contains(".history") || k.contains(".partial"))
            .collect()
    };
    let before = histories();
    let (dir, report) =
        harness::restore_stopped(&agent, "pitr-restored", &["--target-lsn", &after_3]);
    assert!(report.contains("timeline 2; promoted"), "{report}");
    assert_eq!(before, histories(), "the temporary server archived");
    let at_lsn = Postgres::start_restored(dir);
    assert_eq!(markers(&at_lsn), "1,2,3");
    at_lsn.assert_amcheck("postgres", &[]);
    // Work goes on on timeline 2 (a failover to the restored cluster).
    insert_marker(&at_lsn, 6);
    at_lsn.archive_everything();
    assert!(
        weed.keys("pitr/wal")
            .iter()
            .any(|k| k.ends_with("00000002.history.zst"))
    );

    // Latest follows the newest timeline: timeline 2's rows, not timeline 1's later ones.
    let (latest, report) = restore(&agent, &[]);
    assert!(report.contains("timeline 3; promoted"), "{report}");
    assert_eq!(markers(&latest), "1,2,3,6");
    latest.assert_amcheck("postgres", &[]);
}

#[test]
fn refusals_leave_the_directory_untouched_and_verify_finds_a_missing_segment() {
    let weed = Seaweed::start();
    let (pg, config) = archiving_cluster(&weed, "refuse");
    pg.psql("postgres", "CREATE TABLE markers (id int PRIMARY KEY)");
    let agent =
        Agent::for_cluster(&pg, &weed, "refuse").with("GC_BACKUP_CONFIG", config.to_str().unwrap());

    let nothing = agent.home().join("nothing");
    let refused = |args: &[&str], code: i32, needle: &str| {
        let mut all = vec!["restore", "pg", "--pgdata", nothing.to_str().unwrap()];
        all.extend_from_slice(args);
        assert_fails(&agent.run(&all), code, needle);
        assert!(!nothing.exists(), "{args:?} created the directory");
    };
    refused(&[], 1, "no base backup");
    agent.backup(&["backup", "pg-base"]);
    for i in 0..3 {
        insert_marker(&pg, i);
        pg.psql("postgres", "SELECT pg_switch_wal()");
    }
    pg.archive_everything();

    refused(
        &["--target-time", "2020-01-01 00:00:00Z"],
        2,
        "before the earliest usable base backup",
    );
    refused(
        &["--target-time", "2099-01-01 00:00:00+09"],
        2,
        "after the newest archived WAL",
    );
    refused(
        &["--target-lsn", "FF/0"],
        2,
        "after the newest archived WAL",
    );
    refused(
        &["--backup", "20200101T000000Z"],
        1,
        "no pg-base backup 20200101T000000Z",
    );
    // A time without a zone is a usage error before anything else happens.
    let output = agent.run(&[
        "restore",
        "pg",
        "--pgdata",
        nothing.to_str().unwrap(),
        "--target-time",
        "2026-01-15 10:30:00",
    ]);
    assert_exit(&output, 2);
    assert!(String::from_utf8_lossy(&output.stderr).contains("no time zone"));
    // Two targets at once are refused by the command line.
    let output = agent.run(&[
        "restore",
        "pg",
        "--pgdata",
        nothing.to_str().unwrap(),
        "--target-xid",
        "5",
        "--target-name",
        "x",
    ]);
    assert_exit(&output, 2);

    // verify reads everything back and finds the chain whole; the drill restores and checks
    // without adding a timeline to the archive.
    let verified = agent.ok(&["verify"]);
    assert!(
        verified.contains(" ok ") && verified.contains("complete"),
        "{verified}"
    );
    let histories = || -> Vec<String> {
        let keys = weed.keys("refuse/wal");
        keys.into_iter()
            .filter(|k| k.contains(".history"))
            .collect()
    };
    let histories_before = histories();
    let drill = agent.ok(&["verify", "--restore"]);
    assert!(
        drill.contains("pg_amcheck ok") && drill.contains("RTO"),
        "{drill}"
    );
    assert_eq!(
        histories_before,
        histories(),
        "the drill archived a timeline"
    );

    // Bit rot in a base backup: verify names the object, restore fails and leaves DIR empty.
    let object = weed
        .keys("refuse/data/pg-base")
        .into_iter()
        .find(|k| k.ends_with(".zst"))
        .unwrap();
    weed.flip_byte(&object);
    let output = agent.run(&["verify"]);
    assert_fails(&output, 3, "verify found problems in 1 of 1 backups");
    let listing = String::from_utf8_lossy(&output.stdout);
    assert!(
        listing.contains("FAILED") && listing.contains(object.trim_start_matches("refuse/")),
        "{listing}"
    );
    let dir = agent.home().join("rotten");
    std::fs::create_dir(&dir).unwrap();
    let output = agent.run(&["restore", "pg", "--pgdata", dir.to_str().unwrap()]);
    assert_exit(&output, 3);
    assert_eq!(
        std::fs::read_dir(&dir).unwrap().count(),
        0,
        "a corrupt restore left files"
    );
    weed.flip_byte(&object);

    // A segment lost from the middle of the archive: named by restore and by verify.
    let keys = weed.keys("refuse/wal");
    let segment_name = |key: &str| {
        let name = key
            .rsplit('/')
            .next()
            .unwrap()
            .trim_end_matches(".zst")
            .to_string();
        (name.len() == 24 && name.bytes().all(|b| b.is_ascii_hexdigit())).then_some(name)
    };
    let segments: Vec<&String> = keys.iter().filter(|k| segment_name(k).is_some()).collect();
    let victim = segments[segments.len() - 2].clone();
    let name = segment_name(&victim).unwrap();
    weed.delete(&victim);
    let dir = agent.home().join("gap");
    std::fs::create_dir(&dir).unwrap();
    assert_fails(
        &agent.run(&["restore", "pg", "--pgdata", dir.to_str().unwrap()]),
        3,
        &format!("WAL segment {name} is missing"),
    );
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
    let output = agent.run(&["verify", "--kind", "pg-base"]);
    assert_fails(&output, 3, "verify found problems in 1 of 1 backups");
    assert!(String::from_utf8_lossy(&output.stdout).contains(&name));
}

/// SIGTERM while recovery waits on a store that stopped answering: the temporary server is
/// stopped, the command exits 130 with one line, and nothing keeps running on the directory.
#[test]
fn sigterm_during_recovery_stops_the_temporary_server() {
    let weed = Seaweed::start();
    let (pg, config) = archiving_cluster(&weed, "sigterm");
    let agent = Agent::for_cluster(&pg, &weed, "sigterm")
        .with("GC_BACKUP_CONFIG", config.to_str().unwrap());
    agent.backup(&["backup", "pg-base"]);
    pg.psql("postgres", "CREATE TABLE later AS SELECT 1 AS one");
    pg.archive_everything();

    let dir = empty_pgdata();
    let data = dir.path().join("data");
    let child = agent
        .command(&[
            "restore",
            "pg",
            "--pgdata",
            data.to_str().unwrap(),
            "--start",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Once the server runs, the store hangs: recovery waits in wal-fetch's timeouts.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !data.join("postmaster.pid").exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the server never started"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    weed.freeze();
    std::thread::sleep(Duration::from_millis(500));
    harness::run_ok(Command::new("kill").args(["-TERM", &child.id().to_string()]));
    let started = std::time::Instant::now();
    let output = child.wait_with_output().unwrap();
    assert_fails(&output, 130, "recovery interrupted");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "took {:?} to stop",
        started.elapsed()
    );
    assert!(
        !data.join("postmaster.pid").exists(),
        "the server still runs"
    );
}

#[test]
fn a_moment_of_timeline_1_after_a_restore_branched_timeline_2_off_needs_target_timeline_1() {
    let weed = Seaweed::start();
    let (pg, config) = archiving_cluster(&weed, "forked");
    pg.psql("postgres", "CREATE TABLE markers (id int PRIMARY KEY)");
    let agent =
        Agent::for_cluster(&pg, &weed, "forked").with("GC_BACKUP_CONFIG", config.to_str().unwrap());
    agent.backup(&["backup", "pg-base"]);
    insert_marker(&pg, 1);
    std::thread::sleep(Duration::from_millis(300));
    let t1 = pg.psql("postgres", "SELECT clock_timestamp()::text");
    std::thread::sleep(Duration::from_millis(300));
    insert_marker(&pg, 2);
    pg.psql("postgres", "SELECT pg_create_restore_point('before_three')");
    pg.archive_everything();

    // As a new user tries it: a look at T1 with --start, then a restore to a restore point
    // made after T1. The first one's temporary server promoted onto timeline 2 but archived
    // nothing, so the second still finds the restore point on timeline 1.
    let (peek, _) = restore(&agent, &["--target-time", &t1, "--archive-mode", "off"]);
    assert_eq!(markers(&peek), "1");
    drop(peek);
    let (named, report) = restore(
        &agent,
        &["--target-name", "before_three", "--archive-mode", "off"],
    );
    assert_eq!(markers(&named), "1,2", "{report}");
    drop(named);

    // A restore to T1, started for real with the archiving it came with: timeline 2, in the
    // same archive, with a row of its own.
    let (fork, report) = restore(&agent, &["--target-time", &t1]);
    assert!(report.contains("timeline 2; promoted"), "{report}");
    insert_marker(&fork, 100);
    fork.archive_everything();

    // Production goes on on timeline 1; T2 is one of its moments.
    insert_marker(&pg, 3);
    std::thread::sleep(Duration::from_millis(300));
    let t2 = pg.psql("postgres", "SELECT clock_timestamp()::text");
    std::thread::sleep(Duration::from_millis(300));
    insert_marker(&pg, 4);
    pg.archive_everything();

    // Following the newest timeline cannot reach T2 (timeline 2 stopped archiving before it),
    // and the refusal says which timeline does.
    let dir = empty_pgdata();
    let data = dir.path().join("data");
    let refused = |needle: &str| {
        let pgdata = data.to_str().unwrap();
        let output = agent.run(&["restore", "pg", "--pgdata", pgdata, "--target-time", &t2]);
        assert_fails(&output, 2, needle);
        assert_eq!(std::fs::read_dir(&data).unwrap().count(), 0);
    };
    refused("add --target-timeline 1");
    let (on_one, report) = restore(
        &agent,
        &[
            "--target-time",
            &t2,
            "--target-timeline",
            "1",
            "--archive-mode",
            "off",
        ],
    );
    assert_eq!(markers(&on_one), "1,2,3", "{report}");
    drop(on_one);

    // Once timeline 2 also goes on past T2, both hold that moment: refused until one is named.
    std::thread::sleep(Duration::from_millis(300));
    insert_marker(&fork, 101);
    fork.archive_everything();
    refused("both hold a moment there");
    let (on_two, report) = restore(
        &agent,
        &[
            "--target-time",
            &t2,
            "--target-timeline",
            "latest",
            "--archive-mode",
            "off",
        ],
    );
    assert_eq!(markers(&on_two), "1,100", "{report}");
}
