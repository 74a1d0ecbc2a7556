//! age encryption end to end, against SeaweedFS and Debian's `age`: every kind backed up
//! encrypted and restored (a point-in-time restore among them); no clear text of the source in
//! any stored byte; the age CLI opening stored objects on its own; restores without or with the
//! wrong identity, and of a tampered object, failing closed; a clear write into an encrypted
//! store refused; keys that are not keys.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use harness::etcd::Etcd;
use harness::redis::Redis;
use harness::{
    Agent, Postgres, Seaweed, archiving_cluster_configured, assert_fails, pg_bin_dir, run_ok,
};

/// What a row of the source holds; no stored byte may contain it.
const CLEAR: &str = "GCSTORAGE-CLEARTEXT";

/// A key pair made by Debian's age-keygen, readable by the postgres user (restore_command).
struct AgeKey {
    _dir: tempfile::TempDir,
    identity: PathBuf,
    recipient: String,
}

impl AgeKey {
    fn generate() -> Self {
        let dir = harness::shared_temp_dir("age");
        let identity = dir.path().join("identity.txt");
        run_ok(Command::new("age-keygen").arg("-o").arg(&identity));
        run_ok(Command::new("chmod").arg("0644").arg(&identity));
        let output = Command::new("age-keygen")
            .arg("-y")
            .arg(&identity)
            .output()
            .expect("age-keygen (Debian package age): run scripts/test");
        let recipient = String::from_utf8(output.stdout).unwrap().trim().to_string();
        assert!(recipient.starts_with("age1"), "{recipient}");
        Self {
            _dir: dir,
            identity,
            recipient,
        }
    }

    fn toml(&self) -> String {
        format!("\n[encryption]\nrecipients = [\"{}\"]\n", self.recipient)
    }

    fn path(&self) -> &str {
        self.identity.to_str().unwrap()
    }
}

/// `age -d -i IDENTITY | zstd -d` of a stored object, as an SRE would without gc-backup.
fn open_with_age_cli(key: &AgeKey, object: &[u8], dir: &Path) -> Vec<u8> {
    let file = dir.join("object.age");
    std::fs::write(&file, object).unwrap();
    let script = format!(
        "age -d -i {} {} | zstd -d -c",
        key.identity.display(),
        file.display()
    );
    let output = Command::new("sh")
        .args(["-c", &script])
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "age | zstd failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output.stdout
}

/// Every stored byte under `prefix`: no clear text of the source anywhere, and every data and
/// WAL object an age file.
fn assert_store_holds_no_clear_text(weed: &Seaweed, prefix: &str) -> Vec<String> {
    let keys = weed.keys(prefix);
    assert!(!keys.is_empty());
    for key in &keys {
        let bytes = weed.get(key);
        assert!(
            memchr::memmem::find(&bytes, CLEAR.as_bytes()).is_none(),
            "{key} holds clear text of the source"
        );
        let relative = key.strip_prefix(&format!("{prefix}/")).unwrap();
        let is_data = (relative.starts_with("data/") && !relative.ends_with("_claim.json"))
            || relative.starts_with("wal/");
        if is_data {
            assert!(
                bytes.starts_with(b"age-encryption.org/v1\n"),
                "{key} is not an age file"
            );
        }
    }
    keys
}

fn empty_pgdata() -> (tempfile::TempDir, PathBuf) {
    let dir = harness::shared_temp_dir("enc-restored");
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    run_ok(Command::new("chown").arg("postgres:postgres").arg(&data));
    (dir, data)
}

fn is_empty(dir: &Path) -> bool {
    std::fs::read_dir(dir).unwrap().next().is_none()
}

