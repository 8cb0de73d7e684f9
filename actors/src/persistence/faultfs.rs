//! Storage faults for `keel torture` (TESTING.md C4 power loss, F2 I/O
//! errors): an SQLite VFS shim in the style of SQLite's vfstrace/vfslog.
//!
//! It wraps the default "unix" VFS (every call is forwarded; its file
//! handle is our small header followed by the real one) and is registered
//! as the default VFS only when `KEEL_TORTURE_STORAGE` is set, before any
//! connection opens. Without it nothing is registered and the hot path is
//! plain SQLite. One fault per process:
//!
//! - `power-loss:N:DIR` keeps a *durable shadow* of every database, WAL and
//!   journal SQLite opens: at the first open the file's content is copied to
//!   `DIR/<name>` (what is on disk at start counts as durable), writes only
//!   remember their byte ranges, and a sync copies exactly those ranges (and
//!   the size) from the real file into the shadow. At the N-th sync (over
//!   all files), after applying it, keel writes `DIR/POWER_LOST` and
//!   SIGKILLs itself: `DIR` is the crash image, exactly what was synced.
//!   (`-shm` is opened by the unix VFS itself, not through `xOpen`, and is
//!   not in the image: SQLite rebuilds it from the WAL.)
//! - `fail-write:N[:forever]` / `fail-sync:N[:forever]`: the N-th write /
//!   sync of `keel.db` or its `-wal` returns `SQLITE_IOERR_WRITE` /
//!   `SQLITE_IOERR_FSYNC` (that call only, or every later one too). The
//!   first injection prints `keel storage fault: <kind> N injected` on
//!   stderr (the battery counts it).

use std::collections::{BTreeSet, HashMap};
use std::ffi::{c_char, c_int, c_void, CStr};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};

use rusqlite::ffi;

use super::vfs_shim;

/// The environment variable holding the spec.
pub const ENV: &str = "KEEL_TORTURE_STORAGE";

/// The VFS's registered name.
pub const NAME: &std::ffi::CStr = c"keel-faultfs";

/// The file `power-loss` writes into the image when the power is "lost".
pub const POWER_LOST: &str = "POWER_LOST";

/// keel's files next to the databases that must be in a crash image: the
/// R39 record, the master key (when it lives in the data dir) and the
/// initialised-data-dir marker.
const SIDE_FILES: [&str; 3] = [super::acked::ACKED_FILE, "master.key", "keel.initialized"];

/// Files whose writes and syncs `fail-write` / `fail-sync` count.
const COUNTED: [&str; 2] = ["keel.db", "keel.db-wal"];

/// Why a `KEEL_TORTURE_STORAGE` value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("KEEL_TORTURE_STORAGE: {0}")]
pub struct SpecError(String);

/// One storage fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Spec {
    /// Crash-image `dir` right after the `at`-th sync, then SIGKILL.
    PowerLoss { at: u64, dir: PathBuf },
    /// Fail the `at`-th write (and every later one when `forever`).
    FailWrite { at: u64, forever: bool },
    /// Fail the `at`-th sync (and every later one when `forever`).
    FailSync { at: u64, forever: bool },
}

/// Parse a `KEEL_TORTURE_STORAGE` value.
pub fn parse(spec: &str) -> Result<Spec, SpecError> {
    let bad = |why: &str| SpecError(format!("{spec:?}: {why}"));
    let (kind, rest) = spec.split_once(':').ok_or_else(|| {
        bad("expected power-loss:N:DIR, fail-write:N[:forever] or fail-sync:N[:forever]")
    })?;
    let (n, tail) = match rest.split_once(':') {
        Some((n, tail)) => (n, Some(tail)),
        None => (rest, None),
    };
    let at: u64 = n
        .parse()
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| bad("N must be a positive integer"))?;
    let forever = |tail: Option<&str>| match tail {
        None | Some("once") => Ok(false),
        Some("forever") => Ok(true),
        Some(_) => Err(bad("the last part must be once or forever")),
    };
    match kind {
        "power-loss" => match tail {
            Some(dir) if !dir.is_empty() => Ok(Spec::PowerLoss {
                at,
                dir: PathBuf::from(dir),
            }),
            _ => Err(bad("power-loss needs a directory: power-loss:N:DIR")),
        },
        "fail-write" => Ok(Spec::FailWrite {
            at,
            forever: forever(tail)?,
        }),
        "fail-sync" => Ok(Spec::FailSync {
            at,
            forever: forever(tail)?,
        }),
        other => Err(bad(&format!("unknown fault {other:?}"))),
    }
}

