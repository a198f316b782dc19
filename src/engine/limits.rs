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
//!
//! Why one file: GCRA, the concurrency slots and the buckets keyed by scope
//! share one time arithmetic (scaled nanoseconds) that must not be read in
//! halves; about 740 lines, the rest tests.

use super::hash::Map;
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
    /// Requests in flight across every sidecar sharing the account (leased
    /// as slots on the Redis store).
    pub concurrent_requests: u64,
    /// Requests in flight through any one sidecar (counted locally, never
    /// shared).
    pub concurrent_requests_per_sidecar: u64,
    /// Requests allowed at once; zero means `requests_per_minute`.
    pub request_burst: u64,
    /// Tokens allowed at once; zero means `tokens_per_minute`.
    pub token_burst: u64,
}

impl LimitSet {
    /// No rate and no concurrency limit: nothing to count.
    pub fn is_unlimited(&self) -> bool {
        self.requests_per_minute == 0
            && self.tokens_per_minute == 0
            && self.concurrent_requests == 0
            && self.concurrent_requests_per_sidecar == 0
    }

    /// The per-sidecar concurrency limit, if set and `in_flight` reaches it.
    fn sidecar_full(&self, in_flight: u64) -> bool {
        self.concurrent_requests_per_sidecar > 0 && in_flight >= self.concurrent_requests_per_sidecar
    }

    /// Checks every figure against [`MAX_LIMIT`]; names the first too large.
    pub fn check(&self) -> Result<(), String> {
        let figures = [
            ("requests_per_minute", self.requests_per_minute),
            ("tokens_per_minute", self.tokens_per_minute),
            ("concurrent_requests", self.concurrent_requests),
            ("concurrent_requests_per_sidecar", self.concurrent_requests_per_sidecar),
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// The account.
    Account,
    /// One API key.
    ApiKey,
    /// One model.
    Model,
    /// The budget of one API key (see `engine::budget`).
    KeyBudget,
    /// The budget of one project.
    ProjectBudget,
}

impl Scope {
    /// A budget's bucket, not a rate limit's.
    pub fn is_budget(self) -> bool {
        matches!(self, Scope::KeyBudget | Scope::ProjectBudget)
    }
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
    /// Requests in flight through one sidecar.
    SidecarConcurrency,
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
            Kind::SidecarConcurrency => "per-sidecar concurrent-requests",
        };
        let scope = match self.scope {
            Scope::Account => "the account",
            Scope::ApiKey | Scope::KeyBudget => "the API key",
            Scope::Model => "the model",
            Scope::ProjectBudget => "the project",
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
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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

/// Rate-limit units a sidecar holds on lease (see `engine::lease`):
/// requests and tokens taken ahead from the account's GCRA buckets, and
/// concurrency slots counted in flight there.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Permits {
    /// Requests.
    pub requests: u64,
    /// Tokens; below zero when actual usage outran what was admitted.
    pub tokens: i128,
    /// Concurrency slots.
    pub slots: u64,
    /// Money in pico-units, of a budget (see `engine::budget`); below zero
    /// when actual spend outran what was admitted.
    #[serde(default, skip_serializing_if = "super::is_default")]
    pub money: i128,
}

impl Permits {
    /// Nothing at all.
    pub fn is_empty(&self) -> bool {
        *self == Permits::default()
    }
}

/// What a budget's bucket counts in its slot of time: tokens and money
/// (pico-units) admitted, corrected when the actual figures are known, and
/// on a shared account what sidecars hold on lease.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Used {
    /// Tokens.
    #[serde(default, skip_serializing_if = "super::is_default")]
    pub tokens: i128,
    /// Money, in pico-units.
    #[serde(default, skip_serializing_if = "super::is_default")]
    pub money: i128,
}

impl Used {
    /// Adds `other` in.
    pub fn add(&mut self, other: Used) {
        self.tokens += other.tokens;
        self.money += other.money;
    }
}

/// The state of one scope's limits.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Bucket {
    requests: Gcra,
    tokens: Gcra,
    in_flight: u64,
    /// A budget's count in its slot (see `engine::budget`): admitted worst
    /// cases corrected to what was spent, and what sidecars hold of it.
    #[serde(default, skip_serializing_if = "super::is_default")]
    pub(super) used: Used,
    /// What the usage records of the budget's requests charged in the
    /// slot: settled spend only.
    #[serde(default, skip_serializing_if = "super::is_default")]
    pub(super) spent: Used,
    /// When a budget's slot stops counting: the bucket may go then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) until: Option<Timestamp>,
    /// In a leased mirror: what the sidecar holds of the shared bucket.
    #[serde(skip)]
    pub(super) permits: Permits,
}

