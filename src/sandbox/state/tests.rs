use super::*;

const NOW: Secs = 1_760_000_000;
const BASE: &str = "http://sandbox.test/";

fn store() -> Store {
    Store::new("KUDOS", 1000, [7; 32])
}

fn req(url: &str) -> Value {
    json!({ "order": { "amount": "KUDOS:1", "summary": "s", "fulfillment_url": url },
            "refund_delay": { "d_us": 3_600_000_000u64 } })
}

fn create(s: &mut Store, url: &str) -> String {
    s.create_order("default", BASE, &req(url), NOW)
        .map(|c| c.order_id)
        .unwrap_or_else(|e| panic!("create: {e:?}"))
}

fn status(s: &Store, id: &str, session: Option<&str>) -> &'static str {
    match s.private_view("default", id, session, false) {
        Ok(PrivateView::Unpaid { .. }) => "unpaid",
        Ok(PrivateView::Claimed(_)) => "claimed",
        Ok(PrivateView::Paid(_)) => "paid",
        Err(_) => "error",
    }
}

#[test]
fn create_order_rejects_like_the_backend() {
    let rows: Vec<(Value, u16, u32)> = vec![
        (json!([]), 400, ec::GENERIC_JSON_INVALID),
        (json!({}), 400, ec::GENERIC_PARAMETER_MISSING),
        (json!({"order": 5}), 400, ec::GENERIC_PARAMETER_MALFORMED),
        (
            json!({"order": {"summary": "s", "fulfillment_url": "https://x/"}}),
            400,
            ec::MERCHANT_PRIVATE_POST_ORDERS_PROPOSAL_PARSE_ERROR,
        ),
        (
            json!({"order": {"amount": "KUDOS:1.123456789", "summary": "s", "fulfillment_url": "https://x/"}}),
            400,
            ec::MERCHANT_PRIVATE_POST_ORDERS_PROPOSAL_PARSE_ERROR,
        ),
        (
            json!({"order": {"amount": "EUR:1", "summary": "s", "fulfillment_url": "https://x/"}}),
            409,
            ec::GENERIC_CURRENCY_MISMATCH,
        ),
        (
            json!({"order": {"amount": "KUDOS:1", "fulfillment_url": "https://x/"}}),
            400,
            ec::MERCHANT_PRIVATE_POST_ORDERS_PROPOSAL_PARSE_ERROR,
        ),
        (
            json!({"order": {"amount": "KUDOS:1", "summary": "s"}}),
            400,
            ec::MERCHANT_PRIVATE_POST_ORDERS_PROPOSAL_PARSE_ERROR,
        ),
        (
            json!({"order": {"amount": "KUDOS:1", "summary": "s", "fulfillment_url": "not a url"}}),
            400,
            ec::MERCHANT_PRIVATE_POST_ORDERS_PROPOSAL_PARSE_ERROR,
        ),
        (
            json!({"order": {"amount": "KUDOS:1", "summary": "s", "fulfillment_message": "m",
                             "pay_deadline": {"t_s": NOW - 1}}}),
            400,
            ec::MERCHANT_PRIVATE_POST_ORDERS_PAY_DEADLINE_IN_PAST,
        ),
        (
            json!({"order": {"amount": "KUDOS:1", "summary": "s", "fulfillment_message": "m",
                             "pay_deadline": {"t_ms": (NOW + 100) * 1000}}}),
            400,
            ec::MERCHANT_PRIVATE_POST_ORDERS_PROPOSAL_PARSE_ERROR,
        ),
        (
            json!({"order": {"amount": "KUDOS:1", "summary": "s", "fulfillment_message": "m",
                             "refund_deadline": {"t_s": NOW - 1}}}),
            400,
            ec::MERCHANT_PRIVATE_POST_ORDERS_REFUND_DEADLINE_IN_PAST,
        ),
        (
            json!({"order": {"amount": "KUDOS:1", "summary": "s", "fulfillment_message": "m",
                             "wire_transfer_deadline": {"t_s": "never"}}}),
            400,
            ec::MERCHANT_PRIVATE_POST_ORDERS_WIRE_DEADLINE_IS_NEVER,
        ),
        (
            json!({"order": {"amount": "KUDOS:1", "summary": "s", "fulfillment_message": "m"},
                   "refund_delay": {"d_ms": 1000}}),
            400,
            ec::GENERIC_PARAMETER_MALFORMED,
        ),
        (
            json!({"order": {"amount": "KUDOS:1", "summary": "s", "fulfillment_message": "m",
                             "order_id": "no spaces please"}}),
            400,
            ec::GENERIC_PARAMETER_MALFORMED,
        ),
    ];
    for (body, status, code) in rows {
        let mut s = store();
        let e = s
            .create_order("default", BASE, &body, NOW)
            .expect_err(&body.to_string());
        assert_eq!((e.status, e.code), (status, code), "{body}");
    }
}

