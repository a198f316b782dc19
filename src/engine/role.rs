//! An account's roles and the lease protocol's messages, as plain data.
//!
//! An account is one of three things to the process holding it
//! ([`Role`]): stand-alone (the memory store), the shared account a Redis
//! store keeps ([`Shared`]: its sidecars' leases and journals), or a
//! sidecar's [`Mirror`] of one. The reports and answers that pass between
//! a mirror and its shared account are here too; the arithmetic on them is
//! in `lease.rs`.

use std::collections::BTreeMap;

use jiff::{SignedDuration, Timestamp};

use super::ids::{ModelId, ProducerId};
use super::limits::{BucketKey, Lacking, Permits};
use super::money::Money;
use super::pricing::{Rates, Usage};
use super::record::UsageRecord;
use super::source::{SourceRef, Take};

/// What one sidecar holds of a shared account.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Lease {
    /// Amounts lent and not yet charged or given back, by source.
    #[serde(default, skip_serializing_if = "super::is_default")]
    pub held: Vec<Take>,
    /// Permits lent, by bucket.
    #[serde(default, skip_serializing_if = "super::is_default")]
    pub permits: Vec<(BucketKey, Permits)>,
    /// When it lapses unless renewed.
    pub expires_at: Timestamp,
    /// The last report applied.
    pub seq: u64,
    /// Incremented each time the lease lapses: a mirror still on an older
    /// epoch lost what it held. At least 1: a mirror at epoch 0 has never
    /// held a lease, and a lease made anew for a mirror that has is put
    /// past its epoch.
    pub epoch: u64,
    /// The answer to report `seq`, returned again to its retries.
    pub last: Option<Granted>,
    /// What the lease held when it lapsed, by epoch, oldest first: kept
    /// held until no hold made under it can be charged any more.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lapsed: Vec<Lapsed>,
    /// The journal of the process holding it: a process restarted on the
    /// same journal takes back what its predecessors' leases hold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub journal: Option<ProducerId>,
}

/// The funds of a lapsed lease. Its sidecar may be cut off, not gone: it
/// still settles the holds it made under the lease, and reports their
/// charges when it is back, or after a restart from its journal. Lent to
/// another sidecar meanwhile, the same funds would be spent twice, so they
/// stay held, covering those charges, until a record made under the lease
/// can no longer arrive within the idempotency window: a hold TTL (a hold
/// made under it lapses by then, unless extended) and the window past the
/// lease's expiry. A sidecar back from the cut says in each report what
/// its open holds of lapsed leases still hold: only that is kept, for a
/// hold TTL from the report (they may be extended). A sidecar that starts
/// anew (epoch 0), leaves, or restarts on the same journal (once its
/// records are in) takes it all back.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Lapsed {
    /// The lease's epoch when it lapsed.
    pub epoch: u64,
    /// What it still holds.
    pub held: Vec<Take>,
    /// When what is left is taken back.
    pub until: Timestamp,
}

/// A usage record as journaled by a sidecar, with what it charged: the
/// unit in which records reach the shared account and the usage stream.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Journaled {
    /// The journal it was written to.
    pub journal: ProducerId,
    /// Its position there, from 1, strictly increasing.
    pub seq: u64,
    /// The record.
    pub record: UsageRecord,
    /// Charged from what lease `producer` held at `epoch`.
    pub leased: Vec<Take>,
    /// Charged from holds whose lease had lapsed.
    pub unleased: Vec<Take>,
    /// The sidecar process whose lease backed `leased`.
    pub producer: ProducerId,
    /// That lease's epoch.
    pub epoch: u64,
}

/// What a mirror needs covered, exactly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Needed {
    /// Tokens of a model at rates.
    Tokens {
        /// Token counts.
        usage: Usage,
        /// Prices and weight.
        rates: Rates,
        /// The model (for pack scopes).
        model: ModelId,
    },
    /// A fixed amount of money.
    Money(Money),
}

