//! The GNU Taler merchant backend client: the three calls the gateway needs, their wire
//! types, and [`MerchantError`].
//!
//! - `GET config`: is it a compatible `taler-merchant`, which currencies does it take;
//! - `POST private/orders`: a new order for a resource;
//! - `GET private/orders/{id}?session_id=…`: the order's status *in this session*.
//!
//! Every call carries `Authorization: Bearer secret-token:…` (marked sensitive so it is never
//! logged by hyper), is bounded by `[merchant] timeout` from first byte sent to last byte
//! read, and reads at most [`MAX_BODY`] bytes. Answers are decoded tolerantly (unknown fields
//! are ignored, deprecated fields optional) but strictly where a decision depends on them:
//! an unknown `order_status`, a paid answer without refund information, or an unpaid answer
//! without a usable pay URI or status URL is an error, never "paid".

use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_TYPE};
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;
use serde_json::{json, Value};
use url::Url;

use crate::amount::Amount;
use crate::config::MerchantConfig;
use crate::payment::{AlreadyPaid, FailKind, Failure, OrderStatus};
use crate::session::valid_order_id;

/// Largest merchant answer read, in bytes. Contract terms are small; 1 MiB is generous.
pub const MAX_BODY: usize = 1024 * 1024;

/// Oldest merchant protocol version (libtool `current`) the gateway relies on: v19 added
/// `order_status_url` to claimed answers; earlier backends also used `t_ms` timestamps.
pub const MIN_PROTOCOL: u64 = 19;

/// `MERCHANT_GENERIC_ORDER_UNKNOWN`.
pub const EC_ORDER_UNKNOWN: i64 = 2005;
/// `MERCHANT_GENERIC_INSTANCE_UNKNOWN`.
pub const EC_INSTANCE_UNKNOWN: i64 = 2000;

/// Why a merchant call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MerchantError {
    /// No connection (refused, reset, DNS, TLS).
    #[error("merchant backend unreachable: {0}")]
    Unreachable(String),
    /// No complete answer within the configured timeout.
    #[error("merchant backend did not answer in time")]
    Timeout,
    /// A non-success status, with the Taler error code and hint if the body had them.
    #[error("merchant backend answered {status} (code {code:?}: {hint:?})")]
    Status {
        /// HTTP status.
        status: u16,
        /// `ErrorDetail.code`.
        code: Option<i64>,
        /// `ErrorDetail.hint`, for the log only.
        hint: Option<String>,
    },
    /// The answer could not be understood.
    #[error("malformed merchant answer: {0}")]
    Malformed(String),
    /// The answer was larger than [`MAX_BODY`].
    #[error("merchant answer too large")]
    TooLarge,
    /// An `order_status` this gateway does not know.
    #[error("unknown order_status {0:?}")]
    UnknownStatus(String),
}

impl MerchantError {
    /// What the error means for the payment decision.
    pub fn failure(&self) -> Failure {
        match self {
            MerchantError::Status {
                status: 404,
                code: Some(EC_ORDER_UNKNOWN),
                ..
            } => Failure::OrderUnknown,
            MerchantError::Status { status, .. } => Failure::Merchant(match *status {
                503 => FailKind::Unavailable,
                504 => FailKind::Timeout,
                500..=599 => FailKind::ServerError,
                _ => FailKind::Rejected,
            }),
            MerchantError::Unreachable(_) => Failure::Merchant(FailKind::Unreachable),
            MerchantError::Timeout => Failure::Merchant(FailKind::Timeout),
            MerchantError::Malformed(_)
            | MerchantError::TooLarge
            | MerchantError::UnknownStatus(_) => Failure::Merchant(FailKind::Malformed),
        }
    }
}

/// What `GET config` told us.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendInfo {
    /// `name`; a compatible backend says `taler-merchant`.
    pub name: String,
    /// Protocol `current` of `version` ("current:revision:age").
    pub current: u64,
    /// Protocol `age`: versions `current-age ..= current` are supported.
    pub age: u64,
    /// Accepted currencies (`currency` and the keys of `currencies`).
    pub currencies: Vec<String>,
}

impl BackendInfo {
    /// Problems that make the backend unusable for prices in `currencies`; empty if fine.
    pub fn compatibility_problems<'a>(
        &self,
        currencies: impl IntoIterator<Item = &'a str>,
    ) -> Vec<String> {
        let mut problems = Vec::new();
        if self.name != "taler-merchant" {
            problems.push(format!(
                "backend calls itself {:?}, not \"taler-merchant\"",
                self.name
            ));
        }
        if self.current < MIN_PROTOCOL {
            problems.push(format!(
                "backend speaks merchant protocol v{}, at least v{MIN_PROTOCOL} is needed",
                self.current
            ));
        }
        for c in currencies {
            if !self.currencies.iter().any(|have| have == c) {
                problems.push(format!(
                    "a price is in {c}, but the backend accepts only {}",
                    self.currencies.join(", ")
                ));
            }
        }
        problems.sort();
        problems.dedup();
        problems
    }
}

