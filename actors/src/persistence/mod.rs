//! The PersistenceActor: sole owner of the SQLite connection, group commit.
//!
//! Requests arrive as actix messages and are handed to one writer thread over
//! a channel. The writer takes everything that queued up while the previous
//! commit was syncing (up to `max_batch`) and runs it in ONE transaction, each
//! job inside its own savepoint, then COMMITs (one fsync with
//! `synchronous=FULL`). Only after COMMIT returns does any caller get its
//! reply, so an acknowledgement always follows durability (R1, R4). A lone
//! request never waits for a batch to fill: the writer commits whatever it
//! has as soon as the channel is empty.
//!
//! A storage failure (disk full, EIO, read-only) fails the whole batch; the
//! writer drops the connection (after a failed fsync the old handle cannot be
//! trusted), reports `degraded`, and probes with a tiny write until storage
//! works again (R35).

pub mod adapter_state;
pub mod migrate;
pub mod store;
pub mod tasks;
pub mod timers;

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use actix::prelude::*;
pub use rusqlite::Connection;
use rusqlite::OpenFlags;
use tokio::sync::oneshot;

use crate::clock::{Clock, Stamp};
use crate::config::{Config, Synchronous};
use crate::error::StoreError;
use crate::health::Health;
use crate::metrics::Metrics;
pub use adapter_state::{GetAdapterState, PutAdapterState};
pub use store::{
    AwaitingTurn, Exchange, ExchangeOutcome, OutboxRow, ReplyPlan, SessionKey, SessionSnapshot,
    SessionSummary, StoreStats, TurnRow,
};

/// How the store is opened.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// `None` = in memory (`--ephemeral`).
    pub path: Option<PathBuf>,
    pub synchronous: Synchronous,
    pub busy_timeout: Duration,
    pub max_batch: usize,
    pub probe_interval: Duration,
}

impl StoreOptions {
    pub fn from_config(config: &Config) -> StoreOptions {
        StoreOptions {
            path: config.db_path(),
            synchronous: config.storage.synchronous,
            busy_timeout: Duration::from_millis(config.storage.busy_timeout_ms),
            max_batch: config.storage.max_batch,
            probe_interval: Duration::from_millis(config.storage.probe_interval_ms),
        }
    }

