#![allow(clippy::disallowed_methods)]
//! Progress on long work (issue 15) through the real binary: `keel
//! sessions export`, `keel restore` and `keel migrate --encrypt` on a large
//! store show one line rewritten with `\r` on stderr when it is a terminal
//! (run under `script`, a real pseudo-terminal), at least two distinct
//! percentages ending at 100% and a newline; with stderr a pipe nothing of
//! it appears; and stdout (the command's result) is the same either way.
//! (`keel backup`'s own test is in tests/vault_access.rs.)

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use common::{run_keel_env, Config, Daemon};

const DEADLINE: Duration = Duration::from_secs(60);

fn dir_args_of(data_dir: &Path, config: &Path) -> Vec<String> {
    vec![
        "--data-dir".into(),
        data_dir.display().to_string(),
        "--config".into(),
        config.display().to_string(),
    ]
}

/// `keel ARGS --data-dir … --config …` with stderr (and stdout) a pipe.
async fn piped(data_dir: &Path, config: &Path, args: &[&str]) -> std::process::Output {
    let extra = dir_args_of(data_dir, config);
    let mut all: Vec<&str> = args.to_vec();
    all.extend(extra.iter().map(String::as_str));
    run_keel_env(&all, &[], None, DEADLINE).await
}

/// `keel ARGS …` on a pseudo-terminal (`script -qec`): everything the
/// terminal showed (stdout and stderr, `\n` as `\r\n`).
async fn on_terminal(data_dir: &Path, config: &Path, args: &[&str]) -> String {
    let cmd = format!(
        "{} {} {}",
        common::keel_bin(),
        args.join(" "),
        dir_args_of(data_dir, config).join(" ")
    );
    let run = tokio::process::Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .env_remove("KEEL_DATA_DIR")
        .env_remove("KEEL_CONFIG")
        .env_remove("KEEL_MASTER_KEY")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(DEADLINE, run)
        .await
        .expect("keel under script timed out")
        .expect("run script (bsdutils)");
    let shown = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "keel {args:?} on a terminal: {shown}");
    shown
}

/// The percentages of every `LABEL: N% (… UNIT)` the terminal showed, in
/// order, after checking that the line was rewritten in place and ended.
fn percentages(shown: &str, label: &str, unit: &str) -> Vec<u64> {
    let prefix = format!("{label}: ");
    let seen: Vec<u64> = shown
        .split(['\r', '\n'])
        .filter_map(|l| l.strip_prefix(prefix.as_str()))
        .map(|l| {
            let (pct, rest) = l.split_once("% (").unwrap_or_else(|| panic!("{l:?}"));
            assert!(rest.trim_end().ends_with(&format!(" {unit})")), "{l:?}");
            pct.parse().unwrap_or_else(|_| panic!("{l:?}"))
        })
        .collect();
    let distinct: BTreeSet<_> = seen.iter().collect();
    assert!(distinct.len() >= 2, "one percentage only: {shown:?}");
    assert_eq!(seen.last(), Some(&100), "{shown:?}");
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
    assert!(
        shown.contains(&format!("\r{prefix}")),
        "not rewritten: {shown:?}"
    );
    assert!(
        shown.contains("100% (") && shown.contains(&format!("{unit})\r\n")),
        "no newline after 100%: {shown:?}"
    );
    seen
}

/// The terminal's text with the progress line's states removed: what the
/// command printed besides it (its stdout), in `\n` lines.
fn without_progress(shown: &str, label: &str) -> String {
    let prefix = format!("{label}: ");
    shown
        .replace("\r\n", "\n")
        .split('\n')
        .map(|l| {
            l.split('\r')
                .filter(|part| !part.is_empty() && !part.starts_with(prefix.as_str()))
                .collect::<Vec<_>>()
                .join("")
        })
        .filter(|l| !l.is_empty())
        .map(|l| format!("{l}\n"))
        .collect()
}

