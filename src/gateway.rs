//! One request, from arrival to response, as a sequence of named steps:
//!
//! 1. [`assign_request_id`]: a fresh id, or a trusted proxy's;
//! 2. [`reject_unacceptable`]: what hyper let through but the gateway refuses (`CONNECT`,
//!    ambiguous framing, a missing or malformed `Host`) → 400;
//! 3. [`normalize_path`]: the one canonical path ([`crate::path`]) → 400 if there is none;
//! 4. classify: [`Policy::classify`] on that path;
//! 5. unprotected → [`OriginClient::forward`] with the same path;
//!    protected → [`Gateway::handle_protected`], which never contacts the origin unpaid;
//! 6. the outer [`Gateway::handle`] turns a [`GatewayError`] into a page (one exhaustive
//!    `match`) and writes the one log line of the request.
//!
//! [`spawn`] and [`serve`] put a [`Gateway`] behind [`crate::server::run`].

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use anyhow::Context as _;
use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tracing::{info, warn, Instrument as _};

use crate::body::{Body, BoxError};
use crate::config::{Config, Mode};
use crate::flow::{Outcome as PaymentOutcome, PaymentGate};
use crate::metrics::{Metrics, OriginErrorKind, RequestOutcome};
use crate::pages;
use crate::path::{self, NormalizedPath, PathError};
use crate::policy::{Policy, ProtectedRoute};
use crate::proxy::{ForwardContext, OriginClient, ProxyError};
use crate::server::{self, ConnInfo, ServerOptions};
use crate::session;

/// Everything built once at startup and shared by all requests. It never changes while
/// requests run; a reload (SIGHUP) builds a new `App` and swaps the pointer in [`Gateway`],
/// so in-flight requests finish on the snapshot they started with.
#[derive(Debug)]
pub struct App {
    /// The validated configuration.
    pub config: Arc<Config>,
    /// The protected prefixes.
    pub policy: Policy,
    /// The pooled client for the origin.
    pub origin: OriginClient,
    /// Cookies whose names start with one of these are the gateway's own and are never sent
    /// to the origin.
    pub gateway_cookie_prefixes: Vec<String>,
    /// The payment side: merchant client, cookie keys, per-process grant table and limits.
    pub payment: PaymentGate,
    /// The process's metrics (shared by the `App`s a process builds across reloads).
    pub metrics: Arc<Metrics>,
}

impl App {
    /// Builds the shared state from a validated configuration.
    ///
    /// # Errors
    /// The origin or merchant client cannot be set up (e.g. an unusable `ca_file`).
    pub fn new(config: Config) -> anyhow::Result<Self> {
        Self::with_metrics(config, Arc::new(Metrics::new()))
    }

    /// Like [`App::new`], counting into `metrics` (kept across reloads).
    ///
    /// # Errors
    /// As [`App::new`].
    pub fn with_metrics(config: Config, metrics: Arc<Metrics>) -> anyhow::Result<Self> {
        let policy = Policy::new(config.protect_rules());
        let origin = OriginClient::new(&config)?;
        let payment = PaymentGate::new(&config)?.with_metrics(metrics.clone());
        Ok(App {
            config: Arc::new(config),
            policy,
            origin,
            gateway_cookie_prefixes: vec![
                session::COOKIE_PREFIX.to_owned(),
                format!("__Host-{}", session::COOKIE_PREFIX),
            ],
            payment,
            metrics,
        })
    }

    /// Like [`App::with_metrics`], for a reload that replaces `previous`: the payment gate
    /// takes over the order limits and recent grants that still apply
    /// ([`PaymentGate::carry_over`]).
    ///
    /// # Errors
    /// As [`App::new`].
    pub fn reloaded(config: Config, metrics: Arc<Metrics>, previous: &App) -> anyhow::Result<Self> {
        let mut app = Self::with_metrics(config, metrics)?;
        app.payment = app.payment.carry_over(&previous.payment);
        Ok(app)
    }

    /// The address order creation is limited by: the TCP peer, or, when the peer is a
    /// trusted proxy, the right-most `X-Forwarded-For` entry that is not itself trusted.
    pub fn client_ip(&self, headers: &http::HeaderMap, peer: IpAddr) -> IpAddr {
        let peer = peer.to_canonical();
        if !self.trusts(peer) {
            return peer;
        }
        let mut hops: Vec<IpAddr> = Vec::new();
        for v in headers.get_all("x-forwarded-for") {
            let Ok(s) = v.to_str() else { return peer };
            for item in s.split(',') {
                match item.trim().parse::<IpAddr>() {
                    Ok(ip) => hops.push(ip.to_canonical()),
                    // An unparsable hop: stop believing the chain at this point.
                    Err(_) => hops.clear(),
                }
            }
        }
        hops.into_iter()
            .rev()
            .find(|ip| !self.trusts(*ip))
            .unwrap_or(peer)
    }

    /// Whether `ip` is in `server.trusted_proxies`.
    pub fn trusts(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.config
            .server
            .trusted_proxies
            .iter()
            .any(|net| net.contains(&ip))
    }
}

/// What every step of one request may need, borrowed from the request's snapshot of [`App`].
#[derive(Debug, Clone)]
pub struct RequestContext<'a> {
    /// The shared state this request runs against (one snapshot for the whole request).
    pub app: &'a App,
    /// The connection the request came on.
    pub conn: &'a ConnInfo,
    /// Whether the TCP peer is a trusted proxy.
    pub peer_trusted: bool,
    /// The request id (also sent to the origin as `X-Request-Id`).
    pub request_id: HeaderValue,
    /// Whether the client prefers HTML pages to JSON.
    pub html: bool,
}

