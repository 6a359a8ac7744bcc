//! What the relay posts to BonyChat's Webhook URL (SPEC §4.3, §4.4: a Custom Channel's webhook).
//!
//! `{"channelId", "contactId", "events": [...], "contact"?}`; field order is wire order.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WebhookPost {
    #[serde(rename = "channelId")]
    pub channel_id: String,
    #[serde(rename = "contactId")]
    pub contact_id: String,
    pub events: Vec<WebhookEvent>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub contact: Option<ContactProfile>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum WebhookEvent {
    /// Something the contact wrote.
    Message {
        #[serde(rename = "mId")]
        m_id: String,
        timestamp: i64,
        message: BonyMessage,
    },
    /// Something the Page sent outside BonyChat (Page inbox, JoinChat flows).
    MessageEcho {
        #[serde(rename = "mId")]
        m_id: String,
        timestamp: i64,
        message: BonyMessage,
    },
    /// A receipt for a message BonyChat sent through `/message`.
    MessageStatus {
        #[serde(rename = "mId")]
        m_id: String,
        timestamp: i64,
        status: Status,
    },
}

impl WebhookEvent {
    pub fn m_id(&self) -> &str {
        match self {
            Self::Message { m_id, .. } | Self::MessageEcho { m_id, .. } | Self::MessageStatus { m_id, .. } => m_id,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum BonyMessage {
    Text {
        text: String,
    },
    Attachment {
        attachment: BonyAttachment,
    },
    Location {
        latitude: f64,
        longitude: f64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        address: Option<String>,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BonyAttachment {
    /// `image`, `video`, `audio` or `file`.
    #[serde(rename = "type")]
    pub kind: String,
    pub url: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub value: StatusValue,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StatusValue {
    Delivered,
    Read,
    Failed,
}

/// The optional `contact` block BonyChat uses when it creates a contact.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContactProfile {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile_pic: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locale: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<serde_json::Number>,
}

impl ContactProfile {
    pub fn is_empty(&self) -> bool {
        self == &Self::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_message_post_has_the_documented_shape() {
        let post = WebhookPost {
            channel_id: "gfd8g7fd89dgfd".into(),
            contact_id: "1066835436691078".into(),
            events: vec![WebhookEvent::Message {
                m_id: "mid.1".into(),
                timestamp: 2_132_131_321_000,
                message: BonyMessage::Text { text: "Hello World".into() },
            }],
            contact: None,
        };
        assert_eq!(
            serde_json::to_string(&post).unwrap(),
            r#"{"channelId":"gfd8g7fd89dgfd","contactId":"1066835436691078","events":[{"type":"message","mId":"mid.1","timestamp":2132131321000,"message":{"type":"text","text":"Hello World"}}]}"#
        );
    }

    #[test]
    fn a_receipt_has_a_status_value_and_an_optional_message() {
        let failed = WebhookEvent::MessageStatus {
            m_id: "abc".into(),
            timestamp: 1,
            status: Status { value: StatusValue::Failed, message: Some("Invalid token".into()) },
        };
        assert_eq!(
            serde_json::to_value(&failed).unwrap(),
            json!({"type": "message_status", "mId": "abc", "timestamp": 1, "status": {"value": "failed", "message": "Invalid token"}})
        );
    }
}
