//! `keel chat`: a line-based client for the CLI adapter's Unix socket.
//!
//! At connect it subscribes to its chat (`{"hello": true}`), so reminders,
//! task and owner notices are printed the moment they arrive, also while
//! the prompt waits. Every reply shown is confirmed (`{"received": N}`);
//! keel marks it sent only then, so a reply due while no client runs, or
//! one that arrives as the client exits, is shown by the next `keel chat`.
//! Each line typed is sent with a fresh id; the prompt returns once keel has
//! stored the message (R1) and its reply has arrived (or 30 s passed).

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::ExitCode;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::{json, Value};

use crate::cli::ChatArgs;

/// How long the prompt waits for the ack and the reply of a typed line.
const REPLY_WAIT: Duration = Duration::from_secs(30);

/// What the socket reader tells the prompt.
enum Event {
    Ack,
    Error(String),
    /// A reply was shown; to the message with this id, if any.
    Reply(Option<String>),
    Closed,
}

fn send_line(writer: &Mutex<UnixStream>, v: &Value) -> std::io::Result<()> {
    let mut w = writer.lock().unwrap_or_else(|p| p.into_inner());
    writeln!(w, "{v}")
}

/// Read keel's lines until the socket closes: show each reply once,
/// confirm it, and pass acks and errors to the prompt.
fn read_socket(
    reader: UnixStream,
    writer: Arc<Mutex<UnixStream>>,
    events: mpsc::Sender<Event>,
    interactive: bool,
) {
    let mut reader = BufReader::new(reader);
    let mut shown: HashSet<i64> = HashSet::new();
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => {
                let _ = events.send(Event::Closed);
                return;
            }
            Ok(_) => {}
        }
        let v: Value = serde_json::from_str(line.trim()).unwrap_or(Value::Null);
        if let Some(text) = v.get("reply").and_then(Value::as_str) {
            let id = v.get("reply_id").and_then(Value::as_i64);
            // A reply seen before (its confirmation was lost) is confirmed
            // again but not shown twice.
            if id.is_none_or(|id| shown.insert(id)) {
                if interactive {
                    print!("\r");
                }
                println!("{text}");
                let _ = std::io::stdout().flush();
            }
            if let Some(id) = id {
                let _ = send_line(&writer, &json!({ "received": id }));
            }
            let to = v.get("in_reply_to").and_then(Value::as_str);
            let _ = events.send(Event::Reply(to.map(str::to_string)));
        } else if v.get("ack").is_some() {
            let _ = events.send(Event::Ack);
        } else if let Some(err) = v.get("error").and_then(Value::as_str) {
            let _ = events.send(Event::Error(err.to_string()));
        }
    }
}

pub fn chat(args: ChatArgs) -> Result<ExitCode> {
    let config = crate::config::load(&args.dir, None)?;
    let socket = args.socket.clone().unwrap_or_else(|| config.cli_socket());
    let stream = UnixStream::connect(&socket).with_context(|| {
        format!(
            "cannot connect to {} (is `keel run` running with this --data-dir?)",
            socket.display()
        )
    })?;
    let reader = stream.try_clone()?;
    let writer = Arc::new(Mutex::new(stream));
    let interactive = atty_stdin();
    let (tx, events) = mpsc::channel();
    send_line(&writer, &json!({"hello": true, "chat": args.chat}))?;
    {
        let writer = writer.clone();
        std::thread::spawn(move || read_socket(reader, writer, tx, interactive));
    }
    let stdin = std::io::stdin();
    let mut n = 0u64;
    loop {
        if interactive {
            print!("> ");
            std::io::stdout().flush()?;
        }
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            break;
        }
        let text = line.trim_end_matches(['\n', '\r']);
        if text.trim().is_empty() {
            continue;
        }
        n += 1;
        let id = format!(
            "chat-{}-{:016x}-{n}",
            std::process::id(),
            rand::random::<u64>()
        );
        send_line(&writer, &json!({"chat": args.chat, "id": id, "text": text}))?;
        // Wait for both the ack and the reply to this message; the reply may
        // come first (the outbox can send it before the ack line is written).
        let (mut acked, mut replied) = (false, false);
        while !(acked && replied) {
            match events.recv_timeout(REPLY_WAIT) {
                Ok(Event::Ack) => acked = true,
                Ok(Event::Reply(to)) => replied |= to.as_deref() == Some(id.as_str()),
                Ok(Event::Error(e)) => {
                    eprintln!("error: {e}");
                    break;
                }
                Ok(Event::Closed) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                    anyhow::bail!("keel closed the connection")
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    eprintln!("(no reply yet; it will be shown when it arrives)");
                    break;
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn atty_stdin() -> bool {
    // SAFETY: isatty only inspects a file descriptor.
    unsafe { libc::isatty(0) == 1 }
}
