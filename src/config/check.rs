use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use jiff::Timestamp;
use serde::Deserialize;

use crate::engine::catalog::{Allowance, OutagePolicy, Plan, SourceClass, check_draw_order};
use crate::engine::hash::{Map, Set};
use crate::engine::ids::{AccountId, LotId, ModelId, PlanId, TierId, VersionId};
use crate::engine::money::Money;
use crate::engine::period::parse_time_zone;
use crate::engine::period::{Anchor, PeriodUnit};
use crate::engine::pricing::price_per_token;
use crate::engine::pricing::{ModelPrices, PriceVersion, PriceWindow, TierPrices, TokenPrices};
use crate::engine::request::PackGrant;
use crate::service::SeedAccount;
use crate::store::leased::LeaseSettings;
use crate::store::redis::RedisSettings;
use crate::usage::journal::{JournalSettings, OnCorrupt, SyncPolicy};

use super::file::{AccountFile, JournalFile, LeasesFile, PlanFile, PricesFile, StoreFile, VersionFile};
use super::secrets::redis_credentials;
use super::{ConfigError, ConfigErrors, StoreKind, StoreSettings};

/// A TOML syntax or shape error in `text`, with its line.
pub(super) fn syntax(text: &str, e: &toml::de::Error) -> ConfigErrors {
    let message = e.message().to_owned();
    let path = e
        .span()
        .map(|span| {
            let line = text[..span.start].matches('\n').count() + 1;
            format!("line {line}")
        })
        .unwrap_or_else(|| "(file)".into());
    ConfigErrors(vec![ConfigError { path, message }])
}

/// Price versions written as in the configuration (`[[prices]]` tables),
/// e.g. for `tollgate admin prices publish`: every version, or every
/// problem found.
pub fn parse_price_versions(text: &str) -> Result<Vec<PriceVersion>, ConfigErrors> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct PricesFile {
        prices: Vec<VersionFile>,
    }
    let file: PricesFile = toml::from_str(text).map_err(|e| syntax(text, &e))?;
    let mut p = Problems::default();
    let versions = versions(&mut p, &file.prices);
    if p.0.is_empty() {
        Ok(versions)
    } else {
        Err(ConfigErrors(p.0))
    }
}

/// Collects problems while converting, so all are reported at once.
#[derive(Default)]
pub(super) struct Problems(pub(super) Vec<ConfigError>);

impl Problems {
    pub(super) fn push(&mut self, path: impl Into<String>, message: impl fmt::Display) {
        self.0.push(ConfigError {
            path: path.into(),
            message: message.to_string(),
        });
    }

    pub(super) fn check<T, E: fmt::Display>(&mut self, path: impl Into<String>, r: Result<T, E>) -> Option<T> {
        r.map_err(|e| self.push(path, e)).ok()
    }
}

/// Parses `day`, `week`, `month` or `year`.
pub fn parse_period(s: &str) -> Result<PeriodUnit, String> {
    match s {
        "day" => Ok(PeriodUnit::Day),
        "week" => Ok(PeriodUnit::Week),
        "month" => Ok(PeriodUnit::Month),
        "year" => Ok(PeriodUnit::Year),
        _ => Err(format!("expected day, week, month or year, got {s:?}")),
    }
}

/// Parses `calendar` or `anniversary`.
pub fn parse_anchor(s: &str) -> Result<Anchor, String> {
    match s {
        "calendar" => Ok(Anchor::Calendar),
        "anniversary" => Ok(Anchor::Anniversary),
        _ => Err(format!("expected calendar or anniversary, got {s:?}")),
    }
}

pub(super) fn parse_source(s: &str) -> Result<SourceClass, String> {
    match s {
        "allowance" => Ok(SourceClass::Allowance),
        "packs" => Ok(SourceClass::Packs),
        "promo" => Ok(SourceClass::Promo),
        "paid" => Ok(SourceClass::Paid),
        "credit" => Ok(SourceClass::Credit),
        _ => Err(format!("expected allowance, packs, promo, paid or credit, got {s:?}")),
    }
}

pub(super) fn parse_money(s: &str) -> Result<Money, String> {
    s.parse::<Money>().map_err(|e| e.to_string())
}

