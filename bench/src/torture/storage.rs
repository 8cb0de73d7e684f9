//! Power loss (TESTING.md C4) and I/O errors (F2) through keel's SQLite VFS
//! shim (`KEEL_TORTURE_STORAGE`, actors/src/persistence/faultfs.rs).

use super::*;

/// How long a power-loss case drives load waiting for its N-th sync.
pub(super) const POWER_LOSS_LOAD: Duration = Duration::from_secs(4);
/// Webhook clients of a power-loss case.
pub(super) const POWER_LOSS_CLIENTS: usize = 4;
/// Messages an I/O error case posts, one at a time.
pub(super) const IO_ERROR_MESSAGES: usize = 40;

/// The N of the power-loss cases: 1, 2, 3 and some drawn from the seed.
pub fn power_loss_points(seed: u64, profile: Profile) -> Vec<u64> {
    let drawn = match profile {
        Profile::Quick => 3,
        Profile::Standard => 10,
        Profile::Soak => 30,
    };
    let mut rng = StdRng::seed_from_u64(seed ^ 0xC4C4_C4C4);
    let mut n: Vec<u64> = vec![1, 2, 3];
    n.extend((0..drawn).map(|_| rng.gen_range(4..=160)));
    // Each N is one image directory: a value drawn twice is one case.
    n.sort_unstable();
    n.dedup();
    n
}

/// What one power-loss image held.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PowerLossOutcome {
    /// Messages acknowledged before the power went.
    pub acked: u64,
    /// Acknowledged but missing from the image.
    pub lost: Vec<String>,
    /// Clients whose messages in the image are not a prefix of what they
    /// sent (an acknowledged message missing before a present one).
    pub not_prefix: Vec<usize>,
    /// The start on the image was not ready (e.g. data_loss_detected).
    pub unready: Option<String>,
    /// The N-th sync came (else the battery cut the power itself).
    pub reached: bool,
}

/// The client and sequence number of a battery message id `k…c<I>n<K>`.
pub(super) fn client_seq(id: &str) -> Option<(usize, u64)> {
    let (_, rest) = id.split_once('c')?;
    let (client, n) = rest.split_once('n')?;
    Some((client.parse().ok()?, n.parse().ok()?))
}

/// Compare a power-loss image with the ledger: acknowledged messages
/// missing, and clients whose present messages are not a prefix.
pub fn check_image(ledger: &Ledger, present: &HashMap<String, u64>) -> PowerLossOutcome {
    let mut out = PowerLossOutcome::default();
    let mut last_present: HashMap<usize, u64> = HashMap::new();
    for id in present.keys() {
        if let Some((c, n)) = client_seq(id) {
            let e = last_present.entry(c).or_insert(n);
            *e = (*e).max(n);
        }
    }
    let mut holes = BTreeMap::new();
    for (id, &(_, outcome)) in &ledger.ops {
        if outcome != Outcome::Ok {
            continue;
        }
        out.acked += 1;
        if present.contains_key(id) {
            continue;
        }
        out.lost.push(id.clone());
        if let Some((c, n)) = client_seq(id) {
            if last_present.get(&c).is_some_and(|&last| last > n) {
                holes.insert(c, ());
            }
        }
    }
    out.not_prefix = holes.into_keys().collect();
    out
}