impl RequestContext<'_> {
    /// The facts [`OriginClient::forward`] needs.
    pub fn forward_context(&self) -> ForwardContext<'_> {
        ForwardContext {
            // `::ffff:1.2.3.4` (a dual-stack listener) is forwarded as `1.2.3.4`.
            peer: &self.conn.peer_ip_header,
            peer_trusted: self.peer_trusted,
            tls: self.conn.tls,
            request_id: &self.request_id,
            strip_cookie_prefixes: &self.app.gateway_cookie_prefixes,
        }
    }

    /// The span carrying the request id into what the payment flow and forward-auth log
    /// (merchant errors, rate limits). The unprotected path logs nothing inside, so it makes
    /// no span: the request line carries the id itself.
    fn span(&self) -> tracing::Span {
        let id = self.request_id.to_str().unwrap_or("-");
        tracing::info_span!("request", id = %id)
    }
}

/// Why a request failed. Each variant maps to one status in [`GatewayError::status`].
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The request is malformed or uses something the gateway refuses (400).
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    /// The path cannot be normalised without ambiguity (400).
    #[error("bad path")]
    BadPath(#[from] PathError),
    /// Forwarding to the origin failed.
    #[error(transparent)]
    Proxy(#[from] ProxyError),
    /// A bug or an impossible state (500).
    #[error("internal error: {0}")]
    Internal(String),
}

impl GatewayError {
    /// The status the client gets.
    pub fn status(&self) -> StatusCode {
        match self {
            GatewayError::BadRequest(_) | GatewayError::BadPath(_) => StatusCode::BAD_REQUEST,
            GatewayError::Proxy(p) => match p {
                ProxyError::Unreachable(_) | ProxyError::Origin(_) => StatusCode::BAD_GATEWAY,
                ProxyError::ConnectTimeout(_) | ProxyError::Timeout(_) => {
                    StatusCode::GATEWAY_TIMEOUT
                }
                ProxyError::BodyTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
                ProxyError::Build(_) | ProxyError::NoRequest => StatusCode::INTERNAL_SERVER_ERROR,
            },
            GatewayError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// What the client is told: no addresses, no causes, nothing internal.
    pub fn public_message(&self) -> &'static str {
        match self {
            GatewayError::BadRequest(why) => why,
            GatewayError::BadPath(e) => match e {
                PathError::NotAbsolute => "The request path must start with '/'.",
                PathError::BadEscape => "The request path has an invalid percent-encoding.",
                PathError::EncodedSeparator => {
                    "The request path contains an encoded '/' or '\\', which is not accepted."
                }
                PathError::ControlByte => "The request path contains a forbidden character.",
                PathError::Backslash => "The request path contains a backslash.",
                PathError::InvalidUtf8 => "The request path is not valid UTF-8.",
                PathError::AboveRoot => "The request path climbs above the root.",
                PathError::AmbiguousSegment => {
                    "The request path has a segment that servers read differently ('..;' or similar)."
                }
            },
            GatewayError::Proxy(p) => match p {
                ProxyError::Unreachable(_) | ProxyError::Origin(_) => {
                    "The site behind this gateway could not be reached. Please try again later."
                }
                ProxyError::ConnectTimeout(_) | ProxyError::Timeout(_) => {
                    "The site behind this gateway did not answer in time. Please try again later."
                }
                ProxyError::BodyTooLarge(_) => "The request body is too large.",
                ProxyError::Build(_) | ProxyError::NoRequest => {
                    "Something went wrong inside the gateway."
                }
            },
            GatewayError::Internal(_) => "Something went wrong inside the gateway.",
        }
    }
}

/// The request pipeline. Implements [`server::Handler`].
///
/// The current [`App`] sits in an [`arc_swap::ArcSwap`] shared by every clone; a reload
/// stores a new one and bumps a generation number, never blocking readers. Each clone keeps
/// its own snapshot of the current `App` (`Current`), refreshed when the generation moves,
/// and a request holds that snapshot (one `Arc` clone of memory only this clone writes).
/// `serve` gives each serving thread a clone of its own, so that no per-request reference
/// count is written by two threads: each such write would wait for the cache line to come
/// over from the other core (`docs/benchmarks.md`, "Tenth session").
#[derive(Debug)]
pub struct Gateway {
    shared: Arc<Shared>,
    /// This clone's snapshot of the current `App`; the lock is only ever taken by this
    /// clone's requests, for an `Arc` clone.
    local: Mutex<Option<Arc<Current>>>,
}

#[derive(Debug)]
struct Shared {
    app: arc_swap::ArcSwap<App>,
    /// Raised (after the store) by every [`Gateway::replace_app`].
    generation: AtomicU64,
}

/// One clone's snapshot of the `App` of one generation.
#[derive(Debug)]
struct Current {
    generation: u64,
    app: Arc<App>,
}

impl Clone for Gateway {
    /// Another handle on the same `App`, with a snapshot of its own.
    fn clone(&self) -> Self {
        Gateway {
            shared: Arc::clone(&self.shared),
            local: Mutex::new(None),
        }
    }
}

/// What the log line of a request needs from the inner steps.
#[derive(Default)]
struct Outcome {
    path: Option<NormalizedPath>,
    protected: bool,
    /// The answer was already counted in the metrics where it was decided (payment flow,
    /// forward-auth); only errors are counted at the end.
    counted: bool,
}

impl Gateway {
    /// A gateway running against `app`.
    pub fn new(app: Arc<App>) -> Self {
        Gateway {
            shared: Arc::new(Shared {
                app: arc_swap::ArcSwap::new(app),
                generation: AtomicU64::new(0),
            }),
            local: Mutex::new(None),
        }
    }

    /// The shared state new requests run against.
    pub fn app(&self) -> Arc<App> {
        self.shared.app.load_full()
    }

    /// Makes `app` the state of every request that starts from now on (reload).
    pub fn replace_app(&self, app: Arc<App>) {
        self.shared.app.store(app);
        self.shared.generation.fetch_add(1, Ordering::Release);
    }

    /// This clone's snapshot of the current `App`, taken anew when a reload happened since.
    ///
    /// The generation is read before the `App`: a snapshot is never older than the generation
    /// it is filed under (at worst newer, which the next call replaces once more).
    fn current(&self) -> Arc<Current> {
        let generation = self.shared.generation.load(Ordering::Acquire);
        let mut local = self.local.lock().unwrap_or_else(PoisonError::into_inner);
        match &*local {
            Some(current) if current.generation == generation => Arc::clone(current),
            _ => {
                let current = Arc::new(Current {
                    generation,
                    app: self.shared.app.load_full(),
                });
                *local = Some(Arc::clone(&current));
                current
            }
        }
    }

    /// Answers one request. Never fails: errors become pages chosen by `Accept`. Generic over
    /// the body so that tests can call it without a socket.
    ///
    /// The request stays where this call puts it, in the returned future, until it is sent
    /// on: the steps below borrow it and the proxy takes it out (`&mut Option<Request>`),
    /// instead of each async step receiving it by value. With many requests in flight each
    /// such move writes its 264 bytes into memory no longer in the CPU's cache
    /// (`docs/benchmarks.md`, "Ninth session"). For the same reason the server writes this
    /// future straight into a heap block of its own (`src/server.rs`), and the request and
    /// connection facts are kept once in it, not twice (see `run`; "Thirteenth session").
    #[inline]
    pub fn handle<B>(
        &self,
        req: Request<B>,
        conn: ConnInfo,
    ) -> impl Future<Output = Response<Body>> + Send + '_
    where
        B: http_body::Body<Data = Bytes> + Send + Sync + 'static,
        B::Error: Into<BoxError>,
    {
        self.run(Some(req), conn)
    }

    /// [`Gateway::handle`]'s future. `req` is `Some` (an empty one is answered with 500).
    ///
    /// A plain function returning an `async` block rather than an `async fn`: an `async fn`
    /// keeps its arguments twice in its future and moves them from one place to the other
    /// when first polled (here about 400 bytes, into memory out of cache when many requests
    /// are in flight). The block uses what it captured where it was put, and the context
    /// borrows the connection's facts.
    #[allow(clippy::manual_async_fn)] // on purpose; see above
    fn run<B>(
        &self,
        mut req: Option<Request<B>>,
        conn: ConnInfo,
    ) -> impl Future<Output = Response<Body>> + Send + '_
    where
        B: http_body::Body<Data = Bytes> + Send + Sync + 'static,
        B::Error: Into<BoxError>,
    {
        async move {
            let started = Instant::now();
            // One snapshot of the shared state for the whole request.
            let snapshot = self.current();
            let app: &App = &snapshot.app;
            let peer_trusted = app.trusts(conn.peer.ip());
            let (request_id, html, method, version) = match &req {
                Some(r) => (
                    assign_request_id(r.headers(), peer_trusted),
                    pages::wants_html(r.headers()),
                    r.method().clone(),
                    r.version(),
                ),
                None => (
                    assign_request_id(&http::HeaderMap::new(), false),
                    false,
                    Method::GET,
                    Version::HTTP_11,
                ),
            };
            let ctx = RequestContext {
                app,
                conn: &conn,
                peer_trusted,
                request_id,
                html,
            };
            let mut outcome = Outcome::default();
            let result = Self::handle_inner(&mut req, &ctx, &mut outcome).await;
            drop(req);
            Self::finish(result, &ctx, &outcome, &method, version, started)
        }
    }

    /// Logs and counts a finished request, and turns an error into its page.
    fn finish(
        result: Result<Response<Body>, GatewayError>,
        ctx: &RequestContext<'_>,
        outcome: &Outcome,
        method: &Method,
        version: Version,
        started: Instant,
    ) -> Response<Body> {
        let app = ctx.app;
        // The id is hex or a trusted proxy's plain token: shown as is (Display, no quoting).
        let id = ctx.request_id.to_str().unwrap_or("-");
        let peer = &ctx.conn.peer_text;
        let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        let path = outcome.path.as_ref().map_or("-", NormalizedPath::as_str);
        match &result {
            // Protected and forward-auth requests are counted where the decision is made.
            Ok(_) if !outcome.protected && !outcome.counted => {
                app.metrics.request(RequestOutcome::Proxied);
            }
            Ok(_) => {}
            Err(err) => {
                let (counted, origin) = error_metrics(err);
                app.metrics.request(counted);
                if let Some(kind) = origin {
                    app.metrics.origin_error(kind);
                }
            }
        }
        match result {
            Ok(resp) => {
                crate::logfmt::RequestLine {
                    id,
                    peer,
                    method: method.as_str(),
                    path,
                    protected: outcome.protected,
                    status: resp.status().as_u16(),
                    bytes: http_body::Body::size_hint(resp.body()).exact(),
                    micros,
                }
                .log();
                resp
            }
            Err(err) => {
                let status = err.status();
                let cause = ErrorChain(&err);
                let elapsed_ms = micros as f64 / 1000.0;
                if status.is_server_error() {
                    warn!(id = %id, peer = %peer, %method, %path,
                        protected = outcome.protected, status = status.as_u16(), ms = elapsed_ms,
                        error = %cause, "request failed");
                } else {
                    info!(id = %id, peer = %peer, %method, %path,
                        protected = outcome.protected, status = status.as_u16(), ms = elapsed_ms,
                        error = %cause, "request refused");
                }
                let mut resp =
                    app.config
                        .pages
                        .templates
                        .error(status, err.public_message(), ctx.html);
                if matches!(err, GatewayError::BadRequest(_)) && version < Version::HTTP_2 {
                    // After a refused CONNECT or a malformed head, what the client sends next
                    // on this connection cannot be trusted to be a new request: close it.
                    resp.headers_mut()
                        .insert(header::CONNECTION, HeaderValue::from_static("close"));
                }
                resp
            }
        }
    }

    /// `req` is `Some` on entry; it is taken out only where it is forwarded.
    async fn handle_inner<B>(
        req: &mut Option<Request<B>>,
        ctx: &RequestContext<'_>,
        outcome: &mut Outcome,
    ) -> Result<Response<Body>, GatewayError>
    where
        B: http_body::Body<Data = Bytes> + Send + Sync + 'static,
        B::Error: Into<BoxError>,
    {
        let head = req.as_ref().ok_or(ProxyError::NoRequest)?;
        reject_unacceptable(head)?;
        let path = normalize_path(head)?;
        if crate::forward_auth::is_endpoint(&ctx.app.config, &path) {
            // A front proxy asks about another request (`[forward_auth]`); nothing is forwarded.
            outcome.path = Some(path);
            outcome.counted = true;
            let req = req.take().ok_or(ProxyError::NoRequest)?;
            return crate::forward_auth::handle(req, ctx)
                .instrument(ctx.span())
                .await;
        }
        let route = ctx.app.policy.classify(&path);
        outcome.protected = route.is_some();
        let result = match route {
            None => ctx
                .app
                .origin
                .forward(req, &path, &ctx.forward_context())
                .await
                .map_err(GatewayError::from),
            // No span here: a fresh grant logs nothing but the request line (which carries
            // the id), and creating and entering a span costs about as much as checking the
            // grant. The payment flow opens the span where it may log (merchant calls, limits).
            Some(route) => Self::handle_protected(req, route, &path, ctx).await,
        };
        outcome.path = Some(path);
        result
    }

    /// A request under a `[[protect]]` prefix. It reaches the origin only when the payment
    /// flow answers [`PaymentOutcome::Serve`], i.e. the merchant confirmed (now, or less
    /// than `recheck_interval` ago) that this session paid for this resource.
    ///
    /// # Errors
    /// A [`GatewayError`] from forwarding a paid request.
    ///
    /// `req` is `Some` on entry; it is taken out only where it is forwarded.
    pub async fn handle_protected<B>(
        req: &mut Option<Request<B>>,
        route: &ProtectedRoute,
        path: &NormalizedPath,
        ctx: &RequestContext<'_>,
    ) -> Result<Response<Body>, GatewayError>
    where
        B: http_body::Body<Data = Bytes> + Send + Sync + 'static,
        B::Error: Into<BoxError>,
    {
        let app = ctx.app;
        let head = req.as_ref().ok_or(ProxyError::NoRequest)?;
        let client = app.client_ip(head.headers(), ctx.conn.peer.ip());
        let outcome = app
            .payment
            .decide(
                crate::flow::unix_now(),
                head.headers(),
                ctx.html,
                head.uri().query(),
                route,
                path,
                client,
                || ctx.span(),
            )
            .await;
        match outcome {
            PaymentOutcome::Serve { set_cookies, .. } => {
                let mut resp = app
                    .origin
                    .forward(req, path, &ctx.forward_context())
                    .await?;
                make_private(resp.headers_mut());
                for c in set_cookies {
                    resp.headers_mut().append(header::SET_COOKIE, c);
                }
                app.metrics.request(RequestOutcome::Paid);
                Ok(resp)
            }
            PaymentOutcome::Respond { response, kind }
                if app.config.server.mode == Mode::Observe =>
            {
                // Observe mode: the decision is logged and counted, the request goes through
                // as if unprotected (the gateway's cookies are neither forwarded nor set).
                let status = response.status().as_u16();
                let id = ctx.request_id.to_str().unwrap_or("-");
                info!(id = %id, path = path.as_str(), decision = ?kind, status,
                    "observe mode: would have answered {status}");
                drop(response);
                let mut resp = app
                    .origin
                    .forward(req, path, &ctx.forward_context())
                    .await?;
                make_private(resp.headers_mut());
                app.metrics.observe_forwarded();
                app.metrics.request(kind.into());
                Ok(resp)
            }
            PaymentOutcome::Respond { response, kind } => {
                app.metrics.request(kind.into());
                Ok(response)
            }
        }
    }
}

/// Origin responses on protected paths must never be stored by shared caches: `public` and
/// `s-maxage` are dropped and `private` added (unless the origin already said `no-store`).
fn make_private(headers: &mut http::HeaderMap) {
    if let http::header::Entry::Vacant(none) = headers.entry(header::CACHE_CONTROL) {
        none.insert(HeaderValue::from_static("private"));
        return;
    }
    let mut directives: Vec<String> = Vec::new();
    for v in headers.get_all(header::CACHE_CONTROL) {
        let Ok(s) = v.to_str() else { continue };
        for d in s.split(',') {
            let d = d.trim();
            let name = d
                .split('=')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase();
            if d.is_empty()
                || matches!(
                    name.as_str(),
                    "public" | "s-maxage" | "proxy-revalidate" | "private"
                )
            {
                continue;
            }
            directives.push(d.to_owned());
        }
    }
    if !directives
        .iter()
        .any(|d| d.eq_ignore_ascii_case("no-store"))
    {
        directives.insert(0, "private".to_owned());
    }
    if let Ok(v) = HeaderValue::from_str(&directives.join(", ")) {
        headers.insert(header::CACHE_CONTROL, v);
    } else {
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("private"));
    }
}

impl server::Handler for Gateway {
    #[inline]
    fn call(
        &self,
        req: Request<Incoming>,
        conn: ConnInfo,
    ) -> impl std::future::Future<Output = Response<Body>> + Send {
        self.handle(req, conn)
    }
}

/// How a failed request is counted: its outcome and, for origin failures, the kind.
fn error_metrics(err: &GatewayError) -> (RequestOutcome, Option<OriginErrorKind>) {
    match err {
        GatewayError::BadRequest(_) | GatewayError::BadPath(_) => {
            (RequestOutcome::BadRequest, None)
        }
        GatewayError::Proxy(p) => match p {
            ProxyError::Unreachable(_) => (
                RequestOutcome::OriginError,
                Some(OriginErrorKind::Unreachable),
            ),
            ProxyError::ConnectTimeout(_) => (
                RequestOutcome::OriginError,
                Some(OriginErrorKind::ConnectTimeout),
            ),
            ProxyError::Timeout(_) => (RequestOutcome::OriginError, Some(OriginErrorKind::Timeout)),
            ProxyError::Origin(_) => (RequestOutcome::OriginError, Some(OriginErrorKind::Broken)),
            ProxyError::BodyTooLarge(_) => (RequestOutcome::BadRequest, None),
            ProxyError::Build(_) | ProxyError::NoRequest => (RequestOutcome::InternalError, None),
        },
        GatewayError::Internal(_) => (RequestOutcome::InternalError, None),
    }
}

/// Step 1: the request id. A trusted proxy's `X-Request-Id` is kept when it is short and
/// plain; everyone else gets a fresh random one (128 bits, hex).
pub fn assign_request_id(headers: &http::HeaderMap, peer_trusted: bool) -> HeaderValue {
    if peer_trusted {
        if let Some(v) = headers.get("x-request-id") {
            let b = v.as_bytes();
            let plain = !b.is_empty()
                && b.len() <= 128
                && b.iter()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.' | b':'));
            if plain {
                return v.clone();
            }
        }
    }
    let id: [u8; 16] = rand::random();
    let mut hex = [0u8; 32];
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (pair, b) in hex.chunks_exact_mut(2).zip(id) {
        pair[0] = DIGITS[usize::from(b >> 4)];
        pair[1] = DIGITS[usize::from(b & 0xf)];
    }
    // Hex digits are always a valid header value.
    HeaderValue::from_maybe_shared(id_bytes(&hex)).unwrap_or_else(|_| HeaderValue::from_static("-"))
}

thread_local! {
    /// Where this thread writes its request ids: a chunk that each id is split off.
    static ID_CHUNK: std::cell::RefCell<bytes::BytesMut> =
        std::cell::RefCell::new(bytes::BytesMut::new());
}

/// `hex` as shared bytes. A request's id is cloned into the origin request (and kept for the
/// log), and the clone of a header value made by copying allocates once more to share it;
/// ids split off a per-thread chunk of 64 are shared from the start, so an id costs neither
/// allocation. A chunk is freed when the last request whose id it holds is done.
fn id_bytes(hex: &[u8; 32]) -> Bytes {
    ID_CHUNK
        .try_with(|chunk| {
            let mut chunk = chunk.try_borrow_mut().ok()?;
            if chunk.capacity() < hex.len() {
                *chunk = bytes::BytesMut::with_capacity(64 * hex.len());
            }
            chunk.extend_from_slice(hex);
            Some(chunk.split().freeze())
        })
        .ok()
        .flatten()
        .unwrap_or_else(|| Bytes::copy_from_slice(hex))
}

/// Step 2: refuses what hyper accepts but the gateway must not pass on.
///
/// hyper already rejects, for HTTP/1, conflicting `Content-Length` values and a
/// `Transfer-Encoding` other than `chunked`; with both `Transfer-Encoding: chunked` and
/// `Content-Length` it drops `Content-Length`, reads the body as chunked and closes the
/// connection afterwards, so that case is invisible here and harmless (the origin request is
/// framed anew). What remains visible is refused, including a `Transfer-Encoding` that lists
/// codings besides `chunked` (hyper accepts any list ending in `chunked`) and a `Host` whose
/// port is not a number.
///
/// # Errors
/// [`GatewayError::BadRequest`].
pub fn reject_unacceptable<B>(req: &Request<B>) -> Result<(), GatewayError> {
    if req.method() == Method::CONNECT {
        return Err(GatewayError::BadRequest("CONNECT is not supported."));
    }
    let headers = req.headers();
    let lengths = headers.get_all(header::CONTENT_LENGTH).iter().count();
    if lengths > 0 && headers.contains_key(header::TRANSFER_ENCODING) {
        return Err(GatewayError::BadRequest(
            "Content-Length and Transfer-Encoding together are ambiguous.",
        ));
    }
    if lengths > 1 || (lengths == 1 && crate::proxy::content_length(headers).is_none()) {
        return Err(GatewayError::BadRequest("Invalid Content-Length."));
    }
    // hyper reads any `Transfer-Encoding` whose last coding is `chunked` as chunked and hands
    // over the body with the other codings still applied; forwarded without the header, the
    // origin would get different bytes than the client meant. Only plain `chunked` passes.
    if !transfer_encoding_is_plain_chunked(headers) {
        return Err(GatewayError::BadRequest("Unsupported Transfer-Encoding."));
    }
    let mut hosts = headers.get_all(header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (Some(_), Some(_)) => return Err(GatewayError::BadRequest("More than one Host header.")),
        (Some(host), None) => {
            if !host_is_valid(host.as_bytes()) {
                return Err(GatewayError::BadRequest("Invalid Host header."));
            }
        }
        (None, _) => {
            // HTTP/1.1 requires Host (RFC 9112 §3.2); HTTP/2 may use :authority instead and
            // HTTP/1.0 clients may omit it.
            if req.version() == Version::HTTP_11 {
                return Err(GatewayError::BadRequest("Missing Host header."));
            }
        }
    }
    Ok(())
}

thread_local! {
    /// The last `Host` value this thread found valid (empty: none yet).
    static LAST_VALID_HOST: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Whether `host` is a valid `Host` value: an authority without userinfo whose port, if
/// any, is a number up to 65535. Parsing it as an [`http::uri::Authority`] copies it into an
/// allocation first, and a connection (most often every connection) sends the same `Host`
/// on each request, so the last valid value is remembered per thread and an equal one is
/// valid without parsing. (Validity depends on the bytes alone.)
fn host_is_valid(host: &[u8]) -> bool {
    const REMEMBERED: usize = 256;
    let seen = |last: &std::cell::RefCell<Vec<u8>>| {
        last.try_borrow()
            .is_ok_and(|last| !last.is_empty() && last.as_slice() == host)
    };
    if !host.is_empty() && LAST_VALID_HOST.try_with(seen).unwrap_or(false) {
        return true;
    }
    let valid = !host.contains(&b'@')
        && http::uri::Authority::try_from(host).is_ok_and(|a| port_is_valid(&a));
    if valid && host.len() <= REMEMBERED {
        let _ = LAST_VALID_HOST.try_with(|last| {
            if let Ok(mut last) = last.try_borrow_mut() {
                last.clear();
                last.extend_from_slice(host);
            }
        });
    }
    valid
}

/// No `Transfer-Encoding`, or exactly one coding, `chunked` (any case).
fn transfer_encoding_is_plain_chunked(headers: &http::HeaderMap) -> bool {
    let mut codings = headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .map(<[u8]>::trim_ascii);
    match (codings.next(), codings.next()) {
        (None, _) => true,
        (Some(only), None) => only.eq_ignore_ascii_case(b"chunked"),
        (Some(_), Some(_)) => false,
    }
}

/// `Host` is `uri-host [ ":" port ]` with `port = *DIGIT` (RFC 9110 §7.2, §4.1); `Authority`
/// alone also accepts `host:name`.
fn port_is_valid(authority: &http::uri::Authority) -> bool {
    let s = authority.as_str().as_bytes();
    // The port is what follows the last `:` after an IPv6 literal's `]`.
    let host_end = memchr::memrchr(b']', s).map_or(0, |i| i + 1);
    let after_host = &s[host_end..];
    let Some(colon) = memchr::memrchr(b':', after_host) else {
        return true;
    };
    // Digits only (no sign), at most 65535; an empty port is allowed.
    after_host[colon + 1..]
        .iter()
        .try_fold(0u32, |n, &b| {
            if b.is_ascii_digit() {
                Some(n * 10 + u32::from(b - b'0')).filter(|n| *n <= u32::from(u16::MAX))
            } else {
                None
            }
        })
        .is_some()
}

/// Step 3: the canonical path, used for the decision and as the forwarded path. An
/// absolute-form target (`GET http://host/path`) contributes only its path.
///
/// # Errors
/// [`GatewayError::BadPath`].
pub fn normalize_path<B>(req: &Request<B>) -> Result<NormalizedPath, GatewayError> {
    Ok(path::normalize(req.uri().path())?)
}

/// Displays an error with its sources, `a: b: c`, for the log. (The error types keep their
/// own `Display` free of their source's text, so nothing is printed twice.)
struct ErrorChain<'a>(&'a (dyn std::error::Error + 'static));

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cur = self.0.source();
        while let Some(e) = cur {
            write!(f, ": {e}")?;
            cur = e.source();
        }
        Ok(())
    }
}

/// A gateway serving in the background, for tests and the demo.
#[derive(Debug)]
pub struct RunningGateway {
    /// The address it listens on.
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl RunningGateway {
    /// Stops accepting, lets in-flight requests finish (up to `server.shutdown_grace`) and
    /// waits for the server to end. Dropping a `RunningGateway` also starts a shutdown, but
    /// does not wait for it.
    ///
    /// # Errors
    /// The server task failed or panicked.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.task).await.context("gateway task")?
    }
}

/// Starts a gateway on `listener` in the background (`server.listen` is ignored).
///
/// # Errors
/// The TLS files or the origin client cannot be set up.
pub async fn spawn(config: Config, listener: TcpListener) -> anyhow::Result<RunningGateway> {
    let app = App::new(config)?;
    spawn_app(Arc::new(app), listener).await
}

/// Like [`spawn`], for an [`App`] built (and perhaps adjusted) by the caller.
///
/// # Errors
/// The TLS files cannot be read, or the listener has no address.
pub async fn spawn_app(app: Arc<App>, listener: TcpListener) -> anyhow::Result<RunningGateway> {
    let addr = listener.local_addr().context("listener address")?;
    let opts = ServerOptions::from_config(&app.config.server)?;
    let gateway = Arc::new(Gateway::new(app));
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(server::run(listener, gateway, opts, async move {
        let _ = stopped.await;
    }));
    Ok(RunningGateway {
        addr,
        stop: Some(stop),
        task,
    })
}

/// `taler-paywall serve`: binds `server.listen` (and `[admin] listen`) and serves until
/// SIGTERM or SIGINT, then drains. `config_path` is where the configuration came from: SIGHUP
/// reloads it (see [`crate::admin`]).
///
/// # Errors
/// A one-line reason if the gateway cannot start: a port is in use, the TLS files or the
/// origin client cannot be set up.
pub async fn serve(config: Config, config_path: Option<PathBuf>) -> anyhow::Result<()> {
    let threads = crate::cli::serving_threads()?;
    crate::proxy::set_serving_threads(threads);
    let metrics = Arc::new(Metrics::new());
    let listen = config.server.listen;
    let admin_listen = config.admin.as_ref().map(|a| a.listen);
    let mut opts = ServerOptions::from_config(&config.server)?;
    opts.open_connections = Some(metrics.open_connections());
    let app = App::with_metrics(config, metrics.clone())?;
    // The serving threads' listeners share the address through SO_REUSEPORT, which would let
    // a second gateway of the same user bind it too: a plain bind first makes "port in use"
    // fail as before (the probe is closed at once; the port is then ours).
    drop(
        std::net::TcpListener::bind(listen)
            .with_context(|| format!("cannot listen on {listen}"))?,
    );
    let listener = reuseport_listener(listen)?;
    let admin_listener = match admin_listen {
        Some(a) => Some(
            TcpListener::bind(a)
                .await
                .with_context(|| format!("cannot listen on {a} (admin)"))?,
        ),
        None => None,
    };
    info!(
        listen = %listen,
        admin = admin_listen.map(|a| a.to_string()).as_deref().unwrap_or("none"),
        tls = opts.tls.is_some(),
        origin = %app.config.origin.url,
        protected = app.policy.routes().len(),
        "taler-paywall listening"
    );
    if app.config.server.mode == Mode::Observe {
        warn!("observe mode: the gateway is NOT enforcing payments; every request is let through");
    }
    let gateway = Arc::new(Gateway::new(Arc::new(app)));
    let operator = crate::admin::Operator::start(crate::admin::OperatorSetup {
        gateway: gateway.clone(),
        metrics,
        admin_listener,
        config_path,
        cert_store: opts.cert_store.clone(),
    });
    let result = serve_per_thread(listener, gateway, opts, threads).await;
    operator.stop().await;
    result?;
    info!("taler-paywall stopped");
    Ok(())
}

/// A listener on `addr` that further listeners with `SO_REUSEPORT` may share.
fn reuseport_listener(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }
    .context("socket")?;
    socket.set_reuseaddr(true).context("SO_REUSEADDR")?;
    socket.set_reuseport(true).context("SO_REUSEPORT")?;
    socket
        .bind(addr)
        .with_context(|| format!("cannot listen on {addr}"))?;
    socket
        .listen(1024)
        .with_context(|| format!("cannot listen on {addr}"))
}

