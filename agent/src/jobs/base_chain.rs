//! A chain of base backups (a full and its incrementals) restored newest first: every byte of
//! the result is written once, by the newest backup of the chain that holds it, and each
//! file's CRC-32C is composed from what was written, so that nothing is read back.
//!
//! Oldest first, a chain wrote all of the full and then overwrote what each incremental
//! stored, and a file an incremental had touched could only be checked by reading it back:
//! half as long again as the full alone on the bench cluster. Newest first, a backup skips
//! the blocks a newer one already wrote and the files the newest backup does not list at all
//! (dropped tables, rewritten relations), and the oldest backup a file needs, its *base* (the
//! full's tar, or the incremental that copied it whole because its parent did not have it),
//! writes the rest of it in order, folding in the CRC-32C of each block a newer backup wrote
//! (`crc32c_combine`). The file's CRC-32C is then known when its base ends, and is compared
//! with the one the newest backup took of it.
//!
//! Why the newest backup holding a block holds its final bytes: an incremental leaves out a
//! block only when its hash, which covers its length, is its parent's (`sources::blocks`), so
//! the block is byte for byte what the parent had; a block past the parent's end is always
//! stored. A block written by no backup of the chain is a broken chain and an error.
//!
//! Memory: one bit per block of each file an incremental wrote to, and 8 bytes per block it
//! wrote, up to a budget; past it, the files that did not fit are read back at the end.

use std::collections::HashMap;
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use anyhow::Context;

use crate::catalog::manifest::BaseFile;
use crate::error::Failure;

/// CRCs of blocks written by incrementals kept for composing (8 bytes each: 64 MiB, enough
/// for 64 GiB of changed 8 KiB blocks).
pub const BLOCK_CRC_BUDGET: usize = 8 << 20;

