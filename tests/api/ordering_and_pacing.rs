//! Order and spacing of the requests JoinChat receives (SPEC §3.3, §3.4).

use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::{PSID, spawn_app, spawn_app_with};

fn delays(bodies: &[Value]) -> Vec<Option<u64>> {
    bodies.iter().map(|b| b.get("delay").map(|d| d.as_u64().expect("delay is a whole number"))).collect()
}

#[tokio::test]
async fn a_long_text_arrives_as_ordered_parts_that_rebuild_it() {
    let app = spawn_app().await;
    let paragraphs: Vec<String> =
        (0..12).map(|i| format!("Paragraph {i}: {}", "word ".repeat(110).trim_end())).collect();
    let text = paragraphs.join("\n\n");
    assert!(text.chars().count() <= 7000);

    let (status, _) = app.send(PSID, json!({"type": "text", "text": text})).await;

    assert_eq!(status, 200);
    let received = app.joinchat.received();
    assert!(received.iter().all(|r| r.authentic));
    let parts: Vec<String> =
        received.iter().map(|r| r.json()["message"]["text"].as_str().unwrap().to_owned()).collect();
    assert_eq!(parts, paragraphs, "one part per paragraph, in order, nothing lost");
    assert!(parts.iter().all(|p| p.chars().count() <= 640));
    app.stop().await;
}

#[tokio::test]
async fn parts_are_spaced_by_delays_and_the_relay_waits_beyond_ten_seconds() {
    let app = spawn_app().await; // the default gap of one second
    let text = vec!["x".repeat(580); 12].join("\n\n");

    let (status, _) = app.send(PSID, json!({"type": "text", "text": text})).await;

    assert_eq!(status, 200);
    let received = app.joinchat.received();
    assert_eq!(received.len(), 12);
    let bodies: Vec<Value> = received.iter().map(|r| r.json()).collect();
    let mut expected: Vec<Option<u64>> = vec![None];
    expected.extend((1..=10).map(Some));
    expected.push(Some(10));
    assert_eq!(delays(&bodies), expected);
    // The twelfth part needs eleven seconds of spacing: the relay holds it back itself.
    assert!(received[11].at - received[10].at >= Duration::from_millis(900));
    app.stop().await;
}

#[tokio::test]
async fn a_message_right_after_another_to_the_same_contact_gets_a_delay() {
    let app = spawn_app().await;

    app.send(PSID, json!({"type": "text", "text": "first"})).await;
    app.send(PSID, json!({"type": "text", "text": "second"})).await;
    app.send("+60177872890", json!({"type": "text", "text": "someone else"})).await;

    assert_eq!(delays(&app.joinchat.bodies()), vec![None, Some(1), None]);
    app.stop().await;
}

#[tokio::test]
async fn a_zero_gap_sends_without_delays() {
    let app = spawn_app_with(&[("JOINCHAT_ORDER_GAP_SECS", "0")]).await;

    app.send(PSID, json!({"type": "text", "text": "x".repeat(2000)})).await;
    app.send(PSID, json!({"type": "text", "text": "again"})).await;

    let bodies = app.joinchat.bodies();
    assert_eq!(bodies.len(), 5);
    assert!(delays(&bodies).iter().all(Option::is_none));
    app.stop().await;
}

#[tokio::test]
async fn a_gap_over_ten_seconds_is_made_of_a_wait_and_the_longest_delay() {
    let app = spawn_app_with(&[("JOINCHAT_ORDER_GAP_SECS", "12")]).await;

    app.send(PSID, json!({"type": "text", "text": "first"})).await;
    app.send(PSID, json!({"type": "text", "text": "second"})).await;

    let received = app.joinchat.received();
    let bodies: Vec<Value> = received.iter().map(|r| r.json()).collect();
    assert_eq!(delays(&bodies), vec![None, Some(10)]);
    assert!(received[1].at - received[0].at >= Duration::from_millis(1900));
    app.stop().await;
}

#[tokio::test]
async fn concurrent_messages_to_one_contact_never_interleave_their_parts() {
    let app = spawn_app_with(&[("JOINCHAT_ORDER_GAP_SECS", "0")]).await;
    let message =
        |tag: char| json!({"type": "text", "text": format!("{0}1 {1}\n\n{0}2 {1}\n\n{0}3 {1}", tag, "y".repeat(600))});

    let (a, b, c, d, e) = tokio::join!(
        app.send(PSID, message('A')),
        app.send(PSID, message('B')),
        app.send(PSID, message('C')),
        app.send(PSID, message('D')),
        app.send(PSID, message('E')),
    );
    let answers = [a, b, c, d, e];

    assert!(answers.iter().all(|(status, _)| *status == 200));
    let labels: Vec<String> =
        app.joinchat.bodies().iter().map(|b| b["message"]["text"].as_str().unwrap()[..2].to_owned()).collect();
    assert_eq!(labels.len(), 15);
    for message in labels.chunks(3) {
        let tag = &message[0][..1];
        assert_eq!(message, [format!("{tag}1"), format!("{tag}2"), format!("{tag}3")], "in {labels:?}");
    }
    app.stop().await;
}
