//! Envoy rate-limit windows counted in Redis, with this sidecar's share of
//! each held ahead of use and given back when idle.

use std::sync::atomic::Ordering;
use std::time::Duration;

use jiff::{SignedDuration, Timestamp};

use super::RedisStore;
use crate::engine::EngineError;
use crate::engine::window::WindowShare;
use crate::store::StoreError;
use crate::telemetry::metrics::metrics;

/// Rate-limit windows this sidecar keeps a share of; beyond, new windows
/// are counted in Redis call by call.
pub(super) const MAX_WINDOW_SHARES: usize = 100_000;

/// Seconds a window's counter outlives its end in Redis: a sidecar whose
/// clock trails the others' still finds the count.
pub(super) const WINDOW_MARGIN_SECONDS: u64 = 60;

impl RedisStore {
    /// Counts `hits` in the window `key` (see [`Store::count_hits`]).
    pub(super) async fn count_window(
        &self,
        key: &str,
        hits: u64,
        limit: u64,
        ttl: Duration,
        now: Timestamp,
    ) -> Result<u64, StoreError> {
        let key = format!("{}:rls:{key}", self.settings.prefix);
        let ends = now
            .checked_add(ttl)
            .map_err(|_| StoreError::Engine(EngineError::Overflow))?;
        let horizon = self.settings.horizon;
        let trip = match self.windows.get_mut(&key) {
            Some(mut share) => {
                if let Some(count) = share.serve(hits, limit, now) {
                    self.stats.window_hits_held.fetch_add(1, Ordering::Relaxed);
                    return Ok(count);
                }
                share.trip(hits, limit, horizon, now)
            }
            None if self.windows.len() < MAX_WINDOW_SHARES => self
                .windows
                .entry(key.clone())
                .or_insert_with(|| WindowShare::new(now, ends))
                .trip(hits, limit, horizon, now),
            // Too many windows open: this one is counted call by call.
            None => WindowShare::new(now, ends).trip(hits, 0, horizon, now),
        };
        let seconds = ttl.as_secs().max(1) + WINDOW_MARGIN_SECONDS;
        let (count, granted): (u64, u64) = self.note(
            self.redis
                .invoke("count", &self.count, &[&key], (trip.add, seconds, trip.want, limit))
                .await,
        )?;
        Ok(match self.windows.get_mut(&key) {
            Some(mut share) => share.took(hits, count, granted, now),
            None => count,
        })
    }

    /// Forgets the shares of ended windows and gives back what this
    /// sidecar holds in windows it has not counted in for
    /// `idle_return` (everything, with `all`, at shutdown).
    pub(super) async fn tend_windows(&self, now: Timestamp) {
        let idle = SignedDuration::try_from(self.settings.idle_return).unwrap_or(SignedDuration::MAX);
        let before = self.windows.len();
        self.windows.retain(|_, share| !share.ended(now));
        metrics().evicted("window_share", before.saturating_sub(self.windows.len()));
        let back: Vec<(String, u64)> = self
            .windows
            .iter_mut()
            .filter(|share| share.held() > 0 && now.duration_since(share.last_used()) >= idle)
            .map(|mut share| (share.key().clone(), share.give_back(now)))
            .collect();
        self.give_back_windows(back).await;
    }

    /// Gives back hits held ahead of use in Redis's window counters. A
    /// failure leaves them counted until the window ends (the safe side).
    pub(super) async fn give_back_windows(&self, back: Vec<(String, u64)>) {
        for (key, hits) in back {
            let add = -i64::try_from(hits).unwrap_or(i64::MAX);
            let given: Result<(u64, u64), _> = self
                .redis
                .invoke("count", &self.count, &[&key], (add, WINDOW_MARGIN_SECONDS, 0, 0))
                .await;
            if let Err(e) = self.note(given) {
                tracing::debug!(key, hits, error = %e, "rate-limit hits held not given back; they lapse with the window");
            }
        }
    }
}
