//! Any bytes a client sends on a Unix socket, in pieces of any size: the
//! reader that fixes `:authority` (preface, frames, HPACK blocks) must
//! never panic, and never decode a block into more than its bound.
#![no_main]

libfuzzer_sys::fuzz_target!(|bytes: &[u8]| tollgate::fuzzing::uds_frames(bytes));
