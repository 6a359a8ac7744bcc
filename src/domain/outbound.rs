//! BonyChat's `POST /message` body, parsed and validated against the limits of SPEC §3.1.
//!
//! Validation walks the JSON by hand rather than through derived `Deserialize`, so that every
//! error names the exact field path BonyChat sent (`message.replies[3]: longer than 256
//! characters`) and unknown fields are tolerated.

use std::fmt;

use serde_json::{Map, Value};

use super::text::char_len;

pub const TEXT_MAX: usize = 7000;
pub const URL_MAX: usize = 2000;
pub const NAME_MAX: usize = 256;
pub const REPLIES_MAX: usize = 10;
pub const CONTACT_ID_MAX: usize = 50;

#[derive(Debug, Clone, PartialEq)]
pub struct OutboundRequest {
    pub contact_id: ContactId,
    pub message: OutboundMessage,
}

#[derive(Debug, Clone, PartialEq)]
pub enum OutboundMessage {
    Text { text: String },
    Attachment(Attachment),
    Location { latitude: f64, longitude: f64, address: Option<String> },
    QuickReply { title: String, replies: Vec<String> },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Attachment {
    pub kind: AttachmentKind,
    pub url: String,
    pub mime_type: Option<String>,
    pub file_name: Option<String>,
    pub description: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachmentKind {
    Image,
    Video,
    Audio,
    File,
}

/// A BonyChat contact id: a phone id (`+` and 6–15 digits) or a custom id
/// (1–50 of `A-Z a-z 0-9 _ = + / @`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ContactId(String);

impl ContactId {
    pub fn parse(raw: &str) -> Result<Self, String> {
        let custom = (1..=CONTACT_ID_MAX).contains(&raw.len())
            && raw.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'=' | b'+' | b'/' | b'@'));
        if custom || is_phone_shaped(raw) {
            Ok(Self(raw.to_owned()))
        } else {
            Err("must be a phone id (+ and 6-15 digits) or a custom id (1-50 of A-Z a-z 0-9 _ = + / @)".into())
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn is_phone(&self) -> bool {
        is_phone_shaped(&self.0)
    }
}

impl fmt::Display for ContactId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn is_phone_shaped(raw: &str) -> bool {
    raw.strip_prefix('+')
        .is_some_and(|digits| (6..=15).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit()))
}

/// Why a `/message` body was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestError {
    /// The body is not JSON at all.
    NotJson(String),
    /// `channelId` names another channel than this relay's.
    UnknownChannel,
    /// A field is missing, of the wrong type or out of its limits.
    Invalid(FieldError),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub problem: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.problem)
    }
}

impl From<FieldError> for RequestError {
    fn from(err: FieldError) -> Self {
        Self::Invalid(err)
    }
}

impl OutboundRequest {
    /// Parses a `/message` body for the channel `channel_id`.
    pub fn parse(body: &[u8], channel_id: &str) -> Result<Self, RequestError> {
        let value: Value = serde_json::from_slice(body).map_err(|e| RequestError::NotJson(e.to_string()))?;
        let root = Object::root(&value)?;

        if root.required_str("channelId")? != channel_id {
            return Err(RequestError::UnknownChannel);
        }
        let contact_id =
            ContactId::parse(root.required_str("contactId")?).map_err(|problem| root.error("contactId", problem))?;
        let message = parse_message(&root.object("message")?)?;
        Ok(Self { contact_id, message })
    }
}

