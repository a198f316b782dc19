//! Criterion scenarios for the hot path: one reserve and its settle, on the
//! engine alone (paid money, every kind of source, rate limits, a sidecar's
//! mirror deciding from its lease) and through the memory store holding 1,
//! 1,000 or 1,000,000 accounts (picked by a seeded generator). Inputs are
//! fixed, so runs compare side by side. (Memory per account:
//! `benches/memory.rs`.)
//!
//! Run: `cargo bench --bench engine`.

#![allow(clippy::unwrap_used, missing_docs)]

use std::hint::black_box;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use jiff::tz::TimeZone;
use jiff::{SignedDuration, Timestamp};
use tollgate::engine::account::Account;
use tollgate::engine::catalog::{Catalog, SourceClass};
use tollgate::engine::ids::{AccountId, LotId, ModelId, PlanId, RequestId, ReservationId, TierId};
use tollgate::engine::limits::{LimitSet, MAX_LIMIT, ScopedLimits};
use tollgate::engine::money::Money;
use tollgate::engine::pricing::Usage;
use tollgate::engine::request::{PackGrant, Pool, ReserveRequest};
use tollgate::engine::role::Granted;
use tollgate::engine::source::{SourceRef, Take};
use tollgate::engine::{Command, Reply, fixture};
use tollgate::store::Store;
use tollgate::store::memory::MemoryStore;

/// The shared catalog (`engine::fixture`) and plan `scoped`, limited in
/// three scopes so far above the load that nothing is denied; holds of
/// 15 minutes; no idempotency window (nothing pruned meanwhile).
fn catalog() -> Catalog {
    let mut catalog = fixture::catalog();
    let big = LimitSet {
        requests_per_minute: MAX_LIMIT,
        tokens_per_minute: MAX_LIMIT,
        concurrent_requests: 1000,
        ..Default::default()
    };
    let scoped = ScopedLimits {
        account: big,
        api_key: big,
        per_model: big,
        models: Default::default(),
    };
    let scoped = fixture::plan("scoped", None, &SourceClass::DEFAULT_ORDER, scoped);
    catalog.plans.insert(scoped.id.clone(), scoped);
    catalog.hold_ttl = SignedDuration::from_mins(15);
    catalog.idempotency_window = SignedDuration::ZERO;
    catalog.recent_usage = 20;
    catalog
}

fn account(catalog: &Catalog, plan: &str, packs: usize, now: Timestamp) -> Account {
    let plan = &catalog.plans[&PlanId::parse(plan).unwrap()];
    let mut a = Account::open(
        AccountId::parse("bench").unwrap(),
        plan,
        TimeZone::UTC,
        None,
        Money::ZERO,
        now,
    )
    .unwrap();
    let huge = Money::from_picos(1_000_000_000_000_000_000_000_000);
    a.top_up(catalog, &LotId::parse("paid").unwrap(), Pool::Paid, huge, now)
        .unwrap();
    for i in 0..packs {
        let grant = PackGrant {
            pack_id: LotId::parse(&format!("pack{i}")).unwrap(),
            tokens: 10,
            expires_at: now + SignedDuration::from_hours(24 + i as i64),
            models: None,
            priority: 0,
        };
        a.grant_pack(catalog, grant, now).unwrap();
    }
    if packs > 0 {
        a.top_up(
            catalog,
            &LotId::parse("promo").unwrap(),
            Pool::Promo {
                expires_at: None,
                priority: 0,
            },
            Money::from_picos(1_000),
            now,
        )
        .unwrap();
    }
    a
}

fn request(i: u64) -> (ReserveRequest, ReservationId) {
    let id = format!("r{i}");
    let req = ReserveRequest {
        request_id: RequestId::parse(&id).unwrap(),
        api_key_id: None,
        model: ModelId::parse("m").unwrap(),
        tier: TierId::default_tier(),
        input_tokens: 1200,
        cached_input_tokens: 0,
        max_output_tokens: 800,
    };
    (req, ReservationId::parse(&id).unwrap())
}

const USAGE: Usage = Usage {
    input_tokens: 1200,
    cached_input_tokens: 0,
    cache_write_tokens: 0,
    output_tokens: 350,
};

