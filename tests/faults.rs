//! F1/F3/F5 and schema checks: storage faults while running and damaged stores at start.
//!
//! - disk full: a 2 MiB tmpfs as the data dir, filled by a filler file while keel
//!   runs: POST 503, `/readyz` 503 "degraded", `/healthz` 200; remove the filler and
//!   keel recovers by itself with every acknowledged message intact.
//! - read-only data dir: refused at start with the path named, nothing created;
//!   works again once writable. (Linux refuses `remount,ro` while keel holds its
//!   database open for writing, so runtime write failures are injected with a full
//!   disk and with `RLIMIT_FSIZE` instead.)
//! - permission denied (F4): keel as uid 65534 on a root-owned 0700 data dir exits
//!   non-zero naming the path.
//! - file size limit: `RLIMIT_FSIZE` lowered on the running process (SIGXFSZ ignored)
//!   makes every write fail with EFBIG; raising it again must let keel recover.
//! - corrupted database (header overwritten, middle zero-filled): start refuses,
//!   names the file and the word `corrupt`, and leaves the bytes unchanged.
//! - schema too new (`user_version` 9999): start refuses with a message saying `newer`.
//!
//! Mount tests need root; without it they print `skipped: needs root` unless
//! `KEEL_TEST_REQUIRE_ROOT=1`, which makes them fail instead.

mod common;

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::{poll_until, root_or_skip, sha256_file, Config, Daemon, Ledger, Resp};
use serde_json::json;

/// How long keel may take to notice a fault or its end.
const FAULT_DEADLINE: Duration = Duration::from_secs(30);
/// How long a refused start may take to exit.
const REFUSAL_DEADLINE: Duration = Duration::from_secs(30);

/// A tmpfs mounted by the test; lazily unmounted on drop.
struct Mount {
    path: PathBuf,
}

