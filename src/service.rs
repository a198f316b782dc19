//! The service both gRPC planes call: a store, a clock and the usage sink,
//! put together so every command is timed once and every record it
//! produces is emitted.

use std::sync::Arc;

use jiff::Timestamp;
use jiff::tz::TimeZone;
use tracing::Instrument;

use crate::clock::Clock;
use crate::engine::ids::{AccountId, LotId, PlanId, VersionId};
use crate::engine::money::Money;
use crate::engine::period::Anchor;
use crate::engine::pricing::PriceVersion;
use crate::engine::record::AuditRecord;
use crate::engine::request::{PackGrant, Pool};
use crate::engine::{Account, Catalog, Command, EngineError, Reply, UsageRecord};
use crate::store::{Store, StoreError};
use crate::usage::{Emitted, UsageSender};

/// An account to create at start.
#[derive(Debug, Clone)]
pub struct SeedAccount {
    /// Its id.
    pub id: AccountId,
    /// Its plan.
    pub plan: PlanId,
    /// Its time zone.
    pub time_zone: TimeZone,
    /// Its period anchor, overriding the plan's.
    pub anchor: Option<Anchor>,
    /// Its credit limit.
    pub credit_limit: Money,
    /// Paid money to credit.
    pub paid: Money,
    /// Promotional money to credit.
    pub promo: Money,
    /// Packs to grant.
    pub packs: Vec<PackGrant>,
    /// Start suspended.
    pub suspended: bool,
}

/// What publishing a price version did.
#[derive(Debug, Clone)]
pub struct Published {
    /// Every version id after, oldest effective first.
    pub versions: Vec<VersionId>,
    /// The audit record written; `None` for a retry (the version was
    /// published already, and audited then).
    pub audit: Option<AuditRecord>,
}

/// How a command reached [`Tollgate::run`].
enum Call {
    /// A client's call.
    Plain,
    /// A client's call sent again after an unknown outcome.
    Resent,
    /// An operator's change, with its audit record.
    Audited(Box<AuditRecord>),
}

/// Tollgate's operations, shared by every request handler.
#[derive(Clone)]
pub struct Tollgate {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    usage: UsageSender,
}

impl Tollgate {
    /// Puts the parts together.
    pub fn new(store: Arc<dyn Store>, clock: Arc<dyn Clock>, usage: UsageSender) -> Tollgate {
        Tollgate { store, clock, usage }
    }

    /// The current time, as the service sees it.
    pub fn now(&self) -> Timestamp {
        self.clock.now()
    }

    /// The store's state for the probes and the metrics.
    pub fn health(&self) -> crate::store::Health {
        self.store.health(self.now())
    }

    /// The current catalog.
    pub fn catalog(&self) -> Arc<Catalog> {
        self.store.catalog()
    }

    /// Takes the configuration's catalog `next` (a reload) and writes
    /// `audit`, its record, to the usage sink: every problem if it is
    /// refused, and then the catalog in force is unchanged.
    pub async fn reload(&self, next: Catalog, audit: AuditRecord) -> Result<(), Vec<String>> {
        if self.usage.is_closed() {
            return Err(vec![
                "the usage sink has stopped; refusing to reload without the audit record".into(),
            ]);
        }
        let now = self.now();
        self.store.reload(next, now).await?;
        let record = AuditRecord { at: now, ..audit };
        if self.usage.send(Emitted::Audit(Arc::new(record))).await.is_err() {
            tracing::error!("usage sink has stopped; an audit record was not written");
        }
        Ok(())
    }

    /// Adds `hits` to the rate-limit window `key` of `limit` hits, which
    /// ends `ttl` after `now`; its count.
    pub async fn count_hits(
        &self,
        key: &str,
        hits: u64,
        limit: u64,
        ttl: std::time::Duration,
        now: Timestamp,
    ) -> Result<u64, StoreError> {
        self.store.count_hits(key, hits, limit, ttl, now).await
    }

