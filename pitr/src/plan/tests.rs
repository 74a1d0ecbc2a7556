use chrono::TimeDelta;
use proptest::prelude::*;

use super::*;
use crate::target::parse_time;

const MIB16: u64 = 16 << 20;

fn lsn(text: &str) -> Lsn {
    text.parse().unwrap()
}

fn at(minute: i64) -> DateTime<Utc> {
    parse_time("2026-01-15 10:00:00+00").unwrap() + TimeDelta::minutes(minute)
}

fn backup(id: &str, timeline: u32, start: &str, stop: &str, end_minute: i64) -> BaseBackup {
    BaseBackup {
        id: id.into(),
        timeline,
        start_lsn: lsn(start),
        stop_lsn: lsn(stop),
        end_time: at(end_minute),
    }
}

/// Segments `first..=last` of `timeline`, segment N stored at minute N.
fn archive_with(ranges: &[(u32, u64, u64)]) -> Archive {
    let mut archive = Archive::new(MIB16);
    for &(timeline, first, last) in ranges {
        for segment in first..=last {
            let name = SegmentNo(segment).file_name(timeline, MIB16);
            archive.add(&WalFile::parse(&name).unwrap(), at(segment as i64));
        }
    }
    archive
}

fn two_backups() -> Vec<BaseBackup> {
    vec![
        backup("A", 1, "0/2000028", "0/2000100", 2),
        backup("B", 1, "0/5000028", "0/5000100", 5),
    ]
}

#[test]
fn latest_uses_the_newest_backup_and_checks_to_the_end() {
    let archive = archive_with(&[(1, 2, 8)]);
    let plan = plan(&two_backups(), &archive, &RecoveryTarget::Latest, None).unwrap();
    assert_eq!(plan.backup, 1);
    assert_eq!(plan.timeline, 1);
    assert_eq!(plan.first_wal, "000000010000000000000005");
    assert_eq!(plan.last_wal, "000000010000000000000008");
    assert_eq!(plan.segments, 4);
}

#[test]
fn a_time_target_picks_the_newest_backup_that_ended_before_it() {
    let archive = archive_with(&[(1, 2, 8)]);
    let backups = two_backups();
    let between = RecoveryTarget::Time(at(4) - TimeDelta::seconds(30));
    let plan_a = plan(&backups, &archive, &between, None).unwrap();
    assert_eq!(plan_a.backup, 0);
    // Checked up to the first segment stored after the target.
    assert_eq!(plan_a.last_wal, "000000010000000000000004");
    assert_eq!(
        plan(&backups, &archive, &RecoveryTarget::Time(at(7)), None)
            .unwrap()
            .backup,
        1
    );
    assert!(matches!(
        plan(&backups, &archive, &RecoveryTarget::Time(at(1)), None),
        Err(PlanError::TargetBeforeBackups { id, .. }) if id == "A"
    ));
    assert!(matches!(
        plan(&backups, &archive, &RecoveryTarget::Time(at(9)), None),
        Err(PlanError::TargetAfterArchive { newest, .. }) if newest.starts_with("000000010000000000000008")
    ));
    // A chosen backup that ended after the target is refused, not silently replaced.
    assert!(matches!(
        plan(&backups, &archive, &between, Some(1)),
        Err(PlanError::TargetBeforeBackup { id, .. }) if id == "B"
    ));
}

#[test]
fn an_lsn_target_needs_its_segment_archived() {
    let archive = archive_with(&[(1, 2, 8)]);
    let backups = two_backups();
    let target = RecoveryTarget::Lsn(lsn("0/6123456"));
    let plan = plan(&backups, &archive, &target, None).unwrap();
    assert_eq!(
        (plan.backup, plan.last_wal.as_str()),
        (1, "000000010000000000000006")
    );
    assert!(matches!(
        super::plan(
            &backups,
            &archive,
            &RecoveryTarget::Lsn(lsn("0/9000000")),
            None
        ),
        Err(PlanError::TargetAfterArchive { .. })
    ));
    assert!(matches!(
        super::plan(
            &backups,
            &archive,
            &RecoveryTarget::Lsn(lsn("0/2000000")),
            None
        ),
        Err(PlanError::TargetBeforeBackups { .. })
    ));
}

#[test]
fn a_missing_segment_is_named() {
    let archive = archive_with(&[(1, 2, 5), (1, 7, 8)]);
    assert_eq!(
        plan(&two_backups(), &archive, &RecoveryTarget::Latest, None),
        Err(PlanError::Gap {
            name: "000000010000000000000006".into(),
            id: "B".into()
        })
    );
    // The WAL up to the backup's end must be there even when nothing follows it.
    let archive = archive_with(&[(1, 2, 4)]);
    assert_eq!(
        plan(&two_backups(), &archive, &RecoveryTarget::Latest, Some(1)),
        Err(PlanError::Unfinished {
            name: "000000010000000000000005".into(),
            id: "B".into()
        })
    );
    // An xid target cannot be located, so the whole chain is checked.
    let archive = archive_with(&[(1, 2, 5), (1, 7, 8)]);
    assert!(matches!(
        plan(&two_backups(), &archive, &RecoveryTarget::Xid(900), None),
        Err(PlanError::Gap { .. })
    ));
}

