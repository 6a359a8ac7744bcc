//! The rules' storage operations ([`Tx`]) in Postgres's SQL: the statements, the queue locks,
//! and reading a job row.

use std::sync::LazyLock;

use sqlx::postgres::PgRow;
use sqlx::{AssertSqlSafe, PgConnection, Row};

use super::first_sends::{AheadPlan, AheadSettled, WrittenAhead};
use crate::domain::bonychat::StatusValue;
use crate::store::rules::{Inserted, NewRow, Settle, Settled, Tx, status_name};
use crate::store::{Direction, FirstClaim, Job, JobState, Lease, StoreError, StoreResult, decode_payload};

pub(super) const JOB_COLUMNS: &str = "j.id, j.channel, j.direction, j.contact, j.m_id, j.state, j.attempts, j.progress, \
    j.next_attempt_at, j.last_error, j.created_at, j.updated_at, j.lease_until, j.payload, j.lease_token, j.trace_context";
/// The common table expressions of a claim (see [`Claim`](crate::store::Claim)), ending with `leased`: the jobs it
/// leased. `$1` direction, `$2` now, `$3` limit, `$4` owner, `$5` lease end, `$6` the eligible
/// channels, `$7` the channel the last claim ended with (`Rotation`), or NULL.
///
/// `present` walks the channels that have queue rows in the direction, one seek of the primary
/// key each (a skip-scan). `turns` ranks each eligible channel's earliest due rows (`limit` at
/// most, read from `channel_queues_claim`, without locks), and `quotas` says how many of each the
/// claim takes in turns, each turn going round the channels after `$7`. `due` then locks that many due rows of each channel, skipping rows
/// other transactions hold (another replica's claim, a writer of that contact) for the next ones
/// of the same channel, so a busy channel never takes another's share. The cost follows the
/// number of channels with queued work and `limit`, never the depth of any channel's queue:
/// `due` says `LIMIT $3`, which the planner cannot tell from the per-channel quotas, so that it
/// joins `due` to `jobs` by key instead of reading a whole channel's queue for it. (Looking the
/// jobs up with `id = ANY(ARRAY(…))` instead made it combine that with `jobs_queued`, reading
/// every queued job.)
pub(super) const CLAIM_IN_TURNS: &str = "WITH RECURSIVE present (channel) AS ( \
        (SELECT channel FROM channel_queues WHERE direction = $1 ORDER BY channel LIMIT 1) \
        UNION ALL \
        SELECT (SELECT q.channel FROM channel_queues q \
                WHERE q.direction = $1 AND q.channel > p.channel ORDER BY q.channel LIMIT 1) \
        FROM present p WHERE p.channel IS NOT NULL), \
    turns AS ( \
        SELECT e.channel, row_number() OVER (PARTITION BY e.channel ORDER BY e.due_at, e.contact) AS turn \
        FROM present p CROSS JOIN LATERAL ( \
            SELECT q.channel, q.contact, q.due_at FROM channel_queues q \
            WHERE q.direction = $1 AND q.channel = p.channel AND q.head_id IS NOT NULL AND q.due_at <= $2 \
            ORDER BY q.due_at, q.contact LIMIT LEAST($3, $8)) e \
        WHERE p.channel = ANY($6::text[])), \
    quotas AS ( \
        SELECT channel, COUNT(*) AS quota FROM ( \
            SELECT channel FROM turns ORDER BY turn, COALESCE(channel <= $7::text, false), channel LIMIT $3) taken \
        GROUP BY channel), \
    due AS ( \
        SELECT d.head_id FROM quotas CROSS JOIN LATERAL ( \
            SELECT q.head_id FROM channel_queues q \
            WHERE q.direction = $1 AND q.channel = quotas.channel AND q.head_id IS NOT NULL AND q.due_at <= $2 \
            ORDER BY q.due_at, q.contact LIMIT quotas.quota FOR UPDATE SKIP LOCKED) d \
        LIMIT $3), \
    leased AS ( \
        UPDATE jobs j SET lease_owner = $4, lease_until = $5, lease_token = j.lease_token + 1 \
        FROM due WHERE j.id = due.head_id AND j.state = 'queued' RETURNING j.*), \
    held AS ( \
        UPDATE channel_queues q SET due_at = $5 FROM leased \
        WHERE q.direction = leased.direction AND q.channel = leased.channel AND q.contact = leased.contact)";

