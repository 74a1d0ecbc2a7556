//! Sources turn a live system into a byte stream. One module per datastore; none of them knows
//! about the store or the catalog.
//!
//! A source feeds the pipeline in one of three shapes, whichever its client library gives:
//! - an [`tokio::io::AsyncRead`] (pg_dump's stdout): handed to `pipeline::upload` as it is;
//! - a stream of chunks pushed into a bounded channel (Redis' replication socket, etcd's gRPC
//!   stream): the source gets the sender, `jobs::backup::upload_snapshot` turns the receiver
//!   into a reader; the source checks the payload as it passes (CRC-64, SHA-256 trailer) and
//!   pushes an error instead of the last chunk when it does not check out, so the upload aborts;
//!   its facts say how many bytes it sent ([`SnapshotSent`]);
//! - a blocking writer (the PGDATA tar walker): `pipeline::upload_written` runs it on the
//!   compressor's own thread and gives it a `Write` into zstd, with no raw queue between.
//!
//! Every source reports failures as [`SourceError`], sorted by what the caller can do.

pub mod aof;
pub mod blocks;
pub mod etcd;
pub mod pgdata;
pub mod postgres;
pub mod redis;

/// What a snapshot source (the channel shape) reports once its stream has ended: among its
/// facts, how many bytes it sent, which the job compares with what the pipeline took.
pub trait SnapshotSent {
    fn bytes_sent(&self) -> u64;
}

/// A source's failure, sorted by what the caller can do about it (`error::meaning` turns it
/// into an exit code).
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// A setting or credential is wrong: bad URL, no such database or user, wrong password,
    /// unreadable certificate, no endpoints. The operator fixes the configuration (exit 2).
    #[error("{0}")]
    Config(String),
    /// The source failed, refused or broke off; the message says which. A later run may
    /// succeed (exit 3).
    #[error("{0}")]
    Failed(String),
}
