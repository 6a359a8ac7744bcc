//! The storage operations the rules of the queue run on (`rules::Tx`), and how jobs are read:
//! rows of the `jobs` table, with what only the writer's memory knows (leases, horizons) laid
//! over them.

use std::sync::Arc;

use rusqlite::{Connection, OptionalExtension, Row, params};

use super::memory::{Held, Horizon, QueueRef, Queues, Undo, Waiting, mark_digest};
use super::writer::Ctx;
use crate::domain::bonychat::StatusValue;
use crate::store::rules::{Inserted, NewRow, Settle, Settled, Tx, status_name};
use crate::store::{Direction, FirstClaim, Job, JobState, Lease, StoreError, StoreResult, decode_payload};

pub(super) const JOB_COLUMNS: &str = "j.id, j.direction, j.contact, j.m_id, j.state, j.attempts, j.progress, \
    j.next_attempt_at, j.last_error, j.created_at, j.updated_at, j.payload, j.channel, j.trace_context";

/// A job as read: its payload is still JSON, parsed off the writer thread by `into_job`.
pub(super) struct RawJob {
    pub id: i64,
    pub channel: String,
    direction: String,
    pub contact: String,
    pub m_id: String,
    state: String,
    attempts: u32,
    pub progress: u32,
    next_attempt_at: i64,
    last_error: Option<String>,
    created_at: i64,
    updated_at: i64,
    payload: String,
    trace_context: Option<String>,
    pub in_flight: bool,
    pub lease_until: Option<i64>,
    pub lease_token: i64,
    pub contact_last_effective_at: Option<i64>,
    pub contact_introduced: bool,
}

impl RawJob {
    pub fn from_row(row: &Row<'_>) -> rusqlite::Result<Self> {
        Ok(Self {
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
            payload: row.get(11)?,
            channel: row.get(12)?,
            trace_context: row.get(13)?,
            in_flight: false,
            lease_until: None,
            lease_token: 0,
            contact_last_effective_at: None,
            contact_introduced: false,
        })
    }

    /// Lays the job's lease, as the writer's memory has it, over the row.
    pub fn with_lease(mut self, held: Option<&Held>, now: i64) -> Self {
        if let Some(held) = held {
            self.in_flight = held.until > now;
            self.lease_until = Some(held.until);
            self.lease_token = held.token;
        }
        self
    }

    pub fn into_job(self) -> StoreResult<Job> {
        let corrupt = |what: &str| StoreError::Unavailable(format!("job {} has an unreadable {what}", self.id));
        Ok(Job {
            id: self.id,
            direction: Direction::parse(&self.direction).ok_or_else(|| corrupt("direction"))?,
            state: JobState::parse(&self.state).ok_or_else(|| corrupt("state"))?,
            payload: decode_payload(&self.payload),
            channel: self.channel,
            contact: self.contact,
            m_id: self.m_id,
            attempts: self.attempts,
            progress: self.progress,
            next_attempt_at: self.next_attempt_at,
            last_error: self.last_error,
            created_at: self.created_at,
            updated_at: self.updated_at,
            in_flight: self.in_flight,
            lease_until: self.lease_until,
            lease_token: self.lease_token,
            contact_last_effective_at: self.contact_last_effective_at,
            contact_introduced: self.contact_introduced,
            trace_context: self.trace_context,
        })
    }
}

/// Job `id` as stored, if it exists.
pub(super) fn read_job(conn: &Connection, id: i64) -> rusqlite::Result<Option<RawJob>> {
    conn.prepare_cached(&format!("SELECT {JOB_COLUMNS} FROM jobs j WHERE j.id = ?1"))?
        .query_row([id], RawJob::from_row)
        .optional()
}

/// The queue job `id` is in, if it is queued.
pub(super) fn queue_of(conn: &Connection, queues: &Queues, id: i64) -> rusqlite::Result<Option<QueueRef>> {
    let queued: Option<(String, String, String)> = conn
        .prepare_cached("SELECT channel, direction, contact FROM jobs WHERE id = ?1 AND state = 'queued'")?
        .query_row([id], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))
        .optional()?;
    Ok(queued.and_then(|(channel, direction, contact)| {
        Some(queues.queue_ref(&channel, Direction::parse(&direction)?, &contact))
    }))
}

/// Whether BonyChat already got a post about `contact` of `channel`.
pub(super) fn introduced(conn: &Connection, channel: &str, contact: &str) -> rusqlite::Result<bool> {
    conn.prepare_cached(
        "SELECT 1 FROM contacts WHERE contact = ?1 AND channel = ?2 AND direction = 'inbound' AND introduced = 1",
    )?
    .exists([contact, channel])
}