/// Parse `spec` and register the shim as SQLite's default VFS. Call once,
/// before any connection opens a file.
pub fn install(spec: &str) -> Result<Spec, SpecError> {
    let parsed = parse(spec)?;
    if let Spec::PowerLoss { dir, .. } = &parsed {
        std::fs::create_dir_all(dir)
            .map_err(|e| SpecError(format!("cannot create {}: {e}", dir.display())))?;
    }
    // SAFETY: a null name asks for the default VFS; SQLite initialises
    // itself and returns a pointer valid for the life of the process.
    let real = unsafe { ffi::sqlite3_vfs_find(std::ptr::null()) };
    if real.is_null() {
        return Err(SpecError("SQLite has no default VFS".into()));
    }
    let shim = Shim {
        spec: parsed.clone(),
        real: RealVfs(real),
        writes: AtomicU64::new(0),
        syncs: AtomicU64::new(0),
        announced: AtomicBool::new(false),
        shadows: Mutex::new(Shadows::default()),
    };
    SHIM.set(shim)
        .map_err(|_| SpecError("storage faults are installed once, at start".into()))?;
    // SAFETY: `real` is the live default VFS (checked non-null above).
    let real_ref = unsafe { &*real };
    let vfs = Box::leak(Box::new(ffi::sqlite3_vfs {
        iVersion: 2,
        szOsFile: (HEADER + real_ref.szOsFile as usize) as c_int,
        mxPathname: real_ref.mxPathname,
        pNext: std::ptr::null_mut(),
        zName: NAME.as_ptr(),
        pAppData: std::ptr::null_mut(),
        xOpen: Some(x_open),
        xDelete: Some(x_delete),
        xAccess: Some(x_access),
        xFullPathname: Some(x_full_pathname),
        xDlOpen: Some(x_dl_open),
        xDlError: Some(x_dl_error),
        xDlSym: Some(x_dl_sym),
        xDlClose: Some(x_dl_close),
        xRandomness: Some(x_randomness),
        xSleep: Some(x_sleep),
        xCurrentTime: Some(x_current_time),
        xGetLastError: Some(x_get_last_error),
        xCurrentTimeInt64: Some(x_current_time_int64),
        xSetSystemCall: None,
        xGetSystemCall: None,
        xNextSystemCall: None,
    }));
    // SAFETY: `vfs` is leaked (lives forever) and fully initialised; SQLite
    // only links it into its list.
    let rc = unsafe { ffi::sqlite3_vfs_register(vfs, 1) };
    if rc != ffi::SQLITE_OK {
        return Err(SpecError(format!("sqlite3_vfs_register failed ({rc})")));
    }
    Ok(parsed)
}

// ---------------------------------------------------------------------------
// State.

/// The wrapped VFS (SQLite's, valid for the life of the process).
struct RealVfs(*mut ffi::sqlite3_vfs);

// SAFETY: SQLite's VFS objects are immutable after registration and their
// methods are thread-safe (SQLite calls them from any thread).
unsafe impl Send for RealVfs {}
// SAFETY: as above.
unsafe impl Sync for RealVfs {}

struct Shim {
    spec: Spec,
    real: RealVfs,
    /// Writes / syncs of the counted files (fail-write / fail-sync).
    writes: AtomicU64,
    syncs: AtomicU64,
    announced: AtomicBool,
    /// power-loss: every shadow, under one lock (writes, syncs and the
    /// global sync count are ordered by it).
    shadows: Mutex<Shadows>,
}

static SHIM: OnceLock<Shim> = OnceLock::new();

