//! Unit-testing a handler against a real database, without Kafka and without the runtime.
//!
//! [`handle`] runs a [`Handler`] for one [`TestRecord`] the way the runtime runs it for a
//! consumed record: the payload is decoded into the handler's event, the handler runs inside a
//! transaction opened as the runtime opens its own (with the same session settings), its
//! context says attempt 1, panics are caught and [`Handler::timeout`] is enforced. Then the
//! transaction **commits if the handler returned `Ok` and rolls back otherwise**, so the test
//! can assert on the rows the handler wrote. The runtime's own tables are not touched (no
//! ledger row, no offset), so a pool without the runtime's migrations will do.
//!
//! ```no_run
//! use consumer_runtime::testing::{self, TestRecord};
//! use consumer_runtime::{Context, Handler, HandlerError, Json};
//! use sqlx::Postgres;
//!
//! #[derive(serde::Deserialize)]
//! struct OrderPlaced { order: String, cents: i64 }
//!
//! struct Orders;
//!
//! impl Handler for Orders {
//!     type Event = Json<OrderPlaced>;
//!
//!     async fn handle(&self, ctx: &mut Context<'_, Postgres>, Json(o): Json<OrderPlaced>) -> Result<(), HandlerError> {
//!         if o.cents <= 0 {
//!             return Err(HandlerError::reject("an order must cost something"));
//!         }
//!         sqlx::query("INSERT INTO orders (id, cents) VALUES ($1, $2)")
//!             .bind(&o.order)
//!             .bind(o.cents)
//!             .execute(ctx.conn())
//!             .await?; // a second insert of the same id is a unique violation: rejected
//!         Ok(())
//!     }
//! }
//!
//! # async fn test() -> anyhow::Result<()> {
//! let pool = sqlx::PgPool::connect("postgres://postgres@127.0.0.1/test").await?;
//! let placed = TestRecord::json(&serde_json::json!({"order": "o-1", "cents": 1250}));
//! testing::handle(&Orders, &pool, placed.clone()).await?;
//! let cents: i64 = sqlx::query_scalar("SELECT cents FROM orders WHERE id = 'o-1'")
//!     .fetch_one(&pool)
//!     .await?;
//! assert_eq!(cents, 1250);
//! // The same order again: the primary key refuses it, and the runtime would park it.
//! let again = testing::handle(&Orders, &pool, placed).await;
//! assert!(matches!(again, Err(HandlerError::Reject { .. })));
//! # Ok(())
//! # }
//! ```
//!
//! To keep a test's writes out of the database, run the handler in a transaction of your own
//! with [`handle_in`] and roll it back after the assertions.
//!
//! A [`BatchHandler`] is tested the same way with [`handle_batch`]: one call with several
//! records, which returns the indices the handler rejected.

use rdkafka::Message as _;
use rdkafka::Timestamp;
use rdkafka::message::{Header, OwnedHeaders, OwnedMessage};
use sqlx::Pool;

use std::panic::AssertUnwindSafe;

use futures_util::FutureExt as _;

use crate::error::BoxError;
use crate::handler::{Batch, BatchHandler, Decode, Handler, HandlerError, Record, TimedOut};
use crate::store::{Backend, CRATE};
use crate::unit::{panic_message, run_handler};

/// A record to hand to a handler in a test: a payload plus the metadata the handler may read
/// through [`Context::record`](crate::Context::record). Built with chained setters; the defaults
/// are topic `test`, partition 0, offset 0, no key, no headers, no timestamp, and the event id
/// below.
#[derive(Debug, Clone)]
pub struct TestRecord {
    topic: String,
    partition: i32,
    offset: i64,
    key: Option<Vec<u8>>,
    payload: Option<Vec<u8>>,
    headers: Vec<(String, Option<Vec<u8>>)>,
    timestamp_millis: Option<i64>,
    event_id: Option<String>,
}

impl TestRecord {
    /// A record with `payload` as its bytes.
    pub fn new(payload: impl Into<Vec<u8>>) -> Self {
        TestRecord {
            topic: "test".to_owned(),
            partition: 0,
            offset: 0,
            key: None,
            payload: Some(payload.into()),
            headers: Vec::new(),
            timestamp_millis: None,
            event_id: None,
        }
    }

    /// A record whose payload is `value` as JSON (for a [`Json`](crate::Json) event).
    ///
    /// # Panics
    ///
    /// If `value` cannot be serialised (a map with non-string keys).
    pub fn json(value: &impl serde::Serialize) -> Self {
        TestRecord::new(serde_json::to_vec(value).expect("the test value serialises as JSON"))
    }

    /// A record without a payload (a tombstone).
    pub fn tombstone() -> Self {
        TestRecord {
            payload: None,
            ..TestRecord::new(Vec::new())
        }
    }

    /// The topic.
    pub fn topic(mut self, topic: impl Into<String>) -> Self {
        self.topic = topic.into();
        self
    }

    /// The partition.
    pub fn partition(mut self, partition: i32) -> Self {
        self.partition = partition;
        self
    }

    /// The offset.
    pub fn offset(mut self, offset: i64) -> Self {
        self.offset = offset;
        self
    }

