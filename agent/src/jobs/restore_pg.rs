//! `restore pg --pgdata DIR [target] [--backup ID] [--start]`: point-in-time restore.
//!
//! Everything that can be checked is checked before DIR is touched: DIR is empty, the base
//! backup for the target exists, the WAL chain from it to the target is complete in the
//! archive across timeline switches, and (with `--start`) the server binaries of the backup's
//! major version are installed. Then the tar streams are downloaded in parallel, each frame
//! checked against its XXH64 and each file against the manifest's size and CRC-32C while it
//! is unpacked. An incremental backup is restored as its chain, newest backup first
//! (`base_chain`): each writes only the blocks no newer one wrote, the full last, and every
//! file's CRC-32C, composed from what was written, must be the newest backup's. Then the
//! recovery settings are written:
//! `restore_command` calling this binary's `wal-fetch`, the target, `recovery.signal`.

use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::StreamExt;
use pitr::{PlanError, RecoveryTarget, RestorePlan, TargetAction};
use tokio_util::sync::CancellationToken;

use super::base_chain::{self, Destination};
use crate::catalog::manifest::{BaseFile, Manifest, SourceFacts};
use crate::catalog::{self, Kind, Selector};
use crate::config::Config;
use crate::error::Failure;
use crate::pipeline::{self, Sink};
use crate::sources::postgres::recovery::{self, RecoveryOptions, RecoveryReport};
use crate::store::Store;
use crate::wal::archive;

/// Tar streams unpacked at once.
const PARALLEL_STREAMS: usize = 4;

#[derive(Debug, Clone)]
pub struct RestorePgRequest {
    pub pgdata: PathBuf,
    pub backup: Selector,
    pub target: RecoveryTarget,
    pub action: TargetAction,
    /// `--target-timeline`; none: the newest, unless an older one also reaches the target.
    pub timeline: Option<pitr::TargetTimeline>,
    /// Write `archive_mode = 'off'`: a restore for inspection must never push a timeline of
    /// its own into the archive it came from.
    pub archive_off: bool,
    /// Run the recovery now with a temporary server.
    pub start: Option<StartOptions>,
}

#[derive(Debug, Clone, Default)]
pub struct StartOptions {
    /// Run pg_amcheck on the recovered cluster (the restore drill).
    pub amcheck: bool,
}

#[derive(Debug)]
pub struct RestorePgReport {
    pub manifest: Manifest,
    pub plan: RestorePlan,
    pub raw_bytes: u64,
    /// Download and unpack of the base backup.
    pub restore_elapsed: Duration,
    pub recovery: Option<RecoveryReport>,
}

