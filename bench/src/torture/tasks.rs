//! Tasks in the battery's load (TESTING.md section F: tasks interrupted /
//! requeued / duplicated).
//!
//! One client submits the configured task `torture` over `POST /v1/tasks`
//! with a unique argument per submission, all through the kill cycles. The
//! task is a shell that takes an exclusive `flock` on a file named after
//! its argument before it writes `start ARG`, sleeps, and writes `end ARG`
//! to `runs.log` in the battery's scratch dir (outside keel's data dir).
//! The lock is held by the shell alone (the `sleep` does not inherit it), so
//! a killed run releases it; a second run of the same task while the first
//! still lives fails to lock and writes `dup ARG`: two copies at once.
//!
//! The final check compares the submissions, `GET /v1/tasks` and
//! `runs.log`: every acknowledged task is stored under its id with its
//! argument and reaches a final state; nothing is stored that was never
//! submitted, nor twice; no run overlapped another and no run started
//! that keel had not recorded as RUNNING first (R38: RUNNING is committed
//! before the fork); a SUCCEEDED task's run wrote its `end` line.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::{json, Value};

/// The configured task's name.
pub const TASK: &str = "torture";
/// A task submission every this often (paced load, not synchronisation).
const SUBMIT_EVERY: Duration = Duration::from_millis(120);
/// States after which a task never runs again.
const FINAL: [&str; 5] = [
    "SUCCEEDED",
    "FAILED",
    "CANCELLED",
    "INTERRUPTED",
    "TIMED_OUT",
];

/// The `[tasks]` and `[task.torture]` sections; `runs` is the directory of
/// `runs.log` and the lock files.
pub fn config(runs: &Path) -> String {
    // $0 = the runs directory, $1 = the submission's argument. The shell
    // holds the lock on fd 9; `sleep` gets it closed (`9>&-`).
    let script = "exec 9>>\"$0/$1.lock\"; \
                  flock -n 9 || { echo \"dup $1\" >> \"$0/runs.log\"; exit 3; }; \
                  echo \"start $1\" >> \"$0/runs.log\"; \
                  sleep 0.2 9>&-; \
                  echo \"end $1\" >> \"$0/runs.log\"";
    format!(
        "\n[tasks]\nconcurrency = 4\ngrace_ms = 200\nlog_flush_ms = 50\n\n\
         [task.{TASK}]\ncommand = [\"sh\", \"-c\", '{script}', '{}']\n\
         args_allowed = true\nretry_on_restart = true\nmax_attempts = 100\n",
        runs.display()
    )
}

/// What the client learnt of one submission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Submitted {
    /// 200 with the task's id: must be stored under that id.
    Ok(i64),
    /// A 4xx: must be absent.
    Refused,
    /// No answer or a 5xx: may be stored (once) or not.
    Unknown,
}

/// Every submission by its argument (unique per submission; a submission
/// is never retried, as `POST /v1/tasks` has no idempotency key).
#[derive(Debug, Default)]
pub struct TaskLedger {
    pub ops: BTreeMap<String, Submitted>,
}

/// The task client of one cycle: submits until `stop`, then returns.
pub async fn task_loop(
    ledger: &std::cell::RefCell<TaskLedger>,
    http: &reqwest::Client,
    base: &str,
    cycle: u64,
    stop: &std::cell::Cell<bool>,
) {
    let url = format!("{base}/v1/tasks");
    let mut n = 0u64;
    while !stop.get() {
        let arg = format!("t{cycle}n{n}");
        n += 1;
        ledger
            .borrow_mut()
            .ops
            .insert(arg.clone(), Submitted::Unknown);
        let answer = http
            .post(&url)
            .json(&json!({"name": TASK, "args": [arg]}))
            .send()
            .await;
        let outcome = match answer {
            Ok(r) if r.status().is_success() => match r.json::<Value>().await {
                Ok(v) => v
                    .get("id")
                    .and_then(Value::as_i64)
                    .map_or(Submitted::Unknown, Submitted::Ok),
                Err(_) => Submitted::Unknown,
            },
            Ok(r) if r.status().is_client_error() => Submitted::Refused,
            _ => Submitted::Unknown,
        };
        ledger.borrow_mut().ops.insert(arg, outcome);
        tokio::time::sleep(SUBMIT_EVERY).await;
    }
}

