//! Tenant scale: what a decision and an account at rest cost as the number
//! of accounts grows, the Redis store beside the memory store in one run.
//!
//! For N = 1, 1,000 and 100,000 accounts (`tenant-1` .. `tenant-N`, seeded
//! from the configuration), real processes on loopback:
//!
//! - three memory-backed sidecars (each its own copy of every account) and
//!   three Redis-backed ones sharing one fresh `redis-server`: the same
//!   configuration, the same load, so only the store differs;
//! - seeding: how long the Redis side took to start, and Redis memory per
//!   account at rest (`used_memory` before and after, over N);
//! - first touch (N > 1): each sidecar makes its first decision on
//!   accounts it has never seen (a reserve, then its settle), then a second
//!   reserve on the same accounts, now warm, at the same concurrency: cold
//!   p50/p99 against warm; the Redis sidecars' RSS before and after, over
//!   the accounts touched;
//! - load: `tollgate::cli::loadgen` against each sidecar at once (reserve then
//!   settle, accounts drawn by a Zipf law of exponent 1), turns alternating
//!   between the stores after a warm-up: decisions/s (each Reserve and
//!   each Settle is one, as in `benches/redis.rs`) and the worst sidecar's
//!   p50/p99, Redis commands, round trips and Redis CPU per decision
//!   (from `INFO commandstats`, commands inside scripts included);
//! - at rest afterwards: Redis memory of the hottest account and of a
//!   first-touched one, and the usage stream's bytes per record;
//! - idle (N = 100,000): Redis commands per second 10, 60 and 300 s after
//!   the load stopped.
//!
//! Run: `cargo bench --bench tenants` (needs `redis-server` on PATH; about
//! eight minutes, five of them the idle watch).

#![allow(clippy::unwrap_used, missing_docs)]

mod harness;

#[path = "../tests/support/mod.rs"]
mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use support::fleet::{Sidecar, stream_records, write_config};
use support::redis::{RedisServer, calls_between};
use tollgate::cli::loadgen::{Mix, Spec};
use tollgate::proto;

const SIDECARS: usize = 3;
/// Load generator connections per sidecar.
const CONNECTIONS: usize = 8;
/// Concurrent first touches per sidecar.
const TOUCHERS: usize = 4;
const WARM_UP: Duration = Duration::from_secs(2);
const TURN: Duration = Duration::from_secs(4);
const TURNS: u32 = 2;
const IDLE_AT: [u64; 3] = [10, 60, 300];
const IDLE_WINDOW: Duration = Duration::from_secs(5);
const MODEL: &str = harness::MODEL;

fn config(n: usize) -> String {
    harness::config((1..=n).map(|i| format!("tenant-{i}")))
}

/// Three sidecars on `config`, on Redis if `redis` is given, started one
/// after the other (the first seeds the shared accounts).
fn spawn(dir: &Path, config: &Path, redis: Option<&RedisServer>, tag: &str) -> Vec<Sidecar> {
    let urls: Vec<String> = redis.map(RedisServer::url).into_iter().collect();
    (0..SIDECARS)
        .map(|i| {
            Sidecar::spawn_within(
                config,
                &urls,
                dir.join(format!("usage-{tag}-{i}.jsonl")),
                &dir.join(format!("journal-{tag}-{i}")),
                Duration::from_secs(900),
            )
        })
        .collect()
}

/// Resident memory of a process, bytes.
fn rss(sidecar: &Sidecar) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", sidecar.pid().unwrap())).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:")?.trim().strip_suffix("kB")?.trim().parse().ok())
        .unwrap();
    kib * 1024
}

