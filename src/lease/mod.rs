//! The sidecar's lease protocol, without I/O: one account as a sidecar
//! keeps it ([`Local`]: the mirror, records on their way, the sync in
//! flight, the rates that size slices), and the steps of one decision
//! ([`Decide`]).
//!
//! Commands, store replies and ticks go in; syncs to send, journal entries
//! to write and answers come out. Nothing here awaits, reads a clock or
//! touches a socket or a file. The Redis store (`store::leased`) drives it
//! against Redis and the journal; `tests/simulation.rs` drives the same
//! code on a virtual clock against a simulated store that fails, loses
//! replies and partitions sidecars.
//!
//! The protocol, for one account on one sidecar:
//!
//! - A **decision** runs on the mirror; when it is short, a sync borrows
//!   the need and it runs again; then it decides as the last word (see
//!   [`decide`]). Its records are journaled before it is answered.
//! - A **sync** ([`Local::next_sync`]) reports charges and returns, sends
//!   the journaled records, renews the lease and borrows. One is in flight
//!   at a time per account; while its outcome is unknown it is sent again
//!   as is, so the store applies it once ([`Local::pending`]).
//! - The **upkeep** ([`Local::upkeep`]) reports, renews and refills ahead
//!   of need, gives back what idles, reads the shared account again after
//!   an announcement, and forgets a mirror that holds nothing.
//!
//! The arithmetic of leases (what a sync lends, takes back and applies) is
//! the engine's (`engine::lease`).

// No clock reads here (clippy.toml lists them): `now` is an argument.
#![deny(clippy::disallowed_methods)]

pub mod decide;
pub mod local;
pub mod rates;

use std::time::Duration;

use jiff::SignedDuration;

pub use decide::{ASKS, Context, Decide, Known, Next, SyncOutcome};
pub use local::{Local, Purpose, Upkeep, has_news, holds_anything};

use crate::engine::EngineError;
use crate::engine::ids::ProducerId;
use crate::engine::role::Journaled;

/// How leases are sized and kept, and where the fleet keeps its accounts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseSettings {
    /// A lease lapses this long after its last sync.
    pub ttl: Duration,
    /// A slice covers this much of the sidecar's recent burn.
    pub horizon: Duration,
    /// Slices unused this long go back.
    pub idle_return: Duration,
    /// Charges are reported at least this often.
    pub report_interval: Duration,
    /// How far the instant a change is computed at may be from the store's
    /// clock (`None`: unchecked, for simulated clocks).
    pub max_clock_skew: Option<Duration>,
    /// Key prefix.
    pub prefix: String,
    /// Logical shards: accounts map to shards by a hash of their id; each
    /// shard is one hash tag, with its own usage stream.
    pub shards: u32,
    /// The consumer groups that must read every usage record: each
    /// shard's stream is trimmed of what all of them acknowledged (none:
    /// never trimmed).
    pub consumer_groups: Vec<String>,
    /// Stream entries younger than this are never trimmed: a resend may
    /// still read its first call's record there.
    pub trim_keep: Duration,
}

/// How long stream entries stay at least, by default: where a record went
/// is kept two minutes after its minute, plus a minute of clock margin.
pub const DEFAULT_TRIM_KEEP_SECONDS: u64 = 240;

impl Default for LeaseSettings {
    fn default() -> Self {
        LeaseSettings {
            ttl: Duration::from_secs(30),
            horizon: Duration::from_secs(2),
            idle_return: Duration::from_secs(10),
            report_interval: Duration::from_secs(1),
            max_clock_skew: Some(Duration::from_secs(2)),
            prefix: "tollgate".into(),
            shards: 1,
            consumer_groups: Vec::new(),
            trim_keep: Duration::from_secs(DEFAULT_TRIM_KEEP_SECONDS),
        }
    }
}

impl LeaseSettings {
    /// The lease's time to live, as the engine counts time.
    pub fn ttl(&self) -> SignedDuration {
        SignedDuration::try_from(self.ttl).unwrap_or(SignedDuration::from_secs(30))
    }
}

/// Where a sidecar's records are numbered before they are written: its
/// journal.
pub trait Numbering {
    /// The journal's id, on every entry.
    fn id(&self) -> &ProducerId;
    /// Numbers `entries`, or says why the disk refused.
    fn number(&mut self, entries: &mut [Journaled]) -> Result<(), String>;
}

/// Why a decision failed.
#[derive(Debug)]
pub enum Failure {
    /// The engine refused the command.
    Engine(EngineError),
    /// The store or the journal could not do its part; the caller may
    /// retry.
    Unavailable(String),
}
