//! The Redis store: accounts shared by a fleet of sidecars, each deciding
//! from memory on slices leased from Redis (see `engine::lease`).
//!
//! **Keys.** Every key of an account carries the account id as its hash
//! tag, so it lives in one Cluster slot and one script can change it
//! atomically:
//!
//! - `{prefix}:{<account>}:account`: a hash, `v` (version), `state` (the
//!   shared account as JSON: ledgers, lots, plan, limit buckets, leases),
//!   `at` (ms, the instant the last change was computed at).
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
//! account's mirror in this process. When the mirror is short the store
//! syncs once (report, give back, borrow exactly the need) and runs the
//! command again as the last word. A background task reports charges,
//! renews leases, refills slices ahead of need, gives back what idles, and
//! refreshes mirrors on announcements.
//!
//! **Locks.** An account's gate (a tokio mutex, held across its Redis
//! calls), then a `mirrors` shard, then the leaves; no `std` or DashMap
//! guard across an `.await`. The whole order, for both stores, is in
//! `docs/architecture.md` (Lock order).

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use jiff::{SignedDuration, Timestamp};
use redis::Script;
use tokio_stream::StreamExt;

use super::redis::Redis;
use super::{Applied, Health, JournalHealth, Store, StoreError};
use crate::clock::{Clock, OffsetClock};
use crate::engine::catalog::OutagePolicy;
use crate::engine::ids::{AccountId, ProducerId, VersionId};
use crate::engine::lease::{Granted, Journaled, Short, Sync};
use crate::engine::pricing::{PriceBook, PriceVersion};
use crate::engine::record::{AuditRecord, request_fingerprint};
use crate::engine::window::WindowShare;
use crate::engine::{Account, Catalog, Command, EngineError, Reply, UsageRecord};
use crate::journal::{Entry, Journal};
use crate::lease::{Context, Decide, Failure, Local, Next, Numbering, Purpose, SyncOutcome, Upkeep};
use crate::metrics::metrics;

pub use crate::lease::LeaseSettings;

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
/// them.
#[derive(Default)]
struct Gate {
    /// The shared record as last read or written: version and JSON.
    cached: Option<(u64, String)>,
}

/// The records of one commit as its usage stream entry carries them, each
/// encoded once, straight into the entry's two fields: a JSON array (usage
/// records as in the usage file, with their id and where they were
/// journaled; audit records with their id) and a protobuf
/// `UsageRecordBatch` (usage records only). With them, the fingerprints of
/// the usage records' request ids, checked and remembered by the commit.
#[derive(Default)]
struct StreamEntry {
    count: usize,
    json: Vec<u8>,
    pb: Vec<u8>,
    fingerprints: Vec<u8>,
}

/// A record with the fields the stream adds to it.
#[derive(serde::Serialize)]
struct Tagged<'a, R> {
    #[serde(flatten)]
    record: &'a R,
    record_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    journal: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    journal_seq: Option<u64>,
}

impl StreamEntry {
    /// Adds a journaled usage record.
    fn record(&mut self, entry: &Journaled) -> Result<(), StoreError> {
        self.json(&Tagged {
            record: &entry.record,
            record_id: entry.record.id(),
            journal: Some(entry.journal.as_str()),
            journal_seq: Some(entry.seq),
        })?;
        let mut pb = crate::api::convert::record_out(&entry.record);
        pb.journal = entry.journal.to_string();
        pb.journal_seq = entry.seq;
        // `records` is field 1 of the batch: its tag, then the message,
        // length-delimited; a batch is these, one after the other.
        self.pb.push(0x0a);
        prost::Message::encode_length_delimited(&pb, &mut self.pb).map_err(|e| corrupt("a usage record", e))?;
        self.fingerprints
            .extend_from_slice(&request_fingerprint(&entry.record.account_id, &entry.record.request_id));
        Ok(())
    }

    /// Adds an operator's change (JSON only).
    fn audit(&mut self, audit: &AuditRecord) -> Result<(), StoreError> {
        self.json(&Tagged {
            record: audit,
            record_id: audit.id(),
            journal: None,
            journal_seq: None,
        })
    }

    fn json(&mut self, tagged: &impl serde::Serialize) -> Result<(), StoreError> {
        self.json.push(if self.count == 0 { b'[' } else { b',' });
        serde_json::to_writer(&mut self.json, tagged).map_err(|e| corrupt("a stream record", e))?;
        self.count += 1;
        Ok(())
    }

    /// The entry's JSON array.
    fn json_array(&self) -> Vec<u8> {
        let mut json = Vec::with_capacity(self.json.len() + 1);
        json.extend_from_slice(&self.json);
        json.push(b']');
        json
    }
}

/// The configured catalog and the one in force (see `RedisStore::catalogs`).
struct Catalogs {
    base: Catalog,
    installed: Arc<Catalog>,
}

/// How a commit ended.
enum Commit {
    Done(u64),
    Moved(u64, String),
    /// These usage records (by position) are of request ids committed
    /// already: nothing was written.
    Repeated(Vec<usize>),
}

