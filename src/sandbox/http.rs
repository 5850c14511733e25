//! The sandbox's HTTP layer: routing, authentication, fault injection, long polling, and
//! the JSON shapes of the merchant API. Every decision is made by [`super::state`]; this
//! module only reads requests and writes responses.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE, LOCATION};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, CONTROLS};
use serde_json::{json, Value};
use url::Url;

use super::state::{
    constant_time_eq, timestamp_json, valid_instance_id, ApiError, Order, PrivateView, PublicView,
};
use super::{ec, page, Fault, Shared};
use crate::amount::Amount;
use crate::body::{full, Body};

/// The largest request body read.
const BODY_LIMIT: usize = 64 * 1024;

/// The longest a long poll (`timeout_ms`) is held.
const MAX_LONG_POLL: Duration = Duration::from_secs(30);

/// The protocol version announced by `GET config` (libtool `current:revision:age`).
pub const PROTOCOL_VERSION: &str = "24:0:12";

/// The wallet that `sandbox/pay` and the page's button use unless told otherwise.
pub const DEFAULT_WALLET: &str = "default";

/// The wallet that `sandbox/claim` uses unless told otherwise.
pub const OTHER_WALLET: &str = "other";

/// Characters escaped in a `taler://pay` path segment (the session id).
const SEGMENT: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'/')
    .add(b'<')
    .add(b'>')
    .add(b'?')
    .add(b'`')
    .add(b'{')
    .add(b'}');

/// Returned to hyper to drop the connection without an answer ([`Fault::Unreachable`]).
#[derive(Debug)]
pub struct Dropped;

impl std::fmt::Display for Dropped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connection dropped by fault injection")
    }
}

impl std::error::Error for Dropped {}

#[derive(Debug, PartialEq, Eq)]
enum Route {
    Hello,
    Config,
    CreateOrder,
    GetOrder(String),
    Refund(String),
    PublicOrder(String),
    WalletPay,
    WalletClaim,
    WalletCollect,
    FormPay,
    FormCollect,
    Stats,
}

impl Route {
    fn is_merchant_api(&self) -> bool {
        matches!(
            self,
            Route::Config | Route::CreateOrder | Route::GetOrder(_) | Route::Refund(_)
        )
    }
}

fn decode(segment: &str) -> String {
    percent_decode_str(segment).decode_utf8_lossy().into_owned()
}

/// Maps the path below the instance base to an endpoint.
fn route(method: &Method, rest: &str) -> Result<Route, ApiError> {
    let segments: Vec<&str> = rest.split('/').collect();
    let (want, route) = match segments.as_slice() {
        [""] => (Method::GET, Route::Hello),
        ["config"] => (Method::GET, Route::Config),
        ["private", "orders"] => (Method::POST, Route::CreateOrder),
        ["private", "orders", id] if !id.is_empty() => (Method::GET, Route::GetOrder(decode(id))),
        ["private", "orders", id, "refund"] if !id.is_empty() => {
            (Method::POST, Route::Refund(decode(id)))
        }
        ["orders", id] if !id.is_empty() => (Method::GET, Route::PublicOrder(decode(id))),
        ["sandbox", "pay"] => (Method::POST, Route::WalletPay),
        ["sandbox", "claim"] => (Method::POST, Route::WalletClaim),
        ["sandbox", "collect-refund"] => (Method::POST, Route::WalletCollect),
        ["sandbox", "pay-form"] => (Method::POST, Route::FormPay),
        ["sandbox", "collect-refund-form"] => (Method::POST, Route::FormCollect),
        ["sandbox", "stats"] => (Method::GET, Route::Stats),
        _ => {
            return Err(ApiError::new(
                404,
                ec::GENERIC_ENDPOINT_UNKNOWN,
                "There is no endpoint at this URL",
            ))
        }
    };
    let head_ok = want == Method::GET && method == Method::HEAD;
    if *method != want && !head_ok {
        return Err(ApiError::new(
            405,
            ec::GENERIC_METHOD_INVALID,
            format!("This endpoint takes {want}"),
        ));
    }
    Ok(route)
}

/// Splits `/instances/{id}/rest` or `/rest` into the instance id and the rest.
fn split_instance(path: &str) -> (String, &str) {
    match path.strip_prefix("/instances/") {
        Some(tail) => match tail.split_once('/') {
            Some((id, rest)) => (decode(id), rest),
            None => (decode(tail), ""),
        },
        None => ("default".to_owned(), path.strip_prefix('/').unwrap_or(path)),
    }
}