/// `sessions` chats of one ~60 KB message each: a store of more than
/// 8 MiB with more than 100 sessions.
async fn fill(d: &Daemon, sessions: usize) {
    for i in 0..sessions {
        let text = format!("{i:04} {}", "large-store-".repeat(5_000));
        d.post_ok(&format!("big{i}"), &format!("big{i}"), &text)
            .await;
    }
    let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    let (db, wal) = (d.data_dir.join("keel.db"), d.data_dir.join("keel.db-wal"));
    assert!(
        size(&db) + size(&wal) > 8 * 1024 * 1024,
        "store too small: {} + {}",
        size(&db),
        size(&wal)
    );
}

fn assert_quiet(out: &std::process::Output, what: &str) {
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains('%') && !stderr.contains('\r'),
        "{what} showed progress into a pipe: {stderr:?}"
    );
}

/// `keel sessions export` (while keel runs) and `keel restore` (keel
/// stopped) of a store of 150 sessions and ~10 MB: progress on a terminal
/// only, and the same result printed either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_and_restore_show_progress_on_a_terminal_only() {
    let mut d = Daemon::start(Config::default()).await;
    fill(&d, 150).await;
    let (dir, config) = (d.data_dir.clone(), d.config_path.clone());

    // sessions export: rows, one per session file written.
    let out_t = d.root().join("export-t");
    let shown = on_terminal(
        &dir,
        &config,
        &["sessions", "export", &out_t.display().to_string()],
    )
    .await;
    percentages(&shown, "exporting sessions", "rows");
    assert!(shown.contains("(150 of 150 rows)"), "{shown:?}");
    let out_p = d.root().join("export-p");
    let out = piped(
        &dir,
        &config,
        &["sessions", "export", &out_p.display().to_string()],
    )
    .await;
    assert_quiet(&out, "sessions export");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        without_progress(&shown, "exporting sessions"),
        stdout.replace("export-p", "export-t"),
        "stdout differs on a terminal"
    );
    assert_eq!(std::fs::read_dir(&out_t).unwrap().count(), 150);
    assert_eq!(std::fs::read_dir(&out_p).unwrap().count(), 150);

    // restore: the backup copied into place, in bytes.
    let file = d.root().join("full.db");
    let file_s = file.display().to_string();
    assert!(piped(&dir, &config, &["backup", &file_s])
        .await
        .status
        .success());
    d.post_ok("after", "after", "after the backup").await;
    assert!(d.sigterm(DEADLINE).await.success());
    let shown = on_terminal(&dir, &config, &["restore", &file_s, "--force"]).await;
    percentages(&shown, "restoring keel.db", "MiB");
    let out = piped(&dir, &config, &["restore", &file_s, "--force"]).await;
    assert_quiet(&out, "restore");
    let stdout = String::from_utf8_lossy(&out.stdout);
    // The kept file's name carries the time of each restore.
    let tagless = |s: &str| -> String {
        s.lines()
            .map(|l| l.split(".replaced-").next().unwrap_or(l).to_string() + "\n")
            .collect()
    };
    assert_eq!(
        tagless(&without_progress(&shown, "restoring keel.db")),
        tagless(&stdout),
        "stdout differs on a terminal"
    );
    assert!(
        stdout.starts_with(&format!("restored {file_s} into ")),
        "{stdout}"
    );
    // The restored store is the backup: keel starts on it, the message
    // posted after the backup is gone, the large ones are there.
    d.restart().await;
    let ids = d.session_ids().await;
    assert!(!ids.iter().any(|id| id == "webhook:after"), "{ids:?}");
    assert_eq!(ids.len(), 150, "{ids:?}");
    let turns = d.turns("webhook:big149").await;
    assert!(
        turns
            .iter()
            .any(|t| t.text.starts_with("0149 large-store-")),
        "{} turns",
        turns.len()
    );
    assert!(d.sigterm(DEADLINE).await.success());
}

