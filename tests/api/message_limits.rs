//! Every limit of SPEC §3.1 at its edges: empty, at the limit, one over.

use serde_json::{Value, json};

use crate::helpers::{TestApp, assert_error, spawn_app};

const CONTACT: &str = "1066835436691078";

/// Sends `message` and checks the answer: `None` means accepted, `Some(text)` an
/// `invalid_payload` whose message is exactly `text`.
async fn expect(app: &TestApp, contact: &str, message: Value, expected_error: Option<&str>) {
    let (status, body) = app.send(contact, message.clone()).await;
    match expected_error {
        None => assert_eq!(status, 200, "{message} was refused: {body}"),
        Some(text) => {
            let got = assert_error(status, &body, 400, "invalid_payload");
            assert_eq!(got, text, "for {message}");
        }
    }
}

fn s(n: usize) -> String {
    // Multi-byte characters, so a byte count would overshoot every limit.
    "é".repeat(n)
}

fn url_of_length(n: usize) -> String {
    let base = "https://cdn.example/";
    format!("{base}{}", "a".repeat(n - base.len()))
}

#[tokio::test]
async fn text_is_1_to_7000_characters() {
    let app = spawn_app().await;
    expect(&app, CONTACT, json!({"type": "text", "text": ""}), Some("message.text: must not be empty")).await;
    expect(&app, CONTACT, json!({"type": "text", "text": "a"}), None).await;
    expect(&app, CONTACT, json!({"type": "text", "text": s(7000)}), None).await;
    expect(&app, CONTACT, json!({"type": "text", "text": s(7001)}), Some("message.text: longer than 7000 characters"))
        .await;
    expect(&app, CONTACT, json!({"type": "text"}), Some("message.text: required")).await;
    expect(&app, CONTACT, json!({"type": "text", "text": 42}), Some("message.text: must be a string")).await;
    app.stop().await;
}

#[tokio::test]
async fn attachment_url_is_http_and_at_most_2000_characters() {
    let app = spawn_app().await;
    let attachment = |url: &str| json!({"type": "attachment", "attachment": {"type": "image", "url": url}});
    expect(&app, CONTACT, attachment(""), Some("message.attachment.url: must not be empty")).await;
    expect(&app, CONTACT, attachment(&url_of_length(2000)), None).await;
    expect(
        &app,
        CONTACT,
        attachment(&url_of_length(2001)),
        Some("message.attachment.url: longer than 2000 characters"),
    )
    .await;
    expect(
        &app,
        CONTACT,
        attachment("javascript:alert(1)"),
        Some("message.attachment.url: must be an http or https URL"),
    )
    .await;
    expect(&app, CONTACT, attachment("http://files.example/a.png"), None).await;
    app.stop().await;
}

#[tokio::test]
async fn attachment_type_file_name_and_description_are_checked() {
    let app = spawn_app().await;
    let attachment = |extra: Value| {
        let mut a = json!({"type": "file", "url": "https://cdn.example/a.pdf"});
        a.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        json!({"type": "attachment", "attachment": a})
    };
    for kind in ["image", "video", "audio", "file"] {
        expect(&app, CONTACT, attachment(json!({"type": kind})), None).await;
    }
    expect(
        &app,
        CONTACT,
        attachment(json!({"type": "sticker"})),
        Some("message.attachment.type: must be one of image, video, audio, file"),
    )
    .await;
    expect(
        &app,
        CONTACT,
        attachment(json!({"fileName": s(256), "description": s(256), "mimeType": "application/pdf"})),
        None,
    )
    .await;
    expect(
        &app,
        CONTACT,
        attachment(json!({"fileName": s(257)})),
        Some("message.attachment.fileName: longer than 256 characters"),
    )
    .await;
    expect(
        &app,
        CONTACT,
        attachment(json!({"description": s(257)})),
        Some("message.attachment.description: longer than 256 characters"),
    )
    .await;
    expect(&app, CONTACT, attachment(json!({"fileName": "no-extension"})), None).await;
    expect(
        &app,
        CONTACT,
        json!({"type": "attachment", "attachment": "https://cdn.example/a.pdf"}),
        Some("message.attachment: must be an object"),
    )
    .await;
    app.stop().await;
}

