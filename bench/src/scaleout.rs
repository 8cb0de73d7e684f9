//! `keel bench --backend postgres --instances 1,3 [--url URL]`: durable
//! acknowledgements per second with N keel instances sharing one PostgreSQL
//! server (issue 13), and a keel on plain SQLite in the same run.
//!
//! The same webhook clients as `keel bench` (closed loop, one chat each)
//! are spread round-robin over the instances, so turns of one chat always
//! reach the same instance, as a load balancer with session affinity would
//! send them. Each count of instances gets a fresh database on the server
//! (created here, dropped afterwards unless `--keep`), every instance its
//! own data dir and the same master key. Without `--url` the bench starts a
//! private cluster in a temp dir (`initdb`, `pg_ctl`, a Unix socket only,
//! `fsync = on`), as the tests do, and stops it at the end.
//!
//! PostgreSQL here shares the machine's two cores with every keel and the
//! load generator, so the figures say what one small server does; they are
//! printed as ratios against the SQLite keel of the same run, never
//! asserted.

use std::fs::DirBuilder;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use keel_actors::persistence::pg;
use rand::RngCore;
use serde_json::{json, Value};

use crate::messages::{
    drive, progress, round, runtime, BenchArgs, Keel, Line, LoadStats, Probe, Scratch, Window,
};

/// A measured run: what the clients saw and what the keels reported.
struct Run {
    what: String,
    instances: usize,
    line: Line,
    load: LoadStats,
    probe: Probe,
}

impl Run {
    fn new(what: String, instances: usize, seconds: f64, mut load: LoadStats, probe: Probe) -> Run {
        let line = Line::from_latencies(load.acked as f64 / seconds, &mut load.latencies);
        Run {
            what,
            instances,
            line,
            load,
            probe,
        }
    }

    fn jobs_per_commit(&self) -> Option<f64> {
        (self.probe.commits > 0.0).then(|| self.probe.jobs / self.probe.commits)
    }

    /// CPU of all keels (not the server) per acknowledged message, µs.
    fn cpu_us_per_ack(&self) -> Option<f64> {
        let cpu = self.probe.keel_cpu?;
        (self.probe.elapsed > 0.0 && self.line.per_second > 0.0)
            .then(|| cpu / self.probe.elapsed * 1e6 / self.line.per_second)
    }

    fn to_json(&self) -> Value {
        let mut v = self.line.to_json();
        v["instances"] = json!(self.instances);
        v["acked"] = json!(self.load.acked);
        v["non_200"] = json!(self.load.non_200);
        v["failed_requests"] = json!(self.load.errors);
        v["commits"] = json!(self.probe.commits);
        v["jobs_per_commit"] = json!(self.jobs_per_commit().map(|r| round(r, 2)));
        v["keel_cpu_us_per_ack"] = json!(self.cpu_us_per_ack().map(|r| round(r, 2)));
        v
    }

    fn failed(&self) -> bool {
        if self.load.non_200 == 0 && self.load.errors == 0 {
            return false;
        }
        eprintln!(
            "keel bench: {}: {} non-200 responses and {} failed requests (must be 0){}",
            self.what,
            self.load.non_200,
            self.load.errors,
            self.load
                .first_failure
                .as_deref()
                .map(|f| format!("; first: {f}"))
                .unwrap_or_default()
        );
        true
    }
}

