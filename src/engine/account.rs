//! One account's state: its sources with their ledgers, open and closed
//! reservations, remembered request ids, limit buckets and pending records.
//!
//! Every source keeps a [`Ledger`] whose identity
//! `granted = available + held + charged + forfeited` holds by construction;
//! the property tests check that the totals also agree with every credit
//! made and every usage record emitted (invariant 1, conservation).
//!
//! Why one file: the account's state and the invariants of its ledgers are
//! one type; the operations on it live in `ops.rs` and `lease.rs`.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::hash::BuildHasher;
use std::sync::{Arc, LazyLock};

use jiff::tz::TimeZone;
use jiff::{SignedDuration, Timestamp};

use super::budget::{Applying, Budgets, Counting};
use super::burn::Burn;
use super::catalog::AlertSettings;
use super::catalog::{Catalog, ExpiryPolicy, Plan};
use super::error::EngineError;
use super::hash::{Map, Set};
use super::ids::{
    AccountId, ApiKeyId, LotId, ModelId, PlanId, ProducerId, RequestId, ReservationId, TierId, VersionId,
};
use super::limits::{BucketKey, Buckets, LimitOverrides};
use super::money::Money;
use super::period::{Anchor, Schedule, Window};
use super::pricing::Usage;
use super::record::{RecordKind, UsageRecord};
use super::role::{Lease, Mirror, Role, Shared};
use super::source::{SourceRef, Take};

/// The running totals of one source or lot, in its unit (weighted tokens
/// or pico-units).
///
/// The figures are private: they change only through the operations
/// below, each of which keeps `granted = available + held + charged +
/// forfeited` (`available` is derived, so the identity holds by
/// construction) and names the one movement it makes. Nothing outside
/// the engine's account module can set a figure:
///
/// ```compile_fail
/// let mut paid = tollgate::engine::Ledger::default();
/// paid.charged += 1; // private: `charge` is the way, and it keeps the books
/// ```
///
/// Figures at zero are left out of its JSON form.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct Ledger {
    #[serde(skip_serializing_if = "super::is_default")]
    granted: i128,
    #[serde(skip_serializing_if = "super::is_default")]
    held: i128,
    #[serde(skip_serializing_if = "super::is_default")]
    charged: i128,
    #[serde(skip_serializing_if = "super::is_default")]
    forfeited: i128,
}

impl Ledger {
    /// A ledger credited `amount` and nothing else.
    pub fn credited(amount: i128) -> Ledger {
        Ledger {
            granted: amount,
            ..Ledger::default()
        }
    }

    /// Everything credited (top-ups, grants, allowance periods, repayments).
    pub fn granted(&self) -> i128 {
        self.granted
    }

    /// Held by open reservations (or lent to sidecars).
    pub fn held(&self) -> i128 {
        self.held
    }

    /// Charged to settled requests.
    pub fn charged(&self) -> i128 {
        self.charged
    }

    /// Lost to expiry, revocation or period reset.
    pub fn forfeited(&self) -> i128 {
        self.forfeited
    }

    /// What is left: `granted - held - charged - forfeited`.
    pub fn available(&self) -> i128 {
        self.granted - self.held - self.charged - self.forfeited
    }

    /// Credits `amount` (a debit when negative): it becomes available.
    pub fn credit(&mut self, amount: i128) {
        self.granted += amount;
    }

    /// This ledger credited `amount`, or `None` past the range.
    pub fn checked_credit(&self, amount: i128) -> Option<Ledger> {
        Some(Ledger {
            granted: self.granted.checked_add(amount)?,
            ..*self
        })
    }

    /// Holds `amount` of what is available.
    pub fn hold(&mut self, amount: i128) {
        self.held += amount;
    }

    /// Stops holding `amount`: it is available again (or charged, or
    /// forfeited, by the operation that follows).
    pub fn release(&mut self, amount: i128) {
        self.held -= amount;
    }

    /// Charges `amount`.
    pub fn charge(&mut self, amount: i128) {
        self.charged += amount;
    }

    /// Gives back `amount` charged earlier: it is available again.
    pub fn refund(&mut self, amount: i128) {
        self.charged -= amount;
    }

    /// Forfeits `amount` (of what is available, or of what a release just
    /// freed).
    pub fn forfeit(&mut self, amount: i128) {
        self.forfeited += amount;
    }

    /// Forfeits everything available.
    pub fn forfeit_available(&mut self) {
        self.forfeited += self.available();
    }
}

/// A pack or a promotional money grant.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Lot {
    /// Its ledger.
    pub ledger: Ledger,
    /// When it expires (exclusive: at this instant it is gone).
    pub expires_at: Option<Timestamp>,
    /// Models it applies to; `None` for all.
    #[serde(default, skip_serializing_if = "super::is_default")]
    pub models: Option<Set<ModelId>>,
    /// Higher drawn first; ties go to the earlier expiry.
    #[serde(default, skip_serializing_if = "super::is_default")]
    pub priority: i32,
    /// Expired or revoked: what was available is forfeited, holds on it may
    /// still be charged, what they return is forfeited too.
    #[serde(default, skip_serializing_if = "super::is_default")]
    pub closed: bool,
}

