//! The built-in sandbox merchant backend: an in-memory stand-in for taler-merchant-httpd
//! that also plays the customer's wallet.
//!
//! It serves the merchant API the gateway uses (`config`, `private/orders`,
//! `private/orders/{id}`, `private/orders/{id}/refund`, the public `orders/{id}` page) for
//! the default instance at `/` and any instance at `/instances/{id}/`, strictly as the real
//! backend answers, including its surprises (see [`state`]). Beside that, `sandbox/*`
//! endpoints pay, claim and collect refunds as a wallet would. Play money, no exchange, no
//! bank, no persistence. See `docs/sandbox.md`.
//!
//! # Layout
//! - [`state`]: the pure order store and every protocol decision (time is an argument).
//! - `http`: routing, authentication, fault injection, long polling, JSON shapes.
//! - `page`: the HTML payment page with its QR code.
//! - [`ec`]: the Taler error codes used.

pub mod ec;
mod http;
mod page;
pub mod state;

use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use url::Url;

use state::Store;

/// How long shutdown waits for in-flight requests (long polls included) before dropping them.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(3);

/// Options of a sandbox.
#[derive(Clone, Debug)]
pub struct SandboxOptions {
    /// The access token for `private/*`, with or without the `secret-token:` prefix.
    pub token: String,
    /// How clients reach the sandbox; `None` means `http://<bound address>/`.
    pub public_url: Option<Url>,
    /// The instance ids served; `None` accepts any well-formed id. The default instance
    /// (at `/`) is called `default`.
    pub instances: Option<Vec<String>>,
    /// The one currency orders may use.
    pub currency: String,
    /// The most orders kept in memory.
    pub max_orders: usize,
}

impl Default for SandboxOptions {
    fn default() -> Self {
        SandboxOptions {
            token: "secret-token:sandbox".to_owned(),
            public_url: None,
            instances: None,
            currency: "KUDOS".to_owned(),
            max_orders: 100_000,
        }
    }
}

/// A failure to inject into the merchant API (`config` and `private/*`); the wallet
/// endpoints and the public order page keep working.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Accept the connection, then drop it without answering.
    Unreachable,
    /// Answer normally after this delay.
    Slow(Duration),
    /// Answer with this 5xx status and an `ErrorDetail`.
    ServerError(u16),
    /// Answer 200 with a body that is not valid JSON.
    Malformed,
    /// Answer 401 with an `ErrorDetail`, whatever the token.
    Unauthorized,
    /// `GET private/orders/{id}` answers `order_status: "frobnicated"`.
    UnknownStatus,
}

impl FromStr for Fault {
    type Err = String;

    /// Parses the `--faults` syntax: `unreachable`, `slow=MS`, `status=CODE` (500-599),
    /// `malformed`, `unauthorized`, `unknown-status`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let (name, arg) = match s.split_once('=') {
            Some((n, a)) => (n.trim(), Some(a.trim())),
            None => (s, None),
        };
        match (name, arg) {
            ("unreachable", None) => Ok(Fault::Unreachable),
            ("malformed", None) => Ok(Fault::Malformed),
            ("unauthorized", None) => Ok(Fault::Unauthorized),
            ("unknown-status", None) => Ok(Fault::UnknownStatus),
            ("slow", Some(ms)) => ms
                .parse::<u64>()
                .map(|ms| Fault::Slow(Duration::from_millis(ms)))
                .map_err(|_| format!("slow=MS needs a number of milliseconds, not {ms:?}")),
            ("status", Some(code)) => match code.parse::<u16>() {
                Ok(c) if (500..=599).contains(&c) => Ok(Fault::ServerError(c)),
                _ => Err(format!("status=CODE needs a 5xx status, not {code:?}")),
            },
            _ => Err(format!(
                "unknown fault {s:?}; use unreachable, slow=MS, status=CODE, malformed, \
                 unauthorized or unknown-status"
            )),
        }
    }
}

/// How many merchant-API calls the sandbox received, by endpoint (faulted ones included).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CallCounts {
    /// `GET config`.
    pub config: u64,
    /// `POST private/orders`.
    pub create_order: u64,
    /// `GET private/orders/{id}`.
    pub get_order: u64,
    /// `POST private/orders/{id}/refund`.
    pub refund: u64,
    /// Public `GET orders/{id}`.
    pub public_order: u64,
}