/// Leases the claimable job `id` of `queue` to `owner` until `until`: the job as its attempt
/// needs it, or `None` when its row is gone (the memory then forgets it).
pub(super) fn lease_job(
    ctx: &mut Ctx<'_>,
    queue: &QueueRef,
    id: i64,
    owner: &Arc<str>,
    until: i64,
    now: i64,
) -> rusqlite::Result<Option<RawJob>> {
    let Some(mut job) = read_job(ctx.conn, id)? else {
        ctx.queues().unqueue(queue, id, ctx.journal);
        return Ok(None);
    };
    job.lease_token = ctx.queues().lease(queue, id, &job.m_id, owner, until, ctx.journal);
    job.in_flight = until > now;
    job.lease_until = Some(until);
    match queue.direction {
        Direction::Outbound => {
            job.contact_last_effective_at =
                ctx.recent().horizon(&queue.channel, &queue.contact).map(|horizon| horizon.effective_at);
        }
        Direction::Inbound => job.contact_introduced = introduced(ctx.conn, &queue.channel, &queue.contact)?,
    }
    Ok(Some(job))
}

/// The rules' storage operations on SQLite: one statement where the rule writes, memory where
/// it counts or looks up what the writer holds.
pub(super) struct SqliteTx<'a, 'c> {
    pub ctx: &'a mut Ctx<'c>,
    /// The owner names leases are given to, shared rather than copied per lease.
    pub owner: Option<Arc<str>>,
}

impl Tx for SqliteTx<'_, '_> {
    async fn lock_queues(&mut self, _channel: &str, _direction: Direction, _contacts: &[&str]) -> StoreResult<()> {
        // One writer thread runs every operation in turn: nothing to hold.
        Ok(())
    }

    async fn queued(&mut self, channel: &str, direction: Direction, _cap: u64) -> StoreResult<u64> {
        Ok(self.ctx.queues().queued(channel, direction))
    }

    async fn queued_for(&mut self, channel: &str, direction: Direction, contact: &str, _cap: u64) -> StoreResult<u64> {
        let queue = self.ctx.queues().queue_ref(channel, direction, contact);
        Ok(self.ctx.queues().queued_for(&queue))
    }

    async fn insert_job(
        &mut self,
        row: &NewRow<'_>,
        now: i64,
        first: Option<&FirstClaim>,
    ) -> StoreResult<Option<Inserted>> {
        let queue = self.ctx.queues().queue_ref(row.channel, row.direction, row.contact);
        let queued = row.state == JobState::Queued;
        let head = queued && self.ctx.queues().is_empty(&queue);
        if queued && !head {
            // A job behind others may take its contact past its cap, refused after the insert.
            self.ctx.take_care();
        }
        self.ctx.before_write()?;
        let inserted = self
            .ctx
            .conn
            .prepare_cached(
                "INSERT INTO jobs (direction, contact, m_id, dedup_key, payload, state, next_attempt_at, created_at, \
                 updated_at, channel, trace_context) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7, ?7, ?8, ?9) \
                 ON CONFLICT (channel, dedup_key) WHERE dedup_key IS NOT NULL DO NOTHING",
            )?
            .execute(params![
                row.direction.as_str(),
                row.contact,
                row.m_id,
                row.dedup_key,
                row.payload,
                row.state.as_str(),
                now,
                row.channel,
                row.trace_context,
            ])?;
        if inserted == 0 {
            return Ok(None);
        }
        let id = self.ctx.conn.last_insert_rowid();
        let mut lease_token = None;
        if queued {
            let reserved_until = first.map_or(0, |first| first.reserved_until);
            self.ctx.queues().queue(&queue, id, Waiting { next_attempt_at: now, reserved_until }, self.ctx.journal);
            if let Some(first) = first.filter(|_| head) {
                let owner = self.owner.get_or_insert_with(|| Arc::from(first.owner.as_str()));
                lease_token =
                    Some(self.ctx.queues().lease(&queue, id, row.m_id, owner, first.lease_until, self.ctx.journal));
            }
        }
        Ok(Some(Inserted { id, head, lease_token }))
    }

    async fn last_effective_at(&mut self, channel: &str, contact: &str) -> StoreResult<Option<i64>> {
        Ok(self.ctx.recent().horizon(channel, contact).map(|horizon| horizon.effective_at))
    }

