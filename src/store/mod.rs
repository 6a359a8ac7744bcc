//! The durable store both directions go through (SPEC §5).
//!
//! A job is one unit of delivery: an outbound BonyChat message (all its JoinChat requests) or
//! one inbound BonyChat event. Jobs of one (direction, contact) are delivered strictly in the
//! order they were stored: only the oldest queued job of a contact can be claimed, so a retry
//! never lets a newer job overtake it and at most one job per contact is in flight. A claim is
//! a lease, so the job of a worker that died is claimed again once the lease runs out.
//!
//! Every write returns only once it is committed to disk. Implementations must pass the same
//! test suite; no implementation holds a transaction open across an HTTP call, since all
//! methods are short database operations.

pub mod sqlite;

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::clients::BoxFuture;
use crate::config::{DatabaseUrl, StoreConfig};
use crate::domain::bonychat::{StatusValue, WebhookEvent};
use crate::domain::joinchat::{Message, Recipient};

pub type StoreResult<T> = Result<T, StoreError>;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("the store failed: {0}")]
    Unavailable(String),
    #[error("no job {0}")]
    NotFound(i64),
    #[error("{0}")]
    Conflict(String),
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

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Job {
    pub id: i64,
    pub direction: Direction,
    pub contact: String,
    #[serde(rename = "mId")]
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
    pub payload: Payload,
    /// When the last send to this contact takes effect (outbound pacing), as of the claim.
    #[serde(skip)]
    pub contact_last_effective_at: Option<i64>,
    /// Whether BonyChat already got a post about this contact (inbound), as of the claim.
    #[serde(skip)]
    pub contact_introduced: bool,
}

/// An outbound message to store.
#[derive(Debug, Clone)]
pub struct NewOutbound {
    pub m_id: String,
    pub contact: String,
    pub recipient: Recipient,
    pub parts: Vec<Message>,
    pub now: i64,
}

/// What one webhook call brought, ready to store.
#[derive(Debug, Clone, Default)]
pub struct InboundBatch {
    pub items: Vec<InboundItem>,
    pub now: i64,
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

/// How an attempt ended, to be recorded.
#[derive(Debug, Clone, PartialEq)]
pub enum Finish {
    Delivered {
        progress: u32,
    },
    /// Another attempt at `next_attempt_at`.
    Retry {
        progress: u32,
        next_attempt_at: i64,
        error: String,
    },
    /// Out of retries or refused for good; with `failed_receipt`, BonyChat is told by a `failed`
    /// receipt carrying `error`.
    Dead {
        progress: u32,
        error: String,
        failed_receipt: bool,
    },
    /// Refused by JoinChat while BonyChat waited.
    Rejected {
        progress: u32,
        error: String,
    },
}

pub trait Store: Send + Sync {
    /// Answers when the store can read and write.
    fn ping(&self) -> BoxFuture<'_, StoreResult<()>>;

    /// Makes a freshly started relay take over its stores' in-flight jobs at once. For a store
    /// that serves one replica only, every lease is a leftover of a previous process.
    fn recover(&self) -> BoxFuture<'_, StoreResult<u64>>;

    fn enqueue_outbound(&self, job: NewOutbound) -> BoxFuture<'_, StoreResult<i64>>;

    /// Stores a webhook batch: events not seen before are queued, the echoes of the relay's own
    /// sends are dropped, and watermarks queue a receipt per outbound message they cover, once.
    fn enqueue_inbound(&self, batch: InboundBatch) -> BoxFuture<'_, StoreResult<InboundSummary>>;

    /// Claims up to `limit` due jobs, each the oldest queued one of its contact, for `owner`
    /// until `lease_until`.
    fn claim(&self, owner: &str, now: i64, lease_until: i64, limit: usize) -> BoxFuture<'_, StoreResult<Vec<Job>>>;

    /// Extends `owner`'s leases on `ids` while their attempts run.
    fn renew(&self, owner: &str, ids: Vec<i64>, lease_until: i64) -> BoxFuture<'_, StoreResult<()>>;

    /// Gives up `owner`'s leases (at shutdown): the jobs are claimed again at once.
    fn release(&self, owner: &str) -> BoxFuture<'_, StoreResult<u64>>;

    /// Records, before a JoinChat request leaves, when it takes effect (for pacing) and what its
    /// echo will look like (for ten minutes). Returns once every later operation on the store
    /// sees the record; it need not be on disk yet: a crash can only cost the pacing and the
    /// echo recognition of that one send, never a message.
    fn before_send(&self, send: BeforeSend) -> BoxFuture<'_, StoreResult<()>>;

    /// Records that JoinChat accepted `progress` parts of job `id`.
    fn record_progress(&self, id: i64, progress: u32, now: i64) -> BoxFuture<'_, StoreResult<()>>;

    /// Records how an attempt by `owner` ended and releases the lease.
    fn finish(&self, owner: &str, id: i64, finish: Finish, now: i64) -> BoxFuture<'_, StoreResult<()>>;

    /// Notes that BonyChat got a post about `contact`: later posts go without a profile.
    fn mark_introduced(&self, contact: &str) -> BoxFuture<'_, StoreResult<()>>;

    /// Queues the `failed` receipt of outbound message `m_id` to `contact` (when BonyChat turned
    /// out not to hear the 400 it was about to get). Queued once, however often it is asked.
    fn queue_failed_receipt(&self, contact: &str, m_id: &str, reason: &str, now: i64)
    -> BoxFuture<'_, StoreResult<()>>;

    /// Jobs in `state` (all states when `None`), newest first.
    fn list(&self, state: Option<JobState>, limit: usize) -> BoxFuture<'_, StoreResult<Vec<Job>>>;

    /// Makes one job due now, whatever its state but delivered.
    fn retry(&self, id: i64, now: i64) -> BoxFuture<'_, StoreResult<Job>>;

    /// Makes every dead job due now; returns how many.
    fn redrive_dead(&self, now: i64) -> BoxFuture<'_, StoreResult<u64>>;

    /// Deletes delivered, rejected and dropped jobs last touched before `before`, and expired
    /// echo records; returns how many jobs went.
    fn prune(&self, before: i64, now: i64) -> BoxFuture<'_, StoreResult<u64>>;
}

#[derive(Debug, Clone)]
pub struct BeforeSend {
    pub contact: String,
    pub effective_at: i64,
    pub echo_fingerprint: Option<String>,
    pub echo_expires_at: i64,
}

/// Opens the store `config` names, creating and migrating it as needed.
pub async fn open(config: &StoreConfig) -> StoreResult<Arc<dyn Store>> {
    match &config.database_url {
        DatabaseUrl::Sqlite(path) => Ok(Arc::new(sqlite::SqliteStore::open(path).await?)),
        DatabaseUrl::Postgres(_) => {
            Err(StoreError::Unavailable("postgres:// is not supported by this build yet; use sqlite://PATH".into()))
        }
    }
}

/// Milliseconds since the epoch: the store's clock.
pub fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
