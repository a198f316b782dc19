//! The usage streams' upkeep: each shard's stream is trimmed of the
//! entries every configured consumer group has acknowledged
//! (`lua/trim.lua`), so it holds what billing has not taken yet and no
//! more. With no group configured nothing is trimmed.

use std::sync::atomic::Ordering;

use jiff::Timestamp;

use super::RedisStore;
use super::keys::stream_key;
use crate::telemetry::metrics::{ConsumerGroup, metrics};

/// The streams are trimmed once per this many report intervals (10 s at
/// the default of 1 s), by every sidecar: a few script calls per shard,
/// whatever the traffic.
pub(super) const TRIM_EVERY_REPORTS: u32 = 10;

impl RedisStore {
    /// Trims every shard's stream, if it is time to (see
    /// [`TRIM_EVERY_REPORTS`]), and publishes what each group has not
    /// acknowledged yet.
    pub(super) async fn trim_streams(&self, now: Timestamp) {
        let groups = &self.settings.consumer_groups;
        if groups.is_empty() {
            return;
        }
        let every = self.settings.report_interval * TRIM_EVERY_REPORTS;
        let every_ms = i64::try_from(every.as_millis()).unwrap_or(i64::MAX);
        let last = self.last_trim_ms.load(Ordering::Relaxed);
        if now.as_millisecond().saturating_sub(last) < every_ms {
            return;
        }
        self.last_trim_ms.store(now.as_millisecond(), Ordering::Relaxed);
        let keep_ms = u64::try_from(self.settings.trim_keep.as_millis()).unwrap_or(u64::MAX);
        let args: Vec<String> = std::iter::once(keep_ms.to_string())
            .chain(groups.iter().cloned())
            .collect();
        let mut behind = vec![0i64; groups.len()];
        for shard in 0..self.settings.shards.max(1) {
            let stream = stream_key(&self.settings.prefix, shard);
            let answer: Result<redis::Value, _> = self.redis.invoke("trim", &self.trim, &[&stream], &args).await;
            match answer.map(|v| trimmed(&v)) {
                Ok(Trim::Done {
                    trimmed,
                    groups: unread,
                }) => {
                    metrics().usage_stream_trimmed.inc_by(trimmed);
                    for (sum, (pending, lag)) in behind.iter_mut().zip(unread) {
                        *sum += pending + lag.max(0);
                    }
                }
                Ok(Trim::NoGroup(group)) => {
                    tracing::warn!(
                        stream = %stream,
                        group = %group,
                        "the usage stream is not trimmed: consumer group {group} does not exist on it yet \
                         (store.redis.consumer_groups)"
                    );
                }
                Ok(Trim::Unreadable) => {
                    tracing::warn!(stream = %stream, "the usage stream trim answered what it should not");
                }
                Err(e) => {
                    tracing::debug!(stream = %stream, error = %e, "usage stream trim failed; retrying");
                }
            }
        }
        for (group, behind) in groups.iter().zip(behind) {
            metrics()
                .usage_stream_unacknowledged
                .get_or_create(&ConsumerGroup { group: group.clone() })
                .set(behind);
        }
    }
}

/// What `lua/trim.lua` answered.
enum Trim {
    /// Entries trimmed, and per group those delivered and not acknowledged
    /// and those not delivered (-1: unknown).
    Done {
        trimmed: u64,
        groups: Vec<(i64, i64)>,
    },
    /// This group does not exist on the stream: nothing was trimmed.
    NoGroup(String),
    Unreadable,
}

fn trimmed(answer: &redis::Value) -> Trim {
    use redis::Value::{Array, BulkString, Int};
    let Array(parts) = answer else { return Trim::Unreadable };
    match parts.as_slice() {
        [Int(-1), BulkString(group)] => Trim::NoGroup(String::from_utf8_lossy(group).into_owned()),
        [Int(n), groups @ ..] => {
            let groups = groups
                .iter()
                .filter_map(|g| match g {
                    Array(g) => match g.as_slice() {
                        [_, Int(pending), Int(lag)] => Some((*pending, *lag)),
                        _ => None,
                    },
                    _ => None,
                })
                .collect();
            Trim::Done {
                trimmed: u64::try_from(*n).unwrap_or(0),
                groups,
            }
        }
        _ => Trim::Unreadable,
    }
}