    async fn any_stored(&mut self, channel: &str, dedup_keys: &[String]) -> StoreResult<bool> {
        let mut seen = self.ctx.conn.prepare_cached("SELECT 1 FROM jobs WHERE channel = ?1 AND dedup_key = ?2")?;
        for key in dedup_keys {
            if seen.exists([channel, key])? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    async fn take_echo_mark(&mut self, channel: &str, contact: &str, fingerprint: &str, now: i64) -> StoreResult<bool> {
        let digest = mark_digest(channel, contact, fingerprint);
        let taken = self.ctx.recent().take_mark(digest, now);
        if taken {
            self.ctx.journal.push(Undo::RestoreMark(digest));
        }
        Ok(taken)
    }

    async fn unreported(
        &mut self,
        channel: &str,
        contact: &str,
        watermark: i64,
        status: StatusValue,
    ) -> StoreResult<Vec<(i64, String)>> {
        let unreported = match status {
            StatusValue::Read => "read_reported = 0",
            _ => "delivered_reported = 0",
        };
        Ok(self
            .ctx
            .conn
            .prepare_cached(&format!(
                "SELECT id, m_id FROM jobs WHERE contact = ?1 AND accepted_at IS NOT NULL AND accepted_at <= ?2 \
                 AND channel = ?3 AND direction = 'outbound' AND state = 'delivered' AND {unreported} ORDER BY id"
            ))?
            .query_map(params![contact, watermark, channel], |row| Ok((row.get(0)?, row.get(1)?)))?
            .collect::<rusqlite::Result<_>>()?)
    }

    async fn mark_reported(&mut self, id: i64, status: StatusValue) -> StoreResult<()> {
        let mark = match status {
            StatusValue::Read => "read_reported = 1, delivered_reported = 1",
            _ => "delivered_reported = 1",
        };
        self.ctx.before_write()?;
        self.ctx.conn.prepare_cached(&format!("UPDATE jobs SET {mark} WHERE id = ?1"))?.execute([id])?;
        Ok(())
    }

    async fn raise_watermark(
        &mut self,
        channel: &str,
        contact: &str,
        status: StatusValue,
        watermark: i64,
        timestamp: i64,
        now: i64,
    ) -> StoreResult<()> {
        self.ctx.before_write()?;
        self.ctx
            .conn
            .prepare_cached(
                "INSERT INTO watermarks (channel, contact, status, watermark, timestamp, updated_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6) \
                 ON CONFLICT (channel, contact, status) DO UPDATE SET watermark = excluded.watermark, \
                 timestamp = excluded.timestamp, updated_at = excluded.updated_at \
                 WHERE excluded.watermark > watermarks.watermark",
            )?
            .execute(params![channel, contact, status_name(status), watermark, timestamp, now])?;
        Ok(())
    }

    async fn watermarks(&mut self, channel: &str, contact: &str) -> StoreResult<Vec<(String, i64, i64)>> {
        Ok(self
            .ctx
            .conn
            .prepare_cached("SELECT status, watermark, timestamp FROM watermarks WHERE channel = ?1 AND contact = ?2")?
            .query_map([channel, contact], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?
            .collect::<rusqlite::Result<_>>()?)
    }

    async fn settle(&mut self, lease: Lease, settle: &Settle<'_>, now: i64) -> StoreResult<Option<Settled>> {
        if self.ctx.queues().lease_of(lease.id).is_none_or(|held| held.token != lease.token) {
            return Ok(None);
        }
        let Some(held) = self.ctx.queues().unlease(lease.id, self.ctx.journal) else { return Ok(None) };
        let queue = &held.queue;
        // Written with the outcome so that a crash does not lose it (see `recovery`).
        let effective_at = match queue.direction {
            Direction::Outbound => self.ctx.recent().horizon(&queue.channel, &queue.contact).map(|h| h.effective_at),
            Direction::Inbound => None,
        };
        self.ctx.before_write()?;
        self.ctx
            .conn
            .prepare_cached(
                "UPDATE jobs SET state = ?1, progress = ?2, attempts = attempts + ?3, \
                 next_attempt_at = COALESCE(?4, next_attempt_at), \
                 last_error = CASE WHEN ?3 = 0 THEN last_error ELSE ?5 END, \
                 accepted_at = CASE WHEN ?1 = 'delivered' AND direction = 'outbound' THEN COALESCE(?6, ?7) ELSE accepted_at END, \
                 effective_at = COALESCE(?8, effective_at), updated_at = ?7 \
                 WHERE id = ?9",
            )?
            .execute(params![
                settle.state.as_str(),
                settle.progress,
                settle.attempted,
                settle.next_attempt_at,
                settle.error,
                settle.sent_at,
                now,
                effective_at,
                lease.id,
            ])?;
        if settle.state == JobState::Queued {
            let waiting = self.ctx.queues().waiting(queue, lease.id);
            if let Some(waiting) = waiting {
                let next = Waiting {
                    next_attempt_at: settle.next_attempt_at.unwrap_or(waiting.next_attempt_at),
                    reserved_until: if settle.keep_reservation { waiting.reserved_until } else { 0 },
                };
                self.ctx.queues().set_waiting(queue, lease.id, next, self.ctx.journal);
            }
        } else {
            self.ctx.queues().unqueue(queue, lease.id, self.ctx.journal);
        }
        Ok(Some(Settled {
            channel: queue.channel.to_string(),
            direction: queue.direction,
            contact: queue.contact.to_string(),
            m_id: held.m_id.into(),
            queued: !self.ctx.queues().is_empty(queue),
            receipt: false,
        }))
    }

    async fn message_trace_context(&mut self, channel: &str, m_id: &str) -> StoreResult<Option<String>> {
        let trace_context: Option<Option<String>> = self
            .ctx
            .conn
            .prepare_cached(
                "SELECT trace_context FROM jobs WHERE m_id = ?1 AND channel = ?2 AND direction = 'outbound' LIMIT 1",
            )?
            .query_row([m_id, channel], |row| row.get(0))
            .optional()?;
        Ok(trace_context.flatten())
    }

    async fn state_of(&mut self, id: i64) -> StoreResult<Option<JobState>> {
        let state: Option<String> = self
            .ctx
            .conn
            .prepare_cached("SELECT state FROM jobs WHERE id = ?1")?
            .query_row([id], |row| row.get(0))
            .optional()?;
        state
            .map(|state| {
                JobState::parse(&state).ok_or_else(|| StoreError::Unavailable(format!("job {id} has state {state}")))
            })
            .transpose()
    }

    async fn requeue(&mut self, id: i64, now: i64) -> StoreResult<()> {
        self.ctx.before_write()?;
        let queue: Option<(String, String, String)> = self
            .ctx
            .conn
            .prepare_cached(
                "UPDATE jobs SET state = 'queued', attempts = 0, next_attempt_at = ?1, updated_at = ?1 WHERE id = ?2 \
                 RETURNING channel, direction, contact",
            )?
            .query_row(params![now, id], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))
            .optional()?;
        let Some((channel, direction, contact)) = queue else { return Ok(()) };
        let Some(direction) = Direction::parse(&direction) else { return Ok(()) };
        let queue = self.ctx.queues().queue_ref(&channel, direction, &contact);
        let waiting = self.ctx.queues().waiting(&queue, id);
        match waiting {
            // In flight, it keeps its lease: due again once that ends.
            Some(waiting) => {
                let next = Waiting { next_attempt_at: now, ..waiting };
                self.ctx.queues().set_waiting(&queue, id, next, self.ctx.journal);
            }
            None => {
                let waiting = Waiting { next_attempt_at: now, reserved_until: 0 };
                self.ctx.queues().queue(&queue, id, waiting, self.ctx.journal);
            }
        }
        Ok(())
    }

    async fn load(&mut self, id: i64, now: i64) -> StoreResult<Job> {
        let job = read_job(self.ctx.conn, id)?.ok_or(StoreError::NotFound(id))?;
        job.with_lease(self.ctx.queues().lease_of(id), now).into_job()
    }

    async fn raise_last_effective(&mut self, channel: &str, contact: &str, at: i64) -> StoreResult<()> {
        // Not used by this backend's sends (they record in memory at once); kept for the rules.
        self.ctx.recent().raise_horizon(channel, contact, Horizon { effective_at: at, forget_at: at });
        Ok(())
    }

    async fn record_attempt(
        &mut self,
        id: i64,
        at: i64,
        outcome: &str,
        status: Option<u16>,
        error: &str,
    ) -> StoreResult<()> {
        self.ctx.before_write()?;
        let conn = self.ctx.conn;
        let attempt: u32 = conn
            .prepare_cached(
                "INSERT INTO attempts (job_id, attempt, at, outcome, status, error) \
                 SELECT id, attempts, ?2, ?3, ?4, ?5 FROM jobs WHERE id = ?1 RETURNING attempt",
            )?
            .query_row(params![id, at, outcome, status, error], |row| row.get(0))?;
        if attempt as usize > crate::store::ATTEMPTS_KEPT {
            conn.prepare_cached(
                "DELETE FROM attempts WHERE job_id = ?1 AND id < (SELECT id FROM attempts WHERE job_id = ?1 \
                 ORDER BY id DESC LIMIT 1 OFFSET ?2)",
            )?
            .execute(params![id, crate::store::ATTEMPTS_KEPT as i64 - 1])?;
        }
        Ok(())
    }

    async fn mark_introduced(&mut self, channel: &str, contact: &str) -> StoreResult<()> {
        self.ctx.before_write()?;
        self.ctx
            .conn
            .prepare_cached(
                "INSERT INTO contacts (channel, direction, contact, introduced) VALUES (?1, 'inbound', ?2, 1) \
                 ON CONFLICT (contact, channel, direction) DO UPDATE SET introduced = 1",
            )?
            .execute([channel, contact])?;
        Ok(())
    }

    async fn add_echo_mark(
        &mut self,
        channel: &str,
        contact: &str,
        fingerprint: &str,
        expires_at: i64,
    ) -> StoreResult<()> {
        self.ctx.recent().add_mark(mark_digest(channel, contact, fingerprint), expires_at);
        Ok(())
    }
}
