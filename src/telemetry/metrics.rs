//! Prometheus metrics: one registry for the process, `tollgate_` names,
//! bounded labels (no account ids, except the accounts an operator lists
//! in `[metrics] accounts`).
//!
//! Instrumented code reaches the registry through [`metrics()`]; the HTTP
//! endpoint ([`crate::transport::http`]) sets the gauges that are read off the app
//! (holds open, journal depth, readiness) just before it encodes.

use std::sync::LazyLock;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use crate::engine::money::{Money, SCALE};
use crate::engine::source::Take;

/// An RPC's name.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Rpc {
    /// `reserve`, `extend`, `settle`, `release`, `charge`, `balance`,
    /// `should_rate_limit`.
    pub rpc: &'static str,
}

/// A decision's outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Decision {
    /// The RPC.
    pub rpc: &'static str,
    /// `allowed`, `denied` or `error`.
    pub outcome: &'static str,
    /// A denial's reason or an error's gRPC code (`none` when allowed).
    pub reason: &'static str,
}

/// A Redis script or command.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Script {
    /// `commit`, `count`, `read`, `ping`, ...
    pub script: &'static str,
}

/// A failure policy.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Policy {
    /// `open`, `closed` or `allowance`.
    pub policy: &'static str,
}

/// A kind of usage record.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RecordKind {
    /// `settle`, `charge`, `expired`, ...
    pub kind: &'static str,
}

/// An alert's kind.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AlertKind {
    /// `balance_below`, `allowance_used`, `pack_used`, `budget_used`,
    /// `pack_expiring` or `debt_started`.
    pub alert: String,
}

/// A reload's result.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadResult {
    /// `applied` or `refused`.
    pub result: &'static str,
}

/// A lent amount's unit.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SliceUnit {
    /// `tokens` or `money` (in the currency's unit).
    pub unit: &'static str,
}

/// An Envoy rate-limit rule's hits.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RlsHits {
    /// The domain.
    pub domain: String,
    /// The rule's descriptor keys joined with `.` (with values for rules
    /// marked `detailed_metric`); `(limit override)` for descriptors that
    /// carry Envoy's own limit (their keys are the caller's).
    pub key: String,
    /// `within_limit`, `near_limit` (over 80 % of the limit),
    /// `over_limit` or `shadow_mode`.
    pub outcome: &'static str,
}

/// State this process keeps for callers and lets go of.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Evicted {
    /// `rate_limit_window` (memory store), `window_share` or `mirror`
    /// (Redis store).
    pub state: &'static str,
}

/// A consumer group of the usage streams.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConsumerGroup {
    /// Its name (`store.redis.consumer_groups`).
    pub group: String,
}

/// What became of records the loader wrote (`tollgate usage load`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LoaderResult {
    /// `loaded`, `repeated` (in the database already) or `unreadable`.
    pub result: &'static str,
}

/// Where the loader failed.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LoaderStage {
    /// `redis` or `postgres`.
    pub stage: &'static str,
}

/// An allow-listed account's source.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AccountSource {
    /// The account.
    pub account: String,
    /// `allowance`, `packs`, `promo`, `paid` or `credit`.
    pub source: &'static str,
}

/// The build.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Build {
    /// The crate version.
    pub version: &'static str,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

/// Latencies from 50 µs to about 1.6 s.
fn latency() -> Histogram {
    Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
}

/// Lent amounts from 1 to about 10^9.
fn amounts() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 4.0, 16))
}

