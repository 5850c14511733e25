//! A per-thread memo of verified gateway cookies, so that a paid browser's requests are not
//! re-verified (two HMACs, a resource hash, base64 and parsing) on every page and image.
//!
//! What it remembers is a pure function: given the same signing keys, the exact bytes of a
//! request's `Cookie` header and a resource, [`crate::session::RequestCookies`] always finds
//! the same signed session and order cookie. So once the full check has found both, the memo
//! maps (`Cookie` bytes, resource) to that session and order cookie, and a later request with
//! byte-identical cookies for the same resource gets them without the cryptography. What
//! depends on time is *not* remembered: the caller checks the session's lifetime and the
//! grant's freshness again on every hit, exactly as after a full check.
//!
//! Beside that, an entry can hold a *renewal*: a copy of the grant this process verified for
//! the same session and resource after the one in the cookie (the flow's (session, resource)
//! table, where a re-check leaves it), for a client that keeps sending the cookie with the
//! aged grant. It serves under the same rule as the table it was copied from, while it is
//! younger than `recheck_interval`, and is kept apart from what the cookies hold.
//!
//! Rules that keep it exact and safe:
//! - one memo belongs to one [`crate::flow::PaymentGate`] (one set of keys and cookie
//!   settings); a reload builds a new gate, and a thread's table is emptied the first time
//!   another gate uses it, so a retired secret's cookies are never answered from memory;
//! - an entry is stored only after a full check, only for a request with exactly one
//!   `Cookie` header of at most [`MAX_COOKIE_BYTES`], and only when that header holds exactly
//!   one session cookie and one order cookie for the resource (with several candidates the
//!   full check's choice could depend on the time, so those requests always take it);
//! - a hit needs the whole header and the resource to be equal, compared without an early
//!   exit so that timing tells nothing about another browser's cookies;
//! - the table is direct-mapped, [`SLOTS`] entries per serving thread, indexed by a seeded
//!   hash of the whole header and the resource: a new entry replaces whatever was in its slot, so memory is bounded (at most about
//!   `SLOTS` × (`MAX_COOKIE_BYTES` + resource) per thread) and a client can only evict
//!   entries, which costs their owners one full check.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};

use http::header::COOKIE;
use http::HeaderMap;

use crate::session::{OrderCookie, Session};

/// Entries per serving thread.
pub const SLOTS: usize = 1024;
/// Longest `Cookie` header that is remembered; longer ones are checked in full every time.
pub const MAX_COOKIE_BYTES: usize = 1024;

/// Ids of memos, so that a thread's table knows whose entries it holds.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

struct Entry {
    cookie: Box<[u8]>,
    resource: Box<str>,
    session: Session,
    order: OrderCookie,
    renewal: Option<OrderCookie>,
}

impl Entry {
    /// Whether this is the entry of exactly these `Cookie` bytes and `resource`.
    fn is_for(&self, cookie: &[u8], resource: &str) -> bool {
        same_bytes(&self.cookie, cookie)
            && same_bytes(self.resource.as_bytes(), resource.as_bytes())
    }
}

#[derive(Default)]
struct Table {
    owner: u64,
    slots: Vec<Option<Entry>>,
}

thread_local! {
    static TABLE: RefCell<Table> = RefCell::new(Table::default());
}

/// The memo of one payment gate; its entries live in each serving thread's table.
#[derive(Debug)]
pub struct CookieMemo {
    id: u64,
    seed: u64,
}

impl Default for CookieMemo {
    fn default() -> Self {
        Self::new()
    }
}

impl CookieMemo {
    /// A memo with a fresh id and hash key.
    pub fn new() -> Self {
        CookieMemo {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            seed: rand::random(),
        }
    }

    /// The session and order cookie a full check found in byte-identical cookies for
    /// `resource`, if this thread remembers them. Their time limits are the caller's to check.
    pub fn get(&self, headers: &HeaderMap, resource: &str) -> Option<(Session, OrderCookie)> {
        self.with(headers, resource, |s, o, _| (s.clone(), o.clone()))
    }