impl Lot {
    /// Usable for new draws for `model` at `now`.
    pub fn usable(&self, model: Option<&ModelId>, now: Timestamp) -> bool {
        !self.closed
            && self.expires_at.is_none_or(|t| now < t)
            && match (&self.models, model) {
                (None, _) => true,
                (Some(set), Some(m)) => set.contains(m),
                (Some(_), None) => false,
            }
    }
}

/// The subscription whose allowance is granted each period.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Subscription {
    /// How periods are cut.
    pub schedule: Schedule,
    /// The current period.
    pub window: Window,
    /// Tokens granted each period.
    pub tokens: u64,
    /// Most unused tokens carried into the next period.
    pub rollover_cap: u64,
    /// What is left of the rollover cap since the last period ended, for
    /// the ended period's tokens that holds and leases give back later.
    #[serde(default)]
    pub carry_room: i128,
}

/// An open reservation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hold {
    /// The request that made it.
    pub request_id: RequestId,
    /// The API key named.
    pub api_key_id: Option<ApiKeyId>,
    /// The model.
    pub model: ModelId,
    /// The service tier.
    pub tier: TierId,
    /// The price version in force at reserve.
    pub version: VersionId,
    /// When it was reserved (prices and windows are read at this instant).
    pub reserved_at: Timestamp,
    /// Prompt tokens as reserved.
    pub prompt: Usage,
    /// Output tokens granted.
    pub granted_output: u64,
    /// What is held, by source.
    pub takes: Vec<Take>,
    /// When it lapses.
    pub expires_at: Timestamp,
    /// The limit buckets it was admitted to (and holds a concurrency slot of).
    pub buckets: Vec<BucketKey>,
    /// Those of them whose tokens-per-minute limit counted its tokens: only
    /// these are corrected at settle, so a limit set after the reserve never
    /// refunds tokens it never took.
    pub token_buckets: Vec<BucketKey>,
    /// Tokens it was admitted for in tokens-per-minute limits (and counted
    /// in token budgets).
    pub admitted_tokens: u64,
    /// The budgets it counted in, as they applied when it was admitted,
    /// and the money it counted; `None` when none applied (most holds: a
    /// pointer, nothing allocated).
    pub budgets: Option<Box<Counting>>,
}

impl Hold {
    /// The budgets it counts in.
    pub fn budgets(&self) -> &[Applying] {
        self.budgets.as_deref().map_or(&[], |b| &b.applying)
    }

    /// The money it counts in money budgets: what its takes hold.
    pub fn counted_money(&self) -> i128 {
        self.budgets.as_deref().map_or(0, |b| b.money)
    }

    /// Worst-case usage: the prompt plus the whole grant.
    pub fn worst_case(&self) -> Usage {
        Usage {
            output_tokens: self.granted_output,
            ..self.prompt
        }
    }
}

/// A reservation, open or closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reservation {
    /// Holding funds.
    Open(Hold),
    /// Settled; the record is returned to identical retries.
    Settled {
        /// The usage that was settled.
        usage: Usage,
        /// The record emitted.
        record: Arc<UsageRecord>,
        /// When.
        closed_at: Timestamp,
    },
    /// Released without charge.
    Released {
        /// What was returned.
        released: Vec<Take>,
        /// When.
        closed_at: Timestamp,
    },
    /// Lapsed at its TTL.
    Expired {
        /// When.
        closed_at: Timestamp,
        /// Whether it was charged in full (with a record) rather than
        /// released.
        charged: bool,
    },
}

impl Reservation {
    /// Whether closing it made a usage record (a settle, or a lapse
    /// charged in full).
    pub fn made_record(&self) -> bool {
        matches!(
            self,
            Reservation::Settled { .. } | Reservation::Expired { charged: true, .. }
        )
    }

    /// When it was closed; `None` while it is open.
    pub fn closed_at(&self) -> Option<Timestamp> {
        match self {
            Reservation::Open(_) => None,
            Reservation::Settled { closed_at, .. }
            | Reservation::Released { closed_at, .. }
            | Reservation::Expired { closed_at, .. } => Some(*closed_at),
        }
    }
}

/// What a request id was used for, kept for idempotent replays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Remembered {
    /// This reserve made this reservation.
    Reserved {
        /// The reservation.
        reservation: ReservationId,
        /// The request (to tell a retry from a reuse with other content)
        /// and the first answer (returned to retries), in one allocation.
        first: Box<(super::request::ReserveRequest, super::request::Reserved)>,
    },
    /// This one-shot charge made this record.
    Charged {
        /// The request, to tell a retry from a reuse with other content.
        request: Box<super::request::ChargeRequest>,
        /// The record emitted.
        record: Arc<UsageRecord>,
        /// When.
        at: Timestamp,
    },
}

/// Admin operation ids applied, with their content fingerprints, sorted by
/// id: a few per account, so a sorted vector (one small allocation) rather
/// than a tree (a node of room for eleven).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct Operations(Vec<(String, String)>);

impl Operations {
    /// The fingerprint recorded for `key`.
    pub fn get(&self, key: &str) -> Option<&String> {
        self.0
            .binary_search_by(|(k, _)| k.as_str().cmp(key))
            .ok()
            .map(|i| &self.0[i].1)
    }

    /// Records `key` with `fingerprint` (replacing any earlier one).
    pub fn insert(&mut self, key: String, fingerprint: String) {
        match self.0.binary_search_by(|(k, _)| k.as_str().cmp(&key)) {
            Ok(i) => self.0[i].1 = fingerprint,
            Err(i) => self.0.insert(i, (key, fingerprint)),
        }
    }

