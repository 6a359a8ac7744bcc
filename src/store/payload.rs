//! How a job's payload is written to the store, versioned apart from the domain types.
//!
//! A stored job must stay readable by every later build of the relay, whatever becomes of the
//! Rust types that produced it. The stored format is therefore pinned here and versioned:
//! `{"v": 1, "kind": "send", "recipient": {...}, "parts": [...]}` or
//! `{"v": 1, "kind": "event", "event": {...}}`, where the parts are JoinChat `message` objects
//! and the event a BonyChat event exactly as their protocols define them (so the shape is set
//! by the two contracts, not by our code), and `v` says which version wrote it. Rows written
//! before the version field existed have the same shape and read as version 1. The tests below
//! keep literal version-1 rows: a change to a domain type that stops them decoding fails there,
//! and then needs a conversion here instead.

use serde::Serialize;

use super::Payload;

/// The version this build writes.
const PAYLOAD_FORMAT: u64 = 1;

/// The stored text of `payload`, written in one pass (no intermediate JSON tree: this runs for
/// every message a request stores).
pub fn encode_payload(payload: &Payload) -> String {
    #[derive(Serialize)]
    struct Versioned<'a> {
        v: u64,
        #[serde(flatten)]
        payload: &'a Payload,
    }
    serde_json::to_string(&Versioned { v: PAYLOAD_FORMAT, payload }).expect("payloads always serialize")
}

/// Reads a stored payload, or says why it cannot be read (the job is then dead-lettered with
/// that reason).
pub fn decode_payload(stored: &str) -> Result<Payload, String> {
    let mut value: serde_json::Value =
        serde_json::from_str(stored).map_err(|e| format!("unreadable payload: not JSON ({e})"))?;
    let object = value.as_object_mut().ok_or("unreadable payload: not a JSON object")?;
    let version = match object.remove("v") {
        None => 1,
        Some(v) => v.as_u64().ok_or_else(|| format!("unreadable payload: version {v} is not a number"))?,
    };
    if version != PAYLOAD_FORMAT {
        return Err(format!(
            "unreadable payload: format version {version}, this relay reads version {PAYLOAD_FORMAT} (was it written by a newer release?)"
        ));
    }
    serde_json::from_value(value).map_err(|e| format!("unreadable payload: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::bonychat::{BonyMessage, Status, StatusValue, WebhookEvent};
    use crate::domain::joinchat::{Button, Message, Recipient};

    /// Rows as version 1 wrote them. Never edit these: they stand for jobs on operators' disks.
    const V1_SEND: &str = r#"{"v":1,"kind":"send","recipient":{"id":"1066835436691078"},"parts":[{"template_type":"text","text":"Hello"},{"template_type":"button","text":"Pick one","buttons":[{"type":"postback","title":"Yes","payload":"Yes"}]}]}"#;
    const V1_EVENT: &str = r#"{"v":1,"kind":"event","event":{"type":"message","mId":"m_1","timestamp":1468152703534,"message":{"type":"text","text":"hi"}}}"#;
    const V1_RECEIPT: &str = r#"{"v":1,"kind":"event","event":{"type":"message_status","mId":"0190a5","timestamp":1468152706921,"status":{"value":"delivered"}}}"#;
    /// As the first release wrote rows, before the version field.
    const UNVERSIONED_SEND: &str =
        r#"{"kind":"send","recipient":{"phone":"+5215512345678"},"parts":[{"template_type":"text","text":"Hola"}]}"#;

    #[test]
    fn version_one_rows_still_decode_to_what_they_meant() {
        let Payload::Send { recipient, parts } = decode_payload(V1_SEND).unwrap() else { panic!("a send") };
        assert_eq!(recipient, Recipient::Id("1066835436691078".into()));
        assert_eq!(parts[0], Message::Text { text: "Hello".into() });
        assert!(matches!(&parts[1], Message::Button { text, buttons } if text == "Pick one"
            && matches!(&buttons[0], Button::Postback { title, payload } if title == "Yes" && payload == "Yes")));

        let Payload::Event { event } = decode_payload(V1_EVENT).unwrap() else { panic!("an event") };
        assert!(
            matches!(event, WebhookEvent::Message { m_id, timestamp: 1_468_152_703_534, message: BonyMessage::Text { text } }
            if m_id == "m_1" && text == "hi")
        );

        let Payload::Event { event } = decode_payload(V1_RECEIPT).unwrap() else { panic!("an event") };
        assert!(matches!(
            event,
            WebhookEvent::MessageStatus { status: Status { value: StatusValue::Delivered, .. }, .. }
        ));
    }

    #[test]
    fn rows_written_before_the_version_field_read_as_version_one() {
        let Payload::Send { recipient, .. } = decode_payload(UNVERSIONED_SEND).unwrap() else { panic!("a send") };
        assert_eq!(recipient, Recipient::Phone("+5215512345678".into()));
    }

    #[test]
    fn what_is_written_reads_back_and_carries_the_version() {
        for stored in [V1_SEND, V1_EVENT, V1_RECEIPT] {
            let payload = decode_payload(stored).unwrap();
            let written = encode_payload(&payload);
            assert_eq!(serde_json::from_str::<serde_json::Value>(&written).unwrap()["v"], 1);
            assert_eq!(decode_payload(&written).unwrap(), payload);
        }
    }

    #[test]
    fn unreadable_rows_say_why() {
        assert!(decode_payload("not json").unwrap_err().contains("not JSON"));
        assert!(decode_payload("[1]").unwrap_err().contains("not a JSON object"));
        assert!(decode_payload(r#"{"v":2,"kind":"send"}"#).unwrap_err().contains("version 2"));
        assert!(decode_payload(r#"{"v":1,"kind":"teleport"}"#).unwrap_err().starts_with("unreadable payload"));
    }
}
