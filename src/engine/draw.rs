//! Draw-down: which sources pay for a request, and in what amounts.
//!
//! A request's tokens are covered first by token sources (allowance, packs),
//! kind by kind (input, cached input, cache write, output), then whatever is
//! left is priced and covered by money sources (promo, paid, credit), in
//! the plan's order. Settle may overflow into recorded debt; nothing else
//! may.
//!
//! **The one rounding rule.** Money is never rounded. A token of a model
//! weighted `w` thousandths counts as `w/1000` source tokens; the source
//! tokens taken for a slice are rounded *up* to a whole token, and the
//! tokens a source can cover are rounded *down*. Both round against the
//! caller, so a source never gives more than it holds.
//!
//! Every mutation goes through [`Account::rebalance`]: planning is pure and
//! may fail; committing a plan cannot.

use std::cmp::Reverse;

use jiff::Timestamp;

use super::account::{Account, Lot};
use super::catalog::SourceClass;
use super::ids::{LotId, ModelId};
use super::money::Money;
use super::pricing::{Rates, TokenKind, Usage};
use super::source::{SourceRef, Take};

/// What each source can give, in draw order: a handful of sources, kept on
/// the stack (two of these are built for every reserve and its settle).
pub(crate) type Capacities = smallvec::SmallVec<[(SourceRef, i128); 6]>;

/// What a draw must cover.
#[derive(Debug, Clone, Copy)]
pub enum Need<'a> {
    /// Tokens of a model at rates.
    Tokens {
        /// Token counts.
        usage: Usage,
        /// Prices and weight.
        rates: Rates,
        /// The model (for pack scopes).
        model: &'a ModelId,
    },
    /// A fixed amount of money (money sources only).
    Money(Money),
}

/// The sources cannot cover a need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shortfall;

fn by_draw_priority<'a>(lots: impl Iterator<Item = (&'a LotId, &'a Lot)>) -> Vec<(&'a LotId, &'a Lot)> {
    let mut lots: Vec<_> = lots.collect();
    lots.sort_by_key(|(id, lot)| {
        (
            Reverse(lot.priority),
            lot.expires_at.is_none(),
            lot.expires_at,
            (*id).clone(),
        )
    });
    lots
}

fn amount_on(bonus: &[Take], source: &SourceRef) -> i128 {
    bonus.iter().filter(|t| &t.source == source).map(|t| t.amount).sum()
}

