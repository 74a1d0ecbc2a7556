//! How results look: tables and sentences for people, JSON for scripts. Pure functions of a
//! job's report that return text, so that each is tested without running anything.

use anyhow::Context;
use serde::Serialize;

use crate::catalog::Kind;
use crate::catalog::manifest::{Manifest, SourceFacts};
use crate::config::StoreLocation;
use crate::jobs;

/// What `restore pg` did, and what happens next (stderr).
pub fn restore_pg(
    report: &jobs::restore_pg::RestorePgReport,
    request: &jobs::restore_pg::RestorePgRequest,
) -> String {
    let plan = &report.plan;
    let restored = format!(
        "Restored pg-base backup {} into {}: {} in {:.1}s ({}/s); WAL {} .. {} checked ({} segments, timeline {}).",
        report.manifest.id,
        request.pgdata.display(),
        human_bytes(report.raw_bytes),
        report.restore_elapsed.as_secs_f64(),
        human_bytes(
            (report.raw_bytes as f64 / report.restore_elapsed.as_secs_f64().max(0.001)) as u64
        ),
        plan.first_wal,
        plan.last_wal,
        plan.segments,
        plan.timeline,
    );
    let next = match &report.recovery {
        None => format!(
            "Start PostgreSQL on {} to recover to {}.",
            request.pgdata.display(),
            request.target
        ),
        Some(recovery) => {
            let stopped = recovery
                .stopped
                .as_deref()
                .map_or(String::new(), |line| format!(" {line};"));
            format!(
                "Recovered to {} in {:.1}s ({} WAL files replayed):{stopped} replay ended at {}; last transaction {}; timeline {}; {}.",
                request.target,
                recovery.elapsed.as_secs_f64(),
                recovery.segments_restored,
                recovery.redo_done.as_deref().unwrap_or("?"),
                recovery
                    .last_transaction
                    .as_deref()
                    .unwrap_or("none replayed"),
                recovery.timeline.map_or("?".into(), |t| t.to_string()),
                recovery.action_done,
            )
        }
    };
    format!("{restored}\n{next}")
}

/// A restore drill in one line (stdout).
pub fn drill(drill: &jobs::drill::DrillReport) -> String {
    use jobs::drill::Checked;
    let rto = drill.rto.as_secs_f64();
    match &drill.checked {
        Checked::Pg(restore) => {
            let recovery = restore.recovery.as_ref();
            format!(
                "Restore drill of pg-base {}: base restore {:.1}s ({}), recovery {:.1}s ({} WAL files), \
                 recovery point {} (last transaction {}), pg_amcheck {}; RTO {rto:.1}s",
                drill.backup,
                restore.restore_elapsed.as_secs_f64(),
                human_bytes(restore.raw_bytes),
                recovery.map_or(0.0, |r| r.elapsed.as_secs_f64()),
                recovery.map_or(0, |r| r.segments_restored),
                recovery.and_then(|r| r.redo_done.as_deref()).unwrap_or("?"),
                recovery
                    .and_then(|r| r.last_transaction.as_deref())
                    .unwrap_or("none replayed"),
                recovery
                    .and_then(|r| r.amcheck.as_deref())
                    .unwrap_or("not run"),
            )
        }
        Checked::Redis {
            restore,
            raw_bytes,
            server_version,
            loaded,
            keys,
        } => format!(
            "Restore drill of redis {}: restore {:.1}s ({}), redis-server {server_version} \
             loaded {loaded}: {keys} keys; RTO {rto:.1}s",
            drill.backup,
            restore.as_secs_f64(),
            human_bytes(*raw_bytes),
        ),
        Checked::Etcd {
            restore,
            raw_bytes,
            tool,
            revision,
            keys,
        } => format!(
            "Restore drill of etcd {}: restore {:.1}s ({}), {tool} snapshot status: revision \
             {revision}, {keys} keys (etcd's own included); snapshot restore built a member's data directory; RTO \
             {rto:.1}s",
            drill.backup,
            restore.as_secs_f64(),
            human_bytes(*raw_bytes),
        ),
    }
}

