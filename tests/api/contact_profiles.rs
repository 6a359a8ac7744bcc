//! The `contact` block from a Graph API look-up on a new contact's first event (SPEC §4.3).

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::helpers::{PAGE_ID, PAGE_TOKEN, PSID, Reply, TestApp, spawn_app, spawn_app_with};

fn message(mid: &str, text: &str) -> Vec<u8> {
    json!({"object": "page", "entry": [{"id": PAGE_ID, "time": 1, "messaging": [
        {"sender": {"id": PSID}, "recipient": {"id": PAGE_ID}, "timestamp": 2, "message": {"mid": mid, "text": text}}
    ]}]})
    .to_string()
    .into_bytes()
}

async fn deliver(app: &TestApp, body: &[u8]) {
    let response = app.post_webhook(body).await;
    assert_eq!(response.status(), 200);
}

async fn posts(app: &TestApp) -> Vec<Value> {
    app.bonychat_posts().await
}

#[tokio::test]
async fn a_new_contact_s_first_event_carries_its_profile_and_later_ones_do_not() {
    let app = spawn_app_with(&[("MESSENGER_PAGE_ACCESS_TOKEN", PAGE_TOKEN)]).await;

    deliver(&app, &message("m1", "hi")).await;
    deliver(&app, &message("m2", "again")).await;

    let posts = posts(&app).await;
    assert_eq!(posts.len(), 2);
    assert_eq!(
        posts[0]["contact"],
        json!({"firstName": "Peter", "lastName": "Chang", "profilePic": "https://platform-lookaside.example/pic.jpg", "locale": "en_US", "timezone": -7})
    );
    assert!(posts[1].get("contact").is_none());
    let lookups = app.graph.received();
    assert_eq!(lookups.len(), 1, "looked up once");
    assert!(lookups[0].authentic, "the page token was sent");
    assert_eq!(
        lookups[0].path_and_query,
        format!(
            "/v21.0/{PSID}?fields=first_name%2Clast_name%2Cprofile_pic%2Clocale%2Ctimezone&access_token={PAGE_TOKEN}"
        )
    );
    app.stop().await;
}

#[tokio::test]
async fn without_a_page_token_nothing_is_looked_up() {
    let app = spawn_app().await;

    deliver(&app, &message("m1", "hi")).await;

    assert!(posts(&app).await[0].get("contact").is_none());
    assert!(app.graph.received().is_empty());
    app.stop().await;
}

#[tokio::test]
async fn a_failing_graph_api_lets_the_event_through_without_a_profile() {
    let app = spawn_app_with(&[("MESSENGER_PAGE_ACCESS_TOKEN", PAGE_TOKEN)]).await;
    app.graph.script([Reply::status(500, r#"{"error":{"message":"An unknown error occurred","code":1}}"#)]);

    deliver(&app, &message("m1", "hi")).await;

    let posts = posts(&app).await;
    assert_eq!(posts.len(), 1);
    assert_eq!(posts[0]["events"][0]["message"]["text"], "hi");
    assert!(posts[0].get("contact").is_none());
    app.stop().await;
}

#[tokio::test]
async fn a_wrong_page_token_lets_the_event_through_without_a_profile() {
    let app = spawn_app_with(&[("MESSENGER_PAGE_ACCESS_TOKEN", "expired-token")]).await;

    deliver(&app, &message("m1", "hi")).await;

    let posts = posts(&app).await;
    assert!(!app.graph.received()[0].authentic);
    assert!(posts[0].get("contact").is_none());
    app.stop().await;
}

#[tokio::test]
async fn a_hanging_graph_api_holds_the_event_no_longer_than_the_short_timeout() {
    // MESSENGER_GRAPH_TIMEOUT_MS is 300 in the test configuration.
    let app = spawn_app_with(&[("MESSENGER_PAGE_ACCESS_TOKEN", PAGE_TOKEN)]).await;
    app.graph.script([Reply::ok().after(Duration::from_secs(10))]);

    let started = Instant::now();
    deliver(&app, &message("m1", "hi")).await;
    app.bonychat.wait_for(1).await;
    let took = started.elapsed();

    assert!(took < Duration::from_secs(3), "held for {took:?}");
    let posts = posts(&app).await;
    assert_eq!(posts.len(), 1);
    assert!(posts[0].get("contact").is_none());
    app.stop().await;
}
