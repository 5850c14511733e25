//! Counters, gauges and histograms for `GET /metrics` on the operator listener.
//!
//! One [`Metrics`] is built per process (in [`crate::gateway::serve`]) and shared, through an
//! `Arc`, by every [`crate::gateway::App`] the process builds, so reloading the configuration
//! does not reset them. Nothing here is global.
//!
//! The hot path stays cheap: every label combination is created once, at construction, and
//! kept as a handle (an `Arc` around an atomic, for counters and gauges). Counting a request
//! is an array index and one atomic add; no label value is hashed, compared or allocated per
//! request. The counters that move on every request ([`PerThread`]) keep one slot per serving
//! thread, each on its own cache lines, summed when scraped: an add to a line another core
//! wrote last waits for the line to come over, which on every request of two threads would
//! cost more than the rest of the counting. The histograms (merchant latency only) take a
//! short uncontended lock, next to a network call that costs far more.
//!
//! The output is the OpenMetrics text format, which Prometheus scrapes natively.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::{Atomic, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::merchant::MerchantError;
use crate::payment::{FailKind, Failure};

/// The content type of [`Metrics::encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// How one request ended, as counted in `taler_paywall_requests_total{outcome}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestOutcome {
    /// Unprotected, forwarded to the origin, which answered.
    Proxied,
    /// Protected and paid, forwarded to the origin, which answered.
    Paid,
    /// Protected, not paid: redirect to pay, 402, cookie check or repurchase redirect.
    PaymentRequired,
    /// Protected, the purchase was refunded.
    Refunded,
    /// Order creation refused by the per-address limit (429).
    RateLimited,
    /// The browser keeps no cookies (403).
    CookiesRequired,
    /// The merchant backend failed; the request failed closed (5xx).
    FailedClosed,
    /// A malformed or refused request (400, 413).
    BadRequest,
    /// Forwarding to the origin failed (502, 504).
    OriginError,
    /// A bug in the gateway (500).
    InternalError,
}

impl RequestOutcome {
    /// Every outcome, in label order.
    pub const ALL: [RequestOutcome; 10] = [
        RequestOutcome::Proxied,
        RequestOutcome::Paid,
        RequestOutcome::PaymentRequired,
        RequestOutcome::Refunded,
        RequestOutcome::RateLimited,
        RequestOutcome::CookiesRequired,
        RequestOutcome::FailedClosed,
        RequestOutcome::BadRequest,
        RequestOutcome::OriginError,
        RequestOutcome::InternalError,
    ];

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            RequestOutcome::Proxied => "proxied",
            RequestOutcome::Paid => "paid",
            RequestOutcome::PaymentRequired => "payment_required",
            RequestOutcome::Refunded => "refunded",
            RequestOutcome::RateLimited => "rate_limited",
            RequestOutcome::CookiesRequired => "cookies_required",
            RequestOutcome::FailedClosed => "failed_closed",
            RequestOutcome::BadRequest => "bad_request",
            RequestOutcome::OriginError => "origin_error",
            RequestOutcome::InternalError => "internal_error",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl From<crate::flow::DenyKind> for RequestOutcome {
    fn from(kind: crate::flow::DenyKind) -> Self {
        use crate::flow::DenyKind;
        match kind {
            DenyKind::PaymentRequired => RequestOutcome::PaymentRequired,
            DenyKind::Refunded => RequestOutcome::Refunded,
            DenyKind::RateLimited => RequestOutcome::RateLimited,
            DenyKind::CookiesRequired => RequestOutcome::CookiesRequired,
            DenyKind::FailedClosed => RequestOutcome::FailedClosed,
        }
    }
}

/// A merchant backend endpoint the gateway calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `GET config` (readiness).
    Config,
    /// `POST private/orders`.
    CreateOrder,
    /// `GET private/orders/{id}`.
    OrderStatus,
}

impl Endpoint {
    const ALL: [Endpoint; 3] = [
        Endpoint::Config,
        Endpoint::CreateOrder,
        Endpoint::OrderStatus,
    ];

