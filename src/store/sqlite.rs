//! The embedded store: one SQLite file in WAL mode with `synchronous=FULL`, so a commit is on
//! disk (fsync'd) before anyone is told it happened.
//!
//! One writer thread owns the connection. Every operation is a closure sent to it; the thread
//! runs all operations waiting at that moment in one transaction, each in its own savepoint
//! (so one failing operation does not undo the others), commits once, and only then answers
//! them all. Concurrent requests thus share one fsync: group commit. No operation waits on
//! anything but the database, so no transaction is ever held across an HTTP call.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, Row, TransactionBehavior, params};
use tokio::sync::{mpsc, oneshot};

use super::{
    BeforeSend, Direction, Finish, InboundBatch, InboundItem, InboundSummary, Job, JobState, NewOutbound, Payload,
    Store, StoreError, StoreResult,
};
use crate::clients::BoxFuture;
use crate::domain::bonychat::{Status, StatusValue, WebhookEvent};

const MIGRATIONS: &[&str] = &[include_str!("../../migrations/sqlite/0001_init.sql")];

/// Operations committed together at most; bounds the latency a large batch adds.
const MAX_BATCH: usize = 512;

/// Runs inside the transaction; says whether it succeeded (else its savepoint is rolled back)
/// and how to answer its caller once the commit is known.
type Op = Box<dyn FnOnce(&Connection) -> (bool, Answer) + Send>;
type Answer = Box<dyn FnOnce(Result<(), String>) + Send>;

pub struct SqliteStore {
    ops: mpsc::UnboundedSender<Op>,
    commits: Arc<AtomicU64>,
}

impl SqliteStore {
    /// Opens (creating the file and its directory) and migrates the database at `path`.
    pub async fn open(path: &Path) -> StoreResult<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| StoreError::Unavailable(format!("cannot create {}: {e}", dir.display())))?;
        }
        let path = path.to_owned();
        let (ready_tx, ready_rx) = oneshot::channel();
        let (ops, ops_rx) = mpsc::unbounded_channel();
        let commits = Arc::new(AtomicU64::new(0));
        let counted = Arc::clone(&commits);
        std::thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || match open_connection(&path) {
                Ok(conn) => {
                    let _ = ready_tx.send(Ok(()));
                    write_loop(conn, ops_rx, &counted);
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(StoreError::Unavailable(format!("cannot open {}: {e}", path.display()))));
                }
            })
            .map_err(|e| StoreError::Unavailable(format!("cannot start the store thread: {e}")))?;
        ready_rx.await.map_err(|_| StoreError::Unavailable("the store thread stopped".into()))??;
        Ok(Self { ops, commits })
    }

    /// Queues `f` for the next group commit without waiting for it. Operations run in the order
    /// they were queued, so every later operation sees what `f` wrote.
    fn submit<F>(&self, f: F) -> StoreResult<()>
    where
        F: FnOnce(&Connection) -> StoreResult<()> + Send + 'static,
    {
        let op: Op = Box::new(move |conn| {
            let result = f(conn);
            let ok = result.is_ok();
            let answer: Answer = Box::new(move |committed| {
                if let Err(e) = result.and(committed.map_err(StoreError::Unavailable)) {
                    tracing::warn!(error = %e, "a queued store write failed");
                }
            });
            (ok, answer)
        });
        self.ops.send(op).map_err(|_| StoreError::Unavailable("the store thread stopped".into()))
    }

    /// How many transactions were committed so far: fewer than operations when they share.
    pub fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }

    /// Runs `f` in the next group commit and returns its result once committed.
    fn run<T, F>(&self, f: F) -> BoxFuture<'_, StoreResult<T>>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> StoreResult<T> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let op: Op = Box::new(move |conn| {
            let result = f(conn);
            let ok = result.is_ok();
            let answer: Answer = Box::new(move |committed| {
                let outcome = match committed {
                    Ok(()) => result,
                    Err(e) => Err(StoreError::Unavailable(format!("commit failed: {e}"))),
                };
                let _ = tx.send(outcome);
            });
            (ok, answer)
        });
        let sent = self.ops.send(op);
        Box::pin(async move {
            sent.map_err(|_| StoreError::Unavailable("the store thread stopped".into()))?;
            rx.await.map_err(|_| StoreError::Unavailable("the store thread stopped".into()))?
        })
    }
}

