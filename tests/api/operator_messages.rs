//! What the operator reads when something fails says what to do: the start line, upstream
//! refusals, webhook signatures, a database that refuses connections, TLS spoken to plain HTTP.
//! Read as the operator reads them: the compiled binary's log lines and its stderr.

use crate::binary::{RelayProcess, json_logs};
use crate::first_day::lines_with;
use crate::helpers::{set, test_vars};

#[tokio::test]
async fn the_start_line_says_the_version_and_which_store_it_opened() {
    let data = tempfile::tempdir().unwrap();
    let mut vars = test_vars("http://127.0.0.1:9/api/send_message", data.path());
    json_logs(&mut vars);

    let relay = RelayProcess::start(&vars, &[]).await;
    let (_, output) = relay.terminate().await;

    let listening = lines_with(&output, "relay listening");
    assert_eq!(listening.len(), 1, "{output:?}");
    assert_eq!(listening[0]["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(listening[0]["store"], format!("sqlite://{}/relay.db", data.path().display()));
}

#[tokio::test]
#[cfg_attr(
    not(postgres_tests),
    ignore = "no PostgreSQL: install postgresql (see README) or set RELAY_TEST_POSTGRES_URL"
)]
async fn the_start_line_shows_a_postgres_store_without_its_password() {
    let url = crate::postgres::fresh_database().await;
    let mut parsed = url::Url::parse(&url).unwrap();
    parsed.set_password(Some("pa55word-not-shown")).unwrap();
    let data = tempfile::tempdir().unwrap();
    let mut vars = test_vars("http://127.0.0.1:9/api/send_message", data.path());
    set(&mut vars, "RELAY_DATABASE_URL", &format!("{parsed}?sslmode=disable&application_name=x"));
    json_logs(&mut vars);

    let relay = RelayProcess::start(&vars, &[]).await;
    let (_, output) = relay.terminate().await;

    let listening = lines_with(&output, "relay listening");
    let mut expected = url::Url::parse(&url).unwrap();
    expected.set_query(Some("sslmode=disable&application_name=x"));
    assert_eq!(listening[0]["store"], expected.as_str(), "{output:?}");
    assert!(!output.join("\n").contains("pa55word-not-shown"), "{output:?}");
}

