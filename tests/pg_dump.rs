//! `backup pg-dump`, `list` and `restore pg-dump` as a subprocess against real PostgreSQL and
//! SeaweedFS servers, including the failure paths, each caused by a real fault.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use std::time::{Duration, Instant};

use harness::{Agent, Postgres, Seaweed, assert_exit, assert_fails};

#[test]
fn custom_dump_round_trips_through_s3_into_a_new_database() {
    let pg = Postgres::start();
    let weed = Seaweed::start();
    pg.load_sample("app", 20_000);
    let agent = Agent::for_store(&weed, "prod")
        .with_env(pg.env())
        .with("PGDATABASE", "app");

    let id = agent.backup(&["backup", "pg-dump"]);
    let listed = agent.list_json();
    assert_eq!(listed.len(), 1);
    let entry = &listed[0];
    assert_eq!(entry["id"], id.as_str());
    assert_eq!(entry["kind"], "pg-dump");
    assert_eq!(entry["database"], "app");
    assert_eq!(entry["format"], "custom");
    for field in ["start_time", "end_time"] {
        let text = entry[field].as_str().unwrap();
        assert!(text.ends_with('Z') && chrono::DateTime::parse_from_rfc3339(text).is_ok());
    }
    let raw = entry["raw_bytes"].as_u64().unwrap();
    let stored = entry["stored_bytes"].as_u64().unwrap();
    assert!(stored > 0 && stored < raw, "raw {raw}, stored {stored}");
    let keys = weed.keys("prod");
    assert!(
        keys.contains(&format!("prod/manifests/pg-dump/{id}.json")),
        "{keys:?}"
    );
    assert!(
        !keys.iter().any(|k| k.ends_with("_claim.json")),
        "claim left: {keys:?}"
    );

    let table = agent.ok(&["list"]);
    assert!(table.contains(&id) && table.contains("pg-dump"), "{table}");

    pg.create_database("restored");
    let target = format!(
        "host=127.0.0.1 port={} user=postgres dbname=restored",
        pg.port
    );
    agent.ok(&["restore", "pg-dump", "latest", "--dbname", &target]);
    assert_eq!(pg.fingerprint("restored"), pg.fingerprint("app"));

    // The file a restore writes is exactly what pg_dump produced: pg_restore can read it.
    let file = agent.home().join("app.dump");
    agent.ok(&[
        "restore",
        "pg-dump",
        &id,
        "--output",
        file.to_str().unwrap(),
    ]);
    let toc = harness::run_ok(
        std::process::Command::new(pg.bin.join("pg_restore"))
            .arg("--list")
            .arg(&file),
    );
    assert!(String::from_utf8_lossy(&toc.stdout).contains("TABLE DATA public files"));
    assert_eq!(std::fs::metadata(&file).unwrap().len(), raw);
}

#[test]
fn plain_dump_of_chosen_tables_restores_with_psql() {
    let pg = Postgres::start();
    let weed = Seaweed::start();
    pg.load_sample("app", 3_000);
    let agent = Agent::for_store(&weed, "plain")
        .with_env(pg.env())
        .with("PGDATABASE", "app");

    let id = agent.backup(&[
        "backup", "pg-dump", "--format", "plain", "--table", "folders",
    ]);
    let entry = &agent.list_json()[0];
    assert_eq!(entry["format"], "plain");
    assert_eq!(entry["tables"], serde_json::json!(["folders"]));

    let sql = agent.ok(&["restore", "pg-dump", &id, "--output", "-"]);
    assert!(
        sql.contains("CREATE TABLE public.folders"),
        "not a plain dump"
    );
    assert!(
        !sql.contains("CREATE TABLE public.files"),
        "--table was ignored"
    );

    pg.create_database("copy");
    let target = format!("host=127.0.0.1 port={} user=postgres dbname=copy", pg.port);
    agent.ok(&["restore", "pg-dump", &id, "--dbname", &target]);
    assert_eq!(pg.psql("copy", "SELECT count(*) FROM folders"), "500");
    assert_eq!(
        pg.psql(
            "copy",
            "SELECT count(*) FROM pg_tables WHERE tablename = 'files'"
        ),
        "0"
    );
}

