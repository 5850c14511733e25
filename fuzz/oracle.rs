//! Oracles shared by `tests/properties.rs` and the fuzz targets in `fuzz/fuzz_targets/`.
//!
//! Included by path (`#[path = "..."] mod oracle;`) from both, so the property tests and the
//! coverage-guided fuzzers check exactly the same thing. Depends only on `taler_paywall`.
#![allow(dead_code)]

use taler_paywall::config::{ProtectRule, Scope};
use taler_paywall::path::normalize;
use taler_paywall::payment::OrderStatus;
use taler_paywall::policy::Policy;

/// Protected prefixes used by the path oracle: nested prefixes (the longest must win), a
/// two-segment one, a one-letter one, one with a sub-delimiter that origins decode from
/// `%27`, and one with non-ASCII bytes kept percent-encoded.
pub const PREFIXES: &[&str] = &[
    "/premium",
    "/premium/gold",
    "/docs/paid",
    "/a",
    "/it's",
    "/caf%C3%A9",
];

/// The policy for [`PREFIXES`], every rule page-scoped.
pub fn policy(prefixes: &[&str]) -> Policy {
    let rules: Vec<ProtectRule> = prefixes
        .iter()
        .map(|p| ProtectRule {
            prefix: (*p).to_owned(),
            price: "KUDOS:1".parse().expect("a valid amount"),
            summary: (*p).to_owned(),
            scope: Scope::Page,
        })
        .collect();
    Policy::new(&rules)
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Percent-decodes every valid `%XX` (structure-changing ones included); a `%` that does not
/// start a valid escape is kept as it is.
pub fn percent_decode_all(s: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'%' && i + 2 < s.len() {
            if let (Some(h), Some(l)) = (hex(s[i + 1]), hex(s[i + 2])) {
                out.push((h << 4) | l);
                i += 3;
                continue;
            }
        }
        out.push(s[i]);
        i += 1;
    }
    out
}

/// A deliberately liberal model of what an nginx-like origin (on a case-insensitive file
/// system, behind a servlet-style `;` parameter stripper, with a decoder that accepts
/// overlong UTF-8) serves for a request path: the served path as lower-case segments.
///
/// Steps: cut at the first raw `?` or `#`; percent-decode everything (`%2F`, `%5C`, `%2e`,
/// `%3B` included); map the overlong encodings of `/`, `\` and `.` to those bytes; cut at a
/// NUL (C string APIs); treat `\` as `/`; strip `;params` from each segment; merge empty
/// segments; resolve `.` and `..` (clamping at the root); ASCII-lowercase.
pub fn origin_model(raw: &str) -> Vec<Vec<u8>> {
    let path = raw.split(['?', '#']).next().unwrap_or("");
    let decoded = percent_decode_all(path.as_bytes());
    let mut bytes = Vec::with_capacity(decoded.len());
    let mut i = 0;
    while i < decoded.len() {
        let rest = &decoded[i..];
        let (b, n) = if rest.starts_with(&[0xc0, 0xaf]) {
            (b'/', 2)
        } else if rest.starts_with(&[0xe0, 0x80, 0xaf]) {
            (b'/', 3)
        } else if rest.starts_with(&[0xc1, 0x9c]) {
            (b'\\', 2)
        } else if rest.starts_with(&[0xc0, 0xae]) {
            (b'.', 2)
        } else {
            (rest[0], 1)
        };
        if b == 0 {
            break;
        }
        bytes.push(if b == b'\\' { b'/' } else { b });
        i += n;
    }
    let mut out: Vec<Vec<u8>> = Vec::new();
    for seg in bytes.split(|&b| b == b'/') {
        let seg = match seg.iter().position(|&b| b == b';') {
            Some(p) => &seg[..p],
            None => seg,
        };
        match seg {
            b"" | b"." => {}
            b".." => {
                out.pop();
            }
            s => out.push(s.to_ascii_lowercase()),
        }
    }
    out
}

/// The segments of a (normal-form) prefix as the model origin sees them.
pub fn prefix_segments(prefix: &str) -> Vec<Vec<u8>> {
    origin_model(prefix)
}

/// The number of segments of the longest prefix in `prefixes` that the model origin would
/// serve `served` under, if any.
pub fn longest_model_match(served: &[Vec<u8>], prefixes: &[&str]) -> Option<usize> {
    prefixes
        .iter()
        .map(|p| prefix_segments(p))
        .filter(|segs| served.len() >= segs.len() && served[..segs.len()] == segs[..])
        .map(|segs| segs.len())
        .max()
}

