//! An incremental base backup's delta streams read back: applied into a chain's rebuild
//! (`restore pg`, newest backup first: `base_chain`), or read into nothing (`verify`), every
//! record checked against the manifest as it passes.
//!
//! What a stream can be checked against while it is read: each file record is one the
//! manifest lists in that stream, once; a whole file's blocks come in order and add up to its
//! size and CRC-32C; a changed file has the number of blocks the manifest counted. A changed
//! file's result depends on older backups' bytes as well: `base_chain` composes its CRC-32C
//! when its base is written, or, past that module's memory budget, [`check_rebuilt`] reads it
//! back once the whole chain is applied.

use std::collections::HashMap;
use std::io::Read;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::base_chain::{BaseWriter, ChangedBlocks, Destination};
use crate::catalog::manifest::{BaseFile, Delta};
use crate::error::Failure;
use crate::sources::blocks::{BlockError, DeltaReader, Record};

/// What applying (or reading) one stream met, for the chain's last steps.
#[derive(Debug, Default)]
pub struct Applied {
    /// The directories its records name (stream 0 has all of the backup's).
    pub dirs: Vec<String>,
}

/// Reads one delta stream to its end, its records applied to the files of `destination` (or
/// only checked). `expected` is the manifest's files of this stream (those with
/// a record in it); `name` (the object's key) is for messages.
///
/// After a failure the rest of the stream is read and dropped, so that the download on the
/// other side ends by itself and its own error, if it has one, is the one reported.
pub fn read_checked(
    reader: impl Read,
    expected: &[BaseFile],
    destination: Destination,
    name: &str,
) -> anyhow::Result<Applied> {
    let mut stream = match DeltaReader::new(reader) {
        Ok(stream) => stream,
        Err(error) => return Err(corrupt(name, error)),
    };
    let mut applied = Applied::default();
    let result = apply(&mut stream, expected, destination, name, &mut applied);
    if result.is_err() {
        let _ = std::io::copy(&mut stream.into_inner(), &mut std::io::sink());
    }
    result.map(|()| applied)
}

fn corrupt(name: &str, error: BlockError) -> anyhow::Error {
    match error {
        BlockError::Io(e) => anyhow::anyhow!("reading {name}: {e}"),
        BlockError::Invalid(what) => Failure::Corrupt(format!("{name}: {what}")).into(),
    }
}

/// The file whose records are being read.
struct Current<'a, 'r> {
    file: &'a BaseFile,
    output: Output<'r>,
    whole: bool,
    blocks: u64,
    crc: u32,
    /// Whole files: the next byte expected, so that blocks come in order without gaps.
    next: u64,
}

