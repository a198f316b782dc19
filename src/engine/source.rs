//! Sources and the amounts taken from them: the unit in which holds,
//! charges, leases and usage records name what paid.

use super::ids::LotId;
use super::money::Money;

/// A source, or one lot of it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SourceRef {
    /// The allowance of subscription period `period`.
    Allowance {
        /// Period number (0 is the subscription's first).
        period: u64,
    },
    /// A token pack.
    Pack(LotId),
    /// A promotional money grant.
    Promo(LotId),
    /// Paid money down to zero.
    Paid,
    /// Paid money below zero, within the credit limit.
    Credit,
    /// Owed beyond the credit limit.
    Debt,
}

impl SourceRef {
    /// Amounts are weighted tokens (true) or pico-units.
    pub fn is_tokens(&self) -> bool {
        matches!(self, SourceRef::Allowance { .. } | SourceRef::Pack(_))
    }

    /// The source name used in records.
    pub fn kind_name(&self) -> &'static str {
        match self {
            SourceRef::Allowance { .. } => "allowance",
            SourceRef::Pack(_) => "pack",
            SourceRef::Promo(_) => "promo",
            SourceRef::Paid => "paid",
            SourceRef::Credit => "credit",
            SourceRef::Debt => "debt",
        }
    }

    /// The lot label used in records, if the source has lots.
    pub fn lot(&self) -> Option<String> {
        match self {
            SourceRef::Allowance { period } => Some(format!("period:{period}")),
            SourceRef::Pack(id) | SourceRef::Promo(id) => Some(id.to_string()),
            _ => None,
        }
    }
}

/// An amount taken from (or held on) one source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Take {
    /// Where from.
    pub source: SourceRef,
    /// How much, in the source's unit; always positive.
    pub amount: i128,
}

impl serde::Serialize for Take {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(None)?;
        map.serialize_entry("source", self.source.kind_name())?;
        if let Some(lot) = self.source.lot() {
            map.serialize_entry("lot", &lot)?;
        }
        if self.source.is_tokens() {
            map.serialize_entry("tokens", &u64::try_from(self.amount).unwrap_or(u64::MAX))?;
        } else {
            map.serialize_entry("money", &Money::from_picos(self.amount))?;
        }
        map.end()
    }
}

impl<'de> serde::Deserialize<'de> for Take {
    /// Reads the form [`Take`] is written in (as in usage records).
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Take, D::Error> {
        use serde::de::Error;
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Form {
            source: String,
            lot: Option<String>,
            tokens: Option<u64>,
            money: Option<Money>,
        }
        let form = Form::deserialize(d)?;
        let lot = || {
            let text = form.lot.as_deref().ok_or_else(|| D::Error::custom("lot missing"))?;
            LotId::parse(text).map_err(|e| D::Error::custom(format!("lot {text:?} {e}")))
        };
        let source = match form.source.as_str() {
            "allowance" => {
                let period = form.lot.as_deref().and_then(|l| l.strip_prefix("period:"));
                let period = period.and_then(|p| p.parse().ok());
                SourceRef::Allowance {
                    period: period.ok_or_else(|| D::Error::custom("allowance needs lot \"period:N\""))?,
                }
            }
            "pack" => SourceRef::Pack(lot()?),
            "promo" => SourceRef::Promo(lot()?),
            "paid" => SourceRef::Paid,
            "credit" => SourceRef::Credit,
            "debt" => SourceRef::Debt,
            other => return Err(D::Error::custom(format!("unknown source {other:?}"))),
        };
        let amount = match (source.is_tokens(), form.tokens, form.money) {
            (true, Some(tokens), None) => i128::from(tokens),
            (false, None, Some(money)) => money.picos(),
            _ => {
                return Err(D::Error::custom(
                    "a token source takes `tokens`, a money source `money`",
                ));
            }
        };
        Ok(Take { source, amount })
    }
}

/// The money part of `takes`.
pub fn money_total(takes: &[Take]) -> Money {
    Money::from_picos(takes.iter().filter(|t| !t.source.is_tokens()).map(|t| t.amount).sum())
}

/// Credit is the paid ledger below zero: both are lent as `Paid`.
pub(crate) fn lent_as(source: &SourceRef) -> SourceRef {
    match source {
        SourceRef::Credit => SourceRef::Paid,
        other => other.clone(),
    }
}

/// Adds `takes` into `into`, one entry per source.
pub fn merge(into: &mut Vec<Take>, takes: impl IntoIterator<Item = Take>) {
    for take in takes {
        let source = lent_as(&take.source);
        match into.iter_mut().find(|t| t.source == source) {
            Some(t) => t.amount += take.amount,
            None => into.push(Take {
                source,
                amount: take.amount,
            }),
        }
    }
    into.retain(|t| t.amount != 0);
}
