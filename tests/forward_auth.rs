//! The forward-auth endpoint (`[forward_auth]`), in process: the gateway with the sandbox
//! merchant, asked the way a front proxy asks (`X-Original-URI` / `X-Forwarded-Uri`), on
//! 127.0.0.1 with ephemeral ports. The origin is configured but must never be contacted: the
//! endpoint only decides.

mod support;

use std::net::SocketAddr;

use bytes::Bytes;
use http::StatusCode;
use http_body_util::Full;
use serde_json::{json, Value};
use tokio::net::TcpListener;

use support::{bounded, client, send, TestOrigin, TestResponse};
use taler_paywall::config::{Config, NoEnv};
use taler_paywall::gateway::{App, RunningGateway};
use taler_paywall::sandbox::{Sandbox, SandboxOptions};

const AUTH: &str = "/.well-known/taler-paywall/auth";
const PUBLIC: &str = "https://shop.example";
const HTML: &str = "text/html,application/xhtml+xml,*/*;q=0.8";

struct Fixture {
    origin: TestOrigin,
    sandbox: Sandbox,
    gateway: Option<RunningGateway>,
    addr: SocketAddr,
    app: std::sync::Arc<App>,
}

fn config_text(addr: SocketAddr, origin: &str, merchant: &str, trusted: &str) -> String {
    format!(
        r#"[server]
listen = "{addr}"
public_url = "{PUBLIC}"
trusted_proxies = [{trusted}]

[origin]
url = "{origin}"

[merchant]
url = "{merchant}"
token = "secret-token:sandbox"
timeout = "2s"

[session]
secret = "forward-auth-tests-secret-0123456789abcdef"

[[protect]]
prefix = "/premium/"
price = "KUDOS:1"
summary = "Premium"

[limits]
orders_per_minute = 0

[forward_auth]
"#
    )
}

impl Fixture {
    async fn start(trusted: &str) -> Fixture {
        let origin = TestOrigin::echo().await;
        let sandbox = Sandbox::start(
            TcpListener::bind("127.0.0.1:0").await.unwrap(),
            SandboxOptions::default(),
        )
        .await
        .expect("sandbox starts");
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let text = config_text(addr, &origin.url(), sandbox.base_url().as_str(), trusted);
        let config = Config::from_toml_str(&text, std::path::Path::new("fa.toml"), &NoEnv)
            .unwrap_or_else(|e| panic!("config: {e}\n{text}"));
        let app = std::sync::Arc::new(App::new(config).expect("app"));
        let gateway = taler_paywall::gateway::spawn_app(app.clone(), listener)
            .await
            .expect("gateway starts");
        Fixture {
            origin,
            sandbox,
            gateway: Some(gateway),
            addr,
            app,
        }
    }

    /// `taler_paywall_requests_total{outcome}` as counted so far.
    fn requests_counted(&self, outcome: &str) -> u64 {
        let key = format!("taler_paywall_requests_total{{outcome=\"{outcome}\"}} ");
        let text = self.app.metrics.encode();
        text.lines()
            .find_map(|l| l.strip_prefix(key.as_str()))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {key} in\n{text}"))
    }

    /// Asks the endpoint about `uri`, as a front proxy would.
    async fn ask(&self, style: &str, uri: &str, headers: &[(&str, &str)]) -> TestResponse {
        let target = match style {
            "" => AUTH.to_owned(),
            s => format!("{AUTH}?style={s}"),
        };
        let mut req = http::Request::get(format!("http://{}{target}", self.addr))
            .header("x-original-uri", uri)
            .header("x-original-method", "GET");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        send(&client(), req.body(Full::new(Bytes::new())).unwrap()).await
    }

    async fn pay(&self, order_id: &str, session_id: &str) {
        let req = http::Request::post(format!("{}sandbox/pay", self.sandbox.base_url()))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(
                json!({"order_id": order_id, "session_id": session_id}).to_string(),
            )))
            .unwrap();
        let r = send(&client(), req).await;
        assert_eq!(r.status, StatusCode::OK, "sandbox/pay: {}", r.text());
    }

    async fn shutdown(mut self) {
        assert_eq!(self.origin.count(), 0, "the endpoint contacted the origin");
        if let Some(g) = self.gateway.take() {
            g.shutdown().await.unwrap();
        }
        self.sandbox.shutdown().await;
    }
}

/// `name=value` of every `Set-Cookie` (or of the nginx-style numbered headers).
fn cookies(r: &TestResponse, nginx: bool) -> Vec<String> {
    let values: Vec<String> = if nginx {
        (1..=4)
            .filter_map(|i| r.header(&format!("x-taler-paywall-set-cookie-{i}")))
            .map(str::to_owned)
            .collect()
    } else {
        r.headers
            .get_all("set-cookie")
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect()
    };
    values
        .iter()
        .map(|c| c.split(';').next().unwrap().to_owned())
        .collect()
}

