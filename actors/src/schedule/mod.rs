//! Schedules: parsing what a participant typed and computing due instants.
//!
//! Everything here is pure (no clock, no I/O) so it is table-tested. Instants
//! are unix milliseconds UTC; local times are interpreted in an IANA zone
//! from the compiled-in `chrono-tz` database (a zone is a name, never a path).
//!
//! DST rule (also in ARCHITECTURE.md and README.md). Cron schedules (and
//! `every day at`, stored as cron) are searched over real instants, the
//! local wall time of each instant matched against the fields:
//!
//! 1. An hour field that matches several hours (`*`, `*/2`, `1-3`, `1,13`)
//!    fires at every real instant whose wall time matches. The repeated
//!    fall-back hour fires twice: `*/15 * * * *` in America/New_York on
//!    2026-11-01 fires at …05:45Z, 06:00Z, 06:15Z… (01:45 EDT, 01:00 EST,
//!    01:15 EST), `0 * * * *` at 05:00Z and 06:00Z. Wall times inside the
//!    spring-forward gap never occur, so they do not fire.
//! 2. An hour field that matches exactly one hour (`30 1 * * *`,
//!    `*/20 1 * * *`, `@daily`, `every day at 01:30`) is a fixed-time
//!    schedule: a wall time that occurs twice fires once, at its first
//!    (earlier) occurrence. Only the hour field decides, so
//!    `*/20 1 * * *` fires at 01:00, 01:20 and 01:40 EDT on 2026-11-01 and
//!    not again in the repeated EST hour: "during the 1 o'clock hour" happens
//!    once a day, and the fall-back day gets the same three fires as any other.
//! 3. A fixed-time schedule whose wall time falls in the spring-forward gap
//!    fires once, at the first valid instant after the gap (`30 2 * * *` in
//!    New York on 2026-03-08 fires at 03:00 EDT), however many of its wall
//!    times the gap swallows.
//!
//! One-shot local times (`at …`) follow rules 2 and 3. Intervals are absolute
//! durations and ignore DST. `tests/data/cron/dst_reference.json` checks these
//! rules against croniter and a brute-force evaluation.

pub mod plan;

use std::str::FromStr;

use chrono::{
    DateTime, LocalResult, NaiveDate, NaiveDateTime, NaiveTime, Offset, TimeDelta, TimeZone,
    Timelike, Utc,
};
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
        Schedule::Cron(expr) => next_cron(&parse_cron(expr)?, tz, after).map(Some),
    }
}

/// Most wall-time candidates one cron search looks at that do not fire
/// (each is one gap or repeated hour skipped); croner itself gives up at
/// the year 5000, so this only bounds pathological zones.
const MAX_CRON_STEPS: usize = 1_000;

/// Does the hour field match exactly one hour of the day? Such a schedule
/// is fixed-time for the DST rule (rules 2 and 3 in the module doc).
pub fn has_fixed_hour(cron: &croner::Cron) -> bool {
    (0..24)
        .filter(|&h| cron.pattern.hour_match(h).unwrap_or(false))
        .count()
        == 1
}