#[derive(Default)]
struct Shadows {
    files: HashMap<PathBuf, Shadow>,
    /// Directories of the main databases (where the side files live).
    data_dirs: BTreeSet<PathBuf>,
    /// Syncs applied so far, over every file.
    synced: u64,
}

/// The durable copy of one file and what was written since its last sync.
struct Shadow {
    image: File,
    /// Written byte ranges `[start, end)` not yet synced.
    dirty: Vec<(u64, u64)>,
}

impl Shadow {
    fn note(&mut self, start: u64, end: u64) {
        match self.dirty.last_mut() {
            Some(last) if last.1 == start => last.1 = end,
            _ => self.dirty.push((start, end)),
        }
    }
}

fn shim() -> &'static Shim {
    SHIM.get()
        .expect("the storage fault VFS is only registered by install")
}

fn lock(m: &Mutex<Shadows>) -> MutexGuard<'_, Shadows> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shim {
    fn image_dir(&self) -> Option<&Path> {
        match &self.spec {
            Spec::PowerLoss { dir, .. } => Some(dir),
            _ => None,
        }
    }

    /// Whether the `n`-th call of this kind fails (`at`, `forever`).
    fn fails(&self, n: u64, at: u64, forever: bool, kind: &str) -> bool {
        let fail = n == at || (forever && n > at);
        if fail && !self.announced.swap(true, Ordering::SeqCst) {
            eprintln!("keel storage fault: {kind} {at} injected");
        }
        fail
    }
}

// ---------------------------------------------------------------------------
// The file handle: our header, then the real VFS's file.

#[repr(C)]
struct FaultFile {
    base: ffi::sqlite3_file,
    /// The file's path (a leaked `Box`, freed in `xClose`), null for
    /// temporary files.
    path: *mut PathBuf,
    /// Has a shadow (power-loss).
    shadowed: bool,
    /// Counted by fail-write / fail-sync.
    counted: bool,
}

/// Our header's size, rounded up so the real file that follows is aligned.
const HEADER: usize = std::mem::size_of::<FaultFile>().next_multiple_of(16);

/// The real VFS's file that follows our header.
///
/// # Safety
/// `f` must be a file handle of this VFS (`szOsFile` bytes).
unsafe fn inner(f: *mut ffi::sqlite3_file) -> *mut ffi::sqlite3_file {
    // SAFETY: a handle our xOpen opened (header, then the real file).
    unsafe { vfs_shim::inner::<HEADER>(f) }
}

unsafe fn header<'a>(f: *mut ffi::sqlite3_file) -> &'a FaultFile {
    // SAFETY: xOpen wrote a FaultFile at the start of every open handle.
    unsafe { &*f.cast::<FaultFile>() }
}

fn real_vfs() -> *mut ffi::sqlite3_vfs {
    shim().real.0
}

/// SQLite's calls are forwarded with this macro: the real method of the
/// real file (`SQLITE_IOERR` should it be missing).
macro_rules! forward {
    ($f:expr, $method:ident $(, $arg:expr)*) => {
        vfs_shim::forward!(HEADER, $f, $method $(, $arg)*)
    };
}

const FILE_KINDS_SHADOWED: c_int = ffi::SQLITE_OPEN_MAIN_DB
    | ffi::SQLITE_OPEN_MAIN_JOURNAL
    | ffi::SQLITE_OPEN_WAL
    | ffi::SQLITE_OPEN_SUPER_JOURNAL;

