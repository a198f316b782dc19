//! Rate limits: requests per minute, tokens per minute, concurrency.
//!
//! Rates use GCRA (the generic cell rate algorithm), a token bucket stored
//! as one "theoretical arrival time" per limit. Unlike fixed windows it
//! cannot admit twice the rate around a window edge: a burst of `burst`
//! units is allowed, after which units come back at exactly `rate` per
//! minute. State is one integer per limit and the check is a few integer
//! operations, with no timers.
//!
//! Times are kept in "scaled nanoseconds" (nanoseconds × rate) so the
//! emission interval of one unit is the integer 60·10^9 and no rounding
//! ever accumulates.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;

const MINUTE_NS: i128 = 60_000_000_000;

/// The largest rate, burst or concurrency accepted in a limit (10^12).
pub const MAX_LIMIT: u64 = 1_000_000_000_000;

/// The limits of one scope. Zero means "no limit" for that figure.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitSet {
    /// Requests per minute.
    pub requests_per_minute: u64,
    /// Tokens per minute.
    pub tokens_per_minute: u64,
    /// Requests in flight.
    pub concurrent_requests: u64,
    /// Requests allowed at once; zero means `requests_per_minute`.
    pub request_burst: u64,
    /// Tokens allowed at once; zero means `tokens_per_minute`.
    pub token_burst: u64,
}

impl LimitSet {
    /// No rate and no concurrency limit: nothing to count.
    pub fn is_unlimited(&self) -> bool {
        self.requests_per_minute == 0 && self.tokens_per_minute == 0 && self.concurrent_requests == 0
    }

    /// Checks every figure against [`MAX_LIMIT`]; names the first too large.
    pub fn check(&self) -> Result<(), String> {
        let figures = [
            ("requests_per_minute", self.requests_per_minute),
            ("tokens_per_minute", self.tokens_per_minute),
            ("concurrent_requests", self.concurrent_requests),
            ("request_burst", self.request_burst),
            ("token_burst", self.token_burst),
        ];
        match figures.iter().find(|(_, v)| *v > MAX_LIMIT) {
            Some((name, v)) => Err(format!("{name} {v} is above the limit of {MAX_LIMIT}")),
            None => Ok(()),
        }
    }
}

/// Limits per scope, as a plan states them.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScopedLimits {
    /// On the whole account.
    pub account: LimitSet,
    /// On each API key.
    pub api_key: LimitSet,
    /// On each model, per account, unless `models` names the model.
    pub per_model: LimitSet,
    /// On named models, per account, replacing `per_model` for them.
    pub models: std::collections::BTreeMap<super::ids::ModelId, LimitSet>,
}

/// Per-account replacements of a plan's scopes.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitOverrides {
    /// Replaces the plan's account limits.
    pub account: Option<LimitSet>,
    /// Replaces the plan's per-key limits.
    pub api_key: Option<LimitSet>,
    /// Replaces the plan's per-model limits (named or not).
    pub per_model: Option<LimitSet>,
    /// Replaces every other per-model limit for the named models.
    pub models: std::collections::BTreeMap<super::ids::ModelId, LimitSet>,
}

impl LimitOverrides {
    /// The limits of each scope for a request on `model`. Most specific
    /// first: the account's limit for the model, the account's per-model
    /// limit, the plan's limit for the model, the plan's per-model limit.
    pub fn resolve(&self, plan: &ScopedLimits, model: &super::ids::ModelId) -> [LimitSet; 3] {
        let per_model = self
            .models
            .get(model)
            .copied()
            .or(self.per_model)
            .or_else(|| plan.models.get(model).copied())
            .unwrap_or(plan.per_model);
        [
            self.account.unwrap_or(plan.account),
            self.api_key.unwrap_or(plan.api_key),
            per_model,
        ]
    }
}

/// What a limit is counted per.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    /// The account.
    Account,
    /// One API key.
    ApiKey,
    /// One model.
    Model,
}

/// What a limit counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Requests per minute.
    Requests,
    /// Tokens per minute.
    Tokens,
    /// Requests in flight.
    Concurrency,
}

