//! One outbound job and the step that delivers it: the reusable unit of work towards JoinChat.
//!
//! A job is a BonyChat message already translated into the JoinChat requests that carry it.
//! [`OutboundSender::send_from`] sends them in order, each only after the previous one was
//! accepted, and reports how far it got, so that a retry resumes at the first part JoinChat
//! has not accepted instead of repeating the ones the contact already has.

use std::sync::Arc;

use tokio::time::Instant;

use super::echoes::EchoLedger;
use super::pacing::Pacer;
use crate::clients::{JoinChatApi, SendError};
use crate::config::JoinChatConfig;
use crate::domain::joinchat::{Message, Recipient, RecipientField, SendRequest, translate};
use crate::domain::outbound::{ContactId, OutboundRequest};

#[derive(Debug, Clone)]
pub struct OutboundJob {
    /// The id BonyChat got for this message, and that later receipts carry.
    pub m_id: String,
    pub contact: ContactId,
    pub recipient: Recipient,
    /// The JoinChat messages carrying it, in sending order.
    pub parts: Vec<Message>,
}

impl OutboundJob {
    pub fn new(request: &OutboundRequest, recipient_field: RecipientField) -> Self {
        Self {
            m_id: new_message_id(),
            contact: request.contact_id.clone(),
            recipient: Recipient::for_contact(&request.contact_id, recipient_field),
            parts: translate(&request.message),
        }
    }
}

/// A fresh `mId`: 32 hex characters, time-ordered (UUIDv7), within BonyChat's 50-character limit.
pub fn new_message_id() -> String {
    uuid::Uuid::now_v7().simple().to_string()
}

/// How far one attempt got.
#[derive(Debug)]
pub struct AttemptOutcome {
    /// How many parts JoinChat has accepted, counting those of earlier attempts.
    pub parts_sent: usize,
    pub result: Result<(), SendError>,
}

pub struct OutboundSender {
    api: Arc<dyn JoinChatApi>,
    pacer: Pacer,
    echoes: Arc<EchoLedger>,
    page_id: String,
    tag: Option<String>,
}

impl OutboundSender {
    /// `echoes` learns of every send, so that Messenger's echo of it can be recognised.
    pub fn new(
        api: Arc<dyn JoinChatApi>,
        config: &JoinChatConfig,
        echoes: Arc<EchoLedger>,
    ) -> Self {
        Self {
            api,
            pacer: Pacer::new(config.order_gap),
            echoes,
            page_id: config.page_id.clone(),
            tag: config.message_tag.clone(),
        }
    }

    /// Sends the parts of `job` from `first_part` on, stopping at the first one JoinChat does
    /// not accept. The caller must not run two of these for one contact at once.
    pub async fn send_from(&self, job: &OutboundJob, first_part: usize) -> AttemptOutcome {
        let contact = job.contact.as_str();
        for (index, message) in job.parts.iter().enumerate().skip(first_part) {
            let slot = self.pacer.plan(contact, Instant::now());
            if !slot.wait.is_zero() {
                tokio::time::sleep(slot.wait).await;
            }
            let request = SendRequest {
                page_id: &self.page_id,
                recipient: &job.recipient,
                message,
                tag: self.tag.as_deref(),
                delay: slot.delay,
            };
            let fingerprint = message.echo_fingerprint();
            if let Some(fingerprint) = &fingerprint {
                self.echoes.record(contact, fingerprint.clone());
            }
            self.pacer.record(contact, Instant::now(), slot.delay);
            if let Err(error) = self.api.send(&request).await {
                if let (true, Some(fingerprint)) = (error.is_permanent(), &fingerprint) {
                    self.echoes.forget(contact, fingerprint);
                }
                return AttemptOutcome {
                    parts_sent: index,
                    result: Err(error),
                };
            }
            tracing::debug!(m_id = %job.m_id, part = index + 1, parts = job.parts.len(), delay = slot.delay, "part accepted by JoinChat");
        }
        AttemptOutcome {
            parts_sent: job.parts.len(),
            result: Ok(()),
        }
    }
}
