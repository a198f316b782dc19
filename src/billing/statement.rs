//! A customer's monthly statement, from the billing database alone:
//! usage and charges by model and tier, what each source paid, the
//! operators' changes, and money balances that reconcile to the
//! pico-unit (`closing = opening + changes - charges`).
//!
//! Money balances are `paid + promo - debt`, as the account's audit
//! records show them before and after each change: an account opened
//! through the admin API (`create_account`) has its whole history in the
//! database, so its opening balance is the sum of every change and charge
//! before the month. Records carry their total, not its split by token
//! kind; given the price list they were charged at, the statement splits
//! each model and tier's money by kind with the engine's own pricing, and
//! checks every record's split against its charge.

use jiff::Timestamp;
use jiff::civil::Date;
use jiff::tz::TimeZone;

use crate::engine::money::Money;

use super::postgres::Database;
use super::reprice::{RepriceError, each_record, money_by_kind, nanos_bound};
use crate::engine::pricing::PriceVersion;

/// One model and tier's usage in the month.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct UsageLine {
    /// The model ("" for a charge without one).
    pub model: String,
    /// The service tier ("" for a charge without one).
    pub service_tier: String,
    /// Records.
    pub records: u64,
    /// Uncached input tokens.
    pub input_tokens: u64,
    /// Cached input tokens.
    pub cached_input_tokens: u64,
    /// Cache-write tokens.
    pub cache_write_tokens: u64,
    /// Output tokens.
    pub output_tokens: u64,
    /// Money charged.
    pub money: Money,
    /// That money by token kind, when the statement was given the price
    /// list the records were charged at.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub money_by_kind: Option<ByKind>,
}

/// Money per token kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct ByKind {
    /// Uncached input.
    pub input: Money,
    /// Cached input.
    pub cached_input: Money,
    /// Cache writes.
    pub cache_write: Money,
    /// Output.
    pub output: Money,
}

/// What one source (and lot) paid in the month.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SourceLine {
    /// `allowance`, `pack`, `promo`, `paid`, `credit` or `debt`.
    pub source: String,
    /// The lot (a pack's or promotion's id, an allowance period), if any.
    pub lot: String,
    /// Tokens, for token sources.
    pub tokens: Option<u64>,
    /// Money, for money sources.
    pub money: Option<Money>,
}

/// An operator's change in the month.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ChangeLine {
    /// When it was applied.
    pub at: Timestamp,
    /// The change (`top_up`, `refund`, ...).
    pub operation: String,
    /// Its adjustment id.
    pub adjustment_id: String,
    /// Who made it.
    pub operator: String,
    /// Why.
    pub reason: String,
    /// What it did to the money balance (`paid + promo - debt`).
    pub money: Money,
}

/// A statement.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Statement {
    /// The account.
    pub account_id: String,
    /// The month, `YYYY-MM`.
    pub month: String,
    /// Its first instant.
    pub from: Timestamp,
    /// The first instant after it.
    pub to: Timestamp,
    /// The money balance at `from`.
    pub opening: Money,
    /// The operators' changes, together.
    pub changes_total: Money,
    /// The money charged, together.
    pub charges_total: Money,
    /// The money balance at `to`: opening + changes - charges.
    pub closing: Money,
    /// Usage by model and tier.
    pub usage: Vec<UsageLine>,
    /// What each source paid.
    pub sources: Vec<SourceLine>,
    /// The operators' changes, in order.
    pub changes: Vec<ChangeLine>,
    /// What the balances cannot account for, said plainly.
    pub warnings: Vec<String>,
}

