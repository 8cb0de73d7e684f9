//! The PostgreSQL backend (R37): connecting from a libpq URL, the versioned
//! migrations in `migrations/postgres/`, and the writer thread that group
//! commits portable jobs ([`super::sql::Sql`]) on one connection.
//!
//! Like the SQLite writer it takes every job that queued while the previous
//! COMMIT was in flight (up to `max_batch`), runs each in its own SAVEPOINT
//! inside one transaction, COMMITs (`synchronous_commit = on`: the WAL is
//! flushed on the server before COMMIT returns) and only then answers every
//! caller. Several instances write the same rows, so PostgreSQL may break a
//! deadlock or a serialisation conflict by failing one statement: that job
//! is rolled back to its savepoint and run again in the writer's next
//! transaction, after this one released its locks. A lost connection fails
//! the batch (nothing in it is acknowledged), reports `degraded` and is
//! re-established by probing.

use std::collections::HashMap;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::sql::{PgSql, Sql};
use crate::clock::{Clock, Stamp, WallClock};
use crate::error::StoreError;
use crate::health::Health;
use crate::metrics::Metrics;

/// How often a job that lost a deadlock is run again before its caller is
/// told (each run is in a fresh transaction).
const MAX_CONTENDED_RUNS: usize = 8;

/// The client type of a shared-store connection (for the binary's commands).
pub use postgres::Client;

/// How the shared store is reached.
#[derive(Clone)]
pub struct PgOptions {
    /// libpq form: `postgresql://user@/db?host=/run/pg` or `host=… dbname=…`.
    pub url: String,
    pub max_batch: usize,
    pub probe_interval: Duration,
}

/// Written by hand: a URL may carry a password.
impl std::fmt::Debug for PgOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgOptions")
            .field("url", &redact_url(&self.url))
            .field("max_batch", &self.max_batch)
            .field("probe_interval", &self.probe_interval)
            .finish()
    }
}

/// The URL with any password replaced, for logs and errors.
pub fn redact_url(url: &str) -> String {
    match url.parse::<postgres::Config>().ok() {
        Some(c) if c.get_password().is_some() => {
            let user = c.get_user().unwrap_or("");
            let db = c.get_dbname().unwrap_or("");
            format!("postgresql://{user}:<redacted>@…/{db}")
        }
        _ => url.to_string(),
    }
}

/// Open one connection with the settings keel relies on.
pub fn connect(url: &str) -> Result<postgres::Client, StoreError> {
    let config: postgres::Config = url.parse().map_err(|e| {
        StoreError::Invalid(format!(
            "storage.url is not a PostgreSQL URL ({}): {e}",
            redact_url(url)
        ))
    })?;
    let mut client = config
        .connect(postgres::NoTls)
        .map_err(|e| StoreError::Unavailable(format!("cannot connect to postgres: {e}")))?;
    // Durable COMMIT is what an acknowledgement promises (the server's
    // default, set explicitly so a server-wide `off` does not weaken it).
    client
        .batch_execute(
            "SET synchronous_commit = on; SET default_transaction_isolation = 'read committed'",
        )
        .map_err(StoreError::from_pg)?;
    Ok(client)
}

/// Run the portable read `f` in one read-only transaction of its own (a
/// command such as `keel status` reading the shared store): one snapshot
/// for everything it reads. Call it off any tokio runtime thread.
pub fn read_only<T>(
    client: &mut postgres::Client,
    f: impl FnOnce(&mut dyn super::sql::Sql) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    let tx = client
        .build_transaction()
        .read_only(true)
        .isolation_level(postgres::IsolationLevel::RepeatableRead)
        .start()
        .map_err(StoreError::from_pg)?;
    run_in(tx, f)
}

