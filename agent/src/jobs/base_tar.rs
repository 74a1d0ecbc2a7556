//! A base backup's tar streams read back, every regular file checked against the size and
//! CRC-32C the manifest recorded when it was copied: while it is unpacked (`restore pg`) or
//! read into nothing (`verify`).
//!
//! zstd's frame checksums already catch bytes damaged in the store; this catches a stream
//! whose content is not what the backup read (a file missing, one too many, one that another
//! stream's bytes replaced), which only the manifest can say. The CRC is computed on the bytes
//! tar reads, through a tap under the tar reader that counts only the current file's data, so
//! nothing is read twice.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io::Read;
use std::path::Path;
use std::rc::Rc;

use super::base_chain::Destination;
use crate::catalog::manifest::BaseFile;
use crate::catalog::manifest::{Manifest, SourceFacts};
use crate::error::Failure;

/// The files a pg-base manifest says its tar stream `stream` (its object of that index) holds;
/// `None` for another kind of backup.
pub fn files_of_stream(manifest: &Manifest, stream: usize) -> Option<Vec<BaseFile>> {
    let SourceFacts::PgBase(facts) = &manifest.source else {
        return None;
    };
    // An incremental's unchanged files have no record in any stream.
    let files = facts
        .files
        .iter()
        .filter(|f| f.stream as usize == stream && f.delta.is_none_or(|d| d.in_stream()));
    Some(files.cloned().collect())
}

/// Reads one tar stream to its end, its entries unpacked into `destination` (tar's own path
/// checks: nothing lands outside the directory) or their data only read.
/// Every regular file must be one `expected` names, with its size and CRC-32C, and every
/// expected file must be in the stream. `name` (the object's key) is for messages.
///
/// After a failure the rest of the stream is read and dropped, so that the writer on the other
/// side (the download) ends by itself and its own error, if it has one, is the cause to report.
pub fn read_checked(
    reader: impl Read,
    expected: &[BaseFile],
    destination: Destination,
    name: &str,
) -> anyhow::Result<()> {
    let tap = Rc::new(RefCell::new(Tap::default()));
    let mut archive = tar::Archive::new(TappedReader {
        inner: reader,
        tap: tap.clone(),
    });
    archive.set_preserve_permissions(true);
    archive.set_overwrite(false);
    let result = check_entries(&mut archive, &tap, expected, destination, name);
    if result.is_err() {
        let _ = std::io::copy(&mut archive.into_inner().inner, &mut std::io::sink());
    }
    result
}

fn check_entries<R: Read>(
    archive: &mut tar::Archive<TappedReader<R>>,
    tap: &RefCell<Tap>,
    expected: &[BaseFile],
    destination: Destination,
    name: &str,
) -> anyhow::Result<()> {
    let mut missing: HashMap<&str, &BaseFile> =
        expected.iter().map(|f| (f.path.as_str(), f)).collect();
    let io = |what: &str, e: std::io::Error| anyhow::anyhow!("{what} in {name}: {e}");
    let mut buffer = Vec::new();
    for entry in archive
        .entries()
        .map_err(|e| io("reading the tar stream", e))?
    {
        let mut entry = entry.map_err(|e| io("reading a tar header", e))?;
        let path = entry
            .path()
            .map_err(|e| io("reading a file name", e))?
            .to_string_lossy()
            .into_owned();
        let is_file = entry.header().entry_type().is_file();
        if is_file {
            tap.borrow_mut()
                .arm(entry.raw_file_position(), entry.size());
        }
        let dir = match destination {
            Destination::Nowhere => None,
            Destination::Dir(dir) => Some(dir),
            Destination::Chain(rebuild) => Some(rebuild.dir()),
        };
        let mode = entry.header().mode().unwrap_or(0o600) & 0o7777;
        match (destination, dir) {
            (Destination::Chain(rebuild), _) if is_file => {
                write_base(&mut entry, rebuild, &path, mode, &mut buffer)
                    .map_err(|e| e.context(format!("unpacking {path} in {name}")))?;
            }
            (_, Some(dir)) if is_file => {
                write_file(&mut entry, dir, &path, mode, &mut buffer)
                    .map_err(|e| e.context(format!("unpacking {path} in {name}")))?;
            }
            // The newest backup of a chain, applied first, made it with its own mode.
            (Destination::Chain(_), Some(dir))
                if entry.header().entry_type().is_dir()
                    && super::base_delta::inside(dir, &path)?.is_dir() => {}
            (_, Some(dir)) => {
                let unpacked = entry
                    .unpack_in(dir)
                    .map_err(|e| io(&format!("unpacking {path}"), e))?;
                if !unpacked {
                    return Err(Failure::Corrupt(format!(
                        "{name} holds {path:?}, a path outside the data directory; nothing \
                         of it was written"
                    ))
                    .into());
                }
            }
            (_, None) => {
                std::io::copy(&mut entry, &mut std::io::sink())
                    .map_err(|e| io(&format!("reading {path}"), e))?;
            }
        }
        if !is_file {
            continue;
        }
        let (crc, read) = tap.borrow_mut().take();
        let Some(file) = missing.remove(path.as_str()) else {
            return Err(Failure::Corrupt(format!(
                "{name} holds {path}, which its manifest does not list"
            ))
            .into());
        };
        if read != file.size || crc != file.crc32c {
            return Err(Failure::Corrupt(format!(
                "{path} in {name} does not match the manifest: {read} bytes with CRC-32C \
                 {crc:08x}, expected {} bytes with CRC-32C {:08x}",
                file.size, file.crc32c
            ))
            .into());
        }
    }
    if let Some(first) = missing.keys().min() {
        return Err(Failure::Corrupt(format!(
            "{name} lacks {} file(s) its manifest lists, {first} first",
            missing.len()
        ))
        .into());
    }
    Ok(())
}

