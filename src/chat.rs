//! `keel chat`: a line-based client for the CLI adapter's Unix socket.
//! Each line typed is sent with a fresh id; the prompt returns once keel has
//! stored the message (R1) and its reply has arrived (or 30 s passed).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::{json, Value};

use crate::cli::ChatArgs;

pub fn chat(args: ChatArgs) -> Result<ExitCode> {
    let config = crate::config::load(&args.dir, None)?;
    let socket = args.socket.clone().unwrap_or_else(|| config.cli_socket());
    let stream = UnixStream::connect(&socket).with_context(|| {
        format!(
            "cannot connect to {} (is `keel run` running with this --data-dir?)",
            socket.display()
        )
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    let stdin = std::io::stdin();
    let interactive = atty_stdin();
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
        let req = json!({"chat": args.chat, "id": id, "text": text});
        writeln!(writer, "{req}")?;
        // Wait for both the ack and the reply to this message; the reply may
        // come first (the outbox can send it before the ack line is written).
        let (mut acked, mut replied) = (false, false);
        loop {
            let mut resp = String::new();
            match reader.read_line(&mut resp) {
                Ok(0) => anyhow::bail!("keel closed the connection"),
                Ok(_) => {}
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut =>
                {
                    eprintln!("(no reply yet; it will be shown when it arrives)");
                    break;
                }
                Err(e) => return Err(e.into()),
            }
            let v: Value = serde_json::from_str(resp.trim()).unwrap_or(Value::Null);
            if let Some(err) = v.get("error").and_then(Value::as_str) {
                eprintln!("error: {err}");
                break;
            }
            if v.get("ack").is_some() {
                acked = true;
            } else if let Some(reply) = v.get("reply").and_then(Value::as_str) {
                println!("{reply}");
                replied |= v.get("in_reply_to").and_then(Value::as_str) == Some(id.as_str());
            }
            if acked && replied {
                break;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn atty_stdin() -> bool {
    // SAFETY: isatty only inspects a file descriptor.
    unsafe { libc::isatty(0) == 1 }
}