/// One line per backup checked, its problems indented below it (stdout).
pub fn verify(report: &jobs::verify::VerifyReport) -> String {
    let mut out = String::new();
    for problem in &report.unreadable {
        out.push_str(&format!("unreadable manifest: {problem}\n"));
    }
    for backup in &report.checked {
        let verdict = if backup.problems.is_empty() {
            "ok"
        } else {
            "FAILED"
        };
        out.push_str(&format!(
            "{:<8} {:<17} {:<6} {} objects, {} checked",
            backup.kind,
            backup.id,
            verdict,
            backup.objects,
            human_bytes(backup.raw_bytes)
        ));
        if let Some(wal) = &backup.wal {
            out.push_str(&format!("; {wal}"));
        }
        for problem in &backup.problems {
            out.push_str(&format!("\n    {problem}"));
        }
        out.push('\n');
    }
    out
}

/// What a new backup holds, and where it went when nobody chose a store (stderr).
pub fn backup_done(location: &StoreLocation, manifest: &Manifest) -> String {
    let mut text = String::new();
    if let StoreLocation::Local {
        embedded_default: true,
        root,
    } = location
    {
        text.push_str(&format!(
            "Stored in the default local store {} (set GC_BACKUP_STORE or [store] url to use S3).\n",
            root.display()
        ));
    }
    text.push_str(&format!(
        "{} backup {}: {} raw, {} stored",
        manifest.kind,
        manifest.id,
        human_bytes(manifest.raw_bytes),
        human_bytes(manifest.stored_bytes)
    ));
    text
}

/// `restore redis`'s sentence (stderr).
pub fn restore_redis(report: &jobs::redis::RestoreRedisReport) -> String {
    let aof = report.aof_dir.as_ref().map_or(String::new(), |dir| {
        format!(
            " and its AOF set to {} (a Redis with appendonly yes loads the AOF)",
            dir.display()
        )
    });
    format!(
        "Restored redis backup {} to {}{aof} in {:.1}s; checksums verified.",
        report.manifest.id,
        report.path.display(),
        report.elapsed.as_secs_f64()
    )
}

/// `restore redis --target-time`'s sentence: what was written, from which backup, and how
/// close to the moment it is (stderr).
pub fn restore_redis_to_time(report: &jobs::redis::RestoreRedisToTime) -> String {
    let target = crate::wal::archive::human_time(report.target);
    let seconds = report.elapsed.as_secs_f64();
    match &report.reached {
        jobs::redis::Reached::Aof(cut) => {
            let reached = cut
                .last_kept
                .and_then(|s| chrono::DateTime::from_timestamp(i64::try_from(s).ok()?, 0))
                .map_or_else(String::new, |t| {
                    format!(
                        " (its last timestamp kept: {})",
                        crate::wal::archive::human_time(t)
                    )
                });
            let how = match &cut.cut_file {
                Some(file) => format!(
                    "cut in {file} at the first write after it{}",
                    if cut.dropped.is_empty() {
                        String::new()
                    } else {
                        format!(", {} later file(s) left out", cut.dropped.len())
                    }
                ),
                None => "nothing after it to cut".to_string(),
            };
            format!(
                "Restored redis to {target}: the AOF set of backup {} to {}, {how}{reached}, in \
                 {seconds:.1}s; checksums verified. A Redis with appendonly yes on this directory \
                 loads it (no dump.rdb was written: that backup's snapshot is later than the \
                 target).",
                report.manifest.id,
                cut.dir.display()
            )
        }
        jobs::redis::Reached::Snapshot { path, why } => format!(
            "Restored redis to the snapshot of backup {} (ended {}), the newest before {target}, \
             to {} in {seconds:.1}s, because {why}; writes between then and the target are not \
             in it. Start Redis on it with appendonly no (then CONFIG SET appendonly yes).",
            report.manifest.id,
            crate::wal::archive::human_time(report.manifest.end_time),
            path.display()
        ),
    }
}

/// `restore etcd`'s sentence, with the next step (stderr).
/// `restore all`: one line (or two, for PostgreSQL) per engine, then the moments side by side.
pub fn restore_all(report: &jobs::restore_all::RestoreAllReport) -> String {
    let when = crate::wal::archive::human_time;
    let offset = |moment: chrono::DateTime<chrono::Utc>| {
        let seconds = (moment - report.pg_moment).num_milliseconds() as f64 / 1000.0;
        format!("{} ({seconds:+.1} s)", when(moment))
    };
    let etcd = match &report.etcd {
        Some((etcd, _)) => restore_etcd(etcd),
        None => "not restored (no --etcd-output)".to_string(),
    };
    let etcd_moment = report.etcd.as_ref().map_or(String::new(), |(_, moment)| {
        format!(", etcd {}", offset(*moment))
    });
    let point = report
        .point
        .as_ref()
        .map_or(String::new(), |point| format!(" (point {})", point.id));
    format!(
        "PostgreSQL: {}\nRedis: {}\netcd: {etcd}\nMoments{point}: PostgreSQL {}, Redis {}{etcd_moment}; \
         the engines are {:.1} s apart.",
        restore_pg(&report.pg, &report.pg_request).replace('\n', "\n  "),
        restore_redis_to_time(&report.redis),
        when(report.pg_moment),
        offset(report.redis_moment),
        report.spread().num_milliseconds() as f64 / 1000.0
    )
}

