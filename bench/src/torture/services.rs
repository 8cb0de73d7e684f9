//! Service deploys in the battery's load when an engine is configured
//! (`--docker-host` and `--image`; TESTING.md section F: containers
//! orphaned / duplicated), and the damaged event log (F8).
//!
//! One client deploys three services in turn over `POST /v1/services`,
//! each deploy carrying a label `torture.gen=<op id>` (so every deploy is a
//! new spec), and now and then kills one (`DELETE /v1/services/NAME`),
//! through the kill cycles. keel must record each acknowledged decision
//! before it touches the engine and converge after every restart.
//!
//! The final check lists the engine's containers of the battery's keel
//! instance directly (not through keel) until they match what the ledger
//! allows or a deadline passes: per service, the state after its last
//! acknowledged operation, or after any later operation whose answer was
//! lost. A service with more than one container is *duplicated*; a
//! container nothing allows (a stale generation, a killed service, an
//! ephemeral or task container left behind) is *orphaned*; a service that
//! should run with none of its allowed generations running is *missing*.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use keel_actors::containers::docker::DockerEngine;
use keel_actors::containers::engine::{ContainerInfo, Engine};
use keel_actors::containers::spec::{LABEL_KIND, LABEL_SERVICE};
use serde_json::{json, Value};

use super::tasks::Submitted;

/// The services the load deploys in turn.
const SERVICES: [&str; 3] = ["svc0", "svc1", "svc2"];
/// The user label naming the deploy a container belongs to.
const GEN_LABEL: &str = "torture.gen";
/// An operation every this often (paced load, not synchronisation).
const OP_EVERY: Duration = Duration::from_millis(250);
/// Every n-th operation is a kill instead of a deploy.
const KILL_EVERY: u64 = 5;
/// How long the final check waits for the engine to match the ledger.
const CONVERGE_DEADLINE: Duration = Duration::from_secs(60);

/// The engine the battery's keel manages containers on.
#[derive(Debug, Clone)]
pub struct EngineLoad {
    /// `unix:///path/docker.sock`.
    pub host: String,
    /// A local image with `sleep` (no registry is contacted).
    pub image: String,
    /// keel's `[containers] instance`: this run's containers only.
    pub instance: String,
}

impl EngineLoad {
    /// From the flags; `None` when no engine was named.
    pub fn from_flags(host: Option<&str>, image: Option<&str>, seed: u64) -> Result<Option<Self>> {
        match (host, image) {
            (None, None) => Ok(None),
            (Some(h), Some(i)) => {
                if !h.starts_with("unix://") {
                    bail!("--docker-host must be unix:///path/to/docker.sock, got {h:?}");
                }
                Ok(Some(EngineLoad {
                    host: h.to_string(),
                    image: i.to_string(),
                    instance: format!("torture{:08x}", seed as u32),
                }))
            }
            (Some(_), None) => bail!("--docker-host needs --image (a local image with sleep)"),
            (None, Some(_)) => bail!("--image needs --docker-host"),
        }
    }

    /// The `[containers]` section of the battery's keel.toml.
    pub fn config(&self) -> String {
        format!(
            "\n[containers]\nenabled = true\ndocker_host = \"{}\"\ninstance = \"{}\"\n\
             reconcile_interval_s = 1\n",
            self.host, self.instance
        )
    }

    fn engine(&self) -> DockerEngine {
        DockerEngine::new(&self.host, Duration::from_secs(30))
    }

    /// The engine answers and has the image (checked before the run starts).
    pub async fn preflight(&self) -> Result<()> {
        let e = self.engine();
        e.ping()
            .await
            .with_context(|| format!("--docker-host {}", self.host))?;
        if !e.image_exists(&self.image).await.unwrap_or(false) {
            bail!(
                "--image {}: not on the engine (keel pulls nothing)",
                self.image
            );
        }
        Ok(())
    }

    /// Every container of this run's instance.
    pub async fn containers(&self) -> Result<Vec<ContainerInfo>> {
        self.engine()
            .list(&self.instance)
            .await
            .with_context(|| format!("listing containers on {}", self.host))
    }

