//! The configuration file: TOML in, validated domain types out.
//!
//! Two layers, as the pinned interface (`shared/spec/interface.md`) requires:
//! [`RawConfig`] mirrors the file (every table `deny_unknown_fields`, so a typo can never leave
//! content unprotected) and [`Config`] holds only values that were checked: socket addresses,
//! URLs, amounts, durations, normalised prefixes, secrets of sufficient length.
//!
//! Validation collects *every* problem it finds, each with the line it is on, so that
//! `taler-paywall check` can report them all at once. Secrets are wrapped in [`Secret`], whose
//! `Debug` never prints the value, and the file's text is never echoed in an error.

use std::collections::BTreeSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;
use toml::Spanned;
use url::Url;

use crate::amount::Amount;
use crate::path;

/// Environment variable that overrides `[merchant] token` / `token_file`.
pub const ENV_MERCHANT_TOKEN: &str = "TALER_PAYWALL_MERCHANT_TOKEN";
/// Environment variable that overrides `[session] secret` / `secret_file`.
pub const ENV_SESSION_SECRET: &str = "TALER_PAYWALL_SESSION_SECRET";
/// Minimum length of the session secret, in bytes.
pub const MIN_SECRET_BYTES: usize = 32;

// ---------------------------------------------------------------------------------------------
// Secrets
// ---------------------------------------------------------------------------------------------

/// A secret string (merchant token, session secret). `Debug` and `Display` are redacted.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret itself. Call sites are few and obvious: signing keys and the
    /// `Authorization` header of merchant calls.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

// ---------------------------------------------------------------------------------------------
// Raw layer: exactly the file
// ---------------------------------------------------------------------------------------------

