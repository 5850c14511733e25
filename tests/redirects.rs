//! Redirects and cookies (pitfalls 14–17 of `shared/spec/proxy-pitfalls.md`).
//!
//! Every redirect the gateway builds itself (the cookie check, repurchase detection, the
//! prefix-scope return to the page asked for) must target the gateway's own `public_url`; the
//! only other `Location` it may send is the `order_status_url` the merchant backend gave, and
//! only when that is a usable http(s) URL. Payloads come from the request (path, query, `Host`,
//! absolute-form targets), from a malicious merchant backend (a scripted [`FakeMerchant`]) and
//! from forged cookies signed with the test secret.
//!
//! The session half: a session id the gateway did not sign is never sent to the merchant;
//! cookies of one secret are worthless under another; rotation with `previous_secrets`
//! accepts old cookies and signs new ones with the newest secret.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, HeaderValue, Method, StatusCode};
use serde_json::json;
use tokio::net::TcpListener;

use support::{
    bounded, buy_api, query_param, raw_exchange, raw_status, shop_config, shop_config_with_session,
    start_gateway_on, FakeMerchant, Jar, MerchantAnswer, SandboxShop, TestOrigin, TestResponse,
    SHOP_SECRET,
};
use taler_paywall::config::{Secret, SessionConfig};
use taler_paywall::session::{self, CookieKeys, CookieSettings, RequestCookies, SessionId};

const NO_LIMIT: &str = "[limits]\norders_per_minute = 0\n";

fn keys(secret: &str) -> CookieKeys {
    CookieKeys::new(&SessionConfig {
        secret: Secret::new(secret),
        previous_secrets: vec![],
        recheck_interval: Duration::from_secs(300),
        cookie_lifetime: Duration::from_secs(30 * 86400),
    })
}

fn settings() -> CookieSettings {
    CookieSettings {
        secure: false,
        path_base: String::new(),
        lifetime: 30 * 86400,
    }
}

fn now() -> u64 {
    taler_paywall::flow::unix_now()
}

/// The session a jar's cookies hold, verified with `secret`.
fn session_of(jar: &Jar, secret: &str) -> Option<SessionId> {
    let mut h = HeaderMap::new();
    h.insert("cookie", HeaderValue::from_str(&jar.cookie_header()).ok()?);
    RequestCookies::parse(&h)
        .session(&keys(secret), &settings(), now())
        .map(|s| s.id)
}

/// The `Location` of a raw response, if any.
fn raw_location(r: &str) -> Option<String> {
    let head = r.split("\r\n\r\n").next()?;
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("location")
            .then(|| v.trim().to_owned())
    })
}

/// Asserts that `location` is on the gateway's own base (scheme, host and port, no userinfo).
fn assert_own(location: &str, addr: SocketAddr, context: &str) {
    let base = format!("http://{addr}/");
    assert!(
        location.starts_with(&base),
        "{context}: Location {location:?}"
    );
    let u = url::Url::parse(location).unwrap_or_else(|e| panic!("{context}: {location:?}: {e}"));
    assert_eq!(u.host_str(), Some("127.0.0.1"), "{context}: {location:?}");
    assert_eq!(u.port(), Some(addr.port()), "{context}: {location:?}");
    assert!(
        u.username().is_empty() && u.password().is_none(),
        "{context}"
    );
    assert!(
        !location.contains('\r') && !location.contains('\n'),
        "{context}"
    );
}

/// A response head must not have grown headers from request data.
fn assert_no_injection(r: &str, context: &str) {
    let head = r
        .split("\r\n\r\n")
        .next()
        .unwrap_or("")
        .to_ascii_lowercase();
    for line in head.lines() {
        assert!(
            !line.starts_with("set-cookie: injected") && !line.contains(": injected"),
            "{context}: {head}"
        );
    }
    assert!(
        head.lines().filter(|l| l.starts_with("location:")).count() <= 1,
        "{context}: {head}"
    );
}