pub fn restore_etcd(report: &jobs::etcd::RestoreEtcdReport) -> String {
    format!(
        "Restored etcd backup {} to {} in {:.1}s; checksum verified. Next: etcdctl snapshot \
         restore {} --data-dir DIR (one per member).",
        report.manifest.id,
        report.path.display(),
        report.elapsed.as_secs_f64(),
        report.path.display()
    )
}

/// One entry of `list --json`: the contract's fields first, then the source's facts.
#[derive(Debug, Serialize)]
struct ListEntry<'a> {
    id: &'a str,
    kind: Kind,
    start_time: String,
    end_time: String,
    raw_bytes: u64,
    stored_bytes: u64,
    compression: String,
    /// Whether the objects are age files; the recipients (public keys) when they are.
    encrypted: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    recipients: Option<&'a [String]>,
    tool_version: &'a str,
    #[serde(flatten)]
    source: serde_json::Value,
}

/// The source facts `list` shows: all of a dump's, a base backup's without its file list.
fn list_facts(source: &SourceFacts) -> serde_json::Value {
    match source {
        SourceFacts::PgDump(facts) => serde_json::to_value(facts).unwrap_or_default(),
        SourceFacts::Redis(facts) => serde_json::to_value(facts).unwrap_or_default(),
        SourceFacts::Etcd(facts) => serde_json::to_value(facts).unwrap_or_default(),
        SourceFacts::Point(facts) => serde_json::to_value(facts).unwrap_or_default(),
        SourceFacts::PgBase(facts) => serde_json::json!({
            "system_identifier": facts.system_identifier,
            "server_version": facts.server_version,
            "timeline": facts.timeline,
            "start_lsn": facts.start_lsn,
            "stop_lsn": facts.stop_lsn,
            "start_wal": facts.start_wal,
            "stop_wal": facts.stop_wal,
            "files": facts.files.len(),
            "parent": facts.parent,
            "depth": facts.depth,
        }),
    }
}

