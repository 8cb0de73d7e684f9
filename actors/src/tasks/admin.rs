//! The admin socket of `keel tasks run|cancel`: a Unix socket in the data
//! dir (`keel-admin.sock`, mode 0600), independent of the `[cli]` chat
//! socket. Only the local user who runs keel can connect (file mode; the
//! data dir is 0700 too).
//!
//! The vault's operations (secrets, tokens, backup) share the socket; they
//! are answered by `vault::admin`.
//!
//! Protocol: one JSON line per request, one JSON line back.
//! `{"op": "run", "name": "backup", "args": ["--full"]}` →
//! `{"id": 12, "name": "backup"}`; `{"op": "cancel", "id": 12}` →
//! `{"id": 12, "outcome": "requested" | "cancelled" | "finished" | "not_found",
//! "state": …}`; any failure → `{"error": "<one line>"}`.
//! Services (`keel services`, `keel verify`), when containers are enabled:
//! `{"op": "deploy", "name", "spec": {…}}`, `{"op": "kill", "name"}`,
//! `{"op": "services"}`, `{"op": "verify"}`; ephemeral runs (`keel
//! containers run`): `{"op": "container_run", "name"?, "spec": {…},
//! "timeout_ms"?}` → the run's output once it is done; failures add
//! `"code"` (`invalid`, `not_found`, `damaged`, `unavailable`, `store`).

use std::path::{Path, PathBuf};

use actix::Addr;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

use super::{CancelTask, SubmitTask, TaskActor};
use crate::containers::spec::ServiceSpec;
use crate::containers::{
    ContainerReaper, DeployService, KillService, ListServices, RunEphemeral, ServiceError,
    VerifyServices,
};
use crate::persistence::tasks::{CancelOutcome, Origin};
use crate::vault::admin::VaultAdmin;

/// Longest request line.
const MAX_LINE: usize = 2 * 1024 * 1024;

/// A bound admin socket; `stop` closes it and removes the file.
pub struct AdminSocket {
    path: PathBuf,
    stop: watch::Sender<bool>,
}

impl AdminSocket {
    pub fn stop(self) {
        let _ = self.stop.send(true);
        let _ = std::fs::remove_file(&self.path);
    }
}

#[derive(Deserialize)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
enum Request {
    Run {
        name: String,
        #[serde(default)]
        args: Vec<String>,
    },
    Cancel {
        id: i64,
    },
    Deploy {
        name: String,
        spec: serde_json::Value,
    },
    Kill {
        name: String,
    },
    Services,
    Verify,
    #[serde(rename = "container_run")]
    ContainerRun {
        #[serde(default)]
        name: Option<String>,
        spec: serde_json::Value,
        #[serde(default)]
        timeout_ms: Option<u64>,
    },
}

/// Bind `path` (a stale file from an earlier run is replaced: keel holds
/// the data-dir lock) and serve it on the current runtime.
pub fn serve(
    path: &Path,
    tasks: Addr<TaskActor>,
    vault: Option<VaultAdmin>,
    services: Option<Addr<ContainerReaper>>,
) -> std::io::Result<AdminSocket> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    }
    let (stop, mut stopped) = watch::channel(false);
    actix_rt::spawn(async move {
        loop {
            tokio::select! {
                _ = stopped.wait_for(|s| *s) => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        let tasks = tasks.clone();
                        let vault = vault.clone();
                        let services = services.clone();
                        actix_rt::spawn(async move { serve_conn(stream, tasks, vault, services).await });
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "admin socket accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    }
                },
            }
        }
    });
    tracing::info!(path = %path.display(), "admin socket listening");
    Ok(AdminSocket {
        path: path.to_path_buf(),
        stop,
    })
}

async fn serve_conn(
    stream: UnixStream,
    tasks: Addr<TaskActor>,
    vault: Option<VaultAdmin>,
    services: Option<Addr<ContainerReaper>>,
) {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read.take(MAX_LINE as u64 + 1));
    let mut line = String::new();
    loop {
        line.clear();
        match lines.read_line(&mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let answer = if line.len() > MAX_LINE {
            json!({"error": format!("request longer than {MAX_LINE} bytes")})
        } else {
            // Notes (backup progress) are written while the answer is made.
            let (notes, mut noted) = tokio::sync::mpsc::unbounded_channel::<Value>();
            let answer = handle(
                line.trim_end(),
                &tasks,
                vault.as_ref(),
                services.as_ref(),
                notes,
            );
            tokio::pin!(answer);
            let answer = loop {
                tokio::select! {
                    a = &mut answer => break a,
                    Some(note) = noted.recv() => {
                        if write_line(&mut write, &note).await.is_err() {
                            return;
                        }
                    }
                }
            };
            while let Ok(note) = noted.try_recv() {
                if write_line(&mut write, &note).await.is_err() {
                    return;
                }
            }
            answer
        };
        if write_line(&mut write, &answer).await.is_err() || line.len() > MAX_LINE {
            return;
        }
    }
}

async fn write_line(
    write: &mut tokio::net::unix::OwnedWriteHalf,
    v: &Value,
) -> std::io::Result<()> {
    let mut out = v.to_string();
    out.push('\n');
    write.write_all(out.as_bytes()).await
}

