//! A real Docker engine for the container tests.
//!
//! - [`engine`] gives the engine of this test binary: the one named by
//!   `KEEL_TEST_DOCKER_HOST` (`.ci/run` starts one for the whole run), or
//!   a private `dockerd` started once per test binary (vfs, no iptables, no
//!   bridge, its own socket and data root under /tmp). The private daemon
//!   is forked by a thread that lives as long as the test process and gets
//!   `PR_SET_PDEATHSIG = SIGTERM`, so it stops when the tests end.
//! - [`docker_or_skip`] skips a test when no engine can be had, and fails
//!   it instead when `KEEL_TEST_REQUIRE_DOCKER` is set (CI).
//! - The test image `localhost/keel-test:latest` is imported once from
//!   `/bin/busybox` (no registry is reachable) unless the engine has it
//!   already (`.ci/run` imports the same image when it starts dockerd).
//! - [`Engine::api`] speaks raw HTTP/1.0 to the socket (no docker CLI and
//!   no client library needed); helpers list, plant and remove containers.
//!   An [`Instance`] guard removes every container of its instance on drop.

#![allow(clippy::disallowed_methods)]
#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub const IMAGE: &str = "localhost/keel-test:latest";

pub struct Engine {
    pub socket: PathBuf,
}

impl Engine {
    /// `unix://…` for `[containers] docker_host`.
    pub fn host(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// One request; returns (status, body).
    pub fn api(&self, method: &str, path: &str, body: Option<(&str, &[u8])>) -> (u16, Vec<u8>) {
        let mut s = UnixStream::connect(&self.socket).expect("connect to the test engine");
        s.set_read_timeout(Some(Duration::from_secs(120))).ok();
        let mut req = format!("{method} /v1.41{path} HTTP/1.0\r\nHost: docker\r\n");
        if let Some((ctype, bytes)) = body {
            req.push_str(&format!(
                "Content-Type: {ctype}\r\nContent-Length: {}\r\n",
                bytes.len()
            ));
        }
        req.push_str("\r\n");
        s.write_all(req.as_bytes()).expect("write request");
        if let Some((_, bytes)) = body {
            s.write_all(bytes).expect("write body");
        }
        let mut out = Vec::new();
        s.read_to_end(&mut out).expect("read answer");
        let split = out
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("http answer");
        let head = String::from_utf8_lossy(&out[..split]).to_string();
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("status code");
        (status, out[split + 4..].to_vec())
    }

    pub fn json(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
        let bytes = body.map(|b| b.to_string().into_bytes());
        let (status, out) = self.api(
            method,
            path,
            bytes.as_deref().map(|b| ("application/json", b)),
        );
        (status, serde_json::from_slice(&out).unwrap_or(Value::Null))
    }

    /// Every container (any state) labelled `keel.instance=<instance>`.
    pub fn containers(&self, instance: &str) -> Vec<Value> {
        let filters = json!({"label": [format!("keel.instance={instance}")]}).to_string();
        let (status, v) = self.json(
            "GET",
            &format!("/containers/json?all=1&filters={}", urlencode(&filters)),
            None,
        );
        assert_eq!(status, 200, "list containers: {v}");
        v.as_array().cloned().unwrap_or_default()
    }

    /// Names (without `/`) of `containers(instance)` with their state.
    pub fn names(&self, instance: &str) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = self
            .containers(instance)
            .iter()
            .map(|c| {
                (
                    c["Names"][0]
                        .as_str()
                        .unwrap_or("")
                        .trim_start_matches('/')
                        .to_string(),
                    c["State"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect();
        out.sort();
        out
    }

    /// Create (and start when `start`) a container with these labels.
    pub fn plant(&self, name: &str, labels: Value, start: bool) -> String {
        let (status, v) = self.json(
            "POST",
            &format!("/containers/create?name={name}"),
            Some(&json!({
                "Image": IMAGE,
                "Cmd": ["sleep", "3600"],
                "Labels": labels,
                "HostConfig": {"NetworkMode": "none"},
            })),
        );
        assert_eq!(status, 201, "create {name}: {v}");
        let id = v["Id"].as_str().expect("id").to_string();
        if start {
            let (status, out) = self.api("POST", &format!("/containers/{id}/start"), None);
            assert!(
                status == 204,
                "start {name}: {}",
                String::from_utf8_lossy(&out)
            );
        }
        id
    }

    pub fn remove(&self, id_or_name: &str) {
        let (status, out) = self.api(
            "DELETE",
            &format!("/containers/{id_or_name}?force=1&v=1"),
            None,
        );
        assert!(
            status == 204 || status == 404,
            "remove {id_or_name}: {status} {}",
            String::from_utf8_lossy(&out)
        );
    }

    pub fn inspect(&self, id_or_name: &str) -> Option<Value> {
        let (status, v) = self.json("GET", &format!("/containers/{id_or_name}/json"), None);
        (status == 200).then_some(v)
    }

    fn ping(&self) -> bool {
        UnixStream::connect(&self.socket).is_ok() && self.api("GET", "/_ping", None).0 == 200
    }

    fn ensure_image(&self) {
        if self.api("GET", &format!("/images/{IMAGE}/json"), None).0 == 200 {
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("bin")).unwrap();
        let busybox = ["/bin/busybox", "/usr/bin/busybox"]
            .iter()
            .find(|p| Path::new(p).exists())
            .expect("busybox-static is installed");
        std::fs::copy(busybox, root.join("bin/busybox")).unwrap();
        for link in ["sh", "sleep", "echo", "cat", "true", "false", "ls", "date"] {
            std::os::unix::fs::symlink("busybox", root.join("bin").join(link)).unwrap();
        }
        std::fs::create_dir_all(root.join("tmp")).unwrap();
        let tar = Command::new("tar")
            .arg("-C")
            .arg(&root)
            .args(["-cf", "-", "."])
            .output()
            .expect("run tar");
        assert!(tar.status.success(), "tar failed");
        let (status, out) = self.api(
            "POST",
            "/images/create?fromSrc=-&repo=localhost/keel-test&tag=latest",
            Some(("application/x-tar", &tar.stdout)),
        );
        assert_eq!(
            status,
            200,
            "import image: {}",
            String::from_utf8_lossy(&out)
        );
    }
}

pub fn urlencode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

static ENGINE: OnceLock<Option<Engine>> = OnceLock::new();

/// The engine of this test binary, if one can be had.
pub fn engine() -> Option<&'static Engine> {
    ENGINE
        .get_or_init(|| {
            let engine = match std::env::var("KEEL_TEST_DOCKER_HOST") {
                Ok(host) if !host.is_empty() => Engine {
                    socket: PathBuf::from(host.trim_start_matches("unix://")),
                },
                _ => start_private()?,
            };
            if !engine.ping() {
                eprintln!("test engine at {} does not answer", engine.socket.display());
                return None;
            }
            engine.ensure_image();
            Some(engine)
        })
        .as_ref()
}

/// The engine, or `None` (test skipped) — a failure instead when
/// `KEEL_TEST_REQUIRE_DOCKER` is set.
pub fn docker_or_skip(test: &str) -> Option<&'static Engine> {
    if let Some(e) = engine() {
        return Some(e);
    }
    if std::env::var_os("KEEL_TEST_REQUIRE_DOCKER").is_some_and(|v| v != "0" && !v.is_empty()) {
        panic!("{test}: needs a Docker engine and KEEL_TEST_REQUIRE_DOCKER is set");
    }
    eprintln!("{test}: skipped: no Docker engine (install docker.io, run as root)");
    None
}

fn start_private() -> Option<Engine> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    let dockerd = ["/usr/sbin/dockerd", "/usr/bin/dockerd"]
        .iter()
        .find(|p| Path::new(p).exists())?
        .to_string();
    clean_stale_dirs();
    let dir = PathBuf::from(format!("/tmp/keel-test-dockerd-{}", std::process::id()));
    std::fs::create_dir_all(&dir).ok()?;
    let socket = dir.join("docker.sock");
    let log = std::fs::File::create(dir.join("dockerd.log")).ok()?;
    let (tx, rx) = std::sync::mpsc::channel();
    let d = dir.clone();
    // The forking thread lives as long as the process: PDEATHSIG follows
    // the thread, and the daemon must outlive every test of the binary.
    std::thread::spawn(move || {
        use std::os::unix::process::CommandExt;
        let mut cmd = Command::new(dockerd);
        cmd.arg("--host")
            .arg(format!("unix://{}", d.join("docker.sock").display()))
            .arg("--data-root")
            .arg(d.join("data"))
            .arg("--exec-root")
            .arg(d.join("exec"))
            .arg("--pidfile")
            .arg(d.join("dockerd.pid"))
            .args([
                "--storage-driver=vfs",
                "--iptables=false",
                "--ip6tables=false",
                "--bridge=none",
                "--ip-forward=false",
                "--ip-masq=false",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log));
        // SAFETY: prctl is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let child = cmd.spawn();
        let _ = tx.send(child.is_ok());
        if let Ok(mut c) = child {
            let _ = c.wait();
        }
    });
    if !rx.recv().unwrap_or(false) {
        return None;
    }
    let engine = Engine { socket };
    let end = Instant::now() + Duration::from_secs(30);
    while Instant::now() < end {
        if engine.socket.exists() && engine.ping() {
            return Some(engine);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!(
        "private dockerd did not come up; see {}",
        dir.join("dockerd.log").display()
    );
    None
}

/// Data roots of private daemons whose test process is gone.
fn clean_stale_dirs() {
    let Ok(entries) = std::fs::read_dir("/tmp") else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let Some(pid) = name.strip_prefix("keel-test-dockerd-") else {
            continue;
        };
        let alive = pid
            .parse::<i32>()
            .map(|p| Path::new(&format!("/proc/{p}")).exists())
            .unwrap_or(true);
        let daemon_alive = std::fs::read_to_string(e.path().join("dockerd.pid"))
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok())
            .is_some_and(|p| Path::new(&format!("/proc/{p}")).exists());
        if !alive && !daemon_alive {
            // dockerd leaves its default network namespace bind-mounted.
            let netns = e.path().join("exec/netns/default");
            if netns.exists() {
                let _ = Command::new("umount").arg("-l").arg(&netns).status();
            }
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// A fresh instance id for one test; its containers are removed on drop.
pub struct Instance {
    pub id: String,
    engine: &'static Engine,
}

impl Instance {
    pub fn new(engine: &'static Engine, tag: &str) -> Instance {
        use rand::Rng;
        let n: u32 = rand::thread_rng().gen();
        let tag: String = tag
            .chars()
            .filter(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
            .take(12)
            .collect();
        Instance {
            id: format!("t{tag}{n:08x}"),
            engine,
        }
    }

    /// `keel.managed=true`, `keel.instance=<id>`, `keel.kind=<kind>` + extra.
    pub fn labels(&self, kind: &str, extra: &[(&str, &str)]) -> Value {
        let mut m = serde_json::Map::new();
        m.insert("keel.managed".into(), json!("true"));
        m.insert("keel.instance".into(), json!(self.id));
        m.insert("keel.kind".into(), json!(kind));
        for (k, v) in extra {
            m.insert((*k).into(), json!(v));
        }
        Value::Object(m)
    }

    /// The `[containers]` section for this instance.
    pub fn toml(&self, interval_s: u64) -> String {
        format!(
            "\n[containers]\nenabled = true\ndocker_host = {:?}\ninstance = {:?}\nreconcile_interval_s = {interval_s}\nrequest_timeout_ms = 5000\n",
            self.engine.host(),
            self.id
        )
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        for c in self.engine.containers(&self.id) {
            if let Some(id) = c["Id"].as_str() {
                self.engine.remove(id);
            }
        }
    }
}
