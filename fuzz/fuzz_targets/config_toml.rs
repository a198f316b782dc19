//! Any text given to the configuration parser: a configuration or every
//! problem with its path, never a panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|bytes: &[u8]| tollgate::fuzzing::config_toml(bytes));