/// Run the PostgreSQL benchmark; see the module documentation.
pub(crate) fn bench_postgres(args: &BenchArgs, binary: &Path) -> Result<ExitCode> {
    let counts = args.instances.clone().unwrap_or_else(|| vec![1, 3]);
    if counts.is_empty() || counts.contains(&0) {
        bail!("--instances takes counts of at least 1, e.g. --instances 1,3");
    }
    if let Some(&n) = counts.iter().find(|&&n| n > args.clients) {
        bail!(
            "--instances {n} is more than --clients {}: some instances would get no load",
            args.clients
        );
    }
    let scratch = Scratch::create(args.keep)?;
    let server = match &args.url {
        Some(url) => Server::Given(url.clone()),
        None => {
            progress("starting a private PostgreSQL cluster".into());
            Server::Private(PrivateCluster::start()?)
        }
    };

    // SQLite first, while the server idles.
    let dir = scratch.path.join("sqlite");
    make_dir(&dir)?;
    progress(format!(
        "SQLite keel (plain store): {} clients, {} s",
        args.clients, args.seconds
    ));
    let extra = "[storage]\nsynchronous = \"full\"\nencrypt = false\n\n[webhook]\nenabled = true\n";
    let sqlite = measure(args, binary, &[dir], extra, &[], "SQLite, 1 instance")?;

    // Every instance is given the same master key (the shared store's
    // secrets open under it), by the environment as an operator would.
    let mut key = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut key);
    let key = hex::encode(key);
    let mut shared = Vec::new();
    for &n in &counts {
        let db = format!("keel_bench_{}_{n}", std::process::id());
        let url = server.create_db(&db)?;
        let dirs: Vec<PathBuf> = (0..n)
            .map(|i| scratch.path.join(format!("postgres-{n}/{i}")))
            .collect();
        for d in &dirs {
            make_dir(d)?;
        }
        progress(format!(
            "PostgreSQL, {n} instance(s) on database {db}: {} clients, {} s",
            args.clients, args.seconds
        ));
        let config = "[storage]\nbackend = \"postgres\"\n\n[webhook]\nenabled = true\n";
        let env = [
            ("KEEL_DATABASE_URL", url.as_str()),
            ("KEEL_MASTER_KEY", key.as_str()),
        ];
        let what = format!("PostgreSQL, {n} instance{}", if n == 1 { "" } else { "s" });
        let run = measure(args, binary, &dirs, config, &env, &what);
        if !args.keep {
            server.drop_db(&db);
        }
        shared.push(run?);
    }

    let one = shared.iter().find(|r| r.instances == 1);
    let vs_sqlite = |r: &Run| ratio(r.line.per_second, sqlite.line.per_second);
    let vs_one = |r: &Run| one.and_then(|o| ratio(r.line.per_second, o.line.per_second));
    if args.json {
        let runs: Vec<Value> = shared
            .iter()
            .map(|r| {
                let mut v = r.to_json();
                v["vs_sqlite"] = json!(vs_sqlite(r).map(|x| round(x, 3)));
                v["vs_one_instance"] = json!(vs_one(r).map(|x| round(x, 3)));
                v
            })
            .collect();
        println!(
            "{}",
            json!({
                "backend": "postgres",
                "server": server.describe(),
                "clients": args.clients,
                "seconds": args.seconds,
                "synchronous": "full / synchronous_commit = on",
                "sqlite": sqlite.to_json(),
                "postgres": runs,
            })
        );
    } else {
        println!(
            "keel bench --backend postgres — {} clients, {} s, server: {}",
            args.clients,
            args.seconds,
            server.describe()
        );
        println!(
            "{:<26}{:>10}{:>9}{:>9}{:>12}{:>13}{:>11}",
            "", "acks/s", "p50 ms", "p99 ms", "jobs/commit", "keel µs/ack", "vs SQLite"
        );
        let opt = |v: Option<f64>, d: usize| v.map_or_else(|| "-".into(), |v| format!("{v:.d$}"));
        for r in std::iter::once(&sqlite).chain(&shared) {
            println!(
                "{:<26}{:>10.0}{:>9}{:>9}{:>12}{:>13}{:>11}",
                r.what,
                r.line.per_second,
                opt(r.line.p50_ms, 1),
                opt(r.line.p99_ms, 1),
                opt(r.jobs_per_commit(), 1),
                opt(r.cpu_us_per_ack(), 0),
                opt(vs_sqlite(r), 2),
            );
        }
        for r in shared.iter().filter(|r| r.instances != 1) {
            println!(
                "{} instances / 1 instance = {}",
                r.instances,
                opt(vs_one(r), 2)
            );
        }
    }
    if args.keep {
        eprintln!("keel bench: scratch kept in {}", scratch.path.display());
    }
    let failed = std::iter::once(&sqlite)
        .chain(&shared)
        .fold(false, |f, r| r.failed() | f);
    Ok(if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

fn ratio(a: f64, b: f64) -> Option<f64> {
    (b > 0.0).then(|| a / b)
}

fn make_dir(dir: &Path) -> Result<()> {
    DirBuilder::new()
        .mode(0o700)
        .recursive(true)
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))
}

