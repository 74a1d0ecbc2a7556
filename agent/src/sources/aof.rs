//! Redis 7's multi-part append-only file, read from the directory the sidecar shares with Redis.
//!
//! The directory holds a manifest (`appendonly.aof.manifest`) naming a base file (`.rdb` or
//! `.aof`, written once by a rewrite) and incremental files (`.incr.aof`); only the last
//! incremental file grows. A consistent copy is the manifest's base, its closed incremental
//! files whole, and the growing one up to the last complete command outside a `MULTI` block:
//! that is what Redis itself would have loaded had it stopped at that moment.

use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum AofError {
    /// The directory is not a Redis 7 AOF directory: a configuration problem.
    #[error("{0}")]
    NotAof(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a valid AOF at byte {offset}: {reason}")]
    Malformed {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
}

impl AofError {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        AofError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// A file that vanished: Redis removed it after a rewrite, so the copy starts over.
    pub fn is_not_found(&self) -> bool {
        matches!(self, AofError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AofFileType {
    Base,
    Incr,
    /// Left over from a rewrite, about to be deleted; not part of the dataset.
    History,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AofEntry {
    pub name: String,
    pub seq: u64,
    pub file_type: AofFileType,
}

/// The manifest file and what it names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AofManifest {
    /// The manifest's own file name (`<appendfilename>.manifest`).
    pub file_name: String,
    /// Its text as read, which is what "unchanged" is judged by.
    pub text: String,
    pub entries: Vec<AofEntry>,
}

impl AofManifest {
    /// Finds and reads the one `*.manifest` file in `dir`.
    pub fn read(dir: &Path) -> Result<Self, AofError> {
        let listing = std::fs::read_dir(dir).map_err(|e| AofError::io(dir, e))?;
        let mut manifests = Vec::new();
        for entry in listing {
            let entry = entry.map_err(|e| AofError::io(dir, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            // Redis writes a new manifest as `temp-<name>` and renames it into place.
            if name.ends_with(".manifest") && !name.starts_with("temp-") {
                manifests.push(name);
            }
        }
        let file_name = match manifests.as_slice() {
            [one] => one.clone(),
            [] => {
                return Err(AofError::NotAof(format!(
                    "{} has no AOF manifest (*.manifest): is it Redis 7's appenddirname with \
                     appendonly yes? Redis 6's single-file AOF is not supported",
                    dir.display()
                )));
            }
            many => {
                return Err(AofError::NotAof(format!(
                    "{} has several AOF manifests ({}); expected one",
                    dir.display(),
                    many.join(", ")
                )));
            }
        };
        let path = dir.join(&file_name);
        let text = std::fs::read_to_string(&path).map_err(|e| AofError::io(&path, e))?;
        Self::parse(file_name, text)
            .map_err(|reason| AofError::NotAof(format!("{}: {reason}", path.display())))
    }

    /// Parses Redis' `file <name> seq <n> type <b|i|h>` lines.
    pub fn parse(file_name: String, text: String) -> Result<Self, String> {
        let mut entries = Vec::new();
        for (number, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let words: Vec<&str> = line.split_whitespace().collect();
            if !words.len().is_multiple_of(2) {
                return Err(format!(
                    "line {}: '{line}' is not key/value pairs",
                    number + 1
                ));
            }
            let (mut name, mut seq, mut file_type) = (None, None, None);
            for pair in words.chunks(2) {
                match pair[0] {
                    "file" => name = Some(pair[1]),
                    "seq" => seq = pair[1].parse::<u64>().ok(),
                    "type" => {
                        file_type = match pair[1] {
                            "b" => Some(AofFileType::Base),
                            "i" => Some(AofFileType::Incr),
                            "h" => Some(AofFileType::History),
                            _ => None,
                        }
                    }
                    // Keys a later Redis may add are not ours to judge.
                    _ => {}
                }
            }
            let (Some(name), Some(seq), Some(file_type)) = (name, seq, file_type) else {
                return Err(format!(
                    "line {}: '{line}' lacks a file, seq or type",
                    number + 1
                ));
            };
            // Redis quotes names with unusual characters; ours must be plain names in the dir.
            if name.starts_with('"') || name.contains('/') || name == ".." || name == "." {
                return Err(format!(
                    "line {}: file name {name} is not a plain file name",
                    number + 1
                ));
            }
            entries.push(AofEntry {
                name: name.to_string(),
                seq,
                file_type,
            });
        }
        let bases = entries
            .iter()
            .filter(|e| e.file_type == AofFileType::Base)
            .count();
        if bases > 1 {
            return Err(format!("{bases} base files; Redis writes at most one"));
        }
        if !entries.iter().any(|e| e.file_type != AofFileType::History) {
            return Err("names no base or incremental file".to_string());
        }
        Ok(Self {
            file_name,
            text,
            entries,
        })
    }

    /// The files of the dataset, in load order: the base, then the incremental files.
    pub fn live(&self) -> impl Iterator<Item = &AofEntry> {
        let base = self
            .entries
            .iter()
            .filter(|e| e.file_type == AofFileType::Base);
        let incr = self
            .entries
            .iter()
            .filter(|e| e.file_type == AofFileType::Incr);
        base.chain(incr)
    }

    /// The manifest to restore: the live entries only, since history files are not copied.
    pub fn without_history(&self) -> String {
        let mut text = String::new();
        for line in self.text.lines() {
            let history = line
                .split_whitespace()
                .collect::<Vec<_>>()
                .windows(2)
                .any(|pair| pair == ["type", "h"]);
            if !history && !line.trim().is_empty() {
                text.push_str(line);
                text.push('\n');
            }
        }
        text
    }

    /// The incremental file Redis appends to now: the last one named.
    pub fn growing(&self) -> Option<&AofEntry> {
        self.entries
            .iter()
            .rfind(|e| e.file_type == AofFileType::Incr)
    }
}

/// Finds where an append-only stream of commands can be cut: after the last complete
/// command that is not inside a `MULTI` … `EXEC` block.
#[derive(Debug, Default)]
pub struct CommandBoundaries {
    offset: u64,
    safe_end: u64,
    state: State,
    line: Vec<u8>,
    /// Bulk strings still to come in the current command.
    args_left: u64,
    /// The first bulk string of the current command (its name), up to [`MAX_NAME`] bytes.
    name: Vec<u8>,
    reading_name: bool,
    in_multi: bool,
    /// With [`CommandBoundaries::cutting_after`]: the last second to keep.
    keep_until: Option<u64>,
    /// Where the first annotation past `keep_until` begins: the stream is cut there.
    cut: Option<u64>,
    /// The newest `#TS:` annotation not past `keep_until` (or any, without it).
    last_kept_timestamp: Option<u64>,
    first_timestamp: Option<u64>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Expecting `*` (a command) or `#` (an annotation).
    #[default]
    RecordStart,
    /// In a `*N`, `$N` or `#…` line, collecting it up to CRLF.
    Line,
    /// Inside a bulk string: this many payload bytes to go.
    Payload(u64),
    /// After a payload: this many bytes of its CRLF seen.
    PayloadEnd(usize),
}

/// Longest header line accepted (`*`/`$` with a number, or a `#TS:` annotation).
const MAX_LINE: usize = 1024;
/// Long enough for the command names that matter here (MULTI, EXEC).
const MAX_NAME: usize = 8;

impl CommandBoundaries {
    /// Also finds where the stream passes `unix_seconds`: the start of the first `#TS:`
    /// annotation (Redis 7's `aof-timestamp-enabled`) later than it, which is what
    /// `redis-check-aof --truncate-to-timestamp` cuts at.
    pub fn cutting_after(unix_seconds: u64) -> Self {
        Self {
            keep_until: Some(unix_seconds),
            ..Self::default()
        }
    }

    /// Where the stream is cut for [`Self::cutting_after`], once an annotation past it came.
    pub fn cut(&self) -> Option<u64> {
        self.cut
    }

    /// The first and the newest kept `#TS:` annotation seen, in unix seconds.
    pub fn timestamps(&self) -> (Option<u64>, Option<u64>) {
        (self.first_timestamp, self.last_kept_timestamp)
    }

    /// Bytes from the start up to the last safe cut.
    pub fn safe_end(&self) -> u64 {
        self.safe_end
    }

    /// Takes the next bytes of the stream; on malformed input returns the offset and why.
    pub fn feed(&mut self, mut bytes: &[u8]) -> Result<(), (u64, String)> {
        while let Some(&first) = bytes.first() {
            let taken = match self.state {
                State::RecordStart => {
                    if first != b'*' && first != b'#' {
                        return Err((
                            self.offset,
                            format!("expected '*' or '#', found byte {first:#04x}"),
                        ));
                    }
                    self.state = State::Line;
                    0
                }
                State::Line => {
                    let take = memchr::memchr(b'\n', bytes).map_or(bytes.len(), |i| i + 1);
                    self.line.extend_from_slice(&bytes[..take]);
                    if self.line.len() > MAX_LINE {
                        return Err((self.offset, "header line too long".to_string()));
                    }
                    if self.line.ends_with(b"\n") {
                        self.end_line(take as u64)?;
                    }
                    take
                }
                State::Payload(left) => {
                    let take = usize::try_from(left).unwrap_or(usize::MAX).min(bytes.len());
                    if self.reading_name {
                        let room = MAX_NAME.saturating_sub(self.name.len()).min(take);
                        self.name.extend_from_slice(&bytes[..room]);
                    }
                    let left = left - take as u64;
                    self.state = if left == 0 {
                        State::PayloadEnd(0)
                    } else {
                        State::Payload(left)
                    };
                    take
                }
                State::PayloadEnd(seen) => {
                    if first != b"\r\n"[seen] {
                        return Err((self.offset, "bulk string not ended by CRLF".to_string()));
                    }
                    if seen == 0 {
                        self.state = State::PayloadEnd(1);
                    } else {
                        self.reading_name = false;
                        self.args_left -= 1;
                        self.offset += 1;
                        self.after_bulk();
                        bytes = &bytes[1..];
                        continue;
                    }
                    1
                }
            };
            self.offset += taken as u64;
            bytes = &bytes[taken..];
        }
        Ok(())
    }

    /// A header line is complete; `taken` of its bytes are in the current chunk.
    fn end_line(&mut self, taken: u64) -> Result<(), (u64, String)> {
        let line = std::mem::take(&mut self.line);
        let at = self.offset + taken;
        let Some(body) = line.strip_suffix(b"\r\n") else {
            return Err((at, "header line not ended by CRLF".to_string()));
        };
        let number = || {
            std::str::from_utf8(&body[1..])
                .ok()
                .and_then(|n| n.parse::<u64>().ok())
                .ok_or_else(|| {
                    (
                        at,
                        format!("bad header '{}'", String::from_utf8_lossy(body)),
                    )
                })
        };
        match body.first() {
            // An annotation (`#TS:…`) is a record of its own.
            Some(b'#') if self.args_left == 0 => {
                self.state = State::RecordStart;
                self.annotation(body, at - line.len() as u64);
                self.record_done(at);
            }
            Some(b'*') if self.args_left == 0 => {
                self.args_left = number()?;
                self.name.clear();
                self.reading_name = true;
                self.after_header(at);
            }
            Some(b'$') if self.args_left > 0 => self.state = State::Payload(number()?),
            _ => {
                return Err((
                    at,
                    format!("unexpected header '{}'", String::from_utf8_lossy(body)),
                ));
            }
        }
        Ok(())
    }

    /// After a `*N` header: `N` bulk strings follow (or, for `*0`, nothing).
    fn after_header(&mut self, at: u64) {
        if self.args_left == 0 {
            self.state = State::RecordStart;
            self.record_done(at);
        } else {
            self.state = State::Line;
        }
    }

    /// After a bulk string: another follows, or the command is complete.
    fn after_bulk(&mut self) {
        if self.args_left > 0 {
            self.state = State::Line;
            return;
        }
        self.state = State::RecordStart;
        let name = std::mem::take(&mut self.name);
        if name.eq_ignore_ascii_case(b"MULTI") {
            self.in_multi = true;
        } else if name.eq_ignore_ascii_case(b"EXEC") {
            self.in_multi = false;
        }
        self.record_done(self.offset);
    }

    /// A `#TS:<unix seconds>` annotation that begins at `start` (other annotations are
    /// only records).
    fn annotation(&mut self, body: &[u8], start: u64) {
        let Some(seconds) = body
            .strip_prefix(b"#TS:")
            .and_then(|n| std::str::from_utf8(n).ok())
            .and_then(|n| n.parse::<u64>().ok())
        else {
            return;
        };
        self.first_timestamp.get_or_insert(seconds);
        if self.cut.is_some() {
            return;
        }
        match self.keep_until {
            // Redis writes an annotation between commands, never inside MULTI … EXEC.
            Some(limit) if seconds > limit && !self.in_multi => self.cut = Some(start),
            _ => self.last_kept_timestamp = Some(seconds),
        }
    }

    fn record_done(&mut self, end: u64) {
        if !self.in_multi {
            self.safe_end = end;
        }
    }
}

/// Feeds the first `len` bytes of `path` (fewer if it is shorter) to `each`, and returns how
/// many there were. Blocking.
fn read_prefix(
    path: &Path,
    len: u64,
    mut each: impl FnMut(&[u8]) -> Result<(), AofError>,
) -> Result<u64, AofError> {
    let file = std::fs::File::open(path).map_err(|e| AofError::io(path, e))?;
    let mut reader = file.take(len);
    let mut buffer = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        let read = reader
            .read(&mut buffer)
            .map_err(|e| AofError::io(path, e))?;
        if read == 0 {
            return Ok(total);
        }
        each(&buffer[..read])?;
        total += read as u64;
    }
}

/// Feeds the first `size` bytes of `path` through `boundaries`. Blocking.
fn scan(path: &Path, size: u64, boundaries: &mut CommandBoundaries) -> Result<(), AofError> {
    read_prefix(path, size, |chunk| {
        boundaries
            .feed(chunk)
            .map_err(|(offset, reason)| AofError::Malformed {
                path: path.to_path_buf(),
                offset,
                reason,
            })
    })?;
    Ok(())
}

/// Reads `path` up to `size` bytes and returns the length of its longest prefix that ends on
/// a safe cut (see [`CommandBoundaries`]). Blocking.
pub fn complete_prefix(path: &Path, size: u64) -> Result<u64, AofError> {
    let mut boundaries = CommandBoundaries::default();
    scan(path, size, &mut boundaries)?;
    Ok(boundaries.safe_end())
}

/// Where the AOF file at `path` passes `unix_seconds` (see [`CommandBoundaries::cutting_after`]),
/// with its first and newest kept `#TS:` annotation. Blocking.
#[allow(clippy::type_complexity)]
pub fn cut_after(
    path: &Path,
    unix_seconds: u64,
) -> Result<(Option<u64>, (Option<u64>, Option<u64>)), AofError> {
    let mut boundaries = CommandBoundaries::cutting_after(unix_seconds);
    scan(path, u64::MAX, &mut boundaries)?;
    Ok((boundaries.cut(), boundaries.timestamps()))
}

/// SHA-256 (hex) of the first `len` bytes of `path`, or `None` if it has fewer. Blocking.
pub fn sha256_prefix(path: &Path, len: u64) -> Result<Option<String>, AofError> {
    let mut hasher = Sha256::new();
    let total = read_prefix(path, len, |chunk| {
        hasher.update(chunk);
        Ok(())
    })?;
    Ok((total == len).then(|| hex::encode(hasher.finalize())))
}

#[cfg(test)]
mod tests;

/// The `ctime` aux field at the start of an RDB file (a `.base.rdb` of an AOF set): when the
/// rewrite that wrote it took its snapshot, in unix seconds. `None` when the head given does
/// not say (not an RDB, or the aux fields end first).
pub fn rdb_ctime(head: &[u8]) -> Option<u64> {
    const AUX: u8 = 0xFA;
    let mut at = head.strip_prefix(b"REDIS")?.get(4..)?;
    while at.first() == Some(&AUX) {
        let (key, rest) = rdb_string(&at[1..])?;
        let (value, rest) = rdb_string(rest)?;
        if key == RdbString::Bytes(b"ctime") {
            return match value {
                RdbString::Int(n) => u64::try_from(n).ok(),
                RdbString::Bytes(text) => std::str::from_utf8(text).ok()?.parse().ok(),
            };
        }
        at = rest;
    }
    None
}

#[derive(Debug, PartialEq, Eq)]
enum RdbString<'a> {
    Bytes(&'a [u8]),
    Int(i64),
}

/// One RDB string (length-prefixed, or an integer encoded in place), and what follows it.
fn rdb_string(bytes: &[u8]) -> Option<(RdbString<'_>, &[u8])> {
    let (&first, rest) = bytes.split_first()?;
    let (len, rest) = match first >> 6 {
        0 => (usize::from(first & 0x3F), rest),
        1 => {
            let (&second, rest) = rest.split_first()?;
            ((usize::from(first & 0x3F) << 8) | usize::from(second), rest)
        }
        2 if first == 0x80 => {
            let (len, rest) = rest.split_at_checked(4)?;
            (
                usize::try_from(u32::from_be_bytes(len.try_into().ok()?)).ok()?,
                rest,
            )
        }
        2 if first == 0x81 => {
            let (len, rest) = rest.split_at_checked(8)?;
            (
                usize::try_from(u64::from_be_bytes(len.try_into().ok()?)).ok()?,
                rest,
            )
        }
        3 => {
            let width = match first & 0x3F {
                0 => 1,
                1 => 2,
                2 => 4,
                _ => return None, // LZF-compressed: not used for aux fields of interest
            };
            let (int, rest) = rest.split_at_checked(width)?;
            let mut le = [0u8; 8];
            le[..width].copy_from_slice(int);
            let value = match width {
                1 => i64::from(i8::from_le_bytes([le[0]])),
                2 => i64::from(i16::from_le_bytes([le[0], le[1]])),
                _ => i64::from(i32::from_le_bytes([le[0], le[1], le[2], le[3]])),
            };
            return Some((RdbString::Int(value), rest));
        }
        _ => return None,
    };
    let (text, rest) = rest.split_at_checked(len)?;
    Some((RdbString::Bytes(text), rest))
}
