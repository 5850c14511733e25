//! The gateway's cookies: the signed browser session, the order of each resource, and the
//! page to return to after a prefix-scope purchase.
//!
//! All cookies are signed with HMAC-SHA256 in the format of `cookie`'s `SignedJar` (the value
//! is `base64(HMAC-SHA256(value)) || value`, standard base64 with padding), under the signing
//! half of a key derived from `[session] secret` (HMAC-SHA512 with a fixed label, so the
//! configured text is never used as a key directly). The MAC is computed here with the `hmac`
//! crate on a keyed state prepared once at startup, so checking a cookie costs one HMAC and no
//! allocation; `cookie` still builds the `Set-Cookie` headers and decodes our cookies. Older
//! secrets (`previous_secrets`) still verify, new cookies use the current one: rotation
//! without logging everybody out.
//!
//! The MAC authenticates a cookie's *value* only, not its name, so every value names its
//! own purpose and binding and is checked field by field:
//! - session: `s1|<session id>|<issued at>`; older than `cookie_lifetime` is expired;
//! - order:   `o1|<session id>|<resource hash>|<order id>|<verified at>`; only valid together
//!   with the same session and for the same resource, so an order cannot be swapped in from
//!   another browser or another page. `verified at` is the time the merchant last said "paid"
//!   for this session (0 = never): the signed, expiring payment grant that lets any replica
//!   with the same secret serve a paid page without asking the merchant again until
//!   `recheck_interval` has passed;
//! - return:  `r1|<session id>|<resource hash>|<path>`: for `scope = "prefix"`, the page that
//!   was asked for, so the customer lands on it after paying at the prefix's fulfillment URL.
//!
//! A cookie that is missing, malformed, forged, expired, or bound to something else is
//! treated as absent, never as an error. Everything here is pure: time comes in as a value.

use std::borrow::Cow;
use std::fmt;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use cookie::{Cookie, Key, SameSite};
use hmac::{Hmac, Mac};
use http::header::COOKIE;
use http::{HeaderMap, HeaderValue};
use sha2::{Digest, Sha256, Sha512};

use crate::config::{Secret, SessionConfig};

/// Every cookie of the gateway starts with this; they are removed before forwarding.
pub const COOKIE_PREFIX: &str = "taler_paywall_";
/// The session cookie over plain HTTP.
pub const SESSION_COOKIE: &str = "taler_paywall_session";
/// The session cookie over HTTPS at the root: the `__Host-` prefix stops a sibling
/// subdomain from planting a session (fixation by cookie tossing).
pub const SESSION_COOKIE_HOST: &str = "__Host-taler_paywall_session";
/// Prefix of per-resource order cookies.
pub const ORDER_COOKIE_PREFIX: &str = "taler_paywall_o_";
/// Prefix of per-resource return-to cookies.
pub const RETURN_COOKIE_PREFIX: &str = "taler_paywall_r_";

/// Whether a cookie name belongs to the gateway (and must not reach the origin).
pub fn is_gateway_cookie(name: &str) -> bool {
    name.starts_with(COOKIE_PREFIX) || name == SESSION_COOKIE_HOST
}

/// An unguessable browser session id (128 random bits, base64url).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct SessionId(String);

impl SessionId {
    /// A fresh random session id.
    pub fn generate() -> Self {
        let bytes: [u8; 16] = rand::random();
        SessionId(URL_SAFE_NO_PAD.encode(bytes))
    }

    /// The id as sent to the merchant in `session_id=`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    fn parse(s: &str) -> Option<Self> {
        (s.len() == 22 && s.bytes().all(is_b64url)).then(|| SessionId(s.to_owned()))
    }
}

impl fmt::Debug for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Session ids are bearer credentials for paid content: log only a prefix.
        write!(f, "SessionId({}…)", &self.0[..6.min(self.0.len())])
    }
}

fn is_b64url(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-' || b == b'_'
}

/// A verified session cookie.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// The session id.
    pub id: SessionId,
    /// When the session was created (unix seconds).
    pub issued_at: u64,
}

impl Session {
    /// Whether the session is within its lifetime at `now` (and not issued more than five
    /// minutes in the future, which allows for clock skew between replicas).
    pub fn is_current(&self, settings: &CookieSettings, now: u64) -> bool {
        self.issued_at <= now + 300 && now.saturating_sub(self.issued_at) <= settings.lifetime
    }
}