fn parse_message(message: &Object<'_>) -> Result<OutboundMessage, FieldError> {
    match message.required_str("type")? {
        "text" => {
            let text = message.required_str("text")?;
            message.check_shown_text("text", text, TEXT_MAX)?;
            Ok(OutboundMessage::Text { text: text.to_owned() })
        }
        "attachment" => parse_attachment(&message.object("attachment")?).map(OutboundMessage::Attachment),
        "location" => {
            let latitude = message.required_number("latitude")?;
            if !(-90.0..=90.0).contains(&latitude) {
                return Err(message.error("latitude", "must be between -90 and 90"));
            }
            let longitude = message.required_number("longitude")?;
            if !(-180.0..=180.0).contains(&longitude) {
                return Err(message.error("longitude", "must be between -180 and 180"));
            }
            let address = message.optional_str("address")?;
            if let Some(address) = address {
                message.check_chars("address", address, 0, NAME_MAX)?;
            }
            Ok(OutboundMessage::Location { latitude, longitude, address: non_empty(address) })
        }
        "quick_reply" => {
            let title = message.required_str("title")?;
            message.check_shown_text("title", title, NAME_MAX)?;
            let replies = message.array("replies")?;
            if !(1..=REPLIES_MAX).contains(&replies.len()) {
                return Err(
                    message.error("replies", format!("must hold 1 to {REPLIES_MAX} replies, not {}", replies.len()))
                );
            }
            let replies = replies
                .iter()
                .enumerate()
                .map(|(i, reply)| {
                    let field = format!("replies[{i}]");
                    let reply = reply.as_str().ok_or_else(|| message.error(&field, "must be a string"))?;
                    message.check_shown_text(&field, reply, NAME_MAX)?;
                    Ok(reply.to_owned())
                })
                .collect::<Result<_, FieldError>>()?;
            Ok(OutboundMessage::QuickReply { title: title.to_owned(), replies })
        }
        _ => Err(message.error("type", "must be one of text, attachment, location, quick_reply")),
    }
}

fn parse_attachment(attachment: &Object<'_>) -> Result<Attachment, FieldError> {
    let kind = match attachment.required_str("type")? {
        "image" => AttachmentKind::Image,
        "video" => AttachmentKind::Video,
        "audio" => AttachmentKind::Audio,
        "file" => AttachmentKind::File,
        _ => return Err(attachment.error("type", "must be one of image, video, audio, file")),
    };
    let url = attachment.required_str("url")?;
    attachment.check_chars("url", url, 1, URL_MAX)?;
    // The URL parser is lenient (it skips blanks and control characters, and takes `https:/;/x`
    // or `https:x` as `https://…`), but the string goes to JoinChat as it came: it must be a
    // plain URL on its own, not merely one the parser can make something of.
    let is_web_url = has_web_scheme(url)
        && !url.chars().any(|c| c.is_control() || (c.is_whitespace() && c != ' '))
        && url.trim() == url
        && url::Url::parse(url).is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some());
    if !is_web_url {
        return Err(attachment.error("url", "must be an http or https URL"));
    }
    let mime_type = attachment.optional_str("mimeType")?;
    let file_name = attachment.optional_str("fileName")?;
    if let Some(file_name) = file_name {
        attachment.check_chars("fileName", file_name, 0, NAME_MAX)?;
    }
    let description = attachment.optional_str("description")?;
    if let Some(description) = description {
        attachment.check_chars("description", description, 0, NAME_MAX)?;
    }
    Ok(Attachment {
        kind,
        url: url.to_owned(),
        mime_type: non_empty(mime_type),
        file_name: non_empty(file_name),
        description: non_empty(description),
    })
}

/// `http://` or `https://` in any case, slashes included.
fn has_web_scheme(url: &str) -> bool {
    ["http://", "https://"].iter().any(|scheme| url.get(..scheme.len()).is_some_and(|s| s.eq_ignore_ascii_case(scheme)))
}

/// Empty optional strings carry nothing: treated as absent, so translation never shows a blank.
fn non_empty(value: Option<&str>) -> Option<String> {
    value.filter(|v| !v.trim().is_empty()).map(str::to_owned)
}

/// A JSON object and the path that led to it, for error messages.
struct Object<'a> {
    path: String,
    fields: &'a Map<String, Value>,
}

impl<'a> Object<'a> {
    fn root(value: &'a Value) -> Result<Self, FieldError> {
        match value {
            Value::Object(fields) => Ok(Self { path: String::new(), fields }),
            _ => Err(FieldError { field: "body".into(), problem: "must be a JSON object".into() }),
        }
    }

    fn path_of(&self, name: &str) -> String {
        if self.path.is_empty() {
            name.to_owned()
        } else if name.starts_with('[') {
            format!("{}{name}", self.path)
        } else {
            format!("{}.{name}", self.path)
        }
    }

    fn error(&self, name: &str, problem: impl Into<String>) -> FieldError {
        FieldError { field: self.path_of(name), problem: problem.into() }
    }

