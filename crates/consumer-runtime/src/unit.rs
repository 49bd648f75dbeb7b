//! The unit of work: one partition, one batch, one transaction.
//!
//! ```text
//! BEGIN
//!   UPDATE consumer_offsets SET next_offset = <last+1>
//!    WHERE group/topic/partition = … AND epoch = <my epoch> AND next_offset = <my position>  -- fence
//!   (0 rows -> ROLLBACK: this worker no longer owns the partition)
//!   INSERT INTO processed … ON CONFLICT DO NOTHING RETURNING "offset"    -- one statement
//!   for each record in offset order whose id was newly claimed (first occurrence only):
//!       handler.handle(&mut tx, record)
//! COMMIT
//! ```
//!
//! The other guarantees split this transaction in two (see [`Guarantee`]).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::Message;
use rdkafka::message::OwnedMessage;
use sqlx::Pool;

use crate::config::Guarantee;
use crate::error::{BoxError, Coordinates, FailureKind};
use crate::event_id::EventId;
use crate::handler::{Context, Decode, Handler, HandlerError, Record, header};
use crate::store::{Backend, Claim, PartitionKey, Queries};

/// What a [`PartitionWriter`] needs that is the same for every partition.
pub struct WriterConfig<H: Handler<DB>, DB: Backend> {
    /// The user's handler.
    pub handler: Arc<H>,
    /// The database pool.
    pub pool: Pool<DB>,
    /// The runtime's SQL for its schema.
    pub queries: Queries,
    /// The delivery guarantee.
    pub guarantee: Guarantee,
    /// Where event ids come from.
    pub event_id: EventId<H::Event>,
}

/// How a batch ended.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum BatchOutcome {
    /// The batch committed.
    Committed {
        /// Records whose handler ran and committed.
        applied: usize,
        /// Records skipped because their event id was already in the ledger (or earlier in
        /// the batch).
        duplicates: usize,
        /// Records whose handler failed after the offset had moved (at-most-once only).
        lost: usize,
        /// The stored offset after the commit.
        next_offset: i64,
    },
    /// Nothing to do: every record was older than the stored position.
    Empty,
    /// The fence rejected the commit: another worker (or a replay) owns the partition now.
    /// Nothing of the batch is visible.
    Fenced,
}

/// Why a batch did not commit (it was rolled back).
#[derive(Debug)]
#[non_exhaustive]
pub enum BatchError {
    /// Worth retrying: a database error, or a handler asking for a retry.
    Transient {
        /// The record whose handler failed, when a handler failed.
        at: Option<Coordinates>,
        /// Whether the failure is the infrastructure's (database unreachable, pool exhausted)
        /// rather than the record's; such failures are retried without limit.
        infrastructure: bool,
        /// The least time to wait, if the handler named one.
        after: Option<Duration>,
        /// The cause.
        source: BoxError,
    },
    /// Retrying cannot help: the record at `at` is undecodable, has no event id, or was
    /// rejected by the handler.
    Permanent {
        /// The record.
        at: Coordinates,
        /// What kind of failure.
        kind: FailureKind,
        /// The cause.
        source: BoxError,
    },
}

impl std::fmt::Display for BatchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BatchError::Transient {
                at: Some(at),
                source,
                ..
            } => write!(f, "transient failure at {at}: {source}"),
            BatchError::Transient { source, .. } => write!(f, "transient failure: {source}"),
            BatchError::Permanent { at, kind, source } => {
                write!(f, "permanent failure at {at} ({kind}): {source}")
            }
        }
    }
}

impl std::error::Error for BatchError {}

fn db_error(e: sqlx::Error) -> BatchError {
    BatchError::Transient {
        at: None,
        infrastructure: true,
        after: None,
        source: Box::new(e),
    }
}

