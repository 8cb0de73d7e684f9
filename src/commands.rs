//! Operator commands: `status`, `sessions`, `migrate` read or prepare the
//! store directly (read-only where possible, so they are safe while keel
//! runs); `run`, `chat` and `bench` live in their own modules.

use std::io::IsTerminal;
use std::process::ExitCode;

use anyhow::{Context, Result};
use keel_actors::app::lifecycle::PENDING_KEY;
use keel_actors::config::Config;
use keel_actors::error::StoreError;
use keel_actors::persistence::{self, meta, migrate, portable, StoreOptions};
use serde_json::json;

use crate::cli::{Cli, Command, DataDirArg, SessionsCmd};
use crate::progress::{ProgressLine, Unit, LARGE_BYTES};

/// Exports of more sessions than this show a progress line (each session
/// is a file written and fsynced).
const LARGE_EXPORT: u64 = 100;

pub fn dispatch(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Run(args) => crate::run::run(args),
        Command::Chat(args) => crate::chat::chat(args),
        Command::Status { dir, json } => status(&dir, json),
        Command::Sessions { cmd } => sessions(cmd),
        Command::Timers { cmd } => crate::timers_cmd::timers_cmd(cmd),
        Command::Tasks { cmd } => crate::tasks_cmd::tasks_cmd(cmd),
        Command::Migrate { dir, encrypt } => {
            if encrypt {
                crate::vault_cmd::migrate_encrypt(&dir)
            } else {
                migrate_cmd(&dir)
            }
        }
        Command::Secrets { cmd } => crate::vault_cmd::secrets(cmd),
        Command::Tokens { cmd } => crate::vault_cmd::tokens(cmd),
        Command::Audit {
            since,
            json,
            verify,
            dir,
        } => crate::vault_cmd::audit(&dir, since.as_deref(), json, verify),
        Command::Backup { file, dir } => crate::vault_cmd::backup(&dir, &file),
        Command::Restore { file, force, dir } => crate::vault_cmd::restore(&dir, &file, force),
        Command::Rekey { new_key_file, dir } => {
            crate::vault_cmd::rekey(&dir, new_key_file.as_deref())
        }
        Command::Services { cmd } => crate::services_cmd::services_cmd(cmd),
        Command::Containers { cmd } => crate::services_cmd::containers_cmd(cmd),
        Command::Verify { dir, json } => crate::services_cmd::verify(&dir, json),
        Command::Bench(args) => keel_bench::dispatch(args),
        Command::Torture(args) => torture(args),
    }
}

/// `keel torture`: on a terminal the cycles are one rewritten line
/// (`torture: 12% (3 of 24 cycles, 120 acked, recovery 85 ms)`); a run
/// bounded by `--seconds` alone has no total, so each cycle is a line of
/// its own as before. Off a terminal nothing is shown; stdout is the same.
fn torture(args: keel_bench::torture::TortureArgs) -> Result<ExitCode> {
    if !std::io::stderr().is_terminal() {
        return keel_bench::torture::torture(args);
    }
    let mut shown = ProgressLine::new("torture", Unit::Cycles, 0);
    keel_bench::torture::torture_noted(args, &mut |c| match c.total {
        Some(total) => shown.show_with(
            c.done,
            total,
            &format!(", {} acked, recovery {} ms", c.acked, c.recovery_ms),
        ),
        None => eprintln!("keel torture: {}", c.line),
    })
}

fn config_for(dir: &DataDirArg) -> Result<Config> {
    crate::config::load(dir, None)
}

/// The store read-only, unlocked with the key found the one way every
/// command finds it (`crate::vault`).
pub(crate) fn open_ro(config: &Config) -> Result<persistence::Connection> {
    let path = config.data_dir.join("keel.db");
    let key = if path.exists() {
        crate::vault::store_key(config, crate::vault::Create::Never)?
    } else {
        None
    };
    Ok(persistence::open_read_only(&path, key.as_ref())?)
}

/// The store a command works on, either backend: `keel.db` (read-only
/// unless opened with [`Store::open_rw`]), or the shared store (`[storage]
/// backend = "postgres"`), where each call is one transaction.
pub(crate) enum Store {
    Local(persistence::Connection),
    Shared(persistence::pg::Client),
}