    /// How many.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// None yet.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// What one process remembers of an account's requests: state that lives
/// in one process only (never serialized) and that an idle account does
/// not need.
#[derive(Debug, Clone, Default)]
pub struct Traffic {
    /// Reservations by id, open and recently closed.
    pub reservations: Map<ReservationId, Reservation>,
    /// Open holds by expiry: lapsing holds and listing them never scans the
    /// closed reservations kept for idempotent replays.
    pub expiries: BTreeSet<(Timestamp, ReservationId)>,
    /// Request ids seen, for idempotency, with their answers (for
    /// [`ANSWERS_KEPT`] after they are closed).
    pub requests: Map<RequestId, Remembered>,
    /// Request ids whose answers were let go, for the rest of the
    /// idempotency window.
    pub spent: Spent,
    /// The latest usage records, newest last.
    pub recent: VecDeque<Arc<UsageRecord>>,
    /// Records produced but not yet taken by the store for the usage sink.
    pub outbox: Vec<Arc<UsageRecord>>,
}

impl Traffic {
    /// When the request `remembered` stands for closed; `None` while its
    /// hold is open.
    fn closed_at(&self, remembered: &Remembered) -> Option<Timestamp> {
        match remembered {
            Remembered::Reserved { reservation, .. } => self.reservations.get(reservation)?.closed_at(),
            Remembered::Charged { at, .. } => Some(*at),
        }
    }

    /// Nothing remembered.
    pub fn is_empty(&self) -> bool {
        self.reservations.is_empty()
            && self.expiries.is_empty()
            && self.requests.is_empty()
            && self.spent.is_empty()
            && self.recent.is_empty()
            && self.outbox.is_empty()
    }
}

/// How long a request's answer is kept after the request is closed (a
/// charge made, a reservation settled, released or lapsed), for retries to
/// get it again; then only a 64-bit fingerprint of its id is kept
/// ([`Spent`]), for the rest of the idempotency window. Retries come within
/// seconds; a day of full answers at 1,000 requests a second would take
/// tens of gigabytes.
pub const ANSWERS_KEPT: SignedDuration = SignedDuration::from_secs(60);

/// Closed requests an account keeps the full answers of at most (about
/// 760 bytes each): past it, the oldest are let go early, down to half of
/// it ([`Account::bound_answers`]), so a flood of cheap calls cannot hold
/// [`ANSWERS_KEPT`] worth of answers (at 13,000 calls a second, over half
/// a gigabyte). Their ids stay remembered ([`Spent`]): a retry is refused,
/// never decided again.
pub const MAX_ANSWERS: usize = 4_096;

/// Holds one account may have open in one process: each keeps its request
/// and answer until it is settled, released or lapses (`holds.ttl_seconds`),
/// so without a cap a caller that never settles would hold memory for a
/// TTL's worth of reserves. Far above the concurrency of one model server;
/// a reserve beyond it is refused (`RESOURCE_EXHAUSTED`).
pub const MAX_OPEN_HOLDS: usize = 16_384;

/// Request ids whose answers were let go, in time slots of a quarter of the
/// idempotency window: a slot goes whole once the window has passed over
/// its end, so no set is ever pruned entry by entry (which would leave it
/// full of tombstones and double it). A 64-bit fingerprint an id, about 16
/// bytes with the sets' room: an hour's window at 1,000 requests a second
/// takes tens of megabytes, not gigabytes. A retry of one is refused with
/// a clear error; it is never decided (and charged) again.
#[derive(Debug, Clone, Default)]
pub struct Spent {
    /// Oldest first: the slot's number and length in seconds, and the
    /// fingerprints of the request ids closed in it.
    slots: VecDeque<(i64, i64, Set<u64>)>,
}

/// Fingerprints are keyed by a seed drawn once per process: a caller cannot
/// choose ids that collide.
static SEED: LazyLock<foldhash::fast::RandomState> = LazyLock::new(foldhash::fast::RandomState::default);

impl Spent {
    /// Remembers `id`, closed `at` (having made a usage record or not), in
    /// slots `slot` long.
    pub fn insert(&mut self, id: &str, at: Timestamp, slot: SignedDuration, made_record: bool) {
        let key = Spent::key(id, made_record);
        let length = slot.as_secs().max(1);
        let number = at.as_second().div_euclid(length);
        match self.slots.back_mut() {
            // Closed a little before the newest slot began: kept with it, a
            // little longer.
            Some((newest, _, ids)) if *newest >= number => {
                ids.insert(key);
            }
            _ => {
                let mut ids = Set::default();
                ids.insert(key);
                self.slots.push_back((number, length, ids));
            }
        }
    }

    /// Whether `id` is remembered.
    pub fn contains(&self, id: &str) -> bool {
        self.holds(Spent::key(id, true)) || self.holds(Spent::key(id, false))
    }

    /// Whether `id` is remembered as having made a usage record.
    pub fn made_record(&self, id: &str) -> bool {
        self.holds(Spent::key(id, true))
    }

    fn holds(&self, key: u64) -> bool {
        self.slots.iter().rev().any(|(_, _, ids)| ids.contains(&key))
    }

    /// An id's fingerprint: 63 bits of its hash and, in the lowest, whether
    /// it made a record.
    fn key(id: &str, made_record: bool) -> u64 {
        SEED.hash_one(id) & !1 | u64::from(made_record)
    }

