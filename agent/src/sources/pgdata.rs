//! The files of a running cluster's data directory, as tar streams for a base backup.
//!
//! [`walk`] lists what a base backup must hold (PostgreSQL's documented exclusions applied);
//! a [`FileQueue`] hands its files to a few tar streams, so that several compressors run at
//! once; [`write_tar`] writes one stream on a blocking thread. Files change
//! while they are copied — that is what the WAL replayed on restore repairs — so a file that
//! shrank is padded with zeros to the size its header announced, and one that vanished is
//! left out, as pg_basebackup does.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use super::blocks::{self, BlockError, BlockHash, DeltaWriter, FileMap, MapReader};

/// Directories whose contents are never copied (the directory itself is kept, empty).
const EMPTY_DIRS: &[&str] = &[
    "pg_wal",
    "pg_dynshmem",
    "pg_notify",
    "pg_replslot",
    "pg_serial",
    "pg_snapshots",
    "pg_stat_tmp",
    "pg_subtrans",
];

/// Files in the top directory that are never copied.
const SKIP_TOP_FILES: &[&str] = &[
    "postmaster.pid",
    "postmaster.opts",
    "backup_label",
    "backup_label.old",
    "tablespace_map",
    "tablespace_map.old",
    "recovery.signal",
    "standby.signal",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    Dir,
    File,
}

/// One entry of PGDATA, as found by [`walk`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Relative to PGDATA, with `/` separators.
    pub path: String,
    pub kind: EntryKind,
    pub size: u64,
    pub mode: u32,
    pub mtime: u64,
}

/// What was copied of one file. Not a stored format: the job turns it into the catalog's
/// `BaseFile` for the manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopiedFile {
    pub path: String,
    /// Bytes in the tar (the size when the copy started).
    pub size: u64,
    /// CRC-32C of those bytes, as PostgreSQL's own backup manifests use.
    pub crc32c: u32,
    /// Which tar stream holds it.
    pub stream: u32,
    /// The file shrank while being copied and was padded with zeros (WAL replay repairs it).
    pub padded: bool,
    /// Incremental backups: what of the file the delta stream holds. `None` in a full's tar.
    pub delta: Option<Delta>,
}

/// What an incremental backup stored of one file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delta {
    /// Same size and every block the same as in the parent: nothing stored.
    Unchanged,
    /// Its size and the blocks that differ from the parent's.
    Changed { blocks: u64 },
    /// All of it (not in the parent, or not a relation file).
    Whole,
}

/// Where the tar and delta writers send the block map of every relation file they read.
pub type MapSink = std::sync::mpsc::SyncSender<FileMap>;

/// How the writers read relation files: in chunks of this many blocks.
const CHUNK_BLOCKS: usize = 128;

#[derive(Debug, thiserror::Error)]
pub enum PgDataError {
    #[error("{0}")]
    Unsupported(String),
    #[error("reading {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the parent's block map: {0}")]
    ParentMap(BlockError),
    /// The block map's uploader went away (its upload failed, which it reports itself).
    #[error("the block map's upload stopped")]
    MapGone,
}