/// Open-redirect payloads in the path, the query, `Host` and absolute-form targets: the
/// cookie-check redirect only ever points at `public_url`; with a session, the only other
/// target is the merchant's status page. Nothing is injected into the response head.
#[tokio::test]
async fn gateway_redirects_only_target_the_public_url() {
    bounded(async {
        let shop = SandboxShop::start("300s", NO_LIMIT).await;
        let payloads = [
            "//evil.example/premium/x",
            "///evil.example/premium/x",
            "/\\evil.example/premium",
            "/%5Cevil.example/premium",
            "/%2F%2Fevil.example/premium/x",
            "/premium//evil.example",
            "/premium/%2F%2Fevil.example",
            "/premium/x?next=//evil.example",
            "/premium/x?next=https://evil.example/",
            "/premium/x?@evil.example",
            "/premium/x?\\evil.example",
            "/premium/%09/evil.example",
            "/premium/%20/evil.example",
            "/premium/x%0d%0aSet-Cookie:%20injected=1",
            "/premium/x?a=%0d%0aSet-Cookie:%20injected=1",
            "/premium/x?%0d%0aLocation:%20https://evil.example",
            "/premium/.%2e/evil",
            "/premium/%E2%80%AEevil",
            "/articles/x?taler_paywall_cc=1&next=//evil",
            "http://evil.example/premium/x",
            "https://evil.example//premium/x",
            "http://evil.example@127.0.0.1/premium/x",
        ];
        let mut redirects = 0;
        for target in payloads {
            for host in ["g", "evil.example", "evil.example:80"] {
                let extra = "Accept: text/html\r\n";
                let req = format!(
                    "GET {target} HTTP/1.1\r\nHost: {host}\r\n{extra}Connection: close\r\n\r\n"
                );
                let r = raw_exchange(shop.addr, req.as_bytes(), Duration::from_secs(5)).await;
                let ctx = format!("{target} Host {host}");
                assert_no_injection(&r, &ctx);
                let status = raw_status(&r);
                assert!(matches!(status, Some(302 | 400 | 403 | 200)), "{ctx}: {r}");
                if let Some(loc) = raw_location(&r) {
                    redirects += 1;
                    assert_own(&loc, shop.addr, &ctx);
                    assert!(loc.contains("taler_paywall_cc=1"), "{ctx}: {loc}");
                }
            }
        }
        assert!(
            redirects >= 30,
            "the payloads must exercise the redirect: {redirects}"
        );
        // With a session: the only other target is the sandbox's status page.
        let mut b = Jar::html();
        let r = b.get(&shop.url("/premium/start")).await;
        assert_own(r.header("location").unwrap(), shop.addr, "cookie check");
        let merchant = shop.sandbox.base_url().to_string();
        for target in payloads {
            let req = format!(
                "GET {target} HTTP/1.1\r\nHost: evil.example\r\nAccept: text/html\r\n\
                 Cookie: {}\r\nConnection: close\r\n\r\n",
                b.cookie_header()
            );
            let r = raw_exchange(shop.addr, req.as_bytes(), Duration::from_secs(5)).await;
            assert_no_injection(&r, target);
            if let Some(loc) = raw_location(&r) {
                assert!(
                    loc.starts_with(&format!("{merchant}orders/")),
                    "{target}: Location {loc:?}"
                );
            }
        }
        assert!(
            shop.protected_hits().is_empty(),
            "{:?}",
            shop.protected_hits()
        );
        shop.shutdown().await;
    })
    .await;
}

/// A gateway in front of a scripted merchant, reachable at `http://addr`.
struct Rigged {
    merchant: FakeMerchant,
    origin: TestOrigin,
    addr: SocketAddr,
    gateway: taler_paywall::gateway::RunningGateway,
}

async fn rigged(answer: MerchantAnswer) -> Rigged {
    let merchant = FakeMerchant::start(answer).await;
    let origin = TestOrigin::echo().await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let text = shop_config(addr, &origin.url(), &merchant.url(), "300s", NO_LIMIT);
    let gateway = start_gateway_on(&text, listener).await;
    Rigged {
        merchant,
        origin,
        addr,
        gateway,
    }
}

/// A merchant that creates order `o1` and reports it unpaid with the given extra fields.
fn unpaid_with(fields: serde_json::Value) -> MerchantAnswer {
    Arc::new(move |method: &Method, target: &str| {
        if method == Method::POST && target.ends_with("private/orders") {
            return (200, json!({"order_id": "o1", "token": "t"}).to_string());
        }
        if target.contains("private/orders/") {
            let mut v = json!({
                "order_status": "unpaid",
                "taler_pay_uri": "taler://pay/pay.example/o1/s",
                "order_status_url": "https://pay.example/orders/o1",
            });
            if let (Some(obj), Some(extra)) = (v.as_object_mut(), fields.as_object()) {
                for (k, val) in extra {
                    obj.insert(k.clone(), val.clone());
                }
            }
            return (200, v.to_string());
        }
        (404, json!({"code": 0}).to_string())
    })
}