unsafe extern "C" fn x_open(
    _vfs: *mut ffi::sqlite3_vfs,
    name: ffi::sqlite3_filename,
    file: *mut ffi::sqlite3_file,
    flags: c_int,
    out_flags: *mut c_int,
) -> c_int {
    let real = real_vfs();
    // SAFETY: `file` has room for our header and the real file.
    let rc = unsafe { vfs_shim::open_base::<HEADER>(real, name, file, flags, out_flags) };
    if rc != ffi::SQLITE_OK {
        return rc;
    }
    let path = (!name.is_null()).then(|| {
        // SAFETY: SQLite passes a NUL-terminated file name.
        PathBuf::from(
            unsafe { CStr::from_ptr(name) }
                .to_string_lossy()
                .into_owned(),
        )
    });
    let file_name = path
        .as_deref()
        .and_then(Path::file_name)
        .and_then(|n| n.to_str());
    let counted = file_name.is_some_and(|n| COUNTED.contains(&n));
    let shim = shim();
    let mut shadowed = false;
    if let (Some(dir), Some(p)) = (shim.image_dir(), &path) {
        if flags & FILE_KINDS_SHADOWED != 0 {
            // SAFETY: the real file was just opened.
            if let Err(e) = unsafe { start_shadow(dir, p, inner(file), flags) } {
                eprintln!("keel storage fault: cannot shadow {}: {e}", p.display());
                // Close the real file we opened; SQLite sees a failed open.
                forward!(file, xClose);
                return ffi::SQLITE_CANTOPEN;
            }
            shadowed = true;
        }
    }
    let header = FaultFile {
        base: ffi::sqlite3_file { pMethods: &METHODS },
        path: path.map_or(std::ptr::null_mut(), |p| Box::into_raw(Box::new(p))),
        shadowed,
        counted,
    };
    // SAFETY: the header's room at the start of `file` (SQLite's memory).
    unsafe { std::ptr::write(file.cast::<FaultFile>(), header) };
    ffi::SQLITE_OK
}

/// The first open of `path` in this process copies its content (durable at
/// start) into the image; later opens share that shadow.
///
/// # Safety
/// `real` must be an open real file of `path`.
unsafe fn start_shadow(
    dir: &Path,
    path: &Path,
    real: *mut ffi::sqlite3_file,
    flags: c_int,
) -> std::io::Result<()> {
    let shim = shim();
    let mut s = lock(&shim.shadows);
    if flags & ffi::SQLITE_OPEN_MAIN_DB != 0 {
        if let Some(parent) = path.parent() {
            s.data_dirs.insert(parent.to_path_buf());
            copy_side_files(dir, parent);
        }
    }
    if s.files.contains_key(path) {
        return Ok(());
    }
    let image = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(image_path(dir, path))?;
    let mut shadow = Shadow {
        image,
        dirty: Vec::new(),
    };
    // SAFETY: forwarded from our caller.
    let size = unsafe { real_size(real) }?;
    shadow.note(0, size);
    // SAFETY: as above.
    unsafe { apply(&mut shadow, real) }?;
    s.files.insert(path.to_path_buf(), shadow);
    Ok(())
}

fn image_path(dir: &Path, path: &Path) -> PathBuf {
    dir.join(path.file_name().unwrap_or(path.as_os_str()))
}

/// The real file's size.
///
/// # Safety
/// `real` must be an open real file.
unsafe fn real_size(real: *mut ffi::sqlite3_file) -> std::io::Result<u64> {
    let mut size: ffi::sqlite3_int64 = 0;
    // SAFETY: the real file's own xFileSize.
    let rc = unsafe { ((*(*real).pMethods).xFileSize.expect("xFileSize"))(real, &mut size) };
    if rc != ffi::SQLITE_OK {
        return Err(std::io::Error::other(format!("xFileSize failed ({rc})")));
    }
    Ok(size.max(0) as u64)
}

/// Copy the dirty ranges of the real file into the shadow and give it the
/// real file's size: what a sync made durable.
///
/// # Safety
/// `real` must be an open real file of the shadow's path.
unsafe fn apply(shadow: &mut Shadow, real: *mut ffi::sqlite3_file) -> std::io::Result<()> {
    // SAFETY: forwarded from our caller.
    let size = unsafe { real_size(real) }?;
    shadow.image.set_len(size)?;
    let mut buf = vec![0u8; 64 * 1024];
    for (start, end) in std::mem::take(&mut shadow.dirty) {
        let mut at = start;
        let end = end.min(size);
        while at < end {
            let n = ((end - at) as usize).min(buf.len());
            // SAFETY: the real file's own xRead into `buf` (at least n bytes).
            let rc = unsafe {
                ((*(*real).pMethods).xRead.expect("xRead"))(
                    real,
                    buf.as_mut_ptr().cast(),
                    n as c_int,
                    at as ffi::sqlite3_int64,
                )
            };
            if rc != ffi::SQLITE_OK && rc != ffi::SQLITE_IOERR_SHORT_READ {
                return Err(std::io::Error::other(format!("xRead failed ({rc})")));
            }
            shadow.image.write_all_at(&buf[..n], at)?;
            at += n as u64;
        }
    }
    Ok(())
}

