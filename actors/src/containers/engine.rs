//! The container engine as the reaper sees it: a small trait over the few
//! calls keel makes, so the reaper's logic runs against [`MemoryEngine`] in
//! unit tests and against Docker ([`super::docker::DockerEngine`]) for real.
//! Every future is `'static` (arguments are owned), so the reaper can run
//! them from an actor.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use futures::stream::BoxStream;

/// One managed container as listed or inspected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerInfo {
    pub id: String,
    /// Without the leading `/`.
    pub name: String,
    pub labels: HashMap<String, String>,
    /// `created`, `running`, `exited`, …
    pub state: String,
}

impl ContainerInfo {
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels.get(key).map(String::as_str)
    }

    pub fn running(&self) -> bool {
        self.state == "running"
    }
}

/// A container to create (network `none` unless `network` names one).
#[derive(Debug, Clone, PartialEq)]
pub struct CreateRequest {
    pub name: String,
    pub image: String,
    pub command: Vec<String>,
    pub env: Vec<String>,
    pub labels: HashMap<String, String>,
    pub memory: Option<i64>,
    pub nano_cpus: Option<i64>,
    pub network: Option<String>,
    pub binds: Vec<String>,
}

/// What went wrong talking to the engine.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    /// Socket missing, connection refused or dropped.
    #[error("container engine unavailable: {0}")]
    Unavailable(String),
    #[error("container engine did not answer within {0} ms")]
    Timeout(u64),
    /// 409: the name is taken (resolved by inspect).
    #[error("name in use: {0}")]
    Conflict(String),
    /// 404: no such container or image.
    #[error("not found: {0}")]
    NotFound(String),
    /// 5xx.
    #[error("container engine error {status}: {message}")]
    Server { status: u16, message: String },
    /// Another 4xx: the engine refused the request as such.
    #[error("container engine refused the request ({status}): {message}")]
    Refused { status: u16, message: String },
}

impl EngineError {
    /// Worth retrying later (the engine or the network may come back).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            EngineError::Unavailable(_) | EngineError::Timeout(_) | EngineError::Server { .. }
        )
    }
}

pub type EngineResult<T> = Result<T, EngineError>;

/// The calls keel makes. List and events are scoped to one instance's
/// managed containers: keel never looks at, let alone touches, others.
pub trait Engine: Send + Sync + 'static {
    fn ping(&self) -> BoxFuture<'static, EngineResult<()>>;
    /// Every container (any state) labelled `keel.managed=true` and
    /// `keel.instance=<instance>`.
    fn list(&self, instance: &str) -> BoxFuture<'static, EngineResult<Vec<ContainerInfo>>>;
    fn image_exists(&self, image: &str) -> BoxFuture<'static, EngineResult<bool>>;
    /// Create (not start); 409 → [`EngineError::Conflict`]. Returns the id.
    fn create(&self, req: CreateRequest) -> BoxFuture<'static, EngineResult<String>>;
    fn inspect(&self, name: &str) -> BoxFuture<'static, EngineResult<Option<ContainerInfo>>>;
    /// Start; an already running container is fine.
    fn start(&self, id: &str) -> BoxFuture<'static, EngineResult<()>>;
    /// SIGTERM, SIGKILL after `grace_s`; a stopped or gone container is fine.
    fn stop(&self, id: &str, grace_s: i64) -> BoxFuture<'static, EngineResult<()>>;
    /// Force-remove (kills first); a gone container is fine.
    fn remove(&self, id: &str) -> BoxFuture<'static, EngineResult<()>>;
    /// One item per container event of the instance; ends when the
    /// connection does.
    fn events(&self, instance: &str) -> BoxStream<'static, EngineResult<()>>;
    /// The container's output from its start, `(is_stderr, bytes)`,
    /// following it until it exits.
    fn logs(&self, id: &str) -> BoxStream<'static, EngineResult<(bool, Vec<u8>)>>;
    /// Like `logs`, from `since_s` (whole seconds of the Unix epoch) when
    /// given, each entry prefixed by its RFC3339Nano timestamp and a space.
    fn logs_stamped(
        &self,
        id: &str,
        _since_s: Option<i64>,
    ) -> BoxStream<'static, EngineResult<(bool, Vec<u8>)>> {
        self.logs(id)
    }
    /// Wait until the container exits; its exit code.
    fn wait(&self, id: &str) -> BoxFuture<'static, EngineResult<i64>>;
}

/// An engine in memory for unit tests, with scripted faults.
#[derive(Clone, Default)]
pub struct MemoryEngine {
    pub state: Arc<Mutex<MemoryState>>,
}