/// The limit that denied a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exceeded {
    /// Counted per what.
    pub scope: Scope,
    /// Counting what.
    pub kind: Kind,
    /// The configured figure.
    pub limit: u64,
    /// When a retry can succeed; `None` when it never can (a request larger
    /// than the burst) or when it depends on other requests finishing.
    pub retry_after: Option<Duration>,
}

impl std::fmt::Display for Exceeded {
    /// For people, e.g. "requests-per-minute limit of 600 on the API key".
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.kind {
            Kind::Requests => "requests-per-minute",
            Kind::Tokens => "tokens-per-minute",
            Kind::Concurrency => "concurrent-requests",
        };
        let scope = match self.scope {
            Scope::Account => "the account",
            Scope::ApiKey => "the API key",
            Scope::Model => "the model",
        };
        write!(f, "{kind} limit of {} on {scope}", self.limit)
    }
}

/// One figure for rate-limit headers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Headroom {
    /// The configured rate; 0 when unlimited.
    pub limit: u64,
    /// Units available now.
    pub remaining: u64,
    /// Time until the bucket is full again.
    pub reset: Duration,
}

impl Headroom {
    fn tighter(self, other: Headroom) -> Headroom {
        if self.limit == 0 || (other.limit != 0 && other.remaining < self.remaining) {
            other
        } else {
            self
        }
    }
}

/// Header figures for requests and tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateStatus {
    /// Requests per minute.
    pub requests: Headroom,
    /// Tokens per minute.
    pub tokens: Headroom,
}

/// A GCRA bucket: the theoretical arrival time in scaled nanoseconds, and
/// the rate it was scaled at.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Gcra {
    tat: i128,
    rate: u64,
}

fn scaled_now(now: Timestamp, rate: u64) -> i128 {
    now.as_nanosecond().saturating_mul(i128::from(rate))
}

/// `units` minutes' worth of emission intervals, in scaled nanoseconds.
fn intervals(units: u64) -> i128 {
    i128::from(units).saturating_mul(MINUTE_NS)
}

fn to_duration(scaled: i128, rate: u64) -> Duration {
    let ns = scaled.max(0).saturating_add(i128::from(rate) - 1) / i128::from(rate.max(1));
    Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
}

// Rates are bounded by `MAX_LIMIT`, so these products stay far inside i128;
// saturating arithmetic is a second line of defence: a limit must never
// panic a request.
impl Gcra {
    /// Re-expresses the stored time at a new rate (after a limit change).
    fn at_rate(self, rate: u64) -> Gcra {
        if self.rate == rate || self.rate == 0 {
            return Gcra {
                tat: if self.rate == 0 { 0 } else { self.tat },
                rate,
            };
        }
        Gcra {
            tat: (self.tat / i128::from(self.rate)).saturating_mul(i128::from(rate)),
            rate,
        }
    }

    /// The arrival time after admitting `cost` units, or how long to wait.
    fn check(self, cost: u64, burst: u64, now: Timestamp) -> Result<Gcra, Option<Duration>> {
        let now_s = scaled_now(now, self.rate);
        let tolerance = intervals(burst);
        let new_tat = self.tat.max(now_s).saturating_add(intervals(cost));
        if new_tat.saturating_sub(now_s) <= tolerance {
            Ok(Gcra {
                tat: new_tat,
                rate: self.rate,
            })
        } else if cost > burst {
            Err(None)
        } else {
            Err(Some(to_duration(
                new_tat.saturating_sub(tolerance).saturating_sub(now_s),
                self.rate,
            )))
        }
    }

    fn headroom(self, burst: u64, now: Timestamp) -> Headroom {
        let now_s = scaled_now(now, self.rate);
        let used = self.tat.saturating_sub(now_s).max(0);
        let free = intervals(burst).saturating_sub(used);
        Headroom {
            limit: self.rate,
            remaining: u64::try_from((free / MINUTE_NS).max(0)).unwrap_or(0),
            reset: to_duration(used, self.rate),
        }
    }

