//! [`Engine`] over the Docker Engine API (bollard, R23). The only file that
//! speaks to a real engine. Connects lazily (a socket missing at start is a
//! retry, not a crash, R27), negotiates the API version once connected, and
//! bounds every request with `request_timeout` (a hung engine is a
//! [`EngineError::Timeout`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bollard::container::LogOutput;
use bollard::errors::Error as BollardError;
use bollard::models::{ContainerCreateBody, HostConfig};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, EventsOptionsBuilder, ListContainersOptionsBuilder,
    LogsOptionsBuilder, RemoveContainerOptionsBuilder, StopContainerOptionsBuilder,
    WaitContainerOptions,
};
use bollard::Docker;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::StreamExt;

use super::engine::{ContainerInfo, CreateRequest, Engine, EngineError, EngineResult};
use super::spec::{LABEL_INSTANCE, LABEL_MANAGED};

/// A Docker engine on a Unix socket.
#[derive(Clone)]
pub struct DockerEngine {
    host: String,
    timeout: Duration,
    client: Arc<Mutex<Option<Docker>>>,
}

impl DockerEngine {
    /// `host` is `unix:///path`; nothing is contacted until the first call.
    pub fn new(host: &str, timeout: Duration) -> DockerEngine {
        DockerEngine {
            host: host.to_string(),
            timeout,
            client: Arc::new(Mutex::new(None)),
        }
    }

    fn socket_path(&self) -> &str {
        self.host.strip_prefix("unix://").unwrap_or(&self.host)
    }

    /// The connected client (connecting and negotiating first if needed).
    async fn client(&self) -> EngineResult<Docker> {
        if let Some(c) = self
            .client
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        {
            return Ok(c);
        }
        let path = self.socket_path().to_string();
        if !std::path::Path::new(&path).exists() {
            return Err(EngineError::Unavailable(format!("socket {path} not found")));
        }
        // bollard's own timeout is a backstop; ours is finer (ms).
        let secs = self.timeout.as_secs().max(1) + 5;
        let docker = Docker::connect_with_unix(&path, secs, bollard::API_DEFAULT_VERSION)
            .map_err(|e| map_err(e, self.timeout))?;
        let docker = self.bounded(docker.negotiate_version()).await?;
        *self.client.lock().unwrap_or_else(|p| p.into_inner()) = Some(docker.clone());
        Ok(docker)
    }

    async fn bounded<T>(
        &self,
        fut: impl std::future::Future<Output = Result<T, BollardError>>,
    ) -> EngineResult<T> {
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(r) => r.map_err(|e| map_err(e, self.timeout)),
            Err(_) => Err(EngineError::Timeout(self.timeout.as_millis() as u64)),
        }
    }

    fn call<T, F, Fut>(&self, f: F) -> BoxFuture<'static, EngineResult<T>>
    where
        T: Send + 'static,
        F: FnOnce(Docker) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<T, BollardError>> + Send,
    {
        let this = self.clone();
        Box::pin(async move {
            let docker = this.client().await?;
            this.bounded(f(docker)).await
        })
    }

    /// The log stream of `logs` / `logs_stamped`.
    fn logs_with(
        &self,
        id: &str,
        stamped: bool,
        since_s: Option<i64>,
    ) -> BoxStream<'static, EngineResult<(bool, Vec<u8>)>> {
        let id = id.to_string();
        let this = self.clone();
        let timeout = self.timeout;
        futures::stream::once(async move { this.client().await })
            .flat_map(move |client| match client {
                Ok(d) => {
                    let opts = LogsOptionsBuilder::new()
                        .follow(true)
                        .stdout(true)
                        .stderr(true)
                        .timestamps(stamped);
                    let opts = match since_s {
                        Some(t) => opts.since(t.clamp(0, i32::MAX as i64) as i32),
                        None => opts,
                    }
                    .build();
                    d.logs(&id, Some(opts))
                        .filter_map(move |item| async move {
                            match item {
                                Ok(LogOutput::StdOut { message })
                                | Ok(LogOutput::Console { message }) => {
                                    Some(Ok((false, message.to_vec())))
                                }
                                Ok(LogOutput::StdErr { message }) => {
                                    Some(Ok((true, message.to_vec())))
                                }
                                Ok(LogOutput::StdIn { .. }) => None,
                                Err(e) => Some(Err(map_err(e, timeout))),
                            }
                        })
                        .boxed()
                }
                Err(e) => futures::stream::once(async move { Err(e) }).boxed(),
            })
            .boxed()
    }
}