fn engine(c: &mut Criterion) {
    let catalog = catalog();
    let now: Timestamp = "2026-03-10T12:00:00Z".parse().unwrap();
    let mut group = c.benchmark_group("engine reserve+settle");
    // name, plan, packs, settled requests remembered before measuring (a
    // day of idempotency memory on a busy account; not pruned meanwhile)
    let scenarios = [
        ("paid money only", "payg", 0, 0),
        ("allowance, 3 packs, promo, paid", "pro", 3, 0),
        ("3 rate-limit scopes", "scoped", 0, 0),
        ("paid, 100k settled requests remembered", "payg", 0, 100_000),
    ];
    // A sidecar's mirror deciding from a large paid slice of its lease.
    {
        let shared = account(&catalog, "payg", 0, now);
        let mut mirror = Account::mirror_of(&shared);
        mirror.accept(&Granted {
            takes: vec![Take {
                source: SourceRef::Paid,
                amount: 1_000_000_000_000_000_000_000,
            }],
            permits: vec![],
            expires_at: now + SignedDuration::from_hours(24),
            epoch: 0,
            lapsed: false,
            written_off: 0,
            retry_after_ms: None,
        });
        if let Some(m) = mirror.mirror_mut() {
            m.decide_until = Some(now + SignedDuration::from_hours(24));
        }
        let mut i = 0u64;
        let mut pairs = 0u64;
        group.bench_function("paid, on a lease (sidecar mirror)", |b| {
            b.iter_batched(
                || {
                    i += 1;
                    request(i)
                },
                |(req, id)| {
                    black_box(mirror.reserve(&catalog, &req, now).unwrap());
                    black_box(mirror.settle(&catalog, &id, USAGE, now).unwrap());
                    mirror.take_records();
                    pairs += 1;
                    // What a sync takes: the charges logged for Redis. A
                    // sidecar reports every 100 ms (50,000 pairs at this
                    // rate); every 1,024 pairs overstates its share.
                    if pairs.is_multiple_of(1024) {
                        let _ = mirror.report(false, false);
                    }
                    if pairs.is_multiple_of(4096) {
                        mirror.prune(&catalog, now);
                    }
                },
                BatchSize::SmallInput,
            )
        });
    }
    for (name, plan, packs, remembered) in scenarios {
        let mut a = account(&catalog, plan, packs, now);
        let mut i = 0u64;
        while i < remembered {
            i += 1;
            let (req, id) = request(i);
            a.reserve(&catalog, &req, now).unwrap();
            a.settle(&catalog, &id, USAGE, now).unwrap();
            a.take_records();
        }
        let mut pairs = 0u64;
        group.bench_function(name, |b| {
            b.iter_batched(
                || {
                    i += 1;
                    request(i)
                },
                |(req, id)| {
                    black_box(a.reserve(&catalog, &req, now).unwrap());
                    black_box(a.settle(&catalog, &id, USAGE, now).unwrap());
                    a.take_records();
                    pairs += 1;
                    if remembered == 0 && pairs.is_multiple_of(4096) {
                        a.prune(&catalog, now);
                    }
                },
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

fn memory_store(c: &mut Criterion) {
    let catalog = catalog();
    let now: Timestamp = "2026-03-10T12:00:00Z".parse().unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let store = MemoryStore::new(catalog.clone());
    let id = AccountId::parse("bench").unwrap();
    runtime
        .block_on(store.create(account(&catalog, "payg", 0, now)))
        .unwrap();
    let mut i = 0u64;
    c.bench_function("memory store reserve+settle", |b| {
        b.iter(|| {
            i += 1;
            let (req, reservation) = request(i);
            runtime.block_on(async {
                let r = store.apply(&id, Command::Reserve(req), now).await.unwrap();
                assert!(matches!(r.reply, Reply::Reserve(_)));
                black_box(
                    store
                        .apply(
                            &id,
                            Command::Settle {
                                reservation,
                                usage: USAGE,
                            },
                            now,
                        )
                        .await
                        .unwrap(),
                );
                if i.is_multiple_of(4096) {
                    store.sweep(now).await.unwrap();
                }
            })
        })
    });
}

fn accounts(c: &mut Criterion) {
    let catalog = catalog();
    let now: Timestamp = "2026-03-10T12:00:00Z".parse().unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let mut group = c.benchmark_group("memory store reserve+settle by accounts held");
    for n in [1u64, 1_000, 1_000_000] {
        let template = account(&catalog, "payg", 0, now);
        let store = MemoryStore::new(catalog.clone());
        let ids: Vec<AccountId> = (0..n)
            .map(|i| AccountId::parse(&format!("acct-{i:07}")).unwrap())
            .collect();
        runtime.block_on(async {
            for id in &ids {
                let mut a = template.clone();
                a.id = id.clone();
                store.create(a).await.unwrap();
            }
        });
        let mut rng = fastrand::Rng::with_seed(42);
        let mut i = 0u64;
        group.bench_function(format!("{n} accounts"), |b| {
            b.iter(|| {
                i += 1;
                let id = &ids[rng.usize(..ids.len())];
                let (req, reservation) = request(i);
                runtime.block_on(async {
                    store.apply(id, Command::Reserve(req), now).await.unwrap();
                    black_box(
                        store
                            .apply(
                                id,
                                Command::Settle {
                                    reservation,
                                    usage: USAGE,
                                },
                                now,
                            )
                            .await
                            .unwrap(),
                    );
                })
            })
        });
    }
    group.finish();
}

criterion_group!(benches, engine, memory_store, accounts);
criterion_main!(benches);
