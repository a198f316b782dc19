//! A fleet of real `tollgate serve` processes sharing one Redis (or a
//! cluster), each on its own loopback ports with its own usage file, and
//! the checks every fleet test makes on the shared state.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use tollgate::engine::Money;
use tollgate::proto;
use tollgate::proto::quota_client::QuotaClient;
use tonic::transport::Channel;

/// One sidecar process.
pub struct Sidecar {
    child: Option<Child>,
    /// Its data-plane URL.
    pub quota_url: String,
    /// Its control-plane URL.
    pub admin_url: String,
    /// Its HTTP endpoint (`/metrics`), if `server.http_listen` is set.
    pub http: Option<std::net::SocketAddr>,
    /// Where it writes usage records.
    pub usage_path: PathBuf,
}

impl Sidecar {
    /// Starts `tollgate serve --config CONFIG --redis URL...` and waits
    /// until it listens.
    pub fn spawn(config: &Path, redis: &[String], usage_path: PathBuf) -> Sidecar {
        let journal = usage_path.with_extension("journal");
        Sidecar::spawn_with_journal(config, redis, usage_path, &journal)
    }

    /// Like [`Sidecar::spawn`], with the usage journal in `journal`.
    pub fn spawn_with_journal(config: &Path, redis: &[String], usage_path: PathBuf, journal: &Path) -> Sidecar {
        Sidecar::spawn_within(config, redis, usage_path, journal, Duration::from_secs(20))
    }

    /// Like [`Sidecar::spawn_with_journal`], waiting up to `wait` for it to
    /// listen (seeding many accounts takes a while).
    pub fn spawn_within(
        config: &Path,
        redis: &[String],
        usage_path: PathBuf,
        journal: &Path,
        wait: Duration,
    ) -> Sidecar {
        let mut command = Command::new(env!("CARGO_BIN_EXE_tollgate"));
        command
            .arg("serve")
            .arg("--config")
            .arg(config)
            .arg("--journal")
            .arg(journal)
            .arg("--admin-tokens")
            .arg(super::write_tokens_file(
                config.parent().expect("config in a directory"),
            ));
        for url in redis {
            command.arg("--redis").arg(url);
        }
        let mut child = command
            .env("TOLLGATE_USAGE_PATH", &usage_path)
            .env("RUST_LOG", "info")
            .env_remove("TOLLGATE_REDIS")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn tollgate serve");
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("tollgate listening")
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(line.clone());
                }
                // `Error:` is how a sidecar that failed to start says why.
                if line.contains("ERROR") || line.contains("WARN") || line.starts_with("Error") {
                    eprintln!("sidecar: {line}");
                }
            }
        });
        let line = rx.recv_timeout(wait).expect("the sidecar reports its addresses");
        let address = |name: &str| {
            let address = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix(name))
                .expect("addresses in the log line");
            format!("http://{address}")
        };
        let http = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("http=Some(")?.strip_suffix(')')?.parse().ok());
        Sidecar {
            child: Some(child),
            quota_url: address("quota="),
            admin_url: address("admin="),
            http,
            usage_path,
        }
    }

    /// Its `/metrics` page (it must have an HTTP endpoint).
    pub async fn metrics(&self) -> String {
        let http = self.http.expect("server.http_listen is set");
        super::http_get(http, "/metrics").await.1
    }

    /// A data-plane client.
    pub async fn client(&self) -> QuotaClient<Channel> {
        QuotaClient::connect(self.quota_url.clone())
            .await
            .expect("connect to the sidecar")
    }

    /// A control-plane client.
    pub async fn admin(&self) -> tollgate::transport::channel::AdminClient {
        super::admin_client(&self.admin_url, Some(super::WRITE_TOKEN)).await
    }

    /// Every usage record written so far (audit records left out).
    pub fn records(&self) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(&self.usage_path).unwrap_or_default();
        text.lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("a JSON line"))
            .filter(|r| r["kind"] != "audit" && r["kind"] != "alert")
            .collect()
    }

    /// The alerts it wrote to its usage file.
    pub fn alerts(&self) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(&self.usage_path).unwrap_or_default();
        text.lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("a JSON line"))
            .filter(|r| r["kind"] == "alert")
            .collect()
    }

    /// Its process id (while it runs).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGTERM, then waits for a clean exit (leases returned).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let status = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status()
                .expect("run kill");
            assert!(status.success());
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                if let Some(status) = child.try_wait().expect("wait") {
                    assert!(status.success(), "sidecar exited with {status}");
                    return;
                }
                assert!(Instant::now() < deadline, "sidecar did not stop within 20 s");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// SIGKILL: a crash, nothing returned or flushed.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The money of every usage record written so far.
    pub fn charged(&self) -> Money {
        Money::from_picos(picos(&self.records()))
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Writes `config` into `dir` and returns its path.
pub fn write_config(dir: &Path, config: &str) -> PathBuf {
    let path = dir.join("tollgate.toml");
    std::fs::write(&path, config).expect("write config");
    path
}

/// The shared account `id` as stored in Redis under the default prefix with
/// `shards` logical shards (via `redis-cli -c` on `port`, which follows
/// cluster redirects).
pub fn shared_account(port: u16, shards: u32, id: &str) -> tollgate::engine::Account {
    let key = tollgate::store::leased::account_key("tollgate", shards, id);
    let out = Command::new("redis-cli")
        .args(["-c", "-h", "127.0.0.1", "-p", &port.to_string(), "HGET", &key, "state"])
        .output()
        .expect("run redis-cli");
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("state of {key} reads as an account ({e}): {text}"))
}

