//! Re-pricing recorded usage under a draft price version: what the same
//! requests would have been charged, by the engine's own draw-down and
//! pricing code, before the draft is published. Nothing is written.
//!
//! Each token-priced record is priced again at the draft's rates for its
//! model, tier, prompt size and reserve instant (time-of-day windows
//! included), with the token sources that paid part of it (allowance,
//! packs) offered exactly the tokens they gave then: the money part is
//! what [`crate::engine::draw::tokens_first`], which the engine's own
//! draw-down charges by, makes of the rest. A draft with the
//! prices a record was charged at gives its charge back to the pico-unit.
//! One-shot charges of a fixed amount are not priced by tokens and stay
//! as they were; records of a model or tier the draft does not price are
//! counted apart.

use std::collections::BTreeMap;

use jiff::Timestamp;

use crate::engine::draw::tokens_first;
use crate::engine::ids::{ModelId, TierId};
use crate::engine::money::Money;
use crate::engine::pricing::{PriceVersion, Usage};
use crate::engine::source::{SourceRef, Take};

use super::postgres::Database;

/// What the records of one account, model and tier come to.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Mover {
    /// The account ("" in the totals per model and tier).
    pub account_id: String,
    /// The model.
    pub model: String,
    /// The service tier.
    pub service_tier: String,
    /// Records.
    pub records: u64,
    /// Money charged.
    pub charged: Money,
    /// Money the draft would have charged.
    pub repriced: Money,
    /// `repriced - charged`.
    pub delta: Money,
}

/// A re-pricing.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Repricing {
    /// The draft version.
    pub version: String,
    /// Records settled at or after.
    pub from: Timestamp,
    /// Records settled before.
    pub to: Timestamp,
    /// Money charged, in all.
    pub charged: Money,
    /// Money the draft would have charged, in all.
    pub repriced: Money,
    /// `repriced - charged`.
    pub delta: Money,
    /// Per model and tier, the largest changes first.
    pub models: Vec<Mover>,
    /// Per account, model and tier, the largest changes first.
    pub accounts: Vec<Mover>,
    /// Records the draft does not price (model or tier not in it), per
    /// model and tier: in none of the figures above.
    pub unpriced: Vec<Mover>,
}

/// What went wrong re-pricing.
#[derive(Debug, thiserror::Error)]
pub enum RepriceError {
    /// The database refused, or could not be reached.
    #[error("postgres: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    /// A row does not read as a record.
    #[error("record {0}: {1}")]
    Record(String, String),
}

/// A recorded request as re-pricing and statements read it back.
pub struct Recorded {
    /// Its record id.
    pub record_id: String,
    /// The account.
    pub account_id: String,
    /// The model ("" for a charge without one).
    pub model: String,
    /// The service tier ("" for a charge without one).
    pub service_tier: String,
    /// Tokens by kind.
    pub usage: Usage,
    /// Money charged.
    pub charged: Money,
    /// The price version it was charged at, if any.
    pub price_version: Option<String>,
    /// When it was reserved (which time-of-day prices applied).
    pub reserved_at: Timestamp,
    /// What its token sources (allowance, packs) gave.
    pub token_takes: Vec<Take>,
}

/// Nanoseconds since the epoch; beyond what an `i64` reaches, a bound that
/// holds every record.
pub fn nanos_bound(at: Timestamp) -> i64 {
    i64::try_from(at.as_nanosecond()).unwrap_or(if at < Timestamp::UNIX_EPOCH { i64::MIN } else { i64::MAX })
}

