//! Field validation and conversion between `tollgate.v1` messages and
//! domain types. Proto types stop here.

use std::time::Duration;

use jiff::Timestamp;
use tonic::Status;

use super::status::invalid;
use crate::engine::draw::{SourceRef, Take};
use crate::engine::ids::{IdError, TierId};
use crate::engine::limits::{Exceeded, Kind, LimitOverrides, LimitSet, RateStatus, Scope};
use crate::engine::money::{MAX_TOKENS_PER_FIELD, Money, SCALE};
use crate::engine::ops::Denial;
use crate::engine::pricing::{PriceVersion, TokenPrices, Usage};
use crate::engine::{Ledger, UsageRecord};
use crate::proto;

/// Longest accepted operator reason, in bytes.
pub const MAX_REASON_LEN: usize = 1024;

/// A required id.
pub fn id<T>(field: &str, text: &str, parse: fn(&str) -> Result<T, IdError>) -> Result<T, Status> {
    parse(text).map_err(|e| invalid(field, e))
}

/// An optional id: empty means absent.
pub fn opt_id<T>(field: &str, text: &str, parse: fn(&str) -> Result<T, IdError>) -> Result<Option<T>, Status> {
    if text.is_empty() {
        Ok(None)
    } else {
        id(field, text, parse).map(Some)
    }
}

/// A service tier; empty means `default`.
pub fn tier(text: &str) -> Result<TierId, Status> {
    if text.is_empty() {
        Ok(TierId::default_tier())
    } else {
        id("service_tier", text, TierId::parse)
    }
}

/// A token count within [`MAX_TOKENS_PER_FIELD`].
pub fn tokens(field: &str, n: u64) -> Result<u64, Status> {
    if n > MAX_TOKENS_PER_FIELD {
        return Err(invalid(
            field,
            format!("{n} is above the limit of {MAX_TOKENS_PER_FIELD}"),
        ));
    }
    Ok(n)
}

/// Token counts of every kind; the message is required.
pub fn usage(field: &str, u: Option<&proto::Usage>) -> Result<Usage, Status> {
    let u = u.ok_or_else(|| invalid(field, "is required (a settle without counts is never charged as zero)"))?;
    Ok(Usage {
        input_tokens: tokens(&format!("{field}.input_tokens"), u.input_tokens)?,
        cached_input_tokens: tokens(&format!("{field}.cached_input_tokens"), u.cached_input_tokens)?,
        cache_write_tokens: tokens(&format!("{field}.cache_write_tokens"), u.cache_write_tokens)?,
        output_tokens: tokens(&format!("{field}.output_tokens"), u.output_tokens)?,
    })
}

/// A required money amount.
pub fn money(field: &str, m: Option<&proto::Money>) -> Result<Money, Status> {
    let m = m.ok_or_else(|| invalid(field, "is required"))?;
    if u128::from(m.picos.unsigned_abs()) >= SCALE.unsigned_abs() {
        return Err(invalid(field, "picos must be within (-10^12, 10^12)"));
    }
    if (m.units > 0 && m.picos < 0) || (m.units < 0 && m.picos > 0) {
        return Err(invalid(field, "units and picos must have the same sign"));
    }
    Ok(Money::from_picos(i128::from(m.units) * SCALE + i128::from(m.picos)))
}

/// A money amount for the wire.
pub fn money_out(m: Money) -> proto::Money {
    let units = m.picos() / SCALE;
    proto::Money {
        units: i64::try_from(units).unwrap_or(if units < 0 { i64::MIN } else { i64::MAX }),
        // |remainder| < 10^12 always fits.
        picos: i64::try_from(m.picos() % SCALE).unwrap_or_default(),
        decimal: m.to_string(),
    }
}

/// A required timestamp.
pub fn timestamp(field: &str, t: Option<&prost_types::Timestamp>) -> Result<Timestamp, Status> {
    let t = t.ok_or_else(|| invalid(field, "is required"))?;
    let nanos = Some(t.nanos).filter(|n| (0..1_000_000_000).contains(n));
    nanos
        .and_then(|n| Timestamp::new(t.seconds, n).ok())
        .ok_or_else(|| invalid(field, "is not a valid timestamp"))
}

/// A timestamp for the wire.
pub fn timestamp_out(t: Timestamp) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.as_second(),
        nanos: t.subsec_nanosecond(),
    }
}

