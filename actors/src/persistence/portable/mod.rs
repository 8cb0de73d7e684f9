//! Store code written once against [`super::sql::Sql`], so it runs on both
//! backends: what the PostgreSQL backend answers today (sessions, turns,
//! outbox, adapter state) and what runs as one code on both (instances,
//! leases, timers). The SQLite production path still
//! uses its own modules beside this one for the rest; moving them here is
//! how the rest of the store becomes portable (ARCHITECTURE.md,
//! "PostgreSQL").

pub mod chats;
pub mod instances;
pub mod leases;
pub mod outbox;
pub mod secrets;
pub mod sessions;
pub mod tasks;
pub mod timers;
