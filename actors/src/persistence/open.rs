//! Opening the store: options from the config, the connection pragmas,
//! integrity checks (before start for small files, in the background for
//! large ones), migration, the never-create-over-damage marker, read-only
//! connections for operator commands, and `write_atomic` for files next to
//! the database.

use std::fs::{self, File};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};

use super::{meta, migrate};
use crate::config::{Config, Synchronous};
use crate::error::StoreError;
use crate::health::Health;
use crate::masterkey::KeyHandle;

/// How the store is opened.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// `None` = in memory (`--ephemeral`).
    pub path: Option<PathBuf>,
    pub synchronous: Synchronous,
    pub busy_timeout: Duration,
    pub max_batch: usize,
    pub probe_interval: Duration,
    /// The SQLCipher key; `None` = plain SQLite (`[storage] encrypt = false`).
    pub key: Option<KeyHandle>,
}

impl StoreOptions {
    /// Options for `keel.db`: `key` is used only while `[storage] encrypt`.
    pub fn from_config(config: &Config, key: Option<&KeyHandle>) -> StoreOptions {
        StoreOptions {
            path: config.db_path(),
            synchronous: config.storage.synchronous,
            busy_timeout: Duration::from_millis(config.storage.busy_timeout_ms),
            max_batch: config.storage.max_batch,
            probe_interval: Duration::from_millis(config.storage.probe_interval_ms),
            key: key.filter(|_| config.storage.encrypt).cloned(),
        }
    }

    pub(super) fn display_path(&self) -> PathBuf {
        self.path
            .clone()
            .unwrap_or_else(|| PathBuf::from(":memory:"))
    }
}

/// What opening the store found.
#[derive(Debug, Clone)]
pub struct OpenReport {
    pub migrated_from: i64,
    pub schema_version: i64,
    /// A large database whose `quick_check` is left to the caller
    /// (`check_in_background` after start, or at once for operator commands).
    pub deferred_check: Option<PathBuf>,
    /// R39: acknowledged commits missing from the store.
    pub data_loss: Option<super::acked::DataLoss>,
}

/// Open a connection and set the pragmas keel relies on. A damaged file is
/// reported as `Corrupt`; nothing is ever created over it.
/// Process-wide SQLite settings, applied before the first connection opens
/// (after that SQLite refuses them, and this does nothing): no memory
/// statistics, so an allocation does not take SQLite's global memory mutex
/// (4 % of the writer's time under load; keel reads no SQLite memory
/// counters and sets no heap limit).
pub fn tune_sqlite() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: sqlite3_config before sqlite3_initialize, with the int
        // argument SQLITE_CONFIG_MEMSTATUS takes; SQLITE_MISUSE (already
        // initialised) leaves everything as it was.
        unsafe {
            rusqlite::ffi::sqlite3_config(
                rusqlite::ffi::SQLITE_CONFIG_MEMSTATUS,
                0 as std::ffi::c_int,
            );
        }
    });
}

pub fn open_connection(opts: &StoreOptions) -> Result<Connection, StoreError> {
    let Some(path) = &opts.path else {
        let conn = Connection::open_in_memory().map_err(|e| StoreError::Open {
            path: opts.display_path(),
            detail: e.to_string(),
        })?;
        conn.execute_batch("PRAGMA foreign_keys = ON;")?;
        return Ok(conn);
    };
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_CREATE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    // With `synchronous = FULL` a commit's WAL frames go out as one write
    // at its sync (`walbuf`: only safe because FULL syncs before it
    // publishes the frames).
    let conn = if opts.synchronous == Synchronous::Full && super::walbuf::available() {
        Connection::open_with_flags_and_vfs(path, flags, super::walbuf::NAME)
    } else {
        Connection::open_with_flags(path, flags)
    }
    .map_err(|e| classify_open_error(path, e))?;
    apply_key(&conn, path, opts.key.as_ref())?;
    conn.busy_timeout(opts.busy_timeout)
        .map_err(|e| classify_open_error(path, e))?;
    let mode: String = conn
        .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
        .map_err(|e| classify_key_error(path, opts.key.as_ref(), e))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::Open {
            path: path.clone(),
            detail: format!("cannot switch to WAL mode (got {mode})"),
        });
    }
    let sync = match opts.synchronous {
        Synchronous::Full => "FULL",
        Synchronous::Normal => "NORMAL",
    };
    // journal_size_limit: a WAL that grew past 64 MiB (a long reader held
    // its restart) shrinks back to it at the next restart instead of
    // staying that size on disk.
    conn.execute_batch(&format!(
        "PRAGMA synchronous = {sync}; PRAGMA foreign_keys = ON; PRAGMA wal_autocheckpoint = 4000;
         PRAGMA journal_size_limit = 67108864;"
    ))
    .map_err(|e| classify_open_error(path, e))?;
    Ok(conn)
}

