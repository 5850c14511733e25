//! The per-thread keep-alive pool for plain-http origins (`src/origin_pool.rs`), against a
//! real HTTP/1.1 origin on 127.0.0.1 that counts the connections it accepts.

mod support;

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use taler_paywall::body;
use taler_paywall::origin_pool::{H1Pool, SendError};
use tokio::net::{TcpListener, TcpStream};

use support::{bounded, closed_port};

/// An origin: `/small` answers "small", `/big` 4 MiB, `/slow` "slow" after 200 ms. Idle
/// keep-alive connections are closed after `idle_close`.
struct Origin {
    addr: std::net::SocketAddr,
    accepted: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Origin {
    /// Accepts connections on 127.0.0.1, counts them, and runs `serve` on each in a task of
    /// its own.
    async fn listen<F, Fut>(serve: F) -> Origin
    where
        F: Fn(TcpStream) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(stream));
            }
        });
        Origin {
            addr,
            accepted,
            task,
        }
    }

    async fn start(idle_close: Duration) -> Origin {
        Origin::listen(move |stream| async move {
            let service = service_fn(|req: Request<Incoming>| async move {
                let body = match req.uri().path() {
                    "/big" => Bytes::from(vec![b'x'; 4 << 20]),
                    "/slow" => {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        Bytes::from_static(b"slow")
                    }
                    _ => Bytes::from_static(b"small"),
                };
                Ok::<_, Infallible>(Response::new(Full::new(body)))
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(idle_close)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        })
        .await
    }

    fn pool(&self, max_idle: usize) -> Arc<H1Pool> {
        Arc::new(H1Pool::new(
            self.addr.to_string(),
            Duration::from_secs(2),
            max_idle,
            1,
        ))
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

fn get(path: &str) -> Request<body::Body> {
    Request::builder()
        .uri(path)
        .header("host", "origin")
        .body(body::empty())
        .unwrap()
}

async fn fetch(pool: &Arc<H1Pool>, path: &str) -> (StatusCode, Bytes) {
    let resp = pool.send(0, get(path)).await.expect("send");
    let status = resp.status();
    (status, resp.into_body().collect().await.unwrap().to_bytes())
}

#[tokio::test]
async fn sequential_requests_share_one_connection() {
    bounded(async {
        let origin = Origin::start(Duration::from_secs(30)).await;
        let pool = origin.pool(8);
        for _ in 0..20 {
            let (status, body) = fetch(&pool, "/small").await;
            assert_eq!(status, StatusCode::OK);
            assert_eq!(&body[..], b"small");
        }
        assert_eq!(
            origin.accepted(),
            1,
            "one keep-alive connection for 20 requests"
        );
    })
    .await;
}

/// Each serving thread borrows from and returns to its own idle list: a connection one
/// thread's request returned is not taken by another thread's.
#[tokio::test]
async fn each_serving_thread_keeps_its_own_idle_connections() {
    bounded(async {
        let origin = Origin::start(Duration::from_secs(30)).await;
        let pool = H1Pool::new(origin.addr.to_string(), Duration::from_secs(2), 8, 2);
        for (thread, accepted) in [(0, 1), (0, 1), (1, 2), (1, 2), (0, 2)] {
            let resp = pool.send(thread, get("/small")).await.expect("send");
            assert_eq!(resp.status(), StatusCode::OK);
            resp.into_body().collect().await.expect("body");
            assert_eq!(
                origin.accepted(),
                accepted,
                "after a request on thread {thread}"
            );
        }
    })
    .await;
}

#[tokio::test]
async fn a_connection_the_origin_closed_is_replaced_without_an_error() {
    bounded(async {
        let origin = Origin::start(Duration::from_millis(150)).await;
        let pool = origin.pool(8);
        assert_eq!(&fetch(&pool, "/small").await.1[..], b"small");
        // The origin closes the idle connection; the pool must not hand it out again.
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(&fetch(&pool, "/small").await.1[..], b"small");
        assert_eq!(origin.accepted(), 2);
    })
    .await;
}

#[tokio::test]
async fn a_body_dropped_early_never_leaks_into_the_next_response() {
    bounded(async {
        let origin = Origin::start(Duration::from_secs(30)).await;
        let pool = origin.pool(8);
        let resp = pool.send(0, get("/big")).await.expect("send");
        let mut big = resp.into_body();
        let first = big.frame().await.expect("a frame").expect("data");
        assert!(first.data_ref().is_some_and(|d| !d.is_empty()));
        drop(big);
        // The rest of /big is still on that connection: it must not be reused.
        let (status, body) = fetch(&pool, "/small").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(&body[..], b"small");
        assert_eq!(origin.accepted(), 2);
        // A body read to its end does give its connection back.
        assert_eq!(fetch(&pool, "/big").await.1.len(), 4 << 20);
        assert_eq!(&fetch(&pool, "/small").await.1[..], b"small");
        assert_eq!(origin.accepted(), 2);
    })
    .await;
}

#[tokio::test]
async fn idle_connections_are_bounded_per_thread() {
    bounded(async {
        let origin = Origin::start(Duration::from_secs(30)).await;
        let pool = origin.pool(2);
        let burst = |pool: Arc<H1Pool>| async move {
            let all = (0..5).map(|_| {
                let pool = pool.clone();
                tokio::spawn(async move { fetch(&pool, "/slow").await })
            });
            for r in futures_util::future::join_all(all).await {
                assert_eq!(&r.unwrap().1[..], b"slow");
            }
        };
        burst(pool.clone()).await;
        assert_eq!(origin.accepted(), 5, "five at once need five connections");
        burst(pool.clone()).await;
        assert_eq!(origin.accepted(), 8, "two kept idle, three new");
    })
    .await;
}

#[tokio::test]
async fn a_refused_connection_is_a_connect_error() {
    bounded(async {
        let addr = closed_port().await;
        let pool = Arc::new(H1Pool::new(addr.to_string(), Duration::from_secs(2), 8, 1));
        match pool.send(0, get("/")).await {
            Err(SendError::Connect(e)) => {
                assert_ne!(e.kind(), std::io::ErrorKind::TimedOut, "{e}");
            }
            other => panic!("expected a connect error, got {other:?}"),
        }
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// The fast path (`src/origin_h1.rs`) against an origin that writes raw bytes.

/// What a scripted origin does after its answer.
#[derive(Clone, Copy)]
enum Then {
    /// Waits for the next request on the connection.
    Keep,
    /// Closes the connection.
    Close,
    /// Sends these bytes 100 ms later, unasked, and waits for the next request.
    Unsolicited(&'static str),
}

type Script = fn(&str, bool) -> (Option<Vec<u8>>, Then);

/// An origin that answers each request head with raw bytes chosen by target, and by whether
/// it is the first request on its connection. An answer of `None` closes the connection
/// without a word.
async fn scripted(script: Script) -> Origin {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    Origin::listen(move |mut stream| async move {
        let mut pending = Vec::new();
        let mut first = true;
        loop {
            let end = loop {
                if let Some(i) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                    break i + 4;
                }
                let mut buf = [0u8; 4096];
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => pending.extend_from_slice(&buf[..n]),
                }
            };
            let head = String::from_utf8_lossy(&pending[..end]).into_owned();
            pending.drain(..end);
            let target = head.split(' ').nth(1).unwrap_or("").to_owned();
            let (answer, then) = script(&target, first);
            first = false;
            let Some(bytes) = answer else { return };
            if stream.write_all(&bytes).await.is_err() {
                return;
            }
            match then {
                Then::Keep => {}
                Then::Close => return,
                Then::Unsolicited(extra) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    let _ = stream.write_all(extra.as_bytes()).await;
                }
            }
        }
    })
    .await
}

fn answer(text: &str, then: Then) -> (Option<Vec<u8>>, Then) {
    (Some(text.as_bytes().to_vec()), then)
}

fn framing_script(target: &str, _first: bool) -> (Option<Vec<u8>>, Then) {
    match target {
        "/chunked" => answer(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
            Then::Keep,
        ),
        "/extra" => answer(
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nforged",
            Then::Keep,
        ),
        "/close" => answer(
            "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 5\r\n\r\nclose",
            Then::Close,
        ),
        "/http10" => answer("HTTP/1.0 200 OK\r\n\r\nuntil the end", Then::Close),
        "/idle-noise" => answer(
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nnoise",
            Then::Unsolicited("HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nforged"),
        ),
        "/head-only" => answer("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", Then::Keep),
        "/hints" => answer(
            "HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhints",
            Then::Keep,
        ),
        "/switch" => answer(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
            Then::Keep,
        ),
        "/te-and-cl" => answer(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            Then::Keep,
        ),
        "/big-chunked" => {
            let mut v = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
            for _ in 0..64 {
                v.extend_from_slice(b"10000\r\n");
                v.extend(std::iter::repeat_n(b'x', 0x10000));
                v.extend_from_slice(b"\r\n");
            }
            v.extend_from_slice(b"0\r\n\r\n");
            (Some(v), Then::Keep)
        }
        path => answer(
            &format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{path}",
                path.len()
            ),
            Then::Keep,
        ),
    }
}

async fn fetch_result(pool: &Arc<H1Pool>, req: Request<body::Body>) -> Result<Bytes, String> {
    let resp = pool.send(0, req).await.map_err(|e| format!("{e:?}"))?;
    match resp.into_body().collect().await {
        Ok(all) => Ok(all.to_bytes()),
        Err(e) => Err(format!("body: {e}")),
    }
}

/// Connections are reused after responses that ended cleanly (length, chunks, a `HEAD`),
/// and never after one that left bytes behind, asked to close, or ran until the close: the
/// next request always gets its own response.
#[tokio::test]
async fn the_fast_path_reuses_only_connections_that_ended_cleanly() {
    bounded(async {
        let origin = scripted(framing_script).await;
        let pool = origin.pool(8);
        let mut expect_connections = 1;
        for (target, body, reused) in [
            ("/a", "/a", true),
            ("/chunked", "abcde", true),
            ("/hints", "hints", true),
            ("/extra", "ok", false),
            ("/b", "/b", true),
            ("/close", "close", false),
            ("/c", "/c", true),
            ("/http10", "until the end", false),
            ("/d", "/d", true),
        ] {
            assert_eq!(
                fetch_result(&pool, get(target)).await.as_deref(),
                Ok(body.as_bytes()),
                "{target}"
            );
            assert_eq!(origin.accepted(), expect_connections, "{target}");
            if !reused {
                expect_connections += 1;
            }
        }
        // HEAD: the length is announced, no body is read, and the connection goes on; unless
        // the origin sent a body anyway, which is never taken for the next response.
        for (target, reused) in [("/head-only", true), ("/four", false)] {
            let head = Request::head(target).header("host", "origin");
            let resp = pool
                .send(0, head.body(body::empty()).unwrap())
                .await
                .unwrap();
            assert_eq!(resp.headers()["content-length"], "5", "{target}");
            assert!(resp
                .into_body()
                .collect()
                .await
                .unwrap()
                .to_bytes()
                .is_empty());
            assert_eq!(
                fetch_result(&pool, get("/e")).await.as_deref(),
                Ok(&b"/e"[..])
            );
            if !reused {
                expect_connections += 1;
            }
            assert_eq!(origin.accepted(), expect_connections, "{target}");
        }
        // A 4 MiB chunked body streams through and ends cleanly.
        let big = fetch_result(&pool, get("/big-chunked")).await.unwrap();
        assert_eq!(big.len(), 64 << 16);
        assert_eq!(
            fetch_result(&pool, get("/f")).await.as_deref(),
            Ok(&b"/f"[..])
        );
        assert_eq!(origin.accepted(), expect_connections);
    })
    .await;
}

/// Bytes an origin sends on an idle connection are never read as the next response.
#[tokio::test]
async fn bytes_arriving_on_an_idle_connection_close_it() {
    bounded(async {
        let origin = scripted(framing_script).await;
        let pool = origin.pool(8);
        assert_eq!(
            fetch_result(&pool, get("/idle-noise")).await.as_deref(),
            Ok(&b"noise"[..])
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            fetch_result(&pool, get("/g")).await.as_deref(),
            Ok(&b"/g"[..])
        );
        assert_eq!(origin.accepted(), 2);
    })
    .await;
}

/// Responses the fast path cannot frame unambiguously are errors, and their connections
/// are not reused.
#[tokio::test]
async fn the_fast_path_refuses_unrequested_switches_and_ambiguous_framing() {
    bounded(async {
        let origin = scripted(framing_script).await;
        let pool = origin.pool(8);
        for target in ["/switch", "/te-and-cl"] {
            let err = fetch_result(&pool, get(target)).await.unwrap_err();
            assert!(err.contains("Malformed"), "{target}: {err}");
        }
        assert_eq!(
            fetch_result(&pool, get("/h")).await.as_deref(),
            Ok(&b"/h"[..])
        );
        assert_eq!(origin.accepted(), 3);
    })
    .await;
}

fn hangup_script(target: &str, first: bool) -> (Option<Vec<u8>>, Then) {
    if first || target == "/fresh-hangup" {
        if target == "/fresh-hangup" {
            return (None, Then::Close);
        }
        return framing_script(target, first);
    }
    // A second request on a connection: closed unanswered (a keep-alive timeout race).
    (None, Then::Close)
}

/// A reused connection that the origin closes before answering gets the (idempotent)
/// request once more on a fresh connection; a fresh connection that does so is an error.
#[tokio::test]
async fn an_unanswered_request_on_a_reused_connection_is_sent_once_more() {
    bounded(async {
        let origin = scripted(hangup_script).await;
        let pool = origin.pool(8);
        assert_eq!(
            fetch_result(&pool, get("/i")).await.as_deref(),
            Ok(&b"/i"[..])
        );
        assert_eq!(
            fetch_result(&pool, get("/j")).await.as_deref(),
            Ok(&b"/j"[..])
        );
        assert_eq!(origin.accepted(), 2);
        let err = fetch_result(&pool, get("/fresh-hangup")).await.unwrap_err();
        assert!(err.contains("Unanswered"), "{err}");
    })
    .await;
}

/// A bodiless `GET` whose target the fast path does not write (raw non-ASCII in the query,
/// which the `http` crate accepts) still reaches the origin, through hyper's client.
#[tokio::test]
async fn a_target_the_fast_path_refuses_goes_through_hyper() {
    bounded(async {
        let origin = scripted(framing_script).await;
        let pool = origin.pool(8);
        let got = fetch_result(&pool, get("/q?name=caf\u{e9}")).await;
        assert_eq!(got.as_deref(), Ok("/q?name=caf\u{e9}".as_bytes()));
    })
    .await;
}
