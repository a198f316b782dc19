//! Configuration: a TOML file (or the built-in demo), environment
//! overrides for deployment-specific values, command-line flags over both,
//! and validation that reports every problem at once, each with its path.
//!
//! - `file.rs`: the file's schema, as serde reads it (nothing checked yet).
//! - `sources.rs`: the one place where file < environment < flags is
//!   decided: every variable Tollgate reads and what it sets, and the
//!   flags' [`Overrides`].
//! - `check.rs`: validation and conversion into [`Settings`], every
//!   problem collected with its path.
//! - `secrets.rs`: TLS material, admin tokens and Redis credentials, read
//!   from files and the environment and never printed.
//!
//! The environment is read through a lookup function, so tests never touch
//! the process environment.

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use jiff::SignedDuration;

use crate::api::auth::{CertificateName, CertificateRule, Operators, Role};
use crate::engine::catalog::{Catalog, ExpiryPolicy, Plan};
use crate::engine::hash::Map;
use crate::engine::ids::{AccountId, PlanId};
pub use crate::engine::period::parse_time_zone;
use crate::engine::pricing::PriceBook;
pub use crate::engine::pricing::{MAX_PRICE_PER_MILLION, price_per_token};
pub use crate::service::SeedAccount;
use crate::store::leased::LeaseSettings;
use crate::store::redis::RedisSettings;
pub use crate::usage::UsageSinkConfig;
use crate::usage::journal::JournalSettings;

/// The built-in demo configuration (also `examples/tollgate.toml`).
pub const DEMO: &str = include_str!("../../examples/tollgate.toml");

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

mod check;
mod file;
mod secrets;
mod sources;
#[cfg(test)]
mod tests;

use check::{Problems, account, address, journal_settings, plan, store_settings, syntax, versions};
pub use check::{parse_anchor, parse_period, parse_price_versions, parse_weight, shards};
use file::File;
pub use secrets::{TlsSettings, read_admin_tokens};
use secrets::{tls, tokens, tokens_file};
pub use sources::{Env, Overrides, VARIABLES, log_settings, process_env, redis_credentials};

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

/// Accounts `[metrics] accounts` may list: each is a label value, so the
/// list stays short.
const MAX_METRICS_ACCOUNTS: usize = 50;

impl Settings {
    /// Reads `path`, or the built-in demo when `None`.
    pub fn load(path: Option<&Path>, env: Env<'_>, flags: &Overrides) -> Result<Settings, ConfigErrors> {
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
    pub fn parse(text: &str, env: Env<'_>) -> Result<Settings, ConfigErrors> {
        Settings::parse_with(text, env, &Overrides::default())
    }

    /// Parses TOML text, lays the environment (read through `env`: the
    /// variables in [`VARIABLES`]) and then `flags` over it, and validates
    /// the result. Which source wins is decided in `sources.rs` alone.
    pub fn parse_with(text: &str, env: Env<'_>, flags: &Overrides) -> Result<Settings, ConfigErrors> {
        let mut file: File = toml::from_str(text).map_err(|e| syntax(text, &e))?;
        let mut p = Problems::default();
        sources::layer(&mut file, env, flags, &mut p);
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
        let store = store_settings(&mut p, &file.store, &file.leases);
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
