//! `taler-paywall demo` works with nothing else installed: the sample site, the sandbox and
//! the gateway start in-process, free pages are served, and a customer can buy an article
//! and the premium gallery through the sandbox wallet's payment page form.

mod support;

use bytes::Bytes;
use http::StatusCode;
use http_body_util::Full;
use support::{bounded, client, send};

async fn get(url: &str, cookies: &mut Vec<String>) -> support::TestResponse {
    let mut req = http::Request::get(url).header("accept", "text/html");
    if !cookies.is_empty() {
        req = req.header("cookie", cookies.join("; "));
    }
    let r = send(&client(), req.body(Full::new(Bytes::new())).unwrap()).await;
    for v in r.headers.get_all("set-cookie") {
        let pair = v.to_str().unwrap().split(';').next().unwrap().to_owned();
        let name = pair.split('=').next().unwrap().to_owned();
        cookies.retain(|c| !c.starts_with(&format!("{name}=")));
        cookies.push(pair);
    }
    r
}

#[tokio::test]
async fn demo_sells_an_article_through_the_sandbox_payment_page() {
    bounded(async {
        let demo = taler_paywall::demo::start(0).await.expect("demo starts");
        let mut jar = Vec::new();
        let home = get(&demo.url, &mut jar).await;
        assert_eq!(home.status, StatusCode::OK);
        assert!(home.text().contains("Demo Gazette"));
        assert!(jar.is_empty(), "free pages set no cookies");
        let article = format!("{}articles/taler.html", demo.url);
        let mut r = get(&article, &mut jar).await;
        while r.status == StatusCode::FOUND && r.header("location").unwrap().starts_with(&demo.url)
        {
            let next = r.header("location").unwrap().to_owned();
            r = get(&next, &mut jar).await;
        }
        let status_page = r.header("location").expect("sent to pay").to_owned();
        assert!(status_page.starts_with(demo.sandbox.base_url().as_str()));
        // The payment page has a form that pays with the sandbox wallet, without JavaScript.
        let page = get(&status_page, &mut Vec::new()).await;
        let html = page.text();
        assert!(!html.contains("<script"), "works without JavaScript");
        let action = html
            .split("action=\"")
            .nth(1)
            .unwrap()
            .split('"')
            .next()
            .unwrap()
            .to_owned();
        let field = |name: &str| {
            html.split(&format!("name=\"{name}\" value=\""))
                .nth(1)
                .unwrap()
                .split('"')
                .next()
                .unwrap()
                .to_owned()
        };
        let form = format!(
            "order_id={}&session_id={}",
            field("order_id"),
            field("session_id")
        );
        let req = http::Request::post(action)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(Full::new(Bytes::from(form)))
            .unwrap();
        let paid = send(&client(), req).await;
        assert_eq!(paid.status, StatusCode::SEE_OTHER);
        assert_eq!(paid.header("location"), Some(article.as_str()));
        let r = get(&article, &mut jar).await;
        assert_eq!(r.status, StatusCode::OK);
        assert!(r.text().contains("Thank you for your purchase"));
        demo.shutdown().await.unwrap();
    })
    .await;
}
