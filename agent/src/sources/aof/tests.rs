use super::*;

fn command(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// A stream and the offsets where it may be cut (0 included).
fn sample() -> (Vec<u8>, Vec<u64>) {
    let records: Vec<(Vec<u8>, bool)> = vec![
        (command(&[b"SELECT", b"0"]), true),
        (command(&[b"set", b"a", b"1"]), true),
        (b"#TS:1700000000\r\n".to_vec(), true),
        // Binary payload with CRLF and '*' inside, and an empty one.
        (command(&[b"SET", b"bin", b"\r\n*3\r\n$\x00\xff"]), true),
        (command(&[b"SET", b"empty", b""]), true),
        (command(&[b"MULTI"]), false),
        (command(&[b"set", b"b", b"2"]), false),
        (command(&[b"incr", b"c"]), false),
        (command(&[b"EXEC"]), true),
        (command(&[b"multi"]), false),
        (command(&[b"del", b"a"]), false),
        (command(&[b"exec"]), true),
        (command(&[b"PEXPIREAT", b"session", b"1700000000000"]), true),
    ];
    let mut stream = Vec::new();
    let mut safe = vec![0];
    for (bytes, cut_after) in records {
        stream.extend_from_slice(&bytes);
        if cut_after {
            safe.push(stream.len() as u64);
        }
    }
    (stream, safe)
}

#[test]
fn every_prefix_is_cut_at_the_last_safe_boundary() {
    let (stream, safe) = sample();
    for len in 0..=stream.len() {
        for chunk in [1, 2, 3, 7, 64, usize::MAX] {
            let mut boundaries = CommandBoundaries::default();
            for piece in stream[..len].chunks(chunk.min(stream.len().max(1))) {
                boundaries.feed(piece).unwrap();
            }
            let expected = safe.iter().copied().filter(|&s| s <= len as u64).max();
            assert_eq!(
                Some(boundaries.safe_end()),
                expected,
                "prefix of {len} bytes fed in chunks of {chunk}"
            );
        }
    }
}

#[test]
fn garbage_is_refused_with_its_offset() {
    let (mut stream, _) = sample();
    let at = stream.len();
    stream.extend_from_slice(b"SET x 1\r\n");
    let mut boundaries = CommandBoundaries::default();
    let (offset, reason) = boundaries.feed(&stream).unwrap_err();
    assert_eq!(offset, at as u64);
    assert!(reason.contains("expected '*'"), "{reason}");

    let mut bad_crlf = command(&[b"SET", b"k", b"v"]);
    let last = bad_crlf.len() - 1;
    bad_crlf[last] = b'x';
    assert!(CommandBoundaries::default().feed(&bad_crlf).is_err());
    assert!(CommandBoundaries::default().feed(b"*2\r\n$x\r\n").is_err());
    assert!(CommandBoundaries::default().feed(b"$3\r\nabc\r\n").is_err());
}

#[test]
fn manifest_lines_are_parsed_and_history_is_left_out() {
    let text = "file appendonly.aof.2.base.rdb seq 2 type b\n\
                file appendonly.aof.1.incr.aof seq 1 type h\n\
                file appendonly.aof.2.incr.aof seq 2 type i\n\
                file appendonly.aof.3.incr.aof seq 3 type i\n";
    let manifest = AofManifest::parse("appendonly.aof.manifest".into(), text.into()).unwrap();
    let live: Vec<&str> = manifest.live().map(|e| e.name.as_str()).collect();
    assert_eq!(
        live,
        [
            "appendonly.aof.2.base.rdb",
            "appendonly.aof.2.incr.aof",
            "appendonly.aof.3.incr.aof"
        ]
    );
    assert_eq!(
        manifest.growing().unwrap().name,
        "appendonly.aof.3.incr.aof"
    );
    assert_eq!(
        manifest.without_history(),
        "file appendonly.aof.2.base.rdb seq 2 type b\n\
         file appendonly.aof.2.incr.aof seq 2 type i\n\
         file appendonly.aof.3.incr.aof seq 3 type i\n"
    );
}

#[test]
fn manifests_that_are_not_plain_are_refused() {
    let parse = |text: &str| AofManifest::parse("m.manifest".into(), text.into());
    assert!(parse("file ../etc/passwd seq 1 type b\n").is_err());
    assert!(parse("file \"a b\" seq 1 type b\n").is_err());
    assert!(parse("file a seq 1\n").is_err());
    assert!(parse("file a seq 1 type b\nfile b seq 2 type b\n").is_err());
    assert!(parse("file a seq 1 type h\n").is_err());
    assert!(parse("").is_err());
}

#[test]
fn a_directory_without_a_manifest_is_a_configuration_error() {
    let dir = tempfile::tempdir().unwrap();
    let error = AofManifest::read(dir.path()).unwrap_err();
    assert!(matches!(error, AofError::NotAof(_)), "{error}");
}

#[test]
fn the_manifest_redis_is_writing_during_a_rewrite_is_not_read() {
    let dir = tempfile::tempdir().unwrap();
    let line = "file appendonly.aof.1.base.rdb seq 1 type b\n";
    std::fs::write(dir.path().join("appendonly.aof.manifest"), line).unwrap();
    std::fs::write(dir.path().join("temp-appendonly.aof.manifest"), "half").unwrap();
    let manifest = AofManifest::read(dir.path()).unwrap();
    assert_eq!(manifest.file_name, "appendonly.aof.manifest");
}

#[test]
fn file_prefixes_are_cut_and_hashed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.incr.aof");
    let (stream, safe) = sample();
    // A command cut in the middle at the end, as Redis may be writing it.
    let mut growing = stream.clone();
    growing.extend_from_slice(&command(&[b"SET", b"k", b"v"])[..7]);
    std::fs::write(&path, &growing).unwrap();
    let end = complete_prefix(&path, growing.len() as u64).unwrap();
    assert_eq!(end, *safe.last().unwrap());
    assert_eq!(end, stream.len() as u64);
    let expected = hex::encode(Sha256::digest(&stream));
    assert_eq!(sha256_prefix(&path, end).unwrap(), Some(expected));
    assert_eq!(
        sha256_prefix(&path, growing.len() as u64 + 1).unwrap(),
        None
    );
    assert!(
        complete_prefix(&dir.path().join("gone"), 1)
            .unwrap_err()
            .is_not_found()
    );
}

