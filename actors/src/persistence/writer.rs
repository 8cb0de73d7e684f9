//! The writer thread: the one connection that writes. It takes every job
//! that queued while the previous commit was syncing (up to `max_batch`),
//! runs each in its own SAVEPOINT inside one `BEGIN IMMEDIATE … COMMIT`
//! (one fsync), and only then answers every caller. A storage failure fails
//! the batch, drops the connection and probes until writes work again.
//! Beside it, a checkpoint thread copies the WAL back (PASSIVE) when the
//! writer's WAL hook nudges it.

use std::sync::{mpsc, Arc};
use std::time::Instant;

use rusqlite::Connection;
use tokio::sync::oneshot;

use super::open::{open_connection, StoreOptions};
use super::{meta, migrate};
use crate::clock::{Clock, Stamp};
use crate::error::StoreError;
use crate::health::Health;
use crate::metrics::Metrics;

/// WAL size (pages) after a commit at which the checkpointer is nudged.
const CHECKPOINT_NUDGE_PAGES: i32 = 4_000;

/// WAL size at which the writer checkpoints inline, as SQLite's own
/// auto-checkpoint would: under sustained load a background PASSIVE
/// checkpoint may never catch up, and the WAL must stay bounded.
const CHECKPOINT_FORCE_PAGES: i32 = 32_000;

/// Runs `PRAGMA wal_checkpoint(PASSIVE)` on its own connection when nudged,
/// so copying the WAL back into the database (and its fsync) happens beside
/// the writer instead of inside one unlucky commit.
pub(super) struct Checkpointer {
    nudge: mpsc::SyncSender<()>,
    thread: std::thread::JoinHandle<()>,
}

/// Notes each completed checkpoint in [`Health`] (time, frames) for the
/// console: one uncontended lock after the checkpoint, never on a commit.
#[derive(Clone)]
pub(super) struct CheckpointLog {
    health: Health,
    clock: Arc<dyn Clock>,
}

impl CheckpointLog {
    fn done(&self, mode: &'static str, (wal, copied): (std::ffi::c_int, std::ffi::c_int)) {
        self.health.checkpointed(crate::health::Checkpoint {
            at_ms: self.clock.now_ms(),
            mode,
            wal_frames: i64::from(wal),
            checkpointed_frames: i64::from(copied),
        });
    }
}