impl Mount {
    fn tmpfs(path: &Path, size: &str) -> Mount {
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "mount tmpfs on {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Mount {
            path: path.to_path_buf(),
        }
    }

    /// `mount -o remount,OPTS`; Err(stderr) when mount refuses.
    fn remount(&self, opts: &str) -> Result<(), String> {
        let out = Command::new("mount")
            .args(["-o", &format!("remount,{opts}")])
            .arg(&self.path)
            .output()
            .expect("run mount");
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// POSTs one message recorded in the ledger; returns the response.
async fn post_logged(d: &Daemon, ledger: &Ledger, id: &str, chat: &str, text: &str) -> Resp {
    ledger.invoke(id, chat, "u", text);
    let r = d
        .post_message(&json!({"id": id, "chat": chat, "from": "u", "text": text}))
        .await;
    ledger.complete_with(id, &r);
    r.unwrap_or_else(|e| panic!("POST {id}: {e}"))
}

/// Posts 60 KB messages until one is answered 503 (or `max` tries); true if one was.
async fn post_until_503(d: &Daemon, ledger: &Ledger, tag: &str, max: usize) -> bool {
    let big = "x".repeat(60 * 1024);
    for i in 0..max {
        let r = post_logged(d, ledger, &format!("{tag}-big-{i}"), tag, &big).await;
        match r.status {
            200 => continue,
            503 => {
                assert!(
                    r.error_problem().is_none(),
                    "{}",
                    r.error_problem().unwrap_or_default()
                );
                return true;
            }
            other => panic!("POST while storage fails: {other} {}", r.body),
        }
    }
    false
}

/// Asserts the degraded state: readyz 503 "degraded" with a reason, healthz 200.
async fn assert_degraded(d: &Daemon) {
    let degraded = poll_until(FAULT_DEADLINE, || async {
        let r = d.readyz().await.ok()?;
        (r.status == 503 && r.json()["status"] == "degraded").then_some(r)
    })
    .await;
    let r =
        degraded.unwrap_or_else(|| panic!("/readyz never said 503 degraded while storage failed"));
    let reason = r.json()["reason"].as_str().unwrap_or("").to_string();
    assert!(!reason.is_empty(), "degraded without a reason: {}", r.body);
    eprintln!("degraded: {}", r.body);
    assert_eq!(
        d.healthz().await.expect("healthz").status,
        200,
        "healthz while degraded"
    );
}

/// Asserts recovery: readyz 200 within the deadline and a new message accepted.
async fn assert_recovers(d: &Daemon, ledger: &Ledger, tag: &str) {
    assert!(
        d.wait_ready(FAULT_DEADLINE).await,
        "keel did not become ready again within {FAULT_DEADLINE:?}; stderr:\n{}",
        common::tail(&d.stderr_boot(), 20)
    );
    let r = post_logged(d, ledger, &format!("{tag}-after"), tag, "back").await;
    assert_eq!(
        r.status, 200,
        "POST after recovery: {} {}",
        r.status, r.body
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_full_degrades_then_recovers_by_itself() {
    if !root_or_skip("disk_full_degrades_then_recovers_by_itself") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    std::fs::create_dir(&data).expect("mkdir");
    let _mount = Mount::tmpfs(&data, "2m");
    let mut d = Daemon::start_in(Config::default(), data.clone()).await;
    let ledger = Ledger::new();
    for i in 0..5 {
        let r = post_logged(&d, &ledger, &format!("full-{i}"), "full", "before").await;
        assert_eq!(r.status, 200, "{}", r.body);
    }

    // Fill the filesystem.
    let filler = data.join("filler");
    let mut f = std::fs::File::create(&filler).expect("create filler");
    let chunk = vec![0u8; 16 * 1024];
    let full_err = loop {
        if let Err(e) = f.write_all(&chunk).and_then(|_| f.sync_all()) {
            break e;
        }
    };
    assert_eq!(
        full_err.raw_os_error(),
        Some(libc::ENOSPC),
        "filler: {full_err}"
    );
    drop(f);

    assert!(
        post_until_503(&d, &ledger, "full", 60).await,
        "no POST was answered 503 on a full disk"
    );
    assert_degraded(&d).await;

    std::fs::remove_file(&filler).expect("remove filler");
    assert_recovers(&d, &ledger, "full").await;
    ledger.check(&d.user_key_counts().await).assert_clean();
    assert!(d.sigterm(FAULT_DEADLINE).await.success());
    assert_eq!(common::integrity_check(&d.db_path()), "ok");
    d.assert_no_panics();
}

/// Runs `keel run` on `data` (no config file) and expects a refusal that
/// names `data`; `uid` runs it as another user.
async fn expect_start_refused(data: &Path, uid: Option<u32>, why: &str) -> String {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    // Another uid may not reach the build directory (a checkout inside a
    // 0700 directory): run a copy placed beside `data`, in a dir it can read.
    let bin = match uid {
        None => PathBuf::from(common::keel_bin()),
        Some(_) => {
            let dir = data.parent().expect("data has a parent");
            let copy = dir.join("keel-bin");
            std::fs::copy(common::keel_bin(), &copy).expect("copy keel");
            std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755))
                .expect("chmod keel copy");
            copy
        }
    };
    let mut cmd = Command::new(bin);
    cmd.arg("run")
        .arg("--data-dir")
        .arg(data)
        .arg("--listen")
        .arg(format!("127.0.0.1:{}", common::free_port()))
        .env_remove("KEEL_CONFIG")
        .env_remove("KEEL_DATA_DIR")
        .env_remove("KEEL_LISTEN")
        .env_remove("RUST_BACKTRACE")
        .current_dir("/");
    if let Some(uid) = uid {
        cmd.uid(uid).gid(uid);
    }
    let mut cmd = tokio::process::Command::from(cmd);
    cmd.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let child = cmd.spawn().expect("spawn keel");
    let out = tokio::time::timeout(REFUSAL_DEADLINE, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("keel kept running on {why}"))
        .expect("wait keel");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "keel started on {why}:\n{stderr}");
    let path = data.display().to_string();
    let line = stderr
        .lines()
        .find(|l| l.contains(&path))
        .unwrap_or_else(|| panic!("no stderr line names {path} ({why}):\n{stderr}"));
    assert!(!stderr.contains("panicked"), "panic on {why}:\n{stderr}");
    line.to_string()
}

