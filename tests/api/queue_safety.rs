//! What keeps the queue moving and bounded (SPEC §5): a bad row never stalls it, intake is
//! capped per direction, one direction never takes the other's capacity, pacing never holds a
//! worker, and operators can only replay what makes sense to replay.

use std::time::Duration;

use bonychat_relay::store::JobState;
use serde_json::{Value, json};

use crate::helpers::{
    API_TOKEN, CHANNEL_ID, PAGE_ID, PSID, Reply, TestApp, assert_error, spawn_app_with, text, webhook_message,
};

const ADMIN_TOKEN: &str = "admin-secret-token";

async fn admin(app: &TestApp, method: reqwest::Method, path: &str) -> (u16, Value) {
    let response = app.http.request(method, app.url(path)).bearer_auth(ADMIN_TOKEN).send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

fn open_database(app: &TestApp) -> rusqlite::Connection {
    let conn = rusqlite::Connection::open(app.data_dir.path().join("relay.db")).unwrap();
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    conn
}

#[tokio::test]
async fn a_job_whose_stored_payload_cannot_be_read_is_dead_lettered_and_the_queue_goes_on() {
    let app = spawn_app_with(&[("RELAY_ADMIN_TOKEN", ADMIN_TOKEN), ("RELAY_RETRY_JOINCHAT", "30s")]).await;
    app.joinchat.script([Reply::status(502, "")]);
    let (status, sent) = app.send(PSID, text("first")).await;
    assert_eq!(status, 200, "a transient failure: still accepted");
    let m_id = sent["mId"].as_str().unwrap().to_owned();

    // What a release with an incompatible format, or a damaged row, leaves behind.
    let changed = open_database(&app)
        .execute("UPDATE jobs SET payload = '{\"v\":7,\"kind\":\"send\"}' WHERE m_id = ?1", [&m_id])
        .unwrap();
    assert_eq!(changed, 1);
    let (status, body) = admin(&app, reqwest::Method::GET, "/admin/jobs?state=queued").await;
    assert_eq!(status, 200, "the admin list still works: {body}");
    assert_eq!(body["jobs"][0]["payload"], Value::Null);
    assert!(body["jobs"][0]["payloadError"].as_str().unwrap().contains("version 7"), "{body}");

    let job_id = body["jobs"][0]["id"].as_i64().unwrap();
    let (status, _) = admin(&app, reqwest::Method::POST, &format!("/admin/jobs/{job_id}/retry")).await;
    assert_eq!(status, 200);
    let (status, _) = app.send(PSID, text("second")).await;
    assert_eq!(status, 200);
    let (status, _) = app.send("other_contact", text("elsewhere")).await;
    assert_eq!(status, 200);
    app.settle().await;

    let dead = app.jobs(JobState::Dead).await;
    assert_eq!(dead.len(), 1);
    assert!(dead[0].last_error.as_deref().unwrap().contains("unreadable payload"), "{:?}", dead[0].last_error);
    let texts: Vec<String> =
        app.joinchat.bodies()[1..].iter().map(|b| b["message"]["text"].as_str().unwrap().to_owned()).collect();
    assert_eq!(texts.len(), 2);
    assert!(texts.contains(&"second".to_owned()) && texts.contains(&"elsewhere".to_owned()));
    let failed: Vec<Value> = app
        .bonychat_posts()
        .await
        .into_iter()
        .map(|post| post["events"][0].clone())
        .filter(|event| event["type"] == "message_status")
        .collect();
    assert_eq!(failed.len(), 1, "BonyChat is told the message failed");
    assert_eq!(failed[0]["mId"], m_id.as_str());
    assert_eq!(failed[0]["status"]["value"], "failed");
}

#[tokio::test]
async fn new_messages_past_the_outbound_cap_get_503_and_are_not_stored() {
    let app = spawn_app_with(&[("RELAY_MAX_QUEUED_OUTBOUND", "2"), ("RELAY_RETRY_JOINCHAT", "30s")]).await;
    app.joinchat.script((0..2).map(|_| Reply::status(502, "")));
    for contact in ["a", "b"] {
        let (status, _) = app.send(contact, text(contact)).await;
        assert_eq!(status, 200);
    }

    let (status, body) = app.send("c", text("c")).await;

    let message = assert_error(status, &body, 503, "queue_full");
    assert!(message.contains("outbound queue of channel default is full"), "{message}");
    assert_eq!(app.jobs(JobState::Queued).await.len(), 2, "nothing stored for the refused message");
}

#[tokio::test]
async fn a_contact_past_its_own_cap_gets_503_while_other_contacts_are_served() {
    let app = spawn_app_with(&[("RELAY_MAX_QUEUED_PER_CONTACT", "2"), ("RELAY_RETRY_JOINCHAT", "30s")]).await;
    app.joinchat.script((0..1).map(|_| Reply::status(502, "")));
    for i in 0..2 {
        let (status, _) = app.send("flooding", text(&format!("flood {i}"))).await;
        assert_eq!(status, 200);
    }

    let (status, body) = app.send("flooding", text("flood 2")).await;
    let (other, _) = app.send("quiet", text("hello")).await;

    let message = assert_error(status, &body, 503, "queue_full");
    assert!(message.contains("this contact already has 2 messages waiting"), "{message}");
    assert_eq!(other, 200, "another contact is served");
    let stored: Vec<String> = app.jobs(JobState::Queued).await.into_iter().map(|job| job.contact).collect();
    assert!(stored.iter().all(|contact| contact == "flooding"), "{stored:?}");
    assert_eq!(stored.len(), 2, "nothing stored for the refused message");
}

#[tokio::test]
async fn a_webhook_past_the_inbound_cap_gets_503_and_none_of_its_events_are_stored() {
    let app = spawn_app_with(&[("RELAY_MAX_QUEUED_INBOUND", "2"), ("RELAY_RETRY_BONYCHAT", "30s")]).await;
    app.bonychat.script((0..2).map(|_| Reply::status(502, "")));
    for i in 0..2 {
        let response = app.post_webhook(webhook_message(&format!("user{i}"), &format!("m.{i}"), "hi")).await;
        assert_eq!(response.status(), 200);
    }

    let response = app.post_webhook(webhook_message("user9", "m.9", "one too many")).await;

    let status = response.status();
    assert_eq!(response.headers()["retry-after"], "5", "Meta is told to come back");
    assert_error(status, &response.json().await.unwrap(), 503, "queue_full");
    let queued = app.jobs(JobState::Queued).await;
    assert_eq!(queued.len(), 2);
    assert!(queued.iter().all(|job| job.m_id != "m.9"), "nothing of the refused batch is stored");
}

#[tokio::test]
async fn a_flood_towards_bonychat_does_not_hold_up_messages_towards_joinchat() {
    let app = spawn_app_with(&[]).await;
    // BonyChat answers each post only after five seconds: every inbound slot stays taken.
    app.bonychat.script((0..200).map(|_| Reply::status(200, "").after(Duration::from_secs(5))));
    let messaging: Vec<Value> = (0..150)
        .map(|i| {
            json!({"sender": {"id": format!("flood{i}")}, "recipient": {"id": PAGE_ID}, "timestamp": 1_700_000_000_000_i64,
                   "message": {"mid": format!("m.flood.{i}"), "text": "hi"}})
        })
        .collect();
    let flood =
        json!({"object": "page", "entry": [{"id": PAGE_ID, "time": 1_700_000_000_000_i64, "messaging": messaging}]});
    assert_eq!(app.post_webhook(serde_json::to_vec(&flood).unwrap()).await.status(), 200);
    app.bonychat.wait_for(64).await;

    let started = tokio::time::Instant::now();
    let (status, _) = app.send(PSID, text("urgent reply")).await;
    let answered_in = started.elapsed();

    assert_eq!(status, 200);
    assert_eq!(app.joinchat.received().len(), 1, "sent before answering");
    assert!(answered_in < Duration::from_millis(2500), "the outbound message waited {answered_in:?}");
}

/// A burst of `/message` requests never becomes as many simultaneous JoinChat calls: each
/// request's own first attempt takes one of the outbound slots (64) like any other, and without
/// a free one its message goes to the dispatcher.
#[tokio::test]
async fn a_burst_of_requests_to_a_hanging_joinchat_holds_no_more_calls_than_the_slots() {
    const REQUESTS: usize = 150;
    let app = spawn_app_with(&[("RELAY_SEND_WAIT_MS", "500"), ("JOINCHAT_TIMEOUT_MS", "5000")]).await;
    app.joinchat.script((0..REQUESTS).map(|_| Reply::ok().after(Duration::from_millis(1500))));

    let started = tokio::time::Instant::now();
    let mut requests = tokio::task::JoinSet::new();
    for i in 0..REQUESTS {
        let (http, url) = (app.http.clone(), app.url("/message"));
        let contact = format!("{}", 4_000_000_000_000_000_u64 + i as u64);
        let body = json!({"channelId": CHANNEL_ID, "contactId": contact, "message": text("burst")});
        requests.spawn(async move { http.post(url).bearer_auth(API_TOKEN).json(&body).send().await.unwrap().status() });
    }
    let statuses = requests.join_all().await;
    let answered_in = started.elapsed();
    let calls_while_hanging = app.joinchat.received().len();

    assert!(statuses.iter().all(|status| *status == 200), "{statuses:?}");
    assert!(answered_in < Duration::from_millis(1500), "every request answered within its wait: {answered_in:?}");
    assert_eq!(calls_while_hanging, 64, "one JoinChat call per outbound slot while JoinChat hangs");
    app.settle().await;
    assert_eq!(app.joinchat.received().len(), REQUESTS, "the rest went out as slots freed, each once");
}

#[tokio::test]
async fn a_message_waiting_for_pacing_holds_no_worker_and_goes_out_when_due() {
    // A 12 s gap needs 2 s of waiting on top of JoinChat's largest `delay` (10 s).
    let app = spawn_app_with(&[("JOINCHAT_ORDER_GAP_SECS", "12")]).await;
    let long = format!("{}\n\n{}", "a".repeat(600), "b".repeat(100));

    let sending = tokio::spawn({
        let (http, url) = (app.http.clone(), app.url("/message"));
        async move {
            let body = json!({"channelId": crate::helpers::CHANNEL_ID, "contactId": PSID, "message": text(&long)});
            http.post(url).bearer_auth(crate::helpers::API_TOKEN).json(&body).send().await.unwrap().status()
        }
    });
    app.joinchat.wait_for(1).await;
    // The deferral is recorded just after the first part; the second is due 2 s after it.
    let deadline = tokio::time::Instant::now() + Duration::from_millis(1500);
    let waiting = loop {
        let waiting = app.jobs(JobState::Queued).await;
        if waiting.iter().any(|job| job.progress == 1) || tokio::time::Instant::now() > deadline {
            break waiting;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };

    assert_eq!(waiting.len(), 1);
    assert!(!waiting[0].in_flight, "a paced job is rescheduled, not held by a worker");
    assert_eq!((waiting[0].attempts, waiting[0].progress), (0, 1), "waiting is not a failed attempt");
    assert_eq!(sending.await.unwrap(), 200, "answered by the attempt that sends, within the wait");
    let received = app.joinchat.wait_for(2).await;
    assert_eq!(received[1].json()["delay"], 10);
    let gap = received[1].at - received[0].at;
    assert!(gap >= Duration::from_millis(1900) && gap < Duration::from_secs(6), "{gap:?}");
}

#[tokio::test]
async fn only_dead_and_queued_jobs_can_be_retried_and_the_others_say_why() {
    let app = spawn_app_with(&[("RELAY_ADMIN_TOKEN", ADMIN_TOKEN)]).await;
    // Rejected while BonyChat waited: BonyChat got the 400.
    app.joinchat.script([Reply::status(400, r#"{"success":false,"errors":{"msg":"user blocked the page"}}"#)]);
    let (status, _) = app.send(PSID, text("rejected one")).await;
    assert_eq!(status, 400);
    // Sent, then echoed by Messenger: the echo is the relay's own and is dropped.
    let (status, _) = app.send(PSID, text("Hello there")).await;
    assert_eq!(status, 200);
    let echo = json!({"object": "page", "entry": [{"id": PAGE_ID, "time": 1_700_000_000_000_i64, "messaging": [
        {"sender": {"id": PAGE_ID}, "recipient": {"id": PSID}, "timestamp": 1_700_000_000_000_i64,
         "message": {"is_echo": true, "app_id": 1, "mid": "m.echo.1", "text": "Hello there"}}]}]});
    let stored: Value = app.post_webhook(serde_json::to_vec(&echo).unwrap()).await.json().await.unwrap();
    assert_eq!(stored["own_echoes"], 1);
    app.settle().await;

    for (state, reason) in [("rejected", "got the 400"), ("dropped", "echo"), ("delivered", "already delivered")] {
        let (_, listed) = admin(&app, reqwest::Method::GET, &format!("/admin/jobs?state={state}")).await;
        let id = listed["jobs"][0]["id"].as_i64().unwrap_or_else(|| panic!("a {state} job: {listed}"));
        let (status, body) = admin(&app, reqwest::Method::POST, &format!("/admin/jobs/{id}/retry")).await;
        assert_eq!(status, 409, "{state}: {body}");
        assert_eq!(body["error"]["code"], "conflict");
        assert!(body["error"]["message"].as_str().unwrap().contains(reason), "{state}: {body}");
    }
    assert_eq!(app.joinchat.received().len(), 2, "nothing sent again");
}

#[tokio::test]
async fn the_admin_api_lists_jobs_in_their_documented_shape() {
    let app = spawn_app_with(&[("RELAY_ADMIN_TOKEN", ADMIN_TOKEN)]).await;
    let (_, sent) = app.send(PSID, text("shape")).await;
    app.settle().await;

    let (status, listed) = admin(&app, reqwest::Method::GET, "/admin/jobs?state=delivered").await;

    assert_eq!(status, 200);
    let job = listed["jobs"][0].as_object().unwrap();
    let mut keys: Vec<&str> = job.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "attempts",
            "channel",
            "contactId",
            "createdAt",
            "direction",
            "id",
            "inFlight",
            "lastError",
            "mId",
            "nextAttemptAt",
            "partsSent",
            "payload",
            "state",
            "updatedAt"
        ]
    );
    assert_eq!(job["mId"], sent["mId"]);
    assert_eq!(job["contactId"], PSID);
    assert_eq!(job["direction"], "outbound");
    assert_eq!(job["channel"], "default");
    assert_eq!(
        job["payload"],
        json!({"recipient": {"id": PSID}, "messages": [{"template_type": "text", "text": "shape"}]})
    );
}

#[tokio::test]
async fn the_admin_api_lists_and_redrives_one_channel_and_refuses_a_name_no_channel_can_have() {
    let app = spawn_app_with(&[("RELAY_ADMIN_TOKEN", ADMIN_TOKEN)]).await;
    app.send(PSID, text("in default")).await;
    app.settle().await;

    let (_, default) = admin(&app, reqwest::Method::GET, "/admin/jobs?channel=default").await;
    let (_, other) = admin(&app, reqwest::Method::GET, "/admin/jobs?channel=shoes").await;
    let (_, every) = admin(&app, reqwest::Method::GET, "/admin/jobs?channel=").await;
    let (redrive, redriven) = admin(&app, reqwest::Method::POST, "/admin/dead/redrive?channel=shoes").await;

    assert_eq!(default["jobs"].as_array().unwrap().len(), 1);
    assert_eq!(other["jobs"], json!([]));
    assert_eq!(every["jobs"].as_array().unwrap().len(), 1, "an empty channel is every channel");
    assert_eq!((redrive, redriven), (200, json!({"redriven": 0})));
    for (method, path) in [
        (reqwest::Method::GET, "/admin/jobs?channel=Shoes"),
        (reqwest::Method::GET, "/admin/jobs?channel=-shoes"),
        (reqwest::Method::GET, "/admin/jobs?channel=a-name-longer-than-thirty-two-chars"),
        (reqwest::Method::POST, "/admin/dead/redrive?channel=sh%C3%B6es"),
    ] {
        let (status, body) = admin(&app, method, path).await;
        let message = assert_error(reqwest::StatusCode::from_u16(status).unwrap(), &body, 400, "invalid_request");
        assert!(message.starts_with("channel:"), "{path}: {message}");
    }
}
