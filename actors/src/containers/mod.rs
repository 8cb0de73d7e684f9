//! The `ContainerReaper` (R23–R27): the one actor that talks to the
//! container engine.
//!
//! - **At start** (`RecoverContainers`, before ready): ephemeral containers of
//!   this instance left from an earlier run are killed and removed (counted
//!   for the owner notice and `keel status`); the services event log is
//!   checked (hash chain) and replayed up to the first damage; running
//!   containers of the desired services are adopted, others replaced or
//!   created. Containers of other instances are never listed, let alone
//!   touched; task containers are reaped only when their task is not
//!   RUNNING (task recovery, which re-attaches running ones, comes first).
//! - **Services** (`DeployService`, `KillService`): the decision is an event
//!   appended to the log (its own transaction) before the engine is asked;
//!   a crash in between is repaired by the reconcile loop, and deterministic
//!   names make a repeated create a 409 resolved by inspect.
//! - **Reconcile** every `reconcile_interval_s` and on engine events:
//!   desired (the log) against actual (the engine); missing containers are
//!   created, extra ones removed, changed ones replaced, each repair logged
//!   and counted. An engine that fails is retried with backoff; `/readyz`
//!   stays 200 and says "containers degraded" in its body.
//! - **Shutdown** (`StopContainers`): ephemeral containers are stopped and
//!   removed; services keep running unless `stop_services_on_shutdown`.
//!
//! Operations run one at a time (one async mutex over the state), so a
//! reconcile never sees half a deploy.

pub mod docker;
pub mod engine;
pub mod ephemeral;
pub mod spec;
pub mod through;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::AtomicI64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::prelude::*;
use futures::StreamExt;
use prometheus::{IntCounterVec, IntGauge, Opts};
use serde::Serialize;
use serde_json::{json, Value};

use crate::chain::{self, ChainCheck, Link};
use crate::error::StoreError;
use crate::health::Health;
use crate::metrics::Metrics;
use crate::persistence::services::{AppendServiceEvent, GetServiceEvents, STATUS_KEY};
use crate::persistence::{PersistenceActor, PutAdapterState};
use engine::{ContainerInfo, CreateRequest, Engine, EngineError};
pub use ephemeral::{RunEphemeral, RunOutput};
use spec::{Forbidden, Kind, ServiceSpec, SpecError};

pub const EVENT_DEPLOYED: &str = "service_deployed";
pub const EVENT_KILLED: &str = "service_killed";

/// Seconds a service gets between SIGTERM and SIGKILL when keel stops it.
const STOP_GRACE_S: i64 = 5;

/// One desired service, from the log.
#[derive(Debug, Clone, PartialEq)]
pub struct Desired {
    pub spec: ServiceSpec,
    pub hash: String,
    /// The seq of the deploy that first asked for this spec: part of the
    /// container's name, so an identical redeploy keeps its container.
    pub generation: i64,
}

/// The log replayed: desired services, killed names, the chain check.
#[derive(Debug, Clone)]
pub struct Replay {
    pub desired: BTreeMap<String, Desired>,
    pub killed: BTreeSet<String>,
    pub chain: ChainCheck,
    /// The damage as text (chain damage or an unreadable record).
    pub damage: Option<String>,
}

#[derive(serde::Deserialize)]
struct DeployedPayload {
    name: String,
    spec: ServiceSpec,
}

#[derive(serde::Deserialize)]
struct KilledPayload {
    name: String,
}

/// Replay the valid prefix of the log: the latest deploy of each name wins,
/// a kill after it keeps it dead. Nothing past the first damage is used.
pub fn replay(links: &[Link]) -> Replay {
    let mut chain = chain::verify(links);
    let mut damage = chain.damage.as_ref().map(|d| d.to_string());
    let mut desired: BTreeMap<String, Desired> = BTreeMap::new();
    let mut killed = BTreeSet::new();
    for (i, l) in links[..chain.valid].iter().enumerate() {
        let applied = match l.kind.as_str() {
            EVENT_DEPLOYED => serde_json::from_str::<DeployedPayload>(&l.payload)
                .ok()
                .map(|p| {
                    let hash = p.spec.hash();
                    let generation = match desired.get(&p.name) {
                        Some(d) if d.hash == hash => d.generation,
                        _ => l.seq,
                    };
                    killed.remove(&p.name);
                    desired.insert(
                        p.name,
                        Desired {
                            spec: p.spec,
                            hash,
                            generation,
                        },
                    );
                }),
            EVENT_KILLED => serde_json::from_str::<KilledPayload>(&l.payload)
                .ok()
                .map(|p| {
                    desired.remove(&p.name);
                    killed.insert(p.name);
                }),
            _ => None,
        };
        if applied.is_none() {
            damage = Some(format!("record {}: unreadable {} event", l.seq, l.kind));
            chain.valid = i;
            break;
        }
    }
    Replay {
        desired,
        killed,
        chain,
        damage,
    }
}

/// Desired against actual, for one instance's service containers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Comparison {
    /// Services with no running container of their spec.
    pub missing: Vec<String>,
    /// Managed service containers nothing asks for (killed, duplicates).
    pub unexpected: Vec<String>,
    /// Services whose container runs another spec.
    pub drifted: Vec<String>,
    /// Services whose container is right and running.
    pub ok: Vec<String>,
}

impl Comparison {
    pub fn consistent(&self) -> bool {
        self.missing.is_empty() && self.unexpected.is_empty() && self.drifted.is_empty()
    }
}

/// The container name a desired service must have.
pub fn service_container(instance: &str, name: &str, d: &Desired) -> String {
    spec::container_name(instance, Kind::Service, name, d.generation)
}

/// Compare (pure). Ephemeral and task containers are not desired state and
/// are not compared.
pub fn compare(
    instance: &str,
    desired: &BTreeMap<String, Desired>,
    actual: &[ContainerInfo],
) -> Comparison {
    let mut c = Comparison::default();
    // Service containers by service name: one pass, so start-up with N
    // services costs O(N), not O(N²).
    let mut by_service: HashMap<&str, Vec<&ContainerInfo>> = HashMap::new();
    for a in actual
        .iter()
        .filter(|a| a.label(spec::LABEL_KIND) == Some(Kind::Service.as_str()))
    {
        match a.label(spec::LABEL_SERVICE) {
            Some(s) if desired.contains_key(s) => by_service.entry(s).or_default().push(a),
            _ => c.unexpected.push(a.name.clone()),
        }
    }
    for (name, d) in desired {
        let want = service_container(instance, name, d);
        let mine = by_service
            .get(name.as_str())
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        let exact = mine
            .iter()
            .find(|a| a.name == want && a.label(spec::LABEL_SPEC) == Some(d.hash.as_str()));
        match exact {
            Some(a) => {
                if a.running() {
                    c.ok.push(name.clone());
                } else {
                    c.missing.push(name.clone());
                }
                for other in mine.iter().filter(|o| o.id != a.id) {
                    c.unexpected.push(other.name.clone());
                }
            }
            None if mine.is_empty() => c.missing.push(name.clone()),
            None => c.drifted.push(name.clone()),
        }
    }
    c.unexpected.sort();
    c
}

