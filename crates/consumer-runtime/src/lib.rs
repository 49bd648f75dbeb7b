//! Effectively-once Kafka consumers on a SQL database.
//!
//! Implement [`Handler`]; the runtime consumes Kafka topics and runs the handler for every
//! record inside a database transaction that also claims the record's event id in a dedup
//! ledger (`processed`) and advances the partition's stored offset (`consumer_offsets`). The
//! handler's writes, the ledger row and the offset commit together or not at all, and every
//! partition assignment resumes from the offset stored in the database, under a fresh epoch
//! that fences any older owner.
//!
//! ```no_run
//! use consumer_runtime::{Context, Handler, HandlerError, Json, Runtime};
//! use sqlx::Postgres;
//!
//! #[derive(serde::Deserialize)]
//! struct PaymentCaptured { account: String, cents: i64 }
//!
//! struct Balances;
//!
//! impl Handler for Balances {
//!     type Event = Json<PaymentCaptured>;
//!
//!     async fn handle(&self, ctx: &mut Context<'_, Postgres>, Json(e): Json<PaymentCaptured>) -> Result<(), HandlerError> {
//!         sqlx::query("UPDATE accounts SET balance = balance + $1 WHERE id = $2")
//!             .bind(e.cents)
//!             .bind(&e.account)
//!             .execute(ctx.conn())
//!             .await?;
//!         Ok(())
//!     }
//! }
//!
//! # async fn run() -> Result<(), consumer_runtime::Error> {
//! let pool = consumer_runtime::connect::<Postgres>("postgres://localhost/app", 8).await?;
//! consumer_runtime::migrate(&pool, "consumer_runtime").await?;
//! Runtime::builder(Balances)
//!     .pool(pool)
//!     .brokers("localhost:9092")
//!     .group("balances")
//!     .topic("payments")
//!     .build()?
//!     .run()
//!     .await
//! # }
//! ```
//!
//! The handler is a plain `async fn`. Its writes through `ctx.conn()` commit once per event;
//! the handler itself may run more than once (see [`Handler`]). The event's format is explicit
//! ([`Json`], [`Text`], [`Raw`] or your own [`Decode`]), and [`testing`] runs a handler against
//! a real database without Kafka.
//!
//! To write a whole batch with one statement, implement [`BatchHandler`] instead: one call per
//! partition batch with every newly claimed record, poison records isolated inside the
//! transaction ([`Batch::reject`], or by splitting a failed batch), and
//! [`Runtime::batch_builder`] (or [`Batched`] wherever a [`Handler`] is expected).

pub mod config;
pub mod dead_letters;
pub mod error;
mod event_id;
mod handler;
mod kafka;
pub mod outbox;
pub mod relay;
pub mod replay;
mod runtime;
mod store;
pub mod telemetry;
pub mod testing;
mod unit;
mod util;

#[cfg(test)]
mod layers;
#[cfg(test)]
mod test_support;

#[cfg(feature = "bench-internals")]
#[doc(hidden)]
pub mod __bench;

pub use config::{
    Assignor, CircuitBreaker, ConsumerOptions, Guarantee, OffsetReset, ParkedRatio, RetryPolicy,
};
pub use dead_letters::{DeadLetter, DeadLetters, HeaderList, Redriven};
pub use error::{BoxError, Coordinates, Error, FailureKind, Result};
pub use event_id::{EventId, EventIdFn};
pub use handler::{
    Batch, BatchHandler, Batched, Context, Decode, Handler, HandlerError, Json, Raw, Record,
    ResultExt, Text,
};
pub use replay::{PartitionReplay, ReplayFrom, ReplayMode, ReplayProgress, ReplayRequest};
pub use runtime::{Runtime, RuntimeBuilder, ShutdownHandle, Stats, StatsSnapshot};
pub use store::{Backend, DatabaseKind, Store, StoredOffset, connect, migrate};

pub use rdkafka;
pub use sqlx;
