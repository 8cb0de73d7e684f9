//! Online backup and restore of the stores (R47). `backup_db` copies a
//! live database with SQLite's online backup API from its own read-only
//! connection (the writer goes on), into a new file keyed like the source
//! (an encrypted store gives an encrypted backup), fsyncs and checks it
//! (`integrity_check`). `restore_db` puts a checked backup in place of a
//! store with keel stopped, keeping the replaced files.

use std::fs::{self, File};
use std::path::{Path, PathBuf};

use rusqlite::backup::{Backup, Progress, StepResult};
use rusqlite::{Connection, OpenFlags};
use serde::Serialize;

use super::open::{apply_key, classify_key_error, open_read_only};
use crate::error::StoreError;
use crate::masterkey::KeyHandle;

/// Pages copied per backup step (1 MiB with 4 KiB pages): the unit of
/// progress. The copy reads one snapshot throughout (see [`backup_db`]).
const PAGES_PER_STEP: std::os::raw::c_int = 256;

/// How far a backup is, in bytes of the source store (pages × page size).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct BackupProgress {
    pub done: u64,
    pub total: u64,
}

/// What a backup wrote.
#[derive(Debug, Clone, Serialize)]
pub struct BackupReport {
    pub path: PathBuf,
    pub pages: i64,
    pub bytes: u64,
    /// The copy of `secrets.db` (`FILE.secrets`), when there is one.
    pub secrets: Option<PathBuf>,
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> StoreError + '_ {
    move |e| StoreError::Open {
        path: path.to_path_buf(),
        detail: e.to_string(),
    }
}

/// The companion file holding the copy of `secrets.db`.
pub fn secrets_companion(dest: &Path) -> PathBuf {
    let mut s = dest.as_os_str().to_os_string();
    s.push(".secrets");
    PathBuf::from(s)
}

/// Copy `src` (keyed with `key`) to the new file `dest` with the same key,
/// in steps of [`PAGES_PER_STEP`] pages, telling `progress` after each
/// step (the last call has `done == total`); then fsync and `quick_check`
/// it. The source connection holds one read transaction for the whole
/// copy, so every step reads the same WAL snapshot: a writer committing
/// meanwhile neither blocks the copy nor restarts it (SQLite restarts an
/// online backup whose source changed between steps only when each step
/// opens a new read transaction), and the backup is the store as of the
/// moment the copy began.
pub fn backup_db(
    src: &Path,
    key: Option<&KeyHandle>,
    dest: &Path,
    progress: &mut dyn FnMut(BackupProgress),
) -> Result<i64, StoreError> {
    if dest.exists() {
        return Err(StoreError::Invalid(format!(
            "{} exists already; choose a new file",
            dest.display()
        )));
    }
    let from = open_read_only(src, key)?;
    // The snapshot: a deferred BEGIN takes its read lock at the first read.
    from.execute_batch("BEGIN")?;
    let page_size = page_size(&from)?;
    from.query_row("SELECT COUNT(*) FROM sqlite_master", [], |r| {
        r.get::<_, i64>(0)
    })?;
    let mut to = Connection::open_with_flags(
        dest,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE,
    )
    .map_err(|e| StoreError::Open {
        path: dest.to_path_buf(),
        detail: e.to_string(),
    })?;
    apply_key(&to, dest, key)?;
    let bytes = |p: Progress| {
        let total = u64::try_from(p.pagecount).unwrap_or(0);
        let left = u64::try_from(p.remaining).unwrap_or(0);
        BackupProgress {
            done: total.saturating_sub(left) * page_size,
            total: total * page_size,
        }
    };
    let pages = {
        let b = Backup::new(&from, &mut to)?;
        loop {
            match b.step(PAGES_PER_STEP)? {
                StepResult::Done => {
                    let p = b.progress();
                    progress(bytes(p));
                    break i64::from(p.pagecount);
                }
                StepResult::More => progress(bytes(b.progress())),
                // Busy/locked: another connection holds a lock; try again.
                _ => std::thread::sleep(std::time::Duration::from_millis(5)),
            }
        }
    };
    from.execute_batch("COMMIT")?;
    drop(from);
    let problems = super::meta::quick_check(&to).map_err(|e| classify_key_error(dest, key, e))?;
    drop(to);
    if problems != ["ok"] {
        return Err(StoreError::Corrupt {
            path: dest.to_path_buf(),
            detail: format!("the backup failed its check: {}", problems.join("; ")),
        });
    }
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(dest, fs::Permissions::from_mode(0o600)).map_err(io(dest))?;
    }
    File::open(dest)
        .and_then(|f| f.sync_all())
        .map_err(io(dest))?;
    if let Some(dir) = dest.parent() {
        let _ = File::open(dir).and_then(|f| f.sync_all());
    }
    Ok(pages)
}

