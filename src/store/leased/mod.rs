//! The Redis store: accounts shared by a fleet of sidecars, each deciding
//! from memory on slices leased from Redis (see `engine::lease`).
//!
//! **Keys.** Every key of an account carries its shard (a hash of the
//! account id) as its hash tag, so an account, its shard's usage stream,
//! index and request-id sets live in one Cluster slot and one script can
//! change them atomically (`keys.rs`):
//!
//! - `{prefix}:{<shard>}:account:<account>`: a hash, `v` (version), `state` (the
//!   shared account as JSON: ledgers, lots, plan, limit buckets, leases),
//!   `at` (ms, the instant the last change was computed at), `i` (in its
//!   shard's index of accounts), `s` (the schema it was written in,
//!   [`SCHEMA`]; none: 1).
//! - `{prefix}:prices`: the same shape, `state` holding the price versions
//!   published through the admin API (those in the configuration are not
//!   repeated there).
//! - channel `{prefix}:changes`: announces every admin change (an account
//!   id, or `prices`).
//!
//! **Writes.** Every change is computed by the engine in the sidecar from
//! the state it last read, then committed by one script, `lua/commit.lua`,
//! only if the version is still the one it read; otherwise the script
//! answers the current state and the engine computes again. The accounting
//! rules (draw order, periods in time zones, rounding) thus exist once, in
//! Rust, and every write is still one atomic step on one key.
//!
//! **Time** is the sidecar's clock aligned with Redis `TIME` (see
//! [`crate::clock::OffsetClock`]); the script refuses a change computed at
//! an instant further than `max_clock_skew` from Redis's own clock.
//!
//! **Decisions.** Reserve, extend, settle, release and charge run on the
//! account's mirror in this process, by the lease protocol
//! ([`crate::lease`]): this store does its I/O. When the mirror is short
//! it syncs (report, give back, borrow exactly the need) and runs the
//! command again, then decides as the last word. A background task
//! reports charges, renews leases, refills slices ahead of need, gives
//! back what idles, and refreshes mirrors on announcements, as the
//! protocol's upkeep asks.
//!
//! **Files.** `keys.rs`: where an account's records live. `connection.rs`:
//! calls to Redis and the backoff. `commit.rs`: the one script that writes,
//! and the stream entry it appends. `decisions.rs`: mirrors, syncs and
//! decisions. `upkeep.rs`: the background task and shutdown. `streams.rs`:
//! trimming the usage streams. `windows.rs`: Envoy rate-limit windows.
//!
//! **Locks.** An account's gate (a tokio mutex, held across its Redis
//! calls), then a `mirrors` shard, then the leaves; no `std` or DashMap
//! guard across an `.await`. The whole order, for both stores, is in
//! `docs/architecture.md` (Lock order).

mod commit;
mod connection;
mod decisions;
mod keys;
mod streams;
mod upkeep;
mod windows;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use jiff::Timestamp;
use redis::Script;

use super::redis::Redis;
use super::{Applied, Health, JournalHealth, Store, StoreError};
use crate::clock::{Clock, OffsetClock};
use crate::engine::alert::AlertRecord;
use crate::engine::ids::{AccountId, ProducerId, VersionId};
use crate::engine::pricing::{PriceBook, PriceVersion};
use crate::engine::record::AuditRecord;
use crate::engine::window::WindowShare;
use crate::engine::{Account, Catalog, Command, EngineError, Reply, UsageRecord};
use crate::lease::{Local, Numbering, Purpose};
use crate::usage::journal::{Entry, Journal};
use commit::Commit;
use commit::MAX_ATTEMPTS;
use commit::StreamEntry;
use commit::corrupt;

pub use crate::lease::LeaseSettings;

pub use commit::{entry_fields_hex, entry_records};
pub use keys::{SCHEMA, account_key, index_key, shard_of, stream_key};

/// Counters of what the store did, for tests, benchmarks and logs.
#[derive(Debug, Default)]
pub struct Stats {
    /// Commands decided (reserve, extend, settle, release, charge).
    pub decisions: AtomicU64,
    /// Calls to Redis.
    pub redis_calls: AtomicU64,
    /// Syncs that reached Redis.
    pub syncs: AtomicU64,
    /// Decisions made by the failure policy while Redis was unreachable.
    pub outage_decisions: AtomicU64,
    /// Commits retried because another sidecar changed the record first.
    pub conflicts: AtomicU64,
    /// Rate-limit window hits counted from what this sidecar held, without
    /// a call to Redis.
    pub window_hits_held: AtomicU64,
}

