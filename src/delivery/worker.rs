//! The workers: claim due jobs from the store, attempt them, record the outcome.
//!
//! One dispatcher claims jobs while it has free slots; each claimed job runs in its own task.
//! The store hands out only the oldest queued job of a contact, and only when no other job of
//! that contact is leased, so contacts are served in parallel while each contact's jobs go one
//! at a time in order. Each direction has slots of its own, so a flood towards BonyChat never
//! delays messages towards JoinChat, or the other way round. A slot is only ever held by a
//! running HTTP request: a job that must wait for pacing is rescheduled, not slept on. The
//! dispatcher wakes when a job is stored or finished, and polls for retries coming due.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, Semaphore, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::inbound::InboundPoster;
use super::outbound::AttemptEnd;
use super::outbound::OutboundSender;
use super::retry::RetrySchedule;
use crate::clients::SendError;
use crate::domain::bonychat::WebhookEvent;
use crate::domain::joinchat::{Message, Recipient};
use crate::monitoring::Outcome;
use crate::store::{Direction, Finish, Job, Payload, Store, now_millis};

/// How long a claim holds a job; renewed while the attempt runs, so only a dead worker's
/// jobs ever see it run out.
const LEASE: Duration = Duration::from_secs(60);
/// How often the dispatcher looks for retries coming due when nothing wakes it.
const POLL_INTERVAL: Duration = Duration::from_millis(200);
/// How long the dispatcher leaves a failing store alone.
const STORE_FAILURE_PAUSE: Duration = Duration::from_secs(1);
/// Attempts in flight at once per direction, all contacts together.
const MAX_IN_FLIGHT_PER_DIRECTION: usize = 64;

/// What the first attempt of an outbound job did, for the `/message` request still waiting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FirstAttempt {
    Sent,
    /// Transient failure or not attempted yet: the relay keeps trying.
    Pending,
    Rejected(String),
}

/// `/message` requests waiting for their job's first attempt, by `mId`.
#[derive(Default)]
pub struct Waiters {
    waiting: Mutex<HashMap<String, oneshot::Sender<FirstAttempt>>>,
}

impl Waiters {
    pub fn register(&self, m_id: &str) -> oneshot::Receiver<FirstAttempt> {
        let (tx, rx) = oneshot::channel();
        self.waiting.lock().expect("waiters poisoned").insert(m_id.to_owned(), tx);
        rx
    }

    /// Takes the waiter of `m_id`; whoever takes it decides what the request is answered.
    pub fn take(&self, m_id: &str) -> Option<oneshot::Sender<FirstAttempt>> {
        self.waiting.lock().expect("waiters poisoned").remove(m_id)
    }
}

/// The retry schedules, per upstream.
#[derive(Debug, Clone)]
pub struct Retries {
    pub joinchat: RetrySchedule,
    pub bonychat: RetrySchedule,
}

pub struct Worker {
    store: Arc<dyn Store>,
    outbound: OutboundSender,
    inbound: InboundPoster,
    waiters: Arc<Waiters>,
    wake: Arc<Notify>,
    retries: Retries,
    owner: String,
}

impl Worker {
    pub fn new(
        store: Arc<dyn Store>,
        outbound: OutboundSender,
        inbound: InboundPoster,
        waiters: Arc<Waiters>,
        wake: Arc<Notify>,
        retries: Retries,
    ) -> Self {
        Self {
            store,
            outbound,
            inbound,
            waiters,
            wake,
            retries,
            owner: format!("relay-{}", uuid::Uuid::new_v4().simple()),
        }
    }

    /// The lease owner name of this process.
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// Claims and runs jobs until `stop`; the attempts it started go on in `tasks` until they
    /// end or `abort` is cancelled (their jobs then stay queued, to be attempted again).
    pub async fn run(self: Arc<Self>, stop: CancellationToken, tasks: TaskTracker, abort: CancellationToken) {
        let slots = Direction::ALL.map(|direction| (direction, Arc::new(Semaphore::new(MAX_IN_FLIGHT_PER_DIRECTION))));
        while !stop.is_cancelled() {
            let mut claimed = Ok(());
            for (direction, slots) in &slots {
                claimed = claimed.and(self.claim_into(*direction, slots, &tasks, &abort).await);
            }
            // A failing store is not asked again at once: its error would fill the log.
            let pause = match claimed {
                Ok(()) => POLL_INTERVAL,
                Err(()) => STORE_FAILURE_PAUSE,
            };
            tokio::select! {
                () = stop.cancelled() => break,
                () = self.wake.notified(), if pause == POLL_INTERVAL => {}
                () = tokio::time::sleep(pause) => {}
            }
        }
        tracing::info!("workers stopped claiming");
    }

