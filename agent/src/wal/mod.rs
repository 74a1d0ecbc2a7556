//! The WAL archive, in one place for the CLI and the sidecar: `wal-push` (PostgreSQL's
//! archive_command) and `wal-fetch` (its restore_command) here; a WAL file's stored form
//! ([`object`]); the sidecar's look-ahead uploads and the markers wal-push trusts
//! ([`archiver`]); the segments read ahead of a recovery ([`prefetch`]); the archive as the
//! restore planner sees it ([`archive`]). File names and segment arithmetic are the `pitr`
//! crate's.
//!
//! wal-push exits 0 only once the file is durably stored; a second push of the same content
//! succeeds, of different content fails and overwrites nothing (create-only PUT, then a
//! comparison with the stored header). wal-fetch writes DEST only after the content checked
//! out, through a temporary name in DEST's directory.
//!
//! With recipients, the stored form is encrypted whole (an age file, `crate::seal`); its age
//! header describes the content, so the comparison of a repeated push needs no key.

pub mod archive;
pub mod archiver;
pub mod object;
pub mod prefetch;
pub mod receiver;

use std::path::{Path, PathBuf};

use anyhow::Context;
use pitr::WalFile;

use crate::catalog::layout;
use crate::config::Config;
use crate::error::Failure;
use crate::store::{ObjectKey, Store, StoreError};
use object::{HEADER_LEN, WalHeader};

/// What a push did, and the SHA-256 of what is archived.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pushed {
    pub outcome: PushOutcome,
    pub sha256: String,
}

/// What a push found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushOutcome {
    Stored,
    /// The archive already had this file with the same content.
    AlreadyArchived,
}

fn parse_name(name: &str) -> anyhow::Result<WalFile> {
    WalFile::parse(name).map_err(|e| Failure::Config(e.to_string()).into())
}

/// Archives the WAL file at `path` (relative paths are PostgreSQL's `%p`, from PGDATA).
pub async fn push(config: &Config, store: &Store, path: &Path) -> anyhow::Result<Pushed> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| Failure::Config(format!("{} names no WAL file", path.display())))?;
    let file_name = parse_name(name)?;
    let level = config.pipeline.zstd_level;
    let workers = config.pipeline.zstd_workers;
    let file = path.to_path_buf();
    let seal = store.keys().recipients.clone();
    // Read and compressed frame by frame on a blocking thread: the raw segment is never held
    // whole, only its compressed form (what the PUT sends).
    let encoding = tokio::task::spawn_blocking(move || {
        object::encode_file(&file, level, workers, seal.as_ref())
            .with_context(|| format!("cannot read and compress {}", file.display()))
    });
    // The store's encryption marker is read while the segment is compressed.
    let (encoded, marker) = tokio::join!(encoding, crate::catalog::check_encryption(store));
    let (header, stored) = encoded.context("compression worker failed")??;
    marker.with_context(|| format!("archiving {name} failed"))?;
    let outcome = store_archived(store, &file_name, &header, stored).await?;
    Ok(Pushed {
        outcome,
        sha256: header.sha256_hex(),
    })
}

/// Stores `stored` (the stored form of `file`, whose content `header` describes) as the
/// archive's object for it: create-only, and a second store of the same content succeeds, of
/// other content fails and overwrites nothing. wal-push and the WAL receiver both store here.
pub async fn store_archived(
    store: &Store,
    file: &WalFile,
    header: &WalHeader,
    stored: bytes::Bytes,
) -> anyhow::Result<PushOutcome> {
    let name = file.name();
    let key = layout::wal_key(file);
    // WAL is never held back by max-upload-rate; the backups behind it wait instead.
    crate::pipeline::rate::upload_now(stored.len());
    match store.put_new(&key, stored).await {
        Ok(()) => {
            store.sync(&key).await?;
            Ok(PushOutcome::Stored)
        }
        Err(StoreError::AlreadyExists { .. }) => {
            compare_with_archived(store, &key, &name, header).await
        }
        Err(error) => Err(anyhow::Error::new(error).context(format!("archiving {name} failed"))),
    }
}

