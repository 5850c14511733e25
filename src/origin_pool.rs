//! Keep-alive HTTP/1.1 connections to a plain-`http` origin, one pool per serving thread.
//!
//! This is the proxied path's client. It does what `hyper-util`'s general-purpose pooled
//! client does for one fixed origin, with less work per request: no pool key to hash (the
//! origin is fixed), no connector clone and no background task per request, and the pool of
//! the calling serving thread only (so a request and the origin connection it borrows stay on
//! one thread, and the lock is never contended in `serve`). `https` origins (TLS, HTTP/2 by
//! ALPN) keep using `hyper-util`'s client; see [`crate::proxy::OriginClient`].
//!
//! Two kinds of connection, each with its own idle list:
//! - bodiless `GET` and `HEAD` requests, nearly all of a site's traffic, take the fast path
//!   ([`crate::origin_h1`]): the request's own task writes the request head and reads the
//!   response, and the connection is a plain socket with a read buffer;
//! - every other request (a body, an upgrade, another method) goes through a hyper client
//!   connection, which runs as a task of its own.
//!
//! Nothing a request does here writes memory that another serving thread writes too: each
//! thread's idle list is its own allocation, aligned to a cache line pair, and a response
//! body holds its thread's list, not the whole pool, to give its connection back. (With two
//! threads writing one cache line, every such write waits for the line to come over from the
//! other core: about 170–200 cycles more than a write to a line of the thread's own on this
//! project's benchmark machine, `bench/contended_add.rs`.)
//!
//! A connection is used by one request at a time. It goes back to its pool when the
//! response body has been read to its end (or at once when the response has no body); a
//! response whose body is dropped early, an upgraded (`101`) connection and a connection the
//! origin closes are never reused. Idle connections older than [`IDLE_TIMEOUT`] are dropped
//! when next looked at, and at most `max_idle` of each kind stay idle per thread.
//!
//! A fast-path request is sent once more, on a fresh connection, when a reused connection
//! fails or closes before a byte of the response arrives (the origin's keep-alive timeout
//! racing our reuse): `GET` and `HEAD` are idempotent (RFC 9110 §9.2.2). Any other request
//! is retried only when hyper reports that it was not written at all; one that may have
//! reached the origin is never sent twice.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::Either;
use http::{Method, Request, Response, StatusCode};
use http_body::{Body as _, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tracing::debug;

use crate::body::{self, Body, BoxError};
use crate::origin_h1::{self, Conn, Decoder, ExchangeError, Head, Step};

/// An idle connection unused for this long is closed instead of reused.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// Why a request could not be sent.
#[derive(Debug)]
pub enum SendError {
    /// No connection could be opened (refused, unresolvable, or timed out: `TimedOut`).
    Connect(std::io::Error),
    /// The exchange failed on an open connection.
    Http(hyper::Error),
    /// The exchange on the fast path ([`crate::origin_h1`]) failed.
    Direct(ExchangeError),
}

/// How [`H1Pool::send`] began: on an idle connection (`F` awaits its response), or with no
/// connection yet.
enum Start<F> {
    Sent(http1::SendRequest<Body>, F),
    /// Boxed: the rare case (no idle connection) should not make every request's future larger.
    Fresh(Box<Request<Body>>),
}

/// An idle connection and when it went idle.
struct Idle<C> {
    conn: C,
    since: Instant,
}

/// Adds `conn` to an idle list of at most `max_idle`, dropping the oldest to make room.
fn park<C>(list: &Mutex<Vec<Idle<C>>>, max_idle: usize, conn: C) {
    let mut idle = list.lock().unwrap_or_else(PoisonError::into_inner);
    if idle.len() >= max_idle {
        idle.remove(0);
    }
    idle.push(Idle {
        conn,
        since: Instant::now(),
    });
}

/// The per-thread pools for one origin.
pub struct H1Pool {
    /// `host:port`, resolved at each new connection.
    target: String,
    connect_timeout: Duration,
    shards: Box<[Arc<Shard>]>,
}

/// One serving thread's idle connections. Aligned so that no two threads' lists (or their
/// `Arc` counts) share a cache line, nor the pair of lines x86 processors fetch together.
#[repr(align(128))]
struct Shard {
    /// hyper's connections, for requests with a body or an upgrade and other methods.
    idle: Mutex<Vec<Idle<http1::SendRequest<Body>>>>,
    /// Connections of the fast path: bodiless `GET` and `HEAD` ([`crate::origin_h1`]).
    direct: Mutex<Vec<Idle<Conn>>>,
    max_idle: usize,
}

impl Shard {
    /// Pools a fast-path connection whose last response ended cleanly.
    fn put_direct(&self, mut conn: Conn) {
        if self.max_idle > 0 && conn.reset() {
            park(&self.direct, self.max_idle, conn);
        }
    }

    /// The most recently used idle fast-path connection that nothing arrived on since its
    /// last response; drops expired and unusable ones on the way.
    fn take_direct(&self) -> Option<Conn> {
        let mut idle = self.direct.lock().unwrap_or_else(PoisonError::into_inner);
        while let Some(entry) = idle.pop() {
            if entry.since.elapsed() <= IDLE_TIMEOUT && entry.conn.is_reusable() {
                return Some(entry.conn);
            }
        }
        None
    }

    fn put(&self, sender: http1::SendRequest<Body>) {
        if self.max_idle > 0 && !sender.is_closed() {
            park(&self.idle, self.max_idle, sender);
        }
    }
}

impl std::fmt::Debug for H1Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H1Pool")
            .field("target", &self.target)
            .field("shards", &self.shards.len())
            .finish_non_exhaustive()
    }
}

