//! How calls reach Tollgate and how it reaches other Tollgates: gRPC
//! channels over TCP or a Unix socket ([`channel`]), the guards on every
//! accepted connection ([`conn`]), the Unix-socket `:authority` fix for
//! grpcio and grpc-java clients ([`uds`]), and the plain-HTTP endpoint for
//! metrics and probes ([`http`]).

pub mod channel;
pub mod conn;
pub mod http;
pub mod uds;
