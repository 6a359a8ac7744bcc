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
//!   `first_sends`) and the outcome (the lock and the job's state, with the record ahead put
//!   right; then the queue's head, with the contact's watermarks).
//! - **The database away.** Acquiring a connection is bounded by the connect timeout, each
//!   statement by the statement timeout, so requests get 503 and workers back off; the pool
//!   reconnects by itself once the database is back.
//!
//! Lock order, the same everywhere so that transactions never deadlock: a contact's
//! `channel_queues` row, then its job rows; outbound before inbound.

use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use sqlx::{AssertSqlSafe, PgPool, Postgres, Transaction};

use super::rules::{self, PreparedBatch};
use super::send_rate::{Bucket, Grant, RateOp};
use super::{
    AttemptRecord, BeforeSend, Changes, Claim, DEFAULT_CHANNEL, Direction, Enqueued, Finish, FirstClaim, InboundBatch,
    InboundSummary, IntakeCaps, Job, JobHistory, JobQuery, Lease, LeasedJob, NewOutbound, Payload, QueueCounts,
    QueueWatch, ReleaseOnDrop, Rotation, Store, StoreError, StoreResult, encode_payload, now_millis,
};
use crate::BoxFuture;
use crate::config::PostgresOptions;

mod background;
mod connect;
mod first_sends;
mod schema;
mod tx;

use background::{keep_clock, listen, measure_offset, moved_payload};
use connect::{Diagnosis, NO_CONNECTION, connect_failure};
use first_sends::{Ahead, AheadPlan, FirstSend, FirstSends};
use schema::{check_version, migrate, migrate_to};
use tx::{CLAIM_IN_TURNS, CONTACT_COLUMNS, JOB_COLUMNS, PgTx, QueueId, job_from_row, lock_order, progress_value};

/// Held while folding intake counts (see `prune`): two replicas folding at once would take the
/// rows of shard 0 in their own orders, and could deadlock.
const FOLD_LOCK: i64 = 0x626f_6e79_666f_6c64;
/// The `NOTIFY` channel new work is announced on (no relation to the relay's channels).
const CHANNEL: &str = "bonychat_relay_jobs";
/// How long readiness waits for its probe write.
const PING_TIMEOUT: Duration = Duration::from_millis(1900);
/// How long readiness waits for a connection from the pool, and then for one of its own to
/// say why there was none: together within [`PING_TIMEOUT`].
const PING_ACQUIRE: Duration = Duration::from_millis(1000);
const PING_DIAGNOSIS: Duration = Duration::from_millis(800);
/// How long a transaction may sit idle between two statements before the server ends its
/// session and releases its locks (`idle_in_transaction_session_timeout`, in ms).
const DEAD_SESSION_AFTER_MS: &str = "3000";
/// How long readiness waits for the locks intake takes (ms): a table locked by a migration or a
/// `VACUUM FULL` makes the replica not ready, as it makes intake fail.
const PING_LOCK_TIMEOUT_MS: &str = "1000";
/// How long to keep trying to learn whether a commit whose answer was lost took effect.
const CONFIRM_FOR: Duration = Duration::from_secs(5);

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
    /// Says why no connection could be had, when the pool only says it timed out.
    diagnosis: Arc<Diagnosis>,
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
        match e {
            // The pool's own words hide why: the store's operations ask the database instead
            // (connect.rs).
            sqlx::Error::PoolTimedOut => Self::Unavailable(NO_CONNECTION.to_owned()),
            e => Self::Unavailable(format!("the database failed: {e}")),
        }
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
        let diagnosis = Arc::new(Diagnosis::new(connect.clone(), options.pool_size, options.connect_timeout));
        let pool = PgPoolOptions::new()
            .max_connections(options.pool_size)
            .acquire_timeout(options.connect_timeout)
            // A ping before every transaction would cost a round trip each; a connection that
            // a database restart cut fails its one transaction instead (503), and is dropped.
            .test_before_acquire(false)
            .connect_lazy_with(connect.clone());
        // The first connection, as the pool opens it: retried while the server refuses (it may
        // be starting beside the relay) for the connect timeout, then the database's reason.
        let refused = match pool.acquire().await {
            // Back to the pool, for the migration to take.
            Ok(_connection) => None,
            Err(sqlx::Error::PoolTimedOut) => {
                Some(diagnosis.why(&pool, options.connect_timeout, options.connect_timeout).await)
            }
            Err(e) => Some(connect_failure(&connect, &e)),
        };
        if let Some(reason) = refused {
            return Err(StoreError::Unavailable(reason));
        }
        let prepared = async {
            match mode {
                Mode::Relay => migrate(&pool).await?,
                Mode::Tool => check_version(&pool).await?,
            }
            measure_offset(&pool).await
        };
        let clock_offset = Arc::new(AtomicI64::new(diagnosis.explain(&pool, prepared.await).await?));
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
            diagnosis,
        };
        Ok(Self { shared, _background: background })
    }
}