/// The first instant strictly after `after` (ms) at which `cron` fires in
/// `tz`, by the DST rule in the module doc.
///
/// croner only ever sees wall times (as naive UTC, so it applies no DST rule
/// of its own); each matching wall time is then mapped to its real
/// instant(s). Wall times increase with real time except across a fold,
/// where the repeated stretch `[W+, W-)` is walked twice, so the search
/// keeps a real-instant cursor and, when the cursor sits in the first pass
/// of a fold, looks at the rest of the first pass, then the second pass,
/// before going on. Transitions are assumed to lie further apart than one
/// fold (true of every zone's DST changes).
fn next_cron(cron: &croner::Cron, tz: Tz, after: i64) -> Result<i64, ScheduleError> {
    let fixed = has_fixed_hour(cron);
    // Whole seconds: cron matches at second precision; a fire at a later
    // whole second is strictly after `after`.
    let mut cursor = instant(tz, after.div_euclid(1_000) * 1_000)?;
    let mut wall = cursor.naive_local();
    if let LocalResult::Ambiguous(early, late) = tz.from_local_datetime(&wall) {
        if cursor == early {
            // The cursor is in the first pass of a repeated stretch.
            let fold = fold_start(tz, early, late);
            // (A search that finds nothing here is settled by the loop below.)
            let next = next_wall(cron, wall, false).ok();
            if let Some(LocalResult::Ambiguous(e, _)) = next.map(|n| tz.from_local_datetime(&n)) {
                if e > cursor && e < fold {
                    return Ok(e.timestamp_millis());
                }
            }
            if !fixed {
                // Second pass: wall times from the fold's start up to `wall`.
                let m = next_wall(cron, fold.naive_local(), true).ok();
                if let Some(LocalResult::Ambiguous(_, l)) = m.map(|m| tz.from_local_datetime(&m)) {
                    if l >= fold && l <= late {
                        return Ok(l.timestamp_millis());
                    }
                }
            }
            // Nothing more in the fold: go on from `wall` on the second pass.
            cursor = late;
        }
    }
    let second = TimeDelta::seconds(1);
    for _ in 0..MAX_CRON_STEPS {
        let next = next_wall(cron, wall, false)?;
        match tz.from_local_datetime(&next) {
            LocalResult::Single(t) if t > cursor => return Ok(t.timestamp_millis()),
            LocalResult::Ambiguous(e, _) if e > cursor => return Ok(e.timestamp_millis()),
            LocalResult::Ambiguous(_, l) if !fixed && l > cursor => return Ok(l.timestamp_millis()),
            LocalResult::Ambiguous(e, l) => {
                // A fixed time's second occurrence: skip the repeated stretch.
                wall = (fold_start(tz, e, l) - second).naive_local().max(next);
            }
            LocalResult::None => match chrono_tz::GapInfo::new(&next, &tz).and_then(|g| g.end) {
                Some(end) if fixed && end > cursor => return Ok(end.timestamp_millis()),
                // A wildcard hour in the gap does not exist that day.
                Some(end) => wall = (end.naive_local() - second).max(next),
                None => wall = next,
            },
            // Defensive: a wall time behind the cursor never fires.
            LocalResult::Single(_) => wall = next,
        }
    }
    Err(err("that schedule never fires"))
}

/// The first matching wall time after `wall` (at or after it if
/// `inclusive`), as croner sees it: naive, no zone.
fn next_wall(
    cron: &croner::Cron,
    wall: NaiveDateTime,
    inclusive: bool,
) -> Result<NaiveDateTime, ScheduleError> {
    cron.find_next_occurrence(&wall.and_utc(), inclusive)
        .map(|t| t.naive_utc())
        .map_err(|_| err("that schedule never fires"))
}

/// `ms` as an instant in `tz`.
fn instant(tz: Tz, ms: i64) -> Result<DateTime<Tz>, ScheduleError> {
    match Utc.timestamp_millis_opt(ms) {
        LocalResult::Single(t) => Ok(t.with_timezone(&tz)),
        _ => Err(err("instant out of range")),
    }
}

