//! The store as it was at a moment (`--as-of`): on a versioned bucket every key is read as its
//! newest version not newer than that moment, so that delete markers and overwrites written
//! after it (an attacker with the sidecar's credentials) are not seen. `object_store` reads a
//! given version (`GetOptions::version`) but cannot list versions; ListObjectVersions is asked
//! through aws-sdk-s3, as the multipart cleanup is.

use std::collections::HashMap;
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use object_store::ObjectMeta;

use super::{Key, StoreError};
use crate::config::S3Location;

/// A read-only view of the bucket at `time`.
pub struct AsOf {
    time: DateTime<Utc>,
    client: aws_sdk_s3::Client,
    bucket: String,
    root: String,
    store: String,
    /// The version each key was read as, once listed: `None` when it did not exist then.
    chosen: Mutex<HashMap<String, Option<ObjectMeta>>>,
}

impl std::fmt::Debug for AsOf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsOf")
            .field("time", &self.time)
            .field("bucket", &self.bucket)
            .finish_non_exhaustive()
    }
}

impl AsOf {
    /// Refuses, with one line, a bucket that never kept old versions.
    pub async fn open(
        location: &S3Location,
        store: &str,
        time: DateTime<Utc>,
    ) -> Result<Self, StoreError> {
        let setup = |detail: String| StoreError::Setup {
            store: store.to_string(),
            detail,
        };
        let client = super::multipart::client(location).ok_or_else(|| {
            setup(
                "--as-of needs static credentials (AWS_ACCESS_KEY_ID and \
                 AWS_SECRET_ACCESS_KEY) to list object versions"
                    .to_string(),
            )
        })?;
        let versioning = client
            .get_bucket_versioning()
            .bucket(&location.bucket)
            .send()
            .await
            .map_err(|e| StoreError::Failed {
                store: store.to_string(),
                operation: "ask the versioning of",
                key: location.bucket.clone(),
                detail: super::multipart::describe(&e),
            })?;
        if versioning.status().is_none() {
            return Err(setup(format!(
                "--as-of reads earlier versions of objects, and bucket {} has versioning off: \
                 it kept none",
                location.bucket
            )));
        }
        Ok(Self {
            time,
            client,
            bucket: location.bucket.clone(),
            root: super::multipart::root(location),
            store: store.to_string(),
            chosen: Mutex::new(HashMap::new()),
        })
    }

    pub fn time(&self) -> DateTime<Utc> {
        self.time
    }

    /// Every key under `prefix` as it was at `time`.
    pub async fn list(&self, prefix: &Key) -> Result<Vec<ObjectMeta>, StoreError> {
        let listed = self.list_versions(prefix.as_ref()).await?;
        let mut chosen = self.chosen.lock().unwrap_or_else(|e| e.into_inner());
        let mut found = Vec::new();
        for (key, meta) in listed {
            if let Some(meta) = &meta {
                found.push(meta.clone());
            }
            chosen.insert(key, meta);
        }
        Ok(found)
    }

