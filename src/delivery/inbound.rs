//! Forwarding Messenger events to BonyChat while Meta waits (SPEC §4.3).
//!
//! Events are grouped by contact and posted one at a time in Messenger's order; contacts go in
//! parallel. An event already handled (same `mId`) is skipped, so Meta's redelivery of a batch
//! that half failed forwards only what is missing. The echo of a message this relay sent is
//! dropped. A transient failure stops that contact's remaining events (they must not overtake
//! it) and makes the batch fail, so Meta redelivers it.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::task::TaskTracker;

use super::contact_locks::ContactLocks;
use super::dedup::RecentIds;
use super::echoes::EchoLedger;
use super::profiles::Profiles;
use crate::clients::{BonyChatApi, SendError};
use crate::domain::bonychat::WebhookPost;
use crate::domain::inbound::{MessageEvent, MessengerEvent};

/// How long handled ids are remembered, and how many at most.
const DEDUP_TTL: Duration = Duration::from_secs(48 * 3600);
const DEDUP_CAPACITY: usize = 200_000;

/// What became of one webhook batch.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ForwardReport {
    pub forwarded: usize,
    pub duplicates: usize,
    pub own_echoes: usize,
    /// BonyChat refused these for good; they are logged and not retried.
    pub refused: usize,
    /// Why events could not be forwarded this time (transient failures).
    pub failures: Vec<String>,
}

pub struct InboundForwarder {
    bonychat: Arc<dyn BonyChatApi>,
    channel_id: String,
    profiles: Option<Profiles>,
    handled: RecentIds,
    echoes: Arc<EchoLedger>,
    contacts: ContactLocks,
    tasks: TaskTracker,
}

impl InboundForwarder {
    pub fn new(
        bonychat: Arc<dyn BonyChatApi>,
        channel_id: String,
        profiles: Option<Profiles>,
        echoes: Arc<EchoLedger>,
        tasks: TaskTracker,
    ) -> Self {
        Self {
            bonychat,
            channel_id,
            profiles,
            handled: RecentIds::new(DEDUP_TTL, DEDUP_CAPACITY),
            echoes,
            contacts: ContactLocks::default(),
            tasks,
        }
    }

    /// Forwards `events`; each contact's share runs in its own task, so it completes even if
    /// the caller stops waiting.
    pub async fn forward(self: &Arc<Self>, events: Vec<MessengerEvent>) -> ForwardReport {
        let mut by_contact: Vec<(String, Vec<MessengerEvent>)> = Vec::new();
        for event in events {
            let contact = match &event {
                MessengerEvent::Message(message) => &message.contact,
                MessengerEvent::Delivery { contact, .. } | MessengerEvent::Read { contact, .. } => {
                    contact
                }
            };
            match by_contact.iter_mut().find(|(c, _)| c == contact) {
                Some((_, events)) => events.push(event),
                None => by_contact.push((contact.clone(), vec![event])),
            }
        }
        let tasks: Vec<_> = by_contact
            .into_iter()
            .map(|(contact, events)| {
                let this = Arc::clone(self);
                self.tasks
                    .spawn(async move { this.forward_contact(&contact, events).await })
            })
            .collect();

        let mut report = ForwardReport::default();
        for task in tasks {
            let part = task.await.unwrap_or_else(|panic| ForwardReport {
                failures: vec![format!("the relay failed while forwarding: {panic}")],
                ..ForwardReport::default()
            });
            report.forwarded += part.forwarded;
            report.duplicates += part.duplicates;
            report.own_echoes += part.own_echoes;
            report.refused += part.refused;
            report.failures.extend(part.failures);
        }
        report
    }

    async fn forward_contact(&self, contact: &str, events: Vec<MessengerEvent>) -> ForwardReport {
        let _turn = self.contacts.lock(contact).await;
        let mut report = ForwardReport::default();
        for event in events {
            match event {
                MessengerEvent::Message(message) => {
                    if let Err(reason) = self.forward_message(&message, &mut report).await {
                        report.failures.push(reason);
                        // Later events of this contact must not overtake the failed one.
                        break;
                    }
                }
                MessengerEvent::Delivery { watermark, .. } => {
                    tracing::info!(
                        direction = "inbound",
                        contact,
                        watermark,
                        "delivery watermark received"
                    );
                }
                MessengerEvent::Read { watermark, .. } => {
                    tracing::info!(
                        direction = "inbound",
                        contact,
                        watermark,
                        "read watermark received"
                    );
                }
            }
        }
        report
    }

    async fn forward_message(
        &self,
        message: &MessageEvent,
        report: &mut ForwardReport,
    ) -> Result<(), String> {
        let events = message.webhook_events();
        if message.echo
            && let Some(fingerprint) = &message.fingerprint
            && !events.iter().any(|e| self.handled.contains(e.m_id()))
            && self.echoes.take_match(&message.contact, fingerprint)
        {
            tracing::info!(direction = "inbound", contact = %message.contact, mid = %message.mid, "echo of the relay's own send dropped");
            for event in &events {
                self.handled.insert(event.m_id());
            }
            report.own_echoes += 1;
            return Ok(());
        }

        for event in events {
            let m_id = event.m_id().to_owned();
            if self.handled.contains(&m_id) {
                tracing::info!(direction = "inbound", contact = %message.contact, m_id, "already forwarded; not again");
                report.duplicates += 1;
                continue;
            }
            let contact_block = match &self.profiles {
                Some(profiles) => profiles.block_for(&message.contact).await,
                None => None,
            };
            let kind = event.kind();
            let post = WebhookPost {
                channel_id: self.channel_id.clone(),
                contact_id: message.contact.clone(),
                events: vec![event],
                contact: contact_block,
            };
            let outcome = self.bonychat.post(&post).await;
            let log = |outcome: &str, reason: &str| {
                tracing::info!(direction = "inbound", contact = %message.contact, m_id, kind, attempt = 1, outcome, reason, "job attempt");
            };
            match outcome {
                Ok(()) => {
                    log("posted", "");
                    self.handled.insert(&m_id);
                    if let Some(profiles) = &self.profiles {
                        profiles.introduced(&message.contact);
                    }
                    report.forwarded += 1;
                }
                Err(SendError::Permanent { reason }) => {
                    // Redelivery would be refused again and hold up every later event.
                    log("refused", &reason);
                    tracing::error!(contact = %message.contact, m_id, %reason, "BonyChat refused an event for good; it is dropped");
                    self.handled.insert(&m_id);
                    report.refused += 1;
                }
                Err(SendError::Transient { reason, .. }) => {
                    log("failed", &reason);
                    return Err(reason);
                }
            }
        }
        Ok(())
    }
}
