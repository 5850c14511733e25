//! Fault injection: every sandbox fault mode, and an origin that breaks HTTP in every way a
//! raw TCP server can, with browser and API clients, paid, unpaid and new. What must hold:
//! no protected content unpaid (and none at all from a failing merchant once the grant needs
//! re-checking), a clear 4xx/5xx with `Cache-Control: no-store` on every payment-flow
//! failure, unprotected traffic unaffected by merchant faults, and no panic: the gateway keeps
//! serving afterwards and shuts down cleanly.

mod support;

use std::time::Duration;

use http::StatusCode;
use tokio::net::TcpListener;

use support::{
    bounded, buy_api, shop_config, start_gateway_on, start_sandbox, Jar, RawOrigin, SandboxShop,
    TestResponse,
};
use taler_paywall::sandbox::Fault;

const NO_LIMIT: &str = "[limits]\norders_per_minute = 0\n";

fn faults() -> Vec<(Fault, StatusCode)> {
    vec![
        (Fault::Unreachable, StatusCode::BAD_GATEWAY),
        // The shop's merchant timeout is 1 s.
        (
            Fault::Slow(Duration::from_secs(3)),
            StatusCode::GATEWAY_TIMEOUT,
        ),
        (Fault::ServerError(500), StatusCode::BAD_GATEWAY),
        (Fault::ServerError(503), StatusCode::SERVICE_UNAVAILABLE),
        (Fault::Malformed, StatusCode::BAD_GATEWAY),
        (Fault::Unauthorized, StatusCode::BAD_GATEWAY),
        (Fault::UnknownStatus, StatusCode::BAD_GATEWAY),
    ]
}

fn assert_failed_closed(r: &TestResponse, want: StatusCode, context: &str) {
    assert_eq!(r.status, want, "{context}: {}", r.text());
    assert_eq!(r.header("cache-control"), Some("no-store"), "{context}");
    assert!(
        r.header("x-echo-target").is_none(),
        "{context}: origin content"
    );
    assert!(r.header("location").is_none(), "{context}");
    assert!(
        !r.text().contains("secret-token"),
        "{context}: token leaked"
    );
}

/// With `recheck_interval = "0s"` every protected request asks the merchant, so under each
/// fault a paid client is refused too (5xx, never stale content), an unpaid client with an
/// order and a new client fail closed, a new browser still gets only the cookie check, free
/// paths keep working, and after the fault clears everyone is back where they were.
#[tokio::test]
async fn every_merchant_fault_fails_closed_for_every_kind_of_client() {
    bounded(async {
        let shop = SandboxShop::start("0s", NO_LIMIT).await;
        let (paid_api, _) = buy_api(shop.addr, &shop.sandbox.base_url(), "/articles/paid").await;
        let mut paid_html = paid_api.clone();
        paid_html.html = true;
        let mut unpaid_api = Jar::api();
        let r = unpaid_api.get(&shop.url("/articles/unpaid")).await;
        assert_eq!(r.status, StatusCode::PAYMENT_REQUIRED);
        let mut unpaid_html = Jar::html();
        let r = unpaid_html.get(&shop.url("/articles/unpaid")).await;
        let r = unpaid_html.get(r.header("location").unwrap()).await;
        assert_eq!(r.status, StatusCode::FOUND);
        let mut served = shop.protected_hits().len();

        for (fault, want) in faults() {
            shop.sandbox.set_fault(Some(fault.clone()));
            for (name, client, path) in [
                ("paid api", &paid_api, "/articles/paid"),
                ("paid html", &paid_html, "/articles/paid"),
                ("unpaid api", &unpaid_api, "/articles/unpaid"),
                ("unpaid html", &unpaid_html, "/articles/unpaid"),
            ] {
                let mut c = client.clone();
                let r = c.get(&shop.url(path)).await;
                assert_failed_closed(&r, want, &format!("{fault:?} {name}"));
            }
            // New clients: an API client needs an order, which fails closed; a browser only
            // gets the cookie check, which needs no merchant.
            let r = Jar::api().get(&shop.url("/premium/new")).await;
            assert_failed_closed(&r, want, &format!("{fault:?} new api"));
            let r = Jar::html().get(&shop.url("/premium/new")).await;
            assert_eq!(r.status, StatusCode::FOUND, "{fault:?} new browser");
            assert_eq!(r.header("cache-control"), Some("no-store"));
            for c in [Jar::api(), Jar::html(), paid_api.clone()] {
                let r = c.clone().get(&shop.url("/free/during")).await;
                assert_eq!(r.status, StatusCode::OK, "{fault:?}: free path broken");
            }
            assert_eq!(shop.protected_hits().len(), served, "{fault:?}");

            shop.sandbox.set_fault(None);
            let r = paid_api.clone().get(&shop.url("/articles/paid")).await;
            assert_eq!(r.status, StatusCode::OK, "after {fault:?}: {}", r.text());
            let r = unpaid_api.clone().get(&shop.url("/articles/unpaid")).await;
            assert_eq!(r.status, StatusCode::PAYMENT_REQUIRED, "after {fault:?}");
            served += 1;
            assert_eq!(
                shop.protected_hits().len(),
                served,
                "only the paid request was served"
            );
        }
        shop.shutdown().await;
    })
    .await;
}

