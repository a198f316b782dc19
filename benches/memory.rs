//! Resident memory per idle account: a fresh process creates 1,000,000
//! accounts in the memory store (each on the pay-as-you-go plan with one
//! top-up, as a seeded account is) and reads its resident set size from
//! `/proc/self/statm` before and after.
//!
//! Run: `cargo bench --bench memory` (target: at most 1,024 bytes).

#![allow(clippy::unwrap_used, missing_docs)]

use tollgate::engine::account::Account;
use tollgate::engine::ids::{AccountId, LotId, PlanId};
use tollgate::engine::money::Money;
use tollgate::engine::ops::Pool;
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
}
