//! The listener and the binary: shutdown, memory under a large stream, protocols, TLS,
//! connection timeouts, start-up failures.

mod support;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::Notify;

use support::*;

/// Shutdown lets the request in flight finish, and only then does the server return.
#[tokio::test]
async fn graceful_shutdown_completes_the_in_flight_request() {
    bounded(async {
        let release = Arc::new(Notify::new());
        let origin = TestOrigin::start(vec![(
            "/slow",
            Reply::Hold {
                release: release.clone(),
                body: "finished",
            },
        )])
        .await;
        let gw = start_gateway(&ConfigBuilder::new(&origin.url()).build()).await;
        let addr = gw.addr;
        let in_flight = tokio::spawn(async move { get(addr, "/slow").await });
        while origin.count() == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let stopping = tokio::spawn(gw.shutdown());
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            !stopping.is_finished(),
            "the server returned with a request in flight"
        );
        // New connections are no longer accepted.
        assert!(TcpStream::connect(addr).await.is_err());
        release.notify_one();
        let r = in_flight.await.unwrap();
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.body, "finished");
        stopping.await.unwrap().unwrap();
    })
    .await;
}

/// After the grace period, a request that still has not finished is cut off and the server
/// returns anyway.
#[tokio::test]
async fn shutdown_gives_up_after_the_grace_period() {
    bounded(async {
        let origin = TestOrigin::start(vec![("/", Reply::Never)]).await;
        let gw = start_gateway(
            &ConfigBuilder::new(&origin.url())
                .server("shutdown_grace = \"200ms\"")
                .build(),
        )
        .await;
        let addr = gw.addr;
        let in_flight = tokio::spawn(async move {
            client()
                .request(
                    request("GET", addr, "/free/x")
                        .body(Full::new(Bytes::new()))
                        .unwrap(),
                )
                .await
        });
        while origin.count() == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        gw.shutdown().await.unwrap();
        assert!(in_flight.await.unwrap().is_err());
    })
    .await;
}

/// 100 MiB down and 100 MiB up through the real binary: bodies are streamed, so the gateway's peak memory stays
/// far below the body size.
#[tokio::test]
async fn a_100_mib_response_and_upload_stream_through_the_binary_with_flat_memory() {
    bounded(async {
        const SIZE: u64 = 100 * 1024 * 1024;
        let origin = TestOrigin::start(vec![
            ("/big", Reply::Stream { bytes: SIZE }),
            ("/upload", Reply::Count),
        ])
        .await;
        let gw = BinaryGateway::start(&ConfigBuilder::new(&origin.url()).build()).await;
        let before = gw.peak_rss_kib();
        let resp = client()
            .request(
                request("GET", gw.addr, "/big")
                    .body(Full::new(Bytes::new()))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()["content-length"], SIZE.to_string().as_str());
        let mut body = resp.into_body();
        let mut total = 0u64;
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame.unwrap().into_data() {
                total += data.len() as u64;
            }
        }
        assert_eq!(total, SIZE);
        let peak = gw.peak_rss_kib();
        eprintln!("gateway VmHWM: {before} KiB at start, {peak} KiB after streaming 100 MiB down");
        assert!(peak < 60 * 1024, "peak RSS {peak} KiB");

        // And 100 MiB up: the request body is streamed to the origin too.
        let mut s = TcpStream::connect(gw.addr).await.unwrap();
        let head = format!(
            "POST /upload HTTP/1.1\r\nHost: g\r\nContent-Length: {SIZE}\r\nConnection: close\r\n\r\n"
        );
        s.write_all(head.as_bytes()).await.unwrap();
        let chunk = vec![b'u'; 64 * 1024];
        for _ in 0..(SIZE / chunk.len() as u64) {
            s.write_all(&chunk).await.unwrap();
        }
        let answer = read_until_close(&mut s, Duration::from_secs(30)).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.ends_with(&SIZE.to_string()), "{answer}");
        let peak = gw.peak_rss_kib();
        eprintln!("gateway VmHWM: {peak} KiB after streaming 100 MiB up");
        assert!(peak < 60 * 1024, "peak RSS {peak} KiB");
        let status = gw.terminate().await;
        assert!(status.success(), "exit status after SIGTERM: {status}");
    })
    .await;
}

