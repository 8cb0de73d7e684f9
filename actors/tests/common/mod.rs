//! Shared pieces of the actor tests: a store on a real file, and an outbox
//! stand-in that takes kicks.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use keel_actors::clock::WallClock;
use keel_actors::config::Synchronous;
use keel_actors::health::Health;
use keel_actors::metrics::Metrics;
use keel_actors::outbox::OutboxKick;
use keel_actors::persistence::{self, PersistenceActor, StoreOptions};

/// A store on `path` (synchronous=NORMAL: these tests are about actors).
/// Writes are stamped with the wall clock; timer fires carry their own
/// time (the timer actor's clock).
pub fn start_store(path: std::path::PathBuf) -> Addr<PersistenceActor> {
    let opts = StoreOptions {
        path: Some(path),
        synchronous: Synchronous::Normal,
        busy_timeout: Duration::from_secs(5),
        max_batch: 1024,
        probe_interval: Duration::from_millis(100),
        key: None,
    };
    let metrics = Metrics::new();
    let (conn, _) = persistence::open_store(&opts).expect("open store");
    PersistenceActor::new(
        conn,
        opts,
        Health::new(metrics.clone()),
        metrics,
        Arc::new(WallClock),
    )
    .start()
}

/// Takes outbox kicks and does nothing with them.
pub struct Kicks;

impl Actor for Kicks {
    type Context = Context<Self>;
}

impl Handler<OutboxKick> for Kicks {
    type Result = ();
    fn handle(&mut self, _: OutboxKick, _: &mut Context<Self>) {}
}
