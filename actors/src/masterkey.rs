//! The master key that unlocks keel's SQLCipher databases (R28): where it
//! comes from (`KEEL_MASTER_KEY`, the 0600 key file, the keychain), how it
//! is checked, and the `PRAGMA key` text built from it.
//!
//! The key is 32 random bytes used as a *raw* SQLCipher key
//! (`PRAGMA key = "x'<64 hex>'"`), so opening a connection derives nothing
//! (no PBKDF2 per CLI call). It lives in a `SecretBox` (zeroed on drop,
//! never printed); the pragma text is a `Zeroizing<String>`.
//!
//! A leaf module: the binary reads the environment and hands the value in;
//! `persistence` applies the key.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use secrecy::{ExposeSecret, SecretBox};
use zeroize::Zeroizing;

/// Length of the key in bytes (hex: 64 characters).
pub const KEY_BYTES: usize = 32;

/// What went wrong finding the key. Every message names the source and,
/// for the file, the path; none contains key material.
#[derive(Debug, Clone, thiserror::Error)]
pub enum KeyError {
    #[error("{source_name}: the master key must be {} hex characters, got {got} characters", KEY_BYTES * 2)]
    BadLength { source_name: String, got: usize },
    #[error("{source_name}: the master key is not hex")]
    NotHex { source_name: String },
    #[error("master key file {path} is readable by others (mode {mode:o}); chmod 600 it")]
    TooOpen { path: PathBuf, mode: u32 },
    #[error(
        "master key file {path} is missing; restore it from your backup or set KEEL_MASTER_KEY"
    )]
    Missing { path: PathBuf },
    #[error("master key file {path}: {detail}")]
    Io { path: PathBuf, detail: String },
}

/// The master key. Never `Debug`-printed, zeroed when dropped.
pub struct MasterKey(SecretBox<[u8; KEY_BYTES]>);

impl MasterKey {
    /// A fresh random key (first start, `--ephemeral`, rekey).
    pub fn generate() -> MasterKey {
        let mut bytes = Box::new([0u8; KEY_BYTES]);
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut bytes[..]);
        MasterKey(SecretBox::new(bytes))
    }

    /// Parse 64 hex characters (surrounding whitespace ignored).
    pub fn from_hex(text: &str, source_name: &str) -> Result<MasterKey, KeyError> {
        let text = text.trim();
        if text.len() != KEY_BYTES * 2 {
            return Err(KeyError::BadLength {
                source_name: source_name.into(),
                got: text.chars().count(),
            });
        }
        let mut bytes = Box::new([0u8; KEY_BYTES]);
        hex::decode_to_slice(text, &mut bytes[..]).map_err(|_| KeyError::NotHex {
            source_name: source_name.into(),
        })?;
        Ok(MasterKey(SecretBox::new(bytes)))
    }

    /// The key as 64 hex characters (written to a key file only).
    pub fn to_hex(&self) -> Zeroizing<String> {
        Zeroizing::new(hex::encode(self.0.expose_secret()))
    }

    /// `PRAGMA key = "x'…'"` (or `rekey`) for this key.
    pub fn pragma(&self, verb: &str) -> Zeroizing<String> {
        Zeroizing::new(format!("PRAGMA {verb} = \"x'{}'\";", *self.to_hex()))
    }

    /// The raw key bytes, for the shared store's per-value encryption
    /// (`persistence::portable::secrets`).
    pub(crate) fn bytes(&self) -> &[u8; KEY_BYTES] {
        self.0.expose_secret()
    }

    /// The SQL literal for `ATTACH … KEY "x'…'"`.
    pub fn attach_literal(&self) -> Zeroizing<String> {
        Zeroizing::new(format!("\"x'{}'\"", *self.to_hex()))
    }
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(<redacted>)")
    }
}

/// A key plus a description of where it came from (for error messages).
#[derive(Clone, Debug)]
pub struct KeyHandle {
    pub key: Arc<MasterKey>,
    /// e.g. "KEEL_MASTER_KEY" or "key file /data/master.key".
    pub source: String,
}

impl KeyHandle {
    pub fn new(key: MasterKey, source: impl Into<String>) -> KeyHandle {
        KeyHandle {
            key: Arc::new(key),
            source: source.into(),
        }
    }
}