    /// Forgets the slots that ended before `horizon`.
    pub fn prune(&mut self, horizon: Timestamp) {
        let horizon = horizon.as_second();
        while self
            .slots
            .front()
            .is_some_and(|(number, length, _)| (number + 1).saturating_mul(*length) <= horizon)
        {
            self.slots.pop_front();
        }
    }

    /// How many.
    pub fn len(&self) -> usize {
        self.slots.iter().map(|(_, _, ids)| ids.len()).sum()
    }

    /// None.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
}

/// The traffic of an account that has none.
static NO_TRAFFIC: LazyLock<Traffic> = LazyLock::new(Traffic::default);

/// Everything Tollgate knows about one account.
///
/// Serialized (JSON) as a shared account in the Redis store: reservations,
/// request ids, recent records and the outbox live in one process only and
/// are left out, and so is every field at its default (an account at rest
/// is a few hundred bytes; a missing field reads as its default). It is
/// read through [`Stored`], as a shared account.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(from = "Stored")]
pub struct Account {
    /// The account id.
    pub id: AccountId,
    /// Its plan.
    pub plan: PlanId,
    /// Its time zone (calendar periods).
    #[serde(with = "jiff::fmt::serde::tz::required")]
    pub time_zone: TimeZone,
    /// Anchor chosen for the account, overriding the plan's.
    #[serde(default, skip_serializing_if = "super::is_default")]
    pub anchor: Option<Anchor>,
    /// Suspended accounts are denied new spending.
    #[serde(default, skip_serializing_if = "super::is_default")]
    pub suspended: bool,
    /// How far paid money may go below zero.
    #[serde(default, skip_serializing_if = "super::is_default")]
    pub credit_limit: Money,
    /// The subscription, when the plan includes an allowance.
    #[serde(default, skip_serializing_if = "super::is_default")]
    pub subscription: Option<Box<Subscription>>,
    /// The allowance ledger, across periods.
    #[serde(default, skip_serializing_if = "super::is_default")]
    pub allowance: Ledger,
    /// Allowance periods started so far, across every subscription: period
    /// numbers never repeat, so a hold on a past period can never be
    /// mistaken for one on the current period (see [`Account::current_period`]).
    #[serde(default, skip_serializing_if = "super::is_default")]
    pub periods_started: u64,
    /// Token packs by id.
    #[serde(default, skip_serializing_if = "super::is_default")]
    pub packs: BTreeMap<LotId, Lot>,
    /// Promotional money grants by id.
    #[serde(default, skip_serializing_if = "super::is_default")]
    pub promos: BTreeMap<LotId, Lot>,
    /// Paid money (negative while the credit line is used).
    pub paid: Ledger,
    /// Debt: usage beyond every source and the credit limit. Its
    /// `available` is minus what is owed.
    #[serde(default, skip_serializing_if = "super::is_default")]
    pub debt: Ledger,
    /// What this process remembers of the account's requests; `None` until
    /// the first one and again once everything in it is forgotten, so an
    /// idle account carries one pointer for it. Read through
    /// [`Account::traffic`].
    #[serde(skip)]
    pub traffic: Option<Box<Traffic>>,
    /// Admin operation ids seen, with their content fingerprints.
    #[serde(default, skip_serializing_if = "super::is_default")]
    pub operations: Operations,
    /// Rate-limit state.
    #[serde(default, skip_serializing_if = "super::is_default")]
    pub buckets: Buckets,
    /// Per-account limit overrides.
    /// `None` when the plan's limits apply unchanged (most accounts):
    /// nothing allocated. Read through [`Account::overrides`].
    #[serde(default, skip_serializing_if = "super::is_default")]
    pub overrides: Option<Box<LimitOverrides>>,
    /// Budgets of API keys and projects; `None` when there are none.
    #[serde(default, skip_serializing_if = "super::is_default")]
    pub budgets: Option<Box<Budgets>>,
    /// What its records charged lately, hour by hour (none on a mirror).
    #[serde(default, skip_serializing_if = "Burn::is_empty")]
    pub burn: Burn,
    /// Alert thresholds of its own, replacing its plan's; `None`: the
    /// plan's.
    #[serde(default, skip_serializing_if = "super::is_default")]
    pub alert_overrides: Option<Box<AlertSettings>>,
    /// The thresholds crossed and alerted on, until re-armed.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub alerts_fired: BTreeSet<String>,
    /// Alerts made so far (each one's number).
    #[serde(default, skip_serializing_if = "super::is_default")]
    pub alerts_made: u64,
    /// What the account is to this process: stand-alone, shared in Redis
    /// (its sidecars' leases and journals, stored as the account's
    /// `leases` and `journals` fields), or a sidecar's mirror.
    #[serde(flatten)]
    pub role: Role,
}

/// An account as the Redis store keeps it, read field by field: what is
/// read is a shared account, its sidecars' leases and journals stored as
/// its own `leases` and `journals` fields. (Reading the role as a
/// flattened field would go through serde's buffer, which holds no
/// `i128`.)
#[derive(serde::Deserialize)]
struct Stored {
    id: AccountId,
    plan: PlanId,
    #[serde(with = "jiff::fmt::serde::tz::required")]
    time_zone: TimeZone,
    #[serde(default)]
    anchor: Option<Anchor>,
    #[serde(default)]
    suspended: bool,
    #[serde(default)]
    credit_limit: Money,
    #[serde(default)]
    subscription: Option<Box<Subscription>>,
    #[serde(default)]
    allowance: Ledger,
    #[serde(default)]
    periods_started: u64,
    #[serde(default)]
    packs: BTreeMap<LotId, Lot>,
    #[serde(default)]
    promos: BTreeMap<LotId, Lot>,
    paid: Ledger,
    #[serde(default)]
    debt: Ledger,
    #[serde(default)]
    operations: Operations,
    #[serde(default)]
    buckets: Buckets,
    #[serde(default)]
    overrides: Option<Box<LimitOverrides>>,
    #[serde(default)]
    budgets: Option<Box<Budgets>>,
    #[serde(default)]
    burn: Burn,
    #[serde(default)]
    alert_overrides: Option<Box<AlertSettings>>,
    #[serde(default)]
    alerts_fired: BTreeSet<String>,
    #[serde(default)]
    alerts_made: u64,
    #[serde(default)]
    leases: BTreeMap<ProducerId, Lease>,
    #[serde(default)]
    journals: BTreeMap<ProducerId, u64>,
}

impl From<Stored> for Account {
    fn from(s: Stored) -> Account {
        Account {
            id: s.id,
            plan: s.plan,
            time_zone: s.time_zone,
            anchor: s.anchor,
            suspended: s.suspended,
            credit_limit: s.credit_limit,
            subscription: s.subscription,
            allowance: s.allowance,
            periods_started: s.periods_started,
            packs: s.packs,
            promos: s.promos,
            paid: s.paid,
            debt: s.debt,
            operations: s.operations,
            buckets: s.buckets,
            overrides: s.overrides,
            budgets: s.budgets,
            burn: s.burn,
            alert_overrides: s.alert_overrides,
            alerts_fired: s.alerts_fired,
            alerts_made: s.alerts_made,
            traffic: None,
            role: Role::Shared(Box::new(Shared {
                leases: s.leases,
                journals: s.journals,
            })),
        }
    }
}

/// A credit limit is 0 to [`MAX_OPERATION`](super::money::MAX_OPERATION),
/// as a top-up is: credit is spent like money.
pub(crate) fn check_credit_limit(limit: Money) -> Result<(), EngineError> {
    if limit.is_negative() {
        return Err(EngineError::invalid("credit_limit", "must not be negative"));
    }
    if limit > super::money::MAX_OPERATION {
        return Err(EngineError::invalid(
            "credit_limit",
            format!("must be at most {}", super::money::MAX_OPERATION),
        ));
    }
    Ok(())
}

impl Account {
    /// A new account on `plan`, its first period starting at `now`.
    pub fn open(
        id: AccountId,
        plan: &Plan,
        time_zone: TimeZone,
        anchor: Option<Anchor>,
        credit_limit: Money,
        now: Timestamp,
    ) -> Result<Account, EngineError> {
        check_credit_limit(credit_limit)?;
        let mut account = Account {
            id,
            plan: plan.id.clone(),
            time_zone,
            anchor,
            suspended: false,
            credit_limit,
            subscription: None,
            allowance: Ledger::default(),
            periods_started: 0,
            packs: BTreeMap::new(),
            promos: BTreeMap::new(),
            paid: Ledger::default(),
            debt: Ledger::default(),
            traffic: None,
            operations: Operations::default(),
            buckets: Buckets::default(),
            overrides: None,
            budgets: None,
            burn: Burn::default(),
            alert_overrides: None,
            alerts_fired: BTreeSet::new(),
            alerts_made: 0,
            role: Role::Standalone,
        };
        account.subscribe(plan, anchor, now)?;
        Ok(account)
    }

