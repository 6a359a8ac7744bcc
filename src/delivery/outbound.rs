//! One attempt at an outbound job: the reusable step that sends a message's JoinChat requests.
//!
//! The requests go one after the other, each only after the previous one was accepted. Before
//! each leaves, the store learns when it takes effect (pacing) and what its echo will look like
//! (own-echo suppression); after each is accepted, the store learns the progress, so that a
//! retry, even after a crash, resumes at the first part JoinChat has not accepted.

use std::sync::Arc;
use std::time::Duration;

use super::pacing;
use super::rate::{SendRates, Turn};
use crate::clients::{JoinChatApi, SendError};
use crate::config::JoinChatConfig;
use crate::domain::joinchat::{Message, Recipient, RecipientField, SendRequest, translate};
use crate::domain::outbound::OutboundRequest;
use crate::store::{BeforeSend, Job, NewOutbound, Store, now_millis};

pub use crate::store::ECHO_WINDOW;

/// A fresh `mId`: 32 hex characters, time-ordered (UUIDv7), within BonyChat's 50-character limit.
/// The random bits come from a thread-local generator: ids must be unique, not secret, and a
/// system call per message would cost more than the rest of the id.
pub fn new_message_id() -> String {
    let millis = u64::try_from(now_millis()).unwrap_or(0);
    let random: [u8; 10] = fastrand::u128(..).to_le_bytes()[..10].try_into().expect("ten bytes");
    uuid::Builder::from_unix_timestamp_millis(millis, &random).into_uuid().simple().to_string()
}

/// The job to store for a validated `/message` request.
pub fn new_outbound_job(
    channel: &str,
    max_queued: u64,
    request: &OutboundRequest,
    recipient_field: RecipientField,
    now: i64,
    trace_context: Option<String>,
) -> NewOutbound {
    NewOutbound {
        channel: channel.to_owned(),
        max_queued,
        m_id: new_message_id(),
        contact: request.contact_id.as_str().to_owned(),
        recipient: Recipient::for_contact(&request.contact_id, recipient_field),
        parts: translate(&request.message),
        now,
        trace_context,
    }
}

/// How far one attempt got.
#[derive(Debug)]
pub struct AttemptOutcome {
    /// How many parts JoinChat has accepted, counting those of earlier attempts.
    pub parts_sent: usize,
    pub end: AttemptEnd,
}

#[derive(Debug)]
pub enum AttemptEnd {
    /// JoinChat accepted every part; the last one left at `last_sent_at` (ms).
    Sent {
        last_sent_at: i64,
    },
    Failed(SendError),
    /// Pacing needs more than JoinChat's `delay` can give: the next part may leave at `until`
    /// (ms). The attempt stops there rather than sleeping in a slot others need.
    Paced {
        until: i64,
    },
    /// The attempt was no longer sure to hold the job when the next part was due to leave: it
    /// stopped before sending it.
    ClaimUnsure,
    /// The channel's send rate holds the next part back until `until` (ms): not an attempt.
    Held {
        until: i64,
    },
    /// JoinChat throttled the channel on the next part: the channel pauses until `until` (ms)
    /// at a lower rate, and the job waits for it without counting an attempt.
    Throttled {
        until: i64,
        reason: String,
    },
}

pub struct OutboundSender {
    api: Arc<dyn JoinChatApi>,
    store: Arc<dyn Store>,
    /// Every channel's send rate; outlives a reload, like the rates themselves.
    rates: Arc<SendRates>,
    page_id: String,
    tag: Option<String>,
    gap: Duration,
    max_sends_per_sec: u32,
}

impl OutboundSender {
    pub fn new(
        api: Arc<dyn JoinChatApi>,
        store: Arc<dyn Store>,
        rates: Arc<SendRates>,
        config: &JoinChatConfig,
    ) -> Self {
        Self {
            api,
            store,
            rates,
            page_id: config.page_id.clone(),
            tag: config.message_tag.clone(),
            gap: config.order_gap,
            max_sends_per_sec: config.max_sends_per_sec,
        }
    }

