//! The shared harness: spawns the real app (real gRPC on ephemeral
//! loopback ports, the embedded store, a real usage file) with a manual
//! clock, and hands out clients.

#![allow(dead_code)]

pub mod faults;
pub mod fleet;
pub mod postgres;
pub mod redis;

use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use redis::RedisServer;

use std::path::PathBuf;
use std::sync::Arc;

use jiff::{SignedDuration, Timestamp};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tollgate::api::auth::{Role, Token, parse_sha256};
use tollgate::app::server::App;
use tollgate::clock::ManualClock;
use tollgate::config::Settings;
use tollgate::proto;
use tollgate::proto::quota_client::QuotaClient;
use tollgate::transport::channel::{AdminClient, Bearer};
use tonic::transport::Channel;

/// The clock's starting instant: a Sunday, 12:00 UTC.
pub const START: &str = "2026-11-29T12:00:00Z";

/// Plans and accounts every test can rely on. Prices (per million tokens):
/// model `m` input 1, cached 0.5, cache write 1.25, output 4 (so per token:
/// 1,000,000 / 500,000 / 1,250,000 / 4,000,000 pico-units).
pub const CONFIG: &str = r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"

[store]
sweep_interval_ms = 20

[holds]
ttl_seconds = 60

[plans.payg]
[plans.limited.limits.account]
requests_per_minute = 2
[plans.limited.limits.per_model]
concurrent_requests = 1
[plans.pro]
allowed_models = ["m"]
[plans.pro.allowance]
tokens = 1000
period = "month"
rollover_cap = 100

[[prices]]
id = "v1"
effective_at = "2026-01-01T00:00:00Z"
[prices.models.m.tiers.default]
input = "1"
cached_input = "0.5"
cache_write = "1.25"
output = "4"
[prices.models.other.tiers.default]
input = "1"
output = "1"

[[accounts]]
id = "rich"
plan = "payg"
paid = "100"

[[accounts]]
id = "poor"
plan = "payg"

[[accounts]]
id = "limited"
plan = "limited"
paid = "100"

[[accounts]]
id = "pro"
plan = "pro"
time_zone = "Europe/Paris"

[[accounts]]
id = "frozen"
plan = "payg"
paid = "100"
suspended = true
"#;

/// A running app with clients.
pub struct TestApp {
    pub quota: QuotaClient<Channel>,
    /// Presents [`WRITE_TOKEN`].
    pub admin: AdminClient,
    pub quota_url: String,
    pub admin_url: String,
    /// The HTTP endpoint (metrics and probes), if the config serves it.
    pub http: Option<std::net::SocketAddr>,
    /// The app's clock, when it runs on a manual one.
    pub clock: Option<Arc<ManualClock>>,
    pub usage_path: PathBuf,
    /// The Redis it shares state through, kept running while it lives.
    pub redis: Option<Arc<RedisServer>>,
    _dir: tempfile::TempDir,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<anyhow::Result<()>>,
}

/// Which store an app runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// The embedded store.
    Memory,
    /// A Redis of its own, started for the test.
    Redis,
}

/// Runs each named scenario (an `async fn(Backend)`) as two tests, one on
/// each store: `mod memory` and `mod redis`.
#[macro_export]
macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::support::Backend::Memory).await
                }
            )*
        }
        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::support::Backend::Redis).await
                }
            )*
        }
    };
}

/// Starts the app on [`CONFIG`] and the embedded store.
pub async fn spawn_app() -> TestApp {
    spawn_app_with(CONFIG).await
}

/// Starts the app on `config` and the embedded store.
pub async fn spawn_app_with(config: &str) -> TestApp {
    spawn_app_on_with(Backend::Memory, config).await
}

/// Starts the app on [`CONFIG`] and `backend`.
pub async fn spawn_app_on(backend: Backend) -> TestApp {
    spawn_app_on_with(backend, CONFIG).await
}

/// An admin token of the `write` role (operator `alice@billing`), known
/// to every test app.
pub const WRITE_TOKEN: &str = "tg_test_write";
/// An admin token of the `read` role (operator `auditor`).
pub const READ_TOKEN: &str = "tg_test_read";