fn rfc3339(time: chrono::DateTime<chrono::Utc>) -> String {
    time.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// `list --json`: an array of entries, the contract's fields first.
pub fn list_json(manifests: &[Manifest]) -> anyhow::Result<String> {
    let entries: Vec<ListEntry<'_>> = manifests
        .iter()
        .map(|m| ListEntry {
            id: m.id.as_str(),
            kind: m.kind,
            start_time: rfc3339(m.start_time),
            end_time: rfc3339(m.end_time),
            raw_bytes: m.raw_bytes,
            stored_bytes: m.stored_bytes,
            compression: format!("{}-{}", m.compression.algorithm, m.compression.level),
            encrypted: m.objects.iter().any(|object| object.sealed),
            recipients: m.encryption.as_ref().map(|e| e.recipients.as_slice()),
            tool_version: &m.tool_version,
            source: list_facts(&m.source),
        })
        .collect();
    let mut text = serde_json::to_string_pretty(&entries).context("writing JSON")?;
    text.push('\n');
    Ok(text)
}

/// A point's parts, as `list` and `mark` show them.
fn point_parts(facts: &crate::catalog::manifest::PointFacts) -> String {
    let etcd = facts
        .etcd
        .as_ref()
        .map_or(String::new(), |etcd| format!(", etcd {}", etcd.id));
    format!(
        "'{}': PostgreSQL {} (timeline {}), Redis {}{etcd}",
        facts.name, facts.postgres.lsn, facts.postgres.timeline, facts.redis.id
    )
}

/// `gc-backup mark`'s summary line.
pub fn mark_done(manifest: &Manifest) -> String {
    match &manifest.source {
        SourceFacts::Point(facts) => {
            let spread = |time: chrono::DateTime<chrono::Utc>| {
                (time - facts.postgres.time).num_milliseconds() as f64 / 1000.0
            };
            let etcd = facts.etcd.as_ref().map_or(String::new(), |etcd| {
                format!(", etcd {:+.1} s", spread(etcd.time))
            });
            format!(
                "Point {} {}; Redis snapshot asked for {:+.1} s after the restore point{etcd}.",
                manifest.id,
                point_parts(facts),
                spread(facts.redis.time)
            )
        }
        _ => format!("{} {} stored.", manifest.kind, manifest.id),
    }
}

/// `list`: one line per backup, oldest first.
pub fn list_table(store_name: &str, manifests: &[Manifest]) -> String {
    if manifests.is_empty() {
        return format!("No backups in {store_name}.\n");
    }
    let mut out = format!(
        "{:<17} {:<8} {:<20} {:>9} {:>10} {:>10} {:>6}  SOURCE\n",
        "ID", "KIND", "STARTED (UTC)", "DURATION", "RAW", "STORED", "RATIO"
    );
    for m in manifests {
        let seconds = (m.end_time - m.start_time).num_milliseconds() as f64 / 1000.0;
        let ratio = if m.stored_bytes == 0 {
            0.0
        } else {
            m.raw_bytes as f64 / m.stored_bytes as f64
        };
        let source = match &m.source {
            SourceFacts::PgDump(facts) => {
                let tables = if facts.tables.is_empty() {
                    String::new()
                } else {
                    format!(" tables={}", facts.tables.join(","))
                };
                format!("{} ({}){tables}", facts.database, facts.format.as_str())
            }
            SourceFacts::Redis(facts) => {
                let aof = facts.aof.as_ref().map_or(String::new(), |aof| {
                    format!(" + AOF ({} files)", aof.files.len())
                });
                format!(
                    "{} (Redis {}, RDB {}){aof}",
                    facts.server, facts.redis_version, facts.rdb_version
                )
            }
            SourceFacts::Etcd(facts) => format!(
                "{} (etcd {}, revision {})",
                facts.endpoint, facts.etcd_version, facts.revision
            ),
            SourceFacts::Point(facts) => point_parts(facts),
            SourceFacts::PgBase(facts) => {
                let incremental = facts.parent.as_ref().map_or(String::new(), |parent| {
                    format!(" incremental on {parent} (depth {})", facts.depth)
                });
                format!(
                    "timeline {} {}..{} ({} files){incremental}",
                    facts.timeline,
                    facts.start_lsn,
                    facts.stop_lsn,
                    facts.files.len()
                )
            }
        };
        let sealed = if m.objects.iter().any(|object| object.sealed) {
            " [age]"
        } else {
            ""
        };
        out.push_str(&format!(
            "{:<17} {:<8} {:<20} {:>8.1}s {:>10} {:>10} {:>5.1}x  {source}{sealed}\n",
            m.id.as_str(),
            m.kind.as_str(),
            m.start_time.format("%Y-%m-%d %H:%M:%S"),
            seconds,
            human_bytes(m.raw_bytes),
            human_bytes(m.stored_bytes),
            ratio
        ));
    }
    out
}

/// 1536 → "1.5 KiB".
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// `check`'s findings as a table for people (one line each), or JSON for scripts.
pub fn check(report: &jobs::check::CheckReport, json: bool) -> anyhow::Result<String> {
    if json {
        let mut text = serde_json::to_string_pretty(&report.findings).context("writing JSON")?;
        text.push('\n');
        return Ok(text);
    }
    let mut out = format!("{:<9} {:<27} {:<6} DETAIL\n", "AREA", "CHECK", "RESULT");
    for finding in &report.findings {
        let status = match finding.status {
            jobs::check::Status::Ok => "ok",
            jobs::check::Status::Warn => "WARN",
            jobs::check::Status::Fail => "FAIL",
        };
        out.push_str(&format!(
            "{:<9} {:<27} {:<6} {}\n",
            finding.area, finding.check, status, finding.detail
        ));
    }
    Ok(out)
}

/// The retention plan: one line per backup and deleted object; WAL in one line (there can be
/// thousands) (stdout).
pub fn retention_plan(report: &jobs::retention::RetentionReport, dry_run: bool) -> String {
    use retention::Target;
    let mut out = String::new();
    let (wal, wal_reason) = wal_deletions(report);
    for decision in &report.plan.decisions {
        let verb = match (decision.delete, dry_run) {
            (false, _) => "keep",
            (true, true) => "would delete",
            (true, false) => "deleted",
        };
        if !matches!(decision.target, Target::Wal { .. }) {
            out.push_str(&format!(
                "{verb:<12} {:<48} {}\n",
                decision.target, decision.reason
            ));
        }
    }
    if let (Some(first), Some(last)) = (wal.iter().min(), wal.iter().max()) {
        let verb = if dry_run { "would delete" } else { "deleted" };
        out.push_str(&format!(
            "{verb:<12} {} WAL files, {first} … {last}: {wal_reason}\n",
            wal.len()
        ));
    }
    for upload in &report.stale_uploads {
        let verb = if dry_run { "would abort" } else { "aborted" };
        let started = upload
            .initiated
            .map_or_else(|| "at an unknown time".to_string(), |t| t.to_rfc3339());
        out.push_str(&format!(
            "{verb:<12} {:<48} multipart upload started {started}, never finished\n",
            upload.key
        ));
    }
    out
}

/// The retention run in one line (stderr).
pub fn retention_summary(report: &jobs::retention::RetentionReport, dry_run: bool) -> String {
    use retention::Target;
    let count = |wanted: fn(&Target) -> bool| {
        report
            .plan
            .deletions()
            .filter(|d| wanted(&d.target))
            .count()
    };
    let backups = count(|t| matches!(t, Target::Backup { .. }));
    let objects = count(|t| matches!(t, Target::Object { .. }));
    format!(
        "retention at {}: {} {backups} backups, {objects} data objects, {} WAL files, {} \
         stale multipart uploads",
        rfc3339(report.now),
        if dry_run { "would delete" } else { "deleted" },
        wal_deletions(report).0.len(),
        report.stale_uploads.len()
    )
}

/// The WAL keys the plan deletes, and the reason (the same for all of them).
fn wal_deletions(report: &jobs::retention::RetentionReport) -> (Vec<&str>, &str) {
    let mut reason = "";
    let keys = report
        .plan
        .decisions
        .iter()
        .filter_map(|decision| match &decision.target {
            retention::Target::Wal { key } => {
                reason = &decision.reason;
                Some(key.as_str())
            }
            _ => None,
        })
        .collect();
    (keys, reason)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::manifest::{Compression, DumpFormat, MANIFEST_FORMAT, PgDumpFacts};

    fn dump(id: &str, raw_bytes: u64, stored_bytes: u64) -> Manifest {
        Manifest {
            format: MANIFEST_FORMAT,
            id: id.parse().unwrap(),
            kind: Kind::PgDump,
            start_time: "2026-01-15T02:00:00Z".parse().unwrap(),
            end_time: "2026-01-15T02:00:12.5Z".parse().unwrap(),
            tool_version: "0.1.0".into(),
            raw_bytes,
            stored_bytes,
            compression: Compression {
                algorithm: "zstd".into(),
                level: 1,
            },
            source: SourceFacts::PgDump(PgDumpFacts {
                database: "gcstorage".into(),
                server_version: Some("15.8".into()),
                server_version_num: Some(150_008),
                pg_dump_version: "pg_dump (PostgreSQL) 15.8".into(),
                format: DumpFormat::Custom,
                tables: vec!["files".into()],
            }),
            encryption: None,
            objects: vec![],
        }
    }

    #[test]
    fn sizes_are_shown_in_binary_units() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(5 * 1024 * 1024 * 1024), "5.0 GiB");
    }

    #[test]
    fn the_list_table_has_a_header_and_one_line_per_backup() {
        assert_eq!(list_table("file:///b", &[]), "No backups in file:///b.\n");
        let table = list_table("file:///b", &[dump("20260115T020000Z", 4096, 1024)]);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 2, "{table}");
        assert!(lines[0].starts_with("ID "), "{table}");
        assert!(lines[1].starts_with("20260115T020000Z  pg-dump"), "{table}");
        for field in [
            "12.5s",
            "4.0 KiB",
            "1.0 KiB",
            "4.0x",
            "gcstorage (custom) tables=files",
        ] {
            assert!(lines[1].contains(field), "{field} in {table}");
        }
    }

    #[test]
    fn list_json_keeps_the_contract_s_fields_and_the_source_s() {
        let text = list_json(&[dump("20260115T020000Z", 10, 5)]).unwrap();
        let entries: serde_json::Value = serde_json::from_str(&text).unwrap();
        let entry = &entries[0];
        assert_eq!(entry["id"], "20260115T020000Z");
        assert_eq!(entry["kind"], "pg-dump");
        assert_eq!(entry["start_time"], "2026-01-15T02:00:00Z");
        assert_eq!(entry["compression"], "zstd-1");
        assert_eq!(entry["database"], "gcstorage");
        assert_eq!(entry["stored_bytes"], 5);
    }

    #[test]
    fn a_new_backup_says_where_it_went_only_when_nobody_chose() {
        let manifest = dump("20260115T020000Z", 2048, 1024);
        let chosen = StoreLocation::Local {
            root: "/srv/b".into(),
            embedded_default: false,
        };
        assert_eq!(
            backup_done(&chosen, &manifest),
            "pg-dump backup 20260115T020000Z: 2.0 KiB raw, 1.0 KiB stored"
        );
        let default = StoreLocation::Local {
            root: "/home/sre/.local/share/gc-backup".into(),
            embedded_default: true,
        };
        let text = backup_done(&default, &manifest);
        assert!(
            text.starts_with("Stored in the default local store /home/sre/"),
            "{text}"
        );
        assert_eq!(text.lines().count(), 2);
    }

    #[test]
    fn the_retention_plan_shows_backups_one_by_one_and_wal_in_one_line() {
        use retention::{Decision, Plan, Target};
        let id = |day: &str| format!("202601{day}T000000Z").parse().unwrap();
        let wal = |seg: u32| Decision {
            target: Target::Wal {
                key: format!("wal/0000000100000000/0000000100000000000000{seg:02X}.zst"),
            },
            delete: true,
            reason: "before the oldest kept base backup".into(),
        };
        let report = jobs::retention::RetentionReport {
            plan: Plan {
                decisions: vec![
                    Decision {
                        target: Target::Backup {
                            kind: Kind::Redis,
                            id: id("01"),
                        },
                        delete: true,
                        reason: "older than 7 days".into(),
                    },
                    Decision {
                        target: Target::Backup {
                            kind: Kind::Redis,
                            id: id("09"),
                        },
                        delete: false,
                        reason: "the newest".into(),
                    },
                    wal(3),
                    wal(1),
                    wal(2),
                ],
            },
            now: "2026-01-10T00:00:00Z".parse().unwrap(),
            deleted_backups: Default::default(),
            deleted_objects: 0,
            deleted_wal: 0,
            stale_uploads: vec![],
            uploads_unchecked: None,
        };
        let plan = retention_plan(&report, true);
        let lines: Vec<&str> = plan.lines().collect();
        assert_eq!(lines.len(), 3, "{plan}");
        assert!(
            lines[0].starts_with("would delete redis 20260101T000000Z"),
            "{plan}"
        );
        assert!(lines[0].ends_with("older than 7 days"), "{plan}");
        assert!(
            lines[1].starts_with("keep         redis 20260109T000000Z"),
            "{plan}"
        );
        assert!(lines[2].contains("3 WAL files"), "{plan}");
        assert!(
            lines[2].contains("000000010000000000000001.zst … "),
            "{plan}"
        );
        assert!(
            lines[2].ends_with("03.zst: before the oldest kept base backup"),
            "{plan}"
        );
        assert_eq!(
            retention_summary(&report, false),
            "retention at 2026-01-10T00:00:00Z: deleted 1 backups, 0 data objects, 3 WAL files, \
             0 stale multipart uploads"
        );
    }

    #[test]
    fn verify_shows_each_backup_and_its_problems_indented() {
        let report = jobs::verify::VerifyReport {
            checked: vec![
                jobs::verify::Checked {
                    kind: Kind::PgBase,
                    id: "20260115T020000Z".parse().unwrap(),
                    objects: 2,
                    raw_bytes: 3 * 1024 * 1024,
                    wal: Some("WAL chain complete".into()),
                    problems: vec![],
                },
                jobs::verify::Checked {
                    kind: Kind::Redis,
                    id: "20260115T030000Z".parse().unwrap(),
                    objects: 1,
                    raw_bytes: 10,
                    wal: None,
                    problems: vec!["dump.rdb.zst fails its check".into()],
                },
            ],
            unreadable: vec!["manifests/redis/x.json: not a manifest".into()],
        };
        let text = verify(&report);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "unreadable manifest: manifests/redis/x.json: not a manifest"
        );
        assert!(
            lines[1].starts_with("pg-base  20260115T020000Z  ok     2 objects"),
            "{text}"
        );
        assert!(
            lines[1].ends_with("2 objects, 3.0 MiB checked; WAL chain complete"),
            "{text}"
        );
        assert!(
            lines[2].starts_with("redis    20260115T030000Z  FAILED 1 objects"),
            "{text}"
        );
        assert_eq!(lines[3], "    dump.rdb.zst fails its check");
        assert_eq!(report.problems(), 2);
    }
}
