//! The operator side of `taler-paywall serve`: the `[admin]` listener (`/healthz`, `/readyz`,
//! `/metrics`), the background readiness check, configuration reload on SIGHUP, and the
//! client behind `taler-paywall healthcheck`.
//!
//! The admin listener is a second [`crate::server::run`] on its own address (the config
//! refuses `admin.listen` equal to `server.listen`), so none of these paths exists on the
//! public listener: there they are ordinary paths, proxied to the origin like any other.
//!
//! Readiness is checked in the background (at startup, after every reload, then every
//! [`READY_INTERVAL`], or every [`UNREADY_INTERVAL`] while not ready), so `GET /readyz` only
//! reads the last result.

use std::collections::BTreeSet;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

use crate::body::{full, Body};
use crate::config::{Config, ServerConfig};
use crate::gateway::{App, Gateway};
use crate::metrics::{self, Metrics};
use crate::server::{self, CertStore, ConnInfo, Handler, ServerOptions};

/// How often readiness is re-checked while the last check passed.
pub const READY_INTERVAL: Duration = Duration::from_secs(30);
/// How often readiness is re-checked while the last check failed (recovery shows up fast).
pub const UNREADY_INTERVAL: Duration = Duration::from_secs(5);

/// The result of the last readiness check, and a way to ask for a new one.
#[derive(Debug)]
pub struct Readiness {
    state: RwLock<Result<(), String>>,
    recheck: Notify,
}

impl Default for Readiness {
    fn default() -> Self {
        Readiness {
            state: RwLock::new(Err("not checked yet".to_owned())),
            recheck: Notify::new(),
        }
    }
}

impl Readiness {
    /// The last result: `Ok` when ready, else the one-line reason.
    pub fn get(&self) -> Result<(), String> {
        self.state.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set(&self, result: Result<(), String>) {
        *self.state.write().unwrap_or_else(|p| p.into_inner()) = result;
    }

    /// Asks the background task to check again now (after a reload).
    pub fn recheck(&self) {
        self.recheck.notify_one();
    }
}

/// One readiness check of `app`: the merchant backend answers `GET config` as a compatible
/// `taler-merchant` that accepts every configured currency, and the origin accepts a TCP
/// connection within `origin.connect_timeout`.
///
/// # Errors
/// One line saying what is not ready.
pub async fn check(app: &App) -> Result<(), String> {
    let currencies: BTreeSet<&str> = app
        .config
        .protect
        .iter()
        .map(|r| r.price.currency())
        .collect();
    app.payment.check_backend(currencies).await?;
    check_origin(&app.config.origin.url, app.config.origin.connect_timeout).await
}

/// Whether the origin accepts a TCP connection.
async fn check_origin(url: &url::Url, timeout: Duration) -> Result<(), String> {
    let port = url.port_or_known_default().unwrap_or(80);
    let addrs: Vec<SocketAddr> = match url.host() {
        Some(url::Host::Ipv4(ip)) => vec![SocketAddr::new(ip.into(), port)],
        Some(url::Host::Ipv6(ip)) => vec![SocketAddr::new(ip.into(), port)],
        Some(url::Host::Domain(name)) => {
            match tokio::time::timeout(timeout, tokio::net::lookup_host((name, port))).await {
                Ok(Ok(a)) => a.collect(),
                Ok(Err(e)) => return Err(format!("origin {url}: cannot resolve: {e}")),
                Err(_) => return Err(format!("origin {url}: name lookup timed out")),
            }
        }
        None => return Err(format!("origin {url}: no host")),
    };
    let mut last = format!("origin {url}: no address");
    for addr in addrs {
        match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await {
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(e)) => last = format!("origin {url}: cannot connect to {addr}: {e}"),
            Err(_) => last = format!("origin {url}: connecting to {addr} timed out"),
        }
    }
    Err(last)
}

/// Runs readiness checks against the gateway's current [`App`] until `stop` turns true.
fn spawn_readiness_task(
    gateway: Arc<Gateway>,
    readiness: Arc<Readiness>,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut was: Option<bool> = None;
        loop {
            let app = gateway.app();
            let result = check(&app).await.map_err(|e| e.replace(['\n', '\r'], " "));
            drop(app);
            let ok = result.is_ok();
            match (&result, was) {
                (Ok(()), Some(true)) | (Err(_), Some(false)) => {}
                (Ok(()), _) => info!("ready: merchant backend and origin answer"),
                (Err(reason), _) => warn!(reason = %reason, "not ready"),
            }
            was = Some(ok);
            metrics.set_ready(ok);
            readiness.set(result);
            let wait = if ok { READY_INTERVAL } else { UNREADY_INTERVAL };
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = readiness.recheck.notified() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    })
}

/// The `[admin]` listener's handler.
#[derive(Debug)]
pub struct AdminHandler {
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
}

impl AdminHandler {
    /// A handler answering from `metrics` and `readiness`.
    pub fn new(metrics: Arc<Metrics>, readiness: Arc<Readiness>) -> Self {
        AdminHandler { metrics, readiness }
    }

