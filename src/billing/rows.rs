//! A batch of delivered records as the billing tables' columns: one
//! vector per column, for `unnest` (one statement per table, however many
//! rows), and each record that does not read back with where it is and why.

use crate::engine::money::Money;
use crate::engine::record::{AuditRecord, UsageRecord};
use crate::engine::source::Take;

use super::export::{is_alert, is_audit};
use super::stream::Delivered;
use crate::engine::alert::AlertRecord;

/// The columns of a batch's usage records.
#[derive(Default)]
pub(super) struct UsageColumns {
    pub(super) record_id: Vec<String>,
    pub(super) kind: Vec<&'static str>,
    pub(super) account_id: Vec<String>,
    pub(super) request_id: Vec<String>,
    pub(super) reservation_id: Vec<Option<String>>,
    pub(super) api_key_id: Vec<Option<String>>,
    pub(super) model: Vec<Option<String>>,
    pub(super) service_tier: Vec<Option<String>>,
    pub(super) input_tokens: Vec<i64>,
    pub(super) cached_input_tokens: Vec<i64>,
    pub(super) cache_write_tokens: Vec<i64>,
    pub(super) output_tokens: Vec<i64>,
    pub(super) total_money: Vec<String>,
    pub(super) price_version: Vec<Option<String>>,
    pub(super) reserved_at: Vec<String>,
    pub(super) settled_at: Vec<String>,
    pub(super) reserved_ns: Vec<i64>,
    pub(super) settled_ns: Vec<i64>,
    pub(super) journal: Vec<Option<String>>,
    pub(super) journal_seq: Vec<Option<i64>>,
    pub(super) stream: Vec<String>,
    pub(super) entry_id: Vec<String>,
    /// The record as delivered (kept only if its id is another's).
    pub(super) json: Vec<String>,
}

impl UsageColumns {
    pub(super) fn len(&self) -> usize {
        self.record_id.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.record_id.is_empty()
    }
}

/// The columns of a batch's charges (of usage records) or refunds (of
/// audit records).
#[derive(Default)]
pub(super) struct ChargeColumns {
    pub(super) record_id: Vec<String>,
    pub(super) position: Vec<i32>,
    pub(super) source: Vec<&'static str>,
    pub(super) lot: Vec<Option<String>>,
    pub(super) tokens: Vec<Option<i64>>,
    pub(super) money: Vec<Option<String>>,
    /// The row of the record (or change) each belongs to, in the batch.
    pub(super) owner: Vec<usize>,
}

impl ChargeColumns {
    /// The rows of the records (or changes) at the batch rows `owners`.
    pub(super) fn only(&self, owners: &std::collections::HashSet<usize>) -> ChargeColumns {
        let mut out = ChargeColumns::default();
        for i in (0..self.record_id.len()).filter(|&i| owners.contains(&self.owner[i])) {
            out.owner.push(self.owner[i]);
            out.record_id.push(self.record_id[i].clone());
            out.position.push(self.position[i]);
            out.source.push(self.source[i]);
            out.lot.push(self.lot[i].clone());
            out.tokens.push(self.tokens[i]);
            out.money.push(self.money[i].clone());
        }
        out
    }

    /// Adds `takes`, as record `id` (the batch's row `owner`) lists them.
    pub(super) fn push(&mut self, id: &str, owner: usize, takes: &[Take]) -> Result<(), String> {
        for (position, take) in (0..).zip(takes) {
            let (tokens, money) = if take.source.is_tokens() {
                let tokens = i64::try_from(take.amount).map_err(|_| format!("{} tokens do not fit", take.amount))?;
                (Some(tokens), None)
            } else {
                (None, Some(Money::from_picos(take.amount).to_string()))
            };
            self.record_id.push(id.to_owned());
            self.owner.push(owner);
            self.position.push(position);
            self.source.push(take.source.kind_name());
            self.lot.push(take.source.lot());
            self.tokens.push(tokens);
            self.money.push(money);
        }
        Ok(())
    }

    /// Adds every row of `other`.
    pub(super) fn append(&mut self, other: ChargeColumns) {
        self.record_id.extend(other.record_id);
        self.position.extend(other.position);
        self.source.extend(other.source);
        self.lot.extend(other.lot);
        self.tokens.extend(other.tokens);
        self.money.extend(other.money);
        self.owner.extend(other.owner);
    }
}