/// One stored task as the final check needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredTask {
    pub id: i64,
    pub name: String,
    pub args: Vec<String>,
    pub state: String,
    /// Its transitions, in order (`RUNNING`, `INTERRUPTED`, `QUEUED`, …).
    pub states: Vec<String>,
    /// Highest attempt it reached.
    pub attempt: i64,
}

/// Every task keel reports (`GET /v1/tasks`).
pub async fn stored(http: &reqwest::Client, base: &str) -> Result<Vec<StoredTask>> {
    let url = format!("{base}/v1/tasks?limit=100000");
    let v: Value = super::get_json(http, &url).await?;
    let list = v
        .get("tasks")
        .and_then(Value::as_array)
        .with_context(|| format!("GET {url}: no tasks array"))?;
    Ok(list.iter().filter_map(stored_task).collect())
}

fn stored_task(t: &Value) -> Option<StoredTask> {
    let str_of = |v: &Value| v.as_str().map(str::to_string);
    Some(StoredTask {
        id: t.get("id")?.as_i64()?,
        name: str_of(t.get("name")?)?,
        args: t
            .get("args")?
            .as_array()?
            .iter()
            .filter_map(str_of)
            .collect(),
        state: str_of(t.get("state")?)?,
        states: t
            .get("states")?
            .as_array()?
            .iter()
            .filter_map(|s| str_of(s.get("state")?))
            .collect(),
        attempt: t.get("attempt")?.as_i64()?,
    })
}

/// `runs.log`: per argument, runs started and finished and failed locks.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Runs {
    pub starts: HashMap<String, u64>,
    pub ends: HashMap<String, u64>,
    pub overlaps: HashMap<String, u64>,
}

impl Runs {
    pub fn parse(text: &str) -> Runs {
        let mut r = Runs::default();
        for line in text.lines() {
            let (map, arg) = match line.split_once(' ') {
                Some(("start", a)) => (&mut r.starts, a),
                Some(("end", a)) => (&mut r.ends, a),
                Some(("dup", a)) => (&mut r.overlaps, a),
                _ => continue,
            };
            *map.entry(arg.to_string()).or_insert(0) += 1;
        }
        r
    }

    pub fn read(dir: &Path) -> Runs {
        Runs::parse(&fs::read_to_string(dir.join("runs.log")).unwrap_or_default())
    }
}

/// What the task check found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TaskVerdict {
    pub invoked: u64,
    pub acked: u64,
    /// Unknown outcome, found stored.
    pub recovered: u64,
    /// Acknowledged but not stored under its id with its argument.
    pub lost: Vec<String>,
    /// Stored but never submitted, stored twice, or refused yet stored.
    pub unexpected: Vec<String>,
    /// Two runs at once, or a run keel had not recorded as RUNNING.
    pub duplicated: Vec<String>,
    /// SUCCEEDED, but its run never wrote its end line.
    pub false_success: Vec<String>,
    /// Stored tasks not in a final state at the end.
    pub unfinished: Vec<String>,
    pub succeeded: u64,
    /// INTERRUPTED transitions (a kill while it ran).
    pub interrupted: u64,
    /// Tasks run again after an interruption (attempt > 1).
    pub requeued: u64,
    /// Runs the tasks started in all (`start` lines).
    pub runs: u64,
}

impl TaskVerdict {
    /// Findings that fail the run.
    pub fn losses(&self) -> u64 {
        (self.lost.len()
            + self.unexpected.len()
            + self.duplicated.len()
            + self.false_success.len()
            + self.unfinished.len()) as u64
    }

    /// Whether the final check still has to wait (a task not yet final).
    pub fn settled(stored: &[StoredTask]) -> bool {
        stored
            .iter()
            .filter(|t| t.name == TASK)
            .all(|t| FINAL.contains(&t.state.as_str()))
    }

