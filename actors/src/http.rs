//! The HTTP listener: health and admin endpoints (R36) plus the webhook
//! adapter's route. Bound before recovery so `/healthz` and `/readyz`
//! answer from the first moment; the webhook route refuses messages until
//! the intake gate opens.
//!
//! Admin endpoints (`/v1/sessions*`, `/v1/tasks*`, `/v1/services*`, and every
//! admin route added later) are mounted with [`admin_scope`], which checks the request
//! against the access rule of `vault::decide` before the handler runs:
//! `Authorization: Bearer <token>` with the permission the route needs
//! (GET = `read`, other methods = the scope's write permission), loopback
//! peers without a token while `[admin] loopback_open`. 401 = no usable
//! token (one generic message), 403 = a valid token without the permission
//! or outside its session scope. `/healthz` and `/readyz` are always open;
//! `/metrics` is open to loopback peers and needs `read` from others.
//! `/console` and `/v1/stats` (the operator console, `crate::console`) are
//! admin routes too.

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use actix::{Addr, Recipient};
use actix_web::body::BoxBody;
use actix_web::dev::{ServerHandle, ServiceRequest, ServiceResponse};
use actix_web::middleware::{from_fn, Next};
use actix_web::{web, App, HttpMessage, HttpResponse, HttpServer};
use serde::Deserialize;
use serde_json::json;

use crate::adapter::ChannelRoutes;
use crate::clock::Clock;
use crate::containers::spec::ServiceSpec;
use crate::containers::{
    ContainerReaper, DeployService, KillService, ListServices, RunEphemeral, ServiceError,
};
use crate::error::StoreError;
use crate::health::Health;
use crate::ids::MAX_ID_BYTES;
use crate::metrics::Metrics;
use crate::outbox::OutboxKick;
use crate::persistence::tasks::{GetTask, GetTaskLogs, GetTasks, Origin, TaskState};
use crate::persistence::{
    CommitNotice, GetSession, GetSessions, GetTurns, PersistenceActor, SessionKey,
};
use crate::tasks::{CancelTask, SubmitError, SubmitTask, TaskActor};
use crate::vault::{decide, Access, Authorized, Perm, TokenTable};

#[derive(Clone)]
struct AdminState {
    health: Health,
    metrics: Metrics,
    persistence: Addr<PersistenceActor>,
    /// Replaced on reload (`[admin]` applies live).
    access: Arc<RwLock<AdminAccess>>,
    /// The task runner (`POST /v1/tasks`, cancel).
    tasks: Option<Addr<TaskActor>>,
    /// Capability tokens of the running daemon.
    tokens: TokenTable,
    clock: Arc<dyn Clock>,
    /// Told after `POST /v1/sessions/{session}/messages` stored a reply.
    outbox: Option<Recipient<OutboxKick>>,
    auth_failures: prometheus::IntCounterVec,
    /// The container reaper (`/v1/services`), when containers are enabled.
    services: Option<Addr<ContainerReaper>>,
}

/// Who may call admin endpoints; from `[admin]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdminAccess {
    /// Loopback peers need no token.
    pub loopback_open: bool,
}

fn is_loopback(peer: Option<SocketAddr>) -> bool {
    peer.is_some_and(|p| p.ip().to_canonical().is_loopback())
}

impl AdminAccess {
    /// Whether a request from `peer` without a token may use an admin
    /// endpoint. A peer that is not a TCP address is never trusted.
    pub fn allows(&self, peer: Option<SocketAddr>) -> bool {
        self.loopback_open && is_loopback(peer)
    }
}

/// What a route needs beyond `read` for methods other than GET/HEAD, and
/// whether it serves sessions (a scoped token is only let into those).
#[derive(Debug, Clone, Copy)]
pub struct RouteAccess {
    pub write: Perm,
    pub sessions: bool,
}