    /// The key.
    pub fn key(mut self, key: impl Into<Vec<u8>>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Adds a header (headers keep their order; a name may repeat).
    pub fn header(mut self, name: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        self.headers.push((name.into(), Some(value.into())));
        self
    }

    /// The timestamp, in milliseconds since the Unix epoch.
    pub fn timestamp_millis(mut self, millis: i64) -> Self {
        self.timestamp_millis = Some(millis);
        self
    }

    /// The event id the handler sees as `ctx.record().event_id()`. Without it: the value of
    /// the `event-id` header if the record has one (the runtime's default strategy), else the
    /// coordinates `topic/partition/offset`.
    pub fn event_id(mut self, id: impl Into<String>) -> Self {
        self.event_id = Some(id.into());
        self
    }

    fn message(&self) -> OwnedMessage {
        let mut headers = OwnedHeaders::new_with_capacity(self.headers.len());
        for (name, value) in &self.headers {
            headers = headers.insert(Header {
                key: name.as_str(),
                value: value.as_deref(),
            });
        }
        OwnedMessage::new(
            self.payload.clone(),
            self.key.clone(),
            self.topic.clone(),
            self.timestamp_millis
                .map_or(Timestamp::NotAvailable, Timestamp::CreateTime),
            self.partition,
            self.offset,
            Some(headers),
        )
    }

    fn resolved_event_id(&self) -> String {
        if let Some(id) = &self.event_id {
            return id.clone();
        }
        self.headers
            .iter()
            .find(|(name, _)| name == "event-id")
            .and_then(|(_, v)| std::str::from_utf8(v.as_deref()?).ok())
            .map(str::to_owned)
            .unwrap_or_else(|| format!("{}/{}/{}", self.topic, self.partition, self.offset))
    }
}

/// Runs `handler` for `record` in a transaction of its own on `pool`, as the runtime would
/// (see the [module](self) documentation), and commits it if the handler returned `Ok`; on an
/// error the transaction rolls back.
///
/// The result is what the runtime would make of the record: `Ok` (applied), a
/// [`HandlerError::Retry`] (rolled back and retried; also for a handler past its
/// [`timeout`](Handler::timeout) or a database error opening or committing the transaction), or a
/// [`HandlerError::Reject`] (parked; also for a payload that does not decode and for a
/// handler that panicked, with the panic message).
pub async fn handle<H: Handler<DB>, DB: Backend>(
    handler: &H,
    pool: &Pool<DB>,
    record: TestRecord,
) -> Result<(), HandlerError> {
    let mut tx = DB::begin(pool, CRATE).await.map_err(HandlerError::retry)?;
    match handle_in(handler, &mut tx, record).await {
        Ok(()) => tx.commit().await.map_err(HandlerError::retry),
        Err(e) => {
            // Dropping a transaction the handler left mid-statement rolls it back as well.
            let _ = tx.rollback().await;
            Err(e)
        }
    }
}

/// [`handle`] on a connection or transaction of the caller's, which it neither commits nor
/// rolls back: begin a transaction, run one or more records, assert, and roll it back. (It
/// does not apply the runtime's session settings; [`handle`] does.)
pub async fn handle_in<H: Handler<DB>, DB: Backend>(
    handler: &H,
    conn: &mut DB::Connection,
    record: TestRecord,
) -> Result<(), HandlerError> {
    let message = record.message();
    let event_id = record.resolved_event_id();
    let event = H::Event::decode(message.payload()).map_err(|e| {
        HandlerError::reject(format!(
            "the payload does not decode: {}",
            crate::error::error_chain(e.as_ref())
        ))
    })?;
    match run_handler(
        handler,
        conn,
        Record::new(&message, &event_id),
        event,
        1,
        crate::outbox::DEFAULT_SCHEMA,
    )
    .await
    {
        Ok(result) => result,
        Err(panic) => Err(HandlerError::reject(panic)),
    }
}

/// Runs a [`BatchHandler`] once for `records` (one batch, in the order given) in a transaction
/// of its own on `pool`, as the runtime would (attempt 1, its session settings, panics caught,
/// [`BatchHandler::timeout`] enforced), and commits it if the call returned `Ok`; on an error
/// the transaction rolls back.
///
/// `Ok` holds the records the call rejected with [`Batch::reject`], as `(index, error)` sorted
/// by index: the runtime would park them and commit the rest. An `Err` is what the runtime would
/// make of the whole call: [`HandlerError::Retry`] (the batch is retried; also for a time-out or
/// a database error opening or committing), or [`HandlerError::Reject`] (the batch is split to
/// find the culprit; also for a panic, and for a record whose payload does not decode, which
/// the runtime would have parked before the call).
pub async fn handle_batch<B: BatchHandler<DB>, DB: Backend>(
    handler: &B,
    pool: &Pool<DB>,
    records: Vec<TestRecord>,
) -> Result<Vec<(usize, BoxError)>, HandlerError> {
    let messages: Vec<OwnedMessage> = records.iter().map(TestRecord::message).collect();
    let ids: Vec<String> = records.iter().map(TestRecord::resolved_event_id).collect();
    let mut events = Vec::with_capacity(records.len());
    for (i, m) in messages.iter().enumerate() {
        events.push(B::Event::decode(m.payload()).map_err(|e| {
            HandlerError::reject(format!(
                "the payload of record {i} does not decode: {}",
                crate::error::error_chain(e.as_ref())
            ))
        })?);
    }
    let batch = Batch::new(
        messages
            .iter()
            .zip(&ids)
            .map(|(m, id)| Record::new(m, id))
            .collect(),
        events,
        1,
    );
    let mut tx = DB::begin(pool, CRATE).await.map_err(HandlerError::retry)?;
    let limit = handler.timeout();
    let call = AssertUnwindSafe(handler.handle_batch(&mut tx, &batch)).catch_unwind();
    let result = match tokio::time::timeout(limit, call).await {
        Ok(Ok(result)) => result,
        Ok(Err(panic)) => Err(HandlerError::reject(panic_message(panic.as_ref()))),
        Err(_) => Err(HandlerError::retry(TimedOut(limit))),
    };
    match result {
        Ok(()) => {
            tx.commit().await.map_err(HandlerError::retry)?;
            Ok(batch.into_parts().1)
        }
        Err(e) => {
            let _ = tx.rollback().await;
            Err(e)
        }
    }
}
