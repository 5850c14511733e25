//! End-to-end forwarding through a real gateway on 127.0.0.1: what reaches the origin, what
//! comes back, and what never passes.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::StatusCode;
use http_body_util::{BodyExt, Full};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;

use support::*;

#[tokio::test]
async fn get_head_post_and_statuses_pass_through_intact() {
    bounded(async {
        let origin = TestOrigin::start(vec![(
            "/missing",
            Reply::Fixed {
                status: 404,
                headers: vec![("x-origin", "yes")],
                body: "no such page",
            },
        )])
        .await;
        let gw = start_gateway(&ConfigBuilder::new(&origin.url()).build()).await;
        let c = client();

        let r = send(
            &c,
            request("GET", gw.addr, "/free/page?x=1&y=%20z")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.header("x-echo-target"), Some("/free/page?x=1&y=%20z"));

        let r = send(
            &c,
            request("POST", gw.addr, "/free/form")
                .header("content-type", "text/plain")
                .body(Full::new(Bytes::from_static(b"hello origin")))
                .unwrap(),
        )
        .await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.body, "hello origin");
        assert_eq!(r.header("x-echo-method"), Some("POST"));

        let r = send(
            &c,
            request("HEAD", gw.addr, "/free/page")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await;
        assert_eq!(r.status, StatusCode::OK);
        assert!(r.body.is_empty());

        let r = get(gw.addr, "/missing/x").await;
        assert_eq!(r.status, StatusCode::NOT_FOUND);
        assert_eq!(r.header("x-origin"), Some("yes"));
        assert_eq!(r.body, "no such page");

        let seen = origin.requests();
        let summary: Vec<(String, String)> = seen
            .iter()
            .map(|r| (r.method.to_string(), r.target.clone()))
            .collect();
        assert_eq!(
            summary,
            [
                ("GET".into(), "/free/page?x=1&y=%20z".into()),
                ("POST".into(), "/free/form".into()),
                ("HEAD".into(), "/free/page".into()),
                ("GET".into(), "/missing/x".into()),
            ]
        );
        assert_eq!(seen[1].body, "hello origin");
        assert_eq!(seen[1].header("content-type"), Some("text/plain"));
        gw.shutdown().await.unwrap();
    })
    .await;
}

