//! Error enums, one per boundary. Messages are lowercase one-liners without a
//! trailing period, so they read well inside a log line or a JSON `error` field.

use std::path::PathBuf;

/// Everything the store can report. `Clone` because one failed group commit is
/// reported to every caller whose work was in the batch.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// Storage is failing right now (disk full, I/O error, read-only file
    /// system). Nothing in the batch was committed; callers must not
    /// acknowledge. The writer reopens the database and keeps probing.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    /// The database file is damaged. keel refuses to start over it.
    #[error("database {path} is corrupt ({detail}); keep the file and repair it with: sqlite3 {path} '.recover' | sqlite3 {path}.recovered")]
    Corrupt { path: PathBuf, detail: String },
    /// The file was written by a newer keel.
    #[error("database {path} has schema version {found}, newer than this binary supports ({supported}); run a newer keel or restore a backup")]
    SchemaTooNew {
        path: PathBuf,
        found: i64,
        supported: i64,
    },
    /// The database cannot be read with the key given (or needs one, or is
    /// plain while encryption is on). The file is left untouched.
    #[error("database {path} {detail}")]
    Key { path: PathBuf, detail: String },
    /// The database could not be opened at all.
    #[error("cannot open database {path}: {detail}")]
    Open { path: PathBuf, detail: String },
    /// The persistence actor has shut down; no more work is accepted.
    #[error("store is closed")]
    Closed,
    /// A request that cannot succeed whatever the storage does.
    #[error("{0}")]
    Invalid(String),
    /// Any other SQLite error.
    #[error("sqlite: {0}")]
    Sqlite(String),
    /// Any other PostgreSQL error (with its SQLSTATE).
    #[error("postgres: {0}")]
    Postgres(String),
    /// PostgreSQL broke a deadlock or a serialisation conflict between
    /// instances by aborting this unit of work; the writer runs it again in
    /// its next transaction (callers see it only if that keeps failing).
    #[error("conflict with a concurrent transaction: {0}")]
    Contended(String),
    /// A write made under a lease whose fencing token is no longer current
    /// (another instance took the lease over): refused, nothing written.
    /// The writer must stop acting as the holder.
    #[error("{0}")]
    StaleLease(String),
}

impl StoreError {
    /// True when retrying later may succeed (the caller answers 503, not 4xx).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            StoreError::Unavailable(_) | StoreError::Closed | StoreError::Contended(_)
        )
    }

    /// Classify a PostgreSQL error like [`StoreError::from_sqlite`]: a lost
    /// connection or a failing server poisons the batch and the connection;
    /// deadlocks and serialisation failures are `Contended` (run again);
    /// everything else fails only its own job.
    pub fn from_pg(err: postgres::Error) -> StoreError {
        let Some(db) = err.as_db_error() else {
            // No server answer: the connection broke, timed out or closed.
            return StoreError::Unavailable(format!("postgres: {err}"));
        };
        let code = db.code().code();
        let line = format!("{} ({code})", db.message());
        match &code[..2] {
            // 40001 serialization_failure, 40P01 deadlock_detected.
            "40" if code == "40001" || code == "40P01" => StoreError::Contended(line),
            // 55P03 lock_not_available: a `lock_timeout` ran out (see
            // `portable::timers::fire_timers`); run again like a deadlock.
            "55" if code == "55P03" => StoreError::Contended(line),
            // 08 connection, 53 insufficient resources (disk full), 57
            // operator intervention (shutdown), 58 system/I-O error, XX internal.
            "08" | "53" | "57" | "58" | "XX" => {
                StoreError::Unavailable(format!("postgres: {line}"))
            }
            _ => StoreError::Postgres(line),
        }
    }

    /// Classify a rusqlite error: storage-level failures poison the whole
    /// batch and the connection; everything else fails only its own job.
    pub fn from_sqlite(err: rusqlite::Error) -> StoreError {
        if let Some(reason) = storage_failure(&err) {
            StoreError::Unavailable(reason)
        } else {
            StoreError::Sqlite(err.to_string())
        }
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(err: rusqlite::Error) -> Self {
        StoreError::from_sqlite(err)
    }
}

/// Returns a short reason when `err` means the storage itself is failing.
pub(crate) fn storage_failure(err: &rusqlite::Error) -> Option<String> {
    use rusqlite::ErrorCode::*;
    let rusqlite::Error::SqliteFailure(e, msg) = err else {
        return None;
    };
    let what = match e.code {
        DiskFull => "disk full",
        SystemIoFailure => "I/O error",
        ReadOnly => "read-only storage",
        CannotOpen => "cannot open database file",
        PermissionDenied => "permission denied",
        DatabaseCorrupt => "database corrupt",
        NotADatabase => "not a database",
        DatabaseBusy | DatabaseLocked => "database busy",
        OutOfMemory => "out of memory",
        _ => return None,
    };
    Some(match msg {
        Some(m) => format!("{what} ({m})"),
        None => format!("{what} (sqlite extended code {})", e.extended_code),
    })
}

/// Errors an adapter reports when sending a reply out.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SendError {
    /// Worth retrying after the usual backoff.
    #[error("{0}")]
    Transient(String),
    /// The upstream asked us to wait this long.
    #[error("retry after {0:?}")]
    RetryAfter(std::time::Duration),
    /// The request left but no answer came back: it may have been delivered.
    #[error("outcome unknown: {0}")]
    Unknown(String),
    /// Retrying will not help (no route for this channel, 4xx).
    #[error("{0}")]
    Permanent(String),
    /// Nobody to deliver to right now (no `keel chat` client for the chat):
    /// not a failure. The reply waits until the channel says it is ready
    /// (`ChannelReady`), or the backoff cap passes.
    #[error("waiting: {0}")]
    Waiting(String),
}

/// Why a supervised adapter stopped running (R16). Messages never hold a
/// token: adapters redact it before building one.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AdapterError {
    /// The upstream asked us to wait this long (HTTP 429 `retry_after`).
    #[error("rate limited; retry after {0:?}")]
    RetryAfter(std::time::Duration),
    /// The upstream rejected the credentials (HTTP 401): retrying cannot help.
    #[error("token rejected (HTTP 401): {0}")]
    Unauthorized(String),
    /// Another client holds the channel (HTTP 409): retrying would fight it.
    #[error("conflict (HTTP 409): {0}")]
    Conflict(String),
    /// Network trouble, 5xx, bad JSON: worth a retry after backoff.
    #[error("{0}")]
    Transient(String),
    /// The store refused the batch; nothing was confirmed upstream.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// The adapter's task panicked.
    #[error("panicked: {0}")]
    Panicked(String),
    /// The adapter returned although nobody asked it to stop.
    #[error("exited unexpectedly")]
    Exited,
}

impl AdapterError {
    /// False for failures a restart cannot fix (revoked token, another
    /// poller): the supervisor stops the adapter instead of retrying.
    pub fn is_transient(&self) -> bool {
        !matches!(
            self,
            AdapterError::Unauthorized(_) | AdapterError::Conflict(_)
        )
    }
}
