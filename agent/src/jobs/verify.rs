//! `verify`: re-reads every object of the backups and checks it against its manifest, and
//! checks that the archived WAL continues unbroken from each base backup to the newest
//! segment. (`verify --restore` is a drill: [`super::drill`].)

use pitr::{PlanError, RecoveryTarget};
use tokio_util::sync::CancellationToken;

use super::base_chain::Destination;
use super::base_tar;
use crate::catalog::manifest::Manifest;
use crate::catalog::{self, BackupId, Kind};
use crate::error::Failure;
use crate::pipeline;
use crate::store::Store;
use crate::wal::archive;

/// The result of checking one backup.
#[derive(Debug, Clone)]
pub struct Checked {
    pub kind: Kind,
    pub id: BackupId,
    pub objects: usize,
    pub raw_bytes: u64,
    /// What the WAL check found (pg-base only).
    pub wal: Option<String>,
    /// Everything wrong with it; empty when it is good.
    pub problems: Vec<String>,
}

/// What `verify` found: each backup checked, and manifests that could not be read at all.
#[derive(Debug, Clone, Default)]
pub struct VerifyReport {
    pub checked: Vec<Checked>,
    /// A manifest nobody can read is a backup nobody can restore: a problem, not a warning.
    pub unreadable: Vec<String>,
}

impl VerifyReport {
    pub fn problems(&self) -> usize {
        self.unreadable.len()
            + self
                .checked
                .iter()
                .filter(|c| !c.problems.is_empty())
                .count()
    }
}

pub async fn verify(
    store: &Store,
    kind: Option<Kind>,
    id: Option<&BackupId>,
    cancel: &CancellationToken,
) -> anyhow::Result<VerifyReport> {
    let (manifests, unreadable) = catalog::list(store, kind).await?;
    let mut report = VerifyReport {
        checked: Vec::new(),
        unreadable: if id.is_none() {
            unreadable.iter().map(ToString::to_string).collect()
        } else {
            Vec::new()
        },
    };
    let selected: Vec<&Manifest> = manifests
        .iter()
        .filter(|m| id.is_none_or(|id| &m.id == id))
        .collect();
    if selected.is_empty() {
        return Err(Failure::NotFound(match id {
            Some(id) => format!("no backup {id} in {}", store.name()),
            None => format!("no backups in {}", store.name()),
        })
        .into());
    }
    for manifest in &selected {
        super::can_open(store, manifest)?;
    }
    let wal_check = WalCheck::load(store, &manifests).await?;
    let mut verdicts = Verdicts::default();
    for manifest in selected {
        if cancel.is_cancelled() {
            return Err(Failure::Interrupted("verify interrupted".into()).into());
        }
        let mut result = Checked {
            kind: manifest.kind,
            id: manifest.id.clone(),
            objects: manifest.objects.len(),
            raw_bytes: manifest.raw_bytes,
            wal: None,
            problems: verdicts.objects_of(store, manifest).await?,
        };
        // An incremental is only as good as every backup under it.
        match crate::catalog::chain(store, &manifests, manifest) {
            Ok(chain) => {
                for ancestor in chain.iter().rev().skip(1) {
                    let problems = verdicts.objects_of(store, ancestor).await?;
                    if let Some(first) = problems.first() {
                        result.problems.push(format!(
                            "it is an incremental on top of {}, which is damaged: {first}",
                            ancestor.id
                        ));
                        break;
                    }
                }
            }
            Err(error) => result.problems.push(error.to_string()),
        }
        if manifest.kind == Kind::PgBase
            && let Some(wal_check) = &wal_check
        {
            match wal_check.check(manifest) {
                Ok(summary) => result.wal = Some(summary),
                Err(problem) => result.problems.push(problem),
            }
        }
        report.checked.push(result);
    }
    Ok(report)
}

/// Objects several backups name (Redis AOF files, the backups under incrementals) are read
/// once; their verdict counts for every backup that names them.
#[derive(Default)]
struct Verdicts {
    seen: std::collections::HashMap<(String, Option<String>), Option<String>>,
}

