//! The engine as the task runner sees it: every call is made by the
//! [`ContainerReaper`], the only code that talks to the engine. A call is a
//! message carrying what to ask; the reaper makes the request with its
//! engine and hands back the pending answer (or the log stream), which the
//! caller awaits outside the actor, so a slow engine never blocks the
//! reaper's mailbox.

use std::sync::Arc;

use actix::prelude::*;
use futures::future::BoxFuture;
use futures::stream::{self, BoxStream};
use futures::StreamExt;
use tokio::sync::oneshot;

use super::engine::{ContainerInfo, CreateRequest, Engine, EngineError, EngineResult};
use super::ContainerReaper;

/// One engine call, made by the reaper with its engine; the pending
/// answer goes back through a channel the call holds.
pub struct Call(Box<dyn FnOnce(Arc<dyn Engine>) + Send>);

impl Message for Call {
    type Result = ();
}

impl Handler<Call> for ContainerReaper {
    type Result = ();
    fn handle(&mut self, msg: Call, _: &mut Context<Self>) {
        (msg.0)(self.inner.engine.clone())
    }
}

/// An [`Engine`] whose every call goes through the reaper.
#[derive(Clone)]
pub struct ThroughReaper {
    reaper: Addr<ContainerReaper>,
}

fn stopped() -> EngineError {
    EngineError::Unavailable("the container reaper has stopped".into())
}

impl ThroughReaper {
    pub fn new(reaper: Addr<ContainerReaper>) -> ThroughReaper {
        ThroughReaper { reaper }
    }

    /// Have the reaper make the call; its answer (a future or a stream)
    /// once it did. `None` when the reaper is gone.
    fn ask<A: Send + 'static>(
        &self,
        f: impl FnOnce(Arc<dyn Engine>) -> A + Send + 'static,
    ) -> oneshot::Receiver<A> {
        let (tx, rx) = oneshot::channel();
        self.reaper.do_send(Call(Box::new(move |e| {
            let _ = tx.send(f(e));
        })));
        rx
    }

    fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(Arc<dyn Engine>) -> BoxFuture<'static, EngineResult<T>> + Send + 'static,
    ) -> BoxFuture<'static, EngineResult<T>> {
        let answer = self.ask(f);
        Box::pin(async move {
            match answer.await {
                Ok(pending) => pending.await,
                Err(_) => Err(stopped()),
            }
        })
    }

    fn stream<T: Send + 'static>(
        &self,
        f: impl FnOnce(Arc<dyn Engine>) -> BoxStream<'static, EngineResult<T>> + Send + 'static,
    ) -> BoxStream<'static, EngineResult<T>> {
        stream::once(self.ask(f))
            .flat_map(|r| match r {
                Ok(s) => s,
                Err(_) => stream::once(async { Err(stopped()) }).boxed(),
            })
            .boxed()
    }
}

impl Engine for ThroughReaper {
    fn ping(&self) -> BoxFuture<'static, EngineResult<()>> {
        self.call(|e| e.ping())
    }
    fn list(&self, instance: &str) -> BoxFuture<'static, EngineResult<Vec<ContainerInfo>>> {
        let instance = instance.to_string();
        self.call(move |e| e.list(&instance))
    }
    fn image_exists(&self, image: &str) -> BoxFuture<'static, EngineResult<bool>> {
        let image = image.to_string();
        self.call(move |e| e.image_exists(&image))
    }
    fn create(&self, req: CreateRequest) -> BoxFuture<'static, EngineResult<String>> {
        self.call(move |e| e.create(req))
    }
    fn inspect(&self, name: &str) -> BoxFuture<'static, EngineResult<Option<ContainerInfo>>> {
        let name = name.to_string();
        self.call(move |e| e.inspect(&name))
    }
    fn start(&self, id: &str) -> BoxFuture<'static, EngineResult<()>> {
        let id = id.to_string();
        self.call(move |e| e.start(&id))
    }
    fn stop(&self, id: &str, grace_s: i64) -> BoxFuture<'static, EngineResult<()>> {
        let id = id.to_string();
        self.call(move |e| e.stop(&id, grace_s))
    }
    fn remove(&self, id: &str) -> BoxFuture<'static, EngineResult<()>> {
        let id = id.to_string();
        self.call(move |e| e.remove(&id))
    }
    fn events(&self, instance: &str) -> BoxStream<'static, EngineResult<()>> {
        let instance = instance.to_string();
        self.stream(move |e| e.events(&instance))
    }
    fn logs(&self, id: &str) -> BoxStream<'static, EngineResult<(bool, Vec<u8>)>> {
        let id = id.to_string();
        self.stream(move |e| e.logs(&id))
    }
    fn logs_stamped(
        &self,
        id: &str,
        since_s: Option<i64>,
    ) -> BoxStream<'static, EngineResult<(bool, Vec<u8>)>> {
        let id = id.to_string();
        self.stream(move |e| e.logs_stamped(&id, since_s))
    }
    fn wait(&self, id: &str) -> BoxFuture<'static, EngineResult<i64>> {
        let id = id.to_string();
        self.call(move |e| e.wait(&id))
    }
}
