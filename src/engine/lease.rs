//! Leases: many sidecars deciding from memory on one shared account without
//! any of them overspending it.
//!
//! The same engine plays two roles.
//!
//! - The **shared account** (kept by the store) lends sidecars slices of its
//!   sources and permits of its limit buckets. A slice is *held* in the
//!   shared ledgers exactly like a reservation's hold, so it can never be
//!   lent twice and `granted = available + held + charged + forfeited`
//!   still holds. [`Account::sync`] applies one sidecar's report (what it
//!   charged, what it gives back), renews its lease and lends more. Reports
//!   carry the sidecar's id and a sequence number: a report applied once is
//!   never applied again, and its retry gets the first answer back.
//! - A sidecar's **mirror** ([`Account::mirror_of`]) has the shared
//!   account's settings, plan and lots, but its ledgers hold only what was
//!   lent to it. The usual operations run on it unchanged and log every
//!   charge and every amount they give up ([`Mirror`](super::role::Mirror)) for the next report.
//!   When a mirror cannot decide alone (its slice or permits are short, its
//!   lease is too old), the operation fails with [`EngineError::Short`]
//!   naming exactly what it needs; the sidecar asks the shared account for
//!   that and runs the operation again as the last word.
//!
//! A lease the sidecar stops renewing lapses at its expiry: the shared
//! account takes back everything still lent. Charges reported after that
//! are applied as far as the sources allow, money beyond them as debt.
//!
//! Why one file: both roles of the lease arithmetic (the shared account
//! lending, the mirror drawing) must agree to the unit, and reading them
//! side by side is how that is checked.

use std::collections::BTreeMap;

use jiff::Timestamp;

use super::account::Account;
use super::catalog::Catalog;
use super::draw::{self, Need};
use super::error::EngineError;
use super::ids::{ModelId, ProducerId};
use super::limits::{BucketKey, Lacking, LimitSet, Permits, Scope};
use super::money::Money;
use super::role::{Granted, Lapsed, Lease, Least, Needed, Report, Role, Short, Sync, Synced};
use super::source::{SourceRef, Take, lent_as, merge};

/// A slice is at most this fraction (1/n) of what the source has left, so
/// capacity lent out shrinks with the balance and several sidecars never
/// strand much of it.
pub const FAIR_SHARE: i128 = 4;

fn merge_permits(into: &mut Vec<(BucketKey, Permits)>, key: &BucketKey, p: Permits, sign: i128) {
    let i = match into.iter().position(|(k, _)| k == key) {
        Some(i) => i,
        None => {
            into.push((key.clone(), Permits::default()));
            into.len() - 1
        }
    };
    let slot = &mut into[i].1;
    if sign > 0 {
        slot.requests = slot.requests.saturating_add(p.requests);
        slot.slots = slot.slots.saturating_add(p.slots);
    } else {
        slot.requests = slot.requests.saturating_sub(p.requests);
        slot.slots = slot.slots.saturating_sub(p.slots);
    }
    slot.tokens += sign * p.tokens;
    slot.money += sign * p.money;
    into.retain(|(_, p)| !p.is_empty());
}

/// Takes up to `take`'s amount of its source out of `skip`.
fn skip_of(skip: &mut Vec<Take>, take: &Take) -> i128 {
    let Some(t) = skip.iter_mut().find(|t| t.source == take.source) else {
        return 0;
    };
    let out = t.amount.min(take.amount).max(0);
    t.amount -= out;
    skip.retain(|t| t.amount != 0);
    out
}

/// Removes up to `amount` of `source` from `held`; returns how much.
fn take_out(held: &mut Vec<Take>, source: &SourceRef, amount: i128) -> i128 {
    let source = lent_as(source);
    let Some(t) = held.iter_mut().find(|t| t.source == source) else {
        return 0;
    };
    let out = t.amount.min(amount).max(0);
    t.amount -= out;
    held.retain(|t| t.amount != 0);
    out
}

/// Takes up to `amount` of `source` out of what `lease` set aside when it
/// lapsed: of `epoch`'s funds, or (`None`, charges of holds whose backing
/// lapsed at an epoch the sidecar no longer knows) of any, oldest first.
fn take_lapsed(lease: &mut Lease, epoch: Option<u64>, source: &SourceRef, amount: i128) -> i128 {
    let mut out = 0;
    for q in lease.lapsed.iter_mut().filter(|q| epoch.is_none_or(|e| q.epoch == e)) {
        out += take_out(&mut q.held, source, amount - out);
    }
    lease.lapsed.retain(|q| !q.held.is_empty());
    out
}

