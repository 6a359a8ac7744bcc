//! The durable store both directions go through (SPEC §5).
//!
//! A job is one unit of delivery: an outbound BonyChat message (all its JoinChat requests) or
//! one inbound BonyChat event. Every job belongs to one channel (SPEC §7), and everything keyed
//! by a contact is keyed by (channel, contact): the same contact id in two channels is two
//! unrelated contacts. Jobs of one (channel, direction, contact) are delivered strictly in the
//! order they were stored: only the oldest queued job of a contact can be claimed, so a retry
//! never lets a newer job overtake it and at most one job per contact is in flight. A claim is
//! a lease, so the job of a worker that died is claimed again once the lease runs out. Claims
//! take the channels with due work in turns, so one channel's backlog never delays another's.
//!
//! Every write returns only once it is committed to disk. Implementations must pass the same
//! test suite; no implementation holds a transaction open across an HTTP call, since all
//! methods are short database operations.

pub mod metrics;
mod payload;
pub mod postgres;
mod rules;
pub mod send_rate;
pub mod sqlite;

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use tokio::sync::watch;

use crate::BoxFuture;
use crate::config::{DatabaseUrl, StoreConfig};
use crate::domain::bonychat::{StatusValue, WebhookEvent};
use crate::domain::joinchat::{Message, Recipient};

// Named in the store's own signatures (each job's channel, the caps it is opened with), so
// its callers and backends find them here too.
pub use crate::config::IntakeCaps;
pub use crate::domain::channel::DEFAULT_CHANNEL;
pub use payload::{decode_payload, encode_payload};
pub use send_rate::{Grant, RateOp};

pub type StoreResult<T> = Result<T, StoreError>;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("the store failed: {0}")]
    Unavailable(String),
    /// The channel's queue of that direction already holds its cap of queued jobs: new work is
    /// refused, not stored.
    #[error("{} queue of channel {channel} is full ({cap} jobs waiting); try again later", direction.as_str())]
    Full { channel: String, direction: Direction, cap: u64 },
    /// The contact already has its cap of queued outbound messages: one contact never takes
    /// the capacity the others need.
    #[error("this contact already has {cap} messages waiting to be sent; try again once they are delivered")]
    ContactFull { cap: u64 },
    #[error("no job {0}")]
    NotFound(i64),
    #[error("{0}")]
    Conflict(String),
    /// The store was migrated by a newer relay: this one does not know its schema, and writing
    /// to it (or serving from it) could corrupt what the newer one stored. Refused at once.
    #[error(
        "the store has schema version {found}, newer than the {known} this bonychat-relay knows: a newer relay migrated it; run that newer relay (or restore the backup taken before the upgrade)"
    )]
    SchemaTooNew { found: i64, known: i64 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// BonyChat → JoinChat.
    Outbound,
    /// Messenger → BonyChat (events and receipts).
    Inbound,
}

impl Direction {
    pub const ALL: [Self; 2] = [Self::Outbound, Self::Inbound];

    /// Its place in [`Self::ALL`]: for what is kept per direction in arrays.
    pub fn index(self) -> usize {
        match self {
            Self::Outbound => 0,
            Self::Inbound => 1,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Outbound => "outbound",
            Self::Inbound => "inbound",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        match raw {
            "outbound" => Some(Self::Outbound),
            "inbound" => Some(Self::Inbound),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Waiting for its first attempt or for a retry (or in flight, when leased).
    Queued,
    Delivered,
    /// Refused for good, or out of retries: kept, listed and replayable.
    Dead,
    /// Refused by JoinChat while BonyChat waited: BonyChat got the 400 and shows the failure.
    Rejected,
    /// Not delivered on purpose (the echo of the relay's own send); kept for deduplication.
    Dropped,
}

impl JobState {
    pub const ALL: [Self; 5] = [Self::Queued, Self::Delivered, Self::Dead, Self::Rejected, Self::Dropped];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Delivered => "delivered",
            Self::Dead => "dead",
            Self::Rejected => "rejected",
            Self::Dropped => "dropped",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == raw)
    }
}

/// What a job delivers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Payload {
    /// An outbound message: the JoinChat messages carrying it, in order.
    Send { recipient: Recipient, parts: Vec<Message> },
    /// One BonyChat webhook event.
    Event { event: WebhookEvent },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    pub id: i64,
    pub channel: String,
    pub direction: Direction,
    pub contact: String,
    pub m_id: String,
    pub state: JobState,
    /// Attempts made so far.
    pub attempts: u32,
    /// For outbound jobs: how many parts JoinChat accepted.
    pub progress: u32,
    /// Milliseconds since the epoch.
    pub next_attempt_at: i64,
    pub last_error: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
    /// Whether a worker holds the job right now.
    pub in_flight: bool,
    /// When the current lease ends (the store's clock), if the job is leased.
    pub lease_until: Option<i64>,
    /// The fencing token of the claim that handed out this job: every later write about the
    /// attempt names it, and is refused once anyone has claimed the job since.
    pub lease_token: i64,
    /// What to deliver, or why the stored payload cannot be read (such a job is dead-lettered
    /// by the worker that claims it, and listed like any other).
    pub payload: Result<Payload, String>,
    /// When the last send to this contact takes effect (outbound pacing), as of the claim.
    pub contact_last_effective_at: Option<i64>,
    /// Whether BonyChat already got a post about this contact (inbound), as of the claim.
    pub contact_introduced: bool,
    /// The trace its attempts continue: the W3C trace context of the request that stored it
    /// (SPEC §6), as [`crate::traces`] writes it (`traceparent`, and `tracestate` on a line of
    /// its own when there is one).
    pub trace_context: Option<String>,
}

