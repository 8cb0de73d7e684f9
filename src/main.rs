//! The `keel` binary: the process boundary. Parses the command line, loads
//! config, owns signals, the data-dir lock, logging and exit codes; all the
//! actual work lives in the `keel_actors` library.

mod chat;
mod cli;
mod commands;
mod config;
mod notify;
mod progress;
mod run;
mod services_cmd;
mod signals;
mod tasks_cmd;
mod telemetry;
mod timers_cmd;
mod timers_preview;
mod vault;
mod vault_cmd;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    keel_actors::persistence::tune_sqlite();
    let args = cli::Cli::parse();
    if args.command.is_report() {
        quiet_on_closed_stdout();
    }
    match commands::dispatch(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("keel: error: {}", one_line(&e));
            ExitCode::from(1)
        }
    }
}

/// A report piped into a reader that stopped reading (`keel status | head
/// -3`) ends the way `cat` does, killed by SIGPIPE with nothing on stderr,
/// instead of a panic from `println!` (Rust ignores SIGPIPE, so the write
/// fails with EPIPE). Only for the report commands (`Command::is_report`):
/// the daemon, `chat` and the commands that talk to keel's sockets or
/// write stores keep SIGPIPE ignored and see EPIPE as an error.
fn quiet_on_closed_stdout() {
    // SAFETY: signal(2) with SIG_DFL, before any other thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// An error and its causes on one line (`a: b: c`), for stderr.
pub fn one_line(e: &anyhow::Error) -> String {
    format!("{e:#}").replace('\n', " ")
}
