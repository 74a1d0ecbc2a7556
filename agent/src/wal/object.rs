//! The stored form of one WAL file: compressed as it is read (1 MiB frames), held in memory
//! compressed for its one PUT, and self-describing, so that a duplicate push or a fetch can check content without a
//! manifest or store metadata.
//!
//! ```text
//! [zstd skippable frame: magic 0x184D2A5B, length 45, "GCBW", version 1, raw size u64 LE,
//!  SHA-256 of the raw bytes][zstd frames of 1 MiB raw each, with content checksums]
//! ```
//!
//! zstd itself skips the first frame; we read it to know what the rest must decompress to.

use bytes::{BufMut, Bytes};
use sha2::{Digest, Sha256};

/// Bytes before the zstd frame: the skippable frame's magic, length and payload.
pub const HEADER_LEN: usize = 8 + PAYLOAD_LEN;
const PAYLOAD_LEN: usize = 4 + 1 + 8 + 32;
const SKIPPABLE_MAGIC: u32 = 0x184D_2A5B;
const TAG: &[u8; 4] = b"GCBW";
const VERSION: u8 = 1;

/// What the header says the object holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalHeader {
    pub raw_size: u64,
    pub sha256: [u8; 32],
}

impl WalHeader {
    pub fn of(raw: &[u8]) -> Self {
        Self {
            raw_size: raw.len() as u64,
            sha256: Sha256::digest(raw).into(),
        }
    }

    pub fn sha256_hex(&self) -> String {
        hex::encode(self.sha256)
    }

    /// The header an encrypted object's description gives (see `crate::seal`).
    pub fn from_hex(raw_size: u64, sha256: &str) -> Option<Self> {
        let mut digest = [0u8; 32];
        hex::decode_to_slice(sha256, &mut digest).ok()?;
        Some(Self {
            raw_size,
            sha256: digest,
        })
    }

    /// Parses the first [`HEADER_LEN`] bytes of a stored WAL object.
    pub fn parse(stored: &[u8]) -> Result<Self, String> {
        let header = stored
            .get(..HEADER_LEN)
            .ok_or_else(|| format!("{} bytes is too short for a WAL object", stored.len()))?;
        let word = |at: usize| {
            u32::from_le_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]])
        };
        if word(0) != SKIPPABLE_MAGIC || word(4) as usize != PAYLOAD_LEN || &header[8..12] != TAG {
            return Err("not a gc-backup WAL object (bad header)".to_string());
        }
        if header[12] != VERSION {
            return Err(format!(
                "WAL object version {} is not known to this gc-backup",
                header[12]
            ));
        }
        let mut size = [0u8; 8];
        size.copy_from_slice(&header[13..21]);
        let mut sha256 = [0u8; 32];
        sha256.copy_from_slice(&header[21..53]);
        Ok(Self {
            raw_size: u64::from_le_bytes(size),
            sha256,
        })
    }
}

/// Compresses `raw` into the stored form. CPU-bound: call from a blocking thread.
/// Raw bytes compressed as one frame when a WAL file is encoded as it is read.
const WAL_FRAME: usize = MIB;
const MIB: usize = 1 << 20;

/// [`encode`] of what `reader` yields, without holding the raw file: it is read and
/// compressed 1 MiB frame by frame, so memory is the compressed object and one frame (a
/// switched segment, mostly zeros, is a few KiB) instead of the whole segment as well.
/// `workers > 0` keeps zstd's multi-threaded streaming encoder, fed the same way.
pub fn encode_read(
    mut reader: impl std::io::Read,
    level: i32,
    workers: u32,
) -> std::io::Result<(WalHeader, Bytes)> {
    let mut hasher = Sha256::new();
    let mut raw_size = 0u64;
    let mut chunk = vec![0u8; WAL_FRAME];
    // Every frame of raw bytes is hashed, counted, then handed to `compress`.
    let mut frames = |compress: &mut dyn FnMut(&[u8]) -> std::io::Result<()>| loop {
        let n = read_full(&mut reader, &mut chunk)?;
        if n == 0 {
            return Ok::<(), std::io::Error>(());
        }
        hasher.update(&chunk[..n]);
        raw_size += n as u64;
        compress(&chunk[..n])?;
    };
    let mut stored = std::io::Cursor::new(vec![0u8; HEADER_LEN]);
    stored.set_position(HEADER_LEN as u64);
    if workers == 0 {
        let mut compressor = zstd::bulk::Compressor::new(level)?;
        compressor.include_checksum(true)?;
        frames(&mut |raw| {
            let end = stored.get_ref().len();
            stored
                .get_mut()
                .reserve(zstd::zstd_safe::compress_bound(raw.len()));
            stored.set_position(end as u64);
            compressor.compress_to_buffer(raw, &mut stored).map(drop)
        })?;
    } else {
        let mut encoder = zstd::stream::write::Encoder::new(&mut stored, level)?;
        encoder.include_checksum(true)?;
        encoder.multithread(workers)?;
        frames(&mut |raw| std::io::Write::write_all(&mut encoder, raw))?;
        encoder.finish()?;
    }
    let header = WalHeader {
        raw_size,
        sha256: hasher.finalize().into(),
    };
    let mut stored = stored.into_inner();
    header.write_to(&mut stored[..HEADER_LEN]);
    Ok((header, Bytes::from(stored)))
}

