//! Raw bytes as a request target: normalise, classify, and check the liberal-origin
//! soundness oracle of `fuzz/oracle.rs` (the same as the property in tests/properties.rs).
#![no_main]

#[path = "../oracle.rs"]
mod oracle;

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use taler_paywall::policy::Policy;

static POLICY: OnceLock<Policy> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let policy = POLICY.get_or_init(|| oracle::policy(oracle::PREFIXES));
    // Lossy, so that invalid UTF-8 still reaches the normaliser as U+FFFD.
    let target = String::from_utf8_lossy(data);
    if let Err(e) = oracle::check_path(&target, oracle::PREFIXES, policy) {
        panic!("{e}");
    }
});