impl Needed {
    /// What a mirror asks for to cover `need`.
    pub fn of(need: &Need<'_>) -> Needed {
        match need {
            Need::Tokens { usage, rates, model } => Needed::Tokens {
                usage: *usage,
                rates: *rates,
                model: (*model).clone(),
            },
            Need::Money(m) => Needed::Money(*m),
        }
    }

    fn as_need(&self) -> Need<'_> {
        match self {
            Needed::Tokens { usage, rates, model } => Need::Tokens {
                usage: *usage,
                rates: *rates,
                model,
            },
            Needed::Money(m) => Need::Money(*m),
        }
    }
}

impl Account {
    // ---- shared side ----

    /// When [`Account::lapse_leases`] next has something to do: a lease
    /// holding anything expires, or funds set aside are due back.
    pub(crate) fn next_lease_event(&self) -> Option<Timestamp> {
        self.leases()
            .values()
            .flat_map(|l| {
                let expiry = (!l.held.is_empty() || !l.permits.is_empty()).then_some(l.expires_at);
                expiry.into_iter().chain(l.lapsed.iter().map(|q| q.until))
            })
            .min()
    }

    /// Lapses leases whose expiry has passed: their concurrency slots are
    /// free, their funds set aside ([`Lapsed`]) for the hold TTL and the
    /// idempotency window. Funds set aside whose time is up are available
    /// again (or forfeited, for a lot closed or a period ended since).
    pub(crate) fn lapse_leases(&mut self, catalog: &Catalog, now: Timestamp) {
        let kept = catalog
            .hold_ttl
            .checked_add(catalog.idempotency_window)
            .unwrap_or(catalog.hold_ttl);
        let due: Vec<ProducerId> = self
            .leases()
            .iter()
            .filter(|(_, l)| {
                (l.expires_at <= now && (!l.held.is_empty() || !l.permits.is_empty()))
                    || l.lapsed.iter().any(|q| q.until <= now)
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in due {
            let Some(mut lease) = self.shared_mut().and_then(|s| s.leases.remove(&id)) else {
                continue;
            };
            if lease.expires_at <= now && (!lease.held.is_empty() || !lease.permits.is_empty()) {
                self.free_permits(&mut lease, now);
                if !lease.held.is_empty() {
                    lease.lapsed.push(Lapsed {
                        epoch: lease.epoch,
                        held: std::mem::take(&mut lease.held),
                        until: lease.expires_at.checked_add(kept).unwrap_or(now),
                    });
                }
                lease.epoch += 1;
            }
            let (over, kept): (Vec<Lapsed>, Vec<Lapsed>) = lease.lapsed.drain(..).partition(|q| q.until <= now);
            lease.lapsed = kept;
            for q in over {
                self.unhold(&q.held);
            }
            self.put_lease(id, lease);
        }
    }

    /// Takes back everything `lease` holds, set-aside funds included: its
    /// funds are available again, its concurrency slots free.
    fn take_back(&mut self, lease: &mut Lease, now: Timestamp) {
        self.unhold(&lease.held);
        lease.held.clear();
        for q in std::mem::take(&mut lease.lapsed) {
            self.unhold(&q.held);
        }
        self.free_permits(lease, now);
    }

    /// Takes back what the leases of earlier processes on `journal` hold,
    /// set aside or not: the process now syncing was restarted on that
    /// journal and has reported every record it held of this account, so
    /// none of theirs can still arrive. (Two live processes never share a
    /// journal: it is locked.) Each is put past its epoch, as a lapse.
    fn take_back_predecessors(&mut self, journal: &ProducerId, now: Timestamp) {
        let earlier: Vec<ProducerId> = self
            .leases()
            .iter()
            .filter(|(_, l)| l.journal.as_ref() == Some(journal))
            .map(|(id, _)| id.clone())
            .collect();
        for id in earlier {
            let Some(mut lease) = self.shared_mut().and_then(|s| s.leases.remove(&id)) else {
                continue;
            };
            if !lease.held.is_empty() || !lease.permits.is_empty() || !lease.lapsed.is_empty() {
                self.take_back(&mut lease, now);
                lease.epoch += 1;
            }
            self.put_lease(id, lease);
        }
    }

    /// Frees the concurrency slots `lease` holds.
    fn free_permits(&mut self, lease: &mut Lease, now: Timestamp) {
        for (key, p) in std::mem::take(&mut lease.permits) {
            let slots = Permits {
                slots: p.slots,
                ..Permits::default()
            };
            self.buckets.give_back(&key, slots, now);
        }
    }

    /// Keeps `lease` as `producer`'s (on a shared account: the only kind
    /// that lends).
    fn put_lease(&mut self, producer: ProducerId, lease: Lease) {
        if let Some(shared) = self.shared_mut() {
            shared.leases.insert(producer, lease);
        }
    }

    /// Forgets leases that hold nothing and lapsed longer ago than the
    /// idempotency window (their reports can no longer be retried).
    pub(crate) fn prune_leases(&mut self, catalog: &Catalog, now: Timestamp) {
        if let (Ok(horizon), Some(shared)) = (now.checked_sub(catalog.idempotency_window), self.shared_mut()) {
            shared.leases.retain(|_, l| {
                !l.held.is_empty() || !l.permits.is_empty() || !l.lapsed.is_empty() || l.expires_at > horizon
            });
        }
    }

    /// What the shared account can lend of `source` now.
    fn lendable(&self, source: &SourceRef, now: Timestamp) -> i128 {
        let open = |lot: &super::account::Lot| !lot.closed && lot.expires_at.is_none_or(|t| now < t);
        match source {
            SourceRef::Allowance { period } if self.current_period() == Some(*period) => self.allowance.available(),
            SourceRef::Pack(id) => self
                .packs
                .get(id)
                .filter(|l| open(l))
                .map_or(0, |l| l.ledger.available()),
            SourceRef::Promo(id) => self
                .promos
                .get(id)
                .filter(|l| open(l))
                .map_or(0, |l| l.ledger.available()),
            SourceRef::Paid => (self.paid.available() + self.credit_limit.picos()).max(0),
            _ => 0,
        }
    }

    /// The limits of one bucket under the account's plan and overrides.
    fn limits_of(&self, catalog: &Catalog, key: &BucketKey) -> LimitSet {
        let Some(plan) = catalog.plans.get(&self.plan) else {
            return LimitSet::default();
        };
        match key.scope {
            Scope::Account => self.overrides().account.unwrap_or(plan.limits.account),
            Scope::ApiKey => self.overrides().api_key.unwrap_or(plan.limits.api_key),
            Scope::Model => match ModelId::parse(&key.id) {
                Ok(model) => self.overrides().resolve(&plan.limits, &model)[2],
                Err(_) => LimitSet::default(),
            },
            // Budgets are lent apart (`lend`).
            Scope::KeyBudget | Scope::ProjectBudget => LimitSet::default(),
        }
    }

    /// Takes back what `lease` set aside beyond `unbacked`, per source,
    /// newest first; keeps the rest at least `until` (holds still open may
    /// have been extended).
    fn trim_lapsed(&mut self, lease: &mut Lease, unbacked: &[Take], until: Timestamp) {
        let mut keep: Vec<Take> = Vec::new();
        merge(
            &mut keep,
            unbacked.iter().map(|t| Take {
                source: lent_as(&t.source),
                amount: t.amount,
            }),
        );
        let mut back = Vec::new();
        for q in lease.lapsed.iter_mut().rev() {
            for t in &mut q.held {
                let kept = keep.iter_mut().find(|k| k.source == t.source).map_or(0, |k| {
                    let kept = k.amount.min(t.amount).max(0);
                    k.amount -= kept;
                    kept
                });
                back.push(Take {
                    source: t.source.clone(),
                    amount: t.amount - kept,
                });
                t.amount = kept;
            }
            q.held.retain(|t| t.amount != 0);
            q.until = q.until.max(until);
        }
        lease.lapsed.retain(|q| !q.held.is_empty());
        back.retain(|t| t.amount > 0);
        self.unhold(&back);
    }

    /// Charges `take`, of which `covered` came out of what a lease held
    /// (charged from the hold), the rest as [`Account::charge_unleased`].
    /// Returns the tokens no source could cover.
    fn charge_covered(&mut self, take: &Take, covered: i128, now: Timestamp) -> u64 {
        if covered > 0 {
            self.charge_held(&[Take {
                source: take.source.clone(),
                amount: covered,
            }]);
        }
        if take.amount > covered {
            self.charge_unleased(&take.source, take.amount - covered, now)
        } else {
            0
        }
    }

    /// Charges `take` as [`Account::charge_covered`] does, less `skip` of
    /// it (a repeated request's own charges): that comes off the part no
    /// lease covered first, and what a lease covered of it goes back to
    /// the source.
    fn charge_skipping(&mut self, take: &Take, covered: i128, skip: i128, now: Timestamp) -> u64 {
        let skip_uncovered = skip.min(take.amount - covered).max(0);
        let skip_covered = (skip - skip_uncovered).min(covered).max(0);
        if skip_covered > 0 {
            self.unhold(&[Take {
                source: take.source.clone(),
                amount: skip_covered,
            }]);
        }
        let charged = Take {
            source: take.source.clone(),
            amount: take.amount - skip_uncovered - skip_covered,
        };
        self.charge_covered(&charged, covered - skip_covered, now)
    }

    /// Charges `amount` of `source` that no lease holds (reported after its
    /// lease lapsed): as far as the source allows, money beyond it as debt.
    /// Returns the tokens no source could cover.
    fn charge_unleased(&mut self, source: &SourceRef, amount: i128, now: Timestamp) -> u64 {
        let covered = match source {
            SourceRef::Debt => amount,
            other => amount.min(self.lendable(other, now).max(0)),
        };
        let mut charges = vec![Take {
            source: source.clone(),
            amount: covered,
        }];
        let rest = amount - covered;
        let mut written_off = 0;
        if rest > 0 {
            if source.is_tokens() {
                written_off = u64::try_from(rest).unwrap_or(u64::MAX);
            } else {
                charges.push(Take {
                    source: SourceRef::Debt,
                    amount: rest,
                });
            }
        }
        charges.retain(|t| t.amount > 0);
        self.rebalance(&[], &[], &charges);
        written_off
    }

    /// Applies one sidecar's report, renews its lease and lends what it
    /// asks for, within [`FAIR_SHARE`] of each source (a need: what there
    /// is up to all of it, if that reaches its [`Least`]). A report already applied
    /// gets its first answer back and changes nothing.
    ///
    /// `duplicates` names the journaled records (journal, number) whose
    /// request ids the store found already recorded: each is taken as done
    /// but not applied, and its own charges are left out of the takes that
    /// carry them (what a lease held for them goes back), so a request id
    /// is charged once however many sidecars decided it.
    pub fn sync(
        &mut self,
        catalog: &Catalog,
        sync: &Sync,
        duplicates: &[(ProducerId, u64)],
        now: Timestamp,
    ) -> Result<Synced, EngineError> {
        match self.role {
            Role::Mirror(_) => return Err(EngineError::Precondition("a sidecar's mirror lends nothing".into())),
            // Shared from its first sync on.
            Role::Standalone => self.role = Role::Shared(Box::default()),
            Role::Shared(_) => {}
        }
        self.advance(catalog, now)?;
        let (mut lease, lapsed) = match self.shared_mut().and_then(|s| s.leases.remove(&sync.producer)) {
            // A mirror made anew (epoch 0: it holds nothing, as after an
            // idle mirror was dropped) is not told of a lapse; what its
            // lease still holds is taken back below.
            Some(lease) => {
                let lapsed = sync.epoch != 0 && sync.epoch != lease.epoch;
                (lease, lapsed)
            }
            // No lease: a sidecar that never had one (epoch 0: it holds
            // nothing), or one whose lease lapsed and was forgotten since
            // (`prune_leases`). Either way nothing it believes it holds is
            // backed here, so the new lease is never at its epoch.
            None => (
                Lease {
                    held: Vec::new(),
                    permits: Vec::new(),
                    expires_at: now,
                    seq: 0,
                    epoch: sync.epoch.checked_add(1).ok_or(EngineError::Overflow)?,
                    last: None,
                    lapsed: Vec::new(),
                    journal: None,
                },
                sync.epoch != 0,
            ),
        };
        if sync.seq <= lease.seq {
            let answer = lease.last.clone().filter(|_| sync.seq == lease.seq).ok_or_else(|| {
                EngineError::Precondition(format!(
                    "lease report {} of {} is older than the last one applied ({})",
                    sync.seq, sync.producer, lease.seq
                ))
            });
            self.put_lease(sync.producer.clone(), lease);
            return answer.map(|granted| Synced {
                granted,
                applied: Vec::new(),
                duplicates: Vec::new(),
            });
        }
        // Journaled records first, each once: its charges from the lease
        // that backed them while that lease lives, else as far as the
        // sources allow.
        let mut applied = Vec::new();
        let mut repeated = Vec::new();
        let mut written_off = 0u64;
        // A repeated request's own charges are not charged: they come off
        // the takes that carry them (the first record of a batch carries
        // the whole batch's), and what a lease held for them goes back.
        let mut skip: Vec<Take> = Vec::new();
        for entry in &sync.records {
            let done = self.journals().get(&entry.journal).copied().unwrap_or(0);
            if entry.seq > done && duplicates.iter().any(|(j, n)| *j == entry.journal && *n == entry.seq) {
                merge(&mut skip, entry.record.charges.iter().filter(|t| t.amount > 0).cloned());
            }
        }
        for entry in &sync.records {
            let done = self.journals().get(&entry.journal).copied().unwrap_or(0);
            if entry.seq <= done {
                continue;
            }
            for take in &entry.leased {
                let backing = if entry.producer == sync.producer {
                    Some(&mut lease)
                } else {
                    self.shared_mut().and_then(|s| s.leases.get_mut(&entry.producer))
                };
                let covered = match backing {
                    Some(l) if l.epoch == entry.epoch => take_out(&mut l.held, &take.source, take.amount),
                    Some(l) => take_lapsed(l, Some(entry.epoch), &take.source, take.amount),
                    None => 0,
                };
                let skipped = skip_of(&mut skip, take);
                written_off = written_off.saturating_add(self.charge_skipping(take, covered, skipped, now));
            }
            for take in &entry.unleased {
                let backing = if entry.producer == sync.producer {
                    Some(&mut lease)
                } else {
                    self.shared_mut().and_then(|s| s.leases.get_mut(&entry.producer))
                };
                let covered = backing.map_or(0, |l| take_lapsed(l, None, &take.source, take.amount));
                let skipped = skip_of(&mut skip, take);
                written_off = written_off.saturating_add(self.charge_skipping(take, covered, skipped, now));
            }
            if let Some(s) = self.shared_mut() {
                s.journals.insert(entry.journal.clone(), entry.seq);
            }
            if duplicates.iter().any(|(j, n)| *j == entry.journal && *n == entry.seq) {
                repeated.push(entry.clone());
            } else {
                self.burned(&entry.record, now);
                applied.push(entry.clone());
            }
        }
        if let Some(journal) = &sync.journal {
            self.take_back_predecessors(journal, now);
        }
        lease.journal = sync.journal.clone();
        if sync.epoch == 0 {
            // Nothing of it is known to the mirror now reporting.
            self.take_back(&mut lease, now);
        }
        let mut charged = Vec::new();
        merge(&mut charged, sync.charged.iter().cloned());
        // Charged from or given back to the slices of the epoch reported:
        // after a lapse, what was set aside of them.
        let of_epoch = |lease: &mut Lease, take: &Take| {
            if lapsed {
                take_lapsed(lease, Some(sync.epoch), &take.source, take.amount)
            } else {
                take_out(&mut lease.held, &take.source, take.amount)
            }
        };
        for take in &charged {
            let covered = of_epoch(&mut lease, take);
            written_off = written_off.saturating_add(self.charge_covered(take, covered, now));
        }
        let mut unleased = Vec::new();
        merge(&mut unleased, sync.unleased.iter().cloned());
        for take in &unleased {
            let covered = take_lapsed(&mut lease, None, &take.source, take.amount);
            written_off = written_off.saturating_add(self.charge_covered(take, covered, now));
        }
        if let (false, Some(unbacked)) = (lapsed, &sync.unbacked) {
            // The sidecar knows of every lapse by now: of what was set
            // aside, only what its open unbacked holds may still charge is
            // kept.
            let until = now.checked_add(catalog.hold_ttl).map_err(|_| EngineError::Overflow)?;
            self.trim_lapsed(&mut lease, unbacked, until);
        }
        let mut returned = Vec::new();
        merge(&mut returned, sync.returned.iter().cloned());
        for take in &returned {
            let back = of_epoch(&mut lease, take);
            self.unhold(&[Take {
                source: take.source.clone(),
                amount: back,
            }]);
        }
        for (key, back) in &sync.permits_back {
            // After a lapse only overruns count: the rest was taken back.
            let back = if lapsed {
                Permits {
                    tokens: back.tokens.min(0),
                    money: back.money.min(0),
                    ..Permits::default()
                }
            } else {
                *back
            };
            self.buckets.give_back(key, back, now);
            merge_permits(&mut lease.permits, key, back, -1);
        }
        let mut granted = Granted {
            takes: Vec::new(),
            permits: Vec::new(),
            expires_at: now.checked_add(sync.ttl).map_err(|_| EngineError::Overflow)?,
            epoch: lease.epoch,
            lapsed,
            written_off,
            retry_after_ms: None,
        };
        if sync.close {
            self.take_back(&mut lease, now);
        } else if !self.suspended {
            // The report above stands even if nothing can be lent (a plan
            // this sidecar's configuration lacks): it is never lost.
            let _ = self.lend(catalog, sync, &mut granted, now);
            merge(&mut lease.held, granted.takes.iter().cloned());
            for (key, p) in &granted.permits {
                merge_permits(&mut lease.permits, key, *p, 1);
            }
        }
        lease.expires_at = granted.expires_at;
        lease.seq = sync.seq;
        lease.last = Some(granted.clone());
        self.put_lease(sync.producer.clone(), lease);
        // The shared account is only ever touched by syncs and admin
        // changes: forget what no longer matters here.
        self.prune_leases(catalog, now);
        self.buckets.prune(now);
        Ok(Synced {
            granted,
            applied,
            duplicates: repeated,
        })
    }

    fn lend(
        &mut self,
        catalog: &Catalog,
        sync: &Sync,
        granted: &mut Granted,
        now: Timestamp,
    ) -> Result<(), EngineError> {
        let order = self.plan_of(catalog)?.draw_order.clone();
        let mut takes = Vec::new();
        if let Some((needed, least)) = &sync.need {
            let need = needed.as_need();
            let caps = self.capacities(&order, &need, &[], now);
            // What is here and in the mirror's slices must reach the least.
            let enough = least.as_ref().is_none_or(|least| {
                let need = least.need.as_need();
                draw::plan(&self.capacities(&order, &need, &least.has, now), &need, false).is_ok()
            });
            if let Some(planned) = enough.then(|| draw::plan(&caps, &need, true).ok()).flatten() {
                let planned: Vec<Take> = planned.into_iter().filter(|t| t.source != SourceRef::Debt).collect();
                self.rebalance(&[], &planned, &[]);
                merge(&mut takes, planned);
            }
        }
        for (source, want) in &sync.want {
            let give = (*want).min(self.lendable(source, now) / FAIR_SHARE);
            if give > 0 {
                let take = Take {
                    source: lent_as(source),
                    amount: give,
                };
                self.rebalance(&[], std::slice::from_ref(&take), &[]);
                merge(&mut takes, [take]);
            }
        }
        granted.takes = takes;
        for (key, ask) in &sync.want_permits {
            let least = sync
                .need_permits
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, p)| *p)
                .unwrap_or_default();
            if key.scope.is_budget() {
                // Only the current slot of a budget still set lends.
                let budget = self
                    .budgets
                    .as_deref()
                    .and_then(|b| b.of_bucket(key, &self.time_zone, now));
                if let Some(a) = budget {
                    let lent = self.buckets.lease_budget(&a, &self.time_zone, *ask, least, FAIR_SHARE);
                    if !lent.is_empty() {
                        granted.permits.push((key.clone(), lent));
                    }
                }
                continue;
            }
            let set = self.limits_of(catalog, key);
            let lent = self.buckets.lease(key, &set, *ask, least, now);
            if lent.requests < ask.requests || lent.tokens < ask.tokens {
                let lacking = Permits {
                    requests: ask.requests - lent.requests,
                    tokens: ask.tokens - lent.tokens,
                    ..Permits::default()
                };
                let wait = self.buckets.retry_after(key, &set, lacking, now);
                let ms = wait.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
                granted.retry_after_ms = granted.retry_after_ms.max(ms);
            }
            if !lent.is_empty() {
                granted.permits.push((key.clone(), lent));
            }
        }
        Ok(())
    }

