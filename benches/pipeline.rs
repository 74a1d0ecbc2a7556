//! Pipeline throughput (raw MB/s in) into the in-memory store at zstd levels 1, 3 and 6, on
//! data shaped like pg_dump output (COPY rows of ids, names, timestamps, hashes and JSON), so
//! that compression does what it does on a real dump. Run: `cargo bench --bench pipeline`.
//!
//! `wal_encode`: what `wal-push` does to one 16 MiB segment before its PUT, clear and encrypted
//! (age to one recipient); `GC_BACKUP_BENCH_SEGMENT=PATH` takes a real segment instead of
//! dump-like rows.

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use gc_backup::config::PipelineConfig;
use gc_backup::pipeline;
use gc_backup::store::{ObjectKey, Store};
use tokio_util::sync::CancellationToken;

/// About `len` bytes of COPY-format rows: compresses about as well as the bench database.
fn dump_like(len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 256);
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    let mut row = 0u64;
    while out.len() < len {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        row += 1;
        let line = format!(
            "{row}\t{}\t/users/{}/photos/{}\tIMG_{row}.jpg\t{}\t\\\\x{:016x}{:016x}\t2024-0{}-1{} 10:{:02}:00+00\t{{\"tags\": [\"trip\", {}], \"shared\": {}}}\n",
            seed % 20_000,
            seed % 20_000,
            2015 + seed % 9,
            seed % 50_000_000,
            seed,
            seed.rotate_left(17),
            1 + seed % 9,
            seed % 10,
            seed % 60,
            seed % 12,
            seed.is_multiple_of(5)
        );
        out.extend_from_slice(line.as_bytes());
    }
    out
}

fn pipeline_throughput(c: &mut Criterion) {
    let data = dump_like(64 << 20);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut group = c.benchmark_group("pipeline_into_memory");
    group.throughput(Throughput::Bytes(data.len() as u64));
    group.sample_size(10);
    for level in [1, 3, 6] {
        let settings = PipelineConfig {
            zstd_level: level,
            ..PipelineConfig::default()
        };
        group.bench_with_input(BenchmarkId::new("zstd", level), &settings, |b, settings| {
            b.to_async(&runtime).iter(|| async {
                let store = Store::memory();
                let key = ObjectKey::from("bench/object.zst");
                let summary =
                    pipeline::upload(&store, &key, &data[..], settings, &CancellationToken::new())
                        .await
                        .expect("upload");
                black_box(summary.stored_bytes)
            });
        });
    }
    group.finish();
}

fn wal_encode(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temp dir");
    let segment = match std::env::var_os("GC_BACKUP_BENCH_SEGMENT") {
        Some(path) => std::path::PathBuf::from(path),
        None => {
            let path = dir.path().join("000000010000000000000001");
            std::fs::write(&path, dump_like(16 << 20)).expect("write segment");
            path
        }
    };
    let (_, recipient) = {
        let identity = age::x25519::Identity::generate();
        (identity.clone(), identity.to_public().to_string())
    };
    let recipients = gc_backup::seal::Recipients::parse(&[recipient])
        .expect("recipient")
        .expect("one");
    let mut group = c.benchmark_group("wal_encode");
    group.throughput(Throughput::Bytes(16 << 20));
    group.sample_size(30);
    for (name, seal) in [("clear", None), ("sealed", Some(&recipients))] {
        group.bench_function(name, |b| {
            b.iter(|| {
                let encoded = gc_backup::wal::object::encode_file(&segment, 1, 0, seal);
                black_box(encoded.expect("encode").1.len())
            });
        });
    }
    group.finish();
}

criterion_group!(benches, pipeline_throughput, wal_encode);
criterion_main!(benches);