impl WalHeader {
    /// The skippable frame that starts a stored WAL object, into its first [`HEADER_LEN`] bytes.
    fn write_to(&self, mut prefix: &mut [u8]) {
        prefix.put_u32_le(SKIPPABLE_MAGIC);
        prefix.put_u32_le(PAYLOAD_LEN as u32);
        prefix.put_slice(TAG);
        prefix.put_u8(VERSION);
        prefix.put_u64_le(self.raw_size);
        prefix.put_slice(&self.sha256);
    }
}

/// The stored form of WAL that arrives in pieces (the WAL receiver's segment as it streams
/// in): each full 1 MiB frame is hashed and compressed as it completes, so what is held is
/// the compressed frames and less than one frame of raw bytes, never the raw segment.
#[derive(Debug)]
pub struct FrameEncoder {
    level: i32,
    hasher: Sha256,
    /// The header's room, then the compressed frames.
    stored: Vec<u8>,
    frame: Vec<u8>,
    raw_size: u64,
}

impl FrameEncoder {
    pub fn new(level: i32) -> Self {
        Self {
            level,
            hasher: Sha256::new(),
            stored: vec![0u8; HEADER_LEN],
            frame: Vec::with_capacity(WAL_FRAME),
            raw_size: 0,
        }
    }

    /// Takes raw bytes up to the end of the current frame; returns how many it took. When the
    /// frame is then full, [`Self::compress_frame`] must run before more is taken.
    pub fn take(&mut self, raw: &[u8]) -> usize {
        let n = raw.len().min(WAL_FRAME - self.frame.len());
        self.frame.extend_from_slice(&raw[..n]);
        n
    }

    /// Bytes it holds: the compressed frames and the frame being filled.
    pub fn held(&self) -> usize {
        self.stored.len() + self.frame.len()
    }

    pub fn frame_is_full(&self) -> bool {
        self.frame.len() == WAL_FRAME
    }

    /// Hashes and compresses the frame taken so far. CPU-bound: call from a blocking thread.
    pub fn compress_frame(&mut self) -> std::io::Result<()> {
        if self.frame.is_empty() {
            return Ok(());
        }
        self.hasher.update(&self.frame);
        self.raw_size += self.frame.len() as u64;
        let mut compressor = zstd::bulk::Compressor::new(self.level)?;
        compressor.include_checksum(true)?;
        let end = self.stored.len();
        self.stored
            .reserve(zstd::zstd_safe::compress_bound(self.frame.len()));
        let mut cursor = std::io::Cursor::new(&mut self.stored);
        cursor.set_position(end as u64);
        compressor.compress_to_buffer(&self.frame, &mut cursor)?;
        self.frame.clear();
        Ok(())
    }

    /// The stored form of everything taken, sealed to `seal` when given. CPU-bound.
    pub fn finish(
        mut self,
        seal: Option<&crate::seal::Recipients>,
    ) -> std::io::Result<(WalHeader, Bytes)> {
        self.compress_frame()?;
        let header = WalHeader {
            raw_size: self.raw_size,
            sha256: self.hasher.finalize().into(),
        };
        header.write_to(&mut self.stored[..HEADER_LEN]);
        let stored = Bytes::from(self.stored);
        Ok((header, seal_stored(&header, stored, seal)?))
    }
}

