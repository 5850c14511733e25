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
