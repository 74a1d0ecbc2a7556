//! S3 object lock: a retain-until date on every object version gc-backup writes, so that
//! credentials stolen from the sidecar cannot destroy what was stored. `object_store` cannot
//! send the lock headers with a PUT, so the date is set with PutObjectRetention on the exact
//! version just written (its `x-amz-version-id`), before the write counts as done. A bucket's
//! default retention, if the SRE sets one, covers the moment in between.

use std::sync::Arc;

use chrono::{DateTime, SecondsFormat, Utc};

use super::{Key, StoreError};
use crate::config::{LockMode, S3Location};

/// How long a key must be kept: `None` for what is not locked (claims, probes).
pub type RetainUntil = Arc<dyn Fn(&Key) -> Option<DateTime<Utc>> + Send + Sync>;

/// Sets retention on what a store writes.
#[derive(Clone)]
pub struct Locker {
    client: aws_sdk_s3::Client,
    bucket: String,
    root: String,
    mode: LockMode,
    until: RetainUntil,
}

impl std::fmt::Debug for Locker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Locker")
            .field("bucket", &self.bucket)
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

impl Locker {
    /// Needs static credentials, as the multipart cleanup does (`store.access-key-id`).
    pub fn new(
        location: &S3Location,
        store: &str,
        mode: LockMode,
        until: RetainUntil,
    ) -> Result<Self, StoreError> {
        let client = super::multipart::client(location).ok_or_else(|| StoreError::Setup {
            store: store.to_string(),
            detail: "store.object-lock needs static credentials (AWS_ACCESS_KEY_ID and \
                     AWS_SECRET_ACCESS_KEY) to set each object's retention"
                .to_string(),
        })?;
        Ok(Self {
            client,
            bucket: location.bucket.clone(),
            root: super::multipart::root(location),
            mode,
            until,
        })
    }

    /// Locks `version` of `key` (the current version when the store gave none) until its date.
    pub async fn retain(
        &self,
        store: &str,
        key: &Key,
        version: Option<&str>,
    ) -> Result<(), StoreError> {
        let Some(until) = (self.until)(key) else {
            return Ok(());
        };
        let retention = aws_sdk_s3::types::ObjectLockRetention::builder()
            .mode(aws_sdk_s3::types::ObjectLockRetentionMode::from(
                self.mode.as_s3(),
            ))
            .retain_until_date(aws_sdk_s3::primitives::DateTime::from_secs(
                until.timestamp(),
            ))
            .build();
        let mut request = self
            .client
            .put_object_retention()
            .bucket(&self.bucket)
            .key(format!("{}{key}", self.root))
            .retention(retention);
        if let Some(version) = version {
            request = request.version_id(version);
        }
        match request.send().await {
            Ok(_) => Ok(()),
            Err(error) => {
                let detail = super::multipart::describe(&error);
                // A bucket created without object lock answers InvalidRequest (AWS) or
                // InvalidBucketObjectLockConfiguration / ObjectLockConfigurationNotFound.
                if detail.contains("InvalidRequest") || detail.contains("ObjectLockConfiguration") {
                    return Err(StoreError::Setup {
                        store: store.to_string(),
                        detail: format!(
                            "store.object-lock is set, but the bucket refused a retention date \
                             ({detail}); object lock must be enabled when the bucket is created"
                        ),
                    });
                }
                Err(StoreError::Failed {
                    store: store.to_string(),
                    operation: "set the retention of",
                    key: key.to_string(),
                    detail: format!(
                        "{} until {}: {detail}",
                        self.mode.as_s3(),
                        until.to_rfc3339_opts(SecondsFormat::Secs, true)
                    ),
                })
            }
        }
    }
}