/// Copy keel's side files of every data dir into the image, as they are on
/// disk now. Called under the shadows' lock at every applied sync.
///
/// Why the record of acknowledged commits may be taken "as it is": keel
/// writes `keel.acked` only after the COMMIT it names returned, and with
/// `synchronous = FULL` COMMIT returns only after its WAL sync went through
/// this shim, which applied it to the shadow under the same lock. So a
/// record read here never names a commit missing from the image — unless
/// keel acknowledged a commit that was never synced, which is the very loss
/// the image must expose. The master key and the marker are written once,
/// atomically and synced, before anything depends on them.
fn copy_side_files(image: &Path, data_dir: &Path) {
    for name in SIDE_FILES {
        let from = data_dir.join(name);
        if from.exists() {
            if let Err(e) = std::fs::copy(&from, image.join(name)) {
                eprintln!("keel storage fault: cannot copy {}: {e}", from.display());
            }
        }
    }
}

unsafe extern "C" fn x_close(f: *mut ffi::sqlite3_file) -> c_int {
    let rc = forward!(f, xClose);
    // SAFETY: our header of this handle; its path box is freed once, here.
    unsafe {
        let h = f.cast::<FaultFile>();
        if !(*h).path.is_null() {
            drop(Box::from_raw((*h).path));
            (*h).path = std::ptr::null_mut();
        }
    }
    rc
}

unsafe extern "C" fn x_read(
    f: *mut ffi::sqlite3_file,
    buf: *mut c_void,
    amt: c_int,
    ofst: ffi::sqlite3_int64,
) -> c_int {
    forward!(f, xRead, buf, amt, ofst)
}

unsafe extern "C" fn x_write(
    f: *mut ffi::sqlite3_file,
    buf: *const c_void,
    amt: c_int,
    ofst: ffi::sqlite3_int64,
) -> c_int {
    let shim = shim();
    // SAFETY: an open handle of ours.
    let h = unsafe { header(f) };
    if let (Spec::FailWrite { at, forever }, true) = (&shim.spec, h.counted) {
        let n = shim.writes.fetch_add(1, Ordering::SeqCst) + 1;
        if shim.fails(n, *at, *forever, "fail-write") {
            return ffi::SQLITE_IOERR_WRITE;
        }
    }
    if !h.shadowed {
        return forward!(f, xWrite, buf, amt, ofst);
    }
    // The write and its note happen under the lock a sync applies under:
    // a sync either sees the write in full or not at all.
    let mut s = lock(&shim.shadows);
    let rc = forward!(f, xWrite, buf, amt, ofst);
    if rc == ffi::SQLITE_OK {
        // SAFETY: a shadowed handle has a path.
        let path = unsafe { &*h.path };
        if let Some(shadow) = s.files.get_mut(path) {
            shadow.note(ofst as u64, ofst as u64 + amt as u64);
        }
    }
    rc
}

unsafe extern "C" fn x_truncate(f: *mut ffi::sqlite3_file, size: ffi::sqlite3_int64) -> c_int {
    // The new size reaches the shadow at the next sync (apply sets it).
    forward!(f, xTruncate, size)
}