    /// Up to `limit` account ids after `after`, in byte order.
    pub async fn list_accounts(&self, after: Option<&AccountId>, limit: usize) -> Result<Vec<AccountId>, StoreError> {
        self.store.list(after, limit).await
    }

    /// Runs `command` on `account` now and emits its records.
    ///
    /// The command and the hand-over of its records run in a task of their
    /// own: a caller that gives up (deadline, disconnect) cannot cancel the
    /// pair half-way, so a committed charge always reaches the usage sink.
    /// Once the sink has stopped (its writer failed), commands are refused
    /// rather than charged without a record.
    pub async fn apply(&self, account: &AccountId, command: Command) -> Result<Reply, StoreError> {
        self.run(account, command, Call::Plain).await
    }

    /// Runs a client's `command` that it sent again after an unknown
    /// outcome (see [`Store::apply_resent`]).
    pub async fn apply_resent(&self, account: &AccountId, command: Command) -> Result<Reply, StoreError> {
        self.run(account, command, Call::Resent).await
    }

    /// Runs an operator's `command` on `account` like [`Tollgate::apply`],
    /// with its audit record (`audit.at` is set here), which reaches the
    /// usage stream with the change and the usage sink after it.
    pub async fn apply_admin(
        &self,
        account: &AccountId,
        command: Command,
        audit: AuditRecord,
    ) -> Result<Reply, StoreError> {
        self.run(account, command, Call::Audited(Box::new(audit))).await
    }

    async fn run(&self, account: &AccountId, command: Command, call: Call) -> Result<Reply, StoreError> {
        if self.usage.is_closed() {
            return Err(StoreError::Unavailable(
                "the usage sink has stopped; refusing to change an account without its record".into(),
            ));
        }
        let this = self.clone();
        let account = account.clone();
        tokio::spawn(
            async move {
                let now = this.now();
                let applied = match call {
                    Call::Plain => this.store.apply(&account, command, now).await?,
                    Call::Resent => this.store.apply_resent(&account, command, now).await?,
                    Call::Audited(audit) => {
                        let (applied, record) = this.store.apply_audited(&account, command, now, &audit).await?;
                        if let Some(record) = record
                            && this.usage.send(Emitted::Audit(Arc::new(record))).await.is_err()
                        {
                            tracing::error!("usage sink has stopped; an audit record was not written");
                        }
                        applied
                    }
                };
                this.emit(applied.records).await;
                this.emit_alerts().await;
                Ok(applied.reply)
            }
            .in_current_span(),
        )
        .await
        .map_err(|e| StoreError::Unavailable(format!("command task failed: {e}")))?
    }

    /// Hands the alerts the store made to the usage sink, each counted.
    async fn emit_alerts(&self) {
        for alert in self.store.take_alerts() {
            crate::telemetry::metrics::metrics()
                .alerts
                .get_or_create(&crate::telemetry::metrics::AlertKind {
                    alert: alert.alert.clone(),
                })
                .inc();
            if self.usage.send(Emitted::Alert(Arc::new(alert))).await.is_err() {
                tracing::error!("usage sink has stopped; an alert was not written");
            }
        }
    }

    async fn emit(&self, records: Vec<Arc<UsageRecord>>) {
        for record in records {
            let kind = record.kind.as_str();
            crate::telemetry::metrics::metrics()
                .usage_records
                .get_or_create(&crate::telemetry::metrics::RecordKind { kind })
                .inc();
            if self.usage.send(Emitted::Usage(record)).await.is_err() {
                tracing::error!("usage sink has stopped; a usage record was not written");
            }
        }
    }

