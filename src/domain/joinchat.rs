//! JoinChat Send API requests (`send_message`, as JoinChat documents it) and the translation of
//! SPEC §3.3.
//!
//! Field order in the structs is the order on the wire: JoinChat signs and checks the exact
//! bytes, and a stable order keeps what we send reproducible.

use serde::{Deserialize, Serialize};

use super::outbound::{Attachment, AttachmentKind, ContactId, OutboundMessage};
use super::split::{JOINCHAT_TEXT_LIMIT, split_text};
use super::text::{normalize_whitespace, truncate};

/// Button titles are cut at 20 characters (Messenger's limit, repeated by JoinChat).
pub const BUTTON_TITLE_MAX: usize = 20;
/// Generic template element titles are cut at 80 characters.
pub const ELEMENT_TITLE_MAX: usize = 80;
/// A generic element holds at most three buttons.
pub const BUTTONS_PER_ELEMENT: usize = 3;
/// The most `delay` JoinChat accepts, in seconds.
pub const MAX_DELAY_SECS: u64 = 10;

/// One JoinChat `message` object: the template fields sit directly in it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "template_type", rename_all = "snake_case")]
pub enum Message {
    Text { text: String },
    Button { text: String, buttons: Vec<Button> },
    Generic { elements: Vec<Element> },
}

impl Message {
    /// What Messenger's echo of this message is recognised by (SPEC §4.3): the text of a text
    /// message or of a button template, the first element's title of a generic one.
    pub fn echo_fingerprint(&self) -> Option<String> {
        match self {
            Self::Text { text } | Self::Button { text, .. } => Some(normalize_whitespace(text)),
            Self::Generic { elements } => elements.first().map(|e| normalize_whitespace(&e.title)),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Button {
    WebUrl { url: String, title: String },
    Postback { title: String, payload: String },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Element {
    pub title: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_url: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub buttons: Vec<Button>,
}

/// Which key of `recipient` carries the contact (SPEC §3.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecipientField {
    /// A phone-shaped contact id goes to `phone`, anything else to `id`.
    Auto,
    Id,
    Phone,
    Email,
    Uuid,
}

/// JoinChat's `recipient`: exactly one key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Recipient {
    Id(String),
    Phone(String),
    Email(String),
    Uuid(String),
}

impl Recipient {
    pub fn for_contact(contact: &ContactId, field: RecipientField) -> Self {
        let value = contact.as_str().to_owned();
        match field {
            RecipientField::Auto if contact.is_phone() => Self::Phone(value),
            RecipientField::Auto | RecipientField::Id => Self::Id(value),
            RecipientField::Phone => Self::Phone(value),
            RecipientField::Email => Self::Email(value),
            RecipientField::Uuid => Self::Uuid(value),
        }
    }
}

/// The body of one `send_message` call.
#[derive(Debug, Serialize)]
pub struct SendRequest<'a> {
    pub page_id: &'a str,
    pub recipient: &'a Recipient,
    pub message: &'a Message,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tag: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delay: Option<u64>,
}

impl SendRequest<'_> {
    /// The exact bytes put on the wire (and signed).
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a send request always serializes")
    }
}

/// Translates one BonyChat message into the JoinChat messages that carry it, in sending order.
pub fn translate(message: &OutboundMessage) -> Vec<Message> {
    match message {
        OutboundMessage::Text { text } => split_text(text, JOINCHAT_TEXT_LIMIT)
            .into_iter()
            .map(|part| Message::Text { text: part.to_owned() })
            .collect(),
        OutboundMessage::Attachment(attachment) => vec![translate_attachment(attachment)],
        OutboundMessage::Location { latitude, longitude, address } => {
            let text = match address {
                Some(address) => address.clone(),
                None => format!("{latitude}, {longitude}"),
            };
            vec![Message::Button {
                text,
                buttons: vec![Button::WebUrl {
                    url: format!("https://www.google.com/maps/search/?api=1&query={latitude},{longitude}"),
                    title: "Open map".into(),
                }],
            }]
        }
        OutboundMessage::QuickReply { title, replies } => {
            let buttons = replies.iter().map(|reply| Button::Postback {
                title: truncate(reply, BUTTON_TITLE_MAX).into_owned(),
                payload: reply.clone(),
            });
            if replies.len() <= BUTTONS_PER_ELEMENT {
                vec![Message::Button { text: title.clone(), buttons: buttons.collect() }]
            } else {
                // A button template holds three buttons at most: show the question as text,
                // then the replies three to a card.
                let buttons: Vec<Button> = buttons.collect();
                let element_title = truncate(title, ELEMENT_TITLE_MAX).into_owned();
                let elements = buttons
                    .chunks(BUTTONS_PER_ELEMENT)
                    .map(|chunk| Element { title: element_title.clone(), image_url: None, buttons: chunk.to_vec() })
                    .collect();
                vec![Message::Text { text: title.clone() }, Message::Generic { elements }]
            }
        }
    }
}

