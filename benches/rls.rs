//! Envoy's ShouldRateLimit, served by Tollgate on the memory store and on
//! the Redis store and by the empty baseline (the floor: OK for every
//! descriptor, nothing looked up), side by side in one run: the load
//! generator (`tollgate::cli::loadgen` with an RLS domain) drives each in
//! alternating turns at 1, 16 and 64 connections, one descriptor per call
//! on uniformly drawn API keys (limits high enough that nothing is over).
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

const CONNECTIONS: [usize; 3] = [1, 16, 64];
const TURN: Duration = Duration::from_secs(3);
const TURNS: usize = 2;

async fn turn(target: &str, connections: usize) -> Report {
    let spec = Spec {
        target: target.to_owned(),
        connections,
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
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let empty = format!("http://{}", tcp.local_addr().unwrap());
        tokio::spawn(tollgate::cli::loadgen::serve_baseline(
            tcp,
            None,
            std::future::pending(),
        ));
        let targets = [("empty server", empty), ("memory", memory), ("redis", on_redis)];
        // Warm each, then alternate.
        for (_, target) in &targets {
            turn(target, 16).await;
        }
        println!(
            "\nShouldRateLimit, {TURNS} turns of {}s per server; latency per call in µs\n",
            TURN.as_secs()
        );
        println!(
            "| connections | server | calls/s | p50 | p90 | p99 | p99.9 | errors | calls/s ÷ empty | p99 ÷ empty |"
        );
        println!("|---|---|---|---|---|---|---|---|---|---|");
        for connections in CONNECTIONS {
            for _ in 0..TURNS {
                let mut floor: Option<Report> = None;
                for (name, target) in &targets {
                    let r = turn(target, connections).await;
                    let f = floor.get_or_insert_with(|| r.clone());
                    println!(
                        "| {connections} | {name} | {:.0} | {} | {} | {} | {} | {} | {:.2} | {:.2} |",
                        r.calls_per_second,
                        r.latency_us.p50,
                        r.latency_us.p90,
                        r.latency_us.p99,
                        r.latency_us.p999,
                        r.errors,
                        r.calls_per_second / f.calls_per_second,
                        r.latency_us.p99 as f64 / f.latency_us.p99 as f64,
                    );
                }
            }
        }
    });
}
