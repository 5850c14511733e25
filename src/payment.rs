//! The storefront algorithm of GNU Taler design document 007, as a pure decision function.
//!
//! No I/O, no clock: [`crate::flow`] feeds in what the request carried and what the merchant
//! answered, and carries out the [`Action`] it gets back. One [`PaymentFlow`] lives for one
//! protected request:
//!
//! ```text
//! start ──(fresh grant)──────────────────────────────────▶ Serve (no merchant call)
//!   │ (order cookie)                    (no order cookie)
//!   ▼                                          │
//! CheckStatus(O) ◀──── on_created(Ok O) ◀── CreateOrder ◀─────────────┐
//!   │ on_status                                                        │
//!   ├─ paid, no refund ─────────────────────────────────▶ Serve(grant) │
//!   ├─ paid, refunded ──────────────────────────────────▶ Refunded     │
//!   ├─ claimed / unknown order / unpaid past deadline ───────────────▶─┤ (at most
//!   ├─ unpaid + already_paid for OUR fulfillment URL ───▶ FollowRepurchase   MAX_ORDERS)
//!   ├─ unpaid ──────────────────────────────────────────▶ AskToPay
//!   └─ merchant failure ────────────────────────────────▶ FailClosed
//! ```
//!
//! Decisions the design document leaves open, and how they are settled here:
//! - `claimed` (a wallet claimed the order, or it was paid under another session) makes a new
//!   order in the *same* session (as the reference blog demo does), not a new session.
//! - `already_paid_order_id` is followed only when `already_paid_fulfillment_url` is byte for
//!   byte this resource's fulfillment URL, so the gateway never redirects to a URL the
//!   merchant chose; otherwise the answer is treated as plain unpaid.
//! - A refund of any amount (`refunded`, or a non-zero `refund_amount`) ends access.
//! - An unknown order (404, code 2005) and an unpaid order past its pay deadline are replaced.
//! - At most [`MAX_ORDERS`] orders are created for one request; past that the request fails
//!   closed instead of looping.

/// Most orders one request may create before it fails closed.
pub const MAX_ORDERS: u8 = 2;

/// Seconds before the pay deadline at which an unpaid order is no longer offered: the
/// customer needs some time to pay it.
pub const DEADLINE_MARGIN_SECS: u64 = 30;

/// What the merchant said about an order, in the gateway's terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OrderStatus {
    /// Created, nobody claimed it: it can be paid.
    Unpaid {
        /// `taler://pay/…`, for the `Taler` header and the fallback page.
        pay_uri: String,
        /// The backend's status page, the redirect target for browsers.
        status_url: String,
        /// Repurchase detection: this session already paid an order with the same
        /// fulfillment URL.
        already_paid: Option<AlreadyPaid>,
        /// Unix seconds after which the order can no longer be paid, if known.
        pay_deadline: Option<u64>,
    },
    /// Claimed by a wallet but not paid, or paid under a different session.
    Claimed,
    /// Paid under the asked session.
    Paid {
        /// Any refund granted (`refunded`, or a non-zero `refund_amount`).
        refunded: bool,
        /// A granted refund the wallet has not collected yet.
        refund_pending: bool,
        /// The backend's status page, where a wallet collects refunds.
        status_url: Option<String>,
    },
}

/// The `already_paid_*` fields of an unpaid order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlreadyPaid {
    /// The order that was paid.
    pub order_id: String,
    /// Its fulfillment URL.
    pub fulfillment_url: String,
}

/// A failed merchant call, as far as the decision is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// 404 with `MERCHANT_GENERIC_ORDER_UNKNOWN` (2005): the order is gone.
    OrderUnknown,
    /// Anything else: the request fails closed with this kind.
    Merchant(FailKind),
}

/// How a request fails closed; decides the 5xx status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailKind {
    /// Connection refused, reset or DNS failure: 502.
    Unreachable,
    /// No answer in time: 504.
    Timeout,
    /// The backend refused us (401/403, unknown instance): a configuration problem, 502.
    Rejected,
    /// The backend failed (5xx): 502.
    ServerError,
    /// The answer could not be understood (bad JSON, unknown `order_status`, bad URL): 502.
    Malformed,
    /// Temporarily unavailable (503 from the backend): 503.
    Unavailable,
    /// The per-request order limit was reached (e.g. orders keep reading `claimed`): 502.
    TooManyOrders,
}

