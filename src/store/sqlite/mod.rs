//! The embedded store: one SQLite file in WAL mode with `synchronous=FULL`, so a commit is on
//! disk (fsync'd) before anyone is told it happened.
//!
//! One writer thread owns the connection (`writer`). Every operation is a closure sent to it;
//! the thread runs all operations waiting at that moment in one transaction, commits once, and
//! only then answers them all. Concurrent requests thus share one fsync: group commit. No
//! operation waits on anything but the database, so no transaction is ever held across an
//! HTTP call.
//!
//! The writer holds in memory what only it changes (`memory`): the contacts' queues, counts,
//! leases, pacing horizons and echo marks. A message costs one INSERT when it is accepted and
//! one UPDATE of its row when its attempt ends; everything else is memory. At a start the
//! queues are read from the queued jobs, and the rest is read back or rebuilt (`recovery`).
//!
//! What a caller is told is what happened on disk:
//! - The queue to the writer is bounded in operations and in payload bytes: past either, new
//!   work is refused at once (503) instead of piling up in memory behind a stalled disk.
//! - A request's operation that the writer has not started within [`ADMISSION_TIMEOUT`], or
//!   whose caller went away, is never started: the caller hears "unavailable" and nothing is
//!   stored. Once started, the caller waits for the commit whatever it takes, so it is never
//!   answered with an error for work that is then committed.
//! - An operation that fails leaves nothing behind, in the file or in the memory; one that may
//!   fail after writing runs in a savepoint of its own.
//! - After every commit the writer checks that the file it writes is still the file at the
//!   configured path. A database removed or replaced under the relay (an operator's `rm`, a
//!   remounted volume) would otherwise take commits into an unlinked file and lose them at the
//!   next start; the store then refuses everything until the relay is restarted on a sound file.
//! - A panic in the writer thread ends the process (exit code 70), so an orchestrator restarts
//!   the relay instead of it living on, unable to store.
//! - One relay per file: the store holds an exclusive lock on `<file>.lock` for its lifetime.

mod memory;
mod open;
mod recovery;
mod tx;
mod writer;

use std::fs::File;
use std::path::Path;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use tokio::sync::{Semaphore, mpsc, oneshot};

use self::memory::{Horizon, Queues, Recent, mark_digest};
use self::open::{OpenError, canonical, lock_exclusively, migrate_to, open_connection};
use self::tx::{RawJob, SqliteTx, lease_job, queue_of};
use self::writer::{ABANDONED, Answer, Ctx, ExitOnPanic, Health, Op, WAITING, Work, Writer};
use super::rules::{self, PreparedBatch};
use super::send_rate::{Grant, RateOp};
use super::{
    AttemptRecord, BeforeSend, Changes, Claim, Direction, Enqueued, Finish, FirstClaim, InboundBatch, InboundSummary,
    IntakeCaps, Job, JobHistory, JobQuery, Lease, LeasedJob, NewOutbound, Payload, QueueCounts, QueueWatch,
    ReleaseOnDrop, Rotation, Store, StoreError, StoreResult, encode_payload, now_millis,
};
use crate::BoxFuture;

/// Operations waiting for the writer at most.
const QUEUE_OPS: usize = 4096;
/// Payload bytes waiting for the writer at most.
const QUEUE_BYTES: usize = 64 * 1024 * 1024;
/// How long a request's write may wait for the writer to start it before it is refused.
pub const ADMISSION_TIMEOUT: Duration = Duration::from_secs(5);
/// How long readiness waits for its probe write to start.
const PING_ADMISSION: Duration = Duration::from_secs(2);
/// A batch running longer than this means a stalled disk: not ready.
const STALLED_AFTER: Duration = Duration::from_secs(2);

/// How the store was opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// A relay: creates and migrates the file, holds it exclusively, restores its memory.
    Relay,
    /// The `jobs` command line beside a running relay: opens an existing, current file as is.
    Tool,
}

pub struct SqliteStore {
    ops: mpsc::Sender<Op>,
    queue_bytes: Arc<Semaphore>,
    health: Arc<Health>,
    commits: Arc<AtomicU64>,
    caps: IntakeCaps,
    mode: Mode,
    /// A read-only connection for reads that scan (listing jobs, counting the queue): WAL lets
    /// them run beside the writer instead of holding up its commits.
    reader: Arc<Mutex<Connection>>,
    /// The writer's memory: locked by the writer while it runs a batch's operations, and by
    /// reads that lay leases over rows.
    queues: Arc<Mutex<Queues>>,
    /// Pacing horizons and echo marks: written by attempts just before they send.
    recent: Arc<Mutex<Recent>>,
    changes: Arc<Changes>,
    rotation: Rotation,
    /// Send rates, in memory: no other process sends for this file's channels.
    send_rates: super::send_rate::MemoryBuckets,
    /// The owner name of the leases given with inserts, shared by all of them.
    owner: Mutex<Option<Arc<str>>>,
    /// Held for the store's lifetime: the lock that keeps a second relay off this file.
    _lock: Option<File>,
}

