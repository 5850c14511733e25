//! Which requests are protected: the `[[protect]]` rules and how a path is matched.
//!
//! Matching is done on a [`NormalizedPath`] only (never the query), on whole segments
//! (`/premium/` protects `/premium` and `/premium/a`, not `/premiumx`), and the longest
//! matching prefix wins. Two deliberate widenings make the matcher fail closed against origins
//! that are more liberal than a plain static server:
//! - segments compare ASCII case-insensitively, so `/PREMIUM/a` is protected by `/premium/`
//!   (case-insensitive file systems and routers would serve it);
//! - a path segment matches a prefix segment also when it continues with `;` (matrix
//!   parameters), so `/premium;x=1/a` is protected (servlet containers strip `;…`).

use crate::amount::Amount;
use crate::config::{ProtectRule, Scope};
use crate::path::NormalizedPath;

/// One protected area, as the gateway uses it.
#[derive(Debug, Clone)]
pub struct ProtectedRoute {
    /// Normalised prefix without trailing slash (`/` for the root).
    pub prefix: String,
    /// The prefix's segments, percent-decoded once here (matching decodes only the request's).
    segments: Vec<Vec<u8>>,
    /// Price of one purchase.
    pub price: Amount,
    /// Shown in the wallet.
    pub summary: String,
    /// Page or prefix scope.
    pub scope: Scope,
    /// What a `prefix`-scope route sells: the prefix with a trailing slash, made once here.
    prefix_resource: String,
}

impl ProtectedRoute {
    fn matches(&self, path: &NormalizedPath) -> bool {
        let mut segs = path.segments();
        self.segments.iter().all(|want| match segs.next() {
            Some(have) => segment_matches(want, have),
            None => false,
        })
    }

    /// The resource a request under this route buys: the path itself for `page` scope,
    /// the prefix (with a trailing slash) for `prefix` scope.
    pub fn resource<'a>(&'a self, path: &'a NormalizedPath) -> &'a str {
        match self.scope {
            Scope::Page => path.as_str(),
            Scope::Prefix => &self.prefix_resource,
        }
    }
}

/// Compares percent-decoded segments: origins decode `%27` to `'` and `%3B` to `;` before
/// they look at the file system or strip matrix parameters, so the encoded and the plain
/// spelling must match alike. `want` is already decoded; `have` is decoded on the fly,
/// without allocating (this runs for every request and every route).
fn segment_matches(want: &[u8], have: &str) -> bool {
    let mut have = percent_encoding::percent_decode_str(have);
    want.iter()
        .all(|w| have.next().is_some_and(|h| h.eq_ignore_ascii_case(w)))
        && matches!(have.next(), None | Some(b';'))
}

/// The set of protected routes.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// Longest prefix (most segments) first.
    routes: Vec<ProtectedRoute>,
}

impl Policy {
    /// Builds the policy from validated rules.
    pub fn new(rules: &[ProtectRule]) -> Self {
        let mut routes: Vec<ProtectedRoute> = rules
            .iter()
            .map(|r| ProtectedRoute {
                prefix: r.prefix.clone(),
                segments: r
                    .prefix
                    .split('/')
                    .filter(|s| !s.is_empty())
                    .map(|s| percent_encoding::percent_decode_str(s).collect())
                    .collect(),
                price: r.price.clone(),
                summary: r.summary.clone(),
                scope: r.scope,
                prefix_resource: if r.prefix == "/" {
                    "/".to_owned()
                } else {
                    format!("{}/", r.prefix)
                },
            })
            .collect();
        routes.sort_by_key(|r| std::cmp::Reverse(r.segments.len()));
        Policy { routes }
    }

    /// The protected route `path` falls under, if any (longest prefix wins).
    pub fn classify(&self, path: &NormalizedPath) -> Option<&ProtectedRoute> {
        self.routes.iter().find(|r| r.matches(path))
    }

    /// Whether any route is configured.
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// All routes, longest prefix first.
    pub fn routes(&self) -> &[ProtectedRoute] {
        &self.routes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::path::normalize;

    fn rule(prefix: &str, scope: Scope) -> ProtectRule {
        ProtectRule {
            prefix: prefix.to_owned(),
            price: "KUDOS:1".parse().unwrap(),
            summary: prefix.to_owned(),
            scope,
        }
    }

    #[test]
    fn matches_whole_segments_longest_first() {
        let policy = Policy::new(&[
            rule("/premium", Scope::Page),
            rule("/premium/gold", Scope::Prefix),
            rule("/docs/paid", Scope::Page),
            rule("/it's", Scope::Page),
            rule("/caf%C3%A9", Scope::Page),
        ]);
        let rows: &[(&str, Option<&str>)] = &[
            ("/premium", Some("/premium")),
            ("/premium/", Some("/premium")),
            ("/premium/a", Some("/premium")),
            ("/premium/gold", Some("/premium/gold")),
            ("/premium/gold/x/y", Some("/premium/gold")),
            ("/premium/golden", Some("/premium")),
            ("/premiumx", None),
            ("/premiu", None),
            ("/", None),
            ("/free/premium", None),
            ("/docs", None),
            ("/docs/paid/x", Some("/docs/paid")),
            ("/PREMIUM/a", Some("/premium")),
            ("/Premium", Some("/premium")),
            ("/premium;jsessionid=1/a", Some("/premium")),
            ("/docs/paid;x/y", Some("/docs/paid")),
            // Origins decode before matching files or stripping `;` parameters.
            ("/premium%3Bx=1/a", Some("/premium")),
            ("/PREMIUM%3b", Some("/premium")),
            ("/%70remium/gold%3B/x", Some("/premium/gold")),
            ("/it%27s/a", Some("/it's")),
            ("/IT's", Some("/it's")),
            ("/caf%c3%a9", Some("/caf%C3%A9")),
            ("/premium%3Ax", None),
        ];
        for (path, want) in rows {
            let p = normalize(path).unwrap();
            assert_eq!(
                policy.classify(&p).map(|r| r.prefix.as_str()),
                *want,
                "{path}"
            );
        }
    }

    #[test]
    fn root_prefix_protects_everything() {
        let policy = Policy::new(&[rule("/", Scope::Prefix)]);
        for path in ["/", "/a", "/a/b/"] {
            assert!(
                policy.classify(&normalize(path).unwrap()).is_some(),
                "{path}"
            );
        }
    }

    #[test]
    fn resource_depends_on_scope() {
        let page = Policy::new(&[rule("/premium", Scope::Page)]);
        let prefix = Policy::new(&[rule("/premium", Scope::Prefix)]);
        let p = normalize("/premium/a/b").unwrap();
        assert_eq!(page.classify(&p).unwrap().resource(&p), "/premium/a/b");
        assert_eq!(prefix.classify(&p).unwrap().resource(&p), "/premium/");
    }
}