/// Timeline 2 branched off timeline 1 inside segment 6; the old primary went on writing
/// timeline 1 for a while and took backup C there.
fn after_failover() -> (Vec<BaseBackup>, Archive) {
    let mut archive = archive_with(&[(1, 2, 8), (2, 6, 9)]);
    archive.add_history(
        TimelinePath::parse(2, "1\t0/6000100\tno recovery target specified\n").unwrap(),
    );
    let mut backups = two_backups();
    backups.push(backup("C", 1, "0/7000028", "0/7000100", 7));
    (backups, archive)
}

#[test]
fn latest_follows_the_newest_timeline_across_the_switch() {
    let (backups, archive) = after_failover();
    let plan = plan(&backups, &archive, &RecoveryTarget::Latest, None).unwrap();
    // C is newer but on the abandoned branch: B is the newest that leads to timeline 2.
    assert_eq!(backups[plan.backup].id, "B");
    assert_eq!(plan.timeline, 2);
    assert_eq!(plan.first_wal, "000000010000000000000005");
    assert_eq!(plan.last_wal, "000000020000000000000009");
    assert!(matches!(
        super::plan(&backups, &archive, &RecoveryTarget::Latest, Some(2)),
        Err(PlanError::NotOnPath { id, target_timeline: 2, .. }) if id == "C"
    ));
}

#[test]
fn the_switch_segment_is_read_from_the_new_timeline() {
    let (backups, mut archive) = after_failover();
    // Without timeline 2's copy of segment 6 the chain breaks, even though timeline 1 has
    // a segment 6: PostgreSQL falls back to it, and so does the check.
    archive.segments.remove(&(2, 6));
    let plan = plan(&backups[..2], &archive, &RecoveryTarget::Latest, None).unwrap();
    assert_eq!(plan.last_wal, "000000020000000000000009");
    archive.segments.remove(&(1, 6));
    assert_eq!(
        super::plan(&backups[..2], &archive, &RecoveryTarget::Latest, None),
        Err(PlanError::Gap {
            name: "000000020000000000000006".into(),
            id: "B".into()
        })
    );
}

#[test]
fn a_missing_history_file_stops_the_timeline_walk() {
    let mut archive = archive_with(&[(1, 2, 8)]);
    archive.add_history(TimelinePath::parse(3, "1\t0/6000100\n2\t0/7000000\n").unwrap());
    // 00000002.history is not there: PostgreSQL would stay on timeline 1, and so do we.
    assert_eq!(archive.newest_timeline(1), 1);
    assert_eq!(
        history_timelines(&[WalFile::parse("00000003.history").unwrap()]),
        BTreeSet::from([3])
    );
}

proptest! {
    /// Whatever the history, a time target gets the newest backup that ended before it, and
    /// the plan never names a backup that ended after the target.
    #[test]
    fn the_chosen_backup_is_the_newest_that_ended_before_the_target(
        ends in proptest::collection::vec(0i64..60, 1..8),
        target in 0i64..70,
    ) {
        let backups: Vec<BaseBackup> = ends
            .iter()
            .enumerate()
            .map(|(i, &end)| BaseBackup {
                id: format!("b{i}"),
                timeline: 1,
                start_lsn: Lsn(2 * MIB16 + 40),
                stop_lsn: Lsn(2 * MIB16 + 200),
                end_time: at(end),
            })
            .collect();
        let archive = archive_with(&[(1, 2, 80)]);
        let result = plan(&backups, &archive, &RecoveryTarget::Time(at(target)), None);
        let best = ends.iter().filter(|&&end| end <= target).max();
        match (result, best) {
            (Ok(plan), Some(&best)) => prop_assert_eq!(backups[plan.backup].end_time, at(best)),
            (Err(PlanError::TargetBeforeBackups { .. }), None) => {}
            (other, best) => prop_assert!(false, "{other:?} for best {best:?}"),
        }
    }

    /// Removing any one segment between the backup's start and the newest one is reported,
    /// by name; removing none is not.
    #[test]
    fn every_gap_is_found(last in 6u64..40, hole in 0u64..40) {
        let mut archive = archive_with(&[(1, 2, last)]);
        let removed = archive.segments.remove(&(1, hole)).is_some();
        let result = plan(&two_backups(), &archive, &RecoveryTarget::Latest, None);
        if removed && (5..last).contains(&hole) {
            let expected = SegmentNo(hole).file_name(1, MIB16);
            let gap = matches!(&result, Err(PlanError::Gap { name, .. }) if *name == expected);
            let unfinished = hole == 5 && matches!(&result, Err(PlanError::Unfinished { .. }));
            prop_assert!(gap || unfinished, "{result:?}");
        } else {
            prop_assert!(result.is_ok(), "{result:?}");
        }
    }
}