    /// What all leases hold, by source.
    pub fn lent(&self) -> Vec<Take> {
        let mut all = Vec::new();
        for lease in self.leases().values() {
            merge(&mut all, lease.held.iter().cloned());
            for q in &lease.lapsed {
                merge(&mut all, q.held.iter().cloned());
            }
        }
        all
    }

    // ---- mirror side ----

    /// A sidecar's mirror of `shared`: its settings, plan and lots, with
    /// nothing lent yet.
    pub fn mirror_of(shared: &Account) -> Account {
        let mut mirror = Account {
            id: shared.id.clone(),
            plan: shared.plan.clone(),
            time_zone: shared.time_zone.clone(),
            anchor: shared.anchor,
            suspended: shared.suspended,
            credit_limit: Money::ZERO,
            subscription: shared.subscription.clone(),
            allowance: Default::default(),
            periods_started: shared.periods_started,
            packs: BTreeMap::new(),
            promos: BTreeMap::new(),
            paid: Default::default(),
            debt: Default::default(),
            traffic: None,
            operations: Default::default(),
            buckets: Default::default(),
            overrides: shared.overrides.clone(),
            budgets: shared.budgets.clone(),
            burn: Default::default(),
            alert_overrides: None,
            alerts_fired: Default::default(),
            alerts_made: 0,
            role: Role::Mirror(Box::default()),
        };
        mirror.buckets.set_leased();
        mirror.refresh_mirror(shared);
        mirror
    }

