//! `gc-backup run` as a child process, and what its HTTP endpoints say.

use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{Agent, free_port, run_ok};

/// `GET path` on 127.0.0.1:port: the status code and body (status 0 when nothing answers, or
/// the connection is cut: a sidecar that exits while starting resets what its listener had
/// accepted, and the caller is the one that can say why it exited).
pub fn get(port: u16, path: &str) -> (u16, String) {
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return (0, String::new());
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return (0, String::new());
    }
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default();
    (status, body)
}

pub fn wait_for(what: &str, seconds: u64, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// An LSN (`16/B374D848`) as the byte position the metrics give.
pub fn position(lsn: &str) -> f64 {
    let (high, low) = lsn.trim().split_once('/').unwrap();
    let value =
        (u64::from_str_radix(high, 16).unwrap() << 32) | u64::from_str_radix(low, 16).unwrap();
    value as f64
}

/// The value of one series in Prometheus text (0 when absent).
pub fn sample(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find(|line| line.starts_with(series) && line[series.len()..].starts_with(' '))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
        .unwrap_or(0.0)
}

pub struct Daemon {
    pub child: Child,
    pub port: u16,
}

impl Daemon {
    pub fn start(agent: &Agent) -> Self {
        // A port chosen free can be taken before the sidecar binds it (by a process outside
        // this test binary): then it says so and exits, and another port is chosen.
        for _ in 0..5 {
            match Self::try_start(agent) {
                Ok(daemon) => return daemon,
                Err(log) if log.contains("Address already in use") => continue,
                Err(log) => panic!("gc-backup run did not serve /health: {log}"),
            }
        }
        panic!("gc-backup run found no free port in five tries");
    }

    /// The sidecar serving /health, or its log when it exited or never answered.
    fn try_start(agent: &Agent) -> Result<Self, String> {
        let port = free_port();
        let mut command = agent.command(&["run"]);
        command
            .env("GC_BACKUP_METRICS_LISTEN", format!("127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(agent.home().join("daemon.log")).unwrap(),
            ));
        let mut daemon = Self {
            child: command.spawn().unwrap(),
            port,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while get(port, "/health").0 != 200 {
            let exited = daemon.child.try_wait().unwrap();
            if exited.is_some() || Instant::now() > deadline {
                let log = std::fs::read_to_string(agent.home().join("daemon.log")).unwrap();
                return Err(format!("({exited:?}) {log}"));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(daemon)
    }

    pub fn metrics(&self) -> String {
        let (status, body) = get(self.port, "/metrics");
        assert_eq!(status, 200);
        body
    }

    /// Waits until the WAL receiver's stored position is at or past `lsn`.
    pub fn wait_stored(&self, lsn: &str) {
        wait_for(&format!("WAL up to {lsn} in the store"), 120, || {
            sample(
                &self.metrics(),
                "gc_backup_wal_stream_stored_position_bytes",
            ) >= position(lsn)
        });
    }

    /// SIGTERM, and the exit status once it has stopped.
    pub fn terminate(&mut self) -> (std::process::ExitStatus, Duration) {
        let started = Instant::now();
        run_ok(Command::new("kill").args(["-TERM", &self.child.id().to_string()]));
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return (status, started.elapsed());
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "no exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