    /// Answers one operator request. Generic over the body (ignored) so tests need no socket.
    pub fn answer<B>(&self, req: &Request<B>) -> Response<Body> {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return text(StatusCode::NOT_FOUND, "not found\n".into(), "text/plain");
        }
        match req.uri().path() {
            "/healthz" => text(StatusCode::OK, "ok\n".into(), "text/plain"),
            "/readyz" => match self.readiness.get() {
                Ok(()) => text(StatusCode::OK, "ready\n".into(), "text/plain"),
                Err(reason) => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not ready: {reason}\n"),
                    "text/plain",
                ),
            },
            "/metrics" => text(StatusCode::OK, self.metrics.encode(), metrics::CONTENT_TYPE),
            _ => text(StatusCode::NOT_FOUND, "not found\n".into(), "text/plain"),
        }
    }
}

fn text(status: StatusCode, body: String, content_type: &'static str) -> Response<Body> {
    let mut r = Response::new(full(Bytes::from(body)));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

impl Handler for AdminHandler {
    fn call(
        &self,
        req: Request<Incoming>,
        _conn: ConnInfo,
    ) -> impl Future<Output = Response<Body>> + Send {
        let resp = self.answer(&req);
        async move { resp }
    }
}

/// The operator side of a running `serve`: readiness task, admin listener, SIGHUP reloader.
#[derive(Debug)]
pub struct Operator {
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

/// What [`Operator::start`] needs.
#[derive(Debug)]
pub struct OperatorSetup {
    /// The running gateway (its `App` is swapped on reload).
    pub gateway: Arc<Gateway>,
    /// The process's metrics.
    pub metrics: Arc<Metrics>,
    /// The bound `[admin] listen` socket, if configured.
    pub admin_listener: Option<TcpListener>,
    /// Where the configuration came from; `None` disables reloading.
    pub config_path: Option<PathBuf>,
    /// The public listener's certificate, when it terminates TLS.
    pub cert_store: Option<Arc<CertStore>>,
}

impl Operator {
    /// Starts the readiness checks, the admin listener and the SIGHUP handler.
    pub fn start(setup: OperatorSetup) -> Operator {
        let (stop, stopped) = watch::channel(false);
        let readiness = Arc::new(Readiness::default());
        let mut tasks = vec![spawn_readiness_task(
            setup.gateway.clone(),
            readiness.clone(),
            setup.metrics.clone(),
            stopped.clone(),
        )];
        if let Some(listener) = setup.admin_listener {
            let handler = Arc::new(AdminHandler::new(setup.metrics.clone(), readiness.clone()));
            let opts = ServerOptions {
                max_connections: 64,
                shutdown_grace: Duration::from_secs(1),
                ..ServerOptions::default()
            };
            let mut stopped = stopped.clone();
            tasks.push(tokio::spawn(async move {
                let until = async move {
                    let _ = stopped.wait_for(|s| *s).await;
                };
                if let Err(e) = server::run(listener, handler, opts, until).await {
                    error!(error = %e, "admin listener failed");
                }
            }));
        }
        // Installed here, before any request is served, so that an early SIGHUP is never
        // taken with the default action (terminating the process).
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::hangup()) {
            Ok(hup) => {
                let reloader = Reloader {
                    gateway: setup.gateway,
                    metrics: setup.metrics,
                    readiness,
                    config_path: setup.config_path,
                    cert_store: setup.cert_store,
                };
                tasks.push(tokio::spawn(reloader.run(hup, stopped)));
            }
            Err(e) => warn!(error = %e, "cannot install the SIGHUP handler; reloading is off"),
        }
        Operator { stop, tasks }
    }

    /// Stops everything started by [`Operator::start`] and waits for it.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

struct Reloader {
    gateway: Arc<Gateway>,
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
    config_path: Option<PathBuf>,
    cert_store: Option<Arc<CertStore>>,
}

impl Reloader {
    async fn run(self, mut hup: tokio::signal::unix::Signal, mut stop: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                got = hup.recv() => {
                    if got.is_none() {
                        return;
                    }
                }
                _ = stop.wait_for(|s| *s) => return,
            }
            match &self.config_path {
                Some(path) => {
                    let ok = self.reload(path).await;
                    self.metrics.reload(ok);
                    if ok {
                        self.readiness.recheck();
                    }
                }
                None => warn!("SIGHUP: no configuration file to reload"),
            }
        }
    }

    /// Re-reads the file; on success swaps in a new `App` (and certificate). Returns whether
    /// the new configuration is in effect.
    async fn reload(&self, path: &Path) -> bool {
        info!(config = %path.display(), "SIGHUP: reloading the configuration");
        let owned = path.to_owned();
        let loaded = tokio::task::spawn_blocking(move || Config::load(&owned)).await;
        let config = match loaded {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                // `ConfigError` never quotes secret values (see `config.rs`), so this is safe to log.
                error!(problems = %e, "reload failed: the configuration is invalid; keeping the running configuration");
                return false;
            }
            Err(e) => {
                error!(error = %e, "reload failed; keeping the running configuration");
                return false;
            }
        };
        let current = self.gateway.app();
        let ignored = restart_only_changes(&current.config, &config);
        let app = match App::reloaded(config, self.metrics.clone(), &current) {
            Ok(a) => Arc::new(a),
            Err(e) => {
                error!(error = %format!("{e:#}"), "reload failed; keeping the running configuration");
                return false;
            }
        };
        if let (Some(store), Some(tls)) = (&self.cert_store, &app.config.server.tls) {
            let store = store.clone();
            let (cert, key) = (tls.cert_file.clone(), tls.key_file.clone());
            let res = tokio::task::spawn_blocking(move || store.reload(&cert, &key)).await;
            let res = res.map_err(anyhow::Error::from).and_then(|r| r);
            if let Err(e) = res {
                error!(error = %format!("{e:#}"), "reload failed: TLS certificate; keeping the running configuration");
                return false;
            }
        }
        if !ignored.is_empty() {
            warn!(
                settings = %ignored.join(", "),
                "reload: these settings only take effect after a restart; ignored"
            );
        }
        let observe = app.config.server.mode == crate::config::Mode::Observe;
        let protected = app.policy.routes().len();
        self.gateway.replace_app(app);
        if observe {
            warn!(
                "observe mode: the gateway is NOT enforcing payments; every request is let through"
            );
        }
        info!(protected, "configuration reloaded");
        true
    }
}

