//! The embedded store: one SQLite file in WAL mode with `synchronous=FULL`, so a commit is on
//! disk (fsync'd) before anyone is told it happened.
//!
//! One writer thread owns the connection. Every operation is a closure sent to it; the thread
//! runs all operations waiting at that moment in one transaction, each in its own savepoint
//! (so one failing operation does not undo the others), commits once, and only then answers
//! them all. Concurrent requests thus share one fsync: group commit. No operation waits on
//! anything but the database, so no transaction is ever held across an HTTP call.
//!
//! What a caller is told is what happened on disk:
//! - The queue to the writer is bounded in operations and in payload bytes: past either, new
//!   work is refused at once (503) instead of piling up in memory behind a stalled disk.
//! - A request's operation that the writer has not started within [`ADMISSION_TIMEOUT`], or
//!   whose caller went away, is never started: the caller hears "unavailable" and nothing is
//!   stored. Once started, the caller waits for the commit whatever it takes, so it is never
//!   answered with an error for work that is then committed.
//! - After every commit the writer checks that the file it writes is still the file at the
//!   configured path. A database removed or replaced under the relay (an operator's `rm`, a
//!   remounted volume) would otherwise take commits into an unlinked file and lose them at the
//!   next start; the store then refuses everything until the relay is restarted on a sound file.
//! - A panic in the writer thread ends the process (exit code 70), so an orchestrator restarts
//!   the relay instead of it living on, unable to store.
//! - One relay per file: the store holds an exclusive lock on `<file>.lock` for its lifetime.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rusqlite::{Connection, OpenFlags, OptionalExtension, Row, TransactionBehavior, params};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};

use super::rules::{self, Inserted, NewRow, PreparedBatch, Settle, Settled, Tx, status_name};
use super::send_rate::{Grant, RateOp};
use super::{
    BeforeSend, Changes, Claim, Direction, Enqueued, Finish, FirstClaim, InboundBatch, InboundSummary, IntakeCaps, Job,
    JobState, Lease, LeasedJob, NewOutbound, Payload, QueueCounts, QueueWatch, ReleaseOnDrop, Rotation, Store,
    StoreError, StoreResult, decode_payload, encode_payload, now_millis,
};
use crate::clients::BoxFuture;
use crate::domain::bonychat::StatusValue;

const MIGRATIONS: &[&str] = &[
    include_str!("../../migrations/sqlite/0001_init.sql"),
    include_str!("../../migrations/sqlite/0002_intake.sql"),
    include_str!("../../migrations/sqlite/0003_fencing.sql"),
    include_str!("../../migrations/sqlite/0004_lean_writes.sql"),
    include_str!("../../migrations/sqlite/0005_history_and_watermarks.sql"),
    include_str!("../../migrations/sqlite/0006_channels.sql"),
    include_str!("../../migrations/sqlite/0007_contact_first_keys.sql"),
];

/// Operations committed together at most; bounds the latency a large batch adds.
const MAX_BATCH: usize = 512;
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

/// Runs inside the transaction; says whether it succeeded (else its savepoint is rolled back)
/// and how to answer its caller once the commit is known.
type Work = Box<dyn FnOnce(&Connection) -> (bool, Answer) + Send>;
type Answer = Box<dyn FnOnce(Result<(), String>) + Send>;

/// Where a caller's operation stands; the writer and the caller race for it once.
const WAITING: u8 = 0;
const STARTED: u8 = 1;
const ABANDONED: u8 = 2;

struct Op {
    work: Work,
    /// Set for operations a caller may give up on (requests); the writer starts the operation
    /// only if it moves this from WAITING to STARTED first.
    admission: Option<Arc<AtomicU8>>,
    /// Refuses the operation without running it: the caller hears `reason`.
    refuse: Box<dyn FnOnce(String) + Send>,
    /// The payload bytes this operation holds in the queue, given back once it is done.
    _bytes: Option<OwnedSemaphorePermit>,
}

/// What the writer knows about its own health, read by readiness.
#[derive(Default)]
struct Health {
    /// Set for good when the store can no longer be trusted (file replaced, writer gone).
    broken: Mutex<Option<String>>,
    /// When the running batch started (ms since the epoch), 0 when idle.
    busy_since: AtomicI64,
}

impl Health {
    fn broken(&self) -> Option<String> {
        self.broken.lock().expect("health lock").clone()
    }

    fn break_for_good(&self, reason: String) {
        let mut broken = self.broken.lock().expect("health lock");
        if broken.is_none() {
            tracing::error!(reason = %reason, "the store can no longer be trusted; refusing all work until restarted");
            *broken = Some(reason);
        }
    }
}

