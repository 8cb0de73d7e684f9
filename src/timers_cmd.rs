//! `keel timers list|show ID|cancel ID`: the operator's view of durable
//! timers. `list` and `show` read the store read-only (safe while keel runs);
//! `cancel` writes, and keel has one writer, so it takes the data-dir lock
//! like `keel migrate` and refuses while the daemon runs (use `/cancel ID`
//! in the chat then). `preview` touches no store (`timers_preview.rs`).

use std::process::ExitCode;

use anyhow::{bail, Result};
use keel_actors::clock::{Clock, WallClock};
use keel_actors::persistence::portable::timers;
use keel_actors::persistence::timers::{show_instant, TimerRow};
use serde_json::json;

use crate::cli::TimersCmd;

pub fn timers_cmd(cmd: TimersCmd) -> Result<ExitCode> {
    match cmd {
        TimersCmd::List { dir, json: as_json } => {
            let mut store = crate::commands::open_store_ro(&dir)?;
            let rows = store
                .read(|db| timers::list_timers(db, 10_000))
                .map_err(crate::commands::no_table("timers"))?;
            crate::commands::print_rows(&rows, as_json, "timers", "no timers", line);
            Ok(ExitCode::SUCCESS)
        }
        TimersCmd::Show {
            id,
            dir,
            json: as_json,
        } => {
            let mut store = crate::commands::open_store_ro(&dir)?;
            let Some(t) = store
                .read(|db| timers::get_timer(db, id))
                .map_err(crate::commands::no_table("timers"))?
            else {
                eprintln!("keel: error: no timer {id}");
                return Ok(ExitCode::from(2));
            };
            if as_json {
                println!("{}", json!(t));
            } else {
                println!("{}", line(&t));
                println!("  callback {} {}", t.callback, t.params_json.escape_debug());
                println!(
                    "  misfire {}  fired {}  missed {}  last fired {:?}",
                    t.misfire, t.fired_count, t.missed_count, t.last_fired
                );
                if let Some(e) = &t.error {
                    println!("  error {}", e.escape_debug());
                }
                println!("  created {}  updated {}", t.created_at, t.updated_at);
            }
            Ok(ExitCode::SUCCESS)
        }
        TimersCmd::Preview(args) => crate::timers_preview::preview(&args),
        TimersCmd::Cancel { id, dir } => {
            let config = crate::config::load(&dir, None)?;
            // A shared store takes writes from every instance: cancel there
            // directly, instances running or not (a running one drops the
            // timer at its next window read).
            let _lock = if crate::vault::is_shared(&config) {
                None
            } else {
                if let Some(pid) = crate::run::running_pid(&config.data_dir) {
                    bail!("keel is running (pid {pid}); cancel in the chat with /cancel {id}, or stop keel first");
                }
                Some(crate::run::lock_data_dir(&config.data_dir)?)
            };
            let cancelled = crate::commands::Store::open_rw(&config, crate::vault::Create::Never)?
                .write(|db| timers::cancel_timer(db, &WallClock.stamp(), id))?;
            if cancelled {
                println!("timer {id} cancelled");
                Ok(ExitCode::SUCCESS)
            } else {
                eprintln!("keel: error: no active timer {id}");
                Ok(ExitCode::from(2))
            }
        }
    }
}

fn line(t: &TimerRow) -> String {
    let tz = keel_actors::schedule::parse_tz(&t.timezone).unwrap_or_default();
    let next = t
        .next_run
        .map(|n| show_instant(n, tz))
        .unwrap_or_else(|| "-".into());
    format!(
        "#{}\t{}\t{}\t{} {}\tnext {}\t{}",
        t.id,
        t.state,
        t.session_id.escape_debug(),
        t.kind,
        t.schedule.escape_debug(),
        next,
        t.timezone
    )
}