pub async fn restore(
    config: &Config,
    store: &Store,
    request: &RestorePgRequest,
    cancel: &CancellationToken,
) -> anyhow::Result<RestorePgReport> {
    let dir = &request.pgdata;
    let existed = check_empty(dir)?;
    if request.start.is_some() && existed && crate::host::running_as_root() {
        recovery::server_owner(dir)?;
    }
    if request.start.is_some() && !existed && crate::host::running_as_root() {
        return Err(Failure::Config(format!(
            "{} does not exist; with --start as root, create it owned by the database user \
             first (install -d -o postgres -m 700 {}) so that PostgreSQL can run as that user",
            dir.display(),
            dir.display()
        ))
        .into());
    }
    let (chain, plan) = choose(store, &request.backup, &request.target, request.timeline).await?;
    for link in &chain {
        super::can_open(store, link)?;
    }
    check_objects_exist(store, &chain).await?;
    let Some(manifest) = chain.last().cloned() else {
        return Err(anyhow::anyhow!("an empty chain of backups"));
    };
    let (_, facts) = archive::base_backup(&manifest)?;
    let bin_dir = match &request.start {
        Some(_) => Some(recovery::server_bin_dir(
            config.postgres.bin_dir.as_deref(),
            facts.server_version_num / 10000,
        )?),
        None => None,
    };
    tracing::info!(
        kind = "pg-base",
        id = %manifest.id,
        timeline = plan.timeline,
        first_wal = %plan.first_wal,
        last_wal = %plan.last_wal,
        segments = plan.segments,
        target = %request.target,
        chain = chain.len(),
        "restore planned; WAL chain complete"
    );

    let started = Instant::now();
    let created = create_dir(dir, existed)?;
    let unpacked = async {
        unpack_chain(store, &chain, dir, cancel).await?;
        let settings = RecoverySettings {
            label: facts.backup_label.clone(),
            tablespace_map: facts.tablespace_map.clone(),
            exe: std::env::current_exe().context("locating this gc-backup binary")?,
            // wal-fetch runs in PostgreSQL's environment, not ours: it needs the config file
            // and a --store given on our command line.
            restore_env: config.child_env(),
            prefetch_from: config.wal_prefetch.then(|| store.name().to_string()),
            target: pitr::target::recovery_settings(
                &request.target,
                request.action,
                request.timeline.unwrap_or_default(),
            )
            .into_iter()
            .chain(
                request
                    .archive_off
                    .then(|| ("archive_mode".into(), "off".into())),
            )
            .collect(),
        };
        let dir = dir.clone();
        tokio::task::spawn_blocking(move || settings.write(&dir))
            .await
            .context("worker failed")?
    }
    .await;
    if let Err(error) = unpacked {
        // Leave DIR as empty as it was (or gone, if we made it): never a half-restored cluster.
        let _ = clear(dir, created);
        return Err(error.context(format!("restore of pg-base backup {} failed", manifest.id)));
    }
    let restore_elapsed = started.elapsed();
    let raw_bytes = manifest.objects.iter().map(|o| o.raw_bytes).sum();

    let recovery = match (&request.start, bin_dir) {
        (Some(start), Some(bin_dir)) => {
            crate::wal::prefetch::start_before(dir, &plan.first_wal, store, config);
            let options = RecoveryOptions {
                bin_dir,
                target: request.target.clone(),
                action: request.action,
                amcheck_as: start.amcheck.then(|| amcheck_role(config, dir)),
                major: facts.server_version_num / 10000,
                // The cluster's size (an incremental's own objects are only its changes).
                data_bytes: facts.files.iter().map(|f| f.size).sum(),
            };
            let recovered = recovery::run(dir, &options, cancel).await;
            // The server has stopped: the prefetcher's spool in pg_wal has nothing to serve.
            crate::wal::prefetch::stop_in(&dir.join("pg_wal"));
            Some(recovered.with_context(|| {
                format!(
                    "recovery of pg-base backup {} in {} failed",
                    manifest.id,
                    dir.display()
                )
            })?)
        }
        _ => None,
    };
    Ok(RestorePgReport {
        manifest,
        plan,
        raw_bytes,
        restore_elapsed,
        recovery,
    })
}

/// The base backup for `target` with the chain it restores from (oldest first, itself last),
/// and the checked plan, from the catalog and the archive.
pub async fn choose(
    store: &Store,
    selector: &Selector,
    target: &RecoveryTarget,
    timeline: Option<pitr::TargetTimeline>,
) -> anyhow::Result<(Vec<Manifest>, RestorePlan)> {
    let (mut manifests, unreadable) = catalog::list(store, Some(Kind::PgBase)).await?;
    for problem in &unreadable {
        tracing::warn!("{problem}");
    }
    let chosen = match selector {
        Selector::Latest => None,
        Selector::Id(id) => Some(manifests.iter().position(|m| &m.id == id).ok_or_else(|| {
            Failure::NotFound(format!("no pg-base backup {id} in {}", store.name()))
        })?),
    };
    let mut bases = Vec::with_capacity(manifests.len());
    let mut segment_size = pitr::DEFAULT_SEGMENT_SIZE;
    for manifest in &manifests {
        let (base, facts) = archive::base_backup(manifest)?;
        segment_size = facts.wal_segment_size;
        bases.push(base);
    }
    let wal = archive::load(store, segment_size).await?;
    let planned = point_position(store, target).await?;
    let plan = pitr::plan::plan_on(
        &bases,
        &wal,
        planned.as_ref().unwrap_or(target),
        chosen,
        timeline,
    )
    .map_err(plan_error)?;
    let chain = catalog::chain(store, &manifests, &manifests[plan.backup])?
        .into_iter()
        .cloned()
        .collect();
    manifests.clear();
    Ok((chain, plan))
}