/// Serializes syncs of one account, and keeps the shared record between
/// them. Made with the account's mirror, let go of with it.
#[derive(Default)]
struct Gate {
    /// The shared record as last read or written: version and JSON.
    cached: Option<(u64, String)>,
}

/// The configured catalog and the one in force (see `RedisStore::catalogs`).
struct Catalogs {
    base: Catalog,
    installed: Arc<Catalog>,
}

/// Shared accounts in Redis, decided from leases.
pub struct RedisStore {
    redis: Redis,
    clock: Arc<dyn Clock>,
    aligned: Option<Arc<OffsetClock>>,
    /// Where records are made durable before they are acknowledged.
    journal: Option<Journal>,
    /// Journaled records found at start-up, waiting to be placed with their
    /// account's mirror (which needs Redis).
    replay: Mutex<Vec<Entry>>,
    /// Records whose append failed (already queued for Redis).
    unwritten: Mutex<Vec<Entry>>,
    settings: LeaseSettings,
    producer: ProducerId,
    seq: AtomicU64,
    commit: Script,
    /// The Envoy rate-limit windows' counter script.
    count: Script,
    /// The usage streams' trim script, and when it last ran (ms).
    trim: Script,
    last_trim_ms: std::sync::atomic::AtomicI64,
    /// This sidecar's share of each open rate-limit window, by key.
    windows: DashMap<String, WindowShare>,
    /// The configured catalog, and the one in force: the configured one
    /// with the published versions added to its prices. One lock, so a
    /// reload and an installation of prices never interleave.
    catalogs: RwLock<Catalogs>,
    mirrors: DashMap<AccountId, Local>,
    gates: DashMap<AccountId, Arc<tokio::sync::Mutex<Gate>>>,
    /// Redis failed recently: until then, calls fail at once.
    down_until: Mutex<Option<Instant>>,
    /// Redis answered the last PING (readiness; decisions never wait on
    /// it).
    reachable: std::sync::atomic::AtomicBool,
    prices_stale: std::sync::atomic::AtomicBool,
    /// The version of the prices record installed.
    prices_version: AtomicU64,
    sweeps: AtomicU64,
    /// Alerts its commits made, until the service takes them for the sink.
    alerts: crate::store::AlertQueue,
    /// What the store did.
    pub stats: Stats,
}

impl RedisStore {
    /// A store on `redis` for the accounts of `catalog`, timed by `clock`
    /// (when that is an [`OffsetClock`] on Redis's time, pass it as
    /// `aligned` too: it is aligned again every minute, so a stepped host
    /// clock or a failover to a Redis with another clock is followed).
    /// With a `journal` (and the entries it found at start-up, replayed in
    /// the background), records are durable before they are acknowledged.
    /// Loads the published price versions.
    pub async fn open(
        redis: Redis,
        catalog: Catalog,
        clock: Arc<dyn Clock>,
        aligned: Option<Arc<OffsetClock>>,
        journal: Option<(Journal, Vec<Entry>)>,
        settings: LeaseSettings,
    ) -> Result<Arc<RedisStore>, StoreError> {
        let (journal, replay) = match journal {
            Some((journal, pending)) => (Some(journal), pending),
            None => (None, Vec::new()),
        };
        let unique = format!(
            "{}-{}-{}",
            std::process::id(),
            Timestamp::now().as_millisecond(),
            rand_suffix()
        );
        let producer = ProducerId::parse(&unique).map_err(|e| StoreError::Unavailable(e.to_string()))?;
        let store = Arc::new(RedisStore {
            redis,
            clock,
            aligned,
            journal,
            replay: Mutex::new(replay),
            unwritten: Mutex::new(Vec::new()),
            settings,
            producer,
            seq: AtomicU64::new(0),
            commit: Script::new(include_str!("../lua/commit.lua")),
            count: Script::new(include_str!("../lua/count.lua")),
            trim: Script::new(include_str!("../lua/trim.lua")),
            last_trim_ms: std::sync::atomic::AtomicI64::new(0),
            windows: DashMap::new(),
            catalogs: RwLock::new(Catalogs {
                installed: Arc::new(catalog.clone()),
                base: catalog,
            }),
            mirrors: DashMap::new(),
            gates: DashMap::new(),
            down_until: Mutex::new(None),
            reachable: std::sync::atomic::AtomicBool::new(true),
            prices_stale: std::sync::atomic::AtomicBool::new(false),
            prices_version: AtomicU64::new(0),
            sweeps: AtomicU64::new(0),
            alerts: crate::store::AlertQueue::default(),
            stats: Stats::default(),
        });
        store.load_prices().await?;
        Ok(store)
    }