    /// The `tasks_*` figures.
    pub fn json(&self) -> Value {
        let n = |v: &[String]| v.len() as u64;
        json!({
            "tasks_invoked": self.invoked,
            "tasks_acked": self.acked,
            "tasks_recovered": self.recovered,
            "tasks_lost": n(&self.lost),
            "tasks_unexpected": n(&self.unexpected),
            "tasks_duplicated": n(&self.duplicated),
            "tasks_false_success": n(&self.false_success),
            "tasks_unfinished": n(&self.unfinished),
            "tasks_succeeded": self.succeeded,
            "tasks_interrupted": self.interrupted,
            "tasks_requeued": self.requeued,
            "tasks_runs": self.runs,
        })
    }
}

/// Compares the submissions with the stored tasks and the runs they made.
pub fn check(ledger: &TaskLedger, stored: &[StoredTask], runs: &Runs) -> TaskVerdict {
    let mut v = TaskVerdict {
        invoked: ledger.ops.len() as u64,
        runs: runs.starts.values().sum(),
        ..TaskVerdict::default()
    };
    let mut by_arg: HashMap<&str, Vec<&StoredTask>> = HashMap::new();
    for t in stored.iter().filter(|t| t.name == TASK) {
        let arg = t.args.first().map_or("", String::as_str);
        by_arg.entry(arg).or_default().push(t);
        if !FINAL.contains(&t.state.as_str()) {
            v.unfinished.push(format!("{arg} ({})", t.state));
        }
        v.interrupted += t.states.iter().filter(|s| *s == "INTERRUPTED").count() as u64;
        if t.attempt > 1 {
            v.requeued += 1;
        }
        if t.state == "SUCCEEDED" && runs.ends.get(arg).copied().unwrap_or(0) == 0 {
            v.false_success.push(arg.to_string());
        }
        if t.state == "SUCCEEDED" {
            v.succeeded += 1;
        }
        let recorded = t.states.iter().filter(|s| *s == "RUNNING").count() as u64;
        let started = runs.starts.get(arg).copied().unwrap_or(0);
        if started > recorded || runs.overlaps.contains_key(arg) {
            v.duplicated.push(arg.to_string());
        }
    }
    for (arg, outcome) in &ledger.ops {
        let found = by_arg.get(arg.as_str()).map_or(&[][..], Vec::as_slice);
        match outcome {
            Submitted::Ok(id) => {
                v.acked += 1;
                if !found.iter().any(|t| t.id == *id) {
                    v.lost.push(arg.clone());
                }
            }
            Submitted::Refused if !found.is_empty() => {
                v.unexpected.push(format!("{arg} (refused)"));
            }
            Submitted::Unknown if !found.is_empty() => v.recovered += 1,
            _ => {}
        }
        if found.len() > 1 {
            v.unexpected.push(format!("{arg} (x{})", found.len()));
        }
    }
    for (arg, found) in &by_arg {
        if !ledger.ops.contains_key(*arg) {
            v.unexpected
                .push(format!("{arg} (x{}, never submitted)", found.len()));
        }
    }
    for arg in runs.starts.keys().chain(runs.overlaps.keys()) {
        if !by_arg.contains_key(arg.as_str()) && !v.duplicated.contains(arg) {
            // A run of a task keel does not know.
            v.duplicated.push(arg.clone());
        }
    }
    v
}

