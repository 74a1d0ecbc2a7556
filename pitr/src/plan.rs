//! The restore planner: which base backup a target needs, which timeline recovery will follow,
//! and whether the archive holds every WAL segment on the way. Pure: the agent lists the store
//! and passes in what it found.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};

use crate::history::{TimelinePath, TimelineSpan};
use crate::target::{RecoveryTarget, TargetTimeline, postgres_time};
use crate::{Lsn, SegmentNo, WalFile};

/// What the planner needs to know of one base backup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseBackup {
    pub id: String,
    pub timeline: u32,
    pub start_lsn: Lsn,
    pub stop_lsn: Lsn,
    /// When the backup was complete (its WAL archived): no target before it can use it.
    pub end_time: DateTime<Utc>,
}

/// The WAL archive as listed: segments with the time they were stored, and the parsed timeline
/// histories.
#[derive(Debug, Clone)]
pub struct Archive {
    segment_size: u64,
    /// (timeline, segment number) → when it was stored.
    segments: BTreeMap<(u32, u64), DateTime<Utc>>,
    histories: BTreeMap<u32, TimelinePath>,
    /// When each history file was stored: its timeline began before then.
    history_stored: BTreeMap<u32, DateTime<Utc>>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("the store has no base backup (take one with 'gc-backup backup pg-base')")]
    NoBackup,
    #[error(
        "the target {target} is before the earliest usable base backup ({id}, complete at {end}); \
         nothing in the store can restore to it"
    )]
    TargetBeforeBackups {
        target: String,
        id: String,
        end: String,
    },
    #[error(
        "the target {target} is before base backup {id} was complete ({end}); choose an older --backup"
    )]
    TargetBeforeBackup {
        target: String,
        id: String,
        end: String,
    },
    #[error("timeline {0} has no history file ({0:08X}.history) in the archive")]
    MissingHistory(u32),
    #[error(
        "base backup {id} is on timeline {backup_timeline}, which timeline \
         {target_timeline} did not branch from after the backup; recovery cannot follow it"
    )]
    NotOnPath {
        id: String,
        backup_timeline: u32,
        target_timeline: u32,
    },
    #[error(
        "WAL segment {name} is missing from the archive, and later segments exist: the WAL chain from base backup {id} is broken there"
    )]
    Gap { name: String, id: String },
    #[error(
        "WAL segment {name} is not in the archive: base backup {id} cannot become consistent without it"
    )]
    Unfinished { name: String, id: String },
    #[error(
        "the target {target} is after the newest archived WAL ({newest}); restore without a \
         target to recover everything archived, or wait until the segment holding the target \
         is archived (SELECT pg_switch_wal() on the source forces it)"
    )]
    TargetAfterArchive { target: String, newest: String },
    #[error(
        "the {target} is after timeline {newer} branched off timeline {older} (at {fork}), and \
         timeline {older} goes on past that point in the archive too: both hold a moment \
         there. Add --target-timeline {older} for the timeline that went on, or \
         --target-timeline {newest} (or latest) for the newer one"
    )]
    AmbiguousTimeline {
        target: String,
        older: u32,
        newer: u32,
        newest: u32,
        fork: String,
    },
    #[error(
        "{reason}; timeline {timeline}, which timeline {newest} branched off at {fork}, \
         reaches it: add --target-timeline {timeline}"
    )]
    OnOlderTimeline {
        reason: String,
        timeline: u32,
        newest: u32,
        fork: String,
    },
}

/// What a restore will do, decided before anything is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestorePlan {
    /// Index into the backups given to [`plan`].
    pub backup: usize,
    /// The timeline recovery ends on (`recovery_target_timeline = 'latest'` picks it too).
    pub timeline: u32,
    /// The first and last segments checked, and how many.
    pub first_wal: String,
    pub last_wal: String,
    pub segments: u64,
    /// When the last checked segment was stored.
    pub last_stored: Option<DateTime<Utc>>,
}

impl Archive {
    pub fn new(segment_size: u64) -> Self {
        Archive {
            segment_size,
            segments: BTreeMap::new(),
            histories: BTreeMap::new(),
            history_stored: BTreeMap::new(),
        }
    }

    /// Adds a listed file. `.partial` and `.backup` files are not needed to replay; history
    /// files are added with [`Archive::add_history`] once read.
    pub fn add(&mut self, file: &WalFile, stored: DateTime<Utc>) {
        if let WalFile::Segment { .. } = file
            && let Some(segment) = file.segment_no(self.segment_size)
        {
            self.segments.insert((file.timeline(), segment.0), stored);
        }
    }

