//! `[pages] dir`: an operator's templates replace the built-in pages of a running gateway,
//! and a broken template stops the configuration from loading (`check` says where), instead
//! of failing when a customer asks for the page.

mod support;

use std::process::Command;

use bytes::Bytes;
use http::StatusCode;
use http_body_util::Full;
use support::{bounded, client, send, BinaryGateway, ConfigBuilder, TestOrigin};

const ERROR_PAGE: &str = "<!DOCTYPE html>\n<html lang=\"de\"><title>Fehler</title>\n\
<h1>Fehler {{status}}</h1><p>{{message}}</p></html>\n";

async fn get_html(addr: std::net::SocketAddr, target: &str) -> support::TestResponse {
    let req = support::request("GET", addr, target)
        .header("accept", "text/html")
        .body(Full::new(Bytes::new()))
        .expect("request");
    send(&client(), req).await
}

#[tokio::test]
async fn operator_templates_replace_the_builtin_pages() {
    bounded(async {
        let origin = TestOrigin::echo().await;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("error.html"), ERROR_PAGE).unwrap();
        let template = ConfigBuilder::new(&origin.url())
            .tail(&format!("[pages]\ndir = \"{}\"", dir.path().display()))
            .build();
        let gw = support::start_gateway(&template).await;

        // A malformed path: the gateway's own error, on the operator's page.
        let r = get_html(gw.addr, "/a%zzb").await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        assert_eq!(r.header("content-type"), Some("text/html; charset=utf-8"));
        assert!(r.text().contains("<h1>Fehler 400</h1>"), "{}", r.text());

        // A protected page while the merchant backend is unreachable: failing closed, on
        // the operator's page too, and the origin never asked.
        let r = get_html(gw.addr, "/premium/a.html").await;
        let r = match r.header("location") {
            // Browsers first get the session cookie and come back.
            Some(loc) => {
                let cookie = r
                    .header("set-cookie")
                    .expect("session cookie")
                    .split(';')
                    .next()
                    .unwrap()
                    .to_owned();
                let target = loc.trim_start_matches("http://gateway.test");
                let req = support::request("GET", gw.addr, target)
                    .header("accept", "text/html")
                    .header("cookie", cookie)
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                send(&client(), req).await
            }
            None => r,
        };
        assert!(r.status.is_server_error(), "{}", r.status);
        assert!(r.text().starts_with("<!DOCTYPE html>\n<html lang=\"de\">"));
        assert!(r.text().contains("The payment service is not available"));
        assert_eq!(origin.count(), 0);

        // JSON clients keep getting JSON.
        let r = support::get(gw.addr, "/a%zzb").await;
        assert_eq!(r.header("content-type"), Some("application/json"));
        gw.shutdown().await.unwrap();
    })
    .await;
}

#[test]
fn a_broken_template_is_a_configuration_error_with_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let pages = dir.path().join("pages");
    std::fs::create_dir(&pages).unwrap();
    std::fs::write(pages.join("refund-pending.html"), "<p>{{summary}}</p>").unwrap();
    let config = dir.path().join("gateway.toml");
    let text = ConfigBuilder::new("http://127.0.0.1:1")
        .tail("[pages]\ndir = \"pages\"")
        .build()
        .replace("{{listen}}", "127.0.0.1:0");
    std::fs::write(&config, &text).unwrap();
    let dir_line = text.lines().position(|l| l.starts_with("dir =")).unwrap() + 1;

    let out = Command::new(BinaryGateway::exe())
        .args(["check", "--config"])
        .arg(&config)
        .output()
        .expect("check runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("gateway.toml:{dir_line}:")),
        "names the line of pages.dir: {stderr}"
    );
    assert!(stderr.contains("refund-pending.html"), "{stderr}");
    assert!(stderr.contains("{{status_url}}"), "{stderr}");

    // Fixed, it is valid.
    std::fs::write(
        pages.join("refund-pending.html"),
        "<p>{{summary}}</p><a href=\"{{status_url}}\">Collect your refund</a>",
    )
    .unwrap();
    let out = Command::new(BinaryGateway::exe())
        .args(["check", "--config"])
        .arg(&config)
        .output()
        .expect("check runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