/// Read-only connections to the shared store beside the writer, pooled:
/// reads for HTTP routes, the console and the token table run on them in
/// one snapshot each, so they never wait behind a group commit and a slow
/// read never delays one. Connections are made on first use (none at
/// start) and reused; a broken one is dropped and replaced.
#[derive(Clone)]
pub struct PgReaders {
    pool: r2d2::Pool<r2d2_postgres::PostgresConnectionManager<postgres::NoTls>>,
}

impl std::fmt::Debug for PgReaders {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgReaders")
            .field("connections", &self.pool.state().connections)
            .finish()
    }
}

impl PgReaders {
    /// At most `size` connections to `url`; none is opened yet.
    pub fn new(url: &str, size: u32) -> Result<PgReaders, StoreError> {
        let config: postgres::Config = url.parse().map_err(|e| {
            StoreError::Invalid(format!(
                "storage.url is not a PostgreSQL URL ({}): {e}",
                redact_url(url)
            ))
        })?;
        let manager = r2d2_postgres::PostgresConnectionManager::new(config, postgres::NoTls);
        let pool = r2d2::Pool::builder()
            .max_size(size.max(1))
            .min_idle(Some(0))
            .connection_timeout(READER_WAIT)
            .build_unchecked(manager);
        Ok(PgReaders { pool })
    }

    /// The portable read `f` in one read-only snapshot on a pooled
    /// connection (blocking: call it on a blocking thread).
    pub fn read<T>(
        &self,
        f: impl FnOnce(&mut dyn super::sql::Sql) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut client = self
            .pool
            .get()
            .map_err(|e| StoreError::Unavailable(format!("no read connection to postgres: {e}")))?;
        read_only(&mut client, f)
    }
}

