//! The embedded store: accounts in a sharded concurrent map.
//!
//! Volatile by design: everything is lost when the process exits. It is the
//! default so Tollgate runs with nothing else installed; fleets share state
//! through the Redis store.
//!
//! # Lock order
//! An `accounts` shard first, then the watchlist; the rate-limit windows and
//! the catalog are leaves (nothing else is taken while one is held). The
//! watchlist enforces its place: it hands out no guard, so no code can hold
//! it while taking an account. The readiness probe and the sweeper once took
//! the two in opposite orders and hung every worker. (Both stores' orders
//! are in `docs/architecture.md`, Lock order.)

use std::sync::{Arc, RwLock};
use std::time::Duration;

use std::sync::atomic::{AtomicU64, Ordering};

use dashmap::mapref::entry::Entry;
use dashmap::{DashMap, DashSet};
use jiff::Timestamp;

use super::{AlertQueue, Applied, Health, Store, StoreError};
use crate::engine::alert::AlertRecord;
use crate::engine::ids::{AccountId, VersionId};
use crate::engine::pricing::{PriceBook, PriceVersion};
use crate::engine::record::AuditRecord;
use crate::engine::{Account, Catalog, Command, EngineError, UsageRecord};

/// Accounts in a [`DashMap`]: a command locks only its account's shard,
/// for the microseconds the engine takes, and never across an `.await`.
pub struct MemoryStore {
    /// Boxed: the map's table keeps slots empty for growth, and an empty
    /// slot then costs a pointer, not a whole account.
    accounts: DashMap<AccountId, Box<Account>>,
    /// Accounts with open holds or records waiting in their outbox: what a
    /// light sweep visits.
    holding: Watchlist,
    /// Sweeps so far; every [`FULL_SWEEP_EVERY`]th visits every account.
    sweeps: AtomicU64,
    /// Envoy rate-limit windows: count, and when the window ends.
    windows: DashMap<String, (u64, Timestamp)>,
    /// The most windows open at once (their keys are chosen by callers).
    max_windows: usize,
    /// Replaced whole on publish; readers clone the `Arc` and let go of the
    /// lock at once.
    catalog: RwLock<Arc<Catalog>>,
    /// Alerts made, until the service takes them for the sink.
    alerts: AlertQueue,
}

impl MemoryStore {
    /// An empty store measuring accounts against `catalog`.
    pub fn new(catalog: Catalog) -> MemoryStore {
        MemoryStore {
            accounts: DashMap::new(),
            holding: Watchlist::default(),
            sweeps: AtomicU64::new(0),
            windows: DashMap::new(),
            max_windows: MAX_WINDOWS,
            catalog: RwLock::new(Arc::new(catalog)),
            alerts: AlertQueue::default(),
        }
    }

    /// The same, keeping at most `n` rate-limit windows open.
    pub fn with_max_windows(mut self, n: usize) -> MemoryStore {
        self.max_windows = n;
        self
    }

    /// Forgets windows that have ended; counts them.
    fn end_windows(&self, now: Timestamp) {
        let before = self.windows.len();
        self.windows.retain(|_, (_, ends)| *ends > now);
        crate::telemetry::metrics::metrics().evicted("rate_limit_window", before.saturating_sub(self.windows.len()));
    }
}

/// A set of account ids that is last in the lock order: each method takes
/// and lets go of the set's lock within itself and takes no other lock, and
/// none hands out a guard. So an account's guard may be held while calling
/// it, and the set is never held while an account is taken.
#[derive(Default)]
struct Watchlist(DashSet<AccountId>);

impl Watchlist {
    fn watch(&self, id: &AccountId) {
        if !self.0.contains(id) {
            self.0.insert(id.clone());
        }
    }

    fn unwatch(&self, id: &AccountId) {
        self.0.remove(id);
    }

    /// The ids watched now, copied out.
    fn ids(&self) -> Vec<AccountId> {
        self.0.iter().map(|id| id.clone()).collect()
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.0.len()
    }
}

/// Open rate-limit windows the memory store keeps at most by default:
/// request values are chosen by callers, so their number is bounded.
pub const MAX_WINDOWS: usize = 1_000_000;

/// Where a window's count stops (as on Redis: 2^53).
const MOST_HITS: u64 = 1 << 53;

/// Every how many sweeps one visits every account (and prunes idempotency
/// memory); the others visit only accounts with open holds.
pub const FULL_SWEEP_EVERY: u64 = 60;