    /// A segment known only from its streamed beginning: counted unless the archive has it
    /// (its archived object is the whole segment, and its time is when that was stored).
    pub fn add_streamed(&mut self, file: &WalFile, stored: DateTime<Utc>) {
        if let WalFile::Segment { .. } = file
            && let Some(segment) = file.segment_no(self.segment_size)
        {
            self.segments
                .entry((file.timeline(), segment.0))
                .or_insert(stored);
        }
    }

    pub fn add_history(&mut self, path: TimelinePath) {
        self.histories.insert(path.target(), path);
    }

    /// When the history file of `timeline` was stored (the listing's time).
    pub fn add_history_stored(&mut self, timeline: u32, stored: DateTime<Utc>) {
        self.history_stored.insert(timeline, stored);
    }

    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    /// The newest timeline recovery would switch to from `from`: PostgreSQL probes history
    /// files `from + 1`, `from + 2`, … and stops at the first one missing.
    pub fn newest_timeline(&self, from: u32) -> u32 {
        let mut newest = from;
        while self.histories.contains_key(&(newest + 1)) {
            newest += 1;
        }
        newest
    }

    fn path(&self, timeline: u32) -> Result<TimelinePath, PlanError> {
        if timeline == 1 {
            return Ok(TimelinePath::first());
        }
        self.histories
            .get(&timeline)
            .cloned()
            .ok_or(PlanError::MissingHistory(timeline))
    }

    fn name(&self, timeline: u32, segment: u64) -> String {
        SegmentNo(segment).file_name(timeline, self.segment_size)
    }

    fn segment_of(&self, lsn: Lsn) -> u64 {
        SegmentNo::of(lsn, self.segment_size).0
    }

    /// The file recovery reads for `segment`: the newest timeline of the path that had begun by
    /// that segment, falling back to older ones that still cover it (as PostgreSQL does).
    fn lookup(&self, spans: &[TimelineSpan], segment: u64) -> Result<(u32, DateTime<Utc>), u32> {
        let covering = spans.iter().rev().filter(|span| {
            self.segment_of(span.begin) <= segment
                && span.end.is_none_or(|end| segment <= self.segment_of(end))
        });
        let mut expected = None;
        for span in covering {
            expected.get_or_insert(span.timeline);
            if let Some(stored) = self.segments.get(&(span.timeline, segment)) {
                return Ok((span.timeline, *stored));
            }
        }
        Err(expected.unwrap_or(spans.last().map_or(1, |s| s.timeline)))
    }

    /// The timeline recovery from `backup` ends on when it follows `following`.
    fn timeline_to_follow(&self, backup: &BaseBackup, following: TargetTimeline) -> u32 {
        match following {
            TargetTimeline::Latest => self.newest_timeline(backup.timeline),
            TargetTimeline::Current => backup.timeline,
            TargetTimeline::Exact(timeline) => timeline,
        }
    }

    /// Whether `timeline`, which `newer` branched off at `fork`, has WAL in the archive past
    /// that point that reaches `target`: a later segment stored at or after a time target
    /// that is itself after `newer` began (its history file was stored), or the segment of
    /// an LSN target past the fork.
    fn goes_on_past(&self, timeline: u32, fork: Lsn, target: &RecoveryTarget, newer: u32) -> bool {
        let fork_segment = self.segment_of(fork);
        let mut later = self
            .segments
            .range((timeline, fork_segment + 1)..(timeline, u64::MAX));
        match target {
            RecoveryTarget::Time(time) => {
                self.history_stored
                    .get(&newer)
                    .is_some_and(|began| began <= time)
                    && later.any(|(_, stored)| stored >= time)
            }
            RecoveryTarget::Lsn(lsn) => {
                *lsn >= fork
                    && self
                        .segments
                        .contains_key(&(timeline, self.segment_of(*lsn)))
                    && self.segment_of(*lsn) > fork_segment
            }
            // Where a restore point or a transaction lies, the listing cannot tell.
            RecoveryTarget::Latest | RecoveryTarget::Xid(_) | RecoveryTarget::Name(_) => false,
        }
    }

