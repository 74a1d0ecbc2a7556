//! WAL streaming (`[postgres] stream-wal`) against a real PostgreSQL: the sidecar streams
//! through its replication slot into the store, so that a commit made seconds before the
//! primary and its `pg_wal` are destroyed is in a restore to the end of the archive, with
//! `archive_timeout = 0` so that only the receiver can have saved it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use harness::daemon::{Daemon, sample, wait_for};
use harness::{Agent, Seaweed, archiving_cluster, restore_started};

#[test]
fn a_commit_streamed_before_the_primary_is_lost_is_restored() {
    let weed = Seaweed::start();
    let (pg, _) = archiving_cluster(&weed, "stream");
    let mut agent = Agent::for_cluster(&pg, &weed, "stream");
    agent.set("GC_BACKUP_STREAM_WAL", "true");
    pg.psql("postgres", "CREATE TABLE marks (note text)");
    agent.backup(&["backup", "pg-base"]);

    let mut daemon = Daemon::start(&agent);
    wait_for("the stream", 60, || {
        sample(&daemon.metrics(), "gc_backup_wal_stream_up") == 1.0
    });
    let slot = pg.psql(
        "postgres",
        "SELECT slot_type || ' ' || active FROM pg_replication_slots WHERE slot_name = 'gc_backup'",
    );
    assert_eq!(slot, "physical true");

    // A commit in the middle of a segment: archive_command will never see its segment. (The
    // test servers commit asynchronously: the insert position, which the WAL writer flushes
    // within moments, is where the commit ends.)
    pg.psql("postgres", "INSERT INTO marks VALUES ('streamed only')");
    let committed = pg.psql("postgres", "SELECT pg_current_wal_insert_lsn()");
    wait_for("the commit in the store", 60, || {
        sample(
            &daemon.metrics(),
            "gc_backup_wal_stream_stored_position_bytes",
        ) >= harness::daemon::position(&committed)
    });
    let metrics = daemon.metrics();
    assert!(
        sample(
            &metrics,
            "gc_backup_wal_stream_last_flush_timestamp_seconds"
        ) > 0.0,
        "{metrics}"
    );
    wait_for("the slot's retained WAL in the metrics", 60, || {
        daemon
            .metrics()
            .contains("gc_backup_wal_slot_retained_bytes ")
    });

    // The primary and its WAL are gone; so is the sidecar, without a chance to flush.
    daemon.child.kill().unwrap();
    daemon.child.wait().unwrap();
    // Retention removes a chunk a killed receiver left of an archived segment, and keeps the
    // chunks of the segment nobody archived: the restore below needs them.
    let streamed_keys = || -> Vec<String> {
        weed.keys("stream")
            .into_iter()
            .filter(|key| key.contains("/wal-stream/") && !key.ends_with(".json"))
            .collect()
    };
    let needed = streamed_keys();
    assert!(!needed.is_empty());
    let archived = weed
        .keys("stream/wal/")
        .into_iter()
        .rev()
        .find(|key| !key.contains(".history"))
        .unwrap();
    let stray = format!(
        "{}/00000000-00000100.zst",
        archived
            .replacen("/wal/", "/wal-stream/", 1)
            .trim_end_matches(".zst")
    );
    weed.put(&stray, &weed.get(&needed[0]));
    let report = agent.ok(&["retention"]);
    assert_eq!(streamed_keys(), needed, "{report}");
    let (restored, report) = lose_and_restore(&pg, &agent);
    assert_eq!(
        restored.psql("postgres", "SELECT string_agg(note, ',') FROM marks"),
        "streamed only",
        "{report}"
    );
}

/// The primary stops at once and its `pg_wal` is destroyed; then a restore to the end of the
/// archive, started.
fn lose_and_restore(pg: &harness::Postgres, agent: &Agent) -> (harness::Postgres, String) {
    pg.stop("immediate");
    std::fs::remove_dir_all(pg.data_dir().join("pg_wal")).unwrap();
    restore_started(agent, "stream-restored", &["--archive-mode", "off"])
}

