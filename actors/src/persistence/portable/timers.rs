//! Claiming due timers in portable SQL, for several instances on one store
//! (R37, R49). Inside the fire transaction, due rows are read with
//! `FOR UPDATE SKIP LOCKED` on PostgreSQL (an instance skips what another
//! is firing right now instead of waiting for it), the per-instant receipt
//! (`timer_fires`, primary key (timer, due)) is inserted with `ON CONFLICT
//! DO NOTHING` — a due instant someone already fired inserts nothing and is
//! skipped — and the timer moves to its next instant, all in one COMMIT.
//! On SQLite the single writer makes the same statements safe without the
//! lock clause.

use crate::error::StoreError;
use crate::persistence::portable::sessions::commit_notice;
use crate::persistence::sessions::SessionKey;
use crate::persistence::sql::{Backend, Sql};
use crate::schedule::{next_after, parse_tz, Schedule};
use crate::vals;

/// One due instant this call fired.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fired {
    pub timer_id: i64,
    pub due_at: i64,
    /// The reminder's system turn, when the callback is a reminder.
    pub notice_seq: Option<i64>,
}

/// Fire up to `limit` timers due at `now_ms` as `instance`. Reminders
/// become a system turn with an outbox row (`deliver`); other callbacks are
/// not portable yet and park their timer with that reason.
pub fn claim_and_fire(
    db: &mut dyn Sql,
    now_ms: i64,
    limit: i64,
    instance: &str,
    deliver: bool,
) -> Result<Vec<Fired>, StoreError> {
    let lock = match db.backend() {
        Backend::Sqlite => "",
        Backend::Postgres => " FOR UPDATE OF t SKIP LOCKED",
    };
    let sql = format!(
        "SELECT t.id, t.next_run, t.kind, t.schedule, t.timezone, t.callback, t.params_json,
                s.id, s.channel, s.chat
         FROM timers t JOIN sessions s ON s.id = t.session_id
         WHERE t.state = 'active' AND t.next_run <= $1
         ORDER BY t.next_run, t.id LIMIT $2{lock}"
    );
    let due = db.rows(&sql, vals![now_ms, limit])?;
    let stamp = crate::clock::Stamp::from_ms(now_ms);
    let mut fired = Vec::new();
    for r in due {
        let (id, due_at) = (r.int(0)?, r.int(1)?);
        let receipt = db.exec(
            "INSERT INTO timer_fires (timer_id, due_at, fired_at, late_ms, fired_by)
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (timer_id, due_at) DO NOTHING",
            vals![id, due_at, now_ms, now_ms - due_at, instance],
        )?;
        let zone = r.text(4)?;
        let next = Schedule::from_row(&r.text(2)?, &r.text(3)?)
            .map_err(|e| e.to_string())
            .and_then(|s| {
                let tz = parse_tz(&zone).map_err(|e| e.to_string())?;
                next_after(&s, tz, due_at, now_ms).map_err(|e| e.to_string())
            });
        let next = match next {
            Ok(n) => n,
            Err(e) => {
                db.exec(
                    "UPDATE timers SET state = 'parked', error = $2, updated_at = $3 WHERE id = $1",
                    vals![id, e, &stamp.text],
                )?;
                continue;
            }
        };
        db.exec(
            // CAST: PostgreSQL cannot infer the type of a parameter seen
            // only under IS NULL.
            "UPDATE timers SET next_run = CAST($2 AS BIGINT), last_fired = $3,
                    fired_count = fired_count + $4,
                    state = CASE WHEN CAST($2 AS BIGINT) IS NULL THEN 'done' ELSE state END,
                    updated_at = $5
             WHERE id = $1",
            vals![id, next, due_at, (receipt == 1) as i64, &stamp.text],
        )?;
        if receipt == 0 {
            continue; // fired before (by this or another instance)
        }
        let mut notice_seq = None;
        if r.text(5)? == "reminder" {
            let text = serde_json::from_str::<serde_json::Value>(&r.text(6)?)
                .ok()
                .and_then(|v| v.get("text").and_then(|t| t.as_str()).map(str::to_string))
                .unwrap_or_default();
            let session = SessionKey {
                id: r.text(7)?,
                channel: r.text(8)?,
                chat: r.text(9)?,
            };
            notice_seq = Some(commit_notice(db, &stamp, &session, &text, deliver)?.0);
        }
        fired.push(Fired {
            timer_id: id,
            due_at,
            notice_seq,
        });
    }
    Ok(fired)
}