/// Desired against actual, one row per service, for the console: each
/// desired service with its spec hash, its container's state and spec
/// label, and the drift [`compare`] finds (`none`, `missing`, `drifted`);
/// each killed service; each `unexpected` container. `actual = None`: the
/// engine did not answer (state and drift `unknown`).
pub fn drift_rows(instance: &str, replay: &Replay, actual: Option<&[ContainerInfo]>) -> Vec<Value> {
    let row =
        |name: &str, desired: Option<&str>, c: Option<&ContainerInfo>, state: &str, drift: &str| {
            json!({
                "name": name,
                "spec_hash": desired,
                "state": c.map_or(state, |c| c.state.as_str()),
                "container_id": c.map(|c| c.id.clone()),
                "container": c.map(|c| c.name.clone()),
                "actual_spec_hash": c.and_then(|c| c.label(spec::LABEL_SPEC)),
                "drift": drift,
            })
        };
    let Some(actual) = actual else {
        let mut rows: Vec<Value> = replay
            .desired
            .iter()
            .map(|(name, d)| row(name, Some(&d.hash), None, "unknown", "unknown"))
            .collect();
        rows.extend(
            replay
                .killed
                .iter()
                .map(|n| row(n, None, None, "killed", "unknown")),
        );
        return rows;
    };
    let cmp = compare(instance, &replay.desired, actual);
    fn service_of<'a>(
        actual: &'a [ContainerInfo],
        name: &'a str,
    ) -> impl Iterator<Item = &'a ContainerInfo> + 'a {
        actual.iter().filter(move |a| {
            a.label(spec::LABEL_KIND) == Some(Kind::Service.as_str())
                && a.label(spec::LABEL_SERVICE) == Some(name)
        })
    }
    let mut rows = Vec::new();
    for (name, d) in &replay.desired {
        let want = service_container(instance, name, d);
        let exact = service_of(actual, name)
            .find(|a| a.name == want && a.label(spec::LABEL_SPEC) == Some(d.hash.as_str()));
        let (c, drift) = if cmp.drifted.contains(name) {
            (service_of(actual, name).next(), "drifted")
        } else if cmp.missing.contains(name) {
            (exact, "missing")
        } else {
            (exact, "none")
        };
        rows.push(row(name, Some(&d.hash), c, "missing", drift));
    }
    for name in &replay.killed {
        rows.push(row(name, None, None, "killed", "none"));
    }
    for extra in &cmp.unexpected {
        let c = actual.iter().find(|a| &a.name == extra);
        let name = c
            .and_then(|c| c.label(spec::LABEL_SERVICE))
            .unwrap_or(extra.as_str());
        rows.push(row(name, None, c, "unknown", "unexpected"));
    }
    rows
}

/// `keel verify`'s report (JSON shape of the interface contract, plus detail).
pub fn verify_json(
    replay: &Replay,
    actual: Result<&[ContainerInfo], &EngineError>,
    instance: &str,
) -> Value {
    let chain_ok = replay.damage.is_none();
    let (cmp, engine) = match actual {
        Ok(list) => (compare(instance, &replay.desired, list), Value::Null),
        Err(e) => (Comparison::default(), json!(e.to_string())),
    };
    json!({
        "consistent": chain_ok && engine.is_null() && cmp.consistent(),
        "chain_ok": chain_ok,
        "missing": cmp.missing,
        "unexpected": cmp.unexpected,
        "drifted": cmp.drifted,
        "services": cmp.ok.len() + cmp.missing.len() + cmp.drifted.len(),
        "instance": instance,
        "engine_error": engine,
        "log": {
            "records": replay.chain.records,
            "valid": replay.chain.valid,
            "damage": replay.damage,
        },
    })
}

/// Why a service request was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Invalid(#[from] SpecError),
    #[error("image {0:?} not found on the container engine (no registry is used: load or build it first)")]
    NoSuchImage(String),
    #[error("no service named {0:?}")]
    NotFound(String),
    #[error("{0}; nothing was changed")]
    Engine(EngineError),
    #[error("the services event log is damaged ({0}); nothing is deployed or killed until it is repaired")]
    LogDamaged(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("containers are not enabled ([containers] enabled = false)")]
    Disabled,
}

impl ServiceError {
    /// The HTTP status for this error.
    pub fn http_status(&self) -> u16 {
        match self {
            ServiceError::Invalid(_) | ServiceError::NoSuchImage(_) => 400,
            ServiceError::NotFound(_) => 404,
            ServiceError::LogDamaged(_) => 409,
            ServiceError::Engine(_) | ServiceError::Disabled => 503,
            ServiceError::Store(e) if e.is_transient() => 503,
            ServiceError::Store(_) => 500,
        }
    }

    /// A short code for the admin socket (`keel services` maps it to an exit code).
    pub fn code(&self) -> &'static str {
        match self {
            ServiceError::Invalid(_) | ServiceError::NoSuchImage(_) => "invalid",
            ServiceError::NotFound(_) => "not_found",
            ServiceError::LogDamaged(_) => "damaged",
            ServiceError::Engine(_) | ServiceError::Disabled => "unavailable",
            ServiceError::Store(_) => "store",
        }
    }
}

/// Settings fixed at start plus the live ones.
#[derive(Debug, Clone)]
pub struct ReaperSettings {
    pub instance: String,
    pub reconcile_interval: Duration,
    pub stop_services_on_shutdown: bool,
    /// Paths no service may mount (engine socket, data dir).
    pub forbidden: Forbidden,
}

/// Live settings pushed on reload.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct SetReaperSettings {
    pub reconcile_interval: Duration,
    pub stop_services_on_shutdown: bool,
}

/// The reaper's metrics.
#[derive(Clone)]
struct ReaperMetrics {
    repairs: IntCounterVec,
    reaped: IntCounterVec,
    engine_up: IntGauge,
    services: IntGauge,
    runs: IntCounterVec,
}

impl ReaperMetrics {
    fn new(m: &Metrics) -> ReaperMetrics {
        let repairs = IntCounterVec::new(
            Opts::new(
                "keel_container_repairs_total",
                "Reconcile repairs by action (created, started, removed, replaced)",
            ),
            &["action"],
        )
        .expect("static metric definition");
        let reaped = IntCounterVec::new(
            Opts::new(
                "keel_containers_reaped_total",
                "Ephemeral containers removed, by when (start, shutdown)",
            ),
            &["when"],
        )
        .expect("static metric definition");
        let engine_up = IntGauge::new("keel_container_engine_up", "1 while the engine answers")
            .expect("static metric definition");
        let services = IntGauge::new("keel_services_desired", "Services in the event log")
            .expect("static metric definition");
        let runs = IntCounterVec::new(
            Opts::new(
                "keel_ephemeral_runs_total",
                "Ephemeral container runs by outcome (exited, timed_out, stopped, failed)",
            ),
            &["outcome"],
        )
        .expect("static metric definition");
        m.register(Box::new(runs.clone()));
        m.register(Box::new(repairs.clone()));
        m.register(Box::new(reaped.clone()));
        m.register(Box::new(engine_up.clone()));
        m.register(Box::new(services.clone()));
        ReaperMetrics {
            repairs,
            reaped,
            engine_up,
            services,
            runs,
        }
    }
}

