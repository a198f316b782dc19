//! Deterministic simulation of a fleet: several sidecars, the shared store
//! and many clients in one thread, on a virtual clock, driven by one seeded
//! random number generator, with faults injected at every store call.
//!
//! The sidecars follow the Redis store's protocol (`store/leased.rs`) step
//! for step over the pure engine: a mirror per account, decisions on the
//! mirror, a sync (report, renew, borrow) when it is short, the same sync
//! resent as is while its outcome is unknown, records journaled before
//! they are acknowledged and sent with the next sync until one succeeds,
//! the journal replayed after a crash. The store keeps each shared account
//! as the JSON Redis keeps, commits whole changes, appends the records a
//! sync applies to the usage stream in the same commit, and can fail a call
//! before it commits or lose its reply after.
//!
//! Faults: store calls that fail or whose reply is lost (rates changing
//! during a run), store outages, sidecar crashes and restarts (mirrors and
//! unsent syncs lost, journals kept), leases lapsing, clock jumps across
//! lease expiries, subscription periods and price versions; operators'
//! top-ups, adjustments and pack grants and revocations retried through
//! lost replies; clients retrying calls.
//!
//! After every step, the invariants of DESIGN.md are checked against a
//! reference of what the operators credited and what was acknowledged:
//! no source below its floor in the shared account or any mirror, money
//! granted equal to what was credited, ledgers holding exactly what leases
//! and holds hold, the usage stream free of duplicates. At quiescent points
//! (every sidecar shut down and restarted, and at the end) the usage stream
//! holds every journaled record exactly once, and the shared account
//! charged, to the pico-unit, what the stream says.
//!
//! A failure names its seed; `TOLLGATE_SIM_SEED=N cargo test --test
//! simulation` replays it exactly. `TOLLGATE_SIM_SEEDS` (default 64) and
//! `TOLLGATE_SIM_STEPS` (default 400) set how much is run; see
//! docs/reliability.md.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use jiff::tz::TimeZone;
use jiff::{SignedDuration, Timestamp};
use tollgate::engine::account::Account;
use tollgate::engine::catalog::{Allowance, Catalog, ExpiryPolicy, Plan, SourceClass};
use tollgate::engine::draw::{SourceRef, Take};
use tollgate::engine::hash::Map;
use tollgate::engine::ids::{
    AccountId, LotId, ModelId, PlanId, ProducerId, RequestId, ReservationId, TierId, VersionId,
};
use tollgate::engine::lease::{Journaled, Short, Sync};
use tollgate::engine::limits::{LimitSet, ScopedLimits};
use tollgate::engine::ops::{ChargeRequest, ChargeWhat, PackGrant, Pool, ReserveRequest};
use tollgate::engine::period::{Anchor, PeriodUnit};
use tollgate::engine::pricing::{ModelPrices, PriceBook, PriceVersion, TierPrices, TokenPrices, Usage};
use tollgate::engine::{ChargeOutcome, Command, EngineError, Money, Reply, ReserveOutcome, UsageRecord};
use tollgate::store::leased::{has_news, holds_anything};

const ACCOUNTS: usize = 3;
const SIDECARS: usize = 3;
/// A lease lapses this long after its last sync (the store's default).
const TTL: SignedDuration = SignedDuration::from_secs(30);
/// Syncs one decision may ask for before deciding as the last word
/// (`leased.rs`'s `ASKS`).
const ASKS: usize = 6;
/// Seeds that once found a bug: run first, every time.
///
/// - 3, 6, 27, 57: a command refused after time charged a lapsed hold in
///   full left the hold's record in the mirror while the next report
///   carried its charges; a crash before the next command lost the record
///   (charged without a usage record). Records made by time are now
///   journaled with their charges whatever the command's fate
///   (`leased.rs`'s `on_mirror`, and `on_mirror` here).
const REGRESSIONS: &[u64] = &[3, 6, 27, 57];

// ---------------------------------------------------------------- tallies

/// What a run did, for the report in docs/reliability.md.
#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    steps: u64,
    client_calls: u64,
    client_retries: u64,
    syncs: u64,
    store_calls: u64,
    failed_before: u64,
    lost_replies: u64,
    outages: u64,
    crashes: u64,
    lapses: u64,
    clock_jumps: u64,
    period_jumps: u64,
    admin_changes: u64,
    quiescent_checks: u64,
    records: u64,
}

impl Tally {
    fn add(&mut self, o: &Tally) {
        self.steps += o.steps;
        self.client_calls += o.client_calls;
        self.client_retries += o.client_retries;
        self.syncs += o.syncs;
        self.store_calls += o.store_calls;
        self.failed_before += o.failed_before;
        self.lost_replies += o.lost_replies;
        self.outages += o.outages;
        self.crashes += o.crashes;
        self.lapses += o.lapses;
        self.clock_jumps += o.clock_jumps;
        self.period_jumps += o.period_jumps;
        self.admin_changes += o.admin_changes;
        self.quiescent_checks += o.quiescent_checks;
        self.records += o.records;
    }
}

// ---------------------------------------------------------------- the store

/// How one store call went.
enum Call<T> {
    /// Not reached, or failed before committing: nothing changed.
    Unreached,
    /// Reached; the engine refused: nothing changed.
    Refused(EngineError),
    /// Committed. With `reply_lost`, the caller never hears of it.
    Done {
        out: T,
        shared: Box<Account>,
        reply_lost: bool,
    },
}

