//! The workers: claim due jobs from the store, attempt them, record the outcome.
//!
//! One dispatcher claims jobs while it has free slots; each claimed job runs in its own task.
//! The store hands out only the oldest queued job of a contact, and only when no other job of
//! that contact is leased, so contacts are served in parallel while each contact's jobs go one
//! at a time in order. Each direction has slots of its own, so a flood towards BonyChat never
//! delays messages towards JoinChat, or the other way round. A slot is only ever held by a
//! running HTTP request: a job that must wait for pacing is rescheduled, not slept on. The
//! dispatcher wakes on the store's change signal (a job stored or finished, in this replica or,
//! for a shared store, in any), and polls for retries coming due.
//!
//! A `/message` request takes its own job's first attempt here too ([`Worker::first_attempt`]),
//! in the replica that took the request, so its answer can say what JoinChat did. That attempt
//! takes a slot like any other: when none is free, the job is handed to the dispatcher and the
//! request answers as for a job it could not attempt in time, so a burst of requests never
//! becomes as many simultaneous upstream calls.
//!
//! An attempt holds its job by a lease, renewed while it runs. A renewal that finds the job
//! claimed by someone else, or a lease that may have run out unrenewed (a replica paused past
//! it), stops the attempt before its next upstream request ([`ClaimHold`]).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, Semaphore, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::breaker::{Answer, Breakers};
use super::channels::{Channel, Live};
use super::hold::ClaimHold;
use super::outbound::AttemptEnd;
use super::retry::RetrySchedule;
use crate::clients::SendError;
use crate::domain::bonychat::WebhookEvent;
use crate::domain::joinchat::{Message, Recipient};
use crate::monitoring::Outcome;
use crate::store::{Claim, Direction, Enqueued, Finish, FirstClaim, Job, Payload, Store};
use crate::traces::Traces;

/// The most an attempt trusts its own reading of the store's clock: it stops this long before
/// its lease ends unrenewed (a quarter of the lease when that is shorter).
const LEASE_MARGIN: Duration = Duration::from_secs(1);
/// How often the dispatcher looks for retries coming due when nothing wakes it.
const POLL_INTERVAL: Duration = Duration::from_millis(200);
/// How often a waiting `/message` request tries to claim its job when nothing wakes it: the
/// previous job of its contact ended without a signal (its replica died and the lease ran out).
const OWN_CLAIM_INTERVAL: Duration = Duration::from_millis(250);
/// How long the dispatcher leaves a failing store alone.
const STORE_FAILURE_PAUSE: Duration = Duration::from_secs(1);
/// Attempts in flight at once per direction, all contacts together: the dispatcher's and the
/// `/message` requests' first attempts alike.
const MAX_IN_FLIGHT_PER_DIRECTION: usize = 64;
/// The most of a direction's slots one channel holds when the relay serves several: the rest
/// stay free for the others, so one channel's flood or hanging upstream never delays another's
/// messages (SPEC §5). A single channel has them all.
const CHANNEL_SHARE: usize = MAX_IN_FLIGHT_PER_DIRECTION / 2;

/// What the first attempt of an outbound job did, for the `/message` request waiting for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FirstAttempt {
    Sent,
    /// Transient failure or not attempted yet: the relay keeps trying.
    Pending,
    Rejected(String),
    /// Pacing holds the message until `until` (ms, the store's clock): not an attempt yet.
    Paced {
        until: i64,
    },
}

/// The retry schedules, per upstream.
#[derive(Debug, Clone)]
pub struct Retries {
    pub joinchat: RetrySchedule,
    pub bonychat: RetrySchedule,
}