    async fn claim_into(
        self: &Arc<Self>,
        direction: Direction,
        slots: &Arc<Semaphore>,
        tasks: &TaskTracker,
        abort: &CancellationToken,
    ) -> Result<(), ()> {
        loop {
            let free = slots.available_permits();
            if free == 0 {
                return Ok(());
            }
            let now = now_millis();
            let lease_until = now.saturating_add(millis(LEASE));
            let jobs = match self.store.claim(&self.owner, direction, now, lease_until, free).await {
                Ok(jobs) => jobs,
                Err(e) => {
                    tracing::error!(error = %e, "cannot claim jobs");
                    return Err(());
                }
            };
            if jobs.is_empty() {
                return Ok(());
            }
            for job in jobs {
                let permit = Arc::clone(slots).try_acquire_owned().expect("claimed no more than the free slots");
                let this = Arc::clone(self);
                let abort = abort.clone();
                tasks.spawn(async move {
                    tokio::select! {
                        () = this.run_attempt(job) => {}
                        () = abort.cancelled() => {}
                    }
                    drop(permit);
                    // The contact's next job, if any, is claimable now.
                    this.wake.notify_one();
                });
            }
        }
    }

    /// Runs one attempt while keeping its lease alive.
    async fn run_attempt(&self, job: Job) {
        let heartbeat = async {
            loop {
                tokio::time::sleep(LEASE / 3).await;
                if let Err(e) = self.store.renew(&self.owner, vec![job.id], now_millis() + millis(LEASE)).await {
                    tracing::warn!(job = job.id, error = %e, "cannot renew a lease");
                }
            }
        };
        let attempt = async {
            match &job.payload {
                Ok(Payload::Send { recipient, parts }) => {
                    self.attempt_outbound(&job, recipient, parts).await;
                }
                Ok(Payload::Event { event }) => self.attempt_inbound(&job, event.clone()).await,
                Err(reason) => self.dead_letter_unreadable(&job, reason).await,
            }
        };
        tokio::select! {
            () = attempt => {}
            () = heartbeat => {}
        }
    }

    async fn attempt_outbound(&self, job: &Job, recipient: &Recipient, parts: &[Message]) {
        let first_part = usize::try_from(job.progress).unwrap_or(0);
        let outcome = self
            .outbound
            .attempt(job.id, &job.contact, recipient, parts, first_part, job.contact_last_effective_at)
            .await;
        let progress = u32::try_from(outcome.parts_sent).unwrap_or(u32::MAX);
        let attempt = job.attempts + 1;
        let result = match outcome.end {
            AttemptEnd::Paced { until } => {
                // Not an attempt: the job comes back when pacing allows, its slot free meanwhile,
                // and a waiting `/message` request is still answered by the attempt that sends.
                tracing::debug!(job = job.id, contact = %job.contact, wait_ms = until - now_millis(), "paced");
                crate::monitoring::attempt(job.direction, Outcome::Paced, job.created_at);
                self.record(job, Finish::Defer { progress, next_attempt_at: until }).await;
                return;
            }
            AttemptEnd::Sent { last_sent_at } => Ok(last_sent_at),
            AttemptEnd::Failed(error) => Err(error),
        };
        // Only the first attempt can still be answered to BonyChat's waiting request.
        let waiter = if job.attempts == 0 { self.waiters.take(&job.m_id) } else { None };

        let (finish, first, label, reason) = match result {
            Ok(sent_at) => (Finish::Delivered { progress, sent_at }, FirstAttempt::Sent, Outcome::Sent, None),
            Err(SendError::Permanent { reason }) if waiter.is_some() => (
                Finish::Rejected { progress, error: reason.clone() },
                FirstAttempt::Rejected(reason.clone()),
                Outcome::Rejected,
                Some(reason),
            ),
            Err(SendError::Permanent { reason }) => (
                Finish::Dead { progress, error: reason.clone(), failed_receipt: true },
                FirstAttempt::Pending,
                Outcome::Rejected,
                Some(reason),
            ),
            Err(SendError::Transient { reason, retry_after }) => {
                let (finish, label) =
                    after_failure(&self.retries.joinchat, attempt, progress, &reason, retry_after, true);
                (finish, FirstAttempt::Pending, label, Some(reason))
            }
        };
        log_attempt(job, attempt, label, reason.as_deref());
        let rejected_reason = match &first {
            FirstAttempt::Rejected(reason) => Some(reason.clone()),
            _ => None,
        };
        if self.record(job, finish).await
            && let Some(waiter) = waiter
            && waiter.send(first).is_err()
            && let Some(reason) = rejected_reason
        {
            // BonyChat hung up before hearing the 400: tell it by receipt instead.
            if let Err(e) = self.store.queue_failed_receipt(&job.contact, &job.m_id, &reason, now_millis()).await {
                tracing::error!(job = job.id, error = %e, "cannot queue a failed receipt");
            }
        }
    }