    /// [`CookieMemo::get`] without copying: `f` sees the remembered session, order cookie
    /// and renewal (if any) in place (it must not use this memo itself: the table is borrowed
    /// meanwhile).
    pub fn with<R>(
        &self,
        headers: &HeaderMap,
        resource: &str,
        f: impl FnOnce(&Session, &OrderCookie, Option<&OrderCookie>) -> R,
    ) -> Option<R> {
        let cookie = single_cookie(headers)?;
        let slot = self.slot(cookie, resource);
        // `try_with`: a thread being torn down has no table, which is a miss, not a panic.
        TABLE
            .try_with(|t| {
                let t = t.try_borrow().ok()?;
                if t.owner != self.id {
                    return None;
                }
                let e = t.slots.get(slot)?.as_ref()?;
                e.is_for(cookie, resource)
                    .then(|| f(&e.session, &e.order, e.renewal.as_ref()))
            })
            .ok()
            .flatten()
    }

    /// Remembers what a full check found in these cookies for `resource`. The caller stores
    /// only a session and order cookie that were the only candidates of their names.
    pub fn put(&self, headers: &HeaderMap, resource: &str, session: &Session, order: &OrderCookie) {
        self.with_slot(headers, resource, |t, slot, cookie| {
            if t.owner != self.id || t.slots.len() != SLOTS {
                // First use on this thread, or another gate (a reload) used it last.
                t.owner = self.id;
                t.slots.clear();
                t.slots.resize_with(SLOTS, || None);
            }
            if let Some(entry) = t.slots.get_mut(slot) {
                *entry = Some(Entry {
                    cookie: cookie.into(),
                    resource: resource.into(),
                    session: session.clone(),
                    order: order.clone(),
                    renewal: None,
                });
            }
        });
    }

    /// Gives the entry of these cookies and `resource`, if this thread has one, `grant` as
    /// its renewal: a grant the caller found in its (session, resource) table for the
    /// entry's session, verified after the one the cookies hold.
    pub fn renew(&self, headers: &HeaderMap, resource: &str, grant: &OrderCookie) {
        self.with_slot(headers, resource, |t, slot, cookie| {
            if t.owner != self.id {
                return;
            }
            if let Some(Some(e)) = t.slots.get_mut(slot) {
                if e.is_for(cookie, resource) {
                    e.renewal = Some(grant.clone());
                }
            }
        });
    }

    /// Runs `f` on this thread's table, borrowed for writing, with the slot of (the only
    /// `Cookie` header, `resource`) and that header's bytes; nothing if the header cannot be
    /// remembered or the table is in use or gone (a thread being torn down).
    fn with_slot(
        &self,
        headers: &HeaderMap,
        resource: &str,
        f: impl FnOnce(&mut Table, usize, &[u8]),
    ) {
        let Some(cookie) = single_cookie(headers) else {
            return;
        };
        let slot = self.slot(cookie, resource);
        let _ = TABLE.try_with(|t| {
            if let Ok(mut t) = t.try_borrow_mut() {
                f(&mut t, slot, cookie);
            }
        });
    }

    /// The slot of (`cookie`, `resource`): a multiply-and-rotate fold over 8-byte words
    /// (the idea of `rustc-hash`), seeded per memo. It needs to spread, not to be
    /// unpredictable: an entry answers only byte-identical cookies, so a client that makes its
    /// cookies collide with someone else's can only evict that entry, which it could do as well
    /// by filling the table. Keyed SipHash cost three times as much per request.
    fn slot(&self, cookie: &[u8], resource: &str) -> usize {
        const K: u64 = 0xf135_7aea_2e62_a9c5;
        let mut h = self.seed;
        for part in [cookie, resource.as_bytes()] {
            let mut words = part.chunks_exact(8);
            for w in &mut words {
                let mut b = [0u8; 8];
                b.copy_from_slice(w);
                h = (h ^ u64::from_le_bytes(b)).wrapping_mul(K).rotate_left(26);
            }
            let mut b = [0u8; 8];
            b[..words.remainder().len()].copy_from_slice(words.remainder());
            // The length tells `ab` + `c` from `a` + `bc`.
            h = (h ^ u64::from_le_bytes(b) ^ (part.len() as u64))
                .wrapping_mul(K)
                .rotate_left(26);
        }
        // `SLOTS` is a power of two; the high bits of a product are the well-mixed ones.
        (h.wrapping_mul(K) >> (64 - SLOTS.trailing_zeros())) as usize
    }
}

