//! The one path normaliser.
//!
//! Every request path goes through [`normalize`] exactly once. Its output is used both to
//! decide whether the request is protected ([`crate::policy`]) and as the path sent to the
//! origin ([`crate::proxy`]), so the decision is always made on the string the origin serves.
//! This closes the whole class of canonicalisation bypasses listed in
//! `shared/spec/proxy-pitfalls.md` (§c 1–8): the gateway never decides on one string and
//! forwards another.
//!
//! Rules, in order:
//! - the path must be origin-form (start with `/`); `*` and anything else is rejected;
//! - raw bytes must be printable ASCII other than `\` (hyper already refuses most others);
//! - `%XX` must be two hex digits; escapes of unreserved characters (`A-Z a-z 0-9 - . _ ~`)
//!   are decoded, every other escape is kept with upper-case hex;
//! - escapes that would change the path's structure or hide a control byte are rejected:
//!   `%2F` (`/`), `%5C` (`\`), `%00`–`%1F`, `%7F`, and the never-valid UTF-8 lead bytes
//!   `%C0`, `%C1`, `%F5`–`%FF` (the "overlong `/`" trick);
//! - the fully decoded path must be valid UTF-8 (an origin that decodes could otherwise see a
//!   different string than we matched on);
//! - empty segments (`//`) are merged, `.` segments dropped, `..` pops a segment, and `..`
//!   above the root is rejected; a trailing slash is kept because it is meaningful to origins;
//! - an empty, `.` or `..` segment followed by `;` parameters (`/..;/x`) is rejected: servlet
//!   containers strip the parameters and would then resolve it.
//!
//! The query string is never part of the path and never influences the decision.

use std::fmt;

/// A path that passed [`normalize`]: percent-encoded in canonical form, starting with `/`.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct NormalizedPath(String);

impl NormalizedPath {
    /// The canonical path, e.g. `/premium/a%20b`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The non-empty segments, still percent-encoded.
    pub fn segments(&self) -> impl Iterator<Item = &str> {
        self.0.split('/').filter(|s| !s.is_empty())
    }

    /// Whether the path ends in `/` (and is not the root).
    pub fn has_trailing_slash(&self) -> bool {
        self.0.len() > 1 && self.0.ends_with('/')
    }
}

impl fmt::Display for NormalizedPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for NormalizedPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NormalizedPath({:?})", self.0)
    }
}

/// Why a path cannot be normalised without ambiguity. Every variant becomes `400 Bad Request`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// Not origin-form.
    #[error("the request path must start with '/'")]
    NotAbsolute,
    /// A `%` not followed by two hex digits.
    #[error("invalid percent-encoding in the path")]
    BadEscape,
    /// An encoded `/` or `\`, which origins disagree about.
    #[error("encoded '/' or '\\' in the path")]
    EncodedSeparator,
    /// A raw or encoded control byte (NUL included), or a raw byte outside printable ASCII.
    #[error("control or non-ASCII byte in the path")]
    ControlByte,
    /// A raw backslash, which some origins treat as `/`.
    #[error("backslash in the path")]
    Backslash,
    /// The decoded path is not valid UTF-8 (overlong encodings included).
    #[error("the decoded path is not valid UTF-8")]
    InvalidUtf8,
    /// `..` would climb above the root.
    #[error("'..' above the root")]
    AboveRoot,
    /// An empty, `.` or `..` segment with `;` parameters (`/..;/x`, `/;/x`): servlet
    /// containers strip the parameters and then merge or resolve the segment.
    #[error("empty, '.' or '..' segment with ';' parameters in the path")]
    AmbiguousSegment,
}

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

const HEX_UPPER: &[u8; 16] = b"0123456789ABCDEF";

/// Normalises the path part of a request target (without the query).
///
/// # Errors
/// A [`PathError`] for anything that cannot be normalised without ambiguity.
pub fn normalize(raw: &str) -> Result<NormalizedPath, PathError> {
    if is_already_normal(raw) {
        return Ok(NormalizedPath(raw.to_owned()));
    }
    normalize_in_full(raw)
}