/// Whether a database error says the database is unavailable rather than that a statement was
/// wrong.
pub(crate) fn is_infrastructure(e: &(dyn std::error::Error + 'static)) -> bool {
    match e.downcast_ref::<sqlx::Error>() {
        Some(
            sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed
            | sqlx::Error::Protocol(_)
            | sqlx::Error::Tls(_),
        ) => true,
        Some(sqlx::Error::Database(db)) => {
            // PostgreSQL: connection exceptions, shutdown, serialization/deadlock
            // (40xxx), insufficient resources; SQLite: busy/locked.
            let code = db.code().unwrap_or_default();
            code.starts_with("08")
                || code.starts_with("57P")
                || code.starts_with("40")
                || code.starts_with("53")
                || code == "5"
                || code == "6"
        }
        _ => false,
    }
}

/// Decodes a record and works out its event id under `strategy`: the rules of the unit of work,
/// shared with the replay dry run ([`crate::replay`]) so that both agree on every id.
pub(crate) fn identify<E: Decode>(
    strategy: &EventId<E>,
    message: &OwnedMessage,
) -> Result<(E, String), (FailureKind, BoxError)> {
    let event = E::decode(message.payload()).map_err(|e| (FailureKind::Undecodable, e))?;
    let missing = |why: String| (FailureKind::MissingEventId, BoxError::from(why));
    let id = match strategy {
        EventId::Header(name) => {
            let raw = header(message, name)
                .ok_or_else(|| missing(format!("the record has no `{name}` header")))?;
            let id = std::str::from_utf8(raw)
                .map_err(|_| missing(format!("the `{name}` header is not valid UTF-8")))?;
            id.to_owned()
        }
        EventId::FromEvent(f) => f(&event).ok_or_else(|| {
            missing("the event-id function returned no id for this event".to_owned())
        })?,
        EventId::Coordinates => format!(
            "{}/{}/{}",
            message.topic(),
            message.partition(),
            message.offset()
        ),
    };
    if id.is_empty() {
        return Err(missing("the event id is empty".to_owned()));
    }
    Ok((event, id))
}

struct Prepared<'m, E> {
    message: &'m OwnedMessage,
    event: Option<E>,
    id: String,
}

/// The fenced writer of one partition: it knows its epoch and the stored position, and commits
/// batches of that partition's records through the unit of work.
pub struct PartitionWriter<H: Handler<DB>, DB: Backend> {
    config: Arc<WriterConfig<H, DB>>,
    key: PartitionKey,
    epoch: i64,
    position: Option<i64>,
}

impl<H: Handler<DB>, DB: Backend> PartitionWriter<H, DB> {
    /// A writer for `key` holding the epoch and position of `claim`.
    pub fn new(config: Arc<WriterConfig<H, DB>>, key: PartitionKey, claim: Claim) -> Self {
        PartitionWriter {
            config,
            key,
            epoch: claim.epoch,
            position: claim.next_offset,
        }
    }

    /// The partition.
    pub fn key(&self) -> &PartitionKey {
        &self.key
    }

    /// The epoch this writer presents to the fence.
    pub fn epoch(&self) -> i64 {
        self.epoch
    }

    /// The stored offset as this writer last saw it (`None`: never committed).
    pub fn position(&self) -> Option<i64> {
        self.position
    }

    fn coordinates(&self, offset: i64) -> Coordinates {
        Coordinates {
            topic: self.key.topic.clone(),
            partition: self.key.partition,
            offset,
        }
    }