/// Unlock `conn` with `key` (raw key: no derivation) and silence
/// SQLCipher's own logging. Without a key the connection stays plain.
pub(crate) fn apply_key(
    conn: &Connection,
    path: &Path,
    key: Option<&KeyHandle>,
) -> Result<(), StoreError> {
    let Some(key) = key else {
        return Ok(());
    };
    conn.execute_batch("PRAGMA cipher_log_level = NONE;")
        .map_err(|e| classify_open_error(path, e))?;
    conn.execute_batch(&key.key.pragma("key"))
        .map_err(|e| classify_open_error(path, e))?;
    Ok(())
}

/// The first 16 bytes of every plain SQLite file.
const PLAIN_HEADER: &[u8; 16] = b"SQLite format 3\0";

/// Whether `path` starts like a plain (unencrypted) SQLite database;
/// `None` when it is empty or unreadable.
pub fn is_plain_sqlite(path: &Path) -> Option<bool> {
    use std::io::Read;
    let mut head = [0u8; 16];
    let mut f = File::open(path).ok()?;
    match f.read_exact(&mut head) {
        Ok(()) => Some(&head == PLAIN_HEADER),
        Err(_) => None,
    }
}

/// "not a database" on first read: with a key, a wrong key, a plain file
/// or damage; without one, an encrypted file. Said in one line naming the
/// key's source and the file.
pub(crate) fn classify_key_error(
    path: &Path,
    key: Option<&KeyHandle>,
    e: rusqlite::Error,
) -> StoreError {
    if e.sqlite_error_code() != Some(rusqlite::ErrorCode::NotADatabase) {
        return classify_open_error(path, e);
    }
    let plain = is_plain_sqlite(path);
    let detail = match (key, plain) {
        (Some(_), Some(true)) => "is a plain SQLite database but [storage] encrypt = true; encrypt it with `keel migrate --encrypt` (or set [storage] encrypt = false)".to_string(),
        (Some(k), _) if super::backup::rekey_file(path).exists() => format!("cannot be decrypted with the master key from {}: a keel rekey was interrupted after the key switch; start keel (keel run) or run keel rekey again to finish it (files left as they are)", k.source),
        (Some(k), _) => format!("cannot be decrypted with the master key from {}: wrong key, or the file is corrupt (left as it is)", k.source),
        (None, Some(false)) => "is not a plain SQLite database: encrypted (set [storage] encrypt = true and provide its master key) or damaged".to_string(),
        (None, _) => return classify_open_error(path, e),
    };
    StoreError::Key {
        path: path.to_path_buf(),
        detail,
    }
}

fn classify_open_error(path: &Path, e: rusqlite::Error) -> StoreError {
    use rusqlite::ErrorCode::*;
    match e.sqlite_error_code() {
        Some(NotADatabase | DatabaseCorrupt) => StoreError::Corrupt {
            path: path.to_path_buf(),
            detail: e.to_string(),
        },
        _ => StoreError::Open {
            path: path.to_path_buf(),
            detail: e.to_string(),
        },
    }
}

/// Marker written once the data dir holds an initialised database: if the
/// database later vanishes or is truncated to nothing, keel refuses to start
/// instead of silently creating an empty one in its place.
const MARKER: &str = "keel.initialized";

fn check_not_vanished(db: &Path) -> Result<(), StoreError> {
    let Some(dir) = db.parent() else {
        return Ok(());
    };
    if !dir.join(MARKER).exists() {
        return Ok(());
    }
    match fs::metadata(db) {
        Ok(m) if m.len() > 0 => Ok(()),
        Ok(_) => Err(StoreError::Corrupt {
            path: db.to_path_buf(),
            detail: "the file is empty but this data dir held a database".into(),
        }),
        Err(e) => Err(StoreError::Corrupt {
            path: db.to_path_buf(),
            detail: format!("the file is missing ({e}) but this data dir held a database"),
        }),
    }
}

/// Largest database file `open_store` checks with `quick_check` before
/// start (about 50 ms of reading); larger ones are checked in background.
pub const SYNC_CHECK_MAX_BYTES: u64 = 8 << 20;

