//! One entry point for every account mutation, so a store can run any of
//! them atomically without knowing what they do.

use std::sync::Arc;

use jiff::Timestamp;
use jiff::tz::TimeZone;

use super::account::{Account, Hold, Lot, Traffic};
use super::alert::AlertSettings;
use super::budget::Budgets;
use super::catalog::Catalog;
use super::error::EngineError;
use super::ids::{LotId, PlanId, RequestId, ReservationId};
use super::limits::LimitOverrides;
use super::money::Money;
use super::period::{Anchor, Window};
use super::pricing::Usage;
use super::record::{AuditRecord, UsageRecord, digest_id};
use super::request::{
    Balance, ChargeOutcome, ChargeRequest, Extended, PackGrant, Pool, ReserveOutcome, ReserveRequest,
};
use super::role::Role;
use super::source::Take;

/// An operation on one account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Reserve for a request.
    Reserve(ReserveRequest),
    /// Grow a reservation's grant to a total.
    Extend {
        /// The reservation.
        reservation: ReservationId,
        /// New total of output tokens.
        max_output_tokens: u64,
    },
    /// Charge actual usage against a reservation.
    Settle {
        /// The reservation.
        reservation: ReservationId,
        /// Actual usage.
        usage: Usage,
    },
    /// Return a reservation's hold.
    Release(ReservationId),
    /// One-shot charge.
    Charge(ChargeRequest),
    /// Credit money.
    TopUp {
        /// Idempotency key (and promo lot id).
        operation_id: LotId,
        /// Which pool.
        pool: Pool,
        /// Amount, positive.
        amount: Money,
    },
    /// Signed correction of paid money.
    Adjust {
        /// Idempotency key.
        operation_id: LotId,
        /// Signed amount.
        amount: Money,
    },
    /// Grant a pack.
    GrantPack(PackGrant),
    /// Revoke a pack.
    RevokePack(LotId),
    /// Give back what a usage record charged, to the sources it was
    /// charged to.
    Refund {
        /// The request the record charged (one record per request id):
        /// refunded once.
        request_id: RequestId,
        /// The record's kind.
        kind: crate::engine::record::RecordKind,
        /// What to give back, per source and lot (at most what each was
        /// charged).
        charges: Vec<Take>,
        /// When the record was settled.
        settled_at: jiff::Timestamp,
        /// Whether a record of the request was committed within the
        /// idempotency window, as the store found (`None`: it could not
        /// tell).
        recorded: Option<bool>,
    },
    /// Move to a plan.
    AssignPlan {
        /// The plan.
        plan: PlanId,
        /// Period anchor override.
        anchor: Option<Anchor>,
    },
    /// Replace limit overrides.
    SetOverrides(LimitOverrides),
    /// Replace the budgets of API keys and projects.
    SetBudgets(Budgets),
    /// Replace the account's alert thresholds (`None`: its plan's).
    SetAlerts(Option<AlertSettings>),
    /// Suspend (true) or resume (false).
    SetSuspended(bool),
    /// Change settings.
    Update {
        /// New time zone.
        time_zone: Option<TimeZone>,
        /// New credit limit.
        credit_limit: Option<Money>,
    },
    /// Read the balance.
    Balance,
    /// Read the fingerprint of the change made under an adjustment id.
    Adjustment(String),
    /// Read everything.
    Snapshot,
}

impl Command {
    /// The operation's name, as in audit records.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Reserve(_) => "reserve",
            Command::Extend { .. } => "extend",
            Command::Settle { .. } => "settle",
            Command::Release(_) => "release",
            Command::Charge(_) => "charge",
            Command::TopUp { .. } => "top_up",
            Command::Adjust { .. } => "adjust_money",
            Command::GrantPack(_) => "grant_pack",
            Command::RevokePack(_) => "revoke_pack",
            Command::Refund { .. } => "refund",
            Command::AssignPlan { .. } => "assign_plan",
            Command::SetOverrides(_) => "set_limit_overrides",
            Command::SetBudgets(_) => "set_budgets",
            Command::SetAlerts(_) => "set_alerts",
            Command::SetSuspended(true) => "suspend",
            Command::SetSuspended(false) => "resume",
            Command::Update { .. } => "update_account",
            Command::Balance => "balance",
            Command::Adjustment(_) => "adjustment",
            Command::Snapshot => "snapshot",
        }
    }

    /// An operator's change (not a decision or a read-out).
    pub fn is_admin(&self) -> bool {
        !matches!(
            self,
            Command::Reserve(_)
                | Command::Extend { .. }
                | Command::Settle { .. }
                | Command::Release(_)
                | Command::Charge(_)
                | Command::Balance
                | Command::Adjustment(_)
                | Command::Snapshot
        )
    }
}