    /// Brings a mirror's settings, plan, period and lots up to `shared`'s.
    /// What it holds of a lot closed or a period ended there is given up.
    pub fn refresh_mirror(&mut self, shared: &Account) {
        self.plan = shared.plan.clone();
        self.time_zone = shared.time_zone.clone();
        self.anchor = shared.anchor;
        self.suspended = shared.suspended;
        self.overrides.clone_from(&shared.overrides);
        self.budgets.clone_from(&shared.budgets);
        // A new period or plan there (a mirror may be ahead at a period
        // boundary, never behind), or no subscription any more.
        let unsubscribed = shared.subscription.is_none() && self.subscription.is_some();
        if shared.periods_started > self.periods_started || unsubscribed {
            if let Some(period) = self.current_period() {
                let unused = self.allowance.available();
                self.give_up(SourceRef::Allowance { period }, unused);
            }
            self.subscription = shared.subscription.clone();
            self.periods_started = shared.periods_started;
        }
        let mut closed = Vec::new();
        for (lots, theirs, make) in [
            (&mut self.packs, &shared.packs, SourceRef::Pack as fn(_) -> SourceRef),
            (&mut self.promos, &shared.promos, SourceRef::Promo),
        ] {
            for (id, lot) in theirs {
                let mine = lots.entry(id.clone()).or_insert_with(|| super::account::Lot {
                    ledger: Default::default(),
                    ..lot.clone()
                });
                mine.expires_at = lot.expires_at;
                mine.models = lot.models.clone();
                mine.priority = lot.priority;
                if lot.closed && !mine.closed {
                    mine.closed = true;
                    closed.push((make(id.clone()), mine.ledger.available()));
                }
            }
        }
        for (source, amount) in closed {
            self.give_up(source, amount);
        }
    }

