//! Where an account's records live in Redis: keys by shard and hash tag,
//! and the request-id sets a commit checks.

use jiff::{SignedDuration, Timestamp};

use super::RedisStore;
use super::windows::WINDOW_MARGIN_SECONDS;
use crate::engine::ids::AccountId;
use crate::store::StoreError;

/// Where a commit checks and remembers its records' request ids (see
/// [`RedisStore::seen`]).
pub(super) struct Seen {
    /// The sets of the buckets of the last idempotency window, the current
    /// one first.
    pub(super) keys: Vec<String>,
    /// When the current bucket's set may go, ms since the epoch.
    pub(super) until_ms: i64,
    /// The hashes of the last answer buckets, the current one first: where
    /// in the usage stream each request's record went.
    pub(super) answers: [String; 2],
    /// When the current answer bucket may go, ms since the epoch.
    pub(super) answers_until_ms: i64,
}

/// Request ids are remembered in one set per shard and time bucket, a
/// quarter of the idempotency window long: a commit looks in the buckets
/// that may hold an id of the last window and adds to the current one.
pub(super) const SEEN_BUCKETS: i64 = 4;

/// Where a committed request's record is in the usage stream is kept one
/// to two buckets of this length (`PREFIX:{SHARD}:answers:N`, fingerprint
/// to stream entry id): long enough for a client's resend to another
/// sidecar to be answered as the first call was, short enough to cost a
/// few bytes per remembered id.
pub(super) const ANSWER_BUCKET_MS: i64 = 60_000;

/// The schema of the records this version writes in Redis (an account's
/// or the prices' hash: its `state` JSON and fields), stored with each as
/// `s`. A record without it was written before schemas were numbered, in
/// schema 1. A version reads every schema up to its own
/// (`tests/upgrade.rs` reads the stored records of each), and refuses a
/// later one rather than read it wrong and write it back without what it
/// did not understand: a fleet is rolled forward across a schema change,
/// not back.
pub const SCHEMA: u32 = 2;

/// Whether a record of schema `stored` (as its `s` field reads; none: 1)
/// can be read here; the error names the key.
pub(super) fn readable(key: &str, stored: Option<&str>) -> Result<(), StoreError> {
    let schema = match stored.filter(|s| !s.is_empty()) {
        None => 1,
        Some(s) => s
            .parse::<u32>()
            .map_err(|_| StoreError::Unavailable(format!("redis: record {key} has an unreadable schema {s:?}")))?,
    };
    if schema > SCHEMA {
        return Err(StoreError::Unavailable(format!(
            "redis: record {key} is in schema {schema}, written by a newer Tollgate; this one reads up to \
             schema {SCHEMA} (roll the fleet forward)"
        )));
    }
    Ok(())
}

impl RedisStore {
    pub(super) fn account_key(&self, id: &AccountId) -> String {
        account_key(&self.settings.prefix, self.settings.shards, id.as_str())
    }

    pub(super) fn stream_key(&self, id: &AccountId) -> String {
        stream_key(&self.settings.prefix, shard_of(self.settings.shards, id.as_str()))
    }

    pub(super) fn index_key(&self, shard: u32) -> String {
        index_key(&self.settings.prefix, shard)
    }

    pub(super) fn prices_key(&self) -> String {
        format!("{}:prices", self.settings.prefix)
    }

    /// The channel admin changes are announced on.
    pub fn changes_channel(&self) -> String {
        format!("{}:changes", self.settings.prefix)
    }

    /// The request-id sets a commit on `id` at `now` checks, for an
    /// idempotency window of `window` (see [`SEEN_BUCKETS`]):
    /// `PREFIX:{SHARD}:seen:BUCKET_MS:N`, the current bucket first. Each
    /// goes once the window has passed over its end (and a minute more,
    /// for clocks that trail).
    pub(super) fn seen(&self, id: &AccountId, window: SignedDuration, now: Timestamp) -> Seen {
        let window_ms = i64::try_from(window.as_millis()).unwrap_or(i64::MAX).max(SEEN_BUCKETS);
        let bucket_ms = window_ms / SEEN_BUCKETS;
        let current = now.as_millisecond().div_euclid(bucket_ms);
        let shard = shard_of(self.settings.shards, id.as_str());
        let prefix = &self.settings.prefix;
        let margin_ms = WINDOW_MARGIN_SECONDS as i64 * 1000;
        let answers = now.as_millisecond().div_euclid(ANSWER_BUCKET_MS);
        Seen {
            keys: (0..=SEEN_BUCKETS)
                .map(|back| format!("{prefix}:{{{shard}}}:seen:{bucket_ms}:{}", current - back))
                .collect(),
            until_ms: (current + 1)
                .saturating_mul(bucket_ms)
                .saturating_add(window_ms)
                .saturating_add(margin_ms),
            answers: [0, 1].map(|back| format!("{prefix}:{{{shard}}}:answers:{}", answers - back)),
            answers_until_ms: (answers + 2).saturating_mul(ANSWER_BUCKET_MS).saturating_add(margin_ms),
        }
    }
}

/// The logical shard of an account: CRC-32C of its id modulo `shards`.
pub fn shard_of(shards: u32, account: &str) -> u32 {
    crc32c::crc32c(account.as_bytes()) % shards.max(1)
}

/// The key of an account's shared record: `PREFIX:{SHARD}:account:ID`.
pub fn account_key(prefix: &str, shards: u32, account: &str) -> String {
    format!("{prefix}:{{{}}}:account:{account}", shard_of(shards, account))
}

/// The index of a shard's accounts, sorted by id: `PREFIX:{SHARD}:accounts`.
pub fn index_key(prefix: &str, shard: u32) -> String {
    format!("{prefix}:{{{shard}}}:accounts")
}

/// The usage stream of a shard: `PREFIX:{SHARD}:usage`.
pub fn stream_key(prefix: &str, shard: u32) -> String {
    format!("{prefix}:{{{shard}}}:usage")
}
