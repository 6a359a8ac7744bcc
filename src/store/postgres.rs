//! The shared store: PostgreSQL, for several replicas at once (SPEC §5).
//!
//! Every operation is one short transaction on a pooled connection; none is held across an
//! HTTP call. What several replicas need is in the database, not in any one of them:
//! - **One claim wins.** Each (channel, direction, contact) has a row in `channel_queues`: its
//!   oldest queued job and when that one is due. Every change to a contact's queue takes that
//!   row's lock first, and claims take due rows with `FOR UPDATE SKIP LOCKED`, so two replicas
//!   never both claim a contact, and a contact's jobs go one at a time, in order.
//! - **Fencing.** Each claim gives the job a new `lease_token`; progress, renewals and outcomes
//!   name the token they were claimed under and are refused once anyone has claimed the job
//!   since. Lease times are on the database's clock ([`Store::now`]).
//! - **Uniqueness in the database.** Messenger's redeliveries and receipts are deduplicated by a
//!   unique key, whichever replica receives them; echo records are taken by one transaction.
//! - **Wake-ups.** Transactions that make work claimable send a `NOTIFY`; every replica listens
//!   and claims at once, and polls as a backstop (a lost connection loses notifications).
//! - **Few round trips.** Each statement waits for the server, so a message's first attempt is
//!   two transactions of two statements each: the insert (its queue's lock, which also reads the
//!   intake count; then the job, leased to its request, with its first send recorded ahead, see
//!   [`FirstSends`]) and the outcome (the lock and the job's state, with the record ahead put
//!   right; then the queue's head, with the contact's watermarks).
//! - **The database away.** Acquiring a connection is bounded by the connect timeout, each
//!   statement by the statement timeout, so requests get 503 and workers back off; the pool
//!   reconnects by itself once the database is back.
//!
//! Lock order, the same everywhere so that transactions never deadlock: a contact's
//! `channel_queues` row, then its job rows; outbound before inbound.

use std::str::FromStr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions, PgRow};
use sqlx::{AssertSqlSafe, PgConnection, PgPool, Postgres, Row, Transaction};

use super::rules::{self, Inserted, NewRow, PreparedBatch, Settle, Settled, Tx, status_name};
use super::send_rate::{Bucket, Grant, RateOp};
use super::{
    BeforeSend, Changes, Claim, DEFAULT_CHANNEL, Direction, Enqueued, Finish, FirstClaim, InboundBatch, InboundSummary,
    IntakeCaps, Job, JobState, Lease, LeasedJob, NewOutbound, Payload, QueueCounts, QueueWatch, ReleaseOnDrop,
    Rotation, Store, StoreError, StoreResult, decode_payload, encode_payload, now_millis,
};
use crate::BoxFuture;
use crate::config::PostgresOptions;
use crate::domain::bonychat::StatusValue;

const MIGRATIONS: &[&str] = &[
    include_str!("../../migrations/postgres/0001_init.sql"),
    include_str!("../../migrations/postgres/0002_watermarks_and_depth.sql"),
    include_str!("../../migrations/postgres/0003_channels.sql"),
    include_str!("../../migrations/postgres/0004_send_rates.sql"),
    include_str!("../../migrations/postgres/0005_lighter_intake_count.sql"),
];
/// Held while migrating, so that replicas starting together migrate one after the other.
const MIGRATION_LOCK: i64 = 0x626f_6e79_6368_6174;
/// Held while folding intake counts (see `prune`): two replicas folding at once would take the
/// rows of shard 0 in their own orders, and could deadlock.
const FOLD_LOCK: i64 = 0x626f_6e79_666f_6c64;
/// The `NOTIFY` channel new work is announced on (no relation to the relay's channels).
const CHANNEL: &str = "bonychat_relay_jobs";
/// How often each replica measures its clock against the database's.
const CLOCK_REFRESH: Duration = Duration::from_secs(10);
/// How long readiness waits for its probe write.
const PING_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a transaction may sit idle between two statements before the server ends its
/// session and releases its locks (`idle_in_transaction_session_timeout`, in ms).
const DEAD_SESSION_AFTER_MS: &str = "3000";
/// How long readiness waits for the locks intake takes (ms): a table locked by a migration or a
/// `VACUUM FULL` makes the replica not ready, as it makes intake fail.
const PING_LOCK_TIMEOUT_MS: &str = "1000";
/// How long to keep trying to learn whether a commit whose answer was lost took effect.
const CONFIRM_FOR: Duration = Duration::from_secs(5);
/// How long after the insert that leased it a message's first send may leave and still be the
/// one recorded with the insert (see [`FirstSends`]).
const FIRST_SEND_SLACK: Duration = Duration::from_millis(250);
/// Records ahead kept at most before the stale ones (of attempts that ended without a finish,
/// their lease lost) are dropped.
const FIRST_SENDS_KEPT: usize = 4096;

/// The first send of a message leased with its insert, recorded ahead: pacing as if it took
/// effect by `effective_by`, and its echo mark until `expires_by` (see [`FirstSends`]).
struct AheadPlan {
    effective_by: i64,
    fingerprint: Option<String>,
    expires_by: i64,
}

impl AheadPlan {
    fn of(job: &NewOutbound, now: i64) -> Self {
        let slack = i64::try_from(FIRST_SEND_SLACK.as_millis()).unwrap_or(0);
        let window = i64::try_from(super::ECHO_WINDOW.as_millis()).unwrap_or(i64::MAX);
        Self {
            effective_by: now.saturating_add(slack),
            fingerprint: job.parts.first().and_then(|part| part.echo_fingerprint()),
            expires_by: now.saturating_add(slack).saturating_add(window),
        }
    }
}

/// What the insert found and wrote for an [`AheadPlan`]: the contact's last effective send
/// before it, and the echo mark's id.
struct WrittenAhead {
    previous: Option<i64>,
    mark: Option<i64>,
}

/// A first send recorded ahead, until its attempt ends.
struct FirstSend {
    job: i64,
    channel: String,
    contact: String,
    plan: AheadPlan,
    written: WrittenAhead,
    recorded_at: std::time::Instant,
    /// When the send takes effect, once `before_send` found it the one recorded.
    sent: Option<i64>,
}

/// What the finish of an attempt puts right of its first send recorded ahead: the pacing record
/// from the bound written to `value` (when the send took effect, or what it was before for a
/// send that never left) if nobody moved it since, and an echo mark no send will match.
struct AheadSettled {
    channel: String,
    contact: String,
    written: i64,
    value: Option<i64>,
    spare_mark: Option<i64>,
}

impl FirstSend {
    fn settled(self) -> AheadSettled {
        let (value, spare_mark) = match self.sent {
            Some(effective_at) => (Some(effective_at), None),
            None => (self.written.previous, self.written.mark),
        };
        AheadSettled {
            channel: self.channel,
            contact: self.contact,
            written: self.plan.effective_by,
            value,
            spare_mark,
        }
    }
}

