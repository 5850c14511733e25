//! `taler-paywall demo`: a complete paywalled site on loopback with nothing else installed.
//!
//! Three servers start in this process, each on 127.0.0.1:
//! - a small sample site (the origin): free pages, two articles sold one by one
//!   (`scope = "page"`), and a premium gallery with images sold as one (`scope = "prefix"`);
//! - the sandbox merchant backend ([`crate::sandbox`]), which also plays the customer's wallet
//!   on its payment page;
//! - the gateway in front of the site, configured like a real deployment.
//!
//! The command prints the URL to open and runs until interrupted.

use std::net::SocketAddr;
use std::sync::Arc;

use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Request, Response, StatusCode};

use crate::body::{full, Body};
use crate::config::{Config, NoEnv};
use crate::sandbox::{Sandbox, SandboxOptions};
use crate::server::{ConnInfo, Handler};

/// The sample site's pages: path, content type, body.
fn page(path: &str) -> Option<(&'static str, String)> {
    const CSS: &str = "body{font-family:system-ui,sans-serif;max-width:42rem;margin:2rem auto;padding:0 1rem;line-height:1.55;color:#1a1a1a}\
        nav a{margin-right:1rem}img{max-width:100%;border:1px solid #ccc}.paid{background:#e8f5e9;padding:.5rem 1rem;border-radius:.3rem}";
    let doc = |title: &str, body: &str| {
        format!(
            "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
             <title>{title}</title><style>{CSS}</style></head><body>\
             <nav><a href=\"/\">Home</a><a href=\"/free/about.html\">About (free)</a><a href=\"/articles/taler.html\">Article 1</a>\
             <a href=\"/articles/privacy.html\">Article 2</a><a href=\"/premium/index.html\">Premium gallery</a></nav>\
             <main>{body}</main></body></html>\n"
        )
    };
    let html = "text/html; charset=utf-8";
    Some(match path {
        "/" | "/index.html" => (
            html,
            doc(
                "The Demo Gazette",
                "<h1>The Demo Gazette</h1><p>A sample site behind <strong>taler-paywall</strong>. Free pages are served as they are; \
                 articles cost KUDOS&nbsp;0.5 each, and one payment of KUDOS&nbsp;2 opens the whole premium gallery.</p>\
                 <ul><li><a href=\"/free/about.html\">About this demo</a> (free)</li>\
                 <li><a href=\"/articles/taler.html\">How GNU Taler pays for a page</a> (KUDOS 0.5)</li>\
                 <li><a href=\"/articles/privacy.html\">Privacy for buyers</a> (KUDOS 0.5)</li>\
                 <li><a href=\"/premium/index.html\">Premium gallery</a> (KUDOS 2, all pages and images)</li></ul>\
                 <p>Payments use the sandbox merchant's play money: on its payment page, press the button to pay with the sandbox wallet.</p>",
            ),
        ),
        "/free/about.html" => (
            html,
            doc(
                "About",
                "<h1>About this demo</h1><p>This page is free: the gateway forwards it to the site untouched and never asks the merchant backend.</p>\
                 <p>Try deleting your cookies after buying an article and opening it again: the wallet recognises the purchase \
                 (repurchase detection) and you get the page back without paying twice.</p>",
            ),
        ),
        "/articles/taler.html" => (
            html,
            doc(
                "How GNU Taler pays for a page",
                "<h1>How GNU Taler pays for a page</h1><p class=\"paid\">Thank you for your purchase of this article.</p>\
                 <p>The gateway asked the merchant backend for an order for exactly this page, sent your browser to the order's payment page, \
                 and, once the wallet paid, let the request through to the site.</p>",
            ),
        ),
        "/articles/privacy.html" => (
            html,
            doc(
                "Privacy for buyers",
                "<h1>Privacy for buyers</h1><p class=\"paid\">Thank you for your purchase of this article.</p>\
                 <p>GNU Taler payments do not reveal who you are to the shop: the gateway only knows a random session in a signed cookie.</p>",
            ),
        ),
        "/premium/" | "/premium/index.html" => (
            html,
            doc(
                "Premium gallery",
                "<h1>Premium gallery</h1><p class=\"paid\">Your purchase opens every page and image under /premium/.</p>\
                 <p><img src=\"/premium/img/sunrise.svg\" alt=\"A stylised sunrise\" width=\"320\" height=\"200\"></p>\
                 <p><img src=\"/premium/img/waves.svg\" alt=\"Stylised waves\" width=\"320\" height=\"200\"></p>\
                 <p><a href=\"/premium/more.html\">More premium content</a></p>",
            ),
        ),
        "/premium/more.html" => (
            html,
            doc(
                "More premium content",
                "<h1>More premium content</h1><p class=\"paid\">Included in your premium purchase: no second payment.</p>",
            ),
        ),
        "/premium/img/sunrise.svg" => (
            "image/svg+xml",
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"320\" height=\"200\" viewBox=\"0 0 320 200\">\
             <rect width=\"320\" height=\"200\" fill=\"#bfe3ff\"/><circle cx=\"160\" cy=\"150\" r=\"60\" fill=\"#ffb300\"/>\
             <rect y=\"150\" width=\"320\" height=\"50\" fill=\"#2e7d32\"/></svg>\n"
                .to_owned(),
        ),
        "/premium/img/waves.svg" => (
            "image/svg+xml",
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"320\" height=\"200\" viewBox=\"0 0 320 200\">\
             <rect width=\"320\" height=\"200\" fill=\"#e3f2fd\"/><path d=\"M0 120 Q40 90 80 120 T160 120 T240 120 T320 120 V200 H0Z\" fill=\"#1565c0\"/></svg>\n"
                .to_owned(),
        ),
        _ => return None,
    })
}

