//! The gRPC planes: thin translations between `tollgate.v1` messages and
//! engine commands. Every request field is validated here, into domain
//! types, before anything reaches the store.
//!
//! - [`quota`]: the data plane (`tollgate.v1.Quota`).
//! - [`admin`]: the control plane (`tollgate.v1.Admin`).
//! - [`auth`]: who may call the control plane, and for what.
//! - [`convert`]: field validation and proto <-> domain conversion.
//! - [`status`]: the one table from errors to gRPC status codes.

pub mod admin;
pub mod auth;
pub mod convert;
pub mod quota;
pub mod rls;
pub mod status;