async fn compare_with_archived(
    store: &Store,
    key: &ObjectKey,
    name: &str,
    local: &WalHeader,
) -> anyhow::Result<PushOutcome> {
    let head = store.get_range(key, 0..HEADER_LEN as u64).await?;
    let archived = if crate::seal::is_sealed(&head) {
        // Encrypted: the description is in the age header, whose length depends on the
        // recipients. A repeated push is rare; read the whole object.
        let stored = store.get_bytes(key).await?;
        crate::seal::wal_description(&stored)
            .and_then(|(raw_size, sha256)| WalHeader::from_hex(raw_size, &sha256))
            .ok_or_else(|| "an encrypted object without its gc-backup-wal stanza".to_string())
    } else {
        WalHeader::parse(&head)
    };
    let archived = archived
        .map_err(|e| Failure::Corrupt(format!("{key} in {} is damaged: {e}", store.name())))?;
    if archived == *local {
        // The push that stored it may have died before its retention was set.
        store.retain(key, None).await?;
        return Ok(PushOutcome::AlreadyArchived);
    }
    Err(anyhow::anyhow!(
        "{name} is already archived in {} with different content ({} bytes, SHA-256 {}; this \
         file: {} bytes, SHA-256 {}). Nothing was overwritten. Two clusters may be archiving to \
         the same store: check GC_BACKUP_STORE.",
        store.name(),
        archived.raw_size,
        archived.sha256_hex(),
        local.raw_size,
        local.sha256_hex()
    ))
}

/// Restores the archived WAL file `name` to `dest`. `Failure::NotFound` when the archive does
/// not have it; the caller turns every other error into a fatal exit for PostgreSQL.
pub async fn fetch(store: &Store, name: &str, dest: &Path) -> anyhow::Result<u64> {
    let file = parse_name(name)?;
    let raw = read(store, &file).await?;
    let size = raw.len() as u64;
    let dest = dest.to_path_buf();
    tokio::task::spawn_blocking(move || write_new(&dest, &raw))
        .await
        .context("write worker failed")??;
    Ok(size)
}

/// The content of an archived WAL file, checked against its header. A segment the archive
/// does not have yet may have been streamed (`[postgres] stream-wal`): then its streamed part,
/// zero-filled to a segment.
pub async fn read(store: &Store, file: &WalFile) -> anyhow::Result<Vec<u8>> {
    let name = file.name();
    match read_object(store, &layout::wal_key(file)).await {
        Err(error) if crate::error::is_not_found(&error) => {}
        read => return read.with_context(|| format!("fetching {name} failed")),
    }
    if matches!(file, WalFile::Segment { .. })
        && let Some(streamed) = receiver::read_streamed(store, file).await?
    {
        return Ok(streamed);
    }
    Err(Failure::NotFound(format!("{name} is not in the archive {}", store.name())).into())
}

/// The content of one stored WAL object (a file or a streamed chunk), checked against its
/// header. `Failure::NotFound` when there is none.
pub async fn read_object(store: &Store, key: &ObjectKey) -> anyhow::Result<Vec<u8>> {
    let stored = match store.get_bytes(key).await {
        Ok(stored) => stored,
        Err(StoreError::NotFound { .. }) => {
            return Err(Failure::NotFound(format!("{key} is not in {}", store.name())).into());
        }
        Err(error) => return Err(anyhow::Error::new(error)),
    };
    let identities = if crate::seal::is_sealed(&stored) {
        let what = format!("{key} in {}", store.name());
        Some(store.keys().identities_for(&what)?.clone())
    } else {
        None
    };
    let what = key.to_string();
    let decoded = tokio::task::spawn_blocking(move || match identities {
        None => Ok(object::decode(&stored)),
        Some(identities) => identities
            .open_all(&stored, &what)
            .map(|clear| object::decode(&clear)),
    })
    .await
    .context("decompression worker failed")??;
    decoded.map_err(|e| Failure::Corrupt(format!("{key} in {} {e}", store.name())).into())
}

