//! Exports of the usage streams: totals per account and model (CSV or
//! JSON Lines), and one CloudEvents 1.0 event per usage record, in the
//! shape usage-metering systems ingest (OpenMeter's event format).

use std::collections::BTreeMap;
use std::io::Write;

use jiff::Timestamp;

use crate::engine::money::Money;

/// Totals of one account and model.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Totals {
    /// The account.
    pub account_id: String,
    /// The model ("" for money charges without one).
    pub model: String,
    /// Records counted.
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
    pub total_money: Money,
}

/// Which records an export is of: settled in `[from, to)`, and of
/// `account` if one is named.
#[derive(Debug, Clone)]
pub struct Window {
    /// Settled at or after.
    pub from: Timestamp,
    /// Settled before.
    pub to: Timestamp,
    /// Only this account's.
    pub account: Option<String>,
}

impl Window {
    /// Whether `record` (a usage record as JSON) is in the window.
    pub fn holds(&self, record: &serde_json::Value) -> bool {
        let at = record["settled_at"].as_str().and_then(|t| t.parse::<Timestamp>().ok());
        let id = record["account_id"].as_str().unwrap_or_default();
        at.is_some_and(|at| self.from <= at && at < self.to) && self.account.as_deref().is_none_or(|a| a == id)
    }
}

/// Whether `record` is an operator's change: no usage export is of those
/// (they are the billing database's, `tollgate usage load`).
pub fn is_audit(record: &serde_json::Value) -> bool {
    record["kind"] == "audit"
}

/// Whether `record` is an alert (a threshold crossed).
pub fn is_alert(record: &serde_json::Value) -> bool {
    record["kind"] == "alert"
}

/// Whether `record` is not usage: an operator's change or an alert. No
/// usage export is of those (the billing database keeps both).
pub fn is_not_usage(record: &serde_json::Value) -> bool {
    is_audit(record) || is_alert(record)
}

/// Adds `record` to `totals` if it is a usage record in `window`. Returns
/// whether it counted.
pub fn tally(totals: &mut BTreeMap<(String, String), Totals>, record: &serde_json::Value, window: &Window) -> bool {
    if is_not_usage(record) || !window.holds(record) {
        return false;
    }
    // A record whose figures do not read is not counted, and so not
    // acknowledged: it stays for a later look rather than counting zero.
    let usage = &record["usage"];
    let n = |k: &str| usage[k].as_u64();
    let (Some(input), Some(cached), Some(cache_write), Some(output), Some(money)) = (
        n("input_tokens"),
        n("cached_input_tokens"),
        n("cache_write_tokens"),
        n("output_tokens"),
        record["total_money"].as_str().and_then(|m| m.parse::<Money>().ok()),
    ) else {
        return false;
    };
    let id = record["account_id"].as_str().unwrap_or_default();
    let model = record["model"].as_str().unwrap_or_default();
    let t = totals
        .entry((id.to_owned(), model.to_owned()))
        .or_insert_with(|| Totals {
            account_id: id.to_owned(),
            model: model.to_owned(),
            ..Totals::default()
        });
    let Ok(total_money) = t.total_money.checked_add(money) else {
        return false;
    };
    t.records += 1;
    t.input_tokens = t.input_tokens.saturating_add(input);
    t.cached_input_tokens = t.cached_input_tokens.saturating_add(cached);
    t.cache_write_tokens = t.cache_write_tokens.saturating_add(cache_write);
    t.output_tokens = t.output_tokens.saturating_add(output);
    t.total_money = total_money;
    true
}

/// Writes `totals` as CSV (with a header) or JSON Lines.
pub fn write_totals(
    out: &mut impl Write,
    totals: &BTreeMap<(String, String), Totals>,
    csv: bool,
) -> std::io::Result<()> {
    if csv {
        writeln!(
            out,
            "account_id,model,records,input_tokens,cached_input_tokens,cache_write_tokens,output_tokens,total_money"
        )?;
        for t in totals.values() {
            writeln!(
                out,
                "{},{},{},{},{},{},{},{}",
                t.account_id,
                t.model,
                t.records,
                t.input_tokens,
                t.cached_input_tokens,
                t.cache_write_tokens,
                t.output_tokens,
                t.total_money
            )?;
        }
    } else {
        for t in totals.values() {
            writeln!(out, "{}", serde_json::to_string(t).unwrap_or_default())?;
        }
    }
    Ok(())
}

/// The CloudEvents 1.0 event (structured JSON) of a usage record, as
/// usage-metering systems ingest them (OpenMeter's event format): `id` is
/// the record's id (a consumer that sees it twice has one record),
/// `subject` the account, `time` when it was settled, and `data` what was
/// used (tokens by kind, as numbers) and charged (money as an exact
/// decimal string). None for a record that does not read back.
pub fn cloudevent(record: &serde_json::Value, source: &str) -> Option<serde_json::Value> {
    let usage = &record["usage"];
    let tokens = |kind: &str| usage[kind].as_u64();
    let (input, cached, cache_write, output) = (
        tokens("input_tokens")?,
        tokens("cached_input_tokens")?,
        tokens("cache_write_tokens")?,
        tokens("output_tokens")?,
    );
    Some(serde_json::json!({
        "specversion": "1.0",
        "type": "tollgate.usage",
        "id": record["record_id"].as_str()?,
        "source": source,
        "subject": record["account_id"].as_str()?,
        "time": record["settled_at"].as_str()?,
        "datacontenttype": "application/json",
        "data": {
            "kind": record["kind"],
            "request_id": record["request_id"],
            "api_key_id": record["api_key_id"],
            "model": record["model"],
            "service_tier": record["service_tier"],
            "price_version": record["price_version"],
            "input_tokens": input,
            "cached_input_tokens": cached,
            "cache_write_tokens": cache_write,
            "output_tokens": output,
            "total_tokens": input.saturating_add(cached).saturating_add(cache_write).saturating_add(output),
            "total_money": record["total_money"],
        },
    }))
}
