//! Configuration: a TOML file (or the built-in demo), environment
//! overrides for deployment-specific values, and validation that reports
//! every problem at once, each with its path.
//!
//! The environment is read through a lookup function, so tests never touch
//! the process environment.
//!
//! Why one file: for now, the schema, the environment overrides and the
//! validation that reports every problem with its path; about 1,580 lines,
//! the rest tests. Splitting it into `config/` (schema, sources,
//! validation, secrets) is part of the tree's reorganisation.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use serde::Deserialize;

use crate::api::auth::{CertificateName, CertificateRule, Operators, Role, Token, parse_sha256};
use crate::engine::catalog::{Allowance, Catalog, ExpiryPolicy, OutagePolicy, Plan, SourceClass, check_draw_order};
use crate::engine::hash::{Map, Set};
use crate::engine::ids::{AccountId, LotId, ModelId, PlanId, TierId, VersionId};
use crate::engine::limits::ScopedLimits;
use crate::engine::money::Money;
pub use crate::engine::period::parse_time_zone;
use crate::engine::period::{Anchor, PeriodUnit};
pub use crate::engine::pricing::{MAX_PRICE_PER_MILLION, price_per_token};
use crate::engine::pricing::{ModelPrices, PriceBook, PriceVersion, PriceWindow, TierPrices, TokenPrices};
use crate::engine::request::PackGrant;
pub use crate::service::SeedAccount;
use crate::store::leased::LeaseSettings;
use crate::store::redis::{Credentials, RedisSettings};
pub use crate::usage::UsageSinkConfig;
use crate::usage::journal::{JournalSettings, OnCorrupt, SyncPolicy};

/// The built-in demo configuration (also `examples/tollgate.toml`).
pub const DEMO: &str = include_str!("../examples/tollgate.toml");

/// One problem, and where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Dotted path of the offending value, e.g. `plans.pro.allowance.period`.
    pub path: String,
    /// What is wrong.
    pub message: String,
}