impl Store {
    /// Read-only (safe while keel runs).
    pub(crate) fn open_ro(config: &Config) -> Result<Store> {
        if crate::vault::is_shared(config) {
            return Ok(Store::Shared(shared_client(config)?));
        }
        Ok(Store::Local(open_ro(config)?))
    }

    /// For writing: `keel.db` with keel stopped (the caller holds the
    /// data-dir lock), or the shared store (other instances may run).
    pub(crate) fn open_rw(config: &Config, create: crate::vault::Create) -> Result<Store> {
        if crate::vault::is_shared(config) {
            let url = config.storage.shared_url().map_err(anyhow::Error::msg)?;
            let mut client = persistence::pg::connect(&url)?;
            persistence::pg::pg_migrate(&mut client, &url)?;
            return Ok(Store::Shared(client));
        }
        let key = crate::vault::store_key(config, create)?;
        let (conn, _) = persistence::open_store(&StoreOptions::from_config(config, key.as_ref()))
            .with_context(|| format!("opening {}", config.data_dir.display()))?;
        Ok(Store::Local(conn))
    }

    pub(crate) fn is_shared(&self) -> bool {
        matches!(self, Store::Shared(_))
    }

    /// `f` in one read-only snapshot.
    pub(crate) fn read<T>(
        &mut self,
        f: impl FnOnce(&mut dyn persistence::sql::Sql) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        match self {
            Store::Local(conn) => f(&mut persistence::sql::SqliteSql(conn)),
            Store::Shared(client) => persistence::pg::read_only(client, f),
        }
    }

    /// `f` in one transaction, committed when it returns `Ok`.
    pub(crate) fn write<T>(
        &mut self,
        f: impl FnOnce(&mut dyn persistence::sql::Sql) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        match self {
            Store::Local(conn) => {
                let tx = conn.unchecked_transaction()?;
                let out = f(&mut persistence::sql::SqliteSql(&tx))?;
                tx.commit()?;
                Ok(out)
            }
            Store::Shared(client) => persistence::pg::read_write(client, f),
        }
    }
}

/// A connection to the shared store, whose schema this keel understands.
fn shared_client(config: &Config) -> Result<persistence::pg::Client> {
    let url = config.storage.shared_url().map_err(anyhow::Error::msg)?;
    let mut client = persistence::pg::connect(&url)?;
    persistence::pg::pg_check_not_newer(&mut client, &url)?;
    Ok(client)
}

/// What `keel status` shows of a store, read the same way on both backends.
struct StoreView {
    stats: meta::StoreStats,
    adapters: serde_json::Value,
    pending: Option<String>,
    containers: serde_json::Value,
    timers: serde_json::Map<String, serde_json::Value>,
    tasks: serde_json::Map<String, serde_json::Value>,
    task_log_bytes: i64,
    instances: Vec<persistence::portable::instances::Instance>,
    leases: Vec<persistence::portable::leases::Lease>,
}

fn store_view(
    db: &mut dyn persistence::sql::Sql,
) -> Result<StoreView, keel_actors::error::StoreError> {
    use persistence::portable;
    let version = meta::schema_version(db)?;
    let stats = meta::stats_sql(db, version)?;
    let adapters = adapter_statuses(db)?;
    let pending = portable::sessions::load_adapter_state(db, PENDING_KEY)?;
    // The container reaper's last report (engine state, reaped at start,
    // event log check); none when containers never ran here.
    let containers = portable::sessions::load_adapter_state(db, persistence::services::STATUS_KEY)?
        .and_then(|j| serde_json::from_str(&j).ok())
        .unwrap_or(serde_json::Value::Null);
    let timers = portable::timers::count_by_state(db)?
        .into_iter()
        .map(|(state, n)| (state, n.into()))
        .collect();
    // A store older than schema 4 has no tasks table: nothing to count.
    let (task_states, task_log_bytes) = portable::tasks::counts(db).unwrap_or((Vec::new(), 0));
    let tasks = task_states
        .into_iter()
        .map(|(state, n)| (state, n.into()))
        .collect();
    // Instances sharing the store and the leases they hold (issue 13); a
    // store older than schema 12 has neither table.
    let instances = portable::instances::list(db).unwrap_or_default();
    let leases = portable::leases::list(db).unwrap_or_default();
    Ok(StoreView {
        stats,
        adapters,
        pending,
        containers,
        timers,
        tasks,
        task_log_bytes,
        instances,
        leases,
    })
}

