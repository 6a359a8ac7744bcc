//! What a signature-checking JoinChat receives for each kind of BonyChat message, byte for byte.

use serde_json::json;

use crate::helpers::{PAGE_ID, PSID, Received, spawn_app, spawn_app_with};

/// The requests JoinChat got, checked for a valid signature and a JSON content type.
fn signed_bodies(received: &[Received]) -> Vec<String> {
    received
        .iter()
        .map(|r| {
            assert!(r.authentic, "bad x-joinchat-signature on {}", r.text());
            assert_eq!(r.content_type.as_deref(), Some("application/json"));
            r.text().to_owned()
        })
        .collect()
}

fn envelope(recipient: &str, message: &str) -> String {
    format!(r#"{{"page_id":"{PAGE_ID}","recipient":{recipient},"message":{message}}}"#)
}

#[tokio::test]
async fn a_text_message_becomes_one_signed_text_request() {
    let app = spawn_app().await;

    let (status, _) = app.send(PSID, json!({"type": "text", "text": "Hello World"})).await;

    assert_eq!(status, 200);
    assert_eq!(
        signed_bodies(&app.joinchat.received()),
        vec![envelope(&format!(r#"{{"id":"{PSID}"}}"#), r#"{"template_type":"text","text":"Hello World"}"#)]
    );
    app.stop().await;
}

#[tokio::test]
async fn non_ascii_text_is_sent_as_utf_8_and_signed_over_those_bytes() {
    let app = spawn_app().await;

    app.send(PSID, json!({"type": "text", "text": "Test äëï \"quoted\" 日本 👍\nline"})).await;

    assert_eq!(
        signed_bodies(&app.joinchat.received()),
        vec![envelope(
            &format!(r#"{{"id":"{PSID}"}}"#),
            r#"{"template_type":"text","text":"Test äëï \"quoted\" 日本 👍\nline"}"#
        )]
    );
    app.stop().await;
}

#[tokio::test]
async fn a_phone_contact_is_addressed_by_phone_and_the_tag_is_sent_when_configured() {
    let app = spawn_app_with(&[("JOINCHAT_MESSAGE_TAG", "ACCOUNT_UPDATE")]).await;

    app.send("+60177872890", json!({"type": "text", "text": "Hi"})).await;

    assert_eq!(
        signed_bodies(&app.joinchat.received()),
        vec![format!(
            r#"{{"page_id":"{PAGE_ID}","recipient":{{"phone":"+60177872890"}},"message":{{"template_type":"text","text":"Hi"}},"tag":"ACCOUNT_UPDATE"}}"#
        )]
    );
    app.stop().await;
}

#[tokio::test]
async fn a_forced_recipient_field_is_used_for_every_contact() {
    for (field, key) in [("uuid", "uuid"), ("email", "email"), ("id", "id"), ("phone", "phone")] {
        let app = spawn_app_with(&[("JOINCHAT_RECIPIENT_FIELD", field)]).await;

        app.send("+60177872890", json!({"type": "text", "text": "Hi"})).await;

        let body = app.joinchat.bodies().remove(0);
        assert_eq!(body["recipient"], json!({key: "+60177872890"}), "JOINCHAT_RECIPIENT_FIELD={field}");
        app.stop().await;
    }
}

#[tokio::test]
async fn an_image_becomes_a_generic_template_titled_by_its_description() {
    let app = spawn_app().await;

    app.send(
        PSID,
        json!({"type": "attachment", "attachment": {"type": "image", "url": "https://cdn.example/cat.jpg", "mimeType": "image/jpeg", "fileName": "cat.jpg", "description": "Our cat"}}),
    )
    .await;
    app.send(
        PSID,
        json!({"type": "attachment", "attachment": {"type": "image", "url": "https://cdn.example/dog.png"}}),
    )
    .await;

    let bodies = app.joinchat.bodies();
    assert_eq!(
        bodies[0]["message"],
        json!({"template_type": "generic", "elements": [{"title": "Our cat", "image_url": "https://cdn.example/cat.jpg"}]})
    );
    assert_eq!(bodies[1]["message"]["elements"][0]["title"], "Image");
    app.stop().await;
}

#[tokio::test]
async fn files_videos_and_audio_become_a_button_template_with_an_open_link() {
    let app = spawn_app_with(&[("JOINCHAT_ORDER_GAP_SECS", "0")]).await;

    app.send(PSID, json!({"type": "attachment", "attachment": {"type": "file", "url": "https://cdn.example/docs/invoice-42.pdf", "fileName": "Invoice 42.pdf", "description": "Due on Friday"}})).await;
    app.send(PSID, json!({"type": "attachment", "attachment": {"type": "video", "url": "https://cdn.example/media/clip.mp4?token=abc"}})).await;
    app.send(PSID, json!({"type": "attachment", "attachment": {"type": "audio", "url": "https://cdn.example/voice%20note.ogg", "description": "Voice note"}})).await;

    let messages: Vec<_> = app.joinchat.bodies().into_iter().map(|b| b["message"].clone()).collect();
    assert_eq!(
        messages,
        vec![
            json!({"template_type": "button", "text": "Invoice 42.pdf\nDue on Friday", "buttons": [{"type": "web_url", "url": "https://cdn.example/docs/invoice-42.pdf", "title": "Open"}]}),
            json!({"template_type": "button", "text": "clip.mp4", "buttons": [{"type": "web_url", "url": "https://cdn.example/media/clip.mp4?token=abc", "title": "Open"}]}),
            json!({"template_type": "button", "text": "voice note.ogg\nVoice note", "buttons": [{"type": "web_url", "url": "https://cdn.example/voice%20note.ogg", "title": "Open"}]}),
        ]
    );
    app.stop().await;
}

#[tokio::test]
async fn a_location_becomes_a_button_that_opens_the_map() {
    let app = spawn_app_with(&[("JOINCHAT_ORDER_GAP_SECS", "0")]).await;

    app.send(PSID, json!({"type": "location", "latitude": 3.139, "longitude": 101.6869})).await;
    app.send(
        PSID,
        json!({"type": "location", "latitude": -33.8568, "longitude": 151.2153, "address": "Sydney Opera House"}),
    )
    .await;

    let messages: Vec<_> = app.joinchat.bodies().into_iter().map(|b| b["message"].clone()).collect();
    assert_eq!(
        messages,
        vec![
            json!({"template_type": "button", "text": "3.139, 101.6869", "buttons": [{"type": "web_url", "url": "https://www.google.com/maps/search/?api=1&query=3.139,101.6869", "title": "Open map"}]}),
            json!({"template_type": "button", "text": "Sydney Opera House", "buttons": [{"type": "web_url", "url": "https://www.google.com/maps/search/?api=1&query=-33.8568,151.2153", "title": "Open map"}]}),
        ]
    );
    app.stop().await;
}

#[tokio::test]
async fn one_to_three_quick_replies_become_postback_buttons() {
    let app = spawn_app().await;

    app.send(PSID, json!({"type": "quick_reply", "title": "How was your stay?", "replies": ["Great", "Could be better", "I would rather not say anything"]})).await;

    assert_eq!(
        signed_bodies(&app.joinchat.received()),
        vec![envelope(
            &format!(r#"{{"id":"{PSID}"}}"#),
            r#"{"template_type":"button","text":"How was your stay?","buttons":[{"type":"postback","title":"Great","payload":"Great"},{"type":"postback","title":"Could be better","payload":"Could be better"},{"type":"postback","title":"I would rather not …","payload":"I would rather not say anything"}]}"#
        )]
    );
    app.stop().await;
}

#[tokio::test]
async fn four_to_ten_quick_replies_become_a_text_then_cards_of_three_buttons() {
    let app = spawn_app_with(&[("JOINCHAT_ORDER_GAP_SECS", "0")]).await;
    let replies: Vec<String> = (1..=7).map(|i| format!("Slot {i}")).collect();

    let (status, _) = app.send(PSID, json!({"type": "quick_reply", "title": "Pick a time", "replies": replies})).await;

    assert_eq!(status, 200);
    let recipient = format!(r#"{{"id":"{PSID}"}}"#);
    let button = |i: u32| format!(r#"{{"type":"postback","title":"Slot {i}","payload":"Slot {i}"}}"#);
    let card = |range: std::ops::RangeInclusive<u32>| {
        format!(r#"{{"title":"Pick a time","buttons":[{}]}}"#, range.map(button).collect::<Vec<_>>().join(","))
    };
    assert_eq!(
        signed_bodies(&app.joinchat.received()),
        vec![
            envelope(&recipient, r#"{"template_type":"text","text":"Pick a time"}"#),
            envelope(
                &recipient,
                &format!(
                    r#"{{"template_type":"generic","elements":[{},{},{}]}}"#,
                    card(1..=3),
                    card(4..=6),
                    card(7..=7)
                )
            ),
        ]
    );
    app.stop().await;
}

#[tokio::test]
async fn the_stand_in_checks_signatures_like_the_joinchat_documentation() {
    // The JoinChat documentation's request sample signed with `xxxxx` as its PHP sample signs
    // (the value computed independently): the stand-in's own HMAC code agrees, so a signature it
    // accepts is one JoinChat would accept.
    let body = br#"{"page_id":12345,"recipient":{"id":"123456"},"message":{"template_type":"text","text":"Hello World"},"tag":"ACCOUNT_UPDATE","delay":1}"#;
    assert_eq!(crate::helpers::expected_signature("xxxxx", body), "pjxfCwQlwtXvvMRKAPy5T16qFq9qBYc3CEWjI45M3mo=");
}

#[tokio::test]
async fn a_relay_with_the_wrong_secret_is_refused_by_joinchat() {
    // The stand-in really checks: a relay signing with another key gets JoinChat's 401,
    // which is a permanent rejection BonyChat hears about.
    let app = spawn_app_with(&[("JOINCHAT_API_SECRET", "not-the-bot-key")]).await;

    let (status, body) = app.send(PSID, json!({"type": "text", "text": "Hi"})).await;

    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "rejected_by_joinchat");
    assert_eq!(body["error"]["message"], "JoinChat rejected the message: signature mismatch");
    assert!(!app.joinchat.received()[0].authentic);
    app.stop().await;
}
