//! Resident memory, read from `/proc/self/statm`:
//!
//! - per idle account: a fresh process creates 1,000,000 accounts in the
//!   memory store (each on the pay-as-you-go plan with one top-up, as a
//!   seeded account is); target at most 1,024 bytes;
//! - for remembered requests: one account decides 1,000 requests a second
//!   (a quarter reserved and settled, half charged) for a day of simulated
//!   time, pruned every minute as the sweeper's full pass does, in a
//!   process of its own; target: the process stays under 256 MiB.
//!   `TOLLGATE_BENCH_HOURS` shortens the day.
//!
//! Run: `cargo bench --bench memory`.

#![allow(clippy::unwrap_used, missing_docs)]

use tollgate::engine::account::Account;
use tollgate::engine::ids::{AccountId, LotId, PlanId};
use tollgate::engine::money::Money;
use tollgate::engine::request::Pool;
use tollgate::store::Store;
use tollgate::store::memory::MemoryStore;

const ACCOUNTS: u64 = 1_000_000;

fn resident() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse::<u64>().ok())
        .unwrap_or(0)
        * 4096
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        println!("memory: bench");
        return;
    }
    let settings = tollgate::config::Settings::parse(tollgate::config::DEMO, &|_| None).unwrap();
    let catalog = settings.catalog;
    if std::env::var_os(REQUESTS_ONLY).is_some() {
        remembered_requests(catalog);
        return;
    }
    let plan = &catalog.plans[&PlanId::parse("payg").unwrap()];
    let now = jiff::Timestamp::now();
    let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let store = MemoryStore::new(catalog.clone());
    let before = resident();
    runtime.block_on(async {
        for i in 0..ACCOUNTS {
            let id = AccountId::parse(&format!("customer-{i:07}")).unwrap();
            let mut a = Account::open(id, plan, jiff::tz::TimeZone::UTC, None, Money::ZERO, now).unwrap();
            let seed = LotId::parse("seed:paid").unwrap();
            a.top_up(&catalog, &seed, Pool::Paid, "10".parse().unwrap(), now)
                .unwrap();
            store.create(a).await.unwrap();
        }
    });
    let per_account = resident().saturating_sub(before) / ACCOUNTS;
    println!("\nresident memory per idle account, {ACCOUNTS} accounts: {per_account} bytes (target ≤ 1024)");
    drop(store);
    // In a fresh process: the accounts' pages stay with this one.
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .env(REQUESTS_ONLY, "1")
        .status()
        .unwrap();
    assert!(status.success());
}

/// Set in the process that measures remembered requests.
const REQUESTS_ONLY: &str = "TOLLGATE_BENCH_REQUESTS_ONLY";

/// One account deciding 1,000 requests a second for a simulated day.
fn remembered_requests(mut catalog: tollgate::engine::Catalog) {
    use tollgate::engine::request::{ChargeRequest, ChargeWhat, ReserveRequest};
    use tollgate::engine::{Command, Reply, ReserveOutcome};
    let hours: f64 = std::env::var("TOLLGATE_BENCH_HOURS")
        .ok()
        .and_then(|h| h.parse().ok())
        .unwrap_or(24.0);
    let payg = PlanId::parse("payg").unwrap();
    if let Some(plan) = catalog.plans.get_mut(&payg) {
        plan.limits = Default::default();
    }
    // An account this busy is configured for it: every id of the window
    // (and the quarter past it that ids may be kept) within its budget.
    let window = catalog.idempotency_window.as_secs() as usize;
    catalog.max_request_ids = catalog.max_request_ids.max(1000 * (window + window / 4 + 60));
    let start = jiff::Timestamp::now();
    let id = AccountId::parse("busy").unwrap();
    let mut a = Account::open(
        id,
        &catalog.plans[&payg],
        jiff::tz::TimeZone::UTC,
        None,
        Money::ZERO,
        start,
    )
    .unwrap();
    a.top_up(
        &catalog,
        &LotId::parse("seed:paid").unwrap(),
        Pool::Paid,
        "1000000000".parse().unwrap(),
        start,
    )
    .unwrap();
    let model = tollgate::engine::ids::ModelId::parse("llama-3.1-8b").unwrap();
    let tier = tollgate::engine::ids::TierId::default_tier();
    let before = resident();
    let seconds = (hours * 3600.0) as i64;
    let mut peak = 0;
    let began = std::time::Instant::now();
    for second in 0..seconds {
        let now = start + jiff::SignedDuration::from_secs(second);
        for i in 0..250 {
            let request_id = tollgate::engine::ids::RequestId::parse(&format!("r-{second}-{i}")).unwrap();
            let reserve = Command::Reserve(ReserveRequest {
                request_id,
                api_key_id: None,
                model: model.clone(),
                tier: tier.clone(),
                input_tokens: 500,
                cached_input_tokens: 0,
                max_output_tokens: 200,
            });
            let Ok(Reply::Reserve(ReserveOutcome::Allowed(r))) = a.apply(&catalog, reserve, now) else {
                panic!("the account has funds for a day")
            };
            let settle = Command::Settle {
                reservation: r.reservation_id,
                usage: tollgate::engine::pricing::Usage {
                    input_tokens: 500,
                    output_tokens: 120,
                    ..Default::default()
                },
            };
            a.apply(&catalog, settle, now).unwrap();
        }
        for i in 0..500 {
            let charge = Command::Charge(ChargeRequest {
                request_id: tollgate::engine::ids::RequestId::parse(&format!("c-{second}-{i}")).unwrap(),
                api_key_id: None,
                model: None,
                tier: tier.clone(),
                what: ChargeWhat::Money("0.001".parse().unwrap()),
            });
            a.apply(&catalog, charge, now).unwrap();
        }
        a.take_records();
        if second % 60 == 59 {
            a.prune(&catalog, now);
        }
        if second % 60 == 0 {
            peak = peak.max(resident());
        }
        if std::env::var_os("TOLLGATE_BENCH_TRACE").is_some() && second % 3600 == 0 {
            let t = a.traffic.as_deref();
            eprintln!(
                "{:>6} s: resident {} MiB, {} answers, {} spent",
                second,
                resident() / (1 << 20),
                t.map_or(0, |t| t.requests.len()),
                t.map_or(0, |t| t.spent.len())
            );
        }
    }
    let after = resident();
    println!(
        "remembered requests, 1,000 decisions/s for {hours} h ({} decisions, {:.0} s): \
         resident {} MiB at the end, {} MiB at the peak, {} MiB more than before (target < 256 MiB)",
        seconds * 1000,
        began.elapsed().as_secs_f64(),
        after / (1 << 20),
        peak.max(after) / (1 << 20),
        after.saturating_sub(before) / (1 << 20),
    );
}
