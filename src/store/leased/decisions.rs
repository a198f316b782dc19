//! Decisions and syncs: the I/O around the lease protocol (`crate::lease`):
//! mirrors made from Redis, syncs committed, journal entries written.

use std::sync::atomic::Ordering;

use jiff::Timestamp;

use super::{Gate, RedisStore};
use crate::engine::catalog::OutagePolicy;
use crate::engine::ids::{AccountId, ProducerId, RequestId};
use crate::engine::record::request_fingerprint;
use crate::engine::role::{Granted, Journaled, Short, Sync};
use crate::engine::{Account, Command, UsageRecord};
use crate::lease::{Context, Decide, Failure, Known, Local, Next, Numbering, Purpose, SyncOutcome};
use crate::store::{Applied, Store, StoreError};
use crate::telemetry::metrics::metrics;
use crate::usage::journal::{Entry, Journal};

impl RedisStore {
    /// Makes sure this process has a mirror of `id`, with the journaled
    /// records of the account found at start-up (before any new one). The
    /// record read is kept under the account's gate, for its first sync.
    pub(super) async fn ensure_mirror(&self, id: &AccountId) -> Result<(), StoreError> {
        if self.mirrors.contains_key(id) {
            return Ok(());
        }
        let lock = self.gate(id);
        let mut gate = lock.lock().await;
        let made = self.make_mirror(id, &mut gate).await;
        if made.is_err() {
            self.let_go(id, &lock);
        }
        made
    }

    async fn make_mirror(&self, id: &AccountId, gate: &mut Gate) -> Result<(), StoreError> {
        if self.mirrors.contains_key(id) {
            return Ok(());
        }
        let (record, shared) = self
            .read_account(id)
            .await?
            .ok_or_else(|| StoreError::UnknownAccount(id.clone()))?;
        gate.cached = Some(record);
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
        self.mirrors
            .insert(id.clone(), Local::new(&shared, replayed, self.clock.now()));
        Ok(())
    }

