//! What a user implements: the [`Handler`] trait, the event decoding and the handler's errors.

use std::time::Duration;

use async_trait::async_trait;
use rdkafka::Message;
use rdkafka::message::{Headers, OwnedMessage};
use serde::de::DeserializeOwned;

use crate::error::BoxError;
use crate::store::Backend;

/// Turns a record's payload into the handler's event type.
///
/// Every `serde` type decodes from JSON; [`Raw`] hands over the bytes untouched. Implement it
/// yourself for another format.
pub trait Decode: Sized + Send + 'static {
    /// Decodes a payload (`None` for a record without one, such as a tombstone).
    fn decode(payload: Option<&[u8]>) -> Result<Self, BoxError>;
}

impl<T: DeserializeOwned + Send + 'static> Decode for T {
    fn decode(payload: Option<&[u8]>) -> Result<Self, BoxError> {
        let payload = payload.ok_or("the record has no payload (expected JSON)")?;
        Ok(serde_json::from_slice(payload)?)
    }
}

/// The payload's bytes, undecoded (empty for a record without a payload).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Raw(pub Vec<u8>);

impl Decode for Raw {
    fn decode(payload: Option<&[u8]>) -> Result<Self, BoxError> {
        Ok(Raw(payload.unwrap_or_default().to_vec()))
    }
}

/// One Kafka record with its event id: the metadata a handler may need.
#[derive(Debug, Clone, Copy)]
pub struct Record<'a> {
    message: &'a OwnedMessage,
    event_id: &'a str,
}

impl<'a> Record<'a> {
    pub(crate) fn new(message: &'a OwnedMessage, event_id: &'a str) -> Record<'a> {
        Record { message, event_id }
    }

    /// The event id under which the record was claimed in the dedup ledger.
    pub fn event_id(&self) -> &'a str {
        self.event_id
    }
    /// The topic.
    pub fn topic(&self) -> &'a str {
        self.message.topic()
    }
    /// The partition.
    pub fn partition(&self) -> i32 {
        self.message.partition()
    }
    /// The offset.
    pub fn offset(&self) -> i64 {
        self.message.offset()
    }
    /// The record's key, if it has one.
    pub fn key(&self) -> Option<&'a [u8]> {
        self.message.key()
    }
    /// The record's raw payload, if it has one.
    pub fn payload(&self) -> Option<&'a [u8]> {
        self.message.payload()
    }
    /// The record's timestamp in milliseconds since the Unix epoch, if it has one.
    pub fn timestamp_millis(&self) -> Option<i64> {
        self.message.timestamp().to_millis()
    }
    /// The value of the first header called `name`.
    pub fn header(&self, name: &str) -> Option<&'a [u8]> {
        header(self.message, name)
    }
    /// All headers, in order, as `(name, value)`.
    pub fn headers(&self) -> impl Iterator<Item = (&'a str, Option<&'a [u8]>)> + 'a {
        self.message
            .headers()
            .into_iter()
            .flat_map(|h| h.iter().map(|h| (h.key, h.value)))
    }
}

pub(crate) fn header<'m>(message: &'m OwnedMessage, name: &str) -> Option<&'m [u8]> {
    message
        .headers()?
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
}

/// What a handler gets besides its event: the open transaction and the record.
///
/// The runtime alone commits: the handler writes through [`Context::tx`] and returns.
#[non_exhaustive]
pub struct Context<'a, DB: sqlx::Database> {
    /// The open transaction. Use it as `&mut *ctx.tx` wherever sqlx takes an executor.
    pub tx: &'a mut DB::Connection,
    /// The record being handled.
    pub record: Record<'a>,
}

impl<'a, DB: sqlx::Database> Context<'a, DB> {
    pub(crate) fn new(tx: &'a mut DB::Connection, record: Record<'a>) -> Self {
        Context { tx, record }
    }
}