impl Account {
    /// What each source can give, in draw order, counting `bonus` (the
    /// takes of the hold being settled or extended) as available again.
    pub(crate) fn capacities(
        &self,
        order: &[SourceClass],
        need: &Need<'_>,
        bonus: &[Take],
        now: Timestamp,
    ) -> Capacities {
        let model = match need {
            Need::Tokens { model, .. } => Some(*model),
            Need::Money(_) => None,
        };
        // A mirror whose lease expired draws nothing new from its slices.
        let lapsed = self.slices_lapsed(now);
        let own = |available: i128| if lapsed { 0 } else { available };
        let mut caps = Capacities::new();
        let mut push = |source: SourceRef, cap: i128| {
            if cap > 0 {
                caps.push((source, cap));
            }
        };
        for class in order {
            match class {
                SourceClass::Allowance | SourceClass::Packs if model.is_none() => {}
                SourceClass::Allowance => {
                    let current = self.current_period();
                    // Holds on past periods first: unused, they are forfeited.
                    let mut past: Vec<_> = bonus
                        .iter()
                        .filter_map(|t| match t.source {
                            SourceRef::Allowance { period } if Some(period) != current => Some(period),
                            _ => None,
                        })
                        .collect();
                    past.sort_unstable();
                    past.dedup();
                    for period in past {
                        let source = SourceRef::Allowance { period };
                        push(source.clone(), amount_on(bonus, &source));
                    }
                    if let Some(period) = current {
                        let source = SourceRef::Allowance { period };
                        push(
                            source.clone(),
                            own(self.allowance.available()) + amount_on(bonus, &source),
                        );
                    }
                }
                SourceClass::Packs | SourceClass::Promo => {
                    let (lots, make): (_, fn(LotId) -> SourceRef) = if *class == SourceClass::Packs {
                        (&self.packs, SourceRef::Pack)
                    } else {
                        (&self.promos, SourceRef::Promo)
                    };
                    let lot_model = if *class == SourceClass::Packs { model } else { None };
                    let ordered = by_draw_priority(lots.iter());
                    // What this request holds on lots that closed since
                    // (expired, revoked) comes first: unused, it is forfeited.
                    for (id, _) in ordered.iter().filter(|(_, lot)| !lot.usable(lot_model, now)) {
                        let source = make((*id).clone());
                        push(source.clone(), amount_on(bonus, &source));
                    }
                    for (id, lot) in ordered.iter().filter(|(_, lot)| lot.usable(lot_model, now)) {
                        let source = make((*id).clone());
                        push(source.clone(), amount_on(bonus, &source) + own(lot.ledger.available()));
                    }
                }
                SourceClass::Paid | SourceClass::Credit if self.is_mirror() => {
                    // A mirror holds a slice of paid money (credit included):
                    // never below zero.
                    if *class == SourceClass::Paid {
                        let slice = own(self.paid.available()) + amount_on(bonus, &SourceRef::Paid);
                        push(SourceRef::Paid, slice.max(0));
                    }
                }
                SourceClass::Paid | SourceClass::Credit => {
                    let effective = self.paid.available()
                        + amount_on(bonus, &SourceRef::Paid)
                        + amount_on(bonus, &SourceRef::Credit);
                    if *class == SourceClass::Paid {
                        push(SourceRef::Paid, effective.max(0));
                    } else {
                        push(SourceRef::Credit, (self.credit_limit.picos() + effective.min(0)).max(0));
                    }
                }
            }
        }
        // Holds stay chargeable: what `bonus` holds on a source the order
        // no longer names (the plan changed since the hold was taken) still
        // covers its request, after the order's own sources.
        let named = |class: SourceClass| {
            order.contains(&class) || class == SourceClass::Paid && order.contains(&SourceClass::Credit)
        };
        let mut unnamed: smallvec::SmallVec<[SourceRef; 2]> = smallvec::SmallVec::new();
        for t in bonus {
            let (class, source) = match &t.source {
                SourceRef::Allowance { .. } => (SourceClass::Allowance, t.source.clone()),
                SourceRef::Pack(_) => (SourceClass::Packs, t.source.clone()),
                SourceRef::Promo(_) => (SourceClass::Promo, t.source.clone()),
                // Credit is drawn from paid money's ledger.
                SourceRef::Paid | SourceRef::Credit => (SourceClass::Paid, SourceRef::Paid),
                SourceRef::Debt => continue,
            };
            if !named(class) && !unnamed.contains(&source) {
                unnamed.push(source);
            }
        }
        for source in unnamed {
            let held = match source {
                SourceRef::Paid => amount_on(bonus, &SourceRef::Paid) + amount_on(bonus, &SourceRef::Credit),
                _ => amount_on(bonus, &source),
            };
            push(source, held);
        }
        if let Some(m) = self.mirror() {
            // The failure policy's allowance while the store is unreachable.
            let owed = -self.debt.available();
            push(SourceRef::Debt, m.overdraft - owed + amount_on(bonus, &SourceRef::Debt));
        }
        caps
    }

