//! Tollgate proto smoke.
pub mod proto {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("tollgate.v1");
}