impl Checkpointer {
    fn start(opts: &StoreOptions, log: CheckpointLog) -> Option<Checkpointer> {
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
                    crate::failpoint::hit("mid_checkpoint");
                    match c.wal_checkpoint_v2(None::<&str>, rusqlite::wal::CheckpointMode::PASSIVE)
                    {
                        Ok(frames) => log.done("background", frames),
                        Err(e) => {
                            // The writer sees storage trouble on its own writes;
                            // here it is only worth a retry with a fresh handle.
                            tracing::debug!(error = %e, "background checkpoint failed");
                            conn = None;
                        }
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

/// The writer connection's own settings. `cache_spill = OFF`: a group
/// commit's dirty pages stay in memory until COMMIT instead of spilling to
/// the WAL once they pass `cache_size` (a spill writes the pages out and
/// then again at COMMIT). A batch is bounded (`max_batch` jobs, a timer
/// window at most 1024 fires each), so the cache grows at most by one
/// batch's pages, and only while that batch runs.
fn tune_writer(conn: &Connection) -> Result<(), StoreError> {
    conn.execute_batch("PRAGMA cache_spill = OFF;")?;
    Ok(())
}

/// Replace SQLite's inline auto-checkpoint with a nudge to the checkpointer
/// (and an inline checkpoint only past the hard bound).
pub(super) fn install_wal_hook(
    conn: &mut Connection,
    nudge: Option<mpsc::SyncSender<()>>,
    log: CheckpointLog,
) -> Result<(), StoreError> {
    let Some(nudge) = nudge else {
        return Ok(());
    };
    conn.wal_hook(Some(
        move |wal: &mut rusqlite::hooks::Wal, pages: std::ffi::c_int| {
            if pages >= CHECKPOINT_FORCE_PAGES {
                // A long reader (the background quick_check of a large store)
                // keeps the WAL from being restarted however often it is
                // checkpointed: it gives way. Under a kill loop it never
                // finishes anyway, and the WAL grew by gigabytes (issue 12).
                log.health.wal_pressure();
                // Never fail the hook: its error would be reported as a failed
                // COMMIT although the transaction is already durable. BUSY here
                // means the background checkpoint is running; the next commit
                // tries again.
                match wal.checkpoint_v2(rusqlite::wal::CheckpointMode::PASSIVE) {
                    Ok(frames) => log.done("inline", frames),
                    Err(e) => tracing::debug!(error = %e, pages, "inline checkpoint skipped"),
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

/// A unit of work run inside the group transaction.
pub(super) trait Job: Send {
    /// Run inside a savepoint. `Ok(true)`: keep; `Ok(false)`: this job failed
    /// on its own (its savepoint is rolled back, the batch goes on);
    /// `Err`: storage failed, the whole batch is rolled back.
    fn run(&mut self, conn: &Connection, at: &Stamp) -> Result<bool, StoreError>;
    /// Deliver the outcome once the batch is durable (or failed).
    fn finish(self: Box<Self>, batch: Result<(), StoreError>);
}

pub(super) struct FnJob<T, F> {
    f: Option<F>,
    out: Option<Result<T, StoreError>>,
    reply: oneshot::Sender<Result<T, StoreError>>,
}

impl<T, F> FnJob<T, F> {
    /// A job running `f`; its result goes to `reply` after the commit.
    pub(super) fn new(f: F, reply: oneshot::Sender<Result<T, StoreError>>) -> FnJob<T, F> {
        FnJob {
            f: Some(f),
            out: None,
            reply,
        }
    }
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

pub(super) enum Cmd {
    Job(Box<dyn Job>),
    /// Checkpoint and close; the writer exits after replying.
    Close(oneshot::Sender<Result<(i64, i64, i64), StoreError>>),
}

pub(super) struct Writer {
    conn: Option<Connection>,
    checkpointer: Option<Checkpointer>,
    opts: StoreOptions,
    health: Health,
    metrics: Metrics,
    /// Timestamps of every row written (one per batch).
    clock: Arc<dyn Clock>,
    rx: mpsc::Receiver<Cmd>,
    degraded: bool,
    /// R39: the fsync'd record of the highest acknowledged commit (none in memory).
    acked: Option<super::acked::AckedRecord>,
}

impl Writer {
    fn checkpoint_log(&self) -> CheckpointLog {
        CheckpointLog {
            health: self.health.clone(),
            clock: self.clock.clone(),
        }
    }

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
            tune_writer(&conn)?;
            install_wal_hook(
                &mut conn,
                self.checkpointer.as_ref().map(|c| c.nudge.clone()),
                self.checkpoint_log(),
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
        let health = self.health.clone();
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
            wrote = conn.total_changes() > before;
            let seq = if wrote {
                if let Some(reason) = health.refusing_writes() {
                    exec("ROLLBACK")?;
                    return Err(StoreError::Unavailable(reason));
                }
                Some(super::acked::bump(conn)?)
            } else {
                None
            };
            exec("COMMIT")?;
            Ok(seq)
        });
        // R39: the record of the highest acknowledged commit is synced
        // before any job of the batch is answered.
        let result = match (result, &self.acked) {
            (Ok(Some(seq)), Some(record)) => record.store(seq).map_err(|e| {
                StoreError::Unavailable(format!("cannot record the acknowledged commit: {e}"))
            }),
            (Ok(Some(_)), None) if self.opts.path.is_some() => Err(StoreError::Unavailable(
                "the record of acknowledged commits (keel.acked) is not open".into(),
            )),
            (r, _) => r.map(|_| ()),
        };
        crate::failpoint::hit("commit_before_reply");
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
        if self.health.refusing_writes().is_some() {
            return; // R39: nothing is written to a store that lost commits
        }
        let at = self.clock.stamp();
        let result = self.connection().and_then(|conn| {
            conn.execute_batch("BEGIN IMMEDIATE")?;
            meta::probe(conn, &at)?;
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
            meta::checkpoint_truncate(&conn)
        } else {
            Ok((0, 0, 0))
        };
        if let Err((_, e)) = conn.close() {
            return Err(StoreError::from_sqlite(e));
        }
        result
    }
}

/// Start the writer thread (and the checkpoint thread) over an opened
/// connection. Returns the job channel and the thread's handle.
pub(super) fn spawn(
    mut conn: Connection,
    opts: StoreOptions,
    health: Health,
    metrics: Metrics,
    clock: Arc<dyn Clock>,
) -> (mpsc::Sender<Cmd>, std::thread::JoinHandle<()>) {
    let log = CheckpointLog {
        health: health.clone(),
        clock: clock.clone(),
    };
    let checkpointer = Checkpointer::start(&opts, log.clone());
    if let Err(e) = tune_writer(&conn) {
        tracing::warn!(error = %e, "cannot set the writer's cache_spill");
    }
    if let Err(e) = install_wal_hook(
        &mut conn,
        checkpointer.as_ref().map(|c| c.nudge.clone()),
        log,
    ) {
        tracing::warn!(error = %e, "cannot install the WAL hook; SQLite checkpoints inline");
    }
    let acked = opts.path.as_ref().and_then(|db| {
        let path = super::acked::record_path(db);
        super::acked::AckedRecord::open(&path)
            .map_err(|e| tracing::error!(path = %path.display(), error = %e, "cannot open the record of acknowledged commits; writes will fail"))
            .ok()
    });
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
        acked,
    };

    let thread = std::thread::Builder::new()
        .name("keel-writer".into())
        .spawn(move || writer.run())
        .expect("spawn the writer thread");
    (tx, thread)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::clock::ManualClock;

    /// The console's "last checkpoint": the checkpoint thread notes the
    /// time and frames of each checkpoint it ran in `Health`.
    #[test]
    fn the_checkpointer_notes_each_checkpoint_it_ran() {
        let dir = tempfile::tempdir().unwrap();
        let opts = StoreOptions {
            path: Some(dir.path().join("keel.db")),
            synchronous: crate::config::Synchronous::Full,
            busy_timeout: Duration::from_millis(1000),
            max_batch: 16,
            probe_interval: Duration::from_millis(100),
            key: None,
        };
        let (conn, _) = super::super::open_store(&opts).unwrap();
        conn.execute_batch("CREATE TABLE t (x); INSERT INTO t VALUES (randomblob(50000));")
            .unwrap();
        let health = Health::new(Metrics::new());
        let log = CheckpointLog {
            health: health.clone(),
            clock: Arc::new(ManualClock::new(1_764_590_400_000)),
        };
        assert_eq!(health.last_checkpoint(), None);
        let c = Checkpointer::start(&opts, log).unwrap();
        c.nudge.send(()).unwrap();
        // The nudge is taken before the closed channel ends the thread.
        c.stop();
        let done = health.last_checkpoint().expect("a checkpoint was noted");
        assert_eq!((done.at_ms, done.mode), (1_764_590_400_000, "background"));
        assert!(done.wal_frames > 10, "{done:?}");
        assert_eq!(done.checkpointed_frames, done.wal_frames, "{done:?}");
    }
}