    /// `null` counts as absent: serializers often write optional fields that way.
    fn get(&self, name: &str) -> Option<&'a Value> {
        self.fields.get(name).filter(|v| !v.is_null())
    }

    fn required(&self, name: &str) -> Result<&'a Value, FieldError> {
        self.get(name).ok_or_else(|| self.error(name, "required"))
    }

    fn required_str(&self, name: &str) -> Result<&'a str, FieldError> {
        self.required(name)?.as_str().ok_or_else(|| self.error(name, "must be a string"))
    }

    fn optional_str(&self, name: &str) -> Result<Option<&'a str>, FieldError> {
        self.get(name).map(|v| v.as_str().ok_or_else(|| self.error(name, "must be a string"))).transpose()
    }

    fn required_number(&self, name: &str) -> Result<f64, FieldError> {
        self.required(name)?.as_f64().ok_or_else(|| self.error(name, "must be a number"))
    }

    fn object(&self, name: &str) -> Result<Object<'a>, FieldError> {
        match self.required(name)? {
            Value::Object(fields) => Ok(Object { path: self.path_of(name), fields }),
            _ => Err(self.error(name, "must be an object")),
        }
    }

    fn array(&self, name: &str) -> Result<&'a Vec<Value>, FieldError> {
        self.required(name)?.as_array().ok_or_else(|| self.error(name, "must be an array"))
    }

    /// For text Messenger shows as it is (a text, a button's text or title): one of only
    /// whitespace would be refused or shown as nothing.
    fn check_shown_text(&self, name: &str, value: &str, max: usize) -> Result<(), FieldError> {
        self.check_chars(name, value, 1, max)?;
        if value.trim().is_empty() {
            return Err(self.error(name, "must not be blank"));
        }
        Ok(())
    }

    fn check_chars(&self, name: &str, value: &str, min: usize, max: usize) -> Result<(), FieldError> {
        let len = char_len(value);
        if len < min {
            Err(self.error(name, "must not be empty"))
        } else if len > max {
            Err(self.error(name, format!("longer than {max} characters")))
        } else {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const CHANNEL: &str = "gfd8g7fd89dgfd";

    fn parse(body: Value) -> Result<OutboundRequest, RequestError> {
        OutboundRequest::parse(body.to_string().as_bytes(), CHANNEL)
    }

    fn with_message(message: Value) -> Result<OutboundRequest, RequestError> {
        parse(json!({"channelId": CHANNEL, "contactId": "1066835436691078", "message": message}))
    }

    fn field_error(result: Result<OutboundRequest, RequestError>) -> String {
        match result {
            Err(RequestError::Invalid(err)) => err.to_string(),
            other => panic!("expected a field error, got {other:?}"),
        }
    }

    #[test]
    fn a_text_message_is_parsed() {
        let request = with_message(json!({"type": "text", "text": "Hello World"})).unwrap();
        assert_eq!(request.contact_id.as_str(), "1066835436691078");
        assert_eq!(request.message, OutboundMessage::Text { text: "Hello World".into() });
    }

    #[test]
    fn text_limits_are_counted_in_characters() {
        assert!(with_message(json!({"type": "text", "text": "é".repeat(TEXT_MAX)})).is_ok());
        assert_eq!(
            field_error(with_message(json!({"type": "text", "text": "é".repeat(TEXT_MAX + 1)}))),
            "message.text: longer than 7000 characters"
        );
        assert_eq!(field_error(with_message(json!({"type": "text", "text": ""}))), "message.text: must not be empty");
        assert_eq!(
            field_error(with_message(json!({"type": "text", "text": " \n "}))),
            "message.text: must not be blank"
        );
    }

    /// Found by `cargo fuzz run message`: the URL parser read `https:/;/example.com/…` as a
    /// URL with host `;`, and the raw string went to JoinChat as the button's link.
    #[test]
    fn urls_the_parser_would_only_mend_are_refused() {
        let attach =
            |url: &str| with_message(json!({"type": "attachment", "attachment": {"type": "file", "url": url}}));
        for mended in [
            "https:/;/example.com/docs/report%20Q1.pdf",
            "https:example.com/a.pdf",
            "https:\\\\example.com/a.pdf",
            " https://example.com/a.pdf",
            "https://example.com/a.pdf\n",
            "https://exa\tmple.com/a.pdf",
            "https://example.com/\u{0}a.pdf",
        ] {
            assert_eq!(
                field_error(attach(mended)),
                "message.attachment.url: must be an http or https URL",
                "{mended:?}"
            );
        }
        for plain in ["https://example.com/a.pdf", "HTTP://Example.com/a b.pdf", "http://127.0.0.1:8080/x?y=1#z"] {
            let Ok(OutboundRequest { message: OutboundMessage::Attachment(attachment), .. }) = attach(plain) else {
                panic!("{plain:?} refused");
            };
            assert_eq!(attachment.url, plain, "forwarded as it came");
        }
    }

    #[test]
    fn attachment_fields_are_checked_with_their_paths() {
        let ok = json!({"type": "attachment", "attachment": {"type": "file", "url": "https://cdn.example/a.pdf", "mimeType": "application/pdf", "fileName": "a.pdf", "description": "Invoice"}});
        let Ok(OutboundRequest { message: OutboundMessage::Attachment(attachment), .. }) = with_message(ok) else {
            panic!("valid attachment refused");
        };
        assert_eq!(attachment.kind, AttachmentKind::File);
        assert_eq!(attachment.file_name.as_deref(), Some("a.pdf"));

        let long_url = format!("https://cdn.example/{}", "a".repeat(URL_MAX - 19));
        assert_eq!(long_url.len(), URL_MAX + 1);
        assert_eq!(
            field_error(with_message(json!({"type": "attachment", "attachment": {"type": "image", "url": long_url}}))),
            "message.attachment.url: longer than 2000 characters"
        );
        assert_eq!(
            field_error(with_message(
                json!({"type": "attachment", "attachment": {"type": "sticker", "url": "https://x.example/a"}})
            )),
            "message.attachment.type: must be one of image, video, audio, file"
        );
        assert_eq!(
            field_error(with_message(
                json!({"type": "attachment", "attachment": {"type": "image", "url": "ftp://x.example/a"}})
            )),
            "message.attachment.url: must be an http or https URL"
        );
        assert_eq!(
            field_error(with_message(
                json!({"type": "attachment", "attachment": {"type": "image", "url": "https://x.example/a", "fileName": "a".repeat(257)}})
            )),
            "message.attachment.fileName: longer than 256 characters"
        );
        assert_eq!(
            field_error(with_message(
                json!({"type": "attachment", "attachment": {"type": "image", "url": "https://x.example/a", "description": 5}})
            )),
            "message.attachment.description: must be a string"
        );
        assert_eq!(field_error(with_message(json!({"type": "attachment"}))), "message.attachment: required");
    }

    #[test]
    fn location_ranges_include_their_ends() {
        assert!(with_message(json!({"type": "location", "latitude": 90, "longitude": -180})).is_ok());
        assert_eq!(
            field_error(with_message(json!({"type": "location", "latitude": 90.0001, "longitude": 0}))),
            "message.latitude: must be between -90 and 90"
        );
        assert_eq!(
            field_error(with_message(json!({"type": "location", "latitude": 0, "longitude": -180.5}))),
            "message.longitude: must be between -180 and 180"
        );
        assert_eq!(
            field_error(with_message(json!({"type": "location", "latitude": "3.1", "longitude": 0}))),
            "message.latitude: must be a number"
        );
    }

    #[test]
    fn quick_reply_counts_and_lengths_are_checked() {
        let replies = |n: usize| (0..n).map(|i| format!("r{i}")).collect::<Vec<_>>();
        assert!(with_message(json!({"type": "quick_reply", "title": "Pick", "replies": replies(10)})).is_ok());
        assert_eq!(
            field_error(with_message(json!({"type": "quick_reply", "title": "Pick", "replies": replies(11)}))),
            "message.replies: must hold 1 to 10 replies, not 11"
        );
        assert_eq!(
            field_error(with_message(json!({"type": "quick_reply", "title": "Pick", "replies": []}))),
            "message.replies: must hold 1 to 10 replies, not 0"
        );
        assert_eq!(
            field_error(with_message(
                json!({"type": "quick_reply", "title": "Pick", "replies": ["a", "b".repeat(257)]})
            )),
            "message.replies[1]: longer than 256 characters"
        );
        assert_eq!(
            field_error(with_message(json!({"type": "quick_reply", "title": "", "replies": ["a"]}))),
            "message.title: must not be empty"
        );
    }

    /// Caught by an invariant of the `message` fuzz target: a blank title became a button template
    /// (or, with 4+ replies, a text message) of only whitespace, and a blank reply a blank
    /// button title, which Messenger does not show.
    #[test]
    fn quick_reply_titles_and_replies_must_not_be_blank() {
        assert_eq!(
            field_error(with_message(json!({"type": "quick_reply", "title": " ", "replies": ["a"]}))),
            "message.title: must not be blank"
        );
        assert_eq!(
            field_error(with_message(json!({"type": "quick_reply", "title": "Pick", "replies": ["a", "\n\t"]}))),
            "message.replies[1]: must not be blank"
        );
    }

    #[test]
    fn the_channel_is_checked_before_the_message() {
        let result = parse(json!({"channelId": "other", "contactId": "x", "message": {}}));
        assert_eq!(result, Err(RequestError::UnknownChannel));
    }

    #[test]
    fn contact_ids_follow_the_two_bonychat_id_types() {
        for ok in ["+60177872890", "+123456", "abc_DEF=+/@09", &"a".repeat(50)] {
            assert!(ContactId::parse(ok).is_ok(), "{ok}");
        }
        for bad in ["", "has space", "dash-id", "ü", &"a".repeat(51)] {
            assert!(ContactId::parse(bad).is_err(), "{bad}");
        }
        assert!(ContactId::parse("+60177872890").unwrap().is_phone());
        assert!(!ContactId::parse("+12345").unwrap().is_phone(), "5 digits is a custom id");
        assert!(!ContactId::parse("+1234567890123456").unwrap().is_phone(), "16 digits is a custom id");
    }

    #[test]
    fn malformed_bodies_name_what_is_wrong() {
        assert!(matches!(OutboundRequest::parse(b"{not json", CHANNEL), Err(RequestError::NotJson(_))));
        assert_eq!(field_error(parse(json!([1, 2]))), "body: must be a JSON object");
        assert_eq!(field_error(parse(json!({"contactId": "x"}))), "channelId: required");
        assert_eq!(field_error(parse(json!({"channelId": CHANNEL, "message": {}}))), "contactId: required");
        assert_eq!(
            field_error(parse(json!({"channelId": CHANNEL, "contactId": "a b", "message": {}}))),
            "contactId: must be a phone id (+ and 6-15 digits) or a custom id (1-50 of A-Z a-z 0-9 _ = + / @)"
        );
        assert_eq!(field_error(with_message(json!({"text": "hi"}))), "message.type: required");
        assert_eq!(
            field_error(with_message(json!({"type": "video"}))),
            "message.type: must be one of text, attachment, location, quick_reply"
        );
    }

    /// Arbitrary JSON shaped like a request: every outcome is a value, never a panic.
    fn request_like_json() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<f64>().prop_filter("JSON numbers are finite", |f| f.is_finite()).prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            "\\PC{0,20}".prop_map(Value::from),
            prop::sample::select(vec!["text", "attachment", "location", "quick_reply", "image", "file", CHANNEL])
                .prop_map(Value::from),
        ];
        leaf.prop_recursive(4, 64, 8, |inner| {
            let keys = prop::sample::select(vec![
                "channelId",
                "contactId",
                "message",
                "type",
                "text",
                "attachment",
                "url",
                "fileName",
                "description",
                "latitude",
                "longitude",
                "address",
                "title",
                "replies",
            ]);
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..12).prop_map(Value::from),
                prop::collection::btree_map(keys, inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())),
            ]
        })
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_are_answered_without_a_panic(body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let _ = OutboundRequest::parse(&body, CHANNEL);
        }

        #[test]
        fn any_json_is_answered_without_a_panic(value in request_like_json()) {
            let _ = OutboundRequest::parse(value.to_string().as_bytes(), CHANNEL);
        }
    }

    #[test]
    fn unknown_fields_are_tolerated() {
        let request = parse(
            json!({"channelId": CHANNEL, "contactId": "x", "extra": 1, "message": {"type": "text", "text": "hi", "metadata": {}}}),
        );
        assert!(request.is_ok());
    }
}
