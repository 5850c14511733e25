//! The sandbox's HTML pages: the payment page (a `taler://pay` link, its QR code as inline
//! SVG, and a "Pay with the sandbox wallet" button), the paid/refund page and error pages.
//! Self-contained, escaped, and working without JavaScript: the buttons are plain forms.

use http::{Response, StatusCode};
use url::Url;

use super::http::{status_of, with_type};
use super::state::{ApiError, Order};
use crate::body::Body;
use crate::pages::{escape_html, html_document, qr_svg};

const BANNER: &str =
    "<p role=\"note\" style=\"background:#fff3cd;border:1px solid #8a6d00;padding:.5rem\">\
<strong>SANDBOX</strong>: play money, no real payment takes place.</p>";

fn html(status: StatusCode, title: &str, body: &str) -> Response<Body> {
    with_type(
        status,
        "text/html; charset=utf-8",
        html_document(title, &format!("{BANNER}\n{body}")),
    )
}

/// The 402 payment page of an unpaid order (or one paid under another session).
pub(super) fn payment(
    base: &Url,
    order: &Order,
    pay_uri: &str,
    session: Option<&str>,
) -> Response<Body> {
    let uri = escape_html(pay_uri);
    let body = format!(
        "<h1>Payment requested</h1>\n\
<p>{summary}</p>\n<p>Amount: <strong>{amount}</strong></p>\n\
<h2>Pay in this browser</h2>\n\
<form method=\"post\" action=\"{action}\">\n\
<input type=\"hidden\" name=\"order_id\" value=\"{id}\">\n\
<input type=\"hidden\" name=\"session_id\" value=\"{session}\">\n\
<button type=\"submit\">Pay with the sandbox wallet</button>\n</form>\n\
<h2>Pay with a GNU Taler wallet</h2>\n\
<p><a href=\"{uri}\">Open this payment request in your GNU Taler wallet</a><br>\
<code>{uri}</code></p>\n\
<div class=\"qr\">{qr}</div>",
        summary = escape_html(&order.summary),
        amount = escape_html(&order.amount.to_string()),
        qr = qr_svg(
            pay_uri,
            "QR code of the payment request, for a phone wallet"
        ),
        action = escape_html(&format!("{base}sandbox/pay-form")),
        id = escape_html(&order.id),
        session = escape_html(session.unwrap_or("")),
    );
    html(StatusCode::PAYMENT_REQUIRED, "Payment requested", &body)
}

/// The page of a paid order: refund state (with a "Collect refund" button while a refund
/// is pending) or the fulfillment message.
pub(super) fn paid(base: &Url, order: &Order) -> Response<Body> {
    let mut body = format!(
        "<h1>Paid</h1>\n<p>{}</p>\n<p>Amount: <strong>{}</strong></p>\n",
        escape_html(&order.summary),
        escape_html(&order.amount.to_string())
    );
    if order.refunded() {
        body.push_str(&format!(
            "<p>Refunded: <strong>{}</strong> (collected: {})</p>\n",
            escape_html(&order.refund_amount().to_string()),
            escape_html(&order.refund_taken().to_string())
        ));
    }
    if order.refund_pending() {
        body.push_str(&format!(
            "<form method=\"post\" action=\"{}\">\n\
<input type=\"hidden\" name=\"order_id\" value=\"{}\">\n\
<button type=\"submit\">Collect refund</button>\n</form>\n",
            escape_html(&format!("{base}sandbox/collect-refund-form")),
            escape_html(&order.id)
        ));
    }
    if let Some(m) = &order.fulfillment_message {
        body.push_str(&format!("<p>{}</p>\n", escape_html(m)));
    }
    if let Some(u) = &order.fulfillment_url {
        let u = escape_html(u);
        body.push_str(&format!("<p><a href=\"{u}\">Continue to {u}</a></p>\n"));
    }
    html(StatusCode::OK, "Paid", &body)
}

/// An error page carrying the Taler error code.
pub(super) fn error(e: &ApiError) -> Response<Body> {
    let status = status_of(e);
    let title = status.canonical_reason().unwrap_or("Error");
    let body = format!(
        "<h1>{} {}</h1>\n<p>{}</p>\n<p>Taler error code {}</p>",
        status.as_u16(),
        escape_html(title),
        escape_html(&e.hint),
        e.code
    );
    html(status, title, &body)
}
