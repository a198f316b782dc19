//! The background upkeep: leases reported, renewed, refilled and given
//! back as the protocol asks, announcements followed, leases returned at
//! shutdown.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio_stream::StreamExt;

use super::RedisStore;
use super::connection::BACKOFF;
use crate::engine::ids::AccountId;
use crate::lease::{Numbering, Purpose, Upkeep};
use crate::store::StoreError;
use crate::telemetry::metrics::metrics;

/// How long shutdown keeps trying to report and return leases.
pub(super) const CLOSE_RETRIES: Duration = Duration::from_secs(5);

impl RedisStore {
    /// Keeps leases healthy until `stop` resolves, then gives every lease
    /// back and closes the journal (synced, whatever its policy). Runs the
    /// announcement listener beside it.
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
        // The last reports are made: what the journal holds now (records
        // not reported) is made durable under every sync policy.
        if let Some(journal) = &self.journal
            && let Err(e) = journal.close().await
        {
            tracing::error!(error = %e, "the usage journal could not be synced at shutdown");
        }
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

    /// Listens for announcements of admin changes; reconnects when the
    /// subscription drops.
    pub(super) async fn listen(self: Arc<Self>) {
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

    pub(super) fn mark_all_stale(&self) {
        self.prices_stale.store(true, Ordering::Relaxed);
        for mut local in self.mirrors.iter_mut() {
            local.mark_stale();
        }
    }

    /// Places journaled records found at start-up with their accounts'
    /// mirrors (each account's shared record says which are applied
    /// already); what cannot be placed yet (Redis down) waits.
    pub(super) async fn place_replay(&self) {
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
    pub(super) async fn tend(self: &Arc<Self>) {
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
        self.trim_streams(now).await;
        while work.join_next().await.is_some() {}
        for id in forget {
            // Under its gate, so no sync is half-way.
            let lock = self.gate(&id);
            let guard = lock.lock().await;
            let now = self.clock.now();
            let gone = self
                .mirrors
                .remove_if(&id, |_, l| l.forgettable() && l.idle(self.settings.idle_return, now));
            metrics().evicted("mirror", usize::from(gone.is_some()));
            if gone.is_some() {
                self.let_go(&id, &lock);
            }
            drop(guard);
        }
    }

    /// Reads the shared account again and brings the mirror up to it.
    pub(super) async fn refresh(&self, id: &AccountId) -> Result<(), StoreError> {
        let lock = self.gate(id);
        let mut gate = lock.lock().await;
        if !self.mirrors.contains_key(id) {
            // Forgotten meanwhile.
            self.let_go(id, &lock);
            return Ok(());
        }
        let Some((record, shared)) = self.read_account(id).await? else {
            return Ok(());
        };
        gate.cached = Some(record);
        if let Some(mut local) = self.mirrors.get_mut(id) {
            local.refreshed(&shared);
        }
        Ok(())
    }

    /// Before the last reports: records still waiting for the journal
    /// are numbered and written, or dropped and logged
    /// ([`Local::before_close`]).
    ///
    /// [`Local::before_close`]: crate::lease::Local::before_close
    async fn number_or_give_up(&self) {
        let ids: Vec<AccountId> = self.mirrors.iter().map(|l| l.key().clone()).collect();
        for id in ids {
            let numbered = {
                let Some(mut local) = self.mirrors.get_mut(&id) else {
                    continue;
                };
                let mut numbering = self.journal.as_ref();
                local.before_close(numbering.as_mut().map(|j| j as &mut dyn Numbering), &self.producer)
            };
            match numbered {
                Ok(entries) if entries.is_empty() => {}
                Ok(entries) => {
                    if let Err(e) = self.journal_records(&id, entries).await {
                        tracing::error!(account = %id, error = %e, "usage records sent with the last report but not written to the journal");
                    }
                }
                Err(lost) => {
                    for entry in lost {
                        tracing::error!(
                            account = %id,
                            request = %entry.record.request_id,
                            "usage record dropped with its charges: the journal could not number it before shutdown (its call was answered UNAVAILABLE)"
                        );
                    }
                }
            }
        }
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
        self.number_or_give_up().await;
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