    /// Decodes the records and works out their event ids, before any transaction opens.
    fn prepare<'m>(
        &self,
        batch: &'m [OwnedMessage],
    ) -> Result<Vec<Prepared<'m, H::Event>>, BatchError> {
        let mut out = Vec::with_capacity(batch.len());
        for message in batch {
            let (event, id) =
                identify(&self.config.event_id, message).map_err(|(kind, source)| {
                    BatchError::Permanent {
                        at: self.coordinates(message.offset()),
                        kind,
                        source,
                    }
                })?;
            out.push(Prepared {
                message,
                event: Some(event),
                id,
            });
        }
        Ok(out)
    }

    /// Runs the unit of work for one batch of this partition's records, in offset order.
    ///
    /// Records older than the stored position are ignored (they were committed, or skipped by a
    /// replay). On `Ok(Committed)` the writer's position moves to the new stored offset; on
    /// `Ok(Fenced)` the writer must be dropped; on `Err` nothing was committed and the same
    /// batch may be retried.
    pub async fn write(&mut self, batch: &[OwnedMessage]) -> Result<BatchOutcome, BatchError> {
        let start = match self.position {
            Some(p) => batch.partition_point(|m| m.offset() < p),
            None => 0,
        };
        let batch = &batch[start..];
        let Some(last) = batch.last() else {
            return Ok(BatchOutcome::Empty);
        };
        let next = last.offset() + 1;
        let mut prepared = self.prepare(batch)?;
        let outcome = match self.config.guarantee {
            Guarantee::EffectivelyOnce => self.effectively_once(&mut prepared, next).await?,
            Guarantee::AtLeastOnce => self.at_least_once(&mut prepared, next).await?,
            Guarantee::AtMostOnce => self.at_most_once(&mut prepared, next).await?,
        };
        if let BatchOutcome::Committed { next_offset, .. } = outcome {
            self.position = Some(next_offset);
        }
        Ok(outcome)
    }

    async fn effectively_once(
        &self,
        prepared: &mut [Prepared<'_, H::Event>],
        next: i64,
    ) -> Result<BatchOutcome, BatchError> {
        let cfg = &*self.config;
        let mut tx = DB::begin(&cfg.pool).await.map_err(db_error)?;
        if !self.fence(&mut tx, next).await? {
            tx.rollback().await.map_err(db_error)?;
            return Ok(BatchOutcome::Fenced);
        }

        // First occurrence of each id within the batch; later ones are duplicates outright.
        let mut seen = HashSet::with_capacity(prepared.len());
        let mut ids = Vec::with_capacity(prepared.len());
        let mut offsets = Vec::with_capacity(prepared.len());
        for p in prepared.iter() {
            if seen.insert(p.id.as_str()) {
                ids.push(p.id.as_str());
                offsets.push(p.message.offset());
            }
        }
        let claimed = DB::claim_events(&mut tx, &cfg.queries, &self.key, &ids, &offsets)
            .await
            .map_err(db_error)?;

        let mut applied = 0;
        for p in prepared.iter_mut() {
            if claimed.binary_search(&p.message.offset()).is_err() {
                continue;
            }
            self.handle(&mut tx, p).await?;
            applied += 1;
        }
        tx.commit().await.map_err(db_error)?;
        Ok(BatchOutcome::Committed {
            applied,
            duplicates: prepared.len() - applied,
            lost: 0,
            next_offset: next,
        })
    }

    async fn at_least_once(
        &self,
        prepared: &mut [Prepared<'_, H::Event>],
        next: i64,
    ) -> Result<BatchOutcome, BatchError> {
        let cfg = &*self.config;
        let mut tx = DB::begin(&cfg.pool).await.map_err(db_error)?;
        for p in prepared.iter_mut() {
            self.handle(&mut tx, p).await?;
        }
        tx.commit().await.map_err(db_error)?;
        // A crash here re-applies the batch: that is this guarantee's contract.
        if !self.advance_alone(next).await? {
            return Ok(BatchOutcome::Fenced);
        }
        Ok(BatchOutcome::Committed {
            applied: prepared.len(),
            duplicates: 0,
            lost: 0,
            next_offset: next,
        })
    }

    async fn at_most_once(
        &self,
        prepared: &mut [Prepared<'_, H::Event>],
        next: i64,
    ) -> Result<BatchOutcome, BatchError> {
        let cfg = &*self.config;
        if !self.advance_alone(next).await? {
            return Ok(BatchOutcome::Fenced);
        }
        // The offset has moved: from here on a crash or a failure loses the batch.
        let result = async {
            let mut tx = DB::begin(&cfg.pool).await.map_err(db_error)?;
            for p in prepared.iter_mut() {
                self.handle(&mut tx, p).await?;
            }
            tx.commit().await.map_err(db_error)
        }
        .await;
        let lost = match result {
            Ok(()) => 0,
            Err(e) => {
                tracing::error!(
                    topic = %self.key.topic,
                    partition = self.key.partition,
                    records = prepared.len(),
                    error = %e,
                    "at-most-once: the batch failed after its offset was committed; its records are lost"
                );
                prepared.len()
            }
        };
        Ok(BatchOutcome::Committed {
            applied: prepared.len() - lost,
            duplicates: 0,
            lost,
            next_offset: next,
        })
    }

    /// The fence: moves the stored offset to `next` if this writer still owns the partition.
    async fn fence(&self, conn: &mut DB::Connection, next: i64) -> Result<bool, BatchError> {
        let cfg = &*self.config;
        DB::advance(
            conn,
            &cfg.queries,
            &self.key,
            self.epoch,
            self.position,
            next,
        )
        .await
        .map_err(db_error)
    }

    /// The fence in a transaction of its own (at-most-once and at-least-once).
    async fn advance_alone(&self, next: i64) -> Result<bool, BatchError> {
        let mut tx = DB::begin(&self.config.pool).await.map_err(db_error)?;
        if !self.fence(&mut tx, next).await? {
            tx.rollback().await.map_err(db_error)?;
            return Ok(false);
        }
        tx.commit().await.map_err(db_error)?;
        Ok(true)
    }

    async fn handle(
        &self,
        conn: &mut DB::Connection,
        p: &mut Prepared<'_, H::Event>,
    ) -> Result<(), BatchError> {
        let event = p
            .event
            .take()
            .expect("each record is handled once per attempt");
        let record = Record::new(p.message, &p.id);
        let mut ctx = Context::new(conn, record);
        let offset = p.message.offset();
        let span = tracing::debug_span!(
            "record",
            topic = %self.key.topic,
            partition = self.key.partition,
            offset,
            event_id = %p.id
        );
        let result =
            tracing::Instrument::instrument(self.config.handler.handle(&mut ctx, event), span)
                .await;
        result.map_err(|e| match e {
            HandlerError::Retry { source, after } => BatchError::Transient {
                at: Some(self.coordinates(offset)),
                infrastructure: is_infrastructure(source.as_ref()),
                after,
                source,
            },
            HandlerError::Reject { source } => BatchError::Permanent {
                at: self.coordinates(offset),
                kind: FailureKind::Rejected,
                source,
            },
        })
    }
}