    /// Opens a new account; with an operator's `audit` record, as their
    /// audited change: a retry of the same creation (same adjustment id and
    /// content) answers as the first did.
    pub async fn open_account(
        &self,
        id: AccountId,
        plan: &PlanId,
        time_zone: TimeZone,
        anchor: Option<Anchor>,
        credit_limit: Money,
        audit: Option<AuditRecord>,
    ) -> Result<(), StoreError> {
        let catalog = self.catalog();
        let plan = catalog
            .plans
            .get(plan)
            .ok_or_else(|| EngineError::invalid("plan", format!("no plan named {plan}")))?;
        let now = self.now();
        let account = Account::open(id, plan, time_zone, anchor, credit_limit, now)?;
        let Some(audit) = audit else {
            return self.store.create(account).await;
        };
        let (account, record) = account.opened(&audit, now);
        let opening = account.opening();
        match self.store.create_audited(account, &record).await {
            Ok(()) => {
                if self.usage.send(Emitted::Audit(Arc::new(record))).await.is_err() {
                    tracing::error!("usage sink has stopped; an audit record was not written");
                }
                Ok(())
            }
            Err(StoreError::AccountExists(id)) => {
                let first = self
                    .apply(&id, Command::Adjustment(audit.adjustment_id.clone()))
                    .await?;
                match first {
                    Reply::Adjustment(Some(f)) if f == opening => Ok(()),
                    _ => Err(StoreError::AccountExists(id)),
                }
            }
            Err(e) => Err(e),
        }
    }

    /// Creates a configured account if missing and applies its credits.
    /// Credits carry fixed operation ids, so seeding twice credits once.
    pub async fn seed(&self, seed: &SeedAccount) -> Result<(), StoreError> {
        match self
            .open_account(
                seed.id.clone(),
                &seed.plan,
                seed.time_zone.clone(),
                seed.anchor,
                seed.credit_limit,
                None,
            )
            .await
        {
            Ok(()) | Err(StoreError::AccountExists(_)) => {}
            Err(e) => return Err(e),
        }
        for (op, pool, amount) in [
            ("seed:paid", Pool::Paid, seed.paid),
            (
                "seed:promo",
                Pool::Promo {
                    expires_at: None,
                    priority: 0,
                },
                seed.promo,
            ),
        ] {
            if amount.is_positive() {
                let operation_id = LotId::parse(op).map_err(|e| EngineError::invalid("operation_id", e.to_string()))?;
                self.apply(
                    &seed.id,
                    Command::TopUp {
                        operation_id,
                        pool,
                        amount,
                    },
                )
                .await?;
            }
        }
        for pack in &seed.packs {
            if pack.expires_at <= self.now() {
                tracing::warn!(account = %seed.id, pack = %pack.pack_id, "seed pack has expired; not granted");
                continue;
            }
            self.apply(&seed.id, Command::GrantPack(pack.clone())).await?;
        }
        if seed.suspended {
            self.apply(&seed.id, Command::SetSuspended(true)).await?;
        }
        Ok(())
    }

    /// Publishes a price version effective no earlier than now, with the
    /// operator's audit record, which reaches the usage sink after it. A
    /// retry of the same version publishes and audits nothing again.
    pub async fn publish(&self, version: PriceVersion, audit: AuditRecord) -> Result<Published, StoreError> {
        if self.usage.is_closed() {
            return Err(StoreError::Unavailable(
                "the usage sink has stopped; refusing to publish prices without the audit record".into(),
            ));
        }
        // In a task of its own, as `run`: a caller that goes away between
        // the publish and its audit record cannot leave one without the
        // other.
        let this = self.clone();
        tokio::spawn(
            async move {
                let now = this.now();
                let (versions, new) = this.store.publish(version, now).await?;
                // The record goes to the usage sink only: the price book's
                // key is in no shard's hash slot, so no usage stream can
                // take it in the same step.
                let audit = new.then_some(AuditRecord { at: now, ..audit });
                if let Some(record) = &audit
                    && this.usage.send(Emitted::Audit(Arc::new(record.clone()))).await.is_err()
                {
                    tracing::error!("usage sink has stopped; an audit record was not written");
                }
                Ok(Published { versions, audit })
            }
            .in_current_span(),
        )
        .await
        .map_err(|e| StoreError::Unavailable(format!("publish task failed: {e}")))?
    }

    /// Lapses holds and forgets what is no longer needed, emitting records.
    pub async fn sweep(&self) -> Result<(), StoreError> {
        let records = self.store.sweep(self.now()).await?;
        self.emit(records).await;
        self.emit_alerts().await;
        Ok(())
    }
}