/// Where a stream's files go as it is read and checked.
#[derive(Debug, Clone, Copy)]
pub enum Destination<'a> {
    /// Nowhere (`verify`).
    Nowhere,
    /// Into this directory, as they are (one backup restored on its own).
    Dir(&'a Path),
    /// Into a chain's rebuild, newer backups of the chain already applied.
    Chain(&'a std::sync::Arc<Rebuild>),
}

/// The files of the newest backup of a chain, and what the backups applied so far (all
/// newer than the one being applied) wrote of them. Shared by the streams of one backup,
/// which hold disjoint files.
#[derive(Debug)]
pub struct Rebuild {
    dir: PathBuf,
    block_size: u64,
    shift: CrcShift,
    targets: HashMap<String, Mutex<Target>>,
    crcs_left: AtomicUsize,
    read_back: Mutex<Vec<String>>,
    /// Directories whose mode a backup's record set: the newest backup that has one (applied
    /// first), whoever created it (another stream may have, as a file's parent).
    moded_dirs: Mutex<std::collections::HashSet<String>>,
}

/// One file as the newest backup read it, and what is already written of it.
#[derive(Debug, Default)]
struct Target {
    size: u64,
    crc32c: u32,
    /// A bit per block: written by a newer backup, so older ones skip it.
    written: Vec<u64>,
    /// (block, CRC-32C of its bytes) of each written block, while the budget lasts.
    crcs: Vec<(u64, u32)>,
    /// Out of budget: checked by reading the file back once the chain is applied.
    read_back: bool,
    /// Its base has been written: nothing older is needed.
    done: bool,
}

impl Target {
    fn is_written(&self, block: u64) -> bool {
        is_set(&self.written, block)
    }
}

fn is_set(bits: &[u64], block: u64) -> bool {
    usize::try_from(block / 64)
        .ok()
        .and_then(|word| bits.get(word))
        .is_some_and(|word| (word >> (block % 64)) & 1 == 1)
}

fn lock<T>(cell: &Mutex<T>) -> MutexGuard<'_, T> {
    // A thread that panicked holding it has failed the restore already.
    cell.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Rebuild {
    /// `newest`: the newest backup's files; `dir`: the (empty) directory restored into.
    pub fn new(dir: &Path, newest: &[BaseFile], block_size: u32, crc_budget: usize) -> Self {
        let targets = newest
            .iter()
            .map(|file| {
                let target = Target {
                    size: file.size,
                    crc32c: file.crc32c,
                    ..Target::default()
                };
                (file.path.clone(), Mutex::new(target))
            })
            .collect();
        Rebuild {
            dir: dir.to_path_buf(),
            block_size: u64::from(block_size.max(1)),
            shift: CrcShift::new(block_size.max(1) as usize),
            targets,
            crcs_left: AtomicUsize::new(crc_budget),
            read_back: Mutex::new(Vec::new()),
            moded_dirs: Mutex::default(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether a backup's record of directory `path` sets its mode: only the first, which is
    /// the newest backup's.
    pub fn claims_dir_mode(&self, path: &str) -> bool {
        lock(&self.moded_dirs).insert(path.to_string())
    }

    /// An older backup's record of the changed blocks of `path`: where to write those that no
    /// newer backup wrote. `None` when nothing of it is needed.
    pub fn changed(&self, path: &str, mode: u32) -> anyhow::Result<Option<ChangedBlocks<'_>>> {
        let Some(cell) = self.targets.get(path) else {
            return Ok(None);
        };
        let size = {
            let target = lock(cell);
            if target.done {
                return Ok(None);
            }
            target.size
        };
        let file = self.open(path, mode, size)?;
        Ok(Some(ChangedBlocks {
            rebuild: self,
            target: cell,
            path: path.to_string(),
            file,
        }))
    }

    /// An older backup's whole copy of `path`: it becomes the file's base. `None` when nothing
    /// of it is needed (the newest backup does not have it, or a newer copy was whole).
    pub fn base(&self, path: &str, mode: u32) -> anyhow::Result<Option<BaseWriter<'_>>> {
        let Some(cell) = self.targets.get(path) else {
            return Ok(None);
        };
        let mut target = lock(cell);
        if target.done {
            return Ok(None);
        }
        let file = self.open(path, mode, target.size)?;
        target.done = true;
        let mut crcs = std::mem::take(&mut target.crcs);
        crcs.sort_unstable();
        self.crcs_left.fetch_add(crcs.len(), Ordering::Relaxed);
        Ok(Some(BaseWriter {
            rebuild: self,
            path: path.to_string(),
            file,
            size: target.size,
            expected_crc: target.crc32c,
            written: std::mem::take(&mut target.written),
            crcs,
            next_crc: 0,
            composed: !target.read_back,
            crc: 0,
            position: 0,
            accounted: 0,
        }))
    }

    /// Once every backup of the chain is applied: the files to read back (those past the
    /// budget). A file of the newest backup that no backup held whole is an error.
    pub fn finish(&self) -> anyhow::Result<Vec<String>> {
        let mut unbased: Vec<&str> = self
            .targets
            .iter()
            .filter(|(_, cell)| !lock(cell).done)
            .map(|(path, _)| path.as_str())
            .collect();
        unbased.sort_unstable();
        if let Some(first) = unbased.first() {
            return Err(Failure::Corrupt(format!(
                "{} file(s) of the newest backup, {first} first, are held whole by no backup of \
                 the chain: the chain's manifests are inconsistent",
                unbased.len()
            ))
            .into());
        }
        Ok(std::mem::take(&mut *lock(&self.read_back)))
    }

    /// Opens the file, creating it at its final size (with the mode of the newest backup
    /// that has it, the first to get here) when no newer backup did.
    fn open(&self, path: &str, mode: u32, size: u64) -> anyhow::Result<std::fs::File> {
        let target = super::base_delta::inside(&self.dir, path)?;
        // Another stream's directory records may not have come yet (a new database).
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        let created = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&target);
        let file = match created {
            Ok(file) => {
                file.set_len(size)
                    .with_context(|| format!("sizing {}", target.display()))?;
                file.set_permissions(std::fs::Permissions::from_mode(mode & 0o7777))
                    .with_context(|| format!("setting the mode of {}", target.display()))?;
                file
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => std::fs::OpenOptions::new()
                .write(true)
                .open(&target)
                .with_context(|| format!("opening {}", target.display()))?,
            Err(e) => {
                return Err(anyhow::Error::new(e).context(format!("creating {}", target.display())));
            }
        };
        Ok(file)
    }

    /// Keeps the CRC of a block just written, or gives up composing the file's when the
    /// budget is spent (its CRCs so far go back to the budget).
    fn remember(&self, target: &mut Target, path: &str, block: u64, crc: u32) {
        if target.read_back {
            return;
        }
        let taken = self
            .crcs_left
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
        if taken.is_ok() {
            target.crcs.push((block, crc));
            return;
        }
        target.read_back = true;
        self.crcs_left
            .fetch_add(target.crcs.len(), Ordering::Relaxed);
        target.crcs = Vec::new();
        lock(&self.read_back).push(path.to_string());
    }
}

/// Writes an incremental's changed blocks of one file, those no newer backup wrote.
#[derive(Debug)]
pub struct ChangedBlocks<'a> {
    rebuild: &'a Rebuild,
    target: &'a Mutex<Target>,
    path: String,
    file: std::fs::File,
}

impl ChangedBlocks<'_> {
    pub fn block(&mut self, number: u32, bytes: &[u8]) -> anyhow::Result<()> {
        let block = u64::from(number);
        let offset = block * self.rebuild.block_size;
        let mut target = lock(self.target);
        if offset >= target.size || target.is_written(block) {
            return Ok(());
        }
        let keep = bytes
            .len()
            .min(usize::try_from(target.size - offset).unwrap_or(usize::MAX));
        let bytes = &bytes[..keep];
        self.file
            .write_all_at(bytes, offset)
            .with_context(|| format!("writing {}", self.path))?;
        let word = usize::try_from(block / 64).context("a block number too large")?;
        if target.written.len() <= word {
            let blocks = target.size.div_ceil(self.rebuild.block_size);
            let words = usize::try_from(blocks.div_ceil(64)).unwrap_or(word + 1);
            target.written.resize(words.max(word + 1), 0);
        }
        target.written[word] |= 1 << (block % 64);
        self.rebuild
            .remember(&mut target, &self.path, block, crc32c::crc32c(bytes));
        Ok(())
    }
}