/// The test tokens, as configured (hashes only).
pub fn test_tokens() -> Vec<Token> {
    let token = |hash: &str, role, operator: &str| Token {
        sha256: parse_sha256(hash).expect("hash"),
        role,
        operator: operator.into(),
    };
    vec![
        token(
            "79a8639ebf26530f4bc031484a4e1ef1ee755cde16461ba68052abc53421301c",
            Role::Write,
            "alice@billing",
        ),
        token(
            "c4c12e35e2e9328217d38ba50af65862029779ceb3ea1bfb58b2951f3f193a93",
            Role::Read,
            "auditor",
        ),
    ]
}

/// The test tokens as a tokens file (`--admin-tokens`), written into `dir`.
pub fn write_tokens_file(dir: &std::path::Path) -> PathBuf {
    let path = dir.join("admin-tokens.toml");
    let text = "[[tokens]]\noperator = \"alice@billing\"\nrole = \"write\"\nsha256 = \"79a8639ebf26530f4bc031484a4e1ef1ee755cde16461ba68052abc53421301c\"\n\n\
                [[tokens]]\noperator = \"auditor\"\nrole = \"read\"\nsha256 = \"c4c12e35e2e9328217d38ba50af65862029779ceb3ea1bfb58b2951f3f193a93\"\n";
    std::fs::write(&path, text).expect("write tokens file");
    path
}

/// An admin client of the app at `url`, presenting `token` (or nothing).
pub async fn admin_client(url: &str, token: Option<&str>) -> AdminClient {
    let channel = tollgate::transport::channel::connect(url).await.expect("admin channel");
    let bearer = token.map_or_else(Bearer::default, |t| Bearer::new(t).expect("token"));
    tollgate::transport::channel::admin_client(channel, bearer)
}

/// Waits up to five seconds for `counter` (e.g. reloads applied) to reach
/// `n`.
pub async fn reached(counter: &std::sync::atomic::AtomicU64, n: u64) {
    for _ in 0..250 {
        if counter.load(std::sync::atomic::Ordering::Relaxed) >= n {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("the counter stayed below {n}");
}

/// Parses `config` with usage records going to a fresh temp file.
pub fn settings(config: &str) -> (Settings, tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("temp dir");
    let usage_path = dir.path().join("usage.jsonl");
    let path = usage_path.to_string_lossy().into_owned();
    let env = move |key: &str| (key == "TOLLGATE_USAGE_PATH").then(|| path.clone());
    let mut settings = Settings::parse(config, &env).expect("test config is valid");
    settings.admin.extend(test_tokens());
    settings.journal.dir = dir.path().join("journal");
    (settings, dir, usage_path)
}

/// [`CONFIG`] serving the HTTP endpoint on a free port, with `extra`
/// appended.
pub fn with_http(extra: &str) -> String {
    let config = CONFIG.replace("[server]\n", "[server]\nhttp_listen = \"127.0.0.1:0\"\n");
    format!("{config}\n{extra}")
}

/// `GET path` from an HTTP/1.0 server at `addr`: the status and the body.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.expect("read");
    let (head, body) = answer.split_once("\r\n\r\n").expect("a head and a body");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    (status, body.to_owned())
}

/// The value of the sample `name` (with its labels, as printed) in a
/// metrics page; `None` if it is not there.
pub fn sample(page: &str, name: &str) -> Option<f64> {
    page.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.split(' ').next()?.parse().ok())
}

/// Starts the app on `config` and `backend`, on a manual clock.
pub async fn spawn_app_on_with(backend: Backend, config: &str) -> TestApp {
    let (mut settings, dir, usage_path) = settings(config);
    let redis = match backend {
        Backend::Memory => None,
        Backend::Redis => {
            let server = Arc::new(RedisServer::start(&[]));
            settings.store.use_redis(vec![server.url()], false);
            // The manual clock is far from Redis's: do not compare them.
            settings.store.leases.max_clock_skew = None;
            Some(server)
        }
    };
    let clock = Arc::new(ManualClock::new(START.parse().expect("start")));
    let app = App::build(settings, clock.clone()).await.expect("app builds");
    start(app, Some(clock), redis, dir, usage_path).await
}