/// Handles one request. `Err` makes hyper drop the connection without answering.
pub(super) async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Dropped> {
    let (instance, route) = {
        let (instance, rest) = split_instance(req.uri().path());
        match route(req.method(), rest) {
            Ok(r) => (instance, r),
            Err(e) => return Ok(error_response(&e)),
        }
    };
    shared.count(|c| match &route {
        Route::Config => c.config += 1,
        Route::CreateOrder => c.create_order += 1,
        Route::GetOrder(_) => c.get_order += 1,
        Route::Refund(_) => c.refund += 1,
        Route::PublicOrder(_) => c.public_order += 1,
        _ => {}
    });
    let mut unknown_status = false;
    if route.is_merchant_api() {
        match shared.fault() {
            None => {}
            Some(Fault::Unreachable) => return Err(Dropped),
            Some(Fault::Slow(d)) => tokio::time::sleep(d).await,
            Some(Fault::ServerError(code)) => {
                let status = if (500..=599).contains(&code) {
                    code
                } else {
                    500
                };
                let e = ApiError::new(
                    status,
                    ec::GENERIC_DB_FETCH_FAILED,
                    "Injected server error (sandbox fault)",
                );
                return Ok(error_response(&e));
            }
            Some(Fault::Malformed) => {
                return Ok(with_type(
                    StatusCode::OK,
                    "application/json",
                    "{\"order_status\": \"paid\", \"refunded\": ".into(),
                ))
            }
            Some(Fault::Unauthorized) => return Ok(error_response(&unauthorized())),
            Some(Fault::UnknownStatus) => unknown_status = matches!(route, Route::GetOrder(_)),
        }
    }
    let known = valid_instance_id(&instance)
        && shared
            .instances
            .as_ref()
            .is_none_or(|list| list.contains(&instance));
    if !known {
        return Ok(error_response(&ApiError::new(
            404,
            ec::MERCHANT_GENERIC_INSTANCE_UNKNOWN,
            "The merchant instance is not known to this backend",
        )));
    }
    if route.is_merchant_api() && route != Route::Config {
        if let Err(e) = check_auth(&shared, req.headers()) {
            return Ok(error_response(&e));
        }
    }
    let pairs = query_pairs(&req);
    let html = crate::pages::wants_html(req.headers());
    let result = match route {
        Route::Hello => Ok(with_type(
            StatusCode::OK,
            "text/plain; charset=utf-8",
            "Hello, I'm the taler-paywall SANDBOX merchant backend (play money, in memory).\n"
                .into(),
        )),
        Route::Config => Ok(config(&shared)),
        Route::CreateOrder => create_order(&shared, &instance, req).await,
        Route::GetOrder(id) => get_order(&shared, &instance, &id, &pairs, unknown_status).await,
        Route::Refund(id) => refund(&shared, &instance, &id, req).await,
        Route::PublicOrder(id) => Ok(public_order(&shared, &instance, &id, &pairs, html).await),
        Route::WalletPay => wallet_pay(&shared, &instance, req).await,
        Route::WalletClaim => wallet_claim(&shared, &instance, req).await,
        Route::WalletCollect => wallet_collect(&shared, &instance, req).await,
        Route::FormPay => Ok(form_pay(&shared, &instance, req).await),
        Route::FormCollect => Ok(form_collect(&shared, &instance, req).await),
        Route::Stats => Ok(stats(&shared)),
    };
    Ok(result.unwrap_or_else(|e| error_response(&e)))
}

/// `GET sandbox/stats`: the merchant-API call counters (for benchmarks and manual checks).
fn stats(shared: &Shared) -> Response<Body> {
    let c = *shared.calls.lock().unwrap_or_else(|p| p.into_inner());
    json_response(
        StatusCode::OK,
        &json!({
            "config": c.config,
            "create_order": c.create_order,
            "get_order": c.get_order,
            "refund": c.refund,
            "public_order": c.public_order,
        }),
    )
}

fn unauthorized() -> ApiError {
    ApiError::new(
        401,
        ec::GENERIC_UNAUTHORIZED,
        "Authorization: Bearer secret-token:... is missing or wrong",
    )
}