    async fn attempt_inbound(&self, job: &Job, event: WebhookEvent) {
        let receipt = match &event {
            WebhookEvent::MessageStatus { status, .. } => Some(status.value),
            _ => None,
        };
        let outcome = self.inbound.attempt(&job.contact, event, job.contact_introduced).await;
        let attempt = job.attempts + 1;
        let (finish, label, reason) = match outcome.result {
            Ok(()) => {
                if outcome.introduced
                    && let Err(e) = self.store.mark_introduced(&job.contact).await
                {
                    tracing::warn!(contact = %job.contact, error = %e, "cannot record that BonyChat knows the contact");
                }
                if let Some(value) = receipt {
                    crate::monitoring::receipt_posted(value);
                }
                (Finish::Delivered { progress: 1, sent_at: now_millis() }, Outcome::Sent, None)
            }
            Err(SendError::Permanent { reason }) => (
                Finish::Dead { progress: 0, error: reason.clone(), failed_receipt: false },
                Outcome::Rejected,
                Some(reason),
            ),
            Err(SendError::Transient { reason, retry_after }) => {
                let (finish, label) = after_failure(&self.retries.bonychat, attempt, 0, &reason, retry_after, false);
                (finish, label, Some(reason))
            }
        };
        log_attempt(job, attempt, label, reason.as_deref());
        self.record(job, finish).await;
    }

    /// A job whose stored payload cannot be read can never be delivered: it is dead-lettered
    /// with the reason (an outbound one with a `failed` receipt, so BonyChat shows it), and the
    /// rest of the queue goes on.
    async fn dead_letter_unreadable(&self, job: &Job, reason: &str) {
        let failed_receipt = job.direction == Direction::Outbound;
        tracing::error!(job = job.id, direction = job.direction.as_str(), reason, "dead-lettering an unreadable job");
        let finish = Finish::Dead { progress: job.progress, error: reason.to_owned(), failed_receipt };
        crate::monitoring::attempt(job.direction, Outcome::Dead, job.created_at);
        self.record(job, finish).await;
    }

    /// Records the outcome; on failure the lease runs out and the job is attempted again.
    async fn record(&self, job: &Job, finish: Finish) -> bool {
        match self.store.finish(&self.owner, job.id, finish, now_millis()).await {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(job = job.id, error = %e, "cannot record an attempt; the job will be attempted again");
                false
            }
        }
    }
}

/// After a transient failure: the next attempt on `schedule`, or a dead letter when it is used
/// up (with a `failed` receipt for BonyChat when `failed_receipt`).
fn after_failure(
    schedule: &RetrySchedule,
    attempt: u32,
    progress: u32,
    reason: &str,
    retry_after: Option<Duration>,
    failed_receipt: bool,
) -> (Finish, Outcome) {
    match schedule.next_delay(attempt, retry_after, fastrand::f64()) {
        Some(delay) => {
            let next_attempt_at = now_millis().saturating_add(millis(delay));
            (Finish::Retry { progress, next_attempt_at, error: reason.to_owned() }, Outcome::Retry)
        }
        None => {
            let error = format!("gave up after {attempt} attempts: {reason}");
            (Finish::Dead { progress, error, failed_receipt }, Outcome::Dead)
        }
    }
}

fn log_attempt(job: &Job, attempt: u32, outcome: Outcome, reason: Option<&str>) {
    crate::monitoring::attempt(job.direction, outcome, job.created_at);
    let (direction, outcome) = (job.direction.as_str(), outcome.as_str());
    match reason {
        None => {
            tracing::info!(direction, contact = %job.contact, m_id = %job.m_id, job = job.id, attempt, outcome, "job attempt");
        }
        Some(reason) => {
            tracing::warn!(direction, contact = %job.contact, m_id = %job.m_id, job = job.id, attempt, outcome, reason, "job attempt");
        }
    }
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}