/// Serves `listener` from `threads` threads, each with its own single-threaded runtime and its
/// own `SO_REUSEPORT` listener on the same address (the kernel spreads connections over them),
/// so that a request, its connection and its pooled origin connection stay on one thread.
/// Stops accepting on SIGTERM/SIGINT and returns when every thread has drained.
async fn serve_per_thread(
    listener: TcpListener,
    gateway: Arc<Gateway>,
    mut opts: ServerOptions,
    threads: usize,
) -> anyhow::Result<()> {
    let addr = listener.local_addr().context("listener address")?;
    opts.slots = Some(Arc::new(tokio::sync::Semaphore::new(opts.max_connections)));
    let mut listeners = vec![listener.into_std().context("listener")?];
    for _ in 1..threads {
        let l = reuseport_listener(addr)?;
        listeners.push(l.into_std().context("listener")?);
    }
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut done = Vec::new();
    for (index, std_listener) in listeners.into_iter().enumerate() {
        let (tx, rx) = oneshot::channel::<anyhow::Result<()>>();
        // A handle of this thread's own: every request clones it and its `App` snapshot,
        // and those counts are then written by this thread only.
        let gateway = Arc::new(Gateway::clone(&gateway));
        let opts = opts.clone();
        let mut stopped = stopped.clone();
        std::thread::Builder::new()
            .name(format!("serve-{index}"))
            .spawn(move || {
                crate::server::enter_serving_thread(index);
                // Log lines collect per thread and are written out every tick and at the end
                // (`logfmt::LineSink`).
                let batch = crate::logfmt::batch_this_thread();
                let result = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(anyhow::Error::from)
                    .and_then(|rt| {
                        rt.block_on(async move {
                            let listener = TcpListener::from_std(std_listener)?;
                            tokio::spawn(async {
                                let mut tick = tokio::time::interval(crate::logfmt::BATCH_INTERVAL);
                                tick.set_missed_tick_behavior(
                                    tokio::time::MissedTickBehavior::Delay,
                                );
                                loop {
                                    tick.tick().await;
                                    crate::logfmt::flush_batch();
                                }
                            });
                            let until = async move {
                                let _ = stopped.wait_for(|s| *s).await;
                            };
                            server::run(listener, gateway, opts, until).await
                        })
                    });
                // Everything this thread logged is out before `serve` logs that it stopped.
                drop(batch);
                let _ = tx.send(result);
            })
            .context("cannot start a serving thread")?;
        done.push(rx);
    }
    server::shutdown_signal().await;
    let _ = stop.send(true);
    let mut result = Ok(());
    for rx in done {
        match rx.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => result = Err(e),
            Err(_) => result = Err(anyhow::anyhow!("a serving thread panicked")),
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::body::BodyTooLarge;

    fn test_app() -> Arc<App> {
        let config = crate::config::Config::from_toml_str(
            crate::config::tests::MINIMAL,
            std::path::Path::new("/etc/taler-paywall/gateway.toml"),
            &crate::config::NoEnv,
        )
        .expect("config");
        Arc::new(App::new(config).expect("app"))
    }

    /// A handle keeps one snapshot while nothing changes (so its requests share one count,
    /// written by its thread only), and every handle, however cloned, takes the `App` a
    /// reload stored for its next request.
    #[tokio::test]
    async fn each_handle_keeps_a_snapshot_until_a_reload() {
        let first = test_app();
        let gateway = Gateway::new(Arc::clone(&first));
        let per_thread = Gateway::clone(&gateway);
        let a = per_thread.current();
        let b = per_thread.current();
        assert!(Arc::ptr_eq(&a, &b), "no reload: the same snapshot");
        assert!(Arc::ptr_eq(&a.app, &first));
        // Another handle has a snapshot of its own, of the same `App`.
        let other = gateway.current();
        assert!(!Arc::ptr_eq(&a, &other));
        assert!(Arc::ptr_eq(&other.app, &first));

        let second = test_app();
        gateway.replace_app(Arc::clone(&second));
        for handle in [&gateway, &per_thread] {
            let now = handle.current();
            assert!(
                Arc::ptr_eq(&now.app, &second),
                "a reload reaches every handle"
            );
        }
        // A request that began before the reload still holds the old `App`.
        assert!(Arc::ptr_eq(&a.app, &first));
    }

    /// Every error maps to the status the interface promises; a new variant must be added
    /// here (and to the exhaustive `match`) to compile.
    #[test]
    fn each_error_maps_to_its_status() {
        let rows: Vec<(GatewayError, u16)> = vec![
            (GatewayError::BadRequest("x"), 400),
            (GatewayError::BadPath(PathError::BadEscape), 400),
            (ProxyError::Unreachable("refused".into()).into(), 502),
            (ProxyError::Origin("reset".into()).into(), 502),
            (ProxyError::ConnectTimeout("slow".into()).into(), 504),
            (
                ProxyError::Timeout(std::time::Duration::from_secs(1)).into(),
                504,
            ),
            (
                ProxyError::BodyTooLarge(BodyTooLarge { limit: 1 }).into(),
                413,
            ),
            (ProxyError::NoRequest.into(), 500),
            (GatewayError::Internal("bug".into()), 500),
        ];
        for (err, status) in rows {
            assert_eq!(err.status().as_u16(), status, "{err}");
            assert!(!err.public_message().contains("refused"));
        }
    }

    #[test]
    fn request_ids_are_fresh_unless_a_trusted_proxy_sent_a_plain_one() {
        let mut h = http::HeaderMap::new();
        h.insert("x-request-id", HeaderValue::from_static("proxy-id-1"));
        assert_eq!(assign_request_id(&h, true), "proxy-id-1");
        let fresh = assign_request_id(&h, false);
        assert_ne!(fresh, "proxy-id-1");
        assert_eq!(fresh.len(), 32);
        assert_ne!(assign_request_id(&h, false), fresh);
        h.insert(
            "x-request-id",
            HeaderValue::from_static("bad id with spaces"),
        );
        assert_ne!(assign_request_id(&h, true), "bad id with spaces");
    }

    #[test]
    fn host_validity_does_not_depend_on_the_host_before() {
        let cases: [(&[u8], bool); 9] = [
            (b"shop.example", true),
            (b"shop.example:8080", true),
            (b"[::1]:443", true),
            (b"shop.example:", true),
            (b"", false),
            (b"user@shop.example", false),
            (b"shop.example:65536", false),
            (b"shop.example:8o", false),
            (b"shop example", false),
        ];
        // Every value after every other, and each twice in a row (the remembered one).
        for (before, _) in cases {
            for (host, valid) in cases {
                host_is_valid(before);
                assert_eq!(
                    host_is_valid(host),
                    valid,
                    "{:?}",
                    String::from_utf8_lossy(host)
                );
                assert_eq!(
                    host_is_valid(host),
                    valid,
                    "{:?}",
                    String::from_utf8_lossy(host)
                );
            }
        }
    }

    #[test]
    fn request_ids_split_off_one_chunk_are_distinct_and_outlive_it() {
        let ids: Vec<HeaderValue> = (0..200)
            .map(|_| assign_request_id(&http::HeaderMap::new(), false))
            .collect();
        let distinct: std::collections::HashSet<&[u8]> = ids.iter().map(|v| v.as_bytes()).collect();
        assert_eq!(distinct.len(), ids.len());
        for id in &ids {
            assert_eq!(id.len(), 32);
            assert!(id.as_bytes().iter().all(u8::is_ascii_hexdigit));
        }
        // An id keeps its bytes while later ids are written into later chunks.
        let first = ids[0].clone();
        let copy = first.as_bytes().to_vec();
        drop(ids);
        for _ in 0..200 {
            assign_request_id(&http::HeaderMap::new(), false);
        }
        assert_eq!(first.as_bytes(), copy.as_slice());
    }

    #[test]
    fn visible_ambiguities_are_refused() {
        let req = |f: fn(http::request::Builder) -> http::request::Builder| {
            f(Request::builder().uri("/x").header("host", "a"))
                .body(())
                .unwrap()
        };
        assert!(reject_unacceptable(&req(|b| b)).is_ok());
        assert!(reject_unacceptable(&req(|b| b.method("CONNECT"))).is_err());
        assert!(reject_unacceptable(&req(|b| b
            .header("content-length", "1")
            .header("transfer-encoding", "chunked")))
        .is_err());
        assert!(reject_unacceptable(&req(|b| b
            .header("content-length", "1")
            .header("content-length", "1")))
        .is_err());
        assert!(reject_unacceptable(&req(|b| b.header("content-length", "-1"))).is_err());
        assert!(reject_unacceptable(&req(|b| b.header("host", "b"))).is_err());
        let no_host = Request::builder().uri("/x").body(()).unwrap();
        assert!(reject_unacceptable(&no_host).is_err());
        let h2 = Request::builder()
            .uri("https://a/x")
            .version(Version::HTTP_2)
            .body(())
            .unwrap();
        assert!(reject_unacceptable(&h2).is_ok());
    }
}
