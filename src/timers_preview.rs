//! `keel timers preview (--cron EXPR | --every DUR | --daily HH:MM) [--tz
//! ZONE] [--from RFC3339] [--count N] [--json]`: the next due instants of a
//! schedule, in UTC and local time, so an operator can check an expression
//! (and the DST rule) before a participant relies on it.
//!
//! It reads no data dir and needs no running keel. The schedule is read by
//! the parsers the chat's `/remind` uses and evaluated by
//! `schedule::upcoming`, the path a created timer takes, so what it prints
//! is what a timer created at `--from` would fire. Bad input is one line on
//! stderr and exit code 2.

use std::process::ExitCode;

use anyhow::Result;
use keel_actors::clock::{Clock, WallClock};
use keel_actors::schedule::{
    parse_cron, parse_daily, parse_duration, parse_rfc3339, parse_tz, rfc3339_utc, show_local,
    upcoming, ScheduleSpec, MAX_RFC3339_MS, MAX_UPCOMING,
};
use serde_json::json;

use crate::cli::PreviewArgs;

pub fn preview(args: &PreviewArgs) -> Result<ExitCode> {
    let next = match instants(args) {
        Ok(next) => next,
        Err(reason) => {
            eprintln!("keel: error: {reason}");
            return Ok(ExitCode::from(2));
        }
    };
    if args.json {
        let utc: Vec<&str> = next.iter().map(|(utc, _)| utc.as_str()).collect();
        println!("{}", json!({ "next": utc }));
    } else {
        for (utc, local) in &next {
            println!("{utc}  {local}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The instants to print (RFC 3339 UTC, local), or the one-line reason the
/// input is refused, naming the flag.
fn instants(args: &PreviewArgs) -> Result<Vec<(String, String)>, String> {
    let (flag, spec) = match (&args.cron, &args.every, &args.daily) {
        (Some(expr), None, None) => {
            let expr = expr.trim();
            parse_cron(expr).map_err(|e| format!("--cron: {e}"))?;
            ("--cron", ScheduleSpec::Cron(expr.to_string()))
        }
        (None, Some(d), None) => (
            "--every",
            ScheduleSpec::Every(parse_duration(d.trim()).map_err(|e| format!("--every: {e}"))?),
        ),
        (None, None, Some(t)) => (
            "--daily",
            parse_daily(t.trim()).map_err(|e| format!("--daily: {e}"))?,
        ),
        _ => return Err("give exactly one of --cron EXPR, --every DUR, --daily HH:MM".into()),
    };
    let tz = parse_tz(&args.tz).map_err(|e| format!("--tz: {e}"))?;
    let from = match &args.from {
        Some(s) => parse_rfc3339(s.trim()).map_err(|e| format!("--from: {e}"))?,
        None => WallClock.now_ms(),
    };
    let count = parse_count(&args.count)?;
    let next = upcoming(&spec, tz, from, count).map_err(|e| format!("{flag}: {e}"))?;
    if next.last().is_some_and(|&t| t > MAX_RFC3339_MS) {
        return Err(format!("{flag}: the instants run past the year 9999"));
    }
    Ok(next
        .into_iter()
        .map(|t| (rfc3339_utc(t), show_local(t, tz)))
        .collect())
}

fn parse_count(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n) if (1..=MAX_UPCOMING).contains(&n) => Ok(n),
        _ => Err(format!(
            "--count: give a whole number from 1 to {MAX_UPCOMING}, not {:?}",
            s.chars().take(40).collect::<String>()
        )),
    }
}