/// The path soundness oracle. `target` is a raw request target; the gateway normalises its
/// path (up to the first `?`/`#`), decides on the normal form and forwards the normal form.
/// Whenever the model origin would serve a protected path — for the raw path (a proxy
/// forwarding the raw path) or for the normal form (what this gateway forwards) — the
/// normaliser must reject the path, or the policy must classify it under a route at least
/// as specific as the longest protected prefix the origin serves it under (a shorter one
/// would sell `/premium/gold/x` at `/premium`'s price).
///
/// Also checks the normal form: starts with `/`, no `//`, `/./`, `/../`, no trailing `/.`
/// or `/..`, only upper-case hex escapes, no escaped unreserved character, no byte outside
/// printable ASCII, and normalising it again gives it back.
///
/// Returns a description of the first violation.
pub fn check_path(target: &str, prefixes: &[&str], policy: &Policy) -> Result<(), String> {
    let path = target.split(['?', '#']).next().unwrap_or("");
    let Ok(norm) = normalize(path) else {
        return Ok(());
    };
    let n = norm.as_str();
    check_normal_form(n).map_err(|e| format!("{target:?} -> {n:?}: {e}"))?;
    match normalize(n) {
        Ok(again) if again == norm => {}
        other => {
            return Err(format!(
                "{target:?} -> {n:?} is not a fixed point: {other:?}"
            ))
        }
    }
    let got = policy
        .classify(&norm)
        .map(|r| r.prefix.split('/').filter(|s| !s.is_empty()).count());
    for (what, served) in [("raw", origin_model(path)), ("normal", origin_model(n))] {
        if let Some(want) = longest_model_match(&served, prefixes) {
            if got.is_none_or(|g| g < want) {
                return Err(format!(
                    "BYPASS: {target:?} normalises to {n:?}, classified {:?}, but the origin \
                     serves the {what} path as {:?} (under a {want}-segment protected prefix)",
                    policy.classify(&norm).map(|r| r.prefix.as_str()),
                    served
                        .iter()
                        .map(|s| String::from_utf8_lossy(s).into_owned())
                        .collect::<Vec<_>>()
                ));
            }
        }
    }
    Ok(())
}

/// The invariants of a normal-form path.
pub fn check_normal_form(n: &str) -> Result<(), String> {
    if !n.starts_with('/') {
        return Err("does not start with '/'".into());
    }
    for bad in ["//", "/./", "/../"] {
        if n.contains(bad) {
            return Err(format!("contains {bad:?}"));
        }
    }
    if n.ends_with("/.") || n.ends_with("/..") {
        return Err("ends in a dot segment".into());
    }
    let b = n.as_bytes();
    for (i, &c) in b.iter().enumerate() {
        if !(0x21..=0x7e).contains(&c) || c == b'\\' {
            return Err(format!("byte {c:#04x} at {i}"));
        }
        if c == b'%' {
            let (Some(&h), Some(&l)) = (b.get(i + 1), b.get(i + 2)) else {
                return Err("truncated escape".into());
            };
            let (Some(hv), Some(lv)) = (hex(h), hex(l)) else {
                return Err("invalid escape".into());
            };
            if h.is_ascii_lowercase() || l.is_ascii_lowercase() {
                return Err("lower-case hex escape".into());
            }
            let v = (hv << 4) | lv;
            if v.is_ascii_alphanumeric() || matches!(v, b'-' | b'.' | b'_' | b'~') {
                return Err(format!("escaped unreserved character {:?}", v as char));
            }
        }
    }
    Ok(())
}

/// The decision-relevant fields of an order-status body, read independently of
/// `taler_paywall::merchant`. Derived like the decoder's wire type, so unknown fields are
/// skipped with serde_json's leniency (it does not check the strings it skips for valid
/// UTF-8 or lone surrogates): a body the decoder can read, this can read too.
#[derive(serde::Deserialize)]
struct Probe {
    order_status: Option<serde_json::Value>,
    refunded: Option<serde_json::Value>,
    refund_amount: Option<serde_json::Value>,
}

/// `Some` for a JSON object (derived structs also accept arrays: those are `None`).
fn probe(body: &[u8]) -> Option<Probe> {
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return None;
    }
    serde_json::from_slice(body).ok()
}

/// Whether the body is a JSON object whose `order_status` is exactly the string `"paid"`.
pub fn json_says_paid(body: &[u8]) -> bool {
    probe(body).is_some_and(|p| p.order_status.as_ref().and_then(|s| s.as_str()) == Some("paid"))
}

/// Whether the body declares a refund: `"refunded": true` or a `refund_amount` that is a
/// non-zero amount.
pub fn json_declares_refund(body: &[u8]) -> bool {
    let Some(p) = probe(body) else {
        return false;
    };
    let refunded = p.refunded.and_then(|r| r.as_bool()) == Some(true);
    let amount = p
        .refund_amount
        .as_ref()
        .and_then(|a| a.as_str())
        .and_then(|a| a.parse::<taler_paywall::amount::Amount>().ok())
        .is_some_and(|a| !a.is_zero());
    refunded || amount
}

/// The merchant oracle: `decode_status` never says Paid unless the body is a JSON object
/// with `"order_status": "paid"`, and a Paid answer carries `refunded` whenever the body
/// declares a refund.
pub fn check_status(body: &[u8]) -> Result<(), String> {
    let decoded = taler_paywall::merchant::decode_status(body);
    if let Ok(OrderStatus::Paid { refunded, .. }) = decoded {
        if !json_says_paid(body) {
            return Err(format!(
                "Paid for a body that is not {{\"order_status\":\"paid\"}}: {:?}",
                String::from_utf8_lossy(body)
            ));
        }
        if json_declares_refund(body) && !refunded {
            return Err(format!(
                "refund ignored: {:?}",
                String::from_utf8_lossy(body)
            ));
        }
    }
    Ok(())
}
