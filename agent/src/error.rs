//! What a failure means for the caller, and so which exit code the binary returns.
//!
//! Errors travel as `anyhow::Error` with context; where a failure has a meaning for the
//! contract (DESIGN.md, "Exit codes") it carries a [`Failure`] somewhere in its chain, and
//! `main` walks the chain to pick the code.

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

/// The exit code for an error: the first [`Failure`] found in its chain decides.
pub fn exit_code_for(error: &anyhow::Error) -> ExitCode {
    let code = error
        .chain()
        .find_map(|cause| cause.downcast_ref::<Failure>())
        .map_or(EXIT_FAILURE, |failure| match failure {
            Failure::NotFound(_) => EXIT_NOT_FOUND,
            Failure::Config(_) => EXIT_CONFIG,
            Failure::Corrupt(_) => EXIT_FAILURE,
            Failure::Interrupted(_) => EXIT_INTERRUPTED,
        });
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
}
