//! Schedules: parsing what a participant typed and computing due instants.
//!
//! Everything here is pure (no clock, no I/O) so it is table-tested. Instants
//! are unix milliseconds UTC; local times are interpreted in an IANA zone
//! from the compiled-in `chrono-tz` database (a zone is a name, never a path).
//!
//! DST rule (documented in ARCHITECTURE.md): a local time inside the
//! spring-forward gap fires at the first valid instant after the gap; a local
//! time inside the fall-back fold fires once, at its first (earlier)
//! occurrence. Intervals are absolute durations and ignore DST.

pub mod plan;

use std::str::FromStr;

use chrono::{DateTime, LocalResult, NaiveDate, NaiveDateTime, NaiveTime, TimeZone, Timelike, Utc};
use chrono_tz::Tz;

/// A schedule as the participant asked for it, before it meets a timezone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScheduleSpec {
    /// `in 10m`: milliseconds after creation.
    Delay(i64),
    /// `at 2026-12-01 09:00`: a local wall-clock instant.
    At(NaiveDateTime),
    /// `every 2h`: a fixed period in milliseconds.
    Every(i64),
    /// `every day at 09:00` or `cron "…"`: a validated cron expression.
    Cron(String),
}

/// A schedule resolved for storage: `kind` and `schedule` columns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Schedule {
    Once,
    Cron(String),
    Interval(i64),
}

impl Schedule {
    /// The `kind` column.
    pub fn kind(&self) -> &'static str {
        match self {
            Schedule::Once => "once",
            Schedule::Cron(_) => "cron",
            Schedule::Interval(_) => "interval",
        }
    }

    /// Rebuild from the `kind` and `schedule` columns.
    pub fn from_row(kind: &str, schedule: &str) -> Result<Schedule, ScheduleError> {
        match kind {
            "once" => Ok(Schedule::Once),
            "cron" => {
                parse_cron(schedule)?;
                Ok(Schedule::Cron(schedule.to_string()))
            }
            "interval" => match schedule.parse::<i64>() {
                Ok(ms) if ms >= MIN_INTERVAL_MS => Ok(Schedule::Interval(ms)),
                _ => Err(ScheduleError(format!("bad interval {schedule:?}"))),
            },
            other => Err(ScheduleError(format!("unknown timer kind {other:?}"))),
        }
    }
}

/// Why a schedule was refused: one line, shown to the participant.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ScheduleError(pub String);

fn err(msg: impl Into<String>) -> ScheduleError {
    ScheduleError(msg.into())
}

/// Shortest delay and interval accepted (a reminder storm guard).
pub const MIN_INTERVAL_MS: i64 = 1_000;
/// Longest delay accepted: about 100 years.
pub const MAX_DELAY_MS: i64 = 100 * 366 * 86_400_000;
/// Longest input we even look at.
const MAX_INPUT: usize = 200;

/// `2s`, `10m`, `1h30m`, `3d`, `1w`: a sum of number+unit parts.
pub fn parse_duration(s: &str) -> Result<i64, ScheduleError> {
    let usage = || {
        err(format!(
            "cannot read the duration {:?}: use e.g. 2s, 10m, 1h30m, 3d",
            short(s)
        ))
    };
    if s.is_empty() || s.len() > 32 {
        return Err(usage());
    }
    let mut total: i64 = 0;
    let mut digits = String::new();
    for c in s.chars() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let unit: i64 = match c {
            's' => 1_000,
            'm' => 60_000,
            'h' => 3_600_000,
            'd' => 86_400_000,
            'w' => 7 * 86_400_000,
            _ => return Err(usage()),
        };
        if digits.is_empty() {
            return Err(usage());
        }
        let n: i64 = digits.parse().map_err(|_| usage())?;
        total = n
            .checked_mul(unit)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(|| err("that duration is too long"))?;
        digits.clear();
    }
    if !digits.is_empty() {
        return Err(usage());
    }
    if total < MIN_INTERVAL_MS {
        return Err(err("the shortest duration is 1s"));
    }
    if total > MAX_DELAY_MS {
        return Err(err("that duration is too long (at most 100 years)"));
    }
    Ok(total)
}

