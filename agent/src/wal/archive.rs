//! The WAL archive as the restore planner sees it: every segment with the time it was stored,
//! and the timeline history files, read and parsed.

use anyhow::Context;
use chrono::{DateTime, Utc};
use futures::{StreamExt, TryStreamExt};
use pitr::{Archive, TimelinePath, WalFile};

use crate::catalog::layout;
use crate::catalog::manifest::{Manifest, PgBaseFacts, SourceFacts};
use crate::error::Failure;
use crate::store::Store;

/// Lists `wal/` and reads every history file.
pub async fn load(store: &Store, segment_size: u64) -> anyhow::Result<Archive> {
    let listed = store
        .list(&layout::wal_prefix())
        .await
        .map_err(anyhow::Error::from)
        .context("listing the WAL archive")?;
    let mut archive = Archive::new(segment_size);
    let mut histories = Vec::new();
    for meta in &listed {
        let Some(file) = layout::parse_wal_key(&meta.location) else {
            continue;
        };
        if let WalFile::History { timeline } = file {
            histories.push(timeline);
            archive.add_history_stored(timeline, meta.last_modified);
        }
        archive.add(&file, meta.last_modified);
    }
    // Segments the WAL receiver is still streaming: recovery reads them through wal-fetch
    // (the chunks from the segment's start, zero-filled), so the chain reaches them too.
    for (file, stored) in super::receiver::streamed_segments(store).await? {
        archive.add_streamed(&file, stored);
    }
    let paths: Vec<TimelinePath> = futures::stream::iter(histories)
        .map(|timeline| read_history(store, timeline))
        .buffer_unordered(8)
        .try_collect()
        .await?;
    for path in paths {
        archive.add_history(path);
    }
    Ok(archive)
}

async fn read_history(store: &Store, timeline: u32) -> anyhow::Result<TimelinePath> {
    let file = WalFile::History { timeline };
    let raw = crate::wal::read(store, &file).await?;
    let text = String::from_utf8_lossy(&raw);
    TimelinePath::parse(timeline, &text)
        .map_err(|e| Failure::Corrupt(format!("{} in the archive: {e}", file.name())).into())
}

/// The planner's view of a pg-base manifest.
pub fn base_backup(manifest: &Manifest) -> anyhow::Result<(pitr::BaseBackup, &PgBaseFacts)> {
    let SourceFacts::PgBase(facts) = &manifest.source else {
        anyhow::bail!("backup {} is not a pg-base backup", manifest.id);
    };
    let lsn = |text: &str| -> anyhow::Result<pitr::Lsn> {
        text.parse().map_err(|e| {
            Failure::Corrupt(format!("manifest of pg-base backup {}: {e}", manifest.id)).into()
        })
    };
    let backup = pitr::BaseBackup {
        id: manifest.id.to_string(),
        timeline: facts.timeline,
        start_lsn: lsn(&facts.start_lsn)?,
        stop_lsn: lsn(&facts.stop_lsn)?,
        end_time: manifest.end_time,
    };
    Ok((backup, facts))
}

/// `2026-01-15 10:30:00 UTC`, for messages an operator reads.
pub fn human_time(time: DateTime<Utc>) -> String {
    time.format("%Y-%m-%d %H:%M:%S UTC").to_string()
}