/// `stored` (a whole clear WAL object) encrypted to `seal`, or as it is without recipients.
pub fn seal_stored(
    header: &WalHeader,
    stored: Bytes,
    seal: Option<&crate::seal::Recipients>,
) -> std::io::Result<Bytes> {
    let Some(recipients) = seal else {
        return Ok(stored);
    };
    let mut sealed = Vec::with_capacity(stored.len() + 1024);
    let mut writer = recipients.seal_wal(&mut sealed, header)?;
    std::io::Write::write_all(&mut writer, &stored)?;
    writer.finish()?;
    Ok(Bytes::from(sealed))
}

/// The stored form of the WAL file at `path`, encrypted to `seal` when given: what `wal-push`
/// uploads. CPU-bound: call from a blocking thread.
///
/// Two threads, since PostgreSQL waits for this: this one reads and compresses frame by frame;
/// a second one reads the file again and hashes it (SHA-256 of 16 MiB is a third of the work of
/// zstd -1) and, sealed, then encrypts the compressed frames as they come. The age header that
/// describes the content must come before them, so without the early hash encryption could only
/// start after compression. Both threads count a CRC-32C of what they read: a file that changed
/// between the two reads is an error, never a header that does not match its frames.
pub fn encode_file(
    path: &std::path::Path,
    level: i32,
    workers: u32,
    seal: Option<&crate::seal::Recipients>,
) -> std::io::Result<(WalHeader, Bytes)> {
    if workers > 0 {
        // zstd's own threads already use the cores: one pass, then encryption.
        let (header, stored) = encode_read(std::fs::File::open(path)?, level, workers)?;
        return Ok((header, seal_stored(&header, stored, seal)?));
    }
    // Room for every frame of the file: the compressor must never wait for the hashing (the
    // frames are the compressed object, which is held whole for its PUT anyway).
    let frame_count = std::fs::metadata(path)?.len().div_ceil(WAL_FRAME as u64) as usize;
    std::thread::scope(|scope| {
        let (frames, compressed) = std::sync::mpsc::sync_channel::<Vec<u8>>(frame_count + 1);
        let hashing = scope.spawn(move || hash_then_seal(path, seal, compressed));
        let mut reader = std::fs::File::open(path)?;
        let mut compressor = zstd::bulk::Compressor::new(level)?;
        compressor.include_checksum(true)?;
        let mut chunk = vec![0u8; WAL_FRAME];
        let mut crc = 0u32;
        let mut raw_size = 0u64;
        // Clear: the frames follow a header written once the hash is known.
        let mut stored = if seal.is_none() {
            vec![0u8; HEADER_LEN]
        } else {
            Vec::new()
        };
        let compressing = (|| loop {
            let n = read_full(&mut reader, &mut chunk)?;
            if n == 0 {
                return Ok::<(), std::io::Error>(());
            }
            crc = crc32c::crc32c_append(crc, &chunk[..n]);
            raw_size += n as u64;
            if seal.is_none() {
                let end = stored.len();
                stored.reserve(zstd::zstd_safe::compress_bound(n));
                let mut cursor = std::io::Cursor::new(&mut stored);
                cursor.set_position(end as u64);
                compressor.compress_to_buffer(&chunk[..n], &mut cursor)?;
            } else {
                let frame = compressor.compress(&chunk[..n])?;
                if frames.send(frame).is_err() {
                    // The other thread failed; its error is the one to report.
                    return Ok(());
                }
            }
        })();
        drop(frames);
        let hashed = hashing
            .join()
            .map_err(|_| std::io::Error::other("the WAL hashing thread panicked"))?;
        compressing?;
        let (header, other_crc, sealed) = hashed?;
        if other_crc != crc || header.raw_size != raw_size {
            return Err(std::io::Error::other(format!(
                "{} changed while it was read ({raw_size} then {} bytes)",
                path.display(),
                header.raw_size
            )));
        }
        match sealed {
            Some(sealed) => Ok((header, Bytes::from(sealed))),
            None => {
                header.write_to(&mut stored[..HEADER_LEN]);
                Ok((header, Bytes::from(stored)))
            }
        }
    })
}

