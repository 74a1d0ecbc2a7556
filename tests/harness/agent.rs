//! The gc-backup binary under test, and the assertions on how it fails.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use super::{Postgres, Seaweed};

/// The gc-backup binary under test, with a clean environment: only what the test gives it.
pub struct Agent {
    home: tempfile::TempDir,
    env: Vec<(String, String)>,
}

impl Agent {
    pub fn new(mut env: Vec<(String, String)>) -> Self {
        // `gc-backup run` serves HTTP; tests run in parallel, so never on the fixed default port.
        if !env.iter().any(|(k, _)| k == "GC_BACKUP_METRICS_LISTEN") {
            env.push(("GC_BACKUP_METRICS_LISTEN".into(), "127.0.0.1:0".into()));
        }
        Self {
            home: tempfile::Builder::new()
                .prefix("gcb-home-")
                .tempdir()
                .expect("temp dir"),
            env,
        }
    }

    /// An agent that stores into `prefix` of `weed`.
    pub fn for_store(weed: &Seaweed, prefix: &str) -> Self {
        Self::new(weed.env(prefix))
    }

    /// An agent for `pg` (its database `postgres`, its PGDATA) that stores into `prefix`.
    pub fn for_cluster(pg: &Postgres, weed: &dyn super::StoreServer, prefix: &str) -> Self {
        Self::new(weed.env(prefix))
            .with_env(pg.env())
            .with("PGDATABASE", "postgres")
            .with("PGDATA", pg.data_dir().to_str().expect("a UTF-8 path"))
    }

    /// Another agent (its own home) with this one's environment and `name` set to `value`.
    pub fn clone_with(&self, name: &str, value: &str) -> Self {
        Self::new(self.env.clone()).with(name, value)
    }

    /// The same agent with `name` set to `value` in its environment.
    /// An agent that only streams `pg`'s WAL (no PGDATA: no look-ahead archiving beside it)
    /// into `prefix`.
    pub fn streaming_from(weed: &Seaweed, pg: &Postgres, prefix: &str) -> Self {
        Self::for_store(weed, prefix)
            .with_env(pg.env())
            .with("PGDATABASE", "postgres")
            .with("GC_BACKUP_STREAM_WAL", "true")
    }

    pub fn with(mut self, name: &str, value: &str) -> Self {
        self.set(name, value);
        self
    }

    /// The same agent with these variables set.
    pub fn with_env(mut self, env: Vec<(String, String)>) -> Self {
        for (name, value) in env {
            self.set(&name, &value);
        }
        self
    }

    /// Writes `toml` as the agent's configuration file (`GC_BACKUP_CONFIG`), replacing any
    /// earlier one; returns its path.
    pub fn with_config(&mut self, toml: &str) -> PathBuf {
        let path = self.home().join("gc-backup.toml");
        std::fs::write(&path, toml).expect("write the agent's config file");
        self.set("GC_BACKUP_CONFIG", path.to_str().expect("a UTF-8 path"));
        path
    }

    pub fn home(&self) -> &Path {
        self.home.path()
    }

    pub fn set(&mut self, name: &str, value: &str) {
        self.env.retain(|(k, _)| k != name);
        self.env.push((name.into(), value.into()));
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_gc-backup"));
        command
            .args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", self.home.path())
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null());
        command
    }

    /// Started in the background with stdout and stderr captured, for a fault to strike while
    /// it runs; `wait_with_output` collects the result.
    pub fn spawn_captured(&self, args: &[&str]) -> std::process::Child {
        self.command(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn gc-backup")
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run gc-backup")
    }

    /// Runs and asserts success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let output = self.run(args);
        assert!(
            output.status.success(),
            "gc-backup {args:?} failed ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// The id a backup printed as its last stdout line.
    pub fn backup(&self, args: &[&str]) -> String {
        let stdout = self.ok(args);
        stdout
            .lines()
            .last()
            .expect("backup printed nothing")
            .trim()
            .to_string()
    }

    pub fn list_json(&self) -> Vec<serde_json::Value> {
        let stdout = self.ok(&["list", "--json"]);
        serde_json::from_str(&stdout).expect("list --json is a JSON array")
    }
}

/// Asserts the exit code of a run, showing its stderr when it differs.
pub fn assert_exit(output: &Output, code: i32) {
    assert_eq!(
        output.status.code(),
        Some(code),
        "expected exit {code}, stdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Asserts a failed run: the exit code, and one `gc-backup: error:` line that contains `needle`.
pub fn assert_fails(output: &Output, code: i32, needle: &str) {
    assert_exit(output, code);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("gc-backup: error:"))
        .collect();
    assert_eq!(
        errors.len(),
        1,
        "expected one error line, stderr:\n{stderr}"
    );
    assert!(
        errors[0].contains(needle),
        "error line lacks {needle:?}: {}",
        errors[0]
    );
}
