//! `envoy.service.ratelimit.v3.RateLimitService` on the data plane: Envoy's
//! rate-limit API, answered as envoyproxy/ratelimit answers it
//! (docs/envoy-rls-reference.md), with rules in its configuration format
//! and windows counted by the store (so every sidecar sharing Redis counts
//! together).

use std::sync::Arc;
use std::time::Duration;

use jiff::{SignedDuration, Timestamp};

use envoy_types::pb::envoy::config::core::v3::HeaderValue;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::rate_limit::Unit as WireUnit;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::{Code, DescriptorStatus, RateLimit};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitService;
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use envoy_types::pb::google::protobuf::Duration as WireDuration;
use tonic::{Request, Response, Status};

use super::convert::id;
use super::status::{invalid, status, unexpected};
use crate::engine::ids::{AccountId, ModelId, RequestId, TierId};
use crate::engine::pricing::{TokenKind, Usage};
use crate::engine::request::{ChargeOutcome, ChargeRequest, ChargeWhat};
use crate::engine::{Command, EngineError, Reply};
use crate::rls::config::{Allowance, RulesCell, Unit};
use crate::rls::matcher::{Entry, drop_replaced, find};
use crate::rls::overrides::OverrideWindows;
use crate::service::Tollgate;
use crate::store::StoreError;
use crate::telemetry::metrics::{RlsHits, metrics};
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;

/// The most hits one descriptor adds (2^53, where counts stop).
const MOST_HITS: u64 = 1 << 53;

/// The service.
pub struct RlsApi {
    tollgate: Tollgate,
    in_force: Arc<RulesCell>,
    overrides: OverrideWindows,
}

impl RlsApi {
    /// Answers from the rules and settings in force in `in_force`,
    /// counting in `tollgate`'s store.
    pub fn new(tollgate: Tollgate, in_force: Arc<RulesCell>) -> RlsApi {
        RlsApi {
            tollgate,
            in_force,
            overrides: OverrideWindows::default(),
        }
    }
}

/// A descriptor that charges a Tollgate account (the entries
/// `tollgate_account`, `tollgate_model`, and optionally `tollgate_tokens`
/// and `tollgate_request`; see the README).
struct Charging {
    account: AccountId,
    model: ModelId,
    kind: TokenKind,
    request: Option<RequestId>,
}

impl Charging {
    /// The charge `descriptor` asks for, if it names an account.
    fn of(descriptor: &RateLimitDescriptor) -> Result<Option<Charging>, Status> {
        let entry = |key: &str| {
            descriptor
                .entries
                .iter()
                .find(|e| e.key == key)
                .map(|e| e.value.as_str())
        };
        let Some(account) = entry("tollgate_account") else {
            return Ok(None);
        };
        let model =
            entry("tollgate_model").ok_or_else(|| invalid("tollgate_model", "is required beside tollgate_account"))?;
        let kind = match entry("tollgate_tokens").unwrap_or("output") {
            "input" => TokenKind::Input,
            "cached_input" => TokenKind::CachedInput,
            "cache_write" => TokenKind::CacheWrite,
            "output" => TokenKind::Output,
            other => {
                return Err(invalid(
                    "tollgate_tokens",
                    format!("expected input, cached_input, cache_write or output, got {other:?}"),
                ));
            }
        };
        Ok(Some(Charging {
            account: id("tollgate_account", account, AccountId::parse)?,
            model: id("tollgate_model", model, ModelId::parse)?,
            kind,
            request: entry("tollgate_request")
                .map(|r| id("tollgate_request", r, RequestId::parse))
                .transpose()?,
        }))
    }
}