/// The second thread of [`encode_file`]: the file's header and CRC-32C and, sealed, the age file
/// of the header and the frames that arrive on `compressed`.
fn hash_then_seal(
    path: &std::path::Path,
    seal: Option<&crate::seal::Recipients>,
    compressed: std::sync::mpsc::Receiver<Vec<u8>>,
) -> std::io::Result<(WalHeader, u32, Option<Vec<u8>>)> {
    let mut reader = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut chunk = vec![0u8; WAL_FRAME];
    let mut crc = 0u32;
    let mut raw_size = 0u64;
    loop {
        let n = read_full(&mut reader, &mut chunk)?;
        if n == 0 {
            break;
        }
        hasher.update(&chunk[..n]);
        crc = crc32c::crc32c_append(crc, &chunk[..n]);
        raw_size += n as u64;
    }
    drop(chunk);
    let header = WalHeader {
        raw_size,
        sha256: hasher.finalize().into(),
    };
    let Some(recipients) = seal else {
        return Ok((header, crc, None));
    };
    let mut sealed = Vec::with_capacity((raw_size / 2) as usize);
    let mut writer = recipients.seal_wal(&mut sealed, &header)?;
    let mut prefix = [0u8; HEADER_LEN];
    header.write_to(&mut prefix);
    std::io::Write::write_all(&mut writer, &prefix)?;
    for frame in compressed {
        std::io::Write::write_all(&mut writer, &frame)?;
    }
    writer.finish()?;
    Ok((header, crc, Some(sealed)))
}

