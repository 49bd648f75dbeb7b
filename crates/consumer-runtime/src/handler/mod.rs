//! What a user implements: the [`Handler`] trait, the event decoding and the handler's errors.

use std::future::Future;
use std::ops::{Deref, DerefMut};
use std::time::Duration;

use rdkafka::Message;
use rdkafka::message::{Headers, OwnedMessage};
use serde::de::DeserializeOwned;

use crate::error::BoxError;
use crate::store::Backend;

mod batch;

pub use batch::{Batch, BatchHandler, Batched};

/// Turns a record's payload into the handler's event type.
///
/// The format is always explicit: [`Json<T>`] for JSON through `serde`, [`Text`] for UTF-8 text,
/// [`Raw`] for the bytes untouched. A payload that does not decode is a permanent failure of
/// its record: the runtime parks it in `dead_letters` as `decode` without running the handler.
///
/// Implement it for another format (Avro, protobuf, your own). A newtype keeps the format
/// visible at the handler, as [`Json`] does:
///
/// ```
/// use consumer_runtime::{BoxError, Decode};
///
/// /// A price update on the wire as `sku:cents`, e.g. `b"A-17:1250"`.
/// struct PriceUpdate { sku: String, cents: i64 }
///
/// impl Decode for PriceUpdate {
///     fn decode(payload: Option<&[u8]>) -> Result<Self, BoxError> {
///         let text = std::str::from_utf8(payload.ok_or("a price update needs a payload")?)?;
///         let (sku, cents) = text.split_once(':').ok_or("expected `sku:cents`")?;
///         Ok(PriceUpdate { sku: sku.to_owned(), cents: cents.parse()? })
///     }
/// }
///
/// let update = PriceUpdate::decode(Some(b"A-17:1250")).unwrap();
/// assert_eq!((update.sku.as_str(), update.cents), ("A-17", 1250));
/// assert!(PriceUpdate::decode(Some(b"A-17")).is_err());
/// ```
///
/// For protobuf with `prost`, the same shape is
/// `struct Proto<M>(M); impl<M: prost::Message + Default + Send + 'static> Decode for Proto<M>`
/// with `Ok(Proto(M::decode(payload.unwrap_or_default())?))`; an Avro decoder with a schema
/// registry reads the schema id from the payload's first bytes the same way.
pub trait Decode: Sized + Send + 'static {
    /// Decodes a payload (`None` for a record without one, such as a tombstone).
    fn decode(payload: Option<&[u8]>) -> Result<Self, BoxError>;
}

/// A JSON payload, decoded with `serde` into `T`: `type Event = Json<Order>`, then
/// `Json(order): Json<Order>` in the handler's signature, or `event.0`, or through `Deref`.
///
/// A record without a payload, or whose payload is not JSON of that shape, is undecodable.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Json<T>(pub T);

impl<T> Json<T> {
    /// The decoded value.
    pub fn into_inner(self) -> T {
        self.0
    }
}

impl<T> Deref for Json<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T> DerefMut for Json<T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.0
    }
}

impl<T: DeserializeOwned + Send + 'static> Decode for Json<T> {
    fn decode(payload: Option<&[u8]>) -> Result<Self, BoxError> {
        let payload = payload.ok_or("the record has no payload (expected JSON)")?;
        Ok(Json(serde_json::from_slice(payload)?))
    }
}

/// The payload's bytes, undecoded (empty for a record without a payload).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Raw(pub Vec<u8>);

impl Decode for Raw {
    fn decode(payload: Option<&[u8]>) -> Result<Self, BoxError> {
        Ok(Raw(payload.unwrap_or_default().to_vec()))
    }
}

impl Deref for Raw {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

/// The payload as UTF-8 text (empty for a record without a payload). A payload that is not
/// valid UTF-8 is undecodable.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Text(pub String);

impl Decode for Text {
    fn decode(payload: Option<&[u8]>) -> Result<Self, BoxError> {
        let bytes = payload.unwrap_or_default().to_vec();
        String::from_utf8(bytes)
            .map(Text)
            .map_err(|e| format!("the payload is not valid UTF-8: {}", e.utf8_error()).into())
    }
}

impl Deref for Text {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
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

/// What a handler gets besides its event: the open transaction, the record and the attempt.
///
/// The runtime alone commits: the handler writes through [`Context::conn`] and returns.
pub struct Context<'a, DB: sqlx::Database> {
    conn: &'a mut DB::Connection,
    record: Record<'a>,
    attempt: u32,
    schema: &'a str,
}

impl<'a, DB: Backend> Context<'a, DB> {
    pub(crate) fn new(conn: &'a mut DB::Connection, record: Record<'a>, attempt: u32) -> Self {
        Context {
            conn,
            record,
            attempt,
            schema: crate::outbox::DEFAULT_SCHEMA,
        }
    }