/// Settings that a reload cannot change, because the listeners were built from them.
fn restart_only_changes(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut out = Vec::new();
    let (o, n): (&ServerConfig, &ServerConfig) = (&old.server, &new.server);
    if o.listen != n.listen {
        out.push("server.listen");
    }
    if old.admin.as_ref().map(|a| a.listen) != new.admin.as_ref().map(|a| a.listen) {
        out.push("admin.listen");
    }
    if o.tls.is_some() != n.tls.is_some() {
        out.push("server.tls (turning TLS on or off)");
    }
    let limits = [
        (
            o.header_read_timeout != n.header_read_timeout,
            "server.header_read_timeout",
        ),
        (
            o.max_header_bytes != n.max_header_bytes,
            "server.max_header_bytes",
        ),
        (o.idle_timeout != n.idle_timeout, "server.idle_timeout"),
        (
            o.request_timeout != n.request_timeout,
            "server.request_timeout",
        ),
        (
            o.shutdown_grace != n.shutdown_grace,
            "server.shutdown_grace",
        ),
        (
            o.max_connections != n.max_connections,
            "server.max_connections",
        ),
    ];
    out.extend(
        limits
            .iter()
            .filter(|(changed, _)| *changed)
            .map(|(_, k)| *k),
    );
    out
}

/// `taler-paywall healthcheck`: `GET url` (plain `http://`) and whether it answered 200
/// within `timeout`.
///
/// # Errors
/// One line: a bad URL, no answer in time, a connection error, or another status.
pub async fn healthcheck(url: &str, timeout: Duration) -> anyhow::Result<()> {
    let uri: http::Uri = url
        .parse()
        .with_context(|| format!("invalid URL {url:?}"))?;
    if uri.scheme_str() != Some("http") {
        anyhow::bail!("{url}: only http:// URLs are supported (the admin listener is plain HTTP)");
    }
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<Bytes>>();
    let req = Request::get(uri)
        .header(http::header::USER_AGENT, "taler-paywall-healthcheck")
        .body(http_body_util::Empty::new())
        .context("building the request")?;
    let resp = tokio::time::timeout(timeout, client.request(req))
        .await
        .map_err(|_| anyhow::anyhow!("{url}: no answer within {timeout:?}"))?
        .with_context(|| format!("{url}: request failed"))?;
    if resp.status() == StatusCode::OK {
        Ok(())
    } else {
        anyhow::bail!("{url}: answered {}", resp.status())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(path: &str) -> Request<()> {
        Request::get(path).body(()).unwrap()
    }

    #[test]
    fn answers_only_the_three_paths() {
        let readiness = Arc::new(Readiness::default());
        let h = AdminHandler::new(Arc::new(Metrics::new()), readiness.clone());
        assert_eq!(h.answer(&get("/healthz")).status(), 200);
        let r = h.answer(&get("/readyz"));
        assert_eq!(r.status(), 503, "not ready until checked");
        readiness.set(Ok(()));
        assert_eq!(h.answer(&get("/readyz")).status(), 200);
        let m = h.answer(&get("/metrics"));
        assert_eq!(m.status(), 200);
        assert_eq!(m.headers()[CONTENT_TYPE], metrics::CONTENT_TYPE);
        for other in ["/", "/healthz/", "/metrics.txt", "/premium/x"] {
            assert_eq!(h.answer(&get(other)).status(), 404, "{other}");
        }
        let post = Request::post("/healthz").body(()).unwrap();
        assert_eq!(h.answer(&post).status(), 404);
    }
}
