//! What a container may be (R46): the service spec, its allow-list, its
//! hash, keel's labels and deterministic names. Pure; the reaper and the
//! HTTP/CLI front ends share it, so a refusal reads the same everywhere.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub const LABEL_MANAGED: &str = "keel.managed";
pub const LABEL_INSTANCE: &str = "keel.instance";
pub const LABEL_KIND: &str = "keel.kind";
pub const LABEL_SERVICE: &str = "keel.service";
pub const LABEL_SPEC: &str = "keel.spec";
pub const LABEL_TASK: &str = "keel.task";

/// What a managed container is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Lives only while keel runs: reaped at start and on SIGTERM.
    Ephemeral,
    /// Desired state from the event log: adopted at start, reconciled.
    Service,
    /// Runs one container task; never reaped while its task is RUNNING.
    Task,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Ephemeral => "ephemeral",
            Kind::Service => "service",
            Kind::Task => "task",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        match s {
            "ephemeral" => Some(Kind::Ephemeral),
            "service" => Some(Kind::Service),
            "task" => Some(Kind::Task),
            _ => None,
        }
    }
}

/// A service's desired container. Fields that are never allowed
/// (`privileged`, host namespaces, capabilities, devices, dangerous mounts)
/// are accepted by the parser only so the refusal can name them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServiceSpec {
    pub image: String,
    /// argv after the image's entrypoint; empty = the image's default.
    pub command: Vec<String>,
    pub env: BTreeMap<String, String>,
    /// User labels; may not start with `keel.`.
    pub labels: BTreeMap<String, String>,
    /// Memory limit: bytes, or a number with k, m or g.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory: Option<String>,
    /// CPU limit in cores (e.g. 0.5).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpus: Option<f64>,
    /// A user-defined network; none = `network_mode = "none"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    /// Bind mounts `SRC:DST[:ro]`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<String>,
    #[serde(skip_serializing_if = "is_false")]
    pub privileged: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub network_mode: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid_mode: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ipc_mode: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub cap_add: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<String>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// A refused spec: the field and why (one line).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct SpecError {
    pub field: String,
    pub reason: String,
}

fn refuse(field: impl Into<String>, reason: impl Into<String>) -> SpecError {
    SpecError {
        field: field.into(),
        reason: reason.into(),
    }
}

/// Paths no container may mount (the engine socket, keel's data dir).
#[derive(Debug, Clone, Default)]
pub struct Forbidden {
    pub paths: Vec<PathBuf>,
}

/// Longest service or task name.
pub const MAX_NAME: usize = 48;

/// A service name: 1–48 of `a-z 0-9 _ -`, starting with a letter or digit
/// (it becomes part of a container name).
pub fn check_name(name: &str) -> Result<(), SpecError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(refuse(
            "name",
            format!(
                "must be 1 to {MAX_NAME} characters of a-z, 0-9, _ and -, starting with a letter or digit; got {:?}",
                name.chars().take(60).collect::<String>()
            ),
        ))
    }
}

/// An image reference: `[host[:port]/]path[:tag][@digest]`, lowercase path.
pub fn check_image(image: &str) -> Result<(), SpecError> {
    let bad = |why: &str| {
        Err(refuse(
            "image",
            format!("{why}: {:?}", image.chars().take(80).collect::<String>()),
        ))
    };
    if image.is_empty() {
        return bad("must not be empty");
    }
    if image.len() > 255 {
        return bad("longer than 255 characters");
    }
    if !image
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"._-/:@".contains(&b))
    {
        return bad("not an image reference (allowed: a-z 0-9 . _ - / : @)");
    }
    let first = image.as_bytes()[0];
    let last = image.as_bytes()[image.len() - 1];
    if !first.is_ascii_alphanumeric() || !last.is_ascii_alphanumeric() {
        return bad("must start and end with a letter or digit");
    }
    if image.contains("//") || image.contains("::") || image.matches('@').count() > 1 {
        return bad("malformed image reference");
    }
    let name = image.split('@').next().unwrap_or(image);
    let path = match name.rsplit_once(':') {
        Some((p, tag)) if !tag.contains('/') => p,
        _ => name,
    };
    // The repository path (after an optional registry host) is lowercase.
    let repo = match path.split_once('/') {
        Some((host, rest)) if host.contains('.') || host.contains(':') || host == "localhost" => {
            rest
        }
        _ => path,
    };
    if repo.bytes().any(|b| b.is_ascii_uppercase()) {
        return bad("the repository name must be lowercase");
    }
    Ok(())
}