    /// This sidecar's producer id (on its lease reports).
    pub fn producer(&self) -> &ProducerId {
        &self.producer
    }

    /// The gate of `id`, made if there is none.
    fn gate(&self, id: &AccountId) -> Arc<tokio::sync::Mutex<Gate>> {
        self.gates.entry(id.clone()).or_default().clone()
    }

    /// Lets go of the gate of `id`, which the caller holds as `gate`,
    /// unless a mirror of `id` needs it or another task holds or awaits
    /// it (a mirror is made under its gate only, so none can appear
    /// meanwhile). The caller does nothing more under it: a task that
    /// comes after makes a new gate, with nothing cached.
    fn let_go(&self, id: &AccountId, gate: &Arc<tokio::sync::Mutex<Gate>>) {
        if !self.mirrors.contains_key(id) {
            // The map's reference and the caller's: nobody else has it.
            self.gates
                .remove_if(id, |_, g| Arc::ptr_eq(g, gate) && Arc::strong_count(g) == 2);
        }
    }

    async fn load_prices(&self) -> Result<(), StoreError> {
        let (version, published): (u64, Vec<PriceVersion>) = match self.read(&self.prices_key()).await? {
            Some((v, json)) => (
                v,
                serde_json::from_str(&json).map_err(|e| corrupt(&self.prices_key(), e))?,
            ),
            None => (0, Vec::new()),
        };
        self.install_prices(version, published)
    }

    /// Installs the published versions of record version `version`, unless
    /// a newer one is installed already (a slow read never undoes a
    /// publication).
    fn install_prices(&self, version: u64, published: Vec<PriceVersion>) -> Result<(), StoreError> {
        let mut catalogs = self.catalogs.write().unwrap_or_else(|p| p.into_inner());
        let base = &catalogs.base.prices;
        let mut all: Vec<PriceVersion> = base.versions().iter().map(|v| (**v).clone()).collect();
        // A version both configured here and published (a reload brought
        // it, or the file had it all along) counts once.
        for version in published {
            match base.get(&version.id) {
                None => all.push(version),
                Some(configured) if **configured == version => {}
                Some(_) => tracing::error!(
                    version = %version.id,
                    "a published price version differs from the configured one of the same id; the configured one stays"
                ),
            }
        }
        let prices = PriceBook::new(all).map_err(EngineError::from)?;
        let mut catalog = catalogs.base.clone();
        catalog.prices = prices;
        if version >= self.prices_version.load(Ordering::Relaxed) {
            self.prices_version.store(version, Ordering::Relaxed);
            catalogs.installed = Arc::new(catalog);
        }
        Ok(())
    }
}

/// A short random suffix for producer ids (two processes started in the
/// same millisecond with the same pid, in different containers).
fn rand_suffix() -> u32 {
    fastrand::u32(..)
}

#[async_trait::async_trait]
impl Store for RedisStore {
    async fn create(&self, account: Account) -> Result<(), StoreError> {
        self.write_new(account, None).await
    }

    async fn create_audited(&self, account: Account, audit: &AuditRecord) -> Result<(), StoreError> {
        self.write_new(account, Some(audit)).await
    }

    async fn apply(&self, id: &AccountId, command: Command, now: Timestamp) -> Result<Applied, StoreError> {
        match command {
            Command::Reserve(_)
            | Command::Extend { .. }
            | Command::Settle { .. }
            | Command::Release(_)
            | Command::Charge(_) => self.decide(id, command, false, now).await,
            Command::Adjustment(_) => Ok(Applied {
                reply: self.shared(id).await?.apply(&self.catalog(), command, now)?,
                records: Vec::new(),
            }),
            Command::Balance | Command::Snapshot => {
                // Report first and give back what this sidecar holds unused,
                // so the figures count its charges and show as held only
                // what its open reservations hold.
                if self.mirrors.contains_key(id) {
                    self.sync(id, None, Purpose::GiveBack).await?;
                }
                let mut shared = self.shared(id).await?;
                let mut reply = shared.apply(&self.catalog(), command, now)?;
                if let Reply::Snapshot(snapshot) = &mut reply
                    && let Some(local) = self.mirrors.get(id)
                {
                    snapshot.holds = local.mirror().open_holds();
                    snapshot.account.traffic_mut().recent = local.mirror().traffic().recent.clone();
                }
                Ok(Applied {
                    reply,
                    records: Vec::new(),
                })
            }
            admin => Ok(self.admin(id, admin, None).await?.0),
        }
    }

