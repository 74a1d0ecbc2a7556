//! Incremental base backups end to end, against a real PostgreSQL: a full, then changes of
//! every kind an incremental must get right (updates and hint bits, a relation truncated by
//! VACUUM and one by TRUNCATE, one extended, VACUUM FULL's new relfilenode, a table dropped and
//! one created, a database created by copying its template's files, which keeps their old page
//! LSNs, and one dropped), an incremental, more changes, another incremental. Restores of the
//! chain to the end of the archive and to a moment between the two incrementals hold exactly
//! the source's rows and pass pg_amcheck --heapallindexed; verify checks whole chains; a chain
//! is cut at max-incremental-chain; a damaged parent fails every child; a lost parent is
//! refused in one line naming it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use std::time::Duration;

use harness::{Agent, Postgres, Seaweed, archiving_cluster, assert_fails};

fn restore(agent: &Agent, args: &[&str]) -> (Postgres, String) {
    harness::restore_started(agent, "incremental-restored", args)
}

/// Everything the source holds that a restore must hold too, database by database.
fn contents(pg: &Postgres, databases: &[&str]) -> String {
    let mut all = pg.psql(
        "postgres",
        "SELECT string_agg(datname, ',' ORDER BY datname) FROM pg_database",
    );
    for db in databases {
        all.push_str(&format!("\n[{db}]\n{}", pg.fingerprint(db)));
    }
    all
}

fn markers(pg: &Postgres) -> String {
    pg.psql(
        "postgres",
        "SELECT string_agg(id::text, ',' ORDER BY id) FROM markers",
    )
}

/// The mode of every directory under `base/`, the one part of PGDATA a new database adds to:
/// a chain's restore creates some as the parents of files another stream writes first.
fn database_dir_modes(data: &std::path::Path) -> Vec<(String, u32)> {
    use std::os::unix::fs::PermissionsExt;
    let mut modes: Vec<(String, u32)> = std::fs::read_dir(data.join("base"))
        .unwrap()
        .map(|entry| {
            let entry = entry.unwrap();
            let mode = entry.metadata().unwrap().permissions().mode() & 0o7777;
            (entry.file_name().to_string_lossy().into_owned(), mode)
        })
        .collect();
    modes.sort();
    modes
}

/// A backup's entry in `list --json` (its source's facts are at the top level).
fn source_of<'a>(entries: &'a [serde_json::Value], id: &str) -> &'a serde_json::Value {
    entries
        .iter()
        .find(|e| e["id"] == id)
        .unwrap_or_else(|| panic!("{id} is not listed"))
}