impl Verdicts {
    /// What is wrong with the objects of one backup (empty: nothing), its block map included.
    async fn objects_of(
        &mut self,
        store: &Store,
        manifest: &Manifest,
    ) -> anyhow::Result<Vec<String>> {
        let delta = match &manifest.source {
            crate::catalog::manifest::SourceFacts::PgBase(facts) => facts.is_incremental(),
            _ => false,
        };
        let block_map = match &manifest.source {
            crate::catalog::manifest::SourceFacts::PgBase(facts) => facts.block_map.clone(),
            _ => None,
        };
        let streams = manifest
            .objects
            .iter()
            .enumerate()
            .map(|(i, o)| (Some(i), o));
        let mut problems = Vec::new();
        for (stream, object) in streams.chain(block_map.iter().map(|o| (None, o))) {
            let seen = (object.key.clone(), object.raw_sha256.clone());
            if let Some(verdict) = self.seen.get(&seen) {
                problems.extend(verdict.clone());
                continue;
            }
            let mut verdict = None;
            let result = match stream {
                Some(stream) => {
                    let files = base_tar::files_of_stream(manifest, stream);
                    read_object(store, object, files, delta).await
                }
                None => read_block_map(store, object).await,
            };
            if let Err(error) = result {
                use crate::error::Meaning;
                // Damaged or gone (deleted by hand, by a lifecycle rule): this backup's problem.
                let of_the_backup =
                    crate::error::meaning(&error) == Some(Meaning::Corrupt) || is_lost(&error);
                if !of_the_backup {
                    // The store itself failed: nothing more can be verified now.
                    return Err(error.context(format!("verifying {}", object.key)));
                }
                verdict = Some(format!("{error:#}"));
            }
            problems.extend(verdict.clone());
            self.seen.insert(seen, verdict);
        }
        Ok(problems)
    }
}

/// The object is not in the store (a store error that says so, however wrapped).
fn is_lost(error: &anyhow::Error) -> bool {
    use crate::store::StoreError;
    error.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<StoreError>(),
            Some(StoreError::NotFound { .. })
        ) || matches!(
            cause.downcast_ref::<pipeline::PipelineError>(),
            Some(pipeline::PipelineError::Store(StoreError::NotFound { .. }))
        )
    })
}

/// Reads a block map through its checks and its format to the end.
async fn read_block_map(
    store: &Store,
    object: &crate::catalog::StoredObject,
) -> anyhow::Result<()> {
    let key = object.key.clone();
    super::download_into(store, object, move |mut reader| {
        let result = (|| {
            let mut map = crate::sources::blocks::MapReader::new(&mut reader)?;
            while map.next_file()?.is_some() {}
            Ok::<_, crate::sources::blocks::BlockError>(())
        })();
        let _ = std::io::copy(&mut reader, &mut std::io::sink());
        result.map_err(|e| Failure::Corrupt(format!("{key}: {e}")).into())
    })
    .await
}

/// Reads one object through its checks into nothing. A base backup's tar stream (`files` is
/// what its manifest lists) is also read as tar, each file checked against its CRC-32C; an
/// incremental's delta stream record by record.
async fn read_object(
    store: &Store,
    object: &crate::catalog::StoredObject,
    files: Option<Vec<crate::catalog::manifest::BaseFile>>,
    delta: bool,
) -> anyhow::Result<()> {
    let Some(files) = files else {
        pipeline::download(store, &super::expected(object), Box::new(std::io::sink())).await?;
        return Ok(());
    };
    let key = object.key.clone();
    super::download_into(store, object, move |reader| match delta {
        true => {
            super::base_delta::read_checked(reader, &files, Destination::Nowhere, &key).map(drop)
        }
        false => base_tar::read_checked(reader, &files, Destination::Nowhere, &key),
    })
    .await
}

/// The archive and every base backup, to check each backup's WAL chain.
struct WalCheck {
    bases: Vec<pitr::BaseBackup>,
    archive: pitr::Archive,
}

impl WalCheck {
    async fn load(store: &Store, manifests: &[Manifest]) -> anyhow::Result<Option<Self>> {
        let mut bases = Vec::new();
        let mut segment_size = None;
        for manifest in manifests.iter().filter(|m| m.kind == Kind::PgBase) {
            let (base, facts) = archive::base_backup(manifest)?;
            segment_size = Some(facts.wal_segment_size);
            bases.push(base);
        }
        let Some(segment_size) = segment_size else {
            return Ok(None);
        };
        let archive = archive::load(store, segment_size).await?;
        Ok(Some(WalCheck { bases, archive }))
    }

    fn check(&self, manifest: &Manifest) -> Result<String, String> {
        let Some(index) = self.bases.iter().position(|b| b.id == manifest.id.as_str()) else {
            return Err("not a readable pg-base manifest".into());
        };
        match pitr::plan::plan(
            &self.bases,
            &self.archive,
            &RecoveryTarget::Latest,
            Some(index),
        ) {
            Ok(plan) => Ok(format!(
                "WAL {} .. {} complete ({} segments, timeline {})",
                plan.first_wal, plan.last_wal, plan.segments, plan.timeline
            )),
            // A backup of a branch that was abandoned restores only along that branch.
            Err(error @ PlanError::NotOnPath { .. }) => Ok(format!("note: {error}")),
            Err(error) => Err(error.to_string()),
        }
    }
}