impl Job {
    /// The lease this job was claimed under.
    pub fn lease(&self) -> Lease {
        Lease { id: self.id, token: self.lease_token }
    }
}

/// A claim on one job: the job and the fencing token its claim was given. A lease that ran out
/// and was claimed again by anyone (another replica, or this one) has a newer token, so the
/// old holder's progress, renewals and outcome are refused instead of overwriting the new one's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    pub id: i64,
    pub token: i64,
}

/// How a `/message` request takes its own job's first attempt (SPEC §5: it waits for it): the
/// job is leased to `owner` at once when it heads its contact's queue, and otherwise reserved
/// for the request until `reserved_until`, so that no worker (of any replica) takes the first
/// attempt from the request still waiting for it.
#[derive(Debug, Clone)]
pub struct FirstClaim {
    pub owner: String,
    pub lease_until: i64,
    pub reserved_until: i64,
}

/// A stored outbound message, and its job when it was leased to the request at once.
#[derive(Debug)]
pub struct Enqueued {
    pub id: i64,
    pub claimed: Option<LeasedJob>,
}

/// A job leased to a caller that may go away before attempting it: a `/message` request whose
/// client hung up while the store committed its lease. Dropped without [`LeasedJob::take`]
/// (wherever that happens: in the caller, or in the channel the store answered through), it
/// hands the job back, due now, so that its contact waits for nobody instead of for the lease
/// to run out.
#[derive(Debug)]
pub struct LeasedJob {
    job: Job,
    release: ReleaseOnDrop,
}

impl LeasedJob {
    pub(crate) fn new(job: Job, release: ReleaseOnDrop) -> Self {
        Self { job, release }
    }

    /// The job, for an attempt that now holds its lease.
    pub fn take(self) -> Job {
        let Self { job, mut release } = self;
        release.defuse();
        job
    }
}

impl std::ops::Deref for LeasedJob {
    type Target = Job;

    fn deref(&self) -> &Job {
        &self.job
    }
}

/// Hands a lease back when dropped, unless defused.
pub(crate) struct ReleaseOnDrop(Option<Box<dyn FnOnce() + Send>>);

impl ReleaseOnDrop {
    pub(crate) fn new(lease: Lease, hand_back: impl FnOnce(Lease) + Send + 'static) -> Self {
        Self(Some(Box::new(move || hand_back(lease))))
    }

    fn defuse(&mut self) {
        self.0 = None;
    }
}

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        if let Some(hand_back) = self.0.take() {
            hand_back();
        }
    }
}

impl std::fmt::Debug for ReleaseOnDrop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "ReleaseOnDrop(armed)" } else { "ReleaseOnDrop(defused)" })
    }
}

/// The documented representation of a job for the admin API and `bonychat-relay jobs`: field
/// names and meanings stay stable whatever the store's internals become.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct JobView {
    pub id: i64,
    /// The channel the job belongs to (SPEC §7).
    pub channel: String,
    /// `outbound` (BonyChat → JoinChat) or `inbound` (Messenger → BonyChat).
    pub direction: Direction,
    #[serde(rename = "contactId")]
    pub contact_id: String,
    #[serde(rename = "mId")]
    pub m_id: String,
    /// `queued`, `delivered`, `dead`, `rejected` or `dropped`.
    pub state: JobState,
    pub attempts: u32,
    /// Outbound: how many of the message's JoinChat requests were accepted.
    pub parts_sent: u32,
    /// Milliseconds since the epoch, like every time below.
    pub next_attempt_at: i64,
    pub last_error: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
    pub in_flight: bool,
    /// Outbound: `{"recipient", "messages"}` as sent to JoinChat; inbound: the BonyChat event.
    /// `null` when the stored payload cannot be read (`payloadError` says why).
    pub payload: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload_error: Option<String>,
}