/// Where a commit checks and remembers its records' request ids (see
/// [`RedisStore::seen`]).
struct Seen {
    /// The sets of the buckets of the last idempotency window, the current
    /// one first.
    keys: Vec<String>,
    /// When the current bucket's set may go, ms since the epoch.
    until_ms: i64,
}

/// Request ids are remembered in one set per shard and time bucket, a
/// quarter of the idempotency window long: a commit looks in the buckets
/// that may hold an id of the last window and adds to the current one.
const SEEN_BUCKETS: i64 = 4;

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
    /// What the store did.
    pub stats: Stats,
}

/// After a failed call, Redis is not tried again for this long (the
/// background task probes it; decisions use the failure policy meanwhile).
const BACKOFF: Duration = Duration::from_millis(500);

/// How long shutdown keeps trying to report and return leases.
const CLOSE_RETRIES: Duration = Duration::from_secs(5);

/// Most attempts of one change against concurrent writers. A lost race
/// answers the current state, so the next attempt starts from it at once;
/// after [`EAGER_ATTEMPTS`] lost races in a row a writer steps aside for a
/// random moment (up to 2 ms) and reads afresh, so a slow writer is not
/// starved by faster ones.
const MAX_ATTEMPTS: u32 = 64;

/// Rate-limit windows this sidecar keeps a share of; beyond, new windows
/// are counted in Redis call by call.
const MAX_WINDOW_SHARES: usize = 100_000;

/// Seconds a window's counter outlives its end in Redis: a sidecar whose
/// clock trails the others' still finds the count.
const WINDOW_MARGIN_SECONDS: u64 = 60;
const EAGER_ATTEMPTS: u32 = 8;