impl Command {
    /// The request whose record a refund names, when the store must find
    /// out whether that record was made: it was settled within the
    /// idempotency window (older records cannot be checked) and the store
    /// has not said yet.
    pub fn record_to_check(&self, window: jiff::SignedDuration, now: Timestamp) -> Option<&RequestId> {
        match self {
            Command::Refund {
                request_id,
                settled_at,
                recorded: None,
                ..
            } if now.checked_sub(window).is_ok_and(|horizon| *settled_at > horizon) => Some(request_id),
            _ => None,
        }
    }

    /// This command with what the store found for
    /// [`Command::record_to_check`].
    pub fn with_recorded(mut self, made: bool) -> Command {
        if let Command::Refund { recorded, .. } = &mut self {
            *recorded = Some(made);
        }
        self
    }

    /// What the operator asked for, as adjustment fingerprints hash it: a
    /// retry of the same change hashes the same, whatever the store found
    /// out about it (a refund's `recorded`).
    fn content(&self) -> String {
        match self {
            Command::Refund {
                request_id,
                kind,
                charges,
                settled_at,
                recorded: _,
            } => format!(
                "Refund {{ request_id: {request_id:?}, kind: {kind:?}, charges: {charges:?}, settled_at: {settled_at:?} }}"
            ),
            other => format!("{other:?}"),
        }
    }
}

/// Where the change made under adjustment id `id` is remembered.
fn adjustment_key(id: &str) -> String {
    format!("adjustment {id}")
}

/// A read-out of one account.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// Settings, allowance, paid and debt ledgers and recent usage; lots,
    /// reservations and idempotency maps are left out (see the other fields).
    pub account: Box<Account>,
    /// The current period, if subscribed.
    pub period: Option<Window>,
    /// Open holds.
    pub holds: Vec<(ReservationId, Hold)>,
    /// Balance summary.
    pub balance: Balance,
    /// Packs and promos with their ids.
    pub lots: Vec<(LotId, Lot, bool)>,
}

/// What a command answered.
#[derive(Debug, Clone)]
pub enum Reply {
    /// To [`Command::Reserve`].
    Reserve(ReserveOutcome),
    /// To [`Command::Extend`].
    Extend(Extended),
    /// To [`Command::Settle`].
    Settle(Arc<UsageRecord>),
    /// To [`Command::Release`].
    Release(Vec<Take>),
    /// To [`Command::Charge`].
    Charge(ChargeOutcome),
    /// To [`Command::Balance`].
    Balance(Balance),
    /// To [`Command::Snapshot`].
    Snapshot(Box<Snapshot>),
    /// To [`Command::Adjustment`]: the change's fingerprint, if one was
    /// made under that id.
    Adjustment(Option<String>),
    /// To the admin commands.
    Done,
}

/// A command's reply and the records it produced.
#[derive(Debug)]
pub struct Applied {
    /// The engine's answer.
    pub reply: Reply,
    /// Usage records to emit (lapsed holds charged in full, settles, charges).
    pub records: Vec<Arc<UsageRecord>>,
}

impl Account {
    /// Runs an operator's `command` under the adjustment id and with the
    /// audit record `audit` names. The first time, it applies and returns
    /// the record completed: when, and what changed (before and after, of
    /// the fields that changed). Again with the same change, it changes
    /// nothing and returns no record (the first one stands); with another
    /// change under the same id, it is refused.
    pub fn apply_audited(
        &mut self,
        catalog: &Catalog,
        command: Command,
        now: Timestamp,
        audit: &AuditRecord,
    ) -> Result<(Reply, Option<AuditRecord>), EngineError> {
        let key = adjustment_key(&audit.adjustment_id);
        // The change in full, hashed: the same content gives the same text.
        let fingerprint = digest_id([command.content().as_str()]);
        match self.operations.get(&key) {
            Some(first) if *first == fingerprint => return Ok((Reply::Done, None)),
            Some(_) => {
                return Err(EngineError::Conflict(format!(
                    "adjustment id {} was already used for a different change",
                    audit.adjustment_id
                )));
            }
            None => {}
        }
        // Time acts first (a period that ended, a lot that expired), so
        // the record shows only what the operator changed.
        self.advance(catalog, now)?;
        let before = self.audit_view(now);
        let refunded = match &command {
            Command::Refund { charges, .. } => charges.clone(),
            _ => Vec::new(),
        };
        let reply = self.apply(catalog, command, now)?;
        self.operations.insert(key, fingerprint);
        let after = self.audit_view(now);
        let mut record = audit.clone();
        record.at = now;
        record.refunded = refunded;
        for (field, was) in before {
            let is = after.get(&field).cloned().unwrap_or_default();
            if was != is {
                record.before.insert(field.clone(), was);
                record.after.insert(field, is);
            }
        }
        Ok((reply, Some(record)))
    }