/// A new order for one resource.
#[derive(Debug, Clone)]
pub struct NewOrder<'a> {
    /// Price.
    pub amount: &'a Amount,
    /// Shown in the wallet.
    pub summary: &'a str,
    /// Canonical URL of the resource: the repurchase key and where the wallet returns.
    pub fulfillment_url: &'a str,
    /// Refund window, if refunds are offered.
    pub refund_delay: Option<Duration>,
}

impl NewOrder<'_> {
    /// The `PostOrderRequest` JSON body.
    pub fn to_json(&self) -> Value {
        let mut body = json!({
            "order": {
                "amount": self.amount.to_string(),
                "summary": self.summary,
                "fulfillment_url": self.fulfillment_url,
                "public_reorder_url": self.fulfillment_url,
            },
            "create_token": true,
        });
        if let Some(d) = self.refund_delay {
            body["refund_delay"] =
                json!({ "d_us": u64::try_from(d.as_micros()).unwrap_or(u64::MAX) });
        }
        body
    }
}

/// The merchant backend client. Cheap to share: one pooled connection set per process.
#[derive(Clone)]
pub struct MerchantClient {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    base: Url,
    auth: HeaderValue,
    timeout: Duration,
}

impl std::fmt::Debug for MerchantClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MerchantClient")
            .field("base", &self.base.as_str())
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct ErrorDetailWire {
    code: Option<i64>,
    hint: Option<String>,
}

#[derive(Deserialize)]
struct ConfigWire {
    name: String,
    version: String,
    currency: Option<String>,
    #[serde(default)]
    currencies: serde_json::Map<String, Value>,
}

#[derive(Deserialize)]
struct PostOrderWire {
    order_id: String,
}

#[derive(Deserialize)]
struct StatusWire {
    order_status: String,
    taler_pay_uri: Option<String>,
    order_status_url: Option<String>,
    already_paid_order_id: Option<String>,
    already_paid_fulfillment_url: Option<String>,
    pay_deadline: Option<Value>,
    proto_contract_terms: Option<Value>,
    refunded: Option<bool>,
    refund_pending: Option<bool>,
    refund_amount: Option<String>,
}

/// Unix seconds of a Taler `Timestamp` (`{"t_s": n}`; `"never"` is `u64::MAX`).
fn timestamp(v: &Value) -> Option<u64> {
    match v.get("t_s")? {
        Value::Number(n) => n.as_u64(),
        Value::String(s) if s == "never" => Some(u64::MAX),
        _ => None,
    }
}

fn is_http_url(s: &str) -> bool {
    Url::parse(s).is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.host_str().is_some())
        && HeaderValue::from_str(s).is_ok()
}

fn is_pay_uri(s: &str) -> bool {
    (s.starts_with("taler://pay/") || s.starts_with("taler+http://pay/"))
        && s.bytes().all(|b| b.is_ascii_graphic())
}