impl Shared {
    /// Now on the database's clock, in ms: every replica's lease times are on it.
    fn now(&self) -> i64 {
        now_millis().saturating_add(self.clock_offset.load(Ordering::Relaxed))
    }

    /// Settles a leased job's attempt ([`Store::finish`]).
    async fn finish(&self, lease: Lease, finish: Finish, now: i64) -> StoreResult<()> {
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
    }

    /// Hands `lease` back, due now, when dropped unused (see [`LeasedJob`]): from a task of its
    /// own, since it may be dropped anywhere.
    fn release_on_drop(&self, lease: Lease) -> ReleaseOnDrop {
        let (shared, runtime) = (self.clone(), tokio::runtime::Handle::current());
        ReleaseOnDrop::new(lease, move |lease| {
            runtime.spawn(async move {
                let now = shared.now();
                if let Err(e) = shared.bounded(shared.finish(lease, Finish::Release { progress: 0 }, now)).await {
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

/// What a commit announces to every replica.
enum News<'a> {
    /// Jobs may have become claimable.
    Work,
    /// That too, and the outbound queue of `contact` in `channel` moved on: a `/message` request
    /// waiting for it may take its job.
    QueueMoved { channel: &'a str, contact: &'a str },
}

impl Store for PostgresStore {
    fn now(&self) -> i64 {
        self.shared.now()
    }

    fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.shared.changes.subscribe()
    }

    fn watch_queue(&self, channel: &str, contact: &str) -> QueueWatch {
        self.shared.changes.watch_queue(channel, contact)
    }

    fn ping(&self) -> BoxFuture<'_, StoreResult<()>> {
        // Ready means intake works: the locks every write of intake and delivery takes (a table
        // a migration, `CREATE INDEX` or `VACUUM FULL` holds makes intake wait, and readiness
        // fail with it), then a real write on a table intake writes, committed like any other.
        self.spawn(|s| async move {
            let probe = async {
                // Readiness is asked every few seconds and answers within two: the pool is given
                // a part of that, and the rest goes to finding out why it had no connection.
                let mut connection = match tokio::time::timeout(PING_ACQUIRE, s.pool.acquire()).await {
                    Ok(connection) => connection?,
                    Err(_) => {
                        return Err(StoreError::Unavailable(
                            s.diagnosis.why(&s.pool, PING_ACQUIRE, PING_DIAGNOSIS).await,
                        ));
                    }
                };
                let mut tx = sqlx::Connection::begin(&mut *connection).await?;
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
                sqlx::query("SELECT relay_count_queued($1, 'outbound', 0)")
                    .bind(DEFAULT_CHANNEL)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok::<_, StoreError>(())
            };
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
        let per_contact = self.shared.caps.per_contact;
        self.spawn(move |s| async move {
            let prepared = s
                .bounded(async {
                    let mut tx = s.begin().await?;
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
                    s.first_sends.add(ahead);
                }
                Ok(enqueued)
            };
            let enqueued = Enqueued {
                id: stored.id,
                claimed: stored.claimed.map(|job| {
                    let release = s.release_on_drop(job.lease());
                    LeasedJob::new(job, release)
                }),
            };
            // Only a job nobody took needs a worker: one the request took, or reserved for it,
            // does not.
            let notify = first.is_none();
            match s.bounded(s.commit(tx, notify)).await {
                Ok(()) => stored_with(enqueued),
                Err(e) => {
                    // The answer to COMMIT was lost: the job may be stored. BonyChat must hear
                    // 200 if it is (a 503 would make it send the message again), 503 if not.
                    tracing::warn!(m_id = %job.m_id, error = %e, "a commit's outcome is unknown; checking");
                    match s.confirm_stored(&job.m_id).await {
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
        self.run(move |s| async move {
            let mut tx = s.begin().await?;
            let summary = rules::enqueue_inbound(&mut PgTx::new(&mut tx), &prepared).await?;
            // Meta redelivers a batch answered 503: a lost commit answer costs nothing but a
            // duplicate the unique keys drop.
            s.commit(tx, summary.queued + summary.receipts > 0).await?;
            Ok(summary)
        })
    }

    fn claim(&self, claim: Claim) -> BoxFuture<'_, StoreResult<Vec<Job>>> {
        self.run(move |s| async move {
            if claim.limit == 0 {
                return Ok(Vec::new());
            }
            let channels: Vec<&str> = claim.channels.iter().map(String::as_str).collect();
            let after = s.rotation.after(claim.direction);
            let mut tx = s.begin().await?;
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
            s.rotation.left_off(claim.direction, last);
            Ok(jobs)
        })
    }

    fn claim_own(
        &self,
        owner: &str,
        id: i64,
        now: i64,
        lease_until: i64,
    ) -> BoxFuture<'_, StoreResult<Option<LeasedJob>>> {
        let owner = owner.to_owned();
        self.run(move |s| async move {
            let mut tx = s.begin().await?;
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
            let release = s.release_on_drop(job.lease());
            Ok(Some(LeasedJob::new(job, release)))
        })
    }

    fn renew(&self, leases: Vec<Lease>, lease_until: i64) -> BoxFuture<'_, StoreResult<Vec<Lease>>> {
        self.run(move |s| async move {
            let mut tx = s.begin().await?;
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
        })
    }

    fn release(&self, owner: &str) -> BoxFuture<'_, StoreResult<u64>> {
        let owner = owner.to_owned();
        self.run(move |s| async move {
            let mut tx = s.begin().await?;
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
            s.commit(tx, released > 0).await?;
            Ok(released)
        })
    }

    fn before_send(&self, send: BeforeSend) -> BoxFuture<'_, StoreResult<()>> {
        self.run(move |s| async move {
            let spare_mark = match s.first_sends.before_send(&send) {
                Ahead::Covered => return Ok(()),
                Ahead::Record { spare_mark } => spare_mark,
            };
            // Need not be on disk (see the trait): the commit does not wait for the WAL flush,
            // which is said with the BEGIN rather than in a round trip of its own.
            let mut tx = s.pool.begin_with("BEGIN; SET LOCAL synchronous_commit = off").await?;
            rules::record_send(&mut PgTx::new(&mut tx), &send).await?;
            if let Some(mark) = spare_mark {
                // One echo mark per send: the one recorded ahead for a send that left too late is
                // replaced by this one.
                sqlx::query("DELETE FROM echo_marks WHERE id = $1").bind(mark).execute(&mut *tx).await?;
            }
            tx.commit().await?;
            Ok(())
        })
    }

    fn record_progress(&self, lease: Lease, progress: u32, now: i64) -> BoxFuture<'_, StoreResult<()>> {
        self.run(move |s| async move {
            let recorded = sqlx::query(
                "UPDATE jobs SET progress = $1, updated_at = $2 \
                 WHERE id = $3 AND lease_token = $4 AND lease_owner IS NOT NULL",
            )
            .bind(progress_value(progress))
            .bind(now)
            .bind(lease.id)
            .bind(lease.token)
            .execute(&s.pool)
            .await?;
            if recorded.rows_affected() == 0 {
                return Err(StoreError::Conflict(format!("job {} is no longer leased under this claim", lease.id)));
            }
            Ok(())
        })
    }

    fn finish(&self, lease: Lease, finish: Finish, now: i64) -> BoxFuture<'_, StoreResult<()>> {
        self.run(move |s| async move { s.finish(lease, finish, now).await })
    }

    /// Applies `op` to the channel's bucket row, locked for this transaction only, on the
    /// database's clock: every replica's sends come out of the one bucket.
    fn send_rate(&self, channel: &str, op: RateOp, max_per_sec: u32) -> BoxFuture<'_, StoreResult<Grant>> {
        let channel = channel.to_owned();
        self.run(move |s| async move {
            let fresh = Bucket::new(max_per_sec, s.now());
            let mut tx = s.pool.begin().await?;
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
        })
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
        self.run(move |s| async move {
            let mut tx = s.begin().await?;
            rules::queue_failed_receipt(&mut PgTx::new(&mut tx), &channel, &contact, &m_id, &reason, now).await?;
            s.commit(tx, true).await
        })
    }

    fn find(&self, query: JobQuery) -> BoxFuture<'_, StoreResult<Vec<Job>>> {
        self.run(move |s| async move {
            let now = s.now();
            // Only the filters given, so that each shape is planned through its index.
            let mut conditions = Vec::new();
            let mut n = 0;
            let mut next = || {
                n += 1;
                n
            };
            if query.search.is_some() {
                let n = next();
                conditions.push(format!("(j.m_id = ${n} OR j.contact = ${n})"));
            }
            if let Some(state) = query.state {
                conditions.push(format!("j.state = '{}'", state.as_str()));
            }
            if query.channel.is_some() {
                conditions.push(format!("j.channel = ${}", next()));
            }
            if let Some(direction) = query.direction {
                conditions.push(format!("j.direction = '{}'", direction.as_str()));
            }
            if query.before.is_some() {
                conditions.push(format!("j.id < ${}", next()));
            }
            let limit = next();
            let filter =
                if conditions.is_empty() { String::new() } else { format!("WHERE {}", conditions.join(" AND ")) };
            let sql = format!("SELECT {JOB_COLUMNS} FROM jobs j {filter} ORDER BY j.id DESC LIMIT ${limit}");
            let mut statement = sqlx::query(AssertSqlSafe(sql));
            if let Some(search) = &query.search {
                statement = statement.bind(search);
            }
            if let Some(channel) = &query.channel {
                statement = statement.bind(channel);
            }
            if let Some(before) = query.before {
                statement = statement.bind(before);
            }
            let rows = statement.bind(i64::try_from(query.limit).unwrap_or(i64::MAX)).fetch_all(&s.pool).await?;
            rows.iter().map(|row| job_from_row(row, now, false)).collect()
        })
    }

    fn job_history(&self, id: i64) -> BoxFuture<'_, StoreResult<Option<JobHistory>>> {
        self.run(move |s| async move {
            let now = s.now();
            let row = sqlx::query(AssertSqlSafe(format!("SELECT {JOB_COLUMNS} FROM jobs j WHERE j.id = $1")))
                .bind(id)
                .fetch_optional(&s.pool)
                .await?;
            let Some(row) = row else { return Ok(None) };
            let job = job_from_row(&row, now, false)?;
            let attempts: Vec<(i32, i64, String, Option<i32>, String)> = sqlx::query_as(
                "SELECT attempt, at, outcome, status, error FROM attempts WHERE job_id = $1 ORDER BY id",
            )
            .bind(id)
            .fetch_all(&s.pool)
            .await?;
            let attempts = attempts
                .into_iter()
                .map(|(attempt, at, outcome, status, error)| AttemptRecord {
                    attempt: u32::try_from(attempt).unwrap_or(0),
                    at,
                    outcome,
                    status: status.and_then(|status| u16::try_from(status).ok()),
                    error,
                })
                .collect();
            Ok(Some(JobHistory { job, attempts }))
        })
    }

    fn retry(&self, id: i64, now: i64) -> BoxFuture<'_, StoreResult<Job>> {
        self.run(move |s| async move {
            let mut tx = s.begin().await?;
            let job = rules::retry(&mut PgTx::new(&mut tx), id, now).await?;
            s.commit(tx, true).await?;
            Ok(job)
        })
    }