    /// Remove every container of this run's instance (the battery cleans
    /// up after itself).
    pub async fn remove_all(&self) -> Result<()> {
        let e = self.engine();
        for c in self.containers().await? {
            e.remove(&c.id)
                .await
                .with_context(|| format!("removing {}", c.name))?;
        }
        Ok(())
    }

    fn deploy_body(&self, service: &str, gen: &str) -> Value {
        json!({
            "name": service,
            "image": self.image,
            "command": ["sleep", "3600"],
            "labels": {GEN_LABEL: gen},
        })
    }
}

/// One operation on a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Deploy(String),
    Kill,
}

/// What may run for a service at the end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Desired {
    Absent,
    Gen(String),
}

impl Op {
    fn desired(&self) -> Desired {
        match self {
            Op::Deploy(g) => Desired::Gen(g.clone()),
            Op::Kill => Desired::Absent,
        }
    }
}

/// Every operation per service, in the order the one client sent them.
#[derive(Debug, Default)]
pub struct ServiceLedger {
    pub ops: BTreeMap<String, Vec<(Op, Submitted)>>,
}

impl ServiceLedger {
    /// The states a service may end in: after its last acknowledged
    /// operation (absent when none), or after any later operation whose
    /// outcome is unknown. Refused operations change nothing.
    pub fn allowed(&self, service: &str) -> Vec<Desired> {
        let ops = self.ops.get(service).map_or(&[][..], Vec::as_slice);
        let last_ok = ops.iter().rposition(|(_, s)| matches!(s, Submitted::Ok(_)));
        let mut allowed = vec![last_ok.map_or(Desired::Absent, |i| ops[i].0.desired())];
        let from = last_ok.map_or(0, |i| i + 1);
        allowed.extend(
            ops[from..]
                .iter()
                .filter(|(_, s)| *s == Submitted::Unknown)
                .map(|(op, _)| op.desired()),
        );
        allowed
    }

    fn count(&self, f: impl Fn(&Submitted) -> bool) -> u64 {
        self.ops.values().flatten().filter(|(_, s)| f(s)).count() as u64
    }
}

/// The service client of one cycle: deploys and kills until `stop`.
pub async fn service_loop(
    load: &EngineLoad,
    ledger: &std::cell::RefCell<ServiceLedger>,
    http: &reqwest::Client,
    base: &str,
    cycle: u64,
    stop: &std::cell::Cell<bool>,
) {
    let mut n = 0u64;
    while !stop.get() {
        let service = SERVICES[(n as usize) % SERVICES.len()];
        let op = if n % KILL_EVERY == KILL_EVERY - 1 {
            Op::Kill
        } else {
            Op::Deploy(format!("g{cycle}n{n}"))
        };
        n += 1;
        let i = {
            let mut l = ledger.borrow_mut();
            let ops = l.ops.entry(service.to_string()).or_default();
            ops.push((op.clone(), Submitted::Unknown));
            ops.len() - 1
        };
        let answer = match &op {
            Op::Deploy(gen) => {
                http.post(format!("{base}/v1/services"))
                    .json(&load.deploy_body(service, gen))
                    .send()
                    .await
            }
            Op::Kill => {
                http.delete(format!("{base}/v1/services/{service}"))
                    .send()
                    .await
            }
        };
        let outcome = match answer {
            Ok(r) if r.status().is_success() => match r.bytes().await {
                Ok(_) => Submitted::Ok(0),
                Err(_) => Submitted::Unknown,
            },
            Ok(r) if r.status().is_client_error() => Submitted::Refused,
            _ => Submitted::Unknown,
        };
        if let Some(ops) = ledger.borrow_mut().ops.get_mut(service) {
            ops[i].1 = outcome;
        }
        tokio::time::sleep(OP_EVERY).await;
    }
}

/// What the container check found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ContainerVerdict {
    /// Whether an engine was configured (else every figure is 0).
    pub ran: bool,
    pub ops: u64,
    pub acked: u64,
    pub containers: u64,
    /// Containers nothing allows.
    pub orphaned: Vec<String>,
    /// Services with more than one container.
    pub duplicated: Vec<String>,
    /// Services that should run, with no allowed generation running.
    pub missing: Vec<String>,
    /// ms from the final start's ready to a matching engine (or the deadline).
    pub converge_ms: u64,
}

