//! The manifest: everything needed to list, restore and verify one backup.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::layout::{BackupId, Kind};

/// Bumped when a field changes meaning; readers refuse versions they do not know.
pub const MANIFEST_FORMAT: u32 = 1;
/// Format 2: some objects carry no `raw_sha256` (base backups' tars). Written only where that
/// is so, so that an older gc-backup refuses such a manifest with a clear message instead of
/// a parse error, and still reads every other.
pub const MANIFEST_FORMAT_UNHASHED: u32 = 2;
/// A manifest with objects encrypted with age: a gc-backup that cannot decrypt must say so
/// instead of taking them for zstd.
pub const MANIFEST_FORMAT_SEALED: u32 = 3;
/// Base backups with a block map, and incremental ones (a `parent`, delta streams): older
/// readers would restore an incremental as if it were whole.
pub const MANIFEST_FORMAT_BLOCKS: u32 = 4;
/// The newest format this gc-backup reads.
pub const MANIFEST_FORMAT_NEWEST: u32 = MANIFEST_FORMAT_BLOCKS;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: u32,
    pub id: BackupId,
    pub kind: Kind,
    pub start_time: DateTime<Utc>,
    pub end_time: DateTime<Utc>,
    /// gc-backup's version that wrote it.
    pub tool_version: String,
    /// Bytes the source produced.
    pub raw_bytes: u64,
    /// Bytes in the store.
    pub stored_bytes: u64,
    pub compression: Compression,
    pub source: SourceFacts,
    /// The data objects, in restore order.
    pub objects: Vec<StoredObject>,
    /// Whom the objects were encrypted to (public keys); absent: stored in the clear.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<Encryption>,
}

/// How a backup's objects were encrypted. Public: `list` and retention read it without a key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Encryption {
    /// Always `age`.
    pub algorithm: String,
    pub recipients: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Compression {
    /// Always "zstd" today.
    pub algorithm: String,
    pub level: i32,
}

/// What the source said about itself while it was being backed up.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case", deny_unknown_fields)]
pub enum SourceFacts {
    PgDump(PgDumpFacts),
    PgBase(Box<PgBaseFacts>),
    Redis(RedisFacts),
    Etcd(EtcdFacts),
    Point(PointFacts),
}

/// A restore point across the engines (`gc-backup mark`): what each part reached. Written only
/// when every part succeeded; it stores no data of its own.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PointFacts {
    /// The name given to `mark`, also the PostgreSQL restore point's name.
    pub name: String,
    pub postgres: PostgresPoint,
    /// The Redis backup taken for the point.
    pub redis: PartPoint,
    /// The etcd snapshot taken for the point, when etcd was configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etcd: Option<PartPoint>,
}

/// Where `pg_create_restore_point` put the point.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresPoint {
    /// The restore point record's end, as PostgreSQL returned it.
    pub lsn: String,
    pub timeline: u32,
    /// The segment that holds it, archived before the point was written.
    pub wal: String,
    /// The server's clock when the point was made.
    pub time: DateTime<Utc>,
    pub system_identifier: String,
}

/// One engine's backup of a point, and the moment its data is of.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartPoint {
    pub id: BackupId,
    /// When the snapshot was asked for: the state it holds.
    pub time: DateTime<Utc>,
}

/// An etcd snapshot (`Maintenance.Snapshot` of one member).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdFacts {
    /// The member it came from, as given in the endpoints.
    pub endpoint: String,
    pub etcd_version: String,
    /// Hex, as `etcdctl endpoint status` shows them.
    pub cluster_id: String,
    pub member_id: String,
    /// The store revision when the snapshot was asked for.
    pub revision: i64,
    /// The SHA-256 trailer the database was checked against, hex.
    pub sha256: String,
}