    /// Gives up `amount` of `source` (forfeited here, returned to the
    /// shared account in the next report).
    pub(crate) fn give_up(&mut self, source: SourceRef, amount: i128) {
        if amount <= 0 {
            return;
        }
        if let Some(l) = self.ledger_mut(&source) {
            l.forfeit(amount);
        }
        if let Some(log) = self.mirror_mut() {
            merge(&mut log.returned, [Take { source, amount }]);
        }
    }

    /// Adds what the shared account lent. Slices of a period this mirror
    /// has already left, or of a lot it has seen close, are given up again
    /// at once.
    pub fn accept(&mut self, granted: &Granted) {
        if granted.lapsed {
            self.forget_slices();
            let held: Vec<Take> = self.holds().flat_map(|h| h.takes.clone()).collect();
            if let Some(m) = self.mirror_mut() {
                // Charges reported since, and the open holds, lost their
                // backing with the lease.
                let charged = std::mem::take(&mut m.charged);
                merge(&mut m.unleased, charged);
                m.unbacked.clear();
                merge(
                    &mut m.unbacked,
                    held.into_iter().filter(|t| t.source != SourceRef::Debt),
                );
            }
        }
        for take in &granted.takes {
            if let Some(l) = self.ledger_mut(&take.source) {
                l.credit(take.amount);
            }
            if !self.accepts_returns(&take.source) {
                self.give_up(take.source.clone(), take.amount);
            }
        }
        for (key, permits) in &granted.permits {
            self.buckets.credit(key, *permits);
        }
        self.buckets
            .set_retry_hint(granted.retry_after_ms.map(std::time::Duration::from_millis));
        if let Some(m) = self.mirror_mut() {
            m.epoch = granted.epoch;
            m.expires_at = Some(granted.expires_at);
        }
    }