/// [`after_failover`] with the history file of timeline 2 stored at minute 6, when it began.
fn after_failover_dated() -> (Vec<BaseBackup>, Archive) {
    let (backups, mut archive) = after_failover();
    archive.add_history_stored(2, at(6));
    (backups[..2].to_vec(), archive)
}

fn half(minute: i64) -> RecoveryTarget {
    RecoveryTarget::Time(at(minute) + TimeDelta::seconds(30))
}

#[test]
fn a_moment_both_timelines_hold_is_refused_until_one_is_chosen() {
    let (backups, archive) = after_failover_dated();
    // 7:30 is after timeline 2 began, and timeline 1 went on to segment 8 (stored at 8).
    let refused = plan(&backups, &archive, &half(7), None).unwrap_err();
    assert!(
        matches!(
            refused,
            PlanError::AmbiguousTimeline {
                older: 1,
                newer: 2,
                newest: 2,
                ..
            }
        ),
        "{refused:?}"
    );
    let text = refused.to_string();
    assert!(
        text.contains("--target-timeline 1") && text.contains("0/6000100"),
        "{text}"
    );
    let along = |timeline| plan_on(&backups, &archive, &half(7), None, Some(timeline));
    let one = along(TargetTimeline::Exact(1)).unwrap();
    assert_eq!(
        (one.timeline, one.last_wal.as_str()),
        (1, "000000010000000000000008")
    );
    assert_eq!(along(TargetTimeline::Current).unwrap().timeline, 1);
    assert_eq!(along(TargetTimeline::Latest).unwrap().timeline, 2);
    // An LSN past the fork that both timelines have is as ambiguous.
    let lsn_target = RecoveryTarget::Lsn(lsn("0/8000010"));
    assert!(matches!(
        plan(&backups, &archive, &lsn_target, None),
        Err(PlanError::AmbiguousTimeline { older: 1, .. })
    ));
}

#[test]
fn a_moment_only_one_timeline_holds_is_not_ambiguous() {
    let (backups, archive) = after_failover_dated();
    // 8:30: timeline 1's last segment was stored at 8, so only timeline 2 reaches it.
    assert_eq!(
        plan(&backups, &archive, &half(8), None).unwrap().timeline,
        2
    );
    // 5:30: before timeline 2 began, where both are the same WAL.
    assert_eq!(
        plan(&backups, &archive, &half(5), None).unwrap().timeline,
        2
    );
    // The end of the archive, a restore point, a transaction: the newest, as PostgreSQL does.
    for target in [
        RecoveryTarget::Latest,
        RecoveryTarget::Name("before_three".into()),
        RecoveryTarget::Xid(900),
    ] {
        assert_eq!(plan(&backups, &archive, &target, None).unwrap().timeline, 2);
    }
}

#[test]
fn a_target_only_an_older_timeline_reaches_is_refused_with_that_timeline() {
    // Timeline 2 (a restore promoted at 6 that archived briefly) ends at segment 7; timeline
    // 1, production, goes on to segment 10.
    let mut archive = archive_with(&[(1, 2, 10), (2, 6, 7)]);
    archive.add_history(
        TimelinePath::parse(2, "1\t0/6000100\tbefore 2026-01-15 10:05:00+00\n").unwrap(),
    );
    archive.add_history_stored(2, at(6));
    let refused = plan(&two_backups(), &archive, &half(9), None).unwrap_err();
    assert!(
        matches!(
            refused,
            PlanError::OnOlderTimeline {
                timeline: 1,
                newest: 2,
                ..
            }
        ),
        "{refused:?}"
    );
    assert!(
        refused.to_string().contains("add --target-timeline 1"),
        "{refused}"
    );
    let chosen = plan_on(
        &two_backups(),
        &archive,
        &half(9),
        None,
        Some(TargetTimeline::Exact(1)),
    )
    .unwrap();
    assert_eq!(chosen.last_wal, "00000001000000000000000A");
    // Following timeline 2 when asked to is not second-guessed: it does not reach 9:30.
    let along_two = plan_on(
        &two_backups(),
        &archive,
        &half(9),
        None,
        Some(TargetTimeline::Latest),
    );
    assert!(
        matches!(along_two, Err(PlanError::TargetAfterArchive { .. })),
        "{along_two:?}"
    );
}
