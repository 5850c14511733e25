//! Property tests of the gateway's parsers: the path normaliser and matcher, the signed
//! cookies, the merchant's order-status answers, and the origin responses of the fast path
//! (`src/origin_h1.rs`). The path and merchant oracles live in
//! `fuzz/oracle.rs` and are shared with the coverage-guided fuzz targets (`scripts/fuzz`).
//!
//! Case counts are modest so the file runs in well under 30 s in a debug build;
//! `PROPTEST_CASES=100000 cargo test --release --test properties` for a long run.

#[path = "../fuzz/oracle.rs"]
mod oracle;

use std::time::Duration;

use http::header::COOKIE;
use http::{HeaderMap, HeaderValue};
use proptest::prelude::*;
use proptest::sample::{select, Index};
use taler_paywall::config::{Secret, SessionConfig};
use taler_paywall::path::normalize;
use taler_paywall::session::{
    is_gateway_cookie, resource_hash, set_order, set_return_to, set_session, strip_gateway_cookies,
    CookieKeys, CookieSettings, OrderCookie, RequestCookies, Session, SessionId,
    ORDER_COOKIE_PREFIX, RETURN_COOKIE_PREFIX, SESSION_COOKIE, SESSION_COOKIE_HOST,
};

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Paths
// ---------------------------------------------------------------------------------------------

/// Pieces of request targets that have broken path matching somewhere
/// (`shared/spec/proxy-pitfalls.md` §c 1–8).
const NASTY: &[&str] = &[
    "/",
    "/",
    "/",
    "//",
    ".",
    "..",
    "./",
    "../",
    "%",
    "%2e",
    "%2E",
    "%2e%2e",
    ".%2e",
    "%2f",
    "%2F",
    "%5c",
    "%5C",
    "\\",
    "%00",
    "%0a",
    "%7f",
    ";",
    ";x=1",
    "%3b",
    "%3B",
    "?",
    "#",
    "%3f",
    "%23",
    "%25",
    "%252e",
    "%c0%af",
    "%C0%AE",
    "%c1%9c",
    "%e0%80%af",
    "%c3%a9",
    "%C3%A9",
    "é",
    "\u{2024}",
    "2e",
    "2f",
    "5c",
    "00",
    "0",
    "7",
    "a",
    "c",
    "e",
    "f",
    "A",
    "E",
    "F",
    "x",
    "-",
    "~",
    "%7e",
    "%7E",
    "%41",
    "%61",
    "%70",
    "%50",
    "premium",
    "PREMIUM",
    "Premium",
    "pReMiUm",
    "gold",
    "GOLD",
    "docs",
    "Docs",
    "paid",
    "PAID",
    "it's",
    "it%27s",
    "IT%27S",
    "caf",
    "caf%C3%A9",
    "CAF%c3%a9",
    "%27",
    " ",
    "\t",
];

fn nasty_path() -> impl Strategy<Value = String> {
    (
        prop::bool::weighted(0.9),
        prop::collection::vec(select(NASTY), 0..14),
    )
        .prop_map(|(slash, parts)| {
            let mut s = String::from(if slash { "/" } else { "" });
            for p in parts {
                s.push_str(p);
            }
            s
        })
}

proptest! {
    #![proptest_config(config(2000))]

    /// Whenever the liberal model origin serves a protected path (for the raw path or for the
    /// normal form that is forwarded), `normalize` rejects or `classify` protects it under a
    /// prefix at least as specific; and the normal form is canonical and a fixed point.
    #[test]
    fn normaliser_and_matcher_are_sound_against_a_liberal_origin(target in nasty_path()) {
        let policy = oracle::policy(oracle::PREFIXES);
        if let Err(e) = oracle::check_path(&target, oracle::PREFIXES, &policy) {
            return Err(TestCaseError::fail(e));
        }
    }

    /// The same oracle for any string at all (and any string after a `/`): never a panic.
    #[test]
    fn normaliser_never_panics_and_stays_sound(s in any::<String>(), slash in any::<bool>()) {
        let target = if slash { format!("/{s}") } else { s };
        let policy = oracle::policy(oracle::PREFIXES);
        if let Err(e) = oracle::check_path(&target, oracle::PREFIXES, &policy) {
            return Err(TestCaseError::fail(e));
        }
    }

    /// `normalize(normalize(x)) == normalize(x)`, spelled out on its own.
    #[test]
    fn normalisation_is_idempotent(target in nasty_path()) {
        if let Ok(once) = normalize(&target) {
            prop_assert_eq!(normalize(once.as_str()), Ok(once.clone()));
            if let Err(e) = oracle::check_normal_form(once.as_str()) {
                return Err(TestCaseError::fail(format!("{target:?} -> {once:?}: {e}")));
            }
        }
    }
}