impl From<&Job> for JobView {
    fn from(job: &Job) -> Self {
        let (payload, payload_error) = match &job.payload {
            Ok(Payload::Send { recipient, parts }) => {
                (Some(serde_json::json!({"recipient": recipient, "messages": parts})), None)
            }
            Ok(Payload::Event { event }) => (serde_json::to_value(event).ok(), None),
            Err(reason) => (None, Some(reason.clone())),
        };
        Self {
            id: job.id,
            channel: job.channel.clone(),
            direction: job.direction,
            contact_id: job.contact.clone(),
            m_id: job.m_id.clone(),
            state: job.state,
            attempts: job.attempts,
            parts_sent: job.progress,
            next_attempt_at: job.next_attempt_at,
            last_error: job.last_error.clone(),
            created_at: job.created_at,
            updated_at: job.updated_at,
            in_flight: job.in_flight,
            payload,
            payload_error,
        }
    }
}

/// An outbound message to store.
#[derive(Debug, Clone)]
pub struct NewOutbound {
    pub channel: String,
    /// The channel's cap of queued outbound jobs: past it the message is refused.
    pub max_queued: u64,
    pub m_id: String,
    pub contact: String,
    pub recipient: Recipient,
    pub parts: Vec<Message>,
    pub now: i64,
    /// The `/message` request's trace context (SPEC §6).
    pub trace_context: Option<String>,
}

/// What one webhook call brought for one channel, ready to store (a call carrying several
/// channels' events is split into a batch per channel).
#[derive(Debug, Clone, Default)]
pub struct InboundBatch {
    pub channel: String,
    /// The channel's cap of queued inbound jobs: a batch that would go past it is refused.
    pub max_queued: u64,
    pub items: Vec<InboundItem>,
    pub now: i64,
    /// The webhook call's trace context (SPEC §6), kept with every job it queues.
    pub trace_context: Option<String>,
}

#[derive(Debug, Clone)]
pub enum InboundItem {
    /// The BonyChat events of one Messenger message, postback or echo.
    Message {
        contact: String,
        events: Vec<WebhookEvent>,
        /// For an echo: what the relay's own sends are recognised by.
        echo_fingerprint: Option<String>,
    },
    /// A delivery or read watermark: receipts for every outbound message it covers.
    Watermark { contact: String, status: StatusValue, watermark: i64, timestamp: i64 },
}

/// What storing a batch did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct InboundSummary {
    /// Events queued for BonyChat.
    pub queued: usize,
    /// Events already stored by an earlier delivery of the same webhook.
    pub duplicates: usize,
    /// Echoes of the relay's own sends, dropped.
    pub own_echoes: usize,
    /// Receipts queued for BonyChat.
    pub receipts: usize,
}

/// Which jobs [`Store::find`] lists: every filter given must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobQuery {
    pub state: Option<JobState>,
    pub channel: Option<String>,
    pub direction: Option<Direction>,
    /// A BonyChat `mId` (outbound), a Messenger `mid` (inbound events) or a contact id, exactly.
    pub search: Option<String>,
    /// Only jobs older than job `before`: the next page of a newest-first list.
    pub before: Option<i64>,
    pub limit: usize,
}

/// A job and the attempts recorded of it ([`Store::job_history`]).
#[derive(Debug, Clone, PartialEq)]
pub struct JobHistory {
    pub job: Job,
    /// The attempts that did not deliver, oldest first, the last [`ATTEMPTS_KEPT`] at most. A
    /// delivered job's delivering attempt is the job itself: its `attempts`-th, at `updated_at`.
    pub attempts: Vec<AttemptRecord>,
}

/// Failed attempts kept per job: a job retried for days keeps its latest ones.
pub const ATTEMPTS_KEPT: usize = 20;

/// One attempt that did not deliver its job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AttemptRecord {
    /// 1 for the first attempt.
    pub attempt: u32,
    /// When it ended (ms since the epoch, the store's clock).
    pub at: i64,
    /// `retry` (failed, tried again later), `dead` (out of retries or refused for good) or
    /// `rejected` (refused by JoinChat while BonyChat waited: answered 400).
    pub outcome: String,
    /// The upstream's HTTP status, when it answered one.
    pub status: Option<u16>,
    pub error: String,
}

