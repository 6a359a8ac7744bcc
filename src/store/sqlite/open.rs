//! Opening the file: its lock, the connection's settings, the migrations, and what tells the
//! file the writer opened from a file put in its place.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, TransactionBehavior};

use super::Mode;
use crate::store::{StoreError, StoreResult};

pub(super) const MIGRATIONS: &[&str] = &[
    include_str!("../../../migrations/sqlite/0001_init.sql"),
    include_str!("../../../migrations/sqlite/0002_intake.sql"),
    include_str!("../../../migrations/sqlite/0003_fencing.sql"),
    include_str!("../../../migrations/sqlite/0004_lean_writes.sql"),
    include_str!("../../../migrations/sqlite/0005_history_and_watermarks.sql"),
    include_str!("../../../migrations/sqlite/0006_channels.sql"),
    include_str!("../../../migrations/sqlite/0007_contact_first_keys.sql"),
    include_str!("../../../migrations/sqlite/0008_writer_memory.sql"),
    include_str!("../../../migrations/sqlite/0009_console.sql"),
    include_str!("../../../migrations/sqlite/0010_traces.sql"),
];

/// `path` with its directory's symbolic links resolved (and the file's own, when it exists), so
/// that every relay reaching one database through whatever path takes the same lock.
pub(super) fn canonical(path: &Path) -> StoreResult<PathBuf> {
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
pub(super) fn lock_exclusively(path: &Path) -> StoreResult<File> {
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
pub(super) struct FileId {
    dev: u64,
    ino: u64,
}

impl FileId {
    pub(super) fn of(path: &Path) -> std::io::Result<Self> {
        let meta = std::fs::metadata(path)?;
        Ok(Self { dev: meta.dev(), ino: meta.ino() })
    }
}

pub(super) fn wal_path(path: &Path) -> PathBuf {
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    PathBuf::from(wal)
}

/// The files the writer's connection uses, as they were when it opened them.
pub(super) struct Identity {
    pub db: FileId,
    /// Known once the write-ahead log exists.
    pub wal: Option<FileId>,
}

/// Why the writer's connection could not be opened.
pub(super) enum OpenError {
    Sqlite(rusqlite::Error),
    /// The file is sound but this relay must not use it (a schema it does not know).
    Refused(StoreError),
}

impl From<rusqlite::Error> for OpenError {
    fn from(e: rusqlite::Error) -> Self {
        Self::Sqlite(e)
    }
}

pub(super) fn open_connection(path: &Path, mode: Mode) -> Result<(Connection, Identity), OpenError> {
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
        Mode::Relay => migrate(&mut conn)?,
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
pub(super) fn migrate_to(conn: &mut Connection, target: usize) -> rusqlite::Result<()> {
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
