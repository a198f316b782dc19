//! Any bytes given to the journal's segment decoder: it must never panic,
//! and what it returns must be consistent (entries only before the end it
//! reports).
#![no_main]

libfuzzer_sys::fuzz_target!(|bytes: &[u8]| tollgate::fuzzing::journal_decode(bytes));
