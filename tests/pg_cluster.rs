//! Issue 13 through the real binary: three `keel run` instances on one
//! PostgreSQL store (R37, R49). Webhook messages go to all three at random,
//! Telegram updates come through one fake Bot API, reminders are due every
//! second; one instance at a time is SIGKILLed and restarted (the poller's
//! lease holder every other cycle). Afterwards, read straight from the
//! shared store: no acknowledged message lost, none stored twice, every
//! conversation numbered without gaps, every reminder fired exactly once,
//! Telegram offsets never went back, the poller lease moved to a live
//! instance within 10 s each time its holder died, and every reply was sent.

#![allow(clippy::disallowed_methods)] // real time: leases, heartbeats and due instants

mod common;
#[path = "common/pg.rs"]
mod pg;
#[path = "common/slack.rs"]
mod slack;
#[path = "common/telegram.rs"]
mod telegram;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{poll_until, toml_str, Config, Daemon, ReplyServer};
use serde_json::{json, Value};
use telegram::{config_toml, FakeTelegram};

const INSTANCES: usize = 3;
const CYCLES: usize = 10;
const TOKEN: &str = "4242:cluster";
const LEASE_MOVE: Duration = Duration::from_secs(10);
const DEADLINE: Duration = Duration::from_secs(120);

/// What the webhook clients and the reminder client saw.
#[derive(Default)]
struct Ledger {
    /// Message id → (chat, text) of every 200 answer.
    acked: HashMap<String, (String, String)>,
    /// Ids sent without an answer (the instance died): may or may not be stored.
    unknown: HashSet<String>,
    /// Reminder notes acknowledged (`/remind in Ns note-…`).
    reminders: HashSet<String>,
}

fn sql(url: &str, query: &str) -> Vec<postgres::Row> {
    let (url, query) = (url.to_string(), query.to_string());
    pg::off_runtime(move || {
        postgres::Client::connect(&url, postgres::NoTls)
            .expect("connect to the test database")
            .query(query.as_str(), &[])
            .expect("query")
    })
}

/// `(holder, token)` of the Telegram poller's lease.
fn poller_lease(url: &str) -> Option<(String, i64, i64)> {
    sql(
        url,
        "SELECT holder, token, expires_ms FROM leases WHERE name LIKE 'poller:telegram:%'",
    )
    .first()
    .map(|r| (r.get(0), r.get(1), r.get(2)))
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as i64
}

async fn post(d: &Daemon, id: &str, chat: &str, text: &str) -> Result<(), String> {
    let msg = json!({"id": id, "chat": chat, "from": "u", "text": text});
    match d.post_message(&msg).await {
        Ok(r) if r.status == 200 => Ok(()),
        Ok(r) => Err(format!("{} {}", r.status, r.body)),
        Err(e) => Err(e.to_string()),
    }
}