/// What the reaper knows, behind one async mutex.
struct State {
    replay: Replay,
    /// Last engine failure, while failing.
    engine_error: Option<String>,
    /// Consecutive failed reconciles (backoff).
    failures: u32,
    reaped_at_start: usize,
    repairs: u64,
    stopping: bool,
    /// The status row last written (see `publish`).
    published: String,
}

struct Inner {
    engine: Arc<dyn Engine>,
    persistence: Addr<PersistenceActor>,
    health: Health,
    metrics: ReaperMetrics,
    settings: Mutex<ReaperSettings>,
    state: tokio::sync::Mutex<State>,
    /// Ephemeral runs in flight (outside `state`: a run lasts long).
    runs: Mutex<ephemeral::Runs>,
    /// The number in the next ephemeral container's name.
    next_run: AtomicI64,
}

/// The container reaper actor.
pub struct ContainerReaper {
    inner: Arc<Inner>,
    /// A reconcile is queued (coalesces events and ticks).
    queued: bool,
    tick: Option<SpawnHandle>,
    /// Issue 13: the token of lease `reconciler:<instance>`; the periodic
    /// reconcile runs only while it is held (`None` here: always).
    lease: Option<tokio::sync::watch::Receiver<Option<i64>>>,
}

impl ContainerReaper {
    pub fn new(
        engine: Arc<dyn Engine>,
        persistence: Addr<PersistenceActor>,
        health: Health,
        metrics: &Metrics,
        settings: ReaperSettings,
    ) -> ContainerReaper {
        ContainerReaper {
            inner: Arc::new(Inner {
                engine,
                persistence,
                health,
                metrics: ReaperMetrics::new(metrics),
                settings: Mutex::new(settings),
                state: tokio::sync::Mutex::new(State {
                    replay: replay(&[]),
                    engine_error: None,
                    failures: 0,
                    reaped_at_start: 0,
                    repairs: 0,
                    stopping: false,
                    published: String::new(),
                }),
                runs: Mutex::new(ephemeral::Runs::default()),
                next_run: AtomicI64::new(1),
            }),
            queued: false,
            tick: None,
            lease: None,
        }
    }

    /// Reconcile only while this lease token is held (issue 13).
    pub fn with_lease(mut self, lease: tokio::sync::watch::Receiver<Option<i64>>) -> Self {
        self.lease = Some(lease);
        self
    }
}

impl Actor for ContainerReaper {
    type Context = Context<Self>;
}