/// One reserve (timed) then its settle on each of `accounts` through
/// `sidecar`, [`TOUCHERS`] at a time; reserve latencies in µs.
async fn touch(url: String, accounts: Vec<String>, tag: String) -> Histogram<u64> {
    let mut tasks = Vec::new();
    for (t, chunk) in accounts.chunks(accounts.len().div_ceil(TOUCHERS)).enumerate() {
        let mut client = proto::quota_client::QuotaClient::connect(url.clone()).await.unwrap();
        let chunk = chunk.to_vec();
        let tag = format!("{tag}-{t}");
        tasks.push(tokio::spawn(async move {
            let mut histogram = Histogram::<u64>::new(3).unwrap();
            for (i, account) in chunk.iter().enumerate() {
                let id = format!("{tag}-{i}");
                let mut reserve = support::reserve(account, &id, 100, 100);
                reserve.model = MODEL.into();
                let started = Instant::now();
                let r = client.reserve(reserve).await.unwrap().into_inner();
                histogram.record(started.elapsed().as_micros() as u64).unwrap();
                assert_eq!(r.decision, proto::Decision::Allow as i32, "{}", r.message);
                client.settle(support::settle(account, &id, 100, 50)).await.unwrap();
            }
            histogram
        }));
    }
    let mut all = Histogram::<u64>::new(3).unwrap();
    for task in tasks {
        all.add(task.await.unwrap()).unwrap();
    }
    all
}

/// First touch, then a warm second touch, of distinct accounts per
/// sidecar: (cold, warm) reserve latencies.
async fn first_touch(sidecars: &[Sidecar], accounts: &[Vec<String>], tag: &str) -> (Histogram<u64>, Histogram<u64>) {
    let mut cold = Histogram::<u64>::new(3).unwrap();
    let mut warm = Histogram::<u64>::new(3).unwrap();
    for pass in ["cold", "warm"] {
        let runs: Vec<_> = sidecars
            .iter()
            .zip(accounts)
            .enumerate()
            .map(|(i, (s, a))| tokio::spawn(touch(s.quota_url.clone(), a.clone(), format!("{tag}-{pass}-{i}"))))
            .collect();
        for run in runs {
            let h = run.await.unwrap();
            if pass == "cold" { &mut cold } else { &mut warm }.add(h).unwrap();
        }
    }
    (cold, warm)
}

/// What one turn of load measured.
#[derive(Default, Clone, Copy)]
struct Turn {
    calls: u64,
    seconds: f64,
    /// The worst sidecar's.
    p50: u64,
    p99: u64,
}

impl Turn {
    fn add(&mut self, other: Turn) {
        self.calls += other.calls;
        self.seconds += other.seconds;
        self.p50 = self.p50.max(other.p50);
        self.p99 = self.p99.max(other.p99);
    }

    fn per_second(&self) -> f64 {
        self.calls as f64 / self.seconds
    }
}

/// The load generator against every sidecar at once for `time`.
async fn load(sidecars: &[Sidecar], accounts: &[String], time: Duration) -> Turn {
    let runs: Vec<_> = sidecars
        .iter()
        .map(|s| {
            let spec = Spec {
                target: s.quota_url.clone(),
                connections: CONNECTIONS,
                duration: time,
                calls: None,
                accounts: accounts.to_vec(),
                mix: Mix::Zipf(1.0),
                model: MODEL.into(),
                rls_domain: None,
                progress: false,
            };
            tokio::spawn(async move { tollgate::cli::loadgen::run(&spec).await.unwrap() })
        })
        .collect();
    let mut reports = Vec::new();
    for run in runs {
        reports.push(run.await.unwrap());
    }
    let mut turn = Turn::default();
    for r in &reports {
        assert_eq!(r.errors, 0, "{} calls failed", r.errors);
        turn.calls += r.calls;
        turn.p50 = turn.p50.max(r.latency_us.p50);
        turn.p99 = turn.p99.max(r.latency_us.p99);
    }
    turn.seconds = reports.iter().map(|r| r.seconds).fold(0.0, f64::max);
    turn
}

/// `MEMORY USAGE` of a key, bytes.
fn memory_usage(redis: &RedisServer, key: &str) -> u64 {
    redis
        .cli(&["MEMORY", "USAGE", key, "SAMPLES", "0"])
        .trim()
        .parse()
        .unwrap_or(0)
}

/// CPU time Redis has used so far, seconds.
fn redis_cpu(redis: &RedisServer) -> f64 {
    redis.info::<f64>("used_cpu_user") + redis.info::<f64>("used_cpu_sys")
}