    fn label(self) -> &'static str {
        match self {
            Endpoint::Config => "config",
            Endpoint::CreateOrder => "create_order",
            Endpoint::OrderStatus => "order_status",
        }
    }
}

/// Result labels of merchant calls, in index order.
const CALL_RESULTS: [&str; 9] = [
    "ok",
    "order_unknown",
    "error_unreachable",
    "error_timeout",
    "error_rejected",
    "error_server_error",
    "error_malformed",
    "error_unavailable",
    "error_too_many_orders",
];

fn call_result_index(err: Option<&MerchantError>) -> usize {
    match err.map(MerchantError::failure) {
        None => 0,
        Some(Failure::OrderUnknown) => 1,
        Some(Failure::Merchant(kind)) => match kind {
            FailKind::Unreachable => 2,
            FailKind::Timeout => 3,
            FailKind::Rejected => 4,
            FailKind::ServerError => 5,
            FailKind::Malformed => 6,
            FailKind::Unavailable => 7,
            FailKind::TooManyOrders => 8,
        },
    }
}

/// Where a grant that spared a merchant call came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrantSource {
    /// The signed order cookie of the browser.
    Cookie,
    /// This process's in-memory table.
    Memory,
}

/// Kinds of origin failure, as counted in `taler_paywall_origin_errors_total{kind}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OriginErrorKind {
    /// Connection refused, reset, DNS failure.
    Unreachable,
    /// The connection could not be made in time.
    ConnectTimeout,
    /// No response head in time.
    Timeout,
    /// The origin broke the exchange or answered with something unusable.
    Broken,
}

impl OriginErrorKind {
    const ALL: [OriginErrorKind; 4] = [
        OriginErrorKind::Unreachable,
        OriginErrorKind::ConnectTimeout,
        OriginErrorKind::Timeout,
        OriginErrorKind::Broken,
    ];

