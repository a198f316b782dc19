//! Tollgate: a quota, balance and rate-limit sidecar for LLM inference.
//!
//! Data flows from the gRPC planes ([`api`]) through the [`service`] to a
//! [`store`], which runs the pure [`engine`] on one account at a time;
//! usage records leave through [`usage`].
//!
//! The modules, bottom up: each imports only from those listed before it.
//!
//! - [`engine`]: pure accounting (money, prices, periods, sources, holds,
//!   limits); no I/O, no clock, no async.
//! - [`clock`]: where "now" comes from (system, or manual for tests).
//! - [`proto`]: the generated gRPC types of `tollgate.v1`.
//! - [`wire`]: usage records, money and timestamps to and from their
//!   `tollgate.v1` form (the API's replies and the usage stream).
//! - [`lease`]: the sidecar's lease protocol (mirror, syncs, decisions),
//!   without I/O; the Redis store drives it.
//! - [`telemetry`]: logs, traces and the Prometheus metrics (one registry,
//!   bounded labels).
//! - [`rls`]: Envoy's rate-limit service: rules in envoyproxy/ratelimit's
//!   format and how descriptors match them.
//! - [`usage`]: where usage records go: the sink (JSON Lines file or
//!   stdout) and the local journal in front of Redis.
//! - [`store`]: the `Store` trait, the embedded `memory` store, and the
//!   Redis store with leases.
//! - [`billing`]: downstream of the usage streams: read through a
//!   consumer group, exported (totals, CloudEvents), and loaded into the
//!   billing database in PostgreSQL, each record once.
//! - [`service`]: store + clock + usage sink, shared by both planes.
//! - [`api`]: the `tollgate.v1` Quota and Admin services, thin translations.
//! - [`transport`]: gRPC channels over TCP or a Unix socket, the guards on
//!   every connection, the Unix-socket `:authority` fix, and the
//!   plain-HTTP endpoint (`/metrics`, `/live`, `/ready`).
//! - [`client`]: the data plane's Rust client (deadlines, retries, a
//!   reservation released unless settled).
//! - [`config`]: the TOML file, the environment and flags over it (one
//!   order, decided in one place), validation, secrets.
//! - [`app`]: the running process: builds from settings, binds listeners,
//!   serves, reloads the configuration, drains on shutdown signals.
//! - [`cli`]: the command line (serve, check-config, a small client),
//!   `tollgate admin` (the operator's client of the admin API),
//!   `tollgate usage` (the usage streams: tail, export, load) and
//!   `tollgate loadgen` (the load generator and the empty baseline).
//! - [`fuzzing`]: the fuzz targets' entry points (`fuzz/`), also run by
//!   `cargo test` over their seed corpora.

pub mod api;
pub mod app;
pub mod billing;
pub mod cli;
pub mod client;
pub mod clock;
pub mod config;
pub mod engine;
pub mod fuzzing;
pub mod lease;
pub mod rls;
pub mod service;
pub mod store;
pub mod telemetry;
pub mod transport;
pub mod usage;
pub mod wire;

/// Generated code for the `tollgate.v1` gRPC package.
pub mod proto {
    #![allow(missing_docs, clippy::all, clippy::pedantic)]
    tonic::include_proto!("tollgate.v1");

    /// Encoded descriptors of every service, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("tollgate_descriptor");
}