unsafe extern "C" fn x_sync(f: *mut ffi::sqlite3_file, flags: c_int) -> c_int {
    let shim = shim();
    // SAFETY: an open handle of ours.
    let h = unsafe { header(f) };
    if let (Spec::FailSync { at, forever }, true) = (&shim.spec, h.counted) {
        let n = shim.syncs.fetch_add(1, Ordering::SeqCst) + 1;
        if shim.fails(n, *at, *forever, "fail-sync") {
            return ffi::SQLITE_IOERR_FSYNC;
        }
    }
    let (Spec::PowerLoss { at, dir }, true) = (&shim.spec, h.shadowed) else {
        return forward!(f, xSync, flags);
    };
    let mut s = lock(&shim.shadows);
    let rc = forward!(f, xSync, flags);
    if rc != ffi::SQLITE_OK {
        return rc;
    }
    // SAFETY: a shadowed handle has a path.
    let path = unsafe { &*h.path };
    if let Some(shadow) = s.files.get_mut(path) {
        // SAFETY: the real file of this handle.
        if let Err(e) = unsafe { apply(shadow, inner(f)) } {
            eprintln!("keel storage fault: cannot apply a sync to the image: {e}");
            return ffi::SQLITE_IOERR_FSYNC;
        }
    }
    for data_dir in &s.data_dirs {
        copy_side_files(dir, data_dir);
    }
    s.synced += 1;
    if s.synced == *at {
        power_lost(dir, *at);
    }
    ffi::SQLITE_OK
}

/// The image is complete: mark it and die as a machine losing power does.
fn power_lost(dir: &Path, at: u64) -> ! {
    let _ = std::fs::write(dir.join(POWER_LOST), format!("after sync {at}\n"));
    eprintln!("keel storage fault: power-loss {at} injected, SIGKILL");
    // SAFETY: kill(2) on our own pid; SIGKILL cannot be caught.
    unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    loop {
        std::thread::park();
    }
}

unsafe extern "C" fn x_file_size(
    f: *mut ffi::sqlite3_file,
    size: *mut ffi::sqlite3_int64,
) -> c_int {
    forward!(f, xFileSize, size)
}

unsafe extern "C" fn x_file_control(
    f: *mut ffi::sqlite3_file,
    op: c_int,
    arg: *mut c_void,
) -> c_int {
    forward!(f, xFileControl, op, arg)
}

/// Version 2: WAL mode needs the xShm* methods (no xFetch: no mmap).
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
    true,
);

// ---------------------------------------------------------------------------
// The VFS's own methods, forwarded to the real VFS.

/// The real VFS's method `$m` (the unix VFS has them all).
macro_rules! real_method {
    ($m:ident) => {
        real_ref()
            .$m
            .expect(concat!("the unix VFS has ", stringify!($m)))
    };
}

fn real_ref() -> &'static ffi::sqlite3_vfs {
    // SAFETY: the real VFS is registered with SQLite for the whole process
    // and never changed.
    unsafe { &*real_vfs() }
}

unsafe extern "C" fn x_delete(
    _vfs: *mut ffi::sqlite3_vfs,
    name: *const c_char,
    sync_dir: c_int,
) -> c_int {
    let shim = shim();
    let Some(dir) = shim.image_dir() else {
        // SAFETY: forwarded with the real VFS.
        return unsafe { real_method!(xDelete)(real_vfs(), name, sync_dir) };
    };
    let mut s = lock(&shim.shadows);
    // SAFETY: forwarded with the real VFS.
    let rc = unsafe { real_method!(xDelete)(real_vfs(), name, sync_dir) };
    if rc == ffi::SQLITE_OK && !name.is_null() {
        // SAFETY: SQLite passes a NUL-terminated file name.
        let path = PathBuf::from(
            unsafe { CStr::from_ptr(name) }
                .to_string_lossy()
                .into_owned(),
        );
        if s.files.remove(&path).is_some() {
            let _ = std::fs::remove_file(image_path(dir, &path));
        }
    }
    rc
}

unsafe extern "C" fn x_access(
    _vfs: *mut ffi::sqlite3_vfs,
    name: *const c_char,
    flags: c_int,
    out: *mut c_int,
) -> c_int {
    // SAFETY: forwarded with the real VFS.
    unsafe { real_method!(xAccess)(real_vfs(), name, flags, out) }
}

