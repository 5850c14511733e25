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
use tokio::net::TcpListener;

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
    async fn start(idle_close: Duration) -> Origin {
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
                tokio::spawn(async move {
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
                });
            }
        });
        Origin {
            addr,
            accepted,
            task,
        }
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
