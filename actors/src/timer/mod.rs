//! Durable timers.
pub mod schedule;
