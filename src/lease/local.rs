//! One account as a sidecar keeps it: the mirror, the records on their way
//! to the shared account, the sync in flight, and the rates that size the
//! next slices.

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use std::time::Duration;

use jiff::{SignedDuration, Timestamp};

use super::rates::Rates;
use super::{LeaseSettings, Numbering};
use crate::engine::account::ANSWERS_KEPT;
use crate::engine::catalog::OutagePolicy;
use crate::engine::ids::{ProducerId, RequestId, ReservationId};
use crate::engine::role::{Granted, Journaled, Short, Sync};
use crate::engine::{Account, Catalog, ChargeOutcome, Command, EngineError, Reply, ReserveOutcome, UsageRecord};

/// Usage records, as the mirror hands them out.
pub type Records = Vec<Arc<UsageRecord>>;

/// What a sync is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// Report, renew, refill (and borrow a decision's shortfall).
    Renew,
    /// Report and give back everything unused (idle, or before a balance
    /// is read).
    GiveBack,
    /// Report, give back everything and end the lease (shutdown).
    Close,
}

/// What one account's upkeep needs this round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upkeep {
    /// Report and give back everything unused (idle).
    GiveBack,
    /// Report, renew, refill.
    Renew,
    /// Read the shared account again (an announcement arrived).
    Refresh,
    /// Nothing held, nothing to report, no request id to remember for
    /// retries: the mirror can go.
    Forget,
}

/// One account's mirror and what the sidecar knows around it.
#[derive(Debug)]
pub struct Local {
    mirror: Account,
    last_used: Timestamp,
    /// The last two decisions that drew (reserves and charges), the latest
    /// first: an account drawn on twice within the idle return is in use.
    draws: [Option<Timestamp>; 2],
    last_sync: Timestamp,
    rates: Rates,
    /// An announcement arrived: read the shared state again.
    stale: bool,
    /// Debt owed by this mirror when the current outage began.
    outage_base: Option<i128>,
    /// Journaled records of this account not yet applied to the shared
    /// account, in (journal, number) order.
    journaled: Vec<Journaled>,
    /// Entries the journal could not number (a failing disk), with the
    /// charges they carry: numbered before any later entry, and kept out
    /// of reports until then.
    unnumbered: Vec<Journaled>,
    /// Numbers of this account's records on their way to the journal: a
    /// sync sends only records numbered below all of them, so the shared
    /// account sees each journal's records in order.
    appending: BTreeSet<u64>,
    /// Records time made while a command was refused (a lapsed hold
    /// charged in full): journaled with their charges at once, handed to
    /// the caller with the next command's.
    untold: Vec<Arc<UsageRecord>>,
    /// A sync sent whose outcome is unknown: sent again as is (same
    /// number) before any other, so it is applied exactly once.
    pending: Option<Sync>,
    /// Requests this mirror decided whose records the store found repeated
    /// (another sidecar, or this one before a restart, recorded them
    /// first), and when: calls on them are answered from the store while
    /// the mirror still keeps its own answer.
    superseded: Vec<(RequestId, Timestamp)>,
}

/// How long a request found repeated at commit is answered from the store
/// rather than from the mirror's own answer (which it keeps for
/// [`ANSWERS_KEPT`] after the request closed, before its record's sync).
const SUPERSEDED_KEPT: SignedDuration = SignedDuration::from_secs(2 * ANSWERS_KEPT.as_secs());

impl Local {
    /// A mirror of `shared`, made at `now`, with the journaled records of
    /// the account a restart found (`replayed`, any order).
    pub fn new(shared: &Account, mut replayed: Vec<Journaled>, now: Timestamp) -> Local {
        replayed.sort_by(|a, b| (&a.journal, a.seq).cmp(&(&b.journal, b.seq)));
        Local {
            mirror: Account::mirror_of(shared),
            last_used: now,
            draws: [None, None],
            last_sync: now,
            rates: Rates::new(now),
            stale: false,
            outage_base: None,
            journaled: replayed,
            unnumbered: Vec::new(),
            appending: BTreeSet::new(),
            untold: Vec::new(),
            pending: None,
            superseded: Vec::new(),
        }
    }

