//! Raw-socket attacks on request framing and headers (pitfalls 10–12 and 24 of
//! `shared/spec/proxy-pitfalls.md`): the gateway runs in front of a recording origin and the
//! sandbox merchant, and every test asserts what the origin received. The rule checked
//! throughout: whatever the bytes, a protected path reaches the origin only paid, and what the
//! gateway cannot frame unambiguously is refused (400/431) before anything is forwarded.
//!
//! Why smuggling cannot bypass payment here: the gateway never passes client bytes through.
//! It parses each request (hyper), decides on it, and frames a new request to the origin. A
//! "second request" hidden in a body is therefore either body bytes (forwarded as a body, never
//! parsed by the origin as a request) or a request of its own that the gateway decides on like
//! any other. The tests pin which of the two happens for each trick.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use http::StatusCode;
use support::{bounded, buy_api, raw_exchange, raw_status, raw_statuses, Jar, SandboxShop};

const NO_LIMIT: &str = "[limits]\norders_per_minute = 0\n";

async fn shop() -> SandboxShop {
    SandboxShop::start("300s", NO_LIMIT).await
}

/// Sends raw bytes and reads until the gateway closes the connection (or 5 s).
async fn raw(addr: SocketAddr, bytes: &[u8]) -> String {
    raw_exchange(addr, bytes, Duration::from_secs(5)).await
}