impl Inner {
    fn settings(&self) -> ReaperSettings {
        self.settings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn instance(&self) -> String {
        self.settings().instance
    }

    /// Record an engine failure (degraded) or success.
    /// A reconcile's outcome: the backoff counts consecutive failures.
    fn engine_result(&self, st: &mut State, err: Option<&EngineError>) {
        st.failures = match err {
            Some(_) => st.failures.saturating_add(1),
            None => 0,
        };
        self.engine_seen(st, err);
    }

    /// What any call (a reconcile, or a view such as `GET /v1/services` or
    /// the console) learned of the engine: up or failing, published.
    fn engine_seen(&self, st: &mut State, err: Option<&EngineError>) {
        match err {
            Some(e) => {
                if st.engine_error.is_none() {
                    tracing::warn!(error = %e, "container engine failing; retrying with backoff");
                }
                st.engine_error = Some(e.to_string());
                self.metrics.engine_up.set(0);
            }
            None => {
                if st.engine_error.take().is_some() {
                    tracing::info!("container engine answering again");
                }
                self.metrics.engine_up.set(1);
            }
        }
        self.publish(st);
    }

    /// Health (`/readyz` body) and the `keel status` row.
    fn publish(&self, st: &mut State) {
        let reason = match (&st.engine_error, &st.replay.damage) {
            (Some(e), _) => Some(e.clone()),
            (None, Some(d)) => Some(format!("services event log damaged: {d}")),
            (None, None) => None,
        };
        self.health.set_containers(reason.clone());
        self.metrics.services.set(st.replay.desired.len() as i64);
        let row = json!({
            "state": if reason.is_some() { "degraded" } else { "ok" },
            "reason": reason,
            "instance": self.instance(),
            "reaped_at_start": st.reaped_at_start,
            "services": st.replay.desired.len(),
            "repairs": st.repairs,
            "log": {
                "records": st.replay.chain.records,
                "valid": st.replay.chain.valid,
                "damage": st.replay.damage,
            },
        });
        // The row is written when it changes, not at every look (a console
        // left open asks every 2 s).
        let row = row.to_string();
        if st.published != row {
            st.published = row.clone();
            self.persistence.do_send(PutAdapterState {
                adapter: STATUS_KEY.into(),
                state_json: row,
            });
        }
    }

    fn create_request(&self, name: &str, d: &Desired) -> CreateRequest {
        let instance = self.instance();
        let mut labels: HashMap<String, String> = d.spec.labels.clone().into_iter().collect();
        labels.extend(spec::labels(&instance, Kind::Service));
        labels.insert(spec::LABEL_SERVICE.into(), name.to_string());
        labels.insert(spec::LABEL_SPEC.into(), d.hash.clone());
        CreateRequest {
            name: service_container(&instance, name, d),
            image: d.spec.image.clone(),
            command: d.spec.command.clone(),
            env: d.spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect(),
            labels,
            memory: d
                .spec
                .memory
                .as_deref()
                .and_then(|m| spec::parse_memory(m).ok()),
            nano_cpus: d.spec.cpus.map(|c| (c * 1e9) as i64),
            network: d.spec.network.clone(),
            binds: d.spec.mounts.clone(),
        }
    }

    /// Make the engine match the desired state of one service (or its
    /// absence), given the instance's containers. Returns the container id.
    async fn converge(
        &self,
        st: &mut State,
        name: &str,
        actual: &[ContainerInfo],
    ) -> Result<Option<String>, EngineError> {
        let instance = self.instance();
        let desired = st.replay.desired.get(name).cloned();
        let want = desired
            .as_ref()
            .map(|d| (service_container(&instance, name, d), d.hash.clone()));
        let mut keep: Option<ContainerInfo> = None;
        for a in actual.iter().filter(|a| {
            a.label(spec::LABEL_KIND) == Some(Kind::Service.as_str())
                && a.label(spec::LABEL_SERVICE) == Some(name)
        }) {
            let right = want
                .as_ref()
                .is_some_and(|(n, h)| &a.name == n && a.label(spec::LABEL_SPEC) == Some(h));
            if right && keep.is_none() {
                keep = Some(a.clone());
            } else {
                self.engine.remove(&a.id).await?;
                let action = if desired.is_some() {
                    "replaced"
                } else {
                    "removed"
                };
                tracing::info!(service = name, container = %a.name, action, "container repair");
                self.metrics.repairs.with_label_values(&[action]).inc();
                st.repairs += 1;
            }
        }
        let Some(d) = desired else { return Ok(None) };
        let container = match keep {
            Some(c) => c,
            None => {
                let req = self.create_request(name, &d);
                let cname = req.name.clone();
                match self.engine.create(req).await {
                    Ok(id) => {
                        crate::failpoint::hit("container_create");
                        tracing::info!(service = name, container = %cname, "container created");
                        self.metrics.repairs.with_label_values(&["created"]).inc();
                        st.repairs += 1;
                        ContainerInfo {
                            id,
                            name: cname,
                            labels: HashMap::new(),
                            state: "created".into(),
                        }
                    }
                    // A create repeated after a crash (or raced): the name
                    // says what it is; inspect and carry on with it.
                    Err(EngineError::Conflict(_)) => {
                        match self.engine.inspect(&cname).await? {
                            Some(c) if c.label(spec::LABEL_SPEC) == Some(d.hash.as_str()) => c,
                            Some(c) => {
                                // Same name, other spec: never ours to keep.
                                self.engine.remove(&c.id).await?;
                                return Err(EngineError::Conflict(format!(
                                    "{cname} held another spec; removed, created next time"
                                )));
                            }
                            None => {
                                return Err(EngineError::Conflict(format!(
                                    "{cname} in use and gone again"
                                )))
                            }
                        }
                    }
                    Err(e) => return Err(e),
                }
            }
        };
        if !container.running() {
            self.engine.start(&container.id).await?;
            if container.state != "created" {
                tracing::info!(service = name, container = %container.name, "container started again");
                self.metrics.repairs.with_label_values(&["started"]).inc();
                st.repairs += 1;
            }
        }
        Ok(Some(container.id))
    }

    /// One full comparison and repair.
    async fn reconcile(&self, st: &mut State) -> Result<Comparison, EngineError> {
        let actual = self.engine.list(&self.instance()).await?;
        self.reconcile_with(st, actual).await
    }

    /// Compare `actual` (just listed) and repair.
    async fn reconcile_with(
        &self,
        st: &mut State,
        actual: Vec<ContainerInfo>,
    ) -> Result<Comparison, EngineError> {
        let instance = self.instance();
        let cmp = compare(&instance, &st.replay.desired, &actual);
        // A damaged log is reported, not acted on: repairing towards its
        // valid prefix could revive a killed service or remove a live one.
        if cmp.consistent() || st.replay.damage.is_some() {
            return Ok(cmp);
        }
        tracing::info!(
            missing = cmp.missing.len(),
            unexpected = cmp.unexpected.len(),
            drifted = cmp.drifted.len(),
            "reconciling services"
        );
        let mut names: BTreeSet<String> = cmp.missing.iter().cloned().collect();
        names.extend(cmp.drifted.iter().cloned());
        for a in &actual {
            if cmp.unexpected.contains(&a.name) {
                if let Some(s) = a.label(spec::LABEL_SERVICE) {
                    names.insert(s.to_string());
                } else {
                    self.engine.remove(&a.id).await?;
                    self.metrics.repairs.with_label_values(&["removed"]).inc();
                    st.repairs += 1;
                }
            }
        }
        for name in names {
            self.converge(st, &name, &actual).await?;
        }
        Ok(cmp)
    }

    /// Remove this instance's containers of `kinds`; returns how many.
    async fn remove_kinds(&self, kinds: &[Kind], grace_s: i64) -> Result<usize, EngineError> {
        let list = self.engine.list(&self.instance()).await?;
        self.remove_kinds_in(kinds, &list, grace_s).await
    }

    /// Services get `grace_s` between SIGTERM and SIGKILL; the rest is
    /// force-removed.
    async fn remove_kinds_in(
        &self,
        kinds: &[Kind],
        list: &[ContainerInfo],
        grace_s: i64,
    ) -> Result<usize, EngineError> {
        let mut n = 0;
        for c in list {
            let kind = c.label(spec::LABEL_KIND).and_then(Kind::parse);
            if kind.is_some_and(|k| kinds.contains(&k)) {
                if kind == Some(Kind::Service) && c.running() {
                    self.engine.stop(&c.id, grace_s).await?;
                }
                self.engine.remove(&c.id).await?;
                tracing::info!(container = %c.name, "container removed");
                n += 1;
            }
        }
        Ok(n)
    }

    /// Task containers whose task is not RUNNING (it ended, or its row is
    /// gone) — left by a crash between the end and the removal. Runs after
    /// task recovery, which re-attached every RUNNING one.
    async fn reap_finished_tasks(&self, list: &[ContainerInfo]) -> Result<usize, EngineError> {
        let mut n = 0;
        for c in list {
            if c.label(spec::LABEL_KIND) != Some(Kind::Task.as_str()) {
                continue;
            }
            let Some(id) = c
                .label(spec::LABEL_TASK)
                .and_then(|t| t.parse::<i64>().ok())
            else {
                continue;
            };
            let task = self
                .persistence
                .send(crate::persistence::tasks::GetTask(id))
                .await
                .unwrap_or(Err(StoreError::Closed));
            let running = match task {
                Ok(Some(t)) => t.task.state == "RUNNING" || t.task.state == "QUEUED",
                Ok(None) => false,
                // Unknown: never reap on a guess.
                Err(_) => true,
            };
            if !running {
                self.engine.remove(&c.id).await?;
                tracing::info!(container = %c.name, task = id, "finished task's container removed");
                n += 1;
            }
        }
        Ok(n)
    }

    async fn list_json(&self, st: &mut State) -> Value {
        let instance = self.instance();
        let actual = self.engine.list(&instance).await;
        self.engine_seen(st, actual.as_ref().err());
        let actual = actual.ok();
        let mut services = Vec::new();
        for (name, d) in &st.replay.desired {
            let want = service_container(&instance, name, d);
            let found = actual
                .as_ref()
                .and_then(|a| a.iter().find(|c| c.name == want));
            let state = match (&actual, found) {
                (None, _) => "unknown".to_string(),
                (Some(_), None) => "missing".to_string(),
                (Some(_), Some(c)) => c.state.clone(),
            };
            services.push(json!({
                "name": name,
                "state": state,
                "container_id": found.map(|c| c.id.clone()),
                "container": want,
                "spec_hash": d.hash,
                "image": d.spec.image,
            }));
        }
        for name in &st.replay.killed {
            services.push(json!({
                "name": name, "state": "killed", "container_id": null, "spec_hash": null,
            }));
        }
        json!({
            "services": services,
            "engine": st.engine_error.as_ref().map_or(json!("ok"), |e| json!(e)),
        })
    }
}

/// Start-time recovery (R24, R25, R32): reap this instance's ephemeral
/// containers, replay the log, adopt / replace / create services. Sent once
/// by `app::start` before ready; an engine that fails leaves keel starting
/// with containers degraded (R27). Returns the number of containers reaped.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<RecoverReport, StoreError>")]
pub struct RecoverContainers;

/// What start-up did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RecoverReport {
    pub reaped: usize,
    pub services: usize,
    pub adopted: usize,
    pub engine_error: Option<String>,
    pub log_damage: Option<String>,
}