fn cookie_header(jar: &[String]) -> String {
    jar.join("; ")
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

/// Merges `new` cookies (`name=value`) into `jar`, replacing same-named ones.
fn keep(jar: &mut Vec<String>, new: Vec<String>) {
    for c in new {
        let name = c.split('=').next().unwrap().to_owned();
        jar.retain(|old| old.split('=').next().unwrap() != name);
        jar.push(c);
    }
}

/// Unprotected URIs are let through at once: 200, empty body, no merchant call; the site's
/// cookies are handed back without the gateway's.
#[tokio::test]
async fn unprotected_uris_pass_without_a_merchant_call() {
    bounded(async {
        let f = Fixture::start("\"127.0.0.1\"").await;
        for style in ["", "redirect", "nginx"] {
            for uri in [
                "/",
                "/free/x?a=1",
                "/premiumx",
                "/free/premium/x",
                "/free?p=/premium/x",
            ] {
                let r = f
                    .ask(
                        style,
                        uri,
                        &[
                            ("accept", HTML),
                            ("cookie", "site=1; taler_paywall_session=forged; lang=en"),
                        ],
                    )
                    .await;
                assert_eq!(r.status, StatusCode::OK, "{style} {uri}: {}", r.text());
                assert!(r.body.is_empty());
                let (kept, other) = if style == "nginx" {
                    ("x-taler-paywall-cookie", "cookie")
                } else {
                    ("cookie", "x-taler-paywall-cookie")
                };
                assert_eq!(r.header(kept), Some("site=1; lang=en"), "{style}");
                assert!(r.header(other).is_none());
                assert!(r.header("set-cookie").is_none());
            }
        }
        // With only the gateway's cookies, nothing is left for the origin.
        let r = f
            .ask("", "/free", &[("cookie", "taler_paywall_session=x")])
            .await;
        assert_eq!(r.status, StatusCode::OK);
        assert!(r.header("cookie").is_none());
        let calls = f.sandbox.calls();
        assert_eq!(
            (calls.create_order, calls.get_order),
            (0, 0),
            "unprotected paths called the merchant"
        );
        // Counted as the front proxy will serve them: proxied, unprotected.
        assert_eq!(f.requests_counted("proxied"), 16);
        assert_eq!(f.requests_counted("payment_required"), 0);
        f.shutdown().await;
    })
    .await;
}

/// Redirect style (Traefik, Caddy): the flow's own answers, relayed as is; after paying, 200
/// with the grant cookie.
#[tokio::test]
async fn redirect_style_sends_the_browser_to_pay_and_then_lets_it_through() {
    bounded(async {
        let f = Fixture::start("\"127.0.0.1\"").await;
        let mut jar: Vec<String> = Vec::new();
        // Traefik and Caddy send X-Forwarded-Uri.
        let ask = |jar: Vec<String>, uri: &'static str| {
            let f = &f;
            async move {
                let c = cookie_header(&jar);
                let mut h = vec![("accept", HTML)];
                if !c.is_empty() {
                    h.push(("cookie", c.as_str()));
                }
                let req = {
                    let mut b = http::Request::get(format!("http://{}{AUTH}", f.addr))
                        .header("x-forwarded-uri", uri)
                        .header("x-forwarded-method", "GET");
                    for (k, v) in &h {
                        b = b.header(*k, *v);
                    }
                    b.body(Full::new(Bytes::new())).unwrap()
                };
                send(&client(), req).await
            }
        };
        // First the cookie check: back to the same public URL with the session cookie.
        let r = ask(jar.clone(), "/premium/x?q=1").await;
        assert_eq!(r.status, StatusCode::FOUND, "{}", r.text());
        let loc = r.header("location").unwrap();
        assert!(
            loc.starts_with(&format!("{PUBLIC}/premium/x?q=1&")),
            "{loc}"
        );
        assert_eq!(r.header("cache-control"), Some("no-store"));
        let set = cookies(&r, false);
        assert!(
            set.iter()
                .any(|c| c.starts_with("__Host-taler_paywall_session=")),
            "{set:?}"
        );
        keep(&mut jar, set);
        assert_eq!(f.sandbox.calls().create_order, 0);
        // With the session: an order and the redirect to the merchant's status page.
        let r = ask(jar.clone(), "/premium/x").await;
        assert_eq!(r.status, StatusCode::FOUND);
        let status_url = r.header("location").unwrap().to_owned();
        assert!(
            status_url.starts_with(f.sandbox.base_url().as_str()),
            "{status_url}"
        );
        assert!(r.header("taler").unwrap().starts_with("taler"));
        let set = cookies(&r, false);
        assert!(
            set.iter().any(|c| c.starts_with("taler_paywall_o_")),
            "{set:?}"
        );
        keep(&mut jar, set);
        // Not paid yet: still a redirect, never a 200.
        assert_eq!(
            ask(jar.clone(), "/premium/x").await.status,
            StatusCode::FOUND
        );
        f.pay(
            &order_id_of(&status_url),
            &query_param(&status_url, "session_id"),
        )
        .await;
        let r = ask(jar.clone(), "/premium/x").await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        assert!(r.body.is_empty());
        let set = cookies(&r, false);
        assert!(
            set.iter().any(|c| c.starts_with("taler_paywall_o_")),
            "the grant cookie is missing: {set:?}"
        );
        // Another page under the prefix is bought separately.
        assert_eq!(
            ask(jar.clone(), "/premium/y").await.status,
            StatusCode::FOUND
        );
        // Each answer was counted as the decision it carried (the cookie check, the order,
        // "not paid yet" and /premium/y ask for payment), never as a proxied request.
        assert_eq!(f.requests_counted("paid"), 1);
        assert_eq!(f.requests_counted("payment_required"), 4);
        assert_eq!(f.requests_counted("proxied"), 0);
        f.shutdown().await;
    })
    .await;
}

