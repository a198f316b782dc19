//! Alerts: an account crossing a threshold (money left below an amount, a
//! share of an allowance, a pack or a budget used, a pack about to expire,
//! debt begun) makes one `kind: "alert"` record.
//!
//! The thresholds come from the plan (`[plans.X.alerts]`), or from the
//! account's own settings (`Admin.SetAlerts`), which replace the plan's.
//! What holds now is a set of keys, one per threshold crossed (a period's
//! or a slot's number is in the key, so a new period has new keys). The
//! account keeps the keys it has alerted on: a key crossed and not kept
//! makes an alert, and keeping exactly the keys crossed re-arms a threshold
//! as soon as it no longer holds (a top-up lifts the money left above it,
//! a debt is repaid). Each crossing alerts once: the memory store
//! evaluates after every change of the account; the Redis store in the
//! guarded commit that writes the shared account, so one commit, on one
//! sidecar, makes it (a mirror never evaluates: its figures are slices).

use std::collections::BTreeSet;

use jiff::{SignedDuration, Timestamp};

use super::account::Account;
use super::catalog::Catalog;
use super::error::EngineError;
use super::ids::AccountId;
use super::money::Money;
use super::record::digest_id;

pub use super::catalog::{AlertSettings, MAX_EXPIRING_DAYS, MAX_THRESHOLDS};

/// Checks `settings`, as an operator's change.
pub fn check(settings: &AlertSettings) -> Result<(), EngineError> {
    match settings.problems("alerts").into_iter().next() {
        Some((field, message)) => Err(EngineError::invalid("alerts", format!("{field}: {message}"))),
        None => Ok(()),
    }
}

/// One threshold crossed: the record that says so.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AlertRecord {
    /// Always `"alert"`.
    pub kind: String,
    /// The account.
    pub account_id: AccountId,
    /// `balance_below`, `allowance_used`, `pack_used`, `budget_used`,
    /// `pack_expiring` or `debt_started`.
    pub alert: String,
    /// What crossed it, when there are several: the pack, the budget's
    /// slot (`KEY#2026-12`, `PROJECT#2026-12-07`) and unit (`money` or
    /// `tokens`), the allowance period (`period:N`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub subject: String,
    /// The threshold: an amount, a percentage, a number of days.
    pub threshold: String,
    /// The figure now: the money left, the percentage used, the pack's
    /// expiry, the debt.
    pub value: String,
    /// When.
    pub at: Timestamp,
    /// The crossing, as the account keeps it until re-armed.
    pub key: String,
    /// The account's alerts so far, this one included: its number.
    pub seq: u64,
}

impl AlertRecord {
    /// Its id: the account and its number (a threshold re-armed and
    /// crossed again alerts again, under another id).
    pub fn id(&self) -> String {
        digest_id([self.account_id.as_str(), "alert", self.seq.to_string().as_str()])
    }
}

/// `part` of `whole` in whole percent, rounded down.
fn percent(part: i128, whole: i128) -> i128 {
    if whole <= 0 {
        0
    } else {
        part.max(0).saturating_mul(100) / whole
    }
}

impl Account {
    /// The settings that apply: the account's own, else its plan's.
    pub fn alert_settings<'c>(&'c self, catalog: &'c Catalog) -> Option<&'c AlertSettings> {
        self.alert_overrides
            .as_deref()
            .or_else(|| catalog.plans.get(&self.plan).map(|p| &p.alerts))
            .filter(|s| !s.is_empty())
    }

    /// The alerts due at `now`: each threshold crossed that has not alerted
    /// since it was last armed. Keeps the thresholds crossed (re-arming
    /// the others). A mirror has none.
    pub fn alerts_due(&mut self, catalog: &Catalog, now: Timestamp) -> Vec<AlertRecord> {
        if self.is_mirror() {
            return Vec::new();
        }
        let crossed = match self.alert_settings(catalog) {
            Some(settings) => self.crossed(settings, now),
            None => Vec::new(),
        };
        if crossed.is_empty() && self.alerts_fired.is_empty() {
            return Vec::new();
        }
        let mut due: Vec<AlertRecord> = crossed
            .iter()
            .filter(|a| !self.alerts_fired.contains(&a.key))
            .cloned()
            .collect();
        for alert in &mut due {
            self.alerts_made += 1;
            alert.seq = self.alerts_made;
        }
        self.alerts_fired = crossed.into_iter().map(|a| a.key).collect::<BTreeSet<_>>();
        due
    }