/// A browser that has passed the cookie check at `addr`, then asks for `path`.
async fn browser_visit(addr: SocketAddr, path: &str) -> (Jar, TestResponse) {
    let mut b = Jar::html();
    let url = format!("http://{addr}{path}");
    let r = b.get(&url).await;
    assert_eq!(r.status, StatusCode::FOUND);
    assert_own(r.header("location").unwrap(), addr, "cookie check");
    let r = b.get(r.header("location").unwrap()).await;
    (b, r)
}

/// A malicious merchant's `order_status_url`: unusable values (CR/LF, `javascript:`,
/// relative, other schemes) fail closed with 502 and no `Location`; a valid http(s) URL is the
/// merchant's to choose and is passed on byte for byte.
#[tokio::test]
async fn unusable_status_urls_from_the_merchant_fail_closed() {
    bounded(async {
        let rig = rigged(unpaid_with(json!({}))).await;
        for bad in [
            "javascript:alert(1)",
            "JaVaScRiPt:alert(1)",
            "data:text/html,<script>alert(1)</script>",
            "/orders/o1",
            "orders/o1",
            "//evil.example/orders/o1",
            "ftp://pay.example/orders/o1",
            "https://pay.example/orders/o1\r\nSet-Cookie: injected=1",
            "https://pay.example/orders/o1\nLocation: https://evil.example/",
            "https://pay.example/orders/o1\u{0}",
            "",
            "https://",
            "http://[::1/x",
        ] {
            rig.merchant
                .set_answer(unpaid_with(json!({ "order_status_url": bad })));
            let (_, r) = browser_visit(rig.addr, "/articles/a").await;
            assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{bad:?}: {}", r.text());
            assert!(r.header("location").is_none(), "{bad:?}");
            assert_eq!(r.header("cache-control"), Some("no-store"));
            assert!(!r.text().contains("injected"), "{bad:?}");
            let r = Jar::api()
                .get(&format!("http://{}/articles/a", rig.addr))
                .await;
            assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{bad:?}");
            assert!(!r.text().contains("javascript"), "{bad:?}");
        }
        // A usable URL, even on another host, is the merchant's page: passed on exactly.
        let theirs = "https://evil.example/orders/o1?x=1";
        rig.merchant
            .set_answer(unpaid_with(json!({ "order_status_url": theirs })));
        let (_, r) = browser_visit(rig.addr, "/articles/a").await;
        assert_eq!(r.status, StatusCode::FOUND);
        assert_eq!(r.header("location"), Some(theirs));
        assert_eq!(rig.origin.count(), 0);
        rig.gateway.shutdown().await.unwrap();
    })
    .await;
}

/// Repurchase detection follows `already_paid_fulfillment_url` only when it is this
/// resource's own fulfillment URL exactly; anything else (another site, another page of ours,
/// userinfo tricks, CR/LF) is treated as plain unpaid: the status page, never the value.
#[tokio::test]
async fn repurchase_redirect_only_goes_to_our_own_fulfillment_url() {
    bounded(async {
        let rig = rigged(unpaid_with(json!({}))).await;
        let own = format!("http://{}/articles/a", rig.addr);
        let addr = rig.addr;
        for bad in [
            "https://evil.example/articles/a".to_owned(),
            format!("http://{addr}/articles/a/../../evil"),
            format!("http://{addr}@evil.example/articles/a"),
            format!("http://{addr}.evil.example/articles/a"),
            "//evil.example/articles/a".to_owned(),
            format!("http://{addr}/articles/a\r\nSet-Cookie: injected=1"),
            format!("http://{addr}/articles/b"),
            format!("http://{addr}/ARTICLES/a"),
            format!("http://{addr}/articles/a?x=1"),
            format!("http://{addr}/articles/a/"),
            format!("https://{addr}/articles/a"),
            format!(" {own}"),
            "javascript:alert(1)".to_owned(),
        ] {
            rig.merchant.set_answer(unpaid_with(json!({
                "already_paid_order_id": "o0",
                "already_paid_fulfillment_url": bad,
            })));
            let (_, r) = browser_visit(rig.addr, "/articles/a").await;
            assert_eq!(r.status, StatusCode::FOUND, "{bad:?}: {}", r.text());
            assert_eq!(
                r.header("location"),
                Some("https://pay.example/orders/o1"),
                "{bad:?}"
            );
        }
        // An invalid old order id is ignored as well.
        rig.merchant.set_answer(unpaid_with(json!({
            "already_paid_order_id": "../../o0",
            "already_paid_fulfillment_url": own,
        })));
        let (_, r) = browser_visit(rig.addr, "/articles/a").await;
        assert_eq!(r.header("location"), Some("https://pay.example/orders/o1"));
        // Our own URL exactly: followed, to our own base.
        rig.merchant.set_answer(unpaid_with(json!({
            "already_paid_order_id": "o0",
            "already_paid_fulfillment_url": own,
        })));
        let (_, r) = browser_visit(rig.addr, "/articles/a").await;
        assert_eq!(r.status, StatusCode::FOUND);
        assert_eq!(r.header("location"), Some(own.as_str()));
        assert_eq!(r.header("cache-control"), Some("no-store"));
        assert_eq!(rig.origin.count(), 0);
        rig.gateway.shutdown().await.unwrap();
    })
    .await;
}