/// Takes the lock of a job's queue (see `PgTx::lock_queue_of`) as the first part of a
/// statement about the job: `$9` the job. Whatever else the statement writes depends on its row,
/// so that the lock comes first, as everywhere.
pub(super) const LOCK_QUEUE_OF_JOB: &str = "locked AS (INSERT INTO channel_queues (channel, direction, contact, head_id, due_at) \
    SELECT channel, direction, contact, NULL, 0 FROM jobs WHERE id = $9 \
    ON CONFLICT (channel, direction, contact) DO UPDATE SET head_id = channel_queues.head_id RETURNING head_id)";

/// Writes a finished attempt on its job (see [`Tx::settle`]) once its queue is locked: `$1`
/// state, `$2` progress, `$3` attempts to add, `$4` next attempt, `$5` error, `$6` when the last
/// request left, `$7` now, `$8` whether the reservation stays, `$9` job, `$10` its lease's token.
/// A lease taken over while the lock was awaited is seen: the row is checked again once its
/// own lock is granted.
pub(super) const SETTLE_JOB: &str = "UPDATE jobs SET state = $1, progress = $2, attempts = jobs.attempts + $3, \
    next_attempt_at = COALESCE($4, jobs.next_attempt_at), \
    last_error = CASE WHEN $3 = 0 THEN jobs.last_error ELSE $5 END, \
    accepted_at = CASE WHEN $1 = 'delivered' AND jobs.direction = 'outbound' THEN COALESCE($6, $7) \
        ELSE jobs.accepted_at END, \
    reserved_until = CASE WHEN $8 THEN jobs.reserved_until END, \
    lease_owner = NULL, lease_until = NULL, updated_at = $7 \
    FROM locked WHERE jobs.id = $9 AND jobs.lease_token = $10 AND jobs.lease_owner IS NOT NULL \
    RETURNING jobs.channel, jobs.direction, jobs.contact, jobs.m_id";

pub(super) static SETTLE: LazyLock<String> = LazyLock::new(|| format!("WITH {LOCK_QUEUE_OF_JOB} {SETTLE_JOB}"));

/// [`SETTLE`], putting right the job's first send recorded ahead ([`AheadSettled`]): `$11` the
/// pacing bound written, `$12` the value it takes, `$13` channel, `$14` contact, `$15` the echo
/// mark no send will match.
pub(super) static SETTLE_PUTTING_AHEAD_RIGHT: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH {LOCK_QUEUE_OF_JOB}, \
         paced AS (UPDATE contacts c SET last_effective_at = $12 FROM locked \
            WHERE c.channel = $13 AND c.direction = 'outbound' AND c.contact = $14 AND c.last_effective_at = $11), \
         unmarked AS (DELETE FROM echo_marks m USING locked WHERE m.id = $15) \
         {SETTLE_JOB}"
    )
});

/// Puts the queue row of `$1` channel, `$2` direction, `$3` contact right (see
/// `PgTx::refresh_head`), returning its head: `due_at` is [`head_due_at`](crate::store::rules::head_due_at) in SQL.
pub(super) const REFRESH_HEAD: &str = "UPDATE channel_queues q SET head_id = h.id, due_at = COALESCE(GREATEST(h.due_at, \
        (SELECT MAX(l.lease_until) FROM jobs l WHERE l.state = 'queued' AND l.lease_owner IS NOT NULL \
         AND l.channel = q.channel AND l.direction = q.direction AND l.contact = q.contact)), 0) \
    FROM (SELECT $1::text AS channel, $2::text AS direction, $3::text AS contact) k \
    LEFT JOIN LATERAL (SELECT j.id, GREATEST(j.next_attempt_at, COALESCE(j.reserved_until, 0)) AS due_at \
        FROM jobs j WHERE j.state = 'queued' \
        AND j.channel = k.channel AND j.direction = k.direction AND j.contact = k.contact \
        ORDER BY j.id LIMIT 1) h ON true \
    WHERE q.channel = k.channel AND q.direction = k.direction AND q.contact = k.contact \
    RETURNING q.head_id";

/// [`REFRESH_HEAD`], also returning the contact's watermarks (status, watermark, timestamp, each
/// in the order of status): a delivered outbound job's receipts depend on them
/// (`rules::finish`), and they are read under the contact's lock, in a statement after the one
/// that took it, so that a watermark racing the end of the send is never missed.
pub(super) static REFRESH_HEAD_READING_WATERMARKS: LazyLock<String> = LazyLock::new(|| {
    format!(
        "{REFRESH_HEAD}, \
         ARRAY(SELECT w.status FROM watermarks w WHERE w.channel = q.channel AND w.contact = q.contact ORDER BY w.status), \
         ARRAY(SELECT w.watermark FROM watermarks w WHERE w.channel = q.channel AND w.contact = q.contact \
            ORDER BY w.status), \
         ARRAY(SELECT w.timestamp FROM watermarks w WHERE w.channel = q.channel AND w.contact = q.contact \
            ORDER BY w.status)"
    )
});

