//! Durable delivery (SPEC §5, §4.4, §6): outages survived in order, receipts, dead letters
//! and their redrive from the admin API and the command line.

use std::collections::BTreeMap;
use std::time::Duration;

use bonychat_relay::store::JobState;
use serde_json::{Value, json};

use crate::helpers::{PAGE_ID, PSID, Reply, TestApp, assert_error, spawn_app, spawn_app_with, text};

const ADMIN_TOKEN: &str = "admin-secret-token";

async fn admin(app: &TestApp, method: reqwest::Method, path: &str, token: Option<&str>) -> (u16, Value) {
    let mut request = app.http.request(method, app.url(path));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// The `message_status` events BonyChat got, as (mId, value), once everything settled.
async fn receipts(app: &TestApp) -> Vec<(String, String)> {
    app.bonychat_posts()
        .await
        .iter()
        .map(|post| &post["events"][0])
        .filter(|event| event["type"] == "message_status")
        .map(|event| (event["mId"].as_str().unwrap().to_owned(), event["status"]["value"].as_str().unwrap().to_owned()))
        .collect()
}

#[tokio::test]
async fn joinchat_down_for_a_while_then_back_gets_everything_delivered_once_in_order_per_contact() {
    let app = spawn_app_with(&[
        ("RELAY_RETRY_JOINCHAT", "50ms,100ms,200ms,300ms,400ms,500ms,500ms,500ms"),
        ("JOINCHAT_ORDER_GAP_SECS", "0"),
    ])
    .await;
    // The first ten requests fail, whoever they are for.
    app.joinchat.script((0..10).map(|_| Reply::status(503, "down for maintenance")));
    let contacts = ["1000000000000001", "1000000000000002", "1000000000000003"];

    // Each contact's messages one after the other, the contacts side by side.
    tokio::join!(send_six(&app, contacts[0]), send_six(&app, contacts[1]), send_six(&app, contacts[2]));
    app.settle().await;

    let accepted: Vec<String> =
        app.joinchat.bodies()[10..].iter().map(|b| b["message"]["text"].as_str().unwrap().to_owned()).collect();
    let mut per_contact: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for text in &accepted {
        per_contact.entry(contacts.iter().find(|c| text.starts_with(*c)).unwrap()).or_default().push(text.clone());
    }
    for contact in contacts {
        let expected: Vec<String> = (1..=6).map(|i| format!("{contact}#{i}")).collect();
        assert_eq!(per_contact[contact], expected, "every message once, in order");
    }
    assert_eq!(app.jobs(JobState::Delivered).await.len(), 18);
    assert!(receipts(&app).await.is_empty(), "nothing failed");
    app.stop().await;
}

async fn send_six(app: &TestApp, contact: &str) {
    for i in 1..=6 {
        let (status, body) = app.send(contact, text(&format!("{contact}#{i}"))).await;
        assert_eq!(status, 200, "{body}");
    }
}

#[tokio::test]
async fn a_dead_letter_is_listed_and_delivered_after_a_redrive() {
    let app = spawn_app_with(&[("RELAY_ADMIN_TOKEN", ADMIN_TOKEN)]).await;
    app.joinchat.script((0..4).map(|_| Reply::status(502, "")));
    let (_, sent) = app.send(PSID, text("Your table is ready")).await;
    let m_id = sent["mId"].as_str().unwrap().to_owned();
    assert_eq!(receipts(&app).await, [(m_id.clone(), "failed".to_owned())]);

    let (status, listed) = admin(&app, reqwest::Method::GET, "/admin/jobs?state=dead", Some(ADMIN_TOKEN)).await;
    assert_eq!(status, 200);
    let dead = listed["jobs"].as_array().unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0]["mId"], m_id.as_str());
    assert_eq!(dead[0]["state"], "dead");
    assert_eq!(dead[0]["attempts"], 4);
    assert_eq!(dead[0]["lastError"], "gave up after 4 attempts: JoinChat answered 502 Bad Gateway");
    assert_eq!(dead[0]["payload"]["messages"][0]["text"], "Your table is ready");

    let (status, redriven) = admin(&app, reqwest::Method::POST, "/admin/dead/redrive", Some(ADMIN_TOKEN)).await;
    app.settle().await;

    assert_eq!((status, redriven), (200, json!({"redriven": 1})));
    assert_eq!(app.joinchat.received().len(), 5, "four failures, then delivered");
    let delivered = app.jobs(JobState::Delivered).await;
    assert!(delivered.iter().any(|j| j.m_id == m_id));
    app.stop().await;
}