fn io_error(path: &Path, source: std::io::Error) -> PgDataError {
    PgDataError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// True for entries a base backup leaves out, by their path relative to PGDATA.
fn excluded(relative: &str, is_dir: bool) -> bool {
    let name = relative.rsplit('/').next().unwrap_or(relative);
    if name.starts_with("pgsql_tmp") || name == "pg_internal.init" {
        return true;
    }
    if !relative.contains('/') && !is_dir && SKIP_TOP_FILES.contains(&relative) {
        return true;
    }
    // The contents (not the directory) of the transient directories.
    EMPTY_DIRS.iter().any(|dir| {
        relative.strip_prefix(dir).is_some_and(|rest| {
            rest.starts_with('/') && !(*dir == "pg_wal" && rest == "/archive_status")
        })
    })
}

/// Lists PGDATA: directories first, then files, each with the size and mode seen now.
pub fn walk(pgdata: &Path) -> Result<Vec<Entry>, PgDataError> {
    let mut entries = Vec::new();
    let mut pending = vec![PathBuf::new()];
    while let Some(relative_dir) = pending.pop() {
        let dir = pgdata.join(&relative_dir);
        let listing = match std::fs::read_dir(&dir) {
            Ok(listing) => listing,
            // Dropped while we walked (a database, a temp dir): nothing to copy.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_error(&dir, e)),
        };
        for item in listing {
            let item = item.map_err(|e| io_error(&dir, e))?;
            let relative_path = relative_dir.join(item.file_name());
            let relative = relative_path.to_string_lossy().replace('\\', "/");
            let metadata = match std::fs::metadata(item.path()) {
                Ok(metadata) => metadata,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_error(&item.path(), e)),
            };
            if relative.starts_with("pg_tblspc/") {
                return Err(PgDataError::Unsupported(format!(
                    "the cluster has a tablespace ({relative}); base backups of tablespaces \
                     outside PGDATA are not supported yet"
                )));
            }
            let is_dir = metadata.is_dir();
            if excluded(&relative, is_dir) {
                continue;
            }
            use std::os::unix::fs::MetadataExt;
            entries.push(Entry {
                path: relative.clone(),
                kind: if is_dir {
                    EntryKind::Dir
                } else {
                    EntryKind::File
                },
                size: if is_dir { 0 } else { metadata.len() },
                mode: metadata.mode() & 0o7777,
                mtime: u64::try_from(metadata.mtime()).unwrap_or(0),
            });
            if is_dir {
                pending.push(relative_path);
            }
        }
    }
    entries.sort_by(|a, b| {
        (a.kind != EntryKind::Dir, &a.path).cmp(&(b.kind != EntryKind::Dir, &b.path))
    });
    Ok(entries)
}

/// The files of a backup, handed to the tar streams one at a time, largest first.
///
/// A fixed split by size left one core idle for a third of a backup: a table of repetitive
/// rows compresses several times faster than one of random bytes, so equal bytes are not
/// equal work. Taking the next file when the last one is written ends every stream at about
/// the same time, and largest-first keeps the last files small.
#[derive(Debug)]
pub struct FileQueue {
    files: std::sync::Mutex<std::vec::IntoIter<Entry>>,
}

impl FileQueue {
    pub fn new(mut files: Vec<Entry>) -> Self {
        files.sort_by(|a, b| b.size.cmp(&a.size).then_with(|| a.path.cmp(&b.path)));
        Self {
            files: std::sync::Mutex::new(files.into_iter()),
        }
    }

    fn next(&self) -> Option<Entry> {
        // A poisoned lock means another tar writer panicked; that stream fails the backup.
        self.files.lock().ok()?.next()
    }
}

/// Directories (written first, by stream 0, which is restored first) and files (shared).
pub fn partition(entries: Vec<Entry>) -> (Vec<Entry>, FileQueue) {
    let (dirs, files): (Vec<Entry>, Vec<Entry>) =
        entries.into_iter().partition(|e| e.kind == EntryKind::Dir);
    (dirs, FileQueue::new(files))
}