impl ContainerVerdict {
    pub fn losses(&self) -> u64 {
        (self.orphaned.len() + self.duplicated.len() + self.missing.len()) as u64
    }

    pub fn json(&self) -> Value {
        let n = |v: &[String]| v.len() as u64;
        json!({
            "containers": self.ran,
            "services_ops": self.ops,
            "services_acked": self.acked,
            "services_missing": n(&self.missing),
            "containers_listed": self.containers,
            "containers_orphaned": n(&self.orphaned),
            "containers_duplicated": n(&self.duplicated),
            "containers_converge_ms": self.converge_ms,
        })
    }
}

/// Compares the engine's containers with what the ledger allows.
pub fn check(ledger: &ServiceLedger, containers: &[ContainerInfo]) -> ContainerVerdict {
    let mut v = ContainerVerdict {
        ran: true,
        ops: ledger.count(|_| true),
        acked: ledger.count(|s| matches!(s, Submitted::Ok(_))),
        containers: containers.len() as u64,
        ..ContainerVerdict::default()
    };
    let mut by_service: HashMap<&str, Vec<&ContainerInfo>> = HashMap::new();
    for c in containers {
        match (c.label(LABEL_KIND), c.label(LABEL_SERVICE)) {
            (Some("service"), Some(s)) => by_service.entry(s).or_default().push(c),
            _ => v.orphaned.push(c.name.clone()),
        }
    }
    let mut names: Vec<&str> = ledger.ops.keys().map(String::as_str).collect();
    names.extend(by_service.keys().filter(|s| !ledger.ops.contains_key(**s)));
    for service in names {
        let allowed = ledger.allowed(service);
        let found = by_service.get(service).map_or(&[][..], Vec::as_slice);
        if found.len() > 1 {
            v.duplicated.push(service.to_string());
        }
        let allows = |c: &&ContainerInfo| {
            c.label(GEN_LABEL)
                .is_some_and(|g| allowed.contains(&Desired::Gen(g.to_string())))
        };
        for c in found.iter().filter(|c| !allows(c)) {
            v.orphaned.push(c.name.clone());
        }
        let running = found.iter().any(|c| allows(c) && c.running());
        if !running && !allowed.contains(&Desired::Absent) {
            v.missing.push(service.to_string());
        }
    }
    v
}

/// The final check: polls the engine until it matches the ledger or
/// [`CONVERGE_DEADLINE`] passes.
pub async fn converge(
    load: &EngineLoad,
    ledger: &std::cell::RefCell<ServiceLedger>,
) -> Result<ContainerVerdict> {
    let began = Instant::now();
    loop {
        let listed = load.containers().await?;
        let mut v = check(&ledger.borrow(), &listed);
        if v.losses() == 0 || began.elapsed() >= CONVERGE_DEADLINE {
            v.converge_ms = began.elapsed().as_millis() as u64;
            return Ok(v);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

// ---------------------------------------------------------------------------
// F8: the event log damaged while keel is stopped.

/// One way to damage the services event log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventDamage {
    /// A record's payload edited.
    Edited,
    /// A record deleted (a gap in the sequence).
    Gap,
    /// The last record cut short (a torn write).
    Torn,
}

impl EventDamage {
    pub const ALL: &'static [EventDamage] =
        &[EventDamage::Edited, EventDamage::Gap, EventDamage::Torn];

    pub fn name(self) -> &'static str {
        match self {
            EventDamage::Edited => "events_edited",
            EventDamage::Gap => "events_gap",
            EventDamage::Torn => "events_torn",
        }
    }

    /// The SQL that does it, behind the schema's append-only triggers.
    fn sql(self) -> &'static str {
        match self {
            EventDamage::Edited => {
                "UPDATE service_events SET payload = replace(payload, 'sleep', 'sleeq')
                 WHERE seq = (SELECT (min(seq) + max(seq)) / 2 FROM service_events)"
            }
            EventDamage::Gap => {
                "DELETE FROM service_events
                 WHERE seq = (SELECT (min(seq) + max(seq)) / 2 FROM service_events)"
            }
            EventDamage::Torn => {
                "UPDATE service_events SET payload = substr(payload, 1, length(payload) / 2)
                 WHERE seq = (SELECT max(seq) FROM service_events)"
            }
        }
    }

    /// Damage `data_dir/keel.db` (keel stopped), opened the way keel
    /// opens it (with the dir's master key unless it is plain SQLite).
    pub fn apply(self, data_dir: &Path) -> Result<()> {
        let conn = super::open_store(data_dir)?;
        let records: i64 = conn
            .query_row("SELECT count(*) FROM service_events", [], |r| r.get(0))
            .context("reading the services event log")?;
        if records < 3 {
            bail!("the services event log has {records} records; the damage cases need 3");
        }
        conn.execute_batch(&format!(
            "DROP TRIGGER IF EXISTS service_events_no_update;
             DROP TRIGGER IF EXISTS service_events_no_delete;
             {};",
            self.sql()
        ))
        .with_context(|| format!("damaging the event log ({})", self.name()))?;
        Ok(())
    }
}