/// The tests of this file run one at a time: each drives several keel
/// processes and a server on two cores, and the reminders' 2 s bound is
/// about keel, not about a neighbour test's load.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_instances_on_one_postgres_lose_nothing_through_kill_9_cycles() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let Some(db) = pg::fresh_db("three_instances") else {
        return;
    };
    let tg = Arc::new(FakeTelegram::start());
    let replies = ReplyServer::start();
    let key = "5a".repeat(32);
    let mut daemons = Vec::new();
    for _ in 0..INSTANCES {
        let config = Config {
            reply_url: Some(replies.url.clone()),
            shutdown_timeout_ms: Some(5_000),
            ..Config::default()
        };
        let mut d = Daemon::new(config, None);
        let text = d.config.to_toml()
            + &format!(
                "\n[storage]\nbackend = \"postgres\"\nurl = {}\n",
                toml_str(&db.url)
            )
            + "\n[adapters]\nbackoff_initial_ms = 50\nbackoff_max_ms = 400\nattempts = 10\nseed = 1\n"
            + &config_toml(&tg.url, TOKEN, "");
        d.write_config_text(&text);
        d.env.push(("KEEL_MASTER_KEY".into(), key.clone()));
        d.boot().await;
        daemons.push(d);
    }
    let ids: Vec<String> = daemons
        .iter()
        .map(|d| {
            std::fs::read_to_string(d.data_dir.join("instance.id"))
                .expect("instance.id")
                .trim()
                .to_string()
        })
        .collect();
    assert_eq!(
        ids.iter().collect::<HashSet<_>>().len(),
        INSTANCES,
        "instance ids are distinct: {ids:?}"
    );
    // The poller lease has one holder among the three.
    let first = poll_until(LEASE_MOVE, || async { poller_lease(&db.url) }).await;
    let (holder, _, _) = first.expect("nobody took the Telegram poller lease");
    assert!(
        ids.iter().any(|i| holder.starts_with(&format!("{i}#"))),
        "{holder}"
    );

    // Load: webhook clients on random instances, Telegram updates, reminders.
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let ports: Arc<Mutex<Vec<u16>>> =
        Arc::new(Mutex::new(daemons.iter().map(|d| d.port).collect()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut load = Vec::new();
    for client in 0..4 {
        let (ledger, ports, stop) = (ledger.clone(), ports.clone(), stop.clone());
        let probe = Daemon::new(Config::default(), None);
        load.push(tokio::spawn(async move {
            let mut probe = probe;
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let id = format!("w{client}-{n}");
                let chat = format!("c{client}-{}", n % 3);
                let (text, note) = if n.is_multiple_of(10) {
                    let note = format!("note-{client}-{n}");
                    (format!("/remind in {}s {note}", 1 + n % 3), Some(note))
                } else {
                    (format!("hello {id}"), None)
                };
                let port = {
                    let p = ports.lock().unwrap();
                    p[(n as usize + client) % p.len()]
                };
                probe.port = port;
                match post(&probe, &id, &chat, &text).await {
                    Ok(()) => {
                        let mut l = ledger.lock().unwrap();
                        l.acked.insert(id, (chat, text));
                        if let Some(note) = note {
                            l.reminders.insert(note);
                        }
                    }
                    Err(_) => {
                        ledger.lock().unwrap().unknown.insert(id);
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }));
    }
    let pushed = Arc::new(Mutex::new(Vec::new()));
    {
        let (tg_queue, pushed, stop) = (tg.clone(), pushed.clone(), stop.clone());
        load.push(tokio::spawn(async move {
            let mut n = 0i64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let chat = 9100 + n % 3;
                let id = tg_queue.push_text(chat, &format!("/recall k{}", 10_000 + n));
                pushed.lock().unwrap().push((id, 10_000 + n));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }));
    }

    // Kill cycles: the lease holder on even cycles, another instance on odd.
    let mut moves = Vec::new();
    // Replies received before each kill and once its victim is back: a
    // reply in flight at a kill is received on both sides of it.
    let mut kills: Vec<(usize, usize)> = Vec::new();
    for cycle in 0..CYCLES {
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        let (holder, token, _) = poller_lease(&db.url).expect("poller lease row");
        let held_by = ids
            .iter()
            .position(|i| holder.starts_with(&format!("{i}#")))
            .expect("the lease holder is one of the instances");
        let victim = if cycle.is_multiple_of(2) {
            held_by
        } else {
            (held_by + 1 + cycle % 2) % INSTANCES
        };
        let before_kill = replies.replies().len();
        daemons[victim].sigkill();
        if victim == held_by {
            let killed_at = Instant::now();
            let live: Vec<String> = ids
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != victim)
                .map(|(_, id)| format!("{id}#"))
                .collect();
            let moved = poll_until(LEASE_MOVE, || async {
                let (h, t, e) = poller_lease(&db.url)?;
                (t > token && e > now_ms() && live.iter().any(|l| h.starts_with(l)))
                    .then_some(killed_at.elapsed())
            })
            .await;
            let took = moved.unwrap_or_else(|| {
                panic!("cycle {cycle}: the poller lease did not move within {LEASE_MOVE:?}")
            });
            moves.push(took);
        }
        daemons[victim].boot().await;
        ports.lock().unwrap()[victim] = daemons[victim].port;
        kills.push((before_kill, replies.replies().len()));
    }
    stop.store(true, Ordering::Relaxed);
    for l in load {
        l.await.expect("load task");
    }
    assert_eq!(
        moves.len(),
        CYCLES / 2,
        "the holder was killed every other cycle"
    );

    // Settle: every reminder fired, every reply sent.
    let (acked, unknown, reminders) = {
        let l = ledger.lock().unwrap();
        (l.acked.clone(), l.unknown.clone(), l.reminders.clone())
    };
    assert!(
        acked.len() > 200,
        "too little load acknowledged: {}",
        acked.len()
    );
    assert!(
        reminders.len() > 20,
        "too few reminders: {}",
        reminders.len()
    );
    let pushed = pushed.lock().unwrap().clone();
    let settled = poll_until(DEADLINE, || async {
        let pending =
            sql(&db.url, "SELECT COUNT(*) FROM outbox WHERE state <> 'sent'")[0].get::<_, i64>(0);
        let active = sql(
            &db.url,
            "SELECT COUNT(*) FROM timers WHERE state = 'active'",
        )[0]
        .get::<_, i64>(0);
        let offset_done = tg.unconfirmed() == 0;
        (pending == 0 && active == 0 && offset_done).then_some(())
    })
    .await;
    assert!(
        settled.is_some(),
        "the cluster did not settle within {DEADLINE:?}: outbox {:?}, timers {:?}, telegram unconfirmed {}",
        sql(&db.url, "SELECT state, COUNT(*) FROM outbox GROUP BY state")
            .iter()
            .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1)))
            .collect::<Vec<_>>(),
        sql(&db.url, "SELECT state, COUNT(*) FROM timers GROUP BY state")
            .iter()
            .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1)))
            .collect::<Vec<_>>(),
        tg.unconfirmed()
    );

    // Every acknowledged webhook message stored once; nothing invented.
    let stored = sql(
        &db.url,
        "SELECT t.key, COUNT(*) FROM turns t JOIN sessions s ON s.id = t.session_id
         WHERE s.channel = 'webhook' AND t.role = 'user' GROUP BY t.key",
    );
    let stored: HashMap<String, i64> = stored.iter().map(|r| (r.get(0), r.get(1))).collect();
    let lost: Vec<&String> = acked.keys().filter(|k| !stored.contains_key(*k)).collect();
    assert!(lost.is_empty(), "acknowledged but lost: {lost:?}");
    let dup: Vec<(&String, &i64)> = stored.iter().filter(|(_, n)| **n > 1).collect();
    assert!(dup.is_empty(), "stored twice: {dup:?}");
    let invented: Vec<&String> = stored
        .keys()
        .filter(|k| !acked.contains_key(*k) && !unknown.contains(*k))
        .collect();
    assert!(invented.is_empty(), "stored but never sent: {invented:?}");

    // Every conversation numbered 1..n without gaps or repeats.
    let seqs = sql(
        &db.url,
        "SELECT session_id, seq FROM turns ORDER BY session_id, seq",
    );
    let mut per: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for r in &seqs {
        per.entry(r.get(0)).or_default().push(r.get(1));
    }
    for (session, s) in &per {
        let want: Vec<i64> = (1..=s.len() as i64).collect();
        assert_eq!(s, &want, "turns of {session} are not numbered 1..n");
    }

    // Every acknowledged reminder fired exactly once.
    let fired = sql(
        &db.url,
        "SELECT t.params_json, COUNT(f.timer_id), MAX(f.late_ms) FROM timers t
         LEFT JOIN timer_fires f ON f.timer_id = t.id GROUP BY t.id, t.params_json",
    );
    let mut by_note: HashMap<String, (i64, i64)> = HashMap::new();
    for r in &fired {
        let params: Value = serde_json::from_str(&r.get::<_, String>(0)).unwrap();
        let note = params["text"].as_str().unwrap_or_default().to_string();
        by_note.insert(note, (r.get(1), r.get::<_, Option<i64>>(2).unwrap_or(-1)));
    }
    for note in &reminders {
        let (fires, _) = by_note
            .get(note)
            .unwrap_or_else(|| panic!("acknowledged reminder {note} has no timer"));
        assert_eq!(*fires, 1, "reminder {note} fired {fires} times");
    }
    let notices = sql(
        &db.url,
        "SELECT content, COUNT(*) FROM turns WHERE role = 'system' AND content LIKE '⏰ Reminder #%'
         GROUP BY content HAVING COUNT(*) > 1",
    );
    assert!(notices.is_empty(), "a reminder turn stored twice");
    let mut late: Vec<i64> = reminders.iter().map(|n| by_note[n].1).collect();
    late.sort_unstable();
    let max_late = late.last().copied().unwrap_or(0);
    let p50_late = late[late.len() / 2];
    // Due instants fire within 2 s on some live instance, whichever
    // instance created the timer and whichever died meanwhile.
    assert!(
        max_late <= 2_000,
        "a reminder fired {max_late} ms late (p50 {p50_late} ms)"
    );

    // Telegram: offsets never went back; every update answered.
    let offsets = tg.offsets();
    for w in offsets.windows(2) {
        assert!(w[1] >= w[0], "offset went back from {} to {}", w[0], w[1]);
    }
    let sent = tg.sent();
    let answered: HashSet<i64> = sent
        .iter()
        .filter_map(|s| {
            let text = s["text"].as_str()?;
            let rest = text.split(" k").nth(1)?;
            rest.chars()
                .take_while(|c| c.is_ascii_digit())
                .collect::<String>()
                .parse()
                .ok()
        })
        .collect();
    let unanswered: Vec<i64> = pushed
        .iter()
        .filter(|(_, k)| !answered.contains(k))
        .map(|(_, k)| *k)
        .collect();
    assert!(
        unanswered.is_empty(),
        "telegram updates never answered: {unanswered:?}"
    );

    // Every acknowledged webhook message got its reply.
    let got: HashSet<String> = replies
        .replies()
        .iter()
        .filter_map(|r| r["in_reply_to"].as_str().map(str::to_string))
        .collect();
    let missing: Vec<&String> = acked.keys().filter(|k| !got.contains(*k)).collect();
    assert!(
        missing.is_empty(),
        "acknowledged without a reply: {missing:?}"
    );
    // One sender for the cluster (the `outbox` lease): a reply goes out
    // again only when its sender died with the send in flight, so any two
    // receipts of one reply lie on both sides of a kill — the earlier one
    // before the victim was back, the later one after the kill.
    let received = replies.replies();
    let mut receipts: HashMap<String, Vec<usize>> = HashMap::new();
    for (i, r) in received.iter().enumerate() {
        receipts.entry(r["id"].to_string()).or_default().push(i);
    }
    let mut resent = 0;
    for (id, at) in &receipts {
        if at.len() > 1 {
            resent += 1;
        }
        for w in at.windows(2) {
            if kills
                .iter()
                .any(|&(before, back)| w[0] < back && w[1] >= before)
            {
                continue;
            }
            let needle = format!("id={}", id.trim_matches('"'));
            let logs: Vec<String> = daemons
                .iter()
                .enumerate()
                .flat_map(|(i, d)| {
                    d.stderr_all()
                        .lines()
                        .filter(|l| {
                            l.contains(&needle)
                                || l.contains("lease gained")
                                || l.contains("lease not held")
                        })
                        .map(|l| format!("[{i}] {l}"))
                        .collect::<Vec<_>>()
                })
                .collect();
            let peers = replies.peers();
            let around: Vec<String> = (w[0].saturating_sub(3)..(w[1] + 4).min(received.len()))
                .map(|i| format!("#{i} id {} from {}", received[i]["id"], peers[i]))
                .collect();
            panic!(
                "reply {id} was sent again (receipts {} and {} of {}) with no kill between: kills at {kills:?}\n{}\n{}",
                w[0],
                w[1],
                received.len(),
                around.join("\n"),
                logs.join("\n")
            );
        }
    }
    eprintln!(
        "cluster: {} acked, {} unknown, {} reminders (fired late by p50 {} ms, max {} ms), {} telegram updates, {} replies resent, lease moves {:?}",
        acked.len(),
        unknown.len(),
        reminders.len(),
        p50_late,
        max_late,
        pushed.len(),
        resent,
        moves
    );
    // `keel status` on any instance shows the cluster: every instance with
    // its epoch and heartbeat, and the poller lease with its holder.
    let out = daemons[1].status_json().await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status: Value = serde_json::from_slice(&out.stdout).expect("status --json");
    assert_eq!(status["backend"], "postgres", "{status}");
    let listed: HashSet<&str> = status["instances"]
        .as_array()
        .expect("instances")
        .iter()
        .filter_map(|i| i["id"].as_str())
        .collect();
    assert_eq!(listed, ids.iter().map(String::as_str).collect(), "{status}");
    let restarted = status["instances"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["epoch"].as_i64() > Some(1))
        .count();
    assert!(
        restarted >= 2,
        "restarted instances show new epochs: {status}"
    );
    let lease = status["leases"]
        .as_array()
        .expect("leases")
        .iter()
        .find(|l| {
            l["name"]
                .as_str()
                .is_some_and(|n| n.starts_with("poller:telegram:"))
        })
        .unwrap_or_else(|| panic!("no poller lease in {status}"));
    assert!(
        ids.iter().any(|i| lease["holder"]
            .as_str()
            .unwrap_or("")
            .starts_with(&format!("{i}#"))),
        "{status}"
    );
    for d in &mut daemons {
        let exit = d.sigterm(Duration::from_secs(20)).await;
        assert!(exit.success(), "{exit}");
    }
}

