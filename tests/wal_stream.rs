//! WAL streaming (`[postgres] stream-wal`) against a real PostgreSQL: the sidecar streams
//! through its replication slot into the store, so that a commit made seconds before the
//! primary and its `pg_wal` are destroyed is in a restore to the end of the archive, with
//! `archive_timeout = 0` so that only the receiver can have saved it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use harness::daemon::{Daemon, sample, wait_for};
use harness::{Agent, Seaweed, archiving_cluster, restore_started};

/// An LSN (`16/B374D848`) as the byte position the metrics give.
fn position(lsn: &str) -> f64 {
    let (high, low) = lsn.trim().split_once('/').unwrap();
    let value =
        (u64::from_str_radix(high, 16).unwrap() << 32) | u64::from_str_radix(low, 16).unwrap();
    value as f64
}

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
        ) >= position(&committed)
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

/// The receiver's stored position, once the metrics show it at or past `lsn`.
fn wait_stored(daemon: &Daemon, lsn: &str) {
    wait_for(&format!("WAL up to {lsn} in the store"), 120, || {
        sample(
            &daemon.metrics(),
            "gc_backup_wal_stream_stored_position_bytes",
        ) >= position(lsn)
    });
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
    let (pg, _) = archiving_cluster(&weed, "resume");
    let agent = Agent::for_cluster(&pg, &weed, "resume");
    pg.psql(
        "postgres",
        "CREATE EXTENSION amcheck; CREATE TABLE rows (n int PRIMARY KEY, pad text)",
    );
    let backup = agent.backup(&["backup", "pg-base"]);
    // From here on only the receiver stores WAL: archive_command fails, and the sidecar is
    // not given PGDATA (no look-ahead archiving).
    pg.psql("postgres", "ALTER SYSTEM SET archive_command = 'false'");
    pg.psql("postgres", "SELECT pg_reload_conf()");
    let streamer = Agent::for_store(&weed, "resume")
        .with_env(pg.env())
        .with("PGDATABASE", "postgres")
        .with("GC_BACKUP_STREAM_WAL", "true");

    let mut daemon = Daemon::start(&streamer);
    let first = insert_rows(&pg, 1, 100_000);
    wait_stored(&daemon, &first);
    // Killed while WAL flows: what it had not stored, the slot still holds.
    insert_rows(&pg, 100_001, 200_000);
    daemon.child.kill().unwrap();
    daemon.child.wait().unwrap();
    insert_rows(&pg, 200_001, 300_000);

    let daemon = Daemon::start(&streamer);
    let last = insert_rows(&pg, 300_001, 300_010);
    wait_stored(&daemon, &last);
    let metrics = daemon.metrics();
    assert_eq!(
        sample(&metrics, "gc_backup_wal_stream_gaps_total"),
        0.0,
        "{metrics}"
    );
    drop(daemon);
    let (restored, report) = lose_and_restore(&pg, &agent);
    assert_eq!(
        restored.psql("postgres", "SELECT count(*), max(n) FROM rows"),
        "300010|300010",
        "{report}"
    );
    restored.assert_amcheck("postgres", &[]);
    drop(restored);
    agent.ok(&["verify", &backup]);
}

#[test]
fn a_slot_dropped_behind_the_receivers_back_is_a_gap_reported_and_counted() {
    let weed = Seaweed::start();
    let pg = harness::Postgres::start();
    let agent = Agent::for_store(&weed, "gap")
        .with_env(pg.env())
        .with("PGDATABASE", "postgres")
        .with("GC_BACKUP_STREAM_WAL", "true");
    pg.psql("postgres", "CREATE TABLE rows (n int, pad text)");

    let mut daemon = Daemon::start(&agent);
    let stored = insert_rows(&pg, 1, 1000);
    wait_stored(&daemon, &stored);
    let (status, _) = daemon.terminate();
    assert!(status.success(), "{status:?}");

    // Someone drops the slot; WAL moves on three segments and a checkpoint lets it go.
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