/// Writes a file's base: its bytes in order, except the blocks newer backups wrote, whose
/// CRCs it folds into the file's as it passes them.
#[derive(Debug)]
pub struct BaseWriter<'a> {
    rebuild: &'a Rebuild,
    path: String,
    file: std::fs::File,
    size: u64,
    expected_crc: u32,
    written: Vec<u64>,
    crcs: Vec<(u64, u32)>,
    next_crc: usize,
    /// Within the budget: the CRC is composed (otherwise the file is read back).
    composed: bool,
    crc: u32,
    /// Bytes of the base seen.
    position: u64,
    /// Bytes of the final file whose CRC is folded in.
    accounted: u64,
}

impl BaseWriter<'_> {
    /// The base's next bytes, in any pieces. Runs of blocks no newer backup wrote are written
    /// straight from `bytes`, one write each.
    pub fn feed(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        let block_size = self.rebuild.block_size;
        // The run being gathered: its offset in the file, and its range in `bytes`.
        let mut run: Option<(u64, std::ops::Range<usize>)> = None;
        let mut index = 0;
        while index < bytes.len() {
            let at = self.position;
            let in_block = at % block_size;
            let take = (bytes.len() - index)
                .min(usize::try_from(block_size - in_block).unwrap_or(usize::MAX));
            let piece = index..index + take;
            index += take;
            self.position += take as u64;
            let block = at / block_size;
            if at >= self.size || is_set(&self.written, block) {
                self.write_run(bytes, run.take())?;
                if at < self.size && in_block == 0 {
                    self.fold_written(block)?;
                }
                continue;
            }
            let keep = take.min(usize::try_from(self.size - at).unwrap_or(usize::MAX));
            let kept = piece.start..piece.start + keep;
            if self.composed {
                self.crc = crc32c::crc32c_append(self.crc, &bytes[kept.clone()]);
            }
            self.accounted += keep as u64;
            match &mut run {
                Some((_, range)) => range.end = kept.end,
                None => run = Some((at, kept)),
            }
        }
        self.write_run(bytes, run)
    }

    fn write_run(
        &self,
        bytes: &[u8],
        run: Option<(u64, std::ops::Range<usize>)>,
    ) -> anyhow::Result<()> {
        let Some((at, range)) = run else {
            return Ok(());
        };
        self.file
            .write_all_at(&bytes[range], at)
            .with_context(|| format!("writing {}", self.path))
    }

    /// The base has ended: the blocks past its end must all have come from newer backups;
    /// then the whole file's CRC-32C must be the newest backup's.
    pub fn finish(mut self) -> anyhow::Result<()> {
        let block_size = self.rebuild.block_size;
        while self.accounted < self.size {
            let block = self.accounted / block_size;
            if !self.accounted.is_multiple_of(block_size) || !is_set(&self.written, block) {
                return Err(Failure::Corrupt(format!(
                    "{}: no backup of the chain holds its block {block}: the chain is broken",
                    self.path
                ))
                .into());
            }
            self.fold_written(block)?;
        }
        if !self.composed {
            return Ok(());
        }
        if self.crc != self.expected_crc {
            return Err(Failure::Corrupt(format!(
                "{} rebuilt from the chain does not match the newest backup: CRC-32C {:08x}, \
                 expected {:08x} ({} bytes)",
                self.path, self.crc, self.expected_crc, self.size
            ))
            .into());
        }
        Ok(())
    }

    /// Folds in the CRC of a block a newer backup wrote.
    fn fold_written(&mut self, block: u64) -> anyhow::Result<()> {
        let block_size = self.rebuild.block_size;
        let len = block_size.min(self.size - block * block_size);
        self.accounted += len;
        if !self.composed {
            return Ok(());
        }
        while self
            .crcs
            .get(self.next_crc)
            .is_some_and(|(b, _)| *b < block)
        {
            self.next_crc += 1;
        }
        let Some(&(_, crc)) = self.crcs.get(self.next_crc).filter(|(b, _)| *b == block) else {
            return Err(anyhow::anyhow!(
                "{}: the CRC of block {block} was not kept",
                self.path
            ));
        };
        let len = usize::try_from(len).context("a block too large")?;
        self.crc = self.rebuild.shift.combine(self.crc, crc, len);
        Ok(())
    }
}