fn corrupt(key: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("redis: record {key} is unreadable: {e}"))
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
            commit: Script::new(include_str!("lua/commit.lua")),
            count: Script::new(include_str!("lua/count.lua")),
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
            stats: Stats::default(),
        });
        store.load_prices().await?;
        Ok(store)
    }

    /// This sidecar's producer id (on its lease reports).
    pub fn producer(&self) -> &ProducerId {
        &self.producer
    }

    fn account_key(&self, id: &AccountId) -> String {
        account_key(&self.settings.prefix, self.settings.shards, id.as_str())
    }

    fn stream_key(&self, id: &AccountId) -> String {
        stream_key(&self.settings.prefix, shard_of(self.settings.shards, id.as_str()))
    }

    fn index_key(&self, shard: u32) -> String {
        format!("{}:{{{shard}}}:accounts", self.settings.prefix)
    }

    fn prices_key(&self) -> String {
        format!("{}:prices", self.settings.prefix)
    }

    /// The channel admin changes are announced on.
    pub fn changes_channel(&self) -> String {
        format!("{}:changes", self.settings.prefix)
    }

    // ---- Redis calls, each counted and guarded by the backoff ----

    fn check_up(&self) -> Result<(), StoreError> {
        let down = self.down_until.lock().unwrap_or_else(|p| p.into_inner());
        match *down {
            Some(until) if Instant::now() < until => Err(StoreError::Unavailable(
                "redis: unreachable at the last attempt; retrying shortly".into(),
            )),
            _ => Ok(()),
        }
    }

    fn note<T>(&self, result: Result<T, StoreError>) -> Result<T, StoreError> {
        self.stats.redis_calls.fetch_add(1, Ordering::Relaxed);
        let mut down = self.down_until.lock().unwrap_or_else(|p| p.into_inner());
        match &result {
            Err(StoreError::Unavailable(_)) => *down = Some(Instant::now() + BACKOFF),
            _ => *down = None,
        }
        result
    }

    async fn read(&self, key: &str) -> Result<Option<(u64, String)>, StoreError> {
        self.check_up()?;
        let got: (Option<u64>, Option<String>) = self.note(
            self.redis
                .query(redis::cmd("HMGET").arg(key).arg("v").arg("state"))
                .await,
        )?;
        Ok(match got {
            (Some(v), Some(state)) => Some((v, state)),
            _ => None,
        })
    }

    // One argument per argument of the script it calls.
    #[allow(clippy::too_many_arguments)]
    async fn write(
        &self,
        keys: &[&str],
        version: u64,
        state: &str,
        at: Timestamp,
        announce: Option<&str>,
        records: &StreamEntry,
        indexed_as: Option<&str>,
        seen: Option<&Seen>,
    ) -> Result<Commit, StoreError> {
        self.check_up()?;
        let skew = self.settings.max_clock_skew.map_or(0, |d| d.as_millis());
        let channel = announce.map(|_| self.changes_channel()).unwrap_or_default();
        let mut args: Vec<Vec<u8>> = vec![
            version.to_string().into_bytes(),
            state.as_bytes().to_vec(),
            at.as_millisecond().to_string().into_bytes(),
            skew.to_string().into_bytes(),
            channel.into_bytes(),
            announce.unwrap_or("").as_bytes().to_vec(),
            records.count.to_string().into_bytes(),
        ];
        args.push(if records.count > 0 {
            records.json_array()
        } else {
            Vec::new()
        });
        args.push(records.pb.clone());
        args.push(indexed_as.unwrap_or("").as_bytes().to_vec());
        let mut keys = keys.to_vec();
        if let Some(seen) = seen.filter(|_| !records.fingerprints.is_empty()) {
            keys.extend(seen.keys.iter().map(String::as_str));
            args.push(records.fingerprints.clone());
            args.push(seen.until_ms.to_string().into_bytes());
        }
        let answer = self.note(self.redis.invoke_durable("commit", &self.commit, &keys, args).await)?;
        let answer: Vec<redis::Value> = redis::from_redis_value(answer)
            .map_err(|e| StoreError::Unavailable(format!("redis: commit answered {e}")))?;
        let int = |v: Option<&redis::Value>| match v {
            Some(redis::Value::Int(n)) => u64::try_from(*n).ok(),
            _ => None,
        };
        match (int(answer.first()), int(answer.get(1)), answer.get(2)) {
            (Some(1), Some(v), None) => Ok(Commit::Done(v)),
            (Some(0), Some(v), Some(redis::Value::BulkString(state))) => {
                Ok(Commit::Moved(v, String::from_utf8_lossy(state).into_owned()))
            }
            (Some(2), Some(_), Some(redis::Value::Array(found))) => Ok(Commit::Repeated(
                found
                    .iter()
                    .filter_map(|i| int(Some(i)))
                    .filter_map(|i| usize::try_from(i).ok()?.checked_sub(1))
                    .collect(),
            )),
            _ => Err(StoreError::Unavailable(format!("redis: commit answered {answer:?}"))),
        }
    }

    /// Reads the record at `key` (or takes `cache`), runs `change` on it and
    /// commits, with the usage records and the audit record `change` gives
    /// added to the usage stream in the same step; again from the newer
    /// state while other writers win. An `announce`d change (an operator's)
    /// is announced to the other sidecars.
    ///
    /// The commit also checks the usage records' request ids against those
    /// committed in the idempotency window, and remembers them: records of
    /// ids already committed come back to `change`, as repeats (journal,
    /// number), and it runs again on the same state.
    async fn update<T>(
        &self,
        id: &AccountId,
        cache: &mut Option<(u64, String)>,
        announce: bool,
        mut change: impl FnMut(
            &mut Account,
            &Catalog,
            &[(ProducerId, u64)],
            Timestamp,
        ) -> Result<(T, Vec<Journaled>, Option<AuditRecord>), EngineError>,
    ) -> Result<(T, Account), StoreError> {
        let key = &self.account_key(id);
        let stream = &self.stream_key(id);
        let index = &self.index_key(shard_of(self.settings.shards, id.as_str()));
        let missing = || StoreError::UnknownAccount(id.clone());
        let announce = announce.then_some(id.as_str());
        let mut repeated: Vec<(ProducerId, u64)> = Vec::new();
        for attempt in 0..MAX_ATTEMPTS {
            if attempt >= EAGER_ATTEMPTS {
                tokio::time::sleep(Duration::from_micros(fastrand::u64(0..2000))).await;
                *cache = None;
            }
            let (version, json) = match cache.take() {
                Some(c) => c,
                None => self.read(key).await?.ok_or_else(missing)?,
            };
            if version == 0 || json.is_empty() {
                return Err(missing());
            }
            let mut account: Account = serde_json::from_str(&json).map_err(|e| corrupt(key, e))?;
            let catalog = self.catalog();
            let now = self.clock.now();
            let (out, records, audit) = match change(&mut account, &catalog, &repeated, now) {
                Ok(out) => out,
                Err(e) => {
                    *cache = Some((version, json));
                    return Err(e.into());
                }
            };
            let state = serde_json::to_string(&account).map_err(|e| corrupt(key, e))?;
            let mut items = StreamEntry::default();
            for record in &records {
                items.record(record)?;
            }
            if let Some(audit) = &audit {
                items.audit(audit)?;
            }
            let seen = self.seen(id, catalog.idempotency_window, now);
            match self
                .write(
                    &[key, stream, index],
                    version,
                    &state,
                    now,
                    announce,
                    &items,
                    Some(id.as_str()),
                    Some(&seen),
                )
                .await?
            {
                Commit::Done(v) => {
                    *cache = Some((v, state));
                    return Ok((out, account));
                }
                Commit::Moved(v, state) => {
                    self.stats.conflicts.fetch_add(1, Ordering::Relaxed);
                    *cache = (v > 0).then_some((v, state));
                }
                Commit::Repeated(found) => {
                    repeated.extend(
                        found
                            .iter()
                            .filter_map(|i| records.get(*i))
                            .map(|r| (r.journal.clone(), r.seq)),
                    );
                    *cache = Some((version, json));
                }
            }
        }
        Err(StoreError::Busy(format!(
            "redis: {key} changed under every one of {MAX_ATTEMPTS} attempts"
        )))
    }

    /// The request-id sets a commit on `id` at `now` checks, for an
    /// idempotency window of `window` (see [`SEEN_BUCKETS`]):
    /// `PREFIX:{SHARD}:seen:BUCKET_MS:N`, the current bucket first. Each
    /// goes once the window has passed over its end (and a minute more,
    /// for clocks that trail).
    fn seen(&self, id: &AccountId, window: SignedDuration, now: Timestamp) -> Seen {
        let window_ms = i64::try_from(window.as_millis()).unwrap_or(i64::MAX).max(SEEN_BUCKETS);
        let bucket_ms = window_ms / SEEN_BUCKETS;
        let current = now.as_millisecond().div_euclid(bucket_ms);
        let shard = shard_of(self.settings.shards, id.as_str());
        let prefix = &self.settings.prefix;
        Seen {
            keys: (0..=SEEN_BUCKETS)
                .map(|back| format!("{prefix}:{{{shard}}}:seen:{bucket_ms}:{}", current - back))
                .collect(),
            until_ms: (current + 1)
                .saturating_mul(bucket_ms)
                .saturating_add(window_ms)
                .saturating_add(WINDOW_MARGIN_SECONDS as i64 * 1000),
        }
    }

    async fn shared(&self, id: &AccountId) -> Result<Account, StoreError> {
        let key = self.account_key(id);
        let (_, json) = self
            .read(&key)
            .await?
            .ok_or_else(|| StoreError::UnknownAccount(id.clone()))?;
        serde_json::from_str(&json).map_err(|e| corrupt(&key, e))
    }

    fn gate(&self, id: &AccountId) -> Arc<tokio::sync::Mutex<Gate>> {
        self.gates.entry(id.clone()).or_default().clone()
    }

    // ---- prices ----

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

    // ---- mirrors and syncs ----

    /// Makes sure this process has a mirror of `id`, with the journaled
    /// records of the account found at start-up (before any new one).
    async fn ensure_mirror(&self, id: &AccountId) -> Result<(), StoreError> {
        if self.mirrors.contains_key(id) {
            return Ok(());
        }
        let shared = self.shared(id).await?;
        if let dashmap::Entry::Vacant(slot) = self.mirrors.entry(id.clone()) {
            let replayed: Vec<Entry> = {
                let mut waiting = self.replay.lock().unwrap_or_else(|p| p.into_inner());
                let (mine, others) = std::mem::take(&mut *waiting)
                    .into_iter()
                    .partition(|e: &Entry| e.record.account_id == *id);
                *waiting = others;
                mine
            };
            if !replayed.is_empty() {
                tracing::info!(account = %id, records = replayed.len(), "replaying journaled records");
            }
            slot.insert(Local::new(&shared, replayed, self.clock.now()));
        }
        Ok(())
    }

    /// Reports, renews and borrows for `id`: one commit, after the pending
    /// one if its outcome is unknown. With `short`, borrows its need, or
    /// what there is of it, on top of what the mirror holds.
    async fn sync(&self, id: &AccountId, short: Option<Short>, purpose: Purpose) -> Result<(), StoreError> {
        let gate = self.gate(id);
        let mut gate = gate.lock().await;
        let pending = self.mirrors.get(id).and_then(|local| local.pending().cloned());
        if let Some(pending) = pending {
            self.send(id, &mut gate, pending).await?;
        }
        let sync = {
            let Some(mut local) = self.mirrors.get_mut(id) else {
                return Ok(());
            };
            local.next_sync(
                &self.producer,
                self.seq.fetch_add(1, Ordering::Relaxed) + 1,
                self.journal.as_ref().map(Journal::id),
                short,
                purpose,
                &self.settings,
                self.clock.now(),
            )
        };
        self.send(id, &mut gate, sync).await
    }

    /// Sends one sync until acknowledged or refused; keeps it pending if
    /// Redis could not be reached (its outcome is then unknown).
    async fn send(&self, id: &AccountId, gate: &mut Gate, sync: Sync) -> Result<(), StoreError> {
        let result = self
            .update(id, &mut gate.cached, false, |account, catalog, repeated, now| {
                let synced = account.sync(catalog, &sync, repeated, now)?;
                Ok(((synced.granted, synced.duplicates), synced.applied, None))
            })
            .await;
        let ((granted, repeated), shared): ((Granted, Vec<Journaled>), Account) = match result {
            Ok(done) => done,
            // Outcome unknown or not reached: kept pending, resent as is.
            Err(e @ (StoreError::Unavailable(_) | StoreError::Busy(_))) => return Err(e),
            Err(e) => {
                tracing::error!(account = %id, error = %e, "lease report refused; dropped");
                if let Some(mut local) = self.mirrors.get_mut(id) {
                    local.refused();
                }
                return Err(e);
            }
        };
        self.stats.syncs.fetch_add(1, Ordering::Relaxed);
        let m = metrics();
        m.lease_syncs.inc();
        if !granted.takes.is_empty() || !granted.permits.is_empty() {
            m.lease_refills.inc();
            m.lent(&granted.takes);
        }
        if !sync.returned.is_empty() || sync.close {
            m.lease_returns.inc();
        }
        if granted.lapsed {
            m.lease_expiries.inc();
        }
        m.usage_records_applied
            .inc_by((sync.records.len() - repeated.len()) as u64);
        m.usage_records_repeated.inc_by(repeated.len() as u64);
        for entry in &repeated {
            tracing::warn!(
                account = %id,
                request = %entry.record.request_id,
                journal = %entry.journal,
                seq = entry.seq,
                "a usage record of a request id already recorded (a retry decided again); not applied, its charges given back"
            );
        }
        // Every record sent is applied now, or was before (a retry): its
        // journal entry is no longer needed.
        if !sync.records.is_empty()
            && let Some(journal) = &self.journal
        {
            journal.applied(sync.records.iter().map(|e| (e.journal.clone(), e.seq)));
        }
        if granted.written_off > 0 {
            tracing::error!(
                account = %id,
                tokens = granted.written_off,
                "token charges reported after their lease lapsed exceeded what the sources had; written off"
            );
        }
        if let Some(mut local) = self.mirrors.get_mut(id) {
            local.synced(&sync, &shared, &granted, &self.settings, self.clock.now());
        }
        Ok(())
    }

    /// Runs one step of a decision on `id`'s mirror.
    fn step(
        &self,
        id: &AccountId,
        now: Timestamp,
        step: impl FnOnce(&mut Local, Context<'_>) -> Next,
    ) -> Result<Next, StoreError> {
        let catalog = self.catalog();
        let mut numbering = self.journal.as_ref();
        let mut local = self
            .mirrors
            .get_mut(id)
            .ok_or_else(|| StoreError::UnknownAccount(id.clone()))?;
        let cx = Context {
            catalog: &catalog,
            now,
            producer: &self.producer,
            journal: numbering.as_mut().map(|j| j as &mut dyn Numbering),
        };
        Ok(step(&mut local, cx))
    }

    /// Makes `entries` durable. Not durable on failure, but not lost while
    /// this process lives: still applied by the next sync, and appended
    /// again before any later decision is acknowledged.
    async fn append(&self, entries: &[Entry]) -> Result<(), String> {
        let Some(journal) = &self.journal else {
            return Ok(());
        };
        if entries.is_empty() {
            return Ok(());
        }
        let result = journal.append(entries.to_vec()).await.map_err(|e| e.to_string());
        if result.is_err() {
            self.unwritten
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend(entries.iter().cloned());
        }
        result
    }

    /// Makes `entries` of `id` durable (see [`RedisStore::append`]), then
    /// queues them for the next sync.
    async fn journal_records(&self, id: &AccountId, entries: Vec<Entry>) -> Result<(), String> {
        let result = self.append(&entries).await;
        if let Some(mut local) = self.mirrors.get_mut(id) {
            local.appended(entries);
        }
        result
    }

    /// A decision on a mirror: the protocol's steps (`lease::decide`),
    /// each one's I/O done here.
    async fn decide(&self, id: &AccountId, command: Command, now: Timestamp) -> Result<Applied, StoreError> {
        self.stats.decisions.fetch_add(1, Ordering::Relaxed);
        if let Some(journal) = &self.journal
            && !matches!(command, Command::Release(_))
            && let Err(full) = journal.has_room()
        {
            return Err(StoreError::Unavailable(full.to_string()));
        }
        self.write_unwritten().await?;
        self.ensure_mirror(id).await?;
        let mut decide = Decide::new(command);
        let mut next = self.step(id, now, |local, cx| decide.start(local, cx))?;
        loop {
            next = match next {
                Next::Journal(entries) => {
                    let written = self.append(&entries).await;
                    self.step(id, now, |local, _| decide.journaled(local, entries, written))?
                }
                Next::Sync(short) => {
                    let outcome = match self.sync(id, Some(short), Purpose::Renew).await {
                        Ok(()) => SyncOutcome::Done,
                        Err(StoreError::Busy(_)) => SyncOutcome::Busy,
                        Err(StoreError::Unavailable(why)) => SyncOutcome::Unreachable(why),
                        Err(e) => return Err(e),
                    };
                    self.step(id, now, |local, cx| decide.synced(local, cx, outcome))?
                }
                Next::Done(answer) => {
                    if let Some(policy) = decide.outage() {
                        self.outage_decided(id, policy, &answer);
                    }
                    return answer.map_err(StoreError::from);
                }
            };
        }
    }

    /// Counts and logs a decision the plan's failure policy made while
    /// Redis was unreachable.
    fn outage_decided(&self, id: &AccountId, policy: OutagePolicy, answer: &Result<Applied, Failure>) {
        self.stats.outage_decisions.fetch_add(1, Ordering::Relaxed);
        let label = match policy {
            OutagePolicy::Closed => "closed",
            OutagePolicy::Open => "open",
            OutagePolicy::Allowance(_) => "allowance",
        };
        metrics()
            .failure_policy_decisions
            .get_or_create(&crate::metrics::Policy { policy: label })
            .inc();
        match answer {
            Ok(_) => tracing::warn!(account = %id, policy = label, "store unreachable; decided by the failure policy"),
            Err(e) => tracing::warn!(account = %id, policy = label, error = ?e, "store unreachable; refused"),
        }
    }

    /// Appends again records whose append failed; until that succeeds no
    /// decision is acknowledged (a retry answered from memory would
    /// otherwise acknowledge a record that is not on disk).
    async fn write_unwritten(&self) -> Result<(), StoreError> {
        let Some(journal) = &self.journal else {
            return Ok(());
        };
        let waiting = std::mem::take(&mut *self.unwritten.lock().unwrap_or_else(|p| p.into_inner()));
        if waiting.is_empty() {
            return Ok(());
        }
        if let Err(e) = journal.append(waiting.clone()).await {
            self.unwritten.lock().unwrap_or_else(|p| p.into_inner()).extend(waiting);
            return Err(StoreError::Unavailable(e.to_string()));
        }
        Ok(())
    }

    // ---- background ----

    /// Keeps leases healthy until `stop` resolves, then gives every lease
    /// back. Runs the announcement listener beside it.
    pub async fn run(self: Arc<Self>, stop: impl Future<Output = ()>) {
        let listener = tokio::spawn(Arc::clone(&self).listen());
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut align = tokio::time::interval(Duration::from_secs(60));
        align.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut probe = tokio::time::interval(Duration::from_secs(1));
        probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = &mut stop => break,
                _ = tick.tick() => self.tend().await,
                _ = align.tick() => self.align().await,
                _ = probe.tick() => self.probe().await,
            }
        }
        listener.abort();
        self.close().await;
        let s = &self.stats;
        tracing::info!(
            decisions = s.decisions.load(Ordering::Relaxed),
            redis_calls = s.redis_calls.load(Ordering::Relaxed),
            syncs = s.syncs.load(Ordering::Relaxed),
            conflicts = s.conflicts.load(Ordering::Relaxed),
            outage_decisions = s.outage_decisions.load(Ordering::Relaxed),
            window_hits_held = s.window_hits_held.load(Ordering::Relaxed),
            "leases returned"
        );
    }

    /// Pings Redis, so an outage (and the end of one) is noticed even
    /// while no call needs Redis: readiness follows it. The answer only
    /// feeds readiness: a slow PING must not turn decisions to the failure
    /// policy (that is for calls that fail).
    async fn probe(&self) {
        let pong: Result<String, StoreError> = self.redis.query(&redis::cmd("PING")).await;
        if let Err(e) = &pong {
            tracing::debug!(error = %e, "Redis did not answer PING");
        }
        self.reachable.store(pong.is_ok(), Ordering::Relaxed);
    }

    /// Aligns the clock with Redis `TIME` again, if it is aligned at all.
    async fn align(&self) {
        if let Some(clock) = &self.aligned {
            let before = Timestamp::now();
            match self.redis.time().await {
                Ok(reference) => clock.align(reference, before, Timestamp::now()),
                Err(e) => tracing::debug!(error = %e, "clock not aligned with Redis this time"),
            }
        }
    }

    /// Listens for announcements of admin changes; reconnects when the
    /// subscription drops.
    async fn listen(self: Arc<Self>) {
        loop {
            match self.redis.subscribe(&self.changes_channel()).await {
                Ok(mut messages) => {
                    // Anything may have changed while unsubscribed.
                    self.mark_all_stale();
                    while let Some(message) = messages.next().await {
                        let Ok(payload) = message.get_payload::<String>() else {
                            continue;
                        };
                        if payload == "prices" {
                            self.prices_stale.store(true, Ordering::Relaxed);
                        } else if let Ok(id) = AccountId::parse(&payload)
                            && let Some(mut local) = self.mirrors.get_mut(&id)
                        {
                            local.mark_stale();
                        }
                    }
                }
                Err(e) => tracing::debug!(error = %e, "change announcements unavailable; retrying"),
            }
            tokio::time::sleep(BACKOFF).await;
        }
    }

    fn mark_all_stale(&self) {
        self.prices_stale.store(true, Ordering::Relaxed);
        for mut local in self.mirrors.iter_mut() {
            local.mark_stale();
        }
    }

    /// Places journaled records found at start-up with their accounts'
    /// mirrors (each account's shared record says which are applied
    /// already); what cannot be placed yet (Redis down) waits.
    async fn place_replay(&self) {
        let accounts: BTreeSet<AccountId> = {
            let waiting = self.replay.lock().unwrap_or_else(|p| p.into_inner());
            waiting.iter().map(|e| e.record.account_id.clone()).collect()
        };
        for id in accounts {
            if let Err(e) = self.ensure_mirror(&id).await {
                tracing::debug!(account = %id, error = %e, "journal replay waits for Redis");
            }
        }
    }

    /// One round of upkeep over every mirror.
    async fn tend(self: &Arc<Self>) {
        self.place_replay().await;
        if self.prices_stale.swap(false, Ordering::Relaxed)
            && let Err(e) = self.load_prices().await
        {
            self.prices_stale.store(true, Ordering::Relaxed);
            tracing::debug!(error = %e, "price reload failed; retrying");
        }
        let now = self.clock.now();
        let mut work = tokio::task::JoinSet::new();
        let mut forget = Vec::new();
        for mut entry in self.mirrors.iter_mut() {
            let id = entry.key().clone();
            let task = match entry.value_mut().upkeep(&self.settings, now) {
                None => continue,
                Some(Upkeep::Forget) => {
                    forget.push(id);
                    continue;
                }
                Some(task) => task,
            };
            let store = Arc::clone(self);
            work.spawn(async move {
                let done = match task {
                    Upkeep::GiveBack => store.sync(&id, None, Purpose::GiveBack).await,
                    Upkeep::Refresh => store.refresh(&id).await,
                    Upkeep::Renew | Upkeep::Forget => store.sync(&id, None, Purpose::Renew).await,
                };
                if let Err(e) = done {
                    tracing::debug!(account = %id, error = %e, "lease upkeep failed; retrying");
                }
            });
        }
        self.tend_windows(now).await;
        while work.join_next().await.is_some() {}
        for id in forget {
            // Under its gate, so no sync is half-way.
            let gate = self.gate(&id);
            let guard = gate.lock().await;
            let now = self.clock.now();
            let gone = self
                .mirrors
                .remove_if(&id, |_, l| l.forgettable() && l.idle(self.settings.idle_return, now));
            metrics().evicted("mirror", usize::from(gone.is_some()));
            drop(guard);
        }
    }

    /// Forgets the shares of ended windows and gives back what this
    /// sidecar holds in windows it has not counted in for
    /// `idle_return` (everything, with `all`, at shutdown).
    async fn tend_windows(&self, now: Timestamp) {
        let idle = SignedDuration::try_from(self.settings.idle_return).unwrap_or(SignedDuration::MAX);
        let before = self.windows.len();
        self.windows.retain(|_, share| !share.ended(now));
        metrics().evicted("window_share", before.saturating_sub(self.windows.len()));
        let back: Vec<(String, u64)> = self
            .windows
            .iter_mut()
            .filter(|share| share.held() > 0 && now.duration_since(share.last_used()) >= idle)
            .map(|mut share| (share.key().clone(), share.give_back(now)))
            .collect();
        self.give_back_windows(back).await;
    }

    /// Gives back hits held ahead of use in Redis's window counters. A
    /// failure leaves them counted until the window ends (the safe side).
    async fn give_back_windows(&self, back: Vec<(String, u64)>) {
        for (key, hits) in back {
            let add = -i64::try_from(hits).unwrap_or(i64::MAX);
            let given: Result<(u64, u64), _> = self
                .redis
                .invoke("count", &self.count, &[&key], (add, WINDOW_MARGIN_SECONDS, 0, 0))
                .await;
            if let Err(e) = self.note(given) {
                tracing::debug!(key, hits, error = %e, "rate-limit hits held not given back; they lapse with the window");
            }
        }
    }

    /// Reads the shared account again and brings the mirror up to it.
    async fn refresh(&self, id: &AccountId) -> Result<(), StoreError> {
        let gate = self.gate(id);
        let mut gate = gate.lock().await;
        let key = self.account_key(id);
        let Some((version, json)) = self.read(&key).await? else {
            return Ok(());
        };
        let shared: Account = serde_json::from_str(&json).map_err(|e| corrupt(&key, e))?;
        gate.cached = Some((version, json));
        if let Some(mut local) = self.mirrors.get_mut(id) {
            local.refreshed(&shared);
        }
        Ok(())
    }

    /// Reports everything and ends every lease (shutdown), retrying for a
    /// few seconds while Redis is unreachable; what is still unreported
    /// then is logged (its lease lapses at its expiry).
    pub async fn close(&self) {
        let now = self.clock.now();
        let held: Vec<(String, u64)> = self
            .windows
            .iter_mut()
            .map(|mut share| (share.key().clone(), share.give_back(now)))
            .filter(|(_, hits)| *hits > 0)
            .collect();
        self.give_back_windows(held).await;
        let mut left: Vec<AccountId> = self.mirrors.iter().map(|e| e.key().clone()).collect();
        let deadline = Instant::now() + CLOSE_RETRIES;
        loop {
            let mut failed = Vec::new();
            for id in left {
                if let Err(e) = self.sync(&id, None, Purpose::Close).await {
                    failed.push((id, e));
                }
            }
            if failed.is_empty() {
                return;
            }
            if Instant::now() >= deadline {
                for (id, e) in failed {
                    tracing::error!(account = %id, error = %e, "lease not returned and its last charges not reported");
                }
                return;
            }
            left = failed.into_iter().map(|(id, _)| id).collect();
            tokio::time::sleep(BACKOFF).await;
        }
    }
}

