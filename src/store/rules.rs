//! The rules of the queue, written once for every backend: what an accepted message or webhook
//! stores, how echoes of the relay's own sends and Messenger's redeliveries are recognised,
//! which outbound messages a watermark covers, and what a finished attempt leaves behind.
//!
//! A backend runs each rule inside one transaction of its own, through [`Tx`]: plain storage
//! operations that know nothing of these rules. SQLite's operations never wait (its writer
//! thread owns the connection), Postgres's are round trips; the rules read the same either way.

use super::{
    BeforeSend, Direction, Finish, FirstClaim, InboundBatch, InboundItem, InboundSummary, Job, JobState, Lease,
    NewOutbound, Payload, StoreError, StoreResult, encode_payload,
};
use crate::domain::bonychat::{Status, StatusValue, WebhookEvent};

/// A job row to insert.
pub(crate) struct NewRow<'a> {
    pub channel: &'a str,
    pub direction: Direction,
    pub contact: &'a str,
    pub m_id: &'a str,
    /// Inbound events and receipts: what makes a redelivery a duplicate (unique per channel).
    pub dedup_key: Option<String>,
    /// The payload in the stored format (`encode_payload`).
    pub payload: &'a str,
    pub state: JobState,
    /// The trace context its attempts continue ([`Job::trace_context`]), if any.
    pub trace_context: Option<&'a str>,
}

/// A row [`Tx::insert_job`] inserted.
pub(crate) struct Inserted {
    pub id: i64,
    /// The job heads a queue that was empty: nothing else of its contact is queued or in flight.
    pub head: bool,
    /// Its fencing token, when it was leased with the insert (see [`Tx::insert_job`]).
    pub lease_token: Option<i64>,
}

/// What a finished attempt writes on its job.
pub(crate) struct Settle<'a> {
    pub state: JobState,
    pub progress: u32,
    /// 1 for an attempt, 0 for a deferral (pacing), which is no attempt.
    pub attempted: u32,
    /// For a job that stays queued: when it is due again.
    pub next_attempt_at: Option<i64>,
    /// The attempt's error (only written for an attempt).
    pub error: Option<&'a str>,
    /// For a delivered outbound job: when its last request left, which watermarks cover.
    pub sent_at: Option<i64>,
    /// A deferred job keeps its reservation for the request still waiting for it.
    pub keep_reservation: bool,
}

impl<'a> Settle<'a> {
    fn of(finish: &'a Finish, now: i64) -> Self {
        let base = |state, progress| Settle {
            state,
            progress,
            attempted: 1,
            next_attempt_at: None,
            error: None,
            sent_at: None,
            keep_reservation: false,
        };
        match finish {
            Finish::Introduced => base(JobState::Delivered, 1),
            Finish::Delivered { progress, sent_at } => {
                Settle { sent_at: Some(*sent_at), ..base(JobState::Delivered, *progress) }
            }
            Finish::Defer { progress, next_attempt_at } => Settle {
                attempted: 0,
                next_attempt_at: Some(*next_attempt_at),
                keep_reservation: true,
                ..base(JobState::Queued, *progress)
            },
            Finish::Retry { progress, next_attempt_at, error, .. } => Settle {
                next_attempt_at: Some(*next_attempt_at),
                error: Some(error),
                ..base(JobState::Queued, *progress)
            },
            Finish::Release { progress } => {
                Settle { attempted: 0, next_attempt_at: Some(now), ..base(JobState::Queued, *progress) }
            }
            Finish::Dead { progress, error, .. } => Settle { error: Some(error), ..base(JobState::Dead, *progress) },
            Finish::Rejected { progress, error, .. } => {
                Settle { error: Some(error), ..base(JobState::Rejected, *progress) }
            }
        }
    }
}

/// The job a settled lease was on.
pub(crate) struct Settled {
    pub channel: String,
    pub direction: Direction,
    pub contact: String,
    pub m_id: String,
    /// Whether its contact still has queued jobs in that channel and direction (this one
    /// included).
    pub queued: bool,
    /// Whether settling it queued a `failed` receipt.
    pub receipt: bool,
}