/// How long a read waits for a pooled connection (or to make one).
const READER_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Run `f` in one read-write transaction of `client` and commit (a
/// command's write to the shared store).
pub fn read_write<T>(
    client: &mut postgres::Client,
    f: impl FnOnce(&mut dyn super::sql::Sql) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    run_in(client.transaction().map_err(StoreError::from_pg)?, f)
}

/// `f` on `tx` through [`super::sql::PgSql`], then COMMIT (a failure rolls
/// back as `tx` drops).
fn run_in<T>(
    mut tx: postgres::Transaction<'_>,
    f: impl FnOnce(&mut dyn super::sql::Sql) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    let mut cache = std::collections::HashMap::new();
    let out = f(&mut super::sql::PgSql {
        tx: &mut tx,
        cache: &mut cache,
    })?;
    tx.commit().map_err(StoreError::from_pg)?;
    Ok(out)
}

// ---------------------------------------------------------------------------
// Migrations

/// One embedded migration of the PostgreSQL schema.
pub struct PgMigration {
    pub version: i64,
    pub name: &'static str,
    pub sql: &'static str,
}

/// Every PostgreSQL migration this binary knows, in order. Append only.
pub const PG_MIGRATIONS: &[PgMigration] = &[
    PgMigration {
        version: 1,
        name: "init",
        sql: include_str!("../../../migrations/postgres/0001_init.sql"),
    },
    PgMigration {
        version: 2,
        name: "timers",
        sql: include_str!("../../../migrations/postgres/0002_timers.sql"),
    },
    PgMigration {
        version: 3,
        name: "tasks",
        sql: include_str!("../../../migrations/postgres/0003_tasks.sql"),
    },
    PgMigration {
        version: 4,
        name: "audit_services_tokens",
        sql: include_str!("../../../migrations/postgres/0004_audit_services_tokens.sql"),
    },
    PgMigration {
        version: 5,
        name: "secrets",
        sql: include_str!("../../../migrations/postgres/0005_secrets.sql"),
    },
];

/// The PostgreSQL schema version this binary writes.
pub fn pg_latest_version() -> i64 {
    PG_MIGRATIONS.last().map_or(0, |m| m.version)
}

/// The schema version of the shared store (0 = empty).
pub fn pg_current_version(client: &mut postgres::Client) -> Result<i64, StoreError> {
    let exists: bool = client
        .query_one(
            "SELECT to_regclass('keel_schema_migrations') IS NOT NULL",
            &[],
        )
        .map_err(StoreError::from_pg)?
        .get(0);
    if !exists {
        return Ok(0);
    }
    let v: Option<i64> = client
        .query_one("SELECT max(version) FROM keel_schema_migrations", &[])
        .map_err(StoreError::from_pg)?
        .get(0);
    Ok(v.unwrap_or(0))
}

fn too_new(url: &str, found: i64) -> StoreError {
    StoreError::SchemaTooNew {
        path: redact_url(url).into(),
        found,
        supported: pg_latest_version(),
    }
}

/// Refuse a shared store written by a newer keel.
pub fn pg_check_not_newer(client: &mut postgres::Client, url: &str) -> Result<i64, StoreError> {
    let found = pg_current_version(client)?;
    if found > pg_latest_version() {
        return Err(too_new(url, found));
    }
    Ok(found)
}

/// Bring the shared schema up to date. Several instances may start at once:
/// each migration runs in a transaction holding an advisory lock, and the
/// version is read again under it, so exactly one applies each step.
pub fn pg_migrate(client: &mut postgres::Client, url: &str) -> Result<(i64, i64), StoreError> {
    let from = pg_check_not_newer(client, url)?;
    for m in PG_MIGRATIONS {
        let mut tx = client.transaction().map_err(StoreError::from_pg)?;
        // 0x6b65656c = "keel": one lock id for schema changes.
        tx.execute("SELECT pg_advisory_xact_lock(1801807212)", &[])
            .map_err(StoreError::from_pg)?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS keel_schema_migrations (
                 version BIGINT PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)",
        )
        .map_err(StoreError::from_pg)?;
        let now: Option<i64> = tx
            .query_one("SELECT max(version) FROM keel_schema_migrations", &[])
            .map_err(StoreError::from_pg)?
            .get(0);
        let now = now.unwrap_or(0);
        if now > pg_latest_version() {
            return Err(too_new(url, now));
        }
        if now >= m.version {
            tx.commit().map_err(StoreError::from_pg)?;
            continue;
        }
        tx.batch_execute(m.sql).map_err(|e| {
            StoreError::Invalid(format!(
                "postgres migration {:04}_{} failed: {}",
                m.version,
                m.name,
                StoreError::from_pg(e)
            ))
        })?;
        tx.execute(
            "INSERT INTO keel_schema_migrations (version, name, applied_at) VALUES ($1, $2, $3)",
            &[&m.version, &m.name, &WallClock.stamp().text],
        )
        .map_err(StoreError::from_pg)?;
        tx.commit().map_err(StoreError::from_pg)?;
        tracing::info!(
            version = m.version,
            name = m.name,
            "applied postgres migration"
        );
    }
    Ok((from, pg_latest_version()))
}

// ---------------------------------------------------------------------------
// Jobs and the writer

/// A portable unit of work run inside the group transaction.
pub(super) trait SqlJob: Send {
    /// Run inside a savepoint. `Ok(true)`: keep; `Ok(false)`: failed on its
    /// own (rolled back to its savepoint, the batch goes on); `Err(Contended)`:
    /// run again in the next transaction; other `Err`: the batch fails.
    fn run(&mut self, db: &mut dyn Sql, at: &Stamp) -> Result<bool, StoreError>;
    /// Deliver the outcome once the batch is durable (or failed).
    fn finish(self: Box<Self>, batch: Result<(), StoreError>);
}

pub(super) struct SqlFnJob<T, F> {
    f: F,
    out: Option<Result<T, StoreError>>,
    reply: oneshot::Sender<Result<T, StoreError>>,
}

impl<T, F> SqlFnJob<T, F> {
    pub(super) fn new(f: F, reply: oneshot::Sender<Result<T, StoreError>>) -> SqlFnJob<T, F> {
        SqlFnJob {
            f,
            out: None,
            reply,
        }
    }
}