/// The sample site as a handler (also used by tests).
#[derive(Debug, Default, Clone, Copy)]
pub struct DemoSite;

impl Handler for DemoSite {
    fn call(
        &self,
        req: Request<hyper::body::Incoming>,
        _conn: ConnInfo,
    ) -> impl std::future::Future<Output = Response<Body>> + Send {
        let path = req.uri().path().to_owned();
        async move {
            match page(&path) {
                Some((ctype, body)) => {
                    let mut r = Response::new(full(body));
                    r.headers_mut()
                        .insert(CONTENT_TYPE, HeaderValue::from_static(ctype));
                    r
                }
                None => {
                    let mut r = Response::new(full("Not found\n"));
                    *r.status_mut() = StatusCode::NOT_FOUND;
                    r.headers_mut().insert(
                        CONTENT_TYPE,
                        HeaderValue::from_static("text/plain; charset=utf-8"),
                    );
                    r
                }
            }
        }
    }
}

/// The gateway configuration of the demo.
pub fn demo_config(
    gateway: SocketAddr,
    origin: SocketAddr,
    merchant: &url::Url,
    token: &str,
) -> String {
    demo_config_with(gateway, origin, merchant, token, &DemoOptions::default())
}

/// What a test may change in the demo.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// The gateway's `session.recheck_interval` (default 60 s; tests that refund use 0 s so
    /// that the refund shows at once instead of after a minute).
    pub recheck_interval: std::time::Duration,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            recheck_interval: std::time::Duration::from_secs(60),
        }
    }
}