/// How an attempt ended, to be recorded.
#[derive(Debug, Clone, PartialEq)]
pub enum Finish {
    /// Outbound: `sent_at` is when the last request left, which Messenger's delivery and read
    /// watermarks are compared with (SPEC §4.4).
    Delivered { progress: u32, sent_at: i64 },
    /// Inbound: delivered, and BonyChat knows the contact now (the event carried its profile),
    /// so the contact's later events go without a profile lookup. Recorded with the outcome, in
    /// the same transaction.
    Introduced,
    /// Not attempted: pacing asks for the next send to this contact no earlier than
    /// `next_attempt_at`. The attempt count stays, and the slot is free meanwhile.
    Defer { progress: u32, next_attempt_at: i64 },
    /// Another attempt at `next_attempt_at`. `status`, here and below: the upstream's HTTP
    /// status, when it answered (kept with the attempt for the console).
    Retry { progress: u32, next_attempt_at: i64, error: String, status: Option<u16> },
    /// Out of retries or refused for good; with `failed_receipt`, BonyChat is told by a `failed`
    /// receipt carrying `error`.
    Dead { progress: u32, error: String, failed_receipt: bool, status: Option<u16> },
    /// Refused by JoinChat while BonyChat waited.
    Rejected { progress: u32, error: String, status: Option<u16> },
    /// Not attempted (no free slot, or the attempt stopped unsure of its claim): handed back,
    /// due at once, for any worker to claim. The attempt count stays.
    Release { progress: u32 },
}

/// The durable store, as delivery sees it. The rules of the queue (deduplication, echoes,
/// receipts by watermark, what a finished attempt does) are the same for every backend and
/// live in `rules`; a backend provides storage and claims.
pub trait Store: Send + Sync {
    /// The store's clock, in milliseconds since the epoch. Every time written to the store or
    /// compared with its leases is on it, so replicas sharing a store agree on what is due and
    /// when a lease ends whatever their own clocks say.
    fn now(&self) -> i64;

    /// Changes whenever jobs may have become claimable: new work, a finished attempt, a
    /// redrive, in this process or (for a shared store) in any replica.
    fn changes(&self) -> watch::Receiver<u64>;

    /// Wakes whoever holds it when the outbound queue of `contact` in `channel` moves on (an
    /// attempt ended), in this process or, for a shared store, in any replica.
    fn watch_queue(&self, channel: &str, contact: &str) -> QueueWatch;

    /// Answers when the store can durably write right now: a small write committed within a
    /// short deadline. Fails for a full disk, a removed file, a stalled disk, a dead writer or
    /// a database that is away.
    fn ping(&self) -> BoxFuture<'_, StoreResult<()>>;

    /// Stores an outbound message; with `first`, it is leased to the request at once when it
    /// heads its contact's queue (one round trip for the hot path), else reserved for it.
    fn enqueue_outbound(&self, job: NewOutbound, first: Option<FirstClaim>) -> BoxFuture<'_, StoreResult<Enqueued>>;

    /// Stores a webhook batch: events not seen before are queued, the echoes of the relay's own
    /// sends are dropped, and watermarks queue a receipt per outbound message they cover, once.
    fn enqueue_inbound(&self, batch: InboundBatch) -> BoxFuture<'_, StoreResult<InboundSummary>>;

    /// Claims up to `claim.limit` due jobs of `claim.direction` in `claim.channels`, each the
    /// oldest queued one of its contact, for `claim.owner` until `claim.lease_until`. Each
    /// direction is claimed on its own, so that a flood of one never takes the capacity of the
    /// other; the channels with due work are taken in turns (see [`Claim`]). Jobs reserved for a
    /// waiting request are left to it until the reservation ends.
    fn claim(&self, claim: Claim) -> BoxFuture<'_, StoreResult<Vec<Job>>>;

    /// Claims job `id` for the request that stored it, reserved or not, when it is due, heads
    /// its contact's queue and nothing of that contact is in flight; `None` otherwise.
    fn claim_own(
        &self,
        owner: &str,
        id: i64,
        now: i64,
        lease_until: i64,
    ) -> BoxFuture<'_, StoreResult<Option<LeasedJob>>>;

    /// Extends `leases` while their attempts run; returns those it extended. A lease claimed by
    /// someone since is not: its holder has lost the claim and must stop.
    fn renew(&self, leases: Vec<Lease>, lease_until: i64) -> BoxFuture<'_, StoreResult<Vec<Lease>>>;

    /// Gives up `owner`'s leases (at shutdown): the jobs are claimed again at once.
    fn release(&self, owner: &str) -> BoxFuture<'_, StoreResult<u64>>;

