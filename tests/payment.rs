//! End-to-end tests of the payment flow: the real gateway, the sandbox merchant backend and a
//! recording origin, all on 127.0.0.1 with ephemeral ports. Each scenario names the row of the
//! conformance table in `shared/spec/taler-protocol.md` §(f) it covers, and asserts that the
//! origin never saw a protected request that was not paid.

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use http_body_util::Full;
use serde_json::{json, Value};
use tokio::net::TcpListener;

use support::{bounded, client, send, TestOrigin, TestResponse};
use taler_paywall::config::{Config, NoEnv};
use taler_paywall::gateway::RunningGateway;
use taler_paywall::sandbox::{Fault, Sandbox, SandboxOptions};

const SECRET: &str = "payment-tests-secret-0123456789abcdef";

/// A shop: origin, sandbox merchant, gateway in front.
struct Shop {
    origin: TestOrigin,
    sandbox: Sandbox,
    gateway: Option<RunningGateway>,
    addr: SocketAddr,
}

/// How a test shop differs from the default one.
struct ShopSetup {
    recheck: &'static str,
    merchant_url: Option<String>,
    extra: &'static str,
}

impl Default for ShopSetup {
    fn default() -> Self {
        ShopSetup {
            recheck: "300s",
            merchant_url: None,
            // The per-address order limit has its own test; here every client is 127.0.0.1.
            extra: "[limits]\norders_per_minute = 0\n",
        }
    }
}

impl Shop {
    async fn start() -> Shop {
        Self::start_with(ShopSetup::default()).await
    }