/// What keel made of a damaged event log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventOutcome {
    /// Ready, `/readyz` says the log is damaged, deploys are refused (409),
    /// and every acknowledged message is still there.
    Detected,
    /// Started as if nothing happened (or accepted a deploy on top).
    Undetected(String),
    /// Acknowledged messages missing from the damaged store.
    Lost(u64),
}

impl EventOutcome {
    pub fn short(&self) -> String {
        match self {
            EventOutcome::Detected => "detected".into(),
            EventOutcome::Undetected(_) => "undetected".into(),
            EventOutcome::Lost(n) => format!("lost:{n}"),
        }
    }
}

impl std::fmt::Display for EventOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EventOutcome::Detected => {
                write!(
                    f,
                    "detected (readyz degraded, deploy refused, nothing lost)"
                )
            }
            EventOutcome::Undetected(why) => write!(f, "UNDETECTED ({why})"),
            EventOutcome::Lost(n) => write!(f, "LOST {n} acknowledged messages"),
        }
    }
}

/// Judge a keel started on a damaged log: its `/readyz` body and the
/// answer to a deploy.
pub fn judge(readyz: &Value, deploy_status: u16, lost: u64) -> EventOutcome {
    if lost > 0 {
        return EventOutcome::Lost(lost);
    }
    let c = &readyz["containers"];
    let reason = c["reason"].as_str().unwrap_or("");
    if c["status"] != "degraded" || !reason.contains("damaged") {
        return EventOutcome::Undetected(format!("readyz containers {c}"));
    }
    if deploy_status != 409 {
        return EventOutcome::Undetected(format!("a deploy answered {deploy_status}"));
    }
    EventOutcome::Detected
}