/// The first sends recorded ahead, by job.
///
/// A `/message` request sends its job's first JoinChat request within milliseconds of the insert
/// that leased it the job, and `before_send` would record that send in a transaction of its own
/// (the contact's pacing and the echo mark). Postgres writes that record with the insert
/// instead, bounded: as if the send took effect [`FIRST_SEND_SLACK`] after the insert. When the
/// send comes within that bound, `before_send` finds it recorded and writes nothing: one
/// transaction less per message. The finish of the attempt puts the record right in the
/// transaction it takes anyway: the pacing record goes back from the bound to when the send took effect, or,
/// for a send that never left (held back by the send rate, paced, its request gone), to what it
/// was before, and that send's echo mark goes. Nobody reads the contact's pacing meanwhile: its
/// next job waits for this one's lease to end. A crash in between leaves the bound, at most
/// [`FIRST_SEND_SLACK`] past the send (the contact's next message may get one second more of
/// `delay`), and for a send that never left an echo mark that an echo of the same text within
/// ten minutes may take, as a send that failed after `before_send` always could.
#[derive(Default)]
struct FirstSends(std::sync::Mutex<Vec<FirstSend>>);

/// What `before_send` has to write, given the first sends recorded ahead.
enum Ahead {
    /// The send was recorded with its insert: nothing.
    Covered,
    /// The usual record; and the echo mark of a first send recorded ahead that never left, if any.
    Record { spare_mark: Option<i64> },
}

impl FirstSends {
    fn add(&self, send: FirstSend) {
        let mut sends = self.0.lock().expect("first sends");
        if sends.len() >= FIRST_SENDS_KEPT {
            sends.retain(|kept| kept.recorded_at.elapsed() < FIRST_SEND_SLACK * 240);
        }
        sends.push(send);
    }

    /// Whether `send` is a first send recorded ahead, which it then marks sent. Any other send to
    /// the same contact (the first one late, or the next part) records itself, and takes the
    /// record ahead out: its pacing record is the later one, and the echo mark of a send that
    /// never left goes with it.
    fn before_send(&self, send: &BeforeSend) -> Ahead {
        let mut sends = self.0.lock().expect("first sends");
        let Some(at) = sends.iter().position(|first| first.channel == send.channel && first.contact == send.contact)
        else {
            return Ahead::Record { spare_mark: None };
        };
        let first = &mut sends[at];
        if first.sent.is_none()
            && first.plan.fingerprint == send.echo_fingerprint
            && send.effective_at <= first.plan.effective_by
            && send.echo_expires_at <= first.plan.expires_by
            && first.recorded_at.elapsed() <= FIRST_SEND_SLACK
        {
            first.sent = Some(send.effective_at);
            return Ahead::Covered;
        }
        let first = sends.swap_remove(at);
        Ahead::Record { spare_mark: first.sent.is_none().then_some(first.written.mark).flatten() }
    }

    /// Takes out the first send of job `id` recorded ahead, at the end of its attempt.
    fn take(&self, id: i64) -> Option<FirstSend> {
        let mut sends = self.0.lock().expect("first sends");
        let at = sends.iter().position(|first| first.job == id)?;
        Some(sends.swap_remove(at))
    }
}

pub struct PostgresStore {
    shared: Shared,
    _background: Vec<AbortOnDrop>,
}

/// What every operation needs, cheap to clone into the task that runs it.
#[derive(Clone)]
struct Shared {
    pool: PgPool,
    caps: IntakeCaps,
    changes: Arc<Changes>,
    rotation: Arc<Rotation>,
    /// The database's clock minus this machine's, in milliseconds.
    clock_offset: Arc<AtomicI64>,
    /// Bounds a whole operation from the client side: a database that stopped answering (a
    /// network partition) never answers a statement timeout either.
    operation_timeout: Duration,
    first_sends: Arc<FirstSends>,
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How the store was opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// A replica: migrates the schema, listens for new work.
    Relay,
    /// `bonychat-relay jobs …`: an existing schema of the current version, used as it is.
    Tool,
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        Self::Unavailable(format!("the database failed: {e}"))
    }
}

impl PostgresStore {
    /// Connects to the database at `url`, migrates it (one replica at a time), and starts
    /// listening for other replicas' new work.
    pub async fn open(url: &str, options: PostgresOptions, caps: IntakeCaps) -> StoreResult<Self> {
        Self::start(url, options, caps, Mode::Relay).await
    }

    /// Connects to an existing, current database for tools that run beside the relays.
    pub async fn open_existing(url: &str, options: PostgresOptions, caps: IntakeCaps) -> StoreResult<Self> {
        Self::start(url, options, caps, Mode::Tool).await
    }

    /// Creates the relay's tables in the database at `url` with only the migrations up to schema
    /// version `version`, as a replica of that version left them: for tests of the upgrade from
    /// it, never for a relay.
    #[doc(hidden)]
    pub async fn create_with_schema_version(url: &str, version: usize) -> StoreResult<()> {
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .connect(url)
            .await
            .map_err(|e| StoreError::Unavailable(format!("cannot connect to the database: {e}")))?;
        let migrated = migrate_to(&pool, version).await;
        pool.close().await;
        migrated
    }

    async fn start(url: &str, options: PostgresOptions, caps: IntakeCaps, mode: Mode) -> StoreResult<Self> {
        let statement_timeout = options.statement_timeout.as_millis().to_string();
        let connect = PgConnectOptions::from_str(url)
            .map_err(|e| StoreError::Unavailable(format!("not a usable postgres:// URL: {}", scrub(&e.to_string()))))?
            .application_name("bonychat-relay")
            .options([
                ("statement_timeout", statement_timeout.as_str()),
                // A replica that vanished mid-transaction (its host gone, the network cut, a
                // SIGSTOP) would hold its contacts' locks until the kernel gave up on the
                // socket, about two hours: the server ends such a session itself. The relay's
                // own transactions never sit idle between statements for anything near this.
                ("idle_in_transaction_session_timeout", DEAD_SESSION_AFTER_MS),
                // And notices a vanished peer of an idle connection within about a minute.
                ("tcp_keepalives_idle", "30"),
                ("tcp_keepalives_interval", "10"),
                ("tcp_keepalives_count", "3"),
            ]);
        let pool = PgPoolOptions::new()
            .max_connections(options.pool_size)
            .acquire_timeout(options.connect_timeout)
            // A ping before every transaction would cost a round trip each; a connection that
            // a database restart cut fails its one transaction instead (503), and is dropped.
            .test_before_acquire(false)
            .connect_with(connect)
            .await
            .map_err(|e| StoreError::Unavailable(format!("cannot connect to the database: {e}")))?;
        match mode {
            Mode::Relay => migrate(&pool).await?,
            Mode::Tool => check_version(&pool).await?,
        }
        let clock_offset = Arc::new(AtomicI64::new(measure_offset(&pool).await?));
        let changes = Arc::new(Changes::default());
        let mut background = vec![AbortOnDrop(tokio::spawn(keep_clock(pool.clone(), Arc::clone(&clock_offset))))];
        if mode == Mode::Relay {
            let listener = PgListener::connect_with(&pool).await?;
            background.push(AbortOnDrop(tokio::spawn(listen(listener, Arc::clone(&changes)))));
        }
        let shared = Shared {
            pool,
            caps,
            changes,
            rotation: Arc::default(),
            clock_offset,
            operation_timeout: options.connect_timeout + options.statement_timeout * 2,
            first_sends: Arc::default(),
        };
        Ok(Self { shared, _background: background })
    }
}

