//! The usage journal under each sync policy, in one run:
//!
//! 1. settles over real gRPC on loopback against a Redis-backed Tollgate
//!    whose journal uses the policy (12 clients, reserve then settle, on
//!    one busy account): settle throughput and latency;
//! 2. the journal alone: 64 concurrent appenders of one realistic record
//!    each: appends per second, latency, batches (one `fsync` each under
//!    `always`) and bytes per record on disk.
//!
//! Run: `cargo bench --bench journal` (needs `redis-server` on PATH).

#![allow(clippy::unwrap_used, missing_docs)]

mod harness;

#[path = "../tests/support/redis.rs"]
mod redis_server;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tollgate::engine::ids::{AccountId, ModelId, ProducerId, RequestId, TierId, VersionId};
use tollgate::engine::money::Money;
use tollgate::engine::pricing::Usage;
use tollgate::engine::record::{RecordKind, UsageRecord};
use tollgate::engine::role::Journaled;
use tollgate::engine::source::{SourceRef, Take};
use tollgate::proto;
use tollgate::proto::quota_client::QuotaClient;
use tollgate::usage::journal::{Journal, JournalSettings, OnCorrupt, SyncPolicy};

const CLIENTS: usize = 12;
const MEASURE: Duration = Duration::from_secs(4);

fn policies() -> [(&'static str, SyncPolicy); 3] {
    [
        ("always", SyncPolicy::Always),
        ("interval (10 ms)", SyncPolicy::Interval(Duration::from_millis(10))),
        ("none", SyncPolicy::None),
    ]
}

async fn settles(url: String, tag: &str) -> Histogram<u64> {
    let until = Instant::now() + MEASURE;
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let mut client = QuotaClient::connect(url.clone()).await.unwrap();
        let tag = format!("{tag}-{c}");
        tasks.push(tokio::spawn(async move {
            let mut h = Histogram::<u64>::new(3).unwrap();
            let mut i = 0u64;
            while Instant::now() < until {
                i += 1;
                let id = format!("{tag}-{i}");
                let reserve = proto::ReserveRequest {
                    account_id: "busy".into(),
                    model: harness::MODEL.into(),
                    request_id: id.clone(),
                    input_tokens: 100,
                    max_output_tokens: 100,
                    ..Default::default()
                };
                let r = client.reserve(reserve).await.unwrap().into_inner();
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
                h.record(t.elapsed().as_micros() as u64).unwrap();
            }
            h
        }));
    }
    let mut all = Histogram::<u64>::new(3).unwrap();
    for t in tasks {
        all.add(t.await.unwrap()).unwrap();
    }
    all
}

fn record(i: u64) -> Journaled {
    let at: jiff::Timestamp = "2026-11-29T12:00:00Z".parse().unwrap();
    let charge = Take {
        source: SourceRef::Paid,
        amount: 20_000_000,
    };
    Journaled {
        journal: ProducerId::parse("bench").unwrap(),
        seq: 0,
        record: UsageRecord {
            kind: RecordKind::Settle,
            request_id: RequestId::parse(&format!("req-{i:012}")).unwrap(),
            reservation_id: None,
            account_id: AccountId::parse("customer-00042").unwrap(),
            api_key_id: None,
            model: Some(ModelId::parse(harness::MODEL).unwrap()),
            service_tier: Some(TierId::default_tier()),
            usage: Usage {
                input_tokens: 100,
                output_tokens: 50,
                ..Usage::default()
            },
            charges: vec![charge.clone()],
            total_money: Money::from_picos(20_000_000),
            price_version: Some(VersionId::parse("v1").unwrap()),
            reserved_at: at,
            settled_at: at,
        },
        leased: vec![charge],
        unleased: vec![],
        producer: ProducerId::parse("sidecar-1234-1795967340951-12998729").unwrap(),
        epoch: 0,
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        println!("journal: bench");
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let redis = redis_server::RedisServer::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    println!("\nSettles over gRPC, Redis store, {CLIENTS} clients, {MEASURE:?} per policy (µs)\n");
    println!("| sync policy | settles/s | p50 | p90 | p99 |");
    println!("|---|---|---|---|---|");
    runtime.block_on(async {
        for (i, (name, policy)) in policies().into_iter().enumerate() {
            let mut settings = harness::settings(["busy"], &dir.path().join(format!("usage-{i}.jsonl")));
            settings.store.use_redis(vec![redis.url()], false);
            settings.store.leases.prefix = format!("bench{i}");
            settings.journal.dir = dir.path().join(format!("journal-{i}"));
            settings.journal.sync = policy;
            let served = harness::serve(settings).await;
            settles(served.url.clone(), &format!("w{i}")).await; // warm-up
            let h = settles(served.url.clone(), &format!("m{i}")).await;
            println!(
                "| {name} | {:.0} | {} | {} | {} |",
                h.len() as f64 / MEASURE.as_secs_f64(),
                h.value_at_quantile(0.5),
                h.value_at_quantile(0.9),
                h.value_at_quantile(0.99)
            );
            served.stop().await;
        }

        println!("\nThe journal alone: 64 concurrent appenders, one record each per append, {MEASURE:?} per policy\n");
        println!("| sync policy | appends/s | p50 µs | p99 µs | records per write batch | bytes per record |");
        println!("|---|---|---|---|---|---|");
        for (i, (name, policy)) in policies().into_iter().enumerate() {
            let (journal, _) = Journal::open(JournalSettings {
                dir: dir.path().join(format!("alone-{i}")),
                sync: policy,
                segment_bytes: 16 << 20,
                max_bytes: 1 << 34,
                on_corrupt: OnCorrupt::Stop,
                archive: false,
            })
            .unwrap();
            let until = Instant::now() + MEASURE;
            let mut tasks = Vec::new();
            for w in 0..64u64 {
                let journal = journal.clone();
                tasks.push(tokio::spawn(async move {
                    let mut h = Histogram::<u64>::new(3).unwrap();
                    let mut n = 0u64;
                    while Instant::now() < until {
                        n += 1;
                        let mut e = vec![record(w * 1_000_000 + n)];
                        journal.number(&mut e).unwrap();
                        let t = Instant::now();
                        journal.append(e).await.unwrap();
                        h.record(t.elapsed().as_micros() as u64).unwrap();
                    }
                    h
                }));
            }
            let mut all = Histogram::<u64>::new(3).unwrap();
            for t in tasks {
                all.add(t.await.unwrap()).unwrap();
            }
            let entries = journal.stats.entries.load(Ordering::Relaxed);
            let batches = journal.stats.batches.load(Ordering::Relaxed);
            let bytes = journal.stats.bytes.load(Ordering::Relaxed);
            println!(
                "| {name} | {:.0} | {} | {} | {:.1} | {} |",
                entries as f64 / MEASURE.as_secs_f64(),
                all.value_at_quantile(0.5),
                all.value_at_quantile(0.99),
                entries as f64 / batches.max(1) as f64,
                bytes / entries.max(1)
            );
        }
    });
}