/// An RDB snapshot taken over the replication protocol.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisFacts {
    /// `redis://host:port`, never with a password.
    pub server: String,
    pub redis_version: String,
    pub rdb_version: u32,
    /// The CRC-64 trailer the snapshot was checked against, hex; none if the server writes none.
    pub crc64: Option<String>,
    /// Sent diskless (`$EOF:` framing) or from the server's RDB file.
    pub diskless: bool,
    /// The append-only file set, when the backup was taken with `--aof-dir`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aof: Option<AofFacts>,
}

/// Redis 7's multi-part AOF, copied as a consistent set after the RDB snapshot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AofFacts {
    /// The directory that was copied; restore recreates one of the same name.
    pub dir: String,
    /// The manifest's file name (`<appendfilename>.manifest`).
    pub manifest_name: String,
    /// The manifest to restore: Redis' own, without entries for history files.
    pub manifest: String,
    /// The base and incremental files, in load order.
    pub files: Vec<AofFileFacts>,
    /// Copies it took until Redis left the set alone (above 1 when a rewrite ran meanwhile).
    pub attempts: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AofFileFacts {
    pub name: String,
    /// Its object in the manifest's `objects`. An unchanged file keeps the key of the backup
    /// that first stored it, so deleting a backup must spare objects newer ones name.
    pub key: String,
    /// Stored by an earlier backup and not uploaded again.
    pub reused: bool,
}

/// A physical base backup: where recovery starts and what it needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PgBaseFacts {
    /// `pg_control_system().system_identifier`, as text (it does not fit JSON numbers).
    pub system_identifier: String,
    pub server_version: String,
    pub server_version_num: u32,
    pub timeline: u32,
    pub start_lsn: String,
    pub stop_lsn: String,
    /// The WAL segment recovery starts from, and the last one it needs for consistency.
    pub start_wal: String,
    pub stop_wal: String,
    pub wal_segment_size: u64,
    /// The data directory that was copied.
    pub pgdata: String,
    /// Returned by pg_backup_stop; written into the restored data directory.
    pub backup_label: String,
    pub tablespace_map: Option<String>,
    /// Every copied file, with its CRC-32C and the tar stream that holds it.
    pub files: Vec<BaseFile>,
    /// BLCKSZ of the cluster: the unit of block maps and delta streams.
    #[serde(default = "default_block_size")]
    pub block_size: u32,
    /// The hash of every block of every relation file (see `sources::blocks`), for the next
    /// incremental to compare against. Absent in backups of older gc-backups.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_map: Option<StoredObject>,
    /// An incremental backup: the backup its delta streams apply to (itself full or
    /// incremental). Its `objects` are delta streams, not tars.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<BackupId>,
    /// Incrementals between it and its full backup, itself included (0: a full backup).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub depth: u32,
}

fn default_block_size() -> u32 {
    8192
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl PgBaseFacts {
    pub fn is_incremental(&self) -> bool {
        self.parent.is_some()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PgDumpFacts {
    pub database: String,
    /// `SHOW server_version`, when the agent could ask the server.
    pub server_version: Option<String>,
    pub server_version_num: Option<u32>,
    /// The `pg_dump --version` line of the binary that made the dump.
    pub pg_dump_version: String,
    pub format: DumpFormat,
    /// The `--table` patterns; empty means the whole database.
    pub tables: Vec<String>,
}

/// One file of a base backup, as the manifest stores it. The catalog's own type: what the
/// PGDATA walker reports may change, the stored format may not (a test pins its JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BaseFile {
    pub path: String,
    /// Bytes in the tar (the size when the copy started).
    pub size: u64,
    /// CRC-32C of those bytes, as PostgreSQL's own backup manifests use.
    pub crc32c: u32,
    /// Which tar stream holds it.
    pub stream: u32,
    /// The file shrank while being copied and was padded with zeros (WAL replay repairs it).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub padded: bool,
    /// Incremental backups only: what its delta stream holds of the file. `crc32c` and `size`
    /// are always of the whole file as this backup read it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delta: Option<Delta>,
}

/// What an incremental backup stored of one file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Delta {
    /// Nothing: the parent's copy is this file.
    Unchanged,
    /// Its new size and these many blocks; the others are the parent's.
    Changed { blocks: u64 },
    /// All of it; nothing of an older copy is kept.
    Whole,
}

impl Delta {
    /// The file has a record in its stream.
    pub fn in_stream(self) -> bool {
        self != Delta::Unchanged
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DumpFormat {
    /// pg_dump's custom archive: restored with pg_restore, tables selectable.
    #[default]
    Custom,
    /// Plain SQL: restored with psql.
    Plain,
}

impl DumpFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            DumpFormat::Custom => "custom",
            DumpFormat::Plain => "plain",
        }
    }
}