    /// The per-account limit overrides (none set: the plan's limits).
    pub fn overrides(&self) -> &LimitOverrides {
        static NONE: std::sync::LazyLock<LimitOverrides> = std::sync::LazyLock::new(LimitOverrides::default);
        self.overrides.as_deref().unwrap_or(&NONE)
    }

    /// The mirror's log and lease state, if this is a sidecar's mirror.
    pub fn mirror(&self) -> Option<&Mirror> {
        match &self.role {
            Role::Mirror(m) => Some(m),
            _ => None,
        }
    }

    /// The mirror's log and lease state, if this is a sidecar's mirror.
    pub fn mirror_mut(&mut self) -> Option<&mut Mirror> {
        match &mut self.role {
            Role::Mirror(m) => Some(m),
            _ => None,
        }
    }

    /// Whether this is a sidecar's mirror.
    pub fn is_mirror(&self) -> bool {
        matches!(self.role, Role::Mirror(_))
    }

    /// What each sidecar holds on lease (none unless shared).
    pub fn leases(&self) -> &BTreeMap<ProducerId, Lease> {
        static NONE: BTreeMap<ProducerId, Lease> = BTreeMap::new();
        match &self.role {
            Role::Shared(shared) => &shared.leases,
            _ => &NONE,
        }
    }

    /// Per journal, the last journaled record applied (none unless shared).
    pub fn journals(&self) -> &BTreeMap<ProducerId, u64> {
        static NONE: BTreeMap<ProducerId, u64> = BTreeMap::new();
        match &self.role {
            Role::Shared(shared) => &shared.journals,
            _ => &NONE,
        }
    }

