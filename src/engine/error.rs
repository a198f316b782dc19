//! Engine errors. Denials are not errors: they are outcomes.

use super::period::PeriodError;

/// Why an operation was refused. Each variant maps to one gRPC status in
/// `api::status`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    /// A request field is unusable.
    #[error("{field}: {message}")]
    Invalid {
        /// The field, as named in the API.
        field: &'static str,
        /// What is wrong with it.
        message: String,
    },
    /// Something named does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// An id was used before with different content.
    #[error("{0}")]
    Conflict(String),
    /// The operation does not fit the current state.
    #[error("{0}")]
    Precondition(String),
    /// The account used up a budget that bounds what a process keeps for
    /// it; a later retry can pass.
    #[error("{0}")]
    Exhausted(String),
    /// An amount would leave the representable range.
    #[error("amount out of range")]
    Overflow,
    /// A period boundary left the supported date range.
    #[error(transparent)]
    Period(#[from] PeriodError),
    /// A sidecar's mirror cannot decide alone: it needs this from the
    /// shared account first (never leaves the store).
    #[error("this sidecar's lease is short; the shared account must be asked")]
    Short(Box<super::role::Short>),
}

impl From<super::money::Overflow> for EngineError {
    fn from(_: super::money::Overflow) -> Self {
        EngineError::Overflow
    }
}

impl EngineError {
    pub(crate) fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        EngineError::Invalid {
            field,
            message: message.into(),
        }
    }
}

impl From<super::pricing::PublishError> for EngineError {
    fn from(e: super::pricing::PublishError) -> Self {
        use super::pricing::PublishError;
        match e {
            PublishError::Duplicate(_) => EngineError::Conflict(e.to_string()),
            PublishError::Retroactive(..) => EngineError::Precondition(e.to_string()),
            PublishError::Invalid(problems) => EngineError::invalid("version", problems.join("; ")),
        }
    }
}
