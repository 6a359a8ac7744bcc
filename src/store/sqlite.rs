//! The embedded store: one SQLite file in WAL mode with `synchronous=FULL`, so a commit is on
//! disk (fsync'd) before anyone is told it happened.
//!
//! One writer thread owns the connection. Every operation is a closure sent to it; the thread
//! runs all operations waiting at that moment in one transaction, each in its own savepoint
//! (so one failing operation does not undo the others), commits once, and only then answers
//! them all. Concurrent requests thus share one fsync: group commit. No operation waits on
//! anything but the database, so no transaction is ever held across an HTTP call.

use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, Row, TransactionBehavior, params};
use tokio::sync::{mpsc, oneshot};

use super::{
    BeforeSend, Direction, Finish, InboundBatch, InboundItem, InboundSummary, Job, JobState,
    NewOutbound, Payload, Store, StoreError, StoreResult,
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
}

impl SqliteStore {
    /// Opens (creating the file and its directory) and migrates the database at `path`.
    pub async fn open(path: &Path) -> StoreResult<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| {
                StoreError::Unavailable(format!("cannot create {}: {e}", dir.display()))
            })?;
        }
        let path = path.to_owned();
        let (ready_tx, ready_rx) = oneshot::channel();
        let (ops, ops_rx) = mpsc::unbounded_channel();
        std::thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || match open_connection(&path) {
                Ok(conn) => {
                    let _ = ready_tx.send(Ok(()));
                    write_loop(conn, ops_rx);
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(StoreError::Unavailable(format!(
                        "cannot open {}: {e}",
                        path.display()
                    ))));
                }
            })
            .map_err(|e| StoreError::Unavailable(format!("cannot start the store thread: {e}")))?;
        ready_rx
            .await
            .map_err(|_| StoreError::Unavailable("the store thread stopped".into()))??;
        Ok(Self { ops })
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
            rx.await
                .map_err(|_| StoreError::Unavailable("the store thread stopped".into()))?
        })
    }
}

fn open_connection(path: &Path) -> rusqlite::Result<Connection> {
    let mut conn = Connection::open(path)?;
    // Other processes (`bonychat-relay jobs …`) may write at the same time.
    conn.busy_timeout(Duration::from_secs(5))?;
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(rusqlite::Error::InvalidParameterName(format!(
            "journal_mode stayed {mode}, not WAL"
        )));
    }
    // FULL: every commit fsyncs the WAL, so it survives power loss, not just a crash.
    conn.execute_batch("PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;")?;
    migrate(&mut conn)?;
    Ok(conn)
}

fn migrate(conn: &mut Connection) -> rusqlite::Result<()> {
    let version: i64 = conn.query_row("PRAGMA user_version", [], |row| row.get(0))?;
    for (index, migration) in (0_i64..)
        .zip(MIGRATIONS)
        .skip(usize::try_from(version).unwrap_or(0))
    {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute_batch(migration)?;
        tx.pragma_update(None, "user_version", index + 1)?;
        tx.commit()?;
    }
    Ok(())
}

fn write_loop(mut conn: Connection, mut ops: mpsc::UnboundedReceiver<Op>) {
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
        if let Err(e) = &committed {
            tracing::error!(error = %e, "store commit failed");
        }
        for answer in answers {
            answer(committed.clone());
        }
    }
}