    /// The lease lapsed in the store: everything unused here is gone
    /// (taken back there already), nothing to report for it.
    fn forget_slices(&mut self) {
        for l in [&mut self.allowance, &mut self.paid]
            .into_iter()
            .chain(self.packs.values_mut().map(|l| &mut l.ledger))
            .chain(self.promos.values_mut().map(|l| &mut l.ledger))
        {
            l.forfeit_available();
        }
        if let Some(m) = self.mirror_mut() {
            m.returned.clear();
        }
        self.buckets.drop_permits();
    }

    /// Takes the next report: what was charged and given up since the last
    /// one, and permits to give back. With `funds`, every unused amount is
    /// given back too (before asking for an exact need, idle, leaving);
    /// with `permits`, every unused permit (idle, leaving).
    pub fn report(&mut self, funds: bool, permits: bool) -> Report {
        if funds {
            let mut unused = vec![(SourceRef::Paid, self.paid.available())];
            if let Some(period) = self.current_period() {
                unused.push((SourceRef::Allowance { period }, self.allowance.available()));
            }
            for (id, lot) in &self.packs {
                unused.push((SourceRef::Pack(id.clone()), lot.ledger.available()));
            }
            for (id, lot) in &self.promos {
                unused.push((SourceRef::Promo(id.clone()), lot.ledger.available()));
            }
            for (source, amount) in unused {
                self.give_up(source, amount);
            }
        }
        let permits_back = self.buckets.unused(permits);
        let mut report = Report {
            permits_back,
            ..Report::default()
        };
        if let Some(m) = self.mirror_mut() {
            report.charged = std::mem::take(&mut m.charged);
            report.unleased = std::mem::take(&mut m.unleased);
            report.returned = std::mem::take(&mut m.returned);
            report.unbacked = m.unbacked.clone();
        }
        report
    }

