//! `backup redis` against real `redis-server` processes: snapshots taken over the replication
//! protocol in both framings (diskless `$EOF:` and length), restored to `dump.rdb` that a new
//! server loads with the same `DEBUG DIGEST` and that `redis-check-rdb` accepts; a wrong
//! password; a stored object with one flipped bit; Redis 7's AOF set, with unchanged files not
//! uploaded twice and with writes and rewrites going on during the backup.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use harness::redis::{self, Redis};
use harness::{Agent, Seaweed, assert_exit, assert_fails};

fn backup_and_restore(diskless: bool) {
    let weed = Seaweed::start();
    let source = Redis::start(diskless);
    source.populate(20_000);
    let digest = source.digest();
    let agent = Agent::for_store(&weed, "rdb").with("GC_BACKUP_REDIS_URL", &source.url());

    let id = agent.backup(&["backup", "redis"]);
    let listed = agent.list_json();
    let entry = listed.iter().find(|e| e["id"] == id.as_str()).unwrap();
    assert_eq!(entry["kind"], "redis");
    assert_eq!(entry["diskless"], diskless);
    assert!(
        entry["crc64"].as_str().is_some_and(|c| c.len() == 16),
        "{entry}"
    );
    assert!(
        !entry.to_string().contains(redis::PASSWORD),
        "the password reached the manifest"
    );

    let out = agent.home().join("restored");
    agent.ok(&["restore", "redis", &id, "--output", out.to_str().unwrap()]);
    let rdb = out.join("dump.rdb");
    redis::check_rdb(&rdb);
    let restored = Redis::start_on(&out);
    assert_eq!(restored.digest(), digest, "the restored dataset differs");
    assert_eq!(restored.cli(&["HGET", "file:42", "name"]), "a.txt");

    // A second restore never overwrites the file.
    let output = agent.run(&[
        "restore",
        "redis",
        "latest",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert_fails(&output, 2, "already exists");
}

#[test]
fn a_diskless_snapshot_restores_to_the_same_dataset() {
    backup_and_restore(true);
}

#[test]
fn a_length_framed_snapshot_restores_to_the_same_dataset() {
    backup_and_restore(false);
}

#[test]
fn a_wrong_password_is_one_clear_error_and_stores_nothing() {
    let weed = Seaweed::start();
    let source = Redis::start(true);
    let mut agent = Agent::for_store(&weed, "wrongpw").with("GC_BACKUP_REDIS_URL", &source.url());
    agent.set(
        "GC_BACKUP_REDIS_URL",
        &format!("redis://:not-it@127.0.0.1:{}", source.port),
    );
    let output = agent.run(&["backup", "redis"]);
    assert_fails(&output, 2, "refused the credentials");
    assert!(!String::from_utf8_lossy(&output.stderr).contains("not-it"));
    assert!(weed.keys("wrongpw").is_empty());

    // No password at all, where one is needed.
    agent.set(
        "GC_BACKUP_REDIS_URL",
        &format!("redis://127.0.0.1:{}", source.port),
    );
    assert_fails(&agent.run(&["backup", "redis"]), 2, "needs a password");

    // An ACL user, its password from redis-cli's variable rather than the URL.
    source.cli(&[
        "ACL",
        "SETUSER",
        "backup",
        "on",
        ">backup-pw",
        "~*",
        "+@all",
    ]);
    agent.set(
        "GC_BACKUP_REDIS_URL",
        &format!("redis://backup@127.0.0.1:{}", source.port),
    );
    agent.set("REDISCLI_AUTH", "backup-pw");
    agent.backup(&["backup", "redis"]);
    assert_eq!(agent.list_json().len(), 1);
}

#[test]
fn a_flipped_bit_in_the_store_fails_the_restore_and_writes_no_file() {
    let weed = Seaweed::start();
    let source = Redis::start(true);
    source.populate(5_000);
    let agent = Agent::for_store(&weed, "rot").with("GC_BACKUP_REDIS_URL", &source.url());
    let id = agent.backup(&["backup", "redis"]);
    // The drill: a temporary redis-server loads the snapshot and counts its keys.
    let keys = source.cli(&["DBSIZE"]);
    let drill = agent.ok(&["verify", "--restore", "--kind", "redis"]);
    assert!(
        drill.contains(&format!("Restore drill of redis {id}"))
            && drill.contains(&format!("loaded dump.rdb: {keys} keys")),
        "{drill}"
    );
    let key = weed
        .keys("rot/data/redis")
        .into_iter()
        .find(|k| k.ends_with(".zst"))
        .unwrap();
    weed.flip_byte(&key);
    assert_fails(
        &agent.run(&["verify", "--restore", "--kind", "redis"]),
        3,
        &id,
    );
    let out = agent.home().join("restored");
    let output = agent.run(&["restore", "redis", &id, "--output", out.to_str().unwrap()]);
    assert_fails(&output, 3, &id);
    assert!(!out.join("dump.rdb").exists());
    assert!(!out.join("dump.rdb.partial").exists());
}

#[test]
fn rediss_with_a_private_ca_and_a_client_certificate() {
    let weed = Seaweed::start();
    let source = Redis::start_tls();
    source.populate(2_000);
    let digest = source.digest();
    let mut agent = Agent::for_store(&weed, "tls").with("GC_BACKUP_REDIS_URL", &source.url());

    // The server's CA is not trusted yet: a TLS error, nothing stored.
    let output = agent.run(&["backup", "redis"]);
    assert_fails(&output, 3, "TLS with rediss://127.0.0.1");
    assert!(weed.keys("tls").is_empty());

    agent.set(
        "GC_BACKUP_REDIS_CA_FILE",
        source.ca_file().to_str().unwrap(),
    );
    let (cert, key) = source.client_certificate();
    agent.set("GC_BACKUP_REDIS_CERT_FILE", cert.to_str().unwrap());
    agent.set("GC_BACKUP_REDIS_KEY_FILE", key.to_str().unwrap());
    let id = agent.backup(&["backup", "redis"]);
    let out = agent.home().join("restored");
    agent.ok(&["restore", "redis", &id, "--output", out.to_str().unwrap()]);
    assert_eq!(Redis::start_on(&out).digest(), digest);
}

/// An agent that backs up `source` with its AOF set.
fn aof_agent(weed: &Seaweed, prefix: &str, source: &Redis) -> Agent {
    Agent::for_store(weed, prefix)
        .with("GC_BACKUP_REDIS_URL", &source.url())
        .with(
            "GC_BACKUP_REDIS_AOF_DIR",
            source.aof_dir().to_str().unwrap(),
        )
}

fn aof_files(entry: &serde_json::Value) -> Vec<(String, String, bool)> {
    entry["aof"]["files"]
        .as_array()
        .unwrap_or_else(|| panic!("no AOF set in {entry}"))
        .iter()
        .map(|f| {
            (
                f["name"].as_str().unwrap().to_string(),
                f["key"].as_str().unwrap().to_string(),
                f["reused"].as_bool().unwrap(),
            )
        })
        .collect()
}

#[test]
fn an_aof_set_restores_and_unchanged_files_are_not_uploaded_again() {
    let weed = Seaweed::start();
    let source = Redis::start_aof();
    source.populate(5_000);
    // DEBUG POPULATE bypasses the AOF; a rewrite puts the dataset into the base file.
    source.rewrite_aof();
    source.cli(&["SET", "after-rewrite", "1"]);
    let first_digest = source.digest();
    let agent = aof_agent(&weed, "aof", &source);
    let first = agent.backup(&["backup", "redis"]);

    for n in 0..200 {
        source.cli(&["RPUSH", "queue", &n.to_string()]);
    }
    let second_digest = source.digest();
    let second = agent.backup(&["backup", "redis"]);
    // The drill loads the AOF set, as Redis does when both are there.
    let keys = source.cli(&["DBSIZE"]);
    let drill = agent.ok(&["verify", "--restore", "--kind", "redis"]);
    assert!(
        drill.contains(&format!("loaded the AOF set: {keys} keys")),
        "{drill}"
    );

    let listed = agent.list_json();
    let entry = |id: &str| listed.iter().find(|e| e["id"] == id).unwrap().clone();
    let (first_files, second_files) = (aof_files(&entry(&first)), aof_files(&entry(&second)));
    assert_eq!(first_files.len(), 2, "{first_files:?}");
    assert!(first_files.iter().all(|(_, _, reused)| !reused));
    assert!(first_files[0].0.ends_with(".base.rdb"));
    // The base did not change: the second backup names the first one's object.
    assert_eq!(second_files[0].0, first_files[0].0);
    assert!(second_files[0].2, "{second_files:?}");
    assert_eq!(second_files[0].1, first_files[0].1);
    assert!(second_files[0].1.contains(&first));
    // The incremental file grew: uploaded again, under the second backup.
    assert!(!second_files[1].2);
    assert!(second_files[1].1.contains(&second));
    assert!(
        !weed
            .keys(&format!("aof/data/redis/{second}"))
            .iter()
            .any(|k| k.contains(".base.rdb")),
        "the unchanged base file was uploaded again"
    );

    for (id, digest) in [(&first, &first_digest), (&second, &second_digest)] {
        let out = agent.home().join(format!("restored-{id}"));
        agent.ok(&["restore", "redis", id, "--output", out.to_str().unwrap()]);
        let manifest = out.join("appendonlydir/appendonly.aof.manifest");
        redis::check_aof(&manifest);
        redis::check_rdb(&out.join("dump.rdb"));
        assert_eq!(
            Redis::start_on_aof(&out).digest(),
            *digest,
            "the dataset loaded from the restored AOF of {id} differs"
        );
        assert_eq!(Redis::start_on(&out).digest(), *digest, "dump.rdb of {id}");
    }

    agent.ok(&["verify", "--kind", "redis"]);
    // One flipped byte in the shared base file: verify reads it once and fails both backups
    // that name it.
    weed.flip_byte(&format!("aof/{}", first_files[0].1));
    let verified = agent.run(&["verify", "--kind", "redis"]);
    assert_exit(&verified, 3);
    let lines = String::from_utf8_lossy(&verified.stdout).to_string();
    for id in [&first, &second] {
        assert!(
            lines
                .lines()
                .any(|l| l.contains(id.as_str()) && l.contains("FAILED")),
            "{id} not failed: {lines}"
        );
    }
    weed.flip_byte(&format!("aof/{}", first_files[0].1));
    agent.ok(&["verify", "--kind", "redis"]);

    // One flipped byte in the stored incremental file: the restore fails and leaves nothing.
    weed.flip_byte(&format!("aof/{}", second_files[1].1));
    let out = agent.home().join("rotten");
    let output = agent.run(&[
        "restore",
        "redis",
        &second,
        "--output",
        out.to_str().unwrap(),
    ]);
    assert_fails(&output, 3, &second);
    let left: Vec<_> = std::fs::read_dir(&out)
        .map(|dir| dir.map(|e| e.unwrap().file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "a failed restore left {left:?}");
}

#[test]
fn writes_and_rewrites_during_an_aof_backup_leave_a_consistent_set() {
    let weed = Seaweed::start();
    let source = Redis::start_aof();
    source.populate(2_000);
    source.rewrite_aof();
    let agent = aof_agent(&weed, "busy", &source);

    // Every transaction bumps a counter and appends the new value to a list, so any
    // consistent state has LLEN log == counter and the log is 1..=counter in order.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        let mut connection = source.connect();
        let mut rewriter = source.connect();
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                connection.call(&["MULTI"]);
                connection.call(&["INCR", "counter"]);
                connection.call(&["RPUSH", "log", &n.to_string()]);
                connection.call(&["SET", &format!("key:{n}"), &"v".repeat(100)]);
                assert_eq!(connection.call(&["EXEC"]), "*3");
                if n.is_multiple_of(3_000) {
                    // Refused while one is running; either way the manifest keeps changing.
                    rewriter.call(&["BGREWRITEAOF"]);
                }
            }
            n
        })
    };
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(agent.backup(&["backup", "redis"]));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let written = writer.join().unwrap();
    assert!(
        written > 100,
        "the writer barely ran ({written} transactions)"
    );

    for id in &ids {
        let out = agent.home().join(format!("restored-{id}"));
        agent.ok(&["restore", "redis", id, "--output", out.to_str().unwrap()]);
        redis::check_aof(&out.join("appendonlydir/appendonly.aof.manifest"));
        let restored = Redis::start_on_aof(&out);
        let counter: u64 = restored.cli(&["GET", "counter"]).parse().unwrap_or(0);
        assert_eq!(
            restored.cli(&["LLEN", "log"]),
            counter.to_string(),
            "backup {id}"
        );
        if counter > 0 {
            assert_eq!(restored.cli(&["LINDEX", "log", "-1"]), counter.to_string());
            assert_eq!(
                restored.cli(&["EXISTS", &format!("key:{counter}")]),
                "1",
                "backup {id}"
            );
            assert_eq!(
                restored.cli(&["EXISTS", &format!("key:{}", counter + 1)]),
                "0"
            );
        }
    }
}