    fn display_path(&self) -> PathBuf {
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
}

/// Open a connection and set the pragmas keel relies on. A damaged file is
/// reported as `Corrupt`; nothing is ever created over it.
pub fn open_connection(opts: &StoreOptions) -> Result<Connection, StoreError> {
    let Some(path) = &opts.path else {
        let conn = Connection::open_in_memory().map_err(|e| StoreError::Open {
            path: opts.display_path(),
            detail: e.to_string(),
        })?;
        conn.execute_batch("PRAGMA foreign_keys = ON;")?;
        return Ok(conn);
    };
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| classify_open_error(path, e))?;
    conn.busy_timeout(opts.busy_timeout)
        .map_err(|e| classify_open_error(path, e))?;
    let mode: String = conn
        .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
        .map_err(|e| classify_open_error(path, e))?;
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
    conn.execute_batch(&format!(
        "PRAGMA synchronous = {sync}; PRAGMA foreign_keys = ON; PRAGMA wal_autocheckpoint = 4000;"
    ))
    .map_err(|e| classify_open_error(path, e))?;
    Ok(conn)
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

/// Write `bytes` to `path` atomically: temp file, fsync, rename, fsync dir.
/// Files are created 0600 (they hold state).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Largest database file `open_store` checks with `quick_check` before
/// start (about 50 ms of reading); larger ones are checked in background.
pub const SYNC_CHECK_MAX_BYTES: u64 = 8 << 20;

/// `quick_check` a large database on its own read-only connection after
/// start. Damage is logged as an error naming the file and makes `/readyz`
/// report `degraded` for good (`Health::storage_corrupt`): the operator must
/// see it, and it does not clear on the next successful write.
pub fn check_in_background(db: PathBuf, health: Health) {
    let spawned = std::thread::Builder::new()
        .name("keel-quick-check".into())
        .spawn(move || {
            let result = open_read_only(&db).and_then(|c| Ok(store::quick_check(&c)?));
            match result {
                Ok(p) if p == ["ok"] => tracing::debug!(path = %db.display(), "quick_check ok"),
                Ok(p) => {
                    let problems = p.join("; ");
                    tracing::error!(
                        path = %db.display(),
                        problems = %problems,
                        "database is corrupt (background quick_check); stop keel and repair it"
                    );
                    health.storage_corrupt(&format!("{}: {problems}", db.display()));
                }
                Err(e) => tracing::warn!(path = %db.display(), error = %e, "background quick_check failed"),
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the background quick_check");
    }
}

/// Open (creating if needed), check integrity, migrate. Runs before any actor
/// starts (R32: stores come right after config).
pub fn open_store(opts: &StoreOptions) -> Result<(Connection, OpenReport), StoreError> {
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
            let problems = store::quick_check(&conn).map_err(|e| classify_open_error(&path, e))?;
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
            .map_err(|e| classify_open_error(&path, e))?;
            deferred_check = Some(db.clone());
        }
    }
    let report = migrate::migrate(&mut conn, &path)?;
    if let Some(db) = &opts.path {
        let _ = fs::set_permissions(db, fs::Permissions::from_mode(0o600));
        let marker = db.with_file_name(MARKER);
        if !marker.exists() {
            write_atomic(&marker, b"keel data dir\n").map_err(|e| StoreError::Open {
                path: marker.clone(),
                detail: e.to_string(),
            })?;
        }
    }
    Ok((
        conn,
        OpenReport {
            migrated_from: report.from,
            schema_version: report.to,
            deferred_check,
        },
    ))
}

/// Open an existing database read-only for operator commands (`keel status`,
/// `keel sessions`): safe while the daemon runs, never creates a file.
pub fn open_read_only(path: &Path) -> Result<Connection, StoreError> {
    if !path.exists() {
        return Err(StoreError::Open {
            path: path.to_path_buf(),
            detail: "no database here (has keel run with this --data-dir?)".into(),
        });
    }
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| classify_open_error(path, e))?;
    conn.busy_timeout(Duration::from_secs(5))?;
    migrate::check_not_newer(&conn, path).map_err(|e| match e {
        StoreError::Unavailable(d) | StoreError::Sqlite(d) => StoreError::Corrupt {
            path: path.to_path_buf(),
            detail: d,
        },
        other => other,
    })?;
    Ok(conn)
}

// ---------------------------------------------------------------------------
// Background checkpoints.

/// WAL size (pages) after a commit at which the checkpointer is nudged.
const CHECKPOINT_NUDGE_PAGES: i32 = 4_000;
/// WAL size at which the writer checkpoints inline, as SQLite's own
/// auto-checkpoint would: under sustained load a background PASSIVE
/// checkpoint may never catch up, and the WAL must stay bounded.
const CHECKPOINT_FORCE_PAGES: i32 = 32_000;