    /// The runtime's schema, where [`Context::publish`] writes its outbox rows.
    pub(crate) fn in_schema(mut self, schema: &'a str) -> Self {
        self.schema = schema;
        self
    }

    /// Writes `message` as an outbox row in this transaction (the runtime's schema): it
    /// commits with the handler's other writes, the ledger row and the offset, and the
    /// [relay](crate::relay) publishes it after that, with its event id (returned here) in
    /// the `event-id` header. Consume, write and emit are then one transaction; if the
    /// handler runs again after a rollback, only the last run's rows exist.
    ///
    /// A message without a topic is rejected; a database error is retried (see
    /// [`HandlerError`]).
    pub async fn publish(
        &mut self,
        message: &crate::outbox::Message,
    ) -> Result<String, HandlerError> {
        match crate::outbox::write::<DB>(self.conn, self.schema, message).await {
            Ok(id) => Ok(id),
            Err(crate::error::Error::Database { source, .. }) => Err(source.into()),
            Err(other) => Err(HandlerError::reject(other)),
        }
    }

    /// The connection of the open transaction (`&mut PgConnection`, `&mut SqliteConnection`):
    /// pass it wherever sqlx takes an executor, `.execute(ctx.conn())`. What you write through
    /// it commits with the ledger row and the offset, or not at all. Do not commit or roll back
    /// yourself; a nested `sqlx::Connection::begin(ctx.conn())` is a savepoint and is fine.
    pub fn conn(&mut self) -> &mut DB::Connection {
        self.conn
    }

    /// The record being handled: its event id, coordinates, key, headers and raw payload.
    pub fn record(&self) -> Record<'a> {
        self.record
    }

    /// Which try of this record's batch this is: 1 the first time, 2 after one rollback and
    /// retry, and so on. The count restarts at 1 once a batch commits, and after the runtime
    /// gave up on another record of the batch (which it then parks). A handler may use it to
    /// escalate, e.g. to reject after a few tries of a call it knows to be flaky.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }
}

/// Processes one event inside the runtime's database transaction.
///
/// The runtime calls [`Handler::handle`] for the events of a partition in offset order, inside
/// the transaction that also claims the event id in the dedup ledger and advances the
/// partition's stored offset. **What the handler writes through [`Context::conn`] commits once
/// per event id (per consumer group), together with the ledger row and the offset, or not at
/// all.**
///
/// **The handler itself may run more than once for one event**: when a batch rolls back (a
/// [`HandlerError::Retry`], a database error, a time-out, a crash or a fenced commit) every
/// handler of that batch runs again on the retry; and after a permanent failure in a batch the
/// batch runs once more with a savepoint around each record, which re-runs the records that
/// had succeeded. Each of those runs but the last was rolled back, so the database sees one.
/// Effects outside the transaction (an HTTP call, a produced message, an email) are not rolled
/// back and may happen several times: make them idempotent, or write an outbox row through
/// `ctx.conn()` and perform them elsewhere.
///
/// Implement it with a plain `async fn` (no attribute needed):
///
/// ```no_run
/// use consumer_runtime::{Context, Handler, HandlerError, Json};
/// use sqlx::Postgres;
///
/// #[derive(serde::Deserialize)]
/// struct PaymentCaptured { account: String, cents: i64 }
///
/// struct Ledger;
///
/// impl Handler for Ledger {
///     type Event = Json<PaymentCaptured>;
///
///     async fn handle(&self, ctx: &mut Context<'_, Postgres>, Json(event): Json<PaymentCaptured>) -> Result<(), HandlerError> {
///         sqlx::query("UPDATE accounts SET balance = balance + $1 WHERE id = $2")
///             .bind(event.cents)
///             .bind(&event.account)
///             .execute(ctx.conn())
///             .await?;
///         Ok(())
///     }
/// }
/// ```
///
/// The future `handle` returns must be `Send` (the runtime runs it on its worker tasks): do not
/// hold a `std::sync::MutexGuard` or an `Rc` across an `.await`.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a consumer handler for this database",
    label = "needs `impl Handler<Postgres>` (the default) or `impl Handler<Sqlite>`",
    note = "write `impl consumer_runtime::Handler for {Self} {{ type Event = Json<…>; async fn handle(&self, ctx: &mut Context<'_, Postgres>, event: Self::Event) -> Result<(), HandlerError> {{ … }} }}` (a plain `async fn`, no attribute; `Handler<Sqlite>` for SQLite)"
)]
pub trait Handler<DB: Backend = sqlx::Postgres>: Send + Sync + 'static {
    /// The decoded event: [`Json<T>`] (any `serde::Deserialize` type as JSON), [`Text`],
    /// [`Raw`] for the bytes, or your own [`Decode`] type.
    type Event: Decode;

    /// Applies one event. Return `Ok(())` to commit it, [`HandlerError::Retry`] to roll back and
    /// retry later, or [`HandlerError::Reject`] for a record that can never succeed (it is
    /// parked). A `sqlx::Error` converts with `?`: an integrity violation to `Reject`, anything
    /// else to `Retry` (see [`HandlerError`]).
    fn handle(
        &self,
        ctx: &mut Context<'_, DB>,
        event: Self::Event,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;

    /// How long one call of [`handle`](Handler::handle) may take (default 60 s). A handler
    /// still running then is cancelled (its future dropped) and counts as a transient failure:
    /// the batch rolls back and is retried with backoff, and after the retry policy's
    /// `max_attempts` the record is parked as `retries_exhausted`. The limit keeps a handler
    /// stuck on a call from holding its partition's transaction (and the offset row's lock) for
    /// ever. A statement the database is still running is not interrupted by the cancel: bound
    /// those with the database's own `statement_timeout` / busy timeout.
    fn timeout(&self) -> Duration {
        Duration::from_secs(60)
    }

    /// Whether the runtime calls [`__handle_batch`](Handler::__handle_batch) once per batch
    /// instead of [`handle`](Handler::handle) per record: only for [`Batched`]. Not part of the
    /// API; do not override it.
    #[doc(hidden)]
    fn __is_batch(&self) -> bool {
        false
    }

    /// The batch call of a [`Batched`] handler; the future owns the batch and gives it back.
    /// Not part of the API; do not override it.
    #[doc(hidden)]
    fn __handle_batch<'b>(
        &self,
        _conn: &mut DB::Connection,
        batch: Batch<'b, Self::Event>,
    ) -> impl Future<Output = (Result<(), HandlerError>, Batch<'b, Self::Event>)> + Send {
        std::future::ready((
            Err(HandlerError::reject(
                "a per-record handler was called with a batch",
            )),
            batch,
        ))
    }
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