/// A verified order cookie for one resource in one session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderCookie {
    /// The merchant's order id.
    pub order_id: String,
    /// When the merchant last confirmed payment under this session (unix seconds), if ever.
    pub verified_at: Option<u64>,
}

/// The signing keys: the current one and those of previous secrets, each as an HMAC-SHA256
/// state already keyed (cloned per use, so no key schedule runs per request).
#[derive(Clone)]
pub struct CookieKeys {
    macs: Vec<Hmac<Sha256>>,
}

impl fmt::Debug for CookieKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CookieKeys({} keys, <redacted>)", self.macs.len())
    }
}

/// Length of the base64 MAC in front of a signed value (32 bytes, standard base64, padded):
/// the same as `cookie`'s `SignedJar`.
const MAC_B64_LEN: usize = 44;

fn derive_key(secret: &Secret) -> Key {
    let mut mac = <Hmac<Sha512> as Mac>::new_from_slice(b"taler-paywall cookie key v1")
        .unwrap_or_else(|_| unreachable!("HMAC accepts keys of any length"));
    mac.update(secret.expose().as_bytes());
    let bytes = mac.finalize().into_bytes();
    // 64 bytes, exactly what `Key` needs; `try_from` cannot fail on that length.
    Key::try_from(bytes.as_slice()).unwrap_or_else(|_| unreachable!("64-byte key"))
}

fn signing_mac(secret: &Secret) -> Hmac<Sha256> {
    // The half of the derived key that `cookie`'s `SignedJar` signs with.
    <Hmac<Sha256> as Mac>::new_from_slice(derive_key(secret).signing())
        .unwrap_or_else(|_| unreachable!("HMAC accepts keys of any length"))
}

impl CookieKeys {
    /// Derives the keys from the configured secrets.
    pub fn new(config: &SessionConfig) -> Self {
        let mut macs = vec![signing_mac(&config.secret)];
        macs.extend(config.previous_secrets.iter().map(signing_mac));
        CookieKeys { macs }
    }

    /// `base64(HMAC(value)) || value`, with the current key.
    fn sign(&self, value: &str) -> String {
        let tag = self.macs[0]
            .clone()
            .chain_update(value.as_bytes())
            .finalize();
        let mut out = String::with_capacity(MAC_B64_LEN + value.len());
        STANDARD.encode_string(tag.into_bytes(), &mut out);
        out.push_str(value);
        out
    }

    /// The value inside a signed cookie value, if one of the keys signed it. Compares the
    /// MAC in constant time; allocates nothing.
    fn verify<'a>(&self, raw_value: &'a str) -> Option<&'a str> {
        if raw_value.len() < MAC_B64_LEN || !raw_value.is_char_boundary(MAC_B64_LEN) {
            return None;
        }
        let (digest, value) = raw_value.split_at(MAC_B64_LEN);
        let mut tag = [0u8; 48];
        let n = STANDARD.decode_slice(digest, &mut tag).ok()?;
        let tag = &tag[..n];
        self.macs
            .iter()
            .any(|mac| {
                mac.clone()
                    .chain_update(value.as_bytes())
                    .verify_slice(tag)
                    .is_ok()
            })
            .then_some(value)
    }
}

/// Where and how cookies are set.
#[derive(Debug, Clone)]
pub struct CookieSettings {
    /// `Secure` (and the `__Host-` session name when `path_base` is empty).
    pub secure: bool,
    /// The path of `server.public_url` without a trailing slash ("" at the root).
    pub path_base: String,
    /// Session lifetime in seconds; also the `Max-Age` of every cookie.
    pub lifetime: u64,
}

impl CookieSettings {
    /// The name of the session cookie under these settings.
    pub fn session_name(&self) -> &'static str {
        if self.secure && self.path_base.is_empty() {
            SESSION_COOKIE_HOST
        } else {
            SESSION_COOKIE
        }
    }

    fn build(&self, name: &str, value: String, path: &str, max_age: i64) -> Option<HeaderValue> {
        let mut c = Cookie::new(name.to_owned(), value);
        c.set_path(path.to_owned());
        c.set_http_only(true);
        c.set_same_site(SameSite::Lax);
        c.set_secure(self.secure);
        c.set_max_age(cookie::time::Duration::seconds(max_age));
        // Signed session and order values are base64 and `|`-separated fields, all of them
        // cookie-octets (RFC 6265 4.1.1): written as they are, they need no decoding on every
        // request. Anything else (a return-to path) is percent-encoded.
        let plain = c.value().bytes().all(is_plain_cookie_octet);
        let line = if plain {
            c.to_string()
        } else {
            c.encoded().to_string()
        };
        HeaderValue::from_str(&line).ok()
    }
}