/// Runs `PRAGMA wal_checkpoint(PASSIVE)` on its own connection when nudged,
/// so copying the WAL back into the database (and its fsync) happens beside
/// the writer instead of inside one unlucky commit.
struct Checkpointer {
    nudge: mpsc::SyncSender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl Checkpointer {
    fn start(opts: &StoreOptions) -> Option<Checkpointer> {
        opts.path.as_ref()?;
        let (nudge, rx) = mpsc::sync_channel::<()>(1);
        let opts = opts.clone();
        let thread = std::thread::Builder::new()
            .name("keel-checkpoint".into())
            .spawn(move || {
                let mut conn: Option<Connection> = None;
                while rx.recv().is_ok() {
                    if conn.is_none() {
                        conn = open_connection(&opts).ok();
                    }
                    let Some(c) = &conn else { continue };
                    if let Err(e) =
                        c.wal_checkpoint_v2(None::<&str>, rusqlite::wal::CheckpointMode::PASSIVE)
                    {
                        // The writer sees storage trouble on its own writes;
                        // here it is only worth a retry with a fresh handle.
                        tracing::debug!(error = %e, "background checkpoint failed");
                        conn = None;
                    }
                }
            })
            .expect("spawn the checkpoint thread");
        Some(Checkpointer { nudge, thread })
    }

    /// Stop the thread; returns once no checkpoint is running.
    fn stop(self) {
        drop(self.nudge);
        let _ = self.thread.join();
    }
}

/// Replace SQLite's inline auto-checkpoint with a nudge to the checkpointer
/// (and an inline checkpoint only past the hard bound).
fn install_wal_hook(
    conn: &mut Connection,
    nudge: Option<mpsc::SyncSender<()>>,
) -> Result<(), StoreError> {
    let Some(nudge) = nudge else {
        return Ok(());
    };
    conn.wal_hook(Some(
        move |wal: &mut rusqlite::hooks::Wal, pages: std::ffi::c_int| {
            if pages >= CHECKPOINT_FORCE_PAGES {
                // Never fail the hook: its error would be reported as a failed
                // COMMIT although the transaction is already durable. BUSY here
                // means the background checkpoint is running; the next commit
                // tries again.
                if let Err(e) = wal.checkpoint() {
                    tracing::debug!(error = %e, pages, "inline checkpoint skipped");
                }
            } else if pages >= CHECKPOINT_NUDGE_PAGES {
                // Full channel = a nudge is already pending: nothing to add.
                let _ = nudge.try_send(());
            }
            Ok(())
        },
    ))?;
    Ok(())
}

// ---------------------------------------------------------------------------
// The writer thread.

/// A unit of work run inside the group transaction.
trait Job: Send {
    /// Run inside a savepoint. `Ok(true)`: keep; `Ok(false)`: this job failed
    /// on its own (its savepoint is rolled back, the batch goes on);
    /// `Err`: storage failed, the whole batch is rolled back.
    fn run(&mut self, conn: &Connection, at: &Stamp) -> Result<bool, StoreError>;
    /// Deliver the outcome once the batch is durable (or failed).
    fn finish(self: Box<Self>, batch: Result<(), StoreError>);
}

struct FnJob<T, F> {
    f: Option<F>,
    out: Option<Result<T, StoreError>>,
    reply: oneshot::Sender<Result<T, StoreError>>,
}

impl<T, F> Job for FnJob<T, F>
where
    T: Send + 'static,
    F: FnOnce(&Connection, &Stamp) -> Result<T, StoreError> + Send + 'static,
{
    fn run(&mut self, conn: &Connection, at: &Stamp) -> Result<bool, StoreError> {
        let Some(f) = self.f.take() else {
            return Ok(false);
        };
        let out = f(conn, at);
        let ok = match &out {
            Ok(_) => true,
            Err(StoreError::Unavailable(reason)) => {
                return Err(StoreError::Unavailable(reason.clone()))
            }
            Err(_) => false,
        };
        self.out = Some(out);
        Ok(ok)
    }

    fn finish(self: Box<Self>, batch: Result<(), StoreError>) {
        let result = match batch {
            Err(e) => Err(e),
            Ok(()) => self.out.unwrap_or(Err(StoreError::Closed)),
        };
        // The caller may have gone away (e.g. its HTTP client hung up); the
        // work is committed either way.
        let _ = self.reply.send(result);
    }
}

enum Cmd {
    Job(Box<dyn Job>),
    /// Checkpoint and close; the writer exits after replying.
    Close(oneshot::Sender<Result<(i64, i64, i64), StoreError>>),
}

struct Writer {
    conn: Option<Connection>,
    checkpointer: Option<Checkpointer>,
    opts: StoreOptions,
    health: Health,
    metrics: Metrics,
    /// Timestamps of every row written (one per batch).
    clock: Arc<dyn Clock>,
    rx: mpsc::Receiver<Cmd>,
    degraded: bool,
}

impl Writer {
    fn run(mut self) {
        loop {
            let first = if self.degraded {
                match self.rx.recv_timeout(self.opts.probe_interval) {
                    Ok(cmd) => cmd,
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        self.probe();
                        continue;
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                }
            } else {
                match self.rx.recv() {
                    Ok(cmd) => cmd,
                    Err(_) => break,
                }
            };
            let mut jobs = Vec::new();
            let mut close = None;
            match first {
                Cmd::Job(j) => jobs.push(j),
                Cmd::Close(tx) => close = Some(tx),
            }
            while close.is_none() && jobs.len() < self.opts.max_batch {
                match self.rx.try_recv() {
                    Ok(Cmd::Job(j)) => jobs.push(j),
                    Ok(Cmd::Close(tx)) => close = Some(tx),
                    Err(_) => break,
                }
            }
            if !jobs.is_empty() {
                self.commit(jobs);
            }
            if let Some(tx) = close {
                let _ = tx.send(self.close());
                return;
            }
        }
        // Every sender is gone: close cleanly anyway.
        let _ = self.close();
    }