    /// In a mirror, books `charged` and `released` amounts of unbacked
    /// holds (see [`Mirror::unbacked`]): their charges move to the
    /// unleased log, what they give back is forfeited here and not
    /// returned. Called by `rebalance` after it logged them.
    pub(crate) fn settle_unbacked(&mut self, released: &[Take], held: &[Take], charged: &[Take]) {
        if self.mirror().is_none_or(|m| m.unbacked.is_empty()) {
            return;
        }
        let mut sources: Vec<SourceRef> = released.iter().map(|t| lent_as(&t.source)).collect();
        sources.sort();
        sources.dedup();
        for source in sources {
            let accepts = self.accepts_returns(&source);
            let sum = |takes: &[Take]| -> i128 {
                takes
                    .iter()
                    .filter(|t| lent_as(&t.source) == source)
                    .map(|t| t.amount)
                    .sum()
            };
            // What is held again (an extend re-plans its hold) stays
            // unbacked: only the net release ends any of it.
            let (freed, spent) = (sum(released) - sum(held), sum(charged));
            let Some(m) = self.mirror_mut() else {
                return;
            };
            let spent_unbacked = take_out(&mut m.unbacked, &source, spent);
            if spent_unbacked > 0 {
                take_out(&mut m.charged, &source, spent_unbacked);
                let moved = Take {
                    source: source.clone(),
                    amount: spent_unbacked,
                };
                merge(&mut m.unleased, [moved]);
            }
            let back = take_out(&mut m.unbacked, &source, (freed - spent).max(0));
            if back == 0 {
                continue;
            }
            if accepts {
                // Back to available here, but nothing backs it: gone.
                if let Some(l) = self.ledger_mut(&source) {
                    l.forfeit(back);
                }
            } else if let Some(m) = self.mirror_mut() {
                // Already forfeited and logged as returned: nothing to return.
                take_out(&mut m.returned, &source, back);
            }
        }
    }

