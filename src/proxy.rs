//! Forwarding to the origin: pooled connections (see [`crate::origin_pool`] for `http` origins,
//! and [`crate::origin_h1`] for how it exchanges bodiless `GET` and `HEAD`),
//! the request rewritten for the origin, and both bodies streamed through without buffering.
//!
//! What [`OriginClient::forward`] does to a request, in order:
//! 1. refuses a `Content-Length` above `limits.max_request_body` (413) and caps a body of
//!    unknown length at the same size while it streams;
//! 2. notes whether the client asks for a protocol upgrade (`Connection: upgrade` + `Upgrade`),
//!    before any header is removed;
//! 3. removes `Connection`, every header it names (except `Host` and `Content-Length`, which
//!    framing and routing depend on) and the fixed hop-by-hop list; the same happens to the
//!    response;
//! 4. removes every header the gateway owns (`X-Forwarded-*`, `Forwarded`, `X-Real-IP`,
//!    `X-Request-Id`, the URL-override headers some frameworks route on such as
//!    `X-Original-URL`) in every spelling, `_` for `-` included, and sets its own: the
//!    forwarding chain trusts the client's values only when the peer is a trusted proxy;
//! 5. removes the gateway's own cookies from `Cookie`, leaving the site's;
//! 6. sends the request to `origin.url` + the *normalised* path (the one the policy decided
//!    on) + the raw query. The request target's authority, if the client sent an absolute
//!    URI, is never used.
//!
//! An upgrade is only switched to a raw tunnel after the origin answered `101`. The tunnel is
//! handed to the server in the response (a [`crate::server::Tunnel`] extension), which runs it
//! inside the client connection's task.

use std::error::Error as StdError;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::{Either, FutureExt as _};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, StatusCode, Uri, Version};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tracing::debug;

use crate::body::{self, Body, BodyTooLarge, BoxError, Limited};
use crate::config::{Config, HostHeader};
use crate::origin_h1;
use crate::origin_pool::{H1Pool, SendError};
use crate::path::NormalizedPath;

/// Per-request facts the proxy needs besides the request itself.
#[derive(Debug, Clone, Copy)]
pub struct ForwardContext<'a> {
    /// The TCP peer's IP address as text (`::ffff:`-mapped addresses as IPv4), as appended
    /// to `X-Forwarded-For`.
    pub peer: &'a HeaderValue,
    /// Whether the peer is in `server.trusted_proxies`, so its `X-Forwarded-*` are believed.
    pub peer_trusted: bool,
    /// Whether the client reached the gateway over TLS (`X-Forwarded-Proto: https`).
    pub tls: bool,
    /// The request id, sent to the origin as `X-Request-Id`.
    pub request_id: &'a HeaderValue,
    /// Cookies whose names start with one of these belong to the gateway and are not sent
    /// to the origin.
    pub strip_cookie_prefixes: &'a [String],
}

