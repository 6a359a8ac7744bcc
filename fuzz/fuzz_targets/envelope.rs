//! Any webhook body, signed as Meta signs it: the signature check lets it through, parsing
//! never panics, and what would be forwarded is what BonyChat accepts (SPEC §3.1, §4.3).

#![no_main]

use bonychat_relay::config::{Rotating, Secret};
use bonychat_relay::domain::bonychat::{BonyMessage, WebhookEvent, WebhookPost};
use bonychat_relay::domain::inbound::{
    EARLIEST_EVENT_MILLIS, FUTURE_SLACK_MILLIS, M_ID_MAX, MessengerEvent, parse_envelope,
};
use bonychat_relay::domain::outbound::{ContactId, NAME_MAX, TEXT_MAX};
use bonychat_relay::signing::HubSignature;
use hmac::{Hmac, KeyInit, Mac};
use libfuzzer_sys::fuzz_target;
use sha2::Sha256;

const APP_SECRET: &str = "e6af24be1d683c8c911949f897eea1f6";
const PAGE_ID: &str = "510249619162304";
/// The time of receipt: 2025-11-24T16:00:00Z.
const NOW: i64 = 1_764_000_000_000;
/// A reason is logged for every ignored item: it must not carry the body's size with it.
const REASON_MAX: usize = 300;

fuzz_target!(|data: &[u8]| {
    // Signed here with an HMAC of our own, so only the relay's verifier is under test.
    let mut mac = Hmac::<Sha256>::new_from_slice(APP_SECRET.as_bytes()).unwrap();
    mac.update(data);
    let hex: String = mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect();
    let header = format!("sha256={hex}");
    let verified = HubSignature::new(Rotating::new(Secret::new(APP_SECRET)), None)
        .verify(Some(header.as_bytes()), bytes::Bytes::copy_from_slice(data))
        .expect("a correctly signed body verifies");

    let Ok(envelope) = parse_envelope(&verified, PAGE_ID, NOW) else { return };
    for ignored in &envelope.ignored {
        let length = ignored.0.chars().count();
        assert!(length <= REASON_MAX, "a reason of {length} characters: {:.200}", ignored.0);
    }
    for event in envelope.events {
        match event {
            MessengerEvent::Message(message) => {
                check_contact(&message.contact);
                check_time(message.timestamp);
                let events = message.webhook_events();
                assert_eq!(events.len(), message.contents.len(), "one BonyChat event per content");
                for event in &events {
                    let m_id = event.m_id();
                    assert!((1..=M_ID_MAX).contains(&m_id.chars().count()), "mId {m_id:?}");
                    let (WebhookEvent::Message { message, .. } | WebhookEvent::MessageEcho { message, .. }) = event
                    else {
                        panic!("a message became {event:?}")
                    };
                    check_content(message);
                }
                let post = WebhookPost {
                    channel_id: "gfd8g7fd89dgfd".into(),
                    contact_id: message.contact.clone(),
                    events,
                    contact: None,
                };
                let bytes = serde_json::to_vec(&post).expect("a post serializes");
                let back: WebhookPost = serde_json::from_slice(&bytes).expect("a post reads back");
                assert_eq!(back.events.len(), post.events.len());
            }
            MessengerEvent::Delivery { contact, watermark, timestamp }
            | MessengerEvent::Read { contact, watermark, timestamp } => {
                check_contact(&contact);
                check_time(timestamp);
                assert!((1..=NOW + FUTURE_SLACK_MILLIS).contains(&watermark), "watermark {watermark}");
            }
        }
    }
});

fn check_contact(contact: &str) {
    assert!(ContactId::parse(contact).is_ok(), "contactId {:.80?} would be refused", contact);
}

fn check_time(timestamp: i64) {
    assert!(
        timestamp == NOW || (EARLIEST_EVENT_MILLIS..=NOW + FUTURE_SLACK_MILLIS).contains(&timestamp),
        "timestamp {timestamp}"
    );
}

fn check_content(message: &BonyMessage) {
    match message {
        BonyMessage::Text { text } => {
            assert!((1..=TEXT_MAX).contains(&text.chars().count()), "text of {} characters", text.chars().count());
        }
        BonyMessage::Attachment { attachment } => {
            assert!(matches!(attachment.kind.as_str(), "image" | "video" | "audio" | "file"), "{}", attachment.kind);
            assert!(!attachment.url.trim().is_empty(), "an attachment without a url");
        }
        BonyMessage::Location { latitude, longitude, address } => {
            assert!((-90.0..=90.0).contains(latitude) && (-180.0..=180.0).contains(longitude));
            assert!(address.as_ref().is_none_or(|a| a.chars().count() <= NAME_MAX), "address too long");
        }
    }
}