/// The columns of a batch's audit records.
#[derive(Default)]
pub(super) struct AuditColumns {
    pub(super) record_id: Vec<String>,
    pub(super) account_id: Vec<Option<String>>,
    pub(super) operator: Vec<String>,
    pub(super) peer: Vec<String>,
    pub(super) operation: Vec<String>,
    pub(super) adjustment_id: Vec<String>,
    pub(super) reason: Vec<String>,
    pub(super) change: Vec<String>,
    pub(super) before: Vec<String>,
    pub(super) after: Vec<String>,
    pub(super) at: Vec<String>,
    pub(super) at_ns: Vec<i64>,
    pub(super) stream: Vec<String>,
    pub(super) entry_id: Vec<String>,
}

impl AuditColumns {
    pub(super) fn len(&self) -> usize {
        self.record_id.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.record_id.is_empty()
    }
}

/// The columns of a batch's records that did not read back: where each
/// is, and why.
#[derive(Default)]
pub(super) struct UnreadableColumns {
    pub(super) stream: Vec<String>,
    pub(super) entry_id: Vec<String>,
    pub(super) position: Vec<i32>,
    pub(super) reason: Vec<String>,
    /// The entry's fields (JSON), if it is still in the stream.
    pub(super) raw: Vec<Option<String>>,
}

/// A batch of delivered records, as the tables' columns.
#[derive(Default)]
pub(super) struct Rows {
    pub(super) usage: UsageColumns,
    pub(super) charges: ChargeColumns,
    pub(super) refunds: ChargeColumns,
    pub(super) audit: AuditColumns,
    pub(super) alerts: AlertColumns,
    pub(super) unreadable: UnreadableColumns,
}

/// Alerts, a column each.
#[derive(Default)]
pub(super) struct AlertColumns {
    pub(super) record_id: Vec<String>,
    pub(super) account_id: Vec<String>,
    pub(super) alert: Vec<String>,
    pub(super) subject: Vec<String>,
    pub(super) threshold: Vec<String>,
    pub(super) value: Vec<String>,
    pub(super) at: Vec<String>,
    pub(super) at_ns: Vec<i64>,
    pub(super) stream: Vec<String>,
    pub(super) entry_id: Vec<String>,
}

/// PostgreSQL's text and jsonb hold no NUL character: a record with one
/// in `texts` or anywhere in its JSON is kept as unreadable rather than
/// refused with its whole batch again and again.
fn storable(d: &Delivered, texts: &[&String]) -> Result<(), String> {
    if texts.iter().any(|t| t.contains('\0')) || d.record.to_string().contains("\\u0000") {
        return Err("a text holds a NUL character, which PostgreSQL cannot store".into());
    }
    Ok(())
}

impl Rows {
    pub(super) fn of(delivered: &[Delivered]) -> Rows {
        let mut rows = Rows::default();
        let mut position = 0i32;
        for (i, d) in delivered.iter().enumerate() {
            position = if i > 0 && delivered[i - 1].entry == d.entry && delivered[i - 1].stream == d.stream {
                position + 1
            } else {
                0
            };
            if let Err(reason) = rows.add(d) {
                let u = &mut rows.unreadable;
                u.stream.push(d.stream.clone());
                u.entry_id.push(d.entry.clone());
                u.position.push(position);
                u.reason.push(reason);
                u.raw.push(d.raw.as_ref().map(ToString::to_string));
            }
        }
        rows
    }