/// Every problem found in a configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{} configuration error(s):", self.0.len())?;
        for e in &self.0 {
            writeln!(f, "  {}: {}", e.path, e.message)?;
        }
        Ok(())
    }
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Currency label.
    pub currency: String,
    /// Data-plane address.
    pub listen: SocketAddr,
    /// Control-plane address.
    pub admin_listen: SocketAddr,
    /// A Unix domain socket for the data plane too (beside TCP), e.g. one
    /// shared with the model server in a pod.
    pub listen_unix: Option<PathBuf>,
    /// A Unix domain socket for the admin API too (beside TCP).
    pub admin_listen_unix: Option<PathBuf>,
    /// The admin side's plain-HTTP address (`/metrics`, `/live`,
    /// `/ready`), if it is served.
    pub http_listen: Option<SocketAddr>,
    /// Accounts whose balances the metrics show (`[metrics] accounts`).
    pub metrics_accounts: Vec<AccountId>,
    /// How often lapsed holds are swept.
    pub sweep_interval: Duration,
    /// The store.
    pub store: StoreSettings,
    /// The usage journal (Redis store).
    pub journal: JournalSettings,
    /// How long in-flight calls may take to finish after a shutdown signal.
    pub shutdown_grace: Duration,
    /// How long the drain may take after that (last sweep, leases
    /// returned, usage flushed) before the process is ended regardless.
    pub shutdown_drain: Duration,
    /// Limits on each TCP listener's connections.
    pub connections: crate::transport::conn::Guard,
    /// How often the configuration file is compared for a reload; `None`:
    /// on SIGHUP only.
    pub reload_poll: Option<Duration>,
    /// Where usage records go.
    pub usage: UsageSinkConfig,
    /// Who may call the admin API.
    pub admin: Operators,
    /// The Envoy rate-limit service's rules directory (envoyproxy/ratelimit
    /// YAML files), if it is served.
    pub rls_config_dir: Option<PathBuf>,
    /// How it answers beyond the rules.
    pub rls: crate::rls::config::RlsSettings,
    /// TLS on the data plane's TCP listener (mTLS with a client CA).
    pub tls: Option<TlsSettings>,
    /// TLS on the admin listener (client certificates with a client CA).
    pub admin_tls: Option<TlsSettings>,
    /// Plans, prices, hold policy.
    pub catalog: Catalog,
    /// Accounts to create at start.
    pub seed: Vec<SeedAccount>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct ServerFile {
    tls: Option<TlsFile>,
    listen: Option<String>,
    admin_listen: Option<String>,
    listen_unix: Option<PathBuf>,
    admin_listen_unix: Option<PathBuf>,
    http_listen: Option<String>,
    shutdown_grace_seconds: Option<u64>,
    shutdown_drain_seconds: Option<u64>,
    reload_poll_ms: Option<u64>,
    max_connections: Option<usize>,
    first_bytes_timeout_ms: Option<u64>,
    call_timeout_ms: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct StoreFile {
    kind: String,
    sweep_interval_ms: u64,
    max_rate_limit_windows: usize,
    redis: RedisFile,
}

impl Default for StoreFile {
    fn default() -> Self {
        StoreFile {
            kind: "memory".into(),
            sweep_interval_ms: 1000,
            max_rate_limit_windows: crate::store::memory::MAX_WINDOWS,
            redis: RedisFile::default(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RedisFile {
    urls: Vec<String>,
    cluster: bool,
    deadline_ms: u64,
    ca_cert: Option<PathBuf>,
    username: Option<String>,
    password_file: Option<PathBuf>,
    key_prefix: String,
    max_clock_skew_ms: u64,
    shards: u32,
    replicas: u32,
    consumer_groups: Vec<String>,
    trim_keep_seconds: u64,
}

impl Default for RedisFile {
    fn default() -> Self {
        RedisFile {
            urls: Vec::new(),
            cluster: false,
            deadline_ms: 250,
            ca_cert: None,
            username: None,
            password_file: None,
            key_prefix: "tollgate".into(),
            max_clock_skew_ms: 2000,
            shards: 0,
            replicas: 0,
            consumer_groups: Vec::new(),
            trim_keep_seconds: crate::lease::DEFAULT_TRIM_KEEP_SECONDS,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct JournalFile {
    dir: PathBuf,
    sync: String,
    sync_interval_ms: u64,
    segment_bytes: u64,
    max_bytes: u64,
    on_corrupt: String,
    archive: bool,
}

impl Default for JournalFile {
    fn default() -> Self {
        JournalFile {
            dir: PathBuf::from("tollgate-journal"),
            sync: "always".into(),
            sync_interval_ms: 10,
            segment_bytes: 16 << 20,
            max_bytes: 1 << 30,
            on_corrupt: "stop".into(),
            archive: false,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct LeasesFile {
    ttl_seconds: u64,
    horizon_ms: u64,
    idle_return_seconds: u64,
    report_interval_ms: u64,
}

impl Default for LeasesFile {
    fn default() -> Self {
        LeasesFile {
            ttl_seconds: 30,
            horizon_ms: 2000,
            idle_return_seconds: 10,
            report_interval_ms: 1000,
        }
    }
}

/// Which store, and how to reach and lease from Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreSettings {
    /// `memory` or `redis`.
    pub kind: StoreKind,
    /// Where Redis is (used when `kind` is `redis`).
    pub redis: RedisSettings,
    /// Lease sizing and upkeep (Redis store).
    pub leases: LeaseSettings,
    /// `store.redis.shards` as configured (0: by the kind of Redis).
    pub shards_configured: u32,
    /// The most Envoy rate-limit windows the memory store keeps open.
    pub max_rate_limit_windows: usize,
}

/// The store kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    /// Embedded, one process.
    Memory,
    /// Shared through Redis or Redis Cluster.
    Redis,
}

impl StoreSettings {
    /// Switches settings already validated to Redis at `urls` (for code
    /// that builds a store in-process, as tests and benchmarks do; the
    /// command line's `--redis` goes through [`Overrides`]): several URLs
    /// are Cluster seed nodes.
    pub fn use_redis(&mut self, urls: Vec<String>, cluster: bool) {
        self.kind = StoreKind::Redis;
        let was_cluster = self.redis.cluster;
        self.redis.cluster = cluster || urls.len() > 1 || self.redis.cluster;
        self.redis.urls = urls;
        if self.redis.cluster && !was_cluster && self.shards_configured == 0 {
            self.leases.shards = shards(0, true);
        }
    }
}

/// The shortest idempotency window accepted: request ids and lease
/// reports must be remembered for as long as they may be retried.
pub const MIN_IDEMPOTENCY_WINDOW_SECONDS: u64 = 900;

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct HoldsFile {
    ttl_seconds: u64,
    on_expiry: String,
    idempotency_window_seconds: u64,
    recent_usage: usize,
    max_request_ids: usize,
}

impl Default for HoldsFile {
    fn default() -> Self {
        HoldsFile {
            ttl_seconds: 900,
            on_expiry: "release".into(),
            idempotency_window_seconds: 3_600,
            recent_usage: 20,
            max_request_ids: 1_000_000,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct UsageFile {
    sink: String,
    path: String,
}

impl Default for UsageFile {
    fn default() -> Self {
        UsageFile {
            sink: "file".into(),
            path: "tollgate-usage.jsonl".into(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AllowanceFile {
    tokens: u64,
    period: String,
    #[serde(default)]
    anchor: Option<String>,
    #[serde(default)]
    rollover_cap: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PlanFile {
    #[serde(default)]
    allowance: Option<AllowanceFile>,
    #[serde(default)]
    draw_order: Option<Vec<String>>,
    #[serde(default)]
    allowed_models: Option<Vec<String>>,
    #[serde(default)]
    limits: ScopedLimits,
    #[serde(default)]
    on_store_outage: Option<String>,
    #[serde(default)]
    outage_allowance: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PricesFile {
    input: String,
    #[serde(default)]
    cached_input: Option<String>,
    #[serde(default)]
    cache_write: Option<String>,
    output: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ContextTierFile {
    min_prompt_tokens: u64,
    #[serde(flatten)]
    prices: PricesFile,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TierFile {
    #[serde(flatten)]
    prices: PricesFile,
    #[serde(default)]
    context_tiers: Vec<ContextTierFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ModelFile {
    #[serde(default)]
    token_weight: Option<String>,
    tiers: BTreeMap<String, TierFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WindowFile {
    name: String,
    start: String,
    end: String,
    #[serde(default)]
    time_zone: Option<String>,
    price_percent: u32,
    #[serde(default)]
    models: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VersionFile {
    id: String,
    effective_at: String,
    #[serde(default)]
    models: BTreeMap<String, ModelFile>,
    #[serde(default)]
    windows: Vec<WindowFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PackFile {
    id: String,
    tokens: u64,
    expires_at: String,
    #[serde(default)]
    models: Vec<String>,
    #[serde(default)]
    priority: i32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AccountFile {
    id: String,
    plan: String,
    #[serde(default)]
    time_zone: Option<String>,
    #[serde(default)]
    anchor: Option<String>,
    #[serde(default)]
    credit_limit: Option<String>,
    #[serde(default)]
    paid: Option<String>,
    #[serde(default)]
    promo: Option<String>,
    #[serde(default)]
    packs: Vec<PackFile>,
    #[serde(default)]
    suspended: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default = "default_currency")]
    currency: String,
    #[serde(default)]
    server: ServerFile,
    #[serde(default)]
    store: StoreFile,
    #[serde(default)]
    leases: LeasesFile,
    #[serde(default)]
    journal: JournalFile,
    #[serde(default)]
    holds: HoldsFile,
    #[serde(default)]
    usage: UsageFile,
    #[serde(default)]
    admin: AdminFile,
    #[serde(default)]
    rls: RlsFile,
    #[serde(default)]
    metrics: MetricsFile,
    #[serde(default)]
    plans: BTreeMap<String, PlanFile>,
    #[serde(default)]
    prices: Vec<VersionFile>,
    #[serde(default)]
    accounts: Vec<AccountFile>,
}

/// `[rls]`: the Envoy rate-limit service.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RlsFile {
    config_dir: Option<PathBuf>,
    shadow_mode: bool,
    response_headers: bool,
    max_override_windows: usize,
}

impl Default for RlsFile {
    fn default() -> Self {
        RlsFile {
            config_dir: None,
            shadow_mode: false,
            response_headers: false,
            max_override_windows: crate::rls::config::MAX_OVERRIDE_WINDOWS,
        }
    }
}

/// `[metrics]`: what the Prometheus endpoint shows beyond the defaults.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct MetricsFile {
    accounts: Vec<String>,
}

/// Accounts `[metrics] accounts` may list: each is a label value, so the
/// list stays short.
const MAX_METRICS_ACCOUNTS: usize = 50;

/// `[admin]`: who may call the admin API.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct AdminFile {
    tokens: Vec<TokenFile>,
    tokens_file: Option<PathBuf>,
    tls: Option<TlsFile>,
    certificates: Vec<CertificateFile>,
}

/// `[server.tls]`, `[admin.tls]`: a listener's certificate and key, and
/// the CA its clients' certificates must chain to (PEM files).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsFile {
    cert: PathBuf,
    key: PathBuf,
    client_ca: Option<PathBuf>,
}

/// `[[admin.certificates]]`: the operator a client certificate stands
/// for, by one of its names.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CertificateFile {
    common_name: Option<String>,
    dns_name: Option<String>,
    uri: Option<String>,
    role: String,
    operator: Option<String>,
}

/// A listener's TLS material, read at start (PEM).
#[derive(Clone, PartialEq, Eq)]
pub struct TlsSettings {
    /// The certificate chain.
    pub cert: Vec<u8>,
    /// Its private key.
    pub key: Vec<u8>,
    /// Clients must (data plane) or may (admin) present a certificate
    /// chaining to this CA.
    pub client_ca: Option<Vec<u8>>,
}

impl fmt::Debug for TlsSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsSettings")
            .field("client_ca", &self.client_ca.is_some())
            .finish_non_exhaustive()
    }
}

fn tls(p: &mut Problems, path: &str, f: Option<&TlsFile>) -> Option<TlsSettings> {
    let f = f?;
    let mut read = |name: &str, file: &Path| match std::fs::read(file) {
        Ok(pem) if String::from_utf8_lossy(&pem).contains("-----BEGIN ") => Some(pem),
        Ok(_) => {
            p.push(format!("{path}.{name}"), format!("{}: not a PEM file", file.display()));
            None
        }
        Err(e) => {
            p.push(format!("{path}.{name}"), format!("{}: {e}", file.display()));
            None
        }
    };
    let cert = read("cert", &f.cert);
    let key = read("key", &f.key);
    let client_ca = match &f.client_ca {
        Some(file) => Some(read("client_ca", file)?),
        None => None,
    };
    Some(TlsSettings {
        cert: cert?,
        key: key?,
        client_ca,
    })
}

/// A file of tokens (a mounted secret): `[[tokens]]` entries.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct TokensFile {
    tokens: Vec<TokenFile>,
}

/// One admin token: its SHA-256 (never the token), role and operator.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenFile {
    operator: String,
    role: String,
    sha256: String,
}

fn tokens(p: &mut Problems, path: &str, entries: &[TokenFile]) -> Vec<Token> {
    let mut out = Vec::new();
    for (i, t) in entries.iter().enumerate() {
        let at = format!("{path}[{i}]");
        let operator = t.operator.trim();
        if operator.is_empty() || operator.len() > 128 || operator.chars().any(char::is_control) {
            p.push(format!("{at}.operator"), "must be 1 to 128 printable characters");
        }
        let role = p.check(format!("{at}.role"), t.role.parse::<Role>());
        let sha256 = p.check(format!("{at}.sha256"), parse_sha256(&t.sha256));
        if let (Some(role), Some(sha256)) = (role, sha256) {
            out.push(Token {
                sha256,
                role,
                operator: operator.to_owned(),
            });
        }
    }
    out
}

fn tokens_file(p: &mut Problems, label: &str, path: &Path) -> Vec<Token> {
    use std::os::unix::fs::PermissionsExt;
    // Whoever may write it may let in a token of their own. The mode is
    // that of the file opened, not of whatever the path names later: its
    // text, or the mode that refuses it.
    let read = || -> std::io::Result<Result<String, u32>> {
        let mut file = std::fs::File::open(path)?;
        let mode = file.metadata()?.permissions().mode();
        if mode & 0o022 != 0 {
            return Ok(Err(mode & 0o777));
        }
        let mut text = String::new();
        std::io::Read::read_to_string(&mut file, &mut text)?;
        Ok(Ok(text))
    };
    let text = match read() {
        Ok(Ok(text)) => text,
        Ok(Err(mode)) => {
            p.push(
                label,
                format!(
                    "{}: its group or others may change it (mode {mode:o}); chmod go-w {0}",
                    path.display()
                ),
            );
            return Vec::new();
        }
        Err(e) => {
            p.push(label, format!("{}: {e}", path.display()));
            return Vec::new();
        }
    };
    match toml::from_str::<TokensFile>(&text) {
        Ok(file) => tokens(p, &format!("{}: tokens", path.display()), &file.tokens),
        Err(e) => {
            p.push(label, format!("{}: {}", path.display(), e.message()));
            Vec::new()
        }
    }
}

/// A TOML syntax or shape error in `text`, with its line.
fn syntax(text: &str, e: &toml::de::Error) -> ConfigErrors {
    let message = e.message().to_owned();
    let path = e
        .span()
        .map(|span| {
            let line = text[..span.start].matches('\n').count() + 1;
            format!("line {line}")
        })
        .unwrap_or_else(|| "(file)".into());
    ConfigErrors(vec![ConfigError { path, message }])
}

/// Price versions written as in the configuration (`[[prices]]` tables),
/// e.g. for `tollgate admin prices publish`: every version, or every
/// problem found.
pub fn parse_price_versions(text: &str) -> Result<Vec<PriceVersion>, ConfigErrors> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct PricesFile {
        prices: Vec<VersionFile>,
    }
    let file: PricesFile = toml::from_str(text).map_err(|e| syntax(text, &e))?;
    let mut p = Problems::default();
    let versions = versions(&mut p, &file.prices);
    if p.0.is_empty() {
        Ok(versions)
    } else {
        Err(ConfigErrors(p.0))
    }
}

/// The admin tokens in the file at `path` (`[[tokens]]` entries with
/// `operator`, `role` and `sha256`), or every problem found in it.
pub fn read_admin_tokens(path: &Path) -> Result<Vec<Token>, ConfigErrors> {
    let mut p = Problems::default();
    let tokens = tokens_file(&mut p, "--admin-tokens", path);
    if p.0.is_empty() {
        Ok(tokens)
    } else {
        Err(ConfigErrors(p.0))
    }
}

fn default_currency() -> String {
    "USD".into()
}

/// Collects problems while converting, so all are reported at once.
#[derive(Default)]
struct Problems(Vec<ConfigError>);

impl Problems {
    fn push(&mut self, path: impl Into<String>, message: impl fmt::Display) {
        self.0.push(ConfigError {
            path: path.into(),
            message: message.to_string(),
        });
    }

    fn check<T, E: fmt::Display>(&mut self, path: impl Into<String>, r: Result<T, E>) -> Option<T> {
        r.map_err(|e| self.push(path, e)).ok()
    }
}

/// Parses `day`, `week`, `month` or `year`.
pub fn parse_period(s: &str) -> Result<PeriodUnit, String> {
    match s {
        "day" => Ok(PeriodUnit::Day),
        "week" => Ok(PeriodUnit::Week),
        "month" => Ok(PeriodUnit::Month),
        "year" => Ok(PeriodUnit::Year),
        _ => Err(format!("expected day, week, month or year, got {s:?}")),
    }
}

/// Parses `calendar` or `anniversary`.
pub fn parse_anchor(s: &str) -> Result<Anchor, String> {
    match s {
        "calendar" => Ok(Anchor::Calendar),
        "anniversary" => Ok(Anchor::Anniversary),
        _ => Err(format!("expected calendar or anniversary, got {s:?}")),
    }
}

fn parse_source(s: &str) -> Result<SourceClass, String> {
    match s {
        "allowance" => Ok(SourceClass::Allowance),
        "packs" => Ok(SourceClass::Packs),
        "promo" => Ok(SourceClass::Promo),
        "paid" => Ok(SourceClass::Paid),
        "credit" => Ok(SourceClass::Credit),
        _ => Err(format!("expected allowance, packs, promo, paid or credit, got {s:?}")),
    }
}

fn parse_money(s: &str) -> Result<Money, String> {
    s.parse::<Money>().map_err(|e| e.to_string())
}

fn parse_amount(s: &str) -> Result<Money, String> {
    let m = parse_money(s)?;
    if m.is_negative() {
        Err(format!("{s:?} must not be negative"))
    } else {
        Ok(m)
    }
}

/// Parses a token weight: a decimal with at most three decimal places,
/// above zero, at most 1000.
pub fn parse_weight(s: &str) -> Result<u32, String> {
    let m: Money = s
        .parse()
        .map_err(|_| format!("expected a decimal weight such as \"1.5\", got {s:?}"))?;
    let milli = m.picos() / 1_000_000_000;
    if m.picos() % 1_000_000_000 != 0 {
        return Err(format!("weight {s:?} has more than 3 decimal places"));
    }
    // The bound itself is checked with the rest of the version
    // (`PriceVersion::problems`); here only what fits a u32.
    u32::try_from(milli).map_err(|_| format!("weight {s:?} must be above 0 and at most 1000"))
}

/// Parses `HH:MM` into minutes after midnight.
fn parse_clock(s: &str) -> Result<u32, String> {
    let err = || format!("expected HH:MM, got {s:?}");
    let (h, m) = s.split_once(':').ok_or_else(err)?;
    let (h, m): (u32, u32) = (h.parse().map_err(|_| err())?, m.parse().map_err(|_| err())?);
    if h > 23 || m > 59 || s.len() != 5 {
        return Err(err());
    }
    Ok(h * 60 + m)
}

fn prices(p: &mut Problems, path: &str, f: &PricesFile) -> TokenPrices {
    let mut one = |field: &str, v: Option<&String>, fallback: &String| {
        let text = v.unwrap_or(fallback);
        p.check(format!("{path}.{field}"), parse_money(text).and_then(price_per_token))
            .unwrap_or(Money::ZERO)
    };
    TokenPrices {
        input: one("input", None, &f.input),
        cached_input: one("cached_input", f.cached_input.as_ref(), &f.input),
        cache_write: one("cache_write", f.cache_write.as_ref(), &f.input),
        output: one("output", None, &f.output),
    }
}

/// The `[[prices]]` tables as versions (their problems go to `p`).
fn versions(p: &mut Problems, files: &[VersionFile]) -> Vec<PriceVersion> {
    files
        .iter()
        .enumerate()
        .filter_map(|(i, f)| version(p, &format!("prices[{i}]"), f))
        .collect()
}

fn version(p: &mut Problems, path: &str, f: &VersionFile) -> Option<PriceVersion> {
    let before = p.0.len();
    let id = p.check(format!("{path}.id"), VersionId::parse(&f.id));
    let effective_at = p.check(format!("{path}.effective_at"), f.effective_at.parse::<Timestamp>());
    let mut models = Map::default();
    for (name, m) in &f.models {
        let mpath = format!("{path}.models.{name}");
        let model = p.check(mpath.clone(), ModelId::parse(name));
        let weight = match &m.token_weight {
            None => Some(1000),
            Some(w) => p.check(format!("{mpath}.token_weight"), parse_weight(w)),
        };
        let mut tiers = Map::default();
        for (tier_name, t) in &m.tiers {
            let tpath = format!("{mpath}.tiers.{tier_name}");
            let tier = p.check(tpath.clone(), TierId::parse(tier_name));
            let base = prices(p, &tpath, &t.prices);
            let context_tiers = t
                .context_tiers
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    (
                        c.min_prompt_tokens,
                        prices(p, &format!("{tpath}.context_tiers[{i}]"), &c.prices),
                    )
                })
                .collect();
            if let Some(tier) = tier {
                tiers.insert(tier, TierPrices { base, context_tiers });
            }
        }
        if let (Some(model), Some(weight_milli)) = (model, weight) {
            models.insert(model, ModelPrices { weight_milli, tiers });
        }
    }
    let mut windows = Vec::new();
    for (i, w) in f.windows.iter().enumerate() {
        let wpath = format!("{path}.windows[{i}]");
        let start = p.check(format!("{wpath}.start"), parse_clock(&w.start));
        let end = p.check(format!("{wpath}.end"), parse_clock(&w.end));
        let tz = p.check(
            format!("{wpath}.time_zone"),
            parse_time_zone(w.time_zone.as_deref().unwrap_or("UTC")),
        );
        let models: Vec<_> = w
            .models
            .iter()
            .filter_map(|m| p.check(format!("{wpath}.models"), ModelId::parse(m)))
            .collect();
        if w.price_percent > 1000 {
            p.push(format!("{wpath}.price_percent"), "must be at most 1000");
        }
        if let (Some(start_minute), Some(end_minute), Some(time_zone)) = (start, end, tz) {
            windows.push(PriceWindow {
                name: w.name.clone(),
                start_minute,
                end_minute,
                time_zone,
                price_percent: w.price_percent,
                models: (!models.is_empty()).then(|| models.into_iter().collect()),
            });
        }
    }
    let version = PriceVersion {
        id: id?,
        effective_at: effective_at?,
        models,
        windows,
    };
    if p.0.len() > before {
        return None;
    }
    for problem in version.problems() {
        p.push(path, problem);
    }
    Some(version)
}

fn store_settings(
    p: &mut Problems,
    f: &StoreFile,
    leases: &LeasesFile,
    env: &dyn Fn(&str) -> Option<String>,
) -> StoreSettings {
    let kind = match f.kind.as_str() {
        "memory" => StoreKind::Memory,
        "redis" => StoreKind::Redis,
        other => {
            p.push("store.kind", format!("expected memory or redis, got {other:?}"));
            StoreKind::Memory
        }
    };
    if !(1..=100_000_000).contains(&f.max_rate_limit_windows) {
        p.push("store.max_rate_limit_windows", "must be between 1 and 100000000");
    }
    let r = &f.redis;
    for (i, url) in r.urls.iter().enumerate() {
        if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
            p.push(
                format!("store.redis.urls[{i}]"),
                "must start with redis:// or rediss://",
            );
        }
    }
    if kind == StoreKind::Redis && r.urls.is_empty() {
        p.push(
            "store.redis.urls",
            "required with store.kind = \"redis\" (or give --redis URL, or TOLLGATE_REDIS)",
        );
    }
    if !(10..=60_000).contains(&r.deadline_ms) {
        p.push("store.redis.deadline_ms", "must be between 10 and 60000");
    }
    if r.replicas > 16 {
        p.push("store.redis.replicas", "must be at most 16");
    }
    if r.key_prefix.is_empty() || r.key_prefix.contains(['{', '}']) {
        p.push("store.redis.key_prefix", "must be non-empty and free of braces");
    }
    if r.trim_keep_seconds > 86_400 {
        p.push("store.redis.trim_keep_seconds", "must be at most 86400 (a day)");
    }
    if r.consumer_groups.len() > 16 {
        p.push("store.redis.consumer_groups", "at most 16 groups");
    }
    for (i, group) in r.consumer_groups.iter().enumerate() {
        if group.is_empty() || group.len() > 128 || group.chars().any(|c| c.is_whitespace() || c.is_control()) {
            p.push(
                "store.redis.consumer_groups",
                format!("{group:?}: a group name is 1 to 128 characters, without spaces or control characters"),
            );
        } else if r.consumer_groups[..i].contains(group) {
            p.push("store.redis.consumer_groups", format!("{group:?} is named twice"));
        }
    }
    // The password never sits in the file itself: the environment or a
    // mounted secret.
    let password = match (env("TOLLGATE_REDIS_PASSWORD"), &r.password_file) {
        (Some(password), _) => Some(password),
        (None, Some(path)) => match std::fs::read_to_string(path) {
            Ok(text) => Some(text.trim_end_matches(['\n', '\r']).to_owned()),
            Err(e) => {
                p.push("store.redis.password_file", format!("{}: {e}", path.display()));
                None
            }
        },
        (None, None) => None,
    };
    let username = env("TOLLGATE_REDIS_USERNAME").or_else(|| r.username.clone());
    if username.is_some() && password.is_none() {
        p.push(
            "store.redis.username",
            "needs a password (TOLLGATE_REDIS_PASSWORD or store.redis.password_file)",
        );
    }
    if leases.ttl_seconds < 3 || leases.ttl_seconds > 3600 {
        p.push("leases.ttl_seconds", "must be between 3 and 3600");
    }
    if leases.horizon_ms == 0 || leases.horizon_ms > 600_000 {
        p.push("leases.horizon_ms", "must be between 1 and 600000");
    }
    if leases.report_interval_ms == 0 || leases.report_interval_ms > leases.ttl_seconds * 1000 / 3 {
        p.push(
            "leases.report_interval_ms",
            "must be between 1 and a third of leases.ttl_seconds",
        );
    }
    if leases.idle_return_seconds == 0 {
        p.push("leases.idle_return_seconds", "must be greater than zero");
    }
    StoreSettings {
        kind,
        redis: RedisSettings {
            urls: r.urls.clone(),
            cluster: r.cluster,
            deadline: Duration::from_millis(r.deadline_ms),
            ca_cert: r.ca_cert.clone(),
            credentials: password.map(|password| Credentials { username, password }),
            replicas: r.replicas,
        },
        leases: LeaseSettings {
            ttl: Duration::from_secs(leases.ttl_seconds),
            horizon: Duration::from_millis(leases.horizon_ms),
            idle_return: Duration::from_secs(leases.idle_return_seconds),
            report_interval: Duration::from_millis(leases.report_interval_ms),
            max_clock_skew: (r.max_clock_skew_ms > 0).then(|| Duration::from_millis(r.max_clock_skew_ms)),
            prefix: r.key_prefix.clone(),
            shards: shards(r.shards, r.cluster),
            consumer_groups: r.consumer_groups.clone(),
            trim_keep: Duration::from_secs(r.trim_keep_seconds),
        },
        shards_configured: r.shards,
        max_rate_limit_windows: f.max_rate_limit_windows,
    }
}

/// Logical shards of the usage streams: as configured, else one on a
/// single Redis and 16 on a cluster (spread over its masters).
pub fn shards(configured: u32, cluster: bool) -> u32 {
    match (configured, cluster) {
        (0, false) => 1,
        (0, true) => 16,
        (n, _) => n,
    }
}

fn journal_settings(p: &mut Problems, f: &JournalFile) -> JournalSettings {
    let sync = match f.sync.as_str() {
        "always" => SyncPolicy::Always,
        "interval" if (1..=60_000).contains(&f.sync_interval_ms) => {
            SyncPolicy::Interval(Duration::from_millis(f.sync_interval_ms))
        }
        "interval" => {
            p.push("journal.sync_interval_ms", "must be between 1 and 60000");
            SyncPolicy::Always
        }
        "none" => SyncPolicy::None,
        other => {
            p.push(
                "journal.sync",
                format!("expected always, interval or none, got {other:?}"),
            );
            SyncPolicy::Always
        }
    };
    let on_corrupt = match f.on_corrupt.as_str() {
        "stop" => OnCorrupt::Stop,
        "continue" => OnCorrupt::Continue,
        other => {
            p.push(
                "journal.on_corrupt",
                format!("expected stop or continue, got {other:?}"),
            );
            OnCorrupt::Stop
        }
    };
    if f.dir.as_os_str().is_empty() {
        p.push("journal.dir", "must not be empty");
    }
    if f.segment_bytes < 4096 {
        p.push("journal.segment_bytes", "must be at least 4096");
    }
    if f.max_bytes < f.segment_bytes.saturating_mul(2) {
        p.push("journal.max_bytes", "must be at least twice journal.segment_bytes");
    }
    JournalSettings {
        dir: f.dir.clone(),
        sync,
        segment_bytes: f.segment_bytes,
        max_bytes: f.max_bytes,
        on_corrupt,
        archive: f.archive,
    }
}

fn plan(p: &mut Problems, name: &str, f: &PlanFile) -> Option<Plan> {
    let path = format!("plans.{name}");
    let id = p.check(path.clone(), PlanId::parse(name));
    let allowance = f.allowance.as_ref().and_then(|a| {
        let period = p.check(format!("{path}.allowance.period"), parse_period(&a.period));
        let anchor = p.check(
            format!("{path}.allowance.anchor"),
            parse_anchor(a.anchor.as_deref().unwrap_or("calendar")),
        );
        if a.tokens == 0 {
            p.push(format!("{path}.allowance.tokens"), "must be greater than zero");
        }
        Some(Allowance {
            tokens: a.tokens,
            period: period?,
            anchor: anchor?,
            rollover_cap: a.rollover_cap,
        })
    });
    let draw_order = match &f.draw_order {
        None => SourceClass::DEFAULT_ORDER.to_vec(),
        Some(names) => {
            let order: Vec<_> = names
                .iter()
                .filter_map(|n| p.check(format!("{path}.draw_order"), parse_source(n)))
                .collect();
            p.check(format!("{path}.draw_order"), check_draw_order(&order));
            order
        }
    };
    let allowed_models = f.allowed_models.as_ref().map(|names| {
        names
            .iter()
            .filter_map(|n| p.check(format!("{path}.allowed_models"), ModelId::parse(n)))
            .collect::<Set<_>>()
    });
    for (scope, set) in [
        ("account", &f.limits.account),
        ("api_key", &f.limits.api_key),
        ("per_model", &f.limits.per_model),
    ] {
        p.check(format!("{path}.limits.{scope}"), set.check());
    }
    for (model, set) in &f.limits.models {
        p.check(format!("{path}.limits.models.{model}"), set.check());
    }
    let allowance_path = format!("{path}.outage_allowance");
    let on_store_outage = match (f.on_store_outage.as_deref().unwrap_or("closed"), &f.outage_allowance) {
        ("closed", None) => OutagePolicy::Closed,
        ("open", None) => OutagePolicy::Open,
        ("allowance", Some(amount)) => match amount.parse::<Money>() {
            Ok(m) if m.is_positive() => OutagePolicy::Allowance(m),
            Ok(_) => {
                p.push(allowance_path, "must be greater than zero");
                OutagePolicy::Closed
            }
            Err(e) => {
                p.push(allowance_path, e);
                OutagePolicy::Closed
            }
        },
        ("allowance", None) => {
            p.push(allowance_path, "required when on_store_outage is \"allowance\"");
            OutagePolicy::Closed
        }
        ("closed" | "open", Some(_)) => {
            p.push(allowance_path, "only with on_store_outage = \"allowance\"");
            OutagePolicy::Closed
        }
        (other, _) => {
            p.push(
                format!("{path}.on_store_outage"),
                format!("expected closed, open or allowance, got {other:?}"),
            );
            OutagePolicy::Closed
        }
    };
    Some(Plan {
        id: id?,
        allowance,
        draw_order,
        allowed_models,
        limits: f.limits.clone(),
        on_store_outage,
    })
}

fn account(p: &mut Problems, i: usize, f: &AccountFile, plans: &Map<PlanId, Plan>) -> Option<SeedAccount> {
    let path = format!("accounts[{i}]");
    let id = p.check(format!("{path}.id"), AccountId::parse(&f.id));
    let plan = p.check(format!("{path}.plan"), PlanId::parse(&f.plan));
    if let Some(plan) = &plan
        && !plans.contains_key(plan)
    {
        p.push(format!("{path}.plan"), format!("no plan named {plan}"));
    }
    let time_zone = p.check(
        format!("{path}.time_zone"),
        parse_time_zone(f.time_zone.as_deref().unwrap_or("UTC")),
    );
    let anchor = match &f.anchor {
        None => Some(None),
        Some(a) => p.check(format!("{path}.anchor"), parse_anchor(a).map(Some)),
    };
    let mut amount = |field: &str, v: &Option<String>| {
        v.as_deref().map_or(Some(Money::ZERO), |s| {
            p.check(format!("{path}.{field}"), parse_amount(s))
        })
    };
    let credit_limit = amount("credit_limit", &f.credit_limit);
    let paid = amount("paid", &f.paid);
    let promo = amount("promo", &f.promo);
    let mut packs = Vec::new();
    for (j, pk) in f.packs.iter().enumerate() {
        let ppath = format!("{path}.packs[{j}]");
        let pack_id = p.check(format!("{ppath}.id"), LotId::parse(&pk.id));
        let expires_at = p.check(format!("{ppath}.expires_at"), pk.expires_at.parse::<Timestamp>());
        if pk.tokens == 0 {
            p.push(format!("{ppath}.tokens"), "must be greater than zero");
        }
        let models: std::collections::BTreeSet<_> = pk
            .models
            .iter()
            .filter_map(|m| p.check(format!("{ppath}.models"), ModelId::parse(m)))
            .collect();
        if let (Some(pack_id), Some(expires_at)) = (pack_id, expires_at) {
            packs.push(PackGrant {
                pack_id,
                tokens: pk.tokens,
                expires_at,
                models: (!models.is_empty()).then_some(models),
                priority: pk.priority,
            });
        }
    }
    Some(SeedAccount {
        id: id?,
        plan: plan?,
        time_zone: time_zone?,
        anchor: anchor?,
        credit_limit: credit_limit?,
        paid: paid?,
        promo: promo?,
        packs,
        suspended: f.suspended,
    })
}

fn address(p: &mut Problems, path: &str, value: Option<&str>, default: &str) -> SocketAddr {
    let text = value.unwrap_or(default);
    p.check(path, text.parse::<SocketAddr>().map_err(|e| format!("{text:?}: {e}")))
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)))
}

/// What the command line sets over the file and the environment
/// (`tollgate serve` and `check-config` flags), applied by
/// [`Settings::parse_with`] before anything is validated.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overrides {
    /// `server.listen`.
    pub listen: Option<SocketAddr>,
    /// `server.admin_listen`.
    pub admin_listen: Option<SocketAddr>,
    /// `server.http_listen`.
    pub http_listen: Option<SocketAddr>,
    /// `journal.dir`.
    pub journal: Option<PathBuf>,
    /// `rls.config_dir`.
    pub rls_config: Option<PathBuf>,
    /// The Redis store at these URLs (`store.kind = "redis"`,
    /// `store.redis.urls`); several are Cluster seed nodes.
    pub redis: Vec<String>,
    /// The one Redis URL is a Cluster node (`store.redis.cluster`).
    pub redis_cluster: bool,
}

impl Overrides {
    fn apply(&self, file: &mut File, p: &mut Problems) {
        let server = &mut file.server;
        for (field, flag) in [
            (&mut server.listen, self.listen),
            (&mut server.admin_listen, self.admin_listen),
            (&mut server.http_listen, self.http_listen),
        ] {
            if let Some(addr) = flag {
                *field = Some(addr.to_string());
            }
        }
        if let Some(dir) = &self.journal {
            file.journal.dir = dir.clone();
        }
        if let Some(dir) = &self.rls_config {
            file.rls.config_dir = Some(dir.clone());
        }
        if self.redis.is_empty() {
            return;
        }
        let bad: Vec<&String> = self
            .redis
            .iter()
            .filter(|u| !(u.starts_with("redis://") || u.starts_with("rediss://")))
            .collect();
        if let Some(url) = bad.first() {
            p.push("--redis", format!("{url}: must start with redis:// or rediss://"));
            return;
        }
        let redis = &mut file.store.redis;
        file.store.kind = "redis".into();
        redis.cluster = redis.cluster || self.redis_cluster || self.redis.len() > 1;
        redis.urls = self.redis.clone();
    }
}

impl Settings {
    /// Reads `path`, or the built-in demo when `None`.
    pub fn load(
        path: Option<&Path>,
        env: &dyn Fn(&str) -> Option<String>,
        flags: &Overrides,
    ) -> Result<Settings, ConfigErrors> {
        let text = match path {
            None => DEMO.to_owned(),
            Some(path) => std::fs::read_to_string(path).map_err(|e| {
                ConfigErrors(vec![ConfigError {
                    path: path.display().to_string(),
                    message: e.to_string(),
                }])
            })?,
        };
        Settings::parse_with(&text, env, flags)
    }

    /// Parses and validates TOML text, with the environment's overrides
    /// and no flags (see [`Settings::parse_with`]).
    pub fn parse(text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Settings, ConfigErrors> {
        Settings::parse_with(text, env, &Overrides::default())
    }

    /// Parses TOML text, applies the overrides and validates the result:
    /// the one place where file < environment < flags is decided. The
    /// environment (read through `env`) sets `TOLLGATE_USAGE_SINK`,
    /// `TOLLGATE_USAGE_PATH`, `TOLLGATE_HOLD_TTL_SECONDS` and
    /// `TOLLGATE_JOURNAL`; `flags` (whose values the command line may have
    /// taken from its own environment variables) come last.
    pub fn parse_with(
        text: &str,
        env: &dyn Fn(&str) -> Option<String>,
        flags: &Overrides,
    ) -> Result<Settings, ConfigErrors> {
        let mut file: File = toml::from_str(text).map_err(|e| syntax(text, &e))?;
        let mut p = Problems::default();
        if let Some(sink) = env("TOLLGATE_USAGE_SINK") {
            file.usage.sink = sink;
        }
        if let Some(path) = env("TOLLGATE_USAGE_PATH") {
            file.usage.path = path;
        }
        if let Some(ttl) = env("TOLLGATE_HOLD_TTL_SECONDS") {
            match ttl.parse() {
                Ok(ttl) => file.holds.ttl_seconds = ttl,
                Err(_) => p.push(
                    "TOLLGATE_HOLD_TTL_SECONDS",
                    format!("expected whole seconds, got {ttl:?}"),
                ),
            }
        }
        if let Some(dir) = env("TOLLGATE_JOURNAL") {
            file.journal.dir = PathBuf::from(dir);
        }
        flags.apply(&mut file, &mut p);
        let listen = address(
            &mut p,
            "server.listen",
            file.server.listen.as_deref(),
            "127.0.0.1:50051",
        );
        let admin_listen = address(
            &mut p,
            "server.admin_listen",
            file.server.admin_listen.as_deref(),
            "127.0.0.1:50052",
        );
        let http_listen = file
            .server
            .http_listen
            .as_deref()
            .map(|text| address(&mut p, "server.http_listen", Some(text), text));
        if file.metrics.accounts.len() > MAX_METRICS_ACCOUNTS {
            p.push(
                "metrics.accounts",
                format!("at most {MAX_METRICS_ACCOUNTS} accounts (each is a label value)"),
            );
        }
        let metrics_accounts = file
            .metrics
            .accounts
            .iter()
            .filter_map(|a| {
                p.check(
                    "metrics.accounts",
                    AccountId::parse(a).map_err(|e| format!("{a:?}: {e}")),
                )
            })
            .collect();
        let store = store_settings(&mut p, &file.store, &file.leases, env);
        let journal = journal_settings(&mut p, &file.journal);
        if file.server.reload_poll_ms.is_some_and(|ms| ms > 3_600_000) {
            p.push("server.reload_poll_ms", "must be at most 3600000 (0: on SIGHUP only)");
        }
        if file
            .server
            .max_connections
            .is_some_and(|n| !(1..=1_000_000).contains(&n))
        {
            p.push("server.max_connections", "must be between 1 and 1000000");
        }
        if file
            .server
            .first_bytes_timeout_ms
            .is_some_and(|ms| !(1..=600_000).contains(&ms))
        {
            p.push("server.first_bytes_timeout_ms", "must be between 1 and 600000");
        }
        if file
            .server
            .call_timeout_ms
            .is_some_and(|ms| !(1..=3_600_000).contains(&ms))
        {
            p.push("server.call_timeout_ms", "must be between 1 and 3600000");
        }
        if file.server.shutdown_grace_seconds.is_some_and(|s| s > 3600) {
            p.push("server.shutdown_grace_seconds", "must be at most 3600");
        }
        if file
            .server
            .shutdown_drain_seconds
            .is_some_and(|s| !(1..=3600).contains(&s))
        {
            p.push("server.shutdown_drain_seconds", "must be between 1 and 3600");
        }
        if file.store.sweep_interval_ms == 0 {
            p.push("store.sweep_interval_ms", "must be greater than zero");
        }
        let on_expiry = match file.holds.on_expiry.as_str() {
            "release" => ExpiryPolicy::Release,
            "charge_in_full" => ExpiryPolicy::ChargeInFull,
            other => {
                p.push(
                    "holds.on_expiry",
                    format!("expected release or charge_in_full, got {other:?}"),
                );
                ExpiryPolicy::Release
            }
        };
        if file.holds.ttl_seconds == 0 || file.holds.ttl_seconds > 7 * 86_400 {
            p.push("holds.ttl_seconds", "must be between 1 and 604800 (a week)");
        }
        // Shorter, and a retry could be charged again, and a lease report
        // resent after its lapsed lease was forgotten applied twice.
        if !(MIN_IDEMPOTENCY_WINDOW_SECONDS..=366 * 86_400).contains(&file.holds.idempotency_window_seconds) {
            p.push(
                "holds.idempotency_window_seconds",
                "must be between 900 (15 minutes) and 31622400 (a year)",
            );
        }
        if !(1_000..=1_000_000_000).contains(&file.holds.max_request_ids) {
            p.push("holds.max_request_ids", "must be between 1000 and 1000000000");
        }
        let usage = match file.usage.sink.as_str() {
            "file" if file.usage.path.is_empty() => {
                p.push("usage.path", "must not be empty");
                UsageSinkConfig::Stdout
            }
            "file" => UsageSinkConfig::File(PathBuf::from(&file.usage.path)),
            "stdout" => UsageSinkConfig::Stdout,
            other => {
                p.push("usage.sink", format!("expected file or stdout, got {other:?}"));
                UsageSinkConfig::Stdout
            }
        };
        let plans: Map<PlanId, Plan> = file
            .plans
            .iter()
            .filter_map(|(name, f)| plan(&mut p, name, f))
            .map(|plan| (plan.id.clone(), plan))
            .collect();
        let versions = versions(&mut p, &file.prices);
        let prices = p.check("prices", PriceBook::new(versions)).unwrap_or_default();
        let mut seen = HashSet::new();
        let mut seed = Vec::new();
        for (i, f) in file.accounts.iter().enumerate() {
            if let Some(a) = account(&mut p, i, f, &plans) {
                if !seen.insert(a.id.clone()) {
                    p.push(format!("accounts[{i}].id"), format!("account {} appears twice", a.id));
                }
                seed.push(a);
            }
        }
        let mut admin = tokens(&mut p, "admin.tokens", &file.admin.tokens);
        let server_tls = tls(&mut p, "server.tls", file.server.tls.as_ref());
        let admin_tls = tls(&mut p, "admin.tls", file.admin.tls.as_ref());
        let mut certificates = Vec::new();
        for (i, c) in file.admin.certificates.iter().enumerate() {
            let at = format!("admin.certificates[{i}]");
            let names: Vec<(&str, CertificateName)> = [
                (
                    "common_name",
                    &c.common_name,
                    CertificateName::CommonName as fn(String) -> _,
                ),
                ("dns_name", &c.dns_name, CertificateName::Dns),
                ("uri", &c.uri, CertificateName::Uri),
            ]
            .into_iter()
            .filter_map(|(field, value, name)| value.as_ref().map(|v| (field, name(v.trim().to_owned()))))
            .collect();
            let name = match &names[..] {
                [(field, name)] => match name {
                    CertificateName::CommonName(n) | CertificateName::Dns(n) | CertificateName::Uri(n)
                        if n.is_empty() =>
                    {
                        p.push(format!("{at}.{field}"), "must not be empty");
                        None
                    }
                    _ => Some(name.clone()),
                },
                _ => {
                    p.push(at.clone(), "needs exactly one of common_name, dns_name and uri");
                    None
                }
            };
            if let (Some(name), Some(role)) = (name, p.check(format!("{at}.role"), c.role.parse::<Role>())) {
                let operator = match (&c.operator, &name) {
                    (Some(operator), _) => operator.clone(),
                    (None, CertificateName::CommonName(n) | CertificateName::Dns(n) | CertificateName::Uri(n)) => {
                        n.clone()
                    }
                };
                certificates.push(CertificateRule { name, role, operator });
            }
        }
        if !certificates.is_empty() && file.admin.tls.as_ref().is_none_or(|t| t.client_ca.is_none()) {
            p.push(
                "admin.certificates",
                "need admin.tls with a client_ca (client certificates are checked against it)",
            );
        }
        if let Some(path) = &file.admin.tokens_file {
            admin.extend(tokens_file(&mut p, "admin.tokens_file", path));
        }
        if !(1..=10_000_000).contains(&file.rls.max_override_windows) {
            p.push("rls.max_override_windows", "must be between 1 and 10000000");
        }
        if !p.0.is_empty() {
            return Err(ConfigErrors(p.0));
        }
        let seconds = |s: u64| SignedDuration::from_secs(i64::try_from(s).unwrap_or(i64::MAX));
        Ok(Settings {
            admin: Operators::new(admin).with_certificates(certificates),
            tls: server_tls,
            admin_tls,
            rls_config_dir: file.rls.config_dir.clone(),
            rls: crate::rls::config::RlsSettings {
                shadow_mode: file.rls.shadow_mode,
                response_headers: file.rls.response_headers,
                max_override_windows: file.rls.max_override_windows,
            },
            currency: file.currency,
            listen,
            admin_listen,
            listen_unix: file.server.listen_unix.clone(),
            admin_listen_unix: file.server.admin_listen_unix.clone(),
            http_listen,
            metrics_accounts,
            sweep_interval: Duration::from_millis(file.store.sweep_interval_ms),
            store,
            journal,
            shutdown_grace: Duration::from_secs(file.server.shutdown_grace_seconds.unwrap_or(20)),
            shutdown_drain: Duration::from_secs(file.server.shutdown_drain_seconds.unwrap_or(10)),
            connections: {
                let default = crate::transport::conn::Guard::default();
                crate::transport::conn::Guard {
                    max: file.server.max_connections.unwrap_or(default.max),
                    first_bytes: file
                        .server
                        .first_bytes_timeout_ms
                        .map_or(default.first_bytes, Duration::from_millis),
                    call: file.server.call_timeout_ms.map_or(default.call, Duration::from_millis),
                }
            },
            reload_poll: match file.server.reload_poll_ms.unwrap_or(2000) {
                0 => None,
                ms => Some(Duration::from_millis(ms)),
            },
            usage,
            catalog: Catalog {
                plans,
                prices,
                hold_ttl: seconds(file.holds.ttl_seconds),
                on_expiry,
                idempotency_window: seconds(file.holds.idempotency_window_seconds),
                recent_usage: file.holds.recent_usage,
                max_request_ids: file.holds.max_request_ids,
            },
            seed,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn the_demo_is_valid() {
        let s = Settings::parse(DEMO, &no_env).unwrap();
        assert_eq!(s.seed.len(), 3);
        assert_eq!(s.catalog.plans.len(), 3);
        assert_eq!(s.catalog.prices.versions().len(), 1);
    }

    /// Cluster seed URLs on the command line default the shards to 16,
    /// but never replace a number the file gives.
    #[test]
    fn redis_urls_from_the_command_line_keep_configured_shards() {
        let mut by_kind = Settings::parse(DEMO, &no_env).unwrap();
        by_kind
            .store
            .use_redis(vec!["redis://a".into(), "redis://b".into()], false);
        assert_eq!(by_kind.store.leases.shards, 16);
        let text = DEMO
            .replace("\nshards = 0\n", "\nshards = 1\n")
            .replace("\nreplicas = 0\n", "\nreplicas = 1\n");
        let mut configured = Settings::parse(&text, &no_env).unwrap();
        configured
            .store
            .use_redis(vec!["redis://a".into(), "redis://b".into()], false);
        assert_eq!(configured.store.leases.shards, 1);
        assert_eq!(configured.store.redis.replicas, 1);
    }

    /// The command line's `--redis` is applied before validation: a file
    /// that names the Redis store without URLs is valid with it, as with
    /// TOLLGATE_REDIS (which the command line reads into the same flag),
    /// and flags win over the file and the environment.
    #[test]
    fn flags_are_applied_before_validation_and_win() {
        let text = DEMO.replacen("kind = \"memory\"", "kind = \"redis\"", 1);
        assert_ne!(text, DEMO);
        let errors = Settings::parse(&text, &no_env).unwrap_err().0;
        assert_eq!(errors[0].path, "store.redis.urls", "{errors:?}");
        let flags = Overrides {
            redis: vec!["redis://a:6379".into()],
            journal: Some(PathBuf::from("/flag")),
            listen: Some("127.0.0.1:7".parse().unwrap()),
            ..Overrides::default()
        };
        let env = |k: &str| (k == "TOLLGATE_JOURNAL").then(|| "/env".to_owned());
        let s = Settings::parse_with(&text, &env, &flags).unwrap();
        assert_eq!(s.store.kind, StoreKind::Redis);
        assert_eq!(s.store.redis.urls, ["redis://a:6379"]);
        assert_eq!(s.journal.dir, PathBuf::from("/flag"), "flag over environment");
        assert_eq!(s.listen, "127.0.0.1:7".parse().unwrap());
        let s = Settings::parse_with(
            &text,
            &env,
            &Overrides {
                journal: None,
                ..flags.clone()
            },
        )
        .unwrap();
        assert_eq!(s.journal.dir, PathBuf::from("/env"), "environment over file");
        // Two URLs are Cluster seeds: the shards follow unless configured.
        let cluster = Overrides {
            redis: vec!["redis://a".into(), "redis://b".into()],
            ..Overrides::default()
        };
        let s = Settings::parse_with(DEMO, &no_env, &cluster).unwrap();
        assert!(s.store.redis.cluster);
        assert_eq!(s.store.leases.shards, 16);
        let bad = Overrides {
            redis: vec!["http://a".into()],
            ..Overrides::default()
        };
        let errors = Settings::parse_with(DEMO, &no_env, &bad).unwrap_err().0;
        assert_eq!(errors[0].path, "--redis", "{errors:?}");
    }

    #[test]
    fn every_problem_is_reported_with_its_path() {
        let text = r#"
            [server]
            listen = "nowhere"
            [holds]
            on_expiry = "forget"
            idempotency_window_seconds = 0
            [plans.p]
            draw_order = ["paid", "packs"]
            [plans.p.limits.models.m]
            tokens_per_minute = 2000000000000
            [plans.p.allowance]
            tokens = 0
            period = "fortnight"
            [[prices]]
            id = "v1"
            effective_at = "2026-01-01T00:00:00Z"
            [prices.models.m.tiers.default]
            input = "0.0000001"
            output = "abc"
            [[accounts]]
            id = "a b"
            plan = "missing"
            time_zone = "Mars/Olympus"
            [[admin.certificates]]
            common_name = "alice"
            uri = "spiffe://example.org/alice"
            role = "read"
            [[admin.certificates]]
            role = "read"
            [[admin.certificates]]
            dns_name = " "
            role = "read"
        "#;
        let errors = Settings::parse(text, &no_env).unwrap_err().0;
        let paths: Vec<_> = errors.iter().map(|e| e.path.as_str()).collect();
        for expected in [
            "server.listen",
            "holds.on_expiry",
            "holds.idempotency_window_seconds",
            "plans.p.allowance.period",
            "plans.p.allowance.tokens",
            "plans.p.draw_order",
            "plans.p.limits.models.m",
            "prices[0].models.m.tiers.default.input",
            "prices[0].models.m.tiers.default.output",
            "accounts[0].id",
            "accounts[0].plan",
            "accounts[0].time_zone",
            "admin.certificates[0]",
            "admin.certificates[1]",
            "admin.certificates[2].dns_name",
        ] {
            assert!(paths.contains(&expected), "missing {expected} in {paths:?}");
        }
    }

    #[test]
    fn syntax_and_unknown_fields_name_the_line() {
        let errors = Settings::parse("[server]\nlisten = \"127.0.0.1:1\"\nlisen = 3\n", &no_env)
            .unwrap_err()
            .0;
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].path, "line 3");
        assert!(errors[0].message.contains("lisen"), "{}", errors[0].message);
    }

    #[test]
    fn environment_overrides_deployment_values() {
        let env = |k: &str| match k {
            "TOLLGATE_USAGE_SINK" => Some("stdout".to_owned()),
            "TOLLGATE_HOLD_TTL_SECONDS" => Some("30".to_owned()),
            _ => None,
        };
        let s = Settings::parse(DEMO, &env).unwrap();
        assert_eq!(s.usage, UsageSinkConfig::Stdout);
        assert_eq!(s.catalog.hold_ttl, SignedDuration::from_secs(30));
        let bad = |k: &str| (k == "TOLLGATE_HOLD_TTL_SECONDS").then(|| "soon".to_owned());
        assert_eq!(
            Settings::parse(DEMO, &bad).unwrap_err().0[0].path,
            "TOLLGATE_HOLD_TTL_SECONDS"
        );
    }

    #[test]
    fn redis_store_settings_with_credentials_from_a_file_or_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("password");
        std::fs::write(&secret, "s3cret\n").unwrap();
        let text = format!(
            r#"
            [store]
            kind = "redis"
            [store.redis]
            urls = ["rediss://10.0.0.1:6379", "rediss://10.0.0.2:6379"]
            cluster = true
            username = "tollgate"
            password_file = "{}"
            max_clock_skew_ms = 500
            [leases]
            ttl_seconds = 12
            [plans.p]
            on_store_outage = "allowance"
            outage_allowance = "2.50"
            "#,
            secret.display()
        );
        let s = Settings::parse(&text, &no_env).unwrap();
        assert_eq!(s.store.kind, StoreKind::Redis);
        assert!(s.store.redis.cluster);
        let credentials = s.store.redis.credentials.clone().unwrap();
        assert_eq!(credentials.username.as_deref(), Some("tollgate"));
        assert_eq!(
            credentials.password, "s3cret",
            "the trailing newline of a mounted secret is dropped"
        );
        assert!(!format!("{:?}", s.store).contains("s3cret"), "never printed");
        assert_eq!(s.store.leases.ttl, Duration::from_secs(12));
        assert_eq!(s.store.leases.max_clock_skew, Some(Duration::from_millis(500)));
        let plan = &s.catalog.plans[&PlanId::parse("p").unwrap()];
        assert_eq!(plan.on_store_outage, OutagePolicy::Allowance("2.50".parse().unwrap()));
        let env = |k: &str| (k == "TOLLGATE_REDIS_PASSWORD").then(|| "from-env".to_owned());
        let s = Settings::parse(&text, &env).unwrap();
        assert_eq!(s.store.redis.credentials.unwrap().password, "from-env");
    }

    #[test]
    fn bad_store_settings_name_their_fields() {
        let text = r#"
            [store]
            kind = "etcd"
            [store.redis]
            urls = ["http://localhost:6379"]
            deadline_ms = 0
            username = "u"
            password_file = "/nonexistent/password"
            key_prefix = "{x}"
            [leases]
            ttl_seconds = 1
            report_interval_ms = 0
            [plans.a]
            on_store_outage = "maybe"
            [plans.b]
            on_store_outage = "allowance"
            [plans.c]
            outage_allowance = "1"
        "#;
        let errors = Settings::parse(text, &no_env).unwrap_err().0;
        let paths: Vec<_> = errors.iter().map(|e| e.path.as_str()).collect();
        for expected in [
            "store.kind",
            "store.redis.urls[0]",
            "store.redis.deadline_ms",
            "store.redis.password_file",
            "store.redis.key_prefix",
            "leases.ttl_seconds",
            "leases.report_interval_ms",
            "plans.a.on_store_outage",
            "plans.b.outage_allowance",
            "plans.c.outage_allowance",
        ] {
            assert!(paths.contains(&expected), "missing {expected} in {paths:?}");
        }
        let no_urls = "[store]\nkind = \"redis\"\n";
        let errors = Settings::parse(no_urls, &no_env).unwrap_err().0;
        assert_eq!(errors[0].path, "store.redis.urls");
    }

    #[test]
    fn consumer_groups_are_named_once_each_and_plainly() {
        let good = "[store.redis]\nconsumer_groups = [\"billing\", \"audit\"]\n";
        let s = Settings::parse(good, &no_env).unwrap();
        assert_eq!(s.store.leases.consumer_groups, ["billing", "audit"]);
        let bad = "[store.redis]\nconsumer_groups = [\"billing\", \"\", \"two words\", \"billing\"]\n";
        let errors = Settings::parse(bad, &no_env).unwrap_err().0;
        let messages: Vec<_> = errors
            .iter()
            .filter(|e| e.path == "store.redis.consumer_groups")
            .map(|e| e.message.as_str())
            .collect();
        assert_eq!(messages.len(), 3, "{errors:?}");
        assert!(messages[2].contains("named twice"), "{messages:?}");
    }
}