/// [`demo_config`] with `opts`.
pub fn demo_config_with(
    gateway: SocketAddr,
    origin: SocketAddr,
    merchant: &url::Url,
    token: &str,
    opts: &DemoOptions,
) -> String {
    let recheck = opts.recheck_interval.as_secs();
    let secret: [u8; 32] = rand::random();
    let secret = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, secret);
    format!(
        r#"[server]
listen = "{gateway}"
public_url = "http://{gateway}"

[origin]
url = "http://{origin}"

[merchant]
url = "{merchant}"
token = "{token}"
refund_delay = "1d"

[session]
secret = "{secret}"
recheck_interval = "{recheck}s"

[[protect]]
prefix = "/articles/"
price = "KUDOS:0.5"
summary = "Demo Gazette article"
scope = "page"

[[protect]]
prefix = "/premium/"
price = "KUDOS:2"
summary = "Demo Gazette premium gallery"
scope = "prefix"
"#
    )
}

/// Everything the demo started, for tests.
pub struct RunningDemo {
    /// The URL to open.
    pub url: String,
    /// The sandbox merchant.
    pub sandbox: Sandbox,
    /// The gateway.
    pub gateway: crate::gateway::RunningGateway,
    origin: tokio::task::JoinHandle<()>,
    origin_stop: tokio::sync::oneshot::Sender<()>,
}

impl RunningDemo {
    /// Stops all three servers.
    ///
    /// # Errors
    /// The gateway did not shut down cleanly.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        let r = self.gateway.shutdown().await;
        self.sandbox.shutdown().await;
        let _ = self.origin_stop.send(());
        let _ = self.origin.await;
        r
    }
}

/// Starts the demo with the gateway on 127.0.0.1:`port` (0 = any free port).
///
/// # Errors
/// A port cannot be bound, or a server fails to start.
pub async fn start(port: u16) -> anyhow::Result<RunningDemo> {
    start_with(port, DemoOptions::default()).await
}

/// [`start`] with `opts`.
///
/// # Errors
/// As [`start`].
pub async fn start_with(port: u16, demo_opts: DemoOptions) -> anyhow::Result<RunningDemo> {
    let gateway_listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on 127.0.0.1:{port}: {e} (try --port 0)"))?;
    let gateway_addr = gateway_listener.local_addr()?;
    let origin_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let origin_addr = origin_listener.local_addr()?;
    let (origin_stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let origin = tokio::spawn(async move {
        let stop = async {
            let _ = stop_rx.await;
        };
        if let Err(e) = crate::server::run(
            origin_listener,
            Arc::new(DemoSite),
            crate::server::ServerOptions::default(),
            stop,
        )
        .await
        {
            tracing::error!(cause = %e, "demo site stopped");
        }
    });
    let sandbox_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let opts = SandboxOptions::default();
    let token = opts.token.clone();
    let sandbox = Sandbox::start(sandbox_listener, opts).await?;
    let text = demo_config_with(
        gateway_addr,
        origin_addr,
        &sandbox.base_url(),
        &token,
        &demo_opts,
    );
    let config = Config::from_toml_str(&text, std::path::Path::new("demo.toml"), &NoEnv)
        .map_err(|e| anyhow::anyhow!("demo configuration: {e}"))?;
    let gateway = crate::gateway::spawn(config, gateway_listener).await?;
    Ok(RunningDemo {
        url: format!("http://{gateway_addr}/"),
        sandbox,
        gateway,
        origin,
        origin_stop,
    })
}

/// `taler-paywall demo`: starts everything, prints the URL, runs until SIGINT/SIGTERM.
///
/// # Errors
/// As [`start`].
pub async fn run(port: u16) -> anyhow::Result<()> {
    let demo = start(port).await?;
    eprintln!(
        "\n  taler-paywall demo is running.\n\n  Open {url} in your browser.\n\n  \
         Sample site: free pages, articles at KUDOS 0.5 each (/articles/), a premium gallery at KUDOS 2 (/premium/).\n  \
         Merchant:    the built-in SANDBOX at {merchant} (play money, nothing is stored).\n  \
         To pay, press the sandbox wallet's button on the payment page.\n\n  Press Ctrl-C to stop.\n",
        url = demo.url,
        merchant = demo.sandbox.base_url(),
    );
    crate::server::shutdown_signal().await;
    demo.shutdown().await
}
