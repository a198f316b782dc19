//! Decisions on the Redis store beside decisions on the memory store, in
//! one run, over real gRPC on loopback:
//!
//! - three memory-backed Tollgates (each with its own copy of the account)
//!   and three Redis-backed ones sharing one `redis-server`: the same
//!   topology and the same clients doing reserve+settle pairs on one busy
//!   account, so only the store differs; the two are measured in turns,
//!   twice each, so drift during the run falls on both;
//! - latency per decision (p50/p90/p99) and throughput for each, and the
//!   ratio of the medians;
//! - the journal set to `sync = "none"` on the Redis side: this compares
//!   the stores, `benches/journal.rs` measures what `fsync` adds;
//! - Redis commands per decision at steady state, from `INFO commandstats`
//!   (every command Redis ran, those inside scripts included), and round
//!   trips (script calls and reads) per decision;
//! - the same on the Redis store with every request made by one API key
//!   under a money budget (leased beside the balance), in turns with the
//!   plain one.
//!
//! Run: `cargo bench --bench redis` (needs `redis-server` on PATH).

#![allow(clippy::unwrap_used, missing_docs)]

mod harness;

#[path = "../tests/support/redis.rs"]
mod redis_server;

use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tollgate::proto;
use tollgate::proto::quota_client::QuotaClient;

/// Clients in each phase (spread over the sidecars).
const CLIENTS: usize = 12;
const WARM_UP: Duration = Duration::from_secs(2);
const MEASURE: Duration = Duration::from_secs(3);
const TURNS: u32 = 4;