pub(super) fn parse_amount(s: &str) -> Result<Money, String> {
    let m = parse_money(s)?;
    if m.is_negative() {
        Err(format!("{s:?} must not be negative"))
    } else {
        Ok(m)
    }
}

/// Parses a token weight: a decimal with at most three decimal places,
/// above zero, at most 1000.
pub fn parse_weight(s: &str) -> Result<u32, String> {
    let m: Money = s
        .parse()
        .map_err(|_| format!("expected a decimal weight such as \"1.5\", got {s:?}"))?;
    let milli = m.picos() / 1_000_000_000;
    if m.picos() % 1_000_000_000 != 0 {
        return Err(format!("weight {s:?} has more than 3 decimal places"));
    }
    // The bound itself is checked with the rest of the version
    // (`PriceVersion::problems`); here only what fits a u32.
    u32::try_from(milli).map_err(|_| format!("weight {s:?} must be above 0 and at most 1000"))
}

/// Parses `HH:MM` into minutes after midnight.
pub(super) fn parse_clock(s: &str) -> Result<u32, String> {
    let err = || format!("expected HH:MM, got {s:?}");
    let (h, m) = s.split_once(':').ok_or_else(err)?;
    let (h, m): (u32, u32) = (h.parse().map_err(|_| err())?, m.parse().map_err(|_| err())?);
    if h > 23 || m > 59 || s.len() != 5 {
        return Err(err());
    }
    Ok(h * 60 + m)
}

pub(super) fn prices(p: &mut Problems, path: &str, f: &PricesFile) -> TokenPrices {
    let mut one = |field: &str, v: Option<&String>, fallback: &String| {
        let text = v.unwrap_or(fallback);
        p.check(format!("{path}.{field}"), parse_money(text).and_then(price_per_token))
            .unwrap_or(Money::ZERO)
    };
    TokenPrices {
        input: one("input", None, &f.input),
        cached_input: one("cached_input", f.cached_input.as_ref(), &f.input),
        cache_write: one("cache_write", f.cache_write.as_ref(), &f.input),
        output: one("output", None, &f.output),
    }
}

/// The `[[prices]]` tables as versions (their problems go to `p`).
pub(super) fn versions(p: &mut Problems, files: &[VersionFile]) -> Vec<PriceVersion> {
    files
        .iter()
        .enumerate()
        .filter_map(|(i, f)| version(p, &format!("prices[{i}]"), f))
        .collect()
}

pub(super) fn version(p: &mut Problems, path: &str, f: &VersionFile) -> Option<PriceVersion> {
    let before = p.0.len();
    let id = p.check(format!("{path}.id"), VersionId::parse(&f.id));
    let effective_at = p.check(format!("{path}.effective_at"), f.effective_at.parse::<Timestamp>());
    let mut models = Map::default();
    for (name, m) in &f.models {
        let mpath = format!("{path}.models.{name}");
        let model = p.check(mpath.clone(), ModelId::parse(name));
        let weight = match &m.token_weight {
            None => Some(1000),
            Some(w) => p.check(format!("{mpath}.token_weight"), parse_weight(w)),
        };
        let mut tiers = Map::default();
        for (tier_name, t) in &m.tiers {
            let tpath = format!("{mpath}.tiers.{tier_name}");
            let tier = p.check(tpath.clone(), TierId::parse(tier_name));
            let base = prices(p, &tpath, &t.prices);
            let context_tiers = t
                .context_tiers
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    (
                        c.min_prompt_tokens,
                        prices(p, &format!("{tpath}.context_tiers[{i}]"), &c.prices),
                    )
                })
                .collect();
            if let Some(tier) = tier {
                tiers.insert(tier, TierPrices { base, context_tiers });
            }
        }
        if let (Some(model), Some(weight_milli)) = (model, weight) {
            models.insert(model, ModelPrices { weight_milli, tiers });
        }
    }
    let mut windows = Vec::new();
    for (i, w) in f.windows.iter().enumerate() {
        let wpath = format!("{path}.windows[{i}]");
        let start = p.check(format!("{wpath}.start"), parse_clock(&w.start));
        let end = p.check(format!("{wpath}.end"), parse_clock(&w.end));
        let tz = p.check(
            format!("{wpath}.time_zone"),
            parse_time_zone(w.time_zone.as_deref().unwrap_or("UTC")),
        );
        let models: Vec<_> = w
            .models
            .iter()
            .filter_map(|m| p.check(format!("{wpath}.models"), ModelId::parse(m)))
            .collect();
        if w.price_percent > 1000 {
            p.push(format!("{wpath}.price_percent"), "must be at most 1000");
        }
        if let (Some(start_minute), Some(end_minute), Some(time_zone)) = (start, end, tz) {
            windows.push(PriceWindow {
                name: w.name.clone(),
                start_minute,
                end_minute,
                time_zone,
                price_percent: w.price_percent,
                models: (!models.is_empty()).then(|| models.into_iter().collect()),
            });
        }
    }
    let version = PriceVersion {
        id: id?,
        effective_at: effective_at?,
        models,
        windows,
    };
    if p.0.len() > before {
        return None;
    }
    for problem in version.problems() {
        p.push(path, problem);
    }
    Some(version)
}

