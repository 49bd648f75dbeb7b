//! The batch handler: one call per partition batch, with every newly claimed record of it.

use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use super::{Context, Decode, Handler, HandlerError, Record};
use crate::error::BoxError;
use crate::store::Backend;

/// The newly claimed records of one partition batch, decoded, in offset order: what a
/// [`BatchHandler`] receives.
///
/// Ledger duplicates and repeats of an event id within the batch are already removed, and
/// records that could not be decoded or have no event id are already parked. Index `i` of
/// [`events`](Batch::events) and [`records`](Batch::records) is the same record; name it to
/// [`reject`](Batch::reject).
pub struct Batch<'a, E> {
    records: Vec<Record<'a>>,
    events: Vec<E>,
    attempt: u32,
    rejected: Mutex<Vec<(usize, BoxError)>>,
}

impl<'a, E> Batch<'a, E> {
    pub(crate) fn new(records: Vec<Record<'a>>, events: Vec<E>, attempt: u32) -> Self {
        debug_assert_eq!(records.len(), events.len());
        Batch {
            records,
            events,
            attempt,
            rejected: Mutex::new(Vec::new()),
        }
    }

    /// How many records the batch holds (at least one: the runtime never calls a handler with
    /// an empty batch).
    pub fn len(&self) -> usize {
        self.events.len()
    }

    /// Whether the batch holds no record (never, in a call from the runtime).
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// The decoded events, in offset order.
    pub fn events(&self) -> &[E] {
        &self.events
    }

    /// The records' metadata (event id, coordinates, key, headers, raw payload), in the same
    /// order as [`events`](Batch::events).
    pub fn records(&self) -> &[Record<'a>] {
        &self.records
    }

    /// `(record, event)` pairs in offset order; `enumerate()` it for the index that
    /// [`reject`](Batch::reject) takes.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (Record<'a>, &E)> + '_ {
        self.records.iter().copied().zip(self.events.iter())
    }

    /// Which try of this batch this is: 1 the first time, 2 after one rollback and retry, and
    /// so on (as [`Context::attempt`]).
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Marks the record at `index` as permanently failed: when the call returns `Ok(())`, the
    /// runtime parks it in `dead_letters` (kind `rejected`, with `error`) and undoes its ledger
    /// claim, in the same transaction that commits the rest of the batch and advances the
    /// offset. Write nothing for a record you reject: whatever the call wrote commits.
    ///
    /// Rejecting an index twice keeps the first error. An index out of range panics (a bug in
    /// the handler), which the runtime treats as a failure of the whole call.
    pub fn reject(&self, index: usize, error: impl Into<BoxError>) {
        assert!(
            index < self.len(),
            "Batch::reject: index {index} is out of range for a batch of {}",
            self.len()
        );
        let mut rejected = self.rejected.lock().unwrap_or_else(|e| e.into_inner());
        if !rejected.iter().any(|(i, _)| *i == index) {
            rejected.push((index, error.into()));
        }
    }

    /// Whether the record at `index` has been rejected in this call.
    pub fn is_rejected(&self, index: usize) -> bool {
        self.rejected
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|(i, _)| *i == index)
    }

    /// The events back, and the rejections sorted by index.
    pub(crate) fn into_parts(self) -> (Vec<E>, Vec<(usize, BoxError)>) {
        let mut rejected = self
            .rejected
            .into_inner()
            .unwrap_or_else(|e| e.into_inner());
        rejected.sort_by_key(|(i, _)| *i);
        (self.events, rejected)
    }
}