/// Turns a private order status answer into the gateway's [`OrderStatus`].
///
/// # Errors
/// [`MerchantError::Malformed`] or [`MerchantError::UnknownStatus`] when the decision-relevant
/// fields are missing or invalid.
pub fn decode_status(body: &[u8]) -> Result<OrderStatus, MerchantError> {
    // serde also accepts a struct as a JSON array of its fields in declaration order; a
    // status answer is an object, and nothing else may decide "paid".
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(MerchantError::Malformed(
            "order status: not a JSON object".into(),
        ));
    }
    let w: StatusWire = serde_json::from_slice(body)
        .map_err(|e| MerchantError::Malformed(format!("order status: {e}")))?;
    match w.order_status.as_str() {
        "paid" => {
            let refund_nonzero = match &w.refund_amount {
                Some(a) => !a
                    .parse::<Amount>()
                    .map_err(|e| MerchantError::Malformed(format!("refund_amount: {e}")))?
                    .is_zero(),
                None => false,
            };
            let Some(refunded) = w
                .refunded
                .or(w.refund_amount.as_ref().map(|_| refund_nonzero))
            else {
                return Err(MerchantError::Malformed(
                    "paid order without refund information".into(),
                ));
            };
            Ok(OrderStatus::Paid {
                refunded: refunded || refund_nonzero,
                refund_pending: w.refund_pending.unwrap_or(false),
                status_url: w.order_status_url.filter(|u| is_http_url(u)),
            })
        }
        "claimed" => Ok(OrderStatus::Claimed),
        "unpaid" => {
            let pay_uri = w.taler_pay_uri.filter(|u| is_pay_uri(u)).ok_or_else(|| {
                MerchantError::Malformed("unpaid order without a valid taler_pay_uri".into())
            })?;
            let status_url = w
                .order_status_url
                .filter(|u| is_http_url(u))
                .ok_or_else(|| {
                    MerchantError::Malformed("unpaid order without a valid order_status_url".into())
                })?;
            let already_paid = match (w.already_paid_order_id, w.already_paid_fulfillment_url) {
                (Some(order_id), Some(fulfillment_url)) if valid_order_id(&order_id) => {
                    Some(AlreadyPaid {
                        order_id,
                        fulfillment_url,
                    })
                }
                _ => None,
            };
            let pay_deadline = w.pay_deadline.as_ref().and_then(timestamp).or_else(|| {
                w.proto_contract_terms
                    .as_ref()
                    .and_then(|t| t.get("pay_deadline"))
                    .and_then(timestamp)
            });
            Ok(OrderStatus::Unpaid {
                pay_uri,
                status_url,
                already_paid,
                pay_deadline,
            })
        }
        other => Err(MerchantError::UnknownStatus(
            other.chars().take(64).collect(),
        )),
    }
}

/// Decodes a `GET config` answer.
///
/// # Errors
/// [`MerchantError::Malformed`] if `name` or a `current:revision:age` version is missing.
pub fn decode_config(body: &[u8]) -> Result<BackendInfo, MerchantError> {
    let w: ConfigWire = serde_json::from_slice(body)
        .map_err(|e| MerchantError::Malformed(format!("config: {e}")))?;
    let mut parts = w.version.split(':').map(str::parse::<u64>);
    let (Some(Ok(current)), Some(Ok(_rev)), Some(Ok(age))) =
        (parts.next(), parts.next(), parts.next())
    else {
        return Err(MerchantError::Malformed(format!(
            "config: version {:?}",
            w.version
        )));
    };
    let mut currencies: Vec<String> = w.currencies.keys().cloned().collect();
    if let Some(c) = w.currency {
        if !currencies.contains(&c) {
            currencies.push(c);
        }
    }
    currencies.sort();
    Ok(BackendInfo {
        name: w.name,
        current,
        age,
        currencies,
    })
}

impl MerchantClient {
    /// Builds the client. No connection is made yet.
    ///
    /// # Errors
    /// The CA file is unusable, or the token cannot be a header value.
    pub fn new(config: &MerchantConfig) -> anyhow::Result<Self> {
        let connector = crate::tls::https_connector(config.ca_file.as_deref(), config.timeout)?;
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(64)
            .build(connector);
        let mut auth = HeaderValue::from_str(&format!("Bearer {}", config.token.expose()))
            .map_err(|_| anyhow::anyhow!("merchant token is not a valid header value"))?;
        auth.set_sensitive(true);
        Ok(MerchantClient {
            client,
            base: config.url.clone(),
            auth,
            timeout: config.timeout,
        })
    }

    /// The backend base URL (instance included).
    pub fn base_url(&self) -> &Url {
        &self.base
    }

