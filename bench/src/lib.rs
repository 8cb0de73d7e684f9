//! `keel bench`: measured, never asserted (PERFORMANCE.md). Each benchmark
//! runs keel as a child process on a scratch data dir and prints its figures
//! as ratios against a reference run in the same process on the same
//! machine.
//!
//! - [`messages`] — `keel bench [messages]`: webhook load over keep-alive
//!   HTTP, against [`reference`] (the same rows written without actors:
//!   one transaction per message, and batched).
//! - [`timers`] — `keel bench timers`: ready time and RSS with many pending
//!   timers against a full-scan peer, fire lateness, a due burst.
//! - [`tasks`] — `keel bench tasks`: 1 GiB of task output captured against
//!   `cat` into a file with the same fsync cadence, RSS, `/task run` latency.
//! - [`torture`] — `keel torture`: the durability battery (SIGKILL cycles,
//!   restart storms, a ledger outside the data dir).
//! - [`services`] — `keel bench services`: ready time with N services
//!   adopted against a start with none (needs a Docker engine).
//! - [`sessions`] — `keel bench sessions --chats N`: one message to each of
//!   N distinct chats against 64 chats: RSS high-water mark, throughput.
//! - `scaleout` — `keel bench --backend postgres --instances 1,3`: the
//!   webhook load spread over N keels on one PostgreSQL server, and SQLite
//!   in the same run.
//! - [`restart`] — `keel bench restart`: start → ready and SIGTERM → exit
//!   with 1M messages and 1M timers against an empty store.
//! - [`fake_telegram`], [`fake_slack`] — fake upstreams on loopback (Bot API
//!   long polling; Slack Web API and Socket Mode) speaking the real wire
//!   protocols, fed by `keel torture` (over [`fake_http`]'s small HTTP/1.1).
//! - `seed` — the benchmarks' own SQL (seeding, peer reads, receipts).
//!
//! This crate is a workspace member of its own so the production library
//! (`keel-actors`) carries no benchmark code; the `keel` binary embeds it so
//! `keel bench` stays a user-facing command of every release build.

// Benchmarks measure real elapsed time and name scratch dirs by the clock.
#![allow(clippy::disallowed_methods)]

pub mod fake_http;
pub mod fake_slack;
pub mod fake_telegram;
pub mod messages;
mod reference;
pub mod restart;
mod scaleout;
mod seed;
pub mod services;
pub mod sessions;
pub mod tasks;
pub mod telegram;
pub mod timers;
pub mod torture;

pub use timers::{dispatch, BenchCli};
