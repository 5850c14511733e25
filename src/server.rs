//! The public listener: accepts TCP connections, terminates TLS, speaks HTTP/1.1 and HTTP/2
//! (ALPN, or h2c with prior knowledge) and hands every request to a [`Handler`].
//!
//! What it guards against, and how:
//! - **Slow or silent clients** (slowloris): a connection must deliver a complete request head
//!   within `header_read_timeout`, counted from accept (so the TLS handshake and hyper's
//!   protocol sniffing are included) and, between keep-alive requests, from the first byte of
//!   the next request. hyper's own HTTP/1 header timer is not used because it also runs while a
//!   keep-alive connection is idle, which would make `idle_timeout` meaningless.
//! - **Idle keep-alive connections**: closed after `idle_timeout` without a request in flight
//!   (HTTP/1 and HTTP/2 alike; hyper has no idle timeout for HTTP/1).
//! - **Stalled exchanges**: a connection with a request in flight but no I/O for
//!   `request_timeout` is dropped.
//! - **Too many connections**: at `max_connections` the accept loop waits for a slot, leaving
//!   new clients in the kernel's backlog.
//! - **Huge heads**: `max_header_bytes` bounds hyper's read buffer (HTTP/1) and the header list
//!   (HTTP/2).
//! - **Upgraded connections** (WebSocket): the tunnel runs inside the connection's own task
//!   (see [`Tunnel`]), so it keeps its `max_connections` slot, counts as an open connection,
//!   is closed after `idle_timeout` without a byte in either direction, and is closed when
//!   shutdown begins (it has no exchange to finish).
//!
//! All of the timing lives in one small per-connection watchdog fed by an I/O wrapper that
//! notes the time of the last read/write and a guard that counts requests in flight.
//!
//! Shutdown: when the `shutdown` future completes, the listener is closed, every connection is
//! told to finish its current exchange and close (HTTP/2 `GOAWAY`), and [`run`] returns once all
//! connections are gone or `shutdown_grace` has passed, whichever comes first. Connections
//! still open then are dropped.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::body::{Body, BoxError};
use crate::config::ServerConfig;

thread_local! {
    /// The index of the serving thread this is (0 outside the serving threads).
    static SERVING_THREAD: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Marks the calling thread as serving thread `index` (from 0). Per-thread state elsewhere
/// (the origin connection pools, the per-request counters) is picked by this index, so that
/// two serving threads never write the same memory for a request.
pub fn enter_serving_thread(index: usize) {
    SERVING_THREAD.with(|c| c.set(index));
}

/// The index of the calling serving thread (0 outside the serving threads).
pub fn serving_thread() -> usize {
    SERVING_THREAD.with(std::cell::Cell::get)
}

/// What the server knows about the connection a request arrived on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnInfo {
    /// The client's address (the TCP peer; maybe a proxy in front of the gateway).
    pub peer: SocketAddr,
    /// The local address the connection was accepted on.
    pub local: SocketAddr,
    /// Whether the gateway terminated TLS on this connection.
    pub tls: bool,
    /// `peer` as text (`1.2.3.4:5678`), formatted once per connection: every request's log
    /// line shows it.
    pub peer_text: Arc<str>,
    /// The peer's IP as text, `::ffff:`-mapped addresses as IPv4: what every forwarded
    /// request appends to `X-Forwarded-For`. Made once per connection; a request clones it
    /// (a reference count) instead of allocating and checking a new header value.
    pub peer_ip_header: HeaderValue,
}

impl ConnInfo {
    /// The facts of a connection from `peer`, accepted on `local`.
    pub fn new(peer: SocketAddr, local: SocketAddr, tls: bool) -> Self {
        ConnInfo {
            peer,
            local,
            tls,
            peer_text: peer.to_string().into(),
            // An IP address in text is always a valid header value.
            peer_ip_header: HeaderValue::try_from(peer.ip().to_canonical().to_string())
                .unwrap_or_else(|_| HeaderValue::from_static("unknown")),
        }
    }
}