    /// What this mirror's slices hold unused, by source (nothing once its
    /// lease expired: they may be lent to others by now).
    pub(crate) fn slices(&self, now: Timestamp) -> Vec<Take> {
        if self.slices_lapsed(now) {
            return Vec::new();
        }
        self.levels(now)
            .into_iter()
            .filter(|(_, available, _)| *available > 0)
            .map(|(source, amount, _)| Take { source, amount })
            .collect()
    }

    /// For slice sizing: per source this mirror can draw on, what it has
    /// unused and what it has consumed so far (held plus charged).
    pub fn levels(&self, now: Timestamp) -> Vec<(SourceRef, i128, i128)> {
        let used = |l: &super::account::Ledger| (l.available(), l.held() + l.charged());
        let mut out = Vec::new();
        if let Some(period) = self.current_period() {
            let (a, u) = used(&self.allowance);
            out.push((SourceRef::Allowance { period }, a, u));
        }
        for (lots, make) in [
            (&self.packs, SourceRef::Pack as fn(_) -> SourceRef),
            (&self.promos, SourceRef::Promo),
        ] {
            for (id, lot) in lots
                .iter()
                .filter(|(_, l)| !l.closed && l.expires_at.is_none_or(|t| now < t))
            {
                let (a, u) = used(&lot.ledger);
                out.push((make(id.clone()), a, u));
            }
        }
        let (a, u) = used(&self.paid);
        out.push((SourceRef::Paid, a, u));
        out
    }

    /// Fails with what to ask the shared account for.
    pub(crate) fn short(need: Option<(Needed, Option<Least>)>, permits: Lacking, least: Lacking) -> EngineError {
        EngineError::Short(Box::new(Short { need, permits, least }))
    }

    /// Whether this mirror must ask before deciding (never on a shared
    /// account, never as the last word).
    pub(crate) fn must_ask(&self) -> bool {
        self.mirror().is_some_and(|m| !m.last_word)
    }

    /// Whether this mirror's lease has expired: its slices may be lent to
    /// others by now.
    pub(crate) fn slices_lapsed(&self, now: Timestamp) -> bool {
        self.mirror().is_some_and(|m| m.expires_at.is_some_and(|t| now >= t))
    }

    /// Whether this mirror's lease is too old to decide new spending from.
    pub(crate) fn lease_stale(&self, now: Timestamp) -> bool {
        self.mirror()
            .is_some_and(|m| !m.last_word && m.decide_until.is_none_or(|t| now >= t))
    }
}
