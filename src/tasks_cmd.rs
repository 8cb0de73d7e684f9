//! `keel tasks list|show|logs|run|cancel`. `list`, `show` and `logs` read
//! the store with a read-only connection (safe while keel runs; `logs
//! --follow` polls it until the task ends). `run` and `cancel` change
//! state, and keel has one writer, so they ask the running keel over its
//! admin socket (`<data dir>/keel-admin.sock`, 0600), independent of the
//! `[cli]` chat socket.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use keel_actors::persistence::portable::tasks as portable;
use keel_actors::persistence::tasks::{TaskDetail, TaskState};
use serde_json::{json, Value};

use crate::cli::{DataDirArg, TasksCmd};
use crate::commands::Store;

/// Bytes of output read from the store per query.
const LOG_PAGE: usize = 4 * 1024 * 1024;
/// How often `logs --follow` looks for new output.
const FOLLOW_POLL: Duration = Duration::from_millis(200);

pub fn tasks_cmd(cmd: TasksCmd) -> Result<ExitCode> {
    match cmd {
        TasksCmd::List {
            state,
            dir,
            json: as_json,
        } => {
            let state = match state {
                None => None,
                Some(s) => match TaskState::parse(&s.to_ascii_uppercase()) {
                    Some(st) => Some(st.as_str()),
                    None => {
                        eprintln!(
                            "keel: error: unknown state {s:?} (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED, INTERRUPTED, TIMED_OUT)"
                        );
                        return Ok(ExitCode::from(2));
                    }
                },
            };
            let mut store = crate::commands::open_store_ro(&dir)?;
            let rows = store
                .read(|db| portable::list_details(db, state, i64::MAX))
                .map_err(crate::commands::no_table("tasks"))?;
            crate::commands::print_rows(&rows, as_json, "tasks", "no tasks", line);
            Ok(ExitCode::SUCCESS)
        }
        TasksCmd::Show {
            id,
            dir,
            json: as_json,
        } => {
            let mut store = crate::commands::open_store_ro(&dir)?;
            let Some(t) = store
                .read(|db| portable::task_detail(db, id))
                .map_err(crate::commands::no_table("tasks"))?
            else {
                eprintln!("keel: error: no task {id}");
                return Ok(ExitCode::from(2));
            };
            if as_json {
                println!("{}", json!(t));
            } else {
                println!("{}", line(&t));
                println!(
                    "  args {}  origin {}  session {}",
                    serde_json::to_string(&t.task.args).unwrap_or_default(),
                    t.task.origin,
                    t.task.session.as_deref().unwrap_or("-").escape_debug()
                );
                if let Some(d) = &t.task.detail {
                    println!("  detail {}", d.escape_debug());
                }
                println!(
                    "  log {} bytes{}",
                    t.task.log_bytes,
                    if t.task.log_dropped > 0 {
                        format!(" ({} dropped by max_log_bytes)", t.task.log_dropped)
                    } else {
                        String::new()
                    }
                );
                for s in &t.states {
                    println!(
                        "  {} {:<11} start #{} attempt {}{}",
                        s.at,
                        s.state,
                        s.boot_epoch,
                        s.attempt,
                        s.detail
                            .as_deref()
                            .map(|d| format!(" — {}", d.escape_debug()))
                            .unwrap_or_default()
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        TasksCmd::Logs {
            id,
            stream,
            follow,
            dir,
        } => {
            if let Some(s) = &stream {
                if s != "stdout" && s != "stderr" {
                    eprintln!("keel: error: --stream must be stdout or stderr, not {s:?}");
                    return Ok(ExitCode::from(2));
                }
            }
            let mut store = crate::commands::open_store_ro(&dir)?;
            if store
                .read(|db| portable::get_task(db, id))
                .map_err(crate::commands::no_table("tasks"))?
                .is_none()
            {
                eprintln!("keel: error: no task {id}");
                return Ok(ExitCode::from(2));
            }
            logs(&mut store, id, stream.as_deref(), follow)?;
            Ok(ExitCode::SUCCESS)
        }
        TasksCmd::Run { name, args, dir } => {
            let answer = ask(&dir, &json!({"op": "run", "name": name, "args": args}))?;
            if let Some(e) = answer.get("error").and_then(Value::as_str) {
                eprintln!("keel: error: {e}");
                return Ok(ExitCode::from(2));
            }
            let id = answer["id"].as_i64().unwrap_or(0);
            println!("task {id} started ({name})");
            Ok(ExitCode::SUCCESS)
        }
        TasksCmd::Cancel { id, dir } => {
            let answer = ask(&dir, &json!({"op": "cancel", "id": id}))?;
            if let Some(e) = answer.get("error").and_then(Value::as_str) {
                eprintln!("keel: error: {e}");
                return Ok(ExitCode::from(2));
            }
            match answer["outcome"].as_str().unwrap_or("") {
                "not_found" => {
                    eprintln!("keel: error: no task {id}");
                    Ok(ExitCode::from(2))
                }
                "finished" => {
                    println!(
                        "task {id} already ended ({})",
                        answer["state"].as_str().unwrap_or("?")
                    );
                    Ok(ExitCode::SUCCESS)
                }
                "cancelled" => {
                    println!("task {id} cancelled (it had not started)");
                    Ok(ExitCode::SUCCESS)
                }
                _ => {
                    println!("cancelling task {id}");
                    Ok(ExitCode::SUCCESS)
                }
            }
        }
    }
}

/// Print a task's output in order; with `follow`, until the task has ended
/// and everything it wrote is printed.
fn logs(store: &mut Store, id: i64, stream: Option<&str>, follow: bool) -> Result<()> {
    let mut out = std::io::stdout().lock();
    let mut after = 0i64;
    loop {
        // Read the state before the output: output stored before the end
        // is then always printed by the last round.
        let ended = store
            .read(|db| portable::get_task(db, id))?
            .and_then(|t| TaskState::parse(&t.state))
            .is_none_or(TaskState::is_final);
        loop {
            let page = store.read(|db| portable::log_fragments(db, id, stream, after, LOG_PAGE))?;
            let Some(last) = page.last().map(|f| f.0) else {
                break;
            };
            for (_, _, bytes) in &page {
                if out.write_all(bytes).is_err() {
                    // The reader went away (e.g. `| head`): done.
                    return Ok(());
                }
            }
            after = last;
        }
        let _ = out.flush();
        if !follow || ended {
            return Ok(());
        }
        std::thread::sleep(FOLLOW_POLL);
    }
}

/// One request to the running keel's admin socket.
pub(crate) fn ask(dir: &DataDirArg, request: &Value) -> Result<Value> {
    ask_waiting(dir, request, Duration::from_secs(60))
}

/// [`ask`], waiting up to `wait` for the answer (a long ephemeral run).
pub(crate) fn ask_waiting(dir: &DataDirArg, request: &Value, wait: Duration) -> Result<Value> {
    let config = crate::config::load(dir, None)?;
    let path = config.admin_socket();
    if crate::run::running_pid(&config.data_dir).is_none() {
        bail!(
            "keel is not running on {} (start it with keel run)",
            config.data_dir.display()
        );
    }
    let mut stream = UnixStream::connect(&path)
        .with_context(|| format!("cannot connect to keel's admin socket {}", path.display()))?;
    stream.set_read_timeout(Some(wait))?;
    let mut line = request.to_string();
    line.push('\n');
    stream.write_all(line.as_bytes())?;
    let mut answer = String::new();
    BufReader::new(&stream)
        .read_line(&mut answer)
        .context("no answer from keel")?;
    serde_json::from_str(&answer).context("bad answer from keel")
}

fn line(t: &TaskDetail) -> String {
    let t = &t.task;
    format!(
        "#{}\t{}\t{}\tattempt {}\texit {}\tcreated {}",
        t.id,
        t.state,
        t.name,
        t.attempt,
        t.exit_code
            .map(|c| c.to_string())
            .unwrap_or_else(|| "-".into()),
        t.created_at
    )
}