    /// Every threshold of `settings` that holds at `now`.
    fn crossed(&self, settings: &AlertSettings, now: Timestamp) -> Vec<AlertRecord> {
        let mut out = Vec::new();
        let mut alert = |alert: &str, subject: String, threshold: String, value: String| {
            let key = if subject.is_empty() {
                format!("{alert}:{threshold}")
            } else {
                format!("{alert}:{subject}:{threshold}")
            };
            out.push(AlertRecord {
                kind: "alert".into(),
                account_id: self.id.clone(),
                alert: alert.into(),
                subject,
                threshold,
                value,
                at: now,
                key,
                seq: 0,
            });
        };
        let open = |lot: &&super::account::Lot| !lot.closed && lot.expires_at.is_none_or(|t| now < t);
        let debt = (-self.debt.available()).max(0);
        let left = self.paid.available()
            + self.paid.held()
            + self
                .promos
                .values()
                .filter(open)
                .map(|l| l.ledger.available() + l.ledger.held())
                .sum::<i128>()
            - debt;
        for amount in &settings.balance_below {
            if left < amount.picos() {
                alert(
                    "balance_below",
                    String::new(),
                    amount.to_string(),
                    Money::from_picos(left).to_string(),
                );
            }
        }
        if let (Some(sub), Some(period)) = (&self.subscription, self.current_period()) {
            let tokens = i128::from(sub.tokens);
            let used = tokens - (self.allowance.available() + self.allowance.held());
            for p in &settings.allowance_used {
                if tokens > 0 && percent(used, tokens) >= i128::from(*p) {
                    let value = percent(used, tokens).to_string();
                    alert("allowance_used", format!("period:{period}"), p.to_string(), value);
                }
            }
        }
        for (id, lot) in self.packs.iter().filter(|(_, l)| open(l)) {
            let used = percent(lot.ledger.charged(), lot.ledger.granted());
            for p in &settings.pack_used {
                if used >= i128::from(*p) {
                    alert("pack_used", id.to_string(), p.to_string(), used.to_string());
                }
            }
            let left = lot.ledger.available() + lot.ledger.held();
            let days = SignedDuration::from_hours(24 * i64::from(settings.pack_expiring_days));
            if let Some(expires) = lot.expires_at
                && settings.pack_expiring_days > 0
                && left > 0
                && now.checked_add(days).is_ok_and(|soon| expires <= soon)
            {
                let threshold = settings.pack_expiring_days.to_string();
                alert("pack_expiring", id.to_string(), threshold, expires.to_string());
            }
        }
        if !settings.budget_used.is_empty()
            && let Some(budgets) = self.budgets.as_deref()
        {
            for a in budgets.all(&self.time_zone, now).unwrap_or_default() {
                // What was spent (records), not what holds and slices
                // count: that comes and goes with every request.
                let spent = self.buckets.counted(&a, &self.time_zone).spent;
                let caps = [
                    ("money", a.budget.money.map(Money::picos), spent.money),
                    ("tokens", a.budget.tokens.map(i128::from), spent.tokens),
                ];
                // A month's or a day's slot is in the subject, so the next
                // one is armed afresh; a rolling window's is not: it re-arms
                // when old days dropping out take it below the threshold.
                let whose = match a.budget.period {
                    super::budget::BudgetPeriod::Rolling30Days => a.id.to_string(),
                    _ => a.bucket.id.to_string(),
                };
                for (unit, cap, spent) in caps {
                    let Some(cap) = cap else { continue };
                    let used = percent(spent, cap);
                    for p in &settings.budget_used {
                        if used >= i128::from(*p) {
                            let subject = format!("{whose}:{unit}");
                            alert("budget_used", subject, p.to_string(), used.to_string());
                        }
                    }
                }
            }
        }
        if settings.debt_started && debt > 0 {
            alert(
                "debt_started",
                String::new(),
                "0".into(),
                Money::from_picos(debt).to_string(),
            );
        }
        out
    }
}