fn translate_attachment(attachment: &Attachment) -> Message {
    match attachment.kind {
        AttachmentKind::Image => {
            let title = attachment.description.as_deref().or(attachment.file_name.as_deref()).unwrap_or("Image");
            Message::Generic {
                elements: vec![Element {
                    title: truncate(title, ELEMENT_TITLE_MAX).into_owned(),
                    image_url: Some(attachment.url.clone()),
                    buttons: Vec::new(),
                }],
            }
        }
        AttachmentKind::Video | AttachmentKind::Audio | AttachmentKind::File => {
            let name = attachment.file_name.clone().unwrap_or_else(|| name_from_url(&attachment.url));
            let text = match &attachment.description {
                Some(description) => format!("{name}\n{description}"),
                None => name,
            };
            Message::Button {
                text: truncate(&text, JOINCHAT_TEXT_LIMIT).into_owned(),
                buttons: vec![Button::WebUrl { url: attachment.url.clone(), title: "Open".into() }],
            }
        }
    }
}

/// The last non-empty path segment of `url`, percent-decoded (`report%20Q1.pdf` reads
/// `report Q1.pdf`); the host when the path is empty; the URL itself as a last resort.
fn name_from_url(url: &str) -> String {
    let Ok(parsed) = url::Url::parse(url) else {
        return url.to_owned();
    };
    let segment = parsed.path_segments().and_then(|mut segments| segments.rfind(|s| !s.is_empty())).map(percent_decode);
    match segment {
        Some(segment) if !segment.trim().is_empty() => segment,
        _ => parsed.host_str().map_or_else(|| url.to_owned(), str::to_owned),
    }
}

