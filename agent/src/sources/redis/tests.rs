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

fn check_in_pieces(file: &[u8], piece: usize) -> Result<RdbFacts, SourceError> {
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

mod outside_input {
    use super::*;
    use proptest::prelude::*;

    fn reply_of(bytes: &[u8]) -> Result<Reply, SourceError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let mut reader = tokio::io::BufReader::new(bytes);
        runtime.block_on(read_reply(&mut reader, "redis://test"))
    }

    #[test]
    fn replies_that_once_panicked_or_allocated_without_bound_are_errors() {
        // A multi-byte first character (split at byte 1 panicked).
        assert!(reply_of("é\r\n".as_bytes()).is_err());
        assert!(reply_of(b"\xff+OK\r\n").is_err());
        // A server-chosen length is refused before anything is allocated.
        assert!(reply_of(b"$9223372036854775807\r\n").is_err());
        assert!(reply_of(b"$-7\r\n").is_err());
        // A line without end is not buffered without bound.
        let endless = vec![b'+'; 200_000];
        assert!(reply_of(&endless).is_err());
        assert!(matches!(reply_of(b"$-1\r\n"), Ok(Reply::Bulk(None))));
        assert!(matches!(reply_of(b"$2\r\nhi\r\n"), Ok(Reply::Bulk(Some(b))) if b == b"hi"));
        assert!(reply_of(b"$2\r\nhiXX").is_err(), "bulk not ended by CRLF");
    }

    proptest! {
        #[test]
        fn any_reply_bytes_give_a_reply_or_an_error(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = reply_of(&bytes);
        }

        #[test]
        fn any_snapshot_bytes_in_any_pieces_are_checked_without_panic(
            bytes in proptest::collection::vec(any::<u8>(), 0..2048),
            piece in 1usize..64,
            magic in any::<bool>(),
        ) {
            let mut file = bytes;
            if magic {
                file.splice(0..0, b"REDIS0011".iter().copied());
            }
            let result = check_in_pieces(&file, piece);
            // Random bytes pass only if their last 8 happen to be a valid CRC-64 (or zero).
            if let Ok(facts) = result {
                prop_assert_eq!(facts.bytes, file.len() as u64);
            }
        }
    }
}

#[test]
fn the_keys_of_every_database_are_counted() {
    let info =
        "# Keyspace\r\ndb0:keys=3,expires=1,avg_ttl=10\r\ndb5:keys=40,expires=0,avg_ttl=0\r\n";
    assert_eq!(keyspace_keys(info), 43);
    assert_eq!(keyspace_keys("# Keyspace\r\n"), 0);
}