/// Where a restore point that `gc-backup mark` made lies, so that the plan can choose the base
/// backup before it and check the WAL up to it (a listing cannot place other restore points).
/// The byte before the record's end: the record itself is in that byte's segment.
async fn point_position(
    store: &Store,
    target: &RecoveryTarget,
) -> anyhow::Result<Option<RecoveryTarget>> {
    let RecoveryTarget::Name(name) = target else {
        return Ok(None);
    };
    let Some(point) = super::mark::find_named(store, name).await?.pop() else {
        return Ok(None);
    };
    let facts = super::mark::facts(&point)?;
    let lsn: pitr::Lsn = facts.postgres.lsn.parse().map_err(|e| {
        Failure::Corrupt(format!(
            "point {} names the LSN {:?}: {e}",
            point.id, facts.postgres.lsn
        ))
    })?;
    Ok(Some(RecoveryTarget::Lsn(pitr::Lsn(
        lsn.0.saturating_sub(1),
    ))))
}

/// One of several store operations run concurrently, boxed as a Send future while its
/// lifetimes are concrete.
type Look<'a, T> = std::pin::Pin<Box<dyn Future<Output = anyhow::Result<T>> + Send + 'a>>;

/// Every object of every backup of the chain is in the store, before anything is written: a
/// parent's stream deleted by hand fails here, in one line, not half-way through the restore.
async fn check_objects_exist(store: &Store, chain: &[Manifest]) -> anyhow::Result<()> {
    // Collected and boxed first: closures that return futures borrowing the chain make the
    // restore's future not provably Send where the sidecar spawns a drill.
    let objects: Vec<(&Manifest, &crate::catalog::StoredObject)> = chain
        .iter()
        .flat_map(|m| m.objects.iter().map(move |o| (m, o)))
        .collect();
    let looks: Vec<Look<'_, ()>> = objects
        .into_iter()
        .map(|(manifest, object)| {
            Box::pin(object_exists(store, chain, manifest, object)) as Look<'_, ()>
        })
        .collect();
    let looks = futures::stream::iter(looks)
        .buffer_unordered(8)
        .collect::<Vec<anyhow::Result<()>>>()
        .await;
    looks.into_iter().collect()
}

async fn object_exists(
    store: &Store,
    chain: &[Manifest],
    manifest: &Manifest,
    object: &crate::catalog::StoredObject,
) -> anyhow::Result<()> {
    let key = crate::store::ObjectKey::from(object.key.as_str());
    match store.head(&key).await {
        Ok(_) => Ok(()),
        Err(crate::store::StoreError::NotFound { .. }) => Err(Failure::Corrupt(format!(
            "{} of pg-base backup {} is not in {}: {}",
            object.key,
            manifest.id,
            store.name(),
            if Some(manifest) == chain.last() {
                "the backup cannot be restored".to_string()
            } else {
                format!(
                    "{} is an incremental on top of it and cannot be restored",
                    chain.last().map(|m| m.id.to_string()).unwrap_or_default()
                )
            }
        ))
        .into()),
        Err(error) => Err(anyhow::Error::new(error)),
    }
}

/// Refusals of the request are usage errors (exit 2); a broken archive is a failure (exit 3).
fn plan_error(error: PlanError) -> anyhow::Error {
    match error {
        PlanError::NoBackup => Failure::NotFound(error.to_string()).into(),
        PlanError::TargetBeforeBackups { .. }
        | PlanError::TargetBeforeBackup { .. }
        | PlanError::TargetAfterArchive { .. }
        | PlanError::NotOnPath { .. }
        | PlanError::AmbiguousTimeline { .. }
        | PlanError::OnOlderTimeline { .. } => Failure::Config(error.to_string()).into(),
        PlanError::MissingHistory(_) | PlanError::Gap { .. } | PlanError::Unfinished { .. } => {
            anyhow::Error::new(error)
        }
    }
}

/// The role pg_amcheck connects as: the configured user, else the owner's name (initdb's default
/// superuser).
fn amcheck_role(config: &Config, dir: &Path) -> String {
    config.postgres.user.clone().unwrap_or_else(|| {
        std::fs::metadata(dir)
            .ok()
            .and_then(|m| nix::unistd::User::from_uid(m.uid().into()).ok().flatten())
            .map_or_else(|| "postgres".into(), |user| user.name)
    })
}

/// DIR must be absent or empty. Returns whether it exists.
pub(super) fn check_empty(dir: &Path) -> anyhow::Result<bool> {
    match std::fs::read_dir(dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(Failure::Config(format!(
                    "{} is not empty; restore writes only into an empty directory",
                    dir.display()
                ))
                .into());
            }
            Ok(true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e).with_context(|| format!("reading {}", dir.display())),
    }
}

