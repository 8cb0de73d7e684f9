//! The vault's SQL: capability tokens (table `tokens` of `keel.db`,
//! `migrations/0007_vault.sql`) and the secrets database (`secrets.db`, a
//! separate SQLCipher file that is always encrypted, with its own one-table
//! schema created here). Token grants and revocations append their audit
//! record in the same transaction.

use std::path::Path;
use std::time::Duration;

use actix::prelude::*;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use serde::Serialize;
use serde_json::json;
use zeroize::Zeroizing;

use super::open::{apply_key, classify_key_error, connect_read_only};
use super::sql::Sql;
use super::{audit, PersistenceActor};
use crate::clock::Stamp;
use crate::error::StoreError;
use crate::masterkey::KeyHandle;
use crate::vals;

// ---------------------------------------------------------------------------
// Tokens.

/// One stored capability token (never the secret itself).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TokenRow {
    pub id: String,
    #[serde(skip)]
    pub secret_sha256: String,
    pub perms: Vec<String>,
    pub scope: Option<String>,
    pub note: Option<String>,
    pub created_at: String,
    pub expires_ms: Option<i64>,
    pub last_used_at: Option<String>,
    pub revoked_at: Option<String>,
}

/// Insert a new token and its `token_granted` record (either backend).
pub fn insert_token_sql(db: &mut dyn Sql, at: &Stamp, row: &TokenRow) -> Result<(), StoreError> {
    db.exec(
        "INSERT INTO tokens (id, secret_sha256, perms, scope, note, created_at, expires_ms)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
        vals![
            &row.id,
            &row.secret_sha256,
            row.perms.join(","),
            row.scope.as_ref(),
            row.note.as_ref(),
            &at.text,
            row.expires_ms
        ],
    )?;
    audit::append_sql(
        db,
        &at.text,
        "token_granted",
        &json!({"id": row.id, "perms": row.perms, "scope": row.scope, "expires_ms": row.expires_ms}),
    )?;
    Ok(())
}

/// Every token, oldest first (either backend).
pub fn list_tokens_sql(db: &mut dyn Sql) -> Result<Vec<TokenRow>, StoreError> {
    db.rows(
        "SELECT id, secret_sha256, perms, scope, note, created_at, expires_ms, last_used_at, revoked_at
         FROM tokens ORDER BY created_at, id",
        &[],
    )?
    .into_iter()
    .map(|r| {
        Ok(TokenRow {
            id: r.text(0)?,
            secret_sha256: r.text(1)?,
            perms: r
                .text(2)?
                .split(',')
                .filter(|p| !p.is_empty())
                .map(str::to_string)
                .collect(),
            scope: r.opt_text(3)?,
            note: r.opt_text(4)?,
            created_at: r.text(5)?,
            expires_ms: r.opt_int(6)?,
            last_used_at: r.opt_text(7)?,
            revoked_at: r.opt_text(8)?,
        })
    })
    .collect()
}

/// Revoke `id`; true when it existed and was not revoked yet (then a
/// `token_revoked` record is appended). Either backend.
pub fn revoke_token_sql(db: &mut dyn Sql, at: &Stamp, id: &str) -> Result<bool, StoreError> {
    let n = db.exec(
        "UPDATE tokens SET revoked_at = $2 WHERE id = $1 AND revoked_at IS NULL",
        vals![id, &at.text],
    )?;
    if n > 0 {
        audit::append_sql(db, &at.text, "token_revoked", &json!({"id": id}))?;
    }
    Ok(n > 0)
}

/// Record that `id` was used.
pub fn touch_token_sql(db: &mut dyn Sql, at: &Stamp, id: &str) -> Result<(), StoreError> {
    db.exec(
        "UPDATE tokens SET last_used_at = $2 WHERE id = $1",
        vals![id, &at.text],
    )?;
    Ok(())
}

/// Store a granted token (and its audit record); resolves after COMMIT.
/// Sent by the admin socket's `tokens grant`.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<TokenRow, StoreError>")]
pub struct GrantToken(pub TokenRow);

impl Handler<GrantToken> for PersistenceActor {
    type Result = ResponseFuture<Result<TokenRow, StoreError>>;
    fn handle(&mut self, msg: GrantToken, _: &mut Context<Self>) -> Self::Result {
        self.call_sql(move |db, at| {
            insert_token_sql(db, at, &msg.0)?;
            let mut row = msg.0.clone();
            row.created_at = at.text.clone();
            Ok(row)
        })
    }
}