    /// Records, before a JoinChat request leaves, when it takes effect (for pacing) and what its
    /// echo will look like (for ten minutes). Returns once every later operation on the store
    /// sees the record; it need not be on disk yet: a crash can only cost the pacing and the
    /// echo recognition of that one send, never a message.
    fn before_send(&self, send: BeforeSend) -> BoxFuture<'_, StoreResult<()>>;

    /// Records that JoinChat accepted `progress` parts of the leased job: a
    /// [`StoreError::Conflict`] when the lease was lost, so that the attempt stops.
    fn record_progress(&self, lease: Lease, progress: u32, now: i64) -> BoxFuture<'_, StoreResult<()>>;

    /// Records how the attempt under `lease` ended and releases it; a [`StoreError::Conflict`]
    /// (nothing written) when the lease was claimed by someone since.
    fn finish(&self, lease: Lease, finish: Finish, now: i64) -> BoxFuture<'_, StoreResult<()>>;

    /// Queues the `failed` receipt of outbound message `m_id` to `contact` of `channel` (when
    /// BonyChat turned out not to hear the 400 it was about to get). Queued once, however often
    /// it is asked.
    fn queue_failed_receipt(
        &self,
        channel: &str,
        contact: &str,
        m_id: &str,
        reason: &str,
        now: i64,
    ) -> BoxFuture<'_, StoreResult<()>>;

    /// The jobs `query` asks for, newest first; every filter is served by an index, so a page
    /// costs about the same with a million jobs stored.
    fn find(&self, query: JobQuery) -> BoxFuture<'_, StoreResult<Vec<Job>>>;

    /// Jobs in `state` (all states when `None`) of `channel` (all channels when `None`), newest
    /// first.
    fn list(
        &self,
        state: Option<JobState>,
        channel: Option<&str>,
        limit: usize,
    ) -> BoxFuture<'_, StoreResult<Vec<Job>>> {
        self.find(JobQuery { state, channel: channel.map(str::to_owned), limit, ..JobQuery::default() })
    }

    /// Job `id` with its recorded attempts, oldest first (`None`: no such job).
    fn job_history(&self, id: i64) -> BoxFuture<'_, StoreResult<Option<JobHistory>>>;

    /// Makes one `dead` or `queued` job due now with a fresh retry schedule. Other states are a
    /// [`StoreError::Conflict`] saying why: a delivered job was delivered, a rejected one was
    /// already answered to BonyChat with a 400, a dropped one is the echo of the relay's own send.
    fn retry(&self, id: i64, now: i64) -> BoxFuture<'_, StoreResult<Job>>;

    /// Makes up to `limit` dead jobs of `channel` (of every channel when `None`) due now, oldest
    /// first; returns how many. Callers loop until it returns less than `limit`, so a large
    /// redrive never holds the store for long.
    fn redrive_dead(&self, now: i64, channel: Option<&str>, limit: usize) -> BoxFuture<'_, StoreResult<u64>>;

    /// Deletes up to `limit` delivered, rejected and dropped jobs last touched before `before`,
    /// and expired echo records; returns how many jobs went. Callers loop like for redrive.
    fn prune(&self, before: i64, now: i64, limit: usize) -> BoxFuture<'_, StoreResult<u64>>;

    /// Jobs by channel and direction, by where they stand at `now`, for the queue gauges: every
    /// (channel, direction) with queued or dead jobs, and both directions of
    /// [`DEFAULT_CHANNEL`] always. Read at scrape time, so it must stay cheap at the intake caps.
    fn queue_counts(&self, now: i64) -> BoxFuture<'_, StoreResult<Vec<(String, Direction, QueueCounts)>>>;

    /// Applies `op` to `channel`'s JoinChat send-rate bucket (SPEC §5), configured at
    /// `max_per_sec`: shared by every relay that uses the store, on the store's clock.
    fn send_rate(&self, channel: &str, op: RateOp, max_per_sec: u32) -> BoxFuture<'_, StoreResult<Grant>>;

    /// Saves what this process holds only in memory for the next start, once nothing runs
    /// any more: the last call before the process ends.
    fn close(&self) -> BoxFuture<'_, StoreResult<()>> {
        Box::pin(std::future::ready(Ok(())))
    }
}

/// What [`Store::claim`] takes.
///
/// Fairness (SPEC §5): the channels in `channels` with due work are taken in turns, the
/// earliest due head of each, then the second of each, and so on, each channel's heads in due
/// order, until `limit`. Within a turn the channels go round from one claim to the next (see
/// `Rotation`), so claims of a single job serve them one after the other too. A channel's
/// backlog thus costs the others one job a turn at most, and the claim costs about the same
/// whatever one channel has queued.
#[derive(Debug, Clone)]
pub struct Claim {
    pub owner: String,
    pub direction: Direction,
    pub now: i64,
    pub lease_until: i64,
    pub limit: usize,
    /// The channels whose jobs may be claimed, in order (as a directory lists them); jobs of
    /// any other channel stay queued, untouched.
    pub channels: Arc<[String]>,
    /// The most jobs of one channel this claim takes: what that channel may still hold of the
    /// worker's slots, so that the claim never takes jobs the worker would hand straight back.
    pub per_channel: usize,
}

