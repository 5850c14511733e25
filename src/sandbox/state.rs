//! The sandbox merchant's memory: orders, claims, payments and refunds.
//!
//! Pure: no I/O, no clock, no HTTP. Every operation takes the current time (`now`, Unix
//! seconds) as an argument and answers either a value or an [`ApiError`] carrying the HTTP
//! status and GNU Taler error code a real taler-merchant-httpd would answer with. The HTTP
//! layer (`http.rs`) only turns these into responses, which keeps every protocol rule here
//! and unit-testable.
//!
//! The rules that look surprising are the real backend's, reproduced on purpose:
//! - an order paid under session A reads `claimed` when asked about session B;
//! - `already_paid_order_id` is offered only for an order with the byte-identical fulfillment
//!   URL paid under the asked session, and never for a refunded one unless asked to;
//! - a wallet that buys the same fulfillment URL again does not pay: it claims the new order
//!   and replays its old payment, which moves the old order to the new session (the backend
//!   keeps one session per contract).

use std::collections::HashMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha512};

use super::ec;
use crate::amount::{Amount, FRACTION_BASE};

/// Unix time in seconds, the granularity of Taler timestamps (`{"t_s": …}`).
pub type Secs = u64;

/// The timestamp `"never"`.
pub const NEVER: Secs = u64::MAX;

/// Pay deadline of an order that does not name one.
pub const DEFAULT_PAY_DELAY: Secs = 3600;

/// How long an unpaid order is kept after its pay deadline before it is forgotten.
pub const UNPAID_GRACE: Secs = 600;

/// Delay between the refund deadline and the wire transfer deadline when none is given.
pub const DEFAULT_WIRE_DELAY: Secs = 86_400;

/// How often (at most) a full sweep for expired orders runs during order creation.
const GC_INTERVAL: Secs = 60;

/// An error as the merchant API reports it: HTTP status plus a Taler `ErrorDetail`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status code.
    pub status: u16,
    /// The `TALER_EC_*` code.
    pub code: u32,
    /// Human-readable hint.
    pub hint: String,
    /// The offending parameter, when there is one.
    pub parameter: Option<String>,
}

impl ApiError {
    /// An error without a parameter.
    pub fn new(status: u16, code: u32, hint: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            hint: hint.into(),
            parameter: None,
        }
    }

    /// An error naming the offending parameter.
    pub fn param(status: u16, code: u32, hint: impl Into<String>, parameter: &str) -> Self {
        ApiError {
            status,
            code,
            hint: hint.into(),
            parameter: Some(parameter.to_owned()),
        }
    }

    /// The JSON `ErrorDetail` body.
    pub fn to_json(&self) -> Value {
        let mut v = json!({ "code": self.code, "hint": self.hint });
        if let (Some(p), Some(obj)) = (&self.parameter, v.as_object_mut()) {
            obj.insert("parameter".into(), Value::String(p.clone()));
        }
        v
    }
}

fn order_unknown() -> ApiError {
    ApiError::new(
        404,
        ec::MERCHANT_GENERIC_ORDER_UNKNOWN,
        "The order is not known to the backend",
    )
}

fn parse_error(hint: &str, parameter: &str) -> ApiError {
    ApiError::param(
        400,
        ec::MERCHANT_PRIVATE_POST_ORDERS_PROPOSAL_PARSE_ERROR,
        hint,
        parameter,
    )
}

/// One wallet payment of an order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Payment {
    /// The session the payment is bound to (empty: none). A replay moves it.
    pub session_id: String,
    /// The wallet that paid.
    pub wallet: String,
    /// When the wallet paid (or last replayed).
    pub paid_at: Secs,
}

/// One refund granted on an order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refund {
    /// The increase of the total refund this grant made.
    pub amount: Amount,
    /// The merchant's reason.
    pub reason: String,
    /// When it was granted.
    pub timestamp: Secs,
    /// Granted but not yet picked up by the wallet.
    pub pending: bool,
}

