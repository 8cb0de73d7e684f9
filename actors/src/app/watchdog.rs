//! The progress tick behind systemd's watchdog: `WATCHDOG=1` is sent only
//! after a tick went through the lifecycle controller (the system arbiter)
//! and a round trip through the store's writer thread (`BEGIN IMMEDIATE …
//! COMMIT`, reading one row). A writer that does not answer in time — a
//! lock held by someone else, a hung disk — fails the tick, the pings stop,
//! and systemd restarts keel. A writer that answers, even while storage is
//! degraded (R35: keel stays up and says why), keeps the pings going.

use std::time::Duration;

use actix::prelude::*;

use super::lifecycle::Lifecycle;
use crate::persistence::GetAdapterState;

/// Did keel make progress within `deadline`? Sent by the binary's
/// watchdog loop every `WATCHDOG_USEC / 2`.
#[derive(Debug, Clone, Message)]
#[rtype(result = "bool")]
pub struct ProgressTick {
    pub deadline: Duration,
}

/// The row the tick reads (it need not exist).
const TICK_KEY: &str = "watchdog:tick";

impl Handler<ProgressTick> for Lifecycle {
    type Result = ResponseFuture<bool>;
    fn handle(&mut self, m: ProgressTick, _: &mut Context<Self>) -> Self::Result {
        let persistence = self.persistence.clone();
        Box::pin(async move {
            matches!(
                tokio::time::timeout(
                    m.deadline,
                    persistence.send(GetAdapterState {
                        adapter: TICK_KEY.into(),
                    }),
                )
                .await,
                Ok(Ok(Ok(_)))
            )
        })
    }
}