/// A contact's queue as the queue watches know it: (channel, contact).
type QueueKey = (String, String);

/// The signals behind [`Store::changes`] and [`Store::watch_queue`].
#[derive(Debug)]
pub(crate) struct Changes {
    any: watch::Sender<u64>,
    /// Per (channel, contact) with a `/message` request waiting for its outbound queue to move on.
    queues: std::sync::Mutex<std::collections::HashMap<QueueKey, watch::Sender<u64>>>,
}

impl Default for Changes {
    fn default() -> Self {
        Self { any: watch::Sender::new(0), queues: std::sync::Mutex::default() }
    }
}

impl Changes {
    pub(crate) fn signal(&self) {
        self.any.send_modify(|version| *version = version.wrapping_add(1));
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.any.subscribe()
    }

    /// The outbound queue of `contact` in `channel` moved on (an attempt of its ended): the
    /// requests waiting for it try again. Everyone else is left alone.
    pub(crate) fn queue_moved(&self, channel: &str, contact: &str) {
        let queues = self.queues.lock().expect("queue watches");
        // Usually nobody waits: no key is built for the lookup then.
        if queues.is_empty() {
            return;
        }
        if let Some(queue) = queues.get(&(channel.to_owned(), contact.to_owned())) {
            queue.send_modify(|version| *version = version.wrapping_add(1));
        }
    }

    pub(crate) fn watch_queue(self: &Arc<Self>, channel: &str, contact: &str) -> QueueWatch {
        let key = (channel.to_owned(), contact.to_owned());
        let moved = self
            .queues
            .lock()
            .expect("queue watches")
            .entry(key.clone())
            .or_insert_with(|| watch::Sender::new(0))
            .subscribe();
        QueueWatch { changes: Arc::clone(self), key, moved }
    }
}

/// Wakes a `/message` request when its contact's outbound queue moves on, in this replica or
/// (for a shared store) in another.
#[derive(Debug)]
pub struct QueueWatch {
    changes: Arc<Changes>,
    key: QueueKey,
    moved: watch::Receiver<u64>,
}