/// Why a request could not be forwarded. The gateway maps each variant to a status.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The origin refused the connection or could not be reached (502).
    #[error("origin unreachable")]
    Unreachable(#[source] BoxError),
    /// Connecting to the origin took longer than `origin.connect_timeout` (504).
    #[error("origin connect timed out")]
    ConnectTimeout(#[source] BoxError),
    /// The origin did not send its response head within `origin.response_timeout` (504).
    #[error("origin did not answer within {0:?}")]
    Timeout(Duration),
    /// The origin broke the exchange: connection reset, malformed response, or an answer
    /// that does not fit the request, such as an unrequested `101` (502).
    #[error("origin failed")]
    Origin(#[source] BoxError),
    /// The request body is larger than `limits.max_request_body` (413).
    #[error(transparent)]
    BodyTooLarge(#[from] BodyTooLarge),
    /// The upstream request could not be built; a bug, not the client's fault (500).
    #[error("cannot build the upstream request")]
    Build(#[from] http::Error),
    /// The request was already taken out to be sent or handed on (see
    /// [`OriginClient::forward`]): a bug, answered with 500 rather than a panic. The gateway's
    /// steps before the proxy report a missing request the same way.
    #[error("no request to forward")]
    NoRequest,
}

/// Why the origin client could not be set up (at startup).
#[derive(Debug, thiserror::Error)]
pub enum OriginSetupError {
    /// `origin.ca_file` could not be read.
    #[error("origin.ca_file {}: cannot read", path.display())]
    CaFile {
        /// The file.
        path: std::path::PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// `origin.ca_file` holds no usable certificate.
    #[error("origin.ca_file {0}: no usable PEM certificate")]
    NoCertificates(std::path::PathBuf),
    /// rustls refused the configuration.
    #[error("origin TLS configuration rejected")]
    Tls(#[from] rustls::Error),
    /// The origin URL has no host (cannot happen after config validation).
    #[error("origin.url has no usable host")]
    BadUrl,
}

/// The client for the origin, built once at startup and shared by every request.
pub struct OriginClient {
    /// One pooled client per serving thread (see [`set_serving_threads`] and
    /// [`crate::server::serving_thread`]): a request uses the
    /// pool of the thread it runs on, so it and its origin connection share a thread.
    /// For `https` origins (TLS, HTTP/2 by ALPN); empty for `http` origins.
    clients: Box<[Client<HttpsConnector<HttpConnector>, Body>]>,
    /// For `http` origins: HTTP/1.1 keep-alive connections, one pool per serving thread
    /// ([`crate::origin_pool`]).
    plain: Option<H1Pool>,
    scheme: Scheme,
    authority: Authority,
    /// The origin URL's path without a trailing slash (`""` for the root).
    prefix: String,
    /// `Host` for `host_header = "origin"`, and when the client sent none (HTTP/1.0).
    origin_host: HeaderValue,
    host_header: HostHeader,
    response_timeout: Duration,
    /// 0 means unlimited.
    max_request_body: u64,
}

impl std::fmt::Debug for OriginClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OriginClient")
            .field("scheme", &self.scheme)
            .field("authority", &self.authority)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

/// How many serving threads origin clients built from now on are split for (1 until
/// [`set_serving_threads`] is called).
static SERVING_THREADS: AtomicUsize = AtomicUsize::new(1);

/// Origin clients built after this call keep one connection pool per serving thread, `n` in
/// all (`taler-paywall serve` runs one single-threaded runtime per thread).
pub fn set_serving_threads(n: usize) {
    SERVING_THREADS.store(n.max(1), Ordering::Relaxed);
}

impl OriginClient {
    /// Sends the finished upstream request (origin-form target for the plain pool, absolute for
    /// hyper-util's client) through the calling thread's pool. The request is handed over
    /// when this is called (see [`H1Pool::send`]); the future waits for the response.
    ///
    /// `direct_target` is set when the request takes the plain pool's fast path
    /// ([`H1Pool::send_to`]); the request's URI is then not used.
    fn send<'a>(
        &'a self,
        upstream: Request<Body>,
        direct_target: Option<&str>,
    ) -> impl Future<Output = Result<Response<Body>, ProxyError>> + Send + 'a {
        let thread = crate::server::serving_thread();
        match &self.plain {
            Some(pool) => Either::Left(
                match direct_target {
                    Some(target) => Either::Left(pool.send_to(thread, upstream, target)),
                    None => Either::Right(pool.send(thread, upstream)),
                }
                .map(|sent| {
                    sent.map_err(|e| match e {
                        SendError::Connect(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                            ProxyError::ConnectTimeout(Box::new(e))
                        }
                        SendError::Connect(e) => ProxyError::Unreachable(Box::new(e)),
                        SendError::Http(e) => match find_source::<BodyTooLarge>(&e) {
                            Some(too_large) => ProxyError::BodyTooLarge(*too_large),
                            None => ProxyError::Origin(Box::new(e)),
                        },
                        SendError::Direct(e) => ProxyError::Origin(Box::new(e)),
                    })
                }),
            ),
            None => {
                let client = &self.clients[thread % self.clients.len()];
                // Boxed: inline, this arm's future made every request's future larger, also
                // where the origin is plain http and the arm is never taken. With an https
                // origin every request takes it and pays one allocation, small next to TLS.
                Either::Right(Box::pin(
                    client
                        .request(upstream)
                        .map(|sent| sent.map(|resp| resp.map(body::boxed)).map_err(classify)),
                ))
            }
        }
    }

    /// Builds the pooled client from `[origin]` and `[limits]`: for an `http` origin the
    /// gateway's own HTTP/1.1 keep-alive pool ([`crate::origin_pool`]); for an `https` origin
    /// hyper-util's client, HTTP/1.1 and HTTP/2 when the origin offers it, certificates checked
    /// against the public web PKI roots, or only against `origin.ca_file` when set (the TLS
    /// configuration is built and `ca_file` checked for either scheme).
    ///
    /// `origin.connect_timeout` bounds the TCP connect; the TLS handshake is bounded by
    /// `origin.response_timeout`, which covers everything up to the response head.
    ///
    /// # Errors
    /// [`OriginSetupError`] if the CA file cannot be used or rustls refuses the configuration.
    pub fn new(config: &Config) -> Result<Self, OriginSetupError> {
        let origin = &config.origin;
        let url = &origin.url;
        let scheme = if url.scheme() == "https" {
            Scheme::HTTPS
        } else {
            Scheme::HTTP
        };
        let host = url.host_str().ok_or(OriginSetupError::BadUrl)?;
        let authority_text = match url.port() {
            Some(p) => format!("{host}:{p}"),
            None => host.to_owned(),
        };
        let authority =
            Authority::try_from(authority_text.as_str()).map_err(|_| OriginSetupError::BadUrl)?;
        let origin_host =
            HeaderValue::try_from(authority_text).map_err(|_| OriginSetupError::BadUrl)?;
        let prefix = url.path().trim_end_matches('/').to_owned();

        let mut roots = rustls::RootCertStore::empty();
        match &origin.ca_file {
            Some(path) => {
                let pem = std::fs::read(path).map_err(|source| OriginSetupError::CaFile {
                    path: path.clone(),
                    source,
                })?;
                for cert in rustls_pemfile::certs(&mut pem.as_slice()).flatten() {
                    // A bundle may hold certificates rustls cannot use; skip those.
                    let _ = roots.add(cert);
                }
                if roots.is_empty() {
                    return Err(OriginSetupError::NoCertificates(path.clone()));
                }
            }
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();

        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(origin.connect_timeout));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let threads = SERVING_THREADS.load(Ordering::Relaxed).max(1);
        let (clients, plain) = if scheme == Scheme::HTTP {
            let port = url.port_or_known_default().unwrap_or(80);
            let target = match url.host() {
                Some(url::Host::Ipv6(ip)) => format!("[{ip}]:{port}"),
                _ => format!("{host}:{port}"),
            };
            let pool = H1Pool::new(
                target,
                origin.connect_timeout,
                origin.max_idle_per_host,
                threads,
            );
            (Box::default(), Some(pool))
        } else {
            let clients = (0..threads)
                .map(|_| {
                    Client::builder(TokioExecutor::new())
                        .pool_timer(TokioTimer::new())
                        .timer(TokioTimer::new())
                        .pool_idle_timeout(Duration::from_secs(90))
                        .pool_max_idle_per_host(origin.max_idle_per_host)
                        // `forward` always sets `Host` itself.
                        .set_host(false)
                        .build(connector.clone())
                })
                .collect();
            (clients, None)
        };
        Ok(OriginClient {
            clients,
            plain,
            scheme,
            authority,
            prefix,
            origin_host,
            host_header: origin.host_header,
            response_timeout: origin.response_timeout,
            max_request_body: config.limits.max_request_body,
        })
    }

    /// Sends `req` to the origin at `path` (the normalised form of the request's path) and
    /// returns the origin's response with a streaming body. See the module docs for every
    /// change made to the request and the response.
    ///
    /// `req` is `Some` on entry and taken out here, so that the request is never moved into
    /// this future: with many requests in flight each such move writes its 264 bytes into
    /// memory no longer in the CPU's cache (`docs/benchmarks.md`, "Ninth session").
    ///
    /// # Errors
    /// [`ProxyError`]: the origin unreachable, slow or broken, or the body too large;
    /// [`ProxyError::NoRequest`] if `req` is `None`.
    pub async fn forward<B>(
        &self,
        req: &mut Option<Request<B>>,
        path: &NormalizedPath,
        ctx: &ForwardContext<'_>,
    ) -> Result<Response<Body>, ProxyError>
    where
        B: http_body::Body<Data = Bytes> + Send + Sync + 'static,
        B::Error: Into<BoxError>,
    {
        let req = req.take().ok_or(ProxyError::NoRequest)?;
        let Prepared {
            upstream,
            direct_target,
            upgrade,
            client_upgrade,
        } = self.prepare(req, path, ctx)?;
        let sent = self.send(upstream, direct_target.as_deref());
        let resp = match tokio::time::timeout(self.response_timeout, sent).await {
            Err(_) => return Err(ProxyError::Timeout(self.response_timeout)),
            Ok(result) => result?,
        };
        Self::finish_response(resp, upgrade, client_upgrade)
    }

    /// Steps 1–6 of the module docs: the upstream request, and what the response will need
    /// to know about an upgrade the client asked for.
    fn prepare<B>(
        &self,
        req: Request<B>,
        path: &NormalizedPath,
        ctx: &ForwardContext<'_>,
    ) -> Result<Prepared, ProxyError>
    where
        B: http_body::Body<Data = Bytes> + Send + Sync + 'static,
        B::Error: Into<BoxError>,
    {
        let (mut parts, body) = req.into_parts();

        // 1. Body size.
        let limit = self.max_request_body;
        if limit > 0 {
            if let Some(len) = content_length(&parts.headers) {
                if len > limit {
                    return Err(BodyTooLarge { limit }.into());
                }
            }
        }
        let bodiless = http_body::Body::is_end_stream(&body);
        let body = if bodiless {
            body::empty()
        } else if limit > 0 {
            body::boxed(Limited::new(body, limit))
        } else {
            body::boxed(body)
        };

        // 2. Upgrade requested? Must be decided before `Connection` is removed.
        let upgrade =
            if parts.version == Version::HTTP_11 && connection_has(&parts.headers, "upgrade") {
                parts.headers.get(header::UPGRADE).cloned()
            } else {
                None
            };
        let client_upgrade = match upgrade {
            Some(_) => parts.extensions.remove::<hyper::upgrade::OnUpgrade>(),
            None => None,
        };

        // The client's host, read before any header is removed.
        let client_host = match parts.headers.get(header::HOST) {
            Some(h) => Some(h.clone()),
            // HTTP/2 carries the host in `:authority`; an HTTP/1 absolute-form target's
            // authority is deliberately ignored.
            None if parts.version == Version::HTTP_2 => parts
                .uri
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok()),
            None => None,
        };

        // 3.–5. Headers.
        let headers = &mut parts.headers;
        strip_hop_by_hop(headers);
        let chain = ForwardedChain::take(headers, ctx.peer_trusted);
        strip_gateway_headers(headers);
        chain.apply(headers, ctx, client_host.as_ref());
        headers.insert(X_REQUEST_ID, ctx.request_id.clone());
        let host = match (self.host_header, client_host) {
            (HostHeader::Client, Some(h)) => h,
            (HostHeader::Client, None) | (HostHeader::Origin, _) => self.origin_host.clone(),
        };
        headers.insert(header::HOST, host);
        strip_cookies(headers, ctx.strip_cookie_prefixes);
        if let Some(proto) = &upgrade {
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            headers.insert(header::UPGRADE, proto.clone());
        }

        // 6. Target: origin + normalised path + raw query.
        let query = parts.uri.query();
        let mut pq = String::with_capacity(
            self.prefix.len() + path.as_str().len() + query.map_or(0, |q| q.len() + 1),
        );
        pq.push_str(&self.prefix);
        pq.push_str(path.as_str());
        if let Some(q) = query {
            pq.push('?');
            pq.push_str(q);
        }
        parts.version = Version::HTTP_11;
        parts.extensions = http::Extensions::new();
        if self.plain.is_some()
            && origin_h1::takes_fast_path(&parts.method, bodiless, upgrade.is_some(), &pq)
        {
            // The plain pool's fast path writes the target string itself; the client's URI
            // is not sent. (A target it would not write takes the path below, where parsing
            // it fails as a 500.)
            parts.uri = Uri::default();
            return Ok(Prepared {
                upstream: Request::from_parts(parts, body),
                direct_target: Some(pq),
                upgrade: None,
                client_upgrade: None,
            });
        }
        let uri = if self.plain.is_some() {
            // hyper's connection writes the target as given: origin-form for an origin.
            Uri::from(PathAndQuery::try_from(pq).map_err(http::Error::from)?)
        } else {
            Uri::builder()
                .scheme(self.scheme.clone())
                .authority(self.authority.clone())
                .path_and_query(pq)
                .build()?
        };

        // The client's request, changed in place: its method and headers, the new target, and
        // nothing else (hyper's extensions, the client's HTTP version) carried over.
        parts.uri = uri;
        Ok(Prepared {
            upstream: Request::from_parts(parts, body),
            direct_target: None,
            upgrade,
            client_upgrade,
        })
    }

    /// The origin's response as the client gets it: hop-by-hop headers removed and, after a
    /// `101`, the tunnel attached.
    fn finish_response(
        resp: Response<Body>,
        upgrade: Option<HeaderValue>,
        client_upgrade: Option<hyper::upgrade::OnUpgrade>,
    ) -> Result<Response<Body>, ProxyError> {
        let (mut rparts, rbody) = resp.into_parts();
        let origin_upgrade = if rparts.status == StatusCode::SWITCHING_PROTOCOLS {
            let (Some(client_up), Some(_)) = (client_upgrade, upgrade.as_ref()) else {
                return Err(ProxyError::Origin(
                    "origin switched protocols without being asked".into(),
                ));
            };
            let Some(origin_up) = rparts.extensions.remove::<hyper::upgrade::OnUpgrade>() else {
                return Err(ProxyError::Origin("origin upgrade not available".into()));
            };
            Some((
                client_up,
                origin_up,
                rparts.headers.get(header::UPGRADE).cloned(),
            ))
        } else {
            None
        };
        strip_hop_by_hop(&mut rparts.headers);
        rparts.version = Version::HTTP_11;
        rparts.extensions = http::Extensions::new();
        if let Some((client_up, origin_up, proto)) = origin_upgrade {
            rparts
                .headers
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            if let Some(p) = proto {
                rparts.headers.insert(header::UPGRADE, p);
            }
            // Run by the server inside the client connection's task (limits, idle timeout,
            // drain); see `server::Tunnel`.
            rparts
                .extensions
                .insert(crate::server::Tunnel::new(tunnel(client_up, origin_up)));
        }
        Ok(Response::from_parts(rparts, rbody))
    }
}

/// A rewritten request, ready to send.
struct Prepared {
    upstream: Request<Body>,
    /// The origin-form target, for a request that takes the plain pool's fast path (its
    /// `upstream` URI is then unused).
    direct_target: Option<String>,
    /// The `Upgrade` header the client sent with `Connection: upgrade`, if any.
    upgrade: Option<HeaderValue>,
    /// The client side of that upgrade.
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
}

/// Joins the client and the origin once both sides have switched protocols.
async fn tunnel(client: hyper::upgrade::OnUpgrade, origin: hyper::upgrade::OnUpgrade) {
    let (client, origin) = tokio::join!(client, origin);
    match (client, origin) {
        (Ok(c), Ok(o)) => {
            let mut c = TokioIo::new(c);
            let mut o = TokioIo::new(o);
            match tokio::io::copy_bidirectional(&mut c, &mut o).await {
                Ok((up, down)) => debug!(up, down, "upgraded connection closed"),
                Err(e) => debug!(error = %e, "upgraded connection ended with an error"),
            }
        }
        (Err(e), _) | (_, Err(e)) => debug!(error = %e, "upgrade did not complete"),
    }
}

/// Sorts a client error by who failed.
fn classify(err: hyper_util::client::legacy::Error) -> ProxyError {
    if let Some(too_large) = find_source::<BodyTooLarge>(&err) {
        return ProxyError::BodyTooLarge(*too_large);
    }
    if err.is_connect() {
        let timed_out = find_source::<std::io::Error>(&err)
            .is_some_and(|e| e.kind() == std::io::ErrorKind::TimedOut);
        return if timed_out {
            ProxyError::ConnectTimeout(Box::new(err))
        } else {
            ProxyError::Unreachable(Box::new(err))
        };
    }
    ProxyError::Origin(Box::new(err))
}

fn find_source<'a, T: StdError + 'static>(err: &'a (dyn StdError + 'static)) -> Option<&'a T> {
    let mut cur: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(t) = e.downcast_ref::<T>() {
            return Some(t);
        }
        cur = e.source();
    }
    None
}