/// Storage operations inside one transaction. None of them applies a rule of this module; each
/// keeps the backend's own claim structures (ready queues, heads) right for what it changed.
/// Everything about a contact is about the contact of one channel.
pub(crate) trait Tx {
    /// Holds the queues of `contacts` (sorted, distinct) of `channel` until the transaction
    /// ends, so that concurrent writers of one contact (other replicas) go one after the other.
    /// A backend with a single writer has nothing to do.
    async fn lock_queues(&mut self, channel: &str, direction: Direction, contacts: &[&str]) -> StoreResult<()>;

    /// Queued jobs of `channel` in `direction`, counted up to `cap + 1` at most.
    async fn queued(&mut self, channel: &str, direction: Direction, cap: u64) -> StoreResult<u64>;

    /// Queued jobs of `channel` in `direction` to `contact`, counted up to `cap + 1` at most
    /// (the job just inserted included).
    async fn queued_for(&mut self, channel: &str, direction: Direction, contact: &str, cap: u64) -> StoreResult<u64>;

    /// Inserts `row` at `now`; `None` when its dedup key is taken. With `first`, the job is kept
    /// from workers' claims until `first.reserved_until` (see [`FirstClaim`]; a deferral keeps
    /// that), and when it heads its queue it is also leased to `first.owner` in the same write.
    async fn insert_job(
        &mut self,
        row: &NewRow<'_>,
        now: i64,
        first: Option<&FirstClaim>,
    ) -> StoreResult<Option<Inserted>>;

    /// When the last send to `contact` takes effect (outbound pacing).
    async fn last_effective_at(&mut self, channel: &str, contact: &str) -> StoreResult<Option<i64>>;

    /// Whether a job of `channel` with any of these dedup keys exists.
    async fn any_stored(&mut self, channel: &str, dedup_keys: &[String]) -> StoreResult<bool>;

    /// Removes the oldest unexpired echo record of `fingerprint` to `contact`; whether there was one.
    async fn take_echo_mark(&mut self, channel: &str, contact: &str, fingerprint: &str, now: i64) -> StoreResult<bool>;

    /// Delivered outbound messages to `contact` that left at or before `watermark` and whose
    /// `status` was not reported yet: (job id, mId), oldest first.
    async fn unreported(
        &mut self,
        channel: &str,
        contact: &str,
        watermark: i64,
        status: StatusValue,
    ) -> StoreResult<Vec<(i64, String)>>;

    /// Notes that `status` of outbound job `id` was reported; a read one was delivered too.
    async fn mark_reported(&mut self, id: i64, status: StatusValue) -> StoreResult<()>;

    /// Keeps `watermark` as `contact`'s highest of `status` (with its event's `timestamp`),
    /// unless a higher one is already kept.
    async fn raise_watermark(
        &mut self,
        channel: &str,
        contact: &str,
        status: StatusValue,
        watermark: i64,
        timestamp: i64,
        now: i64,
    ) -> StoreResult<()>;

    /// The highest watermarks kept for `contact`: (status as [`status_name`] wrote it, watermark,
    /// the event's timestamp).
    async fn watermarks(&mut self, channel: &str, contact: &str) -> StoreResult<Vec<(String, i64, i64)>>;