/// `keel migrate --encrypt` of a plain store of ~10 MB shows the copy's
/// progress on a terminal only; a copy of the same store migrated with
/// stderr a pipe prints the same result, and both open encrypted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_encrypt_shows_progress_on_a_terminal_only() {
    let plain = Config {
        extra: "[storage]\nencrypt = false\n".into(),
        ..Config::default()
    };
    let mut d = Daemon::start(plain).await;
    fill(&d, 150).await;
    assert!(d.sigterm(DEADLINE).await.success());
    // A second data dir holding the same store (keel stopped: no WAL left
    // that matters; every file is copied).
    let twin = d.root().join("twin");
    std::fs::create_dir_all(&twin).unwrap();
    for e in std::fs::read_dir(&d.data_dir).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), twin.join(e.file_name())).unwrap();
        }
    }
    let config = d.config_path.clone();

    let shown = on_terminal(&d.data_dir, &config, &["migrate", "--encrypt"]).await;
    percentages(&shown, "encrypting keel.db", "MiB");
    let out = piped(&twin, &config, &["migrate", "--encrypt"]).await;
    assert_quiet(&out, "migrate --encrypt");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("is now encrypted ("), "{stdout}");
    assert_eq!(
        without_progress(&shown, "encrypting keel.db"),
        stdout.replace(
            &twin.display().to_string(),
            &d.data_dir.display().to_string()
        ),
        "stdout differs on a terminal"
    );
    // Both stores are encrypted now and open with the key.
    for dir in [&d.data_dir, &twin] {
        let db = std::fs::read(dir.join("keel.db")).unwrap();
        assert!(
            !db.starts_with(b"SQLite format 3\0"),
            "{} still plain",
            dir.display()
        );
    }
    d.write_config_text(&Config::default().to_toml());
    d.restart().await;
    let turns = d.turns("webhook:big149").await;
    assert!(
        turns
            .iter()
            .any(|t| t.text.starts_with("0149 large-store-")),
        "{} turns",
        turns.len()
    );
    assert!(d.sigterm(DEADLINE).await.success());
}

/// A container engine that accepts connections and never answers: every
/// request keel makes waits for its `request_timeout_ms`.
fn hung_engine(dir: &Path) -> (std::path::PathBuf, tokio::task::JoinHandle<()>) {
    let socket = dir.join("hung-docker.sock");
    let listener = tokio::net::UnixListener::bind(&socket).unwrap();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    (socket, task)
}

/// The seconds of every `keel: still recovering: STEP (N s)` line, with
/// the step named.
fn recovering_lines(shown: &str) -> Vec<(String, u64)> {
    shown
        .split(['\r', '\n'])
        .filter_map(|l| l.strip_prefix("keel: still recovering: "))
        .map(|l| {
            let (step, secs) = l.rsplit_once(" (").unwrap_or_else(|| panic!("{l:?}"));
            let secs = secs.strip_suffix(" s)").unwrap_or_else(|| panic!("{l:?}"));
            (
                step.to_string(),
                secs.parse().unwrap_or_else(|_| panic!("{l:?}")),
            )
        })
        .collect()
}