#[test]
fn create_order_substitutes_order_id_and_is_idempotent_per_id() {
    let mut s = store();
    let body = json!({"order": {"order_id": "fixed-1", "amount": "KUDOS:1", "summary": "s",
                                "fulfillment_url": "https://shop/x?o=${ORDER_ID}"}});
    let first = s.create_order("default", BASE, &body, NOW).unwrap();
    assert_eq!(first.order_id, "fixed-1");
    assert!(first.token.is_some());
    let o = s.order("default", "fixed-1").unwrap();
    assert_eq!(
        o.fulfillment_url.as_deref(),
        Some("https://shop/x?o=fixed-1")
    );
    assert_eq!(
        s.create_order("default", BASE, &body, NOW + 5).unwrap(),
        first
    );
    let mut other = body.clone();
    other["order"]["amount"] = json!("KUDOS:2");
    let e = s.create_order("default", BASE, &other, NOW).unwrap_err();
    assert_eq!(
        (e.status, e.code),
        (409, ec::MERCHANT_PRIVATE_POST_ORDERS_ALREADY_EXISTS)
    );
    // Another instance has its own ids.
    assert!(s.create_order("shop", BASE, &other, NOW).is_ok());
}

#[test]
fn generated_ids_are_dated_and_unguessable() {
    let mut s = store();
    let a = create(&mut s, "https://x/a");
    let b = create(&mut s, "https://x/a");
    assert_ne!(a, b);
    assert!(a.starts_with("2025.282-"), "{a}");
    assert!(a.len() > 20);
    let o = s.order("default", &a).unwrap();
    assert_eq!(o.h_contract.len(), 103);
    assert_eq!(o.claim_token.as_ref().map(String::len), Some(26));
    let no_token = json!({"order": {"amount": "KUDOS:1", "summary": "s", "fulfillment_message": "m"},
                          "create_token": false});
    assert_eq!(
        s.create_order("default", BASE, &no_token, NOW)
            .unwrap()
            .token,
        None
    );
}

#[test]
fn session_table_of_the_private_status() {
    let mut s = store();
    let o = create(&mut s, "https://x/a");
    // Created, nobody claimed: unpaid whatever the session.
    assert_eq!(status(&s, &o, None), "unpaid");
    assert_eq!(status(&s, &o, Some("A")), "unpaid");
    // Claimed, unpaid: claimed whatever the session.
    let c = create(&mut s, "https://x/c");
    s.claim("default", &c, "w2").unwrap();
    assert_eq!(status(&s, &c, None), "claimed");
    assert_eq!(status(&s, &c, Some("A")), "claimed");
    // Paid under A.
    s.pay("default", &o, "A", "w", NOW).unwrap();
    assert_eq!(status(&s, &o, Some("A")), "paid");
    assert_eq!(status(&s, &o, Some("B")), "claimed");
    assert_eq!(status(&s, &o, None), "paid");
    // Replayed under C: C paid, A and B claimed.
    assert_eq!(s.pay("default", &o, "C", "w", NOW).unwrap(), o);
    assert_eq!(status(&s, &o, Some("C")), "paid");
    assert_eq!(status(&s, &o, Some("A")), "claimed");
    assert_eq!(status(&s, &o, Some("B")), "claimed");
    // Paid without any session.
    let n = create(&mut s, "https://x/n");
    s.pay("default", &n, "", "w", NOW).unwrap();
    assert_eq!(status(&s, &n, None), "paid");
    // Unknown order.
    assert_eq!(status(&s, "nope", None), "error");
}

#[test]
fn already_paid_needs_same_url_same_session_and_no_refund() {
    let mut s = store();
    let o1 = create(&mut s, "https://x/a");
    s.pay("default", &o1, "S", "w", NOW).unwrap();
    let o2 = create(&mut s, "https://x/a");
    let already = |s: &Store, id: &str, session: &str, allow: bool| match s.private_view(
        "default",
        id,
        Some(session),
        allow,
    ) {
        Ok(PrivateView::Unpaid { already_paid, .. }) => already_paid.map(|o| o.id.clone()),
        other => panic!("{other:?}"),
    };
    assert_eq!(already(&s, &o2, "S", false), Some(o1.clone()));
    assert_eq!(already(&s, &o2, "T", false), None);
    let other_url = create(&mut s, "https://x/a/");
    assert_eq!(already(&s, &other_url, "S", false), None);
    let amount: Amount = "KUDOS:0.5".parse().unwrap();
    s.refund("default", &o1, &amount, "r", NOW).unwrap();
    assert_eq!(already(&s, &o2, "S", false), None);
    assert_eq!(already(&s, &o2, "S", true), Some(o1));
}