    /// Reports, renews and borrows for `id`: one commit, after the pending
    /// one if its outcome is unknown. With `short`, borrows its need, or
    /// what there is of it, on top of what the mirror holds.
    pub(super) async fn sync(&self, id: &AccountId, short: Option<Short>, purpose: Purpose) -> Result<(), StoreError> {
        let lock = self.gate(id);
        let mut gate = lock.lock().await;
        let pending = self.mirrors.get(id).and_then(|local| local.pending().cloned());
        if let Some(pending) = pending {
            self.send(id, &mut gate, pending).await?;
        }
        let sync = {
            let Some(mut local) = self.mirrors.get_mut(id) else {
                // Forgotten meanwhile.
                self.let_go(id, &lock);
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
        let sent = self.send(id, &mut gate, sync).await;
        if sent.is_ok() && purpose != Purpose::Renew {
            // Given back: other sidecars are likely to change the account
            // before this one uses it again, and a commit on a stale
            // version costs a refused script call (four commands and the
            // whole state sent for nothing) where a read costs one.
            gate.cached = None;
        }
        sent
    }

    /// Sends one sync until acknowledged or refused; keeps it pending if
    /// Redis could not be reached (its outcome is then unknown).
    pub(super) async fn send(&self, id: &AccountId, gate: &mut Gate, sync: Sync) -> Result<(), StoreError> {
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
            local.synced(&sync, (&shared, &repeated), &granted, &self.settings, self.clock.now());
        }
        Ok(())
    }

    /// Runs one step of a decision on `id`'s mirror.
    pub(super) fn step(
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
    pub(super) async fn append(&self, entries: &[Entry]) -> Result<(), String> {
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
    pub(super) async fn journal_records(&self, id: &AccountId, entries: Vec<Entry>) -> Result<(), String> {
        let result = self.append(&entries).await;
        if let Some(mut local) = self.mirrors.get_mut(id) {
            local.appended(entries);
        }
        result
    }

    /// A decision on a mirror: the protocol's steps (`lease::decide`),
    /// each one's I/O done here.
    pub(super) async fn decide(
        &self,
        id: &AccountId,
        command: Command,
        resent: bool,
        now: Timestamp,
    ) -> Result<Applied, StoreError> {
        self.stats.decisions.fetch_add(1, Ordering::Relaxed);
        if let Some(journal) = &self.journal
            && !matches!(command, Command::Release(_))
            && let Err(full) = journal.has_room()
        {
            return Err(StoreError::Unavailable(full.to_string()));
        }
        self.write_unwritten().await?;
        self.ensure_mirror(id).await?;
        let mut decide = if resent {
            Decide::resent(command)
        } else {
            Decide::new(command)
        };
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
                        Err(e) => {
                            if let Some(mut local) = self.mirrors.get_mut(id) {
                                decide.abandon(&mut local);
                            }
                            return Err(e);
                        }
                    };
                    self.step(id, now, |local, cx| decide.synced(local, cx, outcome))?
                }
                Next::Recorded(request) => {
                    // Where records went is bucketed by the commit's clock.
                    let known = self.known(id, &request, self.clock.now()).await;
                    self.step(id, now, |local, cx| decide.recorded(local, cx, known))?
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

    /// What the store knows of `request` on `id`: the record committed for
    /// it while where it went is kept (`keys::ANSWER_BUCKET_MS`), read from
    /// the usage stream; else whether one was committed within the
    /// idempotency window.
    pub(super) async fn known(&self, id: &AccountId, request: &RequestId, now: Timestamp) -> Result<Known, String> {
        let fingerprint = request_fingerprint(id, request);
        let seen = self.seen(id, self.catalog().idempotency_window, now);
        for key in &seen.answers {
            self.check_up().map_err(|e| e.to_string())?;
            let entry: Option<String> = self
                .note(
                    self.redis
                        .query(redis::cmd("HGET").arg(key).arg(&fingerprint[..]))
                        .await,
                )
                .map_err(|e| e.to_string())?;
            let Some(entry) = entry else { continue };
            let stream = self.stream_key(id);
            let found: redis::Value = self
                .note(
                    self.redis
                        .query(redis::cmd("XRANGE").arg(&stream).arg(&entry).arg(&entry))
                        .await,
                )
                .map_err(|e| e.to_string())?;
            // Trimmed from the stream since: recorded, its answer gone.
            return Ok(record_in(&found, id, request).map_or(Known::Recorded, |r| Known::Answer(Box::new(r))));
        }
        Ok(if self.recorded(id, request, now).await? {
            Known::Recorded
        } else {
            Known::Nothing
        })
    }

    /// Whether a usage record of `request` on `id` was committed within
    /// the idempotency window: its fingerprint in one of the sets the
    /// commits keep (`keys.rs`). Asked for a settle or release of a
    /// reservation the mirror does not know, and for a refund.
    pub(super) async fn recorded(&self, id: &AccountId, request: &RequestId, now: Timestamp) -> Result<bool, String> {
        let fingerprint = request_fingerprint(id, request);
        for key in self.seen(id, self.catalog().idempotency_window, now).keys {
            self.check_up().map_err(|e| e.to_string())?;
            let found: bool = self
                .note(
                    self.redis
                        .query(redis::cmd("SISMEMBER").arg(&key).arg(&fingerprint[..]))
                        .await,
                )
                .map_err(|e| e.to_string())?;
            if found {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Counts and logs a decision the plan's failure policy made while
    /// Redis was unreachable.
    pub(super) fn outage_decided(&self, id: &AccountId, policy: OutagePolicy, answer: &Result<Applied, Failure>) {
        self.stats.outage_decisions.fetch_add(1, Ordering::Relaxed);
        let label = match policy {
            OutagePolicy::Closed => "closed",
            OutagePolicy::Open => "open",
            OutagePolicy::Allowance(_) => "allowance",
        };
        metrics()
            .failure_policy_decisions
            .get_or_create(&crate::telemetry::metrics::Policy { policy: label })
            .inc();
        match answer {
            Ok(_) => tracing::warn!(account = %id, policy = label, "store unreachable; decided by the failure policy"),
            Err(e) => tracing::warn!(account = %id, policy = label, error = ?e, "store unreachable; refused"),
        }
    }

    /// Appends again records whose append failed; until that succeeds no
    /// decision is acknowledged (a retry answered from memory would
    /// otherwise acknowledge a record that is not on disk).
    pub(super) async fn write_unwritten(&self) -> Result<(), StoreError> {
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

/// The usage record of `request` on `id` in an `XRANGE` reply of one
/// entry.
fn record_in(reply: &redis::Value, id: &AccountId, request: &RequestId) -> Option<UsageRecord> {
    let redis::Value::Array(entries) = reply else {
        return None;
    };
    let (_, records) = super::entry_records(entries.first()?)?;
    records
        .into_iter()
        .filter_map(|r| serde_json::from_value::<UsageRecord>(r).ok())
        .find(|r| r.account_id == *id && r.request_id == *request)
}