const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Headers that concern one connection only (RFC 9110 §7.6.1), besides `Connection` itself.
const HOP_BY_HOP: [HeaderName; CONNECTION_INDEX] = [
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
];

/// What [`hop_by_hop_index`] says for `Connection`: one past the end of [`HOP_BY_HOP`].
const CONNECTION_INDEX: usize = 8;

/// The index of a (lower-case) header name in [`HOP_BY_HOP`], [`CONNECTION_INDEX`] for
/// `connection`, `None` for an end-to-end header. A `match` on the name, which compiles to a
/// switch on its length before any bytes are compared: this runs for every header of every
/// request and response.
fn hop_by_hop_index(name: &str) -> Option<usize> {
    Some(match name {
        "keep-alive" => 0,
        "proxy-connection" => 1,
        "te" => 2,
        "trailer" => 3,
        "transfer-encoding" => 4,
        "upgrade" => 5,
        "proxy-authenticate" => 6,
        "proxy-authorization" => 7,
        "connection" => CONNECTION_INDEX,
        _ => return None,
    })
}

/// Whether a `Connection` header lists `token`.
fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers.get_all(header::CONNECTION).iter().any(|v| {
        v.as_bytes()
            .split(|b| *b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
    })
}

/// Removes `Connection`, the headers it names (but never `Host` or `Content-Length`) and the
/// fixed hop-by-hop list. Runs before the gateway sets any header of its own, so a client
/// naming `X-Forwarded-For` in `Connection` only removes its own copy.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the names first; afterwards only what is present is removed (most
    // requests carry none of these, most responses only `Connection: keep-alive`).
    let mut connection = false;
    let mut present = 0u16;
    for n in headers.keys() {
        match hop_by_hop_index(n.as_str()) {
            Some(CONNECTION_INDEX) => connection = true,
            Some(i) => present |= 1 << i,
            None => {}
        }
    }
    if !connection && present == 0 {
        return;
    }
    // The headers `Connection` names. `keep-alive` is in `HOP_BY_HOP` already and `close`
    // names no header, so the usual values need no `HeaderName` and no list.
    let mut named: Vec<HeaderName> = Vec::new();
    for v in headers.get_all(header::CONNECTION) {
        for token in v.as_bytes().split(|b| *b == b',') {
            let token = token.trim_ascii();
            if token.is_empty()
                || token.eq_ignore_ascii_case(b"keep-alive")
                || token.eq_ignore_ascii_case(b"close")
            {
                continue;
            }
            if let Ok(name) = HeaderName::from_bytes(token) {
                if name != header::HOST && name != header::CONTENT_LENGTH {
                    named.push(name);
                }
            }
        }
    }
    if connection {
        headers.remove(header::CONNECTION);
    }
    for name in named {
        headers.remove(name);
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(name);
        }
    }
}