    async fn apply_resent(&self, id: &AccountId, command: Command, now: Timestamp) -> Result<Applied, StoreError> {
        match command {
            Command::Reserve(_) | Command::Settle { .. } | Command::Release(_) | Command::Charge(_) => {
                self.decide(id, command, true, now).await
            }
            _ => self.apply(id, command, now).await,
        }
    }

    async fn apply_audited(
        &self,
        id: &AccountId,
        command: Command,
        now: Timestamp,
        audit: &AuditRecord,
    ) -> Result<(Applied, Option<AuditRecord>), StoreError> {
        if command.is_admin() {
            // Whether the record a refund names was made: this sidecar's
            // mirror knows the requests it decided, the sets of the
            // fleet's commits those every sidecar reported.
            let command = match command.record_to_check(self.catalog().idempotency_window, now) {
                Some(request) => {
                    let made = self.mirrors.get(id).is_some_and(|l| l.mirror().made_record(request))
                        || self.recorded(id, request, now).await.map_err(StoreError::Unavailable)?;
                    command.with_recorded(made)
                }
                None => command,
            };
            self.admin(id, command, Some(audit)).await
        } else {
            Ok((self.apply(id, command, now).await?, None))
        }
    }

    async fn list(&self, after: Option<&AccountId>, limit: usize) -> Result<Vec<AccountId>, StoreError> {
        // Each shard's index in order, merged: `limit` from each is enough.
        let from = after.map_or_else(|| "-".to_owned(), |a| format!("({a}"));
        let mut ids = Vec::new();
        for shard in 0..self.settings.shards.max(1) {
            let names: Vec<String> = self.note(
                self.redis
                    .query(
                        redis::cmd("ZRANGE")
                            .arg(self.index_key(shard))
                            .arg(&from)
                            .arg("+")
                            .arg("BYLEX")
                            .arg("LIMIT")
                            .arg(0)
                            .arg(limit),
                    )
                    .await,
            )?;
            ids.extend(names.iter().filter_map(|n| AccountId::parse(n).ok()));
        }
        ids.sort();
        ids.truncate(limit);
        Ok(ids)
    }

    async fn count_hits(
        &self,
        key: &str,
        hits: u64,
        limit: u64,
        ttl: Duration,
        now: Timestamp,
    ) -> Result<u64, StoreError> {
        self.count_window(key, hits, limit, ttl, now).await
    }

    fn take_alerts(&self) -> Vec<AlertRecord> {
        self.alerts.take()
    }

    fn catalog(&self) -> Arc<Catalog> {
        let catalogs = self.catalogs.read().unwrap_or_else(|p| p.into_inner());
        Arc::clone(&catalogs.installed)
    }

    async fn reload(&self, next: Catalog, now: Timestamp) -> Result<(), Vec<String>> {
        let mut catalogs = self.catalogs.write().unwrap_or_else(|p| p.into_inner());
        // Checked against every version, published ones included.
        let installed = catalogs.installed.reloaded(next, now)?;
        let Catalogs { base, .. } = &*catalogs;
        let published: Vec<&VersionId> = catalogs
            .installed
            .prices
            .versions()
            .iter()
            .filter(|v| base.prices.get(&v.id).is_none())
            .map(|v| &v.id)
            .collect();
        let configured: Vec<PriceVersion> = installed
            .prices
            .versions()
            .iter()
            .filter(|v| !published.contains(&&v.id))
            .map(|v| PriceVersion::clone(v))
            .collect();
        let prices = PriceBook::new(configured).map_err(|e| vec![format!("prices: {e}")])?;
        catalogs.base = Catalog {
            prices,
            ..Catalog::clone(&installed)
        };
        catalogs.installed = Arc::new(installed);
        Ok(())
    }

