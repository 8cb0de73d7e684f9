//! Supervised tasks on the real binary (R19–R22, R38, R45): configured
//! commands run from the CLI (admin socket), HTTP, chat and timers with
//! every state transition recorded; output is captured byte for byte with
//! a visible cap; cancel, timeout, concurrency and shutdown stop process
//! groups; bad input gets a clear state or refusal; and kill -9 of keel
//! while tasks run leaves no orphan process and never two copies of a task.
//!
//! Every child carries a marker in its environment (`KEEL_TEST_MARK`), so
//! the tests find its processes — and any orphan — in /proc.

// Tests drive real processes in real time: clippy.toml's clock and env rules are for keel itself.
#![allow(clippy::disallowed_methods)]

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{poll_until, Config, Daemon, ReplyServer};
use serde_json::{json, Value};

const DEADLINE: Duration = Duration::from_secs(60);

/// A marker unique to this test run and name.
fn mark(test: &str) -> String {
    format!("keel-task-test-{}-{test}", std::process::id())
}

/// `[task.NAME]` sections: every child gets the marker in its env.
fn task_toml(mark: &str, extra: &str, tasks: &[(&str, &str)]) -> String {
    let mut s = format!("\n[tasks]\n{extra}\n");
    for (name, body) in tasks {
        s.push_str(&format!(
            "\n[task.{name}]\n{body}\nenv = {{ KEEL_TEST_MARK = {} }}\n",
            common::toml_str(mark)
        ));
    }
    s
}

/// A daemon with the harness config plus `tasks_toml`.
async fn daemon(config: Config, tasks_toml: &str) -> Daemon {
    let mut d = Daemon::new(config.clone(), None);
    d.write_config_text(&format!("{}{tasks_toml}", config.to_toml()));
    d.boot().await;
    d
}

/// Live processes carrying `mark` in their environment: (pid, pgid, cmdline).
fn marked(mark: &str) -> Vec<(i32, i32, String)> {
    let needle = format!("KEEL_TEST_MARK={mark}");
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        if !env.split(|&b| b == 0).any(|v| v == needle.as_bytes()) {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let rest = &stat[stat.rfind(')').unwrap_or(0) + 1..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.first() == Some(&"Z") {
            continue;
        }
        let pgid = fields.get(2).and_then(|f| f.parse().ok()).unwrap_or(0);
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
            .unwrap_or_default();
        out.push((pid, pgid, cmd));
    }
    out
}

async fn no_marked(mark: &str, deadline: Duration) -> Vec<(i32, i32, String)> {
    match poll_until(deadline, || async { marked(mark).is_empty().then_some(()) }).await {
        Some(()) => Vec::new(),
        None => marked(mark),
    }
}

fn args(d: &Daemon) -> Vec<String> {
    vec![
        "--data-dir".into(),
        d.data_dir.to_string_lossy().into_owned(),
        "--config".into(),
        d.config_path.to_string_lossy().into_owned(),
    ]
}

/// `keel tasks SUB … --data-dir … --config … [-- rest]`.
async fn tasks_cli(d: &Daemon, sub: &[&str], rest: &[&str]) -> std::process::Output {
    let mut a: Vec<String> = vec!["tasks".into()];
    a.extend(sub.iter().map(|s| s.to_string()));
    a.extend(args(d));
    if !rest.is_empty() {
        a.push("--".into());
        a.extend(rest.iter().map(|s| s.to_string()));
    }
    let refs: Vec<&str> = a.iter().map(String::as_str).collect();
    d.cli(&refs).await
}

/// `keel tasks run NAME -- ARGS` → the new id.
async fn run_cli(d: &Daemon, name: &str, rest: &[&str]) -> i64 {
    let out = tasks_cli(d, &["run", name], rest).await;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "keel tasks run {name}: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = text
        .strip_prefix("task ")
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("keel tasks run printed {text:?}"));
    assert_eq!(text.trim(), format!("task {id} started ({name})"));
    id
}

