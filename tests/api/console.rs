//! The operator console (SPEC §6), as an operator uses it: in a real headless Chromium driven
//! through chromedriver (Debian's `chromium` and `chromium-driver`, which `.ci/run` installs),
//! and, for what a browser does not show (headers, cookie flags, forged forms), over plain HTTP.
//!
//! `CONSOLE_SCREENSHOTS=<dir>` keeps a screenshot of each page there (the README's pictures).

use std::process::Stdio;
use std::time::Duration;

use bonychat_relay::store::JobState;
use fantoccini::{Client, ClientBuilder, Locator};
use reqwest::StatusCode;
use reqwest::header::{HeaderMap, SET_COOKIE};
use serde_json::json;

use crate::helpers::{PSID, Reply, TestApp, spawn_app_with, text};

pub const ADMIN_TOKEN: &str = "console-admin-token-1";

/// chromedriver on a port of its own, stopped with the test.
struct Browser {
    client: Client,
    _driver: tokio::process::Child,
}

impl Browser {
    /// A fresh headless Chromium (the test is ignored where `build.rs` found no chromedriver).
    async fn start() -> Self {
        let driver = which("chromedriver").expect("chromedriver on PATH: apt-get install chromium chromium-driver");
        let port = free_port();
        let child = tokio::process::Command::new(driver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("chromedriver starts");
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut capabilities = serde_json::Map::new();
        capabilities.insert(
            "goog:chromeOptions".into(),
            json!({"args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,900"]}),
        );
        let url = format!("http://127.0.0.1:{port}");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            match ClientBuilder::rustls().expect("TLS roots").capabilities(capabilities.clone()).connect(&url).await {
                Ok(client) => return Self { client, _driver: child },
                Err(e) if tokio::time::Instant::now() > deadline => panic!("chromedriver never answered: {e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    async fn open(&self, url: &str) {
        self.client.goto(url).await.unwrap_or_else(|e| panic!("open {url}: {e}"));
    }

    async fn text_of(&self, css: &str) -> String {
        self.client.find(Locator::Css(css)).await.unwrap_or_else(|e| panic!("{css}: {e}")).text().await.unwrap()
    }

    async fn click(&self, css: &str) {
        self.client.find(Locator::Css(css)).await.unwrap_or_else(|e| panic!("{css}: {e}")).click().await.unwrap();
    }

    async fn type_into(&self, css: &str, value: &str) {
        let field = self.client.find(Locator::Css(css)).await.unwrap_or_else(|e| panic!("{css}: {e}"));
        field.send_keys(value).await.unwrap();
    }

    async fn path(&self) -> String {
        let url = self.client.current_url().await.unwrap();
        match url.query() {
            Some(query) => format!("{}?{query}", url.path()),
            None => url.path().to_owned(),
        }
    }

    /// Waits for the page a click leads to (a form's answer may come after the click returns).
    async fn wait_for_path(&self, expected: impl Fn(&str) -> bool) -> String {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let path = self.path().await;
            if expected(&path) || tokio::time::Instant::now() > deadline {
                return path;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn screenshot(&self, name: &str) {
        let Some(dir) = std::env::var_os("CONSOLE_SCREENSHOTS") else { return };
        let png = self.client.screenshot().await.unwrap();
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(std::path::Path::new(&dir).join(format!("{name}.png")), png).unwrap();
    }

    async fn close(self) {
        self.client.close().await.ok();
    }
}

fn which(program: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| std::path::Path::new(dir).join(program))
        .find(|path| path.is_file())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A message JoinChat keeps failing until it is out of retries: a dead letter. Returns its mId.
async fn dead_letter(app: &TestApp, words: &str) -> String {
    app.joinchat.script((0..4).map(|_| Reply::status(502, "")));
    let (status, sent) = app.send(PSID, text(words)).await;
    assert_eq!(status, 200);
    app.settle().await;
    sent["mId"].as_str().unwrap().to_owned()
}

#[tokio::test]
#[cfg_attr(not(browser_tests), ignore = "no chromedriver: apt-get install chromium chromium-driver (see README)")]
async fn an_operator_signs_in_retries_a_dead_letter_sees_it_delivered_finds_it_and_signs_out() {
    // No wait: the message's attempt is the worker's, so JoinChat's refusal makes it a dead
    // letter (with a `failed` receipt) rather than a 400.
    let app = spawn_app_with(&[("RELAY_ADMIN_TOKEN", ADMIN_TOKEN), ("RELAY_SEND_WAIT_MS", "0")]).await;
    let browser = Browser::start().await;
    let base = format!("http://{}", app.addr);

    // Signed out, a page leads to the sign-in form, and back after it.
    browser.open(&format!("{base}/admin/dead-letters")).await;
    assert_eq!(browser.path().await, "/admin/sign-in?next=%2Fadmin%2Fdead-letters");
    browser.screenshot("sign-in").await;
    browser.type_into("#token", "not-the-token").await;
    browser.click("form.sign-in button").await;
    browser.client.wait().for_element(Locator::Css("p.notice.failed")).await.unwrap();
    assert_eq!(browser.text_of("p.notice.failed").await, "That is not the admin token.");
    browser.type_into("#token", ADMIN_TOKEN).await;
    browser.click("form.sign-in button").await;
    assert_eq!(browser.wait_for_path(|path| path == "/admin/dead-letters").await, "/admin/dead-letters");
    assert_eq!(browser.text_of("p.empty").await, "Nothing here.");

    // JoinChat refuses a message: it appears, with JoinChat's reason.
    app.joinchat
        .script([Reply::status(400, r#"{"success":false,"errors":{"msg":"Recipient not found (code 10010)"}}"#)]);
    let (status, sent) = app.send(PSID, text("Your table is ready")).await;
    assert_eq!(status, 200);
    let m_id = sent["mId"].as_str().unwrap().to_owned();
    app.settle().await;
    browser.client.refresh().await.unwrap();
    let row = browser.text_of("table.jobs tbody tr").await;
    assert!(row.contains(&m_id), "{row}");
    assert!(row.contains("Recipient not found (code 10010)"), "{row}");
    browser.screenshot("dead-letters").await;

    // Retried: JoinChat takes it this time.
    browser.click("table.jobs tbody tr form button").await;
    let path = browser.wait_for_path(|path| path.ends_with("?retried=1")).await;
    assert!(path.starts_with("/admin/job/") && path.ends_with("?retried=1"), "{path}");
    assert_eq!(browser.text_of("p.notice.done").await, "Queued again, due now.");
    app.settle().await;
    assert_eq!(app.joinchat.received().len(), 2, "the refusal, then the retry");
    browser.client.refresh().await.unwrap();
    assert_eq!(browser.text_of("dl.facts dd span.state").await, "delivered");
    let attempts = browser.text_of("table.attempts tbody").await;
    let rows: Vec<&str> = attempts.lines().collect();
    assert_eq!(rows.len(), 3, "the refusal, the operator's retry, the delivery: {attempts}");
    assert!(rows[0].starts_with("1 ") && rows[0].contains(" dead 400 Recipient not found (code 10010)"), "{attempts}");
    assert!(rows[1].starts_with("— ") && rows[1].contains("requeued — queued again by an operator"), "{attempts}");
    assert!(rows[2].starts_with("1 ") && rows[2].contains("delivered 2xx"), "{attempts}");
    let requests = browser.text_of("main").await;
    assert!(requests.contains("\"text\": \"Your table is ready\""), "the JoinChat request: {requests}");
    browser.screenshot("job").await;

    // The overview counts it delivered; no dead letter is left.
    browser.click("nav a[href='/admin/']").await;
    browser.wait_for_path(|path| path == "/admin/").await;
    let outbound = browser.text_of("table.overview tbody tr:first-child").await;
    let cells: Vec<&str> = outbound.split_whitespace().collect();
    assert_eq!(cells[..7], ["default", "outbound", "0", "0", "0", "0", "—"], "{outbound}");
    // Counted per process: other tests' relays in this process deliver on `default` too.
    assert!(cells[7].parse::<u64>().unwrap() >= 1, "delivered in the last hour: {outbound}");
    browser.screenshot("overview").await;

    // Found by its mId, and by its contact.
    browser.type_into("form.search input[name=q]", &m_id).await;
    browser.click("form.search button").await;
    browser.wait_for_path(|path| path.starts_with("/admin/search")).await;
    assert!(browser.text_of("table.jobs tbody").await.contains(&m_id));
    browser.screenshot("search").await;
    browser.open(&format!("{base}/admin/search?q={PSID}")).await;
    assert!(browser.text_of("table.jobs tbody").await.contains(&m_id));

    // A form whose CSRF token was taken out is refused, and changes nothing.
    let without_token = "document.querySelector('form.sign-out input[name=csrf]').remove()";
    browser.client.execute(without_token, vec![]).await.unwrap();
    browser.click("form.sign-out button").await;
    browser.client.wait().for_element(Locator::Css("body.bare h1")).await.unwrap();
    assert_eq!(browser.text_of("h1").await, "Form refused");
    assert!(browser.text_of("main").await.contains("CSRF token is missing or wrong"));
    browser.open(&format!("{base}/admin/")).await;
    assert_eq!(browser.path().await, "/admin/", "still signed in");

    // Signed out: the pages are closed again.
    browser.click("form.sign-out button").await;
    assert_eq!(browser.wait_for_path(|path| path == "/admin/sign-in").await, "/admin/sign-in");
    browser.open(&format!("{base}/admin/")).await;
    assert_eq!(browser.path().await, "/admin/sign-in?next=%2Fadmin%2F");
    browser.close().await;
    app.stop().await;
}

/// Signs in over plain HTTP, as a browser would: the sign-in form's cookie and token, then the
/// session cookie. Returns the session's `Cookie` header.
pub async fn signed_in(http: &reqwest::Client, base: &str) -> String {
    let form = http.get(format!("{base}/admin/sign-in")).send().await.unwrap();
    let form_cookie = cookie_pair(form.headers(), "relay_console_sign_in");
    let page = form.text().await.unwrap();
    let csrf = hidden(&page, "csrf");
    let signed = http
        .post(format!("{base}/admin/sign-in"))
        .header("cookie", &form_cookie)
        .form_of(&[("token", ADMIN_TOKEN), ("csrf", csrf.as_str()), ("next", "/admin/")])
        .send()
        .await
        .unwrap();
    assert_eq!(signed.status(), StatusCode::SEE_OTHER);
    cookie_pair(signed.headers(), "relay_console")
}

fn cookie_pair(headers: &HeaderMap, name: &str) -> String {
    headers
        .get_all(SET_COOKIE)
        .iter()
        .map(|value| value.to_str().unwrap())
        .find(|value| value.starts_with(&format!("{name}=")))
        .unwrap_or_else(|| panic!("no {name} cookie in {headers:?}"))
        .split(';')
        .next()
        .unwrap()
        .to_owned()
}

pub fn hidden(page: &str, name: &str) -> String {
    let marker = format!("name=\"{name}\" value=\"");
    let start = page.find(&marker).unwrap_or_else(|| panic!("no {name} field in {page}")) + marker.len();
    page[start..].split('"').next().unwrap().to_owned()
}

/// A form posted as a browser posts it.
pub trait FormPost {
    fn form_of(self, pairs: &[(&str, &str)]) -> Self;
}

impl FormPost for reqwest::RequestBuilder {
    fn form_of(self, pairs: &[(&str, &str)]) -> Self {
        let body: String = url::form_urlencoded::Serializer::new(String::new()).extend_pairs(pairs).finish();
        self.header("content-type", "application/x-www-form-urlencoded").body(body)
    }
}

pub fn no_redirects() -> reqwest::Client {
    reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap()
}

#[tokio::test]
async fn a_form_without_its_csrf_token_changes_nothing() {
    let app = spawn_app_with(&[("RELAY_ADMIN_TOKEN", ADMIN_TOKEN)]).await;
    dead_letter(&app, "hello").await;
    let dead = app.jobs(JobState::Dead).await;
    let (http, base) = (no_redirects(), format!("http://{}", app.addr));
    let session = signed_in(&http, &base).await;

    for csrf in [None, Some("forged"), Some("")] {
        let mut form = vec![("channel", "default")];
        if let Some(csrf) = csrf {
            form.push(("csrf", csrf));
        }
        let retry = http
            .post(format!("{base}/admin/job/{}/retry", dead[0].id))
            .header("cookie", &session)
            .form_of(&form)
            .send()
            .await
            .unwrap();
        assert_eq!(retry.status(), StatusCode::FORBIDDEN, "csrf {csrf:?}");
        assert!(retry.text().await.unwrap().contains("CSRF token"));
        let redrive = http
            .post(format!("{base}/admin/dead-letters/redrive"))
            .header("cookie", &session)
            .form_of(&form)
            .send()
            .await;
        assert_eq!(redrive.unwrap().status(), StatusCode::FORBIDDEN, "csrf {csrf:?}");
    }
    // Without the session, the right token of another session is no use either.
    let page = http.get(format!("{base}/admin/")).header("cookie", &session).send().await.unwrap();
    let csrf = hidden(&page.text().await.unwrap(), "csrf");
    let anonymous =
        http.post(format!("{base}/admin/job/{}/retry", dead[0].id)).form_of(&[("csrf", csrf.as_str())]).send().await;
    assert_eq!(anonymous.unwrap().status(), StatusCode::FORBIDDEN);

    app.settle().await;
    assert_eq!(app.jobs(JobState::Dead).await.len(), 1, "still dead: no form went through");
    assert_eq!(app.joinchat.received().len(), 4);
    app.stop().await;
}

#[tokio::test]
async fn pages_carry_strict_headers_and_the_session_cookie_its_flags() {
    let app = spawn_app_with(&[("RELAY_ADMIN_TOKEN", ADMIN_TOKEN)]).await;
    let (http, base) = (no_redirects(), format!("http://{}", app.addr));
    let session = signed_in(&http, &base).await;

    for path in ["/admin/", "/admin/dead-letters", "/admin/search?q=x", "/admin/job/1", "/admin/sign-in"] {
        let page = http.get(format!("{base}{path}")).header("cookie", &session).send().await.unwrap();
        let headers = page.headers();
        let csp = headers["content-security-policy"].to_str().unwrap();
        assert!(csp.contains("default-src 'none'") && csp.contains("frame-ancestors 'none'"), "{path}: {csp}");
        assert!(!csp.contains("unsafe"), "{path}: {csp}");
        assert_eq!(headers["x-frame-options"], "DENY", "{path}");
        assert_eq!(headers["x-content-type-options"], "nosniff", "{path}");
        assert_eq!(headers["referrer-policy"], "no-referrer", "{path}");
        assert_eq!(headers["cache-control"], "no-store", "{path}");
    }

    // Behind a TLS proxy the cookie is Secure; it is HttpOnly and SameSite=Strict always.
    let form = http.get(format!("{base}/admin/sign-in")).header("x-forwarded-proto", "https").send().await.unwrap();
    let form_cookie = cookie_pair(form.headers(), "relay_console_sign_in");
    let csrf = hidden(&form.text().await.unwrap(), "csrf");
    let signed = http
        .post(format!("{base}/admin/sign-in"))
        .header("x-forwarded-proto", "https")
        .header("cookie", &form_cookie)
        .form_of(&[("token", ADMIN_TOKEN), ("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    let set = signed.headers().get_all(SET_COOKIE).iter().map(|v| v.to_str().unwrap().to_owned()).collect::<Vec<_>>();
    let session_cookie = set.iter().find(|c| c.starts_with("relay_console=")).expect("a session cookie");
    for flag in ["HttpOnly", "SameSite=Strict", "Secure", "Path=/admin/"] {
        assert!(session_cookie.contains(flag), "{session_cookie}");
    }
    assert!(!session_cookie.contains(ADMIN_TOKEN));
    let plain = signed_in(&http, &base).await;
    assert!(!plain.contains("Secure"));
    app.stop().await;
}

#[tokio::test]
async fn wrong_tokens_are_slowed_down_and_never_sign_in() {
    let app = spawn_app_with(&[("RELAY_ADMIN_TOKEN", ADMIN_TOKEN)]).await;
    let (http, base) = (no_redirects(), format!("http://{}", app.addr));
    let form = http.get(format!("{base}/admin/sign-in")).send().await.unwrap();
    let form_cookie = cookie_pair(form.headers(), "relay_console_sign_in");
    let csrf = hidden(&form.text().await.unwrap(), "csrf");
    let attempt = |token: &'static str| {
        http.post(format!("{base}/admin/sign-in"))
            .header("cookie", &form_cookie)
            .form_of(&[("token", token), ("csrf", csrf.as_str())])
            .send()
    };

    let mut statuses = Vec::new();
    for _ in 0..6 {
        statuses.push(attempt("guess").await.unwrap().status().as_u16());
    }
    assert_eq!(statuses, [401, 401, 401, 401, 401, 429], "the sixth wrong token waits");
    let slowed = attempt(ADMIN_TOKEN).await.unwrap();
    assert_eq!(slowed.status(), StatusCode::TOO_MANY_REQUESTS, "even the right token waits its turn");
    assert!(slowed.headers().contains_key("retry-after"));
    assert!(slowed.headers().get_all(SET_COOKIE).iter().all(|c| !c.to_str().unwrap().starts_with("relay_console=")));

    // A sign-in form not from this console (no cookie of its own) is refused.
    let forged = http.post(format!("{base}/admin/sign-in")).form_of(&[("token", ADMIN_TOKEN), ("csrf", "x")]).send();
    let forged = forged.await.unwrap();
    assert!(matches!(forged.status().as_u16(), 403 | 429), "{}", forged.status());
    app.stop().await;
}

#[tokio::test]
async fn without_an_admin_token_the_console_does_not_exist() {
    let app = crate::helpers::spawn_app().await;
    let http = no_redirects();
    for path in ["/admin/", "/admin/sign-in", "/admin/dead-letters", "/admin/job/1", "/admin/console.css"] {
        let answer = http.get(format!("http://{}{path}", app.addr)).send().await.unwrap();
        assert_eq!(answer.status(), StatusCode::NOT_FOUND, "{path}");
    }
    let answer = http.post(format!("http://{}/admin/sign-in", app.addr)).form_of(&[("token", "x")]).send().await;
    assert_eq!(answer.unwrap().status(), StatusCode::NOT_FOUND);
    app.stop().await;
}

/// The console reads the same store calls on Postgres: a dead letter found, retried, delivered.
#[tokio::test]
#[cfg_attr(
    not(postgres_tests),
    ignore = "no PostgreSQL: install postgresql (see README) or set RELAY_TEST_POSTGRES_URL"
)]
async fn the_console_works_on_postgres_too() {
    let url = crate::postgres::fresh_database().await;
    let app = spawn_app_with(&[("RELAY_ADMIN_TOKEN", ADMIN_TOKEN), ("RELAY_DATABASE_URL", &url)]).await;
    let m_id = dead_letter(&app, "on postgres").await;
    let (http, base) = (no_redirects(), format!("http://{}", app.addr));
    let session = signed_in(&http, &base).await;

    let dead = http.get(format!("{base}/admin/dead-letters")).header("cookie", &session).send().await.unwrap();
    let page = dead.text().await.unwrap();
    assert!(page.contains(&m_id), "{page}");
    let id = app.jobs(JobState::Dead).await[0].id;
    let csrf = hidden(&page, "csrf");
    let retried = http
        .post(format!("{base}/admin/job/{id}/retry"))
        .header("cookie", &session)
        .form_of(&[("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(retried.status(), StatusCode::SEE_OTHER);
    app.settle().await;
    let job = http.get(format!("{base}/admin/job/{id}")).header("cookie", &session).send().await.unwrap();
    let page = job.text().await.unwrap();
    assert!(page.contains(r#"<span class="state delivered">delivered</span>"#), "{page}");
    assert_eq!(page.matches(r#"<td class="n">502</td>"#).count(), 4, "{page}");
    let search = http.get(format!("{base}/admin/search?q={m_id}")).header("cookie", &session).send().await.unwrap();
    assert!(search.text().await.unwrap().contains(&format!("/admin/job/{id}")));
    app.stop().await;
}

/// A page of the console as the signed-in operator sees it.
async fn page(http: &reqwest::Client, base: &str, session: &str, path: &str) -> (StatusCode, String) {
    let answer = http.get(format!("{base}{path}")).header("cookie", session).send().await.unwrap();
    (answer.status(), answer.text().await.unwrap())
}

#[tokio::test]
async fn dead_letters_come_fifty_a_page_and_the_next_page_holds_the_rest() {
    let app = spawn_app_with(&[("RELAY_ADMIN_TOKEN", ADMIN_TOKEN), ("RELAY_SEND_WAIT_MS", "0")]).await;
    app.joinchat.script((0..55).map(|_| Reply::status(400, r#"{"success":false,"errors":{"msg":"no"}}"#)));
    for n in 0..55 {
        let (status, _) = app.send(&format!("10668354366910{n:02}"), text(&format!("message {n}"))).await;
        assert_eq!(status, 200);
    }
    app.settle().await;
    let (http, base) = (no_redirects(), format!("http://{}", app.addr));
    let session = signed_in(&http, &base).await;

    let (status, first) = page(&http, &base, &session, "/admin/dead-letters").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(first.matches("<tr><td class=\"n\"><a href=\"/admin/job/").count(), 50);
    assert!(first.contains("Redrive all 55 of default"), "the redrive button counts them all");
    let next = first.split("rel=\"next\" href=\"").nth(1).unwrap().split('"').next().unwrap().replace("&amp;", "&");
    let (_, second) = page(&http, &base, &session, &next).await;
    assert_eq!(second.matches("<tr><td class=\"n\"><a href=\"/admin/job/").count(), 5);
    assert!(!second.contains("rel=\"next\""), "the last page");
    assert!(second.contains(">1</a>"), "the oldest, job 1, is on the last page");
    app.stop().await;
}

#[tokio::test]
async fn an_inbound_job_shows_the_bonychat_post_and_a_delivered_one_cannot_be_retried() {
    let app = spawn_app_with(&[("RELAY_ADMIN_TOKEN", ADMIN_TOKEN)]).await;
    app.bonychat.script([Reply::status(422, r#"{"error":{"message":"contact blocked"}}"#)]);
    let body = crate::helpers::webhook_message(PSID, "m_console_in", "hello from Messenger");
    assert_eq!(app.post_webhook(body).await.status(), 200);
    app.settle().await;
    let dead = app.jobs(JobState::Dead).await;
    assert_eq!(dead.len(), 1);
    let (http, base) = (no_redirects(), format!("http://{}", app.addr));
    let session = signed_in(&http, &base).await;

    let (_, found) = page(&http, &base, &session, "/admin/search?q=m_console_in").await;
    assert!(found.contains(&format!("/admin/job/{}", dead[0].id)), "found by its Messenger mid");
    let (status, job) = page(&http, &base, &session, &format!("/admin/job/{}", dead[0].id)).await;
    assert_eq!(status, StatusCode::OK);
    assert!(job.contains("Messenger mid") && job.contains("BonyChat webhook post"), "{job}");
    assert!(job.contains("&quot;channelId&quot;: &quot;"), "the post BonyChat is sent: {job}");
    assert!(job.contains("<td class=\"n\">422</td>") && job.contains("contact blocked"), "{job}");

    let csrf = hidden(&job, "csrf");
    let retried = http
        .post(format!("{base}/admin/job/{}/retry", dead[0].id))
        .header("cookie", &session)
        .form_of(&[("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(retried.status(), StatusCode::SEE_OTHER);
    app.settle().await;
    let again = http
        .post(format!("{base}/admin/job/{}/retry", dead[0].id))
        .header("cookie", &session)
        .form_of(&[("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), StatusCode::CONFLICT);
    let refused = again.text().await.unwrap();
    assert!(refused.contains("Not retried: job") && refused.contains("was already delivered"), "{refused}");
    let (status, missing) = page(&http, &base, &session, "/admin/job/999999").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(missing.contains("There is no job 999999"));
    app.stop().await;
}