    /// A new account opened by an operator: the adjustment is remembered
    /// (a retry finds it through [`Command::Adjustment`], with
    /// [`Account::opening`] as its fingerprint) and the audit record says
    /// what the account starts with.
    pub fn opened(mut self, audit: &AuditRecord, now: Timestamp) -> (Account, AuditRecord) {
        self.operations
            .insert(adjustment_key(&audit.adjustment_id), self.opening());
        let mut record = audit.clone();
        record.at = now;
        record.after = self.audit_view(now);
        (self, record)
    }

    /// The fingerprint of opening this account as it is.
    pub fn opening(&self) -> String {
        let content = format!(
            "open|{}|{:?}|{:?}|{}",
            self.plan,
            self.time_zone.iana_name(),
            self.anchor,
            self.credit_limit
        );
        digest_id([content.as_str()])
    }

    /// What an operator's change may touch, as audit records show it.
    fn audit_view(&self, now: Timestamp) -> serde_json::Map<String, serde_json::Value> {
        use serde_json::json;
        let b = self.balance(now);
        let lots = |lots: &std::collections::BTreeMap<LotId, Lot>, amount: fn(i128) -> serde_json::Value| {
            lots.iter()
                .map(|(id, lot)| {
                    let lot = json!({"available": amount(lot.ledger.available()), "closed": lot.closed});
                    (id.to_string(), lot)
                })
                .collect::<serde_json::Map<_, _>>()
        };
        let tokens = |n: i128| json!(n);
        let money = |picos: i128| json!(Money::from_picos(picos).to_string());
        let view = json!({
            "plan": self.plan.as_str(),
            "suspended": self.suspended,
            "time_zone": self.time_zone.iana_name().unwrap_or_default(),
            "credit_limit": b.credit_limit.to_string(),
            "paid": b.paid.to_string(),
            "promo": b.promo.to_string(),
            "debt": b.debt.to_string(),
            "allowance_tokens": b.allowance_tokens,
            "pack_tokens": b.pack_tokens,
            "packs": lots(&self.packs, tokens),
            "promos": lots(&self.promos, money),
            "limit_overrides": serde_json::to_value(self.overrides()).unwrap_or_default(),
            "budgets": serde_json::to_value(self.budgets.as_deref().cloned().unwrap_or_default()).unwrap_or_default(),
            "alerts": serde_json::to_value(self.alert_overrides.as_deref()).unwrap_or_default(),
        });
        match view {
            serde_json::Value::Object(map) => map,
            _ => serde_json::Map::new(),
        }
    }