/// Hands `each` every record settled in `[from, to)` (of `account`, if one
/// is named), one row at a time: only what `each` keeps stays in memory.
pub async fn each_record(
    db: &Database,
    from: Timestamp,
    to: Timestamp,
    account: Option<&str>,
    mut each: impl FnMut(Recorded) -> Result<(), RepriceError>,
) -> Result<(), RepriceError> {
    use tokio_stream::StreamExt;
    let (from_ns, to_ns) = (nanos_bound(from), nanos_bound(to));
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 3] = [&from_ns, &to_ns, &account];
    let rows = db
        .client()
        .query_raw(
            &db.sql(
                "SELECT r.record_id, r.account_id, coalesce(r.model, ''), coalesce(r.service_tier, ''),
                  r.input_tokens, r.cached_input_tokens, r.cache_write_tokens, r.output_tokens,
                  r.total_money::text, r.reserved_ns, r.price_version,
                  coalesce(json_agg(json_build_object('source', c.source, 'lot', c.lot, 'tokens', c.tokens)
                      ORDER BY c.position) FILTER (WHERE c.tokens IS NOT NULL), '[]')::text
              FROM {s}.usage_records r LEFT JOIN {s}.usage_charges c USING (record_id)
              WHERE r.settled_ns >= $1 AND r.settled_ns < $2 AND ($3::text IS NULL OR r.account_id = $3)
              GROUP BY r.record_id",
            ),
            params,
        )
        .await?;
    let mut rows = std::pin::pin!(rows);
    while let Some(row) = rows.next().await {
        let row = row?;
        let id: String = row.get(0);
        let bad = |why: String| RepriceError::Record(id.clone(), why);
        let count = |i: usize| u64::try_from(row.get::<_, i64>(i)).map_err(|_| bad("a negative token count".into()));
        let usage = Usage {
            input_tokens: count(4)?,
            cached_input_tokens: count(5)?,
            cache_write_tokens: count(6)?,
            output_tokens: count(7)?,
        };
        let charged: Money = row.get::<_, String>(8).parse().map_err(|e| bad(format!("{e}")))?;
        let reserved_at = Timestamp::from_nanosecond(i128::from(row.get::<_, i64>(9)))
            .map_err(|e| bad(format!("reserved_at: {e}")))?;
        let token_takes: Vec<Take> = serde_json::from_str(&row.get::<_, String>(11)).map_err(|e| bad(e.to_string()))?;
        each(Recorded {
            account_id: row.get(1),
            model: row.get(2),
            service_tier: row.get(3),
            usage,
            charged,
            price_version: row.get(10),
            reserved_at,
            token_takes,
            record_id: id,
        })?;
    }
    Ok(())
}

/// Re-prices the records settled in `[from, to)` under `draft`.
pub async fn reprice(
    db: &Database,
    draft: &PriceVersion,
    from: Timestamp,
    to: Timestamp,
) -> Result<Repricing, RepriceError> {
    let mut accounts: BTreeMap<(String, String, String), Mover> = BTreeMap::new();
    let mut unpriced: BTreeMap<(String, String), Mover> = BTreeMap::new();
    each_record(db, from, to, None, |r| {
        let bad = |why: String| RepriceError::Record(r.record_id.clone(), why);
        let repriced = match money_by_kind(draft, &r) {
            Some(by_kind) => Money::from_picos(by_kind.iter().sum()),
            None if r.model.is_empty() || r.service_tier.is_empty() => r.charged,
            None => {
                let m = unpriced
                    .entry((r.model.clone(), r.service_tier.clone()))
                    .or_insert_with(|| Mover {
                        model: r.model.clone(),
                        service_tier: r.service_tier.clone(),
                        ..Mover::default()
                    });
                m.records += 1;
                m.charged = sum(m.charged, r.charged).map_err(bad)?;
                return Ok(());
            }
        };
        let m = accounts
            .entry((r.account_id.clone(), r.model.clone(), r.service_tier.clone()))
            .or_insert_with(|| Mover {
                account_id: r.account_id.clone(),
                model: r.model.clone(),
                service_tier: r.service_tier.clone(),
                ..Mover::default()
            });
        m.records += 1;
        m.charged = sum(m.charged, r.charged).map_err(bad)?;
        m.repriced = sum(m.repriced, repriced).map_err(bad)?;
        Ok(())
    })
    .await?;
    let overflow = |what: &str| RepriceError::Record(String::new(), format!("{what} overflows"));
    let mut models: BTreeMap<(String, String), Mover> = BTreeMap::new();
    for m in accounts.values_mut() {
        m.delta = m.repriced.checked_sub(m.charged).map_err(|_| overflow("a delta"))?;
        let t = models
            .entry((m.model.clone(), m.service_tier.clone()))
            .or_insert_with(|| Mover {
                model: m.model.clone(),
                service_tier: m.service_tier.clone(),
                ..Mover::default()
            });
        t.records += m.records;
        t.charged = sum(t.charged, m.charged).map_err(|_| overflow("a total"))?;
        t.repriced = sum(t.repriced, m.repriced).map_err(|_| overflow("a total"))?;
        t.delta = sum(t.delta, m.delta).map_err(|_| overflow("a total"))?;
    }
    let total = |f: fn(&Mover) -> Money| {
        models
            .values()
            .try_fold(Money::ZERO, |s, m| s.checked_add(f(m)))
            .map_err(|_| overflow("the total"))
    };
    let (charged, repriced, delta) = (total(|m| m.charged)?, total(|m| m.repriced)?, total(|m| m.delta)?);
    Ok(Repricing {
        version: draft.id.to_string(),
        from,
        to,
        charged,
        repriced,
        delta,
        models: movers_first(models.into_values()),
        accounts: movers_first(accounts.into_values()),
        unpriced: unpriced.into_values().collect(),
    })
}