impl Handler<RecoverContainers> for ContainerReaper {
    type Result = ResponseActFuture<Self, Result<RecoverReport, StoreError>>;

    fn handle(&mut self, _: RecoverContainers, _: &mut Context<Self>) -> Self::Result {
        let inner = self.inner.clone();
        let work = async move {
            let links = inner
                .persistence
                .send(GetServiceEvents)
                .await
                .unwrap_or(Err(StoreError::Closed))?;
            let mut st = inner.state.lock().await;
            st.replay = replay(&links);
            if let Some(d) = &st.replay.damage {
                tracing::error!(
                    damage = %d,
                    valid = st.replay.chain.valid,
                    records = st.replay.chain.records,
                    "services event log damaged: replayed up to the damage only; run `keel verify`"
                );
            }
            let mut report = RecoverReport {
                services: st.replay.desired.len(),
                log_damage: st.replay.damage.clone(),
                ..Default::default()
            };
            let result: Result<(), EngineError> = async {
                inner.engine.ping().await?;
                // One list for the whole start: reaping and adoption.
                let list = inner.engine.list(&inner.instance()).await?;
                inner.seed_run_numbers(&list);
                report.reaped = inner.remove_kinds_in(&[Kind::Ephemeral], &list, 0).await?;
                report.reaped += inner.reap_finished_tasks(&list).await?;
                let left: Vec<ContainerInfo> = list
                    .into_iter()
                    .filter(|c| c.label(spec::LABEL_KIND) == Some(Kind::Service.as_str()))
                    .collect();
                let cmp = inner.reconcile_with(&mut st, left).await?;
                report.adopted = cmp.ok.len();
                Ok(())
            }
            .await;
            st.reaped_at_start = report.reaped;
            inner
                .metrics
                .reaped
                .with_label_values(&["start"])
                .inc_by(report.reaped as u64);
            if let Err(e) = &result {
                report.engine_error = Some(e.to_string());
            }
            inner.engine_result(&mut st, result.as_ref().err());
            tracing::info!(
                reaped = report.reaped,
                services = report.services,
                adopted = report.adopted,
                engine_error = report.engine_error.as_deref().unwrap_or("none"),
                "containers recovered"
            );
            Ok(report)
        };
        Box::pin(work.into_actor(self).map(|r, this, ctx| {
            this.schedule(ctx, None);
            this.watch_events(ctx);
            r
        }))
    }
}

/// Compare and repair now. Sent by the reaper to itself (interval, engine
/// events, backoff after a failure).
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
struct Reconcile;

impl ContainerReaper {
    /// Queue the next reconcile: after `delay`, or after the interval (or
    /// the backoff while the engine fails).
    fn schedule(&mut self, ctx: &mut Context<Self>, delay: Option<Duration>) {
        if let Some(h) = self.tick.take() {
            ctx.cancel_future(h);
        }
        let delay = delay.unwrap_or_else(|| {
            let interval = self.inner.settings().reconcile_interval;
            let failures = self.inner.state.try_lock().map(|s| s.failures).unwrap_or(0);
            if failures == 0 {
                interval
            } else {
                // 0.5, 1, 2, 4 … s, capped at the interval.
                let ms = 500u64.saturating_mul(1 << failures.min(16).saturating_sub(1));
                Duration::from_millis(ms).min(interval)
            }
        });
        self.tick = Some(ctx.run_later(delay, |this, ctx| {
            this.tick = None;
            this.queue(ctx);
        }));
    }

    fn queue(&mut self, ctx: &mut Context<Self>) {
        if !self.queued {
            self.queued = true;
            ctx.notify(Reconcile);
        }
    }

    /// Engine events of this instance trigger a reconcile; the stream is
    /// re-opened with backoff when it ends (engine restarted or down).
    fn watch_events(&mut self, ctx: &mut Context<Self>) {
        let inner = self.inner.clone();
        let addr = ctx.address();
        actix_rt::spawn(async move {
            let mut failures = 0u32;
            loop {
                if addr.connected() && inner.state.lock().await.stopping {
                    return;
                }
                if !addr.connected() {
                    return;
                }
                let mut events = inner.engine.events(&inner.instance());
                let mut saw = false;
                while let Some(item) = events.next().await {
                    match item {
                        Ok(()) => {
                            saw = true;
                            failures = 0;
                            addr.do_send(EngineEvent);
                        }
                        Err(_) => break,
                    }
                }
                if !saw {
                    failures = failures.saturating_add(1);
                }
                let ms = 500u64.saturating_mul(1 << failures.min(6));
                tokio::time::sleep(Duration::from_millis(ms)).await;
                // The engine may have changed while no stream was open.
                addr.do_send(EngineEvent);
            }
        });
    }
}

/// An engine event of this instance (container died, removed, …).
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
struct EngineEvent;

impl Handler<EngineEvent> for ContainerReaper {
    type Result = ();
    fn handle(&mut self, _: EngineEvent, ctx: &mut Context<Self>) {
        // A short delay batches the burst of events one change makes.
        if !self.queued {
            self.schedule(ctx, Some(Duration::from_millis(200)));
        }
    }
}

impl Handler<Reconcile> for ContainerReaper {
    type Result = ResponseActFuture<Self, ()>;

    fn handle(&mut self, _: Reconcile, _: &mut Context<Self>) -> Self::Result {
        let inner = self.inner.clone();
        let held = self.lease.as_ref().is_none_or(|l| l.borrow().is_some());
        let work = async move {
            let mut st = inner.state.lock().await;
            if st.stopping {
                return false;
            }
            if !held {
                tracing::debug!("reconcile skipped: lease held by another instance");
                return true;
            }
            let r = inner.reconcile(&mut st).await;
            if let Err(e) = &r {
                tracing::debug!(error = %e, "reconcile failed");
            }
            inner.engine_result(&mut st, r.as_ref().err());
            true
        };
        Box::pin(work.into_actor(self).map(|go_on, this, ctx| {
            this.queued = false;
            if go_on {
                this.schedule(ctx, None);
            }
        }))
    }
}

impl Handler<SetReaperSettings> for ContainerReaper {
    type Result = ();
    fn handle(&mut self, msg: SetReaperSettings, ctx: &mut Context<Self>) {
        let changed = {
            let mut s = self
                .inner
                .settings
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let changed = s.reconcile_interval != msg.reconcile_interval;
            s.reconcile_interval = msg.reconcile_interval;
            s.stop_services_on_shutdown = msg.stop_services_on_shutdown;
            changed
        };
        if changed && self.tick.is_some() {
            self.schedule(ctx, None);
        }
    }
}

/// Deploy (or redeploy) a service. Sent by HTTP `POST /v1/services` and the
/// admin socket (`keel services deploy`).
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<Value, ServiceError>")]
pub struct DeployService {
    pub name: String,
    pub spec: ServiceSpec,
}

impl Handler<DeployService> for ContainerReaper {
    type Result = ResponseFuture<Result<Value, ServiceError>>;