    /// Whether any segment after `segment` exists on the path: then a missing one is a gap.
    /// (A timeline's segments past where the path leaves it are not on the path.)
    fn anything_after(&self, spans: &[TimelineSpan], segment: u64) -> bool {
        spans.iter().any(|span| {
            let last = span.end.map_or(u64::MAX, |end| self.segment_of(end));
            segment < last
                && self
                    .segments
                    .range((span.timeline, segment + 1)..=(span.timeline, last))
                    .next()
                    .is_some()
        })
    }
}

/// Chooses the base backup for `target` (or checks the one given) and checks the WAL chain,
/// following the newest timeline as an operator who named none expects (see [`plan_on`]).
pub fn plan(
    backups: &[BaseBackup],
    archive: &Archive,
    target: &RecoveryTarget,
    chosen: Option<usize>,
) -> Result<RestorePlan, PlanError> {
    plan_on(backups, archive, target, chosen, None)
}

/// [`plan`] along `timeline` (`recovery_target_timeline`). Given none, the newest timeline is
/// followed, but a target that an older timeline of the path reaches past the point where the
/// newer one branched off is refused with the flag to choose: both timelines hold a moment
/// there, and which the operator means cannot be guessed. (A restore to T1 promoted onto a new
/// timeline that archives, while production goes on: a later target is production's.)
pub fn plan_on(
    backups: &[BaseBackup],
    archive: &Archive,
    target: &RecoveryTarget,
    chosen: Option<usize>,
    timeline: Option<TargetTimeline>,
) -> Result<RestorePlan, PlanError> {
    let planned = plan_along(
        backups,
        archive,
        target,
        chosen,
        timeline.unwrap_or_default(),
    );
    if timeline.is_some() || matches!(target, RecoveryTarget::Latest) {
        return planned;
    }
    let on_older = |older: u32| {
        plan_along(
            backups,
            archive,
            target,
            chosen,
            TargetTimeline::Exact(older),
        )
        .is_ok()
    };
    match planned {
        Ok(plan) => {
            let path = archive.path(plan.timeline)?;
            for (older, newer) in path.spans().iter().zip(path.spans().iter().skip(1)) {
                let Some(fork) = older.end else { continue };
                if older.timeline < backups[plan.backup].timeline
                    || !archive.goes_on_past(older.timeline, fork, target, newer.timeline)
                    || !on_older(older.timeline)
                {
                    continue;
                }
                return Err(PlanError::AmbiguousTimeline {
                    target: target.to_string(),
                    older: older.timeline,
                    newer: newer.timeline,
                    newest: plan.timeline,
                    fork: fork.to_string(),
                });
            }
            Ok(plan)
        }
        Err(error @ (PlanError::TargetAfterArchive { .. } | PlanError::Gap { .. })) => {
            let newest = backups
                .iter()
                .map(|b| archive.newest_timeline(b.timeline))
                .max()
                .unwrap_or(1);
            let Ok(path) = archive.path(newest) else {
                return Err(error);
            };
            for span in path.spans().iter().rev().skip(1) {
                if let Some(fork) = span.end
                    && on_older(span.timeline)
                {
                    return Err(PlanError::OnOlderTimeline {
                        reason: error.to_string(),
                        timeline: span.timeline,
                        newest,
                        fork: fork.to_string(),
                    });
                }
            }
            Err(error)
        }
        Err(error) => Err(error),
    }
}

fn plan_along(
    backups: &[BaseBackup],
    archive: &Archive,
    target: &RecoveryTarget,
    chosen: Option<usize>,
    following: TargetTimeline,
) -> Result<RestorePlan, PlanError> {
    if backups.is_empty() {
        return Err(PlanError::NoBackup);
    }
    let target_text = target.to_string();
    let index = match chosen {
        Some(index) => {
            let backup = &backups[index];
            if !reaches(backup, target) {
                return Err(PlanError::TargetBeforeBackup {
                    target: target_text,
                    id: backup.id.clone(),
                    end: end_text(backup),
                });
            }
            index
        }
        None => {
            let mut order: Vec<usize> = (0..backups.len()).collect();
            order.sort_by_key(|&i| (backups[i].end_time, backups[i].stop_lsn));
            let usable: Vec<usize> = order
                .into_iter()
                .filter(|&i| on_path(&backups[i], archive, following))
                .collect();
            let reaching = usable.iter().rev().find(|&&i| reaches(&backups[i], target));
            match (reaching, usable.first()) {
                (Some(&i), _) => i,
                (None, Some(&earliest)) => {
                    return Err(PlanError::TargetBeforeBackups {
                        target: target_text,
                        id: backups[earliest].id.clone(),
                        end: end_text(&backups[earliest]),
                    });
                }
                // No backup can follow the timeline; report why for the newest one.
                (None, None) => backups.len() - 1,
            }
        }
    };
    let backup = &backups[index];
    let timeline = archive.timeline_to_follow(backup, following);
    let path = archive.path(timeline)?;
    if !path.continues_from(backup.timeline, backup.stop_lsn) {
        return Err(PlanError::NotOnPath {
            id: backup.id.clone(),
            backup_timeline: backup.timeline,
            target_timeline: timeline,
        });
    }
    let spans: Vec<TimelineSpan> = path
        .spans()
        .iter()
        .filter(|span| span.timeline >= backup.timeline)
        .copied()
        .collect();
    check_chain(
        archive,
        &spans,
        backup,
        target,
        &target_text,
        index,
        timeline,
    )
}