/// An order as the backend stores it.
#[derive(Clone, Debug)]
pub struct Order {
    /// The order id.
    pub id: String,
    seq: u64,
    request: Value,
    /// Creation time (`contract_terms.timestamp`).
    pub created: Secs,
    /// The price.
    pub amount: Amount,
    /// The summary shown to the customer.
    pub summary: String,
    /// The fulfillment URL after `${ORDER_ID}` substitution.
    pub fulfillment_url: Option<String>,
    /// The fulfillment message, for orders without a fulfillment URL.
    pub fulfillment_message: Option<String>,
    /// Where a customer goes to buy again when the order is taken.
    pub public_reorder_url: Option<String>,
    /// The claim token (`create_token`).
    pub claim_token: Option<String>,
    /// The pay deadline.
    pub pay_deadline: Secs,
    /// The refund deadline (equal to `created` when refunds are not allowed).
    pub refund_deadline: Secs,
    /// The full contract terms.
    pub contract_terms: Value,
    /// Crockford base32 of SHA-512 over the contract terms.
    pub h_contract: String,
    /// The wallet that claimed the order.
    pub claimed_by: Option<String>,
    /// The payment, once paid.
    pub payment: Option<Payment>,
    /// Refunds granted, oldest first.
    pub refunds: Vec<Refund>,
}

impl Order {
    fn sum(&self, pick: impl Fn(&Refund) -> bool) -> Amount {
        let units: u128 = self
            .refunds
            .iter()
            .filter(|r| pick(r))
            .map(|r| r.amount.units())
            .sum();
        amount_from_units(self.amount.currency(), units).unwrap_or_else(|| self.amount.clone())
    }

    /// The total refund granted so far (zero when none).
    pub fn refund_amount(&self) -> Amount {
        self.sum(|_| true)
    }

    /// The part of the refunds the wallet has picked up.
    pub fn refund_taken(&self) -> Amount {
        self.sum(|r| !r.pending)
    }

    /// Whether any refund was granted.
    pub fn refunded(&self) -> bool {
        !self.refunds.is_empty()
    }

    /// Whether a granted refund still waits for the wallet.
    pub fn refund_pending(&self) -> bool {
        self.refunds.iter().any(|r| r.pending)
    }

    /// Whether the order is paid and bound to `session` (any session when `None`).
    pub fn paid_in(&self, session: Option<&str>) -> bool {
        match (&self.payment, session) {
            (Some(_), None) => true,
            (Some(p), Some(s)) => p.session_id == s,
            (None, _) => false,
        }
    }
}

/// What `POST private/orders` answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Created {
    /// The order id.
    pub order_id: String,
    /// The claim token, if one was created.
    pub token: Option<String>,
}