/// What the gateway must do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Forward to the origin. `order` is the order to store in the cookie with a fresh
    /// grant (`verified_at` = `now`); `None` when a still-valid grant was used.
    Serve {
        /// The paid order whose grant must be (re)written, if any.
        order: Option<String>,
    },
    /// Create a new order for the resource (`POST private/orders`).
    CreateOrder,
    /// Ask for the status of this order under the session.
    CheckStatus {
        /// The order.
        order_id: String,
    },
    /// Unpaid: send the customer to pay `order_id` (302 to the status page for browsers,
    /// 402 with the `Taler` header otherwise).
    AskToPay {
        /// The order to remember in the cookie.
        order_id: String,
        /// `taler://pay/…`.
        pay_uri: String,
        /// The backend's status page.
        status_url: String,
    },
    /// Repurchase detection: remember `order_id` and redirect to the fulfillment URL.
    FollowRepurchase {
        /// The previously paid order.
        order_id: String,
        /// The fulfillment URL (equal to this resource's).
        fulfillment_url: String,
    },
    /// The purchase was refunded: show the refund page.
    Refunded {
        /// The refunded order.
        order_id: String,
        /// The wallet has not collected the refund yet.
        pending: bool,
        /// Where the wallet collects it.
        status_url: Option<String>,
    },
    /// Do not serve; answer with a 5xx page.
    FailClosed(FailKind),
}

/// What the request brings to the decision.
#[derive(Debug, Clone)]
pub struct Visit<'a> {
    /// Unix seconds.
    pub now: u64,
    /// The resource's order in this session, from the verified cookie.
    pub order_id: Option<&'a str>,
    /// When the merchant last confirmed that order paid under this session.
    pub verified_at: Option<u64>,
    /// How long a confirmation is trusted, in seconds (0 = always ask).
    pub recheck_interval: u64,
    /// This resource's fulfillment URL.
    pub fulfillment_url: &'a str,
}

/// The decision state of one protected request.
#[derive(Debug, Clone)]
pub struct PaymentFlow {
    now: u64,
    fulfillment_url: String,
    orders_created: u8,
    current: Option<String>,
}

impl PaymentFlow {
    /// Starts the decision for a visit and returns the first action.
    pub fn start(visit: &Visit<'_>) -> (PaymentFlow, Action) {
        let mut flow = PaymentFlow {
            now: visit.now,
            fulfillment_url: visit.fulfillment_url.to_owned(),
            orders_created: 0,
            current: visit.order_id.map(str::to_owned),
        };
        let action = match (visit.order_id, visit.verified_at) {
            (Some(_), Some(at)) if grant_is_fresh(at, visit.now, visit.recheck_interval) => {
                Action::Serve { order: None }
            }
            (Some(order), _) => Action::CheckStatus {
                order_id: order.to_owned(),
            },
            (None, _) => flow.create(),
        };
        (flow, action)
    }

    fn create(&mut self) -> Action {
        if self.orders_created >= MAX_ORDERS {
            return Action::FailClosed(FailKind::TooManyOrders);
        }
        self.orders_created += 1;
        self.current = None;
        Action::CreateOrder
    }

    /// The order the flow is looking at, if any.
    pub fn current_order(&self) -> Option<&str> {
        self.current.as_deref()
    }

    /// How many orders this request created so far.
    pub fn orders_created(&self) -> u8 {
        self.orders_created
    }

    /// Feeds the result of `POST private/orders`.
    pub fn on_created(&mut self, result: Result<String, Failure>) -> Action {
        match result {
            Ok(order_id) => {
                self.current = Some(order_id.clone());
                Action::CheckStatus { order_id }
            }
            // "Order unknown" cannot be the answer to creating one.
            Err(Failure::OrderUnknown) => Action::FailClosed(FailKind::Malformed),
            Err(Failure::Merchant(kind)) => Action::FailClosed(kind),
        }
    }

    /// Feeds the result of `GET private/orders/{current}?session_id=…`.
    pub fn on_status(&mut self, result: Result<OrderStatus, Failure>) -> Action {
        let Some(order_id) = self.current.clone() else {
            return Action::FailClosed(FailKind::Malformed);
        };
        match result {
            Ok(OrderStatus::Paid {
                refunded: false, ..
            }) => Action::Serve {
                order: Some(order_id),
            },
            Ok(OrderStatus::Paid {
                refunded: true,
                refund_pending,
                status_url,
            }) => Action::Refunded {
                order_id,
                pending: refund_pending,
                status_url,
            },
            Ok(OrderStatus::Claimed) => self.create(),
            Ok(OrderStatus::Unpaid {
                already_paid: Some(paid),
                ..
            }) if paid.fulfillment_url == self.fulfillment_url && paid.order_id != order_id => {
                Action::FollowRepurchase {
                    order_id: paid.order_id,
                    fulfillment_url: paid.fulfillment_url,
                }
            }
            Ok(OrderStatus::Unpaid {
                pay_deadline: Some(deadline),
                ..
            }) if deadline <= self.now.saturating_add(DEADLINE_MARGIN_SECS) => self.create(),
            Ok(OrderStatus::Unpaid {
                pay_uri,
                status_url,
                ..
            }) => Action::AskToPay {
                order_id,
                pay_uri,
                status_url,
            },
            Err(Failure::OrderUnknown) => self.create(),
            Err(Failure::Merchant(kind)) => Action::FailClosed(kind),
        }
    }
}