impl SqliteStore {
    /// Opens (creating the file and its directory) and migrates the database at `path`, after
    /// taking its lock: a second relay on the same file is refused before anything is touched.
    pub async fn open(path: &Path, caps: IntakeCaps) -> StoreResult<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| StoreError::Unavailable(format!("cannot create {}: {e}", dir.display())))?;
        }
        let path = &canonical(path)?;
        let lock = lock_exclusively(path)?;
        Self::start(path, caps, Mode::Relay, Some(lock)).await
    }

    /// Opens an existing, migrated database without creating, migrating or locking it, for
    /// tools that run beside a relay. SQLite's own locking orders their writes with the relay's.
    pub async fn open_existing(path: &Path, caps: IntakeCaps) -> StoreResult<Self> {
        if !path.is_file() {
            return Err(StoreError::Unavailable(format!(
                "no store at {}: the relay creates it on its first start (is RELAY_DATABASE_URL right?)",
                path.display()
            )));
        }
        Self::start(path, caps, Mode::Tool, None).await
    }

    async fn start(path: &Path, caps: IntakeCaps, mode: Mode, lock: Option<File>) -> StoreResult<Self> {
        let (ready_tx, ready_rx) = oneshot::channel();
        let (ops, ops_rx) = mpsc::channel(QUEUE_OPS);
        let commits = Arc::new(AtomicU64::new(0));
        let health = Arc::new(Health::default());
        let queues = Arc::new(Mutex::new(Queues::default()));
        let recent = Arc::new(Mutex::new(Recent::default()));
        let (counted, watched) = (Arc::clone(&commits), Arc::clone(&health));
        let (held_queues, held_recent) = (Arc::clone(&queues), Arc::clone(&recent));
        let owned_path = path.to_owned();
        std::thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || {
                let path = owned_path;
                let _exit_on_panic = ExitOnPanic;
                let opened = open_connection(&path, mode).and_then(|(conn, identity)| {
                    let data_version = restore(&conn, mode, &held_queues, &held_recent)?;
                    Ok((conn, identity, data_version))
                });
                match opened {
                    Ok((conn, identity, data_version)) => {
                        let _ = ready_tx.send(Ok(()));
                        Writer {
                            conn,
                            path,
                            identity,
                            health: watched,
                            commits: counted,
                            queues: held_queues,
                            recent: held_recent,
                            data_version,
                        }
                        .run(ops_rx);
                    }
                    Err(OpenError::Sqlite(e)) => {
                        let _ = ready_tx.send(Err(StoreError::Unavailable(format!("{}: {e}", path.display()))));
                    }
                    Err(OpenError::Refused(e)) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            })
            .map_err(|e| StoreError::Unavailable(format!("cannot start the store thread: {e}")))?;
        ready_rx.await.map_err(|_| StoreError::Unavailable("the store thread stopped".into()))??;
        let reader =
            Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)
                .and_then(|conn| conn.busy_timeout(Duration::from_secs(5)).map(|()| conn))
                .map_err(|e| StoreError::Unavailable(format!("{}: {e}", path.display())))?;
        Ok(Self {
            ops,
            queue_bytes: Arc::new(Semaphore::new(QUEUE_BYTES)),
            health,
            commits,
            caps,
            mode,
            reader: Arc::new(Mutex::new(reader)),
            queues,
            recent,
            changes: Arc::new(Changes::default()),
            rotation: Rotation::default(),
            send_rates: Default::default(),
            owner: Mutex::new(None),
            _lock: lock,
        })
    }

    /// Creates a store at `path` with only the migrations up to schema version `version`, as a
    /// relay of that version left it: for tests of the upgrade from it, never for a relay.
    #[doc(hidden)]
    pub fn create_with_schema_version(path: &Path, version: usize) -> StoreResult<()> {
        let mut conn =
            Connection::open(path).map_err(|e| StoreError::Unavailable(format!("{}: {e}", path.display())))?;
        migrate_to(&mut conn, version)?;
        Ok(())
    }

    /// How many transactions were committed so far: fewer than operations when they share.
    pub fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }

    fn stopped() -> StoreError {
        StoreError::Unavailable("the store writer has stopped".into())
    }

    /// Runs `f` in the next group commit, in a savepoint of its own, and returns its result
    /// once committed: the tests' way to reach the writer's connection.
    #[cfg(test)]
    fn run<T, F>(&self, f: F) -> BoxFuture<'_, StoreResult<T>>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> StoreResult<T> + Send + 'static,
    {
        self.run_in(true, move |ctx| {
            ctx.before_write()?;
            f(ctx.conn)
        })
    }

    /// Runs `f` on the writer's connection and memory in the next group commit; `careful` as
    /// [`Op::careful`].
    fn run_in<T, F>(&self, careful: bool, f: F) -> BoxFuture<'_, StoreResult<T>>
    where
        T: Send + 'static,
        F: FnOnce(&mut Ctx<'_>) -> StoreResult<T> + Send + 'static,
    {
        let (op, rx) = op(careful, f, None, None);
        Box::pin(async move {
            self.ops.send(op).await.map_err(|_| Self::stopped())?;
            rx.await.map_err(|_| Self::stopped())?
        })
    }

    /// Runs the read-only `f` on the reader connection, off the async runtime's threads.
    fn read<T, F>(&self, f: F) -> BoxFuture<'_, StoreResult<T>>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> StoreResult<T> + Send + 'static,
    {
        let reader = Arc::clone(&self.reader);
        Box::pin(async move {
            tokio::task::spawn_blocking(move || f(&reader.lock().expect("the reader connection lock")))
                .await
                .map_err(|e| StoreError::Unavailable(format!("a store read failed: {e}")))?
        })
    }

    /// Runs `f` for a caller who may give up, holding `bytes` of payload: refused at once when
    /// the queue is full, refused unstarted after `admission` (or when the caller's future is
    /// dropped first), and otherwise answered once committed, however long that takes.
    fn run_for_caller<T, F>(
        &self,
        bytes: usize,
        admission: Duration,
        careful: bool,
        f: F,
    ) -> BoxFuture<'_, StoreResult<T>>
    where
        T: Send + 'static,
        F: FnOnce(&mut Ctx<'_>) -> StoreResult<T> + Send + 'static,
    {
        let full = || StoreError::Unavailable("the store is not keeping up: its write queue is full".into());
        let permit = match u32::try_from(bytes)
            .ok()
            .and_then(|n| Arc::clone(&self.queue_bytes).try_acquire_many_owned(n).ok())
        {
            Some(permit) => permit,
            None => return Box::pin(std::future::ready(Err(full()))),
        };
        let state = Arc::new(AtomicU8::new(WAITING));
        let (op, mut rx) = op(careful, f, Some(Arc::clone(&state)), Some(permit));
        if let Err(e) = self.ops.try_send(op) {
            return Box::pin(std::future::ready(Err(match e {
                mpsc::error::TrySendError::Full(_) => full(),
                mpsc::error::TrySendError::Closed(_) => Self::stopped(),
            })));
        }
        // Dropped with the caller's future, polled or not (a client that hung up): an unstarted
        // operation is then never started.
        let abandon = AbandonOnDrop(Arc::clone(&state));
        Box::pin(async move {
            let _abandon = abandon;
            tokio::select! {
                answer = &mut rx => return answer.map_err(|_| Self::stopped())?,
                () = tokio::time::sleep(admission) => {}
            }
            if state.compare_exchange(WAITING, ABANDONED, Ordering::AcqRel, Ordering::Acquire).is_ok() {
                return Err(StoreError::Unavailable(format!(
                    "the store did not take the write within {} ms (a slow or stalled disk); nothing was stored",
                    admission.as_millis()
                )));
            }
            // Started: the outcome, success or failure, is what the disk did.
            rx.await.map_err(|_| Self::stopped())?
        })
    }

    /// Why the store is not fit to take work right now, if it is not.
    fn unfit(&self) -> Option<String> {
        if let Some(reason) = self.health.broken() {
            return Some(reason);
        }
        if self.ops.is_closed() {
            return Some("the store writer has stopped".into());
        }
        let busy_since = self.health.busy_since.load(Ordering::Relaxed);
        let busy_for = now_millis().saturating_sub(busy_since);
        if busy_since != 0 && busy_for > i64::try_from(STALLED_AFTER.as_millis()).unwrap_or(i64::MAX) {
            return Some(format!("one commit has been running for {busy_for} ms (a stalled disk?)"));
        }
        None
    }

    /// The owner name shared by the leases given with inserts.
    fn shared_owner(&self, owner: &str) -> Arc<str> {
        let mut shared = self.owner.lock().expect("owner lock");
        match &*shared {
            Some(name) if &**name == owner => Arc::clone(name),
            _ => Arc::clone(shared.insert(Arc::from(owner))),
        }
    }

    fn releaser(&self) -> Releaser {
        Releaser { ops: self.ops.clone(), changes: Arc::clone(&self.changes) }
    }

    /// Runs `f` like [`Self::run_in`], then tells the workers that jobs may be claimable.
    fn run_then_signal<T, F>(&self, f: F) -> BoxFuture<'_, StoreResult<T>>
    where
        T: Send + 'static,
        F: FnOnce(&mut Ctx<'_>) -> StoreResult<T> + Send + 'static,
    {
        let done = self.run_in(true, f);
        Box::pin(async move {
            let result = done.await;
            if result.is_ok() {
                self.changes.signal();
            }
            result
        })
    }
}

/// Builds the writer's memory as the file has it, on the writer thread before it serves:
/// the queues from the queued jobs, and for a relay the pacing and echo records of the last
/// stop. Returns the file's `data_version` as of then.
fn restore(conn: &Connection, mode: Mode, queues: &Mutex<Queues>, recent: &Mutex<Recent>) -> Result<i64, OpenError> {
    let mut queues = queues.lock().expect("queues lock");
    if mode == Mode::Relay {
        let tx = conn.unchecked_transaction()?;
        recovery::restore(&tx, &mut recent.lock().expect("recent sends lock"), now_millis())?;
        tx.commit()?;
    }
    *queues = recovery::rebuild_queues(conn, &queues)?;
    Ok(conn.query_row("PRAGMA data_version", [], |row| row.get(0))?)
}

/// Builds the operation for `f` and the receiver of its outcome.
fn op<T, F>(
    careful: bool,
    f: F,
    admission: Option<Arc<AtomicU8>>,
    bytes: Option<tokio::sync::OwnedSemaphorePermit>,
) -> (Op, oneshot::Receiver<StoreResult<T>>)
where
    T: Send + 'static,
    F: FnOnce(&mut Ctx<'_>) -> StoreResult<T> + Send + 'static,
{
    let (tx, rx) = oneshot::channel();
    let tx = Arc::new(Mutex::new(Some(tx)));
    let refused = Arc::clone(&tx);
    let work: Work = Box::new(move |ctx| {
        let result = f(ctx);
        let ok = result.is_ok();
        let answer: Answer = Box::new(move |committed| {
            let outcome = match committed {
                Ok(()) => result,
                Err(e) => Err(StoreError::Unavailable(e)),
            };
            if let Some(tx) = tx.lock().expect("answer lock").take() {
                let _ = tx.send(outcome);
            }
        });
        (ok, answer)
    });
    let refuse = Box::new(move |reason: String| {
        if let Some(tx) = refused.lock().expect("answer lock").take() {
            let _ = tx.send(Err(StoreError::Unavailable(reason)));
        }
    });
    (Op { work, admission, refuse, careful, _bytes: bytes }, rx)
}

struct AbandonOnDrop(Arc<AtomicU8>);

impl Drop for AbandonOnDrop {
    fn drop(&mut self) {
        let _ = self.0.compare_exchange(WAITING, ABANDONED, Ordering::AcqRel, Ordering::Acquire);
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        Self::Unavailable(e.to_string())
    }
}

/// Runs a rule of the queue to completion on the writer thread. SQLite's storage operations
/// never wait, so the rule is done at its first poll.
fn run_rule<F: Future>(rule: F) -> F::Output {
    let mut rule = std::pin::pin!(rule);
    match rule.as_mut().poll(&mut std::task::Context::from_waker(std::task::Waker::noop())) {
        std::task::Poll::Ready(output) => output,
        std::task::Poll::Pending => unreachable!("a SQLite store operation waited"),
    }
}

/// Hands leases back through the writer, from wherever a [`LeasedJob`] is dropped (the writer
/// thread itself included: it never waits).
#[derive(Clone)]
struct Releaser {
    ops: mpsc::Sender<Op>,
    changes: Arc<Changes>,
}

impl Releaser {
    fn on_drop(&self, lease: Lease) -> ReleaseOnDrop {
        let this = self.clone();
        ReleaseOnDrop::new(lease, move |lease| this.release(lease))
    }

    fn release(&self, lease: Lease) {
        let changes = Arc::clone(&self.changes);
        let op = unawaited_op(
            move |ctx| {
                let now = now_millis();
                let finish = Finish::Release { progress: 0 };
                run_rule(rules::finish(&mut SqliteTx { ctx, owner: None }, lease, &finish, now)).map(drop)
            },
            move |outcome| {
                if outcome.is_ok() {
                    changes.signal();
                }
            },
        );
        // A full queue means a stalled store: the lease then runs out on its own.
        let _ = self.ops.try_send(op);
    }
}

/// An operation nobody waits for: `then` gets its outcome, its own error or the commit's.
fn unawaited_op(
    work: impl FnOnce(&mut Ctx<'_>) -> StoreResult<()> + Send + 'static,
    then: impl FnOnce(Result<(), String>) + Send + 'static,
) -> Op {
    let work: Work = Box::new(move |ctx| {
        let result = work(ctx);
        let ok = result.is_ok();
        let answer: Answer = Box::new(move |committed| then(result.map_err(|e| e.to_string()).and(committed)));
        (ok, answer)
    });
    Op { work, admission: None, refuse: Box::new(|_| {}), careful: false, _bytes: None }
}

/// The statement of [`Store::find`] for `query`, and its values: only the filters given, so
/// that each shape has its plan through an index (the newest ids, `jobs_dead`, `jobs_m_id` or
/// `jobs_contact`).
fn find_sql(query: &JobQuery) -> (String, Vec<rusqlite::types::Value>) {
    use rusqlite::types::Value;
    let mut conditions = Vec::new();
    let mut values = Vec::new();
    if let Some(search) = &query.search {
        values.push(Value::Text(search.clone()));
        conditions.push(format!("(j.m_id = ?{n} OR j.contact = ?{n})", n = values.len()));
    }
    if let Some(state) = query.state {
        // Written out, not bound: the partial index of dead jobs serves only a literal state.
        conditions.push(format!("j.state = '{}'", state.as_str()));
    }
    if let Some(channel) = &query.channel {
        values.push(Value::Text(channel.clone()));
        conditions.push(format!("j.channel = ?{}", values.len()));
    }
    if let Some(direction) = query.direction {
        conditions.push(format!("j.direction = '{}'", direction.as_str()));
    }
    if let Some(before) = query.before {
        values.push(Value::Integer(before));
        conditions.push(format!("j.id < ?{}", values.len()));
    }
    values.push(Value::Integer(i64::try_from(query.limit).unwrap_or(i64::MAX)));
    let filter = if conditions.is_empty() { String::new() } else { format!("WHERE {}", conditions.join(" AND ")) };
    let sql = format!("SELECT {} FROM jobs j {filter} ORDER BY j.id DESC LIMIT ?{}", tx::JOB_COLUMNS, values.len());
    (sql, values)
}

impl Store for SqliteStore {
    fn now(&self) -> i64 {
        now_millis()
    }

    fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn watch_queue(&self, channel: &str, contact: &str) -> QueueWatch {
        self.changes.watch_queue(channel, contact)
    }

    fn ping(&self) -> BoxFuture<'_, StoreResult<()>> {
        if let Some(reason) = self.unfit() {
            return Box::pin(std::future::ready(Err(StoreError::Unavailable(reason))));
        }
        // A real write, committed and fsync'd like any other: a full disk or a lost file fails it.
        self.run_for_caller(0, PING_ADMISSION, false, |ctx| {
            ctx.before_write()?;
            ctx.conn
                .prepare_cached(
                    "INSERT INTO relay_health (id, checked_at) VALUES (1, ?1) \
                     ON CONFLICT (id) DO UPDATE SET checked_at = excluded.checked_at",
                )?
                .execute([now_millis()])?;
            Ok(())
        })
    }

    fn enqueue_outbound(&self, job: NewOutbound, first: Option<FirstClaim>) -> BoxFuture<'_, StoreResult<Enqueued>> {
        let payload = encode_payload(&Payload::Send { recipient: job.recipient.clone(), parts: job.parts.clone() });
        let per_contact = self.caps.per_contact;
        let release = self.releaser();
        let owner = first.as_ref().map(|first| self.shared_owner(&first.owner));
        // One INSERT, the one write: a job behind others makes itself careful (see `insert_job`).
        let stored = self.run_for_caller(payload.len(), ADMISSION_TIMEOUT, false, move |ctx| {
            let mut tx = SqliteTx { ctx, owner };
            let stored = run_rule(rules::enqueue_outbound(&mut tx, &job, &payload, first.as_ref(), per_contact))?;
            Ok(Enqueued {
                id: stored.id,
                claimed: stored.claimed.map(|job| {
                    let release = release.on_drop(job.lease());
                    LeasedJob::new(job, release)
                }),
            })
        });
        Box::pin(async move {
            let enqueued = stored.await?;
            // A job its request took at once needs no worker.
            if enqueued.claimed.is_none() {
                self.changes.signal();
            }
            Ok(enqueued)
        })
    }

    fn enqueue_inbound(&self, batch: InboundBatch) -> BoxFuture<'_, StoreResult<InboundSummary>> {
        let prepared = PreparedBatch::new(batch);
        let stored = self.run_for_caller(prepared.bytes(), ADMISSION_TIMEOUT, true, move |ctx| {
            run_rule(rules::enqueue_inbound(&mut SqliteTx { ctx, owner: None }, &prepared))
        });
        Box::pin(async move {
            let summary = stored.await?;
            if summary.queued + summary.receipts > 0 {
                self.changes.signal();
            }
            Ok(summary)
        })
    }

    fn claim(&self, claim: Claim) -> BoxFuture<'_, StoreResult<Vec<Job>>> {
        let (direction, after) = (claim.direction, self.rotation.after(claim.direction));
        let owner = self.shared_owner(&claim.owner);
        let claimed = self.run_in(false, move |ctx| {
            if claim.limit == 0 {
                return Ok((Vec::new(), None));
            }
            // `claim.channels` is sorted (see [`Claim`]): a lookup per channel with due heads.
            debug_assert!(claim.channels.is_sorted(), "claims name their channels in order");
            let eligible = |channel: &str| claim.channels.binary_search_by(|name| name.as_str().cmp(channel)).is_ok();
            let per_channel = claim.limit.min(claim.per_channel);
            let due = ctx.queues().due_heads(claim.direction, claim.now, per_channel, eligible);
            let mut queues = std::collections::HashMap::new();
            let channels = due
                .into_iter()
                .map(|(channel, heads)| {
                    let ids = heads.iter().map(|(id, _)| *id).collect();
                    queues.extend(heads);
                    (channel, ids)
                })
                .collect();
            let (ids, last) = super::in_turns(channels, after.as_deref(), claim.limit);
            let mut jobs = Vec::with_capacity(ids.len());
            for id in ids {
                let Some(queue) = queues.remove(&id) else { continue };
                if let Some(job) = lease_job(ctx, &queue, id, &owner, claim.lease_until, claim.now)? {
                    jobs.push(job);
                }
            }
            Ok((jobs, last))
        });
        Box::pin(async move {
            let (jobs, last) = claimed.await?;
            self.rotation.left_off(direction, last);
            jobs.into_iter().map(RawJob::into_job).collect()
        })
    }

    fn claim_own(
        &self,
        owner: &str,
        id: i64,
        now: i64,
        lease_until: i64,
    ) -> BoxFuture<'_, StoreResult<Option<LeasedJob>>> {
        let owner = self.shared_owner(owner);
        let release = self.releaser();
        let claimed = self.run_in(false, move |ctx| {
            // Its reservation is for this very claim: only being due, heading the queue and
            // nothing of the contact in flight count.
            let Some(queue) = queue_of(ctx.conn, &ctx.queues(), id)? else { return Ok(None) };
            if !ctx.queues().claimable_own(&queue, id, now) {
                return Ok(None);
            }
            let Some(job) = lease_job(ctx, &queue, id, &owner, lease_until, now)? else { return Ok(None) };
            // Armed here, on the writer: a caller gone by the time the answer comes still gives
            // the lease back.
            let release = release.on_drop(Lease { id: job.id, token: job.lease_token });
            Ok(Some((job, release)))
        });
        Box::pin(async move {
            let Some((job, release)) = claimed.await? else { return Ok(None) };
            Ok(Some(LeasedJob::new(job.into_job()?, release)))
        })
    }

    fn renew(&self, leases: Vec<Lease>, lease_until: i64) -> BoxFuture<'_, StoreResult<Vec<Lease>>> {
        self.run_in(false, move |ctx| {
            let mut renewed = Vec::with_capacity(leases.len());
            for lease in leases {
                if ctx.queues().lease_of(lease.id).is_some_and(|held| held.token == lease.token) {
                    ctx.queues().set_until(lease.id, lease_until, ctx.journal);
                    renewed.push(lease);
                }
            }
            Ok(renewed)
        })
    }

    fn release(&self, owner: &str) -> BoxFuture<'_, StoreResult<u64>> {
        let owner = owner.to_owned();
        let released = self.run_in(false, move |ctx| {
            let leased = ctx.queues().leased_to(&owner);
            for &id in &leased {
                ctx.queues().unlease(id, ctx.journal);
            }
            Ok(leased.len() as u64)
        });
        Box::pin(async move {
            let released = released.await?;
            self.changes.signal();
            Ok(released)
        })
    }

    fn before_send(&self, send: BeforeSend) -> BoxFuture<'_, StoreResult<()>> {
        // In memory at once: anything stored after this call, such as the echo of this very
        // send, sees the record. It reaches the disk with the attempt's outcome (the horizon)
        // or at the next clean stop (see `recovery`).
        // The digest is taken before the lock: webhooks and other sends wait for it, not for this.
        let mark =
            send.echo_fingerprint.as_ref().map(|fingerprint| mark_digest(&send.channel, &send.contact, fingerprint));
        let mut recent = self.recent.lock().expect("recent sends lock");
        if send.pacing_until > send.effective_at {
            let horizon = Horizon { effective_at: send.effective_at, forget_at: send.pacing_until };
            recent.raise_horizon(&send.channel, &send.contact, horizon);
        }
        if let Some(digest) = mark {
            recent.add_mark(digest, send.echo_expires_at);
        }
        Box::pin(std::future::ready(Ok(())))
    }

    fn record_progress(&self, lease: Lease, progress: u32, now: i64) -> BoxFuture<'_, StoreResult<()>> {
        self.run_in(false, move |ctx| {
            if ctx.queues().lease_of(lease.id).is_none_or(|held| held.token != lease.token) {
                return Err(StoreError::Conflict(format!("job {} is no longer leased under this claim", lease.id)));
            }
            ctx.before_write()?;
            ctx.conn
                .prepare_cached("UPDATE jobs SET progress = ?1, updated_at = ?2 WHERE id = ?3")?
                .execute(params![progress, now, lease.id])?;
            Ok(())
        })
    }

    fn finish(&self, lease: Lease, finish: Finish, now: i64) -> BoxFuture<'_, StoreResult<()>> {
        // One UPDATE of the job's row; a receipt it owes (rare) is the careful part, and a
        // failure there fails the batch rather than leave half of it.
        let settled = self
            .run_in(false, move |ctx| run_rule(rules::finish(&mut SqliteTx { ctx, owner: None }, lease, &finish, now)));
        Box::pin(async move {
            let settled = settled.await?;
            // Only new claimable work wakes the workers: the contact's next job, the job itself
            // handed back or due again, a receipt. Most finishes leave none, and each wake-up
            // costs a claim that reads every channel with queued work.
            if settled.queued || settled.receipt {
                self.changes.signal();
            }
            if settled.direction == Direction::Outbound {
                self.changes.queue_moved(&settled.channel, &settled.contact);
            }
            Ok(())
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
        self.run_then_signal(move |ctx| {
            let mut tx = SqliteTx { ctx, owner: None };
            run_rule(rules::queue_failed_receipt(&mut tx, &channel, &contact, &m_id, &reason, now))
        })
    }

    fn find(&self, query: JobQuery) -> BoxFuture<'_, StoreResult<Vec<Job>>> {
        let queues = Arc::clone(&self.queues);
        self.read(move |conn| {
            let now = now_millis();
            let (sql, values) = find_sql(&query);
            let rows: Vec<RawJob> = conn
                .prepare_cached(&sql)?
                .query_map(rusqlite::params_from_iter(values), RawJob::from_row)?
                .collect::<rusqlite::Result<_>>()?;
            let queues = queues.lock().expect("queues lock");
            rows.into_iter()
                .map(|row| {
                    let held = queues.lease_of(row.id);
                    row.with_lease(held, now).into_job()
                })
                .collect()
        })
    }

    fn job_history(&self, id: i64) -> BoxFuture<'_, StoreResult<Option<JobHistory>>> {
        let queues = Arc::clone(&self.queues);
        self.read(move |conn| {
            let row = conn
                .prepare_cached(&format!("SELECT {} FROM jobs j WHERE j.id = ?1", tx::JOB_COLUMNS))?
                .query_row([id], RawJob::from_row)
                .optional()?;
            let Some(row) = row else { return Ok(None) };
            let held = queues.lock().expect("queues lock").lease_of(id).cloned();
            let job = row.with_lease(held.as_ref(), now_millis()).into_job()?;
            let attempts = conn
                .prepare_cached(
                    "SELECT attempt, at, outcome, status, error FROM attempts WHERE job_id = ?1 ORDER BY id",
                )?
                .query_map([id], |row| {
                    Ok(AttemptRecord {
                        attempt: row.get(0)?,
                        at: row.get(1)?,
                        outcome: row.get(2)?,
                        status: row.get(3)?,
                        error: row.get(4)?,
                    })
                })?
                .collect::<rusqlite::Result<_>>()?;
            Ok(Some(JobHistory { job, attempts }))
        })
    }

    fn retry(&self, id: i64, now: i64) -> BoxFuture<'_, StoreResult<Job>> {
        self.run_then_signal(move |ctx| run_rule(rules::retry(&mut SqliteTx { ctx, owner: None }, id, now)))
    }

    fn redrive_dead(&self, now: i64, channel: Option<&str>, limit: usize) -> BoxFuture<'_, StoreResult<u64>> {
        let channel = channel.map(str::to_owned);
        self.run_then_signal(move |ctx| {
            ctx.before_write()?;
            // The same jobs as the UPDATE below picks, in the same transaction.
            ctx.conn
                .prepare_cached(&format!(
                    "INSERT INTO attempts (job_id, attempt, at, outcome, status, error) \
                     SELECT id, attempts, ?1, '{}', NULL, '{}' FROM jobs \
                     WHERE state = 'dead' AND (?2 IS NULL OR channel = ?2) ORDER BY id LIMIT ?3",
                    rules::REQUEUED,
                    rules::REQUEUED_WHY
                ))?
                .execute(params![now, channel, limit as i64])?;
            let redriven: Vec<(i64, String, String, String)> = ctx
                .conn
                .prepare_cached(
                    "UPDATE jobs SET state = 'queued', attempts = 0, next_attempt_at = ?1, updated_at = ?1 \
                     WHERE id IN (SELECT id FROM jobs WHERE state = 'dead' AND (?2 IS NULL OR channel = ?2) \
                                  ORDER BY id LIMIT ?3) \
                     RETURNING id, channel, direction, contact",
                )?
                .query_map(params![now, channel, limit as i64], |row| {
                    Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
                })?
                .collect::<rusqlite::Result<_>>()?;
            for (id, channel, direction, contact) in &redriven {
                let Some(direction) = Direction::parse(direction) else { continue };
                let queue = ctx.queues().queue_ref(channel, direction, contact);
                let waiting = memory::Waiting { next_attempt_at: now, reserved_until: 0 };
                ctx.queues().queue(&queue, *id, waiting, ctx.journal);
            }
            Ok(redriven.len() as u64)
        })
    }

    fn prune(&self, before: i64, now: i64, limit: usize) -> BoxFuture<'_, StoreResult<u64>> {
        self.run_in(true, move |ctx| {
            ctx.recent().forget_before(now);
            ctx.before_write()?;
            // Each through its own index (migration 0005): a batch reads what it deletes and
            // nothing else, however much history the store holds. The attempts first, of the
            // very jobs the next statement deletes (the same query, in the same transaction).
            ctx.conn
                .prepare_cached(
                    "DELETE FROM attempts WHERE job_id IN (SELECT id FROM jobs \
                     WHERE state IN ('delivered', 'rejected', 'dropped') AND updated_at < ?1 LIMIT ?2)",
                )?
                .execute(params![before, limit as i64])?;
            let jobs = ctx
                .conn
                .prepare_cached(
                    "DELETE FROM jobs WHERE id IN (SELECT id FROM jobs \
                     WHERE state IN ('delivered', 'rejected', 'dropped') AND updated_at < ?1 LIMIT ?2)",
                )?
                .execute(params![before, limit as i64])?;
            ctx.conn
                .prepare_cached(
                    "DELETE FROM watermarks WHERE (channel, contact, status) IN \
                     (SELECT channel, contact, status FROM watermarks WHERE updated_at < ?1 LIMIT ?2)",
                )?
                .execute(params![before, limit as i64])?;
            Ok(jobs as u64)
        })
    }

    fn queue_counts(&self, now: i64) -> BoxFuture<'_, StoreResult<Vec<(String, Direction, QueueCounts)>>> {
        let queues = Arc::clone(&self.queues);
        self.read(move |conn| {
            // Through the partial index `jobs_dead`: the dead jobs only, never the history.
            let dead = conn
                .prepare_cached(
                    "SELECT channel, direction, COUNT(*) FROM jobs WHERE state = 'dead' GROUP BY channel, direction",
                )?
                .query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            let queued = queues.lock().expect("queues lock").counts(now);
            let mut accepted_at = conn.prepare_cached("SELECT created_at FROM jobs WHERE id = ?1")?;
            let queued = queued
                .into_iter()
                .map(|(channel, direction, count, oldest)| {
                    let oldest = accepted_at.query_row([oldest], |row| row.get(0)).optional()?;
                    Ok((channel, direction, count, oldest))
                })
                .collect::<rusqlite::Result<_>>()?;
            Ok(super::assemble_counts(queued, dead))
        })
    }

    fn send_rate(&self, channel: &str, op: RateOp, max_per_sec: u32) -> BoxFuture<'_, StoreResult<Grant>> {
        let grant = self.send_rates.apply(channel, op, max_per_sec, now_millis());
        Box::pin(std::future::ready(Ok(grant)))
    }

    fn close(&self) -> BoxFuture<'_, StoreResult<()>> {
        if self.mode == Mode::Tool {
            return Box::pin(std::future::ready(Ok(())));
        }
        self.run_in(true, |ctx| {
            ctx.before_write()?;
            recovery::save(ctx.conn, &mut ctx.recent(), now_millis())?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::joinchat::{Message, Recipient};

    /// Holds the writer thread inside an operation until the returned sender is used or dropped.
    async fn block_writer(store: &Arc<SqliteStore>) -> std::sync::mpsc::Sender<()> {
        let (release, blocked) = std::sync::mpsc::channel::<()>();
        let (entered_tx, entered) = oneshot::channel();
        let store = Arc::clone(store);
        tokio::spawn(async move {
            store
                .run(move |_| {
                    let _ = entered_tx.send(());
                    let _ = blocked.recv();
                    Ok(())
                })
                .await
        });
        entered.await.unwrap();
        release
    }

    /// An operation on the connection, as the writer runs it.
    fn on_conn<T>(
        f: impl FnOnce(&Connection) -> StoreResult<T> + Send + 'static,
    ) -> impl FnOnce(&mut Ctx<'_>) -> StoreResult<T> + Send + 'static {
        move |ctx| {
            ctx.before_write()?;
            f(ctx.conn)
        }
    }

    fn insert_marker(name: &'static str) -> impl FnOnce(&Connection) -> StoreResult<()> + Send + 'static {
        move |conn| {
            conn.execute("CREATE TABLE IF NOT EXISTS markers (name TEXT)", [])?;
            conn.execute("INSERT INTO markers (name) VALUES (?1)", [name])?;
            Ok(())
        }
    }

    async fn markers(store: &SqliteStore) -> Vec<String> {
        store
            .run(|conn| {
                conn.execute("CREATE TABLE IF NOT EXISTS markers (name TEXT)", [])?;
                Ok(conn
                    .prepare("SELECT name FROM markers ORDER BY rowid")?
                    .query_map([], |row| row.get(0))?
                    .collect::<rusqlite::Result<_>>()?)
            })
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn a_write_the_writer_does_not_start_in_time_is_refused_and_never_stored() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(&dir.path().join("relay.db"), IntakeCaps::DEFAULT).await.unwrap());
        let release = block_writer(&store).await;

        let late = store.run_for_caller(10, Duration::from_millis(100), true, on_conn(insert_marker("late"))).await;
        drop(release);

        assert!(
            matches!(&late, Err(StoreError::Unavailable(reason)) if reason.contains("nothing was stored")),
            "{late:?}"
        );
        assert_eq!(markers(&store).await, Vec::<String>::new());
    }

    #[tokio::test]
    async fn a_write_whose_caller_hung_up_before_it_started_is_never_stored() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(&dir.path().join("relay.db"), IntakeCaps::DEFAULT).await.unwrap());
        let release = block_writer(&store).await;

        let abandoned = store.run_for_caller(10, ADMISSION_TIMEOUT, true, on_conn(insert_marker("abandoned")));
        let kept = store.run_for_caller(10, ADMISSION_TIMEOUT, true, on_conn(insert_marker("kept")));
        // The client went away: its request future is dropped.
        drop(abandoned);
        let (kept, ()) = tokio::join!(kept, async { drop(release) });

        kept.unwrap();
        assert_eq!(markers(&store).await, ["kept"]);
    }

    #[tokio::test]
    async fn a_write_started_before_its_deadline_is_answered_with_its_commit_however_long_it_takes() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("relay.db"), IntakeCaps::DEFAULT).await.unwrap();
        let (release, blocked) = std::sync::mpsc::channel::<()>();

        let slow = store.run_for_caller(
            10,
            Duration::from_millis(100),
            true,
            on_conn(move |conn| {
                // Started at once, then the disk takes far longer than the admission deadline.
                let _ = blocked.recv_timeout(Duration::from_millis(400));
                insert_marker("slow")(conn)
            }),
        );
        let (outcome, ()) = tokio::join!(slow, async {
            tokio::time::sleep(Duration::from_millis(150)).await;
            drop(release);
        });

        assert_eq!(outcome, Ok(()));
        assert_eq!(markers(&store).await, ["slow"]);
    }

    #[tokio::test]
    async fn a_full_write_queue_refuses_new_work_at_once_instead_of_holding_it_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(&dir.path().join("relay.db"), IntakeCaps::DEFAULT).await.unwrap());
        let release = block_writer(&store).await;

        // Callers that hung up during a stall leave their operations queued: they are bounded.
        let mut refused = 0;
        for _ in 0..QUEUE_OPS + 10 {
            // A zero timeout polls the write once: a refusal is ready at once, a queued write is not.
            let write = store.run_for_caller(10, ADMISSION_TIMEOUT, true, |_| Ok(()));
            if let Ok(Err(StoreError::Unavailable(reason))) = tokio::time::timeout(Duration::ZERO, write).await
                && reason.contains("queue is full")
            {
                refused += 1;
            }
        }
        let too_big = store.run_for_caller(QUEUE_BYTES + 1, ADMISSION_TIMEOUT, true, |_| Ok(())).await;
        drop(release);

        assert_eq!(refused, 10, "exactly what did not fit in the queue is refused");
        assert!(matches!(too_big, Err(StoreError::Unavailable(reason)) if reason.contains("queue is full")));
    }

    #[tokio::test]
    async fn listing_and_counting_jobs_do_not_wait_for_the_writer() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(&dir.path().join("relay.db"), IntakeCaps::DEFAULT).await.unwrap());
        let release = block_writer(&store).await;

        let listed = tokio::time::timeout(Duration::from_secs(2), store.list(None, None, 10)).await;
        let counted = tokio::time::timeout(Duration::from_secs(2), store.queue_counts(0)).await;
        drop(release);

        assert!(matches!(listed, Ok(Ok(_))), "{listed:?}");
        assert!(matches!(counted, Ok(Ok(_))), "{counted:?}");
    }

    #[tokio::test]
    async fn a_panic_in_the_writer_thread_ends_the_process() {
        const CHILD: &str = "RELAY_TEST_WRITER_PANIC_DIR";
        if let Some(dir) = std::env::var_os(CHILD) {
            let store = SqliteStore::open(&Path::new(&dir).join("relay.db"), IntakeCaps::DEFAULT).await.unwrap();
            let _ = store.run(|_| -> StoreResult<()> { panic!("a bug in a store operation") }).await;
            // Only reached if the process lived on.
            tokio::time::sleep(Duration::from_secs(5)).await;
            std::process::exit(0);
        }
        let dir = tempfile::tempdir().unwrap();
        let child = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "store::sqlite::tests::a_panic_in_the_writer_thread_ends_the_process", "--nocapture"])
            .env(CHILD, dir.path())
            .output()
            .unwrap();

        let stderr = String::from_utf8_lossy(&child.stderr);
        assert_eq!(child.status.code(), Some(70), "{stderr}");
        assert!(stderr.contains("the store writer thread panicked"), "{stderr}");
    }

    #[tokio::test]
    async fn concurrent_writes_share_commits() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(&dir.path().join("relay.db"), IntakeCaps::DEFAULT).await.unwrap());
        let before = store.commits();

        let writes: Vec<_> = (0..200)
            .map(|i| {
                let store = Arc::clone(&store);
                tokio::spawn(async move {
                    let job = crate::store::NewOutbound {
                        channel: crate::store::DEFAULT_CHANNEL.into(),
                        max_queued: u64::MAX,
                        m_id: format!("m{i}"),
                        contact: format!("c{i}"),
                        recipient: Recipient::Id(format!("c{i}")),
                        parts: vec![Message::Text { text: "hi".into() }],
                        now: 1,
                        trace_context: None,
                    };
                    store.enqueue_outbound(job, None).await.unwrap();
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
        let store = SqliteStore::open(&dir.path().join("relay.db"), IntakeCaps::DEFAULT).await.unwrap();

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

    /// A store last written by schema 3, with a message in flight when that relay died, is
    /// upgraded in place: the message is handed out again, and the index the upgrade drops is
    /// gone. (The contract tests upgrade a store of the schema just before the current one.)
    #[tokio::test]
    async fn a_store_of_schema_3_is_upgraded_with_its_message_in_flight() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("relay.db");
        let now = now_millis();
        SqliteStore::create_with_schema_version(&path, 3).unwrap();
        let payload = encode_payload(&Payload::Send {
            recipient: Recipient::Id("c1".into()),
            parts: vec![Message::Text { text: "hi".into() }],
        });
        // Leased, as by an attempt still running when the relay died.
        Connection::open(&path)
            .unwrap()
            .execute(
                "INSERT INTO jobs (direction, contact, m_id, payload, state, next_attempt_at, created_at, updated_at, \
                 lease_owner, lease_until, lease_token) \
                 VALUES ('outbound', 'c1', 'm1', ?1, 'queued', ?2, ?2, ?2, 'gone', ?3, 1)",
                params![payload, now, now + 60_000],
            )
            .unwrap();

        let store = SqliteStore::open(&path, IntakeCaps::DEFAULT).await.unwrap();
        let claim = Claim {
            owner: "next".into(),
            direction: Direction::Outbound,
            now,
            lease_until: now + 60_000,
            limit: 10,
            channels: Arc::from([crate::store::DEFAULT_CHANNEL.to_owned()]),
            per_channel: 10,
        };
        let claimed = store.claim(claim).await.unwrap();

        assert_eq!(
            claimed.iter().map(|job| (job.channel.as_str(), job.m_id.as_str())).collect::<Vec<_>>(),
            [("default", "m1")]
        );
        let indexes: i64 = store
            .run(|conn| {
                Ok(conn
                    .query_row("SELECT COUNT(*) FROM sqlite_master WHERE name = 'jobs_leased'", [], |row| row.get(0))?)
            })
            .await
            .unwrap();
        assert_eq!(indexes, 0);
    }

    #[test]
    fn heads_are_taken_in_turns_going_round_the_channels() {
        let channels = || {
            vec![
                ("busy".to_owned(), (1..=5).collect()),
                ("calm".to_owned(), vec![11, 12]),
                ("quiet".to_owned(), vec![21]),
            ]
        };

        let first = crate::store::in_turns(channels(), None, 6);
        let after_busy = crate::store::in_turns(channels(), Some("busy"), 6);
        let after_quiet = crate::store::in_turns(channels(), Some("quiet"), 2);

        assert_eq!(first, (vec![1, 11, 21, 2, 12, 3], Some("busy".into())));
        assert_eq!(after_busy, (vec![11, 21, 1, 12, 2, 3], Some("busy".into())));
        assert_eq!(after_quiet, (vec![1, 11], Some("calm".into())));
        let last = crate::store::last_in_turns(["calm", "busy", "quiet", "busy", "calm"].into_iter(), Some("busy"));
        assert_eq!(last, Some("busy".into()), "second turn: calm, then busy");
    }
}
