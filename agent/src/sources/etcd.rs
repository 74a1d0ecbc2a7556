//! etcd as a source: `Maintenance.Snapshot` from one member, over gRPC (etcd-client).
//!
//! The member streams its bbolt database followed by the SHA-256 of it (32 bytes); the same
//! trailer `etcdctl snapshot restore` checks. The check runs here while the snapshot streams,
//! holding back only the last 32 bytes seen: a mismatch, a missing trailer or a stream that
//! ends before the member's `remaining_bytes` reached zero is an error pushed into the stream,
//! so the upload is aborted and no manifest is written.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use super::SourceError;
use crate::config::{Secret, TlsFiles};

/// How long connecting to one member may take before the next is tried.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const SHA256_LEN: usize = 32;
/// bbolt writes whole pages; etcd's own check for "has a hash trailer" uses this.
const DB_ALIGNMENT: u64 = 512;

/// Which etcd, and how to talk to it. Passwords never appear in `Display`/`Debug`.
#[derive(Clone, Default)]
pub struct EtcdEndpoints {
    /// `http://host:port` or `https://host:port`, tried in order.
    pub urls: Vec<String>,
    pub user: Option<(String, Secret)>,
    pub tls: TlsFiles,
}

impl fmt::Debug for EtcdEndpoints {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EtcdEndpoints({})", self.urls.join(","))
    }
}

impl EtcdEndpoints {
    /// Endpoints from a comma-separated list, checked for a scheme.
    pub fn parse_urls(list: &str) -> Result<Vec<String>, SourceError> {
        let urls: Vec<String> = list
            .split(',')
            .map(str::trim)
            .filter(|url| !url.is_empty())
            .map(str::to_string)
            .collect();
        Self::check_urls(&urls)?;
        Ok(urls)
    }

    pub fn check_urls(urls: &[String]) -> Result<(), SourceError> {
        if urls.is_empty() {
            return Err(SourceError::Config("no etcd endpoints given".to_string()));
        }
        for url in urls {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(SourceError::Config(format!(
                    "etcd endpoint '{url}' needs http:// or https://"
                )));
            }
        }
        Ok(())
    }

    fn tls(&self) -> Result<Option<TlsOptions>, SourceError> {
        let https = self.urls.iter().any(|url| url.starts_with("https://"));
        if !https {
            if self.tls.ca_file.is_some() || self.tls.cert_file.is_some() {
                tracing::warn!("etcd TLS files are set but the endpoints are http://; unused");
            }
            return Ok(None);
        }
        let read = |path: &PathBuf, what: &str| {
            std::fs::read(path).map_err(|e| {
                SourceError::Config(format!(
                    "cannot read the etcd {what} {}: {e}",
                    path.display()
                ))
            })
        };
        let mut tls = TlsOptions::new().with_native_roots();
        if let Some(ca) = &self.tls.ca_file {
            tls = tls.ca_certificate(Certificate::from_pem(read(ca, "CA file")?));
        }
        match (&self.tls.cert_file, &self.tls.key_file) {
            (Some(cert), Some(key)) => {
                tls = tls.identity(Identity::from_pem(
                    read(cert, "client certificate")?,
                    read(key, "client key")?,
                ));
            }
            (None, None) => {}
            _ => {
                return Err(SourceError::Config(
                    "an etcd client certificate needs both a cert file and a key file".into(),
                ));
            }
        }
        Ok(Some(tls))
    }

    fn options(&self) -> Result<ConnectOptions, SourceError> {
        let mut options = ConnectOptions::new()
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(20));
        if let Some((name, password)) = &self.user {
            options = options.with_user(name.clone(), password.expose().to_string());
        }
        if let Some(tls) = self.tls()? {
            options = options.with_tls(tls);
        }
        Ok(options)
    }
}

/// What the member said about itself before the snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberFacts {
    pub endpoint: String,
    pub version: String,
    pub cluster_id: u64,
    pub member_id: u64,
    pub revision: i64,
    pub db_size: i64,
}

/// A connection to one member, chosen and found healthy.
pub struct Member {
    client: Client,
    pub facts: MemberFacts,
}

impl fmt::Debug for Member {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Member({})", self.facts.endpoint)
    }
}

fn describe(error: &etcd_client::Error) -> String {
    match error {
        etcd_client::Error::GRpcStatus(status) => {
            format!("{:?}: {}", status.code(), status.message())
        }
        etcd_client::Error::TransportError(transport) => {
            // tonic's top-level message is "transport error"; the cause says what happened.
            let mut text = transport.to_string();
            let mut source = std::error::Error::source(transport);
            while let Some(cause) = source {
                text.push_str(": ");
                text.push_str(&cause.to_string());
                source = cause.source();
            }
            text
        }
        other => other.to_string(),
    }
}

fn is_auth_failure(error: &etcd_client::Error) -> bool {
    matches!(error, etcd_client::Error::GRpcStatus(status)
        if matches!(status.code(), tonic::Code::Unauthenticated | tonic::Code::PermissionDenied)
            || status.message().contains("authentication failed"))
}

