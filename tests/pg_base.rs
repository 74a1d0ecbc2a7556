//! `backup pg-base` of a cluster that archives through `gc-backup wal-push`, taken while
//! pgbench writes, restored with `restore pg` and started with `wal-fetch` as restore_command.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use std::process::Command;

use harness::{Agent, Postgres, Seaweed, archiving_cluster, assert_exit, assert_fails};

#[test]
fn a_base_backup_taken_under_load_restores_to_a_consistent_cluster() {
    let weed = Seaweed::start();
    let (pg, config) = archiving_cluster(&weed, "base");
    pg.pgbench(&["-i", "-s", "3", "-q"]);
    let agent = Agent::for_cluster(&pg, &weed, "base");

    // Writes go on during the whole backup.
    let mut load = Command::new(pg.bin.join("pgbench"))
        .envs(pg.env())
        .args(["-c", "2", "-T", "600", "-n", "postgres"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let id = agent.backup(&["backup", "pg-base"]);
    // More WAL after the backup, then a marker that only replay can bring back.
    std::thread::sleep(std::time::Duration::from_millis(500));
    let _ = load.kill();
    let _ = load.wait();
    pg.psql(
        "postgres",
        "CREATE TABLE after_backup AS SELECT 42 AS answer",
    );
    let expected = pg.pgbench_sums();
    pg.archive_everything();

    let listed = agent.list_json();
    let entry = listed.iter().find(|e| e["id"] == id.as_str()).unwrap();
    assert_eq!(entry["kind"], "pg-base");
    assert_eq!(entry["timeline"], 1);
    let start: pitr::Lsn = entry["start_lsn"].as_str().unwrap().parse().unwrap();
    let stop: pitr::Lsn = entry["stop_lsn"].as_str().unwrap().parse().unwrap();
    assert!(start < stop, "{start} !< {stop}");
    // The WAL from the start segment to the stop segment is in the archive.
    let keys = weed.keys("base/wal");
    for name in [
        entry["start_wal"].as_str().unwrap(),
        entry["stop_wal"].as_str().unwrap(),
    ] {
        assert!(
            keys.iter().any(|k| k.contains(name)),
            "{name} not archived: {keys:?}"
        );
    }

    // Restore into a directory the server's user owns, and start it.
    let target = harness::shared_temp_dir("restored");
    let data = target.path().join("data");
    std::fs::create_dir(&data).unwrap();
    harness::run_ok(Command::new("chown").arg("postgres:postgres").arg(&data));
    let mut restorer = Agent::for_cluster(&pg, &weed, "base");
    restorer.set("GC_BACKUP_CONFIG", config.to_str().unwrap());
    restorer.ok(&[
        "restore",
        "pg",
        "--pgdata",
        data.to_str().unwrap(),
        "--backup",
        &id,
    ]);
    assert!(data.join("backup_label").exists() && data.join("recovery.signal").exists());
    assert!(!data.join("postmaster.pid").exists());

    let restored = Postgres::start_restored(target);
    restored.wait_for("postgres", "SELECT pg_is_in_recovery()", "f", 120);
    assert_eq!(
        restored.pgbench_sums(),
        expected,
        "restored cluster is inconsistent"
    );
    assert_eq!(
        restored.psql("postgres", "SELECT answer FROM after_backup"),
        "42"
    );
    restored.assert_amcheck("postgres", &["--install-missing"]);
}

#[test]
fn a_base_backup_is_refused_when_archiving_is_off() {
    let weed = Seaweed::start();
    let pg = Postgres::start();
    let agent = Agent::for_cluster(&pg, &weed, "noarchive");
    assert_fails(&agent.run(&["backup", "pg-base"]), 2, "archiving is off");
    assert!(weed.keys("noarchive").is_empty());
}

/// archive_command succeeds but archives nowhere: PostgreSQL believes its WAL is archived,
/// the store does not have it, and a backup that could not be restored from this store must
/// not be committed.
#[test]
fn a_base_backup_whose_wal_never_reaches_the_store_is_refused() {
    let weed = Seaweed::start();
    let pg = Postgres::start_with(&[("archive_mode", "on"), ("archive_command", "true")]);
    let mut agent = Agent::for_cluster(&pg, &weed, "elsewhere");
    agent.set("GC_BACKUP_ARCHIVE_TIMEOUT", "3s");
    // WAL switches throughout, so that the backup's first segment is finished (and marked
    // archived by `true`) long before the backup looks for it in the store.
    let done = std::sync::atomic::AtomicBool::new(false);
    let started = std::time::Instant::now();
    let output = std::thread::scope(|scope| {
        scope.spawn(|| {
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                pg.psql(
                    "postgres",
                    "SELECT pg_switch_wal() FROM (SELECT txid_current()) t",
                );
            }
        });
        let output = agent.run(&["backup", "pg-base"]);
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        output
    });
    assert_fails(&output, 2, "that this backup needs did not reach");
    assert!(started.elapsed() < std::time::Duration::from_secs(60));
    assert!(agent.list_json().is_empty());
    let keys = weed.keys("elsewhere");
    assert!(
        keys.iter()
            .all(|k| !k.contains("/data/") && !k.contains("/manifests/")),
        "the failed backup left {keys:?}"
    );
}

#[test]
fn a_base_backup_refuses_a_data_directory_of_another_cluster() {
    let weed = Seaweed::start();
    let (pg, _) = archiving_cluster(&weed, "other");
    let stranger = Postgres::start();
    let mut agent = Agent::for_cluster(&pg, &weed, "other");
    agent.set("PGDATA", stranger.data_dir().to_str().unwrap());
    assert_fails(&agent.run(&["backup", "pg-base"]), 2, "belongs to cluster");
}

#[test]
fn restore_refuses_a_non_empty_directory_and_leaves_it_untouched() {
    let weed = Seaweed::start();
    let (pg, _) = archiving_cluster(&weed, "nonempty");
    let agent = Agent::for_cluster(&pg, &weed, "nonempty");
    agent.backup(&["backup", "pg-base"]);
    let dir = agent.home().join("busy");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("keep.txt"), "mine").unwrap();
    let output = agent.run(&["restore", "pg", "--pgdata", dir.to_str().unwrap()]);
    assert_fails(&output, 2, "not empty");
    assert_eq!(
        std::fs::read_to_string(dir.join("keep.txt")).unwrap(),
        "mine"
    );
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
}