    async fn call(
        &self,
        method: Method,
        url: Url,
        body: Option<Value>,
        auth: bool,
    ) -> Result<Bytes, MerchantError> {
        let uri: Uri = url
            .as_str()
            .parse()
            .map_err(|_| MerchantError::Malformed("request URL".into()))?;
        let mut req = Request::builder().method(method).uri(uri);
        req = req.header(ACCEPT, "application/json");
        if auth {
            req = req.header(AUTHORIZATION, self.auth.clone());
        }
        let body = match body {
            Some(v) => {
                req = req.header(CONTENT_TYPE, "application/json");
                Full::new(Bytes::from(v.to_string()))
            }
            None => Full::new(Bytes::new()),
        };
        let req = req
            .body(body)
            .map_err(|e| MerchantError::Malformed(format!("request: {e}")))?;
        let exchange = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| MerchantError::Unreachable(error_chain(&e)))?;
            let status = resp.status();
            let bytes = Limited::new(resp.into_body(), MAX_BODY)
                .collect()
                .await
                .map_err(|e| {
                    if e.downcast_ref::<http_body_util::LengthLimitError>()
                        .is_some()
                    {
                        MerchantError::TooLarge
                    } else {
                        MerchantError::Unreachable(format!("reading answer: {e}"))
                    }
                })?
                .to_bytes();
            Ok::<_, MerchantError>((status, bytes))
        };
        let (status, bytes) = tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| MerchantError::Timeout)??;
        if status == StatusCode::OK {
            return Ok(bytes);
        }
        let detail: Option<ErrorDetailWire> = serde_json::from_slice(&bytes).ok();
        Err(MerchantError::Status {
            status: status.as_u16(),
            code: detail.as_ref().and_then(|d| d.code),
            hint: detail
                .and_then(|d| d.hint)
                .map(|h| h.chars().take(200).collect()),
        })
    }

    fn url(&self, path: &str) -> Result<Url, MerchantError> {
        self.base
            .join(path)
            .map_err(|_| MerchantError::Malformed(format!("cannot join {path}")))
    }

    /// `GET config`.
    ///
    /// # Errors
    /// Any [`MerchantError`].
    pub async fn config(&self) -> Result<BackendInfo, MerchantError> {
        let body = self
            .call(Method::GET, self.url("config")?, None, false)
            .await?;
        decode_config(&body)
    }

    /// `POST private/orders`; returns the new order's id.
    ///
    /// # Errors
    /// Any [`MerchantError`]; an order id we could not safely store is `Malformed`.
    pub async fn create_order(&self, order: &NewOrder<'_>) -> Result<String, MerchantError> {
        let body = self
            .call(
                Method::POST,
                self.url("private/orders")?,
                Some(order.to_json()),
                true,
            )
            .await?;
        let w: PostOrderWire = serde_json::from_slice(&body)
            .map_err(|e| MerchantError::Malformed(format!("new order: {e}")))?;
        if !valid_order_id(&w.order_id) {
            return Err(MerchantError::Malformed(
                "order_id with unexpected characters".into(),
            ));
        }
        Ok(w.order_id)
    }

    /// `GET private/orders/{order_id}?session_id={session_id}`.
    ///
    /// # Errors
    /// Any [`MerchantError`]; 404 with code 2005 means the order is unknown.
    pub async fn order_status(
        &self,
        order_id: &str,
        session_id: &str,
    ) -> Result<OrderStatus, MerchantError> {
        if !valid_order_id(order_id) {
            return Err(MerchantError::Malformed("order id".into()));
        }
        let mut url = self.url(&format!("private/orders/{order_id}"))?;
        url.query_pairs_mut().append_pair("session_id", session_id);
        let body = self.call(Method::GET, url, None, true).await?;
        decode_status(&body)
    }
}