/// A cookie-octet (RFC 6265 4.1.1) other than `%`, which [`RequestCookies`] would decode.
fn is_plain_cookie_octet(b: u8) -> bool {
    matches!(b, 0x21 | 0x23..=0x24 | 0x26..=0x2B | 0x2D..=0x3A | 0x3C..=0x5B | 0x5D..=0x7E)
}

/// A short, stable hash of a resource name, used in cookie names and values.
pub fn resource_hash(resource: &str) -> String {
    let digest = Sha256::digest(resource.as_bytes());
    URL_SAFE_NO_PAD.encode(&digest[..12])
}

/// The cookie `Path` for a resource: the resource's path without a trailing slash (so that
/// `/premium` and `/premium/x` both carry the cookie of `/premium/`), or `fallback` when the
/// path holds characters that cannot appear in a `Path` attribute.
pub fn cookie_path(settings: &CookieSettings, resource: &str, fallback: &str) -> String {
    let ok = |p: &str| {
        p.bytes()
            .all(|b| b.is_ascii_graphic() && !matches!(b, b';' | b',' | b'"' | b'\\'))
    };
    let trim = |p: &str| {
        let t = p.trim_end_matches('/');
        if t.is_empty() {
            "/".to_owned()
        } else {
            t.to_owned()
        }
    };
    let chosen = if ok(resource) {
        trim(resource)
    } else {
        trim(fallback)
    };
    if settings.path_base.is_empty() {
        chosen
    } else if chosen == "/" {
        settings.path_base.clone()
    } else {
        format!("{}{}", settings.path_base, chosen)
    }
}

/// The gateway's cookies of a request, parsed once. Only pairs whose name is one of ours are
/// kept; the site's cookies are skipped without allocating. A pair is split as `cookie`'s
/// parser splits it (name before the first `=`, both sides trimmed); the value is
/// percent-decoded only when it holds a `%`: signed session and order values are written
/// unencoded (see [`CookieSettings`]) and need no decoding; return-to values and cookies
/// written before that change are encoded.
#[derive(Debug, Default)]
pub struct RequestCookies<'a> {
    cookies: Vec<(&'a str, Cow<'a, str>)>,
}

/// Most gateway cookies looked at in one request.
const MAX_OWN_COOKIES: usize = 64;

impl<'a> RequestCookies<'a> {
    /// Parses every `Cookie` header (HTTP/2 may split them). Unparsable pieces are skipped.
    pub fn parse(headers: &'a HeaderMap) -> Self {
        let mut cookies = Vec::new();
        for v in headers.get_all(COOKIE) {
            let Ok(s) = v.to_str() else { continue };
            let bytes = s.as_bytes();
            let mut from = 0;
            // `;` and `=` are ASCII, so every cut is a char boundary.
            for end in memchr::memchr_iter(b';', bytes).chain(std::iter::once(bytes.len())) {
                let pair = &s[from..end];
                from = end + 1;
                let Some(eq) = memchr::memchr(b'=', pair.as_bytes()) else {
                    continue;
                };
                let name = pair[..eq].trim_ascii();
                if !is_gateway_cookie(name) || cookies.len() >= MAX_OWN_COOKIES {
                    continue;
                }
                let value = pair[eq + 1..].trim_ascii();
                let value = if memchr::memchr(b'%', value.as_bytes()).is_some() {
                    match percent_encoding::percent_decode_str(value).decode_utf8() {
                        Ok(v) => v,
                        Err(_) => continue,
                    }
                } else {
                    Cow::Borrowed(value)
                };
                cookies.push((name, value));
            }
        }
        RequestCookies { cookies }
    }

