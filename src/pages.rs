//! Synthetic responses: error pages and the pages of the payment flow.
//!
//! Every page is small, self-contained (no external resources, no JavaScript), HTML-escaped,
//! and chosen by the client's `Accept` header: HTML for browsers, JSON for everyone else. No
//! page ever contains internal details (addresses, merchant answers, secrets); the log keeps
//! those.
//!
//! # Templates
//! The HTML pages come from [`Pages`]: the built-in templates in `src/templates/` (compiled
//! into the binary), each of which an operator may replace with a file of the same name in
//! `[pages] dir`. A template is a complete HTML document with `{{name}}` placeholders. The
//! gateway fills them in, escaping every value for HTML, except `{{qr_code}}`, which is SVG
//! markup the gateway generates itself. Templates are checked when the configuration is
//! loaded: an unreadable file, an unknown placeholder or a missing required one is a
//! configuration error, so that rendering a page can never fail at request time.
//!
//! Why not a template engine: the pages need substitution and nothing else (the one
//! conditional, a refund not collected yet, is a page of its own), so a dependency would
//! add a language for operators to learn, and an escape hatch (`|safe`) that could let a
//! customer-controlled value through unescaped. Here escaping is not the template's choice:
//! values reach the page only through [`Html::text`].

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock, Mutex};