/// The only `Cookie` header's bytes, if there is exactly one and it is short enough.
fn single_cookie(headers: &HeaderMap) -> Option<&[u8]> {
    let mut all = headers.get_all(COOKIE).iter();
    let cookie = all.next()?.as_bytes();
    (all.next().is_none() && cookie.len() <= MAX_COOKIE_BYTES).then_some(cookie)
}

/// Equal bytes, compared without stopping at the first difference (the lengths, which are
/// not secret, are compared first). `subtle`'s `ConstantTimeEq` (what `hmac` uses for MACs)
/// would put an optimisation barrier on every byte: about four times the cost for a 300-byte
/// header, on every paid request. Here one barrier on the folded difference keeps the
/// compiler from stopping early.
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::SessionId;
    use http::HeaderValue;

    fn headers(cookies: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for c in cookies {
            h.append(COOKIE, HeaderValue::from_str(c).unwrap());
        }
        h
    }

    fn found() -> (Session, OrderCookie) {
        (
            Session {
                id: SessionId::generate(),
                issued_at: 1_700_000_000,
            },
            OrderCookie {
                order_id: "2026.330-0001".into(),
                verified_at: Some(1_700_000_100),
            },
        )
    }

    #[test]
    fn remembers_exactly_the_same_cookies_for_the_same_resource() {
        let memo = CookieMemo::new();
        let (s, o) = found();
        let h = headers(&["a=1; taler_paywall_session=xyz"]);
        assert_eq!(memo.get(&h, "/premium/a"), None);
        memo.put(&h, "/premium/a", &s, &o);
        assert_eq!(memo.get(&h, "/premium/a"), Some((s.clone(), o.clone())));
        // Another resource, one byte more or less, one byte different: not remembered.
        assert_eq!(memo.get(&h, "/premium/b"), None);
        assert_eq!(
            memo.get(&headers(&["a=1; taler_paywall_session=xy"]), "/premium/a"),
            None
        );
        assert_eq!(
            memo.get(&headers(&["a=1; taler_paywall_session=xyZ"]), "/premium/a"),
            None
        );
        assert_eq!(
            memo.get(&headers(&["a=1; taler_paywall_session=xyz "]), "/premium/a"),
            None
        );
        assert_eq!(memo.get(&HeaderMap::new(), "/premium/a"), None);
    }

    #[test]
    fn a_renewal_goes_only_to_the_entry_of_the_same_cookies_and_resource() {
        let memo = CookieMemo::new();
        let (s, o) = found();
        let h = headers(&["taler_paywall_session=xyz"]);
        let renewal = |h: &HeaderMap, r: &str| memo.with(h, r, |_, _, n| n.cloned()).flatten();
        let fresher = OrderCookie {
            order_id: o.order_id.clone(),
            verified_at: Some(1_700_000_900),
        };
        // Nothing to renew yet; then only the entry of these very cookies and resource.
        memo.renew(&h, "/r", &fresher);
        assert_eq!(memo.get(&h, "/r"), None);
        memo.put(&h, "/r", &s, &o);
        memo.renew(&headers(&["taler_paywall_session=xyZ"]), "/r", &fresher);
        memo.renew(&h, "/other", &fresher);
        assert_eq!(renewal(&h, "/r"), None);
        memo.renew(&h, "/r", &fresher);
        assert_eq!(renewal(&h, "/r"), Some(fresher.clone()));
        // What the cookies hold is kept apart from it.
        assert_eq!(memo.get(&h, "/r"), Some((s.clone(), o.clone())));
        // Another gate's memo cannot renew this one's entries; a new full check's entry
        // starts without a renewal.
        CookieMemo::new().renew(&h, "/r", &o);
        assert_eq!(renewal(&h, "/r"), Some(fresher));
        memo.put(&h, "/r", &s, &o);
        assert_eq!(renewal(&h, "/r"), None);
    }

    #[test]
    fn split_or_long_cookie_headers_are_never_remembered() {
        let memo = CookieMemo::new();
        let (s, o) = found();
        let split = headers(&["a=1", "taler_paywall_session=xyz"]);
        memo.put(&split, "/r", &s, &o);
        assert_eq!(memo.get(&split, "/r"), None);
        let long = headers(&[&format!("x={}", "y".repeat(MAX_COOKIE_BYTES))]);
        memo.put(&long, "/r", &s, &o);
        assert_eq!(memo.get(&long, "/r"), None);
    }

    #[test]
    fn another_memo_never_sees_these_entries_and_takes_the_table_over() {
        let old = CookieMemo::new();
        let new = CookieMemo::new();
        let (s, o) = found();
        let h = headers(&["taler_paywall_session=xyz"]);
        old.put(&h, "/r", &s, &o);
        assert_eq!(new.get(&h, "/r"), None);
        new.put(&headers(&["other=1"]), "/r", &s, &o);
        // The new gate's first entry emptied the table of the old one's.
        assert_eq!(old.get(&h, "/r"), None);
    }

    #[test]
    fn entries_are_per_thread() {
        let memo = CookieMemo::new();
        let (s, o) = found();
        let h = headers(&["taler_paywall_session=xyz"]);
        memo.put(&h, "/r", &s, &o);
        std::thread::scope(|scope| {
            scope.spawn(|| assert_eq!(memo.get(&h, "/r"), None));
        });
        assert!(memo.get(&h, "/r").is_some());
    }

    #[test]
    fn the_table_stays_bounded() {
        let memo = CookieMemo::new();
        let (s, o) = found();
        for i in 0..(4 * SLOTS) {
            memo.put(&headers(&[&format!("c={i}")]), "/r", &s, &o);
        }
        TABLE.with(|t| assert_eq!(t.borrow().slots.len(), SLOTS));
        // Of the last SLOTS entries most are still there (direct-mapped, so some collided).
        let kept = (3 * SLOTS..4 * SLOTS)
            .filter(|i| memo.get(&headers(&[&format!("c={i}")]), "/r").is_some())
            .count();
        assert!(kept > SLOTS / 2, "kept {kept}");
    }

    #[test]
    fn slots_spread_over_the_table() {
        let memo = CookieMemo::new();
        let mut used = vec![0u32; SLOTS];
        // Cookies that differ only in a few bytes in the middle, as sessions do.
        for i in 0..(4 * SLOTS) {
            let c = format!("site=1; taler_paywall_session=AAAA{i:08}BBBB; x=1");
            used[memo.slot(c.as_bytes(), "/premium/a.html")] += 1;
        }
        let empty = used.iter().filter(|&&n| n == 0).count();
        // Four keys per slot on average: a uniform hash leaves about e^-4 (1.8 %) empty.
        assert!(empty < SLOTS / 20, "{empty} of {SLOTS} slots unused");
        assert!(
            used.iter().all(|&n| n < 20),
            "a slot got {:?}",
            used.iter().max()
        );
    }

    #[test]
    fn same_bytes_compares_everything() {
        assert!(same_bytes(b"", b""));
        assert!(same_bytes(b"abc", b"abc"));
        assert!(!same_bytes(b"abc", b"abd"));
        assert!(!same_bytes(b"abc", b"xbc"));
        assert!(!same_bytes(b"abc", b"ab"));
    }
}
