//! The one catalog the engine's unit tests, the property tests, the
//! simulation and the benches share, and its building blocks. The service
//! never uses it: its catalog comes from the configuration.
//!
//! Models `m` (weight 1) and `w` (weight 1.5), priced in version `v1`
//! from 2026-01-01: per token, input 1,000 pico-units, cached input 500,
//! cache write 1,000, output 4,000. Plans:
//!
//! - `payg`: money only (promotional, paid, credit), no limits;
//! - `pro`: 1,000 tokens a calendar month (up to 300 roll over), then money;
//! - `daily`: 5,000 tokens a day from the account's start (up to 1,000 roll
//!   over), then money;
//! - `cash`: promotional money, then paid, nothing else;
//! - `limited`: money, one request a minute;
//! - `only-m`: money, model `m` only.
//!
//! Holds last 60 s and are released when they lapse; request ids are
//! remembered for 24 hours. A test that needs another figure changes the
//! one field on its copy.

use jiff::{SignedDuration, Timestamp};

use super::catalog::{Allowance, Catalog, ExpiryPolicy, Plan, SourceClass};
use super::hash::{Map, Set};
use super::ids::{ModelId, PlanId, TierId, VersionId};
use super::limits::{LimitSet, ScopedLimits};
use super::money::Money;
use super::period::{Anchor, PeriodUnit};
use super::pricing::{ModelPrices, PriceBook, PriceVersion, TierPrices, TokenPrices};

/// Prices per token, in pico-units.
pub fn prices(input: i128, cached_input: i128, cache_write: i128, output: i128) -> TokenPrices {
    TokenPrices {
        input: Money::from_picos(input),
        cached_input: Money::from_picos(cached_input),
        cache_write: Money::from_picos(cache_write),
        output: Money::from_picos(output),
    }
}

/// Version `id` in force from `effective_at`: models `m` and `w` at
/// `input` and `output` pico-units per token (cached input at half of
/// `input`, cache writes at `input`).
pub fn version(id: &str, effective_at: Timestamp, input: i128, output: i128) -> PriceVersion {
    let model = |weight_milli| ModelPrices {
        weight_milli,
        tiers: Map::from_iter([(
            TierId::default_tier(),
            TierPrices {
                base: prices(input, input / 2, input, output),
                context_tiers: vec![],
            },
        )]),
    };
    PriceVersion {
        id: VersionId::parse(id).expect("a fixture id"),
        effective_at,
        models: Map::from_iter([(model_id("m"), model(1_000)), (model_id("w"), model(1_500))]),
        windows: vec![],
    }
}

/// Plan `id`: drawing in `order`, with `allowance` and `limits`.
pub fn plan(id: &str, allowance: Option<Allowance>, order: &[SourceClass], limits: ScopedLimits) -> Plan {
    Plan {
        alerts: Default::default(),
        id: PlanId::parse(id).expect("a fixture id"),
        allowance,
        draw_order: order.to_vec(),
        allowed_models: None,
        limits,
        on_store_outage: Default::default(),
    }
}

/// The catalog.
pub fn catalog() -> Catalog {
    let order = &SourceClass::DEFAULT_ORDER;
    let monthly = Allowance {
        tokens: 1_000,
        period: PeriodUnit::Month,
        anchor: Anchor::Calendar,
        rollover_cap: 300,
    };
    let daily = Allowance {
        tokens: 5_000,
        period: PeriodUnit::Day,
        anchor: Anchor::Anniversary,
        rollover_cap: 1_000,
    };
    let one_a_minute = ScopedLimits {
        account: LimitSet {
            requests_per_minute: 1,
            ..LimitSet::default()
        },
        ..ScopedLimits::default()
    };
    let mut only_m = plan("only-m", None, order, ScopedLimits::default());
    only_m.allowed_models = Some(Set::from_iter([model_id("m")]));
    let plans = [
        plan("payg", None, order, ScopedLimits::default()),
        plan("pro", Some(monthly), order, ScopedLimits::default()),
        plan("daily", Some(daily), order, ScopedLimits::default()),
        plan(
            "cash",
            None,
            &[SourceClass::Promo, SourceClass::Paid],
            ScopedLimits::default(),
        ),
        plan("limited", None, order, one_a_minute),
        only_m,
    ];
    let from = "2026-01-01T00:00:00Z".parse().expect("a fixture instant");
    Catalog {
        plans: plans.into_iter().map(|p| (p.id.clone(), p)).collect(),
        prices: PriceBook::new(vec![version("v1", from, 1_000, 4_000)]).expect("a valid price book"),
        hold_ttl: SignedDuration::from_secs(60),
        on_expiry: ExpiryPolicy::Release,
        idempotency_window: SignedDuration::from_hours(24),
        recent_usage: 10,
        max_request_ids: 1_000_000,
    }
}

/// The catalog the random runs (the property tests, the simulation) were
/// tuned and their saved seeds found on: prices of 100 and 400 pico-units
/// per token, holds of `hold_ttl`, request ids kept an hour, the five
/// latest records kept, lapsed holds charged in full or released.
pub fn random_runs(hold_ttl: SignedDuration, charge_in_full: bool) -> Catalog {
    let from = "2026-01-01T00:00:00Z".parse().expect("a fixture instant");
    Catalog {
        prices: PriceBook::new(vec![version("v1", from, 100, 400)]).expect("a valid price book"),
        hold_ttl,
        on_expiry: if charge_in_full {
            ExpiryPolicy::ChargeInFull
        } else {
            ExpiryPolicy::Release
        },
        idempotency_window: SignedDuration::from_hours(1),
        recent_usage: 5,
        ..catalog()
    }
}

fn model_id(id: &str) -> ModelId {
    ModelId::parse(id).expect("a fixture id")
}
