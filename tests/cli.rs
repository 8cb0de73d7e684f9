//! The command line: `keel status`, `keel sessions list|show` read the store directly
//! and are safe while the daemon writes to it; `keel migrate` prints the schema
//! version; `keel run --stdin` is a chat on stdin/stdout that exits 0 at EOF.

mod common;

use std::process::Output;
use std::sync::Arc;
use std::time::Duration;

use common::{client_specs, free_port, run_keel, Config, Daemon, Ledger, Load, Outcome};
use serde_json::Value;

/// How long a CLI command may run.
const CLI_DEADLINE: Duration = Duration::from_secs(60);

/// Stdout as JSON; panics with the output when the command failed or printed no JSON.
fn json_stdout(what: &str, out: &Output) -> Value {
    assert!(
        out.status.success(),
        "{what} exited {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{what} printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// Every string anywhere inside a JSON value.
fn strings(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::String(s) => out.push(s.clone()),
        Value::Array(a) => a.iter().for_each(|x| strings(x, out)),
        Value::Object(o) => o.values().for_each(|x| strings(x, out)),
        _ => {}
    }
}

fn all_strings(v: &Value) -> Vec<String> {
    let mut out = Vec::new();
    strings(v, &mut out);
    out
}

/// A running daemon with two chats (`c1`, `c2`) and a load writing to others.
async fn daemon_with_messages() -> (Daemon, Load, Arc<Ledger>) {
    let d = Daemon::start(Config::default()).await;
    let ledger = Arc::new(Ledger::new());
    for i in 0..3 {
        for (chat, word) in [("c1", "one"), ("c2", "two")] {
            let (id, text) = (format!("{chat}-{i}"), format!("{word}-{i}"));
            ledger.invoke(&id, chat, "tester", &text);
            d.post_ok(&id, chat, &text).await;
            ledger.complete(&id, Outcome::Ok);
        }
    }
    let load = Load::start(d.base(), None, client_specs(4, "cli"), ledger.clone());
    assert!(
        load.wait_acked(10, Duration::from_secs(30)).await,
        "load made no progress"
    );
    (d, load, ledger)
}

/// Stops the load and checks the daemon lost nothing while the CLI read the store.
async fn finish(d: Daemon, load: Load, ledger: Arc<Ledger>) {
    load.stop().await;
    assert_eq!(d.readyz().await.expect("readyz").status, 200);
    ledger.check(&d.user_key_counts().await).assert_clean();
    d.assert_no_panics();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_json_is_valid_while_daemon_runs() {
    let (d, load, ledger) = daemon_with_messages().await;
    let data = d.data_dir.to_str().expect("utf8").to_string();
    for _ in 0..5 {
        let out = run_keel(
            &["status", "--json", "--data-dir", &data],
            None,
            CLI_DEADLINE,
        )
        .await;
        let v = json_stdout("keel status --json", &out);
        assert!(
            v.as_object().is_some_and(|o| !o.is_empty()),
            "keel status --json printed no object: {v}"
        );
    }
    finish(d, load, ledger).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_list_json_names_every_session_while_daemon_runs() {
    let (d, load, ledger) = daemon_with_messages().await;
    let data = d.data_dir.to_str().expect("utf8").to_string();
    for _ in 0..5 {
        let out = run_keel(
            &["sessions", "list", "--json", "--data-dir", &data],
            None,
            CLI_DEADLINE,
        )
        .await;
        let names = all_strings(&json_stdout("keel sessions list --json", &out));
        for s in ["webhook:c1", "webhook:c2"] {
            assert!(names.iter().any(|n| n == s), "{s} missing from {names:?}");
        }
    }
    finish(d, load, ledger).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_show_json_lists_the_turns_of_one_session() {
    let (d, load, ledger) = daemon_with_messages().await;
    let data = d.data_dir.to_str().expect("utf8").to_string();
    let out = run_keel(
        &[
            "sessions",
            "show",
            "webhook:c1",
            "--json",
            "--data-dir",
            &data,
        ],
        None,
        CLI_DEADLINE,
    )
    .await;
    let texts = all_strings(&json_stdout("keel sessions show webhook:c1 --json", &out));
    for i in 0..3 {
        let want = format!("one-{i}");
        assert!(texts.contains(&want), "{want} missing from {texts:?}");
        let other = format!("two-{i}");
        assert!(!texts.contains(&other), "c2's {other} shown for c1");
    }
    finish(d, load, ledger).await;
}

/// A new data dir that `keel migrate` initialised (it must succeed), and
/// what that migrate printed.
async fn migrated_dir() -> (tempfile::TempDir, std::path::PathBuf, Output) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    std::fs::create_dir(&data).expect("mkdir");
    let data_arg = data.to_str().expect("utf8");
    let out = run_keel(&["migrate", "--data-dir", data_arg], None, CLI_DEADLINE).await;
    assert!(
        out.status.success(),
        "keel migrate exited {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    (tmp, data, out)
}

/// `keel status | head -1`: a report whose reader went away ends quietly
/// (SIGPIPE, as `cat` does), not with a panic and a backtrace on stderr.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_into_a_closed_pipe_ends_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let (_tmp, data, _) = migrated_dir().await;
    let data_arg = data.to_str().expect("utf8");
    for args in [
        vec!["status", "--data-dir", data_arg],
        vec!["status", "--json", "--data-dir", data_arg],
        vec!["sessions", "list", "--data-dir", data_arg],
    ] {
        // The read end is closed before keel starts: its first write fails.
        let (reader, writer) = std::io::pipe().expect("pipe");
        drop(reader);
        // std's `output()` keeps the stdout given (tokio's replaces it).
        let out = std::process::Command::new(common::keel_bin())
            .args(&args)
            .stdout(writer)
            .stderr(std::process::Stdio::piped())
            .output()
            .expect("run keel");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "keel {args:?}: {stderr}");
        assert!(!stderr.contains("Broken pipe"), "keel {args:?}: {stderr}");
        assert_eq!(
            out.status.signal(),
            Some(libc::SIGPIPE),
            "keel {args:?} ended {} ({stderr})",
            out.status
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_on_fresh_dir_prints_the_schema_version() {
    let (_tmp, data, out) = migrated_dir().await;
    let data_arg = data.to_str().expect("utf8");
    let conn = common::open_db(&data.join("keel.db"));
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .expect("user_version");
    assert!(version > 0, "schema version {version} after migrate");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let printed = stdout
        .split(|c: char| !c.is_ascii_digit())
        .any(|w| w == version.to_string());
    assert!(
        printed,
        "migrate did not print schema version {version}: {stdout:?}"
    );

    // Migrating again is a no-op that still reports the same version.
    let again = run_keel(&["migrate", "--data-dir", data_arg], None, CLI_DEADLINE).await;
    assert!(again.status.success());
    assert!(String::from_utf8_lossy(&again.stdout).contains(&version.to_string()));
}

/// Runs `keel run --stdin` on `data` with `input` piped in; asserts exit 0 at EOF.
async fn run_stdin(data: &str, input: &str) -> String {
    let listen = format!("127.0.0.1:{}", free_port());
    let out = run_keel(
        &["run", "--stdin", "--data-dir", data, "--listen", &listen],
        Some(input.as_bytes()),
        CLI_DEADLINE,
    )
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "keel run --stdin exited {} at EOF; stdout {stdout:?}; stderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_stdin_remember_then_recall_prints_the_value_and_exits_at_eof() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    std::fs::create_dir(&data).expect("mkdir");
    let data = data.to_str().expect("utf8");
    let stdout = run_stdin(data, "/remember color blue\n/recall color\n").await;
    assert!(stdout.contains("blue"), "no `blue` on stdout: {stdout:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_stdin_recall_finds_a_value_remembered_in_an_earlier_run() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    std::fs::create_dir(&data).expect("mkdir");
    let data = data.to_str().expect("utf8");
    run_stdin(data, "/remember flavour pistachio\n").await;
    // This run never sees the value in its input: it can only come from the store.
    let stdout = run_stdin(data, "/recall flavour\n").await;
    assert!(
        stdout.contains("pistachio"),
        "recall after restart: {stdout:?}"
    );
}

/// Send one line over the `keel chat` socket and read its ack (or error).
async fn socket_line(path: &std::path::Path, id: &str) -> std::io::Result<Value> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let stream = tokio::net::UnixStream::connect(path).await?;
    let (read, mut write) = stream.into_split();
    let line = serde_json::json!({"text": "/help", "id": id}).to_string() + "\n";
    write.write_all(line.as_bytes()).await?;
    // The reply may overtake the ack on the same connection: read to the ack.
    let mut lines = BufReader::new(read).lines();
    while let Some(answer) = lines.next_line().await? {
        let v: Value = serde_json::from_str(&answer).map_err(std::io::Error::other)?;
        if v.get("ack").is_some() || v.get("error").is_some() {
            return Ok(v);
        }
    }
    Err(std::io::Error::other("closed before the ack"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_socket_listener_is_supervised_and_rebinds_after_its_file_vanished() {
    let mut d = Daemon::new(Config::default(), None);
    let text = d.config.to_toml()
        + "\n[adapters]\nbackoff_initial_ms = 50\nbackoff_max_ms = 400\nattempts = 10\nseed = 1\n";
    d.write_config_text(&text);
    d.boot().await;
    let socket = d.data_dir.join("keel.sock");
    let first = socket_line(&socket, "sock-1")
        .await
        .expect("chat over socket");
    assert_eq!(first["ack"], "accepted", "{first}");
    // Someone removes the socket file: `keel chat` could never connect again
    // although the listener still runs. The supervisor binds a new one.
    std::fs::remove_file(&socket).expect("remove socket");
    assert!(
        d.wait_for_log("was removed or replaced", 1, CLI_DEADLINE)
            .await
    );
    let again = common::poll_until(CLI_DEADLINE, || async {
        socket_line(&socket, "sock-2").await.ok()
    })
    .await
    .expect("socket bound again");
    assert_eq!(again["ack"], "accepted", "{again}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let out = d.status_json().await;
    let v = json_stdout("status", &out);
    let cli = &v["adapters"]["cli"];
    assert_eq!(cli["state"], "running", "{v}");
    assert!(
        cli["last_error"]
            .as_str()
            .unwrap_or("")
            .contains("removed or replaced"),
        "{v}"
    );
    let metrics = d.get("/metrics").await.unwrap().body;
    assert!(metrics.contains(r#"keel_adapter_state{adapter="cli",state="running"} 1"#));
    d.assert_no_panics();
}

// `keel chat` waits for the ack and the reply of each line before the next
// one; the reply may arrive before the ack, and several lines in a row must
// all be answered (a reply-before-ack used to leave the client waiting).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_answers_every_line_of_a_piped_conversation() {
    let d = Daemon::start(common::Config::default()).await;
    let data = d.data_dir.to_string_lossy().into_owned();
    for round in 0..20 {
        let out = run_keel(
            &[
                "chat",
                "--data-dir",
                &data,
                "--chat",
                &format!("pipe{round}"),
            ],
            Some(b"/remember color blue\n/recall color\n/history 1\n/timers\n"),
            Duration::from_secs(25),
        )
        .await;
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "round {round}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        for want in [
            "Remembered color.",
            "color: blue",
            "#4 assistant: color: blue",
            "No active timers",
        ] {
            assert!(
                stdout.contains(want),
                "round {round}: no {want:?} in:\n{stdout}"
            );
        }
    }
}
