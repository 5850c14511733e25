//! Forward-auth mode: the gateway beside an existing front proxy instead of in front of the
//! site.
//!
//! The front proxy (nginx `auth_request`, Traefik `forwardAuth`, Caddy `forward_auth`) asks
//! the endpoint at `[forward_auth] path` about each client request, passing the original URI
//! in a header. The endpoint runs exactly the steps a proxied request runs — [`path::normalize`],
//! [`crate::policy::Policy::classify`] and, for a protected path,
//! [`crate::flow::PaymentGate::decide`] — and answers:
//!
//! - **let through**: `200` with an empty body. It carries the cookies the flow wants set (as
//!   `Set-Cookie`, or as `X-Taler-Paywall-Set-Cookie-N` in nginx style) and the client's
//!   `Cookie` header without the gateway's own cookies (as `Cookie`, or as [`ORIGIN_COOKIE`]
//!   in nginx style), for the front proxy to send to the origin instead of the client's.
//! - **pay first** (or any other refusal), in the style the query parameter `style` selects:
//!   - `style=redirect` (the default; Traefik, Caddy): the flow's response as it is (302 to the
//!     merchant's status page with `Set-Cookie`, 402, 403, 429, 5xx), which those proxies relay
//!     to the client;
//!   - `style=nginx`: `401`, because nginx's `auth_request` passes on only 2xx, 401 and 403.
//!     The real status, `Location`, `Taler`, `Retry-After` and cookies travel in
//!     `X-Taler-Paywall-*` headers, from which the documented nginx configuration
//!     (`error_page 401 = @taler_paywall`) builds the client's answer.
//!
//! The original URI is believed only from a peer in `server.trusted_proxies`; anyone else gets
//! `403`. A forwarded URI that cannot be normalised is a `400` (nginx turns it into a `500`):
//! never a `200`. See `docs/forward-auth.md`.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use tracing::info;

use crate::body::{empty, Body};
use crate::config::{Config, Mode};
use crate::flow::Outcome;
use crate::gateway::{GatewayError, RequestContext};
use crate::metrics::RequestOutcome;
use crate::pages;
use crate::path::{self, NormalizedPath};

/// Header with the original request target (path and query), as the documented nginx
/// configuration sends it (`$request_uri`).
pub const ORIGINAL_URI: &str = "x-original-uri";
/// Header with the original request target, as Traefik and Caddy send it.
pub const FORWARDED_URI: &str = "x-forwarded-uri";
/// Header with the original method (nginx configuration).
pub const ORIGINAL_METHOD: &str = "x-original-method";
/// Header with the original method (Traefik, Caddy).
pub const FORWARDED_METHOD: &str = "x-forwarded-method";

/// nginx style, on a `200`: the `Cookie` header the origin should get (the client's, without
/// the gateway's cookies); absent when nothing remains. (Redirect style sends it as `Cookie`.)
pub const ORIGIN_COOKIE: &str = "x-taler-paywall-cookie";
/// nginx style: the status the client should get.
pub const NGINX_STATUS: &str = "x-taler-paywall-status";
/// nginx style: the `Location` of a redirect, or the `order_status_url` of a 402.
pub const NGINX_LOCATION: &str = "x-taler-paywall-location";
/// nginx style: the `Taler` header (the `taler://pay` URI).
pub const NGINX_TALER: &str = "x-taler-paywall-taler";
/// nginx style: the `Retry-After` of a 429.
pub const NGINX_RETRY_AFTER: &str = "x-taler-paywall-retry-after";
/// nginx style: `Set-Cookie` values travel in `X-Taler-Paywall-Set-Cookie-1` to `-N`, one
/// each, because nginx 1.22 exposes only the first of several equal headers to
/// `auth_request_set`. The flow sets at most three cookies in one response.
pub const NGINX_COOKIE_SLOTS: usize = 4;

const NGINX_COOKIE_NAMES: [&str; NGINX_COOKIE_SLOTS] = [
    "x-taler-paywall-set-cookie-1",
    "x-taler-paywall-set-cookie-2",
    "x-taler-paywall-set-cookie-3",
    "x-taler-paywall-set-cookie-4",
];

