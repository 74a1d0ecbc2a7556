//! `backup etcd` against real etcd members (Debian's etcd-server 3.4): a snapshot streamed
//! from `Maintenance.Snapshot`, restored to a file that `etcdctl snapshot status` and
//! `etcdctl snapshot restore` (hash check included) accept, and a member started on it with
//! the same keys and values; TLS with client certificates; an unreachable member; a stored
//! object with one flipped byte.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use harness::etcd::{self, Etcd};
use harness::{Agent, Seaweed, assert_fails};

#[test]
fn a_snapshot_restores_to_a_member_with_the_same_data() {
    let weed = Seaweed::start();
    let source = Etcd::start();
    source.populate(3_000, 1_024);
    let fingerprint = source.fingerprint();
    let agent =
        Agent::for_store(&weed, "snap").with("GC_BACKUP_ETCD_ENDPOINTS", &source.endpoint());

    let id = agent.backup(&["backup", "etcd"]);
    let listed = agent.list_json();
    let entry = listed.iter().find(|e| e["id"] == id.as_str()).unwrap();
    assert_eq!(entry["kind"], "etcd");
    assert_eq!(entry["etcd_version"], "3.4.23");
    assert!(entry["revision"].as_i64().unwrap() > 3_000, "{entry}");
    assert_eq!(entry["sha256"].as_str().unwrap().len(), 64);

    let file = agent.home().join("snapshot.db");
    agent.ok(&["restore", "etcd", &id, "--output", file.to_str().unwrap()]);
    let status = etcd::snapshot_status(&file);
    assert!(status["totalKey"].as_u64().unwrap() >= 3_000, "{status}");
    assert_eq!(status["revision"], entry["revision"]);
    let restored = Etcd::start_restored(&file);
    assert_eq!(
        restored.fingerprint(),
        fingerprint,
        "the restored keys differ"
    );

    // A second restore never overwrites the file.
    let output = agent.run(&[
        "restore",
        "etcd",
        "latest",
        "--output",
        file.to_str().unwrap(),
    ]);
    assert_fails(&output, 2, "already exists");

    // One flipped byte in the store: the restore fails and writes no file.
    let key = weed
        .keys("snap/data/etcd")
        .into_iter()
        .find(|k| k.ends_with(".zst"))
        .unwrap();
    agent.ok(&["verify", "--kind", "etcd"]);
    // The drill: restored, read by `snapshot status`, built into a member's data directory.
    let drill = agent.ok(&["verify", "--restore", "--kind", "etcd"]);
    assert!(
        drill.contains(&format!("Restore drill of etcd {id}"))
            && drill.contains(&format!("revision {},", entry["revision"]))
            && drill.contains("RTO"),
        "{drill}"
    );
    weed.flip_byte(&key);
    assert_fails(&agent.run(&["verify", "--kind", "etcd"]), 3, "problem");
    assert_fails(
        &agent.run(&["verify", "--restore", "--kind", "etcd"]),
        3,
        &id,
    );
    let rotten = agent.home().join("rotten.db");
    let output = agent.run(&["restore", "etcd", &id, "--output", rotten.to_str().unwrap()]);
    assert_fails(&output, 3, &id);
    assert!(!rotten.exists());
    assert!(!agent.home().join("rotten.db.partial").exists());
}

#[test]
fn tls_with_client_certificates_as_kubernetes_runs_etcd() {
    let weed = Seaweed::start();
    let source = Etcd::start_tls();
    source.populate(200, 256);
    let fingerprint = source.fingerprint();
    let mut agent =
        Agent::for_store(&weed, "tls").with("GC_BACKUP_ETCD_ENDPOINTS", &source.endpoint());

    // The cluster's CA is not trusted and no client certificate is given: nothing stored.
    let output = agent.run(&["backup", "etcd"]);
    assert_fails(
        &output,
        3,
        "UnknownIssuer (trust the cluster's CA with ETCDCTL_CACERT",
    );
    assert!(weed.keys("tls").is_empty());

    agent.set("ETCDCTL_CACERT", source.ca_file().to_str().unwrap());
    let (cert, key) = source.client_certificate();
    agent.set("ETCDCTL_CERT", cert.to_str().unwrap());
    agent.set("ETCDCTL_KEY", key.to_str().unwrap());
    let id = agent.backup(&["backup", "etcd"]);
    let file = agent.home().join("snapshot.db");
    agent.ok(&["restore", "etcd", &id, "--output", file.to_str().unwrap()]);
    assert_eq!(Etcd::start_restored(&file).fingerprint(), fingerprint);
}

#[test]
fn the_first_member_that_answers_is_used_and_none_answering_is_one_error() {
    let weed = Seaweed::start();
    let source = Etcd::start();
    source.populate(10, 16);
    let dead = format!("http://127.0.0.1:{}", harness::free_port());
    let mut agent =
        Agent::for_store(&weed, "members").with("GC_BACKUP_ETCD_ENDPOINTS", &source.endpoint());

    agent.set(
        "GC_BACKUP_ETCD_ENDPOINTS",
        &format!("{dead},{}", source.endpoint()),
    );
    let id = agent.backup(&["backup", "etcd"]);
    let listed = agent.list_json();
    let entry = listed.iter().find(|e| e["id"] == id.as_str()).unwrap();
    assert_eq!(entry["endpoint"], source.endpoint());

    agent.set("GC_BACKUP_ETCD_ENDPOINTS", &dead);
    let output = agent.run(&["backup", "etcd"]);
    assert_fails(&output, 3, "no etcd member answered");
    assert_eq!(agent.list_json().len(), 1);

    let output = agent.run(&["backup", "etcd", "--endpoints", "127.0.0.1:2379"]);
    assert_fails(&output, 2, "needs http:// or https://");
}