/// `Content-Length` together with `Transfer-Encoding`, in every spelling: either refused
/// (400) or read as chunked with the connection closed afterwards. The bytes after the chunked
/// body (a request for a protected page) never become a request, and never reach the origin.
#[tokio::test]
async fn content_length_with_transfer_encoding_never_smuggles_a_protected_request() {
    bounded(async {
        let shop = shop().await;
        let smuggled = "GET /articles/smuggled HTTP/1.1\r\nHost: g\r\n\r\n";
        // (transfer-encoding lines, expected status of the one response)
        let cases: [(&str, u16); 10] = [
            ("Transfer-Encoding: chunked\r\n", 200),
            ("Transfer-Encoding: Chunked\r\n", 200),
            ("Transfer-Encoding:\tchunked\r\n", 200),
            ("Transfer-Encoding: chunked, identity\r\n", 400),
            // hyper reads this as chunked; the gateway refuses every coding but plain chunked.
            ("Transfer-Encoding: identity, chunked\r\n", 400),
            ("Transfer-Encoding: gzip, chunked\r\n", 400),
            ("Transfer-Encoding: xchunked\r\n", 400),
            ("Transfer-Encoding: identity\r\n", 400),
            (
                "Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n",
                400,
            ),
            (
                "Transfer-Encoding: chunked\r\nTransfer-Encoding: x\r\n",
                400,
            ),
        ];
        for (te, want) in cases {
            for (cl_first, target) in [(true, "/free/a"), (false, "/free/b")] {
                let body = format!("0\r\n\r\n{smuggled}");
                let cl = format!("Content-Length: {}\r\n", body.len());
                let head = if cl_first {
                    format!("POST {target} HTTP/1.1\r\nHost: g\r\n{cl}{te}\r\n")
                } else {
                    format!("POST {target} HTTP/1.1\r\nHost: g\r\n{te}{cl}\r\n")
                };
                let r = raw(shop.addr, format!("{head}{body}").as_bytes()).await;
                assert_eq!(raw_statuses(&r), [want], "{te:?}: {r}");
            }
        }
        // The same against a protected path: the payment answer, never the origin.
        let body = format!("0\r\n\r\n{smuggled}");
        let r = raw(
            shop.addr,
            format!(
                "POST /articles/x HTTP/1.1\r\nHost: g\r\nContent-Length: {}\r\n\
                 Transfer-Encoding: chunked\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )
        .await;
        assert_eq!(raw_statuses(&r), [402], "{r}");
        assert!(
            shop.protected_hits().is_empty(),
            "{:?}",
            shop.protected_hits()
        );
        // Accepted chunked requests reached the origin with an empty body and nothing else.
        for seen in shop.origin.requests() {
            assert!(seen.target.starts_with("/free/"), "{}", seen.target);
            assert!(seen.body.is_empty(), "{:?}", seen.body);
        }
        shop.shutdown().await;
    })
    .await;
}

/// Duplicate and invalid `Content-Length` values are refused before anything is forwarded.
/// Equal duplicates are the one case RFC 9110 §8.6 lets a recipient repair: hyper keeps a
/// single value, so the request is unambiguous and handled normally (pinned here).
#[tokio::test]
async fn duplicate_and_invalid_content_lengths_are_refused() {
    bounded(async {
        let shop = shop().await;
        let cases: [(&str, u16); 9] = [
            ("Content-Length: 3\r\nContent-Length: 4\r\n", 400),
            ("Content-Length: 4\r\nContent-Length: 3\r\n", 400),
            ("Content-Length: -1\r\n", 400),
            ("Content-Length: 1 2\r\n", 400),
            ("Content-Length: +5\r\n", 400),
            ("Content-Length: 0x4\r\n", 400),
            ("Content-Length: 99999999999999999999999\r\n", 400),
            ("Content-Length: \r\n", 400),
            // A well-formed but huge length is over `max_request_body` (on a free path; a
            // protected one gets the payment answer first, without reading the body).
            ("Content-Length: 1000000000000\r\n", 413),
        ];
        for (cl, want) in cases {
            for target in ["/free/x", "/articles/x"] {
                let req = format!("POST {target} HTTP/1.1\r\nHost: g\r\n{cl}\r\nabcd");
                let r = raw(shop.addr, req.as_bytes()).await;
                let want = if want == 413 && target.starts_with("/articles") {
                    402
                } else {
                    want
                };
                assert_eq!(raw_statuses(&r), [want], "{target} {cl:?}: {r}");
            }
        }
        assert_eq!(shop.origin.count(), 0, "{:?}", shop.origin.requests());
        assert_eq!(shop.sandbox.calls().create_order, 1, "only the well-formed request");
        // Equal duplicates: one length reaches the origin, with exactly that many bytes; on a
        // protected path it is an ordinary unpaid request.
        // A list in one field is kept as is by hyper, and refused by the gateway.
        for (cl, free, paid) in [
            ("Content-Length: 4\r\nContent-Length: 4\r\n", 200, 402),
            ("Content-Length: 4, 4\r\n", 400, 400),
        ] {
            let req = format!(
                "POST /free/dup HTTP/1.1\r\nHost: g\r\n{cl}Connection: close\r\n\r\nabcdGET /articles/y HTTP/1.1\r\n\r\n"
            );
            let r = raw(shop.addr, req.as_bytes()).await;
            assert_eq!(raw_statuses(&r), [free], "{cl:?}: {r}");
            let req = format!(
                "POST /articles/dup HTTP/1.1\r\nHost: g\r\n{cl}Connection: close\r\n\r\nabcd"
            );
            let r = raw(shop.addr, req.as_bytes()).await;
            assert_eq!(raw_statuses(&r), [paid], "{cl:?}: {r}");
        }
        for seen in shop.origin.requests() {
            assert_eq!(seen.target, "/free/dup");
            assert_eq!(seen.headers.get_all("content-length").iter().count(), 1);
            assert_eq!(seen.header("content-length"), Some("4"));
            assert_eq!(&seen.body[..], b"abcd");
        }
        assert!(shop.protected_hits().is_empty());
        shop.shutdown().await;
    })
    .await;
}

/// Obsolete line folding, a space before the colon, control bytes, and bad chunk sizes:
/// refused, and nothing of them is forwarded as a protected request.
#[tokio::test]
async fn malformed_heads_and_chunks_are_refused() {
    bounded(async {
        let shop = shop().await;
        for req in [
            "GET /free/x HTTP/1.1\r\nHost: g\r\nX-A: a\r\n b\r\n\r\n",
            "GET /free/x HTTP/1.1\r\nHost: g\r\n\tevil\r\n\r\n",
            "GET /articles/x HTTP/1.1\r\nHost: g\r\nCookie: a=b\r\n taler_paywall_session=x\r\n\r\n",
            "POST /free/x HTTP/1.1\r\nHost: g\r\nTransfer-Encoding: identity\r\n chunked\r\n\r\n0\r\n\r\n",
            "POST /free/x HTTP/1.1\r\nHost: g\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
            "POST /free/x HTTP/1.1\r\nHost: g\r\nContent-Length : 4\r\n\r\nabcd",
            "GET /free/x HTTP/1.1\r\nHost: g\r\nX-A: a\0b\r\n\r\n",
            "GET /free/x HTTP/1.1\r\nHost: g\r\nX A: a\r\n\r\n",
            "GET /free/x HTTP/1.1\r\nHost: g\r\n: empty-name\r\n\r\n",
            "GET /free/x\r\nHTTP/1.1\r\nHost: g\r\n\r\n",
            "GET /free/x HTTP/1.1 junk\r\nHost: g\r\n\r\n",
            "GET /free/x HTTP/2.0\r\nHost: g\r\n\r\n",
            "GET  /free/x HTTP/1.1\r\nHost: g\r\n\r\n",
        ] {
            let r = raw(shop.addr, req.as_bytes()).await;
            // hyper refuses some of these without answering at all (an unsupported version);
            // either way there is no success.
            let statuses = raw_statuses(&r);
            assert!(statuses.is_empty() || statuses == [400], "{req:?}: {r}");
        }
        assert_eq!(shop.origin.count(), 0, "{:?}", shop.origin.requests());
        // Bad chunk sizes: the body breaks while it is being forwarded; the client gets an
        // error status or a closed connection, and the bytes after it are never a request.
        for chunks in [
            "zz\r\nabcd\r\n0\r\n\r\n",
            "ffffffffffffffffffff\r\nabcd\r\n0\r\n\r\n",
            "4\r\nabcdXX0\r\n\r\n",
            "-4\r\nabcd\r\n0\r\n\r\n",
        ] {
            let req = format!(
                "POST /free/c HTTP/1.1\r\nHost: g\r\nTransfer-Encoding: chunked\r\n\r\n{chunks}\
                 GET /articles/smuggled HTTP/1.1\r\nHost: g\r\n\r\n"
            );
            let r = raw(shop.addr, req.as_bytes()).await;
            let statuses = raw_statuses(&r);
            assert!(
                statuses.iter().all(|s| *s >= 400) && statuses.len() <= 1,
                "{chunks:?}: {r}"
            );
        }
        assert!(shop.protected_hits().is_empty(), "{:?}", shop.protected_hits());
        shop.shutdown().await;
    })
    .await;
}

/// Heads over `max_header_bytes`, and more header lines than hyper parses, get 431 before the
/// payment flow or the origin see anything.
#[tokio::test]
async fn oversized_heads_get_431() {
    bounded(async {
        let shop = shop().await;
        let big = format!("X-Big: {}\r\n", "a".repeat(80 * 1024));
        let many: String = (0..200).map(|i| format!("X-H{i}: v\r\n")).collect();
        let cookies = format!("Cookie: {}\r\n", "taler_paywall_o_x=y; ".repeat(4000));
        for extra in [&big, &many, &cookies] {
            for target in ["/free/x", "/articles/x", "/premium/"] {
                let req = format!("GET {target} HTTP/1.1\r\nHost: g\r\n{extra}\r\n");
                let r = raw(shop.addr, req.as_bytes()).await;
                assert_eq!(
                    raw_status(&r),
                    Some(431),
                    "{target}: {}",
                    &r[..r.len().min(200)]
                );
            }
        }
        assert_eq!(shop.origin.count(), 0);
        assert_eq!(shop.sandbox.calls().create_order, 0);
        assert_eq!(shop.sandbox.calls().get_order, 0);
        shop.shutdown().await;
    })
    .await;
}

/// Variants of the headers the gateway sets (underscores, odd case) and URL-override headers
/// from an untrusted peer never reach the origin; the gateway's own values do.
#[tokio::test]
async fn forwarded_header_variants_from_an_untrusted_peer_never_reach_the_origin() {
    bounded(async {
        let shop = shop().await;
        let spoof = "X_Forwarded_For: 6.6.6.6\r\nx-forwarded-FOR: 7.7.7.7\r\n\
            X-FORWARDED-HOST: evil.example\r\nX_Forwarded_Host: evil.example\r\n\
            x-forwarded-proto: https\r\nX-Forwarded-Port: 443\r\nX-Forwarded-Prefix: /premium\r\n\
            X-Forwarded-Uri: /articles/x\r\nX-Original-URL: /articles/x\r\nX-Rewrite-URL: /articles/x\r\n\
            X-Real-IP: 6.6.6.6\r\nTrue-Client-IP: 6.6.6.6\r\nForwarded: for=6.6.6.6;host=evil.example\r\n\
            Transfer_Encoding: chunked\r\nContent_Length: 5\r\nX-Request-Id: chosen-by-client\r\n";
        let req = format!(
            "GET /free/who HTTP/1.1\r\nHost: shop.example\r\n{spoof}Connection: close\r\n\r\n"
        );
        let r = raw(shop.addr, req.as_bytes()).await;
        assert_eq!(raw_status(&r), Some(200), "{r}");
        let seen = shop.origin.only_request();
        assert_eq!(seen.target, "/free/who");
        assert_eq!(seen.header("x-forwarded-for"), Some("127.0.0.1"));
        assert_eq!(seen.header("x-forwarded-proto"), Some("http"));
        assert_eq!(seen.header("x-forwarded-host"), Some("shop.example"));
        for (name, value) in &seen.headers {
            let v = value.to_str().unwrap_or("");
            assert!(
                !v.contains("6.6.6.6") && !v.contains("7.7.7.7") && !v.contains("evil.example"),
                "{name}: {v} reached the origin"
            );
            assert!(!name.as_str().contains('_'), "{name} reached the origin");
            assert!(
                !matches!(
                    name.as_str(),
                    "forwarded"
                        | "x-real-ip"
                        | "true-client-ip"
                        | "x-original-url"
                        | "x-rewrite-url"
                        | "x-forwarded-uri"
                        | "x-forwarded-prefix"
                        | "x-forwarded-port"
                ),
                "{name} reached the origin"
            );
        }
        assert_ne!(seen.header("x-request-id"), Some("chosen-by-client"));
        // A protected path with the same headers is still unpaid.
        let req = format!(
            "GET /articles/x HTTP/1.1\r\nHost: shop.example\r\n{spoof}Connection: close\r\n\r\n"
        );
        let r = raw(shop.addr, req.as_bytes()).await;
        assert_eq!(raw_status(&r), Some(402), "{r}");
        assert!(shop.protected_hits().is_empty());
        shop.shutdown().await;
    })
    .await;
}

/// `X-Forwarded-For` from an untrusted peer does not make each request a new client for the
/// order-creation limit (pitfall 19 via pitfall 10).
#[tokio::test]
async fn spoofed_client_addresses_do_not_evade_the_order_limit() {
    bounded(async {
        let shop = SandboxShop::start(
            "300s",
            "[limits]\norders_per_minute = 2\norders_burst = 2\n",
        )
        .await;
        let mut limited = 0;
        for i in 0..8 {
            let mut c = Jar::api();
            c.extra = vec![
                ("x-forwarded-for".into(), format!("10.0.0.{i}")),
                ("x-real-ip".into(), format!("10.0.1.{i}")),
                ("forwarded".into(), format!("for=10.0.2.{i}")),
            ];
            let r = c.get(&shop.url(&format!("/articles/{i}"))).await;
            match r.status {
                StatusCode::PAYMENT_REQUIRED => {}
                StatusCode::TOO_MANY_REQUESTS => limited += 1,
                other => panic!("unexpected {other}: {}", r.text()),
            }
        }
        assert_eq!(limited, 6);
        assert_eq!(shop.sandbox.calls().create_order, 2);
        shop.shutdown().await;
    })
    .await;
}

/// Naming `X-Forwarded-For`, `Cookie`, `Host` or `Content-Length` in `Connection` removes at
/// most the client's own copy: the gateway's forwarded headers stay, `Host` and the body stay,
/// the payment decision still sees the cookies, and unpaid stays unpaid.
#[tokio::test]
async fn connection_header_tricks_remove_nothing_the_gateway_relies_on() {
    bounded(async {
        let shop = shop().await;
        let req = "POST /free/conn HTTP/1.1\r\nHost: shop.example\r\nX-Forwarded-For: 6.6.6.6\r\n\
            Cookie: site=1\r\nContent-Length: 4\r\n\
            Connection: X-Forwarded-For, Cookie, Host, Content-Length, X-Request-Id, close\r\n\r\nbody";
        let r = raw(shop.addr, req.as_bytes()).await;
        assert_eq!(raw_status(&r), Some(200), "{r}");
        let seen = shop.origin.only_request();
        assert_eq!(seen.header("x-forwarded-for"), Some("127.0.0.1"));
        assert_eq!(seen.header("host"), Some("shop.example"));
        assert_eq!(seen.header("x-forwarded-host"), Some("shop.example"));
        assert_eq!(seen.header("x-request-id").map(str::len), Some(32));
        assert_eq!(&seen.body[..], b"body");
        assert!(seen.header("cookie").is_none());

        // A paid client that lists Cookie in Connection is still recognised (the decision is
        // made before hop-by-hop headers go), and its gateway cookies still never reach the
        // origin; an unpaid one stays unpaid.
        let (paid, _) = buy_api(shop.addr, &shop.sandbox.base_url(), "/articles/p").await;
        let hits = shop.protected_hits().len();
        let req = format!(
            "GET /articles/p HTTP/1.1\r\nHost: g\r\nAccept: application/json\r\n\
             Cookie: {}\r\nConnection: Cookie, close\r\n\r\n",
            paid.cookie_header()
        );
        let r = raw(shop.addr, req.as_bytes()).await;
        assert_eq!(raw_status(&r), Some(200), "{r}");
        let last = shop.origin.requests().pop().unwrap();
        assert_eq!(last.target, "/articles/p");
        assert!(last.header("cookie").is_none());
        let r = raw(
            shop.addr,
            b"GET /articles/q HTTP/1.1\r\nHost: g\r\nConnection: Cookie, Host, close\r\n\r\n",
        )
        .await;
        assert_eq!(raw_status(&r), Some(402), "{r}");
        assert_eq!(shop.protected_hits().len(), hits + 1);
        shop.shutdown().await;
    })
    .await;
}

/// Absolute-form targets with another authority, `Host` mismatches and weird hosts: the
/// decision is made on the path alone; malformed hosts are refused.
#[tokio::test]
async fn absolute_form_and_host_tricks_never_open_a_protected_path() {
    bounded(async {
        let shop = shop().await;
        for (target, host) in [
            ("http://evil.example/articles/x", "g"),
            ("https://evil.example:444/articles/x", "evil.example"),
            ("HTTP://EVIL.EXAMPLE/ARTICLES/x", "g"),
            ("http://g/free/../articles/x", "g"),
            ("http://evil.example//articles/x", "g"),
            ("http://evil.example/premium", "g"),
            ("/articles/x", "evil.example"),
            ("/articles/x", "127.0.0.1:1"),
            ("/articles/x", "[::1]:80"),
            ("/premium/", "gateway.test:80"),
            ("/articles/x", "g:65535"),
            ("/articles/x", "g:00080"),
            ("/articles/x", "[::1]:"),
        ] {
            let req = format!(
                "GET {target} HTTP/1.1\r\nHost: {host}\r\nAccept: application/json\r\n\
                 Connection: close\r\n\r\n"
            );
            let r = raw(shop.addr, req.as_bytes()).await;
            assert_eq!(raw_status(&r), Some(402), "{target} Host {host}: {r}");
        }
        for host in [
            "",
            "a b",
            "[::1",
            "evil.example@g",
            "g/articles",
            "g?x",
            "g#x",
            "g\\x",
            "g:port",
            "g:99999",
            "g:8o",
            "g:+80",
            "g:65536",
            "[::1]:x",
            "[::1]:+1",
        ] {
            let req = format!("GET /articles/x HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
            let r = raw(shop.addr, req.as_bytes()).await;
            assert_eq!(raw_status(&r), Some(400), "Host {host:?}: {r}");
            let req = format!("GET /free/x HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
            let r = raw(shop.addr, req.as_bytes()).await;
            assert_eq!(raw_status(&r), Some(400), "Host {host:?}: {r}");
        }
        assert_eq!(shop.origin.count(), 0, "{:?}", shop.origin.requests());
        // An absolute-form free request is forwarded on its path only.
        let r = raw(
            shop.addr,
            b"GET http://evil.example/free/abs?q=1 HTTP/1.1\r\nHost: g\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert_eq!(raw_status(&r), Some(200), "{r}");
        assert_eq!(shop.origin.only_request().target, "/free/abs?q=1");
        shop.shutdown().await;
    })
    .await;
}

/// HTTP/1.0 without `Host` is served like any other request: free paths pass, protected
/// paths get the payment answer.
#[tokio::test]
async fn http_1_0_without_host() {
    bounded(async {
        let shop = shop().await;
        let r = raw(shop.addr, b"GET /free/old HTTP/1.0\r\n\r\n").await;
        assert_eq!(raw_status(&r), Some(200), "{r}");
        assert_eq!(shop.origin.only_request().target, "/free/old");
        let r = raw(shop.addr, b"GET /articles/old HTTP/1.0\r\n\r\n").await;
        assert_eq!(raw_status(&r), Some(402), "{r}");
        let r = raw(
            shop.addr,
            b"GET /articles/old HTTP/1.0\r\nAccept: text/html\r\n\r\n",
        )
        .await;
        assert_eq!(raw_status(&r), Some(302), "{r}");
        assert!(shop.protected_hits().is_empty());
        shop.shutdown().await;
    })
    .await;
}

/// Pipelined requests on one connection are decided one by one: the free ones pass, the
/// protected ones get the payment answer, a paid one is served and the unpaid neighbour is not.
#[tokio::test]
async fn pipelined_free_and_protected_requests_are_decided_one_by_one() {
    bounded(async {
        let shop = shop().await;
        let inner = "GET /articles/z HTTP/1.1\r\nHost: g\r\n\r\n";
        let req = format!(
            "GET /free/1 HTTP/1.1\r\nHost: g\r\n\r\n\
             GET /articles/x HTTP/1.1\r\nHost: g\r\n\r\n\
             GET /free/2 HTTP/1.1\r\nHost: g\r\n\r\n\
             GET /premium/y HTTP/1.1\r\nHost: g\r\n\r\n\
             POST /free/3 HTTP/1.1\r\nHost: g\r\nContent-Length: {}\r\n\r\n{inner}\
             GET /free/4 HTTP/1.1\r\nHost: g\r\nConnection: close\r\n\r\n",
            inner.len()
        );
        let r = raw(shop.addr, req.as_bytes()).await;
        assert_eq!(raw_statuses(&r), [200, 402, 200, 402, 200, 200], "{r}");
        let targets: Vec<String> = shop
            .origin
            .requests()
            .into_iter()
            .map(|r| r.target)
            .collect();
        assert_eq!(targets, ["/free/1", "/free/2", "/free/3", "/free/4"]);
        // The "request" inside the POST body went to the origin as a body, not as a request.
        assert_eq!(&shop.origin.requests()[2].body[..], inner.as_bytes());

        let (paid, _) = buy_api(shop.addr, &shop.sandbox.base_url(), "/articles/paid").await;
        let hits = shop.protected_hits().len();
        let cookie = paid.cookie_header();
        let req = format!(
            "GET /articles/paid HTTP/1.1\r\nHost: g\r\nCookie: {cookie}\r\n\r\n\
             GET /articles/unpaid HTTP/1.1\r\nHost: g\r\nCookie: {cookie}\r\n\r\n\
             GET /articles/paid HTTP/1.1\r\nHost: g\r\nConnection: close\r\n\r\n"
        );
        let r = raw(shop.addr, req.as_bytes()).await;
        assert_eq!(raw_statuses(&r), [200, 402, 402], "{r}");
        assert_eq!(shop.protected_hits().len(), hits + 1);
        shop.shutdown().await;
    })
    .await;
}

/// A protected request with a body whose bytes look like a second request: the payment answer
/// is given without forwarding anything, and the body never becomes a request.
#[tokio::test]
async fn a_request_hidden_in_a_protected_body_is_never_served() {
    bounded(async {
        let shop = shop().await;
        let hidden = "GET /articles/hidden HTTP/1.1\r\nHost: g\r\n\r\n";
        let req = format!(
            "POST /articles/x HTTP/1.1\r\nHost: g\r\nContent-Length: {}\r\n\r\n{hidden}\
             GET /free/after HTTP/1.1\r\nHost: g\r\nConnection: close\r\n\r\n",
            hidden.len()
        );
        let r = raw(shop.addr, req.as_bytes()).await;
        let statuses = raw_statuses(&r);
        // Either the unread body is skipped and the next request served, or the connection is
        // closed after the answer; never three answers.
        assert!(statuses == [402, 200] || statuses == [402], "{r}");
        assert!(shop.protected_hits().is_empty());
        assert_eq!(
            shop.sandbox.calls().create_order,
            1,
            "one order: for /articles/x"
        );
        shop.shutdown().await;
    })
    .await;
}

/// Caching (pitfall 21): a paid page the origin marks `public, s-maxage` reaches the client as
/// `private` (shared caches must never store it), while every payment answer is `no-store`.
#[tokio::test]
async fn paid_responses_are_private_and_payment_answers_no_store() {
    bounded(async {
        let origin = support::TestOrigin::start(vec![(
            "/premium/",
            support::Reply::Fixed {
                status: 200,
                headers: vec![("cache-control", "public, max-age=600, s-maxage=600")],
                body: "paid page",
            },
        )])
        .await;
        let sandbox = support::start_sandbox().await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let text = support::shop_config(
            addr,
            &origin.url(),
            sandbox.base_url().as_str(),
            "300s",
            NO_LIMIT,
        );
        let gw = support::start_gateway_on(&text, listener).await;
        let r = Jar::api().get(&format!("http://{addr}/premium/")).await;
        assert_eq!(r.status, StatusCode::PAYMENT_REQUIRED);
        assert_eq!(r.header("cache-control"), Some("no-store"));
        let r = Jar::html().get(&format!("http://{addr}/premium/")).await;
        assert_eq!(r.status, StatusCode::FOUND);
        assert_eq!(r.header("cache-control"), Some("no-store"));
        let (mut paid, _) = buy_api(addr, &sandbox.base_url(), "/premium/").await;
        let r = paid.get(&format!("http://{addr}/premium/")).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(&r.body[..], b"paid page");
        let cc = r.header("cache-control").unwrap();
        assert!(cc.starts_with("private"), "{cc}");
        assert!(!cc.contains("public") && !cc.contains("s-maxage"), "{cc}");
        assert!(cc.contains("max-age=600"), "{cc}");
        gw.shutdown().await.unwrap();
        sandbox.shutdown().await;
    })
    .await;
}