impl QueueWatch {
    /// Returns once the queue moved on since the last call (or since the watch began).
    pub async fn moved(&mut self) {
        if self.moved.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

impl Drop for QueueWatch {
    fn drop(&mut self) {
        let mut queues = self.changes.queues.lock().expect("queue watches");
        // This watch's receiver is the last one: nobody waits on the contact any more.
        if queues.get(&self.key).is_some_and(|queue| queue.receiver_count() <= 1) {
            queues.remove(&self.key);
        }
    }
}

/// Jobs of one channel and direction by where they stand.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueCounts {
    /// Queued, not leased, due now (behind another job of their contact or not).
    pub ready: u64,
    /// Queued, not leased, due later: waiting for a retry or for pacing.
    pub delayed: u64,
    /// Leased by a worker.
    pub in_flight: u64,
    pub dead: u64,
    /// When the oldest queued job (ready, delayed or in flight) was accepted.
    pub oldest_queued_at: Option<i64>,
}

#[derive(Debug, Clone)]
pub struct BeforeSend {
    pub channel: String,
    pub contact: String,
    /// When the send takes effect (its `delay` included): the contact's pacing horizon.
    pub effective_at: i64,
    /// When the horizon stops mattering: `effective_at` plus the channel's gap.
    pub pacing_until: i64,
    pub echo_fingerprint: Option<String>,
    pub echo_expires_at: i64,
}

/// How long the relay recognises the echo of a message it sent (SPEC §4.3): an echo record
/// expires this long after its send.
pub const ECHO_WINDOW: std::time::Duration = std::time::Duration::from_secs(600);

/// Jobs redriven or pruned per store operation: small enough that ingestion interleaves.
pub const BATCH: usize = 500;

/// The most jobs one listing returns, in the admin API and `bonychat-relay jobs list` alike:
/// a page for an operator to read, not an export that holds the store.
pub const LIST_LIMIT_MAX: usize = 1000;

/// Opens the store `config` names for a relay: creating and migrating it as needed, and
/// holding it for this process alone.
pub async fn open(config: &StoreConfig) -> StoreResult<Arc<dyn Store>> {
    match &config.database_url {
        DatabaseUrl::Sqlite(path) => Ok(Arc::new(sqlite::SqliteStore::open(path, config.intake).await?)),
        DatabaseUrl::Postgres(url) => {
            Ok(Arc::new(postgres::PostgresStore::open(url.expose(), config.postgres, config.intake).await?))
        }
    }
}

/// Opens an existing store for `bonychat-relay jobs …`, beside a running relay or not: it
/// never creates, migrates or takes over anything. Returns the store and what it opened.
pub async fn open_existing(config: &StoreConfig) -> StoreResult<(Arc<dyn Store>, String)> {
    let store: Arc<dyn Store> = match &config.database_url {
        DatabaseUrl::Sqlite(path) => Arc::new(sqlite::SqliteStore::open_existing(path, config.intake).await?),
        DatabaseUrl::Postgres(url) => {
            Arc::new(postgres::PostgresStore::open_existing(url.expose(), config.postgres, config.intake).await?)
        }
    };
    Ok((store, config.database_url.shown()))
}

/// Makes every dead job of `channel` (of every channel when `None`) due now, [`BATCH`] at a
/// time so that ingestion goes on meanwhile; returns how many.
pub async fn redrive_all_dead(store: &dyn Store, now: i64, channel: Option<&str>) -> StoreResult<u64> {
    in_batches(|| store.redrive_dead(now, channel, BATCH)).await
}

/// Jobs deleted per prune operation: a few milliseconds of the writer's time.
pub const PRUNE_BATCH: usize = 100;
/// How much longer than its last batch took the pruner rests: it takes a tenth of the store's
/// time at most, so that `/message` latency is the same with a prune running or not.
const PRUNE_REST_FACTOR: u32 = 9;

/// Deletes every delivered, rejected and dropped job last touched before `before`,
/// [`PRUNE_BATCH`] at a time; returns how many. After each batch it rests `PRUNE_REST_FACTOR`
/// times as long as the batch took (its wait for the writer included, so it slows down further
/// when the store is busy): live work never waits behind more than one small batch, and a long
/// history (after a retention change, say) is deleted in the background, about 4 000 jobs a
/// second on an idle store.
pub async fn prune_all(store: &dyn Store, before: i64, now: i64) -> StoreResult<u64> {
    let mut total = 0;
    loop {
        let started = std::time::Instant::now();
        let pruned = store.prune(before, now, PRUNE_BATCH).await?;
        total += pruned;
        if pruned < PRUNE_BATCH as u64 {
            return Ok(total);
        }
        let took = started.elapsed().max(std::time::Duration::from_millis(1));
        tokio::time::sleep(took * PRUNE_REST_FACTOR).await;
    }
}

/// Runs `batch` until it handles fewer than [`BATCH`] jobs; returns how many it handled.
async fn in_batches<'a>(mut batch: impl FnMut() -> BoxFuture<'a, StoreResult<u64>>) -> StoreResult<u64> {
    let mut total = 0;
    loop {
        let handled = batch().await?;
        total += handled;
        if handled < BATCH as u64 {
            return Ok(total);
        }
    }
}

/// Where each direction's last claim left off among the channels. A turn starts with the
/// channel after it by name, not with the channel whose head is the oldest: a worker claims as
/// its slots free up, often one job at a time, and such claims would otherwise all go to the
/// channel with the oldest backlog until it is through (SPEC §5: one channel's backlog never
/// delays another's). Each process keeps its own; replicas go round independently.
#[derive(Debug, Default)]
pub(crate) struct Rotation(std::sync::Mutex<[Option<String>; 2]>);

impl Rotation {
    pub(crate) fn after(&self, direction: Direction) -> Option<String> {
        self.0.lock().expect("rotation")[direction.index()].clone()
    }

    /// The last claim of `direction` ended with a job of `channel`; a claim that took nothing
    /// leaves the rotation where it was.
    pub(crate) fn left_off(&self, direction: Direction, channel: Option<String>) {
        if let Some(channel) = channel {
            self.0.lock().expect("rotation")[direction.index()] = Some(channel);
        }
    }
}

/// Where `channel` comes in a turn that starts after `after`: the channels after it by name,
/// then the others, by name.
pub(crate) fn turn_order<'a>(channel: &'a str, after: Option<&str>) -> (bool, &'a str) {
    (after.is_some_and(|after| channel <= after), channel)
}

