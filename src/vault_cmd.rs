//! `keel secrets`, `keel tokens`, `keel audit`, `keel backup`, `keel
//! restore`, `keel rekey`, `keel migrate --encrypt`.
//!
//! Secrets, tokens and backup work with keel stopped or running: while it
//! runs they go through its admin socket (0600, in the data dir; the daemon
//! is the one writer of keel.db and updates its token table at once);
//! stopped, the command takes the data-dir lock and writes the stores
//! itself. Secret values come from stdin only (never argv) and are never
//! printed. Restore, rekey and migrate --encrypt need keel stopped.
//!
//! With `[storage] backend = "postgres"` secrets live in the shared store
//! (each value encrypted with the master key): `keel secrets` works on it
//! directly, keel running or not, after checking the key opens it.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use keel_actors::clock::{Clock, WallClock};
use keel_actors::config::Config;
use keel_actors::masterkey::{self, KeyHandle, MasterKey};
use keel_actors::persistence::{self, audit, backup, migrate, vault as store, StoreOptions};
use keel_actors::vault::{check_secret_name, new_token, parse_perms, parse_ttl};
use serde_json::{json, Value};
use zeroize::Zeroizing;

use crate::cli::{DataDirArg, SecretsCmd, TokensCmd};
use crate::commands::Store;
use crate::progress::{ProgressLine, Unit, LARGE_BYTES};
use crate::vault::{is_shared, master_key, shared_vault, store_key, Create};

fn load(dir: &DataDirArg) -> Result<Config> {
    let config = crate::config::load(dir, None)?;
    if config.ephemeral {
        bail!("this config is ephemeral (no data dir): secrets, tokens and the audit log live in a running keel's memory only");
    }
    Ok(config)
}

/// Ask the running keel (admin socket); `None` when it is not running.
fn ask_running(config: &Config, request: &Value) -> Result<Option<Value>> {
    ask_running_noted(config, request, &mut |_| {})
}

/// [`ask_running`], handing each `{"progress": …}` line keel sends before
/// its answer to `note`.
fn ask_running_noted(
    config: &Config,
    request: &Value,
    note: &mut dyn FnMut(&Value),
) -> Result<Option<Value>> {
    if crate::run::running_pid(&config.data_dir).is_none() {
        return Ok(None);
    }
    let path = config.admin_socket();
    let mut stream = UnixStream::connect(&path)
        .with_context(|| format!("cannot connect to keel's admin socket {}", path.display()))?;
    stream.set_read_timeout(Some(Duration::from_secs(120)))?;
    let mut line = Zeroizing::new(request.to_string());
    line.push('\n');
    stream.write_all(line.as_bytes())?;
    let mut reader = BufReader::new(&stream);
    let v = loop {
        let mut answer = String::new();
        if reader
            .read_line(&mut answer)
            .context("no answer from keel")?
            == 0
        {
            bail!("no answer from keel (the admin socket closed)");
        }
        let v: Value = serde_json::from_str(&answer).context("bad answer from keel")?;
        match v.get("progress") {
            Some(p) if v.as_object().is_some_and(|o| o.len() == 1) => note(p),
            _ => break v,
        }
    };
    if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
        bail!("{e}");
    }
    Ok(Some(v))
}

/// The main store, opened for writing with keel stopped (lock held by the caller).
fn open_main(config: &Config) -> Result<persistence::Connection> {
    let key = store_key(config, Create::IfFresh)?;
    let (conn, _) = persistence::open_store(&StoreOptions::from_config(config, key.as_ref()))
        .with_context(|| format!("opening {}", config.data_dir.display()))?;
    Ok(conn)
}

/// The data-dir lock a write to `keel.db` with keel stopped needs; none
/// on a shared store, which takes every instance's writes.
fn lock_unless_shared(config: &Config) -> Result<Option<std::fs::File>> {
    if is_shared(config) {
        return Ok(None);
    }
    crate::run::lock_data_dir(&config.data_dir).map(Some)
}

fn append_audit(conn: &persistence::Connection, kind: &str, detail: Value) -> Result<()> {
    let tx = conn.unchecked_transaction()?;
    audit::append(&tx, &WallClock.stamp(), kind, &detail)?;
    tx.commit()?;
    Ok(())
}

fn secrets_path(config: &Config) -> PathBuf {
    config.data_dir.join("secrets.db")
}