    fn handle(&mut self, msg: DeployService, _: &mut Context<Self>) -> Self::Result {
        let inner = self.inner.clone();
        Box::pin(async move {
            spec::check_name(&msg.name)?;
            msg.spec.validate(&inner.settings().forbidden)?;
            let mut st = inner.state.lock().await;
            if let Some(d) = &st.replay.damage {
                return Err(ServiceError::LogDamaged(d.clone()));
            }
            if st.stopping {
                return Err(ServiceError::Engine(EngineError::Unavailable(
                    "keel is shutting down".into(),
                )));
            }
            // Checked before anything is recorded: a deploy that cannot
            // run is refused, not stored.
            match inner.engine.image_exists(&msg.spec.image).await {
                Ok(true) => inner.engine_result(&mut st, None),
                Ok(false) => return Err(ServiceError::NoSuchImage(msg.spec.image.clone())),
                Err(e) => {
                    inner.engine_result(&mut st, Some(&e));
                    return Err(ServiceError::Engine(e));
                }
            }
            let hash = msg.spec.hash();
            let unchanged = st
                .replay
                .desired
                .get(&msg.name)
                .is_some_and(|d| d.hash == hash);
            let seq = if unchanged {
                None
            } else {
                let payload = json!({"name": msg.name, "spec": msg.spec}).to_string();
                let link = inner
                    .persistence
                    .send(AppendServiceEvent {
                        kind: EVENT_DEPLOYED.into(),
                        payload,
                    })
                    .await
                    .unwrap_or(Err(StoreError::Closed))?;
                st.replay.chain.records += 1;
                st.replay.chain.valid += 1;
                st.replay.killed.remove(&msg.name);
                st.replay.desired.insert(
                    msg.name.clone(),
                    Desired {
                        spec: msg.spec.clone(),
                        hash: hash.clone(),
                        generation: link.seq,
                    },
                );
                tracing::info!(service = %msg.name, seq = link.seq, spec = %hash, "service deployed");
                Some(link.seq)
            };
            let converged: Result<Option<String>, EngineError> = async {
                let actual = inner.engine.list(&inner.instance()).await?;
                inner.converge(&mut st, &msg.name, &actual).await
            }
            .await;
            inner.engine_result(&mut st, converged.as_ref().err());
            let d = st.replay.desired.get(&msg.name).cloned();
            let container = d
                .as_ref()
                .map(|d| service_container(&inner.instance(), &msg.name, d));
            Ok(match converged {
                Ok(id) => json!({
                    "name": msg.name, "state": "running", "container_id": id,
                    "container": container, "spec_hash": hash, "seq": seq,
                    "unchanged": unchanged,
                }),
                // The decision is durable; the loop creates it later.
                Err(e) => json!({
                    "name": msg.name, "state": "pending", "container_id": null,
                    "container": container, "spec_hash": hash, "seq": seq,
                    "error": e.to_string(),
                }),
            })
        })
    }
}

/// Kill a service: it stays dead across restarts. Sent by HTTP `DELETE
/// /v1/services/{name}` and the admin socket (`keel services kill`).
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<Value, ServiceError>")]
pub struct KillService {
    pub name: String,
}

impl Handler<KillService> for ContainerReaper {
    type Result = ResponseFuture<Result<Value, ServiceError>>;

    fn handle(&mut self, msg: KillService, _: &mut Context<Self>) -> Self::Result {
        let inner = self.inner.clone();
        Box::pin(async move {
            spec::check_name(&msg.name)?;
            let mut st = inner.state.lock().await;
            if let Some(d) = &st.replay.damage {
                return Err(ServiceError::LogDamaged(d.clone()));
            }
            if !st.replay.desired.contains_key(&msg.name) {
                return Err(ServiceError::NotFound(msg.name));
            }
            let payload = json!({"name": msg.name}).to_string();
            let link = inner
                .persistence
                .send(AppendServiceEvent {
                    kind: EVENT_KILLED.into(),
                    payload,
                })
                .await
                .unwrap_or(Err(StoreError::Closed))?;
            st.replay.chain.records += 1;
            st.replay.chain.valid += 1;
            st.replay.desired.remove(&msg.name);
            st.replay.killed.insert(msg.name.clone());
            tracing::info!(service = %msg.name, seq = link.seq, "service killed");
            let removed: Result<Option<String>, EngineError> = async {
                let actual = inner.engine.list(&inner.instance()).await?;
                inner.converge(&mut st, &msg.name, &actual).await
            }
            .await;
            inner.engine_result(&mut st, removed.as_ref().err());
            Ok(match removed {
                Ok(_) => json!({"name": msg.name, "state": "killed", "seq": link.seq}),
                Err(e) => json!({
                    "name": msg.name, "state": "killed", "seq": link.seq,
                    "error": format!("container not removed yet: {e}"),
                }),
            })
        })
    }
}

/// `{"services": [{"name", "state", "container_id", "spec_hash"}], "engine"}`.
/// Sent by HTTP `GET /v1/services` and the admin socket.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Value")]
pub struct ListServices;

impl Handler<ListServices> for ContainerReaper {
    type Result = ResponseFuture<Value>;
    fn handle(&mut self, _: ListServices, _: &mut Context<Self>) -> Self::Result {
        let inner = self.inner.clone();
        Box::pin(async move {
            let mut st = inner.state.lock().await;
            inner.list_json(&mut st).await
        })
    }
}

/// The console's services part: [`drift_rows`] over the replayed log and
/// one engine listing, `{"services": [...], "engine": "ok" | error}`.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Value")]
pub struct ServiceDrift;

impl Handler<ServiceDrift> for ContainerReaper {
    type Result = ResponseFuture<Value>;
    fn handle(&mut self, _: ServiceDrift, _: &mut Context<Self>) -> Self::Result {
        let inner = self.inner.clone();
        Box::pin(async move {
            let mut st = inner.state.lock().await;
            let instance = inner.instance();
            let actual = inner.engine.list(&instance).await;
            inner.engine_seen(&mut st, actual.as_ref().err());
            let rows = drift_rows(&instance, &st.replay, actual.as_deref().ok());
            json!({
                "services": rows,
                "engine": st.engine_error.as_ref().map_or(json!("ok"), |e| json!(e)),
            })
        })
    }
}

/// `keel verify` against the running daemon: the stored log is read and
/// checked again (damage since start is found too), then compared.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<Value, StoreError>")]
pub struct VerifyServices;

impl Handler<VerifyServices> for ContainerReaper {
    type Result = ResponseFuture<Result<Value, StoreError>>;
    fn handle(&mut self, _: VerifyServices, _: &mut Context<Self>) -> Self::Result {
        let inner = self.inner.clone();
        Box::pin(async move {
            let links = inner
                .persistence
                .send(GetServiceEvents)
                .await
                .unwrap_or(Err(StoreError::Closed))?;
            let fresh = replay(&links);
            let mut st = inner.state.lock().await;
            let instance = inner.instance();
            let actual = inner.engine.list(&instance).await;
            inner.engine_seen(&mut st, actual.as_ref().err());
            if fresh.damage.is_some() && st.replay.damage.is_none() {
                tracing::error!(damage = ?fresh.damage, "services event log damaged since start");
                st.replay.damage = fresh.damage.clone();
                inner.publish(&mut st);
            }
            let actual = match &actual {
                Ok(list) => Ok(list.as_slice()),
                Err(e) => Err(e),
            };
            Ok(verify_json(&fresh, actual, &instance))
        })
    }
}