impl Shared {
    /// Hands `lease` back, due now, when dropped unused (see [`LeasedJob`]): from a task of its
    /// own, since it may be dropped anywhere.
    fn release_on_drop(&self, lease: Lease) -> ReleaseOnDrop {
        let (shared, runtime) = (self.clone(), tokio::runtime::Handle::current());
        ReleaseOnDrop::new(lease, move |lease| {
            runtime.spawn(async move {
                let now = shared.now();
                if let Err(e) = shared.finish(lease, Finish::Release { progress: 0 }, now).await {
                    tracing::debug!(job = lease.id, error = %e, "a lease its caller left could not be handed back");
                }
            });
        })
    }

    /// Runs `op` within the operation timeout.
    async fn bounded<T>(&self, op: impl Future<Output = StoreResult<T>>) -> StoreResult<T> {
        tokio::time::timeout(self.operation_timeout, op).await.unwrap_or_else(|_| {
            Err(StoreError::Unavailable(format!(
                "the database did not answer within {} ms",
                self.operation_timeout.as_millis()
            )))
        })
    }

    async fn begin(&self) -> StoreResult<Transaction<'static, Postgres>> {
        Ok(self.pool.begin().await?)
    }

    /// Commits `tx`, announcing new work to every replica first when `notify`, and to this one
    /// once committed.
    async fn commit(&self, tx: Transaction<'static, Postgres>, notify: bool) -> StoreResult<()> {
        self.commit_announcing(tx, notify.then_some(News::Work)).await
    }

    /// Commits `tx`, announcing `news` to every replica first, and to this one once committed.
    async fn commit_announcing(
        &self,
        mut tx: Transaction<'static, Postgres>,
        news: Option<News<'_>>,
    ) -> StoreResult<()> {
        if let Some(news) = &news {
            let payload = match news {
                News::Work => String::new(),
                News::QueueMoved { channel, contact } => moved_payload(channel, contact),
            };
            sqlx::query("SELECT pg_notify($1, $2)").bind(CHANNEL).bind(payload).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        if let Some(news) = news {
            self.changes.signal();
            if let News::QueueMoved { channel, contact } = news {
                self.changes.queue_moved(channel, contact);
            }
        }
        Ok(())
    }

    /// After a commit whose answer was lost (the connection dropped during `COMMIT`): whether
    /// outbound message `m_id` is stored. Until the database answers that, nobody knows.
    async fn confirm_stored(&self, m_id: &str) -> StoreResult<bool> {
        let deadline = tokio::time::Instant::now() + CONFIRM_FOR;
        loop {
            let found = sqlx::query("SELECT 1 FROM jobs WHERE m_id = $1 AND direction = 'outbound'")
                .bind(m_id)
                .fetch_optional(&self.pool)
                .await;
            match found {
                Ok(found) => return Ok(found.is_some()),
                Err(e) if tokio::time::Instant::now() >= deadline => return Err(e.into()),
                Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
            }
        }
    }
}

/// An error text with any URL's credentials left out.
fn scrub(text: &str) -> String {
    text.split_whitespace()
        .map(|word| match url::Url::parse(word.trim_matches(|c| c == '`' || c == '"' || c == '\'')) {
            Ok(url) if !url.password().unwrap_or("").is_empty() || !url.username().is_empty() => "[a URL]",
            _ => word,
        })
        .collect::<Vec<_>>()
        .join(" ")
}

async fn migrate(pool: &PgPool) -> StoreResult<()> {
    migrate_to(pool, MIGRATIONS.len()).await
}

/// Applies the migrations up to schema version `target`, one replica at a time.
async fn migrate_to(pool: &PgPool, target: usize) -> StoreResult<()> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(MIGRATION_LOCK).execute(&mut *tx).await?;
    sqlx::raw_sql("CREATE TABLE IF NOT EXISTS relay_schema (version INTEGER NOT NULL)").execute(&mut *tx).await?;
    let version: i32 =
        sqlx::query_scalar("SELECT COALESCE(MAX(version), 0) FROM relay_schema").fetch_one(&mut *tx).await?;
    let known = i32::try_from(MIGRATIONS.len()).unwrap_or(i32::MAX);
    if version > known {
        return Err(StoreError::SchemaTooNew { found: version.into(), known: known.into() });
    }
    let pending = MIGRATIONS.iter().take(target);
    for (number, migration) in (1..).zip(pending).skip(usize::try_from(version).unwrap_or(0)) {
        sqlx::raw_sql(AssertSqlSafe(*migration)).execute(&mut *tx).await?;
        sqlx::query("INSERT INTO relay_schema (version) VALUES ($1)").bind(number).execute(&mut *tx).await?;
        tracing::info!(version = number, "database schema migrated");
    }
    tx.commit().await?;
    Ok(())
}

async fn check_version(pool: &PgPool) -> StoreResult<()> {
    let version: Option<i32> = sqlx::query_scalar("SELECT MAX(version) FROM relay_schema")
        .fetch_one(pool)
        .await
        .map_err(|e| StoreError::Unavailable(format!("no relay store in this database ({e}); a relay creates it")))?;
    let known = i32::try_from(MIGRATIONS.len()).unwrap_or(i32::MAX);
    match version {
        Some(version) if version == known => Ok(()),
        Some(version) if version > known => {
            Err(StoreError::SchemaTooNew { found: version.into(), known: known.into() })
        }
        other => Err(StoreError::Unavailable(format!(
            "the store has schema version {}, this bonychat-relay expects {known}; start the matching relay once first",
            other.unwrap_or(0)
        ))),
    }
}

/// The database's clock minus this machine's, measured across one round trip.
async fn measure_offset(pool: &PgPool) -> StoreResult<i64> {
    let before = now_millis();
    let database: i64 =
        sqlx::query_scalar("SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint").fetch_one(pool).await?;
    let after = now_millis();
    Ok(database - (before + (after - before) / 2))
}

async fn keep_clock(pool: PgPool, offset: Arc<AtomicI64>) {
    loop {
        tokio::time::sleep(CLOCK_REFRESH).await;
        if let Ok(measured) = measure_offset(&pool).await {
            offset.store(measured, Ordering::Relaxed);
        }
    }
}

/// What a commit announces to every replica.
enum News<'a> {
    /// Jobs may have become claimable.
    Work,
    /// That too, and the outbound queue of `contact` in `channel` moved on: a `/message` request
    /// waiting for it may take its job.
    QueueMoved { channel: &'a str, contact: &'a str },
}

/// The payload of a notification that the outbound queue of `contact` in `channel` moved on.
/// Channel names never hold a `/`, so the first one ends the name whatever the contact id.
fn moved_payload(channel: &str, contact: &str) -> String {
    format!("{channel}/{contact}")
}

