//! WAL archiving with a real PostgreSQL whose archive_command is `gc-backup wal-push %p`, into
//! SeaweedFS; and `wal-fetch` exit codes as restore_command needs them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use std::path::Path;

use std::process::Command;

use harness::{Agent, Postgres, Seaweed, assert_exit};

/// A cluster archiving through gc-backup into `prefix`.
fn archiving_cluster(weed: &Seaweed, prefix: &str) -> Postgres {
    harness::archiving_cluster(weed, prefix).0
}

/// Switches to a new segment after writing something, and returns the finished one's name.
fn write_and_switch(pg: &Postgres, round: u32) -> String {
    pg.psql(
        "postgres",
        &format!("INSERT INTO marks SELECT {round}, g FROM generate_series(1, 1000) g"),
    );
    pg.psql("postgres", "SELECT pg_walfile_name(pg_switch_wal())")
}

fn archived_segments(weed: &Seaweed, prefix: &str) -> Vec<String> {
    weed.keys(&format!("{prefix}/wal"))
        .into_iter()
        .filter_map(|k| {
            let name = k.rsplit('/').next()?.strip_suffix(".zst")?.to_string();
            (name.len() == 24).then_some(name)
        })
        .collect()
}

fn wait_archived(pg: &Postgres, segment: &str) {
    pg.wait_for(
        "postgres",
        &format!("SELECT last_archived_wal >= '{segment}' FROM pg_stat_archiver"),
        "t",
        60,
    );
}

fn assert_no_gap(segments: &[String]) {
    let numbers: Vec<u64> = segments
        .iter()
        .map(|name| {
            pitr::WalFile::parse(name)
                .unwrap()
                .segment_no(pitr::DEFAULT_SEGMENT_SIZE)
                .unwrap()
                .0
        })
        .collect();
    for pair in numbers.windows(2) {
        assert_eq!(pair[1], pair[0] + 1, "gap in the archive: {segments:?}");
    }
}

fn fetch(agent: &Agent, name: &str, dest: &Path) -> std::process::Output {
    agent.run(&["wal-fetch", name, dest.to_str().unwrap()])
}

#[test]
fn postgres_archives_every_segment_and_wal_fetch_returns_them() {
    let weed = Seaweed::start();
    let pg = archiving_cluster(&weed, "arch");
    pg.psql("postgres", "CREATE TABLE marks (round int, n int)");
    let mut finished = Vec::new();
    for round in 0..4 {
        finished.push(write_and_switch(&pg, round));
    }
    wait_archived(&pg, finished.last().unwrap());
    assert_eq!(
        pg.psql("postgres", "SELECT failed_count FROM pg_stat_archiver"),
        "0"
    );
    let archived = archived_segments(&weed, "arch");
    for name in &finished {
        assert!(archived.contains(name), "{name} not archived: {archived:?}");
    }
    assert_no_gap(&archived);

    // Fetch one back and compare with PostgreSQL's own copy, if it is still in pg_wal.
    let agent = Agent::for_store(&weed, "arch");
    let name = &finished[0];
    let dest = agent.home().join("RECOVERYXLOG");
    let output = fetch(&agent, name, &dest);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(std::fs::metadata(&dest).unwrap().len(), 16 * 1024 * 1024);
    if let Ok(original) = std::fs::read(pg.data_dir().join("pg_wal").join(name)) {
        assert!(
            std::fs::read(&dest).unwrap() == original,
            "fetched segment differs"
        );
    }
}

#[test]
fn archiving_survives_the_store_going_down_without_a_gap() {
    let mut weed = Seaweed::start();
    let pg = archiving_cluster(&weed, "outage");
    pg.psql("postgres", "CREATE TABLE marks (round int, n int)");
    let first = write_and_switch(&pg, 0);
    wait_archived(&pg, &first);

    weed.kill();
    let mut during = Vec::new();
    for round in 1..4 {
        during.push(write_and_switch(&pg, round));
    }
    // PostgreSQL sees wal-push fail and keeps the segments.
    pg.wait_for(
        "postgres",
        "SELECT failed_count > 0 FROM pg_stat_archiver",
        "t",
        60,
    );
    for name in &during {
        assert!(
            pg.data_dir().join("pg_wal").join(name).exists(),
            "{name} was dropped"
        );
    }

    weed.restart();
    let last = write_and_switch(&pg, 9);
    wait_archived(&pg, &last);
    let archived = archived_segments(&weed, "outage");
    for name in during.iter().chain([&first, &last]) {
        assert!(
            archived.contains(name),
            "{name} missing after the outage: {archived:?}"
        );
    }
    assert_no_gap(&archived);
}

