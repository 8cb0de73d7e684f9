//! The adapter protocol. An adapter turns a channel's inbound traffic into
//! `Deliver` messages to the session registry and acknowledges upstream only
//! after the `Delivered` reply (R1); it holds a `GateGuard` while a message is
//! in flight so shutdown can drain it. Outbound, it provides a `ReplySink`
//! that the outbox actor calls. Adapters never talk to each other.

pub mod cli;
pub mod report;
pub mod slack;
pub mod supervisor;
pub mod telegram;
pub mod webhook;

/// Channel names, in start priority order (R15).
pub const PRIORITY: &[&str] = &["cli", "telegram", "webhook", "slack"];