/// Processes one event inside the runtime's database transaction.
///
/// The runtime calls [`Handler::handle`] once per event id (per consumer group), in offset order
/// within a partition, inside the transaction that also records the event id in the dedup ledger
/// and advances the partition's stored offset. Write your effects through `ctx.tx`; they commit
/// together with the ledger row and the offset, or not at all.
///
/// ```no_run
/// use consumer_runtime::{Context, Handler, HandlerError};
/// use sqlx::Postgres;
///
/// #[derive(serde::Deserialize)]
/// struct PaymentCaptured { account: String, cents: i64 }
///
/// struct Ledger;
///
/// #[async_trait::async_trait]
/// impl Handler for Ledger {
///     type Event = PaymentCaptured;
///
///     async fn handle(&self, ctx: &mut Context<'_, Postgres>, event: PaymentCaptured) -> Result<(), HandlerError> {
///         sqlx::query("UPDATE accounts SET balance = balance + $1 WHERE id = $2")
///             .bind(event.cents)
///             .bind(&event.account)
///             .execute(&mut *ctx.tx)
///             .await?;
///         Ok(())
///     }
/// }
/// ```
#[async_trait]
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a consumer handler for this database",
    label = "needs `impl Handler<Postgres>` (the default) or `impl Handler<Sqlite>`",
    note = "write `#[async_trait::async_trait] impl consumer_runtime::Handler for {Self} {{ type Event = …; async fn handle(&self, ctx: &mut Context<'_, Postgres>, event: Self::Event) -> Result<(), HandlerError> {{ … }} }}`"
)]
pub trait Handler<DB: Backend = sqlx::Postgres>: Send + Sync + 'static {
    /// The decoded event: any `serde::Deserialize` type (JSON), or [`Raw`] for the bytes.
    type Event: Decode;

    /// Applies one event. Return `Ok(())` to commit it, [`HandlerError::Retry`] (any
    /// `sqlx::Error` converts to it) to roll back and retry later, or [`HandlerError::Reject`]
    /// for a record that can never succeed.
    async fn handle(
        &self,
        ctx: &mut Context<'_, DB>,
        event: Self::Event,
    ) -> Result<(), HandlerError>;
}

/// How a handler failed, and so what the runtime does next.
#[derive(Debug)]
#[non_exhaustive]
pub enum HandlerError {
    /// A transient failure: the batch rolls back and is retried after a backoff.
    Retry {
        /// The cause.
        source: BoxError,
        /// The least time to wait before the retry, if the handler knows it.
        after: Option<Duration>,
    },
    /// A permanent failure: retrying cannot help.
    Reject {
        /// The cause.
        source: BoxError,
    },
}

impl HandlerError {
    /// A transient failure.
    pub fn retry(source: impl Into<BoxError>) -> Self {
        HandlerError::Retry {
            source: source.into(),
            after: None,
        }
    }

    /// A transient failure that should not be retried before `after`.
    pub fn retry_after(source: impl Into<BoxError>, after: Duration) -> Self {
        HandlerError::Retry {
            source: source.into(),
            after: Some(after),
        }
    }

    /// A permanent failure.
    pub fn reject(source: impl Into<BoxError>) -> Self {
        HandlerError::Reject {
            source: source.into(),
        }
    }

    /// Whether retrying may help.
    pub fn is_retryable(&self) -> bool {
        matches!(self, HandlerError::Retry { .. })
    }
}

impl std::fmt::Display for HandlerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HandlerError::Retry { source, .. } => write!(f, "retryable: {source}"),
            HandlerError::Reject { source } => write!(f, "rejected: {source}"),
        }
    }
}

impl std::error::Error for HandlerError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            HandlerError::Retry { source, .. } | HandlerError::Reject { source } => {
                Some(source.as_ref())
            }
        }
    }
}

impl From<sqlx::Error> for HandlerError {
    fn from(e: sqlx::Error) -> Self {
        HandlerError::retry(e)
    }
}

/// `.retry()` and `.reject()` on any `Result`, to say how its error should be handled.
pub trait ResultExt<T> {
    /// Treat the error as transient.
    fn retry(self) -> Result<T, HandlerError>;
    /// Treat the error as permanent.
    fn reject(self) -> Result<T, HandlerError>;
}

impl<T, E: Into<BoxError>> ResultExt<T> for Result<T, E> {
    fn retry(self) -> Result<T, HandlerError> {
        self.map_err(HandlerError::retry)
    }
    fn reject(self) -> Result<T, HandlerError> {
        self.map_err(HandlerError::reject)
    }
}