/// What an attempt needs to know about its contact, besides [`JOB_COLUMNS`].
pub(super) const CONTACT_COLUMNS: &str = "c.last_effective_at, COALESCE(c.introduced, false) AS introduced";

pub(super) fn job_from_row(row: &PgRow, now: i64, with_contact: bool) -> StoreResult<Job> {
    let id: i64 = row.try_get("id")?;
    let corrupt = |what: &str| StoreError::Unavailable(format!("job {id} has an unreadable {what}"));
    let direction: String = row.try_get("direction")?;
    let state: String = row.try_get("state")?;
    let payload: String = row.try_get("payload")?;
    let lease_until: Option<i64> = row.try_get("lease_until")?;
    let count = |column: &str| -> StoreResult<u32> { Ok(u32::try_from(row.try_get::<i32, _>(column)?).unwrap_or(0)) };
    Ok(Job {
        id,
        channel: row.try_get("channel")?,
        direction: Direction::parse(&direction).ok_or_else(|| corrupt("direction"))?,
        contact: row.try_get("contact")?,
        m_id: row.try_get("m_id")?,
        state: JobState::parse(&state).ok_or_else(|| corrupt("state"))?,
        attempts: count("attempts")?,
        progress: count("progress")?,
        next_attempt_at: row.try_get("next_attempt_at")?,
        last_error: row.try_get("last_error")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        in_flight: lease_until.is_some_and(|until| until > now),
        lease_until,
        lease_token: row.try_get("lease_token")?,
        payload: decode_payload(&payload),
        contact_last_effective_at: if with_contact { row.try_get("last_effective_at")? } else { None },
        contact_introduced: with_contact && row.try_get::<bool, _>("introduced")?,
        trace_context: row.try_get("trace_context")?,
    })
}

pub(super) fn progress_value(progress: u32) -> i32 {
    i32::try_from(progress).unwrap_or(i32::MAX)
}

/// One contact's queue in one direction: (channel, direction, contact), as stored.
pub(super) type QueueId = (String, String, String);

/// A kept watermark, as [`Tx::watermarks`] returns it: (status, watermark, timestamp).
pub(super) type Watermark = (String, i64, i64);

/// The storage operations the rules of the queue run on, inside one transaction. Each statement
/// is a round trip to the server, so a `PgTx` keeps what its transaction has learned, and reads
/// what the rules will ask next with a statement it has to send anyway.
pub(super) struct PgTx<'t> {
    pub(super) conn: &'t mut PgConnection,
    /// The queues this transaction holds, with their heads as of the lock and of its own changes
    /// since: whether a new job heads its queue is known without asking.
    pub(super) heads: std::collections::HashMap<QueueId, Option<i64>>,
    /// Whether the next lock also reads its channel's intake count (an outbound message, whose
    /// rule asks for it right after).
    pub(super) count_with_lock: bool,
    /// (channel, direction, queued) as read with a lock.
    pub(super) counted: Option<(String, Direction, i64)>,
    /// (channel, contact, its last effective send) as read by the insert of a job leased with it.
    pub(super) last_effective: Option<(String, String, Option<i64>)>,
    /// (channel, contact, watermarks) as read by the settle of a delivered outbound job.
    pub(super) watermarks: Option<(String, String, Vec<Watermark>)>,
    /// The first send to record with the insert of a job leased with it (see [`FirstSends`](super::first_sends::FirstSends)),
    /// and what that insert wrote.
    pub(super) ahead: Option<AheadPlan>,
    pub(super) written_ahead: Option<(AheadPlan, WrittenAhead)>,
    /// What the next settle puts right of its job's first send recorded ahead.
    pub(super) settle_ahead: Option<AheadSettled>,
}

impl<'t> PgTx<'t> {
    pub(super) fn new(conn: &'t mut PgConnection) -> Self {
        Self {
            conn,
            heads: std::collections::HashMap::new(),
            count_with_lock: false,
            counted: None,
            last_effective: None,
            watermarks: None,
            ahead: None,
            written_ahead: None,
            settle_ahead: None,
        }
    }

    /// The head of a queue this transaction holds: `Some(None)` for an empty one, `None` when it
    /// does not know.
    pub(super) fn known_head(&self, channel: &str, direction: &str, contact: &str) -> Option<Option<i64>> {
        self.heads.get(&(channel.to_owned(), direction.to_owned(), contact.to_owned())).copied()
    }

    pub(super) fn remember_head(&mut self, queue: QueueId, head: Option<i64>) {
        self.heads.insert(queue, head);
    }

