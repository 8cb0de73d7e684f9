//! The vault's secrets in the shared store (`[storage] backend =
//! "postgres"`, migration `postgres/0005_secrets.sql`). On SQLite they live
//! in `secrets.db`, a SQLCipher file encrypted as a whole
//! (`persistence::vault`); PostgreSQL has no such file, so each value is
//! sealed on its own: `value` = base64(12-byte random nonce ‖ AES-256-GCM
//! ciphertext and tag) under the 32-byte master key, with the secret's name
//! as associated data, so a value copied to another name (or a tampered
//! byte, or another key) does not open.
//!
//! Every instance and every `keel secrets` command is given the same master
//! key. The `meta` row [`KEY_CHECK`] holds a fixed text sealed the same way:
//! the first one that opens the shared vault writes it, and [`check_key`]
//! refuses a key that does not open it, naming where that key came from,
//! before anything is read or written with it.
//!
//! Plain values exist only as `Zeroizing` buffers; nothing here logs or
//! `Debug`-prints a value or the key.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use serde_json::json;
use zeroize::Zeroizing;

use crate::clock::{Clock, Stamp, WallClock};
use crate::error::StoreError;
use crate::masterkey::{KeyHandle, MasterKey};
use crate::persistence::audit;
use crate::persistence::pg;
use crate::persistence::sql::Sql;
use crate::persistence::vault::SecretInfo;
use crate::vals;

/// The `meta` key (and the associated data) of the key check.
pub const KEY_CHECK: &str = "vault.key_check";

/// What the key check seals.
const KEY_CHECK_TEXT: &[u8] = b"keel shared vault key check v1";

/// A sealed value that does not open: wrong key, another name, or changed.
/// Carries no detail on purpose (AES-GCM tells nothing more).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the value does not open with this key (wrong key, moved to another name, or changed)")]
pub struct SealError;

fn aead_key(key: &MasterKey) -> LessSafeKey {
    // A 32-byte key is exactly what AES-256-GCM takes: cannot fail.
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key.bytes()).expect("32-byte AES-256 key"))
}

/// Seal `value` for the row named `name`: base64(nonce ‖ ciphertext ‖ tag).
pub fn seal(key: &MasterKey, name: &str, value: &[u8]) -> Result<String, StoreError> {
    let mut nonce = [0u8; NONCE_LEN];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut nonce);
    let mut buf = Zeroizing::new(Vec::with_capacity(
        NONCE_LEN + value.len() + AES_256_GCM.tag_len(),
    ));
    buf.extend_from_slice(value);
    aead_key(key)
        .seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(name.as_bytes()),
            &mut *buf,
        )
        .map_err(|_| StoreError::Invalid("cannot encrypt a secret value".into()))?;
    let mut out = Vec::with_capacity(NONCE_LEN + buf.len());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&buf);
    Ok(B64.encode(out))
}

/// Open a value [`seal`]ed for `name`.
pub fn open(key: &MasterKey, name: &str, sealed: &str) -> Result<Zeroizing<Vec<u8>>, SealError> {
    let raw = Zeroizing::new(B64.decode(sealed.trim()).map_err(|_| SealError)?);
    if raw.len() < NONCE_LEN + AES_256_GCM.tag_len() {
        return Err(SealError);
    }
    let (nonce, body) = raw.split_at(NONCE_LEN);
    let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| SealError)?;
    let mut buf = Zeroizing::new(body.to_vec());
    let plain_len = aead_key(key)
        .open_in_place(nonce, Aad::from(name.as_bytes()), &mut buf)
        .map_err(|_| SealError)?
        .len();
    buf.truncate(plain_len);
    Ok(buf)
}

/// The error of a key that does not open the shared vault.
fn wrong_key(key: &KeyHandle) -> StoreError {
    StoreError::Key {
        path: "(the shared store)".into(),
        detail: format!(
            "holds secrets that do not open with the master key from {}: every instance and keel command must be given the same master key (KEEL_MASTER_KEY or the key file) as the one that wrote them",
            key.source
        ),
    }
}

/// Whether [`check_key`] found the check or wrote it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyCheck {
    /// The check was there and opens with this key.
    Matched,
    /// There was none: this key's check was written (first opener).
    Written,
}

/// Check that `key` opens the shared vault: write the key check when there
/// is none yet (in the caller's transaction; of several first openers one
/// wins and the others are checked against its key), else refuse a key
/// that does not open it.
pub fn check_key(db: &mut dyn Sql, key: &KeyHandle) -> Result<KeyCheck, StoreError> {
    let sealed = seal(&key.key, KEY_CHECK, KEY_CHECK_TEXT)?;
    let written = db.exec(
        "INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING",
        vals![KEY_CHECK, sealed],
    )?;
    if written > 0 {
        return Ok(KeyCheck::Written);
    }
    let stored = db
        .row("SELECT value FROM meta WHERE key = $1", vals![KEY_CHECK])?
        .ok_or_else(|| StoreError::Invalid(format!("meta row {KEY_CHECK} vanished")))?
        .text(0)?;
    match open(&key.key, KEY_CHECK, &stored) {
        Ok(text) if text.as_slice() == KEY_CHECK_TEXT => Ok(KeyCheck::Matched),
        _ => Err(wrong_key(key)),
    }
}