pub struct Worker {
    store: Arc<dyn Store>,
    /// The channels served: each attempt uses its job's channel as it was when the attempt began.
    channels: Arc<Live>,
    retries: Retries,
    /// How long a claim holds a job unrenewed (`RELAY_LEASE_SECS`): renewed every third of it
    /// while the attempt runs, so only a dead worker's jobs see it run out, and another replica
    /// takes them over after at most this long.
    lease: Duration,
    owner: String,
    /// Attempts in flight per direction ([`Direction::ALL`]'s order).
    slots: [Arc<Semaphore>; 2],
    /// Attempts in flight per channel and direction, for [`CHANNEL_SHARE`].
    shares: Arc<Shares>,
    /// Channels whose upstream keeps failing rest from claims and first attempts.
    breakers: Breakers,
    /// Every attempt running, the dispatcher's and the requests' alike.
    attempts: TaskTracker,
    /// Cancelled when the shutdown grace is over: attempts still running stop, their jobs stay
    /// queued to be attempted again.
    abort: CancellationToken,
    /// An attempt ended and gave its slot back, while the dispatcher was short of slots.
    slot_freed: Notify,
    /// Whether the dispatcher stopped claiming for want of a slot: only then does an attempt
    /// that ends wake it (otherwise every attempt's end would cost a claim).
    short_of_slots: std::sync::atomic::AtomicBool,
    /// The directory generation the breakers were last kept for: a reload ends every rest.
    breakers_of: std::sync::atomic::AtomicU64,
    /// Each attempt is a span of its job's trace (SPEC §6).
    traces: Traces,
}

impl Worker {
    pub fn new(store: Arc<dyn Store>, channels: Arc<Live>, retries: Retries, lease: Duration) -> Self {
        Self {
            store,
            channels,
            retries,
            lease,
            owner: format!("relay-{}", uuid::Uuid::new_v4().simple()),
            slots: Direction::ALL.map(|_| Arc::new(Semaphore::new(MAX_IN_FLIGHT_PER_DIRECTION))),
            shares: Arc::default(),
            breakers: Breakers::default(),
            attempts: TaskTracker::new(),
            abort: CancellationToken::new(),
            slot_freed: Notify::new(),
            short_of_slots: std::sync::atomic::AtomicBool::new(false),
            breakers_of: std::sync::atomic::AtomicU64::new(0),
            traces: Traces::off(),
        }
    }

    /// Makes each attempt a span of its job's trace, exported by `traces`.
    pub fn with_traces(mut self, traces: Traces) -> Self {
        self.traces = traces;
        self
    }

    /// The lease owner name of this process.
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// The attempts running, for the shutdown to wait for.
    pub fn attempts(&self) -> &TaskTracker {
        &self.attempts
    }

    /// Stops the attempts still running (their jobs stay queued).
    pub fn abort(&self) {
        self.abort.cancel();
    }