fn map_err(e: BollardError, timeout: Duration) -> EngineError {
    match e {
        BollardError::DockerResponseServerError {
            status_code,
            message,
        } => {
            let message = one_line(&message);
            match status_code {
                404 => EngineError::NotFound(message),
                409 => EngineError::Conflict(message),
                s if s >= 500 => EngineError::Server { status: s, message },
                s => EngineError::Refused { status: s, message },
            }
        }
        BollardError::RequestTimeoutError => EngineError::Timeout(timeout.as_millis() as u64),
        BollardError::SocketNotFoundError(p) => {
            EngineError::Unavailable(format!("socket {p} not found"))
        }
        other => EngineError::Unavailable(one_line(&other.to_string())),
    }
}

fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ").chars().take(300).collect()
}

/// 304 (already started / already stopped) and 404 (gone) are success for
/// start, stop and remove.
fn idempotent(r: EngineResult<()>, allow_not_found: bool) -> EngineResult<()> {
    match r {
        Err(EngineError::Refused { status: 304, .. }) => Ok(()),
        Err(EngineError::NotFound(_)) if allow_not_found => Ok(()),
        other => other,
    }
}

fn managed_filter(instance: &str) -> HashMap<String, Vec<String>> {
    HashMap::from([(
        "label".to_string(),
        vec![
            format!("{LABEL_MANAGED}=true"),
            format!("{LABEL_INSTANCE}={instance}"),
        ],
    )])
}