#[test]
fn runbook_variables_and_the_embedded_local_store_work() {
    let pg = Postgres::start();
    pg.load_sample("gc_storage", 1_000);
    // The runbook's names, and no store configured at all.
    let agent = Agent::new(vec![
        ("DB_HOST".into(), "127.0.0.1".into()),
        ("PGPORT".into(), pg.port.to_string()),
        ("DB_USER".into(), "postgres".into()),
        ("DB_NAME".into(), "gc_storage".into()),
    ]);
    let output = agent.run(&["backup", "pg-dump"]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    let default_store = agent.home().join(".local/share/gc-backup");
    assert!(
        stderr.contains(default_store.to_str().unwrap()),
        "does not say where: {stderr}"
    );
    let id = String::from_utf8_lossy(&output.stdout)
        .lines()
        .last()
        .unwrap()
        .to_string();
    assert!(
        default_store
            .join(format!("manifests/pg-dump/{id}.json"))
            .exists()
    );
    assert_eq!(agent.list_json()[0]["database"], "gc_storage");
}

/// Every write-mode open, create, rename or mkdir the agent (and pg_dump) makes, from strace.
fn written_paths(trace: &str) -> Vec<String> {
    trace
        .lines()
        .filter(|line| {
            let writes = line.contains("O_WRONLY")
                || line.contains("O_RDWR")
                || line.contains("O_CREAT")
                || ["creat(", "mkdir", "rename", "link(", "linkat(", "truncate("]
                    .iter()
                    .any(|call| line.contains(call));
            writes && !line.contains("= -1 ")
        })
        .filter_map(|line| line.split('"').nth(1).map(str::to_string))
        .filter(|path| !path.starts_with("/dev/") && !path.starts_with("/proc/"))
        .collect()
}

#[test]
fn a_backup_to_s3_writes_nothing_to_local_disk() {
    let pg = Postgres::start();
    let weed = Seaweed::start();
    pg.load_sample("app", 20_000);
    let agent = Agent::for_store(&weed, "nodisk")
        .with_env(pg.env())
        .with("PGDATABASE", "app");
    let trace = agent.home().join("strace.out");
    let mut command = std::process::Command::new("strace");
    command
        .args(["-f", "-qq", "-e", "trace=%file", "-o"])
        .arg(&trace)
        .arg(env!("CARGO_BIN_EXE_gc-backup"))
        .args(["backup", "pg-dump"]);
    let inner = agent.command(&[]);
    command
        .env_clear()
        .envs(inner.get_envs().filter_map(|(k, v)| Some((k, v?))));
    let output = command
        .output()
        .expect("strace is missing: run scripts/test (apt-get install strace)");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let trace = std::fs::read_to_string(&trace).unwrap();
    assert!(
        trace.contains("pg_dump"),
        "the trace did not follow pg_dump"
    );
    let written = written_paths(&trace);
    assert!(
        written.is_empty(),
        "the backup wrote local files: {written:?}"
    );
    assert_eq!(agent.list_json().len(), 1);
}

#[test]
fn configuration_mistakes_exit_2_with_one_line() {
    let pg = Postgres::start();
    let weed = Seaweed::start();
    pg.load_sample("app", 100);
    let mut agent = Agent::for_store(&weed, "config")
        .with_env(pg.env())
        .with("PGDATABASE", "app");

    let file = agent.home().join("bad.toml");
    std::fs::write(&file, "[store]\nurll = \"s3://x\"\n").unwrap();
    let output = agent.run(&["--config", file.to_str().unwrap(), "backup", "pg-dump"]);
    assert_fails(&output, 2, "urll");

    let output = agent.run(&["--store", "ftp://somewhere", "backup", "pg-dump"]);
    assert_fails(&output, 2, "not supported");

    agent.set("PGDATABASE", "no_such_db");
    assert_fails(&agent.run(&["backup", "pg-dump"]), 2, "no_such_db");
    agent.set("PGDATABASE", "app");

    agent.set("AWS_SECRET_ACCESS_KEY", "wrong-secret-value");
    let output = agent.run(&["backup", "pg-dump"]);
    assert_fails(&output, 2, "refused access");
    assert!(!String::from_utf8_lossy(&output.stderr).contains("wrong-secret-value"));
    agent.set("AWS_SECRET_ACCESS_KEY", harness::SECRET_KEY);

    agent.set("GC_BACKUP_STORE", "s3://no-such-bucket/x");
    assert_fails(&agent.run(&["backup", "pg-dump"]), 2, "does not exist");
    agent.set(
        "GC_BACKUP_STORE",
        &format!("s3://{}/config", harness::BUCKET),
    );

    assert_fails(
        &agent.run(&["restore", "pg-dump", "latest", "--output", "-"]),
        1,
        "no pg-dump backup",
    );
    assert_fails(
        &agent.run(&["restore", "pg-dump", "20200101T000000Z", "--output", "-"]),
        1,
        "20200101T000000Z",
    );
    assert!(agent.list_json().is_empty());
    assert!(weed.keys("config").is_empty(), "{:?}", weed.keys("config"));
}

#[test]
fn an_unreachable_store_fails_within_the_retry_budget() {
    let pg = Postgres::start();
    pg.load_sample("app", 100);
    let mut env = pg.env();
    env.push(("PGDATABASE".into(), "app".into()));
    let mut agent = Agent::new(env);
    agent.with_config("[store]\nretry-timeout = \"2s\"\nmax-retries = 2\n");
    agent.set("GC_BACKUP_STORE", "s3://gcb-test/x");
    agent.set(
        "AWS_ENDPOINT_URL",
        &format!("http://127.0.0.1:{}", harness::free_port()),
    );
    agent.set("AWS_ACCESS_KEY_ID", "k");
    agent.set("AWS_SECRET_ACCESS_KEY", "s");
    let started = Instant::now();
    let output = agent.run(&["backup", "pg-dump"]);
    assert_fails(&output, 3, "s3://gcb-test/x");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "took {:?}",
        started.elapsed()
    );
}