/// The byte pipe of an upgraded connection (WebSocket), handed from the handler to the server.
///
/// A handler that switches protocols puts one into the `101` response's extensions instead of
/// spawning it. The server then runs it inside the connection's task once hyper has handed the
/// connection over, so that an upgraded connection keeps its `max_connections` slot and its
/// place in the open-connections gauge, is closed after `idle_timeout` without traffic, and is
/// closed when shutdown begins. (A tunnel in a task of its own would escape all three: a
/// client could hold any number of idle upgraded connections.)
#[derive(Clone)]
pub struct Tunnel(Arc<Mutex<Option<TunnelFuture>>>);

type TunnelFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

impl Tunnel {
    /// Wraps the future that copies bytes both ways until either side closes.
    pub fn new(pipe: impl Future<Output = ()> + Send + 'static) -> Self {
        Tunnel(Arc::new(Mutex::new(Some(Box::pin(pipe)))))
    }

    fn take(&self) -> Option<TunnelFuture> {
        self.0.lock().ok().and_then(|mut slot| slot.take())
    }
}

impl std::fmt::Debug for Tunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tunnel")
    }
}

/// Answers one request. Implemented by [`crate::gateway::Gateway`]; tests can implement it
/// with a closure-like struct.
pub trait Handler: Send + Sync + 'static {
    /// Produces the response for `req`. Never fails: errors are already turned into responses.
    fn call(
        &self,
        req: Request<Incoming>,
        conn: ConnInfo,
    ) -> impl Future<Output = Response<Body>> + Send;
}

/// Limits and timeouts of the listener. Build it with [`ServerOptions::from_config`];
/// [`Default`] gives the same values as an empty `[server]` table and plain HTTP.
#[derive(Clone)]
pub struct ServerOptions {
    /// A complete request head must arrive within this time (from accept, or from the first
    /// byte of a following request on a keep-alive connection). Also bounds the TLS handshake.
    pub header_read_timeout: Duration,
    /// Largest request head, in bytes (at least 8192).
    pub max_header_bytes: usize,
    /// A connection with no request in flight is closed after this much silence.
    pub idle_timeout: Duration,
    /// A connection with a request in flight is dropped after this much silence.
    pub request_timeout: Duration,
    /// How long in-flight requests may take to finish after shutdown begins.
    pub shutdown_grace: Duration,
    /// Most connections served at once.
    pub max_connections: usize,
    /// Terminate TLS with this configuration; `None` for plain HTTP.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// When `tls` was built by [`ServerOptions::from_config`]: the certificate it presents,
    /// which [`CertStore::reload`] replaces for new connections.
    pub cert_store: Option<Arc<CertStore>>,
    /// Raised while a client connection is open (the `open_connections` metric).
    pub open_connections: Option<prometheus_client::metrics::gauge::Gauge>,
    /// Connection slots shared by several [`run`]s serving one address (one per thread);
    /// `None`: `run` makes its own `max_connections` slots.
    pub slots: Option<Arc<Semaphore>>,
}

impl std::fmt::Debug for ServerOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerOptions")
            .field("header_read_timeout", &self.header_read_timeout)
            .field("max_header_bytes", &self.max_header_bytes)
            .field("idle_timeout", &self.idle_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("shutdown_grace", &self.shutdown_grace)
            .field("max_connections", &self.max_connections)
            .field("tls", &self.tls.is_some())
            .field("open_connections", &self.open_connections.is_some())
            .finish()
    }
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            header_read_timeout: Duration::from_secs(10),
            max_header_bytes: 64 * 1024,
            idle_timeout: Duration::from_secs(60),
            request_timeout: Duration::from_secs(300),
            shutdown_grace: Duration::from_secs(30),
            max_connections: 10_000,
            tls: None,
            cert_store: None,
            open_connections: None,
            slots: None,
        }
    }
}

