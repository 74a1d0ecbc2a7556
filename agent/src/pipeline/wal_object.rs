//! The stored form of one WAL file: small enough (a 16 MiB segment) to compress in memory,
//! and self-describing, so that a duplicate push or a fetch can check content without a
//! manifest or store metadata.
//!
//! ```text
//! [zstd skippable frame: magic 0x184D2A5B, length 45, "GCBW", version 1, raw size u64 LE,
//!  SHA-256 of the raw bytes][zstd frame with content checksum]
//! ```
//!
//! zstd itself skips the first frame; we read it to know what the rest must decompress to.

use bytes::{BufMut, Bytes, BytesMut};
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
pub fn encode(raw: &[u8], level: i32, workers: u32) -> std::io::Result<(WalHeader, Bytes)> {
    let header = WalHeader::of(raw);
    let mut out = BytesMut::with_capacity(HEADER_LEN + raw.len() / 3);
    out.put_u32_le(SKIPPABLE_MAGIC);
    out.put_u32_le(PAYLOAD_LEN as u32);
    out.put_slice(TAG);
    out.put_u8(VERSION);
    out.put_u64_le(header.raw_size);
    out.put_slice(&header.sha256);
    if workers == 0 {
        // One call over the whole segment: zstd's streaming API would wrap its window buffer
        // and compress most of the segment on its slower external-dictionary path.
        let mut compressor = zstd::bulk::Compressor::new(level)?;
        compressor.include_checksum(true)?;
        let mut stored =
            Vec::with_capacity(HEADER_LEN + zstd::zstd_safe::compress_bound(raw.len()));
        stored.extend_from_slice(&out);
        let mut frame = std::io::Cursor::new(stored);
        frame.set_position(HEADER_LEN as u64);
        compressor.compress_to_buffer(raw, &mut frame)?;
        return Ok((header, Bytes::from(frame.into_inner())));
    }
    let mut writer = out.writer();
    let mut encoder = zstd::stream::write::Encoder::new(&mut writer, level)?;
    encoder.include_checksum(true)?;
    encoder.set_pledged_src_size(Some(raw.len() as u64))?;
    encoder.multithread(workers)?;
    std::io::Write::write_all(&mut encoder, raw)?;
    encoder.finish()?;
    Ok((header, writer.into_inner().freeze()))
}

/// Decompresses a stored WAL object and checks it against its header.
pub fn decode(stored: &[u8]) -> Result<Vec<u8>, String> {
    let header = WalHeader::parse(stored)?;
    let capacity =
        usize::try_from(header.raw_size).map_err(|_| "raw size too large".to_string())?;
    let raw = zstd::bulk::decompress(&stored[HEADER_LEN..], capacity)
        .map_err(|e| format!("does not decompress: {e}"))?;
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
}