/// What the request handlers share.
struct Shared {
    /// `secret-token:…`.
    token: String,
    /// Public base URL of the default instance, ending with `/`.
    base: Url,
    instances: Option<Vec<String>>,
    store: Mutex<Store>,
    fault: Mutex<Option<Fault>>,
    calls: Mutex<CallCounts>,
    /// Woken whenever an order is paid, replayed, claimed or refunded (long polls wait on it).
    changed: Notify,
    /// Seconds added to the system clock (tests use it to pass deadlines).
    clock_offset: AtomicU64,
    /// Set on shutdown: long polls answer at once instead of holding the drain.
    stopping: AtomicBool,
}

impl Shared {
    fn now(&self) -> state::Secs {
        let real = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        real.saturating_add(self.clock_offset.load(Ordering::Relaxed))
    }

    /// The store. A panic while it was held cannot leave it half-updated in a way that
    /// matters more than losing the sandbox, so a poisoned lock is simply taken over.
    fn store(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn fault(&self) -> Option<Fault> {
        self.fault.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn count(&self, f: impl FnOnce(&mut CallCounts)) {
        f(&mut self.calls.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// Public base URL of instance `id` (`default` is the root).
    fn instance_base(&self, id: &str) -> Url {
        if id == "default" {
            return self.base.clone();
        }
        self.base
            .join(&format!("instances/{id}/"))
            .unwrap_or_else(|_| self.base.clone())
    }
}

/// A running sandbox.
pub struct Sandbox {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Sandbox {
    /// Starts serving on `listener` in a spawned task.
    ///
    /// # Errors
    /// The listener has no local address, or the public URL cannot be a base URL.
    pub async fn start(listener: TcpListener, opts: SandboxOptions) -> anyhow::Result<Sandbox> {
        let addr = listener.local_addr()?;
        let mut base = match opts.public_url {
            Some(u) => u,
            None => {
                let host = if addr.ip().is_unspecified() {
                    SocketAddr::new([127, 0, 0, 1].into(), addr.port())
                } else {
                    addr
                };
                Url::parse(&format!("http://{host}/"))?
            }
        };
        if base.cannot_be_a_base() || !matches!(base.scheme(), "http" | "https") {
            anyhow::bail!("the sandbox public URL must be an http(s) URL: {base}");
        }
        if !base.path().ends_with('/') {
            let path = format!("{}/", base.path());
            base.set_path(&path);
        }
        base.set_query(None);
        base.set_fragment(None);
        let mut seed = [0u8; 32];
        rand::Rng::fill(&mut rand::rngs::OsRng, &mut seed);
        let shared = Arc::new(Shared {
            token: normalise_token(&opts.token),
            base,
            instances: opts.instances,
            store: Mutex::new(Store::new(&opts.currency, opts.max_orders, seed)),
            fault: Mutex::new(None),
            calls: Mutex::new(CallCounts::default()),
            changed: Notify::new(),
            clock_offset: AtomicU64::new(0),
            stopping: AtomicBool::new(false),
        });
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(serve(listener, shared.clone(), stop_rx));
        Ok(Sandbox {
            addr,
            shared,
            stop,
            task,
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Public base URL of the default instance, ending with `/`.
    pub fn base_url(&self) -> Url {
        self.shared.base.clone()
    }

    /// Public base URL of instance `id`: `{base}instances/{id}/`.
    pub fn instance_url(&self, id: &str) -> Url {
        self.shared
            .base
            .join(&format!("instances/{id}/"))
            .unwrap_or_else(|_| self.shared.base.clone())
    }

    /// The access token, `secret-token:…`.
    pub fn token(&self) -> &str {
        &self.shared.token
    }

    /// Injects a fault into the merchant API (`None` clears it).
    pub fn set_fault(&self, fault: Option<Fault>) {
        *self.shared.fault.lock().unwrap_or_else(|p| p.into_inner()) = fault;
    }

    /// The merchant-API calls received so far.
    pub fn calls(&self) -> CallCounts {
        *self.shared.calls.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Moves the sandbox's clock forward, so tests can pass pay and refund deadlines
    /// without waiting.
    pub fn advance_clock(&self, by: Duration) {
        self.shared
            .clock_offset
            .fetch_add(by.as_secs(), Ordering::Relaxed);
        self.shared.changed.notify_waiters();
    }

    /// Stops accepting, lets in-flight requests finish (up to a few seconds), and returns.
    pub async fn shutdown(self) {
        self.shared.stopping.store(true, Ordering::Relaxed);
        let _ = self.stop.send(true);
        self.shared.changed.notify_waiters();
        let _ = self.task.await;
    }
}

/// `secret-token:` + the token, whether or not it already had the prefix.
fn normalise_token(token: &str) -> String {
    let bare = token.trim();
    let bare = bare.strip_prefix("secret-token:").unwrap_or(bare);
    format!("secret-token:{bare}")
}

/// The accept loop: one task per connection, graceful drain on stop.
async fn serve(listener: TcpListener, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let graceful = GracefulShutdown::new();
    let builder = auto::Builder::new(TokioExecutor::new());
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    let shared = shared.clone();
                    let svc = service_fn(move |req| http::handle(shared.clone(), req));
                    let conn = builder.serve_connection(TokioIo::new(stream), svc).into_owned();
                    let conn = graceful.watch(conn);
                    tokio::spawn(async move {
                        if let Err(e) = conn.await {
                            tracing::debug!(cause = %e, "sandbox connection ended with an error");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(cause = %e, "sandbox accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            _ = stop.changed() => break,
        }
    }
    drop(listener);
    if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::debug!("sandbox drain timed out; dropping remaining connections");
    }
}

/// `taler-paywall sandbox-merchant`: runs a sandbox until SIGINT or SIGTERM.
///
/// # Errors
/// A malformed public URL or fault spec, or the address cannot be bound.
pub async fn run_cli(
    listen: SocketAddr,
    token: String,
    public_url: Option<String>,
    faults: Option<String>,
) -> anyhow::Result<()> {
    let public_url = public_url
        .map(|u| Url::parse(&u).map_err(|e| anyhow::anyhow!("--public-url {u:?}: {e}")))
        .transpose()?;
    let fault = faults
        .map(|f| {
            f.parse::<Fault>()
                .map_err(|e| anyhow::anyhow!("--faults: {e}"))
        })
        .transpose()?;
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
    let opts = SandboxOptions {
        token,
        public_url,
        ..SandboxOptions::default()
    };
    let currency = opts.currency.clone();
    let sandbox = Sandbox::start(listener, opts).await?;
    sandbox.set_fault(fault.clone());
    eprintln!(
        "\n  *** SANDBOX merchant backend: PLAY MONEY ({currency}), NOTHING IS STORED ON DISK ***\n\
         \x20 This is not a GNU Taler merchant backend. Never use it for real payments.\n\n\
         \x20 merchant URL (default instance): {}\n\
         \x20 other instances:                 {}instances/ID/\n\
         \x20 access token:                    {}\n\
         \x20 injected fault:                  {}\n\
         \x20 listening on {}; stop with Ctrl-C\n",
        sandbox.base_url(),
        sandbox.base_url(),
        sandbox.token(),
        fault.map_or_else(|| "none".to_owned(), |f| format!("{f:?}")),
        sandbox.addr(),
    );
    shutdown_signal().await;
    eprintln!("sandbox merchant: stopping");
    sandbox.shutdown().await;
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_specs_parse() {
        let rows: [(&str, Result<Fault, ()>); 10] = [
            ("unreachable", Ok(Fault::Unreachable)),
            ("slow=250", Ok(Fault::Slow(Duration::from_millis(250)))),
            ("status=503", Ok(Fault::ServerError(503))),
            ("malformed", Ok(Fault::Malformed)),
            ("unauthorized", Ok(Fault::Unauthorized)),
            ("unknown-status", Ok(Fault::UnknownStatus)),
            ("status=404", Err(())),
            ("slow=fast", Err(())),
            ("slow", Err(())),
            ("explode", Err(())),
        ];
        for (spec, want) in rows {
            assert_eq!(spec.parse::<Fault>().map_err(|_| ()), want, "{spec}");
        }
    }

    #[test]
    fn token_prefix_is_optional() {
        assert_eq!(normalise_token("sandbox"), "secret-token:sandbox");
        assert_eq!(
            normalise_token("secret-token:sandbox"),
            "secret-token:sandbox"
        );
    }
}