    /// Writes `settle` on the job of `lease` and ends the lease, if the lease is still the
    /// job's current one; `None` (nothing written) otherwise.
    async fn settle(&mut self, lease: Lease, settle: &Settle<'_>, now: i64) -> StoreResult<Option<Settled>>;

    async fn state_of(&mut self, id: i64) -> StoreResult<Option<JobState>>;

    /// The trace context kept with outbound message `m_id` of `channel`, for the receipts about
    /// it: they continue its trace (SPEC §6).
    async fn message_trace_context(&mut self, channel: &str, m_id: &str) -> StoreResult<Option<String>>;

    /// Makes job `id` queued, due at `now`, with a fresh attempt count.
    async fn requeue(&mut self, id: i64, now: i64) -> StoreResult<()>;

    async fn load(&mut self, id: i64, now: i64) -> StoreResult<Job>;

    /// Moves `contact`'s last effective send to `at`, never backwards.
    async fn raise_last_effective(&mut self, channel: &str, contact: &str, at: i64) -> StoreResult<()>;

    /// Records a failed attempt of job `id`, numbered as the job's attempt count now says, and
    /// forgets its attempts older than the last [`ATTEMPTS_KEPT`](super::ATTEMPTS_KEPT).
    async fn record_attempt(
        &mut self,
        id: i64,
        at: i64,
        outcome: &str,
        status: Option<u16>,
        error: &str,
    ) -> StoreResult<()>;

    /// Records that BonyChat knows inbound `contact` of `channel` (see [`Finish::Introduced`]).
    async fn mark_introduced(&mut self, channel: &str, contact: &str) -> StoreResult<()>;

    async fn add_echo_mark(
        &mut self,
        channel: &str,
        contact: &str,
        fingerprint: &str,
        expires_at: i64,
    ) -> StoreResult<()>;
}

/// The claim rule, one for every backend (SQLite keeps it in the writer's memory, Postgres in
/// `channel_queues`, whose SQL states the same; the store contract tests hold both to it). A
/// contact's queue in one direction is served through its head, its oldest queued job, alone:
/// the head may be claimed from when this says, never while any job of the contact is leased
/// (`leases_until`: when each lease held on the contact's jobs ends), and not before the
/// reservation of a `/message` request still waiting for it ends (`reserved_until`, 0 for none).
pub(crate) fn head_due_at(next_attempt_at: i64, reserved_until: i64, leases_until: impl Iterator<Item = i64>) -> i64 {
    leases_until.fold(next_attempt_at.max(reserved_until), i64::max)
}

/// [`head_due_at`] for the request the reservation is for: it may take the head at `now`
/// whatever its reservation says.
pub(crate) fn head_claimable_by_its_request(
    next_attempt_at: i64,
    leases_until: impl Iterator<Item = i64>,
    now: i64,
) -> bool {
    head_due_at(next_attempt_at, 0, leases_until) <= now
}

/// A stored outbound message, and its job when it was leased with the insert (the backend
/// makes it a [`super::LeasedJob`]).
pub(crate) struct Stored {
    pub id: i64,
    pub claimed: Option<Job>,
}

/// Stores an outbound message, refused past `job.max_queued` queued ones in its channel, or
/// `per_contact` to its contact. With `first`, the request that brought it takes its first
/// attempt: leased at once when the contact has nothing queued (the usual case, and one round
/// trip), else reserved until the request can claim it in turn.
pub(crate) async fn enqueue_outbound<T: Tx>(
    tx: &mut T,
    job: &NewOutbound,
    payload: &str,
    first: Option<&FirstClaim>,
    per_contact: u64,
) -> StoreResult<Stored> {
    let channel = job.channel.as_str();
    tx.lock_queues(channel, Direction::Outbound, &[&job.contact]).await?;
    if tx.queued(channel, Direction::Outbound, job.max_queued).await? >= job.max_queued {
        return Err(StoreError::Full {
            channel: job.channel.clone(),
            direction: Direction::Outbound,
            cap: job.max_queued,
        });
    }
    let row = NewRow {
        channel,
        direction: Direction::Outbound,
        contact: &job.contact,
        m_id: &job.m_id,
        dedup_key: None,
        payload,
        state: JobState::Queued,
        trace_context: job.trace_context.as_deref(),
    };
    let inserted = tx
        .insert_job(&row, job.now, first)
        .await?
        .ok_or_else(|| StoreError::Unavailable("an outbound job was taken for a duplicate".into()))?;
    // Only a job behind others can take its contact past the cap: the usual message, heading an
    // empty queue, costs no count. A refusal undoes the insert with the rest of the operation.
    if !inserted.head && tx.queued_for(channel, Direction::Outbound, &job.contact, per_contact).await? > per_contact {
        return Err(StoreError::ContactFull { cap: per_contact });
    }
    let Some(lease_token) = inserted.lease_token else { return Ok(Stored { id: inserted.id, claimed: None }) };
    let contact_last_effective_at = tx.last_effective_at(channel, &job.contact).await?;
    let claimed = Job {
        id: inserted.id,
        channel: job.channel.clone(),
        direction: Direction::Outbound,
        contact: job.contact.clone(),
        m_id: job.m_id.clone(),
        state: JobState::Queued,
        attempts: 0,
        progress: 0,
        next_attempt_at: job.now,
        last_error: None,
        created_at: job.now,
        updated_at: job.now,
        in_flight: true,
        lease_until: first.map(|first| first.lease_until),
        lease_token,
        payload: Ok(Payload::Send { recipient: job.recipient.clone(), parts: job.parts.clone() }),
        contact_last_effective_at,
        contact_introduced: false,
        trace_context: job.trace_context.clone(),
    };
    Ok(Stored { id: inserted.id, claimed: Some(claimed) })
}

/// An inbound event ready to store: its payload encoded before the transaction.
pub(crate) struct PreparedEvent {
    m_id: String,
    payload: String,
}

impl PreparedEvent {
    fn new(event: &WebhookEvent) -> Self {
        Self { m_id: event.m_id().to_owned(), payload: encode_payload(&Payload::Event { event: event.clone() }) }
    }
}

/// A webhook batch with its events encoded, ready for [`enqueue_inbound`].
pub(crate) struct PreparedBatch {
    batch: InboundBatch,
    events: Vec<Vec<PreparedEvent>>,
}

impl PreparedBatch {
    pub(crate) fn new(batch: InboundBatch) -> Self {
        let events = batch
            .items
            .iter()
            .map(|item| match item {
                InboundItem::Message { events, .. } => events.iter().map(PreparedEvent::new).collect(),
                InboundItem::Watermark { .. } => Vec::new(),
            })
            .collect();
        Self { batch, events }
    }

