//! Benchmark baselines, nothing else: `keel bench` measures keel's group
//! commit against the same rows written without the actor system, so its
//! speed is always reported as a ratio measured in one run on one machine.
//!
//! - [`one_per_txn`]: one transaction (one fsync with `synchronous=FULL`) per
//!   message, the naive way: the "10×" reference.
//! - [`batched`]: many messages per transaction, the machine's limit for
//!   these rows: the "30%" reference.
//!
//! Both write exactly what keel writes for one webhook message (via
//! [`sessions::commit_exchange`]), so the figures compare like with like. keel
//! itself never calls these.

use rusqlite::Connection;

use keel_actors::clock::{Clock, WallClock};
use keel_actors::error::StoreError;
use keel_actors::persistence::sessions::{self, Exchange};

/// Run `f` inside `BEGIN IMMEDIATE … COMMIT`, rolling back if it fails.
fn in_transaction(
    conn: &Connection,
    f: impl FnOnce(&Connection) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    conn.execute_batch("BEGIN IMMEDIATE")?;
    match f(conn) {
        Ok(()) => {
            conn.execute_batch("COMMIT")?;
            Ok(())
        }
        Err(e) => {
            if !conn.is_autocommit() {
                let _ = conn.execute_batch("ROLLBACK");
            }
            Err(e)
        }
    }
}

/// Reference (a): commit each exchange in its own transaction, in order.
pub fn one_per_txn(conn: &Connection, exchanges: &[Exchange]) -> Result<(), StoreError> {
    for ex in exchanges {
        in_transaction(conn, |c| {
            sessions::commit_exchange(c, &WallClock.stamp(), ex).map(|_| ())
        })?;
    }
    Ok(())
}

/// Reference (b): commit the exchanges `batch` per transaction (at least 1).
pub fn batched(conn: &Connection, exchanges: &[Exchange], batch: usize) -> Result<(), StoreError> {
    for chunk in exchanges.chunks(batch.max(1)) {
        in_transaction(conn, |c| {
            // Like keel's writer: one timestamp per transaction.
            let at = WallClock.stamp();
            for ex in chunk {
                sessions::commit_exchange(c, &at, ex)?;
            }
            Ok(())
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_actors::persistence::migrate;
    use keel_actors::persistence::sessions::{ReplyPlan, SessionKey};

    fn exchanges(n: usize) -> Vec<Exchange> {
        (0..n)
            .map(|i| Exchange {
                session: SessionKey::new("webhook", &format!("bench-{}", i % 3)),
                from: "u1".into(),
                key: format!("k-{i}"),
                text: format!("hello {i}"),
                reply: Some(ReplyPlan {
                    text: "ok".into(),
                    deliver: false,
                }),
                ..Default::default()
            })
            .collect()
    }

    fn db() -> Connection {
        let mut c = Connection::open_in_memory().expect("in-memory db");
        migrate::migrate(&mut c, std::path::Path::new(":memory:")).expect("migrate");
        c
    }

    #[test]
    fn both_references_store_every_exchange_with_its_reply() {
        for batch in [None, Some(1), Some(4), Some(100)] {
            let c = db();
            let rows = exchanges(10);
            match batch {
                None => one_per_txn(&c, &rows).expect("one per txn"),
                Some(b) => batched(&c, &rows, b).expect("batched"),
            }
            let stats = keel_actors::persistence::meta::stats(&c).expect("stats");
            assert_eq!(stats.sessions, 3);
            assert_eq!(stats.turns, 20, "user turn + reply per exchange");
            assert_eq!(stats.outbox_pending, 0, "deliver=false queues nothing");
            assert!(c.is_autocommit(), "no transaction left open");
        }
    }
}