#[derive(Default)]
pub struct MemoryState {
    pub containers: Vec<ContainerInfo>,
    pub images: HashSet<String>,
    /// Every call fails with this while set (engine down).
    pub down: Option<EngineError>,
    /// The next create fails with this once.
    pub fail_next_create: Option<EngineError>,
    pub next_id: u64,
    /// Calls made, by name ("create", "remove", …).
    pub calls: Vec<String>,
}

impl MemoryEngine {
    pub fn with_images(images: &[&str]) -> MemoryEngine {
        let e = MemoryEngine::default();
        e.lock().images = images.iter().map(|s| s.to_string()).collect();
        e
    }

    pub fn lock(&self) -> std::sync::MutexGuard<'_, MemoryState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn run<T: Send + 'static>(
        &self,
        call: &str,
        f: impl FnOnce(&mut MemoryState) -> EngineResult<T>,
    ) -> BoxFuture<'static, EngineResult<T>> {
        let mut s = self.lock();
        s.calls.push(call.to_string());
        let out = match s.down.clone() {
            Some(e) => Err(e),
            None => f(&mut s),
        };
        Box::pin(async move { out })
    }
}

impl Engine for MemoryEngine {
    fn ping(&self) -> BoxFuture<'static, EngineResult<()>> {
        self.run("ping", |_| Ok(()))
    }

    fn list(&self, instance: &str) -> BoxFuture<'static, EngineResult<Vec<ContainerInfo>>> {
        let instance = instance.to_string();
        self.run("list", move |s| {
            Ok(s.containers
                .iter()
                .filter(|c| {
                    c.label(super::spec::LABEL_MANAGED) == Some("true")
                        && c.label(super::spec::LABEL_INSTANCE) == Some(instance.as_str())
                })
                .cloned()
                .collect())
        })
    }

    fn image_exists(&self, image: &str) -> BoxFuture<'static, EngineResult<bool>> {
        let image = image.to_string();
        self.run("image_exists", move |s| Ok(s.images.contains(&image)))
    }

    fn create(&self, req: CreateRequest) -> BoxFuture<'static, EngineResult<String>> {
        self.run("create", move |s| {
            if let Some(e) = s.fail_next_create.take() {
                return Err(e);
            }
            if s.containers.iter().any(|c| c.name == req.name) {
                return Err(EngineError::Conflict(req.name));
            }
            if !s.images.contains(&req.image) {
                return Err(EngineError::NotFound(format!(
                    "no such image: {}",
                    req.image
                )));
            }
            s.next_id += 1;
            let id = format!("c{:06}", s.next_id);
            s.containers.push(ContainerInfo {
                id: id.clone(),
                name: req.name,
                labels: req.labels,
                state: "created".into(),
            });
            Ok(id)
        })
    }

    fn inspect(&self, name: &str) -> BoxFuture<'static, EngineResult<Option<ContainerInfo>>> {
        let name = name.to_string();
        self.run("inspect", move |s| {
            Ok(s.containers
                .iter()
                .find(|c| c.name == name || c.id == name)
                .cloned())
        })
    }

    fn start(&self, id: &str) -> BoxFuture<'static, EngineResult<()>> {
        let id = id.to_string();
        self.run("start", move |s| {
            match s.containers.iter_mut().find(|c| c.id == id || c.name == id) {
                Some(c) => {
                    c.state = "running".into();
                    Ok(())
                }
                None => Err(EngineError::NotFound(id)),
            }
        })
    }

    fn stop(&self, id: &str, _grace_s: i64) -> BoxFuture<'static, EngineResult<()>> {
        let id = id.to_string();
        self.run("stop", move |s| {
            if let Some(c) = s.containers.iter_mut().find(|c| c.id == id || c.name == id) {
                c.state = "exited".into();
            }
            Ok(())
        })
    }

    fn remove(&self, id: &str) -> BoxFuture<'static, EngineResult<()>> {
        let id = id.to_string();
        self.run("remove", move |s| {
            s.containers.retain(|c| c.id != id && c.name != id);
            Ok(())
        })
    }

    fn events(&self, _instance: &str) -> BoxStream<'static, EngineResult<()>> {
        Box::pin(futures::stream::pending())
    }

    fn logs(&self, _id: &str) -> BoxStream<'static, EngineResult<(bool, Vec<u8>)>> {
        Box::pin(futures::stream::empty())
    }

    fn wait(&self, id: &str) -> BoxFuture<'static, EngineResult<i64>> {
        let id = id.to_string();
        self.run("wait", move |s| {
            if let Some(c) = s.containers.iter_mut().find(|c| c.id == id || c.name == id) {
                c.state = "exited".into();
            }
            Ok(0)
        })
    }
}