impl RlsApi {
    /// Charges `hits` tokens to the account of `charge` (or, with no hits,
    /// checks that it can spend): whether it is allowed.
    async fn charge(&self, charge: Charging, hits: u64) -> Result<bool, Status> {
        let refused = |e: StoreError| match e {
            StoreError::UnknownAccount(_) => Ok(false),
            StoreError::Engine(EngineError::Invalid { .. }) => Err(status(e)),
            other => Err(Status::unavailable(other.to_string())),
        };
        if hits == 0 {
            return match self.tollgate.apply(&charge.account, Command::Balance).await {
                Ok(Reply::Balance(b)) => {
                    Ok(!b.suspended && (b.spendable.is_positive() || b.allowance_tokens > 0 || b.pack_tokens > 0))
                }
                Ok(_) => Err(unexpected("Balance")),
                Err(e) => refused(e),
            };
        }
        let mut usage = Usage::default();
        match charge.kind {
            TokenKind::Input => usage.input_tokens = hits,
            TokenKind::CachedInput => usage.cached_input_tokens = hits,
            TokenKind::CacheWrite => usage.cache_write_tokens = hits,
            TokenKind::Output => usage.output_tokens = hits,
        }
        // Without a request id, each call is its own charge.
        let request_id = match charge.request {
            Some(r) => r,
            None => RequestId::parse(&format!("rls-{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..)))
                .map_err(|e| invalid("tollgate_request", e.to_string()))?,
        };
        let command = Command::Charge(ChargeRequest {
            request_id,
            api_key_id: None,
            model: Some(charge.model),
            tier: TierId::default_tier(),
            what: ChargeWhat::Usage(usage),
        });
        match self.tollgate.apply(&charge.account, command).await {
            Ok(Reply::Charge(ChargeOutcome::Charged(_))) => Ok(true),
            Ok(Reply::Charge(ChargeOutcome::Denied(..))) => Ok(false),
            Ok(_) => Err(unexpected("Charge")),
            Err(e) => refused(e),
        }
    }
}

/// The unit of Envoy's per-descriptor limit (`envoy.type.v3.RateLimitUnit`).
/// The `key` label of the hits of descriptors that carry Envoy's own limit.
const OVERRIDE_METRIC: &str = "(limit override)";

fn override_unit(value: i32) -> Result<Unit, Status> {
    Ok(match value {
        1 => Unit::Second,
        2 => Unit::Minute,
        3 => Unit::Hour,
        4 => Unit::Day,
        5 => Unit::Month,
        6 => Unit::Year,
        7 => Unit::Week,
        other => return Err(invalid("descriptors.limit.unit", format!("unknown unit {other}"))),
    })
}

fn wire_unit(unit: Unit) -> WireUnit {
    match unit {
        Unit::Second => WireUnit::Second,
        Unit::Minute => WireUnit::Minute,
        Unit::Hour => WireUnit::Hour,
        Unit::Day => WireUnit::Day,
        Unit::Week => WireUnit::Week,
        Unit::Month => WireUnit::Month,
        Unit::Year => WireUnit::Year,
    }
}

/// The store key of a window: the domain, the descriptor as counted, the
/// unit and the window's start, each part prefixed with its length (values
/// are arbitrary text), hashed.
fn counter_key(domain: &str, counter: &[(String, String)], unit: Unit, start: i64) -> String {
    use std::fmt::Write;
    let mut text = String::new();
    let mut part = |p: &str| {
        let _ = write!(text, "{}:{p}", p.len());
    };
    part(domain);
    for (key, value) in counter {
        part(key);
        part(value);
    }
    part(&unit.to_string());
    part(&start.to_string());
    crate::engine::record::digest_id([text.as_str()])
}

/// The most descriptors one request may carry, entries one descriptor
/// may, and bytes a key, a value or the domain may: Envoy sends a handful of short ones;
/// more is refused before anything is counted (each value becomes a
/// counter's key, in memory or in Redis).
pub const MAX_DESCRIPTORS: usize = 256;
/// See [`MAX_DESCRIPTORS`].
pub const MAX_ENTRIES: usize = 64;
/// See [`MAX_DESCRIPTORS`].
pub const MAX_TEXT: usize = 1024;

fn check_sizes(r: &RateLimitRequest) -> Result<(), Status> {
    if r.domain.len() > MAX_TEXT {
        return Err(invalid("domain", format!("at most {MAX_TEXT} bytes")));
    }
    if r.descriptors.len() > MAX_DESCRIPTORS {
        return Err(invalid(
            "descriptors",
            format!("at most {MAX_DESCRIPTORS}, got {}", r.descriptors.len()),
        ));
    }
    for (i, d) in r.descriptors.iter().enumerate() {
        if d.entries.len() > MAX_ENTRIES {
            return Err(invalid(
                &format!("descriptors[{i}].entries"),
                format!("at most {MAX_ENTRIES}, got {}", d.entries.len()),
            ));
        }
        for (j, e) in d.entries.iter().enumerate() {
            if e.key.len() > MAX_TEXT || e.value.len() > MAX_TEXT {
                return Err(invalid(
                    &format!("descriptors[{i}].entries[{j}]"),
                    format!("key and value are at most {MAX_TEXT} bytes each"),
                ));
            }
        }
    }
    Ok(())
}

#[tonic::async_trait]
impl RateLimitService for RlsApi {
    async fn should_rate_limit(
        &self,
        request: Request<RateLimitRequest>,
    ) -> Result<Response<RateLimitResponse>, Status> {
        let started = std::time::Instant::now();
        let answer = self.answer(request).await;
        let (outcome, reason) = match &answer {
            Ok(r) if r.get_ref().overall_code == Code::OverLimit as i32 => ("denied", "over_limit"),
            Ok(_) => ("allowed", "none"),
            Err(status) => ("error", crate::telemetry::metrics::code_label(status.code())),
        };
        metrics().decided("should_rate_limit", outcome, reason, started);
        answer
    }
}

impl RlsApi {
    async fn answer(&self, request: Request<RateLimitRequest>) -> Result<Response<RateLimitResponse>, Status> {
        let r = request.into_inner();
        if r.domain.is_empty() {
            return Err(invalid("domain", "must not be empty"));
        }
        if r.descriptors.is_empty() {
            return Err(invalid("descriptors", "must not be empty"));
        }
        check_sizes(&r)?;
        let ok = DescriptorStatus {
            code: Code::Ok as i32,
            ..Default::default()
        };
        let in_force = Arc::clone(&self.in_force.read().unwrap_or_else(|p| p.into_inner()));
        let (rules, settings) = (&in_force.rules, &in_force.settings);
        // A domain without rules limits nothing (as the reference).
        let domain = rules.domains.get(&r.domain);
        // Metric labels name configured domains only (the request's text
        // is unbounded).
        let domain_label = if domain.is_some() {
            r.domain.as_str()
        } else {
            "unconfigured"
        };
        let entries: Vec<Vec<Entry>> = r
            .descriptors
            .iter()
            .map(|d| {
                d.entries
                    .iter()
                    .map(|e| Entry {
                        key: e.key.clone(),
                        value: e.value.clone(),
                    })
                    .collect()
            })
            .collect();
        let mut matched: Vec<_> = entries.iter().map(|e| domain.and_then(|d| find(d, e))).collect();
        drop_replaced(&mut matched);
        let now = self.tollgate.now();
        let mut statuses = Vec::with_capacity(matched.len());
        // Over if any limit that is not a quota is, or if every quota is.
        let mut over = false;
        let (mut quotas, mut quotas_over) = (0usize, 0usize);
        // Bad input changes nothing: every descriptor is read before any
        // is counted or charged.
        let mut charges = Vec::with_capacity(r.descriptors.len());
        let mut overrides = Vec::with_capacity(r.descriptors.len());
        for descriptor in &r.descriptors {
            charges.push(Charging::of(descriptor)?);
            overrides.push(descriptor.limit.as_ref().map(|o| override_unit(o.unit)).transpose()?);
        }
        for (((descriptor, matched), charge), override_unit) in
            r.descriptors.iter().zip(&matched).zip(charges).zip(overrides)
        {
            if let Some(charge) = charge {
                let hits = descriptor
                    .hits_addend
                    .as_ref()
                    .map_or(u64::from(r.hits_addend), |h| h.value);
                let allowed = self.charge(charge, hits).await?;
                over |= !allowed;
                statuses.push(DescriptorStatus {
                    code: if allowed { Code::Ok } else { Code::OverLimit } as i32,
                    ..Default::default()
                });
                continue;
            }
            // Envoy's own limit for the descriptor replaces the rules' (never
            // shadowed, unnamed, counted per the values as sent).
            let overridden;
            let limit_override = override_unit.zip(descriptor.limit.as_ref());
            let overridden_metric;
            let (allowance, counter, shadow_mode, quota_mode, name, metric) = match (limit_override, matched) {
                (Some((unit, o)), _) => {
                    overridden = descriptor
                        .entries
                        .iter()
                        .map(|e| (e.key.clone(), e.value.clone()))
                        .collect::<Vec<_>>();
                    let allowance = Allowance::PerUnit {
                        unit,
                        requests_per_unit: o.requests_per_unit,
                    };
                    // The caller names these keys: as a metric label they
                    // would make a series per name, for ever.
                    overridden_metric = OVERRIDE_METRIC.to_owned();
                    (allowance, &overridden, false, false, None, &overridden_metric)
                }
                (None, Some(m)) => (
                    m.limit.allowance.clone(),
                    &m.counter,
                    m.shadow_mode,
                    m.quota_mode,
                    m.limit.name.as_ref(),
                    &m.metric,
                ),
                (None, None) => {
                    statuses.push(ok.clone());
                    continue;
                }
            };
            let (unit, requests_per_unit) = match allowance {
                Allowance::Unlimited => {
                    quotas += usize::from(quota_mode);
                    statuses.push(DescriptorStatus {
                        limit_remaining: u32::MAX,
                        ..ok.clone()
                    });
                    continue;
                }
                Allowance::PerUnit {
                    unit,
                    requests_per_unit,
                } => (unit, requests_per_unit),
            };
            // The descriptor's own hits_addend wins (0 included: a check
            // that adds nothing); the request's counts at least one.
            let hits = match &descriptor.hits_addend {
                Some(own) => own.value.min(MOST_HITS),
                None => u64::from(r.hits_addend.max(1)),
            };
            let (start, left) = unit.window(now);
            let key = counter_key(&r.domain, counter, unit, start);
            let ttl = Duration::from_secs(u64::try_from(left).unwrap_or(1));
            let limit = u64::from(requests_per_unit);
            if limit_override.is_some() {
                let ends = now
                    .checked_add(SignedDuration::from_secs(left))
                    .unwrap_or(Timestamp::MAX);
                let max = settings.max_override_windows;
                if !self.overrides.admit(&key, ends, now, max) {
                    return Err(Status::unavailable(format!(
                        "{max} windows of Envoy's own limits are open; refusing a new one (rls.max_override_windows)"
                    )));
                }
            }
            // A store that cannot count is UNAVAILABLE: Envoy's
            // failure_mode_deny decides.
            let count = self
                .tollgate
                .count_hits(&key, hits, limit, ttl, now)
                .await
                .map_err(|e| Status::unavailable(e.to_string()))?;
            let exceeded = count > limit;
            let outcome = match (exceeded, shadow_mode) {
                (true, true) => "shadow_mode",
                (true, false) => "over_limit",
                // Past 80 % of the limit, as the reference's near_limit.
                (false, _) if u128::from(count) * 5 > u128::from(limit) * 4 => "near_limit",
                (false, _) => "within_limit",
            };
            metrics()
                .rls_hits
                .get_or_create(&RlsHits {
                    domain: domain_label.to_owned(),
                    key: metric.clone(),
                    outcome,
                })
                .inc_by(hits);
            let code = if exceeded && !shadow_mode {
                Code::OverLimit
            } else {
                Code::Ok
            };
            if quota_mode {
                quotas += 1;
                quotas_over += usize::from(code == Code::OverLimit);
            } else {
                over |= code == Code::OverLimit;
            }
            statuses.push(DescriptorStatus {
                code: code as i32,
                current_limit: Some(RateLimit {
                    name: name.cloned().unwrap_or_default(),
                    requests_per_unit,
                    unit: wire_unit(unit) as i32,
                }),
                limit_remaining: u32::try_from(limit.saturating_sub(count)).unwrap_or(u32::MAX),
                duration_until_reset: Some(WireDuration {
                    seconds: left,
                    nanos: 0,
                }),
                ..Default::default()
            });
        }
        let response_headers_to_add = if settings.response_headers {
            headers(&statuses)
        } else {
            Vec::new()
        };
        let over = over || (quotas > 0 && quotas_over == quotas);
        let overall = if over && !settings.shadow_mode {
            Code::OverLimit
        } else {
            Code::Ok
        };
        Ok(Response::new(RateLimitResponse {
            overall_code: overall as i32,
            statuses,
            response_headers_to_add,
            ..Default::default()
        }))
    }
}

/// `x-ratelimit-*` for the most constrained limited descriptor: an
/// over-limit one (the last, as the reference), else the one with the
/// least remaining (the first on a tie).
fn headers(statuses: &[DescriptorStatus]) -> Vec<HeaderValue> {
    let limited = || statuses.iter().filter(|s| s.current_limit.is_some());
    let chosen = limited()
        .rfind(|s| s.code == Code::OverLimit as i32)
        .or_else(|| limited().min_by_key(|s| s.limit_remaining));
    let Some(status) = chosen else {
        return Vec::new();
    };
    let header = |key: &str, value: String| HeaderValue {
        key: key.into(),
        value,
        ..Default::default()
    };
    vec![
        header(
            "x-ratelimit-limit",
            status
                .current_limit
                .as_ref()
                .map_or(0, |l| l.requests_per_unit)
                .to_string(),
        ),
        header("x-ratelimit-remaining", status.limit_remaining.to_string()),
        header(
            "x-ratelimit-reset",
            status
                .duration_until_reset
                .as_ref()
                .map_or(0, |d| d.seconds)
                .to_string(),
        ),
    ]
}