/// The serving threads listen with `SO_REUSEPORT`, which would let a second gateway of the
/// same user bind the same port and take half the connections: a second `serve` on a running
/// gateway's address must fail at startup instead.
#[tokio::test]
async fn a_second_gateway_cannot_share_a_running_gateways_port() {
    bounded(async {
        let template = ConfigBuilder::new("http://127.0.0.1:9").build();
        let mut first =
            BinaryGateway::start_with_env(&template, &[("TALER_PAYWALL_WORKER_THREADS", "2")])
                .await;
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("gateway.toml");
        std::fs::write(
            &config,
            template.replace("{{listen}}", &first.addr.to_string()),
        )
        .unwrap();
        let mut second = std::process::Command::new(BinaryGateway::exe())
            .args(["serve", "--config"])
            .arg(&config)
            .env("TALER_PAYWALL_WORKER_THREADS", "2")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // It must give up at once; one that keeps running shares the port.
        let mut waited = Duration::ZERO;
        while second.try_wait().unwrap().is_none() {
            if waited > Duration::from_secs(10) {
                let _ = second.kill();
                panic!("a second gateway is serving on {}", first.addr);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            waited += Duration::from_millis(50);
        }
        let out = second.wait_with_output().unwrap();
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("cannot listen on"), "{stderr}");
        // The first one still answers (its origin is down: a 502 of its own).
        let resp = get(first.addr, "/free/still-here").await;
        assert_eq!(resp.status, StatusCode::BAD_GATEWAY);
        first.stop().await;
    })
    .await;
}

#[tokio::test]
async fn serve_fails_with_a_one_line_reason_when_the_port_is_in_use() {
    bounded(async {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("gateway.toml");
        let text = ConfigBuilder::new("http://127.0.0.1:9")
            .build()
            .replace("{{listen}}", &addr.to_string());
        std::fs::write(&config, text).unwrap();
        let out = std::process::Command::new(BinaryGateway::exe())
            .args(["serve", "--config"])
            .arg(&config)
            .output()
            .unwrap();
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{stderr}");
        assert!(lines[0].contains("cannot listen on"), "{stderr}");
        assert!(lines[0].contains(&addr.to_string()), "{stderr}");
    })
    .await;
}

#[tokio::test]
async fn h2c_with_prior_knowledge_is_served() {
    bounded(async {
        let origin = TestOrigin::echo().await;
        let gw = start_gateway(&ConfigBuilder::new(&origin.url()).build()).await;
        let req = request("POST", gw.addr, "/free/h2?a=b")
            .body(Full::new(Bytes::from_static(b"over h2")))
            .unwrap();
        let r = send(&h2c_client(), req).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.body, "over h2");
        let seen = origin.only_request();
        assert_eq!(seen.target, "/free/h2?a=b");
        assert_eq!(seen.version, http::Version::HTTP_11);
        // :authority became Host.
        assert_eq!(seen.header("host"), Some(gw.addr.to_string().as_str()));
        assert_eq!(seen.header("x-forwarded-for"), Some("127.0.0.1"));

        let req = request("GET", gw.addr, "/premium/x")
            .body(Full::new(Bytes::new()))
            .unwrap();
        // The test merchant is unreachable: the protected path fails closed.
        assert_eq!(
            send(&h2c_client(), req).await.status,
            StatusCode::BAD_GATEWAY
        );
        assert_eq!(origin.count(), 1);
        gw.shutdown().await.unwrap();
    })
    .await;
}

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

async fn tls_connect(
    addr: std::net::SocketAddr,
    alpn: &[u8],
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let pem = std::fs::read(fixture("localhost.crt")).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = vec![alpn.to_vec()];
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
        .unwrap()
}

