//! Where accounts live. The engine never knows which store it has.
//!
//! A store owns the authoritative account states and the catalog, and runs
//! each [`Command`] on one account atomically: concurrent commands on one
//! account are serialized, commands on different accounts do not wait for
//! each other. Usage records produced by a command are returned with its
//! reply, for the caller to hand to the usage sink.
//!
//! - [`memory`]: the embedded default; one process, volatile.
//! - [`leased`]: shared accounts in Redis, decided from leases.
//! - [`redis`]: the connection layer under it.

pub mod leased;
pub mod memory;
pub mod redis;

use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;

pub use crate::engine::Applied;
use crate::engine::alert::AlertRecord;
use crate::engine::ids::{AccountId, VersionId};
use crate::engine::pricing::PriceVersion;
use crate::engine::record::AuditRecord;
use crate::engine::{Account, Catalog, Command, EngineError, UsageRecord};

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The account does not exist.
    #[error("account {0} not found")]
    UnknownAccount(AccountId),
    /// An account with this id exists.
    #[error("account {0} already exists")]
    AccountExists(AccountId),
    /// The engine refused the command.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The store cannot be reached.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// Other writers kept winning the race for the same record: the store
    /// is reachable, only busy.
    #[error("store busy: {0}")]
    Busy(String),
}

impl From<crate::lease::Failure> for StoreError {
    fn from(failure: crate::lease::Failure) -> StoreError {
        match failure {
            crate::lease::Failure::Engine(e) => StoreError::Engine(e),
            crate::lease::Failure::Unavailable(why) => StoreError::Unavailable(why),
        }
    }
}

/// Alerts a store made, waiting for the service to hand them to the sink.
#[derive(Debug, Default)]
pub struct AlertQueue(std::sync::Mutex<Vec<AlertRecord>>);

impl AlertQueue {
    /// Adds `alerts` (taken last in any lock order: nothing is held under
    /// it).
    pub fn push(&self, alerts: Vec<AlertRecord>) {
        if !alerts.is_empty() {
            self.0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .extend(alerts);
        }
    }

    /// Takes every alert queued.
    pub fn take(&self) -> Vec<AlertRecord> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
    }
}

/// The authoritative state of every account, and the catalog.
#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    /// Adds a new account.
    async fn create(&self, account: Account) -> Result<(), StoreError>;

    /// Adds a new account an operator opened, with its audit record: a
    /// store with a usage stream adds the record to it in the same step.
    async fn create_audited(&self, account: Account, audit: &AuditRecord) -> Result<(), StoreError> {
        let _ = audit;
        self.create(account).await
    }

    /// Runs `command` on account `id` at `now`, atomically.
    async fn apply(&self, id: &AccountId, command: Command, now: Timestamp) -> Result<Applied, StoreError>;

    /// [`Store::apply`] for a call its client sent again after an unknown
    /// outcome, perhaps first to another process: a store a fleet shares
    /// answers it as the first call was answered once that call's record
    /// is in the store, and with a retryable error while it may be on its
    /// way. A store of one process remembers every answer itself.
    async fn apply_resent(&self, id: &AccountId, command: Command, now: Timestamp) -> Result<Applied, StoreError> {
        self.apply(id, command, now).await
    }

    /// Runs an operator's `command` under the adjustment id and with the
    /// audit record `audit` names (see [`Account::apply_audited`]): returns
    /// the record completed, or none for a retried adjustment (applied
    /// once, audited once). A store with a usage stream adds the record to
    /// it in the same atomic step as the change; the caller hands it to
    /// the usage sink.
    ///
    /// [`Account::apply_audited`]: crate::engine::account::Account::apply_audited
    async fn apply_audited(
        &self,
        id: &AccountId,
        command: Command,
        now: Timestamp,
        audit: &AuditRecord,
    ) -> Result<(Applied, Option<AuditRecord>), StoreError>;

    /// Adds `hits` to the fixed-window counter `key` (an Envoy rate-limit
    /// window of `limit` hits, ending `ttl` after `now`) and answers its
    /// count; shared by every sidecar of a store that is (each may count
    /// from hits it took ahead of use within the limit: see
    /// [`WindowShare`]).
    ///
    /// [`WindowShare`]: crate::engine::window::WindowShare
    async fn count_hits(
        &self,
        key: &str,
        hits: u64,
        limit: u64,
        ttl: Duration,
        now: Timestamp,
    ) -> Result<u64, StoreError>;

    /// Up to `limit` account ids after `after` (all from the first
    /// without), in byte order.
    async fn list(&self, after: Option<&AccountId>, limit: usize) -> Result<Vec<AccountId>, StoreError>;

    /// The current catalog.
    fn catalog(&self) -> Arc<Catalog>;

    /// The alerts made since the last call, for the usage sink (each made
    /// once, by the store that committed the crossing: see
    /// [`Account::alerts_due`]).
    ///
    /// [`Account::alerts_due`]: crate::engine::Account::alerts_due
    fn take_alerts(&self) -> Vec<AlertRecord>;

    /// Takes the configuration's catalog `next`, read again at `now` (see
    /// [`Catalog::reloaded`]): every problem if it is refused, and then
    /// the catalog in force is unchanged.
    ///
    /// [`Catalog::reloaded`]: crate::engine::catalog::Catalog::reloaded
    async fn reload(&self, next: Catalog, now: Timestamp) -> Result<(), Vec<String>>;

    /// Publishes a price version effective no earlier than `now`: every
    /// version id after, oldest first, and whether this call published it
    /// (`false`: the identical version was there already, a retry, perhaps
    /// through another sidecar; a different one under its id is refused).
    async fn publish(&self, version: PriceVersion, now: Timestamp) -> Result<(Vec<VersionId>, bool), StoreError>;

    /// Brings every account up to `now` (lapsed holds, expiries, resets) and
    /// forgets what the idempotency window no longer needs. Returns the
    /// records this produced.
    async fn sweep(&self, now: Timestamp) -> Result<Vec<Arc<UsageRecord>>, StoreError>;

    /// What the probes and the metrics read off the store at `now`.
    fn health(&self, now: Timestamp) -> Health;
}

/// A store's state for the readiness probe and the metrics.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Health {
    /// Why the store cannot serve now, if it cannot.
    pub unready: Option<String>,
    /// Reservations open in this process.
    pub holds_open: u64,
    /// Accounts held in this process's memory.
    pub accounts_cached: u64,
    /// Envoy rate-limit windows (or window shares) held in memory.
    pub rate_limit_windows: u64,
    /// The usage journal, if there is one.
    pub journal: Option<JournalHealth>,
}

/// The usage journal's backlog.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JournalHealth {
    /// Records written and not yet applied to Redis.
    pub pending: u64,
    /// Bytes its segments take.
    pub bytes: u64,
    /// Age of the oldest record not yet applied.
    pub lag: Duration,
}