    fn values<'s>(&'s self, name: &'s str) -> impl Iterator<Item = &'s str> + 's {
        self.named(move |n| n == name)
    }

    /// The values of the cookies named `prefix` + `hash` (no name is built).
    fn values_of<'s>(
        &'s self,
        prefix: &'s str,
        hash: &'s str,
    ) -> impl Iterator<Item = &'s str> + 's {
        self.named(move |n| n.strip_prefix(prefix) == Some(hash))
    }

    fn named<'s>(&'s self, is: impl Fn(&str) -> bool + 's) -> impl Iterator<Item = &'s str> + 's {
        self.cookies
            .iter()
            .filter(move |(n, _)| is(n))
            .map(|(_, v)| v.as_ref())
    }

    /// The valid session, if any. Several candidates (e.g. a planted one) are tried in order
    /// and the first that verifies and has not expired wins.
    pub fn session(
        &self,
        keys: &CookieKeys,
        settings: &CookieSettings,
        now: u64,
    ) -> Option<Session> {
        let name = settings.session_name();
        self.values(name).find_map(|raw| {
            let v = keys.verify(raw)?;
            let mut it = v.split('|');
            if it.next()? != "s1" {
                return None;
            }
            let id = SessionId::parse(it.next()?)?;
            let issued_at: u64 = it.next()?.parse().ok()?;
            let session = Session { id, issued_at };
            (it.next().is_none() && session.is_current(settings, now)).then_some(session)
        })
    }

    /// Whether these cookies hold exactly one session cookie and exactly one order cookie
    /// for `resource`, so that which of them [`Self::session`] and [`Self::order`] find does
    /// not depend on the time (what [`crate::cookie_memo`] needs to remember a result).
    pub fn is_unambiguous(&self, settings: &CookieSettings, resource: &str) -> bool {
        // The session count first: it needs no hash.
        self.values(settings.session_name()).count() == 1
            && self
                .values_of(ORDER_COOKIE_PREFIX, &resource_hash(resource))
                .count()
                == 1
    }

    /// The valid order cookie of `resource` in `session`, if any.
    pub fn order(
        &self,
        keys: &CookieKeys,
        session: &SessionId,
        resource: &str,
    ) -> Option<OrderCookie> {
        let hash = resource_hash(resource);
        let found = self.values_of(ORDER_COOKIE_PREFIX, &hash).find_map(|raw| {
            let v = keys.verify(raw)?;
            let mut it = v.split('|');
            if it.next()? != "o1" || it.next()? != session.as_str() || it.next()? != hash {
                return None;
            }
            let order_id = it.next()?;
            if !valid_order_id(order_id) {
                return None;
            }
            let verified: u64 = it.next()?.parse().ok()?;
            if it.next().is_some() {
                return None;
            }
            Some(OrderCookie {
                order_id: order_id.to_owned(),
                verified_at: (verified > 0).then_some(verified),
            })
        });
        found
    }

    /// The page to return to after buying `resource` in `session`, if one was recorded.
    pub fn return_to(
        &self,
        keys: &CookieKeys,
        session: &SessionId,
        resource: &str,
    ) -> Option<String> {
        let hash = resource_hash(resource);
        let found = self.values_of(RETURN_COOKIE_PREFIX, &hash).find_map(|raw| {
            let v = keys.verify(raw)?;
            let mut it = v.splitn(4, '|');
            if it.next()? != "r1" || it.next()? != session.as_str() || it.next()? != hash {
                return None;
            }
            Some(it.next()?.to_owned())
        });
        found
    }
}

/// Whether `s` can be an order id we store and put into a URL path segment. Order ids come
/// from the merchant; this keeps cookie values and merchant URLs unambiguous.
pub fn valid_order_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~'))
}

/// `Set-Cookie` for a session.
pub fn set_session(
    keys: &CookieKeys,
    settings: &CookieSettings,
    session: &Session,
) -> Option<HeaderValue> {
    let name = settings.session_name();
    let value = keys.sign(&format!("s1|{}|{}", session.id.as_str(), session.issued_at));
    let path = if settings.path_base.is_empty() {
        "/"
    } else {
        &settings.path_base
    };
    settings.build(name, value, path, settings.lifetime as i64)
}

/// `Set-Cookie` for the order of `resource`.
pub fn set_order(
    keys: &CookieKeys,
    settings: &CookieSettings,
    session: &SessionId,
    resource: &str,
    path: &str,
    order: &OrderCookie,
) -> Option<HeaderValue> {
    if !valid_order_id(&order.order_id) {
        return None;
    }
    let hash = resource_hash(resource);
    let name = format!("{ORDER_COOKIE_PREFIX}{hash}");
    let value = keys.sign(&format!(
        "o1|{}|{}|{}|{}",
        session.as_str(),
        hash,
        order.order_id,
        order.verified_at.unwrap_or(0)
    ));
    settings.build(&name, value, path, settings.lifetime as i64)
}