    /// The shared role's state, if this is a shared account.
    pub(crate) fn shared_mut(&mut self) -> Option<&mut Shared> {
        match &mut self.role {
            Role::Shared(shared) => Some(shared),
            _ => None,
        }
    }

    /// Number of the current allowance period (0 is the account's first),
    /// if subscribed: the last period started.
    pub fn current_period(&self) -> Option<u64> {
        self.subscription.as_ref().map(|_| self.periods_started - 1)
    }

    /// Starts a new subscription on `plan` at `now`: what is left of the
    /// old allowance is forfeited, holds on it stay chargeable.
    pub fn subscribe(&mut self, plan: &Plan, anchor: Option<Anchor>, now: Timestamp) -> Result<(), EngineError> {
        // Compute everything that can fail before changing anything.
        let next = match &plan.allowance {
            None => None,
            Some(a) => {
                let schedule = Schedule {
                    unit: a.period,
                    anchor: anchor.unwrap_or(a.anchor),
                    time_zone: self.time_zone.clone(),
                    start: now,
                };
                let window = schedule.containing(now)?;
                Some((a, schedule, window))
            }
        };
        self.allowance.forfeit_available();
        self.plan = plan.id.clone();
        self.anchor = anchor;
        self.subscription = next.map(|(a, schedule, window)| {
            self.allowance.credit(i128::from(a.tokens));
            self.periods_started += 1;
            Box::new(Subscription {
                schedule,
                window,
                tokens: a.tokens,
                rollover_cap: a.rollover_cap,
                carry_room: 0,
            })
        });
        Ok(())
    }

    /// Brings time-driven state up to `now`: lapsed holds (released or
    /// charged per policy, records to the outbox), expired lots, allowance
    /// periods (with rollover). Each event applies at its own instant and
    /// in time order, so the outcome is the same whenever this runs.
    /// Idempotent for a given `now`.
    pub fn advance(&mut self, catalog: &Catalog, now: Timestamp) -> Result<(), EngineError> {
        loop {
            let hold = self
                .traffic()
                .expiries
                .first()
                .map(|(at, _)| *at)
                .filter(|at| *at <= now);
            let lot = self
                .packs
                .values()
                .chain(self.promos.values())
                .filter(|l| !l.closed)
                .filter_map(|l| l.expires_at)
                .filter(|at| *at <= now)
                .min();
            let period = self
                .subscription
                .as_ref()
                .map(|s| s.window.end)
                .filter(|end| *end <= now);
            let lease = self.next_lease_event().filter(|at| *at <= now);
            // At one instant: holds and leases lapse, then lots close, then
            // the period ends (a period is over at its end).
            match [hold, lease, lot, period].into_iter().flatten().min() {
                None => break,
                Some(at) if hold == Some(at) => self.lapse_holds(catalog, at),
                Some(at) if lease == Some(at) => self.lapse_leases(catalog, at),
                Some(at) if lot == Some(at) => self.close_lots(at),
                Some(_) => self.end_period()?,
            }
        }
        Ok(())
    }

    /// Lapses the holds that expire at `at`, as of `at`.
    fn lapse_holds(&mut self, catalog: &Catalog, at: Timestamp) {
        let lapsed: Vec<(Timestamp, ReservationId)> = self
            .traffic()
            .expiries
            .iter()
            .take_while(|(expires, _)| *expires <= at)
            .cloned()
            .collect();
        for (expires, id) in lapsed {
            self.traffic_mut().expiries.remove(&(expires, id.clone()));
            let Some(Reservation::Open(hold)) = self.traffic_mut().reservations.remove(&id) else {
                continue;
            };
            let charged = catalog.on_expiry == ExpiryPolicy::ChargeInFull;
            match catalog.on_expiry {
                ExpiryPolicy::Release => {
                    self.unhold(&hold.takes);
                    self.buckets.adjust_budgets(
                        hold.budgets(),
                        -i128::from(hold.admitted_tokens),
                        -hold.counted_money(),
                    );
                }
                ExpiryPolicy::ChargeInFull => {
                    self.charge_held(&hold.takes);
                    let record = self.record_for(&hold, RecordKind::Expired, hold.worst_case(), hold.takes.clone(), at);
                    self.emit(Arc::new(record), catalog);
                }
            }
            self.buckets.finish(&hold.buckets);
            self.traffic_mut()
                .reservations
                .insert(id, Reservation::Expired { closed_at: at, charged });
        }
    }

    /// Closes the lots that expired by `at`: what they hold unused is
    /// forfeited.
    fn close_lots(&mut self, at: Timestamp) {
        let mut closed = Vec::new();
        for (lots, make) in [
            (&mut self.packs, SourceRef::Pack as fn(LotId) -> SourceRef),
            (&mut self.promos, SourceRef::Promo),
        ] {
            for (id, lot) in lots.iter_mut() {
                if !lot.closed && lot.expires_at.is_some_and(|t| t <= at) {
                    closed.push((make(id.clone()), lot.ledger.available()));
                    lot.closed = true;
                }
            }
        }
        for (source, unused) in closed {
            self.give_up(source, unused);
        }
    }