/// A table big enough that pg_dump spends a while in its COPY.
fn load_big_table(pg: &Postgres, db: &str) {
    pg.create_database(db);
    pg.psql(
        db,
        "CREATE TABLE big AS SELECT g AS id, md5(g::text) || md5((g * 7)::text) AS payload \
         FROM generate_series(1, 1500000) g",
    );
}

/// Waits until pg_dump's COPY of the big table runs, from a session of its own.
fn wait_for_copy(pg: &Postgres, db: &str) {
    pg.psql(
        db,
        "DO $$ BEGIN
           FOR i IN 1..30000 LOOP
             PERFORM pg_stat_clear_snapshot();
             PERFORM 1 FROM pg_stat_activity
               WHERE application_name = 'pg_dump' AND query LIKE 'COPY%big%';
             IF FOUND THEN RETURN; END IF;
             PERFORM pg_sleep(0.001);
           END LOOP;
           RAISE EXCEPTION 'pg_dump never started its COPY';
         END $$",
    );
}

#[test]
fn pg_dump_dying_halfway_commits_nothing_and_cleans_up() {
    let pg = Postgres::start();
    let weed = Seaweed::start();
    load_big_table(&pg, "app");
    let agent = Agent::for_store(&weed, "dying")
        .with_env(pg.env())
        .with("PGDATABASE", "app");
    let mut command = agent.command(&["backup", "pg-dump"]);
    let backup = std::thread::spawn(move || command.output());
    wait_for_copy(&pg, "app");
    pg.psql(
        "app",
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'pg_dump'",
    );
    let output = backup.join().unwrap().unwrap();
    assert_fails(&output, 3, "pg_dump failed");
    assert!(agent.list_json().is_empty());
    assert!(
        weed.keys("dying").is_empty(),
        "left behind: {:?}",
        weed.keys("dying")
    );
}