/// The logical shard of an account: CRC-32C of its id modulo `shards`.
pub fn shard_of(shards: u32, account: &str) -> u32 {
    crc32c::crc32c(account.as_bytes()) % shards.max(1)
}

/// The key of an account's shared record: `PREFIX:{SHARD}:account:ID`.
pub fn account_key(prefix: &str, shards: u32, account: &str) -> String {
    format!("{prefix}:{{{}}}:account:{account}", shard_of(shards, account))
}

/// The usage stream of a shard: `PREFIX:{SHARD}:usage`.
pub fn stream_key(prefix: &str, shard: u32) -> String {
    format!("{prefix}:{{{shard}}}:usage")
}

impl RedisStore {
    /// Writes a new account, with the audit record of an operator's
    /// creation (if any) on its shard's usage stream in the same step.
    async fn write_new(&self, account: Account, audit: Option<&AuditRecord>) -> Result<(), StoreError> {
        let key = self.account_key(&account.id);
        let stream = self.stream_key(&account.id);
        let index = self.index_key(shard_of(self.settings.shards, account.id.as_str()));
        let state = serde_json::to_string(&account).map_err(|e| corrupt(&key, e))?;
        let mut entry = StreamEntry::default();
        if let Some(audit) = audit {
            entry.audit(audit)?;
        }
        match self
            .write(
                &[&key, &stream, &index],
                0,
                &state,
                self.clock.now(),
                Some(account.id.as_str()),
                &entry,
                Some(account.id.as_str()),
                None,
            )
            .await?
        {
            Commit::Done(_) => Ok(()),
            // No records here, so never repeats.
            Commit::Moved(..) | Commit::Repeated(_) => Err(StoreError::AccountExists(account.id)),
        }
    }