pub(super) fn store_settings(p: &mut Problems, f: &StoreFile, leases: &LeasesFile) -> StoreSettings {
    let kind = match f.kind.as_str() {
        "memory" => StoreKind::Memory,
        "redis" => StoreKind::Redis,
        other => {
            p.push("store.kind", format!("expected memory or redis, got {other:?}"));
            StoreKind::Memory
        }
    };
    if !(1..=100_000_000).contains(&f.max_rate_limit_windows) {
        p.push("store.max_rate_limit_windows", "must be between 1 and 100000000");
    }
    let r = &f.redis;
    for (i, url) in r.urls.iter().enumerate() {
        if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
            p.push(
                format!("store.redis.urls[{i}]"),
                "must start with redis:// or rediss://",
            );
        }
    }
    if kind == StoreKind::Redis && r.urls.is_empty() {
        p.push(
            "store.redis.urls",
            "required with store.kind = \"redis\" (or give --redis URL, or TOLLGATE_REDIS)",
        );
    }
    if !(10..=60_000).contains(&r.deadline_ms) {
        p.push("store.redis.deadline_ms", "must be between 10 and 60000");
    }
    if r.replicas > 16 {
        p.push("store.redis.replicas", "must be at most 16");
    }
    if r.key_prefix.is_empty() || r.key_prefix.contains(['{', '}']) {
        p.push("store.redis.key_prefix", "must be non-empty and free of braces");
    }
    if r.trim_keep_seconds > 86_400 {
        p.push("store.redis.trim_keep_seconds", "must be at most 86400 (a day)");
    }
    if r.consumer_groups.len() > 16 {
        p.push("store.redis.consumer_groups", "at most 16 groups");
    }
    for (i, group) in r.consumer_groups.iter().enumerate() {
        if group.is_empty() || group.len() > 128 || group.chars().any(|c| c.is_whitespace() || c.is_control()) {
            p.push(
                "store.redis.consumer_groups",
                format!("{group:?}: a group name is 1 to 128 characters, without spaces or control characters"),
            );
        } else if r.consumer_groups[..i].contains(group) {
            p.push("store.redis.consumer_groups", format!("{group:?} is named twice"));
        }
    }
    let credentials = redis_credentials(p, r);
    if leases.ttl_seconds < 3 || leases.ttl_seconds > 3600 {
        p.push("leases.ttl_seconds", "must be between 3 and 3600");
    }
    if leases.horizon_ms == 0 || leases.horizon_ms > 600_000 {
        p.push("leases.horizon_ms", "must be between 1 and 600000");
    }
    if leases.report_interval_ms == 0 || leases.report_interval_ms > leases.ttl_seconds * 1000 / 3 {
        p.push(
            "leases.report_interval_ms",
            "must be between 1 and a third of leases.ttl_seconds",
        );
    }
    if leases.idle_return_seconds == 0 {
        p.push("leases.idle_return_seconds", "must be greater than zero");
    }
    StoreSettings {
        kind,
        redis: RedisSettings {
            urls: r.urls.clone(),
            cluster: r.cluster,
            deadline: Duration::from_millis(r.deadline_ms),
            ca_cert: r.ca_cert.clone(),
            credentials,
            replicas: r.replicas,
        },
        leases: LeaseSettings {
            ttl: Duration::from_secs(leases.ttl_seconds),
            horizon: Duration::from_millis(leases.horizon_ms),
            idle_return: Duration::from_secs(leases.idle_return_seconds),
            report_interval: Duration::from_millis(leases.report_interval_ms),
            max_clock_skew: (r.max_clock_skew_ms > 0).then(|| Duration::from_millis(r.max_clock_skew_ms)),
            prefix: r.key_prefix.clone(),
            shards: shards(r.shards, r.cluster),
            consumer_groups: r.consumer_groups.clone(),
            trim_keep: Duration::from_secs(r.trim_keep_seconds),
        },
        shards_configured: r.shards,
        max_rate_limit_windows: f.max_rate_limit_windows,
    }
}