/// Where the key was found (first match wins).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    Env,
    File { created: bool },
}

/// Find the master key: `env` (the value of `KEEL_MASTER_KEY`, read by the
/// binary) first, else the key file. `create` makes a missing key file
/// (first start, `keel secrets set` before the first start); operator
/// commands that only read pass `false` so a wrong `--data-dir` does not
/// leave a key behind.
pub fn resolve(
    env: Option<&str>,
    key_file: &Path,
    create: bool,
) -> Result<(KeyHandle, Found), KeyError> {
    if let Some(v) = env {
        let key = MasterKey::from_hex(v, "KEEL_MASTER_KEY")?;
        return Ok((KeyHandle::new(key, "KEEL_MASTER_KEY"), Found::Env));
    }
    let source = format!("key file {}", key_file.display());
    match read_key_file(key_file)? {
        Some(key) => Ok((KeyHandle::new(key, source), Found::File { created: false })),
        None if create => {
            let key = MasterKey::generate();
            write_key_file(key_file, &key)?;
            Ok((KeyHandle::new(key, source), Found::File { created: true }))
        }
        None => Err(KeyError::Missing {
            path: key_file.to_path_buf(),
        }),
    }
}

/// Read a key file: refused when group/other may read it, when truncated
/// or not hex. `None` when it does not exist.
pub fn read_key_file(path: &Path) -> Result<Option<MasterKey>, KeyError> {
    let io = |e: std::io::Error| KeyError::Io {
        path: path.to_path_buf(),
        detail: e.to_string(),
    };
    let meta = match fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(e)),
    };
    if !meta.is_file() {
        return Err(KeyError::Io {
            path: path.to_path_buf(),
            detail: "not a regular file".into(),
        });
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyError::TooOpen {
            path: path.to_path_buf(),
            mode,
        });
    }
    if meta.len() > 4096 {
        return Err(KeyError::Io {
            path: path.to_path_buf(),
            detail: "too large to be a key file".into(),
        });
    }
    let text = Zeroizing::new(fs::read_to_string(path).map_err(io)?);
    let name = format!("master key file {}", path.display());
    MasterKey::from_hex(&text, &name).map(Some)
}

/// Write `key` to `path` (0600, temp file + fsync + rename + dir fsync).
pub fn write_key_file(path: &Path, key: &MasterKey) -> Result<(), KeyError> {
    let io = |e: std::io::Error| KeyError::Io {
        path: path.to_path_buf(),
        detail: e.to_string(),
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(io)?;
    let mut line = key.to_hex();
    line.push('\n');
    crate::fsutil::write_atomic(path, line.as_bytes()).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip_and_errors_name_the_source() {
        let k = MasterKey::generate();
        let back = MasterKey::from_hex(&k.to_hex(), "x").unwrap();
        assert_eq!(*k.to_hex(), *back.to_hex());
        let e = MasterKey::from_hex("abc", "KEEL_MASTER_KEY").unwrap_err();
        assert!(e.to_string().contains("KEEL_MASTER_KEY"), "{e}");
        let e = MasterKey::from_hex(&"zz".repeat(32), "KEEL_MASTER_KEY").unwrap_err();
        assert!(e.to_string().contains("not hex"), "{e}");
        assert_eq!(format!("{k:?}"), "MasterKey(<redacted>)");
    }

    #[test]
    fn key_file_created_0600_refused_when_open_or_truncated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("master.key");
        assert!(matches!(
            resolve(None, &path, false),
            Err(KeyError::Missing { .. })
        ));
        let (h, found) = resolve(None, &path, true).unwrap();
        assert_eq!(found, Found::File { created: true });
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let (again, _) = resolve(None, &path, true).unwrap();
        assert_eq!(*h.key.to_hex(), *again.key.to_hex());
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            resolve(None, &path, true),
            Err(KeyError::TooOpen { .. })
        ));
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        let text = fs::read_to_string(&path).unwrap();
        fs::write(&path, &text[..20]).unwrap();
        let e = resolve(None, &path, true).unwrap_err();
        assert!(matches!(e, KeyError::BadLength { .. }), "{e}");
    }
}