/// Shutdown (R33): stop the loop; remove ephemeral containers (and
/// services when `stop_services_on_shutdown`). Sent by the lifecycle
/// cascade; returns how many containers were removed.
#[derive(Debug, Clone, Message)]
#[rtype(result = "usize")]
pub struct StopContainers {
    pub deadline: Duration,
}

impl Handler<StopContainers> for ContainerReaper {
    type Result = ResponseActFuture<Self, usize>;

    fn handle(&mut self, msg: StopContainers, ctx: &mut Context<Self>) -> Self::Result {
        if let Some(h) = self.tick.take() {
            ctx.cancel_future(h);
        }
        let inner = self.inner.clone();
        let work = async move {
            // No run starts from here on; those in flight are removed
            // below with the rest (by name too: one may be mid-create).
            let runs = inner.stop_runs();
            let mut st = inner.state.lock().await;
            st.stopping = true;
            let mut kinds = vec![Kind::Ephemeral];
            if inner.settings().stop_services_on_shutdown {
                kinds.push(Kind::Service);
            }
            // Half the budget at most for a service's own shutdown.
            let grace_s = ((msg.deadline.as_secs() / 2) as i64).min(STOP_GRACE_S);
            let removal = async {
                let n = inner.remove_kinds(&kinds, grace_s).await?;
                for name in &runs {
                    inner.engine.remove(name).await?;
                }
                Ok::<usize, EngineError>(n)
            };
            match tokio::time::timeout(msg.deadline, removal).await {
                Ok(Ok(n)) => {
                    inner
                        .metrics
                        .reaped
                        .with_label_values(&["shutdown"])
                        .inc_by(n as u64);
                    tracing::info!(removed = n, "containers stopped");
                    n
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "containers not removed at shutdown; the next start reaps them");
                    0
                }
                Err(_) => {
                    tracing::warn!(
                        "container removal passed the deadline; the next start reaps the rest"
                    );
                    0
                }
            }
        };
        Box::pin(work.into_actor(self))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link_log(events: &[(&str, Value)]) -> Vec<Link> {
        let mut out: Vec<Link> = Vec::new();
        for (kind, payload) in events {
            let l = chain::next_link(out.last(), kind, &payload.to_string());
            out.push(l);
        }
        out
    }

    fn deployed(name: &str, image: &str) -> (&'static str, Value) {
        (
            EVENT_DEPLOYED,
            json!({"name": name, "spec": {"image": image}}),
        )
    }

    #[test]
    fn replay_latest_deploy_wins_kill_keeps_dead_and_damage_stops_it() {
        let log = link_log(&[
            deployed("web", "a"),
            deployed("db", "a"),
            deployed("web", "b"),
            (EVENT_KILLED, json!({"name": "db"})),
            deployed("web", "b"),
        ]);
        let r = replay(&log);
        assert!(r.damage.is_none());
        assert_eq!(r.desired.keys().collect::<Vec<_>>(), vec!["web"]);
        assert_eq!(r.desired["web"].spec.image, "b");
        // The identical redeploy (seq 5) keeps the container of seq 3.
        assert_eq!(r.desired["web"].generation, 3);
        assert!(r.killed.contains("db"));

        let mut damaged = log.clone();
        damaged[3].payload = json!({"name": "web"}).to_string();
        let r = replay(&damaged);
        assert_eq!(r.chain.valid, 3);
        assert!(r.damage.unwrap().contains("record 4"));
        // db was not killed: the kill lies past the damage.
        assert!(r.desired.contains_key("db"));
    }

    fn container(instance: &str, name: &str, d: &Desired, running: bool) -> ContainerInfo {
        let mut labels: HashMap<String, String> = spec::labels(instance, Kind::Service);
        labels.insert(spec::LABEL_SERVICE.into(), name.into());
        labels.insert(spec::LABEL_SPEC.into(), d.hash.clone());
        ContainerInfo {
            id: format!("id-{name}-{}", d.generation),
            name: service_container(instance, name, d),
            labels,
            state: if running { "running" } else { "exited" }.into(),
        }
    }

    #[test]
    fn compare_finds_missing_unexpected_and_drifted() {
        let r = replay(&link_log(&[
            deployed("a", "img"),
            deployed("b", "img"),
            deployed("c", "img"),
            deployed("d", "img"),
        ]));
        let d = &r.desired;
        let old = Desired {
            spec: ServiceSpec {
                image: "old".into(),
                ..Default::default()
            },
            hash: "other".into(),
            generation: 1,
        };
        let gone = Desired {
            generation: 9,
            ..d["a"].clone()
        };
        let actual = vec![
            container("i", "a", &d["a"], true),
            container("i", "b", &d["b"], false),
            container("i", "c", &old, true),
            container("i", "zombie", &gone, true),
        ];
        let c = compare("i", d, &actual);
        assert_eq!(c.ok, vec!["a"]);
        assert_eq!(c.missing, vec!["b", "d"]);
        assert_eq!(c.drifted, vec!["c"]);
        assert_eq!(c.unexpected, vec!["keel-i-service-zombie-9"]);
        assert!(!c.consistent());

        // The console's rows say the same, per service.
        let rows = drift_rows("i", &r, Some(&actual));
        let by = |name: &str, drift: &str| {
            rows.iter()
                .find(|v| v["name"] == name && v["drift"] == drift)
                .unwrap_or_else(|| panic!("no {name}/{drift} row: {rows:#?}"))
                .clone()
        };
        let a = by("a", "none");
        assert_eq!(
            (a["state"].as_str(), a["spec_hash"].as_str()),
            (Some("running"), Some(d["a"].hash.as_str()))
        );
        assert_eq!(a["actual_spec_hash"], a["spec_hash"]);
        assert_eq!(by("b", "missing")["state"], "exited");
        assert_eq!(by("d", "missing")["state"], "missing");
        let c = by("c", "drifted");
        assert_eq!(c["actual_spec_hash"], "other");
        assert_eq!(c["spec_hash"].as_str(), Some(d["c"].hash.as_str()));
        let z = by("zombie", "unexpected");
        assert_eq!(z["container"], "keel-i-service-zombie-9");
        assert!(z["spec_hash"].is_null());
        assert_eq!(rows.len(), 5);
        // No engine answer: every desired service unknown, nothing guessed.
        let blind = drift_rows("i", &r, None);
        assert_eq!(blind.len(), 4);
        assert!(blind
            .iter()
            .all(|v| v["drift"] == "unknown" && v["state"] == "unknown"));
    }