/// Back up `keel.db` to `dest` and, when present, `secrets.db` to
/// `dest.secrets`; `progress` follows the copy of `keel.db`.
pub fn backup_files(
    db: &Path,
    db_key: Option<&KeyHandle>,
    secrets: Option<&Path>,
    secrets_key: &KeyHandle,
    dest: &Path,
    progress: &mut dyn FnMut(BackupProgress),
) -> Result<BackupReport, StoreError> {
    let pages = backup_db(db, db_key, dest, progress)?;
    let secrets = match secrets {
        Some(s) => {
            let to = secrets_companion(dest);
            // Small (names and values): no progress of its own.
            backup_db(s, Some(secrets_key), &to, &mut |_| {})?;
            Some(to)
        }
        None => None,
    };
    Ok(BackupReport {
        path: dest.to_path_buf(),
        pages,
        bytes: fs::metadata(dest).map(|m| m.len()).unwrap_or(0),
        secrets,
    })
}

/// The newest commit time recorded in a store (turns and audit records),
/// to refuse replacing newer data with an older backup.
pub fn newest_commit(conn: &Connection) -> Result<Option<String>, StoreError> {
    let newest: Option<String> = conn.query_row(
        "SELECT MAX(t) FROM (SELECT MAX(created_at) AS t FROM turns
                             UNION ALL SELECT MAX(at) FROM audit)",
        [],
        |r| r.get(0),
    )?;
    Ok(newest)
}

/// Move `path` (and its `-wal`/`-shm`) aside as `<name>.replaced-<tag>`;
/// returns the moved files.
pub fn keep_replaced(path: &Path, tag: &str) -> Result<Vec<PathBuf>, StoreError> {
    let mut moved = Vec::new();
    for suffix in ["", "-wal", "-shm"] {
        let mut from = path.as_os_str().to_os_string();
        from.push(suffix);
        let from = PathBuf::from(from);
        if !from.exists() {
            continue;
        }
        let mut to = path.as_os_str().to_os_string();
        to.push(format!(".replaced-{tag}{suffix}"));
        let to = PathBuf::from(to);
        fs::rename(&from, &to).map_err(io(&from))?;
        moved.push(to);
    }
    Ok(moved)
}

/// Copy the checked backup `src` to `dest` (temp file, fsync, rename, dir
/// fsync). `dest` must not exist (moved aside by the caller).
pub fn install_copy(src: &Path, dest: &Path) -> Result<(), StoreError> {
    install_copy_noted(src, dest, &mut |_| {})
}

/// Bytes copied per step of [`install_copy_noted`]: the unit of progress.
const COPY_CHUNK: usize = 1024 * 1024;

/// [`install_copy`], telling `progress` after each MiB copied (the last
/// call has `done == total`).
pub fn install_copy_noted(
    src: &Path,
    dest: &Path,
    progress: &mut dyn FnMut(BackupProgress),
) -> Result<(), StoreError> {
    use std::io::{Read, Write};
    let dir = dest.parent().unwrap_or(Path::new("."));
    let tmp = dest.with_extension("db.restore-tmp");
    {
        let mut from = File::open(src).map_err(io(src))?;
        let total = from.metadata().map_err(io(src))?.len();
        let mut to = File::create(&tmp).map_err(io(&tmp))?;
        let mut buf = vec![0u8; COPY_CHUNK];
        let mut done = 0u64;
        loop {
            let n = from.read(&mut buf).map_err(io(src))?;
            if n == 0 {
                break;
            }
            to.write_all(&buf[..n]).map_err(io(&tmp))?;
            done += n as u64;
            progress(BackupProgress {
                done: done.min(total),
                total,
            });
        }
        if done < total {
            return Err(StoreError::Invalid(format!(
                "{} shrank while it was copied ({done} of {total} bytes)",
                src.display()
            )));
        }
    }
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o600)).map_err(io(&tmp))?;
    }
    File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(io(&tmp))?;
    fs::rename(&tmp, dest).map_err(io(dest))?;
    File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(io(dir))?;
    Ok(())
}

/// Write a copy of the open database `conn` to the new file `dest`, keyed
/// with `key` (`None` = plain), with `sqlcipher_export` (schema, rows and
/// `user_version`); then fsync and check it. Used by `keel rekey` and
/// `keel migrate --encrypt`.
pub fn export_keyed(
    conn: &Connection,
    dest: &Path,
    key: Option<&crate::masterkey::MasterKey>,
) -> Result<(), StoreError> {
    export_keyed_noted(conn, dest, key, &mut |_| {})
}