/// Starts the app on the embedded store and `config`, written to a file
/// that it reloads: the file's path, and the reload counters.
pub async fn spawn_app_watching(config: &str) -> (TestApp, PathBuf, Arc<tollgate::app::reload::Reloads>) {
    let (settings, dir, usage_path) = settings(config);
    let path = dir.path().join("tollgate.toml");
    std::fs::write(&path, config).expect("write config");
    let clock = Arc::new(ManualClock::new(START.parse().expect("start")));
    let app = App::build(settings, clock.clone())
        .await
        .expect("app builds")
        .watch_config(path.clone(), Default::default());
    let reloads = app.reloads();
    (start(app, Some(clock), None, dir, usage_path).await, path, reloads)
}

/// Starts a sidecar of a fleet: `settings` already name its Redis; the
/// system clock, aligned with Redis as in production.
pub async fn spawn_sidecar(settings: Settings, dir: tempfile::TempDir, usage_path: PathBuf) -> TestApp {
    let app = App::build_on_system_clock(settings).await.expect("app builds");
    start(app, None, None, dir, usage_path).await
}

async fn start(
    app: App,
    clock: Option<Arc<ManualClock>>,
    redis: Option<Arc<RedisServer>>,
    dir: tempfile::TempDir,
    usage_path: PathBuf,
) -> TestApp {
    let quota_url = format!("http://{}", app.quota_addr());
    let admin_url = format!("http://{}", app.admin_addr());
    let http = app.http_addr();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(app.run(async {
        let _ = stopped.await;
    }));
    TestApp {
        quota: QuotaClient::connect(quota_url.clone()).await.expect("quota client"),
        admin: admin_client(&admin_url, Some(WRITE_TOKEN)).await,
        quota_url,
        admin_url,
        http,
        clock,
        usage_path,
        redis,
        _dir: dir,
        stop: Some(stop),
        task,
    }
}

impl TestApp {
    /// Stops the app and waits for it to drain.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let task = std::mem::replace(&mut self.task, tokio::spawn(async { Ok(()) }));
        task.await.expect("app task").expect("app ran cleanly");
    }

    /// Moves the app's manual clock.
    pub fn advance(&self, by: SignedDuration) {
        self.clock.as_ref().expect("a manual clock").advance(by);
    }

    /// The current instant of the app's manual clock.
    pub fn now(&self) -> Timestamp {
        tollgate::clock::Clock::now(&**self.clock.as_ref().expect("a manual clock"))
    }

    /// The usage records written so far (waits until at least `n` exist, up
    /// to five seconds: the sink writes asynchronously).
    pub async fn records(&self, n: usize) -> Vec<serde_json::Value> {
        self.lines(n, |kind| kind != "audit" && kind != "alert").await
    }

    /// The alerts written so far (waits until at least `n` exist).
    pub async fn alerts(&self, n: usize) -> Vec<serde_json::Value> {
        self.lines(n, |kind| kind == "alert").await
    }

    /// The audit records written so far (waits until at least `n` exist).
    pub async fn audits(&self, n: usize) -> Vec<serde_json::Value> {
        self.lines(n, |kind| kind == "audit").await
    }

    async fn lines(&self, n: usize, keep: impl Fn(&str) -> bool) -> Vec<serde_json::Value> {
        for _ in 0..500 {
            let text = std::fs::read_to_string(&self.usage_path).unwrap_or_default();
            let records: Vec<serde_json::Value> = text
                .lines()
                .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("a JSON line"))
                .filter(|r| keep(r["kind"].as_str().unwrap_or_default()))
                .collect();
            if records.len() >= n {
                return records;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("fewer than {n} usage records were written");
    }

    /// Paid money of `account`, as its exact decimal string.
    pub async fn paid(&mut self, account: &str) -> String {
        let b = self.balance(account).await;
        b.paid.expect("paid").decimal
    }

    /// The balance of `account`.
    pub async fn balance(&mut self, account: &str) -> proto::GetBalanceResponse {
        self.quota
            .get_balance(proto::GetBalanceRequest {
                account_id: account.into(),
            })
            .await
            .expect("balance")
            .into_inner()
    }
}

/// A reserve request for model `m`.
pub fn reserve(account: &str, request_id: &str, input: u64, max_output: u64) -> proto::ReserveRequest {
    proto::ReserveRequest {
        account_id: account.into(),
        model: "m".into(),
        request_id: request_id.into(),
        input_tokens: input,
        max_output_tokens: max_output,
        ..Default::default()
    }
}