/// Copy the regular files of `from` into a new `to` (keel stopped).
pub fn copy_store(from: &Path, to: &Path) -> Result<()> {
    fs::create_dir_all(to).with_context(|| format!("cannot create {}", to.display()))?;
    for e in fs::read_dir(from).with_context(|| format!("cannot read {}", from.display()))? {
        let e = e?;
        let ty = e.file_type()?;
        let dest = to.join(e.file_name());
        if ty.is_dir() {
            copy_store(&e.path(), &dest)?;
        } else if ty.is_file() {
            fs::copy(e.path(), &dest)
                .with_context(|| format!("cannot copy {}", e.path().display()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ledger(ops: &[(&str, Op, Submitted)]) -> ServiceLedger {
        let mut l = ServiceLedger::default();
        for (s, op, out) in ops {
            l.ops
                .entry(s.to_string())
                .or_default()
                .push((op.clone(), *out));
        }
        l
    }

    fn deploy(g: &str) -> Op {
        Op::Deploy(g.into())
    }

    fn container(name: &str, kind: &str, service: &str, gen: &str, state: &str) -> ContainerInfo {
        let labels = [
            (LABEL_KIND, kind),
            (LABEL_SERVICE, service),
            (GEN_LABEL, gen),
        ]
        .iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        ContainerInfo {
            id: name.into(),
            name: name.into(),
            labels,
            state: state.into(),
        }
    }

    #[test]
    fn allowed_states_follow_the_last_ack_and_later_unknowns() {
        let l = ledger(&[
            ("a", deploy("1"), Submitted::Ok(0)),
            ("a", deploy("2"), Submitted::Unknown),
            ("a", deploy("3"), Submitted::Ok(0)),
            ("a", Op::Kill, Submitted::Unknown),
            ("a", deploy("5"), Submitted::Refused),
            ("b", deploy("1"), Submitted::Unknown),
        ]);
        assert_eq!(l.allowed("a"), [Desired::Gen("3".into()), Desired::Absent]);
        assert_eq!(l.allowed("b"), [Desired::Absent, Desired::Gen("1".into())]);
        assert_eq!(l.allowed("never"), [Desired::Absent]);
    }

    #[test]
    fn a_converged_engine_passes() {
        let l = ledger(&[
            ("a", deploy("1"), Submitted::Ok(0)),
            ("b", deploy("1"), Submitted::Ok(0)),
            ("b", Op::Kill, Submitted::Ok(0)),
        ]);
        let v = check(&l, &[container("c1", "service", "a", "1", "running")]);
        assert_eq!(v.losses(), 0, "{v:?}");
        assert_eq!((v.ops, v.acked, v.containers), (3, 3, 1));
    }

    #[test]
    fn stale_killed_and_foreign_containers_are_orphans() {
        let l = ledger(&[
            ("a", deploy("1"), Submitted::Ok(0)),
            ("a", deploy("2"), Submitted::Ok(0)),
            ("b", deploy("1"), Submitted::Ok(0)),
            ("b", Op::Kill, Submitted::Ok(0)),
        ]);
        let v = check(
            &l,
            &[
                container("a2", "service", "a", "2", "running"),
                container("a1", "service", "a", "1", "running"),
                container("b1", "service", "b", "1", "running"),
                container("e", "ephemeral", "", "", "exited"),
            ],
        );
        let mut o = v.orphaned.clone();
        o.sort();
        assert_eq!(o, ["a1", "b1", "e"]);
        assert_eq!(v.duplicated, ["a"]);
        assert!(v.missing.is_empty());
    }

    #[test]
    fn a_service_that_should_run_but_does_not_is_missing() {
        let l = ledger(&[("a", deploy("1"), Submitted::Ok(0))]);
        assert_eq!(check(&l, &[]).missing, ["a"]);
        let stopped = container("a1", "service", "a", "1", "exited");
        assert_eq!(check(&l, &[stopped]).missing, ["a"]);
        let wrong = container("a0", "service", "a", "0", "running");
        let v = check(&l, &[wrong]);
        assert_eq!((v.missing.len(), v.orphaned.len()), (1, 1));
    }

    #[test]
    fn a_damaged_log_must_be_reported_refused_and_lose_nothing() {
        let degraded = json!({"containers": {"status": "degraded", "reason": "services event log damaged at record 2"}});
        assert_eq!(judge(&degraded, 409, 0), EventOutcome::Detected);
        assert_eq!(judge(&degraded, 409, 3), EventOutcome::Lost(3));
        assert!(matches!(
            judge(&degraded, 200, 0),
            EventOutcome::Undetected(_)
        ));
        let ok = json!({"containers": {"status": "ok"}});
        assert!(matches!(judge(&ok, 409, 0), EventOutcome::Undetected(_)));
    }

    #[test]
    fn engine_flags_come_in_pairs() {
        assert!(EngineLoad::from_flags(None, None, 1).unwrap().is_none());
        assert!(EngineLoad::from_flags(Some("unix:///x"), None, 1).is_err());
        assert!(EngineLoad::from_flags(None, Some("img"), 1).is_err());
        assert!(EngineLoad::from_flags(Some("tcp://x"), Some("img"), 1).is_err());
        let e = EngineLoad::from_flags(Some("unix:///x"), Some("img"), 0xabc)
            .unwrap()
            .unwrap();
        assert!(keel_actors::config::check_instance(&e.instance).is_ok());
    }
}
