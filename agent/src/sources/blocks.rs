//! Block maps and block deltas: what lets an incremental base backup store only the blocks
//! whose content changed since its parent, and a restore rebuild the files from a chain.
//!
//! Change detection is by content, not by page LSN: every base backup records a BLAKE3 hash
//! (its first 16 bytes) of every block of every relation file it read, in its *block map*;
//! the next incremental reads every file again, hashes every block, and stores the blocks
//! whose hash differs from the parent's for the same file and block number, or that the
//! parent did not have. So a restored file is byte for byte what the incremental read, as a
//! full backup taken at that moment would be, whatever PostgreSQL did to the page (hint bits
//! without WAL, a truncation and re-extension, a file copied by CREATE DATABASE with old
//! LSNs). ARCHITECTURE.md ("Incremental base backups") gives the whole argument.
//!
//! Both formats are streams of records, read strictly in order and with every length bounded,
//! because they come back from the store: a damaged or hostile object is refused, never
//! trusted to size an allocation.
//!
//! ```text
//! map    := "GCBMAP1\n" block_size:u32 { file } end
//! file   := path_len:u16 (1..=4096) path size:u64 count:u32 hash[16] × count
//! end    := path_len = 0
//!
//! delta  := "GCBDLT1\n" block_size:u32 { record } 'E'
//! record := 'D' path mode:u32 mtime:u64                  a directory
//!         | 'F' path size:u64 mode:u32 mtime:u64 whole:u8 a file: its size now; whole = 1:
//!                                                        nothing of an older copy is kept
//!         | 'B' block:u32 len:u32 bytes[len]             a block of the last 'F' file
//! path   := len:u16 bytes                                relative to PGDATA
//! ```
//! All integers are little-endian.

use std::io::{Read, Write};

/// Bytes of BLAKE3 kept per block: a changed block goes unnoticed only if its new content
/// hashes to the same 128 bits as the old one (a second preimage of BLAKE3).
pub const HASH_BYTES: usize = 16;
pub type BlockHash = [u8; HASH_BYTES];

const MAP_MAGIC: &[u8; 8] = b"GCBMAP1\n";
const DELTA_MAGIC: &[u8; 8] = b"GCBDLT1\n";
/// Longer paths are not PGDATA's (its deepest are `base/<oid>/<relfilenode>_fsm.<n>`).
const MAX_PATH: usize = 4096;
/// Block sizes PostgreSQL can be built with (BLCKSZ: 1 to 32 KiB).
const BLOCK_SIZES: std::ops::RangeInclusive<u32> = 1024..=32768;

pub fn hash(block: &[u8]) -> BlockHash {
    let mut out = [0u8; HASH_BYTES];
    out.copy_from_slice(&blake3::hash(block).as_bytes()[..HASH_BYTES]);
    out
}

/// True for the files of relations: `base/<db>/` or `global/` followed by a relfilenode,
/// a fork suffix and a segment number (`16384`, `16384_fsm`, `16384_vm.2`). These are
/// compared block by block; every other file is small and stored whole in every backup.
pub fn is_relation_file(path: &str) -> bool {
    let name = match path.split('/').collect::<Vec<_>>().as_slice() {
        ["base", db, name] if all_digits(db) => *name,
        ["global", name] => *name,
        _ => return false,
    };
    let (stem, segment) = match name.split_once('.') {
        Some((stem, segment)) => (stem, Some(segment)),
        None => (name, None),
    };
    let node = ["_fsm", "_vm", "_init"]
        .iter()
        .find_map(|fork| stem.strip_suffix(fork))
        .unwrap_or(stem);
    all_digits(node) && segment.is_none_or(all_digits)
}

fn all_digits(text: &str) -> bool {
    !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit())
}

/// Blocks in a file of `size` bytes (the last one may be short).
pub fn blocks_in(size: u64, block_size: u32) -> u64 {
    size.div_ceil(u64::from(block_size))
}

