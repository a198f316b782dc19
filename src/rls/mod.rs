//! The Envoy rate-limit service (`envoy.service.ratelimit.v3`): rules in
//! envoyproxy/ratelimit's configuration format, and how request
//! descriptors match them.

pub mod config;
pub mod matcher;
pub mod overrides;
