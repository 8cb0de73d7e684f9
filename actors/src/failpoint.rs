//! Named kill points (TESTING.md C2) for `keel torture`, compiled in only
//! with the cargo feature `failpoints` (a test build). Without it [`hit`]
//! and [`armed`] are empty inline functions and [`ENABLED`] is false: a
//! release build carries no failpoint code.
//!
//! The binary arms points once at start from `KEEL_FAILPOINTS` ([`arm`]), a
//! comma-separated list of `NAME=N` (SIGKILL the process the N-th time the
//! point is reached), `NAME=N@MS` (the N-th time, a thread of its own
//! SIGKILLs the process MS milliseconds later: the kill lands *while* the
//! code after the point runs, e.g. mid-checkpoint) or `NAME=on` (a switch
//! read by [`armed`]: the deliberately broken behaviours of a test build,
//! e.g. `ack_before_commit`). Before a kill one line
//! `keel failpoint NAME: hit N, SIGKILL` goes to stderr (the battery counts
//! the hits per point from keel's log).

/// Whether this build has failpoints (`--features failpoints`).
pub const ENABLED: bool = cfg!(feature = "failpoints");

/// Every kill point, where it sits (TESTING.md C2).
pub const POINTS: &[(&str, &str)] = &[
    (
        "commit_before_reply",
        "after a batch's COMMIT and keel.acked record, before any job is answered",
    ),
    (
        "reply_before_poll",
        "after a channel accepted a reply, before it is marked sent (the next outbox poll resends it); \
         after a Telegram batch is stored, before the next getUpdates",
    ),
    (
        "container_create",
        "after a container create, before the services event is appended",
    ),
    (
        "timer_fire",
        "inside a timer fire's transaction, after the fire is written, before COMMIT",
    ),
    (
        "mid_migration",
        "inside a migration's transaction, after its SQL ran, before COMMIT",
    ),
    (
        "startup_recovery",
        "during start-up recovery: timers recovered, adapters not started, not ready",
    ),
    (
        "mid_checkpoint",
        "at the start of a WAL checkpoint (armed with @MS: killed while it copies)",
    ),
];

/// A behaviour switch of the deliberately broken test build: the webhook
/// answers 200 before the message is committed.
pub const ACK_BEFORE_COMMIT: &str = "ack_before_commit";

/// A behaviour switch of the deliberately broken test build: the webhook
/// stores every delivery under a key of its own instead of the message's
/// id, so a retried message is stored (and answered) twice.
pub const FORGET_MESSAGE_IDS: &str = "forget_message_ids";

/// Every behaviour switch (armed with `NAME=on`).
const SWITCHES: [&str; 2] = [ACK_BEFORE_COMMIT, FORGET_MESSAGE_IDS];

/// Why an arming spec was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("KEEL_FAILPOINTS: {0}")]
pub struct ArmError(String);

/// One armed point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Arm {
    pub name: String,
    pub action: Action,
}

/// What an armed point does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// SIGKILL at the `at`-th hit (1-based), after `delay_ms` (0 = at once, in the hitting thread).
    Kill { at: u64, delay_ms: u64 },
    /// A switch for [`armed`].
    On,
}

/// Parse a `KEEL_FAILPOINTS` value.
pub fn parse(spec: &str) -> Result<Vec<Arm>, ArmError> {
    let mut arms = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (name, action) = part
            .split_once('=')
            .ok_or_else(|| ArmError(format!("{part:?} is not NAME=N, NAME=N@MS or NAME=on")))?;
        let known = POINTS.iter().any(|(p, _)| *p == name);
        let action = if action == "on" {
            if !SWITCHES.contains(&name) {
                return Err(ArmError(format!("{name:?} is not a switch")));
            }
            Action::On
        } else {
            if !known {
                return Err(ArmError(format!("unknown failpoint {name:?}")));
            }
            let (at, delay) = match action.split_once('@') {
                Some((at, ms)) => (at, Some(ms)),
                None => (action, None),
            };
            let at: u64 = at
                .parse()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| ArmError(format!("{part:?}: N must be a positive integer")))?;
            let delay_ms = match delay {
                Some(ms) => ms
                    .parse()
                    .map_err(|_| ArmError(format!("{part:?}: MS must be an integer")))?,
                None => 0,
            };
            Action::Kill { at, delay_ms }
        };
        arms.push(Arm {
            name: name.to_string(),
            action,
        });
    }
    Ok(arms)
}

