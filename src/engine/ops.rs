//! The operations on one account: the request lifecycle (reserve, extend,
//! settle, release, charge) and the operator's adjustments.
//!
//! Each operation first brings the account up to `now` (lapsed holds,
//! expired lots, period resets), then validates and plans without touching
//! state, and only then commits. A refused operation therefore changes
//! nothing but what the passage of time changes anyway (invariant 5).
//!
//! Why one file: every operation follows the same plan-then-commit shape
//! over the same helpers (advance, draw, hold, record); the file is the
//! list of them.

use std::sync::Arc;

use jiff::{SignedDuration, Timestamp};

use super::account::{
    ANSWERS_KEPT, Account, Hold, Ledger, Lot, MAX_ANSWERS, MAX_OPEN_HOLDS, Remembered, Reservation, check_credit_limit,
};
use super::budget::{Applying, Counting, Room};
use super::burn::runs_out;
use super::catalog::{Catalog, Plan, SourceClass};
use super::draw::{self, Need};
use super::error::EngineError;
use super::ids::{ApiKeyId, LotId, ModelId, PlanId, RequestId, ReservationId, TierId};
use super::limits::{Applicable, BucketKey, LimitOverrides, Scope};
use super::money::Money;
use super::period::Anchor;
use super::pricing::{Rates, Unpriced, Usage};
use super::record::{RecordKind, UsageRecord};
use super::request::{
    Balance, BudgetUse, ChargeOutcome, ChargeRequest, ChargeWhat, Denial, Extended, PackGrant, Pool, ReserveOutcome,
    ReserveRequest, Reserved,
};
use super::role::{Least, Needed};
use super::source::{SourceRef, Take, money_total};

/// The id of the account-wide bucket (the scope says it all).
static ACCOUNT_BUCKET: std::sync::LazyLock<Arc<str>> = std::sync::LazyLock::new(|| Arc::from(""));

fn unpriced_message(why: Unpriced, model: &ModelId, tier: &TierId) -> String {
    match why {
        Unpriced::NoVersion => "no price version is in force".to_owned(),
        Unpriced::Model => format!("model {model} has no price in the version in force"),
        Unpriced::Tier => format!("model {model} has no price for service tier {tier}"),
    }
}

fn to_u64(v: i128) -> u64 {
    u64::try_from(v.max(0)).unwrap_or(u64::MAX)
}