/// A forged return-to cookie (signed with the right secret, so only the gateway's own checks
/// stand in the way) pointing off-site or outside the prefix is not followed: the paid prefix
/// is served instead and the cookie cleared. A genuine target under the prefix is followed, to
/// the gateway's own base.
#[tokio::test]
async fn forged_return_to_cookies_are_not_followed() {
    bounded(async {
        let shop = SandboxShop::start("300s", NO_LIMIT).await;
        let (mut c, _) = buy_api(shop.addr, &shop.sandbox.base_url(), "/premium/").await;
        let sid = session_of(&c, SHOP_SECRET).expect("session");
        let forge = |c: &mut Jar, keys: &CookieKeys, sid: &SessionId, target: &str| {
            let v = session::set_return_to(
                keys,
                &settings(),
                sid,
                "/premium/",
                "/premium",
                Some(target),
            )
            .expect("cookie");
            let mut h = HeaderMap::new();
            h.insert("set-cookie", v);
            c.store(&h);
        };
        let ours = keys(SHOP_SECRET);
        for target in [
            "https://evil.example/premium/x",
            "//evil.example/premium/x",
            "/\\evil.example/premium",
            "/free/x",
            "/premium/../free/x",
            "/premium/%2e%2e/free",
            "/premium/x\r\nSet-Cookie: injected=1",
            "/premium/",
            "premium/x",
            "/premiumx/y",
            "/premium//evil.example",
            "/premium/./x",
            "",
        ] {
            forge(&mut c, &ours, &sid, target);
            let r = c.get(&shop.url("/premium/")).await;
            assert_eq!(r.status, StatusCode::OK, "{target:?}: {}", r.text());
            assert!(r.header("location").is_none(), "{target:?}");
            assert!(
                !c.cookies
                    .keys()
                    .any(|k| k.starts_with(session::RETURN_COOKIE_PREFIX)),
                "{target:?}: the return-to cookie is cleared"
            );
        }
        // Odd but ours: the prefix without its slash, another spelling of it. If followed,
        // the target is on our base and under the prefix.
        for target in ["/premium", "/PREMIUM/x", "/premium/a%20b"] {
            forge(&mut c, &ours, &sid, target);
            let r = c.get(&shop.url("/premium/")).await;
            match r.status {
                StatusCode::OK => {}
                StatusCode::SEE_OTHER => {
                    let loc = r.header("location").unwrap();
                    assert_own(loc, shop.addr, target);
                    assert_eq!(loc, shop.url(target));
                }
                other => panic!("{target}: {other}"),
            }
        }
        // Signed with another secret, or bound to another session: ignored.
        forge(
            &mut c,
            &keys("some-other-secret-0123456789abcdefghij"),
            &sid,
            "/premium/deep",
        );
        let r = c.get(&shop.url("/premium/")).await;
        assert_eq!(r.status, StatusCode::OK);
        forge(&mut c, &ours, &SessionId::generate(), "/premium/deep");
        let r = c.get(&shop.url("/premium/")).await;
        assert_eq!(r.status, StatusCode::OK);
        c.cookies
            .retain(|k, _| !k.starts_with(session::RETURN_COOKIE_PREFIX));
        // Genuine: followed with 303 to our own URL.
        forge(&mut c, &ours, &sid, "/premium/deep/page.html");
        let r = c.get(&shop.url("/premium/")).await;
        assert_eq!(r.status, StatusCode::SEE_OTHER);
        let loc = r.header("location").unwrap();
        assert_own(loc, shop.addr, "return-to");
        assert_eq!(loc, shop.url("/premium/deep/page.html"));
        assert_eq!(r.header("cache-control"), Some("no-store"));
        shop.shutdown().await;
    })
    .await;
}