fn unauthorized() -> HttpResponse {
    HttpResponse::Unauthorized()
        .insert_header(("WWW-Authenticate", "Bearer"))
        .json(json!({"error": "a valid capability token is needed (Authorization: Bearer keel_…)"}))
}

/// Apply the access rule to `req` for `need`; `None` = let through (with
/// the token, if one was presented, in the request's extensions), else the
/// refusal to send.
fn check(req: &ServiceRequest, need: Perm, sessions: bool) -> Option<HttpResponse> {
    let Some(state) = req.app_data::<web::Data<AdminState>>() else {
        return Some(HttpResponse::InternalServerError().finish());
    };
    let open = state
        .access
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .loopback_open;
    let header = req
        .headers()
        .get(actix_web::http::header::AUTHORIZATION)
        .map(|h| h.as_bytes());
    let peer = req.peer_addr();
    let decision = decide(
        &state.tokens,
        open,
        is_loopback(peer),
        header,
        need,
        state.clock.now_ms(),
    );
    let refuse = |reason: &str, token: Option<&str>, resp: HttpResponse| {
        tracing::warn!(
            peer = ?peer,
            token_id = token.unwrap_or("-"),
            path = %req.path(),
            reason,
            "admin request refused"
        );
        state.auth_failures.with_label_values(&[reason]).inc();
        state.tokens.count_failure();
        Some(resp)
    };
    match decision {
        Access::Granted(None) => None,
        Access::Granted(Some(a)) => {
            if a.scope.is_some() && !sessions {
                let id = a.token_id.clone();
                return refuse(
                    "scope",
                    Some(&id),
                    HttpResponse::Forbidden()
                        .json(json!({"error": "this token is limited to sessions"})),
                );
            }
            if state.tokens.should_touch(&a.token_id, state.clock.now_ms()) {
                state
                    .persistence
                    .do_send(crate::persistence::vault::TouchToken(a.token_id.clone()));
            }
            req.extensions_mut().insert(a);
            None
        }
        Access::Unauthorized(why, id) => refuse(why.as_str(), id.as_deref(), unauthorized()),
        Access::Forbidden { token_id, need } => refuse(
            "permission",
            Some(&token_id),
            HttpResponse::Forbidden().json(
                json!({"error": format!("this token lacks the {} permission", need.as_str())}),
            ),
        ),
    }
}

/// A scope of admin routes under `path`: GET and HEAD need `read`, other
/// methods `access.write`; the check runs before any handler, so a refused
/// request never reaches the store. A new admin route family is one call:
/// `admin_scope("/v1/services", RouteAccess { write: Perm::Deploy, sessions: false })`.
pub fn admin_scope(
    path: &str,
    access: RouteAccess,
) -> actix_web::Scope<
    impl actix_web::dev::ServiceFactory<
        ServiceRequest,
        Config = (),
        Response = ServiceResponse<BoxBody>,
        Error = actix_web::Error,
        InitError = (),
    >,
> {
    web::scope(path).wrap(from_fn(
        move |req: ServiceRequest, next: Next<BoxBody>| async move {
            let need = match *req.method() {
                actix_web::http::Method::GET | actix_web::http::Method::HEAD => Perm::Read,
                _ => access.write,
            };
            match check(&req, need, access.sessions) {
                None => next.call(req).await,
                Some(resp) => Ok(req.into_response(resp)),
            }
        },
    ))
}

/// The token a request passed with (none: a loopback peer without one).
fn token_of(req: &actix_web::HttpRequest) -> Option<Authorized> {
    req.extensions().get::<Authorized>().cloned()
}

/// Whether the request's token (if any) sees `session`.
fn sees(req: &actix_web::HttpRequest, session: &str) -> bool {
    token_of(req).is_none_or(|a| a.sees(session))
}

async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

