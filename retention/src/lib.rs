//! The retention planner: what to delete from the store, and why, given what is there, the
//! policy and the time. Pure: no I/O and no clock, so that a plan can be computed for any `now`
//! ("what would happen on date X") and tested exhaustively.
//!
//! Rules:
//! - A backup whose end is older than its kind's window is deleted, **except the newest backup
//!   of each kind, which is never deleted**. Only complete backups (with a manifest) are in the
//!   inventory, so every listed backup is a good one.
//! - PostgreSQL base backups keep a *recovery* window: the newest base backup that ended at or
//!   before `now - window` is kept with everything newer, so that a point-in-time restore to
//!   any moment of the window has a base backup to start from.
//! - An incremental base backup restores only on top of its parent (and the parent's parent,
//!   up to a full backup): **a backup that a kept backup needs as an ancestor is kept**,
//!   whatever its age, and so is the WAL from its start (it is a base backup of its own too).
//! - WAL older than the start segment of the oldest kept base backup is deleted, on every
//!   timeline (no kept backup can need a segment before its own start); timeline history files
//!   are always kept. Without any base backup, no WAL is deleted.
//! - Chunks of streamed WAL (the receiver's, a segment as it grew) are deleted once their
//!   segment is archived (the receiver deletes them itself; these are what a killed receiver
//!   left), and with the WAL before the oldest kept base backup's start.
//! - Data objects are deleted with their backup, unless a kept backup names them (a Redis AOF
//!   file is stored once and named by later backups). Objects of backups that never got a
//!   manifest are deleted once older than the grace period (a run may still be writing them).
//! - Deletion order, for callers: manifests first, then data, then WAL, so an interrupted run
//!   leaves only usable backups ([`Plan::deletions`] is in that order).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use chrono::{DateTime, TimeDelta, Utc};
use ids::{BackupId, Kind};
use pitr::WalFile;

/// A committed backup, as its manifest describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backup {
    pub kind: Kind,
    pub id: BackupId,
    pub start_time: DateTime<Utc>,
    pub end_time: DateTime<Utc>,
    /// The keys of its data objects (some may sit under an older backup's prefix).
    pub objects: Vec<String>,
    /// Base backups only: the first WAL segment its recovery needs.
    pub wal_start: Option<WalFile>,
    /// Incremental base backups: the backup it restores on top of.
    pub parent: Option<BackupId>,
}

/// A data object in the store (`data/<kind>/<id>/…`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataObject {
    pub key: String,
    pub kind: Kind,
    /// The id of the backup (or run) whose prefix holds it.
    pub id: BackupId,
    pub last_modified: DateTime<Utc>,
}

/// An archived WAL file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalObject {
    pub key: String,
    pub file: WalFile,
}

/// What the store holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Inventory {
    pub backups: Vec<Backup>,
    pub data: Vec<DataObject>,
    pub wal: Vec<WalObject>,
    /// Chunks of streamed WAL, each with the segment it is part of.
    pub streamed: Vec<WalObject>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// pg-dump and pg-base (a recovery window for base backups), and the WAL they need.
    pub pg: TimeDelta,
    pub redis: TimeDelta,
    pub etcd: TimeDelta,
    /// How old objects without a manifest must be before they count as abandoned.
    pub orphan_grace: TimeDelta,
}