use http::header::{HeaderValue, ACCEPT, CACHE_CONTROL, CONTENT_TYPE};
use http::{HeaderMap, Response, StatusCode};
use qrcode::render::svg;
use qrcode::QrCode;

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
line-height:1.5;color:#1a1a1a;background:#fff}}h1{{font-size:1.6rem;line-height:1.25}}\
h2{{font-size:1.15rem;margin-top:2rem}}a{{color:#0645ad}}a:focus-visible{{outline:3px solid #1a1a1a;outline-offset:2px}}\
button{{font:inherit;font-weight:600;padding:.6rem 1.1rem;border:0;border-radius:.3rem;background:#0b5394;color:#fff;cursor:pointer}}\
button:focus-visible{{outline:3px solid #1a1a1a;outline-offset:2px}}\
.note{{color:#4a4a4a}}code{{word-break:break-all}}.qr svg{{display:block;width:15rem;max-width:100%;height:auto}}</style>\n</head>\n<body>\n<main>\n{body_html}\n</main>\n</body>\n</html>\n",
        title = escape_html(title),
    )
}

// ---------------------------------------------------------------------------------------------
// Templates
// ---------------------------------------------------------------------------------------------

/// The pages the gateway shows, one template each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageKind {
    /// Any error: bad request, origin or merchant failure (`error.html`).
    Error,
    /// Unpaid: the body of the redirect to the payment page (`payment-required.html`).
    PaymentRequired,
    /// The purchase was refunded and the wallet has the money back (`refunded.html`).
    Refunded,
    /// The purchase was refunded; the wallet has not collected the refund (`refund-pending.html`).
    RefundPending,
    /// The browser keeps no cookies (`cookies-required.html`).
    CookiesRequired,
    /// Too many new orders from one address (`rate-limited.html`).
    RateLimited,
}

/// How a placeholder's value is inserted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Insert {
    /// Text, escaped for HTML (safe in element content and quoted attribute values).
    Text,
    /// Markup generated by the gateway itself (the QR code).
    Markup,
}

/// A placeholder a page offers: name, whether the template must use it, how it is inserted.
type Placeholder = (&'static str, bool, Insert);

impl PageKind {
    /// Every page, in a fixed order.
    pub const ALL: [PageKind; 6] = [
        PageKind::Error,
        PageKind::PaymentRequired,
        PageKind::Refunded,
        PageKind::RefundPending,
        PageKind::CookiesRequired,
        PageKind::RateLimited,
    ];

    /// The template's file name, built in and in `[pages] dir`.
    pub fn file_name(self) -> &'static str {
        match self {
            PageKind::Error => "error.html",
            PageKind::PaymentRequired => "payment-required.html",
            PageKind::Refunded => "refunded.html",
            PageKind::RefundPending => "refund-pending.html",
            PageKind::CookiesRequired => "cookies-required.html",
            PageKind::RateLimited => "rate-limited.html",
        }
    }

    /// The built-in template.
    pub fn builtin_source(self) -> &'static str {
        match self {
            PageKind::Error => include_str!("templates/error.html"),
            PageKind::PaymentRequired => include_str!("templates/payment-required.html"),
            PageKind::Refunded => include_str!("templates/refunded.html"),
            PageKind::RefundPending => include_str!("templates/refund-pending.html"),
            PageKind::CookiesRequired => include_str!("templates/cookies-required.html"),
            PageKind::RateLimited => include_str!("templates/rate-limited.html"),
        }
    }

    fn placeholders(self) -> &'static [Placeholder] {
        use Insert::{Markup, Text};
        match self {
            PageKind::Error => &[
                ("headline", false, Text),
                ("message", true, Text),
                ("status", false, Text),
                ("reason", false, Text),
            ],
            PageKind::PaymentRequired => &[
                ("status_url", true, Text),
                ("pay_uri", false, Text),
                ("qr_code", false, Markup),
                ("summary", false, Text),
                ("price", false, Text),
            ],
            PageKind::Refunded => &[("summary", false, Text)],
            PageKind::RefundPending => &[("status_url", true, Text), ("summary", false, Text)],
            PageKind::CookiesRequired => &[],
            PageKind::RateLimited => &[("retry_after", false, Text)],
        }
    }

    /// The placeholders this page offers, and whether each is required.
    pub fn placeholder_names(self) -> impl Iterator<Item = (&'static str, bool)> {
        self.placeholders().iter().map(|(n, r, _)| (*n, *r))
    }
}

/// A template that cannot be used: the file and what is wrong with it.
#[derive(Debug, thiserror::Error)]
#[error("{}: {message}", path.display())]
pub struct PagesError {
    /// The template file (or the directory).
    pub path: PathBuf,
    /// What is wrong, and where in the file when known.
    pub message: String,
}

/// A value ready to be placed in a page: escaped text or the gateway's own markup.
#[derive(Debug, Clone)]
pub struct Html(String);

impl Html {
    /// Text, escaped for HTML.
    pub fn text(s: &str) -> Html {
        Html(escape_html(s))
    }
}

#[derive(Debug, Clone)]
enum Part {
    Literal(String),
    Value(&'static str),
}

/// A parsed template: literal text and placeholders.
#[derive(Debug, Clone)]
struct Template {
    parts: Vec<Part>,
}

/// Largest template file accepted (a page, not a site).
const MAX_TEMPLATE_BYTES: u64 = 1024 * 1024;

impl Template {
    /// Parses `src` as the template of `kind`: every `{{name}}` must be one of the page's
    /// placeholders, and every required one must appear.
    fn parse(kind: PageKind, src: &str) -> Result<Template, String> {
        let known = kind.placeholders();
        let mut parts = Vec::new();
        let mut used = Vec::new();
        let mut rest = src;
        let line_of = |rest: &str| src[..src.len() - rest.len()].matches('\n').count() + 1;
        while let Some(open) = rest.find("{{") {
            if open > 0 {
                parts.push(Part::Literal(rest[..open].to_owned()));
            }
            let after = &rest[open + 2..];
            let Some(close) = after.find("}}") else {
                return Err(format!(
                    "line {}: `{{{{` without a closing `}}}}`",
                    line_of(&rest[open..])
                ));
            };
            let name = after[..close].trim();
            let Some((name, _, _)) = known.iter().find(|(n, _, _)| *n == name) else {
                return Err(format!(
                    "line {}: unknown placeholder {{{{{}}}}}; {} offers {}",
                    line_of(&rest[open..]),
                    name.chars().take(40).collect::<String>(),
                    kind.file_name(),
                    offered(kind)
                ));
            };
            parts.push(Part::Value(name));
            used.push(*name);
            rest = &after[close + 2..];
        }
        if !rest.is_empty() {
            parts.push(Part::Literal(rest.to_owned()));
        }
        let missing: Vec<&str> = known
            .iter()
            .filter(|(n, required, _)| *required && !used.contains(n))
            .map(|(n, _, _)| *n)
            .collect();
        if !missing.is_empty() {
            return Err(format!(
                "required placeholder{} missing: {}",
                if missing.len() > 1 { "s" } else { "" },
                missing
                    .iter()
                    .map(|n| format!("{{{{{n}}}}}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        Ok(Template { parts })
    }

    /// Whether the template shows placeholder `name`.
    fn uses(&self, name: &str) -> bool {
        self.parts
            .iter()
            .any(|p| matches!(p, Part::Value(n) if *n == name))
    }

    /// Fills the placeholders in. A placeholder without a value renders as nothing (every
    /// caller passes every placeholder of its page; a unit test pins that).
    fn render(&self, values: &[(&str, Html)]) -> String {
        let mut out = String::with_capacity(
            self.parts
                .iter()
                .map(|p| match p {
                    Part::Literal(s) => s.len(),
                    Part::Value(_) => 32,
                })
                .sum(),
        );
        for part in &self.parts {
            match part {
                Part::Literal(s) => out.push_str(s),
                Part::Value(name) => {
                    if let Some((_, v)) = values.iter().find(|(n, _)| n == name) {
                        out.push_str(&v.0);
                    }
                }
            }
        }
        out
    }
}

fn offered(kind: PageKind) -> String {
    let names: Vec<String> = kind
        .placeholders()
        .iter()
        .map(|(n, r, _)| format!("{{{{{n}}}}}{}", if *r { " (required)" } else { "" }))
        .collect();
    if names.is_empty() {
        "no placeholders".to_owned()
    } else {
        names.join(", ")
    }
}

/// The templates of every page, parsed and checked. Built once (at startup and on reload)
/// and then only read.
#[derive(Clone)]
pub struct Pages {
    templates: Vec<Template>,
    overridden: Vec<PageKind>,
    /// Recently drawn QR codes (none for the static built-in value).
    qr_cache: Option<Arc<QrCache>>,
}

/// The QR codes of the last few payment URIs. Drawing one costs about 1 ms of CPU (release
/// build), and a customer waiting for a payment revisits the same order, hence the same URI:
/// with this, only order creation (which is rate-limited per address) draws new ones.
#[derive(Debug, Default)]
struct QrCache {
    recent: Mutex<VecDeque<(String, Arc<str>)>>,
}

/// At most this many QR codes are kept (each about 16 KiB).
const QR_CACHE_ENTRIES: usize = 64;

impl QrCache {
    fn get_or_draw(&self, pay_uri: &str) -> Arc<str> {
        if let Ok(recent) = self.recent.lock() {
            if let Some((_, svg)) = recent.iter().find(|(uri, _)| uri == pay_uri) {
                return svg.clone();
            }
        }
        // Drawn outside the lock: two requests for a new URI may both draw it, which is
        // harmless, while nobody waits for someone else's drawing.
        let svg: Arc<str> = qr_svg(pay_uri, QR_LABEL).into();
        if let Ok(mut recent) = self.recent.lock() {
            if !recent.iter().any(|(uri, _)| uri == pay_uri) {
                if recent.len() >= QR_CACHE_ENTRIES {
                    recent.pop_front();
                }
                recent.push_back((pay_uri.to_owned(), svg.clone()));
            }
        }
        svg
    }
}

const QR_LABEL: &str = "QR code of the payment link, for a phone wallet";

impl std::fmt::Debug for Pages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pages")
            .field(
                "overridden",
                &self
                    .overridden
                    .iter()
                    .map(|k| k.file_name())
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Default for Pages {
    /// The built-in pages, with a QR code cache of their own.
    fn default() -> Self {
        Pages {
            qr_cache: Some(Arc::default()),
            ..Pages::builtin().clone()
        }
    }
}

static BUILTIN: LazyLock<Pages> = LazyLock::new(|| Pages {
    templates: PageKind::ALL
        .iter()
        .map(|k| {
            // The built-in templates are checked by a unit test; should one ever fail to
            // parse, it is shown as it is rather than panicking in a request.
            Template::parse(*k, k.builtin_source()).unwrap_or_else(|_| Template {
                parts: vec![Part::Literal(k.builtin_source().to_owned())],
            })
        })
        .collect(),
    overridden: Vec::new(),
    qr_cache: None,
});

impl Pages {
    /// The built-in pages.
    pub fn builtin() -> &'static Pages {
        &BUILTIN
    }

    /// The built-in pages, each replaced by the file of the same name in `dir` if there is
    /// one. Every file is read and checked now; an `.html` file in `dir` that is not the name
    /// of a page is refused too (most likely a misspelt name that would silently not apply).
    ///
    /// # Errors
    /// The directory cannot be listed, a template cannot be read (or is not UTF-8, or larger
    /// than 1 MiB), has an unknown or unclosed placeholder, or lacks a required one.
    pub fn load(dir: &Path) -> Result<Pages, PagesError> {
        let entries = std::fs::read_dir(dir).map_err(|e| PagesError {
            path: dir.to_owned(),
            message: format!("cannot list the directory: {e}"),
        })?;
        for entry in entries {
            let entry = entry.map_err(|e| PagesError {
                path: dir.to_owned(),
                message: format!("cannot list the directory: {e}"),
            })?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.ends_with(".html") && !PageKind::ALL.iter().any(|k| k.file_name() == name) {
                return Err(PagesError {
                    path: entry.path(),
                    message: format!(
                        "not the name of a page; the pages are {}",
                        PageKind::ALL.map(PageKind::file_name).join(", ")
                    ),
                });
            }
        }
        let mut pages = Pages::default();
        for (i, kind) in PageKind::ALL.iter().enumerate() {
            let path = dir.join(kind.file_name());
            let meta = match std::fs::metadata(&path) {
                Ok(m) => m,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => {
                    return Err(PagesError {
                        path,
                        message: format!("cannot read: {e}"),
                    })
                }
            };
            if meta.len() > MAX_TEMPLATE_BYTES {
                return Err(PagesError {
                    path,
                    message: format!("larger than {MAX_TEMPLATE_BYTES} bytes"),
                });
            }
            let text = std::fs::read_to_string(&path).map_err(|e| PagesError {
                path: path.clone(),
                message: format!("cannot read: {e}"),
            })?;
            let template =
                Template::parse(*kind, &text).map_err(|message| PagesError { path, message })?;
            pages.templates[i] = template;
            pages.overridden.push(*kind);
        }
        Ok(pages)
    }

    /// The pages whose template came from `[pages] dir`.
    pub fn overridden(&self) -> &[PageKind] {
        &self.overridden
    }

    /// The QR code of `pay_uri`, drawn only if the payment page shows it.
    fn qr_code(&self, pay_uri: &str) -> Html {
        let shown = self
            .template(PageKind::PaymentRequired)
            .is_some_and(|t| t.uses("qr_code"));
        match (&self.qr_cache, shown) {
            (_, false) => Html(String::new()),
            (Some(cache), true) => Html(cache.get_or_draw(pay_uri).to_string()),
            (None, true) => Html(qr_svg(pay_uri, QR_LABEL)),
        }
    }

    fn template(&self, kind: PageKind) -> Option<&Template> {
        let i = PageKind::ALL.iter().position(|k| *k == kind)?;
        self.templates.get(i)
    }

    fn render(&self, kind: PageKind, values: &[(&str, Html)]) -> String {
        self.template(kind)
            .map_or_else(String::new, |t| t.render(values))
    }

    /// An error response: the error page or a JSON object `{"error": …, "message": …}`,
    /// with `Cache-Control: no-store`.
    pub fn error(&self, status: StatusCode, message: &str, html: bool) -> Response<Body> {
        let reason = status.canonical_reason().unwrap_or("Error");
        if html {
            let body = self.render(
                PageKind::Error,
                &[
                    ("headline", Html::text(headline(status))),
                    ("message", Html::text(message)),
                    ("status", Html::text(status.as_str())),
                    ("reason", Html::text(reason)),
                ],
            );
            with_type(Response::new(full(body)), status, HTML)
        } else {
            let body = serde_json::json!({ "error": reason, "status": status.as_u16(), "message": message });
            with_type(Response::new(full(format!("{body}\n"))), status, JSON)
        }
    }

    /// Unpaid. Browsers (`html`) get `302 Found` to the merchant's status page, `Location`
    /// equal to `status_url` byte for byte, with a body for browsers that do not follow it:
    /// the link to the status page, the `taler://` link and its QR code. Other clients get
    /// `402 Payment Required` with JSON. Both carry `Taler: <pay_uri>`.
    pub fn payment_required(
        &self,
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
            return self.error(
                StatusCode::BAD_GATEWAY,
                "The payment service gave an unusable answer.",
                html,
            );
        };
        let mut resp = if html {
            let body = self.render(
                PageKind::PaymentRequired,
                &[
                    ("status_url", Html::text(status_url)),
                    ("pay_uri", Html::text(pay_uri)),
                    ("qr_code", self.qr_code(pay_uri)),
                    ("summary", Html::text(summary)),
                    ("price", Html::text(&price.to_string())),
                ],
            );
            let mut r = with_type(Response::new(full(body)), StatusCode::FOUND, HTML);
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
                JSON,
            )
        };
        resp.headers_mut().insert(TALER_HEADER, taler);
        resp
    }

    /// The purchase was refunded: no content (`403 Forbidden`). While the wallet has not
    /// collected the refund, the page links to the status page where it can.
    pub fn refunded(
        &self,
        html: bool,
        pending: bool,
        status_url: Option<&str>,
        summary: &str,
    ) -> Response<Body> {
        let link = status_url.filter(|_| pending);
        if html {
            let body = match link {
                Some(url) => self.render(
                    PageKind::RefundPending,
                    &[
                        ("status_url", Html::text(url)),
                        ("summary", Html::text(summary)),
                    ],
                ),
                None => self.render(PageKind::Refunded, &[("summary", Html::text(summary))]),
            };
            with_type(Response::new(full(body)), StatusCode::FORBIDDEN, HTML)
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
                JSON,
            )
        }
    }

    /// The browser does not keep the session cookie, without which no purchase can work
    /// (`403 Forbidden`).
    pub fn cookies_required(&self, html: bool) -> Response<Body> {
        if html {
            let body = self.render(PageKind::CookiesRequired, &[]);
            with_type(Response::new(full(body)), StatusCode::FORBIDDEN, HTML)
        } else {
            self.error(StatusCode::FORBIDDEN, COOKIES_MESSAGE, false)
        }
    }

    /// Too many new orders from this client address (`429`, with `Retry-After` set by the
    /// caller).
    pub fn rate_limited(&self, html: bool, retry_after_secs: u64) -> Response<Body> {
        if html {
            let body = self.render(
                PageKind::RateLimited,
                &[("retry_after", Html::text(&retry_after_secs.to_string()))],
            );
            with_type(
                Response::new(full(body)),
                StatusCode::TOO_MANY_REQUESTS,
                HTML,
            )
        } else {
            self.error(
                StatusCode::TOO_MANY_REQUESTS,
                &format!("Too many payment requests from your address. Please try again in {retry_after_secs} seconds."),
                false,
            )
        }
    }
}

const HTML: &str = "text/html; charset=utf-8";
const JSON: &str = "application/json";
const COOKIES_MESSAGE: &str = "This page is sold through GNU Taler and needs a cookie to remember your purchase. Please allow cookies for this site and reload.";

/// A plain-language headline for an error status.
fn headline(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 => "This request could not be understood",
        403 => "Access denied",
        404 => "Page not found",
        405 => "This kind of request is not allowed here",
        413 => "The request is too large",
        429 => "Too many requests",
        500 => "Something went wrong",
        502 | 503 => "This page is not available right now",
        504 => "This page took too long to load",
        s if s >= 500 => "Something went wrong",
        _ => "This request could not be completed",
    }
}

/// The QR code of `text` as an inline `<svg>` element, exposed to assistive technology as
/// one image named `label`; empty if `text` does not fit in a QR code.
pub fn qr_svg(text: &str, label: &str) -> String {
    let Ok(code) = QrCode::new(text.as_bytes()) else {
        return String::new();
    };
    let svg = code
        .render::<svg::Color<'_>>()
        .min_dimensions(240, 240)
        .quiet_zone(true)
        .build();
    // Drop the XML declaration: the element is embedded in an HTML document.
    match svg.find("<svg") {
        Some(i) => format!(
            "<svg role=\"img\" aria-label=\"{}\" focusable=\"false\"{}",
            escape_html(label),
            &svg[i + 4..]
        ),
        None => String::new(),
    }
}

// ---------------------------------------------------------------------------------------------
// The built-in pages, as free functions
// ---------------------------------------------------------------------------------------------

/// Sets the status, the content type and `Cache-Control: no-store` (every synthetic response).
fn with_type(mut resp: Response<Body>, status: StatusCode, ctype: &'static str) -> Response<Body> {
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(ctype));
    resp.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// The `Taler` response header: wallets that watch responses open the `taler://` URI in it.
pub const TALER_HEADER: &str = "taler";

/// [`Pages::error`] with the built-in pages.
pub fn error(status: StatusCode, message: &str, html: bool) -> Response<Body> {
    Pages::builtin().error(status, message, html)
}

/// [`Pages::payment_required`] with the built-in pages.
pub fn payment_required(
    html: bool,
    pay_uri: &str,
    status_url: &str,
    summary: &str,
    price: &crate::amount::Amount,
) -> Response<Body> {
    Pages::builtin().payment_required(html, pay_uri, status_url, summary, price)
}

/// [`Pages::refunded`] with the built-in pages.
pub fn refunded(
    html: bool,
    pending: bool,
    status_url: Option<&str>,
    summary: &str,
) -> Response<Body> {
    Pages::builtin().refunded(html, pending, status_url, summary)
}

/// [`Pages::cookies_required`] with the built-in pages.
pub fn cookies_required(html: bool) -> Response<Body> {
    Pages::builtin().cookies_required(html)
}

/// [`Pages::rate_limited`] with the built-in pages.
pub fn rate_limited(html: bool, retry_after_secs: u64) -> Response<Body> {
    Pages::builtin().rate_limited(html, retry_after_secs)
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

    fn body_text(resp: Response<Body>) -> String {
        let bytes = futures_util::FutureExt::now_or_never(http_body_util::BodyExt::collect(
            resp.into_body(),
        ))
        .expect("a full body is ready")
        .expect("body")
        .to_bytes();
        String::from_utf8(bytes.to_vec()).expect("utf-8")
    }

    fn price() -> crate::amount::Amount {
        "KUDOS:0.5".parse().expect("amount")
    }

    /// Every page of `pages`, rendered as a browser gets it.
    fn every_page(pages: &Pages) -> Vec<(PageKind, String)> {
        vec![
            (
                PageKind::Error,
                body_text(pages.error(StatusCode::BAD_GATEWAY, "M<1>", true)),
            ),
            (
                PageKind::PaymentRequired,
                body_text(pages.payment_required(
                    true,
                    "taler://pay/b/O/S?c=T",
                    "https://b/orders/O?token=T&session_id=S",
                    "S<2>",
                    &price(),
                )),
            ),
            (
                PageKind::Refunded,
                body_text(pages.refunded(true, false, Some("https://b/o"), "S<3>")),
            ),
            (
                PageKind::RefundPending,
                body_text(pages.refunded(true, true, Some("https://b/o?a=1&b=2"), "S<4>")),
            ),
            (
                PageKind::CookiesRequired,
                body_text(pages.cookies_required(true)),
            ),
            (
                PageKind::RateLimited,
                body_text(pages.rate_limited(true, 42)),
            ),
        ]
    }

    #[test]
    fn builtin_templates_parse_and_are_self_contained_accessible_documents() {
        for kind in PageKind::ALL {
            Template::parse(kind, kind.builtin_source())
                .unwrap_or_else(|e| panic!("{}: {e}", kind.file_name()));
        }
        for (kind, html) in every_page(Pages::builtin()) {
            let name = kind.file_name();
            assert!(html.starts_with("<!DOCTYPE html>"), "{name}");
            assert!(html.contains("<html lang=\"en\">"), "{name}: lang");
            assert_eq!(html.matches("<h1").count(), 1, "{name}: one h1");
            assert!(html.contains("<main>"), "{name}: a main landmark");
            assert!(!html.contains("{{"), "{name}: a placeholder left over");
            assert!(!html.contains("<script"), "{name}: no JavaScript");
            for external in [" src=", "<link", "url(", "@import"] {
                assert!(
                    !html.contains(external),
                    "{name}: external resource {external}"
                );
            }
            let title = html
                .split("<title>")
                .nth(1)
                .and_then(|t| t.split("</title>").next());
            assert!(
                title.is_some_and(|t| !t.trim().is_empty()),
                "{name}: a title"
            );
        }
    }

    #[test]
    fn every_value_is_escaped() {
        let pages = every_page(Pages::builtin());
        let text = |k: PageKind| &pages.iter().find(|(kind, _)| *kind == k).unwrap().1;
        assert!(text(PageKind::Error).contains("M&lt;1&gt;"));
        assert!(text(PageKind::PaymentRequired).contains("S&lt;2&gt;"));
        assert!(text(PageKind::PaymentRequired)
            .contains("href=\"https://b/orders/O?token=T&amp;session_id=S\""));
        assert!(text(PageKind::Refunded).contains("S&lt;3&gt;"));
        assert!(text(PageKind::RefundPending).contains("href=\"https://b/o?a=1&amp;b=2\""));
        for (kind, html) in &pages {
            assert!(!html.contains("<1>") && !html.contains("<2>"), "{kind:?}");
        }
        // A quote cannot end the attribute it is placed in.
        let r = Pages::builtin().payment_required(
            true,
            "taler://pay/b/O/S",
            "https://b/o?x=\"><script>",
            "s",
            &price(),
        );
        let html = body_text(r);
        assert!(html.contains("x=&quot;&gt;&lt;script&gt;"));
        assert!(!html.contains("<script"));
    }

    #[test]
    fn payment_page_links_to_status_page_and_wallet_with_a_labelled_qr_code() {
        let r = Pages::builtin().payment_required(
            true,
            "taler://pay/b/O/S?c=T",
            "https://b/orders/O?token=T",
            "Article",
            &price(),
        );
        assert_eq!(r.status(), StatusCode::FOUND);
        assert_eq!(r.headers()["location"], "https://b/orders/O?token=T");
        assert_eq!(r.headers()[TALER_HEADER], "taler://pay/b/O/S?c=T");
        assert_eq!(r.headers()[CACHE_CONTROL], "no-store");
        let html = body_text(r);
        assert!(html.contains("href=\"https://b/orders/O?token=T\""));
        assert!(html.contains("href=\"taler://pay/b/O/S?c=T\""));
        assert!(html.contains("<svg role=\"img\" aria-label=\"QR code"));
        assert!(html.contains("KUDOS:0.5"));
        // JSON clients: 402, same header, no page.
        let r = Pages::builtin().payment_required(
            false,
            "taler://pay/b/O/S",
            "https://b/o",
            "A",
            &price(),
        );
        assert_eq!(r.status(), StatusCode::PAYMENT_REQUIRED);
        let v: serde_json::Value = serde_json::from_str(&body_text(r)).unwrap();
        assert_eq!(v["taler_pay_uri"], "taler://pay/b/O/S");
        assert_eq!(v["order_status_url"], "https://b/o");
    }

    #[test]
    fn qr_code_encodes_the_pay_uri() {
        let svg = qr_svg("taler://pay/b/O/S?c=T", "label \"x\"");
        assert!(svg.starts_with("<svg role=\"img\" aria-label=\"label &quot;x&quot;\""));
        assert!(svg.ends_with("</svg>"));
        assert!(!svg.contains("<?xml"));
        // Too long for any QR code: no image rather than an error.
        assert_eq!(qr_svg(&"x".repeat(8000), "l"), "");
    }

    #[test]
    fn qr_codes_are_drawn_once_per_uri_and_the_cache_is_bounded() {
        let cache = QrCache::default();
        let a = cache.get_or_draw("taler://pay/b/A/S");
        assert!(Arc::ptr_eq(&a, &cache.get_or_draw("taler://pay/b/A/S")));
        assert_eq!(&*a, qr_svg("taler://pay/b/A/S", QR_LABEL));
        for i in 0..QR_CACHE_ENTRIES + 5 {
            let _ = cache.get_or_draw(&format!("taler://pay/b/O{i}/S"));
        }
        assert_eq!(cache.recent.lock().unwrap().len(), QR_CACHE_ENTRIES);
        // The oldest went first.
        assert!(!Arc::ptr_eq(&a, &cache.get_or_draw("taler://pay/b/A/S")));
        // A loaded Pages uses a cache; the page shows the same drawing either way.
        let pages = Pages::default();
        let page = |p: &Pages| {
            body_text(p.payment_required(true, "taler://pay/b/Q/S", "https://b/o", "A", &price()))
        };
        assert_eq!(page(&pages), page(Pages::builtin()));
        assert_eq!(
            pages
                .qr_cache
                .as_ref()
                .unwrap()
                .recent
                .lock()
                .unwrap()
                .len(),
            1
        );
    }

    #[test]
    fn no_qr_code_is_drawn_for_a_template_without_one() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("payment-required.html"),
            "<a href=\"{{status_url}}\">Pay</a>",
        )
        .unwrap();
        let pages = Pages::load(dir.path()).unwrap();
        let html = body_text(pages.payment_required(
            true,
            "taler://pay/b/Q/S",
            "https://b/o",
            "A",
            &price(),
        ));
        assert_eq!(html, "<a href=\"https://b/o\">Pay</a>");
        assert_eq!(
            pages
                .qr_cache
                .as_ref()
                .unwrap()
                .recent
                .lock()
                .unwrap()
                .len(),
            0
        );
    }

    #[test]
    fn refunded_page_links_to_collect_only_while_pending() {
        let pending = body_text(Pages::builtin().refunded(true, true, Some("https://b/o"), "A"));
        assert!(pending.contains("Collect your refund"));
        let done = body_text(Pages::builtin().refunded(true, false, Some("https://b/o"), "A"));
        assert!(!done.contains("https://b/o") && done.contains("credited"));
        // Pending but no URL to collect at: the page without the link.
        let no_url = body_text(Pages::builtin().refunded(true, true, None, "A"));
        assert!(!no_url.contains("href"));
    }

    #[test]
    fn template_errors_name_the_problem_and_line() {
        let rows = [
            (
                PageKind::Error,
                "<p>{{message}}</p>\n{{nope}}",
                "line 2: unknown placeholder {{nope}}",
            ),
            (
                PageKind::Error,
                "<p>{{message}</p>",
                "line 1: `{{` without a closing `}}`",
            ),
            (
                PageKind::Error,
                "<p>no message</p>",
                "required placeholder missing: {{message}}",
            ),
            (
                PageKind::PaymentRequired,
                "<a href=\"{{pay_uri}}\">",
                "{{status_url}}",
            ),
            (PageKind::RefundPending, "{{summary}}", "{{status_url}}"),
            (
                PageKind::CookiesRequired,
                "{{summary}}",
                "cookies-required.html offers no placeholders",
            ),
        ];
        for (kind, src, want) in rows {
            let err = Template::parse(kind, src)
                .err()
                .unwrap_or_else(|| panic!("{src} parsed"));
            assert!(err.contains(want), "{src}: {err}");
        }
        // Spaces inside the braces are fine.
        let t = Template::parse(PageKind::RateLimited, "wait {{ retry_after }}s").unwrap();
        assert_eq!(t.render(&[("retry_after", Html::text("5"))]), "wait 5s");
    }

    #[test]
    fn a_directory_overrides_some_pages_and_keeps_the_others() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("refunded.html"),
            "<!DOCTYPE html><html lang=\"de\"><title>Erstattet</title><h1>Erstattet</h1><p>{{summary}}</p>",
        )
        .unwrap();
        std::fs::write(dir.path().join("notes.txt"), "not a template").unwrap();
        let pages = Pages::load(dir.path()).unwrap();
        assert_eq!(pages.overridden(), &[PageKind::Refunded]);
        let html = body_text(pages.refunded(true, false, None, "<b>"));
        assert!(
            html.contains("<h1>Erstattet</h1><p>&lt;b&gt;</p>"),
            "{html}"
        );
        // The others are the built-in ones.
        let html = body_text(pages.cookies_required(true));
        assert!(html.contains("Please allow cookies"));
    }

    #[test]
    fn unusable_template_files_are_refused_at_load() {
        let cases: [(&str, &[u8], &str); 4] = [
            ("error.html", b"<p>no placeholder</p>", "{{message}}"),
            ("payment_required.html", b"x", "not the name of a page"),
            ("rate-limited.html", b"\xff\xfe not utf-8", "cannot read"),
            ("refund-pending.html", b"{{status_url}", "without a closing"),
        ];
        for (name, content, want) in cases {
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join(name), content).unwrap();
            let err = Pages::load(dir.path()).unwrap_err();
            assert!(err.to_string().contains(want), "{name}: {err}");
            assert!(
                err.to_string().contains(name),
                "{name}: names the file: {err}"
            );
        }
        // A directory where a template should be, and a file too large.
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("error.html")).unwrap();
        assert!(Pages::load(dir.path()).is_err());
        let dir = tempfile::tempdir().unwrap();
        let big = format!("{{{{message}}}}{}", " ".repeat(2 * 1024 * 1024));
        std::fs::write(dir.path().join("error.html"), big).unwrap();
        assert!(Pages::load(dir.path())
            .unwrap_err()
            .to_string()
            .contains("larger than"));
        assert!(Pages::load(Path::new("/no/such/dir")).is_err());
    }

    #[test]
    fn escapes_markup() {
        assert_eq!(
            escape_html("<a href=\"x\">'&'</a>"),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
    }
}