/// Redis as the sidecars see it: each account a versioned JSON value, the
/// usage stream, and the faults.
struct Store {
    accounts: BTreeMap<AccountId, (u64, String)>,
    /// The usage stream: journaled records, in commit order.
    stream: Vec<Journaled>,
    /// Tokens the shared accounts wrote off (charged after a lapse beyond
    /// what their sources had): the ground truth, reply lost or not.
    written_off: u64,
    down: bool,
    /// Chance in a thousand that a call fails before it commits, and that
    /// a committed call's reply is lost.
    fault_permille: u32,
}

impl Store {
    fn fault(&self, rng: &mut fastrand::Rng) -> bool {
        rng.u32(0..1000) < self.fault_permille
    }

    fn read(&mut self, rng: &mut fastrand::Rng, tally: &mut Tally, id: &AccountId) -> Option<Account> {
        tally.store_calls += 1;
        if self.down || self.fault(rng) {
            tally.failed_before += u64::from(!self.down);
            return None;
        }
        let (_, json) = &self.accounts[id];
        Some(serde_json::from_str(json).expect("shared account decodes"))
    }

    /// Reads, changes and commits one account, with what the change applied
    /// for the stream.
    fn update<T>(
        &mut self,
        rng: &mut fastrand::Rng,
        tally: &mut Tally,
        id: &AccountId,
        change: impl FnOnce(&mut Account) -> Result<(T, Vec<Journaled>), EngineError>,
    ) -> Call<T> {
        let Some(mut account) = self.read(rng, tally, id) else {
            return Call::Unreached;
        };
        let (out, applied) = match change(&mut account) {
            Ok(done) => done,
            Err(e) => return Call::Refused(e),
        };
        let slot = self.accounts.get_mut(id).expect("known account");
        *slot = (
            slot.0 + 1,
            serde_json::to_string(&account).expect("shared account encodes"),
        );
        self.stream.extend(applied);
        let reply_lost = self.fault(rng);
        tally.lost_replies += u64::from(reply_lost);
        Call::Done {
            out,
            shared: Box::new(account),
            reply_lost,
        }
    }
}

// ---------------------------------------------------------------- sidecars

/// One account's state in a sidecar (`leased.rs`'s `Local`).
struct Local {
    mirror: Account,
    /// Journaled, not yet known to be applied.
    journaled: Vec<Journaled>,
    /// A sync sent whose outcome is unknown: resent as is before any other.
    pending: Option<Sync>,
}

/// A sidecar process; its journal outlives it.
struct Sidecar {
    slot: usize,
    incarnation: u32,
    producer: ProducerId,
    up: bool,
    seq: u64,
    mirrors: BTreeMap<AccountId, Local>,
    /// The journal on disk: its id (kept across restarts, as
    /// `journal-id` in the journal's directory), entries not yet known to
    /// be applied, the next number.
    journal_id: ProducerId,
    journal: Vec<Journaled>,
    journal_next: u64,
    /// Entries read back at start, waiting for their account's mirror.
    replay: Vec<Journaled>,
}

/// Why a sidecar's call failed.
#[derive(Debug)]
enum Failed {
    /// UNAVAILABLE.
    Unavailable,
    /// The engine's answer.
    Engine(String),
}

impl Sidecar {
    fn new(slot: usize) -> Sidecar {
        Sidecar {
            slot,
            incarnation: 0,
            producer: ProducerId::parse(&format!("s{slot}.0")).unwrap(),
            up: true,
            seq: 0,
            mirrors: BTreeMap::new(),
            journal_id: ProducerId::parse(&format!("j{slot}")).unwrap(),
            journal: Vec::new(),
            journal_next: 1,
            replay: Vec::new(),
        }
    }

    /// SIGKILL: everything in memory is gone; the journal stays.
    fn crash(&mut self) {
        self.up = false;
        self.mirrors.clear();
        self.replay.clear();
    }

    /// A new process on the same journal.
    fn restart(&mut self) {
        self.incarnation += 1;
        self.producer = ProducerId::parse(&format!("s{}.{}", self.slot, self.incarnation)).unwrap();
        self.up = true;
        self.seq = 0;
        self.mirrors.clear();
        self.replay = self.journal.clone();
    }
}

// ---------------------------------------------------------------- the world

/// Record identity: each request is charged at most once.
type RecordId = (AccountId, RequestId);

fn identity(r: &UsageRecord) -> RecordId {
    (r.account_id.clone(), r.request_id.clone())
}

/// A client call, kept to be retried.
#[derive(Clone, Debug)]
struct ClientCall {
    sidecar: usize,
    account: AccountId,
    command: Command,
}

struct World {
    rng: fastrand::Rng,
    now: Timestamp,
    catalog: Catalog,
    store: Store,
    sidecars: Vec<Sidecar>,
    accounts: Vec<AccountId>,
    credit_limits: Vec<Money>,
    /// Money the operators credited, per account (the reference).
    credited: BTreeMap<AccountId, i128>,
    /// Every record journaled (and so acknowledged, or charged by time).
    produced: BTreeMap<RecordId, Arc<UsageRecord>>,
    /// Open reservations: sidecar, incarnation, account, id.
    open: Vec<(usize, u32, AccountId, ReservationId)>,
    next_id: u64,
    tally: Tally,
    /// A digest of every outcome: the same seed gives the same digest.
    digest: u64,
}