/// Whether the gateway owns a header (sets it, or must never pass a client's copy on),
/// given its name with `_` already mapped to `-`.
fn is_gateway_owned(name: &str) -> bool {
    matches!(
        name,
        "forwarded"
            | "x-forwarded-for"
            | "x-forwarded-proto"
            | "x-forwarded-host"
            | "x-forwarded-port"
            | "x-forwarded-prefix"
            | "x-forwarded-server"
            | "x-forwarded-scheme"
            | "x-forwarded-ssl"
            | "x-forwarded-uri"
            | "x-forwarded-path"
            | "x-real-ip"
            | "x-client-ip"
            | "true-client-ip"
            | "x-request-id"
            | "x-original-url"
            | "x-original-uri"
            | "x-rewrite-url"
    )
}

/// Headers that, spelled with `_`, an origin may read as the real one (CGI, PHP, WSGI map
/// both to the same variable).
fn is_protected_with_underscores(name: &str) -> bool {
    is_gateway_owned(name)
        || matches!(
            name,
            "host"
                | "content-length"
                | "connection"
                | "keep-alive"
                | "proxy-connection"
                | "te"
                | "trailer"
                | "transfer-encoding"
                | "upgrade"
                | "proxy-authenticate"
                | "proxy-authorization"
        )
}

