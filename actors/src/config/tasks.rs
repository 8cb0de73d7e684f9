//! The task sections of keel.toml: `[tasks]` (limits shared by every task)
//! and one `[task.NAME]` per configured command (R19–R22, R45). Plain data
//! with defaults and validation; the runner lives in `tasks/`, and nothing
//! here knows about it.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

/// `[tasks]`: how tasks run, whatever the task.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TasksConfig {
    /// Tasks running at once; the rest wait QUEUED, in order.
    pub concurrency: usize,
    /// After SIGTERM to a task's process group (cancel, timeout, shutdown),
    /// SIGKILL follows this much later.
    pub grace_ms: u64,
    /// Captured output is written to the store at least this often.
    pub log_flush_ms: u64,
    /// ... or as soon as this much output is waiting (the reader stops
    /// reading while a full batch is being written: back-pressure).
    pub log_batch_bytes: usize,
    /// Output stored per task; the rest is counted and dropped, with a
    /// visible marker at the end of the log.
    pub max_log_bytes: u64,
    /// Finished tasks and their logs older than this are pruned (R22).
    pub retention_days: u32,
}

impl Default for TasksConfig {
    fn default() -> Self {
        TasksConfig {
            concurrency: 4,
            grace_ms: 2_000,
            log_flush_ms: 250,
            log_batch_bytes: 256 * 1024,
            max_log_bytes: 64 * 1024 * 1024,
            retention_days: 30,
        }
    }
}

/// What runs a task: a child process, or a container on the engine of
/// `[containers]` (re-attached after a keel crash).
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum TaskKind {
    #[default]
    Process,
    Container,
}

/// `[task.NAME]`: one configured command. Tasks are never free-form: a
/// chat can only run what is configured here.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TaskConfig {
    /// argv: the program and its fixed arguments; no shell is involved.
    pub command: Vec<String>,
    /// The caller may append arguments (`/task run NAME A B`).
    #[serde(default)]
    pub args_allowed: bool,
    /// Working directory (default: the data dir).
    #[serde(default)]
    pub cwd: Option<PathBuf>,
    /// The child's whole environment besides PATH and LANG.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Stopped (SIGTERM, then SIGKILL after `grace_ms`) and TIMED_OUT after
    /// this long; none = no limit.
    #[serde(default)]
    pub timeout_s: Option<u64>,
    /// Queued again (attempt + 1) when keel restarts while it runs.
    #[serde(default)]
    pub retry_on_restart: bool,
    /// Attempts in all, counting the first.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// At most one task of this name runs at a time.
    #[serde(default)]
    pub exclusive: bool,
    /// Session ids (`telegram:123`, `webhook:ops`) besides the owner's chat
    /// that may run it; the local CLI always may.
    #[serde(default)]
    pub allowed_chats: Vec<String>,
    #[serde(default)]
    pub kind: TaskKind,
    /// `kind = "container"`: the image the task runs in (`command` is its
    /// argv); needs `[containers] enabled`.
    #[serde(default)]
    pub image: Option<String>,
}

fn default_max_attempts() -> u32 {
    3
}

/// Longest task name (names appear in chat commands and file-less ids).
pub const MAX_TASK_NAME: usize = 64;

impl TasksConfig {
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.concurrency == 0 || self.concurrency > 1_024 {
            return Err(("tasks.concurrency", "must be between 1 and 1024".into()));
        }
        if self.grace_ms == 0 || self.grace_ms > 600_000 {
            return Err(("tasks.grace_ms", "must be between 1 and 600000".into()));
        }
        if self.log_flush_ms == 0 || self.log_flush_ms > 60_000 {
            return Err(("tasks.log_flush_ms", "must be between 1 and 60000".into()));
        }
        if self.log_batch_bytes < 1_024 || self.log_batch_bytes > 16 * 1024 * 1024 {
            return Err((
                "tasks.log_batch_bytes",
                "must be between 1024 and 16777216".into(),
            ));
        }
        if self.max_log_bytes == 0 {
            return Err(("tasks.max_log_bytes", "must be > 0".into()));
        }
        if self.retention_days == 0 || self.retention_days > 36_500 {
            return Err(("tasks.retention_days", "must be between 1 and 36500".into()));
        }
        Ok(())
    }
}

/// Check one `[task.NAME]`; the error names the offending key.
pub fn validate_task(name: &str, t: &TaskConfig) -> Result<(), String> {
    if name.is_empty()
        || name.len() > MAX_TASK_NAME
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
    {
        return Err(format!(
            "task name {name:?} must be 1 to {MAX_TASK_NAME} characters of a-z, A-Z, 0-9, '-', '_', '.'"
        ));
    }
    match (t.kind, &t.image) {
        (TaskKind::Container, None) => {
            return Err(format!(
                "task.{name}.kind: \"container\" needs task.{name}.image"
            ))
        }
        (TaskKind::Container, Some(i))
            if i.is_empty()
                || i.len() > 255
                || i.chars().any(|c| c.is_whitespace() || c.is_control()) =>
        {
            return Err(format!("task.{name}.image: not an image reference: {i:?}"))
        }
        (TaskKind::Process, Some(_)) => {
            return Err(format!("task.{name}.image: only for kind = \"container\""))
        }
        _ => {}
    }
    match t.command.first() {
        None => return Err(format!("task.{name}.command: must name a program")),
        Some(p) if p.is_empty() => {
            return Err(format!(
                "task.{name}.command: the program must not be empty"
            ))
        }
        _ => {}
    }
    if t.command.iter().any(|a| a.contains('\0')) {
        return Err(format!("task.{name}.command: must not contain NUL"));
    }
    for (k, v) in &t.env {
        if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
            return Err(format!(
                "task.{name}.env: {k:?} is not a valid variable (no '=', no NUL)"
            ));
        }
    }
    if let Some(cwd) = &t.cwd {
        if cwd.as_os_str().is_empty() {
            return Err(format!("task.{name}.cwd: must not be empty"));
        }
    }
    if t.timeout_s == Some(0) {
        return Err(format!(
            "task.{name}.timeout_s: must be > 0 (remove it for no limit)"
        ));
    }
    if t.max_attempts == 0 || t.max_attempts > 100 {
        return Err(format!(
            "task.{name}.max_attempts: must be between 1 and 100"
        ));
    }
    for chat in &t.allowed_chats {
        if !chat.contains(':') || chat.chars().any(char::is_control) {
            return Err(format!(
                "task.{name}.allowed_chats: {chat:?} must be a session id like \"telegram:123\""
            ));
        }
    }
    Ok(())
}