fn fnv(digest: u64, bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .fold(digest, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}

fn prices(input: i128, output: i128) -> TokenPrices {
    let m = Money::from_picos;
    TokenPrices {
        input: m(input),
        cached_input: m(input / 2),
        cache_write: m(input),
        output: m(output),
    }
}

/// Two price versions (the second in force a day and a half in), three
/// plans: pay-as-you-go with rate and concurrency limits, a daily
/// subscription, and promo-then-paid.
fn catalog(start: Timestamp, charge_in_full: bool) -> Catalog {
    let version = |id: &str, effective_at: Timestamp, scale: i128| {
        let model = |weight_milli| {
            let tiers = Map::from_iter([(
                TierId::default_tier(),
                TierPrices {
                    base: prices(100 * scale, 400 * scale),
                    context_tiers: vec![],
                },
            )]);
            ModelPrices { weight_milli, tiers }
        };
        PriceVersion {
            id: VersionId::parse(id).unwrap(),
            effective_at,
            models: Map::from_iter([
                (ModelId::parse("m").unwrap(), model(1000)),
                (ModelId::parse("w").unwrap(), model(1500)),
            ]),
            windows: vec![],
        }
    };
    let limited = ScopedLimits {
        account: LimitSet {
            requests_per_minute: 600,
            tokens_per_minute: 2_000_000,
            concurrent_requests: 8,
            ..LimitSet::default()
        },
        ..ScopedLimits::default()
    };
    let plan = |id: &str, allowance: Option<Allowance>, order: &[SourceClass], limits: ScopedLimits| Plan {
        id: PlanId::parse(id).unwrap(),
        allowance,
        draw_order: order.to_vec(),
        allowed_models: None,
        limits,
        on_store_outage: Default::default(),
    };
    let daily = Allowance {
        tokens: 20_000,
        period: PeriodUnit::Day,
        anchor: Anchor::Anniversary,
        rollover_cap: 5_000,
    };
    let plans = [
        plan("payg", None, &SourceClass::DEFAULT_ORDER, limited),
        plan("pro", Some(daily), &SourceClass::DEFAULT_ORDER, ScopedLimits::default()),
        plan(
            "cash",
            None,
            &[SourceClass::Promo, SourceClass::Paid],
            ScopedLimits::default(),
        ),
    ];
    let v2 = start + SignedDuration::from_hours(36);
    Catalog {
        plans: plans.into_iter().map(|p| (p.id.clone(), p)).collect(),
        prices: PriceBook::new(vec![
            version("v1", "2026-01-01T00:00:00Z".parse().unwrap(), 1),
            version("v2", v2, 3),
        ])
        .unwrap(),
        hold_ttl: SignedDuration::from_secs(20),
        on_expiry: if charge_in_full {
            ExpiryPolicy::ChargeInFull
        } else {
            ExpiryPolicy::Release
        },
        idempotency_window: SignedDuration::from_secs(3600),
        recent_usage: 5,
    }
}

impl World {
    fn new(seed: u64) -> World {
        let mut rng = fastrand::Rng::with_seed(seed);
        let now: Timestamp = "2026-03-29T00:30:00Z".parse().unwrap();
        let catalog = catalog(now, rng.bool());
        let plans = ["payg", "pro", "cash"];
        let credit_limits = vec![
            Money::from_picos(2_000_000_000),
            Money::ZERO,
            Money::from_picos(500_000_000),
        ];
        let mut store = Store {
            accounts: BTreeMap::new(),
            stream: Vec::new(),
            written_off: 0,
            down: false,
            fault_permille: 0,
        };
        let mut accounts = Vec::new();
        let mut credited = BTreeMap::new();
        for (i, plan) in plans.iter().enumerate() {
            let id = AccountId::parse(&format!("a{i}")).unwrap();
            let plan = &catalog.plans[&PlanId::parse(plan).unwrap()];
            let tz = TimeZone::get("Europe/Paris").unwrap();
            let account = Account::open(id.clone(), plan, tz, None, credit_limits[i], now).unwrap();
            store
                .accounts
                .insert(id.clone(), (1, serde_json::to_string(&account).unwrap()));
            credited.insert(id.clone(), 0);
            accounts.push(id);
        }
        let mut world = World {
            rng,
            now,
            catalog,
            store,
            sidecars: (0..SIDECARS).map(Sidecar::new).collect(),
            accounts,
            credit_limits,
            credited,
            produced: BTreeMap::new(),
            open: Vec::new(),
            next_id: 0,
            tally: Tally::default(),
            digest: 0xcbf2_9ce4_8422_2325,
        };
        // Opening balances, as an operator would give them.
        for i in 0..ACCOUNTS {
            let account = world.accounts[i].clone();
            world.admin(
                &account,
                Command::TopUp {
                    operation_id: LotId::parse("opening").unwrap(),
                    pool: Pool::Paid,
                    amount: Money::from_picos(3_000_000_000),
                },
            );
        }
        world
    }

    fn note(&mut self, what: impl std::fmt::Debug) {
        self.digest = fnv(self.digest, format!("{what:?}").as_bytes());
    }

    fn fresh(&mut self, prefix: &str) -> String {
        self.next_id += 1;
        format!("{prefix}{}", self.next_id)
    }

    // ---- the sidecar protocol (leased.rs) ----

    /// Makes sure sidecar `s` has a mirror of `id`, with the journal
    /// entries it replays for it.
    fn ensure_mirror(&mut self, s: usize, id: &AccountId) -> Result<(), Failed> {
        if self.sidecars[s].mirrors.contains_key(id) {
            return Ok(());
        }
        let shared = self
            .store
            .read(&mut self.rng, &mut self.tally, id)
            .ok_or(Failed::Unavailable)?;
        let sidecar = &mut self.sidecars[s];
        let (mut mine, others): (Vec<_>, Vec<_>) = std::mem::take(&mut sidecar.replay)
            .into_iter()
            .partition(|e| e.record.account_id == *id);
        sidecar.replay = others;
        mine.sort_by(|a, b| (&a.journal, a.seq).cmp(&(&b.journal, b.seq)));
        sidecar.mirrors.insert(
            id.clone(),
            Local {
                mirror: Account::mirror_of(&shared),
                journaled: mine,
                pending: None,
            },
        );
        Ok(())
    }

    /// Runs `command` on the mirror and journals its records (`on_mirror`,
    /// `entries_of`, `journal_records`).
    fn on_mirror(
        &mut self,
        s: usize,
        id: &AccountId,
        command: &Command,
        last_word: bool,
    ) -> Result<Reply, EngineError> {
        let sidecar = &mut self.sidecars[s];
        let local = sidecar.mirrors.get_mut(id).expect("mirror ensured");
        if let (true, Some(m)) = (last_word, local.mirror.mirror.as_mut()) {
            m.last_word = true;
        }
        let result = local.mirror.apply(&self.catalog, command.clone(), self.now);
        if let Some(m) = local.mirror.mirror.as_mut() {
            m.last_word = false;
        }
        // Records time made while the command ran (a lapsed hold charged in
        // full) are journaled even if the command itself was refused: the
        // charges logged with them go out with the next report.
        let records = local.mirror.take_records();
        self.journal(s, id, &records);
        result
    }

    /// Journals `records`, just produced on `s`'s mirror of `id`, with the
    /// charges logged meanwhile on the first.
    fn journal(&mut self, s: usize, id: &AccountId, records: &[Arc<UsageRecord>]) {
        if records.is_empty() {
            return;
        }
        let sidecar = &mut self.sidecars[s];
        let local = sidecar.mirrors.get_mut(id).expect("mirror ensured");
        let m = local.mirror.mirror.as_mut().expect("a mirror");
        let mut entries: Vec<Journaled> = records
            .iter()
            .map(|record| {
                let seq = sidecar.journal_next;
                sidecar.journal_next += 1;
                Journaled {
                    journal: sidecar.journal_id.clone(),
                    seq,
                    record: (**record).clone(),
                    leased: Vec::new(),
                    unleased: Vec::new(),
                    producer: sidecar.producer.clone(),
                    epoch: m.epoch,
                }
            })
            .collect();
        entries[0].leased = std::mem::take(&mut m.charged);
        entries[0].unleased = std::mem::take(&mut m.unleased);
        for entry in &entries {
            let key = identity(&entry.record);
            assert!(
                !self.produced.contains_key(&key),
                "exactly once: {key:?} journaled twice"
            );
            self.produced.insert(key, Arc::new(entry.record.clone()));
            self.tally.records += 1;
        }
        sidecar.journal.extend(entries.iter().cloned());
        local.journaled.extend(entries);
    }

    /// Reports, renews and borrows (`leased.rs`'s `sync`): the pending sync
    /// first, then a new one.
    fn sync(&mut self, s: usize, id: &AccountId, short: Option<Short>, all: bool, close: bool) -> Result<(), Failed> {
        if let Some(pending) = self.sidecars[s].mirrors.get(id).and_then(|l| l.pending.clone()) {
            self.send(s, id, pending)?;
        }
        let want_paid = self.rng.bool().then(|| self.rng.i128(1..200_000_000));
        let sidecar = &mut self.sidecars[s];
        let Some(local) = sidecar.mirrors.get_mut(id) else {
            return Ok(());
        };
        let report = local.mirror.report(all || close, all || close);
        let short = short.unwrap_or(Short {
            need: None,
            permits: Vec::new(),
        });
        sidecar.seq += 1;
        let sync = Sync {
            producer: sidecar.producer.clone(),
            seq: sidecar.seq,
            epoch: local.mirror.mirror.as_ref().map_or(0, |m| m.epoch),
            charged: report.charged,
            unleased: report.unleased,
            returned: report.returned,
            unbacked: Some(report.unbacked),
            permits_back: report.permits_back,
            records: local.journaled.clone(),
            want: match want_paid {
                Some(amount) if !(all || close) => vec![(SourceRef::Paid, amount)],
                _ => Vec::new(),
            },
            need: short.need,
            want_permits: short.permits,
            ttl: TTL,
            close,
        };
        local.pending = Some(sync.clone());
        self.send(s, id, sync)
    }

    /// Sends one sync (`leased.rs`'s `send`): kept pending while its outcome
    /// is unknown; on an answer, the records it carried leave the journal
    /// and the mirror takes what was lent.
    fn send(&mut self, s: usize, id: &AccountId, sync: Sync) -> Result<(), Failed> {
        self.tally.syncs += 1;
        let catalog = &self.catalog;
        let now = self.now;
        let mut first_time_written_off = 0;
        let call = self.store.update(&mut self.rng, &mut self.tally, id, |account| {
            let fresh = account.leases.get(&sync.producer).is_none_or(|l| sync.seq > l.seq);
            let synced = account.sync(catalog, &sync, &[], now)?;
            if fresh {
                first_time_written_off = synced.granted.written_off;
            }
            Ok((synced.granted, synced.applied))
        });
        let (granted, shared) = match call {
            Call::Unreached => return Err(Failed::Unavailable),
            Call::Done { reply_lost: true, .. } => {
                self.store.written_off += first_time_written_off;
                return Err(Failed::Unavailable);
            }
            Call::Done { out, shared, .. } => {
                self.store.written_off += first_time_written_off;
                (out, shared)
            }
            Call::Refused(e) => {
                if let Some(local) = self.sidecars[s].mirrors.get_mut(id) {
                    local.pending = None;
                }
                return Err(Failed::Engine(e.to_string()));
            }
        };
        self.note(("granted", &granted));
        self.tally.lapses += u64::from(granted.lapsed);
        let sidecar = &mut self.sidecars[s];
        let sent: BTreeSet<(&ProducerId, u64)> = sync.records.iter().map(|e| (&e.journal, e.seq)).collect();
        sidecar.journal.retain(|e| !sent.contains(&(&e.journal, e.seq)));
        let Some(local) = sidecar.mirrors.get_mut(id) else {
            return Ok(());
        };
        local.pending = None;
        local.journaled.retain(|e| !sent.contains(&(&e.journal, e.seq)));
        local.mirror.refresh_mirror(&shared);
        local.mirror.accept(&granted);
        if let Some(m) = local.mirror.mirror.as_mut() {
            m.decide_until = granted.expires_at.checked_sub(TTL / 3).ok();
            m.overdraft = 0;
        }
        Ok(())
    }

    /// One decision (`leased.rs`'s `decide` and `decide_on_mirror`), with
    /// the failure policy of every plan here: closed.
    fn decide(&mut self, s: usize, id: &AccountId, command: &Command) -> Result<Reply, Failed> {
        if !self.sidecars[s].up {
            return Err(Failed::Unavailable);
        }
        self.ensure_mirror(s, id)?;
        for _ in 0..ASKS {
            let short = match self.on_mirror(s, id, command, false) {
                Err(EngineError::Short(short)) => *short,
                other => return other.map_err(|e| Failed::Engine(e.to_string())),
            };
            match self.sync(s, id, Some(short), false, false) {
                Ok(()) => {}
                Err(Failed::Unavailable) => {
                    if matches!(command, Command::Reserve(_) | Command::Charge(_)) {
                        return Err(Failed::Unavailable);
                    }
                    return self
                        .on_mirror(s, id, command, true)
                        .map_err(|e| Failed::Engine(e.to_string()));
                }
                Err(e) => return Err(e),
            }
        }
        self.on_mirror(s, id, command, true)
            .map_err(|e| Failed::Engine(e.to_string()))
    }

    /// Upkeep of one sidecar (`leased.rs`'s `tend`): replay placed, every
    /// mirror reported and renewed, or given back when idle.
    fn tend(&mut self, s: usize) {
        if !self.sidecars[s].up {
            return;
        }
        let waiting: BTreeSet<AccountId> = self.sidecars[s]
            .replay
            .iter()
            .map(|e| e.record.account_id.clone())
            .collect();
        for id in waiting {
            let _ = self.ensure_mirror(s, &id);
        }
        let ids: Vec<AccountId> = self.sidecars[s].mirrors.keys().cloned().collect();
        for id in ids {
            // What leased.rs's `tend` looks at: news to report, or
            // something held.
            let local = &self.sidecars[s].mirrors[&id];
            if !has_news(&local.mirror, &local.journaled) && !holds_anything(&local.mirror) {
                continue;
            }
            let give_back = self.rng.u32(0..4) == 0;
            let done = self.sync(s, &id, None, give_back, false);
            self.note(("tend", s, &id, format!("{done:?}")));
        }
    }

    /// The sweeper on one sidecar: time acts on every mirror.
    fn sweep(&mut self, s: usize) {
        let ids: Vec<AccountId> = self.sidecars[s].mirrors.keys().cloned().collect();
        for id in ids {
            let local = self.sidecars[s].mirrors.get_mut(&id).unwrap();
            local.mirror.advance(&self.catalog, self.now).unwrap();
            let records = local.mirror.take_records();
            self.journal(s, &id, &records);
        }
    }

    /// Graceful shutdown (`leased.rs`'s `close`): every lease reported and
    /// ended, retried through faults (the store is up).
    fn shut_down(&mut self, s: usize) {
        let ids: Vec<AccountId> = self.sidecars[s].mirrors.keys().cloned().collect();
        for id in ids {
            let mut tries = 0;
            while self.sync(s, &id, None, true, true).is_err() {
                tries += 1;
                assert!(tries < 200, "a close never got through");
            }
        }
        self.sidecars[s].crash();
    }

    /// An operator's change, retried with the same id until answered.
    /// The reference credits it once if the account took it.
    fn admin(&mut self, id: &AccountId, command: Command) {
        for _ in 0..200 {
            let (catalog, now) = (&self.catalog, self.now);
            let call = self.store.update(&mut self.rng, &mut self.tally, id, |account| {
                Ok((account.apply(catalog, command.clone(), now)?, Vec::new()))
            });
            let shared = match call {
                Call::Unreached | Call::Done { reply_lost: true, .. } => continue,
                Call::Refused(e) => {
                    self.note(("admin refused", &command, e.to_string()));
                    return;
                }
                Call::Done { shared, .. } => shared,
            };
            self.note(("admin", &command));
            self.tally.admin_changes += 1;
            if let Command::TopUp { amount, .. } | Command::Adjust { amount, .. } = &command {
                *self.credited.get_mut(id).unwrap() += amount.picos();
            }
            // Announced: every mirror of it refreshes.
            for sidecar in &mut self.sidecars {
                if let Some(local) = sidecar.mirrors.get_mut(id) {
                    local.mirror.refresh_mirror(&shared);
                }
            }
            return;
        }
        panic!("an operator's change never got through");
    }
}

// ---------------------------------------------------------------- steps

impl World {
    /// One random step.
    fn step(&mut self) {
        match self.rng.u32(0..1000) {
            0..600 => self.client(),
            600..700 => {
                let s = self.rng.usize(0..SIDECARS);
                self.tend(s);
            }
            700..730 => {
                let s = self.rng.usize(0..SIDECARS);
                self.sweep(s);
            }
            730..830 => self.now += SignedDuration::from_millis(self.rng.i64(0..3000)),
            830..850 => {
                // Past every lease's expiry.
                self.tally.clock_jumps += 1;
                self.now += SignedDuration::from_secs(self.rng.i64(31..120));
            }
            850..855 => {
                // Past a subscription period, and in time the next price version.
                self.tally.period_jumps += 1;
                self.now += SignedDuration::from_hours(self.rng.i64(20..30));
            }
            855..870 => {
                let s = self.rng.usize(0..SIDECARS);
                if self.sidecars[s].up {
                    self.tally.crashes += 1;
                    self.sidecars[s].crash();
                }
            }
            870..900 => {
                let s = self.rng.usize(0..SIDECARS);
                if !self.sidecars[s].up {
                    self.sidecars[s].restart();
                }
            }
            900..915 => {
                self.store.down = !self.store.down;
                self.tally.outages += u64::from(self.store.down);
            }
            915..925 => self.store.fault_permille = [0, 20, 100, 300][self.rng.usize(0..4)],
            925..985 => self.operator(),
            _ => self.quiesce(),
        }
        self.note(("now", self.now));
    }

    /// A client's call to a sidecar, sometimes retried at once.
    fn client(&mut self) {
        self.open
            .retain(|(s, inc, ..)| self.sidecars[*s].up && self.sidecars[*s].incarnation == *inc);
        let opened = (!self.open.is_empty()).then(|| self.open[self.rng.usize(0..self.open.len())].clone());
        let call = match (self.rng.u32(0..10), opened) {
            (0..=3, _) | (4..=7, None) => {
                let request_id = RequestId::parse(&self.fresh("r")).unwrap();
                let input = self.rng.u64(0..4000);
                ClientCall {
                    sidecar: self.rng.usize(0..SIDECARS),
                    account: self.accounts[self.rng.usize(0..ACCOUNTS)].clone(),
                    command: Command::Reserve(ReserveRequest {
                        request_id,
                        api_key_id: None,
                        model: ModelId::parse(if self.rng.bool() { "w" } else { "m" }).unwrap(),
                        tier: TierId::default_tier(),
                        input_tokens: input,
                        cached_input_tokens: input / 3,
                        max_output_tokens: self.rng.u64(1..4000),
                    }),
                }
            }
            (4, Some((s, _, account, reservation))) => ClientCall {
                sidecar: s,
                account,
                command: Command::Extend {
                    reservation,
                    max_output_tokens: self.rng.u64(1..8000),
                },
            },
            (5 | 6, Some((s, _, account, reservation))) => ClientCall {
                sidecar: s,
                account,
                command: Command::Settle {
                    reservation,
                    usage: Usage {
                        input_tokens: self.rng.u64(0..4000),
                        cached_input_tokens: self.rng.u64(0..50),
                        cache_write_tokens: self.rng.u64(0..20),
                        output_tokens: self.rng.u64(0..5000),
                    },
                },
            },
            (7, Some((s, _, account, reservation))) => ClientCall {
                sidecar: s,
                account,
                command: Command::Release(reservation),
            },
            _ => {
                let request_id = RequestId::parse(&self.fresh("c")).unwrap();
                let what = if self.rng.bool() {
                    ChargeWhat::Money(Money::from_picos(self.rng.i128(1..3_000_000)))
                } else {
                    ChargeWhat::Usage(Usage {
                        input_tokens: self.rng.u64(0..2000),
                        output_tokens: self.rng.u64(0..2000),
                        ..Default::default()
                    })
                };
                ClientCall {
                    sidecar: self.rng.usize(0..SIDECARS),
                    account: self.accounts[self.rng.usize(0..ACCOUNTS)].clone(),
                    command: Command::Charge(ChargeRequest {
                        request_id,
                        api_key_id: None,
                        model: Some(ModelId::parse("m").unwrap()),
                        tier: TierId::default_tier(),
                        what,
                    }),
                }
            }
        };
        self.tally.client_calls += 1;
        let result = self.decide(call.sidecar, &call.account, &call.command);
        self.note(("call", &call.command, format!("{result:?}")));
        match (&call.command, &result) {
            (Command::Reserve(_), Ok(Reply::Reserve(ReserveOutcome::Allowed(r)))) => {
                let inc = self.sidecars[call.sidecar].incarnation;
                self.open
                    .push((call.sidecar, inc, call.account.clone(), r.reservation_id.clone()));
            }
            (Command::Settle { reservation, .. } | Command::Release(reservation), _)
                if !matches!(result, Err(Failed::Unavailable)) =>
            {
                self.open.retain(|(.., r)| r != reservation);
            }
            _ => {}
        }
        // A client that never heard the answer sends the same call again:
        // the same answer, nothing charged twice.
        if let (Ok(first), true) = (&result, self.rng.u32(0..8) == 0) {
            self.tally.client_retries += 1;
            let records = self.tally.records;
            match self.decide(call.sidecar, &call.account, &call.command) {
                // An extend asks for a level, not an increment: asked again,
                // it may reach more of it, never less.
                Ok(Reply::Extend(again)) => {
                    let Reply::Extend(first) = first else { unreachable!() };
                    assert!(again.granted_output_tokens >= first.granted_output_tokens);
                }
                Ok(again) => assert_eq!(
                    format!("{first:?}"),
                    format!("{again:?}"),
                    "a retried {:?} answered differently",
                    call.command
                ),
                Err(Failed::Unavailable) => {}
                Err(Failed::Engine(e)) => panic!("a retried {:?} failed: {e} after {first:?}", call.command),
            }
            assert_eq!(records, self.tally.records, "a retry produced records");
        }
        if let Ok(Reply::Charge(ChargeOutcome::Denied(..)) | Reply::Reserve(ReserveOutcome::Denied { .. })) = &result {
            self.note("denied");
        }
    }

    /// An operator's change: a top-up, an adjustment, a promo, a pack
    /// granted or revoked.
    fn operator(&mut self) {
        if self.store.down {
            return;
        }
        let account = self.accounts[self.rng.usize(0..ACCOUNTS)].clone();
        let id = LotId::parse(&self.fresh("op")).unwrap();
        let command = match self.rng.u32(0..5) {
            0 => Command::TopUp {
                operation_id: id,
                pool: Pool::Paid,
                amount: Money::from_picos(self.rng.i128(1..30_000_000)),
            },
            1 => Command::TopUp {
                operation_id: id,
                pool: Pool::Promo {
                    expires_at: Some(self.now + SignedDuration::from_secs(self.rng.i64(60..600))),
                    priority: 0,
                },
                amount: Money::from_picos(self.rng.i128(1..10_000_000)),
            },
            2 => Command::Adjust {
                operation_id: id,
                amount: Money::from_picos(self.rng.i128(-5_000_000..5_000_000)),
            },
            3 => Command::GrantPack(PackGrant {
                pack_id: LotId::parse(&format!("pack{}", self.rng.u32(0..4))).unwrap(),
                tokens: self.rng.u64(1..20_000),
                expires_at: self.now + SignedDuration::from_secs(self.rng.i64(60..3600)),
                models: self
                    .rng
                    .bool()
                    .then(|| std::iter::once(ModelId::parse("w").unwrap()).collect()),
                priority: self.rng.i32(0..2),
            }),
            _ => Command::RevokePack(LotId::parse(&format!("pack{}", self.rng.u32(0..4))).unwrap()),
        };
        self.admin(&account, command);
    }

    /// A quiescent point: the store back, every sidecar started, its
    /// journal replayed, shut down gracefully and started again; then
    /// everything must add up.
    fn quiesce(&mut self) {
        self.store.down = false;
        for s in 0..SIDECARS {
            if !self.sidecars[s].up {
                self.sidecars[s].restart();
            }
            // The upkeep alone delivers every journaled record (bounded
            // staleness), replayed ones included.
            let mut tries = 0;
            while !self.sidecars[s].replay.is_empty() || !self.sidecars[s].journal.is_empty() {
                self.tend(s);
                tries += 1;
                assert!(
                    tries < 200,
                    "sidecar {s}'s upkeep never delivered {:?}",
                    self.sidecars[s].journal
                );
            }
            self.shut_down(s);
            self.sidecars[s].restart();
            assert!(
                self.sidecars[s].journal.is_empty(),
                "sidecar {s} still journals {:?} after a clean shutdown",
                self.sidecars[s].journal
            );
        }
        // Leases of crashed processes lapse at their expiry; what they held
        // is taken back a hold TTL later, by the next sync on the account.
        self.now += TTL + self.catalog.hold_ttl + SignedDuration::from_secs(1);
        for id in self.accounts.clone() {
            let mut tries = 0;
            while self.ensure_mirror(0, &id).is_err() || self.sync(0, &id, None, true, true).is_err() {
                tries += 1;
                assert!(tries < 200, "a sync never got through");
            }
        }
        self.sidecars[0].crash();
        self.sidecars[0].restart();
        self.open.clear();
        self.tally.quiescent_checks += 1;
        self.check_quiescent();
    }

    // ---- invariants ----

    fn shared(&self, id: &AccountId) -> Account {
        serde_json::from_str(&self.store.accounts[id].1).unwrap()
    }

    /// After every step.
    fn check(&self) {
        for (i, id) in self.accounts.iter().enumerate() {
            let a = self.shared(id);
            check_floors(&a, self.credit_limits[i].picos(), "shared");
            assert_eq!(a.holds().count(), 0, "the shared account holds nothing itself");
            let (held_tokens, held_money) = per_unit(a.lent().iter());
            let (ledger_tokens, ledger_money) = ledgers_held(&a);
            assert_eq!(ledger_tokens, held_tokens, "{id}: tokens held vs lent");
            assert_eq!(ledger_money, held_money, "{id}: money held vs lent");
            assert_eq!(
                money_ledgers(&a).map(|l| l.granted).sum::<i128>(),
                self.credited[id],
                "{id}: money granted vs what the operators credited"
            );
        }
        for sidecar in self.sidecars.iter().filter(|s| s.up) {
            for local in sidecar.mirrors.values() {
                let m = &local.mirror;
                check_floors(m, 0, "mirror");
                let (hold_tokens, hold_money) = per_unit(m.holds().flat_map(|h| &h.takes));
                assert_eq!(ledgers_held(m), (hold_tokens, hold_money), "mirror held vs its holds");
            }
        }
        let mut seen = BTreeSet::new();
        for entry in &self.store.stream {
            let key = identity(&entry.record);
            assert!(seen.insert(key.clone()), "exactly once: {key:?} twice in the stream");
            assert_eq!(
                self.produced.get(&key).map(|r| &**r),
                Some(&entry.record),
                "a record in the stream nobody journaled"
            );
        }
    }

    /// At a quiescent point: everything journaled is in the stream once,
    /// nothing is lent, and the shared accounts charged what it says.
    fn check_quiescent(&self) {
        let streamed: BTreeSet<RecordId> = self.store.stream.iter().map(|e| identity(&e.record)).collect();
        let produced: BTreeSet<RecordId> = self.produced.keys().cloned().collect();
        let lost: Vec<_> = produced.difference(&streamed).collect();
        assert!(lost.is_empty(), "journaled records missing from the stream: {lost:?}");
        let mut written_off = i128::from(self.store.written_off);
        for id in &self.accounts {
            let a = self.shared(id);
            assert!(
                a.lent().is_empty(),
                "{id}: still lent after every sidecar left: {:?}",
                a.lent()
            );
            let records = self.store.stream.iter().filter(|e| e.record.account_id == *id);
            let (tokens, money) = per_unit(records.flat_map(|e| &e.record.charges));
            let charged_money: i128 = money_ledgers(&a).map(|l| l.charged).sum();
            assert_eq!(charged_money, money, "{id}: money charged vs the usage stream");
            let charged_tokens: i128 = token_ledgers(&a).map(|l| l.charged).sum();
            // Write-offs are per account in truth; the store counts them all.
            let off = (tokens - charged_tokens).min(written_off);
            written_off -= off;
            assert_eq!(charged_tokens + off, tokens, "{id}: tokens charged vs the usage stream");
        }
        assert_eq!(written_off, 0, "tokens written off that no record explains");
    }
}

fn money_ledgers(a: &Account) -> impl Iterator<Item = tollgate::engine::Ledger> + '_ {
    a.promos.values().map(|l| l.ledger).chain([a.paid, a.debt])
}

