//! What accounts are measured against: plans, the price book and the hold
//! policy. Read-mostly; the store swaps in a new catalog when an operator
//! publishes prices.

use std::collections::HashSet;

use jiff::{SignedDuration, Timestamp};

use super::hash::{Map, Set};
use super::ids::{ModelId, PlanId};
use super::limits::ScopedLimits;
use super::money::{MAX_OPERATION, Money};
use super::period::{Anchor, PeriodUnit};
use super::pricing::{PriceBook, PriceVersion};

/// A class of source in a plan's draw-down order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceClass {
    /// The subscription allowance.
    Allowance,
    /// Token packs.
    Packs,
    /// Promotional money.
    Promo,
    /// Paid money down to zero.
    Paid,
    /// Paid money below zero, down to minus the credit limit.
    Credit,
}

impl SourceClass {
    /// Allowance, packs, promo, paid, credit (DESIGN.md).
    pub const DEFAULT_ORDER: [SourceClass; 5] = [
        SourceClass::Allowance,
        SourceClass::Packs,
        SourceClass::Promo,
        SourceClass::Paid,
        SourceClass::Credit,
    ];

    /// Token-denominated (allowance, packs) rather than money.
    pub fn is_tokens(self) -> bool {
        matches!(self, SourceClass::Allowance | SourceClass::Packs)
    }
}

/// Checks a draw-down order: no repeats, token sources before money
/// sources (a token source cannot take a fraction of what money already
/// priced), credit only after paid.
pub fn check_draw_order(order: &[SourceClass]) -> Result<(), String> {
    let mut seen = HashSet::new();
    for (i, class) in order.iter().enumerate() {
        if !seen.insert(class) {
            return Err(format!("{class:?} appears twice"));
        }
        if class.is_tokens() && order[..i].iter().any(|c| !c.is_tokens()) {
            return Err("token sources (allowance, packs) must come before money sources".into());
        }
    }
    let pos = |c| order.iter().position(|x| *x == c);
    if let (Some(credit), paid) = (pos(SourceClass::Credit), pos(SourceClass::Paid))
        && paid.is_none_or(|p| p > credit)
    {
        return Err("credit must come after paid".into());
    }
    Ok(())
}

/// The allowance a plan includes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allowance {
    /// Tokens granted each period.
    pub tokens: u64,
    /// Period length.
    pub period: PeriodUnit,
    /// Default anchor for accounts on the plan.
    pub anchor: Anchor,
    /// Most unused tokens carried into the next period (0: none).
    pub rollover_cap: u64,
}

/// A plan: allowance, draw-down order, allowed models and rate limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The plan's name.
    pub id: PlanId,
    /// Included tokens, if any.
    pub allowance: Option<Allowance>,
    /// Draw-down order (validated by [`check_draw_order`]).
    pub draw_order: Vec<SourceClass>,
    /// Models the plan may use; `None` for every priced model.
    pub allowed_models: Option<Set<ModelId>>,
    /// Rate limits.
    pub limits: ScopedLimits,
    /// What a sidecar decides when its lease cannot cover a request and the
    /// shared store cannot be reached.
    pub on_store_outage: OutagePolicy,
    /// When its accounts alert (an account's own settings replace these).
    pub alerts: AlertSettings,
}

/// A plan's failure policy while the shared store is unreachable (as in
/// telecom online charging: terminate or continue).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum OutagePolicy {
    /// Refuse (UNAVAILABLE): the default, for money.
    #[default]
    Closed,
    /// Admit; what is used is recorded as debt.
    Open,
    /// Admit until this much debt per sidecar and account, then refuse.
    Allowance(Money),
}

impl OutagePolicy {
    /// Whether it admits anything while the store is unreachable.
    pub fn admits(self) -> bool {
        self != OutagePolicy::Closed
    }
}

/// What happens to a hold nobody settled or released before its TTL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExpiryPolicy {
    /// Return the hold; charge nothing.
    Release,
    /// Charge the whole hold, as if the grant was used in full.
    ChargeInFull,
}

/// Everything an account's operations are measured against.
#[derive(Debug, Clone)]
pub struct Catalog {
    /// Plans by name.
    pub plans: Map<PlanId, Plan>,
    /// The price book.
    pub prices: PriceBook,
    /// How long a hold lives without extend, settle or release.
    pub hold_ttl: SignedDuration,
    /// What an expired hold becomes.
    pub on_expiry: ExpiryPolicy,
    /// How long settled requests are remembered for idempotent replays.
    pub idempotency_window: SignedDuration,
    /// Usage records kept per account for read-outs.
    pub recent_usage: usize,
    /// Request ids one account may have remembered in one process at
    /// once (each for the idempotency window); new requests beyond are
    /// refused until older ids age out.
    pub max_request_ids: usize,
}

