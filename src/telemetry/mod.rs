//! What Tollgate tells its operators about itself: logs and traces
//! ([`logs`], re-exported here) and the Prometheus metrics ([`metrics`]).

pub mod logs;
pub mod metrics;

pub use logs::{LogSettings, Telemetry, grpc_span, init, note_ids};