/// Waits until the relay has written `count` log lines with `message`, at most 20 s.
async fn wait_for_lines(relay: &RelayProcess, message: &str, count: usize) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    while lines_with(&relay.output(), message).len() < count {
        assert!(tokio::time::Instant::now() < deadline, "no {message:?} line: {:?}", relay.output());
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Each upstream refuses what the relay sends it (a JoinChat key, a BonyChat token, a Page
/// token that are not the ones they take): each refusal is logged naming the upstream, the URL
/// it went to with its credentials hidden (userinfo, and query parameters such as
/// `access_token`), and the status it answered with. No credential appears in the logs.
#[tokio::test]
async fn each_upstream_refusal_is_logged_with_the_upstream_its_url_without_credentials_and_the_status() {
    use crate::helpers::{
        API_TOKEN, APP_SECRET, CHANNEL_ID, PAGE_TOKEN, PSID, StandIn, hub_signature, webhook_message,
    };
    let joinchat = StandIn::joinchat("the-key-joinchat-takes").await;
    let bonychat = StandIn::bonychat("the-token-bonychat-takes").await;
    let graph = StandIn::graph(PAGE_TOKEN).await;
    // The URLs as an operator may write them: a proxy's credentials, a key in the query.
    let with_credentials = |url: &str, query: &str| url.replacen("http://", "http://proxy-user:proxy-pa55@", 1) + query;
    let joinchat_url = with_credentials(&joinchat.url, "?api_key=query-s3cret&region=eu");
    let bonychat_url = with_credentials(&bonychat.url, "?token=hook-s3cret");
    let data = tempfile::tempdir().unwrap();
    let mut vars = test_vars(&joinchat_url, data.path());
    set(&mut vars, "BONYCHAT_WEBHOOK_URL", &bonychat_url);
    set(&mut vars, "MESSENGER_GRAPH_URL", &graph.url);
    set(&mut vars, "MESSENGER_PAGE_ACCESS_TOKEN", "not-the-page-token");
    set(&mut vars, "MESSENGER_GRAPH_TIMEOUT_MS", "2000");
    json_logs(&mut vars);
    let relay = RelayProcess::start(&vars, &[]).await;
    let http = crate::helpers::http_client();

    let message = http
        .post(relay.url("/message"))
        .bearer_auth(API_TOKEN)
        .json(
            &serde_json::json!({"channelId": CHANNEL_ID, "contactId": PSID, "message": {"type": "text", "text": "hi"}}),
        )
        .send()
        .await
        .unwrap();
    let body = webhook_message(PSID, "mid.refused", "hello");
    let webhook = http
        .post(relay.url("/webhooks/messenger"))
        .header("content-type", "application/json")
        .header("x-hub-signature-256", hub_signature(APP_SECRET, &body))
        .body(body)
        .send()
        .await
        .unwrap();
    bonychat.wait_for(1).await;
    wait_for_lines(&relay, "job attempt", 2).await;
    let (_, output) = relay.terminate().await;

    assert_eq!(message.status(), 400, "JoinChat refused the message");
    assert_eq!(webhook.status(), 200);
    let attempts = lines_with(&output, "job attempt");
    let attempt_of = |direction: &str| {
        attempts.iter().find(|line| line["direction"] == direction).unwrap_or_else(|| panic!("{output:?}")).clone()
    };
    let joinchat_port = url::Url::parse(&joinchat.url).unwrap().port().unwrap();
    let outbound = attempt_of("outbound");
    assert_eq!(outbound["level"], "WARN");
    assert_eq!(outbound["outcome"], "rejected");
    assert_eq!(outbound["upstream"], "JoinChat");
    assert_eq!(
        outbound["url"],
        format!("http://***@127.0.0.1:{joinchat_port}/api/send_message?api_key=[redacted]&region=eu")
    );
    assert_eq!(outbound["status"], 401);
    assert_eq!(outbound["reason"], "signature mismatch");

    let bonychat_port = url::Url::parse(&bonychat.url).unwrap().port().unwrap();
    let inbound = attempt_of("inbound");
    assert_eq!(inbound["outcome"], "rejected");
    assert_eq!(inbound["upstream"], "BonyChat");
    assert_eq!(
        inbound["url"],
        format!("http://***@127.0.0.1:{bonychat_port}/custom/channel/webhook/?token=[redacted]")
    );
    assert_eq!(inbound["status"], 401);

    let graph_port = url::Url::parse(&graph.url).unwrap().port().unwrap();
    let lookup = lines_with(&output, "profile look-up failed");
    assert_eq!(lookup.len(), 1, "{output:?}");
    assert_eq!(lookup[0]["level"], "WARN");
    assert_eq!(lookup[0]["upstream"], "Graph API");
    assert_eq!(
        lookup[0]["url"],
        format!(
            "http://127.0.0.1:{graph_port}/v21.0/{PSID}?fields=first_name%2Clast_name%2Cprofile_pic%2Clocale%2Ctimezone&access_token=[redacted]"
        )
    );
    assert_eq!(lookup[0]["status"], 400);
    assert!(lookup[0]["reason"].as_str().unwrap().contains("Invalid OAuth access token"), "{:?}", lookup[0]);

    let all = output.join("\n");
    for secret in ["proxy-pa55", "query-s3cret", "hook-s3cret", "not-the-page-token", API_TOKEN] {
        assert!(!all.contains(secret), "{secret} appears in the logs");
    }
}

/// An `https://` URL pointed at a plain HTTP server (the port of a plain listener, or a scheme
/// typed by habit): the attempt's error says so, and what to do, instead of rustls's "received
/// corrupt message of type InvalidContentType". What `jobs list` shows as `lastError`.
#[tokio::test]
async fn an_https_url_at_a_plain_http_server_says_so_and_what_to_do() {
    use crate::helpers::{JOINCHAT_SECRET, PSID, StandIn, spawn_app_with, text, webhook_message};
    use bonychat_relay::store::{Direction, JobState};
    let joinchat = StandIn::joinchat(JOINCHAT_SECRET).await;
    let bonychat = StandIn::bonychat(crate::helpers::API_TOKEN).await;
    let joinchat_https = joinchat.url.replacen("http://", "https://", 1) + "?access_token=t0ken";
    let bonychat_https = bonychat.url.replacen("http://", "https://", 1);
    let app = spawn_app_with(&[
        ("JOINCHAT_API_URL", &joinchat_https),
        ("BONYCHAT_WEBHOOK_URL", &bonychat_https),
        ("RELAY_SEND_WAIT_MS", "500"),
        ("RELAY_RETRY_JOINCHAT", "1h"),
        ("RELAY_RETRY_BONYCHAT", "1h"),
    ])
    .await;

    let (status, _) = app.send(PSID, text("over TLS?")).await;
    let webhook = app.post_webhook(webhook_message(PSID, "mid.tls", "over TLS?")).await;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    let failed = loop {
        let queued = app.jobs(JobState::Queued).await;
        if queued.len() == 2 && queued.iter().all(|job| job.last_error.is_some()) {
            break queued;
        }
        assert!(tokio::time::Instant::now() < deadline, "{queued:?}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };

    assert_eq!(status, 200, "queued, retried later");
    assert_eq!(webhook.status(), 200);
    let error_of = |direction: Direction| {
        failed.iter().find(|job| job.direction == direction).and_then(|job| job.last_error.clone()).unwrap()
    };
    let joinchat_shown = joinchat_https.replace("t0ken", "[redacted]");
    assert_eq!(
        error_of(Direction::Outbound),
        format!("JoinChat at {joinchat_shown} speaks plain HTTP, not TLS: use http:// or fix the port")
    );
    assert_eq!(
        error_of(Direction::Inbound),
        format!("BonyChat at {bonychat_https} speaks plain HTTP, not TLS: use http:// or fix the port")
    );
    assert!(joinchat.received().is_empty() && bonychat.received().is_empty(), "no request was understood");
    app.stop().await;
}

/// A webhook refused for its signature is a warning saying which check failed and what usually
/// causes it; so is a webhook for an app the relay does not serve, and a subscription handshake
/// with another verify token. The caller's answers stay as they were.
#[tokio::test]
async fn a_webhook_refused_for_its_signature_is_a_warning_saying_which_check_failed() {
    use crate::helpers::{APP_SECRET, PSID, hub_signature, webhook_message};
    let data = tempfile::tempdir().unwrap();
    let mut vars = test_vars("http://127.0.0.1:9/api/send_message", data.path());
    set(&mut vars, "MESSENGER_APP_SECRET_PREVIOUS", "the-app-secret-before");
    json_logs(&mut vars);
    let relay = RelayProcess::start(&vars, &[]).await;
    let http = crate::helpers::http_client();
    let body = webhook_message(PSID, "mid.signed", "hello");
    let post = |path: &str, signature: Option<String>| {
        let mut request = http.post(relay.url(path)).header("content-type", "application/json").body(body.clone());
        if let Some(signature) = signature {
            request = request.header("x-hub-signature-256", signature);
        }
        request.send()
    };

    let answers = [
        post("/webhooks/messenger", None).await.unwrap().status(),
        post("/webhooks/messenger", Some("sha1=da611bd448dc12acdf0cd3ab33fdb3adaee26145".into()))
            .await
            .unwrap()
            .status(),
        post("/webhooks/messenger", Some("sha256=not-hex".into())).await.unwrap().status(),
        post("/webhooks/messenger", Some(hub_signature("another-app-s-secret", &body))).await.unwrap().status(),
        post("/webhooks/messenger/nope", Some(hub_signature(APP_SECRET, &body))).await.unwrap().status(),
        http.get(relay.url("/webhooks/messenger?hub.mode=subscribe&hub.verify_token=guess&hub.challenge=1"))
            .send()
            .await
            .unwrap()
            .status(),
    ];
    let signed = post("/webhooks/messenger", Some(hub_signature(APP_SECRET, &body))).await.unwrap().status();
    let (_, output) = relay.terminate().await;

    assert_eq!(answers.map(|status| status.as_u16()), [401, 401, 401, 401, 404, 403]);
    assert_eq!(signed, 200);
    let refusals: Vec<serde_json::Value> = lines_with(&output, "request")
        .into_iter()
        .filter(|line| line["route"].as_str().is_some_and(|route| route.starts_with("/webhooks/messenger")))
        .filter(|line| line["status"] != 200)
        .collect();
    assert_eq!(refusals.len(), 6, "{output:?}");
    let expected = [
        "webhook refused for app default (missing signature): X-Hub-Signature-256 is missing: Meta signs every post",
        "webhook refused for app default (wrong_algorithm signature): X-Hub-Signature-256 is not a sha256= signature",
        "webhook refused for app default (malformed signature): X-Hub-Signature-256 is not `sha256=` and 64 hex digits",
        "webhook refused for app default (mismatch signature): X-Hub-Signature-256 does not match the body: not signed \
         with MESSENGER_APP_SECRET (nor with MESSENGER_APP_SECRET_PREVIOUS): set it to the App Secret",
        "webhook for app nope, which this relay does not serve: the callback URL in the Meta app's Webhooks settings \
         must be one of /webhooks/messenger",
        "webhook subscription refused for app default: hub.verify_token is not MESSENGER_VERIFY_TOKEN",
    ];
    for (line, expected) in refusals.iter().zip(expected) {
        assert_eq!(line["level"], "WARN", "{line}");
        let reason = line["reason"].as_str().unwrap_or_else(|| panic!("a reason: {line}"));
        assert!(reason.starts_with(expected), "{reason:?} does not start with {expected:?}");
    }
    let all = output.join("\n");
    for secret in [APP_SECRET, "the-app-secret-before", "guess"] {
        assert!(!all.contains(secret), "{secret} appears in the logs");
    }
}

/// The start's one line on stderr, when the database refuses: the database's (or the
/// network's) own reason, never sqlx's "pool timed out", never the password.
async fn start_refused_by_database(url: &str) -> String {
    let data = tempfile::tempdir().unwrap();
    let mut vars = test_vars("http://127.0.0.1:9/api/send_message", data.path());
    set(&mut vars, "RELAY_DATABASE_URL", url);
    set(&mut vars, "RELAY_DATABASE_CONNECT_TIMEOUT_MS", "1000");
    let (code, _, stderr) = crate::binary::run_binary(&vars, &[]).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("bonychat-relay: cannot start: RELAY_DATABASE_URL: "), "{stderr}");
    assert!(!stderr.contains("pool timed out"), "{stderr}");
    assert!(!stderr.contains("pa55"), "the password is not shown: {stderr}");
    stderr
}

#[tokio::test]
async fn a_database_nobody_listens_for_stops_the_start_saying_the_connection_was_refused() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();

    let stderr = start_refused_by_database(&format!("postgres://relay:pa55word@127.0.0.1:{port}/relay")).await;

    let expected = format!("cannot connect to the database relay at 127.0.0.1:{port} as relay: Connection refused");
    assert!(stderr.contains(&expected), "{stderr}");
}

#[tokio::test]
#[cfg_attr(
    not(postgres_tests),
    ignore = "no PostgreSQL: install postgresql (see README) or set RELAY_TEST_POSTGRES_URL"
)]
async fn a_database_that_does_not_exist_stops_the_start_saying_so() {
    let mut url = url::Url::parse(&crate::postgres::fresh_database().await).unwrap();
    url.set_path("/relay_no_such_database");
    url.set_password(Some("pa55word")).unwrap();

    let stderr = start_refused_by_database(url.as_str()).await;

    assert!(stderr.contains(r#"database "relay_no_such_database" does not exist"#), "{stderr}");
}

#[tokio::test]
#[cfg_attr(
    not(postgres_clusters),
    ignore = "no PostgreSQL binaries (initdb, pg_ctl) for a cluster of its own: install postgresql (see README)"
)]
async fn a_wrong_database_password_stops_the_start_saying_so() {
    let postgres = crate::postgres::DedicatedPostgres::start().await;
    postgres.require_password("relay_pw", "right-pa55").await;
    let mut url = url::Url::parse(&postgres.url("postgres")).unwrap();
    url.set_username("relay_pw").unwrap();
    url.set_password(Some("wrong-pa55")).unwrap();

    let stderr = start_refused_by_database(url.as_str()).await;

    assert!(stderr.contains(r#"password authentication failed for user "relay_pw""#), "{stderr}");
}

/// The database goes away under a running relay: the 503 answers' log lines and readiness's
/// say why (the connection is refused), not "pool timed out".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(postgres_clusters),
    ignore = "no PostgreSQL binaries (initdb, pg_ctl) for a cluster of its own: install postgresql (see README)"
)]
async fn a_database_gone_at_runtime_is_logged_with_its_reason_on_503s_and_readiness() {
    use crate::helpers::{API_TOKEN, CHANNEL_ID, PSID};
    let postgres = crate::postgres::DedicatedPostgres::start().await;
    let url = postgres.fresh_database().await;
    let data = tempfile::tempdir().unwrap();
    let mut vars = test_vars("http://127.0.0.1:9/api/send_message", data.path());
    set(&mut vars, "RELAY_DATABASE_URL", &url);
    set(&mut vars, "RELAY_DATABASE_CONNECT_TIMEOUT_MS", "500");
    set(&mut vars, "RELAY_DATABASE_STATEMENT_TIMEOUT_MS", "1000");
    json_logs(&mut vars);
    let relay = RelayProcess::start(&vars, &[]).await;
    let http = crate::helpers::http_client();
    let port = url::Url::parse(&url).unwrap().port().unwrap();
    let refused = format!("at 127.0.0.1:{port} as relay: Connection refused");

    postgres.stop().await;
    // The pool's connections the stop cut fail once each, with their own error; then the pool
    // has none, and asks the database for one.
    let mut statuses = Vec::new();
    for n in 0..15 {
        let message = http
            .post(relay.url("/message"))
            .bearer_auth(API_TOKEN)
            .json(&serde_json::json!({"channelId": CHANNEL_ID, "contactId": PSID, "message": {"type": "text", "text": format!("away {n}")}}))
            .send()
            .await
            .unwrap();
        let ready = http.get(relay.url("/readyz")).send().await.unwrap();
        statuses.push((message.status().as_u16(), ready.status().as_u16()));
        let output = relay.output();
        let said = |message: &str, field: &str| {
            lines_with(&output, message).iter().any(|line| line[field].as_str().is_some_and(|r| r.contains(&refused)))
        };
        if said("request", "reason") && said("store not answering", "error") {
            break;
        }
    }
    let (_, output) = relay.terminate().await;

    assert!(statuses.iter().all(|(message, ready)| (*message, *ready) == (503, 503)), "{statuses:?}");
    let requests: Vec<serde_json::Value> = lines_with(&output, "request")
        .into_iter()
        .filter(|line| line["route"] == "/message" && line["status"] == 503)
        .collect();
    let request = requests.iter().find(|line| line["reason"].as_str().is_some_and(|r| r.contains(&refused)));
    let request = request.unwrap_or_else(|| panic!("no 503 line says the connection was refused: {requests:?}"));
    assert_eq!(request["level"], "WARN");
    assert!(
        request["reason"].as_str().unwrap().starts_with("the store failed: cannot connect to the database relay_test_"),
        "{request}"
    );
    let readiness = lines_with(&output, "store not answering");
    assert!(
        readiness.iter().any(|line| line["error"].as_str().is_some_and(|e| e.contains(&refused))),
        "readiness says why: {readiness:?}"
    );
    let warnings =
        output.iter().filter(|line| line.contains(r#""level":"WARN""#) || line.contains(r#""level":"ERROR""#));
    for line in warnings {
        assert!(!line.contains("pool timed out"), "{line}");
    }
}
