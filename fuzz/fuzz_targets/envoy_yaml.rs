//! Any text given to the Envoy rate-limit rule parser: rules or every
//! problem, never a panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|bytes: &[u8]| tollgate::fuzzing::envoy_yaml(bytes));