    fn label(self) -> &'static str {
        match self {
            OriginErrorKind::Unreachable => "unreachable",
            OriginErrorKind::ConnectTimeout => "connect_timeout",
            OriginErrorKind::Timeout => "timeout",
            OriginErrorKind::Broken => "broken",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    endpoint: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabels {
    source: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

/// Buckets of the merchant latency histogram, in seconds.
const LATENCY_BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

type HistogramFamily = Family<CallLabels, Histogram, fn() -> Histogram>;

/// Slots of a [`PerThread`] counter; serving threads beyond this many share slots.
const SLOTS: usize = 8;

/// A counter value kept in one slot per serving thread ([`crate::server::serving_thread`]),
/// for counters that move on every request. Reading it sums the slots.
#[derive(Debug, Default)]
pub struct PerThread {
    slots: [Slot; SLOTS],
}

/// One slot, alone on its pair of cache lines (x86 processors fetch lines in pairs).
#[derive(Debug, Default)]
#[repr(align(128))]
struct Slot(AtomicU64);

impl Atomic<u64> for PerThread {
    /// Adds 1; returns the calling thread's slot before the add, not the total.
    fn inc(&self) -> u64 {
        self.inc_by(1)
    }

    /// Adds `v`; returns the calling thread's slot before the add, not the total.
    fn inc_by(&self, v: u64) -> u64 {
        let slot = &self.slots[crate::server::serving_thread() % SLOTS];
        slot.0.fetch_add(v, Ordering::Relaxed)
    }

    fn get(&self) -> u64 {
        self.slots
            .iter()
            .fold(0u64, |sum, s| sum.wrapping_add(s.0.load(Ordering::Relaxed)))
    }
}

/// A counter that moves on every request (see [`PerThread`]).
type HotCounter = Counter<u64, PerThread>;

/// The process's metrics. See `docs/operations.md` for what each one means.
pub struct Metrics {
    registry: Registry,
    requests: Vec<HotCounter>,
    /// `[endpoint][result]`.
    merchant_calls: Vec<Vec<(Counter, Histogram)>>,
    orders_created: Counter,
    grant_cookie: HotCounter,
    grant_memory: HotCounter,
    origin_errors: Vec<Counter>,
    open_connections: Gauge,
    ready: Gauge,
    reload_ok: Counter,
    reload_failed: Counter,
    observe_forwarded: HotCounter,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric, with every label combination present from the start (so that
    /// rates over a series that has not moved yet are 0, not absent).
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("taler_paywall");

        let requests_family = Family::<OutcomeLabels, HotCounter>::default();
        let requests = RequestOutcome::ALL
            .iter()
            .map(|o| requests_family.get_or_create_owned(&OutcomeLabels { outcome: o.label() }))
            .collect();
        registry.register(
            "requests",
            "Requests answered, by how they ended",
            requests_family,
        );

        let calls_family = Family::<CallLabels, Counter>::default();
        let latency_family: HistogramFamily =
            Family::new_with_constructor(latency_histogram as fn() -> Histogram);
        let merchant_calls = Endpoint::ALL
            .iter()
            .map(|e| {
                CALL_RESULTS
                    .iter()
                    .map(|r| {
                        let labels = CallLabels {
                            endpoint: e.label(),
                            result: r,
                        };
                        (
                            calls_family.get_or_create_owned(&labels),
                            latency_family.get_or_create_owned(&labels),
                        )
                    })
                    .collect()
            })
            .collect();
        registry.register(
            "merchant_requests",
            "Calls to the merchant backend, by endpoint and result",
            calls_family,
        );
        registry.register(
            "merchant_request_duration_seconds",
            "Latency of calls to the merchant backend, by endpoint and result",
            latency_family,
        );

        let orders_created = Counter::default();
        registry.register(
            "orders_created",
            "Orders created at the merchant backend",
            orders_created.clone(),
        );

        let grants = Family::<SourceLabels, HotCounter>::default();
        let grant_cookie = grants.get_or_create_owned(&SourceLabels { source: "cookie" });
        let grant_memory = grants.get_or_create_owned(&SourceLabels { source: "memory" });
        registry.register(
            "grant_hits",
            "Paid requests served on a still-fresh grant, without a merchant call, by where the grant came from",
            grants,
        );

        let origin_family = Family::<KindLabels, Counter>::default();
        let origin_errors = OriginErrorKind::ALL
            .iter()
            .map(|k| origin_family.get_or_create_owned(&KindLabels { kind: k.label() }))
            .collect();
        registry.register(
            "origin_errors",
            "Failed forwards to the origin, by kind",
            origin_family,
        );

        let open_connections = Gauge::default();
        registry.register(
            "open_connections",
            "Client connections open on the public listener",
            open_connections.clone(),
        );

        let ready = Gauge::default();
        registry.register(
            "ready",
            "1 when the last readiness check passed (as GET /readyz), else 0",
            ready.clone(),
        );

        let reloads = Family::<ResultLabels, Counter>::default();
        let reload_ok = reloads.get_or_create_owned(&ResultLabels { result: "ok" });
        let reload_failed = reloads.get_or_create_owned(&ResultLabels { result: "failed" });
        registry.register(
            "config_reloads",
            "Configuration reloads (SIGHUP), by result",
            reloads,
        );

        let observe_forwarded = HotCounter::default();
        registry.register(
            "observe_forwarded",
            "Protected requests forwarded in observe mode although enforcing would have refused them",
            observe_forwarded.clone(),
        );

        Metrics {
            registry,
            requests,
            merchant_calls,
            orders_created,
            grant_cookie,
            grant_memory,
            origin_errors,
            open_connections,
            ready,
            reload_ok,
            reload_failed,
            observe_forwarded,
        }
    }

    /// Counts one finished request.
    pub fn request(&self, outcome: RequestOutcome) {
        if let Some(c) = self.requests.get(outcome.index()) {
            c.inc();
        }
    }

    /// Counts one merchant call and records its latency. `err` is `None` for success.
    pub fn merchant_call(&self, endpoint: Endpoint, err: Option<&MerchantError>, took: Duration) {
        let e = endpoint as usize;
        if let Some((count, latency)) = self
            .merchant_calls
            .get(e)
            .and_then(|row| row.get(call_result_index(err)))
        {
            count.inc();
            latency.observe(took.as_secs_f64());
        }
        if endpoint == Endpoint::CreateOrder && err.is_none() {
            self.orders_created.inc();
        }
    }

    /// Counts a paid request served from a fresh grant, without a merchant call.
    pub fn grant_hit(&self, source: GrantSource) {
        match source {
            GrantSource::Cookie => self.grant_cookie.inc(),
            GrantSource::Memory => self.grant_memory.inc(),
        };
    }

    /// Counts a failed forward to the origin.
    pub fn origin_error(&self, kind: OriginErrorKind) {
        if let Some(c) = self.origin_errors.get(kind as usize) {
            c.inc();
        }
    }

    /// The open-connections gauge, for [`crate::server::ServerOptions::open_connections`].
    pub fn open_connections(&self) -> Gauge {
        self.open_connections.clone()
    }

    /// Records the result of a readiness check.
    pub fn set_ready(&self, ready: bool) {
        self.ready.set(i64::from(ready));
    }

    /// Counts a configuration reload.
    pub fn reload(&self, ok: bool) {
        if ok {
            self.reload_ok.inc();
        } else {
            self.reload_failed.inc();
        }
    }

    /// Counts a request let through by observe mode.
    pub fn observe_forwarded(&self) {
        self.observe_forwarded.inc();
    }

    /// The whole registry in the OpenMetrics text format ([`CONTENT_TYPE`]).
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        // Writing into a `String` cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Requests counted on several serving threads add up, whatever slot each thread used.
    #[test]
    fn per_thread_counters_sum_over_threads() {
        let m = std::sync::Arc::new(Metrics::new());
        std::thread::scope(|scope| {
            for index in 0..SLOTS + 2 {
                let m = &m;
                scope.spawn(move || {
                    crate::server::enter_serving_thread(index);
                    for _ in 0..100 {
                        m.request(RequestOutcome::Proxied);
                    }
                    m.grant_hit(GrantSource::Cookie);
                });
            }
        });
        m.request(RequestOutcome::Proxied);
        let text = m.encode();
        let threads = SLOTS + 2;
        for line in [
            format!(
                "taler_paywall_requests_total{{outcome=\"proxied\"}} {}",
                threads * 100 + 1
            ),
            format!("taler_paywall_grant_hits_total{{source=\"cookie\"}} {threads}"),
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        // Each slot has its own cache lines.
        assert_eq!(std::mem::align_of::<Slot>(), 128);
    }

    #[test]
    fn every_series_is_present_from_the_start_and_counts() {
        let m = Metrics::new();
        m.request(RequestOutcome::Paid);
        m.request(RequestOutcome::Paid);
        m.merchant_call(Endpoint::CreateOrder, None, Duration::from_millis(20));
        m.merchant_call(
            Endpoint::OrderStatus,
            Some(&MerchantError::Timeout),
            Duration::from_secs(2),
        );
        m.grant_hit(GrantSource::Memory);
        m.open_connections().inc();
        let text = m.encode();
        for line in [
            "taler_paywall_requests_total{outcome=\"paid\"} 2",
            "taler_paywall_requests_total{outcome=\"origin_error\"} 0",
            "taler_paywall_merchant_requests_total{endpoint=\"create_order\",result=\"ok\"} 1",
            "taler_paywall_merchant_requests_total{endpoint=\"order_status\",result=\"error_timeout\"} 1",
            "taler_paywall_merchant_request_duration_seconds_count{endpoint=\"order_status\",result=\"error_timeout\"} 1",
            "taler_paywall_merchant_request_duration_seconds_bucket{le=\"0.025\",endpoint=\"create_order\",result=\"ok\"} 1",
            "taler_paywall_orders_created_total 1",
            "taler_paywall_grant_hits_total{source=\"memory\"} 1",
            "taler_paywall_grant_hits_total{source=\"cookie\"} 0",
            "taler_paywall_open_connections 1",
            "# EOF",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
    }
}
