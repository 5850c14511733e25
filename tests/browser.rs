//! The customer's view, in a real browser: headless Chromium, driven through WebDriver
//! (chromedriver), against the real demo (sample site, sandbox merchant and wallet, gateway)
//! running in this process.
//!
//! One journey: buy an article on the sandbox's payment page; buy the premium gallery once
//! and open another premium page and its images without paying again; see the refund page
//! after the merchant refunds an article; lose every cookie and get a bought article back by
//! repurchase detection. Every step is saved as a PNG under `target/browser-screenshots/`.
//! The gateway's own pages and the sandbox's payment page are checked with axe-core
//! (`tests/a11y`, installed by `npm ci` there; `.ci/run` does it).
//!
//! Needs `/usr/bin/chromium` and `/usr/bin/chromedriver` (Debian `chromium`,
//! `chromium-driver`; `CHROMIUM` and `CHROMEDRIVER` override the paths). Without them the
//! test says so loudly and passes, unless `CI_REQUIRE_EXTERNAL=1`, where it fails.

mod support;

use std::io::{BufRead, BufReader, Write as _};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fantoccini::actions::{InputSource as _, KeyAction, KeyActions};
use fantoccini::key::Key;
use fantoccini::{Client, ClientBuilder, Locator};
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use serde_json::{json, Value};

use taler_paywall::amount::Amount;
use taler_paywall::body::Body;
use taler_paywall::demo::{self, DemoOptions};
use taler_paywall::pages::Pages;
use taler_paywall::server::{ConnInfo, Handler, ServerOptions};

/// The whole journey, browser start-up included, must finish within this.
const JOURNEY_TIMEOUT: Duration = Duration::from_secs(120);

fn required() -> bool {
    std::env::var("CI_REQUIRE_EXTERNAL").as_deref() == Ok("1")
}

/// Skips (loudly) on a developer's machine, fails under CI.
fn missing(what: &str) {
    let msg = format!("browser test: {what}");
    if required() {
        panic!("{msg} (CI_REQUIRE_EXTERNAL=1: this is a failure, not a skip)");
    }
    // Straight to the process's stderr: the test harness would swallow `eprintln!` of a
    // passing test, and a skip must not go unnoticed.
    let bang = "!".repeat(88);
    let _ = writeln!(std::io::stderr(), "\n{bang}\n!!! SKIPPED: {msg}\n{bang}\n");
}

fn tool(env: &str, default: &str) -> Option<PathBuf> {
    let path = PathBuf::from(std::env::var(env).unwrap_or_else(|_| default.to_owned()));
    path.is_file().then_some(path)
}

/// chromedriver in a process group of its own; dropping it kills the group (chromedriver
/// and the Chromium it started), so that no browser outlives the test, even on a panic.
struct Driver {
    child: Child,
    port: u16,
}

impl Driver {
    fn start(chromedriver: &Path) -> Driver {
        let mut child = Command::new(chromedriver)
            .arg("--port=0")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("chromedriver starts");
        let stdout = child.stdout.take().expect("stdout piped");
        let mut lines = BufReader::new(stdout).lines();
        let mut driver = Driver { child, port: 0 };
        // "ChromeDriver was started successfully on port 36793."
        for line in lines.by_ref() {
            let line = line.expect("chromedriver output");
            if let Some(rest) = line.split("started successfully on port ").nth(1) {
                driver.port = rest.trim_end_matches('.').trim().parse().expect("port");
                break;
            }
        }
        assert_ne!(driver.port, 0, "chromedriver did not say its port");
        // Keep draining its output so that it never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        driver
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        // The negative pid names the process group created by `process_group(0)`.
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The browser session and what the steps share.
struct Browser {
    client: Client,
    shots: PathBuf,
    axe: Option<String>,
    step: u32,
}

impl Browser {
    async fn start(chromium: &Path, driver: &Driver, profile: &Path) -> Browser {
        let caps = json!({
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    "--disable-dev-shm-usage", "--window-size=1000,800",
                    format!("--user-data-dir={}", profile.display()),
                ],
            },
        });
        let caps = match caps {
            Value::Object(m) => m,
            _ => unreachable!(),
        };
        let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{}", driver.port))
            .await
            .expect("WebDriver session");
        let shots = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/browser-screenshots");
        std::fs::create_dir_all(&shots).expect("screenshot directory");
        let axe_file = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/a11y/node_modules/axe-core/axe.min.js");
        let axe = std::fs::read_to_string(&axe_file).ok();
        if axe.is_none() {
            missing(&format!(
                "{} is missing (run `npm ci` in tests/a11y): accessibility checks skipped",
                axe_file.display()
            ));
        }
        Browser {
            client,
            shots,
            axe,
            step: 0,
        }
    }