    /// The mirror.
    pub fn mirror(&self) -> &Account {
        &self.mirror
    }

    /// Journaled records not yet known to be applied.
    pub fn journaled(&self) -> &[Journaled] {
        &self.journaled
    }

    /// The record journaled here for `reservation`, not yet applied to the
    /// shared account: a restarted sidecar replays it, and answers a
    /// retried settle or release with it.
    pub fn journaled_record(&self, reservation: &ReservationId) -> Option<&UsageRecord> {
        self.journaled
            .iter()
            .map(|e| &e.record)
            .chain(self.unnumbered.iter().map(|e| &e.record))
            .find(|r| r.reservation_id.as_ref() == Some(reservation))
    }

    /// Whether a record of `request` made here waits to be committed.
    pub fn uncommitted(&self, request: &RequestId) -> bool {
        self.journaled
            .iter()
            .chain(&self.unnumbered)
            .any(|e| e.record.request_id == *request)
    }

    /// Whether any request decided here was found recorded already.
    pub fn has_superseded(&self) -> bool {
        !self.superseded.is_empty()
    }

    /// Whether `request` was decided here and found recorded already by
    /// the store (see [`Local::synced`]): its answer is the store's.
    pub fn superseded(&self, request: &RequestId, now: Timestamp) -> bool {
        self.superseded
            .iter()
            .any(|(r, at)| r == request && now.duration_since(*at) < SUPERSEDED_KEPT)
    }

    /// The sync whose outcome is unknown, if any.
    pub fn pending(&self) -> Option<&Sync> {
        self.pending.as_ref()
    }

    // ---- decisions ----

    /// Runs `command` on the mirror at `now`: as the last word, with an
    /// outage overdraft, if `last_word` is given. Returns the answer and
    /// every record the mirror made meanwhile (time's as well: a lapsed
    /// hold charged in full), which must be journaled whatever the answer.
    pub fn run(
        &mut self,
        catalog: &Catalog,
        command: &Command,
        now: Timestamp,
        last_word: Option<i128>,
    ) -> (Result<Reply, EngineError>, Vec<Arc<UsageRecord>>) {
        if let (Some(overdraft), Some(m)) = (last_word, self.mirror.mirror_mut()) {
            m.last_word = true;
            m.overdraft = m.overdraft.max(overdraft);
        }
        let result = self.mirror.apply(catalog, command.clone(), now);
        if let Some(m) = self.mirror.mirror_mut() {
            m.last_word = false;
        }
        self.last_used = now;
        let drew = match (&result, command) {
            (Ok(Reply::Reserve(ReserveOutcome::Allowed(r))), Command::Reserve(req)) => {
                self.rates
                    .admitted(req.input_tokens + req.cached_input_tokens + r.granted_output_tokens);
                true
            }
            (Ok(Reply::Charge(ChargeOutcome::Charged(_))), Command::Charge(_)) => true,
            _ => false,
        };
        if drew {
            self.draws = [Some(now), self.draws[0]];
        }
        (result, self.mirror.take_records())
    }

    /// Brings the mirror up to `now` (lapsed holds, expiries, resets),
    /// forgetting what the idempotency window no longer needs with
    /// `prune`. Returns the records this made (to journal) and the
    /// records to hand to the sink now: those, and those refused commands
    /// left untold.
    pub fn sweep(
        &mut self,
        catalog: &Catalog,
        now: Timestamp,
        prune: bool,
    ) -> (Result<(), EngineError>, Records, Records) {
        let advanced = self.mirror.advance(catalog, now);
        if prune {
            self.mirror.prune(catalog, now);
        }
        let made = self.mirror.take_records();
        let mut told = std::mem::take(&mut self.untold);
        told.extend(made.iter().cloned());
        (advanced, made, told)
    }