/// `quick_check` a large database on its own read-only connection after
/// start. Damage is logged as an error naming the file and makes `/readyz`
/// report `degraded` for good (`Health::storage_corrupt`): the operator must
/// see it, and it does not clear on the next successful write.
///
/// The returned handle interrupts the check (shutdown does, before its
/// TRUNCATE checkpoint, which would otherwise wait for the check's read
/// transaction: issue 14). An interrupted check is not a verdict; the next
/// start checks the file again.
pub fn check_in_background(db: PathBuf, key: Option<KeyHandle>, health: Health) -> BackgroundCheck {
    let check = BackgroundCheck::default();
    let shared = check.clone();
    health.integrity_check(Some("running"));
    let yielded = check.clone();
    health.on_wal_pressure(Box::new(move || yielded.give_way()));
    let on_spawn_error = health.clone();
    let spawned = std::thread::Builder::new()
        .name("keel-quick-check".into())
        .spawn(move || {
            let result = open_read_only(&db, key.as_ref()).and_then(|c| {
                if !shared.arm(&c) {
                    return Ok(None);
                }
                let r = meta::quick_check(&c);
                shared.disarm();
                match r {
                    Err(e) if e.sqlite_error_code() == Some(rusqlite::ErrorCode::OperationInterrupted) => Ok(None),
                    r => Ok(Some(r?)),
                }
            });
            match result {
                Ok(None) if shared.gave_way() => {
                    health.integrity_check(Some("postponed"));
                    tracing::warn!(path = %db.display(), "background quick_check postponed: its read transaction kept the WAL from being restarted and the WAL outgrew its bound; it runs again at the next start")
                }
                Ok(None) => {
                    health.integrity_check(Some("interrupted"));
                    tracing::info!(path = %db.display(), "background quick_check interrupted by shutdown; it runs again at the next start")
                }
                Ok(Some(p)) if p == ["ok"] => {
                    health.integrity_check(None);
                    tracing::info!(path = %db.display(), "background quick_check ok")
                }
                Ok(Some(p)) => {
                    health.integrity_check(None);
                    let problems = p.join("; ");
                    tracing::error!(
                        path = %db.display(),
                        problems = %problems,
                        "database is corrupt (background quick_check); stop keel and repair it"
                    );
                    health.storage_corrupt(&format!("{}: {problems}", db.display()));
                }
                Err(e) => {
                    health.integrity_check(Some(&format!("failed: {e}")));
                    tracing::warn!(path = %db.display(), error = %e, "background quick_check failed")
                }
            }
        });
    if let Err(e) = spawned {
        on_spawn_error.integrity_check(Some(&format!("failed: {e}")));
        tracing::warn!(error = %e, "cannot start the background quick_check");
    }
    check
}

/// A running (or finished) background `quick_check`; `interrupt` stops it.
#[derive(Clone, Default)]
pub struct BackgroundCheck {
    state: std::sync::Arc<std::sync::Mutex<CheckState>>,
}

#[derive(Default)]
struct CheckState {
    stopped: bool,
    /// Stopped because the WAL outgrew its bound (not by shutdown).
    gave_way: bool,
    handle: Option<rusqlite::InterruptHandle>,
}

impl std::fmt::Debug for BackgroundCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BackgroundCheck")
    }
}

impl BackgroundCheck {
    fn lock(&self) -> std::sync::MutexGuard<'_, CheckState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Register `conn` as the check's connection; false once interrupted.
    fn arm(&self, conn: &Connection) -> bool {
        let mut s = self.lock();
        if s.stopped {
            return false;
        }
        s.handle = Some(conn.get_interrupt_handle());
        true
    }

    fn disarm(&self) {
        self.lock().handle = None;
    }

    /// Stop the check because the WAL outgrew its bound while it read.
    fn give_way(&self) {
        self.lock().gave_way = true;
        self.interrupt();
    }

    fn gave_way(&self) -> bool {
        self.lock().gave_way
    }

    /// Stop the check now (or before it starts); returns at once.
    pub fn interrupt(&self) {
        let mut s = self.lock();
        s.stopped = true;
        if let Some(h) = s.handle.take() {
            h.interrupt();
        }
    }
}

/// Open (creating if needed), check integrity, migrate. Runs before any actor
/// starts (R32: stores come right after config).
pub fn open_store(opts: &StoreOptions) -> Result<(Connection, OpenReport), StoreError> {
    open_store_noted(opts, &mut |_, _| {})
}