/// Takes `limit` of `channels`' heads in turns: the first of each channel, then the second of
/// each, and so on, each turn in [`turn_order`] after `after`. Each channel's heads are job ids
/// in its own due order. Returns the ids taken, in that order, and the channel of the last one.
pub(crate) fn in_turns(
    channels: Vec<(String, Vec<i64>)>,
    after: Option<&str>,
    limit: usize,
) -> (Vec<i64>, Option<String>) {
    let mut heads: Vec<(usize, (bool, &str), i64)> = channels
        .iter()
        .flat_map(|(channel, heads)| {
            let order = turn_order(channel, after);
            heads.iter().enumerate().map(move |(turn, &id)| (turn, order, id))
        })
        .collect();
    heads.sort_unstable();
    heads.truncate(limit);
    let last = heads.last().map(|(_, (_, channel), _)| (*channel).to_owned());
    (heads.into_iter().map(|(_, _, id)| id).collect(), last)
}

/// The channel of the last job a claim in turns took, from the channels of all it took: the
/// last turn's last channel in [`turn_order`] after `after`.
pub(crate) fn last_in_turns<'a>(taken: impl Iterator<Item = &'a str>, after: Option<&str>) -> Option<String> {
    let mut per_channel: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for channel in taken {
        *per_channel.entry(channel).or_default() += 1;
    }
    per_channel
        .into_iter()
        .max_by_key(|&(channel, turns)| (turns, turn_order(channel, after)))
        .map(|(c, _)| c.to_owned())
}

/// The queue counts as [`Store::queue_counts`] returns them, from the counts of queued jobs
/// (ready, delayed, in flight) and of dead jobs per (channel, direction) as stored.
pub(crate) fn assemble_counts(
    queued: Vec<(String, String, [i64; 3], Option<i64>)>,
    dead: Vec<(String, String, i64)>,
) -> Vec<(String, Direction, QueueCounts)> {
    let count = |n: i64| u64::try_from(n).unwrap_or(0);
    let mut counts: std::collections::BTreeMap<(String, usize), QueueCounts> = Direction::ALL
        .iter()
        .enumerate()
        .map(|(slot, _)| ((DEFAULT_CHANNEL.to_owned(), slot), QueueCounts::default()))
        .collect();
    let slot = |direction: &str| Direction::ALL.iter().position(|d| d.as_str() == direction);
    for (channel, direction, [ready, delayed, in_flight], oldest) in queued {
        if let Some(slot) = slot(&direction) {
            let c = counts.entry((channel, slot)).or_default();
            (c.ready, c.delayed, c.in_flight) = (count(ready), count(delayed), count(in_flight));
            c.oldest_queued_at = oldest;
        }
    }
    for (channel, direction, n) in dead {
        if let Some(slot) = slot(&direction) {
            counts.entry((channel, slot)).or_default().dead = count(n);
        }
    }
    counts.into_iter().map(|((channel, slot), c)| (channel, Direction::ALL[slot], c)).collect()
}

/// Milliseconds since the epoch: the store's clock.
pub fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_queue_watch_wakes_for_its_own_channel_and_contact_only() {
        let changes = Arc::new(Changes::default());
        let mut shoes = changes.watch_queue("shoes", "u");
        let mut hats = changes.watch_queue("hats", "u");

        changes.queue_moved("hats", "u");

        let wait = std::time::Duration::from_millis(50);
        assert!(tokio::time::timeout(wait, hats.moved()).await.is_ok());
        assert!(tokio::time::timeout(wait, shoes.moved()).await.is_err(), "u of shoes is another contact");
        drop((shoes, hats));
        assert!(changes.queues.lock().unwrap().is_empty(), "nobody waits any more");
    }

    #[test]
    fn queue_counts_show_the_default_channel_always_and_the_others_with_jobs() {
        let counts = assemble_counts(
            vec![("shoes".into(), "outbound".into(), [3, 2, 1], Some(1_000))],
            vec![("hats".into(), "inbound".into(), 4)],
        );

        let shown: Vec<(&str, Direction, [u64; 4])> = counts
            .iter()
            .map(|(channel, direction, c)| (channel.as_str(), *direction, [c.ready, c.delayed, c.in_flight, c.dead]))
            .collect();
        assert_eq!(
            shown,
            [
                ("default", Direction::Outbound, [0, 0, 0, 0]),
                ("default", Direction::Inbound, [0, 0, 0, 0]),
                ("hats", Direction::Inbound, [0, 0, 0, 4]),
                ("shoes", Direction::Outbound, [3, 2, 1, 0]),
            ]
        );
        let oldest =
            |channel: &str| counts.iter().find(|(name, ..)| name == channel).and_then(|(.., c)| c.oldest_queued_at);
        assert_eq!(oldest("shoes"), Some(1_000));
        assert_eq!(oldest("hats"), None, "nothing queued, only dead");
    }
}
