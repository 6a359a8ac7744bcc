//! The writer thread: it owns the connection, runs every operation waiting at that moment in
//! one transaction, commits once, and only then answers them all (group commit).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use rusqlite::Connection;
use tokio::sync::{OwnedSemaphorePermit, mpsc};

use super::memory::{Journal, Queues, Recent};
use super::open::{FileId, Identity, wal_path};
use crate::store::{StoreResult, now_millis};

/// Operations committed together at most; bounds the latency a large batch adds.
pub(super) const MAX_BATCH: usize = 512;

/// Runs inside the transaction; says whether it succeeded and how to answer its caller once the
/// commit is known.
pub(super) type Work = Box<dyn FnOnce(&mut Ctx<'_>) -> (bool, Answer) + Send>;
pub(super) type Answer = Box<dyn FnOnce(Result<(), String>) + Send>;

/// Where a caller's operation stands; the writer and the caller race for it once.
pub(super) const WAITING: u8 = 0;
pub(super) const STARTED: u8 = 1;
pub(super) const ABANDONED: u8 = 2;

pub(super) struct Op {
    pub work: Work,
    /// Set for operations a caller may give up on (requests); the writer starts the operation
    /// only if it moves this from WAITING to STARTED first.
    pub admission: Option<Arc<AtomicU8>>,
    /// Refuses the operation without running it: the caller hears `reason`.
    pub refuse: Box<dyn FnOnce(String) + Send>,
    /// Whether the operation may fail after it wrote (several writes, a check after an
    /// insert): it then runs in a savepoint of its own, so that failing undoes only itself.
    pub careful: bool,
    /// The payload bytes this operation holds in the queue, given back once it is done.
    pub _bytes: Option<OwnedSemaphorePermit>,
}

/// What an operation works with: the connection inside the batch's transaction, and the
/// writer's memory, every change to which is journalled.
pub(super) struct Ctx<'a> {
    pub conn: &'a Connection,
    queues: &'a Mutex<Queues>,
    pub recent: &'a Mutex<Recent>,
    pub journal: &'a mut Journal,
    careful: bool,
    in_savepoint: bool,
    wrote: bool,
}

impl<'a> Ctx<'a> {
    /// Called before each write: the first write of a careful operation opens its savepoint.
    pub fn before_write(&mut self) -> rusqlite::Result<()> {
        if self.careful && !self.in_savepoint {
            self.conn.prepare_cached("SAVEPOINT op")?.execute([])?;
            self.in_savepoint = true;
        }
        self.wrote = true;
        Ok(())
    }

    /// Makes the rest of the operation careful: it may fail after its next write.
    pub fn take_care(&mut self) {
        self.careful = true;
    }

    /// The queues, locked for one step: never across a statement, so that a statement held up
    /// by the disk holds up no read of the queues (listing jobs, counting them).
    pub fn queues(&self) -> MutexGuard<'a, Queues> {
        self.queues.lock().expect("queues lock")
    }

    pub fn recent(&self) -> MutexGuard<'a, Recent> {
        self.recent.lock().expect("recent sends lock")
    }
}

/// What the writer knows about its own health, read by readiness.
#[derive(Default)]
pub(super) struct Health {
    /// Set for good when the store can no longer be trusted (file replaced, writer gone).
    broken: Mutex<Option<String>>,
    /// When the running batch started (ms since the epoch), 0 when idle.
    pub busy_since: AtomicI64,
}

impl Health {
    pub fn broken(&self) -> Option<String> {
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

/// Ends the process when the writer thread panics: a relay that cannot store must not live on
/// answering 503s forever; its orchestrator restarts it.
pub(super) struct ExitOnPanic;

impl Drop for ExitOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("bonychat-relay: the store writer thread panicked; exiting so that the relay is restarted");
            std::process::exit(70);
        }
    }
}