/// `crc32c_combine` made fast for one length. The crate's (zlib's) squares a 32x32 GF(2)
/// matrix a dozen times per call, microseconds each: half a second for the bench chain's
/// 100,000 blocks. Appending `len` bytes multiplies the first CRC by a fixed matrix, whose
/// columns are computed once here.
#[derive(Debug)]
struct CrcShift {
    len: usize,
    columns: [u32; 32],
}

impl CrcShift {
    fn new(len: usize) -> Self {
        let mut columns = [0u32; 32];
        for (bit, column) in columns.iter_mut().enumerate() {
            *column = crc32c::crc32c_combine(1 << bit, 0, len);
        }
        CrcShift { len, columns }
    }

    /// The CRC-32C of A then B from theirs, B being `len` bytes long.
    fn combine(&self, crc_a: u32, crc_b: u32, len: usize) -> u32 {
        if len != self.len {
            return crc32c::crc32c_combine(crc_a, crc_b, len);
        }
        let mut shifted = 0;
        let mut bits = crc_a;
        for column in &self.columns {
            if bits & 1 == 1 {
                shifted ^= column;
            }
            bits >>= 1;
        }
        shifted ^ crc_b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listed(path: &str, data: &[u8]) -> BaseFile {
        super::super::base_delta::tests::listed(path, data, None)
    }

    /// Applies, newest first, backups given as (path, whole bytes or changed blocks).
    enum Copy<'a> {
        Whole(&'a [u8]),
        Blocks(Vec<(u32, &'a [u8])>),
    }

    fn apply(rebuild: &Rebuild, backups: &[Vec<(&str, Copy)>]) -> anyhow::Result<Vec<String>> {
        for backup in backups.iter().rev() {
            for (path, copy) in backup {
                match copy {
                    Copy::Whole(bytes) => {
                        if let Some(mut base) = rebuild.base(path, 0o600)? {
                            // Odd pieces, as a tar reader hands them out.
                            for piece in bytes.chunks(3000) {
                                base.feed(piece)?;
                            }
                            base.finish()?;
                        }
                    }
                    Copy::Blocks(blocks) => {
                        if let Some(mut changed) = rebuild.changed(path, 0o600)? {
                            for (number, bytes) in blocks {
                                changed.block(*number, bytes)?;
                            }
                        }
                    }
                }
            }
        }
        rebuild.finish()
    }

    proptest::proptest! {
        #[test]
        fn the_precomputed_shift_is_crc32c_combine(
            a in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200),
            b in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..40),
        ) {
            let shift = CrcShift::new(b.len());
            let whole: Vec<u8> = a.iter().chain(&b).copied().collect();
            let (crc_a, crc_b) = (crc32c::crc32c(&a), crc32c::crc32c(&b));
            proptest::prop_assert_eq!(shift.combine(crc_a, crc_b, b.len()), crc32c::crc32c(&whole));
            let other = CrcShift::new(b.len() + 1);
            proptest::prop_assert_eq!(other.combine(crc_a, crc_b, b.len()), crc32c::crc32c(&whole));
        }
    }

    fn blocks(fill: &[u8]) -> Vec<u8> {
        fill.iter().flat_map(|b| vec![*b; 8192]).collect()
    }

    #[test]
    fn each_block_comes_from_the_newest_backup_that_holds_it() {
        for budget in [BLOCK_CRC_BUDGET, 1, 0] {
            let dir = tempfile::tempdir().unwrap();
            let full = blocks(&[1, 2, 3, 4, 5]);
            // First incremental: block 1 changed, the file cut to 4 blocks; a new file.
            let first = blocks(&[6]);
            // Second: block 3 changed, then extended by a partial block.
            let second = blocks(&[7]);
            let tail = vec![8u8; 100];
            let mut expected = blocks(&[1, 6, 3, 7]);
            expected.extend(&tail);
            let newest = vec![
                listed("base/1/10", &expected),
                listed("base/1/11", b"new file"),
            ];
            let rebuild = Rebuild::new(dir.path(), &newest, 8192, budget);
            let backups = vec![
                vec![
                    ("base/1/10", Copy::Whole(&full)),
                    ("base/1/12", Copy::Whole(b"dropped later")),
                ],
                vec![
                    ("base/1/10", Copy::Blocks(vec![(1, &first)])),
                    ("base/1/11", Copy::Whole(b"new file")),
                ],
                vec![("base/1/10", Copy::Blocks(vec![(3, &second), (4, &tail)]))],
            ];
            let read_back = apply(&rebuild, &backups).unwrap();
            assert_eq!(
                std::fs::read(dir.path().join("base/1/10")).unwrap(),
                expected
            );
            assert_eq!(
                std::fs::read(dir.path().join("base/1/11")).unwrap(),
                b"new file"
            );
            assert!(!dir.path().join("base/1/12").exists());
            let expect_read_back = if budget >= 3 {
                Vec::<String>::new()
            } else {
                vec!["base/1/10".to_string()]
            };
            assert_eq!(read_back, expect_read_back, "budget {budget}");
        }
    }

    #[test]
    fn a_wrong_block_or_a_missing_base_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let full = blocks(&[1, 2]);
        let expected = blocks(&[1, 3]);
        let newest = vec![listed("base/1/10", &expected)];
        // The incremental's block 1 is not what the newest backup read.
        let wrong = blocks(&[4]);
        let rebuild = Rebuild::new(dir.path(), &newest, 8192, BLOCK_CRC_BUDGET);
        let backups = vec![
            vec![("base/1/10", Copy::Whole(&full))],
            vec![("base/1/10", Copy::Blocks(vec![(1, &wrong)]))],
        ];
        let error = apply(&rebuild, &backups).unwrap_err();
        assert!(format!("{error:#}").contains("does not match"), "{error:#}");
        assert_eq!(
            crate::error::meaning(&error),
            Some(crate::error::Meaning::Corrupt)
        );

        // A file the newest backup lists that no backup holds whole.
        let dir = tempfile::tempdir().unwrap();
        let rebuild = Rebuild::new(dir.path(), &newest, 8192, BLOCK_CRC_BUDGET);
        let only_blocks = blocks(&[3]);
        let backups = vec![vec![("base/1/10", Copy::Blocks(vec![(1, &only_blocks)]))]];
        let error = apply(&rebuild, &backups).unwrap_err();
        assert!(
            format!("{error:#}").contains("held whole by no backup"),
            "{error:#}"
        );

        // A base shorter than the file, its missing block written by nobody.
        let dir = tempfile::tempdir().unwrap();
        let rebuild = Rebuild::new(dir.path(), &newest, 8192, BLOCK_CRC_BUDGET);
        let short = blocks(&[1]);
        let backups = vec![vec![("base/1/10", Copy::Whole(&short))]];
        let error = apply(&rebuild, &backups).unwrap_err();
        assert!(format!("{error:#}").contains("block 1"), "{error:#}");
    }
}