    /// The journal entries of `records`, just made on this mirror, numbered
    /// by `journal`, with the charges logged meanwhile on the first (they
    /// are applied together), after those the journal could not number
    /// before. None without a journal. If the journal cannot number them,
    /// they wait here with their charges, and the error says why.
    pub fn entries(
        &mut self,
        records: &[Arc<UsageRecord>],
        journal: Option<&mut dyn Numbering>,
        producer: &ProducerId,
    ) -> Result<Vec<Journaled>, String> {
        let (Some(journal), Some(m)) = (journal, self.mirror.mirror_mut()) else {
            return Ok(Vec::new());
        };
        if records.is_empty() && self.unnumbered.is_empty() {
            return Ok(Vec::new());
        }
        let mut fresh: Vec<Journaled> = records
            .iter()
            .map(|record| Journaled {
                journal: journal.id().clone(),
                seq: 0,
                record: (**record).clone(),
                leased: Vec::new(),
                unleased: Vec::new(),
                producer: producer.clone(),
                epoch: m.epoch,
            })
            .collect();
        if let Some(first) = fresh.first_mut() {
            first.leased = std::mem::take(&mut m.charged);
            first.unleased = std::mem::take(&mut m.unleased);
        }
        let mut entries = std::mem::take(&mut self.unnumbered);
        entries.append(&mut fresh);
        if let Err(e) = journal.number(&mut entries) {
            self.unnumbered = entries;
            return Err(e);
        }
        self.appending.extend(entries.iter().map(|e| e.seq));
        Ok(entries)
    }

    /// Before the last report (the sidecar is leaving): the records that
    /// wait for the journal are numbered now (`Ok`: the entries to write,
    /// sent with the report even if the write fails), or, if the journal
    /// still refuses, dropped with their charges (`Err`: the records, for
    /// the caller to log), as a crash would drop them: no call that made
    /// them was acknowledged, and what their lease held for them comes back
    /// with the closing report.
    pub fn before_close(
        &mut self,
        journal: Option<&mut dyn Numbering>,
        producer: &ProducerId,
    ) -> Result<Vec<Journaled>, Vec<Journaled>> {
        if self.unnumbered.is_empty() {
            return Ok(Vec::new());
        }
        self.entries(&[], journal, producer)
            .map_err(|_| std::mem::take(&mut self.unnumbered))
    }

    /// `entries` reached the journal (or failed to: they are kept in
    /// memory either way, and sent with the next sync).
    pub fn appended(&mut self, entries: Vec<Journaled>) {
        for entry in &entries {
            self.appending.remove(&entry.seq);
        }
        // Kept in (journal, number) order: each goes where it belongs
        // (almost always at the end), never a sort of the whole list.
        for entry in entries {
            let at = self
                .journaled
                .partition_point(|e| (&e.journal, e.seq) <= (&entry.journal, entry.seq));
            self.journaled.insert(at, entry);
        }
    }

    /// The records to hand the caller with an answer: those refused
    /// commands left untold first, then `records`.
    pub fn told(&mut self, records: Vec<Arc<UsageRecord>>) -> Vec<Arc<UsageRecord>> {
        let mut all = std::mem::take(&mut self.untold);
        all.extend(records);
        all
    }

    /// Records made while a command was refused, journaled now: handed to
    /// the caller with the next command's.
    pub fn untold(&mut self, records: Vec<Arc<UsageRecord>>) {
        self.untold.extend(records);
    }

    /// The overdraft a reserve or charge the lease cannot cover may run
    /// with while the store is unreachable, under `policy`: none when the
    /// plan fails closed.
    pub fn outage_overdraft(&mut self, policy: OutagePolicy) -> Option<i128> {
        let owed = -self.mirror.debt.available();
        let base = *self.outage_base.get_or_insert(owed);
        match policy {
            OutagePolicy::Closed => None,
            OutagePolicy::Open => Some(i128::MAX / 4),
            OutagePolicy::Allowance(m) => Some(base + m.picos()),
        }
    }

    // ---- syncs ----