impl ServerOptions {
    /// Takes the limits from `[server]` and, when `[server.tls]` is present, reads the
    /// certificate chain and key and builds the rustls configuration (ALPN `h2`, `http/1.1`).
    ///
    /// # Errors
    /// The certificate or key file cannot be read or parsed, or rustls rejects them.
    pub fn from_config(server: &ServerConfig) -> anyhow::Result<Self> {
        let (tls, cert_store) = match &server.tls {
            None => (None, None),
            Some(t) => {
                let store = Arc::new(CertStore::load(&t.cert_file, &t.key_file)?);
                (Some(Arc::new(store.server_config()?)), Some(store))
            }
        };
        Ok(ServerOptions {
            header_read_timeout: server.header_read_timeout,
            max_header_bytes: server.max_header_bytes.max(8192),
            idle_timeout: server.idle_timeout,
            request_timeout: server.request_timeout,
            shutdown_grace: server.shutdown_grace,
            max_connections: server.max_connections.max(1),
            tls,
            cert_store,
            open_connections: None,
            slots: None,
        })
    }
}

/// The certificate chain and key the TLS listener presents, swappable while it runs: the
/// rustls configuration asks this store on every handshake, so a [`CertStore::reload`]
/// takes effect for new connections while established ones keep theirs.
#[derive(Debug)]
pub struct CertStore {
    current: arc_swap::ArcSwap<rustls::sign::CertifiedKey>,
}

impl CertStore {
    /// Reads the PEM files.
    ///
    /// # Errors
    /// As [`load_tls`].
    pub fn load(cert_file: &Path, key_file: &Path) -> anyhow::Result<Self> {
        Ok(CertStore {
            current: arc_swap::ArcSwap::from_pointee(load_certified_key(cert_file, key_file)?),
        })
    }

    /// Re-reads the PEM files and presents them to new connections. On error the current
    /// certificate stays.
    ///
    /// # Errors
    /// As [`load_tls`].
    pub fn reload(&self, cert_file: &Path, key_file: &Path) -> anyhow::Result<()> {
        self.current
            .store(Arc::new(load_certified_key(cert_file, key_file)?));
        Ok(())
    }

    /// A rustls configuration (ALPN `h2`, `http/1.1`) presenting this store's certificate.
    ///
    /// # Errors
    /// rustls rejects the protocol versions (does not happen with the built-in provider).
    pub fn server_config(self: &Arc<Self>) -> anyhow::Result<rustls::ServerConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(config)
    }
}