fn token_ledgers(a: &Account) -> impl Iterator<Item = tollgate::engine::Ledger> + '_ {
    a.packs.values().map(|l| l.ledger).chain([a.allowance])
}

/// Held by an account's ledgers: (tokens, money).
fn ledgers_held(a: &Account) -> (i128, i128) {
    (
        token_ledgers(a).map(|l| l.held).sum(),
        money_ledgers(a).map(|l| l.held).sum(),
    )
}

/// Amounts by unit: (tokens, money).
fn per_unit<'a>(takes: impl Iterator<Item = &'a Take>) -> (i128, i128) {
    takes.fold((0, 0), |(t, m), take| {
        if take.source.is_tokens() {
            (t + take.amount, m)
        } else {
            (t, m + take.amount)
        }
    })
}

/// No source below its floor (invariant 2).
fn check_floors(a: &Account, credit: i128, what: &str) {
    let lots = || a.packs.values().chain(a.promos.values()).map(|l| &l.ledger);
    for l in lots().chain([&a.allowance, &a.paid, &a.debt]) {
        assert!(
            l.held >= 0 && l.charged >= 0 && l.forfeited >= 0,
            "{what} {}: {l:?}",
            a.id
        );
    }
    for l in lots().chain([&a.allowance]) {
        assert!(l.available() >= 0, "{what} {}: a source below zero: {l:?}", a.id);
    }
    assert!(
        a.paid.available() >= -credit,
        "{what} {}: paid below minus the credit limit: {:?}",
        a.id,
        a.paid
    );
    assert!(
        a.debt.available() <= 0,
        "{what} {}: debt below zero: {:?}",
        a.id,
        a.debt
    );
}