// A read-only data dir. Linux refuses `mount -o remount,ro` (EBUSY) while a
// file on the file system is open for writing, which keel's database always is,
// so "becomes read-only while running" cannot happen; runtime write failures
// are covered by the disk-full and file-size-limit tests. What can happen is a
// start on a read-only data dir: keel must refuse it, name the directory and
// the problem, create nothing, and start normally once it is writable again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_data_dir_is_refused_at_start_then_works_when_writable() {
    if !root_or_skip("read_only_data_dir_is_refused_at_start_then_works_when_writable") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    std::fs::create_dir(&data).expect("mkdir");
    let mount = Mount::tmpfs(&data, "16m");
    // An initialised store with one acknowledged message.
    let mut d = Daemon::start_in(Config::default(), data.clone()).await;
    let ledger = Ledger::new();
    let r = post_logged(&d, &ledger, "ro-0", "ro", "before").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(d.sigterm(FAULT_DEADLINE).await.success());
    let listing = |dir: &Path| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .expect("read_dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    let before = listing(&data);
    let db_hash = sha256_file(&data.join("keel.db"));

    mount
        .remount("ro")
        .expect("remount ro (nothing is open now)");
    let line = expect_start_refused(&data, None, "a read-only data dir").await;
    assert!(line.to_lowercase().contains("read-only"), "{line}");
    assert_eq!(
        listing(&data),
        before,
        "keel created files on a read-only dir"
    );
    assert_eq!(sha256_file(&data.join("keel.db")), db_hash);

    mount.remount("rw").expect("remount rw");
    d.restart().await;
    ledger.check(&d.user_key_counts().await).assert_clean();
    assert!(d.sigterm(FAULT_DEADLINE).await.success());
    d.assert_no_panics();
}

// F4: permission denied. Root ignores file modes, so keel runs as uid 65534
// against a root-owned 0700 data dir: it must exit non-zero naming the path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permission_denied_data_dir_is_refused_with_the_path_named() {
    if !root_or_skip("permission_denied_data_dir_is_refused_with_the_path_named") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    use std::os::unix::fs::PermissionsExt;
    // The parent must be traversable by uid 65534 so the error is about `data`.
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let data = tmp.path().join("data");
    std::fs::create_dir(&data).expect("mkdir");
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let line = expect_start_refused(&data, Some(65534), "a data dir it may not write").await;
    assert!(line.to_lowercase().contains("permission denied"), "{line}");
    assert!(
        std::fs::read_dir(&data).expect("read_dir").next().is_none(),
        "files created"
    );
}

