//! The AOF half of `backup redis --aof-dir` and `restore redis`: Redis 7's multi-part AOF
//! copied as a consistent set, uploading only files whose content the newest earlier backup
//! does not already hold; and written back as a complete directory or not at all.
//!
//! Consistency: read the manifest, copy what it names (the growing incremental file up to
//! its last complete command), read the manifest again. Redis changes the manifest whenever a
//! rewrite starts or ends, so an unchanged manifest means the copied files belong together.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use tokio::io::AsyncReadExt;
use tokio_util::sync::CancellationToken;

use crate::catalog::manifest::{AofFacts, AofFileFacts, SourceFacts};
use crate::catalog::{self, BackupId, Kind, Manifest, StoredObject, layout};
use crate::config::Config;
use crate::error::Failure;
use crate::pipeline;
use crate::sources::aof::{self, AofError, AofManifest};
use crate::store::{ObjectKey, Store, StoreError};

/// Copies tried before giving up on a Redis that keeps rewriting its AOF.
const MAX_ATTEMPTS: u32 = 5;
/// Only the newest redis backup is a source of files to reuse: retention never deletes the
/// newest backup of a kind, so an object this run decides to name cannot be deleted before the
/// run commits.
const PREVIOUS_LOOKUPS: usize = 1;

/// What the copy stored: the facts for the manifest, and the objects it names (some of them
/// stored by earlier backups).
#[derive(Debug)]
pub struct AofCopy {
    pub facts: AofFacts,
    pub objects: Vec<StoredObject>,
    /// Bytes read from Redis' files and uploaded by this run (reused files excluded).
    pub uploaded_raw_bytes: u64,
}

fn aof_error(error: AofError) -> anyhow::Error {
    match error {
        AofError::NotAof(message) => Failure::Config(message).into(),
        other => anyhow::Error::new(other),
    }
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, AofError> + Send + 'static,
) -> anyhow::Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .context("AOF reader task failed")?
        .map_err(aof_error)
}

/// Copies the AOF set in `dir` into backup `id` of `store`.
pub async fn copy_set(
    config: &Config,
    store: &Store,
    id: &BackupId,
    dir: &Path,
    cancel: &CancellationToken,
) -> anyhow::Result<AofCopy> {
    let dir_name = dir
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .ok_or_else(|| {
            Failure::Config(format!("--aof-dir {} has no directory name", dir.display()))
        })?;
    let previous = previous_files(store).await;
    for attempt in 1..=MAX_ATTEMPTS {
        let owned_dir = dir.to_path_buf();
        let manifest = blocking(move || AofManifest::read(&owned_dir)).await?;
        let copied = copy_once(config, store, id, dir, &manifest, &previous, cancel).await;
        let owned_dir = dir.to_path_buf();
        let now = blocking(move || AofManifest::read(&owned_dir)).await?;
        if now.text != manifest.text {
            tracing::info!(
                attempt,
                "Redis changed its AOF manifest during the copy (a rewrite); copying again"
            );
            continue;
        }
        let (files, objects, uploaded_raw_bytes) = copied?;
        remove_stale_uploads(store, id, &objects).await?;
        return Ok(AofCopy {
            facts: AofFacts {
                dir: dir_name,
                manifest_name: manifest.file_name.clone(),
                manifest: manifest.without_history(),
                files,
                attempts: attempt,
            },
            objects,
            uploaded_raw_bytes,
        });
    }
    anyhow::bail!(
        "Redis rewrote its AOF in {} during each of {MAX_ATTEMPTS} copies; try again later",
        dir.display()
    )
}

type Copied = (Vec<AofFileFacts>, Vec<StoredObject>, u64);

async fn copy_once(
    config: &Config,
    store: &Store,
    id: &BackupId,
    dir: &Path,
    manifest: &AofManifest,
    previous: &HashMap<String, StoredObject>,
    cancel: &CancellationToken,
) -> anyhow::Result<Copied> {
    let growing = manifest.growing().map(|entry| entry.name.clone());
    let mut files = Vec::new();
    let mut objects = Vec::new();
    let mut uploaded = 0;
    for entry in manifest.live() {
        let path = dir.join(&entry.name);
        let size = tokio::fs::metadata(&path)
            .await
            .with_context(|| format!("reading the size of {}", path.display()))?
            .len();
        let len = if growing.as_deref() == Some(entry.name.as_str()) {
            let owned = path.clone();
            blocking(move || aof::complete_prefix(&owned, size)).await?
        } else {
            size
        };
        if let Some(object) = reusable(store, previous.get(&entry.name), &path, len).await? {
            files.push(AofFileFacts {
                name: entry.name.clone(),
                key: object.key.clone(),
                reused: true,
            });
            objects.push(object);
            continue;
        }
        let key = layout::data_key(Kind::Redis, id, &format!("aof/{}.zst", entry.name));
        let file = tokio::fs::File::open(&path)
            .await
            .with_context(|| format!("opening {}", path.display()))?;
        let summary = pipeline::upload(store, &key, file.take(len), &config.pipeline, cancel)
            .await
            .map_err(anyhow::Error::from)
            .with_context(|| format!("uploading {}", path.display()))?;
        if summary.raw_bytes != len {
            anyhow::bail!(
                "{} shrank while it was copied ({} of {len} bytes read)",
                path.display(),
                summary.raw_bytes
            );
        }
        super::backup::check_stored_size(store, &key, summary.stored_bytes).await?;
        uploaded += summary.raw_bytes;
        files.push(AofFileFacts {
            name: entry.name.clone(),
            key: key.to_string(),
            reused: false,
        });
        objects.push(super::backup::stored_object(&key, &summary));
    }
    Ok((files, objects, uploaded))
}