/// `Set-Cookie` recording the page to return to (a normalised path under the prefix), or
/// clearing it when `target` is `None`.
pub fn set_return_to(
    keys: &CookieKeys,
    settings: &CookieSettings,
    session: &SessionId,
    resource: &str,
    path: &str,
    target: Option<&str>,
) -> Option<HeaderValue> {
    let hash = resource_hash(resource);
    let name = format!("{RETURN_COOKIE_PREFIX}{hash}");
    match target {
        Some(t) if t.len() <= 1024 => {
            let value = keys.sign(&format!("r1|{}|{}|{}", session.as_str(), hash, t));
            settings.build(&name, value, path, 3600)
        }
        Some(_) => None,
        None => settings.build(&name, String::new(), path, 0),
    }
}

/// Removes the gateway's cookies from the `Cookie` header(s), keeping the site's. Returns
/// whether anything was removed. The header is rebuilt only in that case.
pub fn strip_gateway_cookies(headers: &mut HeaderMap) -> bool {
    // On the bytes: a header that is not UTF-8 can still carry a gateway cookie.
    let prefix = COOKIE_PREFIX.as_bytes();
    let found = headers
        .get_all(COOKIE)
        .iter()
        .any(|v| v.as_bytes().windows(prefix.len()).any(|w| w == prefix));
    if !found {
        return false;
    }
    let mut kept: Vec<String> = Vec::new();
    for v in headers.get_all(COOKIE) {
        // A non-UTF-8 Cookie header cannot be parsed safely; it is dropped whole.
        let Ok(s) = v.to_str() else { continue };
        for piece in s.split(';') {
            let piece = piece.trim();
            if piece.is_empty() {
                continue;
            }
            let name = piece.split('=').next().unwrap_or("").trim();
            if !is_gateway_cookie(name) {
                kept.push(piece.to_owned());
            }
        }
    }
    headers.remove(COOKIE);
    if !kept.is_empty() {
        if let Ok(v) = HeaderValue::from_str(&kept.join("; ")) {
            headers.insert(COOKIE, v);
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn config(secret: &str, previous: &[&str]) -> SessionConfig {
        SessionConfig {
            secret: Secret::new(secret),
            previous_secrets: previous.iter().map(|s| Secret::new(*s)).collect(),
            recheck_interval: Duration::from_secs(300),
            cookie_lifetime: Duration::from_secs(3600),
        }
    }

    const A: &str = "a secret of at least thirty-two bytes, number one";
    const B: &str = "a secret of at least thirty-two bytes, number two";

    fn settings() -> CookieSettings {
        CookieSettings {
            secure: false,
            path_base: String::new(),
            lifetime: 3600,
        }
    }

    fn headers_from(set_cookies: &[HeaderValue]) -> HeaderMap {
        let pairs: Vec<String> = set_cookies
            .iter()
            .map(|v| {
                let c = Cookie::parse_encoded(v.to_str().unwrap().to_owned()).unwrap();
                format!("{}={}", c.name(), c.value())
            })
            .collect();
        let mut h = HeaderMap::new();
        h.insert(COOKIE, HeaderValue::from_str(&pairs.join("; ")).unwrap());
        h
    }

    #[test]
    fn session_round_trips_and_expires() {
        let keys = CookieKeys::new(&config(A, &[]));
        let s = Session {
            id: SessionId::generate(),
            issued_at: 1000,
        };
        let h = headers_from(&[set_session(&keys, &settings(), &s).unwrap()]);
        let c = RequestCookies::parse(&h);
        assert_eq!(c.session(&keys, &settings(), 1000), Some(s.clone()));
        assert_eq!(c.session(&keys, &settings(), 1000 + 3600), Some(s));
        assert_eq!(c.session(&keys, &settings(), 1000 + 3601), None, "expired");
        assert_eq!(
            c.session(&keys, &settings(), 100),
            None,
            "issued in the future"
        );
    }

    /// What a browser sends back: `name=value` of the `Set-Cookie`, verbatim (still encoded).
    #[test]
    fn cookies_round_trip_as_a_browser_returns_them() {
        let keys = CookieKeys::new(&config(A, &[]));
        let s = Session {
            id: SessionId::generate(),
            issued_at: 1000,
        };
        let o = OrderCookie {
            order_id: "2026.330-ABC".into(),
            verified_at: Some(5),
        };
        let set = [
            set_session(&keys, &settings(), &s).unwrap(),
            set_order(&keys, &settings(), &s.id, "/premium/a", "/", &o).unwrap(),
            set_return_to(&keys, &settings(), &s.id, "/p/", "/p", Some("/p/a%20b")).unwrap(),
        ];
        let echoed: Vec<&str> = set
            .iter()
            .map(|v| v.to_str().unwrap().split(';').next().unwrap())
            .collect();
        // Signed values are cookie-octets and go out as they are; a path with `%` is encoded.
        assert!(
            echoed[0].contains('|') && !echoed[0].contains('%'),
            "{}",
            echoed[0]
        );
        assert!(
            echoed[1].contains('|') && !echoed[1].contains('%'),
            "{}",
            echoed[1]
        );
        assert!(
            echoed[2].contains("%7C") && echoed[2].contains("%2520"),
            "{}",
            echoed[2]
        );
        let mut h = HeaderMap::new();
        h.insert(COOKIE, HeaderValue::from_str(&echoed.join("; ")).unwrap());
        let c = RequestCookies::parse(&h);
        assert_eq!(c.session(&keys, &settings(), 1000), Some(s.clone()));
        assert_eq!(c.order(&keys, &s.id, "/premium/a"), Some(o));
        assert_eq!(
            c.return_to(&keys, &s.id, "/p/").as_deref(),
            Some("/p/a%20b")
        );
    }

    /// Cookies written before values went out unencoded (percent-encoded by `cookie`) stay
    /// valid.
    #[test]
    fn percent_encoded_cookies_still_verify() {
        let keys = CookieKeys::new(&config(A, &[]));
        let s = Session {
            id: SessionId::generate(),
            issued_at: 1000,
        };
        let value = keys.sign(&format!("s1|{}|{}", s.id.as_str(), s.issued_at));
        let old = Cookie::new(SESSION_COOKIE, value).encoded().to_string();
        assert!(old.contains("%7C"), "{old}");
        let h = headers_from(&[HeaderValue::from_str(&old).unwrap()]);
        let c = RequestCookies::parse(&h);
        assert_eq!(c.session(&keys, &settings(), 1000), Some(s));
    }

    #[test]
    fn foreign_and_tampered_cookies_are_absent() {
        let keys_a = CookieKeys::new(&config(A, &[]));
        let keys_b = CookieKeys::new(&config(B, &[]));
        let s = Session {
            id: SessionId::generate(),
            issued_at: 1000,
        };
        let v = set_session(&keys_a, &settings(), &s).unwrap();
        let h = headers_from(std::slice::from_ref(&v));
        assert!(RequestCookies::parse(&h)
            .session(&keys_b, &settings(), 1000)
            .is_none());
        // Flip one character of the value.
        let mut raw = h.get(COOKIE).unwrap().to_str().unwrap().to_owned();
        let last = raw.pop().unwrap();
        raw.push(if last == 'A' { 'B' } else { 'A' });
        let mut h2 = HeaderMap::new();
        h2.insert(COOKIE, HeaderValue::from_str(&raw).unwrap());
        assert!(RequestCookies::parse(&h2)
            .session(&keys_a, &settings(), 1000)
            .is_none());
        // Unsigned plain values.
        let mut h3 = HeaderMap::new();
        h3.insert(
            COOKIE,
            HeaderValue::from_static("taler_paywall_session=s1|AAAAAAAAAAAAAAAAAAAAAA|1000"),
        );
        assert!(RequestCookies::parse(&h3)
            .session(&keys_a, &settings(), 1000)
            .is_none());
    }

    #[test]
    fn rotation_accepts_previous_secrets_and_signs_with_the_newest() {
        let old = CookieKeys::new(&config(A, &[]));
        let rotated = CookieKeys::new(&config(B, &[A]));
        let s = Session {
            id: SessionId::generate(),
            issued_at: 1000,
        };
        let h = headers_from(&[set_session(&old, &settings(), &s).unwrap()]);
        assert!(RequestCookies::parse(&h)
            .session(&rotated, &settings(), 1000)
            .is_some());
        let h = headers_from(&[set_session(&rotated, &settings(), &s).unwrap()]);
        assert!(RequestCookies::parse(&h)
            .session(&old, &settings(), 1000)
            .is_none());
        let only_b = CookieKeys::new(&config(B, &[]));
        assert!(RequestCookies::parse(&h)
            .session(&only_b, &settings(), 1000)
            .is_some());
    }

    #[test]
    fn order_cookie_is_bound_to_session_and_resource() {
        let keys = CookieKeys::new(&config(A, &[]));
        let s1 = SessionId::generate();
        let s2 = SessionId::generate();
        let o = OrderCookie {
            order_id: "2026.330-ABC".into(),
            verified_at: Some(5),
        };
        let v = set_order(&keys, &settings(), &s1, "/premium/a", "/premium/a", &o).unwrap();
        let h = headers_from(&[v]);
        let c = RequestCookies::parse(&h);
        assert_eq!(c.order(&keys, &s1, "/premium/a"), Some(o));
        assert_eq!(c.order(&keys, &s2, "/premium/a"), None, "other session");
        assert_eq!(c.order(&keys, &s1, "/premium/b"), None, "other resource");
    }

    #[test]
    fn order_value_swapped_under_another_name_is_rejected() {
        let keys = CookieKeys::new(&config(A, &[]));
        let s = SessionId::generate();
        let o = OrderCookie {
            order_id: "X".into(),
            verified_at: None,
        };
        let v = set_order(&keys, &settings(), &s, "/premium/a", "/", &o).unwrap();
        let c = Cookie::parse_encoded(v.to_str().unwrap().to_owned()).unwrap();
        let other = format!(
            "{ORDER_COOKIE_PREFIX}{}={}",
            resource_hash("/premium/b"),
            c.value()
        );
        let mut h = HeaderMap::new();
        h.insert(COOKIE, HeaderValue::from_str(&other).unwrap());
        assert_eq!(
            RequestCookies::parse(&h).order(&keys, &s, "/premium/b"),
            None
        );
    }

    #[test]
    fn return_to_round_trips() {
        let keys = CookieKeys::new(&config(A, &[]));
        let s = SessionId::generate();
        let v = set_return_to(&keys, &settings(), &s, "/p/", "/p", Some("/p/x|y")).unwrap();
        let h = headers_from(&[v]);
        let c = RequestCookies::parse(&h);
        assert_eq!(c.return_to(&keys, &s, "/p/"), Some("/p/x|y".to_owned()));
    }

    #[test]
    fn set_cookie_attributes() {
        let keys = CookieKeys::new(&config(A, &[]));
        let s = Session {
            id: SessionId::generate(),
            issued_at: 1,
        };
        let secure = CookieSettings {
            secure: true,
            path_base: String::new(),
            lifetime: 60,
        };
        let v = set_session(&keys, &secure, &s).unwrap();
        let v = v.to_str().unwrap();
        assert!(v.starts_with("__Host-taler_paywall_session="), "{v}");
        for attr in ["HttpOnly", "SameSite=Lax", "Secure", "Path=/", "Max-Age=60"] {
            assert!(v.contains(attr), "{attr} missing in {v}");
        }
        let plain = set_session(&keys, &settings(), &s).unwrap();
        assert!(!plain.to_str().unwrap().contains("Secure"));
    }

    #[test]
    fn signatures_keep_the_signed_jar_format() {
        // Cookies issued before the MAC was computed here (by `cookie`'s `SignedJar`) still
        // verify, and ours verify there: the format did not change.
        use cookie::CookieJar;
        let cfg = config(A, &[]);
        let keys = CookieKeys::new(&cfg);
        let key = derive_key(&cfg.secret);
        let mut jar = CookieJar::new();
        jar.signed_mut(&key)
            .add(Cookie::new("n", "s1|AAAAAAAAAAAAAAAAAAAAAA|7"));
        let by_jar = jar.get("n").unwrap().value().to_owned();
        assert_eq!(keys.verify(&by_jar), Some("s1|AAAAAAAAAAAAAAAAAAAAAA|7"));
        assert_eq!(keys.sign("s1|AAAAAAAAAAAAAAAAAAAAAA|7"), by_jar);
        let mut jar = CookieJar::new();
        jar.add_original(Cookie::new("n", keys.sign("o1|x")));
        assert_eq!(
            jar.signed(&key).get("n").map(|c| c.value().to_owned()),
            Some("o1|x".to_owned())
        );
    }

    #[test]
    fn verify_refuses_what_is_not_a_signed_value() {
        let keys = CookieKeys::new(&config(A, &[]));
        let good = keys.sign("s1|v");
        assert_eq!(keys.verify(&good), Some("s1|v"));
        for bad in [
            String::new(),
            "s1|v".to_owned(),
            good[..43].to_owned(),
            format!("{}!{}", &good[..43], &good[44..]),
            format!("{}é{}", &good[..43], &good[44..]),
            format!("{}|w", good),
            good.replace("s1|v", "s1|w"),
        ] {
            assert_eq!(keys.verify(&bad), None, "{bad:?}");
        }
    }

    #[test]
    fn only_gateway_cookies_are_parsed() {
        let keys = CookieKeys::new(&config(A, &[]));
        let s = Session {
            id: SessionId::generate(),
            issued_at: 1000,
        };
        let set = set_session(&keys, &settings(), &s).unwrap();
        let pair = set.to_str().unwrap().split(';').next().unwrap().to_owned();
        let mut h = HeaderMap::new();
        // Site cookies around ours, odd spacing, a pair without `=`, a second header.
        h.append(
            COOKIE,
            HeaderValue::from_str("site=1;junk;  other=\"q\" ").unwrap(),
        );
        h.append(
            COOKIE,
            HeaderValue::from_str(&format!(" {pair} ;x=2")).unwrap(),
        );
        let c = RequestCookies::parse(&h);
        assert_eq!(c.cookies.len(), 1, "only ours is kept");
        assert_eq!(c.session(&keys, &settings(), 1000), Some(s));
        // At most MAX_OWN_COOKIES of ours are looked at.
        let many = (0..100)
            .map(|i| format!("taler_paywall_o_{i}=x"))
            .collect::<Vec<_>>()
            .join("; ");
        let mut h = HeaderMap::new();
        h.insert(COOKIE, HeaderValue::from_str(&many).unwrap());
        assert_eq!(RequestCookies::parse(&h).cookies.len(), MAX_OWN_COOKIES);
    }

    #[test]
    fn cookie_paths() {
        let st = settings();
        assert_eq!(cookie_path(&st, "/premium/", "/premium"), "/premium");
        assert_eq!(cookie_path(&st, "/premium/a", "/premium"), "/premium/a");
        assert_eq!(cookie_path(&st, "/premium/a;b", "/premium"), "/premium");
        assert_eq!(cookie_path(&st, "/", "/"), "/");
        let based = CookieSettings {
            path_base: "/shop".into(),
            ..settings()
        };
        assert_eq!(
            cookie_path(&based, "/premium/a", "/premium"),
            "/shop/premium/a"
        );
    }

    #[test]
    fn strips_only_gateway_cookies() {
        let mut h = HeaderMap::new();
        h.append(
            COOKIE,
            HeaderValue::from_static("site=1; taler_paywall_session=x; b=2"),
        );
        h.append(COOKIE, HeaderValue::from_static("taler_paywall_o_abc=y"));
        assert!(strip_gateway_cookies(&mut h));
        assert_eq!(h.get_all(COOKIE).iter().count(), 1);
        assert_eq!(h.get(COOKIE).unwrap(), "site=1; b=2");
        let mut only = HeaderMap::new();
        only.insert(
            COOKIE,
            HeaderValue::from_static("__Host-taler_paywall_session=x"),
        );
        assert!(strip_gateway_cookies(&mut only));
        assert!(only.get(COOKIE).is_none());
        // obs-text elsewhere in the header must not let the session cookie through.
        let mut non_utf8 = HeaderMap::new();
        non_utf8.insert(
            COOKIE,
            HeaderValue::from_bytes(b"taler_paywall_session=x; a=\xff").unwrap(),
        );
        assert!(strip_gateway_cookies(&mut non_utf8));
        assert!(non_utf8.get(COOKIE).is_none());
        let mut none = HeaderMap::new();
        none.insert(COOKIE, HeaderValue::from_static("a=1"));
        assert!(!strip_gateway_cookies(&mut none));
        assert_eq!(none.get(COOKIE).unwrap(), "a=1");
    }
}