fn check_auth(shared: &Shared, headers: &HeaderMap) -> Result<(), ApiError> {
    let value = headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(unauthorized)?;
    let (scheme, token) = value.trim().split_once(' ').ok_or_else(unauthorized)?;
    if !scheme.eq_ignore_ascii_case("bearer")
        || !constant_time_eq(token.trim().as_bytes(), shared.token.as_bytes())
    {
        return Err(unauthorized());
    }
    Ok(())
}

fn config(shared: &Shared) -> Response<Body> {
    let store = shared.store();
    let cur = store.currency().to_owned();
    drop(store);
    let body = json!({
        "name": "taler-merchant",
        "version": PROTOCOL_VERSION,
        "implementation": "urn:net:taler:specs:merchant:taler-paywall-sandbox",
        "currency": cur,
        "currencies": { cur.clone(): {
            "name": format!("{cur} (sandbox play money)"),
            "currency": cur,
            "num_fractional_input_digits": 2,
            "num_fractional_normal_digits": 2,
            "num_fractional_trailing_zero_digits": 2,
            "alt_unit_names": { "0": cur },
        }},
        "exchanges": [{
            "base_url": "https://exchange.sandbox.invalid/",
            "currency": cur,
            "master_pub": "SANDBOX0000000000000000000000000000000000000000000000",
        }],
        "have_self_provisioning": false,
        "have_donau": false,
    });
    json_response(StatusCode::OK, &body)
}

/// Reads the body, at most [`BODY_LIMIT`] bytes.
async fn read_body(req: Request<Incoming>) -> Result<Bytes, ApiError> {
    match Limited::new(req.into_body(), BODY_LIMIT).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(ApiError::new(
            413,
            ec::GENERIC_UPLOAD_EXCEEDS_LIMIT,
            "The request body is too large",
        )),
        Err(_) => Err(ApiError::new(
            400,
            ec::GENERIC_JSON_INVALID,
            "The request body could not be read",
        )),
    }
}

async fn read_json(req: Request<Incoming>) -> Result<Value, ApiError> {
    let bytes = read_body(req).await?;
    serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::new(
            400,
            ec::GENERIC_JSON_INVALID,
            format!("The request body is not valid JSON: {e}"),
        )
    })
}

/// A string field of a JSON object body.
fn field<'a>(body: &'a Value, key: &str, required: bool) -> Result<Option<&'a str>, ApiError> {
    match body.get(key) {
        Some(Value::String(s)) => Ok(Some(s)),
        None | Some(Value::Null) if !required => Ok(None),
        None | Some(Value::Null) => Err(ApiError::param(
            400,
            ec::GENERIC_PARAMETER_MISSING,
            format!("'{key}' is required"),
            key,
        )),
        Some(_) => Err(ApiError::param(
            400,
            ec::GENERIC_PARAMETER_MALFORMED,
            format!("'{key}' must be a string"),
            key,
        )),
    }
}

fn query_pairs(req: &Request<Incoming>) -> Vec<(String, String)> {
    url::form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

fn query<'a>(pairs: &'a [(String, String)], key: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .filter(|v| !v.is_empty())
}

fn timeout_param(pairs: &[(String, String)]) -> Result<Duration, ApiError> {
    match query(pairs, "timeout_ms") {
        None => Ok(Duration::ZERO),
        Some(v) => v
            .parse::<u64>()
            .map(|ms| Duration::from_millis(ms).min(MAX_LONG_POLL))
            .map_err(|_| {
                ApiError::param(
                    400,
                    ec::GENERIC_PARAMETER_MALFORMED,
                    "timeout_ms must be a number of milliseconds",
                    "timeout_ms",
                )
            }),
    }
}

async fn create_order(
    shared: &Shared,
    instance: &str,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let body = read_json(req).await?;
    let base = shared.instance_base(instance);
    let now = shared.now();
    let created = shared
        .store()
        .create_order(instance, base.as_str(), &body, now)?;
    let mut out = json!({ "order_id": created.order_id });
    if let (Some(t), Some(obj)) = (created.token, out.as_object_mut()) {
        obj.insert("token".into(), Value::String(t));
    }
    Ok(json_response(StatusCode::OK, &out))
}