/// A fresh store, keel started with `power-loss:N:<image>` under webhook
/// load until the shim cuts the power (or the battery does, after
/// [`POWER_LOSS_LOAD`]), then keel started on the image: every message
/// acknowledged before is there, as a prefix per client, and keel is ready.
pub(super) async fn power_loss_case(
    n: u64,
    main: &Launcher,
    scratch: &Path,
    secret: &str,
    probe: &reqwest::Client,
) -> Result<PowerLossOutcome> {
    let dir = scratch.join(format!("power-loss-{n}"));
    DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    let image = dir.join("image");
    let mut l = Launcher {
        binary: main.binary.clone(),
        data_dir: dir.join("data"),
        config: main.config.clone(),
        log: main.log.clone(),
        starts: 0,
        ignore_sigxfsz: false,
        switches: None,
        storage: Some(format!("power-loss:{n}:{}", image.display())),
    };
    let ledger = RefCell::new(Ledger::new(None));
    let mut k = l.spawn()?;
    if wait_ready_or_death(&mut k, probe).await? {
        drive_until_death(&mut k, &ledger, secret, 9_000 + n).await?;
    }
    let reached = image
        .join(keel_actors::persistence::faultfs::POWER_LOST)
        .exists();
    drop(k);
    let mut on_image = Launcher {
        data_dir: image,
        storage: None,
        ..l
    };
    let mut k = on_image.spawn()?;
    let ready = k.wait_ready(probe, &on_image.log).await;
    let mut out = match ready {
        Ok(_) => {
            let present = observe(probe, &k.base).await?.keys;
            check_image(&ledger.borrow(), &present)
        }
        Err(e) => PowerLossOutcome {
            unready: Some(
                e.to_string()
                    .lines()
                    .next()
                    .unwrap_or("not ready")
                    .to_string(),
            ),
            ..PowerLossOutcome::default()
        },
    };
    out.reached = reached;
    k.kill()?;
    Ok(out)
}

/// Wait for `/readyz` 200 (true) or keel's death before it (false: the
/// fault came during start-up).
pub(super) async fn wait_ready_or_death(k: &mut Child_, probe: &reqwest::Client) -> Result<bool> {
    let deadline = k.started + READY_DEADLINE;
    loop {
        if k.child.try_wait().context("waiting for keel")?.is_some() {
            return Ok(false);
        }
        if let Ok(r) = probe.get(format!("{}/readyz", k.base)).send().await {
            if r.status() == reqwest::StatusCode::OK {
                return Ok(true);
            }
        }
        if Instant::now() >= deadline {
            bail!("keel was neither ready nor dead within {READY_DEADLINE:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Webhook clients (the cycles' own [`client_loop`]) until keel dies; past
/// [`POWER_LOSS_LOAD`] the battery SIGKILLs it (the image is still exactly
/// what was synced so far).
pub(super) async fn drive_until_death(
    k: &mut Child_,
    ledger: &RefCell<Ledger>,
    secret: &str,
    cycle: u64,
) -> Result<()> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .context("cannot build an HTTP client")?;
    let url = format!("{}/v1/messages", k.base);
    let seen = RefCell::new(Seen::default());
    let stop = Cell::new(false);
    let cx = Cycle {
        cycle,
        http: &http,
        url: &url,
        secret,
        ledger,
        seen: &seen,
        stop: &stop,
    };
    let mut clients: Vec<Client> = (0..POWER_LOSS_CLIENTS)
        .map(|index| Client {
            index,
            n: 0,
            retry: None,
        })
        .collect();
    let load = futures::future::join_all(clients.iter_mut().map(|c| client_loop(c, &cx)));
    let until = Instant::now() + POWER_LOSS_LOAD;
    let watch = async {
        let mut died = false;
        while !died && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(5)).await;
            died = matches!(k.child.try_wait(), Ok(Some(_)));
        }
        let killed = if died { Ok(()) } else { k.kill() };
        stop.set(true);
        killed
    };
    let (_, killed) = tokio::join!(load, watch);
    killed
}

/// An I/O error injected through the shim (F2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoError {
    /// `fail-write` or `fail-sync`.
    pub kind: &'static str,
    pub at: u64,
    pub forever: bool,
}

impl IoError {
    pub const ALL: &'static [IoError] = &[
        IoError {
            kind: "fail-sync",
            at: 20,
            forever: false,
        },
        // A commit reaches the WAL as one write (walbuf): the 20th
        // counted write falls inside the 40 messages, after start.
        IoError {
            kind: "fail-write",
            at: 20,
            forever: false,
        },
        IoError {
            kind: "fail-sync",
            at: 20,
            forever: true,
        },
        IoError {
            kind: "fail-write",
            at: 20,
            forever: true,
        },
    ];

    pub fn spec(self) -> String {
        let tail = if self.forever { ":forever" } else { "" };
        format!("{}:{}{tail}", self.kind, self.at)
    }

    pub fn name(self) -> String {
        let how = if self.forever { "forever" } else { "once" };
        format!("{}_{how}", self.kind.replace('-', "_"))
    }
}

