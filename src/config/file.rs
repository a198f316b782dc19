use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

use crate::engine::limits::ScopedLimits;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct ServerFile {
    pub(super) tls: Option<TlsFile>,
    pub(super) listen: Option<String>,
    pub(super) admin_listen: Option<String>,
    pub(super) listen_unix: Option<PathBuf>,
    pub(super) admin_listen_unix: Option<PathBuf>,
    pub(super) http_listen: Option<String>,
    pub(super) shutdown_grace_seconds: Option<u64>,
    pub(super) shutdown_drain_seconds: Option<u64>,
    pub(super) reload_poll_ms: Option<u64>,
    pub(super) max_connections: Option<usize>,
    pub(super) first_bytes_timeout_ms: Option<u64>,
    pub(super) call_timeout_ms: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct StoreFile {
    pub(super) kind: String,
    pub(super) sweep_interval_ms: u64,
    pub(super) max_rate_limit_windows: usize,
    pub(super) redis: RedisFile,
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
pub(super) struct RedisFile {
    pub(super) urls: Vec<String>,
    pub(super) cluster: bool,
    pub(super) deadline_ms: u64,
    pub(super) ca_cert: Option<PathBuf>,
    pub(super) username: Option<String>,
    pub(super) password_file: Option<PathBuf>,
    /// From `TOLLGATE_REDIS_PASSWORD` only: never read from the file.
    #[serde(skip)]
    pub(super) password: Option<String>,
    pub(super) key_prefix: String,
    pub(super) max_clock_skew_ms: u64,
    pub(super) shards: u32,
    pub(super) replicas: u32,
    pub(super) consumer_groups: Vec<String>,
    pub(super) trim_keep_seconds: u64,
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
            password: None,
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
pub(super) struct JournalFile {
    pub(super) dir: PathBuf,
    pub(super) sync: String,
    pub(super) sync_interval_ms: u64,
    pub(super) segment_bytes: u64,
    pub(super) max_bytes: u64,
    pub(super) on_corrupt: String,
    pub(super) archive: bool,
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
pub(super) struct LeasesFile {
    pub(super) ttl_seconds: u64,
    pub(super) horizon_ms: u64,
    pub(super) idle_return_seconds: u64,
    pub(super) report_interval_ms: u64,
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct HoldsFile {
    pub(super) ttl_seconds: u64,
    pub(super) on_expiry: String,
    pub(super) idempotency_window_seconds: u64,
    pub(super) recent_usage: usize,
    pub(super) max_request_ids: usize,
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
pub(super) struct UsageFile {
    pub(super) sink: String,
    pub(super) path: String,
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
pub(super) struct AllowanceFile {
    pub(super) tokens: u64,
    pub(super) period: String,
    #[serde(default)]
    pub(super) anchor: Option<String>,
    #[serde(default)]
    pub(super) rollover_cap: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PlanFile {
    #[serde(default)]
    pub(super) allowance: Option<AllowanceFile>,
    #[serde(default)]
    pub(super) draw_order: Option<Vec<String>>,
    #[serde(default)]
    pub(super) allowed_models: Option<Vec<String>>,
    #[serde(default)]
    pub(super) limits: ScopedLimits,
    #[serde(default)]
    pub(super) on_store_outage: Option<String>,
    #[serde(default)]
    pub(super) outage_allowance: Option<String>,
    #[serde(default)]
    pub(super) alerts: crate::engine::alert::AlertSettings,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PricesFile {
    pub(super) input: String,
    #[serde(default)]
    pub(super) cached_input: Option<String>,
    #[serde(default)]
    pub(super) cache_write: Option<String>,
    pub(super) output: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ContextTierFile {
    pub(super) min_prompt_tokens: u64,
    #[serde(flatten)]
    pub(super) prices: PricesFile,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct TierFile {
    #[serde(flatten)]
    pub(super) prices: PricesFile,
    #[serde(default)]
    pub(super) context_tiers: Vec<ContextTierFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ModelFile {
    #[serde(default)]
    pub(super) token_weight: Option<String>,
    pub(super) tiers: BTreeMap<String, TierFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct WindowFile {
    pub(super) name: String,
    pub(super) start: String,
    pub(super) end: String,
    #[serde(default)]
    pub(super) time_zone: Option<String>,
    pub(super) price_percent: u32,
    #[serde(default)]
    pub(super) models: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct VersionFile {
    pub(super) id: String,
    pub(super) effective_at: String,
    #[serde(default)]
    pub(super) models: BTreeMap<String, ModelFile>,
    #[serde(default)]
    pub(super) windows: Vec<WindowFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PackFile {
    pub(super) id: String,
    pub(super) tokens: u64,
    pub(super) expires_at: String,
    #[serde(default)]
    pub(super) models: Vec<String>,
    #[serde(default)]
    pub(super) priority: i32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AccountFile {
    pub(super) id: String,
    pub(super) plan: String,
    #[serde(default)]
    pub(super) time_zone: Option<String>,
    #[serde(default)]
    pub(super) anchor: Option<String>,
    #[serde(default)]
    pub(super) credit_limit: Option<String>,
    #[serde(default)]
    pub(super) paid: Option<String>,
    #[serde(default)]
    pub(super) promo: Option<String>,
    #[serde(default)]
    pub(super) packs: Vec<PackFile>,
    #[serde(default)]
    pub(super) suspended: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct File {
    #[serde(default = "default_currency")]
    pub(super) currency: String,
    #[serde(default)]
    pub(super) server: ServerFile,
    #[serde(default)]
    pub(super) store: StoreFile,
    #[serde(default)]
    pub(super) leases: LeasesFile,
    #[serde(default)]
    pub(super) journal: JournalFile,
    #[serde(default)]
    pub(super) holds: HoldsFile,
    #[serde(default)]
    pub(super) usage: UsageFile,
    #[serde(default)]
    pub(super) admin: AdminFile,
    #[serde(default)]
    pub(super) rls: RlsFile,
    #[serde(default)]
    pub(super) metrics: MetricsFile,
    #[serde(default)]
    pub(super) plans: BTreeMap<String, PlanFile>,
    #[serde(default)]
    pub(super) prices: Vec<VersionFile>,
    #[serde(default)]
    pub(super) accounts: Vec<AccountFile>,
}

/// `[rls]`: the Envoy rate-limit service.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RlsFile {
    pub(super) config_dir: Option<PathBuf>,
    pub(super) shadow_mode: bool,
    pub(super) response_headers: bool,
    pub(super) max_override_windows: usize,
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
pub(super) struct MetricsFile {
    pub(super) accounts: Vec<String>,
}

/// `[admin]`: who may call the admin API.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct AdminFile {
    pub(super) tokens: Vec<TokenFile>,
    pub(super) tokens_file: Option<PathBuf>,
    pub(super) tls: Option<TlsFile>,
    pub(super) certificates: Vec<CertificateFile>,
}

/// `[server.tls]`, `[admin.tls]`: a listener's certificate and key, and
/// the CA its clients' certificates must chain to (PEM files).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct TlsFile {
    pub(super) cert: PathBuf,
    pub(super) key: PathBuf,
    pub(super) client_ca: Option<PathBuf>,
}

/// `[[admin.certificates]]`: the operator a client certificate stands
/// for, by one of its names.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CertificateFile {
    pub(super) common_name: Option<String>,
    pub(super) dns_name: Option<String>,
    pub(super) uri: Option<String>,
    pub(super) role: String,
    pub(super) operator: Option<String>,
}

/// A file of tokens (a mounted secret): `[[tokens]]` entries.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct TokensFile {
    pub(super) tokens: Vec<TokenFile>,
}

/// One admin token: its SHA-256 (never the token), role and operator.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct TokenFile {
    pub(super) operator: String,
    pub(super) role: String,
    pub(super) sha256: String,
}

pub(super) fn default_currency() -> String {
    "USD".into()
}