/// The database's page size in bytes. SQLCipher answers `page_size` on a
/// keyed database as text (`cipher_page_size`); plain SQLite as an integer.
fn page_size(conn: &Connection) -> Result<u64, StoreError> {
    let v: rusqlite::types::Value = conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
    Ok(match v {
        rusqlite::types::Value::Integer(n) => u64::try_from(n).ok(),
        rusqlite::types::Value::Text(t) => t.trim().parse().ok(),
        _ => None,
    }
    .unwrap_or(4096))
}

/// [`export_keyed`], telling `progress` how far the copy is: `total` is
/// the source's size (pages × page size), `done` the copy's size on disk
/// so far, read every 100 ms by a watcher thread while `sqlcipher_export`
/// (one SQL call with no progress of its own) writes it; never more than
/// `total - 1` until the copy is complete, then `done == total` once.
pub fn export_keyed_noted(
    conn: &Connection,
    dest: &Path,
    key: Option<&crate::masterkey::MasterKey>,
    progress: &mut (dyn FnMut(BackupProgress) + Send),
) -> Result<(), StoreError> {
    let pages: i64 = conn.query_row("PRAGMA page_count", [], |r| r.get(0))?;
    let page_size = page_size(conn)?;
    let total = u64::try_from(pages).unwrap_or(0) * page_size;
    let flag = std::sync::atomic::AtomicBool::new(false);
    let finished = &flag;
    std::thread::scope(|scope| {
        let watcher = scope.spawn(move || {
            use std::sync::atomic::Ordering;
            // A stop is seen within one period; the copy itself takes longer.
            while !finished.load(Ordering::Acquire) {
                let size = fs::metadata(dest).map(|m| m.len()).unwrap_or(0);
                progress(BackupProgress {
                    done: size.min(total.saturating_sub(1)),
                    total,
                });
                std::thread::park_timeout(std::time::Duration::from_millis(100));
            }
            progress
        });
        let result = export_keyed_inner(conn, dest, key);
        finished.store(true, std::sync::atomic::Ordering::Release);
        watcher.thread().unpark();
        let progress = watcher
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e));
        if result.is_ok() {
            progress(BackupProgress { done: total, total });
        }
        result
    })
}

fn export_keyed_inner(
    conn: &Connection,
    dest: &Path,
    key: Option<&crate::masterkey::MasterKey>,
) -> Result<(), StoreError> {
    if dest.exists() {
        fs::remove_file(dest).map_err(io(dest))?;
    }
    let version = super::migrate::current_version(conn)?;
    let literal = key.map(|k| k.attach_literal());
    let key_sql = literal.as_ref().map_or("''", |l| l.as_str());
    // ATTACH takes the file name as a bound parameter; the key literal is
    // our own hex, never outside input.
    conn.execute(
        &format!("ATTACH DATABASE ?1 AS rekeyed KEY {key_sql}"),
        [dest.to_string_lossy().as_ref()],
    )?;
    let result = (|| {
        conn.query_row("SELECT sqlcipher_export('rekeyed')", [], |_| Ok(()))?;
        conn.execute_batch(&format!("PRAGMA rekeyed.user_version = {version};"))?;
        Ok::<_, StoreError>(())
    })();
    let detached = conn.execute_batch("DETACH DATABASE rekeyed;");
    result?;
    detached?;
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(dest, fs::Permissions::from_mode(0o600)).map_err(io(dest))?;
    }
    File::open(dest)
        .and_then(|f| f.sync_all())
        .map_err(io(dest))?;
    // The copy's directory entry is durable before anyone relies on it.
    if let Some(dir) = dest.parent() {
        File::open(dir)
            .and_then(|f| f.sync_all())
            .map_err(io(dir))?;
    }
    Ok(())
}

