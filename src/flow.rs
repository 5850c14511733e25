//! Carries out the storefront algorithm for one protected request.
//!
//! [`PaymentGate::decide`] reads the request's cookies, runs the pure
//! [`crate::payment::PaymentFlow`] against the merchant backend, and returns an [`Outcome`]:
//! either "serve from the origin, adding these cookies" or a finished response (redirect to
//! the status page, 402, refund page, 429, 5xx). It never forwards anything itself, so a
//! protected request can only reach the origin through [`Outcome::Serve`], which is only
//! produced for an order the merchant called paid in this session (now, or less than
//! `recheck_interval` ago).
//!
//! Beside the cookie grant, each process keeps a bounded in-memory table of
//! (session, resource) → (order, last confirmation), and requests for the same (session,
//! resource) take turns, so that concurrent requests (a page and its images) share one
//! merchant call and one order. Order creation is rate-limited per client address.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE, LOCATION, RETRY_AFTER, SET_COOKIE};
use http::{HeaderMap, Response, StatusCode};
use tracing::Instrument as _;
use url::Url;

use crate::body::{full, Body};
use crate::config::{Config, Scope};
use crate::cookie_memo::CookieMemo;
use crate::merchant::{MerchantClient, NewOrder};
use crate::metrics::{Endpoint, GrantSource, Metrics};
use crate::pages;
use crate::path::{normalize, NormalizedPath};
use crate::payment::{grant_is_fresh, Action, FailKind, PaymentFlow, Visit};
use crate::policy::ProtectedRoute;
use crate::session::{
    self, CookieKeys, CookieSettings, OrderCookie, RequestCookies, Session, SessionId,
};

/// Query parameter added to the cookie-check redirect of a browser that came without a
/// session; seeing it again without a session means the browser refuses cookies.
pub const COOKIE_CHECK_PARAM: &str = "taler_paywall_cc";

/// Most (session, resource) entries kept in memory per process.
pub const MEMORY_ENTRIES: usize = 100_000;

/// What the gateway does with a protected request.
#[derive(Debug)]
pub enum Outcome {
    /// Paid: forward to the origin, add these `Set-Cookie` values to its response and make
    /// the response `Cache-Control: private`.
    Serve {
        /// Cookies to set on the origin's response.
        set_cookies: Vec<HeaderValue>,
        /// Which order paid (for the log).
        order_id: Option<String>,
    },
    /// Not served: this response goes to the client as is.
    Respond {
        /// The response.
        response: Response<Body>,
        /// What happened, for logs and metrics.
        kind: DenyKind,
    },
}

/// Why a protected request was not served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenyKind {
    /// Sent to pay (302 or 402), or to the cookie check, or to repurchase detection.
    PaymentRequired,
    /// The purchase was refunded.
    Refunded,
    /// Order creation rate limit hit (429).
    RateLimited,
    /// The browser keeps no cookies (403).
    CookiesRequired,
    /// The merchant failed: 5xx, failing closed.
    FailedClosed,
}

/// The payment side of the gateway: merchant client, cookie keys and per-process tables.
pub struct PaymentGate {
    merchant: MerchantClient,
    keys: CookieKeys,
    cookies: CookieSettings,
    public_base: String,
    recheck: u64,
    refund_delay: Option<Duration>,
    /// Shared with the gate a reload replaces, when it asks the same merchant (see
    /// [`PaymentGate::carry_over`]); likewise `turns` and `limiter`.
    memory: Arc<Mutex<HashMap<TurnKey, Remembered>>>,
    turns: Arc<Mutex<HashMap<TurnKey, Arc<tokio::sync::Mutex<()>>>>>,
    limiter: Arc<OrderLimiter>,
    /// Verified cookies of paid browsers, per serving thread (see [`CookieMemo`]).
    memo: CookieMemo,
    metrics: Arc<Metrics>,
    pages: Arc<pages::Pages>,
}

impl std::fmt::Debug for PaymentGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PaymentGate")
            .field("merchant", &self.merchant)
            .field("public_base", &self.public_base)
            .finish_non_exhaustive()
    }
}

/// The request's cookies for [`PaymentGate::serve`]: parsed already, or not (a
/// [`CookieMemo`] hit), in which case they are parsed only if the return cookie is needed.
#[derive(Clone, Copy)]
enum Jar<'j, 'h> {
    Parsed(&'j RequestCookies<'h>),
    Unparsed(&'h HeaderMap),
}

/// (session, resource).
type TurnKey = (SessionId, String);

/// Where a decision is being carried out: the session, the resource and its cookie path.
struct Here<'a> {
    session: &'a SessionId,
    resource: &'a str,
    cookie_path: &'a str,
    path: &'a NormalizedPath,
    scope: Scope,
    now: u64,
}

#[derive(Debug, Clone)]
struct Remembered {
    order_id: String,
    verified_at: Option<u64>,
    touched: u64,
}

/// The unix time now, in seconds.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `public_url` without a trailing slash: the base of fulfillment URLs.
pub fn public_base(url: &Url) -> String {
    url.as_str().trim_end_matches('/').to_owned()
}

impl PaymentGate {
    /// Builds the gate from the configuration.
    ///
    /// # Errors
    /// The merchant client cannot be built (unusable CA file or token).
    pub fn new(config: &Config) -> anyhow::Result<Self> {
        Ok(PaymentGate {
            merchant: MerchantClient::new(&config.merchant)?,
            keys: CookieKeys::new(&config.session),
            cookies: CookieSettings {
                secure: config.server.public_url.scheme() == "https",
                path_base: config
                    .server
                    .public_url
                    .path()
                    .trim_end_matches('/')
                    .to_owned(),
                lifetime: config.session.cookie_lifetime.as_secs(),
            },
            public_base: public_base(&config.server.public_url),
            recheck: config.session.recheck_interval.as_secs(),
            refund_delay: config.merchant.refund_delay,
            memory: Arc::new(Mutex::new(HashMap::new())),
            turns: Arc::new(Mutex::new(HashMap::new())),
            limiter: Arc::new(OrderLimiter::new(
                config.limits.orders_per_minute,
                config.limits.orders_burst,
            )),
            memo: CookieMemo::new(),
            metrics: Arc::new(Metrics::new()),
            pages: config.pages.templates.clone(),
        })
    }