impl Bucket {
    fn idle(&self, now: Timestamp) -> bool {
        self.in_flight == 0
            && self.permits.is_empty()
            && ((self.used == Used::default() && self.spent == Used::default()) || self.until.is_some_and(|t| t <= now))
            && self.requests.tat <= scaled_now(now, self.requests.rate)
            && self.tokens.tat <= scaled_now(now, self.tokens.rate)
    }
}

/// Which bucket: a scope and, for keys and models, the id.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct BucketKey {
    /// The scope.
    pub scope: Scope,
    /// The API key or model id; empty for the account.
    pub id: Arc<str>,
}

/// The buckets that apply to one request, with their limits.
pub type Applicable = Vec<(BucketKey, LimitSet)>;

/// Every limit bucket of one account, indexed by key (never scanned).
///
/// In a leased mirror (a sidecar's copy of a shared account) the buckets
/// count [`Permits`] taken from the shared buckets instead of running GCRA
/// themselves: a request is admitted only if the sidecar holds a request
/// permit, its tokens and a free slot for every limit that applies.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Buckets {
    #[serde(with = "pairs")]
    pub(super) map: Map<BucketKey, Bucket>,
    #[serde(skip)]
    pub(super) leased: bool,
    /// In a leased mirror: when the shared buckets expect to admit again,
    /// as they said when they last lent less than asked.
    #[serde(skip)]
    retry_hint: Option<Duration>,
}

/// A map with structured keys as a list of pairs (JSON keys are strings).
mod pairs {
    use super::Map;
    use std::hash::Hash;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<K: Serialize, V: Serialize, S: Serializer>(map: &Map<K, V>, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(map.iter())
    }

    pub fn deserialize<'de, K, V, D>(d: D) -> Result<Map<K, V>, D::Error>
    where
        K: Deserialize<'de> + Eq + Hash,
        V: Deserialize<'de>,
        D: Deserializer<'de>,
    {
        Ok(Vec::<(K, V)>::deserialize(d)?.into_iter().collect())
    }
}

/// What a leased mirror lacks to admit a request: permits to ask for.
pub type Lacking = Vec<(BucketKey, Permits)>;

fn burst(rate: u64, burst: u64) -> u64 {
    if burst == 0 { rate } else { burst }
}