    fn refund(&mut self, units: u64, now: Timestamp) {
        let now_s = scaled_now(now, self.rate);
        if self.tat > now_s {
            self.tat = self.tat.saturating_sub(intervals(units)).max(now_s);
        }
    }

    fn force(&mut self, units: u64, now: Timestamp) {
        self.tat = self
            .tat
            .max(scaled_now(now, self.rate))
            .saturating_add(intervals(units));
    }
}

/// The state of one scope's limits.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Bucket {
    requests: Gcra,
    tokens: Gcra,
    in_flight: u64,
}

impl Bucket {
    fn idle(&self, now: Timestamp) -> bool {
        self.in_flight == 0
            && self.requests.tat <= scaled_now(now, self.requests.rate)
            && self.tokens.tat <= scaled_now(now, self.tokens.rate)
    }
}

/// Which bucket: a scope and, for keys and models, the id.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BucketKey {
    /// The scope.
    pub scope: Scope,
    /// The API key or model id; empty for the account.
    pub id: Arc<str>,
}

/// The buckets that apply to one request, with their limits.
pub type Applicable = Vec<(BucketKey, LimitSet)>;

/// Every limit bucket of one account, indexed by key (never scanned).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Buckets {
    map: HashMap<BucketKey, Bucket>,
}

fn burst(rate: u64, burst: u64) -> u64 {
    if burst == 0 { rate } else { burst }
}

impl Buckets {
    /// Admits one request of `tokens` tokens against every applicable
    /// limit, or changes nothing and names the first limit it exceeds.
    pub fn admit(&mut self, limits: &Applicable, tokens: u64, now: Timestamp) -> Result<RateStatus, Exceeded> {
        let mut staged = Vec::with_capacity(limits.len());
        for (key, set) in limits {
            let mut bucket = self.map.get(key).cloned().unwrap_or_default();
            let exceeded = |kind, limit, retry_after| Exceeded {
                scope: key.scope,
                kind,
                limit,
                retry_after,
            };
            if set.requests_per_minute > 0 {
                let gcra = bucket.requests.at_rate(set.requests_per_minute);
                bucket.requests = gcra
                    .check(1, burst(set.requests_per_minute, set.request_burst), now)
                    .map_err(|wait| exceeded(Kind::Requests, set.requests_per_minute, wait))?;
            }
            if set.tokens_per_minute > 0 {
                let gcra = bucket.tokens.at_rate(set.tokens_per_minute);
                bucket.tokens = gcra
                    .check(tokens, burst(set.tokens_per_minute, set.token_burst), now)
                    .map_err(|wait| exceeded(Kind::Tokens, set.tokens_per_minute, wait))?;
            }
            if set.concurrent_requests > 0 && bucket.in_flight >= set.concurrent_requests {
                return Err(exceeded(Kind::Concurrency, set.concurrent_requests, None));
            }
            bucket.in_flight += 1;
            staged.push((key.clone(), bucket));
        }
        self.map.extend(staged);
        Ok(self.status(limits, now))
    }

    /// Header figures for `limits` at `now`, without admitting anything.
    pub fn status(&self, limits: &Applicable, now: Timestamp) -> RateStatus {
        let mut status = RateStatus::default();
        for (key, set) in limits {
            let bucket = self.map.get(key).cloned().unwrap_or_default();
            if set.requests_per_minute > 0 {
                let room = bucket
                    .requests
                    .at_rate(set.requests_per_minute)
                    .headroom(burst(set.requests_per_minute, set.request_burst), now);
                status.requests = status.requests.tighter(room);
            }
            if set.tokens_per_minute > 0 {
                let room = bucket
                    .tokens
                    .at_rate(set.tokens_per_minute)
                    .headroom(burst(set.tokens_per_minute, set.token_burst), now);
                status.tokens = status.tokens.tighter(room);
            }
        }
        status
    }