/// What the raw origin answers for each path (the same under `/free/` and `/premium/`).
fn broken_origin(target: &str) -> Option<Vec<u8>> {
    let name = target.rsplit('/').next().unwrap_or("");
    let text = |s: &str| Some(s.as_bytes().to_vec());
    match name {
        "garbage" => text("NOT HTTP AT ALL\r\n\r\n"),
        "bad-length" => text("HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\nhello"),
        "two-lengths" => {
            text("HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!")
        }
        "bad-chunks" => {
            text("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n")
        }
        "huge-head" => {
            let mut v = b"HTTP/1.1 200 OK\r\nX-Big: ".to_vec();
            v.extend(std::iter::repeat_n(b'a', 1024 * 1024));
            v.extend_from_slice(b"\r\nContent-Length: 2\r\n\r\nok");
            Some(v)
        }
        "many-headers" => {
            let mut s = String::from("HTTP/1.1 200 OK\r\n");
            for i in 0..500 {
                s.push_str(&format!("X-H{i}: v\r\n"));
            }
            s.push_str("Content-Length: 2\r\n\r\nok");
            Some(s.into_bytes())
        }
        "half-head" => text("HTTP/1.1 200 OK\r\nContent-Le"),
        "nothing" => Some(Vec::new()),
        "truncated" => text("HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part"),
        "never" => None,
        _ => text("HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"),
    }
}

/// An origin that breaks HTTP (garbage, bad or conflicting lengths, bad chunks, a 1 MiB
/// head, 500 headers, half a head, nothing, a truncated body, no answer at all): free and
/// paid protected requests get a clean 502/504 (with `no-store` on protected paths), or a
/// body that ends in an error rather than looking complete; unpaid requests never reach the
/// origin; and the gateway keeps serving.
#[tokio::test]
async fn a_broken_origin_gives_clean_errors_and_the_gateway_keeps_serving() {
    bounded(async {
        let origin = RawOrigin::start(broken_origin).await;
        let sandbox = start_sandbox().await;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let text = shop_config(
            addr,
            &origin.url(),
            sandbox.base_url().as_str(),
            "300s",
            NO_LIMIT,
        );
        let gw = start_gateway_on(&text, listener).await;
        let (paid, _) = buy_api(addr, &sandbox.base_url(), "/premium/").await;
        let mut paid_html = paid.clone();
        paid_html.html = true;
        let cases = [
            ("garbage", StatusCode::BAD_GATEWAY),
            ("bad-length", StatusCode::BAD_GATEWAY),
            ("two-lengths", StatusCode::BAD_GATEWAY),
            ("huge-head", StatusCode::BAD_GATEWAY),
            ("many-headers", StatusCode::BAD_GATEWAY),
            ("half-head", StatusCode::BAD_GATEWAY),
            ("nothing", StatusCode::BAD_GATEWAY),
            // origin.response_timeout is 2 s in the shop config.
            ("never", StatusCode::GATEWAY_TIMEOUT),
        ];
        for (name, want) in cases {
            for (who, client, prefix) in [
                ("free", Jar::api(), "/free/"),
                ("paid api", paid.clone(), "/premium/"),
                ("paid html", paid_html.clone(), "/premium/"),
            ] {
                let mut c = client;
                let r = c.get(&format!("http://{addr}{prefix}{name}")).await;
                assert_eq!(r.status, want, "{name} {who}: {}", r.text());
                assert_eq!(r.header("cache-control"), Some("no-store"), "{name} {who}");
                assert!(!r.text().contains("127.0.0.1"), "{name}: address leaked");
            }
        }
        // Broken bodies after a good head: the client must see the break, never a clean end.
        for name in ["truncated", "bad-chunks"] {
            for (client, prefix) in [(Jar::api(), "/free/"), (paid.clone(), "/premium/")] {
                let req = client.request(&format!("http://{addr}{prefix}{name}"));
                // hyper sends the head together with the first body bytes, so a body that
                // breaks before any byte leaves the client with a closed connection instead of
                // a head; either way the client sees the failure.
                match support::client().request(req).await {
                    Err(_) => {}
                    Ok(resp) => {
                        assert_eq!(resp.status(), StatusCode::OK, "{name}");
                        let body = http_body_util::BodyExt::collect(resp.into_body()).await;
                        assert!(body.is_err(), "{prefix}{name}: the break was hidden");
                    }
                }
            }
        }
        // Unpaid clients never reach the broken origin either.
        let before = origin.targets().len();
        for name in ["garbage", "never", "truncated"] {
            let r = Jar::api()
                .get(&format!("http://{addr}/premium/{name}"))
                .await;
            assert_eq!(r.status, StatusCode::PAYMENT_REQUIRED);
        }
        assert_eq!(origin.targets().len(), before);
        // Still serving, and a clean shutdown (no task died).
        let r = Jar::api().get(&format!("http://{addr}/free/fine")).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(&r.body[..], b"ok");
        let r = paid
            .clone()
            .get(&format!("http://{addr}/premium/fine"))
            .await;
        assert_eq!(r.status, StatusCode::OK);
        assert!(r.header("cache-control").unwrap().contains("private"));
        gw.shutdown().await.expect("clean shutdown");
        sandbox.shutdown().await;
    })
    .await;
}