impl Account {
    pub(crate) fn plan_of<'c>(&self, catalog: &'c Catalog) -> Result<&'c Plan, EngineError> {
        catalog
            .plans
            .get(&self.plan)
            .ok_or_else(|| EngineError::Precondition(format!("plan {} is no longer configured", self.plan)))
    }

    fn applicable(&self, plan: &Plan, api_key: Option<&ApiKeyId>, model: &ModelId) -> Applicable {
        let [account, per_key, per_model] = self.overrides().resolve(&plan.limits, model);
        // A scope without limits needs no bucket: nothing to count, look up
        // or store (and with no limits at all, nothing is allocated). A
        // concurrency limit set later counts the requests admitted from
        // then on, not those already in flight.
        let scopes = [
            Some((Scope::Account, ACCOUNT_BUCKET.clone(), account)),
            api_key.map(|k| (Scope::ApiKey, k.shared(), per_key)),
            Some((Scope::Model, model.shared(), per_model)),
        ];
        scopes
            .into_iter()
            .flatten()
            .filter(|(_, _, set)| !set.is_unlimited())
            .map(|(scope, id, set)| (BucketKey { scope, id }, set))
            .collect()
    }

    /// Funds the largest output grant in `min_output..=max_output`, or
    /// `None` if not even `min_output` fits.
    /// Within `room`: the tokens of prompt and grant, and the money the
    /// takes hold, fit every budget that applies.
    #[allow(clippy::too_many_arguments)]
    fn fund(
        &self,
        order: &[SourceClass],
        prompt: Usage,
        min_output: u64,
        max_output: u64,
        rates: Rates,
        model: &ModelId,
        bonus: &[Take],
        room: Room,
        now: Timestamp,
    ) -> Option<(u64, Vec<Take>)> {
        let need = |o| Need::Tokens {
            usage: Usage {
                output_tokens: o,
                ..prompt
            },
            rates,
            model,
        };
        let caps = self.capacities(order, &need(max_output), bonus, now);
        let attempt = |o| {
            draw::plan(&caps, &need(o), false).ok().filter(|takes| {
                room == Room::default() || room.fits(prompt.total_tokens() + o, money_total(takes).picos())
            })
        };
        if let Some(takes) = attempt(max_output) {
            return Some((max_output, takes));
        }
        // Coverage grows with the grant, so bisect: `lo` fits, `hi` does not.
        let (mut lo, mut hi) = (min_output, max_output);
        let mut best = attempt(lo)?;
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            match attempt(mid) {
                Some(takes) => (lo, best) = (mid, takes),
                None => hi = mid,
            }
        }
        Some((lo, best))
    }

    /// The budgets a request by `key` counts in at `now` (none without a
    /// key).
    fn budgets_for(&self, key: Option<&ApiKeyId>, now: Timestamp) -> Result<Vec<Applying>, EngineError> {
        match (self.budgets.as_deref(), key) {
            (Some(budgets), Some(key)) => Ok(budgets.applying(key, &self.time_zone, now)?),
            _ => Ok(Vec::new()),
        }
    }

    /// Why nothing was funded: a budget, if the sources alone would have
    /// funded `min_output` (the budget that spend does not fit), or funds.
    #[allow(clippy::too_many_arguments)]
    fn unfunded(
        &self,
        budgets: &[Applying],
        order: &[SourceClass],
        prompt: Usage,
        min_output: u64,
        rates: Rates,
        model: &ModelId,
        bonus: &[Take],
        now: Timestamp,
    ) -> (Denial, String) {
        let funds = (
            Denial::InsufficientFunds,
            "no source can cover the prompt and one output token".to_owned(),
        );
        if budgets.is_empty() {
            return funds;
        }
        let unbounded = self.fund(
            order,
            prompt,
            min_output,
            min_output,
            rates,
            model,
            bonus,
            Room::default(),
            now,
        );
        let exhausted = unbounded.and_then(|(_, takes)| {
            let tokens = prompt.total_tokens() + min_output;
            self.buckets
                .exhausted(budgets, &self.time_zone, tokens, money_total(&takes).picos())
        });
        match exhausted {
            Some(e) => {
                let message = e.to_string();
                (Denial::BudgetExceeded(e), message)
            }
            None => funds,
        }
    }

    fn expiry(catalog: &Catalog, now: Timestamp) -> Result<Timestamp, EngineError> {
        now.checked_add(catalog.hold_ttl).map_err(|_| EngineError::Overflow)
    }

    /// Checks status, limits and funds, and holds the worst-case cost.
    pub fn reserve(
        &mut self,
        catalog: &Catalog,
        req: &ReserveRequest,
        now: Timestamp,
    ) -> Result<ReserveOutcome, EngineError> {
        self.advance(catalog, now)?;
        if let Some(seen) = self.traffic().requests.get(&req.request_id) {
            return match seen {
                Remembered::Reserved { first, reservation } if first.0 == *req => {
                    // A hold that lapsed can no longer be settled: the
                    // first answer would send its caller to generate.
                    match self.traffic().reservations.get(reservation) {
                        Some(Reservation::Expired { closed_at, .. }) => Err(EngineError::Precondition(format!(
                            "reservation {reservation} expired at {closed_at} (holds.ttl_seconds); reserve again \
                             with a new request id"
                        ))),
                        _ => Ok(ReserveOutcome::Allowed(first.1.clone())),
                    }
                }
                _ => Err(reused(&req.request_id)),
            };
        }
        self.refuse_spent(&req.request_id)?;
        self.refuse_beyond_budget(catalog)?;
        let open = self.traffic().expiries.len();
        if open >= MAX_OPEN_HOLDS {
            return Err(EngineError::Exhausted(format!(
                "account {} has {open} holds open in this sidecar, the most one account may have; settle or \
                 release them (or wait for them to lapse at holds.ttl_seconds) and retry",
                self.id
            )));
        }
        let plan = self.plan_of(catalog)?;
        let limits = self.applicable(plan, req.api_key_id.as_ref(), &req.model);
        let deny = |account: &Account, denial, message: String| {
            Ok(ReserveOutcome::Denied {
                denial,
                message,
                limits: account.buckets.status(&limits, now),
            })
        };
        if self.suspended {
            return deny(self, Denial::Suspended, format!("account {} is suspended", self.id));
        }
        if plan.allowed_models.as_ref().is_some_and(|m| !m.contains(&req.model)) {
            let message = format!("plan {} does not allow model {}", plan.id, req.model);
            return deny(self, Denial::ModelNotAllowed, message);
        }
        let prompt = req.prompt();
        let Some(version) = catalog.prices.in_force(now) else {
            return deny(
                self,
                Denial::ModelNotPriced,
                unpriced_message(Unpriced::NoVersion, &req.model, &req.tier),
            );
        };
        let rates = match version.rates(&req.model, &req.tier, prompt.prompt_tokens(), now) {
            Ok(rates) => rates,
            Err(why) => {
                return deny(
                    self,
                    Denial::ModelNotPriced,
                    unpriced_message(why, &req.model, &req.tier),
                );
            }
        };
        // A mirror grants all or asks: the shared account may well have what
        // its slice lacks (funds, permits, budgets).
        let min_output = if self.must_ask() {
            req.max_output_tokens
        } else {
            req.max_output_tokens.min(1)
        };
        let budgets = self.budgets_for(req.api_key_id.as_ref(), now)?;
        let room = if self.must_ask() {
            Room::default()
        } else {
            self.buckets.room_for(&budgets, &self.time_zone)
        };
        let funded = self.fund(
            &plan.draw_order,
            prompt,
            min_output,
            req.max_output_tokens,
            rates,
            &req.model,
            &[],
            room,
            now,
        );
        if self.must_ask() {
            let worst_tokens = prompt.total_tokens() + req.max_output_tokens;
            let mut lacking = self.buckets.lacking(&limits, worst_tokens);
            let worst = Usage {
                output_tokens: req.max_output_tokens,
                ..prompt
            };
            let mut least_lacking = Vec::new();
            if !budgets.is_empty() {
                // What the worst case holds in money, or (funds short here)
                // at most its price; and the smallest grant's price.
                let money = match &funded {
                    Some((_, takes)) => money_total(takes).picos(),
                    None => rates.prices.cost(&worst).map_or(i128::MAX, Money::picos),
                };
                lacking.extend(self.buckets.budgets_lacking(&budgets, worst_tokens, money));
                let least = Usage {
                    output_tokens: req.max_output_tokens.min(1),
                    ..prompt
                };
                let least_money = rates.prices.cost(&least).map_or(i128::MAX, Money::picos);
                least_lacking = self
                    .buckets
                    .budgets_lacking(&budgets, least.total_tokens(), least_money);
            }
            if funded.is_none() || !lacking.is_empty() || self.lease_stale(now) {
                let need = Needed::Tokens {
                    usage: worst,
                    rates,
                    model: req.model.clone(),
                };
                // What there is, up to the worst case: the last word may
                // grant less, as a stand-alone account would; but nothing
                // if even the least grant is out of reach.
                let least = Least {
                    need: Needed::Tokens {
                        usage: Usage {
                            output_tokens: req.max_output_tokens.min(1),
                            ..prompt
                        },
                        rates,
                        model: req.model.clone(),
                    },
                    has: self.slices(now),
                };
                return Err(Account::short(
                    funded.is_none().then_some((need, Some(least))),
                    lacking,
                    least_lacking,
                ));
            }
        }
        let Some((granted, takes)) = funded else {
            let (denial, message) = self.unfunded(
                &budgets,
                &plan.draw_order,
                prompt,
                min_output,
                rates,
                &req.model,
                &[],
                now,
            );
            return deny(self, denial, message);
        };
        // Everything that can fail comes before the limits are charged.
        let reservation_id = req.request_id.reservation_id();
        let expires_at = Self::expiry(catalog, now)?;
        let admitted_tokens = prompt.total_tokens() + granted;
        let status = match self.buckets.admit(&limits, admitted_tokens, now) {
            Ok(status) => status,
            Err(exceeded) => {
                let message = format!("{exceeded}");
                return deny(self, Denial::RateLimited(exceeded), message);
            }
        };
        self.rebalance(&[], &takes, &[]);
        let counted_money = money_total(&takes).picos();
        self.buckets
            .take_budgets(&budgets, &self.time_zone, admitted_tokens, counted_money);
        let reserved = Reserved {
            reservation_id: reservation_id.clone(),
            granted_output_tokens: granted,
            expires_at,
            price_version: version.id.clone(),
            held: takes.clone(),
            limits: status,
        };
        let hold = Hold {
            request_id: req.request_id.clone(),
            api_key_id: req.api_key_id.clone(),
            model: req.model.clone(),
            tier: req.tier.clone(),
            version: version.id.clone(),
            reserved_at: now,
            prompt,
            granted_output: granted,
            takes,
            expires_at,
            token_buckets: limits
                .iter()
                .filter(|(_, set)| set.tokens_per_minute > 0)
                .map(|(key, _)| key.clone())
                .collect(),
            buckets: limits.into_iter().map(|(key, _)| key).collect(),
            admitted_tokens,
            budgets: (!budgets.is_empty()).then(|| {
                Box::new(Counting {
                    applying: budgets,
                    money: counted_money,
                })
            }),
        };
        self.traffic_mut().expiries.insert((expires_at, reservation_id.clone()));
        self.traffic_mut()
            .reservations
            .insert(reservation_id.clone(), Reservation::Open(hold));
        self.traffic_mut().requests.insert(
            req.request_id.clone(),
            Remembered::Reserved {
                reservation: reservation_id,
                first: Box::new((req.clone(), reserved.clone())),
            },
        );
        self.bound_answers(catalog, now, &req.request_id);
        Ok(ReserveOutcome::Allowed(reserved))
    }

    fn open_hold(&self, id: &ReservationId) -> Result<&Hold, EngineError> {
        match self.traffic().reservations.get(id) {
            Some(Reservation::Open(hold)) => Ok(hold),
            Some(Reservation::Settled { .. }) => Err(EngineError::Precondition(format!(
                "reservation {id} is already settled"
            ))),
            Some(Reservation::Released { .. }) => {
                Err(EngineError::Precondition(format!("reservation {id} was released")))
            }
            Some(Reservation::Expired { .. }) => Err(EngineError::Precondition(format!(
                "reservation {id} expired at its TTL; charge late usage with Charge"
            ))),
            None if self.traffic().spent.contains(id.as_str()) => Err(EngineError::Precondition(format!(
                "reservation {id} was closed; its outcome is no longer kept ({})",
                answers_kept()
            ))),
            None => Err(EngineError::NotFound(format!("reservation {id}"))),
        }
    }

    /// Refuses a request whose answer was let go ([`Spent`]): it is never
    /// decided (or charged) again.
    fn refuse_spent(&self, id: &RequestId) -> Result<(), EngineError> {
        if self.traffic().spent.contains(id.as_str()) {
            return Err(EngineError::Precondition(format!(
                "request {id} was answered; its answer is no longer kept ({})",
                answers_kept()
            )));
        }
        Ok(())
    }

    /// Refuses a new request while the account has as many request ids
    /// remembered as [`Catalog::max_request_ids`] allows: each is kept for
    /// the idempotency window, so without a budget a flood of cheap calls
    /// would hold memory without bound.
    fn refuse_beyond_budget(&self, catalog: &Catalog) -> Result<(), EngineError> {
        let traffic = self.traffic();
        let remembered = traffic.requests.len() + traffic.spent.len();
        if remembered >= catalog.max_request_ids {
            return Err(EngineError::Exhausted(format!(
                "account {} has {remembered} request ids remembered, the most one account may have within \
                 the idempotency window ({} s; holds.max_request_ids); retry later",
                self.id,
                catalog.idempotency_window.as_secs()
            )));
        }
        Ok(())
    }

    fn hold_rates(&self, catalog: &Catalog, hold: &Hold, prompt_tokens: u64) -> Result<Rates, EngineError> {
        let version = catalog
            .prices
            .get(&hold.version)
            .ok_or_else(|| EngineError::Precondition(format!("price version {} is gone", hold.version)))?;
        version
            .rates(&hold.model, &hold.tier, prompt_tokens, hold.reserved_at)
            .map_err(|why| EngineError::Precondition(unpriced_message(why, &hold.model, &hold.tier)))
    }

    /// Grows the output grant of an open reservation to `max_output` (a
    /// total), as far as funds allow, and renews its TTL.
    pub fn extend(
        &mut self,
        catalog: &Catalog,
        id: &ReservationId,
        max_output: u64,
        now: Timestamp,
    ) -> Result<Extended, EngineError> {
        self.advance(catalog, now)?;
        let hold = self.open_hold(id)?.clone();
        let plan = self.plan_of(catalog)?;
        let rates = self.hold_rates(catalog, &hold, hold.prompt.prompt_tokens())?;
        let expires_at = Self::expiry(catalog, now)?;
        let (granted, takes, shortfall) = if max_output <= hold.granted_output {
            (hold.granted_output, hold.takes.clone(), None)
        } else if self.suspended {
            (hold.granted_output, hold.takes.clone(), Some(Denial::Suspended))
        } else {
            // The budgets' room, beside what the hold counts in them
            // already; a rolling window's as it stands now (the growth is
            // counted on the hold's day, inside it).
            let current: Vec<Applying> = hold.budgets().iter().map(|a| a.at(&self.time_zone, now)).collect();
            let room = if self.must_ask() {
                Room::default()
            } else {
                let room = self.buckets.room_for(&current, &self.time_zone);
                Room {
                    tokens: room.tokens.map(|r| r + i128::from(hold.admitted_tokens)),
                    money: room.money.map(|r| r + hold.counted_money()),
                }
            };
            let fund = |room| {
                self.fund(
                    &plan.draw_order,
                    hold.prompt,
                    hold.granted_output,
                    max_output,
                    rates,
                    &hold.model,
                    &hold.takes,
                    room,
                    now,
                )
            };
            let funded = fund(room);
            let (granted, takes) = funded.unwrap_or((hold.granted_output, hold.takes.clone()));
            // What growing to the whole of `max_output` would count more.
            let worst = Usage {
                output_tokens: max_output,
                ..hold.prompt
            };
            let growth = |takes: &[Take], granted: u64| {
                let money = if granted == max_output {
                    money_total(takes).picos()
                } else {
                    rates.prices.cost(&worst).map_or(i128::MAX, Money::picos)
                };
                (
                    worst.total_tokens() - hold.admitted_tokens,
                    money - hold.counted_money(),
                )
            };
            if self.must_ask() {
                let (tokens, money) = growth(&takes, granted);
                let lacking = self.buckets.budgets_lacking(&current, tokens, money);
                if granted < max_output || self.lease_stale(now) || !lacking.is_empty() {
                    let need = Needed::Tokens {
                        usage: worst,
                        rates,
                        model: hold.model.clone(),
                    };
                    let need = (granted < max_output || self.lease_stale(now)).then_some((need, None));
                    return Err(Account::short(need, lacking, Vec::new()));
                }
            }
            let short = (granted < max_output).then(|| {
                // Funds would have given more: a budget stopped it.
                let unbounded = fund(Room::default()).filter(|(g, _)| *g > granted);
                let exhausted = unbounded.and_then(|(g, takes)| {
                    let tokens = hold.prompt.total_tokens() + g - hold.admitted_tokens;
                    let money = money_total(&takes).picos() - hold.counted_money();
                    self.buckets.exhausted(&current, &self.time_zone, tokens, money)
                });
                exhausted.map_or(Denial::InsufficientFunds, Denial::BudgetExceeded)
            });
            (granted, takes, short)
        };
        self.rebalance(&hold.takes, &takes, &[]);
        let admitted_tokens = hold.prompt.total_tokens() + granted;
        self.buckets
            .adjust_tokens(&hold.token_buckets, hold.admitted_tokens, admitted_tokens, now);
        let counted_money = money_total(&takes).picos();
        self.buckets.adjust_budgets(
            hold.budgets(),
            i128::from(admitted_tokens) - i128::from(hold.admitted_tokens),
            counted_money - hold.counted_money(),
        );
        let extended = Extended {
            granted_output_tokens: granted,
            expires_at,
            held: takes.clone(),
            shortfall,
        };
        self.traffic_mut().expiries.remove(&(hold.expires_at, id.clone()));
        self.traffic_mut().expiries.insert((expires_at, id.clone()));
        if let Some(Reservation::Open(h)) = self.traffic_mut().reservations.get_mut(id) {
            h.granted_output = granted;
            h.takes = takes;
            h.expires_at = expires_at;
            h.admitted_tokens = admitted_tokens;
            if let Some(b) = &mut h.budgets {
                b.money = counted_money;
            }
        }
        Ok(extended)
    }

    /// Charges actual usage against a reservation; the rest of the hold is
    /// released. Usage beyond every source and the credit limit becomes
    /// debt: it is never dropped.
    pub fn settle(
        &mut self,
        catalog: &Catalog,
        id: &ReservationId,
        usage: Usage,
        now: Timestamp,
    ) -> Result<Arc<UsageRecord>, EngineError> {
        self.advance(catalog, now)?;
        if let Some(Reservation::Settled {
            usage: first, record, ..
        }) = self.traffic().reservations.get(id)
        {
            return if *first == usage {
                Ok(Arc::clone(record))
            } else {
                Err(EngineError::Precondition(format!(
                    "reservation {id} was already settled with different usage"
                )))
            };
        }
        // Plan while the hold stays in place: nothing below may fail.
        let charges = {
            let hold = self.open_hold(id)?;
            let plan = self.plan_of(catalog)?;
            let rates = self.hold_rates(catalog, hold, usage.prompt_tokens())?;
            let need = Need::Tokens {
                usage,
                rates,
                model: &hold.model,
            };
            let caps = self.capacities(&plan.draw_order, &need, &hold.takes, now);
            let charges = plan_with_debt(&caps, &need)?;
            if self.must_ask() && charges.iter().any(|t| t.source == SourceRef::Debt) {
                return Err(Account::short(Some((Needed::of(&need), None)), Vec::new(), Vec::new()));
            }
            charges
        };
        let Some(Reservation::Open(hold)) = self.traffic_mut().reservations.remove(id) else {
            return Err(EngineError::NotFound(format!("reservation {id}")));
        };
        self.rebalance(&hold.takes, &[], &charges);
        self.buckets
            .adjust_tokens(&hold.token_buckets, hold.admitted_tokens, usage.total_tokens(), now);
        self.buckets.adjust_budgets(
            hold.budgets(),
            i128::from(usage.total_tokens()) - i128::from(hold.admitted_tokens),
            money_total(&charges).picos() - hold.counted_money(),
        );
        self.buckets.finish(&hold.buckets);
        self.traffic_mut().expiries.remove(&(hold.expires_at, id.clone()));
        let record = Arc::new(self.record_for(&hold, RecordKind::Settle, usage, charges, now));
        self.emit(Arc::clone(&record), catalog);
        self.traffic_mut().reservations.insert(
            id.clone(),
            Reservation::Settled {
                usage,
                record: Arc::clone(&record),
                closed_at: now,
            },
        );
        Ok(record)
    }

    /// Returns a reservation's whole hold, charging nothing.
    pub fn release(&mut self, catalog: &Catalog, id: &ReservationId, now: Timestamp) -> Result<Vec<Take>, EngineError> {
        self.advance(catalog, now)?;
        if let Some(Reservation::Released { released, .. }) = self.traffic().reservations.get(id) {
            return Ok(released.clone());
        }
        let hold = self.open_hold(id)?.clone();
        self.unhold(&hold.takes);
        self.traffic_mut().expiries.remove(&(hold.expires_at, id.clone()));
        self.buckets
            .adjust_tokens(&hold.token_buckets, hold.admitted_tokens, 0, now);
        self.buckets
            .adjust_budgets(hold.budgets(), -i128::from(hold.admitted_tokens), -hold.counted_money());
        self.buckets.finish(&hold.buckets);
        self.traffic_mut().reservations.insert(
            id.clone(),
            Reservation::Released {
                released: hold.takes.clone(),
                closed_at: now,
            },
        );
        Ok(hold.takes)
    }

    /// Debits a known amount without a reservation. Never creates debt and
    /// is not subject to rate limits (the work is already done).
    pub fn charge(
        &mut self,
        catalog: &Catalog,
        req: &ChargeRequest,
        now: Timestamp,
    ) -> Result<ChargeOutcome, EngineError> {
        self.advance(catalog, now)?;
        if let Some(seen) = self.traffic().requests.get(&req.request_id) {
            return match seen {
                Remembered::Charged { request, record, .. } if **request == *req => {
                    Ok(ChargeOutcome::Charged(Arc::clone(record)))
                }
                _ => Err(reused(&req.request_id)),
            };
        }
        self.refuse_spent(&req.request_id)?;
        self.refuse_beyond_budget(catalog)?;
        let plan = self.plan_of(catalog)?;
        if self.suspended {
            return Ok(ChargeOutcome::Denied(
                Denial::Suspended,
                format!("account {} is suspended", self.id),
            ));
        }
        let (need, usage, version) = match (req.what, &req.model) {
            (ChargeWhat::Money(m), _) if !m.is_positive() => {
                return Err(EngineError::invalid("amount", "must be greater than zero"));
            }
            (ChargeWhat::Money(m), _) => (Need::Money(m), Usage::default(), None),
            (ChargeWhat::Usage(_), None) => {
                return Err(EngineError::invalid("model", "required when charging usage"));
            }
            (ChargeWhat::Usage(usage), Some(model)) => {
                if plan.allowed_models.as_ref().is_some_and(|m| !m.contains(model)) {
                    let message = format!("plan {} does not allow model {model}", plan.id);
                    return Ok(ChargeOutcome::Denied(Denial::ModelNotAllowed, message));
                }
                let rates = catalog
                    .prices
                    .in_force(now)
                    .ok_or(Unpriced::NoVersion)
                    .and_then(|v| Ok((v.rates(model, &req.tier, usage.prompt_tokens(), now)?, v.id.clone())));
                match rates {
                    Ok((rates, id)) => (Need::Tokens { usage, rates, model }, usage, Some(id)),
                    Err(why) => {
                        return Ok(ChargeOutcome::Denied(
                            Denial::ModelNotPriced,
                            unpriced_message(why, model, &req.tier),
                        ));
                    }
                }
            }
        };
        let caps = self.capacities(&plan.draw_order, &need, &[], now);
        let planned = draw::plan(&caps, &need, false);
        if self.must_ask() && (planned.is_err() || self.lease_stale(now)) {
            return Err(Account::short(Some((Needed::of(&need), None)), Vec::new(), Vec::new()));
        }
        let Ok(charges) = planned else {
            return Ok(ChargeOutcome::Denied(
                Denial::InsufficientFunds,
                "no source can cover the charge".into(),
            ));
        };
        // Counted in the key's budgets without a check: the work is done.
        let budgets = self.budgets_for(req.api_key_id.as_ref(), now)?;
        self.rebalance(&[], &[], &charges);
        self.buckets.take_budgets(
            &budgets,
            &self.time_zone,
            usage.total_tokens(),
            money_total(&charges).picos(),
        );
        let record = Arc::new(UsageRecord {
            kind: RecordKind::Charge,
            request_id: req.request_id.clone(),
            reservation_id: None,
            account_id: self.id.clone(),
            api_key_id: req.api_key_id.clone(),
            model: req.model.clone(),
            service_tier: version.as_ref().map(|_| req.tier.clone()),
            usage,
            total_money: super::source::money_total(&charges),
            charges,
            price_version: version,
            reserved_at: now,
            settled_at: now,
        });
        self.emit(Arc::clone(&record), catalog);
        self.traffic_mut().requests.insert(
            req.request_id.clone(),
            Remembered::Charged {
                request: Box::new(req.clone()),
                record: Arc::clone(&record),
                at: now,
            },
        );
        self.bound_answers(catalog, now, &req.request_id);
        Ok(ChargeOutcome::Charged(record))
    }

    /// Whether an admin operation id was already applied: `Ok(true)` with
    /// the same content (a replay: answer as before, whatever changed since),
    /// `Ok(false)` if new, a conflict if used with other content. Checked
    /// before anything else, so a retry never meets a check the first call
    /// passed (an expiry now in the past, a balance spent meanwhile).
    fn replayed(&self, key: &str, fingerprint: &str) -> Result<bool, EngineError> {
        match self.operations.get(key) {
            None => Ok(false),
            Some(f) if f == fingerprint => Ok(true),
            Some(_) => Err(EngineError::Conflict(format!(
                "{key} was already used with different content"
            ))),
        }
    }

    fn credit_paid(&mut self, amount: Money) -> Result<(), EngineError> {
        let owed = (-self.debt.available()).max(0);
        let repay = owed.min(amount.picos());
        let debt = self.debt.checked_credit(repay).ok_or(EngineError::Overflow)?;
        let paid = self
            .paid
            .checked_credit(amount.picos() - repay)
            .ok_or(EngineError::Overflow)?;
        (self.debt, self.paid) = (debt, paid);
        Ok(())
    }

    /// Credits paid money (repaying debt first) or a promotional grant.
    /// Idempotent on `operation_id`.
    pub fn top_up(
        &mut self,
        catalog: &Catalog,
        operation_id: &LotId,
        pool: Pool,
        amount: Money,
        now: Timestamp,
    ) -> Result<(), EngineError> {
        self.advance(catalog, now)?;
        let key = format!("operation_id {operation_id}");
        let fingerprint = format!("top_up|{pool:?}|{amount}");
        if self.replayed(&key, &fingerprint)? {
            return Ok(());
        }
        if !amount.is_positive() {
            return Err(EngineError::invalid("amount", "must be greater than zero"));
        }
        check_operation_size(amount)?;
        match pool {
            Pool::Paid => self.credit_paid(amount)?,
            Pool::Promo { expires_at, priority } => {
                if expires_at.is_some_and(|t| t <= now) {
                    return Err(EngineError::invalid("expires_at", "must be in the future"));
                }
                if self.promos.contains_key(operation_id) {
                    return Err(EngineError::Conflict(format!(
                        "promo lot {operation_id} already exists"
                    )));
                }
                let ledger = Ledger::credited(amount.picos());
                let lot = Lot {
                    ledger,
                    expires_at,
                    models: None,
                    priority,
                    closed: false,
                };
                self.promos.insert(operation_id.clone(), lot);
            }
        }
        self.operations.insert(key, fingerprint);
        Ok(())
    }

    /// Adds a signed amount to paid money (a credit repays debt first); a
    /// debit may not take it below minus the credit limit. Idempotent on
    /// `operation_id`.
    pub fn adjust(
        &mut self,
        catalog: &Catalog,
        operation_id: &LotId,
        amount: Money,
        now: Timestamp,
    ) -> Result<(), EngineError> {
        self.advance(catalog, now)?;
        let key = format!("operation_id {operation_id}");
        let fingerprint = format!("adjust|{amount}");
        if self.replayed(&key, &fingerprint)? {
            return Ok(());
        }
        if amount == Money::ZERO {
            return Err(EngineError::invalid("amount", "must not be zero"));
        }
        check_operation_size(amount)?;
        if amount.is_negative() {
            let after = self.paid.available() + amount.picos();
            if after < -self.credit_limit.picos() {
                return Err(EngineError::Precondition(format!(
                    "debit of {amount} would take paid money to {}, below minus the credit limit {}",
                    Money::from_picos(after),
                    self.credit_limit
                )));
            }
            self.paid.credit(amount.picos());
        } else {
            self.credit_paid(amount)?;
        }
        self.operations.insert(key, fingerprint);
        Ok(())
    }

    /// Grants a token pack. Idempotent on the pack id.
    pub fn grant_pack(&mut self, catalog: &Catalog, grant: PackGrant, now: Timestamp) -> Result<(), EngineError> {
        self.advance(catalog, now)?;
        let mut models: Vec<_> = grant.models.iter().flatten().map(ModelId::as_str).collect();
        models.sort_unstable();
        let key = format!("pack_id {}", grant.pack_id);
        let fingerprint = format!(
            "pack|{}|{}|{:?}|{}",
            grant.tokens, grant.expires_at, models, grant.priority
        );
        if self.replayed(&key, &fingerprint)? {
            return Ok(());
        }
        if grant.tokens == 0 {
            return Err(EngineError::invalid("tokens", "must be greater than zero"));
        }
        if grant.expires_at <= now {
            return Err(EngineError::invalid("expires_at", "must be in the future"));
        }
        let ledger = Ledger::credited(i128::from(grant.tokens));
        let lot = Lot {
            ledger,
            expires_at: Some(grant.expires_at),
            models: grant.models.map(|m| m.into_iter().collect()),
            priority: grant.priority,
            closed: false,
        };
        self.packs.insert(grant.pack_id, lot);
        self.operations.insert(key, fingerprint);
        Ok(())
    }

    /// Gives back what the usage record of `kind` for `request_id`
    /// charged, `charges` per source and lot (as the record lists them):
    /// each source's charged amount goes back to its available balance, or
    /// is forfeited where the source takes nothing back any more (a closed
    /// lot, a past allowance period). A request's record is refunded once;
    /// no source gives back more than it was ever charged. Checks
    /// everything before changing anything.
    ///
    /// The account does not keep its records (the usage stream does), so
    /// the charges are the operator's word, checked against the ledgers:
    /// like any change with the write role, a refund is trusted to name a
    /// record that exists.
    pub fn refund(
        &mut self,
        catalog: &Catalog,
        request_id: &RequestId,
        kind: super::record::RecordKind,
        charges: &[Take],
        (settled_at, recorded): (Timestamp, Option<bool>),
        now: Timestamp,
    ) -> Result<(), EngineError> {
        let record_id = super::record::record_id(&self.id, request_id, kind);
        self.advance(catalog, now)?;
        if charges.is_empty() {
            return Err(EngineError::invalid("charges", "name at least one source to refund"));
        }
        if now.checked_add(CLOCK_MARGIN).is_ok_and(|latest| settled_at > latest) {
            return Err(EngineError::invalid("settled_at", "is in the future"));
        }
        // Within the window every record's request id is remembered: one
        // that is not was never made.
        let checkable = now
            .checked_sub(catalog.idempotency_window)
            .is_ok_and(|h| settled_at > h);
        if checkable && recorded == Some(false) {
            return Err(EngineError::NotFound(format!(
                "record of request {request_id} on account {} (settled at {settled_at}, within the \
                 idempotency window of {} s)",
                self.id,
                catalog.idempotency_window.as_secs()
            )));
        }
        // A retry comes back under its adjustment id and never gets here
        // (`apply_audited`); the same record again is a second refund.
        let key = format!("refund of request {request_id}");
        if self.operations.get(&key).is_some() {
            return Err(EngineError::Conflict(format!(
                "the record of request {request_id} ({record_id}) was already refunded"
            )));
        }
        if charges.iter().any(|take| take.amount <= 0) {
            return Err(EngineError::invalid("charges", "every amount must be above zero"));
        }
        let per_source = per_ledger(charges)?;
        for source in per_source.keys() {
            // Every allowance period is the one allowance ledger.
            let amount: i128 = per_source
                .iter()
                .filter(|(other, _)| same_ledger(source, other))
                .map(|(_, amount)| amount)
                .sum();
            let Some(ledger) = self.ledger_mut(source) else {
                let lot = source.lot().unwrap_or_default();
                return Err(EngineError::NotFound(format!(
                    "{} {lot} on this account",
                    source.kind_name()
                )));
            };
            if ledger.charged() < amount {
                return Err(EngineError::Precondition(format!(
                    "{} {} was charged {} in all; it cannot give back {amount}",
                    source.kind_name(),
                    source.lot().unwrap_or_default(),
                    ledger.charged()
                )));
            }
        }
        self.give_back_charged(per_source);
        let fingerprint = super::record::digest_id([format!("{charges:?}").as_str()]);
        self.operations.insert(key, fingerprint);
        Ok(())
    }

    /// Gives back what `per_source` names (by ledger, each at most what the
    /// ledger was charged): to each source's available balance, or
    /// forfeited where the source takes nothing back any more (a closed
    /// lot, a past allowance period).
    pub(crate) fn give_back_charged(&mut self, per_source: std::collections::BTreeMap<SourceRef, i128>) {
        let refunded_paid = per_source.get(&SourceRef::Paid).copied().unwrap_or(0);
        for (source, amount) in per_source {
            let accepts = self.accepts_returns(&source);
            let carried = if accepts { 0 } else { self.carried(&source, amount) };
            if let Some(ledger) = self.ledger_mut(&source) {
                ledger.refund(amount);
                if !accepts {
                    ledger.forfeit(amount - carried);
                }
            }
        }
        // Paid money given back repays what is owed first, as a top-up
        // would; debt given back beyond what is still owed (top-ups repaid
        // it since) was paid with paid money, which goes back there.
        let owed = (-self.debt.available()).max(0);
        let repay = owed.min(refunded_paid);
        let excess = self.debt.available().max(0);
        let moved = repay - excess;
        self.paid.credit(-moved);
        self.debt.credit(moved);
    }

    /// Revokes what is left of a pack; its holds stay chargeable.
    pub fn revoke_pack(&mut self, catalog: &Catalog, pack_id: &LotId, now: Timestamp) -> Result<(), EngineError> {
        self.advance(catalog, now)?;
        let lot = self
            .packs
            .get_mut(pack_id)
            .ok_or_else(|| EngineError::NotFound(format!("pack {pack_id}")))?;
        if !lot.closed {
            lot.closed = true;
            lot.ledger.forfeit_available();
        }
        Ok(())
    }

    /// Moves the account to `plan`. Assigning the plan and anchor it already
    /// has changes nothing (a retry must not restart the period).
    pub fn assign_plan(
        &mut self,
        catalog: &Catalog,
        plan: &PlanId,
        anchor: Option<Anchor>,
        now: Timestamp,
    ) -> Result<(), EngineError> {
        self.advance(catalog, now)?;
        let plan = catalog
            .plans
            .get(plan)
            .ok_or_else(|| EngineError::invalid("plan", format!("no plan named {plan}")))?;
        if self.plan == plan.id && self.anchor == anchor {
            return Ok(());
        }
        self.subscribe(plan, anchor, now)
    }

    /// Replaces the per-account limit overrides.
    pub fn set_overrides(&mut self, overrides: LimitOverrides) {
        self.overrides = (overrides != LimitOverrides::default()).then(|| Box::new(overrides));
    }

    /// Changes the credit limit (zero or more). Lowering it below what is
    /// in use stops new credit draws; nothing already charged moves.
    pub fn set_credit_limit(&mut self, limit: Money) -> Result<(), EngineError> {
        check_credit_limit(limit)?;
        self.credit_limit = limit;
        Ok(())
    }

    /// What the account can spend now.
    pub fn balance(&self, now: Timestamp) -> Balance {
        let open = |lot: &&Lot| !lot.closed && lot.expires_at.is_none_or(|t| now < t);
        let pack_tokens: i128 = self.packs.values().filter(open).map(|l| l.ledger.available()).sum();
        let promo: i128 = self.promos.values().filter(open).map(|l| l.ledger.available()).sum();
        let paid = self.paid.available();
        let credit = (self.credit_limit.picos() + paid.min(0)).max(0);
        let (mut held_money, mut held_tokens) = (0i128, 0i128);
        // Holds, and on a shared account the slices sidecars hold on lease.
        let lent = self.lent();
        for take in self.holds().flat_map(|h| &h.takes).chain(&lent) {
            if take.source.is_tokens() {
                held_tokens += take.amount;
            } else {
                held_money += take.amount;
            }
        }
        let burn = self.burn.rates(now);
        let spendable = promo + paid.max(0) + credit;
        // The last hour's rate, or the day's when the hour was quiet.
        let per_hour = |hour: i128, day: i128| if hour > 0 { hour } else { day };
        Balance {
            allowance_tokens: if self.subscription.is_some() {
                to_u64(self.allowance.available())
            } else {
                0
            },
            period_end: self.subscription.as_ref().map(|s| s.window.end),
            pack_tokens: to_u64(pack_tokens),
            promo: Money::from_picos(promo),
            paid: Money::from_picos(paid),
            credit_limit: self.credit_limit,
            debt: Money::from_picos((-self.debt.available()).max(0)),
            spendable: Money::from_picos(spendable),
            held_money: Money::from_picos(held_money),
            held_tokens: to_u64(held_tokens),
            suspended: self.suspended,
            budgets: self
                .budgets
                .as_deref()
                .and_then(|b| b.all(&self.time_zone, now).ok())
                .unwrap_or_default()
                .into_iter()
                .map(|applying| {
                    let counted = self.buckets.counted(&applying, &self.time_zone);
                    BudgetUse {
                        runs_out_at: counted.runs_out(&applying, now),
                        counted,
                        applying,
                    }
                })
                .collect(),
            burn,
            money_runs_out_at: runs_out(now, spendable, per_hour(burn.money_last_hour, burn.money_last_day)),
            allowance_runs_out_at: self.subscription.as_ref().and_then(|_| {
                let left = self.allowance.available();
                runs_out(now, left, per_hour(burn.tokens_last_hour, burn.tokens_last_day))
            }),
        }
    }
}