/// Slack Socket Mode on a shared store: one connection per app across the
/// instances (the `poller:slack:<app>` lease); when its holder dies the
/// other instance connects and answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_instance_holds_the_slack_socket_and_another_takes_it_over() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let Some(db) = pg::fresh_db("slack_lease") else {
        return;
    };
    let fake = slack::FakeSlack::start();
    let key = "6b".repeat(32);
    let mut daemons = Vec::new();
    for _ in 0..2 {
        let mut d = Daemon::new(Config::default(), None);
        let text = d.config.to_toml()
            + &format!(
                "\n[storage]\nbackend = \"postgres\"\nurl = {}\n",
                toml_str(&db.url)
            )
            + "\n[adapters]\nbackoff_initial_ms = 50\nbackoff_max_ms = 400\nattempts = 10\nseed = 1\n"
            + &slack::config_toml(&fake.api_base, "xapp-lease-app", "xoxb-lease-bot", 30);
        d.write_config_text(&text);
        d.env.push(("KEEL_MASTER_KEY".into(), key.clone()));
        d.boot().await;
        daemons.push(d);
    }
    let replied = |n: usize| {
        let fake = &fake;
        async move { (fake.posts().len() >= n).then_some(()) }
    };
    for i in 0..10 {
        fake.push_message(&format!("Ev{i}"), "C1", &format!("/recall k{i}"));
    }
    assert!(
        poll_until(DEADLINE, || replied(10)).await.is_some(),
        "the first ten messages were not answered"
    );
    // Both instances are up and ten round trips went through: the one
    // without the lease never opened a connection.
    assert_eq!(fake.opens(), 1, "one Socket Mode connection for the app");
    let holder: String = sql(
        &db.url,
        "SELECT holder FROM leases WHERE name LIKE 'poller:slack:%'",
    )[0]
    .get(0);
    let ids: Vec<String> = daemons
        .iter()
        .map(|d| {
            std::fs::read_to_string(d.data_dir.join("instance.id"))
                .unwrap()
                .trim()
                .to_string()
        })
        .collect();
    let held_by = ids
        .iter()
        .position(|i| holder.starts_with(&format!("{i}#")))
        .expect("the lease holder is one of the instances");
    daemons[held_by].sigkill();
    let other = 1 - held_by;
    let took = poll_until(LEASE_MOVE, || async {
        let h: String = sql(
            &db.url,
            "SELECT holder FROM leases WHERE name LIKE 'poller:slack:%'",
        )[0]
        .get(0);
        (h.starts_with(&format!("{}#", ids[other])) && fake.opens() == 2).then_some(())
    })
    .await;
    assert!(
        took.is_some(),
        "the other instance did not take the socket within {LEASE_MOVE:?}"
    );
    for i in 10..15 {
        fake.push_message(&format!("Ev{i}"), "C1", &format!("/recall k{i}"));
    }
    assert!(
        poll_until(DEADLINE, || replied(15)).await.is_some(),
        "messages after the takeover were not answered"
    );
    daemons[held_by].boot().await;
    for d in &mut daemons {
        let exit = d.sigterm(Duration::from_secs(20)).await;
        assert!(exit.success(), "{exit}");
    }
}
