//! Real servers for end-to-end tests, each on free loopback ports in its own temp dir, stopped
//! and removed on drop, one file per server: [`postgres`], [`seaweed`] (the S3 server), [`emulators`] (Azure's),
//! [`redis`], [`etcd`]; [`tls`] makes certificates; [`agent`] runs the binary under test, [`daemon`] as the sidecar.
//!
//! `scripts/test` installs what is needed; a missing program is a test failure that says what
//! to install, never a silent skip.

#![allow(dead_code, unused_imports, clippy::unwrap_used, clippy::expect_used)]

pub mod agent;
pub mod conformance;
pub mod daemon;
pub mod emulators;
pub mod etcd;
pub mod postgres;
pub mod redis;
pub mod seaweed;
pub mod tls;

use std::net::TcpListener;
use std::process::{Command, Output};

pub use agent::{Agent, assert_exit, assert_fails};
pub use emulators::{Azurite, StoreServer};
pub use postgres::{
    Postgres, agent_binary_for_postgres, archiving_cluster, archiving_cluster_configured,
    archiving_cluster_on, empty_pgdata, pg_bin_dir, pg_major_bin_dir, restore_started,
    restore_stopped,
};
pub use seaweed::Seaweed;
pub use tls::{private_ca, signed_certificate};

pub const BUCKET: &str = "gcb-test";
pub const ACCESS_KEY: &str = "gcb-test-access";
pub const SECRET_KEY: &str = "gcb-test-secret-key";
/// Credentials that may read and list the bucket, nothing else (the restore identity).
pub const READER_ACCESS_KEY: &str = "gcb-test-reader";
pub const READER_SECRET_KEY: &str = "gcb-test-reader-secret";

/// Every port this test binary has handed out. The kernel hands a released port out again, so
/// two tests running at once could otherwise be given the same one: the second server then
/// loses the race to bind it, or, worse, a client of the first talks to the second.
static HANDED_OUT: std::sync::Mutex<std::collections::BTreeSet<u16>> =
    std::sync::Mutex::new(std::collections::BTreeSet::new());

/// `n` distinct ports nobody listens on right now and no other test of this binary was given
/// (held together while chosen, so the kernel cannot hand out the same one twice).
pub fn free_ports(n: usize) -> Vec<u16> {
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    let mut held = Vec::new();
    let mut ports = Vec::new();
    while ports.len() < n {
        let listener = TcpListener::bind("127.0.0.1:0").expect("no free port");
        let port = listener.local_addr().map(|a| a.port()).expect("local addr");
        if handed_out.insert(port) {
            ports.push(port);
        }
        held.push(listener);
    }
    ports
}

/// A port nobody listens on right now and no other test of this binary was given.
pub fn free_port() -> u16 {
    free_ports(1)[0]
}

pub(crate) fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

/// A temp dir the `postgres` user can use too.
pub fn shared_temp_dir(tag: &str) -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix(&format!("gcb-{tag}-"))
        .tempdir()
        .expect("temp dir");
    run_ok(Command::new("chmod").arg("0777").arg(dir.path()));
    dir
}

/// Runs a future to its end on a runtime of its own (the tests themselves are synchronous).
pub fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(future)
}

/// Every key under `prefix` of `store`, sorted: what a test reads behind the agent's back.
pub fn sorted_keys(store: &dyn object_store::ObjectStore, prefix: &str) -> Vec<String> {
    use futures::TryStreamExt;
    let mut keys: Vec<String> = block_on(async {
        store
            .list(Some(&object_store::path::Path::from(prefix)))
            .map_ok(|meta| meta.location.to_string())
            .try_collect()
            .await
            .expect("list")
    });
    keys.sort();
    keys
}

/// Runs a command and panics with its output if it fails.
pub fn run_ok(command: &mut Command) -> Output {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    assert!(
        output.status.success(),
        "{command:?} failed ({}):\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}
