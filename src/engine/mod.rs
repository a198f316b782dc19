//! The accounting engine: pure, synchronous, I/O-free.
//!
//! Given an [`Account`], a [`Catalog`] and the current time, each operation
//! computes its answer and its effect on the account. Nothing here reads a
//! clock, touches a file or awaits; the store decides where accounts live
//! and the API layers decide what time it is.
//!
//! - [`money`]: exact money and token quantities.
//! - [`ids`]: validated identifiers.
//! - [`hash`]: the hash maps and sets of the hot path.
//! - [`pricing`]: the versioned price book.
//! - [`period`]: subscription period boundaries.
//! - [`limits`]: GCRA rate limits and concurrency.
//! - [`burn`]: what an account spent lately, hour by hour: burn rates and runway.
//! - [`budget`]: spend caps on API keys and projects per period, counted in limit buckets.
//! - [`catalog`]: plans, prices and hold policy, alert thresholds.
//! - [`window`]: a sidecar's share of a fixed window counted in a shared store.
//! - [`source`]: sources and the amounts taken from them.
//! - [`record`]: usage records.
//! - [`request`]: what is asked of an account and what it answers.
//! - [`role`]: the lease protocol's state and messages, as data.
//! - [`error`]: why an operation was refused.
//! - [`account`]: one account's sources, ledgers and reservations.
//! - [`draw`]: which sources pay, and the one rounding rule.
//! - [`lease`]: slices of a shared account lent to sidecars, and their mirrors.
//! - [`ops`]: reserve, extend, settle, release, charge, admin operations.
//! - [`alert`]: thresholds crossed, each alerted once until re-armed.
//! - [`command`]: one entry point for every account operation.
//! - [`fixture`]: the catalog tests, simulations and benches share.
//!
//! Listed bottom up: each module imports only from those above it.

// No clock reads here (clippy.toml lists them): `now` is an argument.
#![deny(clippy::disallowed_methods)]

pub mod account;
pub mod alert;
pub mod budget;
pub mod burn;
pub mod catalog;
pub mod command;
pub mod draw;
pub mod error;
pub mod fixture;
pub mod hash;
pub mod ids;
pub mod lease;
pub mod limits;
pub mod money;
pub mod ops;
pub mod period;
pub mod pricing;
pub mod record;
pub mod request;
pub mod role;
pub mod source;
pub mod window;

pub use account::{Account, Ledger};
pub use catalog::{Catalog, ExpiryPolicy, OutagePolicy, Plan, SourceClass};
pub use command::{Applied, Command, Reply, Snapshot};
pub use error::EngineError;
pub use money::Money;
pub use record::UsageRecord;
pub use request::{ChargeOutcome, ChargeRequest, ChargeWhat, Denial, ReserveOutcome, ReserveRequest};

/// Whether a value is its type's default: such fields are left out of the
/// JSON an account is stored as, and read back as the default.
pub(crate) fn is_default<T: Default + PartialEq>(value: &T) -> bool {
    *value == T::default()
}

#[cfg(test)]
mod tests;