    async fn publish(&self, version: PriceVersion, now: Timestamp) -> Result<(Vec<VersionId>, bool), StoreError> {
        let key = self.prices_key();
        let ids = |book: &PriceBook| book.versions().iter().map(|v| v.id.clone()).collect();
        for _ in 0..MAX_ATTEMPTS {
            let (v, mut published): (u64, Vec<PriceVersion>) = match self.read(&key).await? {
                Some((v, json)) => (v, serde_json::from_str(&json).map_err(|e| corrupt(&key, e))?),
                None => (0, Vec::new()),
            };
            let mut book = self
                .catalogs
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .base
                .prices
                .clone();
            for p in &published {
                book.publish(p.clone(), p.effective_at).map_err(EngineError::from)?;
            }
            if book.holds(&version) {
                // Published already, perhaps through another sidecar.
                self.install_prices(v, published)?;
                return Ok((ids(&book), false));
            }
            book.publish(version.clone(), now).map_err(EngineError::from)?;
            published.push(version.clone());
            let state = serde_json::to_string(&published).map_err(|e| corrupt(&key, e))?;
            if let Commit::Done(committed) = self
                .write(
                    &[&key],
                    v,
                    &state,
                    now,
                    Some("prices"),
                    &StreamEntry::default(),
                    None,
                    None,
                )
                .await?
            {
                self.install_prices(committed, published)?;
                return Ok((ids(&book), true));
            }
            self.stats.conflicts.fetch_add(1, Ordering::Relaxed);
        }
        Err(StoreError::Busy(format!(
            "redis: {key} changed under every one of {MAX_ATTEMPTS} attempts"
        )))
    }

    fn health(&self, now: Timestamp) -> Health {
        let mut holds_open = 0;
        let mut oldest: Option<Timestamp> = None;
        for local in self.mirrors.iter() {
            holds_open += local.mirror().traffic().expiries.len() as u64;
            for entry in local.journaled() {
                let at = entry.record.settled_at;
                oldest = Some(oldest.map_or(at, |o| o.min(at)));
            }
        }
        let replaying = !self.replay.lock().unwrap_or_else(|p| p.into_inner()).is_empty();
        let unready = if replaying {
            Some("replaying the usage journal".to_owned())
        } else if !self.reachable.load(Ordering::Relaxed)
            && !self.catalog().plans.values().any(|p| p.on_store_outage.admits())
        {
            Some("Redis is unreachable and every plan's failure policy is closed".to_owned())
        } else {
            None
        };
        Health {
            unready,
            holds_open,
            // Every account held has a gate (a mirror is made under one),
            // with the record last read or written.
            accounts_cached: self.gates.len() as u64,
            rate_limit_windows: self.windows.len() as u64,
            journal: self.journal.as_ref().map(|j| JournalHealth {
                pending: j.backlog() as u64,
                bytes: j.bytes(),
                lag: oldest.map(|o| now.duration_since(o).unsigned_abs()).unwrap_or_default(),
            }),
        }
    }

    async fn sweep(&self, now: Timestamp) -> Result<Vec<Arc<UsageRecord>>, StoreError> {
        let catalog = self.catalog();
        let full = self
            .sweeps
            .fetch_add(1, Ordering::Relaxed)
            .is_multiple_of(super::memory::FULL_SWEEP_EVERY);
        let mut records = Vec::new();
        let mut entries = Vec::new();
        let mut numbering = self.journal.as_ref();
        for mut entry in self.mirrors.iter_mut() {
            let id = entry.key().clone();
            let local = entry.value_mut();
            let (advanced, made, told) = local.sweep(&catalog, now, full);
            if let Err(e) = advanced {
                tracing::warn!(account = %id, error = %e, "sweep could not advance account");
            }
            match local.entries(
                &made,
                numbering.as_mut().map(|j| j as &mut dyn Numbering),
                &self.producer,
            ) {
                Ok(made) => entries.push((id, made)),
                Err(e) => tracing::error!(account = %id, error = %e, "records of lapsed holds not journaled"),
            }
            records.extend(told);
        }
        for (id, made) in entries {
            if made.is_empty() {
                continue;
            }
            if let Err(e) = self.journal_records(&id, made).await {
                tracing::error!(account = %id, error = %e, "records of lapsed holds are not durable");
            }
        }
        Ok(records)
    }
}