/// How the store was opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// A relay: creates and migrates the file, holds it exclusively, rebuilds its ready queue.
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
    /// A read-only connection for reads that scan (listing jobs, counting the queue): WAL lets
    /// them run beside the writer instead of holding up its commits.
    reader: Arc<Mutex<Connection>>,
    changes: Arc<Changes>,
    rotation: Rotation,
    /// Send rates, in memory: no other process sends for this file's channels.
    send_rates: super::send_rate::MemoryBuckets,
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
        let (counted, watched) = (Arc::clone(&commits), Arc::clone(&health));
        let owned_path = path.to_owned();
        std::thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || {
                let path = owned_path;
                let _exit_on_panic = ExitOnPanic;
                match open_connection(&path, mode) {
                    Ok((conn, identity)) => {
                        let _ = ready_tx.send(Ok(()));
                        Writer { conn, path, identity, health: watched, commits: counted }.run(ops_rx);
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
            reader: Arc::new(Mutex::new(reader)),
            changes: Arc::new(Changes::default()),
            rotation: Rotation::default(),
            send_rates: Default::default(),
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

    /// Runs `f` in the next group commit and returns its result once committed. For the
    /// relay's own bookkeeping: it waits for room in the queue and is never abandoned.
    fn run<T, F>(&self, f: F) -> BoxFuture<'_, StoreResult<T>>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> StoreResult<T> + Send + 'static,
    {
        let (op, rx) = op(f, None, None);
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
    fn run_for_caller<T, F>(&self, bytes: usize, admission: Duration, f: F) -> BoxFuture<'_, StoreResult<T>>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> StoreResult<T> + Send + 'static,
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
        let (op, mut rx) = op(f, Some(Arc::clone(&state)), Some(permit));
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
}

/// Builds the operation for `f` and the receiver of its outcome.
fn op<T, F>(
    f: F,
    admission: Option<Arc<AtomicU8>>,
    bytes: Option<OwnedSemaphorePermit>,
) -> (Op, oneshot::Receiver<StoreResult<T>>)
where
    T: Send + 'static,
    F: FnOnce(&Connection) -> StoreResult<T> + Send + 'static,
{
    let (tx, rx) = oneshot::channel();
    let tx = Arc::new(Mutex::new(Some(tx)));
    let refused = Arc::clone(&tx);
    let work: Work = Box::new(move |conn| {
        let result = f(conn);
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
    (Op { work, admission, refuse, _bytes: bytes }, rx)
}

struct AbandonOnDrop(Arc<AtomicU8>);

impl Drop for AbandonOnDrop {
    fn drop(&mut self) {
        let _ = self.0.compare_exchange(WAITING, ABANDONED, Ordering::AcqRel, Ordering::Acquire);
    }
}

/// Ends the process when the writer thread panics: a relay that cannot store must not live on
/// answering 503s forever; its orchestrator restarts it.
struct ExitOnPanic;

impl Drop for ExitOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("bonychat-relay: the store writer thread panicked; exiting so that the relay is restarted");
            std::process::exit(70);
        }
    }
}

/// `path` with its directory's symbolic links resolved (and the file's own, when it exists), so
/// that every relay reaching one database through whatever path takes the same lock.
fn canonical(path: &Path) -> StoreResult<PathBuf> {
    let unresolvable = |e: std::io::Error| StoreError::Unavailable(format!("cannot resolve {}: {e}", path.display()));
    if path.exists() {
        return std::fs::canonicalize(path).map_err(unresolvable);
    }
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name =
        path.file_name().ok_or_else(|| StoreError::Unavailable(format!("{} is not a file path", path.display())))?;
    Ok(std::fs::canonicalize(dir).map_err(unresolvable)?.join(name))
}

/// Takes the exclusive lock of the store at `path`, or says who holds it.
fn lock_exclusively(path: &Path) -> StoreResult<File> {
    let mut lock_path = path.as_os_str().to_owned();
    lock_path.push(".lock");
    let lock_path = PathBuf::from(lock_path);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| StoreError::Unavailable(format!("cannot open the lock file {}: {e}", lock_path.display())))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(StoreError::Unavailable(format!(
            "{} is in use by another relay (it holds {}); one SQLite store serves one relay — stop the other one, or use postgres:// for several replicas",
            path.display(),
            lock_path.display()
        ))),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(StoreError::Unavailable(format!("cannot lock {}: {e}", lock_path.display())))
        }
    }
}

/// The identity of a file: a replaced or removed file no longer has it at its path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileId {
    dev: u64,
    ino: u64,
}

impl FileId {
    fn of(path: &Path) -> std::io::Result<Self> {
        let meta = std::fs::metadata(path)?;
        Ok(Self { dev: meta.dev(), ino: meta.ino() })
    }
}

fn wal_path(path: &Path) -> PathBuf {
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    PathBuf::from(wal)
}

/// The files the writer's connection uses, as they were when it opened them.
struct Identity {
    db: FileId,
    /// Known once the write-ahead log exists.
    wal: Option<FileId>,
}

/// Why the writer's connection could not be opened.
enum OpenError {
    Sqlite(rusqlite::Error),
    /// The file is sound but this relay must not use it (a schema it does not know).
    Refused(StoreError),
}

impl From<rusqlite::Error> for OpenError {
    fn from(e: rusqlite::Error) -> Self {
        Self::Sqlite(e)
    }
}

fn open_connection(path: &Path, mode: Mode) -> Result<(Connection, Identity), OpenError> {
    let flags = match mode {
        Mode::Relay => OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE,
        Mode::Tool => OpenFlags::SQLITE_OPEN_READ_WRITE,
    } | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let mut conn = Connection::open_with_flags(path, flags)?;
    // The `jobs` command line may write beside the relay; each waits for the other's commit.
    conn.busy_timeout(Duration::from_secs(5))?;
    // Every statement the writer runs stays prepared: with rusqlite's default of 16, the 30 or
    // so in rotation evicted each other and were parsed again all the time.
    conn.set_prepared_statement_cache_capacity(64);
    let mode_set: String = conn.query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))?;
    if !mode_set.eq_ignore_ascii_case("wal") {
        return Err(rusqlite::Error::InvalidParameterName(format!("journal_mode stayed {mode_set}, not WAL")).into());
    }
    // FULL: every commit fsyncs the WAL, so it survives power loss, not just a crash.
    conn.execute_batch("PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;")?;
    let version: i64 = conn.query_row("PRAGMA user_version", [], |row| row.get(0))?;
    let known = i64::try_from(MIGRATIONS.len()).unwrap_or(i64::MAX);
    // Checked before anything is written: a relay that went on would take over leases and
    // write rows in a layout it does not know.
    if version > known {
        return Err(OpenError::Refused(StoreError::SchemaTooNew { found: version, known }));
    }
    match mode {
        Mode::Relay => {
            migrate(&mut conn)?;
            take_over(&conn)?;
        }
        Mode::Tool if version != known => {
            return Err(rusqlite::Error::InvalidParameterName(format!(
                "the store has schema version {version}, this bonychat-relay expects {known}; start the matching relay once first"
            ))
            .into());
        }
        Mode::Tool => {}
    }
    let not_a_file = |e: std::io::Error| rusqlite::Error::InvalidParameterName(format!("cannot stat the file: {e}"));
    let identity = Identity { db: FileId::of(path).map_err(not_a_file)?, wal: FileId::of(&wal_path(path)).ok() };
    Ok((conn, identity))
}