fn quantiles(h: &Histogram<u64>) -> String {
    format!("{} / {}", h.value_at_quantile(0.5), h.value_at_quantile(0.99))
}

async fn scale(n: usize) {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &config(n));
    let accounts: Vec<String> = (1..=n).map(|i| format!("tenant-{i}")).collect();
    let memory = spawn(dir.path(), &config, None, "memory");
    let redis = RedisServer::start(&[]);
    let empty: u64 = redis.info("used_memory");
    let started = Instant::now();
    let fleet = spawn(dir.path(), &config, Some(&redis), "redis");
    let seeding = started.elapsed();
    let at_rest = (redis.info::<u64>("used_memory") - empty) as f64 / n as f64;
    let untouched = memory_usage(
        &redis,
        &tollgate::store::leased::account_key("tollgate", 1, &accounts[n / 2]),
    );
    println!("\n### N = {n}\n");
    println!(
        "- Redis side started (accounts seeded, three sidecars) in {:.1} s; Redis memory per account at rest: \
         {at_rest:.0} B (used_memory grown over N, fixed costs included), {untouched} B (MEMORY USAGE of one)",
        seeding.as_secs_f64()
    );
    println!(
        "- sidecar RSS after start: memory store {:.1} MiB, Redis store {:.1} MiB",
        memory.iter().map(rss).max().unwrap() as f64 / 1048576.0,
        fleet.iter().map(rss).max().unwrap() as f64 / 1048576.0
    );

    // First touch: distinct accounts from the tail, never drawn yet.
    let per_sidecar = (n / (2 * SIDECARS)).min(2000);
    let mut touched_key = None;
    if per_sidecar > 0 {
        let tail: Vec<Vec<String>> = (0..SIDECARS)
            .map(|i| accounts[n - (i + 1) * per_sidecar..n - i * per_sidecar].to_vec())
            .collect();
        touched_key = Some(tollgate::store::leased::account_key("tollgate", 1, &tail[0][0]));
        let (memory_cold, memory_warm) = first_touch(&memory, &tail, "m").await;
        let before: Vec<u64> = fleet.iter().map(rss).collect();
        let (redis_cold, redis_warm) = first_touch(&fleet, &tail, "r").await;
        let grown: u64 = fleet.iter().zip(&before).map(|(s, b)| rss(s).saturating_sub(*b)).sum();
        println!(
            "- first touch of {per_sidecar} accounts per sidecar, {TOUCHERS} at a time per sidecar (reserve latency, µs, p50 / p99):\n\n\
             | store | cold | warm | cold p99 / warm p99 (target ≤ 3) |\n| --- | --- | --- | --- |\n\
             | memory | {} | {} | {:.2} |\n| Redis | {} | {} | {:.2} |\n",
            quantiles(&memory_cold),
            quantiles(&memory_warm),
            memory_cold.value_at_quantile(0.99) as f64 / memory_warm.value_at_quantile(0.99) as f64,
            quantiles(&redis_cold),
            quantiles(&redis_warm),
            redis_cold.value_at_quantile(0.99) as f64 / redis_warm.value_at_quantile(0.99) as f64,
        );
        println!(
            "- Redis sidecar RSS per account touched: {:.0} B ({} accounts, {:.1} MiB in all)",
            grown as f64 / (per_sidecar * SIDECARS) as f64,
            per_sidecar * SIDECARS,
            grown as f64 / 1048576.0
        );
    }

    load(&memory, &accounts, WARM_UP).await;
    load(&fleet, &accounts, WARM_UP).await;
    let (mut on_memory, mut on_redis) = (Turn::default(), Turn::default());
    let (mut commands, mut trips, mut redis_seconds) = (0, 0, 0.0);
    let mut by_command: Vec<(String, u64)> = Vec::new();
    for _ in 0..TURNS {
        on_memory.add(load(&memory, &accounts, TURN).await);
        let before = redis.commandstats();
        let cpu_before = redis_cpu(&redis);
        on_redis.add(load(&fleet, &accounts, TURN).await);
        redis_seconds += redis_cpu(&redis) - cpu_before;
        let after = redis.commandstats();
        commands += calls_between(&before, &after, |c| c != "info");
        // What the sidecars send: script calls, account reads (`HMGET`)
        // and the lookups of a retry (`SISMEMBER`, `XRANGE`); an `HGET`
        // is nearly always a script's (and an `HGETALL` is a commit
        // refused for a stale version), so both are left out.
        trips += calls_between(&before, &after, |c| {
            matches!(c, "evalsha" | "eval" | "script|load" | "hmget" | "sismember" | "xrange")
        });
        for (name, _) in &after {
            let calls = calls_between(&before, &after, |c| c == name);
            match by_command.iter_mut().find(|(n, _)| n == name) {
                Some((_, total)) => *total += calls,
                None => by_command.push((name.clone(), calls)),
            }
        }
    }
    by_command.retain(|(name, calls)| *calls > 0 && name != "info");
    by_command.sort_by_key(|(_, calls)| std::cmp::Reverse(*calls));
    let stopped = Instant::now();
    let decisions = on_redis.calls as f64;
    println!(
        "- load: {SIDECARS} sidecars × {CONNECTIONS} connections, Zipf 1, {TURNS} turns of {TURN:?} per store \
         (latency per call, µs; the worst sidecar's):\n\n\
         | store | decisions/s | p50 | p99 |\n| --- | --- | --- | --- |\n\
         | memory | {:.0} | {} | {} |\n| Redis | {:.0} | {} | {} |\n",
        on_memory.per_second(),
        on_memory.p50,
        on_memory.p99,
        on_redis.per_second(),
        on_redis.p50,
        on_redis.p99
    );
    println!(
        "- throughput Redis / memory: {:.2} (target ≥ 0.8); Redis commands per decision: {:.4} (target ≤ 0.1); \
         round trips per decision: {:.4}",
        on_redis.per_second() / on_memory.per_second(),
        commands as f64 / decisions,
        trips as f64 / decisions
    );
    println!(
        "- Redis CPU per decision: {:.1} µs ({:.0} % of a core under this load)",
        redis_seconds * 1e6 / decisions,
        redis_seconds * 100.0 / (TURN * TURNS).as_secs_f64()
    );
    println!(
        "- Redis commands under load, per decision: {}",
        by_command
            .iter()
            .map(|(name, calls)| format!("{name} {:.4}", *calls as f64 / decisions))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let stream = tollgate::store::leased::stream_key("tollgate", 0);
    let records = stream_records(&redis.url(), 1).await.len();
    println!(
        "- Redis memory: hottest account {} B, an account touched once {} B (target ≤ 1,024); \
         usage stream {:.0} B per record ({records} records)",
        memory_usage(&redis, &tollgate::store::leased::account_key("tollgate", 1, "tenant-1")),
        touched_key.map_or("—".to_owned(), |k| memory_usage(&redis, &k).to_string()),
        memory_usage(&redis, &stream) as f64 / records.max(1) as f64,
    );

    if n >= 100_000 {
        let mut idle = Vec::new();
        for at in IDLE_AT {
            tokio::time::sleep_until((stopped + Duration::from_secs(at)).into()).await;
            let before = redis.commandstats();
            tokio::time::sleep(IDLE_WINDOW).await;
            let after = redis.commandstats();
            let per_second = calls_between(&before, &after, |c| c != "info") as f64 / IDLE_WINDOW.as_secs_f64();
            idle.push(format!("+{at} s: {per_second:.1}"));
        }
        println!("- idle, Redis commands/s after the load stopped: {}", idle.join(", "));
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        println!("tenants: bench");
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let sizes: Vec<usize> = std::env::var("TOLLGATE_BENCH_TENANTS")
        .map(|v| v.split(',').map(|n| n.trim().parse().unwrap()).collect())
        .unwrap_or_else(|_| vec![1, 1_000, 100_000]);
    runtime.block_on(async {
        for n in sizes {
            scale(n).await;
        }
    });
}
