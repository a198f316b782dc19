//! Where settings come from, and which wins: the file, then the
//! environment, then the command line's flags. This is the one place that
//! decides it, and the one place that reads the environment for a
//! setting of the file or of logging (through a lookup function, so tests
//! never touch the process's own). Flags that are not settings of the
//! file (`--config`, the client commands' `--addr`, `tollgate admin`'s and
//! `tollgate usage`'s connection flags) take their variables through the
//! command line's parser.

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::store::redis::Credentials;
use crate::telemetry::LogSettings;

use super::check::Problems;
use super::file::File;

/// Reads one environment variable.
pub type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

/// Every variable that sets something of the file, with the setting. The
/// README's tables list the same.
pub const VARIABLES: &[(&str, &str)] = &[
    ("TOLLGATE_LISTEN", "server.listen"),
    ("TOLLGATE_ADMIN_LISTEN", "server.admin_listen"),
    ("TOLLGATE_HTTP_LISTEN", "server.http_listen"),
    ("TOLLGATE_USAGE_SINK", "usage.sink"),
    ("TOLLGATE_USAGE_PATH", "usage.path"),
    ("TOLLGATE_HOLD_TTL_SECONDS", "holds.ttl_seconds"),
    ("TOLLGATE_JOURNAL", "journal.dir"),
    ("TOLLGATE_RLS_CONFIG", "rls.config_dir"),
    ("TOLLGATE_REDIS", "store.redis.urls (and store.kind = \"redis\")"),
    (
        "TOLLGATE_REDIS_CLUSTER",
        "with TOLLGATE_REDIS: its one URL is a cluster node",
    ),
    ("TOLLGATE_REDIS_USERNAME", "store.redis.username"),
    ("TOLLGATE_REDIS_PASSWORD", "store.redis.password_file"),
];

/// What the command line sets over the file and the environment
/// (`tollgate serve` and `check-config` flags), applied by
/// [`Settings::parse_with`](super::Settings::parse_with) before anything
/// is validated.
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

/// The process's own environment, for [`Env`].
pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// Redis credentials from the environment alone, for the commands that
/// read no configuration file (`tollgate usage`).
pub fn redis_credentials(env: Env<'_>) -> Option<Credentials> {
    let password = env("TOLLGATE_REDIS_PASSWORD")?;
    Some(Credentials {
        username: env("TOLLGATE_REDIS_USERNAME"),
        password,
    })
}

/// Lays the environment, then `flags`, over what the file says.
pub(super) fn layer(file: &mut File, env: Env<'_>, flags: &Overrides, p: &mut Problems) {
    environment(file, env, p);
    flags.apply(file);
    redis(file, env, flags, p);
}

/// Where Redis is: `--redis` if given (the variables are not looked at),
/// else `TOLLGATE_REDIS` if set, else the file. A cluster marker
/// (`--redis-cluster`, `TOLLGATE_REDIS_CLUSTER`) qualifies the URLs given
/// with it, never the file's.
fn redis(file: &mut File, env: Env<'_>, flags: &Overrides, p: &mut Problems) {
    if !flags.redis.is_empty() {
        use_redis(file, &flags.redis, flags.redis_cluster, "--redis", p);
    } else if let Some(urls) = env("TOLLGATE_REDIS") {
        let cluster = switch(env, "TOLLGATE_REDIS_CLUSTER", p) || flags.redis_cluster;
        let urls: Vec<String> = urls.split(',').map(|u| u.trim().to_owned()).collect();
        use_redis(file, &urls, cluster, "TOLLGATE_REDIS", p);
    }
}

fn environment(file: &mut File, env: Env<'_>, p: &mut Problems) {
    let server = &mut file.server;
    for (name, field) in [
        ("TOLLGATE_LISTEN", &mut server.listen),
        ("TOLLGATE_ADMIN_LISTEN", &mut server.admin_listen),
        ("TOLLGATE_HTTP_LISTEN", &mut server.http_listen),
    ] {
        if let Some(addr) = env(name) {
            *field = Some(addr);
        }
    }
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
    if let Some(dir) = env("TOLLGATE_RLS_CONFIG") {
        file.rls.config_dir = Some(PathBuf::from(dir));
    }
    let redis = &mut file.store.redis;
    if let Some(username) = env("TOLLGATE_REDIS_USERNAME") {
        redis.username = Some(username);
    }
    if let Some(password) = env("TOLLGATE_REDIS_PASSWORD") {
        redis.password = Some(password);
    }
}

/// Variable `name` as a switch (unset: off).
fn switch(env: Env<'_>, name: &str, p: &mut Problems) -> bool {
    match env(name).as_deref().map(str::to_ascii_lowercase) {
        None => false,
        Some(v) if ["1", "true", "yes", "on"].contains(&v.as_str()) => true,
        Some(v) if ["", "0", "false", "no", "off"].contains(&v.as_str()) => false,
        Some(v) => {
            p.push(name, format!("expected true or false, got {v:?}"));
            false
        }
    }
}

/// Points the store at Redis at `urls` (named by `label` in problems).
fn use_redis(file: &mut File, urls: &[String], cluster: bool, label: &str, p: &mut Problems) {
    if let Some(url) = urls
        .iter()
        .find(|u| !(u.starts_with("redis://") || u.starts_with("rediss://")))
    {
        p.push(label, format!("{url}: must start with redis:// or rediss://"));
        return;
    }
    let redis = &mut file.store.redis;
    file.store.kind = "redis".into();
    redis.cluster = redis.cluster || cluster || urls.len() > 1;
    redis.urls = urls.to_vec();
}

impl Overrides {
    /// Lays the flags but Redis's over `file`.
    fn apply(&self, file: &mut File) {
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
    }
}

/// How the process logs and traces, from the environment alone (the
/// subscriber starts before any file is read): `RUST_LOG`,
/// `TOLLGATE_LOG_FORMAT`, `OTEL_EXPORTER_OTLP_ENDPOINT` and
/// `OTEL_SERVICE_NAME`.
pub fn log_settings(env: Env<'_>) -> LogSettings {
    LogSettings {
        filter: env("RUST_LOG"),
        json: env("TOLLGATE_LOG_FORMAT").is_some_and(|f| f.eq_ignore_ascii_case("json")),
        otlp_endpoint: env("OTEL_EXPORTER_OTLP_ENDPOINT").filter(|e| !e.is_empty()),
        service_name: env("OTEL_SERVICE_NAME").unwrap_or_else(|| "tollgate".into()),
    }
}