impl rustls::server::ResolvesServerCert for CertStore {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// Reads a PEM chain and key and checks that they fit together.
fn load_certified_key(
    cert_file: &Path,
    key_file: &Path,
) -> anyhow::Result<rustls::sign::CertifiedKey> {
    let (certs, key) = read_pem(cert_file, key_file)?;
    let provider = rustls::crypto::ring::default_provider();
    rustls::sign::CertifiedKey::from_der(certs, key, &provider).with_context(|| {
        format!(
            "{} / {}: certificate and key do not fit",
            cert_file.display(),
            key_file.display()
        )
    })
}

/// Reads a PEM certificate chain and private key into a rustls server configuration.
///
/// # Errors
/// Unreadable files, no certificate, no key, or a key that does not fit the certificate.
pub fn load_tls(cert_file: &Path, key_file: &Path) -> anyhow::Result<rustls::ServerConfig> {
    let (certs, key) = read_pem(cert_file, key_file)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .with_context(|| {
            format!(
                "{} / {}: certificate and key do not fit",
                cert_file.display(),
                key_file.display()
            )
        })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

type PemPair = (
    Vec<rustls::pki_types::CertificateDer<'static>>,
    rustls::pki_types::PrivateKeyDer<'static>,
);

fn read_pem(cert_file: &Path, key_file: &Path) -> anyhow::Result<PemPair> {
    let cert_pem =
        std::fs::read(cert_file).with_context(|| format!("cannot read {}", cert_file.display()))?;
    let certs = rustls_pemfile::certs(&mut cert_pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{}: not a PEM certificate chain", cert_file.display()))?;
    if certs.is_empty() {
        anyhow::bail!("{}: no certificate found", cert_file.display());
    }
    let key_pem =
        std::fs::read(key_file).with_context(|| format!("cannot read {}", key_file.display()))?;
    let key = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .with_context(|| format!("{}: not a PEM private key", key_file.display()))?
        .with_context(|| format!("{}: no private key found", key_file.display()))?;
    Ok((certs, key))
}

/// Completes on SIGTERM or SIGINT (Ctrl-C). If a signal handler cannot be installed the error
/// is logged and only the other signal is waited for.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let wait = |kind: SignalKind, name: &'static str| async move {
        match signal(kind) {
            Ok(mut s) => {
                s.recv().await;
                info!(signal = name, "shutting down");
            }
            Err(e) => {
                warn!(signal = name, error = %e, "cannot install signal handler");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        () = wait(SignalKind::terminate(), "SIGTERM") => {}
        () = wait(SignalKind::interrupt(), "SIGINT") => {}
    }
}

/// Serves `listener` with `handler` until `shutdown` completes, then drains.
///
/// # Errors
/// None in practice: accept errors (e.g. out of file descriptors) are logged and retried with
/// a back-off, and connection errors are logged inside their task. The `Result` leaves room
/// for fatal conditions.
pub async fn run<H: Handler>(
    listener: TcpListener,
    handler: Arc<H>,
    opts: ServerOptions,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let opts = Arc::new(opts);
    let builder = Arc::new(http_builder(&opts));
    let tls = opts.tls.clone().map(tokio_rustls::TlsAcceptor::from);
    let slots = opts
        .slots
        .clone()
        .unwrap_or_else(|| Arc::new(Semaphore::new(opts.max_connections)));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut conns = JoinSet::new();
    let mut backoff = Duration::from_millis(5);
    tokio::pin!(shutdown);

    loop {
        // Wait for a free slot first, so that at the limit new clients wait in the backlog.
        let permit = tokio::select! {
            () = &mut shutdown => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break, // the semaphore is never closed
            },
        };
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => {
                    backoff = Duration::from_millis(5);
                    a
                }
                Err(e) => {
                    warn!(error = %e, retry_in = ?backoff, "accept failed");
                    drop(permit);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            },
        };
        let local = match stream.local_addr() {
            Ok(a) => a,
            Err(e) => {
                debug!(%peer, error = %e, "connection gone before it was served");
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let conn = Conn {
            handler: handler.clone(),
            builder: builder.clone(),
            opts: opts.clone(),
            tls: tls.clone(),
            stop: stop_rx.clone(),
            info: ConnInfo::new(peer, local, tls.is_some()),
        };
        let open = opts.open_connections.clone().map(OpenConnection::new);
        conns.spawn(async move {
            conn.serve(stream).await;
            drop(open);
            drop(permit);
        });
    }

    drop(listener);
    let _ = stop_tx.send(true);
    let open = conns.len();
    if open > 0 {
        info!(connections = open, grace = ?opts.shutdown_grace, "draining connections");
    }
    let drained = tokio::time::timeout(opts.shutdown_grace, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        warn!(
            connections = conns.len(),
            "shutdown grace period over; dropping connections"
        );
        conns.shutdown().await;
    }
    Ok(())
}

fn http_builder(opts: &ServerOptions) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // The watchdog times the head (see the module docs); hyper's timer would also fire on
        // idle keep-alive connections.
        .header_read_timeout(None)
        .max_buf_size(opts.max_header_bytes.max(8192))
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(opts.max_header_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(256);
    builder
}

/// Everything one connection task needs.
struct Conn<H> {
    handler: Arc<H>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    opts: Arc<ServerOptions>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    stop: watch::Receiver<bool>,
    info: ConnInfo,
}

impl<H: Handler> Conn<H> {
    async fn serve(self, stream: TcpStream) {
        let activity = Arc::new(Activity::new());
        let io = ActivityIo {
            inner: stream,
            activity: activity.clone(),
        };
        match self.tls.clone() {
            None => self.serve_io(io, activity).await,
            Some(acceptor) => {
                let handshake =
                    tokio::time::timeout(self.opts.header_read_timeout, acceptor.accept(io)).await;
                match handshake {
                    Ok(Ok(tls)) => self.serve_io(tls, activity).await,
                    Ok(Err(e)) => {
                        debug!(peer = %self.info.peer, error = %e, "TLS handshake failed")
                    }
                    Err(_) => debug!(peer = %self.info.peer, "TLS handshake timed out"),
                }
            }
        }
    }

    async fn serve_io<I>(mut self, io: I, activity: Arc<Activity>)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let handler = self.handler.clone();
        let info = self.info.clone();
        let tracker = activity.clone();
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let guard = InFlight::enter(&tracker, req.version() == http::Version::HTTP_2);
            let handler = handler.clone();
            let info = info.clone();
            // The handler's future (a few KiB) lives in a heap block of its own. Unboxed,
            // hyper copied it whole into the connection's own slot for each request: memory
            // that, with many connections, is out of the CPU's cache every time. The allocator
            // hands out the block the previous request on this thread just freed, which is
            // still in cache (`docs/benchmarks.md`, "Twelfth session"). The block is allocated
            // first and the `async` block written into it (`Box::write`): with `Box::new` the
            // whole future was built on the stack and then copied (3 KiB per request, where
            // only the few hundred bytes of its captures are set when it starts;
            // "Thirteenth session").
            let answer = Pin::from(Box::write(Box::new_uninit(), async move {
                handler.call(req, info).await
            }));
            async move {
                let mut resp = answer.await;
                if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
                    if let Some(tunnel) = resp.extensions_mut().remove::<Tunnel>() {
                        guard.0.hold_tunnel(tunnel);
                    }
                }
                Ok::<_, Infallible>(resp.map(|inner| TrackedBody {
                    inner,
                    _guard: guard,
                }))
            }
        });
        let conn = self
            .builder
            .serve_connection_with_upgrades(TokioIo::new(io), service);
        tokio::pin!(conn);
        let peer = self.info.peer;
        let mut stop_seen = *self.stop.borrow();
        if stop_seen {
            conn.as_mut().graceful_shutdown();
        }
        // Set once an idle connection was asked to close; it is dropped if that takes longer.
        let mut drop_at: Option<Instant> = None;
        // The watchdog's timer and the stop signal wake the task through this waker, so
        // that the many wake-ups of the exchange itself poll only the connection.
        let watchdog = Arc::new(WatchdogWake::default());
        let watchdog_waker = std::task::Waker::from(watchdog.clone());
        loop {
            let wake = match activity.verdict(&self.opts) {
                Verdict::Fine(at) => at,
                Verdict::Idle => match drop_at {
                    Some(at) => at,
                    None => {
                        debug!(%peer, "closing idle connection");
                        conn.as_mut().graceful_shutdown();
                        let at = Instant::now() + Duration::from_secs(1);
                        drop_at = Some(at);
                        at
                    }
                },
                Verdict::HeadTimeout => {
                    debug!(%peer, "request head not received in time; closing");
                    return;
                }
                Verdict::Stalled => {
                    debug!(%peer, "no progress on an in-flight request; closing");
                    return;
                }
            };
            let wake = drop_at.map_or(wake, |at| wake.min(at));
            let event = {
                let mut sleep = std::pin::pin!(tokio::time::sleep_until(wake));
                let mut stop = (!stop_seen).then(|| Box::pin(self.stop.changed()));
                // New futures: poll them once, so that they know the waker.
                watchdog.due.store(true, Ordering::Release);
                std::future::poll_fn(|cx| {
                    watchdog.task.register(cx.waker());
                    if let Poll::Ready(res) = conn.as_mut().poll(cx) {
                        return Poll::Ready(Event::Ended(res));
                    }
                    if watchdog.due.swap(false, Ordering::AcqRel) {
                        let mut own = Context::from_waker(&watchdog_waker);
                        if let Some(stop) = stop.as_mut() {
                            if let Poll::Ready(changed) = stop.as_mut().poll(&mut own) {
                                return Poll::Ready(Event::Stop(changed.is_err()));
                            }
                        }
                        if sleep.as_mut().poll(&mut own).is_ready() {
                            return Poll::Ready(Event::Timer);
                        }
                    }
                    Poll::Pending
                })
                .await
            };
            match event {
                Event::Ended(res) => {
                    if let Err(e) = res {
                        debug!(%peer, error = %e, "connection ended with an error");
                    }
                    // After a `101`, hyper has handed the connection to the tunnel.
                    if let Some(pipe) = activity.take_tunnel() {
                        self.run_tunnel(pipe, &activity).await;
                    }
                    return;
                }
                Event::Stop(server_gone) => {
                    stop_seen = true;
                    if server_gone || *self.stop.borrow() {
                        conn.as_mut().graceful_shutdown();
                    }
                }
                Event::Timer => {
                    if drop_at.is_some_and(|at| Instant::now() >= at) {
                        debug!(%peer, "idle connection did not close in time; dropping");
                        return;
                    }
                }
            }
        }
    }
}

