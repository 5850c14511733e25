//! Synthetic responses: error pages and the pages of the payment flow.
//!
//! Every page is small, self-contained (no external resources), HTML-escaped, and chosen by
//! the client's `Accept` header: HTML for browsers, JSON for everyone else. No page ever
//! contains internal details (addresses, merchant answers, secrets); the log keeps those.

use http::header::{HeaderValue, ACCEPT, CACHE_CONTROL, CONTENT_TYPE};
use http::{HeaderMap, Response, StatusCode};

use crate::body::{full, Body};

/// Whether the client prefers HTML: its `Accept` lists `text/html` (or `application/xhtml+xml`)
/// with a non-zero quality.
pub fn wants_html(headers: &HeaderMap) -> bool {
    headers.get_all(ACCEPT).iter().any(|v| {
        v.to_str().unwrap_or("").split(',').any(|item| {
            let mut parts = item.split(';');
            let media = parts.next().unwrap_or("").trim().to_ascii_lowercase();
            if media != "text/html" && media != "application/xhtml+xml" {
                return false;
            }
            !parts.any(|p| {
                let p = p.trim();
                p.strip_prefix("q=")
                    .map(|q| q.trim().parse::<f32>().map(|q| q <= 0.0).unwrap_or(false))
                    .unwrap_or(false)
            })
        })
    })
}

/// Escapes text for HTML element content and attribute values.
pub fn escape_html(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A complete, self-contained HTML document with the gateway's look.
pub fn html_document(title: &str, body_html: &str) -> String {
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n<title>{title}</title>\n\
<style>body{{font-family:system-ui,sans-serif;max-width:40rem;margin:3rem auto;padding:0 1rem;\
line-height:1.5;color:#1a1a1a;background:#fff}}h1{{font-size:1.5rem}}a{{color:#0645ad}}\
code{{word-break:break-all}}</style>\n</head>\n<body>\n<main>\n{body_html}\n</main>\n</body>\n</html>\n",
        title = escape_html(title),
    )
}

/// An error response: a short HTML page or a JSON object `{"error": …, "message": …}`,
/// with `Cache-Control: no-store`.
pub fn error(status: StatusCode, message: &str, html: bool) -> Response<Body> {
    let reason = status.canonical_reason().unwrap_or("Error");
    let (ctype, body) = if html {
        let body = format!(
            "<h1>{} {}</h1>\n<p>{}</p>",
            status.as_u16(),
            escape_html(reason),
            escape_html(message)
        );
        ("text/html; charset=utf-8", html_document(reason, &body))
    } else {
        let body =
            serde_json::json!({ "error": reason, "status": status.as_u16(), "message": message });
        ("application/json", format!("{body}\n"))
    };
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(ctype));
    resp.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

// ---------------------------------------------------------------------------------------------
// Pages of the payment flow
// ---------------------------------------------------------------------------------------------

/// The `Taler` response header: wallets that watch responses open the `taler://` URI in it.
pub const TALER_HEADER: &str = "taler";

fn with_type(mut resp: Response<Body>, status: StatusCode, ctype: &'static str) -> Response<Body> {
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(ctype));
    resp.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// Unpaid. Browsers (`html`) get `302 Found` to the merchant's status page, `Location` equal to
/// `status_url` byte for byte, with a no-JavaScript fallback body holding both links. Other
/// clients get `402 Payment Required` with JSON. Both carry `Taler: <pay_uri>`.
pub fn payment_required(
    html: bool,
    pay_uri: &str,
    status_url: &str,
    summary: &str,
    price: &crate::amount::Amount,
) -> Response<Body> {
    let (Ok(location), Ok(taler)) = (
        HeaderValue::from_str(status_url),
        HeaderValue::from_str(pay_uri),
    ) else {
        return error(
            StatusCode::BAD_GATEWAY,
            "The payment service gave an unusable answer.",
            html,
        );
    };
    let mut resp = if html {
        let body = format!(
            "<h1>Payment required</h1>\n<p>{summary} costs {price}.</p>\n\
<p><a href=\"{status}\">Continue to the payment page</a></p>\n\
<p>Or open this link with your GNU Taler wallet: <a href=\"{pay}\"><code>{pay}</code></a></p>",
            summary = escape_html(summary),
            price = escape_html(&price.to_string()),
            status = escape_html(status_url),
            pay = escape_html(pay_uri),
        );
        let mut r = with_type(
            Response::new(full(html_document("Payment required", &body))),
            StatusCode::FOUND,
            "text/html; charset=utf-8",
        );
        r.headers_mut().insert(http::header::LOCATION, location);
        r
    } else {
        let body = serde_json::json!({
            "error": "payment required",
            "taler_pay_uri": pay_uri,
            "order_status_url": status_url,
            "summary": summary,
            "amount": price.to_string(),
        });
        with_type(
            Response::new(full(format!("{body}\n"))),
            StatusCode::PAYMENT_REQUIRED,
            "application/json",
        )
    };
    resp.headers_mut().insert(TALER_HEADER, taler);
    resp
}

/// The purchase was refunded: no content. While the wallet has not collected the refund, the
/// page links to the status page where it can (`403 Forbidden`).
pub fn refunded(
    html: bool,
    pending: bool,
    status_url: Option<&str>,
    summary: &str,
) -> Response<Body> {
    let link = status_url.filter(|_| pending);
    if html {
        let mut body = format!(
            "<h1>This purchase was refunded</h1>\n<p>Your payment for {} was refunded, so this page is no longer available to you.</p>",
            escape_html(summary)
        );
        match link {
            Some(url) => body.push_str(&format!(
                "\n<p>Your wallet has not collected the refund yet. <a href=\"{}\">Collect your refund</a>.</p>",
                escape_html(url)
            )),
            None => body.push_str("\n<p>The refund has been credited to your wallet.</p>"),
        }
        with_type(
            Response::new(full(html_document("Purchase refunded", &body))),
            StatusCode::FORBIDDEN,
            "text/html; charset=utf-8",
        )
    } else {
        let body = serde_json::json!({
            "error": "refunded",
            "refunded": true,
            "refund_pending": pending,
            "order_status_url": link,
        });
        with_type(
            Response::new(full(format!("{body}\n"))),
            StatusCode::FORBIDDEN,
            "application/json",
        )
    }
}

/// The browser does not keep the session cookie, without which no purchase can work.
pub fn cookies_required(html: bool) -> Response<Body> {
    let mut r = error(
        StatusCode::FORBIDDEN,
        "This page is sold through GNU Taler and needs a cookie to remember your purchase. Please allow cookies for this site and reload.",
        html,
    );
    r.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// Too many new orders from this client address (`429`, with `Retry-After` set by the caller).
pub fn rate_limited(html: bool, retry_after_secs: u64) -> Response<Body> {
    error(
        StatusCode::TOO_MANY_REQUESTS,
        &format!("Too many payment requests from your address. Please try again in {retry_after_secs} seconds."),
        html,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_html_clients() {
        let rows = [
            ("text/html,application/xhtml+xml,*/*;q=0.8", true),
            ("application/json", false),
            ("*/*", false),
            ("text/html;q=0", false),
            ("TEXT/HTML", true),
            ("application/json, text/html;q=0.5", true),
        ];
        for (accept, want) in rows {
            let mut h = HeaderMap::new();
            h.insert(ACCEPT, HeaderValue::from_static(accept));
            assert_eq!(wants_html(&h), want, "{accept}");
        }
        assert!(!wants_html(&HeaderMap::new()));
    }

    #[test]
    fn escapes_markup() {
        assert_eq!(
            escape_html("<a href=\"x\">'&'</a>"),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
    }
}