    /// Moves amounts between a source's held, charged and forfeited figures:
    /// `released` stops being held, `held` starts being held, `charged` is
    /// charged. Whatever `released` gives back to a source that no longer
    /// accepts returns (closed lot, past period) is forfeited, but for the
    /// ended period's allowance that rolls over ([`Account::carried`]).
    pub(crate) fn rebalance(&mut self, released: &[Take], held: &[Take], charged: &[Take]) {
        // Amounts here are bounded by capacities computed from these same
        // ledgers, or (debt) by one request's checked cost; the release
        // profile keeps overflow checks on regardless.
        for t in released {
            if let Some(l) = self.ledger_mut(&t.source) {
                l.release(t.amount);
            }
        }
        for t in held {
            if let Some(l) = self.ledger_mut(&t.source) {
                l.hold(t.amount);
            }
        }
        for t in charged {
            if let Some(l) = self.ledger_mut(&t.source) {
                l.charge(t.amount);
            }
        }
        if let Some(log) = self.mirror_mut() {
            super::source::merge(&mut log.charged, charged.iter().cloned());
        }
        self.settle_unbacked(released, held, charged);
        let mut sources: Vec<&SourceRef> = released.iter().map(|t| &t.source).collect();
        sources.sort();
        sources.dedup();
        for source in sources {
            if self.accepts_returns(source) {
                continue;
            }
            let back = amount_on(released, source) - amount_on(held, source) - amount_on(charged, source);
            let carried = self.carried(source, back);
            self.give_up(source.clone(), back - carried);
        }
    }

    /// Stops holding `takes`, charging nothing.
    pub(crate) fn unhold(&mut self, takes: &[Take]) {
        self.rebalance(takes, &[], &[]);
    }

    /// Charges exactly what `takes` hold.
    pub(crate) fn charge_held(&mut self, takes: &[Take]) {
        self.rebalance(takes, &[], takes);
    }
}

/// Splits `need` over `caps` (in draw order). With `allow_debt`, what no
/// source covers becomes a debt take; without, it is a [`Shortfall`].
pub fn plan(caps: &[(SourceRef, i128)], need: &Need<'_>, allow_debt: bool) -> Result<Vec<Take>, Shortfall> {
    let (mut takes, mut cost) = match need {
        Need::Money(m) => (Vec::new(), m.picos()),
        Need::Tokens { usage, rates, .. } => {
            let (takes, by_kind) = tokens_first(caps, usage, rates);
            (takes, by_kind.iter().sum())
        }
    };
    for (source, cap) in caps.iter().filter(|(s, _)| !s.is_tokens()) {
        if cost == 0 {
            break;
        }
        let take = cost.min(*cap);
        takes.push(Take {
            source: source.clone(),
            amount: take,
        });
        cost -= take;
    }
    if cost > 0 {
        if !allow_debt {
            return Err(Shortfall);
        }
        takes.push(Take {
            source: SourceRef::Debt,
            amount: cost,
        });
    }
    Ok(takes)
}

/// What the token sources of `caps` (in draw order) take of `usage`, each
/// kind in turn at `rates`' weight, and the money the rest costs, per
/// token kind in [`TokenKind::ALL`]'s order: the price of each kind times
/// the tokens of it no token source covered, exactly (no rounding: prices
/// are per token). [`plan`] charges their sum to the money sources.
pub fn tokens_first(caps: &[(SourceRef, i128)], usage: &Usage, rates: &Rates) -> (Vec<Take>, [i128; 4]) {
    let mut takes = Vec::new();
    let weight = i128::from(rates.weight_milli.max(1));
    let mut rest = TokenKind::ALL.map(|k| i128::from(usage.get(k)));
    for (source, cap) in caps.iter().filter(|(s, _)| s.is_tokens()) {
        let mut left = *cap;
        for r in rest.iter_mut() {
            let fit = (*r).min(left * 1000 / weight);
            if fit > 0 {
                left -= (fit * weight + 999) / 1000;
                *r -= fit;
            }
        }
        if left < *cap {
            takes.push(Take {
                source: source.clone(),
                amount: cap - left,
            });
        }
    }
    // Counts are at most 10^9 each and prices are bounded at
    // configuration, so this cannot overflow an i128.
    let mut by_kind = [0i128; 4];
    for ((money, kind), n) in by_kind.iter_mut().zip(TokenKind::ALL).zip(rest) {
        *money = rates.prices.get(kind).picos() * n;
    }
    (takes, by_kind)
}