    /// Adds one record, or says why it cannot be.
    pub(super) fn add(&mut self, d: &Delivered) -> Result<(), String> {
        if d.record.is_null() {
            return Err(match d.raw {
                Some(_) => "the entry does not decode".into(),
                None => "the entry is gone from the stream (trimmed or deleted before it was loaded)".into(),
            });
        }
        if is_alert(&d.record) {
            let a: AlertRecord = serde_json::from_value(d.record.clone()).map_err(|e| e.to_string())?;
            storable(d, &[&a.alert, &a.subject, &a.threshold, &a.value])?;
            let c = &mut self.alerts;
            c.record_id.push(a.id());
            c.account_id.push(a.account_id.to_string());
            c.at.push(a.at.to_string());
            c.at_ns.push(nanos(a.at)?);
            c.alert.push(a.alert);
            c.subject.push(a.subject);
            c.threshold.push(a.threshold);
            c.value.push(a.value);
            c.stream.push(d.stream.clone());
            c.entry_id.push(d.entry.clone());
            return Ok(());
        }
        if is_audit(&d.record) {
            let a: AuditRecord = serde_json::from_value(d.record.clone()).map_err(|e| e.to_string())?;
            let json =
                |m: &serde_json::Map<String, serde_json::Value>| serde_json::Value::Object(m.clone()).to_string();
            storable(
                d,
                &[
                    &a.operator,
                    &a.peer,
                    &a.operation,
                    &a.adjustment_id,
                    &a.reason,
                    &a.change,
                ],
            )?;
            let id = a.id();
            let mut refunds = ChargeColumns::default();
            refunds.push(&id, self.audit.len(), &a.refunded)?;
            self.refunds.append(refunds);
            let c = &mut self.audit;
            c.record_id.push(id);
            c.account_id.push(a.account_id.as_ref().map(ToString::to_string));
            c.before.push(json(&a.before));
            c.after.push(json(&a.after));
            c.at.push(a.at.to_string());
            c.at_ns.push(nanos(a.at)?);
            c.operator.push(a.operator);
            c.peer.push(a.peer);
            c.operation.push(a.operation);
            c.adjustment_id.push(a.adjustment_id);
            c.reason.push(a.reason);
            c.change.push(a.change);
            c.stream.push(d.stream.clone());
            c.entry_id.push(d.entry.clone());
            return Ok(());
        }
        let r: UsageRecord = serde_json::from_value(d.record.clone()).map_err(|e| e.to_string())?;
        let count = |n: u64| i64::try_from(n).map_err(|_| format!("{n} tokens do not fit a bigint"));
        let counts = [
            count(r.usage.input_tokens)?,
            count(r.usage.cached_input_tokens)?,
            count(r.usage.cache_write_tokens)?,
            count(r.usage.output_tokens)?,
        ];
        let id = r.id();
        // Built apart and added once the record has read whole.
        let mut charges = ChargeColumns::default();
        charges.push(&id, self.usage.len(), &r.charges)?;
        let journal = d.record["journal"].as_str().map(str::to_owned);
        let journal_seq = d.record["journal_seq"].as_u64().and_then(|n| i64::try_from(n).ok());
        let u = &mut self.usage;
        u.record_id.push(id);
        u.kind.push(r.kind.as_str());
        u.account_id.push(r.account_id.to_string());
        u.request_id.push(r.request_id.to_string());
        u.reservation_id
            .push(r.reservation_id.as_ref().map(ToString::to_string));
        u.api_key_id.push(r.api_key_id.as_ref().map(ToString::to_string));
        u.model.push(r.model.as_ref().map(ToString::to_string));
        u.service_tier.push(r.service_tier.as_ref().map(ToString::to_string));
        u.input_tokens.push(counts[0]);
        u.cached_input_tokens.push(counts[1]);
        u.cache_write_tokens.push(counts[2]);
        u.output_tokens.push(counts[3]);
        u.total_money.push(r.total_money.to_string());
        u.price_version.push(r.price_version.as_ref().map(ToString::to_string));
        u.reserved_at.push(r.reserved_at.to_string());
        u.settled_at.push(r.settled_at.to_string());
        u.reserved_ns.push(nanos(r.reserved_at)?);
        u.settled_ns.push(nanos(r.settled_at)?);
        u.json.push(d.record.to_string());
        u.journal.push(journal);
        u.journal_seq.push(journal_seq);
        u.stream.push(d.stream.clone());
        u.entry_id.push(d.entry.clone());
        self.charges.append(charges);
        Ok(())
    }
}

/// Nanoseconds since the epoch (every instant from 1677 to 2262 fits).
pub(super) fn nanos(at: jiff::Timestamp) -> Result<i64, String> {
    i64::try_from(at.as_nanosecond()).map_err(|_| format!("{at} is out of range"))
}