/// `?` on a `sqlx::Error` inside a handler: an integrity constraint violation (PostgreSQL's
/// SQLSTATE class 23: unique, foreign key, check, not null, exclusion; SQLite's
/// `SQLITE_CONSTRAINT` codes) becomes [`HandlerError::Reject`], because the same statement on
/// the same data fails the same way on every retry: the record is parked at once instead of
/// holding its partition through the whole retry policy. Every other database error
/// (connection loss, a deadlock or serialization failure, a lock or statement timeout,
/// "database is locked") becomes [`HandlerError::Retry`].
///
/// A handler that expects a conflict (an idempotent insert) should say so in SQL
/// (`ON CONFLICT DO NOTHING`) or match the error before `?`; on PostgreSQL the failed statement
/// has aborted the transaction, so only a savepoint (`sqlx::Connection::begin(ctx.conn())`)
/// lets it go on after one.
impl From<sqlx::Error> for HandlerError {
    fn from(e: sqlx::Error) -> Self {
        if is_integrity_violation(&e) {
            HandlerError::reject(e)
        } else {
            HandlerError::retry(e)
        }
    }
}

/// Whether `e` is an integrity constraint violation, which no retry can fix.
pub(crate) fn is_integrity_violation(e: &sqlx::Error) -> bool {
    let sqlx::Error::Database(db) = e else {
        return false;
    };
    if let Some(pg) = db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>() {
        return pg.code().starts_with("23");
    }
    if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
        // The extended result code; its low byte is the primary code, 19 = SQLITE_CONSTRAINT.
        return db
            .code()
            .and_then(|c| c.parse::<i32>().ok())
            .is_some_and(|c| c & 0xff == 19);
    }
    false
}

/// `.retry()` and `.reject()` on any `Result`: they say how its error is to be handled, e.g.
/// `client.get(url).send().await.retry()?` (a failed call is worth retrying) or
/// `serde_json::from_value(v).reject()?` (a malformed event never will be).
pub trait ResultExt<T> {
    /// Treat the error as transient: [`HandlerError::Retry`].
    fn retry(self) -> Result<T, HandlerError>;
    /// Treat the error as permanent: [`HandlerError::Reject`].
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

/// The error of a handler call that ran past [`Handler::timeout`].
#[derive(Debug)]
pub(crate) struct TimedOut(pub(crate) Duration);

impl std::fmt::Display for TimedOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the handler did not finish within {:?} (Handler::timeout); cancelled",
            self.0
        )
    }
}

impl std::error::Error for TimedOut {}