/// Writes through a temporary name beside `dest` and renames, so DEST is whole or absent.
fn write_new(dest: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let mut temporary = dest.as_os_str().to_owned();
    temporary.push(".gc-backup-partial");
    let temporary = PathBuf::from(temporary);
    let result = std::fs::write(&temporary, bytes)
        .with_context(|| format!("cannot write {}", temporary.display()))
        .and_then(|()| {
            std::fs::rename(&temporary, dest).with_context(|| {
                format!(
                    "cannot rename {} to {}",
                    temporary.display(),
                    dest.display()
                )
            })
        });
    if result.is_err() {
        let _ = std::fs::remove_file(&temporary);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{FileConfig, Overrides};
    use crate::testing::noise;

    fn config() -> Config {
        Config::resolve(FileConfig::default(), &|_| None, &Overrides::default()).unwrap()
    }

    #[tokio::test]
    async fn wal_push_same_segment_twice_is_ok_and_different_content_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let segment = dir.path().join("000000010000000000000001");
        let original = noise(1 << 20, 1);
        std::fs::write(&segment, &original).unwrap();
        let store = Store::memory();
        let config = config();
        assert_eq!(
            push(&config, &store, &segment).await.unwrap().outcome,
            PushOutcome::Stored
        );
        assert_eq!(
            push(&config, &store, &segment).await.unwrap().outcome,
            PushOutcome::AlreadyArchived
        );
        std::fs::write(&segment, noise(1 << 20, 2)).unwrap();
        let error = push(&config, &store, &segment).await.unwrap_err();
        assert!(
            format!("{error:#}").contains("different content"),
            "{error:#}"
        );

        let dest = dir.path().join("RECOVERYXLOG");
        fetch(&store, "000000010000000000000001", &dest)
            .await
            .unwrap();
        assert!(
            std::fs::read(&dest).unwrap() == original,
            "the archived copy was overwritten"
        );
    }

    #[tokio::test]
    async fn sealed_wal_compares_without_a_key_and_locks_out_clear_pushes() {
        let dir = tempfile::tempdir().unwrap();
        let segment = dir.path().join("000000010000000000000001");
        let original = noise(1 << 20, 1);
        std::fs::write(&segment, &original).unwrap();
        let (secret, public) = crate::seal::tests::key_pair();
        let clear = Store::memory();
        let sealing = clear.clone().with_keys(crate::seal::Keys {
            recipients: crate::seal::Recipients::parse(&[public]).unwrap(),
            identities: None,
        });
        let config = config();
        let pushed = push(&config, &sealing, &segment).await.unwrap();
        assert_eq!(pushed.outcome, PushOutcome::Stored);
        assert_eq!(
            push(&config, &sealing, &segment).await.unwrap().outcome,
            PushOutcome::AlreadyArchived
        );
        std::fs::write(&segment, noise(1 << 20, 2)).unwrap();
        let error = push(&config, &sealing, &segment).await.unwrap_err();
        assert!(
            format!("{error:#}").contains("different content"),
            "{error:#}"
        );

        // The store is now marked encrypted: a sidecar without recipients is turned away.
        let next = dir.path().join("000000010000000000000002");
        std::fs::write(&next, noise(1 << 16, 3)).unwrap();
        let error = push(&config, &clear, &next).await.unwrap_err();
        assert_eq!(
            crate::error::meaning(&error),
            Some(crate::error::Meaning::Config),
            "{error:#}"
        );
        assert!(
            format!("{error:#}").contains("encrypted store"),
            "{error:#}"
        );

        let dest = dir.path().join("RECOVERYXLOG");
        let error = fetch(&clear, "000000010000000000000001", &dest)
            .await
            .unwrap_err();
        assert_eq!(
            crate::error::meaning(&error),
            Some(crate::error::Meaning::Config)
        );
        assert!(!dest.exists());
        let reading = clear.clone().with_keys(crate::seal::Keys {
            recipients: None,
            identities: Some(crate::seal::tests::identities(dir.path(), &secret)),
        });
        fetch(&reading, "000000010000000000000001", &dest)
            .await
            .unwrap();
        assert!(std::fs::read(&dest).unwrap() == original);
    }

    #[tokio::test]
    async fn fetching_a_missing_file_is_not_found_and_leaves_no_dest() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("RECOVERYXLOG");
        let error = fetch(&Store::memory(), "00000002.history", &dest)
            .await
            .unwrap_err();
        assert!(crate::error::is_not_found(&error));
        assert!(!dest.exists());
        assert!(
            fetch(&Store::memory(), "RECOVERYXLOG", &dest)
                .await
                .is_err()
        );
    }
}