/// The file as written. Every table rejects unknown keys.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    server: RawServer,
    origin: RawOrigin,
    merchant: RawMerchant,
    session: RawSession,
    #[serde(default)]
    protect: Vec<RawProtect>,
    admin: Option<RawAdmin>,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    pages: RawPages,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: Spanned<String>,
    public_url: Spanned<String>,
    tls: Option<RawTls>,
    #[serde(default)]
    trusted_proxies: Vec<Spanned<String>>,
    header_read_timeout: Option<Spanned<String>>,
    max_header_bytes: Option<Spanned<u64>>,
    idle_timeout: Option<Spanned<String>>,
    request_timeout: Option<Spanned<String>>,
    shutdown_grace: Option<Spanned<String>>,
    max_connections: Option<Spanned<u64>>,
    mode: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert_file: Spanned<String>,
    key_file: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOrigin {
    url: Spanned<String>,
    host_header: Option<Spanned<String>>,
    connect_timeout: Option<Spanned<String>>,
    response_timeout: Option<Spanned<String>>,
    ca_file: Option<Spanned<String>>,
    max_idle_per_host: Option<Spanned<u64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMerchant {
    url: Spanned<String>,
    token: Option<Spanned<String>>,
    token_file: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
    ca_file: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSession {
    secret: Option<Spanned<String>>,
    secret_file: Option<Spanned<String>>,
    #[serde(default)]
    previous_secrets: Vec<Spanned<String>>,
    recheck_interval: Option<Spanned<String>>,
    cookie_lifetime: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProtect {
    prefix: Spanned<String>,
    price: Spanned<String>,
    summary: Spanned<String>,
    scope: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    listen: Spanned<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    orders_per_minute: Option<Spanned<u64>>,
    orders_burst: Option<Spanned<u64>>,
    max_request_body: Option<Spanned<u64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPages {
    dir: Option<Spanned<String>>,
}

// ---------------------------------------------------------------------------------------------
// Validated layer
// ---------------------------------------------------------------------------------------------

/// The validated configuration. Nothing in here can hold a bad value.
#[derive(Debug, Clone)]
pub struct Config {
    /// The public listener.
    pub server: ServerConfig,
    /// The protected site.
    pub origin: OriginConfig,
    /// The GNU Taler merchant backend.
    pub merchant: MerchantConfig,
    /// Browser sessions and cookies.
    pub session: SessionConfig,
    /// Protected areas, in file order.
    pub protect: Vec<ProtectRule>,
    /// The optional operator listener.
    pub admin: Option<AdminConfig>,
    /// Abuse limits.
    pub limits: LimitsConfig,
    /// Page templates.
    pub pages: PagesConfig,
}

/// `[server]`.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Address the gateway accepts clients on.
    pub listen: SocketAddr,
    /// How clients reach the gateway: scheme, host, optional port, optional path prefix,
    /// without a trailing slash. The base of every fulfillment URL.
    pub public_url: Url,
    /// Terminate TLS with these files; `None` means plain HTTP.
    pub tls: Option<TlsConfig>,
    /// Peers whose `X-Forwarded-*` headers are believed. Default: nobody.
    pub trusted_proxies: Vec<IpNet>,
    /// A client must send its complete request head within this time (default 10 s).
    pub header_read_timeout: Duration,
    /// Largest request head accepted, in bytes (default 64 KiB).
    pub max_header_bytes: usize,
    /// An idle keep-alive connection is closed after this time (default 60 s).
    pub idle_timeout: Duration,
    /// Upper bound on a whole request/response exchange with no progress (default 300 s).
    pub request_timeout: Duration,
    /// On SIGTERM/SIGINT, in-flight requests get this long to finish (default 30 s).
    pub shutdown_grace: Duration,
    /// Most client connections served at once (default 10 000).
    pub max_connections: usize,
    /// Enforce payments, or only observe and log decisions.
    pub mode: Mode,
}

/// Whether the gateway enforces its decisions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Unpaid requests to protected paths are stopped (the default).
    Enforce,
    /// Decisions are made, logged and counted, but every request is let through.
    Observe,
}

/// `[server.tls]`.
#[derive(Debug, Clone)]
pub struct TlsConfig {
    /// PEM certificate chain.
    pub cert_file: PathBuf,
    /// PEM private key.
    pub key_file: PathBuf,
}

/// Which `Host` header the origin receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostHeader {
    /// The client's `Host` (the default, like nginx `proxy_set_header Host $host`).
    Client,
    /// The origin URL's host and port.
    Origin,
}

/// `[origin]`.
#[derive(Debug, Clone)]
pub struct OriginConfig {
    /// Base URL of the protected site (`http` or `https`), without a trailing slash.
    pub url: Url,
    /// Which `Host` header is sent.
    pub host_header: HostHeader,
    /// TCP (and TLS) connect timeout (default 5 s).
    pub connect_timeout: Duration,
    /// Time from request sent to response head received (default 60 s).
    pub response_timeout: Duration,
    /// Trust only this PEM CA bundle for an `https` origin instead of the public roots.
    pub ca_file: Option<PathBuf>,
    /// Idle pooled connections kept per origin host (default 256).
    pub max_idle_per_host: usize,
}

/// `[merchant]`.
#[derive(Debug, Clone)]
pub struct MerchantConfig {
    /// Base URL of the merchant backend instance, always ending in `/`.
    pub url: Url,
    /// Access token, always starting with `secret-token:`.
    pub token: Secret,
    /// Timeout for each call to the backend (default 10 s).
    pub timeout: Duration,
    /// Trust only this PEM CA bundle for the backend instead of the public roots.
    pub ca_file: Option<PathBuf>,
}

/// `[session]`.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Signs new cookies.
    pub secret: Secret,
    /// Older secrets still accepted when verifying cookies (rotation).
    pub previous_secrets: Vec<Secret>,
    /// How long a confirmed payment is trusted before asking the merchant again (default 300 s).
    pub recheck_interval: Duration,
    /// Lifetime of the session cookie (default 30 days).
    pub cookie_lifetime: Duration,
}

/// How much one purchase opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Every path under the prefix is bought separately.
    Page,
    /// One purchase opens everything under the prefix.
    Prefix,
}