/// Fills `buf` as far as the reader goes; fewer bytes only at its end.
pub(crate) fn read_full(reader: &mut impl std::io::Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// A WAL file's stored form from its bytes in memory (see [`encode_read`]).
pub fn encode(raw: &[u8], level: i32, workers: u32) -> std::io::Result<(WalHeader, Bytes)> {
    encode_read(raw, level, workers)
}

/// PostgreSQL's largest `wal_segment_size`.
const MAX_WAL_FILE: u64 = 1 << 30;
/// Up to this size a WAL file is decompressed in one call into a buffer of its size.
const BULK_DECODE_LIMIT: u64 = 64 << 20;

/// Decompresses a stored WAL object and checks it against its header.
pub fn decode(stored: &[u8]) -> Result<Vec<u8>, String> {
    let header = WalHeader::parse(stored)?;
    // The header is outside input: never allocate what it claims beyond the largest WAL file
    // PostgreSQL can write, and above the usual sizes only as the data really decompresses.
    if header.raw_size > MAX_WAL_FILE {
        return Err(format!(
            "claims {} bytes, more than any WAL file ({MAX_WAL_FILE})",
            header.raw_size
        ));
    }
    let compressed = &stored[HEADER_LEN..];
    let raw = if header.raw_size <= BULK_DECODE_LIMIT {
        zstd::bulk::decompress(compressed, header.raw_size as usize)
            .map_err(|e| format!("does not decompress: {e}"))?
    } else {
        use std::io::Read;
        let mut raw = Vec::with_capacity(BULK_DECODE_LIMIT as usize);
        zstd::stream::read::Decoder::new(compressed)
            .and_then(|decoder| decoder.take(header.raw_size + 1).read_to_end(&mut raw))
            .map_err(|e| format!("does not decompress: {e}"))?;
        raw
    };
    if WalHeader::of(&raw) != header {
        return Err(format!(
            "fails its check: decompresses to {} bytes that do not match the SHA-256 {} of its header",
            raw.len(),
            header.sha256_hex()
        ));
    }
    Ok(raw)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::noise;

    #[test]
    fn encode_then_decode_gives_back_the_segment() {
        let mut segment = vec![0u8; 16 << 20];
        segment[..1 << 20].copy_from_slice(&noise(1 << 20, 5));
        let (header, stored) = encode(&segment, 1, 0).unwrap();
        assert!(stored.len() < segment.len() / 8, "zeros compress");
        assert_eq!(WalHeader::parse(&stored).unwrap(), header);
        assert_eq!(decode(&stored).unwrap(), segment);
        // zstd alone reads it too: the header is a skippable frame.
        assert_eq!(zstd::decode_all(&stored[..]).unwrap(), segment);
    }

    #[test]
    fn a_file_encoded_on_two_threads_is_the_same_object_clear_or_sealed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("000000010000000000000003");
        let mut segment = vec![0u8; 16 << 20];
        segment[..3 << 20].copy_from_slice(&noise(3 << 20, 11));
        std::fs::write(&path, &segment).unwrap();
        let (header, stored) = encode_file(&path, 1, 0, None).unwrap();
        assert_eq!(header, WalHeader::of(&segment));
        assert_eq!(decode(&stored).unwrap(), segment);

        let (secret, public) = crate::seal::tests::key_pair();
        let recipients = crate::seal::Recipients::parse(&[public]).unwrap().unwrap();
        let (sealed_header, sealed) = encode_file(&path, 1, 0, Some(&recipients)).unwrap();
        assert_eq!(sealed_header, header);
        assert_eq!(
            crate::seal::wal_description(&sealed),
            Some((header.raw_size, header.sha256_hex()))
        );
        let opened = crate::seal::tests::identities(dir.path(), &secret)
            .open_all(&sealed, "wal")
            .unwrap();
        assert!(
            opened == stored,
            "sealed, the clear stored form is what is encrypted"
        );
        // With zstd workers: one pass, then sealed the same way.
        let (_, threaded) = encode_file(&path, 3, 1, Some(&recipients)).unwrap();
        let opened = crate::seal::tests::identities(dir.path(), &secret)
            .open_all(&threaded, "wal")
            .unwrap();
        assert!(decode(&opened).unwrap() == segment);
        assert!(encode_file(&dir.path().join("absent"), 1, 0, None).is_err());
    }

    #[test]
    fn damage_anywhere_is_caught() {
        let segment = noise(1 << 20, 9);
        let (_, stored) = encode(&segment, 1, 0).unwrap();
        for at in [0, 30, HEADER_LEN + 10, stored.len() / 2, stored.len() - 1] {
            let mut bad = stored.to_vec();
            bad[at] ^= 0x10;
            assert!(decode(&bad).is_err(), "flip at {at} went unnoticed");
        }
        assert!(decode(&stored[..stored.len() - 5]).is_err());
        assert!(WalHeader::parse(b"short").is_err());
    }

    mod outside_input {
        use super::*;
        use proptest::prelude::*;

        #[test]
        fn a_header_that_claims_a_huge_size_allocates_nothing_of_it() {
            let (_, stored) = encode(b"segment", 1, 0).unwrap();
            let mut forged = stored.to_vec();
            forged[13..21].copy_from_slice(&(1u64 << 50).to_le_bytes());
            assert!(
                decode(&forged)
                    .unwrap_err()
                    .contains("more than any WAL file")
            );
            forged[13..21].copy_from_slice(&(512u64 << 20).to_le_bytes());
            assert!(
                decode(&forged).is_err(),
                "a short stream that claims 512 MiB"
            );
        }

        proptest! {
            #[test]
            fn any_stored_bytes_decode_or_are_refused(
                bytes in proptest::collection::vec(any::<u8>(), 0..512),
                with_header in any::<bool>(),
            ) {
                let mut stored = bytes;
                if with_header {
                    let (_, real) = encode(b"x", 1, 0).unwrap();
                    stored.splice(0..0, real[..HEADER_LEN].iter().copied());
                }
                let _ = WalHeader::parse(&stored);
                // Random bytes never decode to content that matches a header's SHA-256.
                prop_assert!(decode(&stored).is_err());
            }
        }
    }

    #[test]
    fn a_file_encoded_as_it_is_read_decodes_to_the_same_bytes_and_header() {
        for size in [0, 1, WAL_FRAME - 1, WAL_FRAME, 3 * WAL_FRAME + 17, 16 << 20] {
            let raw = noise(size, size as u64);
            let (header, stored) = encode_read(&raw[..], 1, 0).unwrap();
            assert_eq!(header, WalHeader::of(&raw));
            assert_eq!(WalHeader::parse(&stored).unwrap(), header);
            assert!(decode(&stored).unwrap() == raw, "{size} bytes");
            // zstd alone reads it too: skippable frame, then frames.
            assert!(zstd::decode_all(&stored[..]).unwrap() == raw);
        }
        let raw = noise(3 << 20, 9);
        let (header, stored) = encode_read(&raw[..], 3, 1).unwrap();
        assert_eq!(header, WalHeader::of(&raw));
        assert!(decode(&stored).unwrap() == raw);
    }
}
