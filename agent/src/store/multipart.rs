//! Multipart uploads that were started and never completed nor aborted: what a SIGKILLed run
//! leaves in S3. They are invisible to listing and `object_store` cannot enumerate them, so
//! this one corner speaks S3's ListMultipartUploads and AbortMultipartUpload through aws-sdk-s3.

use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use chrono::{DateTime, Utc};

use crate::config::S3Location;

/// One upload in progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingUpload {
    /// The key relative to the store root, as the rest of gc-backup names objects.
    pub key: String,
    pub upload_id: String,
    pub initiated: Option<DateTime<Utc>>,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct MultipartError(String);

/// A client for the bucket of `location`, with its static credentials, trusting its
/// `ca_file` (`store.ca-file`) as well as the system's roots; `None` when there are no static
/// credentials (instance or IRSA credentials are not resolved here) or the CA file is unusable
/// (the store's own client has said so already).
pub(super) fn client(location: &S3Location) -> Option<aws_sdk_s3::Client> {
    let access_key = location.access_key_id.clone()?;
    let secret = location.secret_access_key.as_ref()?.expose().to_string();
    let token = location
        .session_token
        .as_ref()
        .map(|t| t.expose().to_string());
    let mut config = aws_sdk_s3::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(location.region.clone()))
        .credentials_provider(Credentials::new(
            access_key,
            secret,
            token,
            None,
            "gc-backup",
        ))
        .force_path_style(!location.virtual_hosted_style);
    if let Some(endpoint) = &location.endpoint {
        config = config.endpoint_url(endpoint);
    }
    if let Some(ca_file) = &location.ca_file {
        use aws_smithy_http_client::tls;
        let pem = std::fs::read(ca_file).ok()?;
        let trust = tls::TrustStore::default().with_pem_certificate(pem);
        let context = tls::TlsContext::builder()
            .with_trust_store(trust)
            .build()
            .ok()?;
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(tls::Provider::Rustls(
                tls::rustls_provider::CryptoMode::AwsLc,
            ))
            .tls_context(context)
            .build_https();
        config = config.http_client(http);
    }
    Some(aws_sdk_s3::Client::from_conf(config.build()))
}

pub(super) fn describe(error: &impl std::error::Error) -> String {
    aws_sdk_s3::error::DisplayErrorContext(error).to_string()
}

pub(super) fn root(location: &S3Location) -> String {
    if location.prefix.is_empty() {
        String::new()
    } else {
        format!("{}/", location.prefix.trim_end_matches('/'))
    }
}

/// What the bucket keeps of overwritten and deleted objects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BucketState {
    /// `Enabled`, `Suspended`, or `off` (never enabled).
    pub versioning: String,
    /// `off`, or the default retention (`GOVERNANCE 30 days`) or `on` without one.
    pub object_lock: String,
}

/// Versioning and object-lock configuration of the bucket; `Ok(None)` without static
/// credentials.
pub async fn bucket_state(location: &S3Location) -> Result<Option<BucketState>, MultipartError> {
    let Some(client) = client(location) else {
        return Ok(None);
    };
    let versioning = client
        .get_bucket_versioning()
        .bucket(&location.bucket)
        .send()
        .await
        .map_err(|e| MultipartError(format!("GetBucketVersioning: {}", describe(&e))))?;
    let versioning = versioning
        .status()
        .map_or_else(|| "off".to_string(), |s| s.as_str().to_string());
    let object_lock = match client
        .get_object_lock_configuration()
        .bucket(&location.bucket)
        .send()
        .await
    {
        Ok(answer) => match answer.object_lock_configuration() {
            None => "off".to_string(),
            Some(lock) => match lock.rule().and_then(|r| r.default_retention()) {
                Some(retention) => format!(
                    "{} {}",
                    retention.mode().map_or("on", |m| m.as_str()),
                    retention
                        .days()
                        .map(|d| format!("{d} days"))
                        .or_else(|| retention.years().map(|y| format!("{y} years")))
                        .unwrap_or_default()
                ),
                None => "on, without a default retention".to_string(),
            },
        },
        // S3 answers ObjectLockConfigurationNotFoundError for a bucket without object lock.
        Err(error) if describe(&error).contains("ObjectLockConfigurationNotFound") => {
            "off".to_string()
        }
        Err(error) => format!("unknown ({})", describe(&error)),
    };
    Ok(Some(BucketState {
        versioning,
        object_lock,
    }))
}

/// The uploads in progress under the store's prefix; `Ok(None)` when they cannot be asked for
/// with the credentials at hand.
pub async fn pending(location: &S3Location) -> Result<Option<Vec<PendingUpload>>, MultipartError> {
    let Some(client) = client(location) else {
        return Ok(None);
    };
    let root = root(location);
    let mut uploads = Vec::new();
    let (mut key_marker, mut id_marker) = (None::<String>, None::<String>);
    loop {
        let page = client
            .list_multipart_uploads()
            .bucket(&location.bucket)
            .prefix(&root)
            .set_key_marker(key_marker.clone())
            .set_upload_id_marker(id_marker.clone())
            .send()
            .await
            .map_err(|e| {
                MultipartError(format!(
                    "listing multipart uploads in s3://{}/{root}: {}",
                    location.bucket,
                    aws_sdk_s3::error::DisplayErrorContext(&e)
                ))
            })?;
        for upload in page.uploads() {
            let (Some(key), Some(id)) = (upload.key(), upload.upload_id()) else {
                continue;
            };
            let Some(relative) = key.strip_prefix(&root) else {
                continue;
            };
            uploads.push(PendingUpload {
                key: relative.to_string(),
                upload_id: id.to_string(),
                initiated: upload
                    .initiated()
                    .and_then(|t| DateTime::from_timestamp(t.secs(), t.subsec_nanos())),
            });
        }
        if page.is_truncated() != Some(true) {
            return Ok(Some(uploads));
        }
        key_marker = page.next_key_marker().map(str::to_string);
        id_marker = page.next_upload_id_marker().map(str::to_string);
        if key_marker.is_none() && id_marker.is_none() {
            return Ok(Some(uploads));
        }
    }
}

pub async fn abort(location: &S3Location, upload: &PendingUpload) -> Result<(), MultipartError> {
    let Some(client) = client(location) else {
        return Ok(());
    };
    client
        .abort_multipart_upload()
        .bucket(&location.bucket)
        .key(format!("{}{}", root(location), upload.key))
        .upload_id(&upload.upload_id)
        .send()
        .await
        .map(|_| ())
        .map_err(|e| {
            MultipartError(format!(
                "aborting the multipart upload of {}: {}",
                upload.key,
                aws_sdk_s3::error::DisplayErrorContext(&e)
            ))
        })
}