/// Removes every header the gateway owns, in every spelling.
fn strip_gateway_headers(headers: &mut HeaderMap) {
    let doomed = |name: &HeaderName| {
        let s = name.as_str();
        if s.contains('_') {
            let mut buf = [0u8; 32];
            if s.len() > buf.len() {
                return false;
            }
            for (d, b) in buf.iter_mut().zip(s.bytes()) {
                *d = if b == b'_' { b'-' } else { b };
            }
            std::str::from_utf8(&buf[..s.len()]).is_ok_and(is_protected_with_underscores)
        } else {
            is_gateway_owned(s)
        }
    };
    // Most requests carry none of these: look first, allocate only when needed.
    if !headers.keys().any(doomed) {
        return;
    }
    let names: Vec<HeaderName> = headers.keys().filter(|n| doomed(n)).cloned().collect();
    for name in names {
        headers.remove(name);
    }
}

/// The `X-Forwarded-*` values taken over from a trusted proxy.
struct ForwardedChain {
    /// The existing `X-Forwarded-For` list.
    for_: Option<String>,
    proto: Option<HeaderValue>,
    host: Option<HeaderValue>,
}

impl ForwardedChain {
    /// Reads the canonical spellings, and only when the peer is trusted.
    fn take(headers: &HeaderMap, trusted: bool) -> Self {
        if !trusted {
            return ForwardedChain {
                for_: None,
                proto: None,
                host: None,
            };
        }
        let mut for_: Option<String> = None;
        for v in headers.get_all(&X_FORWARDED_FOR) {
            if let Ok(s) = v.to_str() {
                let s = s.trim();
                if s.is_empty() {
                    continue;
                }
                match &mut for_ {
                    Some(acc) => {
                        acc.push_str(", ");
                        acc.push_str(s);
                    }
                    None => for_ = Some(s.to_owned()),
                }
            }
        }
        ForwardedChain {
            for_,
            proto: headers.get(&X_FORWARDED_PROTO).cloned(),
            host: headers.get(&X_FORWARDED_HOST).cloned(),
        }
    }