/// Creates DIR if needed, with the mode PostgreSQL demands. Returns whether it was created.
fn create_dir(dir: &Path, existed: bool) -> anyhow::Result<bool> {
    if !existed {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("setting the mode of {}", dir.display()))?;
    Ok(!existed)
}

pub(super) fn clear(dir: &Path, created: bool) -> std::io::Result<()> {
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

/// Restores a chain into DIR newest backup first (`base_chain`): each backup writes what no
/// newer one wrote, the full last; then what only the whole chain can say (directories and
/// files the newest backup does not have, files checked by reading them back).
async fn unpack_chain(
    store: &Store,
    chain: &[Manifest],
    dir: &Path,
    cancel: &CancellationToken,
) -> anyhow::Result<()> {
    let Some(newest) = chain.last() else {
        return Ok(());
    };
    let SourceFacts::PgBase(facts) = &newest.source else {
        return Err(anyhow::anyhow!("{} is not a base backup", newest.id));
    };
    if chain.len() < 2 {
        unpack_all(store, newest, Destination::Dir(dir), cancel).await?;
        return Ok(());
    }
    let rebuild = std::sync::Arc::new(base_chain::Rebuild::new(
        dir,
        &facts.files,
        facts.block_size,
        base_chain::BLOCK_CRC_BUDGET,
    ));
    let mut dirs = None;
    for (depth, manifest) in chain.iter().enumerate().rev() {
        let started = Instant::now();
        let named = unpack_all(store, manifest, Destination::Chain(&rebuild), cancel).await?;
        dirs.get_or_insert(named);
        tracing::info!(
            id = %manifest.id,
            depth,
            raw_bytes = manifest.raw_bytes,
            elapsed_ms = started.elapsed().as_millis(),
            "chain link restored"
        );
    }
    let started = Instant::now();
    let newest_files = facts.files.clone();
    let dir = dir.to_path_buf();
    let dirs = dirs.unwrap_or_default();
    let finished =
        tokio::task::spawn_blocking(move || finish_chain(&rebuild, &newest_files, &dir, &dirs))
            .await
            .context("worker failed")?;
    tracing::info!(
        elapsed_ms = started.elapsed().as_millis(),
        "directories the newest backup does not have removed"
    );
    finished
}

/// After the full: removes the directories (of files never written) the newest backup does
/// not have, and reads back the files whose CRC-32C could not be composed.
fn finish_chain(
    rebuild: &base_chain::Rebuild,
    newest_files: &[BaseFile],
    dir: &Path,
    dirs: &[String],
) -> anyhow::Result<()> {
    use std::collections::HashSet;
    let read_back: HashSet<String> = rebuild.finish()?.into_iter().collect();
    let keep: HashSet<&str> = newest_files.iter().map(|f| f.path.as_str()).collect();
    let keep_dirs: HashSet<&str> = dirs.iter().map(String::as_str).collect();
    remove_unlisted(dir, dir, &keep, &keep_dirs)?;
    let rebuilt: Vec<&BaseFile> = newest_files
        .iter()
        .filter(|f| read_back.contains(&f.path))
        .collect();
    if !rebuilt.is_empty() {
        tracing::info!(
            files = rebuilt.len(),
            "reading back the files past the memory for composing their CRC-32C"
        );
    }
    // Read back on a few threads: they are the largest files of a busy cluster.
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..PARALLEL_STREAMS)
            .map(|_| {
                scope.spawn(|| -> anyhow::Result<()> {
                    loop {
                        let index = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(file) = rebuilt.get(index) else {
                            return Ok(());
                        };
                        super::base_delta::check_rebuilt(dir, file)?;
                    }
                })
            })
            .collect();
        workers.into_iter().try_for_each(|w| {
            w.join()
                .unwrap_or_else(|_| Err(anyhow::anyhow!("a check thread panicked")))
        })
    })
}