#[test]
fn a_file_that_differs_from_its_manifest_fails_verify_and_restore_and_leaves_nothing() {
    let weed = Seaweed::start();
    let (pg, _) = archiving_cluster(&weed, "crc");
    let agent = Agent::for_cluster(&pg, &weed, "crc");
    let id = agent.backup(&["backup", "pg-base"]);
    agent.ok(&["verify", &id]);

    // The manifest says pg_control had other bytes than the stream holds: every zstd frame
    // still checks out, so only the per-file CRC-32C can tell.
    let key = format!("crc/manifests/pg-base/{id}.json");
    let mut manifest: serde_json::Value = serde_json::from_slice(&weed.get(&key)).unwrap();
    let files = manifest["source"]["files"].as_array_mut().unwrap();
    let control = files
        .iter_mut()
        .find(|f| f["path"] == "global/pg_control")
        .unwrap();
    let crc = control["crc32c"].as_u64().unwrap();
    control["crc32c"] = serde_json::json!(crc ^ 1);
    weed.put(&key, &serde_json::to_vec(&manifest).unwrap());

    let output = agent.run(&["verify", &id]);
    let report = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    assert_exit(&output, 3);
    assert!(
        report.contains("global/pg_control") && report.contains("does not match"),
        "{report}"
    );

    let dir = agent.home().join("restored");
    let output = agent.run(&["restore", "pg", "--pgdata", dir.to_str().unwrap()]);
    assert_fails(&output, 3, "global/pg_control");
    assert!(
        !dir.exists() || std::fs::read_dir(&dir).unwrap().next().is_none(),
        "a failed restore left files behind"
    );
}

/// ~250 MB more in PGDATA, so that a base backup takes a moment: a file PostgreSQL ignores
/// and the backup copies. Not a table: its ~300 MB of WAL would have to reach the archive
/// first, and a fast shutdown waits until the archiver has stored every `.ready` segment (16
/// of them took 19 s on a loaded 2-core machine, and once more than pg_ctl's 60 s in CI).
fn load_bulk(pg: &Postgres) {
    use std::io::Write;
    let path = pg.data_dir().join("gc-backup-test-bulk");
    let mut file = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
    // Hex text of a simple generator: compressible about as well as md5 text rows are.
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    for _ in 0..(250 << 20) / 16 {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1);
        write!(file, "{:016x}", state >> 8).unwrap();
    }
    file.flush().unwrap();
}