    /// Takes the lock of one contact's queue until the transaction ends. An upsert: the row of
    /// a contact seen for the first time, or pruned since its queue emptied, is made and locked
    /// in one step, so every writer of a contact has a row to wait on. Returns the queue's head.
    ///
    /// With `count_with_lock`, the same statement reads the channel's intake count. Its snapshot
    /// is taken before the lock is granted, so a transaction of the same contact that committed
    /// meanwhile is not counted: the cap is as approximate as it is anyway between transactions
    /// of different contacts, which never wait for each other.
    pub(super) async fn lock_queue(
        &mut self,
        channel: &str,
        direction: &str,
        contact: &str,
    ) -> StoreResult<Option<i64>> {
        const LOCK: &str = "INSERT INTO channel_queues (channel, direction, contact, head_id, due_at) \
            VALUES ($1, $2, $3, NULL, 0) \
            ON CONFLICT (channel, direction, contact) DO UPDATE SET head_id = channel_queues.head_id \
            RETURNING head_id";
        const LOCK_AND_COUNT: &str = "INSERT INTO channel_queues (channel, direction, contact, head_id, due_at) \
            VALUES ($1, $2, $3, NULL, 0) \
            ON CONFLICT (channel, direction, contact) DO UPDATE SET head_id = channel_queues.head_id \
            RETURNING head_id, \
            (SELECT COALESCE(SUM(d.queued), 0)::bigint FROM queue_depth d WHERE d.channel = $1 AND d.direction = $2)";
        let count = std::mem::take(&mut self.count_with_lock);
        let row = sqlx::query(if count { LOCK_AND_COUNT } else { LOCK })
            .bind(channel)
            .bind(direction)
            .bind(contact)
            .fetch_one(&mut *self.conn)
            .await?;
        let head: Option<i64> = row.try_get(0)?;
        if count && let Some(counted_direction) = Direction::parse(direction) {
            self.counted = Some((channel.to_owned(), counted_direction, row.try_get(1)?));
        }
        self.remember_head((channel.to_owned(), direction.to_owned(), contact.to_owned()), head);
        Ok(head)
    }

    /// Takes the lock of job `id`'s queue; returns the queue, `None` for no such job.
    pub(super) async fn lock_queue_of(&mut self, id: i64) -> StoreResult<Option<QueueId>> {
        // The job's queue never changes, so it is looked up and locked in one statement.
        let locked: Option<(String, String, String, Option<i64>)> = sqlx::query_as(
            "INSERT INTO channel_queues (channel, direction, contact, head_id, due_at) \
             SELECT channel, direction, contact, NULL, 0 FROM jobs WHERE id = $1 \
             ON CONFLICT (channel, direction, contact) DO UPDATE SET head_id = channel_queues.head_id \
             RETURNING channel, direction, contact, head_id",
        )
        .bind(id)
        .fetch_optional(&mut *self.conn)
        .await?;
        Ok(locked.map(|(channel, direction, contact, head)| {
            let queue = (channel, direction, contact);
            self.remember_head(queue.clone(), head);
            queue
        }))
    }

    /// Puts the queue row of one (channel, direction, contact), whose lock this transaction
    /// holds, right after its jobs changed: its oldest queued job heads it, due at its next
    /// attempt (or its reservation's end), and not while any queued job of the contact is
    /// leased. Returns whether the contact still has queued jobs.
    pub(super) async fn refresh_head(&mut self, queue: &QueueId) -> StoreResult<bool> {
        let (channel, direction, contact) = queue;
        let head: Option<Option<i64>> = sqlx::query_scalar(REFRESH_HEAD)
            .bind(channel)
            .bind(direction)
            .bind(contact)
            .fetch_optional(&mut *self.conn)
            .await?;
        let head = head.flatten();
        self.remember_head(queue.clone(), head);
        Ok(head.is_some())
    }

    /// [`Self::refresh_head`], keeping the contact's watermarks for [`Tx::watermarks`].
    pub(super) async fn refresh_head_reading_watermarks(&mut self, queue: &QueueId) -> StoreResult<bool> {
        let (channel, direction, contact) = queue;
        type Refreshed = (Option<i64>, Vec<String>, Vec<i64>, Vec<i64>);
        let refreshed: Option<Refreshed> = sqlx::query_as(LazyLock::force(&REFRESH_HEAD_READING_WATERMARKS).as_str())
            .bind(channel)
            .bind(direction)
            .bind(contact)
            .fetch_optional(&mut *self.conn)
            .await?;
        let Some((head, statuses, watermarks, timestamps)) = refreshed else { return Ok(false) };
        let read = statuses.into_iter().zip(watermarks).zip(timestamps).map(|((s, w), t)| (s, w, t)).collect();
        self.watermarks = Some((channel.clone(), contact.clone(), read));
        self.remember_head(queue.clone(), head);
        Ok(head.is_some())
    }