    /// An operator's change: one commit on the shared account, announced,
    /// with its audit record (completed by the engine; none for a retried
    /// adjustment, or for seeding) added to the shard's usage stream in the
    /// same step.
    async fn admin(
        &self,
        id: &AccountId,
        command: Command,
        audit: Option<&AuditRecord>,
    ) -> Result<(Applied, Option<AuditRecord>), StoreError> {
        let ((reply, record), shared) = self
            .update(id, &mut None, true, |account, catalog, _, now| {
                let (reply, record) = match audit {
                    Some(audit) => account.apply_audited(catalog, command.clone(), now, audit)?,
                    None => (account.apply(catalog, command.clone(), now)?, None),
                };
                Ok(((reply, record.clone()), Vec::new(), record))
            })
            .await?;
        if let Some(mut local) = self.mirrors.get_mut(id) {
            local.refresh(&shared);
        }
        let applied = Applied {
            reply,
            records: Vec::new(),
        };
        Ok((applied, record))
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
            | Command::Charge(_) => self.decide(id, command, now).await,
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

    async fn apply_audited(
        &self,
        id: &AccountId,
        command: Command,
        now: Timestamp,
        audit: &AuditRecord,
    ) -> Result<(Applied, Option<AuditRecord>), StoreError> {
        if command.is_admin() {
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
        let key = format!("{}:rls:{key}", self.settings.prefix);
        let ends = now
            .checked_add(ttl)
            .map_err(|_| StoreError::Engine(EngineError::Overflow))?;
        let horizon = self.settings.horizon;
        let trip = match self.windows.get_mut(&key) {
            Some(mut share) => {
                if let Some(count) = share.serve(hits, limit, now) {
                    self.stats.window_hits_held.fetch_add(1, Ordering::Relaxed);
                    return Ok(count);
                }
                share.trip(hits, limit, horizon, now)
            }
            None if self.windows.len() < MAX_WINDOW_SHARES => self
                .windows
                .entry(key.clone())
                .or_insert_with(|| WindowShare::new(now, ends))
                .trip(hits, limit, horizon, now),
            // Too many windows open: this one is counted call by call.
            None => WindowShare::new(now, ends).trip(hits, 0, horizon, now),
        };
        let seconds = ttl.as_secs().max(1) + WINDOW_MARGIN_SECONDS;
        let (count, granted): (u64, u64) = self.note(
            self.redis
                .invoke("count", &self.count, &[&key], (trip.add, seconds, trip.want, limit))
                .await,
        )?;
        Ok(match self.windows.get_mut(&key) {
            Some(mut share) => share.took(hits, count, granted, now),
            None => count,
        })
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

    async fn publish(&self, version: PriceVersion, now: Timestamp) -> Result<Vec<VersionId>, StoreError> {
        let key = self.prices_key();
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
                return Ok(book.versions().iter().map(|v| v.id.clone()).collect());
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
            accounts_cached: self.mirrors.len() as u64,
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

/// The journal numbers a sidecar's records.
impl Numbering for &Journal {
    fn id(&self) -> &ProducerId {
        Journal::id(self)
    }

    fn number(&mut self, entries: &mut [Journaled]) -> Result<(), String> {
        Journal::number(self, entries).map_err(|e| {
            tracing::error!(error = %e, "usage records not journaled: the journal cannot number them");
            e.to_string()
        })
    }
}