    fn redrive_dead(&self, now: i64, channel: Option<&str>, limit: usize) -> BoxFuture<'_, StoreResult<u64>> {
        let channel = channel.map(str::to_owned);
        self.run(move |s| async move {
            let mut tx = s.begin().await?;
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
            sqlx::query(
                "INSERT INTO attempts (job_id, attempt, at, outcome, status, error) \
                 SELECT id, attempts, $1, $3, NULL, $4 FROM jobs WHERE id = ANY($2) AND state = 'dead'",
            )
            .bind(now)
            .bind(&ids)
            .bind(rules::REQUEUED)
            .bind(rules::REQUEUED_WHY)
            .execute(&mut *tx)
            .await?;
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
            s.commit(tx, redriven > 0).await?;
            Ok(redriven)
        })
    }

    fn prune(&self, before: i64, now: i64, limit: usize) -> BoxFuture<'_, StoreResult<u64>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.run(move |s| async move {
            let mut tx = s.begin().await?;
            // SKIP LOCKED throughout: pruning never waits for, nor holds up, live work.
            let jobs: i64 = sqlx::query_scalar(
                "WITH gone AS (DELETE FROM jobs WHERE id IN (SELECT id FROM jobs \
                 WHERE state IN ('delivered', 'rejected', 'dropped') AND updated_at < $1 LIMIT $2 FOR UPDATE SKIP LOCKED) \
                 RETURNING id), \
                 attempts_gone AS (DELETE FROM attempts WHERE job_id IN (SELECT id FROM gone)) \
                 SELECT COUNT(*) FROM gone",
            )
            .bind(before)
            .bind(limit)
            .fetch_one(&mut *tx)
            .await?;
            let jobs = u64::try_from(jobs).unwrap_or(0);
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
        })
    }

    fn queue_counts(&self, now: i64) -> BoxFuture<'_, StoreResult<Vec<(String, Direction, QueueCounts)>>> {
        self.run(move |s| async move {
            let queued: Vec<(String, String, i64, i64, i64, Option<i64>)> = sqlx::query_as(
                "SELECT channel, direction, \
                 COUNT(*) FILTER (WHERE lease_owner IS NULL AND next_attempt_at <= $1), \
                 COUNT(*) FILTER (WHERE lease_owner IS NULL AND next_attempt_at > $1), \
                 COUNT(*) FILTER (WHERE lease_owner IS NOT NULL), MIN(created_at) \
                 FROM jobs WHERE state = 'queued' GROUP BY channel, direction",
            )
            .bind(now)
            .fetch_all(&s.pool)
            .await?;
            let dead: Vec<(String, String, i64)> = sqlx::query_as(
                "SELECT channel, direction, COUNT(*) FROM jobs WHERE state = 'dead' GROUP BY channel, direction",
            )
            .fetch_all(&s.pool)
            .await?;
            let queued = queued
                .into_iter()
                .map(|(channel, direction, ready, delayed, in_flight, oldest)| {
                    (channel, direction, [ready, delayed, in_flight], oldest)
                })
                .collect();
            Ok(super::assemble_counts(queued, dead))
        })
    }
}