    /// The next sync, numbered `seq` by `producer`, now pending: with a
    /// decision's `short`fall, borrows it (or what there is of it) on top
    /// of what the mirror holds; sends every journaled record of journals
    /// other than `own`, and of `own` those numbered below any still on
    /// their way to it.
    // One argument per part of the sync that comes from outside the mirror.
    #[allow(clippy::too_many_arguments)]
    pub fn next_sync(
        &mut self,
        producer: &ProducerId,
        seq: u64,
        own: Option<&ProducerId>,
        short: Option<Short>,
        purpose: Purpose,
        settings: &LeaseSettings,
        now: Timestamp,
    ) -> Sync {
        let all = purpose != Purpose::Renew;
        let close = purpose == Purpose::Close;
        let report = self.mirror.report(all, all);
        // Ahead of need only while in use (see `upkeep`).
        let want = if all || self.idle(settings.idle_return, now) {
            Vec::new()
        } else {
            self.rates.wants(&self.mirror, settings.horizon, now)
        };
        let short = short.unwrap_or(Short {
            need: None,
            permits: Vec::new(),
            least: Vec::new(),
        });
        let below = self.appending.first().copied().unwrap_or(u64::MAX);
        let need_permits = short.need_permits();
        let sync = Sync {
            producer: producer.clone(),
            seq,
            epoch: self.mirror.mirror().map_or(0, |m| m.epoch),
            charged: report.charged,
            unleased: report.unleased,
            returned: report.returned,
            // Records on their way to the journal may carry charges of
            // unbacked holds that are no longer in the report.
            unbacked: (self.appending.is_empty() && self.unnumbered.is_empty()).then_some(report.unbacked),
            permits_back: report.permits_back,
            records: self
                .journaled
                .iter()
                .filter(|e| Some(&e.journal) != own || e.seq < below)
                .cloned()
                .collect(),
            want,
            need: short.need,
            need_permits,
            want_permits: self.rates.permits(short.permits, settings.horizon),
            ttl: settings.ttl(),
            close,
            // Every record earlier processes left in the journal for this
            // account was placed with the mirror when it was made.
            journal: own.cloned(),
        };
        self.pending = Some(sync.clone());
        sync
    }

    /// The store applied `sync` (now or before: a retry) and answered
    /// `granted`, leaving the shared account as `shared`: the records it
    /// carried are applied (those `repeated` of requests recorded already,
    /// whose answer is now the store's), the mirror takes what was lent.
    pub fn synced(
        &mut self,
        sync: &Sync,
        (shared, repeated): (&Account, &[Journaled]),
        granted: &Granted,
        settings: &LeaseSettings,
        now: Timestamp,
    ) {
        self.superseded
            .retain(|(_, at)| now.duration_since(*at) < SUPERSEDED_KEPT);
        self.superseded
            .extend(repeated.iter().map(|e| (e.record.request_id.clone(), now)));
        if self.pending.as_ref().is_some_and(|p| p.seq == sync.seq) {
            self.pending = None;
        }
        if !sync.records.is_empty() {
            let sent: HashSet<(&ProducerId, u64)> = sync.records.iter().map(|e| (&e.journal, e.seq)).collect();
            self.journaled.retain(|e| !sent.contains(&(&e.journal, e.seq)));
        }
        self.mirror.refresh_mirror(shared);
        self.mirror.accept(granted);
        let margin = settings.ttl() / 3;
        let skew = settings
            .max_clock_skew
            .and_then(|d| SignedDuration::try_from(d).ok())
            .unwrap_or_default();
        if let Some(m) = self.mirror.mirror_mut() {
            m.decide_until = granted.expires_at.checked_sub(margin).ok();
            // Another sidecar's clock may be ahead of this one's by as much.
            m.expires_at = granted.expires_at.checked_sub(skew).ok();
            m.overdraft = 0;
        }
        self.outage_base = None;
        self.last_sync = now;
        self.stale = false;
    }

    /// The store refused the pending sync for good: it is dropped.
    pub fn refused(&mut self) {
        self.pending = None;
    }

    // ---- the shared account ----

    /// Takes the settings, plan and lots of `shared`, just read or written.
    pub fn refresh(&mut self, shared: &Account) {
        self.mirror.refresh_mirror(shared);
    }

