//! Field validation and conversion between `tollgate.v1` messages and
//! domain types. Proto types stop here. What usage records are made of
//! (records, takes, money, timestamps, token counts) converts in
//! [`crate::wire`], below the stores, which encode the usage stream with
//! it; it is re-exported here.

use std::time::Duration;

use tonic::Status;

use crate::engine::Ledger;
use crate::engine::ids::TierId;
use crate::engine::limits::{Exceeded, Kind, LimitOverrides, LimitSet, RateStatus, Scope};
use crate::engine::money::Money;
use crate::engine::pricing::{PriceVersion, TokenPrices};
use crate::engine::request::Denial;
use crate::proto;
use crate::wire::invalid;
pub use crate::wire::{
    id, money, money_out, opt_id, record_in, record_out, take_in, takes_out, timestamp, timestamp_out, tokens, usage,
    usage_out,
};

/// Longest accepted operator reason, in bytes.
pub const MAX_REASON_LEN: usize = 1024;

/// A service tier; empty means `default`.
pub fn tier(text: &str) -> Result<TierId, Status> {
    if text.is_empty() {
        Ok(TierId::default_tier())
    } else {
        id("service_tier", text, TierId::parse)
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
        show(l.granted()),
        show(l.available()),
        show(l.held()),
        show(l.charged()),
        show(l.forfeited()),
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