async fn run_http(d: &Daemon, name: &str, args: &[&str]) -> i64 {
    let r = common::send(
        d.client
            .post(d.url("/v1/tasks"))
            .json(&json!({"name": name, "args": args})),
    )
    .await
    .expect("POST /v1/tasks");
    assert_eq!(r.status, 200, "POST /v1/tasks {name}: {}", r.body);
    r.json()["id"].as_i64().expect("id")
}

async fn task(d: &Daemon, id: i64) -> Value {
    let r = d.get(&format!("/v1/tasks/{id}")).await.expect("GET task");
    assert_eq!(r.status, 200, "GET /v1/tasks/{id}: {}", r.body);
    r.json()
}

/// Waits until task `id` satisfies `pred`; panics with the task otherwise.
async fn wait_task(d: &Daemon, id: i64, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let got = poll_until(DEADLINE, || async {
        let t = d.get(&format!("/v1/tasks/{id}")).await.ok()?.json();
        pred(&t).then_some(t)
    })
    .await;
    match got {
        Some(t) => t,
        None => panic!("task {id} never became {what}: {}", task(d, id).await),
    }
}

async fn wait_state(d: &Daemon, id: i64, state: &str) -> Value {
    wait_task(d, id, state, |t| t["state"] == state).await
}

fn states(t: &Value) -> Vec<String> {
    t["states"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|s| s["state"].as_str().unwrap_or("").to_string())
                .collect()
        })
        .unwrap_or_default()
}

