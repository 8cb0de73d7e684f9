//! `AdapterActor`: the actix actor a channel's long-running part runs in
//! (the design card's "one AdapterActor per channel").
//!
//! `started` runs the channel's [`Adapter::run`] future from the actor's
//! own context, inside `catch_unwind`, so a failure and a panic both end as
//! an [`AdapterExit`] on the oneshot the supervisor holds; then the actor
//! stops. A dropped oneshot (the actor died some other way) is also seen by
//! the supervisor, so no death goes unnoticed (actix's own `Supervisor`
//! would not notice a panic at all). `stopping` tells the run loop to end,
//! whoever stops the actor.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use actix::prelude::*;
use futures::FutureExt;
use tokio::sync::{oneshot, watch};

use super::supervisor::Adapter;
use crate::error::AdapterError;

/// How one run of an adapter ended. Sent (on a oneshot) to whoever started
/// the actor: the supervisor.
pub type AdapterExit = Result<(), AdapterError>;

/// Stop an adapter actor: its run loop is told to end (an in-flight long
/// poll is abandoned, a batch being stored finishes). Sent by the
/// supervisor and the lifecycle controller.
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "()")]
pub struct StopAdapter;

/// What an adapter actor reports about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdapterInfo {
    pub name: &'static str,
    /// Since when this run has been up.
    pub since: tokio::time::Instant,
    /// Whether it was told to stop.
    pub stopping: bool,
}

/// Ask an adapter actor about itself. Sent by the supervisor (and tests).
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "AdapterInfo")]
pub struct GetAdapterInfo;

/// One run of one channel adapter.
pub struct AdapterActor {
    adapter: Arc<dyn Adapter>,
    stop: watch::Sender<bool>,
    /// Taken when the run ends; dropped with the actor otherwise.
    exit: Option<oneshot::Sender<AdapterExit>>,
    since: tokio::time::Instant,
}

impl AdapterActor {
    /// Start `adapter` in a new actor on the current arbiter; the receiver
    /// resolves when the run ends (an error if the actor died without a
    /// result).
    pub fn launch(
        adapter: Arc<dyn Adapter>,
    ) -> (Addr<AdapterActor>, oneshot::Receiver<AdapterExit>) {
        let (tx, rx) = oneshot::channel();
        let actor = AdapterActor {
            adapter,
            stop: watch::channel(false).0,
            exit: Some(tx),
            since: tokio::time::Instant::now(),
        };
        (actor.start(), rx)
    }
}

pub(crate) fn panic_text(p: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".into()
    }
}

impl Actor for AdapterActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        tracing::debug!(adapter = self.adapter.name(), "adapter actor started");
        let run = AssertUnwindSafe(self.adapter.run(self.stop.subscribe())).catch_unwind();
        ctx.spawn(run.into_actor(self).map(|outcome, this, ctx| {
            let exit = match outcome {
                Ok(result) => result,
                Err(panic) => Err(AdapterError::Panicked(panic_text(panic))),
            };
            if let Some(tx) = this.exit.take() {
                let _ = tx.send(exit);
            }
            ctx.stop();
        }));
    }

    fn stopping(&mut self, _: &mut Self::Context) -> Running {
        // Whoever stops the actor, the run loop is told to end too.
        let _ = self.stop.send(true);
        Running::Stop
    }
}

impl Handler<StopAdapter> for AdapterActor {
    type Result = ();
    fn handle(&mut self, _: StopAdapter, _: &mut Context<Self>) {
        // The run loop sees the flag, returns, and the actor stops after it
        // reported its exit.
        let _ = self.stop.send(true);
    }
}

impl Handler<GetAdapterInfo> for AdapterActor {
    type Result = MessageResult<GetAdapterInfo>;
    fn handle(&mut self, _: GetAdapterInfo, _: &mut Context<Self>) -> Self::Result {
        MessageResult(AdapterInfo {
            name: self.adapter.name(),
            since: self.since,
            stopping: *self.stop.borrow(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::future::BoxFuture;

    /// Runs until stopped, or panics / fails at once, as told.
    struct Probe(&'static str);

    impl Adapter for Probe {
        fn name(&self) -> &'static str {
            "probe"
        }
        fn run(
            &self,
            mut stop: watch::Receiver<bool>,
        ) -> BoxFuture<'static, Result<(), AdapterError>> {
            let mode = self.0;
            Box::pin(async move {
                match mode {
                    "panic" => panic!("probe panicked"),
                    "fail" => Err(AdapterError::Transient("probe failed".into())),
                    _ => {
                        let _ = stop.wait_for(|s| *s).await;
                        Ok(())
                    }
                }
            })
        }
    }

    #[actix_rt::test]
    async fn a_running_adapter_answers_info_and_stops_on_request() {
        let (addr, exit) = AdapterActor::launch(Arc::new(Probe("run")));
        let info = addr.send(GetAdapterInfo).await.unwrap();
        assert_eq!((info.name, info.stopping), ("probe", false));
        addr.send(StopAdapter).await.unwrap();
        assert!(matches!(exit.await, Ok(Ok(()))));
        // The actor stops after reporting its exit.
        let gone = tokio::time::timeout(std::time::Duration::from_secs(5), async {
            while addr.connected() {
                tokio::task::yield_now().await;
            }
        })
        .await;
        assert!(gone.is_ok(), "the actor kept running after its run ended");
    }

    #[actix_rt::test]
    async fn a_panic_and_a_failure_come_back_as_the_exit() {
        let (_, exit) = AdapterActor::launch(Arc::new(Probe("panic")));
        match exit.await {
            Ok(Err(AdapterError::Panicked(text))) => assert!(text.contains("probe panicked")),
            other => panic!("unexpected exit {other:?}"),
        }
        let (_, exit) = AdapterActor::launch(Arc::new(Probe("fail")));
        assert!(matches!(exit.await, Ok(Err(AdapterError::Transient(_)))));
    }
}