#[test]
fn wallet_replays_instead_of_paying_again() {
    let mut s = store();
    let o1 = create(&mut s, "https://x/a");
    s.pay("default", &o1, "S1", "w", NOW).unwrap();
    let o2 = create(&mut s, "https://x/a");
    assert_eq!(s.pay("default", &o2, "S2", "w", NOW + 1).unwrap(), o1);
    assert_eq!(status(&s, &o2, Some("S2")), "claimed");
    assert!(s.order("default", &o2).unwrap().payment.is_none());
    assert_eq!(status(&s, &o1, Some("S2")), "paid");
    assert_eq!(status(&s, &o1, Some("S1")), "claimed");
    // Another wallet has not paid before: it pays.
    let o3 = create(&mut s, "https://x/a");
    assert_eq!(s.pay("default", &o3, "S3", "w2", NOW).unwrap(), o3);
    // A refunded purchase is not replayed.
    let amount: Amount = "KUDOS:1".parse().unwrap();
    s.refund("default", &o3, &amount, "r", NOW).unwrap();
    let o4 = create(&mut s, "https://x/a");
    assert_eq!(s.pay("default", &o4, "S4", "w2", NOW).unwrap(), o4);
}

#[test]
fn claimed_orders_belong_to_their_wallet_and_offers_expire() {
    let mut s = store();
    let o = create(&mut s, "https://x/a");
    s.claim("default", &o, "other").unwrap();
    let e = s.pay("default", &o, "S", "default", NOW).unwrap_err();
    assert_eq!(
        (e.status, e.code),
        (409, ec::MERCHANT_POST_ORDERS_ID_CLAIM_ALREADY_CLAIMED)
    );
    assert!(s.claim("default", &o, "other").is_ok());
    let late = create(&mut s, "https://x/late");
    let e = s
        .pay("default", &late, "S", "w", NOW + DEFAULT_PAY_DELAY + 1)
        .unwrap_err();
    assert_eq!(
        (e.status, e.code),
        (410, ec::MERCHANT_POST_ORDERS_ID_PAY_OFFER_EXPIRED)
    );
}

#[test]
fn refunds_grow_only_within_the_contract() {
    let mut s = store();
    let o = create(&mut s, "https://x/a");
    let amt = |v: &str| -> Amount { v.parse().unwrap() };
    let e = s
        .refund("default", &o, &amt("KUDOS:0.1"), "r", NOW)
        .unwrap_err();
    assert_eq!(
        (e.status, e.code),
        (409, ec::MERCHANT_PRIVATE_POST_ORDERS_ID_REFUND_ORDER_UNPAID)
    );
    s.pay("default", &o, "S", "w", NOW).unwrap();
    let e = s
        .refund("default", &o, &amt("KUDOS:1.01"), "r", NOW)
        .unwrap_err();
    assert_eq!(
        (e.status, e.code),
        (
            409,
            ec::MERCHANT_PRIVATE_POST_ORDERS_ID_REFUND_INCONSISTENT_AMOUNT
        )
    );
    let e = s
        .refund("default", &o, &amt("EUR:0.1"), "r", NOW)
        .unwrap_err();
    assert_eq!(e.status, 400);
    s.refund("default", &o, &amt("KUDOS:0.3"), "r", NOW)
        .unwrap();
    s.refund("default", &o, &amt("KUDOS:0.3"), "r", NOW)
        .unwrap();
    let e = s
        .refund("default", &o, &amt("KUDOS:0.2"), "r", NOW)
        .unwrap_err();
    assert_eq!(
        e.code,
        ec::MERCHANT_PRIVATE_POST_ORDERS_ID_REFUND_INCONSISTENT_AMOUNT
    );
    let ord = s
        .refund("default", &o, &amt("KUDOS:0.5"), "r", NOW)
        .unwrap();
    assert_eq!(ord.refunds.len(), 2);
    assert_eq!(ord.refund_amount().to_string(), "KUDOS:0.5");
    assert!(ord.refund_pending());
    assert_eq!(ord.refund_taken().to_string(), "KUDOS:0");
    let ord = s.collect_refunds("default", &o).unwrap();
    assert!(!ord.refund_pending());
    assert_eq!(ord.refund_taken().to_string(), "KUDOS:0.5");
    let e = s
        .refund("default", &o, &amt("KUDOS:0.6"), "r", NOW + 3601)
        .unwrap_err();
    assert_eq!(e.status, 410);
    // Zero refund delay: refunds never allowed.
    let body = json!({"order": {"amount": "KUDOS:1", "summary": "s", "fulfillment_message": "m"}});
    let z = s
        .create_order("default", BASE, &body, NOW)
        .unwrap()
        .order_id;
    s.pay("default", &z, "", "w", NOW).unwrap();
    let e = s
        .refund("default", &z, &amt("KUDOS:1"), "r", NOW)
        .unwrap_err();
    assert_eq!(
        (e.status, e.code),
        (
            403,
            ec::MERCHANT_PRIVATE_POST_ORDERS_ID_REFUND_NOT_ALLOWED_BY_CONTRACT
        )
    );
}