    /// The connection, reopened if a failure dropped it.
    fn connection(&mut self) -> Result<&Connection, StoreError> {
        if self.conn.is_none() {
            let mut conn = open_connection(&self.opts)?;
            install_wal_hook(
                &mut conn,
                self.checkpointer.as_ref().map(|c| c.nudge.clone()),
            )?;
            let path = self.opts.display_path();
            let v = migrate::check_not_newer(&conn, &path)?;
            if v != migrate::latest_version() {
                return Err(StoreError::Invalid(format!(
                    "{} changed schema version under us ({v})",
                    path.display()
                )));
            }
            tracing::info!(path = %path.display(), "reopened database");
            self.conn = Some(conn);
        }
        Ok(self.conn.as_ref().expect("just set"))
    }

    #[allow(clippy::disallowed_methods)] // real elapsed time of a commit, for a metric
    fn commit(&mut self, mut jobs: Vec<Box<dyn Job>>) {
        let started = Instant::now();
        let n = jobs.len();
        let mut wrote = false;
        let clock = self.clock.clone();
        let result = self.connection().and_then(|conn| {
            let before = conn.total_changes();
            // Cached statements: these run once or twice per job, so parsing
            // them every time would be a measurable share of the hot path.
            let exec = |sql: &str| -> Result<(), StoreError> {
                conn.prepare_cached(sql)?.execute([])?;
                Ok(())
            };
            exec("BEGIN IMMEDIATE")?;
            // One time for the whole batch, from the injected clock.
            let at = clock.stamp();
            for job in jobs.iter_mut() {
                exec("SAVEPOINT job")?;
                if job.run(conn, &at)? {
                    exec("RELEASE job")?;
                } else {
                    exec("ROLLBACK TO job")?;
                    exec("RELEASE job")?;
                }
            }
            exec("COMMIT")?;
            wrote = conn.total_changes() > before;
            Ok(())
        });
        match &result {
            Ok(()) => {
                self.metrics.commit_batch_size.observe(n as f64);
                self.metrics
                    .commit_seconds
                    .observe(started.elapsed().as_secs_f64());
                // A batch of reads proves nothing about writing; only a
                // durable write (or the probe) ends a degraded period.
                if wrote {
                    self.recovered();
                }
            }
            Err(e) => self.failed(e),
        }
        for job in jobs {
            job.finish(result.clone());
        }
    }

    fn probe(&mut self) {
        let at = self.clock.stamp();
        let result = self.connection().and_then(|conn| {
            conn.execute_batch("BEGIN IMMEDIATE")?;
            store::probe(conn, &at)?;
            conn.execute_batch("COMMIT")?;
            Ok(())
        });
        match result {
            Ok(()) => self.recovered(),
            Err(e) => {
                tracing::debug!(error = %e, "storage probe failed");
                self.drop_connection();
            }
        }
    }

    fn recovered(&mut self) {
        if self.degraded {
            self.degraded = false;
            self.health.storage_ok();
            tracing::warn!("storage recovered; accepting messages again");
        }
    }