/// Bytes a regular file is written in: tar's own unpacking copies 8 KiB at a time, which was
/// 320,000 writes for the bench cluster.
const WRITE_CHUNK: usize = 1 << 20;

/// Writes one regular file of the tar into `dir`, a new file with the mode its header gives.
fn write_file(
    entry: &mut impl Read,
    dir: &Path,
    path: &str,
    mode: u32,
    buffer: &mut Vec<u8>,
) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let target = super::base_delta::inside(dir, path)?;
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent)?;
    }
    buffer.resize(WRITE_CHUNK, 0);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&target)?;
    loop {
        let n = crate::wal::object::read_full(entry, buffer)?;
        if n == 0 {
            break;
        }
        file.write_all(&buffer[..n])?;
        if n < buffer.len() {
            break;
        }
    }
    file.set_permissions(std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// In a chain: the full's copy of a regular file, the base of the rebuilt file, or read past
/// when the newest backup does not have it or a newer backup holds it whole.
fn write_base(
    entry: &mut impl Read,
    rebuild: &super::base_chain::Rebuild,
    path: &str,
    mode: u32,
    buffer: &mut Vec<u8>,
) -> anyhow::Result<()> {
    let mut base = rebuild.base(path, mode)?;
    buffer.resize(WRITE_CHUNK, 0);
    loop {
        let n = crate::wal::object::read_full(entry, buffer)?;
        if n == 0 {
            break;
        }
        if let Some(base) = &mut base {
            base.feed(&buffer[..n])?;
        }
        if n < buffer.len() {
            break;
        }
    }
    match base {
        Some(base) => base.finish(),
        None => Ok(()),
    }
}

/// The CRC-32C of the bytes read inside one window of the stream (a file's data).
#[derive(Debug, Default)]
struct Tap {
    position: u64,
    window: std::ops::Range<u64>,
    crc: u32,
    read: u64,
}

impl Tap {
    fn arm(&mut self, start: u64, len: u64) {
        self.window = start..start.saturating_add(len);
        self.crc = 0;
        self.read = 0;
    }

    fn take(&mut self) -> (u32, u64) {
        self.window = 0..0;
        (self.crc, self.read)
    }

    fn saw(&mut self, bytes: &[u8]) {
        let start = self.position;
        self.position += bytes.len() as u64;
        let from = start.max(self.window.start);
        let to = self.position.min(self.window.end);
        if from < to {
            let slice = &bytes[(from - start) as usize..(to - start) as usize];
            self.crc = crc32c::crc32c_append(self.crc, slice);
            self.read += slice.len() as u64;
        }
    }
}

struct TappedReader<R> {
    inner: R,
    tap: Rc<RefCell<Tap>>,
}

impl<R: Read> Read for TappedReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.tap.borrow_mut().saw(&buf[..n]);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_of(files: &[(&str, &[u8])]) -> (Vec<u8>, Vec<BaseFile>) {
        let mut builder = tar::Builder::new(Vec::new());
        let mut copied = Vec::new();
        let mut dir = tar::Header::new_gnu();
        dir.set_entry_type(tar::EntryType::Directory);
        dir.set_mode(0o700);
        dir.set_size(0);
        builder
            .append_data(&mut dir, "base", std::io::empty())
            .unwrap();
        for (path, data) in files {
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(tar::EntryType::Regular);
            header.set_mode(0o600);
            header.set_size(data.len() as u64);
            builder.append_data(&mut header, path, *data).unwrap();
            copied.push(BaseFile {
                path: path.to_string(),
                size: data.len() as u64,
                crc32c: crc32c::crc32c(data),
                stream: 0,
                padded: false,
                delta: None,
            });
        }
        (builder.into_inner().unwrap(), copied)
    }

    /// A reader that hands out at most `n` bytes a call, as a pipe does.
    struct Trickle<'a>(&'a [u8], usize);
    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = self.1.min(buf.len()).min(self.0.len());
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    fn corrupt(result: anyhow::Result<()>) -> String {
        let error = result.unwrap_err();
        assert!(
            crate::error::meaning(&error) == Some(crate::error::Meaning::Corrupt),
            "{error:#}"
        );
        format!("{error:#}")
    }

    #[test]
    fn every_file_is_checked_whatever_the_read_sizes() {
        let long_name = format!("base/{}", "x".repeat(150));
        let big: Vec<u8> = (0..70_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let (tar, files) = tar_of(&[
            ("base/1", b"hello"),
            ("base/empty", b""),
            (&long_name, &big),
        ]);
        for chunk in [1, 7, 512, 4096, 1 << 20] {
            read_checked(Trickle(&tar, chunk), &files, Destination::Nowhere, "t").unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        read_checked(&tar[..], &files, Destination::Dir(dir.path()), "t").unwrap();
        assert_eq!(std::fs::read(dir.path().join(&long_name)).unwrap(), big);
    }

    #[test]
    fn a_file_that_differs_from_the_manifest_is_corrupt() {
        let (tar, mut files) = tar_of(&[("base/1", b"hello"), ("base/2", b"world")]);
        files[1].crc32c ^= 1;
        let message = corrupt(read_checked(&tar[..], &files, Destination::Nowhere, "t"));
        assert!(message.contains("base/2"), "{message}");
        files[1].crc32c ^= 1;
        files[0].size += 1;
        let message = corrupt(read_checked(&tar[..], &files, Destination::Nowhere, "t"));
        assert!(message.contains("base/1"), "{message}");
    }

    #[test]
    fn a_file_missing_or_unlisted_is_corrupt() {
        let (tar, files) = tar_of(&[("base/1", b"hello"), ("base/2", b"world")]);
        let message = corrupt(read_checked(
            &tar[..],
            &files[..1],
            Destination::Nowhere,
            "t",
        ));
        assert!(message.contains("does not list"), "{message}");
        let (short, _) = tar_of(&[("base/1", b"hello")]);
        let message = corrupt(read_checked(&short[..], &files, Destination::Nowhere, "t"));
        assert!(message.contains("lacks 1 file(s)"), "{message}");
    }

    #[test]
    fn a_path_outside_the_directory_is_refused() {
        let mut builder = tar::Builder::new(Vec::new());
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Regular);
        header.set_mode(0o600);
        header.set_size(1);
        // append_data refuses "..", so write the name into the header directly.
        header.as_gnu_mut().unwrap().name[..9].copy_from_slice(b"../escape");
        header.set_cksum();
        builder.append(&header, &b"x"[..]).unwrap();
        let tar = builder.into_inner().unwrap();
        let file = BaseFile {
            path: "../escape".into(),
            size: 1,
            crc32c: crc32c::crc32c(b"x"),
            stream: 0,
            padded: false,
            delta: None,
        };
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("data");
        std::fs::create_dir(&dir).unwrap();
        let result = read_checked(&tar[..], &[file], Destination::Dir(&dir), "t");
        assert!(result.is_err());
        assert!(!parent.path().join("escape").exists(), "written outside");
    }

    proptest::proptest! {
        /// A tar stream from the store is outside input: any bytes are refused, never a panic.
        #[test]
        fn any_bytes_are_refused_or_checked(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2048)) {
            let (tar, files) = tar_of(&[("base/1", b"hello")]);
            let _ = read_checked(&bytes[..], &files, Destination::Nowhere, "t");
            let mut spliced = tar.clone();
            let at = bytes.len() % tar.len();
            spliced.splice(at..at, bytes.iter().copied());
            let _ = read_checked(&spliced[..], &files, Destination::Nowhere, "t");
        }
    }
}