fn open_connection(path: &Path) -> rusqlite::Result<Connection> {
    let mut conn = Connection::open(path)?;
    // Other processes (`bonychat-relay jobs …`) may write at the same time.
    conn.busy_timeout(Duration::from_secs(5))?;
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(rusqlite::Error::InvalidParameterName(format!("journal_mode stayed {mode}, not WAL")));
    }
    // FULL: every commit fsyncs the WAL, so it survives power loss, not just a crash.
    conn.execute_batch("PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;")?;
    migrate(&mut conn)?;
    rebuild_heads(&conn)?;
    Ok(conn)
}

fn migrate(conn: &mut Connection) -> rusqlite::Result<()> {
    let version: i64 = conn.query_row("PRAGMA user_version", [], |row| row.get(0))?;
    for (index, migration) in (0_i64..).zip(MIGRATIONS).skip(usize::try_from(version).unwrap_or(0)) {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute_batch(migration)?;
        tx.pragma_update(None, "user_version", index + 1)?;
        tx.commit()?;
    }
    Ok(())
}

/// Rebuilds the ready queue from the jobs: at start, and after operations that reorder it.
fn rebuild_heads(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(
        "DELETE FROM queue_heads;
         INSERT INTO queue_heads (direction, contact, job_id, due_at)
         SELECT j.direction, j.contact, j.id,
                MAX(j.next_attempt_at, COALESCE((SELECT MAX(l.lease_until) FROM jobs l
                    WHERE l.lease_owner IS NOT NULL AND l.state = 'queued'
                      AND l.direction = j.direction AND l.contact = j.contact), 0))
         FROM jobs j JOIN (SELECT MIN(id) AS id FROM jobs WHERE state = 'queued' GROUP BY direction, contact) h
           ON h.id = j.id;",
    )
}

/// Puts the ready-queue row of one (direction, contact) right after its jobs changed: the
/// oldest queued job is the head, claimable at its next attempt, but not while any queued job
/// of the contact is leased (one in flight per contact).
fn refresh_head(conn: &Connection, direction: &str, contact: &str) -> rusqlite::Result<()> {
    let head: Option<(i64, i64)> = conn
        .prepare_cached(
            "SELECT id, next_attempt_at FROM jobs WHERE state = 'queued' AND direction = ?1 AND contact = ?2 ORDER BY id LIMIT 1",
        )?
        .query_row(params![direction, contact], |row| Ok((row.get(0)?, row.get(1)?)))
        .optional()?;
    let Some((head, next_attempt_at)) = head else {
        conn.prepare_cached("DELETE FROM queue_heads WHERE direction = ?1 AND contact = ?2")?
            .execute(params![direction, contact])?;
        return Ok(());
    };
    let leased_until: Option<i64> = conn
        .prepare_cached(
            "SELECT MAX(lease_until) FROM jobs WHERE lease_owner IS NOT NULL AND direction = ?1 AND contact = ?2 AND state = 'queued'",
        )?
        .query_row(params![direction, contact], |row| row.get(0))?;
    conn.prepare_cached(
        "INSERT INTO queue_heads (direction, contact, job_id, due_at) VALUES (?1, ?2, ?3, ?4) \
         ON CONFLICT (direction, contact) DO UPDATE SET job_id = excluded.job_id, due_at = excluded.due_at",
    )?
    .execute(params![direction, contact, head, next_attempt_at.max(leased_until.unwrap_or(0))])?;
    Ok(())
}

/// The (direction, contact) of job `id`.
fn queue_of(conn: &Connection, id: i64) -> rusqlite::Result<Option<(String, String)>> {
    conn.prepare_cached("SELECT direction, contact FROM jobs WHERE id = ?1")?
        .query_row([id], |row| Ok((row.get(0)?, row.get(1)?)))
        .optional()
}