    /// Sends `job`'s `parts` to `recipient`, from the first one JoinChat has not accepted yet,
    /// stopping at the first one it does not accept; pacing starts from when the contact's
    /// previous send takes effect, as of the claim. The caller holds the job's lease, so no
    /// other send to this contact runs meanwhile, as long as `claim_held` says so: it is asked
    /// before each part leaves.
    pub async fn attempt(
        &self,
        job: &Job,
        recipient: &Recipient,
        parts: &[Message],
        claim_held: &(dyn Fn() -> bool + Sync),
    ) -> AttemptOutcome {
        let (lease, contact) = (job.lease(), job.contact.as_str());
        let first_part = usize::try_from(job.progress).unwrap_or(0);
        let mut last_effective_at = job.contact_last_effective_at;
        let stopped =
            |index: usize, error: SendError| AttemptOutcome { parts_sent: index, end: AttemptEnd::Failed(error) };
        let store_failed = |e: crate::store::StoreError| SendError::Transient {
            reason: e.to_string(),
            retry_after: None,
            status: None,
        };

        let mut last_sent_at = self.store.now();
        for (index, message) in parts.iter().enumerate().skip(first_part) {
            match self.rates.take(&job.channel, self.max_sends_per_sec).await {
                Ok(Turn::Go) => {}
                Ok(Turn::HeldUntil(until)) => {
                    return AttemptOutcome { parts_sent: index, end: AttemptEnd::Held { until } };
                }
                Err(e) => return stopped(index, store_failed(e)),
            }
            let planned_at = self.store.now();
            let slot = pacing::plan(self.gap, last_effective_at, planned_at);
            if !slot.wait.is_zero() {
                let until = planned_at.saturating_add(i64::try_from(slot.wait.as_millis()).unwrap_or(i64::MAX));
                return AttemptOutcome { parts_sent: index, end: AttemptEnd::Paced { until } };
            }
            let sent_at = self.store.now();
            last_sent_at = sent_at;
            let effective_at = slot.effective_at(sent_at);
            let before = BeforeSend {
                channel: job.channel.clone(),
                contact: contact.to_owned(),
                effective_at,
                pacing_until: effective_at.saturating_add(i64::try_from(self.gap.as_millis()).unwrap_or(i64::MAX)),
                echo_fingerprint: message.echo_fingerprint(),
                echo_expires_at: sent_at + i64::try_from(ECHO_WINDOW.as_millis()).unwrap_or(i64::MAX),
            };
            if let Err(e) = self.store.before_send(before).await {
                return stopped(index, store_failed(e));
            }
            last_effective_at = Some(effective_at);
            if !claim_held() {
                return AttemptOutcome { parts_sent: index, end: AttemptEnd::ClaimUnsure };
            }

            let request =
                SendRequest { page_id: &self.page_id, recipient, message, tag: self.tag.as_deref(), delay: slot.delay };
            match self.api.send(&request).await {
                Ok(()) => {}
                Err(SendError::Throttled { reason, retry_after, .. }) => {
                    let until = match self.rates.throttled(&job.channel, self.max_sends_per_sec, retry_after).await {
                        Ok(until) => until,
                        // The pause is not shared this time; this job still waits its share.
                        Err(_) => self.store.now() + crate::store::send_rate::DEFAULT_PAUSE_MS,
                    };
                    return AttemptOutcome { parts_sent: index, end: AttemptEnd::Throttled { until, reason } };
                }
                Err(error) => return stopped(index, error),
            }
            tracing::debug!(
                job = lease.id,
                part = index + 1,
                parts = parts.len(),
                delay = slot.delay,
                "part accepted by JoinChat"
            );
            let accepted = index + 1;
            if accepted < parts.len()
                && let Err(e) = self
                    .store
                    .record_progress(lease, u32::try_from(accepted).unwrap_or(u32::MAX), self.store.now())
                    .await
            {
                return stopped(accepted, store_failed(e));
            }
        }
        AttemptOutcome { parts_sent: parts.len(), end: AttemptEnd::Sent { last_sent_at } }
    }
}
