//! The sandbox merchant through real HTTP on 127.0.0.1:0: the session table and the
//! already-paid sequence of `shared/spec/taler-protocol.md`, refunds, claim tokens and
//! contract hashes, error codes, and every injected fault.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use taler_paywall::sandbox::{CallCounts, Fault, Sandbox, SandboxOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use url::Url;

const AUTH: &str = "Bearer secret-token:sandbox";

struct Resp {
    status: u16,
    headers: HeaderMap,
    body: Bytes,
}

impl Resp {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "status {}: not JSON ({e}): {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Status and Taler error code.
    fn error(&self) -> (u16, u64) {
        (self.status, self.json()["code"].as_u64().unwrap_or(0))
    }
}

struct Harness {
    sb: Sandbox,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Harness {
    async fn start() -> Harness {
        Harness::start_with(SandboxOptions::default()).await
    }

    async fn start_with(opts: SandboxOptions) -> Harness {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let sb = Sandbox::start(listener, opts).await.unwrap();
        let client = Client::builder(TokioExecutor::new()).build_http();
        Harness { sb, client }
    }

    /// Sends to a URL on the sandbox's address (the path and query of `url` are kept).
    async fn send(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        body: Option<String>,
    ) -> Resp {
        // The public URL may carry a path prefix that a reverse proxy would strip.
        let parsed = Url::parse(url).unwrap();
        let base = self.sb.base_url();
        let path = parsed
            .path()
            .strip_prefix(base.path())
            .unwrap_or(parsed.path());
        let mut target = format!("http://{}/{}", self.sb.addr(), path.trim_start_matches('/'));
        if let Some(q) = parsed.query() {
            target.push('?');
            target.push_str(q);
        }
        let mut req = Request::builder().method(method).uri(target);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .unwrap();
        let resp = self.client.request(req).await.unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        Resp {
            status,
            headers,
            body,
        }
    }

    fn url(&self, path: &str) -> String {
        self.sb.base_url().join(path).unwrap().to_string()
    }

    async fn get(&self, path: &str) -> Resp {
        self.send(
            Method::GET,
            &self.url(path),
            &[("authorization", AUTH)],
            None,
        )
        .await
    }

    async fn post(&self, path: &str, body: Value) -> Resp {
        self.send(
            Method::POST,
            &self.url(path),
            &[
                ("authorization", AUTH),
                ("content-type", "application/json"),
            ],
            Some(body.to_string()),
        )
        .await
    }

    /// Creates an order; answers (order_id, claim token).
    async fn create(&self, body: Value) -> (String, String) {
        let r = self.post("private/orders", body).await;
        assert_eq!(r.status, 200, "{}", r.text());
        let v = r.json();
        (
            v["order_id"].as_str().unwrap().to_owned(),
            v["token"].as_str().unwrap_or_default().to_owned(),
        )
    }

    async fn create_for(&self, fulfillment_url: &str) -> (String, String) {
        self.create(order(fulfillment_url)).await
    }

    async fn status(&self, id: &str, session: Option<&str>) -> Value {
        let path = match session {
            Some(s) => format!("private/orders/{id}?session_id={s}"),
            None => format!("private/orders/{id}"),
        };
        let r = self.get(&path).await;
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()
    }

    async fn pay(&self, id: &str, session: &str) -> Resp {
        self.post(
            "sandbox/pay",
            json!({ "order_id": id, "session_id": session }),
        )
        .await
    }

    async fn paid_order(&self, id: &str, session: &str) -> String {
        let r = self.pay(id, session).await;
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()["paid_order_id"].as_str().unwrap().to_owned()
    }

    async fn public(&self, url: &str, html: bool) -> Resp {
        let accept = if html {
            "text/html"
        } else {
            "application/json"
        };
        self.send(Method::GET, url, &[("accept", accept)], None)
            .await
    }
}

fn order(fulfillment_url: &str) -> Value {
    json!({
        "order": {
            "amount": "KUDOS:1.5",
            "summary": "Premium article",
            "fulfillment_url": fulfillment_url,
            "public_reorder_url": fulfillment_url,
        },
        "refund_delay": { "d_us": 3_600_000_000u64 },
    })
}

fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[tokio::test]
async fn session_table_rows_match_the_real_backend() {
    #[derive(Clone, Copy)]
    enum Step {
        Claim,
        Pay(&'static str),
    }
    use Step::*;
    let rows: [(&str, &[Step], Option<&str>, &str); 11] = [
        ("created, nobody claimed; no session", &[], None, "unpaid"),
        (
            "created, nobody claimed; session A",
            &[],
            Some("A"),
            "unpaid",
        ),
        (
            "claimed by a wallet, unpaid; no session",
            &[Claim],
            None,
            "claimed",
        ),
        (
            "claimed by a wallet, unpaid; session A",
            &[Claim],
            Some("A"),
            "claimed",
        ),
        ("paid under A; asked A", &[Pay("A")], Some("A"), "paid"),
        ("paid under A; asked B", &[Pay("A")], Some("B"), "claimed"),
        (
            "paid under A, replayed under C; asked C",
            &[Pay("A"), Pay("C")],
            Some("C"),
            "paid",
        ),
        (
            "paid under A, replayed under C; asked B",
            &[Pay("A"), Pay("C")],
            Some("B"),
            "claimed",
        ),
        (
            "paid under A, replayed under C; asked D",
            &[Pay("A"), Pay("C")],
            Some("D"),
            "claimed",
        ),
        (
            "paid under A, replayed under C; asked A",
            &[Pay("A"), Pay("C")],
            Some("A"),
            "claimed",
        ),
        (
            "paid, no session anywhere; no session",
            &[Pay("")],
            None,
            "paid",
        ),
    ];
    let h = Harness::start().await;
    for (i, (name, steps, asked, want)) in rows.iter().enumerate() {
        let (id, token) = h.create_for(&format!("https://shop.test/row/{i}")).await;
        for step in *steps {
            let r = match step {
                Claim => h.post("sandbox/claim", json!({ "order_id": id })).await,
                Pay(s) => h.pay(&id, s).await,
            };
            assert_eq!(r.status, 200, "{name}: {}", r.text());
        }
        let v = h.status(&id, *asked).await;
        assert_eq!(v["order_status"], *want, "{name}: {v}");
        let status_url = v["order_status_url"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let session_part = asked
            .map(|s| format!("&session_id={s}"))
            .unwrap_or_default();
        match *want {
            "unpaid" => {
                let base = h.sb.base_url();
                let authority = format!("{}:{}", base.host_str().unwrap(), base.port().unwrap());
                let session = asked.unwrap_or("");
                assert_eq!(
                    v["taler_pay_uri"],
                    format!("taler+http://pay/{authority}/{id}/{session}?c={token}"),
                    "{name}"
                );
                assert_eq!(
                    status_url,
                    format!("{base}orders/{id}?token={token}{session_part}"),
                    "{name}"
                );
                for field in ["creation_time", "summary", "total_amount", "pay_deadline"] {
                    assert!(!v[field].is_null(), "{name}: {field} missing in {v}");
                }
                assert_eq!(v["total_amount"], "KUDOS:1.5");
                assert!(v.get("already_paid_order_id").is_none(), "{name}");
            }
            "claimed" => {
                assert!(
                    v.get("taler_pay_uri").is_none(),
                    "{name}: a claimed order has no pay URI"
                );
                assert_eq!(v["contract_terms"]["order_id"], *id, "{name}");
                assert!(status_url.contains("h_contract="), "{name}: {status_url}");
                assert!(status_url.ends_with(&session_part), "{name}: {status_url}");
            }
            _ => {
                for field in [
                    "refunded",
                    "refund_pending",
                    "refund_amount",
                    "wired",
                    "deposit_total",
                    "contract_terms",
                    "last_payment",
                    "refund_details",
                    "order_status_url",
                ] {
                    assert!(!v[field].is_null(), "{name}: {field} missing in {v}");
                }
                assert_eq!(v["refunded"], false);
                assert_eq!(v["refund_amount"], "KUDOS:0");
                assert!(status_url.contains("h_contract="), "{name}: {status_url}");
            }
        }
    }
    h.sb.shutdown().await;
}

#[tokio::test]
async fn already_paid_sequence_of_the_appendix() {
    let h = Harness::start().await;
    let u = "https://shop.test/premium/article";
    // O1 paid under S1.
    let (o1, _) = h.create_for(u).await;
    assert_eq!(h.paid_order(&o1, "S1").await, o1);
    assert_eq!(h.status(&o1, Some("S1")).await["order_status"], "paid");
    // A new browser session S2 sees O1 as claimed.
    assert_eq!(h.status(&o1, Some("S2")).await["order_status"], "claimed");
    // New order O2 for the same URL: unpaid, and nothing paid under S2 yet.
    let (o2, _) = h.create_for(u).await;
    let v = h.status(&o2, Some("S2")).await;
    assert_eq!(v["order_status"], "unpaid");
    assert!(v.get("already_paid_order_id").is_none(), "{v}");
    let o2_page = v["order_status_url"].as_str().unwrap().to_owned();
    // The wallet sees the same fulfillment URL and replays O1 under S2.
    assert_eq!(h.paid_order(&o2, "S2").await, o1);
    assert_eq!(h.status(&o2, Some("S2")).await["order_status"], "claimed");
    // The backend page (still carrying O2's claim token) now points at O1.
    let r = h.public(&o2_page, false).await;
    assert_eq!(r.status, 402, "{}", r.text());
    assert_eq!(r.json()["already_paid_order_id"], o1.as_str());
    assert_eq!(r.json()["fulfillment_url"], u);
    let r = h.public(&o2_page, true).await;
    assert_eq!(r.status, 302);
    assert_eq!(r.header("location"), Some(u));
    // The gateway makes O3 for S2: unpaid, offering O1.
    let (o3, _) = h.create_for(u).await;
    let v = h.status(&o3, Some("S2")).await;
    assert_eq!(v["order_status"], "unpaid");
    assert_eq!(v["already_paid_order_id"], o1.as_str());
    assert_eq!(v["already_paid_fulfillment_url"], u);
    // O1 is now paid under S2 (and only there: one session per contract).
    assert_eq!(h.status(&o1, Some("S2")).await["order_status"], "paid");
    assert_eq!(h.status(&o1, Some("S1")).await["order_status"], "claimed");
    // Another URL, or another session, is not offered O1.
    let (other, _) = h.create_for("https://shop.test/premium/article/").await;
    assert!(h
        .status(&other, Some("S2"))
        .await
        .get("already_paid_order_id")
        .is_none());
    assert!(h
        .status(&o3, Some("S9"))
        .await
        .get("already_paid_order_id")
        .is_none());
    h.sb.shutdown().await;
}

#[tokio::test]
async fn refund_is_pending_until_the_wallet_collects() {
    let h = Harness::start().await;
    let u = "https://shop.test/refund/me";
    let (id, _) = h.create_for(u).await;
    h.paid_order(&id, "S").await;
    let r = h
        .post(
            &format!("private/orders/{id}/refund"),
            json!({ "refund": "KUDOS:0.4", "reason": "sorry" }),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let refund = r.json();
    let base = h.sb.base_url();
    let authority = format!("{}:{}", base.host_str().unwrap(), base.port().unwrap());
    assert_eq!(
        refund["taler_refund_uri"],
        format!("taler+http://refund/{authority}/{id}/")
    );
    let v = h.status(&id, Some("S")).await;
    assert_eq!(v["order_status"], "paid");
    assert_eq!(v["refunded"], true);
    assert_eq!(v["refund_pending"], true);
    assert_eq!(v["refund_amount"], "KUDOS:0.4");
    assert_eq!(v["refund_details"][0]["pending"], true);
    assert_eq!(v["refund_details"][0]["reason"], "sorry");
    let page = v["order_status_url"].as_str().unwrap().to_owned();
    assert!(page.contains(&format!(
        "h_contract={}",
        refund["h_contract"].as_str().unwrap()
    )));
    let r = h.public(&page, false).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["refund_pending"], true);
    assert_eq!(r.json()["refund_taken"], "KUDOS:0");
    // The HTML page offers the wallet's "Collect refund" button, a plain form.
    let r = h.public(&page, true).await;
    assert_eq!(r.status, 200);
    assert!(r.text().contains("Collect refund"), "{}", r.text());
    assert!(r.text().contains("sandbox/collect-refund-form"));
    let r = h
        .send(
            Method::POST,
            &h.url("sandbox/collect-refund-form"),
            &[("content-type", "application/x-www-form-urlencoded")],
            Some(format!("order_id={id}")),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = h.status(&id, Some("S")).await;
    assert_eq!(v["refund_pending"], false);
    assert_eq!(v["refunded"], true);
    assert_eq!(
        h.public(&page, false).await.json()["refund_taken"],
        "KUDOS:0.4"
    );
    // A second, larger refund; collected through the JSON endpoint.
    let r = h
        .post(
            &format!("private/orders/{id}/refund"),
            json!({ "refund": "KUDOS:1.5", "reason": "all of it" }),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(h.status(&id, Some("S")).await["refund_pending"], true);
    let r = h
        .post("sandbox/collect-refund", json!({ "order_id": id }))
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["refund_taken"], "KUDOS:1.5");
    assert_eq!(h.status(&id, Some("S")).await["refund_pending"], false);
    // A refunded order is not offered for repurchase, unless asked for.
    let (again, _) = h.create_for(u).await;
    assert!(h
        .status(&again, Some("S"))
        .await
        .get("already_paid_order_id")
        .is_none());
    let v = h
        .get(&format!(
            "private/orders/{again}?session_id=S&allow_refunded_for_repurchase=YES"
        ))
        .await
        .json();
    assert_eq!(v["already_paid_order_id"], id.as_str());
    h.sb.shutdown().await;
}

#[tokio::test]
async fn refund_errors_have_the_real_codes() {
    let h = Harness::start().await;
    let (unpaid, _) = h.create_for("https://shop.test/r/unpaid").await;
    let (paid, _) = h.create_for("https://shop.test/r/paid").await;
    h.paid_order(&paid, "S").await;
    let (no_refunds, _) = h
        .create(json!({ "order": { "amount": "KUDOS:1", "summary": "s",
                                   "fulfillment_url": "https://shop.test/r/none" } }))
        .await;
    h.paid_order(&no_refunds, "S").await;
    let refund = |amount: &str| json!({ "refund": amount, "reason": "r" });
    let rows: [(&str, Value, u16, u64); 7] = [
        (unpaid.as_str(), refund("KUDOS:1"), 409, 2531),
        (paid.as_str(), refund("KUDOS:1.51"), 409, 2530),
        (paid.as_str(), refund("EUR:1"), 400, 30),
        (no_refunds.as_str(), refund("KUDOS:1"), 403, 2532),
        ("no-such-order", refund("KUDOS:1"), 404, 2005),
        (paid.as_str(), json!({ "reason": "r" }), 400, 25),
        (
            paid.as_str(),
            json!({ "refund": "1.5", "reason": "r" }),
            400,
            26,
        ),
    ];
    for (id, body, status, code) in rows {
        let r = h
            .post(&format!("private/orders/{id}/refund"), body.clone())
            .await;
        assert_eq!(r.error(), (status, code), "{id} {body}: {}", r.text());
    }
    let r = h
        .send(
            Method::POST,
            &h.url(&format!("private/orders/{paid}/refund")),
            &[("authorization", AUTH)],
            Some("{not json".into()),
        )
        .await;
    assert_eq!(r.error(), (400, 22));
    // Past the refund deadline (one hour after the payment here).
    h.sb.advance_clock(Duration::from_secs(7200));
    let r = h
        .post(&format!("private/orders/{paid}/refund"), refund("KUDOS:1"))
        .await;
    assert_eq!(r.status, 410, "{}", r.text());
    h.sb.shutdown().await;
}

#[tokio::test]
async fn public_order_page_checks_claim_tokens_and_contract_hashes() {
    let h = Harness::start().await;
    let u = "https://shop.test/public/a";
    let (id, token) = h.create_for(u).await;
    let v = h.status(&id, Some("S")).await;
    let pay_uri = v["taler_pay_uri"].as_str().unwrap().to_owned();
    let page = v["order_status_url"].as_str().unwrap().to_owned();
    let public = |q: &str| h.url(&format!("orders/{id}{q}"));

    // Claim token checks while unclaimed.
    for (q, want) in [
        (String::new(), (403, 2105)),
        ("?token=WRONG&session_id=S".to_owned(), (403, 2105)),
        ("?h_contract=WRONG&session_id=S".to_owned(), (403, 2106)),
    ] {
        let r = h.public(&public(&q), false).await;
        assert_eq!(r.error(), want, "{q}");
    }
    let r = h.public(&page, false).await;
    assert_eq!(r.status, 402);
    assert_eq!(r.json()["taler_pay_uri"], pay_uri.as_str());
    assert_eq!(r.json()["fulfillment_url"], u);
    assert_eq!(r.header("taler"), Some(pay_uri.as_str()));

    // The HTML page: link, inline QR code, a no-JS pay button, the Taler header.
    let r = h.public(&page, true).await;
    assert_eq!(r.status, 402);
    assert!(r.header("content-type").unwrap().starts_with("text/html"));
    assert_eq!(r.header("taler"), Some(pay_uri.as_str()));
    let html = r.text();
    let escaped_uri = pay_uri.replace('&', "&amp;");
    assert!(html.contains(&format!("href=\"{escaped_uri}\"")), "{html}");
    assert!(html.contains("<svg"), "QR code missing");
    assert!(html.contains("Pay with the sandbox wallet"));
    assert!(html.contains("<form method=\"post\""));
    assert!(!html.contains("<script"), "must work without JavaScript");
    assert!(!html.contains(" src="), "no external resources");
    assert!(html.contains("SANDBOX"));

    // The button pays under the page's session and sends the browser to the fulfillment URL.
    let r = h
        .send(
            Method::POST,
            &h.url("sandbox/pay-form"),
            &[("content-type", "application/x-www-form-urlencoded")],
            Some(format!("order_id={id}&session_id=S")),
        )
        .await;
    assert_eq!(r.status, 303, "{}", r.text());
    assert_eq!(r.header("location"), Some(u));
    assert_eq!(h.status(&id, Some("S")).await["order_status"], "paid");

    // Once claimed, the contract hash authenticates.
    let paid_page = h.status(&id, Some("S")).await["order_status_url"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = h.public(&paid_page, false).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["refunded"], false);
    assert_eq!(r.json()["fulfillment_url"], u);
    let r = h.public(&paid_page, true).await;
    assert_eq!((r.status, r.header("location")), (302, Some(u)));
    // Same contract, another session: payment required again (the wallet may replay).
    let other = paid_page.replace("session_id=S", "session_id=T");
    let r = h.public(&other, false).await;
    assert_eq!(r.status, 402);
    assert!(r.json()["taler_pay_uri"]
        .as_str()
        .unwrap()
        .contains(&format!("/{id}/T")));
    // The claim token no longer authenticates: redirect-style answers.
    let r = h.public(&page, false).await;
    assert_eq!(r.status, 202, "{}", r.text());
    assert_eq!(r.json()["fulfillment_url"], u);
    let r = h
        .public(&public(&format!("?token={token}&session_id=T")), false)
        .await;
    assert_eq!(r.status, 202);
    assert_eq!(r.json()["public_reorder_url"], u);
    let r = h
        .public(&public(&format!("?token={token}&session_id=T")), true)
        .await;
    assert_eq!((r.status, r.header("location")), (302, Some(u)));

    // Claimed by another wallet, without a public reorder URL: 403.
    let (bare, bare_token) = h
        .create(json!({ "order": { "amount": "KUDOS:1", "summary": "s",
                                   "fulfillment_url": "https://shop.test/public/bare" } }))
        .await;
    let r = h.post("sandbox/claim", json!({ "order_id": bare })).await;
    assert_eq!(r.status, 200);
    let r = h
        .public(
            &h.url(&format!("orders/{bare}?token={bare_token}&session_id=S")),
            false,
        )
        .await;
    assert_eq!(r.error(), (403, 2105));
    // And the default wallet can no longer pay it, neither through the page's button.
    assert_eq!(h.pay(&bare, "S").await.error(), (409, 2301));
    let r = h
        .send(
            Method::POST,
            &h.url("sandbox/pay-form"),
            &[("content-type", "application/x-www-form-urlencoded")],
            Some(format!("order_id={bare}&session_id=S")),
        )
        .await;
    assert_eq!(r.status, 409);
    assert!(r.text().contains("2301"));

    let r = h
        .public(&public("?token=x").replace(&id, "nope"), false)
        .await;
    assert_eq!(r.error(), (404, 2005));
    h.sb.shutdown().await;
}

#[tokio::test]
async fn order_creation_is_validated_like_the_backend() {
    let h = Harness::start().await;
    let past = now_s() - 10;
    let rows: [(&str, String, u16, u64); 10] = [
        ("malformed JSON", "{\"order\":".into(), 400, 22),
        ("not an object", "[1,2]".into(), 400, 22),
        ("no order", "{}".into(), 400, 25),
        (
            "bad amount",
            order_with("amount", json!("KUDOS:one")),
            400,
            2502,
        ),
        (
            "foreign currency",
            order_with("amount", json!("EUR:1")),
            409,
            30,
        ),
        ("no summary", order_with("summary", Value::Null), 400, 2502),
        (
            "no fulfillment",
            json!({"order": {"amount": "KUDOS:1", "summary": "s"}}).to_string(),
            400,
            2502,
        ),
        (
            "pay deadline in the past",
            order_with("pay_deadline", json!({"t_s": past})),
            400,
            2507,
        ),
        (
            "old timestamp form",
            order_with("pay_deadline", json!({"t_ms": past * 1000})),
            400,
            2502,
        ),
        (
            "huge body",
            format!("{{\"pad\":\"{}\"}}", "x".repeat(100_000)),
            413,
            32,
        ),
    ];
    for (name, body, status, code) in rows {
        let r = h
            .send(
                Method::POST,
                &h.url("private/orders"),
                &[("authorization", AUTH)],
                Some(body),
            )
            .await;
        assert_eq!(r.error(), (status, code), "{name}: {}", r.text());
    }

    // ${ORDER_ID} is substituted into the fulfillment URL; order ids are high-entropy.
    let (id, token) = h
        .create_for("https://shop.test/thanks?order=${ORDER_ID}")
        .await;
    assert!(id.len() >= 20, "{id}");
    assert!(token.len() >= 20, "{token}");
    let v = h.status(&id, None).await;
    h.paid_order(&id, "").await;
    let v2 = h.status(&id, None).await;
    assert_eq!(v["order_status"], "unpaid");
    assert_eq!(
        v2["contract_terms"]["fulfillment_url"],
        format!("https://shop.test/thanks?order={id}")
    );

    // A given order_id is idempotent for the same proposal and conflicts otherwise.
    let mut fixed = order("https://shop.test/fixed");
    fixed["order"]["order_id"] = json!("fixed-42");
    let first = h.create(fixed.clone()).await;
    assert_eq!(first.0, "fixed-42");
    assert_eq!(h.create(fixed.clone()).await, first);
    fixed["order"]["amount"] = json!("KUDOS:2");
    assert_eq!(h.post("private/orders", fixed).await.error(), (409, 2503));

    // create_token=false: no token, and the public page needs none.
    let mut tokenless = order("https://shop.test/tokenless");
    tokenless["create_token"] = json!(false);
    let r = h.post("private/orders", tokenless).await;
    assert_eq!(r.status, 200);
    assert!(r.json().get("token").is_none());
    let id = r.json()["order_id"].as_str().unwrap().to_owned();
    let v = h.status(&id, Some("S")).await;
    assert!(!v["taler_pay_uri"].as_str().unwrap().contains("?c="));
    assert!(!v["order_status_url"].as_str().unwrap().contains("token="));
    assert_eq!(
        h.public(v["order_status_url"].as_str().unwrap(), false)
            .await
            .status,
        402
    );
    h.sb.shutdown().await;
}

fn order_with(key: &str, value: Value) -> String {
    let mut o = order("https://shop.test/x");
    o["order"][key] = value;
    o.to_string()
}

/// (case, method, path, Authorization header, expected status, expected Taler code).
type AuthRow<'a> = (&'a str, Method, &'a str, Option<&'a str>, u16, u64);

#[tokio::test]
async fn authentication_and_unknown_things_use_the_real_codes() {
    let h = Harness::start_with(SandboxOptions {
        instances: Some(vec!["default".into(), "shop".into()]),
        token: "sandbox".into(), // the prefix is optional
        ..SandboxOptions::default()
    })
    .await;
    let (id, _) = h.create_for("https://shop.test/auth").await;
    let order_path = format!("private/orders/{id}");
    let rows: [AuthRow<'_>; 11] = [
        ("no token", Method::GET, &order_path, None, 401, 40),
        (
            "wrong token",
            Method::GET,
            &order_path,
            Some("Bearer secret-token:nope"),
            401,
            40,
        ),
        (
            "token without the prefix",
            Method::GET,
            &order_path,
            Some("Bearer sandbox"),
            401,
            40,
        ),
        (
            "not bearer",
            Method::GET,
            &order_path,
            Some("Basic c2FuZGJveA=="),
            401,
            40,
        ),
        (
            "no token on create",
            Method::POST,
            "private/orders",
            None,
            401,
            40,
        ),
        (
            "unknown order",
            Method::GET,
            "private/orders/nope",
            Some(AUTH),
            404,
            2005,
        ),
        (
            "unknown instance",
            Method::GET,
            "instances/nope/private/orders/x",
            Some(AUTH),
            404,
            2000,
        ),
        (
            "unknown instance config",
            Method::GET,
            "instances/nope/config",
            None,
            404,
            2000,
        ),
        (
            "malformed instance",
            Method::GET,
            "instances/%20/config",
            None,
            404,
            2000,
        ),
        (
            "unknown endpoint",
            Method::GET,
            "private/nothing",
            Some(AUTH),
            404,
            21,
        ),
        ("wrong method", Method::DELETE, "config", None, 405, 20),
    ];
    for (name, method, path, auth, status, code) in rows {
        let headers: Vec<(&str, &str)> = auth.map(|a| ("authorization", a)).into_iter().collect();
        let r = h.send(method, &h.url(path), &headers, None).await;
        assert_eq!(r.error(), (status, code), "{name}: {}", r.text());
    }
    let r = h.send(Method::GET, &h.url(&order_path), &[], None).await;
    assert!(r.header("www-authenticate").is_some());
    assert_eq!(h.get(&order_path).await.status, 200);
    // Wallet endpoints reject malformed bodies too.
    let r = h.post("sandbox/pay", json!({ "session_id": "S" })).await;
    assert_eq!(r.error(), (400, 25));
    let r = h.post("sandbox/pay", json!({ "order_id": 7 })).await;
    assert_eq!(r.error(), (400, 26));
    h.sb.shutdown().await;
}

#[tokio::test]
async fn config_describes_a_taler_merchant() {
    let h = Harness::start().await;
    let r = h.send(Method::GET, &h.url("config"), &[], None).await;
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(v["name"], "taler-merchant");
    let version: Vec<u64> = v["version"]
        .as_str()
        .unwrap()
        .split(':')
        .map(|p| p.parse().unwrap())
        .collect();
    assert_eq!(version.len(), 3);
    assert!(version[0] >= 20 && version[2] <= version[0], "{version:?}");
    assert_eq!(v["currency"], "KUDOS");
    assert!(v["currencies"]["KUDOS"].is_object());
    assert!(v["exchanges"].is_array());
    // The same under an instance path.
    let r = h
        .send(Method::GET, &h.url("instances/shop/config"), &[], None)
        .await;
    assert_eq!(r.json()["name"], "taler-merchant");
    h.sb.shutdown().await;
}

#[tokio::test]
async fn named_instances_and_public_urls_shape_the_uris() {
    let h = Harness::start().await;
    let shop = h.sb.instance_url("shop");
    assert!(shop.as_str().ends_with("/instances/shop/"));
    let r = h
        .post(
            &format!("{shop}private/orders"),
            order("https://shop.test/i"),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let (id, token) = (
        r.json()["order_id"].as_str().unwrap().to_owned(),
        r.json()["token"].as_str().unwrap().to_owned(),
    );
    let v = h
        .get(&format!("{shop}private/orders/{id}?session_id=S"))
        .await
        .json();
    let authority = format!("127.0.0.1:{}", h.sb.addr().port());
    assert_eq!(
        v["taler_pay_uri"],
        format!("taler+http://pay/{authority}/instances/shop/{id}/S?c={token}")
    );
    assert_eq!(
        v["order_status_url"],
        format!("{shop}orders/{id}?token={token}&session_id=S")
    );
    assert_eq!(v.get("already_paid_order_id"), None);
    // Orders belong to their instance.
    assert_eq!(
        h.get(&format!("private/orders/{id}")).await.error(),
        (404, 2005)
    );
    // Wallet endpoints live under each instance too.
    let r = h
        .post(
            &format!("{shop}sandbox/pay"),
            json!({ "order_id": id, "session_id": "S" }),
        )
        .await;
    assert_eq!(r.json()["paid_order_id"], id.as_str());
    h.sb.shutdown().await;

    // A public https URL with a path prefix.
    let h = Harness::start_with(SandboxOptions {
        public_url: Some(Url::parse("https://pay.example/backend").unwrap()),
        ..SandboxOptions::default()
    })
    .await;
    assert_eq!(h.sb.base_url().as_str(), "https://pay.example/backend/");
    let (id, token) = h.create_for("https://shop.test/p").await;
    let v = h.status(&id, Some("S 1")).await;
    assert_eq!(
        v["taler_pay_uri"],
        format!("taler://pay/pay.example/backend/{id}/S%201?c={token}")
    );
    assert_eq!(
        v["order_status_url"],
        format!("https://pay.example/backend/orders/{id}?token={token}&session_id=S+1")
    );
    h.sb.shutdown().await;
}

#[tokio::test]
async fn deadlines_and_claims_limit_who_can_pay() {
    let h = Harness::start().await;
    let mut soon = order("https://shop.test/soon");
    soon["order"]["pay_deadline"] = json!({ "t_s": now_s() + 60 });
    let (late, _) = h.create(soon).await;
    h.sb.advance_clock(Duration::from_secs(120));
    assert_eq!(h.pay(&late, "S").await.error(), (410, 2161));
    assert_eq!(h.status(&late, Some("S")).await["order_status"], "unpaid");
    // Claimed by another wallet: claimed, and unpayable by ours.
    let (taken, _) = h.create_for("https://shop.test/taken").await;
    let r = h
        .post(
            "sandbox/claim",
            json!({ "order_id": taken, "wallet": "eve" }),
        )
        .await;
    assert_eq!(r.status, 200);
    assert!(r.json()["h_contract"].is_string());
    assert_eq!(h.status(&taken, Some("S")).await["order_status"], "claimed");
    assert_eq!(h.pay(&taken, "S").await.error(), (409, 2301));
    let r = h
        .post(
            "sandbox/pay",
            json!({ "order_id": taken, "session_id": "S", "wallet": "eve" }),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(h.pay("nope", "S").await.error(), (404, 2005));
    h.sb.shutdown().await;
}

#[tokio::test]
async fn long_polling_answers_when_the_order_is_paid() {
    let h = Harness::start().await;
    let (id, _) = h.create_for("https://shop.test/lp").await;
    // Nothing happens: the answer comes after about timeout_ms, still unpaid.
    let t = Instant::now();
    let v = h
        .get(&format!("private/orders/{id}?session_id=S&timeout_ms=300"))
        .await
        .json();
    assert_eq!(v["order_status"], "unpaid");
    assert!(
        t.elapsed() >= Duration::from_millis(250),
        "{:?}",
        t.elapsed()
    );
    // A payment during the poll ends it early.
    let t = Instant::now();
    let lp_path = format!("private/orders/{id}?session_id=S&timeout_ms=20000");
    let poll = h.get(&lp_path);
    let pay = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        h.paid_order(&id, "S").await
    };
    let (r, _) = tokio::join!(poll, pay);
    assert_eq!(r.json()["order_status"], "paid");
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    let r = h.get(&format!("private/orders/{id}?timeout_ms=soon")).await;
    assert_eq!(r.error(), (400, 26));
    // Shutdown does not wait for a pending long poll to time out.
    let (other, _) = h.create_for("https://shop.test/lp2").await;
    let request = format!(
        "GET /private/orders/{other}?timeout_ms=30000 HTTP/1.1\r\nHost: x\r\nAuthorization: {AUTH}\r\n\r\n"
    );
    let addr = h.sb.addr();
    let pending = tokio::spawn(async move { raw_exchange(addr, &request).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t = Instant::now();
    h.sb.shutdown().await;
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    let answer = pending.await.unwrap();
    assert!(
        answer.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
}

/// Sends a raw request and reads until the server closes; answers what it sent back.
async fn raw_exchange(addr: std::net::SocketAddr, request: &str) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    out
}

#[tokio::test]
async fn each_fault_breaks_only_the_merchant_api() {
    let h = Harness::start().await;
    let (id, token) = h.create_for("https://shop.test/faults").await;
    let page = h.url(&format!("orders/{id}?token={token}&session_id=S"));
    let get_order = format!("private/orders/{id}?session_id=S");
    let before = h.sb.calls();

    // Unreachable: the connection is accepted and dropped without an answer.
    h.sb.set_fault(Some(Fault::Unreachable));
    let request = format!("GET /{get_order} HTTP/1.1\r\nHost: x\r\nAuthorization: {AUTH}\r\n\r\n");
    assert!(raw_exchange(h.sb.addr(), &request).await.is_empty());
    let request = "GET /config HTTP/1.1\r\nHost: x\r\n\r\n";
    assert!(raw_exchange(h.sb.addr(), request).await.is_empty());
    let wallet = "GET /orders/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    let answer = raw_exchange(h.sb.addr(), wallet).await;
    assert!(
        answer.starts_with(b"HTTP/1.1 404"),
        "the public page keeps working"
    );

    // Slow: answers, late.
    h.sb.set_fault(Some(Fault::Slow(Duration::from_millis(300))));
    let t = Instant::now();
    assert_eq!(h.get(&get_order).await.status, 200);
    assert!(t.elapsed() >= Duration::from_millis(300));
    let t = Instant::now();
    assert_eq!(h.public(&page, false).await.status, 402);
    assert!(
        t.elapsed() < Duration::from_millis(300),
        "public page not slowed"
    );

    // The others, as a table: (fault, path, expected status, check).
    let rows: [(Fault, &str, u16, &str); 7] = [
        (Fault::ServerError(503), "config", 503, "code"),
        (Fault::ServerError(500), &get_order, 500, "code"),
        (Fault::Malformed, &get_order, 200, "invalid-json"),
        (Fault::Malformed, "config", 200, "invalid-json"),
        (Fault::Unauthorized, &get_order, 401, "code"),
        (Fault::UnknownStatus, &get_order, 200, "frobnicated"),
        (Fault::UnknownStatus, "config", 200, "taler-merchant"),
    ];
    for (fault, path, status, check) in rows {
        h.sb.set_fault(Some(fault.clone()));
        let r = h.get(path).await;
        assert_eq!(r.status, status, "{fault:?} {path}: {}", r.text());
        match check {
            "code" => assert!(r.json()["code"].as_u64().unwrap_or(0) > 0, "{fault:?}"),
            "invalid-json" => {
                assert!(
                    serde_json::from_slice::<Value>(&r.body).is_err(),
                    "{fault:?}"
                )
            }
            "frobnicated" => assert_eq!(r.json()["order_status"], "frobnicated"),
            _ => assert_eq!(r.json()["name"], check),
        }
        // The wallet side and the public page are never faulted.
        assert_eq!(h.public(&page, false).await.status, 402, "{fault:?}");
        let r = h.post("sandbox/claim", json!({ "order_id": "nope" })).await;
        assert_eq!(r.error(), (404, 2005), "{fault:?}");
    }

    h.sb.set_fault(None);
    assert_eq!(h.status(&id, Some("S")).await["order_status"], "unpaid");
    let after = h.sb.calls();
    assert_eq!(
        CallCounts {
            config: after.config - before.config,
            create_order: after.create_order - before.create_order,
            get_order: after.get_order - before.get_order,
            refund: after.refund - before.refund,
            public_order: after.public_order - before.public_order,
        },
        CallCounts {
            config: 4,
            create_order: 0,
            get_order: 7,
            refund: 0,
            public_order: 9,
        }
    );
    h.sb.shutdown().await;
}

#[tokio::test]
async fn the_store_is_bounded() {
    let h = Harness::start_with(SandboxOptions {
        max_orders: 2,
        ..SandboxOptions::default()
    })
    .await;
    let (a, _) = h.create_for("https://shop.test/a").await;
    let (b, _) = h.create_for("https://shop.test/b").await;
    h.paid_order(&b, "S").await;
    let (c, _) = h.create_for("https://shop.test/c").await;
    assert_eq!(
        h.get(&format!("private/orders/{a}")).await.error(),
        (404, 2005)
    );
    h.paid_order(&c, "S").await;
    let r = h.post("private/orders", order("https://shop.test/d")).await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.json()["code"].as_u64().is_some());
    let addr = h.sb.addr();
    h.sb.shutdown().await;
    assert!(TcpStream::connect(addr).await.is_err(), "stopped listening");
}