/// Writes `dirs`, then files taken from `files` until it is empty, as one tar stream into
/// `out`. Blocking.
///
/// With `maps`, every relation file's blocks are hashed on the way and its map sent there.
pub fn write_tar(
    pgdata: &Path,
    dirs: &[Entry],
    files: &FileQueue,
    stream: u32,
    out: impl Write,
    maps: Option<(&MapSink, u32)>,
) -> Result<Vec<CopiedFile>, PgDataError> {
    let mut builder = tar::Builder::new(out);
    let mut copied = Vec::new();
    let tar_error = |path: &str, e: std::io::Error| PgDataError::Io {
        path: path.to_string(),
        source: e,
    };
    for entry in dirs
        .iter()
        .cloned()
        .chain(std::iter::from_fn(|| files.next()))
    {
        let entry = &entry;
        let mut header = tar::Header::new_gnu();
        header.set_mode(entry.mode);
        header.set_mtime(entry.mtime);
        header.set_uid(0);
        header.set_gid(0);
        match entry.kind {
            EntryKind::Dir => {
                header.set_entry_type(tar::EntryType::Directory);
                header.set_size(0);
                builder
                    .append_data(&mut header, &entry.path, std::io::empty())
                    .map_err(|e| tar_error(&entry.path, e))?;
            }
            EntryKind::File => {
                let path = pgdata.join(&entry.path);
                let file = match std::fs::File::open(&path) {
                    Ok(file) => file,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(io_error(&path, e)),
                };
                header.set_entry_type(tar::EntryType::Regular);
                header.set_size(entry.size);
                let hasher = maps
                    .filter(|_| blocks::is_relation_file(&entry.path))
                    .map(|(_, block_size)| BlockHasher::new(block_size));
                let mut reader = PaddedReader {
                    inner: file.take(entry.size),
                    remaining: entry.size,
                    crc: 0,
                    padded: false,
                    hasher,
                };
                builder
                    .append_data(&mut header, &entry.path, &mut reader)
                    .map_err(|e| tar_error(&entry.path, e))?;
                forget_cached(&reader.inner.into_inner());
                if let (Some(hasher), Some((sink, _))) = (reader.hasher, maps) {
                    let map = FileMap {
                        path: entry.path.clone(),
                        size: entry.size,
                        hashes: hasher.finish(),
                    };
                    sink.send(map).map_err(|_| PgDataError::MapGone)?;
                }
                copied.push(CopiedFile {
                    path: entry.path.clone(),
                    size: entry.size,
                    crc32c: reader.crc,
                    stream,
                    padded: reader.padded,
                    delta: None,
                });
            }
        }
    }
    builder
        .into_inner()
        .and_then(|mut out| out.flush())
        .map_err(|e| tar_error("end of tar", e))?;
    Ok(copied)
}

/// Exactly `remaining` bytes of a file: zeros after a premature end. Computes CRC-32C, and
/// block hashes with a hasher.
struct PaddedReader<R> {
    inner: R,
    remaining: u64,
    crc: u32,
    padded: bool,
    hasher: Option<BlockHasher>,
}

/// The hash of every block of a byte stream read in pieces of any size.
struct BlockHasher {
    block_size: usize,
    current: blake3::Hasher,
    in_block: usize,
    hashes: Vec<BlockHash>,
}

impl BlockHasher {
    fn new(block_size: u32) -> Self {
        Self {
            block_size: block_size as usize,
            current: blake3::Hasher::new(),
            in_block: 0,
            hashes: Vec::new(),
        }
    }

    fn update(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let take = (self.block_size - self.in_block).min(bytes.len());
            self.current.update(&bytes[..take]);
            self.in_block += take;
            bytes = &bytes[take..];
            if self.in_block == self.block_size {
                self.push();
            }
        }
    }

    fn push(&mut self) {
        let mut hash = [0u8; blocks::HASH_BYTES];
        hash.copy_from_slice(&self.current.finalize().as_bytes()[..blocks::HASH_BYTES]);
        self.hashes.push(hash);
        self.current.reset();
        self.in_block = 0;
    }

    fn finish(mut self) -> Vec<BlockHash> {
        if self.in_block > 0 {
            self.push();
        }
        self.hashes
    }
}

impl<R: Read> Read for PaddedReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.remaining == 0 {
            return Ok(0);
        }
        let want = usize::try_from(self.remaining)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        let mut n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            // The file shrank (truncated by VACUUM, say) after we looked at its size.
            buf[..want].fill(0);
            n = want;
            self.padded = true;
        }
        self.crc = crc32c::crc32c_append(self.crc, &buf[..n]);
        if let Some(hasher) = &mut self.hasher {
            hasher.update(&buf[..n]);
        }
        self.remaining -= n as u64;
        Ok(n)
    }
}