/// The first instant of the second pass of the fold between the two
/// occurrences `early` and `late` of one wall time: a binary search on the
/// UTC offset (transitions fall on whole seconds).
fn fold_start(tz: Tz, early: DateTime<Tz>, late: DateTime<Tz>) -> DateTime<Tz> {
    let offset = |s: i64| {
        Utc.timestamp_opt(s, 0)
            .single()
            .map(|t| t.with_timezone(&tz).offset().fix())
    };
    let first = offset(early.timestamp());
    let (mut lo, mut hi) = (early.timestamp(), late.timestamp());
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if offset(mid) == first {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Utc.timestamp_opt(hi, 0)
        .single()
        .map(|t| t.with_timezone(&tz))
        .unwrap_or(late)
}

/// `every day at 09:00` → the equivalent 5-field cron expression.
pub fn daily_at(t: NaiveTime) -> String {
    if t.second() == 0 {
        format!("{} {} * * *", t.minute(), t.hour())
    } else {
        format!("{} {} {} * * *", t.second(), t.minute(), t.hour())
    }
}

/// The time of `every day at HH:MM` → its schedule (a cron expression).
pub fn parse_daily(time: &str) -> Result<ScheduleSpec, ScheduleError> {
    let t = parse_time(time).ok_or_else(|| {
        err(format!(
            "cannot read the time {:?}: use HH:MM (24-hour)",
            short(time)
        ))
    })?;
    Ok(ScheduleSpec::Cron(daily_at(t)))
}

/// Most instants [`upcoming`] lists.
pub const MAX_UPCOMING: usize = 1_000;

/// The first `count` (at most [`MAX_UPCOMING`]) due instants of a timer
/// created at `from` (ms) in `tz`, in order: the first by [`first_run`], each
/// next one by [`next_after`] from the previous, as the timer actor fires
/// them. Fewer when the schedule ends (a one-shot has one).
pub fn upcoming(
    spec: &ScheduleSpec,
    tz: Tz,
    from: i64,
    count: usize,
) -> Result<Vec<i64>, ScheduleError> {
    let count = count.min(MAX_UPCOMING);
    if count == 0 {
        return Ok(Vec::new());
    }
    let (schedule, first) = first_run(spec, tz, from)?;
    let mut out = Vec::with_capacity(count);
    let mut next = Some(first);
    while let Some(t) = next {
        out.push(t);
        if out.len() == count {
            break;
        }
        next = next_after(&schedule, tz, first, t)?;
    }
    Ok(out)
}

/// An RFC 3339 instant (`2026-11-01T05:30:00Z`, any offset) → unix ms.
pub fn parse_rfc3339(s: &str) -> Result<i64, ScheduleError> {
    let bad = || {
        err(format!(
            "cannot read the instant {:?}: use RFC 3339, e.g. 2026-11-01T05:30:00Z",
            short(s)
        ))
    };
    if s.len() > 64 {
        return Err(bad());
    }
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.timestamp_millis())
        .map_err(|_| bad())
}

/// The last instant RFC 3339 can write: 9999-12-31T23:59:59.999Z.
pub const MAX_RFC3339_MS: i64 = 253_402_300_799_999;

/// `ms` as RFC 3339 UTC (`2026-11-01T05:30:00Z`; milliseconds only when
/// there are some), the form `keel timers preview --json` prints.
pub fn rfc3339_utc(ms: i64) -> String {
    match Utc.timestamp_millis_opt(ms) {
        LocalResult::Single(t) => t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
        _ => ms.to_string(),
    }
}

