//! `backup redis` against real `redis-server` processes: snapshots taken over the replication
//! protocol in both framings (diskless `$EOF:` and length), restored to `dump.rdb` that a new
//! server loads with the same `DEBUG DIGEST` and that `redis-check-rdb` accepts; a wrong
//! password; a stored object with one flipped bit.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use harness::redis::{self, Redis};
use harness::{Agent, Seaweed, assert_fails};

fn agent_for(weed: &Seaweed, prefix: &str, redis: &Redis) -> Agent {
    let mut env = weed.env(prefix);
    env.push(("GC_BACKUP_REDIS_URL".into(), redis.url()));
    Agent::new(env)
}

fn backup_and_restore(diskless: bool) {
    let weed = Seaweed::start();
    let source = Redis::start(diskless);
    source.populate(20_000);
    let digest = source.digest();
    let agent = agent_for(&weed, "rdb", &source);

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
    let mut agent = agent_for(&weed, "wrongpw", &source);
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
    let agent = agent_for(&weed, "rot", &source);
    let id = agent.backup(&["backup", "redis"]);
    let key = weed
        .keys("rot/data/redis")
        .into_iter()
        .find(|k| k.ends_with(".zst"))
        .unwrap();
    weed.flip_byte(&key);
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
    let mut agent = agent_for(&weed, "tls", &source);

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