/// Start one keel per dir with `config` and `env`, wait until all are
/// ready, drive the clients over all of them, stop them.
fn measure(
    args: &BenchArgs,
    binary: &Path,
    dirs: &[PathBuf],
    config: &str,
    env: &[(&str, &str)],
    what: &str,
) -> Result<Run> {
    let rt = runtime()?;
    let mut keels = Vec::with_capacity(dirs.len());
    for dir in dirs {
        keels.push(Keel::start_configured(binary, dir, config, env)?);
    }
    let mut targets = Vec::with_capacity(keels.len());
    for keel in &mut keels {
        let base = format!("http://{}", keel.addr);
        rt.block_on(keel.wait_ready(&base))
            .with_context(|| format!("{what}: keel in {}", keel.log.display()))?;
        targets.push((base, keel.pid));
    }
    let window = Window::after_warmup(args.warmup_seconds, args.seconds);
    let (load, probe) = drive(&rt, &targets, args.clients, args.load_threads, window)?;
    for keel in &mut keels {
        let status = keel.stop().context("stopping keel")?;
        if !status.success() {
            eprintln!(
                "keel bench: {what}: a keel exited with {status}; its log:\n{}",
                crate::messages::log_tail(&keel.log)
            );
        }
    }
    Ok(Run::new(
        what.to_string(),
        dirs.len(),
        args.seconds,
        load,
        probe,
    ))
}

// ---------------------------------------------------------------------------
// The server.

enum Server {
    /// The operator's `--url`.
    Given(String),
    Private(PrivateCluster),
}

impl Server {
    fn admin_url(&self) -> String {
        match self {
            Server::Given(url) => url.clone(),
            Server::Private(c) => c.url("postgres"),
        }
    }

    fn describe(&self) -> String {
        match self {
            Server::Given(url) => pg::redact_url(url),
            Server::Private(c) => format!("private cluster on {}", c.sock().display()),
        }
    }

    fn admin(&self) -> Result<postgres::Client> {
        let url = self.admin_url();
        pg::connect(&url).with_context(|| format!("cannot connect to {}", pg::redact_url(&url)))
    }

    /// Create database `name` and return keel's URL of it.
    fn create_db(&self, name: &str) -> Result<String> {
        let mut admin = self.admin()?;
        // One statement per call: neither may run in a transaction block.
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .and_then(|()| admin.batch_execute(&format!("CREATE DATABASE {name}")))
            .with_context(|| {
                format!(
                    "cannot create database {name} on {} (the bench needs a user that may create databases)",
                    self.describe()
                )
            })?;
        Ok(with_dbname(&self.admin_url(), name))
    }

    fn drop_db(&self, name: &str) {
        let dropped = self.admin().and_then(|mut admin| {
            admin
                .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .map_err(anyhow::Error::from)
        });
        if let Err(e) = dropped {
            eprintln!("keel bench: cannot drop database {name}: {e:#}");
        }
    }
}

/// `url` with its database replaced by `db` (libpq URL or key=value form).
fn with_dbname(url: &str, db: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://") {
        let (authority, tail) = match rest.find(['/', '?']) {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        let query = tail.find('?').map_or("", |i| &tail[i..]);
        format!("{scheme}://{authority}/{db}{query}")
    } else {
        format!("{url} dbname={db}")
    }
}

/// A PostgreSQL cluster of the bench's own in a temp dir, listening on a
/// Unix socket only, run as the `postgres` user when the bench runs as
/// root. Stopped on drop; a watcher stops it too should the bench die.
struct PrivateCluster {
    dir: PathBuf,
    bin: PathBuf,
    root: bool,
}