/// `2026-12-01 09:00` or `2026-12-01 09:00:30` (local, no zone suffix).
pub fn parse_instant(s: &str) -> Result<NaiveDateTime, ScheduleError> {
    let bad = || {
        err(format!(
            "cannot read the date {:?}: use YYYY-MM-DD HH:MM",
            short(s)
        ))
    };
    if !s.is_ascii() || s.len() > 19 {
        return Err(bad());
    }
    let (date, time) = s.split_once(' ').ok_or_else(bad)?;
    let d = parse_date(date).ok_or_else(bad)?;
    let t = parse_time(time).ok_or_else(bad)?;
    Ok(d.and_time(t))
}

fn parse_date(s: &str) -> Option<NaiveDate> {
    let mut parts = s.split('-');
    let (y, m, d) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || y.len() != 4 || m.len() != 2 || d.len() != 2 {
        return None;
    }
    NaiveDate::from_ymd_opt(num(y)? as i32, num(m)?, num(d)?)
}

/// `HH:MM` or `HH:MM:SS`, 24-hour, no leap seconds.
pub fn parse_time(s: &str) -> Option<NaiveTime> {
    let parts: Vec<&str> = s.split(':').collect();
    if !(2..=3).contains(&parts.len()) || parts.iter().any(|p| p.len() != 2) {
        return None;
    }
    let sec = if parts.len() == 3 { num(parts[2])? } else { 0 };
    if sec > 59 {
        return None;
    }
    NaiveTime::from_hms_opt(num(parts[0])?, num(parts[1])?, sec)
}

