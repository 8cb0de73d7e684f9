//! What firing one due timer does: a pure plan from (schedule, policy, due,
//! now) to the instants to fire, the instants missed and the next due
//! instant. The store applies the plan in the fire transaction.

use chrono_tz::Tz;
use serde::{Deserialize, Serialize};

use super::{next_after, Schedule, ScheduleError};

/// A fire this much after its due instant counts as late (misfire rules
/// apply); closer than this is a normal, on-time fire.
pub const LATE_AFTER_MS: i64 = 2_000;
/// `fire_all` fires at most this many missed instants at once.
pub const FIRE_ALL_CAP: usize = 100;
/// Counting missed instants stops here (the count is then a lower bound).
const COUNT_CAP: usize = 10_000;

/// What to do with due instants that passed while keel was down or behind
/// (R10).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Misfire {
    /// Fire once, marked late; further missed instants are counted as missed.
    FireOnce,
    /// Fire nothing; go to the next instant after now; count the missed ones.
    Skip,
    /// Fire every missed instant (at most `FIRE_ALL_CAP`).
    FireAll,
}

impl Misfire {
    pub fn as_str(self) -> &'static str {
        match self {
            Misfire::FireOnce => "fire_once",
            Misfire::Skip => "skip",
            Misfire::FireAll => "fire_all",
        }
    }

    pub fn parse(s: &str) -> Option<Misfire> {
        match s {
            "fire_once" => Some(Misfire::FireOnce),
            "skip" => Some(Misfire::Skip),
            "fire_all" => Some(Misfire::FireAll),
            _ => None,
        }
    }
}

/// The outcome of one fire decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Due instants to fire now (each gets a receipt), oldest first.
    pub fires: Vec<i64>,
    /// Due instants that will never fire (skipped, coalesced or too old).
    pub missed: i64,
    /// The next due instant; `None`: the timer is done.
    pub next: Option<i64>,
}

/// Decide what happens when the timer due at `due` is handled at `now`.
/// `catchup_ms`: instants older than this are not fired, only counted.
pub fn plan_fire(
    schedule: &Schedule,
    tz: Tz,
    policy: Misfire,
    catchup_ms: i64,
    due: i64,
    now: i64,
) -> Result<Plan, ScheduleError> {
    let after = due.max(now);
    let next = next_after(schedule, tz, due, after)?;
    let late = now - due;
    if late <= LATE_AFTER_MS {
        return Ok(Plan {
            fires: vec![due],
            missed: 0,
            next,
        });
    }
    // Every due instant in [due, now], oldest first (bounded).
    let mut overdue = vec![due];
    let mut cursor = due;
    while overdue.len() < COUNT_CAP {
        match next_after(schedule, tz, due, cursor)? {
            Some(t) if t <= now => {
                overdue.push(t);
                cursor = t;
            }
            _ => break,
        }
    }
    let total = overdue.len() as i64;
    // Only instants inside the catch-up window may still fire.
    let fresh: Vec<i64> = overdue
        .into_iter()
        .filter(|t| now - t <= catchup_ms)
        .collect();
    let fires: Vec<i64> = match policy {
        Misfire::Skip => Vec::new(),
        Misfire::FireOnce => fresh.first().copied().into_iter().collect(),
        Misfire::FireAll => fresh.into_iter().take(FIRE_ALL_CAP).collect(),
    };
    Ok(Plan {
        missed: total - fires.len() as i64,
        fires,
        next,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 86_400_000;

    #[test]
    fn on_time_fires_once_and_moves_on() {
        let p = plan_fire(
            &Schedule::Interval(1_000),
            Tz::UTC,
            Misfire::Skip,
            DAY,
            10_000,
            10_005,
        )
        .unwrap();
        assert_eq!(
            p,
            Plan {
                fires: vec![10_000],
                missed: 0,
                next: Some(11_000)
            }
        );
        let p = plan_fire(
            &Schedule::Once,
            Tz::UTC,
            Misfire::FireOnce,
            DAY,
            10_000,
            10_000,
        )
        .unwrap();
        assert_eq!(
            p,
            Plan {
                fires: vec![10_000],
                missed: 0,
                next: None
            }
        );
    }

    #[test]
    fn each_policy_handles_twenty_missed_seconds() {
        let s = Schedule::Interval(1_000);
        let (due, now) = (100_000, 120_500);
        let once = plan_fire(&s, Tz::UTC, Misfire::FireOnce, DAY, due, now).unwrap();
        assert_eq!(
            once,
            Plan {
                fires: vec![100_000],
                missed: 20,
                next: Some(121_000)
            }
        );
        let skip = plan_fire(&s, Tz::UTC, Misfire::Skip, DAY, due, now).unwrap();
        assert_eq!(
            skip,
            Plan {
                fires: vec![],
                missed: 21,
                next: Some(121_000)
            }
        );
        let all = plan_fire(&s, Tz::UTC, Misfire::FireAll, DAY, due, now).unwrap();
        assert_eq!(all.fires.len(), 21);
        assert_eq!(all.missed, 0);
    }

    #[test]
    fn fire_all_is_capped_and_the_catchup_window_limits_fires() {
        let s = Schedule::Interval(1_000);
        let all = plan_fire(&s, Tz::UTC, Misfire::FireAll, DAY, 0, 500_000).unwrap();
        assert_eq!(all.fires.len(), FIRE_ALL_CAP);
        assert_eq!(all.missed, 501 - FIRE_ALL_CAP as i64);
        // A one-shot overdue beyond the window is counted, not fired.
        let old = plan_fire(
            &Schedule::Once,
            Tz::UTC,
            Misfire::FireOnce,
            10_000,
            0,
            60_000,
        )
        .unwrap();
        assert_eq!(
            old,
            Plan {
                fires: vec![],
                missed: 1,
                next: None
            }
        );
    }

    #[test]
    fn a_one_shot_fires_late_once() {
        let p = plan_fire(&Schedule::Once, Tz::UTC, Misfire::FireOnce, DAY, 0, 20_000).unwrap();
        assert_eq!(
            p,
            Plan {
                fires: vec![0],
                missed: 0,
                next: None
            }
        );
    }
}
