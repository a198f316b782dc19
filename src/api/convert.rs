//! Field validation and conversion between `tollgate.v1` messages and
//! domain types. Proto types stop here. What usage records are made of
//! (records, takes, money, timestamps, token counts) converts in
//! [`crate::wire`], below the stores, which encode the usage stream with
//! it; it is re-exported here.

use std::time::Duration;

use tonic::Status;

use crate::engine::Ledger;
use crate::engine::alert::AlertSettings;
use crate::engine::budget::{Budget, BudgetPeriod, Budgets, Project};
use crate::engine::ids::{ApiKeyId, ProjectId, TierId};
use crate::engine::limits::{Exceeded, Kind, LimitOverrides, LimitSet, RateStatus, Scope};
use crate::engine::money::Money;
use crate::engine::pricing::{PriceVersion, TokenPrices};
use crate::engine::request::{BudgetUse, Denial};
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

/// A denial for the wire: its reason, and the limit or budget behind it.
#[derive(Debug, Clone, Default)]
pub struct DenialOut {
    /// The reason.
    pub reason: proto::DenyReason,
    /// The rate limit that denied.
    pub limit: Option<proto::LimitRef>,
    /// When a rate limit admits again.
    pub retry_after: Option<prost_types::Duration>,
    /// The budget that denied.
    pub budget: Option<proto::BudgetRef>,
}

/// A denial reason, and the limit or budget behind it, for the wire.
pub fn denial_out(d: &Denial) -> DenialOut {
    let reason = |reason| DenialOut {
        reason,
        ..DenialOut::default()
    };
    match d {
        Denial::InsufficientFunds => reason(proto::DenyReason::InsufficientFunds),
        Denial::UnknownAccount => reason(proto::DenyReason::UnknownAccount),
        Denial::Suspended => reason(proto::DenyReason::AccountSuspended),
        Denial::ModelNotPriced => reason(proto::DenyReason::ModelNotPriced),
        Denial::ModelNotAllowed => reason(proto::DenyReason::ModelNotAllowed),
        Denial::BudgetExceeded(e) => DenialOut {
            budget: Some(proto::BudgetRef {
                scope: budget_scope_out(e.scope) as i32,
                id: e.id.to_string(),
                period: e.period.name().to_owned(),
                money_limit: e.money.then(|| money_out(Money::from_picos(e.limit))),
                tokens_limit: if e.money {
                    0
                } else {
                    u64::try_from(e.limit).unwrap_or(u64::MAX)
                },
                resets_at: Some(timestamp_out(e.resets_at)),
            }),
            ..reason(proto::DenyReason::BudgetExceeded)
        },
        Denial::RateLimited(Exceeded {
            scope,
            kind,
            limit,
            retry_after,
        }) => {
            let scope = match scope {
                Scope::Account => proto::LimitScope::Account,
                Scope::ApiKey | Scope::KeyBudget => proto::LimitScope::ApiKey,
                Scope::Model => proto::LimitScope::Model,
                Scope::ProjectBudget => proto::LimitScope::Unspecified,
            };
            let kind = match kind {
                Kind::Requests => proto::LimitKind::RequestsPerMinute,
                Kind::Tokens => proto::LimitKind::TokensPerMinute,
                Kind::Concurrency => proto::LimitKind::ConcurrentRequests,
                Kind::SidecarConcurrency => proto::LimitKind::ConcurrentRequestsPerSidecar,
            };
            DenialOut {
                limit: Some(proto::LimitRef {
                    scope: scope as i32,
                    kind: kind as i32,
                    limit: *limit,
                }),
                retry_after: retry_after.map(duration_out),
                ..reason(proto::DenyReason::RateLimited)
            }
        }
    }
}

/// A budget's scope for the wire.
pub fn budget_scope_out(scope: Scope) -> proto::BudgetScope {
    match scope {
        Scope::ProjectBudget => proto::BudgetScope::Project,
        _ => proto::BudgetScope::ApiKey,
    }
}

