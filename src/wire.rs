//! The wire form of what Tollgate records and exchanges: `tollgate.v1`
//! usage records, money, timestamps and token counts to and from domain
//! types, each checked on the way in. The API layers build on it for
//! their requests and replies, and the Redis store encodes the usage
//! stream with it, so a record reads back exactly as it was made whoever
//! wrote it. Below the API and the stores: it knows the engine's types and
//! the generated ones, nothing else.

use jiff::Timestamp;
use tonic::Status;

use crate::engine::UsageRecord;
use crate::engine::ids::{IdError, TierId};
use crate::engine::money::{MAX_TOKENS_PER_FIELD, Money, SCALE};
use crate::engine::pricing::Usage;
use crate::engine::source::{SourceRef, Take};
use crate::proto;

/// A field that is not valid: `INVALID_ARGUMENT`, the field named first.
pub fn invalid(field: &str, message: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("{field}: {message}"))
}

/// A required id.
pub fn id<T>(field: &str, text: &str, parse: fn(&str) -> Result<T, IdError>) -> Result<T, Status> {
    parse(text).map_err(|e| invalid(field, e))
}

/// An optional id: empty means absent.
pub fn opt_id<T>(field: &str, text: &str, parse: fn(&str) -> Result<T, IdError>) -> Result<Option<T>, Status> {
    if text.is_empty() {
        Ok(None)
    } else {
        id(field, text, parse).map(Some)
    }
}

/// A token count within [`MAX_TOKENS_PER_FIELD`].
pub fn tokens(field: &str, n: u64) -> Result<u64, Status> {
    if n > MAX_TOKENS_PER_FIELD {
        return Err(invalid(
            field,
            format!("{n} is above the limit of {MAX_TOKENS_PER_FIELD}"),
        ));
    }
    Ok(n)
}

/// Token counts of every kind; the message is required.
pub fn usage(field: &str, u: Option<&proto::Usage>) -> Result<Usage, Status> {
    let u = u.ok_or_else(|| invalid(field, "is required (a settle without counts is never charged as zero)"))?;
    Ok(Usage {
        input_tokens: tokens(&format!("{field}.input_tokens"), u.input_tokens)?,
        cached_input_tokens: tokens(&format!("{field}.cached_input_tokens"), u.cached_input_tokens)?,
        cache_write_tokens: tokens(&format!("{field}.cache_write_tokens"), u.cache_write_tokens)?,
        output_tokens: tokens(&format!("{field}.output_tokens"), u.output_tokens)?,
    })
}

/// A required money amount.
pub fn money(field: &str, m: Option<&proto::Money>) -> Result<Money, Status> {
    let m = m.ok_or_else(|| invalid(field, "is required"))?;
    if u128::from(m.picos.unsigned_abs()) >= SCALE.unsigned_abs() {
        return Err(invalid(field, "picos must be within (-10^12, 10^12)"));
    }
    if (m.units > 0 && m.picos < 0) || (m.units < 0 && m.picos > 0) {
        return Err(invalid(field, "units and picos must have the same sign"));
    }
    Ok(Money::from_picos(i128::from(m.units) * SCALE + i128::from(m.picos)))
}

/// A money amount for the wire.
pub fn money_out(m: Money) -> proto::Money {
    let units = m.picos() / SCALE;
    proto::Money {
        units: i64::try_from(units).unwrap_or(if units < 0 { i64::MIN } else { i64::MAX }),
        // |remainder| < 10^12 always fits.
        picos: i64::try_from(m.picos() % SCALE).unwrap_or_default(),
        decimal: m.to_string(),
    }
}

/// A required timestamp.
pub fn timestamp(field: &str, t: Option<&prost_types::Timestamp>) -> Result<Timestamp, Status> {
    let t = t.ok_or_else(|| invalid(field, "is required"))?;
    let nanos = Some(t.nanos).filter(|n| (0..1_000_000_000).contains(n));
    nanos
        .and_then(|n| Timestamp::new(t.seconds, n).ok())
        .ok_or_else(|| invalid(field, "is not a valid timestamp"))
}

/// A timestamp for the wire.
pub fn timestamp_out(t: Timestamp) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.as_second(),
        nanos: t.subsec_nanosecond(),
    }
}

fn source_kind(s: &SourceRef) -> proto::SourceKind {
    match s {
        SourceRef::Allowance { .. } => proto::SourceKind::Allowance,
        SourceRef::Pack(_) => proto::SourceKind::Pack,
        SourceRef::Promo(_) => proto::SourceKind::Promo,
        SourceRef::Paid => proto::SourceKind::Paid,
        SourceRef::Credit => proto::SourceKind::Credit,
        SourceRef::Debt => proto::SourceKind::Debt,
    }
}

/// Takes for the wire.
pub fn takes_out(takes: &[Take]) -> Vec<proto::SourceAmount> {
    takes
        .iter()
        .map(|t| proto::SourceAmount {
            source: source_kind(&t.source) as i32,
            lot_id: t.source.lot().unwrap_or_default(),
            tokens: if t.source.is_tokens() {
                u64::try_from(t.amount).unwrap_or(u64::MAX)
            } else {
                0
            },
            money: (!t.source.is_tokens()).then(|| money_out(Money::from_picos(t.amount))),
        })
        .collect()
}

