//! Any `POST /message` body: parsing never panics, and a valid one translates into JoinChat
//! requests within Messenger's limits (Meta's Send API: texts of 640 characters, 1-3 buttons,
//! 1-10 elements, titles of 20 and 80) that serialize and read back.

#![no_main]

use bonychat_relay::domain::joinchat::{
    BUTTON_TITLE_MAX, BUTTONS_PER_ELEMENT, Button, ELEMENT_TITLE_MAX, Message, Recipient, RecipientField, SendRequest,
    translate,
};
use bonychat_relay::domain::outbound::{OutboundMessage, OutboundRequest};
use bonychat_relay::domain::split::JOINCHAT_TEXT_LIMIT;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

const CHANNEL: &str = "gfd8g7fd89dgfd";
const PAGE_ID: &str = "510249619162304";
/// Messenger's limit for a postback payload.
const PAYLOAD_MAX: usize = 1000;
/// Messenger's limit for the elements of a generic template.
const ELEMENTS_MAX: usize = 10;

fuzz_target!(|data: &[u8]| {
    let Ok(request) = OutboundRequest::parse(data, CHANNEL) else { return };
    let messages = translate(&request.message);
    assert!(!messages.is_empty(), "{:?} translates into nothing", request.message);
    for message in &messages {
        check_message(message);
    }
    match &request.message {
        OutboundMessage::Text { text } => {
            let parts: Vec<&str> = messages
                .iter()
                .map(|m| match m {
                    Message::Text { text } => text.as_str(),
                    other => panic!("a text became {other:?}"),
                })
                .collect();
            let squeeze = |s: &str| s.chars().filter(|c| !c.is_whitespace()).collect::<String>();
            assert_eq!(squeeze(&parts.concat()), squeeze(text), "the parts do not give the text back");
        }
        OutboundMessage::QuickReply { replies, .. } => {
            let payloads: Vec<&str> = messages
                .iter()
                .flat_map(|m| match m {
                    Message::Button { buttons, .. } => buttons.iter().collect::<Vec<_>>(),
                    Message::Generic { elements } => elements.iter().flat_map(|e| &e.buttons).collect(),
                    Message::Text { .. } => Vec::new(),
                })
                .map(|b| match b {
                    Button::Postback { payload, .. } => payload.as_str(),
                    other => panic!("a reply became {other:?}"),
                })
                .collect();
            assert_eq!(payloads, *replies, "every reply, in order, as a payload");
        }
        OutboundMessage::Attachment(_) | OutboundMessage::Location { .. } => {}
    }

    for field in [RecipientField::Auto, RecipientField::Id, RecipientField::Phone, RecipientField::Email] {
        let recipient = Recipient::for_contact(&request.contact_id, field);
        for (delay, message) in (0..).zip(&messages) {
            let request =
                SendRequest { page_id: PAGE_ID, recipient: &recipient, message, tag: None, delay: Some(delay) };
            let bytes = request.to_bytes();
            let wire: Value = serde_json::from_slice(&bytes).expect("what is sent is JSON");
            assert_eq!(wire["recipient"].as_object().map(|r| r.len()), Some(1), "recipient holds one key");
            let back: Message = serde_json::from_value(wire["message"].clone()).expect("the message reads back");
            assert_eq!(&back, message, "the message survives the wire");
        }
    }
});

fn chars(s: &str) -> usize {
    s.chars().count()
}

/// Messenger shows nothing for a blank text and refuses an empty one.
fn check_text(what: &str, text: &str, max: usize) {
    assert!(chars(text) <= max, "{what} has {} characters (max {max})", chars(text));
    assert!(!text.trim().is_empty(), "{what} is blank: {text:?}");
}

fn check_message(message: &Message) {
    match message {
        Message::Text { text } => check_text("a text part", text, JOINCHAT_TEXT_LIMIT),
        Message::Button { text, buttons } => {
            check_text("a button template's text", text, JOINCHAT_TEXT_LIMIT);
            assert!((1..=BUTTONS_PER_ELEMENT).contains(&buttons.len()), "{} buttons", buttons.len());
            buttons.iter().for_each(check_button);
        }
        Message::Generic { elements } => {
            assert!((1..=ELEMENTS_MAX).contains(&elements.len()), "{} elements", elements.len());
            for element in elements {
                check_text("an element title", &element.title, ELEMENT_TITLE_MAX);
                assert!(element.buttons.len() <= BUTTONS_PER_ELEMENT, "{} buttons", element.buttons.len());
                element.buttons.iter().for_each(check_button);
            }
        }
    }
}

fn check_button(button: &Button) {
    match button {
        Button::WebUrl { url, title } => {
            check_text("a button title", title, BUTTON_TITLE_MAX);
            let scheme = url.get(..8).map(str::to_ascii_lowercase).unwrap_or_default();
            assert!(scheme.starts_with("http://") || scheme == "https://", "button url {url:?}");
        }
        Button::Postback { title, payload } => {
            check_text("a button title", title, BUTTON_TITLE_MAX);
            assert!((1..=PAYLOAD_MAX).contains(&chars(payload)), "payload of {} characters", chars(payload));
        }
    }
}