fn check_chain(
    archive: &Archive,
    spans: &[TimelineSpan],
    backup: &BaseBackup,
    target: &RecoveryTarget,
    target_text: &str,
    index: usize,
    timeline: u32,
) -> Result<RestorePlan, PlanError> {
    let first = archive.segment_of(backup.start_lsn);
    let consistent_at = archive.segment_of(backup.stop_lsn);
    let last_needed = match target {
        RecoveryTarget::Lsn(lsn) => Some(archive.segment_of(*lsn)),
        _ => None,
    };
    let mut found: Option<(u32, u64, DateTime<Utc>)> = None;
    let mut segment = first;
    loop {
        match archive.lookup(spans, segment) {
            Ok((tli, stored)) => {
                found = Some((tli, segment, stored));
                let done = match target {
                    RecoveryTarget::Lsn(_) => last_needed.is_some_and(|last| segment >= last),
                    RecoveryTarget::Time(time) => segment >= consistent_at && stored >= *time,
                    _ => false,
                };
                if done {
                    break;
                }
                segment += 1;
            }
            Err(tli) => {
                let name = archive.name(tli, segment);
                if archive.anything_after(spans, segment) {
                    return Err(PlanError::Gap {
                        name,
                        id: backup.id.clone(),
                    });
                }
                if segment <= consistent_at {
                    return Err(PlanError::Unfinished {
                        name,
                        id: backup.id.clone(),
                    });
                }
                if matches!(target, RecoveryTarget::Lsn(_) | RecoveryTarget::Time(_)) {
                    let newest = found.map_or_else(String::new, |(tli, segment, stored)| {
                        format!(
                            "{}, stored {}",
                            archive.name(tli, segment),
                            postgres_time(stored)
                        )
                    });
                    return Err(PlanError::TargetAfterArchive {
                        target: target_text.to_string(),
                        newest,
                    });
                }
                break;
            }
        }
    }
    let (last_tli, last_segment, last_stored) =
        found.unwrap_or((backup.timeline, first, backup.end_time));
    Ok(RestorePlan {
        backup: index,
        timeline,
        first_wal: archive.name(backup.timeline, first),
        last_wal: archive.name(last_tli, last_segment),
        segments: last_segment + 1 - first,
        last_stored: found.map(|_| last_stored),
    })
}

/// Whether recovery from `backup` can stop at `target`: it must lie after the backup ended.
fn reaches(backup: &BaseBackup, target: &RecoveryTarget) -> bool {
    match target {
        RecoveryTarget::Time(time) => backup.end_time <= *time,
        RecoveryTarget::Lsn(lsn) => backup.stop_lsn <= *lsn,
        RecoveryTarget::Latest | RecoveryTarget::Xid(_) | RecoveryTarget::Name(_) => true,
    }
}

fn on_path(backup: &BaseBackup, archive: &Archive, following: TargetTimeline) -> bool {
    let timeline = archive.timeline_to_follow(backup, following);
    archive
        .path(timeline)
        .is_ok_and(|path| path.continues_from(backup.timeline, backup.stop_lsn))
}

fn end_text(backup: &BaseBackup) -> String {
    format!(
        "{}, LSN {}",
        postgres_time(backup.end_time),
        backup.stop_lsn
    )
}

/// The timelines whose history files the archive lists, for loading them.
pub fn history_timelines(files: &[WalFile]) -> BTreeSet<u32> {
    files
        .iter()
        .filter_map(|file| match file {
            WalFile::History { timeline } => Some(*timeline),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests;
