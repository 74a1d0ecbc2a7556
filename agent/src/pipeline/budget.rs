//! Fitting the pipelines to `pipeline.memory-limit`, whatever the number of cores.
//!
//! What one pipeline holds, in the worst case:
//!
//! ```text
//! parts      part_size × (parallel_uploads + 1)   uploading (or queued), being filled
//! chunks     1.25 MiB                             raw chunks waiting for the compressor
//! zstd       2 × frame_bytes                      a frame of raw and one of compressed bytes
//!            (the window and its workers' buffers at the slower levels)
//! ```
//!
//! and the process itself (runtime, TLS, allocator, code) takes [`PROCESS_RESERVE`]. A base
//! backup runs one pipeline per tar stream with one part in flight each. The planner shrinks,
//! in this order, parts in flight, part size (not below S3's 5 MiB minimum), the frame size
//! (4 → 2 → 1 MiB) and, for base backups, the number of streams, until the sum fits. A limit
//! that cannot hold one stream of minimum parts is refused with the figure it needs.

use crate::config::{MIB, PipelineConfig, S3_MIN_PART_SIZE};

use super::{CHUNK_QUEUE, CHUNK_SIZE, compress};

/// The process without its pipelines' buffers: tokio, rustls and the HTTP client, the tar
/// writer's and the file queue's own memory, the allocator's slack, the code. Measured on the
/// bench cluster's base backup: peak RSS 15–16 MiB above what the parts and frames account for.
pub const PROCESS_RESERVE: usize = 16 * MIB;

/// Frame sizes tried, largest (fastest) first.
const FRAME_SIZES: [usize; 3] = [compress::FRAME_BYTES, 2 * MIB, MIB];

/// The smallest limit anything fits in: one stream of minimum parts and frames.
pub fn minimum_limit() -> usize {
    PROCESS_RESERVE + cost(S3_MIN_PART_SIZE, 1, MIB)
}

/// Why no plan fits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "pipeline.memory-limit {limit_mib} MiB is too small: the smallest pipeline (one stream of \
     5 MiB parts, S3's minimum, with 1 MiB zstd frames) needs {needed_mib} MiB. Raise \
     pipeline.memory-limit (GC_BACKUP_MEMORY_LIMIT)."
)]
pub struct TooSmall {
    pub limit_mib: usize,
    pub needed_mib: usize,
}

fn too_small(limit: usize) -> TooSmall {
    TooSmall {
        limit_mib: limit / MIB,
        needed_mib: minimum_limit().div_ceil(MIB),
    }
}

/// Bytes one pipeline may hold with these settings (see the module's doc).
fn cost(part_size: usize, parallel_uploads: usize, frame_bytes: usize) -> usize {
    part_size * (parallel_uploads + 1) + (CHUNK_QUEUE + 1) * CHUNK_SIZE + 2 * frame_bytes
}

/// One pipeline (pg_dump, Redis, etcd, an AOF file) within `limit` bytes for the whole
/// process: the configured settings as maxima, shrunk until they fit.
pub fn single(settings: &PipelineConfig, limit: usize) -> Result<PipelineConfig, TooSmall> {
    let available = limit
        .checked_sub(PROCESS_RESERVE)
        .ok_or_else(|| too_small(limit))?;
    let mut fitted = settings.clone();
    for frame_bytes in FRAME_SIZES
        .into_iter()
        .filter(|f| *f <= settings.frame_bytes.max(MIB))
    {
        for parallel in (1..=settings.parallel_uploads).rev() {
            let fixed = (CHUNK_QUEUE + 1) * CHUNK_SIZE + 2 * frame_bytes;
            let Some(for_parts) = available.checked_sub(fixed) else {
                continue;
            };
            let part = round_down_mib(for_parts / (parallel + 1)).min(settings.part_size);
            if part >= S3_MIN_PART_SIZE.min(settings.part_size) {
                fitted.parallel_uploads = parallel;
                fitted.part_size = part;
                fitted.frame_bytes = frame_bytes;
                return Ok(fitted);
            }
        }
    }
    Err(too_small(limit))
}

/// A base backup's streams within `limit`: as many as `cores` (at most 4) that fit, each with
/// one part in flight. Returns the stream count and each stream's settings.
pub fn streams(
    settings: &PipelineConfig,
    limit: usize,
    cores: usize,
) -> Result<(usize, PipelineConfig), TooSmall> {
    let available = limit
        .checked_sub(PROCESS_RESERVE)
        .ok_or_else(|| too_small(limit))?;
    for count in (1..=cores.clamp(1, 4)).rev() {
        let share = available / count;
        for frame_bytes in FRAME_SIZES
            .into_iter()
            .filter(|f| *f <= settings.frame_bytes.max(MIB))
        {
            let fixed = (CHUNK_QUEUE + 1) * CHUNK_SIZE + 2 * frame_bytes;
            let Some(for_parts) = share.checked_sub(fixed) else {
                continue;
            };
            let part = round_down_mib(for_parts / 2).min(settings.part_size);
            if part >= S3_MIN_PART_SIZE.min(settings.part_size) {
                let mut fitted = settings.clone();
                fitted.parallel_uploads = 1;
                fitted.part_size = part;
                fitted.frame_bytes = frame_bytes;
                return Ok((count, fitted));
            }
        }
    }
    Err(too_small(limit))
}