/// One object of a backup, with what is needed to check it on the way back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredObject {
    /// Key relative to the store root.
    pub key: String,
    pub raw_bytes: u64,
    pub stored_bytes: u64,
    /// SHA-256 of the raw (uncompressed) bytes, hex. Absent for base backups' tars, whose
    /// files carry CRC-32C each and whose zstd frames carry an XXH64 of their content.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw_sha256: Option<String>,
    /// Number of uploaded parts (1 for a single PUT).
    pub parts: u32,
    /// An age file of the zstd stream.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub sealed: bool,
}

impl Manifest {
    pub fn to_json(&self) -> Vec<u8> {
        // Serializing plain data with string keys cannot fail.
        serde_json::to_vec_pretty(self).unwrap_or_default()
    }

    pub fn from_json(bytes: &[u8]) -> Result<Self, String> {
        #[derive(Deserialize)]
        struct Version {
            format: u32,
        }
        let version: Version =
            serde_json::from_slice(bytes).map_err(|e| format!("not a manifest: {e}"))?;
        if !(MANIFEST_FORMAT..=MANIFEST_FORMAT_NEWEST).contains(&version.format) {
            return Err(format!(
                "manifest format {} is not known to this gc-backup (knows {MANIFEST_FORMAT} to \
                 {MANIFEST_FORMAT_NEWEST}); use a newer gc-backup",
                version.format
            ));
        }
        serde_json::from_slice(bytes).map_err(|e| format!("invalid manifest: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_stored_shape_of_objects_and_files_does_not_drift() {
        let file = BaseFile {
            path: "base/1/1259".into(),
            size: 8192,
            crc32c: 7,
            stream: 1,
            padded: false,
            delta: None,
        };
        assert_eq!(
            serde_json::to_string(&file).unwrap(),
            r#"{"path":"base/1/1259","size":8192,"crc32c":7,"stream":1}"#
        );
        let padded = BaseFile {
            padded: true,
            ..file
        };
        assert!(
            serde_json::to_string(&padded)
                .unwrap()
                .ends_with(r#","padded":true}"#)
        );
        let object = StoredObject {
            key: "data/pg-base/x/base.0.tar.zst".into(),
            raw_bytes: 10,
            stored_bytes: 5,
            raw_sha256: None,
            parts: 1,
            sealed: false,
        };
        let json = serde_json::to_string(&object).unwrap();
        assert!(
            !json.contains("raw_sha256") && !json.contains("sealed"),
            "{json}"
        );
    }

    proptest! {
        /// Manifests come from the store: anything there is read or refused, never a panic.
        #[test]
        fn any_bytes_are_a_manifest_or_an_error(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = Manifest::from_json(&bytes);
        }

        #[test]
        fn json_of_any_shape_is_a_manifest_or_an_error(
            format in any::<u32>(),
            kind in "\\PC{0,12}",
            files in proptest::collection::vec(("\\PC{0,20}", any::<i64>()), 0..4),
        ) {
            let files: Vec<serde_json::Value> = files
                .iter()
                .map(|(path, n)| serde_json::json!({"path": path, "size": n, "crc32c": n, "stream": n}))
                .collect();
            let value = serde_json::json!({
                "format": format, "id": "20260101T000000Z", "kind": kind,
                "source": {"type": "pg-base", "files": files},
            });
            let _ = Manifest::from_json(&serde_json::to_vec(&value).unwrap());
        }
    }
}