/// What went wrong making a statement.
#[derive(Debug, thiserror::Error)]
pub enum StatementError {
    /// The month is not `YYYY-MM`.
    #[error("--month {0:?}: expected YYYY-MM")]
    Month(String),
    /// The database refused, or could not be reached.
    #[error("postgres: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    /// A figure in the database does not read as money or a count.
    #[error("the database holds {0:?} where an amount belongs")]
    Figure(String),
    /// A record could not be read back.
    #[error(transparent)]
    Record(#[from] RepriceError),
    /// The price list given is not the one a record was charged at.
    #[error("{0}")]
    Prices(String),
}

/// The first instant of `month` (`YYYY-MM`) in `tz`, and of the month
/// after it.
pub fn month_bounds(month: &str, tz: &TimeZone) -> Result<(Timestamp, Timestamp), StatementError> {
    let bad = || StatementError::Month(month.to_owned());
    if month.len() != 7 {
        return Err(bad());
    }
    let first: Date = format!("{month}-01").parse().map_err(|_| bad())?;
    let next = first.checked_add(jiff::Span::new().months(1)).map_err(|_| bad())?;
    let at = |d: Date| d.to_zoned(tz.clone()).map(|z| z.timestamp()).map_err(|_| bad());
    Ok((at(first)?, at(next)?))
}

/// The statement of `account` for `month` (`YYYY-MM`, its bounds in
/// `tz`), from the tables in `schema`.
///
/// With `prices` (the price list the records were charged at), the money
/// of each model and tier is split by token kind with the engine's own
/// pricing ([`money_by_kind`]), and every record's split must add up to
/// what it was charged, to the pico-unit, or the list is refused.
pub async fn statement(
    db: &Database,
    account: &str,
    month: &str,
    tz: &TimeZone,
    prices: Option<&[PriceVersion]>,
) -> Result<Statement, StatementError> {
    let (from, to) = month_bounds(month, tz)?;
    let (client, sql) = (db.client(), |text: &str| db.sql(text));
    let (from_ns, to_ns) = (nanos_bound(from), nanos_bound(to));
    let window: [&(dyn tokio_postgres::types::ToSql + Sync); 3] = [&account, &from_ns, &to_ns];
    let usage = client
        .query(
            &sql("SELECT coalesce(model, ''), coalesce(service_tier, ''), count(*)::text,
                      sum(input_tokens)::text, sum(cached_input_tokens)::text,
                      sum(cache_write_tokens)::text, sum(output_tokens)::text, sum(total_money)::text
                  FROM {s}.usage_records
                  WHERE account_id = $1 AND settled_ns >= $2 AND settled_ns < $3
                  GROUP BY 1, 2 ORDER BY 1, 2"),
            &window,
        )
        .await?
        .iter()
        .map(|row| {
            Ok(UsageLine {
                model: row.get(0),
                service_tier: row.get(1),
                records: count(row.get(2))?,
                input_tokens: count(row.get(3))?,
                cached_input_tokens: count(row.get(4))?,
                cache_write_tokens: count(row.get(5))?,
                output_tokens: count(row.get(6))?,
                money: money(row.get(7))?,
                money_by_kind: None,
            })
        })
        .collect::<Result<Vec<_>, StatementError>>()?;
    let mut usage = usage;
    if let Some(prices) = prices {
        split_by_kind(db, account, from, to, prices, &mut usage).await?;
    }
    let sources = client
        .query(
            &sql(
                "SELECT c.source, coalesce(c.lot, ''), sum(c.tokens)::text, sum(c.money)::text
                  FROM {s}.usage_charges c JOIN {s}.usage_records r USING (record_id)
                  WHERE r.account_id = $1 AND r.settled_ns >= $2 AND r.settled_ns < $3
                  GROUP BY 1, 2
                  ORDER BY array_position(ARRAY['allowance', 'pack', 'promo', 'paid', 'credit', 'debt'], c.source), 2",
            ),
            &window,
        )
        .await?
        .iter()
        .map(|row| {
            let tokens: Option<String> = row.get(2);
            let paid: Option<String> = row.get(3);
            Ok(SourceLine {
                source: row.get(0),
                lot: row.get(1),
                tokens: tokens.map(count).transpose()?,
                money: paid.map(money).transpose()?,
            })
        })
        .collect::<Result<Vec<_>, StatementError>>()?;
    let changes = client
        .query(
            &sql(
                "SELECT at_ns, operation, adjustment_id, operator, reason, before::text, after::text
                  FROM {s}.audit_records
                  WHERE account_id = $1 AND at_ns < $2
                  ORDER BY at_ns, record_id",
            ),
            &[&account, &to_ns],
        )
        .await?;
    let mut opening = Money::ZERO;
    let mut opened = false;
    let mut lines = Vec::new();
    for row in &changes {
        let ns: i64 = row.get(0);
        let at = Timestamp::from_nanosecond(i128::from(ns)).map_err(|_| StatementError::Figure(ns.to_string()))?;
        opened |= row.get::<_, String>(1) == "create_account";
        let delta = balance_change(&row.get::<_, String>(5), &row.get::<_, String>(6))?;
        if at < from {
            opening = add(opening, delta)?;
        } else {
            lines.push(ChangeLine {
                at,
                operation: row.get(1),
                adjustment_id: row.get(2),
                operator: row.get(3),
                reason: row.get(4),
                money: delta,
            });
        }
    }
    let charged_before: Option<String> = client
        .query_one(
            &sql("SELECT sum(total_money)::text FROM {s}.usage_records
                  WHERE account_id = $1 AND settled_ns < $2"),
            &[&account, &from_ns],
        )
        .await?
        .get(0);
    opening = sub(opening, charged_before.map(money).transpose()?.unwrap_or(Money::ZERO))?;
    let changes_total = lines.iter().try_fold(Money::ZERO, |sum, l| add(sum, l.money))?;
    let charges_total = usage.iter().try_fold(Money::ZERO, |sum, l| add(sum, l.money))?;
    let closing = sub(add(opening, changes_total)?, charges_total)?;
    let mut warnings = Vec::new();
    if !opened {
        warnings.push(
            "no create_account record: the account was not opened through the admin API (or before the \
             database's records begin), so the balances count only the changes and charges the database holds"
                .to_owned(),
        );
    }
    Ok(Statement {
        account_id: account.to_owned(),
        warnings,
        month: month.to_owned(),
        from,
        to,
        opening,
        changes_total,
        charges_total,
        closing,
        usage,
        sources,
        changes: lines,
    })
}

/// What one audited change did to `paid + promo - debt`, from the fields
/// it changed (`before` and `after` hold only those).
fn balance_change(before: &str, after: &str) -> Result<Money, StatementError> {
    let parse = |text: &str| serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(text);
    let (before, after) = (
        parse(before).map_err(|_| StatementError::Figure(before.to_owned()))?,
        parse(after).map_err(|_| StatementError::Figure(after.to_owned()))?,
    );
    let field = |map: &serde_json::Map<String, serde_json::Value>, name: &str| -> Result<Money, StatementError> {
        match map.get(name) {
            None => Ok(Money::ZERO),
            Some(v) => v
                .as_str()
                .and_then(|t| t.parse().ok())
                .ok_or_else(|| StatementError::Figure(v.to_string())),
        }
    };
    let mut change = Money::ZERO;
    for (name, sign) in [("paid", 1), ("promo", 1), ("debt", -1)] {
        if after.contains_key(name) || before.contains_key(name) {
            let moved = sub(field(&after, name)?, field(&before, name)?)?;
            change = if sign > 0 {
                add(change, moved)?
            } else {
                sub(change, moved)?
            };
        }
    }
    Ok(change)
}

fn money(text: String) -> Result<Money, StatementError> {
    text.parse().map_err(|_| StatementError::Figure(text))
}

fn count(text: String) -> Result<u64, StatementError> {
    text.parse().map_err(|_| StatementError::Figure(text))
}

fn add(a: Money, b: Money) -> Result<Money, StatementError> {
    a.checked_add(b)
        .map_err(|_| StatementError::Figure(format!("{a} + {b}")))
}

fn sub(a: Money, b: Money) -> Result<Money, StatementError> {
    a.checked_sub(b)
        .map_err(|_| StatementError::Figure(format!("{a} - {b}")))
}

/// Writes `statement` as CSV: a header, then one line per usage line,
/// source, change and balance, `section` saying which.
pub fn write_csv(out: &mut impl std::io::Write, st: &Statement) -> std::io::Result<()> {
    writeln!(
        out,
        "section,name,detail,records,input_tokens,cached_input_tokens,cache_write_tokens,output_tokens,tokens,\
         input_money,cached_input_money,cache_write_money,output_money,money"
    )?;
    for u in &st.usage {
        let by_kind = u.money_by_kind.map_or_else(
            || ",,,".to_owned(),
            |k| format!("{},{},{},{}", k.input, k.cached_input, k.cache_write, k.output),
        );
        writeln!(
            out,
            "usage,{},{},{},{},{},{},{},,{by_kind},{}",
            u.model,
            u.service_tier,
            u.records,
            u.input_tokens,
            u.cached_input_tokens,
            u.cache_write_tokens,
            u.output_tokens,
            u.money
        )?;
    }
    for s in &st.sources {
        let tokens = s.tokens.map(|t| t.to_string()).unwrap_or_default();
        let money = s.money.map(|m| m.to_string()).unwrap_or_default();
        writeln!(out, "source,{},{},,,,,,{tokens},,,,,{money}", s.source, s.lot)?;
    }
    for c in &st.changes {
        writeln!(
            out,
            "change,{},{},,,,,,,,,,,{}",
            c.operation,
            csv_field(&c.adjustment_id),
            c.money
        )?;
    }
    for (name, amount) in [
        ("opening", st.opening),
        ("changes", st.changes_total),
        ("charges", st.charges_total),
        ("closing", st.closing),
    ] {
        writeln!(out, "balance,{name},,,,,,,,,,,,{amount}")?;
    }
    Ok(())
}

/// `text` as one CSV field (quoted when it holds a comma or a quote).
fn csv_field(text: &str) -> String {
    if text.contains([',', '"', '\n']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_owned()
    }
}

/// Sets each usage line's money by token kind from `prices`, record by
/// record, checking each split against what the record was charged.
async fn split_by_kind(
    db: &Database,
    account: &str,
    from: Timestamp,
    to: Timestamp,
    prices: &[PriceVersion],
    usage: &mut [UsageLine],
) -> Result<(), StatementError> {
    let mut split: std::collections::BTreeMap<(String, String), [i128; 4]> = Default::default();
    let mut refused = None;
    each_record(db, from, to, Some(account), |r| {
        let Some(version) = &r.price_version else {
            return Ok(()); // a fixed charge: not priced by tokens
        };
        let found = prices.iter().find(|v| v.id.as_str() == version);
        let by_kind = found.and_then(|v| money_by_kind(v, &r));
        match by_kind {
            Some(by_kind) if by_kind.iter().sum::<i128>() == r.charged.picos() => {
                let sums = split.entry((r.model.clone(), r.service_tier.clone())).or_default();
                for (sum, money) in sums.iter_mut().zip(by_kind) {
                    *sum += money;
                }
            }
            Some(by_kind) => {
                refused.get_or_insert(format!(
                    "record {} was charged {}, but price version {version} of the list gives {}: not the list it \
                     was charged at",
                    r.record_id,
                    r.charged,
                    Money::from_picos(by_kind.iter().sum())
                ));
            }
            None if found.is_none() => {
                refused.get_or_insert(format!("price version {version} is not in the list given"));
            }
            None => {
                refused.get_or_insert(format!(
                    "price version {version} of the list does not price {} in tier {}",
                    r.model, r.service_tier
                ));
            }
        }
        Ok(())
    })
    .await?;
    if let Some(why) = refused {
        return Err(StatementError::Prices(why));
    }
    for line in usage {
        if let Some(k) = split.get(&(line.model.clone(), line.service_tier.clone())) {
            line.money_by_kind = Some(ByKind {
                input: Money::from_picos(k[0]),
                cached_input: Money::from_picos(k[1]),
                cache_write: Money::from_picos(k[2]),
                output: Money::from_picos(k[3]),
            });
        }
    }
    Ok(())
}
