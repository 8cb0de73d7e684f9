-- keel shared store, step 5: the vault's secrets (issue 13). On SQLite they
-- live in secrets.db, a SQLCipher file; here every value is encrypted on
-- its own: `value` = base64(12-byte random nonce || AES-256-GCM ciphertext
-- and tag) under the master key every instance is given, the secret's name
-- as associated data (a value copied to another name does not open). The
-- `meta` row `vault.key_check` holds the same encryption of a fixed text, so
-- an instance given another key is refused before it reads anything
-- (actors/src/persistence/portable/secrets.rs).

CREATE TABLE secrets (
    name       TEXT PRIMARY KEY,
    value      TEXT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