/// The runs directory in the battery's scratch dir.
pub fn runs_dir(scratch: &Path) -> Result<PathBuf> {
    let dir = scratch.join("task-runs");
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(id: i64, arg: &str, state: &str, states: &[&str], attempt: i64) -> StoredTask {
        StoredTask {
            id,
            name: TASK.into(),
            args: vec![arg.into()],
            state: state.into(),
            states: states.iter().map(|s| s.to_string()).collect(),
            attempt,
        }
    }

    fn ledger(ops: &[(&str, Submitted)]) -> TaskLedger {
        TaskLedger {
            ops: ops.iter().map(|(a, o)| (a.to_string(), *o)).collect(),
        }
    }

    fn clean() -> (TaskLedger, Vec<StoredTask>, Runs) {
        let l = ledger(&[
            ("a", Submitted::Ok(1)),
            ("b", Submitted::Ok(2)),
            ("c", Submitted::Unknown),
            ("d", Submitted::Unknown),
            ("e", Submitted::Refused),
        ]);
        let stored = vec![
            task(1, "a", "SUCCEEDED", &["QUEUED", "RUNNING", "SUCCEEDED"], 1),
            task(
                2,
                "b",
                "SUCCEEDED",
                &[
                    "QUEUED",
                    "RUNNING",
                    "INTERRUPTED",
                    "QUEUED",
                    "RUNNING",
                    "SUCCEEDED",
                ],
                2,
            ),
            task(3, "c", "SUCCEEDED", &["QUEUED", "RUNNING", "SUCCEEDED"], 1),
        ];
        let runs = Runs::parse("start a\nend a\nstart b\nstart b\nend b\nstart c\nend c\n");
        (l, stored, runs)
    }

    #[test]
    fn a_clean_run_passes_with_its_interruptions_counted() {
        let (l, s, r) = clean();
        let v = check(&l, &s, &r);
        assert_eq!(v.losses(), 0, "{v:?}");
        assert_eq!((v.invoked, v.acked, v.recovered), (5, 2, 1));
        assert_eq!(
            (v.succeeded, v.interrupted, v.requeued, v.runs),
            (3, 1, 1, 4)
        );
        assert!(TaskVerdict::settled(&s));
    }

    #[test]
    fn an_acknowledged_task_missing_or_under_another_id_is_lost() {
        let (l, mut s, r) = clean();
        s.retain(|t| t.id != 1);
        assert_eq!(check(&l, &s, &r).lost, ["a"]);
        let (l, mut s, r) = clean();
        s[0].id = 7;
        assert_eq!(check(&l, &s, &r).lost, ["a"]);
    }

    #[test]
    fn stored_twice_refused_or_never_submitted_is_unexpected() {
        let (l, mut s, r) = clean();
        s.push(task(9, "a", "SUCCEEDED", &["RUNNING", "SUCCEEDED"], 1));
        assert_eq!(check(&l, &s, &r).unexpected.len(), 1);
        let (l, mut s, r) = clean();
        s.push(task(9, "e", "QUEUED", &["QUEUED"], 1));
        let v = check(&l, &s, &r);
        assert!(v.unexpected.iter().any(|u| u.starts_with("e")), "{v:?}");
        let (l, mut s, r) = clean();
        s.push(task(9, "zz", "FAILED", &["RUNNING", "FAILED"], 1));
        assert_eq!(check(&l, &s, &r).unexpected.len(), 1);
    }

    #[test]
    fn overlapping_or_unrecorded_runs_are_duplicates() {
        let (l, s, mut r) = clean();
        r.overlaps.insert("b".into(), 1);
        assert_eq!(check(&l, &s, &r).duplicated, ["b"]);
        let (l, s, mut r) = clean();
        // Three starts of a, one RUNNING recorded.
        r.starts.insert("a".into(), 3);
        assert_eq!(check(&l, &s, &r).duplicated, ["a"]);
        let (l, s, mut r) = clean();
        r.starts.insert("ghost".into(), 1);
        assert_eq!(check(&l, &s, &r).duplicated, ["ghost"]);
    }

    #[test]
    fn success_without_its_end_line_and_unfinished_tasks_fail() {
        let (l, s, mut r) = clean();
        r.ends.remove("a");
        assert_eq!(check(&l, &s, &r).false_success, ["a"]);
        let (l, mut s, r) = clean();
        s[1].state = "QUEUED".into();
        assert!(!TaskVerdict::settled(&s));
        assert_eq!(check(&l, &s, &r).unfinished.len(), 1);
    }

    #[test]
    fn the_config_runs_the_script_with_the_runs_dir_as_its_zeroth_argument() {
        let c = keel_actors::config::Config::from_toml(&config(Path::new("/tmp/x")), "test")
            .expect("keel accepts the task config");
        let t = &c.task[TASK];
        assert_eq!(t.command[0], "sh");
        assert_eq!(t.command[3], "/tmp/x");
        assert!(t.command[2].contains("flock -n 9"));
        assert!(t.args_allowed && t.retry_on_restart);
    }
}