/// What one WAL upload holds: the compressed segment (as large as the segment when its
/// content does not compress) and the 1 MiB frame being read and compressed.
pub fn wal_upload_cost(segment_size: usize) -> usize {
    segment_size + 2 * MIB
}

/// How many WAL segments the sidecar's archiver may read and compress at once within
/// `bytes`, 1 to 4.
pub fn wal_uploads(bytes: usize, segment_size: usize) -> usize {
    (bytes / wal_upload_cost(segment_size)).clamp(1, 4)
}

/// What the WAL receiver (`stream-wal`) may hold: the segment being received as compressed
/// frames (as large as the segment when WAL does not compress), and the chunks and finished
/// segment being uploaded. It stops reading the stream at this (PostgreSQL keeps the WAL for
/// the slot) until an upload completes.
pub fn wal_stream_cost(segment_size: usize) -> usize {
    segment_size + 8 * MIB
}

/// How the sidecar shares its limit between the archiver and scheduled backups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SidecarPlan {
    /// WAL segments read and compressed at once.
    pub wal_uploads: usize,
    /// Scheduled backups that may run at once; a later one waits for memory.
    pub backups_at_once: usize,
    /// The limit each backup plans its pipelines with (the process reserve included).
    pub backup_limit: usize,
}

/// The sidecar's share-out of `limit`: the WAL receiver its fixed share when `streaming`, the
/// archiver up to half of the other buffers (one to four segments being compressed), the
/// backups the rest, as many at once as fit.
pub fn sidecar(
    limit: usize,
    archiving: bool,
    streaming: bool,
    backup_kinds: usize,
    segment_size: usize,
) -> Result<SidecarPlan, String> {
    let receiver = if streaming {
        wal_stream_cost(segment_size)
    } else {
        0
    };
    let buffers = limit.saturating_sub(PROCESS_RESERVE + receiver);
    let wal_uploads = if archiving {
        wal_uploads(buffers / 2, segment_size)
    } else {
        0
    };
    let archiver = wal_uploads * wal_upload_cost(segment_size);
    let job_minimum = minimum_limit() - PROCESS_RESERVE;
    let rest = buffers.saturating_sub(archiver);
    let needed =
        PROCESS_RESERVE + receiver + archiver + if backup_kinds > 0 { job_minimum } else { 0 };
    if limit < needed {
        let streaming = if streaming {
            format!(", WAL streaming ({} MiB)", receiver / MIB)
        } else {
            String::new()
        };
        return Err(format!(
            "pipeline.memory-limit {} MiB is too small for the sidecar: archiving ({wal_uploads} \
             segment(s) of {} MiB at once){streaming} and one backup need {} MiB. Raise \
             pipeline.memory-limit (GC_BACKUP_MEMORY_LIMIT).",
            limit / MIB,
            segment_size / MIB,
            needed.div_ceil(MIB)
        ));
    }
    let backups_at_once = (rest / job_minimum.max(1)).clamp(1, backup_kinds.max(1));
    Ok(SidecarPlan {
        wal_uploads,
        backups_at_once,
        // Without scheduled backups nobody plans with it: leave the pipeline as configured.
        backup_limit: if backup_kinds == 0 {
            limit
        } else {
            PROCESS_RESERVE + rest / backups_at_once
        },
    })
}

fn round_down_mib(bytes: usize) -> usize {
    bytes & !(MIB - 1)
}