/// A merchant that records session ids and reports every order unpaid.
fn recording_unpaid() -> MerchantAnswer {
    unpaid_with(json!({}))
}

/// Session ids the gateway did not sign (unsigned, signed with another secret, expired,
/// from the future, offered in the query) are never sent to the merchant; every session id
/// the merchant sees is one the gateway issued in a `Set-Cookie`.
#[tokio::test]
async fn unsigned_session_ids_never_reach_the_merchant() {
    bounded(async {
        let rig = rigged(recording_unpaid()).await;
        let url = format!(
            "http://{}/articles/s?session_id=DDDDDDDDDDDDDDDDDDDDDD",
            rig.addr
        );
        let other = keys("some-other-secret-0123456789abcdefghij");
        let ours = keys(SHOP_SECRET);
        let mut offered: Vec<(String, String)> = vec![
            (
                "plain".into(),
                format!("s1|AAAAAAAAAAAAAAAAAAAAAA|{}", now()),
            ),
            ("garbage".into(), "BBBBBBBBBBBBBBBBBBBBBB".into()),
        ];
        // Genuine cookies of another gateway secret, and of ours but expired or future-dated.
        for (label, k, issued) in [
            ("other-secret", &other, now()),
            ("expired", &ours, now() - 31 * 86400),
            ("future", &ours, now() + 3600),
        ] {
            let s = session::Session {
                id: SessionId::generate(),
                issued_at: issued,
            };
            let v = session::set_session(k, &settings(), &s).expect("cookie");
            let c = cookie::Cookie::parse(v.to_str().unwrap().to_owned()).unwrap();
            offered.push((format!("{label}:{}", s.id.as_str()), c.value().to_owned()));
        }
        let mut issued = Vec::new();
        for (label, value) in &offered {
            for html in [false, true] {
                let mut c = if html { Jar::html() } else { Jar::api() };
                c.cookies
                    .insert(session::SESSION_COOKIE.to_owned(), value.clone());
                let r = c.get(&url).await;
                assert!(
                    matches!(r.status, StatusCode::PAYMENT_REQUIRED | StatusCode::FOUND),
                    "{label}: {}",
                    r.status
                );
                // The forged cookie was replaced by one the gateway signed.
                let id = session_of(&c, SHOP_SECRET).expect("a fresh signed session");
                issued.push(id.as_str().to_owned());
                if html {
                    let r = c.get(r.header("location").unwrap()).await;
                    assert_eq!(r.status, StatusCode::FOUND, "{label}");
                }
            }
        }
        let sent = rig.merchant.session_ids();
        assert!(!sent.is_empty());
        for s in &sent {
            assert!(
                issued.contains(s),
                "merchant got a session id the gateway never issued: {s}"
            );
            assert!(!s.starts_with("AAAA") && !s.starts_with("DDDD"), "{s}");
            for (label, _) in &offered {
                if let Some((_, id)) = label.split_once(':') {
                    assert_ne!(s, id, "{label} reached the merchant");
                }
            }
        }
        assert_eq!(rig.origin.count(), 0);
        rig.gateway.shutdown().await.unwrap();
    })
    .await;
}

/// Starts a second gateway in front of `shop`'s origin and sandbox with its own `[session]`.
async fn replica(
    shop: &SandboxShop,
    session_lines: &str,
) -> (SocketAddr, taler_paywall::gateway::RunningGateway) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let text = shop_config_with_session(
        addr,
        &shop.origin.url(),
        shop.sandbox.base_url().as_str(),
        session_lines,
        NO_LIMIT,
    );
    (addr, start_gateway_on(&text, listener).await)
}