/// What ended one turn of a connection's watchdog loop.
enum Event<E> {
    /// The connection is done (closed, failed, or handed to a tunnel).
    Ended(Result<(), E>),
    /// The stop signal changed; `true` if the server is gone.
    Stop(bool),
    /// The watchdog's deadline passed.
    Timer,
}

/// The waker the watchdog's timer and the stop signal see: it notes that they are due to be
/// polled and wakes the connection's task. A connection's task wakes a few times for each
/// exchange (client readable, origin readable, ...); polling the timer and the stop signal
/// on each of those cost about 3 % of a proxied request (`docs/benchmarks.md`, "Twelfth
/// session"), so they are polled only when they woke the task themselves.
#[derive(Default)]
struct WatchdogWake {
    due: AtomicBool,
    task: futures_util::task::AtomicWaker,
}

impl std::task::Wake for WatchdogWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.due.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl<H> Conn<H> {
    /// Runs an upgraded connection's byte pipe until either side closes it, no byte has
    /// passed in either direction for `idle_timeout`, or the server stops. At shutdown a
    /// tunnel is closed at once: it has no exchange to finish, so waiting would only hold
    /// the shutdown for `shutdown_grace` (WebSocket clients reconnect, to another replica).
    async fn run_tunnel(&mut self, mut pipe: TunnelFuture, activity: &Activity) {
        let peer = self.info.peer;
        // Ready at once if shutdown began already (or the server is gone).
        let stopping = self.stop.wait_for(|stop| *stop);
        tokio::pin!(stopping);
        while let Some(deadline) = activity.tunnel_deadline(self.opts.idle_timeout) {
            tokio::select! {
                () = pipe.as_mut() => return,
                _ = &mut stopping => {
                    debug!(%peer, "closing upgraded connection: shutting down");
                    return;
                }
                () = tokio::time::sleep_until(deadline) => {}
            }
        }
        debug!(%peer, "closing idle upgraded connection");
    }
}