impl Member {
    /// Connects to the first member of `endpoints` that answers `Status`.
    pub async fn connect(endpoints: &EtcdEndpoints) -> Result<Self, SourceError> {
        EtcdEndpoints::check_urls(&endpoints.urls)?;
        let options = endpoints.options()?;
        let mut failures = Vec::new();
        for url in &endpoints.urls {
            let attempt = async {
                let mut client = Client::connect([url.as_str()], Some(options.clone())).await?;
                let status = client.status().await?;
                Ok::<_, etcd_client::Error>((client, status))
            };
            match attempt.await {
                Ok((client, status)) => {
                    let header = status.header();
                    let facts = MemberFacts {
                        endpoint: url.clone(),
                        version: status.version().to_string(),
                        cluster_id: header.map_or(0, |h| h.cluster_id()),
                        member_id: header.map_or(0, |h| h.member_id()),
                        revision: header.map_or(0, |h| h.revision()),
                        db_size: status.db_size(),
                    };
                    return Ok(Self { client, facts });
                }
                Err(error) if is_auth_failure(&error) => {
                    return Err(SourceError::Config(format!(
                        "etcd at {url} refused the credentials: {}",
                        describe(&error)
                    )));
                }
                Err(error) => {
                    let mut reason = describe(&error);
                    if reason.contains("UnknownIssuer") {
                        reason.push_str(
                            " (trust the cluster's CA with ETCDCTL_CACERT or [etcd] ca-file)",
                        );
                    }
                    tracing::warn!(endpoint = %url, error = %reason, "etcd member unavailable");
                    failures.push(format!("{url}: {reason}"));
                }
            }
        }
        Err(SourceError::Failed(format!(
            "no etcd member answered: {}",
            failures.join("; ")
        )))
    }

    /// Streams the snapshot into `chunks`, checking it; returns what was checked. On a bad
    /// snapshot the error is also sent down `chunks`, so the reader fails instead of ending.
    pub async fn stream(
        mut self,
        chunks: mpsc::Sender<std::io::Result<Bytes>>,
    ) -> Result<SnapshotFacts, SourceError> {
        let result = self.stream_checked(&chunks).await;
        if let Err(error) = &result {
            let _ = chunks
                .send(Err(std::io::Error::other(error.to_string())))
                .await;
        }
        result
    }

    async fn stream_checked(
        &mut self,
        chunks: &mpsc::Sender<std::io::Result<Bytes>>,
    ) -> Result<SnapshotFacts, SourceError> {
        let endpoint = self.facts.endpoint.clone();
        let failed = |error: etcd_client::Error| {
            SourceError::Failed(format!(
                "etcd snapshot from {endpoint}: {}",
                describe(&error)
            ))
        };
        let mut stream = self.client.snapshot().await.map_err(failed)?;
        let mut check = SnapshotCheck::default();
        let mut remaining = None;
        while let Some(message) = stream.message().await.map_err(failed)? {
            let blob = message.blob();
            check.feed(blob);
            remaining = Some(message.remaining_bytes());
            if !blob.is_empty() && chunks.send(Ok(Bytes::copy_from_slice(blob))).await.is_err() {
                // The pipeline stopped reading: its error is the one to report.
                return Err(SourceError::Failed(
                    "the upload stopped reading".to_string(),
                ));
            }
        }
        if remaining != Some(0) {
            return Err(SourceError::Failed(format!(
                "etcd snapshot from {} ended early: {} bytes received, the member had {} more to send",
                self.facts.endpoint,
                check.total,
                remaining.map_or_else(|| "all".to_string(), |r| r.to_string())
            )));
        }
        check.finish().map_err(|reason| {
            SourceError::Failed(format!(
                "etcd snapshot from {}: {reason}",
                self.facts.endpoint
            ))
        })
    }
}

/// What the snapshot was checked against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotFacts {
    /// Bytes received, the trailer included (the file `etcdctl snapshot restore` takes).
    pub bytes: u64,
    /// The trailer: SHA-256 of the database, hex.
    pub sha256: String,
}

impl super::SnapshotSent for SnapshotFacts {
    fn bytes_sent(&self) -> u64 {
        self.bytes
    }
}

/// Hashes everything but the last 32 bytes seen, which are kept to compare at the end.
#[derive(Debug, Default)]
pub struct SnapshotCheck {
    hasher: Sha256,
    tail: Vec<u8>,
    total: u64,
}

impl SnapshotCheck {
    pub fn feed(&mut self, blob: &[u8]) {
        self.total += blob.len() as u64;
        if blob.len() >= SHA256_LEN {
            let (body, tail) = blob.split_at(blob.len() - SHA256_LEN);
            self.hasher.update(&self.tail);
            self.hasher.update(body);
            self.tail.clear();
            self.tail.extend_from_slice(tail);
        } else {
            self.tail.extend_from_slice(blob);
            let excess = self.tail.len().saturating_sub(SHA256_LEN);
            self.hasher.update(&self.tail[..excess]);
            self.tail.drain(..excess);
        }
    }

    pub fn finish(self) -> Result<SnapshotFacts, String> {
        let db_len = self.total.saturating_sub(SHA256_LEN as u64);
        if self.total < SHA256_LEN as u64 + DB_ALIGNMENT || !db_len.is_multiple_of(DB_ALIGNMENT) {
            return Err(format!(
                "{} bytes is not a database followed by its SHA-256 trailer",
                self.total
            ));
        }
        let computed = self.hasher.finalize();
        if computed.as_slice() != self.tail.as_slice() {
            return Err(format!(
                "the SHA-256 trailer does not match the database (trailer {}, computed {})",
                hex::encode(&self.tail),
                hex::encode(computed)
            ));
        }
        Ok(SnapshotFacts {
            bytes: self.total,
            sha256: hex::encode(computed),
        })
    }
}

#[cfg(test)]
mod tests;