impl H1Pool {
    /// Pools for `target` (`host:port`), one per serving thread (`threads`).
    pub fn new(target: String, connect_timeout: Duration, max_idle: usize, threads: usize) -> Self {
        H1Pool {
            target,
            connect_timeout,
            shards: (0..threads.max(1))
                .map(|_| {
                    Arc::new(Shard {
                        idle: Mutex::new(Vec::new()),
                        direct: Mutex::new(Vec::new()),
                        max_idle,
                    })
                })
                .collect(),
        }
    }

    /// Sends `req` (origin-form target, `Host` set) on an idle connection of the calling
    /// thread's pool, or on a new one.
    ///
    /// On an idle connection the request is handed to it at once, before the returned future
    /// is first polled; the future then holds only the wait for the response. (Each move of
    /// the request through a nested future writes its 264 bytes into memory that, with many
    /// requests in flight, is no longer in the CPU's cache.)
    ///
    /// # Errors
    /// [`SendError`]: no connection, or the exchange failed.
    pub fn send(
        &self,
        shard: usize,
        req: Request<Body>,
    ) -> impl Future<Output = Result<Response<Body>, SendError>> + Send + '_ {
        let shard = &self.shards[shard % self.shards.len()];
        if origin_h1::eligible(&req) {
            Either::Left(self.send_direct(shard, req, None))
        } else {
            // Boxed: requests with bodies, upgrades and other methods are rare next to the
            // fast path, whose future (part of every request's) stays small without it.
            Either::Right(Box::pin(self.send_hyper(shard, req)))
        }
    }

    /// Sends a bodiless `GET` or `HEAD` without an upgrade on the fast path, to `target`
    /// (origin-form) instead of the request's own URI: the proxy builds the target as a
    /// string and need not parse it into a URI. The caller has checked the request with
    /// [`origin_h1::takes_fast_path`]; [`origin_h1::encode`] checks `target` once more before
    /// writing it.
    ///
    /// # Errors
    /// As [`H1Pool::send`].
    pub fn send_to<'a>(
        &'a self,
        shard: usize,
        req: Request<Body>,
        target: &str,
    ) -> impl Future<Output = Result<Response<Body>, SendError>> + Send + 'a {
        let shard = &self.shards[shard % self.shards.len()];
        self.send_direct(shard, req, Some(target))
    }

    /// The fast path: the request's head is written into an idle connection's buffer (or a
    /// new one) at once and the request dropped; the future writes it and reads the response
    /// in the calling task ([`crate::origin_h1`]).
    fn send_direct<'a>(
        &'a self,
        shard: &'a Arc<Shard>,
        req: Request<Body>,
        target: Option<&str>,
    ) -> impl Future<Output = Result<Response<Body>, SendError>> + Send + 'a {
        let head_request = req.method() == Method::HEAD;
        let target = target.unwrap_or_else(|| origin_h1::origin_form(&req));
        let mut idle = shard.take_direct();
        let mut fresh = Vec::new();
        let wbuf = match idle.as_mut() {
            Some(conn) => &mut conn.wbuf,
            None => {
                fresh.reserve(512);
                &mut fresh
            }
        };
        let encoded = origin_h1::encode(&req, target, wbuf);
        let start = match idle {
            Some(conn) => Ok(conn),
            None => Err(fresh),
        };
        drop(req);
        async move {
            encoded.map_err(SendError::Direct)?;
            let (mut conn, reused) = match start {
                Ok(conn) => (conn, true),
                // Boxed where entered (only when no idle connection is pooled): the connect
                // future's few hundred bytes would otherwise be part of every request's.
                Err(wbuf) => (Box::pin(self.connect_direct(wbuf)).await?, false),
            };
            let head = match conn.exchange(head_request).await {
                Ok(head) => head,
                // GET and HEAD are idempotent: a reused connection the origin closed before
                // answering gets the request once more, on a fresh connection.
                Err(ExchangeError::Unanswered(_)) if reused => {
                    let wbuf = std::mem::take(&mut conn.wbuf);
                    conn = Box::pin(self.connect_direct(wbuf)).await?;
                    conn.exchange(head_request)
                        .await
                        .map_err(SendError::Direct)?
                }
                Err(e) => return Err(SendError::Direct(e)),
            };
            Ok(respond(shard, conn, head))
        }
    }

    /// hyper's client connection, for everything the fast path does not take.
    fn send_hyper<'a>(
        &'a self,
        shard: &'a Arc<Shard>,
        req: Request<Body>,
    ) -> impl Future<Output = Result<Response<Body>, SendError>> + Send + 'a {
        let start = match take_idle(shard) {
            Some(mut sender) => {
                let response = sender.try_send_request(req);
                Start::Sent(sender, response)
            }
            None => Start::Fresh(Box::new(req)),
        };
        async move {
            let req = match start {
                Start::Sent(sender, response) => match response.await {
                    Ok(resp) => return Ok(track(shard, sender, resp)),
                    Err(mut e) => match e.take_message() {
                        // Not written: the connection was closed under us. Once more, fresh.
                        Some(unsent) => unsent,
                        None => return Err(SendError::Http(e.into_error())),
                    },
                },
                Start::Fresh(req) => *req,
            };
            let mut sender = self.connect().await?;
            match sender.try_send_request(req).await {
                Ok(resp) => Ok(track(shard, sender, resp)),
                Err(e) => Err(SendError::Http(e.into_error())),
            }
        }
    }

    async fn connect_direct(&self, wbuf: Vec<u8>) -> Result<Conn, SendError> {
        let mut conn = Conn::new(self.connect_tcp().await?);
        conn.wbuf = wbuf;
        Ok(conn)
    }

    async fn connect(&self) -> Result<http1::SendRequest<Body>, SendError> {
        let stream = self.connect_tcp().await?;
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(SendError::Http)?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                debug!(error = %e, "origin connection ended with an error");
            }
        });
        Ok(sender)
    }

    async fn connect_tcp(&self) -> Result<tokio::net::TcpStream, SendError> {
        let stream = match tokio::time::timeout(
            self.connect_timeout,
            tokio::net::TcpStream::connect(self.target.as_str()),
        )
        .await
        {
            Err(_) => {
                return Err(SendError::Connect(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("connect timed out after {:?}", self.connect_timeout),
                )))
            }
            Ok(Err(e)) => return Err(SendError::Connect(e)),
            Ok(Ok(s)) => s,
        };
        stream.set_nodelay(true).map_err(SendError::Connect)?;
        Ok(stream)
    }
}