/// Logical shards of the usage streams: as configured, else one on a
/// single Redis and 16 on a cluster (spread over its masters).
pub fn shards(configured: u32, cluster: bool) -> u32 {
    match (configured, cluster) {
        (0, false) => 1,
        (0, true) => 16,
        (n, _) => n,
    }
}

pub(super) fn journal_settings(p: &mut Problems, f: &JournalFile) -> JournalSettings {
    let sync = match f.sync.as_str() {
        "always" => SyncPolicy::Always,
        "interval" if (1..=60_000).contains(&f.sync_interval_ms) => {
            SyncPolicy::Interval(Duration::from_millis(f.sync_interval_ms))
        }
        "interval" => {
            p.push("journal.sync_interval_ms", "must be between 1 and 60000");
            SyncPolicy::Always
        }
        "none" => SyncPolicy::None,
        other => {
            p.push(
                "journal.sync",
                format!("expected always, interval or none, got {other:?}"),
            );
            SyncPolicy::Always
        }
    };
    let on_corrupt = match f.on_corrupt.as_str() {
        "stop" => OnCorrupt::Stop,
        "continue" => OnCorrupt::Continue,
        other => {
            p.push(
                "journal.on_corrupt",
                format!("expected stop or continue, got {other:?}"),
            );
            OnCorrupt::Stop
        }
    };
    if f.dir.as_os_str().is_empty() {
        p.push("journal.dir", "must not be empty");
    }
    if f.segment_bytes < 4096 {
        p.push("journal.segment_bytes", "must be at least 4096");
    }
    if f.max_bytes < f.segment_bytes.saturating_mul(2) {
        p.push("journal.max_bytes", "must be at least twice journal.segment_bytes");
    }
    JournalSettings {
        dir: f.dir.clone(),
        sync,
        segment_bytes: f.segment_bytes,
        max_bytes: f.max_bytes,
        on_corrupt,
        archive: f.archive,
    }
}

pub(super) fn plan(p: &mut Problems, name: &str, f: &PlanFile) -> Option<Plan> {
    let path = format!("plans.{name}");
    let id = p.check(path.clone(), PlanId::parse(name));
    let allowance = f.allowance.as_ref().and_then(|a| {
        let period = p.check(format!("{path}.allowance.period"), parse_period(&a.period));
        let anchor = p.check(
            format!("{path}.allowance.anchor"),
            parse_anchor(a.anchor.as_deref().unwrap_or("calendar")),
        );
        if a.tokens == 0 {
            p.push(format!("{path}.allowance.tokens"), "must be greater than zero");
        }
        Some(Allowance {
            tokens: a.tokens,
            period: period?,
            anchor: anchor?,
            rollover_cap: a.rollover_cap,
        })
    });
    let draw_order = match &f.draw_order {
        None => SourceClass::DEFAULT_ORDER.to_vec(),
        Some(names) => {
            let order: Vec<_> = names
                .iter()
                .filter_map(|n| p.check(format!("{path}.draw_order"), parse_source(n)))
                .collect();
            p.check(format!("{path}.draw_order"), check_draw_order(&order));
            order
        }
    };
    let allowed_models = f.allowed_models.as_ref().map(|names| {
        names
            .iter()
            .filter_map(|n| p.check(format!("{path}.allowed_models"), ModelId::parse(n)))
            .collect::<Set<_>>()
    });
    for (scope, set) in [
        ("account", &f.limits.account),
        ("api_key", &f.limits.api_key),
        ("per_model", &f.limits.per_model),
    ] {
        p.check(format!("{path}.limits.{scope}"), set.check());
    }
    for (field, problem) in f.alerts.problems(&format!("{path}.alerts")) {
        p.push(field, problem);
    }
    for (model, set) in &f.limits.models {
        p.check(format!("{path}.limits.models.{model}"), set.check());
    }
    let allowance_path = format!("{path}.outage_allowance");
    let on_store_outage = match (f.on_store_outage.as_deref().unwrap_or("closed"), &f.outage_allowance) {
        ("closed", None) => OutagePolicy::Closed,
        ("open", None) => OutagePolicy::Open,
        ("allowance", Some(amount)) => match amount.parse::<Money>() {
            Ok(m) if m.is_positive() => OutagePolicy::Allowance(m),
            Ok(_) => {
                p.push(allowance_path, "must be greater than zero");
                OutagePolicy::Closed
            }
            Err(e) => {
                p.push(allowance_path, e);
                OutagePolicy::Closed
            }
        },
        ("allowance", None) => {
            p.push(allowance_path, "required when on_store_outage is \"allowance\"");
            OutagePolicy::Closed
        }
        ("closed" | "open", Some(_)) => {
            p.push(allowance_path, "only with on_store_outage = \"allowance\"");
            OutagePolicy::Closed
        }
        (other, _) => {
            p.push(
                format!("{path}.on_store_outage"),
                format!("expected closed, open or allowance, got {other:?}"),
            );
            OutagePolicy::Closed
        }
    };
    Some(Plan {
        id: id?,
        allowance,
        draw_order,
        allowed_models,
        limits: f.limits.clone(),
        on_store_outage,
        alerts: f.alerts.clone(),
    })
}