/// Revoke a token; resolves after COMMIT with whether it was active.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<bool, StoreError>")]
pub struct RevokeToken(pub String);

impl Handler<RevokeToken> for PersistenceActor {
    type Result = ResponseFuture<Result<bool, StoreError>>;
    fn handle(&mut self, msg: RevokeToken, _: &mut Context<Self>) -> Self::Result {
        self.call_sql(move |db, at| revoke_token_sql(db, at, &msg.0))
    }
}

/// Every token (start-up load of the HTTP token table, `tokens list`).
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<Vec<TokenRow>, StoreError>")]
pub struct GetTokens;

impl Handler<GetTokens> for PersistenceActor {
    type Result = ResponseFuture<Result<Vec<TokenRow>, StoreError>>;
    fn handle(&mut self, _: GetTokens, _: &mut Context<Self>) -> Self::Result {
        self.read_sql(list_tokens_sql)
    }
}

/// Record a token's last use (sent at most once a minute per token).
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<(), StoreError>")]
pub struct TouchToken(pub String);

impl Handler<TouchToken> for PersistenceActor {
    type Result = ResponseFuture<Result<(), StoreError>>;
    fn handle(&mut self, msg: TouchToken, _: &mut Context<Self>) -> Self::Result {
        self.call_sql(move |db, at| touch_token_sql(db, at, &msg.0))
    }
}

/// A secret operation on the shared store (`[storage] backend =
/// "postgres"`, where secrets live in the `secrets` table, each value
/// sealed with the master key), through the writer; set and remove append
/// their audit record in the same transaction.
#[derive(Message)]
#[rtype(result = "Result<SecretAnswer, StoreError>")]
pub enum SharedSecret {
    Set {
        key: KeyHandle,
        name: String,
        value: Zeroizing<Vec<u8>>,
    },
    List,
    Remove {
        name: String,
    },
}

/// What a [`SharedSecret`] operation found.
#[derive(Debug)]
pub enum SecretAnswer {
    Set,
    List(Vec<SecretInfo>),
    Removed(bool),
}

impl Handler<SharedSecret> for PersistenceActor {
    type Result = ResponseFuture<Result<SecretAnswer, StoreError>>;
    fn handle(&mut self, msg: SharedSecret, _: &mut Context<Self>) -> Self::Result {
        use super::portable::secrets as shared;
        self.call_sql(move |db, at| match &msg {
            SharedSecret::Set { key, name, value } => {
                shared::set_secret_sql(db, at, key, name, value).map(|()| SecretAnswer::Set)
            }
            SharedSecret::List => shared::list_secrets_sql(db).map(SecretAnswer::List),
            SharedSecret::Remove { name } => {
                shared::remove_secret_sql(db, at, name).map(SecretAnswer::Removed)
            }
        })
    }
}

// ---------------------------------------------------------------------------
// secrets.db.

const SECRETS_SCHEMA: &str = "CREATE TABLE IF NOT EXISTS secrets (
    name       TEXT PRIMARY KEY,
    value      BLOB NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);";

/// A secret's name and times (never its value).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SecretInfo {
    pub name: String,
    pub created_at: String,
    pub updated_at: String,
}

/// Open `secrets.db` (always encrypted with `key`); created 0600 with its
/// schema when missing unless `read_only`. `None` path = in memory.
pub fn open_secrets(
    path: Option<&Path>,
    key: &KeyHandle,
    read_only: bool,
) -> Result<Connection, StoreError> {
    let Some(path) = path else {
        let c = Connection::open_in_memory()?;
        c.execute_batch(SECRETS_SCHEMA)?;
        return Ok(c);
    };
    if read_only {
        return connect_read_only(path, Some(key));
    }
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_CREATE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags).map_err(|e| StoreError::Open {
        path: path.to_path_buf(),
        detail: e.to_string(),
    })?;
    apply_key(&conn, path, Some(key))?;
    conn.busy_timeout(Duration::from_secs(5))?;
    conn.query_row("SELECT COUNT(*) FROM sqlite_master", [], |r| {
        r.get::<_, i64>(0)
    })
    .map_err(|e| classify_key_error(path, Some(key), e))?;
    {
        let _: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
        conn.execute_batch("PRAGMA synchronous = FULL;")?;
        conn.execute_batch(SECRETS_SCHEMA)?;
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
    }
    Ok(conn)
}

/// Checkpoint (TRUNCATE: no `-wal` content left) and close.
pub fn close_secrets(conn: Connection) -> Result<(), StoreError> {
    let _ = conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);");
    conn.close().map_err(|(_, e)| StoreError::from(e))
}

