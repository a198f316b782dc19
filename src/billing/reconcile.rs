//! The billing database against the store: per account and ledger, what
//! the database's records charged less what its refunds gave back, and
//! what the Redis store's ledgers say was charged. Every difference is
//! reported to the unit; a healthy fleet whose streams are loaded has
//! none.
//!
//! A record reaches the stream in the commit that charges the shared
//! account, and a refund lowers `charged` by what its audit record lists,
//! so the two sides count the same movements. Credit is drawn from the
//! paid ledger, so `paid` and `credit` charges meet the paid ledger; every
//! allowance period meets the one allowance ledger; packs and promotions
//! by lot. While the loader has entries to load, the store is ahead.

use std::collections::{BTreeMap, BTreeSet};

use crate::engine::Account;
use crate::engine::money::Money;
use crate::store::StoreError;
use crate::store::leased::{account_key, index_key};
use crate::store::redis::Redis;

use super::postgres::Database;

/// A ledger of an account: `("paid", "")`, `("pack", LOT)`, ...
type Ledger = (String, String);

/// One figure on which the two sides differ.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Difference {
    /// The account.
    pub account_id: String,
    /// The ledger: `allowance`, `pack`, `promo`, `paid` (with credit) or
    /// `debt`.
    pub ledger: String,
    /// The lot, for packs and promotions.
    pub lot: String,
    /// `tokens` or `money`.
    pub unit: &'static str,
    /// Charged less refunded, in the database.
    pub database: String,
    /// Charged, in the store.
    pub store: String,
    /// `store - database`.
    pub difference: String,
}

/// What a reconciliation found.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Reconciliation {
    /// Accounts compared (on either side).
    pub accounts: u64,
    /// Every figure that differs.
    pub differences: Vec<Difference>,
}

/// What went wrong reconciling.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// The database refused, or could not be reached.
    #[error("postgres: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    /// Redis refused, or could not be reached.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A figure does not read.
    #[error("{0}")]
    Figure(String),
}

/// Accounts read from each shard's index per call.
const PAGE: usize = 500;

/// Compares the database's tables in `schema` with the accounts of the
/// Redis store under `prefix` over `shards` logical shards.
pub async fn reconcile(
    db: &Database,
    redis: &Redis,
    prefix: &str,
    shards: u32,
) -> Result<Reconciliation, ReconcileError> {
    let mut database: BTreeMap<String, BTreeMap<Ledger, i128>> = BTreeMap::new();
    let rows = db
        .client()
        .query(
            &db.sql(
                "SELECT account_id, source, coalesce(lot, ''), coalesce(sum(tokens), 0)::text,
                  coalesce(sum(money) * 1000000000000, 0)::numeric(50, 0)::text
              FROM (SELECT r.account_id, c.source, c.lot, c.tokens, c.money
                    FROM {s}.usage_charges c JOIN {s}.usage_records r USING (record_id)
                    UNION ALL
                    SELECT a.account_id, f.source, f.lot, -f.tokens, -f.money
                    FROM {s}.audit_refunds f JOIN {s}.audit_records a USING (record_id)) t
              GROUP BY 1, 2, 3",
            ),
            &[],
        )
        .await?;
    for row in &rows {
        let (account, source, lot): (String, String, String) = (row.get(0), row.get(1), row.get(2));
        let figure = |i: usize| {
            let text: String = row.get(i);
            text.parse::<i128>()
                .map_err(|_| ReconcileError::Figure(format!("{account} {source}: {text}")))
        };
        let overflow = || ReconcileError::Figure(format!("{account} {source}: the sum overflows"));
        let amount = figure(3)?.checked_add(figure(4)?).ok_or_else(overflow)?;
        let sum = database
            .entry(account.clone())
            .or_default()
            .entry(ledger_of(&source, &lot))
            .or_default();
        *sum = sum.checked_add(amount).ok_or_else(overflow)?;
    }
    let mut seen = BTreeSet::new();
    let mut out = Reconciliation::default();
    for shard in 0..shards.max(1) {
        let mut from = "-".to_owned();
        loop {
            let ids: Vec<String> = redis
                .query(
                    redis::cmd("ZRANGE")
                        .arg(index_key(prefix, shard))
                        .arg(&from)
                        .arg("+")
                        .arg("BYLEX")
                        .arg("LIMIT")
                        .arg(0)
                        .arg(PAGE),
                )
                .await?;
            for id in &ids {
                let state: Option<String> = redis
                    .query(redis::cmd("HGET").arg(account_key(prefix, shards, id)).arg("state"))
                    .await?;
                let Some(state) = state else { continue };
                let account: Account = serde_json::from_str(&state)
                    .map_err(|e| ReconcileError::Figure(format!("account {id} does not read: {e}")))?;
                let recorded = database.remove(id).unwrap_or_default();
                compare(&mut out, id, &recorded, &charged(&account));
                seen.insert(id.clone());
            }
            match ids.last() {
                Some(last) if ids.len() == PAGE => from = format!("({last}"),
                _ => break,
            }
        }
    }
    // Accounts the database charged that the store does not hold.
    for (id, recorded) in &database {
        compare(&mut out, id, recorded, &BTreeMap::new());
        seen.insert(id.clone());
    }
    out.accounts = seen.len() as u64;
    Ok(out)
}

/// The ledger a record's source and lot were charged to.
fn ledger_of(source: &str, lot: &str) -> Ledger {
    match source {
        "pack" | "promo" => (source.to_owned(), lot.to_owned()),
        "credit" => ("paid".to_owned(), String::new()),
        other => (other.to_owned(), String::new()),
    }
}

/// What the store's ledgers of `account` say was charged.
fn charged(account: &Account) -> BTreeMap<Ledger, i128> {
    let lots = |kind: &str, lots: &BTreeMap<crate::engine::ids::LotId, crate::engine::account::Lot>| {
        lots.iter()
            .map(|(id, lot)| ((kind.to_owned(), id.to_string()), lot.ledger.charged()))
            .collect::<Vec<_>>()
    };
    [
        (("allowance".to_owned(), String::new()), account.allowance.charged()),
        (("paid".to_owned(), String::new()), account.paid.charged()),
        (("debt".to_owned(), String::new()), account.debt.charged()),
    ]
    .into_iter()
    .chain(lots("pack", &account.packs))
    .chain(lots("promo", &account.promos))
    .collect()
}

/// Adds a difference for every ledger of `id` the two sides disagree on.
fn compare(out: &mut Reconciliation, id: &str, database: &BTreeMap<Ledger, i128>, store: &BTreeMap<Ledger, i128>) {
    let ledgers: BTreeSet<&Ledger> = database.keys().chain(store.keys()).collect();
    for ledger in ledgers {
        let (d, s) = (
            database.get(ledger).copied().unwrap_or(0),
            store.get(ledger).copied().unwrap_or(0),
        );
        if d == s {
            continue;
        }
        let tokens = matches!(ledger.0.as_str(), "allowance" | "pack");
        let show = |n: i128| {
            if tokens {
                n.to_string()
            } else {
                Money::from_picos(n).to_string()
            }
        };
        out.differences.push(Difference {
            account_id: id.to_owned(),
            ledger: ledger.0.clone(),
            lot: ledger.1.clone(),
            unit: if tokens { "tokens" } else { "money" },
            database: show(d),
            store: show(s),
            difference: show(s - d),
        });
    }
}
