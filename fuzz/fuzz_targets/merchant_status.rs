//! Raw bytes as a merchant order-status (and config) answer: no panic, Paid only when the
//! body is an object saying `"order_status": "paid"`, and a declared refund is never lost.
#![no_main]

#[path = "../oracle.rs"]
mod oracle;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(e) = oracle::check_status(data) {
        panic!("{e}");
    }
    let _ = taler_paywall::merchant::decode_config(data);
});
