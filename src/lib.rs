//! Tollgate: a quota, balance and rate-limit sidecar for LLM inference.
//!
//! - [`config`]: TOML configuration, environment overrides, validation.
//! - [`engine`]: pure accounting logic (money, prices, periods, sources,
//!   holds, limits); no I/O, no clock, no async.
//! - [`store`]: the `Store` trait and its embedded `memory` implementation.
//! - [`proto`]: the generated gRPC types of `tollgate.v1`.

pub mod config;
pub mod engine;
pub mod store;

/// Generated code for the `tollgate.v1` gRPC package.
pub mod proto {
    #![allow(missing_docs, clippy::all, clippy::pedantic)]
    tonic::include_proto!("tollgate.v1");

    /// Encoded descriptors of every service, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("tollgate_descriptor");
}
