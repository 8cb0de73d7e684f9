//! Damaged files (TESTING.md F5, F6, F7): each case on a store of its own.

use super::*;

/// One way to damage a stopped store or its config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Damage {
    /// F6: the `-wal` of a SIGKILLed keel deleted.
    WalDeleted,
    /// F6: the `-wal` cut to a third.
    WalTruncated,
    /// F6: one byte of the `-wal` flipped in its second half.
    WalBitFlip,
    /// F5: bytes of page 1 (the header) flipped after a clean stop.
    DbHeaderFlip,
    /// F5: bytes of the last page flipped after a clean stop.
    DbPageFlip,
    /// F5: the database cut in half after a clean stop.
    DbTruncated,
    /// F5: the last page zero-filled after a clean stop.
    DbPageZeroed,
    /// F7: the config file empty.
    ConfigEmpty,
    /// F7: the config file NUL-filled.
    ConfigNul,
    /// F7: the config file cut mid-write.
    ConfigCut,
    /// F7: invalid UTF-8 in the config file.
    ConfigBadUtf8,
}

impl Damage {
    pub const ALL: &'static [Damage] = &[
        Damage::WalDeleted,
        Damage::WalTruncated,
        Damage::WalBitFlip,
        Damage::DbHeaderFlip,
        Damage::DbPageFlip,
        Damage::DbTruncated,
        Damage::DbPageZeroed,
        Damage::ConfigEmpty,
        Damage::ConfigNul,
        Damage::ConfigCut,
        Damage::ConfigBadUtf8,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Damage::WalDeleted => "wal_deleted",
            Damage::WalTruncated => "wal_truncated",
            Damage::WalBitFlip => "wal_bit_flip",
            Damage::DbHeaderFlip => "db_header_flip",
            Damage::DbPageFlip => "db_page_flip",
            Damage::DbTruncated => "db_truncated",
            Damage::DbPageZeroed => "db_page_zeroed",
            Damage::ConfigEmpty => "config_empty",
            Damage::ConfigNul => "config_nul",
            Damage::ConfigCut => "config_cut",
            Damage::ConfigBadUtf8 => "config_bad_utf8",
        }
    }

    /// WAL cases need the writes still in the WAL (SIGKILL); database cases
    /// need them in the main file (SIGTERM checkpoints).
    pub(super) fn clean_stop(self) -> bool {
        matches!(
            self,
            Damage::DbHeaderFlip | Damage::DbPageFlip | Damage::DbTruncated | Damage::DbPageZeroed
        )
    }

    pub(super) fn apply(self, data_dir: &Path, config: &Path) -> Result<()> {
        let wal = data_dir.join("keel.db-wal");
        let db = data_dir.join("keel.db");
        let flip = |path: &Path, at: u64, n: u64| -> Result<()> {
            let f = OpenOptions::new().read(true).write(true).open(path)?;
            let mut buf = vec![0u8; n as usize];
            std::os::unix::fs::FileExt::read_exact_at(&f, &mut buf, at)?;
            for b in &mut buf {
                *b ^= 0xA5;
            }
            std::os::unix::fs::FileExt::write_all_at(&f, &buf, at)?;
            Ok(())
        };
        let len = |p: &Path| fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        match self {
            Damage::WalDeleted => fs::remove_file(&wal)?,
            Damage::WalTruncated => OpenOptions::new()
                .write(true)
                .open(&wal)?
                .set_len(len(&wal) / 3)?,
            Damage::WalBitFlip => flip(&wal, len(&wal) * 2 / 3, 1)?,
            Damage::DbHeaderFlip => flip(&db, 0, 32)?,
            Damage::DbPageFlip => flip(&db, len(&db).saturating_sub(4096) + 100, 64)?,
            Damage::DbTruncated => OpenOptions::new()
                .write(true)
                .open(&db)?
                .set_len(len(&db) / 2)?,
            Damage::DbPageZeroed => {
                let f = OpenOptions::new().write(true).open(&db)?;
                std::os::unix::fs::FileExt::write_all_at(
                    &f,
                    &[0u8; 4096],
                    len(&db).saturating_sub(4096),
                )?;
            }
            Damage::ConfigEmpty => fs::write(config, b"")?,
            Damage::ConfigNul => fs::write(config, vec![0u8; 256])?,
            Damage::ConfigCut => {
                let text = fs::read(config)?;
                fs::write(config, &text[..text.len() / 2])?;
            }
            Damage::ConfigBadUtf8 => {
                let mut text = fs::read(config)?;
                text.extend_from_slice(b"\nlog_level = \"\xff\xfe\"\n");
                fs::write(config, text)?;
            }
        }
        Ok(())
    }
}