/// Bytes of a memory limit (`64m`, `1g`, `524288`).
pub fn parse_memory(text: &str) -> Result<i64, SpecError> {
    let t = text.trim().to_ascii_lowercase();
    let (num, mult) = match t.as_bytes().last() {
        Some(b'k') => (&t[..t.len() - 1], 1i64 << 10),
        Some(b'm') => (&t[..t.len() - 1], 1 << 20),
        Some(b'g') => (&t[..t.len() - 1], 1 << 30),
        Some(b'b') => (&t[..t.len() - 1], 1),
        _ => (t.as_str(), 1),
    };
    let n: i64 = num.parse().map_err(|_| {
        refuse(
            "memory",
            format!(
                "not a size (e.g. 64m, 1g): {:?}",
                text.chars().take(40).collect::<String>()
            ),
        )
    })?;
    let bytes = n
        .checked_mul(mult)
        .ok_or_else(|| refuse("memory", "too large"))?;
    // The engine refuses less than 6 MiB.
    if bytes < 6 << 20 {
        return Err(refuse("memory", "must be at least 6m"));
    }
    Ok(bytes)
}

fn no_control(field: &str, s: &str) -> Result<(), SpecError> {
    if s.chars().any(|c| c.is_control()) {
        return Err(refuse(
            field,
            "must not contain newlines or control characters",
        ));
    }
    Ok(())
}

impl ServiceSpec {
    /// The allow-list (R46). The first refused field is named.
    pub fn validate(&self, forbidden: &Forbidden) -> Result<(), SpecError> {
        check_image(&self.image)?;
        if self.privileged {
            return Err(refuse(
                "privileged",
                "privileged containers are not allowed",
            ));
        }
        if let Some(mode) = &self.network_mode {
            if mode != "none" {
                return Err(refuse(
                    "network_mode",
                    format!(
                        "only \"none\" is allowed (name a user-defined network in `network` instead), got {:?}",
                        mode.chars().take(40).collect::<String>()
                    ),
                ));
            }
        }
        for (field, mode) in [("pid_mode", &self.pid_mode), ("ipc_mode", &self.ipc_mode)] {
            if let Some(m) = mode {
                if m != "private" && !m.is_empty() {
                    return Err(refuse(field, "host or shared namespaces are not allowed"));
                }
            }
        }
        if let Some(cap) = self.cap_add.first() {
            return Err(refuse(
                "cap_add",
                format!(
                    "added capabilities are not allowed ({})",
                    cap.chars().take(40).collect::<String>()
                ),
            ));
        }
        if !self.devices.is_empty() {
            return Err(refuse("devices", "devices are not allowed"));
        }
        if let Some(net) = &self.network {
            let reserved = ["host", "bridge", "default", "none"];
            if net.is_empty()
                || net.len() > 64
                || reserved.contains(&net.as_str())
                || net.starts_with("container:")
                || !net
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
            {
                return Err(refuse(
                    "network",
                    format!(
                        "must name a user-defined network (not host, bridge, default, none or container:…), got {:?}",
                        net.chars().take(40).collect::<String>()
                    ),
                ));
            }
        }
        if self.command.len() > 256 {
            return Err(refuse("command", "more than 256 arguments"));
        }
        for arg in &self.command {
            if arg.contains('\0') || arg.len() > 8192 {
                return Err(refuse(
                    "command",
                    "an argument holds NUL or is longer than 8192 bytes",
                ));
            }
        }
        for (k, v) in &self.env {
            if k.is_empty() || k.contains('=') || k.len() > 256 {
                return Err(refuse(
                    format!("env.{}", k.chars().take(40).collect::<String>()),
                    "names must be non-empty, without '=' and at most 256 bytes",
                ));
            }
            no_control(
                &format!("env.{}", k.chars().take(40).collect::<String>()),
                k,
            )?;
            no_control(
                &format!("env.{}", k.chars().take(40).collect::<String>()),
                v,
            )?;
        }
        for (k, v) in &self.labels {
            let field = format!("labels.{}", k.chars().take(40).collect::<String>());
            if k.starts_with("keel.") {
                return Err(refuse(field, "labels starting with keel. are keel's own"));
            }
            if k.is_empty() || k.len() > 128 || v.len() > 1024 {
                return Err(refuse(
                    field,
                    "keys must be 1 to 128 bytes, values at most 1024",
                ));
            }
            no_control(&field, k)?;
            no_control(&field, v)?;
        }
        if let Some(m) = &self.memory {
            parse_memory(m)?;
        }
        if let Some(c) = self.cpus {
            if !(c > 0.0 && c <= 1024.0) {
                return Err(refuse("cpus", "must be between 0 and 1024"));
            }
        }
        for m in &self.mounts {
            check_mount(m, forbidden)?;
        }
        Ok(())
    }

