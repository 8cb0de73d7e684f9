//! The console page, drawn on the server with maud (every `(value)` spliced
//! into the HTML is escaped; the page holds no inline script or style, so
//! the strict Content-Security-Policy applies whole).
//!
//! Values are read from the JSON form of [`Stats`] by path — the same paths
//! and the same formatting (`null` → `—`, booleans → yes/no) that
//! `console.js` uses when it refreshes the page from `/v1/stats`, so the
//! page drawn by the server and the page updated by the script agree.

use maud::{html, Markup, DOCTYPE};
use serde_json::Value;

use super::Stats;

/// The value at a dotted `path` of `v` (`health.status`).
fn at<'a>(v: &'a Value, path: &str) -> &'a Value {
    path.split('.').fold(v, |v, k| &v[k])
}

/// A value as the page shows it (the script's `fmt`).
fn fmt(v: &Value) -> String {
    match v {
        Value::Null => "—".into(),
        Value::Bool(true) => "yes".into(),
        Value::Bool(false) => "no".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A scalar the script keeps up to date.
fn val(v: &Value, path: &str) -> Markup {
    html! { span data-k=(path) { (fmt(at(v, path))) } }
}

/// A table of the list at `path`, one column per `(key, heading)`.
fn table(v: &Value, path: &str, cols: &[(&str, &str)], empty: &str) -> Markup {
    let rows = at(v, path).as_array().cloned().unwrap_or_default();
    let keys: Vec<&str> = cols.iter().map(|c| c.0).collect();
    html! {
        table {
            thead { tr { @for (_, h) in cols { th { (h) } } } }
            tbody data-list=(path) data-cols=(keys.join(",")) data-empty=(empty) {
                @if rows.is_empty() {
                    tr { td colspan=(cols.len()) class="empty" { (empty) } }
                }
                @for row in &rows {
                    tr { @for k in &keys { td class=(k) { (fmt(&row[*k])) } } }
                }
            }
        }
    }
}

/// The chart of acknowledged messages per minute: one bar per minute,
/// scaled to the hour's busiest minute.
fn chart(stats: &Stats) -> Markup {
    const W: u64 = 10;
    const H: u64 = 100;
    let max = stats.chart.max.max(1);
    html! {
        svg id="chart" viewBox=(format!("0 0 {} {}", W * stats.chart.acked_per_minute.len() as u64, H))
            width="600" height="120" role="img" aria-label="acknowledged messages per minute, last hour" {
            @for (i, n) in stats.chart.acked_per_minute.iter().enumerate() {
                @let h = n * H / max;
                rect data-i=(i) x=(i as u64 * W + 1) y=(H - h) width=(W - 2) height=(h) {}
            }
        }
    }
}

/// The whole page.
pub fn page(stats: &Stats) -> Markup {
    let v = serde_json::to_value(stats).unwrap_or(Value::Null);
    let state_class = if stats.health.ready { "ok" } else { "bad" };
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { "keel console" }
                link rel="icon" type="image/svg+xml" href="/console/icon.svg";
                link rel="stylesheet" href="/console/console.css";
                script src="/console/console.js" defer {}
                // Without the script the page reloads itself instead.
                noscript { meta http-equiv="refresh" content="10"; }
            }
            body {
                header {
                    h1 { "keel" }
                    span id="status" class=(state_class) data-k="health.status" { (stats.health.status) }
                    span class="muted" { "as of " (val(&v, "now")) }
                }
                main {
                    section id="health" {
                        h2 { "Health" }
                        dl {
                            dt { "status" } dd { (val(&v, "health.status")) }
                            dt { "reason" } dd { (val(&v, "health.reason")) }
                            dt { "uptime" } dd { (val(&v, "health.uptime")) }
                            dt { "started" } dd { (val(&v, "health.started_at")) }
                            dt { "boot epoch" } dd { (val(&v, "health.boot_epoch")) }
                        }
                        h3 { "Last starts" }
                        (table(&v, "restarts", &[("at", "at"), ("boot_epoch", "epoch"), ("how", "how"), ("recovery_ms", "recovery ms"), ("owner_told", "owner was told"), ("owner_told_at", "told at")], "none recorded"))
                    }
                    section id="channels" {
                        h2 { "Channels" }
                        (table(&v, "channels", &[
                            ("name", "channel"), ("state_text", "state"), ("attempts", "attempts"),
                            ("last_error", "last error"), ("since", "since"),
                            ("in_minute", "in/min"), ("out_minute", "out/min"),
                            ("in_hour", "in/hour"), ("out_hour", "out/hour"),
                        ], "no channels enabled"))
                    }
                    section id="traffic" {
                        h2 { "Acknowledged messages per minute, last hour" }
                        p class="muted" { "busiest minute " (val(&v, "chart.max")) ", total " (val(&v, "chart.total")) }
                        (chart(stats))
                    }
                    section id="store" {
                        h2 { "Store" }
                        @if let Some(e) = &stats.store.error {
                            p class="bad" { "store: " (e) }
                        }
                        dl {
                            dt { "database bytes" } dd { (val(&v, "store.db_bytes")) }
                            dt { "WAL bytes" } dd { (val(&v, "store.wal_bytes")) }
                            dt { "last checkpoint" } dd { (val(&v, "store.last_checkpoint_text")) }
                            dt { "integrity" } dd { (val(&v, "store.integrity")) }
                            dt { "schema" } dd { (val(&v, "store.schema_version")) }
                            dt { "sessions" } dd { (val(&v, "store.sessions")) }
                            dt { "outbox pending" } dd { (val(&v, "store.outbox.pending")) }
                            dt { "outbox unknown" } dd { (val(&v, "store.outbox.unknown")) }
                            dt { "outbox failed" } dd { (val(&v, "store.outbox.failed")) }
                            dt { "acknowledged-commit record" } dd { (val(&v, "store.acked_record")) }
                            dt { "store commit" } dd { (val(&v, "store.commit")) }
                        }
                    }
                    section id="timers" {
                        h2 { "Timers" }
                        p { "active " (val(&v, "timers.active")) ", late " (val(&v, "timers.late")) ", missed " (val(&v, "timers.missed")) }
                        (table(&v, "timers.next", &[("id", "id"), ("chat", "chat"), ("kind", "kind"), ("callback", "callback"), ("due_in_s", "due in s")], "no active timers"))
                    }
                    section id="tasks" {
                        h2 { "Tasks" }
                        h3 { "Running" }
                        (table(&v, "tasks.running", &[("id", "id"), ("name", "name"), ("at", "since"), ("log_tail", "output (tail)")], "no task running"))
                        h3 { "Recent failures" }
                        (table(&v, "tasks.failed", &[("id", "id"), ("name", "name"), ("state", "state"), ("exit_code", "exit"), ("detail", "detail"), ("at", "finished")], "no recent failures"))
                    }
                    section id="services" {
                        h2 { "Services" }
                        @if stats.services.is_some() {
                            p { "engine: " (val(&v, "services_engine")) }
                            (table(&v, "services", &[
                                ("name", "name"), ("spec_hash", "desired spec"), ("state", "actual state"),
                                ("container", "container"), ("actual_spec_hash", "actual spec"), ("drift", "drift"),
                            ], "no services deployed"))
                        } @else {
                            p class="muted" { "containers are off ([containers] enabled = false)" }
                        }
                    }
                }
                footer class="muted" { "refreshes every 2 s from " a href="/v1/stats" { "/v1/stats" } }
            }
        }
    }
}