async fn logs(d: &Daemon, id: i64, stream: Option<&str>) -> Vec<u8> {
    let mut sub = vec!["logs".to_string(), id.to_string()];
    if let Some(s) = stream {
        sub.push("--stream".into());
        sub.push(s.into());
    }
    let refs: Vec<&str> = sub.iter().map(String::as_str).collect();
    let out = tasks_cli(d, &refs, &[]).await;
    assert!(
        out.status.success(),
        "keel tasks logs {id}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn base_config(replies: &ReplyServer) -> Config {
    Config {
        reply_url: Some(replies.url.clone()),
        owner_chat: Some("boss".into()),
        // Every start is told at once (no coalescing window).
        owner_interval_s: Some(0),
        ..Config::default()
    }
}

async fn reply_containing(replies: &ReplyServer, needle: &str) -> String {
    poll_until(DEADLINE, || async {
        replies
            .replies()
            .into_iter()
            .filter_map(|r| r["text"].as_str().map(str::to_string))
            .find(|t| t.contains(needle))
    })
    .await
    .unwrap_or_else(|| {
        panic!(
            "no reply containing {needle:?}; replies: {:?}",
            replies.replies()
        )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tasks_run_from_cli_http_and_chat_with_states_logs_and_clear_failures() {
    let m = mark("run");
    let replies = ReplyServer::start();
    let toml = task_toml(
        &m,
        "max_log_bytes = 1048576",
        &[
            (
                "hello",
                r#"command = ["sh", "-c", "echo hello \"$@\"; echo oops >&2", "sh"]
args_allowed = true
allowed_chats = ["webhook:friends"]"#,
            ),
            ("fixed", r#"command = ["true"]"#),
            ("fails", r#"command = ["sh", "-c", "echo bye; exit 3"]"#),
            ("nope", r#"command = ["/no/such/program-keel"]"#),
            (
                "badcwd",
                "command = [\"true\"]\ncwd = \"/no/such/dir-keel\"",
            ),
            ("binary", r#"command = ["printf", "\\377\\376\\000x"]"#),
            (
                "closer",
                r#"command = ["sh", "-c", "echo before; exec >&-; sleep 0.3; echo after >&2"]"#,
            ),
            (
                "forker",
                r#"command = ["sh", "-c", "sleep 300 & echo forked"]"#,
            ),
            (
                "bigline",
                r#"command = ["sh", "-c", "head -c 100000000 /dev/zero | tr '\\000' x; echo end"]"#,
            ),
        ],
    );
    let d = daemon(base_config(&replies), &toml).await;

    // CLI: queued over the admin socket, states recorded in order, raw logs.
    let id = run_cli(&d, "hello", &["world", "a b"]).await;
    let t = wait_state(&d, id, "SUCCEEDED").await;
    assert_eq!(states(&t), ["QUEUED", "RUNNING", "SUCCEEDED"]);
    assert_eq!(
        (t["attempt"].as_i64(), t["exit_code"].as_i64()),
        (Some(1), Some(0))
    );
    assert!(t["states"][1]["boot_epoch"].as_i64() == Some(1), "{t}");
    assert_eq!(t["log_bytes"].as_i64(), Some(21), "{t}");
    assert_eq!(logs(&d, id, Some("stdout")).await, b"hello world a b\n");
    assert_eq!(logs(&d, id, Some("stderr")).await, b"oops\n");
    let show = tasks_cli(&d, &["show", &id.to_string(), "--json"], &[]).await;
    let show: Value = serde_json::from_slice(&show.stdout).expect("show --json");
    for key in [
        "id",
        "name",
        "state",
        "attempt",
        "exit_code",
        "created_at",
        "states",
        "log_bytes",
    ] {
        assert!(show.get(key).is_some(), "show --json lacks {key}: {show}");
    }

    // Refusals: one line, exit 2, nothing queued.
    for (name, rest, needle) in [
        ("nosuch", vec![], "unknown task \"nosuch\""),
        ("fixed", vec!["x"], "takes no arguments"),
    ] {
        let out = tasks_cli(&d, &["run", name], &rest).await;
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(2), "{name}: {err}");
        assert!(
            err.contains(needle) && err.trim().lines().count() == 1,
            "{name}: {err}"
        );
    }
    for (body, code, needle) in [
        (json!({"name": "hello", "args": ["a\u{0}b"]}), 400, "NUL"),
        (
            json!({"name": "hello", "args": ["x".repeat(1_000_000)]}),
            400,
            "too long",
        ),
        (json!({"name": "nosuch"}), 404, "unknown task"),
        (json!({"nam": "hello"}), 400, "bad request"),
    ] {
        let r = common::send(d.client.post(d.url("/v1/tasks")).json(&body))
            .await
            .expect("POST");
        assert_eq!(r.status, code, "{}", r.body);
        assert!(
            r.error_problem().is_none() && r.body.contains(needle),
            "{}",
            r.body
        );
    }
    let listed = d.get("/v1/tasks").await.unwrap().json();
    assert_eq!(
        listed["tasks"].as_array().map(Vec::len),
        Some(1),
        "{listed}"
    );

    // Clear states for programs that fail in every way.
    let fails = run_http(&d, "fails", &[]).await;
    let nope = run_http(&d, "nope", &[]).await;
    let badcwd = run_http(&d, "badcwd", &[]).await;
    let binary = run_http(&d, "binary", &[]).await;
    let closer = run_http(&d, "closer", &[]).await;
    let forker = run_http(&d, "forker", &[]).await;
    let bigline = run_http(&d, "bigline", &[]).await;
    let t = wait_state(&d, fails, "FAILED").await;
    assert_eq!(t["exit_code"].as_i64(), Some(3));
    let t = wait_state(&d, nope, "FAILED").await;
    assert!(
        t["detail"]
            .as_str()
            .unwrap()
            .contains("No such file or directory"),
        "{t}"
    );
    assert_eq!(states(&t), ["QUEUED", "RUNNING", "FAILED"]);
    let t = wait_state(&d, badcwd, "FAILED").await;
    assert!(
        t["detail"].as_str().unwrap().contains("/no/such/dir-keel"),
        "{t}"
    );
    wait_state(&d, binary, "SUCCEEDED").await;
    assert_eq!(logs(&d, binary, None).await, b"\xff\xfe\x00x");
    let t = wait_state(&d, closer, "SUCCEEDED").await;
    assert_eq!(logs(&d, closer, None).await, b"before\nafter\n", "{t}");
    let t = wait_state(&d, forker, "SUCCEEDED").await;
    assert!(
        t["detail"].as_str().unwrap().contains("left 1 process"),
        "{t}"
    );
    let t = wait_state(&d, bigline, "SUCCEEDED").await;
    assert_eq!(
        t["log_bytes"].as_i64().map(|b| b > 1_048_576),
        Some(true),
        "{t}"
    );
    assert_eq!(
        t["log_dropped"].as_i64(),
        Some(100_000_004 - 1_048_576),
        "{t}"
    );
    let big = logs(&d, bigline, None).await;
    let marker = String::from_utf8_lossy(&big[1_048_576..]).into_owned();
    assert!(
        marker.contains(
            "output truncated at max_log_bytes = 1048576; 98951428 more bytes of stdout dropped"
        ),
        "{marker}"
    );
    // HTTP logs are the same bytes.
    let r = d
        .client
        .get(d.url(&format!("/v1/tasks/{binary}/logs")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.bytes().await.unwrap().as_ref(), b"\xff\xfe\x00x");

    // Chat: the owner and allowed chats may run, others are refused; the
    // chat is told when its task ends.
    d.post_ok("c1", "boss", "/task run hello from-chat").await;
    let started = replies.reply_to("c1", DEADLINE).await;
    let chat_id: i64 = started
        .strip_prefix("task ")
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("reply {started:?}"));
    assert_eq!(started, format!("task {chat_id} started (hello)"));
    let end = reply_containing(&replies, &format!("task {chat_id} (hello) SUCCEEDED")).await;
    assert!(
        end.contains("exit code 0") && end.contains("hello from-chat"),
        "{end}"
    );
    d.post_ok("c2", "friends", "/task run hello").await;
    assert!(replies
        .reply_to("c2", DEADLINE)
        .await
        .ends_with("started (hello)"));
    d.post_ok("c3", "stranger", "/task run hello").await;
    assert_eq!(
        replies.reply_to("c3", DEADLINE).await,
        "You may not run task hello from this chat."
    );
    d.post_ok("c4", "stranger", &format!("/task status {chat_id}"))
        .await;
    assert!(replies
        .reply_to("c4", DEADLINE)
        .await
        .starts_with("No task"));
    d.post_ok("c5", "boss", &format!("/task status {chat_id}"))
        .await;
    let status = replies.reply_to("c5", DEADLINE).await;
    assert!(
        status.starts_with(&format!("task {chat_id} (hello): SUCCEEDED")),
        "{status}"
    );
    d.post_ok("c6", "boss", "/tasks").await;
    assert!(replies
        .reply_to("c6", DEADLINE)
        .await
        .contains(&format!("task {chat_id} (hello)")));
    let all = d.get("/v1/tasks").await.unwrap().json();
    assert_eq!(all["tasks"].as_array().map(Vec::len), Some(10), "{all}");

    // Nothing the tasks started is left, and keel is fine.
    let left = no_marked(&m, Duration::from_secs(5)).await;
    assert!(left.is_empty(), "processes left behind: {left:?}");
    assert_eq!(d.readyz().await.unwrap().status, 200);
    let status = d.status_json().await;
    let status: Value = serde_json::from_slice(&status.stdout).expect("status --json");
    assert_eq!(
        status["tasks"]["by_state"]["SUCCEEDED"].as_i64(),
        Some(7),
        "{status}"
    );
    let metrics = d.get("/metrics").await.unwrap().body;
    assert!(
        metrics.contains("keel_tasks{state=\"FAILED\"} 3"),
        "{metrics}"
    );
    d.assert_no_panics();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancel_timeout_concurrency_timers_and_shutdown_stop_process_groups() {
    let m = mark("stop");
    let replies = ReplyServer::start();
    let toml = task_toml(
        &m,
        "concurrency = 1\ngrace_ms = 300",
        &[
            (
                "stubborn",
                r#"command = ["sh", "-c", "trap '' TERM; echo up; sleep 300 & wait"]"#,
            ),
            ("slow", "command = [\"sleep\", \"300\"]\ntimeout_s = 1"),
            ("quick", r#"command = ["sh", "-c", "echo quick"]"#),
        ],
    );
    let config = Config {
        shutdown_timeout_ms: Some(5_000),
        ..base_config(&replies)
    };
    let mut d = daemon(config, &toml).await;

    // Concurrency 1: the others wait QUEUED, in order, behind the first.
    let stubborn = run_cli(&d, "stubborn", &[]).await;
    wait_task(&d, stubborn, "running with output", |t| {
        t["state"] == "RUNNING" && t["log_bytes"].as_i64() > Some(0)
    })
    .await;
    let quick: Vec<i64> = [
        run_cli(&d, "quick", &[]).await,
        run_cli(&d, "quick", &[]).await,
    ]
    .into();
    for q in &quick {
        assert_eq!(task(&d, *q).await["state"], "QUEUED");
    }
    // Cancel: the task ignores SIGTERM, so SIGKILL follows the grace.
    let out = tasks_cli(&d, &["cancel", &stubborn.to_string()], &[]).await;
    assert!(String::from_utf8_lossy(&out.stdout).contains("cancelling task"));
    let t = wait_state(&d, stubborn, "CANCELLED").await;
    assert!(
        t["detail"]
            .as_str()
            .unwrap()
            .contains("did not stop within 300 ms"),
        "{t}"
    );
    let mut finished_at = t["finished_at"].as_str().unwrap().to_string();
    for q in &quick {
        let t = wait_state(&d, *q, "SUCCEEDED").await;
        let running_at = t["states"][1]["at"].as_str().unwrap().to_string();
        assert!(
            running_at >= finished_at,
            "task {q} ran before the previous ended: {t}"
        );
        finished_at = t["finished_at"].as_str().unwrap().to_string();
    }
    assert!(no_marked(&m, Duration::from_secs(5)).await.is_empty());

    // Timeout: SIGTERM, TIMED_OUT.
    let slow = run_http(&d, "slow", &[]).await;
    let t = wait_state(&d, slow, "TIMED_OUT").await;
    assert!(
        t["detail"].as_str().unwrap().contains("timed out after 1s"),
        "{t}"
    );

    // A cancel of a finished or unknown task is a clear answer.
    let out = tasks_cli(&d, &["cancel", &slow.to_string()], &[]).await;
    assert!(String::from_utf8_lossy(&out.stdout).contains("already ended (TIMED_OUT)"));
    let out = tasks_cli(&d, &["cancel", "9999"], &[]).await;
    assert_eq!(out.status.code(), Some(2));

    // A timer runs a task: `/remind in 1s /task run quick`.
    d.post_ok("r1", "boss", "/remind in 1s /task run quick")
        .await;
    assert!(replies
        .reply_to("r1", DEADLINE)
        .await
        .contains("It runs task quick."));
    let end = reply_containing(&replies, "(quick) SUCCEEDED").await;
    assert!(end.contains("quick"), "{end}");

    // Shutdown: the running task is stopped and recorded before exit 0.
    let last = run_cli(&d, "stubborn", &[]).await;
    wait_task(&d, last, "running with output", |t| {
        t["state"] == "RUNNING" && t["log_bytes"].as_i64() > Some(0)
    })
    .await;
    let status = d.sigterm(DEADLINE).await;
    assert!(status.success(), "keel exited {status}");
    let left = no_marked(&m, Duration::from_secs(5)).await;
    assert!(left.is_empty(), "processes left after shutdown: {left:?}");
    d.restart().await;
    let t = task(&d, last).await;
    assert_eq!(t["state"], "INTERRUPTED", "{t}");
    assert!(
        t["detail"].as_str().unwrap().contains("keel shut down"),
        "{t}"
    );
    assert_eq!(logs(&d, last, None).await, b"up\n");
    // Every start and cancel is in the audit log (R31).
    let mut a: Vec<String> = vec!["audit".into(), "--json".into()];
    a.extend(args(&d));
    let refs: Vec<&str> = a.iter().map(String::as_str).collect();
    let out = d.cli(&refs).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let audit: Value = serde_json::from_slice(&out.stdout).expect("audit json");
    let kinds: Vec<&str> = audit["records"]
        .as_array()
        .expect("records")
        .iter()
        .filter_map(|r| r["kind"].as_str())
        .collect();
    assert!(kinds.contains(&"task_started"), "{kinds:?}");
    assert!(kinds.contains(&"task_cancelled"), "{kinds:?}");
    d.assert_no_panics();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_cycles_interrupt_or_requeue_tasks_and_leave_no_orphans() {
    const CYCLES: usize = 12;
    let m = mark("kill");
    let replies = ReplyServer::start();
    // Each task writes a line, then leaves a grandchild beside its own
    // sleep: PDEATHSIG kills the main process with keel, recovery must
    // kill the rest of the group.
    let body = |extra: &str| {
        format!(
            "command = [\"sh\", \"-c\", \"echo started $1; sleep 300 & sleep 301\", \"sh\"]\nargs_allowed = true\n{extra}"
        )
    };
    let toml = task_toml(
        &m,
        "concurrency = 8",
        &[
            (
                "retry",
                &body("retry_on_restart = true\nmax_attempts = 100"),
            ),
            ("once", &body("")),
        ],
    );
    let mut d = daemon(base_config(&replies), &toml).await;

    // A sampler counts, all along, the main processes per task tag: two at
    // once would be two copies of one task.
    let stop = Arc::new(AtomicBool::new(false));
    let worst = Arc::new(AtomicUsize::new(0));
    let sampler = {
        let (stop, worst, m) = (stop.clone(), worst.clone(), m.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let mut per_tag: HashMap<String, usize> = HashMap::new();
                // A task's main process leads its own group (forked
                // subshells on their way to exec do not).
                for (pid, pgid, cmd) in marked(&m) {
                    if pid == pgid && cmd.starts_with("sh -c") {
                        let tag = cmd
                            .trim_end()
                            .split(' ')
                            .next_back()
                            .unwrap_or("")
                            .to_string();
                        *per_tag.entry(tag).or_insert(0) += 1;
                    }
                }
                let max = per_tag.values().copied().max().unwrap_or(0);
                worst.fetch_max(max, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };

    let long = run_http(&d, "retry", &["long"]).await;
    for cycle in 0..CYCLES {
        let once = run_http(&d, "once", &[&format!("o{cycle}")]).await;
        let retry = run_http(&d, "retry", &[&format!("r{cycle}")]).await;
        for id in [long, once, retry] {
            wait_task(&d, id, "running with its first line stored", |t| {
                t["state"] == "RUNNING" && t["log_bytes"].as_i64() > Some(0) && t["pid"].is_i64()
            })
            .await;
        }
        let before = task(&d, long).await["attempt"].as_i64().unwrap();
        d.sigkill();
        d.restart().await;
        // Recovery ran before ready: every process of the old start is gone
        // (those still alive belong to the tasks RUNNING now).
        let strays = poll_until(Duration::from_secs(5), || async {
            // Read the store after /proc: a group started meanwhile has
            // its pid recorded by then.
            let procs = marked(&m);
            let all = d.get("/v1/tasks?state=RUNNING").await.ok()?.json();
            let live: Vec<i64> = all["tasks"]
                .as_array()?
                .iter()
                .filter_map(|t| t["pid"].as_i64())
                .collect();
            procs
                .iter()
                .all(|(_, pgid, _)| live.contains(&i64::from(*pgid)))
                .then_some(())
        })
        .await;
        assert!(
            strays.is_some(),
            "cycle {cycle}: orphans of the killed keel: {:?}",
            marked(&m)
        );
        let t = wait_state(&d, once, "INTERRUPTED").await;
        assert_eq!(
            states(&t),
            ["QUEUED", "RUNNING", "INTERRUPTED"],
            "cycle {cycle}"
        );
        assert!(
            t["detail"].as_str().unwrap().contains("keel restarted"),
            "{t}"
        );
        // Requeued with the same id and attempt + 1, running again.
        let retry_line = format!("started r{cycle}\n").len() as i64;
        for (id, line) in [(retry, retry_line), (long, "started long\n".len() as i64)] {
            // Running again, and this attempt's first line stored too.
            let t = wait_task(&d, id, "running again", |t| {
                t["state"] == "RUNNING"
                    && t["pid"].is_i64()
                    && t["log_bytes"].as_i64() == t["attempt"].as_i64().map(|a| a * line)
            })
            .await;
            let s = states(&t);
            assert_eq!(
                &s[s.len() - 4..],
                ["RUNNING", "INTERRUPTED", "QUEUED", "RUNNING"],
                "{t}"
            );
        }
        assert_eq!(task(&d, long).await["attempt"].as_i64(), Some(before + 1));
        // Output up to the last flush is intact.
        let out = logs(&d, once, None).await;
        assert_eq!(
            out,
            format!("started o{cycle}\n").as_bytes(),
            "cycle {cycle}"
        );
        let out = String::from_utf8(logs(&d, retry, None).await).unwrap();
        assert_eq!(
            out,
            format!("started r{cycle}\n").repeat(2),
            "cycle {cycle}"
        );
        let r = common::send(d.client.post(d.url(&format!("/v1/tasks/{retry}/cancel"))))
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        wait_state(&d, retry, "CANCELLED").await;
    }
    let t = task(&d, long).await;
    assert_eq!(t["attempt"].as_i64(), Some(CYCLES as i64 + 1), "{t}");
    assert_eq!(t["id"].as_i64(), Some(long));
    let notice = reply_containing(&replies, &format!("start #{}", d.boots)).await;
    assert!(
        notice.contains("Tasks interrupted: 3, queued again: 2."),
        "{notice}"
    );
    // A last kill: its leftovers are the next start's to clean up, and that
    // start's own tasks go with its orderly shutdown.
    d.sigkill();
    d.restart().await;
    d.sigterm(DEADLINE).await;
    let left = no_marked(&m, Duration::from_secs(5)).await;
    stop.store(true, Ordering::Relaxed);
    sampler.join().expect("sampler");
    assert!(left.is_empty(), "orphans at the end: {left:?}");
    assert_eq!(
        worst.load(Ordering::Relaxed),
        1,
        "two copies of one task ran at once"
    );
    d.assert_no_panics();
}

// Retention (R22) through the binary: finished tasks older than
// `[tasks] retention_days` are pruned with their logs and states at the
// next start; younger ones and unfinished ones stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_tasks_past_retention_are_pruned_with_their_logs() {
    let mut d = daemon(
        Config::default(),
        "\n[tasks]\nretention_days = 7\n\n[task.say]\ncommand = [\"sh\", \"-c\", \"echo said\"]\n",
    )
    .await;
    let old = run_cli(&d, "say", &[]).await;
    let young = run_cli(&d, "say", &[]).await;
    for id in [old, young] {
        wait_state(&d, id, "SUCCEEDED").await;
    }
    assert_eq!(logs(&d, old, None).await, b"said\n");
    assert!(d.sigterm(DEADLINE).await.success());
    {
        // Age one of them past the retention period, as if 30 days passed.
        let conn = common::open_db(&d.db_path());
        let n = conn
            .execute(
                "UPDATE tasks SET finished_at = '2000-01-01T00:00:00.000Z' WHERE id = ?1",
                [old],
            )
            .expect("age the task");
        assert_eq!(n, 1);
    }
    d.restart().await;
    let list = tasks_cli(&d, &["list", "--json"], &[]).await;
    let v: Value = serde_json::from_slice(&list.stdout).expect("tasks list json");
    let ids: Vec<i64> = v["tasks"]
        .as_array()
        .expect("tasks")
        .iter()
        .filter_map(|t| t["id"].as_i64())
        .collect();
    assert_eq!(ids, vec![young], "{v}");
    let conn = common::open_db(&d.db_path());
    let left = |table: &str| -> i64 {
        conn.query_row(
            &format!("SELECT COUNT(*) FROM {table} WHERE task_id = ?1"),
            [old],
            |r| r.get(0),
        )
        .expect("count")
    };
    assert_eq!((left("task_states"), left("log_fragments")), (0, 0));
    assert_eq!(logs(&d, young, None).await, b"said\n");
    d.assert_no_panics();
}