    /// Ends the current allowance period: unused tokens roll over up to the
    /// plan's cap (what holds and leases still hold of it may roll over
    /// later, within what is left of the cap: see [`Account::carried`]).
    fn end_period(&mut self) -> Result<(), EngineError> {
        let mirror = self.is_mirror();
        let ended = self.periods_started - 1;
        let unused = self.allowance.available();
        let Some(sub) = &mut self.subscription else {
            return Ok(());
        };
        let next = sub.schedule.containing(sub.window.end)?;
        if mirror {
            // A mirror's allowance is lent: the shared account starts the
            // next period, the slice goes back.
            self.allowance.forfeit(unused);
            sub.carry_room = 0;
        } else {
            let carried = unused.min(i128::from(sub.rollover_cap));
            self.allowance.forfeit(unused - carried);
            self.allowance.credit(i128::from(sub.tokens));
            sub.carry_room = i128::from(sub.rollover_cap) - carried;
        }
        sub.window = next;
        self.periods_started += 1;
        if unused > 0
            && let Some(log) = self.mirror_mut()
        {
            super::source::merge(
                &mut log.returned,
                [Take {
                    source: SourceRef::Allowance { period: ended },
                    amount: unused,
                }],
            );
        }
        Ok(())
    }

    /// Of `back`, given back to `source` after its period ended, what rolls
    /// over into the current period: allowance of the period just ended,
    /// within what is left of the rollover cap (taken from it). The rest is
    /// forfeited by the caller.
    pub(crate) fn carried(&mut self, source: &SourceRef, back: i128) -> i128 {
        let current = self.current_period();
        let mirror = self.is_mirror();
        let (SourceRef::Allowance { period }, Some(sub), false) = (source, self.subscription.as_deref_mut(), mirror)
        else {
            // A mirror's ended allowance goes back to the shared account,
            // which rolls it over.
            return 0;
        };
        if current != Some(period + 1) || back <= 0 {
            return 0;
        }
        let carried = back.min(sub.carry_room);
        sub.carry_room -= carried;
        carried
    }

    /// Forgets closed reservations and request ids older than the
    /// idempotency window, and idle limit buckets.
    pub fn prune(&mut self, catalog: &Catalog, now: Timestamp) {
        let (Ok(horizon), Ok(answers)) = (
            now.checked_sub(catalog.idempotency_window),
            now.checked_sub(catalog.idempotency_window.min(ANSWERS_KEPT)),
        ) else {
            return;
        };
        self.let_go_of_answers(catalog, horizon, |_, at| at <= answers);
        if let Some(traffic) = self.traffic.as_deref_mut() {
            traffic.spent.prune(horizon);
        }
        self.shed_traffic();
        self.buckets.prune(now);
        self.burn.prune(now);
        self.prune_leases(catalog, now);
    }

    /// Keeps the answers of at most [`MAX_ANSWERS`] closed requests: past
    /// that, lets go of the oldest (by when they closed, then by id) down
    /// to half of it, at once, never that of `current` (the request just
    /// answered). A pass looks at every request, and the next comes only
    /// after half of [`MAX_ANSWERS`] new ones: linear in those, so
    /// constant time per request, amortized.
    pub(crate) fn bound_answers(&mut self, catalog: &Catalog, now: Timestamp, current: &RequestId) {
        let traffic = self.traffic();
        // Every open hold has one request; the rest are closed.
        if traffic.requests.len().saturating_sub(traffic.expiries.len()) <= MAX_ANSWERS {
            return;
        }
        let Ok(horizon) = now.checked_sub(catalog.idempotency_window) else {
            return;
        };
        let mut closed: Vec<(Timestamp, &RequestId)> = traffic
            .requests
            .iter()
            .filter(|(id, _)| *id != current)
            .filter_map(|(id, r)| Some((traffic.closed_at(r)?, id)))
            .collect();
        let Some(going) = closed.len().checked_sub(MAX_ANSWERS / 2).filter(|n| *n > 0) else {
            return;
        };
        closed.select_nth_unstable(going - 1);
        let going: Set<RequestId> = closed[..going].iter().map(|(_, id)| (*id).clone()).collect();
        self.let_go_of_answers(catalog, horizon, |id, _| going.contains(id));
    }

    /// Lets go of the answers of the closed requests `goes` picks (by id
    /// and when they closed), keeping their ids as fingerprints ([`Spent`])
    /// while they closed after `horizon`.
    fn let_go_of_answers(
        &mut self,
        catalog: &Catalog,
        horizon: Timestamp,
        mut goes: impl FnMut(&RequestId, Timestamp) -> bool,
    ) {
        let Some(traffic) = self.traffic.as_deref_mut() else {
            return;
        };
        let slot = catalog.idempotency_window / 4;
        let (reservations, spent) = (&mut traffic.reservations, &mut traffic.spent);
        traffic.requests.retain(|id, r| {
            let (at, made_record) = match r {
                Remembered::Charged { at, .. } => (*at, true),
                Remembered::Reserved { reservation, .. } => match reservations.get(reservation) {
                    Some(closed) => match closed.closed_at() {
                        Some(at) => (at, closed.made_record()),
                        None => return true,
                    },
                    // Every reservation is made and let go with its request.
                    None => return false,
                },
            };
            if !goes(id, at) {
                return true;
            }
            if let Remembered::Reserved { reservation, .. } = r {
                reservations.remove(reservation);
            }
            if at > horizon {
                spent.insert(id.as_str(), at, slot, made_record);
            }
            false
        });
    }

