//! Chat commands for timers (R12): `/remind`, `/timers`, `/cancel`, `/tz`.
//!
//! Parsing is pure and happens in the brain; anything malformed is answered
//! with a one-line error and nothing is stored. Valid commands become an
//! `Effect` that the store applies in the inbound turn's transaction (so a
//! redelivered message never creates a second timer) and that renders the
//! reply (the new timer's id, the list).

use std::sync::Arc;

use crate::brain::{BrainInput, Command, CommandBrain, Decision};
use crate::persistence::timers::{Effect, TaskParams, TimerRequest};
use crate::schedule::plan::Misfire;
use crate::schedule::{
    parse_cron, parse_daily, parse_duration, parse_instant, parse_tz, ScheduleSpec,
};

/// Longest reminder text, in characters.
pub const MAX_TEXT_CHARS: usize = 1_000;

/// Add the timer commands to a brain.
pub fn register(brain: &mut CommandBrain) {
    brain.register("remind", Arc::new(Remind));
    brain.register("timers", Arc::new(Timers));
    brain.register("cancel", Arc::new(Cancel));
    brain.register("tz", Arc::new(SetTz));
}

const REMIND_USAGE: &str = "Usage: /remind in 10m TEXT | at 2026-12-01 09:00 TEXT | every day at 09:00 TEXT | every 2h TEXT | cron \"0 9 * * MON\" TEXT (optionally --skip or --fire-all before TEXT)";

struct Remind;

impl Command for Remind {
    fn usage(&self) -> &'static str {
        "/remind in 10m|at 2026-12-01 09:00|every day at 09:00|every 2h|cron \"0 9 * * MON\" TEXT — a reminder in this chat"
    }

    fn run(&self, args: &str, _input: &BrainInput<'_>) -> Decision {
        match parse_remind(args) {
            Ok(req) => Decision::Act(Effect::CreateTimer(req)),
            Err(e) => Decision::say(e),
        }
    }
}

/// Split off the first whitespace-separated word.
fn word(s: &str) -> (&str, &str) {
    let s = s.trim_start();
    match s.split_once(char::is_whitespace) {
        Some((w, rest)) => (w, rest.trim_start()),
        None => (s, ""),
    }
}

/// Parse the arguments of `/remind`.
pub fn parse_remind(args: &str) -> Result<TimerRequest, String> {
    let (how, rest) = word(args);
    let (spec, rest) = match how {
        "in" => {
            let (d, rest) = word(rest);
            (
                ScheduleSpec::Delay(parse_duration(d).map_err(|e| e.0)?),
                rest,
            )
        }
        "at" => {
            let (date, rest) = word(rest);
            let (time, rest) = word(rest);
            let at = parse_instant(&format!("{date} {time}")).map_err(|e| e.0)?;
            (ScheduleSpec::At(at), rest)
        }
        "every" => {
            let (what, rest) = word(rest);
            if what == "day" {
                let (at, rest) = word(rest);
                let (time, rest) = word(rest);
                if at != "at" {
                    return Err("Usage: /remind every day at HH:MM TEXT".into());
                }
                (parse_daily(time).map_err(|e| e.0)?, rest)
            } else {
                (
                    ScheduleSpec::Every(parse_duration(what).map_err(|e| e.0)?),
                    rest,
                )
            }
        }
        "cron" => {
            let rest = rest.trim_start();
            let Some(body) = rest.strip_prefix('"') else {
                return Err(
                    "Usage: /remind cron \"0 9 * * MON\" TEXT (the expression in double quotes)"
                        .into(),
                );
            };
            let Some((expr, rest)) = body.split_once('"') else {
                return Err("the cron expression needs a closing double quote".into());
            };
            parse_cron(expr.trim()).map_err(|e| e.0)?;
            (
                ScheduleSpec::Cron(expr.trim().to_string()),
                rest.trim_start(),
            )
        }
        _ => return Err(REMIND_USAGE.into()),
    };
    let (flag, after_flag) = word(rest);
    let (misfire, text) = match flag {
        "--skip" => (Misfire::Skip, after_flag),
        "--fire-all" => (Misfire::FireAll, after_flag),
        "--fire-once" => (Misfire::FireOnce, after_flag),
        _ => (Misfire::FireOnce, rest),
    };
    let text = text.trim();
    if text.is_empty() {
        return Err(format!("What should I remind you of? {REMIND_USAGE}"));
    }
    if text.chars().count() > MAX_TEXT_CHARS {
        return Err(format!(
            "That reminder is too long (at most {MAX_TEXT_CHARS} characters)."
        ));
    }
    // `/remind every day at 07:00 /task run backup`: the timer runs a task.
    let task = match text.strip_prefix("/task run") {
        Some(rest) if rest.is_empty() || rest.starts_with(char::is_whitespace) => {
            let mut words = rest.split_whitespace();
            let Some(name) = words.next() else {
                return Err("Usage: /remind … /task run NAME [ARGS…]".into());
            };
            let args: Vec<serde_json::Value> = words.map(|w| w.to_string().into()).collect();
            Some(TaskParams {
                name: name.to_string(),
                args: if args.is_empty() {
                    serde_json::Value::Null
                } else {
                    serde_json::Value::Array(args)
                },
            })
        }
        _ => None,
    };
    Ok(TimerRequest {
        spec,
        text: text.to_string(),
        misfire,
        task,
    })
}