/// A duration for the wire.
pub fn duration_out(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or_default(),
    }
}

/// An operator's reason: required, at most [`MAX_REASON_LEN`] bytes.
pub fn reason(text: &str) -> Result<String, Status> {
    if text.trim().is_empty() {
        return Err(invalid("reason", "is required"));
    }
    if text.len() > MAX_REASON_LEN {
        return Err(invalid("reason", format!("is longer than {MAX_REASON_LEN} bytes")));
    }
    // A newline or an escape sequence would let a reason pass for log
    // lines of its own, or rewrite a terminal showing the log; a line or
    // paragraph separator breaks lines too, and a bidirectional control
    // shows text in another order than it is read.
    let unprintable = |c: &char| {
        c.is_control()
            || matches!(c, '\u{2028}' | '\u{2029}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    };
    if let Some(c) = text.chars().find(unprintable) {
        return Err(invalid(
            "reason",
            format!("must be one line of printable text; found {c:?}"),
        ));
    }
    Ok(text.to_owned())
}

fn source_kind(s: &SourceRef) -> proto::SourceKind {
    match s {
        SourceRef::Allowance { .. } => proto::SourceKind::Allowance,
        SourceRef::Pack(_) => proto::SourceKind::Pack,
        SourceRef::Promo(_) => proto::SourceKind::Promo,
        SourceRef::Paid => proto::SourceKind::Paid,
        SourceRef::Credit => proto::SourceKind::Credit,
        SourceRef::Debt => proto::SourceKind::Debt,
    }
}

/// Takes for the wire.
pub fn takes_out(takes: &[Take]) -> Vec<proto::SourceAmount> {
    takes
        .iter()
        .map(|t| proto::SourceAmount {
            source: source_kind(&t.source) as i32,
            lot_id: t.source.lot().unwrap_or_default(),
            tokens: if t.source.is_tokens() {
                u64::try_from(t.amount).unwrap_or(u64::MAX)
            } else {
                0
            },
            money: (!t.source.is_tokens()).then(|| money_out(Money::from_picos(t.amount))),
        })
        .collect()
}

/// A take from the wire (as `takes_out` writes it).
pub fn take_in(field: &str, a: &proto::SourceAmount) -> Result<Take, Status> {
    let lot_field = format!("{field}.lot_id");
    let lot = || id(&lot_field, &a.lot_id, crate::engine::ids::LotId::parse);
    let source = match proto::SourceKind::try_from(a.source) {
        Ok(proto::SourceKind::Allowance) => SourceRef::Allowance {
            period: a
                .lot_id
                .strip_prefix("period:")
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| invalid(&lot_field, "expected period:N for an allowance"))?,
        },
        Ok(proto::SourceKind::Pack) => SourceRef::Pack(lot()?),
        Ok(proto::SourceKind::Promo) => SourceRef::Promo(lot()?),
        Ok(proto::SourceKind::Paid) => SourceRef::Paid,
        Ok(proto::SourceKind::Credit) => SourceRef::Credit,
        Ok(proto::SourceKind::Debt) => SourceRef::Debt,
        Ok(proto::SourceKind::Unspecified) | Err(_) => {
            return Err(invalid(
                &format!("{field}.source"),
                format!("unknown source {}", a.source),
            ));
        }
    };
    let amount = if source.is_tokens() {
        i128::from(tokens(&format!("{field}.tokens"), a.tokens)?)
    } else {
        money(&format!("{field}.money"), a.money.as_ref())?.picos()
    };
    Ok(Take { source, amount })
}

/// Token counts for the wire.
pub fn usage_out(u: &Usage) -> proto::Usage {
    proto::Usage {
        input_tokens: u.input_tokens,
        cached_input_tokens: u.cached_input_tokens,
        cache_write_tokens: u.cache_write_tokens,
        output_tokens: u.output_tokens,
    }
}

/// A usage record for the wire.
pub fn record_out(r: &UsageRecord) -> proto::UsageRecord {
    proto::UsageRecord {
        request_id: r.request_id.to_string(),
        reservation_id: r.reservation_id.as_ref().map(ToString::to_string).unwrap_or_default(),
        account_id: r.account_id.to_string(),
        api_key_id: r.api_key_id.as_ref().map(ToString::to_string).unwrap_or_default(),
        model: r.model.as_ref().map(ToString::to_string).unwrap_or_default(),
        service_tier: r.service_tier.as_ref().map(ToString::to_string).unwrap_or_default(),
        usage: Some(usage_out(&r.usage)),
        charges: takes_out(&r.charges),
        total_money: Some(money_out(r.total_money)),
        price_version: r.price_version.as_ref().map(ToString::to_string).unwrap_or_default(),
        reserved_at: Some(timestamp_out(r.reserved_at)),
        settled_at: Some(timestamp_out(r.settled_at)),
        kind: r.kind.as_str().to_owned(),
        record_id: r.id(),
        journal: String::new(),
        journal_seq: 0,
    }
}

/// A usage record from the wire, as [`record_out`] writes it (the usage
/// stream's encoding): the inverse of `record_out`, exact to the
/// nanosecond and the pico-unit.
pub fn record_in(r: &proto::UsageRecord) -> Result<UsageRecord, Status> {
    use crate::engine::ids::{AccountId, ApiKeyId, ModelId, RequestId, ReservationId, VersionId};
    Ok(UsageRecord {
        kind: r.kind.parse().map_err(|e: String| invalid("kind", e))?,
        request_id: id("request_id", &r.request_id, RequestId::parse)?,
        reservation_id: opt_id("reservation_id", &r.reservation_id, ReservationId::parse)?,
        account_id: id("account_id", &r.account_id, AccountId::parse)?,
        api_key_id: opt_id("api_key_id", &r.api_key_id, ApiKeyId::parse)?,
        model: opt_id("model", &r.model, ModelId::parse)?,
        service_tier: opt_id("service_tier", &r.service_tier, TierId::parse)?,
        usage: usage("usage", r.usage.as_ref())?,
        charges: r
            .charges
            .iter()
            .enumerate()
            .map(|(i, a)| take_in(&format!("charges[{i}]"), a))
            .collect::<Result<_, _>>()?,
        total_money: money("total_money", r.total_money.as_ref())?,
        price_version: opt_id("price_version", &r.price_version, VersionId::parse)?,
        reserved_at: timestamp("reserved_at", r.reserved_at.as_ref())?,
        settled_at: timestamp("settled_at", r.settled_at.as_ref())?,
    })
}

/// Rate-limit header figures for the wire.
pub fn rate_status_out(s: &RateStatus) -> proto::RateLimitStatus {
    proto::RateLimitStatus {
        requests_limit: s.requests.limit,
        requests_remaining: s.requests.remaining,
        requests_reset: Some(duration_out(s.requests.reset)),
        tokens_limit: s.tokens.limit,
        tokens_remaining: s.tokens.remaining,
        tokens_reset: Some(duration_out(s.tokens.reset)),
    }
}

/// A denial reason, and the limit behind it, for the wire.
pub fn denial_out(
    d: &Denial,
) -> (
    proto::DenyReason,
    Option<proto::LimitRef>,
    Option<prost_types::Duration>,
) {
    match d {
        Denial::InsufficientFunds => (proto::DenyReason::InsufficientFunds, None, None),
        Denial::UnknownAccount => (proto::DenyReason::UnknownAccount, None, None),
        Denial::Suspended => (proto::DenyReason::AccountSuspended, None, None),
        Denial::ModelNotPriced => (proto::DenyReason::ModelNotPriced, None, None),
        Denial::ModelNotAllowed => (proto::DenyReason::ModelNotAllowed, None, None),
        Denial::RateLimited(Exceeded {
            scope,
            kind,
            limit,
            retry_after,
        }) => {
            let scope = match scope {
                Scope::Account => proto::LimitScope::Account,
                Scope::ApiKey => proto::LimitScope::ApiKey,
                Scope::Model => proto::LimitScope::Model,
            };
            let kind = match kind {
                Kind::Requests => proto::LimitKind::RequestsPerMinute,
                Kind::Tokens => proto::LimitKind::TokensPerMinute,
                Kind::Concurrency => proto::LimitKind::ConcurrentRequests,
                Kind::SidecarConcurrency => proto::LimitKind::ConcurrentRequestsPerSidecar,
            };
            let limit = proto::LimitRef {
                scope: scope as i32,
                kind: kind as i32,
                limit: *limit,
            };
            (
                proto::DenyReason::RateLimited,
                Some(limit),
                retry_after.map(duration_out),
            )
        }
    }
}

/// A limit set from the wire, each figure at most `MAX_LIMIT`.
pub fn limit_set(field: &str, l: &proto::LimitSet) -> Result<LimitSet, Status> {
    let set = LimitSet {
        requests_per_minute: l.requests_per_minute,
        tokens_per_minute: l.tokens_per_minute,
        concurrent_requests: l.concurrent_requests,
        concurrent_requests_per_sidecar: l.concurrent_requests_per_sidecar,
        request_burst: l.request_burst,
        token_burst: l.token_burst,
    };
    set.check().map_err(|e| invalid(field, e))?;
    Ok(set)
}

/// A limit set for the wire.
pub fn limit_set_out(l: &LimitSet) -> proto::LimitSet {
    proto::LimitSet {
        requests_per_minute: l.requests_per_minute,
        tokens_per_minute: l.tokens_per_minute,
        concurrent_requests: l.concurrent_requests,
        concurrent_requests_per_sidecar: l.concurrent_requests_per_sidecar,
        request_burst: l.request_burst,
        token_burst: l.token_burst,
    }
}

/// Overrides for the wire.
pub fn overrides_out(o: &LimitOverrides) -> proto::LimitOverrides {
    proto::LimitOverrides {
        account: o.account.as_ref().map(limit_set_out),
        api_key: o.api_key.as_ref().map(limit_set_out),
        per_model: o.per_model.as_ref().map(limit_set_out),
        models: o
            .models
            .iter()
            .map(|(m, l)| (m.to_string(), limit_set_out(l)))
            .collect(),
    }
}

/// A ledger's figures as decimal strings (money) or integers (tokens).
pub fn ledger_figures(l: &Ledger, tokens: bool) -> [String; 5] {
    let show = |v: i128| {
        if tokens {
            v.to_string()
        } else {
            Money::from_picos(v).to_string()
        }
    };
    [
        show(l.granted),
        show(l.available()),
        show(l.held),
        show(l.charged),
        show(l.forfeited),
    ]
}

/// Prices per token, as the API states them: per million tokens.
pub fn token_prices_out(p: &TokenPrices) -> proto::TokenPrices {
    let per_million = |m: Money| Some(money_out(Money::from_picos(m.picos() * 1_000_000)));
    proto::TokenPrices {
        input_per_million: per_million(p.input),
        cached_input_per_million: per_million(p.cached_input),
        cache_write_per_million: per_million(p.cache_write),
        output_per_million: per_million(p.output),
    }
}

/// A price version, models, tiers and windows sorted by name.
pub fn price_version_out(v: &PriceVersion) -> proto::PriceVersion {
    let mut models: Vec<_> = v
        .models
        .iter()
        .map(|(model, m)| {
            let mut tiers: Vec<_> = m
                .tiers
                .iter()
                .map(|(tier, t)| proto::TierPrices {
                    service_tier: tier.to_string(),
                    prices: Some(token_prices_out(&t.base)),
                    context_tiers: t
                        .context_tiers
                        .iter()
                        .map(|(min, prices)| proto::ContextTier {
                            min_prompt_tokens: *min,
                            prices: Some(token_prices_out(prices)),
                        })
                        .collect(),
                })
                .collect();
            tiers.sort_by(|a, b| a.service_tier.cmp(&b.service_tier));
            proto::ModelPrices {
                model: model.to_string(),
                token_weight_milli: m.weight_milli,
                tiers,
            }
        })
        .collect();
    models.sort_by(|a, b| a.model.cmp(&b.model));
    proto::PriceVersion {
        id: v.id.to_string(),
        effective_at: Some(timestamp_out(v.effective_at)),
        models,
        windows: v
            .windows
            .iter()
            .map(|w| {
                let mut models: Vec<String> = w.models.iter().flatten().map(ToString::to_string).collect();
                models.sort();
                proto::PriceWindow {
                    name: w.name.clone(),
                    start_minute: w.start_minute,
                    end_minute: w.end_minute,
                    time_zone: w.time_zone.iana_name().unwrap_or_default().to_owned(),
                    price_percent: w.price_percent,
                    models,
                }
            })
            .collect(),
    }
}