/// The error and its sources in one line, for logs (never contains the token: it is only
/// ever in a sensitive header).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_must_be_an_object() {
        let array = br#"["paid",null,null,null,null,null,null,false,null,null]"#;
        assert!(matches!(
            decode_status(array),
            Err(MerchantError::Malformed(_))
        ));
        let spaced = b" \n{\"order_status\":\"paid\",\"refunded\":false}";
        assert!(matches!(
            decode_status(spaced),
            Ok(OrderStatus::Paid { .. })
        ));
    }

    #[test]
    fn decodes_the_three_variants_tolerantly() {
        let unpaid = br#"{"order_status":"unpaid","taler_pay_uri":"taler://pay/b.example/O/S?c=T",
            "order_status_url":"https://b.example/orders/O?token=T&session_id=S",
            "creation_time":{"t_s":1},"pay_deadline":{"t_s":99},"new_field":[1,2]}"#;
        assert_eq!(
            decode_status(unpaid).unwrap(),
            OrderStatus::Unpaid {
                pay_uri: "taler://pay/b.example/O/S?c=T".into(),
                status_url: "https://b.example/orders/O?token=T&session_id=S".into(),
                already_paid: None,
                pay_deadline: Some(99),
            }
        );
        let v25 = br#"{"order_status":"unpaid","taler_pay_uri":"taler+http://pay/b/O/S",
            "order_status_url":"http://b/orders/O","proto_contract_terms":{"pay_deadline":{"t_s":"never"}},
            "already_paid_order_id":"OLD","already_paid_fulfillment_url":"https://s/p"}"#;
        match decode_status(v25).unwrap() {
            OrderStatus::Unpaid {
                already_paid,
                pay_deadline,
                ..
            } => {
                assert_eq!(pay_deadline, Some(u64::MAX));
                assert_eq!(already_paid.unwrap().order_id, "OLD");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            decode_status(br#"{"order_status":"claimed","contract_terms":{}}"#).unwrap(),
            OrderStatus::Claimed
        );
        let paid = br#"{"order_status":"paid","refunded":false,"refund_pending":false,"refund_amount":"KUDOS:0",
            "wired":false,"contract_terms":{},"order_status_url":"https://b/orders/O"}"#;
        assert_eq!(
            decode_status(paid).unwrap(),
            OrderStatus::Paid {
                refunded: false,
                refund_pending: false,
                status_url: Some("https://b/orders/O".into())
            }
        );
    }

    #[test]
    fn refund_amount_alone_means_refunded() {
        let body = br#"{"order_status":"paid","refunded":false,"refund_amount":"KUDOS:0.1"}"#;
        assert!(matches!(
            decode_status(body).unwrap(),
            OrderStatus::Paid { refunded: true, .. }
        ));
    }

    #[test]
    fn never_paid_unless_it_says_paid() {
        let rows: &[&[u8]] = &[
            b"",
            b"null",
            b"{}",
            br#"{"order_status":"PAID","refunded":false}"#,
            br#"{"order_status":"paid "}"#,
            br#"{"order_status":"frobnicated"}"#,
            br#"{"order_status":"paid"}"#,
            br#"{"order_status":"paid","refund_amount":"bogus"}"#,
            br#"{"order_status":"unpaid","order_status_url":"https://b/o"}"#,
            br#"{"order_status":"unpaid","taler_pay_uri":"taler://pay/b/O/S","order_status_url":"javascript:alert(1)"}"#,
            br#"{"order_status":"unpaid","taler_pay_uri":"https://evil/","order_status_url":"https://b/o"}"#,
            br#"{"order_status":"unpaid","taler_pay_uri":"taler://pay/b/O/S","order_status_url":"https://b/o\r\nX: y"}"#,
        ];
        for body in rows {
            let r = decode_status(body);
            assert!(r.is_err(), "{:?} -> {r:?}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn config_and_compatibility() {
        let info = decode_config(
            br#"{"name":"taler-merchant","version":"24:0:12","currency":"KUDOS","currencies":{"KUDOS":{},"EUR":{}}}"#,
        )
        .unwrap();
        assert_eq!(info.current, 24);
        assert_eq!(info.currencies, ["EUR", "KUDOS"]);
        assert!(info.compatibility_problems(["KUDOS"]).is_empty());
        assert_eq!(info.compatibility_problems(["CHF"]).len(), 1);
        let old =
            decode_config(br#"{"name":"taler-merchant","version":"3:0:0","currency":"KUDOS"}"#)
                .unwrap();
        assert_eq!(old.compatibility_problems(["KUDOS"]).len(), 1);
        let other =
            decode_config(br#"{"name":"taler-exchange","version":"24:0:0","currency":"KUDOS"}"#)
                .unwrap();
        assert_eq!(other.compatibility_problems(["KUDOS"]).len(), 1);
        assert!(decode_config(br#"{"name":"taler-merchant","version":"x"}"#).is_err());
    }

    #[test]
    fn error_mapping() {
        let st = |status, code| MerchantError::Status {
            status,
            code,
            hint: None,
        };
        assert_eq!(st(404, Some(2005)).failure(), Failure::OrderUnknown);
        assert_eq!(
            st(404, Some(2000)).failure(),
            Failure::Merchant(FailKind::Rejected)
        );
        assert_eq!(
            st(401, None).failure(),
            Failure::Merchant(FailKind::Rejected)
        );
        assert_eq!(
            st(503, None).failure(),
            Failure::Merchant(FailKind::Unavailable)
        );
        assert_eq!(
            st(500, Some(1)).failure(),
            Failure::Merchant(FailKind::ServerError)
        );
        assert_eq!(
            MerchantError::Timeout.failure(),
            Failure::Merchant(FailKind::Timeout)
        );
        assert_eq!(
            MerchantError::UnknownStatus("x".into()).failure(),
            Failure::Merchant(FailKind::Malformed)
        );
    }

    #[test]
    fn order_body_uses_current_units() {
        let amount: Amount = "KUDOS:0.5".parse().unwrap();
        let body = NewOrder {
            amount: &amount,
            summary: "s",
            fulfillment_url: "https://s/p",
            refund_delay: Some(Duration::from_secs(2)),
        }
        .to_json();
        assert_eq!(body["order"]["amount"], "KUDOS:0.5");
        assert_eq!(body["refund_delay"]["d_us"], 2_000_000);
        assert_eq!(body["order"]["fulfillment_url"], "https://s/p");
    }
}
