//! The embedded store: accounts in a sharded concurrent map.
//!
//! Volatile by design: everything is lost when the process exits. It is the
//! default so Tollgate runs with nothing else installed; fleets share state
//! through the Redis store.

use std::sync::{Arc, RwLock};

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use jiff::Timestamp;

use super::{Applied, Store, StoreError};
use crate::engine::ids::{AccountId, VersionId};
use crate::engine::pricing::PriceVersion;
use crate::engine::{Account, Catalog, Command, EngineError, UsageRecord};

/// Accounts in a [`DashMap`]: a command locks only its account's shard,
/// for the microseconds the engine takes, and never across an `.await`.
pub struct MemoryStore {
    accounts: DashMap<AccountId, Account>,
    /// Replaced whole on publish; readers clone the `Arc` and let go of the
    /// lock at once.
    catalog: RwLock<Arc<Catalog>>,
}

impl MemoryStore {
    /// An empty store measuring accounts against `catalog`.
    pub fn new(catalog: Catalog) -> MemoryStore {
        MemoryStore {
            accounts: DashMap::new(),
            catalog: RwLock::new(Arc::new(catalog)),
        }
    }
}

fn poisoned() -> StoreError {
    StoreError::Unavailable("catalog lock poisoned".into())
}

#[async_trait::async_trait]
impl Store for MemoryStore {
    async fn create(&self, account: Account) -> Result<(), StoreError> {
        match self.accounts.entry(account.id.clone()) {
            Entry::Occupied(_) => Err(StoreError::AccountExists(account.id)),
            Entry::Vacant(slot) => {
                slot.insert(account);
                Ok(())
            }
        }
    }

    async fn apply(&self, id: &AccountId, command: Command, now: Timestamp) -> Result<Applied, StoreError> {
        let catalog = self.catalog();
        let mut account = self
            .accounts
            .get_mut(id)
            .ok_or_else(|| StoreError::UnknownAccount(id.clone()))?;
        let result = account.apply(&catalog, command, now);
        // Time-driven effects (lapsed holds) happen even when the command is
        // refused, so their records are taken either way.
        let records = account.take_records();
        drop(account);
        match result {
            Ok(reply) => Ok(Applied { reply, records }),
            Err(e) if records.is_empty() => Err(e.into()),
            Err(e) => {
                // Not lost: re-queue so the next command or sweep emits them.
                if let Some(mut account) = self.accounts.get_mut(id) {
                    account.outbox.extend(records);
                }
                Err(e.into())
            }
        }
    }

    fn catalog(&self) -> Arc<Catalog> {
        self.catalog
            .read()
            .map(|c| Arc::clone(&c))
            .unwrap_or_else(|p| Arc::clone(&p.into_inner()))
    }

    async fn publish(&self, version: PriceVersion, now: Timestamp) -> Result<Vec<VersionId>, StoreError> {
        let mut guard = self.catalog.write().map_err(|_| poisoned())?;
        let mut next = Catalog::clone(&guard);
        next.prices.publish(version, now).map_err(EngineError::from)?;
        let ids = next.prices.versions().iter().map(|v| v.id.clone()).collect();
        *guard = Arc::new(next);
        Ok(ids)
    }

    async fn sweep(&self, now: Timestamp) -> Result<Vec<UsageRecord>, StoreError> {
        let catalog = self.catalog();
        let mut records = Vec::new();
        for mut account in self.accounts.iter_mut() {
            // One account's failure (a date out of range) must not stop the
            // others from lapsing their holds.
            if let Err(e) = account.advance(&catalog, now) {
                tracing::warn!(account = %account.id, error = %e, "sweep could not advance account");
            }
            account.prune(&catalog, now);
            records.append(&mut account.outbox);
        }
        Ok(records)
    }
}