/// The origin sends its head and a first chunk, then waits for the test. If the gateway
/// buffered the response, the client would never see the first chunk and the test would hang
/// (and fail at the bound).
#[tokio::test]
async fn slow_first_byte_reaches_the_client_at_once() {
    bounded(async {
        let release = Arc::new(Notify::new());
        let origin = TestOrigin::start(vec![(
            "/slow",
            Reply::SlowFirstByte {
                first: "first chunk;",
                rest: "rest",
                release: release.clone(),
            },
        )])
        .await;
        let gw = start_gateway(&ConfigBuilder::new(&origin.url()).build()).await;
        let resp = client()
            .request(
                request("GET", gw.addr, "/slow")
                    .body(Full::new(Bytes::new()))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let mut body = resp.into_body();
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(first, "first chunk;");
        release.notify_one();
        let rest = body.collect().await.unwrap().to_bytes();
        assert_eq!(rest, "rest");
        gw.shutdown().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn hop_by_hop_headers_are_removed_in_both_directions() {
    bounded(async {
        let origin = TestOrigin::start(vec![(
            "/hop",
            Reply::Fixed {
                status: 200,
                headers: vec![
                    ("connection", "x-origin-private"),
                    ("x-origin-private", "1"),
                    ("keep-alive", "timeout=5"),
                    ("proxy-authenticate", "Basic"),
                    ("x-origin-public", "1"),
                ],
                body: "ok",
            },
        )])
        .await;
        let gw = start_gateway(&ConfigBuilder::new(&origin.url()).build()).await;

        let r = send(
            &client(),
            request("GET", gw.addr, "/hop")
                .header(
                    "connection",
                    "keep-alive, x-client-private, x-forwarded-for",
                )
                .header("x-client-private", "1")
                .header("x-forwarded-for", "6.6.6.6")
                .header("keep-alive", "timeout=5")
                .header("te", "trailers")
                .header("proxy-authorization", "Basic c2VjcmV0")
                .header("proxy-connection", "keep-alive")
                .header("x-client-public", "1")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.header("x-origin-public"), Some("1"));
        for gone in ["x-origin-private", "keep-alive", "proxy-authenticate"] {
            assert!(r.headers.get(gone).is_none(), "{gone} reached the client");
        }

        let seen = origin.only_request();
        for gone in [
            "x-client-private",
            "keep-alive",
            "te",
            "proxy-authorization",
            "proxy-connection",
            "connection",
        ] {
            assert!(
                seen.headers.get(gone).is_none(),
                "{gone} reached the origin"
            );
        }
        assert_eq!(seen.header("x-client-public"), Some("1"));
        // Naming X-Forwarded-For in Connection removed the client's copy only; the gateway's
        // own is there.
        assert_eq!(seen.header("x-forwarded-for"), Some("127.0.0.1"));
        gw.shutdown().await.unwrap();
    })
    .await;
}

fn spoofing_request(addr: std::net::SocketAddr) -> http::Request<Full<Bytes>> {
    request("GET", addr, "/free/who")
        .header("host", "shop.example")
        .header("x-forwarded-for", "1.2.3.4")
        .header("x-forwarded-proto", "https")
        .header("x-forwarded-host", "evil.example")
        .header("forwarded", "for=1.2.3.4;proto=https")
        .header("x-real-ip", "1.2.3.4")
        .header("x_forwarded_for", "5.5.5.5")
        .header("x_forwarded-host", "evil.example")
        .header("x-original-url", "/premium/secret")
        .header("x-request-id", "client-chosen-id")
        .body(Full::new(Bytes::new()))
        .unwrap()
}

#[tokio::test]
async fn forwarded_headers_are_rebuilt_for_untrusted_peers() {
    bounded(async {
        let origin = TestOrigin::echo().await;
        let gw = start_gateway(&ConfigBuilder::new(&origin.url()).build()).await;
        let r = send(&client(), spoofing_request(gw.addr)).await;
        assert_eq!(r.status, StatusCode::OK);
        let seen = origin.only_request();
        assert_eq!(seen.header("x-forwarded-for"), Some("127.0.0.1"));
        assert_eq!(seen.header("x-forwarded-proto"), Some("http"));
        assert_eq!(seen.header("x-forwarded-host"), Some("shop.example"));
        for gone in [
            "forwarded",
            "x-real-ip",
            "x_forwarded_for",
            "x_forwarded-host",
            "x-original-url",
        ] {
            assert!(
                seen.headers.get(gone).is_none(),
                "{gone} reached the origin"
            );
        }
        assert_eq!(seen.headers.get_all("x-forwarded-for").iter().count(), 1);
        let id = seen.header("x-request-id").unwrap();
        assert_ne!(id, "client-chosen-id");
        assert_eq!(id.len(), 32);
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
        gw.shutdown().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn forwarded_headers_are_honoured_from_trusted_proxies() {
    bounded(async {
        let origin = TestOrigin::echo().await;
        let gw = start_gateway(
            &ConfigBuilder::new(&origin.url())
                .server("trusted_proxies = [\"127.0.0.0/8\"]")
                .build(),
        )
        .await;
        let r = send(&client(), spoofing_request(gw.addr)).await;
        assert_eq!(r.status, StatusCode::OK);
        let seen = origin.only_request();
        assert_eq!(seen.header("x-forwarded-for"), Some("1.2.3.4, 127.0.0.1"));
        assert_eq!(seen.header("x-forwarded-proto"), Some("https"));
        assert_eq!(seen.header("x-forwarded-host"), Some("evil.example"));
        assert_eq!(seen.header("x-request-id"), Some("client-chosen-id"));
        // Variants and URL overrides are never believed, not even from a trusted proxy.
        for gone in [
            "forwarded",
            "x-real-ip",
            "x_forwarded_for",
            "x_forwarded-host",
            "x-original-url",
        ] {
            assert!(
                seen.headers.get(gone).is_none(),
                "{gone} reached the origin"
            );
        }
        gw.shutdown().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn host_header_is_the_clients_or_the_origins_as_configured() {
    bounded(async {
        let origin = TestOrigin::echo().await;
        let gw = start_gateway(&ConfigBuilder::new(&origin.url()).build()).await;
        let req = request("GET", gw.addr, "/free/h")
            .header("host", "shop.example")
            .body(Full::new(Bytes::new()))
            .unwrap();
        send(&client(), req).await;
        assert_eq!(origin.only_request().header("host"), Some("shop.example"));
        gw.shutdown().await.unwrap();

        let origin = TestOrigin::echo().await;
        let gw = start_gateway(
            &ConfigBuilder::new(&origin.url())
                .origin("host_header = \"origin\"")
                .build(),
        )
        .await;
        let req = request("GET", gw.addr, "/free/h")
            .header("host", "shop.example")
            .body(Full::new(Bytes::new()))
            .unwrap();
        send(&client(), req).await;
        let seen = origin.only_request();
        assert_eq!(seen.header("host"), Some(origin.addr.to_string().as_str()));
        // The public host still reaches the origin, as X-Forwarded-Host.
        assert_eq!(seen.header("x-forwarded-host"), Some("shop.example"));
        gw.shutdown().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn gateway_cookies_are_stripped_and_site_cookies_kept() {
    bounded(async {
        let origin = TestOrigin::echo().await;
        let config = parse_config(&ConfigBuilder::new(&origin.url()).build(), "127.0.0.1:0");
        let mut app = taler_paywall::gateway::App::new(config).unwrap();
        app.gateway_cookie_prefixes = vec!["taler_paywall".to_owned()];
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let gw = taler_paywall::gateway::spawn_app(Arc::new(app), listener)
            .await
            .unwrap();

        let req = request("GET", gw.addr, "/free/c")
            .header(
                "cookie",
                "theme=dark; taler_paywall_session=SECRET; lang=en; taler_paywall_o1=X",
            )
            .body(Full::new(Bytes::new()))
            .unwrap();
        send(&client(), req).await;
        let req = request("GET", gw.addr, "/free/c")
            .header("cookie", "theme=dark;lang=en")
            .body(Full::new(Bytes::new()))
            .unwrap();
        send(&client(), req).await;
        let seen = origin.requests();
        assert_eq!(seen[0].header("cookie"), Some("theme=dark; lang=en"));
        // Nothing to remove: the header reaches the origin byte for byte.
        assert_eq!(seen[1].header("cookie"), Some("theme=dark;lang=en"));
        gw.shutdown().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn origin_down_gives_502() {
    bounded(async {
        let dead = closed_port().await;
        let gw = start_gateway(&ConfigBuilder::new(&format!("http://{dead}")).build()).await;
        let r = get(gw.addr, "/free/x").await;
        assert_eq!(r.status, StatusCode::BAD_GATEWAY);
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert!(
            !r.text().contains("127.0.0.1"),
            "internals leaked: {}",
            r.text()
        );
        gw.shutdown().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn slow_origin_gives_504_after_the_response_timeout() {
    bounded(async {
        let origin = TestOrigin::start(vec![("/", Reply::Never)]).await;
        let gw = start_gateway(
            &ConfigBuilder::new(&origin.url())
                .origin("response_timeout = \"300ms\"")
                .build(),
        )
        .await;
        let started = Instant::now();
        let req = request("GET", gw.addr, "/free/x")
            .header("accept", "text/html")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let r = send(&client(), req).await;
        assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT);
        assert!(r.header("content-type").unwrap().starts_with("text/html"));
        // Generous bound: the point is that it does not wait for the origin forever.
        assert!(started.elapsed() < Duration::from_secs(10));
        assert_eq!(origin.count(), 1);
        gw.shutdown().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn origin_breaking_mid_body_breaks_the_client_response() {
    bounded(async {
        let origin = TestOrigin::start(vec![(
            "/broken",
            Reply::ResetMidBody {
                promised: 10_000,
                sent: 100,
            },
        )])
        .await;
        let gw = start_gateway(&ConfigBuilder::new(&origin.url()).build()).await;
        let resp = client()
            .request(
                request("GET", gw.addr, "/broken")
                    .body(Full::new(Bytes::new()))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        // Never a clean, truncated body: the client must see an error.
        assert!(resp.into_body().collect().await.is_err());
        gw.shutdown().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn protected_paths_never_reach_the_origin_in_any_spelling() {
    bounded(async {
        let origin = TestOrigin::echo().await;
        let gw = start_gateway(&ConfigBuilder::new(&origin.url()).build()).await;
        for target in [
            "/premium/x",
            "/premium",
            "/free/../premium/x",
            "//premium/x",
            "/%70remium/x",
            "/PREMIUM/x",
            "/free/%2e%2e/premium/x",
            "/premium;a=b/x",
            "/premium/x?paid=true",
        ] {
            // A browser without a session gets the cookie check; an API client gets a
            // payment answer, here 502 because the test merchant is unreachable. Neither
            // reaches the origin.
            let r = raw_get(gw.addr, target, "Accept: text/html\r\n").await;
            assert_eq!(raw_status(&r), Some(302), "{target}: {r}");
            assert!(r.contains("no-store"), "{target}: {r}");
            let r = raw_get(gw.addr, target, "Accept: application/json\r\n").await;
            assert_eq!(raw_status(&r), Some(502), "{target}: {r}");
            assert!(r.contains("no-store"), "{target}: {r}");
        }
        for target in [
            "/premium%2Fx",
            "/x/%00",
            "/%zz",
            "/../premium",
            "/free/..%2Fpremium/x",
            "/%c0%afpremium/x",
            "/premium\\x",
        ] {
            let r = raw_get(gw.addr, target, "").await;
            assert_eq!(raw_status(&r), Some(400), "{target}: {r}");
        }
        assert_eq!(origin.count(), 0, "{:?}", origin.requests());
        // The normalised path is what the origin gets for unprotected requests.
        let r = raw_get(gw.addr, "/free/./a//b/../c", "").await;
        assert_eq!(raw_status(&r), Some(200), "{r}");
        assert_eq!(origin.only_request().target, "/free/a/c");
        gw.shutdown().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn absolute_form_targets_are_classified_and_forwarded_on_their_path_only() {
    bounded(async {
        let origin = TestOrigin::echo().await;
        let gw = start_gateway(&ConfigBuilder::new(&origin.url()).build()).await;
        let r = raw_get(gw.addr, "http://evil.example/premium/x", "").await;
        assert_eq!(raw_status(&r), Some(502), "{r}");
        assert_eq!(origin.count(), 0);

        let r = raw_get(gw.addr, "http://evil.example/free/x?q=1", "").await;
        assert_eq!(raw_status(&r), Some(200), "{r}");
        let seen = origin.only_request();
        assert_eq!(seen.target, "/free/x?q=1");
        assert_eq!(seen.header("host"), Some("gateway.test"));
        gw.shutdown().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn connect_and_bad_host_are_refused() {
    bounded(async {
        let origin = TestOrigin::echo().await;
        let gw = start_gateway(&ConfigBuilder::new(&origin.url()).build()).await;
        let r = raw_exchange(
            gw.addr,
            b"CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: 127.0.0.1:22\r\n\r\n",
            Duration::from_secs(5),
        )
        .await;
        assert_eq!(raw_status(&r), Some(400), "{r}");
        for request in [
            "GET /free/x HTTP/1.1\r\nConnection: close\r\n\r\n",
            "GET /free/x HTTP/1.1\r\nHost: a\r\nHost: b\r\nConnection: close\r\n\r\n",
            "GET /free/x HTTP/1.1\r\nHost: user@evil\r\nConnection: close\r\n\r\n",
            "GET /free/x HTTP/1.1\r\nHost: a/b\r\nConnection: close\r\n\r\n",
        ] {
            let r = raw_exchange(gw.addr, request.as_bytes(), Duration::from_secs(5)).await;
            assert_eq!(raw_status(&r), Some(400), "{request:?}: {r}");
        }
        assert_eq!(origin.count(), 0);
        gw.shutdown().await.unwrap();
    })
    .await;
}

/// Asks `gateway` to upgrade `/ws` to a WebSocket; returns the connection and the response
/// head (lowercased).
async fn open_websocket(gateway: std::net::SocketAddr) -> (TcpStream, String) {
    let mut s = TcpStream::connect(gateway).await.unwrap();
    s.write_all(
        b"GET /ws HTTP/1.1\r\nHost: gateway.test\r\nConnection: Upgrade\r\n\
          Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    (s, String::from_utf8_lossy(&head).to_ascii_lowercase())
}

/// Sends `text` through an open tunnel to the echoing origin and reads it back.
async fn echo_through(s: &mut TcpStream, text: &[u8]) {
    s.write_all(text).await.unwrap();
    let mut echoed = vec![0u8; text.len()];
    s.read_exact(&mut echoed).await.unwrap();
    assert_eq!(echoed, text);
}

#[tokio::test]
async fn websocket_upgrade_passes_through_after_the_origin_agrees() {
    bounded(async {
        let origin = TestOrigin::start(vec![("/ws", Reply::UpgradeEcho)]).await;
        let gw = start_gateway(&ConfigBuilder::new(&origin.url()).build()).await;
        let (mut s, head) = open_websocket(gw.addr).await;
        assert!(head.starts_with("http/1.1 101"), "{head}");
        assert!(head.contains("upgrade: websocket"), "{head}");
        assert!(head.contains("connection: upgrade"), "{head}");
        echo_through(&mut s, b"ping through the tunnel").await;
        let seen = origin.only_request();
        assert_eq!(seen.header("upgrade"), Some("websocket"));
        assert_eq!(
            seen.header("sec-websocket-key"),
            Some("dGhlIHNhbXBsZSBub25jZQ==")
        );
        // Shutdown closes the open tunnel at once instead of waiting out `shutdown_grace`
        // (30 s here): a tunnel has no exchange to finish.
        let stopping = Instant::now();
        gw.shutdown().await.unwrap();
        let rest = read_until_close(&mut s, Duration::from_secs(20)).await;
        assert!(rest.is_empty(), "{rest}");
        assert!(stopping.elapsed() < Duration::from_secs(10));
    })
    .await;
}

/// An upgraded connection is still a connection: it holds its `max_connections` slot for as
/// long as it lives, traffic in either direction keeps it open past `idle_timeout`, and
/// `idle_timeout` without a byte closes it (before this, tunnels ran in tasks of their own,
/// outside the limit, the idle timeout and the drain).
#[tokio::test]
async fn an_upgraded_connection_keeps_its_slot_and_is_closed_when_idle() {
    bounded(async {
        let origin = TestOrigin::start(vec![("/ws", Reply::UpgradeEcho)]).await;
        let gw = start_gateway(
            &ConfigBuilder::new(&origin.url())
                .server("max_connections = 1")
                .server("idle_timeout = \"1500ms\"")
                .build(),
        )
        .await;
        let (mut ws, head) = open_websocket(gw.addr).await;
        assert!(head.starts_with("http/1.1 101"), "{head}");
        let upgraded = Instant::now();

        // The tunnel holds the only slot: a second client waits in the backlog.
        let addr = gw.addr;
        let second = tokio::spawn(async move { raw_get(addr, "/free/2", "").await });
        // Traffic keeps the tunnel open well past idle_timeout.
        for _ in 0..4 {
            tokio::time::sleep(Duration::from_millis(600)).await;
            echo_through(&mut ws, b"still here").await;
        }
        assert!(upgraded.elapsed() > Duration::from_millis(2000));
        assert!(!second.is_finished(), "served beyond max_connections");

        // Silence for idle_timeout closes the tunnel, and the waiting client gets its slot.
        let quiet = Instant::now();
        let rest = read_until_close(&mut ws, Duration::from_secs(10)).await;
        assert!(rest.is_empty(), "{rest}");
        let waited = quiet.elapsed();
        assert!(waited >= Duration::from_millis(1200), "{waited:?}");
        assert!(waited < Duration::from_secs(8), "{waited:?}");
        let r = second.await.unwrap();
        assert_eq!(raw_status(&r), Some(200), "{r}");
        gw.shutdown().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn request_bodies_over_the_limit_get_413() {
    bounded(async {
        let origin = TestOrigin::echo().await;
        let gw = start_gateway(
            &ConfigBuilder::new(&origin.url())
                .tail("[limits]\nmax_request_body = 1024")
                .build(),
        )
        .await;
        // Declared too large: refused before the origin is contacted.
        let req = request("POST", gw.addr, "/free/up")
            .body(Full::new(Bytes::from(vec![b'a'; 2048])))
            .unwrap();
        let r = send(&client(), req).await;
        assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(origin.count(), 0);

        // Chunked, so only discovered mid-stream.
        let mut raw = b"POST /free/up HTTP/1.1\r\nHost: gateway.test\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n".to_vec();
        for _ in 0..4 {
            raw.extend_from_slice(b"200\r\n");
            raw.extend_from_slice(&[b'b'; 0x200]);
            raw.extend_from_slice(b"\r\n");
        }
        raw.extend_from_slice(b"0\r\n\r\n");
        let r = raw_exchange(gw.addr, &raw, Duration::from_secs(10)).await;
        assert_eq!(raw_status(&r), Some(413), "{r}");
        // Whatever the origin may have started to receive, it never got a complete request.
        assert!(origin.requests().iter().all(|r| r.body.len() <= 1024));

        // At the limit is fine.
        let req = request("POST", gw.addr, "/free/up")
            .body(Full::new(Bytes::from(vec![b'a'; 1024])))
            .unwrap();
        let r = send(&client(), req).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.body.len(), 1024);
        gw.shutdown().await.unwrap();
    })
    .await;
}

/// What hyper does with ambiguous framing, pinned: conflicting `Content-Length` values get
/// 400; `Content-Length` + `Transfer-Encoding: chunked` is read as chunked (RFC 9112 §6.3),
/// the connection is closed afterwards, and the bytes after the chunked body, a smuggled
/// second request, never reach the origin.
#[tokio::test]
async fn ambiguous_framing_cannot_smuggle_a_request() {
    bounded(async {
        let origin = TestOrigin::echo().await;
        let gw = start_gateway(&ConfigBuilder::new(&origin.url()).build()).await;

        let r = raw_exchange(
            gw.addr,
            b"POST /free/a HTTP/1.1\r\nHost: g\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
            Duration::from_secs(5),
        )
        .await;
        assert_eq!(raw_status(&r), Some(400), "{r}");
        assert_eq!(origin.count(), 0);

        let smuggle = b"POST /free/a HTTP/1.1\r\nHost: g\r\nContent-Length: 4\r\n\
            Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /premium/x HTTP/1.1\r\nHost: g\r\n\r\n";
        let r = raw_exchange(gw.addr, smuggle, Duration::from_secs(5)).await;
        assert_eq!(r.matches("HTTP/1.1 ").count(), 1, "{r}");
        assert_eq!(raw_status(&r), Some(200), "{r}");
        let seen = origin.only_request();
        assert_eq!(seen.target, "/free/a");
        assert!(seen.body.is_empty());

        let smuggle = b"POST /free/b HTTP/1.1\r\nHost: g\r\nTransfer-Encoding: chunked\r\n\
            Content-Length: 40\r\n\r\n0\r\n\r\nGET /premium/x HTTP/1.1\r\nHost: g\r\n\r\n";
        let r = raw_exchange(gw.addr, smuggle, Duration::from_secs(5)).await;
        assert_eq!(r.matches("HTTP/1.1 ").count(), 1, "{r}");
        let targets: Vec<String> = origin.requests().into_iter().map(|r| r.target).collect();
        assert_eq!(targets, ["/free/a", "/free/b"]);
        gw.shutdown().await.unwrap();
    })
    .await;
}

/// `handle` is generic over the body: the pipeline can be driven without a socket.
#[tokio::test]
async fn the_pipeline_runs_without_a_socket() {
    bounded(async {
        let origin = TestOrigin::echo().await;
        let config = parse_config(&ConfigBuilder::new(&origin.url()).build(), "127.0.0.1:0");
        let app = taler_paywall::gateway::App::new(config).unwrap();
        let gw = taler_paywall::gateway::Gateway::new(Arc::new(app));
        let conn = taler_paywall::server::ConnInfo::new(
            "192.0.2.7:5000".parse().unwrap(),
            "127.0.0.1:8080".parse().unwrap(),
            true,
        );
        let req = http::Request::builder()
            .method("PUT")
            .uri("/free/doc")
            .header("host", "shop.example")
            .body(Full::new(Bytes::from_static(b"payload")))
            .unwrap();
        let resp = gw.handle(req, conn.clone()).await;
        assert_eq!(resp.status(), StatusCode::OK);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "payload");
        let seen = origin.only_request();
        assert_eq!(seen.header("x-forwarded-for"), Some("192.0.2.7"));
        assert_eq!(seen.header("x-forwarded-proto"), Some("https"));

        let req = http::Request::builder()
            .uri("/premium/doc")
            .header("host", "shop.example")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = gw.handle(req, conn).await;
        assert_eq!(
            resp.status(),
            StatusCode::BAD_GATEWAY,
            "unreachable test merchant"
        );
        assert_eq!(resp.headers()["cache-control"], "no-store");
        assert_eq!(origin.count(), 1);
    })
    .await;
}

/// Both ways to the origin (the fast path for bodiless `GET`/`HEAD`, hyper's client for the
/// rest) send the same target: the origin URL's path, the normalised path and the raw query.
#[tokio::test]
async fn every_method_reaches_the_origin_path_with_the_same_target() {
    bounded(async {
        let origin = TestOrigin::echo().await;
        let url = format!("{}/site", origin.url());
        let gw = start_gateway(&ConfigBuilder::new(&url).build()).await;
        for method in ["GET", "HEAD", "POST", "DELETE"] {
            let req = request(method, gw.addr, "/free/./a//b?q=1&r=%20x")
                .body(Full::new(Bytes::new()))
                .unwrap();
            let r = send(&client(), req).await;
            assert_eq!(r.status, StatusCode::OK, "{method}");
        }
        let seen = origin.requests();
        assert_eq!(seen.len(), 4);
        for r in &seen {
            assert_eq!(r.target, "/site/free/a/b?q=1&r=%20x", "{}", r.method);
        }
        gw.shutdown().await.unwrap();
    })
    .await;
}
