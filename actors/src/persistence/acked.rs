//! R39: keel's own fsync'd record of the highest acknowledged commit.
//!
//! SQLite silently rolls back a damaged or missing WAL, and
//! `integrity_check` still says ok afterwards. So every write commit of the
//! writer bumps `meta.commit_seq` inside its transaction and, after COMMIT
//! and before any job of the batch is answered, overwrites `keel.acked`
//! next to the database with that sequence (one fixed-size line with its
//! own checksum, `fdatasync`ed). At start a store whose `commit_seq` is
//! behind the record has lost acknowledged commits: that is reported as
//! `data_loss_detected` and keel refuses to serve (unless
//! `--accept-data-loss`).
//!
//! The record may lag the store by the last batch (killed between COMMIT
//! and the record write: nothing of that batch was acknowledged), never
//! lead it unless commits were lost. keel never deletes `-wal`/`-shm`.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rusqlite::{Connection, OptionalExtension};

use crate::error::StoreError;

/// The record's file name, next to `keel.db`.
pub const ACKED_FILE: &str = "keel.acked";

/// Where the record of the database at `db` lives.
pub fn record_path(db: &Path) -> PathBuf {
    db.with_file_name(ACKED_FILE)
}

/// FNV-1a 64 of the sequence text: tells a damaged record from a real one.
fn checksum(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The fixed-size line holding `seq`.
fn line(seq: i64) -> String {
    let n = format!("{seq:020}");
    format!("keel-acked {n} {:016x}\n", checksum(&n))
}

/// What the record file says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    Missing,
    /// Unreadable or failing its checksum.
    Damaged,
    Seq(i64),
}

/// Read the record at `path`.
pub fn read(path: &Path) -> Record {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Record::Missing,
        Err(_) => return Record::Damaged,
    };
    let Ok(text) = std::str::from_utf8(&bytes) else {
        return Record::Damaged;
    };
    let mut parts = text.trim_end_matches('\n').split(' ');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some("keel-acked"), Some(n), Some(sum), None)
            if n.len() == 20 && format!("{:016x}", checksum(n)) == sum =>
        {
            n.parse().map_or(Record::Damaged, Record::Seq)
        }
        _ => Record::Damaged,
    }
}

/// The writer's handle on the record: overwritten in place, synced.
pub struct AckedRecord {
    file: File,
}

impl AckedRecord {
    pub fn open(path: &Path) -> io::Result<AckedRecord> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)?;
        Ok(AckedRecord { file })
    }

    /// Record `seq` durably (same size every time: no metadata to sync).
    pub fn store(&self, seq: i64) -> io::Result<()> {
        self.file.write_all_at(line(seq).as_bytes(), 0)?;
        self.file.sync_data()
    }
}

/// Write the record once (start-up, `--accept-data-loss`).
pub fn reset(path: &Path, seq: i64) -> io::Result<()> {
    AckedRecord::open(path)?.store(seq)
}

/// `meta.commit_seq` (0 before the first counted commit).
pub fn store_seq(conn: &Connection) -> Result<i64, StoreError> {
    let v: Option<String> = conn
        .prepare_cached("SELECT value FROM meta WHERE key = 'commit_seq'")?
        .query_row([], |r| r.get(0))
        .optional()?;
    Ok(v.and_then(|v| v.parse().ok()).unwrap_or(0))
}

/// Bump `meta.commit_seq` inside the open transaction; the new value.
pub(super) fn bump(conn: &Connection) -> Result<i64, StoreError> {
    let v: String = conn
        .prepare_cached(
            "INSERT INTO meta (key, value) VALUES ('commit_seq', '1')
             ON CONFLICT (key) DO UPDATE SET value = CAST(value AS INTEGER) + 1
             RETURNING value",
        )?
        .query_row([], |r| r.get(0))?;
    v.parse()
        .map_err(|_| StoreError::Invalid(format!("meta.commit_seq is not a number: {v:?}")))
}

/// Acknowledged commits the store is missing, found at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataLoss {
    /// The highest acknowledged commit on record.
    pub recorded: i64,
    /// The store's own highest commit.
    pub found: i64,
}

impl DataLoss {
    pub fn missing(&self) -> i64 {
        self.recorded - self.found
    }

    /// The one-line reason `/readyz` and the log give.
    pub fn reason(&self, db: &Path) -> String {
        format!(
            "data_loss_detected: {} is missing {} acknowledged commits (store at commit {}, \
             keel.acked records {}); the WAL was probably damaged or deleted. Restore a backup, \
             or start with --accept-data-loss to serve what is left",
            db.display(),
            self.missing(),
            self.found,
            self.recorded
        )
    }
}

/// Compare the store with its record at start. A missing or damaged record
/// is rewritten from the store (with a warning: nothing to compare against);
/// a record behind the store is brought up to it.
pub fn check(conn: &Connection, db: &Path) -> Result<Option<DataLoss>, StoreError> {
    let found = store_seq(conn)?;
    let path = record_path(db);
    let write = |seq: i64| {
        reset(&path, seq).map_err(|e| StoreError::Open {
            path: path.clone(),
            detail: e.to_string(),
        })
    };
    match read(&path) {
        Record::Seq(recorded) if recorded > found => Ok(Some(DataLoss { recorded, found })),
        Record::Seq(recorded) => {
            if recorded < found {
                write(found)?;
            }
            Ok(None)
        }
        Record::Missing => {
            if found > 0 {
                tracing::warn!(path = %path.display(), commit = found, "the record of acknowledged commits is missing; starting a new one (losses before now cannot be detected)");
            }
            write(found)?;
            Ok(None)
        }
        Record::Damaged => {
            tracing::warn!(path = %path.display(), commit = found, "the record of acknowledged commits is damaged; starting a new one (losses before now cannot be detected)");
            write(found)?;
            Ok(None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_record_round_trips_and_damage_is_seen() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(ACKED_FILE);
        assert_eq!(read(&p), Record::Missing);
        let r = AckedRecord::open(&p).unwrap();
        r.store(41).unwrap();
        r.store(42).unwrap();
        assert_eq!(read(&p), Record::Seq(42));
        let mut bytes = std::fs::read(&p).unwrap();
        bytes[20] ^= 1;
        std::fs::write(&p, &bytes).unwrap();
        assert_eq!(read(&p), Record::Damaged);
        std::fs::write(&p, b"").unwrap();
        assert_eq!(read(&p), Record::Damaged);
        std::fs::write(&p, [0u8; 60]).unwrap();
        assert_eq!(read(&p), Record::Damaged);
    }
}