/// Removes files and directories under `at` that the newest backup does not list.
fn remove_unlisted(
    root: &Path,
    at: &Path,
    files: &std::collections::HashSet<&str>,
    dirs: &std::collections::HashSet<&str>,
) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(at).with_context(|| format!("reading {}", at.display()))? {
        let entry = entry.with_context(|| format!("reading {}", at.display()))?;
        let path = entry.path();
        let relative = path
            .strip_prefix(root)
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        let kind = entry
            .file_type()
            .with_context(|| format!("reading {}", path.display()))?;
        if kind.is_dir() {
            if dirs.contains(relative.as_str()) {
                remove_unlisted(root, &path, files, dirs)?;
            } else {
                std::fs::remove_dir_all(&path)
                    .with_context(|| format!("removing {}", path.display()))?;
            }
        } else if !files.contains(relative.as_str()) {
            std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        }
    }
    Ok(())
}

/// Unpacks every stream of one backup (tars of a full, delta streams of an incremental),
/// [`PARALLEL_STREAMS`] at a time, and returns the directories an incremental's streams name.
/// The first failure (or SIGTERM) stops the others, and this returns only once every
/// unpacking thread has finished, so that the caller can empty DIR without a thread still
/// writing into it.
async fn unpack_all(
    store: &Store,
    manifest: &Manifest,
    destination: Destination<'_>,
    cancel: &CancellationToken,
) -> anyhow::Result<Vec<String>> {
    let abort = cancel.child_token();
    let delta = match &manifest.source {
        crate::catalog::manifest::SourceFacts::PgBase(facts) => facts.is_incremental(),
        _ => false,
    };
    // Boxed before they are streamed (see `Look`): a stream that maps with a closure
    // returning futures is not provably Send where the sidecar spawns a drill.
    let unpacks: Vec<Look<'_, Vec<String>>> = manifest
        .objects
        .iter()
        .enumerate()
        .map(|(stream, object)| {
            let abort = abort.clone();
            let files = super::base_tar::files_of_stream(manifest, stream).unwrap_or_default();
            Box::pin(async move {
                let result = unpack(store, object, files, delta, destination, &abort).await;
                if result.is_err() {
                    abort.cancel();
                }
                result
            }) as Look<'_, Vec<String>>
        })
        .collect();
    let results: Vec<anyhow::Result<Vec<String>>> = futures::stream::iter(unpacks)
        .buffer_unordered(PARALLEL_STREAMS)
        .collect()
        .await;
    if cancel.is_cancelled() {
        return Err(Failure::Interrupted("restore interrupted".into()).into());
    }
    // The stream that failed first says why; the others only stopped because of it.
    let mut dirs = Vec::new();
    let mut errors = Vec::new();
    for result in results {
        match result {
            Ok(named) => dirs.extend(named),
            Err(error) => errors.push(error),
        }
    }
    let (stopped, failed): (Vec<_>, Vec<_>) = errors
        .into_iter()
        .partition(|e| e.downcast_ref::<Stopped>().is_some());
    if let Some(error) = failed.into_iter().chain(stopped).next() {
        return Err(error);
    }
    Ok(dirs)
}

/// A [`Destination`] a blocking thread can take with it.
#[derive(Debug)]
enum Owned {
    Nowhere,
    Dir(PathBuf),
    Chain(std::sync::Arc<base_chain::Rebuild>),
}

/// A stream stopped because another one failed.
#[derive(Debug, thiserror::Error)]
#[error("stopped after another stream failed")]
struct Stopped;

/// Streams one tar object through its check into a tar reader on another thread, which checks
/// every file against `files` (the manifest's), and waits for that thread whatever happens.
async fn unpack(
    store: &Store,
    object: &catalog::StoredObject,
    files: Vec<BaseFile>,
    delta: bool,
    destination: Destination<'_>,
    abort: &CancellationToken,
) -> anyhow::Result<Vec<String>> {
    if abort.is_cancelled() {
        return Err(Stopped.into());
    }
    let (reader, writer) = super::pipe()?;
    let key = object.key.clone();
    // The blocking thread needs what it writes into to own or share.
    let owned = match destination {
        Destination::Nowhere => Owned::Nowhere,
        Destination::Dir(dir) => Owned::Dir(dir.to_path_buf()),
        Destination::Chain(rebuild) => Owned::Chain(rebuild.clone()),
    };
    let dir = match destination {
        Destination::Dir(dir) => dir.to_path_buf(),
        Destination::Chain(rebuild) => rebuild.dir().to_path_buf(),
        Destination::Nowhere => PathBuf::new(),
    };
    let unpacker = tokio::task::spawn_blocking(move || {
        let destination = match &owned {
            Owned::Nowhere => Destination::Nowhere,
            Owned::Dir(dir) => Destination::Dir(dir),
            Owned::Chain(rebuild) => Destination::Chain(rebuild),
        };
        match delta {
            true => super::base_delta::read_checked(reader, &files, destination, &key)
                .map(|applied| applied.dirs),
            false => super::base_tar::read_checked(reader, &files, destination, &key)
                .map(|()| Vec::new()),
        }
    });
    let sink: Sink = Box::new(writer);
    // Dropping the download closes the pipe's writer, which ends the tar reader.
    let expected = super::expected(object);
    let downloaded = tokio::select! {
        result = pipeline::download(store, &expected, sink) => result.map(drop).map_err(anyhow::Error::from),
        () = abort.cancelled() => Err(Stopped.into()),
    };
    let unpacked = unpacker.await.context("unpack worker failed")?;
    // The unpacker reads the stream to its end even after a bad file, so a download error is
    // the download's own (and the cause of any tar error after it).
    downloaded?;
    unpacked.with_context(|| format!("unpacking {} into {}", object.key, dir.display()))
}