/// The writer thread's state.
pub(super) struct Writer {
    pub conn: Connection,
    pub path: PathBuf,
    pub identity: Identity,
    pub health: Arc<Health>,
    pub commits: Arc<AtomicU64>,
    pub queues: Arc<Mutex<Queues>>,
    pub recent: Arc<Mutex<Recent>>,
    /// `PRAGMA data_version` as last seen: it changes when another process commits to the file.
    pub data_version: i64,
}

impl Writer {
    pub fn run(mut self, mut ops: mpsc::Receiver<Op>) {
        let mut journal = Journal::default();
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
            let mut committed = self.run_batch(batch, &mut answers, &mut journal).map_err(|e| e.to_string());
            crate::store::metrics::commit(started.elapsed(), operations);
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
            if committed.is_err() {
                // Rolled back in the file: the memory goes back to match it.
                let mut queues = self.queues.lock().expect("queues lock");
                let mut recent = self.recent.lock().expect("recent sends lock");
                queues.undo(&mut journal, 0, &mut recent);
            }
            journal.clear();
            self.health.busy_since.store(0, Ordering::Relaxed);
            for answer in answers {
                answer(committed.clone());
            }
        }
    }

    /// Runs `batch` in one transaction. Operations it could not get to (the transaction failed
    /// first) are refused with the error; the others are answered by the caller once the
    /// commit's outcome is known.
    fn run_batch(&mut self, batch: Vec<Op>, answers: &mut Vec<Answer>, journal: &mut Journal) -> StoreResult<()> {
        let mut pending = batch.into_iter();
        let conn = &self.conn;
        // BEGIN and COMMIT through cached statements: rusqlite's `Transaction` parses its SQL
        // again for every batch.
        let result = (|| -> StoreResult<()> {
            conn.prepare_cached("BEGIN IMMEDIATE")?.execute([])?;
            // Under the write lock: whatever another process committed is in, and nothing more
            // can come until this transaction ends.
            let data_version: i64 = conn.prepare_cached("PRAGMA data_version")?.query_row([], |row| row.get(0))?;
            if data_version != self.data_version {
                tracing::info!("another process wrote to the store; reading its queues again");
                let mut queues = self.queues.lock().expect("queues lock");
                *queues = super::recovery::rebuild_queues(conn, &queues)?;
                self.data_version = data_version;
            }
            for op in pending.by_ref() {
                if let Some(state) = &op.admission
                    && state.compare_exchange(WAITING, STARTED, Ordering::AcqRel, Ordering::Acquire).is_err()
                {
                    // Its caller gave up before it started: it must never be stored.
                    (op.refuse)("abandoned by its caller".into());
                    continue;
                }
                let mark = journal.mark();
                let mut ctx = Ctx {
                    conn,
                    queues: &self.queues,
                    recent: &self.recent,
                    journal,
                    careful: op.careful,
                    in_savepoint: false,
                    wrote: false,
                };
                let (ok, answer) = (op.work)(&mut ctx);
                let (in_savepoint, wrote) = (ctx.in_savepoint, ctx.wrote);
                answers.push(answer);
                if ok {
                    if in_savepoint {
                        conn.prepare_cached("RELEASE op")?.execute([])?;
                    }
                    continue;
                }
                if in_savepoint {
                    conn.prepare_cached("ROLLBACK TO op")?.execute([])?;
                    conn.prepare_cached("RELEASE op")?.execute([])?;
                } else if wrote || conn.is_autocommit() {
                    // Part of what it wrote may stay: nothing of this batch may be committed.
                    return Err(crate::store::StoreError::Unavailable(
                        "an operation failed halfway; the whole batch is rolled back".into(),
                    ));
                }
                let mut queues = self.queues.lock().expect("queues lock");
                queues.undo(journal, mark, &mut self.recent.lock().expect("recent sends lock"));
            }
            conn.prepare_cached("COMMIT")?.execute([])?;
            Ok(())
        })();
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
