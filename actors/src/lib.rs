//! keel's actors, their messages and the store.
//!
//! Code map (read ARCHITECTURE.md at the repository root for the why):
//! - [`app`] builds the actor graph from a [`config::Config`] in the start
//!   order of R32; its `settings_*` functions are shared by startup and reload.
//! - [`lifecycle`] — the `Lifecycle` controller: `Shutdown` cascade, `Reload`.
//! - [`persistence`] — `PersistenceActor` (the one writer, group commit),
//!   `persistence::store` (all SQL), `persistence::migrate` (schema).
//! - [`session`] — `SessionRegistry` and one `SessionActor` per conversation.
//! - [`brain`] — the built-in command brain; [`agent`] the external agent client.
//! - [`outbox`] — `OutboxActor`: sends stored replies, marks them sent.
//! - [`adapter`] — channels: `cli` (socket + stdin), `webhook` (HTTP),
//!   `telegram` (Bot API long polling), `slack` (Socket Mode); `supervisor`
//!   restarts them with backoff.
//! - [`http`] — health, readiness, metrics and admin endpoints.
//! - [`console`] — the operator console (`/console`) and `/v1/stats`.
//! - [`health`] — readiness state and the intake gate; [`metrics`] — Prometheus.
//! - [`ids`] — validation of outside ids, safe file names; [`export`] — session export;
//!   [`text`] — channels' message length limits and how replies are split.
//! - [`error`] — `thiserror` enums per boundary.
//! - [`timer`] — `TimerActor` (durable timers, bounded window), schedules, `/remind`.
//! - [`tasks`] — `TaskActor` (configured commands under supervision, logs,
//!   recovery by boot epoch), the process runner, `/task`, the admin socket.
//! - [`masterkey`] — the master key of the SQLCipher stores (sources, checks).
//! - [`vault`] — capability tokens, the access rule of admin routes, secret
//!   names, the vault's admin-socket operations.
//! - [`containers`] — `ContainerReaper`, the only code that talks to the
//!   container engine (bollard behind the `Engine` trait): orphan reaping,
//!   services from the event log, reconcile, the spec allow-list.
//! - [`chain`] — the hash chain of append-only logs (services events).
//! - [`failpoint`] — named kill points for `keel torture` (cargo feature `failpoints` only).

pub mod adapter;
pub mod agent;
pub mod app;
pub mod backoff;
pub mod brain;
pub mod chain;
pub mod clock;
pub mod config;
pub mod console;
pub mod containers;
pub mod error;
pub mod export;
pub mod failpoint;
pub mod fsutil;
pub mod health;
pub mod http;
pub mod ids;
pub mod lease;
pub mod masterkey;
pub mod metrics;
pub mod outbox;
pub mod persistence;
pub mod redact;
pub mod schedule;
pub mod session;
pub mod tasks;
pub mod text;
pub mod timer;
pub mod vault;