/// Holds the open-connections gauge up for as long as the connection task lives (also when
/// it is dropped at the end of the shutdown grace period).
struct OpenConnection(prometheus_client::metrics::gauge::Gauge);

impl OpenConnection {
    fn new(gauge: prometheus_client::metrics::gauge::Gauge) -> Self {
        gauge.inc();
        OpenConnection(gauge)
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Sentinel for "no time recorded".
const NONE: u64 = u64::MAX;

/// Shared between the I/O wrapper, the per-request guards and the watchdog. Times are
/// milliseconds since `base`.
struct Activity {
    base: Instant,
    /// Last successful read or write.
    last_io: AtomicU64,
    /// When the head of the next request started (accept, or first byte after going idle);
    /// `NONE` while waiting idle for the next request.
    head_started: AtomicU64,
    /// When the last request in flight finished.
    idle_since: AtomicU64,
    /// Requests being answered (HTTP/2 may have many).
    in_flight: AtomicUsize,
    /// HTTP/2 reads control frames while idle, so there is no "head started" signal.
    http2: AtomicBool,
    /// The byte pipe of an upgraded connection, from its `101` until hyper lets go of the
    /// connection (see [`Tunnel`]).
    tunnel: Mutex<Option<Tunnel>>,
}

enum Verdict {
    /// Nothing to do until this instant.
    Fine(Instant),
    Idle,
    HeadTimeout,
    Stalled,
}

impl Activity {
    fn new() -> Self {
        Activity {
            base: Instant::now(),
            last_io: AtomicU64::new(0),
            head_started: AtomicU64::new(0),
            idle_since: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            http2: AtomicBool::new(false),
            tunnel: Mutex::new(None),
        }
    }

    fn hold_tunnel(&self, tunnel: Tunnel) {
        if let Ok(mut slot) = self.tunnel.lock() {
            *slot = Some(tunnel);
        }
    }

    fn take_tunnel(&self) -> Option<TunnelFuture> {
        self.tunnel.lock().ok()?.take()?.take()
    }

    /// When an upgraded connection becomes idle: `idle_timeout` after its last byte in either
    /// direction; `None` once that has passed.
    fn tunnel_deadline(&self, idle_timeout: Duration) -> Option<Instant> {
        let idle = u64::try_from(idle_timeout.as_millis()).unwrap_or(NONE / 2);
        let deadline = self.last_io.load(Ordering::Relaxed).saturating_add(idle);
        (self.now_ms() < deadline).then(|| self.at(deadline))
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_millis()).unwrap_or(NONE - 1)
    }

    fn at(&self, ms: u64) -> Instant {
        self.base + Duration::from_millis(ms)
    }

    fn on_read(&self) {
        let now = self.now_ms();
        self.last_io.store(now, Ordering::Relaxed);
        if self.in_flight.load(Ordering::Relaxed) == 0
            && self.head_started.load(Ordering::Relaxed) == NONE
            && !self.http2.load(Ordering::Relaxed)
        {
            self.head_started.store(now, Ordering::Relaxed);
        }
    }

    fn on_write(&self) {
        self.last_io.store(self.now_ms(), Ordering::Relaxed);
    }

    fn request_started(&self, http2: bool) {
        if http2 {
            self.http2.store(true, Ordering::Relaxed);
        }
        self.in_flight.fetch_add(1, Ordering::AcqRel);
    }

    fn request_finished(&self) {
        if self.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            let now = self.now_ms();
            self.idle_since.store(now, Ordering::Relaxed);
            self.head_started.store(NONE, Ordering::Relaxed);
        }
    }

