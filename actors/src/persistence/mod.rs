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

pub mod acked;
pub mod adapter_state;
pub mod audit;
pub mod backup;
pub mod cluster;
pub mod console;
pub mod faultfs;
pub mod meta;
pub mod migrate;
mod open;
pub mod outbox;
pub mod pg;
pub mod portable;
pub mod services;
pub mod sessions;
pub mod sql;
pub mod tasks;
pub mod timers;
pub mod vault;
mod vfs_shim;
mod walbuf;
mod writer;

/// Shared helpers of the store's unit tests.
#[cfg(test)]
pub(crate) mod testing {
    use rusqlite::Connection;

    use crate::clock::Stamp;

    /// A fixed write time for store calls in tests.
    pub fn at() -> Stamp {
        Stamp::from_ms(1_764_590_400_000)
    }

    /// A migrated in-memory store.
    pub fn db() -> Connection {
        let mut c = Connection::open_in_memory().unwrap();
        super::migrate::migrate(&mut c, std::path::Path::new(":memory:")).unwrap();
        c
    }
}

use std::sync::{mpsc, Arc};

use actix::prelude::*;
pub use backup::BackupProgress;
pub use rusqlite::Connection;
use tokio::sync::oneshot;

use crate::clock::{Clock, Stamp};
use crate::error::StoreError;
pub use crate::fsutil::write_atomic;
use crate::health::Health;
use crate::metrics::Metrics;
pub use adapter_state::{GetAdapterState, PutAdapterState};
pub use meta::{GetStats, RecordBoot, StoreStats};
pub use open::{
    check_in_background, is_plain_sqlite, open_connection, open_read_only, open_store,
    open_store_noted, tune_sqlite, BackgroundCheck, OpenReport, StoreOptions, SYNC_CHECK_MAX_BYTES,
};
pub use outbox::{GetPendingOutbox, OutboxRow, RecordDeliveryStatuses, RecordSend, SendOutcome};
pub use sessions::{
    ApplyChatEvent, AwaitingTurn, ChatEvent, CommitAgentReply, CommitExchange, CommitExchanges,
    CommitNotice, Exchange, ExchangeOutcome, GetAwaiting, GetMemory, GetSession, GetSessions,
    GetTurns, ReplyPlan, SessionKey, SessionSnapshot, SessionSummary, TurnRow,
};
use writer::{Cmd, FnJob};

// ---------------------------------------------------------------------------
// The actor façade.

/// Read-only connections an instance keeps beside its PostgreSQL writer.
const PG_READERS: u32 = 2;

/// Owns the writer thread. Handlers return at once (the work is queued to the
/// writer), so the mailbox drains as fast as messages arrive.
pub struct PersistenceActor {
    tx: Option<mpsc::Sender<Cmd>>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// The background `quick_check`, interrupted when the store closes.
    check: Option<BackgroundCheck>,
    /// Set on `[storage] backend = "postgres"`: the PostgreSQL writer,
    /// which runs portable jobs only (`call_sql`).
    pg: Option<mpsc::Sender<pg::PgCmd>>,
    pg_thread: Option<std::thread::JoinHandle<()>>,
    /// On PostgreSQL: pooled read-only connections beside the writer.
    pg_readers: Option<pg::PgReaders>,
    /// The database file and key, for reads that scan (counts for metrics)
    /// on a read-only connection of their own instead of the writer, whose
    /// commits would wait behind them. `None` in memory and on PostgreSQL.
    reader: Option<(std::path::PathBuf, Option<crate::masterkey::KeyHandle>)>,
}

impl PersistenceActor {
    /// Start the writer thread over an opened connection.
    pub fn new(
        conn: Connection,
        opts: StoreOptions,
        health: Health,
        metrics: Metrics,
        clock: Arc<dyn Clock>,
    ) -> PersistenceActor {
        let reader = opts.path.clone().map(|p| (p, opts.key.clone()));
        let (tx, thread) = writer::spawn(conn, opts, health, metrics, clock);
        PersistenceActor {
            tx: Some(tx),
            thread: Some(thread),
            check: None,
            pg: None,
            pg_thread: None,
            pg_readers: None,
            reader,
        }
    }

    /// Interrupt `check` when the store closes: its read transaction would
    /// hold the closing TRUNCATE checkpoint until it finished (issue 14).
    pub fn interrupt_on_close(mut self, check: Option<BackgroundCheck>) -> PersistenceActor {
        self.check = check;
        self
    }

    /// Start the PostgreSQL writer thread over a connected, migrated client.
    pub fn postgres(
        client: postgres::Client,
        opts: pg::PgOptions,
        health: Health,
        metrics: Metrics,
        clock: Arc<dyn Clock>,
    ) -> PersistenceActor {
        let readers = pg::PgReaders::new(&opts.url, PG_READERS)
            .map_err(|e| tracing::warn!(error = %e, "no read pool; reads share the writer"))
            .ok();
        let (tx, thread) = pg::spawn(client, opts, health, metrics, clock);
        PersistenceActor {
            tx: None,
            thread: None,
            check: None,
            pg: Some(tx),
            pg_thread: Some(thread),
            pg_readers: readers,
            reader: None,
        }
    }

