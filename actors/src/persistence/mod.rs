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
pub mod console;
pub mod meta;
pub mod migrate;
mod open;
pub mod outbox;
pub mod services;
pub mod sessions;
pub mod tasks;
pub mod timers;
pub mod vault;
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
pub use rusqlite::backup::Progress as BackupProgress;
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
    check_in_background, is_plain_sqlite, open_connection, open_read_only, open_store, OpenReport,
    StoreOptions, SYNC_CHECK_MAX_BYTES,
};
pub use outbox::{GetPendingOutbox, OutboxRow, RecordDeliveryStatuses, RecordSend, SendOutcome};
pub use sessions::{
    ApplyChatEvent, AwaitingTurn, ChatEvent, CommitAgentReply, CommitExchange, CommitNotice,
    Exchange, ExchangeOutcome, GetAwaiting, GetMemory, GetSession, GetSessions, GetTurns,
    ReplyPlan, SessionKey, SessionSnapshot, SessionSummary, TurnRow,
};
use writer::{Cmd, FnJob};

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
        conn: Connection,
        opts: StoreOptions,
        health: Health,
        metrics: Metrics,
        clock: Arc<dyn Clock>,
    ) -> PersistenceActor {
        let (tx, thread) = writer::spawn(conn, opts, health, metrics, clock);
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