/// What keel did under one I/O error case.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct IoErrorOutcome {
    /// The shim reported the injection.
    pub fired: bool,
    pub acked: u64,
    /// Acknowledged, missing after a restart without the fault.
    pub lost: u64,
    /// `forever`: acknowledged after the fault fired (must be 0).
    pub acked_after_forever: u64,
    /// `forever`: `/readyz` answered 503 after the fault.
    pub readyz_503: bool,
    /// `once`: a message was acknowledged again after the fault.
    pub recovered: bool,
}

impl std::fmt::Display for IoErrorOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "fired {}  acked {}  lost {}  acked after forever {}  readyz 503 {}  recovered {}",
            self.fired,
            self.acked,
            self.lost,
            self.acked_after_forever,
            self.readyz_503,
            self.recovered
        )
    }
}

/// A store made by a clean start, keel started with the fault, messages
/// posted one at a time (an acknowledgement after the shim's fault line is
/// "after the fault"), then a restart without the fault: every
/// acknowledged message is there (the start's `quick_check` passed).
pub(super) async fn io_error_case(
    case: IoError,
    main: &Launcher,
    scratch: &Path,
    secret: &str,
    probe: &reqwest::Client,
) -> Result<IoErrorOutcome> {
    let name = case.name();
    let dir = scratch.join(format!("io-{name}"));
    DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    let log = dir.join("keel.log");
    let mut l = Launcher {
        binary: main.binary.clone(),
        data_dir: dir.join("data"),
        config: main.config.clone(),
        log: log.clone(),
        starts: 0,
        ignore_sigxfsz: false,
        switches: None,
        storage: None,
    };
    let mut k = l.spawn()?;
    k.wait_ready(probe, &log).await?;
    k.stop(&log).await?;
    drop(k);
    l.storage = Some(case.spec());
    let mut k = l.spawn()?;
    let mut out = IoErrorOutcome::default();
    let mut acked = Vec::new();
    let fault_line = "keel storage fault:";
    let fired = || fs::read_to_string(&log).is_ok_and(|t| t.contains(fault_line));
    if wait_ready_or_death(&mut k, probe).await? {
        for i in 0..IO_ERROR_MESSAGES {
            let before = fired();
            let id = format!("io-{name}-{i}");
            let code = post_signed(probe, &k.base, secret, &id, "io").await.ok();
            if code == Some(200) {
                acked.push(id);
                if before && case.forever {
                    out.acked_after_forever += 1;
                }
                if before && !case.forever {
                    out.recovered = true;
                }
            }
            if case.forever && before {
                out.readyz_503 |= probe
                    .get(format!("{}/readyz", k.base))
                    .send()
                    .await
                    .is_ok_and(|r| r.status() == reqwest::StatusCode::SERVICE_UNAVAILABLE);
            }
        }
    }
    out.fired = fired();
    out.acked = acked.len() as u64;
    k.kill()?;
    drop(k);
    l.storage = None;
    let mut k = l.spawn()?;
    k.wait_ready(probe, &log).await?;
    let keys = observe(probe, &k.base).await?.keys;
    out.lost = acked.iter().filter(|id| !keys.contains_key(*id)).count() as u64;
    k.stop(&log).await?;
    // Into the main log too, where panics and canary hits are counted.
    let text = fs::read(&log).with_context(|| format!("cannot read {}", log.display()))?;
    OpenOptions::new()
        .append(true)
        .open(&main.log)
        .and_then(|mut f| f.write_all(&text))
        .with_context(|| format!("cannot append to {}", main.log.display()))?;
    Ok(out)
}