/// What keel did with a damaged store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DamageOutcome {
    /// Refused to start or to serve, saying why.
    Detected(String),
    /// Served, and every acknowledged message is there.
    Survived,
    /// Served with acknowledged messages missing and said nothing: a loss.
    Silent(u64),
}

impl std::fmt::Display for DamageOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DamageOutcome::Detected(how) => write!(f, "detected ({how})"),
            DamageOutcome::Survived => write!(f, "survived (nothing lost)"),
            DamageOutcome::Silent(n) => write!(f, "SILENT LOSS of {n} acknowledged messages"),
        }
    }
}

/// Messages acknowledged before each damage case.
pub(super) const DAMAGE_MESSAGES: usize = 20;

/// Acked writes, a stop, the damage, a start: what did keel do?
pub(super) async fn damage_case(
    case: Damage,
    main: &Launcher,
    scratch: &Path,
    secret: &str,
    probe: &reqwest::Client,
) -> Result<DamageOutcome> {
    let dir = scratch.join(format!("damage-{}", case.name()));
    DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    let config = dir.join("keel.toml");
    fs::copy(&main.config, &config)
        .with_context(|| format!("cannot write {}", config.display()))?;
    let mut l = Launcher {
        binary: main.binary.clone(),
        data_dir: dir.join("data"),
        config: config.clone(),
        log: main.log.clone(),
        starts: 0,
        ignore_sigxfsz: false,
        switches: None,
        storage: None,
    };
    let mut k = l.spawn()?;
    k.wait_ready(probe, &l.log).await?;
    let ids: Vec<String> = (0..DAMAGE_MESSAGES)
        .map(|i| format!("d-{}-{i}", case.name()))
        .collect();
    for id in &ids {
        let body =
            serde_json::to_vec(&json!({"id": id, "chat": "damage", "from": "u", "text": id}))
                .expect("a JSON value serializes");
        let r = probe
            .post(format!("{}/v1/messages", k.base))
            .header("content-type", "application/json")
            .header("x-keel-signature", sign(secret, &body))
            .body(body)
            .send()
            .await
            .with_context(|| format!("damage case {}: POST", case.name()))?;
        if r.status() != reqwest::StatusCode::OK {
            bail!(
                "damage case {}: keel answered {} before the damage",
                case.name(),
                r.status()
            );
        }
    }
    if case.clean_stop() {
        // SAFETY: kill(2) on the child we spawned and have not reaped.
        unsafe { libc::kill(k.pid, libc::SIGTERM) };
        let status = k.child.wait().context("waiting for keel")?;
        if !status.success() {
            bail!(
                "damage case {}: keel's SIGTERM stop exited with {status}",
                case.name()
            );
        }
    } else {
        k.kill()?;
    }
    drop(k);
    case.apply(&l.data_dir, &config)
        .with_context(|| format!("damage case {}: cannot damage the files", case.name()))?;
    let mut k = l.spawn()?;
    let deadline = Instant::now() + READY_DEADLINE;
    let outcome = loop {
        if let Some(status) = k.child.try_wait().context("waiting for keel")? {
            let tail = log_tail(&l.log);
            let last = tail
                .lines()
                .rev()
                .find(|l| l.contains("error"))
                .unwrap_or("no error line")
                .trim()
                .chars()
                .map(|c| if c.is_control() { '?' } else { c })
                .take(160)
                .collect::<String>();
            break DamageOutcome::Detected(format!("{status}: {last}"));
        }
        if let Ok(r) = probe.get(format!("{}/readyz", k.base)).send().await {
            let code = r.status();
            let body = r.text().await.unwrap_or_default();
            if code == reqwest::StatusCode::OK {
                let keys = observe(probe, &k.base).await?.keys;
                let lost = ids.iter().filter(|id| !keys.contains_key(*id)).count() as u64;
                break if lost == 0 {
                    DamageOutcome::Survived
                } else {
                    DamageOutcome::Silent(lost)
                };
            }
            if body.contains("data_loss_detected") || body.contains("corrupt") {
                let status = serde_json::from_str::<Value>(&body)
                    .ok()
                    .and_then(|v| v.get("status")?.as_str().map(str::to_string))
                    .unwrap_or_default();
                break DamageOutcome::Detected(format!("/readyz 503 {status}"));
            }
        }
        if Instant::now() >= deadline {
            bail!(
                "damage case {}: keel neither started, refused nor exited within {READY_DEADLINE:?}",
                case.name()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    drop(k);
    Ok(outcome)
}
