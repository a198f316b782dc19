//! Envoy's ShouldRateLimit, served by Tollgate on the memory store and on
//! the Redis store, side by side in one run: the load generator
//! (`tollgate::cli::loadgen` with an RLS domain) drives one sidecar of each kind
//! in alternating turns, 16 connections, one descriptor per call on
//! uniformly drawn API keys (limits high enough that nothing is over).
//!
//! Run: `cargo bench --bench rls` (needs `redis-server` on PATH).

#![allow(clippy::unwrap_used, missing_docs)]

mod harness;

#[path = "../tests/support/redis.rs"]
mod redis_server;

use std::time::Duration;

use tollgate::cli::loadgen::{Mix, Report, Spec};

const RULES: &str = "domain: bench
descriptors:
  - key: api_key
    rate_limit: { unit: minute, requests_per_unit: 4000000000 }
";

const CONNECTIONS: usize = 16;
const TURN: Duration = Duration::from_secs(3);
const TURNS: usize = 2;

async fn turn(target: &str) -> Report {
    let spec = Spec {
        target: target.to_owned(),
        connections: CONNECTIONS,
        duration: TURN,
        calls: None,
        accounts: (0..64).map(|i| format!("key-{i}")).collect(),
        mix: Mix::Uniform,
        model: String::new(),
        rls_domain: Some("bench".into()),
        progress: false,
    };
    tollgate::cli::loadgen::run(&spec).await.unwrap()
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        println!("rls: bench");
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("bench.yaml"), RULES).unwrap();
        let settings = || {
            let mut s = harness::settings([""; 0], &dir.path().join("usage.jsonl"));
            s.rls_config_dir = Some(dir.path().to_path_buf());
            s
        };
        let memory = harness::serve(settings()).await.url;
        let redis = redis_server::RedisServer::start(&[]);
        let mut on_redis = settings();
        on_redis.store.use_redis(vec![redis.url()], false);
        on_redis.journal.dir = dir.path().join("journal");
        let on_redis = harness::serve(on_redis).await.url;
        // Warm both, then alternate.
        turn(&memory).await;
        turn(&on_redis).await;
        let mut reports: Vec<(&str, Report)> = Vec::new();
        for _ in 0..TURNS {
            reports.push(("memory", turn(&memory).await));
            reports.push(("redis", turn(&on_redis).await));
        }
        println!(
            "\nShouldRateLimit, {CONNECTIONS} connections, {TURNS} turns of {}s per store; latency per call in µs\n",
            TURN.as_secs()
        );
        println!("| store | calls/s | p50 | p90 | p99 | p99.9 | errors |");
        println!("|---|---|---|---|---|---|---|");
        for (store, r) in &reports {
            println!(
                "| {store} | {:.0} | {} | {} | {} | {} | {} |",
                r.calls_per_second, r.latency_us.p50, r.latency_us.p90, r.latency_us.p99, r.latency_us.p999, r.errors
            );
        }
    });
}
