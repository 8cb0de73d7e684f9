//! Messages about several instances on one store (R49), answered on both
//! backends through the portable store code: instance registration and
//! heartbeats, fenced leases, fenced adapter-state writes, timer claims.
//! On SQLite one process owns the store, so it is the only instance and
//! every lease it asks for is free.

use actix::prelude::*;

use super::portable::{instances, leases, sessions, timers};
use super::PersistenceActor;
use crate::error::StoreError;

pub use instances::Instance;
pub use leases::Lease;
pub use timers::Fired;

/// Register a start of this instance; answers its boot epoch. Sent once
/// at start, before intake opens.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<i64, StoreError>")]
pub struct RegisterInstance {
    pub id: String,
    pub now_ms: i64,
    pub ttl_ms: i64,
    pub info: String,
}

impl Handler<RegisterInstance> for PersistenceActor {
    type Result = ResponseFuture<Result<i64, StoreError>>;
    fn handle(&mut self, m: RegisterInstance, _: &mut Context<Self>) -> Self::Result {
        self.call_sql(move |db, _| instances::register(db, &m.id, m.now_ms, m.ttl_ms, &m.info))
    }
}

/// Extend this instance's life; `false` when a newer start of the same id
/// exists. Sent every few seconds by the instance's heartbeat.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<bool, StoreError>")]
pub struct Heartbeat {
    pub id: String,
    pub epoch: i64,
    pub now_ms: i64,
    pub ttl_ms: i64,
}

impl Handler<Heartbeat> for PersistenceActor {
    type Result = ResponseFuture<Result<bool, StoreError>>;
    fn handle(&mut self, m: Heartbeat, _: &mut Context<Self>) -> Self::Result {
        self.call_sql(move |db, _| instances::heartbeat(db, &m.id, m.epoch, m.now_ms, m.ttl_ms))
    }
}

/// A clean stop: this instance's life ends now.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<(), StoreError>")]
pub struct LeaveInstance {
    pub id: String,
    pub epoch: i64,
    pub now_ms: i64,
}

impl Handler<LeaveInstance> for PersistenceActor {
    type Result = ResponseFuture<Result<(), StoreError>>;
    fn handle(&mut self, m: LeaveInstance, _: &mut Context<Self>) -> Self::Result {
        self.call_sql(move |db, _| instances::leave(db, &m.id, m.epoch, m.now_ms))
    }
}

/// Take or renew a lease; `Some(token)` while held. Sent by whatever runs
/// under a lease (a poller, the reconciler) every few seconds.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<Option<i64>, StoreError>")]
pub struct AcquireLease {
    pub name: String,
    pub holder: String,
    pub now_ms: i64,
    pub ttl_ms: i64,
}

impl Handler<AcquireLease> for PersistenceActor {
    type Result = ResponseFuture<Result<Option<i64>, StoreError>>;
    fn handle(&mut self, m: AcquireLease, _: &mut Context<Self>) -> Self::Result {
        self.call_sql(move |db, _| leases::acquire(db, &m.name, &m.holder, m.now_ms, m.ttl_ms))
    }
}

/// Give a lease up at once (clean shutdown).
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<(), StoreError>")]
pub struct ReleaseLease {
    pub name: String,
    pub holder: String,
    pub now_ms: i64,
}

impl Handler<ReleaseLease> for PersistenceActor {
    type Result = ResponseFuture<Result<(), StoreError>>;
    fn handle(&mut self, m: ReleaseLease, _: &mut Context<Self>) -> Self::Result {
        self.call_sql(move |db, _| leases::release(db, &m.name, &m.holder, m.now_ms))
    }
}

/// Write an adapter's resume state (a poller's offset) under a lease: refused
/// (`Invalid`, "stale lease …") unless `token` is still current.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<(), StoreError>")]
pub struct PutFencedAdapterState {
    pub lease: String,
    pub token: i64,
    pub adapter: String,
    pub state_json: String,
}

impl Handler<PutFencedAdapterState> for PersistenceActor {
    type Result = ResponseFuture<Result<(), StoreError>>;
    fn handle(&mut self, m: PutFencedAdapterState, _: &mut Context<Self>) -> Self::Result {
        self.call_sql(move |db, at| {
            leases::check(db, &m.lease, m.token, at.ms)?;
            sessions::save_adapter_state(db, at, &m.adapter, &m.state_json)
        })
    }
}

/// Instances and leases, for `keel status`.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<(Vec<Instance>, Vec<Lease>), StoreError>")]
pub struct GetCluster;

impl Handler<GetCluster> for PersistenceActor {
    type Result = ResponseFuture<Result<(Vec<Instance>, Vec<Lease>), StoreError>>;
    fn handle(&mut self, _: GetCluster, _: &mut Context<Self>) -> Self::Result {
        self.read_sql(|db| Ok((instances::list(db)?, leases::list(db)?)))
    }
}

/// Fire due timers as `instance` (claimed with `FOR UPDATE SKIP LOCKED` on
/// PostgreSQL); answers what this call fired.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<Vec<Fired>, StoreError>")]
pub struct ClaimDueTimers {
    pub now_ms: i64,
    pub limit: i64,
    pub instance: String,
    pub deliver: bool,
}

impl Handler<ClaimDueTimers> for PersistenceActor {
    type Result = ResponseFuture<Result<Vec<Fired>, StoreError>>;
    fn handle(&mut self, m: ClaimDueTimers, _: &mut Context<Self>) -> Self::Result {
        self.call_sql(move |db, _| {
            timers::claim_and_fire(db, m.now_ms, m.limit, &m.instance, m.deliver)
        })
    }
}