#[tokio::test]
async fn location_coordinates_stay_in_range_and_address_within_256() {
    let app = spawn_app().await;
    let location = |lat: f64, lng: f64| json!({"type": "location", "latitude": lat, "longitude": lng});
    expect(&app, CONTACT, location(90.0, 180.0), None).await;
    expect(&app, CONTACT, location(-90.0, -180.0), None).await;
    expect(&app, CONTACT, location(90.000001, 0.0), Some("message.latitude: must be between -90 and 90")).await;
    expect(&app, CONTACT, location(-90.5, 0.0), Some("message.latitude: must be between -90 and 90")).await;
    expect(&app, CONTACT, location(0.0, 180.000001), Some("message.longitude: must be between -180 and 180")).await;
    expect(&app, CONTACT, location(0.0, -181.0), Some("message.longitude: must be between -180 and 180")).await;
    expect(&app, CONTACT, json!({"type": "location", "longitude": 1}), Some("message.latitude: required")).await;
    expect(&app, CONTACT, json!({"type": "location", "latitude": 1, "longitude": 2, "address": s(256)}), None).await;
    expect(
        &app,
        CONTACT,
        json!({"type": "location", "latitude": 1, "longitude": 2, "address": s(257)}),
        Some("message.address: longer than 256 characters"),
    )
    .await;
    app.stop().await;
}

#[tokio::test]
async fn quick_replies_hold_1_to_10_replies_of_1_to_256_characters() {
    let app = spawn_app().await;
    let quick = |title: &str, replies: Vec<String>| json!({"type": "quick_reply", "title": title, "replies": replies});
    let n = |count: usize| (1..=count).map(|i| format!("Reply {i}")).collect::<Vec<_>>();
    expect(&app, CONTACT, quick("Pick", n(0)), Some("message.replies: must hold 1 to 10 replies, not 0")).await;
    expect(&app, CONTACT, quick("Pick", n(1)), None).await;
    expect(&app, CONTACT, quick("Pick", n(10)), None).await;
    expect(&app, CONTACT, quick("Pick", n(11)), Some("message.replies: must hold 1 to 10 replies, not 11")).await;
    expect(&app, CONTACT, quick("", n(1)), Some("message.title: must not be empty")).await;
    expect(&app, CONTACT, quick(&s(256), n(1)), None).await;
    expect(&app, CONTACT, quick(&s(257), n(1)), Some("message.title: longer than 256 characters")).await;
    expect(
        &app,
        CONTACT,
        quick("Pick", vec!["ok".into(), String::new()]),
        Some("message.replies[1]: must not be empty"),
    )
    .await;
    expect(&app, CONTACT, quick("Pick", vec![s(256)]), None).await;
    expect(
        &app,
        CONTACT,
        quick("Pick", vec!["a".into(), "b".into(), s(257)]),
        Some("message.replies[2]: longer than 256 characters"),
    )
    .await;
    expect(
        &app,
        CONTACT,
        json!({"type": "quick_reply", "title": "Pick", "replies": ["a", 2]}),
        Some("message.replies[1]: must be a string"),
    )
    .await;
    app.stop().await;
}

#[tokio::test]
async fn contact_ids_are_phone_ids_or_custom_ids_of_at_most_50() {
    let app = spawn_app().await;
    let text = json!({"type": "text", "text": "hi"});
    let problem = "contactId: must be a phone id (+ and 6-15 digits) or a custom id (1-50 of A-Z a-z 0-9 _ = + / @)";
    expect(&app, "+60177872890", text.clone(), None).await;
    expect(&app, &"a".repeat(50), text.clone(), None).await;
    expect(&app, "A-z_0=9+/@", text.clone(), Some(problem)).await; // '-' is not allowed
    expect(&app, "Az_0=9+/@", text.clone(), None).await;
    expect(&app, &"a".repeat(51), text.clone(), Some(problem)).await;
    expect(&app, "", text.clone(), Some(problem)).await;
    expect(&app, "has space", text.clone(), Some(problem)).await;
    app.stop().await;
}

#[tokio::test]
async fn an_unknown_message_type_is_named() {
    let app = spawn_app().await;
    expect(
        &app,
        CONTACT,
        json!({"type": "carousel"}),
        Some("message.type: must be one of text, attachment, location, quick_reply"),
    )
    .await;
    expect(&app, CONTACT, json!({"text": "hi"}), Some("message.type: required")).await;
    let (status, body) = app.send(CONTACT, json!("hi")).await;
    assert_eq!(assert_error(status, &body, 400, "invalid_payload"), "message: must be an object");
    app.stop().await;
}