/// Insert or replace secret `name` (sealed with `key`) and append its
/// `secret_set` record.
pub fn set_secret_sql(
    db: &mut dyn Sql,
    at: &Stamp,
    key: &KeyHandle,
    name: &str,
    value: &[u8],
) -> Result<(), StoreError> {
    let sealed = seal(&key.key, name, value)?;
    db.exec(
        "INSERT INTO secrets (name, value, created_at, updated_at) VALUES ($1, $2, $3, $3)
         ON CONFLICT (name) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
        vals![name, sealed, &at.text],
    )?;
    audit::append_sql(db, &at.text, "secret_set", &json!({"name": name}))?;
    Ok(())
}

/// Secret `name`'s value (zeroed when dropped); a stored value that does
/// not open with `key` is an error naming the secret and the key source.
pub fn get_secret_sql(
    db: &mut dyn Sql,
    key: &KeyHandle,
    name: &str,
) -> Result<Option<Zeroizing<Vec<u8>>>, StoreError> {
    let Some(row) = db.row("SELECT value FROM secrets WHERE name = $1", vals![name])? else {
        return Ok(None);
    };
    let sealed = Zeroizing::new(row.text(0)?);
    open(&key.key, name, &sealed).map(Some).map_err(|e| {
        StoreError::Invalid(format!(
            "secret {name} in the shared store: {e} (master key from {})",
            key.source
        ))
    })
}

/// Names and times, by name (never values).
pub fn list_secrets_sql(db: &mut dyn Sql) -> Result<Vec<SecretInfo>, StoreError> {
    db.rows(
        "SELECT name, created_at, updated_at FROM secrets ORDER BY name",
        &[],
    )?
    .into_iter()
    .map(|r| {
        Ok(SecretInfo {
            name: r.text(0)?,
            created_at: r.text(1)?,
            updated_at: r.text(2)?,
        })
    })
    .collect()
}

/// Remove secret `name`; true when it existed (then a `secret_removed`
/// record is appended).
pub fn remove_secret_sql(db: &mut dyn Sql, at: &Stamp, name: &str) -> Result<bool, StoreError> {
    let n = db.exec("DELETE FROM secrets WHERE name = $1", vals![name])?;
    if n > 0 {
        audit::append_sql(db, &at.text, "secret_removed", &json!({"name": name}))?;
    }
    Ok(n > 0)
}

/// The shared store's vault as a command (or config load) uses it: one
/// connection, migrated, whose key passed [`check_key`]. Sync: call it off
/// any tokio runtime thread. No `Debug` (it holds the key).
pub struct SharedVault {
    client: postgres::Client,
    key: KeyHandle,
}

impl SharedVault {
    /// Connect to `url`, apply the migrations, and check (or, first, write)
    /// the key check: a key that does not open it is refused here.
    pub fn open(url: &str, key: KeyHandle) -> Result<SharedVault, StoreError> {
        let mut client = pg::connect(url)?;
        pg::pg_migrate(&mut client, url)?;
        let mut vault = SharedVault { client, key };
        let key = vault.key.clone();
        vault.write(move |db, _| check_key(db, &key))?;
        Ok(vault)
    }

    /// Where this vault's key came from.
    pub fn key_source(&self) -> &str {
        &self.key.source
    }

    /// Run `f` in a read-write transaction and commit.
    fn write<T>(
        &mut self,
        f: impl FnOnce(&mut dyn Sql, &Stamp) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let at = WallClock.stamp();
        pg::read_write(&mut self.client, |db| f(db, &at))
    }

    /// [`set_secret_sql`], committed.
    pub fn set(&mut self, name: &str, value: &[u8]) -> Result<(), StoreError> {
        let key = self.key.clone();
        self.write(|db, at| set_secret_sql(db, at, &key, name, value))
    }

    /// [`remove_secret_sql`], committed.
    pub fn remove(&mut self, name: &str) -> Result<bool, StoreError> {
        self.write(|db, at| remove_secret_sql(db, at, name))
    }

    /// [`list_secrets_sql`].
    pub fn list(&mut self) -> Result<Vec<SecretInfo>, StoreError> {
        pg::read_only(&mut self.client, list_secrets_sql)
    }