/// Signals `changes` for every notification of new work. A lost connection may have lost
/// notifications, so a reconnection signals too.
async fn listen(mut listener: PgListener, changes: Arc<Changes>) {
    if let Err(e) = listener.listen(CHANNEL).await {
        tracing::warn!(error = %e, "cannot listen for other replicas' work; polling only");
    }
    loop {
        match listener.try_recv().await {
            Ok(Some(notification)) => {
                changes.signal();
                if let Some((channel, contact)) = notification.payload().split_once('/') {
                    changes.queue_moved(channel, contact);
                }
            }
            // The connection was lost; the next call reconnects and listens again.
            Ok(None) => changes.signal(),
            Err(e) => {
                tracing::debug!(error = %e, "listening for new work failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

const JOB_COLUMNS: &str = "j.id, j.channel, j.direction, j.contact, j.m_id, j.state, j.attempts, j.progress, \
    j.next_attempt_at, j.last_error, j.created_at, j.updated_at, j.lease_until, j.payload, j.lease_token";
/// The common table expressions of a claim (see [`Claim`]), ending with `leased`: the jobs it
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
const CLAIM_IN_TURNS: &str = "WITH RECURSIVE present (channel) AS ( \
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
const LOCK_QUEUE_OF_JOB: &str = "locked AS (INSERT INTO channel_queues (channel, direction, contact, head_id, due_at) \
    SELECT channel, direction, contact, NULL, 0 FROM jobs WHERE id = $9 \
    ON CONFLICT (channel, direction, contact) DO UPDATE SET head_id = channel_queues.head_id RETURNING head_id)";

/// Writes a finished attempt on its job (see [`Tx::settle`]) once its queue is locked: `$1`
/// state, `$2` progress, `$3` attempts to add, `$4` next attempt, `$5` error, `$6` when the last
/// request left, `$7` now, `$8` whether the reservation stays, `$9` job, `$10` its lease's token.
/// A lease taken over while the lock was awaited is seen: the row is checked again once its
/// own lock is granted.
const SETTLE_JOB: &str = "UPDATE jobs SET state = $1, progress = $2, attempts = jobs.attempts + $3, \
    next_attempt_at = COALESCE($4, jobs.next_attempt_at), \
    last_error = CASE WHEN $3 = 0 THEN jobs.last_error ELSE $5 END, \
    accepted_at = CASE WHEN $1 = 'delivered' AND jobs.direction = 'outbound' THEN COALESCE($6, $7) \
        ELSE jobs.accepted_at END, \
    reserved_until = CASE WHEN $8 THEN jobs.reserved_until END, \
    lease_owner = NULL, lease_until = NULL, updated_at = $7 \
    FROM locked WHERE jobs.id = $9 AND jobs.lease_token = $10 AND jobs.lease_owner IS NOT NULL \
    RETURNING jobs.channel, jobs.direction, jobs.contact, jobs.m_id";

static SETTLE: LazyLock<String> = LazyLock::new(|| format!("WITH {LOCK_QUEUE_OF_JOB} {SETTLE_JOB}"));

/// [`SETTLE`], putting right the job's first send recorded ahead ([`AheadSettled`]): `$11` the
/// pacing bound written, `$12` the value it takes, `$13` channel, `$14` contact, `$15` the echo
/// mark no send will match.
static SETTLE_PUTTING_AHEAD_RIGHT: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH {LOCK_QUEUE_OF_JOB}, \
         paced AS (UPDATE contacts c SET last_effective_at = $12 FROM locked \
            WHERE c.channel = $13 AND c.direction = 'outbound' AND c.contact = $14 AND c.last_effective_at = $11), \
         unmarked AS (DELETE FROM echo_marks m USING locked WHERE m.id = $15) \
         {SETTLE_JOB}"
    )
});

/// Puts the queue row of `$1` channel, `$2` direction, `$3` contact right (see
/// `PgTx::refresh_head`), returning its head.
const REFRESH_HEAD: &str = "UPDATE channel_queues q SET head_id = h.id, due_at = COALESCE(GREATEST(h.due_at, \
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
static REFRESH_HEAD_READING_WATERMARKS: LazyLock<String> = LazyLock::new(|| {
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
const CONTACT_COLUMNS: &str = "c.last_effective_at, COALESCE(c.introduced, false) AS introduced";

fn job_from_row(row: &PgRow, now: i64, with_contact: bool) -> StoreResult<Job> {
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
    })
}

fn progress_value(progress: u32) -> i32 {
    i32::try_from(progress).unwrap_or(i32::MAX)
}

/// One contact's queue in one direction: (channel, direction, contact), as stored.
type QueueId = (String, String, String);

/// A kept watermark, as [`Tx::watermarks`] returns it: (status, watermark, timestamp).
type Watermark = (String, i64, i64);

/// The storage operations the rules of the queue run on, inside one transaction. Each statement
/// is a round trip to the server, so a `PgTx` keeps what its transaction has learned, and reads
/// what the rules will ask next with a statement it has to send anyway.
struct PgTx<'t> {
    conn: &'t mut PgConnection,
    /// The queues this transaction holds, with their heads as of the lock and of its own changes
    /// since: whether a new job heads its queue is known without asking.
    heads: std::collections::HashMap<QueueId, Option<i64>>,
    /// Whether the next lock also reads its channel's intake count (an outbound message, whose
    /// rule asks for it right after).
    count_with_lock: bool,
    /// (channel, direction, queued) as read with a lock.
    counted: Option<(String, Direction, i64)>,
    /// (channel, contact, its last effective send) as read by the insert of a job leased with it.
    last_effective: Option<(String, String, Option<i64>)>,
    /// (channel, contact, watermarks) as read by the settle of a delivered outbound job.
    watermarks: Option<(String, String, Vec<Watermark>)>,
    /// The first send to record with the insert of a job leased with it (see [`FirstSends`]),
    /// and what that insert wrote.
    ahead: Option<AheadPlan>,
    written_ahead: Option<(AheadPlan, WrittenAhead)>,
    /// What the next settle puts right of its job's first send recorded ahead.
    settle_ahead: Option<AheadSettled>,
}

impl<'t> PgTx<'t> {
    fn new(conn: &'t mut PgConnection) -> Self {
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
    fn known_head(&self, channel: &str, direction: &str, contact: &str) -> Option<Option<i64>> {
        self.heads.get(&(channel.to_owned(), direction.to_owned(), contact.to_owned())).copied()
    }

    fn remember_head(&mut self, queue: QueueId, head: Option<i64>) {
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
    async fn lock_queue(&mut self, channel: &str, direction: &str, contact: &str) -> StoreResult<Option<i64>> {
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
    async fn lock_queue_of(&mut self, id: i64) -> StoreResult<Option<QueueId>> {
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
    async fn refresh_head(&mut self, queue: &QueueId) -> StoreResult<bool> {
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
    async fn refresh_head_reading_watermarks(&mut self, queue: &QueueId) -> StoreResult<bool> {
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
    async fn lease(&mut self, id: i64, owner: &str, lease_until: i64) -> StoreResult<i64> {
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
                        created_at, updated_at, reserved_until, lease_owner, lease_until, lease_token) \
                        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8, $8, $9, $10, $11, 1) \
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
                        created_at, updated_at, reserved_until) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8, $8, $9) \
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
fn lock_order(mut queues: Vec<QueueId>) -> Vec<QueueId> {
    queues.sort_unstable();
    queues.dedup();
    queues
}

impl Store for Shared {
    fn now(&self) -> i64 {
        now_millis().saturating_add(self.clock_offset.load(Ordering::Relaxed))
    }

    fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn watch_queue(&self, channel: &str, contact: &str) -> QueueWatch {
        self.changes.watch_queue(channel, contact)
    }

    fn ping(&self) -> BoxFuture<'_, StoreResult<()>> {
        // Ready means intake works: the locks every write of intake and delivery takes (a table
        // a migration, `CREATE INDEX` or `VACUUM FULL` holds makes intake wait, and readiness
        // fail with it), then a real write on a table intake writes, committed like any other.
        let probe = async {
            let mut tx = self.begin().await?;
            sqlx::query(AssertSqlSafe(format!("SET LOCAL lock_timeout = {PING_LOCK_TIMEOUT_MS}")))
                .execute(&mut *tx)
                .await?;
            sqlx::query(
                "LOCK TABLE jobs, channel_queues, contacts, queue_depth, watermarks, echo_marks IN ROW EXCLUSIVE MODE",
            )
            .execute(&mut *tx)
            .await
            .map_err(|e| match e.as_database_error().and_then(|e| e.code()) {
                Some(code) if code == "55P03" => StoreError::Unavailable(format!(
                    "another session holds a lock on the relay's tables for more than {PING_LOCK_TIMEOUT_MS} ms \
                         (a migration, CREATE INDEX or VACUUM FULL?): intake waits for it too"
                )),
                _ => e.into(),
            })?;
            sqlx::query("SELECT relay_count_queued($1, 'outbound', 0)").bind(DEFAULT_CHANNEL).execute(&mut *tx).await?;
            tx.commit().await?;
            Ok::<_, StoreError>(())
        };
        Box::pin(async move {
            match tokio::time::timeout(PING_TIMEOUT, probe).await {
                Ok(done) => done,
                Err(_) => Err(StoreError::Unavailable(format!(
                    "the database did not take a write within {} ms",
                    PING_TIMEOUT.as_millis()
                ))),
            }
        })
    }

    fn enqueue_outbound(&self, job: NewOutbound, first: Option<FirstClaim>) -> BoxFuture<'_, StoreResult<Enqueued>> {
        let payload = encode_payload(&Payload::Send { recipient: job.recipient.clone(), parts: job.parts.clone() });
        let per_contact = self.caps.per_contact;
        Box::pin(async move {
            let prepared = self
                .bounded(async {
                    let mut tx = self.begin().await?;
                    let mut pg = PgTx::new(&mut tx);
                    pg.count_with_lock = true;
                    // The request sends the job's first part right after, when it leases it.
                    pg.ahead = first.as_ref().map(|_| AheadPlan::of(&job, job.now));
                    let enqueued =
                        rules::enqueue_outbound(&mut pg, &job, &payload, first.as_ref(), per_contact).await?;
                    let ahead = pg.written_ahead.take();
                    Ok((tx, enqueued, ahead))
                })
                .await;
            let (tx, stored, ahead) = prepared?;
            let ahead = ahead.map(|(plan, written)| FirstSend {
                job: stored.id,
                channel: job.channel.clone(),
                contact: job.contact.clone(),
                plan,
                written,
                recorded_at: std::time::Instant::now(),
                sent: None,
            });
            let stored_with = |enqueued| {
                if let Some(ahead) = ahead {
                    self.first_sends.add(ahead);
                }
                Ok(enqueued)
            };
            let enqueued = Enqueued {
                id: stored.id,
                claimed: stored.claimed.map(|job| {
                    let release = self.release_on_drop(job.lease());
                    LeasedJob::new(job, release)
                }),
            };
            // Only a job nobody took needs a worker: one the request took, or reserved for it,
            // does not.
            let notify = first.is_none();
            match self.bounded(self.commit(tx, notify)).await {
                Ok(()) => stored_with(enqueued),
                Err(e) => {
                    // The answer to COMMIT was lost: the job may be stored. BonyChat must hear
                    // 200 if it is (a 503 would make it send the message again), 503 if not.
                    tracing::warn!(m_id = %job.m_id, error = %e, "a commit's outcome is unknown; checking");
                    match self.confirm_stored(&job.m_id).await {
                        Ok(true) => stored_with(enqueued),
                        Ok(false) => Err(e),
                        Err(unknown) => {
                            tracing::error!(m_id = %job.m_id, error = %unknown,
                                "cannot tell whether a message was stored; answering 503 (it may be delivered as well)");
                            Err(e)
                        }
                    }
                }
            }
        })
    }

    fn enqueue_inbound(&self, batch: InboundBatch) -> BoxFuture<'_, StoreResult<InboundSummary>> {
        let prepared = PreparedBatch::new(batch);
        Box::pin(self.bounded(async move {
            let mut tx = self.begin().await?;
            let summary = rules::enqueue_inbound(&mut PgTx::new(&mut tx), &prepared).await?;
            // Meta redelivers a batch answered 503: a lost commit answer costs nothing but a
            // duplicate the unique keys drop.
            self.commit(tx, summary.queued + summary.receipts > 0).await?;
            Ok(summary)
        }))
    }

    fn claim(&self, claim: Claim) -> BoxFuture<'_, StoreResult<Vec<Job>>> {
        Box::pin(self.bounded(async move {
            if claim.limit == 0 {
                return Ok(Vec::new());
            }
            let channels: Vec<&str> = claim.channels.iter().map(String::as_str).collect();
            let after = self.rotation.after(claim.direction);
            let mut tx = self.begin().await?;
            let rows = sqlx::query(AssertSqlSafe(format!(
                "{CLAIM_IN_TURNS} \
                 SELECT {JOB_COLUMNS}, {CONTACT_COLUMNS} FROM leased j \
                 LEFT JOIN contacts c ON c.channel = j.channel AND c.direction = j.direction AND c.contact = j.contact \
                 ORDER BY j.id"
            )))
            .bind(claim.direction.as_str())
            .bind(claim.now)
            .bind(i64::try_from(claim.limit).unwrap_or(i64::MAX))
            .bind(&claim.owner)
            .bind(claim.lease_until)
            .bind(&channels)
            .bind(&after)
            .bind(i64::try_from(claim.per_channel).unwrap_or(i64::MAX))
            .fetch_all(&mut *tx)
            .await?;
            tx.commit().await?;
            let jobs = rows
                .iter()
                .map(|row| {
                    let mut job = job_from_row(row, claim.now, true)?;
                    job.in_flight = true;
                    Ok(job)
                })
                .collect::<StoreResult<Vec<Job>>>()?;
            let last = super::last_in_turns(jobs.iter().map(|job| job.channel.as_str()), after.as_deref());
            self.rotation.left_off(claim.direction, last);
            Ok(jobs)
        }))
    }

    fn claim_own(
        &self,
        owner: &str,
        id: i64,
        now: i64,
        lease_until: i64,
    ) -> BoxFuture<'_, StoreResult<Option<LeasedJob>>> {
        let owner = owner.to_owned();
        Box::pin(self.bounded(async move {
            let mut tx = self.begin().await?;
            // Its queue's lock, unless another transaction holds it: then it is not our turn yet.
            let head: Option<(Option<i64>, String, String, String)> = sqlx::query_as(
                "SELECT q.head_id, q.channel, q.direction, q.contact FROM jobs j \
                 JOIN channel_queues q ON q.channel = j.channel AND q.direction = j.direction AND q.contact = j.contact \
                 WHERE j.id = $1 AND j.state = 'queued' AND j.next_attempt_at <= $2 FOR UPDATE OF q SKIP LOCKED",
            )
            .bind(id)
            .bind(now)
            .fetch_optional(&mut *tx)
            .await?;
            let Some((Some(head_id), channel, direction, contact)) = head else { return Ok(None) };
            if head_id != id {
                return Ok(None);
            }
            let in_flight = sqlx::query(
                "SELECT 1 FROM jobs WHERE state = 'queued' AND channel = $1 AND direction = $2 AND contact = $3 \
                 AND lease_owner IS NOT NULL AND lease_until > $4 LIMIT 1",
            )
            .bind(&channel)
            .bind(&direction)
            .bind(&contact)
            .bind(now)
            .fetch_optional(&mut *tx)
            .await?;
            if in_flight.is_some() {
                return Ok(None);
            }
            PgTx::new(&mut tx).lease(id, &owner, lease_until).await?;
            let row = sqlx::query(AssertSqlSafe(format!(
                "SELECT {JOB_COLUMNS}, {CONTACT_COLUMNS} FROM jobs j \
                 LEFT JOIN contacts c ON c.channel = j.channel AND c.direction = j.direction AND c.contact = j.contact \
                 WHERE j.id = $1"
            )))
            .bind(id)
            .fetch_one(&mut *tx)
            .await?;
            let job = job_from_row(&row, now, true)?;
            tx.commit().await?;
            let release = self.release_on_drop(job.lease());
            Ok(Some(LeasedJob::new(job, release)))
        }))
    }

    fn renew(&self, leases: Vec<Lease>, lease_until: i64) -> BoxFuture<'_, StoreResult<Vec<Lease>>> {
        Box::pin(self.bounded(async move {
            let mut tx = self.begin().await?;
            let mut renewed_leases = Vec::with_capacity(leases.len());
            for lease in leases {
                let Some(queue) = PgTx::new(&mut tx).lock_queue_of(lease.id).await? else { continue };
                let renewed = sqlx::query(
                    "UPDATE jobs SET lease_until = $1 WHERE id = $2 AND lease_token = $3 AND lease_owner IS NOT NULL",
                )
                .bind(lease_until)
                .bind(lease.id)
                .bind(lease.token)
                .execute(&mut *tx)
                .await?;
                if renewed.rows_affected() == 1 {
                    PgTx::new(&mut tx).refresh_head(&queue).await?;
                    renewed_leases.push(lease);
                }
            }
            tx.commit().await?;
            Ok(renewed_leases)
        }))
    }

    fn release(&self, owner: &str) -> BoxFuture<'_, StoreResult<u64>> {
        let owner = owner.to_owned();
        Box::pin(self.bounded(async move {
            let mut tx = self.begin().await?;
            let queues: Vec<QueueId> =
                sqlx::query_as("SELECT DISTINCT channel, direction, contact FROM jobs WHERE lease_owner = $1")
                    .bind(&owner)
                    .fetch_all(&mut *tx)
                    .await?;
            let mut released = 0;
            for queue in lock_order(queues) {
                let (channel, direction, contact) = &queue;
                PgTx::new(&mut tx).lock_queue(channel, direction, contact).await?;
                released += sqlx::query(
                    "UPDATE jobs SET lease_owner = NULL, lease_until = NULL \
                     WHERE lease_owner = $1 AND channel = $2 AND direction = $3 AND contact = $4",
                )
                .bind(&owner)
                .bind(channel)
                .bind(direction)
                .bind(contact)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                PgTx::new(&mut tx).refresh_head(&queue).await?;
            }
            self.commit(tx, released > 0).await?;
            Ok(released)
        }))
    }

    fn before_send(&self, send: BeforeSend) -> BoxFuture<'_, StoreResult<()>> {
        Box::pin(self.bounded(async move {
            let spare_mark = match self.first_sends.before_send(&send) {
                Ahead::Covered => return Ok(()),
                Ahead::Record { spare_mark } => spare_mark,
            };
            // Need not be on disk (see the trait): the commit does not wait for the WAL flush,
            // which is said with the BEGIN rather than in a round trip of its own.
            let mut tx = self.pool.begin_with("BEGIN; SET LOCAL synchronous_commit = off").await?;
            rules::record_send(&mut PgTx::new(&mut tx), &send).await?;
            if let Some(mark) = spare_mark {
                // One echo mark per send: the one recorded ahead for a send that left too late is
                // replaced by this one.
                sqlx::query("DELETE FROM echo_marks WHERE id = $1").bind(mark).execute(&mut *tx).await?;
            }
            tx.commit().await?;
            Ok(())
        }))
    }

    fn record_progress(&self, lease: Lease, progress: u32, now: i64) -> BoxFuture<'_, StoreResult<()>> {
        Box::pin(self.bounded(async move {
            let recorded = sqlx::query(
                "UPDATE jobs SET progress = $1, updated_at = $2 \
                 WHERE id = $3 AND lease_token = $4 AND lease_owner IS NOT NULL",
            )
            .bind(progress_value(progress))
            .bind(now)
            .bind(lease.id)
            .bind(lease.token)
            .execute(&self.pool)
            .await?;
            if recorded.rows_affected() == 0 {
                return Err(StoreError::Conflict(format!("job {} is no longer leased under this claim", lease.id)));
            }
            Ok(())
        }))
    }

    fn finish(&self, lease: Lease, finish: Finish, now: i64) -> BoxFuture<'_, StoreResult<()>> {
        Box::pin(self.bounded(async move {
            let mut tx = self.begin().await?;
            let mut pg = PgTx::new(&mut tx);
            pg.settle_ahead = self.first_sends.take(lease.id).map(FirstSend::settled);
            let settled = rules::finish(&mut pg, lease, &finish, now).await?;
            // A contact with more queued has its next job claimable now, by any replica, and a
            // request waiting for it may take it; the usual finish has no news for anyone.
            let news = match (settled.queued || settled.receipt, settled.direction) {
                (false, _) => None,
                (true, Direction::Outbound) => {
                    Some(News::QueueMoved { channel: &settled.channel, contact: &settled.contact })
                }
                (true, Direction::Inbound) => Some(News::Work),
            };
            self.commit_announcing(tx, news).await
        }))
    }

    /// Applies `op` to the channel's bucket row, locked for this transaction only, on the
    /// database's clock: every replica's sends come out of the one bucket.
    fn send_rate(&self, channel: &str, op: RateOp, max_per_sec: u32) -> BoxFuture<'_, StoreResult<Grant>> {
        let channel = channel.to_owned();
        Box::pin(self.bounded(async move {
            let fresh = Bucket::new(max_per_sec, self.now());
            let mut tx = self.pool.begin().await?;
            // Creates the row on first use; either way locks it and reads it.
            type Row = (f64, i64, f64, i64, i64, i64, f64, i64);
            let (rate, rate_at, tokens, tokens_at, paused_until, halved_at, ceiling, now): Row = sqlx::query_as(
                "INSERT INTO send_rates (channel, rate, rate_at, tokens, tokens_at, paused_until, halved_at, ceiling) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
                 ON CONFLICT (channel) DO UPDATE SET channel = send_rates.channel \
                 RETURNING rate, rate_at, tokens, tokens_at, paused_until, halved_at, ceiling, \
                 (extract(epoch FROM clock_timestamp()) * 1000)::bigint",
            )
            .bind(&channel)
            .bind(fresh.rate)
            .bind(fresh.rate_at)
            .bind(fresh.tokens)
            .bind(fresh.tokens_at)
            .bind(fresh.paused_until)
            .bind(fresh.halved_at)
            .bind(fresh.ceiling)
            .fetch_one(&mut *tx)
            .await?;
            let mut bucket = Bucket { rate, rate_at, tokens, tokens_at, paused_until, halved_at, ceiling };
            let grant = bucket.apply(op, max_per_sec, now);
            sqlx::query(
                "UPDATE send_rates SET rate = $2, rate_at = $3, tokens = $4, tokens_at = $5, paused_until = $6, \
                 halved_at = $7, ceiling = $8 WHERE channel = $1",
            )
            .bind(&channel)
            .bind(bucket.rate)
            .bind(bucket.rate_at)
            .bind(bucket.tokens)
            .bind(bucket.tokens_at)
            .bind(bucket.paused_until)
            .bind(bucket.halved_at)
            .bind(bucket.ceiling)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(grant)
        }))
    }

    fn mark_introduced(&self, channel: &str, contact: &str) -> BoxFuture<'_, StoreResult<()>> {
        let (channel, contact) = (channel.to_owned(), contact.to_owned());
        Box::pin(self.bounded(async move {
            sqlx::query(
                "INSERT INTO contacts (channel, direction, contact, introduced) VALUES ($1, 'inbound', $2, true) \
                 ON CONFLICT (channel, direction, contact) DO UPDATE SET introduced = true",
            )
            .bind(&channel)
            .bind(&contact)
            .execute(&self.pool)
            .await?;
            Ok(())
        }))
    }

    fn queue_failed_receipt(
        &self,
        channel: &str,
        contact: &str,
        m_id: &str,
        reason: &str,
        now: i64,
    ) -> BoxFuture<'_, StoreResult<()>> {
        let (channel, contact) = (channel.to_owned(), contact.to_owned());
        let (m_id, reason) = (m_id.to_owned(), reason.to_owned());
        Box::pin(self.bounded(async move {
            let mut tx = self.begin().await?;
            rules::queue_failed_receipt(&mut PgTx::new(&mut tx), &channel, &contact, &m_id, &reason, now).await?;
            self.commit(tx, true).await
        }))
    }

    fn list(
        &self,
        state: Option<JobState>,
        channel: Option<&str>,
        limit: usize,
    ) -> BoxFuture<'_, StoreResult<Vec<Job>>> {
        let channel = channel.map(str::to_owned);
        Box::pin(self.bounded(async move {
            let now = self.now();
            let rows = sqlx::query(AssertSqlSafe(format!(
                "SELECT {JOB_COLUMNS} FROM jobs j WHERE ($1::text IS NULL OR j.state = $1) \
                 AND ($2::text IS NULL OR j.channel = $2) ORDER BY j.id DESC LIMIT $3"
            )))
            .bind(state.map(JobState::as_str))
            .bind(channel)
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&self.pool)
            .await?;
            rows.iter().map(|row| job_from_row(row, now, false)).collect()
        }))
    }

    fn retry(&self, id: i64, now: i64) -> BoxFuture<'_, StoreResult<Job>> {
        Box::pin(self.bounded(async move {
            let mut tx = self.begin().await?;
            let job = rules::retry(&mut PgTx::new(&mut tx), id, now).await?;
            self.commit(tx, true).await?;
            Ok(job)
        }))
    }

    fn redrive_dead(&self, now: i64, channel: Option<&str>, limit: usize) -> BoxFuture<'_, StoreResult<u64>> {
        let channel = channel.map(str::to_owned);
        Box::pin(self.bounded(async move {
            let mut tx = self.begin().await?;
            let dead: Vec<(i64, String, String, String)> = sqlx::query_as(
                "SELECT id, channel, direction, contact FROM jobs WHERE state = 'dead' \
                 AND ($1::text IS NULL OR channel = $1) ORDER BY id LIMIT $2",
            )
            .bind(channel)
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&mut *tx)
            .await?;
            let ids: Vec<i64> = dead.iter().map(|(id, ..)| *id).collect();
            let queues = lock_order(
                dead.into_iter().map(|(_, channel, direction, contact)| (channel, direction, contact)).collect(),
            );
            for (channel, direction, contact) in &queues {
                PgTx::new(&mut tx).lock_queue(channel, direction, contact).await?;
            }
            let redriven = sqlx::query(
                "UPDATE jobs SET state = 'queued', attempts = 0, next_attempt_at = $1, updated_at = $1 \
                 WHERE id = ANY($2) AND state = 'dead'",
            )
            .bind(now)
            .bind(&ids)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            for queue in &queues {
                PgTx::new(&mut tx).refresh_head(queue).await?;
            }
            self.commit(tx, redriven > 0).await?;
            Ok(redriven)
        }))
    }

    fn prune(&self, before: i64, now: i64, limit: usize) -> BoxFuture<'_, StoreResult<u64>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        Box::pin(self.bounded(async move {
            let mut tx = self.begin().await?;
            // SKIP LOCKED throughout: pruning never waits for, nor holds up, live work.
            let jobs = sqlx::query(
                "DELETE FROM jobs WHERE id IN (SELECT id FROM jobs \
                 WHERE state IN ('delivered', 'rejected', 'dropped') AND updated_at < $1 LIMIT $2 FOR UPDATE SKIP LOCKED)",
            )
            .bind(before)
            .bind(limit)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            sqlx::query(
                "DELETE FROM echo_marks WHERE id IN (SELECT id FROM echo_marks WHERE expires_at <= $1 \
                 LIMIT $2 FOR UPDATE SKIP LOCKED)",
            )
            .bind(now)
            .bind(limit)
            .execute(&mut *tx)
            .await?;
            sqlx::query(
                "DELETE FROM watermarks WHERE (channel, contact, status) IN (SELECT channel, contact, status \
                 FROM watermarks WHERE updated_at < $1 LIMIT $2 FOR UPDATE SKIP LOCKED)",
            )
            .bind(before)
            .bind(limit)
            .execute(&mut *tx)
            .await?;
            sqlx::query(
                "DELETE FROM channel_queues WHERE (channel, direction, contact) IN \
                 (SELECT channel, direction, contact FROM channel_queues \
                  WHERE head_id IS NULL LIMIT $1 FOR UPDATE SKIP LOCKED)",
            )
            .bind(limit)
            .execute(&mut *tx)
            .await?;
            // The intake counts of connections (migration 0005), folded into shard 0 so that the
            // sum read on intake stays a few rows; rows of transactions still open are skipped,
            // and their connections' next change makes them a new row if this one took theirs.
            sqlx::query(
                "WITH folded AS (DELETE FROM queue_depth WHERE (channel, direction, shard) IN \
                    (SELECT channel, direction, shard FROM queue_depth WHERE shard <> 0 \
                     AND (SELECT pg_try_advisory_xact_lock($2)) LIMIT $1 FOR UPDATE SKIP LOCKED) \
                  RETURNING channel, direction, queued) \
                 INSERT INTO queue_depth (channel, direction, shard, queued) \
                 SELECT channel, direction, 0, SUM(queued) FROM folded GROUP BY channel, direction \
                 ON CONFLICT (channel, direction, shard) DO UPDATE SET queued = queue_depth.queued + excluded.queued",
            )
            .bind(limit)
            .bind(FOLD_LOCK)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(jobs)
        }))
    }

    fn queue_counts(&self, now: i64) -> BoxFuture<'_, StoreResult<Vec<(String, Direction, QueueCounts)>>> {
        Box::pin(self.bounded(async move {
            let queued: Vec<(String, String, i64, i64, i64)> = sqlx::query_as(
                "SELECT channel, direction, \
                 COUNT(*) FILTER (WHERE lease_owner IS NULL AND next_attempt_at <= $1), \
                 COUNT(*) FILTER (WHERE lease_owner IS NULL AND next_attempt_at > $1), \
                 COUNT(*) FILTER (WHERE lease_owner IS NOT NULL) \
                 FROM jobs WHERE state = 'queued' GROUP BY channel, direction",
            )
            .bind(now)
            .fetch_all(&self.pool)
            .await?;
            let dead: Vec<(String, String, i64)> = sqlx::query_as(
                "SELECT channel, direction, COUNT(*) FROM jobs WHERE state = 'dead' GROUP BY channel, direction",
            )
            .fetch_all(&self.pool)
            .await?;
            let queued = queued
                .into_iter()
                .map(|(channel, direction, ready, delayed, in_flight)| {
                    (channel, direction, [ready, delayed, in_flight])
                })
                .collect();
            Ok(super::assemble_counts(queued, dead))
        }))
    }
}