/// Every metric Tollgate exports.
#[allow(missing_docs)]
pub struct Metrics {
    registry: Registry,
    pub decisions: Family<Decision, Counter>,
    pub rpc_duration: Histograms<Rpc>,
    pub holds_open: Gauge,
    pub lease_syncs: Counter,
    pub lease_refills: Counter,
    pub lease_returns: Counter,
    pub lease_expiries: Counter,
    pub lease_slice_size: Histograms<SliceUnit>,
    pub redis_duration: Histograms<Script>,
    pub redis_errors: Family<Script, Counter>,
    pub failure_policy_decisions: Family<Policy, Counter>,
    pub journal_pending_records: Gauge,
    pub journal_lag: Gauge<f64, AtomicU64>,
    pub journal_bytes: Gauge,
    pub journal_fsync: Histogram,
    pub usage_records: Family<RecordKind, Counter>,
    /// Alerts this process committed, by kind.
    pub alerts: Family<AlertKind, Counter>,
    pub usage_records_applied: Counter,
    pub usage_records_repeated: Counter,
    pub usage_stream_trimmed: Counter,
    pub usage_stream_unacknowledged: Family<ConsumerGroup, Gauge>,
    pub loader_records: Family<LoaderResult, Counter>,
    pub loader_batches: Counter,
    pub loader_errors: Family<LoaderStage, Counter>,
    pub config_reloads: Family<ReloadResult, Counter>,
    pub rls_hits: Family<RlsHits, Counter>,
    pub ready: Gauge,
    pub account_available: Family<AccountSource, Gauge<f64, AtomicU64>>,
    pub accounts_cached: Gauge,
    pub rate_limit_windows: Gauge,
    pub evicted: Family<Evicted, Counter>,
    pub connections_refused: Counter,
    pub calls_timed_out: Counter,
}