/// A start held up for seconds (the container engine never answers, so the
/// container recovery waits for its request timeouts) says on a terminal,
/// once a second after the first, which step it is in; started with
/// stderr into a file (the harness's log) it writes no such line; both
/// starts become ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_start_says_what_it_recovers_on_a_terminal_only() {
    let mut d = Daemon::new(Config::default(), None);
    let (socket, engine) = hung_engine(d.root());
    d.write_config_text(&format!(
        "{}\n[containers]\nenabled = true\ndocker_host = \"unix://{}\"\ninstance = \"slowstart\"\nreconcile_interval_s = 3600\nrequest_timeout_ms = 2500\n",
        d.config.to_toml(),
        socket.display()
    ));

    // stderr into a file: the log has no progress lines.
    let began = std::time::Instant::now();
    d.boot().await;
    assert!(
        began.elapsed() >= Duration::from_secs(2),
        "the start was not slow"
    );
    assert!(d.sigterm(DEADLINE).await.success());
    let log = d.stderr_all();
    assert!(!log.contains("still recovering"), "{log}");

    // On a terminal.
    let port = common::free_port();
    let cmd = d.run_command(port);
    let line: Vec<String> = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let run = tokio::process::Command::new("script")
        .args(["-qec", &line.join(" "), "/dev/null"])
        .env_remove("KEEL_DATA_DIR")
        .env_remove("KEEL_CONFIG")
        .env_remove("KEEL_LISTEN")
        .env_remove("KEEL_MASTER_KEY")
        .env("NO_COLOR", "1")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run script (bsdutils)");
    let began = std::time::Instant::now();
    let client = common::http_client();
    let url = format!("http://127.0.0.1:{port}/readyz");
    let ready = common::poll_until(DEADLINE, || {
        let (client, url) = (client.clone(), url.clone());
        async move {
            match client.get(&url).send().await {
                Ok(r) if r.status().is_success() => Some(()),
                _ => None,
            }
        }
    })
    .await;
    let took = began.elapsed();
    assert!(ready.is_some(), "keel on a terminal never became ready");
    // The pid in the data dir's lock file is keel's (script is its parent).
    let pid: i32 = std::fs::read_to_string(d.data_dir.join("keel.lock"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // Past the next whole second: a line after ready would show by now.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    // SAFETY: kill(2) on the keel process this test started.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let out = tokio::time::timeout(DEADLINE, run.wait_with_output())
        .await
        .expect("keel under script did not stop")
        .unwrap();
    let shown = String::from_utf8_lossy(&out.stdout).into_owned();
    engine.abort();
    let lines = recovering_lines(&shown);
    assert!(lines.len() >= 2, "{shown}");
    assert!(
        lines
            .iter()
            .any(|(step, _)| step == "recovering containers"),
        "{lines:?}"
    );
    let secs: Vec<u64> = lines.iter().map(|(_, s)| *s).collect();
    assert_eq!(secs, (1..=secs.len() as u64).collect::<Vec<_>>(), "{shown}");
    // Nothing after ready: the last line is from before it.
    assert!(
        *secs.last().unwrap() <= took.as_secs() + 1,
        "still recovering after ready ({took:?}): {shown}"
    );
    assert!(shown.contains("keel ready"), "{shown}");
}

/// A store of > 8 MiB: `keel backup` on a terminal shows its progress on
/// one line rewritten with `\r` (at least two percentages, ending at 100%
/// and a newline), while keel runs (the daemon copies and sends progress
/// over the admin socket) and while it is stopped (the CLI copies); without
/// a terminal stderr has no progress. The backup restores and verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_of_a_large_store_shows_progress_on_a_terminal_only() {
    let mut d = Daemon::start(Config::default()).await;
    fill(&d, 170).await;
    let (data, config) = (d.data_dir.clone(), d.config_path.clone());

    let running = d.root().join("running.db").display().to_string();
    let shown = on_terminal(&data, &config, &["backup", &running]).await;
    percentages(&shown, "backing up keel.db", "MiB");
    assert!(shown.contains("integrity checked"), "{shown:?}");

    // Not a terminal: no progress line at all.
    let out = piped(
        &data,
        &config,
        &["backup", &d.root().join("piped.db").display().to_string()],
    )
    .await;
    assert_quiet(&out, "backup");
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("backing up"),
        "{out:?}"
    );

    // keel stopped: the CLI copies, the same line.
    assert!(d.sigterm(DEADLINE).await.success());
    let stopped = d.root().join("stopped.db").display().to_string();
    let shown = on_terminal(&data, &config, &["backup", &stopped]).await;
    percentages(&shown, "backing up keel.db", "MiB");

    // The backup made while keel ran restores, and keel starts on it.
    let out = piped(&data, &config, &["restore", &running, "--force"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    d.restart().await;
    let turns = d.turns("webhook:big169").await;
    assert!(
        turns
            .iter()
            .any(|t| t.text.starts_with("0169 large-store-")),
        "{} turns",
        turns.len()
    );
    assert!(d.sigterm(DEADLINE).await.success());
}
