//! Finding the master key at the process boundary: `KEEL_MASTER_KEY` (read
//! here, the binary edge), else the key file (`[vault] key_file`, default
//! `<data_dir>/master.key`), created 0600 on a fresh data dir only. Every
//! command that opens a store calls [`master_key`] or [`store_key`], so
//! `run`, `status`, `sessions`, `timers`, `tasks`, `secrets`, `tokens`,
//! `audit` find the key the same way.

// The binary edge: the one place that reads KEEL_MASTER_KEY.
#![allow(clippy::disallowed_methods)]

use anyhow::{bail, Result};
use keel_actors::config::{Config, KeySource, StorageBackend};
use keel_actors::masterkey::{self, Found, KeyHandle, MasterKey};
use keel_actors::persistence::portable::secrets::SharedVault;
use zeroize::Zeroizing;

/// When a missing key file may be created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Create {
    /// Never: read-only commands (a wrong `--data-dir` leaves nothing behind).
    Never,
    /// Only when the data dir holds no store yet (first start, `secrets set`
    /// before the first start) or only a plain one and no `secrets.db`. An
    /// encrypted store without its key is an error: a new key would not
    /// open it.
    IfFresh,
    /// `keel migrate --encrypt`: also over a plain store, as long as no
    /// `secrets.db` exists (which the missing key would have encrypted).
    ForEncrypt,
}

/// The master key for `config` (also used for `secrets.db` when the main
/// store is plain). `--ephemeral`: a random key kept in memory only.
pub fn master_key(config: &Config, create: Create) -> Result<KeyHandle> {
    if config.ephemeral {
        return Ok(KeyHandle::new(
            MasterKey::generate(),
            "memory (--ephemeral)",
        ));
    }
    let env = std::env::var("KEEL_MASTER_KEY")
        .ok()
        .filter(|v| !v.is_empty())
        .map(Zeroizing::new);
    let file = config.key_file();
    let fresh = {
        let has =
            |name: &str| std::fs::metadata(config.data_dir.join(name)).is_ok_and(|m| m.len() > 0);
        // A plain store (`encrypt = false`, or made before the vault
        // existed) needs no key: a new one loses nothing.
        let plain_store = || {
            keel_actors::persistence::is_plain_sqlite(&config.data_dir.join("keel.db"))
                == Some(true)
        };
        !has("secrets.db") && (!has("keel.db") || plain_store())
    };
    let create = match create {
        Create::Never => false,
        Create::IfFresh => fresh,
        Create::ForEncrypt => !config.data_dir.join("secrets.db").exists(),
    };
    if env.is_none() && config.vault.key_source == KeySource::Keychain {
        return keychain_key(config, create);
    }
    let (handle, found) = masterkey::resolve(env.as_deref().map(|s| s.as_str()), &file, create)?;
    if found == (Found::File { created: true }) {
        let what = if is_shared(config) {
            "the shared store's secrets cannot be read, and every instance needs this same key"
        } else {
            "keel.db and secrets.db cannot be read"
        };
        crate::telemetry::notice(
            false,
            &format!(
                "created the master key {} (0600); back it up: without it {what}",
                file.display()
            ),
        );
    }
    Ok(handle)
}

/// The keychain entry of `config`'s data dir: its description and the
/// source text errors name.
fn keychain_entry(config: &Config) -> (String, String) {
    let dir = std::path::absolute(&config.data_dir)
        .unwrap_or_else(|_| config.data_dir.clone())
        .display()
        .to_string();
    let description = format!("keel:{dir}");
    let source = format!("keychain (kernel keyutils user keyring, key {description})");
    (description, source)
}

/// Replace the keychain entry's key (`keel rekey`): keyutils swaps the
/// payload of the existing key in one call, so a reader sees the old key or
/// the new one, never a mix.
pub fn store_keychain_key(config: &Config, key: &MasterKey) -> Result<String> {
    use linux_keyutils::{KeyRing, KeyRingIdentifier};
    let (description, source) = keychain_entry(config);
    let ring = KeyRing::from_special_id(KeyRingIdentifier::User, false)
        .map_err(|e| anyhow::anyhow!("{source}: cannot open: {e:?}"))?;
    ring.add_key(&description, key.to_hex().as_bytes())
        .map_err(|e| anyhow::anyhow!("{source}: cannot store the new key: {e:?}"))?;
    Ok(source)
}

/// The master key from the OS keychain: the kernel keyutils user keyring
/// (Linux; headless, no D-Bus), key `keel:<data dir>`. Kernel keys live in
/// memory while the user has a session or process: they do not survive a
/// reboot, so back the key up.
fn keychain_key(config: &Config, create: bool) -> Result<KeyHandle> {
    use linux_keyutils::{KeyError, KeyRing, KeyRingIdentifier};
    let (description, source) = keychain_entry(config);
    let ring = KeyRing::from_special_id(KeyRingIdentifier::User, false)
        .map_err(|e| anyhow::anyhow!("{source}: cannot open: {e:?}"))?;
    match ring.search(&description) {
        Ok(key) => {
            let bytes = Zeroizing::new(
                key.read_to_vec()
                    .map_err(|e| anyhow::anyhow!("{source}: cannot read: {e:?}"))?,
            );
            let hex = std::str::from_utf8(&bytes)
                .map_err(|_| anyhow::anyhow!("{source}: the stored key is not hex"))?;
            Ok(KeyHandle::new(MasterKey::from_hex(hex, &source)?, source))
        }
        Err(KeyError::KeyDoesNotExist) if create => {
            let key = MasterKey::generate();
            ring.add_key(&description, key.to_hex().as_bytes())
                .map_err(|e| anyhow::anyhow!("{source}: cannot store the key: {e:?}"))?;
            crate::telemetry::notice(false, &format!(
                "created the master key in the {source}; kernel keys do not survive a reboot: back it up (keyctl print) or use a key file"
            ));
            Ok(KeyHandle::new(key, source))
        }
        Err(KeyError::KeyDoesNotExist) => {
            bail!("{source}: no master key stored there; restore it from your backup or set KEEL_MASTER_KEY")
        }
        Err(e) => bail!("{source}: {e:?}"),
    }
}

/// The key for `keel.db` only: `None` while `[storage] encrypt = false`.
pub fn store_key(config: &Config, create: Create) -> Result<Option<KeyHandle>> {
    if !config.storage.encrypt || config.ephemeral {
        return Ok(None);
    }
    master_key(config, create).map(Some)
}

/// True when secrets live in the shared store (`[storage] backend =
/// "postgres"`), each value encrypted with the master key, instead of
/// `secrets.db`.
pub fn is_shared(config: &Config) -> bool {
    config.storage.backend == StorageBackend::Postgres && !config.ephemeral
}

/// The shared store's vault opened with `key`: connected, migrated, and the
/// key checked against the store's key check (written by the first opener).
/// Sync: never call it on a tokio runtime thread.
pub fn open_shared_vault(config: &Config, key: KeyHandle) -> Result<SharedVault> {
    let url = config.storage.shared_url().map_err(anyhow::Error::msg)?;
    SharedVault::open(&url, key).map_err(|e| match e {
        // Already names the key source and what to do.
        e @ keel_actors::error::StoreError::Key { .. } => anyhow::Error::new(e),
        e => anyhow::anyhow!(
            "the shared store {} (storage.backend = \"postgres\"): {e}",
            keel_actors::persistence::pg::redact_url(&url)
        ),
    })
}

/// [`open_shared_vault`] with the master key found the usual way.
pub fn shared_vault(config: &Config, create: Create) -> Result<SharedVault> {
    open_shared_vault(config, master_key(config, create)?)
}