impl Buckets {
    /// Admits one request of `tokens` tokens against every applicable
    /// limit, or changes nothing and names the first limit it exceeds.
    pub fn admit(&mut self, limits: &Applicable, tokens: u64, now: Timestamp) -> Result<RateStatus, Exceeded> {
        if self.leased {
            return self.admit_leased(limits, tokens, now);
        }
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
            if set.sidecar_full(bucket.in_flight) {
                let limit = set.concurrent_requests_per_sidecar;
                return Err(exceeded(Kind::SidecarConcurrency, limit, None));
            }
            bucket.in_flight += 1;
            staged.push((key.clone(), bucket));
        }
        self.map.extend(staged);
        Ok(self.status(limits, now))
    }

    /// A leased mirror's admission: every limit must be covered by the
    /// permits held; nothing is taken unless all are.
    fn admit_leased(&mut self, limits: &Applicable, tokens: u64, now: Timestamp) -> Result<RateStatus, Exceeded> {
        for (key, set) in limits {
            if set.sidecar_full(self.in_flight(key)) {
                return Err(Exceeded {
                    scope: key.scope,
                    kind: Kind::SidecarConcurrency,
                    limit: set.concurrent_requests_per_sidecar,
                    retry_after: None,
                });
            }
        }
        if let Some(exceeded) = self.lacking(limits, tokens).into_iter().next().map(|(key, lack)| {
            let set = limits
                .iter()
                .find(|(k, _)| *k == key)
                .map(|(_, s)| *s)
                .unwrap_or_default();
            let (kind, limit) = if lack.requests > 0 {
                (Kind::Requests, set.requests_per_minute)
            } else if lack.tokens > 0 {
                (Kind::Tokens, set.tokens_per_minute)
            } else {
                (Kind::Concurrency, set.concurrent_requests)
            };
            Exceeded {
                scope: key.scope,
                kind,
                limit,
                retry_after: if kind == Kind::Concurrency {
                    None
                } else {
                    self.retry_hint
                },
            }
        }) {
            return Err(exceeded);
        }
        for (key, set) in limits {
            let bucket = self.map.entry(key.clone()).or_default();
            if set.requests_per_minute > 0 {
                bucket.permits.requests -= 1;
            }
            if set.tokens_per_minute > 0 {
                bucket.permits.tokens -= i128::from(tokens);
            }
            bucket.in_flight += 1;
        }
        Ok(self.status(limits, now))
    }

    /// In a leased mirror, the permits missing to admit a request of
    /// `tokens` tokens under `limits`; empty when it can be admitted (and
    /// always outside a mirror).
    pub fn lacking(&self, limits: &Applicable, tokens: u64) -> Lacking {
        if !self.leased {
            return Vec::new();
        }
        let mut lacking = Vec::new();
        for (key, set) in limits {
            let (held, in_flight) = self
                .map
                .get(key)
                .map_or((Permits::default(), 0), |b| (b.permits, b.in_flight));
            let lack = Permits {
                requests: u64::from(set.requests_per_minute > 0 && held.requests == 0),
                tokens: if set.tokens_per_minute > 0 {
                    (i128::from(tokens) - held.tokens).max(0)
                } else {
                    0
                },
                // Never a slot beyond what this sidecar may use.
                slots: u64::from(
                    set.concurrent_requests > 0 && in_flight >= held.slots && !set.sidecar_full(in_flight),
                ),
                money: 0,
            };
            if !lack.is_empty() {
                lacking.push((key.clone(), lack));
            }
        }
        lacking
    }

    /// Header figures for `limits` at `now`, without admitting anything.
    pub fn status(&self, limits: &Applicable, now: Timestamp) -> RateStatus {
        let mut status = RateStatus::default();
        for (key, set) in limits {
            let bucket = self.map.get(key).cloned().unwrap_or_default();
            if self.leased {
                let room = |limit, held: i128| Headroom {
                    limit,
                    remaining: u64::try_from(held.max(0)).unwrap_or(u64::MAX),
                    reset: Duration::ZERO,
                };
                if set.requests_per_minute > 0 {
                    let held = room(set.requests_per_minute, i128::from(bucket.permits.requests));
                    status.requests = status.requests.tighter(held);
                }
                if set.tokens_per_minute > 0 {
                    status.tokens = status
                        .tokens
                        .tighter(room(set.tokens_per_minute, bucket.permits.tokens));
                }
                continue;
            }
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
        if self.leased {
            for key in keys {
                if let Some(bucket) = self.map.get_mut(key) {
                    bucket.permits.tokens += i128::from(admitted) - i128::from(actual);
                }
            }
            return;
        }
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

    /// Makes these the buckets of a leased mirror: they count permits.
    pub(crate) fn set_leased(&mut self) {
        self.leased = true;
    }

    /// Shared side: takes up to `ask` from the bucket `key` (limits `set`)
    /// for a sidecar: requests and tokens the GCRA admits now, and free
    /// concurrency slots; of requests and tokens, nothing unless there is
    /// at least `least` (what the command that asked needs). Figures
    /// without a limit need no permits.
    pub fn lease(&mut self, key: &BucketKey, set: &LimitSet, ask: Permits, least: Permits, now: Timestamp) -> Permits {
        let bucket = self.map.entry(key.clone()).or_default();
        let mut granted = Permits::default();
        if set.requests_per_minute > 0 && ask.requests > 0 {
            let gcra = bucket.requests.at_rate(set.requests_per_minute);
            let room = gcra.headroom(burst(set.requests_per_minute, set.request_burst), now);
            if room.remaining >= least.requests {
                granted.requests = ask.requests.min(room.remaining);
            }
            bucket.requests = gcra;
            bucket.requests.force(granted.requests, now);
        }
        if set.tokens_per_minute > 0 && ask.tokens > 0 {
            let gcra = bucket.tokens.at_rate(set.tokens_per_minute);
            let room = gcra.headroom(burst(set.tokens_per_minute, set.token_burst), now);
            let least_tokens = u64::try_from(least.tokens).unwrap_or(0);
            let tokens = if room.remaining >= least_tokens {
                u64::try_from(ask.tokens).unwrap_or(u64::MAX).min(room.remaining)
            } else {
                0
            };
            granted.tokens = i128::from(tokens);
            bucket.tokens = gcra;
            bucket.tokens.force(tokens, now);
        }
        if set.concurrent_requests > 0 && ask.slots > 0 {
            granted.slots = ask.slots.min(set.concurrent_requests.saturating_sub(bucket.in_flight));
            bucket.in_flight += granted.slots;
        }
        granted
    }

    /// Shared side: how long until the bucket `key` admits `ask`'s
    /// requests and tokens, if it does not now (and ever can).
    pub fn retry_after(&self, key: &BucketKey, set: &LimitSet, ask: Permits, now: Timestamp) -> Option<Duration> {
        let bucket = self.map.get(key).cloned().unwrap_or_default();
        let mut wait = None;
        if set.requests_per_minute > 0 && ask.requests > 0 {
            let gcra = bucket.requests.at_rate(set.requests_per_minute);
            if let Err(Some(d)) = gcra.check(1, burst(set.requests_per_minute, set.request_burst), now) {
                wait = wait.max(Some(d));
            }
        }
        if set.tokens_per_minute > 0 && ask.tokens > 0 {
            let gcra = bucket.tokens.at_rate(set.tokens_per_minute);
            let tokens = u64::try_from(ask.tokens).unwrap_or(u64::MAX);
            if let Err(Some(d)) = gcra.check(tokens, burst(set.tokens_per_minute, set.token_burst), now) {
                wait = wait.max(Some(d));
            }
        }
        wait
    }

    /// Mirror side: remembers when the shared buckets expect to admit.
    pub fn set_retry_hint(&mut self, hint: Option<Duration>) {
        self.retry_hint = hint;
    }

    /// Shared side: takes back what a sidecar did not use. Negative tokens
    /// (usage beyond what was admitted) are counted without a check.
    pub fn give_back(&mut self, key: &BucketKey, back: Permits, now: Timestamp) {
        if let Some(bucket) = self.map.get_mut(key) {
            if bucket.requests.rate > 0 {
                bucket.requests.refund(back.requests, now);
            }
            if bucket.tokens.rate > 0 {
                let magnitude = u64::try_from(back.tokens.unsigned_abs()).unwrap_or(u64::MAX);
                if back.tokens >= 0 {
                    bucket.tokens.refund(magnitude, now);
                } else {
                    bucket.tokens.force(magnitude, now);
                }
            }
            bucket.in_flight = bucket.in_flight.saturating_sub(back.slots);
            if key.scope.is_budget() {
                bucket.used.tokens -= back.tokens;
                bucket.used.money -= back.money;
            }
        }
    }

    /// Mirror side: adds permits received.
    pub fn credit(&mut self, key: &BucketKey, granted: Permits) {
        let bucket = self.map.entry(key.clone()).or_default();
        bucket.permits.requests += granted.requests;
        bucket.permits.tokens += granted.tokens;
        bucket.permits.slots += granted.slots;
        bucket.permits.money += granted.money;
    }

    /// Mirror side: what to give back. Token overruns always; with `all`
    /// (idle, or a lease ending) every unused permit and free slot too.
    pub fn unused(&mut self, all: bool) -> Lacking {
        let mut back = Vec::new();
        for (key, bucket) in &mut self.map {
            let p = &mut bucket.permits;
            let give = Permits {
                requests: if all { p.requests } else { 0 },
                tokens: if all || p.tokens < 0 { p.tokens } else { 0 },
                slots: if all {
                    p.slots.saturating_sub(bucket.in_flight)
                } else {
                    0
                },
                money: if all || p.money < 0 { p.money } else { 0 },
            };
            if !give.is_empty() {
                p.requests -= give.requests;
                p.tokens -= give.tokens;
                p.slots -= give.slots;
                p.money -= give.money;
                back.push((key.clone(), give));
            }
        }
        back
    }

    /// Mirror side: whether any permit is held.
    pub fn holds_permits(&self) -> bool {
        self.map.values().any(|b| !b.permits.is_empty())
    }

    /// Mirror side: forgets every permit (its lease ended elsewhere).
    pub fn drop_permits(&mut self) {
        for bucket in self.map.values_mut() {
            bucket.permits = Permits::default();
        }
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