/// Read a secret value from stdin: no echo on a terminal, one trailing
/// newline dropped, UTF-8, not empty.
fn read_secret_value(name: &str) -> Result<Zeroizing<String>> {
    let mut raw = Zeroizing::new(Vec::new());
    // SAFETY: isatty only inspects a file descriptor.
    let tty = unsafe { libc::isatty(0) == 1 };
    if tty {
        eprint!("value for {name} (not echoed): ");
        let _ = std::io::stderr().flush();
        // SAFETY: termios calls on fd 0 with a zeroed struct we own.
        let mut term: libc::termios = unsafe { std::mem::zeroed() };
        let saved = unsafe { libc::tcgetattr(0, &mut term) } == 0;
        let old = term;
        if saved {
            term.c_lflag &= !libc::ECHO;
            // SAFETY: as above.
            unsafe { libc::tcsetattr(0, libc::TCSANOW, &term) };
        }
        let mut line = Zeroizing::new(String::new());
        let read = std::io::stdin().lock().read_line(&mut line);
        if saved {
            // SAFETY: restores the settings read above.
            unsafe { libc::tcsetattr(0, libc::TCSANOW, &old) };
        }
        eprintln!();
        read.context("reading the value from the terminal")?;
        raw.extend_from_slice(line.as_bytes());
    } else {
        std::io::stdin()
            .lock()
            .take(1 << 20)
            .read_to_end(&mut raw)
            .context("reading the value from stdin")?;
    }
    if raw.ends_with(b"\n") {
        raw.pop();
        if raw.ends_with(b"\r") {
            raw.pop();
        }
    }
    if raw.is_empty() {
        bail!("no value on stdin (pipe it in: printf %s VALUE | keel secrets set {name})");
    }
    let text = std::str::from_utf8(&raw).map_err(|_| anyhow!("the value is not UTF-8"))?;
    Ok(Zeroizing::new(text.to_string()))
}

pub fn secrets(cmd: SecretsCmd) -> Result<ExitCode> {
    match cmd {
        SecretsCmd::Set { name, dir } => {
            check_secret_name(&name).map_err(|e| anyhow!(e))?;
            let config = load(&dir)?;
            let value = read_secret_value(&name)?;
            let req = json!({"op": "secret_set", "name": name, "value": value.as_str()});
            if is_shared(&config) {
                // The shared store: written directly, keel running or not.
                shared_vault(&config, Create::IfFresh)?.set(&name, value.as_bytes())?;
            } else if ask_running(&config, &req)?.is_none() {
                let _lock = crate::run::lock_data_dir(&config.data_dir)?;
                let key = master_key(&config, Create::IfFresh)?;
                let path = secrets_path(&config);
                let c = store::open_secrets(Some(&path), &key, false)?;
                store::put_secret(&c, &WallClock.stamp(), &name, value.as_bytes())?;
                store::close_secrets(c)?;
                append_audit(&open_main(&config)?, "secret_set", json!({"name": name}))?;
            }
            println!("secret {name} set");
            Ok(ExitCode::SUCCESS)
        }
        SecretsCmd::List { dir, json: as_json } => {
            let config = load(&dir)?;
            let path = secrets_path(&config);
            let list = if is_shared(&config) {
                shared_vault(&config, Create::Never)?.list()?
            } else if path.exists() {
                let key = master_key(&config, Create::Never)?;
                store::list_secrets(&store::open_secrets(Some(&path), &key, true)?)?
            } else {
                Vec::new()
            };
            crate::commands::print_rows(&list, as_json, "secrets", "no secrets", |s| {
                format!(
                    "{}  created {}  updated {}",
                    s.name, s.created_at, s.updated_at
                )
            });
            Ok(ExitCode::SUCCESS)
        }
        SecretsCmd::Rm { name, dir } => {
            check_secret_name(&name).map_err(|e| anyhow!(e))?;
            let config = load(&dir)?;
            let req = json!({"op": "secret_rm", "name": name});
            let removed = if is_shared(&config) {
                shared_vault(&config, Create::Never)?.remove(&name)?
            } else {
                match ask_running(&config, &req)? {
                    Some(v) => v["removed"].as_bool().unwrap_or(false),
                    None => {
                        let _lock = crate::run::lock_data_dir(&config.data_dir)?;
                        let path = secrets_path(&config);
                        if !path.exists() {
                            false
                        } else {
                            let key = master_key(&config, Create::Never)?;
                            let c = store::open_secrets(Some(&path), &key, false)?;
                            let removed = store::remove_secret(&c, &name)?;
                            store::close_secrets(c)?;
                            if removed {
                                append_audit(
                                    &open_main(&config)?,
                                    "secret_removed",
                                    json!({"name": name}),
                                )?;
                            }
                            removed
                        }
                    }
                }
            };
            if removed {
                println!("secret {name} removed");
                Ok(ExitCode::SUCCESS)
            } else {
                eprintln!("keel: error: no secret {name}");
                Ok(ExitCode::from(2))
            }
        }
    }
}