#[test]
fn the_store_dying_halfway_commits_nothing() {
    let pg = Postgres::start();
    let mut weed = Seaweed::start();
    load_big_table(&pg, "app");
    let mut agent = Agent::for_store(&weed, "storedies")
        .with_env(pg.env())
        .with("PGDATABASE", "app");
    agent.with_config("[store]\nretry-timeout = \"3s\"\nmax-retries = 2\n");
    // Small parts so that several are in flight when the server dies.
    agent.set("GC_BACKUP_PART_SIZE", "5MiB");
    let mut command = agent.command(&["backup", "pg-dump"]);
    let backup = std::thread::spawn(move || command.output());
    wait_for_copy(&pg, "app");
    weed.kill();
    let output = backup.join().unwrap().unwrap();
    assert_fails(&output, 3, "nothing was committed");
    weed.restart();
    assert!(agent.list_json().is_empty());
    let manifests: Vec<String> = weed
        .keys("storedies")
        .into_iter()
        .filter(|k| k.contains("manifests"))
        .collect();
    assert!(manifests.is_empty(), "{manifests:?}");
}

#[test]
fn sigterm_mid_backup_aborts_the_upload_and_commits_nothing() {
    let pg = Postgres::start();
    let weed = Seaweed::start();
    load_big_table(&pg, "app");
    let mut agent = Agent::for_store(&weed, "sigterm")
        .with_env(pg.env())
        .with("PGDATABASE", "app");
    agent.set("GC_BACKUP_PART_SIZE", "5MiB");
    let child = agent
        .command(&["backup", "pg-dump"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_copy(&pg, "app");
    harness::run_ok(std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]));
    let output = child.wait_with_output().unwrap();
    assert_fails(&output, 130, "interrupted");
    assert!(agent.list_json().is_empty());
    assert!(
        weed.keys("sigterm").is_empty(),
        "left behind: {:?}",
        weed.keys("sigterm")
    );
}

#[test]
fn a_corrupted_object_fails_the_restore_and_writes_no_file() {
    let pg = Postgres::start();
    let weed = Seaweed::start();
    pg.load_sample("app", 5_000);
    let agent = Agent::for_store(&weed, "corrupt")
        .with_env(pg.env())
        .with("PGDATABASE", "app");
    let id = agent.backup(&["backup", "pg-dump"]);

    // Flip one byte of the stored object, in place, as bit rot would.
    let key = weed
        .keys("corrupt/data")
        .into_iter()
        .find(|k| k.ends_with(".zst"))
        .unwrap();
    weed.flip_byte(&key);

    let file = agent.home().join("restored.dump");
    let output = agent.run(&[
        "restore",
        "pg-dump",
        &id,
        "--output",
        file.to_str().unwrap(),
    ]);
    assert_fails(&output, 3, &id);
    assert!(!file.exists(), "a failed restore left {file:?}");
    assert!(!agent.home().join("restored.dump.partial").exists());

    pg.create_database("target");
    let target = format!(
        "host=127.0.0.1 port={} user=postgres dbname=target",
        pg.port
    );
    let output = agent.run(&["restore", "pg-dump", &id, "--dbname", &target]);
    assert_exit(&output, 3);
    assert_eq!(
        pg.psql(
            "target",
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
        ),
        "0",
        "a corrupt dump was partly loaded"
    );
}

#[test]
fn an_https_store_with_a_private_ca_is_trusted_only_through_store_ca_file() {
    let pg = Postgres::start();
    pg.load_sample("app", 200);
    let weed = Seaweed::start_tls();
    let mut agent = Agent::for_store(&weed, "tls")
        .with_env(pg.env())
        .with("PGDATABASE", "app");
    agent.set("AWS_ENDPOINT_URL", &weed.https_endpoint());
    agent.with_config("[store]\nmax-retries = 1\nretry-timeout = \"2s\"\n");

    let output = agent.run(&["backup", "pg-dump"]);
    assert_exit(&output, 3);

    agent.set("GC_BACKUP_CA_FILE", weed.ca_file().to_str().unwrap());
    let id = agent.backup(&["backup", "pg-dump"]);
    let listed = agent.list_json();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["id"], id.as_str());
}