/// The earlier object for this file name, if it holds exactly the `len` bytes `path` starts
/// with and is still in the store.
async fn reusable(
    store: &Store,
    earlier: Option<&StoredObject>,
    path: &Path,
    len: u64,
) -> anyhow::Result<Option<StoredObject>> {
    // An object stored in the clear is not reused by an encrypted backup, nor the other way.
    let sealing = store.keys().recipients.is_some();
    let Some(earlier) =
        earlier.filter(|object| object.raw_bytes == len && object.sealed == sealing)
    else {
        return Ok(None);
    };
    let owned = path.to_path_buf();
    let sha256 = blocking(move || aof::sha256_prefix(&owned, len)).await?;
    if sha256.is_none() || sha256 != earlier.raw_sha256 {
        return Ok(None);
    }
    match store.head(&ObjectKey::from(earlier.key.as_str())).await {
        Ok(_) => Ok(Some(earlier.clone())),
        Err(StoreError::NotFound { .. }) => Ok(None),
        Err(error) => Err(anyhow::Error::new(error)),
    }
}

/// The AOF objects of the newest redis backup (if it has an AOF set), by file name. Anything
/// that goes wrong here only costs an upload, so it is a warning.
async fn previous_files(store: &Store) -> HashMap<String, StoredObject> {
    let newest = match catalog::newest(store, Kind::Redis, PREVIOUS_LOOKUPS).await {
        Ok(manifests) => manifests,
        Err(error) => {
            tracing::warn!(%error, "cannot read earlier redis backups; uploading every AOF file");
            return HashMap::new();
        }
    };
    let Some((manifest, aof)) = newest.iter().find_map(|manifest| match &manifest.source {
        SourceFacts::Redis(facts) => facts.aof.as_ref().map(|aof| (manifest, aof)),
        _ => None,
    }) else {
        return HashMap::new();
    };
    aof.files
        .iter()
        .filter_map(|file| {
            let object = manifest.objects.iter().find(|o| o.key == file.key)?;
            Some((file.name.clone(), object.clone()))
        })
        .collect()
}

/// Removes objects an abandoned attempt uploaded for files that are not in the final set.
async fn remove_stale_uploads(
    store: &Store,
    id: &BackupId,
    objects: &[StoredObject],
) -> anyhow::Result<()> {
    let prefix = layout::data_key(Kind::Redis, id, "aof");
    for meta in store.list(&prefix).await.map_err(anyhow::Error::new)? {
        if !objects.iter().any(|o| o.key == meta.location.as_ref()) {
            store
                .delete(&meta.location)
                .await
                .map_err(anyhow::Error::new)?;
        }
    }
    Ok(())
}

/// Writes the AOF set of `manifest` as `dir/<its directory name>`: built under a hidden
/// temporary name, every file checked, and renamed only when complete.
pub async fn restore_set(
    store: &Store,
    manifest: &Manifest,
    aof: &AofFacts,
    dir: &Path,
) -> anyhow::Result<PathBuf> {
    match restore_set_until(store, manifest, aof, dir, None).await? {
        Ok(cut) => Ok(cut.dir),
        Err(why) => Err(anyhow::anyhow!(why)),
    }
}

/// Where a set restored to a moment was cut.
#[derive(Debug)]
pub struct AofCut {
    pub dir: PathBuf,
    /// The incremental file cut short, if the set went on past the moment.
    pub cut_file: Option<String>,
    /// The newest `#TS:` annotation kept, in unix seconds.
    pub last_kept: Option<u64>,
    /// Incremental files left out, all after the moment.
    pub dropped: Vec<String>,
}

