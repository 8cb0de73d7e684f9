//! One write per commit to the WAL (issue 14): an SQLite VFS shim that
//! gathers the frames a transaction appends to its `-wal` file and hands
//! them to the file system in a few large writes when SQLite syncs the WAL.
//!
//! SQLite writes every WAL frame as two `pwrite` calls (the 24-byte frame
//! header, then the page): a group commit of ~25 messages is ~100 frames,
//! ~200 system calls. Measured on this machine (C, 100 frames of 4 KiB):
//! 260 – 345 µs per commit as SQLite writes them, 37 – 80 µs as one write
//! (the unix VFS takes at most 128 KiB per call: 124 KiB chunks here).
//!
//! Why holding the frames until the sync is safe, read in SQLite's
//! `walFrames` (3.53): with `synchronous = FULL` a commit writes its frames,
//! then syncs the WAL, and only then appends them to the wal-index and
//! publishes the new header that lets any other connection (the
//! checkpointer, readers, another process) see them. Every byte another
//! handle could read is therefore on the file before it is visible, and a
//! commit is never reported before the sync, exactly as without the shim.
//! A crash loses only frames that were not synced yet, which SQLite never
//! counted as committed. So the shim is used only by connections that run
//! `synchronous = FULL` (`open_connection` picks it) and only for WAL
//! files; every other file is the base VFS's own handle, untouched.
//!
//! The buffer is flushed before anything that looks at the file: a sync,
//! a read (SQLite reading back a frame, recomputing checksums), the size,
//! a truncate, a file control, a close, and any write that does not
//! continue the buffered run (a frame overwritten in place, a new WAL
//! header). A failed flush is that call's error (`SQLITE_FULL`,
//! `SQLITE_IOERR_WRITE` from the base VFS), so the commit fails as if its
//! own write had; the buffer is dropped either way, since SQLite rewrites
//! every frame of a failed transaction.
//!
//! The shim wraps whichever VFS is the default when the first connection
//! opens (the unix VFS, or `keel-faultfs` under `keel torture`, so injected
//! faults still hit these writes).

use std::ffi::{c_int, c_void, CStr};
use std::sync::OnceLock;

use rusqlite::ffi;

use super::vfs_shim;

/// The name connections open this VFS by.
pub const NAME: &CStr = c"keel-walbuf";

/// The largest write handed to the base VFS: the unix VFS writes at most
/// 128 KiB − 1 per call (`seekAndWriteFd` masks the length with 0x1ffff),
/// so a commit's frames go out in writes of 124 KiB.
const MAX_WRITE: usize = 124 << 10;

/// Above this many buffered bytes a write goes straight to the file (a
/// batch is bounded, so this is only a backstop for memory).
const MAX_BUFFER: usize = 16 << 20;

struct Base(*mut ffi::sqlite3_vfs);

// SAFETY: SQLite's VFS objects are immutable after registration and their
// methods are thread-safe (SQLite calls them from any thread).
unsafe impl Send for Base {}
// SAFETY: as above.
unsafe impl Sync for Base {}

static BASE: OnceLock<Option<Base>> = OnceLock::new();

/// Register the shim (once, over the current default VFS) and answer
/// whether connections can use it. The base must be one whose VFS-level
/// methods read nothing of the `sqlite3_vfs` they are called with but its
/// `mxPathname` and `pAppData` (copied): the unix VFS and keel-faultfs.
pub fn available() -> bool {
    BASE.get_or_init(register).is_some()
}

fn register() -> Option<Base> {
    // SAFETY: a null name asks for the default VFS; SQLite initialises
    // itself and returns a pointer valid for the life of the process.
    let base = unsafe { ffi::sqlite3_vfs_find(std::ptr::null()) };
    if base.is_null() {
        return None;
    }
    // SAFETY: `base` is a registered VFS (non-null, checked above); we copy
    // its plain fields and function pointers.
    let mut vfs: ffi::sqlite3_vfs = unsafe { std::ptr::read(base) };
    // SAFETY: every registered VFS has a NUL-terminated name.
    let base_name = unsafe { CStr::from_ptr(vfs.zName) };
    if base_name != c"unix" && base_name != super::faultfs::NAME {
        tracing::warn!(vfs = ?base_name, "unknown default SQLite VFS: WAL writes are not coalesced");
        return None;
    }
    vfs.szOsFile = (HEADER + vfs.szOsFile as usize) as c_int;
    vfs.pNext = std::ptr::null_mut();
    vfs.zName = NAME.as_ptr();
    vfs.xOpen = Some(x_open);
    let vfs = Box::leak(Box::new(vfs));
    // SAFETY: `vfs` is leaked (lives forever) and fully initialised; SQLite
    // only links it into its list (not as the default).
    let rc = unsafe { ffi::sqlite3_vfs_register(vfs, 0) };
    if rc != ffi::SQLITE_OK {
        tracing::warn!(
            rc,
            "cannot register the WAL write VFS: WAL writes are not coalesced"
        );
        return None;
    }
    Some(Base(base))
}

