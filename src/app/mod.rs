//! The running process: building the app from its settings and serving
//! until told to stop, then draining ([`server`]), reloading the
//! configuration while serving ([`reload`]), and the shutdown signals with
//! the deadline that bounds a drain ([`signal`]).

pub mod reload;
pub mod server;
pub mod signal;