/// Clears the leases of `owner` (of everyone when `None`) and refreshes their queues.
fn clear_leases(conn: &Connection, owner: Option<&str>) -> rusqlite::Result<u64> {
    const MATCHING: &str = "lease_owner IS NOT NULL AND (?1 IS NULL OR lease_owner = ?1)";
    let queues: Vec<(String, String)> = conn
        .prepare(&format!("SELECT DISTINCT direction, contact FROM jobs WHERE {MATCHING}"))?
        .query_map(params![owner], |row| Ok((row.get(0)?, row.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    let cleared = conn
        .execute(&format!("UPDATE jobs SET lease_owner = NULL, lease_until = NULL WHERE {MATCHING}"), params![owner])?;
    for (direction, contact) in queues {
        refresh_head(conn, &direction, &contact)?;
    }
    Ok(cleared as u64)
}

fn write_loop(mut conn: Connection, mut ops: mpsc::UnboundedReceiver<Op>, commits: &AtomicU64) {
    while let Some(first) = ops.blocking_recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match ops.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        let mut answers = Vec::with_capacity(batch.len());
        let committed = run_batch(&mut conn, batch, &mut answers).map_err(|e| e.to_string());
        match &committed {
            Ok(()) => {
                commits.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => tracing::error!(error = %e, "store commit failed"),
        }
        for answer in answers {
            answer(committed.clone());
        }
    }
}

fn run_batch(conn: &mut Connection, batch: Vec<Op>, answers: &mut Vec<Answer>) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    for op in batch {
        // Savepoints through cached statements: rusqlite's own re-parse their SQL every time.
        tx.prepare_cached("SAVEPOINT op")?.execute([])?;
        let (ok, answer) = op(&tx);
        answers.push(answer);
        if !ok {
            tx.prepare_cached("ROLLBACK TO op")?.execute([])?;
        }
        tx.prepare_cached("RELEASE op")?.execute([])?;
    }
    tx.commit()
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        Self::Unavailable(e.to_string())
    }
}

fn to_json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect("store payloads always serialize")
}

const JOB_COLUMNS: &str = "j.id, j.direction, j.contact, j.m_id, j.state, j.attempts, j.progress, j.next_attempt_at, \
    j.last_error, j.created_at, j.updated_at, j.lease_until, j.payload";

/// A job as read: its payload is still JSON, parsed off the writer thread by `into_job`.
struct RawJob {
    id: i64,
    direction: String,
    contact: String,
    m_id: String,
    state: String,
    attempts: u32,
    progress: u32,
    next_attempt_at: i64,
    last_error: Option<String>,
    created_at: i64,
    updated_at: i64,
    in_flight: bool,
    payload: String,
    contact_last_effective_at: Option<i64>,
    contact_introduced: bool,
}

impl RawJob {
    fn into_job(self) -> StoreResult<Job> {
        let corrupt = |what: &str| StoreError::Unavailable(format!("job {} has an unreadable {what}", self.id));
        Ok(Job {
            id: self.id,
            direction: Direction::parse(&self.direction).ok_or_else(|| corrupt("direction"))?,
            state: JobState::parse(&self.state).ok_or_else(|| corrupt("state"))?,
            payload: serde_json::from_str(&self.payload).map_err(|_| corrupt("payload"))?,
            contact: self.contact,
            m_id: self.m_id,
            attempts: self.attempts,
            progress: self.progress,
            next_attempt_at: self.next_attempt_at,
            last_error: self.last_error,
            created_at: self.created_at,
            updated_at: self.updated_at,
            in_flight: self.in_flight,
            contact_last_effective_at: self.contact_last_effective_at,
            contact_introduced: self.contact_introduced,
        })
    }
}

/// Parses the jobs a store operation read, once it is back on the caller's thread.
fn parsed(read: BoxFuture<'_, StoreResult<Vec<RawJob>>>) -> BoxFuture<'_, StoreResult<Vec<Job>>> {
    Box::pin(async move { read.await?.into_iter().map(RawJob::into_job).collect() })
}

fn job_from_row(row: &Row<'_>, now: i64) -> rusqlite::Result<RawJob> {
    let lease_until: Option<i64> = row.get(11)?;
    Ok(RawJob {
        id: row.get(0)?,
        direction: row.get(1)?,
        contact: row.get(2)?,
        m_id: row.get(3)?,
        state: row.get(4)?,
        attempts: row.get(5)?,
        progress: row.get(6)?,
        next_attempt_at: row.get(7)?,
        last_error: row.get(8)?,
        created_at: row.get(9)?,
        updated_at: row.get(10)?,
        in_flight: lease_until.is_some_and(|until| until > now),
        payload: row.get(12)?,
        contact_last_effective_at: None,
        contact_introduced: false,
    })
}

/// A job row to insert.
struct NewRow<'a> {
    direction: Direction,
    contact: &'a str,
    m_id: &'a str,
    dedup_key: Option<String>,
    /// The payload as JSON, serialized before it reaches the writer thread.
    payload: &'a str,
    state: JobState,
}

