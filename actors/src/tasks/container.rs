//! Container tasks (`[task.NAME] kind = "container"`): the [`Runner`] that
//! runs a task as a container on the engine of `[containers]`, through the
//! reaper's `Engine` trait (bollard stays in `containers/docker.rs`).
//!
//! - Name `keel-<instance>-task-<name>-<id>`, labels `keel.kind=task` and
//!   `keel.task=<id>`, no network. A create repeated after a crash meets a
//!   409 and takes the existing container (same task id).
//! - Output: the engine's log stream (stdout/stderr demultiplexed) is
//!   written into two in-memory pipes the supervisor reads like a child's;
//!   the exit code comes from the engine's wait. No PDEATHSIG: when keel is
//!   killed the container keeps running, and at the next start the task is
//!   re-attached ([`Runner::attach`]) with the output already stored (its
//!   byte count) skipped, instead of being marked INTERRUPTED.
//! - Cancel, timeout and shutdown stop the container (SIGTERM, SIGKILL
//!   after the grace); once the supervisor is done it is removed.

use std::collections::HashMap;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::sync::oneshot;

use super::process::{Child, Control, ExitInfo, Runner, SpawnSpec};
use crate::containers::engine::{CreateRequest, Engine, EngineError};
use crate::containers::spec::{self, Kind};

/// Bytes buffered per output pipe between the engine and the supervisor.
const PIPE_BYTES: usize = 256 * 1024;

pub struct ContainerRunner {
    engine: Arc<dyn Engine>,
    instance: String,
    grace: Duration,
}

impl ContainerRunner {
    pub fn new(engine: Arc<dyn Engine>, instance: &str, grace: Duration) -> ContainerRunner {
        ContainerRunner {
            engine,
            instance: instance.to_string(),
            grace,
        }
    }
}

fn io_err(e: EngineError) -> io::Error {
    io::Error::other(e.to_string())
}

/// `keel-<instance>-task-<name>-<id>` (task names may hold `.` and capitals;
/// both are valid in container names).
pub fn task_container(instance: &str, name: &str, id: i64) -> String {
    spec::container_name(instance, Kind::Task, name, id)
}

impl Runner for ContainerRunner {
    fn spawn(&self, s: SpawnSpec) -> BoxFuture<'static, io::Result<Child>> {
        let engine = self.engine.clone();
        let instance = self.instance.clone();
        let grace = self.grace;
        Box::pin(async move {
            let c = s
                .container
                .clone()
                .ok_or_else(|| io::Error::other("not a container task"))?;
            spec::check_image(&c.image).map_err(|e| io::Error::other(e.to_string()))?;
            let name = task_container(&instance, &c.task_name, c.task_id);
            let mut labels: HashMap<String, String> = spec::labels(&instance, Kind::Task);
            labels.insert(spec::LABEL_TASK.into(), c.task_id.to_string());
            let mut command = vec![s.program.clone()];
            command.extend(s.args.iter().cloned());
            let req = CreateRequest {
                name: name.clone(),
                image: c.image.clone(),
                command,
                env: s.env.iter().map(|(k, v)| format!("{k}={v}")).collect(),
                labels,
                memory: None,
                nano_cpus: None,
                network: None,
                binds: Vec::new(),
            };
            let id = match engine.create(req).await {
                Ok(id) => id,
                Err(EngineError::Conflict(_)) => match engine
                    .inspect(&name)
                    .await
                    .map_err(io_err)?
                {
                    Some(info) if info.label(spec::LABEL_TASK) == Some(&c.task_id.to_string()) => {
                        info.id
                    }
                    _ => return Err(io::Error::other(format!("container name {name} is in use"))),
                },
                Err(EngineError::NotFound(m)) => {
                    return Err(io::Error::other(format!(
                        "image {} not found: {m}",
                        c.image
                    )))
                }
                Err(e) => return Err(io_err(e)),
            };
            engine.start(&id).await.map_err(io_err)?;
            Ok(attach_child(engine, id, 0, grace))
        })
    }

    fn attach(&self, s: SpawnSpec, skip: u64) -> BoxFuture<'static, io::Result<Option<Child>>> {
        let engine = self.engine.clone();
        let instance = self.instance.clone();
        let grace = self.grace;
        Box::pin(async move {
            let Some(c) = s.container.clone() else {
                return Ok(None);
            };
            let name = task_container(&instance, &c.task_name, c.task_id);
            match engine.inspect(&name).await.map_err(io_err)? {
                Some(info) => Ok(Some(attach_child(engine, info.id, skip, grace))),
                None => Ok(None),
            }
        })
    }
}