    /// The ledger behind a source reference; `None` for a lot that does not
    /// exist (callers only name lots they found, and lots are never removed).
    pub(crate) fn ledger_mut(&mut self, source: &SourceRef) -> Option<&mut Ledger> {
        match source {
            SourceRef::Allowance { .. } => Some(&mut self.allowance),
            SourceRef::Pack(id) => self.packs.get_mut(id).map(|l| &mut l.ledger),
            SourceRef::Promo(id) => self.promos.get_mut(id).map(|l| &mut l.ledger),
            SourceRef::Paid | SourceRef::Credit => Some(&mut self.paid),
            SourceRef::Debt => Some(&mut self.debt),
        }
    }

    /// Whatever a take returns to this source now flows back into
    /// `available` (true) or is forfeited (false: lot closed, or allowance
    /// of a past period).
    pub(crate) fn accepts_returns(&self, source: &SourceRef) -> bool {
        match source {
            SourceRef::Allowance { period } => self.current_period() == Some(*period),
            SourceRef::Pack(id) => self.packs.get(id).is_some_and(|l| !l.closed),
            SourceRef::Promo(id) => self.promos.get(id).is_some_and(|l| !l.closed),
            SourceRef::Paid | SourceRef::Credit | SourceRef::Debt => true,
        }
    }

    /// Builds a usage record for `hold` and `charges`.
    pub(crate) fn record_for(
        &self,
        hold: &Hold,
        kind: RecordKind,
        usage: Usage,
        charges: Vec<Take>,
        now: Timestamp,
    ) -> UsageRecord {
        UsageRecord {
            kind,
            request_id: hold.request_id.clone(),
            reservation_id: Some(hold.request_id.reservation_id()),
            account_id: self.id.clone(),
            api_key_id: hold.api_key_id.clone(),
            model: Some(hold.model.clone()),
            service_tier: Some(hold.tier.clone()),
            usage,
            total_money: super::source::money_total(&charges),
            charges,
            price_version: Some(hold.version.clone()),
            reserved_at: hold.reserved_at,
            settled_at: now,
        }
    }

    /// Queues `record` for the usage sink and keeps it among the recent.
    pub(crate) fn emit(&mut self, record: Arc<UsageRecord>, catalog: &Catalog) {
        if !self.is_mirror() {
            self.burned(&record, record.settled_at);
        }
        if catalog.recent_usage > 0 {
            if self.traffic().recent.len() == catalog.recent_usage {
                self.traffic_mut().recent.pop_front();
            }
            self.traffic_mut().recent.push_back(record.clone());
        }
        self.traffic_mut().outbox.push(record);
    }

    /// Counts what `record` charged: in the account's recent history
    /// (money, and allowance tokens) at its settle instant (no later than
    /// `now`: a sidecar's clock ahead cannot push the history forward), and
    /// as spent in the budgets of its API key (as they applied at its
    /// reserve).
    pub(crate) fn burned(&mut self, record: &UsageRecord, now: Timestamp) {
        let allowance = record
            .charges
            .iter()
            .filter(|t| matches!(t.source, SourceRef::Allowance { .. }))
            .map(|t| t.amount)
            .sum();
        let money = record.total_money.picos();
        self.burn.record(record.settled_at.min(now), money, allowance);
        if let (Some(budgets), Some(key)) = (self.budgets.as_deref(), record.api_key_id.as_ref())
            && let Ok(applying) = budgets.applying(key, &self.time_zone, record.reserved_at)
        {
            let tokens = record.usage.total_tokens();
            self.buckets.spend(&applying, &self.time_zone, tokens, money);
        }
    }

    /// Takes the records queued for the usage sink.
    pub fn take_records(&mut self) -> Vec<Arc<UsageRecord>> {
        let Some(traffic) = self.traffic.as_deref_mut() else {
            return Vec::new();
        };
        let records = std::mem::take(&mut traffic.outbox);
        self.shed_traffic();
        records
    }

    /// Whether this process remembers request `id` (its answer, or that
    /// it was closed within the idempotency window).
    pub fn remembers(&self, id: &RequestId) -> bool {
        let traffic = self.traffic();
        traffic.requests.contains_key(id) || traffic.spent.contains(id.as_str())
    }

    /// Whether reservation `id` holds funds here.
    pub fn holds_open(&self, id: &ReservationId) -> bool {
        matches!(self.traffic().reservations.get(id), Some(Reservation::Open(_)))
    }

    /// What this process remembers of the account's requests.
    pub fn traffic(&self) -> &Traffic {
        self.traffic.as_deref().unwrap_or(&NO_TRAFFIC)
    }

    /// The same, to change: allocated on first use.
    pub fn traffic_mut(&mut self) -> &mut Traffic {
        self.traffic.get_or_insert_with(Box::default)
    }

    /// Frees the traffic state once nothing is left in it.
    fn shed_traffic(&mut self) {
        if self.traffic.as_deref().is_some_and(Traffic::is_empty) {
            self.traffic = None;
        }
    }

    /// Open holds, soonest expiry first.
    pub fn holds(&self) -> impl Iterator<Item = &Hold> {
        self.traffic()
            .expiries
            .iter()
            .filter_map(|(_, id)| match self.traffic().reservations.get(id) {
                Some(Reservation::Open(h)) => Some(h),
                _ => None,
            })
    }
}
