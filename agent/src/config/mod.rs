//! Configuration, resolved once before any I/O: TOML file < environment < flags.
//!
//! - [`mod@file`]: the TOML shape, [`FileConfig`] (every key optional, unknown keys are errors);
//! - [`Overrides`]: what the command line says (global flags and each command's own);
//! - [`resolve`](Config::resolve): merges the three (the environment through an injected
//!   lookup, so tests never touch the process environment) and validates everything;
//! - [`resolved`]: the [`Config`] the rest of the agent uses without re-checking: endpoints
//!   parsed, credentials attached, the pipeline fitted to the memory limit.
//!
//! Secrets live in [`Secret`], whose `Debug` and `Display` never show the value.

use std::fmt;
use std::path::PathBuf;

use serde::Deserialize;

pub mod file;
mod resolve;
pub mod resolved;
mod schedule;
#[cfg(test)]
mod tests;

pub use file::FileConfig;
pub use resolve::{parse_size, redact_url};
pub use resolved::*;
pub use schedule::Schedule;

/// A configuration error: always a usage problem (exit 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

pub(crate) fn err(message: impl Into<String>) -> ConfigError {
    ConfigError(message.into())
}
/// A password, key or token. Shown as `***` everywhere.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    /// The value, for the one place that must hand it to a client library or child process.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// What the command line says: the global flags, and the flags of the command being run that
/// override a setting. Kept in the resolved [`Config`] as [`Config::origin`], so that the
/// binary can start itself again (PostgreSQL's `restore_command`, the WAL prefetcher) with
/// the same configuration.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub config_file: Option<PathBuf>,
    pub store_url: Option<String>,
    pub zstd_level: Option<i32>,
    pub part_size: Option<String>,
    pub parallel_uploads: Option<usize>,
    /// `backup pg-base --pgdata`.
    pub pgdata: Option<PathBuf>,
    /// `backup redis --redis-url`.
    pub redis_url: Option<String>,
    /// `backup redis --aof-dir`.
    pub redis_aof_dir: Option<PathBuf>,
    /// `backup etcd --endpoints`, comma-separated.
    pub etcd_endpoints: Option<String>,
    /// `--as-of TIME`, as given.
    pub as_of: Option<String>,
}

impl Overrides {
    /// The configuration file these flags (or else the environment) name, made absolute.
    pub fn config_file(&self, env: &dyn Fn(&str) -> Option<String>) -> Option<PathBuf> {
        let file = self.config_file.clone().or_else(|| {
            env("GC_BACKUP_CONFIG")
                .filter(|p| !p.is_empty())
                .map(PathBuf::from)
        })?;
        Some(std::path::absolute(&file).unwrap_or(file))
    }
}

impl Config {
    /// Reads the file named by `--config` or `GC_BACKUP_CONFIG` (if any) and the process
    /// environment.
    pub fn load(flags: &Overrides) -> Result<Self, ConfigError> {
        let env = |name: &str| std::env::var(name).ok();
        let file = match flags.config_file(&env) {
            Some(path) => FileConfig::load(&path)?,
            None => FileConfig::default(),
        };
        Self::resolve(file, &env, flags)
    }

    /// The environment that starts this binary again with this configuration: the
    /// configuration file and a store URL given as a flag (everything else reaches a child
    /// through the environment it inherits).
    pub fn child_env(&self) -> Vec<(String, String)> {
        let mut env = Vec::new();
        if let Some(file) = &self.origin.config_file {
            env.push(("GC_BACKUP_CONFIG".to_string(), file.display().to_string()));
        }
        if let Some(url) = &self.origin.store_url {
            env.push(("GC_BACKUP_STORE".to_string(), url.clone()));
        }
        // restore_command reads the archive as of the same moment.
        if let Some(time) = self.as_of {
            env.push((
                "GC_BACKUP_AS_OF".to_string(),
                time.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
            ));
        }
        // wal-fetch must open encrypted WAL, whether the keys came from the file or not.
        if !self.encryption.identity_files.is_empty() {
            let files: Vec<String> = self
                .encryption
                .identity_files
                .iter()
                .map(|file| file.display().to_string())
                .collect();
            env.push(("GC_BACKUP_AGE_IDENTITY_FILE".to_string(), files.join(",")));
        }
        env
    }

    /// The recipients, and the identities of `[encryption] identity-file` read now.
    pub fn keys(&self) -> Result<crate::seal::Keys, ConfigError> {
        let identities = crate::seal::Identities::load(&self.encryption.identity_files)
            .map_err(|e| err(e.to_string()))?;
        Ok(crate::seal::Keys {
            recipients: self.encryption.recipients.clone(),
            identities,
        })
    }
}