/// Check that `path` opens with `key`, holds a schema and passes
/// `quick_check`. An empty file would open with any key (SQLite sees a new
/// database): it never passes, so a copy cut short before its first page
/// is never taken for a finished one.
pub fn verify_keyed(path: &Path, key: Option<&KeyHandle>) -> Result<(), StoreError> {
    let empty = fs::metadata(path).map(|m| m.len() == 0).unwrap_or(true);
    if empty {
        return Err(StoreError::Corrupt {
            path: path.to_path_buf(),
            detail: "the file is empty".into(),
        });
    }
    let c = open_read_only(path, key)?;
    let tables: i64 = c
        .query_row("SELECT COUNT(*) FROM sqlite_master", [], |r| r.get(0))
        .map_err(|e| classify_key_error(path, key, e))?;
    if tables == 0 {
        return Err(StoreError::Corrupt {
            path: path.to_path_buf(),
            detail: "the file holds no schema".into(),
        });
    }
    let problems = super::meta::quick_check(&c).map_err(|e| classify_key_error(path, key, e))?;
    if problems != ["ok"] {
        return Err(StoreError::Corrupt {
            path: path.to_path_buf(),
            detail: problems.join("; "),
        });
    }
    Ok(())
}

/// The file a rekey prepares beside `db` before the switch.
pub fn rekey_file(db: &Path) -> PathBuf {
    let mut s = db.as_os_str().to_os_string();
    s.push(".rekey");
    PathBuf::from(s)
}

/// Finish or undo a rekey that was interrupted (kill -9): a `<db>.rekey`
/// that the current key opens is the new store (the key switch happened):
/// it replaces `<db>`; one it does not open is a leftover of a rekey that
/// never switched: removed. Returns what was done, for the log.
pub fn recover_rekey(dbs: &[&Path], key: &KeyHandle) -> Result<Vec<String>, StoreError> {
    let mut done = Vec::new();
    for db in dbs {
        let next = rekey_file(db);
        if !next.exists() {
            continue;
        }
        if verify_keyed(&next, Some(key)).is_ok() {
            fs::rename(&next, db).map_err(io(db))?;
            done.push(format!(
                "finished the interrupted rekey of {}",
                db.display()
            ));
        } else {
            fs::remove_file(&next).map_err(io(&next))?;
            // What SQLite kept beside the copy (a journal of the export
            // a kill cut short) belongs to nothing now.
            for suffix in ["-journal", "-wal", "-shm"] {
                let mut side = next.as_os_str().to_os_string();
                side.push(suffix);
                match fs::remove_file(&side) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        return Err(io(Path::new(&side))(e))
                    }
                    _ => {}
                }
            }
            done.push(format!(
                "removed {} (a rekey interrupted before the key changed)",
                next.display()
            ));
        }
        if let Some(dir) = db.parent() {
            let _ = File::open(dir).and_then(|f| f.sync_all());
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A plain WAL database of `rows` rows of 4 KiB each.
    fn store(path: &Path, rows: i64) -> Connection {
        let c = Connection::open(path).unwrap();
        c.execute_batch(
            "PRAGMA journal_mode = WAL; CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB);",
        )
        .unwrap();
        let tx = c.unchecked_transaction().unwrap();
        for i in 0..rows {
            tx.execute("INSERT INTO t VALUES (?1, zeroblob(4096))", [i])
                .unwrap();
        }
        tx.commit().unwrap();
        c
    }

    /// A writer commits between the copy's steps (as keel does while
    /// `keel backup` runs): the copy neither restarts (progress only goes
    /// forward, one call per step) nor takes any of those commits in —
    /// it is the store as of its first step, and it checks clean.
    #[test]
    fn a_stepped_backup_reads_one_snapshot_while_a_writer_commits() {
        let dir = tempfile::tempdir().unwrap();
        let (src, dest) = (dir.path().join("src.db"), dir.path().join("copy.db"));
        let writer = store(&src, 2_000);
        let mut seen: Vec<BackupProgress> = Vec::new();
        let mut next = 10_000;
        // Three commits (not one per step: a copy that restarted at each
        // would never end).
        let pages = backup_db(&src, None, &dest, &mut |p| {
            seen.push(p);
            if next < 10_003 {
                writer
                    .execute("INSERT INTO t VALUES (?1, zeroblob(4096))", [next])
                    .unwrap();
                next += 1;
            }
        })
        .unwrap();
        assert!(seen.len() >= 8, "stepped: {} calls", seen.len());
        assert!(
            seen.windows(2)
                .all(|w| w[1].done > w[0].done && w[1].total == w[0].total),
            "restarted or changed size: {seen:?}"
        );
        let last = seen.last().unwrap();
        assert_eq!(last.done, last.total);
        assert_eq!(last.total, u64::try_from(pages).unwrap() * 4096);
        let copy = Connection::open(&dest).unwrap();
        let n: i64 = copy
            .query_row("SELECT COUNT(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 2_000, "the copy holds commits made after it began");
        let now: i64 = writer
            .query_row("SELECT COUNT(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(now, 2_003, "the writer went on");
    }
}