/// The power-loss and I/O error figures.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct StorageFigures {
    pub power_loss_images: u64,
    pub power_loss_reached: u64,
    pub power_loss_acked: u64,
    pub power_loss_lost: u64,
    pub power_loss_not_prefix: u64,
    pub power_loss_unready: u64,
    pub io_error_cases: u64,
    pub io_error_fired: u64,
    pub io_error_lost: u64,
    pub io_error_acked_after_forever: u64,
    /// `forever` cases whose `/readyz` never said 503.
    pub io_error_ready_under_forever: u64,
    /// `once` cases where nothing was acknowledged after the fault.
    pub io_error_unrecovered: u64,
    /// One line per I/O error case and per power-loss image with a loss,
    /// printed with the other cases' lines.
    pub notes: Vec<String>,
}

impl StorageFigures {
    pub fn add_power_loss(&mut self, o: &PowerLossOutcome) {
        self.power_loss_images += 1;
        self.power_loss_reached += u64::from(o.reached);
        self.power_loss_acked += o.acked;
        self.power_loss_lost += o.lost.len() as u64;
        self.power_loss_not_prefix += o.not_prefix.len() as u64;
        self.power_loss_unready += u64::from(o.unready.is_some());
    }

    pub fn add_io_error(&mut self, case: IoError, o: &IoErrorOutcome) {
        self.io_error_cases += 1;
        self.io_error_fired += u64::from(o.fired);
        self.io_error_lost += o.lost;
        self.io_error_acked_after_forever += o.acked_after_forever;
        if o.fired && case.forever && !o.readyz_503 {
            self.io_error_ready_under_forever += 1;
        }
        if o.fired && !case.forever && !o.recovered {
            self.io_error_unrecovered += 1;
        }
    }

    /// The counters that fail a run.
    pub fn losses(&self) -> u64 {
        self.power_loss_lost
            + self.power_loss_not_prefix
            + self.power_loss_unready
            + self.io_error_lost
            + self.io_error_acked_after_forever
            + self.io_error_ready_under_forever
            + self.io_error_unrecovered
    }

    pub(super) fn json(&self) -> Value {
        json!({
            "power_loss_images": self.power_loss_images,
            "power_loss_reached": self.power_loss_reached,
            "power_loss_acked": self.power_loss_acked,
            "power_loss_lost": self.power_loss_lost,
            "power_loss_not_prefix": self.power_loss_not_prefix,
            "power_loss_unready": self.power_loss_unready,
            "io_error_cases": self.io_error_cases,
            "io_error_fired": self.io_error_fired,
            "io_error_lost": self.io_error_lost,
            "io_error_acked_after_forever": self.io_error_acked_after_forever,
            "io_error_ready_under_forever": self.io_error_ready_under_forever,
            "io_error_unrecovered": self.io_error_unrecovered,
        })
    }
}

/// Every power-loss and I/O error case, each on a store of its own.
pub(super) async fn storage_cases(
    seed: u64,
    profile: Profile,
    main: &Launcher,
    scratch: &Path,
    secret: &str,
    probe: &reqwest::Client,
    progress: &dyn Fn(String),
) -> Result<StorageFigures> {
    let mut figures = StorageFigures::default();
    for n in power_loss_points(seed, profile) {
        progress(format!("power loss after sync {n}"));
        let o = power_loss_case(n, main, scratch, secret, probe).await?;
        if !o.lost.is_empty() || o.unready.is_some() {
            figures.notes.push(format!(
                "  power loss at sync {n}: lost {:?}, not a prefix for clients {:?}, {}",
                o.lost.iter().take(10).collect::<Vec<_>>(),
                o.not_prefix,
                o.unready.as_deref().unwrap_or("ready")
            ));
        }
        figures.add_power_loss(&o);
    }
    for &case in IoError::ALL {
        progress(format!("I/O error {}", case.spec()));
        let o = io_error_case(case, main, scratch, secret, probe).await?;
        figures
            .notes
            .push(format!("  io     {:<22} {o}", case.name()));
        figures.add_io_error(case, &o);
    }
    Ok(figures)
}