async fn readyz(state: web::Data<AdminState>) -> HttpResponse {
    let r = state.health.readiness();
    let mut body = if r.ready {
        json!({"status": r.status})
    } else {
        json!({"status": r.status, "reason": r.reason})
    };
    // The container engine never makes keel unready (R27); its state is
    // in the body.
    if let Some((status, reason)) = state.health.containers() {
        body["containers"] = json!({"status": status, "reason": reason});
    }
    if r.ready {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
}

async fn metrics_text(state: web::Data<AdminState>, req: actix_web::HttpRequest) -> HttpResponse {
    if !is_loopback(req.peer_addr()) {
        let header = req
            .headers()
            .get(actix_web::http::header::AUTHORIZATION)
            .map(|h| h.as_bytes());
        match decide(
            &state.tokens,
            false,
            false,
            header,
            Perm::Read,
            state.clock.now_ms(),
        ) {
            Access::Granted(_) => {}
            Access::Unauthorized(why, id) => {
                tracing::warn!(peer = ?req.peer_addr(), token_id = id.as_deref().unwrap_or("-"), path = "/metrics", reason = why.as_str(), "admin request refused");
                state.auth_failures.with_label_values(&[why.as_str()]).inc();
                state.tokens.count_failure();
                return unauthorized();
            }
            Access::Forbidden { token_id, .. } => {
                tracing::warn!(peer = ?req.peer_addr(), token_id = %token_id, path = "/metrics", reason = "permission", "admin request refused");
                state.auth_failures.with_label_values(&["permission"]).inc();
                state.tokens.count_failure();
                return HttpResponse::Forbidden()
                    .json(json!({"error": "this token lacks the read permission"}));
            }
        }
    }
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(state.metrics.render())
}

fn store_error(e: StoreError) -> HttpResponse {
    if e.is_transient() {
        HttpResponse::ServiceUnavailable().json(json!({"error": e.to_string()}))
    } else {
        tracing::error!(error = %e, "admin query failed");
        HttpResponse::InternalServerError().json(json!({"error": e.to_string()}))
    }
}

async fn sessions(state: web::Data<AdminState>, req: actix_web::HttpRequest) -> HttpResponse {
    match state
        .persistence
        .send(GetSessions)
        .await
        .unwrap_or(Err(StoreError::Closed))
    {
        Ok(mut list) => {
            // A scoped token lists only its sessions.
            list.retain(|s| sees(&req, &s.id));
            HttpResponse::Ok().json(json!({ "sessions": list }))
        }
        Err(e) => store_error(e),
    }
}

#[derive(Deserialize)]
struct TurnsQuery {
    after: Option<i64>,
    limit: Option<i64>,
}

fn session_id_ok(session: &str) -> bool {
    !(session.is_empty()
        || session.len() > MAX_ID_BYTES + 16
        || session.chars().any(char::is_control))
}

fn out_of_scope() -> HttpResponse {
    HttpResponse::Forbidden().json(json!({"error": "this session is outside the token's scope"}))
}

async fn turns(
    state: web::Data<AdminState>,
    req: actix_web::HttpRequest,
    path: web::Path<String>,
    query: web::Query<TurnsQuery>,
) -> HttpResponse {
    let session = path.into_inner();
    if !session_id_ok(&session) {
        return HttpResponse::BadRequest().json(json!({"error": "invalid session id"}));
    }
    if !sees(&req, &session) {
        return out_of_scope();
    }
    let limit = query.limit.unwrap_or(10_000).clamp(1, 100_000);
    let after = query.after.unwrap_or(0).max(0);
    match state
        .persistence
        .send(GetTurns {
            session: session.clone(),
            after_seq: after,
            limit,
        })
        .await
        .unwrap_or(Err(StoreError::Closed))
    {
        Ok(Some(turns)) => HttpResponse::Ok().json(json!({"session": session, "turns": turns})),
        Ok(None) => HttpResponse::NotFound().json(json!({"error": "no such session"})),
        Err(e) => store_error(e),
    }
}

#[derive(Deserialize)]
struct TasksQuery {
    state: Option<String>,
    limit: Option<i64>,
}

/// `GET /v1/tasks[?state=S&limit=N]`: every task, oldest first, with its states.
async fn tasks_list(state: web::Data<AdminState>, query: web::Query<TasksQuery>) -> HttpResponse {
    let filter = match &query.state {
        None => None,
        Some(s) => match TaskState::parse(&s.to_ascii_uppercase()) {
            Some(st) => Some(st.as_str().to_string()),
            None => {
                return HttpResponse::BadRequest().json(json!({"error": format!(
                    "unknown state {:?} (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED, INTERRUPTED, TIMED_OUT)",
                    s.chars().take(32).collect::<String>()
                )}))
            }
        },
    };
    let limit = query.limit.unwrap_or(10_000).clamp(1, 100_000);
    match state
        .persistence
        .send(GetTasks {
            state: filter,
            limit,
        })
        .await
        .unwrap_or(Err(StoreError::Closed))
    {
        Ok(list) => HttpResponse::Ok().json(json!({ "tasks": list })),
        Err(e) => store_error(e),
    }
}

/// `GET /v1/tasks/{id}`.
async fn task_show(state: web::Data<AdminState>, path: web::Path<i64>) -> HttpResponse {
    match state
        .persistence
        .send(GetTask(path.into_inner()))
        .await
        .unwrap_or(Err(StoreError::Closed))
    {
        Ok(Some(t)) => HttpResponse::Ok().json(t),
        Ok(None) => HttpResponse::NotFound().json(json!({"error": "no such task"})),
        Err(e) => store_error(e),
    }
}

#[derive(Deserialize)]
struct LogsQuery {
    stream: Option<String>,
    after: Option<i64>,
}

/// Most bytes of output one `GET /v1/tasks/{id}/logs` returns; page on
/// with `?after=` = the `X-Keel-Last-Seq` header of the answer.
const LOGS_PAGE_BYTES: usize = 16 * 1024 * 1024;

/// `GET /v1/tasks/{id}/logs[?stream=stdout|stderr&after=SEQ]`: raw bytes in order.
async fn task_logs(
    state: web::Data<AdminState>,
    path: web::Path<i64>,
    query: web::Query<LogsQuery>,
) -> HttpResponse {
    let id = path.into_inner();
    if let Some(s) = &query.stream {
        if s != "stdout" && s != "stderr" {
            return HttpResponse::BadRequest()
                .json(json!({"error": "stream must be stdout or stderr"}));
        }
    }
    match state
        .persistence
        .send(GetTask(id))
        .await
        .unwrap_or(Err(StoreError::Closed))
    {
        Ok(Some(_)) => {}
        Ok(None) => return HttpResponse::NotFound().json(json!({"error": "no such task"})),
        Err(e) => return store_error(e),
    }
    let after = query.after.unwrap_or(0).max(0);
    match state
        .persistence
        .send(GetTaskLogs {
            id,
            stream: query.stream.clone(),
            after_seq: after,
            max_bytes: LOGS_PAGE_BYTES,
        })
        .await
        .unwrap_or(Err(StoreError::Closed))
    {
        Ok(frags) => {
            let last = frags.last().map_or(after, |f| f.0);
            let body: Vec<u8> = frags.into_iter().flat_map(|f| f.2).collect();
            HttpResponse::Ok()
                .content_type("application/octet-stream")
                .insert_header(("X-Keel-Last-Seq", last.to_string()))
                .body(body)
        }
        Err(e) => store_error(e),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RunBody {
    name: String,
    #[serde(default)]
    args: Vec<String>,
}

/// `POST /v1/tasks {"name", "args"}` → `{"id", "name", "state": "QUEUED"}`.
async fn task_run(state: web::Data<AdminState>, body: web::Bytes) -> HttpResponse {
    let req: RunBody = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return HttpResponse::BadRequest()
                .json(json!({"error": format!("bad request body: {e}")}))
        }
    };
    let Some(tasks) = &state.tasks else {
        return HttpResponse::ServiceUnavailable().json(json!({"error": "tasks are not running"}));
    };
    let name = req.name.clone();
    match tasks
        .send(SubmitTask {
            name: req.name,
            args: req.args,
            origin: Origin::Http,
        })
        .await
    {
        Ok(Ok(id)) => HttpResponse::Ok().json(json!({"id": id, "name": name, "state": "QUEUED"})),
        Ok(Err(SubmitError::UnknownTask(e))) => HttpResponse::NotFound().json(json!({"error": e})),
        Ok(Err(SubmitError::BadArgs(e))) => HttpResponse::BadRequest().json(json!({"error": e})),
        Ok(Err(SubmitError::Store(e))) => store_error(e),
        Ok(Err(SubmitError::ShuttingDown)) | Err(_) => {
            HttpResponse::ServiceUnavailable().json(json!({"error": "keel is shutting down"}))
        }
    }
}

/// `POST /v1/tasks/{id}/cancel`.
async fn task_cancel(state: web::Data<AdminState>, path: web::Path<i64>) -> HttpResponse {
    let id = path.into_inner();
    let Some(tasks) = &state.tasks else {
        return HttpResponse::ServiceUnavailable().json(json!({"error": "tasks are not running"}));
    };
    match tasks.send(CancelTask(id)).await {
        Ok(Ok(crate::persistence::tasks::CancelOutcome::NotFound)) => {
            HttpResponse::NotFound().json(json!({"error": "no such task"}))
        }
        Ok(Ok(out)) => HttpResponse::Ok().json(crate::tasks::admin::cancel_json(id, &out)),
        Ok(Err(e)) => store_error(e),
        Err(_) => {
            HttpResponse::ServiceUnavailable().json(json!({"error": "keel is shutting down"}))
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SayBody {
    text: String,
}

/// Longest text `POST /v1/sessions/{session}/messages` accepts.
const MAX_SAY_BYTES: usize = 64 * 1024;

/// `POST /v1/sessions/{session}/messages {"text"}` (`send`): keel says
/// `text` in an existing chat — stored as a reply with its outbox row, then
/// sent like any reply. → `{"session", "seq", "outbox_id"}`.
async fn say(
    state: web::Data<AdminState>,
    req: actix_web::HttpRequest,
    path: web::Path<String>,
    body: web::Bytes,
) -> HttpResponse {
    let session = path.into_inner();
    if !session_id_ok(&session) {
        return HttpResponse::BadRequest().json(json!({"error": "invalid session id"}));
    }
    if !sees(&req, &session) {
        return out_of_scope();
    }
    let text = match serde_json::from_slice::<SayBody>(&body) {
        Ok(b) if b.text.trim().is_empty() => {
            return HttpResponse::BadRequest().json(json!({"error": "text is empty"}))
        }
        Ok(b) if b.text.len() > MAX_SAY_BYTES => {
            return HttpResponse::BadRequest()
                .json(json!({"error": format!("text longer than {MAX_SAY_BYTES} bytes")}))
        }
        Ok(b) => b.text,
        Err(e) => {
            return HttpResponse::BadRequest()
                .json(json!({"error": format!("bad request body: {e}")}))
        }
    };
    match state
        .persistence
        .send(GetSession {
            id: session.clone(),
            tail: 0,
        })
        .await
        .unwrap_or(Err(StoreError::Closed))
    {
        Ok(Some(_)) => {}
        Ok(None) => return HttpResponse::NotFound().json(json!({"error": "no such session"})),
        Err(e) => return store_error(e),
    }
    let Some((channel, chat)) = session.split_once(':') else {
        return HttpResponse::BadRequest().json(json!({"error": "invalid session id"}));
    };
    match state
        .persistence
        .send(CommitNotice {
            session: SessionKey::new(channel, chat),
            text,
            deliver: true,
        })
        .await
        .unwrap_or(Err(StoreError::Closed))
    {
        Ok((seq, outbox_id)) => {
            if let Some(o) = &state.outbox {
                o.do_send(OutboxKick);
            }
            HttpResponse::Ok().json(json!({"session": session, "seq": seq, "outbox_id": outbox_id}))
        }
        Err(e) => store_error(e),
    }
}

fn service_error(e: &ServiceError) -> HttpResponse {
    let status = actix_web::http::StatusCode::from_u16(e.http_status())
        .unwrap_or(actix_web::http::StatusCode::INTERNAL_SERVER_ERROR);
    if status.is_server_error() {
        tracing::warn!(error = %e, "service request failed");
    }
    HttpResponse::build(status).json(json!({"error": e.to_string()}))
}

fn no_services() -> HttpResponse {
    service_error(&ServiceError::Disabled)
}

/// `POST /v1/services` body: the name and the spec's fields side by side.
#[derive(Deserialize)]
struct DeployBody {
    name: String,
    #[serde(flatten)]
    spec: serde_json::Map<String, serde_json::Value>,
}

/// `GET /v1/services` → `{"services": [{"name", "state", "container_id", "spec_hash"}]}`.
async fn services_list(state: web::Data<AdminState>) -> HttpResponse {
    let Some(services) = &state.services else {
        return no_services();
    };
    match services.send(ListServices).await {
        Ok(v) => HttpResponse::Ok().json(v),
        Err(_) => {
            HttpResponse::ServiceUnavailable().json(json!({"error": "keel is shutting down"}))
        }
    }
}

/// Parse a JSON admin body; the error is the one-line 400 text naming `what`.
fn json_body<T: serde::de::DeserializeOwned>(body: &[u8], what: &str) -> Result<T, String> {
    serde_json::from_slice(body).map_err(|e| format!("bad {what}: {e}"))
}

/// The container spec inside a body: the spec's own parser names an unknown
/// or mistyped field.
fn spec_of(
    fields: serde_json::Map<String, serde_json::Value>,
    what: &str,
) -> Result<ServiceSpec, String> {
    serde_json::from_value(serde_json::Value::Object(fields))
        .map_err(|e| format!("bad {what}: {e}"))
}

/// `POST /v1/services {"name", "image", "command", "env", "labels", "memory", …}`.
async fn services_deploy(state: web::Data<AdminState>, body: web::Bytes) -> HttpResponse {
    let Some(services) = &state.services else {
        return no_services();
    };
    let req: DeployBody = match json_body(&body, "request body") {
        Ok(r) => r,
        Err(e) => return HttpResponse::BadRequest().json(json!({"error": e})),
    };
    let spec = match spec_of(req.spec, "service spec") {
        Ok(s) => s,
        Err(e) => return HttpResponse::BadRequest().json(json!({"error": e})),
    };
    match services
        .send(DeployService {
            name: req.name,
            spec,
        })
        .await
    {
        Ok(Ok(v)) if v["state"] == "pending" => HttpResponse::Accepted().json(v),
        Ok(Ok(v)) => HttpResponse::Ok().json(v),
        Ok(Err(e)) => service_error(&e),
        Err(_) => {
            HttpResponse::ServiceUnavailable().json(json!({"error": "keel is shutting down"}))
        }
    }
}

/// `POST /v1/containers/run` body: an optional name and timeout beside the
/// spec's fields.
#[derive(Deserialize)]
struct ContainerRunBody {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    timeout_s: Option<f64>,
    #[serde(flatten)]
    spec: serde_json::Map<String, serde_json::Value>,
}

/// `POST /v1/containers/run {"image", "command", "env", "memory", …,
/// "timeout_s"?, "name"?}` → `{"container", "exit_code", "timed_out",
/// "stopped", "stdout", "stderr", "truncated", "duration_ms"}` once the
/// container is done (and removed).
async fn containers_run(state: web::Data<AdminState>, body: web::Bytes) -> HttpResponse {
    let Some(services) = &state.services else {
        return no_services();
    };
    let req: ContainerRunBody = match json_body(&body, "request body") {
        Ok(r) => r,
        Err(e) => return HttpResponse::BadRequest().json(json!({"error": e})),
    };
    let spec = match spec_of(req.spec, "container spec") {
        Ok(s) => s,
        Err(e) => return HttpResponse::BadRequest().json(json!({"error": e})),
    };
    let timeout = match req.timeout_s {
        None => crate::containers::ephemeral::DEFAULT_TIMEOUT,
        Some(s) if s.is_finite() && s > 0.0 && s <= 1e6 => Duration::from_secs_f64(s),
        Some(_) => {
            return HttpResponse::BadRequest()
                .json(json!({"error": "timeout_s: must be a positive number of seconds"}))
        }
    };
    match services
        .send(RunEphemeral {
            name: req.name,
            spec,
            timeout,
        })
        .await
    {
        Ok(Ok(out)) => HttpResponse::Ok().json(out),
        Ok(Err(e)) => service_error(&e),
        Err(_) => {
            HttpResponse::ServiceUnavailable().json(json!({"error": "keel is shutting down"}))
        }
    }
}

/// `DELETE /v1/services/{name}`.
async fn services_kill(state: web::Data<AdminState>, path: web::Path<String>) -> HttpResponse {
    let Some(services) = &state.services else {
        return no_services();
    };
    match services
        .send(KillService {
            name: path.into_inner(),
        })
        .await
    {
        Ok(Ok(v)) => HttpResponse::Ok().json(v),
        Ok(Err(e)) => service_error(&e),
        Err(_) => {
            HttpResponse::ServiceUnavailable().json(json!({"error": "keel is shutting down"}))
        }
    }
}

async fn not_found() -> HttpResponse {
    HttpResponse::NotFound().json(json!({"error": "no such endpoint"}))
}

/// The actors behind the admin routes of `/v1/tasks` and `/v1/services`.
#[derive(Default)]
pub struct Backends {
    pub tasks: Option<Addr<TaskActor>>,
    pub services: Option<Addr<ContainerReaper>>,
    /// `/console` and `/v1/stats`.
    pub console: Option<crate::console::Console>,
}

/// What the admin routes check tokens with and tell about new replies.
pub struct AdminDeps {
    pub tokens: TokenTable,
    pub clock: Arc<dyn Clock>,
    pub outbox: Option<Recipient<OutboxKick>>,
}

/// Bind the listener and start serving. Returns the bound address (useful
/// with port 0) and a handle to stop it.
#[allow(clippy::too_many_arguments)]
pub fn serve(
    addr: SocketAddr,
    health: Health,
    metrics: Metrics,
    persistence: Addr<PersistenceActor>,
    access: Arc<RwLock<AdminAccess>>,
    backends: Backends,
    deps: AdminDeps,
    channels: Vec<ChannelRoutes>,
) -> std::io::Result<(SocketAddr, ServerHandle)> {
    let auth_failures = prometheus::IntCounterVec::new(
        prometheus::Opts::new(
            "keel_auth_failures_total",
            "Refused admin requests, by reason (missing, malformed, unknown, expired, revoked, permission, scope)",
        ),
        &["reason"],
    )
    .expect("valid metric");
    metrics.register(Box::new(auth_failures.clone()));
    let console = backends.console;
    let admin = AdminState {
        health,
        metrics,
        persistence,
        access,
        tasks: backends.tasks,
        services: backends.services,
        tokens: deps.tokens,
        clock: deps.clock,
        outbox: deps.outbox,
        auth_failures,
    };
    let server = HttpServer::new(move || {
        let mut app = App::new()
            .app_data(web::Data::new(admin.clone()))
            .app_data(web::PathConfig::default().error_handler(|e, _| {
                actix_web::error::InternalError::from_response(
                    e,
                    HttpResponse::BadRequest().json(json!({"error": "invalid path"})),
                )
                .into()
            }))
            .app_data(web::QueryConfig::default().error_handler(|e, _| {
                let msg = e.to_string();
                actix_web::error::InternalError::from_response(
                    e,
                    HttpResponse::BadRequest().json(json!({ "error": msg })),
                )
                .into()
            }))
            .route("/healthz", web::get().to(healthz))
            .route("/readyz", web::get().to(readyz))
            .route("/metrics", web::get().to(metrics_text))
            .service(
                admin_scope(
                    "/v1/sessions",
                    RouteAccess {
                        write: Perm::Send,
                        sessions: true,
                    },
                )
                .route("", web::get().to(sessions))
                .route("/{session}/turns", web::get().to(turns))
                .route("/{session}/messages", web::post().to(say)),
            )
            .service(
                admin_scope(
                    "/v1/tasks",
                    RouteAccess {
                        write: Perm::Tasks,
                        sessions: false,
                    },
                )
                // Up to 1 MB of args must get a 400 naming the limit, not a 413.
                .app_data(web::PayloadConfig::new(4 << 20))
                .route("", web::get().to(tasks_list))
                .route("", web::post().to(task_run))
                .route("/{id}", web::get().to(task_show))
                .route("/{id}/logs", web::get().to(task_logs))
                .route("/{id}/cancel", web::post().to(task_cancel)),
            )
            .service(
                admin_scope(
                    "/v1/services",
                    RouteAccess {
                        write: Perm::Deploy,
                        sessions: false,
                    },
                )
                .app_data(web::PayloadConfig::new(1 << 20))
                .route("", web::get().to(services_list))
                .route("", web::post().to(services_deploy))
                .route("/{name}", web::delete().to(services_kill)),
            )
            .service(
                // Ephemeral runs create containers like deploys do: `deploy`.
                admin_scope(
                    "/v1/containers",
                    RouteAccess {
                        write: Perm::Deploy,
                        sessions: false,
                    },
                )
                .app_data(web::PayloadConfig::new(1 << 20))
                .route("/run", web::post().to(containers_run)),
            );
        if let Some(console) = &console {
            // `/v1/stats` (JSON) and `/console` with its assets: `read`.
            let access = RouteAccess {
                write: Perm::Admin,
                sessions: false,
            };
            app = app
                .app_data(web::Data::new(console.clone()))
                .service(
                    admin_scope("/v1/stats", access)
                        .route("", web::get().to(crate::console::stats_json)),
                )
                .service(
                    admin_scope("/console", access)
                        .route("", web::get().to(crate::console::page))
                        .route("/console.js", web::get().to(crate::console::script))
                        .route("/console.css", web::get().to(crate::console::style))
                        .route("/icon.svg", web::get().to(crate::console::icon)),
                );
        }
        for routes in &channels {
            let routes = routes.clone();
            app = app.configure(move |cfg| routes(cfg));
        }
        app.default_service(web::to(not_found))
    })
    .workers(2)
    .disable_signals()
    .shutdown_timeout(1)
    .bind(addr)?;
    let bound = server.addrs().first().copied().unwrap_or(addr);
    let server = server.run();
    let handle = server.handle();
    actix_rt::spawn(server);
    Ok((bound, handle))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_peers_pass_while_loopback_is_open() {
        let open = AdminAccess {
            loopback_open: true,
        };
        let peer = |s: &str| Some(s.parse::<SocketAddr>().unwrap());
        for ok in [
            "127.0.0.1:5000",
            "127.9.9.9:1",
            "[::1]:5000",
            "[::ffff:127.0.0.1]:5000",
        ] {
            assert!(open.allows(peer(ok)), "{ok}");
        }
        for bad in [
            "10.0.0.1:5000",
            "192.168.1.2:80",
            "[::ffff:10.0.0.1]:1",
            "[fe80::1]:1",
        ] {
            assert!(!open.allows(peer(bad)), "{bad}");
        }
        assert!(!open.allows(None));
        let closed = AdminAccess {
            loopback_open: false,
        };
        assert!(!closed.allows(peer("127.0.0.1:5000")));
    }
}
