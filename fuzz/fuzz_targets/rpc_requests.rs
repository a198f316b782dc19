//! Any message to any RPC (the first byte picks it), through the real
//! handlers on a seeded memory store: never a panic, and a call refused
//! for its content changes no account.
#![no_main]

use std::sync::LazyLock;

static RPCS: LazyLock<tollgate::fuzzing::Rpcs> = LazyLock::new(tollgate::fuzzing::Rpcs::new);

libfuzzer_sys::fuzz_target!(|bytes: &[u8]| RPCS.call(bytes));