pub fn tokens(cmd: TokensCmd) -> Result<ExitCode> {
    match cmd {
        TokensCmd::Grant {
            perm,
            scope,
            ttl,
            note,
            dir,
        } => {
            let perms = parse_perms(&perm).map_err(|e| anyhow!(e))?;
            if let Some(s) = &scope {
                if s.is_empty() || s.len() > 256 || s.chars().any(char::is_control) {
                    bail!("--scope: 1-256 characters, no control characters");
                }
            }
            let expires_ms = match &ttl {
                Some(t) => Some(WallClock.now_ms() + parse_ttl(t).map_err(|e| anyhow!(e))?),
                None => None,
            };
            let config = load(&dir)?;
            let perms_text: Vec<&str> = perms.iter().map(|p| p.as_str()).collect();
            let req = json!({"op": "token_grant", "perms": perms_text.join(","),
                             "scope": scope, "expires_ms": expires_ms, "note": note});
            let (id, token) = match ask_running(&config, &req)? {
                Some(v) => (
                    v["id"].as_str().unwrap_or_default().to_string(),
                    Zeroizing::new(v["token"].as_str().unwrap_or_default().to_string()),
                ),
                None => {
                    let _lock = lock_unless_shared(&config)?;
                    let t = new_token(&perms, scope.clone(), expires_ms, note.clone());
                    Store::open_rw(&config, Create::IfFresh)?
                        .write(|db| store::insert_token_sql(db, &WallClock.stamp(), &t.row))?;
                    (t.row.id, t.token)
                }
            };
            if id.is_empty() || token.is_empty() {
                bail!("keel did not return a token");
            }
            let expires = expires_ms
                .map(|ms| keel_actors::clock::Stamp::from_ms(ms).text)
                .unwrap_or_else(|| "never".into());
            println!(
                "token {id}: {} (scope {}, expires {expires}); shown once, store it now:",
                perms_text.join(","),
                scope.as_deref().unwrap_or("all sessions")
            );
            println!("{}", *token);
            Ok(ExitCode::SUCCESS)
        }
        TokensCmd::List { dir, json: as_json } => {
            let config = load(&dir)?;
            let rows = Store::open_ro(&config)?
                .read(store::list_tokens_sql)
                .map_err(crate::commands::no_table("tokens"))?;
            let now = WallClock.now_ms();
            if as_json {
                let list: Vec<Value> = rows
                    .iter()
                    .map(|r| {
                        let mut v = serde_json::to_value(r).unwrap_or_default();
                        v["status"] = json!(status(r, now));
                        v
                    })
                    .collect();
                println!("{}", json!({ "tokens": list }));
            } else if rows.is_empty() {
                println!("no tokens");
            } else {
                for r in &rows {
                    println!(
                        "{}  {}  scope {}  {}  created {}  last used {}{}",
                        r.id,
                        r.perms.join(","),
                        r.scope.as_deref().unwrap_or("*"),
                        status(r, now),
                        r.created_at,
                        r.last_used_at.as_deref().unwrap_or("never"),
                        r.note
                            .as_deref()
                            .map(|n| format!("  note {}", n.escape_debug()))
                            .unwrap_or_default()
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        TokensCmd::Revoke { id, dir } => {
            let config = load(&dir)?;
            let req = json!({"op": "token_revoke", "id": id});
            let revoked = match ask_running(&config, &req)? {
                Some(v) => v["revoked"].as_bool().unwrap_or(false),
                None => {
                    let _lock = lock_unless_shared(&config)?;
                    Store::open_rw(&config, Create::IfFresh)?
                        .write(|db| store::revoke_token_sql(db, &WallClock.stamp(), &id))?
                }
            };
            if revoked {
                println!("token {id} revoked");
                Ok(ExitCode::SUCCESS)
            } else {
                eprintln!("keel: error: no active token {id}");
                Ok(ExitCode::from(2))
            }
        }
    }
}

fn status(r: &store::TokenRow, now: i64) -> &'static str {
    if r.revoked_at.is_some() {
        "revoked"
    } else if r.expires_ms.is_some_and(|e| e <= now) {
        "expired"
    } else {
        "active"
    }
}

pub fn audit(
    dir: &DataDirArg,
    since: Option<&str>,
    as_json: bool,
    verify: bool,
) -> Result<ExitCode> {
    let config = load(dir)?;
    let mut db = Store::open_ro(&config)?;
    if verify {
        return match db
            .read(audit::verify_sql)
            .map_err(crate::commands::no_table("audit log"))?
        {
            Ok(n) => {
                if as_json {
                    println!("{}", json!({"ok": true, "records": n}));
                } else {
                    println!("audit chain ok ({n} records)");
                }
                Ok(ExitCode::SUCCESS)
            }
            Err((seq, why)) => {
                if as_json {
                    println!("{}", json!({"ok": false, "first_bad": seq, "reason": why}));
                }
                eprintln!("keel: error: audit record {seq} is bad: {why}");
                Ok(ExitCode::from(1))
            }
        };
    }
    let since = match since {
        Some(s) => Some(
            chrono::DateTime::parse_from_rfc3339(s)
                .map_err(|e| anyhow!("--since {s:?}: not RFC 3339 ({e})"))?
                .with_timezone(&chrono::Utc)
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        ),
        None => None,
    };
    let rows = db
        .read(|db| audit::list_sql(db, since.as_deref()))
        .map_err(crate::commands::no_table("audit log"))?;
    crate::commands::print_rows(&rows, as_json, "records", "no audit records", |r| {
        format!("#{} {} {} {}", r.seq, r.at, r.kind, r.detail)
    });
    Ok(ExitCode::SUCCESS)
}

fn absolute(file: &Path) -> Result<PathBuf> {
    let dir = match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let dir = dir
        .canonicalize()
        .with_context(|| format!("backup directory {}", dir.display()))?;
    let name = file
        .file_name()
        .ok_or_else(|| anyhow!("{}: not a file name", file.display()))?;
    Ok(dir.join(name))
}

pub fn backup(dir: &DataDirArg, file: &Path) -> Result<ExitCode> {
    let config = load(dir)?;
    let dest = absolute(file)?;
    if dest.exists() {
        bail!("{} exists already; choose a new file", dest.display());
    }
    let mut shown = ProgressLine::new("backing up keel.db", Unit::Bytes, LARGE_BYTES);
    // Progress is always asked for: each step's line also keeps the
    // socket's read timeout per step rather than for the whole copy.
    let request = json!({"op": "backup", "path": dest, "progress": true});
    let answer = ask_running_noted(&config, &request, &mut |p| {
        if let (Some(done), Some(total)) = (p["done"].as_u64(), p["total"].as_u64()) {
            shown.show(done, total);
        }
    })?;
    let report = match answer {
        Some(v) => v["backup"].clone(),
        None => {
            let db = config.data_dir.join("keel.db");
            if !db.exists() {
                bail!("no store in {} to back up", config.data_dir.display());
            }
            let key = store_key(&config, Create::Never)?;
            let secrets = secrets_path(&config);
            let skey = if secrets.exists() {
                Some(master_key(&config, Create::Never)?)
            } else {
                None
            };
            let pages = backup::backup_db(&db, key.as_ref(), &dest, &mut |p| {
                shown.show(p.done, p.total)
            })?;
            let sdest = match &skey {
                Some(k) => {
                    let to = backup::secrets_companion(&dest);
                    backup::backup_db(&secrets, Some(k), &to, &mut |_| {})?;
                    Some(to)
                }
                None => None,
            };
            json!({"path": dest, "pages": pages, "secrets": sdest})
        }
    };
    println!(
        "backup written to {} ({} pages{}); integrity checked",
        dest.display(),
        report["pages"],
        report["secrets"]
            .as_str()
            .map(|s| format!(", secrets in {s}"))
            .unwrap_or_default()
    );
    Ok(ExitCode::SUCCESS)
}

pub fn restore(dir: &DataDirArg, file: &Path, force: bool) -> Result<ExitCode> {
    let config = load(dir)?;
    if !file.is_file() {
        bail!("{}: no such backup file", file.display());
    }
    let _lock = crate::run::lock_data_dir(&config.data_dir)?;
    let key = store_key(&config, Create::Never).context(
        "the backup is decrypted with the master key it was made with: put that key in place (key file or KEEL_MASTER_KEY) first",
    )?;
    backup::verify_keyed(file, key.as_ref())?;
    let db = config.data_dir.join("keel.db");
    let tag = WallClock.now_ms().to_string();
    let mut kept = Vec::new();
    if db.exists() {
        let current = persistence::open_read_only(&db, key.as_ref())?;
        let from_backup = persistence::open_read_only(file, key.as_ref())?;
        let (now, then) = (
            backup::newest_commit(&current).unwrap_or(None),
            backup::newest_commit(&from_backup).unwrap_or(None),
        );
        drop((current, from_backup));
        if now > then && !force {
            bail!(
                "{} holds commits newer than the backup ({} > {}); use --force to replace it",
                db.display(),
                now.as_deref().unwrap_or("-"),
                then.as_deref().unwrap_or("-")
            );
        }
        kept.extend(backup::keep_replaced(&db, &tag)?);
    }
    {
        let mut shown = ProgressLine::new("restoring keel.db", Unit::Bytes, LARGE_BYTES);
        backup::install_copy_noted(file, &db, &mut |p| shown.show(p.done, p.total))?;
    }
    // R39: the record of acknowledged commits follows the restored store
    // (it is older than the one replaced, which is not a loss).
    {
        let conn = open_main(&config)?;
        let seq = persistence::acked::store_seq(&conn)?;
        persistence::acked::reset(&persistence::acked::record_path(&db), seq)
            .context("cannot write the record of acknowledged commits (keel.acked)")?;
    }
    let companion = backup::secrets_companion(file);
    if companion.is_file() {
        let skey = master_key(&config, Create::Never)?;
        backup::verify_keyed(&companion, Some(&skey))?;
        let secrets = secrets_path(&config);
        if secrets.exists() {
            kept.extend(backup::keep_replaced(&secrets, &tag)?);
        }
        backup::install_copy(&companion, &secrets)?;
    }
    append_audit(
        &open_main(&config)?,
        "restored",
        json!({"from": file.display().to_string()}),
    )?;
    println!(
        "restored {} into {}",
        file.display(),
        config.data_dir.display()
    );
    for k in kept {
        println!("kept the replaced file as {}", k.display());
    }
    Ok(ExitCode::SUCCESS)
}

/// The stores of a data dir that a key unlocks: keel.db (when encrypted)
/// and secrets.db (when it exists).
fn keyed_stores(config: &Config) -> Vec<PathBuf> {
    let mut v = Vec::new();
    let db = config.data_dir.join("keel.db");
    if config.storage.encrypt && db.exists() {
        v.push(db);
    }
    let s = secrets_path(config);
    if s.exists() {
        v.push(s);
    }
    v
}

/// Finish or undo a rekey a crash interrupted (called by `keel run` and
/// `keel rekey` with the data-dir lock held, before any store is opened).
/// Whether a rekey left its copies beside the stores (killed halfway).
pub fn rekey_pending(config: &Config) -> bool {
    keyed_stores(config)
        .iter()
        .any(|db| backup::rekey_file(db).exists())
}

pub fn recover_rekey(config: &Config, key: &KeyHandle) -> Result<()> {
    let stores = keyed_stores(config);
    let refs: Vec<&Path> = stores.iter().map(PathBuf::as_path).collect();
    for line in backup::recover_rekey(&refs, key)? {
        eprintln!("keel: {line}");
    }
    Ok(())
}

pub fn rekey(dir: &DataDirArg, new_key_file: Option<&Path>) -> Result<ExitCode> {
    let config = load(dir)?;
    if is_shared(&config) {
        // A new key here would lock this instance out of the shared store.
        bail!("keel rekey does not re-encrypt the shared store's secrets yet: on storage.backend = \"postgres\" every instance keeps the master key that wrote them");
    }
    if crate::run::running_pid(&config.data_dir).is_some() {
        bail!("keel is running; stop it before keel rekey");
    }
    let _lock = crate::run::lock_data_dir(&config.data_dir)?;
    #[allow(clippy::disallowed_methods)] // the binary edge: which key source is in force
    if std::env::var_os("KEEL_MASTER_KEY").is_some() {
        bail!("the key comes from KEEL_MASTER_KEY; keel rekey rotates the key file (unset KEEL_MASTER_KEY, put the key in the file, then rekey)");
    }
    let keychain = config.vault.key_source == keel_actors::config::KeySource::Keychain;
    let old = master_key(&config, Create::Never)?;
    recover_rekey(&config, &old)?;
    let new = match new_key_file {
        Some(p) => masterkey::read_key_file(p)?
            .ok_or_else(|| anyhow!("new key file {} is missing", p.display()))?,
        None => {
            let mut text = Zeroizing::new(String::new());
            std::io::stdin()
                .lock()
                .take(4096)
                .read_to_string(&mut text)
                .context("reading the new key from stdin")?;
            if text.trim().is_empty() {
                MasterKey::generate()
            } else {
                MasterKey::from_hex(&text, "the new key on stdin")?
            }
        }
    };
    let stores = keyed_stores(&config);
    let new_handle = KeyHandle::new(new, "the new key");
    // 1. Each store is copied under the new key beside itself and checked.
    for db in &stores {
        let opts = StoreOptions {
            key: Some(old.clone()),
            ..StoreOptions::from_config(&config, Some(&old))
        };
        let mut opts = opts;
        opts.path = Some(db.clone());
        let conn = persistence::open_connection(&opts)?;
        conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);")?;
        let next = backup::rekey_file(db);
        backup::export_keyed(&conn, &next, Some(&new_handle.key))?;
        drop(conn);
        backup::verify_keyed(&next, Some(&new_handle))?;
    }
    // 2. The switch: the key file (atomic rename) or the keychain entry
    //    (one keyutils update) names the new key. A crash before it leaves
    //    the old key and stores (the copies are removed at the next
    //    start); after it, the next start finishes.
    let holder = if keychain {
        crate::vault::store_keychain_key(&config, &new_handle.key)?
    } else {
        masterkey::write_key_file(&config.key_file(), &new_handle.key)?;
        config.key_file().display().to_string()
    };
    // 3. The copies replace the stores.
    recover_rekey(&config, &new_handle)?;
    append_audit(
        &open_main(&config)?,
        "rekeyed",
        json!({"stores": stores.iter().map(|p| p.display().to_string()).collect::<Vec<_>>()}),
    )?;
    println!(
        "master key rotated ({} stores); the new key is in {holder}: back it up",
        stores.len(),
    );
    Ok(ExitCode::SUCCESS)
}

pub fn migrate_encrypt(dir: &DataDirArg) -> Result<ExitCode> {
    let config = load(dir)?;
    let _lock = crate::run::lock_data_dir(&config.data_dir)?;
    let db = config.data_dir.join("keel.db");
    match persistence::is_plain_sqlite(&db) {
        None => bail!("no store at {}", db.display()),
        Some(false) => bail!(
            "{} is not a plain SQLite database (already encrypted?)",
            db.display()
        ),
        Some(true) => {}
    }
    let key = master_key(&config, Create::ForEncrypt)?;
    let plain = {
        let mut o = StoreOptions::from_config(&config, None);
        o.key = None;
        o
    };
    let conn = persistence::open_connection(&plain)?;
    migrate::check_not_newer(&conn, &db)?;
    conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);")?;
    let turns: i64 = conn.query_row("SELECT COUNT(*) FROM turns", [], |r| r.get(0))?;
    let tmp = config.data_dir.join("keel.db.encrypt-tmp");
    {
        let mut shown = ProgressLine::new("encrypting keel.db", Unit::Bytes, LARGE_BYTES);
        backup::export_keyed_noted(&conn, &tmp, Some(&key.key), &mut |p| {
            shown.show(p.done, p.total)
        })?;
    }
    drop(conn);
    backup::verify_keyed(&tmp, Some(&key))?;
    let check: i64 = persistence::open_read_only(&tmp, Some(&key))?.query_row(
        "SELECT COUNT(*) FROM turns",
        [],
        |r| r.get(0),
    )?;
    if check != turns {
        bail!("the encrypted copy holds {check} turns, the store {turns}; nothing changed");
    }
    // The plain file stays until the encrypted one is in place and opens.
    let old = config
        .data_dir
        .join(format!("keel.db.plain-{}", WallClock.now_ms()));
    std::fs::rename(&db, &old).with_context(|| format!("moving {} aside", db.display()))?;
    std::fs::rename(&tmp, &db).with_context(|| format!("installing {}", db.display()))?;
    std::fs::File::open(&config.data_dir)?.sync_all()?;
    backup::verify_keyed(&db, Some(&key))?;
    std::fs::remove_file(&old).with_context(|| format!("removing {}", old.display()))?;
    let mut enc = config.clone();
    enc.storage.encrypt = true;
    append_audit(
        &open_main(&enc)?,
        "migrated",
        json!({"encrypted": true, "turns": turns}),
    )?;
    println!("{} is now encrypted ({turns} turns)", db.display());
    if !config.storage.encrypt {
        println!("set [storage] encrypt = true (or remove encrypt = false) in the config before the next start");
    }
    Ok(ExitCode::SUCCESS)
}