/// Sets the soft `RLIMIT_FSIZE` of a running process.
fn set_fsize_limit(pid: i32, soft: libc::rlim_t) {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: prlimit with a null new limit only reads into `old`.
    let rc = unsafe { libc::prlimit(pid, libc::RLIMIT_FSIZE, std::ptr::null(), &mut old) };
    assert_eq!(rc, 0, "prlimit read: {}", std::io::Error::last_os_error());
    let new = libc::rlimit {
        rlim_cur: soft.min(old.rlim_max),
        rlim_max: old.rlim_max,
    };
    // SAFETY: prlimit on our own child with a valid rlimit struct.
    let rc = unsafe { libc::prlimit(pid, libc::RLIMIT_FSIZE, &new, std::ptr::null_mut()) };
    assert_eq!(rc, 0, "prlimit set: {}", std::io::Error::last_os_error());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_size_limit_makes_commits_fail_then_recovers() {
    let mut d = Daemon::new(Config::default(), None);
    d.ignore_sigxfsz = true;
    d.boot().await;
    let ledger = Ledger::new();
    for i in 0..3 {
        let r = post_logged(&d, &ledger, &format!("fsz-{i}"), "fsz", "before").await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
    let pid = d.pid().expect("pid");
    // Any write at an offset past 4 KiB now fails with EFBIG.
    set_fsize_limit(pid, 4096);
    assert!(
        post_until_503(&d, &ledger, "fsz", 20).await,
        "no 503 while writes fail with EFBIG"
    );
    assert_degraded(&d).await;
    set_fsize_limit(pid, libc::RLIM_INFINITY);
    assert_recovers(&d, &ledger, "fsz").await;
    ledger.check(&d.user_key_counts().await).assert_clean();
    assert!(d.sigterm(FAULT_DEADLINE).await.success());
    assert_eq!(common::integrity_check(&d.db_path()), "ok");
    d.assert_no_panics();
}

/// Starts keel on `d`'s data dir expecting a refusal; returns its output.
async fn start_expect_refusal(d: &Daemon) -> Output {
    let port = common::free_port();
    let mut cmd = tokio::process::Command::from(d.run_command(port));
    cmd.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let child = cmd.spawn().expect("spawn keel");
    match tokio::time::timeout(REFUSAL_DEADLINE, child.wait_with_output()).await {
        Ok(out) => {
            let out = out.expect("wait keel");
            assert!(
                !out.status.success(),
                "keel exited 0 on a damaged store; stderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            out
        }
        Err(_) => panic!("keel kept running on a damaged store for {REFUSAL_DEADLINE:?}"),
    }
}

/// A stopped daemon whose database holds `n` messages of `size` bytes.
async fn stopped_store(n: usize, size: usize) -> Daemon {
    let mut d = Daemon::start(Config::default()).await;
    let text = "y".repeat(size);
    for i in 0..n {
        d.post_ok(&format!("m{i}"), &format!("chat{}", i % 3), &text)
            .await;
    }
    assert!(d.sigterm(FAULT_DEADLINE).await.success());
    d
}

/// Runs the refusal checks for a corrupted `keel.db`.
async fn assert_corruption_refused(d: &Daemon) {
    let db = d.db_path();
    let before = sha256_file(&db);
    let inode = std::fs::metadata(&db).expect("stat db").ino();
    let out = start_expect_refusal(d).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let path = db.display().to_string();
    assert!(
        stderr
            .lines()
            .any(|l| l.contains(&path) && l.to_lowercase().contains("corrupt")),
        "no stderr line names {path} and `corrupt`:\n{stderr}"
    );
    assert_eq!(
        sha256_file(&db),
        before,
        "keel changed the corrupted database"
    );
    assert_eq!(
        std::fs::metadata(&db).expect("stat db").ino(),
        inode,
        "keel replaced the corrupted database file"
    );
    assert!(
        !stderr.contains("panicked"),
        "panic on a corrupt store:\n{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_header_is_refused_and_file_kept() {
    let d = stopped_store(10, 100).await;
    let db = d.db_path();
    let mut bytes = std::fs::read(&db).expect("read db");
    for (i, b) in bytes.iter_mut().take(100).enumerate() {
        *b = b"not a sqlite database! "[i % 23];
    }
    std::fs::write(&db, &bytes).expect("write db");
    assert_corruption_refused(&d).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_filled_middle_is_refused_and_file_kept() {
    let d = stopped_store(60, 3000).await;
    let db = d.db_path();
    let mut bytes = std::fs::read(&db).expect("read db");
    let page = 4096;
    let pages = bytes.len() / page;
    assert!(
        pages >= 12,
        "database too small to damage its middle: {pages} pages"
    );
    let (from, to) = (pages / 3 * page, 2 * pages / 3 * page);
    bytes[from..to].fill(0);
    std::fs::write(&db, &bytes).expect("write db");
    assert_corruption_refused(&d).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_newer_than_binary_is_refused() {
    let d = stopped_store(1, 10).await;
    let db = d.db_path();
    {
        let conn = common::open_db(&db);
        conn.pragma_update(None, "user_version", 9999)
            .expect("set user_version");
    }
    let before = sha256_file(&db);
    let out = start_expect_refusal(&d).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("newer"),
        "refusal does not say `newer`:\n{stderr}"
    );
    assert_eq!(
        sha256_file(&db),
        before,
        "keel changed a database it refused"
    );
    let conn = common::open_db(&db);
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .expect("user_version");
    assert_eq!(version, 9999);
}

// A large database (over the 8 MiB start-time check limit) is checked after
// start so start time does not grow with stored state; damage found then must
// not stay quiet: an ERROR naming the file and a sticky `degraded` readiness.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damage_in_a_large_database_found_after_start_makes_readyz_degraded() {
    let mut d = stopped_store(150, 60_000).await;
    let db = d.db_path();
    let mut bytes = std::fs::read(&db).expect("read db");
    assert!(
        bytes.len() as u64 > 8 << 20,
        "database only {} bytes: not large enough to defer its check",
        bytes.len()
    );
    let page = 4096;
    let pages = bytes.len() / page;
    let (from, to) = (pages / 3 * page, pages / 2 * page);
    bytes[from..to].fill(0);
    std::fs::write(&db, &bytes).expect("write db");
    d.spawn();
    let degraded = poll_until(FAULT_DEADLINE, || async {
        let r = d.readyz().await.ok()?;
        (r.status == 503 && r.json()["status"] == "degraded").then_some(r)
    })
    .await
    .expect("readyz never reported the damage");
    let reason = degraded.json()["reason"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        reason.contains("corrupt") && reason.contains("keel.db"),
        "{reason}"
    );
    let path = db.display().to_string();
    assert!(
        d.wait_for_log(&path, 1, FAULT_DEADLINE).await
            && d.stderr_boot()
                .lines()
                .any(|l| l.contains("ERROR") && l.contains("corrupt")),
        "no ERROR line naming the file:\n{}",
        common::tail(&d.stderr_boot(), 20)
    );
    d.sigkill();
}