unsafe extern "C" fn x_full_pathname(
    _vfs: *mut ffi::sqlite3_vfs,
    name: *const c_char,
    n: c_int,
    out: *mut c_char,
) -> c_int {
    // SAFETY: forwarded with the real VFS.
    unsafe { real_method!(xFullPathname)(real_vfs(), name, n, out) }
}

unsafe extern "C" fn x_dl_open(_vfs: *mut ffi::sqlite3_vfs, name: *const c_char) -> *mut c_void {
    // SAFETY: forwarded with the real VFS.
    unsafe { real_method!(xDlOpen)(real_vfs(), name) }
}

unsafe extern "C" fn x_dl_error(_vfs: *mut ffi::sqlite3_vfs, n: c_int, out: *mut c_char) {
    // SAFETY: forwarded with the real VFS.
    unsafe { real_method!(xDlError)(real_vfs(), n, out) }
}

type DlSym = unsafe extern "C" fn(*mut ffi::sqlite3_vfs, *mut c_void, *const c_char);

unsafe extern "C" fn x_dl_sym(
    _vfs: *mut ffi::sqlite3_vfs,
    handle: *mut c_void,
    symbol: *const c_char,
) -> Option<DlSym> {
    // SAFETY: forwarded with the real VFS.
    unsafe { real_method!(xDlSym)(real_vfs(), handle, symbol) }
}

unsafe extern "C" fn x_dl_close(_vfs: *mut ffi::sqlite3_vfs, handle: *mut c_void) {
    // SAFETY: forwarded with the real VFS.
    unsafe { real_method!(xDlClose)(real_vfs(), handle) }
}

unsafe extern "C" fn x_randomness(
    _vfs: *mut ffi::sqlite3_vfs,
    n: c_int,
    out: *mut c_char,
) -> c_int {
    // SAFETY: forwarded with the real VFS.
    unsafe { real_method!(xRandomness)(real_vfs(), n, out) }
}

unsafe extern "C" fn x_sleep(_vfs: *mut ffi::sqlite3_vfs, micros: c_int) -> c_int {
    // SAFETY: forwarded with the real VFS.
    unsafe { real_method!(xSleep)(real_vfs(), micros) }
}

unsafe extern "C" fn x_current_time(_vfs: *mut ffi::sqlite3_vfs, out: *mut f64) -> c_int {
    // SAFETY: forwarded with the real VFS.
    unsafe { real_method!(xCurrentTime)(real_vfs(), out) }
}

unsafe extern "C" fn x_get_last_error(
    _vfs: *mut ffi::sqlite3_vfs,
    n: c_int,
    out: *mut c_char,
) -> c_int {
    // SAFETY: forwarded with the real VFS.
    unsafe { real_method!(xGetLastError)(real_vfs(), n, out) }
}

unsafe extern "C" fn x_current_time_int64(
    _vfs: *mut ffi::sqlite3_vfs,
    out: *mut ffi::sqlite3_int64,
) -> c_int {
    // SAFETY: forwarded with the real VFS.
    unsafe { real_method!(xCurrentTimeInt64)(real_vfs(), out) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_bad_ones_are_refused() {
        assert_eq!(
            parse("power-loss:3:/tmp/img").unwrap(),
            Spec::PowerLoss {
                at: 3,
                dir: PathBuf::from("/tmp/img")
            }
        );
        assert_eq!(
            parse("fail-write:7").unwrap(),
            Spec::FailWrite {
                at: 7,
                forever: false
            }
        );
        assert_eq!(
            parse("fail-sync:2:forever").unwrap(),
            Spec::FailSync {
                at: 2,
                forever: true
            }
        );
        assert_eq!(
            parse("fail-sync:2:once").unwrap(),
            Spec::FailSync {
                at: 2,
                forever: false
            }
        );
        for bad in [
            "",
            "power-loss",
            "power-loss:3",
            "power-loss:0:/tmp",
            "fail-write:x",
            "fail-write:1:always",
            "fail-read:1",
        ] {
            let e = parse(bad).expect_err(bad);
            assert!(!e.to_string().contains('\n'), "{e}");
        }
    }
}