    /// The contacts of the items `which` picks, sorted and distinct: the lock order.
    fn contacts(&self, which: impl Fn(&InboundItem) -> bool) -> Vec<&str> {
        let mut contacts: Vec<&str> = self
            .batch
            .items
            .iter()
            .filter(|item| which(item))
            .map(|item| match item {
                InboundItem::Message { contact, .. } | InboundItem::Watermark { contact, .. } => contact.as_str(),
            })
            .collect();
        contacts.sort_unstable();
        contacts.dedup();
        contacts
    }

    /// Payload bytes the batch holds.
    pub(crate) fn bytes(&self) -> usize {
        self.events.iter().flatten().map(|event| event.payload.len()).sum()
    }
}

/// Stores a webhook batch of one channel, all or nothing: new events queued, redeliveries and
/// the echoes of the relay's own sends recognised, receipts queued for what watermarks cover;
/// refused when it would take the channel's inbound queue past `batch.max_queued`.
pub(crate) async fn enqueue_inbound<T: Tx>(tx: &mut T, prepared: &PreparedBatch) -> StoreResult<InboundSummary> {
    let (channel, cap) = (prepared.batch.channel.as_str(), prepared.batch.max_queued);
    // A watermark and the end of a send to the same contact must not interleave, or each would
    // miss the other (the receipt never sent): both hold the contact's outbound queue. Lock
    // order is outbound before inbound, as in `finish`.
    let watermarked = prepared.contacts(|item| matches!(item, InboundItem::Watermark { .. }));
    if !watermarked.is_empty() {
        tx.lock_queues(channel, Direction::Outbound, &watermarked).await?;
    }
    tx.lock_queues(channel, Direction::Inbound, &prepared.contacts(|_| true)).await?;

    let now = prepared.batch.now;
    let mut summary = InboundSummary::default();
    for (item, events) in prepared.batch.items.iter().zip(&prepared.events) {
        match item {
            InboundItem::Message { contact, echo_fingerprint, .. } => {
                let fingerprint = echo_fingerprint.as_deref();
                let row = RowOf { channel, contact, trace_context: prepared.batch.trace_context.as_deref() };
                store_message(tx, &row, events, fingerprint, now, &mut summary).await?;
            }
            InboundItem::Watermark { contact, status, watermark, timestamp } => {
                let mark = (*status, *watermark, *timestamp);
                let trace_context = prepared.batch.trace_context.as_deref();
                store_watermark(tx, channel, contact, mark, trace_context, now, &mut summary).await?;
            }
        }
    }
    // Checked after the inserts so that duplicates and dropped echoes, which queue nothing,
    // never count; a refusal rolls the whole batch back (Meta redelivers it).
    if summary.queued + summary.receipts > 0 && tx.queued(channel, Direction::Inbound, cap).await? > cap {
        return Err(StoreError::Full { channel: channel.to_owned(), direction: Direction::Inbound, cap });
    }
    Ok(summary)
}

/// Where the rows of one webhook item go, and the trace they continue.
struct RowOf<'a> {
    channel: &'a str,
    contact: &'a str,
    trace_context: Option<&'a str>,
}

