#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;
use proptest::prelude::*;

fn at(day: i64) -> DateTime<Utc> {
    "2026-01-01T00:00:00Z".parse::<DateTime<Utc>>().unwrap() + TimeDelta::days(day)
}

fn policy() -> Policy {
    Policy {
        pg: TimeDelta::days(30),
        redis: TimeDelta::days(7),
        etcd: TimeDelta::days(14),
        orphan_grace: TimeDelta::hours(24),
    }
}

/// The id of a backup that started on `day`.
fn id_of(day: i64) -> BackupId {
    BackupId::at(at(day))
}

fn backup(kind: Kind, day: i64, objects: &[&str]) -> Backup {
    Backup {
        kind,
        id: id_of(day),
        start_time: at(day),
        end_time: at(day) + TimeDelta::minutes(30),
        objects: objects.iter().map(|o| o.to_string()).collect(),
        wal_start: None,
        parent: None,
    }
}

/// A base backup on day `day` whose WAL starts at segment `day * 10` of timeline 1.
fn base(day: i64) -> Backup {
    Backup {
        wal_start: Some(WalFile::Segment {
            timeline: 1,
            log: 0,
            seg: u32::try_from(day * 10).unwrap(),
        }),
        ..backup(Kind::PgBase, day, &[])
    }
}

fn segment(timeline: u32, seg: u32) -> WalObject {
    let file = WalFile::Segment {
        timeline,
        log: 0,
        seg,
    };
    WalObject {
        key: format!("wal/{}", file.name()),
        file,
    }
}

/// The deleted backups as "kind id".
fn deleted_backups(plan: &Plan) -> Vec<String> {
    plan.deletions()
        .filter(|d| matches!(d.target, Target::Backup { .. }))
        .map(|d| d.target.to_string())
        .collect()
}

