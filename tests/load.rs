//! A bounded load test with faults: the real binary in front of an in-process origin and
//! sandbox merchant, 3000 requests from 20 concurrent clients (paid, unpaid in several ways,
//! and unprotected), while a background task flips the sandbox between healthy and failing
//! every 100 ms. Every client marks its requests (`x-load-client`), so the recording origin
//! can attribute what it served.
//!
//! Asserted: zero protected origin responses to unpaid clients (neither seen by the origin
//! nor received by the client), zero 5xx on unprotected paths, every request answered, and the
//! gateway's peak resident memory (`VmHWM`) under 64 MiB. Figures are printed for the record;
//! no timing is asserted.

mod support;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::StatusCode;

use support::{buy_api, client, start_sandbox, BinaryGateway, Jar, TestOrigin};
use taler_paywall::sandbox::Fault;

const REQUESTS_PER_CLIENT: usize = 150;
const MEMORY_LIMIT_KIB: u64 = 64 * 1024;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    /// Paid for its page before the load starts.
    Paid,
    /// Keeps its cookies, never pays.
    Unpaid,
    /// Keeps no cookies (a new session and order attempt every time).
    Cookieless,
    /// A browser that never pays.
    UnpaidBrowser,
    /// Never pays, but carries a paid client's order cookie beside its own session.
    Thief,
    /// Only unprotected paths.
    Free,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_thousand_requests_with_merchant_faults_never_serve_unpaid() {
    let run = async {
        let origin = TestOrigin::echo().await;
        let sandbox = Arc::new(start_sandbox().await);
        let template = format!(
            "[server]\nlisten = \"{{{{listen}}}}\"\npublic_url = \"http://{{{{listen}}}}\"\n\n\
             [origin]\nurl = \"{origin}\"\n\n\
             [merchant]\nurl = \"{merchant}\"\ntoken = \"secret-token:sandbox\"\ntimeout = \"1s\"\n\n\
             [session]\nsecret = \"load-test-secret-0123456789abcdefghijkl\"\nrecheck_interval = \"1s\"\n\n\
             [[protect]]\nprefix = \"/articles/\"\nprice = \"KUDOS:0.5\"\nsummary = \"Article\"\n\n\
             [[protect]]\nprefix = \"/premium/\"\nprice = \"KUDOS:2\"\nsummary = \"Premium\"\nscope = \"prefix\"\n\n\
             [limits]\norders_per_minute = 0\n",
            origin = origin.url(),
            merchant = sandbox.base_url(),
        );
        let gw = BinaryGateway::start(&template).await;
        let base = format!("http://{}", gw.addr);

        // The clients, paid ones paid through the sandbox first.
        let mut clients: Vec<(String, Kind, Jar, String)> = Vec::new();
        for i in 0..6 {
            let path = format!("/articles/paid-{i}");
            let (jar, _) = buy_api(gw.addr, &sandbox.base_url(), &path).await;
            clients.push((format!("paid-{i}"), Kind::Paid, jar, path));
        }
        let stolen: BTreeMap<String, String> = clients[0]
            .2
            .cookies
            .iter()
            .filter(|(k, _)| k.starts_with(taler_paywall::session::ORDER_COOKIE_PREFIX))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        assert!(!stolen.is_empty());
        for i in 0..5 {
            let path = if i % 2 == 0 {
                format!("/articles/unpaid-{i}")
            } else {
                format!("/premium/unpaid-{i}")
            };
            clients.push((format!("unpaid-{i}"), Kind::Unpaid, Jar::api(), path));
        }
        for i in 0..2 {
            clients.push((
                format!("unpaid-cookieless-{i}"),
                Kind::Cookieless,
                Jar::api(),
                format!("/articles/nocookie-{i}"),
            ));
        }
        for i in 0..2 {
            clients.push((
                format!("unpaid-browser-{i}"),
                Kind::UnpaidBrowser,
                Jar::html(),
                format!("/premium/browser-{i}/page.html"),
            ));
        }
        clients.push((
            "unpaid-thief".into(),
            Kind::Thief,
            Jar::api(),
            "/articles/paid-0".into(),
        ));
        for i in 0..4 {
            clients.push((
                format!("free-{i}"),
                Kind::Free,
                Jar::api(),
                format!("/free/{i}"),
            ));
        }
        assert_eq!(clients.len(), 20);
        // The purchases above reached the origin without a marker.
        let purchases = origin.count();
        assert_eq!(purchases, 6);

        // Flip the merchant between healthy and failing every ~100 ms.
        let stop = Arc::new(AtomicBool::new(false));
        let flipper = {
            let (sandbox, stop) = (sandbox.clone(), stop.clone());
            tokio::spawn(async move {
                let cycle = [
                    Some(Fault::ServerError(503)),
                    Some(Fault::Unreachable),
                    Some(Fault::Malformed),
                    Some(Fault::UnknownStatus),
                    Some(Fault::ServerError(500)),
                    Some(Fault::Unauthorized),
                    Some(Fault::Slow(Duration::from_millis(300))),
                ];
                let mut flips = 0u32;
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    let fault = if flips.is_multiple_of(2) {
                        None
                    } else {
                        i += 1;
                        cycle[i % cycle.len()].clone()
                    };
                    sandbox.set_fault(fault);
                    flips += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                sandbox.set_fault(None);
                flips
            })
        };

        let started = Instant::now();
        let mut tasks = Vec::new();
        for (name, kind, jar, path) in clients {
            let base = base.clone();
            let stolen = stolen.clone();
            tasks.push(tokio::spawn(async move {
                let http = client();
                let mut jar = jar;
                jar.extra = vec![("x-load-client".into(), name.clone())];
                let mut statuses: BTreeMap<u16, usize> = BTreeMap::new();
                for n in 0..REQUESTS_PER_CLIENT {
                    if kind == Kind::Cookieless {
                        jar.cookies.clear();
                    }
                    if kind == Kind::Thief {
                        jar.cookies.extend(stolen.clone());
                    }
                    let url = if kind == Kind::Free {
                        format!("{base}{path}/{n}")
                    } else {
                        format!("{base}{path}")
                    };
                    let r = jar.get_with(&http, &url).await;
                    *statuses.entry(r.status.as_u16()).or_default() += 1;
                    match kind {
                        Kind::Free => assert!(
                            !r.status.is_server_error(),
                            "{name}: {} on an unprotected path",
                            r.status
                        ),
                        Kind::Paid => {}
                        _ => {
                            assert!(
                                r.header("x-echo-target").is_none() && r.status != StatusCode::OK,
                                "{name} got protected content unpaid: {}",
                                r.status
                            );
                        }
                    }
                }
                (name, kind, statuses)
            }));
        }
        let mut per_kind: BTreeMap<String, BTreeMap<u16, usize>> = BTreeMap::new();
        let mut total = 0;
        for t in tasks {
            let (_, kind, statuses) = t.await.expect("client task");
            let entry = per_kind.entry(format!("{kind:?}")).or_default();
            for (s, n) in statuses {
                *entry.entry(s).or_default() += n;
                total += n;
            }
        }
        let elapsed = started.elapsed();
        stop.store(true, Ordering::Relaxed);
        let flips = flipper.await.expect("flipper");

        assert_eq!(total, 20 * REQUESTS_PER_CLIENT);
        // The origin's view: nothing protected went to an unpaid client's request.
        let mut served_paid = 0;
        let seen = origin.requests();
        assert!(seen[..purchases]
            .iter()
            .all(|r| r.header("x-load-client").is_none()));
        for r in &seen[purchases..] {
            let who = r.header("x-load-client").unwrap_or("");
            let t = r.target.to_ascii_lowercase();
            let protected = t.starts_with("/articles") || t.starts_with("/premium");
            if protected {
                assert!(
                    who.starts_with("paid-"),
                    "origin served {} to {who:?}",
                    r.target
                );
                served_paid += 1;
            }
        }
        let paid_ok = per_kind
            .get("Paid")
            .and_then(|m| m.get(&200))
            .copied()
            .unwrap_or(0);
        assert_eq!(served_paid, paid_ok, "origin and clients agree");
        assert!(paid_ok > 0, "paid clients must be served between faults");
        let peak = gw.peak_rss_kib();
        eprintln!(
            "load: {total} requests in {elapsed:?} ({:.0}/s), {flips} fault flips, \
             statuses by client kind {per_kind:?}, gateway VmHWM {peak} KiB",
            total as f64 / elapsed.as_secs_f64()
        );
        assert!(
            peak < MEMORY_LIMIT_KIB,
            "gateway peak RSS {peak} KiB over {MEMORY_LIMIT_KIB} KiB"
        );
        let status = gw.terminate().await;
        assert!(status.success(), "{status}");
    };
    match tokio::time::timeout(Duration::from_secs(110), run).await {
        Ok(()) => {}
        Err(_) => panic!("load test did not finish within 110 s"),
    }
}
