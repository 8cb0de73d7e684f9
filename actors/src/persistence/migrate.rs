//! Schema migrations: the numbered files in `migrations/`, embedded at build
//! time and applied in order at start, each in its own transaction together
//! with the `user_version` bump, so a crash mid-migration leaves the previous
//! version intact. (rusqlite_migration would do this, but its newest release
//! pins rusqlite 0.40 while keel needs 0.41; the loop below is the whole of it.)

use std::path::Path;

use rusqlite::Connection;

use crate::clock::{Clock, WallClock};
use crate::error::StoreError;

/// One embedded migration.
pub struct Migration {
    pub version: i64,
    pub name: &'static str,
    pub sql: &'static str,
}

/// Every migration this binary knows, in order. Append only.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "init",
        sql: include_str!("../../../migrations/0001_init.sql"),
    },
    Migration {
        version: 2,
        name: "timers",
        sql: include_str!("../../../migrations/0002_timers.sql"),
    },
    Migration {
        version: 3,
        name: "turn_senders",
        sql: include_str!("../../../migrations/0003_turn_senders.sql"),
    },
    Migration {
        version: 4,
        name: "tasks",
        sql: include_str!("../../../migrations/0004_tasks.sql"),
    },
    Migration {
        version: 5,
        name: "turn_refs",
        sql: include_str!("../../../migrations/0005_turn_refs.sql"),
    },
    Migration {
        version: 6,
        name: "chat_state",
        sql: include_str!("../../../migrations/0006_chat_state.sql"),
    },
    Migration {
        version: 7,
        name: "vault",
        sql: include_str!("../../../migrations/0007_vault.sql"),
    },
    Migration {
        version: 8,
        name: "services",
        sql: include_str!("../../../migrations/0008_services.sql"),
    },
    Migration {
        version: 9,
        name: "instances",
        sql: include_str!("../../../migrations/0009_instances.sql"),
    },
    Migration {
        version: 10,
        name: "log_resume",
        sql: include_str!("../../../migrations/0010_log_resume.sql"),
    },
    Migration {
        version: 11,
        name: "outbox_counts",
        sql: include_str!("../../../migrations/0011_outbox_counts.sql"),
    },
    Migration {
        version: 12,
        name: "task_instances",
        sql: include_str!("../../../migrations/0012_task_instances.sql"),
    },
    Migration {
        version: 13,
        name: "turn_keys",
        sql: include_str!("../../../migrations/0013_turn_keys.sql"),
    },
];

/// The schema version this binary writes.
pub fn latest_version() -> i64 {
    MIGRATIONS.last().map_or(0, |m| m.version)
}

/// What `migrate` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MigrateReport {
    pub from: i64,
    pub to: i64,
}

pub fn current_version(conn: &Connection) -> Result<i64, rusqlite::Error> {
    conn.query_row("PRAGMA user_version", [], |r| r.get(0))
}

/// Refuse a database written by a newer keel.
pub fn check_not_newer(conn: &Connection, path: &Path) -> Result<i64, StoreError> {
    let found = current_version(conn)?;
    if found > latest_version() {
        return Err(StoreError::SchemaTooNew {
            path: path.to_path_buf(),
            found,
            supported: latest_version(),
        });
    }
    Ok(found)
}

/// Bring the schema up to `latest_version()`.
pub fn migrate(conn: &mut Connection, path: &Path) -> Result<MigrateReport, StoreError> {
    migrate_noted(conn, path, &mut |_, _| {})
}

/// [`migrate`], telling `step(done, total)` after each migration applied
/// (`total` = the migrations this store needs).
pub fn migrate_noted(
    conn: &mut Connection,
    path: &Path,
    step: &mut dyn FnMut(u64, u64),
) -> Result<MigrateReport, StoreError> {
    let from = check_not_newer(conn, path)?;
    let todo: Vec<_> = MIGRATIONS.iter().filter(|m| m.version > from).collect();
    let total = todo.len() as u64;
    for (i, m) in todo.into_iter().enumerate() {
        let tx = conn.transaction()?;
        tx.execute_batch(m.sql).map_err(|e| {
            StoreError::Invalid(format!(
                "migration {:04}_{} failed on {}: {e}",
                m.version,
                m.name,
                path.display()
            ))
        })?;
        tx.execute(
            "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?1, ?2, ?3)",
            rusqlite::params![m.version, m.name, WallClock.stamp().text],
        )?;
        // PRAGMA does not take bound parameters; the value is our own integer.
        tx.execute_batch(&format!("PRAGMA user_version = {}", m.version))?;
        crate::failpoint::hit("mid_migration");
        tx.commit()?;
        tracing::info!(version = m.version, name = m.name, "applied migration");
        step(i as u64 + 1, total);
    }
    Ok(MigrateReport {
        from,
        to: latest_version(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrates_a_fresh_database_and_is_idempotent() {
        let mut conn = Connection::open_in_memory().unwrap();
        let p = Path::new(":memory:");
        assert_eq!(
            migrate(&mut conn, p).unwrap(),
            MigrateReport {
                from: 0,
                to: latest_version()
            }
        );
        let again = migrate(&mut conn, p).unwrap();
        assert_eq!(again.from, latest_version());
    }

    /// Schema 11's trigger-kept counts match a real COUNT after inserts,
    /// state changes and deletes, including rows that existed before it.
    #[test]
    fn outbox_counts_follow_the_outbox() {
        let mut conn = Connection::open_in_memory().unwrap();
        migrate(&mut conn, Path::new(":memory:")).unwrap();
        conn.execute_batch(
            "PRAGMA foreign_keys = OFF;
             INSERT INTO outbox (session_id, turn_seq, channel, chat, text, created_at)
                 VALUES ('s', 1, 'c', 'x', 'a', 't'), ('s', 2, 'c', 'x', 'b', 't'),
                        ('s', 3, 'c', 'x', 'c', 't');
             UPDATE outbox SET state = 'sent' WHERE turn_seq <= 2;
             UPDATE outbox SET state = 'sent' WHERE turn_seq = 1;
             UPDATE outbox SET state = 'unknown' WHERE turn_seq = 2;
             DELETE FROM outbox WHERE turn_seq = 3;",
        )
        .unwrap();
        let kept = |st: &str| -> (i64, i64) {
            let n = conn
                .query_row("SELECT n FROM outbox_counts WHERE state = ?1", [st], |r| {
                    r.get(0)
                })
                .unwrap();
            let real = conn
                .query_row("SELECT COUNT(*) FROM outbox WHERE state = ?1", [st], |r| {
                    r.get(0)
                })
                .unwrap();
            (n, real)
        };
        for (st, want) in [("pending", 0), ("sent", 1), ("unknown", 1), ("failed", 0)] {
            assert_eq!(kept(st), (want, want), "state {st}");
        }
    }

    #[test]
    fn refuses_a_newer_schema() {
        let mut conn = Connection::open_in_memory().unwrap();
        conn.execute_batch("PRAGMA user_version = 9999").unwrap();
        let err = migrate(&mut conn, Path::new("x.db")).unwrap_err();
        assert!(matches!(err, StoreError::SchemaTooNew { found: 9999, .. }));
        assert!(err.to_string().contains("newer"));
    }
}