impl<'a> NewRow<'a> {
    /// An inbound event, deduplicated on its `mId`.
    fn event(contact: &'a str, event: &'a PreparedEvent, state: JobState) -> Self {
        Self {
            direction: Direction::Inbound,
            contact,
            m_id: &event.m_id,
            dedup_key: Some(event_key(&event.m_id)),
            payload: &event.payload,
            state,
        }
    }
}

/// An inbound event ready to store: its payload serialized on the caller's thread.
struct PreparedEvent {
    m_id: String,
    payload: String,
}

impl PreparedEvent {
    fn new(event: &WebhookEvent) -> Self {
        Self { m_id: event.m_id().to_owned(), payload: to_json(&Payload::Event { event: event.clone() }) }
    }
}

/// Inserts `row` unless its dedup key is taken; returns the new job's id if it did.
fn insert_job(conn: &Connection, row: NewRow<'_>, now: i64) -> rusqlite::Result<Option<i64>> {
    let inserted = conn
        .prepare_cached(
            "INSERT INTO jobs (direction, contact, m_id, dedup_key, payload, state, next_attempt_at, created_at, updated_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7, ?7) ON CONFLICT (dedup_key) WHERE dedup_key IS NOT NULL DO NOTHING",
        )?
        .execute(params![
            row.direction.as_str(),
            row.contact,
            row.m_id,
            row.dedup_key,
            row.payload,
            row.state.as_str(),
            now
        ])?;
    if inserted == 0 {
        return Ok(None);
    }
    let id = conn.last_insert_rowid();
    if row.state == JobState::Queued {
        // Heads the contact's queue unless an older job already does.
        conn.prepare_cached(
            "INSERT INTO queue_heads (direction, contact, job_id, due_at) VALUES (?1, ?2, ?3, ?4) \
             ON CONFLICT (direction, contact) DO NOTHING",
        )?
        .execute(params![row.direction.as_str(), row.contact, id, now])?;
    }
    Ok(Some(id))
}

fn event_key(m_id: &str) -> String {
    format!("event:{m_id}")
}

fn receipt_key(value: StatusValue, m_id: &str) -> String {
    let value = match value {
        StatusValue::Delivered => "delivered",
        StatusValue::Read => "read",
        StatusValue::Failed => "failed",
    };
    format!("receipt:{value}:{m_id}")
}

/// Queues a receipt for outbound message `m_id`; a receipt is queued once per status.
fn queue_receipt(
    conn: &Connection,
    contact: &str,
    m_id: &str,
    status: Status,
    timestamp: i64,
    now: i64,
) -> rusqlite::Result<bool> {
    // Receipts are few; their payload is made here.
    let dedup_key = Some(receipt_key(status.value, m_id));
    let payload =
        to_json(&Payload::Event { event: WebhookEvent::MessageStatus { m_id: m_id.to_owned(), timestamp, status } });
    let row =
        NewRow { direction: Direction::Inbound, contact, m_id, dedup_key, payload: &payload, state: JobState::Queued };
    Ok(insert_job(conn, row, now)?.is_some())
}