impl PostgresStore {
    /// Runs a store operation in a task of its own, within the operation timeout: a caller
    /// that goes away (a client hanging up) never cuts a transaction short between two
    /// statements, so a connection goes back to the pool only after its COMMIT or ROLLBACK.
    /// Like the SQLite writer's operations once started, the operation finishes whether or not
    /// anyone still waits for it.
    fn run<T, F>(&self, operation: impl FnOnce(Shared) -> F) -> BoxFuture<'static, StoreResult<T>>
    where
        T: Send + 'static,
        F: Future<Output = StoreResult<T>> + Send + 'static,
    {
        let shared = self.shared.clone();
        let operation = operation(shared.clone());
        detached(async move {
            let result = shared.bounded(operation).await;
            shared.diagnosis.explain(&shared.pool, result).await
        })
    }

    /// [`Self::run`] for an operation that bounds its own steps.
    fn spawn<T, F>(&self, operation: impl FnOnce(Shared) -> F) -> BoxFuture<'static, StoreResult<T>>
    where
        T: Send + 'static,
        F: Future<Output = StoreResult<T>> + Send + 'static,
    {
        let shared = self.shared.clone();
        let operation = operation(shared.clone());
        detached(async move {
            let result = operation.await;
            shared.diagnosis.explain(&shared.pool, result).await
        })
    }
}

fn detached<T: Send + 'static>(
    operation: impl Future<Output = StoreResult<T>> + Send + 'static,
) -> BoxFuture<'static, StoreResult<T>> {
    let task = tokio::spawn(operation);
    Box::pin(async move {
        task.await.unwrap_or_else(|e| Err(StoreError::Unavailable(format!("a store operation failed: {e}"))))
    })
}