/// Peak memory a plan allows, reserve included: what the benchmarks compare RSS with.
pub fn planned_peak(streams: usize, settings: &PipelineConfig) -> usize {
    PROCESS_RESERVE
        + streams
            * cost(
                settings.part_size,
                settings.parallel_uploads,
                settings.frame_bytes,
            )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> PipelineConfig {
        PipelineConfig::default()
    }

    #[test]
    fn the_defaults_fit_the_default_limit_unchanged() {
        let fitted = single(&defaults(), 64 * MIB).unwrap();
        assert_eq!(fitted.part_size, 8 * MIB);
        assert_eq!(fitted.parallel_uploads, 3);
        assert_eq!(fitted.frame_bytes, 4 * MIB);
        assert!(planned_peak(1, &fitted) <= 64 * MIB);
    }

    #[test]
    fn every_plan_fits_its_limit_at_any_core_count() {
        for limit_mib in [32, 40, 48, 56, 64, 96, 128, 256, 1024] {
            let limit = limit_mib * MIB;
            let one = single(&defaults(), limit).unwrap();
            assert!(planned_peak(1, &one) <= limit, "{limit_mib} MiB: {one:?}");
            assert!(one.part_size >= S3_MIN_PART_SIZE);
            for cores in [1, 2, 4, 8, 64] {
                let (count, each) = streams(&defaults(), limit, cores).unwrap();
                assert!(count >= 1 && count <= cores.min(4));
                assert!(
                    planned_peak(count, &each) <= limit,
                    "{limit_mib} MiB, {cores} cores: {count} × {each:?}"
                );
                assert!(each.part_size >= S3_MIN_PART_SIZE);
            }
        }
    }

    #[test]
    fn more_memory_never_means_fewer_streams() {
        for cores in [1, 2, 4, 16] {
            let mut last = 0;
            for limit_mib in 32..=256 {
                let (count, _) = streams(&defaults(), limit_mib * MIB, cores).unwrap();
                assert!(
                    count >= last,
                    "{cores} cores at {limit_mib} MiB: {count} < {last}"
                );
                last = count;
            }
        }
    }

    #[test]
    fn the_old_four_core_overrun_is_gone() {
        // Four 5 MiB-part streams with 4 MiB frames took ~92 MiB on a 4-core node.
        let (count, each) = streams(&defaults(), 64 * MIB, 4).unwrap();
        assert!(count < 4, "{count} streams");
        assert!(planned_peak(count, &each) <= 64 * MIB);
        // With room, four cores get four streams.
        let (count, _) = streams(&defaults(), 128 * MIB, 4).unwrap();
        assert_eq!(count, 4);
    }

    #[test]
    fn a_limit_too_small_for_anything_is_refused_with_what_it_needs() {
        let error = single(&defaults(), 24 * MIB).unwrap_err();
        assert_eq!(error.needed_mib, minimum_limit().div_ceil(MIB));
        assert!(
            error.to_string().contains("GC_BACKUP_MEMORY_LIMIT"),
            "{error}"
        );
        assert!(streams(&defaults(), 8 * MIB, 4).is_err());
        assert!(single(&defaults(), minimum_limit()).is_ok());
        assert!(streams(&defaults(), minimum_limit(), 8).is_ok());
    }

    #[test]
    fn the_sidecar_never_plans_more_than_its_limit() {
        let segment = 16 * MIB;
        for limit_mib in [64, 96, 128, 192, 256, 512] {
            let limit = limit_mib * MIB;
            for (kinds, streaming) in (0..=4).flat_map(|k| [(k, false), (k, true)]) {
                let receiver = if streaming {
                    wal_stream_cost(segment)
                } else {
                    0
                };
                let Ok(plan) = sidecar(limit, true, streaming, kinds, segment) else {
                    // Refused only when one segment, the receiver and one backup cannot fit.
                    assert!(
                        streaming && kinds > 0,
                        "{limit_mib} MiB, {kinds} kinds refused"
                    );
                    assert!(
                        PROCESS_RESERVE + receiver + wal_upload_cost(segment) + minimum_limit()
                            - PROCESS_RESERVE
                            > limit
                    );
                    continue;
                };
                assert!(plan.wal_uploads >= 1);
                let archiver = plan.wal_uploads * wal_upload_cost(segment);
                if kinds == 0 {
                    assert!(PROCESS_RESERVE + receiver + archiver <= limit);
                    continue;
                }
                let (_, each) = streams(&defaults(), plan.backup_limit, 64).unwrap();
                let backups = plan.backups_at_once
                    * (planned_peak(1, &each) - PROCESS_RESERVE).max(
                        planned_peak(1, &single(&defaults(), plan.backup_limit).unwrap())
                            - PROCESS_RESERVE,
                    );
                let total = PROCESS_RESERVE + receiver + archiver + backups;
                assert!(
                    total <= limit,
                    "{limit_mib} MiB, {kinds} kinds, streaming {streaming}: {plan:?} = {total}"
                );
            }
        }
        assert!(sidecar(40 * MIB, true, false, 2, segment).is_err());
        let refused = sidecar(64 * MIB, true, true, 1, segment).unwrap_err();
        assert!(refused.contains("WAL streaming (24 MiB)"), "{refused}");
        assert!(sidecar(96 * MIB, true, true, 1, segment).is_ok());
        assert_eq!(
            sidecar(256 * MIB, true, false, 2, segment)
                .unwrap()
                .wal_uploads,
            4
        );
    }

    #[test]
    fn wal_uploads_follow_the_bytes_given() {
        assert_eq!(wal_uploads(0, 16 * MIB), 1);
        assert_eq!(wal_uploads(36 * MIB, 16 * MIB), 2);
        assert_eq!(wal_uploads(1024 * MIB, 16 * MIB), 4);
    }
}