fn run_batch(
    conn: &mut Connection,
    batch: Vec<Op>,
    answers: &mut Vec<Answer>,
) -> rusqlite::Result<()> {
    let mut tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    for op in batch {
        let savepoint = tx.savepoint()?;
        let (ok, answer) = op(&savepoint);
        answers.push(answer);
        if ok {
            savepoint.commit()?;
        }
        // A failed operation's savepoint rolls back when dropped.
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

fn job_from_row(row: &Row<'_>, now: i64) -> rusqlite::Result<Job> {
    let text_column = |index: usize, value: String| {
        rusqlite::Error::FromSqlConversionFailure(
            index,
            rusqlite::types::Type::Text,
            format!("unexpected value {value}").into(),
        )
    };
    let direction: String = row.get(1)?;
    let state: String = row.get(4)?;
    let lease_until: Option<i64> = row.get(11)?;
    let payload: String = row.get(12)?;
    Ok(Job {
        id: row.get(0)?,
        direction: Direction::parse(&direction).ok_or_else(|| text_column(1, direction.clone()))?,
        contact: row.get(2)?,
        m_id: row.get(3)?,
        state: JobState::parse(&state).ok_or_else(|| text_column(4, state.clone()))?,
        attempts: row.get(5)?,
        progress: row.get(6)?,
        next_attempt_at: row.get(7)?,
        last_error: row.get(8)?,
        created_at: row.get(9)?,
        updated_at: row.get(10)?,
        in_flight: lease_until.is_some_and(|until| until > now),
        payload: serde_json::from_str(&payload).map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(12, rusqlite::types::Type::Text, Box::new(e))
        })?,
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
    payload: Payload,
    state: JobState,
}

impl<'a> NewRow<'a> {
    /// An inbound event, deduplicated on its `mId`.
    fn event(contact: &'a str, event: &'a WebhookEvent, state: JobState) -> Self {
        Self {
            direction: Direction::Inbound,
            contact,
            m_id: event.m_id(),
            dedup_key: Some(event_key(event.m_id())),
            payload: Payload::Event {
                event: event.clone(),
            },
            state,
        }
    }
}

/// Inserts `row` unless its dedup key is taken; says whether it did.
fn insert_job(conn: &Connection, row: NewRow<'_>, now: i64) -> rusqlite::Result<bool> {
    let inserted = conn
        .prepare_cached(
            "INSERT INTO jobs (direction, contact, m_id, dedup_key, payload, state, next_attempt_at, created_at, updated_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7, ?7) ON CONFLICT (dedup_key) DO NOTHING",
        )?
        .execute(params![
            row.direction.as_str(),
            row.contact,
            row.m_id,
            row.dedup_key,
            to_json(&row.payload),
            row.state.as_str(),
            now
        ])?;
    Ok(inserted == 1)
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
    let row = NewRow {
        direction: Direction::Inbound,
        contact,
        m_id,
        dedup_key: Some(receipt_key(status.value, m_id)),
        payload: Payload::Event {
            event: WebhookEvent::MessageStatus {
                m_id: m_id.to_owned(),
                timestamp,
                status,
            },
        },
        state: JobState::Queued,
    };
    insert_job(conn, row, now)
}

/// Queues the `failed` receipt of outbound job `id`.
fn queue_failed_receipt(
    conn: &Connection,
    id: i64,
    reason: &str,
    now: i64,
) -> rusqlite::Result<()> {
    let (contact, m_id): (String, String) = conn.query_row(
        "SELECT contact, m_id FROM jobs WHERE id = ?1",
        [id],
        |row| Ok((row.get(0)?, row.get(1)?)),
    )?;
    let status = Status {
        value: StatusValue::Failed,
        message: Some(reason.to_owned()),
    };
    queue_receipt(conn, &contact, &m_id, status, now, now)?;
    Ok(())
}

fn store_message(
    conn: &Connection,
    contact: &str,
    events: &[WebhookEvent],
    echo_fingerprint: Option<&str>,
    now: i64,
    summary: &mut InboundSummary,
) -> rusqlite::Result<()> {
    let mut seen = conn.prepare_cached("SELECT 1 FROM jobs WHERE dedup_key = ?1")?;
    let mut any_seen = false;
    for event in events {
        any_seen |= seen.exists([event_key(event.m_id())])?;
    }
    if let Some(fingerprint) = echo_fingerprint
        && !any_seen
    {
        let mark: Option<i64> = conn
            .prepare_cached(
                "SELECT id FROM echo_marks WHERE contact = ?1 AND fingerprint = ?2 AND expires_at > ?3 ORDER BY id LIMIT 1",
            )?
            .query_row(params![contact, fingerprint, now], |row| row.get(0))
            .optional()?;
        if let Some(mark) = mark {
            conn.prepare_cached("DELETE FROM echo_marks WHERE id = ?1")?
                .execute([mark])?;
            for event in events {
                insert_job(conn, NewRow::event(contact, event, JobState::Dropped), now)?;
            }
            summary.own_echoes += 1;
            return Ok(());
        }
    }
    for event in events {
        if insert_job(conn, NewRow::event(contact, event, JobState::Queued), now)? {
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
        StatusValue::Read => (
            "read_reported = 0",
            "read_reported = 1, delivered_reported = 1",
        ),
        _ => ("delivered_reported = 0", "delivered_reported = 1"),
    };
    let covered: Vec<(i64, String)> = conn
        .prepare_cached(&format!(
            "SELECT id, m_id FROM jobs WHERE direction = 'outbound' AND contact = ?1 AND state = 'delivered' \
             AND accepted_at IS NOT NULL AND accepted_at <= ?2 AND {unreported} ORDER BY id"
        ))?
        .query_map(params![contact, watermark], |row| Ok((row.get(0)?, row.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    let mut flag = conn.prepare_cached(&format!("UPDATE jobs SET {mark} WHERE id = ?1"))?;
    for (id, m_id) in covered {
        flag.execute([id])?;
        if queue_receipt(
            conn,
            contact,
            &m_id,
            Status {
                value: status,
                message: None,
            },
            timestamp,
            now,
        )? {
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
        self.run(|conn| {
            Ok(conn.execute("UPDATE jobs SET lease_owner = NULL, lease_until = NULL WHERE lease_owner IS NOT NULL", [])? as u64)
        })
    }

    fn enqueue_outbound(&self, job: NewOutbound) -> BoxFuture<'_, StoreResult<i64>> {
        self.run(move |conn| {
            let row = NewRow {
                direction: Direction::Outbound,
                contact: &job.contact,
                m_id: &job.m_id,
                dedup_key: None,
                payload: Payload::Send {
                    recipient: job.recipient,
                    parts: job.parts,
                },
                state: JobState::Queued,
            };
            insert_job(conn, row, job.now)?;
            Ok(conn.last_insert_rowid())
        })
    }

    fn enqueue_inbound(&self, batch: InboundBatch) -> BoxFuture<'_, StoreResult<InboundSummary>> {
        self.run(move |conn| {
            let mut summary = InboundSummary::default();
            for item in &batch.items {
                match item {
                    InboundItem::Message {
                        contact,
                        events,
                        echo_fingerprint,
                    } => {
                        store_message(
                            conn,
                            contact,
                            events,
                            echo_fingerprint.as_deref(),
                            batch.now,
                            &mut summary,
                        )?;
                    }
                    InboundItem::Watermark {
                        contact,
                        status,
                        watermark,
                        timestamp,
                    } => {
                        store_watermark(
                            conn,
                            contact,
                            *status,
                            *watermark,
                            *timestamp,
                            batch.now,
                            &mut summary,
                        )?;
                    }
                }
            }
            Ok(summary)
        })
    }

    fn claim(
        &self,
        owner: &str,
        now: i64,
        lease_until: i64,
        limit: usize,
    ) -> BoxFuture<'_, StoreResult<Vec<Job>>> {
        let owner = owner.to_owned();
        self.run(move |conn| {
            let mut jobs = conn
                .prepare_cached(&format!(
                    "SELECT {JOB_COLUMNS}, c.last_effective_at, COALESCE(c.introduced, 0) FROM jobs j \
                     JOIN (SELECT MIN(id) AS id FROM jobs WHERE state = 'queued' GROUP BY direction, contact) head ON head.id = j.id \
                     LEFT JOIN contacts c ON c.direction = j.direction AND c.contact = j.contact \
                     WHERE j.next_attempt_at <= ?1 AND (j.lease_until IS NULL OR j.lease_until <= ?1) \
                     ORDER BY j.next_attempt_at, j.id LIMIT ?2"
                ))?
                .query_map(params![now, limit as i64], |row| {
                    let mut job = job_from_row(row, now)?;
                    job.contact_last_effective_at = row.get(13)?;
                    job.contact_introduced = row.get::<_, i64>(14)? != 0;
                    Ok(job)
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            let mut lease = conn.prepare_cached("UPDATE jobs SET lease_owner = ?1, lease_until = ?2 WHERE id = ?3")?;
            for job in &mut jobs {
                lease.execute(params![owner, lease_until, job.id])?;
                job.in_flight = true;
            }
            Ok(jobs)
        })
    }

    fn renew(
        &self,
        owner: &str,
        ids: Vec<i64>,
        lease_until: i64,
    ) -> BoxFuture<'_, StoreResult<()>> {
        let owner = owner.to_owned();
        self.run(move |conn| {
            let mut renew = conn.prepare_cached(
                "UPDATE jobs SET lease_until = ?1 WHERE id = ?2 AND lease_owner = ?3",
            )?;
            for id in ids {
                renew.execute(params![lease_until, id, owner])?;
            }
            Ok(())
        })
    }

    fn release(&self, owner: &str) -> BoxFuture<'_, StoreResult<u64>> {
        let owner = owner.to_owned();
        self.run(move |conn| {
            Ok(conn.execute(
                "UPDATE jobs SET lease_owner = NULL, lease_until = NULL WHERE lease_owner = ?1",
                [owner],
            )? as u64)
        })
    }

    fn before_send(&self, send: BeforeSend) -> BoxFuture<'_, StoreResult<()>> {
        self.run(move |conn| {
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
        })
    }

    fn record_progress(&self, id: i64, progress: u32, now: i64) -> BoxFuture<'_, StoreResult<()>> {
        self.run(move |conn| {
            conn.prepare_cached("UPDATE jobs SET progress = ?1, updated_at = ?2 WHERE id = ?3")?
                .execute(params![progress, now, id])?;
            Ok(())
        })
    }

    fn finish(
        &self,
        owner: &str,
        id: i64,
        finish: Finish,
        now: i64,
    ) -> BoxFuture<'_, StoreResult<()>> {
        let owner = owner.to_owned();
        self.run(move |conn| {
            let (state, progress, next_attempt_at, error) = match &finish {
                Finish::Delivered { progress } => (JobState::Delivered, *progress, None, None),
                Finish::Retry {
                    progress,
                    next_attempt_at,
                    error,
                } => (
                    JobState::Queued,
                    *progress,
                    Some(*next_attempt_at),
                    Some(error.as_str()),
                ),
                Finish::Dead {
                    progress, error, ..
                } => (JobState::Dead, *progress, None, Some(error.as_str())),
                Finish::Rejected { progress, error } => {
                    (JobState::Rejected, *progress, None, Some(error.as_str()))
                }
            };
            let updated = conn
                .prepare_cached(
                    "UPDATE jobs SET state = ?1, progress = ?2, attempts = attempts + 1, \
                     next_attempt_at = COALESCE(?3, next_attempt_at), last_error = ?4, \
                     accepted_at = CASE WHEN ?1 = 'delivered' THEN ?5 ELSE accepted_at END, \
                     lease_owner = NULL, lease_until = NULL, updated_at = ?5 \
                     WHERE id = ?6 AND lease_owner = ?7",
                )?
                .execute(params![
                    state.as_str(),
                    progress,
                    next_attempt_at,
                    error,
                    now,
                    id,
                    owner
                ])?;
            if updated == 0 {
                return Err(StoreError::Conflict(format!(
                    "job {id} is no longer leased to this worker"
                )));
            }
            if let Finish::Dead {
                error,
                failed_receipt: true,
                ..
            } = &finish
            {
                queue_failed_receipt(conn, id, error, now)?;
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
        id: i64,
        reason: &str,
        now: i64,
    ) -> BoxFuture<'_, StoreResult<()>> {
        let reason = reason.to_owned();
        self.run(move |conn| Ok(queue_failed_receipt(conn, id, &reason, now)?))
    }

    fn list(&self, state: Option<JobState>, limit: usize) -> BoxFuture<'_, StoreResult<Vec<Job>>> {
        self.run(move |conn| {
            let now = super::now_millis();
            let state = state.map(JobState::as_str);
            let jobs = conn
                .prepare_cached(&format!(
                    "SELECT {JOB_COLUMNS} FROM jobs j WHERE ?1 IS NULL OR j.state = ?1 ORDER BY j.id DESC LIMIT ?2"
                ))?
                .query_map(params![state, limit as i64], |row| job_from_row(row, now))?
                .collect::<rusqlite::Result<_>>()?;
            Ok(jobs)
        })
    }

    fn retry(&self, id: i64, now: i64) -> BoxFuture<'_, StoreResult<Job>> {
        self.run(move |conn| {
            let state: Option<String> = conn
                .query_row("SELECT state FROM jobs WHERE id = ?1", [id], |row| row.get(0))
                .optional()?;
            match state.as_deref() {
                None => return Err(StoreError::NotFound(id)),
                Some("delivered") => return Err(StoreError::Conflict(format!("job {id} was already delivered"))),
                Some(_) => {}
            }
            conn.execute(
                "UPDATE jobs SET state = 'queued', attempts = 0, next_attempt_at = ?1, lease_owner = NULL, \
                 lease_until = NULL, updated_at = ?1 WHERE id = ?2",
                params![now, id],
            )?;
            Ok(conn.query_row(&format!("SELECT {JOB_COLUMNS} FROM jobs j WHERE j.id = ?1"), [id], |row| job_from_row(row, now))?)
        })
    }

    fn redrive_dead(&self, now: i64) -> BoxFuture<'_, StoreResult<u64>> {
        self.run(move |conn| {
            Ok(conn.execute(
                "UPDATE jobs SET state = 'queued', attempts = 0, next_attempt_at = ?1, lease_owner = NULL, \
                 lease_until = NULL, updated_at = ?1 WHERE state = 'dead'",
                [now],
            )? as u64)
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
