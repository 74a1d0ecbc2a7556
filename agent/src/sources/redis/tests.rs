use super::*;

/// A well-formed RDB: magic, version, a body, and the CRC-64 trailer.
fn rdb(body: &[u8]) -> Vec<u8> {
    let mut file = b"REDIS0011".to_vec();
    file.extend_from_slice(body);
    file.push(0xFF);
    let crc = CRC64.checksum(&file);
    file.extend_from_slice(&crc.to_le_bytes());
    file
}

fn check_in_pieces(file: &[u8], piece: usize) -> Result<RdbFacts, RedisError> {
    let mut check = RdbCheck::default();
    for chunk in file.chunks(piece) {
        check.feed(chunk)?;
    }
    check.finish()
}

#[test]
fn the_crc_trailer_is_checked_however_the_bytes_arrive() {
    let file = rdb(&crate::testing::noise(100_000, 3));
    for piece in [1, 7, 8, 9, 4096, file.len()] {
        let facts = check_in_pieces(&file, piece).unwrap();
        assert_eq!(facts.bytes, file.len() as u64);
        assert_eq!(facts.rdb_version, 11);
        assert!(facts.crc64.is_some());
    }
}

#[test]
fn a_flipped_byte_a_cut_or_another_format_is_refused() {
    let mut file = rdb(b"some keys");
    file[12] ^= 0x01;
    let error = check_in_pieces(&file, 5).unwrap_err();
    assert!(error.to_string().contains("CRC-64 mismatch"), "{error}");
    let file = rdb(b"some keys");
    assert!(check_in_pieces(&file[..6], 3).is_err());
    let error = check_in_pieces(b"PGDMP-not-redis-at-all", 4).unwrap_err();
    assert!(error.to_string().contains("REDIS magic"), "{error}");
}

#[test]
fn a_snapshot_without_a_checksum_is_accepted_as_such() {
    let mut file = b"REDIS0011body\xff".to_vec();
    file.extend_from_slice(&[0; 8]);
    assert_eq!(check_in_pieces(&file, 3).unwrap().crc64, None);
}

#[test]
fn urls_carry_user_and_password_and_never_show_the_password() {
    let endpoint = RedisEndpoint::parse("redis://backup:s%40cret@redis.gc-storage:6380/0").unwrap();
    assert_eq!(endpoint.host, "redis.gc-storage");
    assert_eq!(endpoint.port, 6380);
    assert_eq!(endpoint.username.as_deref(), Some("backup"));
    assert_eq!(
        endpoint.password.as_ref().map(Secret::expose),
        Some("s@cret")
    );
    assert_eq!(endpoint.to_string(), "redis://redis.gc-storage:6380");
    assert!(!format!("{endpoint:?}").contains("cret"));

    let endpoint = RedisEndpoint::parse("redis://:pw@127.0.0.1").unwrap();
    assert_eq!((endpoint.username, endpoint.port), (None, 6379));
    assert_eq!(redact("redis://:pw@127.0.0.1"), "redis://:***@127.0.0.1");

    let endpoint = RedisEndpoint::parse("rediss://redis:6380").unwrap();
    assert_eq!(endpoint.tls, Some(TlsFiles::default()));
    assert_eq!(endpoint.to_string(), "rediss://redis:6380");

    for bad in ["http://x", "redis://", "redis://h:port", "rediss://"] {
        assert!(RedisEndpoint::parse(bad).is_err(), "{bad}");
    }
}