async fn store_message<T: Tx>(
    tx: &mut T,
    row: &RowOf<'_>,
    events: &[PreparedEvent],
    echo_fingerprint: Option<&str>,
    now: i64,
    summary: &mut InboundSummary,
) -> StoreResult<()> {
    let RowOf { channel, contact, .. } = *row;
    let keys: Vec<String> = events.iter().map(|event| event_key(&event.m_id)).collect();
    // An echo already stored (dropped or queued) must not consume another send's record; other
    // events are deduplicated by the insert itself.
    if let Some(fingerprint) = echo_fingerprint
        && !tx.any_stored(channel, &keys).await?
        && tx.take_echo_mark(channel, contact, fingerprint, now).await?
    {
        for (event, key) in events.iter().zip(keys) {
            tx.insert_job(&event_row(row, event, key, JobState::Dropped), now, None).await?;
        }
        summary.own_echoes += 1;
        return Ok(());
    }
    for (event, key) in events.iter().zip(keys) {
        if tx.insert_job(&event_row(row, event, key, JobState::Queued), now, None).await?.is_some() {
            summary.queued += 1;
        } else {
            summary.duplicates += 1;
        }
    }
    Ok(())
}

fn event_row<'a>(row: &RowOf<'a>, event: &'a PreparedEvent, dedup_key: String, state: JobState) -> NewRow<'a> {
    NewRow {
        channel: row.channel,
        direction: Direction::Inbound,
        contact: row.contact,
        m_id: &event.m_id,
        dedup_key: Some(dedup_key),
        payload: &event.payload,
        state,
        trace_context: row.trace_context,
    }
}

/// Stores one watermark: `(status, watermark, timestamp)` of `contact` in `channel`.
async fn store_watermark<T: Tx>(
    tx: &mut T,
    channel: &str,
    contact: &str,
    (status, watermark, timestamp): (StatusValue, i64, i64),
    trace_context: Option<&str>,
    now: i64,
    summary: &mut InboundSummary,
) -> StoreResult<()> {
    for (id, m_id) in tx.unreported(channel, contact, watermark, status).await? {
        // A read receipt settles "delivered" too: a later delivery watermark must not step back.
        tx.mark_reported(id, status).await?;
        let receipt = Status { value: status, message: None };
        if queue_receipt(tx, channel, contact, &m_id, (receipt, timestamp), trace_context, now).await? {
            summary.receipts += 1;
        }
    }
    // Kept for the messages still waiting for JoinChat's answer: their receipt follows once
    // JoinChat accepts them (`receipts_on_delivery`).
    tx.raise_watermark(channel, contact, status, watermark, timestamp, now).await
}