/// One file for an incremental's delta writers, with its map in the parent (if it had it).
pub type Work = (Entry, Option<FileMap>);

/// The files of an incremental backup, in the order of the parent's block map, then the rest
/// largest first: [`dispatch`] feeds it, the delta writers take from it. Bounded, so that the
/// parent's map is read as fast as the files are, not into memory.
#[derive(Debug)]
pub struct WorkQueue {
    receiver: std::sync::Mutex<std::sync::mpsc::Receiver<Work>>,
}

impl WorkQueue {
    pub fn new(receiver: std::sync::mpsc::Receiver<Work>) -> Self {
        Self {
            receiver: std::sync::Mutex::new(receiver),
        }
    }

    fn next(&self) -> Option<Work> {
        self.receiver.lock().ok()?.recv().ok()
    }
}

/// Reads the parent's block map and hands `files` to the delta writers: each file the parent
/// mapped with that map, in the parent's order (its writers balanced that order already), then
/// the files it did not map. Blocking. Returns once every file is handed out, or early when
/// the writers are gone (they failed, and say why). Reads the map to its end whatever
/// happens, so that its download ends by itself and reports its own error, if any.
pub fn dispatch(
    mut parent_map: impl Read,
    block_size: u32,
    files: Vec<Entry>,
    queue: std::sync::mpsc::SyncSender<Work>,
) -> Result<(), PgDataError> {
    let result = dispatch_from(&mut parent_map, block_size, files, queue);
    let _ = std::io::copy(&mut parent_map, &mut std::io::sink());
    result
}

fn dispatch_from(
    parent_map: impl Read,
    block_size: u32,
    files: Vec<Entry>,
    queue: std::sync::mpsc::SyncSender<Work>,
) -> Result<(), PgDataError> {
    let mut by_path: std::collections::HashMap<String, Entry> =
        files.into_iter().map(|f| (f.path.clone(), f)).collect();
    let mut reader = MapReader::new(parent_map).map_err(PgDataError::ParentMap)?;
    if reader.block_size() != block_size {
        return Err(PgDataError::ParentMap(BlockError::Invalid(format!(
            "its block size is {}, the server's {block_size}",
            reader.block_size()
        ))));
    }
    while let Some(map) = reader.next_file().map_err(PgDataError::ParentMap)? {
        if let Some(entry) = by_path.remove(&map.path)
            && queue.send((entry, Some(map))).is_err()
        {
            return Ok(());
        }
    }
    let mut rest: Vec<Entry> = by_path.into_values().collect();
    rest.sort_by(|a, b| b.size.cmp(&a.size).then_with(|| a.path.cmp(&b.path)));
    for entry in rest {
        if queue.send((entry, None)).is_err() {
            return Ok(());
        }
    }
    Ok(())
}