fn percent_decode(segment: &str) -> String {
    let bytes = segment.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%'
            && let (Some(hi), Some(lo)) =
                (bytes.get(i + 1).copied().and_then(hex), bytes.get(i + 2).copied().and_then(hex))
        {
            decoded.push((hi * 16 + lo) as u8);
            i += 3;
            continue;
        }
        decoded.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&decoded).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn wire(message: &Message) -> Value {
        serde_json::to_value(message).unwrap()
    }

    fn attachment(kind: AttachmentKind, url: &str) -> Attachment {
        Attachment { kind, url: url.into(), mime_type: None, file_name: None, description: None }
    }

    #[test]
    fn a_short_text_is_one_text_message() {
        let messages = translate(&OutboundMessage::Text { text: "Hello World".into() });
        assert_eq!(messages.len(), 1);
        assert_eq!(wire(&messages[0]), json!({"template_type": "text", "text": "Hello World"}));
    }

    #[test]
    fn an_image_becomes_a_one_element_generic_template() {
        let mut image = attachment(AttachmentKind::Image, "https://cdn.example/cat.jpg");
        assert_eq!(
            wire(&translate(&OutboundMessage::Attachment(image.clone()))[0]),
            json!({"template_type": "generic", "elements": [{"title": "Image", "image_url": "https://cdn.example/cat.jpg"}]})
        );
        image.file_name = Some("cat.jpg".into());
        assert_eq!(
            translate_attachment(&image),
            Message::Generic {
                elements: vec![Element {
                    title: "cat.jpg".into(),
                    image_url: Some(image.url.clone()),
                    buttons: vec![]
                }]
            }
        );
        image.description = Some("x".repeat(100));
        let Message::Generic { elements } = translate_attachment(&image) else { panic!() };
        assert_eq!(elements[0].title, format!("{}…", "x".repeat(79)));
    }

    #[test]
    fn a_file_becomes_a_button_template_with_an_open_button() {
        let mut file = attachment(AttachmentKind::File, "https://cdn.example/docs/report%20Q1.pdf?sig=1");
        assert_eq!(
            wire(&translate_attachment(&file)),
            json!({"template_type": "button", "text": "report Q1.pdf", "buttons": [{"type": "web_url", "url": "https://cdn.example/docs/report%20Q1.pdf?sig=1", "title": "Open"}]})
        );
        file.file_name = Some("Q1.pdf".into());
        file.description = Some("First quarter".into());
        let Message::Button { text, .. } = translate_attachment(&file) else { panic!() };
        assert_eq!(text, "Q1.pdf\nFirst quarter");
    }

    #[test]
    fn names_from_urls_fall_back_sensibly() {
        assert_eq!(name_from_url("https://cdn.example/a/b/"), "b");
        assert_eq!(name_from_url("https://cdn.example/"), "cdn.example");
        assert_eq!(name_from_url("https://cdn.example/%E6%97%A5.mp3"), "日.mp3");
        assert_eq!(name_from_url("https://cdn.example/100%"), "100%");
    }

    #[test]
    fn a_long_file_name_from_the_url_is_cut_to_the_button_text_limit() {
        let file = attachment(AttachmentKind::Video, &format!("https://cdn.example/{}.mp4", "v".repeat(1900)));
        let Message::Button { text, .. } = translate_attachment(&file) else { panic!() };
        assert_eq!(text.chars().count(), JOINCHAT_TEXT_LIMIT);
        assert!(text.ends_with('…'));
    }

    #[test]
    fn a_location_opens_a_map() {
        let location = OutboundMessage::Location { latitude: 3.139, longitude: 101.6869, address: None };
        assert_eq!(
            wire(&translate(&location)[0]),
            json!({"template_type": "button", "text": "3.139, 101.6869", "buttons": [{"type": "web_url", "url": "https://www.google.com/maps/search/?api=1&query=3.139,101.6869", "title": "Open map"}]})
        );
        let with_address =
            OutboundMessage::Location { latitude: -33.0, longitude: 151.0, address: Some("Sydney Opera House".into()) };
        let Message::Button { text, buttons } = &translate(&with_address)[0] else { panic!() };
        assert_eq!(text, "Sydney Opera House");
        assert_eq!(
            buttons[0],
            Button::WebUrl {
                url: "https://www.google.com/maps/search/?api=1&query=-33,151".into(),
                title: "Open map".into()
            }
        );
    }

    #[test]
    fn up_to_three_quick_replies_are_postback_buttons() {
        let message = OutboundMessage::QuickReply {
            title: "Pick one".into(),
            replies: vec!["Yes".into(), "A reply longer than twenty".into()],
        };
        assert_eq!(
            wire(&translate(&message)[0]),
            json!({"template_type": "button", "text": "Pick one", "buttons": [
                {"type": "postback", "title": "Yes", "payload": "Yes"},
                {"type": "postback", "title": "A reply longer than…", "payload": "A reply longer than twenty"}
            ]})
        );
    }

    #[test]
    fn four_to_ten_quick_replies_are_a_text_then_cards_of_three() {
        let replies: Vec<String> = (1..=10).map(|i| format!("Option {i}")).collect();
        let title = "t".repeat(90);
        let messages = translate(&OutboundMessage::QuickReply { title: title.clone(), replies });
        assert_eq!(messages.len(), 2);
        assert_eq!(messages[0], Message::Text { text: title });
        let Message::Generic { elements } = &messages[1] else { panic!() };
        assert_eq!(elements.iter().map(|e| e.buttons.len()).collect::<Vec<_>>(), vec![3, 3, 3, 1]);
        assert!(elements.iter().all(|e| e.title == format!("{}…", "t".repeat(79))));
        assert_eq!(elements[3].buttons[0], Button::Postback { title: "Option 10".into(), payload: "Option 10".into() });

        let four = translate(&OutboundMessage::QuickReply {
            title: "Q".into(),
            replies: (1..=4).map(|i| i.to_string()).collect(),
        });
        let Message::Generic { elements } = &four[1] else { panic!() };
        assert_eq!(elements.iter().map(|e| e.buttons.len()).collect::<Vec<_>>(), vec![3, 1]);
    }

    #[test]
    fn recipients_follow_the_configured_field() {
        let phone = ContactId::parse("+60177872890").unwrap();
        let psid = ContactId::parse("1066835436691078").unwrap();
        assert_eq!(Recipient::for_contact(&phone, RecipientField::Auto), Recipient::Phone("+60177872890".into()));
        assert_eq!(Recipient::for_contact(&psid, RecipientField::Auto), Recipient::Id("1066835436691078".into()));
        assert_eq!(Recipient::for_contact(&phone, RecipientField::Id), Recipient::Id("+60177872890".into()));
        assert_eq!(Recipient::for_contact(&psid, RecipientField::Uuid), Recipient::Uuid("1066835436691078".into()));
        assert_eq!(Recipient::for_contact(&psid, RecipientField::Email), Recipient::Email("1066835436691078".into()));
    }

    #[test]
    fn the_request_body_has_the_documented_fields_in_order() {
        let recipient = Recipient::Id("123456".into());
        let message = Message::Text { text: "Hello World".into() };
        let request = SendRequest {
            page_id: "12345",
            recipient: &recipient,
            message: &message,
            tag: Some("ACCOUNT_UPDATE"),
            delay: Some(1),
        };
        assert_eq!(
            String::from_utf8(request.to_bytes()).unwrap(),
            r#"{"page_id":"12345","recipient":{"id":"123456"},"message":{"template_type":"text","text":"Hello World"},"tag":"ACCOUNT_UPDATE","delay":1}"#
        );
        let bare = SendRequest { tag: None, delay: None, ..request };
        assert_eq!(
            String::from_utf8(bare.to_bytes()).unwrap(),
            r#"{"page_id":"12345","recipient":{"id":"123456"},"message":{"template_type":"text","text":"Hello World"}}"#
        );
    }
}