    /// The version of `key` to read, with its size and time; `None`: it did not exist then.
    pub async fn resolve(&self, key: &Key) -> Result<Option<ObjectMeta>, StoreError> {
        if let Some(known) = self
            .chosen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key.as_ref())
        {
            return Ok(known.clone());
        }
        let listed = self.list_versions(key.as_ref()).await?;
        let meta = listed
            .into_iter()
            .find(|(name, _)| name == key.as_ref())
            .and_then(|(_, meta)| meta);
        self.chosen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.to_string(), meta.clone());
        Ok(meta)
    }

    /// Each key under `prefix` (relative to the store's root) with its newest version not newer
    /// than `time`; `None` where that is a delete marker or there was none yet.
    async fn list_versions(
        &self,
        prefix: &str,
    ) -> Result<Vec<(String, Option<ObjectMeta>)>, StoreError> {
        // Per key: (last modified, version or None for a delete marker), newest first.
        let mut history: HashMap<String, Vec<Entry>> = HashMap::new();
        let mut key_marker: Option<String> = None;
        let mut version_marker: Option<String> = None;
        loop {
            let page = self
                .client
                .list_object_versions()
                .bucket(&self.bucket)
                .prefix(format!("{}{prefix}", self.root))
                .set_key_marker(key_marker.take())
                .set_version_id_marker(version_marker.take())
                .send()
                .await
                .map_err(|e| StoreError::Failed {
                    store: self.store.clone(),
                    operation: "list the versions under",
                    key: prefix.to_string(),
                    detail: super::multipart::describe(&e),
                })?;
            for version in page.versions() {
                let (Some(name), Some(modified)) = (version.key(), version.last_modified()) else {
                    continue;
                };
                let Some(relative) = name.strip_prefix(&self.root) else {
                    continue;
                };
                let modified = to_chrono(modified);
                let meta = ObjectMeta {
                    location: Key::from(relative),
                    last_modified: modified,
                    size: version.size().unwrap_or(0).max(0) as u64,
                    e_tag: version.e_tag().map(String::from),
                    version: version.version_id().map(String::from),
                };
                history
                    .entry(relative.to_string())
                    .or_default()
                    .push((modified, Some(meta)));
            }
            for marker in page.delete_markers() {
                let (Some(name), Some(modified)) = (marker.key(), marker.last_modified()) else {
                    continue;
                };
                let Some(relative) = name.strip_prefix(&self.root) else {
                    continue;
                };
                history
                    .entry(relative.to_string())
                    .or_default()
                    .push((to_chrono(modified), None));
            }
            if page.is_truncated() != Some(true) {
                break;
            }
            key_marker = page.next_key_marker().map(String::from);
            version_marker = page.next_version_id_marker().map(String::from);
            if key_marker.is_none() {
                break;
            }
        }
        let mut chosen: Vec<(String, Option<ObjectMeta>)> = history
            .into_iter()
            .map(|(key, entries)| (key, as_of(entries, self.time)))
            .collect();
        chosen.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(chosen)
    }
}

/// One version of a key, or a delete marker (`None`), with the time it was written.
type Entry = (DateTime<Utc>, Option<ObjectMeta>);

/// What a key was at `time`: its newest entry not newer than it. A delete marker that ties
/// with a version wins, since the marker can only have come after what it hides.
fn as_of(mut entries: Vec<Entry>, time: DateTime<Utc>) -> Option<ObjectMeta> {
    entries.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.is_some().cmp(&b.1.is_some())));
    entries
        .into_iter()
        .find(|(modified, _)| *modified <= time)
        .and_then(|(_, meta)| meta)
}

fn to_chrono(time: &aws_sdk_s3::primitives::DateTime) -> DateTime<Utc> {
    DateTime::from_timestamp(time.secs(), time.subsec_nanos()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version(id: &str, at: &str) -> Entry {
        let time: DateTime<Utc> = at.parse().unwrap();
        let meta = ObjectMeta {
            location: Key::from("manifests/pg-dump/x.json"),
            last_modified: time,
            size: 1,
            e_tag: None,
            version: Some(id.to_string()),
        };
        (time, Some(meta))
    }

    fn marker(at: &str) -> Entry {
        (at.parse().unwrap(), None)
    }

    fn chosen(entries: Vec<Entry>, at: &str) -> Option<String> {
        as_of(entries, at.parse().unwrap()).and_then(|meta| meta.version)
    }

    #[test]
    fn a_key_is_what_it_was_at_the_moment_whatever_came_after() {
        let history = || {
            vec![
                marker("2026-12-01T12:00:00Z"),
                version("ransom", "2026-12-01T12:00:05Z"),
                version("v1", "2026-12-01T10:00:00Z"),
                version("v2", "2026-12-01T11:00:00Z"),
            ]
        };
        assert_eq!(
            chosen(history(), "2026-12-01T09:59:59Z"),
            None,
            "not yet written"
        );
        assert_eq!(
            chosen(history(), "2026-12-01T10:30:00Z").as_deref(),
            Some("v1")
        );
        assert_eq!(
            chosen(history(), "2026-12-01T11:59:59Z").as_deref(),
            Some("v2")
        );
        assert_eq!(
            chosen(history(), "2026-12-01T12:00:01Z"),
            None,
            "deleted then"
        );
        assert_eq!(
            chosen(history(), "2026-12-01T13:00:00Z").as_deref(),
            Some("ransom")
        );
        // Same second: the delete marker came after the version it hides.
        let tie = vec![
            version("v1", "2026-12-01T10:00:00Z"),
            marker("2026-12-01T10:00:00Z"),
        ];
        assert_eq!(chosen(tie, "2026-12-01T10:00:00Z"), None);
    }
}