/// Writes `dirs`, then files taken from `work` until it is empty, as one delta stream into
/// `out`: of a relation file the parent mapped, its size and the blocks whose hash differs
/// from the parent's (nothing at all when none differs and the size is the same); of any
/// other file, all of it. Sends every relation file's new map to `maps`. Blocking.
pub fn write_delta(
    pgdata: &Path,
    dirs: &[Entry],
    work: &WorkQueue,
    stream: u32,
    out: impl Write,
    maps: (&MapSink, u32),
) -> Result<Vec<CopiedFile>, PgDataError> {
    let (sink, block_size) = maps;
    let write_error = |path: &str, e: std::io::Error| PgDataError::Io {
        path: path.to_string(),
        source: e,
    };
    let mut writer = DeltaWriter::new(out, block_size).map_err(|e| write_error("the stream", e))?;
    for dir in dirs {
        writer
            .dir(&dir.path, dir.mode, dir.mtime)
            .map_err(|e| write_error(&dir.path, e))?;
    }
    let block = block_size as usize;
    let mut buf = vec![0u8; CHUNK_BLOCKS * block];
    let mut copied = Vec::new();
    while let Some((entry, parent)) = work.next() {
        let path = pgdata.join(&entry.path);
        let mut file = match std::fs::File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_error(&path, e)),
        };
        let relation = blocks::is_relation_file(&entry.path);
        let whole = !relation || parent.is_none();
        let (mut crc, mut padded, mut written, mut stored) = (0u32, false, false, 0u64);
        let mut hashes = Vec::new();
        let mut number = 0u32;
        let mut offset = 0u64;
        while offset < entry.size {
            let want = usize::try_from(entry.size - offset)
                .unwrap_or(usize::MAX)
                .min(buf.len());
            let chunk = &mut buf[..want];
            let got =
                crate::wal::object::read_full(&mut file, chunk).map_err(|e| io_error(&path, e))?;
            if got < want {
                // Shrank while we read it (VACUUM truncated it): zeros, as the tar writer.
                chunk[got..].fill(0);
                padded = true;
            }
            crc = crc32c::crc32c_append(crc, chunk);
            for piece in chunk.chunks(block) {
                let hash = relation.then(|| blocks::hash(piece));
                let same = match (&parent, &hash) {
                    (Some(parent), Some(hash)) if !whole => {
                        parent.hashes.get(number as usize) == Some(hash)
                    }
                    _ => false,
                };
                if !same {
                    if !written {
                        writer
                            .file(&entry.path, entry.size, entry.mode, entry.mtime, whole)
                            .map_err(|e| write_error(&entry.path, e))?;
                        written = true;
                    }
                    writer
                        .block(number, piece)
                        .map_err(|e| write_error(&entry.path, e))?;
                    stored += 1;
                }
                hashes.extend(hash);
                number += 1;
            }
            offset += want as u64;
        }
        let resized = parent.as_ref().is_none_or(|p| p.size != entry.size);
        if !written && (whole || resized) {
            writer
                .file(&entry.path, entry.size, entry.mode, entry.mtime, whole)
                .map_err(|e| write_error(&entry.path, e))?;
            written = true;
        }
        forget_cached(&file);
        if relation {
            let map = FileMap {
                path: entry.path.clone(),
                size: entry.size,
                hashes,
            };
            sink.send(map).map_err(|_| PgDataError::MapGone)?;
        }
        let delta = match (whole, written) {
            (true, _) => Delta::Whole,
            (false, true) => Delta::Changed { blocks: stored },
            (false, false) => Delta::Unchanged,
        };
        copied.push(CopiedFile {
            path: entry.path.clone(),
            size: entry.size,
            crc32c: crc,
            stream,
            padded,
            delta: Some(delta),
        });
    }
    writer
        .finish()
        .map_err(|e| write_error("end of the stream", e))?;
    Ok(copied)
}

/// Drops the file's pages from the page cache once it has been copied. A base backup reads
/// all of PGDATA once; the pages it brought in would otherwise stay cached and be charged to
/// the sidecar's memory cgroup, which can push the container over its limit (CloudNativePG
/// met this). Pages PostgreSQL dirtied are not dropped (DONTNEED leaves dirty pages alone).
fn forget_cached(file: &std::fs::File) {
    let _ = nix::fcntl::posix_fadvise(
        file,
        0,
        0,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
    );
}