    /// A store with migrations applied, in memory, and its writer.
    fn memory_store(health: &Health, metrics: &Metrics) -> Addr<PersistenceActor> {
        let mut c = rusqlite::Connection::open_in_memory().unwrap();
        crate::persistence::migrate::migrate(&mut c, std::path::Path::new(":memory:")).unwrap();
        PersistenceActor::new(
            c,
            crate::persistence::StoreOptions::from_config(
                &crate::config::Config {
                    ephemeral: true,
                    ..Default::default()
                },
                None,
            ),
            health.clone(),
            metrics.clone(),
            Arc::new(crate::clock::WallClock),
        )
        .start()
    }

    /// On several processes the periodic reconcile runs only in the holder
    /// of the reconciler's lease: without it drift stays (another instance
    /// repairs it); once the lease is held, the next reconcile repairs.
    #[actix::test]
    async fn only_the_lease_holder_reconciles() {
        let metrics = Metrics::new();
        let health = Health::new(metrics.clone());
        let persistence = memory_store(&health, &metrics);
        let engine = engine::MemoryEngine::with_images(&["busybox"]);
        let (lease_tx, lease) = tokio::sync::watch::channel(Some(1));
        let settings = ReaperSettings {
            instance: "me".into(),
            reconcile_interval: Duration::from_secs(3600),
            stop_services_on_shutdown: false,
            forbidden: Forbidden::default(),
        };
        let reaper = ContainerReaper::new(
            Arc::new(engine.clone()),
            persistence,
            health,
            &metrics,
            settings,
        )
        .with_lease(lease)
        .start();
        reaper.send(RecoverContainers).await.unwrap().unwrap();
        reaper
            .send(DeployService {
                name: "web".into(),
                spec: ServiceSpec {
                    image: "busybox".into(),
                    ..Default::default()
                },
            })
            .await
            .unwrap()
            .unwrap();
        let creates = || {
            engine
                .lock()
                .calls
                .iter()
                .filter(|c| *c == "create")
                .count()
        };
        assert_eq!(creates(), 1);
        // The lease moves to another instance; the container vanishes.
        lease_tx.send(None).unwrap();
        engine.lock().containers.clear();
        reaper.send(Reconcile).await.unwrap();
        assert_eq!(creates(), 1, "a reconcile without the lease repaired");
        assert!(engine.lock().containers.is_empty());
        // The lease comes back: the next reconcile repairs.
        lease_tx.send(Some(2)).unwrap();
        reaper.send(Reconcile).await.unwrap();
        assert_eq!(creates(), 2, "the holder did not repair");
        assert_eq!(engine.lock().containers.len(), 1);
    }

    #[actix::test]
    async fn deploy_adopt_kill_and_reap_against_the_memory_engine() {
        let metrics = Metrics::new();
        let health = Health::new(metrics.clone());
        let conn = {
            let mut c = rusqlite::Connection::open_in_memory().unwrap();
            crate::persistence::migrate::migrate(&mut c, std::path::Path::new(":memory:")).unwrap();
            c
        };
        let persistence = PersistenceActor::new(
            conn,
            crate::persistence::StoreOptions::from_config(
                &crate::config::Config {
                    ephemeral: true,
                    ..Default::default()
                },
                None,
            ),
            health.clone(),
            metrics.clone(),
            Arc::new(crate::clock::WallClock),
        )
        .start();
        let engine = engine::MemoryEngine::with_images(&["busybox"]);
        // An ephemeral container of this instance, one of another.
        for (inst, name) in [
            ("me", "keel-me-ephemeral-x-1"),
            ("other", "keel-other-ephemeral-x-1"),
        ] {
            let mut labels = spec::labels(inst, Kind::Ephemeral);
            labels.insert("x".into(), "y".into());
            engine.lock().containers.push(ContainerInfo {
                id: name.into(),
                name: name.into(),
                labels,
                state: "running".into(),
            });
        }
        let settings = ReaperSettings {
            instance: "me".into(),
            reconcile_interval: Duration::from_secs(3600),
            stop_services_on_shutdown: false,
            forbidden: Forbidden::default(),
        };
        let reaper = ContainerReaper::new(
            Arc::new(engine.clone()),
            persistence.clone(),
            health.clone(),
            &metrics,
            settings.clone(),
        )
        .start();
        let rep = reaper.send(RecoverContainers).await.unwrap().unwrap();
        assert_eq!(rep.reaped, 1);
        assert_eq!(
            engine.lock().containers.len(),
            1,
            "the other instance's stays"
        );

        let spec = ServiceSpec {
            image: "busybox".into(),
            ..Default::default()
        };
        let out = reaper
            .send(DeployService {
                name: "web".into(),
                spec: spec.clone(),
            })
            .await
            .unwrap()
            .unwrap();
        assert_eq!(out["state"], "running");
        let refused = reaper
            .send(DeployService {
                name: "web".into(),
                spec: ServiceSpec {
                    image: "nope".into(),
                    ..Default::default()
                },
            })
            .await
            .unwrap()
            .unwrap_err();
        assert_eq!(refused.http_status(), 400);
        // A second reaper on the same store adopts the running container.
        let reaper2 = ContainerReaper::new(
            Arc::new(engine.clone()),
            persistence.clone(),
            health.clone(),
            &metrics,
            settings,
        )
        .start();
        let rep = reaper2.send(RecoverContainers).await.unwrap().unwrap();
        assert_eq!((rep.services, rep.adopted), (1, 1));
        assert_eq!(
            engine
                .lock()
                .calls
                .iter()
                .filter(|c| *c == "create")
                .count(),
            1
        );
        // Engine down: a deploy is refused and nothing is stored.
        engine.lock().down = Some(EngineError::Unavailable("socket gone".into()));
        let e = reaper2
            .send(DeployService {
                name: "db".into(),
                spec: spec.clone(),
            })
            .await
            .unwrap()
            .unwrap_err();
        assert_eq!(e.http_status(), 503);
        assert_eq!(health.containers().unwrap().0, "degraded");
        assert!(health.readiness().status != "degraded");
        engine.lock().down = None;
        let k = reaper2
            .send(KillService { name: "web".into() })
            .await
            .unwrap()
            .unwrap();
        assert_eq!(k["state"], "killed");
        assert!(engine
            .lock()
            .containers
            .iter()
            .all(|c| c.label(spec::LABEL_SERVICE).is_none()));
        let v = reaper2.send(VerifyServices).await.unwrap().unwrap();
        assert_eq!(v["consistent"], true, "{v}");

        // Task containers' engine: each call is made by the reaper with
        // its engine, answers and errors as they come.
        let through = through::ThroughReaper::new(reaper2.clone());
        let before = engine.lock().calls.len();
        let listed = through.list("me").await.unwrap();
        assert_eq!(listed.len(), engine.lock().containers.len() - 1);
        assert!(through.image_exists("busybox").await.unwrap());
        assert!(through.inspect("nothing").await.unwrap().is_none());
        assert_eq!(engine.lock().calls.len(), before + 3);
        engine.lock().down = Some(EngineError::Unavailable("socket gone".into()));
        assert!(matches!(
            through.ping().await,
            Err(EngineError::Unavailable(m)) if m == "socket gone"
        ));
    }
}