fn base() -> *mut ffi::sqlite3_vfs {
    match BASE.get() {
        Some(Some(b)) => b.0,
        _ => unreachable!("keel-walbuf opens files only once registered"),
    }
}

/// The frames of the transaction being written: `data` belongs at file
/// offset `at`.
struct Pending {
    data: Vec<u8>,
    at: i64,
}

/// A WAL handle: our header, then the base VFS's file.
#[repr(C)]
struct WalFile {
    base: ffi::sqlite3_file,
    pending: *mut Pending,
}

const HEADER: usize = std::mem::size_of::<WalFile>().next_multiple_of(16);

unsafe fn pending<'a>(f: *mut ffi::sqlite3_file) -> &'a mut Pending {
    // SAFETY: xOpen wrote a WalFile with a live `pending` box at the start
    // of every WAL handle; SQLite uses one handle from one thread at a time.
    unsafe { &mut *(*f.cast::<WalFile>()).pending }
}

macro_rules! forward {
    ($f:expr, $method:ident $(, $arg:expr)*) => {
        vfs_shim::forward!(HEADER, $f, $method $(, $arg)*)
    };
}

/// Write what is buffered; the buffer is empty afterwards whatever the
/// outcome.
unsafe fn flush(f: *mut ffi::sqlite3_file) -> c_int {
    // SAFETY: an open WAL handle of ours.
    let p = unsafe { pending(f) };
    if p.data.is_empty() {
        return ffi::SQLITE_OK;
    }
    let mut rc = ffi::SQLITE_OK;
    let mut at = p.at;
    for chunk in p.data.chunks(MAX_WRITE) {
        rc = forward!(f, xWrite, chunk.as_ptr().cast(), chunk.len() as c_int, at);
        if rc != ffi::SQLITE_OK {
            break;
        }
        at += chunk.len() as i64;
    }
    p.data.clear();
    rc
}

/// Flush, then run `then` when that worked.
macro_rules! flushed {
    ($f:expr, $then:expr) => {{
        // SAFETY: an open WAL handle of ours.
        let rc = unsafe { flush($f) };
        if rc != ffi::SQLITE_OK {
            rc
        } else {
            $then
        }
    }};
}

unsafe extern "C" fn x_open(
    _vfs: *mut ffi::sqlite3_vfs,
    name: ffi::sqlite3_filename,
    file: *mut ffi::sqlite3_file,
    flags: c_int,
    out_flags: *mut c_int,
) -> c_int {
    let base = base();
    // SAFETY: the base VFS has xOpen (checked kinds: unix, keel-faultfs).
    let open = unsafe { (*base).xOpen }.expect("the base VFS has xOpen");
    if flags & ffi::SQLITE_OPEN_WAL == 0 {
        // Not a WAL: the base's own handle in our (larger) memory.
        // SAFETY: `file` has at least the base's szOsFile bytes.
        return unsafe { open(base, name, file, flags, out_flags) };
    }
    // SAFETY: `file` has room for our header and the base file.
    let rc = unsafe { vfs_shim::open_base::<HEADER>(base, name, file, flags, out_flags) };
    if rc != ffi::SQLITE_OK {
        return rc;
    }
    let header = WalFile {
        base: ffi::sqlite3_file { pMethods: &METHODS },
        pending: Box::into_raw(Box::new(Pending {
            data: Vec::new(),
            at: 0,
        })),
    };
    // SAFETY: the header's room at the start of `file` (SQLite's memory).
    unsafe { std::ptr::write(file.cast::<WalFile>(), header) };
    ffi::SQLITE_OK
}

unsafe extern "C" fn x_close(f: *mut ffi::sqlite3_file) -> c_int {
    // SAFETY: an open WAL handle of ours.
    let flushed = unsafe { flush(f) };
    let rc = forward!(f, xClose);
    // SAFETY: our header of this handle; its box is freed once, here.
    unsafe {
        let h = f.cast::<WalFile>();
        drop(Box::from_raw((*h).pending));
        (*h).pending = std::ptr::null_mut();
    }
    if flushed != ffi::SQLITE_OK {
        flushed
    } else {
        rc
    }
}

unsafe extern "C" fn x_write(
    f: *mut ffi::sqlite3_file,
    buf: *const c_void,
    amt: c_int,
    ofst: ffi::sqlite3_int64,
) -> c_int {
    let n = amt.max(0) as usize;
    let continues = {
        // SAFETY: an open WAL handle of ours (this borrow ends here).
        let p = unsafe { pending(f) };
        !p.data.is_empty() && ofst == p.at + p.data.len() as i64 && p.data.len() + n <= MAX_BUFFER
    };
    if !continues {
        // Not the next bytes of the run: what is buffered goes first, so
        // writes reach the file in SQLite's order.
        // SAFETY: an open WAL handle of ours.
        let rc = unsafe { flush(f) };
        if rc != ffi::SQLITE_OK {
            return rc;
        }
        if n > MAX_WRITE {
            return forward!(f, xWrite, buf, amt, ofst);
        }
    }
    // SAFETY: an open WAL handle of ours.
    let p = unsafe { pending(f) };
    if !continues {
        p.at = ofst;
    }
    // SAFETY: SQLite passes `amt` readable bytes at `buf`.
    p.data
        .extend_from_slice(unsafe { std::slice::from_raw_parts(buf.cast::<u8>(), n) });
    ffi::SQLITE_OK
}