/// Where the blocks of the current file go.
enum Output<'r> {
    Nowhere,
    /// One backup applied on its own: written as they come.
    File(std::fs::File),
    /// In a chain, changed blocks: those no newer backup wrote.
    Changed(ChangedBlocks<'r>),
    /// In a chain, a whole file: the file's base.
    Base(BaseWriter<'r>),
}

fn apply<R: Read>(
    stream: &mut DeltaReader<R>,
    expected: &[BaseFile],
    destination: Destination,
    name: &str,
    applied: &mut Applied,
) -> anyhow::Result<()> {
    let dir = match destination {
        Destination::Nowhere => None,
        Destination::Dir(dir) => Some(dir),
        Destination::Chain(rebuild) => Some(rebuild.dir()),
    };
    // Applied newest first, a chain's older backups leave the modes newer ones gave.
    let rebuild = match destination {
        Destination::Chain(rebuild) => Some(rebuild),
        _ => None,
    };
    let block_size = u64::from(stream.block_size());
    let mut missing: HashMap<&str, &BaseFile> =
        expected.iter().map(|f| (f.path.as_str(), f)).collect();
    let mut current: Option<Current> = None;
    let io = |what: String, e: std::io::Error| anyhow::anyhow!("{what} for {name}: {e}");
    while let Some(record) = stream.next_record().map_err(|e| corrupt(name, e))? {
        if !matches!(record, Record::Block { .. })
            && let Some(done) = current.take()
        {
            finish(done, name)?;
        }
        match record {
            Record::Dir { path, mode, .. } => {
                if let Some(dir) = dir {
                    let target = inside(dir, &path)?;
                    // Another stream of the chain may create it at the same moment (its own
                    // record, or a file's parent that came before this record).
                    match std::fs::create_dir(&target) {
                        Ok(()) => {}
                        Err(e)
                            if e.kind() == std::io::ErrorKind::AlreadyExists && target.is_dir() => {
                        }
                        Err(e) => return Err(io(format!("creating {path}"), e)),
                    }
                    if rebuild.is_none_or(|r| r.claims_dir_mode(&path)) {
                        std::fs::set_permissions(
                            &target,
                            std::fs::Permissions::from_mode(mode & 0o7777),
                        )
                        .map_err(|e| io(format!("setting the mode of {path}"), e))?;
                    }
                }
                applied.dirs.push(path);
            }
            Record::File {
                path,
                size,
                mode,
                whole,
                ..
            } => {
                let Some(file) = missing.remove(path.as_str()) else {
                    return Err(Failure::Corrupt(format!(
                        "{name} holds {path}, which its manifest does not list in it (or lists \
                         once)"
                    ))
                    .into());
                };
                let as_listed = match file.delta {
                    Some(Delta::Whole) => whole,
                    Some(Delta::Changed { .. }) => !whole,
                    _ => false,
                };
                if size != file.size || !as_listed {
                    return Err(Failure::Corrupt(format!(
                        "{path} in {name} does not match the manifest: {size} bytes, {}, \
                         expected {} bytes, {:?}",
                        if whole { "whole" } else { "changed blocks" },
                        file.size,
                        file.delta
                    ))
                    .into());
                }
                let output = match destination {
                    Destination::Nowhere => Output::Nowhere,
                    Destination::Dir(dir) => Output::File(open_for(dir, &path, size, mode, whole)?),
                    Destination::Chain(rebuild) if whole => rebuild
                        .base(&path, mode)?
                        .map_or(Output::Nowhere, Output::Base),
                    Destination::Chain(rebuild) => rebuild
                        .changed(&path, mode)?
                        .map_or(Output::Nowhere, Output::Changed),
                };
                current = Some(Current {
                    file,
                    output,
                    whole,
                    blocks: 0,
                    crc: 0,
                    next: 0,
                });
            }
            Record::Block { number, bytes } => {
                let Some(open) = current.as_mut() else {
                    return Err(
                        Failure::Corrupt(format!("{name}: a block outside any file")).into(),
                    );
                };
                let offset = u64::from(number) * block_size;
                if open.whole {
                    if offset != open.next {
                        return Err(Failure::Corrupt(format!(
                            "{name}: block {number} of {} out of order",
                            open.file.path
                        ))
                        .into());
                    }
                    open.crc = crc32c::crc32c_append(open.crc, &bytes);
                    open.next = offset + bytes.len() as u64;
                }
                match &mut open.output {
                    Output::Nowhere => {}
                    Output::File(handle) => handle
                        .write_all_at(&bytes, offset)
                        .map_err(|e| io(format!("writing {}", open.file.path), e))?,
                    Output::Changed(changed) => changed.block(number, &bytes)?,
                    Output::Base(base) => base.feed(&bytes)?,
                }
                open.blocks += 1;
            }
        }
    }
    if let Some(done) = current.take() {
        finish(done, name)?;
    }
    if let Some(first) = missing.keys().min() {
        return Err(Failure::Corrupt(format!(
            "{name} lacks {} file(s) its manifest lists in it, {first} first",
            missing.len()
        ))
        .into());
    }
    Ok(())
}

/// The checks that need all of a file's records.
fn finish(done: Current, name: &str) -> anyhow::Result<()> {
    let file = done.file;
    let good = match file.delta {
        Some(Delta::Whole) => done.next == file.size && done.crc == file.crc32c,
        Some(Delta::Changed { blocks }) => done.blocks == blocks,
        _ => false,
    };
    if !good {
        return Err(Failure::Corrupt(format!(
            "{} in {name} does not match the manifest ({} blocks read)",
            file.path, done.blocks
        ))
        .into());
    }
    if let Output::Base(base) = done.output {
        base.finish()?;
    }
    Ok(())
}

/// `path` under `dir`, refusing any way out: a relative path of plain names (no `..`, `.`,
/// empty or absolute parts), and every directory on the way a real directory (a symlink a
/// damaged or hostile tar left would lead elsewhere).
pub(crate) fn inside(dir: &Path, path: &str) -> anyhow::Result<PathBuf> {
    let mut at = dir.to_path_buf();
    let parts: Vec<&str> = path.trim_end_matches('/').split('/').collect();
    if parts
        .iter()
        .any(|p| p.is_empty() || *p == "." || *p == "..")
        || path.contains('\0')
    {
        return Err(Failure::Corrupt(format!(
            "{path:?} is a path outside the data directory; nothing of it was written"
        ))
        .into());
    }
    for (index, part) in parts.iter().enumerate() {
        at.push(part);
        let last = index + 1 == parts.len();
        match std::fs::symlink_metadata(&at) {
            Ok(meta) if meta.file_type().is_symlink() => {
                return Err(Failure::Corrupt(format!(
                    "{path} leads through a symbolic link in the restored directory; nothing \
                     is written through it"
                ))
                .into());
            }
            Ok(meta) if !last && !meta.is_dir() => {
                return Err(Failure::Corrupt(format!("{path}: {part} is not a directory")).into());
            }
            _ => {}
        }
    }
    Ok(at)
}

/// Opens (creating it if needed) the file a record names, sized to `size`: a whole file loses
/// what an older backup put there; a changed one keeps it, cut or extended to its new size.
fn open_for(
    dir: &Path,
    path: &str,
    size: u64,
    mode: u32,
    whole: bool,
) -> anyhow::Result<std::fs::File> {
    let target = inside(dir, path)?;
    // Another stream's directory records may not have come yet (a new database).
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent).with_context_path(parent, "creating")?;
    }
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(whole)
        .open(&target)
        .with_context_path(&target, "opening")?;
    file.set_len(size).with_context_path(&target, "sizing")?;
    file.set_permissions(std::fs::Permissions::from_mode(mode & 0o7777))
        .with_context_path(&target, "setting the mode of")?;
    Ok(file)
}