pub use tollgate::engine::Ledger;

/// UNAVAILABLE (Redis down, plan failing closed), or the sidecar itself
/// gone (its connection broke).
fn gone(status: &tonic::Status) -> bool {
    let broken = matches!(status.code(), tonic::Code::Unknown | tonic::Code::Cancelled)
        && std::error::Error::source(status).is_some();
    if status.code() == tonic::Code::Unavailable {
        eprintln!("unavailable: {}", status.message());
    }
    status.code() == tonic::Code::Unavailable || broken
}

/// A client loop: small reserves and settles (every fifth released) on
/// `account` until a reserve is denied or `stop` is set. Returns how many
/// reserves were allowed and how many calls were UNAVAILABLE (a sidecar
/// gone, or Redis down and the plan failing closed); other errors panic.
pub async fn drain(
    quota: QuotaClient<Channel>,
    account: &str,
    client: usize,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> (u64, u64) {
    let until = proto::DenyReason::InsufficientFunds;
    drain_as(quota, (account, ""), client, stop, until).await
}

/// Like [`drain`], with API key `key` (none if empty), until a denial for
/// `until` (any other denial panics).
pub async fn drain_as(
    mut quota: QuotaClient<Channel>,
    (account, key): (&str, &str),
    client: usize,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    until: proto::DenyReason,
) -> (u64, u64) {
    let (mut allowed, mut unavailable) = (0u64, 0u64);
    for i in 0u64.. {
        if stop.load(std::sync::atomic::Ordering::Relaxed) {
            break;
        }
        let id = format!("c{client}-{i}");
        let reserve = proto::ReserveRequest {
            account_id: account.into(),
            api_key_id: key.into(),
            model: "m".into(),
            request_id: id.clone(),
            input_tokens: 100,
            max_output_tokens: 100,
            ..Default::default()
        };
        let r = match quota.reserve(reserve).await {
            Ok(r) => r.into_inner(),
            Err(status) if gone(&status) => {
                unavailable += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
            Err(status) => panic!("reserve failed: {status}"),
        };
        if r.decision == proto::Decision::Deny as i32 {
            assert_eq!(r.deny_reason, until as i32, "{}", r.message);
            break;
        }
        allowed += 1;
        let output = (client as u64 * 7 + i) % (r.granted_output_tokens + 1);
        if i % 5 == 4 {
            let release = proto::ReleaseRequest {
                account_id: account.into(),
                reservation_id: id,
            };
            match quota.release(release).await {
                Ok(_) => {}
                Err(status) if gone(&status) => unavailable += 1,
                Err(status) => panic!("release failed: {status}"),
            }
        } else {
            let settle = proto::SettleRequest {
                account_id: account.into(),
                reservation_id: id,
                usage: Some(proto::Usage {
                    input_tokens: 100,
                    output_tokens: output,
                    ..Default::default()
                }),
            };
            match quota.settle(settle).await {
                Ok(_) => {}
                Err(status) if gone(&status) => unavailable += 1,
                // A hold that lapsed first (a test with a TTL of a second,
                // on a loaded machine) is released or charged by its lapse.
                Err(status)
                    if status.code() == tonic::Code::FailedPrecondition
                        && status.message().contains("expired at its TTL") => {}
                Err(status) => panic!("settle failed: {status}"),
            }
        }
    }
    (allowed, unavailable)
}

/// Every usage record in the usage streams of `shards` shards (default
/// prefix), as the stream's reader gives them, in stream order per shard.
/// Every record must read back: a null (a record that does not decode)
/// fails the test.
pub async fn stream_records(url: &str, shards: u32) -> Vec<serde_json::Value> {
    let client = redis::Client::open(url).expect("redis url");
    let mut conn = client.get_multiplexed_async_connection().await.expect("connect");
    let mut records = Vec::new();
    for shard in 0..shards {
        let key = tollgate::store::leased::stream_key("tollgate", shard);
        let reply: redis::Value = redis::cmd("XRANGE")
            .arg(&key)
            .arg("-")
            .arg("+")
            .query_async(&mut conn)
            .await
            .expect("XRANGE");
        let redis::Value::Array(entries) = reply else {
            panic!("XRANGE answered {reply:?}")
        };
        for entry in &entries {
            let (id, batch) = tollgate::store::leased::entry_records(entry).expect("a stream entry");
            assert!(
                batch.iter().all(|r| !r.is_null()),
                "entry {id} holds a record that does not read back"
            );
            records.extend(batch.into_iter().filter(|r| r["kind"] != "audit"));
        }
    }
    records
}

/// The money of every usage record `sidecars` wrote, in pico-units.
pub fn recorded(sidecars: &[Sidecar]) -> i128 {
    sidecars.iter().map(|s| s.charged().picos()).sum()
}

/// Money of `records` in pico-units.
pub fn picos(records: &[serde_json::Value]) -> i128 {
    records
        .iter()
        .map(|r| {
            r["total_money"]
                .as_str()
                .expect("total_money")
                .parse::<Money>()
                .expect("money")
                .picos()
        })
        .sum()
}

/// Short leases so expiry fits in a test: a lease lapses 3 s after its
/// last sync, slices cover half a second of burn, idle ones go back after
/// a second.
pub const FLEET: &str = r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
shutdown_grace_seconds = 5

[store]
sweep_interval_ms = 100

[store.redis]
deadline_ms = 1000

[leases]
ttl_seconds = 3
horizon_ms = 500
idle_return_seconds = 1
report_interval_ms = 200

[plans.payg]

[[prices]]
id = "v1"
effective_at = "2026-01-01T00:00:00Z"
[prices.models.m.tiers.default]
input = "1"
output = "4"

[[accounts]]
id = "shared"
plan = "payg"
paid = "0.5"
"#;

/// Starts `n` sidecars on `urls`, each with its own usage file in `dir`.
pub fn fleet(n: usize, dir: &std::path::Path, urls: &[String]) -> Vec<Sidecar> {
    fleet_with(n, dir, urls, FLEET)
}

/// Runs `per_sidecar` clients on each sidecar until they are denied (or
/// `stop` is set); returns allowed and unavailable counts per sidecar.
pub async fn load(
    sidecars: &[Sidecar],
    per_sidecar: usize,
    stop: &Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<(u64, u64)>> {
    let mut tasks = Vec::new();
    for (s, sidecar) in sidecars.iter().enumerate() {
        for c in 0..per_sidecar {
            let quota = sidecar.client().await;
            let stop = Arc::clone(stop);
            tasks.push(tokio::spawn(
                async move { drain(quota, "shared", s * 1000 + c, stop).await },
            ));
        }
    }
    tasks
}

/// The paid ledger of the shared account, checked for the invariants that
/// hold at any quiescent point: nothing lent or held, never below zero,
/// conservation.
pub fn quiescent(port: u16, shards: u32, paid_in: i128) -> Ledger {
    let account = shared_account(port, shards, "shared");
    let paid = account.paid;
    assert_eq!(
        paid.granted(),
        paid_in,
        "credited once, however many sidecars seeded it"
    );
    assert_eq!(
        paid.held(),
        0,
        "nothing lent or held once every lease is back: {account:?}"
    );
    assert!(paid.available() >= 0, "below zero: {paid:?}");
    for (producer, lease) in account.leases() {
        assert!(lease.held.is_empty(), "lease of {producer} still holds");
    }
    paid
}

/// Like [`fleet`], with `config` instead of [`FLEET`].
pub fn fleet_with(n: usize, dir: &std::path::Path, urls: &[String], config: &str) -> Vec<Sidecar> {
    let config = write_config(dir, config);
    (0..n)
        .map(|i| Sidecar::spawn(&config, urls, dir.join(format!("usage-{i}.jsonl"))))
        .collect()
}

/// The usage stream (one shard, at `url`) holds exactly the records the
/// `sidecars` wrote to their usage files, none twice; returns them.
pub async fn stream_holds_each_record_once(sidecars: &[Sidecar], url: &str) -> Vec<serde_json::Value> {
    let streamed = stream_records(url, 1).await;
    let ids = |records: &mut dyn Iterator<Item = &serde_json::Value>| {
        let mut ids: Vec<String> = records
            .map(|r| r["request_id"].as_str().expect("a request id").to_owned())
            .collect();
        ids.sort();
        ids
    };
    let mut in_stream = ids(&mut streamed.iter());
    let written: Vec<serde_json::Value> = sidecars.iter().flat_map(Sidecar::records).collect();
    let written = ids(&mut written.iter());
    let all = in_stream.len();
    in_stream.dedup();
    assert_eq!(all, in_stream.len(), "records in the stream twice");
    assert_eq!(
        in_stream, written,
        "the stream holds exactly the records the sidecars made"
    );
    streamed
}
