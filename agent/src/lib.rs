//! gc-backup: the backup and restore agent of GC Storage.
//!
//! Data flows one way, and the modules follow it:
//!
//! - [`sources`] turn a live system into a byte stream (`pg_dump`'s stdout, …);
//! - [`pipeline`] hashes, compresses (zstd) and cuts the stream into parts, holding a bounded
//!   number of them in memory, and uploads them; on the way back it decompresses and checks;
//! - [`store`] is `object_store` (S3 and compatible servers, a local directory, memory);
//! - [`catalog`] says what is in the store: one manifest per backup, written last;
//! - [`jobs`] is the only place where a source, the pipeline and the store meet;
//! - [`config`] resolves file < environment < flags once, before any I/O; [`cli`] is the
//!   command line, and [`error`] maps failures to the exit codes of the contract.

pub mod catalog;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod error;
pub mod host;
pub mod jobs;
pub mod pipeline;
pub mod seal;
pub mod sources;
pub mod store;
#[doc(hidden)]
pub mod testing;
pub mod wal;
