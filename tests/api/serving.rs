//! Probes, request ids, error shapes of the HTTP layer, and graceful shutdown.

use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::{API_TOKEN, CHANNEL_ID, PSID, Reply, assert_error, spawn_app, spawn_app_with};

#[tokio::test]
async fn health_and_readiness_probes_answer_ok() {
    let app = spawn_app().await;

    let health = app.http.get(app.url("/healthz")).send().await.unwrap();
    let ready = app.http.get(app.url("/readyz")).send().await.unwrap();

    assert_eq!(health.status(), 200);
    assert_eq!(health.json::<Value>().await.unwrap(), json!({"status": "ok"}));
    assert_eq!(ready.status(), 200);
    assert_eq!(ready.json::<Value>().await.unwrap(), json!({"status": "ready"}));
    app.stop().await;
}

#[tokio::test]
async fn unknown_paths_and_methods_get_json_errors() {
    let app = spawn_app().await;

    let missing = app.http.get(app.url("/nope")).send().await.unwrap();
    let wrong_method = app.http.get(app.url("/message")).send().await.unwrap();

    let status = missing.status();
    assert_error(status, &missing.json().await.unwrap(), 404, "not_found");
    let status = wrong_method.status();
    assert_error(status, &wrong_method.json().await.unwrap(), 405, "method_not_allowed");
    app.stop().await;
}

#[tokio::test]
async fn every_answer_carries_a_request_id_and_a_given_one_is_kept() {
    let app = spawn_app().await;

    let generated = app.http.get(app.url("/healthz")).send().await.unwrap();
    let given = app.http.get(app.url("/nope")).header("x-request-id", "bony-123").send().await.unwrap();

    let id = generated.headers()["x-request-id"].to_str().unwrap();
    assert_eq!(id.len(), 36, "a UUID: {id}");
    assert_eq!(given.headers()["x-request-id"], "bony-123");
    app.stop().await;
}

#[tokio::test]
async fn shutdown_lets_an_in_flight_message_finish_and_then_refuses_connections() {
    let app = spawn_app().await;
    app.joinchat.script([Reply::ok().after(Duration::from_millis(800))]);
    let client = app.http.clone();
    let url = app.url("/message");
    let in_flight = tokio::spawn(async move {
        client
            .post(url)
            .bearer_auth(API_TOKEN)
            .json(
                &json!({"channelId": CHANNEL_ID, "contactId": PSID, "message": {"type": "text", "text": "last words"}}),
            )
            .send()
            .await
    });
    app.joinchat.wait_for(1).await;

    let addr = app.addr;
    app.stop().await;

    let answer = in_flight.await.unwrap().expect("the in-flight request is answered");
    assert_eq!(answer.status(), 200);
    assert!(
        crate::helpers::http_client().get(format!("http://{addr}/healthz")).send().await.is_err(),
        "no new connections"
    );
}

#[tokio::test]
async fn a_message_keeps_going_out_in_full_when_bonychat_hangs_up() {
    let app = spawn_app().await;
    let slow = Reply::ok().after(Duration::from_millis(300));
    app.joinchat.script([slow.clone(), slow.clone(), slow]);
    let text = format!("{}\n\n{}\n\n{}", "a".repeat(600), "b".repeat(600), "c".repeat(600));

    let gave_up = app
        .http
        .post(app.url("/message"))
        .bearer_auth(API_TOKEN)
        .timeout(Duration::from_millis(400))
        .json(&json!({"channelId": CHANNEL_ID, "contactId": PSID, "message": {"type": "text", "text": text}}))
        .send()
        .await;

    assert!(gave_up.is_err(), "the client timed out");
    let received = app.joinchat.wait_for(3).await;
    let firsts: Vec<char> =
        received.iter().map(|r| r.json()["message"]["text"].as_str().unwrap().chars().next().unwrap()).collect();
    assert_eq!(firsts, ['a', 'b', 'c']);
    app.stop().await;
}

#[tokio::test]
async fn an_attempt_outlasting_the_grace_period_is_handed_back_to_the_next_start() {
    let app = spawn_app_with(&[
        ("RELAY_SHUTDOWN_GRACE_SECS", "1"),
        ("RELAY_SEND_WAIT_MS", "100"),
        ("JOINCHAT_TIMEOUT_MS", "10000"),
    ])
    .await;
    app.joinchat.script([Reply::ok().after(Duration::from_secs(5))]);
    let (status, _) = app.send(PSID, json!({"type": "text", "text": "slow one"})).await;
    assert_eq!(status, 200);
    app.joinchat.wait_for(1).await;

    let stopping = std::time::Instant::now();
    let app = app.restart().await;
    let stop_took = stopping.elapsed();
    app.settle().await;

    assert!(stop_took < Duration::from_secs(4), "the grace period bounds the stop: {stop_took:?}");
    let received = app.joinchat.received();
    assert_eq!(received.len(), 2, "the unfinished attempt is made again after the start");
    assert!(received.iter().all(|r| r.json()["message"]["text"] == "slow one"));
    app.stop().await;
}
