//! `pipeline.max-upload-rate` and `max-download-rate`: one limit per direction for the whole
//! process, so that a nightly base backup leaves the node's link to the API it serves.
//!
//! A virtual clock, not a bucket of tokens that refills: each reservation of `n` bytes moves
//! `paid_until` forward by `n / rate`, and a throttled caller sends once the reservations
//! before it have been paid for. Over any stretch of a backup the bytes sent are the elapsed
//! time × the rate, plus the one part in flight; nothing is saved up while idle, so a backup
//! that starts after a quiet hour does not burst.
//!
//! WAL is never held back: [`RateLimit::reserve_now`] takes its bytes without waiting, and the
//! backups behind it wait the longer. So WAL goes at the rate PostgreSQL writes it, backups get
//! what is left of the limit, and a WAL rate above the limit alone stalls them, not the archive.

use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug)]
pub struct RateLimit {
    bytes_per_second: f64,
    /// When every byte reserved so far has been paid for at the rate.
    paid_until: Mutex<Option<Instant>>,
}

impl RateLimit {
    pub fn new(bytes_per_second: u64) -> Self {
        Self {
            bytes_per_second: bytes_per_second.max(1) as f64,
            paid_until: Mutex::new(None),
        }
    }

    /// Waits until `bytes` may be sent.
    pub async fn reserve(&self, bytes: usize) {
        let start = self.book(bytes);
        tokio::time::sleep_until(start).await;
    }

    /// Counts `bytes` that are sent at once (WAL): later reservations wait for them.
    pub fn reserve_now(&self, bytes: usize) {
        self.book(bytes);
    }

    /// Books `bytes` after what is already booked; returns when they may start.
    fn book(&self, bytes: usize) -> Instant {
        let now = Instant::now();
        let mut paid_until = self.paid_until.lock().unwrap_or_else(|e| e.into_inner());
        let start = paid_until.map_or(now, |paid| paid.max(now));
        *paid_until = Some(start + Duration::from_secs_f64(bytes as f64 / self.bytes_per_second));
        start
    }
}

static UPLOADS: OnceLock<RateLimit> = OnceLock::new();
static DOWNLOADS: OnceLock<RateLimit> = OnceLock::new();

/// Sets the process's limits (once, at start-up; later calls change nothing).
pub fn install(max_upload_rate: Option<u64>, max_download_rate: Option<u64>) {
    if let Some(rate) = max_upload_rate {
        let _ = UPLOADS.set(RateLimit::new(rate));
    }
    if let Some(rate) = max_download_rate {
        let _ = DOWNLOADS.set(RateLimit::new(rate));
    }
}

/// Waits until `bytes` of a backup may be uploaded.
pub async fn upload(bytes: usize) {
    if let Some(limit) = UPLOADS.get() {
        limit.reserve(bytes).await;
    }
}

/// Counts `bytes` of WAL, uploaded without waiting.
pub fn upload_now(bytes: usize) {
    if let Some(limit) = UPLOADS.get() {
        limit.reserve_now(bytes);
    }
}

/// Waits until `bytes` more may be downloaded.
pub async fn download(bytes: usize) {
    if let Some(limit) = DOWNLOADS.get() {
        limit.reserve(bytes).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1 << 20;

    #[tokio::test(start_paused = true)]
    async fn one_sender_goes_at_the_rate() {
        let limit = RateLimit::new(MIB as u64);
        let begun = Instant::now();
        for _ in 0..10 {
            limit.reserve(MIB).await;
        }
        // The tenth part starts once the nine before it are paid for.
        assert_eq!(begun.elapsed(), Duration::from_secs(9));
    }

    #[tokio::test(start_paused = true)]
    async fn senders_share_the_rate() {
        let limit = std::sync::Arc::new(RateLimit::new(2 * MIB as u64));
        let begun = Instant::now();
        let mut senders = tokio::task::JoinSet::new();
        for _ in 0..4 {
            let limit = limit.clone();
            senders.spawn(async move {
                for _ in 0..5 {
                    limit.reserve(MIB).await;
                }
                Instant::now()
            });
        }
        let mut last = begun;
        while let Some(done) = senders.join_next().await {
            last = last.max(done.unwrap());
        }
        // 20 MiB at 2 MiB/s: the last of them starts after 19 have been paid for.
        assert_eq!(last - begun, Duration::from_millis(9500));
    }

    #[tokio::test(start_paused = true)]
    async fn wal_never_waits_and_the_backup_behind_it_does() {
        let limit = RateLimit::new(MIB as u64);
        let begun = Instant::now();
        for _ in 0..4 {
            limit.reserve_now(MIB);
        }
        assert_eq!(begun.elapsed(), Duration::ZERO);
        limit.reserve(MIB).await;
        assert_eq!(begun.elapsed(), Duration::from_secs(4));
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_limit_saves_nothing_up() {
        let limit = RateLimit::new(MIB as u64);
        limit.reserve(MIB).await;
        tokio::time::sleep(Duration::from_secs(60)).await;
        let resumed = Instant::now();
        limit.reserve(MIB).await;
        limit.reserve(MIB).await;
        assert_eq!(resumed.elapsed(), Duration::from_secs(1));
    }
}