fn migrate(conn: &mut Connection) -> rusqlite::Result<()> {
    migrate_to(conn, MIGRATIONS.len())
}

/// Applies the migrations up to schema version `target`.
fn migrate_to(conn: &mut Connection, target: usize) -> rusqlite::Result<()> {
    let version: i64 = conn.query_row("PRAGMA user_version", [], |row| row.get(0))?;
    let pending = MIGRATIONS.iter().take(target);
    for (index, migration) in (0_i64..).zip(pending).skip(usize::try_from(version).unwrap_or(0)) {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute_batch(migration)?;
        tx.pragma_update(None, "user_version", index + 1)?;
        tx.commit()?;
    }
    Ok(())
}

/// Takes over what a previous process left at start: a SQLite store serves one relay (its lock
/// says so), so every lease and every reservation for a waiting request is a leftover of a
/// process that is gone. Then rebuilds the ready queue from the jobs.
fn take_over(conn: &Connection) -> rusqlite::Result<()> {
    let leases = conn.execute(
        "UPDATE jobs SET lease_owner = NULL, lease_until = NULL WHERE state = 'queued' AND lease_owner IS NOT NULL",
        [],
    )?;
    conn.execute("UPDATE jobs SET reserved_until = NULL WHERE state = 'queued' AND reserved_until IS NOT NULL", [])?;
    if leases > 0 {
        tracing::info!(jobs = leases, "took over the jobs a previous process had in flight");
    }
    conn.execute_batch(
        "DELETE FROM queue_heads;
         INSERT INTO queue_heads (channel, direction, contact, job_id, due_at)
         SELECT j.channel, j.direction, j.contact, j.id, j.next_attempt_at
         FROM jobs j JOIN (SELECT MIN(id) AS id FROM jobs WHERE state = 'queued' GROUP BY channel, direction, contact) h
           ON h.id = j.id;",
    )
}

/// One contact's queue in one direction: (channel, direction, contact), as stored.
type QueueId = (String, String, String);

fn queue_from_row(row: &Row<'_>) -> rusqlite::Result<QueueId> {
    Ok((row.get(0)?, row.get(1)?, row.get(2)?))
}

/// Puts the ready-queue row of one (channel, direction, contact) right after its jobs changed:
/// the oldest queued job is the head, claimable at its next attempt, but not while any queued
/// job of the contact is leased (one in flight per contact), nor while it is reserved for the
/// request that stored it.
/// Returns whether the contact still has queued jobs.
fn refresh_head(conn: &Connection, (channel, direction, contact): &QueueId) -> rusqlite::Result<bool> {
    let head: Option<(i64, i64)> = conn
        .prepare_cached(
            "SELECT id, MAX(next_attempt_at, COALESCE(reserved_until, 0)) FROM jobs \
             WHERE state = 'queued' AND channel = ?1 AND direction = ?2 AND contact = ?3 ORDER BY id LIMIT 1",
        )?
        .query_row(params![channel, direction, contact], |row| Ok((row.get(0)?, row.get(1)?)))
        .optional()?;
    let Some((head, next_attempt_at)) = head else {
        conn.prepare_cached("DELETE FROM queue_heads WHERE channel = ?1 AND direction = ?2 AND contact = ?3")?
            .execute(params![channel, direction, contact])?;
        return Ok(false);
    };
    let leased_until: Option<i64> = conn
        .prepare_cached(
            "SELECT MAX(lease_until) FROM jobs WHERE lease_owner IS NOT NULL \
             AND channel = ?1 AND direction = ?2 AND contact = ?3 AND state = 'queued'",
        )?
        .query_row(params![channel, direction, contact], |row| row.get(0))?;
    conn.prepare_cached(
        "INSERT INTO queue_heads (channel, direction, contact, job_id, due_at) VALUES (?1, ?2, ?3, ?4, ?5) \
         ON CONFLICT (channel, direction, contact) DO UPDATE SET job_id = excluded.job_id, due_at = excluded.due_at",
    )?
    .execute(params![channel, direction, contact, head, next_attempt_at.max(leased_until.unwrap_or(0))])?;
    Ok(true)
}

/// The (channel, direction, contact) of job `id`.
fn queue_of(conn: &Connection, id: i64) -> rusqlite::Result<Option<QueueId>> {
    conn.prepare_cached("SELECT channel, direction, contact FROM jobs WHERE id = ?1")?
        .query_row([id], queue_from_row)
        .optional()
}

/// Clears the leases of `owner` and refreshes their queues.
fn clear_leases(conn: &Connection, owner: &str) -> rusqlite::Result<u64> {
    const MATCHING: &str = "lease_owner = ?1";
    let queues: Vec<QueueId> = conn
        .prepare(&format!("SELECT DISTINCT channel, direction, contact FROM jobs WHERE {MATCHING}"))?
        .query_map(params![owner], queue_from_row)?
        .collect::<rusqlite::Result<_>>()?;
    let cleared = conn
        .execute(&format!("UPDATE jobs SET lease_owner = NULL, lease_until = NULL WHERE {MATCHING}"), params![owner])?;
    for queue in &queues {
        refresh_head(conn, queue)?;
    }
    Ok(cleared as u64)
}

/// The writer thread's state.
struct Writer {
    conn: Connection,
    path: PathBuf,
    identity: Identity,
    health: Arc<Health>,
    commits: Arc<AtomicU64>,
}