/// One budget's use for the wire.
pub fn budget_use_out(u: &BudgetUse) -> proto::BudgetUse {
    let a = &u.applying;
    proto::BudgetUse {
        scope: budget_scope_out(a.scope) as i32,
        id: a.id.to_string(),
        period: a.budget.period.name().to_owned(),
        money_limit: a.budget.money.map(money_out),
        money_used: Some(money_out(Money::from_picos(u.counted.used.money))),
        tokens_limit: a.budget.tokens.unwrap_or(0),
        tokens_used: u64::try_from(u.counted.used.tokens).unwrap_or(0),
        resets_at: Some(timestamp_out(u.counted.resets_at)),
        runs_out_at: u.runs_out_at.map(timestamp_out),
        money_spent: Some(money_out(Money::from_picos(u.counted.spent.money))),
        tokens_spent: u64::try_from(u.counted.spent.tokens).unwrap_or(0),
    }
}

/// A budget from the wire.
pub fn budget_in(field: &str, b: &proto::Budget) -> Result<Budget, Status> {
    Ok(Budget {
        period: BudgetPeriod::parse(&b.period).map_err(|e| invalid(&format!("{field}.period"), e))?,
        money: b
            .money
            .as_ref()
            .map(|m| money(&format!("{field}.money"), Some(m)))
            .transpose()?,
        tokens: (b.tokens > 0).then_some(b.tokens),
    })
}

/// An account's budgets from the wire (checked whole by the engine).
pub fn budgets_in(b: &proto::Budgets) -> Result<Budgets, Status> {
    let mut out = Budgets::default();
    for (key, budget) in &b.api_keys {
        let field = format!("budgets.api_keys.{key}");
        out.keys
            .insert(id(&field, key, ApiKeyId::parse)?, budget_in(&field, budget)?);
    }
    for (project, p) in &b.projects {
        let field = format!("budgets.projects.{project}");
        let keys = p
            .api_key_ids
            .iter()
            .map(|k| id(&format!("{field}.api_key_ids"), k, ApiKeyId::parse))
            .collect::<Result<_, _>>()?;
        let budget = p
            .budget
            .as_ref()
            .map(|b| budget_in(&format!("{field}.budget"), b))
            .transpose()?;
        out.projects
            .insert(id(&field, project, ProjectId::parse)?, Project { keys, budget });
    }
    Ok(out)
}

/// Alert thresholds from the wire (checked by the engine).
pub fn alerts_in(a: &proto::AlertSettings) -> Result<AlertSettings, Status> {
    let percents = |field: &str, list: &[u32]| {
        list.iter()
            .map(|p| u8::try_from(*p).map_err(|_| invalid(field, "percentages are 1 to 100")))
            .collect::<Result<Vec<u8>, Status>>()
    };
    Ok(AlertSettings {
        balance_below: a
            .balance_below
            .iter()
            .map(|m| money("alerts.balance_below", Some(m)))
            .collect::<Result<_, _>>()?,
        allowance_used: percents("alerts.allowance_used_percent", &a.allowance_used_percent)?,
        pack_used: percents("alerts.pack_used_percent", &a.pack_used_percent)?,
        budget_used: percents("alerts.budget_used_percent", &a.budget_used_percent)?,
        pack_expiring_days: a.pack_expiring_days,
        debt_started: a.debt_started,
    })
}

/// Alert thresholds for the wire.
pub fn alerts_out(a: &AlertSettings) -> proto::AlertSettings {
    let percents = |list: &[u8]| list.iter().map(|p| u32::from(*p)).collect();
    proto::AlertSettings {
        balance_below: a.balance_below.iter().map(|m| money_out(*m)).collect(),
        allowance_used_percent: percents(&a.allowance_used),
        pack_used_percent: percents(&a.pack_used),
        budget_used_percent: percents(&a.budget_used),
        pack_expiring_days: a.pack_expiring_days,
        debt_started: a.debt_started,
    }
}

/// An account's budgets for the wire.
pub fn budgets_out(b: &Budgets) -> proto::Budgets {
    let budget = |b: &Budget| proto::Budget {
        period: b.period.name().to_owned(),
        money: b.money.map(money_out),
        tokens: b.tokens.unwrap_or(0),
    };
    proto::Budgets {
        api_keys: b.keys.iter().map(|(k, b)| (k.to_string(), budget(b))).collect(),
        projects: b
            .projects
            .iter()
            .map(|(id, p)| {
                let project = proto::Project {
                    api_key_ids: p.keys.iter().map(ToString::to_string).collect(),
                    budget: p.budget.as_ref().map(budget),
                };
                (id.to_string(), project)
            })
            .collect(),
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