    fn failed(&mut self, e: &StoreError) {
        self.metrics.commit_failures.inc();
        let reason = e.to_string();
        if !self.degraded {
            tracing::error!(error = %reason, "commit failed; nothing in this batch was acknowledged");
        }
        self.degraded = true;
        self.health.storage_failed(&reason);
        self.drop_connection();
    }

    /// After a failed write the handle is not trusted again (fsyncgate): roll
    /// back whatever is open and reopen on the next attempt. An in-memory
    /// database cannot be reopened without losing it, so it is kept.
    fn drop_connection(&mut self) {
        if let Some(conn) = &self.conn {
            if !conn.is_autocommit() {
                let _ = conn.execute_batch("ROLLBACK");
            }
        }
        if self.opts.path.is_some() {
            self.conn = None;
        }
    }

    fn close(&mut self) -> Result<(i64, i64, i64), StoreError> {
        if let Some(conn) = self.conn.as_mut() {
            // Drops the hook's copy of the nudge sender.
            let _ = conn.wal_hook(
                None::<fn(&mut rusqlite::hooks::Wal, std::ffi::c_int) -> rusqlite::Result<()>>,
            );
        }
        if let Some(c) = self.checkpointer.take() {
            c.stop();
        }
        let Some(conn) = self.conn.take() else {
            return Err(StoreError::Unavailable(
                "database was not open at shutdown".into(),
            ));
        };
        let result = if self.opts.path.is_some() {
            store::checkpoint_truncate(&conn)
        } else {
            Ok((0, 0, 0))
        };
        if let Err((_, e)) = conn.close() {
            return Err(StoreError::from_sqlite(e));
        }
        result
    }
}

// ---------------------------------------------------------------------------
// The actor façade.

/// Owns the writer thread. Handlers return at once (the work is queued to the
/// writer), so the mailbox drains as fast as messages arrive.
pub struct PersistenceActor {
    tx: Option<mpsc::Sender<Cmd>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl PersistenceActor {
    /// Start the writer thread over an opened connection.
    pub fn new(
        mut conn: Connection,
        opts: StoreOptions,
        health: Health,
        metrics: Metrics,
        clock: Arc<dyn Clock>,
    ) -> PersistenceActor {
        let checkpointer = Checkpointer::start(&opts);
        if let Err(e) = install_wal_hook(&mut conn, checkpointer.as_ref().map(|c| c.nudge.clone()))
        {
            tracing::warn!(error = %e, "cannot install the WAL hook; SQLite checkpoints inline");
        }
        let (tx, rx) = mpsc::channel();
        let writer = Writer {
            conn: Some(conn),
            checkpointer,
            opts,
            health,
            metrics,
            clock,
            rx,
            degraded: false,
        };
        let thread = std::thread::Builder::new()
            .name("keel-writer".into())
            .spawn(move || writer.run())
            .expect("spawn the writer thread");
        PersistenceActor {
            tx: Some(tx),
            thread: Some(thread),
        }
    }

    /// Queue `f` for the next group commit; resolves after it is durable.
    pub(crate) fn call<T, F>(&self, f: F) -> ResponseFuture<Result<T, StoreError>>
    where
        T: Send + 'static,
        F: FnOnce(&Connection, &Stamp) -> Result<T, StoreError> + Send + 'static,
    {
        let (reply, rx) = oneshot::channel();
        let job = Box::new(FnJob {
            f: Some(f),
            out: None,
            reply,
        });
        let sent = self
            .tx
            .as_ref()
            .map(|tx| tx.send(Cmd::Job(job)).is_ok())
            .unwrap_or(false);
        Box::pin(async move {
            if !sent {
                return Err(StoreError::Closed);
            }
            rx.await.unwrap_or(Err(StoreError::Closed))
        })
    }
}

impl Actor for PersistenceActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // Handlers only enqueue, so a deep mailbox costs little and keeps
        // bursts from back-pressuring every adapter at actix's default of 16.
        ctx.set_mailbox_capacity(65_536);
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        // Dropping the sender lets the writer finish its queue and close.
        self.tx.take();
    }
}