/// The three variants of `GET private/orders/{id}`.
#[derive(Debug)]
pub enum PrivateView<'a> {
    /// Nobody claimed it. `already_paid` is an order with the same fulfillment URL paid
    /// under the asked session.
    Unpaid {
        /// The order.
        order: &'a Order,
        /// The repurchase candidate.
        already_paid: Option<&'a Order>,
    },
    /// Claimed but unpaid, or paid under another session.
    Claimed(&'a Order),
    /// Paid under the asked session (or no session asked).
    Paid(&'a Order),
}

/// What the public `GET orders/{id}` decides.
#[derive(Debug)]
pub enum PublicView<'a> {
    /// Payment required: show the pay URI (unpaid, or paid under another session, which
    /// lets the owning wallet replay).
    PayRequired(&'a Order),
    /// Another order with the same fulfillment URL is paid in this session.
    AlreadyPaid {
        /// The order asked about.
        order: &'a Order,
        /// The paid one.
        paid: &'a Order,
    },
    /// Paid in this session and authorised by the contract hash.
    Paid(&'a Order),
    /// Claimed and paid in this session, asked with a claim token: go to the fulfillment URL.
    GotoFulfillment(&'a Order),
    /// Taken by someone else: go to the public reorder URL.
    GotoReorder(&'a Order),
}

#[derive(Default, Debug)]
struct Instance {
    orders: HashMap<String, Order>,
}

/// All orders of all instances.
#[derive(Debug)]
pub struct Store {
    currency: String,
    max_orders: usize,
    instances: HashMap<String, Instance>,
    order_count: usize,
    next_seq: u64,
    last_gc: Secs,
    rng: StdRng,
}

impl Store {
    /// An empty store accepting `currency`, holding at most `max_orders` orders; `seed`
    /// drives id, token and nonce generation (from entropy in production, fixed in tests).
    pub fn new(currency: &str, max_orders: usize, seed: [u8; 32]) -> Self {
        Store {
            currency: currency.to_owned(),
            max_orders: max_orders.max(1),
            instances: HashMap::new(),
            order_count: 0,
            next_seq: 0,
            last_gc: 0,
            rng: StdRng::from_seed(seed),
        }
    }

    /// The currency orders must be priced in.
    pub fn currency(&self) -> &str {
        &self.currency
    }

    /// How many orders are stored.
    pub fn len(&self) -> usize {
        self.order_count
    }

    /// Whether no order is stored.
    pub fn is_empty(&self) -> bool {
        self.order_count == 0
    }

    /// Looks an order up.
    pub fn order(&self, instance: &str, id: &str) -> Option<&Order> {
        self.instances.get(instance)?.orders.get(id)
    }

    fn random_base32(&mut self, bytes: usize) -> String {
        let data: Vec<u8> = (0..bytes).map(|_| self.rng.gen()).collect();
        crockford32(&data)
    }

    /// `POST private/orders`: validates the `PostOrderRequest` like the real backend and
    /// stores the order. `merchant_base_url` is the instance's public base URL, which goes
    /// into the contract terms.
    ///
    /// # Errors
    /// 400 for malformed requests and deadlines in the past, 409 for a different order under
    /// the same id or a foreign currency, 503 when the store is full of paid orders.
    pub fn create_order(
        &mut self,
        instance: &str,
        merchant_base_url: &str,
        req: &Value,
        now: Secs,
    ) -> Result<Created, ApiError> {
        let Some(top) = req.as_object() else {
            return Err(ApiError::new(
                400,
                ec::GENERIC_JSON_INVALID,
                "The request body must be a JSON object",
            ));
        };
        let order = match top.get("order") {
            None | Some(Value::Null) => {
                return Err(ApiError::param(
                    400,
                    ec::GENERIC_PARAMETER_MISSING,
                    "The field 'order' is required",
                    "order",
                ))
            }
            Some(Value::Object(o)) => o,
            Some(_) => {
                return Err(ApiError::param(
                    400,
                    ec::GENERIC_PARAMETER_MALFORMED,
                    "'order' must be an object",
                    "order",
                ))
            }
        };
        let order_id = match order.get("order_id") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if valid_order_id(s) => Some(s.clone()),
            Some(_) => {
                return Err(ApiError::param(
                    400,
                    ec::GENERIC_PARAMETER_MALFORMED,
                    "order_id must be 1 to 127 characters of A-Z a-z 0-9 . _ ~ -",
                    "order_id",
                ))
            }
        };
        if let Some(id) = &order_id {
            if let Some(existing) = self.order(instance, id) {
                if existing.request == *req {
                    return Ok(Created {
                        order_id: existing.id.clone(),
                        token: existing.claim_token.clone(),
                    });
                }
                return Err(ApiError::param(
                    409,
                    ec::MERCHANT_PRIVATE_POST_ORDERS_ALREADY_EXISTS,
                    "A different order with this order_id already exists",
                    "order_id",
                ));
            }
        }

        let amount = match order.get("amount") {
            Some(Value::String(s)) => s
                .parse::<Amount>()
                .map_err(|e| parse_error(&format!("amount: {e}"), "amount"))?,
            None | Some(Value::Null) => {
                return Err(parse_error("the order needs an 'amount'", "amount"))
            }
            Some(_) => return Err(parse_error("'amount' must be a string", "amount")),
        };
        if amount.currency() != self.currency {
            return Err(ApiError::param(
                409,
                ec::GENERIC_CURRENCY_MISMATCH,
                format!(
                    "This backend accepts {} only, not {}",
                    self.currency,
                    amount.currency()
                ),
                "amount",
            ));
        }
        let summary = match order.get("summary") {
            Some(Value::String(s)) => s.clone(),
            None | Some(Value::Null) => {
                return Err(parse_error("the order needs a 'summary'", "summary"))
            }
            Some(_) => return Err(parse_error("'summary' must be a string", "summary")),
        };
        let fulfillment_url = opt_string(order, "fulfillment_url")?;
        let fulfillment_message = opt_string(order, "fulfillment_message")?;
        if fulfillment_url.is_none() && fulfillment_message.is_none() {
            return Err(parse_error(
                "either 'fulfillment_url' or 'fulfillment_message' must be given",
                "fulfillment_url",
            ));
        }
        let public_reorder_url = opt_string(order, "public_reorder_url")?;
        if let Some(u) = &public_reorder_url {
            if url::Url::parse(u).is_err() {
                return Err(parse_error(
                    "'public_reorder_url' is not a URL",
                    "public_reorder_url",
                ));
            }
        }
        let pay_deadline = opt_timestamp(order, "pay_deadline")?;
        let refund_deadline_given = opt_timestamp(order, "refund_deadline")?;
        let wire_deadline_given = opt_timestamp(order, "wire_transfer_deadline")?;
        let delivery_date = opt_timestamp(order, "delivery_date")?;
        let refund_delay_us = match top.get("refund_delay") {
            None | Some(Value::Null) => 0,
            Some(v) => parse_relative(v).ok_or_else(|| {
                ApiError::param(
                    400,
                    ec::GENERIC_PARAMETER_MALFORMED,
                    "refund_delay must be {\"d_us\": N} or {\"d_us\": \"forever\"}",
                    "refund_delay",
                )
            })?,
        };
        let create_token = match top.get("create_token") {
            None | Some(Value::Null) => true,
            Some(Value::Bool(b)) => *b,
            Some(_) => {
                return Err(ApiError::param(
                    400,
                    ec::GENERIC_PARAMETER_MALFORMED,
                    "create_token must be a boolean",
                    "create_token",
                ))
            }
        };
        for (key, want) in [("products", "an array"), ("extra", "an object")] {
            match (key, order.get(key)) {
                (_, None | Some(Value::Null)) => {}
                ("products", Some(Value::Array(_))) | ("extra", Some(Value::Object(_))) => {}
                _ => return Err(parse_error(&format!("'{key}' must be {want}"), key)),
            }
        }

        if let Some(d) = pay_deadline {
            if d <= now {
                return Err(ApiError::param(
                    400,
                    ec::MERCHANT_PRIVATE_POST_ORDERS_PAY_DEADLINE_IN_PAST,
                    "The pay deadline is in the past",
                    "pay_deadline",
                ));
            }
        }
        if let Some(d) = refund_deadline_given {
            if d < now {
                return Err(ApiError::param(
                    400,
                    ec::MERCHANT_PRIVATE_POST_ORDERS_REFUND_DEADLINE_IN_PAST,
                    "The refund deadline is in the past",
                    "refund_deadline",
                ));
            }
        }
        if let Some(d) = delivery_date {
            if d < now {
                return Err(ApiError::param(
                    400,
                    ec::MERCHANT_PRIVATE_POST_ORDERS_DELIVERY_DATE_IN_PAST,
                    "The delivery date is in the past",
                    "delivery_date",
                ));
            }
        }
        let pay_deadline = pay_deadline.unwrap_or(now.saturating_add(DEFAULT_PAY_DELAY));
        let refund_deadline = refund_deadline_given.unwrap_or_else(|| {
            if refund_delay_us == NEVER {
                NEVER
            } else {
                now.saturating_add(refund_delay_us.div_ceil(1_000_000))
            }
        });
        let wire_deadline = match wire_deadline_given {
            Some(w) => w,
            None if refund_deadline == NEVER => NEVER,
            None => refund_deadline
                .max(pay_deadline)
                .saturating_add(DEFAULT_WIRE_DELAY),
        };
        if wire_deadline == NEVER {
            return Err(ApiError::param(
                400,
                ec::MERCHANT_PRIVATE_POST_ORDERS_WIRE_DEADLINE_IS_NEVER,
                "A wire transfer deadline of \"never\" is not allowed",
                "wire_transfer_deadline",
            ));
        }
        if refund_deadline > wire_deadline {
            return Err(ApiError::param(
                400,
                ec::MERCHANT_PRIVATE_POST_ORDERS_REFUND_AFTER_WIRE_DEADLINE,
                "The refund deadline is after the wire transfer deadline",
                "refund_deadline",
            ));
        }

        let order_id = match order_id {
            Some(id) => id,
            None => loop {
                let id = format!("{}-{}", date_prefix(now), self.random_base32(8));
                if self.order(instance, &id).is_none() {
                    break id;
                }
            },
        };
        let fulfillment_url = fulfillment_url.map(|u| u.replace("${ORDER_ID}", &order_id));
        if let Some(u) = &fulfillment_url {
            if url::Url::parse(u).is_err() {
                return Err(parse_error(
                    "'fulfillment_url' is not an absolute URL",
                    "fulfillment_url",
                ));
            }
        }

        self.make_room(now)?;

        let claim_token = create_token.then(|| self.random_base32(16));
        let nonce = self.random_base32(32);
        let mut contract = Map::new();
        contract.insert("order_id".into(), json!(order_id));
        contract.insert("summary".into(), json!(summary));
        contract.insert("amount".into(), json!(amount.to_string()));
        contract.insert("max_fee".into(), json!(format!("{}:0", amount.currency())));
        for (key, value) in [
            ("fulfillment_url", &fulfillment_url),
            ("fulfillment_message", &fulfillment_message),
            ("public_reorder_url", &public_reorder_url),
        ] {
            if let Some(v) = value {
                contract.insert(key.into(), json!(v));
            }
        }
        for key in [
            "extra",
            "summary_i18n",
            "fulfillment_message_i18n",
            "minimum_age",
        ] {
            if let Some(v) = order.get(key).filter(|v| !v.is_null()) {
                contract.insert(key.into(), v.clone());
            }
        }
        contract.insert(
            "products".into(),
            order.get("products").cloned().unwrap_or_else(|| json!([])),
        );
        contract.insert("timestamp".into(), timestamp_json(now));
        contract.insert("pay_deadline".into(), timestamp_json(pay_deadline));
        contract.insert("refund_deadline".into(), timestamp_json(refund_deadline));
        contract.insert(
            "wire_transfer_deadline".into(),
            timestamp_json(wire_deadline),
        );
        if let Some(d) = delivery_date {
            contract.insert("delivery_date".into(), timestamp_json(d));
        }
        contract.insert("merchant_base_url".into(), json!(merchant_base_url));
        contract.insert("merchant".into(), json!({ "name": instance }));
        contract.insert(
            "merchant_pub".into(),
            json!(crockford32(&Sha512::digest(instance.as_bytes())[..32])),
        );
        contract.insert("wire_method".into(), json!("x-taler-bank"));
        contract.insert("exchanges".into(), json!([]));
        contract.insert("nonce".into(), json!(nonce));
        let contract_terms = Value::Object(contract);
        let h_contract = crockford32(&Sha512::digest(contract_terms.to_string().as_bytes()));

        let seq = self.next_seq;
        self.next_seq += 1;
        let stored = Order {
            id: order_id.clone(),
            seq,
            request: req.clone(),
            created: now,
            amount,
            summary,
            fulfillment_url,
            fulfillment_message,
            public_reorder_url,
            claim_token: claim_token.clone(),
            pay_deadline,
            refund_deadline,
            contract_terms,
            h_contract,
            claimed_by: None,
            payment: None,
            refunds: Vec::new(),
        };
        self.instances
            .entry(instance.to_owned())
            .or_default()
            .orders
            .insert(order_id.clone(), stored);
        self.order_count += 1;
        Ok(Created {
            order_id,
            token: claim_token,
        })
    }

    /// Forgets unpaid orders whose pay deadline passed more than [`UNPAID_GRACE`] ago.
    pub fn gc(&mut self, now: Secs) {
        let mut removed = 0;
        for inst in self.instances.values_mut() {
            let before = inst.orders.len();
            inst.orders.retain(|_, o| {
                o.payment.is_some() || o.pay_deadline.saturating_add(UNPAID_GRACE) >= now
            });
            removed += before - inst.orders.len();
        }
        self.order_count -= removed;
        self.instances.retain(|_, i| !i.orders.is_empty());
        self.last_gc = now;
    }

    /// Makes room for one more order: sweeps expired orders now and then, and at the cap
    /// evicts the oldest unpaid order.
    fn make_room(&mut self, now: Secs) -> Result<(), ApiError> {
        if now >= self.last_gc.saturating_add(GC_INTERVAL) {
            self.gc(now);
        }
        if self.order_count < self.max_orders {
            return Ok(());
        }
        self.gc(now);
        if self.order_count < self.max_orders {
            return Ok(());
        }
        let oldest = self
            .instances
            .iter()
            .flat_map(|(i, inst)| inst.orders.values().map(move |o| (i, o)))
            .filter(|(_, o)| o.payment.is_none())
            .min_by_key(|(_, o)| o.seq)
            .map(|(i, o)| (i.clone(), o.id.clone()));
        match oldest {
            Some((i, id)) => {
                if let Some(inst) = self.instances.get_mut(&i) {
                    if inst.orders.remove(&id).is_some() {
                        self.order_count -= 1;
                    }
                }
                Ok(())
            }
            None => Err(ApiError::new(
                503,
                ec::GENERIC_DB_STORE_FAILED,
                "The sandbox order store is full of paid orders; restart it",
            )),
        }
    }

    /// The order with the same fulfillment URL that is paid under `session`, the
    /// `already_paid_order_id` of the real backend. Refunded orders only when
    /// `allow_refunded`.
    pub fn already_paid<'a>(
        &'a self,
        instance: &str,
        order: &Order,
        session: &str,
        allow_refunded: bool,
    ) -> Option<&'a Order> {
        let url = order.fulfillment_url.as_deref()?;
        self.instances
            .get(instance)?
            .orders
            .values()
            .filter(|o| o.id != order.id && o.fulfillment_url.as_deref() == Some(url))
            .filter(|o| allow_refunded || !o.refunded())
            .filter(|o| o.payment.as_ref().is_some_and(|p| p.session_id == session))
            .max_by_key(|o| o.payment.as_ref().map(|p| (p.paid_at, o.seq)))
    }

    /// `GET private/orders/{id}`: which variant the backend answers for `session`.
    ///
    /// # Errors
    /// 404 for an unknown order.
    pub fn private_view(
        &self,
        instance: &str,
        id: &str,
        session: Option<&str>,
        allow_refunded: bool,
    ) -> Result<PrivateView<'_>, ApiError> {
        let order = self.order(instance, id).ok_or_else(order_unknown)?;
        if order.payment.is_some() {
            return Ok(if order.paid_in(session) {
                PrivateView::Paid(order)
            } else {
                PrivateView::Claimed(order)
            });
        }
        if order.claimed_by.is_some() {
            return Ok(PrivateView::Claimed(order));
        }
        let already_paid =
            session.and_then(|s| self.already_paid(instance, order, s, allow_refunded));
        Ok(PrivateView::Unpaid {
            order,
            already_paid,
        })
    }

    /// The public `GET orders/{id}` (the `order_status_url` target): authenticates by
    /// claim token (unclaimed orders) or contract hash, then decides.
    ///
    /// # Errors
    /// 404 unknown order; 403 wrong token or contract hash, or a claimed order asked about
    /// without a contract hash and without a public reorder URL.
    pub fn public_view(
        &self,
        instance: &str,
        id: &str,
        token: Option<&str>,
        h_contract: Option<&str>,
        session: Option<&str>,
    ) -> Result<PublicView<'_>, ApiError> {
        let order = self.order(instance, id).ok_or_else(order_unknown)?;
        let authorised = if let Some(h) = h_contract {
            if !constant_time_eq(h.as_bytes(), order.h_contract.as_bytes()) {
                return Err(ApiError::param(
                    403,
                    ec::MERCHANT_GET_ORDERS_ID_INVALID_CONTRACT_HASH,
                    "The contract hash does not match this order",
                    "h_contract",
                ));
            }
            true
        } else if order.claimed_by.is_none() {
            if let Some(t) = &order.claim_token {
                if !token.is_some_and(|g| constant_time_eq(g.as_bytes(), t.as_bytes())) {
                    return Err(ApiError::param(
                        403,
                        ec::MERCHANT_GET_ORDERS_ID_INVALID_TOKEN,
                        "The claim token is missing or wrong for this order",
                        "token",
                    ));
                }
            }
            true
        } else {
            false
        };
        let already = session.and_then(|s| self.already_paid(instance, order, s, false));
        if !authorised {
            if let Some(paid) = already {
                return Ok(PublicView::AlreadyPaid { order, paid });
            }
            if token.is_some() && order.paid_in(session) && order.fulfillment_url.is_some() {
                return Ok(PublicView::GotoFulfillment(order));
            }
            if order.public_reorder_url.is_some() {
                return Ok(PublicView::GotoReorder(order));
            }
            return Err(if token.is_some() {
                ApiError::param(
                    403,
                    ec::MERCHANT_GET_ORDERS_ID_INVALID_TOKEN,
                    "The order was claimed; the claim token no longer grants access",
                    "token",
                )
            } else {
                ApiError::param(
                    403,
                    ec::MERCHANT_GET_ORDERS_ID_INVALID_CONTRACT_HASH,
                    "The order was claimed; access needs the contract hash",
                    "h_contract",
                )
            });
        }
        if order.paid_in(session) {
            return Ok(PublicView::Paid(order));
        }
        if let Some(paid) = already {
            return Ok(PublicView::AlreadyPaid { order, paid });
        }
        Ok(PublicView::PayRequired(order))
    }

    /// The wallet pays order `id` under `session` (empty: none), as wallet `wallet`.
    ///
    /// Like a real wallet: if this wallet already paid a non-refunded order of this instance
    /// with the byte-identical http(s) fulfillment URL, it claims the new order and replays
    /// the old payment under `session` instead of paying. Paying an order this wallet already
    /// paid replays it too. Answers the id of the order that is now paid in `session`.
    ///
    /// # Errors
    /// 404 unknown order; 409 claimed by another wallet; 410 past the pay deadline.
    pub fn pay(
        &mut self,
        instance: &str,
        id: &str,
        session: &str,
        wallet: &str,
        now: Secs,
    ) -> Result<String, ApiError> {
        let order = self.order(instance, id).ok_or_else(order_unknown)?;
        if order.claimed_by.as_deref().is_some_and(|c| c != wallet) {
            return Err(already_claimed());
        }
        let replay_of = if order.payment.is_some() {
            Some(id.to_owned())
        } else {
            order
                .fulfillment_url
                .as_deref()
                .filter(|u| u.starts_with("http://") || u.starts_with("https://"))
                .and_then(|url| {
                    self.instances
                        .get(instance)?
                        .orders
                        .values()
                        .filter(|o| o.id != id && o.fulfillment_url.as_deref() == Some(url))
                        .filter(|o| !o.refunded())
                        .filter(|o| o.payment.as_ref().is_some_and(|p| p.wallet == wallet))
                        .max_by_key(|o| o.payment.as_ref().map(|p| (p.paid_at, o.seq)))
                        .map(|o| o.id.clone())
                })
        };
        let expired = order.pay_deadline < now;
        let Some(inst) = self.instances.get_mut(instance) else {
            return Err(order_unknown());
        };
        if let Some(old) = replay_of {
            if let Some(o) = inst.orders.get_mut(id) {
                o.claimed_by = Some(wallet.to_owned());
            }
            if let Some(p) = inst.orders.get_mut(&old).and_then(|o| o.payment.as_mut()) {
                p.session_id = session.to_owned();
                p.paid_at = now;
            }
            return Ok(old);
        }
        if expired {
            return Err(ApiError::new(
                410,
                ec::MERCHANT_POST_ORDERS_ID_PAY_OFFER_EXPIRED,
                "The offer has expired: its pay deadline passed",
            ));
        }
        let o = inst.orders.get_mut(id).ok_or_else(order_unknown)?;
        o.claimed_by = Some(wallet.to_owned());
        o.payment = Some(Payment {
            session_id: session.to_owned(),
            wallet: wallet.to_owned(),
            paid_at: now,
        });
        Ok(id.to_owned())
    }

    /// Wallet `wallet` claims order `id` (downloads the contract) without paying.
    ///
    /// # Errors
    /// 404 unknown order; 409 claimed by another wallet.
    pub fn claim(&mut self, instance: &str, id: &str, wallet: &str) -> Result<&Order, ApiError> {
        let o = self
            .instances
            .get_mut(instance)
            .and_then(|i| i.orders.get_mut(id))
            .ok_or_else(order_unknown)?;
        match &o.claimed_by {
            Some(c) if c != wallet => return Err(already_claimed()),
            Some(_) => {}
            None => o.claimed_by = Some(wallet.to_owned()),
        }
        Ok(o)
    }

    /// `POST private/orders/{id}/refund`: raises the total refund to `total`.
    ///
    /// # Errors
    /// 404 unknown; 409 unpaid (2531) or an amount below the previous total or above the
    /// price (2530); 403 refunds not allowed by the contract; 410 refund deadline passed;
    /// 400 wrong currency.
    pub fn refund(
        &mut self,
        instance: &str,
        id: &str,
        total: &Amount,
        reason: &str,
        now: Secs,
    ) -> Result<&Order, ApiError> {
        let o = self
            .instances
            .get_mut(instance)
            .and_then(|i| i.orders.get_mut(id))
            .ok_or_else(order_unknown)?;
        if o.payment.is_none() {
            return Err(ApiError::new(
                409,
                ec::MERCHANT_PRIVATE_POST_ORDERS_ID_REFUND_ORDER_UNPAID,
                "Only paid orders can be refunded",
            ));
        }
        if total.currency() != o.amount.currency() {
            return Err(ApiError::param(
                400,
                ec::GENERIC_CURRENCY_MISMATCH,
                "The refund is not in the order's currency",
                "refund",
            ));
        }
        if o.refund_deadline <= o.created {
            return Err(ApiError::new(
                403,
                ec::MERCHANT_PRIVATE_POST_ORDERS_ID_REFUND_NOT_ALLOWED_BY_CONTRACT,
                "The refund delay of this order was zero: refunds are not allowed",
            ));
        }
        if o.refund_deadline < now {
            return Err(ApiError::new(
                410,
                ec::MERCHANT_PRIVATE_POST_ORDERS_ID_REFUND_NOT_ALLOWED_BY_CONTRACT,
                "The refund deadline of this order has passed",
            ));
        }
        let current = o.refund_amount();
        if total.units() > o.amount.units() || total.units() < current.units() {
            return Err(ApiError::param(
                409,
                ec::MERCHANT_PRIVATE_POST_ORDERS_ID_REFUND_INCONSISTENT_AMOUNT,
                "The refund total may only grow and may not exceed the price paid",
                "refund",
            ));
        }
        if total.units() > current.units() {
            let delta = amount_from_units(total.currency(), total.units() - current.units())
                .ok_or_else(|| {
                    ApiError::param(
                        400,
                        ec::GENERIC_PARAMETER_MALFORMED,
                        "The refund amount is out of range",
                        "refund",
                    )
                })?;
            o.refunds.push(Refund {
                amount: delta,
                reason: reason.to_owned(),
                timestamp: now,
                pending: true,
            });
        }
        Ok(o)
    }

    /// The wallet picks up every pending refund of order `id`.
    ///
    /// # Errors
    /// 404 unknown order.
    pub fn collect_refunds(&mut self, instance: &str, id: &str) -> Result<&Order, ApiError> {
        let o = self
            .instances
            .get_mut(instance)
            .and_then(|i| i.orders.get_mut(id))
            .ok_or_else(order_unknown)?;
        for r in &mut o.refunds {
            r.pending = false;
        }
        Ok(o)
    }
}