/// The shared store of `config` (`backend = "postgres"`), read in one
/// read-only snapshot.
fn shared_view(config: &Config) -> Result<StoreView> {
    Ok(persistence::pg::read_only(
        &mut shared_client(config)?,
        store_view,
    )?)
}

fn status(dir: &DataDirArg, as_json: bool) -> Result<ExitCode> {
    let config = config_for(dir)?;
    let shared = config.storage.backend == keel_actors::config::StorageBackend::Postgres;
    let pid = crate::run::running_pid(&config.data_dir);
    // R39 (SQLite only): the store's highest commit against keel's record
    // of the highest acknowledged one (read-only: the record is not
    // repaired here). A shared store has no such file.
    let (view, commit, acked_record, missing) = if shared {
        (shared_view(&config)?, 0, json!(null), 0)
    } else {
        let conn = open_ro(&config)?;
        let view = store_view(&mut persistence::sql::SqliteSql(&conn))?;
        let commit = persistence::acked::store_seq(&conn)?;
        let record = persistence::acked::read(&persistence::acked::record_path(
            &config.data_dir.join("keel.db"),
        ));
        let (acked_record, missing) = match record {
            persistence::acked::Record::Seq(n) => (json!(n), (n - commit).max(0)),
            persistence::acked::Record::Missing => (json!("missing"), 0),
            persistence::acked::Record::Damaged => (json!("damaged"), 0),
        };
        (view, commit, acked_record, missing)
    };
    let StoreView {
        stats,
        adapters,
        pending,
        containers,
        timers,
        tasks,
        task_log_bytes,
        instances,
        leases,
    } = view;
    // Keys a reload could not apply; only meaningful while keel runs (the
    // next start reads the file anyway).
    let restart_needed: Vec<String> = match pid {
        None => Vec::new(),
        Some(_) => pending
            .and_then(|j| serde_json::from_str::<serde_json::Value>(&j).ok())
            .and_then(|v| v.get("keys").cloned())
            .and_then(|k| serde_json::from_value(k).ok())
            .unwrap_or_default(),
    };
    let schema_supported = if shared {
        persistence::pg::pg_latest_version()
    } else {
        migrate::latest_version()
    };
    if as_json {
        println!(
            "{}",
            json!({
                "commits": if shared { json!(null) } else { json!({ "store": commit, "acked_record": acked_record, "missing": missing }) },
                "backend": if shared { "postgres" } else { "sqlite" },
                "data_dir": config.data_dir,
                "running": pid.is_some(),
                "pid": pid,
                "store": stats,
                "schema_supported": schema_supported,
                "adapters": adapters,
                "timers": timers,
                "tasks": { "by_state": tasks, "log_bytes": task_log_bytes },
                "config": { "restart_needed": restart_needed },
                "containers": containers,
                "instances": instances,
                "leases": leases,
            })
        );
    } else {
        println!("data dir:        {}", config.data_dir.display());
        match pid {
            Some(p) => println!("daemon:          running (pid {p})"),
            None => println!("daemon:          not running"),
        }
        if shared {
            println!("store:           shared (PostgreSQL)");
        }
        println!(
            "schema version:  {} (binary supports {schema_supported})",
            stats.schema_version,
        );
        println!("boot epoch:      {}", stats.boot_epoch);
        if shared {
        } else if missing > 0 {
            println!(
                "DATA LOSS:       {missing} acknowledged commits missing (store at commit {commit}, keel.acked records {acked_record}); see the README, R39"
            );
        } else {
            println!("commits:         {commit} (acknowledged on record: {acked_record})");
        }
        println!("sessions:        {}", stats.sessions);
        println!("turns:           {}", stats.turns);
        println!("outbox pending:  {}", stats.outbox_pending);
        println!("outbox sent:     {}", stats.outbox_sent);
        println!("awaiting agent:  {}", stats.awaiting_agent);
        let by_state: Vec<String> = ["active", "parked", "done", "cancelled"]
            .iter()
            .map(|st| {
                format!(
                    "{st} {}",
                    timers.get(*st).and_then(|v| v.as_i64()).unwrap_or(0)
                )
            })
            .collect();
        println!("timers:          {}", by_state.join(", "));
        let by_state: Vec<String> = keel_actors::persistence::tasks::TaskState::ALL
            .iter()
            .map(|st| {
                let st = st.as_str();
                format!(
                    "{st} {}",
                    tasks.get(st).and_then(|v| v.as_i64()).unwrap_or(0)
                )
            })
            .collect();
        println!("tasks:           {}", by_state.join(", "));
        println!("task log bytes:  {task_log_bytes}");
        if !restart_needed.is_empty() {
            println!(
                "config:          reloaded; waiting for a restart: {}",
                restart_needed.join(", ")
            );
        }
        if !containers.is_null() {
            println!(
                "containers:      {}{} (instance {}, reaped at start {}, services {}, repairs {})",
                containers["state"].as_str().unwrap_or("?"),
                containers["reason"]
                    .as_str()
                    .map(|r| format!(": {r}"))
                    .unwrap_or_default(),
                containers["instance"].as_str().unwrap_or("?"),
                containers["reaped_at_start"],
                containers["services"],
                containers["repairs"],
            );
        }
        let now = keel_actors::clock::Clock::now_ms(&keel_actors::clock::WallClock);
        for i in &instances {
            println!(
                "instance {} epoch {}, heartbeat {} ms ago{}",
                i.id,
                i.epoch,
                now - i.heartbeat_ms,
                if i.expires_ms > now { "" } else { " (expired)" }
            );
        }
        for l in &leases {
            println!(
                "lease {} held by {} (token {}){}",
                l.name,
                l.holder,
                l.token,
                if l.expires_ms > now {
                    format!(", expires in {} ms", l.expires_ms - now)
                } else {
                    ", expired".to_string()
                }
            );
        }
        for (name, s) in adapters.as_object().into_iter().flatten() {
            println!(
                "adapter {name:<8} {} (attempts {}){}",
                s["state"].as_str().unwrap_or("?"),
                s["attempts"],
                s["last_error"]
                    .as_str()
                    .map(|e| format!(", last error: {e}"))
                    .unwrap_or_default()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Each adapter's last reported status (`adapter_state` rows `status:*`).
fn adapter_statuses(
    db: &mut dyn persistence::sql::Sql,
) -> Result<serde_json::Value, keel_actors::error::StoreError> {
    let mut out = serde_json::Map::new();
    for row in persistence::adapter_state::statuses_sql(db)? {
        let name = row
            .adapter
            .trim_start_matches(persistence::adapter_state::STATUS_PREFIX)
            .to_string();
        let mut v: serde_json::Value =
            serde_json::from_str(&row.state_json).unwrap_or(serde_json::Value::Null);
        if let Some(obj) = v.as_object_mut() {
            obj.insert("updated_at".into(), row.updated_at.into());
        }
        out.insert(name, v);
    }
    Ok(serde_json::Value::Object(out))
}

fn sessions(cmd: SessionsCmd) -> Result<ExitCode> {
    match cmd {
        SessionsCmd::List { dir, json: as_json } => {
            let mut store = Store::open_ro(&config_for(&dir)?)?;
            let list = store.read(portable::sessions::list_sessions)?;
            if as_json {
                println!("{}", json!({ "sessions": list }));
            } else if list.is_empty() {
                println!("no sessions");
            } else {
                for s in list {
                    println!(
                        "{}\t{} turns\tupdated {}",
                        s.id.escape_debug(),
                        s.turns,
                        s.updated_at
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        SessionsCmd::Show {
            id,
            dir,
            json: as_json,
        } => {
            let mut store = Store::open_ro(&config_for(&dir)?)?;
            let found = store.read(|db| {
                let Some(turns) = portable::sessions::session_turns(db, &id, 0, i64::MAX)? else {
                    return Ok(None);
                };
                Ok(Some((turns, portable::sessions::session_memory(db, &id)?)))
            })?;
            let Some((turns, memory)) = found else {
                eprintln!("keel: error: no session {:?}", id);
                return Ok(ExitCode::from(2));
            };
            let memory = memory.unwrap_or_else(|| "{}".into());
            if as_json {
                let memory: serde_json::Value = serde_json::from_str(&memory).unwrap_or(json!({}));
                println!(
                    "{}",
                    json!({"session": id, "memory": memory, "turns": turns})
                );
            } else {
                println!("session {}  memory {}", id.escape_debug(), memory);
                for t in turns {
                    let sent = match t.sent {
                        Some(true) => " [sent]",
                        Some(false) => " [unsent]",
                        None => "",
                    };
                    println!(
                        "#{} {} {}{}: {}",
                        t.seq,
                        t.created_at,
                        t.role,
                        sent,
                        t.text.escape_debug()
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        SessionsCmd::Export { out, dir } => {
            let mut store = Store::open_ro(&config_for(&dir)?)?;
            let mut shown = ProgressLine::new("exporting sessions", Unit::Rows, LARGE_EXPORT);
            let files = store.read(|db| {
                keel_actors::export::export_sessions_noted(db, &out, &mut |d, t| shown.show(d, t))
            })?;
            drop(shown);
            println!("exported {} sessions to {}", files.len(), out.display());
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn migrate_cmd(dir: &DataDirArg) -> Result<ExitCode> {
    let config = config_for(dir)?;
    if crate::vault::is_shared(&config) {
        // The shared store: several instances may migrate at once (each
        // step runs once, under an advisory lock); no data-dir lock.
        let url = config.storage.shared_url().map_err(anyhow::Error::msg)?;
        let mut client = persistence::pg::connect(&url)?;
        let (from, to) = persistence::pg::pg_migrate(&mut client, &url)?;
        if from != to {
            persistence::pg::read_write(&mut client, |db| {
                persistence::audit::append_sql(
                    db,
                    &keel_actors::clock::Clock::stamp(&keel_actors::clock::WallClock).text,
                    "migrated",
                    &json!({"from": from, "to": to, "backend": "postgres"}),
                )
            })?;
        }
        println!("schema version {to} (was {from}) in the shared store");
        return Ok(ExitCode::SUCCESS);
    }
    let _lock = crate::run::lock_data_dir(&config.data_dir)?;
    // SAFETY: umask only changes this process's file-creation mask.
    unsafe { libc::umask(0o077) };
    let key = crate::vault::store_key(&config, crate::vault::Create::IfFresh)?;
    // Schema steps on a large store can rewrite tables: one line per step.
    let db = config.data_dir.join("keel.db");
    let large = std::fs::metadata(&db).is_ok_and(|m| m.len() > LARGE_BYTES);
    let mut shown = ProgressLine::on(
        format!("migrating {}", db.display()),
        Unit::Migrations,
        0,
        large && std::io::stderr().is_terminal(),
    );
    let (conn, report) = persistence::open_store_noted(
        &StoreOptions::from_config(&config, key.as_ref()),
        &mut |d, t| shown.show(d, t),
    )
    .with_context(|| format!("migrating {}", config.data_dir.display()))?;
    drop(shown);
    // An operator command can afford the full check a large store skips at start.
    if let Some(db) = &report.deferred_check {
        let problems = meta::quick_check(&conn)?;
        if problems != ["ok"] {
            anyhow::bail!(
                "database {} is corrupt: {}",
                db.display(),
                problems.join("; ")
            );
        }
    }
    if report.migrated_from != report.schema_version {
        let tx = conn.unchecked_transaction()?;
        keel_actors::persistence::audit::append(
            &tx,
            &keel_actors::clock::Clock::stamp(&keel_actors::clock::WallClock),
            "migrated",
            &json!({"from": report.migrated_from, "to": report.schema_version}),
        )?;
        tx.commit()?;
    }
    println!(
        "schema version {} (was {})",
        report.schema_version, report.migrated_from
    );
    Ok(ExitCode::SUCCESS)
}

/// The store of `dir`, read-only (safe while keel runs), either backend.
pub(crate) fn open_store_ro(dir: &DataDirArg) -> Result<Store> {
    Store::open_ro(&config_for(dir)?)
}

/// A store older than the schema that brought `what` has no table for it:
/// say so in one line.
pub(crate) fn no_table(
    what: &'static str,
) -> impl Fn(keel_actors::error::StoreError) -> anyhow::Error {
    move |e| {
        if e.to_string().contains("no such table") {
            anyhow::anyhow!("this store has no {what} yet (schema predates them; run keel migrate)")
        } else {
            e.into()
        }
    }
}

/// Print `rows` as `{"<key>": [...]}` or one `line` each (`empty` when none).
pub(crate) fn print_rows<T: serde::Serialize>(
    rows: &[T],
    as_json: bool,
    key: &str,
    empty: &str,
    line: impl Fn(&T) -> String,
) {
    if as_json {
        println!("{}", json!({ key: rows }));
    } else if rows.is_empty() {
        println!("{empty}");
    } else {
        for r in rows {
            println!("{}", line(r));
        }
    }
}