/// Ten more rows up to `last`, stored by the receiver without a gap; then the primary and its
/// WAL are lost, and a restore holds rows 1 to `last`.
fn all_rows_survive(
    pg: &harness::Postgres,
    agent: &Agent,
    daemon: Daemon,
    last: u32,
) -> harness::Postgres {
    let lsn = insert_rows(pg, last - 9, last);
    daemon.wait_stored(&lsn);
    let metrics = daemon.metrics();
    assert_eq!(
        sample(&metrics, "gc_backup_wal_stream_gaps_total"),
        0.0,
        "{metrics}"
    );
    drop(daemon);
    let (restored, report) = lose_and_restore(pg, agent);
    assert_eq!(
        restored.psql("postgres", "SELECT count(*), max(n) FROM rows"),
        format!("{last}|{last}"),
        "{report}"
    );
    restored
}

fn insert_rows(pg: &harness::Postgres, from: u32, to: u32) -> String {
    pg.psql(
        "postgres",
        &format!(
            "INSERT INTO rows SELECT n, repeat('x', 200) FROM generate_series({from}, {to}) n"
        ),
    );
    pg.psql("postgres", "SELECT pg_current_wal_insert_lsn()")
}

#[test]
fn a_receiver_killed_mid_stream_resumes_at_its_slot_without_a_gap() {
    let weed = Seaweed::start();
    let (pg, agent, backup) = backed_up_cluster(&weed, "resume");
    let streamer = Agent::streaming_from(&weed, &pg, "resume");

    let mut daemon = Daemon::start(&streamer);
    let first = insert_rows(&pg, 1, 100_000);
    daemon.wait_stored(&first);
    // Killed while WAL flows: what it had not stored, the slot still holds.
    insert_rows(&pg, 100_001, 200_000);
    daemon.child.kill().unwrap();
    daemon.child.wait().unwrap();
    insert_rows(&pg, 200_001, 300_000);

    let daemon = Daemon::start(&streamer);
    let restored = all_rows_survive(&pg, &agent, daemon, 300_010);
    restored.assert_amcheck("postgres", &[]);
    drop(restored);
    agent.ok(&["verify", &backup]);
}

