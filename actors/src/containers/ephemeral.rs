//! Ephemeral runs (`keel containers run`, `POST /v1/containers/run`): one
//! command in a sandboxed container, its output and exit code returned,
//! the container removed afterwards.
//!
//! - The spec passes the same allow-list as a service ([`ServiceSpec`]);
//!   the container carries `keel.kind=ephemeral` and a deterministic name
//!   `keel-<instance>-ephemeral-<name>-<n>` (`n` counts runs of this keel,
//!   starting past any ephemeral container the start found; a 409 moves to
//!   the next number, it never removes what holds the name).
//! - Nothing about a run is stored: it lives only while keel runs. A keel
//!   killed mid-run leaves the container behind, and the next start reaps
//!   it (`RecoverContainers`, counted in the owner notice and `keel
//!   status`); SIGTERM removes it (`StopContainers`, which also removes
//!   every run it knows by name, so a create racing the shutdown is caught).
//! - A run does not hold the reaper's state lock while the command runs:
//!   reconciles and deploys carry on beside it.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::time::Duration;

use actix::prelude::*;
use futures::StreamExt;
use serde::Serialize;

use super::engine::{ContainerInfo, CreateRequest, EngineError};
use super::spec::{self, Kind, ServiceSpec, SpecError};
use super::{ContainerReaper, Inner, ServiceError};

/// Bytes kept per stream (stdout, stderr); the rest is counted, not kept.
pub const MAX_OUTPUT: usize = 1 << 20;
/// Shortest and longest run time a caller may ask for.
pub const MIN_TIMEOUT: Duration = Duration::from_secs(1);
pub const MAX_TIMEOUT: Duration = Duration::from_secs(3600);
/// The default when the caller names none.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the output may trail the exit before it is cut.
const LOG_TAIL: Duration = Duration::from_secs(5);
/// Name numbers tried when earlier ones are taken (409).
const NAME_TRIES: usize = 8;

/// The runs in flight (by container name) and whether keel is stopping.
#[derive(Debug, Default)]
pub(super) struct Runs {
    pub(super) names: BTreeSet<String>,
    pub(super) stopping: bool,
}

/// Run one command in an ephemeral container and return its output. Sent
/// by HTTP `POST /v1/containers/run` and the admin socket (`keel containers
/// run`); answers when the container exits, times out or keel stops.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<RunOutput, ServiceError>")]
pub struct RunEphemeral {
    /// Part of the container name (default `run`).
    pub name: Option<String>,
    pub spec: ServiceSpec,
    pub timeout: Duration,
}

/// What a run produced.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RunOutput {
    pub container: String,
    /// None when the container's end could not be observed.
    pub exit_code: Option<i64>,
    /// Killed because the timeout passed.
    pub timed_out: bool,
    /// Killed because keel is shutting down.
    pub stopped: bool,
    /// Lossy UTF-8 of the first [`MAX_OUTPUT`] bytes of each stream.
    pub stdout: String,
    pub stderr: String,
    /// Some output was not kept (over [`MAX_OUTPUT`]).
    pub truncated: bool,
    pub duration_ms: u64,
}

/// The timeout a caller asked for, checked.
pub fn check_timeout(t: Duration) -> Result<Duration, SpecError> {
    if t < MIN_TIMEOUT || t > MAX_TIMEOUT {
        return Err(SpecError {
            field: "timeout".into(),
            reason: format!(
                "must be between {}s and {}s",
                MIN_TIMEOUT.as_secs(),
                MAX_TIMEOUT.as_secs()
            ),
        });
    }
    Ok(t)
}

fn shutting_down() -> ServiceError {
    ServiceError::Engine(EngineError::Unavailable("keel is shutting down".into()))
}

impl Inner {
    fn runs(&self) -> std::sync::MutexGuard<'_, Runs> {
        self.runs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Past every ephemeral container in `list` (called at start).
    pub(super) fn seed_run_numbers(&self, list: &[ContainerInfo]) {
        let prefix = spec::container_name(&self.instance(), Kind::Ephemeral, "", 0);
        let prefix = prefix.trim_end_matches("-0");
        let highest = list
            .iter()
            .filter(|c| c.label(spec::LABEL_KIND) == Some(Kind::Ephemeral.as_str()))
            .filter_map(|c| {
                c.name
                    .strip_prefix(prefix)
                    .and_then(|rest| rest.rsplit('-').next())
                    .and_then(|n| n.parse::<i64>().ok())
            })
            .max()
            .unwrap_or(0);
        self.next_run.fetch_max(highest + 1, Ordering::SeqCst);
    }

    /// Keel is stopping: no new run starts; the names of those in flight.
    pub(super) fn stop_runs(&self) -> Vec<String> {
        let mut runs = self.runs();
        runs.stopping = true;
        runs.names.iter().cloned().collect()
    }

    fn forget_run(&self, name: &str) {
        self.runs().names.remove(name);
    }

    fn create_run_request(&self, name: &str, spec: &ServiceSpec) -> CreateRequest {
        let mut labels: std::collections::HashMap<String, String> =
            spec.labels.clone().into_iter().collect();
        labels.extend(spec::labels(&self.instance(), Kind::Ephemeral));
        CreateRequest {
            name: name.to_string(),
            image: spec.image.clone(),
            command: spec.command.clone(),
            env: spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect(),
            labels,
            memory: spec
                .memory
                .as_deref()
                .and_then(|m| spec::parse_memory(m).ok()),
            nano_cpus: spec.cpus.map(|c| (c * 1e9) as i64),
            network: spec.network.clone(),
            binds: spec.mounts.clone(),
        }
    }