/// Known bypass shapes, run through the same oracle as the properties.
#[test]
fn path_oracle_on_known_shapes() {
    let policy = oracle::policy(oracle::PREFIXES);
    for target in [
        "/premium/a",
        "/PREMIUM/a",
        "//premium/a",
        "/free/../premium/a",
        "/free/%2e%2e/premium/a",
        "/free/..%2fpremium/a",
        "/free/..%5cpremium/a",
        "/free\\..\\premium/a",
        "/premium;x=1/a",
        "/premium%3Bx=1/a",
        "/..;/premium/a",
        "/free/..;x/premium/a",
        "/.;/premium/a",
        "/%2e%2e%3b/premium/a",
        "/it%27s/a",
        "/IT%27S",
        "/caf%c3%a9/x",
        "/%c0%afpremium",
        "/premium%00.html",
        "/premium/gold/x",
        "/premium/GOLD;v=1/x",
        "/premium?/../free",
        "/free#/../premium",
        "/free?x=/premium",
    ] {
        if let Err(e) = oracle::check_path(target, oracle::PREFIXES, &policy) {
            panic!("{e}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Cookies
// ---------------------------------------------------------------------------------------------

const SECRET_A: &str = "a secret of at least thirty-two bytes, number one";
const NOW: u64 = 1_700_000_000;
const RESOURCES: &[&str] = &["/premium/a", "/premium/", "/docs/paid/x%20y", "/"];

fn keys(secret: &str) -> CookieKeys {
    CookieKeys::new(&SessionConfig {
        secret: Secret::new(secret),
        previous_secrets: Vec::new(),
        recheck_interval: Duration::from_secs(300),
        cookie_lifetime: Duration::from_secs(3600),
    })
}

fn settings(secure: bool) -> CookieSettings {
    CookieSettings {
        secure,
        path_base: String::new(),
        lifetime: 3600,
    }
}

/// What a browser sends back for a `Set-Cookie`: its `name=value` verbatim.
fn echo(set_cookie: &HeaderValue) -> String {
    let s = set_cookie.to_str().expect("Set-Cookie is ASCII");
    s.split(';').next().unwrap_or("").to_owned()
}

fn cookie_header(values: &[&str]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for v in values {
        if let Ok(v) = HeaderValue::from_str(v) {
            h.append(COOKIE, v);
        }
    }
    h
}

/// Whether anything at all verifies in these headers, for the given candidate sessions.
fn anything_verifies(h: &HeaderMap, keys: &CookieKeys, sessions: &[SessionId]) -> Option<String> {
    let jar = RequestCookies::parse(h);
    for secure in [false, true] {
        for now in [0, 1000, NOW] {
            if let Some(s) = jar.session(keys, &settings(secure), now) {
                return Some(format!("session {s:?}"));
            }
        }
    }
    for s in sessions {
        for r in RESOURCES {
            if let Some(o) = jar.order(keys, s, r) {
                return Some(format!("order {o:?}"));
            }
            if let Some(t) = jar.return_to(keys, s, r) {
                return Some(format!("return_to {t:?}"));
            }
        }
    }
    None
}

fn cookie_name() -> impl Strategy<Value = String> {
    let mut fixed: Vec<String> = vec![
        SESSION_COOKIE.into(),
        SESSION_COOKIE_HOST.into(),
        "taler_paywall_".into(),
        "Taler_Paywall_Session".into(),
        "site".into(),
        "a".into(),
    ];
    for r in RESOURCES {
        fixed.push(format!("{ORDER_COOKIE_PREFIX}{}", resource_hash(r)));
        fixed.push(format!("{RETURN_COOKIE_PREFIX}{}", resource_hash(r)));
    }
    prop_oneof![select(fixed), "[A-Za-z0-9_!#$&'*+.^`|~-]{1,12}"]
}

/// A cookie-octet value (RFC 6265), sometimes quoted, sometimes with `|`-separated pieces
/// that look like the gateway's plaintext.
fn cookie_value() -> impl Strategy<Value = String> {
    prop_oneof![
        "[\\x21\\x23-\\x2b\\x2d-\\x3a\\x3c-\\x5b\\x5d-\\x7e]{0,60}",
        "(s1|o1|r1)\\|[A-Za-z0-9_-]{22}\\|[0-9]{1,10}",
        "\"[A-Za-z0-9+/=|]{0,60}\"",
        "[A-Za-z0-9+/]{43}=(s1|o1)%7C[A-Za-z0-9_-]{22}%7C[0-9]{1,10}",
    ]
}

fn cookie_pairs() -> impl Strategy<Value = Vec<(String, String)>> {
    prop::collection::vec((cookie_name(), cookie_value()), 0..8)
}

fn session_ids() -> Vec<SessionId> {
    vec![SessionId::generate(), SessionId::generate()]
}

/// Bytes that make a valid `HeaderValue` (visible ASCII, space, tab, obs-text).
fn header_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(
        prop_oneof![
            4 => 0x20u8..0x7f,
            1 => 0x80u8..=0xff,
            1 => Just(b'\t'),
            2 => select(b";=_|%".to_vec()),
        ],
        0..120,
    )
}

/// A small edit of a string.
#[derive(Debug, Clone)]
enum Edit {
    Replace(Index, char),
    Insert(Index, char),
    Delete(Index),
    Truncate(Index),
}

fn edit() -> impl Strategy<Value = Edit> {
    let c = select("AZaz09+/=|%_-.7C:".chars().collect::<Vec<_>>());
    prop_oneof![
        (any::<Index>(), c.clone()).prop_map(|(i, c)| Edit::Replace(i, c)),
        (any::<Index>(), c).prop_map(|(i, c)| Edit::Insert(i, c)),
        any::<Index>().prop_map(Edit::Delete),
        any::<Index>().prop_map(Edit::Truncate),
    ]
}

fn apply(s: &str, e: &Edit) -> String {
    let mut v: Vec<char> = s.chars().collect();
    match e {
        Edit::Replace(i, c) if !v.is_empty() => {
            let i = i.index(v.len());
            v[i] = *c;
        }
        Edit::Insert(i, c) => {
            let i = i.index(v.len() + 1);
            v.insert(i, *c);
        }
        Edit::Delete(i) if !v.is_empty() => {
            let i = i.index(v.len());
            v.remove(i);
        }
        Edit::Truncate(i) if !v.is_empty() => {
            let i = i.index(v.len());
            v.truncate(i);
        }
        _ => {}
    }
    v.into_iter().collect()
}

/// A cookie value as the gateway's signature check sees it: percent-decoded when the value
/// is valid percent-encoding, otherwise as is.
fn semantic(value: &str) -> String {
    percent_encoding::percent_decode_str(value.trim())
        .decode_utf8()
        .map(|c| c.into_owned())
        .unwrap_or_else(|_| value.to_owned())
}

fn secret() -> impl Strategy<Value = String> {
    "[ -~]{32,48}"
}

fn order_id() -> impl Strategy<Value = String> {
    "[A-Za-z0-9._~-]{1,40}"
}

proptest! {
    #![proptest_config(config(512))]

    /// Any bytes as a `Cookie` header: no panic, and nothing verifies.
    #[test]
    fn arbitrary_cookie_bytes_never_verify(a in header_bytes(), b in header_bytes()) {
        let mut h = HeaderMap::new();
        for bytes in [a, b] {
            if let Ok(v) = HeaderValue::from_bytes(&bytes) {
                h.append(COOKIE, v);
            }
        }
        let k = keys(SECRET_A);
        if let Some(what) = anything_verifies(&h, &k, &session_ids()) {
            return Err(TestCaseError::fail(format!("{h:?} verified as {what}")));
        }
        let mut stripped = h.clone();
        strip_gateway_cookies(&mut stripped);
    }

    /// Well-formed cookie lists with the gateway's names and look-alike values: nothing
    /// verifies without the signature.
    #[test]
    fn unsigned_gateway_cookies_never_verify(pairs in cookie_pairs(), split in any::<bool>()) {
        let pieces: Vec<String> = pairs.iter().map(|(n, v)| format!("{n}={v}")).collect();
        let h = if split {
            cookie_header(&pieces.iter().map(String::as_str).collect::<Vec<_>>())
        } else {
            cookie_header(&[pieces.join("; ").as_str()])
        };
        let k = keys(SECRET_A);
        if let Some(what) = anything_verifies(&h, &k, &session_ids()) {
            return Err(TestCaseError::fail(format!("{h:?} verified as {what}")));
        }
    }

    /// What `set_session`/`set_order`/`set_return_to` issue comes back verified when a browser
    /// returns it verbatim, under the same keys only.
    #[test]
    fn signed_cookies_round_trip_through_a_browser(
        issued_at in NOW - 3600..=NOW,
        oid in order_id(),
        verified in prop::option::of(1u64..u64::MAX),
        r in select(RESOURCES),
        target in "/[A-Za-z0-9%/|._-]{0,30}",
        secure in any::<bool>(),
    ) {
        let k = keys(SECRET_A);
        let st = settings(secure);
        let s = Session { id: SessionId::generate(), issued_at };
        let o = OrderCookie { order_id: oid, verified_at: verified };
        let sv = set_session(&k, &st, &s).expect("session cookie");
        let ov = set_order(&k, &st, &s.id, r, "/", &o).expect("order cookie");
        let rv = set_return_to(&k, &st, &s.id, r, "/", Some(&target)).expect("return cookie");
        let header = [echo(&sv), echo(&ov), echo(&rv)].join("; ");
        let headers = cookie_header(&[header.as_str()]);
        let jar = RequestCookies::parse(&headers);
        prop_assert_eq!(jar.session(&k, &st, NOW), Some(s.clone()), "{}", header);
        prop_assert_eq!(jar.order(&k, &s.id, r), Some(o), "{}", header);
        prop_assert_eq!(jar.return_to(&k, &s.id, r), Some(target), "{}", header);
    }

    /// A cookie signed under one secret never verifies under another.
    #[test]
    fn cookies_never_verify_under_another_secret(
        a in secret(),
        b in secret(),
        oid in order_id(),
        r in select(RESOURCES),
    ) {
        prop_assume!(a != b);
        let (ka, kb) = (keys(&a), keys(&b));
        let st = settings(false);
        let s = Session { id: SessionId::generate(), issued_at: NOW };
        let o = OrderCookie { order_id: oid, verified_at: Some(NOW) };
        let sv = set_session(&ka, &st, &s).expect("session cookie");
        let ov = set_order(&ka, &st, &s.id, r, "/", &o).expect("order cookie");
        let rv = set_return_to(&ka, &st, &s.id, r, "/", Some("/x")).expect("return cookie");
        let h = cookie_header(&[[echo(&sv), echo(&ov), echo(&rv)].join("; ").as_str()]);
        if let Some(what) = anything_verifies(&h, &kb, std::slice::from_ref(&s.id)) {
            return Err(TestCaseError::fail(format!("verified under another secret: {what}")));
        }
    }

    /// Cookies issued to session S1 never give S2 an order (or a return page), and no
    /// cookie's value verifies under another cookie's name.
    #[test]
    fn cookies_are_bound_to_their_session_and_purpose(
        oid in order_id(),
        r in select(RESOURCES),
        other in select(RESOURCES),
    ) {
        let k = keys(SECRET_A);
        let st = settings(false);
        let s1 = Session { id: SessionId::generate(), issued_at: NOW };
        let s2 = SessionId::generate();
        let o = OrderCookie { order_id: oid, verified_at: Some(NOW) };
        let sv = echo(&set_session(&k, &st, &s1).expect("session cookie"));
        let ov = echo(&set_order(&k, &st, &s1.id, r, "/", &o).expect("order cookie"));
        let rv = echo(&set_return_to(&k, &st, &s1.id, r, "/", Some("/x")).expect("return"));
        let h = cookie_header(&[[sv.clone(), ov.clone(), rv.clone()].join("; ").as_str()]);
        let jar = RequestCookies::parse(&h);
        prop_assert_eq!(jar.order(&k, &s2, r), None);
        prop_assert_eq!(jar.return_to(&k, &s2, r), None);
        if other != r {
            prop_assert_eq!(jar.order(&k, &s1.id, other), None);
            prop_assert_eq!(jar.return_to(&k, &s1.id, other), None);
        }
        // Each value under every other gateway name.
        let value = |pair: &str| pair.split_once('=').map(|(_, v)| v.to_owned()).unwrap_or_default();
        let names = [
            SESSION_COOKIE.to_owned(),
            format!("{ORDER_COOKIE_PREFIX}{}", resource_hash(r)),
            format!("{RETURN_COOKIE_PREFIX}{}", resource_hash(r)),
        ];
        for (i, v) in [value(&sv), value(&ov), value(&rv)].iter().enumerate() {
            for (j, n) in names.iter().enumerate() {
                if i == j {
                    continue;
                }
                let h = cookie_header(&[format!("{n}={v}").as_str()]);
                if let Some(what) = anything_verifies(&h, &k, &[s1.id.clone(), s2.clone()]) {
                    return Err(TestCaseError::fail(format!("value {i} under {n}: {what}")));
                }
            }
        }
    }

    /// Small edits of a valid signed value never verify, unless the edit does not change
    /// the value the signature check sees.
    #[test]
    fn mutated_signed_values_never_verify(
        edits in prop::collection::vec(edit(), 1..4),
        oid in order_id(),
        which in 0usize..3,
    ) {
        let k = keys(SECRET_A);
        let st = settings(false);
        let s = Session { id: SessionId::generate(), issued_at: NOW };
        let r = RESOURCES[0];
        let o = OrderCookie { order_id: oid, verified_at: Some(NOW) };
        let pair = echo(&match which {
            0 => set_session(&k, &st, &s),
            1 => set_order(&k, &st, &s.id, r, "/", &o),
            _ => set_return_to(&k, &st, &s.id, r, "/", Some("/premium/a%20b")),
        }.expect("cookie"));
        let (name, value) = pair.split_once('=').expect("name=value");
        let mut mutated = value.to_owned();
        for e in &edits {
            mutated = apply(&mutated, e);
        }
        prop_assume!(semantic(&mutated) != semantic(value));
        let h = cookie_header(&[format!("{name}={mutated}").as_str()]);
        if let Some(what) = anything_verifies(&h, &k, std::slice::from_ref(&s.id)) {
            return Err(TestCaseError::fail(format!("{value:?} edited to {mutated:?}: {what}")));
        }
    }

    /// Stripping leaves no gateway cookie and keeps every well-formed site cookie, in order.
    #[test]
    fn strip_removes_exactly_the_gateway_cookies(
        headers in prop::collection::vec(cookie_pairs(), 1..3),
    ) {
        let mut h = HeaderMap::new();
        let mut want: Vec<String> = Vec::new();
        for pairs in &headers {
            let pieces: Vec<String> = pairs.iter().map(|(n, v)| format!("{n}={v}")).collect();
            for ((n, _), p) in pairs.iter().zip(&pieces) {
                if !is_gateway_cookie(n) {
                    want.push(p.clone());
                }
            }
            if let Ok(v) = HeaderValue::from_str(&pieces.join("; ")) {
                h.append(COOKIE, v);
            }
        }
        strip_gateway_cookies(&mut h);
        let mut left: Vec<String> = Vec::new();
        for v in h.get_all(COOKIE) {
            let s = v.to_str().expect("stripped header is ASCII");
            for c in cookie::Cookie::split_parse(s).flatten() {
                prop_assert!(!is_gateway_cookie(c.name()), "left {} in {:?}", c.name(), s);
            }
            left.extend(s.split("; ").filter(|p| !p.is_empty()).map(str::to_owned));
        }
        prop_assert_eq!(left, want);
    }

    /// Stripping arbitrary `Cookie` bytes never leaves a gateway cookie behind.
    #[test]
    fn strip_never_leaves_a_gateway_cookie(
        a in header_bytes(),
        name in cookie_name(),
        b in header_bytes(),
    ) {
        let mut bytes = a.clone();
        bytes.extend_from_slice(format!("; {name}=v; ").as_bytes());
        bytes.extend_from_slice(&b);
        let mut h = HeaderMap::new();
        for bytes in [bytes, a] {
            if let Ok(v) = HeaderValue::from_bytes(&bytes) {
                h.append(COOKIE, v);
            }
        }
        strip_gateway_cookies(&mut h);
        for v in h.get_all(COOKIE) {
            for piece in v.as_bytes().split(|&c| c == b';') {
                let n = piece.split(|&c| c == b'=').next().unwrap_or(b"");
                let n = String::from_utf8_lossy(n);
                prop_assert!(!is_gateway_cookie(n.trim()), "left {:?} in {:?}", n, v);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Merchant answers
// ---------------------------------------------------------------------------------------------

/// A JSON value of a random type, as text.
fn any_json() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("null".to_owned()),
        any::<bool>().prop_map(|b| b.to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
        any::<f64>().prop_map(|f| serde_json::json!(f).to_string()),
        ".{0,12}".prop_map(|s| serde_json::json!(s).to_string()),
        Just("[]".to_owned()),
        Just("{}".to_owned()),
        Just("{\"t_s\":1}".to_owned()),
    ]
}

fn json_str(s: &str) -> String {
    serde_json::json!(s).to_string()
}

fn field(name: &'static str, values: Vec<&'static str>) -> impl Strategy<Value = Option<String>> {
    prop::option::weighted(
        0.8,
        prop_oneof![
            3 => select(values).prop_map(json_str),
            1 => any_json(),
        ],
    )
    .prop_map(move |v| v.map(|v| format!("{}:{v}", json_str(name))))
}

/// Objects with the status answer's fields, each missing, well-typed or of a random type,
/// sometimes duplicated, in random order, sometimes in array form.
fn status_json() -> impl Strategy<Value = String> {
    let status = prop::option::weighted(
        0.95,
        prop_oneof![
            4 => select(vec!["paid", "unpaid", "claimed", "PAID", "Paid", "", " paid", "paid\u{0}"])
                .prop_map(json_str),
            1 => any_json(),
            1 => ".{0,8}".prop_map(|s| json_str(&s)),
            1 => Just("\"pa\\u0069d\"".to_owned()),
        ],
    )
    .prop_map(|v| v.map(|v| format!("\"order_status\":{v}")));
    let refunded = prop::option::weighted(
        0.7,
        prop_oneof![
            2 => select(vec!["true", "false"]).prop_map(str::to_owned),
            1 => any_json(),
        ],
    )
    .prop_map(|v| v.map(|v| format!("\"refunded\":{v}")));
    (
        status,
        refunded,
        field(
            "refund_amount",
            vec![
                "KUDOS:0",
                "KUDOS:0.00000001",
                "KUDOS:1",
                "kudos:1",
                "",
                "KUDOS",
                "KUDOS:0.0",
            ],
        ),
        field("refund_pending", vec!["true"]),
        field("taler_pay_uri", vec!["taler://pay/x/y", "https://x/"]),
        field(
            "order_status_url",
            vec!["https://m.example/orders/1", "ftp://x"],
        ),
        field("already_paid_order_id", vec!["A-1"]),
        field(
            "already_paid_fulfillment_url",
            vec!["https://shop/premium/a"],
        ),
        prop::collection::vec(any::<Index>(), 0..3),
        any::<Index>(),
        0u8..8,
    )
        .prop_map(|(s, r, ra, rp, pu, su, apo, apf, dups, shuffle, shape)| {
            let mut fields: Vec<String> = [s, r, ra, rp, pu, su, apo, apf]
                .into_iter()
                .flatten()
                .collect();
            if !fields.is_empty() {
                for d in dups {
                    let f = fields[d.index(fields.len())].clone();
                    fields.push(f);
                }
                let n = shuffle.index(fields.len());
                fields.rotate_left(n);
            }
            match shape {
                0 => format!("[{}]", fields.join(",")),
                1 => format!(" \n{{{}}}\t", fields.join(",")),
                _ => format!("{{{}}}", fields.join(",")),
            }
        })
}

/// The array form of the answer (serde accepts structs as sequences).
fn status_array() -> impl Strategy<Value = String> {
    (
        select(vec!["\"paid\"", "\"unpaid\""]),
        select(vec!["true", "false", "null"]),
    )
        .prop_map(|(s, r)| format!("[{s},null,null,null,null,null,null,{r},null,null]"))
}

proptest! {
    #![proptest_config(config(2000))]

    /// Any bytes: no panic, Paid only for `"order_status": "paid"`.
    #[test]
    fn decode_status_on_arbitrary_bytes(body in prop::collection::vec(any::<u8>(), 0..200)) {
        if let Err(e) = oracle::check_status(&body) {
            return Err(TestCaseError::fail(e));
        }
        let _ = taler_paywall::merchant::decode_config(&body);
    }

    /// Structured-but-random answers: Paid only when the object says exactly "paid", and a
    /// declared refund is never lost.
    #[test]
    fn decode_status_on_structured_json(body in prop_oneof![4 => status_json(), 1 => status_array()]) {
        if let Err(e) = oracle::check_status(body.as_bytes()) {
            return Err(TestCaseError::fail(e));
        }
    }
}

/// A paid answer is recognised at all (the oracle above is not vacuous).
#[test]
fn decode_status_accepts_a_plain_paid_answer() {
    let body = br#"{"order_status":"paid","refunded":false,"refund_amount":"KUDOS:0.5"}"#;
    match taler_paywall::merchant::decode_status(body) {
        Ok(taler_paywall::payment::OrderStatus::Paid { refunded, .. }) => assert!(refunded),
        other => panic!("{other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Origin responses on the fast path (`src/origin_h1.rs`)
// ---------------------------------------------------------------------------------------------

mod origin_responses {
    use super::config;
    use bytes::BytesMut;
    use proptest::prelude::*;
    use taler_paywall::origin_h1::{parse_head, Scratch, Step};

    /// Feeds `wire` to the head parser and then the body decoder, `step` bytes at a time
    /// (cycling through the sizes); returns the body, whether its end was seen, and what was
    /// left unread. `None` if the head was refused or a decoding error came up.
    fn read(wire: &[u8], steps: &[usize]) -> Option<(Vec<u8>, bool, Vec<u8>)> {
        let mut buf = BytesMut::new();
        let mut fed = 0;
        let mut steps = steps.iter().cycle();
        let mut feed = |buf: &mut BytesMut| -> bool {
            if fed == wire.len() {
                return false;
            }
            let end = (fed + steps.next().copied().unwrap_or(1).max(1)).min(wire.len());
            buf.extend_from_slice(&wire[fed..end]);
            fed = end;
            true
        };
        let mut scratch = Scratch::default();
        let mut head = loop {
            match parse_head(&mut buf, false, &mut scratch) {
                Ok(Some(head)) if head.status.is_informational() => continue,
                Ok(Some(head)) => break head,
                Ok(None) => {
                    if !feed(&mut buf) {
                        return None;
                    }
                }
                Err(_) => return None,
            }
        };
        let mut body = Vec::new();
        loop {
            match head.body.decode(&mut buf) {
                Ok(Step::Data(d)) => body.extend_from_slice(&d),
                Ok(Step::End) => break,
                Ok(Step::NeedMore) => {
                    if !feed(&mut buf) {
                        let mut rest = buf.to_vec();
                        rest.extend_from_slice(&wire[fed..]);
                        return Some((body, false, rest));
                    }
                }
                Err(_) => return None,
            }
        }
        let mut rest = buf.to_vec();
        rest.extend_from_slice(&wire[fed..]);
        Some((body, true, rest))
    }

    /// A body chunked at the given sizes (0 ends the list early), with a chunk extension on
    /// every other chunk and optional trailers.
    fn chunked(body: &[u8], sizes: &[usize], trailers: bool) -> Vec<u8> {
        let mut out = Vec::new();
        let mut at = 0;
        let mut sizes = sizes.iter().cycle();
        let mut i = 0;
        while at < body.len() {
            let n = sizes.next().copied().unwrap_or(1).clamp(1, body.len() - at);
            out.extend_from_slice(format!("{n:x}").as_bytes());
            if i % 2 == 1 {
                out.extend_from_slice(b";ext=v");
            }
            out.extend_from_slice(b"\r\n");
            out.extend_from_slice(&body[at..at + n]);
            out.extend_from_slice(b"\r\n");
            at += n;
            i += 1;
        }
        out.extend_from_slice(b"0\r\n");
        if trailers {
            out.extend_from_slice(b"X-Trailer: t\r\n");
        }
        out.extend_from_slice(b"\r\n");
        out
    }

    proptest! {
        #![proptest_config(config(512))]

        /// A response framed by length or by chunks, with or without a `103` before it and
        /// with the next response's bytes after it, read in pieces of any sizes: the body comes
        /// out whole, its end is seen, and exactly the bytes after it are left unread (the
        /// pool would then close the connection instead of reusing it).
        #[test]
        fn framed_bodies_come_out_whole_at_any_split(
            body in proptest::collection::vec(any::<u8>(), 0..3000),
            sizes in proptest::collection::vec(1usize..700, 1..8),
            steps in proptest::collection::vec(1usize..1500, 1..8),
            use_chunks in any::<bool>(),
            trailers in any::<bool>(),
            hints in any::<bool>(),
            after in proptest::collection::vec(any::<u8>(), 0..40),
        ) {
            let mut wire = Vec::new();
            if hints {
                wire.extend_from_slice(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n");
            }
            if use_chunks {
                wire.extend_from_slice(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n");
                wire.extend(chunked(&body, &sizes, trailers));
            } else {
                wire.extend_from_slice(
                    format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len()).as_bytes(),
                );
                wire.extend_from_slice(&body);
            }
            wire.extend_from_slice(&after);
            let (got, ended, rest) = read(&wire, &steps).expect("a well-formed response is read");
            prop_assert!(ended);
            prop_assert_eq!(got, body);
            prop_assert_eq!(rest, after);
        }

        /// Any bytes from the origin: no panic, and never more body than bytes received.
        #[test]
        fn arbitrary_origin_bytes_never_panic(
            prefix in proptest::sample::select(vec![
                &b""[..],
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n",
                b"HTTP/1.0 200 OK\r\n\r\n",
            ]),
            noise in proptest::collection::vec(any::<u8>(), 0..600),
            steps in proptest::collection::vec(1usize..200, 1..4),
        ) {
            let mut wire = prefix.to_vec();
            wire.extend_from_slice(&noise);
            if let Some((body, _, _)) = read(&wire, &steps) {
                prop_assert!(body.len() <= noise.len());
            }
        }
    }
}