/// A take from the wire (as `takes_out` writes it).
pub fn take_in(field: &str, a: &proto::SourceAmount) -> Result<Take, Status> {
    let lot_field = format!("{field}.lot_id");
    let lot = || id(&lot_field, &a.lot_id, crate::engine::ids::LotId::parse);
    let source = match proto::SourceKind::try_from(a.source) {
        Ok(proto::SourceKind::Allowance) => SourceRef::Allowance {
            period: a
                .lot_id
                .strip_prefix("period:")
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| invalid(&lot_field, "expected period:N for an allowance"))?,
        },
        Ok(proto::SourceKind::Pack) => SourceRef::Pack(lot()?),
        Ok(proto::SourceKind::Promo) => SourceRef::Promo(lot()?),
        Ok(proto::SourceKind::Paid) => SourceRef::Paid,
        Ok(proto::SourceKind::Credit) => SourceRef::Credit,
        Ok(proto::SourceKind::Debt) => SourceRef::Debt,
        Ok(proto::SourceKind::Unspecified) | Err(_) => {
            return Err(invalid(
                &format!("{field}.source"),
                format!("unknown source {}", a.source),
            ));
        }
    };
    let amount = if source.is_tokens() {
        i128::from(tokens(&format!("{field}.tokens"), a.tokens)?)
    } else {
        money(&format!("{field}.money"), a.money.as_ref())?.picos()
    };
    Ok(Take { source, amount })
}

/// Token counts for the wire.
pub fn usage_out(u: &Usage) -> proto::Usage {
    proto::Usage {
        input_tokens: u.input_tokens,
        cached_input_tokens: u.cached_input_tokens,
        cache_write_tokens: u.cache_write_tokens,
        output_tokens: u.output_tokens,
    }
}

/// A usage record for the wire.
pub fn record_out(r: &UsageRecord) -> proto::UsageRecord {
    proto::UsageRecord {
        record_id: r.id(),
        ..record_fields(r)
    }
}

/// A usage record for the wire without its `record_id`, which is derived
/// from the account, the request and the kind ([`UsageRecord::id`]): the
/// usage stream's form (34 bytes less a record, and no second SHA-256 on
/// the write path); its readers derive the id again.
pub fn record_fields(r: &UsageRecord) -> proto::UsageRecord {
    proto::UsageRecord {
        request_id: r.request_id.to_string(),
        reservation_id: r.reservation_id.as_ref().map(ToString::to_string).unwrap_or_default(),
        account_id: r.account_id.to_string(),
        api_key_id: r.api_key_id.as_ref().map(ToString::to_string).unwrap_or_default(),
        model: r.model.as_ref().map(ToString::to_string).unwrap_or_default(),
        service_tier: r.service_tier.as_ref().map(ToString::to_string).unwrap_or_default(),
        usage: Some(usage_out(&r.usage)),
        charges: takes_out(&r.charges),
        total_money: Some(money_out(r.total_money)),
        price_version: r.price_version.as_ref().map(ToString::to_string).unwrap_or_default(),
        reserved_at: Some(timestamp_out(r.reserved_at)),
        settled_at: Some(timestamp_out(r.settled_at)),
        kind: r.kind.as_str().to_owned(),
        record_id: String::new(),
        journal: String::new(),
        journal_seq: 0,
    }
}

/// A usage record from the wire, as [`record_out`] or [`record_fields`]
/// writes it (the latter is the usage stream's encoding): the inverse of
/// both, exact to the nanosecond and the pico-unit.
pub fn record_in(r: &proto::UsageRecord) -> Result<UsageRecord, Status> {
    use crate::engine::ids::{AccountId, ApiKeyId, ModelId, RequestId, ReservationId, VersionId};
    Ok(UsageRecord {
        kind: r.kind.parse().map_err(|e: String| invalid("kind", e))?,
        request_id: id("request_id", &r.request_id, RequestId::parse)?,
        reservation_id: opt_id("reservation_id", &r.reservation_id, ReservationId::parse)?,
        account_id: id("account_id", &r.account_id, AccountId::parse)?,
        api_key_id: opt_id("api_key_id", &r.api_key_id, ApiKeyId::parse)?,
        model: opt_id("model", &r.model, ModelId::parse)?,
        service_tier: opt_id("service_tier", &r.service_tier, TierId::parse)?,
        usage: usage("usage", r.usage.as_ref())?,
        charges: r
            .charges
            .iter()
            .enumerate()
            .map(|(i, a)| take_in(&format!("charges[{i}]"), a))
            .collect::<Result<_, _>>()?,
        total_money: money("total_money", r.total_money.as_ref())?,
        price_version: opt_id("price_version", &r.price_version, VersionId::parse)?,
        reserved_at: timestamp("reserved_at", r.reserved_at.as_ref())?,
        settled_at: timestamp("settled_at", r.settled_at.as_ref())?,
    })
}