impl Catalog {
    /// This catalog with the configuration `next` read at `now` (a reload):
    /// plans, limits and hold policy as `next` has them; every price
    /// version this catalog has stays (versions are history), versions new
    /// in `next` are published (not retroactively). Refused, with every
    /// problem, if `next` drops a plan (accounts may be on it) or changes
    /// a version that exists (a version is never edited, only superseded).
    pub fn reloaded(&self, next: Catalog, now: Timestamp) -> Result<Catalog, Vec<String>> {
        let mut problems = Vec::new();
        let mut dropped: Vec<&PlanId> = self.plans.keys().filter(|id| !next.plans.contains_key(*id)).collect();
        dropped.sort();
        for id in dropped {
            problems.push(format!(
                "plans.{id}: removed; accounts may be on it, so a reload keeps every plan (restart to remove one)"
            ));
        }
        let mut prices = self.prices.clone();
        for version in next.prices.versions() {
            match self.prices.get(&version.id) {
                Some(existing) if existing == version => {}
                Some(_) => problems.push(format!(
                    "prices: version {} differs from the one in the price book; a version is never edited, \
                     only superseded by a new one",
                    version.id
                )),
                None => {
                    if let Err(e) = prices.publish(PriceVersion::clone(version), now) {
                        problems.push(format!("prices: {e}"));
                    }
                }
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(Catalog { prices, ..next })
    }
}

/// Thresholds, at most this many of each kind.
pub const MAX_THRESHOLDS: usize = 16;

/// The longest warning before a pack's expiry, in days.
pub const MAX_EXPIRING_DAYS: u32 = 3_650;

/// How many different values `list` holds.
fn distinct<T: Ord>(list: &[T]) -> usize {
    list.iter().collect::<std::collections::BTreeSet<_>>().len()
}

/// When an account alerts.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertSettings {
    /// The money left (paid and promotional money, what holds and leases
    /// hold included, less debt) goes below each of these.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub balance_below: Vec<Money>,
    /// Percentages of the period's allowance used.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub allowance_used: Vec<u8>,
    /// Percentages of a pack used.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub pack_used: Vec<u8>,
    /// Percentages of a budget counted (money and tokens each).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub budget_used: Vec<u8>,
    /// A pack with tokens left expires within this many days (0: never).
    #[serde(skip_serializing_if = "super::is_default")]
    pub pack_expiring_days: u32,
    /// Debt begins.
    #[serde(skip_serializing_if = "super::is_default")]
    pub debt_started: bool,
}

impl AlertSettings {
    /// Nothing to alert on.
    pub fn is_empty(&self) -> bool {
        *self == AlertSettings::default()
    }

    /// Every problem, each naming its field under `path`.
    pub fn problems(&self, path: &str) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let mut lists = [
            ("allowance_used", &self.allowance_used),
            ("pack_used", &self.pack_used),
            ("budget_used", &self.budget_used),
        ]
        .into_iter()
        .map(|(name, list)| {
            let bad = list.iter().any(|p| !(1..=100).contains(p));
            (name, list.len(), bad, distinct(list) < list.len())
        })
        .collect::<Vec<_>>();
        let twice = distinct(&self.balance_below) < self.balance_below.len();
        lists.push(("balance_below", self.balance_below.len(), false, twice));
        for (name, len, bad, twice) in lists {
            if twice {
                out.push((format!("{path}.{name}"), "a threshold is listed twice".to_owned()));
            }
            if len > MAX_THRESHOLDS {
                out.push((
                    format!("{path}.{name}"),
                    format!("{len} thresholds, more than {MAX_THRESHOLDS}"),
                ));
            }
            if bad {
                out.push((format!("{path}.{name}"), "percentages are 1 to 100".to_owned()));
            }
        }
        if self
            .balance_below
            .iter()
            .any(|m| !m.is_positive() || *m > MAX_OPERATION)
        {
            out.push((
                format!("{path}.balance_below"),
                format!("amounts are above 0 and at most {MAX_OPERATION}"),
            ));
        }
        if self.pack_expiring_days > MAX_EXPIRING_DAYS {
            out.push((
                format!("{path}.pack_expiring_days"),
                format!("at most {MAX_EXPIRING_DAYS}"),
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use SourceClass::*;

    #[test]
    fn draw_order_rules() {
        assert!(check_draw_order(&SourceClass::DEFAULT_ORDER).is_ok());
        assert!(check_draw_order(&[Packs, Allowance, Paid, Promo]).is_ok());
        assert!(check_draw_order(&[Paid, Packs]).is_err());
        assert!(check_draw_order(&[Credit, Paid]).is_err());
        assert!(check_draw_order(&[Credit]).is_err());
        assert!(check_draw_order(&[Paid, Paid]).is_err());
    }
}
