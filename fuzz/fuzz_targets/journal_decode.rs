//! Any bytes given to the journal's segment decoder: it must never panic,
//! and what it returns must be consistent (entries only before the end it
//! reports).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate::journal::{Ending, decode};

fuzz_target!(|bytes: &[u8]| {
    let (entries, ending) = decode(bytes);
    match ending {
        Ending::Clean => {}
        Ending::Torn { at } | Ending::Corrupt { at, .. } => assert!(at <= bytes.len()),
    }
    for entry in entries {
        let _ = tollgate::journal::encode(&entry);
    }
});