fn check_operation_size(amount: Money) -> Result<(), EngineError> {
    let limit = super::money::MAX_OPERATION;
    if amount > limit || amount.checked_neg().is_ok_and(|neg| neg > limit) {
        return Err(EngineError::invalid(
            "amount",
            format!("must be at most {limit} in magnitude"),
        ));
    }
    Ok(())
}

/// How far ahead of this clock another sidecar's may run (a record's
/// `settled_at` from it is not "in the future").
const CLOCK_MARGIN: SignedDuration = SignedDuration::from_secs(60);

impl Account {
    /// Whether `request_id` made a usage record on this account (a charge,
    /// a settle, a lapse charged in full), as its answer or, for the rest
    /// of the idempotency window, its fingerprint says: in a process that
    /// decides the account's requests, true of every record of the window.
    pub fn made_record(&self, request_id: &RequestId) -> bool {
        let traffic = self.traffic();
        match traffic.requests.get(request_id) {
            Some(Remembered::Charged { .. }) => true,
            Some(Remembered::Reserved { reservation, .. }) => traffic
                .reservations
                .get(reservation)
                .is_some_and(Reservation::made_record),
            None => traffic.spent.made_record(request_id.as_str()),
        }
    }
}

/// How long and how many answers are kept, for the errors that say one
/// was let go.
fn answers_kept() -> String {
    format!(
        "answers are kept {} s after the request closed, and for at most the {MAX_ANSWERS} latest per account",
        ANSWERS_KEPT.as_secs()
    )
}