/// [`open_store`], telling `step(done, total)` after each migration
/// applied (`keel migrate` shows it).
pub fn open_store_noted(
    opts: &StoreOptions,
    step: &mut dyn FnMut(u64, u64),
) -> Result<(Connection, OpenReport), StoreError> {
    if let Some(path) = &opts.path {
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).map_err(|e| StoreError::Open {
                path: dir.to_path_buf(),
                detail: format!("cannot create data dir: {e}"),
            })?;
        }
        check_not_vanished(path)?;
    }
    let mut conn = open_connection(opts)?;
    let path = opts.display_path();
    let mut deferred_check = None;
    if let Some(db) = &opts.path {
        // `quick_check` reads every page (~1.4 s for a million timers): a
        // small file is checked before start, a large one after, so start
        // time stays independent of how much is stored (issue 3). A damaged
        // page of a large file is still refused by SQLite when touched.
        let size = fs::metadata(db).map(|m| m.len()).unwrap_or(0);
        if size <= SYNC_CHECK_MAX_BYTES {
            let problems = meta::quick_check(&conn)
                .map_err(|e| classify_key_error(&path, opts.key.as_ref(), e))?;
            if problems != ["ok"] {
                return Err(StoreError::Corrupt {
                    path,
                    detail: format!("quick_check: {}", problems.join("; ")),
                });
            }
        } else {
            // A cheap read of the schema page still refuses a bad header.
            conn.query_row("SELECT COUNT(*) FROM sqlite_master", [], |r| {
                r.get::<_, i64>(0)
            })
            .map_err(|e| classify_key_error(&path, opts.key.as_ref(), e))?;
            deferred_check = Some(db.clone());
        }
    }
    let report = migrate::migrate_noted(&mut conn, &path, step)?;
    let data_loss = match &opts.path {
        Some(db) => super::acked::check(&conn, db)?,
        None => None,
    };
    if let Some(db) = &opts.path {
        let _ = fs::set_permissions(db, fs::Permissions::from_mode(0o600));
        let marker = db.with_file_name(MARKER);
        if !marker.exists() {
            crate::fsutil::write_atomic(&marker, b"keel data dir\n").map_err(|e| {
                StoreError::Open {
                    path: marker.clone(),
                    detail: e.to_string(),
                }
            })?;
        }
    }
    Ok((
        conn,
        OpenReport {
            migrated_from: report.from,
            schema_version: report.to,
            deferred_check,
            data_loss,
        },
    ))
}

/// A read-only connection to the existing file `path`, unlocked with `key`
/// and checked by one read of the schema.
///
/// A hot rollback journal beside the file (a writer killed in the middle
/// of a rollback-mode transaction, such as the switch to WAL of a copy a
/// rekey installed) cannot be rolled back by a read-only connection
/// (`SQLITE_READONLY_ROLLBACK`). The next writer would roll it back; a
/// reader does the same once, with a read-write connection that creates
/// nothing, and then reads.
pub(crate) fn connect_read_only(
    path: &Path,
    key: Option<&KeyHandle>,
) -> Result<Connection, StoreError> {
    let open = |flags: OpenFlags| -> Result<(Connection, rusqlite::Result<i64>), StoreError> {
        let conn = Connection::open_with_flags(path, flags | OpenFlags::SQLITE_OPEN_NO_MUTEX)
            .map_err(|e| classify_open_error(path, e))?;
        apply_key(&conn, path, key)?;
        conn.busy_timeout(Duration::from_secs(5))?;
        let probe = conn.query_row("SELECT COUNT(*) FROM sqlite_master", [], |r| r.get(0));
        Ok((conn, probe))
    };
    let (conn, probe) = open(OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    match probe {
        Ok(_) => return Ok(conn),
        Err(e) if !is_hot_journal(&e) => return Err(classify_key_error(path, key, e)),
        Err(_) => drop(conn),
    }
    let (writer, probe) = open(OpenFlags::SQLITE_OPEN_READ_WRITE)?;
    probe.map_err(|e| classify_key_error(path, key, e))?;
    drop(writer);
    let (conn, probe) = open(OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    probe.map_err(|e| classify_key_error(path, key, e))?;
    Ok(conn)
}

/// `SQLITE_READONLY_ROLLBACK`: a read-only connection met a hot journal.
fn is_hot_journal(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _)
        if f.extended_code == rusqlite::ffi::SQLITE_READONLY_ROLLBACK)
}

/// Open an existing database read-only for operator commands (`keel status`,
/// `keel sessions`): safe while the daemon runs, never creates a file.
pub fn open_read_only(path: &Path, key: Option<&KeyHandle>) -> Result<Connection, StoreError> {
    if !path.exists() {
        return Err(StoreError::Open {
            path: path.to_path_buf(),
            detail: "no database here (has keel run with this --data-dir?)".into(),
        });
    }
    let conn = connect_read_only(path, key)?;
    migrate::check_not_newer(&conn, path).map_err(|e| match e {
        StoreError::Unavailable(d) | StoreError::Sqlite(d) => StoreError::Corrupt {
            path: path.to_path_buf(),
            detail: d,
        },
        other => other,
    })?;
    Ok(conn)
}