impl PrivateCluster {
    fn start() -> Result<PrivateCluster> {
        let bin = server_bin()?;
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let dir =
            std::env::temp_dir().join(format!("keel-bench-pg-{}-{nanos}", std::process::id()));
        make_dir(&dir.join("sock"))?;
        let cluster = PrivateCluster { dir, bin, root };
        if root {
            run(
                Command::new("chown")
                    .args(["-R", "postgres:postgres"])
                    .arg(&cluster.dir),
                "chown the cluster dir to the postgres user (is postgresql installed?)",
            )?;
        }
        let data = cluster.dir.join("data");
        run(
            &mut cluster.as_pg(
                &cluster.bin.join("initdb"),
                &[
                    "-D".as_ref(),
                    data.as_os_str(),
                    "-A".as_ref(),
                    "trust".as_ref(),
                    "-U".as_ref(),
                    "keel".as_ref(),
                ],
            ),
            "initdb",
        )?;
        let opts = format!(
            "-k {} -c listen_addresses= -c fsync=on -c max_connections=200",
            cluster.sock().display()
        );
        let log = cluster.dir.join("log");
        run(
            &mut cluster.as_pg(
                &cluster.bin.join("pg_ctl"),
                &[
                    "-D".as_ref(),
                    data.as_os_str(),
                    "-l".as_ref(),
                    log.as_os_str(),
                    "-w".as_ref(),
                    "-o".as_ref(),
                    opts.as_ref(),
                    "start".as_ref(),
                ],
            ),
            "pg_ctl start",
        )?;
        // Should the bench be killed, stop the server once it is gone.
        let watcher = format!(
            "while [ -d /proc/{me} ]; do sleep 1; done; {pg_ctl} -D {data} -m immediate stop; rm -rf {dir}",
            me = std::process::id(),
            pg_ctl = cluster.bin.join("pg_ctl").display(),
            data = data.display(),
            dir = cluster.dir.display(),
        );
        cluster
            .as_pg(
                Path::new("setsid"),
                &["sh".as_ref(), "-c".as_ref(), watcher.as_ref()],
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start the cluster's watcher")?;
        Ok(cluster)
    }

    fn sock(&self) -> PathBuf {
        self.dir.join("sock")
    }

    fn url(&self, db: &str) -> String {
        format!("postgresql://keel@/{db}?host={}", self.sock().display())
    }

    /// `program args…`, as the postgres user when root.
    fn as_pg(&self, program: &Path, args: &[&std::ffi::OsStr]) -> Command {
        let mut c = if self.root {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(program);
            c
        } else {
            Command::new(program)
        };
        c.args(args);
        c
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        let data = self.dir.join("data");
        let stopped = run(
            &mut self.as_pg(
                &self.bin.join("pg_ctl"),
                &[
                    "-D".as_ref(),
                    data.as_os_str(),
                    "-m".as_ref(),
                    "fast".as_ref(),
                    "-w".as_ref(),
                    "stop".as_ref(),
                ],
            ),
            "pg_ctl stop",
        );
        if let Err(e) = stopped {
            eprintln!("keel bench: {e:#}");
        }
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            eprintln!("keel bench: cannot remove {}: {e}", self.dir.display());
        }
    }
}

/// Run `cmd` to completion; its output is shown only when it fails.
fn run(cmd: &mut Command, what: &str) -> Result<()> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(())
}

/// The newest installed PostgreSQL server's bin dir (Debian layout), or
/// the one holding `initdb` on `PATH`.
fn server_bin() -> Result<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Ok(bin);
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .find(|d| d.join("initdb").exists() && d.join("pg_ctl").exists())
        .ok_or_else(|| {
            anyhow::anyhow!(
                "no PostgreSQL server found (install Debian's postgresql, or pass --url of a server)"
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_database_of_a_url_is_replaced() {
        assert_eq!(
            with_dbname("postgresql://keel@/postgres?host=/tmp/s", "b1"),
            "postgresql://keel@/b1?host=/tmp/s"
        );
        assert_eq!(
            with_dbname("postgres://u:p@db.example:5433", "b1"),
            "postgres://u:p@db.example:5433/b1"
        );
        assert_eq!(
            with_dbname("postgresql://u@h/x?sslmode=disable", "b1"),
            "postgresql://u@h/b1?sslmode=disable"
        );
        assert_eq!(
            with_dbname("host=/tmp/s user=keel", "b1"),
            "host=/tmp/s user=keel dbname=b1"
        );
    }
}