impl Engine for DockerEngine {
    fn ping(&self) -> BoxFuture<'static, EngineResult<()>> {
        self.call(|d| async move { d.ping().await.map(|_| ()) })
    }

    fn list(&self, instance: &str) -> BoxFuture<'static, EngineResult<Vec<ContainerInfo>>> {
        let filters = managed_filter(instance);
        self.call(move |d| async move {
            let opts = ListContainersOptionsBuilder::new()
                .all(true)
                .filters(&filters)
                .build();
            let list = d.list_containers(Some(opts)).await?;
            Ok(list
                .into_iter()
                .map(|c| ContainerInfo {
                    id: c.id.unwrap_or_default(),
                    name: c
                        .names
                        .and_then(|n| n.into_iter().next())
                        .map(|n| n.trim_start_matches('/').to_string())
                        .unwrap_or_default(),
                    labels: c.labels.unwrap_or_default(),
                    state: c.state.map(|s| s.to_string()).unwrap_or_default(),
                })
                .collect())
        })
    }

    fn image_exists(&self, image: &str) -> BoxFuture<'static, EngineResult<bool>> {
        let image = image.to_string();
        let this = self.clone();
        Box::pin(async move {
            let docker = this.client().await?;
            match this.bounded(docker.inspect_image(&image)).await {
                Ok(_) => Ok(true),
                Err(EngineError::NotFound(_)) => Ok(false),
                Err(e) => Err(e),
            }
        })
    }

    fn create(&self, req: CreateRequest) -> BoxFuture<'static, EngineResult<String>> {
        self.call(move |d| async move {
            let opts = CreateContainerOptionsBuilder::new().name(&req.name).build();
            let body = ContainerCreateBody {
                image: Some(req.image),
                cmd: (!req.command.is_empty()).then_some(req.command),
                env: Some(req.env),
                labels: Some(req.labels),
                host_config: Some(HostConfig {
                    // No network unless a user-defined one is named: the
                    // default bridge would hand out private addresses.
                    network_mode: Some(req.network.unwrap_or_else(|| "none".into())),
                    memory: req.memory,
                    nano_cpus: req.nano_cpus,
                    binds: (!req.binds.is_empty()).then_some(req.binds),
                    ..Default::default()
                }),
                ..Default::default()
            };
            d.create_container(Some(opts), body).await.map(|r| r.id)
        })
    }

    fn inspect(&self, name: &str) -> BoxFuture<'static, EngineResult<Option<ContainerInfo>>> {
        let name = name.to_string();
        let this = self.clone();
        Box::pin(async move {
            let docker = this.client().await?;
            match this.bounded(docker.inspect_container(&name, None)).await {
                Ok(c) => Ok(Some(ContainerInfo {
                    id: c.id.unwrap_or_default(),
                    name: c
                        .name
                        .map(|n| n.trim_start_matches('/').to_string())
                        .unwrap_or_default(),
                    labels: c.config.and_then(|c| c.labels).unwrap_or_default(),
                    state: c
                        .state
                        .and_then(|s| s.status)
                        .map(|s| s.to_string())
                        .unwrap_or_default(),
                })),
                Err(EngineError::NotFound(_)) => Ok(None),
                Err(e) => Err(e),
            }
        })
    }

    fn start(&self, id: &str) -> BoxFuture<'static, EngineResult<()>> {
        let id = id.to_string();
        let fut = self.call(move |d| async move { d.start_container(&id, None).await });
        Box::pin(async move { idempotent(fut.await, false) })
    }

    fn stop(&self, id: &str, grace_s: i64) -> BoxFuture<'static, EngineResult<()>> {
        let id = id.to_string();
        let fut = self.call(move |d| async move {
            let opts = StopContainerOptionsBuilder::new()
                .t(grace_s.clamp(0, 3600) as i32)
                .build();
            d.stop_container(&id, Some(opts)).await
        });
        Box::pin(async move { idempotent(fut.await, true) })
    }

    fn remove(&self, id: &str) -> BoxFuture<'static, EngineResult<()>> {
        let id = id.to_string();
        let fut = self.call(move |d| async move {
            let opts = RemoveContainerOptionsBuilder::new()
                .force(true)
                .v(true)
                .build();
            d.remove_container(&id, Some(opts)).await
        });
        Box::pin(async move {
            match fut.await {
                // "removal already in progress"
                Err(EngineError::Conflict(m)) if m.contains("in progress") => Ok(()),
                other => idempotent(other, true),
            }
        })
    }

    fn logs(&self, id: &str) -> BoxStream<'static, EngineResult<(bool, Vec<u8>)>> {
        self.logs_with(id, false, None)
    }

    fn logs_stamped(
        &self,
        id: &str,
        since_s: Option<i64>,
    ) -> BoxStream<'static, EngineResult<(bool, Vec<u8>)>> {
        self.logs_with(id, true, since_s)
    }

    fn wait(&self, id: &str) -> BoxFuture<'static, EngineResult<i64>> {
        let id = id.to_string();
        let this = self.clone();
        Box::pin(async move {
            // The wait lasts as long as the container runs: no request
            // timeout (bollard's covers the response headers only).
            let docker = this.client().await?;
            let mut s = docker.wait_container(&id, None::<WaitContainerOptions>);
            match s.next().await {
                Some(Ok(r)) => Ok(r.status_code),
                // bollard reports a non-zero exit as an error.
                Some(Err(BollardError::DockerContainerWaitError { code, .. })) => Ok(code),
                Some(Err(e)) => Err(map_err(e, this.timeout)),
                None => Err(EngineError::Unavailable(
                    "wait ended without a status".into(),
                )),
            }
        })
    }

    fn events(&self, instance: &str) -> BoxStream<'static, EngineResult<()>> {
        let mut filters = managed_filter(instance);
        filters.insert("type".into(), vec!["container".into()]);
        let this = self.clone();
        let timeout = self.timeout;
        futures::stream::once(async move { this.client().await })
            .flat_map(move |client| match client {
                Ok(d) => {
                    let opts = EventsOptionsBuilder::new().filters(&filters).build();
                    d.events(Some(opts))
                        .map(move |e| e.map(|_| ()).map_err(|e| map_err(e, timeout)))
                        .boxed()
                }
                Err(e) => futures::stream::once(async move { Err(e) }).boxed(),
            })
            .boxed()
    }
}