    /// Takes over what `previous` (the gate a reload replaces) knows, so that a reload
    /// neither refills every client's order allowance nor forgets recent grants:
    /// - the order limiter's buckets, if `[limits]` allows the same rate and burst;
    /// - the (session, resource) table of orders and grants and the turn locks, if the
    ///   merchant backend URL is the same (orders and grants belong to one backend instance).
    ///
    /// Both stay shared while requests on the old configuration finish. Cookies carry over
    /// anyway; the verified-cookie memo does not (it is tied to the old cookie keys).
    pub fn carry_over(mut self, previous: &PaymentGate) -> Self {
        if self.limiter.per_minute == previous.limiter.per_minute
            && self.limiter.burst == previous.limiter.burst
        {
            self.limiter = Arc::clone(&previous.limiter);
        }
        if self.merchant.base_url() == previous.merchant.base_url() {
            self.memory = Arc::clone(&previous.memory);
            self.turns = Arc::clone(&previous.turns);
        }
        self
    }

    /// Counts merchant calls and grant hits into `metrics` instead of a private registry.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// The merchant client (for readiness checks).
    pub fn merchant(&self) -> &MerchantClient {
        &self.merchant
    }

    /// Asks the backend's `GET config` whether it is a compatible `taler-merchant` that
    /// accepts every configured currency. `Ok` carries the backend's description; `Err` one
    /// line saying what is wrong (for the log and `/readyz`).
    ///
    /// # Errors
    /// The backend is unreachable, answers badly, or is incompatible.
    pub async fn check_backend<'a>(
        &self,
        currencies: impl IntoIterator<Item = &'a str>,
    ) -> Result<crate::merchant::BackendInfo, String> {
        let started = std::time::Instant::now();
        let result = self.merchant.config().await;
        self.metrics
            .merchant_call(Endpoint::Config, result.as_ref().err(), started.elapsed());
        let info =
            result.map_err(|e| format!("merchant backend {}: {e}", self.merchant.base_url()))?;
        let problems = info.compatibility_problems(currencies);
        if problems.is_empty() {
            Ok(info)
        } else {
            Err(format!(
                "merchant backend {}: {}",
                self.merchant.base_url(),
                problems.join("; ")
            ))
        }
    }

    /// The fulfillment URL of a resource: `public_url` + the resource path. Stable byte for
    /// byte across orders, so wallets recognise repurchases.
    pub fn fulfillment_url(&self, resource: &str) -> String {
        format!("{}{}", self.public_base, resource)
    }

    fn own_url(&self, path: &str, query: Option<&str>) -> String {
        match query {
            Some(q) if !q.is_empty() => format!("{}{}?{}", self.public_base, path, q),
            _ => format!("{}{}", self.public_base, path),
        }
    }

    /// Decides a protected request at the time `now` (unix seconds; [`unix_now`] in the
    /// gateway, a chosen time in tests). `html` says whether the client prefers HTML pages
    /// ([`pages::wants_html`], already worked out by the caller for its own pages).
    #[allow(clippy::too_many_arguments)]
    pub async fn decide(
        &self,
        now: u64,
        headers: &HeaderMap,
        html: bool,
        query: Option<&str>,
        route: &ProtectedRoute,
        path: &NormalizedPath,
        client: IpAddr,
        request_span: impl FnOnce() -> tracing::Span,
    ) -> Outcome {
        let resource = route.resource(path);
        // The fastest path: these very cookies were verified for this resource on this
        // thread before; only what depends on the time is checked again. Once the cookie's
        // own grant has aged, a fresher one this process verified since (a re-check made by
        // an earlier request) serves as well, as it would after the full check below: a
        // client whose cookie was not updated (one that ignored the re-check's `Set-Cookie`,
        // or sent requests while it ran) costs one lookup, not two HMACs and a parse; the
        // memo keeps a copy of that grant (the entry's renewal), so that the client's further
        // requests take no lock shared with the other serving threads either.
        let mut renewal = None;
        let served = self
            .memo
            .with(headers, resource, |session, granted, renewed| {
                if !session.is_current(&self.cookies, now) {
                    return None;
                }
                let (order_id, source) = if self.is_fresh(granted, now) {
                    (granted.order_id.clone(), GrantSource::Cookie)
                } else if let Some(renewed) = renewed.filter(|o| self.is_fresh(o, now)) {
                    (renewed.order_id.clone(), GrantSource::Memory)
                } else {
                    let remembered = self.fresh_in_memory(&session.id, resource, now)?;
                    let order_id = remembered.order_id.clone();
                    renewal = Some(remembered);
                    (order_id, GrantSource::Memory)
                };
                self.metrics.grant_hit(source);
                Some(self.serve(
                    route,
                    path,
                    &session.id,
                    resource,
                    Jar::Unparsed(headers),
                    Some(order_id),
                    Vec::new(),
                ))
            });
        if let Some(outcome) = served.flatten() {
            if let Some(grant) = renewal {
                self.memo.renew(headers, resource, &grant);
            }
            return outcome;
        }
        let jar = RequestCookies::parse(headers);
        let mut set_cookies = Vec::new();
        let session = match jar.session(&self.keys, &self.cookies, now) {
            Some(s) => s,
            None => {
                let fresh = Session {
                    id: SessionId::generate(),
                    issued_at: now,
                };
                set_cookies.extend(session::set_session(&self.keys, &self.cookies, &fresh));
                if html {
                    // Browsers first get only the cookie, so that clients which drop cookies
                    // never make the gateway create orders.
                    return if has_cookie_check(query) {
                        self.respond(
                            self.pages.cookies_required(html),
                            Vec::new(),
                            DenyKind::CookiesRequired,
                        )
                    } else {
                        let target = self.own_url(path.as_str(), Some(&with_cookie_check(query)));
                        self.respond(redirect(&target), set_cookies, DenyKind::PaymentRequired)
                    };
                }
                fresh
            }
        };
        // The fast path: a grant younger than `recheck_interval`, in the signed cookie or in
        // this process's memory, is served without a merchant call, so it needs no turn (the
        // turn exists only to share merchant calls) and, for the cookie, no shared state.
        let from_cookie = jar.order(&self.keys, &session.id, resource);
        if let Some(granted) = from_cookie.as_ref().filter(|o| self.is_fresh(o, now)) {
            self.metrics.grant_hit(GrantSource::Cookie);
            if set_cookies.is_empty() && jar.is_unambiguous(&self.cookies, resource) {
                // The session came from these cookies too: remember both for them.
                self.memo.put(headers, resource, &session, granted);
            }
            let order_id = Some(granted.order_id.clone());
            return self.serve(
                route,
                path,
                &session.id,
                resource,
                Jar::Parsed(&jar),
                order_id,
                set_cookies,
            );
        }
        if let Some(granted) = self.fresh_in_memory(&session.id, resource, now) {
            self.metrics.grant_hit(GrantSource::Memory);
            if let Some(own) = from_cookie.as_ref().filter(|_| set_cookies.is_empty()) {
                if jar.is_unambiguous(&self.cookies, resource) {
                    // What the cookies hold (their own, aged grant), and as its renewal
                    // the fresh grant this check found in memory.
                    self.memo.put(headers, resource, &session, own);
                    self.memo.renew(headers, resource, &granted);
                }
            }
            let order_id = Some(granted.order_id);
            return self.serve(
                route,
                path,
                &session.id,
                resource,
                Jar::Parsed(&jar),
                order_id,
                set_cookies,
            );
        }
        // The slow path: what it logs (merchant errors, limits) carries the request id. Its
        // future (merchant calls, the turn) is boxed: inline, it made every request's future,
        // paid or not, about 2 KiB larger, memory each connection holds and each request
        // writes (`docs/benchmarks.md`, "Twelfth session"). The slow path allocates anyway.
        Box::pin(self.decide_slow(
            html,
            route,
            path,
            session,
            resource,
            &jar,
            from_cookie,
            client,
            now,
            set_cookies,
        ))
        .instrument(request_span())
        .await
    }

    /// [`Self::decide`] without a fresh grant: takes the (session, resource) turn and asks
    /// the merchant if needed.
    #[allow(clippy::too_many_arguments)]
    async fn decide_slow(
        &self,
        html: bool,
        route: &ProtectedRoute,
        path: &NormalizedPath,
        session: Session,
        resource: &str,
        jar: &RequestCookies<'_>,
        from_cookie: Option<OrderCookie>,
        client: IpAddr,
        now: u64,
        set_cookies: Vec<HeaderValue>,
    ) -> Outcome {
        let key = (session.id.clone(), resource.to_owned());
        // One request per (session, resource) at a time: the others wait and then find the
        // first one's order and grant in memory.
        let turn = self.turn(&key);
        let _guard = turn.lock().await;
        // Read memory again inside the turn: the request before us may have just filled it.
        let remembered = self.recall(&session.id, resource);
        // Prefer whichever knows more: a fresh grant anywhere wins; otherwise the cookie.
        let known = pick(from_cookie, remembered, now, self.recheck);
        let outcome = self
            .decide_in_turn(
                html,
                route,
                path,
                &session,
                resource,
                jar,
                known,
                client,
                now,
                set_cookies,
            )
            .await;
        drop(_guard);
        self.release_turn(&key, turn);
        outcome
    }

    /// Whether `order` carries a grant younger than `recheck_interval`.
    fn is_fresh(&self, order: &OrderCookie, now: u64) -> bool {
        order
            .verified_at
            .is_some_and(|v| grant_is_fresh(v, now, self.recheck))
    }

    #[allow(clippy::too_many_arguments)]
    async fn decide_in_turn(
        &self,
        html: bool,
        route: &ProtectedRoute,
        path: &NormalizedPath,
        session: &Session,
        resource: &str,
        jar: &RequestCookies<'_>,
        known: Option<OrderCookie>,
        client: IpAddr,
        now: u64,
        mut set_cookies: Vec<HeaderValue>,
    ) -> Outcome {
        let cookie_path = session::cookie_path(&self.cookies, resource, &route.prefix);
        let fulfillment_url = self.fulfillment_url(resource);
        let here = Here {
            session: &session.id,
            resource,
            cookie_path: &cookie_path,
            path,
            scope: route.scope,
            now,
        };
        let (mut flow, mut action) = PaymentFlow::start(&Visit {
            now,
            order_id: known.as_ref().map(|o| o.order_id.as_str()),
            verified_at: known.as_ref().and_then(|o| o.verified_at),
            recheck_interval: self.recheck,
            fulfillment_url: &fulfillment_url,
        });
        loop {
            action = match action {
                Action::CreateOrder => {
                    if let Err(wait) = self.limiter.try_take(client, now) {
                        tracing::info!(%client, "order creation rate limit reached");
                        let mut resp = self.pages.rate_limited(html, wait);
                        if let Ok(v) = HeaderValue::from_str(&wait.to_string()) {
                            resp.headers_mut().insert(RETRY_AFTER, v);
                        }
                        return self.respond(resp, set_cookies, DenyKind::RateLimited);
                    }
                    let order = NewOrder {
                        amount: &route.price,
                        summary: &route.summary,
                        fulfillment_url: &fulfillment_url,
                        refund_delay: self.refund_delay,
                    };
                    let started = std::time::Instant::now();
                    let result = self.merchant.create_order(&order).await;
                    self.metrics.merchant_call(
                        Endpoint::CreateOrder,
                        result.as_ref().err(),
                        started.elapsed(),
                    );
                    if let Err(e) = &result {
                        tracing::warn!(cause = %e, "merchant: creating an order failed");
                    }
                    flow.on_created(result.map_err(|e| e.failure()))
                }
                Action::CheckStatus { order_id } => {
                    let started = std::time::Instant::now();
                    let result = self
                        .merchant
                        .order_status(&order_id, session.id.as_str())
                        .await;
                    self.metrics.merchant_call(
                        Endpoint::OrderStatus,
                        result.as_ref().err(),
                        started.elapsed(),
                    );
                    if let Err(e) = &result {
                        if e.failure() != crate::payment::Failure::OrderUnknown {
                            tracing::warn!(cause = %e, "merchant: order status failed");
                        }
                    }
                    flow.on_status(result.map_err(|e| e.failure()))
                }
                Action::Serve { order } => {
                    let order_id = match order {
                        Some(order_id) => {
                            self.keep_order(&here, &order_id, Some(now), false, &mut set_cookies);
                            Some(order_id)
                        }
                        None => {
                            // A fresh cookie grant is served before the turn; inside it,
                            // a fresh grant can only have come from memory.
                            self.metrics.grant_hit(GrantSource::Memory);
                            known.as_ref().map(|o| o.order_id.clone())
                        }
                    };
                    return self.serve(
                        route,
                        path,
                        &session.id,
                        resource,
                        Jar::Parsed(jar),
                        order_id,
                        set_cookies,
                    );
                }
                Action::AskToPay {
                    order_id,
                    pay_uri,
                    status_url,
                } => {
                    self.keep_order(&here, &order_id, None, true, &mut set_cookies);
                    let resp = self.pages.payment_required(
                        html,
                        &pay_uri,
                        &status_url,
                        &route.summary,
                        &route.price,
                    );
                    return self.respond(resp, set_cookies, DenyKind::PaymentRequired);
                }
                Action::FollowRepurchase {
                    order_id,
                    fulfillment_url,
                } => {
                    self.keep_order(&here, &order_id, None, true, &mut set_cookies);
                    // `fulfillment_url` is this resource's own URL (checked by `payment`).
                    return self.respond(
                        redirect(&fulfillment_url),
                        set_cookies,
                        DenyKind::PaymentRequired,
                    );
                }
                Action::Refunded {
                    order_id,
                    pending,
                    status_url,
                } => {
                    self.keep_order(&here, &order_id, None, false, &mut set_cookies);
                    let resp =
                        self.pages
                            .refunded(html, pending, status_url.as_deref(), &route.summary);
                    return self.respond(resp, set_cookies, DenyKind::Refunded);
                }
                Action::FailClosed(kind) => {
                    let status = fail_status(kind);
                    let resp = self.pages.error(
                        status,
                        "The payment service is not available right now. Please try again later.",
                        html,
                    );
                    return self.respond(resp, set_cookies, DenyKind::FailedClosed);
                }
            };
        }
    }

    /// Paid: serve, except that under prefix scope a customer who paid at the prefix's
    /// fulfillment URL continues (`303`) to the page that was asked for.
    /// Remembers `order_id` as this resource's order (cookie and memory), with a grant when
    /// `verified_at` is set; with `return_here`, a prefix purchase also records the page asked
    /// for, so the customer lands on it after paying at the prefix's fulfillment URL.
    fn keep_order(
        &self,
        here: &Here<'_>,
        order_id: &str,
        verified_at: Option<u64>,
        return_here: bool,
        set_cookies: &mut Vec<HeaderValue>,
    ) {
        let order = OrderCookie {
            order_id: order_id.to_owned(),
            verified_at,
        };
        set_cookies.extend(session::set_order(
            &self.keys,
            &self.cookies,
            here.session,
            here.resource,
            here.cookie_path,
            &order,
        ));
        self.remember(here.session, here.resource, &order, here.now);
        if return_here && here.scope == Scope::Prefix && here.path.as_str() != here.resource {
            set_cookies.extend(session::set_return_to(
                &self.keys,
                &self.cookies,
                here.session,
                here.resource,
                here.cookie_path,
                Some(here.path.as_str()),
            ));
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn serve(
        &self,
        route: &ProtectedRoute,
        path: &NormalizedPath,
        session: &SessionId,
        resource: &str,
        jar: Jar<'_, '_>,
        order_id: Option<String>,
        mut set_cookies: Vec<HeaderValue>,
    ) -> Outcome {
        if route.scope == Scope::Prefix && path.as_str() == resource {
            let parsed;
            let jar = match jar {
                Jar::Parsed(jar) => jar,
                Jar::Unparsed(headers) => {
                    parsed = RequestCookies::parse(headers);
                    &parsed
                }
            };
            if let Some(target) = jar.return_to(&self.keys, session, resource) {
                let cookie_path = session::cookie_path(&self.cookies, resource, &route.prefix);
                set_cookies.extend(session::set_return_to(
                    &self.keys,
                    &self.cookies,
                    session,
                    resource,
                    &cookie_path,
                    None,
                ));
                if let Some(target) = self.safe_return_target(&target, route, path) {
                    return self.respond(
                        redirect_see_other(&self.own_url(&target, None)),
                        set_cookies,
                        DenyKind::PaymentRequired,
                    );
                }
            }
        }
        Outcome::Serve {
            set_cookies,
            order_id,
        }
    }

    /// A return target is followed only if it is a normalised path under the same route.
    fn safe_return_target(
        &self,
        target: &str,
        route: &ProtectedRoute,
        here: &NormalizedPath,
    ) -> Option<String> {
        let p = normalize(target).ok()?;
        if p.as_str() != target || p == *here {
            return None;
        }
        let mut segs = p.segments();
        let under = route
            .prefix
            .split('/')
            .filter(|s| !s.is_empty())
            .all(|want| {
                segs.next()
                    .is_some_and(|have| have.eq_ignore_ascii_case(want))
            });
        under.then(|| p.as_str().to_owned())
    }

    fn respond(
        &self,
        mut response: Response<Body>,
        set_cookies: Vec<HeaderValue>,
        kind: DenyKind,
    ) -> Outcome {
        let h = response.headers_mut();
        h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        for c in set_cookies {
            h.append(SET_COOKIE, c);
        }
        Outcome::Respond { response, kind }
    }

    fn turn(&self, key: &(SessionId, String)) -> Arc<tokio::sync::Mutex<()>> {
        let mut turns = self.turns.lock().unwrap_or_else(|p| p.into_inner());
        turns.entry(key.clone()).or_default().clone()
    }

    fn release_turn(&self, key: &(SessionId, String), turn: Arc<tokio::sync::Mutex<()>>) {
        let mut turns = self.turns.lock().unwrap_or_else(|p| p.into_inner());
        // Two references: ours and the table's. Nobody else waits: forget the key.
        if Arc::strong_count(&turn) <= 2 {
            turns.remove(key);
        }
    }

    /// The grant this process keeps for (`session`, `resource`), if it is younger than
    /// `recheck_interval` at `now`.
    fn fresh_in_memory(
        &self,
        session: &SessionId,
        resource: &str,
        now: u64,
    ) -> Option<OrderCookie> {
        self.recall(session, resource)
            .filter(|o| self.is_fresh(o, now))
    }

    fn recall(&self, session: &SessionId, resource: &str) -> Option<OrderCookie> {
        let memory = self.memory.lock().unwrap_or_else(|p| p.into_inner());
        memory
            .get(&(session.clone(), resource.to_owned()))
            .map(|r| OrderCookie {
                order_id: r.order_id.clone(),
                verified_at: r.verified_at,
            })
    }

    fn remember(&self, session: &SessionId, resource: &str, order: &OrderCookie, now: u64) {
        let mut memory = self.memory.lock().unwrap_or_else(|p| p.into_inner());
        if memory.len() >= MEMORY_ENTRIES {
            // Keep what is still useful: entries touched within the recheck interval.
            let horizon = now.saturating_sub(self.recheck.max(60));
            memory.retain(|_, r| r.touched >= horizon);
            if memory.len() >= MEMORY_ENTRIES {
                memory.clear();
            }
        }
        memory.insert(
            (session.clone(), resource.to_owned()),
            Remembered {
                order_id: order.order_id.clone(),
                verified_at: order.verified_at,
                touched: now,
            },
        );
    }

    /// Entries in the in-memory table (for metrics and tests).
    pub fn remembered_entries(&self) -> usize {
        self.memory.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

/// Of the cookie's and the memory's knowledge, the more useful: a fresh grant first, then
/// the cookie (it is per-browser), then memory.
fn pick(
    cookie: Option<OrderCookie>,
    memory: Option<OrderCookie>,
    now: u64,
    recheck: u64,
) -> Option<OrderCookie> {
    let fresh = |o: &OrderCookie| {
        o.verified_at
            .is_some_and(|v| grant_is_fresh(v, now, recheck))
    };
    match (cookie, memory) {
        (Some(c), _) if fresh(&c) => Some(c),
        (_, Some(m)) if fresh(&m) => Some(m),
        (Some(c), _) => Some(c),
        (None, m) => m,
    }
}

fn fail_status(kind: FailKind) -> StatusCode {
    match kind {
        FailKind::Timeout => StatusCode::GATEWAY_TIMEOUT,
        FailKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        FailKind::Unreachable
        | FailKind::Rejected
        | FailKind::ServerError
        | FailKind::Malformed
        | FailKind::TooManyOrders => StatusCode::BAD_GATEWAY,
    }
}

fn has_cookie_check(query: Option<&str>) -> bool {
    query.is_some_and(|q| {
        q.split('&')
            .any(|kv| kv.split('=').next() == Some(COOKIE_CHECK_PARAM))
    })
}

fn with_cookie_check(query: Option<&str>) -> String {
    match query {
        Some(q) if !q.is_empty() => format!("{q}&{COOKIE_CHECK_PARAM}=1"),
        _ => format!("{COOKIE_CHECK_PARAM}=1"),
    }
}

/// A `302 Found` to `location` (one of our own URLs or the merchant's status URL).
fn redirect(location: &str) -> Response<Body> {
    redirect_with(StatusCode::FOUND, location)
}

fn redirect_see_other(location: &str) -> Response<Body> {
    redirect_with(StatusCode::SEE_OTHER, location)
}

fn redirect_with(status: StatusCode, location: &str) -> Response<Body> {
    match HeaderValue::from_str(location) {
        Ok(v) => {
            let mut r = Response::new(full(format!(
                "<!DOCTYPE html><title>Redirect</title><p><a href=\"{}\">Continue</a></p>\n",
                pages::escape_html(location)
            )));
            *r.status_mut() = status;
            r.headers_mut().insert(LOCATION, v);
            r.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            );
            r
        }
        Err(_) => pages::error(StatusCode::BAD_GATEWAY, "Cannot build the redirect.", true),
    }
}

/// A per-client-address token bucket for order creation.
#[derive(Debug)]
pub struct OrderLimiter {
    per_minute: u32,
    burst: u32,
    buckets: Mutex<HashMap<IpAddr, (f64, u64)>>,
}

/// Most client addresses tracked by the limiter before idle ones are dropped.
const LIMITER_ENTRIES: usize = 100_000;

impl OrderLimiter {
    /// `per_minute` = 0 disables the limit.
    pub fn new(per_minute: u32, burst: u32) -> Self {
        OrderLimiter {
            per_minute,
            burst: burst.max(1),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one order from `client`'s bucket, or says how many seconds to wait.
    ///
    /// # Errors
    /// `Err(seconds)` when the bucket is empty.
    pub fn try_take(&self, client: IpAddr, now: u64) -> Result<(), u64> {
        if self.per_minute == 0 {
            return Ok(());
        }
        let rate = f64::from(self.per_minute) / 60.0;
        let burst = f64::from(self.burst);
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() >= LIMITER_ENTRIES && !buckets.contains_key(&client) {
            // Drop buckets that have refilled completely: they carry no information.
            buckets.retain(|_, (tokens, at)| {
                *tokens + (now.saturating_sub(*at) as f64) * rate < burst
            });
            if buckets.len() >= LIMITER_ENTRIES {
                buckets.clear();
            }
        }
        let (tokens, at) = buckets.entry(client).or_insert((burst, now));
        *tokens = (*tokens + (now.saturating_sub(*at) as f64) * rate).min(burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(((1.0 - *tokens) / rate).ceil().max(1.0) as u64)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limiter_bounds_orders_per_client() {
        let l = OrderLimiter::new(60, 3);
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "127.0.0.2".parse().unwrap();
        assert!(l.try_take(a, 100).is_ok());
        assert!(l.try_take(a, 100).is_ok());
        assert!(l.try_take(a, 100).is_ok());
        assert_eq!(l.try_take(a, 100), Err(1));
        assert!(l.try_take(b, 100).is_ok(), "other clients are unaffected");
        assert!(l.try_take(a, 101).is_ok(), "refills at the configured rate");
        let off = OrderLimiter::new(0, 1);
        for _ in 0..1000 {
            assert!(off.try_take(a, 0).is_ok());
        }
    }

    #[test]
    fn cookie_check_marker() {
        assert!(!has_cookie_check(None));
        assert!(!has_cookie_check(Some("a=1")));
        assert!(has_cookie_check(Some("a=1&taler_paywall_cc=1")));
        assert_eq!(with_cookie_check(None), "taler_paywall_cc=1");
        assert_eq!(with_cookie_check(Some("x=2")), "x=2&taler_paywall_cc=1");
    }

    /// A gate whose merchant cannot be reached: any merchant call fails closed, so a
    /// `Serve` proves that no call was needed.
    fn offline_gate(recheck: &str) -> (PaymentGate, crate::policy::Policy) {
        offline_gate_scoped(recheck, "page")
    }

    fn offline_gate_scoped(recheck: &str, scope: &str) -> (PaymentGate, crate::policy::Policy) {
        test_gate(recheck, scope, "http://127.0.0.1:9/", "")
    }

    /// A gate for `/premium/` (`scope`) against `merchant`; `limits` is the body of a
    /// `[limits]` table (none if empty).
    fn test_gate(
        recheck: &str,
        scope: &str,
        merchant: &str,
        limits: &str,
    ) -> (PaymentGate, crate::policy::Policy) {
        let limits = if limits.is_empty() {
            String::new()
        } else {
            format!("[limits]\n{limits}\n")
        };
        let text = format!(
            r#"
[server]
listen = "127.0.0.1:8080"
public_url = "http://127.0.0.1:8080"
[origin]
url = "http://127.0.0.1:8000"
[merchant]
url = "{merchant}"
token = "secret-token:sandbox"
[session]
secret = "a secret of at least thirty-two bytes for the flow tests"
recheck_interval = "{recheck}"
[[protect]]
prefix = "/premium/"
price = "KUDOS:1"
summary = "x"
scope = "{scope}"
{limits}"#
        );
        let config =
            Config::from_toml_str(&text, std::path::Path::new("t.toml"), &crate::config::NoEnv)
                .unwrap();
        let policy = crate::policy::Policy::new(config.protect_rules());
        (PaymentGate::new(&config).unwrap(), policy)
    }

    fn cookie_header(values: &[HeaderValue]) -> HeaderMap {
        let pairs: Vec<&str> = values
            .iter()
            .map(|v| v.to_str().unwrap().split(';').next().unwrap())
            .collect();
        let mut h = HeaderMap::new();
        h.insert(
            http::header::COOKIE,
            HeaderValue::from_str(&pairs.join("; ")).unwrap(),
        );
        h
    }

    async fn decide_for(
        gate: &PaymentGate,
        policy: &crate::policy::Policy,
        headers: &HeaderMap,
    ) -> Outcome {
        decide_for_at(gate, policy, headers, unix_now()).await
    }

    /// [`decide_for`] at the time `now`.
    async fn decide_for_at(
        gate: &PaymentGate,
        policy: &crate::policy::Policy,
        headers: &HeaderMap,
        now: u64,
    ) -> Outcome {
        let path = normalize("/premium/a.html").unwrap();
        let route = policy.classify(&path).unwrap();
        let client: IpAddr = "127.0.0.1".parse().unwrap();
        gate.decide(
            now,
            headers,
            pages::wants_html(headers),
            None,
            route,
            &path,
            client,
            tracing::Span::none,
        )
        .await
    }

    fn new_session(now: u64) -> Session {
        Session {
            id: SessionId::generate(),
            issued_at: now,
        }
    }

    fn session_and_order(
        gate: &PaymentGate,
        session: &Session,
        order_session: &SessionId,
        verified_at: Option<u64>,
    ) -> HeaderMap {
        let order = OrderCookie {
            order_id: "O1".into(),
            verified_at,
        };
        let s = session::set_session(&gate.keys, &gate.cookies, session).unwrap();
        let o = session::set_order(
            &gate.keys,
            &gate.cookies,
            order_session,
            "/premium/a.html",
            "/premium/a.html",
            &order,
        )
        .unwrap();
        cookie_header(&[s, o])
    }

    #[tokio::test]
    async fn fresh_cookie_grant_is_served_without_the_merchant() {
        let (gate, policy) = offline_gate("300s");
        let now = unix_now();
        let session = new_session(now);
        let h = session_and_order(&gate, &session, &session.id, Some(now - 10));
        match decide_for(&gate, &policy, &h).await {
            Outcome::Serve {
                set_cookies,
                order_id,
            } => {
                assert_eq!(order_id.as_deref(), Some("O1"));
                assert!(set_cookies.is_empty());
            }
            Outcome::Respond { kind, .. } => panic!("not served: {kind:?}"),
        }
        assert_eq!(gate.turns.lock().unwrap().len(), 0);
    }

    #[tokio::test]
    async fn verified_cookies_are_remembered_but_their_time_limits_are_checked_again() {
        let (gate, policy) = offline_gate("300s");
        let now = unix_now();
        let session = new_session(now);
        let h = session_and_order(&gate, &session, &session.id, Some(now));
        let at = |t: u64| decide_for_at(&gate, &policy, &h, t);
        assert_eq!(gate.memo.get(&h, "/premium/a.html"), None);
        assert!(matches!(at(now).await, Outcome::Serve { .. }));
        // The full check remembered what it found in these cookies.
        let (s, o) = gate.memo.get(&h, "/premium/a.html").unwrap();
        assert_eq!((s, o.order_id.as_str()), (session.clone(), "O1"));
        // Within the interval the remembered grant serves...
        assert!(matches!(at(now + 299).await, Outcome::Serve { .. }));
        // ...after it, the merchant is asked (here unreachable, so: fail closed) ...
        match at(now + 300).await {
            Outcome::Respond { kind, .. } => assert_eq!(kind, DenyKind::FailedClosed),
            Outcome::Serve { .. } => panic!("a remembered stale grant was served"),
        }
        // ...and a remembered session past its lifetime is no session at all.
        let (gate, _) = offline_gate("300s");
        let later = now + gate.cookies.lifetime + 1;
        let h = session_and_order(&gate, &session, &session.id, Some(later));
        let fresh_grant = OrderCookie {
            order_id: "O1".into(),
            verified_at: Some(later),
        };
        gate.memo.put(&h, "/premium/a.html", &session, &fresh_grant);
        let outcome = decide_for_at(&gate, &policy, &h, later).await;
        assert!(matches!(outcome, Outcome::Respond { .. }), "{outcome:?}");
    }

    #[tokio::test]
    async fn a_remembered_prefix_grant_still_follows_the_return_cookie() {
        // Scope "prefix": the resource is `/premium/`, bought at its fulfillment URL; the
        // return cookie sends the customer on to the page first asked for.
        let (gate, policy) = offline_gate_scoped("300s", "prefix");
        let now = unix_now();
        let session = new_session(now);
        let grant = OrderCookie {
            order_id: "O1".into(),
            verified_at: Some(now),
        };
        let cookies = [
            session::set_session(&gate.keys, &gate.cookies, &session).unwrap(),
            session::set_order(
                &gate.keys,
                &gate.cookies,
                &session.id,
                "/premium/",
                "/premium/",
                &grant,
            )
            .unwrap(),
            session::set_return_to(
                &gate.keys,
                &gate.cookies,
                &session.id,
                "/premium/",
                "/premium/",
                Some("/premium/a.html"),
            )
            .unwrap(),
        ];
        let h = cookie_header(&cookies);
        let path = normalize("/premium/").unwrap();
        let route = policy.classify(&path).unwrap();
        let client: IpAddr = "127.0.0.1".parse().unwrap();
        for round in ["full check", "remembered"] {
            let outcome = gate
                .decide(
                    now,
                    &h,
                    true,
                    None,
                    route,
                    &path,
                    client,
                    tracing::Span::none,
                )
                .await;
            let Outcome::Respond { response, .. } = outcome else {
                panic!("{round}: served instead of sent on to the page asked for");
            };
            assert_eq!(response.status(), StatusCode::SEE_OTHER, "{round}");
            assert_eq!(
                response.headers()[LOCATION],
                "http://127.0.0.1:8080/premium/a.html",
                "{round}"
            );
            assert!(gate.memo.get(&h, "/premium/").is_some(), "{round}");
        }
    }

    #[test]
    fn a_reload_carries_over_what_still_applies() {
        let gate = |recheck: &str, merchant: &str, burst: u32| {
            let limits = format!("orders_per_minute = 1\norders_burst = {burst}");
            test_gate(recheck, "page", merchant, &limits).0
        };
        let now = unix_now();
        let client: IpAddr = "192.0.2.7".parse().unwrap();
        let session = new_session(now);
        let paid = OrderCookie {
            order_id: "O1".into(),
            verified_at: Some(now),
        };
        let old = gate("300s", "http://127.0.0.1:9/", 1);
        assert!(old.limiter.try_take(client, now).is_ok());
        old.remember(&session.id, "/premium/a.html", &paid, now);

        // A new recheck interval only: both carry over.
        let same = gate("60s", "http://127.0.0.1:9/", 1).carry_over(&old);
        assert!(
            same.limiter.try_take(client, now).is_err(),
            "allowance refilled"
        );
        assert!(same.recall(&session.id, "/premium/a.html").is_some());

        // Other limits, another backend: neither does.
        let other = gate("300s", "http://127.0.0.1:10/", 2).carry_over(&old);
        assert!(other.limiter.try_take(client, now).is_ok());
        assert!(other.recall(&session.id, "/premium/a.html").is_none());
    }

    #[tokio::test]
    async fn ambiguous_or_tampered_cookies_are_not_remembered() {
        let (gate, policy) = offline_gate("300s");
        let now = unix_now();
        let session = new_session(now);
        let good = session_and_order(&gate, &session, &session.id, Some(now));
        let good = good
            .get(http::header::COOKIE)
            .unwrap()
            .to_str()
            .unwrap()
            .to_owned();
        // A second (valid) session cookie in front: which one wins could depend on the time.
        let planted = session::set_session(&gate.keys, &gate.cookies, &new_session(now)).unwrap();
        let planted = planted
            .to_str()
            .unwrap()
            .split(';')
            .next()
            .unwrap()
            .to_owned();
        let mut h = HeaderMap::new();
        h.insert(
            http::header::COOKIE,
            HeaderValue::from_str(&format!("{good}; {planted}")).unwrap(),
        );
        assert!(matches!(
            decide_for(&gate, &policy, &h).await,
            Outcome::Serve { .. }
        ));
        assert_eq!(gate.memo.get(&h, "/premium/a.html"), None);
        // One changed byte in the MAC: a miss, then the full check refuses it.
        let mut bad = good.into_bytes();
        let i = bad.iter().position(|&b| b == b'=').unwrap() + 3;
        bad[i] = if bad[i] == b'A' { b'B' } else { b'A' };
        let mut h = HeaderMap::new();
        h.insert(http::header::COOKIE, HeaderValue::from_bytes(&bad).unwrap());
        assert!(matches!(
            decide_for(&gate, &policy, &h).await,
            Outcome::Respond { .. }
        ));
        assert_eq!(gate.memo.get(&h, "/premium/a.html"), None);
    }

    #[tokio::test]
    async fn stale_or_foreign_grants_go_to_the_merchant_and_fail_closed() {
        let (gate, policy) = offline_gate("300s");
        let now = unix_now();
        let session = new_session(now);
        // Older than recheck_interval: asks the (unreachable) merchant.
        let stale = session_and_order(&gate, &session, &session.id, Some(now - 301));
        // Fresh, but bound to another session: not ours, so an order is needed.
        let foreign = session_and_order(&gate, &session, &SessionId::generate(), Some(now));
        for h in [stale, foreign] {
            match decide_for(&gate, &policy, &h).await {
                Outcome::Respond { kind, .. } => assert_eq!(kind, DenyKind::FailedClosed),
                Outcome::Serve { .. } => panic!("served without a valid grant"),
            }
        }
        // `0s` re-checks every request, even with a grant from this very second.
        let (gate, policy) = offline_gate("0s");
        let h = session_and_order(&gate, &session, &session.id, Some(now));
        assert!(matches!(
            decide_for(&gate, &policy, &h).await,
            Outcome::Respond {
                kind: DenyKind::FailedClosed,
                ..
            }
        ));
    }

    #[tokio::test]
    async fn fresh_grant_in_memory_is_served_without_the_merchant() {
        let (gate, policy) = offline_gate("300s");
        let now = unix_now();
        let session = new_session(now);
        // The cookie still holds an unpaid order; this process saw it paid a moment ago.
        let h = session_and_order(&gate, &session, &session.id, None);
        let paid = OrderCookie {
            order_id: "O1".into(),
            verified_at: Some(now),
        };
        gate.remember(&session.id, "/premium/a.html", &paid, now);
        assert!(matches!(
            decide_for(&gate, &policy, &h).await,
            Outcome::Serve { .. }
        ));
        // Another session gets nothing from it.
        let other = new_session(now);
        let h = session_and_order(&gate, &other, &other.id, None);
        assert!(matches!(
            decide_for(&gate, &policy, &h).await,
            Outcome::Respond {
                kind: DenyKind::FailedClosed,
                ..
            }
        ));
    }

    #[tokio::test]
    async fn an_aged_cookie_is_served_from_a_fresher_grant_in_memory_until_that_ages() {
        let (gate, policy) = offline_gate("300s");
        let now = unix_now();
        let session = new_session(now);
        // The cookie's grant is past the interval; a re-check by an earlier request of this
        // session renewed it in memory 10 s ago (the client kept its old cookie).
        let h = session_and_order(&gate, &session, &session.id, Some(now - 400));
        let renewed = |at: u64| OrderCookie {
            order_id: "O1".into(),
            verified_at: Some(at),
        };
        gate.remember(&session.id, "/premium/a.html", &renewed(now - 10), now - 10);
        let at = |t: u64| decide_for_at(&gate, &policy, &h, t);
        let forget = || gate.memory.lock().unwrap().clear();
        let renewal = || {
            gate.memo
                .with(&h, "/premium/a.html", |_, _, r| r.cloned())
                .flatten()
        };
        // The full check serves it from memory and remembers what the cookies hold, with the
        // grant from memory as its renewal...
        assert!(matches!(at(now).await, Outcome::Serve { .. }));
        let (s, o) = gate.memo.get(&h, "/premium/a.html").unwrap();
        assert_eq!((s, o.verified_at), (session.clone(), Some(now - 400)));
        assert_eq!(renewal(), Some(renewed(now - 10)));
        // ...which serves the next requests without the table (emptied here to show it)...
        forget();
        match at(now + 289).await {
            Outcome::Serve { order_id, .. } => assert_eq!(order_id.as_deref(), Some("O1")),
            Outcome::Respond { kind, .. } => panic!("not served: {kind:?}"),
        }
        // ...until it ages: then the merchant is asked (here unreachable, so: fail closed).
        match at(now + 291).await {
            Outcome::Respond { kind, .. } => assert_eq!(kind, DenyKind::FailedClosed),
            Outcome::Serve { .. } => panic!("an aged grant from memory was served"),
        }
        // A later re-check's grant in memory serves a remembered hit and renews it again.
        gate.remember(
            &session.id,
            "/premium/a.html",
            &renewed(now + 295),
            now + 295,
        );
        assert!(matches!(at(now + 296).await, Outcome::Serve { .. }));
        assert_eq!(renewal(), Some(renewed(now + 295)));
        forget();
        assert!(matches!(at(now + 297).await, Outcome::Serve { .. }));
        // Memory belongs to its session: the same grant does nothing for another one.
        gate.remember(&session.id, "/premium/a.html", &renewed(now), now);
        let other = new_session(now);
        let h = session_and_order(&gate, &other, &other.id, Some(now - 400));
        assert!(matches!(
            decide_for_at(&gate, &policy, &h, now).await,
            Outcome::Respond {
                kind: DenyKind::FailedClosed,
                ..
            }
        ));
    }

    #[test]
    fn picks_fresh_grants_first() {
        let c = |id: &str, v: Option<u64>| OrderCookie {
            order_id: id.into(),
            verified_at: v,
        };
        assert_eq!(
            pick(Some(c("A", None)), Some(c("B", Some(100))), 100, 300)
                .unwrap()
                .order_id,
            "B"
        );
        assert_eq!(
            pick(Some(c("A", Some(100))), Some(c("B", Some(100))), 100, 300)
                .unwrap()
                .order_id,
            "A"
        );
        assert_eq!(
            pick(Some(c("A", None)), Some(c("B", None)), 100, 300)
                .unwrap()
                .order_id,
            "A"
        );
        assert_eq!(
            pick(None, Some(c("B", None)), 100, 300).unwrap().order_id,
            "B"
        );
        assert!(pick(None, None, 100, 300).is_none());
    }
}