/// The least of a need worth lending for: short of it the request is
/// denied whatever is lent, so nothing is (the fleet refuses it as a
/// stand-alone account would, without parking funds in one sidecar).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Least {
    /// The smallest grant's cost (a reserve's prompt and one output token).
    pub need: Needed,
    /// What the mirror's own slices can put toward it.
    pub has: Vec<Take>,
}

/// Why a mirror cannot decide alone, and what would let it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Short {
    /// Funds to borrow, up to all of them: what there is (a settle or
    /// extend takes it), or nothing unless there is at least [`Least`] (a
    /// reserve).
    pub need: Option<(Needed, Option<Least>)>,
    /// Permits to borrow.
    pub permits: Lacking,
    /// Of the budgets' permits, the least the command can be granted with
    /// (a reserve's prompt and one output token); a budget not named here
    /// needs none of its permits to go ahead (an extend, which can grow
    /// less). The rest of `permits` only widens the grant.
    pub least: Lacking,
}

impl Short {
    /// What the command needs now, for the sync's `need_permits`: rate
    /// limits' permits in full, budgets' at least.
    pub fn need_permits(&self) -> Lacking {
        self.permits
            .iter()
            .map(|(key, lack)| {
                if !key.scope.is_budget() {
                    return (key.clone(), *lack);
                }
                let least = self.least.iter().find(|(k, _)| k == key).map(|(_, l)| *l);
                (key.clone(), least.unwrap_or_default())
            })
            .collect()
    }
}

/// One sidecar's report and request to the shared account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sync {
    /// The sidecar.
    pub producer: ProducerId,
    /// This report's number: strictly increasing per producer.
    pub seq: u64,
    /// The lease epoch the sidecar's slices belong to.
    pub epoch: u64,
    /// Charged from the slices since the last report (debt included).
    pub charged: Vec<Take>,
    /// Charged from holds whose backing lapsed with an earlier lease:
    /// applied as far as the sources allow, whatever the epoch.
    pub unleased: Vec<Take>,
    /// Given back since the last report.
    pub returned: Vec<Take>,
    /// Held by open holds whose lease lapsed: what they may still charge
    /// (see [`Lapsed`]), or `None` when the sidecar cannot tell (records
    /// on their way to its journal carry charges of such holds).
    pub unbacked: Option<Vec<Take>>,
    /// Permits given back (tokens below zero: usage beyond admission).
    pub permits_back: Lacking,
    /// Journaled records of this account, in journal order: each is
    /// applied once (its charges debited, itself returned for the usage
    /// stream), whoever sends it and however often.
    pub records: Vec<Journaled>,
    /// More of these sources, wanted for the coming seconds.
    pub want: Vec<(SourceRef, i128)>,
    /// A need to cover now (see [`Short::need`]).
    pub need: Option<(Needed, Option<Least>)>,
    /// More permits.
    pub want_permits: Lacking,
    /// Of those, what the command that asked needs now: a dimension whose
    /// need the shared bucket cannot meet is lent nothing (the command is
    /// refused anyway, and what was lent would sit idle in this sidecar).
    pub need_permits: Lacking,
    /// How long the lease lives without another report.
    pub ttl: SignedDuration,
    /// The sidecar is leaving: take back everything it holds.
    pub close: bool,
    /// The sidecar's journal, when every record of this account that
    /// earlier processes left in it is in this sync or applied before:
    /// what those processes' leases hold is taken back.
    pub journal: Option<ProducerId>,
}

/// What a sync did: the answer for the sidecar, and the journaled records
/// applied by it for the first time (for the usage stream, in the same
/// commit).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Synced {
    /// The answer.
    pub granted: Granted,
    /// Records applied now.
    pub applied: Vec<Journaled>,
    /// Records of request ids already recorded (a retry decided again by
    /// another sidecar, or by one restarted): not applied, their own
    /// charges never charged.
    pub duplicates: Vec<Journaled>,
}