/// Whether a payment confirmed at `verified_at` may still be trusted at `now`. A time in the
/// future (clock skew between replicas beyond a minute, or a forged value) is not trusted.
pub fn grant_is_fresh(verified_at: u64, now: u64, recheck_interval: u64) -> bool {
    verified_at <= now.saturating_add(60) && now.saturating_sub(verified_at) < recheck_interval
}

#[cfg(test)]
mod tests {
    use super::*;

    const FURL: &str = "https://shop.example/premium/a";

    fn visit(order: Option<&'static str>, verified_at: Option<u64>) -> Visit<'static> {
        Visit {
            now: 10_000,
            order_id: order,
            verified_at,
            recheck_interval: 300,
            fulfillment_url: FURL,
        }
    }

    fn unpaid(already: Option<(&str, &str)>, deadline: Option<u64>) -> OrderStatus {
        OrderStatus::Unpaid {
            pay_uri: "taler://pay/h/O/S?c=T".into(),
            status_url: "https://b/orders/O?token=T&session_id=S".into(),
            already_paid: already.map(|(o, u)| AlreadyPaid {
                order_id: o.into(),
                fulfillment_url: u.into(),
            }),
            pay_deadline: deadline,
        }
    }

    fn paid(refunded: bool, pending: bool) -> OrderStatus {
        OrderStatus::Paid {
            refunded,
            refund_pending: pending,
            status_url: Some("https://b/orders/O".into()),
        }
    }

    #[test]
    fn start_rows() {
        let rows: Vec<(Visit<'static>, Action)> = vec![
            (visit(None, None), Action::CreateOrder),
            (
                visit(Some("O"), None),
                Action::CheckStatus {
                    order_id: "O".into(),
                },
            ),
            (visit(Some("O"), Some(9_800)), Action::Serve { order: None }),
            (
                visit(Some("O"), Some(9_700)),
                Action::CheckStatus {
                    order_id: "O".into(),
                },
            ),
            (
                visit(Some("O"), Some(20_000)),
                Action::CheckStatus {
                    order_id: "O".into(),
                },
            ),
            (
                Visit {
                    recheck_interval: 0,
                    ..visit(Some("O"), Some(10_000))
                },
                Action::CheckStatus {
                    order_id: "O".into(),
                },
            ),
        ];
        for (i, (v, want)) in rows.into_iter().enumerate() {
            assert_eq!(PaymentFlow::start(&v).1, want, "row {i}");
        }
    }

    /// (order in cookie, merchant status answer) → action.
    #[test]
    fn status_rows() {
        let pay = Action::AskToPay {
            order_id: "O".into(),
            pay_uri: "taler://pay/h/O/S?c=T".into(),
            status_url: "https://b/orders/O?token=T&session_id=S".into(),
        };
        let rows: Vec<(Result<OrderStatus, Failure>, Action)> = vec![
            (
                Ok(paid(false, false)),
                Action::Serve {
                    order: Some("O".into()),
                },
            ),
            (
                Ok(paid(true, false)),
                Action::Refunded {
                    order_id: "O".into(),
                    pending: false,
                    status_url: Some("https://b/orders/O".into()),
                },
            ),
            (
                Ok(paid(true, true)),
                Action::Refunded {
                    order_id: "O".into(),
                    pending: true,
                    status_url: Some("https://b/orders/O".into()),
                },
            ),
            (Ok(OrderStatus::Claimed), Action::CreateOrder),
            (Ok(unpaid(None, None)), pay.clone()),
            (Ok(unpaid(None, Some(20_000))), pay.clone()),
            (Ok(unpaid(None, Some(10_020))), Action::CreateOrder),
            (Ok(unpaid(None, Some(5_000))), Action::CreateOrder),
            (
                Ok(unpaid(Some(("OLD", FURL)), None)),
                Action::FollowRepurchase {
                    order_id: "OLD".into(),
                    fulfillment_url: FURL.into(),
                },
            ),
            // Never redirect to a URL that is not this resource's own fulfillment URL.
            (
                Ok(unpaid(
                    Some(("OLD", "https://evil.example/premium/a")),
                    None,
                )),
                pay.clone(),
            ),
            (
                Ok(unpaid(
                    Some(("OLD", "https://shop.example/premium/a/")),
                    None,
                )),
                pay.clone(),
            ),
            (Ok(unpaid(Some(("O", FURL)), None)), pay),
            (Err(Failure::OrderUnknown), Action::CreateOrder),
            (
                Err(Failure::Merchant(FailKind::Timeout)),
                Action::FailClosed(FailKind::Timeout),
            ),
            (
                Err(Failure::Merchant(FailKind::Malformed)),
                Action::FailClosed(FailKind::Malformed),
            ),
        ];
        for (i, (answer, want)) in rows.into_iter().enumerate() {
            let (mut flow, first) = PaymentFlow::start(&visit(Some("O"), None));
            assert_eq!(
                first,
                Action::CheckStatus {
                    order_id: "O".into()
                }
            );
            assert_eq!(flow.on_status(answer), want, "row {i}");
        }
    }

    #[test]
    fn claimed_orders_cannot_loop() {
        let (mut flow, a) = PaymentFlow::start(&visit(None, None));
        assert_eq!(a, Action::CreateOrder);
        assert_eq!(
            flow.on_created(Ok("O1".into())),
            Action::CheckStatus {
                order_id: "O1".into()
            }
        );
        assert_eq!(
            flow.on_status(Ok(OrderStatus::Claimed)),
            Action::CreateOrder
        );
        assert_eq!(
            flow.on_created(Ok("O2".into())),
            Action::CheckStatus {
                order_id: "O2".into()
            }
        );
        assert_eq!(
            flow.on_status(Ok(OrderStatus::Claimed)),
            Action::FailClosed(FailKind::TooManyOrders)
        );
        assert_eq!(flow.orders_created(), MAX_ORDERS);
    }

    #[test]
    fn create_failures_fail_closed() {
        for (f, kind) in [
            (
                Failure::Merchant(FailKind::Unreachable),
                FailKind::Unreachable,
            ),
            (Failure::Merchant(FailKind::Rejected), FailKind::Rejected),
            (Failure::OrderUnknown, FailKind::Malformed),
        ] {
            let (mut flow, _) = PaymentFlow::start(&visit(None, None));
            assert_eq!(flow.on_created(Err(f)), Action::FailClosed(kind));
        }
    }

    #[test]
    fn status_without_order_fails_closed() {
        let (mut flow, _) = PaymentFlow::start(&visit(None, None));
        assert_eq!(
            flow.on_status(Ok(paid(false, false))),
            Action::FailClosed(FailKind::Malformed)
        );
    }

    #[test]
    fn already_paid_sequence_of_the_appendix() {
        // Cookie holds O1 (paid under S1); the browser now has S2.
        let (mut flow, a) = PaymentFlow::start(&visit(Some("O1"), None));
        assert_eq!(
            a,
            Action::CheckStatus {
                order_id: "O1".into()
            }
        );
        assert_eq!(
            flow.on_status(Ok(OrderStatus::Claimed)),
            Action::CreateOrder
        );
        assert_eq!(
            flow.on_created(Ok("O2".into())),
            Action::CheckStatus {
                order_id: "O2".into()
            }
        );
        let step = flow.on_status(Ok(OrderStatus::Unpaid {
            pay_uri: "taler://pay/h/O2/S2".into(),
            status_url: "https://b/orders/O2".into(),
            already_paid: None,
            pay_deadline: None,
        }));
        assert!(matches!(step, Action::AskToPay { ref order_id, .. } if order_id == "O2"));
        // The wallet replays O1 under S2; the browser comes back with O2 (now claimed).
        let (mut flow, _) = PaymentFlow::start(&visit(Some("O2"), None));
        assert_eq!(
            flow.on_status(Ok(OrderStatus::Claimed)),
            Action::CreateOrder
        );
        flow.on_created(Ok("O3".into()));
        assert_eq!(
            flow.on_status(Ok(unpaid(Some(("O1", FURL)), None))),
            Action::FollowRepurchase {
                order_id: "O1".into(),
                fulfillment_url: FURL.into()
            }
        );
        // Next request carries O1 and S2: paid.
        let (mut flow, _) = PaymentFlow::start(&visit(Some("O1"), None));
        assert_eq!(
            flow.on_status(Ok(paid(false, false))),
            Action::Serve {
                order: Some("O1".into())
            }
        );
    }
}