/// The supervisor's view of a container: its output as two pipes, its exit.
fn attach_child(engine: Arc<dyn Engine>, id: String, skip: u64, grace: Duration) -> Child {
    let (out_r, mut out_w) = tokio::io::duplex(PIPE_BYTES);
    let (err_r, mut err_w) = tokio::io::duplex(PIPE_BYTES);
    let (exit_tx, exited) = oneshot::channel();
    let (reap, reap_rx) = oneshot::channel::<()>();
    let (logs_done_tx, logs_done) = oneshot::channel::<()>();
    {
        let engine = engine.clone();
        let id = id.clone();
        tokio::spawn(async move {
            let mut left = skip;
            let mut logs = engine.logs(&id);
            while let Some(item) = logs.next().await {
                let Ok((is_err, mut bytes)) = item else { break };
                if left > 0 {
                    let n = (left as usize).min(bytes.len());
                    bytes.drain(..n);
                    left -= n as u64;
                }
                if bytes.is_empty() {
                    continue;
                }
                let w = if is_err { &mut err_w } else { &mut out_w };
                if w.write_all(&bytes).await.is_err() {
                    break;
                }
            }
            drop(out_w);
            drop(err_w);
            let _ = logs_done_tx.send(());
        });
    }
    {
        let engine = engine.clone();
        let id = id.clone();
        tokio::spawn(async move {
            let code = engine.wait(&id).await;
            // The exit is reported after the output is in the pipes.
            let _ = tokio::time::timeout(Duration::from_secs(5), logs_done).await;
            let info = match code {
                Ok(c) => ExitInfo::Code(c as i32),
                Err(_) => ExitInfo::Unknown,
            };
            let _ = exit_tx.send(info);
        });
    }
    {
        let engine = engine.clone();
        let id = id.clone();
        tokio::spawn(async move {
            // Dropped or sent: the supervisor is done with it.
            let _ = reap_rx.await;
            if let Err(e) = engine.remove(&id).await {
                tracing::warn!(container = %id, error = %e, "task container not removed");
            }
        });
    }
    Child {
        stdout: Box::new(out_r),
        stderr: Box::new(err_r),
        exited,
        control: Box::new(ContainerControl { engine, id, grace }),
        reap,
    }
}

struct ContainerControl {
    engine: Arc<dyn Engine>,
    id: String,
    grace: Duration,
}

impl ContainerControl {
    fn stop(&self, grace_s: i64) {
        let engine = self.engine.clone();
        let id = self.id.clone();
        tokio::spawn(async move {
            if let Err(e) = engine.stop(&id, grace_s).await {
                tracing::warn!(container = %id, error = %e, "task container not stopped");
            }
        });
    }
}

impl Control for ContainerControl {
    /// No process of keel's own: nothing for recovery to signal.
    fn identity(&self) -> (i64, i64) {
        (0, 0)
    }

    fn terminate(&self) {
        // The engine sends SIGTERM, then SIGKILL after the grace.
        self.stop(self.grace.as_secs().max(1) as i64);
    }

    fn kill(&self) {
        self.stop(0);
    }

    fn leftovers(&self) -> usize {
        0
    }
}