#[tokio::test]
async fn one_job_can_be_retried_by_id() {
    let app = spawn_app_with(&[("RELAY_ADMIN_TOKEN", ADMIN_TOKEN)]).await;
    app.bonychat.script([Reply::status(422, r#"{"error":{"message":"contact blocked"}}"#)]);
    let body = json!({"object": "page", "entry": [{"id": PAGE_ID, "time": 1, "messaging": [
        {"sender": {"id": PSID}, "recipient": {"id": PAGE_ID}, "timestamp": 2, "message": {"mid": "m_retry", "text": "hello"}}
    ]}]});
    assert_eq!(app.post_webhook(body.to_string()).await.status(), 200);
    app.settle().await;
    let dead = app.jobs(JobState::Dead).await;
    assert_eq!(dead.len(), 1);

    let (status, retried) =
        admin(&app, reqwest::Method::POST, &format!("/admin/jobs/{}/retry", dead[0].id), Some(ADMIN_TOKEN)).await;
    app.settle().await;

    assert_eq!(status, 200);
    assert_eq!(retried["job"]["state"], "queued");
    assert_eq!(app.bonychat.received().len(), 2);
    assert_eq!(app.jobs(JobState::Delivered).await.len(), 1);
    app.stop().await;
}

/// Without `RELAY_ADMIN_TOKEN` the admin API does not exist: every method on every admin path
/// is the JSON 404 of an unknown path (a 405 would tell the path is there).
#[tokio::test]
async fn every_method_on_every_admin_path_is_404_without_a_token() {
    let app = spawn_app().await;
    let methods = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"];

    let mut answers = Vec::new();
    for path in ["/admin/jobs", "/admin/jobs/1/retry", "/admin/dead/redrive", "/admin", "/admin/anything"] {
        for method in methods {
            let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
            let response = app.http.request(method.clone(), app.url(path)).send().await.unwrap();
            let status = response.status();
            let body = response.text().await.unwrap();
            answers.push((format!("{method} {path}"), status, body));
        }
    }
    app.stop().await;

    for (request, status, body) in answers {
        assert_eq!(status, 404, "{request}: {body}");
        if request.starts_with("HEAD") {
            continue;
        }
        let body: Value = serde_json::from_str(&body).unwrap_or_else(|_| panic!("{request}: {body}"));
        assert_error(status, &body, 404, "not_found");
    }
}

#[tokio::test]
async fn the_admin_api_is_absent_without_a_token_and_guarded_with_one() {
    let without = spawn_app().await;
    let (status, body) = admin(&without, reqwest::Method::GET, "/admin/jobs", None).await;
    assert_error(reqwest::StatusCode::from_u16(status).unwrap(), &body, 404, "not_found");
    let (status, _) = admin(&without, reqwest::Method::POST, "/admin/dead/redrive", Some("anything")).await;
    assert_eq!(status, 404);
    without.stop().await;

    let app = spawn_app_with(&[("RELAY_ADMIN_TOKEN", ADMIN_TOKEN)]).await;
    for token in [None, Some("wrong"), Some(crate::helpers::API_TOKEN)] {
        let (status, body) = admin(&app, reqwest::Method::GET, "/admin/jobs", token).await;
        assert_error(reqwest::StatusCode::from_u16(status).unwrap(), &body, 401, "unauthorized");
    }
    let (status, body) = admin(&app, reqwest::Method::GET, "/admin/jobs?state=lost", Some(ADMIN_TOKEN)).await;
    let message = assert_error(reqwest::StatusCode::from_u16(status).unwrap(), &body, 400, "invalid_request");
    assert_eq!(message, "state: must be one of queued, delivered, dead, rejected, dropped");
    let (status, body) = admin(&app, reqwest::Method::POST, "/admin/jobs/424242/retry", Some(ADMIN_TOKEN)).await;
    assert_error(reqwest::StatusCode::from_u16(status).unwrap(), &body, 404, "not_found");
    app.send(PSID, text("delivered")).await;
    app.settle().await;
    let delivered = app.jobs(JobState::Delivered).await[0].id;
    let (status, body) =
        admin(&app, reqwest::Method::POST, &format!("/admin/jobs/{delivered}/retry"), Some(ADMIN_TOKEN)).await;
    assert_error(reqwest::StatusCode::from_u16(status).unwrap(), &body, 409, "conflict");
    let (status, listed) = admin(&app, reqwest::Method::GET, "/admin/jobs?limit=5", Some(ADMIN_TOKEN)).await;
    assert_eq!(status, 200);
    assert_eq!(listed["jobs"].as_array().unwrap().len(), 1);
    app.stop().await;
}

#[tokio::test]
async fn delivery_and_read_watermarks_become_receipts_each_reported_once() {
    let app = spawn_app().await;
    let (_, first) = app.send(PSID, text("first")).await;
    app.settle().await;
    let between = bonychat_relay::store::now_millis();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let (_, second) = app.send(PSID, text("second")).await;
    app.settle().await;
    let watermark = |kind: &str, watermark: i64| {
        json!({"object": "page", "entry": [{"id": PAGE_ID, "time": 5, "messaging": [
            {"sender": {"id": PSID}, "recipient": {"id": PAGE_ID}, "timestamp": 1_700_000_000_000_i64, kind: {"watermark": watermark}}
        ]}]})
        .to_string()
    };
    let now = || bonychat_relay::store::now_millis();

    app.post_webhook(watermark("delivery", between)).await;
    app.post_webhook(watermark("delivery", between)).await;
    app.post_webhook(watermark("delivery", now())).await;
    app.post_webhook(watermark("read", now())).await;
    app.post_webhook(watermark("read", now())).await;
    app.post_webhook(watermark("delivery", now())).await;

    let (first, second) = (first["mId"].as_str().unwrap().to_owned(), second["mId"].as_str().unwrap().to_owned());
    assert_eq!(
        receipts(&app).await,
        [
            (first.clone(), "delivered".to_owned()),
            (second.clone(), "delivered".to_owned()),
            (first, "read".to_owned()),
            (second, "read".to_owned()),
        ]
    );
    let receipt = app.bonychat.bodies().remove(0);
    assert_eq!(receipt["contactId"], PSID);
    assert_eq!(receipt["events"][0]["timestamp"], 1_700_000_000_000_i64);
    assert!(receipt["events"][0]["status"].get("message").is_none());
    app.stop().await;
}

/// Meta can report a message delivered before JoinChat has answered the relay: the receipt
/// follows once JoinChat accepts the message (SPEC §4.3).
#[tokio::test]
async fn a_delivery_watermark_that_comes_before_joinchat_answers_is_reported_once_it_does() {
    let app = spawn_app().await;
    app.joinchat.script([Reply::ok().after(Duration::from_millis(800))]);
    let left = bonychat_relay::store::now_millis();
    let message = app.send(PSID, text("answered slowly"));
    let watermark = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let body = json!({"object": "page", "entry": [{"id": PAGE_ID, "time": 5, "messaging": [
            {"sender": {"id": PSID}, "recipient": {"id": PAGE_ID}, "timestamp": 1_700_000_000_000_i64,
             "delivery": {"watermark": left + 300}}
        ]}]});
        let response = app.post_webhook(body.to_string()).await;
        assert_eq!(response.status(), 200);
        tokio::time::Instant::now()
    };
    let ((status, sent), watermark_stored) = tokio::join!(message, watermark);
    assert_eq!(status, 200);
    let request_left = app.joinchat.received()[0].at;
    assert!(watermark_stored < request_left + Duration::from_millis(800), "JoinChat had not answered yet");
    app.settle().await;

    assert_eq!(receipts(&app).await, [(sent["mId"].as_str().unwrap().to_owned(), "delivered".to_owned())]);
    app.stop().await;
}

#[tokio::test]
async fn the_echo_of_a_send_is_recognised_across_a_restart() {
    let app = spawn_app().await;
    app.send(PSID, text("Sent before the restart")).await;
    app.settle().await;

    let app = app.restart().await;
    let echo = json!({"object": "page", "entry": [{"id": PAGE_ID, "time": 1, "messaging": [
        {"sender": {"id": PAGE_ID}, "recipient": {"id": PSID}, "timestamp": 2, "message": {"is_echo": true, "mid": "m_echo", "text": "Sent before the restart"}}
    ]}]});
    let answer: Value = app.post_webhook(echo.to_string()).await.json().await.unwrap();
    app.settle().await;

    assert_eq!(answer["own_echoes"], 1);
    assert!(app.bonychat.received().is_empty());
    app.stop().await;
}

#[tokio::test]
async fn queued_messages_survive_a_shutdown_and_go_out_after_the_next_start() {
    let app = spawn_app_with(&[("RELAY_RETRY_JOINCHAT", "10s"), ("JOINCHAT_ORDER_GAP_SECS", "0")]).await;
    app.joinchat.script([Reply::status(503, "")]);
    app.send(PSID, text("one")).await;
    app.send(PSID, text("two")).await;
    assert_eq!(app.jobs(JobState::Queued).await.len(), 2);

    let app = app.restart().await;
    app.store.retry(app.jobs(JobState::Queued).await[0].id, bonychat_relay::store::now_millis()).await.unwrap();
    app.settle().await;

    let texts: Vec<String> =
        app.joinchat.bodies().iter().map(|b| b["message"]["text"].as_str().unwrap().to_owned()).collect();
    assert_eq!(texts, ["one", "one", "two"]);
    app.stop().await;
}

#[tokio::test]
async fn readiness_follows_the_store() {
    let app = spawn_app().await;

    let ready = app.http.get(app.url("/readyz")).send().await.unwrap();

    assert_eq!(ready.status(), 200);
    app.stop().await;
}

mod command_line {
    use super::*;

    async fn jobs(app: &TestApp, args: &[&str]) -> (i32, String, String) {
        let store_only: Vec<(String, String)> =
            app.vars.iter().filter(|(k, _)| k == "RELAY_DATABASE_URL").cloned().collect();
        let args: Vec<&str> = ["jobs"].into_iter().chain(args.iter().copied()).collect();
        let (code, stdout, stderr) = crate::binary::run_binary(&store_only, &args).await;
        (code.expect("exits"), stdout, stderr)
    }

    #[tokio::test]
    async fn dead_letters_are_listed_and_redriven_from_the_command_line_while_the_relay_runs() {
        let app = spawn_app().await;
        app.joinchat.script((0..4).map(|_| Reply::status(500, "")));
        let (_, sent) = app.send(PSID, text("via the CLI")).await;
        app.settle().await;

        let (code, listed, _) = jobs(&app, &["list", "--state", "dead", "--json"]).await;
        assert_eq!(code, 0);
        let lines: Vec<Value> = listed.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0]["mId"], sent["mId"]);

        let (code, table, _) = jobs(&app, &["list"]).await;
        assert_eq!(code, 0);
        let header = table.lines().next().unwrap();
        assert!(header.contains("state") && header.contains("channel"), "{header}");
        assert!(table.lines().nth(1).unwrap().contains(" default "), "{table}");
        assert!(table.contains("dead"));
        let (_, of_another_channel, _) = jobs(&app, &["list", "--channel", "shoes", "--json"]).await;
        assert_eq!(of_another_channel, "");
        let (code, _, refused) = jobs(&app, &["list", "--channel", "Shoes"]).await;
        assert_eq!(code, 2, "a name no channel can have: {refused}");

        let (code, said, _) = jobs(&app, &["redrive", "--channel", "shoes"]).await;
        assert_eq!((code, said.trim()), (0, "0 dead job(s) queued again"));
        let (code, said, _) = jobs(&app, &["redrive", "--channel", "default"]).await;
        assert_eq!((code, said.trim()), (0, "1 dead job(s) queued again"));
        app.settle().await;
        assert_eq!(app.joinchat.received().len(), 5);
        assert!(app.jobs(JobState::Dead).await.is_empty());
        app.stop().await;
    }

    /// `--limit 0` listed nothing and said nothing; past the admin API's 1000 it would read
    /// the whole store. Both are refused by the argument parser before the store is opened.
    #[tokio::test]
    async fn jobs_list_takes_a_limit_of_1_to_1000_only() {
        let data = tempfile::tempdir().unwrap();
        let vars = vec![("RELAY_DATABASE_URL".to_owned(), format!("sqlite://{}/none.db", data.path().display()))];

        let mut refused = Vec::new();
        for limit in ["0", "1001"] {
            refused.push((limit, crate::binary::run_binary(&vars, &["jobs", "list", "--limit", limit]).await));
        }
        let (accepted, _, past_parsing) = crate::binary::run_binary(&vars, &["jobs", "list", "--limit", "1000"]).await;

        for (limit, (code, _, stderr)) in refused {
            assert_eq!(code, Some(2), "--limit {limit}: {stderr}");
            assert!(stderr.contains(&format!("invalid value '{limit}' for '--limit <LIMIT>'")), "{stderr}");
            assert!(stderr.contains("1..=1000"), "the allowed range is named: {stderr}");
        }
        assert_eq!(accepted, Some(1), "1000 is a limit; then no store is found: {past_parsing}");
        assert!(past_parsing.contains("no store at"), "{past_parsing}");
    }

    #[tokio::test]
    async fn one_job_is_retried_from_the_command_line_and_unknown_ones_are_reported() {
        let app = spawn_app().await;
        app.joinchat.script((0..4).map(|_| Reply::status(500, "")));
        app.send(PSID, text("retry me")).await;
        app.settle().await;
        let dead = app.jobs(JobState::Dead).await[0].id;

        let (code, said, _) = jobs(&app, &["retry", &dead.to_string()]).await;
        let (missing_code, _, missing) = jobs(&app, &["retry", "987654"]).await;
        app.settle().await;

        assert_eq!(code, 0, "{said}");
        assert!(said.starts_with(&format!("job {dead} queued again")), "{said}");
        assert_eq!(missing_code, 1);
        assert!(missing.contains("no job 987654"), "{missing}");
        let delivered = app.jobs(JobState::Delivered).await;
        assert!(delivered.iter().any(|job| job.id == dead), "the retried job went out");
        app.stop().await;
    }
}

/// What an operator reads right after a 200 is the truth: the message is delivered, not still
/// queued or in flight (the 200 comes once its outcome is committed).
#[tokio::test]
async fn an_admin_read_right_after_a_200_shows_the_message_delivered() {
    let app = spawn_app_with(&[("RELAY_ADMIN_TOKEN", ADMIN_TOKEN), ("JOINCHAT_ORDER_GAP_SECS", "0")]).await;
    for n in 0..40 {
        let (status, sent) = app.send(PSID, text(&format!("message {n}"))).await;
        assert_eq!(status, 200);
        let m_id = sent["mId"].as_str().unwrap();
        let path = "/admin/jobs?state=delivered&limit=1";
        let (status, listed) = admin(&app, reqwest::Method::GET, path, Some(ADMIN_TOKEN)).await;
        assert_eq!(status, 200);
        assert_eq!(listed["jobs"][0]["mId"], m_id, "message {n}: {listed}");
        assert_eq!(listed["jobs"][0]["inFlight"], false, "message {n}");
    }
    app.stop().await;
}