    fn apply(self, headers: &mut HeaderMap, ctx: &ForwardContext<'_>, host: Option<&HeaderValue>) {
        let for_ = match self.for_ {
            Some(chain) => {
                let mut chain = chain.into_bytes();
                chain.extend_from_slice(b", ");
                chain.extend_from_slice(ctx.peer.as_bytes());
                HeaderValue::try_from(chain)
            }
            None => Ok(ctx.peer.clone()),
        };
        if let Ok(v) = for_ {
            headers.insert(X_FORWARDED_FOR, v);
        }
        let proto = self
            .proto
            .unwrap_or_else(|| HeaderValue::from_static(if ctx.tls { "https" } else { "http" }));
        headers.insert(X_FORWARDED_PROTO, proto);
        if let Some(h) = self.host.or_else(|| host.cloned()) {
            headers.insert(X_FORWARDED_HOST, h);
        }
    }
}

/// Removes cookies whose names start with one of `prefixes`; rewrites `Cookie` only if one
/// was removed, so the site's cookies reach it byte for byte otherwise.
fn strip_cookies(headers: &mut HeaderMap, prefixes: &[String]) {
    let is_gateways = |pair: &[u8]| {
        let name = memchr::memchr(b'=', pair).map_or(pair, |i| &pair[..i]);
        let name = name.trim_ascii();
        prefixes.iter().any(|p| name.starts_with(p.as_bytes()))
    };
    // The pairs of a header value, split where `cookie`'s parser splits them.
    fn pairs(value: &[u8]) -> impl Iterator<Item = &[u8]> {
        let mut from = 0;
        memchr::memchr_iter(b';', value)
            .chain(std::iter::once(value.len()))
            .map(move |end| {
                let pair = value[from..end].trim_ascii();
                from = end + 1;
                pair
            })
    }
    // One lookup finds every `Cookie` line; both passes below read them through it. (Not
    // `HeaderMap::entry`: it makes room for an insert first, which can grow the map on a
    // request that has no cookie to remove.)
    let lines = headers.get_all(header::COOKIE);
    // Looking comes first, so that a request without gateway cookies costs no copy.
    if !lines.iter().any(|v| pairs(v.as_bytes()).any(is_gateways)) {
        return;
    }
    let mut kept: Vec<u8> = Vec::new();
    for v in lines.iter() {
        for pair in pairs(v.as_bytes()) {
            if pair.is_empty() || is_gateways(pair) {
                continue;
            }
            if !kept.is_empty() {
                kept.extend_from_slice(b"; ");
            }
            kept.extend_from_slice(pair);
        }
    }
    // Every `Cookie` line goes: `insert` replaces all of them with the one line kept (a valid
    // value, being made of pieces of valid values), `remove` takes all of them away.
    match HeaderValue::from_bytes(&kept) {
        Ok(v) if !kept.is_empty() => {
            headers.insert(header::COOKIE, v);
        }
        _ => {
            headers.remove(header::COOKIE);
        }
    }
}