/// nginx style: every refusal is a 401 carrying the real status, the redirect target and the
/// cookies in headers; a non-browser gets the data for a 402.
#[tokio::test]
async fn nginx_style_answers_401_with_the_redirect_in_headers() {
    bounded(async {
        let f = Fixture::start("\"127.0.0.1\"").await;
        let mut jar: Vec<String> = Vec::new();
        let r = f.ask("nginx", "/premium/x", &[("accept", HTML)]).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
        assert!(r.body.is_empty());
        assert_eq!(r.header("x-taler-paywall-status"), Some("302"));
        assert!(r.header("location").is_none());
        assert!(r
            .header("x-taler-paywall-location")
            .unwrap()
            .starts_with(&format!("{PUBLIC}/premium/x?")));
        assert!(r.header("set-cookie").is_none(), "nginx would drop it");
        let set = cookies(&r, true);
        assert_eq!(set.len(), 1, "{set:?}");
        keep(&mut jar, set);
        let c = cookie_header(&jar);
        let r = f
            .ask("nginx", "/premium/x", &[("accept", HTML), ("cookie", &c)])
            .await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
        assert_eq!(r.header("x-taler-paywall-status"), Some("302"));
        let status_url = r.header("x-taler-paywall-location").unwrap().to_owned();
        assert!(status_url.starts_with(f.sandbox.base_url().as_str()));
        assert!(r.header("x-taler-paywall-taler").is_some());
        keep(&mut jar, cookies(&r, true));
        f.pay(
            &order_id_of(&status_url),
            &query_param(&status_url, "session_id"),
        )
        .await;
        let c = cookie_header(&jar);
        let r = f
            .ask("nginx", "/premium/x", &[("accept", HTML), ("cookie", &c)])
            .await;
        assert_eq!(r.status, StatusCode::OK);
        let set = cookies(&r, true);
        assert!(
            set.iter().any(|c| c.starts_with("taler_paywall_o_")),
            "{set:?}"
        );
        assert!(r.header("set-cookie").is_none());

        // A client that does not want HTML: the 402's status page and taler://pay URI, plus
        // the session and order cookies (two slots).
        let r = f
            .ask("nginx", "/premium/z", &[("accept", "application/json")])
            .await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
        assert_eq!(r.header("x-taler-paywall-status"), Some("402"));
        assert!(r
            .header("x-taler-paywall-location")
            .unwrap()
            .starts_with(f.sandbox.base_url().as_str()));
        assert!(r
            .header("x-taler-paywall-taler")
            .unwrap()
            .starts_with("taler"));
        assert_eq!(cookies(&r, true).len(), 2);
        // The same in redirect style is the flow's 402 itself.
        let r = f
            .ask("redirect", "/premium/z", &[("accept", "application/json")])
            .await;
        assert_eq!(r.status, StatusCode::PAYMENT_REQUIRED);
        let body: Value = serde_json::from_slice(&r.body).unwrap();
        assert!(body["order_status_url"].is_string());
        f.shutdown().await;
    })
    .await;
}

