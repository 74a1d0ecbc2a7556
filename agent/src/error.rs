//! What a failure means for the caller, and so which exit code the binary returns.
//!
//! Errors travel as `anyhow::Error` with context. `main` walks the chain and the first cause
//! whose meaning for the caller is known picks the exit code (README, "Exit codes"): a
//! [`Failure`] raised by a job, or one of the typed errors of the layers below, each sorted by
//! what the caller can do about it ([`meaning`]). A lower layer's error therefore needs no
//! converting on its way up: `?` with context keeps it in the chain.

use std::process::ExitCode;

/// A failure whose meaning for the caller is known.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// The thing asked for is not there (a backup id, `latest` of an empty kind). Exit 1.
    #[error("{0}")]
    NotFound(String),
    /// Bad usage or configuration: a malformed URL, an unknown key, wrong credentials, a
    /// missing bucket or database. Exit 2.
    #[error("{0}")]
    Config(String),
    /// Stored data does not match its manifest. Exit 3 like any other failure, but named so
    /// that the message is never softened.
    #[error("{0}")]
    Corrupt(String),
    /// The run was interrupted by a signal; nothing was committed. Exit 130.
    #[error("{0}")]
    Interrupted(String),
}

/// Exit code for "the thing asked for is not there".
pub const EXIT_NOT_FOUND: u8 = 1;
/// Exit code for bad usage or configuration.
pub const EXIT_CONFIG: u8 = 2;
/// Exit code for every other failure.
pub const EXIT_FAILURE: u8 = 3;
/// Exit code after SIGINT or SIGTERM, as shells report it.
pub const EXIT_INTERRUPTED: u8 = 130;
/// `wal-fetch`'s exit code for anything but "not in the archive": above 125, so PostgreSQL
/// aborts recovery instead of taking it for the end of the WAL and promoting too early.
pub const EXIT_RECOVERY_FATAL: u8 = 255;

/// What a failure means for the caller, whichever layer raised it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Meaning {
    NotFound,
    Config,
    Corrupt,
    Interrupted,
}

/// The meaning of the first cause in `error`'s chain that has one; `None`: a plain failure.
pub fn meaning(error: &anyhow::Error) -> Option<Meaning> {
    error.chain().find_map(meaning_of)
}

/// Whether `error` means "the thing asked for is not there".
pub fn is_not_found(error: &anyhow::Error) -> bool {
    meaning(error) == Some(Meaning::NotFound)
}

/// One cause's meaning. The layers' own errors say what they are; this is the one place that
/// turns that into the contract's terms.
fn meaning_of(cause: &(dyn std::error::Error + 'static)) -> Option<Meaning> {
    use crate::catalog::CatalogError;
    use crate::pipeline::PipelineError;
    use crate::sources::SourceError;
    use crate::store::StoreError;
    let store = |error: &StoreError| error.is_config().then_some(Meaning::Config);
    if let Some(failure) = cause.downcast_ref::<Failure>() {
        return Some(match failure {
            Failure::NotFound(_) => Meaning::NotFound,
            Failure::Config(_) => Meaning::Config,
            Failure::Corrupt(_) => Meaning::Corrupt,
            Failure::Interrupted(_) => Meaning::Interrupted,
        });
    }
    if cause.is::<crate::config::ConfigError>() {
        return Some(Meaning::Config);
    }
    if let Some(error) = cause.downcast_ref::<crate::seal::SealError>() {
        return Some(seal(error));
    }
    if let Some(error) = cause.downcast_ref::<SourceError>() {
        return match error {
            SourceError::Config(_) => Some(Meaning::Config),
            SourceError::Failed(_) => None,
        };
    }
    if let Some(error) = cause.downcast_ref::<StoreError>() {
        return store(error);
    }
    if let Some(error) = cause.downcast_ref::<CatalogError>() {
        return match error {
            CatalogError::NoSuchBackup { .. } | CatalogError::NoBackups { .. } => {
                Some(Meaning::NotFound)
            }
            CatalogError::Store(error) => store(error),
            CatalogError::Encrypted { .. } => Some(Meaning::Config),
            CatalogError::BadManifest { .. }
            | CatalogError::NoFreeId { .. }
            | CatalogError::BrokenChain { .. } => None,
        };
    }
    if let Some(error) = cause.downcast_ref::<PipelineError>() {
        return match error {
            PipelineError::Store(error) | PipelineError::Part { source: error, .. } => store(error),
            PipelineError::Corrupt(_) => Some(Meaning::Corrupt),
            PipelineError::Seal(error) => Some(seal(error)),
            PipelineError::Cancelled { .. } => Some(Meaning::Interrupted),
            _ => None,
        };
    }
    None
}

/// A key that is missing is a setting to fix (exit 2); one that does not open the object, or
/// an object that does not decrypt, is a failure of the data (exit 3).
fn seal(error: &crate::seal::SealError) -> Meaning {
    if error.is_config() {
        Meaning::Config
    } else {
        Meaning::Corrupt
    }
}

/// The exit code for an error: the first meaning found in its chain decides.
pub fn exit_code_for(error: &anyhow::Error) -> ExitCode {
    let code = match meaning(error) {
        Some(Meaning::NotFound) => EXIT_NOT_FOUND,
        Some(Meaning::Config) => EXIT_CONFIG,
        Some(Meaning::Interrupted) => EXIT_INTERRUPTED,
        Some(Meaning::Corrupt) | None => EXIT_FAILURE,
    };
    ExitCode::from(code)
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn the_failure_deepest_in_the_chain_still_decides() {
        let error = Err::<(), _>(Failure::NotFound("no backup 2026".into()))
            .context("restore failed")
            .unwrap_err();
        assert_eq!(exit_code_for(&error), ExitCode::from(EXIT_NOT_FOUND));
        let plain = anyhow::anyhow!("disk on fire");
        assert_eq!(exit_code_for(&plain), ExitCode::from(EXIT_FAILURE));
        let config = anyhow::Error::new(Failure::Config("bad".into())).context("x");
        assert_eq!(exit_code_for(&config), ExitCode::from(EXIT_CONFIG));
    }

    #[test]
    fn the_layers_typed_errors_carry_their_meaning_up_without_converting() {
        use crate::catalog::{CatalogError, Kind};
        use crate::pipeline::PipelineError;
        use crate::sources::SourceError;
        use crate::store::StoreError;
        let source = anyhow::Error::new(SourceError::Config("bad password".into())).context("x");
        assert_eq!(meaning(&source), Some(Meaning::Config));
        let failed = anyhow::Error::new(SourceError::Failed("reset".into()));
        assert_eq!(meaning(&failed), None);
        let missing = anyhow::Error::new(CatalogError::NoBackups {
            kind: Kind::Redis,
            store: "s".into(),
        })
        .context("restore failed");
        assert!(is_not_found(&missing));
        let denied = StoreError::Denied {
            key: "k".into(),
            store: "s".into(),
            detail: "403".into(),
        };
        let part = anyhow::Error::new(PipelineError::Part {
            part: 1,
            key: "k".into(),
            source: denied,
        });
        assert_eq!(exit_code_for(&part), ExitCode::from(EXIT_CONFIG));
        let cancelled = anyhow::Error::new(PipelineError::Cancelled { key: "k".into() });
        assert_eq!(exit_code_for(&cancelled), ExitCode::from(EXIT_INTERRUPTED));
        let corrupt = anyhow::Error::new(PipelineError::Corrupt("sha".into()));
        assert_eq!(meaning(&corrupt), Some(Meaning::Corrupt));
    }
}