/// The response of a fast-path exchange. A body that is already in the buffer whole (the
/// common small page) becomes a plain body and the connection goes back to `shard` at once;
/// otherwise the body reads from the connection and gives it back at its end.
fn respond(shard: &Arc<Shard>, mut conn: Conn, head: Head) -> Response<Body> {
    let Head {
        status,
        headers,
        body: decoder,
        keep_alive,
    } = head;
    let buffered = conn.buffer().len() as u64;
    let body = match decoder.remaining() {
        Some(n) if n <= buffered => {
            // `n` fits: it is at most the buffer's length.
            let data = conn.buffer().split_to(n as usize).freeze();
            if keep_alive {
                shard.put_direct(conn);
            }
            if n == 0 {
                body::empty()
            } else {
                body::full(data)
            }
        }
        _ => body::boxed(Direct {
            conn: Some(conn),
            decoder,
            keep_alive,
            shard: Arc::clone(shard),
        }),
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    *resp.headers_mut() = headers;
    resp
}

/// A fast-path response body, read from its connection as the client takes it.
struct Direct {
    /// `None` once the body has ended or broken.
    conn: Option<Conn>,
    decoder: Decoder,
    keep_alive: bool,
    shard: Arc<Shard>,
}

impl Direct {
    /// The body has ended: the connection goes back to the pool if it may be reused.
    fn finish(&mut self) {
        if let Some(conn) = self.conn.take() {
            if self.keep_alive && self.decoder.is_delimited() {
                self.shard.put_direct(conn);
            }
        }
    }

    /// The body broke: the connection is closed.
    fn fail(&mut self, e: ExchangeError) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.conn = None;
        Poll::Ready(Some(Err(Box::new(e))))
    }
}