/// `ms` as local time in `tz` with the zone's abbreviation and offset
/// (`2026-11-01 01:45:00 EDT (-04:00)`).
pub fn show_local(ms: i64, tz: Tz) -> String {
    match Utc.timestamp_millis_opt(ms) {
        LocalResult::Single(t) => t
            .with_timezone(&tz)
            .format("%Y-%m-%d %H:%M:%S%.f %Z (%:z)")
            .to_string(),
        _ => ms.to_string(),
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
    fn a_fixed_time_in_the_fall_fold_fires_once_at_the_first_occurrence() {
        // New York 2026-11-01 02:00 EDT → 01:00 EST; Berlin 2026-10-25 03:00 → 02:00.
        for (zone, day, expr, first, next_day) in [
            (
                "America/New_York",
                "2026-11-01 00:00:00",
                "30 1 * * *",
                "2026-11-01 01:30:00 EDT",
                "2026-11-02 01:30:00 EST",
            ),
            (
                "America/New_York",
                "2026-11-01 00:00:00",
                "15 30 1 * * *",
                "2026-11-01 01:30:15 EDT",
                "2026-11-02 01:30:15 EST",
            ),
            (
                "America/New_York",
                "2026-11-01 00:00:00",
                &daily_at(NaiveTime::from_hms_opt(1, 30, 0).unwrap()),
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
            let s = Schedule::Cron(expr.to_string());
            let from = ms(tz, day);
            let a = next_after(&s, tz, from, from).unwrap().unwrap();
            assert_eq!(show(tz, a), first, "{zone} {expr}");
            let b = next_after(&s, tz, a, a).unwrap().unwrap();
            assert_eq!(
                show(tz, b),
                next_day,
                "{zone} {expr}: the repeated hour must not fire twice"
            );
            // Asked from inside the repeated hour's second pass: tomorrow.
            let inside = a + 3_600_000 - 60_000;
            let c = next_after(&s, tz, inside, inside).unwrap().unwrap();
            assert_eq!(show(tz, c), next_day, "{zone} {expr} from the second pass");
        }
    }

    /// Fires of `expr` after `from` (UTC "YYYY-MM-DD HH:MM:SS[.mmm]"), as UTC `HH:MM:SS`.
    fn chain(expr: &str, tz: Tz, from: &str, n: usize) -> Vec<String> {
        let s = Schedule::Cron(expr.to_string());
        let from = NaiveDateTime::parse_from_str(from, "%Y-%m-%d %H:%M:%S%.f")
            .unwrap()
            .and_utc()
            .timestamp_millis();
        let mut t = from;
        (0..n)
            .map(|_| {
                let next = next_after(&s, tz, from, t).unwrap().unwrap();
                assert!(next > t, "{expr}: {next} is not after {t}");
                t = next;
                Utc.timestamp_millis_opt(t)
                    .unwrap()
                    .format("%H:%M:%S")
                    .to_string()
            })
            .collect()
    }

    #[test]
    fn wildcard_hours_fire_through_the_repeated_hour() {
        // New York falls back at 06:00Z on 2026-11-01: 01:00–01:59 local twice.
        let ny = parse_tz("America/New_York").unwrap();
        assert_eq!(
            chain("*/15 * * * *", ny, "2026-11-01 05:30:00", 6),
            ["05:45:00", "06:00:00", "06:15:00", "06:30:00", "06:45:00", "07:00:00"]
        );
        assert_eq!(
            chain("0 * * * *", ny, "2026-11-01 04:30:00", 3),
            ["05:00:00", "06:00:00", "07:00:00"]
        );
        // From anywhere in either pass, including a fraction of a second
        // before the fold and exactly at it.
        for (from, next) in [
            ("2026-11-01 05:59:59.500", "06:00:00"),
            ("2026-11-01 06:00:00", "06:15:00"),
            ("2026-11-01 06:07:00", "06:15:00"),
            ("2026-11-01 05:50:00", "06:00:00"),
        ] {
            assert_eq!(chain("*/15 * * * *", ny, from, 1), [next], "from {from}");
        }
        // Seconds precision across the fold.
        assert_eq!(
            chain("*/20 * * * * *", ny, "2026-11-01 05:59:30", 4),
            ["05:59:40", "06:00:00", "06:00:20", "06:00:40"]
        );
        // Berlin falls back at 01:00Z on 2026-10-25: 02:00–02:59 local twice.
        let be = parse_tz("Europe/Berlin").unwrap();
        assert_eq!(
            chain("30 * * * *", be, "2026-10-24 23:45:00", 3),
            ["00:30:00", "01:30:00", "02:30:00"]
        );
    }

    #[test]
    fn a_fixed_hour_with_wildcard_minutes_fires_in_the_first_pass_only() {
        // The hour field alone decides: `*/20 1` is "during the 1 o'clock
        // hour", which happens once a day, so the EST repeat does not fire.
        let ny = parse_tz("America/New_York").unwrap();
        let s = Schedule::Cron("*/20 1 * * *".into());
        let mut t = ms(ny, "2026-11-01 00:00:00");
        let mut got = Vec::new();
        for _ in 0..4 {
            t = next_after(&s, ny, t, t).unwrap().unwrap();
            got.push(show(ny, t));
        }
        assert_eq!(
            got,
            [
                "2026-11-01 01:00:00 EDT",
                "2026-11-01 01:20:00 EDT",
                "2026-11-01 01:40:00 EDT",
                "2026-11-02 01:00:00 EST",
            ]
        );
        // A range of hours is not fixed: both passes fire.
        assert_eq!(
            chain("*/20 1-3 * * *", ny, "2026-11-01 05:30:00", 4),
            ["05:40:00", "06:00:00", "06:20:00", "06:40:00"]
        );
    }

    #[test]
    fn the_hour_field_alone_decides_what_is_fixed_time() {
        for (expr, fixed) in [
            ("30 1 * * *", true),
            ("*/20 1 * * *", true),
            ("* 01 * * *", true),
            ("0 1-1 * * *", true),
            ("0 30 1 * * *", true),
            ("@daily", true),
            ("@weekly", true),
            ("0 1-3 * * *", false),
            ("0 1,13 * * *", false),
            ("0 */12 * * *", false),
            ("0 * * * *", false),
            ("@hourly", false),
        ] {
            assert_eq!(has_fixed_hour(&parse_cron(expr).unwrap()), fixed, "{expr}");
        }
    }

    #[test]
    fn a_wildcard_hour_in_the_spring_gap_does_not_fire_a_fixed_one_fires_once_after_it() {
        // Berlin springs forward at 01:00Z on 2026-03-29: no 02:15 that day.
        let be = parse_tz("Europe/Berlin").unwrap();
        assert_eq!(
            chain("15 * * * *", be, "2026-03-29 00:00:00", 3),
            ["00:15:00", "01:15:00", "02:15:00"]
        );
        // New York springs forward at 07:00Z on 2026-03-08: three wall
        // times of `*/20 2` fall in the gap, one fire at 03:00 EDT.
        let ny = parse_tz("America/New_York").unwrap();
        let s = Schedule::Cron("*/20 2 * * *".into());
        let a = next_after(&s, ny, 0, ms(ny, "2026-03-08 00:00:00"))
            .unwrap()
            .unwrap();
        assert_eq!(show(ny, a), "2026-03-08 03:00:00 EDT");
        let b = next_after(&s, ny, a, a).unwrap().unwrap();
        assert_eq!(show(ny, b), "2026-03-09 02:00:00 EDT");
    }

    /// Instants (ms) at which `tz`'s UTC offset changes during `year`, by an
    /// hourly scan (the hour before each change).
    fn transitions(tz: Tz, year: i32) -> Vec<i64> {
        const HOUR: i64 = 3_600_000;
        let offset = |t: i64| {
            Utc.timestamp_millis_opt(t)
                .unwrap()
                .with_timezone(&tz)
                .offset()
                .fix()
        };
        let mut t = utc(&format!("{year}-01-01 00:00:00"));
        let end = utc(&format!("{}-01-01 00:00:00", year + 1));
        let mut out = Vec::new();
        while t < end {
            if offset(t) != offset(t + HOUR) {
                out.push(t);
            }
            t += HOUR;
        }
        out
    }

    /// The DST rule evaluated the slow way, independent of `next_cron` (a
    /// port of tests/data/cron/generate.py): walk real instants one step
    /// (a minute, a second for 6 fields) at a time, match each one's wall
    /// time; for a fixed hour, skip a wall time's second occurrence and fire
    /// wall times swallowed by a gap at the first instant after it.
    fn brute_force(expr: &str, tz: Tz, from: i64, until: i64) -> Vec<i64> {
        let cron = parse_cron(expr).unwrap();
        let fixed = has_fixed_hour(&cron);
        let step = if expr.split_whitespace().count() == 6 {
            1_000
        } else {
            60_000
        };
        let delta = TimeDelta::milliseconds(step);
        let matches = |w: NaiveDateTime| cron.is_time_matching(&w.and_utc()).unwrap();
        let wall = |t: i64| {
            Utc.timestamp_millis_opt(t)
                .unwrap()
                .with_timezone(&tz)
                .naive_local()
        };
        let mut out = Vec::new();
        let mut t = from - from.rem_euclid(step) + step;
        let mut prev = wall(t - step);
        while t <= until {
            let w = wall(t);
            let repeat = matches!(tz.from_local_datetime(&w),
                LocalResult::Ambiguous(_, l) if l.timestamp_millis() == t);
            let mut fire = matches(w) && !(fixed && repeat);
            let mut skipped = prev + delta;
            while fixed && !fire && skipped < w {
                fire = matches(skipped);
                skipped += delta;
            }
            if fire {
                out.push(t);
            }
            prev = w;
            t += step;
        }
        out
    }

    /// `next_after` agrees with `brute_force` around `at`: the chain of
    /// fires, and the next fire asked from points all over the window.
    fn check_window(expr: &str, tz: Tz, at: i64, half: i64) {
        let (from, until) = (at - half, at + half);
        let want = brute_force(expr, tz, from, until);
        let s = Schedule::Cron(expr.to_string());
        let mut got = Vec::new();
        let mut t = from;
        while let Some(n) = next_after(&s, tz, from, t).unwrap() {
            assert!(n > t, "{expr} {tz}: went backwards at {t}");
            if n > until {
                break;
            }
            got.push(n);
            t = n;
        }
        // The first difference, not two long lists.
        let at_str = show(tz, at);
        let first_diff = (0..got.len().max(want.len())).find(|&i| got.get(i) != want.get(i));
        if let Some(i) = first_diff {
            let pick = |v: &[i64]| v.get(i).map(|&t| show(tz, t));
            panic!(
                "{expr} in {tz} around {at_str}: fire {i} is {:?}, the brute force says {:?}",
                pick(&got),
                pick(&want)
            );
        }
        // Start points: a prime stride, plus just around the change.
        let stride = (half / 97).max(1_000) + 7_001;
        let mut starts: Vec<i64> = (0..)
            .map(|k| from + k * stride)
            .take_while(|&p| p < until)
            .collect();
        starts.extend((-3..=3).map(|k| at + 3_600_000 + k * 500));
        for p in starts {
            let Some(&expected) = want.iter().find(|&&w| w > p) else {
                continue;
            };
            let n = next_after(&s, tz, p, p).unwrap().unwrap();
            assert_eq!(
                show(tz, n),
                show(tz, expected),
                "{expr} in {tz} after {}",
                show(tz, p)
            );
        }
    }

    #[test]
    fn next_after_matches_a_brute_force_walk_around_every_transition() {
        let five = [
            "*/15 * * * *",
            "0 * * * *",
            "15 * * * *",
            "30 1 * * *",
            "30 2 * * *",
            "10 2 * * *",
            "*/20 1 * * *",
            "*/20 2 * * *",
            "*/20 1-3 * * *",
            "0 0 * * *",
            "30 23 * * *",
            "45 0,1,2,3 * * *",
            "0 2 * * SUN",
            "*/7 0-4 * * *",
            "@daily",
        ];
        // Whole-hour and half-hour changes, changes at midnight (Santiago),
        // two-hour ones (Troll), a skipped day (Apia 2011) and a fold of 23
        // hours (Kwajalein 1969).
        for (zone, year) in [
            ("America/New_York", 2026),
            ("Europe/Berlin", 2026),
            ("Australia/Lord_Howe", 2026),
            ("America/St_Johns", 2026),
            ("America/Santiago", 2026),
            ("Antarctica/Troll", 2026),
            ("Pacific/Apia", 2011),
            ("Pacific/Kwajalein", 1969),
            ("Pacific/Kwajalein", 1993),
        ] {
            let tz = parse_tz(zone).unwrap();
            let changes = transitions(tz, year);
            assert!(!changes.is_empty(), "{zone} {year} has no changes");
            for &at in &changes {
                for expr in five {
                    check_window(expr, tz, at, 30 * 3_600_000);
                }
            }
        }
        for zone in ["America/New_York", "Europe/Berlin", "Antarctica/Troll"] {
            let tz = parse_tz(zone).unwrap();
            for at in transitions(tz, 2026) {
                for expr in [
                    "*/20 * * * * *",
                    "10 */20 1 * * *",
                    "30 30 1 * * *",
                    "0 0 2 * * *",
                ] {
                    check_window(expr, tz, at, 3 * 3_600_000);
                }
            }
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
    fn upcoming_lists_what_a_timer_created_then_would_fire() {
        let from = parse_rfc3339("2026-11-01T05:30:00Z").unwrap();
        let ny = parse_tz("America/New_York").unwrap();
        let utc_of = |v: Vec<i64>| v.into_iter().map(rfc3339_utc).collect::<Vec<_>>();
        assert_eq!(
            utc_of(upcoming(&ScheduleSpec::Cron("0 * * * *".into()), ny, from, 3).unwrap()),
            [
                "2026-11-01T06:00:00Z",
                "2026-11-01T07:00:00Z",
                "2026-11-01T08:00:00Z"
            ]
        );
        // Intervals are anchored at `from`, milliseconds and all.
        assert_eq!(
            utc_of(upcoming(&ScheduleSpec::Every(5_400_000), ny, from + 250, 2).unwrap()),
            ["2026-11-01T07:00:00.250Z", "2026-11-01T08:30:00.250Z"]
        );
        // `every day at 01:30` through the fold: once, at the EDT occurrence.
        let daily = parse_daily("01:30").unwrap();
        let earlier = parse_rfc3339("2026-10-31T12:00:00-04:00").unwrap();
        assert_eq!(
            utc_of(upcoming(&daily, ny, earlier, 2).unwrap()),
            ["2026-11-01T05:30:00Z", "2026-11-02T06:30:00Z"]
        );
        // A one-shot has one instant; 0 asks for none; the count is capped.
        assert_eq!(
            upcoming(&ScheduleSpec::Delay(1_000), ny, from, 5).unwrap(),
            [from + 1_000]
        );
        assert!(upcoming(&ScheduleSpec::Every(1_000), ny, from, 0)
            .unwrap()
            .is_empty());
        assert_eq!(
            upcoming(&ScheduleSpec::Every(1_000), ny, from, usize::MAX)
                .unwrap()
                .len(),
            MAX_UPCOMING
        );
        let never = ScheduleSpec::Cron("0 0 31 2 *".into());
        assert!(upcoming(&never, ny, from, 3).is_err());
        for bad in ["", "25:00", "9am", "09:60", "09:00:61"] {
            assert!(parse_daily(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn instants_read_and_print_as_rfc3339_and_local_time() {
        let t = parse_rfc3339("2026-11-01T01:45:00-04:00").unwrap();
        assert_eq!(rfc3339_utc(t), "2026-11-01T05:45:00Z");
        let ny = parse_tz("America/New_York").unwrap();
        assert_eq!(show_local(t, ny), "2026-11-01 01:45:00 EDT (-04:00)");
        assert_eq!(
            show_local(t + 3_600_000, ny),
            "2026-11-01 01:45:00 EST (-05:00)"
        );
        assert_eq!(rfc3339_utc(MAX_RFC3339_MS), "9999-12-31T23:59:59.999Z");
        for bad in [
            "",
            "yesterday",
            "2026-13-01T00:00:00Z",
            "2026-11-01 05:30",
            "2026-11-01T05:30:00",
            &"9".repeat(100),
        ] {
            assert!(parse_rfc3339(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn past_instants_are_refused() {
        let at = ScheduleSpec::At(parse_instant("2020-01-01 00:00").unwrap());
        assert!(first_run(&at, Tz::UTC, utc("2026-01-01 00:00:00")).is_err());
    }
}
