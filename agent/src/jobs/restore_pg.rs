//! `restore pg --pgdata DIR [--backup ID]`: a base backup into an empty directory, set up to
//! recover from the WAL archive through `gc-backup wal-fetch` when PostgreSQL starts on it.
//!
//! Recovery targets, timeline checks and `--start` come with point-in-time restore; this is the
//! part they build on: every tar stream downloaded with its SHA-256 checked and unpacked,
//! `backup_label`/`tablespace_map` written from the manifest, `restore_command` and
//! `recovery_target_timeline = 'latest'` set, `recovery.signal` created.

use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::Context;

use super::{catalog_error, pipeline_error};
use crate::catalog::manifest::{Manifest, SourceFacts};
use crate::catalog::{self, Kind, Selector};
use crate::error::Failure;
use crate::pipeline::{self, Sink};
use crate::store::Store;

#[derive(Debug, Clone)]
pub struct RestorePgRequest {
    pub pgdata: PathBuf,
    pub backup: Selector,
    /// The config file wal-fetch should read (it runs in PostgreSQL's environment).
    pub config_file: Option<PathBuf>,
}

pub async fn restore(store: &Store, request: &RestorePgRequest) -> anyhow::Result<Manifest> {
    let manifest = catalog::find(store, Kind::PgBase, &request.backup)
        .await
        .map_err(catalog_error)?;
    let SourceFacts::PgBase(facts) = &manifest.source else {
        anyhow::bail!("backup {} is not a pg-base backup", manifest.id);
    };
    let dir = &request.pgdata;
    let created = prepare_dir(dir)?;
    tracing::info!(kind = "pg-base", id = %manifest.id, pgdata = %dir.display(), "restore started");
    let result = async {
        for object in &manifest.objects {
            unpack(store, object, dir).await?;
        }
        let exe = std::env::current_exe().context("locating this gc-backup binary")?;
        let config_file = request.config_file.clone();
        let label = facts.backup_label.clone();
        let map = facts.tablespace_map.clone();
        let dir = dir.clone();
        tokio::task::spawn_blocking(move || {
            write_recovery_files(&dir, &label, map.as_deref(), &exe, config_file.as_deref())
        })
        .await
        .context("worker failed")?
    }
    .await;
    if let Err(error) = result {
        // Leave DIR as empty as it was (or gone, if we made it): never a half-restored cluster.
        let _ = clear(dir, created);
        return Err(error.context(format!("restore of pg-base backup {} failed", manifest.id)));
    }
    Ok(manifest)
}

/// DIR must be absent or empty. Returns whether it was created.
fn prepare_dir(dir: &Path) -> anyhow::Result<bool> {
    match std::fs::read_dir(dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(Failure::Config(format!(
                    "{} is not empty; restore writes only into an empty directory",
                    dir.display()
                ))
                .into());
            }
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .with_context(|| format!("setting the mode of {}", dir.display()))?;
            Ok(false)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .with_context(|| format!("setting the mode of {}", dir.display()))?;
            Ok(true)
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", dir.display())),
    }
}

fn clear(dir: &Path, created: bool) -> std::io::Result<()> {
    if created {
        return std::fs::remove_dir_all(dir);
    }
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            std::fs::remove_dir_all(&path)?;
        } else {
            std::fs::remove_file(&path)?;
        }
    }
    Ok(())
}

/// Streams one tar object through its check into a tar reader on another thread.
async fn unpack(store: &Store, object: &catalog::StoredObject, dir: &Path) -> anyhow::Result<()> {
    let (reader, writer) = std::io::pipe().context("creating a pipe")?;
    let target = dir.to_path_buf();
    let unpacker = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        let mut archive = tar::Archive::new(reader);
        archive.set_preserve_permissions(true);
        archive.set_overwrite(false);
        archive.unpack(&target)
    });
    let sink: Sink = Box::new(writer);
    let downloaded = pipeline::download(store, object, sink).await.map(drop);
    let unpacked = unpacker.await.context("unpack worker failed")?;
    downloaded.map_err(pipeline_error)?;
    unpacked.with_context(|| format!("unpacking {} into {}", object.key, dir.display()))
}

fn write_recovery_files(
    dir: &Path,
    label: &str,
    tablespace_map: Option<&str>,
    exe: &Path,
    config_file: Option<&Path>,
) -> anyhow::Result<()> {
    let write = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
    };
    write("backup_label", label)?;
    if let Some(map) = tablespace_map {
        write("tablespace_map", map)?;
    }
    let env = config_file.map_or(String::new(), |f| {
        format!("GC_BACKUP_CONFIG={} ", shell_quote(f))
    });
    let restore_command = format!("{env}{} wal-fetch %f %p", shell_quote(exe));
    let settings = format!(
        "\n# Written by gc-backup restore pg\nrestore_command = '{}'\nrecovery_target_timeline = 'latest'\n",
        restore_command.replace('\'', "''")
    );
    let auto_conf = dir.join("postgresql.auto.conf");
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&auto_conf)
        .and_then(|mut f| f.write_all(settings.as_bytes()))
        .with_context(|| format!("writing {}", auto_conf.display()))?;
    write("recovery.signal", "")?;
    // PostgreSQL runs as the directory's owner; the files we wrote must be theirs.
    let owner = std::fs::metadata(dir).with_context(|| format!("reading {}", dir.display()))?;
    chown_tree(dir, owner.uid(), owner.gid())
}

fn shell_quote(path: &Path) -> String {
    let text = path.display().to_string();
    if text
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"/._-".contains(&b))
    {
        text
    } else {
        format!("\"{}\"", text.replace('"', "\\\""))
    }
}

fn chown_tree(dir: &Path, uid: u32, gid: u32) -> anyhow::Result<()> {
    if std::fs::metadata(dir)?.uid() == uid && !running_as_root() {
        return Ok(());
    }
    let mut pending = vec![dir.to_path_buf()];
    while let Some(path) = pending.pop() {
        std::os::unix::fs::lchown(&path, Some(uid), Some(gid))
            .with_context(|| format!("changing the owner of {}", path.display()))?;
        if path.is_dir() && !path.is_symlink() {
            for entry in std::fs::read_dir(&path)? {
                pending.push(entry?.path());
            }
        }
    }
    Ok(())
}

fn running_as_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}