impl Writer {
    fn run(mut self, mut ops: mpsc::Receiver<Op>) {
        while let Some(first) = ops.blocking_recv() {
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match ops.try_recv() {
                    Ok(op) => batch.push(op),
                    Err(_) => break,
                }
            }
            if let Some(reason) = self.health.broken() {
                for op in batch {
                    (op.refuse)(reason.clone());
                }
                continue;
            }
            self.health.busy_since.store(now_millis(), Ordering::Relaxed);
            let started = Instant::now();
            let operations = batch.len();
            let mut answers = Vec::with_capacity(batch.len());
            let mut committed = run_batch(&mut self.conn, batch, &mut answers).map_err(|e| e.to_string());
            crate::monitoring::store_commit(started.elapsed(), operations);
            match &committed {
                Ok(()) => {
                    self.commits.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => tracing::error!(error = %e, "store commit failed"),
            }
            // What was committed counts only if it went into the file at the configured path.
            if let Err(reason) = self.check_identity() {
                self.health.break_for_good(reason.clone());
                committed = Err(reason);
            }
            self.health.busy_since.store(0, Ordering::Relaxed);
            for answer in answers {
                answer(committed.clone());
            }
        }
    }

    fn check_identity(&mut self) -> Result<(), String> {
        let replaced = |what: &Path, e: Option<std::io::Error>| {
            let how = e.map_or_else(|| "was replaced by another file".to_owned(), |e| format!("is gone ({e})"));
            format!(
                "{} {how} while the relay had it open: nothing written since can be trusted to be on disk; restart the relay on a sound store",
                what.display()
            )
        };
        match FileId::of(&self.path) {
            Ok(id) if id == self.identity.db => {}
            Ok(_) => return Err(replaced(&self.path, None)),
            Err(e) => return Err(replaced(&self.path, Some(e))),
        }
        let wal = wal_path(&self.path);
        match (FileId::of(&wal), self.identity.wal) {
            (Ok(id), Some(known)) if id == known => Ok(()),
            (Ok(_), Some(_)) => Err(replaced(&wal, None)),
            (Err(e), Some(_)) => Err(replaced(&wal, Some(e))),
            (Ok(id), None) => {
                self.identity.wal = Some(id);
                Ok(())
            }
            (Err(_), None) => Ok(()),
        }
    }
}

/// Runs `batch` in one transaction. Operations it could not get to (the transaction failed
/// first) are refused with the error; the others are answered by the caller once the commit's
/// outcome is known.
fn run_batch(conn: &mut Connection, batch: Vec<Op>, answers: &mut Vec<Answer>) -> rusqlite::Result<()> {
    let mut pending = batch.into_iter();
    // BEGIN, COMMIT and savepoints through cached statements: rusqlite's `Transaction` parses
    // its SQL again for every batch.
    let result = conn.prepare_cached("BEGIN IMMEDIATE")?.execute([]).and_then(|_| {
        for op in pending.by_ref() {
            if let Some(state) = &op.admission
                && state.compare_exchange(WAITING, STARTED, Ordering::AcqRel, Ordering::Acquire).is_err()
            {
                // Its caller gave up before it started: it must never be stored.
                (op.refuse)("abandoned by its caller".into());
                continue;
            }
            conn.prepare_cached("SAVEPOINT op")?.execute([])?;
            let (ok, answer) = (op.work)(conn);
            answers.push(answer);
            if !ok {
                conn.prepare_cached("ROLLBACK TO op")?.execute([])?;
            }
            conn.prepare_cached("RELEASE op")?.execute([])?;
        }
        conn.prepare_cached("COMMIT")?.execute([]).map(drop)
    });
    if let Err(e) = &result {
        // A failed COMMIT may leave the transaction open (SQLITE_BUSY, a full disk): undo it.
        if !conn.is_autocommit() {
            let _ = conn.execute_batch("ROLLBACK");
        }
        for op in pending {
            (op.refuse)(format!("commit failed: {e}"));
        }
    }
    result
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        Self::Unavailable(e.to_string())
    }
}

const JOB_COLUMNS: &str = "j.id, j.direction, j.contact, j.m_id, j.state, j.attempts, j.progress, j.next_attempt_at, \
    j.last_error, j.created_at, j.updated_at, j.lease_until, j.payload, j.lease_token, j.channel";

/// A job as read: its payload is still JSON, parsed off the writer thread by `into_job`.
struct RawJob {
    id: i64,
    channel: String,
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
    lease_until: Option<i64>,
    lease_token: i64,
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
        lease_until,
        payload: row.get(12)?,
        lease_token: row.get(13)?,
        channel: row.get(14)?,
        contact_last_effective_at: None,
        contact_introduced: false,
    })
}

/// A job to be claimed, with what its attempt needs to know about its contact.
const CLAIM_COLUMNS: &str = "c.last_effective_at, COALESCE(c.introduced, 0)";

fn claimable_from_row(row: &Row<'_>, now: i64) -> rusqlite::Result<RawJob> {
    let mut job = job_from_row(row, now)?;
    job.contact_last_effective_at = row.get(15)?;
    job.contact_introduced = row.get::<_, i64>(16)? != 0;
    Ok(job)
}

/// Leases job `id` and holds its queue's head for the lease; returns the new fencing token.
fn lease(conn: &Connection, id: i64, owner: &str, lease_until: i64) -> rusqlite::Result<i64> {
    let (token, channel, direction, contact): (i64, String, String, String) = conn
        .prepare_cached(
            "UPDATE jobs SET lease_owner = ?1, lease_until = ?2, lease_token = lease_token + 1 WHERE id = ?3 \
             RETURNING lease_token, channel, direction, contact",
        )?
        .query_row(params![owner, lease_until, id], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?)))?;
    conn.prepare_cached("UPDATE queue_heads SET due_at = ?1 WHERE channel = ?2 AND direction = ?3 AND contact = ?4")?
        .execute(params![lease_until, channel, direction, contact])?;
    Ok(token)
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

/// The storage operations the rules of the queue run on, inside the writer's transaction.
struct SqliteTx<'c>(&'c Connection);