/// One file of a block map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileMap {
    pub path: String,
    pub size: u64,
    pub hashes: Vec<BlockHash>,
}

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// Not what the writer wrote: damaged, cut short, or not one of these streams at all.
    #[error("{0}")]
    Invalid(String),
}

fn invalid(what: impl Into<String>) -> BlockError {
    BlockError::Invalid(what.into())
}

fn write_path(out: &mut impl Write, path: &str) -> std::io::Result<()> {
    let len = u16::try_from(path.len())
        .ok()
        .filter(|len| (1..=MAX_PATH as u16).contains(len))
        .ok_or_else(|| std::io::Error::other(format!("path of {} bytes", path.len())))?;
    out.write_all(&len.to_le_bytes())?;
    out.write_all(path.as_bytes())
}

/// Writes a block map.
#[derive(Debug)]
pub struct MapWriter<W: Write> {
    out: W,
}

impl<W: Write> MapWriter<W> {
    pub fn new(mut out: W, block_size: u32) -> std::io::Result<Self> {
        out.write_all(MAP_MAGIC)?;
        out.write_all(&block_size.to_le_bytes())?;
        Ok(Self { out })
    }

    pub fn write(&mut self, file: &FileMap) -> std::io::Result<()> {
        write_path(&mut self.out, &file.path)?;
        self.out.write_all(&file.size.to_le_bytes())?;
        let count = u32::try_from(file.hashes.len()).map_err(std::io::Error::other)?;
        self.out.write_all(&count.to_le_bytes())?;
        for hash in &file.hashes {
            self.out.write_all(hash)?;
        }
        Ok(())
    }

    pub fn finish(mut self) -> std::io::Result<W> {
        self.out.write_all(&0u16.to_le_bytes())?;
        self.out.flush()?;
        Ok(self.out)
    }
}

/// Reads a block map written by [`MapWriter`], file by file.
#[derive(Debug)]
pub struct MapReader<R: Read> {
    input: std::io::BufReader<R>,
    block_size: u32,
    done: bool,
}

impl<R: Read> MapReader<R> {
    pub fn new(input: R) -> Result<Self, BlockError> {
        let mut input = buffered(input);
        let mut magic = [0u8; 8];
        read_exact(&mut input, &mut magic, "the block map's header")?;
        if &magic != MAP_MAGIC {
            return Err(invalid("not a gc-backup block map"));
        }
        let block_size = read_block_size(&mut input)?;
        Ok(Self {
            input,
            block_size,
            done: false,
        })
    }

    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    /// The next file, or `None` after the end marker.
    pub fn next_file(&mut self) -> Result<Option<FileMap>, BlockError> {
        if self.done {
            return Ok(None);
        }
        let Some(path) = read_path(&mut self.input, true)? else {
            self.done = true;
            return Ok(None);
        };
        let size = u64::from_le_bytes(read_array(&mut self.input, "a file's size")?);
        let count = u32::from_le_bytes(read_array(&mut self.input, "a block count")?);
        if u64::from(count) != blocks_in(size, self.block_size) {
            return Err(invalid(format!(
                "the block map gives {path} {count} blocks for {size} bytes"
            )));
        }
        // Grown as hashes arrive, so a damaged count cannot reserve memory by itself.
        let mut hashes = Vec::with_capacity((count as usize).min(1 << 16));
        for _ in 0..count {
            hashes.push(read_array(&mut self.input, "a block hash")?);
        }
        Ok(Some(FileMap { path, size, hashes }))
    }
}

/// Records are read a few bytes at a time (a 16-byte hash, a 4-byte block number): straight
/// from the download's pipe that was a system call each, 386,000 for the bench cluster's map.
fn buffered<R: Read>(input: R) -> std::io::BufReader<R> {
    std::io::BufReader::with_capacity(1 << 16, input)
}

fn read_exact(input: &mut impl Read, buf: &mut [u8], what: &str) -> Result<(), BlockError> {
    input.read_exact(buf).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            invalid(format!("cut short in {what}"))
        } else {
            BlockError::Io(e)
        }
    })
}