impl Policy {
    pub fn window(&self, kind: Kind) -> TimeDelta {
        match kind {
            // A point is as useful as the PostgreSQL recovery window it lies in.
            Kind::PgDump | Kind::PgBase | Kind::Point => self.pg,
            Kind::Redis => self.redis,
            Kind::Etcd => self.etcd,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Target {
    /// A backup's manifest: deleting it is what makes the backup cease to exist.
    Backup {
        kind: Kind,
        id: BackupId,
    },
    Object {
        key: String,
    },
    Wal {
        key: String,
    },
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // As one padded string, so that `{:<48}` lines up a plan's columns.
            Target::Backup { kind, id } => f.pad(&format!("{kind} {id}")),
            Target::Object { key } | Target::Wal { key } => f.pad(key),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub target: Target,
    pub delete: bool,
    pub reason: String,
}

/// Every backup with a keep-or-delete decision, and every object or WAL file to delete.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Backups first (kept and deleted, with reasons), then objects and WAL to delete.
    pub decisions: Vec<Decision>,
}

impl Plan {
    /// What to delete, in a safe order: manifests, then data, then WAL.
    pub fn deletions(&self) -> impl Iterator<Item = &Decision> {
        let rank = |d: &&Decision| match d.target {
            Target::Backup { .. } => 0,
            Target::Object { .. } => 1,
            Target::Wal { .. } => 2,
        };
        let mut deletions: Vec<&Decision> = self.decisions.iter().filter(|d| d.delete).collect();
        deletions.sort_by_key(rank);
        deletions.into_iter()
    }

    pub fn deleted_backups(&self, kind: Kind) -> usize {
        self.decisions
            .iter()
            .filter(|d| {
                d.delete && matches!(&d.target, Target::Backup { kind: k, .. } if *k == kind)
            })
            .count()
    }
}

fn age(now: DateTime<Utc>, then: DateTime<Utc>) -> String {
    let days = (now - then).num_hours() as f64 / 24.0;
    format!("{days:.1}d")
}

/// Computes the plan. `now` is the only notion of time.
pub fn plan(inventory: &Inventory, policy: &Policy, now: DateTime<Utc>) -> Plan {
    let mut decisions = Vec::new();
    // Every backup, with its decision's index in `decisions`.
    let mut decided: Vec<(&Backup, usize)> = Vec::new();

    for kind in Kind::ALL {
        let window = policy.window(kind);
        let cutoff = now - window;
        let mut backups: Vec<&Backup> = inventory
            .backups
            .iter()
            .filter(|b| b.kind == kind)
            .collect();
        // By the times in the manifests, not by names.
        backups.sort_by(|a, b| (a.end_time, &a.id).cmp(&(b.end_time, &b.id)));
        let newest = backups.len().checked_sub(1);
        // Base backups: the newest that ended at or before the cutoff anchors the window.
        let anchor = if kind == Kind::PgBase {
            backups.iter().rposition(|b| b.end_time <= cutoff)
        } else {
            None
        };
        for (index, backup) in backups.iter().enumerate() {
            let (delete, reason) = if Some(index) == newest {
                (
                    false,
                    "the newest backup of its kind is always kept".to_string(),
                )
            } else if backup.end_time > cutoff {
                (
                    false,
                    format!("inside the {}-day window", window.num_days()),
                )
            } else if Some(index) == anchor {
                (
                    false,
                    format!(
                        "the newest base backup before the {}-day recovery window starts: \
                         PITR to its first moment starts here",
                        window.num_days()
                    ),
                )
            } else {
                (
                    true,
                    format!(
                        "ended {} ago, older than the {}-day window",
                        age(now, backup.end_time),
                        window.num_days()
                    ),
                )
            };
            decided.push((backup, decisions.len()));
            decisions.push(Decision {
                target: Target::Backup {
                    kind,
                    id: backup.id.clone(),
                },
                delete,
                reason,
            });
        }
    }

    // Ancestors of kept incrementals are kept, up the chain (a fixpoint: a chain is short).
    loop {
        let mut changed = false;
        let kept_parents: Vec<(&str, &BackupId)> = decided
            .iter()
            .filter(|(_, index)| !decisions[*index].delete)
            .filter_map(|(b, _)| Some((b.id.as_str(), b.parent.as_ref()?)))
            .collect();
        for (child, parent) in kept_parents {
            let found = decided
                .iter()
                .find(|(b, _)| b.kind == Kind::PgBase && &b.id == parent);
            if let Some((_, index)) = found
                && decisions[*index].delete
            {
                decisions[*index].delete = false;
                decisions[*index].reason =
                    format!("the parent of kept incremental {child}: it restores on top of it");
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
    let mut kept: Vec<&Backup> = Vec::new();
    let mut deleted: BTreeSet<(Kind, &str)> = BTreeSet::new();
    for (backup, index) in &decided {
        if decisions[*index].delete {
            deleted.insert((backup.kind, backup.id.as_str()));
        } else {
            kept.push(backup);
        }
    }

    let named_by_kept: BTreeSet<&str> = kept
        .iter()
        .flat_map(|b| b.objects.iter().map(String::as_str))
        .collect();
    let committed: BTreeSet<(Kind, &str)> = inventory
        .backups
        .iter()
        .map(|b| (b.kind, b.id.as_str()))
        .collect();
    for object in &inventory.data {
        if named_by_kept.contains(object.key.as_str()) {
            continue;
        }
        let owner = (object.kind, object.id.as_str());
        let reason = if deleted.contains(&owner) {
            format!("data of deleted {} backup {}", object.kind, object.id)
        } else if committed.contains(&owner) {
            // Not named by its own kept manifest (a leftover claim): harmless, left alone.
            continue;
        } else if now - object.last_modified > policy.orphan_grace {
            format!(
                "no manifest: left by a {} run that never finished, {} ago",
                object.kind,
                age(now, object.last_modified)
            )
        } else {
            continue;
        };
        decisions.push(Decision {
            target: Target::Object {
                key: object.key.clone(),
            },
            delete: true,
            reason,
        });
    }

    let oldest_start = kept
        .iter()
        .filter_map(|b| {
            let start = b.wal_start.as_ref()?;
            Some((start.position()?, start))
        })
        .min_by_key(|(position, _)| *position);
    let archived: BTreeSet<String> = inventory.wal.iter().map(|w| w.file.name()).collect();
    for chunk in &inventory.streamed {
        if archived.contains(&chunk.file.name()) {
            decisions.push(Decision {
                target: Target::Wal {
                    key: chunk.key.clone(),
                },
                delete: true,
                reason: format!(
                    "a streamed chunk of {}, which is archived",
                    chunk.file.name()
                ),
            });
        }
    }
    if let Some((start, start_file)) = oldest_start {
        let unarchived = inventory
            .streamed
            .iter()
            .filter(|chunk| !archived.contains(&chunk.file.name()));
        for wal in inventory.wal.iter().chain(unarchived) {
            let Some(position) = wal.file.position() else {
                continue; // timeline history files are always kept
            };
            if position < start {
                decisions.push(Decision {
                    target: Target::Wal {
                        key: wal.key.clone(),
                    },
                    delete: true,
                    reason: format!(
                        "before {}, where the oldest kept base backup starts (every \
                         timeline)",
                        start_file.name()
                    ),
                });
            }
        }
    }
    Plan { decisions }
}

/// The kept backups of a plan, by kind: what remains after it runs.
pub fn remaining<'a>(inventory: &'a Inventory, plan: &Plan) -> BTreeMap<Kind, Vec<&'a Backup>> {
    let deleted: BTreeSet<(Kind, &str)> = plan
        .deletions()
        .filter_map(|d| match &d.target {
            Target::Backup { kind, id } => Some((*kind, id.as_str())),
            _ => None,
        })
        .collect();
    let mut remaining: BTreeMap<Kind, Vec<&Backup>> = BTreeMap::new();
    for backup in &inventory.backups {
        if !deleted.contains(&(backup.kind, backup.id.as_str())) {
            remaining.entry(backup.kind).or_default().push(backup);
        }
    }
    remaining
}

#[cfg(test)]
mod tests;
