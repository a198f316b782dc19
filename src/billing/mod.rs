//! Downstream of the usage streams, where billing and finance read them:
//! never on the data plane's path.
//!
//! Bottom up: each imports only from those listed before it.
//!
//! - [`stream`]: the usage streams through a Redis consumer group,
//!   acknowledging only what was safely used.
//! - [`export`]: totals per account and model (CSV, JSON Lines), and
//!   CloudEvents 1.0 for usage-metering systems.
//! - [`rows`]: a batch of stream records as the billing tables' columns.
//! - [`postgres`]: the billing database: its schema and migrations, and a
//!   batch of stream entries written in one transaction, each record once.
//! - [`loader`]: stream → database, acknowledging only what committed.
//! - [`statement`]: a customer's month from the database, balances that
//!   reconcile to the pico-unit.
//! - [`reprice`]: recorded usage priced again under a draft price
//!   version, by the engine's own code, before it is published.
//! - [`reconcile`]: the database's charges and refunds against the Redis
//!   store's ledgers, per account, to the unit.

pub mod export;
pub mod loader;
pub mod postgres;
pub mod reconcile;
pub mod reprice;
pub mod rows;
pub mod statement;
pub mod stream;
