//! PostgreSQL for the tests: each test gets its own fresh database on one
//! cluster. CI (`.ci/run`) starts a private cluster on a Unix socket and
//! exports `KEEL_TEST_PG_URL` (libpq URL of a database on it whose user may
//! create databases) and `KEEL_TEST_REQUIRE_PG=1`. Without the URL the
//! harness starts a private cluster itself when PostgreSQL is installed
//! (`initdb` + `postgres` on a socket in a temp dir, as the `postgres` user
//! when running as root; a watcher stops it when the test process exits),
//! and skips otherwise — or fails when `KEEL_TEST_REQUIRE_PG` is set.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Where Debian puts the server binaries.
const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// Run `f` on a thread of its own: the sync `postgres` client drives a
/// runtime of its own, which cannot start inside an async test.
pub fn off_runtime<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| s.spawn(f).join().expect("postgres helper thread"))
}

/// The cluster the tests use: socket directory and user.
#[derive(Debug, Clone)]
pub struct Cluster {
    pub host: String,
    pub user: String,
}

impl Cluster {
    /// URL of database `db` on this cluster (libpq form, socket directory).
    pub fn url(&self, db: &str) -> String {
        format!("postgresql://{}@/{db}?host={}", self.user, self.host)
    }

    fn admin(&self) -> postgres::Client {
        let mut last = None;
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            match postgres::Client::connect(
                &format!("host={} user={} dbname=postgres", self.host, self.user),
                postgres::NoTls,
            ) {
                Ok(c) => return c,
                Err(e) => last = Some(e),
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!(
            "cannot connect to the test cluster at {}: {last:?}",
            self.host
        );
    }
}

/// A database of its own for one test, dropped afterwards.
pub struct TestDb {
    pub cluster: Cluster,
    pub name: String,
    pub url: String,
}

impl Drop for TestDb {
    fn drop(&mut self) {
        off_runtime(|| {
            let mut c = self.cluster.admin();
            let _ = c.batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ));
        });
    }
}

fn required() -> bool {
    std::env::var_os("KEEL_TEST_REQUIRE_PG").is_some_and(|v| v != "0" && !v.is_empty())
}

fn cluster() -> Option<&'static Cluster> {
    static CLUSTER: OnceLock<Option<Cluster>> = OnceLock::new();
    CLUSTER
        .get_or_init(|| {
            if let Ok(url) = std::env::var("KEEL_TEST_PG_URL") {
                let config: postgres::Config = url.parse().expect("KEEL_TEST_PG_URL parses");
                let host = config
                    .get_hosts()
                    .iter()
                    .map(|h| match h {
                        postgres::config::Host::Unix(p) => p.display().to_string(),
                        postgres::config::Host::Tcp(t) => t.clone(),
                    })
                    .next()
                    .expect("KEEL_TEST_PG_URL names a host");
                let user = config.get_user().unwrap_or("postgres").to_string();
                return Some(Cluster { host, user });
            }
            start_private()
        })
        .as_ref()
}

/// A fresh database for `test`, or `None` (skip) when PostgreSQL is not
/// available and not required.
pub fn fresh_db(test: &str) -> Option<TestDb> {
    let Some(cluster) = cluster() else {
        if required() {
            panic!("{test}: needs PostgreSQL and KEEL_TEST_REQUIRE_PG is set");
        }
        eprintln!("{test}: skipped (no PostgreSQL; set KEEL_TEST_PG_URL or install postgresql)");
        return None;
    };
    static N: AtomicU64 = AtomicU64::new(0);
    let name = format!(
        "keel_t{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    );
    off_runtime(|| {
        cluster
            .admin()
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .expect("create a test database")
    });
    Some(TestDb {
        cluster: cluster.clone(),
        url: cluster.url(&name),
        name,
    })
}

/// Start a private cluster in a temp dir; `None` when PostgreSQL is not
/// installed.
fn start_private() -> Option<Cluster> {
    let bin = Path::new(PG_BIN);
    if !bin.join("initdb").exists() {
        return None;
    }
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let dir = PathBuf::from(format!("/tmp/keel-test-pg.{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("sock")).ok()?;
    let as_pg = |cmd: &mut Command| {
        if root {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(cmd.get_program());
            c.args(cmd.get_args());
            c
        } else {
            let mut c = Command::new(cmd.get_program());
            c.args(cmd.get_args());
            c
        }
    };
    if root {
        let ok = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(&dir)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            return None;
        }
    }
    let initdb = as_pg(
        Command::new(bin.join("initdb"))
            .arg("-D")
            .arg(dir.join("data"))
            .args(["-A", "trust", "-U", "keel", "--no-sync"]),
    )
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .status()
    .ok()?;
    if !initdb.success() {
        return None;
    }
    // The server runs under a shell that stops it (and removes the
    // directory) once this test process is gone.
    let script = format!(
        "{pg} -D {d}/data -k {d}/sock -c listen_addresses= -c fsync=on >{d}/log 2>&1 &
         srv=$!
         while [ -d /proc/{me} ]; do sleep 0.5; done
         kill -INT $srv; wait $srv; rm -rf {d}",
        pg = bin.join("postgres").display(),
        d = dir.display(),
        me = std::process::id()
    );
    as_pg(Command::new("sh").arg("-c").arg(script))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    Some(Cluster {
        host: dir.join("sock").display().to_string(),
        user: "keel".into(),
    })
}
