//! Delivery while BonyChat waits: the job is sent before `/message` answers.
//!
//! Messages to one contact are delivered one at a time, in the order their requests took the
//! contact's lock (tokio's mutex is fair, so that is arrival order). A transient failure is
//! retried at most twice within about two seconds, resuming at the first part JoinChat has not
//! accepted. The job runs in its own task: if BonyChat hangs up mid-way, the parts already
//! started still go out in order rather than leaving half a message.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::task::TaskTracker;

use super::contact_locks::ContactLocks;
use super::outbound::{OutboundJob, OutboundSender};
use crate::clients::SendError;

/// Waits before the second and third attempts: about two seconds in all, short enough for
/// BonyChat to be answered while it still waits.
const RETRY_WAITS: [Duration; 2] = [Duration::from_millis(500), Duration::from_millis(1500)];

/// Why a message could not be delivered while BonyChat waited.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeliveryFailure {
    /// JoinChat refused it for good.
    Rejected { reason: String },
    /// JoinChat stayed unreachable or overloaded through every attempt.
    Unavailable { reason: String },
}

#[derive(Clone)]
pub struct ImmediateDelivery {
    sender: Arc<OutboundSender>,
    contacts: Arc<ContactLocks>,
    tasks: TaskTracker,
}

impl ImmediateDelivery {
    /// `tasks` tracks the delivery tasks so that shutdown can wait for them.
    pub fn new(sender: OutboundSender, tasks: TaskTracker) -> Self {
        Self {
            sender: Arc::new(sender),
            contacts: Arc::new(ContactLocks::default()),
            tasks,
        }
    }

    pub async fn deliver(&self, job: OutboundJob) -> Result<(), DeliveryFailure> {
        let sender = Arc::clone(&self.sender);
        let contacts = Arc::clone(&self.contacts);
        let task = self.tasks.spawn(async move {
            let _turn = contacts.lock(job.contact.as_str()).await;
            deliver_with_retries(&sender, &job).await
        });
        task.await.unwrap_or_else(|panic| {
            tracing::error!(error = %panic, "delivery task failed");
            Err(DeliveryFailure::Unavailable {
                reason: "the relay failed while delivering".into(),
            })
        })
    }
}

async fn deliver_with_retries(
    sender: &OutboundSender,
    job: &OutboundJob,
) -> Result<(), DeliveryFailure> {
    let mut next_part = 0;
    for attempt in 1.. {
        let outcome = sender.send_from(job, next_part).await;
        next_part = outcome.parts_sent;
        let log = |outcome: &str, reason: &str| {
            tracing::info!(
                direction = "outbound",
                contact = %job.contact,
                m_id = %job.m_id,
                attempt,
                parts_sent = next_part,
                parts = job.parts.len(),
                outcome,
                reason,
                "job attempt"
            );
        };
        match outcome.result {
            Ok(()) => {
                log("sent", "");
                return Ok(());
            }
            Err(SendError::Permanent { reason }) => {
                log("rejected", &reason);
                return Err(DeliveryFailure::Rejected { reason });
            }
            Err(SendError::Transient {
                reason,
                retry_after,
            }) => {
                let Some(&planned) = RETRY_WAITS.get(attempt - 1) else {
                    log("gave_up", &reason);
                    return Err(DeliveryFailure::Unavailable { reason });
                };
                let wait = planned.max(retry_after.unwrap_or_default());
                if wait > RETRY_WAITS.iter().sum() {
                    log("gave_up", &reason);
                    return Err(DeliveryFailure::Unavailable {
                        reason: format!("{reason} (asked to retry after {} s)", wait.as_secs()),
                    });
                }
                log("retrying", &reason);
                tokio::time::sleep(wait).await;
            }
        }
    }
    unreachable!("the attempt loop only ends by returning")
}