#[test]
fn an_aof_dir_that_is_not_one_is_refused_before_anything_is_stored() {
    let weed = Seaweed::start();
    let source = Redis::start(true);
    let mut agent = Agent::for_store(&weed, "notaof").with("GC_BACKUP_REDIS_URL", &source.url());
    let empty = agent.home().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    agent.set("GC_BACKUP_REDIS_AOF_DIR", empty.to_str().unwrap());
    let output = agent.run(&["backup", "redis"]);
    assert_fails(&output, 2, "has no AOF manifest");
    assert!(weed.keys("notaof").is_empty());
}

/// The current second, and the time string of it (UTC) that `--target-time` takes.
fn this_second() -> (u64, String) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let text = chrono::DateTime::from_timestamp(now as i64, 0)
        .unwrap()
        .to_rfc3339();
    (now, text)
}

/// Sleeps into the second after `second`.
fn after_second(second: u64) {
    while this_second().0 <= second {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Writes `before`, takes T in a later second, and writes `after` in a second later still,
/// with a backup before and one after: T lies between them.
fn writes_around_a_moment(source: &Redis, agent: &Agent) -> String {
    source.cli(&["SET", "early", "1"]);
    agent.backup(&["backup", "redis"]);
    let (written, _) = this_second();
    source.cli(&["SET", "before", "1"]);
    after_second(written);
    let (target, text) = this_second();
    after_second(target);
    source.cli(&["SET", "after", "1"]);
    agent.backup(&["backup", "redis"]);
    text
}

/// `restore redis latest --target-time T --output HOME/NAME`, asserted to succeed: the
/// directory and the report.
fn restore_to(agent: &Agent, target: &str, name: &str) -> (std::path::PathBuf, String) {
    let out = agent.home().join(name);
    let output = agent.run(&[
        "restore",
        "redis",
        "latest",
        "--target-time",
        target,
        "--output",
        out.to_str().unwrap(),
    ]);
    let report = String::from_utf8_lossy(&output.stderr).to_string();
    assert!(output.status.success(), "{report}");
    (out, report)
}

#[test]
fn an_aof_set_with_timestamps_restores_to_a_moment_and_one_without_falls_back_to_the_snapshot() {
    let weed = Seaweed::start();
    let source = Redis::start_aof_timestamped();
    let agent = aof_agent(&weed, "aof-pitr", &source);
    let target = writes_around_a_moment(&source, &agent);
    let (out, report) = restore_to(&agent, &target, "at-target");
    assert!(
        report.contains("cut in") && !report.contains("  "),
        "{report}"
    );
    assert!(!out.join("dump.rdb").exists(), "{report}");
    redis::check_aof(&out.join("appendonlydir/appendonly.aof.manifest"));
    let restored = Redis::start_on_aof(&out);
    let get = |key: &str| restored.cli(&["GET", key]);
    assert_eq!(
        (get("early"), get("before"), get("after")),
        ("1".into(), "1".into(), String::new()),
        "{report}"
    );
    drop(restored);

    // Outside what the backups hold: refused, nothing written.
    for (when, needle) in [
        ("2001-01-01T00:00:00Z", "before the oldest redis backup"),
        ("2999-01-01T00:00:00Z", "after the newest redis backup"),
    ] {
        let nowhere = agent.home().join(format!("nowhere-{}", &when[..4]));
        let output = agent.run(&[
            "restore",
            "redis",
            "latest",
            "--target-time",
            when,
            "--output",
            nowhere.to_str().unwrap(),
        ]);
        assert_fails(&output, 2, needle);
        assert!(!nowhere.exists());
    }

    // Without aof-timestamp-enabled there is nothing to cut at: the snapshot of the backup
    // before the moment, and the restore says why.
    let plain = Redis::start_aof();
    let agent = aof_agent(&weed, "aof-plain", &plain);
    let target = writes_around_a_moment(&plain, &agent);
    let (out, report) = restore_to(&agent, &target, "plain-at-target");
    assert!(
        report.contains("no #TS annotations") && report.contains("snapshot"),
        "{report}"
    );
    assert!(!out.join("appendonlydir").exists());
    let restored = Redis::start_on(&out);
    let get = |key: &str| restored.cli(&["GET", key]);
    assert_eq!(
        (get("early"), get("before")),
        ("1".into(), String::new()),
        "{report}"
    );
}

#[test]
fn a_moment_between_a_rewrite_and_the_next_write_is_the_base_alone() {
    let weed = Seaweed::start();
    let source = Redis::start_aof_timestamped();
    source.cli(&["SET", "in-base", "1"]);
    // The rewrite puts the dataset into a new base file; its incremental file starts empty.
    source.rewrite_aof();
    let (rewritten, _) = this_second();
    after_second(rewritten);
    let (target, text) = this_second();
    after_second(target);
    source.cli(&["SET", "later", "1"]);
    let agent = aof_agent(&weed, "aof-base", &source);
    agent.backup(&["backup", "redis"]);

    // The incremental file's first timestamp is after T, and no backup ended before T: only
    // the base's own time (its RDB aux field ctime) says it can be used.
    let (out, report) = restore_to(&agent, &text, "base-alone");
    redis::check_aof(&out.join("appendonlydir/appendonly.aof.manifest"));
    let restored = Redis::start_on_aof(&out);
    let get = |key: &str| restored.cli(&["GET", key]);
    assert_eq!(
        (get("in-base"), get("later")),
        ("1".into(), String::new()),
        "{report}"
    );
}

/// `pipeline.max-upload-rate` holds a backup to its rate: the last part leaves no sooner than
/// the parts before it take at that rate. A lower bound, which no machine's speed can break.
#[test]
fn an_upload_rate_limit_holds_a_backup_to_its_rate() {
    use std::io::Read;
    const MIB: f64 = 1024.0 * 1024.0;
    let source = Redis::start(false);
    // Values zstd cannot shrink below half: the hex of random bytes.
    let mut random = std::fs::File::open("/dev/urandom").unwrap();
    for i in 0..60 {
        let mut bytes = vec![0u8; 50 * 1024];
        random.read_exact(&mut bytes).unwrap();
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        source.cli(&["SET", &format!("blob:{i}"), &hex]);
    }
    let store = tempfile::tempdir().unwrap();
    let agent = Agent::new(vec![
        (
            "GC_BACKUP_STORE".into(),
            format!("file://{}", store.path().display()),
        ),
        ("GC_BACKUP_REDIS_URL".into(), source.url()),
        ("GC_BACKUP_PART_SIZE".into(), "1MiB".into()),
        ("GC_BACKUP_MAX_UPLOAD_RATE".into(), "1MiB/s".into()),
    ]);
    let begun = std::time::Instant::now();
    let id = agent.backup(&["backup", "redis"]);
    let elapsed = begun.elapsed().as_secs_f64();
    let listed = agent.list_json();
    let entry = listed.iter().find(|e| e["id"] == id.as_str()).unwrap();
    let stored = entry["stored_bytes"].as_f64().unwrap();
    assert!(stored > 3.0 * MIB, "too little to measure: {entry}");
    // Every part but the last (at most 1 MiB) is paid for at 1 MiB/s before the last leaves.
    let floor = (stored - MIB) / MIB;
    assert!(
        elapsed >= floor,
        "{stored} bytes stored in {elapsed:.2}s: faster than 1MiB/s allows ({floor:.2}s)"
    );

    let refused = agent
        .clone_with("GC_BACKUP_MAX_UPLOAD_RATE", "100KiB/s")
        .run(&["backup", "redis"]);
    assert_fails(&refused, 2, "below 1MiB/s");
}