/// What a mirror reports in its next [`Sync`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Charged from leased slices.
    pub charged: Vec<Take>,
    /// Charged from unbacked holds.
    pub unleased: Vec<Take>,
    /// Given up.
    pub returned: Vec<Take>,
    /// Held by open holds whose lease lapsed.
    pub unbacked: Vec<Take>,
    /// Permits given back.
    pub permits_back: Lacking,
}

/// The shared account's answer to a [`Sync`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Granted {
    /// Newly lent amounts.
    #[serde(default, skip_serializing_if = "super::is_default")]
    pub takes: Vec<Take>,
    /// Newly lent permits.
    #[serde(default, skip_serializing_if = "super::is_default")]
    pub permits: Vec<(BucketKey, Permits)>,
    /// The lease's new expiry.
    pub expires_at: Timestamp,
    /// The lease's epoch.
    pub epoch: u64,
    /// The sidecar's previous slices had lapsed and were taken back.
    #[serde(default, skip_serializing_if = "super::is_default")]
    pub lapsed: bool,
    /// Tokens charged after their lease lapsed that no source could cover.
    #[serde(default, skip_serializing_if = "super::is_default")]
    pub written_off: u64,
    /// When a limit that lent less than asked expects to admit again, in
    /// milliseconds.
    #[serde(default, skip_serializing_if = "super::is_default")]
    pub retry_after_ms: Option<u64>,
}

/// A mirror's log and state (absent on a shared account).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Mirror {
    /// Charged since the last report.
    pub charged: Vec<Take>,
    /// Given up since the last report (unused, closed lots, past periods).
    pub returned: Vec<Take>,
    /// Held by open reservations made under a lease that lapsed: the shared
    /// account took their backing back, so what they charge is reported as
    /// unleased and what they release is given up here.
    pub unbacked: Vec<Take>,
    /// Charged from unbacked holds since the last report.
    pub unleased: Vec<Take>,
    /// The shared account was asked (or cannot be): decide as a plain
    /// account would, partial grants and denials included.
    pub last_word: bool,
    /// Money this mirror may owe beyond its slices while the store is
    /// unreachable (the plan's failure policy), in pico-units.
    pub overdraft: i128,
    /// The lease epoch the slices belong to.
    pub epoch: u64,
    /// New decisions from the slices stop here (the lease's expiry less a
    /// margin): past it, funds must be asked for.
    pub decide_until: Option<Timestamp>,
    /// The lease's expiry as last granted. Past it the shared account may
    /// have taken the slices back and lent them again: nothing new is
    /// drawn from them, not even as the last word (holds keep their takes).
    pub expires_at: Option<Timestamp>,
}

/// What an account is to the process holding it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Role {
    /// One process holds it alone (the memory store): it lends nothing and
    /// reports to no one.
    #[default]
    Standalone,
    /// The shared account a Redis store keeps: it lends sidecars slices
    /// and applies their reports. Every account read from the store is
    /// one; a stand-alone account becomes one at its first sync.
    Shared(Box<Shared>),
    /// A sidecar's mirror of a shared account: it draws on what was lent
    /// to it and logs what it did for its next report.
    Mirror(Box<Mirror>),
}

/// What a shared account keeps of its sidecars, stored with it.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Shared {
    /// What each sidecar holds on lease.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub leases: BTreeMap<ProducerId, Lease>,
    /// Per journal, the last journaled record applied.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub journals: BTreeMap<ProducerId, u64>,
}

/// Stored as the shared account's own `leases` and `journals` fields (the
/// account's JSON flattens it): a mirror's log never leaves its process.
/// What is read back is a shared account (`account::Stored`).
impl serde::Serialize for Role {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Role::Shared(shared) => shared.serialize(s),
            Role::Standalone | Role::Mirror(_) => serde::ser::SerializeMap::end(s.serialize_map(Some(0))?),
        }
    }
}