impl<T, F> SqlJob for SqlFnJob<T, F>
where
    T: Send + 'static,
    F: FnMut(&mut dyn Sql, &Stamp) -> Result<T, StoreError> + Send + 'static,
{
    fn run(&mut self, db: &mut dyn Sql, at: &Stamp) -> Result<bool, StoreError> {
        let out = (self.f)(db, at);
        let ok = match &out {
            Ok(_) => true,
            Err(e @ (StoreError::Unavailable(_) | StoreError::Contended(_))) => {
                return Err(e.clone())
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
        let _ = self.reply.send(result);
    }
}

pub(super) enum PgCmd {
    Job(Box<dyn SqlJob>),
    Close(oneshot::Sender<Result<(i64, i64, i64), StoreError>>),
}

struct PgWriter {
    client: Option<postgres::Client>,
    /// Prepared statements of `client` (dropped with it).
    cache: HashMap<String, postgres::Statement>,
    opts: PgOptions,
    health: Health,
    metrics: Metrics,
    clock: Arc<dyn Clock>,
    rx: mpsc::Receiver<PgCmd>,
    degraded: bool,
}

/// What one transaction did with its jobs.
struct Round {
    /// Jobs that ran (kept or failed on their own): answered after COMMIT.
    done: Vec<Box<dyn SqlJob>>,
    /// Jobs that lost a deadlock: run again in the next transaction.
    again: Vec<Box<dyn SqlJob>>,
}

impl PgWriter {
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
                PgCmd::Job(j) => jobs.push(j),
                PgCmd::Close(tx) => close = Some(tx),
            }
            while close.is_none() && jobs.len() < self.opts.max_batch {
                match self.rx.try_recv() {
                    Ok(PgCmd::Job(j)) => jobs.push(j),
                    Ok(PgCmd::Close(tx)) => close = Some(tx),
                    Err(_) => break,
                }
            }
            if !jobs.is_empty() {
                self.commit(jobs);
            }
            if let Some(tx) = close {
                self.client = None;
                let _ = tx.send(Ok((0, 0, 0)));
                return;
            }
        }
    }

    fn client(&mut self) -> Result<&mut postgres::Client, StoreError> {
        if self.client.is_none() {
            let mut client = connect(&self.opts.url)?;
            let v = pg_check_not_newer(&mut client, &self.opts.url)?;
            if v != pg_latest_version() {
                return Err(StoreError::Invalid(format!(
                    "the shared store changed schema version under us ({v})"
                )));
            }
            self.cache.clear();
            self.client = Some(client);
            tracing::info!("reconnected to postgres");
        }
        Ok(self.client.as_mut().expect("just set"))
    }

    /// One transaction over `jobs`.
    fn round(&mut self, jobs: Vec<Box<dyn SqlJob>>) -> (Result<(), StoreError>, Round) {
        let mut round = Round {
            done: Vec::with_capacity(jobs.len()),
            again: Vec::new(),
        };
        let mut pending: std::collections::VecDeque<_> = jobs.into();
        let at = self.clock.stamp();
        let mut cache = std::mem::take(&mut self.cache);
        let result = match self.client() {
            Ok(client) => run_jobs(client, &mut cache, &mut pending, &mut round, &at),
            Err(e) => Err(e),
        };
        self.cache = cache;
        // Jobs not reached when the transaction failed share its outcome.
        round.done.extend(pending);
        (result, round)
    }

    #[allow(clippy::disallowed_methods)] // real elapsed time of a commit, for a metric
    fn commit(&mut self, jobs: Vec<Box<dyn SqlJob>>) {
        let started = Instant::now();
        let n = jobs.len();
        let mut jobs = jobs;
        for run in 1..=MAX_CONTENDED_RUNS {
            let (result, round) = self.round(jobs);
            match &result {
                Ok(()) => {
                    self.metrics.commit_batch_size.observe(n as f64);
                    self.metrics
                        .commit_seconds
                        .observe(started.elapsed().as_secs_f64());
                    self.recovered();
                }
                Err(e) => self.failed(e),
            }
            let failed = result.is_err();
            for job in round.done {
                job.finish(result.clone());
            }
            if failed {
                for job in round.again {
                    job.finish(result.clone());
                }
                return;
            }
            if round.again.is_empty() {
                return;
            }
            tracing::debug!(
                jobs = round.again.len(),
                run,
                "running contended jobs again"
            );
            jobs = round.again;
        }
        for job in jobs {
            job.finish(Err(StoreError::Contended(
                "still deadlocked after several runs".into(),
            )));
        }
    }

    fn probe(&mut self) {
        let result = self
            .client()
            .and_then(|c| c.batch_execute("SELECT 1").map_err(StoreError::from_pg));
        match result {
            Ok(()) => self.recovered(),
            Err(e) => {
                tracing::debug!(error = %e, "postgres probe failed");
                self.client = None;
            }
        }
    }

    fn recovered(&mut self) {
        if self.degraded {
            self.degraded = false;
            self.health.storage_ok();
            tracing::warn!("postgres reachable again; accepting messages");
        }
    }

    fn failed(&mut self, e: &StoreError) {
        self.metrics.commit_failures.inc();
        if !e.is_transient() {
            // A job's own error that poisoned the transaction: the
            // connection is fine.
            return;
        }
        let reason = e.to_string();
        if !self.degraded {
            tracing::error!(error = %reason, "commit failed; nothing in this batch was acknowledged");
        }
        self.degraded = true;
        self.health.storage_failed(&reason);
        // The connection is not trusted after a failure: reconnect.
        self.client = None;
    }
}