/// The request's `Content-Length`, if there is exactly one valid value.
pub fn content_length(headers: &HeaderMap) -> Option<u64> {
    let mut values = headers.get_all(header::CONTENT_LENGTH).iter();
    let first = values.next()?;
    if values.next().is_some() {
        return None;
    }
    first.to_str().ok()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_go() {
        let mut h = map(&[
            ("connection", "keep-alive, X-Custom, host, content-length"),
            ("connection", "x-other"),
            ("x-custom", "1"),
            ("x-other", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "h2c"),
            ("proxy-authorization", "Basic x"),
            ("host", "example"),
            ("content-length", "3"),
            ("x-site", "kept"),
        ]);
        strip_hop_by_hop(&mut h);
        let mut names: Vec<_> = h.keys().map(|k| k.as_str().to_owned()).collect();
        names.sort();
        assert_eq!(names, ["content-length", "host", "x-site"]);
    }

    #[test]
    fn gateway_headers_go_in_every_spelling() {
        let mut h = map(&[
            ("x-forwarded-for", "1.2.3.4"),
            ("x_forwarded_for", "1.2.3.4"),
            ("X_Forwarded-Host", "evil"),
            ("forwarded", "for=1.2.3.4"),
            ("x-real-ip", "1.2.3.4"),
            ("x_real_ip", "1.2.3.4"),
            ("x-original-url", "/premium/x"),
            ("transfer_encoding", "chunked"),
            ("x-request-id", "abc"),
            ("x_site_header", "kept"),
            ("x-site", "kept"),
        ]);
        strip_gateway_headers(&mut h);
        let mut names: Vec<_> = h.keys().map(|k| k.as_str().to_owned()).collect();
        names.sort();
        assert_eq!(names, ["x-site", "x_site_header"]);
    }

    #[test]
    fn cookies_of_the_gateway_are_removed_site_cookies_kept() {
        let prefixes = vec!["taler_paywall".to_owned()];
        let mut h = map(&[
            ("cookie", "a=1; taler_paywall_session=xyz;b=2"),
            ("cookie", "taler_paywall_order_1=q"),
        ]);
        strip_cookies(&mut h, &prefixes);
        assert_eq!(h.get_all(header::COOKIE).iter().count(), 1);
        assert_eq!(h.get(header::COOKIE).unwrap(), "a=1; b=2");

        let mut untouched = map(&[("cookie", "a=1;b=2"), ("cookie", "c=3")]);
        strip_cookies(&mut untouched, &prefixes);
        let all: Vec<_> = untouched.get_all(header::COOKIE).iter().collect();
        assert_eq!(all, ["a=1;b=2", "c=3"]);

        let mut only_ours = map(&[("cookie", "taler_paywall_s=1")]);
        strip_cookies(&mut only_ours, &prefixes);
        assert!(only_ours.get(header::COOKIE).is_none());

        // Several lines, all the gateway's: every line goes, other headers stay.
        let mut lines = map(&[
            ("cookie", "taler_paywall_s=1"),
            ("accept", "*/*"),
            ("cookie", " ; taler_paywall_o=2;"),
        ]);
        strip_cookies(&mut lines, &prefixes);
        assert_eq!(lines.get_all(header::COOKIE).iter().count(), 0);
        assert_eq!(lines.len(), 1);
        assert_eq!(lines.get(header::ACCEPT).unwrap(), "*/*");
    }

    #[test]
    fn forwarded_chain_trusts_only_trusted_peers() {
        let rid = HeaderValue::from_static("rid");
        let peer = HeaderValue::from_static("10.0.0.1");
        let ctx = |trusted| ForwardContext {
            peer: &peer,
            peer_trusted: trusted,
            tls: true,
            request_id: &rid,
            strip_cookie_prefixes: &[],
        };
        let client = map(&[
            ("x-forwarded-for", "1.1.1.1"),
            ("x-forwarded-for", "2.2.2.2"),
            ("x-forwarded-proto", "http"),
            ("x-forwarded-host", "spoofed"),
        ]);
        let host = HeaderValue::from_static("shop.example");

        let mut h = client.clone();
        let chain = ForwardedChain::take(&h, false);
        strip_gateway_headers(&mut h);
        chain.apply(&mut h, &ctx(false), Some(&host));
        assert_eq!(h.get(&X_FORWARDED_FOR).unwrap(), "10.0.0.1");
        assert_eq!(h.get(&X_FORWARDED_PROTO).unwrap(), "https");
        assert_eq!(h.get(&X_FORWARDED_HOST).unwrap(), "shop.example");

        let mut h = client;
        let chain = ForwardedChain::take(&h, true);
        strip_gateway_headers(&mut h);
        chain.apply(&mut h, &ctx(true), Some(&host));
        assert_eq!(
            h.get(&X_FORWARDED_FOR).unwrap(),
            "1.1.1.1, 2.2.2.2, 10.0.0.1"
        );
        assert_eq!(h.get(&X_FORWARDED_PROTO).unwrap(), "http");
        assert_eq!(h.get(&X_FORWARDED_HOST).unwrap(), "spoofed");
    }

    #[test]
    fn hop_by_hop_index_matches_the_list() {
        for (i, h) in HOP_BY_HOP.iter().enumerate() {
            assert_eq!(hop_by_hop_index(h.as_str()), Some(i), "{h}");
        }
        assert_eq!(
            hop_by_hop_index(header::CONNECTION.as_str()),
            Some(CONNECTION_INDEX)
        );
        for end_to_end in [
            "host",
            "user-agent",
            "content-length",
            "cookie",
            "keep-alivex",
            "",
        ] {
            assert_eq!(hop_by_hop_index(end_to_end), None, "{end_to_end}");
        }
    }

    #[test]
    fn content_length_needs_one_valid_value() {
        assert_eq!(content_length(&map(&[("content-length", "12")])), Some(12));
        assert_eq!(content_length(&map(&[])), None);
        assert_eq!(content_length(&map(&[("content-length", "x")])), None);
        assert_eq!(
            content_length(&map(&[("content-length", "1"), ("content-length", "1")])),
            None
        );
    }
}