fn fixture(name: &str) -> String {
    format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// Starts a TLS-terminating gateway (the `localhost` test certificate, protecting nothing) in
/// front of `backend`: an https origin or merchant with a certificate no public root trusts.
async fn tls_front(backend: &str) -> (u16, taler_paywall::gateway::RunningGateway) {
    let tls = format!(
        "[server.tls]\ncert_file = \"{}\"\nkey_file = \"{}\"",
        fixture("localhost.crt"),
        fixture("localhost.key")
    );
    let gw = support::start_gateway(
        &support::ConfigBuilder::new(backend)
            .no_protect()
            .tail(&tls)
            .build(),
    )
    .await;
    (gw.addr.port(), gw)
}

/// Backend TLS is verified (pitfall 22): an https origin or merchant whose certificate is not
/// trusted is a 502 (no content, no order), and trusting its CA with `ca_file` makes it work.
#[tokio::test]
async fn backends_with_untrusted_certificates_are_refused() {
    bounded(async {
        let origin = support::TestOrigin::echo().await;
        let sandbox = start_sandbox().await;
        let (origin_port, origin_tls) = tls_front(&origin.url()).await;
        let (merchant_port, merchant_tls) =
            tls_front(sandbox.base_url().as_str().trim_end_matches('/')).await;
        for trusted in [false, true] {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let mut text = shop_config(
                addr,
                &format!("https://localhost:{origin_port}"),
                &format!("https://localhost:{merchant_port}/"),
                "300s",
                NO_LIMIT,
            );
            if trusted {
                let ca = format!("ca_file = \"{}\"\n", fixture("localhost.crt"));
                text = text
                    .replace(
                        "response_timeout = \"2s\"\n",
                        &format!("response_timeout = \"2s\"\n{ca}"),
                    )
                    .replace("timeout = \"1s\"\n", &format!("timeout = \"1s\"\n{ca}"));
            }
            let gw = start_gateway_on(&text, listener).await;
            let free = Jar::api().get(&format!("http://{addr}/free/x")).await;
            let paid = Jar::api().get(&format!("http://{addr}/articles/x")).await;
            if trusted {
                assert_eq!(free.status, StatusCode::OK, "{}", free.text());
                assert_eq!(paid.status, StatusCode::PAYMENT_REQUIRED, "{}", paid.text());
                assert_eq!(origin.count(), 1);
                assert_eq!(sandbox.calls().create_order, 1);
            } else {
                assert_eq!(free.status, StatusCode::BAD_GATEWAY, "{}", free.text());
                assert_eq!(paid.status, StatusCode::BAD_GATEWAY, "{}", paid.text());
                assert_eq!(paid.header("cache-control"), Some("no-store"));
                assert_eq!(origin.count(), 0);
                assert_eq!(sandbox.calls().create_order, 0);
            }
            gw.shutdown().await.unwrap();
        }
        origin_tls.shutdown().await.unwrap();
        merchant_tls.shutdown().await.unwrap();
        sandbox.shutdown().await;
    })
    .await;
}