/// Runs a store operation in a task of its own: a caller that goes away (a client hanging up)
/// never cuts a transaction short between two statements, so a connection goes back to the
/// pool only after its COMMIT or ROLLBACK. Like the SQLite writer's operations once started,
/// the operation finishes whether or not anyone still waits for it.
fn detached<T: Send + 'static>(
    operation: impl Future<Output = StoreResult<T>> + Send + 'static,
) -> BoxFuture<'static, StoreResult<T>> {
    let task = tokio::spawn(operation);
    Box::pin(async move {
        task.await.unwrap_or_else(|e| Err(StoreError::Unavailable(format!("a store operation failed: {e}"))))
    })
}

impl Store for PostgresStore {
    fn now(&self) -> i64 {
        self.shared.now()
    }

    fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.shared.changes()
    }

    fn watch_queue(&self, channel: &str, contact: &str) -> QueueWatch {
        self.shared.watch_queue(channel, contact)
    }

    fn ping(&self) -> BoxFuture<'_, StoreResult<()>> {
        let shared = self.shared.clone();
        detached(async move { shared.ping().await })
    }

    fn enqueue_outbound(&self, job: NewOutbound, first: Option<FirstClaim>) -> BoxFuture<'_, StoreResult<Enqueued>> {
        let shared = self.shared.clone();
        detached(async move { shared.enqueue_outbound(job, first).await })
    }

    fn enqueue_inbound(&self, batch: InboundBatch) -> BoxFuture<'_, StoreResult<InboundSummary>> {
        let shared = self.shared.clone();
        detached(async move { shared.enqueue_inbound(batch).await })
    }

    fn claim(&self, claim: Claim) -> BoxFuture<'_, StoreResult<Vec<Job>>> {
        let shared = self.shared.clone();
        detached(async move { shared.claim(claim).await })
    }

    fn claim_own(
        &self,
        owner: &str,
        id: i64,
        now: i64,
        lease_until: i64,
    ) -> BoxFuture<'_, StoreResult<Option<LeasedJob>>> {
        let (shared, owner) = (self.shared.clone(), owner.to_owned());
        detached(async move { shared.claim_own(&owner, id, now, lease_until).await })
    }

    fn renew(&self, leases: Vec<Lease>, lease_until: i64) -> BoxFuture<'_, StoreResult<Vec<Lease>>> {
        let shared = self.shared.clone();
        detached(async move { shared.renew(leases, lease_until).await })
    }

    fn release(&self, owner: &str) -> BoxFuture<'_, StoreResult<u64>> {
        let (shared, owner) = (self.shared.clone(), owner.to_owned());
        detached(async move { shared.release(&owner).await })
    }

    fn before_send(&self, send: BeforeSend) -> BoxFuture<'_, StoreResult<()>> {
        let shared = self.shared.clone();
        detached(async move { shared.before_send(send).await })
    }

    fn record_progress(&self, lease: Lease, progress: u32, now: i64) -> BoxFuture<'_, StoreResult<()>> {
        let shared = self.shared.clone();
        detached(async move { shared.record_progress(lease, progress, now).await })
    }

    fn finish(&self, lease: Lease, finish: Finish, now: i64) -> BoxFuture<'_, StoreResult<()>> {
        let shared = self.shared.clone();
        detached(async move { shared.finish(lease, finish, now).await })
    }

    fn mark_introduced(&self, channel: &str, contact: &str) -> BoxFuture<'_, StoreResult<()>> {
        let (shared, channel, contact) = (self.shared.clone(), channel.to_owned(), contact.to_owned());
        detached(async move { shared.mark_introduced(&channel, &contact).await })
    }

    fn queue_failed_receipt(
        &self,
        channel: &str,
        contact: &str,
        m_id: &str,
        reason: &str,
        now: i64,
    ) -> BoxFuture<'_, StoreResult<()>> {
        let shared = self.shared.clone();
        let (channel, contact) = (channel.to_owned(), contact.to_owned());
        let (m_id, reason) = (m_id.to_owned(), reason.to_owned());
        detached(async move { shared.queue_failed_receipt(&channel, &contact, &m_id, &reason, now).await })
    }

    fn list(
        &self,
        state: Option<JobState>,
        channel: Option<&str>,
        limit: usize,
    ) -> BoxFuture<'_, StoreResult<Vec<Job>>> {
        let (shared, channel) = (self.shared.clone(), channel.map(str::to_owned));
        detached(async move { shared.list(state, channel.as_deref(), limit).await })
    }

    fn retry(&self, id: i64, now: i64) -> BoxFuture<'_, StoreResult<Job>> {
        let shared = self.shared.clone();
        detached(async move { shared.retry(id, now).await })
    }

    fn redrive_dead(&self, now: i64, channel: Option<&str>, limit: usize) -> BoxFuture<'_, StoreResult<u64>> {
        let (shared, channel) = (self.shared.clone(), channel.map(str::to_owned));
        detached(async move { shared.redrive_dead(now, channel.as_deref(), limit).await })
    }

    fn prune(&self, before: i64, now: i64, limit: usize) -> BoxFuture<'_, StoreResult<u64>> {
        let shared = self.shared.clone();
        detached(async move { shared.prune(before, now, limit).await })
    }

    fn queue_counts(&self, now: i64) -> BoxFuture<'_, StoreResult<Vec<(String, Direction, QueueCounts)>>> {
        let shared = self.shared.clone();
        detached(async move { shared.queue_counts(now).await })
    }

    fn send_rate(&self, channel: &str, op: RateOp, max_per_sec: u32) -> BoxFuture<'_, StoreResult<Grant>> {
        let (shared, channel) = (self.shared.clone(), channel.to_owned());
        detached(async move { shared.send_rate(&channel, op, max_per_sec).await })
    }
}
