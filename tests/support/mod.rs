//! Helpers shared by the integration tests: a recording test origin, gateway start-up from a
//! TOML template, an HTTP client, a raw TCP client for framing tests, and a way to run the
//! real binary and read its peak memory.
//!
//! Everything listens on 127.0.0.1 with ephemeral ports. Each integration test file includes
//! this with `mod support;`; not every file uses every helper.
#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

use taler_paywall::config::{Config, NoEnv};
use taler_paywall::gateway::RunningGateway;

/// Upper bound for any single test; a hang becomes a failure instead of a stuck CI job.
pub const TEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs `fut`, failing the test if it takes longer than [`TEST_TIMEOUT`].
pub async fn bounded<T>(fut: impl std::future::Future<Output = T>) -> T {
    match tokio::time::timeout(TEST_TIMEOUT, fut).await {
        Ok(v) => v,
        Err(_) => panic!("test did not finish within {TEST_TIMEOUT:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Test origin
// ---------------------------------------------------------------------------------------------

/// One request as the origin received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// The method.
    pub method: Method,
    /// Path and query exactly as received.
    pub target: String,
    /// HTTP version of the origin-side request.
    pub version: Version,
    /// All headers.
    pub headers: HeaderMap,
    /// The body (only read for [`Reply::Echo`]; empty otherwise).
    pub body: Bytes,
}

impl Recorded {
    /// The single value of `name`, as a string.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// How the origin answers a path (the longest matching prefix wins; default [`Reply::Echo`]).
#[derive(Clone)]
pub enum Reply {
    /// 200 with the request body; `x-echo-method` and `x-echo-target` headers.
    Echo,
    /// A fixed status, headers and body.
    Fixed {
        /// The status.
        status: u16,
        /// Extra headers (may include hop-by-hop ones, to test stripping).
        headers: Vec<(&'static str, &'static str)>,
        /// The body.
        body: &'static str,
    },
    /// 200 with `bytes` bytes of `x`, streamed in 64 KiB chunks, with `Content-Length`.
    Stream {
        /// Total size.
        bytes: u64,
    },
    /// Headers and `first` at once; `rest` only after `release` is notified.
    SlowFirstByte {
        /// Sent immediately.
        first: &'static str,
        /// Sent after the release.
        rest: &'static str,
        /// Notified by the test.
        release: Arc<Notify>,
    },
    /// Nothing at all until `release` is notified, then 200 with `body`.
    Hold {
        /// Notified by the test.
        release: Arc<Notify>,
        /// The body after the release.
        body: &'static str,
    },
    /// Never answers.
    Never,
    /// Promises `promised` bytes, sends `sent`, then breaks the connection.
    ResetMidBody {
        /// `Content-Length`.
        promised: u64,
        /// Bytes actually sent.
        sent: usize,
    },
    /// `101 Switching Protocols` (`Upgrade: websocket`), then echoes raw bytes.
    UpgradeEcho,
    /// Reads the whole body without keeping it; 200 with the byte count as the body.
    Count,
}

/// A recording HTTP/1.1 + HTTP/2 origin on 127.0.0.1.
pub struct TestOrigin {
    /// Where it listens.
    pub addr: SocketAddr,
    records: Arc<Mutex<Vec<Recorded>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TestOrigin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TestOrigin {
    /// Starts an origin that echoes everything.
    pub async fn echo() -> TestOrigin {
        Self::start(Vec::new()).await
    }

    /// Starts an origin answering by path prefix.
    pub async fn start(routes: Vec<(&'static str, Reply)>) -> TestOrigin {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind origin");
        let addr = listener.local_addr().expect("origin addr");
        let records = Arc::new(Mutex::new(Vec::new()));
        let mut routes = routes;
        routes.sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
        let routes = Arc::new(routes);
        let rec = records.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let routes = routes.clone();
                let rec = rec.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let routes = routes.clone();
                        let rec = rec.clone();
                        async move { Ok::<_, Infallible>(origin_answer(req, &routes, &rec).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        TestOrigin {
            addr,
            records,
            task,
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request received so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.records.lock().expect("records").clone()
    }

    /// How many requests were received.
    pub fn count(&self) -> usize {
        self.records.lock().expect("records").len()
    }

    /// The only request received; panics otherwise.
    pub fn only_request(&self) -> Recorded {
        let all = self.requests();
        assert_eq!(
            all.len(),
            1,
            "expected exactly one origin request, got {all:?}"
        );
        all.into_iter().next().expect("one")
    }
}

type OriginBody =
    http_body_util::combinators::BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

fn boxed<B>(b: B) -> OriginBody
where
    B: http_body::Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    b.map_err(Into::into).boxed()
}

static CHUNK: [u8; 65536] = [b'x'; 65536];

async fn origin_answer(
    mut req: Request<Incoming>,
    routes: &[(&'static str, Reply)],
    records: &Mutex<Vec<Recorded>>,
) -> Response<OriginBody> {
    let path = req.uri().path().to_owned();
    let reply = routes
        .iter()
        .find(|(p, _)| path.starts_with(p))
        .map(|(_, r)| r.clone())
        .unwrap_or(Reply::Echo);
    let mut record = Recorded {
        method: req.method().clone(),
        target: req
            .uri()
            .path_and_query()
            .map(|p| p.as_str().to_owned())
            .unwrap_or_default(),
        version: req.version(),
        headers: req.headers().clone(),
        body: Bytes::new(),
    };
    let push = |r: Recorded| records.lock().expect("records").push(r);
    match reply {
        Reply::Echo => {
            let method = req.method().to_string();
            let target = record.target.clone();
            let body = req.into_body().collect().await.map(|c| c.to_bytes());
            let Ok(body) = body else {
                record.body = Bytes::from_static(b"<body error>");
                push(record);
                return plain(400, "body error");
            };
            record.body = body.clone();
            push(record);
            let mut resp = Response::new(boxed(Full::new(body)));
            resp.headers_mut().insert(
                "x-echo-method",
                HeaderValue::from_str(&method).expect("method"),
            );
            resp.headers_mut().insert(
                "x-echo-target",
                HeaderValue::from_str(&target).expect("target"),
            );
            resp
        }
        Reply::Fixed {
            status,
            headers,
            body,
        } => {
            push(record);
            let mut resp = plain(status, body);
            for (k, v) in headers {
                resp.headers_mut()
                    .append(HeaderName::from_static(k), HeaderValue::from_static(v));
            }
            resp
        }
        Reply::Stream { bytes } => {
            push(record);
            let stream = futures_util::stream::unfold(bytes, |left| async move {
                if left == 0 {
                    return None;
                }
                let n = left.min(CHUNK.len() as u64);
                let chunk = Bytes::from_static(&CHUNK[..n as usize]);
                Some((Ok::<_, Infallible>(Frame::data(chunk)), left - n))
            });
            let mut resp = Response::new(boxed(StreamBody::new(stream)));
            resp.headers_mut()
                .insert(http::header::CONTENT_LENGTH, HeaderValue::from(bytes));
            resp
        }
        Reply::SlowFirstByte {
            first,
            rest,
            release,
        } => {
            push(record);
            let stream = futures_util::stream::unfold(0u8, move |step| {
                let release = release.clone();
                async move {
                    match step {
                        0 => Some((
                            Ok::<_, Infallible>(Frame::data(Bytes::from_static(first.as_bytes()))),
                            1,
                        )),
                        1 => {
                            release.notified().await;
                            Some((Ok(Frame::data(Bytes::from_static(rest.as_bytes()))), 2))
                        }
                        _ => None,
                    }
                }
            });
            Response::new(boxed(StreamBody::new(stream)))
        }
        Reply::Hold { release, body } => {
            push(record);
            release.notified().await;
            plain(200, body)
        }
        Reply::Never => {
            push(record);
            std::future::pending::<()>().await;
            plain(500, "unreachable")
        }
        Reply::ResetMidBody { promised, sent } => {
            push(record);
            // The head and the first bytes go out first; the break comes a moment later, so
            // that it happens mid-body rather than before the head.
            let stream = futures_util::stream::unfold(0u8, move |step| async move {
                match step {
                    0 => Some((Ok(Frame::data(Bytes::from(vec![b'y'; sent]))), 1)),
                    1 => {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        let err: Box<dyn std::error::Error + Send + Sync> =
                            "origin breaks the connection".into();
                        Some((Err(err), 2))
                    }
                    _ => None,
                }
            });
            let mut resp = Response::new(boxed(StreamBody::new(stream)));
            resp.headers_mut()
                .insert(http::header::CONTENT_LENGTH, HeaderValue::from(promised));
            resp
        }
        Reply::Count => {
            let mut body = req.into_body();
            let mut total = 0u64;
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(f) => total += f.data_ref().map_or(0, |d| d.len() as u64),
                    Err(_) => return plain(400, "body error"),
                }
            }
            push(record);
            Response::new(boxed(Full::new(Bytes::from(total.to_string()))))
        }
        Reply::UpgradeEcho => {
            push(record);
            let on_upgrade = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                if let Ok(up) = on_upgrade.await {
                    let mut io = TokioIo::new(up);
                    let mut buf = [0u8; 4096];
                    loop {
                        match io.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if io.write_all(&buf[..n]).await.is_err() {
                                    break;
                                }
                            }
                        }
                    }
                }
            });
            let mut resp = Response::new(boxed(http_body_util::Empty::<Bytes>::new()));
            *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            resp.headers_mut().insert(
                http::header::CONNECTION,
                HeaderValue::from_static("upgrade"),
            );
            resp.headers_mut()
                .insert(http::header::UPGRADE, HeaderValue::from_static("websocket"));
            resp
        }
    }
}

fn plain(status: u16, body: &'static str) -> Response<OriginBody> {
    let mut resp = Response::new(boxed(Full::new(Bytes::from_static(body.as_bytes()))));
    *resp.status_mut() = StatusCode::from_u16(status).expect("status");
    resp
}

/// An address on which nothing listens (bound, then released).
pub async fn closed_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    drop(l);
    addr
}

// ---------------------------------------------------------------------------------------------
// Gateway configuration and start-up
// ---------------------------------------------------------------------------------------------

/// Builds a complete gateway config: the required tables with test values, plus extra lines
/// for `[server]` and `[origin]` and any further tables. `{{listen}}` stays a placeholder
/// that [`start_gateway`] / [`BinaryGateway::start`] fill in.
#[derive(Debug, Clone)]
pub struct ConfigBuilder {
    origin: String,
    server: Vec<String>,
    origin_extra: Vec<String>,
    tail: Vec<String>,
    protect: bool,
}

impl ConfigBuilder {
    /// A config for `origin_url`, with `/premium/` protected.
    pub fn new(origin_url: &str) -> Self {
        ConfigBuilder {
            origin: origin_url.to_owned(),
            server: Vec::new(),
            origin_extra: Vec::new(),
            tail: Vec::new(),
            protect: true,
        }
    }

    /// Adds a line to `[server]`.
    pub fn server(mut self, line: &str) -> Self {
        self.server.push(line.to_owned());
        self
    }

    /// Adds a line to `[origin]`.
    pub fn origin(mut self, line: &str) -> Self {
        self.origin_extra.push(line.to_owned());
        self
    }

    /// Adds text after everything else (e.g. a `[limits]` table).
    pub fn tail(mut self, text: &str) -> Self {
        self.tail.push(text.to_owned());
        self
    }

    /// Leaves out the default `[[protect]]` table.
    pub fn no_protect(mut self) -> Self {
        self.protect = false;
        self
    }

    /// The TOML template (with `{{listen}}` unfilled).
    pub fn build(&self) -> String {
        let mut s = String::new();
        s.push_str("[server]\nlisten = \"{{listen}}\"\npublic_url = \"http://gateway.test\"\n");
        for l in &self.server {
            s.push_str(l);
            s.push('\n');
        }
        s.push_str(&format!("\n[origin]\nurl = \"{}\"\n", self.origin));
        for l in &self.origin_extra {
            s.push_str(l);
            s.push('\n');
        }
        s.push_str(
            "\n[merchant]\nurl = \"http://127.0.0.1:9/instances/test/\"\ntoken = \"secret-token:test\"\n\
             \n[session]\nsecret = \"0123456789abcdef0123456789abcdef-test-only\"\n",
        );
        if self.protect {
            s.push_str(
                "\n[[protect]]\nprefix = \"/premium/\"\nprice = \"KUDOS:1\"\nsummary = \"Premium\"\n",
            );
        }
        for t in &self.tail {
            s.push('\n');
            s.push_str(t);
            s.push('\n');
        }
        s
    }
}

/// Parses a config template, with `{{listen}}` replaced by `listen`.
pub fn parse_config(template: &str, listen: &str) -> Config {
    let text = template.replace("{{listen}}", listen);
    match Config::from_toml_str(&text, Path::new("test.toml"), &NoEnv) {
        Ok(c) => c,
        Err(e) => panic!("test config invalid: {e}\n{text}"),
    }
}

/// Starts an in-process gateway from a config template on 127.0.0.1:0.
pub async fn start_gateway(template: &str) -> RunningGateway {
    let config = parse_config(template, "127.0.0.1:0");
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind gateway");
    taler_paywall::gateway::spawn(config, listener)
        .await
        .expect("gateway starts")
}

// ---------------------------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------------------------

/// A response read completely.
#[derive(Debug)]
pub struct TestResponse {
    /// The status.
    pub status: StatusCode,
    /// The headers.
    pub headers: HeaderMap,
    /// The body.
    pub body: Bytes,
}

impl TestResponse {
    /// The single value of `name`, as a string.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// An HTTP/1.1 client (hyper-util legacy), no pooling surprises: one per test is fine.
pub fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// An HTTP/2 prior-knowledge (h2c) client.
pub fn h2c_client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

/// A request to the gateway at `addr`.
pub fn request(method: &str, addr: SocketAddr, target: &str) -> http::request::Builder {
    Request::builder()
        .method(method)
        .uri(format!("http://{addr}{target}"))
}

/// Sends `req` and reads the whole response.
pub async fn send(
    client: &Client<HttpConnector, Full<Bytes>>,
    req: Request<Full<Bytes>>,
) -> TestResponse {
    let resp = client.request(req).await.expect("request sent");
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.expect("body read").to_bytes();
    TestResponse {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// `GET target` with an empty body.
pub async fn get(addr: SocketAddr, target: &str) -> TestResponse {
    let req = request("GET", addr, target)
        .body(Full::new(Bytes::new()))
        .expect("request");
    send(&client(), req).await
}

/// Writes `bytes` on a fresh connection and reads until the server closes it, or until
/// `wait` passes; returns what was read (lossy UTF-8).
pub async fn raw_exchange(addr: SocketAddr, bytes: &[u8], wait: Duration) -> String {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(bytes).await.expect("write");
    read_until_close(&mut stream, wait).await
}

/// Reads from `stream` until EOF, an error, or `wait` passes.
pub async fn read_until_close(stream: &mut TcpStream, wait: Duration) -> String {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(wait, async {
        let mut buf = [0u8; 8192];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    String::from_utf8_lossy(&out).into_owned()
}

/// A raw `GET` with `Connection: close`, for targets an HTTP client library would rewrite.
pub async fn raw_get(addr: SocketAddr, target: &str, extra_headers: &str) -> String {
    let req = format!(
        "GET {target} HTTP/1.1\r\nHost: gateway.test\r\n{extra_headers}Connection: close\r\n\r\n"
    );
    raw_exchange(addr, req.as_bytes(), Duration::from_secs(10)).await
}

/// The status code of a raw HTTP/1.x response.
pub fn raw_status(response: &str) -> Option<u16> {
    response.split(' ').nth(1)?.parse().ok()
}

// ---------------------------------------------------------------------------------------------
// The real binary
// ---------------------------------------------------------------------------------------------

/// `taler-paywall serve` running as a child process on a free port.
pub struct BinaryGateway {
    /// Where it listens.
    pub addr: SocketAddr,
    child: Child,
    /// Holds the config and the captured stderr.
    pub dir: tempfile::TempDir,
}

impl BinaryGateway {
    /// Path of the built binary.
    pub fn exe() -> PathBuf {
        PathBuf::from(env!("CARGO_BIN_EXE_taler-paywall"))
    }

    /// Writes the config (with a free port for `{{listen}}`), starts the binary and waits
    /// until it accepts connections.
    pub async fn start(template: &str) -> BinaryGateway {
        Self::start_with_env(template, &[]).await
    }

    /// Like [`BinaryGateway::start`], with extra environment variables (applied last, so
    /// `RUST_LOG` may be overridden).
    pub async fn start_with_env(template: &str, env: &[(&str, &str)]) -> BinaryGateway {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr").port()
        };
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("gateway.toml");
        std::fs::write(&config, template.replace("{{listen}}", &addr.to_string()))
            .expect("write config");
        let stderr = std::fs::File::create(dir.path().join("stderr.log")).expect("stderr file");
        let child = Command::new(Self::exe())
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "warn")
            .env_remove("TALER_PAYWALL_MERCHANT_TOKEN")
            .env_remove("TALER_PAYWALL_SESSION_SECRET")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn binary");
        let mut gw = BinaryGateway { addr, child, dir };
        for _ in 0..200 {
            if TcpStream::connect(addr).await.is_ok() {
                return gw;
            }
            if let Ok(Some(status)) = gw.child.try_wait() {
                panic!("binary exited early ({status}): {}", gw.stderr());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("binary did not start listening: {}", gw.stderr());
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Peak resident set size (`VmHWM`), in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        proc_status_kib(self.pid(), "VmHWM:")
    }

    /// Current resident set size (`VmRSS`), in KiB.
    pub fn rss_kib(&self) -> u64 {
        proc_status_kib(self.pid(), "VmRSS:")
    }

    /// What the binary wrote to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default()
    }

    /// Sends SIGTERM and waits (bounded) for the exit status.
    pub async fn terminate(mut self) -> std::process::ExitStatus {
        self.stop().await
    }

    /// Like [`BinaryGateway::terminate`], keeping the captured stderr readable afterwards.
    pub async fn stop(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid().to_string())
            .status();
        for _ in 0..200 {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = self.child.kill();
        panic!("binary did not exit after SIGTERM");
    }
}

impl Drop for BinaryGateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `kB` field of `/proc/PID/status`.
pub fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("field in /proc status")
}

// ---------------------------------------------------------------------------------------------
// Payment-flow helpers (added for the hardening suites: framing, redirects, faults, load)
// ---------------------------------------------------------------------------------------------

/// The session secret of [`shop_config`].
pub const SHOP_SECRET: &str = "hardening-tests-secret-0123456789abcdef";

/// A complete gateway config in front of `origin` with merchant `merchant` (token
/// `secret-token:sandbox`, timeout 1 s), listening on `listen` and reachable at
/// `http://{listen}`. `/articles/` is sold per page (`KUDOS:0.5`), `/premium/` per prefix
/// (`KUDOS:2`); `extra` is appended (more tables, e.g. `[limits]`). The `[session]` table is
/// built from `session_lines` (at least `secret = …`).
pub fn shop_config_with_session(
    listen: SocketAddr,
    origin: &str,
    merchant: &str,
    session_lines: &str,
    extra: &str,
) -> String {
    format!(
        "[server]\nlisten = \"{listen}\"\npublic_url = \"http://{listen}\"\n\n\
         [origin]\nurl = \"{origin}\"\nresponse_timeout = \"2s\"\n\n\
         [merchant]\nurl = \"{merchant}\"\ntoken = \"secret-token:sandbox\"\ntimeout = \"1s\"\n\n\
         [session]\n{session_lines}\n\n\
         [[protect]]\nprefix = \"/articles/\"\nprice = \"KUDOS:0.5\"\nsummary = \"Article\"\nscope = \"page\"\n\n\
         [[protect]]\nprefix = \"/premium/\"\nprice = \"KUDOS:2\"\nsummary = \"Premium\"\nscope = \"prefix\"\n\n\
         {extra}\n"
    )
}

/// [`shop_config_with_session`] with `secret = SHOP_SECRET` and `recheck_interval`.
pub fn shop_config(
    listen: SocketAddr,
    origin: &str,
    merchant: &str,
    recheck: &str,
    extra: &str,
) -> String {
    shop_config_with_session(
        listen,
        origin,
        merchant,
        &format!("secret = \"{SHOP_SECRET}\"\nrecheck_interval = \"{recheck}\""),
        extra,
    )
}

/// Starts an in-process gateway from a complete config text on `listener`.
pub async fn start_gateway_on(text: &str, listener: TcpListener) -> RunningGateway {
    let config = match Config::from_toml_str(text, Path::new("test.toml"), &NoEnv) {
        Ok(c) => c,
        Err(e) => panic!("test config invalid: {e}\n{text}"),
    };
    taler_paywall::gateway::spawn(config, listener)
        .await
        .expect("gateway starts")
}

/// A sandbox merchant on 127.0.0.1 with the default options.
pub async fn start_sandbox() -> taler_paywall::sandbox::Sandbox {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind sandbox");
    taler_paywall::sandbox::Sandbox::start(listener, Default::default())
        .await
        .expect("sandbox starts")
}

/// Pays `order_id` under `session_id` as the sandbox wallet; returns the order that was
/// actually paid (an older one when the wallet replays a purchase).
pub async fn sandbox_pay(base: &url::Url, order_id: &str, session_id: &str) -> String {
    let body = format!(r#"{{"order_id":"{order_id}","session_id":"{session_id}"}}"#);
    let req = Request::post(format!("{base}sandbox/pay"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("request");
    let r = send(&client(), req).await;
    assert_eq!(r.status, StatusCode::OK, "sandbox/pay: {}", r.text());
    let v: serde_json::Value = serde_json::from_slice(&r.body).expect("json");
    v["paid_order_id"]
        .as_str()
        .expect("paid_order_id")
        .to_owned()
}

/// The value of query parameter `name` in `url`.
pub fn query_param(url: &str, name: &str) -> Option<String> {
    url::Url::parse(url)
        .ok()?
        .query_pairs()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// The last path segment of a status URL: the order id.
pub fn order_id_of(status_url: &str) -> String {
    let u = url::Url::parse(status_url).expect("status url");
    u.path_segments()
        .and_then(|mut s| s.next_back().map(str::to_owned))
        .expect("order id")
}

/// A client keeping cookies by name (paths are ignored: every cookie goes everywhere, which
/// the gateway must tolerate), sending `Accept` for HTML or JSON, and optional extra headers.
#[derive(Clone, Default)]
pub struct Jar {
    /// Cookie name → value.
    pub cookies: std::collections::BTreeMap<String, String>,
    /// Ask for HTML (a browser) rather than JSON.
    pub html: bool,
    /// Extra request headers.
    pub extra: Vec<(String, String)>,
}

impl Jar {
    /// A browser-like client.
    pub fn html() -> Self {
        Jar {
            html: true,
            ..Default::default()
        }
    }

    /// A non-browser client.
    pub fn api() -> Self {
        Jar::default()
    }

    /// The `Cookie` header value.
    pub fn cookie_header(&self) -> String {
        self.cookies
            .iter()
            .map(|(n, v)| format!("{n}={v}"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// Keeps the cookies of a response (`Max-Age=0` deletes).
    pub fn store(&mut self, headers: &HeaderMap) {
        for v in headers.get_all("set-cookie") {
            let Ok(s) = v.to_str() else { continue };
            let Ok(c) = cookie::Cookie::parse(s.to_owned()) else {
                continue;
            };
            if c.max_age() == Some(cookie::time::Duration::ZERO) {
                self.cookies.remove(c.name());
            } else {
                self.cookies
                    .insert(c.name().to_owned(), c.value().to_owned());
            }
        }
    }

    /// The request this client would send for `url`.
    pub fn request(&self, url: &str) -> Request<Full<Bytes>> {
        let mut req = Request::get(url).header(
            "accept",
            if self.html {
                "text/html,application/xhtml+xml,*/*;q=0.8"
            } else {
                "application/json"
            },
        );
        if !self.cookies.is_empty() {
            req = req.header("cookie", self.cookie_header());
        }
        for (k, v) in &self.extra {
            req = req.header(k.as_str(), v.as_str());
        }
        req.body(Full::new(Bytes::new())).expect("request")
    }

    /// `GET url` through `client`, keeping the cookies of the answer.
    pub async fn get_with(
        &mut self,
        client: &Client<HttpConnector, Full<Bytes>>,
        url: &str,
    ) -> TestResponse {
        let resp = send(client, self.request(url)).await;
        self.store(&resp.headers);
        resp
    }

    /// `GET url` on a fresh connection.
    pub async fn get(&mut self, url: &str) -> TestResponse {
        self.get_with(&client(), url).await
    }
}

/// Buys `path` at the gateway `gw` (base `http://gw`) with a non-browser client through the
/// sandbox at `sandbox`; returns the paid client and the session id the merchant saw.
pub async fn buy_api(gw: SocketAddr, sandbox: &url::Url, path: &str) -> (Jar, String) {
    let mut c = Jar::api();
    let url = format!("http://{gw}{path}");
    let r = c.get(&url).await;
    assert_eq!(r.status, StatusCode::PAYMENT_REQUIRED, "{}", r.text());
    let body: serde_json::Value = serde_json::from_slice(&r.body).expect("402 json");
    let status_url = body["order_status_url"].as_str().expect("status url");
    let session = query_param(status_url, "session_id").expect("session_id");
    sandbox_pay(sandbox, &order_id_of(status_url), &session).await;
    let r = c.get(&url).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    (c, session)
}

/// What a [`FakeMerchant`] answers: status and JSON body, given the method and the target
/// (path and query) of the request.
pub type MerchantAnswer = Arc<dyn Fn(&Method, &str) -> (u16, String) + Send + Sync>;

/// A scripted merchant backend: answers every request with a closure and records each
/// request's target, so tests can play a misbehaving or malicious backend.
pub struct FakeMerchant {
    /// Where it listens.
    pub addr: SocketAddr,
    targets: Arc<Mutex<Vec<String>>>,
    answer: Arc<Mutex<MerchantAnswer>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeMerchant {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeMerchant {
    /// Starts a fake merchant answering with `answer`.
    pub async fn start(answer: MerchantAnswer) -> FakeMerchant {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let targets = Arc::new(Mutex::new(Vec::new()));
        let answer = Arc::new(Mutex::new(answer));
        let (t, a) = (targets.clone(), answer.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (t, a) = (t.clone(), a.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let target = req
                            .uri()
                            .path_and_query()
                            .map(|p| p.as_str().to_owned())
                            .unwrap_or_default();
                        t.lock().expect("targets").push(target.clone());
                        let f = a.lock().expect("answer").clone();
                        let (status, body) = f(req.method(), &target);
                        let mut resp = Response::new(Full::new(Bytes::from(body)));
                        *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
                        resp.headers_mut().insert(
                            http::header::CONTENT_TYPE,
                            HeaderValue::from_static("application/json"),
                        );
                        async move { Ok::<_, Infallible>(resp) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        FakeMerchant {
            addr,
            targets,
            answer,
            task,
        }
    }

    /// The base URL, `http://127.0.0.1:PORT/`.
    pub fn url(&self) -> String {
        format!("http://{}/", self.addr)
    }

    /// Replaces the answer.
    pub fn set_answer(&self, answer: MerchantAnswer) {
        *self.answer.lock().expect("answer") = answer;
    }

    /// Every request target received so far.
    pub fn targets(&self) -> Vec<String> {
        self.targets.lock().expect("targets").clone()
    }

    /// Every `session_id` query value received so far.
    pub fn session_ids(&self) -> Vec<String> {
        self.targets()
            .iter()
            .filter_map(|t| query_param(&format!("http://x{t}"), "session_id"))
            .collect()
    }
}

/// A raw TCP origin: reads one request head per connection and answers with the bytes
/// `answer` returns for its target (`None`: never answer, keep the connection open), then
/// closes the connection. For origins that break HTTP in ways hyper would refuse to.
pub struct RawOrigin {
    /// Where it listens.
    pub addr: SocketAddr,
    targets: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for RawOrigin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl RawOrigin {
    /// Starts the origin.
    pub async fn start(answer: fn(&str) -> Option<Vec<u8>>) -> RawOrigin {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let targets = Arc::new(Mutex::new(Vec::new()));
        let t = targets.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    continue;
                };
                let t = t.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let text = String::from_utf8_lossy(&head).into_owned();
                    let target = text.split(' ').nth(1).unwrap_or("").to_owned();
                    t.lock().expect("targets").push(target.clone());
                    match answer(&target) {
                        Some(bytes) => {
                            let _ = stream.write_all(&bytes).await;
                            let _ = stream.flush().await;
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        None => std::future::pending::<()>().await,
                    }
                });
            }
        });
        RawOrigin {
            addr,
            targets,
            task,
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request target received so far.
    pub fn targets(&self) -> Vec<String> {
        self.targets.lock().expect("targets").clone()
    }
}

/// Splits a raw HTTP/1.1 byte stream of several responses into their status codes.
pub fn raw_statuses(response: &str) -> Vec<u16> {
    response
        .match_indices("HTTP/1.")
        .filter_map(|(i, _)| {
            let rest = response.get(i + 8..)?;
            let code = rest.strip_prefix(' ')?.get(..3)?;
            let after = rest.get(4..5)?;
            (after == " " || after == "\r").then(|| code.parse().ok())?
        })
        .collect()
}

/// A shop for the hardening suites: a recording echo origin, the sandbox merchant and an
/// in-process gateway with [`shop_config`].
pub struct SandboxShop {
    /// The origin.
    pub origin: TestOrigin,
    /// The merchant backend.
    pub sandbox: taler_paywall::sandbox::Sandbox,
    /// The gateway (taken by [`SandboxShop::shutdown`]).
    pub gateway: Option<RunningGateway>,
    /// Where the gateway listens.
    pub addr: SocketAddr,
}

impl SandboxShop {
    /// Starts a shop with `recheck_interval = recheck` and `extra` tables (every client is
    /// 127.0.0.1: pass `[limits] orders_per_minute = 0` unless the limit is under test).
    pub async fn start(recheck: &str, extra: &str) -> SandboxShop {
        let origin = TestOrigin::echo().await;
        let sandbox = start_sandbox().await;
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let text = shop_config(
            addr,
            &origin.url(),
            sandbox.base_url().as_str(),
            recheck,
            extra,
        );
        let gateway = start_gateway_on(&text, listener).await;
        SandboxShop {
            origin,
            sandbox,
            gateway: Some(gateway),
            addr,
        }
    }

    /// `http://ADDR{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Targets of origin requests under a protected prefix (any case).
    pub fn protected_hits(&self) -> Vec<String> {
        self.origin
            .requests()
            .into_iter()
            .map(|r| r.target)
            .filter(|t| {
                let t = t.to_ascii_lowercase();
                t.starts_with("/articles") || t.starts_with("/premium")
            })
            .collect()
    }

    /// Stops the gateway (checking it ended cleanly) and the sandbox.
    pub async fn shutdown(mut self) {
        if let Some(g) = self.gateway.take() {
            g.shutdown().await.expect("gateway ends cleanly");
        }
        self.sandbox.shutdown().await;
    }
}
