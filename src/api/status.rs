//! The one table from errors to gRPC status codes. Denials (no funds, over
//! a limit) never come through here: they are normal responses.

use tonic::Status;

use crate::engine::EngineError;
use crate::store::StoreError;
pub use crate::wire::invalid;

/// The status for a store or engine error.
pub fn status(e: StoreError) -> Status {
    match e {
        StoreError::UnknownAccount(id) => Status::not_found(format!("account {id} not found")),
        StoreError::AccountExists(id) => Status::already_exists(format!("account {id} already exists")),
        StoreError::Unavailable(m) | StoreError::Busy(m) => Status::unavailable(m),
        StoreError::Engine(e) => match e {
            EngineError::Invalid { .. } => Status::invalid_argument(e.to_string()),
            EngineError::NotFound(_) => Status::not_found(e.to_string()),
            EngineError::Conflict(_) => Status::already_exists(e.to_string()),
            EngineError::Precondition(_) => Status::failed_precondition(e.to_string()),
            EngineError::Exhausted(_) => Status::resource_exhausted(e.to_string()),
            EngineError::Overflow => Status::out_of_range(e.to_string()),
            EngineError::Period(_) => Status::internal(e.to_string()),
            EngineError::Short(_) => Status::unavailable(e.to_string()),
        },
    }
}

/// A reply of the wrong kind: a bug, reported rather than panicking.
pub fn unexpected(what: &str) -> Status {
    Status::internal(format!("unexpected engine reply to {what}"))
}