    /// Create the container under the next free name; registers it as in
    /// flight before the create, so a shutdown meanwhile removes it.
    async fn create_run(
        &self,
        base: &str,
        spec: &ServiceSpec,
    ) -> Result<(String, String), ServiceError> {
        let instance = self.instance();
        let mut last = None;
        for _ in 0..NAME_TRIES {
            let n = self.next_run.fetch_add(1, Ordering::SeqCst);
            let name = spec::container_name(&instance, Kind::Ephemeral, base, n);
            {
                let mut runs = self.runs();
                if runs.stopping {
                    return Err(shutting_down());
                }
                runs.names.insert(name.clone());
            }
            match self
                .engine
                .create(self.create_run_request(&name, spec))
                .await
            {
                Ok(id) => return Ok((name, id)),
                Err(EngineError::Conflict(m)) => {
                    // Held by a container keel did not reap (yet): the next number.
                    self.forget_run(&name);
                    last = Some(EngineError::Conflict(m));
                }
                Err(EngineError::NotFound(_)) => {
                    self.forget_run(&name);
                    return Err(ServiceError::NoSuchImage(spec.image.clone()));
                }
                Err(e) => {
                    self.forget_run(&name);
                    return Err(ServiceError::Engine(e));
                }
            }
        }
        Err(ServiceError::Engine(last.unwrap_or_else(|| {
            EngineError::Conflict("no free container name".into())
        })))
    }

    /// The whole run: create, start, collect, wait (bounded), remove.
    async fn run_ephemeral(&self, msg: RunEphemeral) -> Result<RunOutput, ServiceError> {
        let base = msg.name.unwrap_or_else(|| "run".into());
        spec::check_name(&base)?;
        msg.spec.validate(&self.settings().forbidden)?;
        let timeout = check_timeout(msg.timeout)?;
        if self.runs().stopping {
            return Err(shutting_down());
        }
        match self.engine.image_exists(&msg.spec.image).await {
            Ok(true) => {}
            Ok(false) => return Err(ServiceError::NoSuchImage(msg.spec.image.clone())),
            Err(e) => return Err(ServiceError::Engine(e)),
        }
        let started = tokio::time::Instant::now();
        let (name, id) = self.create_run(&base, &msg.spec).await?;
        let out = self.supervise_run(&name, &id, timeout).await;
        // Removed whatever happened; a failure here leaves it to the next
        // start's reaping (it is labelled ephemeral).
        if let Err(e) = self.engine.remove(&id).await {
            tracing::warn!(container = %name, error = %e, "ephemeral container not removed; the next start reaps it");
        }
        self.forget_run(&name);
        let mut out = out?;
        out.duration_ms = started.elapsed().as_millis() as u64;
        let outcome = if out.stopped {
            "stopped"
        } else if out.timed_out {
            "timed_out"
        } else {
            "exited"
        };
        self.metrics.runs.with_label_values(&[outcome]).inc();
        tracing::info!(
            container = %name,
            exit_code = out.exit_code.unwrap_or(-1),
            outcome,
            duration_ms = out.duration_ms,
            "ephemeral run finished"
        );
        Ok(out)
    }

    async fn supervise_run(
        &self,
        name: &str,
        id: &str,
        timeout: Duration,
    ) -> Result<RunOutput, ServiceError> {
        if self.runs().stopping {
            return Err(shutting_down());
        }
        if let Err(e) = self.engine.start(id).await {
            self.metrics.runs.with_label_values(&["failed"]).inc();
            return Err(ServiceError::Engine(e));
        }
        let logs = {
            let mut stream = self.engine.logs(id);
            tokio::spawn(async move {
                let mut out = (Vec::new(), Vec::new(), false);
                while let Some(item) = stream.next().await {
                    let Ok((is_err, bytes)) = item else { break };
                    let buf = if is_err { &mut out.1 } else { &mut out.0 };
                    let room = MAX_OUTPUT.saturating_sub(buf.len());
                    if bytes.len() > room {
                        out.2 = true;
                    }
                    buf.extend_from_slice(&bytes[..bytes.len().min(room)]);
                }
                out
            })
        };
        let mut timed_out = false;
        let code = match tokio::time::timeout(timeout, self.engine.wait(id)).await {
            Ok(code) => code,
            Err(_) => {
                timed_out = true;
                let _ = self.engine.stop(id, 0).await;
                tokio::time::timeout(LOG_TAIL, self.engine.wait(id))
                    .await
                    .unwrap_or(Err(EngineError::Timeout(LOG_TAIL.as_millis() as u64)))
            }
        };
        let (stdout, stderr, truncated) = tokio::time::timeout(LOG_TAIL, logs)
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default();
        let stopped = self.runs().stopping;
        if let Err(e) = &code {
            if !stopped {
                tracing::warn!(container = %name, error = %e, "ephemeral run: exit not observed");
            }
        }
        Ok(RunOutput {
            container: name.to_string(),
            exit_code: code.ok(),
            timed_out,
            stopped,
            stdout: String::from_utf8_lossy(&stdout).into_owned(),
            stderr: String::from_utf8_lossy(&stderr).into_owned(),
            truncated,
            duration_ms: 0,
        })
    }
}

impl Handler<RunEphemeral> for ContainerReaper {
    type Result = ResponseFuture<Result<RunOutput, ServiceError>>;

    fn handle(&mut self, msg: RunEphemeral, _: &mut Context<Self>) -> Self::Result {
        let inner = self.inner.clone();
        Box::pin(async move { inner.run_ephemeral(msg).await })
    }
}