/// The receipts a just-delivered outbound message is owed: Messenger's watermarks can arrive
/// while its last request waited for JoinChat's answer (SPEC §4.3). Delivered before read,
/// as Messenger reports them.
async fn receipts_on_delivery<T: Tx>(
    tx: &mut T,
    settled: &Settled,
    id: i64,
    sent_at: i64,
    now: i64,
) -> StoreResult<bool> {
    let mut covering: Vec<(StatusValue, i64)> = tx
        .watermarks(&settled.channel, &settled.contact)
        .await?
        .into_iter()
        .filter(|&(_, watermark, _)| watermark >= sent_at)
        .filter_map(|(status, _, timestamp)| Some((watermark_status(&status)?, timestamp)))
        .collect();
    if covering.is_empty() {
        return Ok(false);
    }
    covering.sort_by_key(|&(status, _)| status != StatusValue::Delivered);
    tx.lock_queues(&settled.channel, Direction::Inbound, &[&settled.contact]).await?;
    let trace_context = tx.message_trace_context(&settled.channel, &settled.m_id).await?;
    for (status, timestamp) in covering {
        tx.mark_reported(id, status).await?;
        let receipt = Status { value: status, message: None };
        let (channel, contact, m_id) = (&settled.channel, &settled.contact, &settled.m_id);
        queue_receipt(tx, channel, contact, m_id, (receipt, timestamp), trace_context.as_deref(), now).await?;
    }
    Ok(true)
}

/// Queues a receipt for outbound message `m_id`, once per status; whether it was new.
async fn queue_receipt<T: Tx>(
    tx: &mut T,
    channel: &str,
    contact: &str,
    m_id: &str,
    (status, timestamp): (Status, i64),
    trace_context: Option<&str>,
    now: i64,
) -> StoreResult<bool> {
    let dedup_key = Some(receipt_key(status.value, m_id));
    let payload = encode_payload(&Payload::Event {
        event: WebhookEvent::MessageStatus { m_id: m_id.to_owned(), timestamp, status },
    });
    let row = NewRow {
        channel,
        direction: Direction::Inbound,
        contact,
        m_id,
        dedup_key,
        payload: &payload,
        state: JobState::Queued,
        trace_context,
    };
    Ok(tx.insert_job(&row, now, None).await?.is_some())
}

/// Queues the `failed` receipt of outbound message `m_id` to `contact` of `channel`, once.
pub(crate) async fn queue_failed_receipt<T: Tx>(
    tx: &mut T,
    channel: &str,
    contact: &str,
    m_id: &str,
    reason: &str,
    now: i64,
) -> StoreResult<()> {
    tx.lock_queues(channel, Direction::Inbound, &[contact]).await?;
    let status = Status { value: StatusValue::Failed, message: Some(reason.to_owned()) };
    let trace_context = tx.message_trace_context(channel, m_id).await?;
    queue_receipt(tx, channel, contact, m_id, (status, now), trace_context.as_deref(), now).await?;
    Ok(())
}

/// Records how the attempt under `lease` ended: refused when the lease is no longer current; a
/// dead outbound message that BonyChat must hear about gets its `failed` receipt.
pub(crate) async fn finish<T: Tx>(tx: &mut T, lease: Lease, finish: &Finish, now: i64) -> StoreResult<Settled> {
    let Some(mut settled) = tx.settle(lease, &Settle::of(finish, now), now).await? else {
        return Err(StoreError::Conflict(format!(
            "job {} is no longer leased under token {}: another worker claimed it since",
            lease.id, lease.token
        )));
    };
    let failed = match finish {
        Finish::Retry { error, status, .. } => Some(("retry", error, status)),
        Finish::Dead { error, status, .. } => Some(("dead", error, status)),
        Finish::Rejected { error, status, .. } => Some(("rejected", error, status)),
        _ => None,
    };
    if let Some((outcome, error, status)) = failed {
        let status = status.or_else(|| upstream_status(error));
        tx.record_attempt(lease.id, now, outcome, status, error).await?;
    }
    match finish {
        Finish::Dead { error, failed_receipt: true, .. } => {
            queue_failed_receipt(tx, &settled.channel, &settled.contact, &settled.m_id, error, now).await?;
            settled.receipt = true;
        }
        Finish::Introduced => tx.mark_introduced(&settled.channel, &settled.contact).await?,
        Finish::Delivered { sent_at, .. } if settled.direction == Direction::Outbound => {
            settled.receipt = receipts_on_delivery(tx, &settled, lease.id, *sent_at, now).await?;
        }
        _ => {}
    }
    Ok(settled)
}