/// How refusals are answered (query parameter `style` of the endpoint URL).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// The flow's response as it is (Traefik, Caddy).
    Redirect,
    /// `401` with `X-Taler-Paywall-*` headers (nginx `auth_request`).
    Nginx,
}

/// Whether `path` (a request to the public listener) is the forward-auth endpoint.
pub fn is_endpoint(config: &Config, path: &NormalizedPath) -> bool {
    config
        .forward_auth
        .as_ref()
        .is_some_and(|fa| fa.path == path.as_str())
}

/// The style a request to the endpoint asks for.
///
/// # Errors
/// An unknown `style` value (a typo must not silently select the other behaviour).
pub fn style(query: Option<&str>) -> Result<Style, GatewayError> {
    let mut style = Style::Redirect;
    for pair in query.unwrap_or("").split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if k == "style" {
            style = match v {
                "redirect" => Style::Redirect,
                "nginx" => Style::Nginx,
                _ => {
                    return Err(GatewayError::BadRequest(
                        "Unknown forward-auth style (use \"nginx\" or \"redirect\").",
                    ))
                }
            };
        }
    }
    Ok(style)
}

/// The original request target the front proxy forwarded: its path and its query.
///
/// # Errors
/// No header, two different ones, or a value that is not an origin-form or absolute-form
/// target.
pub fn original_target(headers: &HeaderMap) -> Result<(String, Option<String>), GatewayError> {
    let one = |name: &str| -> Result<Option<&[u8]>, GatewayError> {
        let mut all = headers.get_all(name).iter();
        match (all.next(), all.next()) {
            (None, _) => Ok(None),
            (Some(v), None) => Ok(Some(v.as_bytes())),
            (Some(_), Some(_)) => Err(GatewayError::BadRequest(
                "More than one forwarded URI header.",
            )),
        }
    };
    let target = match (one(ORIGINAL_URI)?, one(FORWARDED_URI)?) {
        (Some(a), Some(b)) if a != b => {
            return Err(GatewayError::BadRequest(
                "X-Original-URI and X-Forwarded-Uri disagree.",
            ))
        }
        (Some(t), _) | (None, Some(t)) => t,
        (None, None) => {
            return Err(GatewayError::BadRequest(
                "The front proxy sent no X-Original-URI or X-Forwarded-Uri header.",
            ))
        }
    };
    let Ok(target) = std::str::from_utf8(target) else {
        return Err(GatewayError::BadPath(path::PathError::InvalidUtf8));
    };
    if target.contains('#') {
        return Err(GatewayError::BadRequest(
            "The forwarded URI contains a fragment.",
        ));
    }
    let origin_form = if target.starts_with('/') {
        target.to_owned()
    } else {
        // An absolute-form target (`GET http://host/path`) contributes only its path and
        // query, as it does for proxied requests.
        let uri: http::Uri = target
            .parse()
            .map_err(|_| GatewayError::BadRequest("The forwarded URI is not a request target."))?;
        if uri.scheme().is_none() {
            return Err(GatewayError::BadPath(path::PathError::NotAbsolute));
        }
        uri.path_and_query()
            .map_or_else(|| "/".to_owned(), |pq| pq.as_str().to_owned())
    };
    Ok(match origin_form.split_once('?') {
        Some((p, q)) => (p.to_owned(), Some(q.to_owned())),
        None => (origin_form, None),
    })
}