fn read_array<const N: usize>(input: &mut impl Read, what: &str) -> Result<[u8; N], BlockError> {
    let mut buf = [0u8; N];
    read_exact(input, &mut buf, what)?;
    Ok(buf)
}

fn read_block_size(input: &mut impl Read) -> Result<u32, BlockError> {
    let block_size = u32::from_le_bytes(read_array(input, "the block size")?);
    if !BLOCK_SIZES.contains(&block_size) || !block_size.is_power_of_two() {
        return Err(invalid(format!("block size {block_size}")));
    }
    Ok(block_size)
}

/// A path as written by [`write_path`]; with `end_allowed`, a zero length is the end marker.
/// Refuses what could leave the data directory: absolute paths, `..`, empty components.
fn read_path(input: &mut impl Read, end_allowed: bool) -> Result<Option<String>, BlockError> {
    let len = u16::from_le_bytes(read_array(input, "a path's length")?) as usize;
    if len == 0 && end_allowed {
        return Ok(None);
    }
    if !(1..=MAX_PATH).contains(&len) {
        return Err(invalid(format!("a path of {len} bytes")));
    }
    let mut bytes = vec![0u8; len];
    read_exact(input, &mut bytes, "a path")?;
    let path = String::from_utf8(bytes).map_err(|_| invalid("a path that is not UTF-8"))?;
    let safe = !path.starts_with('/')
        && !path.contains('\0')
        && path
            .split('/')
            .all(|part| !part.is_empty() && part != ".." && part != ".");
    if !safe {
        return Err(invalid(format!(
            "{path:?}, a path outside the data directory"
        )));
    }
    Ok(Some(path))
}

/// One record of a delta stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    Dir {
        path: String,
        mode: u32,
        mtime: u64,
    },
    File {
        path: String,
        size: u64,
        mode: u32,
        mtime: u64,
        whole: bool,
    },
    Block {
        number: u32,
        bytes: Vec<u8>,
    },
}

/// Writes a delta stream.
#[derive(Debug)]
pub struct DeltaWriter<W: Write> {
    out: W,
}

impl<W: Write> DeltaWriter<W> {
    pub fn new(mut out: W, block_size: u32) -> std::io::Result<Self> {
        out.write_all(DELTA_MAGIC)?;
        out.write_all(&block_size.to_le_bytes())?;
        Ok(Self { out })
    }

    pub fn dir(&mut self, path: &str, mode: u32, mtime: u64) -> std::io::Result<()> {
        self.out.write_all(b"D")?;
        write_path(&mut self.out, path)?;
        self.out.write_all(&mode.to_le_bytes())?;
        self.out.write_all(&mtime.to_le_bytes())
    }

    pub fn file(
        &mut self,
        path: &str,
        size: u64,
        mode: u32,
        mtime: u64,
        whole: bool,
    ) -> std::io::Result<()> {
        self.out.write_all(b"F")?;
        write_path(&mut self.out, path)?;
        self.out.write_all(&size.to_le_bytes())?;
        self.out.write_all(&mode.to_le_bytes())?;
        self.out.write_all(&mtime.to_le_bytes())?;
        self.out.write_all(&[u8::from(whole)])
    }

    pub fn block(&mut self, number: u32, bytes: &[u8]) -> std::io::Result<()> {
        let len = u32::try_from(bytes.len()).map_err(std::io::Error::other)?;
        self.out.write_all(b"B")?;
        self.out.write_all(&number.to_le_bytes())?;
        self.out.write_all(&len.to_le_bytes())?;
        self.out.write_all(bytes)
    }

    pub fn finish(mut self) -> std::io::Result<W> {
        self.out.write_all(b"E")?;
        self.out.flush()?;
        Ok(self.out)
    }
}

