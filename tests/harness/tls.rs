//! A private CA and certificates it signs, with openssl, for the TLS tests.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::run_ok;

/// A throwaway CA in `dir`: `ca.pem` (the certificate to trust) and `ca.key`.
pub fn private_ca(dir: &Path) {
    run_ok(
        Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            ])
            .args(["-subj", "/CN=gcb-test-ca", "-keyout"])
            .arg(dir.join("ca.key"))
            .arg("-out")
            .arg(dir.join("ca.pem")),
    );
}

/// `NAME.pem` and `NAME.key` in `dir`, signed by [`private_ca`]'s CA, with one extension line
/// (e.g. `subjectAltName=IP:127.0.0.1`).
pub fn signed_certificate(dir: &Path, name: &str, extension: &str) -> (PathBuf, PathBuf) {
    let path = |suffix: &str| dir.join(format!("{name}.{suffix}"));
    let (cert, key) = (path("pem"), path("key"));
    run_ok(
        Command::new("openssl")
            .args(["req", "-newkey", "rsa:2048", "-nodes", "-subj"])
            .arg(format!("/CN={name}"))
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(path("csr")),
    );
    std::fs::write(
        path("ext"),
        format!("{extension}\nbasicConstraints=CA:FALSE\n"),
    )
    .expect("write ext");
    run_ok(
        Command::new("openssl")
            .args(["x509", "-req", "-days", "2", "-CAcreateserial", "-in"])
            .arg(path("csr"))
            .arg("-CA")
            .arg(dir.join("ca.pem"))
            .arg("-CAkey")
            .arg(dir.join("ca.key"))
            .arg("-extfile")
            .arg(path("ext"))
            .arg("-out")
            .arg(&cert),
    );
    (cert, key)
}
