//! Raw bytes as one or two `Cookie` headers (split at the first 0x00, which no header value
//! may contain): parsing never panics, nothing verifies under the target's keys (seeds are
//! signed under another secret, so mutations reach the signature check), and stripping
//! never leaves a gateway cookie behind.
#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use http::header::COOKIE;
use http::{HeaderMap, HeaderValue};
use libfuzzer_sys::fuzz_target;
use taler_paywall::config::{Secret, SessionConfig};
use taler_paywall::session::{
    is_gateway_cookie, strip_gateway_cookies, CookieKeys, CookieSettings, RequestCookies, SessionId,
};

const RESOURCES: &[&str] = &["/premium/a", "/premium/", "/docs/paid/x%20y", "/"];

struct Fixture {
    keys: CookieKeys,
    sessions: Vec<SessionId>,
}

static FIXTURE: OnceLock<Fixture> = OnceLock::new();

fn fixture() -> &'static Fixture {
    FIXTURE.get_or_init(|| Fixture {
        keys: CookieKeys::new(&SessionConfig {
            secret: Secret::new("the fuzz target's secret, never used to sign a seed"),
            previous_secrets: vec![Secret::new("and a previous one, for rotation paths")],
            recheck_interval: Duration::from_secs(300),
            cookie_lifetime: Duration::from_secs(3600),
        }),
        sessions: vec![SessionId::generate(), SessionId::generate()],
    })
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    let mut headers = HeaderMap::new();
    for part in data.splitn(2, |&b| b == 0) {
        if let Ok(v) = HeaderValue::from_bytes(part) {
            headers.append(COOKIE, v);
        }
    }
    let jar = RequestCookies::parse(&headers);
    for secure in [false, true] {
        let settings = CookieSettings {
            secure,
            path_base: String::new(),
            lifetime: 3600,
        };
        for now in [0, 1_000, 1_700_000_000] {
            if let Some(s) = jar.session(&f.keys, &settings, now) {
                panic!("forged session {s:?} from {headers:?}");
            }
        }
    }
    for s in &f.sessions {
        for r in RESOURCES {
            if let Some(o) = jar.order(&f.keys, s, r) {
                panic!("forged order {o:?} from {headers:?}");
            }
            if let Some(t) = jar.return_to(&f.keys, s, r) {
                panic!("forged return_to {t:?} from {headers:?}");
            }
        }
    }
    strip_gateway_cookies(&mut headers);
    for v in headers.get_all(COOKIE) {
        for piece in v.as_bytes().split(|&c| c == b';') {
            let name = piece.split(|&c| c == b'=').next().unwrap_or(b"");
            let name = String::from_utf8_lossy(name);
            assert!(
                !is_gateway_cookie(name.trim()),
                "{name:?} left in {v:?} after stripping"
            );
        }
    }
});