    /// The spec's hash: SHA-256 of its canonical JSON (maps are sorted).
    pub fn hash(&self) -> String {
        let json = serde_json::to_string(self).unwrap_or_default();
        hex::encode(Sha256::digest(json.as_bytes()))
    }
}

fn check_mount(m: &str, forbidden: &Forbidden) -> Result<(), SpecError> {
    let parts: Vec<&str> = m.split(':').collect();
    let (src, dst) = match parts.as_slice() {
        [s, d] => (*s, *d),
        [s, d, "ro" | "rw"] => (*s, *d),
        _ => return Err(refuse("mounts", "each mount is SRC:DST or SRC:DST:ro")),
    };
    if !src.starts_with('/') || !dst.starts_with('/') {
        return Err(refuse("mounts", "source and target must be absolute paths"));
    }
    no_control("mounts", m)?;
    // Both the path as written and the one the engine (on this host) would
    // mount once symlinks are followed: a link cannot bring in what is
    // refused by name.
    let written = normalize(Path::new(src));
    for path in [written.clone(), resolved(&written)] {
        if path == Path::new("/") {
            return Err(refuse("mounts", "mounting / is not allowed"));
        }
        if KERNEL_FS.iter().any(|k| path.starts_with(k)) {
            return Err(refuse(
                "mounts",
                format!(
                    "mounting {} is not allowed (a kernel filesystem: it reaches the host, /proc/1/root is its /)",
                    path.display()
                ),
            ));
        }
        for f in &forbidden.paths {
            for f in [normalize(f), resolved(&normalize(f))] {
                if path.starts_with(&f) || f.starts_with(&path) {
                    return Err(refuse(
                        "mounts",
                        format!(
                            "mounting {} is not allowed (the engine socket or keel's data dir)",
                            written.display()
                        ),
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Host directories no container may mount: they reach the host's
/// processes, devices and root.
const KERNEL_FS: [&str; 3] = ["/proc", "/sys", "/dev"];

/// `p` (already normalized) with the symlinks of its longest existing
/// prefix followed; the part that does not exist is kept as written.
fn resolved(p: &Path) -> PathBuf {
    let mut existing = p.to_path_buf();
    let mut rest = Vec::new();
    loop {
        if let Ok(mut out) = std::fs::canonicalize(&existing) {
            out.extend(rest.iter().rev());
            return normalize(&out);
        }
        match (
            existing.file_name().map(|n| n.to_os_string()),
            existing.parent(),
        ) {
            (Some(name), Some(parent)) => {
                rest.push(name);
                existing = parent.to_path_buf();
            }
            _ => return p.to_path_buf(),
        }
    }
}

/// `..` and `.` resolved lexically (the path need not exist).
fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in p.components() {
        match c {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::Normal(s) => out.push(s),
            _ => {}
        }
    }
    out
}

/// `keel-<instance>-<kind>-<name>-<n>`: the same decision always names the
/// same container, so a create repeated after a crash meets a 409.
pub fn container_name(instance: &str, kind: Kind, name: &str, n: i64) -> String {
    format!("keel-{instance}-{}-{name}-{n}", kind.as_str())
}

/// keel's labels for a container of `kind`.
pub fn labels(instance: &str, kind: Kind) -> HashMap<String, String> {
    HashMap::from([
        (LABEL_MANAGED.to_string(), "true".to_string()),
        (LABEL_INSTANCE.to_string(), instance.to_string()),
        (LABEL_KIND.to_string(), kind.as_str().to_string()),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: &str) -> Result<ServiceSpec, String> {
        serde_json::from_str(json).map_err(|e| e.to_string())
    }

    fn refusal(json: &str) -> String {
        let forbidden = Forbidden {
            paths: vec!["/var/run/docker.sock".into(), "/srv/keel".into()],
        };
        spec(json)
            .unwrap()
            .validate(&forbidden)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn the_allow_list_names_the_refused_field() {
        let table = [
            (r#"{"image":"busybox","privileged":true}"#, "privileged:"),
            (
                r#"{"image":"busybox","network_mode":"host"}"#,
                "network_mode:",
            ),
            (r#"{"image":"busybox","pid_mode":"host"}"#, "pid_mode:"),
            (r#"{"image":"busybox","ipc_mode":"host"}"#, "ipc_mode:"),
            (r#"{"image":"busybox","cap_add":["SYS_ADMIN"]}"#, "cap_add:"),
            (r#"{"image":"busybox","devices":["/dev/sda"]}"#, "devices:"),
            (
                r#"{"image":"busybox","mounts":["/:/host"]}"#,
                "mounts: mounting / ",
            ),
            (
                r#"{"image":"busybox","mounts":["/var/run/docker.sock:/s"]}"#,
                "mounts:",
            ),
            (r#"{"image":"busybox","mounts":["/var/run:/s"]}"#, "mounts:"),
            (
                r#"{"image":"busybox","mounts":["/srv/keel/../keel/db:/d"]}"#,
                "mounts:",
            ),
            (
                r#"{"image":"busybox","mounts":["/etc/../:/d"]}"#,
                "mounts: mounting / ",
            ),
            (
                r#"{"image":"busybox","mounts":["/proc/1/root:/host"]}"#,
                "mounts: mounting /proc/1/root is not allowed (a kernel",
            ),
            (r#"{"image":"busybox","mounts":["/sys:/s"]}"#, "mounts:"),
            (r#"{"image":"busybox","mounts":["/dev/sda:/d"]}"#, "mounts:"),
            (r#"{"image":"Busy Box"}"#, "image:"),
            (r#"{"image":"UPPER/case"}"#, "image:"),
            (r#"{"image":""}"#, "image:"),
            (r#"{"image":"-rf"}"#, "image:"),
            (r#"{"image":"busybox","memory":"-5m"}"#, "memory:"),
            (r#"{"image":"busybox","memory":"lots"}"#, "memory:"),
            (r#"{"image":"busybox","env":{"A":"x\ny"}}"#, "env.A:"),
            (r#"{"image":"busybox","env":{"A=B":"x"}}"#, "env.A=B:"),
            (
                r#"{"image":"busybox","labels":{"keel.managed":"false"}}"#,
                "labels.keel.managed:",
            ),
            (r#"{"image":"busybox","network":"host"}"#, "network:"),
            (r#"{"image":"busybox","cpus":-1}"#, "cpus:"),
        ];
        for (json, want) in table {
            let got = refusal(json);
            assert!(got.starts_with(want), "{json}: {got}");
        }
        for name in ["", "A", "-x", "a/b", "a b", &"x".repeat(49)] {
            assert!(check_name(name)
                .unwrap_err()
                .to_string()
                .starts_with("name:"));
        }
    }

    /// A symlink to a refused directory is refused like the directory:
    /// the engine follows it.
    #[test]
    fn a_symlink_does_not_smuggle_in_a_refused_mount() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        let to_root = dir.path().join("to-root");
        let to_data = dir.path().join("to-data");
        let to_proc = dir.path().join("to-proc");
        std::os::unix::fs::symlink("/", &to_root).unwrap();
        std::os::unix::fs::symlink(&data, &to_data).unwrap();
        std::os::unix::fs::symlink("/proc/self", &to_proc).unwrap();
        let forbidden = Forbidden {
            paths: vec![data.clone()],
        };
        let check = |src: String| {
            spec(&format!(r#"{{"image":"busybox","mounts":["{src}:/m"]}}"#))
                .unwrap()
                .validate(&forbidden)
                .map_err(|e| e.to_string())
        };
        let root = check(to_root.display().to_string()).unwrap_err();
        assert!(
            root.starts_with("mounts: mounting / is not allowed"),
            "{root}"
        );
        for src in [
            to_data.display().to_string(),
            format!("{}/keel.db", to_data.display()),
            to_proc.display().to_string(),
        ] {
            let got = check(src.clone()).unwrap_err();
            assert!(got.starts_with("mounts:"), "{src}: {got}");
        }
        // An ordinary directory (and one not created yet) still passes.
        check(dir.path().join("files").display().to_string()).unwrap();
        check(format!("{}/new/deeper", dir.path().display())).unwrap();
    }

    #[test]
    fn allowed_specs_pass_and_hash_deterministically() {
        let ok = spec(
            r#"{"image":"localhost/keel-test:latest","command":["sleep","60"],"env":{"B":"2","A":"1"},
                "labels":{"team":"x"},"memory":"64m","cpus":0.5,"network":"appnet","mounts":["/srv/data:/data:ro"]}"#,
        )
        .unwrap();
        ok.validate(&Forbidden::default()).unwrap();
        let reordered = spec(
            r#"{"env":{"A":"1","B":"2"},"labels":{"team":"x"},"image":"localhost/keel-test:latest",
                "command":["sleep","60"],"memory":"64m","cpus":0.5,"network":"appnet","mounts":["/srv/data:/data:ro"]}"#,
        )
        .unwrap();
        assert_eq!(ok.hash(), reordered.hash());
        let mut other = ok.clone();
        other.command = vec!["sleep".into(), "61".into()];
        assert_ne!(ok.hash(), other.hash());
        assert_eq!(parse_memory("64m").unwrap(), 64 << 20);
        assert!(spec(r#"{"image":"x","bogus":1}"#)
            .unwrap_err()
            .contains("bogus"));
        assert_eq!(
            container_name("ab12", Kind::Service, "web", 7),
            "keel-ab12-service-web-7"
        );
    }
}
