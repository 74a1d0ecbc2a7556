//! Azure Blob Storage end to end, against Azurite on loopback: WAL archived by `wal-push`, a
//! pg-dump restored into a new database, and a pg-base backup restored to a moment between
//! two rows, all through `az://` (the store conformance suite runs against Azurite too).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use std::time::Duration;

use harness::{Agent, Azurite, archiving_cluster_configured, pg_bin_dir, restore_started};

#[test]
fn a_dump_and_a_base_backup_go_through_azure_and_restore_to_a_moment() {
    let azurite = Azurite::start();
    let (pg, config) = archiving_cluster_configured(pg_bin_dir(), &azurite, "az", "");
    let agent =
        Agent::for_cluster(&pg, &azurite, "az").with("GC_BACKUP_CONFIG", config.to_str().unwrap());
    pg.pgbench(&["-i", "-s", "1", "-q"]);
    pg.psql("postgres", "CREATE TABLE markers (id int PRIMARY KEY)");

    let dump = agent.backup(&["backup", "pg-dump"]);
    pg.create_database("restored");
    let target = format!(
        "host=127.0.0.1 port={} user=postgres dbname=restored",
        pg.port
    );
    agent.ok(&["restore", "pg-dump", &dump, "--dbname", &target]);
    let sorted = |db: &str| {
        let mut tables: Vec<String> = pg.fingerprint(db).lines().map(String::from).collect();
        tables.sort();
        tables
    };
    assert_eq!(sorted("restored"), sorted("postgres"));

    let base = agent.backup(&["backup", "pg-base"]);
    pg.psql("postgres", "INSERT INTO markers VALUES (1)");
    std::thread::sleep(Duration::from_millis(300));
    let between = pg.psql("postgres", "SELECT clock_timestamp()::text");
    std::thread::sleep(Duration::from_millis(300));
    pg.psql("postgres", "INSERT INTO markers VALUES (2)");
    pg.archive_everything();

    let keys = azurite.keys("az");
    for kind in ["wal/", "pg-dump/", "pg-base/"] {
        assert!(
            keys.iter().any(|k| k.contains(kind)),
            "nothing under {kind} in the container: {keys:?}"
        );
    }
    let listed = agent.list_json();
    for id in [&dump, &base] {
        assert!(
            listed.iter().any(|b| b["id"].as_str() == Some(id.as_str())),
            "{id} is not listed: {listed:?}"
        );
    }
    let (restored, report) = restore_started(
        &agent,
        "az-restored",
        &["--target-time", &between, "--archive-mode", "off"],
    );
    assert!(
        report.contains(&format!("pg-base backup {base}")),
        "{report}"
    );
    assert_eq!(
        restored.psql("postgres", "SELECT string_agg(id::text, ',') FROM markers"),
        "1"
    );
    // Every checksum of both backups and the WAL between them reads back from Azure.
    agent.ok(&["verify"]);
}