    async fn start_with(setup: ShopSetup) -> Shop {
        let origin = TestOrigin::echo().await;
        let opts = SandboxOptions::default();
        let token = opts.token.clone();
        let sandbox = Sandbox::start(TcpListener::bind("127.0.0.1:0").await.unwrap(), opts)
            .await
            .expect("sandbox starts");
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let merchant = setup
            .merchant_url
            .clone()
            .unwrap_or_else(|| sandbox.base_url().to_string());
        let text = format!(
            r#"[server]
listen = "{addr}"
public_url = "http://{addr}"

[origin]
url = "{origin}"

[merchant]
url = "{merchant}"
token = "{token}"
timeout = "2s"
refund_delay = "1h"

[session]
secret = "{SECRET}"
recheck_interval = "{recheck}"

[[protect]]
prefix = "/articles/"
price = "KUDOS:0.5"
summary = "Article"
scope = "page"

[[protect]]
prefix = "/premium/"
price = "KUDOS:2"
summary = "Premium"
scope = "prefix"
{extra}
"#,
            origin = origin.url(),
            recheck = setup.recheck,
            extra = setup.extra,
        );
        let config = Config::from_toml_str(&text, std::path::Path::new("shop.toml"), &NoEnv)
            .unwrap_or_else(|e| panic!("config: {e}\n{text}"));
        let gateway = taler_paywall::gateway::spawn(config, listener)
            .await
            .expect("gateway starts");
        Shop {
            origin,
            sandbox,
            gateway: Some(gateway),
            addr,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Origin requests for paths under a protected prefix.
    fn protected_origin_hits(&self) -> Vec<String> {
        self.origin
            .requests()
            .into_iter()
            .map(|r| r.target)
            .filter(|t| t.starts_with("/articles/") || t.starts_with("/premium"))
            .collect()
    }

    async fn merchant_post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        let url = format!("{}{}", self.sandbox.base_url(), path);
        let req = http::Request::post(url)
            .header("content-type", "application/json")
            .header("authorization", "Bearer secret-token:sandbox")
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap();
        let r = send(&client(), req).await;
        (
            r.status,
            serde_json::from_slice(&r.body).unwrap_or(Value::Null),
        )
    }

    async fn pay(&self, order_id: &str, session_id: &str) -> String {
        let (status, body) = self
            .merchant_post(
                "sandbox/pay",
                json!({"order_id": order_id, "session_id": session_id}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "sandbox/pay: {body}");
        body["paid_order_id"].as_str().unwrap().to_owned()
    }

    async fn shutdown(mut self) {
        if let Some(g) = self.gateway.take() {
            g.shutdown().await.unwrap();
        }
        self.sandbox.shutdown().await;
    }
}

/// A client with a cookie jar that honours `Path` and `Max-Age=0`, like a browser.
#[derive(Default, Clone)]
struct Browser {
    jar: BTreeMap<(String, String), String>,
    html: bool,
}

fn path_matches(cookie_path: &str, request_path: &str) -> bool {
    request_path == cookie_path
        || (request_path.starts_with(cookie_path)
            && (cookie_path.ends_with('/') || request_path[cookie_path.len()..].starts_with('/')))
}

impl Browser {
    fn html() -> Self {
        Browser {
            html: true,
            ..Default::default()
        }
    }

    fn api() -> Self {
        Browser::default()
    }

    fn cookie_header(&self, path: &str) -> String {
        self.jar
            .iter()
            .filter(|((_, p), _)| path_matches(p, path))
            .map(|((n, _), v)| format!("{n}={v}"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    fn store(&mut self, headers: &HeaderMap) {
        for v in headers.get_all("set-cookie") {
            let c = cookie::Cookie::parse(v.to_str().unwrap().to_owned()).unwrap();
            let key = (c.name().to_owned(), c.path().unwrap_or("/").to_owned());
            if c.max_age() == Some(cookie::time::Duration::ZERO) {
                self.jar.remove(&key);
            } else {
                self.jar.insert(key, c.value().to_owned());
            }
        }
    }

    async fn get(&mut self, url: &str) -> TestResponse {
        let uri: http::Uri = url.parse().unwrap();
        let mut req = http::Request::get(url);
        if self.html {
            req = req.header("accept", "text/html,application/xhtml+xml,*/*;q=0.8");
        } else {
            req = req.header("accept", "application/json");
        }
        let cookies = self.cookie_header(uri.path());
        if !cookies.is_empty() {
            req = req.header("cookie", cookies);
        }
        let resp = send(&client(), req.body(Full::new(Bytes::new())).unwrap()).await;
        self.store(&resp.headers);
        resp
    }

    /// Follows redirects that stay on `gateway` (like a browser would), returns the first
    /// response that is not such a redirect.
    async fn visit(&mut self, shop: &Shop, path: &str) -> TestResponse {
        let mut url = shop.url(path);
        for _ in 0..5 {
            let r = self.get(&url).await;
            match r.header("location") {
                Some(loc) if r.status.is_redirection() && loc.starts_with(&shop.url("/")) => {
                    url = loc.to_owned();
                }
                _ => return r,
            }
        }
        panic!("redirect loop at {url}");
    }
}

fn query_param(url: &str, name: &str) -> String {
    url::Url::parse(url)
        .unwrap()
        .query_pairs()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
        .unwrap_or_else(|| panic!("{name} missing in {url}"))
}

fn order_id_of(status_url: &str) -> String {
    let u = url::Url::parse(status_url).unwrap();
    u.path_segments().unwrap().next_back().unwrap().to_owned()
}

/// Rows 1, 26, 34, 3 and the grant: first visit, redirect to the status page, pay, come back.
#[tokio::test]
async fn browser_buys_a_page_and_keeps_it() {
    bounded(async {
        let shop = Shop::start().await;
        let mut b = Browser::html();
        // Cookie check first: no order is created for a browser that has no session yet.
        let r = b.get(&shop.url("/articles/a.html")).await;
        assert_eq!(r.status, StatusCode::FOUND);
        assert!(r
            .header("location")
            .unwrap()
            .starts_with(&shop.url("/articles/a.html?")));
        assert_eq!(r.header("cache-control"), Some("no-store"));
        assert_eq!(shop.sandbox.calls().create_order, 0);
        // With the session: an order, and the redirect to the backend's status page.
        let r = b.get(r.header("location").unwrap()).await;
        assert_eq!(r.status, StatusCode::FOUND);
        assert_eq!(r.header("cache-control"), Some("no-store"));
        let status_url = r.header("location").unwrap().to_owned();
        assert!(
            status_url.starts_with(shop.sandbox.base_url().as_str()),
            "{status_url}"
        );
        assert!(r.header("taler").unwrap().starts_with("taler+http://pay/"));
        assert_eq!(shop.sandbox.calls().create_order, 1);
        let session_id = query_param(&status_url, "session_id");
        let order_id = order_id_of(&status_url);
        // The Location is the backend's order_status_url byte for byte.
        let url = format!(
            "{}private/orders/{order_id}?session_id={session_id}",
            shop.sandbox.base_url()
        );
        let req = http::Request::get(url)
            .header("authorization", "Bearer secret-token:sandbox")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let st: Value = serde_json::from_slice(&send(&client(), req).await.body).unwrap();
        assert_eq!(st["order_status_url"].as_str(), Some(status_url.as_str()));
        assert!(
            shop.protected_origin_hits().is_empty(),
            "unpaid request reached the origin"
        );
        // Pay, and come back: served on the first return.
        shop.pay(&order_id, &session_id).await;
        let r = b.get(&shop.url("/articles/a.html")).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        assert_eq!(r.header("x-echo-target"), Some("/articles/a.html"));
        assert!(r.header("cache-control").unwrap().contains("private"));
        let seen = shop.origin.requests();
        let last = seen.last().unwrap();
        let cookie = last.header("cookie").unwrap_or("");
        assert!(
            !cookie.contains("taler_paywall"),
            "gateway cookie forwarded: {cookie}"
        );
        // Within recheck_interval: no further merchant call.
        let before = shop.sandbox.calls();
        for _ in 0..3 {
            assert_eq!(
                b.get(&shop.url("/articles/a.html")).await.status,
                StatusCode::OK
            );
        }
        assert_eq!(shop.sandbox.calls().get_order, before.get_order);
        assert_eq!(shop.sandbox.calls().create_order, 1);
        // Row 24: paying one page does not open another.
        let r = b.get(&shop.url("/articles/b.html")).await;
        assert_eq!(r.status, StatusCode::FOUND);
        assert!(!r.header("location").unwrap().starts_with(&shop.url("/")));
        assert_eq!(
            shop.protected_origin_hits()
                .iter()
                .filter(|t| t.contains("b.html"))
                .count(),
            0
        );
        shop.shutdown().await;
    })
    .await;
}

/// Non-HTML clients get 402 with the `Taler` header and JSON; paying opens the page.
#[tokio::test]
async fn api_client_gets_402_and_pays() {
    bounded(async {
        let shop = Shop::start().await;
        let mut c = Browser::api();
        let r = c.get(&shop.url("/articles/x")).await;
        assert_eq!(r.status, StatusCode::PAYMENT_REQUIRED);
        assert_eq!(r.header("cache-control"), Some("no-store"));
        let body: Value = serde_json::from_slice(&r.body).unwrap();
        let pay_uri = body["taler_pay_uri"].as_str().unwrap();
        assert_eq!(r.header("taler"), Some(pay_uri));
        let status_url = body["order_status_url"].as_str().unwrap();
        let session_id = query_param(status_url, "session_id");
        shop.pay(&order_id_of(status_url), &session_id).await;
        let r = c.get(&shop.url("/articles/x")).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(shop.protected_origin_hits(), ["/articles/x"]);
        shop.shutdown().await;
    })
    .await;
}

/// Rows 5 and 4: an order claimed by another wallet is replaced (same session); an unpaid
/// order is not.
#[tokio::test]
async fn claimed_order_is_replaced_unpaid_is_kept() {
    bounded(async {
        let shop = Shop::start().await;
        let mut c = Browser::api();
        let r = c.get(&shop.url("/articles/x")).await;
        let body: Value = serde_json::from_slice(&r.body).unwrap();
        let first = order_id_of(body["order_status_url"].as_str().unwrap());
        // Row 4: unpaid stays the same order.
        let r = c.get(&shop.url("/articles/x")).await;
        let body: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(
            order_id_of(body["order_status_url"].as_str().unwrap()),
            first
        );
        assert_eq!(shop.sandbox.calls().create_order, 1);
        // Row 5: claimed by another wallet: a new order in the same session.
        let (st, _) = shop
            .merchant_post(
                "sandbox/claim",
                json!({"order_id": first, "wallet": "mallory"}),
            )
            .await;
        assert_eq!(st, StatusCode::OK);
        let r = c.get(&shop.url("/articles/x")).await;
        assert_eq!(r.status, StatusCode::PAYMENT_REQUIRED);
        let body: Value = serde_json::from_slice(&r.body).unwrap();
        let second_url = body["order_status_url"].as_str().unwrap();
        assert_ne!(order_id_of(second_url), first);
        assert_eq!(shop.sandbox.calls().create_order, 2);
        assert!(shop.protected_origin_hits().is_empty());
        shop.shutdown().await;
    })
    .await;
}

/// Rows 6, 7 and the appendix: a purchase made in one browser is recognised in a fresh one
/// by repurchase detection, without paying twice.
#[tokio::test]
async fn repurchase_detection_after_cookies_are_lost() {
    bounded(async {
        let shop = Shop::start().await;
        let mut first = Browser::html();
        let r = first.visit(&shop, "/articles/a.html").await;
        let status_url = r.header("location").unwrap().to_owned();
        let o1 = order_id_of(&status_url);
        shop.pay(&o1, &query_param(&status_url, "session_id")).await;
        assert_eq!(
            first.visit(&shop, "/articles/a.html").await.status,
            StatusCode::OK
        );
        let served_before = shop.protected_origin_hits().len();
        // Cookies deleted: a new browser session. Row 6: not served, new order.
        let mut second = Browser::html();
        let r = second.visit(&shop, "/articles/a.html").await;
        assert_eq!(r.status, StatusCode::FOUND);
        let status_url2 = r.header("location").unwrap().to_owned();
        let o2 = order_id_of(&status_url2);
        assert_ne!(o1, o2);
        assert_eq!(shop.protected_origin_hits().len(), served_before);
        // The same wallet "pays" O2: it replays O1 under the new session.
        let replayed = shop
            .pay(&o2, &query_param(&status_url2, "session_id"))
            .await;
        assert_eq!(replayed, o1, "the sandbox wallet replays the old payment");
        // Row 7: back at the page, the gateway follows already_paid_order_id and serves.
        let r = second.visit(&shop, "/articles/a.html").await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        assert_eq!(shop.protected_origin_hits().len(), served_before + 1);
        shop.shutdown().await;
    })
    .await;
}

/// Rows 9 and 10: forged and tampered cookies count as absent; order cookies cannot be
/// moved from one session to another.
#[tokio::test]
async fn forged_and_foreign_cookies_are_ignored() {
    bounded(async {
        let shop = Shop::start().await;
        let mut payer = Browser::api();
        let r = payer.get(&shop.url("/articles/x")).await;
        let body: Value = serde_json::from_slice(&r.body).unwrap();
        let status_url = body["order_status_url"].as_str().unwrap();
        shop.pay(
            &order_id_of(status_url),
            &query_param(status_url, "session_id"),
        )
        .await;
        assert_eq!(
            payer.get(&shop.url("/articles/x")).await.status,
            StatusCode::OK
        );
        let hits = shop.protected_origin_hits().len();
        // Another client takes only the payer's order cookie, with its own session.
        let mut thief = Browser::api();
        thief.get(&shop.url("/free/")).await;
        let r = thief.get(&shop.url("/articles/y")).await; // gets a session
        assert_eq!(r.status, StatusCode::PAYMENT_REQUIRED);
        for ((name, path), value) in &payer.jar {
            if name.starts_with("taler_paywall_o_") {
                thief
                    .jar
                    .insert((name.clone(), path.clone()), value.clone());
            }
        }
        assert_eq!(
            thief.get(&shop.url("/articles/x")).await.status,
            StatusCode::PAYMENT_REQUIRED
        );
        // Tampered session cookie: treated as absent (a fresh session is issued).
        let mut forger = payer.clone();
        for ((name, _), value) in forger.jar.iter_mut() {
            if name == "taler_paywall_session" {
                value.replace_range(0..1, if value.starts_with('A') { "B" } else { "A" });
            }
        }
        let r = forger.get(&shop.url("/articles/x")).await;
        assert_eq!(r.status, StatusCode::PAYMENT_REQUIRED);
        assert!(r
            .headers
            .get_all("set-cookie")
            .iter()
            .any(|v| v.to_str().unwrap().starts_with("taler_paywall_session=")));
        // A completely made-up cookie set.
        let mut made_up = Browser::api();
        made_up.jar.insert(
            ("taler_paywall_session".into(), "/".into()),
            "s1|AAAAAAAAAAAAAAAAAAAAAA|1".into(),
        );
        assert_eq!(
            made_up.get(&shop.url("/articles/x")).await.status,
            StatusCode::PAYMENT_REQUIRED
        );
        assert_eq!(shop.protected_origin_hits().len(), hits);
        shop.shutdown().await;
    })
    .await;
}

/// Row 11: an order the backend does not know (404, code 2005) is replaced.
#[tokio::test]
async fn unknown_order_is_replaced() {
    bounded(async {
        let shop = Shop::start().await;
        let mut c = Browser::api();
        c.get(&shop.url("/articles/x")).await;
        // Sign an order cookie for an order that does not exist, with the shop's secret.
        let cfg = taler_paywall::config::SessionConfig {
            secret: taler_paywall::config::Secret::new(SECRET),
            previous_secrets: vec![],
            recheck_interval: Duration::from_secs(300),
            cookie_lifetime: Duration::from_secs(3600),
        };
        let keys = taler_paywall::session::CookieKeys::new(&cfg);
        let settings = taler_paywall::session::CookieSettings {
            secure: false,
            path_base: String::new(),
            lifetime: 3600,
        };
        let mut h = HeaderMap::new();
        h.insert("cookie", c.cookie_header("/articles/x").parse().unwrap());
        let session = taler_paywall::session::RequestCookies::parse(&h)
            .session(&keys, &settings, taler_paywall::flow::unix_now())
            .expect("our session");
        let forged = taler_paywall::session::set_order(
            &keys,
            &settings,
            &session.id,
            "/articles/x",
            "/articles/x",
            &taler_paywall::session::OrderCookie {
                order_id: "no-such-order".into(),
                verified_at: None,
            },
        )
        .unwrap();
        let mut hm = HeaderMap::new();
        hm.insert("set-cookie", forged);
        c.store(&hm);
        let before = shop.sandbox.calls().create_order;
        let r = c.get(&shop.url("/articles/x")).await;
        assert_eq!(r.status, StatusCode::PAYMENT_REQUIRED, "{}", r.text());
        assert_eq!(shop.sandbox.calls().create_order, before + 1);
        shop.shutdown().await;
    })
    .await;
}

/// Buys `path` with a non-HTML client and returns the client, the order and the session.
async fn buy(shop: &Shop, path: &str) -> (Browser, String, String) {
    let mut c = Browser::api();
    let r = c.get(&shop.url(path)).await;
    assert_eq!(r.status, StatusCode::PAYMENT_REQUIRED, "{}", r.text());
    let body: Value = serde_json::from_slice(&r.body).unwrap();
    let status_url = body["order_status_url"].as_str().unwrap();
    let (order, session) = (
        order_id_of(status_url),
        query_param(status_url, "session_id"),
    );
    shop.pay(&order, &session).await;
    let r = c.get(&shop.url(path)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    (c, order, session)
}

async fn refund(shop: &Shop, order: &str, amount: &str) {
    let (st, body) = shop
        .merchant_post(
            &format!("private/orders/{order}/refund"),
            json!({"refund": amount, "reason": "test"}),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{body}");
}

/// Rows 12, 13, 14, 15: a refund ends access at the next re-check (at once with
/// `recheck_interval = "0s"`); while the wallet has not collected it the page links to the
/// status page; after collection it says so without the link.
#[tokio::test]
async fn refund_ends_access_and_links_to_collect() {
    bounded(async {
        let shop = Shop::start_with(ShopSetup {
            recheck: "0s",
            ..Default::default()
        })
        .await;
        let (mut c, order, _) = buy(&shop, "/articles/r").await;
        let hits = shop.protected_origin_hits().len();
        // Row 14: a partial refund counts as refunded.
        refund(&shop, &order, "KUDOS:0.1").await;
        let r = c.get(&shop.url("/articles/r")).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.text());
        assert_eq!(r.header("cache-control"), Some("no-store"));
        let body: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(body["refund_pending"], true);
        assert!(body["order_status_url"].as_str().unwrap().contains(&order));
        let mut browser = c.clone();
        browser.html = true;
        let page = browser.get(&shop.url("/articles/r")).await;
        assert_eq!(page.status, StatusCode::FORBIDDEN);
        assert!(page.text().contains("refunded"));
        assert!(page.text().contains("Collect your refund"));
        // The wallet collects it: no link any more, still no content.
        let (st, _) = shop
            .merchant_post("sandbox/collect-refund", json!({"order_id": order}))
            .await;
        assert_eq!(st, StatusCode::OK);
        let page = browser.get(&shop.url("/articles/r")).await;
        assert_eq!(page.status, StatusCode::FORBIDDEN);
        assert!(!page.text().contains("Collect your refund"));
        assert_eq!(shop.protected_origin_hits().len(), hits);
        shop.shutdown().await;
    })
    .await;
}

/// Issue 5: within `recheck_interval` the grant is trusted (no merchant call, a refund not
/// yet seen); after it, the refund is noticed.
#[tokio::test]
async fn refund_is_noticed_after_the_recheck_interval() {
    bounded(async {
        let shop = Shop::start_with(ShopSetup {
            recheck: "2s",
            ..Default::default()
        })
        .await;
        let (mut c, order, _) = buy(&shop, "/articles/r").await;
        refund(&shop, &order, "KUDOS:0.5").await;
        let calls = shop.sandbox.calls().get_order;
        assert_eq!(c.get(&shop.url("/articles/r")).await.status, StatusCode::OK);
        assert_eq!(
            shop.sandbox.calls().get_order,
            calls,
            "grant used, no merchant call"
        );
        tokio::time::sleep(Duration::from_millis(2100)).await;
        assert_eq!(
            c.get(&shop.url("/articles/r")).await.status,
            StatusCode::FORBIDDEN
        );
        shop.shutdown().await;
    })
    .await;
}

/// Issue 5: a second gateway process with the same secret accepts the first one's grant.
#[tokio::test]
async fn grant_cookie_works_on_another_replica() {
    bounded(async {
        let shop = Shop::start().await;
        let (c, _, _) = buy(&shop, "/articles/g").await;
        // A second gateway in front of the same origin and backend, same secret.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr2 = listener.local_addr().unwrap();
        let text = format!(
            "[server]\nlisten = \"{addr2}\"\npublic_url = \"http://{a}\"\n[origin]\nurl = \"{o}\"\n\
             [merchant]\nurl = \"{m}\"\ntoken = \"secret-token:sandbox\"\n[session]\nsecret = \"{SECRET}\"\n\
             [[protect]]\nprefix = \"/articles/\"\nprice = \"KUDOS:0.5\"\nsummary = \"Article\"\n",
            a = shop.addr,
            o = shop.origin.url(),
            m = shop.sandbox.base_url()
        );
        let cfg = Config::from_toml_str(&text, std::path::Path::new("r2.toml"), &NoEnv).unwrap();
        let replica = taler_paywall::gateway::spawn(cfg, listener).await.unwrap();
        // The backend goes away: only the grant can open the page on the replica.
        shop.sandbox.set_fault(Some(Fault::ServerError(500)));
        let calls = shop.sandbox.calls().get_order;
        let mut on_replica = c.clone();
        let r = on_replica.get(&format!("http://{addr2}/articles/g")).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        assert_eq!(shop.sandbox.calls().get_order, calls);
        // Another secret: the grant is worthless, and the broken backend fails closed.
        let other = text.replace(SECRET, "a-completely-different-secret-0123456789");
        let l3 = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr3 = l3.local_addr().unwrap();
        let cfg3 = Config::from_toml_str(&other.replace(&addr2.to_string(), &addr3.to_string()), std::path::Path::new("r3.toml"), &NoEnv).unwrap();
        let foreign = taler_paywall::gateway::spawn(cfg3, l3).await.unwrap();
        let r = on_replica.get(&format!("http://{addr3}/articles/g")).await;
        assert_eq!(r.status, StatusCode::BAD_GATEWAY);
        replica.shutdown().await.unwrap();
        foreign.shutdown().await.unwrap();
        shop.shutdown().await;
    })
    .await;
}

/// Rows 16–19 and every sandbox fault mode: protected requests fail closed with 5xx and never
/// reach the origin; unprotected paths keep working; the merchant token never shows.
#[tokio::test]
async fn merchant_faults_fail_closed() {
    bounded(async {
        let shop = Shop::start().await;
        let faults = [
            (Fault::Unreachable, StatusCode::BAD_GATEWAY),
            (
                Fault::Slow(Duration::from_secs(5)),
                StatusCode::GATEWAY_TIMEOUT,
            ),
            (Fault::ServerError(500), StatusCode::BAD_GATEWAY),
            (Fault::ServerError(503), StatusCode::SERVICE_UNAVAILABLE),
            (Fault::Malformed, StatusCode::BAD_GATEWAY),
            (Fault::Unauthorized, StatusCode::BAD_GATEWAY),
            (Fault::UnknownStatus, StatusCode::BAD_GATEWAY),
        ];
        for (fault, want) in faults {
            shop.sandbox.set_fault(Some(fault.clone()));
            for html in [true, false] {
                // A client with a session and an order, so both merchant calls are exercised.
                let mut c = Browser {
                    html,
                    ..Default::default()
                };
                shop.sandbox.set_fault(None);
                let r = c.visit(&shop, "/articles/f").await;
                assert!(r.status == StatusCode::FOUND || r.status == StatusCode::PAYMENT_REQUIRED);
                shop.sandbox.set_fault(Some(fault.clone()));
                let r = c.get(&shop.url("/articles/f")).await;
                assert_eq!(r.status, want, "{fault:?} html={html}: {}", r.text());
                assert_eq!(r.header("cache-control"), Some("no-store"));
                assert!(!r.text().contains("secret-token"), "token leaked");
                // A new resource needs an order: creation fails closed too.
                let r = c.get(&shop.url("/articles/new-one")).await;
                assert!(r.status.is_server_error(), "{fault:?}: {}", r.status);
                let free = c.get(&shop.url("/free/page")).await;
                assert_eq!(
                    free.status,
                    StatusCode::OK,
                    "unprotected path broken by {fault:?}"
                );
            }
        }
        shop.sandbox.set_fault(None);
        assert!(
            shop.protected_origin_hits().is_empty(),
            "{:?}",
            shop.protected_origin_hits()
        );
        shop.shutdown().await;
    })
    .await;
}

/// The one exception: a payment confirmed less than `recheck_interval` ago is honoured while
/// the backend is down.
#[tokio::test]
async fn fresh_grant_survives_a_merchant_outage() {
    bounded(async {
        let shop = Shop::start().await;
        let (mut c, _, _) = buy(&shop, "/articles/o").await;
        shop.sandbox.set_fault(Some(Fault::Unreachable));
        assert_eq!(c.get(&shop.url("/articles/o")).await.status, StatusCode::OK);
        assert!(c
            .get(&shop.url("/articles/other"))
            .await
            .status
            .is_server_error());
        shop.shutdown().await;
    })
    .await;
}

/// Both scopes: a prefix purchase opens every page under the prefix, and after paying the
/// customer lands on the page they asked for.
#[tokio::test]
async fn prefix_scope_opens_the_whole_prefix_and_returns_to_the_page() {
    bounded(async {
        let shop = Shop::start().await;
        let mut b = Browser::html();
        let r = b.visit(&shop, "/premium/gallery/one.html").await;
        assert_eq!(r.status, StatusCode::FOUND);
        let status_url = r.header("location").unwrap().to_owned();
        shop.pay(
            &order_id_of(&status_url),
            &query_param(&status_url, "session_id"),
        )
        .await;
        // The wallet sends the browser to the fulfillment URL: the prefix.
        let r = b.get(&shop.url("/premium/")).await;
        assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.text());
        assert_eq!(
            r.header("location"),
            Some(shop.url("/premium/gallery/one.html").as_str())
        );
        let r = b.get(&shop.url("/premium/gallery/one.html")).await;
        assert_eq!(r.status, StatusCode::OK);
        let r = b.get(&shop.url("/premium/img/two.svg")).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(
            shop.sandbox.calls().create_order,
            1,
            "one purchase for the whole prefix"
        );
        // The prefix root itself is served now that no return target is pending.
        assert_eq!(b.get(&shop.url("/premium/")).await.status, StatusCode::OK);
        shop.shutdown().await;
    })
    .await;
}

/// Row 37: concurrent requests of one session for one resource make one order.
#[tokio::test]
async fn concurrent_requests_share_one_order() {
    bounded(async {
        let shop = Shop::start().await;
        let mut c = Browser::api();
        c.get(&shop.url("/free/")).await;
        let r = c.get(&shop.url("/articles/first")).await; // session + one order
        assert_eq!(r.status, StatusCode::PAYMENT_REQUIRED);
        let before = shop.sandbox.calls().create_order;
        let mut tasks = Vec::new();
        for i in 0..8 {
            let mut c = c.clone();
            let url = shop.url(&format!("/premium/asset-{i}.png"));
            tasks.push(tokio::spawn(async move { c.get(&url).await.status }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap(), StatusCode::PAYMENT_REQUIRED);
        }
        assert_eq!(shop.sandbox.calls().create_order, before + 1);
        shop.shutdown().await;
    })
    .await;
}

/// Issue 5: clients that keep no cookies cannot drive order creation: browsers never get
/// past the cookie check, and other clients are held to the per-address limit.
#[tokio::test]
async fn cookieless_clients_cannot_create_unbounded_orders() {
    bounded(async {
        let shop = Shop::start_with(ShopSetup {
            extra: "[limits]\norders_per_minute = 5\norders_burst = 5\n",
            ..Default::default()
        })
        .await;
        for i in 0..30 {
            let mut b = Browser::html();
            let r = b.get(&shop.url(&format!("/articles/p{i}"))).await;
            assert_eq!(r.status, StatusCode::FOUND);
            // Coming back without the cookie: the browser refuses cookies.
            let mut forgetful = Browser::html();
            let r = forgetful.get(r.header("location").unwrap()).await;
            assert_eq!(r.status, StatusCode::FORBIDDEN);
        }
        assert_eq!(shop.sandbox.calls().create_order, 0);
        let mut limited = 0;
        for i in 0..40 {
            let mut c = Browser::api();
            let r = c.get(&shop.url(&format!("/articles/q{i}"))).await;
            match r.status {
                StatusCode::PAYMENT_REQUIRED => {}
                StatusCode::TOO_MANY_REQUESTS => {
                    limited += 1;
                    assert!(r.header("retry-after").unwrap().parse::<u64>().unwrap() >= 1);
                }
                other => panic!("unexpected {other}"),
            }
        }
        assert!(
            shop.sandbox.calls().create_order <= 6,
            "{:?}",
            shop.sandbox.calls()
        );
        assert!(limited >= 34);
        shop.shutdown().await;
    })
    .await;
}

/// Row 32 and 29: a named instance is used for every call; a backend whose currency differs
/// from a price is reported as incompatible.
#[tokio::test]
async fn named_instance_and_compatibility_check() {
    bounded(async {
        let probe = Shop::start().await;
        let instance = probe.sandbox.instance_url("shop").to_string();
        let shop = Shop::start_with(ShopSetup {
            merchant_url: Some(instance.clone()),
            ..Default::default()
        })
        .await;
        // The shop's own sandbox is unused; the probe's named instance serves it.
        let mut c = Browser::api();
        let r = c.get(&shop.url("/articles/i")).await;
        assert_eq!(r.status, StatusCode::PAYMENT_REQUIRED);
        let body: Value = serde_json::from_slice(&r.body).unwrap();
        assert!(body["order_status_url"].as_str().unwrap().starts_with(&instance));
        assert!(body["taler_pay_uri"].as_str().unwrap().contains("/instances/shop/"));
        assert_eq!(probe.sandbox.calls().create_order, 1);
        let cfg = Config::from_toml_str(
            &format!(
                "[server]\nlisten = \"127.0.0.1:1\"\npublic_url = \"http://x\"\n[origin]\nurl = \"http://127.0.0.1:2\"\n\
                 [merchant]\nurl = \"{instance}\"\ntoken = \"secret-token:sandbox\"\n[session]\nsecret = \"{SECRET}\"\n"
            ),
            std::path::Path::new("c.toml"),
            &NoEnv,
        )
        .unwrap();
        let gate = taler_paywall::flow::PaymentGate::new(&cfg).unwrap();
        assert!(gate.check_backend(["KUDOS"]).await.is_ok());
        let err = gate.check_backend(["EUR"]).await.unwrap_err();
        assert!(err.contains("EUR"), "{err}");
        shop.shutdown().await;
        probe.shutdown().await;
    })
    .await;
}

/// Row 2: unprotected paths are proxied untouched, with no merchant call and no cookie.
#[tokio::test]
async fn unprotected_paths_never_call_the_merchant() {
    bounded(async {
        let shop = Shop::start().await;
        for html in [true, false] {
            let mut c = Browser {
                html,
                ..Default::default()
            };
            for path in [
                "/",
                "/free/a.html",
                "/article/x",
                "/premiumx/y",
                "/articlesx",
            ] {
                let r = c.get(&shop.url(path)).await;
                assert_eq!(r.status, StatusCode::OK, "{path}");
                assert!(r.headers.get("set-cookie").is_none(), "{path} set a cookie");
            }
        }
        assert_eq!(shop.sandbox.calls(), Default::default());
        shop.shutdown().await;
    })
    .await;
}

/// Row 17: the backend does not know the configured instance (404, code 2000): fail closed.
#[tokio::test]
async fn unknown_instance_fails_closed() {
    bounded(async {
        let opts = SandboxOptions {
            instances: Some(vec!["default".into()]),
            ..SandboxOptions::default()
        };
        let probe = Sandbox::start(TcpListener::bind("127.0.0.1:0").await.unwrap(), opts)
            .await
            .unwrap();
        let shop = Shop::start_with(ShopSetup {
            merchant_url: Some(probe.instance_url("nosuchshop").to_string()),
            ..Default::default()
        })
        .await;
        let r = Browser::api().get(&shop.url("/articles/i")).await;
        assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{}", r.text());
        assert!(shop.protected_origin_hits().is_empty());
        shop.shutdown().await;
        probe.shutdown().await;
    })
    .await;
}

/// Row 23: every order for one resource carries the same fulfillment URL, byte for byte: the
/// public URL plus the normalised path, without the query.
#[tokio::test]
async fn orders_of_one_resource_share_one_fulfillment_url() {
    bounded(async {
        let shop = Shop::start().await;
        let mut urls = Vec::new();
        for target in [
            "/articles/same.html?utm=1",
            "//articles/./same.html",
            "/articles/same.html",
        ] {
            // A fresh client each time: a fresh session and a fresh order.
            let r = Browser::api().get(&shop.url(target)).await;
            let body: Value = serde_json::from_slice(&r.body).unwrap();
            let order = order_id_of(body["order_status_url"].as_str().unwrap());
            // Claim it, so the private status shows the contract terms.
            shop.merchant_post("sandbox/claim", json!({"order_id": order}))
                .await;
            let url = format!("{}private/orders/{order}", shop.sandbox.base_url());
            let req = http::Request::get(url)
                .header("authorization", "Bearer secret-token:sandbox")
                .body(Full::new(Bytes::new()))
                .unwrap();
            let st: Value = serde_json::from_slice(&send(&client(), req).await.body).unwrap();
            urls.push(
                st["contract_terms"]["fulfillment_url"]
                    .as_str()
                    .unwrap()
                    .to_owned(),
            );
        }
        assert_eq!(urls[0], shop.url("/articles/same.html"));
        assert!(urls.iter().all(|u| *u == urls[0]), "{urls:?}");
        shop.shutdown().await;
    })
    .await;
}

/// Row 33: a refunded purchase is not offered for repurchase; a new browser must pay again.
#[tokio::test]
async fn refunded_purchase_is_not_replayed() {
    bounded(async {
        let shop = Shop::start().await;
        let (_, order, _) = buy(&shop, "/articles/r33").await;
        refund(&shop, &order, "KUDOS:0.5").await;
        let (st, _) = shop
            .merchant_post("sandbox/collect-refund", json!({"order_id": order}))
            .await;
        assert_eq!(st, StatusCode::OK);
        let hits = shop.protected_origin_hits().len();
        let mut fresh = Browser::api();
        let r = fresh.get(&shop.url("/articles/r33")).await;
        assert_eq!(r.status, StatusCode::PAYMENT_REQUIRED);
        let body: Value = serde_json::from_slice(&r.body).unwrap();
        let status_url = body["order_status_url"].as_str().unwrap();
        // The wallet pays anew (no replay of the refunded order).
        let paid = shop
            .pay(
                &order_id_of(status_url),
                &query_param(status_url, "session_id"),
            )
            .await;
        assert_ne!(paid, order);
        assert_eq!(
            fresh.get(&shop.url("/articles/r33")).await.status,
            StatusCode::OK
        );
        assert_eq!(shop.protected_origin_hits().len(), hits + 1);
        shop.shutdown().await;
    })
    .await;
}

/// Rows 8 and 9: a first visit to another resource makes an order for it only, leaving the
/// other order cookies alone; an order cookie without a valid session is discarded.
#[tokio::test]
async fn orders_are_per_resource_and_need_the_session() {
    bounded(async {
        let shop = Shop::start().await;
        let (mut c, _, _) = buy(&shop, "/articles/one").await;
        let before: Vec<_> = c.jar.keys().cloned().collect();
        let r = c.get(&shop.url("/articles/two")).await;
        assert_eq!(r.status, StatusCode::PAYMENT_REQUIRED);
        for key in &before {
            assert!(c.jar.contains_key(key), "{key:?} was touched");
        }
        assert_eq!(
            c.get(&shop.url("/articles/one")).await.status,
            StatusCode::OK
        );
        // Row 9: drop the session cookie, keep the order cookies: a new session and order.
        let mut no_session = c.clone();
        no_session
            .jar
            .retain(|(name, _), _| !name.contains("session"));
        let created = shop.sandbox.calls().create_order;
        let r = no_session.get(&shop.url("/articles/one")).await;
        assert_eq!(r.status, StatusCode::PAYMENT_REQUIRED);
        assert_eq!(shop.sandbox.calls().create_order, created + 1);
        shop.shutdown().await;
    })
    .await;
}