/// The money `version` charges for `r`'s usage, per token kind (in
/// `TokenKind::ALL`'s order), at its model, tier, prompt size and reserve
/// instant, with its token sources offered the tokens they gave: the
/// engine's own [`tokens_first`]. None if the record is not priced by
/// tokens or `version` does not price its model and tier.
pub fn money_by_kind(version: &PriceVersion, r: &Recorded) -> Option<[i128; 4]> {
    let model = ModelId::parse(&r.model).ok()?;
    let tier = TierId::parse(&r.service_tier).ok()?;
    let rates = version
        .rates(&model, &tier, r.usage.prompt_tokens(), r.reserved_at)
        .ok()?;
    let caps: Vec<(SourceRef, i128)> = r
        .token_takes
        .iter()
        .filter(|t| t.source.is_tokens())
        .map(|t| (t.source.clone(), t.amount))
        .collect();
    Some(tokens_first(&caps, &r.usage, &rates).1)
}

fn sum(a: Money, b: Money) -> Result<Money, String> {
    a.checked_add(b).map_err(|_| format!("{a} + {b} overflows"))
}

/// The largest changes first (by size, up or down), then by name.
fn movers_first(movers: impl Iterator<Item = Mover>) -> Vec<Mover> {
    let mut movers: Vec<Mover> = movers.collect();
    movers.sort_by(|a, b| {
        b.delta
            .picos()
            .unsigned_abs()
            .cmp(&a.delta.picos().unsigned_abs())
            .then_with(|| (&a.account_id, &a.model, &a.service_tier).cmp(&(&b.account_id, &b.model, &b.service_tier)))
    });
    movers
}

/// Writes `r` as CSV: a header, then a line per model and tier (`model`),
/// per account, model and tier (`account`), per unpriced model and tier
/// (`unpriced`), and the total.
pub fn write_csv(out: &mut impl std::io::Write, r: &Repricing) -> std::io::Result<()> {
    writeln!(
        out,
        "section,account_id,model,service_tier,records,charged,repriced,delta"
    )?;
    let sections = [
        ("model", &r.models),
        ("account", &r.accounts),
        ("unpriced", &r.unpriced),
    ];
    for (section, movers) in sections {
        for m in movers {
            writeln!(
                out,
                "{section},{},{},{},{},{},{},{}",
                m.account_id, m.model, m.service_tier, m.records, m.charged, m.repriced, m.delta
            )?;
        }
    }
    writeln!(out, "total,,,,,{},{},{}", r.charged, r.repriced, r.delta)
}
