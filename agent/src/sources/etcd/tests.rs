use super::*;

/// A database of `pages` 512-byte pages followed by its SHA-256.
fn snapshot(pages: usize) -> Vec<u8> {
    let db: Vec<u8> = (0..pages * 512).map(|i| (i * 31 % 251) as u8).collect();
    let mut out = db.clone();
    out.extend_from_slice(&Sha256::digest(&db));
    out
}

fn check_in_chunks(bytes: &[u8], chunk: usize) -> Result<SnapshotFacts, String> {
    let mut check = SnapshotCheck::default();
    for piece in bytes.chunks(chunk) {
        check.feed(piece);
    }
    check.finish()
}

#[test]
fn a_snapshot_checks_out_however_it_is_chunked() {
    let bytes = snapshot(9);
    let expected = hex::encode(&bytes[bytes.len() - 32..]);
    for chunk in [1, 5, 31, 32, 33, 512, 4096, bytes.len()] {
        let facts = check_in_chunks(&bytes, chunk).unwrap();
        assert_eq!(facts.bytes, bytes.len() as u64, "chunk {chunk}");
        assert_eq!(facts.sha256, expected, "chunk {chunk}");
    }
}

#[test]
fn a_flipped_byte_anywhere_is_found() {
    let bytes = snapshot(4);
    for at in [0, 700, bytes.len() - 33, bytes.len() - 32, bytes.len() - 1] {
        let mut bad = bytes.clone();
        bad[at] ^= 0x01;
        let error = check_in_chunks(&bad, 100).unwrap_err();
        assert!(error.contains("does not match"), "byte {at}: {error}");
    }
}

#[test]
fn a_snapshot_without_its_trailer_is_refused() {
    let bytes = snapshot(4);
    // The database alone, and a stream cut short.
    let error = check_in_chunks(&bytes[..bytes.len() - 32], 64).unwrap_err();
    assert!(error.contains("not a database followed by"), "{error}");
    assert!(check_in_chunks(&bytes[..1000], 64).is_err());
    assert!(check_in_chunks(&[], 64).is_err());
}

#[test]
fn endpoints_need_a_scheme() {
    assert_eq!(
        EtcdEndpoints::parse_urls("http://a:2379, https://b:2379").unwrap(),
        ["http://a:2379", "https://b:2379"]
    );
    assert!(matches!(
        EtcdEndpoints::parse_urls("etcd:2379"),
        Err(SourceError::Config(_))
    ));
    assert!(matches!(
        EtcdEndpoints::parse_urls(" , "),
        Err(SourceError::Config(_))
    ));
}

#[test]
fn a_client_certificate_without_its_key_is_a_configuration_error() {
    let endpoints = EtcdEndpoints {
        urls: vec!["https://127.0.0.1:2379".into()],
        tls: crate::config::TlsFiles {
            cert_file: Some("/nonexistent/cert.pem".into()),
            ..Default::default()
        },
        ..EtcdEndpoints::default()
    };
    assert!(matches!(endpoints.options(), Err(SourceError::Config(_))));
    let debug = format!(
        "{:?}",
        EtcdEndpoints {
            user: Some(("root".into(), Secret::new("hunter2"))),
            ..endpoints
        }
    );
    assert!(!debug.contains("hunter2"), "{debug}");
}

mod outside_input {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn any_snapshot_stream_is_checked_without_panic(
            blobs in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..200), 0..20),
        ) {
            let mut check = SnapshotCheck::default();
            for blob in &blobs {
                check.feed(blob);
            }
            let _ = check.finish();
        }
    }
}