/// The forwarded URI is believed only from `server.trusted_proxies`.
#[tokio::test]
async fn an_untrusted_peer_is_refused() {
    bounded(async {
        let f = Fixture::start("\"10.0.0.1\"").await;
        for style in ["", "nginx"] {
            for uri in ["/free", "/premium/x"] {
                let r = f.ask(style, uri, &[("accept", HTML)]).await;
                assert_eq!(r.status, StatusCode::FORBIDDEN, "{style} {uri}");
                assert!(r.header("x-taler-paywall-cookie").is_none());
                assert!(r.header("cookie").is_none());
            }
        }
        assert_eq!(f.sandbox.calls().create_order, 0);
        assert_eq!(f.requests_counted("bad_request"), 4);
        assert_eq!(f.requests_counted("proxied"), 0);
        f.shutdown().await;
    })
    .await;
}

/// Spellings that reach `/premium/x` at a liberal origin are classified protected, exactly
/// as for proxied requests; ambiguous ones are refused (400), never let through.
#[tokio::test]
async fn bypass_spellings_are_protected_and_ambiguous_uris_refused() {
    bounded(async {
        let f = Fixture::start("\"127.0.0.1\"").await;
        for uri in [
            "/free/../premium/x",
            "//premium/x",
            "/%70remium/x",
            "/PREMIUM/x",
            "/./premium/x",
            "/premium;x=1/x",
            "http://shop.example/premium/x",
        ] {
            for style in ["redirect", "nginx"] {
                let r = f.ask(style, uri, &[("accept", HTML)]).await;
                assert_ne!(r.status, StatusCode::OK, "{style} {uri} was let through");
                let (status, location) = if style == "nginx" {
                    (
                        r.header("x-taler-paywall-status").map(str::to_owned),
                        r.header("x-taler-paywall-location"),
                    )
                } else {
                    (Some(r.status.as_u16().to_string()), r.header("location"))
                };
                assert_eq!(status.as_deref(), Some("302"), "{style} {uri}");
                // The cookie check redirects to the normalised path.
                let location = location.unwrap().to_ascii_lowercase();
                assert!(
                    location.starts_with(&format!("{PUBLIC}/premium")),
                    "{style} {uri}: {location}"
                );
            }
        }
        for uri in [
            "/premium%2Fx",
            "/free%2F..%2Fpremium/x",
            "/%zz",
            "/free/../../premium/x",
            "/premium/x#frag",
            "premium/x",
        ] {
            for style in ["redirect", "nginx"] {
                let r = f.ask(style, uri, &[("accept", HTML)]).await;
                assert_eq!(r.status, StatusCode::BAD_REQUEST, "{style} {uri}");
            }
        }
        // No URI, or two that disagree (a client's own header beside the proxy's), or an
        // unknown style: refused too.
        let bare = http::Request::get(format!("http://{}{AUTH}", f.addr))
            .body(Full::new(Bytes::new()))
            .unwrap();
        assert_eq!(send(&client(), bare).await.status, StatusCode::BAD_REQUEST);
        let r = f
            .ask("", "/premium/x", &[("x-forwarded-uri", "/free")])
            .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        let r = f.ask("ngnix", "/free", &[]).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        f.shutdown().await;
    })
    .await;
}

/// The endpoint's path cannot be shadowed by a `[[protect]]` prefix, and forward-auth cannot
/// be enabled without a trusted proxy: both are configuration errors.
#[tokio::test]
async fn the_endpoint_cannot_be_shadowed_or_left_untrusted() {
    let parse = |text: &str| Config::from_toml_str(text, std::path::Path::new("fa.toml"), &NoEnv);
    let base = config_text(
        "127.0.0.1:8080".parse().unwrap(),
        "http://127.0.0.1:8000",
        "http://127.0.0.1:9966/",
        "\"127.0.0.1\"",
    );
    assert!(parse(&base).is_ok());
    for prefix in ["/", "/.well-known/", "/.WELL-KNOWN/taler-paywall/"] {
        let text = base.replace("prefix = \"/premium/\"", &format!("prefix = \"{prefix}\""));
        let err = parse(&text).expect_err(prefix).to_string();
        assert!(err.contains("forward_auth.path"), "{prefix}: {err}");
    }
    let text = base.replace(
        "[forward_auth]\n",
        "[forward_auth]\npath = \"/premium/auth\"\n",
    );
    assert!(parse(&text).is_err());
    let text = base.replace("trusted_proxies = [\"127.0.0.1\"]", "trusted_proxies = []");
    let err = parse(&text).expect_err("no trusted proxy").to_string();
    assert!(err.contains("trusted_proxies"), "{err}");

    // Without [forward_auth], the path is an ordinary (unprotected) path of the site.
    bounded(async {
        let origin = TestOrigin::echo().await;
        let text = support::ConfigBuilder::new(&origin.url()).build();
        let gw = support::start_gateway(&text).await;
        let r = support::get(gw.addr, AUTH).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.header("x-echo-target"), Some(AUTH));
        gw.shutdown().await.unwrap();
    })
    .await;
}
