//! Calls to Redis, each counted and guarded by a backoff after a failure;
//! the probe that follows readiness and the clock's alignment.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use jiff::Timestamp;

use super::RedisStore;
use crate::store::StoreError;

/// After a failed call, Redis is not tried again for this long (the
/// background task probes it; decisions use the failure policy meanwhile).
pub(super) const BACKOFF: Duration = Duration::from_millis(500);

impl RedisStore {
    pub(super) fn check_up(&self) -> Result<(), StoreError> {
        let down = self.down_until.lock().unwrap_or_else(|p| p.into_inner());
        match *down {
            Some(until) if Instant::now() < until => Err(StoreError::Unavailable(
                "redis: unreachable at the last attempt; retrying shortly".into(),
            )),
            _ => Ok(()),
        }
    }

    pub(super) fn note<T>(&self, result: Result<T, StoreError>) -> Result<T, StoreError> {
        self.stats.redis_calls.fetch_add(1, Ordering::Relaxed);
        let mut down = self.down_until.lock().unwrap_or_else(|p| p.into_inner());
        match &result {
            Err(StoreError::Unavailable(_)) => *down = Some(Instant::now() + BACKOFF),
            _ => *down = None,
        }
        result
    }

    pub(super) async fn read(&self, key: &str) -> Result<Option<(u64, String)>, StoreError> {
        self.check_up()?;
        let got: (Option<u64>, Option<String>, Option<String>) = self.note(
            self.redis
                .query(redis::cmd("HMGET").arg(key).arg("v").arg("state").arg("s"))
                .await,
        )?;
        Ok(match got {
            (Some(v), Some(state), schema) => {
                super::keys::readable(key, schema.as_deref())?;
                Some((v, state))
            }
            _ => None,
        })
    }

    /// Pings Redis, so an outage (and the end of one) is noticed even
    /// while no call needs Redis: readiness follows it. The answer only
    /// feeds readiness: a slow PING must not turn decisions to the failure
    /// policy (that is for calls that fail).
    pub(super) async fn probe(&self) {
        let pong: Result<String, StoreError> = self.redis.query(&redis::cmd("PING")).await;
        if let Err(e) = &pong {
            tracing::debug!(error = %e, "Redis did not answer PING");
        }
        self.reachable.store(pong.is_ok(), Ordering::Relaxed);
    }

    /// Aligns the clock with Redis `TIME` again, if it is aligned at all.
    pub(super) async fn align(&self) {
        if let Some(clock) = &self.aligned {
            let before = Timestamp::now();
            match self.redis.time().await {
                Ok(reference) => clock.align(reference, before, Timestamp::now()),
                Err(e) => tracing::debug!(error = %e, "clock not aligned with Redis this time"),
            }
        }
    }
}