fn already_stored(conn: &Connection, events: &[PreparedEvent]) -> rusqlite::Result<bool> {
    let mut seen = conn.prepare_cached("SELECT 1 FROM jobs WHERE dedup_key = ?1")?;
    for event in events {
        if seen.exists([event_key(&event.m_id)])? {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Queues the `failed` receipt of outbound message `m_id`.
fn queue_failed_receipt(conn: &Connection, contact: &str, m_id: &str, reason: &str, now: i64) -> rusqlite::Result<()> {
    let status = Status { value: StatusValue::Failed, message: Some(reason.to_owned()) };
    queue_receipt(conn, contact, m_id, status, now, now)?;
    Ok(())
}

fn store_message(
    conn: &Connection,
    contact: &str,
    events: &[PreparedEvent],
    echo_fingerprint: Option<&str>,
    now: i64,
    summary: &mut InboundSummary,
) -> rusqlite::Result<()> {
    // An echo already stored (dropped or queued) must not consume another send's mark; other
    // events are deduplicated by the insert itself.
    if let Some(fingerprint) = echo_fingerprint
        && !already_stored(conn, events)?
    {
        let mark: Option<i64> = conn
            .prepare_cached(
                "SELECT id FROM echo_marks WHERE contact = ?1 AND fingerprint = ?2 AND expires_at > ?3 ORDER BY id LIMIT 1",
            )?
            .query_row(params![contact, fingerprint, now], |row| row.get(0))
            .optional()?;
        if let Some(mark) = mark {
            conn.prepare_cached("DELETE FROM echo_marks WHERE id = ?1")?.execute([mark])?;
            for event in events {
                insert_job(conn, NewRow::event(contact, event, JobState::Dropped), now)?;
            }
            summary.own_echoes += 1;
            return Ok(());
        }
    }
    for event in events {
        if insert_job(conn, NewRow::event(contact, event, JobState::Queued), now)?.is_some() {
            summary.queued += 1;
        } else {
            summary.duplicates += 1;
        }
    }
    Ok(())
}

fn store_watermark(
    conn: &Connection,
    contact: &str,
    status: StatusValue,
    watermark: i64,
    timestamp: i64,
    now: i64,
    summary: &mut InboundSummary,
) -> rusqlite::Result<()> {
    // A read receipt settles "delivered" too: a later delivery watermark must not step back.
    let (unreported, mark) = match status {
        StatusValue::Read => ("read_reported = 0", "read_reported = 1, delivered_reported = 1"),
        _ => ("delivered_reported = 0", "delivered_reported = 1"),
    };
    let covered: Vec<(i64, String)> = conn
        .prepare_cached(&format!(
            "SELECT id, m_id FROM jobs WHERE contact = ?1 AND accepted_at IS NOT NULL AND accepted_at <= ?2 \
             AND direction = 'outbound' AND state = 'delivered' AND {unreported} ORDER BY id"
        ))?
        .query_map(params![contact, watermark], |row| Ok((row.get(0)?, row.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    let mut flag = conn.prepare_cached(&format!("UPDATE jobs SET {mark} WHERE id = ?1"))?;
    for (id, m_id) in covered {
        flag.execute([id])?;
        if queue_receipt(conn, contact, &m_id, Status { value: status, message: None }, timestamp, now)? {
            summary.receipts += 1;
        }
    }
    Ok(())
}

impl Store for SqliteStore {
    fn ping(&self) -> BoxFuture<'_, StoreResult<()>> {
        self.run(|conn| Ok(conn.query_row("SELECT 1", [], |_| Ok(()))?))
    }

    fn recover(&self) -> BoxFuture<'_, StoreResult<u64>> {
        // SQLite serves one replica: any lease left is from a process that is gone.
        self.run(|conn| Ok(clear_leases(conn, None)?))
    }

    fn enqueue_outbound(&self, job: NewOutbound) -> BoxFuture<'_, StoreResult<i64>> {
        let payload = to_json(&Payload::Send { recipient: job.recipient, parts: job.parts });
        let (contact, m_id, now) = (job.contact, job.m_id, job.now);
        self.run(move |conn| {
            let row = NewRow {
                direction: Direction::Outbound,
                contact: &contact,
                m_id: &m_id,
                dedup_key: None,
                payload: &payload,
                state: JobState::Queued,
            };
            let id = insert_job(conn, row, now)?;
            Ok(id.expect("a job without a dedup key is always inserted"))
        })
    }

    fn enqueue_inbound(&self, batch: InboundBatch) -> BoxFuture<'_, StoreResult<InboundSummary>> {
        let prepared: Vec<Option<Vec<PreparedEvent>>> = batch
            .items
            .iter()
            .map(|item| match item {
                InboundItem::Message { events, .. } => Some(events.iter().map(PreparedEvent::new).collect()),
                InboundItem::Watermark { .. } => None,
            })
            .collect();
        self.run(move |conn| {
            let mut summary = InboundSummary::default();
            for (item, prepared) in batch.items.iter().zip(&prepared) {
                match item {
                    InboundItem::Message { contact, echo_fingerprint, .. } => {
                        let events = prepared.as_deref().unwrap_or_default();
                        store_message(conn, contact, events, echo_fingerprint.as_deref(), batch.now, &mut summary)?;
                    }
                    InboundItem::Watermark { contact, status, watermark, timestamp } => {
                        store_watermark(conn, contact, *status, *watermark, *timestamp, batch.now, &mut summary)?;
                    }
                }
            }
            Ok(summary)
        })
    }

    fn claim(&self, owner: &str, now: i64, lease_until: i64, limit: usize) -> BoxFuture<'_, StoreResult<Vec<Job>>> {
        let owner = owner.to_owned();
        parsed(self.run(move |conn| {
            let heads: Vec<i64> = conn
                .prepare_cached("SELECT job_id FROM queue_heads WHERE due_at <= ?1 ORDER BY due_at LIMIT ?2")?
                .query_map(params![now, limit as i64], |row| row.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            let mut load = conn.prepare_cached(&format!(
                "SELECT {JOB_COLUMNS}, c.last_effective_at, COALESCE(c.introduced, 0) FROM jobs j \
                 LEFT JOIN contacts c ON c.direction = j.direction AND c.contact = j.contact \
                 WHERE j.id = ?1 AND j.state = 'queued'"
            ))?;
            let mut lease = conn.prepare_cached("UPDATE jobs SET lease_owner = ?1, lease_until = ?2 WHERE id = ?3")?;
            let mut hold =
                conn.prepare_cached("UPDATE queue_heads SET due_at = ?1 WHERE direction = ?2 AND contact = ?3")?;
            let mut jobs = Vec::with_capacity(heads.len());
            for id in heads {
                let job = load
                    .query_row([id], |row| {
                        let mut job = job_from_row(row, now)?;
                        job.contact_last_effective_at = row.get(13)?;
                        job.contact_introduced = row.get::<_, i64>(14)? != 0;
                        Ok(job)
                    })
                    .optional()?;
                let Some(mut job) = job else {
                    // A head that is no longer queued: put the queue right and move on.
                    if let Some((direction, contact)) = queue_of(conn, id)? {
                        refresh_head(conn, &direction, &contact)?;
                    }
                    continue;
                };
                lease.execute(params![owner, lease_until, job.id])?;
                hold.execute(params![lease_until, job.direction, job.contact])?;
                job.in_flight = true;
                jobs.push(job);
            }
            Ok(jobs)
        }))
    }

    fn renew(&self, owner: &str, ids: Vec<i64>, lease_until: i64) -> BoxFuture<'_, StoreResult<()>> {
        let owner = owner.to_owned();
        self.run(move |conn| {
            let mut renew = conn.prepare_cached(
                "UPDATE jobs SET lease_until = ?1 WHERE id = ?2 AND lease_owner = ?3 RETURNING direction, contact",
            )?;
            for id in ids {
                let renewed: Option<(String, String)> = renew
                    .query_row(params![lease_until, id, owner], |row| Ok((row.get(0)?, row.get(1)?)))
                    .optional()?;
                if let Some((direction, contact)) = renewed {
                    refresh_head(conn, &direction, &contact)?;
                }
            }
            Ok(())
        })
    }

    fn release(&self, owner: &str) -> BoxFuture<'_, StoreResult<u64>> {
        let owner = owner.to_owned();
        self.run(move |conn| Ok(clear_leases(conn, Some(&owner))?))
    }

    fn before_send(&self, send: BeforeSend) -> BoxFuture<'_, StoreResult<()>> {
        // The one writer thread runs operations in order: anything stored after this call,
        // such as the echo of this very send, sees the record even before it is committed.
        let queued = self.submit(move |conn| {
            conn.prepare_cached(
                "INSERT INTO contacts (direction, contact, last_effective_at) VALUES ('outbound', ?1, ?2) \
                 ON CONFLICT (direction, contact) DO UPDATE SET last_effective_at = \
                 MAX(COALESCE(last_effective_at, 0), excluded.last_effective_at)",
            )?
            .execute(params![send.contact, send.effective_at])?;
            if let Some(fingerprint) = &send.echo_fingerprint {
                conn.prepare_cached("INSERT INTO echo_marks (contact, fingerprint, expires_at) VALUES (?1, ?2, ?3)")?
                    .execute(params![send.contact, fingerprint, send.echo_expires_at])?;
            }
            Ok(())
        });
        Box::pin(std::future::ready(queued))
    }

    fn record_progress(&self, id: i64, progress: u32, now: i64) -> BoxFuture<'_, StoreResult<()>> {
        self.run(move |conn| {
            conn.prepare_cached("UPDATE jobs SET progress = ?1, updated_at = ?2 WHERE id = ?3")?
                .execute(params![progress, now, id])?;
            Ok(())
        })
    }

    fn finish(&self, owner: &str, id: i64, finish: Finish, now: i64) -> BoxFuture<'_, StoreResult<()>> {
        let owner = owner.to_owned();
        self.run(move |conn| {
            let (state, progress, next_attempt_at, error) = match &finish {
                Finish::Delivered { progress } => (JobState::Delivered, *progress, None, None),
                Finish::Retry { progress, next_attempt_at, error } => {
                    (JobState::Queued, *progress, Some(*next_attempt_at), Some(error.as_str()))
                }
                Finish::Dead { progress, error, .. } => (JobState::Dead, *progress, None, Some(error.as_str())),
                Finish::Rejected { progress, error } => (JobState::Rejected, *progress, None, Some(error.as_str())),
            };
            let finished: Option<(String, String, String)> = conn
                .prepare_cached(
                    "UPDATE jobs SET state = ?1, progress = ?2, attempts = attempts + 1, \
                     next_attempt_at = COALESCE(?3, next_attempt_at), last_error = ?4, \
                     accepted_at = CASE WHEN ?1 = 'delivered' AND direction = 'outbound' THEN ?5 ELSE accepted_at END, \
                     lease_owner = NULL, lease_until = NULL, updated_at = ?5 \
                     WHERE id = ?6 AND lease_owner = ?7 RETURNING direction, contact, m_id",
                )?
                .query_row(params![state.as_str(), progress, next_attempt_at, error, now, id, owner], |row| {
                    Ok((row.get(0)?, row.get(1)?, row.get(2)?))
                })
                .optional()?;
            let Some((direction, contact, m_id)) = finished else {
                return Err(StoreError::Conflict(format!("job {id} is no longer leased to this worker")));
            };
            refresh_head(conn, &direction, &contact)?;
            if let Finish::Dead { error, failed_receipt: true, .. } = &finish {
                queue_failed_receipt(conn, &contact, &m_id, error, now)?;
            }
            Ok(())
        })
    }

    fn mark_introduced(&self, contact: &str) -> BoxFuture<'_, StoreResult<()>> {
        let contact = contact.to_owned();
        self.run(move |conn| {
            conn.prepare_cached(
                "INSERT INTO contacts (direction, contact, introduced) VALUES ('inbound', ?1, 1) \
                 ON CONFLICT (direction, contact) DO UPDATE SET introduced = 1",
            )?
            .execute([contact])?;
            Ok(())
        })
    }

    fn queue_failed_receipt(
        &self,
        contact: &str,
        m_id: &str,
        reason: &str,
        now: i64,
    ) -> BoxFuture<'_, StoreResult<()>> {
        let (contact, m_id, reason) = (contact.to_owned(), m_id.to_owned(), reason.to_owned());
        self.run(move |conn| Ok(queue_failed_receipt(conn, &contact, &m_id, &reason, now)?))
    }

    fn list(&self, state: Option<JobState>, limit: usize) -> BoxFuture<'_, StoreResult<Vec<Job>>> {
        parsed(self.run(move |conn| {
            let now = super::now_millis();
            let state = state.map(JobState::as_str);
            let jobs = conn
                .prepare_cached(&format!(
                    "SELECT {JOB_COLUMNS} FROM jobs j WHERE ?1 IS NULL OR j.state = ?1 ORDER BY j.id DESC LIMIT ?2"
                ))?
                .query_map(params![state, limit as i64], |row| job_from_row(row, now))?
                .collect::<rusqlite::Result<_>>()?;
            Ok(jobs)
        }))
    }

    fn retry(&self, id: i64, now: i64) -> BoxFuture<'_, StoreResult<Job>> {
        let retried = self.run(move |conn| {
            let state: Option<String> =
                conn.query_row("SELECT state FROM jobs WHERE id = ?1", [id], |row| row.get(0)).optional()?;
            match state.as_deref() {
                None => return Err(StoreError::NotFound(id)),
                Some("delivered") => return Err(StoreError::Conflict(format!("job {id} was already delivered"))),
                Some(_) => {}
            }
            // A job in flight keeps its lease: retrying it only makes it due again afterwards.
            conn.execute(
                "UPDATE jobs SET state = 'queued', attempts = 0, next_attempt_at = ?1, updated_at = ?1 WHERE id = ?2",
                params![now, id],
            )?;
            if let Some((direction, contact)) = queue_of(conn, id)? {
                refresh_head(conn, &direction, &contact)?;
            }
            Ok(conn.query_row(&format!("SELECT {JOB_COLUMNS} FROM jobs j WHERE j.id = ?1"), [id], |row| {
                job_from_row(row, now)
            })?)
        });
        Box::pin(async move { retried.await?.into_job() })
    }

    fn redrive_dead(&self, now: i64) -> BoxFuture<'_, StoreResult<u64>> {
        self.run(move |conn| {
            let redriven = conn.execute(
                "UPDATE jobs SET state = 'queued', attempts = 0, next_attempt_at = ?1, updated_at = ?1 WHERE state = 'dead'",
                [now],
            )?;
            rebuild_heads(conn)?;
            Ok(redriven as u64)
        })
    }

    fn prune(&self, before: i64, now: i64) -> BoxFuture<'_, StoreResult<u64>> {
        self.run(move |conn| {
            let jobs = conn.execute(
                "DELETE FROM jobs WHERE state IN ('delivered', 'rejected', 'dropped') AND updated_at < ?1",
                [before],
            )?;
            conn.execute("DELETE FROM echo_marks WHERE expires_at <= ?1", [now])?;
            Ok(jobs as u64)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::joinchat::{Message, Recipient};

    #[tokio::test]
    async fn concurrent_writes_share_commits() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(&dir.path().join("relay.db")).await.unwrap());
        let before = store.commits();

        let writes: Vec<_> = (0..200)
            .map(|i| {
                let store = Arc::clone(&store);
                tokio::spawn(async move {
                    let job = crate::store::NewOutbound {
                        m_id: format!("m{i}"),
                        contact: format!("c{i}"),
                        recipient: Recipient::Id(format!("c{i}")),
                        parts: vec![Message::Text { text: "hi".into() }],
                        now: 1,
                    };
                    store.enqueue_outbound(job).await.unwrap();
                })
            })
            .collect();
        for write in writes {
            write.await.unwrap();
        }

        let commits = store.commits() - before;
        assert!(commits < 100, "200 concurrent writes took {commits} commits");
    }

    #[tokio::test]
    async fn a_failing_operation_does_not_undo_the_others_in_its_batch() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("relay.db")).await.unwrap();

        let (good, bad) = tokio::join!(
            store.run(|conn| Ok(conn.execute("CREATE TABLE kept (x INTEGER)", [])?)),
            store.run(|conn| {
                conn.execute("CREATE TABLE undone (x INTEGER)", [])?;
                Err::<(), _>(StoreError::Conflict("refused".into()))
            }),
        );

        assert!(good.is_ok());
        assert!(bad.is_err());
        let tables: Vec<String> = store
            .run(|conn| {
                Ok(conn
                    .prepare("SELECT name FROM sqlite_master WHERE name IN ('kept', 'undone')")?
                    .query_map([], |row| row.get(0))?
                    .collect::<rusqlite::Result<_>>()?)
            })
            .await
            .unwrap();
        assert_eq!(tables, ["kept"]);
    }
}