struct Timers;

impl Command for Timers {
    fn usage(&self) -> &'static str {
        "/timers — this chat's active timers"
    }

    fn run(&self, _args: &str, _input: &BrainInput<'_>) -> Decision {
        Decision::Act(Effect::ListTimers)
    }
}

struct Cancel;

impl Command for Cancel {
    fn usage(&self) -> &'static str {
        "/cancel ID — cancel one of this chat's timers"
    }

    fn run(&self, args: &str, _input: &BrainInput<'_>) -> Decision {
        let id = args.trim().trim_start_matches('#');
        match id.parse::<i64>() {
            Ok(id) if id > 0 => Decision::Act(Effect::CancelTimer(id)),
            _ => Decision::say("Usage: /cancel ID (a timer number from /timers)"),
        }
    }
}

struct SetTz;

impl Command for SetTz {
    fn usage(&self) -> &'static str {
        "/tz Europe/Berlin — your timezone for reminders (IANA name)"
    }

    fn run(&self, args: &str, _input: &BrainInput<'_>) -> Decision {
        match parse_tz(args) {
            Ok(tz) => Decision::Act(Effect::SetTimezone(tz.name().to_string())),
            Err(e) => Decision::say(format!("{e}.")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_documented_form_parses() {
        for (args, spec) in [
            ("in 10m tea", ScheduleSpec::Delay(600_000)),
            ("every 2h stretch", ScheduleSpec::Every(7_200_000)),
            (
                "every day at 09:00 standup",
                ScheduleSpec::Cron("0 9 * * *".into()),
            ),
            (
                "cron \"0 9 * * MON\" report",
                ScheduleSpec::Cron("0 9 * * MON".into()),
            ),
        ] {
            assert_eq!(parse_remind(args).unwrap().spec, spec, "{args}");
        }
        let at = parse_remind("at 2026-12-01 09:00 dentist").unwrap();
        assert_eq!(at.text, "dentist");
        let skip = parse_remind("every 1s --skip ping").unwrap();
        assert_eq!((skip.misfire, skip.text.as_str()), (Misfire::Skip, "ping"));
        assert_eq!(skip.task, None);
        let task = parse_remind("every day at 07:00 /task run backup --full").unwrap();
        let task = task.task.unwrap();
        assert_eq!(task.name, "backup");
        assert_eq!(task.argv().unwrap(), vec!["--full".to_string()]);
        assert!(parse_remind("in 1m /task run").is_err());
    }

    #[test]
    fn hostile_arguments_get_one_line_errors() {
        for bad in [
            "",
            "in",
            "in 10m",
            "in 0s x",
            "in ١٠m x",
            "at 2024-02-30 09:00 x",
            "at 2026-12-01 23:59:60 x",
            "at 10000-01-01 00:00 x",
            "every day at 25:00 x",
            "cron \"*/0 * * * *\" x",
            "cron \"@reboot\" x",
            "cron 0 9 * * MON x",
            "tomorrow x",
        ] {
            let e = parse_remind(bad).unwrap_err();
            assert!(!e.contains('\n') && !e.is_empty(), "{bad:?} → {e:?}");
        }
        assert!(parse_remind(&format!("in 1m {}", "x".repeat(1_001))).is_err());
    }
}