/// [`restore_set`], cut at the first `#TS:` annotation later than `until` (unix seconds) when
/// given: that incremental file is truncated there, later ones are left out of the directory
/// and the manifest. `Ok(Err(why))` when the set cannot be cut to that moment (no annotations;
/// none before it, so the base may be newer than the moment); nothing is left in `dir`.
pub async fn restore_set_until(
    store: &Store,
    manifest: &Manifest,
    aof: &AofFacts,
    dir: &Path,
    until: Option<u64>,
) -> anyhow::Result<Result<AofCut, String>> {
    let target = dir.join(&aof.dir);
    if target.exists() {
        return Err(Failure::Config(format!(
            "{} already exists; restore writes only new files",
            target.display()
        ))
        .into());
    }
    let entries = AofManifest::parse(aof.manifest_name.clone(), aof.manifest.clone())
        .map_err(|e| {
            Failure::Corrupt(format!(
                "redis backup {}: its AOF manifest: {e}",
                manifest.id
            ))
        })?
        .entries;
    let of_type = |file_type| -> std::collections::HashSet<String> {
        entries
            .iter()
            .filter(|entry| entry.file_type == file_type)
            .map(|entry| entry.name.clone())
            .collect()
    };
    let (incremental, base) = (
        of_type(aof::AofFileType::Incr),
        of_type(aof::AofFileType::Base),
    );
    // When the base's snapshot was taken (an RDB base says in its aux fields).
    let mut base_time = None;
    let partial = dir.join(format!(".{}.partial", aof.dir));
    tokio::fs::create_dir(&partial)
        .await
        .with_context(|| format!("creating {}", partial.display()))?;
    // Only a directory this run created is removed on failure.
    let mut building = TempDir {
        path: partial,
        keep: false,
    };
    let mut cut = AofCut {
        dir: target.clone(),
        cut_file: None,
        last_kept: None,
        dropped: Vec::new(),
    };
    let mut annotated = false;
    for file in &aof.files {
        if cut.cut_file.is_some() && incremental.contains(&file.name) {
            cut.dropped.push(file.name.clone());
            continue;
        }
        let object = manifest
            .objects
            .iter()
            .find(|object| object.key == file.key)
            .ok_or_else(|| {
                Failure::Corrupt(format!(
                    "redis backup {}: AOF file {} names object {}, which the manifest lacks",
                    manifest.id, file.name, file.key
                ))
            })?;
        let path = building.path.join(&file.name);
        super::restore_to_file(store, object, &path)
            .await
            .with_context(|| format!("restoring {}", file.name))?;
        if until.is_some() && base.contains(&file.name) {
            let head = path.clone();
            base_time = blocking(move || {
                let mut head_bytes = Vec::with_capacity(4096);
                std::fs::File::open(&head)
                    .and_then(|f| {
                        std::io::Read::read_to_end(
                            &mut std::io::Read::take(f, 4096),
                            &mut head_bytes,
                        )
                    })
                    .map_err(|e| AofError::io(&head, e))?;
                Ok(aof::rdb_ctime(&head_bytes))
            })
            .await?;
        }
        let Some(until) = until.filter(|_| incremental.contains(&file.name)) else {
            continue;
        };
        let scanned = path.clone();
        let (at, (first, last_kept)) = blocking(move || aof::cut_after(&scanned, until)).await?;
        annotated |= first.is_some();
        cut.last_kept = last_kept.or(cut.last_kept);
        if let Some(at) = at {
            // Nothing of the incremental files is kept: only a base taken by then will do.
            if cut.last_kept.is_none() && base_time.is_none_or(|taken| taken > until) {
                return Ok(Err(format!(
                    "the AOF set of redis backup {} has no timestamp at or before the target \
                     (its first is {}) and its base {}",
                    manifest.id,
                    first.map_or_else(String::new, |s| s.to_string()),
                    base_time.map_or_else(
                        || "does not say when it was taken".to_string(),
                        |taken| format!("was taken later ({taken})")
                    )
                )));
            }
            let file = std::fs::File::options()
                .write(true)
                .open(&path)
                .with_context(|| format!("opening {}", path.display()))?;
            file.set_len(at)
                .and_then(|()| file.sync_all())
                .with_context(|| format!("cutting {} at byte {at}", path.display()))?;
            cut.cut_file = Some(file_name_of(&path));
        }
    }
    if until.is_some() && !annotated {
        return Ok(Err(format!(
            "the AOF set of redis backup {} has no #TS annotations (Redis' \
             aof-timestamp-enabled was off)",
            manifest.id
        )));
    }
    let text: String = aof
        .manifest
        .lines()
        .filter(|line| {
            !cut.dropped
                .iter()
                .any(|name| line.split_whitespace().nth(1) == Some(name.as_str()))
        })
        .map(|line| format!("{line}\n"))
        .collect();
    let manifest_path = building.path.join(&aof.manifest_name);
    tokio::fs::write(
        &manifest_path,
        if until.is_some() {
            &text
        } else {
            &aof.manifest
        },
    )
    .await
    .with_context(|| format!("writing {}", manifest_path.display()))?;
    tokio::fs::rename(&building.path, &target)
        .await
        .with_context(|| {
            format!(
                "renaming {} to {}",
                building.path.display(),
                target.display()
            )
        })?;
    building.keep = true;
    Ok(Ok(cut))
}

fn file_name_of(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Removes a half-built restore directory when the restore fails or is interrupted.
struct TempDir {
    path: PathBuf,
    keep: bool,
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}