#[test]
fn a_slot_dropped_behind_the_receivers_back_is_a_gap_reported_and_counted() {
    let weed = Seaweed::start();
    let pg = harness::Postgres::start();
    let agent = Agent::streaming_from(&weed, &pg, "gap");
    pg.psql("postgres", "CREATE TABLE rows (n int, pad text)");

    let mut daemon = Daemon::start(&agent);
    let stored = insert_rows(&pg, 1, 1000);
    daemon.wait_stored(&stored);
    let (status, _) = daemon.terminate();
    assert!(status.success(), "{status:?}");

    // Someone drops the slot, WAL moves on two segments and a checkpoint moves the new slot's
    // start past them, but the server keeps them (wal_keep_size): the receiver takes them
    // from where the store's WAL ends, and there is no gap.
    pg.psql("postgres", "ALTER SYSTEM SET wal_keep_size = '1GB'");
    pg.psql("postgres", "SELECT pg_reload_conf()");
    pg.psql("postgres", "SELECT pg_drop_replication_slot('gc_backup')");
    let mut kept = Vec::new();
    for round in 0..2 {
        insert_rows(&pg, 100_001 + round * 1000, 101_000 + round * 1000);
        kept.push(pg.psql("postgres", "SELECT pg_walfile_name(pg_current_wal_lsn())"));
        pg.psql("postgres", "SELECT pg_switch_wal()");
    }
    pg.psql("postgres", "CHECKPOINT");
    let mut daemon = Daemon::start(&agent);
    let stored = insert_rows(&pg, 102_001, 102_010);
    daemon.wait_stored(&stored);
    assert_eq!(
        sample(&daemon.metrics(), "gc_backup_wal_stream_gaps_total"),
        0.0
    );
    let keys = weed.keys("gap");
    for segment in &kept {
        assert!(
            keys.iter()
                .any(|key| key.ends_with(&format!("/{segment}.zst"))),
            "{segment} not stored: {keys:?}"
        );
    }
    let (status, _) = daemon.terminate();
    assert!(status.success(), "{status:?}");

    // Dropped again; WAL moves on three segments and, with nothing keeping them, a
    // checkpoint lets them go.
    pg.psql("postgres", "ALTER SYSTEM RESET wal_keep_size");
    pg.psql("postgres", "SELECT pg_reload_conf()");
    pg.psql("postgres", "SELECT pg_drop_replication_slot('gc_backup')");
    for round in 0..3 {
        insert_rows(&pg, 1001 + round * 1000, 2000 + round * 1000);
        pg.psql("postgres", "SELECT pg_switch_wal()");
    }
    pg.psql("postgres", "CHECKPOINT");

    let daemon = Daemon::start(&agent);
    wait_for("the gap counted", 60, || {
        sample(&daemon.metrics(), "gc_backup_wal_stream_gaps_total") == 1.0
    });
    let log = std::fs::read_to_string(agent.home().join("daemon.log")).unwrap();
    assert!(
        log.contains("are in neither the stream nor the archive"),
        "{log}"
    );
    // It streams on from the new slot, and check says so.
    wait_for("the stream", 60, || {
        sample(&daemon.metrics(), "gc_backup_wal_stream_up") == 1.0
    });
    let checked = agent.run(&["check"]);
    let text = String::from_utf8_lossy(&checked.stdout);
    let slot_line = text
        .lines()
        .find(|line| line.contains("replication slot"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(slot_line.contains("gc_backup streaming"), "{text}");
    assert!(text.contains("replication session"), "{text}");
}

/// A cluster with a base backup in `prefix`, whose archive_command fails from then on: only
/// the receiver stores its WAL.
fn backed_up_cluster(weed: &Seaweed, prefix: &str) -> (harness::Postgres, Agent, String) {
    let (pg, _) = archiving_cluster(weed, prefix);
    let agent = Agent::for_cluster(&pg, weed, prefix);
    pg.psql(
        "postgres",
        "CREATE EXTENSION amcheck; CREATE TABLE rows (n int PRIMARY KEY, pad text)",
    );
    let backup = agent.backup(&["backup", "pg-base"]);
    pg.psql("postgres", "ALTER SYSTEM SET archive_command = 'false'");
    pg.psql("postgres", "SELECT pg_reload_conf()");
    (pg, agent, backup)
}

#[test]
fn the_store_down_for_20_s_costs_nothing_the_slot_keeps_the_wal_until_it_is_back() {
    let mut weed = Seaweed::start();
    let (pg, agent, _) = backed_up_cluster(&weed, "outage");
    let daemon = Daemon::start(&Agent::streaming_from(&weed, &pg, "outage"));
    let before = insert_rows(&pg, 1, 1000);
    daemon.wait_stored(&before);

    weed.kill();
    insert_rows(&pg, 1001, 50_000);
    // The receiver fails and retries; PostgreSQL holds what it could not store.
    wait_for("a failed session", 60, || {
        sample(&daemon.metrics(), "gc_backup_wal_stream_failures_total") >= 1.0
    });
    let held = pg.psql(
        "postgres",
        "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn) > 0 \
         FROM pg_replication_slots WHERE slot_name = 'gc_backup'",
    );
    assert_eq!(held, "t");
    std::thread::sleep(std::time::Duration::from_secs(20));
    insert_rows(&pg, 50_001, 60_000);
    weed.restart();

    all_rows_survive(&pg, &agent, daemon, 60_010);
}

#[test]
fn a_cluster_restored_onto_a_new_timeline_is_streamed_on_that_timeline() {
    let weed = Seaweed::start();
    let (pg, agent, _) = backed_up_cluster(&weed, "timeline");
    let daemon = Daemon::start(&Agent::streaming_from(&weed, &pg, "timeline"));
    let first = insert_rows(&pg, 1, 1000);
    daemon.wait_stored(&first);
    drop(daemon);

    // The primary is lost; the restore from the stream is promoted to timeline 2 and runs as
    // the new primary, archive_command failing there too.
    let (restored, report) = lose_and_restore(&pg, &agent);
    assert!(report.contains("timeline 2"), "{report}");
    restored.psql("postgres", "ALTER SYSTEM SET archive_command = 'false'");
    restored.psql("postgres", "SELECT pg_reload_conf()");
    let on_two = Agent::streaming_from(&weed, &restored, "timeline");
    let daemon = Daemon::start(&on_two);
    let second = insert_rows(&restored, 1001, 2000);
    daemon.wait_stored(&second);
    let metrics = daemon.metrics();
    assert_eq!(
        sample(&metrics, "gc_backup_wal_stream_gaps_total"),
        0.0,
        "{}",
        std::fs::read_to_string(on_two.home().join("daemon.log")).unwrap()
    );
    drop(daemon);
    // The new timeline's history file came from the server, through the receiver.
    assert!(
        weed.keys("timeline")
            .iter()
            .any(|key| key.ends_with("wal/00000002.history.zst")),
        "{:?}",
        weed.keys("timeline")
    );

    // Lost again: a restore follows timeline 2 to the last streamed commit.
    let (again, report) = lose_and_restore(&restored, &agent);
    assert!(report.contains("timeline 3"), "{report}");
    assert_eq!(
        again.psql("postgres", "SELECT count(*), max(n) FROM rows"),
        "2000|2000",
        "{report}"
    );
}

#[test]
fn a_standby_promoted_under_the_receiver_is_followed_onto_its_new_timeline() {
    let weed = Seaweed::start();
    let (primary, agent, _) = backed_up_cluster(&weed, "promotion");
    let standby = harness::Postgres::standby_of(&primary);
    // The sidecar of the standby's pod streams from the standby (cascading replication).
    let beside_standby = Agent::streaming_from(&weed, &standby, "promotion");
    let daemon = Daemon::start(&beside_standby);
    let first = insert_rows(&primary, 1, 1000);
    daemon.wait_stored(&first);

    // Failover: the primary is gone, the standby promoted while the receiver streams from it.
    primary.stop("immediate");
    standby.psql("postgres", "SELECT pg_promote()");
    standby.wait_for("postgres", "SELECT pg_is_in_recovery()", "f", 60);
    let second = insert_rows(&standby, 1001, 2000);
    daemon.wait_stored(&second);
    let log = std::fs::read_to_string(beside_standby.home().join("daemon.log")).unwrap();
    let metrics = daemon.metrics();
    // Followed within the session (the end of timeline 1, then timeline 2), not by a failure
    // and a new session that would have found the way on its own.
    assert_eq!(
        sample(&metrics, "gc_backup_wal_stream_failures_total"),
        0.0,
        "{log}"
    );
    assert_eq!(
        sample(&metrics, "gc_backup_wal_stream_gaps_total"),
        0.0,
        "{log}"
    );
    assert!(log.contains("follows the next timeline"), "{log}");
    drop(daemon);

    // The new primary is lost too: a restore from the stream reaches its last commit.
    let (restored, report) = lose_and_restore(&standby, &agent);
    assert!(report.contains("timeline 3"), "{report}");
    assert_eq!(
        restored.psql("postgres", "SELECT count(*), max(n) FROM rows"),
        "2000|2000",
        "{report}"
    );
}

#[test]
fn beside_archive_command_each_covers_the_others_downtime_and_both_agree() {
    let weed = Seaweed::start();
    let (pg, _) = archiving_cluster(&weed, "both");
    let agent = Agent::for_cluster(&pg, &weed, "both");
    pg.psql(
        "postgres",
        "CREATE EXTENSION amcheck; CREATE TABLE rows (n int PRIMARY KEY, pad text)",
    );
    agent.backup(&["backup", "pg-base"]);
    let streamer = Agent::streaming_from(&weed, &pg, "both");
    let archiver_failures = || pg.psql("postgres", "SELECT failed_count FROM pg_stat_archiver");

    // Both running: the receiver stores each segment first, and archive_command, finding the
    // same content under the name, still gets exit 0.
    let mut daemon = Daemon::start(&streamer);
    for round in 0..3 {
        let lsn = insert_rows(&pg, round * 1000 + 1, round * 1000 + 1000);
        daemon.wait_stored(&lsn);
        pg.archive_everything();
    }
    assert_eq!(archiver_failures(), "0");

    // The receiver down: archive_command stores the finished segments meanwhile, and the
    // receiver, back, streams on from its slot over what is already archived.
    daemon.child.kill().unwrap();
    daemon.child.wait().unwrap();
    insert_rows(&pg, 3001, 4000);
    pg.archive_everything();
    let daemon = Daemon::start(&streamer);
    let lsn = insert_rows(&pg, 4001, 5000);
    daemon.wait_stored(&lsn);
    pg.archive_everything();
    assert_eq!(archiver_failures(), "0");
    let metrics = daemon.metrics();
    assert_eq!(
        sample(&metrics, "gc_backup_wal_stream_failures_total"),
        0.0,
        "{}",
        std::fs::read_to_string(streamer.home().join("daemon.log")).unwrap()
    );

    // archive_command down: the receiver alone stores the rest, to the last commit.
    pg.psql("postgres", "ALTER SYSTEM SET archive_command = 'false'");
    pg.psql("postgres", "SELECT pg_reload_conf()");
    let restored = all_rows_survive(&pg, &agent, daemon, 5010);
    restored.assert_amcheck("postgres", &[]);
}
