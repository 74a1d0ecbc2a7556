//! The non-exclusive backup API: backup mode belongs to the session that started it, so a
//! failed or killed backup ends it by closing the connection. PostgreSQL 15 renamed the
//! functions (`pg_backup_start`/`pg_backup_stop`); both spellings are here.

use pitr::Lsn;
use tokio_postgres::Client;

use super::{SourceError, query_error};
use crate::config::PostgresConfig;

/// What a base backup must know before it starts: whether archiving is on and working, and
/// which cluster this is.
#[derive(Debug)]
pub struct ArchiveFacts {
    pub archive_mode: String,
    pub wal_level: String,
    pub server_version: String,
    pub server_version_num: u32,
    pub system_identifier: u64,
    pub wal_segment_size: u64,
    /// BLCKSZ: the unit incremental backups compare and store.
    pub block_size: u32,
    /// The archiver's last failure (segment, time) when no success came after it.
    pub failing: Option<(String, String)>,
}

pub async fn archive_facts(
    client: &Client,
    config: &PostgresConfig,
) -> Result<ArchiveFacts, SourceError> {
    let row = client
        .query_one(
            "SELECT current_setting('archive_mode'), current_setting('wal_level'), \
                    current_setting('server_version'), current_setting('server_version_num')::int4, \
                    (SELECT system_identifier::text FROM pg_control_system()), \
                    (SELECT setting::int8 FROM pg_settings WHERE name = 'wal_segment_size'), \
                    coalesce(a.last_failed_time > coalesce(a.last_archived_time, '-infinity'), false), \
                    coalesce(a.last_failed_wal, ''), coalesce(a.last_failed_time::text, ''), \
                    current_setting('block_size')::int4 \
             FROM pg_stat_archiver a",
            &[],
        )
        .await
        .map_err(|e| query_error(config, "checking archiving", &e))?;
    let system_identifier: String = row.get(4);
    let version_num: i32 = row.get(3);
    let segment_size: i64 = row.get(5);
    let failing: bool = row.get(6);
    Ok(ArchiveFacts {
        archive_mode: row.get(0),
        wal_level: row.get(1),
        server_version: row.get(2),
        server_version_num: u32::try_from(version_num).unwrap_or_default(),
        system_identifier: system_identifier.parse().map_err(|e| {
            SourceError::Failed(format!("the system identifier {system_identifier}: {e}"))
        })?,
        wal_segment_size: u64::try_from(segment_size).unwrap_or(0),
        block_size: u32::try_from(row.get::<_, i32>(9)).unwrap_or(0),
        failing: failing.then(|| (row.get(7), row.get(8))),
    })
}

/// Starts backup mode with an immediate checkpoint; returns the start LSN.
pub async fn start(
    client: &Client,
    config: &PostgresConfig,
    version_num: u32,
    label: &str,
) -> Result<Lsn, SourceError> {
    // Non-exclusive: backup mode belongs to this session. fast = immediate checkpoint.
    let sql = if version_num >= 150_000 {
        "SELECT pg_backup_start($1, true)::text"
    } else {
        "SELECT pg_start_backup($1, true, false)::text"
    };
    let row = client
        .query_one(sql, &[&label])
        .await
        .map_err(|e| query_error(config, "starting the backup", &e))?;
    let text: String = row.get(0);
    text.parse()
        .map_err(|e| SourceError::Failed(format!("backup start returned {text}: {e}")))
}

/// What `pg_backup_stop` returns: the stop LSN and the files the restored directory needs.
#[derive(Debug)]
pub struct Stopped {
    pub lsn: Lsn,
    pub label: String,
    pub tablespace_map: Option<String>,
}

pub async fn stop(
    client: &Client,
    config: &PostgresConfig,
    version_num: u32,
) -> Result<Stopped, SourceError> {
    // wait_for_archive off: PostgreSQL would look at the archive status once a second, which
    // added a second to every backup; await_wal checks the store itself, more often.
    let sql = if version_num >= 150_000 {
        "SELECT lsn::text, labelfile, spcmapfile FROM pg_backup_stop(false)"
    } else {
        "SELECT lsn::text, labelfile, spcmapfile FROM pg_stop_backup(false, false)"
    };
    let row = client
        .query_one(sql, &[])
        .await
        .map_err(|e| query_error(config, "stopping the backup", &e))?;
    let lsn: String = row.get(0);
    let map: Option<String> = row.get(2);
    Ok(Stopped {
        lsn: lsn
            .parse()
            .map_err(|e| SourceError::Failed(format!("backup stop returned {lsn}: {e}")))?,
        label: row.get(1),
        tablespace_map: map.filter(|m| !m.is_empty()),
    })
}

/// The `START TIMELINE:` line of a backup label.
pub fn timeline_of(label: &str) -> Option<u32> {
    label
        .lines()
        .find_map(|line| line.strip_prefix("START TIMELINE:"))
        .and_then(|t| t.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_timeline_comes_from_the_label() {
        let label = "START WAL LOCATION: 0/2000028 (file 000000020000000000000002)\n\
                     CHECKPOINT LOCATION: 0/2000060\nBACKUP METHOD: streamed\n\
                     START TIMELINE: 2\nLABEL: x\n";
        assert_eq!(timeline_of(label), Some(2));
        assert_eq!(timeline_of("nothing"), None);
    }

    proptest::proptest! {
        /// backup_label comes from the server, and later from the store's manifest.
        #[test]
        fn any_backup_label_gives_a_timeline_or_none(label in "\\PC{0,200}") {
            let _ = timeline_of(&label);
            let _ = timeline_of(&format!("START TIMELINE: {label}"));
        }
    }
}