/// Drives `urls` with [`CLIENTS`] clients for `time`; latency of every
/// decision (reserve or settle) in microseconds.
async fn drive(urls: &[String], time: Duration, tag: &str, key: &str) -> Histogram<u64> {
    let until = Instant::now() + time;
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let mut client = QuotaClient::connect(urls[c % urls.len()].clone()).await.unwrap();
        let tag = format!("{tag}-{c}");
        let key = key.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut histogram = Histogram::<u64>::new(3).unwrap();
            let mut i = 0u64;
            while Instant::now() < until {
                i += 1;
                let id = format!("{tag}-{i}");
                let reserve = proto::ReserveRequest {
                    account_id: "busy".into(),
                    api_key_id: key.clone(),
                    model: harness::MODEL.into(),
                    request_id: id.clone(),
                    input_tokens: 100,
                    max_output_tokens: 100,
                    ..Default::default()
                };
                let t = Instant::now();
                let r = client.reserve(reserve).await.unwrap().into_inner();
                histogram.record(t.elapsed().as_micros() as u64).unwrap();
                assert_eq!(r.decision, proto::Decision::Allow as i32, "{}", r.message);
                let settle = proto::SettleRequest {
                    account_id: "busy".into(),
                    reservation_id: id,
                    usage: Some(proto::Usage {
                        input_tokens: 100,
                        output_tokens: 50,
                        ..Default::default()
                    }),
                };
                let t = Instant::now();
                client.settle(settle).await.unwrap();
                histogram.record(t.elapsed().as_micros() as u64).unwrap();
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

fn row(name: &str, h: &Histogram<u64>, time: Duration) -> String {
    format!(
        "| {name} | {:.0} | {} | {} | {} | {} |",
        h.len() as f64 / time.as_secs_f64(),
        h.value_at_quantile(0.5),
        h.value_at_quantile(0.9),
        h.value_at_quantile(0.99),
        h.value_at_quantile(0.999),
    )
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        println!("redis: bench");
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let redis = redis_server::RedisServer::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let settings = |i: usize, on_redis: bool| {
        let mut settings = harness::with_admin(harness::settings(
            ["busy"],
            &dir.path().join(format!("usage-{i}.jsonl")),
        ));
        settings.journal.dir = dir.path().join(format!("journal-{i}"));
        // The store alone: what the journal's fsync costs is measured by
        // benches/journal.rs.
        settings.journal.sync = tollgate::usage::journal::SyncPolicy::None;
        if on_redis {
            settings.store.use_redis(vec![redis.url()], false);
        }
        settings
    };
    runtime.block_on(async {
        let mut memory = Vec::new();
        let mut fleet = Vec::new();
        let mut admin = None;
        for i in 0..3 {
            memory.push(harness::serve(settings(i, false)).await.url);
            let served = harness::serve(settings(3 + i, true)).await;
            admin.get_or_insert(served.admin);
            fleet.push(served.url);
        }
        // Key k1 may spend 1,000,000 a month: never reached here, counted
        // on every request.
        let channel = tollgate::transport::channel::connect(&admin.unwrap()).await.unwrap();
        let bearer = tollgate::transport::channel::Bearer::new(harness::ADMIN_TOKEN).unwrap();
        let mut admin = tollgate::transport::channel::admin_client(channel, bearer);
        let budget = proto::Budget {
            period: "month".into(),
            money: Some(proto::Money {
                units: 1_000_000,
                ..Default::default()
            }),
            tokens: 0,
        };
        admin
            .set_budgets(proto::SetBudgetsRequest {
                account_id: "busy".into(),
                budgets: Some(proto::Budgets {
                    api_keys: [("k1".to_owned(), budget)].into(),
                    ..Default::default()
                }),
                adjustment_id: "bench".into(),
                reason: "bench".into(),
            })
            .await
            .unwrap();
        drive(&memory, WARM_UP, "m-warm", "").await;
        drive(&fleet, WARM_UP, "r-warm", "").await;
        drive(&fleet, WARM_UP, "b-warm", "k1").await;
        let mut memory_latency = Histogram::<u64>::new(3).unwrap();
        let mut redis_latency = Histogram::<u64>::new(3).unwrap();
        let mut budget_latency = Histogram::<u64>::new(3).unwrap();
        let (mut all, mut trips) = (0, 0);
        let (mut budget_all, mut budget_trips) = (0, 0);
        let counted = |before: &_, after: &_| {
            (
                redis_server::calls_between(before, after, |n| n != "info"),
                redis_server::calls_between(before, after, |n| {
                    matches!(n, "evalsha" | "eval" | "hmget" | "script|load")
                }),
            )
        };
        for turn in 0..TURNS {
            memory_latency
                .add(drive(&memory, MEASURE, &format!("m{turn}"), "").await)
                .unwrap();
            let before = redis.commandstats();
            redis_latency
                .add(drive(&fleet, MEASURE, &format!("r{turn}"), "").await)
                .unwrap();
            let after = redis.commandstats();
            let (a, t) = counted(&before, &after);
            (all, trips) = (all + a, trips + t);
            let before = redis.commandstats();
            budget_latency
                .add(drive(&fleet, MEASURE, &format!("b{turn}"), "k1").await)
                .unwrap();
            let after = redis.commandstats();
            let (a, t) = counted(&before, &after);
            (budget_all, budget_trips) = (budget_all + a, budget_trips + t);
        }
        let measured = MEASURE * TURNS;
        let decisions = redis_latency.len();
        println!(
            "\n{CLIENTS} clients over 3 sidecars, {TURNS} turns of {MEASURE:?} per store after {WARM_UP:?} of warm-up; \
             latency per decision in µs\n"
        );
        println!("| store | decisions/s | p50 | p90 | p99 | p99.9 |");
        println!("|---|---|---|---|---|---|");
        println!(
            "{}",
            row("memory (3 sidecars, each its own)", &memory_latency, measured)
        );
        println!("{}", row("redis (3 sidecars, 1 Redis)", &redis_latency, measured));
        println!("{}", row("redis, one key under a budget", &budget_latency, measured));
        println!(
            "\np50 ratio redis/memory: {:.2}",
            redis_latency.value_at_quantile(0.5) as f64 / memory_latency.value_at_quantile(0.5) as f64
        );
        println!(
            "throughput ratio redis/memory: {:.2}",
            redis_latency.len() as f64 / memory_latency.len() as f64
        );
        println!(
            "Redis commands per decision: {:.4} ({all} commands, {decisions} decisions); \
             round trips per decision: {:.4} ({trips})",
            all as f64 / decisions as f64,
            trips as f64 / decisions as f64
        );
        let decisions = budget_latency.len();
        println!(
            "under a budget: Redis commands per decision: {:.4} ({budget_all} commands, {decisions} decisions); \
             round trips per decision: {:.4} ({budget_trips}); p50 ratio to the plain Redis turns: {:.2}",
            budget_all as f64 / decisions as f64,
            budget_trips as f64 / decisions as f64,
            budget_latency.value_at_quantile(0.5) as f64 / redis_latency.value_at_quantile(0.5) as f64
        );
    });
}