/// Waits until the agent's session has started backup mode and is copying files.
fn wait_for_backup_mode(pg: &Postgres) {
    pg.wait_for(
        "postgres",
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'gc-backup' \
         AND query LIKE '%pg_backup_start%' AND state = 'idle'",
        "1",
        60,
    );
}

#[test]
fn sigkill_during_a_base_backup_commits_nothing_ends_backup_mode_and_the_next_run_cleans_up() {
    let weed = Seaweed::start();
    let (pg, _) = archiving_cluster(&weed, "killed");
    load_bulk(&pg);
    let mut agent = Agent::for_cluster(&pg, &weed, "killed");
    agent.set("GC_BACKUP_PART_SIZE", "5MiB");
    let mut child = agent.command(&["backup", "pg-base"]).spawn().unwrap();
    wait_for_backup_mode(&pg);
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();

    // The server ends backup mode when the session goes away.
    pg.wait_for(
        "postgres",
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'gc-backup'",
        "0",
        30,
    );
    let log = std::fs::read_to_string(pg.dir().join("server.log")).unwrap();
    assert!(
        log.contains("aborting backup due to backend exiting"),
        "server log:\n{log}"
    );
    assert!(agent.list_json().is_empty());
    let leftovers = weed.keys("killed/data");
    assert!(
        !leftovers.is_empty(),
        "the killed run should have left its claim"
    );

    // The next run removes what the killed one left, and succeeds.
    agent.set("GC_BACKUP_PART_SIZE", "8MiB");
    let id = agent.backup(&["backup", "pg-base"]);
    let data = weed.keys("killed/data");
    assert!(
        data.iter().all(|k| k.contains(&id)),
        "leftovers remain: {data:?}"
    );
    assert_eq!(agent.list_json().len(), 1);
}

/// The tar writers write into the compressor on their own threads: when the store dies, the
/// upload's failure must be what is reported (not the writers' broken pipes), every stream
/// must stop, and nothing may be committed.
#[test]
fn the_store_dying_during_a_base_backup_commits_nothing_and_names_the_store() {
    let mut weed = Seaweed::start();
    let (pg, _) = archiving_cluster(&weed, "storedies");
    load_bulk(&pg);
    let mut agent = Agent::for_cluster(&pg, &weed, "storedies");
    agent.with_config("[store]\nretry-timeout = \"3s\"\nmax-retries = 2\n");
    agent.set("GC_BACKUP_PART_SIZE", "5MiB");
    let child = agent.spawn_captured(&["backup", "pg-base"]);
    wait_for_backup_mode(&pg);
    weed.kill();
    let output = child.wait_with_output().unwrap();
    assert_fails(&output, 3, "nothing was committed");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !stderr.contains("copying PGDATA"),
        "the writers' broken pipe was reported instead of the store:\n{stderr}"
    );
    weed.restart();
    assert!(agent.list_json().is_empty());
    let manifests = weed.keys("storedies/manifests");
    assert!(manifests.is_empty(), "{manifests:?}");
}

#[test]
fn postgres_stopping_in_the_middle_of_a_base_backup_fails_it_and_lists_nothing() {
    let weed = Seaweed::start();
    let (pg, _) = archiving_cluster(&weed, "stopped");
    load_bulk(&pg);
    let agent = Agent::for_cluster(&pg, &weed, "stopped");
    let child = agent.spawn_captured(&["backup", "pg-base"]);
    wait_for_backup_mode(&pg);
    pg.stop("fast");
    let output = child.wait_with_output().unwrap();
    assert_fails(&output, 3, "nothing was committed");
    assert!(agent.list_json().is_empty());
}

#[test]
fn a_base_backup_is_refused_while_archiving_is_failing() {
    let weed = Seaweed::start();
    let pg = Postgres::start_with(&[("archive_mode", "on"), ("archive_command", "false")]);
    pg.psql(
        "postgres",
        "SELECT pg_switch_wal() FROM (SELECT txid_current()) t",
    );
    pg.wait_for(
        "postgres",
        "SELECT failed_count > 0 FROM pg_stat_archiver",
        "t",
        60,
    );
    let agent = Agent::for_cluster(&pg, &weed, "failing");
    assert_fails(
        &agent.run(&["backup", "pg-base"]),
        2,
        "archiving is failing",
    );
    assert!(weed.keys("failing").is_empty());
}