mod outside_input {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn any_bytes_in_any_pieces_find_a_cut_or_an_error(
            bytes in proptest::collection::vec(any::<u8>(), 0..2048),
            piece in 1usize..64,
        ) {
            let mut boundaries = CommandBoundaries::default();
            let mut failed = false;
            for chunk in bytes.chunks(piece) {
                if boundaries.feed(chunk).is_err() {
                    failed = true;
                    break;
                }
            }
            if !failed {
                prop_assert!(boundaries.safe_end() <= bytes.len() as u64);
            }
        }

        #[test]
        fn commands_of_random_shapes_never_panic(
            parts in proptest::collection::vec(
                prop_oneof![Just("*".to_string()), Just("$".to_string()), Just("\r\n".to_string()),
                            Just("#TS:1\r\n".to_string()), "[0-9]{1,20}", "[A-Za-z]{0,10}"],
                0..60,
            ),
        ) {
            let stream = parts.concat();
            let mut boundaries = CommandBoundaries::default();
            let _ = boundaries.feed(stream.as_bytes());
        }

        #[test]
        fn any_manifest_text_parses_or_is_refused(text in "\\PC{0,300}") {
            let _ = AofManifest::parse("appendonly.aof.manifest".into(), text);
        }
    }
}

#[test]
fn a_stream_is_cut_at_the_first_annotation_past_the_time() {
    let mut stream = Vec::new();
    let mut starts = Vec::new();
    for (second, key) in [(100u64, "a"), (101, "b"), (101, "c"), (105, "d")] {
        starts.push(stream.len() as u64);
        stream.extend_from_slice(format!("#TS:{second}\r\n").as_bytes());
        stream.extend_from_slice(&command(&[b"SET", key.as_bytes(), b"1"]));
    }
    for chunk in [1, 5, usize::MAX] {
        let cut_at = |limit| {
            let mut boundaries = CommandBoundaries::cutting_after(limit);
            for piece in stream.chunks(chunk.min(stream.len())) {
                boundaries.feed(piece).unwrap();
            }
            (boundaries.cut(), boundaries.timestamps())
        };
        assert_eq!(cut_at(99), (Some(0), (Some(100), None)));
        assert_eq!(cut_at(100), (Some(starts[1]), (Some(100), Some(100))));
        // Two annotations of one second: both kept.
        assert_eq!(cut_at(101), (Some(starts[3]), (Some(100), Some(101))));
        assert_eq!(cut_at(104), (Some(starts[3]), (Some(100), Some(101))));
        assert_eq!(cut_at(105), (None, (Some(100), Some(105))));
    }
    // Without timestamps there is nothing to cut at.
    let mut plain = CommandBoundaries::cutting_after(0);
    plain.feed(&command(&[b"SET", b"a", b"1"])).unwrap();
    assert_eq!((plain.cut(), plain.timestamps()), (None, (None, None)));
}

#[test]
fn the_snapshot_time_of_an_rdb_base_is_read_from_its_aux_fields() {
    // REDIS0011, aux redis-ver "7.0.15", aux redis-bits 64 (int8), aux ctime (int32), then a
    // SELECTDB.
    let mut head = b"REDIS0011".to_vec();
    head.extend_from_slice(b"\xFA\x09redis-ver\x067.0.15");
    head.extend_from_slice(b"\xFA\x0Aredis-bits\xC0\x40");
    head.extend_from_slice(b"\xFA\x05ctime\xC2");
    head.extend_from_slice(&1_764_662_400i32.to_le_bytes());
    head.extend_from_slice(b"\xFE\x00");
    assert_eq!(rdb_ctime(&head), Some(1_764_662_400));
    // As a plain string, too.
    let mut text = b"REDIS0011".to_vec();
    text.extend_from_slice(b"\xFA\x05ctime\x0A1764662400\xFF");
    assert_eq!(rdb_ctime(&text), Some(1_764_662_400));
    // Cut short, not an RDB, or no ctime before the data: unknown.
    for head in [&head[..20], b"*2\r\n$6\r\nSELECT", b"REDIS0011\xFE\x00"] {
        assert_eq!(rdb_ctime(head), None);
    }
}