/// One `[[protect]]` table.
#[derive(Debug, Clone)]
pub struct ProtectRule {
    /// Normalised prefix, starting with `/`, without a trailing slash (`/` for the root).
    pub prefix: String,
    /// Price of one purchase.
    pub price: Amount,
    /// Shown to the customer in the wallet.
    pub summary: String,
    /// Page or prefix scope.
    pub scope: Scope,
}

/// `[admin]`.
#[derive(Debug, Clone)]
pub struct AdminConfig {
    /// Address of the operator listener.
    pub listen: SocketAddr,
}

/// `[limits]`.
#[derive(Debug, Clone)]
pub struct LimitsConfig {
    /// Orders one client address may cause per minute (default 30; 0 disables the limit).
    pub orders_per_minute: u32,
    /// Orders one client address may cause in a burst (default 10).
    pub orders_burst: u32,
    /// Largest request body forwarded, in bytes (default 256 MiB; 0 = no limit).
    pub max_request_body: u64,
}

/// `[pages]`.
#[derive(Debug, Clone, Default)]
pub struct PagesConfig {
    /// Directory with templates that override the built-in pages.
    pub dir: Option<PathBuf>,
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// One problem found in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// What is wrong and, where it helps, what would be right.
    pub message: String,
}

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: cannot read: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// TOML syntax, an unknown key, a wrong type or a missing key.
    #[error("{}", render_problems(path, std::slice::from_ref(problem)))]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message and the line it points at. The parser's own `Display` quotes
        /// the offending line, which may hold a secret, so only its message is kept.
        problem: Problem,
    },
    /// The file parsed but values are invalid.
    #[error("{}", render_problems(path, problems))]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Every problem found.
        problems: Vec<Problem>,
    },
}

fn render_problems(path: &Path, problems: &[Problem]) -> String {
    let mut out = String::new();
    for (i, p) in problems.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        match p.line {
            Some(l) => out.push_str(&format!("{}:{}: {}", path.display(), l, p.message)),
            None => out.push_str(&format!("{}: {}", path.display(), p.message)),
        }
    }
    out
}

impl ConfigError {
    /// Every problem as `(line, message)`; a parse error is one problem.
    pub fn problems(&self) -> Vec<Problem> {
        match self {
            ConfigError::Read { source, .. } => vec![Problem {
                line: None,
                message: format!("cannot read: {source}"),
            }],
            ConfigError::Parse { problem, .. } => vec![problem.clone()],
            ConfigError::Invalid { problems, .. } => problems.clone(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------------------------

/// Where environment overrides come from; tests pass a closure instead of the process env.
pub trait Env {
    /// The variable's value, if set.
    fn var(&self, name: &str) -> Option<String>;
}

/// The process environment.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.is_empty())
    }
}

/// No environment at all.
pub struct NoEnv;

impl Env for NoEnv {
    fn var(&self, _name: &str) -> Option<String> {
        None
    }
}

impl<F: Fn(&str) -> Option<String>> Env for F {
    fn var(&self, name: &str) -> Option<String> {
        self(name)
    }
}

impl Config {
    /// Reads and validates `path`, taking overrides from the process environment.
    /// Relative `*_file` paths are resolved against the config file's directory.
    ///
    /// # Errors
    /// [`ConfigError`] naming the file and, where known, the line of each problem.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml_str(&text, path, &ProcessEnv)
    }

    /// Validates configuration text. `path` is used for messages and as the base of relative
    /// file paths; `env` supplies overrides.
    ///
    /// # Errors
    /// [`ConfigError::Parse`] for syntax, unknown keys and types; [`ConfigError::Invalid`]
    /// with every value problem found.
    pub fn from_toml_str(text: &str, path: &Path, env: &dyn Env) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            problem: Problem {
                line: e.span().map(|s| line_of(text, s.start)),
                // One problem per output line: toml's multi-line messages are joined.
                message: redact_quoted_values(e.message().trim()).replace('\n', "; "),
            },
        })?;
        let base = path.parent().map(Path::to_owned).unwrap_or_default();
        let mut v = Validator {
            text,
            base,
            problems: Vec::new(),
        };
        let config = v.build(raw, env);
        match config {
            Some(c) if v.problems.is_empty() => Ok(c),
            _ => Err(ConfigError::Invalid {
                path: path.to_owned(),
                problems: v.problems,
            }),
        }
    }

    /// The protect rule list as given, for building a [`crate::policy::Policy`].
    pub fn protect_rules(&self) -> &[ProtectRule] {
        &self.protect
    }
}