    /// Takes `shared`, read again after an announcement.
    pub fn refreshed(&mut self, shared: &Account) {
        self.refresh(shared);
        self.stale = false;
    }

    /// An announcement arrived: the shared account changed.
    pub fn mark_stale(&mut self) {
        self.stale = true;
    }

    // ---- upkeep ----

    /// What the upkeep should do for this account at `now` (measuring its
    /// rates on the way).
    pub fn upkeep(&mut self, settings: &LeaseSettings, now: Timestamp) -> Option<Upkeep> {
        self.rates.measure(&self.mirror, now);
        let since_use = elapsed(self.last_used, now);
        let since_sync = elapsed(self.last_sync, now);
        let holds = holds_anything(&self.mirror);
        // Unnumbered records carry charges: their lease is kept alive.
        let news = has_news(&self.mirror, &self.journaled) || !self.unnumbered.is_empty();
        let idle = since_use >= settings.idle_return;
        // Ahead of need only while in use, drawn on twice within the idle
        // return: a rate measured while busy decays towards zero but never
        // reaches it, and asking on it kept an idle account lending and
        // returning a unit forever; and one decision's burn asked for a
        // slice nothing would use (most of many tenants' accounts are
        // decided on once in a while).
        let busy = self.draws[1].is_some_and(|before| elapsed(before, now) < settings.idle_return);
        let refill = busy
            && since_sync >= settings.report_interval / 4
            && !self.rates.wants(&self.mirror, settings.horizon, now).is_empty();
        // A report of an account that is not busy gives back what is left:
        // less than its next decision will need, or it would not have
        // borrowed its need exactly.
        let reported_long_ago = since_sync >= settings.report_interval;
        if reported_long_ago && ((idle && holds_unused(&self.mirror)) || (news && !busy)) {
            Some(Upkeep::GiveBack)
        } else if (news && reported_long_ago) || (holds && since_sync >= settings.ttl / 6) || refill {
            Some(Upkeep::Renew)
        } else if self.stale {
            Some(Upkeep::Refresh)
        } else if idle && self.forgettable() {
            Some(Upkeep::Forget)
        } else {
            None
        }
    }

    /// Nothing held, nothing to report or on its way, no sync in flight,
    /// no request id to remember for retries.
    pub fn forgettable(&self) -> bool {
        !holds_anything(&self.mirror)
            && !has_news(&self.mirror, &self.journaled)
            && self.journaled.is_empty()
            && self.appending.is_empty()
            && self.unnumbered.is_empty()
            && self.untold.is_empty()
            && self.pending.is_none()
            && self.mirror.traffic().requests.is_empty()
            && self.mirror.traffic().reservations.is_empty()
    }

    /// Unused for `idle` by `now`.
    pub fn idle(&self, idle: Duration, now: Timestamp) -> bool {
        elapsed(self.last_used, now) >= idle
    }
}

/// From `since` to `now`, none if the clock stepped back.
fn elapsed(since: Timestamp, now: Timestamp) -> Duration {
    Duration::try_from(now.duration_since(since)).unwrap_or_default()
}

/// This mirror has something to report: charges or returns logged, or
/// journaled records (their charges with them), which go out with the next
/// report whether or not the mirror holds anything.
pub fn has_news(mirror: &Account, journaled: &[Journaled]) -> bool {
    mirror
        .mirror()
        .is_some_and(|m| !m.charged.is_empty() || !m.returned.is_empty() || !m.unleased.is_empty())
        || !journaled.is_empty()
}

/// This mirror holds something: lent slices or permits, or open holds
/// (the upkeep keeps its lease alive).
pub fn holds_anything(mirror: &Account) -> bool {
    holds_unused(mirror) || !mirror.traffic().expiries.is_empty()
}

/// This mirror holds lent slices or permits that nothing uses.
fn holds_unused(mirror: &Account) -> bool {
    mirror.allowance.available() > 0
        || mirror.paid.available() > 0
        || mirror
            .packs
            .values()
            .chain(mirror.promos.values())
            .any(|l| l.ledger.available() > 0)
        || mirror.buckets.holds_permits()
}