// ---------------------------------------------------------------- runs

thread_local! {
    static STEP: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Runs one seed: its tally and digest, or the failure with the seed and
/// step that replay it.
fn run(seed: u64, steps: u64) -> Result<(Tally, u64), String> {
    std::panic::catch_unwind(AssertUnwindSafe(|| {
        let mut world = World::new(seed);
        for step in 0..steps {
            STEP.with(|s| s.set(step));
            world.step();
            world.tally.steps += 1;
            world.check();
        }
        STEP.with(|s| s.set(steps));
        world.quiesce();
        (world.tally, world.digest)
    }))
    .map_err(|panic| {
        let message = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .unwrap_or_default();
        let step = STEP.with(|s| s.get());
        format!("seed {seed} failed at step {step}: {message}\n  replay: TOLLGATE_SIM_SEED={seed} cargo test --test simulation")
    })
}

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().map_or(default, |v| {
        v.parse()
            .unwrap_or_else(|_| panic!("{name} must be a number, not {v:?}"))
    })
}

#[test]
fn random_fleets_keep_every_invariant_through_faults() {
    let steps = env("TOLLGATE_SIM_STEPS", 400);
    let seeds: Vec<u64> = match std::env::var("TOLLGATE_SIM_SEED") {
        Ok(seed) => vec![seed.parse().expect("TOLLGATE_SIM_SEED is a number")],
        Err(_) => {
            let first = env("TOLLGATE_SIM_FIRST_SEED", 0);
            REGRESSIONS
                .iter()
                .copied()
                .chain(first..first + env("TOLLGATE_SIM_SEEDS", 64))
                .collect()
        }
    };
    let started = std::time::Instant::now();
    let mut total = Tally::default();
    let mut failures = Vec::new();
    for &seed in &seeds {
        match run(seed, steps) {
            Ok((tally, _)) => total.add(&tally),
            Err(failure) => failures.push(failure),
        }
    }
    eprintln!(
        "simulation: {} seeds x {steps} steps in {:.1?}: {total:#?}",
        seeds.len(),
        started.elapsed()
    );
    assert!(
        failures.is_empty(),
        "{} seeds failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    if seeds.len() >= 16 {
        // The faults were injected, not just configured.
        for (kind, count) in [
            ("lost replies", total.lost_replies),
            ("failed calls", total.failed_before),
            ("crashes", total.crashes),
            ("outages", total.outages),
            ("lease lapses", total.lapses),
            ("period jumps", total.period_jumps),
            ("quiescent checks", total.quiescent_checks),
            ("client retries", total.client_retries),
        ] {
            assert!(count > 0, "no {kind} in {} seeds", seeds.len());
        }
    }
}

#[test]
fn the_same_seed_replays_exactly() {
    let first = run(7, 300).unwrap();
    let again = run(7, 300).unwrap();
    assert_eq!(first.1, again.1, "the same seed took another path");
    assert_eq!(format!("{:?}", first.0), format!("{:?}", again.0));
    let other = run(8, 300).unwrap();
    assert_ne!(first.1, other.1, "another seed took the same path");
}