    async fn goto(&self, url: &str) {
        self.client.goto(url).await.expect("navigation");
    }

    async fn url(&self) -> String {
        self.client
            .current_url()
            .await
            .expect("current url")
            .to_string()
    }

    async fn text(&self, css: &str) -> String {
        match self.client.find(Locator::Css(css)).await {
            Ok(el) => el.text().await.expect("text"),
            Err(e) => panic!("no {css} on {}: {e}", self.url().await),
        }
    }

    async fn h1(&self) -> String {
        self.text("h1").await
    }

    /// Waits until the browser shows `url` (after a form post and its redirects).
    async fn wait_for_url(&self, url: &str) {
        self.wait_until(|u| u == url, url).await;
    }

    /// Waits until the address of the loaded page satisfies `done`.
    async fn wait_until(&self, done: impl Fn(&str) -> bool, what: &str) {
        for _ in 0..200 {
            // Asked in the middle of a navigation, the script may fail: not ready yet.
            let ready = self
                .client
                .execute("return document.readyState", vec![])
                .await
                .ok();
            if done(&self.url().await) && ready == Some(json!("complete")) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("never arrived at {what}; at {}", self.url().await);
    }

    async fn click(&self, css: &str) {
        self.client
            .find(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("no {css}: {e}"))
            .click()
            .await
            .expect("click");
    }

    /// Saves a screenshot as `target/browser-screenshots/NN-name.png`.
    async fn shot(&mut self, name: &str) {
        self.step += 1;
        let png = self.client.screenshot().await.expect("screenshot");
        assert!(png.starts_with(b"\x89PNG"), "a PNG");
        let path = self.shots.join(format!("{:02}-{name}.png", self.step));
        std::fs::write(&path, png).expect("screenshot written");
    }

    /// Runs axe-core (WCAG 2.1 A and AA, and best practices) on the current page and fails
    /// on any violation.
    async fn check_accessibility(&self, what: &str) {
        let Some(axe) = &self.axe else { return };
        let loaded = self
            .client
            .execute(&format!("{axe}\nreturn typeof axe.run;"), vec![])
            .await
            .expect("axe injected");
        assert_eq!(loaded, "function", "axe-core did not load");
        let result = self
            .client
            .execute_async(
                "const done = arguments[arguments.length - 1];\
                 axe.run(document, {runOnly: {type: 'tag', values: \
                   ['wcag2a', 'wcag2aa', 'wcag21a', 'wcag21aa', 'best-practice']}})\
                 .then(r => done({passes: r.passes.length, violations: r.violations.map(v => \
                   ({id: v.id, impact: v.impact, help: v.help, \
                     nodes: v.nodes.map(n => n.target.join(' '))}))}))\
                 .catch(e => done({error: String(e)}));",
                vec![],
            )
            .await
            .expect("axe ran");
        assert!(
            result.get("error").is_none(),
            "{what}: axe failed: {result}"
        );
        let violations = result["violations"].as_array().expect("violations");
        assert!(
            violations.is_empty(),
            "{what}: accessibility violations:\n{}",
            serde_json::to_string_pretty(violations).unwrap_or_default()
        );
        let passes = result["passes"].as_u64().unwrap_or(0);
        assert!(
            passes > 10,
            "{what}: axe checked almost nothing ({passes} rules)"
        );
        eprintln!("axe-core: {what}: {passes} rules passed, no violations");
    }

    /// Presses Tab `n` times from the top of the page and answers, for each press, the
    /// focused element's text and whether its focus is drawn (a non-`none` outline): keyboard
    /// users reach every control in reading order and see where they are.
    async fn tab_through(&self, n: usize) -> Vec<(String, bool)> {
        self.client
            .execute(
                "document.activeElement && document.activeElement.blur(); window.scrollTo(0, 0);",
                vec![],
            )
            .await
            .expect("reset focus");
        let mut seen = Vec::new();
        for _ in 0..n {
            let tab = KeyActions::new("keyboard".into())
                .then(KeyAction::Down {
                    value: Key::Tab.into(),
                })
                .then(KeyAction::Up {
                    value: Key::Tab.into(),
                });
            self.client.perform_actions(tab).await.expect("Tab");
            let v = self
                .client
                .execute(
                    "const e = document.activeElement; \
                     return [e.innerText.trim(), getComputedStyle(e).outlineStyle !== 'none'];",
                    vec![],
                )
                .await
                .expect("focused element");
            seen.push((
                v[0].as_str().unwrap_or_default().to_owned(),
                v[1].as_bool().unwrap_or(false),
            ));
        }
        seen
    }

    /// On the sandbox's payment page: presses the pay button and waits to be back on `then`.
    async fn pay(&self, then: &str) {
        assert_eq!(self.h1().await, "Payment requested");
        self.click("form button[type=submit]").await;
        self.wait_for_url(then).await;
    }
}

/// The order id in a sandbox order status URL (`…/orders/{id}?token=…`).
fn order_id(status_url: &str) -> String {
    let url = url::Url::parse(status_url).expect("status url");
    let mut segments = url.path_segments().expect("path");
    segments
        .by_ref()
        .find(|s| *s == "orders")
        .expect("an order status URL");
    segments.next().expect("order id").to_owned()
}

/// The merchant refunds `order` (the sandbox's private API, as a shop owner's tool would).
async fn refund(sandbox: &url::Url, order: &str) {
    let req = Request::post(format!("{sandbox}private/orders/{order}/refund"))
        .header("authorization", "Bearer secret-token:sandbox")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(
            json!({"refund": "KUDOS:0.5", "reason": "test"}).to_string(),
        )))
        .expect("request");
    let r = support::send(&support::client(), req).await;
    assert_eq!(r.status, StatusCode::OK, "refund: {}", r.text());
}