/// The system identifier in `global/pg_control` (its first 8 bytes, native order): which
/// cluster this directory is.
pub fn system_identifier(pgdata: &Path) -> Result<u64, PgDataError> {
    let path = pgdata.join("global/pg_control");
    let mut first = [0u8; 8];
    std::fs::File::open(&path)
        .and_then(|mut f| f.read_exact(&mut first))
        .map_err(|e| io_error(&path, e))?;
    Ok(u64::from_ne_bytes(first))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postgresql_s_exclusions_apply() {
        for (path, is_dir) in [
            ("postmaster.pid", false),
            ("backup_label", false),
            ("pg_wal/000000010000000000000001", false),
            (
                "pg_wal/archive_status/000000010000000000000001.ready",
                false,
            ),
            ("pg_replslot/slot1", true),
            ("pg_stat_tmp/global.stat", false),
            ("base/5/pgsql_tmp", true),
            ("base/pgsql_tmp/pgsql_tmp123.0", false),
            ("global/pg_internal.init", false),
        ] {
            assert!(excluded(path, is_dir), "{path} was kept");
        }
        for (path, is_dir) in [
            ("pg_wal", true),
            ("pg_wal/archive_status", true),
            ("pg_replslot", true),
            ("base/5/16384", false),
            ("global/pg_control", false),
            ("postgresql.conf", false),
            ("base/5/backup_label", false),
        ] {
            assert!(!excluded(path, is_dir), "{path} was excluded");
        }
    }

    #[test]
    fn streams_share_the_files_largest_first_and_directories_go_first() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("base")).unwrap();
        for (name, size) in [("a", 10_000), ("b", 6_000), ("c", 5_000), ("d", 1_000)] {
            std::fs::write(dir.path().join("base").join(name), vec![7u8; size]).unwrap();
        }
        let (dirs, files) = partition(walk(dir.path()).unwrap());
        assert_eq!(dirs.len(), 1);
        let names = |tar_bytes: &[u8]| -> Vec<String> {
            tar::Archive::new(tar_bytes)
                .entries()
                .unwrap()
                .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
                .collect()
        };
        // Stream 0 writes the directory and takes the largest file; stream 1 the next; they
        // take turns, as two writers finishing their files would.
        let mut first = Vec::new();
        let mut second = Vec::new();
        let none = FileQueue::new(Vec::new());
        let one = |queue: &FileQueue| FileQueue::new(queue.next().into_iter().collect());
        let mut copied = write_tar(dir.path(), &dirs, &one(&files), 0, &mut first, None).unwrap();
        copied.extend(write_tar(dir.path(), &[], &one(&files), 1, &mut second, None).unwrap());
        copied.extend(write_tar(dir.path(), &[], &files, 1, &mut second, None).unwrap());
        assert!(
            write_tar(dir.path(), &[], &none, 2, Vec::new(), None)
                .unwrap()
                .is_empty()
        );
        assert_eq!(names(&first), vec!["base", "base/a"]);
        assert_eq!(
            names(&second),
            vec!["base/b"],
            "the reader stops at the first tar's end"
        );
        assert_eq!(
            copied.iter().map(|c| c.path.as_str()).collect::<Vec<_>>(),
            vec!["base/a", "base/b", "base/c", "base/d"]
        );
        assert_eq!(
            copied.iter().map(|c| c.stream).collect::<Vec<_>>(),
            vec![0, 1, 1, 1]
        );
    }

    #[test]
    fn a_file_that_shrinks_is_padded_and_a_vanished_one_skipped() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("base")).unwrap();
        std::fs::write(dir.path().join("base/1"), b"0123456789").unwrap();
        std::fs::write(dir.path().join("base/2"), b"gone soon").unwrap();
        let entries = walk(dir.path()).unwrap();
        std::fs::write(dir.path().join("base/1"), b"01234").unwrap();
        std::fs::remove_file(dir.path().join("base/2")).unwrap();
        let mut tar_bytes = Vec::new();
        let (dirs, files) = partition(entries);
        let copied = write_tar(dir.path(), &dirs, &files, 0, &mut tar_bytes, None).unwrap();
        assert_eq!(copied.len(), 1);
        assert!(copied[0].padded);
        assert_eq!(copied[0].size, 10);
        assert_eq!(copied[0].crc32c, crc32c::crc32c(b"01234\0\0\0\0\0"));
        let mut archive = tar::Archive::new(&tar_bytes[..]);
        let names: Vec<String> = archive
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec!["base", "base/1"]);
    }
}
