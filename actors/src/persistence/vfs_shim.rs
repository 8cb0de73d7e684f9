//! What keel's SQLite VFS shims share (`faultfs`, `walbuf`): a shim's file
//! handle is its own header of `H` bytes followed by the base VFS's file,
//! and every method a shim does not change is forwarded to the base file.

use std::ffi::{c_int, c_void};

use rusqlite::ffi;

/// The base VFS's file inside a shim handle whose header is `H` bytes.
///
/// # Safety
/// `f` is a handle of a shim whose xOpen allocated `H + base szOsFile`
/// bytes and opened the base file after its header.
pub(super) unsafe fn inner<const H: usize>(f: *mut ffi::sqlite3_file) -> *mut ffi::sqlite3_file {
    // SAFETY: the caller's handle is `H + base szOsFile` bytes long.
    unsafe { f.cast::<u8>().add(H).cast() }
}

/// The base file's methods.
///
/// # Safety
/// As [`inner`], and the base file is open (its methods are set for its
/// whole life).
pub(super) unsafe fn methods<const H: usize>(
    f: *mut ffi::sqlite3_file,
) -> &'static ffi::sqlite3_io_methods {
    // SAFETY: an open base file has its methods set for its whole life.
    unsafe { &*(*inner::<H>(f)).pMethods }
}

/// Call the base file's `$method` with the same arguments (SQLITE_IOERR if
/// the base has none).
macro_rules! forward {
    ($h:expr, $f:expr, $method:ident $(, $arg:expr)*) => {{
        // SAFETY: SQLite only calls io methods on handles the shim's xOpen
        // opened.
        match unsafe { $crate::persistence::vfs_shim::methods::<{ $h }>($f) }.$method {
            // SAFETY: the base method on the base file, same arguments.
            Some(m) => unsafe { m($crate::persistence::vfs_shim::inner::<{ $h }>($f) $(, $arg)*) },
            None => rusqlite::ffi::SQLITE_IOERR,
        }
    }};
}
pub(super) use forward;

// The methods both shims pass through unchanged.

pub(super) unsafe extern "C" fn lock<const H: usize>(
    f: *mut ffi::sqlite3_file,
    level: c_int,
) -> c_int {
    forward!(H, f, xLock, level)
}

pub(super) unsafe extern "C" fn unlock<const H: usize>(
    f: *mut ffi::sqlite3_file,
    level: c_int,
) -> c_int {
    forward!(H, f, xUnlock, level)
}

pub(super) unsafe extern "C" fn check_reserved_lock<const H: usize>(
    f: *mut ffi::sqlite3_file,
    out: *mut c_int,
) -> c_int {
    forward!(H, f, xCheckReservedLock, out)
}

pub(super) unsafe extern "C" fn sector_size<const H: usize>(f: *mut ffi::sqlite3_file) -> c_int {
    forward!(H, f, xSectorSize)
}

pub(super) unsafe extern "C" fn device_characteristics<const H: usize>(
    f: *mut ffi::sqlite3_file,
) -> c_int {
    forward!(H, f, xDeviceCharacteristics)
}

pub(super) unsafe extern "C" fn shm_map<const H: usize>(
    f: *mut ffi::sqlite3_file,
    page: c_int,
    size: c_int,
    extend: c_int,
    out: *mut *mut c_void,
) -> c_int {
    forward!(H, f, xShmMap, page, size, extend, out)
}

pub(super) unsafe extern "C" fn shm_lock<const H: usize>(
    f: *mut ffi::sqlite3_file,
    offset: c_int,
    n: c_int,
    flags: c_int,
) -> c_int {
    forward!(H, f, xShmLock, offset, n, flags)
}

pub(super) unsafe extern "C" fn shm_barrier<const H: usize>(f: *mut ffi::sqlite3_file) {
    // SAFETY: SQLite only calls io methods on handles the shim opened.
    if let Some(m) = unsafe { methods::<H>(f) }.xShmBarrier {
        // SAFETY: the base method on the base file.
        unsafe { m(inner::<H>(f)) }
    }
}

pub(super) unsafe extern "C" fn shm_unmap<const H: usize>(
    f: *mut ffi::sqlite3_file,
    delete: c_int,
) -> c_int {
    forward!(H, f, xShmUnmap, delete)
}

/// The methods a shim implements itself; [`io_methods`] adds the rest.
pub(super) struct Own {
    pub close: unsafe extern "C" fn(*mut ffi::sqlite3_file) -> c_int,
    pub read: unsafe extern "C" fn(*mut ffi::sqlite3_file, *mut c_void, c_int, i64) -> c_int,
    pub write: unsafe extern "C" fn(*mut ffi::sqlite3_file, *const c_void, c_int, i64) -> c_int,
    pub truncate: unsafe extern "C" fn(*mut ffi::sqlite3_file, i64) -> c_int,
    pub sync: unsafe extern "C" fn(*mut ffi::sqlite3_file, c_int) -> c_int,
    pub file_size: unsafe extern "C" fn(*mut ffi::sqlite3_file, *mut i64) -> c_int,
    pub file_control: unsafe extern "C" fn(*mut ffi::sqlite3_file, c_int, *mut c_void) -> c_int,
}

/// A shim's io methods: `own`, the locks and sizes passed through, and with
/// `shm` (version 2) the shared-memory methods too (a database handle's
/// wal-index); never a memory map.
pub(super) const fn io_methods<const H: usize>(own: Own, shm: bool) -> ffi::sqlite3_io_methods {
    ffi::sqlite3_io_methods {
        iVersion: if shm { 2 } else { 1 },
        xClose: Some(own.close),
        xRead: Some(own.read),
        xWrite: Some(own.write),
        xTruncate: Some(own.truncate),
        xSync: Some(own.sync),
        xFileSize: Some(own.file_size),
        xLock: Some(lock::<H>),
        xUnlock: Some(unlock::<H>),
        xCheckReservedLock: Some(check_reserved_lock::<H>),
        xFileControl: Some(own.file_control),
        xSectorSize: Some(sector_size::<H>),
        xDeviceCharacteristics: Some(device_characteristics::<H>),
        xShmMap: if shm { Some(shm_map::<H>) } else { None },
        xShmLock: if shm { Some(shm_lock::<H>) } else { None },
        xShmBarrier: if shm { Some(shm_barrier::<H>) } else { None },
        xShmUnmap: if shm { Some(shm_unmap::<H>) } else { None },
        xFetch: None,
        xUnfetch: None,
    }
}

/// Open the base VFS's file behind a shim header of `H` bytes (the header
/// is the shim's to write once this returns `SQLITE_OK`).
///
/// # Safety
/// `base` is a registered VFS with xOpen; `file` is SQLite's memory of the
/// shim's szOsFile (`H + base szOsFile`) bytes; `name` as SQLite passed it.
pub(super) unsafe fn open_base<const H: usize>(
    base: *mut ffi::sqlite3_vfs,
    name: ffi::sqlite3_filename,
    file: *mut ffi::sqlite3_file,
    flags: c_int,
    out_flags: *mut c_int,
) -> c_int {
    // SAFETY: as the caller promised; the base xOpen initialises its file.
    unsafe {
        (*file).pMethods = std::ptr::null();
        let open = (*base).xOpen.expect("the base VFS has xOpen");
        open(base, name, inner::<H>(file), flags, out_flags)
    }
}