#[test]
fn base_backups_keep_a_recovery_window_and_the_wal_from_its_anchor() {
    // Daily base backups on days 0..40, WAL from segment 0 to 400.
    let mut inventory = Inventory {
        backups: (0..40).map(base).collect(),
        ..Inventory::default()
    };
    inventory.wal = (0..400).map(|seg| segment(1, seg)).collect();
    inventory.wal.push(WalObject {
        key: "wal/00000002.history".into(),
        file: WalFile::History { timeline: 2 },
    });
    let now = at(40);
    let plan = plan(&inventory, &policy(), now);
    // Cutoff is day 10 00:00; day 9's backup (ended 00:30) is the newest before it.
    let deleted = deleted_backups(&plan);
    assert_eq!(
        deleted,
        (0..9)
            .map(|d| format!("pg-base {}", id_of(d)))
            .collect::<Vec<_>>()
    );
    let anchor = plan
        .decisions
        .iter()
        .find(|d| d.target.to_string() == format!("pg-base {}", id_of(9)))
        .unwrap();
    assert!(
        !anchor.delete && anchor.reason.contains("recovery window"),
        "{anchor:?}"
    );
    // WAL before day 9's start segment (90) goes; the history file stays.
    let wal: Vec<&str> = plan
        .deletions()
        .filter_map(|d| match &d.target {
            Target::Wal { key } => Some(key.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(wal.len(), 90);
    assert!(wal.iter().all(|k| !k.ends_with(".history")));
    assert!(!wal.contains(&"wal/00000001000000000000005A"));
    assert!(wal.contains(&"wal/000000010000000000000059"));
}

#[test]
fn the_newest_backup_of_each_kind_survives_any_window() {
    let inventory = Inventory {
        backups: vec![
            backup(Kind::Redis, 0, &["r0"]),
            backup(Kind::Redis, 1, &["r1"]),
            backup(Kind::Etcd, 0, &["e0"]),
            backup(Kind::PgDump, 0, &["d0"]),
            backup(Kind::PgDump, 2, &["d2"]),
        ],
        ..Inventory::default()
    };
    let plan = plan(&inventory, &policy(), at(400));
    assert_eq!(
        deleted_backups(&plan),
        [
            format!("pg-dump {}", id_of(0)),
            format!("redis {}", id_of(0))
        ]
    );
    let kept = remaining(&inventory, &plan);
    assert_eq!(kept[&Kind::Redis][0].id, id_of(1));
    assert_eq!(kept[&Kind::Etcd].len(), 1);
}

#[test]
fn order_comes_from_the_manifests_times_not_the_names() {
    // A backup whose id sorts last but ended first (a clock step, a renamed host).
    let mut odd = backup(Kind::Etcd, 0, &[]);
    odd.id = id_of(999);
    let newer = backup(Kind::Etcd, 1, &[]);
    let inventory = Inventory {
        backups: vec![odd, newer],
        ..Inventory::default()
    };
    assert_eq!(
        deleted_backups(&plan(&inventory, &policy(), at(100))),
        [format!("etcd {}", id_of(999))]
    );
}

#[test]
fn objects_named_by_a_kept_backup_outlive_their_own_backup() {
    let shared = "data/redis/redis-000/aof/appendonly.aof.1.base.rdb.zst";
    let data = |key: &str, id: BackupId, day: i64| DataObject {
        key: key.into(),
        kind: Kind::Redis,
        id,
        last_modified: at(day),
    };
    let inventory = Inventory {
        backups: vec![
            backup(
                Kind::Redis,
                0,
                &["data/redis/redis-000/dump.rdb.zst", shared],
            ),
            backup(
                Kind::Redis,
                9,
                &["data/redis/redis-009/dump.rdb.zst", shared],
            ),
        ],
        data: vec![
            data("data/redis/redis-000/dump.rdb.zst", id_of(0), 0),
            data(shared, id_of(0), 0),
            data("data/redis/redis-009/dump.rdb.zst", id_of(9), 9),
            // A run that never committed: old enough, and too recent.
            data("data/redis/redis-005/dump.rdb.zst", id_of(5), 5),
            data("data/redis/redis-009b/_claim.json", id_of(9).next(), 9),
        ],
        wal: Vec::new(),
        streamed: Vec::new(),
    };
    let plan = plan(&inventory, &policy(), at(9) + TimeDelta::hours(12));
    let objects: Vec<(String, String)> = plan
        .deletions()
        .filter_map(|d| match &d.target {
            Target::Object { key } => Some((key.clone(), d.reason.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(objects.len(), 2, "{objects:?}");
    assert_eq!(objects[0].0, "data/redis/redis-000/dump.rdb.zst");
    assert_eq!(objects[1].0, "data/redis/redis-005/dump.rdb.zst");
    assert!(objects[1].1.contains("never finished"), "{}", objects[1].1);
}

#[test]
fn deletions_come_manifests_first_then_data_then_wal() {
    let mut old = base(0);
    old.objects = vec!["data/pg-base/pg-base-000/base.tar.zst".into()];
    let inventory = Inventory {
        backups: vec![old, base(5), base(45)],
        data: vec![DataObject {
            key: "data/pg-base/pg-base-000/base.tar.zst".into(),
            kind: Kind::PgBase,
            id: id_of(0),
            last_modified: at(0),
        }],
        wal: vec![segment(1, 1)],
        streamed: Vec::new(),
    };
    let plan = plan(&inventory, &policy(), at(50));
    let order: Vec<u8> = plan
        .deletions()
        .map(|d| match d.target {
            Target::Backup { .. } => 0,
            Target::Object { .. } => 1,
            Target::Wal { .. } => 2,
        })
        .collect();
    assert_eq!(order, [0, 1, 2]);
}

#[test]
fn without_base_backups_no_wal_is_deleted() {
    let inventory = Inventory {
        backups: vec![backup(Kind::PgDump, 0, &[])],
        data: Vec::new(),
        wal: vec![segment(1, 1), segment(1, 2)],
        streamed: Vec::new(),
    };
    assert_eq!(plan(&inventory, &policy(), at(100)).deletions().count(), 0);
}

/// A streamed chunk (`from`..`to` bytes) of segment `seg` on timeline 1.
fn chunk(seg: u32, from: u32, to: u32) -> WalObject {
    let file = segment(1, seg).file;
    WalObject {
        key: format!("wal-stream/x/{}/{from:08X}-{to:08X}.zst", file.name()),
        file,
    }
}

#[test]
fn streamed_chunks_go_once_archived_or_before_the_oldest_kept_start() {
    // Base backups of days 0, 25 and 45 (start segments 0, 250, 450); on day 60 day 25's
    // anchors the window and day 0's goes.
    let inventory = Inventory {
        backups: vec![base(0), base(25), base(45)],
        wal: vec![segment(1, 5), segment(1, 460)],
        streamed: vec![
            chunk(5, 0, 100),
            chunk(7, 0, 100),
            chunk(460, 0, 100),
            chunk(460, 100, 200),
            chunk(461, 0, 100),
        ],
        ..Inventory::default()
    };
    let plan = plan(&inventory, &policy(), at(60));
    let deleted: BTreeMap<&str, &str> = plan
        .deletions()
        .filter_map(|d| match &d.target {
            Target::Wal { key } if key.starts_with("wal-stream/") => {
                Some((key.as_str(), d.reason.as_str()))
            }
            _ => None,
        })
        .collect();
    let name = |seg| segment(1, seg).file.name();
    // The segment being streamed now (461) stays: it is the newest WAL there is.
    let kept = [format!("wal-stream/x/{}/00000000-00000064.zst", name(461))];
    assert!(
        deleted.keys().all(|key| !kept.iter().any(|k| k == key)),
        "{deleted:?}"
    );
    assert_eq!(deleted.len(), 4, "{deleted:?}");
    assert!(
        deleted[format!("wal-stream/x/{}/00000064-000000C8.zst", name(460)).as_str()]
            .contains("archived"),
        "{deleted:?}"
    );
    // Segment 7, never archived, is before day 25's start.
    assert!(
        deleted[format!("wal-stream/x/{}/00000000-00000064.zst", name(7)).as_str()]
            .contains("oldest kept base backup"),
        "{deleted:?}"
    );
    // Chunks are never deleted twice, for being archived and old at once.
    assert_eq!(
        plan.deletions()
            .filter(|d| matches!(&d.target, Target::Wal { key } if key.contains(&name(5))))
            .count(),
        2
    );
}

/// Random histories: backups of every kind on random days, base backups on random timelines
/// with increasing start segments, WAL from segment 0 up, and `now` anywhere after.
fn history() -> impl Strategy<Value = (Inventory, DateTime<Utc>)> {
    let kinds = prop::sample::select(Kind::ALL.to_vec());
    let backups = prop::collection::vec((kinds, 0i64..120, 0u32..3, any::<bool>()), 0..40);
    (backups, 0i64..200).prop_map(|(specs, now_after)| {
        let mut inventory = Inventory::default();
        let mut last_day = 0;
        let mut incremental = Vec::new();
        for (n, (kind, day, timeline, is_incremental)) in specs.into_iter().enumerate() {
            let mut b = backup(kind, day, &[]);
            // Unique per kind whatever the day: a second apart in the order drawn.
            b.id = BackupId::at(at(day) + TimeDelta::seconds(i64::try_from(n).unwrap()));
            let key = format!("data/{kind}/{}/object", b.id);
            b.objects = vec![key.clone()];
            if kind == Kind::PgBase {
                b.wal_start = Some(WalFile::Segment {
                    timeline: timeline + 1,
                    log: 0,
                    seg: u32::try_from(day * 10).unwrap(),
                });
            }
            inventory.data.push(DataObject {
                key,
                kind,
                id: b.id.clone(),
                last_modified: b.end_time,
            });
            last_day = last_day.max(day);
            incremental.push(is_incremental && kind == Kind::PgBase);
            inventory.backups.push(b);
        }
        // An incremental's parent: the newest base backup that ended before it started.
        let parents: Vec<Option<BackupId>> = inventory
            .backups
            .iter()
            .zip(&incremental)
            .map(|(b, is_incremental)| {
                let parent = inventory
                    .backups
                    .iter()
                    .filter(|p| p.kind == Kind::PgBase && p.end_time < b.start_time)
                    .max_by(|x, y| (x.end_time, &x.id).cmp(&(y.end_time, &y.id)))?;
                is_incremental.then(|| parent.id.clone())
            })
            .collect();
        for (b, parent) in inventory.backups.iter_mut().zip(parents) {
            b.parent = parent;
        }
        for seg in 0..u32::try_from(last_day * 10 + 10).unwrap() {
            for timeline in 1..=3 {
                inventory.wal.push(segment(timeline, seg));
            }
        }
        (inventory, at(last_day + now_after))
    })
}

#[test]
fn the_chain_under_a_kept_incremental_is_kept() {
    // A full on day 0, incrementals on days 1 and 2 (each on the one before), a full on day 3,
    // an incremental on day 4 on top of it. At day 40 the window starts on day 10: the day 4
    // incremental is the newest before it (kept to anchor the window) and so its full of day 3,
    // but nothing of days 0 to 2.
    let mut backups: Vec<Backup> = (0..5).map(base).collect();
    backups[1].parent = Some(backups[0].id.clone());
    backups[2].parent = Some(backups[1].id.clone());
    backups[4].parent = Some(backups[3].id.clone());
    let inventory = Inventory {
        backups: backups.clone(),
        ..Inventory::default()
    };
    let plan = plan(&inventory, &policy(), at(40));
    let kept = remaining(&inventory, &plan);
    let kept: Vec<&BackupId> = kept[&Kind::PgBase].iter().map(|b| &b.id).collect();
    assert_eq!(kept, vec![&backups[3].id, &backups[4].id]);
    let reason = plan
        .decisions
        .iter()
        .find(|d| {
            d.target
                == Target::Backup {
                    kind: Kind::PgBase,
                    id: backups[3].id.clone(),
                }
        })
        .map(|d| d.reason.clone())
        .unwrap();
    assert!(reason.contains("parent of kept incremental"), "{reason}");
}

proptest! {
    #[test]
    fn keeps_every_ancestor_of_a_kept_backup((inventory, now) in history()) {
        let plan = plan(&inventory, &policy(), now);
        let kept = remaining(&inventory, &plan);
        let kept_ids: BTreeSet<&str> = kept.values().flatten().map(|b| b.id.as_str()).collect();
        for backup in kept.values().flatten() {
            if let Some(parent) = &backup.parent {
                prop_assert!(kept_ids.contains(parent.as_str()), "{} kept without its parent {}", backup.id, parent);
            }
        }
    }

    #[test]
    fn never_deletes_the_newest_backup_of_a_kind((inventory, now) in history()) {
        let plan = plan(&inventory, &policy(), now);
        let kept = remaining(&inventory, &plan);
        for kind in Kind::ALL {
            let newest = inventory.backups.iter().filter(|b| b.kind == kind)
                .max_by(|a, b| (a.end_time, &a.id).cmp(&(b.end_time, &b.id)));
            if let Some(newest) = newest {
                prop_assert!(kept[&kind].iter().any(|b| b.id == newest.id));
            }
        }
    }

    #[test]
    fn never_deletes_wal_or_data_a_kept_backup_needs((inventory, now) in history()) {
        let plan = plan(&inventory, &policy(), now);
        let kept = remaining(&inventory, &plan);
        let deleted: BTreeSet<&str> = plan.deletions().map(|d| match &d.target {
            Target::Object { key } | Target::Wal { key } => key.as_str(),
            Target::Backup { id, .. } => id.as_str(),
        }).collect();
        for backup in kept.values().flatten() {
            for object in &backup.objects {
                prop_assert!(!deleted.contains(object.as_str()), "{} of kept {}", object, backup.id);
            }
            if let Some(start) = &backup.wal_start {
                for wal in &inventory.wal {
                    if let WalFile::Segment { log, seg, .. } = wal.file
                        && Some((log, seg)) >= start.position()
                    {
                        prop_assert!(!deleted.contains(wal.key.as_str()), "{} needed by {}", wal.key, backup.id);
                    }
                }
            }
        }
    }

    #[test]
    fn every_moment_of_the_recovery_window_keeps_a_base_backup((inventory, now) in history()) {
        let plan = plan(&inventory, &policy(), now);
        let kept = remaining(&inventory, &plan);
        let bases = kept.get(&Kind::PgBase).cloned().unwrap_or_default();
        // For each hour of the window: if any base backup had ended by then, a kept one has.
        for hour in 0..=(30 * 24) {
            let moment = now - TimeDelta::hours(hour);
            let existed = inventory.backups.iter()
                .any(|b| b.kind == Kind::PgBase && b.end_time <= moment);
            if existed {
                prop_assert!(bases.iter().any(|b| b.end_time <= moment), "no base for {}", moment);
            }
        }
    }

    #[test]
    fn backups_inside_their_window_are_kept((inventory, now) in history()) {
        let plan = plan(&inventory, &policy(), now);
        for decision in plan.deletions() {
            if let Target::Backup { kind, id } = &decision.target {
                let backup = inventory.backups.iter().find(|b| &b.id == id).unwrap();
                prop_assert!(backup.end_time <= now - policy().window(*kind), "{} {}", kind, id);
            }
        }
    }
}