fn num(s: &str) -> Option<u32> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Validate a cron expression: 5 fields (minute precision) or 6 (seconds
/// first). Nicknames like `@reboot` are refused; `@daily` & co. are fine.
pub fn parse_cron(expr: &str) -> Result<croner::Cron, ScheduleError> {
    if expr.len() > MAX_INPUT || !expr.is_ascii() {
        return Err(err(
            "a cron expression uses ASCII digits, names and * , - / only",
        ));
    }
    let fields = expr.split_whitespace().count();
    if !expr.starts_with('@') && !(5..=6).contains(&fields) {
        return Err(err(format!(
            "a cron expression has 5 or 6 fields, this one has {fields}"
        )));
    }
    if has_zero_step(expr) {
        return Err(err("a cron step of 0 never advances"));
    }
    croner::Cron::new(expr)
        .with_seconds_optional()
        .parse()
        .map_err(|e| err(format!("invalid cron expression {:?}: {e}", short(expr))))
}

fn has_zero_step(expr: &str) -> bool {
    expr.split(|c: char| c.is_whitespace() || c == ',')
        .filter_map(|part| part.split_once('/'))
        .any(|(_, step)| step.trim_start_matches('0').is_empty())
}

/// A timezone by IANA name. Unknown names get the closest known name.
pub fn parse_tz(name: &str) -> Result<Tz, ScheduleError> {
    let name = name.trim();
    if name.is_empty() {
        return Err(err("give a timezone name, e.g. Europe/Berlin"));
    }
    if name.len() > 64 || !name.is_ascii() {
        return Err(err("that is not a timezone name (e.g. Europe/Berlin)"));
    }
    if let Ok(tz) = Tz::from_str(name) {
        return Ok(tz);
    }
    let mut best: Option<(usize, &str)> = None;
    for tz in chrono_tz::TZ_VARIANTS.iter() {
        let d = edit_distance(&name.to_ascii_lowercase(), &tz.name().to_ascii_lowercase());
        if best.is_none_or(|(bd, _)| d < bd) {
            best = Some((d, tz.name()));
        }
    }
    match best {
        Some((d, s)) if d <= 4 => Err(err(format!(
            "unknown timezone {:?}; did you mean {s}?",
            short(name)
        ))),
        _ => Err(err(format!(
            "unknown timezone {:?}: use an IANA name such as Europe/Berlin",
            short(name)
        ))),
    }
}

/// Levenshtein distance over bytes (names are ASCII).
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for (i, ca) in a.iter().enumerate() {
        cur[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

fn short(s: &str) -> String {
    match s.char_indices().nth(40) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

/// Map a local wall-clock time to an instant by the DST rule above.
pub fn local_to_utc(tz: Tz, local: NaiveDateTime) -> Result<i64, ScheduleError> {
    match tz.from_local_datetime(&local) {
        LocalResult::Single(t) => Ok(t.timestamp_millis()),
        LocalResult::Ambiguous(first, _) => Ok(first.timestamp_millis()),
        LocalResult::None => {
            // Inside the gap: walk forward minute by minute (gaps are < 1 day).
            let mut probe = local;
            for _ in 0..(24 * 60) {
                probe += chrono::Duration::minutes(1);
                let p = probe
                    .with_second(0)
                    .and_then(|p| p.with_nanosecond(0))
                    .unwrap_or(probe);
                if let Some(t) = tz.from_local_datetime(&p).earliest() {
                    return Ok(t.timestamp_millis());
                }
            }
            Err(err("that local time does not exist in this timezone"))
        }
    }
}

/// The first due instant of a new timer created at `now` (ms) in `tz`.
pub fn first_run(spec: &ScheduleSpec, tz: Tz, now: i64) -> Result<(Schedule, i64), ScheduleError> {
    match spec {
        ScheduleSpec::Delay(ms) => Ok((Schedule::Once, now.saturating_add(*ms))),
        ScheduleSpec::At(local) => {
            let at = local_to_utc(tz, *local)?;
            if at <= now {
                return Err(err("that time is in the past"));
            }
            Ok((Schedule::Once, at))
        }
        ScheduleSpec::Every(ms) => Ok((Schedule::Interval(*ms), now.saturating_add(*ms))),
        ScheduleSpec::Cron(expr) => {
            let s = Schedule::Cron(expr.clone());
            let next =
                next_after(&s, tz, now, now)?.ok_or_else(|| err("that schedule never fires"))?;
            Ok((s, next))
        }
    }
}

/// The first due instant strictly after `after` (ms); `None` for a one-shot.
/// `anchor` is an earlier due instant of the same timer (intervals stay on
/// their grid: anchor + k·period).
pub fn next_after(
    schedule: &Schedule,
    tz: Tz,
    anchor: i64,
    after: i64,
) -> Result<Option<i64>, ScheduleError> {
    match schedule {
        Schedule::Once => Ok(None),
        Schedule::Interval(period) => {
            let period = (*period).max(MIN_INTERVAL_MS);
            if after < anchor {
                return Ok(Some(anchor));
            }
            let k = (after - anchor) / period + 1;
            Ok(k.checked_mul(period).and_then(|v| v.checked_add(anchor)))
        }
        Schedule::Cron(expr) => {
            let cron = parse_cron(expr)?;
            let start: DateTime<Tz> = match Utc.timestamp_millis_opt(after) {
                LocalResult::Single(t) => t.with_timezone(&tz),
                _ => return Err(err("instant out of range")),
            };
            // Whole seconds: cron matches at second precision.
            let start = start.with_nanosecond(0).unwrap_or(start);
            let next = cron
                .find_next_occurrence(&start, false)
                .map_err(|_| err("that schedule never fires"))?;
            let ms = next.timestamp_millis();
            if ms <= after {
                // Defensive: never go backwards (e.g. a fold edge case).
                return next_after(schedule, tz, anchor, after + 1_000);
            }
            Ok(Some(ms))
        }
    }
}

/// `every day at 09:00` → the equivalent 5-field cron expression.
pub fn daily_at(t: NaiveTime) -> String {
    if t.second() == 0 {
        format!("{} {} * * *", t.minute(), t.hour())
    } else {
        format!("{} {} {} * * *", t.second(), t.minute(), t.hour())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(tz: Tz, s: &str) -> i64 {
        let local = NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S").unwrap();
        tz.from_local_datetime(&local)
            .earliest()
            .unwrap()
            .timestamp_millis()
    }

    fn utc(s: &str) -> i64 {
        ms(Tz::UTC, s)
    }

    fn show(tz: Tz, t: i64) -> String {
        Utc.timestamp_millis_opt(t)
            .unwrap()
            .with_timezone(&tz)
            .format("%Y-%m-%d %H:%M:%S %Z")
            .to_string()
    }

    fn cron_next(expr: &str, tz: Tz, after: i64) -> String {
        let s = Schedule::Cron(expr.to_string());
        show(tz, next_after(&s, tz, after, after).unwrap().unwrap())
    }

    #[test]
    fn durations_parse_and_bad_ones_are_refused() {
        assert_eq!(parse_duration("2s"), Ok(2_000));
        assert_eq!(parse_duration("10m"), Ok(600_000));
        assert_eq!(parse_duration("1h30m"), Ok(5_400_000));
        assert_eq!(parse_duration("3d"), Ok(259_200_000));
        for bad in [
            "",
            "0s",
            "10",
            "m",
            "1x",
            "-5m",
            "1.5h",
            "١٠m",
            "99999999999999999999d",
            "200y",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad} must be refused");
        }
    }

    #[test]
    fn instants_parse_and_impossible_dates_are_refused() {
        assert!(parse_instant("2026-12-01 09:00").is_ok());
        assert!(parse_instant("2024-02-29 12:00").is_ok(), "leap day");
        for bad in [
            "2024-02-30 09:00",
            "2023-02-29 09:00",
            "2026-12-01 23:59:60",
            "2026-12-01 24:00",
            "10000-01-01 00:00",
            "2026-12-01",
            "2026-1-1 9:00",
            "２０２６-12-01 09:00",
            "9223372036854775807",
        ] {
            assert!(parse_instant(bad).is_err(), "{bad} must be refused");
        }
    }

    #[test]
    fn daily_9am_stays_9am_local_across_dst_in_new_york_and_berlin() {
        for (zone, before, after) in [
            (
                "America/New_York",
                "2026-03-07 12:00:00",
                "2026-03-09 09:00:00 EDT",
            ),
            (
                "Europe/Berlin",
                "2026-03-28 12:00:00",
                "2026-03-30 09:00:00 CEST",
            ),
        ] {
            let tz = parse_tz(zone).unwrap();
            let from = ms(tz, before);
            let s = Schedule::Cron(daily_at(NaiveTime::from_hms_opt(9, 0, 0).unwrap()));
            let first = next_after(&s, tz, from, from).unwrap().unwrap();
            let second = next_after(&s, tz, first, first).unwrap().unwrap();
            assert_eq!(show(tz, second), after, "{zone}");
        }
    }

    #[test]
    fn a_time_in_the_spring_gap_fires_at_the_first_instant_after_it() {
        // New York 2026-03-08 02:00 → 03:00; Berlin 2026-03-29 02:00 → 03:00.
        let ny = parse_tz("America/New_York").unwrap();
        let from = ms(ny, "2026-03-08 00:00:00");
        assert_eq!(cron_next("30 2 * * *", ny, from), "2026-03-08 03:00:00 EDT");
        let be = parse_tz("Europe/Berlin").unwrap();
        let from = ms(be, "2026-03-29 00:00:00");
        assert_eq!(
            cron_next("30 2 * * *", be, from),
            "2026-03-29 03:00:00 CEST"
        );
        // A one-shot instant in the gap follows the same rule.
        let local = parse_instant("2026-03-29 02:30").unwrap();
        assert_eq!(
            show(be, local_to_utc(be, local).unwrap()),
            "2026-03-29 03:00:00 CEST"
        );
    }

    #[test]
    fn a_time_in_the_fall_fold_fires_once_at_the_first_occurrence() {
        // New York 2026-11-01 02:00 EDT → 01:00 EST; Berlin 2026-10-25 03:00 → 02:00.
        for (zone, day, hm, first, next_day) in [
            (
                "America/New_York",
                "2026-11-01 00:00:00",
                "30 1 * * *",
                "2026-11-01 01:30:00 EDT",
                "2026-11-02 01:30:00 EST",
            ),
            (
                "Europe/Berlin",
                "2026-10-25 00:00:00",
                "30 2 * * *",
                "2026-10-25 02:30:00 CEST",
                "2026-10-26 02:30:00 CET",
            ),
        ] {
            let tz = parse_tz(zone).unwrap();
            let s = Schedule::Cron(hm.to_string());
            let from = ms(tz, day);
            let a = next_after(&s, tz, from, from).unwrap().unwrap();
            assert_eq!(show(tz, a), first, "{zone}");
            let b = next_after(&s, tz, a, a).unwrap().unwrap();
            assert_eq!(
                show(tz, b),
                next_day,
                "{zone}: the repeated hour must not fire twice"
            );
        }
    }

    #[test]
    fn end_of_month_leap_day_and_seconds() {
        let tz = Tz::UTC;
        assert_eq!(
            cron_next("0 12 31 * *", tz, utc("2026-04-01 00:00:00")),
            "2026-05-31 12:00:00 UTC"
        );
        assert_eq!(
            cron_next("0 0 29 2 *", tz, utc("2025-03-01 00:00:00")),
            "2028-02-29 00:00:00 UTC"
        );
        assert_eq!(
            cron_next("*/15 * * * * *", tz, utc("2026-01-01 00:00:07")),
            "2026-01-01 00:00:15 UTC"
        );
        assert_eq!(
            cron_next("0 9 * * MON", tz, utc("2026-11-25 00:00:00")),
            "2026-11-30 09:00:00 UTC"
        );
    }

    #[test]
    fn invalid_and_never_firing_cron_expressions_are_refused() {
        for bad in [
            "*/0 * * * *",
            "60 * * * *",
            "1-0 * * * *",
            "0 0 0 0 0 0 0 0",
            "* * * *",
            "@reboot",
            "١ * * * *",
            "99999999999999999999 * * * *",
            "",
        ] {
            assert!(parse_cron(bad).is_err(), "{bad:?} must be refused");
        }
        let never = ScheduleSpec::Cron("0 0 31 2 *".into());
        let e = first_run(&never, Tz::UTC, utc("2026-01-01 00:00:00")).unwrap_err();
        assert!(e.0.contains("never fires"), "{e}");
    }

    #[test]
    fn intervals_stay_on_their_grid() {
        let s = Schedule::Interval(1_000);
        assert_eq!(
            next_after(&s, Tz::UTC, 10_000, 10_000).unwrap(),
            Some(11_000)
        );
        assert_eq!(
            next_after(&s, Tz::UTC, 10_000, 15_500).unwrap(),
            Some(16_000)
        );
        assert_eq!(next_after(&Schedule::Once, Tz::UTC, 1, 1).unwrap(), None);
    }

    #[test]
    fn timezones_are_names_with_suggestions_never_paths() {
        assert!(parse_tz("Europe/Berlin").is_ok());
        let e = parse_tz("America/New_Yrok").unwrap_err();
        assert!(e.0.contains("did you mean America/New_York"), "{e}");
        for bad in [
            "../../etc/passwd",
            ":/etc/localtime",
            "/etc/localtime",
            "",
            "Ẹurope/Berlin",
        ] {
            assert!(parse_tz(bad).is_err(), "{bad:?}");
        }
        assert!(parse_tz(&"A".repeat(10_000)).is_err());
    }

    #[test]
    fn past_instants_are_refused() {
        let at = ScheduleSpec::At(parse_instant("2020-01-01 00:00").unwrap());
        assert!(first_run(&at, Tz::UTC, utc("2026-01-01 00:00:00")).is_err());
    }
}