#[test]
fn public_view_authenticates_by_token_then_contract_hash() {
    let mut s = store();
    let mut body = req("https://x/a");
    body["order"]["public_reorder_url"] = json!("https://x/a");
    let created = s.create_order("default", BASE, &body, NOW).unwrap();
    let (id, token) = (created.order_id, created.token.unwrap());
    let h = s.order("default", &id).unwrap().h_contract.clone();
    let kind = |s: &Store, t: Option<&str>, h: Option<&str>, sess: Option<&str>| match s
        .public_view("default", &id, t, h, sess)
    {
        Ok(PublicView::PayRequired(_)) => "pay".to_owned(),
        Ok(PublicView::AlreadyPaid { .. }) => "already".to_owned(),
        Ok(PublicView::Paid(_)) => "paid".to_owned(),
        Ok(PublicView::GotoFulfillment(_)) => "goto-fulfillment".to_owned(),
        Ok(PublicView::GotoReorder(_)) => "goto-reorder".to_owned(),
        Err(e) => format!("{} {}", e.status, e.code),
    };
    assert_eq!(kind(&s, Some(&token), None, Some("S")), "pay");
    assert_eq!(kind(&s, Some("wrong"), None, Some("S")), "403 2105");
    assert_eq!(kind(&s, None, None, Some("S")), "403 2105");
    assert_eq!(kind(&s, None, Some("wrong"), Some("S")), "403 2106");
    assert_eq!(kind(&s, None, Some(&h), Some("S")), "pay");
    s.pay("default", &id, "S", "w", NOW).unwrap();
    assert_eq!(kind(&s, None, Some(&h), Some("S")), "paid");
    assert_eq!(kind(&s, None, Some(&h), Some("T")), "pay");
    assert_eq!(kind(&s, Some(&token), None, Some("S")), "goto-fulfillment");
    assert_eq!(kind(&s, Some("wrong"), None, Some("T")), "goto-reorder");
    assert_eq!(
        s.public_view("default", "nope", None, None, None)
            .unwrap_err()
            .code,
        ec::MERCHANT_GENERIC_ORDER_UNKNOWN
    );
}

#[test]
fn expired_unpaid_orders_are_collected_and_the_cap_evicts_oldest_unpaid() {
    let mut s = Store::new("KUDOS", 3, [1; 32]);
    let a = create(&mut s, "https://x/a");
    s.gc(NOW + DEFAULT_PAY_DELAY + UNPAID_GRACE);
    assert!(
        s.order("default", &a).is_some(),
        "kept within the grace period"
    );
    s.gc(NOW + DEFAULT_PAY_DELAY + UNPAID_GRACE + 1);
    assert!(s.order("default", &a).is_none());
    assert!(s.is_empty());

    let p1 = create(&mut s, "https://x/1");
    s.pay("default", &p1, "", "w", NOW).unwrap();
    let u1 = create(&mut s, "https://x/2");
    let _u2 = create(&mut s, "https://x/3");
    assert_eq!(s.len(), 3);
    let _u3 = create(&mut s, "https://x/4");
    assert_eq!(s.len(), 3);
    assert!(s.order("default", &u1).is_none(), "oldest unpaid evicted");
    assert!(s.order("default", &p1).is_some(), "paid orders are kept");

    let mut full = Store::new("KUDOS", 1, [2; 32]);
    let p = create(&mut full, "https://x/1");
    full.pay("default", &p, "", "w", NOW).unwrap();
    let e = full
        .create_order("default", BASE, &req("https://x/2"), NOW)
        .unwrap_err();
    assert_eq!(e.status, 503);
}

#[test]
fn encodings() {
    assert_eq!(crockford32(b""), "");
    assert_eq!(crockford32(&[0xff]), "ZW");
    assert_eq!(crockford32(b"foobar"), "CSQPYRK1E8");
    assert_eq!(date_prefix(0), "1970.001");
    assert_eq!(date_prefix(951_782_400), "2000.060"); // 2000-02-29
    assert_eq!(parse_timestamp(&json!({"t_s": 5})), Some(5));
    assert_eq!(parse_timestamp(&json!({"t_s": "never"})), Some(NEVER));
    assert_eq!(parse_timestamp(&json!({"t_s": -1})), None);
    assert_eq!(parse_timestamp(&json!({"t_s": 1, "x": 2})), None);
    assert_eq!(parse_relative(&json!({"d_us": "forever"})), Some(NEVER));
    assert_eq!(
        amount_from_units("KUDOS", 150_000_000).unwrap().to_string(),
        "KUDOS:1.5"
    );
}