/// The parser's message with every double-quoted value replaced. serde quotes the offending
/// string in messages such as `invalid type: string "…", expected a sequence`, and that string
/// may be a secret (`previous_secrets = "…"` instead of a list). Key names and the parser's
/// expectations are quoted with backticks and kept, backticks included.
fn redact_quoted_values(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut chars = message.chars();
    while let Some(c) = chars.next() {
        match c {
            '`' => {
                out.push(c);
                for c in chars.by_ref() {
                    out.push(c);
                    if c == '`' {
                        break;
                    }
                }
            }
            '"' => {
                let mut escaped = false;
                for c in chars.by_ref() {
                    match c {
                        '\\' if !escaped => escaped = true,
                        '"' if !escaped => break,
                        _ => escaped = false,
                    }
                }
                out.push_str("(value not shown)");
            }
            _ => out.push(c),
        }
    }
    out
}

/// 1-based line number of byte `offset` in `text`.
fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

struct Validator<'a> {
    text: &'a str,
    base: PathBuf,
    problems: Vec<Problem>,
}

impl Validator<'_> {
    fn line_of(&self, offset: usize) -> usize {
        line_of(self.text, offset)
    }

    fn fail<T>(&mut self, at: &Spanned<T>, message: impl Into<String>) {
        let line = self.line_of(at.span().start);
        self.problems.push(Problem {
            line: Some(line),
            message: message.into(),
        });
    }

    fn fail_nowhere(&mut self, message: impl Into<String>) {
        self.problems.push(Problem {
            line: None,
            message: message.into(),
        });
    }

    fn duration(&mut self, key: &str, v: &Option<Spanned<String>>, default: Duration) -> Duration {
        match v {
            None => default,
            Some(s) => match humantime::parse_duration(s.get_ref().trim()) {
                Ok(d) => d,
                Err(_) => {
                    self.fail(
                        s,
                        format!(
                            "{key}: \"{}\" is not a duration (e.g. \"300s\", \"5m\")",
                            s.get_ref()
                        ),
                    );
                    default
                }
            },
        }
    }

    fn socket_addr(&mut self, key: &str, v: &Spanned<String>) -> Option<SocketAddr> {
        match v.get_ref().parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                self.fail(
                    v,
                    format!(
                        "{key}: \"{}\" is not an address:port such as \"127.0.0.1:8080\"",
                        v.get_ref()
                    ),
                );
                None
            }
        }
    }

    fn file(&self, s: &str) -> PathBuf {
        let p = PathBuf::from(s);
        if p.is_absolute() {
            p
        } else {
            self.base.join(p)
        }
    }

    fn read_secret_file(&mut self, key: &str, v: &Spanned<String>) -> Option<String> {
        let p = self.file(v.get_ref());
        match std::fs::read_to_string(&p) {
            Ok(s) => Some(s.trim_end_matches(['\n', '\r']).to_owned()),
            Err(e) => {
                self.fail(v, format!("{key}: cannot read {}: {e}", p.display()));
                None
            }
        }
    }

    fn readable_file(&mut self, key: &str, v: &Spanned<String>) -> PathBuf {
        let p = self.file(v.get_ref());
        if let Err(e) = std::fs::metadata(&p).and_then(|m| {
            if m.is_file() {
                Ok(())
            } else {
                Err(std::io::Error::other("not a regular file"))
            }
        }) {
            self.fail(v, format!("{key}: cannot read {}: {e}", p.display()));
        }
        p
    }

    fn http_url(&mut self, key: &str, v: &Spanned<String>) -> Option<Url> {
        let url = match Url::parse(v.get_ref()) {
            Ok(u) => u,
            Err(e) => {
                self.fail(v, format!("{key}: \"{}\" is not a URL: {e}", v.get_ref()));
                return None;
            }
        };
        if url.scheme() != "http" && url.scheme() != "https" {
            self.fail(
                v,
                format!("{key}: only http:// and https:// URLs are supported"),
            );
            return None;
        }
        if url.host_str().is_none_or(str::is_empty) {
            self.fail(v, format!("{key}: the URL has no host"));
            return None;
        }
        if !url.username().is_empty() || url.password().is_some() {
            self.fail(
                v,
                format!("{key}: credentials in the URL are not supported"),
            );
            return None;
        }
        if url.query().is_some() || url.fragment().is_some() {
            self.fail(
                v,
                format!("{key}: the URL must not have a query or fragment"),
            );
            return None;
        }
        Some(url)
    }

    fn build(&mut self, raw: RawConfig, env: &dyn Env) -> Option<Config> {
        let server = self.server(&raw.server);
        let origin = self.origin(&raw.origin);
        let merchant = self.merchant(&raw.merchant, env);
        let session = self.session(&raw.session, env);
        let protect = self.protect(&raw.protect);
        // `None`: no [admin] table; `Some(None)`: a table whose address is invalid. An invalid
        // address must not end validation early, or the problems below would go unreported.
        let admin: Option<Option<AdminConfig>> = raw.admin.as_ref().map(|a| {
            self.socket_addr("admin.listen", &a.listen)
                .map(|listen| AdminConfig { listen })
        });
        if let (Some(s), Some(Some(a)), Some(raw_admin)) = (&server, &admin, &raw.admin) {
            if s.listen == a.listen {
                self.fail(
                    &raw_admin.listen,
                    "admin.listen must differ from server.listen: operator endpoints are never served on the public listener",
                );
            }
        }
        let limits = self.limits(&raw.limits);
        let pages = PagesConfig {
            dir: raw.pages.dir.as_ref().map(|d| {
                let p = self.file(d.get_ref());
                if !p.is_dir() {
                    self.fail(d, format!("pages.dir: {} is not a directory", p.display()));
                }
                p
            }),
        };
        Some(Config {
            server: server?,
            origin: origin?,
            merchant: merchant?,
            session: session?,
            protect: protect?,
            admin: admin.map_or(Some(None), |a| a.map(Some))?,
            limits,
            pages,
        })
    }

    fn server(&mut self, raw: &RawServer) -> Option<ServerConfig> {
        let listen = self.socket_addr("server.listen", &raw.listen);
        let public_url = self
            .http_url("server.public_url", &raw.public_url)
            .map(|mut u| {
                let trimmed = u.path().trim_end_matches('/').to_owned();
                u.set_path(&trimmed);
                u
            });
        if let Some(u) = &public_url {
            if path::normalize(u.path()).map(|p| p.as_str().to_owned())
                != Ok(if u.path().is_empty() {
                    "/".to_owned()
                } else {
                    u.path().to_owned()
                })
            {
                self.fail(
                    &raw.public_url,
                    "server.public_url: the path must be plain (no dot segments, escapes or repeated slashes)",
                );
            }
        }
        let tls = raw.tls.as_ref().map(|t| TlsConfig {
            cert_file: self.readable_file("server.tls.cert_file", &t.cert_file),
            key_file: self.readable_file("server.tls.key_file", &t.key_file),
        });
        let mut trusted_proxies = Vec::new();
        for p in &raw.trusted_proxies {
            let s = p.get_ref();
            let parsed = s
                .parse::<IpNet>()
                .or_else(|_| s.parse::<std::net::IpAddr>().map(IpNet::from));
            match parsed {
                Ok(n) => trusted_proxies.push(n),
                Err(_) => self.fail(
                    p,
                    format!("server.trusted_proxies: \"{s}\" is not an IP address or CIDR range"),
                ),
            }
        }
        let header_read_timeout = self.duration(
            "server.header_read_timeout",
            &raw.header_read_timeout,
            Duration::from_secs(10),
        );
        let idle_timeout = self.duration(
            "server.idle_timeout",
            &raw.idle_timeout,
            Duration::from_secs(60),
        );
        let request_timeout = self.duration(
            "server.request_timeout",
            &raw.request_timeout,
            Duration::from_secs(300),
        );
        let shutdown_grace = self.duration(
            "server.shutdown_grace",
            &raw.shutdown_grace,
            Duration::from_secs(30),
        );
        let max_header_bytes = match &raw.max_header_bytes {
            None => 64 * 1024,
            Some(v) if (8192..=1024 * 1024).contains(v.get_ref()) => *v.get_ref() as usize,
            Some(v) => {
                self.fail(
                    v,
                    "server.max_header_bytes must be between 8192 and 1048576",
                );
                64 * 1024
            }
        };
        let max_connections = match &raw.max_connections {
            None => 10_000,
            Some(v) if *v.get_ref() >= 1 => *v.get_ref() as usize,
            Some(v) => {
                self.fail(v, "server.max_connections must be at least 1");
                1
            }
        };
        let mode = match raw.mode.as_ref().map(|m| (m, m.get_ref().as_str())) {
            None | Some((_, "enforce")) => Mode::Enforce,
            Some((_, "observe")) => Mode::Observe,
            Some((m, other)) => {
                self.fail(
                    m,
                    format!("server.mode: \"{other}\" is neither \"enforce\" nor \"observe\""),
                );
                Mode::Enforce
            }
        };
        for (key, at, d) in [
            (
                "server.header_read_timeout",
                &raw.header_read_timeout,
                header_read_timeout,
            ),
            ("server.idle_timeout", &raw.idle_timeout, idle_timeout),
            (
                "server.request_timeout",
                &raw.request_timeout,
                request_timeout,
            ),
        ] {
            if d.is_zero() {
                let msg = format!("{key} must be greater than zero");
                match at {
                    Some(at) => self.fail(at, msg),
                    None => self.fail_nowhere(msg),
                }
            }
        }
        Some(ServerConfig {
            listen: listen?,
            public_url: public_url?,
            tls,
            trusted_proxies,
            header_read_timeout,
            max_header_bytes,
            idle_timeout,
            request_timeout,
            shutdown_grace,
            max_connections,
            mode,
        })
    }

    fn origin(&mut self, raw: &RawOrigin) -> Option<OriginConfig> {
        let url = self.http_url("origin.url", &raw.url).map(|mut u| {
            let trimmed = u.path().trim_end_matches('/').to_owned();
            u.set_path(&trimmed);
            u
        });
        let host_header = match raw.host_header.as_ref().map(|h| (h, h.get_ref().as_str())) {
            None | Some((_, "client")) => HostHeader::Client,
            Some((_, "origin")) => HostHeader::Origin,
            Some((h, other)) => {
                self.fail(
                    h,
                    format!("origin.host_header: \"{other}\" is neither \"client\" nor \"origin\""),
                );
                HostHeader::Client
            }
        };
        let connect_timeout = self.duration(
            "origin.connect_timeout",
            &raw.connect_timeout,
            Duration::from_secs(5),
        );
        let response_timeout = self.duration(
            "origin.response_timeout",
            &raw.response_timeout,
            Duration::from_secs(60),
        );
        let ca_file = raw
            .ca_file
            .as_ref()
            .map(|f| self.readable_file("origin.ca_file", f));
        let max_idle_per_host = raw
            .max_idle_per_host
            .as_ref()
            .map_or(256, |v| *v.get_ref() as usize);
        Some(OriginConfig {
            url: url?,
            host_header,
            connect_timeout,
            response_timeout,
            ca_file,
            max_idle_per_host,
        })
    }

    fn merchant(&mut self, raw: &RawMerchant, env: &dyn Env) -> Option<MerchantConfig> {
        let url = self.http_url("merchant.url", &raw.url).map(|mut u| {
            if !u.path().ends_with('/') {
                let p = format!("{}/", u.path());
                u.set_path(&p);
            }
            u
        });
        let token = if let Some(t) = env.var(ENV_MERCHANT_TOKEN) {
            Some(t)
        } else {
            match (&raw.token, &raw.token_file) {
                (Some(t), None) => Some(t.get_ref().clone()),
                (None, Some(f)) => self.read_secret_file("merchant.token_file", f),
                (Some(t), Some(_)) => {
                    self.fail(t, "merchant: set token or token_file, not both");
                    None
                }
                (None, None) => {
                    self.fail(
                        &raw.url,
                        format!(
                            "merchant: no token (set token, token_file or {ENV_MERCHANT_TOKEN})"
                        ),
                    );
                    None
                }
            }
        };
        let token = token.and_then(|t| {
            let t = t.trim().to_owned();
            let full = if t.starts_with("secret-token:") {
                t
            } else {
                format!("secret-token:{t}")
            };
            let body = &full["secret-token:".len()..];
            if body.is_empty() || !body.bytes().all(|b| b.is_ascii_graphic()) {
                self.fail(
                    &raw.url,
                    "merchant: the token must be non-empty printable ASCII without spaces",
                );
                None
            } else {
                Some(Secret::new(full))
            }
        });
        let timeout = self.duration("merchant.timeout", &raw.timeout, Duration::from_secs(10));
        let ca_file = raw
            .ca_file
            .as_ref()
            .map(|f| self.readable_file("merchant.ca_file", f));
        Some(MerchantConfig {
            url: url?,
            token: token?,
            timeout,
            ca_file,
        })
    }

    fn session(&mut self, raw: &RawSession, env: &dyn Env) -> Option<SessionConfig> {
        let (secret, at): (Option<String>, Option<&Spanned<String>>) =
            if let Some(s) = env.var(ENV_SESSION_SECRET) {
                (Some(s), None)
            } else {
                match (&raw.secret, &raw.secret_file) {
                    (Some(s), None) => (Some(s.get_ref().clone()), Some(s)),
                    (None, Some(f)) => (self.read_secret_file("session.secret_file", f), Some(f)),
                    (Some(s), Some(_)) => {
                        self.fail(s, "session: set secret or secret_file, not both");
                        (None, None)
                    }
                    (None, None) => {
                        self.fail_nowhere(format!(
                            "session: no secret (set secret, secret_file or {ENV_SESSION_SECRET})"
                        ));
                        (None, None)
                    }
                }
            };
        let secret = secret.and_then(|s| {
            if s.len() < MIN_SECRET_BYTES {
                let msg = format!(
                    "session.secret is {} bytes; it must be at least {MIN_SECRET_BYTES} bytes of random text (e.g. `openssl rand -base64 48`)",
                    s.len()
                );
                match at {
                    Some(a) => self.fail(a, msg),
                    None => self.fail_nowhere(format!("{ENV_SESSION_SECRET}: {msg}")),
                }
                None
            } else {
                Some(Secret::new(s))
            }
        });
        let mut previous_secrets = Vec::new();
        for p in &raw.previous_secrets {
            if p.get_ref().len() < MIN_SECRET_BYTES {
                self.fail(
                    p,
                    format!(
                        "session.previous_secrets: each must be at least {MIN_SECRET_BYTES} bytes"
                    ),
                );
            } else {
                previous_secrets.push(Secret::new(p.get_ref().clone()));
            }
        }
        let recheck_interval = self.duration(
            "session.recheck_interval",
            &raw.recheck_interval,
            Duration::from_secs(300),
        );
        let cookie_lifetime = self.duration(
            "session.cookie_lifetime",
            &raw.cookie_lifetime,
            Duration::from_secs(30 * 24 * 3600),
        );
        if cookie_lifetime < Duration::from_secs(60) {
            let msg = "session.cookie_lifetime must be at least 60s";
            match &raw.cookie_lifetime {
                Some(at) => self.fail(at, msg),
                None => self.fail_nowhere(msg),
            }
        }
        Some(SessionConfig {
            secret: secret?,
            previous_secrets,
            recheck_interval,
            cookie_lifetime,
        })
    }

    fn protect(&mut self, raw: &[RawProtect]) -> Option<Vec<ProtectRule>> {
        let mut out = Vec::new();
        let mut seen = BTreeSet::new();
        let mut ok = true;
        for r in raw {
            let prefix_raw = r.prefix.get_ref();
            let prefix = if !prefix_raw.starts_with('/') {
                self.fail(
                    &r.prefix,
                    format!("protect.prefix \"{prefix_raw}\" must start with /"),
                );
                None
            } else {
                match path::normalize(prefix_raw) {
                    Ok(n) if n.as_str() == prefix_raw => {
                        let trimmed = n.as_str().trim_end_matches('/');
                        Some(if trimmed.is_empty() {
                            "/".to_owned()
                        } else {
                            trimmed.to_owned()
                        })
                    }
                    Ok(n) => {
                        self.fail(
                            &r.prefix,
                            format!(
                                "protect.prefix \"{prefix_raw}\" is not in normal form; write \"{}/\"",
                                n.as_str().trim_end_matches('/')
                            ),
                        );
                        None
                    }
                    Err(e) => {
                        self.fail(&r.prefix, format!("protect.prefix \"{prefix_raw}\": {e}"));
                        None
                    }
                }
            };
            if let Some(p) = &prefix {
                // The policy compares segments ASCII case-insensitively, so `/Premium/` and
                // `/premium/` cover the same paths: two prices for one area is a mistake.
                if !seen.insert(p.to_ascii_lowercase()) {
                    self.fail(
                        &r.prefix,
                        format!(
                            "protect.prefix \"{prefix_raw}\" is listed twice (prefixes match case-insensitively)"
                        ),
                    );
                }
            }
            let price = match r.price.get_ref().parse::<Amount>() {
                Ok(a) if a.is_zero() => {
                    self.fail(&r.price, "protect.price must be more than zero");
                    None
                }
                Ok(a) => Some(a),
                Err(e) => {
                    self.fail(
                        &r.price,
                        format!("protect.price \"{}\": {e}", r.price.get_ref()),
                    );
                    None
                }
            };
            let summary = r.summary.get_ref().trim().to_owned();
            if summary.is_empty() {
                self.fail(&r.summary, "protect.summary must not be empty");
            }
            let scope = match r.scope.as_ref().map(|s| (s, s.get_ref().as_str())) {
                None | Some((_, "page")) => Some(Scope::Page),
                Some((_, "prefix")) => Some(Scope::Prefix),
                Some((s, other)) => {
                    self.fail(
                        s,
                        format!("protect.scope \"{other}\" is neither \"page\" nor \"prefix\""),
                    );
                    None
                }
            };
            match (prefix, price, scope) {
                (Some(prefix), Some(price), Some(scope)) if !summary.is_empty() => {
                    out.push(ProtectRule {
                        prefix,
                        price,
                        summary,
                        scope,
                    })
                }
                _ => ok = false,
            }
        }
        ok.then_some(out)
    }

    fn limits(&mut self, raw: &RawLimits) -> LimitsConfig {
        let to_u32 = |v: &Option<Spanned<u64>>, d: u32| {
            v.as_ref()
                .map_or(d, |x| (*x.get_ref()).min(u64::from(u32::MAX)) as u32)
        };
        LimitsConfig {
            orders_per_minute: to_u32(&raw.orders_per_minute, 30),
            orders_burst: to_u32(&raw.orders_burst, 10).max(1),
            max_request_body: raw
                .max_request_body
                .as_ref()
                .map_or(256 * 1024 * 1024, |v| *v.get_ref()),
        }
    }
}
