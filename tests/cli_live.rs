//! The CLI channel delivers as people expect (issue 7, §3b):
//! - `keel chat` prints a reminder the moment it fires, while the prompt
//!   waits and nothing is typed;
//! - a CLI reply counts as sent only once a connected client confirmed it:
//!   a reminder due while no client runs stays unsent, a client that leaves
//!   without confirming does not make it sent, and the next client that
//!   subscribes gets it at once.

// Tests drive real processes in real time: clippy.toml's clock and env rules are for keel itself.
#![allow(clippy::disallowed_methods)]

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::{poll_until, Config, Daemon, Turn};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

/// How long a reminder may take to show up.
const DEADLINE: Duration = Duration::from_secs(30);

/// A raw socket client speaking the `keel chat` protocol.
struct Client {
    lines: tokio::io::Lines<BufReader<OwnedReadHalf>>,
    write: OwnedWriteHalf,
}

impl Client {
    async fn connect(d: &Daemon) -> Client {
        let stream = UnixStream::connect(d.data_dir.join("keel.sock"))
            .await
            .expect("connect to the cli socket");
        let (read, write) = stream.into_split();
        Client {
            lines: BufReader::new(read).lines(),
            write,
        }
    }

    async fn send(&mut self, v: Value) {
        let line = v.to_string() + "\n";
        self.write
            .write_all(line.as_bytes())
            .await
            .expect("write to the socket");
    }

    /// The next line that has `key`, within the deadline.
    async fn next_with(&mut self, key: &str) -> Value {
        let found = tokio::time::timeout(DEADLINE, async {
            while let Some(line) = self.lines.next_line().await.expect("read the socket") {
                let v: Value = serde_json::from_str(&line).expect("keel sends JSON lines");
                if v.get(key).is_some() {
                    return Some(v);
                }
            }
            None
        })
        .await;
        match found {
            Ok(Some(v)) => v,
            Ok(None) => panic!("socket closed before a {key:?} line"),
            Err(_) => panic!("no {key:?} line within {DEADLINE:?}"),
        }
    }
}

/// The reminder's turn in `cli:<chat>` (a system turn starting with ⏰).
async fn reminder_turn(d: &Daemon, chat: &str) -> Option<Turn> {
    let session = format!("cli:{chat}");
    if !d.session_ids().await.contains(&session) {
        return None;
    }
    d.turns(&session)
        .await
        .into_iter()
        .find(|t| t.role == "system" && t.text.contains("Reminder #"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keel_chat_prints_a_reminder_while_the_prompt_waits() {
    let d = Daemon::start(Config::default()).await;
    let mut child = tokio::process::Command::new(common::keel_bin())
        .args(["chat", "--chat", "live", "--data-dir"])
        .arg(&d.data_dir)
        .arg("--config")
        .arg(&d.config_path)
        .env_remove("KEEL_CONFIG")
        .env_remove("KEEL_DATA_DIR")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn keel chat");
    let mut stdin = child.stdin.take().expect("stdin");
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout")).lines();
    stdin
        .write_all(b"/remind in 2s tea time\n")
        .await
        .expect("type");
    // Nothing more is typed; stdin stays open (the prompt waits).
    let seen = tokio::time::timeout(DEADLINE, async {
        let mut all = Vec::new();
        while let Some(line) = stdout.next_line().await.expect("read stdout") {
            let done = line.contains("Reminder #") && line.contains("tea time");
            all.push(line);
            if done {
                return all;
            }
        }
        panic!("keel chat exited before the reminder: {all:?}");
    })
    .await
    .expect("the reminder was not printed while the prompt waited");
    assert!(
        seen.iter().any(|l| l.contains("Reminder #1 set")),
        "the /remind reply came first: {seen:?}"
    );
    // The client confirmed it: the reminder turn is sent.
    let sent = poll_until(DEADLINE, || async {
        reminder_turn(&d, "live")
            .await
            .filter(|t| t.sent == Some(true))
    })
    .await;
    assert!(sent.is_some(), "the shown reminder is not marked sent");
    drop(stdin);
    let status = tokio::time::timeout(DEADLINE, child.wait())
        .await
        .expect("keel chat exits at EOF")
        .expect("wait");
    assert!(status.success(), "{status}");
    d.assert_no_panics();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_is_sent_only_once_a_client_confirmed_it() {
    let d = Daemon::start(Config::default()).await;
    // Set a reminder, then leave before it fires.
    let mut c = Client::connect(&d).await;
    c.send(json!({"chat": "away", "id": "r1", "text": "/remind in 1s stretch"}))
        .await;
    let ack = c.next_with("ack").await;
    assert_eq!(ack["ack"], "accepted", "{ack}");
    let set = c.next_with("reply").await;
    let set_id = set["reply_id"].as_i64().expect("reply_id");
    c.send(json!({ "received": set_id })).await;
    drop(c);

    // It fires with nobody connected: stored, not sent.
    let fired = poll_until(DEADLINE, || async { reminder_turn(&d, "away").await }).await;
    let fired = fired.expect("the reminder fired");
    assert_eq!(fired.sent, Some(false), "sent with no client: {fired:?}");

    // A client that sees it but leaves without confirming changes nothing.
    let mut quiet = Client::connect(&d).await;
    quiet.send(json!({"hello": true, "chat": "away"})).await;
    let first = quiet.next_with("reply").await;
    assert!(
        first["reply"].as_str().unwrap_or("").contains("stretch"),
        "{first}"
    );
    drop(quiet);
    let still = reminder_turn(&d, "away").await.expect("turn");
    assert_eq!(still.sent, Some(false), "{still:?}");

    // The next client gets it at once (no backoff wait) and confirms it.
    let mut next = Client::connect(&d).await;
    next.send(json!({"hello": true, "chat": "away"})).await;
    let again = next.next_with("reply").await;
    assert_eq!(
        again["reply_id"], first["reply_id"],
        "the same reply, by id"
    );
    next.send(json!({ "received": again["reply_id"] })).await;
    let sent = poll_until(DEADLINE, || async {
        reminder_turn(&d, "away")
            .await
            .filter(|t| t.sent == Some(true))
    })
    .await;
    assert!(sent.is_some(), "confirmed but not marked sent");

    // Bad protocol lines get one-line errors.
    for bad in [
        json!({"hello": true, "text": "x"}),
        json!({"received": 1, "text": "x"}),
        json!({"received": "one"}),
    ] {
        next.send(bad.clone()).await;
        let err = next.next_with("error").await;
        assert!(
            err["error"].as_str().is_some_and(|e| !e.contains('\n')),
            "{bad} -> {err}"
        );
    }
    d.assert_no_panics();
}
