//! `pipeline.max-upload-rate` and `max-download-rate`: one limit per direction for the whole
//! process, so that a nightly base backup leaves the node's link to the API it serves.
//!
//! A token bucket kept as a virtual clock: each reservation of `n` bytes moves `paid_until`
//! forward by `n / rate`, and a throttled caller sends once the reservations before it have
//! been paid for. The bucket holds one second: a sender that fell behind (zstd slower for a
//! moment than the rate, a checkpoint) may catch up by that much, and no more is saved up
//! while idle, so a backup after a quiet hour bursts by one second's bytes at most. Over any
//! stretch the bytes sent are at most (its length + 1 s) × the rate, plus the parts in flight.
//!
//! WAL is never held back: [`RateLimit::reserve_now`] takes its bytes without waiting, and the
//! backups behind it wait the longer. So WAL goes at the rate PostgreSQL writes it, backups get
//! what is left of the limit, and a WAL rate above the limit alone stalls them, not the archive.

use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use tokio::time::Instant;

/// How far behind the clock `paid_until` may fall: the bucket's size, in time.
const CATCH_UP: Duration = Duration::from_secs(1);

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
        let credit_from = now.checked_sub(CATCH_UP).unwrap_or(now);
        // A new limit starts with an empty bucket.
        let paid = paid_until.map_or(now, |paid| paid.max(credit_from));
        *paid_until = Some(paid + Duration::from_secs_f64(bytes as f64 / self.bytes_per_second));
        paid.max(now)
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
    async fn an_idle_limit_saves_up_one_second_at_most() {
        let limit = RateLimit::new(MIB as u64);
        limit.reserve(MIB).await;
        tokio::time::sleep(Duration::from_secs(60)).await;
        let resumed = Instant::now();
        // One second's bytes go at once, then the rate again.
        limit.reserve(MIB).await;
        limit.reserve(MIB).await;
        assert_eq!(resumed.elapsed(), Duration::ZERO);
        limit.reserve(MIB).await;
        assert_eq!(resumed.elapsed(), Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_sender_that_fell_behind_catches_up() {
        let limit = RateLimit::new(MIB as u64);
        let begun = Instant::now();
        limit.reserve(MIB).await;
        // The next part was ready half a second late (paid until 1 s, now 1.5 s).
        tokio::time::sleep(Duration::from_millis(1500)).await;
        limit.reserve(MIB).await;
        limit.reserve(MIB).await;
        // Three MiB at 1 MiB/s: the third starts at 2 s, as if nothing had stalled.
        assert_eq!(begun.elapsed(), Duration::from_secs(2));
    }
}
