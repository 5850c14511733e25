//! A real nginx in front of a test origin, asking the gateway (forward-auth mode, sandbox
//! merchant) through `auth_request`, configured with `deploy/nginx/taler-paywall-forward-auth.conf`
//! exactly as `docs/forward-auth.md` shows it.
//!
//! nginx runs unprivileged-style from a temporary prefix (`-p`, `-c`, `-e`, `pid` and temp
//! paths inside it) on an ephemeral 127.0.0.1 port, and is killed when each test ends. Without
//! an nginx binary the tests skip loudly, unless `CI_REQUIRE_EXTERNAL=1`, where they fail.

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use http_body_util::Full;
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};

use support::{bounded, client, raw_get, raw_status, send, TestOrigin, TestResponse};
use taler_paywall::config::{Config, NoEnv};
use taler_paywall::gateway::RunningGateway;
use taler_paywall::sandbox::{Sandbox, SandboxOptions};

const SITE_CONF: &str = "deploy/nginx/taler-paywall-forward-auth.conf";
const HTML: &str = "text/html,application/xhtml+xml,*/*;q=0.8";

fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// The nginx binary, or `None` after saying loudly why the test is skipped. Panics when
/// `CI_REQUIRE_EXTERNAL=1` (how `.ci/run` runs) and nginx is missing.
fn nginx_binary() -> Option<PathBuf> {
    let found = ["/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/bin/nginx"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file());
    if found.is_none() {
        let msg = "nginx is not installed (apt-get install nginx): the nginx forward-auth test \
                   did NOT run";
        if std::env::var("CI_REQUIRE_EXTERNAL").as_deref() == Ok("1") {
            panic!("{msg}, and CI_REQUIRE_EXTERNAL=1 requires it");
        }
        eprintln!("\n!!!!!!!! SKIPPED: {msg} !!!!!!!!\n");
    }
    found
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// nginx running from a temporary prefix; killed on drop.
struct Nginx {
    child: Child,
    dir: tempfile::TempDir,
    addr: SocketAddr,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM: the master stops its workers and exits once they are gone. (SIGKILL alone
        // would orphan the workers, which keep the port open.) SIGKILL only as a fallback.
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        for _ in 0..100 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Nginx {
    async fn start(bin: &Path, site_conf: &str) -> Nginx {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path().display().to_string();
        let port = free_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let site = site_conf.replace("@NGINX_LISTEN@", &addr.to_string());
        std::fs::write(dir.path().join("site.conf"), site).unwrap();
        // Running as root, nginx would switch its workers to `nobody`, who cannot use the
        // temporary directory: keep them as the current user.
        let is_root = Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
        let user = if is_root { "user root;\n" } else { "" };
        let main = format!(
            "{user}worker_processes 1;\n\
             error_log {d}/error.log info;\n\
             events {{ worker_connections 64; }}\n\
             http {{\n\
               access_log {d}/access.log;\n\
               client_body_temp_path {d}/client_body;\n\
               proxy_temp_path {d}/proxy;\n\
               fastcgi_temp_path {d}/fastcgi;\n\
               uwsgi_temp_path {d}/uwsgi;\n\
               scgi_temp_path {d}/scgi;\n\
               default_type text/plain;\n\
               include {d}/site.conf;\n\
             }}\n"
        );
        std::fs::write(dir.path().join("nginx.conf"), main).unwrap();
        let child = Command::new(bin)
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(dir.path().join("nginx.conf"))
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .arg("-g")
            .arg(format!("daemon off; pid {d}/nginx.pid;"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn nginx");
        let mut nginx = Nginx { child, dir, addr };
        for _ in 0..200 {
            if TcpStream::connect(addr).await.is_ok() {
                return nginx;
            }
            if let Ok(Some(status)) = nginx.child.try_wait() {
                let mut err = String::new();
                if let Some(mut e) = nginx.child.stderr.take() {
                    use std::io::Read as _;
                    let _ = e.read_to_string(&mut err);
                }
                panic!("nginx exited ({status}): {err}\n{}", nginx.error_log());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("nginx did not start listening: {}", nginx.error_log());
    }

    fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }

    fn url(&self, target: &str) -> String {
        format!("http://{}{target}", self.addr)
    }
}

/// Origin, sandbox merchant, gateway in forward-auth mode, nginx in front.
struct Stack {
    nginx: Nginx,
    origin: TestOrigin,
    sandbox: Sandbox,
    gateway: Option<RunningGateway>,
}

impl Stack {
    async fn start(bin: &Path) -> Stack {
        let origin = TestOrigin::echo().await;
        let sandbox = Sandbox::start(
            TcpListener::bind("127.0.0.1:0").await.unwrap(),
            SandboxOptions::default(),
        )
        .await
        .expect("sandbox starts");
        // nginx's port is chosen inside Nginx::start; the gateway needs it as public_url, so
        // the site file is filled in two steps.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let gateway_addr = listener.local_addr().unwrap();
        let conf = std::fs::read_to_string(repo_file(SITE_CONF)).unwrap();
        let conf = conf
            .replace("@SERVER_NAME@", "localhost")
            .replace("@GATEWAY@", &gateway_addr.to_string())
            .replace("@ORIGIN@", &origin.addr.to_string());
        let nginx = Nginx::start(bin, &conf).await;
        let text = format!(
            r#"[server]
listen = "{gateway_addr}"
public_url = "http://{public}"
trusted_proxies = ["127.0.0.1"]

[origin]
url = "{origin}"

[merchant]
url = "{merchant}"
token = "secret-token:sandbox"
timeout = "2s"

[session]
secret = "nginx-forward-auth-tests-secret-0123456789"

[[protect]]
prefix = "/premium/"
price = "KUDOS:1"
summary = "Premium"

[limits]
orders_per_minute = 0

[forward_auth]
"#,
            public = nginx.addr,
            origin = origin.url(),
            merchant = sandbox.base_url(),
        );
        let config = Config::from_toml_str(&text, Path::new("nginx.toml"), &NoEnv)
            .unwrap_or_else(|e| panic!("config: {e}"));
        let gateway = taler_paywall::gateway::spawn(config, listener)
            .await
            .expect("gateway starts");
        Stack {
            nginx,
            origin,
            sandbox,
            gateway: Some(gateway),
        }
    }

    /// Origin requests outside `/free`: there must be none unless paid.
    fn protected_origin_hits(&self) -> Vec<String> {
        self.origin
            .requests()
            .into_iter()
            .map(|r| r.target)
            .filter(|t| !t.starts_with("/free"))
            .collect()
    }

    async fn shutdown(mut self) {
        if let Some(g) = self.gateway.take() {
            g.shutdown().await.unwrap();
        }
        self.sandbox.shutdown().await;
    }
}

/// A cookie jar keyed by name (the tests stay on one path per resource).
#[derive(Default)]
struct Jar(BTreeMap<String, String>);

impl Jar {
    fn store(&mut self, r: &TestResponse) -> Vec<String> {
        let mut names = Vec::new();
        for v in r.headers.get_all("set-cookie") {
            let c = cookie::Cookie::parse(v.to_str().unwrap().to_owned()).unwrap();
            names.push(c.name().to_owned());
            if c.max_age() == Some(cookie::time::Duration::ZERO) {
                self.0.remove(c.name());
            } else {
                self.0.insert(c.name().to_owned(), c.value().to_owned());
            }
        }
        names
    }

    fn header(&self) -> String {
        self.0
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("; ")
    }
}

async fn browse(url: &str, jar: &mut Jar, accept: &str, extra_cookie: &str) -> TestResponse {
    let mut req = http::Request::get(url).header("accept", accept);
    let mut c = jar.header();
    if !extra_cookie.is_empty() {
        if !c.is_empty() {
            c.push_str("; ");
        }
        c.push_str(extra_cookie);
    }
    if !c.is_empty() {
        req = req.header("cookie", c);
    }
    let r = send(&client(), req.body(Full::new(Bytes::new())).unwrap()).await;
    jar.store(&r);
    r
}

fn query_param(url: &str, name: &str) -> String {
    url::Url::parse(url)
        .unwrap()
        .query_pairs()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
        .unwrap_or_else(|| panic!("{name} missing in {url}"))
}

/// The documentation shows the tested file, byte for byte.
#[test]
fn the_documented_nginx_config_is_the_tested_one() {
    let doc = std::fs::read_to_string(repo_file("docs/forward-auth.md")).unwrap();
    let conf = std::fs::read_to_string(repo_file(SITE_CONF)).unwrap();
    assert!(
        doc.contains(&format!("```nginx\n{conf}```\n")),
        "docs/forward-auth.md must include {SITE_CONF} verbatim in an ```nginx block"
    );
}

/// Unpaid: 302 to the sandbox's status page with the gateway's cookies; paid: the origin's
/// content, with the refreshed grant cookie and without the gateway's cookies at the origin.
#[tokio::test]
async fn nginx_sends_to_pay_then_serves_the_paid_page() {
    let Some(bin) = nginx_binary() else { return };
    bounded(async {
        let s = Stack::start(&bin).await;
        let mut jar = Jar::default();
        // The site's free part goes straight through (and keeps the site's cookies).
        let r = browse(&s.nginx.url("/free/a"), &mut jar, HTML, "site=1").await;
        assert_eq!(
            r.status,
            StatusCode::OK,
            "{}\n{}",
            r.text(),
            s.nginx.error_log()
        );
        assert_eq!(r.header("x-echo-target"), Some("/free/a"));
        assert_eq!(s.origin.only_request().header("cookie"), Some("site=1"));

        // Cookie check: back to the same URL with the session cookie.
        let r = browse(&s.nginx.url("/premium/x"), &mut jar, HTML, "").await;
        assert_eq!(r.status, StatusCode::FOUND, "{}", s.nginx.error_log());
        let loc = r.header("location").unwrap().to_owned();
        assert!(loc.starts_with(&s.nginx.url("/premium/x?")), "{loc}");
        assert_eq!(r.header("cache-control"), Some("no-store"));
        assert!(
            jar.0.keys().any(|k| k == "taler_paywall_session"),
            "{:?}",
            jar.0
        );
        // With it: 302 to the merchant's status page, with the order cookie.
        let r = browse(&loc, &mut jar, HTML, "").await;
        assert_eq!(r.status, StatusCode::FOUND);
        let status_url = r.header("location").unwrap().to_owned();
        assert!(
            status_url.starts_with(s.sandbox.base_url().as_str()),
            "{status_url}"
        );
        assert!(r.header("taler").unwrap().starts_with("taler"));
        assert!(
            jar.0.keys().any(|k| k.starts_with("taler_paywall_o_")),
            "{:?}",
            jar.0
        );
        assert!(
            s.protected_origin_hits().is_empty(),
            "unpaid request reached the origin"
        );

        // A client that does not take HTML: 402 with the Taler header and JSON.
        let r = browse(
            &s.nginx.url("/premium/api"),
            &mut Jar::default(),
            "application/json",
            "",
        )
        .await;
        assert_eq!(r.status, StatusCode::PAYMENT_REQUIRED);
        assert!(r.header("taler").unwrap().starts_with("taler"));
        let body: Value =
            serde_json::from_slice(&r.body).unwrap_or_else(|e| panic!("{e}: {}", r.text()));
        assert!(body["order_status_url"]
            .as_str()
            .unwrap()
            .starts_with(s.sandbox.base_url().as_str()));
        assert_eq!(r.headers.get_all("set-cookie").iter().count(), 2);

        // Pay, and come back: the origin's page.
        let order_id = url::Url::parse(&status_url)
            .unwrap()
            .path_segments()
            .unwrap()
            .next_back()
            .unwrap()
            .to_owned();
        let req = http::Request::post(format!("{}sandbox/pay", s.sandbox.base_url()))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(
                json!({"order_id": order_id, "session_id": query_param(&status_url, "session_id")})
                    .to_string(),
            )))
            .unwrap();
        assert_eq!(send(&client(), req).await.status, StatusCode::OK);
        let r = browse(&s.nginx.url("/premium/x"), &mut jar, HTML, "site=1").await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        assert_eq!(r.header("x-echo-target"), Some("/premium/x"));
        let refreshed: Vec<_> = r
            .headers
            .get_all("set-cookie")
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect();
        assert!(
            refreshed.iter().any(|c| c.starts_with("taler_paywall_o_")),
            "grant cookie not passed on: {refreshed:?}"
        );
        let seen = s.origin.requests();
        let last = seen.last().unwrap();
        assert_eq!(last.target, "/premium/x");
        assert_eq!(
            last.header("cookie"),
            Some("site=1"),
            "gateway cookies reached the origin"
        );
        // Still paid on the next visit, and another page is not.
        let r = browse(&s.nginx.url("/premium/x"), &mut jar, HTML, "").await;
        assert_eq!(r.status, StatusCode::OK);
        let r = browse(&s.nginx.url("/premium/y"), &mut jar, HTML, "").await;
        assert_eq!(r.status, StatusCode::FOUND);
        assert!(!s.protected_origin_hits().iter().any(|t| t.contains("/y")));
        // The endpoint itself is internal to nginx.
        let r = browse(
            &s.nginx.url("/.well-known/taler-paywall/auth"),
            &mut jar,
            HTML,
            "",
        )
        .await;
        assert_eq!(r.status, StatusCode::NOT_FOUND);
        s.shutdown().await;
    })
    .await;
}

/// Other spellings of `/premium/x` are redirected to pay like the plain one; ambiguous ones
/// fail. None returns origin content unpaid.
#[tokio::test]
async fn nginx_bypass_spellings_never_reach_the_origin_unpaid() {
    let Some(bin) = nginx_binary() else { return };
    bounded(async {
        let s = Stack::start(&bin).await;
        let accept = format!("Accept: {HTML}\r\n");
        // The gateway's 400 for an ambiguous URI becomes nginx's 500 (auth_request passes on
        // only 2xx, 401 and 403); a malformed escape nginx refuses itself (400).
        for (target, want) in [
            ("//premium/x", 302),
            ("/free/../premium/x", 302),
            ("/free/./../premium/x", 302),
            ("/%70remium/x", 302),
            ("/PREMIUM/x", 302),
            ("/premium;a=b/x", 302),
            ("http://localhost/premium/x", 302),
            ("/premium%2Fx", 500),
            ("/free%2F..%2Fpremium/x", 500),
            ("/free/..%2Fpremium/x", 500),
            ("/%zz/premium/x", 400),
        ] {
            let resp = raw_get(s.nginx.addr, target, &accept).await;
            let status = raw_status(&resp);
            assert!(
                !matches!(status, Some(200..=299)),
                "{target} was served unpaid:\n{resp}"
            );
            assert_eq!(status, Some(want), "{target}:\n{resp}");
            if want == 302 {
                // To the normalised URL, with the session cookie: the same as for the plain
                // spelling.
                let head = resp.to_ascii_lowercase();
                let public = format!("location: http://{}/premium", s.nginx.addr);
                assert!(head.contains(&public), "{target}:\n{resp}");
                assert!(
                    head.contains("set-cookie: taler_paywall_session="),
                    "{target}:\n{resp}"
                );
            }
        }
        assert!(
            s.protected_origin_hits().is_empty(),
            "unpaid requests reached the origin: {:?}",
            s.protected_origin_hits()
        );
        assert_eq!(s.origin.count(), 0);
        s.shutdown().await;
    })
    .await;
}