    fn verdict(&self, opts: &ServerOptions) -> Verdict {
        let now = self.now_ms();
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(NONE / 2);
        if self.in_flight.load(Ordering::Acquire) > 0 {
            let deadline = self
                .last_io
                .load(Ordering::Relaxed)
                .saturating_add(ms(opts.request_timeout));
            return if now >= deadline {
                Verdict::Stalled
            } else {
                Verdict::Fine(self.at(deadline))
            };
        }
        let head = self.head_started.load(Ordering::Relaxed);
        if head != NONE {
            let deadline = head.saturating_add(ms(opts.header_read_timeout));
            if now >= deadline {
                return Verdict::HeadTimeout;
            }
            // A request may be starting: the idle deadline no longer applies.
            return Verdict::Fine(self.at(deadline));
        }
        let idle_from = self
            .idle_since
            .load(Ordering::Relaxed)
            .max(self.last_io.load(Ordering::Relaxed));
        let deadline = idle_from.saturating_add(ms(opts.idle_timeout));
        if now >= deadline {
            Verdict::Idle
        } else {
            Verdict::Fine(self.at(deadline))
        }
    }
}

pin_project! {
    /// Notes the time of every successful read and write in [`Activity`].
    struct ActivityIo<S> {
        #[pin]
        inner: S,
        activity: Arc<Activity>,
    }
}

impl<S: AsyncRead> AsyncRead for ActivityIo<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let res = this.inner.poll_read(cx, buf);
        if matches!(res, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.activity.on_read();
        }
        res
    }
}

impl<S: AsyncWrite> AsyncWrite for ActivityIo<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.project();
        let res = this.inner.poll_write(cx, buf);
        if matches!(res, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.on_write();
        }
        res
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.project();
        let res = this.inner.poll_write_vectored(cx, bufs);
        if matches!(res, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.on_write();
        }
        res
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}

/// Counts a request as in flight from the moment its head is parsed until its response body
/// is finished or dropped (also when the client goes away mid-request).
struct InFlight(Arc<Activity>);

impl InFlight {
    fn enter(activity: &Arc<Activity>, http2: bool) -> Self {
        activity.request_started(http2);
        InFlight(activity.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.request_finished();
    }
}

pin_project! {
    /// The response body as hyper sees it: the handler's body plus the in-flight guard.
    /// A plain struct around the already boxed body, so no further allocation.
    struct TrackedBody {
        #[pin]
        inner: Body,
        _guard: InFlight,
    }
}

impl http_body::Body for TrackedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