/// A request id already used with other content.
fn reused(id: &RequestId) -> EngineError {
    EngineError::Conflict(format!("request_id {id} was already used with different content"))
}

/// Plans a settle: it always succeeds, overflowing into debt.
fn plan_with_debt(caps: &[(SourceRef, i128)], need: &Need<'_>) -> Result<Vec<Take>, EngineError> {
    draw::plan(caps, need, true).map_err(|_| EngineError::Overflow)
}

/// Whether `a` and `b` draw on one ledger: every allowance period on the
/// allowance's, credit on paid money's.
fn same_ledger(a: &SourceRef, b: &SourceRef) -> bool {
    let ledger = |s: &SourceRef| match s {
        SourceRef::Allowance { .. } => SourceRef::Allowance { period: 0 },
        SourceRef::Credit => SourceRef::Paid,
        other => other.clone(),
    };
    ledger(a) == ledger(b)
}

/// `charges` summed per ledger: credit is drawn from the paid ledger (one
/// ledger, one limit).
pub(crate) fn per_ledger(charges: &[Take]) -> Result<std::collections::BTreeMap<SourceRef, i128>, EngineError> {
    let mut per_source = std::collections::BTreeMap::new();
    for take in charges {
        let source = match &take.source {
            SourceRef::Credit => SourceRef::Paid,
            other => other.clone(),
        };
        let sum: &mut i128 = per_source.entry(source).or_default();
        *sum = sum.checked_add(take.amount).ok_or(EngineError::Overflow)?;
    }
    Ok(per_source)
}