/// Answers one request to the forward-auth endpoint.
///
/// Each answer is counted in `taler_paywall_requests_total` as the decision it carries, as if
/// the gateway had served the request itself: `proxied` (unprotected), `paid`, or the refusal
/// (`payment_required`, `refunded`, ...). A peer outside `trusted_proxies` is counted as
/// `bad_request`, and so are the errors below (by the gateway).
///
/// # Errors
/// A [`GatewayError`] for a bad style, a missing or ambiguous forwarded URI, or one that
/// cannot be normalised (each a 4xx: the front proxy never lets such a request through).
pub async fn handle<B>(
    req: Request<B>,
    ctx: &RequestContext<'_>,
) -> Result<Response<Body>, GatewayError> {
    let app = ctx.app;
    if !ctx.peer_trusted {
        app.metrics.request(RequestOutcome::BadRequest);
        info!(peer = %ctx.conn.peer, "forward-auth request from a peer not in server.trusted_proxies");
        return Ok(no_store(pages::error(
            StatusCode::FORBIDDEN,
            "This endpoint answers only the trusted front proxy.",
            ctx.html,
        )));
    }
    let style = style(req.uri().query())?;
    let (raw_path, query) = original_target(req.headers())?;
    let path = path::normalize(&raw_path)?;
    let method = header_str(req.headers(), ORIGINAL_METHOD)
        .or_else(|| header_str(req.headers(), FORWARDED_METHOD))
        .unwrap_or("-");
    let origin_cookie = origin_cookie(req.headers(), &app.gateway_cookie_prefixes);
    let Some(route) = app.policy.classify(&path) else {
        info!(
            method,
            path = path.as_str(),
            decision = "unprotected",
            "forward-auth"
        );
        app.metrics.request(RequestOutcome::Proxied);
        return Ok(let_through(style, Vec::new(), origin_cookie));
    };
    let client = app.client_ip(req.headers(), ctx.conn.peer.ip());
    let outcome = app
        .payment
        .decide(
            crate::flow::unix_now(),
            req.headers(),
            ctx.html,
            query.as_deref(),
            route,
            &path,
            client,
            // Already inside the request's span (see `gateway`).
            tracing::Span::none,
        )
        .await;
    match outcome {
        Outcome::Serve {
            set_cookies,
            order_id,
        } => {
            info!(
                method,
                path = path.as_str(),
                order = order_id.as_deref().unwrap_or("-"),
                decision = "paid",
                "forward-auth"
            );
            app.metrics.request(RequestOutcome::Paid);
            Ok(let_through(style, set_cookies, origin_cookie))
        }
        Outcome::Respond { response, kind } => {
            info!(method, path = path.as_str(), status = response.status().as_u16(),
                decision = ?kind, "forward-auth");
            if app.config.server.mode == Mode::Observe {
                // Observe mode: the decision is made, logged and counted; everything is let
                // through.
                app.metrics.request(kind.into());
                app.metrics.observe_forwarded();
                return Ok(let_through(style, Vec::new(), origin_cookie));
            }
            let answer = match style {
                Style::Redirect => Ok(response),
                Style::Nginx => nginx_refusal(response).await,
            };
            // A failure to translate the refusal is counted by the gateway, as an error.
            if answer.is_ok() {
                app.metrics.request(kind.into());
            }
            answer
        }
    }
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

fn no_store(mut resp: Response<Body>) -> Response<Body> {
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// The client's cookies without the gateway's own, joined into one `Cookie` value.
pub fn origin_cookie(headers: &HeaderMap, gateway_prefixes: &[String]) -> Option<HeaderValue> {
    let mut kept: Vec<u8> = Vec::new();
    for v in headers.get_all(header::COOKIE) {
        for pair in v.as_bytes().split(|b| *b == b';') {
            let pair = pair.trim_ascii();
            let name = pair
                .split(|b| *b == b'=')
                .next()
                .unwrap_or_default()
                .trim_ascii();
            if pair.is_empty()
                || gateway_prefixes
                    .iter()
                    .any(|p| name.starts_with(p.as_bytes()))
            {
                continue;
            }
            if !kept.is_empty() {
                kept.extend_from_slice(b"; ");
            }
            kept.extend_from_slice(pair);
        }
    }
    if kept.is_empty() {
        None
    } else {
        HeaderValue::from_bytes(&kept).ok()
    }
}

fn let_through(
    style: Style,
    set_cookies: Vec<HeaderValue>,
    origin_cookie: Option<HeaderValue>,
) -> Response<Body> {
    let mut resp = no_store(Response::new(empty()));
    let h = resp.headers_mut();
    match style {
        Style::Redirect => {
            // Named `Cookie` because Traefik (`authResponseHeaders`) and Caddy
            // (`copy_headers`) copy headers onto the origin request under their own name,
            // replacing the client's (and removing it when this one is absent).
            if let Some(c) = origin_cookie {
                h.insert(header::COOKIE, c);
            }
            for c in set_cookies {
                h.append(header::SET_COOKIE, c);
            }
        }
        Style::Nginx => {
            if let Some(c) = origin_cookie {
                h.insert(HeaderName::from_static(ORIGIN_COOKIE), c);
            }
            // More cookies than slots cannot happen (the flow sets at most three); if it
            // did, the extra ones would be lost, which costs a merchant call, never access.
            for (name, c) in NGINX_COOKIE_NAMES.iter().zip(set_cookies) {
                h.insert(HeaderName::from_static(name), c);
            }
        }
    }
    resp
}

/// Largest body of the gateway's own 402 page read to find its `order_status_url`.
const MAX_402_BODY: usize = 64 * 1024;

/// nginx style: the flow's refusal as a `401` whose headers describe the real answer.
async fn nginx_refusal(response: Response<Body>) -> Result<Response<Body>, GatewayError> {
    let (parts, body) = response.into_parts();
    let cookies: Vec<HeaderValue> = parts
        .headers
        .get_all(header::SET_COOKIE)
        .iter()
        .cloned()
        .collect();
    if cookies.len() > NGINX_COOKIE_SLOTS {
        return Err(GatewayError::Internal(format!(
            "{} cookies do not fit the {NGINX_COOKIE_SLOTS} nginx slots",
            cookies.len()
        )));
    }
    let mut location = parts.headers.get(header::LOCATION).cloned();
    let taler = parts.headers.get(pages::TALER_HEADER).cloned();
    if parts.status == StatusCode::PAYMENT_REQUIRED {
        // The 402 names the status page only in its JSON body; the documented nginx
        // configuration rebuilds that body from the two headers, so neither may be able to
        // break out of a JSON string.
        let status_url = status_url_of(body).await;
        match (&taler, status_url) {
            (Some(t), Some(s)) if json_safe(t) && json_safe(&s) => location = Some(s),
            _ => {
                return Err(GatewayError::Internal(
                    "402 without a JSON-safe Taler URI and status URL".into(),
                ))
            }
        }
    }
    let mut resp = no_store(Response::new(empty()));
    *resp.status_mut() = StatusCode::UNAUTHORIZED;
    let h = resp.headers_mut();
    h.insert(
        HeaderName::from_static(NGINX_STATUS),
        HeaderValue::from(parts.status.as_u16()),
    );
    if let Some(l) = location {
        h.insert(HeaderName::from_static(NGINX_LOCATION), l);
    }
    if let Some(t) = taler {
        h.insert(HeaderName::from_static(NGINX_TALER), t);
    }
    if let Some(r) = parts.headers.get(header::RETRY_AFTER) {
        h.insert(HeaderName::from_static(NGINX_RETRY_AFTER), r.clone());
    }
    for (name, c) in NGINX_COOKIE_NAMES.iter().zip(cookies) {
        h.insert(HeaderName::from_static(name), c);
    }
    Ok(resp)
}

/// The `order_status_url` of the gateway's own JSON 402 body.
async fn status_url_of(body: Body) -> Option<HeaderValue> {
    // The body is the gateway's own, already in memory (`pages::payment_required`).
    if http_body::Body::size_hint(&body)
        .upper()
        .is_none_or(|n| n > MAX_402_BODY as u64)
    {
        return None;
    }
    let bytes = http_body_util::BodyExt::collect(body)
        .await
        .ok()?
        .to_bytes();
    let json: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    HeaderValue::from_str(json.get("order_status_url")?.as_str()?).ok()
}

fn json_safe(v: &HeaderValue) -> bool {
    v.as_bytes()
        .iter()
        .all(|b| b.is_ascii_graphic() && !matches!(b, b'"' | b'\\'))
}