const NEW_SECRET: &str = "the-rotated-secret-0123456789abcdefghijkl";

/// Cookies of one secret are rejected by a gateway with another: a fresh session, a new order
/// under that session, no origin content. Rotation: with the old secret in
/// `previous_secrets`, old cookies still open the page; everything newly issued is signed with
/// the newest secret only; once the old secret is dropped, old cookies are worthless.
#[tokio::test]
async fn secrets_isolate_gateways_and_rotate() {
    bounded(async {
        let shop = SandboxShop::start("300s", NO_LIMIT).await;
        let (paid, old_session) = buy_api(shop.addr, &shop.sandbox.base_url(), "/articles/r").await;
        let hits = shop.protected_hits().len();

        // Another secret: nothing of the paid client's cookies counts.
        let (other, other_gw) = replica(&shop, &format!("secret = \"{NEW_SECRET}\"")).await;
        let mut c = paid.clone();
        let r = c.get(&format!("http://{other}/articles/r")).await;
        assert_eq!(r.status, StatusCode::PAYMENT_REQUIRED, "{}", r.text());
        let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        let sent = query_param(body["order_status_url"].as_str().unwrap(), "session_id").unwrap();
        assert_ne!(sent, old_session);
        assert!(
            session_of(&c, NEW_SECRET).is_some(),
            "a fresh session of the other secret"
        );
        assert_eq!(shop.protected_hits().len(), hits);

        // Rotation: new secret first, the old one still accepted. The grant is honoured
        // without asking the merchant.
        let (rot, rot_gw) = replica(
            &shop,
            &format!(
                "secret = \"{NEW_SECRET}\"\nprevious_secrets = [\"{SHOP_SECRET}\"]\n\
                 recheck_interval = \"300s\""
            ),
        )
        .await;
        let calls = shop.sandbox.calls().get_order;
        let mut c = paid.clone();
        let r = c.get(&format!("http://{rot}/articles/r")).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        assert_eq!(shop.sandbox.calls().get_order, calls, "grant used");
        assert_eq!(shop.protected_hits().len(), hits + 1);
        // A fresh client there gets a session signed with the new secret only.
        let mut fresh = Jar::api();
        let r = fresh.get(&format!("http://{rot}/articles/r")).await;
        assert_eq!(r.status, StatusCode::PAYMENT_REQUIRED);
        assert!(session_of(&fresh, NEW_SECRET).is_some());
        assert!(session_of(&fresh, SHOP_SECRET).is_none());
        // A re-check on the rotated gateway re-signs the order cookie with the new secret.
        let (rot0, rot0_gw) = replica(
            &shop,
            &format!(
                "secret = \"{NEW_SECRET}\"\nprevious_secrets = [\"{SHOP_SECRET}\"]\n\
                 recheck_interval = \"0s\""
            ),
        )
        .await;
        let mut c = paid.clone();
        let r = c.get(&format!("http://{rot0}/articles/r")).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        let order_cookies: Vec<String> = r
            .headers
            .get_all("set-cookie")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .filter(|v| v.starts_with(session::ORDER_COOKIE_PREFIX))
            .map(|v| v.split(';').next().unwrap().to_owned())
            .collect();
        assert_eq!(order_cookies.len(), 1, "{:?}", r.headers);
        let sid = session_of(&paid, SHOP_SECRET).unwrap();
        let mut h = HeaderMap::new();
        h.insert("cookie", HeaderValue::from_str(&order_cookies[0]).unwrap());
        let jar = RequestCookies::parse(&h);
        assert!(jar.order(&keys(NEW_SECRET), &sid, "/articles/r").is_some());
        assert!(jar.order(&keys(SHOP_SECRET), &sid, "/articles/r").is_none());

        // The old secret dropped: the old cookies are worthless.
        let (dropped, dropped_gw) = replica(&shop, &format!("secret = \"{NEW_SECRET}\"")).await;
        let before = shop.protected_hits().len();
        let mut c = paid.clone();
        let r = c.get(&format!("http://{dropped}/articles/r")).await;
        assert_eq!(r.status, StatusCode::PAYMENT_REQUIRED);
        assert_eq!(shop.protected_hits().len(), before);

        for gw in [other_gw, rot_gw, rot0_gw, dropped_gw] {
            gw.shutdown().await.unwrap();
        }
        shop.shutdown().await;
    })
    .await;
}