    /// [`get_secret_sql`].
    pub fn get(&mut self, name: &str) -> Result<Option<Zeroizing<Vec<u8>>>, StoreError> {
        let key = &self.key;
        pg::read_only(&mut self.client, |db| get_secret_sql(db, key, name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::persistence::sql::SqliteSql;
    use crate::persistence::testing::db;

    fn handle(source: &str) -> KeyHandle {
        KeyHandle::new(MasterKey::generate(), source)
    }

    /// keel.db's schema (meta, audit) plus the shared store's secrets table.
    fn vault_db() -> rusqlite::Connection {
        let c = db();
        c.execute_batch(include_str!(
            "../../../../migrations/postgres/0005_secrets.sql"
        ))
        .unwrap();
        c
    }

    #[test]
    fn a_sealed_value_round_trips_and_is_not_in_the_clear() {
        let k = MasterKey::generate();
        let sealed = seal(&k, "telegram.token", b"canary-123").unwrap();
        assert!(!sealed.contains("canary"));
        let raw = B64.decode(&sealed).unwrap();
        assert_eq!(raw.len(), NONCE_LEN + 10 + 16);
        assert_eq!(
            open(&k, "telegram.token", &sealed).unwrap().as_slice(),
            b"canary-123"
        );
        // A fresh nonce every time.
        assert_ne!(sealed, seal(&k, "telegram.token", b"canary-123").unwrap());
    }

    #[test]
    fn a_value_does_not_open_with_another_key() {
        let sealed = seal(&MasterKey::generate(), "a", b"v").unwrap();
        assert_eq!(open(&MasterKey::generate(), "a", &sealed), Err(SealError));
    }

    #[test]
    fn a_value_moved_to_another_name_does_not_open() {
        let k = MasterKey::generate();
        let sealed = seal(&k, "a", b"v").unwrap();
        assert_eq!(open(&k, "b", &sealed), Err(SealError));
    }

    #[test]
    fn a_tampered_byte_does_not_open() {
        let k = MasterKey::generate();
        let sealed = seal(&k, "a", b"value").unwrap();
        let raw = B64.decode(&sealed).unwrap();
        for i in 0..raw.len() {
            let mut bad = raw.clone();
            bad[i] ^= 0x01;
            assert_eq!(open(&k, "a", &B64.encode(&bad)), Err(SealError), "byte {i}");
        }
        assert_eq!(
            open(&k, "a", &B64.encode(&raw[..raw.len() - 1])),
            Err(SealError)
        );
        assert_eq!(open(&k, "a", "not base64!"), Err(SealError));
    }

    #[test]
    fn the_key_check_is_written_once_and_refuses_another_key() {
        let c = vault_db();
        let first = handle("KEEL_MASTER_KEY");
        assert_eq!(
            check_key(&mut SqliteSql(&c), &first).unwrap(),
            KeyCheck::Written
        );
        let stored: String = c
            .query_row("SELECT value FROM meta WHERE key = ?1", [KEY_CHECK], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(
            check_key(&mut SqliteSql(&c), &first).unwrap(),
            KeyCheck::Matched
        );
        let again: String = c
            .query_row("SELECT value FROM meta WHERE key = ?1", [KEY_CHECK], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(stored, again, "the check was rewritten");
        let other = handle("key file /data/master.key");
        let err = check_key(&mut SqliteSql(&c), &other)
            .unwrap_err()
            .to_string();
        assert!(err.contains("key file /data/master.key"), "{err}");
        assert!(err.contains("same master key"), "{err}");
        assert!(!err.contains('\n'), "{err}");
        // The refused key did not replace the check.
        assert_eq!(
            check_key(&mut SqliteSql(&c), &first).unwrap(),
            KeyCheck::Matched
        );
    }

    #[test]
    fn secrets_are_set_read_listed_and_removed_with_audit_records() {
        let c = vault_db();
        let k = handle("KEEL_MASTER_KEY");
        let at = Stamp::from_ms(1_700_000_000_000);
        let later = Stamp::from_ms(1_700_000_001_000);
        let db = &mut SqliteSql(&c);
        set_secret_sql(db, &at, &k, "slack.bot_token", b"xoxb-canary").unwrap();
        set_secret_sql(db, &later, &k, "slack.bot_token", b"xoxb-second").unwrap();
        let stored: String = c
            .query_row("SELECT value FROM secrets", [], |r| r.get(0))
            .unwrap();
        assert!(!stored.contains("xoxb"));
        let db = &mut SqliteSql(&c);
        assert_eq!(
            get_secret_sql(db, &k, "slack.bot_token")
                .unwrap()
                .unwrap()
                .as_slice(),
            b"xoxb-second"
        );
        assert!(get_secret_sql(db, &k, "missing").unwrap().is_none());
        let list = list_secrets_sql(db).unwrap();
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].name, "slack.bot_token");
        assert_eq!(list[0].created_at, at.text);
        assert_eq!(list[0].updated_at, later.text);
        let wrong = handle("another key");
        let err = get_secret_sql(db, &wrong, "slack.bot_token")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("slack.bot_token") && err.contains("another key"),
            "{err}"
        );
        assert!(remove_secret_sql(db, &later, "slack.bot_token").unwrap());
        assert!(!remove_secret_sql(db, &later, "slack.bot_token").unwrap());
        assert!(list_secrets_sql(db).unwrap().is_empty());
        let kinds: Vec<(String, String)> = c
            .prepare("SELECT kind, detail FROM audit ORDER BY seq")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let kinds: Vec<&str> = kinds
            .iter()
            .filter(|(_, d)| d.contains("slack.bot_token"))
            .map(|(k, _)| k.as_str())
            .collect();
        assert_eq!(kinds, ["secret_set", "secret_set", "secret_removed"]);
    }
}