fn already_claimed() -> ApiError {
    ApiError::new(
        409,
        ec::MERCHANT_POST_ORDERS_ID_CLAIM_ALREADY_CLAIMED,
        "Another wallet claimed this order first",
    )
}

fn opt_string(order: &Map<String, Value>, key: &str) -> Result<Option<String>, ApiError> {
    match order.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(parse_error(&format!("'{key}' must be a string"), key)),
    }
}

fn opt_timestamp(order: &Map<String, Value>, key: &str) -> Result<Option<Secs>, ApiError> {
    match order.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => parse_timestamp(v).map(Some).ok_or_else(|| {
            parse_error(
                &format!("'{key}' must be {{\"t_s\": SECONDS}} or {{\"t_s\": \"never\"}}"),
                key,
            )
        }),
    }
}

/// Parses a Taler `Timestamp`: `{"t_s": N}` or `{"t_s": "never"}`. Older forms (`t_ms`)
/// are rejected, as by a current backend.
pub fn parse_timestamp(v: &Value) -> Option<Secs> {
    let obj = v.as_object()?;
    if obj.len() != 1 {
        return None;
    }
    match obj.get("t_s")? {
        Value::String(s) if s == "never" => Some(NEVER),
        Value::Number(n) => n.as_u64().filter(|s| *s < NEVER),
        _ => None,
    }
}

