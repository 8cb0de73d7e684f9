//! Storage faults while keel runs (TESTING.md F1, F3): each case on a store of its own.

use super::*;

/// A storage fault injected into a running keel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// F3: `RLIMIT_FSIZE` lowered on the running keel (SIGXFSZ ignored):
    /// every write fails with EFBIG until it is raised again.
    FileSizeLimit,
    /// F1: the data dir on a 2 MiB tmpfs filled up (needs root).
    DiskFull,
}

impl Fault {
    pub fn name(self) -> &'static str {
        match self {
            Fault::FileSizeLimit => "rlimit_fsize",
            Fault::DiskFull => "tmpfs_full",
        }
    }
}

/// What happened under a storage fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FaultOutcome {
    /// Refused (503) while failing, recovered by itself, nothing acked lost.
    Recovered,
    /// Acknowledged messages missing afterwards: a loss.
    Lost(u64),
    /// Not run, and why (e.g. not root).
    Skipped(String),
}

impl FaultOutcome {
    pub(super) fn short(&self) -> String {
        match self {
            FaultOutcome::Recovered => "recovered".into(),
            FaultOutcome::Lost(n) => format!("lost:{n}"),
            FaultOutcome::Skipped(why) => format!("skipped: {why}"),
        }
    }
}

impl std::fmt::Display for FaultOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FaultOutcome::Recovered => write!(f, "recovered (503 while failing, nothing lost)"),
            FaultOutcome::Lost(n) => write!(f, "LOST {n} acknowledged messages"),
            FaultOutcome::Skipped(why) => write!(f, "skipped: {why}"),
        }
    }
}

/// A tmpfs mounted for the disk-full case; lazily unmounted on drop.
pub(super) struct Tmpfs(PathBuf);

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Sets the soft `RLIMIT_FSIZE` of a running process; returns the old soft limit.
pub(super) fn set_fsize_limit(pid: i32, soft: libc::rlim_t) -> Result<libc::rlim_t> {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: prlimit with a null new limit only reads into `old`.
    if unsafe { libc::prlimit(pid, libc::RLIMIT_FSIZE, std::ptr::null(), &mut old) } != 0 {
        bail!("prlimit: {}", std::io::Error::last_os_error());
    }
    let new = libc::rlimit {
        rlim_cur: soft.min(old.rlim_max),
        rlim_max: old.rlim_max,
    };
    // SAFETY: prlimit on our own child with a valid rlimit struct.
    if unsafe { libc::prlimit(pid, libc::RLIMIT_FSIZE, &new, std::ptr::null_mut()) } != 0 {
        bail!("prlimit: {}", std::io::Error::last_os_error());
    }
    Ok(old.rlim_cur)
}

/// Acked writes, the fault, writes until 503, the fault lifted, recovery,
/// and every acknowledged message present after a restart.
pub(super) async fn fault_case(
    fault: Fault,
    main: &Launcher,
    scratch: &Path,
    secret: &str,
    probe: &reqwest::Client,
) -> Result<FaultOutcome> {
    let dir = scratch.join(format!("fault-{}", fault.name()));
    DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    let data = dir.join("data");
    DirBuilder::new()
        .mode(0o700)
        .create(&data)
        .with_context(|| format!("cannot create {}", data.display()))?;
    let _mount = match fault {
        Fault::DiskFull => {
            // SAFETY: geteuid(2) only reads the caller's id.
            if unsafe { libc::geteuid() } != 0 {
                return Ok(FaultOutcome::Skipped("needs root (mounts a tmpfs)".into()));
            }
            let out = Command::new("mount")
                .args(["-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs"])
                .arg(&data)
                .output();
            match out {
                Ok(o) if o.status.success() => Some(Tmpfs(data.clone())),
                Ok(o) => {
                    return Ok(FaultOutcome::Skipped(format!(
                        "mount tmpfs failed: {}",
                        String::from_utf8_lossy(&o.stderr).trim()
                    )))
                }
                Err(e) => return Ok(FaultOutcome::Skipped(format!("cannot run mount: {e}"))),
            }
        }
        Fault::FileSizeLimit => None,
    };
    let mut l = Launcher {
        binary: main.binary.clone(),
        data_dir: data.clone(),
        config: main.config.clone(),
        log: main.log.clone(),
        starts: 0,
        ignore_sigxfsz: fault == Fault::FileSizeLimit,
        switches: None,
        storage: None,
    };
    let mut k = l.spawn()?;
    k.wait_ready(probe, &l.log).await?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .context("cannot build an HTTP client")?;
    let mut acked = Vec::new();
    let name = fault.name();
    for i in 0..5 {
        let id = format!("f-{name}-before-{i}");
        if post_signed(&http, &k.base, secret, &id, "before").await? == 200 {
            acked.push(id);
        }
    }
    // The fault.
    let filler = data.join("filler");
    let old_limit = match fault {
        Fault::FileSizeLimit => {
            let biggest = fs::read_dir(&data)
                .map(|d| {
                    d.filter_map(|e| e.ok()?.metadata().ok())
                        .map(|m| m.len())
                        .max()
                        .unwrap_or(0)
                })
                .unwrap_or(0);
            Some(set_fsize_limit(k.pid, biggest as libc::rlim_t)?)
        }
        Fault::DiskFull => {
            let mut f = File::create(&filler).context("cannot create the filler")?;
            let chunk = vec![0u8; 16 * 1024];
            while f.write_all(&chunk).and_then(|()| f.sync_all()).is_ok() {}
            None
        }
    };
    let big = "x".repeat(60 * 1024);
    let mut refused = false;
    for i in 0..60 {
        let id = format!("f-{name}-big-{i}");
        match post_signed(&http, &k.base, secret, &id, &big).await {
            Ok(200) => acked.push(id),
            Ok(503) => {
                refused = true;
                break;
            }
            Ok(_) | Err(_) => {}
        }
    }
    // Lift the fault; keel must recover by itself.
    match old_limit {
        Some(old) => {
            set_fsize_limit(k.pid, old)?;
        }
        None => fs::remove_file(&filler).context("cannot remove the filler")?,
    }
    let deadline = Instant::now() + READY_DEADLINE;
    let mut after = false;
    while Instant::now() < deadline {
        let id = format!("f-{name}-after");
        if matches!(
            post_signed(&http, &k.base, secret, &id, "after").await,
            Ok(200)
        ) {
            acked.push(id);
            after = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // SAFETY: kill(2) on the child we spawned and have not reaped.
    unsafe { libc::kill(k.pid, libc::SIGTERM) };
    k.child.wait().context("waiting for keel")?;
    drop(k);
    let mut k = l.spawn()?;
    k.wait_ready(probe, &l.log).await?;
    let keys = observe(&http, &k.base).await?.keys;
    drop(k);
    let lost = acked.iter().filter(|id| !keys.contains_key(*id)).count() as u64;
    Ok(if lost > 0 {
        FaultOutcome::Lost(lost)
    } else if !refused {
        FaultOutcome::Skipped("the fault never made a write fail".into())
    } else if !after {
        bail!("{name}: keel did not accept a message again within {READY_DEADLINE:?} after the fault was lifted");
    } else {
        FaultOutcome::Recovered
    })
}