#[cfg(feature = "failpoints")]
mod imp {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;

    use super::{Action, Arm};

    pub(super) struct Armed {
        pub(super) arm: Arm,
        pub(super) hits: AtomicU64,
    }

    pub(super) static ARMED: OnceLock<Vec<Armed>> = OnceLock::new();

    fn sigkill_self() -> ! {
        // SAFETY: kill(2) on our own pid; SIGKILL cannot be caught, so the
        // process ends here as after a crash (no destructors, no flush).
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
        loop {
            std::thread::park();
        }
    }

    pub(super) fn hit(name: &'static str) {
        let Some(armed) = ARMED.get() else { return };
        for a in armed.iter().filter(|a| a.arm.name == name) {
            let Action::Kill { at, delay_ms } = a.arm.action else {
                continue;
            };
            let n = a.hits.fetch_add(1, Ordering::SeqCst) + 1;
            if n != at {
                continue;
            }
            // One unbuffered write: the line is in the log before the kill.
            eprintln!("keel failpoint {name}: hit {n}, SIGKILL");
            if delay_ms == 0 {
                sigkill_self();
            }
            let _ = std::thread::Builder::new()
                .name("keel-failpoint".into())
                .spawn(move || {
                    std::thread::sleep(std::time::Duration::from_millis(delay_ms));
                    sigkill_self();
                });
        }
    }
}

/// Arm the points of `spec` (a `KEEL_FAILPOINTS` value). Without the
/// `failpoints` feature any non-empty spec is refused (nothing could fire).
pub fn arm(spec: &str) -> Result<(), ArmError> {
    let arms = parse(spec)?;
    if arms.is_empty() {
        return Ok(());
    }
    #[cfg(feature = "failpoints")]
    {
        let armed = arms
            .into_iter()
            .map(|arm| imp::Armed {
                arm,
                hits: std::sync::atomic::AtomicU64::new(0),
            })
            .collect();
        imp::ARMED
            .set(armed)
            .map_err(|_| ArmError("failpoints are armed once, at start".into()))
    }
    #[cfg(not(feature = "failpoints"))]
    {
        Err(ArmError(
            "this keel was built without failpoints (cargo feature `failpoints`)".into(),
        ))
    }
}

/// A named kill point: SIGKILLs the process when armed for this hit.
#[inline(always)]
pub fn hit(name: &'static str) {
    #[cfg(feature = "failpoints")]
    imp::hit(name);
    #[cfg(not(feature = "failpoints"))]
    let _ = name;
}

/// Whether the switch `name` is on (always false without the feature).
#[inline(always)]
pub fn armed(name: &'static str) -> bool {
    #[cfg(feature = "failpoints")]
    {
        imp::ARMED.get().is_some_and(|a| {
            a.iter()
                .any(|a| a.arm.name == name && a.arm.action == Action::On)
        })
    }
    #[cfg(not(feature = "failpoints"))]
    {
        let _ = name;
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_bad_ones_are_refused() {
        assert_eq!(parse("").unwrap(), []);
        let arms = parse("commit_before_reply=3, mid_checkpoint=1@2,ack_before_commit=on").unwrap();
        assert_eq!(
            arms.iter().map(|a| a.action).collect::<Vec<_>>(),
            [
                Action::Kill { at: 3, delay_ms: 0 },
                Action::Kill { at: 1, delay_ms: 2 },
                Action::On
            ]
        );
        for bad in [
            "nope=1",
            "timer_fire",
            "timer_fire=0",
            "timer_fire=x",
            "timer_fire=1@x",
            "timer_fire=on",
        ] {
            assert!(parse(bad).is_err(), "{bad} was accepted");
        }
    }

    #[cfg(not(feature = "failpoints"))]
    #[test]
    fn a_build_without_the_feature_refuses_to_arm() {
        const { assert!(!ENABLED) };
        assert!(arm("timer_fire=1").is_err());
        assert!(arm("").is_ok());
        hit("timer_fire");
        assert!(!armed(ACK_BEFORE_COMMIT));
        assert!(!armed(FORGET_MESSAGE_IDS));
    }
}