/// Insert or replace a secret.
pub fn put_secret(
    conn: &Connection,
    at: &Stamp,
    name: &str,
    value: &[u8],
) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO secrets (name, value, created_at, updated_at) VALUES (?1, ?2, ?3, ?3)
         ON CONFLICT(name) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
    )?
    .execute(params![name, value, at.text])?;
    Ok(())
}

/// Names and times, by name.
pub fn list_secrets(conn: &Connection) -> Result<Vec<SecretInfo>, StoreError> {
    let mut stmt =
        conn.prepare_cached("SELECT name, created_at, updated_at FROM secrets ORDER BY name")?;
    let rows = stmt
        .query_map([], |r| {
            Ok(SecretInfo {
                name: r.get(0)?,
                created_at: r.get(1)?,
                updated_at: r.get(2)?,
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

/// Remove a secret; true when it existed.
pub fn remove_secret(conn: &Connection, name: &str) -> Result<bool, StoreError> {
    Ok(conn
        .prepare_cached("DELETE FROM secrets WHERE name = ?1")?
        .execute(params![name])?
        > 0)
}

/// A secret's value (zeroed when dropped).
pub fn get_secret(conn: &Connection, name: &str) -> Result<Option<Zeroizing<Vec<u8>>>, StoreError> {
    Ok(conn
        .prepare_cached("SELECT value FROM secrets WHERE name = ?1")?
        .query_row(params![name], |r| r.get::<_, Vec<u8>>(0))
        .optional()?
        .map(Zeroizing::new))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::masterkey::{KeyHandle, MasterKey};

    /// The image a kill -9 leaves in the middle of a rollback-mode write:
    /// the database with some pages already overwritten and the hot
    /// journal holding their old content. Made by copying both files while
    /// a transaction whose pages spilled to the file is still open.
    fn hot_journal_image(dir: &Path, key: &KeyHandle) -> std::path::PathBuf {
        let live = dir.join("live.db");
        let c = Connection::open(&live).unwrap();
        apply_key(&c, &live, Some(key)).unwrap();
        c.execute_batch(SECRETS_SCHEMA).unwrap();
        put_secret(&c, &Stamp::from_ms(1_700_000_000_000), "kept", b"v").unwrap();
        c.execute_batch("PRAGMA cache_size = 1; BEGIN; DELETE FROM secrets;")
            .unwrap();
        // More pages than the cache holds: they spill to the file before
        // the commit, so the image needs its journal to be consistent.
        c.execute_batch(
            "CREATE TABLE filler (b BLOB);
             WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 50)
             INSERT INTO filler SELECT randomblob(3000) FROM n;",
        )
        .unwrap();
        let image = dir.join("secrets.db");
        std::fs::copy(&live, &image).unwrap();
        let mut journal = image.clone().into_os_string();
        journal.push("-journal");
        std::fs::copy(dir.join("live.db-journal"), &journal).unwrap();
        c.execute_batch("ROLLBACK;").unwrap();
        image
    }

    #[test]
    fn a_read_only_open_rolls_back_a_hot_journal_and_reads_the_committed_state() {
        let dir = tempfile::tempdir().unwrap();
        let key = KeyHandle::new(MasterKey::generate(), "a test key");
        let image = hot_journal_image(dir.path(), &key);
        // Without the roll back, SQLite refuses the read-only connection.
        let plain = Connection::open_with_flags(&image, OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
        apply_key(&plain, &image, Some(&key)).unwrap();
        let err = plain
            .query_row("SELECT COUNT(*) FROM secrets", [], |r| r.get::<_, i64>(0))
            .unwrap_err();
        assert!(
            matches!(&err, rusqlite::Error::SqliteFailure(f, _)
                if f.extended_code == rusqlite::ffi::SQLITE_READONLY_ROLLBACK),
            "the image is not a hot journal: {err}"
        );
        drop(plain);
        let c = open_secrets(Some(&image), &key, true).unwrap();
        let names: Vec<String> = list_secrets(&c)
            .unwrap()
            .into_iter()
            .map(|s| s.name)
            .collect();
        assert_eq!(names, ["kept"]);
        let filler: i64 = c
            .query_row(
                "SELECT COUNT(*) FROM sqlite_master WHERE name = 'filler'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(filler, 0, "the uncommitted table survived");
        let mut journal = image.clone().into_os_string();
        journal.push("-journal");
        assert!(!Path::new(&journal).exists(), "the hot journal is left");
    }
}