/// What goes into the restored directory besides the backup's files.
struct RecoverySettings {
    label: String,
    tablespace_map: Option<String>,
    exe: PathBuf,
    restore_env: Vec<(String, String)>,
    /// The store's name ([`Store::name`]) when wal-fetch prefetches: restore_command then
    /// takes spooled segments in the shell first.
    prefetch_from: Option<String>,
    target: Vec<(String, String)>,
}

impl RecoverySettings {
    fn write(&self, dir: &Path) -> anyhow::Result<()> {
        let write = |name: &str, text: &str| {
            let path = dir.join(name);
            std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
        };
        write("backup_label", &self.label)?;
        if let Some(map) = &self.tablespace_map {
            write("tablespace_map", map)?;
        }
        if !dir.join("postgresql.conf").exists() {
            // The cluster kept its configuration outside PGDATA (Debian's /etc/postgresql).
            tracing::warn!(
                "the backup has no postgresql.conf (the cluster's configuration lived outside \
                 its data directory); wrote an empty one, bring your own before production use"
            );
            write(
                "postgresql.conf",
                "# Written by gc-backup restore pg: the backup had none.\n",
            )?;
        }
        let env: String = self
            .restore_env
            .iter()
            .map(|(name, value)| format!("{name}={} ", shell_quote(value)))
            .collect();
        let exe = shell_quote(&self.exe.display().to_string());
        // The spool as wal-fetch will find it, relative to the data directory (PostgreSQL's
        // working directory): the same function names it for both.
        let take = self.prefetch_from.as_deref().and_then(|store| {
            let spool = crate::wal::prefetch::spool_dir(&dir.join("pg_wal/RECOVERYXLOG"), store);
            crate::wal::prefetch::shell_take(spool.strip_prefix(dir).ok()?)
        });
        let restore_command = format!("{}{env}{exe} wal-fetch %f %p", take.unwrap_or_default());
        // Once recovery ends, the prefetcher's spool in pg_wal has nothing left to serve.
        let recovery_end_command = format!("{exe} wal-prefetch-stop");
        let mut lines = String::from("\n# Written by gc-backup restore pg\n");
        let settings = [
            ("restore_command".to_string(), restore_command),
            ("recovery_end_command".to_string(), recovery_end_command),
        ]
        .into_iter()
        .chain(self.target.iter().cloned());
        for (name, value) in settings {
            lines.push_str(&format!("{name} = '{}'\n", value.replace('\'', "''")));
        }
        let auto_conf = dir.join("postgresql.auto.conf");
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&auto_conf)
            .and_then(|mut f| f.write_all(lines.as_bytes()))
            .with_context(|| format!("writing {}", auto_conf.display()))?;
        write("recovery.signal", "")?;
        // PostgreSQL runs as the directory's owner; the files we wrote must be theirs.
        let owner = std::fs::metadata(dir).with_context(|| format!("reading {}", dir.display()))?;
        chown_tree(dir, owner.uid(), owner.gid())
    }
}

fn shell_quote(text: &str) -> String {
    if text
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"/._-".contains(&b))
    {
        text.to_string()
    } else {
        format!("'{}'", text.replace('\'', "'\\''"))
    }
}

fn chown_tree(dir: &Path, uid: u32, gid: u32) -> anyhow::Result<()> {
    if !crate::host::running_as_root() {
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