/// The HTTP status an upstream answered, as the clients word their errors ("JoinChat answered
/// 503 …"), for a failure that did not say it otherwise; `None` for a timeout, a refused
/// connection and the like.
pub(crate) fn upstream_status(error: &str) -> Option<u16> {
    let (_, after) = error.split_once(" answered ")?;
    let digits = after.get(..3)?;
    let status: u16 = digits.parse().ok()?;
    let ends_there = after[3..].chars().next().is_none_or(|c| !c.is_ascii_digit());
    ((100..600).contains(&status) && ends_there).then_some(status)
}

/// The outcome an operator's retry or redrive leaves in a job's attempts, and its words.
pub(crate) const REQUEUED: &str = "requeued";
pub(crate) const REQUEUED_WHY: &str = "queued again by an operator, with a fresh retry schedule";

/// Makes one `dead` or `queued` job due now with a fresh retry schedule; the other states say
/// why not.
pub(crate) async fn retry<T: Tx>(tx: &mut T, id: i64, now: i64) -> StoreResult<Job> {
    match tx.state_of(id).await? {
        None => return Err(StoreError::NotFound(id)),
        Some(JobState::Dead | JobState::Queued) => {}
        Some(JobState::Delivered) => return Err(StoreError::Conflict(format!("job {id} was already delivered"))),
        Some(JobState::Rejected) => {
            return Err(StoreError::Conflict(format!(
                "job {id} was rejected by JoinChat while BonyChat waited: BonyChat got the 400 and shows the failure; sending it again would surprise the contact"
            )));
        }
        Some(JobState::Dropped) => {
            return Err(StoreError::Conflict(format!(
                "job {id} is Messenger's echo of a message this relay sent itself: BonyChat already has that message"
            )));
        }
    }
    // Kept with the attempts: the count starts again from here.
    tx.record_attempt(id, now, REQUEUED, None, REQUEUED_WHY).await?;
    // A job in flight keeps its lease: retrying it only makes it due again afterwards.
    tx.requeue(id, now).await?;
    tx.load(id, now).await
}

/// Records when a send takes effect (pacing never moves backwards) and its echo's fingerprint.
pub(crate) async fn record_send<T: Tx>(tx: &mut T, send: &BeforeSend) -> StoreResult<()> {
    tx.raise_last_effective(&send.channel, &send.contact, send.effective_at).await?;
    if let Some(fingerprint) = &send.echo_fingerprint {
        tx.add_echo_mark(&send.channel, &send.contact, fingerprint, send.echo_expires_at).await?;
    }
    Ok(())
}

fn event_key(m_id: &str) -> String {
    format!("event:{m_id}")
}

fn receipt_key(value: StatusValue, m_id: &str) -> String {
    format!("receipt:{}:{m_id}", status_name(value))
}

/// How a receipt's status is written in the store.
pub(crate) fn status_name(value: StatusValue) -> &'static str {
    match value {
        StatusValue::Delivered => "delivered",
        StatusValue::Read => "read",
        StatusValue::Failed => "failed",
    }
}

/// The status of a kept watermark, as [`status_name`] wrote it.
fn watermark_status(name: &str) -> Option<StatusValue> {
    [StatusValue::Delivered, StatusValue::Read].into_iter().find(|&value| status_name(value) == name)
}

#[cfg(test)]
mod tests {
    use super::upstream_status;

    #[test]
    fn the_upstream_status_is_read_from_the_clients_wording() {
        assert_eq!(upstream_status("JoinChat answered 503 Service Unavailable: busy"), Some(503));
        assert_eq!(upstream_status("BonyChat answered 401 Unauthorized"), Some(401));
        assert_eq!(upstream_status("JoinChat answered 400 with success: false"), Some(400));
        assert_eq!(upstream_status("cannot reach JoinChat: connection refused"), None);
        assert_eq!(upstream_status("JoinChat answered 5031"), None);
        assert_eq!(upstream_status("JoinChat answered 42"), None);
    }
}
