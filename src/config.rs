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
    forward_auth: Option<Spanned<RawForwardAuth>>,
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
    refund_delay: Option<Spanned<String>>,
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

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawForwardAuth {
    path: Option<Spanned<String>>,
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
    /// The forward-auth endpoint for a front proxy (`None`: no `[forward_auth]` table).
    pub forward_auth: Option<ForwardAuthConfig>,
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
    /// Sent as the orders' `refund_delay`; `None` (the default) sends none, and the backend
    /// then allows no refunds unless its instance has a default refund delay.
    pub refund_delay: Option<Duration>,
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
    /// The page templates: the built-in ones, overridden by those in `dir`, read and checked
    /// when the configuration is loaded.
    pub templates: std::sync::Arc<crate::pages::Pages>,
}

/// The path of the forward-auth endpoint when `[forward_auth]` names none.
pub const DEFAULT_FORWARD_AUTH_PATH: &str = "/.well-known/taler-paywall/auth";

/// `[forward_auth]`: the gateway answers a front proxy's authorization subrequests (nginx
/// `auth_request`, Traefik `forwardAuth`, Caddy `forward_auth`) at `path`.
#[derive(Debug, Clone)]
pub struct ForwardAuthConfig {
    /// Normalised path of the endpoint on the public listener (default
    /// [`DEFAULT_FORWARD_AUTH_PATH`]); no `[[protect]]` prefix covers it.
    pub path: String,
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
        let mut templates = std::sync::Arc::new(crate::pages::Pages::default());
        let pages = PagesConfig {
            dir: raw.pages.dir.as_ref().map(|d| {
                let p = self.file(d.get_ref());
                if !p.is_dir() {
                    self.fail(d, format!("pages.dir: {} is not a directory", p.display()));
                } else {
                    match crate::pages::Pages::load(&p) {
                        Ok(t) => templates = std::sync::Arc::new(t),
                        Err(e) => self.fail(d, format!("pages.dir: {e}")),
                    }
                }
                p
            }),
            templates,
        };
        let forward_auth = raw
            .forward_auth
            .as_ref()
            .and_then(|fa| self.forward_auth(fa, &raw.server, protect.as_deref()));
        if raw.forward_auth.is_some() && forward_auth.is_none() {
            return None;
        }
        Some(Config {
            server: server?,
            origin: origin?,
            merchant: merchant?,
            session: session?,
            protect: protect?,
            admin: admin.map_or(Some(None), |a| a.map(Some))?,
            limits,
            pages,
            forward_auth,
        })
    }

    fn forward_auth(
        &mut self,
        raw: &Spanned<RawForwardAuth>,
        server: &RawServer,
        protect: Option<&[ProtectRule]>,
    ) -> Option<ForwardAuthConfig> {
        let mut ok = true;
        if server.trusted_proxies.is_empty() {
            self.fail(
                raw,
                "forward_auth: server.trusted_proxies is empty; the endpoint believes the original URI only from a trusted front proxy, so name its address there",
            );
            ok = false;
        }
        let given = raw.get_ref().path.as_ref();
        let text = given.map_or(DEFAULT_FORWARD_AUTH_PATH, |p| p.get_ref().as_str());
        let path = match path::normalize(text) {
            Ok(n) if n.as_str() == text && text != "/" && !text.ends_with('/') => Some(n),
            _ => {
                let msg = format!(
                    "forward_auth.path \"{text}\" must be a plain absolute path in normal form, not \"/\" and without a trailing /"
                );
                match given {
                    Some(at) => self.fail(at, msg),
                    None => self.fail(raw, msg),
                }
                None
            }
        };
        let path = path?;
        if let Some(rules) = protect {
            // The endpoint must never be mistaken for (or hidden behind) a protected page.
            let policy = crate::policy::Policy::new(rules);
            if let Some(route) = policy.classify(&path) {
                let msg = format!(
                    "forward_auth.path \"{text}\" lies under the protected prefix \"{}\"; choose a path no [[protect]] prefix covers",
                    route.prefix
                );
                match given {
                    Some(at) => self.fail(at, msg),
                    None => self.fail(raw, msg),
                }
                ok = false;
            }
        }
        ok.then(|| ForwardAuthConfig {
            path: path.as_str().to_owned(),
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
        let refund_delay = raw
            .refund_delay
            .as_ref()
            .map(|_| self.duration("merchant.refund_delay", &raw.refund_delay, Duration::ZERO));
        Some(MerchantConfig {
            url: url?,
            token: token?,
            timeout,
            ca_file,
            refund_delay,
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Distinctive values: if any of them shows up in a message or a `Debug` string, it leaked.
    const TOKEN: &str = "secret-token:TOKEN-d1st1nct1ve-7f3a";
    const SECRET: &str = "SECRET-d1st1nct1ve-0123456789abcdef-9c4e";
    const ENV_TOKEN: &str = "secret-token:ENVTOKEN-d1st1nct1ve-51b2";
    const ENV_SECRET: &str = "ENVSECRET-d1st1nct1ve-0123456789abcdef-a7d0";

    /// The smallest valid configuration (also used by other modules' tests).
    pub(crate) const MINIMAL: &str = r#"[server]
listen = "127.0.0.1:8080"
public_url = "https://shop.example"

[origin]
url = "http://127.0.0.1:8000"

[merchant]
url = "https://backend.example/instances/shop/"
token = "secret-token:TOKEN-d1st1nct1ve-7f3a"

[session]
secret = "SECRET-d1st1nct1ve-0123456789abcdef-9c4e"

[[protect]]
prefix = "/premium/"
price = "KUDOS:1.5"
summary = "Premium article"
"#;

    fn file() -> &'static Path {
        Path::new("/etc/taler-paywall/gateway.toml")
    }

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml_str(text, file(), &NoEnv)
    }

    fn ok(text: &str) -> Config {
        match parse(text) {
            Ok(c) => c,
            Err(e) => panic!("expected a valid config, got:\n{e}"),
        }
    }

    fn problems(text: &str) -> Vec<Problem> {
        match parse(text) {
            Ok(_) => panic!("expected problems, the config was accepted:\n{text}"),
            Err(e) => e.problems(),
        }
    }

    /// The only problem of `text`, asserted to be on the line containing `on_line`.
    fn one_problem(text: &str, on_line: &str) -> String {
        let ps = problems(text);
        assert_eq!(ps.len(), 1, "expected one problem, got {ps:?}");
        assert_eq!(ps[0].line, Some(line_with(text, on_line)), "{ps:?}");
        ps[0].message.clone()
    }

    /// 1-based number of the only line of `text` that contains `needle`.
    fn line_with(text: &str, needle: &str) -> usize {
        let hits: Vec<usize> = text
            .lines()
            .enumerate()
            .filter(|(_, l)| l.contains(needle))
            .map(|(i, _)| i + 1)
            .collect();
        assert_eq!(hits.len(), 1, "{needle:?} must be on exactly one line");
        hits[0]
    }

    /// `text` with the line containing `needle` replaced by `with` (which may be several lines).
    fn replace_line(text: &str, needle: &str, with: &str) -> String {
        let n = line_with(text, needle);
        text.lines()
            .enumerate()
            .map(|(i, l)| if i + 1 == n { with } else { l })
            .collect::<Vec<_>>()
            .join("\n")
            + "\n"
    }

    /// `text` with `lines` inserted right after the line containing `needle`.
    fn insert_after(text: &str, needle: &str, lines: &str) -> String {
        let n = line_with(text, needle);
        let mut out: Vec<&str> = text.lines().collect();
        out.insert(n, lines);
        out.join("\n") + "\n"
    }

    fn env(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |name| {
            pairs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    // -- valid files and defaults ---------------------------------------------------------------

    #[test]
    fn minimal_file_is_valid_and_values_are_typed() {
        let c = ok(MINIMAL);
        assert_eq!(c.server.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(c.server.public_url.as_str(), "https://shop.example/");
        assert_eq!(c.origin.url.as_str(), "http://127.0.0.1:8000/");
        assert_eq!(
            c.merchant.url.as_str(),
            "https://backend.example/instances/shop/"
        );
        assert_eq!(c.merchant.token.expose(), TOKEN);
        assert_eq!(c.session.secret.expose(), SECRET);
        assert_eq!(c.protect.len(), 1);
        let rule = &c.protect[0];
        assert_eq!(rule.prefix, "/premium");
        assert_eq!(rule.price, "KUDOS:1.5".parse::<Amount>().unwrap());
        assert_eq!(rule.summary, "Premium article");
    }

    #[test]
    fn omitted_keys_get_their_documented_defaults() {
        let c = ok(MINIMAL);
        let s = Duration::from_secs;
        assert_eq!(c.server.header_read_timeout, s(10));
        assert_eq!(c.server.idle_timeout, s(60));
        assert_eq!(c.server.request_timeout, s(300));
        assert_eq!(c.server.shutdown_grace, s(30));
        assert_eq!(c.server.max_header_bytes, 64 * 1024);
        assert_eq!(c.server.max_connections, 10_000);
        assert_eq!(c.server.mode, Mode::Enforce);
        assert!(c.server.tls.is_none());
        assert!(c.server.trusted_proxies.is_empty());
        assert_eq!(c.origin.host_header, HostHeader::Client);
        assert_eq!(c.origin.connect_timeout, s(5));
        assert_eq!(c.origin.response_timeout, s(60));
        assert_eq!(c.origin.max_idle_per_host, 256);
        assert!(c.origin.ca_file.is_none());
        assert_eq!(c.merchant.timeout, s(10));
        assert!(c.merchant.ca_file.is_none());
        assert_eq!(c.session.recheck_interval, s(300));
        assert_eq!(c.session.cookie_lifetime, s(30 * 24 * 3600));
        assert!(c.session.previous_secrets.is_empty());
        assert_eq!(c.protect[0].scope, Scope::Page);
        assert!(c.admin.is_none());
        assert_eq!(c.limits.orders_per_minute, 30);
        assert_eq!(c.limits.orders_burst, 10);
        assert_eq!(c.limits.max_request_body, 256 * 1024 * 1024);
        assert!(c.pages.dir.is_none());
    }

    #[test]
    fn a_file_without_protect_tables_is_valid_and_protects_nothing() {
        let text = MINIMAL.split("[[protect]]").next().unwrap();
        assert!(ok(text).protect.is_empty());
    }

    /// The example of `shared/spec/interface.md`, with real files for the TLS keys.
    #[test]
    fn every_pinned_key_is_accepted() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("fullchain.pem"), "cert").unwrap();
        std::fs::write(dir.path().join("privkey.pem"), "key").unwrap();
        let text = r#"
[server]
listen = "127.0.0.1:8080"
public_url = "https://shop.example"

[origin]
url = "http://127.0.0.1:8000"

[merchant]
url = "https://backend.example/instances/shop/"
token = "secret-token:TOKEN-d1st1nct1ve-7f3a"

[session]
secret = "SECRET-d1st1nct1ve-0123456789abcdef-9c4e"
recheck_interval = "0s"

[[protect]]
prefix = "/premium/"
price = "KUDOS:1.5"
summary = "Premium article"
scope = "page"

[[protect]]
prefix = "/courses/"
price = "KUDOS:10"
summary = "All courses"
scope = "prefix"

[server.tls]
cert_file = "fullchain.pem"
key_file = "privkey.pem"

[admin]
listen = "127.0.0.1:9090"
"#;
        let c = Config::from_toml_str(text, &dir.path().join("gateway.toml"), &NoEnv)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.session.recheck_interval, Duration::ZERO);
        let scopes: Vec<(&str, Scope)> = c
            .protect
            .iter()
            .map(|r| (r.prefix.as_str(), r.scope))
            .collect();
        assert_eq!(
            scopes,
            [("/premium", Scope::Page), ("/courses", Scope::Prefix)]
        );
        let tls = c.server.tls.expect("tls");
        assert_eq!(tls.cert_file, dir.path().join("fullchain.pem"));
        assert_eq!(tls.key_file, dir.path().join("privkey.pem"));
        assert_eq!(c.admin.unwrap().listen, "127.0.0.1:9090".parse().unwrap());
    }

    #[test]
    fn every_extra_key_is_accepted_and_used() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), "ca").unwrap();
        std::fs::create_dir(dir.path().join("pages")).unwrap();
        let text = r#"
[server]
listen = "[::1]:8443"
public_url = "https://shop.example/blog"
trusted_proxies = ["10.0.0.0/8", "192.0.2.7"]
header_read_timeout = "3s"
max_header_bytes = 16384
idle_timeout = "2m"
request_timeout = "90s"
shutdown_grace = "0s"
max_connections = 500
mode = "observe"

[origin]
url = "https://origin.internal:8443/site"
host_header = "origin"
connect_timeout = "1s"
response_timeout = "20s"
ca_file = "ca.pem"
max_idle_per_host = 8

[merchant]
url = "https://backend.example/"
token = "secret-token:TOKEN-d1st1nct1ve-7f3a"
timeout = "4s"
ca_file = "ca.pem"

[session]
secret = "SECRET-d1st1nct1ve-0123456789abcdef-9c4e"
previous_secrets = ["OLD-d1st1nct1ve-0123456789abcdef-0123456789"]
recheck_interval = "1m"
cookie_lifetime = "7days"

[limits]
orders_per_minute = 0
orders_burst = 3
max_request_body = 1048576

[pages]
dir = "pages"
"#;
        let c = Config::from_toml_str(text, &dir.path().join("gateway.toml"), &NoEnv)
            .unwrap_or_else(|e| panic!("{e}"));
        let s = Duration::from_secs;
        assert_eq!(c.server.listen, "[::1]:8443".parse().unwrap());
        assert_eq!(c.server.public_url.as_str(), "https://shop.example/blog");
        assert_eq!(
            c.server.trusted_proxies,
            vec![
                "10.0.0.0/8".parse::<IpNet>().unwrap(),
                "192.0.2.7/32".parse::<IpNet>().unwrap()
            ]
        );
        assert_eq!(c.server.header_read_timeout, s(3));
        assert_eq!(c.server.max_header_bytes, 16384);
        assert_eq!(c.server.idle_timeout, s(120));
        assert_eq!(c.server.request_timeout, s(90));
        assert_eq!(c.server.shutdown_grace, Duration::ZERO);
        assert_eq!(c.server.max_connections, 500);
        assert_eq!(c.server.mode, Mode::Observe);
        assert_eq!(c.origin.url.as_str(), "https://origin.internal:8443/site");
        assert_eq!(c.origin.host_header, HostHeader::Origin);
        assert_eq!(c.origin.connect_timeout, s(1));
        assert_eq!(c.origin.response_timeout, s(20));
        assert_eq!(c.origin.ca_file, Some(dir.path().join("ca.pem")));
        assert_eq!(c.origin.max_idle_per_host, 8);
        assert_eq!(c.merchant.timeout, s(4));
        assert_eq!(c.merchant.ca_file, Some(dir.path().join("ca.pem")));
        assert_eq!(c.session.previous_secrets.len(), 1);
        assert_eq!(c.session.recheck_interval, s(60));
        assert_eq!(c.session.cookie_lifetime, s(7 * 24 * 3600));
        assert_eq!(c.limits.orders_per_minute, 0);
        assert_eq!(c.limits.orders_burst, 3);
        assert_eq!(c.limits.max_request_body, 1_048_576);
        assert_eq!(c.pages.dir, Some(dir.path().join("pages")));
    }

    // -- unknown keys ---------------------------------------------------------------------------

    #[test]
    fn an_unknown_key_is_rejected_at_its_line_in_every_table() {
        let full = format!(
            "{MINIMAL}\n[server.tls]\ncert_file = \"/c\"\nkey_file = \"/k\"\n\n[admin]\nlisten = \"127.0.0.1:9090\"\n\n[limits]\norders_burst = 1\n\n[pages]\ndir = \"/p\"\n"
        );
        for table in [
            "[server]",
            "[origin]",
            "[merchant]",
            "[session]",
            "[[protect]]",
            "[server.tls]",
            "[admin]",
            "[limits]",
            "[pages]",
        ] {
            let text = insert_after(&full, table, "prefixx = \"/typo/\"");
            let Err(ConfigError::Parse { problem, .. }) = parse(&text) else {
                panic!("{table}: an unknown key must be a parse error");
            };
            assert_eq!(problem.line, Some(line_with(&text, "prefixx")), "{table}");
            assert!(
                problem.message.contains("unknown field `prefixx`"),
                "{table}: {}",
                problem.message
            );
        }
        // And at the top level, before any table.
        let text = format!("protected = true\n{full}");
        let Err(ConfigError::Parse { problem, .. }) = parse(&text) else {
            panic!("an unknown top-level key must be a parse error");
        };
        assert_eq!(problem.line, Some(1));
        assert!(problem.message.contains("unknown field `protected`"));
    }

    #[test]
    fn a_missing_required_table_is_reported() {
        let text = replace_line(MINIMAL, "[origin]", "[originn]");
        let ps = problems(&text);
        assert_eq!(ps.len(), 1);
        assert!(ps[0].message.contains("originn"), "{ps:?}");
    }

    // -- values ---------------------------------------------------------------------------------

    #[test]
    fn bad_amounts_are_rejected_at_the_price_line() {
        for price in ["KUDOS:1.123456789", "1.5", "kudos:1", "KUDOS:", "KUDOS:-1"] {
            let text = replace_line(MINIMAL, "price =", &format!("price = \"{price}\""));
            let msg = one_problem(&text, "price =");
            assert!(msg.starts_with("protect.price"), "{price}: {msg}");
        }
    }

    #[test]
    fn a_zero_price_is_rejected() {
        for price in ["KUDOS:0", "KUDOS:0.00"] {
            let text = replace_line(MINIMAL, "price =", &format!("price = \"{price}\""));
            assert!(one_problem(&text, "price =").contains("more than zero"));
        }
    }

    #[test]
    fn the_session_secret_needs_32_bytes() {
        let short = "x".repeat(MIN_SECRET_BYTES - 1);
        let text = replace_line(MINIMAL, "secret =", &format!("secret = \"{short}\""));
        let msg = one_problem(&text, "secret =");
        assert!(msg.contains("31 bytes") && msg.contains("32"), "{msg}");

        let exact = "x".repeat(MIN_SECRET_BYTES);
        let text = replace_line(MINIMAL, "secret =", &format!("secret = \"{exact}\""));
        assert_eq!(ok(&text).session.secret.expose(), exact);

        // Bytes, not characters: 16 two-byte characters are enough.
        let text = replace_line(
            MINIMAL,
            "secret =",
            &format!("secret = \"{}\"", "é".repeat(16)),
        );
        ok(&text);
    }

    #[test]
    fn a_short_previous_secret_is_rejected() {
        let text = insert_after(MINIMAL, "secret =", "previous_secrets = [\"short\"]");
        assert!(one_problem(&text, "previous_secrets").contains("32 bytes"));
    }

    #[test]
    fn bad_listen_addresses_are_rejected() {
        for addr in ["localhost:8080", "127.0.0.1", "8080", "127.0.0.1:99999", ""] {
            let text = replace_line(MINIMAL, "listen =", &format!("listen = \"{addr}\""));
            let msg = one_problem(&text, "listen =");
            assert!(msg.starts_with("server.listen"), "{addr}: {msg}");
        }
    }

    #[test]
    fn non_http_urls_are_rejected() {
        for (needle, key) in [
            ("url = \"http://127.0.0.1:8000\"", "origin.url"),
            ("url = \"https://backend", "merchant.url"),
            ("public_url =", "server.public_url"),
        ] {
            for url in [
                "ftp://example.org/",
                "file:///srv/www",
                "unix:/run/x.sock",
                "127.0.0.1:8000",
                "http://",
            ] {
                let line = needle.split('=').next().unwrap();
                let text = replace_line(MINIMAL, needle, &format!("{line}= \"{url}\""));
                let msg = one_problem(&text, &format!("\"{url}\""));
                assert!(msg.starts_with(key), "{key} = {url}: {msg}");
            }
        }
    }

    #[test]
    fn urls_with_query_fragment_or_credentials_are_rejected() {
        for url in [
            "http://127.0.0.1:8000/?a=1",
            "http://127.0.0.1:8000/#top",
            "http://user:pw@127.0.0.1:8000/",
        ] {
            let text = replace_line(
                MINIMAL,
                "url = \"http://127.0.0.1:8000\"",
                &format!("url = \"{url}\""),
            );
            assert!(one_problem(&text, url).starts_with("origin.url"), "{url}");
            let text = replace_line(
                MINIMAL,
                "url = \"https://backend",
                &format!("url = \"{url}\""),
            );
            assert!(one_problem(&text, url).starts_with("merchant.url"), "{url}");
        }
    }

    #[test]
    fn a_public_url_with_a_non_plain_path_is_rejected() {
        let text = replace_line(
            MINIMAL,
            "public_url =",
            "public_url = \"https://shop.example/a/../b\"",
        );
        // The url crate resolves dot segments itself, before our check sees the path.
        assert_eq!(ok(&text).server.public_url.path(), "/b");
        let text = replace_line(
            MINIMAL,
            "public_url =",
            "public_url = \"https://shop.example/a%2Fb\"",
        );
        assert!(one_problem(&text, "public_url").contains("plain"));
    }

    #[test]
    fn a_duplicate_prefix_is_reported_at_the_second_table() {
        for second in ["/premium/", "/premium", "/Premium/", "/PREMIUM"] {
            let text = format!(
                "{MINIMAL}\n[[protect]]\nprefix = \"{second}\" # again\nprice = \"KUDOS:2\"\nsummary = \"again\"\n"
            );
            let msg = one_problem(&text, "# again");
            assert!(msg.contains("listed twice"), "{second}: {msg}");
        }
        // Different areas are not duplicates, nested ones included.
        let text = format!(
            "{MINIMAL}\n[[protect]]\nprefix = \"/premium/gold/\"\nprice = \"KUDOS:2\"\nsummary = \"gold\"\n"
        );
        assert_eq!(ok(&text).protect.len(), 2);
    }

    #[test]
    fn a_prefix_not_in_normal_form_is_rejected_with_the_normal_form() {
        for (prefix, hint) in [
            ("/a/../b/", "write \"/b/\""),
            ("/a//b/", "write \"/a/b/\""),
            ("/./premium/", "write \"/premium/\""),
            ("/%7Euser/", "write \"/~user/\""),
            ("premium/", "must start with /"),
            ("", "must start with /"),
            ("/a%2Fb/", "encoded '/'"),
            ("/../", "above the root"),
        ] {
            let text = replace_line(MINIMAL, "prefix =", &format!("prefix = \"{prefix}\""));
            let msg = one_problem(&text, "prefix =");
            assert!(msg.contains(hint), "{prefix:?}: {msg}");
        }
    }

    #[test]
    fn normal_prefixes_are_stored_without_trailing_slash() {
        for (prefix, stored) in [
            ("/premium/", "/premium"),
            ("/premium", "/premium"),
            ("/a/b/", "/a/b"),
            ("/", "/"),
        ] {
            let text = replace_line(MINIMAL, "prefix =", &format!("prefix = \"{prefix}\""));
            assert_eq!(ok(&text).protect[0].prefix, stored, "{prefix}");
        }
    }

    #[test]
    fn an_empty_summary_is_rejected() {
        let text = replace_line(MINIMAL, "summary =", "summary = \"   \"");
        assert!(one_problem(&text, "summary =").contains("summary"));
    }

    #[test]
    fn bad_durations_are_rejected_at_their_line() {
        for value in ["300", "5 minutes please", "-1s", ""] {
            let text = insert_after(
                MINIMAL,
                "secret =",
                &format!("recheck_interval = \"{value}\""),
            );
            let msg = one_problem(&text, "recheck_interval");
            assert!(
                msg.starts_with("session.recheck_interval"),
                "{value}: {msg}"
            );
        }
        let text = insert_after(MINIMAL, "listen =", "idle_timeout = \"0s\"");
        assert!(one_problem(&text, "idle_timeout").contains("greater than zero"));
        let text = insert_after(MINIMAL, "secret =", "cookie_lifetime = \"59s\"");
        assert!(one_problem(&text, "cookie_lifetime").contains("at least 60s"));
    }

    #[test]
    fn bad_enumerations_are_rejected() {
        let text = insert_after(MINIMAL, "summary =", "scope = \"site\"");
        assert!(one_problem(&text, "scope =").contains("\"page\" nor \"prefix\""));
        let text = insert_after(MINIMAL, "summary =", "scope = \"Page\"");
        one_problem(&text, "scope =");
        let text = insert_after(MINIMAL, "listen =", "mode = \"audit\"");
        assert!(one_problem(&text, "mode =").starts_with("server.mode"));
        let text = insert_after(MINIMAL, "url = \"http://127", "host_header = \"proxy\"");
        assert!(one_problem(&text, "host_header").starts_with("origin.host_header"));
    }

    #[test]
    fn bad_numbers_and_networks_are_rejected() {
        let text = insert_after(MINIMAL, "listen =", "max_header_bytes = 100");
        one_problem(&text, "max_header_bytes");
        let text = insert_after(MINIMAL, "listen =", "max_connections = 0");
        one_problem(&text, "max_connections");
        let text = insert_after(MINIMAL, "listen =", "trusted_proxies = [\"10.0.0.0/33\"]");
        one_problem(&text, "trusted_proxies");
    }

    #[test]
    fn missing_files_are_reported_at_their_line() {
        let text = format!(
            "{MINIMAL}\n[server.tls]\ncert_file = \"no-such-cert.pem\"\nkey_file = \"/no/such/key.pem\"\n"
        );
        let ps = problems(&text);
        let lines: Vec<Option<usize>> = ps.iter().map(|p| p.line).collect();
        assert_eq!(
            lines,
            [
                Some(line_with(&text, "cert_file")),
                Some(line_with(&text, "key_file"))
            ]
        );
        // Relative paths are resolved against the config file's directory.
        assert!(ps[0]
            .message
            .contains("/etc/taler-paywall/no-such-cert.pem"));
    }

    // -- secrets: token, token_file, secret_file, environment -----------------------------------

    #[test]
    fn token_and_token_file_together_are_rejected() {
        let text = insert_after(MINIMAL, "token =", "token_file = \"/run/secrets/token\"");
        let msg = one_problem(&text, "token =");
        assert!(msg.contains("not both"), "{msg}");
    }

    #[test]
    fn secret_and_secret_file_together_are_rejected() {
        let text = insert_after(MINIMAL, "secret =", "secret_file = \"/run/secrets/s\"");
        assert!(one_problem(&text, "secret =").contains("not both"));
    }

    #[test]
    fn a_missing_token_or_secret_names_the_ways_to_set_it() {
        let text = replace_line(MINIMAL, "token =", "");
        let msg = one_problem(&text, "url = \"https://backend");
        assert!(
            msg.contains("token_file") && msg.contains(ENV_MERCHANT_TOKEN),
            "{msg}"
        );

        let text = replace_line(MINIMAL, "secret =", "");
        let ps = problems(&text);
        assert_eq!(ps.len(), 1, "{ps:?}");
        assert!(
            ps[0].message.contains("secret_file") && ps[0].message.contains(ENV_SESSION_SECRET)
        );
    }

    #[test]
    fn secret_files_are_read_relative_to_the_config_directory() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("secrets")).unwrap();
        std::fs::write(dir.path().join("secrets/token"), format!("{TOKEN}\n")).unwrap();
        std::fs::write(dir.path().join("secrets/session"), format!("{SECRET}\r\n")).unwrap();
        let text = replace_line(MINIMAL, "token =", "token_file = \"secrets/token\"");
        let text = replace_line(&text, "secret =", "secret_file = \"secrets/session\"");
        let c = Config::from_toml_str(&text, &dir.path().join("gateway.toml"), &NoEnv)
            .unwrap_or_else(|e| panic!("{e}"));
        // The final newline that editors and `echo` add is not part of the secret.
        assert_eq!(c.merchant.token.expose(), TOKEN);
        assert_eq!(c.session.secret.expose(), SECRET);

        // An absolute path is taken as it is.
        let abs = dir.path().join("secrets/token");
        let text = replace_line(
            MINIMAL,
            "token =",
            &format!("token_file = \"{}\"", abs.display()),
        );
        assert_eq!(ok(&text).merchant.token.expose(), TOKEN);
    }

    #[test]
    fn an_unreadable_secret_file_is_reported_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let text = replace_line(MINIMAL, "token =", "token_file = \"missing-token\"");
        let text = replace_line(&text, "secret =", "secret_file = \".\"");
        let err = Config::from_toml_str(&text, &dir.path().join("gateway.toml"), &NoEnv)
            .expect_err("unreadable files");
        let ps = err.problems();
        assert_eq!(ps.len(), 2, "{ps:?}");
        assert_eq!(ps[0].line, Some(line_with(&text, "token_file")));
        assert!(ps[0]
            .message
            .contains(&dir.path().join("missing-token").display().to_string()));
        assert_eq!(ps[1].line, Some(line_with(&text, "secret_file")));
        assert!(ps[1]
            .message
            .starts_with("session.secret_file: cannot read"));
    }

    #[test]
    fn a_short_secret_from_a_file_is_rejected_at_the_secret_file_line() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("s"), "too short\n").unwrap();
        let text = replace_line(MINIMAL, "secret =", "secret_file = \"s\"");
        let err = Config::from_toml_str(&text, &dir.path().join("gateway.toml"), &NoEnv)
            .expect_err("short secret");
        let ps = err.problems();
        assert_eq!(ps.len(), 1);
        assert_eq!(ps[0].line, Some(line_with(&text, "secret_file")));
        assert!(ps[0].message.contains("9 bytes"), "{ps:?}");
    }

    #[test]
    fn environment_overrides_win_over_the_file() {
        let e = env(&[
            (ENV_MERCHANT_TOKEN, ENV_TOKEN),
            (ENV_SESSION_SECRET, ENV_SECRET),
        ]);
        let c = Config::from_toml_str(MINIMAL, file(), &e).unwrap();
        assert_eq!(c.merchant.token.expose(), ENV_TOKEN);
        assert_eq!(c.session.secret.expose(), ENV_SECRET);

        // Over *_file too: the files are then not even read.
        let text = replace_line(MINIMAL, "token =", "token_file = \"/no/such/token\"");
        let text = replace_line(&text, "secret =", "secret_file = \"/no/such/secret\"");
        let c = Config::from_toml_str(&text, file(), &e).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.merchant.token.expose(), ENV_TOKEN);
        assert_eq!(c.session.secret.expose(), ENV_SECRET);

        // And the file need not name them at all.
        let text = replace_line(MINIMAL, "token =", "");
        let text = replace_line(&text, "secret =", "");
        assert!(Config::from_toml_str(&text, file(), &e).is_ok());
    }

    #[test]
    fn a_short_secret_from_the_environment_names_the_variable() {
        let e = env(&[(ENV_SESSION_SECRET, "short")]);
        let err = Config::from_toml_str(MINIMAL, file(), &e).expect_err("short");
        let ps = err.problems();
        assert_eq!(ps.len(), 1);
        assert_eq!(ps[0].line, None, "the file is not where the problem is");
        assert!(ps[0].message.starts_with(ENV_SESSION_SECRET), "{ps:?}");
    }

    #[test]
    fn the_secret_token_prefix_is_added_when_missing() {
        let text = replace_line(MINIMAL, "token =", "token = \"sandbox\"");
        assert_eq!(ok(&text).merchant.token.expose(), "secret-token:sandbox");
        let e = env(&[(ENV_MERCHANT_TOKEN, "from-env")]);
        let c = Config::from_toml_str(MINIMAL, file(), &e).unwrap();
        assert_eq!(c.merchant.token.expose(), "secret-token:from-env");
        // Never doubled.
        let text = replace_line(MINIMAL, "token =", "token = \"secret-token:abc\"");
        assert_eq!(ok(&text).merchant.token.expose(), "secret-token:abc");
    }

    #[test]
    fn an_empty_or_non_printable_token_is_rejected() {
        for token in ["secret-token:", "", "secret-token:has space"] {
            let text = replace_line(MINIMAL, "token =", &format!("token = \"{token}\""));
            assert!(
                one_problem(&text, "url = \"https://backend").contains("printable"),
                "{token:?}"
            );
        }
    }

    // -- URL shapes -----------------------------------------------------------------------------

    #[test]
    fn the_merchant_url_always_ends_in_a_slash() {
        for (given, stored) in [
            (
                "https://backend.example/instances/shop",
                "https://backend.example/instances/shop/",
            ),
            (
                "https://backend.example/instances/shop/",
                "https://backend.example/instances/shop/",
            ),
            ("http://127.0.0.1:9966", "http://127.0.0.1:9966/"),
        ] {
            let text = replace_line(
                MINIMAL,
                "url = \"https://backend",
                &format!("url = \"{given}\""),
            );
            assert_eq!(ok(&text).merchant.url.as_str(), stored, "{given}");
        }
    }

    #[test]
    fn the_public_url_and_origin_lose_their_trailing_slash() {
        let text = replace_line(
            MINIMAL,
            "public_url =",
            "public_url = \"https://shop.example/blog/\"",
        );
        assert_eq!(
            ok(&text).server.public_url.as_str(),
            "https://shop.example/blog"
        );
        let text = replace_line(
            MINIMAL,
            "url = \"http://127.0.0.1:8000\"",
            "url = \"http://127.0.0.1:8000/site/\"",
        );
        assert_eq!(ok(&text).origin.url.as_str(), "http://127.0.0.1:8000/site");
    }

    // -- [admin] --------------------------------------------------------------------------------

    #[test]
    fn the_admin_listener_must_differ_from_the_public_one() {
        let text = format!("{MINIMAL}\n[admin]\nlisten = \"127.0.0.1:8080\" # admin\n");
        let msg = one_problem(&text, "# admin");
        assert!(msg.starts_with("admin.listen must differ"), "{msg}");
        let text = format!("{MINIMAL}\n[admin]\nlisten = \"127.0.0.1:9090\"\n");
        assert!(ok(&text).admin.is_some());
    }

    // -- [forward_auth] -------------------------------------------------------------------------

    #[test]
    fn forward_auth_is_off_without_its_table_and_defaults_its_path() {
        assert!(ok(MINIMAL).forward_auth.is_none());
        let text = insert_after(MINIMAL, "listen =", "trusted_proxies = [\"127.0.0.1\"]");
        let text = format!("{text}\n[forward_auth]\n");
        let fa = ok(&text).forward_auth.expect("enabled by the table");
        assert_eq!(fa.path, DEFAULT_FORWARD_AUTH_PATH);
        let text = format!("{text}path = \"/_auth/check\"\n");
        assert_eq!(ok(&text).forward_auth.unwrap().path, "/_auth/check");
    }

    #[test]
    fn forward_auth_needs_a_trusted_proxy() {
        let text = format!("{MINIMAL}\n[forward_auth] # fa\npath = \"/_auth\"\n");
        let msg = one_problem(&text, "# fa");
        assert!(msg.contains("trusted_proxies"), "{msg}");
    }

    #[test]
    fn forward_auth_path_must_be_plain_and_not_protected() {
        let base = insert_after(MINIMAL, "listen =", "trusted_proxies = [\"127.0.0.1\"]");
        for bad in [
            "/a/../auth",
            "//auth",
            "/%61uth",
            "auth",
            "/",
            "/auth/",
            "/a%2Fb",
        ] {
            let text = format!("{base}\n[forward_auth]\npath = \"{bad}\" # p\n");
            let msg = one_problem(&text, "# p");
            assert!(msg.starts_with("forward_auth.path"), "{bad}: {msg}");
        }
        // A [[protect]] prefix covering the endpoint (in any letter case) is refused.
        for shadowed in ["/premium/auth", "/PREMIUM/auth", "/premium"] {
            let text = format!("{base}\n[forward_auth]\npath = \"{shadowed}\" # p\n");
            let msg = one_problem(&text, "# p");
            assert!(msg.contains("protected prefix"), "{shadowed}: {msg}");
        }
        // Also the default path, under a prefix of "/".
        let text = replace_line(&base, "prefix =", "prefix = \"/\"");
        let text = format!("{text}\n[forward_auth] # fa\n");
        let msg = one_problem(&text, "# fa");
        assert!(msg.contains("protected prefix"), "{msg}");
    }

    // -- several problems -----------------------------------------------------------------------

    #[test]
    fn every_problem_of_a_file_is_reported_with_its_own_line() {
        let text = r#"[server]
listen = "localhost"
public_url = "https://shop.example"
idle_timeout = "0s"

[origin]
url = "ftp://origin.example"

[merchant]
url = "https://backend.example/?instance=shop"
token = "secret-token:TOKEN-d1st1nct1ve-7f3a"

[session]
secret = "too-short"
recheck_interval = "soon"

[[protect]]
prefix = "/a/../premium/"
price = "KUDOS:1.123456789"
summary = "Premium"
scope = "everything"

[[protect]]
prefix = "/free/"
price = "KUDOS:0"
summary = "Free?"

[admin]
listen = "nope"

[pages]
dir = "/no/such/pages/dir"
"#;
        let ps = problems(text);
        let got: Vec<(usize, &str)> = ps
            .iter()
            .map(|p| {
                (
                    p.line.expect("every problem has a line"),
                    p.message.as_str(),
                )
            })
            .collect();
        let want = [
            ("listen = \"localhost\"", "server.listen"),
            ("idle_timeout", "server.idle_timeout"),
            ("ftp://", "origin.url"),
            ("?instance=", "merchant.url"),
            ("too-short", "session.secret"),
            ("soon", "session.recheck_interval"),
            ("/a/../premium/", "protect.prefix"),
            ("1.123456789", "protect.price"),
            ("everything", "protect.scope"),
            ("KUDOS:0", "protect.price"),
            ("\"nope\"", "admin.listen"),
            ("/no/such/pages", "pages.dir"),
        ];
        for (needle, key) in want {
            let line = line_with(text, needle);
            assert!(
                got.iter().any(|(l, m)| *l == line && m.starts_with(key)),
                "no {key} problem on line {line}; got {got:#?}"
            );
        }
        assert_eq!(got.len(), want.len(), "{got:#?}");

        // Display puts each on its own `FILE:LINE: message` line.
        let shown = parse(text).unwrap_err().to_string();
        let lines: Vec<&str> = shown.lines().collect();
        assert_eq!(lines.len(), want.len());
        for (line, (l, m)) in lines.iter().zip(&got) {
            assert_eq!(*line, format!("/etc/taler-paywall/gateway.toml:{l}: {m}"));
        }
    }

    // -- secrets never leak ---------------------------------------------------------------------

    fn assert_no_secret(what: &str, s: &str) {
        for secret in [
            TOKEN,
            "TOKEN-d1st1nct1ve",
            SECRET,
            "SECRET-d1st1nct1ve",
            ENV_TOKEN,
            "ENVTOKEN-d1st1nct1ve",
            ENV_SECRET,
            "ENVSECRET-d1st1nct1ve",
            "OLD-d1st1nct1ve",
        ] {
            assert!(!s.contains(secret), "{what} leaks {secret:?}:\n{s}");
        }
    }

    #[test]
    fn debug_output_never_contains_a_secret() {
        let text = insert_after(
            MINIMAL,
            "secret =",
            "previous_secrets = [\"OLD-d1st1nct1ve-0123456789abcdef-0123456789\"]",
        );
        let c = ok(&text);
        assert_no_secret("Config Debug", &format!("{c:?}"));
        assert_no_secret("Config pretty Debug", &format!("{c:#?}"));
        assert_no_secret("Secret Display", &c.merchant.token.to_string());
        let e = env(&[
            (ENV_MERCHANT_TOKEN, ENV_TOKEN),
            (ENV_SESSION_SECRET, ENV_SECRET),
        ]);
        let c = Config::from_toml_str(MINIMAL, file(), &e).unwrap();
        assert_no_secret("Config Debug (env)", &format!("{c:?}"));
    }

    #[test]
    fn error_messages_never_contain_a_secret() {
        let with_old = |old: &str| insert_after(MINIMAL, "secret =", old);
        let cases: Vec<(&str, String)> = vec![
            // Secrets of the wrong type: serde would quote the value.
            (
                "previous_secrets as a string",
                with_old("previous_secrets = \"OLD-d1st1nct1ve-0123456789abcdef-0123456789\""),
            ),
            (
                "token as a table",
                replace_line(
                    MINIMAL,
                    "token =",
                    "token = { value = \"secret-token:TOKEN-d1st1nct1ve-7f3a\" }",
                ),
            ),
            // Secrets that fail validation.
            (
                "token with a space",
                replace_line(
                    MINIMAL,
                    "token =",
                    "token = \"secret-token:TOKEN-d1st1nct1ve 7f3a\"",
                ),
            ),
            (
                "short secret",
                replace_line(MINIMAL, "secret =", "secret = \"SECRET-d1st1nct1ve\""),
            ),
            (
                "short previous secret",
                with_old("previous_secrets = [\"OLD-d1st1nct1ve\"]"),
            ),
            (
                "token and token_file",
                insert_after(MINIMAL, "token =", "token_file = \"/x\""),
            ),
            (
                "secret and secret_file",
                insert_after(MINIMAL, "secret =", "secret_file = \"/x\""),
            ),
            // A secret in a misspelt key, or on a line with a syntax error.
            (
                "misspelt key",
                replace_line(
                    MINIMAL,
                    "secret =",
                    "secrett = \"SECRET-d1st1nct1ve-0123456789abcdef-9c4e\"",
                ),
            ),
            (
                "syntax error",
                replace_line(
                    MINIMAL,
                    "secret =",
                    "secret = \"SECRET-d1st1nct1ve-0123456789abcdef-9c4e\" trailing",
                ),
            ),
            (
                "unterminated string",
                replace_line(
                    MINIMAL,
                    "token =",
                    "token = \"secret-token:TOKEN-d1st1nct1ve-7f3a",
                ),
            ),
            // Another key's problem in a file that holds the secrets.
            (
                "bad price",
                replace_line(MINIMAL, "price =", "price = \"1.5\""),
            ),
        ];
        for (what, text) in &cases {
            let err = parse(text).expect_err(what);
            assert_no_secret(what, &err.to_string());
            assert_no_secret(what, &format!("{err:?}"));
        }

        // Secrets from the environment that are rejected.
        let e = env(&[
            (ENV_MERCHANT_TOKEN, "secret-token:ENVTOKEN-d1st1nct1ve 51b2"),
            (ENV_SESSION_SECRET, "ENVSECRET-d1st1nct1ve"),
        ]);
        let err = Config::from_toml_str(MINIMAL, file(), &e).expect_err("env");
        assert_eq!(err.problems().len(), 2);
        assert_no_secret("env secrets", &err.to_string());
        assert_no_secret("env secrets", &format!("{err:?}"));
    }

    #[test]
    fn redaction_keeps_backquoted_names_and_hides_quoted_values() {
        assert_eq!(
            redact_quoted_values(r#"invalid type: string "a \"b\" c", expected a sequence"#),
            "invalid type: string (value not shown), expected a sequence"
        );
        assert_eq!(
            redact_quoted_values("expected `\"`, `'`"),
            "expected `\"`, `'`"
        );
        assert_eq!(
            redact_quoted_values("unknown field `secrett`, expected `secret`"),
            "unknown field `secrett`, expected `secret`"
        );
    }
}