/// Run `pending` in one transaction, each job in a savepoint, and COMMIT.
fn run_jobs(
    client: &mut postgres::Client,
    cache: &mut HashMap<String, postgres::Statement>,
    pending: &mut std::collections::VecDeque<Box<dyn SqlJob>>,
    round: &mut Round,
    at: &Stamp,
) -> Result<(), StoreError> {
    let mut tx = client.transaction().map_err(StoreError::from_pg)?;
    while let Some(mut job) = pending.pop_front() {
        if let Err(e) = tx.batch_execute("SAVEPOINT job") {
            round.done.push(job);
            return Err(StoreError::from_pg(e));
        }
        let ran = job.run(&mut PgSql { tx: &mut tx, cache }, at);
        let (undo, again) = match &ran {
            Ok(true) => (false, false),
            Ok(false) => (true, false),
            Err(StoreError::Contended(_)) => (true, true),
            Err(_) => (false, false),
        };
        if again {
            round.again.push(job);
        } else {
            round.done.push(job);
        }
        if let Err(e) = ran {
            if !again {
                return Err(e);
            }
        }
        let sql = if undo {
            "ROLLBACK TO job; RELEASE job"
        } else {
            "RELEASE job"
        };
        tx.batch_execute(sql).map_err(StoreError::from_pg)?;
    }
    tx.commit().map_err(StoreError::from_pg)
}

/// Start the writer thread over a connected, migrated client.
pub(super) fn spawn(
    client: postgres::Client,
    opts: PgOptions,
    health: Health,
    metrics: Metrics,
    clock: Arc<dyn Clock>,
) -> (mpsc::Sender<PgCmd>, std::thread::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel();
    let writer = PgWriter {
        client: Some(client),
        cache: HashMap::new(),
        opts,
        health,
        metrics,
        clock,
        rx,
        degraded: false,
    };
    let thread = std::thread::Builder::new()
        .name("keel-pg-writer".into())
        .spawn(move || writer.run())
        .expect("spawn the postgres writer thread");
    (tx, thread)
}