impl Drop for PersistenceActor {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Store an inbound turn (+ reply + outbox row). Sent by session actors; the
/// adapter acknowledges upstream only after `Ok`.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<ExchangeOutcome, StoreError>")]
pub struct CommitExchange(pub Exchange);

impl Handler<CommitExchange> for PersistenceActor {
    type Result = ResponseFuture<Result<ExchangeOutcome, StoreError>>;
    fn handle(&mut self, msg: CommitExchange, _: &mut Context<Self>) -> Self::Result {
        self.call(move |c, at| store::commit_exchange(c, at, &msg.0))
    }
}

/// Store the external agent's reply. Sent by session actors.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<Option<(i64, Option<i64>)>, StoreError>")]
pub struct CommitAgentReply {
    pub session: SessionKey,
    pub user_seq: i64,
    pub reply: ReplyPlan,
}

impl Handler<CommitAgentReply> for PersistenceActor {
    type Result = ResponseFuture<Result<Option<(i64, Option<i64>)>, StoreError>>;
    fn handle(&mut self, msg: CommitAgentReply, _: &mut Context<Self>) -> Self::Result {
        self.call(move |c, at| {
            store::commit_agent_reply(c, at, &msg.session, msg.user_seq, &msg.reply)
        })
    }
}

/// A notice from keel itself to a chat (startup notification). Sent by the app.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<(i64, Option<i64>), StoreError>")]
pub struct CommitNotice {
    pub session: SessionKey,
    pub text: String,
    pub deliver: bool,
}

impl Handler<CommitNotice> for PersistenceActor {
    type Result = ResponseFuture<Result<(i64, Option<i64>), StoreError>>;
    fn handle(&mut self, msg: CommitNotice, _: &mut Context<Self>) -> Self::Result {
        self.call(move |c, at| store::commit_notice(c, at, &msg.session, &msg.text, msg.deliver))
    }
}

/// Load a session's memory and recent turns. Sent by a session actor on wake.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<Option<SessionSnapshot>, StoreError>")]
pub struct GetSession {
    pub id: String,
    pub tail: i64,
}

impl Handler<GetSession> for PersistenceActor {
    type Result = ResponseFuture<Result<Option<SessionSnapshot>, StoreError>>;
    fn handle(&mut self, msg: GetSession, _: &mut Context<Self>) -> Self::Result {
        self.call(move |c, _| store::load_session(c, &msg.id, msg.tail))
    }
}

/// Turns of one session for the admin API.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<Option<Vec<TurnRow>>, StoreError>")]
pub struct GetTurns {
    pub session: String,
    pub after_seq: i64,
    pub limit: i64,
}

impl Handler<GetTurns> for PersistenceActor {
    type Result = ResponseFuture<Result<Option<Vec<TurnRow>>, StoreError>>;
    fn handle(&mut self, msg: GetTurns, _: &mut Context<Self>) -> Self::Result {
        self.call(move |c, _| store::session_turns(c, &msg.session, msg.after_seq, msg.limit))
    }
}

/// All sessions for the admin API.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<Vec<SessionSummary>, StoreError>")]
pub struct GetSessions;

impl Handler<GetSessions> for PersistenceActor {
    type Result = ResponseFuture<Result<Vec<SessionSummary>, StoreError>>;
    fn handle(&mut self, _: GetSessions, _: &mut Context<Self>) -> Self::Result {
        self.call(|c, _| store::list_sessions(c))
    }
}

/// Pending outbox rows after an id. Sent by the outbox actor.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<Vec<OutboxRow>, StoreError>")]
pub struct GetPendingOutbox {
    pub after: i64,
    pub limit: i64,
    /// Also return the rows in state `unknown` (one scan; the outbox asks
    /// at start and after new routes only).
    pub with_unknown: bool,
}

impl Handler<GetPendingOutbox> for PersistenceActor {
    type Result = ResponseFuture<Result<Vec<OutboxRow>, StoreError>>;
    fn handle(&mut self, msg: GetPendingOutbox, _: &mut Context<Self>) -> Self::Result {
        self.call(move |c, _| {
            let mut rows = store::pending_outbox(c, msg.after, msg.limit)?;
            // Rows whose last send had an unknown outcome are resent too.
            if msg.with_unknown {
                rows.extend(store::unknown_outbox(c, msg.limit)?);
                rows.sort_by_key(|r| r.id);
            }
            Ok(rows)
        })
    }
}

/// How a send attempt ended. Sent by the outbox actor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendOutcome {
    Sent,
    /// Failed; stays `pending` and is retried.
    Failed(String),
    /// The request left but no answer came: state `unknown`, still retried.
    Unknown(String),
    /// Rejected for good: state `failed`.
    GaveUp(String),
}