pub(super) fn account(p: &mut Problems, i: usize, f: &AccountFile, plans: &Map<PlanId, Plan>) -> Option<SeedAccount> {
    let path = format!("accounts[{i}]");
    let id = p.check(format!("{path}.id"), AccountId::parse(&f.id));
    let plan = p.check(format!("{path}.plan"), PlanId::parse(&f.plan));
    if let Some(plan) = &plan
        && !plans.contains_key(plan)
    {
        p.push(format!("{path}.plan"), format!("no plan named {plan}"));
    }
    let time_zone = p.check(
        format!("{path}.time_zone"),
        parse_time_zone(f.time_zone.as_deref().unwrap_or("UTC")),
    );
    let anchor = match &f.anchor {
        None => Some(None),
        Some(a) => p.check(format!("{path}.anchor"), parse_anchor(a).map(Some)),
    };
    let mut amount = |field: &str, v: &Option<String>| {
        v.as_deref().map_or(Some(Money::ZERO), |s| {
            p.check(format!("{path}.{field}"), parse_amount(s))
        })
    };
    let credit_limit = amount("credit_limit", &f.credit_limit);
    let paid = amount("paid", &f.paid);
    let promo = amount("promo", &f.promo);
    let mut packs = Vec::new();
    for (j, pk) in f.packs.iter().enumerate() {
        let ppath = format!("{path}.packs[{j}]");
        let pack_id = p.check(format!("{ppath}.id"), LotId::parse(&pk.id));
        let expires_at = p.check(format!("{ppath}.expires_at"), pk.expires_at.parse::<Timestamp>());
        if pk.tokens == 0 {
            p.push(format!("{ppath}.tokens"), "must be greater than zero");
        }
        let models: std::collections::BTreeSet<_> = pk
            .models
            .iter()
            .filter_map(|m| p.check(format!("{ppath}.models"), ModelId::parse(m)))
            .collect();
        if let (Some(pack_id), Some(expires_at)) = (pack_id, expires_at) {
            packs.push(PackGrant {
                pack_id,
                tokens: pk.tokens,
                expires_at,
                models: (!models.is_empty()).then_some(models),
                priority: pk.priority,
            });
        }
    }
    Some(SeedAccount {
        id: id?,
        plan: plan?,
        time_zone: time_zone?,
        anchor: anchor?,
        credit_limit: credit_limit?,
        paid: paid?,
        promo: promo?,
        packs,
        suspended: f.suspended,
    })
}

pub(super) fn address(p: &mut Problems, path: &str, value: Option<&str>, default: &str) -> SocketAddr {
    let text = value.unwrap_or(default);
    p.check(path, text.parse::<SocketAddr>().map_err(|e| format!("{text:?}: {e}")))
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)))
}