    /// Runs `command` at `now`.
    pub fn apply(&mut self, catalog: &Catalog, command: Command, now: Timestamp) -> Result<Reply, EngineError> {
        Ok(match command {
            Command::Reserve(req) => Reply::Reserve(self.reserve(catalog, &req, now)?),
            Command::Extend {
                reservation,
                max_output_tokens,
            } => Reply::Extend(self.extend(catalog, &reservation, max_output_tokens, now)?),
            Command::Settle { reservation, usage } => Reply::Settle(self.settle(catalog, &reservation, usage, now)?),
            Command::Release(reservation) => Reply::Release(self.release(catalog, &reservation, now)?),
            Command::Charge(req) => Reply::Charge(self.charge(catalog, &req, now)?),
            Command::TopUp {
                operation_id,
                pool,
                amount,
            } => {
                self.top_up(catalog, &operation_id, pool, amount, now)?;
                Reply::Done
            }
            Command::Adjust { operation_id, amount } => {
                self.adjust(catalog, &operation_id, amount, now)?;
                Reply::Done
            }
            Command::GrantPack(grant) => {
                self.grant_pack(catalog, grant, now)?;
                Reply::Done
            }
            Command::RevokePack(id) => {
                self.revoke_pack(catalog, &id, now)?;
                Reply::Done
            }
            Command::Refund {
                request_id,
                kind,
                charges,
                settled_at,
                recorded,
            } => {
                self.refund(catalog, &request_id, kind, &charges, (settled_at, recorded), now)?;
                Reply::Done
            }
            Command::AssignPlan { plan, anchor } => {
                self.assign_plan(catalog, &plan, anchor, now)?;
                Reply::Done
            }
            Command::SetOverrides(overrides) => {
                self.advance(catalog, now)?;
                self.set_overrides(overrides);
                Reply::Done
            }
            Command::SetBudgets(budgets) => {
                budgets.check().map_err(|m| EngineError::invalid("budgets", m))?;
                self.advance(catalog, now)?;
                self.budgets = (!budgets.is_empty()).then(|| Box::new(budgets));
                Reply::Done
            }
            Command::SetAlerts(settings) => {
                if let Some(s) = &settings {
                    super::alert::check(s)?;
                }
                self.advance(catalog, now)?;
                self.alert_overrides = settings.map(Box::new);
                Reply::Done
            }
            Command::SetSuspended(suspended) => {
                self.advance(catalog, now)?;
                self.suspended = suspended;
                Reply::Done
            }
            Command::Update {
                time_zone,
                credit_limit,
            } => {
                self.advance(catalog, now)?;
                if let Some(limit) = credit_limit {
                    self.set_credit_limit(limit)?;
                }
                if let Some(tz) = time_zone {
                    self.time_zone = tz.clone();
                    if let Some(sub) = &mut self.subscription {
                        sub.schedule.time_zone = tz;
                    }
                }
                Reply::Done
            }
            Command::Adjustment(id) => Reply::Adjustment(self.operations.get(&adjustment_key(&id)).cloned()),
            Command::Balance => {
                self.advance(catalog, now)?;
                Reply::Balance(self.balance(now))
            }
            Command::Snapshot => {
                self.advance(catalog, now)?;
                Reply::Snapshot(Box::new(self.snapshot(now)))
            }
        })
    }

    fn snapshot(&self, now: Timestamp) -> Snapshot {
        let holds = self.open_holds();
        let lots = self
            .packs
            .iter()
            .map(|(id, lot)| (id.clone(), lot.clone(), true))
            .chain(self.promos.iter().map(|(id, lot)| (id.clone(), lot.clone(), false)))
            .collect();
        Snapshot {
            account: Box::new(self.clone_shallow()),
            period: self.subscription.as_ref().map(|s| s.window),
            holds,
            balance: self.balance(now),
            lots,
        }
    }

    /// Open holds with their reservation ids, by id.
    pub fn open_holds(&self) -> Vec<(ReservationId, Hold)> {
        let mut holds: Vec<_> = self
            .traffic()
            .reservations
            .iter()
            .filter_map(|(id, r)| match r {
                super::account::Reservation::Open(h) => Some((id.clone(), h.clone())),
                _ => None,
            })
            .collect();
        holds.sort_by(|a, b| a.0.cmp(&b.0));
        holds
    }

    /// A copy without the bulky maps.
    fn clone_shallow(&self) -> Account {
        let recent = &self.traffic().recent;
        Account {
            id: self.id.clone(),
            plan: self.plan.clone(),
            time_zone: self.time_zone.clone(),
            anchor: self.anchor,
            suspended: self.suspended,
            credit_limit: self.credit_limit,
            subscription: self.subscription.clone(),
            allowance: self.allowance,
            periods_started: self.periods_started,
            packs: Default::default(),
            promos: Default::default(),
            paid: self.paid,
            debt: self.debt,
            traffic: (!recent.is_empty()).then(|| {
                Box::new(Traffic {
                    recent: recent.clone(),
                    ..Traffic::default()
                })
            }),
            operations: Default::default(),
            buckets: Default::default(),
            overrides: self.overrides.clone(),
            budgets: self.budgets.clone(),
            burn: self.burn.clone(),
            alert_overrides: self.alert_overrides.clone(),
            alerts_fired: self.alerts_fired.clone(),
            alerts_made: self.alerts_made,
            role: Role::Standalone,
        }
    }
}