/// Record the outcome of one send attempt.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<(), StoreError>")]
pub struct RecordSend {
    pub id: i64,
    pub outcome: SendOutcome,
}

impl Handler<RecordSend> for PersistenceActor {
    type Result = ResponseFuture<Result<(), StoreError>>;
    fn handle(&mut self, msg: RecordSend, _: &mut Context<Self>) -> Self::Result {
        self.call(move |c, at| match &msg.outcome {
            SendOutcome::Sent => store::mark_outbox_sent(c, at, msg.id),
            SendOutcome::Failed(e) => store::record_outbox_failure(c, msg.id, e),
            SendOutcome::Unknown(e) => store::mark_outbox_unknown(c, msg.id, e),
            SendOutcome::GaveUp(e) => store::mark_outbox_failed(c, msg.id, e),
        })
    }
}

/// User turns waiting for the agent. Sent by the session registry at start.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<Vec<AwaitingTurn>, StoreError>")]
pub struct GetAwaiting {
    pub limit: i64,
}

impl Handler<GetAwaiting> for PersistenceActor {
    type Result = ResponseFuture<Result<Vec<AwaitingTurn>, StoreError>>;
    fn handle(&mut self, msg: GetAwaiting, _: &mut Context<Self>) -> Self::Result {
        self.call(move |c, _| store::awaiting_turns(c, msg.limit))
    }
}

/// Count this start and read the store's counts. Sent once by the app.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<StoreStats, StoreError>")]
pub struct RecordBoot;

impl Handler<RecordBoot> for PersistenceActor {
    type Result = ResponseFuture<Result<StoreStats, StoreError>>;
    fn handle(&mut self, _: RecordBoot, _: &mut Context<Self>) -> Self::Result {
        self.call(|c, _| {
            store::next_boot_epoch(c)?;
            store::stats(c)
        })
    }
}

/// Store counts for `/metrics` and status.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<StoreStats, StoreError>")]
pub struct GetStats;

impl Handler<GetStats> for PersistenceActor {
    type Result = ResponseFuture<Result<StoreStats, StoreError>>;
    fn handle(&mut self, _: GetStats, _: &mut Context<Self>) -> Self::Result {
        self.call(|c, _| store::stats(c))
    }
}

/// Last step of shutdown (R33): finish queued work, checkpoint the WAL
/// (TRUNCATE), close. Sent by the lifecycle controller after intake stopped
/// and in-flight work drained. Returns (busy, wal frames, checkpointed).
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<(i64, i64, i64), StoreError>")]
pub struct CloseStore;

impl Handler<CloseStore> for PersistenceActor {
    type Result = ResponseFuture<Result<(i64, i64, i64), StoreError>>;
    fn handle(&mut self, _: CloseStore, _: &mut Context<Self>) -> Self::Result {
        let (reply, rx) = oneshot::channel();
        let sent = self
            .tx
            .take()
            .map(|tx| tx.send(Cmd::Close(reply)).is_ok())
            .unwrap_or(false);
        let thread = self.thread.take();
        Box::pin(async move {
            if !sent {
                return Err(StoreError::Closed);
            }
            let result = rx.await.unwrap_or(Err(StoreError::Closed));
            if let Some(t) = thread {
                let _ = tokio::task::spawn_blocking(move || t.join()).await;
            }
            result
        })
    }
}