/// Holds the request until `attempt` says its answer is final or `timeout` passes; the
/// answer is re-computed whenever the store changes.
async fn long_poll<F>(shared: &Shared, timeout: Duration, mut attempt: F) -> Response<Body>
where
    F: FnMut() -> (Response<Body>, bool),
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let notified = shared.changed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let (resp, done) = attempt();
        let stopping = shared.stopping.load(std::sync::atomic::Ordering::Relaxed);
        if done || stopping || tokio::time::Instant::now() >= deadline {
            return resp;
        }
        let _ = tokio::time::timeout_at(deadline, notified).await;
    }
}

async fn get_order(
    shared: &Shared,
    instance: &str,
    id: &str,
    pairs: &[(String, String)],
    unknown_status: bool,
) -> Result<Response<Body>, ApiError> {
    let session = query(pairs, "session_id");
    let timeout = timeout_param(pairs)?;
    let allow_refunded = match query(pairs, "allow_refunded_for_repurchase") {
        None => false,
        Some(v) if v.eq_ignore_ascii_case("yes") => true,
        Some(v) if v.eq_ignore_ascii_case("no") => false,
        Some(_) => {
            return Err(ApiError::param(
                400,
                ec::GENERIC_PARAMETER_MALFORMED,
                "allow_refunded_for_repurchase must be YES or NO",
                "allow_refunded_for_repurchase",
            ))
        }
    };
    let base = shared.instance_base(instance);
    Ok(long_poll(shared, timeout, || {
        let store = shared.store();
        match store.private_view(instance, id, session, allow_refunded) {
            Err(e) => (error_response(&e), true),
            Ok(view) => {
                let paid = matches!(view, PrivateView::Paid(_));
                let mut body = private_json(&base, &view, session);
                if unknown_status {
                    if let Some(obj) = body.as_object_mut() {
                        obj.insert("order_status".into(), json!("frobnicated"));
                    }
                }
                (json_response(StatusCode::OK, &body), paid)
            }
        }
    })
    .await)
}