#[tokio::test]
async fn tls_is_terminated_with_h2_and_http1_by_alpn() {
    bounded(async {
        let origin = TestOrigin::echo().await;
        let tls = format!(
            "[server.tls]\ncert_file = \"{}\"\nkey_file = \"{}\"",
            fixture("localhost.crt").display(),
            fixture("localhost.key").display()
        );
        let gw = start_gateway(&ConfigBuilder::new(&origin.url()).tail(&tls).build()).await;

        let io = tls_connect(gw.addr, b"h2").await;
        assert_eq!(io.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        let (mut h2, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
                .await
                .unwrap();
        tokio::spawn(conn);
        let req = http::Request::builder()
            .uri(format!("https://localhost:{}/free/tls", gw.addr.port()))
            .body(Full::new(Bytes::from_static(b"secret")))
            .unwrap();
        let resp = h2.send_request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(
            resp.into_body().collect().await.unwrap().to_bytes(),
            "secret"
        );

        let io = tls_connect(gw.addr, b"http/1.1").await;
        let (mut h1, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .unwrap();
        tokio::spawn(conn);
        let req = http::Request::builder()
            .uri("/free/tls1")
            .header("host", "localhost")
            .body(Full::new(Bytes::new()))
            .unwrap();
        assert_eq!(h1.send_request(req).await.unwrap().status(), StatusCode::OK);

        let seen = origin.requests();
        assert_eq!(seen.len(), 2);
        assert!(seen
            .iter()
            .all(|r| r.header("x-forwarded-proto") == Some("https")));
        gw.shutdown().await.unwrap();
    })
    .await;
}

/// A client that opens a connection and sends half a request head is cut off after
/// `header_read_timeout`; nothing reaches the origin.
#[tokio::test]
async fn a_slow_request_head_is_cut_off() {
    bounded(async {
        let origin = TestOrigin::echo().await;
        let gw = start_gateway(
            &ConfigBuilder::new(&origin.url())
                .server("header_read_timeout = \"300ms\"")
                .build(),
        )
        .await;
        let mut s = TcpStream::connect(gw.addr).await.unwrap();
        s.write_all(b"GET /free/x HTTP/1.1\r\nHost: g\r\n")
            .await
            .unwrap();
        let started = std::time::Instant::now();
        // Closed by the gateway (read returns), well before the 10 s this waits at most.
        let _ = read_until_close(&mut s, Duration::from_secs(10)).await;
        assert!(started.elapsed() < Duration::from_secs(5));
        // A silent connection is cut off too.
        let mut silent = TcpStream::connect(gw.addr).await.unwrap();
        let started = std::time::Instant::now();
        let _ = read_until_close(&mut silent, Duration::from_secs(10)).await;
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(origin.count(), 0);
        gw.shutdown().await.unwrap();
    })
    .await;
}

/// An idle keep-alive connection is closed after `idle_timeout`, while a short
/// `header_read_timeout` does not cut it off earlier.
#[tokio::test]
async fn idle_keep_alive_connections_are_closed_after_the_idle_timeout() {
    bounded(async {
        let origin = TestOrigin::echo().await;
        let gw = start_gateway(
            &ConfigBuilder::new(&origin.url())
                .server("idle_timeout = \"1500ms\"")
                .server("header_read_timeout = \"300ms\"")
                .build(),
        )
        .await;
        let mut s = TcpStream::connect(gw.addr).await.unwrap();
        s.write_all(b"GET /free/1 HTTP/1.1\r\nHost: g\r\n\r\n")
            .await
            .unwrap();
        // Read the first response (small: fits one read).
        let mut buf = vec![0u8; 4096];
        let n = tokio::io::AsyncReadExt::read(&mut s, &mut buf)
            .await
            .unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
        // Still open after more than header_read_timeout of idleness...
        tokio::time::sleep(Duration::from_millis(700)).await;
        s.write_all(b"GET /free/2 HTTP/1.1\r\nHost: g\r\n\r\n")
            .await
            .unwrap();
        let n = tokio::io::AsyncReadExt::read(&mut s, &mut buf)
            .await
            .unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
        // ...and closed once idle_timeout passes.
        let started = std::time::Instant::now();
        let rest = read_until_close(&mut s, Duration::from_secs(10)).await;
        assert!(rest.is_empty(), "{rest}");
        assert!(started.elapsed() < Duration::from_secs(8));
        assert_eq!(origin.count(), 2);
        gw.shutdown().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn an_oversized_request_head_is_refused() {
    bounded(async {
        let origin = TestOrigin::echo().await;
        let gw = start_gateway(
            &ConfigBuilder::new(&origin.url())
                .server("max_header_bytes = 16384")
                .build(),
        )
        .await;
        let big = "a".repeat(32 * 1024);
        let r = raw_get(gw.addr, "/free/x", &format!("X-Big: {big}\r\n")).await;
        assert_eq!(raw_status(&r), Some(431), "{r}");
        let r = raw_get(gw.addr, "/free/x", "X-Small: 1\r\n").await;
        assert_eq!(raw_status(&r), Some(200), "{r}");
        assert_eq!(origin.count(), 1);
        gw.shutdown().await.unwrap();
    })
    .await;
}

/// `serve` runs one runtime per thread, each accepting on its own `SO_REUSEPORT` listener and
/// with its own origin pool: with 4 threads, concurrent clients are all answered by the
/// origin, SIGTERM ends the process cleanly, and every request's log line (written by the
/// background log writer) is on stderr when the process has exited.
#[tokio::test]
async fn the_binary_serves_from_several_threads_and_flushes_every_log_line_at_exit() {
    bounded(async {
        let origin = TestOrigin::echo().await;
        let gw = BinaryGateway::start_with_env(
            &ConfigBuilder::new(&origin.url()).build(),
            &[("TALER_PAYWALL_WORKER_THREADS", "4"), ("RUST_LOG", "info")],
        )
        .await;
        let addr = gw.addr;
        let clients: Vec<_> = (0..32)
            .map(|c| {
                tokio::spawn(async move {
                    let mut statuses = Vec::new();
                    for r in 0..3 {
                        let resp = raw_get(addr, &format!("/free/c{c}-r{r}"), "").await;
                        statuses.push((raw_status(&resp), resp.contains(&format!("c{c}-r{r}"))));
                    }
                    statuses
                })
            })
            .collect();
        for c in clients {
            for (status, echoed) in c.await.unwrap() {
                assert_eq!(status, Some(200));
                assert!(
                    echoed,
                    "the origin's answer names the path it was asked for"
                );
            }
        }
        let serving = std::fs::read_dir(format!("/proc/{}/task", gw.pid()))
            .unwrap()
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
            .filter(|name| name.starts_with("serve-"))
            .count();
        assert_eq!(
            serving, 4,
            "one serving thread per TALER_PAYWALL_WORKER_THREADS"
        );
        let mut gw = gw;
        let status = gw.stop().await;
        assert!(status.success(), "exit status {status}");
        let log = gw.stderr();
        for c in 0..32 {
            for r in 0..3 {
                let path = format!("path=/free/c{c}-r{r} ");
                assert_eq!(
                    log.lines()
                        .filter(|l| l.contains(&path) && l.contains("status=200"))
                        .count(),
                    1,
                    "one request line for {path}"
                );
            }
        }
        assert!(log.contains("taler-paywall stopped"), "{log}");
    })
    .await;
}

/// At `max_connections`, a further client waits (in the kernel backlog) until a slot frees.
#[tokio::test]
async fn connections_beyond_the_limit_wait_for_a_free_slot() {
    bounded(async {
        let origin = TestOrigin::echo().await;
        let gw = start_gateway(
            &ConfigBuilder::new(&origin.url())
                .server("max_connections = 1")
                .build(),
        )
        .await;
        let mut first = TcpStream::connect(gw.addr).await.unwrap();
        first
            .write_all(b"GET /free/1 HTTP/1.1\r\nHost: g\r\n\r\n")
            .await
            .unwrap();
        let mut buf = vec![0u8; 4096];
        let n = tokio::io::AsyncReadExt::read(&mut first, &mut buf)
            .await
            .unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));

        let addr = gw.addr;
        let second = tokio::spawn(async move { raw_get(addr, "/free/2", "").await });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!second.is_finished(), "served beyond max_connections");
        assert_eq!(origin.count(), 1);
        drop(first);
        let r = second.await.unwrap();
        assert_eq!(raw_status(&r), Some(200), "{r}");
        assert_eq!(origin.count(), 2);
        gw.shutdown().await.unwrap();
    })
    .await;
}