/// A settle request.
pub fn settle(account: &str, reservation: &str, input: u64, output: u64) -> proto::SettleRequest {
    proto::SettleRequest {
        account_id: account.into(),
        reservation_id: reservation.into(),
        usage: Some(proto::Usage {
            input_tokens: input,
            output_tokens: output,
            ..Default::default()
        }),
    }
}

/// A top-up of paid money on `account`, under `adjustment`.
pub fn paid_top_up(account: &str, adjustment: &str, amount: &str, reason: &str) -> proto::TopUpRequest {
    proto::TopUpRequest {
        account_id: account.into(),
        adjustment_id: adjustment.into(),
        pool: proto::MoneyPool::Paid as i32,
        amount: Some(money(amount)),
        reason: reason.into(),
        ..Default::default()
    }
}

/// Per-million prices: `input` for every input kind, `output` for output.
pub fn prices(input: &str, output: &str) -> proto::TokenPrices {
    proto::TokenPrices {
        input_per_million: Some(money(input)),
        cached_input_per_million: Some(money(input)),
        cache_write_per_million: Some(money(input)),
        output_per_million: Some(money(output)),
    }
}

/// Price version `id`, in force from `at`: model `m` on the default tier
/// at [`prices`]`(input, output)`.
pub fn price_version(id: &str, at: jiff::Timestamp, input: &str, output: &str) -> proto::PriceVersion {
    proto::PriceVersion {
        id: id.into(),
        effective_at: Some(tollgate::api::convert::timestamp_out(at)),
        models: vec![proto::ModelPrices {
            model: "m".into(),
            token_weight_milli: 0,
            tiers: vec![proto::TierPrices {
                service_tier: "default".into(),
                prices: Some(prices(input, output)),
                context_tiers: vec![],
            }],
        }],
        windows: vec![],
    }
}

/// The admin API's view of `account`, which must exist.
pub async fn detail(admin: &mut tollgate::transport::channel::AdminClient, account: &str) -> proto::AccountDetail {
    admin
        .get_account(proto::GetAccountRequest {
            account_id: account.into(),
        })
        .await
        .expect("the account exists")
        .into_inner()
}

/// A bare gRPC call to `path` at `url`, its head only, as `h2` sends it
/// (for tests that write the frames themselves).
pub fn grpc_post(url: &str, path: &str) -> http::Request<()> {
    http::Request::builder()
        .method("POST")
        .uri(format!("{url}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .expect("a valid request head")
}

/// Money from a decimal string, for requests.
pub fn money(text: &str) -> proto::Money {
    let m: tollgate::engine::Money = text.parse().expect("money");
    tollgate::api::convert::money_out(m)
}

/// An app serving `rules` (and the global settings in `extra`), with a
/// rate-limit client.
pub async fn rls_app(
    backend: Backend,
    rules: &str,
    extra: &str,
) -> (
    TestApp,
    RateLimitServiceClient<tonic::transport::Channel>,
    tempfile::TempDir,
) {
    rls_app_on(backend, CONFIG, rules, extra).await
}

/// Like [`rls_app`], on `base` instead of [`CONFIG`].
pub async fn rls_app_on(
    backend: Backend,
    base: &str,
    rules: &str,
    extra: &str,
) -> (
    TestApp,
    RateLimitServiceClient<tonic::transport::Channel>,
    tempfile::TempDir,
) {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("inference.yaml"), rules).expect("write rules");
    let config = format!("{}\n[rls]\nconfig_dir = \"{}\"\n{extra}", base, dir.path().display());
    let app = spawn_app_on_with(backend, &config).await;
    let channel = tollgate::transport::channel::connect(&app.quota_url)
        .await
        .expect("connect");
    let client = RateLimitServiceClient::new(channel);
    (app, client, dir)
}

/// A rate-limit descriptor of `(key, value)` entries.
pub fn descriptor(pairs: &[(&str, &str)]) -> RateLimitDescriptor {
    RateLimitDescriptor {
        entries: pairs
            .iter()
            .map(|(k, v)| Entry {
                key: (*k).into(),
                value: (*v).into(),
            })
            .collect(),
        ..Default::default()
    }
}