#[test]
fn a_chain_of_incrementals_restores_every_kind_of_change_exactly() {
    let weed = Seaweed::start();
    let (pg, config) = archiving_cluster(&weed, "incr");
    let agent =
        Agent::for_cluster(&pg, &weed, "incr").with("GC_BACKUP_CONFIG", config.to_str().unwrap());
    pg.pgbench(&["-i", "-s", "4", "-q"]);
    pg.psql(
        "postgres",
        "CREATE EXTENSION amcheck;
         CREATE TABLE markers (id int PRIMARY KEY);
         CREATE TABLE shrinking AS SELECT g AS id, repeat('x', 200) AS pad FROM generate_series(1, 20000) g;
         CREATE TABLE emptied AS SELECT g AS id FROM generate_series(1, 5000) g;
         CREATE TABLE rewritten AS SELECT g AS id, md5(g::text) AS h FROM generate_series(1, 20000) g;
         CREATE INDEX ON rewritten (h);
         CREATE TABLE doomed AS SELECT g AS id FROM generate_series(1, 1000) g;",
    );
    pg.create_database("gone_later");
    pg.psql(
        "gone_later",
        "CREATE EXTENSION amcheck; CREATE TABLE t AS SELECT generate_series(1, 100) AS id",
    );
    // A template with data: CREATE DATABASE ... FILE_COPY copies its files as they are.
    pg.create_database("template_source");
    pg.psql(
        "template_source",
        "CREATE EXTENSION amcheck;
         CREATE TABLE seed AS SELECT g AS id, md5(g::text) AS h FROM generate_series(1, 3000) g;
         CREATE INDEX ON seed (h)",
    );
    pg.archive_everything();
    let full = agent.backup(&["backup", "pg-base", "--incremental"]);
    let entries = agent.list_json();
    assert_eq!(
        source_of(&entries, &full)["parent"],
        serde_json::Value::Null,
        "the first --incremental without any backup is a full"
    );

    // Changes of every kind, then the first incremental.
    // One statement a call: VACUUM and CREATE DATABASE refuse a transaction block.
    for sql in [
        "INSERT INTO markers VALUES (1)",
        "UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid % 97 = 0",
        // Sets hint bits on every page without WAL (no data checksums here).
        "SELECT count(*) FROM pgbench_accounts",
        "DELETE FROM shrinking WHERE id > 5000",
        "VACUUM shrinking",
        "TRUNCATE emptied",
        "INSERT INTO emptied SELECT generate_series(1, 10)",
        "VACUUM FULL rewritten",
        "DROP TABLE doomed",
        "CREATE TABLE created AS SELECT g AS id FROM generate_series(1, 3000) g",
        "INSERT INTO pgbench_history SELECT 1, 1, 1, g, now(), 'x' FROM generate_series(1, 20000) g",
        "CREATE DATABASE copied TEMPLATE template_source STRATEGY FILE_COPY",
    ] {
        pg.psql("postgres", sql);
    }
    pg.archive_everything();
    let first = agent.backup(&["backup", "pg-base", "--incremental"]);
    let entries = agent.list_json();
    assert_eq!(source_of(&entries, &first)["parent"], full.as_str());
    assert_eq!(source_of(&entries, &first)["depth"], 1);
    let stored = |id: &str| {
        entries.iter().find(|e| e["id"] == id).unwrap()["stored_bytes"]
            .as_u64()
            .unwrap()
    };
    assert!(
        stored(&first) < stored(&full),
        "the incremental stored {} bytes, the full {}",
        stored(&first),
        stored(&full)
    );

    pg.psql("postgres", "INSERT INTO markers VALUES (2)");
    pg.archive_everything();
    std::thread::sleep(Duration::from_millis(300));
    let between = pg.psql("postgres", "SELECT clock_timestamp()::text");
    std::thread::sleep(Duration::from_millis(300));
    let contents_between = contents(&pg, &["postgres", "copied", "gone_later"]);

    // More changes, the second incremental.
    pg.pgbench(&["-c", "2", "-T", "2", "-n"]);
    pg.psql(
        "postgres",
        "INSERT INTO markers VALUES (3);
         DROP TABLE created;
         CREATE TABLE created AS SELECT g AS id FROM generate_series(1, 50) g;
         UPDATE rewritten SET h = md5(h) WHERE id % 10 = 0;",
    );
    pg.psql("postgres", "DROP DATABASE gone_later");
    pg.create_database("fresh");
    pg.psql(
        "fresh",
        "CREATE EXTENSION amcheck; CREATE TABLE t AS SELECT generate_series(1, 500) AS id",
    );
    pg.archive_everything();
    let second = agent.backup(&["backup", "pg-base", "--incremental"]);
    let entries = agent.list_json();
    assert_eq!(source_of(&entries, &second)["parent"], first.as_str());
    assert_eq!(source_of(&entries, &second)["depth"], 2);
    pg.psql("postgres", "INSERT INTO markers VALUES (4)");
    pg.archive_everything();
    let contents_now = contents(&pg, &["postgres", "copied", "fresh"]);

    let verified = agent.ok(&["verify", "--kind", "pg-base"]);
    assert!(!verified.contains("FAILED"), "{verified}");

    // To the end of the archive: all three backups, the newest's rows.
    let (latest, report) = restore(&agent, &["--archive-mode", "off"]);
    assert!(report.contains(&second), "{report}");
    assert_eq!(markers(&latest), "1,2,3,4");
    assert_eq!(
        contents(&latest, &["postgres", "copied", "fresh"]),
        contents_now
    );
    for db in ["postgres", "copied", "fresh"] {
        latest.assert_amcheck(db, &["--heapallindexed"]);
    }
    assert_eq!(
        database_dir_modes(latest.data_dir()),
        database_dir_modes(pg.data_dir())
    );
    drop(latest);

    // Between the incrementals: the full and the first.
    let (middle, report) = restore(
        &agent,
        &["--target-time", &between, "--archive-mode", "off"],
    );
    assert!(report.contains(&first), "{report}");
    assert_eq!(markers(&middle), "1,2");
    assert_eq!(
        contents(&middle, &["postgres", "copied", "gone_later"]),
        contents_between
    );
    for db in ["postgres", "copied", "gone_later"] {
        middle.assert_amcheck(db, &["--heapallindexed"]);
    }
    drop(middle);

    // The chain is cut where max-incremental-chain says.
    let capped = agent
        .clone_with("GC_BACKUP_MAX_INCREMENTAL_CHAIN", "2")
        .backup(&["backup", "pg-base", "--incremental"]);
    let entries = agent.list_json();
    assert_eq!(
        source_of(&entries, &capped)["parent"],
        serde_json::Value::Null
    );
    assert_eq!(source_of(&entries, &capped)["depth"], 0);
    weed.delete(&format!("incr/manifests/pg-base/{capped}.json"));

    // The newest backup's block map gone: the next --incremental is a full, not a failure.
    let map = format!("incr/data/pg-base/{second}/blockmap.zst");
    let listed = weed.keys(&format!("incr/data/pg-base/{second}"));
    assert!(listed.contains(&map), "{listed:?}");
    weed.delete(&map);
    let instead = agent.backup(&["backup", "pg-base", "--incremental"]);
    let entries = agent.list_json();
    assert_eq!(
        source_of(&entries, &instead)["parent"],
        serde_json::Value::Null
    );
    weed.delete(&format!("incr/manifests/pg-base/{instead}.json"));

    // A damaged parent fails every backup on top of it, in verify and in restore.
    let tar = weed
        .keys(&format!("incr/data/pg-base/{full}"))
        .into_iter()
        .find(|k| k.contains("base.") && k.ends_with(".tar.zst"))
        .unwrap();
    weed.flip_byte(&tar);
    let output = agent.run(&["verify", "--kind", "pg-base"]);
    assert_fails(&output, 3, "verify found problems in 3 of 3 backups");
    let listing = String::from_utf8_lossy(&output.stdout);
    assert!(listing.contains(&format!("on top of {full}")), "{listing}");
    let dir = agent.home().join("rotten");
    std::fs::create_dir(&dir).unwrap();
    let output = agent.run(&["restore", "pg", "--pgdata", dir.to_str().unwrap()]);
    harness::assert_exit(&output, 3);
    assert_eq!(
        std::fs::read_dir(&dir).unwrap().count(),
        0,
        "a failed restore left files"
    );
    weed.flip_byte(&tar);

    // A parent lost by hand: refused before anything is written, naming it.
    weed.delete(&format!("incr/manifests/pg-base/{first}.json"));
    let output = agent.run(&["restore", "pg", "--pgdata", dir.to_str().unwrap()]);
    assert_fails(&output, 3, &format!("on top of {first}, which is not in"));
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
}