impl Metrics {
    fn new() -> Metrics {
        let mut r = Registry::with_prefix("tollgate");
        let decisions = Family::<Decision, Counter>::default();
        r.register(
            "decisions",
            "Decisions by RPC, outcome and reason (denial reason or gRPC error code)",
            decisions.clone(),
        );
        let rpc_duration: Histograms<Rpc> = Family::new_with_constructor(latency);
        r.register_with_unit(
            "rpc_duration",
            "Time to answer a data-plane RPC",
            Unit::Seconds,
            rpc_duration.clone(),
        );
        let holds_open = Gauge::default();
        r.register(
            "holds_open",
            "Reservations open (not settled, released or lapsed)",
            holds_open.clone(),
        );
        let lease_syncs = Counter::default();
        r.register("lease_syncs", "Lease syncs committed to Redis", lease_syncs.clone());
        let lease_refills = Counter::default();
        r.register(
            "lease_refills",
            "Syncs that lent this sidecar slices or permits",
            lease_refills.clone(),
        );
        let lease_returns = Counter::default();
        r.register(
            "lease_returns",
            "Syncs that gave unused slices back",
            lease_returns.clone(),
        );
        let lease_expiries = Counter::default();
        r.register(
            "lease_expiries",
            "Leases of this sidecar found lapsed (their slices taken back)",
            lease_expiries.clone(),
        );
        let lease_slice_size: Histograms<SliceUnit> = Family::new_with_constructor(amounts);
        r.register(
            "lease_slice_size",
            "Slices lent to this sidecar, in tokens or the currency's unit",
            lease_slice_size.clone(),
        );
        let redis_duration: Histograms<Script> = Family::new_with_constructor(latency);
        r.register_with_unit(
            "redis_call_duration",
            "Time of a call to Redis, by script or command",
            Unit::Seconds,
            redis_duration.clone(),
        );
        let redis_errors = Family::<Script, Counter>::default();
        r.register(
            "redis_errors",
            "Calls to Redis that failed, by script or command",
            redis_errors.clone(),
        );
        let failure_policy_decisions = Family::<Policy, Counter>::default();
        r.register(
            "failure_policy_decisions",
            "Decisions made by a plan's failure policy while Redis was unreachable",
            failure_policy_decisions.clone(),
        );
        let journal_pending_records = Gauge::default();
        r.register(
            "journal_pending_records",
            "Journaled usage records not yet applied to Redis",
            journal_pending_records.clone(),
        );
        let journal_lag = Gauge::<f64, AtomicU64>::default();
        r.register_with_unit(
            "journal_lag",
            "Age of the oldest journaled record not yet applied to Redis",
            Unit::Seconds,
            journal_lag.clone(),
        );
        let journal_bytes = Gauge::default();
        r.register_with_unit(
            "journal",
            "Size of the journal's segments",
            Unit::Bytes,
            journal_bytes.clone(),
        );
        let journal_fsync = latency();
        r.register_with_unit(
            "journal_fsync_duration",
            "Time of a journal fsync",
            Unit::Seconds,
            journal_fsync.clone(),
        );
        let usage_records = Family::<RecordKind, Counter>::default();
        r.register("usage_records", "Usage records emitted, by kind", usage_records.clone());
        let alerts = Family::<AlertKind, Counter>::default();
        r.register(
            "alerts",
            "Alerts made (thresholds crossed), by kind: each once across the fleet",
            alerts.clone(),
        );
        let usage_records_applied = Counter::default();
        r.register(
            "usage_records_applied",
            "Journaled usage records applied to Redis",
            usage_records_applied.clone(),
        );
        let usage_records_repeated = Counter::default();
        r.register(
            "usage_records_repeated",
            "Journaled usage records of request ids already recorded (retries decided again elsewhere): not applied, their charges given back",
            usage_records_repeated.clone(),
        );
        let usage_stream_trimmed = Counter::default();
        r.register(
            "usage_stream_trimmed",
            "Usage stream entries trimmed once every consumer group in store.redis.consumer_groups acknowledged them",
            usage_stream_trimmed.clone(),
        );
        let usage_stream_unacknowledged = Family::<ConsumerGroup, Gauge>::default();
        r.register(
            "usage_stream_unacknowledged",
            "Usage stream entries a consumer group has not acknowledged yet (delivered or not), over every shard",
            usage_stream_unacknowledged.clone(),
        );
        let loader_records = Family::<LoaderResult, Counter>::default();
        r.register(
            "loader_records",
            "Usage and audit records the billing loader wrote: loaded, repeated (in the database already) or unreadable",
            loader_records.clone(),
        );
        let loader_batches = Counter::default();
        r.register(
            "loader_batches",
            "Batches the billing loader committed and then acknowledged",
            loader_batches.clone(),
        );
        let loader_errors = Family::<LoaderStage, Counter>::default();
        r.register(
            "loader_errors",
            "Billing loader failures, by stage (redis, postgres); each batch is tried again",
            loader_errors.clone(),
        );
        let config_reloads = Family::<ReloadResult, Counter>::default();
        r.register(
            "config_reloads",
            "Configuration reloads, applied or refused",
            config_reloads.clone(),
        );
        let rls_hits = Family::<RlsHits, Counter>::default();
        r.register(
            "rls_hits",
            "Envoy rate-limit hits by domain, rule and outcome",
            rls_hits.clone(),
        );
        let ready = Gauge::default();
        r.register("ready", "1 when ready to serve (see /ready), else 0", ready.clone());
        let account_available = Family::<AccountSource, Gauge<f64, AtomicU64>>::default();
        r.register(
            "account_available",
            "What an allow-listed account can spend, by source (tokens, or the currency's unit)",
            account_available.clone(),
        );
        let accounts_cached = Gauge::default();
        r.register(
            "accounts_cached",
            "Accounts held in this process's memory",
            accounts_cached.clone(),
        );
        let rate_limit_windows = Gauge::default();
        r.register(
            "rate_limit_windows",
            "Envoy rate-limit windows (memory store) or window shares (Redis store) held in this process",
            rate_limit_windows.clone(),
        );
        let evicted = Family::<Evicted, Counter>::default();
        r.register(
            "evicted",
            "Idle or ended state let go of, by kind: memory stays bounded whatever callers send",
            evicted.clone(),
        );
        for state in ["rate_limit_window", "window_share", "mirror", "override_window"] {
            drop(evicted.get_or_create(&Evicted { state }));
        }
        let connections_refused = Counter::default();
        r.register(
            "connections_refused",
            "TCP connections closed at once (over server.max_connections) or silent past server.first_bytes_timeout_ms",
            connections_refused.clone(),
        );
        let calls_timed_out = Counter::default();
        r.register(
            "calls_timed_out",
            "Calls ended with DEADLINE_EXCEEDED: not received and answered within server.call_timeout_ms",
            calls_timed_out.clone(),
        );
        let build_info = Family::<Build, Gauge>::default();
        build_info
            .get_or_create(&Build {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        r.register("build_info", "The running build", build_info);
        // Series of known label values start at zero, so rates and alerts
        // see them before their first event.
        for script in ["commit", "count", "trim"] {
            drop(redis_duration.get_or_create(&Script { script }));
            drop(redis_errors.get_or_create(&Script { script }));
        }
        for unit in ["tokens", "money"] {
            drop(lease_slice_size.get_or_create(&SliceUnit { unit }));
        }
        for policy in ["closed", "open", "allowance"] {
            drop(failure_policy_decisions.get_or_create(&Policy { policy }));
        }
        for result in ["applied", "refused"] {
            drop(config_reloads.get_or_create(&ReloadResult { result }));
        }
        Metrics {
            registry: r,
            decisions,
            rpc_duration,
            holds_open,
            lease_syncs,
            lease_refills,
            lease_returns,
            lease_expiries,
            lease_slice_size,
            redis_duration,
            redis_errors,
            failure_policy_decisions,
            journal_pending_records,
            journal_lag,
            journal_bytes,
            journal_fsync,
            usage_records,
            alerts,
            usage_records_applied,
            usage_records_repeated,
            usage_stream_trimmed,
            usage_stream_unacknowledged,
            loader_records,
            loader_batches,
            loader_errors,
            config_reloads,
            rls_hits,
            ready,
            account_available,
            accounts_cached,
            rate_limit_windows,
            evicted,
            connections_refused,
            calls_timed_out,
        }
    }

    /// Counts `n` of `state` let go of.
    pub fn evicted(&self, state: &'static str, n: usize) {
        if n > 0 {
            self.evicted.get_or_create(&Evicted { state }).inc_by(n as u64);
        }
    }

    /// The registry in Prometheus's text format.
    pub fn render(&self) -> String {
        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }

    /// Counts a decision of `rpc` and the time it took since `started`.
    pub fn decided(&self, rpc: &'static str, outcome: &'static str, reason: &'static str, started: Instant) {
        self.decisions.get_or_create(&Decision { rpc, outcome, reason }).inc();
        self.rpc_duration
            .get_or_create(&Rpc { rpc })
            .observe(started.elapsed().as_secs_f64());
    }

    /// Times a call to Redis (`script`), counting it as an error if it failed.
    pub fn redis_call(&self, script: &'static str, took: Duration, failed: bool) {
        let labels = Script { script };
        self.redis_duration.get_or_create(&labels).observe(took.as_secs_f64());
        if failed {
            self.redis_errors.get_or_create(&labels).inc();
        }
    }

    /// Counts slices lent to this sidecar.
    pub fn lent(&self, takes: &[Take]) {
        for take in takes {
            let (unit, amount) = if take.source.is_tokens() {
                ("tokens", take.amount as f64)
            } else {
                ("money", currency_units(Money::from_picos(take.amount)))
            };
            self.lease_slice_size.get_or_create(&SliceUnit { unit }).observe(amount);
        }
    }
}

/// Money in the currency's unit, for a gauge or a histogram (not exact,
/// and need not be).
pub fn currency_units(m: Money) -> f64 {
    m.picos() as f64 / SCALE as f64
}

/// The process's metrics.
pub fn metrics() -> &'static Metrics {
    static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);
    &METRICS
}

/// A gRPC code's label: `invalid_argument`, `unavailable`, ...
pub fn code_label(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "ok",
        Code::Cancelled => "cancelled",
        Code::Unknown => "unknown",
        Code::InvalidArgument => "invalid_argument",
        Code::DeadlineExceeded => "deadline_exceeded",
        Code::NotFound => "not_found",
        Code::AlreadyExists => "already_exists",
        Code::PermissionDenied => "permission_denied",
        Code::ResourceExhausted => "resource_exhausted",
        Code::FailedPrecondition => "failed_precondition",
        Code::Aborted => "aborted",
        Code::OutOfRange => "out_of_range",
        Code::Unimplemented => "unimplemented",
        Code::Internal => "internal",
        Code::Unavailable => "unavailable",
        Code::DataLoss => "data_loss",
        Code::Unauthenticated => "unauthenticated",
    }
}