/// Serves each of the gateway's built-in pages with status 200 (the payment-required page
/// without its redirect), so that the browser renders every one of them for the
/// accessibility check and the screenshots, including those a browser never stays on.
struct PageGallery;

impl Handler for PageGallery {
    fn call(
        &self,
        req: Request<hyper::body::Incoming>,
        _conn: ConnInfo,
    ) -> impl std::future::Future<Output = Response<Body>> + Send {
        let pages = Pages::builtin();
        let price: Amount = "KUDOS:0.5".parse().expect("amount");
        let status_url = "http://127.0.0.1:1/orders/2026.1-EXAMPLE?token=T&session_id=S";
        let pay_uri = "taler+http://pay/127.0.0.1:1/2026.1-EXAMPLE/S?c=T";
        let mut resp = match req.uri().path() {
            "/payment-required" => {
                pages.payment_required(true, pay_uri, status_url, "Demo Gazette article", &price)
            }
            "/refund-pending" => {
                pages.refunded(true, true, Some(status_url), "Demo Gazette article")
            }
            "/refunded" => pages.refunded(true, false, None, "Demo Gazette article"),
            "/cookies-required" => pages.cookies_required(true),
            "/rate-limited" => pages.rate_limited(true, 42),
            _ => pages.error(
                StatusCode::BAD_GATEWAY,
                "The payment service is not available right now. Please try again later.",
                true,
            ),
        };
        *resp.status_mut() = StatusCode::OK;
        resp.headers_mut().remove(http::header::LOCATION);
        async move { resp }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn customer_journey_in_headless_chromium() {
    let (Some(chromium), Some(chromedriver)) = (
        tool("CHROMIUM", "/usr/bin/chromium"),
        tool("CHROMEDRIVER", "/usr/bin/chromedriver"),
    ) else {
        missing("chromium or chromedriver not found (Debian packages chromium, chromium-driver)");
        return;
    };
    let profile = tempfile::tempdir().expect("profile dir");
    let driver = Driver::start(&chromedriver);
    let outcome =
        tokio::time::timeout(JOURNEY_TIMEOUT, journey(&chromium, &driver, profile.path())).await;
    // `driver` (and with it the browser) is killed when it drops, whatever happened.
    drop(driver);
    outcome.unwrap_or_else(|_| panic!("the journey did not finish within {JOURNEY_TIMEOUT:?}"));
}

async fn journey(chromium: &Path, driver: &Driver, profile: &Path) {
    // Re-check the merchant on every protected request, so that the refund shows at once.
    let demo = demo::start_with(
        0,
        DemoOptions {
            recheck_interval: Duration::ZERO,
        },
    )
    .await
    .expect("demo starts");
    let gallery_listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let gallery = format!("http://{}/", gallery_listener.local_addr().expect("addr"));
    let (gallery_stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let gallery_task = tokio::spawn(taler_paywall::server::run(
        gallery_listener,
        Arc::new(PageGallery),
        ServerOptions::default(),
        async {
            let _ = stop_rx.await;
        },
    ));

    let mut b = Browser::start(chromium, driver, profile).await;
    let site = demo.url.clone();
    let sandbox = demo.sandbox.base_url();
    let article = format!("{site}articles/taler.html");
    let article2 = format!("{site}articles/privacy.html");

    // 1. The home page is free.
    b.goto(&site).await;
    assert_eq!(b.h1().await, "The Demo Gazette");
    b.shot("home").await;

    // 2. An article: the gateway sends the browser to the merchant's payment page.
    b.goto(&article).await;
    let status_url = b.url().await;
    assert!(
        status_url.starts_with(sandbox.as_str()),
        "on the payment page: {status_url}"
    );
    let bought_order = order_id(&status_url);
    let qr = b
        .client
        .find(Locator::Css("svg[role=img]"))
        .await
        .expect("QR code");
    assert!(qr
        .attr("aria-label")
        .await
        .expect("attr")
        .is_some_and(|l| l.contains("QR code")));
    b.shot("payment-page").await;
    b.check_accessibility("sandbox payment page").await;
    let focus = b.tab_through(2).await;
    assert_eq!(
        focus[0],
        ("Pay with the sandbox wallet".to_owned(), true),
        "{focus:?}"
    );
    assert_eq!(
        focus[1],
        (
            "Open this payment request in your GNU Taler wallet".to_owned(),
            true
        ),
        "{focus:?}"
    );

    // 3. Pay with the sandbox wallet: back on the article, with its content.
    b.pay(&article).await;
    assert_eq!(b.h1().await, "How GNU Taler pays for a page");
    assert!(b
        .text(".paid")
        .await
        .contains("Thank you for your purchase"));
    b.shot("article-paid").await;

    // 4. The premium gallery is sold as one: pay on its second page...
    let more = format!("{site}premium/more.html");
    b.goto(&more).await;
    assert!(b.url().await.starts_with(sandbox.as_str()), "sent to pay");
    b.pay(&more).await;
    assert_eq!(b.h1().await, "More premium content");
    b.shot("premium-paid").await;
    // ...and the gallery's front page and its images open without paying again.
    b.click("nav a[href='/premium/index.html']").await;
    b.wait_for_url(&format!("{site}premium/index.html")).await;
    assert_eq!(b.h1().await, "Premium gallery");
    let images = b
        .client
        .execute(
            "return Array.from(document.images).map(i => i.complete && i.naturalWidth > 0);",
            vec![],
        )
        .await
        .expect("images");
    assert_eq!(images, json!([true, true]), "both images load");
    b.shot("premium-gallery").await;

    // 5. Buy the second article, then the merchant refunds it: the refund page, with the
    //    link to collect the refund while the wallet has not.
    b.goto(&article2).await;
    let refunded_order = order_id(&b.url().await);
    b.pay(&article2).await;
    assert_eq!(b.h1().await, "Privacy for buyers");
    refund(&sandbox, &refunded_order).await;
    b.goto(&article2).await;
    assert_eq!(
        b.url().await,
        article2,
        "the refund page is the gateway's own"
    );
    assert_eq!(b.h1().await, "This purchase was refunded");
    let collect = b
        .client
        .find(Locator::LinkText("Collect your refund"))
        .await
        .expect("collect link");
    let href = collect.attr("href").await.expect("href").expect("a link");
    assert_eq!(order_id(&href), refunded_order);
    b.shot("refund-pending").await;
    b.check_accessibility("refund page (pending)").await;
    // Collect it with the sandbox wallet; the page then says the money is back.
    collect.click().await.expect("click");
    b.wait_until(|u| u.starts_with(sandbox.as_str()), "the sandbox")
        .await;
    b.click("form button[type=submit]").await;
    b.wait_until(
        |u| u.ends_with("/sandbox/collect-refund-form"),
        "the collected refund",
    )
    .await;
    assert!(b.text("main").await.contains("collected: KUDOS:0.5"));
    b.goto(&article2).await;
    assert_eq!(b.h1().await, "This purchase was refunded");
    assert!(b
        .client
        .find(Locator::LinkText("Collect your refund"))
        .await
        .is_err());
    b.shot("refunded").await;

    // 6. Every cookie lost: the first article again. A new order, the same payment page;
    //    the wallet recognises the purchase and replays it instead of paying twice.
    b.client
        .delete_all_cookies()
        .await
        .expect("cookies deleted");
    b.goto(&article).await;
    let again = b.url().await;
    assert!(again.starts_with(sandbox.as_str()), "sent to pay: {again}");
    assert_ne!(order_id(&again), bought_order, "a new order");
    b.shot("repurchase-payment-page").await;
    b.pay(&article).await;
    assert_eq!(b.h1().await, "How GNU Taler pays for a page");
    b.shot("article-after-repurchase").await;
    // The new order was only claimed: the old payment was replayed, nothing paid twice.
    let req = Request::get(format!("{sandbox}private/orders/{}", order_id(&again)))
        .header("authorization", "Bearer secret-token:sandbox")
        .body(Full::new(Bytes::new()))
        .expect("request");
    let status: Value =
        serde_json::from_slice(&support::send(&support::client(), req).await.body).expect("json");
    assert_eq!(status["order_status"], "claimed", "{status}");

    // 7. Every page of the gateway, as a browser shows it, for the accessibility check.
    for page in [
        "payment-required",
        "refund-pending",
        "refunded",
        "cookies-required",
        "rate-limited",
        "error",
    ] {
        b.goto(&format!("{gallery}{page}")).await;
        let h1s = b
            .client
            .find_all(Locator::Css("h1"))
            .await
            .expect("headings");
        assert_eq!(h1s.len(), 1, "{page}: one h1");
        b.shot(&format!("gateway-{page}")).await;
        b.check_accessibility(&format!("gateway page {page}")).await;
        if page == "payment-required" {
            let focus = b.tab_through(2).await;
            let want = [
                "Continue to the payment page",
                "Open this payment in your GNU Taler wallet",
            ];
            for (got, want) in focus.iter().zip(want) {
                assert_eq!(got, &(want.to_owned(), true), "{focus:?}");
            }
        }
    }

    b.client.close().await.expect("browser closed");
    let _ = gallery_stop.send(());
    let _ = gallery_task.await;
    demo.shutdown().await.expect("demo stops");
}