/// How the public order page authenticates a client.
enum Auth<'a> {
    Token(Option<&'a str>),
    Contract(&'a str),
}

/// `{base}orders/{id}?token=…&session_id=…` or `…?h_contract=…&session_id=…`.
fn status_url(base: &Url, order: &Order, auth: Auth<'_>, session: Option<&str>) -> String {
    let Ok(mut url) = base.join(&format!("orders/{}", order.id)) else {
        return base.to_string();
    };
    let mut pairs: Vec<(&str, &str)> = Vec::new();
    match auth {
        Auth::Token(Some(t)) => pairs.push(("token", t)),
        Auth::Token(None) => {}
        Auth::Contract(h) => pairs.push(("h_contract", h)),
    }
    if let Some(s) = session {
        pairs.push(("session_id", s));
    }
    if !pairs.is_empty() {
        url.query_pairs_mut().extend_pairs(pairs);
    }
    url.to_string()
}

/// `taler://pay/{host[:port]}{/path}/{order_id}/{session_id}?c={token}`; `taler+http` when
/// the sandbox is reached over plain HTTP.
pub(super) fn pay_uri(base: &Url, order: &Order, session: Option<&str>) -> String {
    let scheme = if base.scheme() == "http" {
        "taler+http"
    } else {
        "taler"
    };
    let mut uri = format!(
        "{scheme}://pay/{}{}/{}/{}",
        authority(base),
        base.path().trim_end_matches('/'),
        order.id,
        utf8_percent_encode(session.unwrap_or(""), SEGMENT)
    );
    if let Some(t) = &order.claim_token {
        uri.push_str("?c=");
        uri.push_str(t);
    }
    uri
}

fn authority(base: &Url) -> String {
    let host = base.host_str().unwrap_or("localhost");
    match base.port() {
        Some(p) => format!("{host}:{p}"),
        None => host.to_owned(),
    }
}

fn refund_uri(base: &Url, order: &Order) -> String {
    let scheme = if base.scheme() == "http" {
        "taler+http"
    } else {
        "taler"
    };
    format!(
        "{scheme}://refund/{}{}/{}/",
        authority(base),
        base.path().trim_end_matches('/'),
        order.id
    )
}

fn private_json(base: &Url, view: &PrivateView<'_>, session: Option<&str>) -> Value {
    match view {
        PrivateView::Unpaid {
            order,
            already_paid,
        } => {
            let mut v = json!({
                "order_status": "unpaid",
                "taler_pay_uri": pay_uri(base, order, session),
                "order_status_url":
                    status_url(base, order, Auth::Token(order.claim_token.as_deref()), session),
                "creation_time": timestamp_json(order.created),
                "summary": order.summary,
                "total_amount": order.amount.to_string(),
                "pay_deadline": timestamp_json(order.pay_deadline),
            });
            if let (Some(paid), Some(obj)) = (already_paid, v.as_object_mut()) {
                obj.insert("already_paid_order_id".into(), json!(paid.id));
                if let Some(u) = &paid.fulfillment_url {
                    obj.insert("already_paid_fulfillment_url".into(), json!(u));
                }
            }
            v
        }
        PrivateView::Claimed(order) => json!({
            "order_status": "claimed",
            "contract_terms": order.contract_terms,
            "order_status_url": status_url(base, order, Auth::Contract(&order.h_contract), session),
        }),
        PrivateView::Paid(order) => {
            let details: Vec<Value> = order
                .refunds
                .iter()
                .map(|r| {
                    json!({
                        "reason": r.reason,
                        "pending": r.pending,
                        "timestamp": timestamp_json(r.timestamp),
                        "amount": r.amount.to_string(),
                    })
                })
                .collect();
            json!({
                "order_status": "paid",
                "refunded": order.refunded(),
                "refund_pending": order.refund_pending(),
                "refund_amount": order.refund_amount().to_string(),
                "wired": false,
                "deposit_total": order.amount.to_string(),
                "exchange_code": 0,
                "exchange_http_status": 0,
                "contract_terms": order.contract_terms,
                "last_payment": timestamp_json(order.payment.as_ref().map_or(order.created, |p| p.paid_at)),
                "wire_details": [],
                "wire_reports": [],
                "refund_details": details,
                "order_status_url":
                    status_url(base, order, Auth::Contract(&order.h_contract), session),
            })
        }
    }
}

async fn refund(
    shared: &Shared,
    instance: &str,
    id: &str,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let body = read_json(req).await?;
    let total: Amount = field(&body, "refund", true)?
        .unwrap_or_default()
        .parse()
        .map_err(|e| {
            ApiError::param(
                400,
                ec::GENERIC_PARAMETER_MALFORMED,
                format!("refund: {e}"),
                "refund",
            )
        })?;
    let reason = field(&body, "reason", true)?.unwrap_or_default();
    let base = shared.instance_base(instance);
    let now = shared.now();
    let out = {
        let mut store = shared.store();
        let order = store.refund(instance, id, &total, reason, now)?;
        json!({ "taler_refund_uri": refund_uri(&base, order), "h_contract": order.h_contract })
    };
    shared.changed.notify_waiters();
    Ok(json_response(StatusCode::OK, &out))
}

async fn public_order(
    shared: &Shared,
    instance: &str,
    id: &str,
    pairs: &[(String, String)],
    html: bool,
) -> Response<Body> {
    let token = query(pairs, "token");
    let h_contract = query(pairs, "h_contract");
    let session = query(pairs, "session_id");
    let timeout = if html {
        Duration::ZERO
    } else {
        match timeout_param(pairs) {
            Ok(t) => t,
            Err(e) => return error_response(&e),
        }
    };
    let base = shared.instance_base(instance);
    long_poll(shared, timeout, || {
        let store = shared.store();
        match store.public_view(instance, id, token, h_contract, session) {
            Err(e) if html => (page::error(&e), true),
            Err(e) => (error_response(&e), true),
            Ok(view) => {
                let waiting = matches!(view, PublicView::PayRequired(_));
                (public_response(&base, &view, session, html), !waiting)
            }
        }
    })
    .await
}

fn public_response(
    base: &Url,
    view: &PublicView<'_>,
    session: Option<&str>,
    html: bool,
) -> Response<Body> {
    match view {
        PublicView::PayRequired(order) => {
            let uri = pay_uri(base, order, session);
            let mut resp = if html {
                page::payment(base, order, &uri, session)
            } else {
                let mut v = json!({ "taler_pay_uri": uri });
                if let (Some(u), Some(obj)) = (&order.fulfillment_url, v.as_object_mut()) {
                    obj.insert("fulfillment_url".into(), json!(u));
                }
                json_response(StatusCode::PAYMENT_REQUIRED, &v)
            };
            if let Ok(h) = HeaderValue::from_str(&uri) {
                resp.headers_mut().insert("taler", h);
            }
            resp
        }
        PublicView::AlreadyPaid { order, paid } => {
            let target = paid.fulfillment_url.as_deref().unwrap_or_default();
            if html {
                return redirect(StatusCode::FOUND, target);
            }
            let v = json!({
                "taler_pay_uri": pay_uri(base, order, session),
                "fulfillment_url": target,
                "already_paid_order_id": paid.id,
            });
            json_response(StatusCode::PAYMENT_REQUIRED, &v)
        }
        PublicView::Paid(order) => {
            if html {
                if order.refund_pending() || order.refunded() || order.fulfillment_url.is_none() {
                    return page::paid(base, order);
                }
                return redirect(
                    StatusCode::FOUND,
                    order.fulfillment_url.as_deref().unwrap_or_default(),
                );
            }
            let mut v = json!({
                "refunded": order.refunded(),
                "refund_pending": order.refund_pending(),
                "refund_amount": order.refund_amount().to_string(),
                "refund_taken": order.refund_taken().to_string(),
            });
            if let (Some(u), Some(obj)) = (&order.fulfillment_url, v.as_object_mut()) {
                obj.insert("fulfillment_url".into(), json!(u));
            }
            json_response(StatusCode::OK, &v)
        }
        PublicView::GotoFulfillment(order) | PublicView::GotoReorder(order) => {
            let to_fulfillment = matches!(view, PublicView::GotoFulfillment(_));
            let target = if to_fulfillment {
                order.fulfillment_url.as_deref()
            } else {
                order.public_reorder_url.as_deref()
            };
            if html {
                return redirect(StatusCode::FOUND, target.unwrap_or_default());
            }
            let mut v = json!({});
            if let Some(obj) = v.as_object_mut() {
                if let Some(u) = &order.fulfillment_url {
                    obj.insert("fulfillment_url".into(), json!(u));
                }
                if let Some(u) = &order.public_reorder_url {
                    obj.insert("public_reorder_url".into(), json!(u));
                }
            }
            json_response(StatusCode::ACCEPTED, &v)
        }
    }
}

async fn wallet_pay(
    shared: &Shared,
    instance: &str,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let body = read_json(req).await?;
    let order_id = field(&body, "order_id", true)?.unwrap_or_default();
    let session = field(&body, "session_id", false)?.unwrap_or_default();
    let wallet = field(&body, "wallet", false)?.unwrap_or(DEFAULT_WALLET);
    let now = shared.now();
    let paid = shared
        .store()
        .pay(instance, order_id, session, wallet, now)?;
    shared.changed.notify_waiters();
    Ok(json_response(
        StatusCode::OK,
        &json!({ "paid_order_id": paid }),
    ))
}

async fn wallet_claim(
    shared: &Shared,
    instance: &str,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let body = read_json(req).await?;
    let order_id = field(&body, "order_id", true)?.unwrap_or_default();
    let wallet = field(&body, "wallet", false)?.unwrap_or(OTHER_WALLET);
    let out = {
        let mut store = shared.store();
        let o = store.claim(instance, order_id, wallet)?;
        json!({ "order_id": o.id, "h_contract": o.h_contract, "contract_terms": o.contract_terms })
    };
    shared.changed.notify_waiters();
    Ok(json_response(StatusCode::OK, &out))
}

async fn wallet_collect(
    shared: &Shared,
    instance: &str,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let body = read_json(req).await?;
    let order_id = field(&body, "order_id", true)?.unwrap_or_default();
    let out = {
        let mut store = shared.store();
        let o = store.collect_refunds(instance, order_id)?;
        json!({
            "order_id": o.id,
            "refund_amount": o.refund_amount().to_string(),
            "refund_taken": o.refund_taken().to_string(),
        })
    };
    shared.changed.notify_waiters();
    Ok(json_response(StatusCode::OK, &out))
}

async fn read_form(req: Request<Incoming>) -> Result<Vec<(String, String)>, ApiError> {
    let bytes = read_body(req).await?;
    Ok(url::form_urlencoded::parse(&bytes)
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect())
}

/// The page's "Pay with the sandbox wallet" button: pays like `sandbox/pay`, then sends
/// the browser to the fulfillment URL as the real page does after payment.
async fn form_pay(shared: &Shared, instance: &str, req: Request<Incoming>) -> Response<Body> {
    let form = match read_form(req).await {
        Ok(f) => f,
        Err(e) => return page::error(&e),
    };
    let order_id = query(&form, "order_id").unwrap_or_default();
    let session = query(&form, "session_id").unwrap_or_default();
    let now = shared.now();
    let base = shared.instance_base(instance);
    let resp = {
        let mut store = shared.store();
        match store.pay(instance, order_id, session, DEFAULT_WALLET, now) {
            Err(e) => page::error(&e),
            Ok(paid) => match store.order(instance, &paid) {
                Some(o) => match &o.fulfillment_url {
                    Some(u) => redirect(StatusCode::SEE_OTHER, u),
                    None => page::paid(&base, o),
                },
                None => page::error(&ApiError::new(
                    404,
                    ec::MERCHANT_GENERIC_ORDER_UNKNOWN,
                    "The order is gone",
                )),
            },
        }
    };
    shared.changed.notify_waiters();
    resp
}

/// The page's "Collect refund" button.
async fn form_collect(shared: &Shared, instance: &str, req: Request<Incoming>) -> Response<Body> {
    let form = match read_form(req).await {
        Ok(f) => f,
        Err(e) => return page::error(&e),
    };
    let order_id = query(&form, "order_id").unwrap_or_default();
    let base = shared.instance_base(instance);
    let resp = {
        let mut store = shared.store();
        match store.collect_refunds(instance, order_id) {
            Err(e) => page::error(&e),
            Ok(o) => page::paid(&base, o),
        }
    };
    shared.changed.notify_waiters();
    resp
}

pub(super) fn with_type(status: StatusCode, ctype: &'static str, body: String) -> Response<Body> {
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(ctype));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

fn json_response(status: StatusCode, v: &Value) -> Response<Body> {
    with_type(status, "application/json", format!("{v}\n"))
}

pub(super) fn status_of(e: &ApiError) -> StatusCode {
    StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

fn error_response(e: &ApiError) -> Response<Body> {
    let mut resp = json_response(status_of(e), &e.to_json());
    if e.status == 401 {
        resp.headers_mut()
            .insert("www-authenticate", HeaderValue::from_static("Bearer"));
    }
    resp
}

/// A redirect; a target that is not a valid header value is sent in its URL serialisation.
pub(super) fn redirect(status: StatusCode, target: &str) -> Response<Body> {
    let value = HeaderValue::from_str(target).ok().or_else(|| {
        Url::parse(target)
            .ok()
            .and_then(|u| HeaderValue::from_str(u.as_str()).ok())
    });
    let mut resp = with_type(status, "text/plain; charset=utf-8", String::new());
    match value {
        Some(v) => {
            resp.headers_mut().insert(LOCATION, v);
        }
        None => *resp.status_mut() = StatusCode::INTERNAL_SERVER_ERROR,
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_map_paths_and_methods() {
        let rows: [(&Method, &str, Result<Route, u16>); 12] = [
            (&Method::GET, "config", Ok(Route::Config)),
            (&Method::POST, "private/orders", Ok(Route::CreateOrder)),
            (
                &Method::GET,
                "private/orders/A1",
                Ok(Route::GetOrder("A1".into())),
            ),
            (
                &Method::POST,
                "private/orders/A%2E1/refund",
                Ok(Route::Refund("A.1".into())),
            ),
            (&Method::GET, "orders/X", Ok(Route::PublicOrder("X".into()))),
            (&Method::POST, "sandbox/pay", Ok(Route::WalletPay)),
            (&Method::GET, "sandbox/stats", Ok(Route::Stats)),
            (&Method::POST, "sandbox/stats", Err(405)),
            (&Method::GET, "private/orders", Err(405)),
            (&Method::GET, "private/orders/", Err(404)),
            (&Method::GET, "nothing", Err(404)),
            (&Method::DELETE, "config", Err(405)),
        ];
        for (m, path, want) in rows {
            assert_eq!(route(m, path).map_err(|e| e.status), want, "{m} {path}");
        }
    }

    #[test]
    fn instances_split_from_paths() {
        assert_eq!(split_instance("/config"), ("default".into(), "config"));
        assert_eq!(
            split_instance("/instances/shop/private/orders"),
            ("shop".into(), "private/orders")
        );
        assert_eq!(split_instance("/instances/shop"), ("shop".into(), ""));
    }
}