#[test]
fn wal_fetch_exit_codes_tell_postgresql_what_to_do() {
    let mut weed = Seaweed::start();
    let mut agent = Agent::for_store(&weed, "fetch");
    let config = weed.config_file(agent.home(), "fetch");
    agent.set("GC_BACKUP_CONFIG", config.to_str().unwrap());
    let dest = agent.home().join("RECOVERYXLOG");

    // Not in the archive: 1, the only code that lets recovery end normally.
    let output = fetch(&agent, "000000010000000000000007", &dest);
    assert_exit(&output, 1);
    let output = fetch(&agent, "00000005.history", &dest);
    assert_exit(&output, 1);

    // Every mistake is fatal for recovery (above 125), never "not found".
    let output = agent.run(&["wal-fetch", "000000010000000000000007"]);
    assert_exit(&output, 255);
    let output = fetch(&agent, "not-a-wal-name", &dest);
    assert_exit(&output, 255);
    agent.set("AWS_SECRET_ACCESS_KEY", "wrong");
    agent.set("GC_BACKUP_CONFIG", "");
    let output = fetch(&agent, "000000010000000000000007", &dest);
    assert_exit(&output, 255);
    agent.set("GC_BACKUP_CONFIG", config.to_str().unwrap());

    // A local store whose directory is absent (a volume not mounted, a typo) is a store that
    // cannot be reached, never an empty archive: recovery must stop, not promote. Nothing but
    // a backup creates it.
    let unmounted = agent.home().join("not-mounted");
    let url = format!("file://{}", unmounted.display());
    let output = agent.run(&[
        "--store",
        &url,
        "wal-fetch",
        "000000010000000000000007",
        dest.to_str().unwrap(),
    ]);
    harness::assert_fails(&output, 255, "does not exist");
    let output = agent.run(&["--store", &url, "list"]);
    harness::assert_fails(&output, 3, "does not exist");
    assert!(!unmounted.exists(), "a read created the store's directory");

    // The store down: retried, then fatal.
    weed.kill();
    let output = fetch(&agent, "000000010000000000000007", &dest);
    assert_exit(&output, 255);
    assert!(!dest.exists());
}

#[test]
fn wal_push_of_the_same_segment_twice_is_ok_and_never_overwrites() {
    let weed = Seaweed::start();
    let agent = Agent::for_store(&weed, "push");
    let wal = agent.home().join("pg_wal");
    std::fs::create_dir_all(&wal).unwrap();
    let segment = wal.join("000000010000000000000003");
    let original = gc_backup::testing::noise(16 * 1024 * 1024, 3);
    std::fs::write(&segment, &original).unwrap();
    let path = segment.to_str().unwrap();
    agent.ok(&["wal-push", path]);
    agent.ok(&["wal-push", path]);

    std::fs::write(&segment, gc_backup::testing::noise(16 * 1024 * 1024, 4)).unwrap();
    let output = agent.run(&["wal-push", path]);
    harness::assert_fails(&output, 3, "different content");

    let dest = agent.home().join("fetched");
    let output = fetch(&agent, "000000010000000000000003", &dest);
    assert!(output.status.success());
    assert!(
        std::fs::read(&dest).unwrap() == original,
        "the archive was overwritten"
    );

    let history = wal.join("00000002.history");
    std::fs::write(&history, "1\t0/3000000\tno recovery target specified\n").unwrap();
    agent.ok(&["wal-push", history.to_str().unwrap()]);
    let output = agent.run(&["wal-push", wal.join("junk").to_str().unwrap()]);
    harness::assert_fails(&output, 2, "not a WAL file name");
}

#[test]
fn the_sidecar_archives_ahead_so_wal_push_answers_without_the_store() {
    let mut weed = Seaweed::start();
    // PostgreSQL's own archiving fails, so segments stay .ready for the sidecar to find.
    let pg = Postgres::start_with(&[("archive_mode", "on"), ("archive_command", "false")]);
    pg.psql("postgres", "CREATE TABLE marks (round int, n int)");
    let segments: Vec<String> = (0..3).map(|round| write_and_switch(&pg, round)).collect();
    let status = pg.data_dir().join("pg_wal/archive_status");
    for name in &segments {
        assert!(status.join(format!("{name}.ready")).exists());
    }

    let mut agent = Agent::for_store(&weed, "ahead");
    agent.set("PGDATA", pg.data_dir().to_str().unwrap());
    let mut sidecar = agent.command(&["run"]).spawn().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !segments
        .iter()
        .all(|n| status.join(format!("{n}.gc-stored")).exists())
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the sidecar did not archive ahead"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let archived = archived_segments(&weed, "ahead");
    for name in &segments {
        assert!(archived.contains(name), "{name} not in the store");
    }

    // With the store gone, wal-push can only succeed through the sidecar's markers.
    weed.kill();
    let push = |name: &str| {
        agent
            .command(&["wal-push", &format!("pg_wal/{name}")])
            .current_dir(pg.data_dir())
            .output()
            .unwrap()
    };
    let output = push(&segments[0]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // A file that changed since the sidecar read it is not vouched for.
    let changed = pg.data_dir().join("pg_wal").join(&segments[1]);
    let file = std::fs::OpenOptions::new()
        .append(true)
        .open(&changed)
        .unwrap();
    file.set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(5))
        .unwrap();
    assert!(
        !push(&segments[1]).status.success(),
        "a changed file was trusted"
    );

    harness::run_ok(Command::new("kill").args(["-TERM", &sidecar.id().to_string()]));
    let exited = sidecar.wait().unwrap();
    assert!(exited.success(), "the sidecar exited with {exited}");
}