impl http_body::Body for Direct {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match this.decoder.decode(conn.buffer()) {
                Ok(Step::Data(data)) => {
                    if this.decoder.is_done() {
                        this.finish();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Ok(Step::End) => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Ok(Step::NeedMore) => match conn.poll_fill(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Ok(0)) => match this.decoder.end_of_stream() {
                        // Read until the close: never reused.
                        Ok(()) => {
                            this.conn = None;
                            return Poll::Ready(None);
                        }
                        Err(e) => return this.fail(e),
                    },
                    Poll::Ready(Ok(_)) => {}
                    Poll::Ready(Err(e)) => return this.fail(ExchangeError::Io(e)),
                },
                Err(e) => return this.fail(e),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.conn.is_none() || self.decoder.is_done()
    }

    fn size_hint(&self) -> SizeHint {
        match self.decoder.remaining() {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

/// The most recently used idle connection of `shard` that can take a request now; drops
/// closed and expired ones on the way. Leaves alone those still finishing their last exchange.
fn take_idle(shard: &Shard) -> Option<http1::SendRequest<Body>> {
    let mut idle = shard.idle.lock().unwrap_or_else(PoisonError::into_inner);
    let mut i = idle.len();
    while i > 0 {
        i -= 1;
        let entry = &idle[i];
        if entry.conn.is_closed() || entry.since.elapsed() > IDLE_TIMEOUT {
            // The entry moved into `i` comes from the end, already looked at.
            idle.swap_remove(i);
        } else if entry.conn.is_ready() {
            return Some(idle.swap_remove(i).conn);
        }
    }
    None
}

/// Wraps the response so that its connection goes back to `shard` at the body's end.
fn track(
    shard: &Arc<Shard>,
    sender: http1::SendRequest<Body>,
    resp: Response<Incoming>,
) -> Response<Body> {
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        // The connection becomes the tunnel (see `proxy::tunnel`); never reused.
        return resp.map(body::boxed);
    }
    if resp.body().is_end_stream() {
        shard.put(sender);
        return resp.map(body::boxed);
    }
    resp.map(|inner| {
        body::boxed(Returning {
            inner,
            back: Some((Arc::clone(shard), sender)),
        })
    })
}

/// A response body that returns its connection to the pool once read to the end.
struct Returning {
    inner: Incoming,
    back: Option<(Arc<Shard>, http1::SendRequest<Body>)>,
}

impl Returning {
    fn give_back(&mut self) {
        if let Some((shard, sender)) = self.back.take() {
            shard.put(sender);
        }
    }
}

impl Drop for Returning {
    fn drop(&mut self) {
        // Read to the end but not polled past it: still reusable. Otherwise the unread rest
        // would be the next response's start, so the connection is dropped (closed).
        if self.inner.is_end_stream() {
            self.give_back();
        }
    }
}

impl http_body::Body for Returning {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            // The end, or the last frame (a server stops polling once the body says it is
            // at its end).
            Poll::Ready(None) => self.give_back(),
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => self.give_back(),
            // A broken body: the connection is not reused (dropping it closes it).
            Poll::Ready(Some(Err(_))) => self.back = None,
            _ => {}
        }
        polled.map(|f| f.map(|r| r.map_err(BoxError::from)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
