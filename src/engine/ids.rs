//! Validated identifiers.
//!
//! Every id that crosses the API (accounts, API keys, models, service tiers,
//! requests, reservations, lots, plans, price versions) is 1 to
//! [`MAX_ID_LEN`] bytes of ASCII letters, digits and `-_.:/@`. The bound keeps
//! per-account state small and log lines readable; the character set keeps
//! ids safe in Redis keys, file names and log fields.

use std::fmt;
use std::sync::Arc;

/// Longest accepted id, in bytes.
pub const MAX_ID_LEN: usize = 128;

/// Why a string is not a valid id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// Empty string.
    #[error("must not be empty")]
    Empty,
    /// Longer than [`MAX_ID_LEN`].
    #[error("is {0} bytes long; the limit is {MAX_ID_LEN}")]
    TooLong(usize),
    /// A character outside the allowed set.
    #[error("contains {0:?}; allowed are ASCII letters, digits and -_.:/@")]
    BadChar(char),
}

fn check(s: &str) -> Result<(), IdError> {
    if s.is_empty() {
        return Err(IdError::Empty);
    }
    if s.len() > MAX_ID_LEN {
        return Err(IdError::TooLong(s.len()));
    }
    let allowed = |b: &u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':' | b'/' | b'@');
    match s.bytes().position(|b| !allowed(&b)) {
        // A byte outside the set starts the character to name (a non-ASCII
        // byte is at a character boundary: the bytes before it are ASCII).
        Some(i) => Err(IdError::BadChar(s[i..].chars().next().unwrap_or('\u{fffd}'))),
        None => Ok(()),
    }
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Arc<str>);

        impl $name {
            /// Validates `s` as an id.
            pub fn parse(s: &str) -> Result<Self, IdError> {
                check(s)?;
                Ok(Self(Arc::from(s)))
            }

            /// The id as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }

            /// The id's shared text (a reference count, no copy).
            pub fn shared(&self) -> Arc<str> {
                Arc::clone(&self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), &*self.0)
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let text = String::deserialize(d)?;
                Self::parse(&text).map_err(|e| serde::de::Error::custom(format!("id {text:?} {e}")))
            }
        }
    };
}

id_type!(
    /// An account: the unit that owns balances, holds and limits.
    AccountId
);
id_type!(
    /// An API key of an account (for per-key limits).
    ApiKeyId
);
id_type!(
    /// A project of an account: a group of its API keys under one budget.
    ProjectId
);
id_type!(
    /// A model name, e.g. `llama-3.1-70b`.
    ModelId
);
id_type!(
    /// A service tier, e.g. `default`, `priority`, `batch`.
    TierId
);
id_type!(
    /// A caller-chosen request id, unique per account.
    RequestId
);
id_type!(
    /// A reservation id (today equal to the request id that made it; opaque to callers).
    ReservationId
);
id_type!(
    /// A lot within a source: a pack id or a promo grant id.
    LotId
);
id_type!(
    /// A plan name from the configuration.
    PlanId
);
id_type!(
    /// A sidecar as a producer of lease reports: unique per process start.
    ProducerId
);
id_type!(
    /// A price-book version id.
    VersionId
);

impl TierId {
    /// The tier used when a request names none.
    pub fn default_tier() -> TierId {
        static DEFAULT: std::sync::LazyLock<TierId> = std::sync::LazyLock::new(|| TierId(Arc::from("default")));
        DEFAULT.clone()
    }
}

impl RequestId {
    /// The reservation a reserve with this request id opens: the same text,
    /// shared, with nothing to check again.
    pub fn reservation_id(&self) -> ReservationId {
        ReservationId(Arc::clone(&self.0))
    }
}

impl ReservationId {
    /// The request id of the reserve that opened this reservation.
    pub fn request_id(&self) -> RequestId {
        RequestId(Arc::clone(&self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_documented_alphabet_and_bounds() {
        assert!(ModelId::parse("meta-llama/Llama-3.1-70B:fp8@v2_x").is_ok());
        assert!(AccountId::parse(&"a".repeat(MAX_ID_LEN)).is_ok());
        assert_eq!(AccountId::parse(""), Err(IdError::Empty));
        assert_eq!(AccountId::parse(&"a".repeat(129)), Err(IdError::TooLong(129)));
        assert_eq!(AccountId::parse("a b"), Err(IdError::BadChar(' ')));
        assert_eq!(AccountId::parse("é"), Err(IdError::BadChar('é')));
    }
}