#[test]
fn wal_fetch_prefetches_the_next_segments_into_a_bounded_spool() {
    let mut weed = Seaweed::start();
    let pg = archiving_cluster(&weed, "prefetch");
    pg.psql("postgres", "CREATE TABLE marks (round int, n int)");
    // More than the prefetcher's 8 ahead, so that it must follow recovery to fetch them all.
    let segments: Vec<String> = (0..12).map(|round| write_and_switch(&pg, round)).collect();
    wait_archived(&pg, segments.last().unwrap());

    let agent = Agent::for_store(&weed, "prefetch");
    // The agent's home stands for a data directory in archive recovery.
    std::fs::write(agent.home().join("recovery.signal"), "").unwrap();
    let wal_dir = agent.home().join("pg_wal");
    std::fs::create_dir_all(&wal_dir).unwrap();
    let dest = wal_dir.join("RECOVERYXLOG");
    let output = fetch(&agent, &segments[0], &dest);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    // One spool per (store, cluster): find this store's.
    let spools = wal_dir.join("gc-backup-prefetch");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let spool = loop {
        let found: Vec<_> = std::fs::read_dir(&spools)
            .map(|entries| entries.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        if let [only] = found.as_slice() {
            break only.clone();
        }
        assert!(found.len() < 2, "two spools for one store: {found:?}");
        assert!(std::time::Instant::now() < deadline, "no spool was made");
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    while !segments[1..=8].iter().all(|n| spool.join(n).exists()) {
        assert!(
            std::time::Instant::now() < deadline,
            "nothing was prefetched"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // Bounded: never more than AHEAD segments ahead.
    let spooled = std::fs::read_dir(&spool)
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_name().len() == 24)
        .count();
    assert!(spooled <= 8, "{spooled} segments in the spool");
    assert!(!spool.join(&segments[9]).exists(), "more than 8 ahead");

    // restore_command's shell takes spooled segments without starting gc-backup (nor writing
    // the position): the prefetcher sees them gone and follows.
    let relative = spool.strip_prefix(agent.home()).unwrap();
    let take = gc_backup::wal::prefetch::shell_take(relative).expect("a plain spool path");
    for name in &segments[1..=4] {
        let command = take
            .replace("%f", name)
            .replace("%p", "pg_wal/RECOVERYXLOG")
            + "exit 7";
        let status = Command::new("sh")
            .args(["-c", &command])
            .current_dir(agent.home())
            .status()
            .unwrap();
        assert_eq!(
            status.code(),
            Some(0),
            "{name} was not taken from the spool"
        );
        assert_eq!(std::fs::metadata(&dest).unwrap().len(), 16 * 1024 * 1024);
    }
    std::fs::remove_file(&dest).unwrap();
    while !segments[9..].iter().all(|n| spool.join(n).exists()) {
        assert!(
            std::time::Instant::now() < deadline + std::time::Duration::from_secs(30),
            "the prefetcher did not follow the segments the shell took"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }

    // Another store never gets this store's segments: with prefetch on or off, a wal-fetch
    // from an empty prefix finds nothing, and the spool keeps what it holds.
    let mut elsewhere = Agent::for_store(&weed, "prefetch-elsewhere");
    for prefetch in ["on", "off"] {
        elsewhere.set("GC_BACKUP_WAL_PREFETCH", prefetch);
        let output = fetch(&elsewhere, &segments[5], &dest);
        harness::assert_fails(&output, 1, "not in the archive");
        assert!(!dest.exists(), "another store's segment was served");
        assert!(spool.join(&segments[5]).exists());
    }

    // The next segments come from the spool: the store is not needed any more.
    weed.kill();
    let output = fetch(&agent, &segments[5], &dest);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(std::fs::metadata(&dest).unwrap().len(), 16 * 1024 * 1024);
    if let Ok(original) = std::fs::read(pg.data_dir().join("pg_wal").join(&segments[5])) {
        assert!(
            std::fs::read(&dest).unwrap() == original,
            "prefetched segment differs"
        );
    }
    assert!(
        !spool.join(&segments[5]).exists(),
        "taken from the spool, not copied"
    );

    // recovery_end_command: the spool and its prefetcher are gone once recovery is over.
    let mut stop = agent.command(&["wal-prefetch-stop"]);
    stop.current_dir(agent.home());
    let output = harness::run_ok(&mut stop);
    assert!(output.status.success());
    assert!(!spools.exists(), "the spool outlived wal-prefetch-stop");
}