/// Processes a whole partition batch in one call, inside the runtime's database transaction:
/// write it with one statement (`INSERT … SELECT FROM unnest($1, $2)` on PostgreSQL,
/// `INSERT … SELECT FROM json_each($1)` or a multi-row `VALUES` on SQLite).
///
/// The runtime calls [`handle_batch`](BatchHandler::handle_batch) once per batch of a
/// partition with every newly claimed record of it (see [`Batch`]), inside the transaction
/// that also claims their event ids in the dedup ledger and advances the partition's stored
/// offset: what the call writes through `conn` commits once per event id, with the ledger rows
/// and the offset, or not at all. Wrap it in [`Batched`] wherever a [`Handler`] is expected
/// (`Runtime::builder(Batched(h))`, `App::new("name", Batched(h))`, redrive); or use
/// `Runtime::batch_builder(h)`.
///
/// What the call returns decides what happens:
///
/// - `Ok(())`: the batch commits, except the records named by [`Batch::reject`], which are
///   parked and unclaimed in the same transaction.
/// - [`HandlerError::Retry`] (or a call past [`timeout`](BatchHandler::timeout)): the whole
///   batch rolls back and is retried after the retry policy's backoff. After the policy's
///   `max_attempts` tries the batch is split as for a rejection below, with a retry counting as
///   a failure: the halves that succeed commit, and a record whose call still asks for a retry
///   when it is alone is parked as `retries_exhausted`. A failure of the database itself is
///   retried without limit, as for a [`Handler`].
/// - [`HandlerError::Reject`] or a panic, a failure that names no record: the batch rolls back
///   and is split in halves, each run in a fresh transaction (a fresh call) that commits and
///   advances the offset over its half, recursively, until the failing record is alone; that
///   record is parked (as `rejected` or `panicked`) and every other record commits once.
///
/// As with [`Handler`], the call may run more than once for one record (retries, and the
/// halves after a failure); each run but the last is rolled back. A record whose event id is
/// repeated later in the same batch and that is rejected stands for the repeats as well: they
/// are counted as duplicates, and its dead letter can be re-driven.
///
/// ```no_run
/// use consumer_runtime::{Batch, BatchHandler, HandlerError, Json};
/// use sqlx::{PgConnection, Postgres};
///
/// #[derive(serde::Deserialize)]
/// struct Order { id: String, cents: i64 }
///
/// struct Orders;
///
/// impl BatchHandler for Orders {
///     type Event = Json<Order>;
///
///     async fn handle_batch(&self, conn: &mut PgConnection, batch: &Batch<'_, Json<Order>>) -> Result<(), HandlerError> {
///         let mut ids = Vec::with_capacity(batch.len());
///         let mut cents = Vec::with_capacity(batch.len());
///         for (i, Json(order)) in batch.events().iter().enumerate() {
///             if order.cents < 0 {
///                 batch.reject(i, format!("order {} has a negative amount", order.id));
///                 continue;
///             }
///             ids.push(order.id.as_str());
///             cents.push(order.cents);
///         }
///         sqlx::query("INSERT INTO orders (id, cents) SELECT * FROM unnest($1::text[], $2::int8[])")
///             .bind(&ids)
///             .bind(&cents)
///             .execute(conn)
///             .await?;
///         Ok(())
///     }
/// }
/// ```
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a batch handler for this database",
    label = "needs `impl BatchHandler<Postgres>` (the default) or `impl BatchHandler<Sqlite>`",
    note = "write `impl consumer_runtime::BatchHandler for {Self} {{ type Event = Json<…>; async fn handle_batch(&self, conn: &mut PgConnection, batch: &Batch<'_, Self::Event>) -> Result<(), HandlerError> {{ … }} }}`"
)]
pub trait BatchHandler<DB: Backend = sqlx::Postgres>: Send + Sync + 'static {
    /// The decoded event (as [`Handler::Event`]; it must also be `Sync`, because the batch is
    /// lent to the call).
    type Event: Decode + Sync;

    /// Applies one batch through `conn`, the connection of the open transaction. Do not commit
    /// or roll back yourself; a nested `sqlx::Connection::begin(conn)` is a savepoint.
    fn handle_batch(
        &self,
        conn: &mut DB::Connection,
        batch: &Batch<'_, Self::Event>,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;

    /// How long one call may take (default 60 s); past it the call is cancelled and the batch
    /// rolls back and is retried, as for [`Handler::timeout`].
    fn timeout(&self) -> Duration {
        Duration::from_secs(60)
    }
}

/// A [`BatchHandler`] where a [`Handler`] is expected: the runtime, the generated program
/// and redrive call it once per batch; a single record (a redrive, [`crate::testing`]) is a
/// batch of one.
#[derive(Debug, Clone, Copy, Default)]
pub struct Batched<B>(pub B);

impl<DB: Backend, B: BatchHandler<DB>> Handler<DB> for Batched<B> {
    type Event = B::Event;

    async fn handle(&self, ctx: &mut Context<'_, DB>, event: B::Event) -> Result<(), HandlerError> {
        let batch = Batch::new(vec![ctx.record()], vec![event], ctx.attempt());
        self.0.handle_batch(ctx.conn(), &batch).await?;
        match batch.into_parts().1.pop() {
            Some((_, source)) => Err(HandlerError::Reject { source }),
            None => Ok(()),
        }
    }

    fn timeout(&self) -> Duration {
        self.0.timeout()
    }

    fn __is_batch(&self) -> bool {
        true
    }

    async fn __handle_batch<'b>(
        &self,
        conn: &mut DB::Connection,
        batch: Batch<'b, B::Event>,
    ) -> (Result<(), HandlerError>, Batch<'b, B::Event>) {
        let result = self.0.handle_batch(conn, &batch).await;
        (result, batch)
    }
}