trait PathContext<T> {
    fn with_context_path(self, path: &Path, what: &str) -> anyhow::Result<T>;
}

impl<T> PathContext<T> for std::io::Result<T> {
    fn with_context_path(self, path: &Path, what: &str) -> anyhow::Result<T> {
        self.map_err(|e| anyhow::anyhow!("{what} {}: {e}", path.display()))
    }
}

/// After a chain is applied: a file whose CRC-32C could not be composed (past the budget) is
/// read back and must have the size and CRC-32C the newest backup took of it. Blocking.
pub fn check_rebuilt(dir: &Path, file: &BaseFile) -> anyhow::Result<()> {
    let path = dir.join(&file.path);
    let mut handle = std::fs::File::open(&path).with_context_path(&path, "reading")?;
    let mut buf = vec![0u8; 1 << 20];
    let (mut crc, mut size) = (0u32, 0u64);
    loop {
        let n = handle.read(&mut buf).with_context_path(&path, "reading")?;
        if n == 0 {
            break;
        }
        crc = crc32c::crc32c_append(crc, &buf[..n]);
        size += n as u64;
    }
    if size != file.size || crc != file.crc32c {
        return Err(Failure::Corrupt(format!(
            "{} rebuilt from the chain does not match the newest backup: {size} bytes with \
             CRC-32C {crc:08x}, expected {} bytes with CRC-32C {:08x}",
            file.path, file.size, file.crc32c
        ))
        .into());
    }
    Ok(())
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::sources::blocks::DeltaWriter;

    pub(crate) fn listed(path: &str, data: &[u8], delta: Option<Delta>) -> BaseFile {
        BaseFile {
            path: path.into(),
            size: data.len() as u64,
            crc32c: crc32c::crc32c(data),
            stream: 0,
            padded: false,
            delta,
        }
    }

    #[test]
    fn a_chain_of_deltas_rebuilds_the_file_and_checks_it() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("base")).unwrap();
        let old: Vec<u8> = (0..3 * 8192).map(|i| (i % 251) as u8).collect();
        std::fs::write(dir.path().join("base/1"), &old).unwrap();
        // The new file: block 1 changed, and one block more.
        let mut new = old.clone();
        new[8192..16384].fill(9);
        new.extend(vec![4u8; 8192]);
        let mut writer = DeltaWriter::new(Vec::new(), 8192).unwrap();
        writer.dir("base", 0o700, 0).unwrap();
        writer
            .file("base/1", new.len() as u64, 0o600, 0, false)
            .unwrap();
        writer.block(1, &new[8192..16384]).unwrap();
        writer.block(3, &new[3 * 8192..]).unwrap();
        writer.file("base/2", 5, 0o600, 0, true).unwrap();
        writer.block(0, b"hello").unwrap();
        let stream = writer.finish().unwrap();
        let files = vec![
            listed("base/1", &new, Some(Delta::Changed { blocks: 2 })),
            listed("base/2", b"hello", Some(Delta::Whole)),
        ];
        read_checked(&stream[..], &files, Destination::Nowhere, "t").unwrap();
        let applied = read_checked(&stream[..], &files, Destination::Dir(dir.path()), "t").unwrap();
        assert_eq!(applied.dirs, vec!["base"]);
        assert_eq!(std::fs::read(dir.path().join("base/1")).unwrap(), new);
        check_rebuilt(dir.path(), &files[0]).unwrap();
        check_rebuilt(dir.path(), &files[1]).unwrap();

        let mut wrong = files.clone();
        wrong[0].crc32c ^= 1;
        let error = check_rebuilt(dir.path(), &wrong[0]).unwrap_err();
        assert_eq!(
            crate::error::meaning(&error),
            Some(crate::error::Meaning::Corrupt)
        );
        wrong[1].crc32c ^= 1;
        let error = read_checked(&stream[..], &wrong, Destination::Nowhere, "t").unwrap_err();
        assert!(format!("{error:#}").contains("base/2"), "{error:#}");
        let error = read_checked(&stream[..], &files[..1], Destination::Nowhere, "t").unwrap_err();
        assert!(format!("{error:#}").contains("does not list"), "{error:#}");
    }

    /// A chain's streams are applied at once, and a directory one creates (its record, or a
    /// file's parent) can appear between another's look and its mkdir.
    #[test]
    fn streams_creating_the_same_directories_at_once_all_succeed() {
        let mut writer = DeltaWriter::new(Vec::new(), 8192).unwrap();
        writer.dir("base", 0o700, 0).unwrap();
        for database in 0..32 {
            writer.dir(&format!("base/{database}"), 0o700, 0).unwrap();
        }
        let stream = writer.finish().unwrap();
        for _ in 0..20 {
            let dir = tempfile::tempdir().unwrap();
            let start = std::sync::Barrier::new(4);
            std::thread::scope(|scope| {
                let streams: Vec<_> = (0..4)
                    .map(|_| {
                        scope.spawn(|| {
                            start.wait();
                            read_checked(&stream[..], &[], Destination::Dir(dir.path()), "t")
                                .map(|applied| applied.dirs.len())
                                .map_err(|e| format!("{e:#}"))
                        })
                    })
                    .collect();
                for stream in streams {
                    assert_eq!(stream.join().unwrap(), Ok(33));
                }
            });
        }
    }

    #[test]
    fn nothing_is_written_through_a_symbolic_link() {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("data");
        let outside = parent.path().join("outside");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, dir.join("base")).unwrap();
        let mut writer = DeltaWriter::new(Vec::new(), 8192).unwrap();
        writer.file("base/1", 5, 0o600, 0, true).unwrap();
        writer.block(0, b"hello").unwrap();
        let stream = writer.finish().unwrap();
        let files = vec![listed("base/1", b"hello", Some(Delta::Whole))];
        assert!(read_checked(&stream[..], &files, Destination::Dir(&dir), "t").is_err());
        assert!(!outside.join("1").exists());
    }
}
