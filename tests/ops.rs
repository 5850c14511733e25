//! Running the gateway the way operators do: the real binary with an `[admin]` listener,
//! against the in-process sandbox merchant and a recording origin. Covers `/healthz`,
//! `/readyz`, `/metrics`, the admin paths' absence from the public listener, SIGHUP reload
//! (config and TLS certificate), observe mode, JSON logs and `taler-paywall healthcheck`.

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use http_body_util::Full;
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};

use support::{bounded, client, get, send, TestOrigin, TestResponse};
use taler_paywall::sandbox::{Fault, Sandbox, SandboxOptions};

const SECRET: &str = "ops-tests-session-secret-0123456789abcdef";

/// A free port on 127.0.0.1 (bound, then released).
fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

/// `template` with `{{listen}}` and `{{admin}}` filled in.
fn fill(template: &str, addr: SocketAddr, admin: SocketAddr) -> String {
    template
        .replace("{{listen}}", &addr.to_string())
        .replace("{{admin}}", &admin.to_string())
}

/// `taler-paywall serve` as a child process with a public and an admin listener.
struct Bin {
    addr: SocketAddr,
    admin: SocketAddr,
    child: Child,
    dir: tempfile::TempDir,
}

impl Bin {
    /// Writes `template` (with `{{listen}}` and `{{admin}}` filled in), starts the binary with
    /// `args` after `serve --config FILE`, and waits until both listeners accept.
    async fn start(template: &str, args: &[&str]) -> Bin {
        let dir = tempfile::tempdir().expect("tempdir");
        let (addr, admin) = (free_addr(), free_addr());
        let config = dir.path().join("gateway.toml");
        std::fs::write(&config, fill(template, addr, admin)).expect("write config");
        let stderr = std::fs::File::create(dir.path().join("stderr.log")).expect("stderr");
        let child = Command::new(env!("CARGO_BIN_EXE_taler-paywall"))
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .args(args)
            .env_remove("RUST_LOG")
            .env_remove("TALER_PAYWALL_MERCHANT_TOKEN")
            .env_remove("TALER_PAYWALL_SESSION_SECRET")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn binary");
        let mut bin = Bin {
            addr,
            admin,
            child,
            dir,
        };
        for _ in 0..200 {
            if TcpStream::connect(bin.addr).await.is_ok()
                && TcpStream::connect(bin.admin).await.is_ok()
            {
                return bin;
            }
            if let Ok(Some(status)) = bin.child.try_wait() {
                panic!("binary exited early ({status}): {}", bin.stderr());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("binary did not start listening: {}", bin.stderr());
    }

    fn config_path(&self) -> PathBuf {
        self.dir.path().join("gateway.toml")
    }

    fn write_config(&self, template: &str) {
        std::fs::write(self.config_path(), fill(template, self.addr, self.admin))
            .expect("write config");
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default()
    }

    fn hup(&self) {
        let ok = Command::new("kill")
            .arg("-HUP")
            .arg(self.child.id().to_string())
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill -HUP failed");
    }

    /// Waits until the log holds `needle` at least `times` times.
    async fn wait_for_log(&self, needle: &str, times: usize) {
        for _ in 0..400 {
            if self.stderr().matches(needle).count() >= times {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "log never said {needle:?} {times} times:\n{}",
            self.stderr()
        );
    }

    /// Polls `GET /readyz` until it answers `want` after a first check.
    async fn wait_readyz(&self, want: u16) -> TestResponse {
        let mut last = None;
        for _ in 0..150 {
            let r = get(self.admin, "/readyz").await;
            if r.status.as_u16() == want && !r.text().contains("not checked yet") {
                return r;
            }
            last = Some(r);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!(
            "/readyz never answered {want}: last {last:?}\n{}",
            self.stderr()
        );
    }

    async fn metrics(&self) -> String {
        let r = get(self.admin, "/metrics").await;
        assert_eq!(r.status, StatusCode::OK);
        r.text()
    }
}

impl Drop for Bin {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The value of the sample `series` (name plus labels, exactly as exposed).
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|l| {
        l.strip_prefix(series)
            .and_then(|rest| rest.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    })
}

async fn sandbox() -> Sandbox {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind sandbox");
    Sandbox::start(listener, SandboxOptions::default())
        .await
        .expect("sandbox starts")
}

/// A config for the binary: `/premium/` protected, the admin listener on `{{admin}}`.
fn template(origin: &str, merchant: &str, server_extra: &str, tail: &str) -> String {
    format!(
        r#"[server]
listen = "{{{{listen}}}}"
public_url = "http://{{{{listen}}}}"
{server_extra}

[origin]
url = "{origin}"
connect_timeout = "1s"

[merchant]
url = "{merchant}"
token = "secret-token:sandbox"
timeout = "2s"

[session]
secret = "{SECRET}"

[[protect]]
prefix = "/premium/"
price = "KUDOS:1"
summary = "Premium"

[admin]
listen = "{{{{admin}}}}"

[limits]
orders_per_minute = 0
{tail}
"#
    )
}

/// A non-browser client that keeps the gateway's cookies by name.
#[derive(Default)]
struct Jar(BTreeMap<String, String>);

impl Jar {
    async fn get(&mut self, addr: SocketAddr, target: &str) -> TestResponse {
        let mut req = support::request("GET", addr, target).header("accept", "application/json");
        if !self.0.is_empty() {
            let cookies: Vec<String> = self.0.iter().map(|(k, v)| format!("{k}={v}")).collect();
            req = req.header("cookie", cookies.join("; "));
        }
        let r = send(&client(), req.body(Full::new(Bytes::new())).unwrap()).await;
        for v in r.headers.get_all("set-cookie") {
            let c = cookie::Cookie::parse(v.to_str().unwrap().to_owned()).unwrap();
            self.0.insert(c.name().to_owned(), c.value().to_owned());
        }
        r
    }
}

async fn pay(sandbox: &Sandbox, status_url: &str) {
    let u = url::Url::parse(status_url).unwrap();
    let order_id = u.path_segments().unwrap().next_back().unwrap().to_owned();
    let session_id = u
        .query_pairs()
        .find(|(k, _)| k == "session_id")
        .map(|(_, v)| v.into_owned())
        .expect("session_id in the status URL");
    let req = http::Request::post(format!("{}sandbox/pay", sandbox.base_url()))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(
            json!({"order_id": order_id, "session_id": session_id}).to_string(),
        )))
        .unwrap();
    let r = send(&client(), req).await;
    assert_eq!(r.status, StatusCode::OK, "sandbox/pay: {}", r.text());
}

/// The operator endpoints answer on the admin listener only; on the public listener the same
/// paths are ordinary paths that go to the origin. `healthcheck` follows `/healthz`.
#[tokio::test]
async fn admin_endpoints_live_on_the_admin_listener_only() {
    bounded(async {
        let origin = TestOrigin::echo().await;
        let sandbox = sandbox().await;
        let bin = Bin::start(
            &template(&origin.url(), sandbox.base_url().as_str(), "", ""),
            &[],
        )
        .await;

        let h = get(bin.admin, "/healthz").await;
        assert_eq!(h.status, StatusCode::OK);
        assert_eq!(get(bin.admin, "/nope").await.status, StatusCode::NOT_FOUND);
        assert_eq!(
            get(bin.admin, "/premium/a").await.status,
            StatusCode::NOT_FOUND
        );
        bin.wait_readyz(200).await;
        assert_eq!(origin.count(), 0, "the admin listener never proxies");

        for path in ["/healthz", "/readyz", "/metrics"] {
            let r = get(bin.addr, path).await;
            assert_eq!(r.status, StatusCode::OK, "{path}");
            assert_eq!(
                r.header("x-echo-target"),
                Some(path),
                "{path} went to the origin"
            );
            assert!(!r.text().contains("taler_paywall_"), "{path}");
        }
        assert_eq!(origin.count(), 3);

        let check = |url: String| {
            Command::new(env!("CARGO_BIN_EXE_taler-paywall"))
                .args(["healthcheck", "--url", &url, "--timeout", "2s"])
                .stderr(Stdio::null())
                .status()
                .expect("run healthcheck")
                .code()
        };
        assert_eq!(check(format!("http://{}/healthz", bin.admin)), Some(0));
        assert_eq!(check(format!("http://{}/missing", bin.admin)), Some(1));
        let closed = support::closed_port().await;
        assert_eq!(check(format!("http://{closed}/healthz")), Some(1));
        sandbox.shutdown().await;
    })
    .await;
}

/// `/readyz` is 503 with a reason while the merchant backend fails or the origin is down,
/// and turns 200 once both answer.
#[tokio::test]
async fn readiness_follows_the_merchant_backend_and_the_origin() {
    bounded(async {
        let origin = TestOrigin::echo().await;
        let sandbox = sandbox().await;
        sandbox.set_fault(Some(Fault::ServerError(500)));
        let bin = Bin::start(
            &template(&origin.url(), sandbox.base_url().as_str(), "", ""),
            &[],
        )
        .await;
        let r = bin.wait_readyz(503).await;
        let reason = r.text();
        assert!(reason.starts_with("not ready: merchant backend"), "{reason}");
        assert_eq!(reason.trim_end().lines().count(), 1, "one line: {reason}");
        assert!(!reason.contains("secret-token"), "{reason}");
        assert!(bin.metrics().await.contains("taler_paywall_ready 0"));

        sandbox.set_fault(None);
        let r = bin.wait_readyz(200).await;
        assert_eq!(r.text(), "ready\n");
        let m = bin.metrics().await;
        assert!(m.contains("taler_paywall_ready 1"), "{m}");
        assert!(
            sample(
                &m,
                "taler_paywall_merchant_requests_total{endpoint=\"config\",result=\"error_server_error\"}"
            )
            .unwrap_or(0.0)
                >= 1.0,
            "{m}"
        );

        // A second gateway whose origin is down.
        let down = support::closed_port().await;
        let bin2 = Bin::start(
            &template(&format!("http://{down}"), sandbox.base_url().as_str(), "", ""),
            &[],
        )
        .await;
        let r = bin2.wait_readyz(503).await;
        assert!(r.text().starts_with("not ready: origin http://"), "{}", r.text());
        sandbox.shutdown().await;
    })
    .await;
}

/// Counters move for proxied, payment-required and paid requests; merchant calls are
/// counted with latency histograms; a grant served from the cookie is counted; the
/// open-connections gauge follows a client connection.
#[tokio::test]
async fn metrics_count_outcomes_merchant_calls_and_connections() {
    bounded(async {
        let origin = TestOrigin::echo().await;
        let sandbox = sandbox().await;
        let bin = Bin::start(
            &template(&origin.url(), sandbox.base_url().as_str(), "", ""),
            &[],
        )
        .await;

        assert_eq!(get(bin.addr, "/free").await.status, StatusCode::OK);
        let mut jar = Jar::default();
        let r = jar.get(bin.addr, "/premium/a").await;
        assert_eq!(r.status, StatusCode::PAYMENT_REQUIRED);
        let body: Value = serde_json::from_slice(&r.body).unwrap();
        pay(&sandbox, body["order_status_url"].as_str().unwrap()).await;
        let r = jar.get(bin.addr, "/premium/a").await;
        assert_eq!(r.status, StatusCode::OK, "paid: {}", r.text());
        let r = jar.get(bin.addr, "/premium/a").await;
        assert_eq!(r.status, StatusCode::OK, "grant: {}", r.text());

        let m = bin.metrics().await;
        let v = |s: &str| sample(&m, s).unwrap_or_else(|| panic!("no {s} in\n{m}"));
        assert_eq!(v("taler_paywall_requests_total{outcome=\"proxied\"}"), 1.0);
        assert_eq!(v("taler_paywall_requests_total{outcome=\"payment_required\"}"), 1.0);
        assert_eq!(v("taler_paywall_requests_total{outcome=\"paid\"}"), 2.0);
        assert_eq!(v("taler_paywall_requests_total{outcome=\"failed_closed\"}"), 0.0);
        assert_eq!(v("taler_paywall_orders_created_total"), 1.0);
        assert_eq!(
            v("taler_paywall_merchant_requests_total{endpoint=\"create_order\",result=\"ok\"}"),
            1.0
        );
        assert_eq!(
            v("taler_paywall_merchant_request_duration_seconds_count{endpoint=\"order_status\",result=\"ok\"}"),
            2.0,
            "the 402 and the first paid request asked for the status"
        );
        assert!(m.contains(
            "taler_paywall_merchant_request_duration_seconds_bucket{le=\"0.005\",endpoint=\"create_order\",result=\"ok\"}"
        ));
        assert_eq!(v("taler_paywall_grant_hits_total{source=\"cookie\"}"), 1.0);
        assert!(m.contains("# TYPE taler_paywall_open_connections gauge"));

        // A client connection held open shows up in the gauge, and leaves it when closed.
        let held = TcpStream::connect(bin.addr).await.unwrap();
        let gauge = || async {
            sample(&bin.metrics().await, "taler_paywall_open_connections").unwrap()
        };
        let mut seen = 0.0;
        for _ in 0..100 {
            seen = gauge().await;
            if seen >= 1.0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(seen >= 1.0, "open connection not counted");
        drop(held);
        for _ in 0..100 {
            seen = gauge().await;
            if seen == 0.0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(seen, 0.0, "closed connection still counted");
        sandbox.shutdown().await;
    })
    .await;
}

/// SIGHUP applies a good file to the running process (a new protected prefix), keeps the
/// running config on a bad file (saying why, without secrets), and says which settings need
/// a restart.
#[tokio::test]
async fn sighup_reloads_a_good_file_and_keeps_the_running_config_on_a_bad_one() {
    bounded(async {
        let origin = TestOrigin::echo().await;
        let sandbox = sandbox().await;
        let merchant = sandbox.base_url().to_string();
        let news = "[[protect]]\nprefix = \"/news/\"\nprice = \"KUDOS:1\"\nsummary = \"News\"\n";
        let bin = Bin::start(&template(&origin.url(), &merchant, "", ""), &[]).await;

        let api = |path: &'static str| {
            let addr = bin.addr;
            async move {
                let req = support::request("GET", addr, path)
                    .header("accept", "application/json")
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                send(&client(), req).await
            }
        };
        assert_eq!(api("/news/today").await.status, StatusCode::OK);

        // A good file with a new protected prefix (and a changed admin address, which
        // cannot change without a restart).
        let good = template(&origin.url(), &merchant, "", news);
        let moved = free_addr().to_string();
        bin.write_config(&good);
        let text = std::fs::read_to_string(bin.config_path()).unwrap();
        std::fs::write(
            bin.config_path(),
            text.replace(&bin.admin.to_string(), &moved),
        )
        .unwrap();
        bin.hup();
        bin.wait_for_log("configuration reloaded", 1).await;
        let r = api("/news/today").await;
        assert_eq!(r.status, StatusCode::PAYMENT_REQUIRED, "{}", r.text());
        assert_eq!(
            origin.count(),
            1,
            "the protected request did not reach the origin"
        );
        assert!(bin.stderr().contains("admin.listen"), "{}", bin.stderr());
        assert_eq!(get(bin.admin, "/healthz").await.status, StatusCode::OK);

        // A bad file: the running config stays, the log names the problem.
        let bad = good.replace(
            "price = \"KUDOS:1\"\nsummary = \"News\"",
            "price = \"KUDOS:x\"\nsummary = \"News\"",
        );
        assert_ne!(bad, good);
        bin.write_config(&bad);
        bin.hup();
        bin.wait_for_log("reload failed", 1).await;
        assert_eq!(
            api("/news/today").await.status,
            StatusCode::PAYMENT_REQUIRED
        );
        assert_eq!(api("/free").await.status, StatusCode::OK);
        let log = bin.stderr();
        assert!(log.contains("protect"), "the problem is named: {log}");
        assert!(!log.contains(SECRET), "session secret in the log");
        assert!(
            !log.contains("secret-token:sandbox"),
            "merchant token in the log"
        );
        assert!(!log.contains('\u{1b}'), "ANSI escapes in a log file");

        // A secret that is itself invalid (too short) is named, not quoted.
        bin.write_config(&good.replace(SECRET, "short-ops-shh"));
        bin.hup();
        bin.wait_for_log("reload failed", 2).await;
        let log = bin.stderr();
        assert!(log.contains("session.secret"), "{log}");
        assert!(
            !log.contains("short-ops-shh"),
            "the invalid secret was logged: {log}"
        );
        assert_eq!(
            api("/news/today").await.status,
            StatusCode::PAYMENT_REQUIRED
        );

        let m = bin.metrics().await;
        assert_eq!(
            sample(&m, "taler_paywall_config_reloads_total{result=\"ok\"}"),
            Some(1.0)
        );
        assert_eq!(
            sample(&m, "taler_paywall_config_reloads_total{result=\"failed\"}"),
            Some(2.0)
        );
        sandbox.shutdown().await;
    })
    .await;
}

/// A reload that leaves `[limits]` alone does not refill the order allowance of a client
/// that used it up; a reload that changes the limits starts them afresh.
#[tokio::test]
async fn a_reload_keeps_used_up_order_limits() {
    bounded(async {
        let origin = TestOrigin::echo().await;
        let sandbox = sandbox().await;
        let merchant = sandbox.base_url().to_string();
        let limited = |burst: u32| {
            template(&origin.url(), &merchant, "", "").replace(
                "orders_per_minute = 0",
                &format!("orders_per_minute = 1\norders_burst = {burst}"),
            )
        };
        let bin = Bin::start(&limited(2), &[]).await;
        // A client without cookies: every request needs a new order.
        let cookieless = || {
            let addr = bin.addr;
            async move {
                let req = support::request("GET", addr, "/premium/a")
                    .header("accept", "application/json")
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                send(&client(), req).await.status
            }
        };
        assert_eq!(cookieless().await, StatusCode::PAYMENT_REQUIRED);
        assert_eq!(cookieless().await, StatusCode::PAYMENT_REQUIRED);
        assert_eq!(cookieless().await, StatusCode::TOO_MANY_REQUESTS);

        // Another price, the same limits: still used up.
        bin.write_config(&limited(2).replace("KUDOS:1", "KUDOS:2"));
        bin.hup();
        bin.wait_for_log("configuration reloaded", 1).await;
        assert_eq!(cookieless().await, StatusCode::TOO_MANY_REQUESTS);

        // Other limits: a fresh allowance under them.
        bin.write_config(&limited(3));
        bin.hup();
        bin.wait_for_log("configuration reloaded", 2).await;
        assert_eq!(cookieless().await, StatusCode::PAYMENT_REQUIRED);
        sandbox.shutdown().await;
    })
    .await;
}

fn write_cert(dir: &std::path::Path) -> Vec<u8> {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    std::fs::write(dir.join("cert.pem"), ck.cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), ck.signing_key.serialize_pem()).unwrap();
    ck.cert.der().to_vec()
}

/// The certificate the server presents on a new TLS connection, trusting `trusted`.
async fn presented_cert(addr: SocketAddr, trusted: &[&[u8]]) -> Vec<u8> {
    let mut roots = rustls::RootCertStore::empty();
    for der in trusted {
        roots
            .add(rustls::pki_types::CertificateDer::from(der.to_vec()))
            .unwrap();
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
        .expect("TLS handshake");
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

/// After the certificate files are replaced and SIGHUP sent, new connections get the new
/// certificate; a broken key file is refused and the old certificate stays.
#[tokio::test]
async fn sighup_reloads_the_tls_certificate() {
    bounded(async {
        let origin = TestOrigin::echo().await;
        let sandbox = sandbox().await;
        let certs = tempfile::tempdir().unwrap();
        let first = write_cert(certs.path());
        let tls = format!(
            "[server.tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
            certs.path().join("cert.pem").display(),
            certs.path().join("key.pem").display()
        );
        let config = template(&origin.url(), sandbox.base_url().as_str(), "", &tls);
        let bin = Bin::start(&config, &[]).await;
        assert_eq!(presented_cert(bin.addr, &[&first]).await, first);

        let second = write_cert(certs.path());
        assert_ne!(first, second);
        bin.hup();
        bin.wait_for_log("configuration reloaded", 1).await;
        assert_eq!(presented_cert(bin.addr, &[&first, &second]).await, second);

        std::fs::write(certs.path().join("key.pem"), "not a key\n").unwrap();
        bin.hup();
        bin.wait_for_log("reload failed", 1).await;
        assert_eq!(presented_cert(bin.addr, &[&first, &second]).await, second);
        sandbox.shutdown().await;
    })
    .await;
}

/// Observe mode: the unpaid request reaches the origin, the decision is logged and counted,
/// no payment cookie is set, and startup warns that payments are not enforced.
#[tokio::test]
async fn observe_mode_lets_unpaid_requests_through_and_logs_the_decision() {
    bounded(async {
        let origin = TestOrigin::echo().await;
        let sandbox = sandbox().await;
        let bin = Bin::start(
            &template(
                &origin.url(),
                sandbox.base_url().as_str(),
                "mode = \"observe\"",
                "",
            ),
            &[],
        )
        .await;
        bin.wait_for_log("NOT enforcing payments", 1).await;

        let mut jar = Jar::default();
        let r = jar.get(bin.addr, "/premium/a").await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.header("x-echo-target"), Some("/premium/a"));
        assert!(r.headers.get("set-cookie").is_none(), "no payment cookies");
        assert!(r.header("cache-control").unwrap_or("").contains("private"));
        bin.wait_for_log("observe mode: would have answered 402", 1)
            .await;

        let m = bin.metrics().await;
        assert_eq!(
            sample(
                &m,
                "taler_paywall_requests_total{outcome=\"payment_required\"}"
            ),
            Some(1.0)
        );
        assert_eq!(
            sample(&m, "taler_paywall_requests_total{outcome=\"paid\"}"),
            Some(0.0)
        );
        assert_eq!(
            sample(&m, "taler_paywall_observe_forwarded_total"),
            Some(1.0)
        );
        sandbox.shutdown().await;
    })
    .await;
}

/// `--log-format json`: every line is a JSON object; the request line carries the request
/// id; no cookie, authorization header, token or session secret appears.
#[tokio::test]
async fn json_logs_carry_the_request_id_and_no_secrets() {
    bounded(async {
        let origin = TestOrigin::echo().await;
        let sandbox = sandbox().await;
        // A failing merchant, so that the merchant error lines are in the log too.
        sandbox.set_fault(Some(Fault::Unauthorized));
        let bin = Bin::start(
            &template(&origin.url(), sandbox.base_url().as_str(), "", ""),
            &["--log-format", "json", "--log-level", "info"],
        )
        .await;
        let req = support::request("GET", bin.addr, "/premium/a?token=QUERYSECRET")
            .header("accept", "application/json")
            .header("cookie", "taler_paywall_s=COOKIESECRET; site=SITECOOKIE")
            .header("authorization", "Bearer AUTHSECRET")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let r = send(&client(), req).await;
        assert_eq!(
            r.status,
            StatusCode::BAD_GATEWAY,
            "fails closed: {}",
            r.text()
        );
        bin.wait_for_log("\"message\":\"request\"", 1).await;
        bin.wait_for_log("not ready", 1).await;

        let log = bin.stderr();
        let lines: Vec<Value> = log
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect();
        let request = lines
            .iter()
            .find(|v| v["fields"]["message"] == "request")
            .expect("a request line");
        let id = request["fields"]["id"].as_str().expect("request id");
        assert_eq!(id.len(), 32, "{request}");
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit()), "{request}");
        assert_eq!(request["fields"]["path"], "/premium/a");
        let merchant_line = lines
            .iter()
            .find(|v| {
                v["fields"]["message"]
                    .as_str()
                    .unwrap_or("")
                    .starts_with("merchant:")
            })
            .expect("a merchant error line");
        assert_eq!(merchant_line["span"]["id"], id, "in the request's span");
        for secret in [
            "COOKIESECRET",
            "SITECOOKIE",
            "AUTHSECRET",
            "QUERYSECRET",
            "secret-token:sandbox",
            SECRET,
        ] {
            assert!(!log.contains(secret), "{secret} in the log:\n{log}");
        }
        assert!(!log.contains('\u{1b}'), "ANSI escapes in a log file");
        sandbox.shutdown().await;
    })
    .await;
}