#[test]
fn postgres_encrypted_end_to_end_dump_base_wal_and_pitr() {
    let weed = Seaweed::start();
    let key = AgeKey::generate();
    let (pg, config) = archiving_cluster_configured(pg_bin_dir(), &weed, "enc", &key.toml());
    pg.psql(
        "postgres",
        &format!(
            "CREATE EXTENSION amcheck; CREATE TABLE secrets (id int PRIMARY KEY, t text); \
             INSERT INTO secrets SELECT g, '{CLEAR}-' || g FROM generate_series(1, 5000) g"
        ),
    );
    // The writer has the recipients only; readers get the identity.
    let writer =
        Agent::for_cluster(&pg, &weed, "enc").with("GC_BACKUP_CONFIG", config.to_str().unwrap());
    let reader = Agent::for_cluster(&pg, &weed, "enc")
        .with("GC_BACKUP_CONFIG", config.to_str().unwrap())
        .with("GC_BACKUP_AGE_IDENTITY_FILE", key.path());
    let dump = writer.backup(&["backup", "pg-dump"]);
    writer.backup(&["backup", "pg-base"]);
    pg.psql(
        "postgres",
        "INSERT INTO secrets VALUES (0, 'after the base backup')",
    );
    pg.archive_everything();

    let listed = writer.list_json();
    assert!(
        listed.iter().all(|entry| entry["encrypted"] == true),
        "{listed:?}"
    );
    let keys = assert_store_holds_no_clear_text(&weed, "enc");
    assert!(keys.iter().any(|k| k == "enc/encryption.json"), "{keys:?}");

    // The disaster path: the age CLI and zstd open a WAL segment and the dump on their own.
    let scratch = tempfile::tempdir().unwrap();
    let segment = keys
        .iter()
        .find(|k| k.starts_with("enc/wal/") && !k.contains(".history") && !k.contains(".backup"))
        .unwrap();
    let raw = open_with_age_cli(&key, &weed.get(segment), scratch.path());
    assert_eq!(raw.len(), 16 << 20, "{segment} is not a whole segment");
    let dump_key = keys
        .iter()
        .find(|k| k.contains(&format!("data/pg-dump/{dump}/")) && !k.ends_with("_claim.json"))
        .unwrap();
    let dumped = open_with_age_cli(&key, &weed.get(dump_key), scratch.path());
    assert!(dumped.starts_with(b"PGDMP"), "not a pg_dump archive");

    // Without an identity: exit 2, one line, nothing written.
    let (_keep, data) = empty_pgdata();
    let output = writer.run(&["restore", "pg", "--pgdata", data.to_str().unwrap()]);
    assert_fails(&output, 2, "no age identity");
    assert!(is_empty(&data), "a refused restore wrote into PGDATA");
    let file = scratch.path().join("dump.out");
    let output = writer.run(&[
        "restore",
        "pg-dump",
        "latest",
        "--output",
        file.to_str().unwrap(),
    ]);
    assert_fails(&output, 2, "identity");
    assert!(!file.exists());

    // With the wrong identity: exit 3, nothing left behind.
    let other = AgeKey::generate();
    let wrong = Agent::for_cluster(&pg, &weed, "enc")
        .with("GC_BACKUP_CONFIG", config.to_str().unwrap())
        .with("GC_BACKUP_AGE_IDENTITY_FILE", other.path());
    let output = wrong.run(&[
        "restore",
        "pg-dump",
        "latest",
        "--output",
        file.to_str().unwrap(),
    ]);
    assert_fails(&output, 3, "wrong identity");
    assert!(!file.exists() && !scratch.path().join("dump.out.partial").exists());
    let output = wrong.run(&["restore", "pg", "--pgdata", data.to_str().unwrap()]);
    assert_fails(&output, 3, "cannot be decrypted");
    assert!(is_empty(&data), "a failed restore left files in PGDATA");

    // With it: the dump, and the cluster recovered to the end of the encrypted archive.
    reader.ok(&[
        "restore",
        "pg-dump",
        &dump,
        "--output",
        file.to_str().unwrap(),
    ]);
    assert!(std::fs::read(&file).unwrap() == dumped);
    let output = reader.run(&[
        "restore",
        "pg",
        "--pgdata",
        data.to_str().unwrap(),
        "--start",
    ]);
    assert!(
        output.status.success(),
        "encrypted PITR failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let (dir, _) = (_keep, data);
    let restored = Postgres::start_restored(dir);
    assert_eq!(
        restored.psql(
            "postgres",
            "SELECT count(*), max(t) FILTER (WHERE id = 0) FROM secrets"
        ),
        "5001|after the base backup"
    );
    reader.ok(&["verify"]);
    // The drill restores into a temporary directory with the identity too; without it, the
    // drill is refused before it starts a server.
    reader.ok(&["verify", "--restore"]);
    assert_fails(&writer.run(&["verify", "--restore"]), 2, "identity");

    // A flipped byte in the stored dump: refused, exit 3, no file.
    weed.flip_byte(dump_key);
    let flipped = scratch.path().join("flipped.out");
    let output = reader.run(&[
        "restore",
        "pg-dump",
        &dump,
        "--output",
        flipped.to_str().unwrap(),
    ]);
    assert_fails(&output, 3, "");
    assert!(!flipped.exists());

    // A sidecar deployed without its recipients cannot write clear text into this store.
    let clear_config = weed.config_file(scratch.path(), "enc");
    let clear = Agent::for_cluster(&pg, &weed, "enc")
        .with("GC_BACKUP_CONFIG", clear_config.to_str().unwrap());
    let output = clear.run(&["backup", "pg-dump"]);
    assert_fails(&output, 2, "encrypted store");
    let wal = scratch.path().join("000000010000000000000099");
    std::fs::write(&wal, vec![0u8; 16 << 20]).unwrap();
    let output = clear.run(&["wal-push", wal.to_str().unwrap()]);
    assert_fails(&output, 2, "encrypted store");
    assert!(
        !weed
            .keys("enc/wal")
            .iter()
            .any(|k| k.contains("000000010000000000000099"))
    );
}

#[test]
fn redis_and_etcd_backups_are_encrypted_and_restore_with_the_identity_only() {
    let weed = Seaweed::start();
    let key = AgeKey::generate();
    let redis = Redis::start(false);
    redis.populate(5_000);
    redis.cli(&["SET", "clear", &format!("{CLEAR}-redis")]);
    let digest = redis.digest();
    let etcd = Etcd::start();
    etcd.populate(500, 256);
    let fingerprint = etcd.fingerprint();
    let writer = Agent::for_store(&weed, "kv")
        .with("GC_BACKUP_AGE_RECIPIENTS", &key.recipient)
        .with("GC_BACKUP_REDIS_URL", &redis.url())
        .with("GC_BACKUP_ETCD_ENDPOINTS", &etcd.endpoint());
    let reader = writer.clone_with("GC_BACKUP_AGE_IDENTITY_FILE", key.path());
    let redis_id = writer.backup(&["backup", "redis"]);
    let etcd_id = writer.backup(&["backup", "etcd"]);
    assert_store_holds_no_clear_text(&weed, "kv");

    let out = writer.home().join("redis-out");
    let output = writer.run(&[
        "restore",
        "redis",
        &redis_id,
        "--output",
        out.to_str().unwrap(),
    ]);
    assert_fails(&output, 2, "identity");
    assert!(!out.join("dump.rdb").exists());
    reader.ok(&[
        "restore",
        "redis",
        &redis_id,
        "--output",
        out.to_str().unwrap(),
    ]);
    assert_eq!(Redis::start_on(&out).digest(), digest);

    let snapshot = writer.home().join("etcd.db");
    let output = writer.run(&[
        "restore",
        "etcd",
        &etcd_id,
        "--output",
        snapshot.to_str().unwrap(),
    ]);
    assert_fails(&output, 2, "identity");
    assert!(!snapshot.exists());
    reader.ok(&[
        "restore",
        "etcd",
        &etcd_id,
        "--output",
        snapshot.to_str().unwrap(),
    ]);
    assert_eq!(Etcd::start_restored(&snapshot).fingerprint(), fingerprint);
}

#[test]
fn keys_that_are_not_keys_are_one_line_exit_2() {
    let weed = Seaweed::start();
    let dir = tempfile::tempdir().unwrap();
    let not_a_key = dir.path().join("identity.txt");
    std::fs::write(&not_a_key, "AGE-SECRET-KEY-1NOTREALLYAKEY\n").unwrap();
    let agent = Agent::for_store(&weed, "bad");
    let bad_identity = agent.clone_with("GC_BACKUP_AGE_IDENTITY_FILE", not_a_key.to_str().unwrap());
    let output = bad_identity.run(&["list"]);
    assert_fails(&output, 2, "is not an age identity file");
    assert!(!String::from_utf8_lossy(&output.stderr).contains("NOTREALLYAKEY"));
    let missing = agent.clone_with("GC_BACKUP_AGE_IDENTITY_FILE", "/nonexistent/key.txt");
    assert_fails(
        &missing.run(&["list"]),
        2,
        "cannot read the age identity file",
    );
    let bad_recipient = agent.clone_with("GC_BACKUP_AGE_RECIPIENTS", "age1notakey");
    assert_fails(
        &bad_recipient.run(&["backup", "redis", "--redis-url", "redis://127.0.0.1:1"]),
        2,
        "is not an age public key",
    );
}
