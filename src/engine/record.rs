//! Usage records: one per settled or charged request, for billing.

use jiff::Timestamp;

use super::ids::{AccountId, ApiKeyId, ModelId, RequestId, ReservationId, TierId, VersionId};
use super::money::Money;
use super::pricing::Usage;
use super::source::Take;

/// Why a record exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordKind {
    /// A reservation was settled with actual usage.
    Settle,
    /// A one-shot charge.
    Charge,
    /// A hold reached its TTL under the charge-in-full policy.
    Expired,
}

impl std::str::FromStr for RecordKind {
    type Err = String;

    fn from_str(s: &str) -> Result<RecordKind, String> {
        [RecordKind::Settle, RecordKind::Charge, RecordKind::Expired]
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| format!("expected settle, charge or expired, got {s:?}"))
    }
}

impl RecordKind {
    /// The name used on the wire and in files.
    pub fn as_str(self) -> &'static str {
        match self {
            RecordKind::Settle => "settle",
            RecordKind::Charge => "charge",
            RecordKind::Expired => "expired",
        }
    }
}

/// What one request was charged, from which lots, at which prices.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UsageRecord {
    /// Why the record exists.
    pub kind: RecordKind,
    /// The caller's request id.
    pub request_id: RequestId,
    /// The reservation settled, if any.
    pub reservation_id: Option<ReservationId>,
    /// The account charged.
    pub account_id: AccountId,
    /// The API key, if the caller named one.
    pub api_key_id: Option<ApiKeyId>,
    /// The model, if any.
    pub model: Option<ModelId>,
    /// The service tier, if priced by tokens.
    pub service_tier: Option<TierId>,
    /// Tokens charged, by kind.
    pub usage: Usage,
    /// What was taken from each source and lot.
    pub charges: Vec<Take>,
    /// Money charged in total (the sum of the money takes).
    pub total_money: Money,
    /// The price version that priced it.
    pub price_version: Option<VersionId>,
    /// When the request was reserved (or charged).
    pub reserved_at: Timestamp,
    /// When it was charged.
    pub settled_at: Timestamp,
}

impl UsageRecord {
    /// A deterministic id: the first 16 bytes (hex) of SHA-256 over the
    /// account, the request id and the kind, which together name exactly
    /// one record. A consumer that sees an id twice has seen one record.
    pub fn id(&self) -> String {
        record_id(&self.account_id, &self.request_id, self.kind)
    }
}

/// An operator's change to an account, for the audit trail: on the usage
/// stream beside the usage records (`kind` is `"audit"`), and in the usage
/// sink.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AuditRecord {
    /// Always `"audit"`.
    pub kind: String,
    /// The account changed; none for a change to no one account (a price
    /// version published).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account_id: Option<AccountId>,
    /// Who made the change, as the admin API knows them.
    pub operator: String,
    /// Where the call came from.
    pub peer: String,
    /// The change, e.g. `top_up`.
    pub operation: String,
    /// The operator-chosen id of the change: repeating it applies nothing
    /// again.
    pub adjustment_id: String,
    /// The operator's reason.
    pub reason: String,
    /// The change in full, as the engine received it.
    pub change: String,
    /// What the change changed, as it was before (the same fields as
    /// `after`).
    #[serde(default)]
    pub before: serde_json::Map<String, serde_json::Value>,
    /// What the change changed, as it is after.
    #[serde(default)]
    pub after: serde_json::Map<String, serde_json::Value>,
    /// What a refund gave back, per source and lot, as records list their
    /// charges (empty for any other change): what the ledgers' `charged`
    /// went down by.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub refunded: Vec<Take>,
    /// When it was applied.
    pub at: Timestamp,
}

impl AuditRecord {
    /// A deterministic id over the account, the change and the instant.
    pub fn id(&self) -> String {
        digest_id([
            self.kind.as_str(),
            self.account_id.as_ref().map_or("", AccountId::as_str),
            self.change.as_str(),
            &self.at.to_string(),
        ])
    }
}

/// The id of the record of `kind` for `request_id` on `account` (see
/// [`UsageRecord::id`]).
pub fn record_id(account: &AccountId, request_id: &RequestId, kind: RecordKind) -> String {
    digest_id([account.as_str(), request_id.as_str(), kind.as_str()])
}

/// A request id's fingerprint on `account`: what the Redis store remembers
/// of a request whose record it committed, so that no later record for the
/// same request id is charged (12 bytes: as cheap to keep in Redis as 8,
/// and far out of reach of a caller searching for two ids that collide).
pub fn request_fingerprint(account: &AccountId, request_id: &RequestId) -> [u8; 12] {
    let digest = digest([account.as_str(), request_id.as_str(), "request"]);
    let mut fingerprint = [0u8; 12];
    fingerprint.copy_from_slice(&digest[..12]);
    fingerprint
}

/// SHA-256 over `parts`, each followed by a zero byte.
fn digest<'a>(parts: impl IntoIterator<Item = &'a str>) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut hash = Sha256::new();
    for part in parts {
        hash.update(part.as_bytes());
        hash.update([0u8]);
    }
    hash.finalize().into()
}

/// The first 16 bytes of SHA-256 over `parts` (each followed by a zero
/// byte), in hex.
pub(crate) fn digest_id<'a>(parts: impl IntoIterator<Item = &'a str>) -> String {
    hex(&digest(parts)[..16])
}

/// `bytes` in lower-case hex, two digits a byte.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn record_ids_are_the_hex_of_sha256_over_their_parts() {
        // sha256("acct\0req-1\0settle\0"), first 16 bytes: a consumer may
        // have stored ids, so they never change.
        assert_eq!(
            super::digest_id(["acct", "req-1", "settle"]),
            "5cc6e15f54b3181a30e532ed673400ec"
        );
    }
}