    /// Claims and runs jobs until `stop`; the attempts it started go on until they end or
    /// [`Self::abort`].
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let mut changes = self.store.changes();
        while !stop.is_cancelled() {
            // Seen before claiming: a change during the claim wakes the next round.
            changes.borrow_and_update();
            let mut claimed = Ok(());
            for direction in Direction::ALL {
                claimed = claimed.and(self.claim_into(direction).await);
            }
            // A failing store is not asked again at once: its error would fill the log.
            let healthy = claimed.is_ok();
            let pause = if healthy { POLL_INTERVAL } else { STORE_FAILURE_PAUSE };
            tokio::select! {
                () = stop.cancelled() => break,
                Ok(()) = changes.changed(), if healthy => {}
                () = self.slot_freed.notified(), if healthy => {}
                () = tokio::time::sleep(pause) => {}
            }
        }
        tracing::info!("workers stopped claiming");
    }

    fn slots(&self, direction: Direction) -> &Arc<Semaphore> {
        &self.slots[direction.index()]
    }

    /// A slot of `direction` for an attempt of `channel`, unless every slot is busy or the
    /// channel holds its share already.
    fn slot(&self, direction: Direction, channel: &str, share: usize) -> Option<Slot> {
        let channel_held = self.shares.of(channel, direction, share).try_acquire_owned().ok()?;
        let permit = Arc::clone(self.slots(direction)).try_acquire_owned().ok()?;
        Some(Slot { _permit: permit, _channel_held: channel_held })
    }

    /// A slot for a `/message` request's own attempt, waited for until `deadline`: requests of a
    /// busy channel queue for its share in turn (instead of each handing its job to the
    /// dispatcher, which would put it behind the next message to its contact).
    async fn slot_by(&self, direction: Direction, channel: &str, share: usize, deadline: Instant) -> Option<Slot> {
        let channel_share = self.shares.of(channel, direction, share);
        let channel_held = tokio::time::timeout_at(deadline, channel_share.acquire_owned()).await.ok()?.ok()?;
        let permit =
            tokio::time::timeout_at(deadline, Arc::clone(self.slots(direction)).acquire_owned()).await.ok()?.ok()?;
        Some(Slot { _permit: permit, _channel_held: channel_held })
    }

    async fn claim_into(self: &Arc<Self>, direction: Direction) -> Result<(), ()> {
        let slots = self.slots(direction);
        loop {
            let free = slots.available_permits();
            if free == 0 {
                self.wait_for_slots();
                // An attempt that ended before the flag was up woke nobody: look once more.
                if slots.available_permits() == 0 {
                    return Ok(());
                }
                continue;
            }
            let directory = self.channels.current();
            let generation = self.channels.generation();
            if self.breakers_of.swap(generation, std::sync::atomic::Ordering::SeqCst) != generation {
                // The operator fixed something (a rotated secret, an upstream URL): try at once.
                self.breakers.forget();
            }
            let share = share_of(directory.len());
            let now = self.store.now();
            let mut resting = self.breakers.resting_channels(direction, Instant::now());
            if direction == Direction::Outbound {
                // Channels that cannot send what their waiting attempts already want.
                resting.extend(self.channels.rates().busy_channels(now));
            }
            let Some((channels, per_channel)) = self.shares.eligible(directory.names(), direction, share, &resting)
            else {
                self.wait_for_slots();
                return Ok(());
            };
            let lease_until = now.saturating_add(millis(self.lease));
            let claim = Claim {
                owner: self.owner.clone(),
                direction,
                now,
                lease_until,
                limit: free,
                channels,
                per_channel: per_channel.min(free),
            };
            let jobs = match self.store.claim(claim).await {
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
                let Some(channel) = directory.channel(&job.channel).cloned() else {
                    // Claimed as the channel was being removed: it waits, queued, for its return.
                    self.hand_back(&job, job.progress).await;
                    continue;
                };
                let Some(slot) = self.slot(direction, &job.channel, share) else {
                    // A `/message` request took the slot meanwhile: the job waits for the next.
                    self.wait_for_slots();
                    self.hand_back(&job, job.progress).await;
                    continue;
                };
                let this = Arc::clone(self);
                self.spawn_attempt(async move {
                    this.run_attempt(job, channel, None).await;
                    drop(slot);
                    this.slot_given_back();
                });
            }
        }
    }

    /// The dispatcher stops claiming for want of a slot: the next attempt to end wakes it.
    fn wait_for_slots(&self) {
        self.short_of_slots.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// An attempt ended. The contact's next job, if any, is announced by the store; only a
    /// dispatcher short of slots needs waking for the slot itself.
    fn slot_given_back(&self) {
        if self.short_of_slots.swap(false, std::sync::atomic::Ordering::SeqCst) {
            self.slot_freed.notify_one();
        }
    }

    fn spawn_attempt(&self, attempt: impl Future<Output = ()> + Send + 'static) {
        let abort = self.abort.clone();
        self.attempts.spawn(async move {
            tokio::select! {
                () = attempt => {}
                () = abort.cancelled() => {}
            }
        });
    }

    /// How a `/message` request's job is claimed for its first attempt: at once when it heads
    /// its contact's queue, else reserved for the request for `wait`.
    pub fn first_claim(&self, now: i64, wait: Duration) -> FirstClaim {
        FirstClaim {
            owner: self.owner.clone(),
            lease_until: now.saturating_add(millis(self.lease)),
            reserved_until: now.saturating_add(millis(wait)),
        }
    }

    /// Takes the first attempt of the job a `/message` request stored for `contact` of `channel`,
    /// within `wait`: at once when it was leased with the insert, else as soon as it heads its
    /// contact's queue (woken when an attempt of that contact ends, whichever replica made it).
    /// What the attempt did decides the answer; past `wait`, the request is answered `Pending`
    /// and the attempt goes on.
    pub async fn first_attempt(
        self: &Arc<Self>,
        channel: &Arc<Channel>,
        share: usize,
        contact: &str,
        enqueued: Enqueued,
        wait: Duration,
    ) -> FirstAttempt {
        let deadline = Instant::now() + wait;
        let mut claimed = enqueued.claimed;
        // Only watched when the job waits behind another: the usual request takes its job at once.
        let mut moved = claimed.is_none().then(|| self.store.watch_queue(&channel.name, contact));
        loop {
            if let Some(leased) = claimed.take() {
                if self.breakers.resting(&channel.name, Direction::Outbound, Instant::now()) {
                    // JoinChat keeps failing for this channel: the message waits, stored, for
                    // the rest to end instead of failing once more.
                    drop(leased);
                    return FirstAttempt::Pending;
                }
                let Some(slot) = self.slot_by(Direction::Outbound, &channel.name, share, deadline).await else {
                    // Every slot stayed busy: the lease goes back as when a client hangs up, and
                    // the dispatcher takes the job once a slot is free.
                    drop(leased);
                    return FirstAttempt::Pending;
                };
                let job = leased.take();
                let (answer, outcome) = oneshot::channel();
                let this = Arc::clone(self);
                let channel = Arc::clone(channel);
                self.spawn_attempt(async move {
                    this.run_attempt(job, channel, Some(answer)).await;
                    drop(slot);
                    this.slot_given_back();
                });
                match tokio::time::timeout_at(deadline, outcome).await {
                    Ok(Ok(FirstAttempt::Paced { until })) => {
                        let paced_for = Duration::from_millis(u64::try_from(until - self.store.now()).unwrap_or(0));
                        if Instant::now() + paced_for >= deadline {
                            return FirstAttempt::Pending;
                        }
                        tokio::time::sleep(paced_for).await;
                    }
                    Ok(Ok(outcome)) => return outcome,
                    Ok(Err(_)) | Err(_) => return FirstAttempt::Pending,
                }
            }
            if Instant::now() >= deadline {
                return FirstAttempt::Pending;
            }
            let moved = moved.get_or_insert_with(|| self.store.watch_queue(&channel.name, contact));
            let now = self.store.now();
            match self.store.claim_own(&self.owner, enqueued.id, now, now.saturating_add(millis(self.lease))).await {
                Ok(Some(job)) => {
                    claimed = Some(job);
                    continue;
                }
                Ok(None) => {}
                // Stored all the same: a worker attempts it once the reservation ends.
                Err(_) => return FirstAttempt::Pending,
            }
            tokio::select! {
                () = moved.moved() => {}
                () = tokio::time::sleep(OWN_CLAIM_INTERVAL) => {}
                () = tokio::time::sleep_until(deadline) => return FirstAttempt::Pending,
            }
        }
    }

    /// Gives a leased job back, with `progress` parts sent, for any worker to claim at once; if
    /// that fails (the lease was taken over meanwhile, or the store is away), the job is
    /// claimed again all the same.
    async fn hand_back(&self, job: &Job, progress: u32) {
        let now = self.store.now();
        if let Err(e) = self.store.finish(job.lease(), Finish::Release { progress }, now).await {
            tracing::info!(job = job.id, error = %e, "cannot hand a job back; it is claimed again all the same");
        }
    }

    /// Runs one attempt while keeping its lease alive; `answer` is the `/message` request
    /// waiting for this first attempt, if one is.
    async fn run_attempt(&self, job: Job, channel: Arc<Channel>, answer: Option<oneshot::Sender<FirstAttempt>>) {
        let lease_until = job.lease_until.unwrap_or_else(|| self.store.now().saturating_add(millis(self.lease)));
        let hold = ClaimHold::new(lease_until, LEASE_MARGIN.min(self.lease / 4));
        let heartbeat = async {
            loop {
                tokio::time::sleep(self.lease / 3).await;
                let lease_until = self.store.now().saturating_add(millis(self.lease));
                match self.store.renew(vec![job.lease()], lease_until).await {
                    Ok(renewed) if renewed.contains(&job.lease()) => hold.renewed(lease_until),
                    Ok(_) => {
                        hold.lose();
                        // Nothing of this attempt can be recorded any more; the new holder
                        // attempts the job from what was recorded.
                        tracing::warn!(
                            job = job.id,
                            direction = job.direction.as_str(),
                            "another worker took this job over (this lease ran out); stopping the attempt"
                        );
                        return;
                    }
                    Err(e) => tracing::warn!(job = job.id, error = %e, "cannot renew a lease"),
                }
            }
        };
        let span = self.traces.attempt(&job);
        let attempt = async {
            match &job.payload {
                Ok(Payload::Send { recipient, parts }) => {
                    self.attempt_outbound(&job, &channel, &hold, recipient, parts, answer).await;
                }
                Ok(Payload::Event { event }) => self.attempt_inbound(&job, &channel, &hold, event.clone()).await,
                Err(reason) => self.dead_letter_unreadable(&job, reason).await,
            }
        };
        span.run(async {
            tokio::select! {
                () = attempt => {}
                () = heartbeat => crate::traces::attempt_ended("lease_lost", None, None),
            }
        })
        .await;
    }

    /// Feeds the channel's breaker with how its upstream answered `job`'s attempt.
    fn upstream_answered(&self, job: &Job, failed: bool) {
        let answer = if failed { Answer::Failed } else { Answer::Answered };
        if let Some(rest) = self.breakers.record(&job.channel, job.direction, answer, Instant::now()) {
            tracing::warn!(
                channel = %job.channel,
                direction = job.direction.as_str(),
                rest_ms = u64::try_from(rest.as_millis()).unwrap_or(u64::MAX),
                failures_in_a_row = super::breaker::TRIP_AFTER,
                "the channel's upstream keeps failing; its deliveries rest (jobs stay queued, retries untouched)"
            );
        }
    }

    /// An attempt stopped before a request because it was no longer sure to hold its claim.
    async fn stopped_unsure_of_claim(&self, job: &Job, hold: &ClaimHold, progress: u32) {
        if hold.is_lost() {
            return;
        }
        crate::traces::attempt_ended("handed_back", None, None);
        // The lease may have run out while this process was paused or the store away: whoever
        // claims the job next resumes it from what was recorded.
        tracing::warn!(
            job = job.id,
            direction = job.direction.as_str(),
            "the lease may have run out; stopping the attempt"
        );
        self.hand_back(job, progress).await;
    }

    async fn attempt_outbound(
        &self,
        job: &Job,
        channel: &Channel,
        hold: &ClaimHold,
        recipient: &Recipient,
        parts: &[Message],
        answer: Option<oneshot::Sender<FirstAttempt>>,
    ) {
        let claim_held = || hold.is_held(self.store.now());
        let outcome = channel.outbound.attempt(job, recipient, parts, &claim_held).await;
        let progress = u32::try_from(outcome.parts_sent).unwrap_or(u32::MAX);
        let attempt = job.attempts + 1;
        let result = match outcome.end {
            AttemptEnd::ClaimUnsure => {
                self.stopped_unsure_of_claim(job, hold, progress).await;
                return;
            }
            AttemptEnd::Paced { until } => {
                tracing::debug!(job = job.id, contact = %job.contact, wait_ms = until - self.store.now(), "paced");
                self.defer(job, progress, until, Outcome::Paced, answer).await;
                return;
            }
            AttemptEnd::Held { until } => {
                tracing::debug!(
                    job = job.id,
                    wait_ms = until - self.store.now(),
                    "held back by the channel's send rate"
                );
                self.defer(job, progress, until, Outcome::Held, answer).await;
                return;
            }
            AttemptEnd::Throttled { until, reason } => {
                tracing::warn!(
                    channel = %job.channel,
                    job = job.id,
                    pause_ms = until - self.store.now(),
                    reason,
                    "JoinChat throttled the channel: its send rate halves, and it pauses (the job waits, its retries untouched)"
                );
                self.defer(job, progress, until, Outcome::Throttled, answer).await;
                return;
            }
            AttemptEnd::Sent { last_sent_at } => Ok(last_sent_at),
            AttemptEnd::Failed(error) => Err(error),
        };
        self.upstream_answered(job, matches!(result, Err(SendError::Transient { .. })));
        let status = result.as_ref().err().and_then(SendError::status);
        // Only a request still waiting can be answered with JoinChat's refusal; once it has
        // gone (answered 200 at the end of its wait, or hung up), BonyChat hears by receipt.
        let waiting = answer.as_ref().is_some_and(|answer| !answer.is_closed());

        let (finish, first, label, reason) = match result {
            Ok(sent_at) => (Finish::Delivered { progress, sent_at }, FirstAttempt::Sent, Outcome::Sent, None),
            Err(SendError::Permanent { reason, status }) if waiting => (
                Finish::Rejected { progress, error: reason.clone(), status },
                FirstAttempt::Rejected(reason.clone()),
                Outcome::Rejected,
                Some(reason),
            ),
            Err(SendError::Permanent { reason, status }) => (
                Finish::Dead { progress, error: reason.clone(), failed_receipt: true, status },
                FirstAttempt::Pending,
                Outcome::Rejected,
                Some(reason),
            ),
            // The sender turns throttles into a pause; one that got here is a failure like another.
            Err(
                SendError::Transient { reason, retry_after, .. } | SendError::Throttled { reason, retry_after, .. },
            ) => {
                let (finish, label) = after_failure(
                    &self.retries.joinchat,
                    self.store.now(),
                    attempt,
                    progress,
                    &reason,
                    retry_after,
                    true,
                );
                (finish, FirstAttempt::Pending, label, Some(reason))
            }
        };
        let failure = reason.as_deref().map(|reason| Failure::of(channel, job.direction, reason, status));
        log_attempt(job, attempt, label, failure, self.store.now());
        let rejected_reason = match &first {
            FirstAttempt::Rejected(reason) => Some(reason.clone()),
            _ => None,
        };
        if self.record(job, finish).await
            && let Some(answer) = answer
            && answer.send(first).is_err()
            && let Some(reason) = rejected_reason
        {
            // The request ended between the check and the answer: tell BonyChat by receipt.
            let now = self.store.now();
            if let Err(e) = self.store.queue_failed_receipt(&job.channel, &job.contact, &job.m_id, &reason, now).await {
                tracing::error!(job = job.id, error = %e, "cannot queue a failed receipt");
            }
        }
    }

    /// Puts a job back, due at `until`, without counting an attempt (pacing, the send rate, a
    /// throttle): its slot is free meanwhile, and a waiting `/message` request is still answered
    /// by the attempt that sends, if that comes within its wait.
    async fn defer(
        &self,
        job: &Job,
        progress: u32,
        until: i64,
        outcome: Outcome,
        answer: Option<oneshot::Sender<FirstAttempt>>,
    ) {
        attempt_ended(job, outcome, None, self.store.now());
        if self.record(job, Finish::Defer { progress, next_attempt_at: until }).await
            && let Some(answer) = answer
        {
            let _ = answer.send(FirstAttempt::Paced { until });
        }
    }

    async fn attempt_inbound(&self, job: &Job, channel: &Channel, hold: &ClaimHold, event: WebhookEvent) {
        let receipt = match &event {
            WebhookEvent::MessageStatus { status, .. } => Some(status.value),
            _ => None,
        };
        let claim_held = || hold.is_held(self.store.now());
        let Some(outcome) = channel.inbound.attempt(&job.contact, event, job.contact_introduced, &claim_held).await
        else {
            self.stopped_unsure_of_claim(job, hold, 0).await;
            return;
        };
        let attempt = job.attempts + 1;
        self.upstream_answered(job, matches!(outcome.result, Err(SendError::Transient { .. })));
        let status = outcome.result.as_ref().err().and_then(SendError::status);
        let (finish, label, reason) = match outcome.result {
            Ok(()) => {
                if let Some(value) = receipt {
                    crate::monitoring::receipt_posted(&job.channel, value);
                }
                let finish = match outcome.introduced {
                    true => Finish::Introduced,
                    false => Finish::Delivered { progress: 1, sent_at: self.store.now() },
                };
                (finish, Outcome::Sent, None)
            }
            Err(SendError::Permanent { reason, status }) => (
                Finish::Dead { progress: 0, error: reason.clone(), failed_receipt: false, status },
                Outcome::Rejected,
                Some(reason),
            ),
            Err(
                SendError::Transient { reason, retry_after, .. } | SendError::Throttled { reason, retry_after, .. },
            ) => {
                let (finish, label) =
                    after_failure(&self.retries.bonychat, self.store.now(), attempt, 0, &reason, retry_after, false);
                (finish, label, Some(reason))
            }
        };
        let failure = reason.as_deref().map(|reason| Failure::of(channel, job.direction, reason, status));
        log_attempt(job, attempt, label, failure, self.store.now());
        self.record(job, finish).await;
    }

    /// A job whose stored payload cannot be read can never be delivered: it is dead-lettered
    /// with the reason (an outbound one with a `failed` receipt, so BonyChat shows it), and the
    /// rest of the queue goes on.
    async fn dead_letter_unreadable(&self, job: &Job, reason: &str) {
        let failed_receipt = job.direction == Direction::Outbound;
        tracing::error!(job = job.id, direction = job.direction.as_str(), reason, "dead-lettering an unreadable job");
        let finish = Finish::Dead { progress: job.progress, error: reason.to_owned(), failed_receipt, status: None };
        attempt_ended(job, Outcome::Dead, Some((None, reason)), self.store.now());
        self.record(job, finish).await;
    }

    /// Records the outcome; on failure the lease runs out and the job is attempted again.
    async fn record(&self, job: &Job, finish: Finish) -> bool {
        match self.store.finish(job.lease(), finish, self.store.now()).await {
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
    now: i64,
    attempt: u32,
    progress: u32,
    reason: &str,
    retry_after: Option<Duration>,
    failed_receipt: bool,
) -> (Finish, Outcome) {
    match schedule.next_delay(attempt, retry_after, fastrand::f64()) {
        Some(delay) => {
            let next_attempt_at = now.saturating_add(millis(delay));
            // The status, if any, is in the reason's words ("… answered 503 …"): the store reads it.
            (Finish::Retry { progress, next_attempt_at, error: reason.to_owned(), status: None }, Outcome::Retry)
        }
        None => {
            let error = format!("gave up after {attempt} attempts: {reason}");
            (Finish::Dead { progress, error, failed_receipt, status: None }, Outcome::Dead)
        }
    }
}

/// Why an attempt failed, and where it went: what its log line tells the operator, so that a
/// refusal can be traced to the upstream and the setting (the URL) without reading the code.
struct Failure<'a> {
    reason: &'a str,
    /// `JoinChat` or `BonyChat`.
    upstream: &'static str,
    /// The URL the attempt went to, credentials hidden ([`Endpoint::shown`](crate::config::Endpoint::shown)).
    url: String,
    /// The HTTP status the upstream answered with, when it answered.
    status: Option<u16>,
}

impl<'a> Failure<'a> {
    fn of(channel: &Channel, direction: Direction, reason: &'a str, status: Option<u16>) -> Self {
        let (upstream, url) = match direction {
            Direction::Outbound => ("JoinChat", channel.config.joinchat.api_url.shown()),
            Direction::Inbound => ("BonyChat", channel.config.bonychat.webhook_url.shown()),
        };
        Self { reason, upstream, url, status }
    }
}

/// Counts how an attempt ended and records it on the attempt's span, in one place so that the
/// metrics and the trace always tell the same; `failure` is the upstream's status and the reason.
fn attempt_ended(job: &Job, outcome: Outcome, failure: Option<(Option<u16>, &str)>, now: i64) {
    crate::monitoring::attempt(&job.channel, job.direction, outcome, job.created_at, now);
    let (status, reason) = failure.map_or((None, None), |(status, reason)| (status, Some(reason)));
    crate::traces::attempt_ended(outcome.as_str(), status, reason);
}

fn log_attempt(job: &Job, attempt: u32, outcome: Outcome, failure: Option<Failure<'_>>, now: i64) {
    attempt_ended(job, outcome, failure.as_ref().map(|failure| (failure.status, failure.reason)), now);
    let (channel, direction, outcome) = (job.channel.as_str(), job.direction.as_str(), outcome.as_str());
    let trace_id = crate::traces::current_trace_id();
    let trace_id = trace_id.as_deref();
    match failure {
        None => {
            tracing::info!(channel, direction, contact = %job.contact, m_id = %job.m_id, job = job.id, attempt, outcome, trace_id, "job attempt");
        }
        Some(Failure { reason, upstream, url, status }) => {
            tracing::warn!(
                channel,
                direction,
                contact = %job.contact,
                m_id = %job.m_id,
                job = job.id,
                attempt,
                outcome,
                upstream,
                url,
                status,
                reason,
                trace_id,
                "job attempt"
            );
        }
    }
}

/// How many of a direction's slots one channel may hold when `channels` are served.
pub fn share_of(channels: usize) -> usize {
    if channels <= 1 { MAX_IN_FLIGHT_PER_DIRECTION } else { CHANNEL_SHARE }
}

/// Attempts in flight per (channel, direction): a semaphore of `share` permits each, made when
/// first needed (and again when the share changes, a reload going from one channel to several).
#[derive(Debug, Default)]
struct Shares {
    /// Channel → its share of each direction (outbound, inbound); looked up by `&str`, so taking
    /// a slot allocates nothing.
    held: std::sync::Mutex<std::collections::HashMap<String, [Option<ShareOf>; 2]>>,
    /// The last claim's open channels: of which names, leaving out which, and the list.
    last_open: std::sync::Mutex<Option<OpenChannels>>,
}

type OpenChannels = (Arc<[String]>, Vec<String>, Arc<[String]>);

/// A channel's share of a direction's slots: its size, and the semaphore handing it out.
type ShareOf = (usize, Arc<Semaphore>);

impl Shares {
    fn of(&self, channel: &str, direction: Direction, share: usize) -> Arc<Semaphore> {
        let mut held = self.held.lock().expect("shares");
        let shares = match held.get_mut(channel) {
            Some(shares) => shares,
            None => held.entry(channel.to_owned()).or_default(),
        };
        match &shares[direction.index()] {
            Some((of, semaphore)) if *of == share => Arc::clone(semaphore),
            _ => {
                let semaphore = Arc::new(Semaphore::new(share));
                shares[direction.index()] = Some((share, Arc::clone(&semaphore)));
                semaphore
            }
        }
    }

    /// The channels a claim may take jobs of, and how many of one channel at most: every
    /// channel below its share, no more than the busiest of them has left. `None` when none may.
    fn eligible(
        &self,
        names: &Arc<[String]>,
        direction: Direction,
        share: usize,
        resting: &[String],
    ) -> Option<(Arc<[String]>, usize)> {
        let held = self.held.lock().expect("shares");
        let left = |(of, semaphore): &ShareOf| {
            if *of == share { semaphore.available_permits() } else { share }
        };
        let busy = held
            .iter()
            .filter_map(|(channel, shares)| shares[direction.index()].as_ref().map(|entry| (channel, left(entry))));
        let least_left = busy.clone().map(|(_, left)| left).filter(|left| *left > 0).min();
        let mut full: Vec<&str> = busy.filter(|(_, left)| *left == 0).map(|(channel, _)| channel.as_str()).collect();
        full.extend(resting.iter().map(String::as_str));
        if full.is_empty() {
            return Some((Arc::clone(names), least_left.unwrap_or(share)));
        }
        full.sort_unstable();
        full.dedup();
        let open = self.open_channels(names, &full);
        (!open.is_empty()).then(|| (open, least_left.unwrap_or(share)))
    }

    /// `names` but `left_out` (both in order), kept from the last claim while neither changed: a
    /// busy channel stays full claim after claim, and copying a thousand names for each would
    /// cost more than the claim.
    fn open_channels(&self, names: &Arc<[String]>, left_out: &[&str]) -> Arc<[String]> {
        let mut last = self.last_open.lock().expect("open channels");
        if let Some((of, left, open)) = last.as_ref()
            && Arc::ptr_eq(of, names)
            && left.iter().map(String::as_str).eq(left_out.iter().copied())
        {
            return Arc::clone(open);
        }
        let open: Arc<[String]> =
            names.iter().filter(|name| left_out.binary_search(&name.as_str()).is_err()).cloned().collect();
        *last = Some((Arc::clone(names), left_out.iter().map(|name| (*name).to_owned()).collect(), Arc::clone(&open)));
        open
    }
}

/// A slot of a direction and of its channel's share, for one attempt.
struct Slot {
    _permit: tokio::sync::OwnedSemaphorePermit,
    _channel_held: tokio::sync::OwnedSemaphorePermit,
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}