    /// Corrects the token count of an admitted request (actual usage known
    /// or a grant extended): gives back unused tokens, takes extra ones
    /// without a check (they were already used).
    pub fn adjust_tokens(&mut self, keys: &[BucketKey], admitted: u64, actual: u64, now: Timestamp) {
        for key in keys {
            if let Some(bucket) = self.map.get_mut(key).filter(|b| b.tokens.rate > 0) {
                if actual < admitted {
                    bucket.tokens.refund(admitted - actual, now);
                } else {
                    bucket.tokens.force(actual - admitted, now);
                }
            }
        }
    }

    /// Ends an admitted request: frees its concurrency slots.
    pub fn finish(&mut self, keys: &[BucketKey]) {
        for key in keys {
            if let Some(bucket) = self.map.get_mut(key) {
                bucket.in_flight = bucket.in_flight.saturating_sub(1);
            }
        }
    }

    /// Drops buckets that hold no information any more.
    pub fn prune(&mut self, now: Timestamp) {
        self.map.retain(|_, b| !b.idle(now));
    }

    /// Requests in flight in one bucket.
    pub fn in_flight(&self, key: &BucketKey) -> u64 {
        self.map.get(key).map_or(0, |b| b.in_flight)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(scope: Scope) -> BucketKey {
        BucketKey {
            scope,
            id: Arc::from(""),
        }
    }

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).unwrap()
    }

    #[test]
    fn burst_then_steady_rate_no_double_at_edges() {
        let limits = vec![(
            key(Scope::Account),
            LimitSet {
                requests_per_minute: 60,
                request_burst: 10,
                ..Default::default()
            },
        )];
        let mut b = Buckets::default();
        for _ in 0..10 {
            b.admit(&limits, 0, at(0)).unwrap();
            b.finish(&[key(Scope::Account)]);
        }
        let denied = b.admit(&limits, 0, at(0)).unwrap_err();
        assert_eq!(denied.kind, Kind::Requests);
        assert_eq!(denied.retry_after, Some(Duration::from_secs(1)));
        // Over the next 60 s exactly 60 more fit, whatever the window edges.
        let mut admitted = 0;
        for ms in (0..60_000).step_by(100) {
            let now = at(0).checked_add(jiff::SignedDuration::from_millis(ms + 100)).unwrap();
            if b.admit(&limits, 0, now).is_ok() {
                admitted += 1;
                b.finish(&[key(Scope::Account)]);
            }
        }
        assert_eq!(admitted, 60);
    }

    #[test]
    fn a_denial_by_one_limit_consumes_nothing_from_others() {
        let limits = vec![
            (
                key(Scope::Account),
                LimitSet {
                    requests_per_minute: 100,
                    tokens_per_minute: 1000,
                    ..Default::default()
                },
            ),
            (
                key(Scope::Model),
                LimitSet {
                    tokens_per_minute: 500,
                    ..Default::default()
                },
            ),
        ];
        let mut b = Buckets::default();
        let before = b.status(&limits, at(0));
        let denied = b.admit(&limits, 600, at(0)).unwrap_err();
        assert_eq!(
            (denied.scope, denied.kind, denied.retry_after),
            (Scope::Model, Kind::Tokens, None)
        );
        assert_eq!(b.status(&limits, at(0)), before);
        assert_eq!(b.in_flight(&key(Scope::Account)), 0);
    }

    #[test]
    fn concurrency_and_token_refunds() {
        let limits = vec![(
            key(Scope::ApiKey),
            LimitSet {
                concurrent_requests: 1,
                tokens_per_minute: 1000,
                ..Default::default()
            },
        )];
        let mut b = Buckets::default();
        let s = b.admit(&limits, 800, at(0)).unwrap();
        assert_eq!(s.tokens.remaining, 200);
        assert_eq!(b.admit(&limits, 1, at(0)).unwrap_err().kind, Kind::Concurrency);
        b.adjust_tokens(&[key(Scope::ApiKey)], 800, 300, at(0));
        b.finish(&[key(Scope::ApiKey)]);
        assert_eq!(b.admit(&limits, 700, at(0)).unwrap().tokens.remaining, 0);
    }
}