    /// Leases job `id` to `owner`, holding its queue (locked by this transaction) for the
    /// lease; returns the new token.
    pub(super) async fn lease(&mut self, id: i64, owner: &str, lease_until: i64) -> StoreResult<i64> {
        let (token, channel, direction, contact): (i64, String, String, String) = sqlx::query_as(
            "UPDATE jobs SET lease_owner = $1, lease_until = $2, lease_token = lease_token + 1 WHERE id = $3 \
             RETURNING lease_token, channel, direction, contact",
        )
        .bind(owner)
        .bind(lease_until)
        .bind(id)
        .fetch_one(&mut *self.conn)
        .await?;
        sqlx::query("UPDATE channel_queues SET due_at = $1 WHERE channel = $2 AND direction = $3 AND contact = $4")
            .bind(lease_until)
            .bind(channel)
            .bind(direction)
            .bind(contact)
            .execute(&mut *self.conn)
            .await?;
        Ok(token)
    }
}

impl Tx for PgTx<'_> {
    async fn lock_queues(&mut self, channel: &str, direction: Direction, contacts: &[&str]) -> StoreResult<()> {
        for contact in contacts {
            self.lock_queue(channel, direction.as_str(), contact).await?;
        }
        Ok(())
    }

    async fn queued(&mut self, channel: &str, direction: Direction, _cap: u64) -> StoreResult<u64> {
        if let Some((counted_channel, counted_direction, counted)) = self.counted.take()
            && counted_channel == channel
            && counted_direction == direction
        {
            return Ok(u64::try_from(counted).unwrap_or(0));
        }
        // Kept by the triggers of migration 0005: a row per connection that wrote since the last
        // prune, whatever the depth.
        let counted: i64 = sqlx::query_scalar(
            "SELECT COALESCE(SUM(queued), 0)::bigint FROM queue_depth WHERE channel = $1 AND direction = $2",
        )
        .bind(channel)
        .bind(direction.as_str())
        .fetch_one(&mut *self.conn)
        .await?;
        Ok(u64::try_from(counted).unwrap_or(0))
    }

    async fn queued_for(&mut self, channel: &str, direction: Direction, contact: &str, cap: u64) -> StoreResult<u64> {
        let counted: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM (SELECT 1 FROM jobs WHERE state = 'queued' \
             AND channel = $1 AND direction = $2 AND contact = $3 LIMIT $4) q",
        )
        .bind(channel)
        .bind(direction.as_str())
        .bind(contact)
        .bind(i64::try_from(cap.saturating_add(1)).unwrap_or(i64::MAX))
        .fetch_one(&mut *self.conn)
        .await?;
        Ok(u64::try_from(counted).unwrap_or(0))
    }

    async fn insert_job(
        &mut self,
        row: &NewRow<'_>,
        now: i64,
        first: Option<&FirstClaim>,
    ) -> StoreResult<Option<Inserted>> {
        let direction = row.direction.as_str();
        // Every caller holds the queue already; its head came with the lock.
        let head = row.state == JobState::Queued
            && match self.known_head(row.channel, direction, row.contact) {
                Some(head) => head.is_none(),
                None => self.lock_queue(row.channel, direction, row.contact).await?.is_none(),
            };
        let lease = first.filter(|_| head);
        // Due when its lease and its reservation have ended, as `refresh_head` has it.
        let due_at = head.then(|| lease.map_or(now, |lease| now.max(lease.lease_until).max(lease.reserved_until)));
        let inserted = match lease {
            // The job, its lease (a new row's token is 0, this first claim makes it 1), its place
            // at the head of the queue and its first send recorded ahead, in one statement, which
            // also reads what the attempt needs to know about the contact: its pacing record as
            // it was before this statement.
            Some(lease) => {
                let ahead = self.ahead.take();
                let (effective_by, fingerprint, expires_by) = match &ahead {
                    Some(plan) => (Some(plan.effective_by), plan.fingerprint.as_deref(), Some(plan.expires_by)),
                    None => (None, None, None),
                };
                sqlx::query_as::<_, (i64, Option<i64>, Option<i64>)>(
                    "WITH job AS ( \
                        INSERT INTO jobs (channel, direction, contact, m_id, dedup_key, payload, state, next_attempt_at, \
                        created_at, updated_at, reserved_until, lease_owner, lease_until, lease_token, trace_context) \
                        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8, $8, $9, $10, $11, 1, $16) \
                        ON CONFLICT (channel, dedup_key) WHERE dedup_key IS NOT NULL DO NOTHING RETURNING id), \
                     head AS ( \
                        UPDATE channel_queues q SET head_id = job.id, due_at = $12 FROM job \
                        WHERE q.channel = $1 AND q.direction = $2 AND q.contact = $3), \
                     paced AS ( \
                        INSERT INTO contacts (channel, direction, contact, last_effective_at) \
                        SELECT $1, $2, $3, $13 FROM job WHERE $13::bigint IS NOT NULL \
                        ON CONFLICT (channel, direction, contact) DO UPDATE SET last_effective_at = \
                        GREATEST(COALESCE(contacts.last_effective_at, 0), excluded.last_effective_at)), \
                     mark AS ( \
                        INSERT INTO echo_marks (channel, contact, fingerprint, expires_at) \
                        SELECT $1, $3, $14, $15 FROM job WHERE $14::text IS NOT NULL RETURNING id) \
                     SELECT job.id, (SELECT c.last_effective_at FROM contacts c \
                        WHERE c.channel = $1 AND c.direction = $2 AND c.contact = $3), (SELECT id FROM mark) FROM job",
                )
                .bind(row.channel)
                .bind(direction)
                .bind(row.contact)
                .bind(row.m_id)
                .bind(row.dedup_key.as_deref())
                .bind(row.payload)
                .bind(row.state.as_str())
                .bind(now)
                .bind(lease.reserved_until)
                .bind(&lease.owner)
                .bind(lease.lease_until)
                .bind(due_at)
                .bind(effective_by)
                .bind(fingerprint)
                .bind(expires_by)
                .bind(row.trace_context)
                .fetch_optional(&mut *self.conn)
                .await?
                .map(|(id, previous, mark)| {
                    self.last_effective = Some((row.channel.to_owned(), row.contact.to_owned(), previous));
                    self.written_ahead = ahead.map(|plan| (plan, WrittenAhead { previous, mark }));
                    id
                })
            }
            // The job and, when it heads its queue, its place there, in one statement.
            None => {
                sqlx::query_scalar::<_, i64>(
                    "WITH job AS ( \
                        INSERT INTO jobs (channel, direction, contact, m_id, dedup_key, payload, state, next_attempt_at, \
                        created_at, updated_at, reserved_until, trace_context) \
                        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8, $8, $9, $11) \
                        ON CONFLICT (channel, dedup_key) WHERE dedup_key IS NOT NULL DO NOTHING RETURNING id), \
                     head AS ( \
                        UPDATE channel_queues q SET head_id = job.id, due_at = $10 FROM job \
                        WHERE $10::bigint IS NOT NULL AND q.channel = $1 AND q.direction = $2 AND q.contact = $3) \
                     SELECT id FROM job",
                )
                .bind(row.channel)
                .bind(direction)
                .bind(row.contact)
                .bind(row.m_id)
                .bind(row.dedup_key.as_deref())
                .bind(row.payload)
                .bind(row.state.as_str())
                .bind(now)
                .bind(first.map(|first| first.reserved_until))
                .bind(due_at)
                .bind(row.trace_context)
                .fetch_optional(&mut *self.conn)
                .await?
            }
        };
        let Some(id) = inserted else { return Ok(None) };
        if head {
            self.remember_head((row.channel.to_owned(), direction.to_owned(), row.contact.to_owned()), Some(id));
        }
        Ok(Some(Inserted { id, head, lease_token: lease.map(|_| 1) }))
    }

    async fn last_effective_at(&mut self, channel: &str, contact: &str) -> StoreResult<Option<i64>> {
        if let Some((read_channel, read_contact, last_effective_at)) = self.last_effective.take()
            && read_channel == channel
            && read_contact == contact
        {
            return Ok(last_effective_at);
        }
        Ok(sqlx::query_scalar::<_, Option<i64>>(
            "SELECT last_effective_at FROM contacts WHERE channel = $1 AND direction = 'outbound' AND contact = $2",
        )
        .bind(channel)
        .bind(contact)
        .fetch_optional(&mut *self.conn)
        .await?
        .flatten())
    }

    async fn any_stored(&mut self, channel: &str, dedup_keys: &[String]) -> StoreResult<bool> {
        Ok(sqlx::query("SELECT 1 FROM jobs WHERE channel = $1 AND dedup_key = ANY($2) LIMIT 1")
            .bind(channel)
            .bind(dedup_keys)
            .fetch_optional(&mut *self.conn)
            .await?
            .is_some())
    }

    async fn take_echo_mark(&mut self, channel: &str, contact: &str, fingerprint: &str, now: i64) -> StoreResult<bool> {
        Ok(sqlx::query(
            "DELETE FROM echo_marks WHERE id = (SELECT id FROM echo_marks \
             WHERE channel = $1 AND contact = $2 AND fingerprint = $3 AND expires_at > $4 \
             ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED) \
             RETURNING id",
        )
        .bind(channel)
        .bind(contact)
        .bind(fingerprint)
        .bind(now)
        .fetch_optional(&mut *self.conn)
        .await?
        .is_some())
    }

    async fn unreported(
        &mut self,
        channel: &str,
        contact: &str,
        watermark: i64,
        status: StatusValue,
    ) -> StoreResult<Vec<(i64, String)>> {
        let unreported = match status {
            StatusValue::Read => "NOT read_reported",
            _ => "NOT delivered_reported",
        };
        Ok(sqlx::query_as(AssertSqlSafe(format!(
            "SELECT id, m_id FROM jobs WHERE contact = $1 AND accepted_at IS NOT NULL AND accepted_at <= $2 \
             AND channel = $3 AND direction = 'outbound' AND state = 'delivered' AND {unreported} ORDER BY id"
        )))
        .bind(contact)
        .bind(watermark)
        .bind(channel)
        .fetch_all(&mut *self.conn)
        .await?)
    }

    async fn mark_reported(&mut self, id: i64, status: StatusValue) -> StoreResult<()> {
        let mark = match status {
            StatusValue::Read => "read_reported = true, delivered_reported = true",
            _ => "delivered_reported = true",
        };
        sqlx::query(AssertSqlSafe(format!("UPDATE jobs SET {mark} WHERE id = $1")))
            .bind(id)
            .execute(&mut *self.conn)
            .await?;
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
        sqlx::query(
            "INSERT INTO watermarks (channel, contact, status, watermark, timestamp, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT (channel, contact, status) DO UPDATE SET watermark = excluded.watermark, \
             timestamp = excluded.timestamp, updated_at = excluded.updated_at \
             WHERE excluded.watermark > watermarks.watermark",
        )
        .bind(channel)
        .bind(contact)
        .bind(status_name(status))
        .bind(watermark)
        .bind(timestamp)
        .bind(now)
        .execute(&mut *self.conn)
        .await?;
        Ok(())
    }

    async fn watermarks(&mut self, channel: &str, contact: &str) -> StoreResult<Vec<(String, i64, i64)>> {
        if let Some((read_channel, read_contact, watermarks)) = self.watermarks.take()
            && read_channel == channel
            && read_contact == contact
        {
            return Ok(watermarks);
        }
        Ok(sqlx::query_as("SELECT status, watermark, timestamp FROM watermarks WHERE channel = $1 AND contact = $2")
            .bind(channel)
            .bind(contact)
            .fetch_all(&mut *self.conn)
            .await?)
    }

    async fn settle(&mut self, lease: Lease, settle: &Settle<'_>, now: i64) -> StoreResult<Option<Settled>> {
        let query = match &self.settle_ahead {
            Some(_) => sqlx::query_as::<_, (String, String, String, String)>(
                LazyLock::force(&SETTLE_PUTTING_AHEAD_RIGHT).as_str(),
            ),
            None => sqlx::query_as::<_, (String, String, String, String)>(LazyLock::force(&SETTLE).as_str()),
        };
        let query = query
            .bind(settle.state.as_str())
            .bind(progress_value(settle.progress))
            .bind(i32::try_from(settle.attempted).unwrap_or(1))
            .bind(settle.next_attempt_at)
            .bind(settle.error)
            .bind(settle.sent_at)
            .bind(now)
            .bind(settle.keep_reservation)
            .bind(lease.id)
            .bind(lease.token);
        let query = match self.settle_ahead.take() {
            Some(ahead) => query
                .bind(ahead.written)
                .bind(ahead.value)
                .bind(ahead.channel)
                .bind(ahead.contact)
                .bind(ahead.spare_mark),
            None => query,
        };
        let Some((channel, direction, contact, m_id)) = query.fetch_optional(&mut *self.conn).await? else {
            return Ok(None);
        };
        let queue = (channel, direction, contact);
        let queued = if settle.state == JobState::Delivered && queue.1 == Direction::Outbound.as_str() {
            self.refresh_head_reading_watermarks(&queue).await?
        } else {
            self.refresh_head(&queue).await?
        };
        let (channel, direction, contact) = queue;
        let direction = Direction::parse(&direction)
            .ok_or_else(|| StoreError::Unavailable(format!("job {} has direction {direction}", lease.id)))?;
        Ok(Some(Settled { channel, direction, contact, m_id, queued, receipt: false }))
    }

    async fn message_trace_context(&mut self, channel: &str, m_id: &str) -> StoreResult<Option<String>> {
        let trace_context: Option<Option<String>> = sqlx::query_scalar(
            "SELECT trace_context FROM jobs WHERE m_id = $1 AND channel = $2 AND direction = 'outbound' LIMIT 1",
        )
        .bind(m_id)
        .bind(channel)
        .fetch_optional(&mut *self.conn)
        .await?;
        Ok(trace_context.flatten())
    }

    async fn state_of(&mut self, id: i64) -> StoreResult<Option<JobState>> {
        let state: Option<String> =
            sqlx::query_scalar("SELECT state FROM jobs WHERE id = $1").bind(id).fetch_optional(&mut *self.conn).await?;
        state
            .map(|state| {
                JobState::parse(&state).ok_or_else(|| StoreError::Unavailable(format!("job {id} has state {state}")))
            })
            .transpose()
    }

    async fn requeue(&mut self, id: i64, now: i64) -> StoreResult<()> {
        let Some(queue) = self.lock_queue_of(id).await? else { return Ok(()) };
        sqlx::query(
            "UPDATE jobs SET state = 'queued', attempts = 0, next_attempt_at = $1, updated_at = $1 WHERE id = $2",
        )
        .bind(now)
        .bind(id)
        .execute(&mut *self.conn)
        .await?;
        self.refresh_head(&queue).await.map(drop)
    }

    async fn load(&mut self, id: i64, now: i64) -> StoreResult<Job> {
        let row = sqlx::query(AssertSqlSafe(format!("SELECT {JOB_COLUMNS} FROM jobs j WHERE j.id = $1")))
            .bind(id)
            .fetch_one(&mut *self.conn)
            .await?;
        job_from_row(&row, now, false)
    }

    async fn raise_last_effective(&mut self, channel: &str, contact: &str, at: i64) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO contacts (channel, direction, contact, last_effective_at) VALUES ($1, 'outbound', $2, $3) \
             ON CONFLICT (channel, direction, contact) DO UPDATE SET last_effective_at = \
             GREATEST(COALESCE(contacts.last_effective_at, 0), excluded.last_effective_at)",
        )
        .bind(channel)
        .bind(contact)
        .bind(at)
        .execute(&mut *self.conn)
        .await?;
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
        let attempt: i32 = sqlx::query_scalar(
            "INSERT INTO attempts (job_id, attempt, at, outcome, status, error) \
             SELECT id, attempts, $2, $3, $4, $5 FROM jobs WHERE id = $1 RETURNING attempt",
        )
        .bind(id)
        .bind(at)
        .bind(outcome)
        .bind(status.map(i32::from))
        .bind(error)
        .fetch_one(&mut *self.conn)
        .await?;
        if usize::try_from(attempt).unwrap_or(0) > crate::store::ATTEMPTS_KEPT {
            sqlx::query(
                "DELETE FROM attempts WHERE job_id = $1 AND id < (SELECT id FROM attempts WHERE job_id = $1 \
                 ORDER BY id DESC LIMIT 1 OFFSET $2)",
            )
            .bind(id)
            .bind(i64::try_from(crate::store::ATTEMPTS_KEPT).unwrap_or(i64::MAX) - 1)
            .execute(&mut *self.conn)
            .await?;
        }
        Ok(())
    }

    async fn mark_introduced(&mut self, channel: &str, contact: &str) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO contacts (channel, direction, contact, introduced) VALUES ($1, 'inbound', $2, true) \
             ON CONFLICT (channel, direction, contact) DO UPDATE SET introduced = true",
        )
        .bind(channel)
        .bind(contact)
        .execute(&mut *self.conn)
        .await?;
        Ok(())
    }

    async fn add_echo_mark(
        &mut self,
        channel: &str,
        contact: &str,
        fingerprint: &str,
        expires_at: i64,
    ) -> StoreResult<()> {
        sqlx::query("INSERT INTO echo_marks (channel, contact, fingerprint, expires_at) VALUES ($1, $2, $3, $4)")
            .bind(channel)
            .bind(contact)
            .bind(fingerprint)
            .bind(expires_at)
            .execute(&mut *self.conn)
            .await?;
        Ok(())
    }
}

/// Queues touched by one operation, in lock order (sorted, distinct).
pub(super) fn lock_order(mut queues: Vec<QueueId>) -> Vec<QueueId> {
    queues.sort_unstable();
    queues.dedup();
    queues
}