    /// The portable read `f` beside the writer where the store allows it:
    /// on PostgreSQL in one snapshot on a pooled read-only connection, so
    /// it neither waits behind nor delays a group commit; otherwise on the
    /// writer (`call_sql`). Only for reads whose caller needs nothing queued
    /// on the writer before them to be visible (HTTP routes, the console,
    /// the token table), never for an actor reading back its own writes.
    pub(crate) fn read_sql<T, F>(&self, f: F) -> ResponseFuture<Result<T, StoreError>>
    where
        T: Send + 'static,
        F: FnOnce(&mut dyn sql::Sql) -> Result<T, StoreError> + Send + 'static,
    {
        let Some(readers) = self.pg_readers.clone() else {
            let mut f = Some(f);
            return self.call_sql(move |db, _| match f.take() {
                Some(f) => f(db),
                None => Err(StoreError::Invalid("a read was run twice".into())),
            });
        };
        Box::pin(async move {
            tokio::task::spawn_blocking(move || readers.read(f))
                .await
                .unwrap_or_else(|e| Err(StoreError::Invalid(format!("read thread failed: {e}"))))
        })
    }

    /// Which backend this store runs on.
    pub fn backend(&self) -> sql::Backend {
        if self.pg_thread.is_some() {
            sql::Backend::Postgres
        } else {
            sql::Backend::Sqlite
        }
    }

    /// Run the read-only `f` on a connection of its own (a blocking thread)
    /// when the store is a file, else on the writer: a scan never holds
    /// up the writer's commits.
    pub(crate) fn read_beside<T, F>(&self, f: F) -> ResponseFuture<Result<T, StoreError>>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let Some((path, key)) = self.reader.clone() else {
            return self.call(move |c, _| f(c));
        };
        Box::pin(async move {
            tokio::task::spawn_blocking(move || f(&open_read_only(&path, key.as_ref())?))
                .await
                .unwrap_or_else(|e| Err(StoreError::Invalid(format!("read thread failed: {e}"))))
        })
    }

    /// Queue a portable unit of work for the next group commit, on either
    /// backend; resolves after it is durable. `FnMut`: on PostgreSQL a job
    /// that lost a deadlock to another instance is run again.
    pub(crate) fn call_sql<T, F>(&self, mut f: F) -> ResponseFuture<Result<T, StoreError>>
    where
        T: Send + 'static,
        F: FnMut(&mut dyn sql::Sql, &Stamp) -> Result<T, StoreError> + Send + 'static,
    {
        let Some(pg) = &self.pg else {
            return self.call(move |c, at| f(&mut sql::SqliteSql(c), at));
        };
        let (reply, rx) = oneshot::channel();
        let sent = pg
            .send(pg::PgCmd::Job(Box::new(pg::SqlFnJob::new(f, reply))))
            .is_ok();
        Box::pin(async move {
            if !sent {
                return Err(StoreError::Closed);
            }
            rx.await.unwrap_or(Err(StoreError::Closed))
        })
    }

    /// Queue `f` for the next group commit; resolves after it is durable.
    /// SQLite only: on PostgreSQL the request fails with a one-line reason
    /// (the store code behind it is not portable yet).
    pub(crate) fn call<T, F>(&self, f: F) -> ResponseFuture<Result<T, StoreError>>
    where
        T: Send + 'static,
        F: FnOnce(&Connection, &Stamp) -> Result<T, StoreError> + Send + 'static,
    {
        if self.pg_thread.is_some() {
            let what = std::any::type_name::<F>();
            return Box::pin(async move {
                Err(StoreError::Invalid(format!(
                    "not available on the postgres backend yet ({what})"
                )))
            });
        }
        let (reply, rx) = oneshot::channel();
        let job = Box::new(FnJob::new(f, reply));
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
        self.pg.take();
    }
}

impl Drop for PersistenceActor {
    fn drop(&mut self) {
        if let Some(check) = self.check.take() {
            check.interrupt();
        }
        self.tx.take();
        self.pg.take();
        for t in [self.thread.take(), self.pg_thread.take()]
            .into_iter()
            .flatten()
        {
            let _ = t.join();
        }
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
        if let Some(check) = self.check.take() {
            check.interrupt();
        }
        let (reply, rx) = oneshot::channel();
        let sent = match self.pg.take() {
            Some(pg) => pg.send(pg::PgCmd::Close(reply)).is_ok(),
            None => self
                .tx
                .take()
                .map(|tx| tx.send(Cmd::Close(reply)).is_ok())
                .unwrap_or(false),
        };
        let thread = self.thread.take().or(self.pg_thread.take());
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