/// Reads a delta stream record by record. Checks the structure (a block follows a file, lies
/// inside its size, is at most one block long); what the records say is the caller's to check.
#[derive(Debug)]
pub struct DeltaReader<R: Read> {
    input: std::io::BufReader<R>,
    block_size: u32,
    /// The size of the last file record, for its blocks.
    file_size: Option<u64>,
    done: bool,
}

impl<R: Read> DeltaReader<R> {
    pub fn new(input: R) -> Result<Self, BlockError> {
        let mut input = buffered(input);
        let mut magic = [0u8; 8];
        read_exact(&mut input, &mut magic, "the delta stream's header")?;
        if &magic != DELTA_MAGIC {
            return Err(invalid("not a gc-backup delta stream"));
        }
        let block_size = read_block_size(&mut input)?;
        Ok(Self {
            input,
            block_size,
            file_size: None,
            done: false,
        })
    }

    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    /// Hands the (buffered) reader back, for draining what follows a failure.
    pub fn into_inner(self) -> std::io::BufReader<R> {
        self.input
    }

    /// The next record, or `None` after the end record.
    pub fn next_record(&mut self) -> Result<Option<Record>, BlockError> {
        if self.done {
            return Ok(None);
        }
        let [tag] = read_array(&mut self.input, "a record's type")?;
        let record = match tag {
            b'D' => {
                let path = read_path(&mut self.input, false)?.unwrap_or_default();
                self.file_size = None;
                Record::Dir {
                    path,
                    mode: u32::from_le_bytes(read_array(&mut self.input, "a mode")?),
                    mtime: u64::from_le_bytes(read_array(&mut self.input, "a time")?),
                }
            }
            b'F' => {
                let path = read_path(&mut self.input, false)?.unwrap_or_default();
                let size = u64::from_le_bytes(read_array(&mut self.input, "a file's size")?);
                let mode = u32::from_le_bytes(read_array(&mut self.input, "a mode")?);
                let mtime = u64::from_le_bytes(read_array(&mut self.input, "a time")?);
                let [whole] = read_array(&mut self.input, "a file's flag")?;
                if whole > 1 {
                    return Err(invalid(format!("flag {whole} for {path}")));
                }
                self.file_size = Some(size);
                Record::File {
                    path,
                    size,
                    mode,
                    mtime,
                    whole: whole == 1,
                }
            }
            b'B' => {
                let Some(size) = self.file_size else {
                    return Err(invalid("a block outside any file"));
                };
                let number = u32::from_le_bytes(read_array(&mut self.input, "a block number")?);
                let len = u32::from_le_bytes(read_array(&mut self.input, "a block length")?);
                let start = u64::from(number) * u64::from(self.block_size);
                if len == 0 || len > self.block_size || start + u64::from(len) > size {
                    return Err(invalid(format!(
                        "block {number} of {len} bytes in a file of {size} bytes"
                    )));
                }
                let mut bytes = vec![0u8; len as usize];
                read_exact(&mut self.input, &mut bytes, "a block")?;
                Record::Block { number, bytes }
            }
            b'E' => {
                self.done = true;
                return Ok(None);
            }
            other => return Err(invalid(format!("record type {other:#04x}"))),
        };
        Ok(Some(record))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relation_files_are_told_from_the_rest() {
        for path in [
            "base/5/16384",
            "base/5/16384.1",
            "base/5/16384_fsm",
            "base/5/16384_vm",
            "base/5/16384_init",
            "base/1/1259",
            "global/1262",
            "global/1262_vm.12",
        ] {
            assert!(is_relation_file(path), "{path}");
        }
        for path in [
            "base/5/pg_filenode.map",
            "base/5/PG_VERSION",
            "global/pg_control",
            "global/pg_filenode.map",
            "pg_xact/0000",
            "pg_multixact/offsets/0000",
            "base/5/16384_fsm_x",
            "base/5/16384.",
            "base/x/16384",
            "base/5",
            "base/5/6/7",
            "postgresql.conf",
        ] {
            assert!(!is_relation_file(path), "{path}");
        }
    }

    #[test]
    fn a_map_reads_back_as_written_and_cut_short_is_refused() {
        let files = vec![
            FileMap {
                path: "base/5/16384".into(),
                size: 3 * 8192 + 100,
                hashes: vec![hash(b"a"), hash(b"b"), hash(b"c"), hash(b"d")],
            },
            FileMap {
                path: "global/1262".into(),
                size: 0,
                hashes: vec![],
            },
        ];
        let mut writer = MapWriter::new(Vec::new(), 8192).unwrap();
        for file in &files {
            writer.write(file).unwrap();
        }
        let bytes = writer.finish().unwrap();
        let mut reader = MapReader::new(&bytes[..]).unwrap();
        assert_eq!(reader.block_size(), 8192);
        let mut read = Vec::new();
        while let Some(file) = reader.next_file().unwrap() {
            read.push(file);
        }
        assert_eq!(read, files);
        let cut = &bytes[..bytes.len() - 1];
        let mut reader = MapReader::new(cut).unwrap();
        let result: Result<Vec<_>, _> =
            std::iter::from_fn(|| reader.next_file().transpose()).collect::<Result<Vec<_>, _>>();
        assert!(matches!(result, Err(BlockError::Invalid(_))), "{result:?}");
    }

    #[test]
    fn a_delta_reads_back_and_its_blocks_stay_inside_their_file() {
        let mut writer = DeltaWriter::new(Vec::new(), 8192).unwrap();
        writer.dir("base/5", 0o700, 1).unwrap();
        writer
            .file("base/5/16384", 8192 + 10, 0o600, 2, false)
            .unwrap();
        writer.block(1, &[7u8; 10]).unwrap();
        let bytes = writer.finish().unwrap();
        let mut reader = DeltaReader::new(&bytes[..]).unwrap();
        let mut records = Vec::new();
        while let Some(record) = reader.next_record().unwrap() {
            records.push(record);
        }
        assert_eq!(records.len(), 3);
        assert_eq!(
            records[2],
            Record::Block {
                number: 1,
                bytes: vec![7; 10]
            }
        );

        let mut writer = DeltaWriter::new(Vec::new(), 8192).unwrap();
        writer.file("base/5/16384", 8192, 0o600, 2, false).unwrap();
        writer.block(1, &[7u8; 10]).unwrap();
        let bytes = writer.finish().unwrap();
        let mut reader = DeltaReader::new(&bytes[..]).unwrap();
        reader.next_record().unwrap();
        assert!(matches!(reader.next_record(), Err(BlockError::Invalid(_))));
    }

    #[test]
    fn paths_that_leave_the_directory_are_refused() {
        for path in ["../x", "/etc/passwd", "base//x", "base/./x", "a/../../b"] {
            let mut bytes = DELTA_MAGIC.to_vec();
            bytes.extend(8192u32.to_le_bytes());
            bytes.push(b'D');
            bytes.extend(u16::try_from(path.len()).unwrap().to_le_bytes());
            bytes.extend(path.as_bytes());
            bytes.extend([0u8; 12]);
            bytes.push(b'E');
            let mut reader = DeltaReader::new(&bytes[..]).unwrap();
            assert!(
                matches!(reader.next_record(), Err(BlockError::Invalid(_))),
                "{path}"
            );
        }
    }

    proptest::proptest! {
        /// Both formats come from the store: any bytes are read or refused, never a panic or
        /// an allocation sized by the input.
        #[test]
        fn any_bytes_are_refused_or_read(tail in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            for magic in [MAP_MAGIC, DELTA_MAGIC] {
                let mut bytes = magic.to_vec();
                bytes.extend(8192u32.to_le_bytes());
                bytes.extend(&tail);
                if let Ok(mut reader) = MapReader::new(&bytes[..]) {
                    while let Ok(Some(_)) = reader.next_file() {}
                }
                if let Ok(mut reader) = DeltaReader::new(&bytes[..]) {
                    while let Ok(Some(_)) = reader.next_record() {}
                }
            }
        }
    }
}