async fn handle(
    line: &str,
    tasks: &Addr<TaskActor>,
    vault: Option<&VaultAdmin>,
    services: Option<&Addr<ContainerReaper>>,
    notes: crate::vault::admin::Notes,
) -> Value {
    // The vault's operations (secrets, tokens, backup) have their own module.
    let op = serde_json::from_str::<Value>(line)
        .ok()
        .and_then(|v| v.get("op").and_then(|o| o.as_str()).map(str::to_string));
    if let Some(op) = op.filter(|o| crate::vault::admin::OPS.contains(&o.as_str())) {
        return match vault {
            Some(v) => crate::vault::admin::handle(line, v, notes).await,
            None => json!({"error": format!("{op} is not available in this keel")}),
        };
    }
    let req: Request = match serde_json::from_str(line) {
        Ok(r) => r,
        Err(e) => return json!({"error": format!("bad request: {e}")}),
    };
    match req {
        Request::Run { name, args } => {
            let sent = tasks
                .send(SubmitTask {
                    name: name.clone(),
                    args,
                    origin: Origin::Cli,
                })
                .await;
            match sent {
                Ok(Ok(id)) => json!({"id": id, "name": name}),
                Ok(Err(e)) => json!({"error": e.to_string()}),
                Err(_) => json!({"error": "keel is shutting down"}),
            }
        }
        Request::Cancel { id } => match tasks.send(CancelTask(id)).await {
            Ok(Ok(out)) => cancel_json(id, &out),
            Ok(Err(e)) => json!({"error": e.to_string()}),
            Err(_) => json!({"error": "keel is shutting down"}),
        },
        Request::Deploy { name, spec } => {
            let Some(services) = services else {
                return service_error(&ServiceError::Disabled);
            };
            let spec: ServiceSpec = match serde_json::from_value(spec) {
                Ok(s) => s,
                Err(e) => {
                    return json!({"error": format!("bad service spec: {e}"), "code": "invalid"})
                }
            };
            match services.send(DeployService { name, spec }).await {
                Ok(Ok(v)) => v,
                Ok(Err(e)) => service_error(&e),
                Err(_) => json!({"error": "keel is shutting down", "code": "unavailable"}),
            }
        }
        Request::Kill { name } => {
            let Some(services) = services else {
                return service_error(&ServiceError::Disabled);
            };
            match services.send(KillService { name }).await {
                Ok(Ok(v)) => v,
                Ok(Err(e)) => service_error(&e),
                Err(_) => json!({"error": "keel is shutting down", "code": "unavailable"}),
            }
        }
        Request::Services => {
            let Some(services) = services else {
                return service_error(&ServiceError::Disabled);
            };
            match services.send(ListServices).await {
                Ok(v) => v,
                Err(_) => json!({"error": "keel is shutting down", "code": "unavailable"}),
            }
        }
        Request::ContainerRun {
            name,
            spec,
            timeout_ms,
        } => container_run(services, name, spec, timeout_ms).await,
        Request::Verify => {
            let Some(services) = services else {
                return service_error(&ServiceError::Disabled);
            };
            match services.send(VerifyServices).await {
                Ok(Ok(v)) => v,
                Ok(Err(e)) => json!({"error": e.to_string(), "code": "store"}),
                Err(_) => json!({"error": "keel is shutting down", "code": "unavailable"}),
            }
        }
    }
}

async fn container_run(
    services: Option<&Addr<ContainerReaper>>,
    name: Option<String>,
    spec: Value,
    timeout_ms: Option<u64>,
) -> Value {
    let Some(services) = services else {
        return service_error(&ServiceError::Disabled);
    };
    let spec: ServiceSpec = match serde_json::from_value(spec) {
        Ok(s) => s,
        Err(e) => return json!({"error": format!("bad container spec: {e}"), "code": "invalid"}),
    };
    let timeout = timeout_ms.map_or(
        crate::containers::ephemeral::DEFAULT_TIMEOUT,
        std::time::Duration::from_millis,
    );
    match services
        .send(RunEphemeral {
            name,
            spec,
            timeout,
        })
        .await
    {
        Ok(Ok(out)) => {
            serde_json::to_value(out).unwrap_or_else(|e| json!({"error": e.to_string()}))
        }
        Ok(Err(e)) => service_error(&e),
        Err(_) => json!({"error": "keel is shutting down", "code": "unavailable"}),
    }
}

fn service_error(e: &ServiceError) -> Value {
    json!({"error": e.to_string(), "code": e.code()})
}

/// `{"id", "outcome", "state"?}` for a cancel (shared with HTTP).
pub fn cancel_json(id: i64, out: &CancelOutcome) -> Value {
    match out {
        CancelOutcome::NotFound => json!({"id": id, "outcome": "not_found"}),
        CancelOutcome::Finished(state) => json!({"id": id, "outcome": "finished", "state": state}),
        CancelOutcome::Cancelled => json!({"id": id, "outcome": "cancelled", "state": "CANCELLED"}),
        CancelOutcome::Requested => json!({"id": id, "outcome": "requested", "state": "RUNNING"}),
    }
}