/// Whether [`normalize_in_full`] would return `raw` unchanged, decided in one pass for the
/// common case: absolute, only plain path characters (no `%`, `;`, backslash or controls), no
/// empty segment but a trailing one, no `.` or `..` segment.
fn is_already_normal(raw: &str) -> bool {
    let Some(rest) = raw.strip_prefix('/') else {
        return false;
    };
    let plain = |b: u8| {
        b.is_ascii_alphanumeric()
            || matches!(
                b,
                b'/' | b'-'
                    | b'.'
                    | b'_'
                    | b'~'
                    | b'!'
                    | b'$'
                    | b'&'
                    | b'\''
                    | b'('
                    | b')'
                    | b'*'
                    | b'+'
                    | b','
                    | b'='
                    | b':'
                    | b'@'
            )
    };
    if !rest.bytes().all(plain) {
        return false;
    }
    let mut segments = rest.split('/').peekable();
    while let Some(seg) = segments.next() {
        let last = segments.peek().is_none();
        if (seg.is_empty() && !last) || seg == "." || seg == ".." {
            return false;
        }
    }
    true
}

/// The full normalisation (see [`normalize`]).
fn normalize_in_full(raw: &str) -> Result<NormalizedPath, PathError> {
    let bytes = raw.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Err(PathError::NotAbsolute);
    }
    // Pass 1: canonical escapes, and the fully decoded bytes for the UTF-8 check.
    let mut canon: Vec<u8> = Vec::with_capacity(bytes.len());
    let mut decoded: Vec<u8> = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b'%' => {
                let hi = bytes.get(i + 1).copied().and_then(hex_val);
                let lo = bytes.get(i + 2).copied().and_then(hex_val);
                let (Some(hi), Some(lo)) = (hi, lo) else {
                    return Err(PathError::BadEscape);
                };
                let v = (hi << 4) | lo;
                match v {
                    b'/' | b'\\' => return Err(PathError::EncodedSeparator),
                    0x00..=0x1f | 0x7f => return Err(PathError::ControlByte),
                    0xc0 | 0xc1 | 0xf5..=0xff => return Err(PathError::InvalidUtf8),
                    _ => {}
                }
                if is_unreserved(v) {
                    canon.push(v);
                } else {
                    canon.extend_from_slice(&[
                        b'%',
                        HEX_UPPER[usize::from(hi)],
                        HEX_UPPER[usize::from(lo)],
                    ]);
                }
                decoded.push(v);
                i += 3;
            }
            b'\\' => return Err(PathError::Backslash),
            0x21..=0x7e => {
                canon.push(b);
                decoded.push(b);
                i += 1;
            }
            _ => return Err(PathError::ControlByte),
        }
    }
    if std::str::from_utf8(&decoded).is_err() {
        return Err(PathError::InvalidUtf8);
    }
    // Pass 2: segments. `canon` is ASCII by construction.
    let canon = String::from_utf8(canon).map_err(|_| PathError::ControlByte)?;
    let trailing =
        canon.ends_with('/') || canon.ends_with("/.") || canon.ends_with("/..") || canon == "/";
    let mut out: Vec<&str> = Vec::new();
    for seg in canon.split('/') {
        // What an origin that strips `;params` (raw or decoded `%3B`) sees of this segment.
        let bare = seg.split(';').next().unwrap_or("");
        let bare = bare.split("%3B").next().unwrap_or("");
        if bare != seg && matches!(bare, "" | "." | "..") {
            return Err(PathError::AmbiguousSegment);
        }
        match seg {
            "" | "." => {}
            ".." => {
                if out.pop().is_none() {
                    return Err(PathError::AboveRoot);
                }
            }
            s => out.push(s),
        }
    }
    let mut path = String::with_capacity(canon.len());
    for s in &out {
        path.push('/');
        path.push_str(s);
    }
    if path.is_empty() || trailing {
        path.push('/');
    }
    Ok(NormalizedPath(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// The one-pass shortcut never changes an answer.
        #[test]
        fn the_shortcut_agrees_with_the_full_normalisation(
            raw in "/?[/a.;%2fF\\\\:@~ -]{0,16}"
        ) {
            proptest::prop_assert_eq!(normalize(&raw), normalize_in_full(&raw));
        }
    }

    #[test]
    fn the_shortcut_takes_plain_paths_only() {
        for p in ["/", "/a", "/a/", "/a.b/c-d_e~f/", "/x:y@z/!$&'()*+,="] {
            assert!(is_already_normal(p), "{p}");
            assert_eq!(normalize_in_full(p).unwrap().as_str(), p);
        }
        for p in [
            "", "a", "//", "/a//b", "/.", "/a/./b", "/a/..", "/%41", "/a;b", "/a\\b", "/a b",
        ] {
            assert!(!is_already_normal(p), "{p}");
        }
    }

    /// Accepted inputs and the one form they are both classified on and forwarded as.
    #[test]
    fn normalises_to_one_form() {
        let rows = [
            ("/", "/"),
            ("/premium/a", "/premium/a"),
            ("/premium/", "/premium/"),
            ("//premium//a", "/premium/a"),
            ("///premium/a/", "/premium/a/"),
            ("/free/../premium/a", "/premium/a"),
            ("/./premium/./a", "/premium/a"),
            ("/premium/a/.", "/premium/a/"),
            ("/premium/a/..", "/premium/"),
            ("/free/%2e%2e/premium/a", "/premium/a"),
            ("/free/%2E%2E/premium/a", "/premium/a"),
            ("/free/.%2e/premium", "/premium"),
            ("/%70remium/a", "/premium/a"),
            ("/premium/%7euser", "/premium/~user"),
            ("/premium/a%20b", "/premium/a%20b"),
            ("/premium/a%3bb", "/premium/a%3Bb"),
            ("/premium/a%3Fb", "/premium/a%3Fb"),
            ("/premium/a%23b", "/premium/a%23b"),
            ("/premium/%25", "/premium/%25"),
            ("/premium/%c3%a9", "/premium/%C3%A9"),
            ("/premium;a=b/x", "/premium;a=b/x"),
            ("/premium/...", "/premium/..."),
        ];
        for (input, want) in rows {
            match normalize(input) {
                Ok(p) => assert_eq!(p.as_str(), want, "{input}"),
                Err(e) => panic!("{input}: unexpected {e}"),
            }
        }
    }

    #[test]
    fn rejects_what_is_ambiguous() {
        use PathError::*;
        let rows = [
            ("", NotAbsolute),
            ("*", NotAbsolute),
            ("premium/a", NotAbsolute),
            ("http://evil/premium", NotAbsolute),
            ("/premium/x%", BadEscape),
            ("/premium/x%2", BadEscape),
            ("/premium/x%zz", BadEscape),
            ("/premium%2Fa", EncodedSeparator),
            ("/premium%2fa", EncodedSeparator),
            ("/free/..%2Fpremium", EncodedSeparator),
            ("/premium%5Ca", EncodedSeparator),
            ("/premium\\a", Backslash),
            ("/free/..\\premium", Backslash),
            ("/premium%00.html", ControlByte),
            ("/premium/%0d%0aX:1", ControlByte),
            ("/premium/%7f", ControlByte),
            ("/premium/a b", ControlByte),
            ("/premium/\u{e9}", ControlByte),
            ("/premium\t", ControlByte),
            ("/%c0%afpremium", InvalidUtf8),
            ("/%C1%9C", InvalidUtf8),
            ("/%ff", InvalidUtf8),
            ("/%e0%80%af", InvalidUtf8),
            ("/%c3", InvalidUtf8),
            ("/..", AboveRoot),
            ("/../premium", AboveRoot),
            ("/%2e%2e/premium", AboveRoot),
            ("/a/../../premium", AboveRoot),
            // Servlet containers strip `;…` and then resolve the dot segment.
            ("/..;/premium", AmbiguousSegment),
            ("/free/..;x=1/premium", AmbiguousSegment),
            ("/.;/premium", AmbiguousSegment),
            ("/free/%2e%2e;/premium", AmbiguousSegment),
            ("/free/..%3b/premium", AmbiguousSegment),
            ("/free/.%3Bx/premium", AmbiguousSegment),
            ("/;x/premium", AmbiguousSegment),
            ("/free/%3B/premium", AmbiguousSegment),
        ];
        for (input, err) in rows {
            assert_eq!(normalize(input), Err(err), "{input}");
        }
    }

    #[test]
    fn normal_form_is_a_fixed_point() {
        for input in ["/a//b/../c/./d/", "/%7e/%41%20", "/x/%2e/y", "/"] {
            let once = normalize(input).unwrap();
            let twice = normalize(once.as_str()).unwrap();
            assert_eq!(once, twice, "{input}");
        }
    }

    #[test]
    fn exposes_segments_and_trailing_slash() {
        let p = normalize("/a/b/").unwrap();
        assert_eq!(p.segments().collect::<Vec<_>>(), ["a", "b"]);
        assert!(p.has_trailing_slash());
        assert!(!normalize("/").unwrap().has_trailing_slash());
    }
}
