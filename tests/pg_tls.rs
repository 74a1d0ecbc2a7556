//! TLS to PostgreSQL: a server that accepts `hostssl` connections only, with a certificate
//! from a private CA. The agent's own sessions (pg-base, the readiness check) and the
//! pg_dump / pg_restore it starts all follow libpq's PGSSLMODE, PGSSLROOTCERT: with
//! verify-full they work; an untrusted CA, a host name the certificate does not hold, or TLS
//! turned off each fail with one line that names the setting to change.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use harness::{Agent, Seaweed, archiving_cluster, assert_fails};

#[test]
fn a_tls_only_server_is_backed_up_and_restored_with_verify_full_and_refused_otherwise() {
    let weed = Seaweed::start();
    let (pg, config) = archiving_cluster(&weed, "tls");
    let certs = harness::shared_temp_dir("pgtls");
    let ca = pg.require_tls(certs.path());
    pg.psql(
        "postgres",
        "CREATE TABLE files AS SELECT g AS id, md5(g::text) AS sha FROM generate_series(1, 5000) g",
    );
    let expected = pg.fingerprint("postgres");

    let mut agent: Agent = Agent::for_cluster(&pg, &weed, "tls");
    agent.set("GC_BACKUP_CONFIG", config.to_str().unwrap());
    agent.set("PGHOST", "localhost");
    agent.set("PGSSLMODE", "verify-full");
    agent.set("PGSSLROOTCERT", ca.to_str().unwrap());

    // pg_dump (a child, through libpq) and pg-base (the agent's own session).
    let dump = agent.backup(&["backup", "pg-dump"]);
    agent.backup(&["backup", "pg-base"]);
    pg.create_database("restored");
    agent.ok(&["restore", "pg-dump", &dump, "--dbname", "dbname=restored"]);
    assert_eq!(pg.fingerprint("restored"), expected);

    // The restore drill, with the same settings in its environment.
    let drill = agent.run(&["verify", "--restore"]);
    assert!(
        drill.status.success(),
        "{}",
        String::from_utf8_lossy(&drill.stderr)
    );

    // A CA that did not sign the server's certificate.
    let other = harness::shared_temp_dir("othertls");
    harness::private_ca(other.path());
    agent.set(
        "PGSSLROOTCERT",
        other.path().join("ca.pem").to_str().unwrap(),
    );
    let output = agent.run(&["backup", "pg-base"]);
    assert_fails(&output, 2, "PGSSLROOTCERT");
    agent.set("PGSSLROOTCERT", ca.to_str().unwrap());

    // A host name the certificate does not hold (it names localhost, not 127.0.0.1).
    agent.set("PGHOST", "127.0.0.1");
    let output = agent.run(&["backup", "pg-base"]);
    assert_fails(&output, 2, "PGHOST");
    // verify-ca checks the CA only: the same connection is fine.
    agent.set("PGSSLMODE", "verify-ca");
    agent.backup(&["backup", "pg-base"]);

    // Without TLS the server refuses: a configuration error, not a retry.
    agent.set("PGSSLMODE", "disable");
    let output = agent.run(&["backup", "pg-base"]);
    assert_fails(&output, 2, "no encryption");
    let output = agent.run(&["backup", "pg-dump"]);
    assert_ne!(output.status.code(), Some(0));

    // A bad mode is named.
    agent.set("PGSSLMODE", "verify_full");
    let output = agent.run(&["backup", "pg-base"]);
    assert_fails(&output, 2, "PGSSLMODE");
    agent.set("PGSSLMODE", "verify-full");
    assert_eq!(
        agent
            .list_json()
            .iter()
            .filter(|e| e["kind"] == "pg-base")
            .count(),
        2
    );
}