impl Tx for SqliteTx<'_> {
    async fn lock_queues(&mut self, _channel: &str, _direction: Direction, _contacts: &[&str]) -> StoreResult<()> {
        // One writer thread runs every operation in turn: nothing to hold.
        Ok(())
    }

    async fn queued(&mut self, channel: &str, direction: Direction, _cap: u64) -> StoreResult<u64> {
        // Kept by the triggers of migration 0006: one row, whatever the depth.
        let queued: i64 = self
            .0
            .prepare_cached("SELECT queued FROM queue_depth WHERE channel = ?1 AND direction = ?2")?
            .query_row([channel, direction.as_str()], |row| row.get(0))
            .optional()?
            .unwrap_or(0);
        Ok(u64::try_from(queued).unwrap_or(0))
    }

    async fn queued_for(&mut self, channel: &str, direction: Direction, contact: &str, cap: u64) -> StoreResult<u64> {
        // The contact's queued jobs through `jobs_queued`, no more than one past the cap.
        let counted: i64 = self
            .0
            .prepare_cached(
                "SELECT COUNT(*) FROM (SELECT 1 FROM jobs WHERE state = 'queued' \
                 AND channel = ?1 AND direction = ?2 AND contact = ?3 LIMIT ?4)",
            )?
            .query_row(
                params![channel, direction.as_str(), contact, i64::try_from(cap.saturating_add(1)).unwrap_or(i64::MAX)],
                |row| row.get(0),
            )?;
        Ok(u64::try_from(counted).unwrap_or(0))
    }

    async fn insert_job(
        &mut self,
        row: &NewRow<'_>,
        now: i64,
        first: Option<&FirstClaim>,
    ) -> StoreResult<Option<Inserted>> {
        let direction = row.direction.as_str();
        // The one writer decides whether the job heads its queue before inserting it, so that a
        // head leased with the insert is written once, lease and all.
        let head = row.state == JobState::Queued
            && !self
                .0
                .prepare_cached("SELECT 1 FROM queue_heads WHERE channel = ?1 AND direction = ?2 AND contact = ?3")?
                .exists(params![row.channel, direction, row.contact])?;
        let lease = first.filter(|_| head);
        // A new row's token starts at 0; its first claim, this one, makes it 1.
        let lease_token = lease.map(|_| 1);
        let inserted = self
            .0
            .prepare_cached(
                "INSERT INTO jobs (direction, contact, m_id, dedup_key, payload, state, next_attempt_at, created_at, updated_at, \
                 reserved_until, lease_owner, lease_until, lease_token, channel) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7, ?7, ?8, ?9, ?10, ?11, ?12) \
                 ON CONFLICT (channel, dedup_key) WHERE dedup_key IS NOT NULL DO NOTHING",
            )?
            .execute(params![
                direction,
                row.contact,
                row.m_id,
                row.dedup_key,
                row.payload,
                row.state.as_str(),
                now,
                first.map(|first| first.reserved_until),
                lease.map(|lease| lease.owner.as_str()),
                lease.map(|lease| lease.lease_until),
                lease_token.unwrap_or(0),
                row.channel,
            ])?;
        if inserted == 0 {
            return Ok(None);
        }
        let id = self.0.last_insert_rowid();
        if head {
            // Due when its lease and its reservation have ended, as `refresh_head` has it.
            let due_at = lease.map_or(now, |lease| now.max(lease.lease_until).max(lease.reserved_until));
            self.0
                .prepare_cached(
                    "INSERT INTO queue_heads (channel, direction, contact, job_id, due_at) VALUES (?1, ?2, ?3, ?4, ?5)",
                )?
                .execute(params![row.channel, direction, row.contact, id, due_at])?;
        }
        Ok(Some(Inserted { id, head, lease_token }))
    }

    async fn last_effective_at(&mut self, channel: &str, contact: &str) -> StoreResult<Option<i64>> {
        Ok(self
            .0
            .prepare_cached(
                "SELECT last_effective_at FROM contacts WHERE channel = ?1 AND direction = 'outbound' AND contact = ?2",
            )?
            .query_row([channel, contact], |row| row.get(0))
            .optional()?
            .flatten())
    }

    async fn any_stored(&mut self, channel: &str, dedup_keys: &[String]) -> StoreResult<bool> {
        let mut seen = self.0.prepare_cached("SELECT 1 FROM jobs WHERE channel = ?1 AND dedup_key = ?2")?;
        for key in dedup_keys {
            if seen.exists([channel, key])? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    async fn take_echo_mark(&mut self, channel: &str, contact: &str, fingerprint: &str, now: i64) -> StoreResult<bool> {
        let taken = self
            .0
            .prepare_cached(
                "DELETE FROM echo_marks WHERE id = (SELECT id FROM echo_marks \
                 WHERE channel = ?1 AND contact = ?2 AND fingerprint = ?3 AND expires_at > ?4 ORDER BY id LIMIT 1)",
            )?
            .execute(params![channel, contact, fingerprint, now])?;
        Ok(taken == 1)
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
            .0
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
        self.0.prepare_cached(&format!("UPDATE jobs SET {mark} WHERE id = ?1"))?.execute([id])?;
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
        self.0
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
            .0
            .prepare_cached("SELECT status, watermark, timestamp FROM watermarks WHERE channel = ?1 AND contact = ?2")?
            .query_map([channel, contact], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?
            .collect::<rusqlite::Result<_>>()?)
    }

    async fn settle(&mut self, lease: Lease, settle: &Settle<'_>, now: i64) -> StoreResult<Option<Settled>> {
        // Read, then written by primary key: SQLite runs `RETURNING` through a temporary table
        // it creates and drops for every statement.
        let settled: Option<(QueueId, String)> = self
            .0
            .prepare_cached(
                "SELECT channel, direction, contact, m_id FROM jobs \
                 WHERE id = ?1 AND lease_token = ?2 AND lease_owner IS NOT NULL",
            )?
            .query_row(params![lease.id, lease.token], |row| Ok((queue_from_row(row)?, row.get(3)?)))
            .optional()?;
        let Some((queue, m_id)) = settled else { return Ok(None) };
        self.0
            .prepare_cached(
                "UPDATE jobs SET state = ?1, progress = ?2, attempts = attempts + ?3, \
                 next_attempt_at = COALESCE(?4, next_attempt_at), \
                 last_error = CASE WHEN ?3 = 0 THEN last_error ELSE ?5 END, \
                 accepted_at = CASE WHEN ?1 = 'delivered' AND direction = 'outbound' THEN COALESCE(?6, ?7) ELSE accepted_at END, \
                 reserved_until = CASE WHEN ?8 THEN reserved_until END, \
                 lease_owner = NULL, lease_until = NULL, updated_at = ?7 \
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
                settle.keep_reservation,
                lease.id,
            ])?;
        let queued = refresh_head(self.0, &queue)?;
        let (channel, direction, contact) = queue;
        let direction = Direction::parse(&direction)
            .ok_or_else(|| StoreError::Unavailable(format!("job {} has direction {direction}", lease.id)))?;
        Ok(Some(Settled { channel, direction, contact, m_id, queued, receipt: false }))
    }

    async fn state_of(&mut self, id: i64) -> StoreResult<Option<JobState>> {
        let state: Option<String> = self
            .0
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
        let queue: Option<QueueId> = self
            .0
            .prepare_cached(
                "UPDATE jobs SET state = 'queued', attempts = 0, next_attempt_at = ?1, updated_at = ?1 WHERE id = ?2 \
                 RETURNING channel, direction, contact",
            )?
            .query_row(params![now, id], queue_from_row)
            .optional()?;
        if let Some(queue) = queue {
            refresh_head(self.0, &queue)?;
        }
        Ok(())
    }

    async fn load(&mut self, id: i64, now: i64) -> StoreResult<Job> {
        self.0
            .prepare_cached(&format!("SELECT {JOB_COLUMNS} FROM jobs j WHERE j.id = ?1"))?
            .query_row([id], |row| job_from_row(row, now))?
            .into_job()
    }

    async fn raise_last_effective(&mut self, channel: &str, contact: &str, at: i64) -> StoreResult<()> {
        self.0
            .prepare_cached(
                "INSERT INTO contacts (channel, direction, contact, last_effective_at) VALUES (?1, 'outbound', ?2, ?3) \
                 ON CONFLICT (channel, direction, contact) DO UPDATE SET last_effective_at = \
                 MAX(COALESCE(last_effective_at, 0), excluded.last_effective_at)",
            )?
            .execute(params![channel, contact, at])?;
        Ok(())
    }

    async fn add_echo_mark(
        &mut self,
        channel: &str,
        contact: &str,
        fingerprint: &str,
        expires_at: i64,
    ) -> StoreResult<()> {
        self.0
            .prepare_cached(
                "INSERT INTO echo_marks (channel, contact, fingerprint, expires_at) VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![channel, contact, fingerprint, expires_at])?;
        Ok(())
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
            move |conn| {
                let now = now_millis();
                run_rule(rules::finish(&mut SqliteTx(conn), lease, &Finish::Release { progress: 0 }, now)).map(drop)
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
    work: impl FnOnce(&Connection) -> StoreResult<()> + Send + 'static,
    then: impl FnOnce(Result<(), String>) + Send + 'static,
) -> Op {
    let work: Work = Box::new(move |conn| {
        let result = work(conn);
        let ok = result.is_ok();
        let answer: Answer = Box::new(move |committed| then(result.map_err(|e| e.to_string()).and(committed)));
        (ok, answer)
    });
    Op { work, admission: None, refuse: Box::new(|_| {}), _bytes: None }
}

impl SqliteStore {
    fn releaser(&self) -> Releaser {
        Releaser { ops: self.ops.clone(), changes: Arc::clone(&self.changes) }
    }

    /// Runs `f` like [`Self::run`], then tells the workers that jobs may be claimable.
    fn run_then_signal<T, F>(&self, f: F) -> BoxFuture<'_, StoreResult<T>>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> StoreResult<T> + Send + 'static,
    {
        let done = self.run(f);
        Box::pin(async move {
            let result = done.await;
            if result.is_ok() {
                self.changes.signal();
            }
            result
        })
    }
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
        self.run_for_caller(0, PING_ADMISSION, |conn| {
            conn.prepare_cached(
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
        let stored = self.run_for_caller(payload.len(), ADMISSION_TIMEOUT, move |conn| {
            let stored =
                run_rule(rules::enqueue_outbound(&mut SqliteTx(conn), &job, &payload, first.as_ref(), per_contact))?;
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
        let stored = self.run_for_caller(prepared.bytes(), ADMISSION_TIMEOUT, move |conn| {
            run_rule(rules::enqueue_inbound(&mut SqliteTx(conn), &prepared))
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
        let claimed = self.run(move |conn| {
            let (now, lease_until) = (claim.now, claim.lease_until);
            let (heads, last) = heads_in_turns(conn, &claim, after.as_deref())?;
            let mut load = conn.prepare_cached(&format!(
                "SELECT {JOB_COLUMNS}, {CLAIM_COLUMNS} FROM jobs j \
                 LEFT JOIN contacts c ON c.channel = j.channel AND c.direction = j.direction AND c.contact = j.contact \
                 WHERE j.id = ?1 AND j.state = 'queued'"
            ))?;
            let mut jobs = Vec::with_capacity(heads.len());
            for id in heads {
                let Some(mut job) = load.query_row([id], |row| claimable_from_row(row, now)).optional()? else {
                    // A head that is no longer queued: put the queue right and move on.
                    if let Some(queue) = queue_of(conn, id)? {
                        refresh_head(conn, &queue)?;
                    }
                    continue;
                };
                job.lease_token = lease(conn, job.id, &claim.owner, lease_until)?;
                job.in_flight = true;
                job.lease_until = Some(lease_until);
                jobs.push(job);
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
        let owner = owner.to_owned();
        let release = self.releaser();
        let claimed = self.run(move |conn| {
            // Its reservation is for this very claim: only being due, heading the queue and
            // nothing of the contact in flight count.
            let job = conn
                .prepare_cached(&format!(
                    "SELECT {JOB_COLUMNS}, {CLAIM_COLUMNS} FROM jobs j \
                     LEFT JOIN contacts c ON c.channel = j.channel AND c.direction = j.direction AND c.contact = j.contact \
                     WHERE j.id = ?1 AND j.state = 'queued' AND j.next_attempt_at <= ?2 \
                     AND j.id = (SELECT MIN(q.id) FROM jobs q WHERE q.state = 'queued' \
                                 AND q.channel = j.channel AND q.direction = j.direction AND q.contact = j.contact) \
                     AND NOT EXISTS (SELECT 1 FROM jobs l WHERE l.lease_owner IS NOT NULL AND l.lease_until > ?2 \
                                     AND l.state = 'queued' AND l.channel = j.channel AND l.direction = j.direction \
                                     AND l.contact = j.contact)"
                ))?
                .query_row(params![id, now], |row| claimable_from_row(row, now))
                .optional()?;
            let Some(mut job) = job else { return Ok(None) };
            job.lease_token = lease(conn, job.id, &owner, lease_until)?;
            job.in_flight = true;
            job.lease_until = Some(lease_until);
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
        self.run(move |conn| {
            let mut renewed_leases = Vec::with_capacity(leases.len());
            let mut renew = conn.prepare_cached(
                "UPDATE jobs SET lease_until = ?1 WHERE id = ?2 AND lease_token = ?3 AND lease_owner IS NOT NULL \
                 RETURNING channel, direction, contact",
            )?;
            for lease in leases {
                let renewed: Option<QueueId> =
                    renew.query_row(params![lease_until, lease.id, lease.token], queue_from_row).optional()?;
                if let Some(queue) = renewed {
                    refresh_head(conn, &queue)?;
                    renewed_leases.push(lease);
                }
            }
            Ok(renewed_leases)
        })
    }

    fn release(&self, owner: &str) -> BoxFuture<'_, StoreResult<u64>> {
        let owner = owner.to_owned();
        self.run_then_signal(move |conn| Ok(clear_leases(conn, &owner)?))
    }

    fn before_send(&self, send: BeforeSend) -> BoxFuture<'_, StoreResult<()>> {
        // The one writer thread runs operations in order: anything stored after this call,
        // such as the echo of this very send, sees the record even before it is committed.
        // Queued is enough (see the trait): a failure to commit it later is only logged.
        let op = unawaited_op(
            move |conn| run_rule(rules::record_send(&mut SqliteTx(conn), &send)),
            |outcome| {
                if let Err(e) = outcome {
                    tracing::warn!(error = %e, "a pacing and echo record could not be stored");
                }
            },
        );
        Box::pin(async move { self.ops.send(op).await.map_err(|_| Self::stopped()) })
    }

    fn record_progress(&self, lease: Lease, progress: u32, now: i64) -> BoxFuture<'_, StoreResult<()>> {
        self.run(move |conn| {
            let recorded = conn
                .prepare_cached(
                    "UPDATE jobs SET progress = ?1, updated_at = ?2 \
                     WHERE id = ?3 AND lease_token = ?4 AND lease_owner IS NOT NULL",
                )?
                .execute(params![progress, now, lease.id, lease.token])?;
            if recorded == 0 {
                return Err(StoreError::Conflict(format!("job {} is no longer leased under this claim", lease.id)));
            }
            Ok(())
        })
    }

    fn finish(&self, lease: Lease, finish: Finish, now: i64) -> BoxFuture<'_, StoreResult<()>> {
        let settled = self.run(move |conn| run_rule(rules::finish(&mut SqliteTx(conn), lease, &finish, now)));
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

    fn mark_introduced(&self, channel: &str, contact: &str) -> BoxFuture<'_, StoreResult<()>> {
        let (channel, contact) = (channel.to_owned(), contact.to_owned());
        self.run(move |conn| {
            conn.prepare_cached(
                "INSERT INTO contacts (channel, direction, contact, introduced) VALUES (?1, 'inbound', ?2, 1) \
                 ON CONFLICT (channel, direction, contact) DO UPDATE SET introduced = 1",
            )?
            .execute([channel, contact])?;
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
        self.run_then_signal(move |conn| {
            run_rule(rules::queue_failed_receipt(&mut SqliteTx(conn), &channel, &contact, &m_id, &reason, now))
        })
    }

    fn list(
        &self,
        state: Option<JobState>,
        channel: Option<&str>,
        limit: usize,
    ) -> BoxFuture<'_, StoreResult<Vec<Job>>> {
        let channel = channel.map(str::to_owned);
        parsed(self.read(move |conn| {
            let now = super::now_millis();
            let state = state.map(JobState::as_str);
            let jobs = conn
                .prepare_cached(&format!(
                    "SELECT {JOB_COLUMNS} FROM jobs j WHERE (?1 IS NULL OR j.state = ?1) AND (?2 IS NULL OR j.channel = ?2) \
                     ORDER BY j.id DESC LIMIT ?3"
                ))?
                .query_map(params![state, channel, limit as i64], |row| job_from_row(row, now))?
                .collect::<rusqlite::Result<_>>()?;
            Ok(jobs)
        }))
    }

    fn retry(&self, id: i64, now: i64) -> BoxFuture<'_, StoreResult<Job>> {
        self.run_then_signal(move |conn| run_rule(rules::retry(&mut SqliteTx(conn), id, now)))
    }

    fn redrive_dead(&self, now: i64, channel: Option<&str>, limit: usize) -> BoxFuture<'_, StoreResult<u64>> {
        let channel = channel.map(str::to_owned);
        self.run_then_signal(move |conn| {
            let queues: Vec<QueueId> = conn
                .prepare_cached(
                    "UPDATE jobs SET state = 'queued', attempts = 0, next_attempt_at = ?1, updated_at = ?1 \
                     WHERE id IN (SELECT id FROM jobs WHERE state = 'dead' AND (?2 IS NULL OR channel = ?2) \
                                  ORDER BY id LIMIT ?3) \
                     RETURNING channel, direction, contact",
                )?
                .query_map(params![now, channel, limit as i64], queue_from_row)?
                .collect::<rusqlite::Result<_>>()?;
            let redriven = queues.len() as u64;
            let mut refreshed = std::collections::HashSet::new();
            for queue in queues {
                if !refreshed.contains(&queue) {
                    refresh_head(conn, &queue)?;
                    refreshed.insert(queue);
                }
            }
            Ok(redriven)
        })
    }

    fn prune(&self, before: i64, now: i64, limit: usize) -> BoxFuture<'_, StoreResult<u64>> {
        self.run(move |conn| {
            // Each through its own index (migration 0005): a batch reads what it deletes and
            // nothing else, however much history the store holds.
            let jobs = conn
                .prepare_cached(
                    "DELETE FROM jobs WHERE id IN (SELECT id FROM jobs \
                     WHERE state IN ('delivered', 'rejected', 'dropped') AND updated_at < ?1 LIMIT ?2)",
                )?
                .execute(params![before, limit as i64])?;
            conn.prepare_cached(
                "DELETE FROM echo_marks WHERE id IN (SELECT id FROM echo_marks WHERE expires_at <= ?1 LIMIT ?2)",
            )?
            .execute(params![now, limit as i64])?;
            conn.prepare_cached(
                "DELETE FROM watermarks WHERE (channel, contact, status) IN \
                 (SELECT channel, contact, status FROM watermarks WHERE updated_at < ?1 LIMIT ?2)",
            )?
            .execute(params![before, limit as i64])?;
            Ok(jobs as u64)
        })
    }

    fn queue_counts(&self, now: i64) -> BoxFuture<'_, StoreResult<Vec<(String, Direction, QueueCounts)>>> {
        self.read(move |conn| {
            // Both walk a partial index (`jobs_queued`, `jobs_dead`): the queued and dead jobs
            // only, never the delivered history.
            let queued = conn
                .prepare_cached(
                    "SELECT channel, direction, \
                     COALESCE(SUM(lease_owner IS NULL AND next_attempt_at <= ?1), 0), \
                     COALESCE(SUM(lease_owner IS NULL AND next_attempt_at > ?1), 0), \
                     COALESCE(SUM(lease_owner IS NOT NULL), 0) \
                     FROM jobs WHERE state = 'queued' GROUP BY channel, direction",
                )?
                .query_map([now], |row| Ok((row.get(0)?, row.get(1)?, [row.get(2)?, row.get(3)?, row.get(4)?])))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            let dead = conn
                .prepare_cached(
                    "SELECT channel, direction, COUNT(*) FROM jobs WHERE state = 'dead' GROUP BY channel, direction",
                )?
                .query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(super::assemble_counts(queued, dead))
        })
    }

    fn send_rate(&self, channel: &str, op: RateOp, max_per_sec: u32) -> BoxFuture<'_, StoreResult<Grant>> {
        let grant = self.send_rates.apply(channel, op, max_per_sec, now_millis());
        Box::pin(std::future::ready(Ok(grant)))
    }
}

/// The heads `claim` takes, in the order it takes them, and the channel of the last: the
/// channels of its direction that have heads are walked through `queue_heads_claim` one seek
/// each (a skip-scan), and each eligible one gives its earliest due heads, `limit` at most;
/// those are taken in turns starting after `after` (see [`Claim`]). The cost follows the number
/// of channels with queued work and `limit`, never the depth of any channel's queue.
fn heads_in_turns(
    conn: &Connection,
    claim: &Claim,
    after: Option<&str>,
) -> rusqlite::Result<(Vec<i64>, Option<String>)> {
    if claim.limit == 0 {
        return Ok((Vec::new(), None));
    }
    // `claim.channels` is sorted (see [`Claim`]): a lookup per channel walked, no set of all
    // of them built for every claim.
    debug_assert!(claim.channels.is_sorted(), "claims name their channels in order");
    let eligible = |channel: &str| claim.channels.binary_search_by(|name| name.as_str().cmp(channel)).is_ok();
    let direction = claim.direction.as_str();
    let per_channel = i64::try_from(claim.limit.min(claim.per_channel)).unwrap_or(i64::MAX);
    let mut next_channel =
        conn.prepare_cached("SELECT MIN(channel) FROM queue_heads WHERE direction = ?1 AND channel > ?2")?;
    let mut earliest = conn.prepare_cached(
        "SELECT job_id FROM queue_heads WHERE direction = ?1 AND channel = ?2 AND due_at <= ?3 \
         ORDER BY due_at, contact LIMIT ?4",
    )?;
    let mut channels = Vec::new();
    // Every channel name sorts after the empty string.
    let mut previous = String::new();
    while let Some(channel) =
        next_channel.query_row(params![direction, previous], |row| row.get::<_, Option<String>>(0))?
    {
        if eligible(&channel) {
            let heads: Vec<i64> = earliest
                .query_map(params![direction, channel, claim.now, per_channel], |row| row.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            if !heads.is_empty() {
                channels.push((channel.clone(), heads));
            }
        }
        previous = channel;
    }
    Ok(super::in_turns(channels, after, claim.limit))
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

        let late = store.run_for_caller(10, Duration::from_millis(100), insert_marker("late")).await;
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

        let abandoned = store.run_for_caller(10, ADMISSION_TIMEOUT, insert_marker("abandoned"));
        let kept = store.run_for_caller(10, ADMISSION_TIMEOUT, insert_marker("kept"));
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

        let slow = store.run_for_caller(10, Duration::from_millis(100), move |conn| {
            // Started at once, then the disk takes far longer than the admission deadline.
            let _ = blocked.recv_timeout(Duration::from_millis(400));
            insert_marker("slow")(conn)
        });
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
            let write = store.run_for_caller(10, ADMISSION_TIMEOUT, |_| Ok(()));
            if let Ok(Err(StoreError::Unavailable(reason))) = tokio::time::timeout(Duration::ZERO, write).await
                && reason.contains("queue is full")
            {
                refused += 1;
            }
        }
        let too_big = store.run_for_caller(QUEUE_BYTES + 1, ADMISSION_TIMEOUT, |_| Ok(())).await;
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