unsafe extern "C" fn x_read(
    f: *mut ffi::sqlite3_file,
    buf: *mut c_void,
    amt: c_int,
    ofst: ffi::sqlite3_int64,
) -> c_int {
    flushed!(f, forward!(f, xRead, buf, amt, ofst))
}

unsafe extern "C" fn x_truncate(f: *mut ffi::sqlite3_file, size: ffi::sqlite3_int64) -> c_int {
    flushed!(f, forward!(f, xTruncate, size))
}

unsafe extern "C" fn x_sync(f: *mut ffi::sqlite3_file, flags: c_int) -> c_int {
    flushed!(f, forward!(f, xSync, flags))
}

unsafe extern "C" fn x_file_size(
    f: *mut ffi::sqlite3_file,
    size: *mut ffi::sqlite3_int64,
) -> c_int {
    flushed!(f, forward!(f, xFileSize, size))
}

unsafe extern "C" fn x_file_control(
    f: *mut ffi::sqlite3_file,
    op: c_int,
    arg: *mut c_void,
) -> c_int {
    flushed!(f, forward!(f, xFileControl, op, arg))
}

/// A WAL file has no shared memory of its own (the wal-index hangs off the
/// database handle) and no memory map: version 1 methods.
static METHODS: ffi::sqlite3_io_methods = vfs_shim::io_methods::<HEADER>(
    vfs_shim::Own {
        close: x_close,
        read: x_read,
        write: x_write,
        truncate: x_truncate,
        sync: x_sync,
        file_size: x_file_size,
        file_control: x_file_control,
    },
    false,
);

#[cfg(test)]
mod tests {
    use rusqlite::{Connection, OpenFlags};

    use super::*;

    /// Write system calls made by this thread so far (`syscw` of
    /// `/proc/thread-self/io`: other test threads do not count).
    fn writes_by_this_thread() -> u64 {
        let io = std::fs::read_to_string("/proc/thread-self/io").unwrap();
        io.lines()
            .find_map(|l| l.strip_prefix("syscw: "))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    fn open(path: &std::path::Path, vfs: Option<&CStr>) -> Connection {
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE;
        let c = match vfs {
            Some(v) => Connection::open_with_flags_and_vfs(path, flags, v).unwrap(),
            None => Connection::open_with_flags(path, flags).unwrap(),
        };
        c.execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;")
            .unwrap();
        c
    }

    /// A commit of ~110 pages is a handful of writes through the shim (its
    /// frames in 124 KiB chunks) instead of two per frame; a reader on the
    /// plain VFS sees every committed row the moment COMMIT returns, and
    /// a reopened database holds them all.
    #[test]
    fn a_commit_reaches_the_wal_in_one_write_and_is_visible_at_once() {
        assert!(available());
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("w.db");
        let mut counts = Vec::new();
        for vfs in [None, Some(NAME)] {
            let _ = std::fs::remove_file(&db);
            let _ = std::fs::remove_file(dir.path().join("w.db-wal"));
            let w = open(&db, vfs);
            w.execute_batch("CREATE TABLE t (n INTEGER PRIMARY KEY, b BLOB);")
                .unwrap();
            let r = open(&db, None);
            let mut per_commit = Vec::new();
            for round in 0..5_i64 {
                let before = writes_by_this_thread();
                let tx = w.unchecked_transaction().unwrap();
                for i in 0..100 {
                    tx.execute(
                        "INSERT INTO t VALUES (?1, randomblob(3000))",
                        [round * 100 + i],
                    )
                    .unwrap();
                }
                tx.commit().unwrap();
                per_commit.push(writes_by_this_thread() - before);
                let seen: i64 = r
                    .query_row("SELECT COUNT(*) FROM t", [], |x| x.get(0))
                    .unwrap();
                assert_eq!(seen, (round + 1) * 100, "through {vfs:?}");
            }
            drop((w, r));
            let n: i64 = open(&db, None)
                .query_row("SELECT COUNT(*) FROM t", [], |x| x.get(0))
                .unwrap();
            assert_eq!(n, 500);
            counts.push(per_commit);
        }
        let (plain, shim) = (&counts[0], &counts[1]);
        eprintln!("write calls per commit: unix {plain:?}, keel-walbuf {shim:?}");
        assert!(plain.iter().all(|&n| n >= 200), "plain VFS: {plain:?}");
        assert!(shim.iter().all(|&n| n <= 8), "keel-walbuf: {shim:?}");
    }
}