/// Parses a Taler `RelativeTime` into microseconds: `{"d_us": N}` or `{"d_us": "forever"}`
/// ([`NEVER`]).
pub fn parse_relative(v: &Value) -> Option<u64> {
    let obj = v.as_object()?;
    if obj.len() != 1 {
        return None;
    }
    match obj.get("d_us")? {
        Value::String(s) if s == "forever" => Some(NEVER),
        Value::Number(n) => n.as_u64().filter(|s| *s < NEVER),
        _ => None,
    }
}

/// A Taler `Timestamp` as JSON.
pub fn timestamp_json(s: Secs) -> Value {
    if s == NEVER {
        json!({ "t_s": "never" })
    } else {
        json!({ "t_s": s })
    }
}

/// An amount from a count of 10^-8 units.
pub fn amount_from_units(currency: &str, units: u128) -> Option<Amount> {
    let base = u128::from(FRACTION_BASE);
    format!("{currency}:{}.{:08}", units / base, units % base)
        .parse()
        .ok()
}

fn valid_order_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() < 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'))
}

/// Whether `s` is a well-formed instance id.
pub fn valid_instance_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() < 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
}

/// Compares secrets without an early exit.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Crockford base32 (as GNUnet encodes hashes and keys), no padding.
pub fn crockford32(data: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
    let mut out = String::with_capacity(data.len() * 8 / 5 + 1);
    let (mut buffer, mut bits) = (0u32, 0u32);
    for &byte in data {
        buffer = (buffer << 8) | u32::from(byte);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(char::from(ALPHABET[((buffer >> bits) & 31) as usize]));
        }
        buffer &= (1 << bits) - 1;
    }
    if bits > 0 {
        out.push(char::from(ALPHABET[((buffer << (5 - bits)) & 31) as usize]));
    }
    out
}

/// `YYYY.DDD` (year and day of year, UTC), the prefix of generated order ids.
fn date_prefix(now: Secs) -> String {
    let mut days = now / 86_400;
    let mut year = 1970u64;
    loop {
        let leap =
            (year.is_multiple_of(4) && !year.is_multiple_of(100)) || year.is_multiple_of(400);
        let len = if leap { 366 } else { 365 };
        if days < len || year >= 9999 {
            break;
        }
        days -= len;
        year += 1;
    }
    format!("{year}.{:03}", days + 1)
}

#[cfg(test)]
mod tests;
