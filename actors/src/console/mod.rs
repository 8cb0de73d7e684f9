//! The operator console: `GET /v1/stats` (JSON, `read`) and `GET /console`
//! (HTML, `read`), both behind `http::admin_scope` like every admin
//! route.
//!
//! [`Console::stats`] gathers one [`Stats`] from shared state (readiness,
//! uptime) and a read-only snapshot of the store
//! ([`crate::persistence::console`]) taken on a connection of its own, so a
//! page left open never queues work on the writer. One snapshot serves every
//! request for half a second: ten open tabs cost what one does. [`render`] draws
//! the page from a `Stats` on the server (maud: every spliced value is
//! HTML-escaped); `console.js`, served from the binary, polls `/v1/stats`
//! every 2 s and updates the page with `textContent` only.

pub mod render;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::Addr;
use actix_web::{web, HttpResponse};
use serde::Serialize;
use serde_json::Value;

use crate::clock::{Clock, Stamp};
use crate::containers::{ContainerReaper, ServiceDrift};
use crate::error::StoreError;
use crate::health::Health;
use crate::masterkey::KeyHandle;
use crate::persistence::console::{snapshot, StoreSnapshot, CHART_MINUTES};
use crate::persistence::{Connection, PersistenceActor};

/// How long one store snapshot is reused.
const SNAPSHOT_TTL: Duration = Duration::from_millis(500);
/// How long a request waits for the store before showing it as not answering.
const STORE_DEADLINE: Duration = Duration::from_secs(2);
/// Longest piece of outside text (errors, names, logs) the console shows.
pub const MAX_TEXT_CHARS: usize = 300;

/// Where the console reads the store.
#[derive(Clone)]
pub enum StoreSource {
    /// `keel.db`, read on a read-only connection of the console's own.
    File {
        path: PathBuf,
        key: Option<KeyHandle>,
    },
    /// `--ephemeral`: the in-memory store exists only on the writer.
    Writer(Addr<PersistenceActor>),
}

struct Inner {
    health: Health,
    clock: Arc<dyn Clock>,
    source: StoreSource,
    reaper: Option<Addr<ContainerReaper>>,
    /// Channels the config enables (shown even before they report).
    channels: Vec<String>,
    started: tokio::time::Instant,
    started_ms: i64,
    reader: Mutex<Option<Connection>>,
    cached: tokio::sync::Mutex<Option<(tokio::time::Instant, Arc<Stats>)>>,
}

/// The console's shared state. Cheap to clone.
#[derive(Clone)]
pub struct Console {
    inner: Arc<Inner>,
}

/// `/v1/stats`: everything the console shows, as data.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Stats {
    pub now_ms: i64,
    pub now: String,
    pub health: HealthPart,
    pub restarts: Vec<Restart>,
    pub channels: Vec<Channel>,
    pub store: StorePart,
    pub timers: TimersPart,
    pub tasks: TasksPart,
    /// Desired against actual, one row per service (`null` while
    /// `[containers]` is off): `name`, `spec_hash` (desired), `state`,
    /// `container`, `container_id`, `actual_spec_hash` (the container's
    /// spec label) and `drift` (`none`, `missing`, `drifted`,
    /// `unexpected`, `unknown`), as the reconciler's `compare` finds it.
    pub services: Option<Vec<Value>>,
    /// The engine as the reaper last found it (`ok` or why not); `null`
    /// while `[containers]` is off.
    pub services_engine: Option<String>,
    pub chart: Chart,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct HealthPart {
    pub ready: bool,
    pub status: String,
    pub reason: String,
    pub uptime_s: u64,
    /// `uptime_s` in words ("2h 03m 10s").
    pub uptime: String,
    pub started_at: String,
    pub boot_epoch: i64,
}

/// One start of keel, from the audit log.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Restart {
    pub at: String,
    pub boot_epoch: Option<i64>,
    /// Whether the run before it stopped cleanly (`stopped` recorded);
    /// `None` for the first start on record.
    pub clean: Option<bool>,
    pub recovery_ms: Option<i64>,
    /// "clean", "after a crash" or "first start on record".
    pub how: String,
    /// What the owner was told about this start (the R18 notice that
    /// covers it, from the `owner_notified` audit record); `None` while no
    /// notice covers it (no `[owner]`, or the notice is still deferred).
    pub owner_told: Option<String>,
    /// When that notice was committed.
    pub owner_told_at: Option<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Channel {
    pub name: String,
    /// `running`, `backoff`, `stopped`, `gave_up`, or `enabled` for a
    /// channel without a supervised connection (webhook, cli).
    pub state: String,
    pub attempts: u32,
    pub last_error: Option<String>,
    /// When the state was recorded.
    pub since: Option<String>,
    /// While backing off: when the next attempt starts.
    pub retry_at: Option<String>,
    pub in_minute: u64,
    pub out_minute: u64,
    pub in_hour: u64,
    pub out_hour: u64,
    /// The state in words: "running", "backing off until …", "gave up", …
    pub state_text: String,
}

