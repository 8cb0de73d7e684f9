//! Finding the master key at the process boundary: `KEEL_MASTER_KEY` (read
//! here, the binary edge), else the key file (`[vault] key_file`, default
//! `<data_dir>/master.key`), created 0600 on a fresh data dir only. Every
//! command that opens a store calls [`master_key`] or [`store_key`], so
//! `run`, `status`, `sessions`, `timers`, `tasks`, `secrets`, `tokens`,
//! `audit` find the key the same way.

// The binary edge: the one place that reads KEEL_MASTER_KEY.
#![allow(clippy::disallowed_methods)]

use anyhow::{bail, Result};
use keel_actors::config::{Config, KeySource};
use keel_actors::masterkey::{self, Found, KeyHandle, MasterKey};
use zeroize::Zeroizing;

/// When a missing key file may be created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Create {
    /// Never: read-only commands (a wrong `--data-dir` leaves nothing behind).
    Never,
    /// Only when the data dir holds no store yet (first start, `secrets set`
    /// before the first start). A store without its key is an error: a new
    /// key would not open it.
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
    if config.vault.key_source == KeySource::Keychain {
        bail!("[vault] key_source = \"keychain\" is not built yet; use the key file or KEEL_MASTER_KEY");
    }
    let env = std::env::var("KEEL_MASTER_KEY")
        .ok()
        .filter(|v| !v.is_empty())
        .map(Zeroizing::new);
    let file = config.key_file();
    let fresh = {
        let has =
            |name: &str| std::fs::metadata(config.data_dir.join(name)).is_ok_and(|m| m.len() > 0);
        !has("keel.db") && !has("secrets.db")
    };
    let create = match create {
        Create::Never => false,
        Create::IfFresh => fresh,
        Create::ForEncrypt => !config.data_dir.join("secrets.db").exists(),
    };
    let (handle, found) = masterkey::resolve(env.as_deref().map(|s| s.as_str()), &file, create)?;
    if found == (Found::File { created: true }) {
        eprintln!(
            "keel: created the master key {} (0600); back it up: without it keel.db and secrets.db cannot be read",
            file.display()
        );
    }
    Ok(handle)
}

/// The key for `keel.db` only: `None` while `[storage] encrypt = false`.
pub fn store_key(config: &Config, create: Create) -> Result<Option<KeyHandle>> {
    if !config.storage.encrypt || config.ephemeral {
        return Ok(None);
    }
    master_key(config, create).map(Some)
}