fn poisoned() -> StoreError {
    StoreError::Unavailable("catalog lock poisoned".into())
}

#[async_trait::async_trait]
impl Store for MemoryStore {
    async fn create(&self, account: Account) -> Result<(), StoreError> {
        match self.accounts.entry(account.id.clone()) {
            Entry::Occupied(_) => Err(StoreError::AccountExists(account.id)),
            Entry::Vacant(slot) => {
                slot.insert(Box::new(account));
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
        // A refused command still lets time act (a lapsed hold charged in
        // full): its records stay in the outbox, and the account stays on the
        // sweep's list until a sweep or the next command takes them.
        let records = if result.is_ok() {
            account.take_records()
        } else {
            Vec::new()
        };
        let alerts = account.alerts_due(&catalog, now);
        let watch = !account.traffic().expiries.is_empty() || !account.traffic().outbox.is_empty();
        drop(account);
        self.alerts.push(alerts);
        if watch {
            self.holding.watch(id);
        }
        Ok(Applied {
            reply: result?,
            records,
        })
    }

    async fn apply_audited(
        &self,
        id: &AccountId,
        command: Command,
        now: Timestamp,
        audit: &AuditRecord,
    ) -> Result<(Applied, Option<AuditRecord>), StoreError> {
        let catalog = self.catalog();
        let mut account = self
            .accounts
            .get_mut(id)
            .ok_or_else(|| StoreError::UnknownAccount(id.clone()))?;
        // This process decides every request of the account: it knows
        // whether the record a refund names was made.
        let made = command
            .record_to_check(catalog.idempotency_window, now)
            .map(|request| account.made_record(request));
        let command = match made {
            Some(made) => command.with_recorded(made),
            None => command,
        };
        let (reply, record) = account.apply_audited(&catalog, command, now, audit)?;
        let records = account.take_records();
        let alerts = account.alerts_due(&catalog, now);
        drop(account);
        self.alerts.push(alerts);
        Ok((Applied { reply, records }, record))
    }

    async fn list(&self, after: Option<&AccountId>, limit: usize) -> Result<Vec<AccountId>, StoreError> {
        let mut ids: Vec<AccountId> = self
            .accounts
            .iter()
            .map(|e| e.key().clone())
            .filter(|id| after.is_none_or(|a| id > a))
            .collect();
        ids.sort();
        ids.truncate(limit);
        Ok(ids)
    }

    fn take_alerts(&self) -> Vec<AlertRecord> {
        self.alerts.take()
    }

    fn catalog(&self) -> Arc<Catalog> {
        self.catalog
            .read()
            .map(|c| Arc::clone(&c))
            .unwrap_or_else(|p| Arc::clone(&p.into_inner()))
    }

    async fn count_hits(
        &self,
        key: &str,
        hits: u64,
        _limit: u64,
        ttl: Duration,
        now: Timestamp,
    ) -> Result<u64, StoreError> {
        let ends = now
            .checked_add(ttl)
            .map_err(|_| StoreError::Engine(EngineError::Overflow))?;
        if !self.windows.contains_key(key) {
            if hits == 0 {
                return Ok(0);
            }
            if self.windows.len() >= self.max_windows {
                self.end_windows(now);
                if self.windows.len() >= self.max_windows {
                    return Err(StoreError::Busy(format!(
                        "{} rate-limit windows are open; refusing a new one",
                        self.max_windows
                    )));
                }
            }
        }
        let mut window = self.windows.entry(key.to_owned()).or_insert((0, ends));
        if window.1 <= now {
            *window = (0, ends);
        }
        window.0 = window.0.saturating_add(hits).min(MOST_HITS);
        Ok(window.0)
    }

    fn health(&self, _now: Timestamp) -> Health {
        let holds_open = self
            .holding
            .ids()
            .iter()
            .filter_map(|id| self.accounts.get(id).map(|a| a.traffic().expiries.len() as u64))
            .sum();
        Health {
            unready: None,
            holds_open,
            accounts_cached: self.accounts.len() as u64,
            rate_limit_windows: self.windows.len() as u64,
            journal: None,
        }
    }

    async fn reload(&self, next: Catalog, now: Timestamp) -> Result<(), Vec<String>> {
        let mut guard = self.catalog.write().unwrap_or_else(|p| p.into_inner());
        *guard = Arc::new(guard.reloaded(next, now)?);
        Ok(())
    }

    async fn publish(&self, version: PriceVersion, now: Timestamp) -> Result<(Vec<VersionId>, bool), StoreError> {
        let mut guard = self.catalog.write().map_err(|_| poisoned())?;
        let ids = |book: &PriceBook| book.versions().iter().map(|v| v.id.clone()).collect();
        if guard.prices.holds(&version) {
            return Ok((ids(&guard.prices), false));
        }
        let mut next = Catalog::clone(&guard);
        next.prices.publish(version, now).map_err(EngineError::from)?;
        let published = ids(&next.prices);
        *guard = Arc::new(next);
        Ok((published, true))
    }

    async fn sweep(&self, now: Timestamp) -> Result<Vec<Arc<UsageRecord>>, StoreError> {
        self.end_windows(now);
        let catalog = self.catalog();
        let mut records = Vec::new();
        let visit = |account: &mut Account, records: &mut Vec<Arc<UsageRecord>>| {
            // One account's failure (a date out of range) must not stop the
            // others from lapsing their holds.
            if let Err(e) = account.advance(&catalog, now) {
                tracing::warn!(account = %account.id, error = %e, "sweep could not advance account");
            }
            records.append(&mut account.take_records());
            if account.traffic().expiries.is_empty() {
                // The outbox was just emptied: nothing left to watch.
                self.holding.unwatch(&account.id);
            }
        };
        if self
            .sweeps
            .fetch_add(1, Ordering::Relaxed)
            .is_multiple_of(FULL_SWEEP_EVERY)
        {
            // Full pass: also forget what the idempotency window no longer needs.
            for mut account in self.accounts.iter_mut() {
                visit(&mut account, &mut records);
                account.prune(&catalog, now);
            }
        } else {
            // Light pass: only accounts with open holds can have holds to lapse.
            for id in self.holding.ids() {
                if let Some(mut account) = self.accounts.get_mut(&id) {
                    visit(&mut account, &mut records);
                }
            }
        }
        Ok(records)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DEMO, Settings};
    use crate::engine::ExpiryPolicy;
    use crate::engine::ids::{LotId, ModelId, PlanId, RequestId, ReservationId, TierId};
    use crate::engine::request::Pool;
    use crate::engine::{Money, Reply, ReserveRequest};

    const NOW: &str = "2026-11-29T12:00:00Z";

    /// The demo catalog with holds charged in full, and `accounts` on
    /// `payg` with 1 unit of paid money each.
    async fn store(accounts: &[&str]) -> (MemoryStore, Catalog) {
        let mut catalog = Settings::parse(DEMO, &|_| None).unwrap().catalog;
        catalog.on_expiry = ExpiryPolicy::ChargeInFull;
        let store = MemoryStore::new(catalog.clone());
        let now: Timestamp = NOW.parse().unwrap();
        let plan = &catalog.plans[&PlanId::parse("payg").unwrap()];
        for name in accounts {
            let id = AccountId::parse(name).unwrap();
            let account = Account::open(id.clone(), plan, jiff::tz::TimeZone::UTC, None, Money::ZERO, now).unwrap();
            store.create(account).await.unwrap();
            let operation_id = LotId::parse("t").unwrap();
            let top_up = Command::TopUp {
                operation_id,
                pool: Pool::Paid,
                amount: "1".parse().unwrap(),
            };
            store.apply(&id, top_up, now).await.unwrap();
        }
        (store, catalog)
    }

    fn reserve(input_tokens: u64, max_output_tokens: u64) -> Command {
        reserve_as("r1", input_tokens, max_output_tokens)
    }

    fn reserve_as(request_id: &str, input_tokens: u64, max_output_tokens: u64) -> Command {
        Command::Reserve(ReserveRequest {
            request_id: RequestId::parse(request_id).unwrap(),
            api_key_id: None,
            model: ModelId::parse("llama-3.1-8b").unwrap(),
            tier: TierId::default_tier(),
            input_tokens,
            cached_input_tokens: 0,
            max_output_tokens,
        })
    }

    #[tokio::test]
    async fn light_sweeps_lapse_holds_and_full_sweeps_prune() {
        let (store, catalog) = store(&["idle", "busy"]).await;
        let now: Timestamp = NOW.parse().unwrap();
        let busy = AccountId::parse("busy").unwrap();
        let applied = store.apply(&busy, reserve(1000, 1000), now).await.unwrap();
        assert!(matches!(applied.reply, Reply::Reserve(_)));
        assert_eq!(store.holding.len(), 1);
        // The first sweep is a full one; the next ones are light.
        assert!(store.sweep(now).await.unwrap().is_empty());
        let later = now + catalog.hold_ttl;
        let records = store.sweep(later).await.unwrap();
        assert_eq!(records.len(), 1, "the lapsed hold was charged in full");
        assert_eq!(records[0].total_money.to_string(), "0.000300000000");
        assert_eq!(store.holding.len(), 0);
        assert!(store.sweep(later).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn records_of_a_refused_command_wait_for_the_next_sweep() {
        let (store, catalog) = store(&["late"]).await;
        let now: Timestamp = NOW.parse().unwrap();
        let id = AccountId::parse("late").unwrap();
        store.apply(&id, reserve(10, 10), now).await.unwrap();
        store.sweep(now).await.unwrap(); // the full sweep; the next ones are light
        // A settle after the TTL is refused, but the hold lapsed and was charged.
        let late = now + catalog.hold_ttl;
        let reservation = ReservationId::parse("r1").unwrap();
        let settle = Command::Settle {
            reservation,
            usage: Default::default(),
        };
        assert!(store.apply(&id, settle, late).await.is_err());
        let records = store.sweep(late).await.unwrap();
        assert_eq!(
            records.len(),
            1,
            "the record of the lapsed hold is emitted by the light sweep"
        );
        assert!(store.sweep(late).await.unwrap().is_empty());
    }

    /// The readiness probe reads the store every 250 ms while sweeps lapse
    /// holds: the two once took the account map and the holding set in
    /// opposite orders and hung both tokio workers. Here they race on two
    /// threads for a bounded number of rounds; a deadlock shows as a round
    /// that never ends.
    #[test]
    fn health_and_sweep_racing_never_deadlock() {
        const ACCOUNTS: usize = 500;
        const ROUNDS: u64 = 100;
        let runtime = || tokio::runtime::Builder::new_current_thread().build().unwrap();
        let names: Vec<String> = (0..ACCOUNTS).map(|i| format!("a{i}")).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let (store, catalog) = runtime().block_on(store(&names));
        let store = Arc::new(store);
        let ids: Vec<AccountId> = names.iter().map(|n| AccountId::parse(n).unwrap()).collect();
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (finished, finishing) = std::sync::mpsc::channel();

        let prober = {
            let (store, done, finished) = (Arc::clone(&store), Arc::clone(&done), finished.clone());
            std::thread::spawn(move || {
                let now: Timestamp = NOW.parse().unwrap();
                let mut probes = 0u64;
                while !done.load(Ordering::Relaxed) {
                    std::hint::black_box(store.health(now));
                    probes += 1;
                }
                finished.send("prober").unwrap();
                probes
            })
        };
        let sweeper = {
            let store = Arc::clone(&store);
            std::thread::spawn(move || {
                // Stops the prober however this thread ends (a failed
                // assertion too), and says so.
                struct Finish(
                    Arc<std::sync::atomic::AtomicBool>,
                    std::sync::mpsc::Sender<&'static str>,
                );
                impl Drop for Finish {
                    fn drop(&mut self) {
                        self.0.store(true, Ordering::Relaxed);
                        let _ = self.1.send("sweeper");
                    }
                }
                let _finish = Finish(done, finished);
                let runtime = runtime();
                let mut now: Timestamp = NOW.parse().unwrap();
                for round in 0..ROUNDS {
                    for id in &ids {
                        let command = reserve_as(&format!("r{round}"), 10, 10);
                        runtime.block_on(store.apply(id, command, now)).unwrap();
                    }
                    now += catalog.hold_ttl;
                    let lapsed = runtime.block_on(store.sweep(now)).unwrap();
                    assert_eq!(lapsed.len(), ACCOUNTS, "round {round}: every hold lapsed");
                }
            })
        };
        for _ in 0..2 {
            match finishing.recv_timeout(Duration::from_secs(60)) {
                Ok(_) => {}
                Err(_) => panic!("health and sweep deadlocked: a thread is stuck on the store's locks"),
            }
        }
        if let Err(panic) = sweeper.join() {
            std::panic::resume_unwind(panic);
        }
        assert!(prober.join().unwrap() > 0);
        assert_eq!(store.holding.len(), 0, "no hold is left open");
    }
}