#[derive(Debug, Clone, Serialize, PartialEq, Default)]
pub struct StorePart {
    /// Why the snapshot is missing, if it is.
    pub error: Option<String>,
    pub db_bytes: Option<u64>,
    pub wal_bytes: Option<u64>,
    pub integrity: String,
    pub schema_version: i64,
    pub sessions: i64,
    pub outbox: BTreeMap<String, i64>,
    /// `acked_record`: the highest acknowledged commit keel recorded
    /// (`missing`/`damaged`), and how many of those the store lacks.
    pub acked_record: String,
    pub commit: Option<i64>,
    /// The last WAL checkpoint keel ran since it started (`null`: none
    /// yet, or the store is in memory).
    pub last_checkpoint: Option<CheckpointView>,
    /// `last_checkpoint` in words, or "none since start".
    pub last_checkpoint_text: String,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct CheckpointView {
    pub at: String,
    pub ago_s: i64,
    /// `background` or `inline`.
    pub mode: String,
    pub wal_frames: i64,
    pub checkpointed_frames: i64,
}

/// A checkpoint (or none) in words, for the page.
pub fn checkpoint_text(c: Option<&CheckpointView>) -> String {
    match c {
        None => "none since start".into(),
        Some(c) => format!(
            "{} ({} s ago, {}, {} of {} WAL frames copied back)",
            c.at, c.ago_s, c.mode, c.checkpointed_frames, c.wal_frames
        ),
    }
}

impl CheckpointView {
    pub fn new(c: crate::health::Checkpoint, now_ms: i64) -> CheckpointView {
        CheckpointView {
            at: Stamp::from_ms(c.at_ms).text,
            ago_s: (now_ms - c.at_ms).max(0) / 1000,
            mode: c.mode.to_string(),
            wal_frames: c.wal_frames,
            checkpointed_frames: c.checkpointed_frames,
        }
    }
}

#[derive(Debug, Clone, Serialize, PartialEq, Default)]
pub struct TimersPart {
    pub active: i64,
    pub late: i64,
    pub missed: i64,
    pub next: Vec<NextTimer>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct NextTimer {
    pub id: i64,
    pub chat: String,
    pub kind: String,
    pub callback: String,
    pub due_in_s: i64,
}

#[derive(Debug, Clone, Serialize, PartialEq, Default)]
pub struct TasksPart {
    pub by_state: BTreeMap<String, i64>,
    pub running: Vec<TaskView>,
    pub failed: Vec<TaskView>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TaskView {
    pub id: i64,
    pub name: String,
    pub state: String,
    pub exit_code: Option<i64>,
    pub detail: Option<String>,
    pub at: String,
    pub log_tail: Option<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Chart {
    /// Acknowledged inbound messages per minute, oldest first, the last
    /// entry the current minute.
    pub acked_per_minute: Vec<u64>,
    /// The largest entry (the chart's scale) and the hour's sum.
    pub max: u64,
    pub total: u64,
}

/// Seconds in words: `2h 03m 10s`, `4m 05s`, `9s`.
pub fn duration_words(secs: u64) -> String {
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    if h > 0 {
        format!("{h}h {m:02}m {s:02}s")
    } else if m > 0 {
        format!("{m}m {s:02}s")
    } else {
        format!("{s}s")
    }
}

/// Outside text made safe to show: secrets-looking words masked, control
/// and bidirectional-override characters shown as `\u{…}` escapes (an RTL
/// override cannot reorder the page), bounded to [`MAX_TEXT_CHARS`].
pub fn inert(text: &str) -> String {
    inert_line(text, false)
}

/// The store's integrity as the page says it: damage found, else the
/// background quick_check's state while it has not passed, else ok.
fn integrity_text(damage: Option<&str>, checking: Option<&str>) -> String {
    match (damage, checking) {
        (Some(why), _) => format!("damaged: {}", inert(why)),
        (None, Some("running")) => "checking (quick_check running in the background)".into(),
        (None, Some(other)) => format!("not checked yet: quick_check {}", inert(other)),
        (None, None) => "ok".into(),
    }
}

/// One line made inert: secret-looking words masked, controls and bidi
/// overrides shown as escapes (tabs kept in log lines), length bounded.
fn inert_line(text: &str, keep_tab: bool) -> String {
    let masked = if keep_tab {
        crate::redact::mask_secret_words_keeping_space(text)
    } else {
        crate::redact::mask_secret_words(text)
    };
    let mut out = String::new();
    for (n, c) in masked.chars().enumerate() {
        if n >= MAX_TEXT_CHARS {
            out.push('…');
            break;
        }
        let bidi = matches!(c, '\u{200e}' | '\u{200f}' | '\u{061c}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
        if (c.is_control() && !(keep_tab && c == '\t')) || bidi {
            out.push_str(&format!("\\u{{{:x}}}", c as u32));
        } else {
            out.push(c);
        }
    }
    out
}

/// Like [`inert`] but keeps line breaks (task output); each line bounded.
fn inert_lines(text: &str) -> String {
    text.split('\n')
        .map(|l| inert_line(l, true))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Build the [`Stats`] from a store snapshot (or the reason there is none).
pub fn assemble(
    now_ms: i64,
    health: HealthPart,
    configured: &[String],
    snap: Result<StoreSnapshot, String>,
    files: (Option<u64>, Option<u64>),
    acked: (String, Option<i64>),
    services: Option<Value>,
) -> Stats {
    let (snap, error) = match snap {
        Ok(s) => (s, None),
        Err(e) => (
            StoreSnapshot {
                acked_per_minute: vec![0; CHART_MINUTES],
                ..StoreSnapshot::default()
            },
            Some(inert(&e)),
        ),
    };
    let mut names: BTreeSet<String> = configured.iter().cloned().collect();
    names.extend(snap.statuses.iter().map(|s| s.adapter.clone()));
    names.extend(snap.channels.keys().cloned());
    let channels = names
        .into_iter()
        .map(|name| {
            let row = snap.statuses.iter().find(|s| s.adapter == name);
            let status: Value = row
                .and_then(|r| serde_json::from_str(&r.state_json).ok())
                .unwrap_or(Value::Null);
            let counts = snap.channels.get(&name).cloned().unwrap_or_default();
            let state = status["state"].as_str().unwrap_or("enabled").to_string();
            let retry_at = match (state.as_str(), status["retry_in_ms"].as_i64(), row) {
                ("backoff", Some(ms), Some(r)) => {
                    chrono::DateTime::parse_from_rfc3339(&r.updated_at)
                        .ok()
                        .map(|t| Stamp::from_ms(t.timestamp_millis() + ms).text)
                }
                _ => None,
            };
            let state_text = match (state.as_str(), &retry_at) {
                ("backoff", Some(t)) => {
                    format!("backing off until {t} (attempt {})", status["attempts"])
                }
                ("backoff", None) => format!("backing off (attempt {})", status["attempts"]),
                ("gave_up", _) => "gave up".to_string(),
                ("enabled", _) => "enabled (no connection to supervise)".to_string(),
                (s, _) => inert(s),
            };
            Channel {
                state_text,
                name: inert(&name),
                state: inert(&state),
                attempts: status["attempts"].as_u64().unwrap_or(0) as u32,
                last_error: status["last_error"].as_str().map(inert),
                since: row.map(|r| inert(&r.updated_at)),
                retry_at,
                in_minute: counts.in_minute,
                out_minute: counts.out_minute,
                in_hour: counts.in_hour,
                out_hour: counts.out_hour,
            }
        })
        .collect();
    // Newest first: a start is clean when the record before it is `stopped`.
    // Owner notices name the starts they cover (`first_epoch..=last_epoch`).
    let notices: Vec<(i64, i64, String, String)> = snap
        .life
        .iter()
        .filter(|ev| ev.kind == "owner_notified")
        .filter_map(|ev| {
            let d: Value = serde_json::from_str(&ev.detail).ok()?;
            Some((
                d["first_epoch"].as_i64()?,
                d["last_epoch"].as_i64()?,
                d["text"].as_str()?.to_string(),
                ev.at.clone(),
            ))
        })
        .collect();
    let life: Vec<_> = snap
        .life
        .iter()
        .filter(|ev| ev.kind == "started" || ev.kind == "stopped")
        .collect();
    let mut restarts = Vec::new();
    for (i, ev) in life.iter().enumerate() {
        if ev.kind != "started" {
            continue;
        }
        let detail: Value = serde_json::from_str(&ev.detail).unwrap_or(Value::Null);
        let clean = life.get(i + 1).map(|prev| prev.kind == "stopped");
        let epoch = detail["boot_epoch"].as_i64();
        let told = epoch.and_then(|e| {
            notices
                .iter()
                .find(|(first, last, _, _)| (*first..=*last).contains(&e))
        });
        restarts.push(Restart {
            owner_told: told.map(|t| inert(&t.2)),
            owner_told_at: told.map(|t| inert(&t.3)),
            at: inert(&ev.at),
            boot_epoch: epoch,
            clean,
            recovery_ms: detail["recovery_ms"].as_i64(),
            how: match clean {
                Some(true) => "clean",
                Some(false) => "after a crash",
                None => "first start on record",
            }
            .to_string(),
        });
        if restarts.len() == 5 {
            break;
        }
    }
    let task = |t: &crate::persistence::console::TaskLine| TaskView {
        id: t.id,
        name: inert(&t.name),
        state: inert(&t.state),
        exit_code: t.exit_code,
        detail: t.detail.as_deref().map(inert),
        at: inert(&t.at),
        log_tail: t.log_tail.as_deref().map(inert_lines),
    };
    let mut health = health;
    if health.boot_epoch == 0 {
        health.boot_epoch = snap.boot_epoch;
    }
    Stats {
        now_ms,
        now: Stamp::from_ms(now_ms).text,
        health,
        restarts,
        channels,
        store: StorePart {
            error,
            db_bytes: files.0,
            wal_bytes: files.1,
            integrity: String::new(),
            schema_version: snap.schema_version,
            sessions: snap.sessions,
            outbox: snap.outbox.clone(),
            acked_record: acked.0,
            commit: acked.1,
            last_checkpoint: None,
            last_checkpoint_text: checkpoint_text(None),
        },
        timers: TimersPart {
            active: snap.timers_active,
            late: snap.timers_late,
            missed: snap.timers_missed,
            next: snap
                .timers_next
                .iter()
                .map(|t| NextTimer {
                    id: t.id,
                    chat: inert(&t.session),
                    kind: inert(&t.kind),
                    callback: inert(&t.callback),
                    due_in_s: (t.next_run_ms - now_ms) / 1000,
                })
                .collect(),
        },
        tasks: TasksPart {
            by_state: snap.tasks_by_state.clone(),
            running: snap.tasks_running.iter().map(task).collect(),
            failed: snap.tasks_failed.iter().map(task).collect(),
        },
        services_engine: services
            .as_ref()
            .map(|v| v["engine"].as_str().map_or_else(|| "unknown".into(), inert)),
        services: services.map(|v| {
            v["services"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default()
                .iter()
                .map(|v| {
                    let s = |k: &str| v[k].as_str().map(inert).map_or(Value::Null, Value::from);
                    serde_json::json!({
                        "name": s("name"),
                        "spec_hash": s("spec_hash"),
                        "state": s("state"),
                        "container": s("container"),
                        "container_id": s("container_id"),
                        "actual_spec_hash": s("actual_spec_hash"),
                        "drift": s("drift"),
                    })
                })
                .collect()
        }),
        chart: Chart {
            max: snap.acked_per_minute.iter().copied().max().unwrap_or(0),
            total: snap.acked_per_minute.iter().sum(),
            acked_per_minute: snap.acked_per_minute,
        },
    }
}

fn file_len(path: &std::path::Path) -> Option<u64> {
    std::fs::metadata(path).ok().map(|m| m.len())
}

impl Console {
    pub fn new(
        health: Health,
        clock: Arc<dyn Clock>,
        source: StoreSource,
        reaper: Option<Addr<ContainerReaper>>,
        channels: Vec<String>,
    ) -> Console {
        let started_ms = clock.now_ms();
        Console {
            inner: Arc::new(Inner {
                health,
                clock,
                source,
                reaper,
                channels,
                started: tokio::time::Instant::now(),
                started_ms,
                reader: Mutex::new(None),
                cached: tokio::sync::Mutex::new(None),
            }),
        }
    }

    /// The current [`Stats`] (at most [`SNAPSHOT_TTL`] old).
    pub async fn stats(&self) -> Arc<Stats> {
        let mut cached = self.inner.cached.lock().await;
        if let Some((at, stats)) = cached.as_ref() {
            if at.elapsed() < SNAPSHOT_TTL {
                return stats.clone();
            }
        }
        let stats = Arc::new(self.gather().await);
        *cached = Some((tokio::time::Instant::now(), stats.clone()));
        stats
    }

    async fn gather(&self) -> Stats {
        let inner = &self.inner;
        let now_ms = inner.clock.now_ms();
        let r = inner.health.readiness();
        let health = HealthPart {
            ready: r.ready,
            status: r.status.to_string(),
            reason: inert(&r.reason),
            uptime_s: inner.started.elapsed().as_secs(),
            uptime: duration_words(inner.started.elapsed().as_secs()),
            started_at: Stamp::from_ms(inner.started_ms).text,
            boot_epoch: 0,
        };
        let (snap, files, acked) = match &inner.source {
            StoreSource::Writer(p) => {
                let snap = match tokio::time::timeout(
                    STORE_DEADLINE,
                    p.send(crate::persistence::console::GetConsoleSnapshot { now_ms }),
                )
                .await
                {
                    Ok(Ok(Ok(s))) => Ok(s),
                    Ok(Ok(Err(e))) => Err(e.to_string()),
                    Ok(Err(_)) => Err(StoreError::Closed.to_string()),
                    Err(_) => Err(format!(
                        "the store did not answer within {} s",
                        STORE_DEADLINE.as_secs()
                    )),
                };
                (snap, (None, None), ("in memory".to_string(), None))
            }
            StoreSource::File { path, key } => {
                let wal = PathBuf::from(format!("{}-wal", path.display()));
                let files = (file_len(path), file_len(&wal));
                let record = match crate::persistence::acked::read(
                    &crate::persistence::acked::record_path(path),
                ) {
                    crate::persistence::acked::Record::Seq(n) => n.to_string(),
                    crate::persistence::acked::Record::Missing => "missing".into(),
                    crate::persistence::acked::Record::Damaged => "damaged".into(),
                };
                let this = self.clone();
                let (path, key) = (path.clone(), key.clone());
                let job = tokio::task::spawn_blocking(move || this.read_file(&path, key, now_ms));
                match tokio::time::timeout(STORE_DEADLINE, job).await {
                    Ok(Ok(Ok((s, commit)))) => (Ok(s), files, (record, Some(commit))),
                    Ok(Ok(Err(e))) => (Err(e), files, (record, None)),
                    Ok(Err(e)) => (
                        Err(format!("store read failed: {e}")),
                        files,
                        (record, None),
                    ),
                    Err(_) => (
                        Err(format!(
                            "the store did not answer within {} s",
                            STORE_DEADLINE.as_secs()
                        )),
                        files,
                        (record, None),
                    ),
                }
            }
        };
        let services = match &inner.reaper {
            None => None,
            Some(r) => match tokio::time::timeout(STORE_DEADLINE, r.send(ServiceDrift)).await {
                Ok(Ok(v)) => Some(v),
                Ok(Err(_)) => Some(serde_json::json!({"engine": "the container reaper stopped"})),
                Err(_) => Some(serde_json::json!({"engine": format!(
                    "the container reaper did not answer within {} s",
                    STORE_DEADLINE.as_secs()
                )})),
            },
        };
        let mut stats = assemble(
            now_ms,
            health,
            &inner.channels,
            snap,
            files,
            acked,
            services,
        );
        if matches!(inner.source, StoreSource::File { .. }) {
            stats.store.last_checkpoint = inner
                .health
                .last_checkpoint()
                .map(|c| CheckpointView::new(c, now_ms));
            stats.store.last_checkpoint_text =
                checkpoint_text(stats.store.last_checkpoint.as_ref());
        } else {
            stats.store.last_checkpoint_text = "none (the store is in memory)".into();
        }
        stats.store.integrity = integrity_text(
            inner.health.integrity().as_deref(),
            inner.health.integrity_checking().as_deref(),
        );
        stats
    }

    /// Read the snapshot on the console's own read-only connection (opened
    /// on first use, dropped after an error so the next read reopens it).
    fn read_file(
        &self,
        path: &std::path::Path,
        key: Option<KeyHandle>,
        now_ms: i64,
    ) -> Result<(StoreSnapshot, i64), String> {
        let Ok(mut guard) = self.inner.reader.try_lock() else {
            return Err("the previous store read has not finished".into());
        };
        if guard.is_none() {
            let conn = crate::persistence::open_read_only(path, key.as_ref())
                .map_err(|e| e.to_string())?;
            let _ = conn.busy_timeout(Duration::from_millis(1500));
            *guard = Some(conn);
        }
        let conn = guard.as_ref().expect("opened above");
        let read = conn
            .execute_batch("BEGIN")
            .map_err(StoreError::from)
            .and_then(|()| {
                let s = snapshot(conn, now_ms)?;
                let commit = crate::persistence::acked::store_seq(conn)?;
                Ok((s, commit))
            });
        let _ = conn.execute_batch("COMMIT");
        if read.is_err() {
            *guard = None;
        }
        read.map_err(|e| e.to_string())
    }
}

/// The Content-Security-Policy of the console: nothing but its own script
/// and style from the binary, fetches to itself, no frames, no forms.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

fn hardened(mut b: actix_web::HttpResponseBuilder) -> actix_web::HttpResponseBuilder {
    b.insert_header(("Content-Security-Policy", CSP))
        .insert_header(("X-Content-Type-Options", "nosniff"))
        .insert_header(("Referrer-Policy", "no-referrer"))
        .insert_header(("X-Frame-Options", "DENY"))
        .insert_header(("Cache-Control", "no-store"));
    b
}

pub async fn stats_json(console: web::Data<Console>) -> HttpResponse {
    let stats = console.stats().await;
    hardened(HttpResponse::Ok()).json(&*stats)
}

pub async fn page(console: web::Data<Console>) -> HttpResponse {
    let stats = console.stats().await;
    hardened(HttpResponse::Ok())
        .content_type("text/html; charset=utf-8")
        .body(render::page(&stats).into_string())
}

pub async fn script() -> HttpResponse {
    hardened(HttpResponse::Ok())
        .content_type("text/javascript; charset=utf-8")
        .body(include_str!("console.js"))
}

pub async fn style() -> HttpResponse {
    hardened(HttpResponse::Ok())
        .content_type("text/css; charset=utf-8")
        .body(include_str!("console.css"))
}

pub async fn icon() -> HttpResponse {
    hardened(HttpResponse::Ok())
        .content_type("image/svg+xml")
        .body(include_str!("icon.svg"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::persistence::Connection;
    use rusqlite::params;

    const NOW: i64 = 1_764_590_400_000;

    /// Text an attacker controls, in every field the console shows.
    fn hostile() -> String {
        format!(
            "<script>alert(1)</script>\u{202e}evil\"'&{}",
            "W".repeat(10 * 1024)
        )
    }

    fn seed() -> Connection {
        let conn = crate::persistence::testing::db();
        let h = hostile();
        let at = |ms: i64| Stamp::from_ms(ms).text;
        let session = format!("telegram:{h}");
        conn.execute(
            "INSERT INTO sessions (id, channel, chat, next_seq, created_at, updated_at) VALUES (?1, 'telegram', ?2, 3, ?3, ?3)",
            params![session, h, at(NOW - 5_000)],
        )
        .unwrap();
        for (seq, role) in [(1, "user"), (2, "assistant")] {
            conn.execute(
                "INSERT INTO turns (session_id, seq, role, content, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![session, seq, role, h, at(NOW - 5_000)],
            )
            .unwrap();
        }
        let status = serde_json::json!({"state": "backoff", "attempts": 2, "last_error": h, "retry_in_ms": 10_000});
        crate::persistence::adapter_state::save(
            &conn,
            &Stamp::from_ms(NOW - 1_000),
            "status:telegram",
            &status.to_string(),
        )
        .unwrap();
        conn.execute(
            "INSERT INTO timers (session_id, kind, schedule, timezone, callback, next_run, created_at, updated_at)
             VALUES (?1, 'once', 'x', 'UTC', ?2, ?3, 'x', 'x')",
            params![session, h, NOW + 90_000],
        )
        .unwrap();
        for (state, fin) in [("RUNNING", None), ("FAILED", Some(at(NOW - 60_000)))] {
            conn.execute(
                "INSERT INTO tasks (name, origin, state, detail, created_at, updated_at, finished_at)
                 VALUES (?1, 'cli', ?2, ?1, 'x', 'x', ?3)",
                params![h, state, fin],
            )
            .unwrap();
        }
        crate::persistence::tasks::append_logs(
            &conn,
            "x",
            1,
            &[crate::persistence::tasks::Fragment {
                seq: 1,
                stream: "stdout",
                bytes: format!(
                    "{}\nline one\n<script>x</script>\u{202e}end",
                    "L".repeat(10 * 1024)
                )
                .into_bytes(),
                resume: None,
            }],
        )
        .unwrap();
        let audit = |kind: &str, ms: i64, detail: serde_json::Value| {
            crate::persistence::audit::append(&conn, &Stamp::from_ms(ms), kind, &detail).unwrap();
        };
        audit(
            "started",
            NOW - 900_000,
            serde_json::json!({"boot_epoch": 1}),
        );
        audit(
            "owner_notified",
            NOW - 899_000,
            serde_json::json!({"first_epoch": 1, "last_epoch": 1, "restarts": 1, "text": "keel restarted (start #1)."}),
        );
        audit("stopped", NOW - 800_000, serde_json::json!({"reason": h}));
        audit(
            "started",
            NOW - 700_000,
            serde_json::json!({"boot_epoch": 2}),
        );
        audit(
            "started",
            NOW - 600_000,
            serde_json::json!({"boot_epoch": 3, "recovery_ms": 42}),
        );
        // One notice covering starts 2 and 3, its text hostile (service
        // names and errors end up in it).
        audit(
            "owner_notified",
            NOW - 590_000,
            serde_json::json!({"first_epoch": 2, "last_epoch": 3, "restarts": 2, "text": format!("keel restarted 2 times {h}")}),
        );
        conn
    }

    fn stats() -> Stats {
        let conn = seed();
        let snap = snapshot(&conn, NOW).map_err(|e| e.to_string());
        let health = HealthPart {
            ready: false,
            status: "degraded".into(),
            reason: inert(&hostile()),
            uptime_s: 3_725,
            uptime: duration_words(3_725),
            started_at: Stamp::from_ms(NOW - 3_725_000).text,
            boot_epoch: 0,
        };
        let h = hostile();
        let mut s = assemble(
            NOW,
            health,
            &["telegram".to_string(), "webhook".to_string()],
            snap,
            (Some(4096), Some(0)),
            ("7".into(), Some(7)),
            Some(serde_json::json!({
                "engine": format!("engine down {h}"),
                "services": [
                    {"name": h, "spec_hash": "aaa111", "state": "running", "container": h,
                     "container_id": "c1", "actual_spec_hash": "aaa111", "drift": "none"},
                    {"name": "web", "spec_hash": "bbb222", "state": "running", "container": "keel-i-service-web-3",
                     "container_id": "c2", "actual_spec_hash": "ccc333", "drift": "drifted"},
                    {"name": "db", "spec_hash": "ddd444", "state": "missing", "container": null,
                     "container_id": null, "actual_spec_hash": null, "drift": "missing"},
                    {"name": "zombie", "spec_hash": null, "state": h, "container": "keel-i-service-zombie-9",
                     "container_id": "c3", "actual_spec_hash": h, "drift": "unexpected"},
                ],
            })),
        );
        s.store.last_checkpoint = Some(CheckpointView::new(
            crate::health::Checkpoint {
                at_ms: NOW - 12_000,
                mode: "background",
                wal_frames: 4100,
                checkpointed_frames: 4096,
            },
            NOW,
        ));
        s.store.last_checkpoint_text = checkpoint_text(s.store.last_checkpoint.as_ref());
        s
    }

    /// The HTML of one `<section id=…>`.
    fn section<'a>(page: &'a str, id: &str) -> &'a str {
        let start = page
            .find(&format!("<section id=\"{id}\">"))
            .unwrap_or_else(|| panic!("no section {id}"));
        let end = page[start..].find("</section>").unwrap() + start;
        &page[start..end]
    }

    /// Hostile text is present only in its inert form.
    fn assert_inert(html: &str, what: &str) {
        assert!(!html.contains("<script>"), "{what}: raw <script>");
        assert!(!html.contains('\u{202e}'), "{what}: raw RTL override");
        assert!(
            !html.contains(&"W".repeat(MAX_TEXT_CHARS + 1)),
            "{what}: unbounded line"
        );
        assert!(
            !html.contains(&"L".repeat(MAX_TEXT_CHARS + 1)),
            "{what}: unbounded log"
        );
    }

    #[test]
    fn every_section_shows_hostile_text_inert() {
        let s = stats();
        let page = render::page(&s).into_string();
        assert_inert(&page, "page");
        // The only script is the one served from the binary.
        assert_eq!(page.matches("<script").count(), 1);
        assert!(page.contains("<script src=\"/console/console.js\" defer>"));
        assert!(
            !page.contains(" style="),
            "inline style would break the CSP"
        );

        let health = section(&page, "health");
        assert!(health.contains("degraded"));
        assert!(
            health.contains("&lt;script&gt;alert(1)&lt;/script&gt;\\u{202e}evil&quot;'&amp;"),
            "{health}"
        );
        assert!(health.contains("1h 02m 05s"));
        assert!(
            health.contains("after a crash") && health.contains("clean"),
            "{health}"
        );
        assert!(health.contains(">42<"), "recovery time shown");
        // What the owner was told, per start: one notice covers 2 and 3.
        assert!(
            health.contains("keel restarted (start #1).")
                && health
                    .matches(
                        "keel restarted 2 times &lt;script&gt;alert(1)&lt;/script&gt;\\u{202e}evil"
                    )
                    .count()
                    == 2,
            "{health}"
        );

        let channels = section(&page, "channels");
        assert!(
            channels.contains("backing off until 2025-12-01T12:00:09.000Z (attempt 2)"),
            "{channels}"
        );
        assert!(channels.contains("&lt;script&gt;"));
        assert!(channels.contains("webhook") && channels.contains("enabled"));

        let store = section(&page, "store");
        assert!(store.contains(">4096<") && store.contains(">7<"), "{store}");
        assert!(
            store.contains(
                ">2025-12-01T11:59:48.000Z (12 s ago, background, 4096 of 4100 WAL frames copied back)<"
            ),
            "{store}"
        );

        let timers = section(&page, "timers");
        assert!(timers.contains(">90<"), "due in 90 s: {timers}");
        assert!(timers.contains("&lt;script&gt;"));

        let tasks = section(&page, "tasks");
        assert!(
            tasks.contains("line one\n&lt;script&gt;x&lt;/script&gt;\\u{202e}"),
            "{tasks}"
        );
        assert!(tasks.contains("FAILED"));

        let services = section(&page, "services");
        assert!(services.contains("&lt;script&gt;") && services.contains("running"));
        assert!(
            services
                .contains("engine: <span data-k=\"services_engine\">engine down &lt;script&gt;"),
            "{services}"
        );
        for drift in ["none", "drifted", "missing", "unexpected"] {
            assert!(
                services.contains(&format!("<td class=\"drift\">{drift}</td>")),
                "{drift}: {services}"
            );
        }
        assert!(
            services.contains("<td class=\"spec_hash\">bbb222</td>")
                && services.contains("<td class=\"actual_spec_hash\">ccc333</td>"),
            "desired and actual spec side by side: {services}"
        );

        let traffic = section(&page, "traffic");
        assert!(traffic.contains("<svg id=\"chart\""));
        assert_eq!(traffic.matches("<rect ").count(), CHART_MINUTES);
        // The one inbound message is the busiest (full-height) bar, now.
        assert!(
            traffic.contains("data-i=\"59\" x=\"591\" y=\"0\" width=\"8\" height=\"100\""),
            "{traffic}"
        );
    }

    #[test]
    fn the_json_carries_the_new_parts() {
        let v = serde_json::to_value(stats()).unwrap();
        let told: Vec<&str> = v["restarts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["owner_told"].as_str().unwrap_or(""))
            .collect();
        assert_eq!(told.len(), 3, "{told:?}");
        assert!(
            told[0].starts_with("keel restarted 2 times <script>"),
            "{told:?}"
        );
        assert_eq!(told[0], told[1]);
        assert_eq!(told[2], "keel restarted (start #1).");
        assert_eq!(
            v["restarts"][2]["owner_told_at"],
            "2025-12-01T11:45:01.000Z"
        );
        assert_eq!(v["store"]["last_checkpoint"]["ago_s"], 12);
        assert_eq!(v["store"]["last_checkpoint"]["wal_frames"], 4100);
        assert_eq!(v["services"][1]["drift"], "drifted");
        assert_eq!(v["services"][1]["actual_spec_hash"], "ccc333");
        assert_eq!(v["services"][2]["container"], Value::Null);
        assert!(v["services_engine"]
            .as_str()
            .unwrap()
            .starts_with("engine down <script>"));
    }

    #[test]
    fn a_start_no_notice_covers_says_so() {
        let conn = crate::persistence::testing::db();
        crate::persistence::audit::append(
            &conn,
            &Stamp::from_ms(NOW - 1_000),
            "started",
            &serde_json::json!({"boot_epoch": 9}),
        )
        .unwrap();
        let health = HealthPart {
            ready: true,
            status: "ready".into(),
            reason: String::new(),
            uptime_s: 1,
            uptime: "1s".into(),
            started_at: String::new(),
            boot_epoch: 9,
        };
        let snap = snapshot(&conn, NOW).map_err(|e| e.to_string());
        let s = assemble(
            NOW,
            health,
            &[],
            snap,
            (None, None),
            ("1".into(), Some(1)),
            None,
        );
        assert_eq!(s.restarts.len(), 1);
        assert_eq!(s.restarts[0].owner_told, None);
        assert_eq!(s.store.last_checkpoint_text, "none since start");
        let page = render::page(&s).into_string();
        assert!(section(&page, "store").contains(">none since start<"));
    }

    #[test]
    fn the_json_carries_the_same_inert_text() {
        let json = serde_json::to_string(&stats()).unwrap();
        // Data, not HTML: `<` stays (the script writes it as text), but
        // the RTL override and the unbounded line do not.
        assert!(!json.contains('\u{202e}'));
        assert!(!json.contains(&"W".repeat(MAX_TEXT_CHARS + 1)));
        assert!(json.contains("\\\\u{202e}"));
    }

    #[test]
    fn a_store_that_does_not_answer_is_shown_not_hidden() {
        let health = HealthPart {
            ready: true,
            status: "ready".into(),
            reason: String::new(),
            uptime_s: 1,
            uptime: "1s".into(),
            started_at: String::new(),
            boot_epoch: 3,
        };
        let s = assemble(
            NOW,
            health,
            &["cli".to_string()],
            Err("the store did not answer within 2 s".into()),
            (None, None),
            ("missing".into(), None),
            None,
        );
        let page = render::page(&s).into_string();
        assert!(section(&page, "store").contains("store: the store did not answer within 2 s"));
        assert!(section(&page, "services").contains("containers are off"));
        assert!(section(&page, "channels").contains("cli"));
    }

    #[test]
    fn inert_escapes_controls_and_bounds_length() {
        assert_eq!(inert("a\u{202e}b\u{7}c"), "a\\u{202e}b\\u{7}c");
        assert_eq!(inert(&"x".repeat(400)).chars().count(), MAX_TEXT_CHARS + 1);
        assert_eq!(integrity_text(None, None), "ok");
        assert!(integrity_text(None, Some("running")).starts_with("checking"));
        assert!(integrity_text(None, Some("interrupted")).contains("interrupted"));
        assert!(integrity_text(Some("x: <b>"), Some("running")).starts_with("damaged: x: <b>"));
        // Log tails too: a task that prints a token shows it masked.
        let tail = inert_lines("start\ntoken 123456:ABCDEFGHIJKLMNOPQRSTUVWXYZ ok\n\tdone");
        assert!(!tail.contains("ABCDEFGHIJKLMNOPQRSTUVWXYZ"), "{tail}");
        assert!(
            tail.starts_with("start\n") && tail.ends_with("\n\tdone"),
            "{tail}"
        );
        assert_eq!(duration_words(59), "59s");
        assert_eq!(duration_words(61), "1m 01s");
    }
}
