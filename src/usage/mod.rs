//! Where usage records go: the sink every sidecar writes (a JSON Lines
//! file or stdout, [`sink`], re-exported here), the local journal that
//! makes them durable before a Redis-backed sidecar acknowledges them
//! ([`journal`]). The stream itself is written by the Redis store's
//! commits (`store::leased`), in the form [`crate::wire`] gives records,
//! and read through a consumer group by `tollgate usage`
//! ([`crate::cli::usage`]).

pub mod journal;
pub mod sink;

pub use sink::{Emitted, QUEUE, UsageSender, UsageSinkConfig, Writer, spawn};
