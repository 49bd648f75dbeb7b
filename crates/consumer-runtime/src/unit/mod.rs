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
//! The other guarantees split this transaction in two (see [`Guarantee`]). A batch handler
//! ([`Batched`](crate::handler::Batched)) is called once with all the newly claimed records
//! instead of once per record, and isolates its failures by splitting the batch: see
//! `unit/batch.rs`.
//!
//! The file reads top-down: [`PartitionWriter::write`], the three guarantees, the handler
//! transaction (`run`, with its fast and slow paths and the steps they share: opening the
//! transaction, parking a record, committing), one record's handler call, and then the
//! per-record step shared with redrive, and the types.
//!
//! # One record's step, shared with redrive
//!
//! What happens to one record is the same code for a batch and for a redrive
//! ([`DeadLetters::redrive`](crate::dead_letters::DeadLetters::redrive)): decode it and work
//! out its event id ([`identify`]), claim the id in the ledger ([`claim_one`]; a batch claims
//! all its ids in one statement), run the handler under its time limit and classify how it
//! failed ([`handle_record`]: a `Retry` or a time-out is transient, a `Reject` or a panic is a
//! permanent failure of the record). Redrive adds only what is its own: it takes the dead
//! letter in the same transaction, and records a failed attempt on it.
//!
//! # Permanent failures: parking in the same transaction
//!
//! A writer made with [`PartitionWriter::park_failures`] (the runtime's) never lets one bad
//! record stop its partition. A record that fails permanently (undecodable payload, no event
//! id, the handler's `Reject`, a handler panic, or retries exhausted, see
//! [`PartitionWriter::give_up`]) is written to `dead_letters` **in the transaction that
//! advances the offset**, its effects are undone, and the rest of its batch (records after it
//! included) commits. Under effectively-once the ledger never claims a parked record, so a
//! replay or a redrive can still apply it once.
//!
//! Records that fail before any handler runs (undecodable, no event id, retries exhausted) are
//! known when the transaction opens: they are left out of the ledger claim and parked directly.
//! A handler failure is only known once the handler has written into the transaction, and
//! undoing just its writes needs a savepoint around it. Savepoints cost a round trip or two
//! per record, so the writer does not pay for them up front:
//!
//! 1. **Fast path**, every batch: exactly the transaction above, with no savepoint. If no
//!    handler fails permanently (nearly always), that is all.
//! 2. **Slow path**, only after a handler failed permanently on the fast path: the transaction
//!    is rolled back and the batch runs once more, in a new transaction, with a savepoint
//!    (`SAVEPOINT` / `RELEASE`, sqlx's nested transaction) around each handler call. The record
//!    that failed on the fast path is parked without running its handler again; any other
//!    record whose handler fails now is rolled back to its savepoint, its ledger row (claimed
//!    by the batch's one `INSERT`) is deleted in the same transaction, and it is parked. A
//!    later record of the same batch with the same event id then gets its own chance (claimed
//!    alone, inside its savepoint), as it would in a later batch.
//!
//! So a batch runs its handlers at most twice (not once per failure, as re-running the batch
//! without each culprit in turn would), the slow path is correct for any number of failures,
//! and the fast path costs exactly what it cost before dead letters existed.
//!
//! Transient failures (a handler's `Retry`, database errors) still roll the whole batch back
//! for the caller to retry with backoff, and so does a handler that runs past its
//! [`Handler::timeout`]. A handler panic is caught (`futures_util`'s `catch_unwind` around the
//! handler's future) and treated as a permanent failure of its record, parked as `panicked`
//! with the panic message.
//!
//! At-least-once parks in its handler transaction the same way (there is no ledger). At-most-once
//! parks in its handler transaction, after the offset has moved, so a crash there loses the
//! batch and its dead letters alike, as that guarantee loses anything in flight.
//!
//! If parking itself fails with an error that is not a database outage, the record cannot be
//! parked: the write returns [`BatchError::Permanent`] and the runtime stops with
//! [`crate::Error::RecordFailed`] rather than skip the record.

use std::collections::HashSet;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt as _;

use rdkafka::Message;
use rdkafka::message::OwnedMessage;
use sqlx::Pool;

use crate::config::Guarantee;
use crate::error::{BoxError, Coordinates, FailureKind, error_chain, is_infrastructure};
use crate::event_id::EventId;
use crate::handler::{Context, Decode, Handler, HandlerError, Record, TimedOut, header};
use crate::store::{Backend, CRATE, Claim, Parking, PartitionKey, Queries};

mod batch;
#[cfg(test)]
mod tests;

// ---------------------------------------------------------------------------------------------
// The writer of one partition: `write`, then the three guarantees.
// ---------------------------------------------------------------------------------------------

/// The fenced writer of one partition: it knows its epoch and the stored position, and commits
/// batches of that partition's records through the unit of work.
pub(crate) struct PartitionWriter<H: Handler<DB>, DB: Backend> {
    config: Arc<WriterConfig<H, DB>>,
    key: PartitionKey,
    epoch: i64,
    position: Option<i64>,
    park: bool,
    given_up: Vec<(i64, Failure)>,
    parked: Vec<Parked>,
    commit_duration: Duration,
    attempt: u32,
}

impl<H: Handler<DB>, DB: Backend> PartitionWriter<H, DB> {
    /// A writer for `key` holding the epoch and position of `claim`.
    ///
    /// It does not park failures: a permanent failure rolls the batch back and is returned as
    /// [`BatchError::Permanent`]. The runtime's writers park them
    /// ([`PartitionWriter::park_failures`]).
    pub(crate) fn new(config: Arc<WriterConfig<H, DB>>, key: PartitionKey, claim: Claim) -> Self {
        PartitionWriter {
            config,
            key,
            epoch: claim.epoch,
            position: claim.next_offset,
            park: false,
            given_up: Vec::new(),
            parked: Vec::new(),
            commit_duration: Duration::ZERO,
            attempt: 1,
        }
    }

    /// Runs the unit of work for one batch of this partition's records, in offset order.
    ///
    /// Records older than the stored position are ignored (they were committed, or skipped by a
    /// replay). On `Ok(Committed)` the writer's position moves to the new stored offset (and
    /// [`parked`](Self::parked) lists the records it parked); on `Ok(Fenced)` the writer must
    /// be dropped; on `Err` nothing was committed and the same batch may be retried.
    pub(crate) async fn write(
        &mut self,
        batch: &[OwnedMessage],
    ) -> Result<BatchOutcome, BatchError> {
        self.parked.clear();
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
            Guarantee::EffectivelyOnce => self.effectively_once(&mut prepared, next).await,
            Guarantee::AtLeastOnce => self.at_least_once(&mut prepared, next).await,
            Guarantee::AtMostOnce => self.at_most_once(&mut prepared, next).await,
        };
        // A batch handler's split batch may have committed (and parked) part of the batch
        // before an error: those records are logged as well.
        if matches!(outcome, Ok(BatchOutcome::Committed { .. })) || !self.parked.is_empty() {
            for p in &self.parked {
                tracing::warn!(
                    topic = %p.at.topic,
                    partition = p.at.partition,
                    offset = p.at.offset,
                    event_id = p.event_id.as_deref().unwrap_or("(none)"),
                    kind = p.kind.as_str(),
                    attempts = p.attempts,
                    error = %p.error,
                    "record failed permanently; parked in dead_letters"
                );
            }
        }
        let outcome = outcome?;
        if let BatchOutcome::Committed { next_offset, .. } = outcome {
            self.position = Some(next_offset);
            self.given_up.clear();
        }
        Ok(outcome)
    }

    /// Effectively-once: the fence, the ledger claim and the handlers in one transaction.
    async fn effectively_once(
        &mut self,
        prepared: &mut [Prepared<'_, H::Event>],
        next: i64,
    ) -> Result<BatchOutcome, BatchError> {
        match self.run(prepared, Some(next), true).await? {
            None => Ok(BatchOutcome::Fenced),
            Some(done) => Ok(self.committed(prepared.len(), done, 0, next)),
        }
    }

    /// At-least-once: the handlers' transaction, then the fence in a transaction of its own.
    async fn at_least_once(
        &mut self,
        prepared: &mut [Prepared<'_, H::Event>],
        next: i64,
    ) -> Result<BatchOutcome, BatchError> {
        let done = self
            .run(prepared, None, false)
            .await?
            .expect("only a fenced transaction returns None");
        // A crash here re-applies the batch: that is this guarantee's contract.
        if !self.advance_alone(next).await? {
            return Ok(BatchOutcome::Fenced);
        }
        Ok(self.committed(prepared.len(), done, 0, next))
    }

    /// At-most-once: the fence in a transaction of its own, then the handlers' transaction.
    async fn at_most_once(
        &mut self,
        prepared: &mut [Prepared<'_, H::Event>],
        next: i64,
    ) -> Result<BatchOutcome, BatchError> {
        if !self.advance_alone(next).await? {
            return Ok(BatchOutcome::Fenced);
        }
        // The offset has moved: from here on a crash or a failure loses the batch.
        let (done, lost) = match self.run(prepared, None, false).await {
            Ok(done) => (done.expect("only a fenced transaction returns None"), 0),
            Err(e) => {
                tracing::error!(
                    topic = %self.key.topic,
                    partition = self.key.partition,
                    records = prepared.len(),
                    error = %e,
                    "at-most-once: the batch failed after its offset was committed; its records are lost"
                );
                (
                    Applied {
                        applied: 0,
                        parked: Vec::new(),
                        commit: Duration::ZERO,
                    },
                    prepared.len(),
                )
            }
        };
        Ok(self.committed(prepared.len(), done, lost, next))
    }

    fn committed(
        &mut self,
        prepared: usize,
        done: Applied,
        lost: usize,
        next: i64,
    ) -> BatchOutcome {
        let parked = done.parked.len();
        self.parked = done.parked;
        self.commit_duration = done.commit;
        BatchOutcome::Committed {
            applied: done.applied,
            duplicates: prepared - done.applied - parked - lost,
            lost,
            next_offset: next,
        }
    }

    // -----------------------------------------------------------------------------------------
    // The handler transaction: the fast path, and the slow path after a permanent failure.
    // -----------------------------------------------------------------------------------------

    /// Runs the handler transaction: the fast path, then the slow path if a handler failed
    /// permanently. `fence`: the offset to advance to inside it (effectively-once); `ledger`:
    /// whether to claim event ids. `None`: fenced.
    async fn run(
        &mut self,
        prepared: &mut [Prepared<'_, H::Event>],
        fence: Option<i64>,
        ledger: bool,
    ) -> Result<Option<Applied>, BatchError> {
        if self.config.handler.__is_batch() {
            return self.run_batch(prepared, fence, ledger).await;
        }
        match self.fast_attempt(prepared, fence, ledger).await {
            Ok(done) => Ok(done),
            Err(Abort::Batch(e)) => Err(e),
            Err(Abort::Failed { index, failure }) => {
                prepared[index].failure = Some(failure);
                self.slow_attempt(prepared, fence, ledger).await
            }
        }
    }

    /// The fast path: the batch's transaction with no savepoint. A handler's permanent failure
    /// rolls it back and returns [`Abort::Failed`] (or, for a writer that does not park,
    /// [`BatchError::Permanent`]).
    async fn fast_attempt(
        &self,
        prepared: &mut [Prepared<'_, H::Event>],
        fence: Option<i64>,
        ledger: bool,
    ) -> Result<Option<Applied>, Abort> {
        let Some((mut tx, claimed)) = self.open(prepared, fence, ledger).await? else {
            return Ok(None);
        };
        let mut applied = 0;
        let mut parked = Vec::new();
        for (index, p) in prepared.iter_mut().enumerate() {
            if let Some(failure) = &p.failure {
                parked.push(
                    self.park(&mut tx, p.message, p.id.as_deref(), failure.clone())
                        .await?,
                );
                continue;
            }
            let offset = p.message.offset();
            if ledger && claimed.binary_search(&index).is_err() {
                continue; // a duplicate
            }
            match self.handle(&mut tx, p).await {
                Ok(()) => applied += 1,
                Err(RecordFailure::Transient { source, after }) => {
                    let _ = tx.rollback().await;
                    return Err(Abort::Batch(self.transient(offset, source, after)));
                }
                Err(RecordFailure::Permanent(failure)) => {
                    let _ = tx.rollback().await;
                    if self.park {
                        return Err(Abort::Failed { index, failure });
                    }
                    return Err(Abort::Batch(BatchError::Permanent {
                        at: self.coordinates(offset),
                        kind: failure.kind,
                        source: failure.error.into(),
                    }));
                }
            }
        }
        Ok(Some(self.commit(tx, applied, parked).await?))
    }

    /// The slow path: the batch once more, in a new transaction, with a savepoint around each
    /// handler; a record whose handler fails permanently is rolled back to its savepoint,
    /// unclaimed and parked, and the rest of the batch commits.
    async fn slow_attempt(
        &self,
        prepared: &mut [Prepared<'_, H::Event>],
        fence: Option<i64>,
        ledger: bool,
    ) -> Result<Option<Applied>, BatchError> {
        let cfg = &*self.config;
        let Some((mut tx, claimed)) = self.open(prepared, fence, ledger).await? else {
            return Ok(None);
        };
        let mut applied = 0;
        let mut parked = Vec::new();
        // Ids whose claim this transaction undid (their record was parked): a later record
        // with the same id gets its own chance.
        let mut released: HashSet<String> = HashSet::new();
        for (index, p) in prepared.iter_mut().enumerate() {
            if let Some(failure) = &p.failure {
                parked.push(
                    self.park(&mut tx, p.message, p.id.as_deref(), failure.clone())
                        .await?,
                );
                continue;
            }
            let offset = p.message.offset();
            let first_claim = !ledger || claimed.binary_search(&index).is_ok();
            let id = p.id.clone().unwrap_or_default();
            if !first_claim && !released.contains(&id) {
                continue; // a duplicate
            }
            let mut sp = sqlx::Connection::begin(&mut *tx).await.map_err(db_error)?;
            if !first_claim
                && !claim_one::<DB>(&mut sp, &cfg.queries, &self.key, &id, offset)
                    .await
                    .map_err(db_error)?
            {
                sp.rollback().await.map_err(db_error)?;
                continue;
            }
            match self.handle(&mut sp, p).await {
                Ok(()) => {
                    sp.commit().await.map_err(db_error)?;
                    released.remove(&id);
                    applied += 1;
                }
                Err(RecordFailure::Transient { source, after }) => {
                    drop(sp);
                    let _ = tx.rollback().await;
                    return Err(self.transient(offset, source, after));
                }
                Err(RecordFailure::Permanent(failure)) => {
                    sp.rollback().await.map_err(db_error)?;
                    if ledger && first_claim {
                        DB::unclaim(&mut tx, &cfg.queries, &self.key.group, &id)
                            .await
                            .map_err(db_error)?;
                    }
                    released.insert(id);
                    parked.push(
                        self.park(&mut tx, p.message, p.id.as_deref(), failure)
                            .await?,
                    );
                }
            }
        }
        Ok(Some(self.commit(tx, applied, parked).await?))
    }

    /// Opens the handler transaction both paths share: `BEGIN`, the fence (when `fence` is
    /// set; `None` if it refused), and one ledger claim of the first occurrence of each id
    /// (when `ledger`), returning the claimed records' indices in `prepared`, sorted. Indices,
    /// not offsets: a batch can hold the same record twice at its offset (a broker that sends
    /// a stored batch more than once in a fetch response), and only its first copy is claimed.
    async fn open(
        &self,
        prepared: &mut [Prepared<'_, H::Event>],
        fence: Option<i64>,
        ledger: bool,
    ) -> Result<Option<(sqlx::Transaction<'static, DB>, Vec<usize>)>, BatchError> {
        let cfg = &*self.config;
        let mut tx = DB::begin(&cfg.pool, CRATE).await.map_err(db_error)?;
        if !ledger || fence.is_none() {
            if let Some(next) = fence
                && !self.fence(&mut tx, next).await?
            {
                tx.rollback().await.map_err(db_error)?;
                return Ok(None);
            }
            if !ledger {
                return Ok(Some((tx, Vec::new())));
            }
        }
        // First occurrence of each id within the batch; later ones are duplicates outright.
        let mut seen = HashSet::with_capacity(prepared.len());
        let mut ids = Vec::with_capacity(prepared.len());
        let mut offsets = Vec::with_capacity(prepared.len());
        let mut firsts = Vec::with_capacity(prepared.len());
        for (index, p) in prepared.iter().enumerate() {
            if let (Some(id), None) = (&p.id, &p.failure)
                && seen.insert(id.as_str())
            {
                ids.push(id.as_str());
                offsets.push(p.message.offset());
                firsts.push(index);
            }
        }
        let claimed = if let Some(next) = fence {
            // The fence and the claim in one statement where the database can.
            let claimed = DB::fence_and_claim(
                &mut tx,
                &cfg.queries,
                &self.key,
                self.epoch,
                self.position,
                next,
                &ids,
                &offsets,
            )
            .await
            .map_err(db_error)?;
            let Some(claimed) = claimed else {
                tx.rollback().await.map_err(db_error)?;
                return Ok(None);
            };
            claimed
        } else if ids.is_empty() {
            Vec::new()
        } else {
            DB::claim_events(&mut tx, &cfg.queries, &self.key, &ids, &offsets)
                .await
                .map_err(db_error)?
        };
        // The claim answers offsets (sorted); each belongs to the first occurrence of one id.
        let claimed = firsts
            .into_iter()
            .zip(offsets)
            .filter(|(_, offset)| claimed.binary_search(offset).is_ok())
            .map(|(index, _)| index)
            .collect();
        Ok(Some((tx, claimed)))
    }

    /// Commits the handler transaction, timing its `COMMIT`.
    async fn commit(
        &self,
        tx: sqlx::Transaction<'static, DB>,
        applied: usize,
        parked: Vec<Parked>,
    ) -> Result<Applied, BatchError> {
        let started = std::time::Instant::now();
        tx.commit().await.map_err(db_error)?;
        Ok(Applied {
            applied,
            parked,
            commit: started.elapsed(),
        })
    }

    // -----------------------------------------------------------------------------------------
    // One record: handle it, or park it.
    // -----------------------------------------------------------------------------------------

    /// Runs the handler of one claimed record on `conn` (the record's step of the unit of
    /// work, [`handle_record`]). The event is consumed by the handler; a second run (the slow
    /// path) decodes it again.
    async fn handle(
        &self,
        conn: &mut DB::Connection,
        p: &mut Prepared<'_, H::Event>,
    ) -> Result<(), RecordFailure> {
        let event = match p.event.take() {
            Some(e) => e,
            None => H::Event::decode(p.message.payload()).map_err(|e| {
                RecordFailure::Permanent(Failure {
                    kind: FailureKind::Undecodable,
                    error: error_chain(e.as_ref()),
                    attempts: 0,
                })
            })?,
        };
        let id = p.id.as_deref().unwrap_or_default();
        handle_record(
            &*self.config.handler,
            conn,
            &self.key.group,
            Record::new(p.message, id),
            event,
            self.attempt,
            &self.config.queries.schema,
        )
        .await
    }

    /// Writes a record to `dead_letters` in `conn`'s transaction.
    async fn park(
        &self,
        conn: &mut DB::Connection,
        m: &OwnedMessage,
        id: Option<&str>,
        failure: Failure,
    ) -> Result<Parked, BatchError> {
        let letter = Parking {
            offset: m.offset(),
            key: m.key(),
            headers: crate::store::dead_letter::encode_headers(m),
            payload: m.payload(),
            timestamp_ms: m.timestamp().to_millis(),
            event_id: id,
            error: &failure.error,
            kind: failure.kind,
            attempts: failure.attempts,
        };
        match DB::park(conn, &self.config.queries, &self.key, &letter).await {
            Ok(()) => Ok(Parked {
                at: self.coordinates(m.offset()),
                event_id: id.map(str::to_owned),
                kind: failure.kind,
                error: failure.error,
                attempts: failure.attempts,
            }),
            Err(e) if is_infrastructure(&e) => Err(db_error(e)),
            Err(e) => Err(BatchError::Permanent {
                at: self.coordinates(m.offset()),
                kind: failure.kind,
                source: format!(
                    "{} (and parking it in dead_letters failed: {e})",
                    failure.error
                )
                .into(),
            }),
        }
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
        let mut tx = DB::begin(&self.config.pool, CRATE)
            .await
            .map_err(db_error)?;
        if !self.fence(&mut tx, next).await? {
            tx.rollback().await.map_err(db_error)?;
            return Ok(false);
        }
        tx.commit().await.map_err(db_error)?;
        Ok(true)
    }

    /// Decodes the records and works out their event ids, before any transaction opens.
    fn prepare<'m>(
        &self,
        batch: &'m [OwnedMessage],
    ) -> Result<Vec<Prepared<'m, H::Event>>, BatchError> {
        let mut out = Vec::with_capacity(batch.len());
        for message in batch {
            let strategy = &self.config.event_id;
            let prepared = match identify(strategy, message) {
                Ok((event, id)) => Prepared {
                    message,
                    event: Some(event),
                    id: Some(id),
                    failure: None,
                },
                Err((kind, source)) if self.park => Prepared {
                    message,
                    event: None,
                    id: match kind {
                        FailureKind::Undecodable => id_without_event(strategy, message),
                        _ => None,
                    },
                    failure: Some(Failure {
                        kind,
                        error: error_chain(source.as_ref()),
                        attempts: 0,
                    }),
                },
                Err((kind, source)) => {
                    return Err(BatchError::Permanent {
                        at: self.coordinates(message.offset()),
                        kind,
                        source,
                    });
                }
            };
            out.push(prepared);
        }
        // A batch handler's given-up batch is searched for its culprit instead (`unit::batch`).
        if self.park && !self.given_up.is_empty() && !self.config.handler.__is_batch() {
            for p in &mut out {
                if let Some((_, f)) = self.given_up.iter().find(|(o, _)| *o == p.message.offset())
                    && p.failure.is_none()
                {
                    p.failure = Some(f.clone());
                }
            }
        }
        Ok(out)
    }

    fn transient(&self, offset: i64, source: BoxError, after: Option<Duration>) -> BatchError {
        BatchError::Transient {
            at: Some(self.coordinates(offset)),
            infrastructure: is_infrastructure(source.as_ref()),
            after,
            source,
        }
    }

    fn coordinates(&self, offset: i64) -> Coordinates {
        Coordinates {
            topic: self.key.topic.clone(),
            partition: self.key.partition,
            offset,
        }
    }

    // -----------------------------------------------------------------------------------------
    // What the runtime's worker sets and reads.
    // -----------------------------------------------------------------------------------------

    /// Whether records that fail permanently are parked in `dead_letters` in the batch's
    /// transaction while the rest of the batch commits (see the [module](self) documentation),
    /// instead of rolling back the batch with [`BatchError::Permanent`].
    pub(crate) fn park_failures(mut self, yes: bool) -> Self {
        self.park = yes;
        self
    }

    /// Gives up on the record at `at` after `attempts` transient failures: the next
    /// [`write`](Self::write) of a batch holding it parks it as `retries_exhausted` with
    /// `error`, without running its handler. Forgotten once a batch commits. Only for a writer
    /// that parks failures.
    pub(crate) fn give_up(&mut self, at: &Coordinates, error: String, attempts: u32) {
        self.given_up.retain(|(o, _)| *o != at.offset);
        self.given_up.push((
            at.offset,
            Failure {
                kind: FailureKind::RetriesExhausted,
                error,
                attempts,
            },
        ));
    }

    /// Which try of the next batch the next [`write`](Self::write) is (1 unless set): what the
    /// handlers see as [`Context::attempt`]. The runtime's retry loop sets it before each write.
    pub(crate) fn set_attempt(&mut self, attempt: u32) {
        self.attempt = attempt.max(1);
    }

    /// The records the last committed [`write`](Self::write) parked.
    pub(crate) fn parked(&self) -> &[Parked] {
        &self.parked
    }

    /// How long the `COMMIT` of the last committed [`write`](Self::write)'s transaction took
    /// (under at-least-once and at-most-once: of its handler transaction).
    pub(crate) fn commit_duration(&self) -> Duration {
        self.commit_duration
    }

    /// The partition.
    pub(crate) fn key(&self) -> &PartitionKey {
        &self.key
    }

    /// The epoch this writer presents to the fence.
    pub(crate) fn epoch(&self) -> i64 {
        self.epoch
    }

    /// The stored offset as this writer last saw it (`None`: never committed).
    #[cfg(test)]
    pub(crate) fn position(&self) -> Option<i64> {
        self.position
    }
}

// ---------------------------------------------------------------------------------------------
// The record's step, shared with redrive (`crate::dead_letters`), replay's dry run and testing.
// ---------------------------------------------------------------------------------------------

/// Decodes a record and works out its event id under `strategy`: the rules of the unit of work,
/// shared with redrive and the replay dry run ([`crate::replay`]) so that all agree on every id.
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

/// The event id of a record whose payload could not be decoded, when the strategy does not
/// need the event (a header, the coordinates): stored with the dead letter.
fn id_without_event<E>(strategy: &EventId<E>, message: &OwnedMessage) -> Option<String> {
    match strategy {
        EventId::Header(name) => header(message, name)
            .and_then(|v| std::str::from_utf8(v).ok())
            .filter(|id| !id.is_empty())
            .map(str::to_owned),
        EventId::FromEvent(_) => None,
        EventId::Coordinates => Some(format!(
            "{}/{}/{}",
            message.topic(),
            message.partition(),
            message.offset()
        )),
    }
}

/// Claims one event id in the ledger inside `conn`'s transaction: `false` if the ledger
/// already holds it (the record is a duplicate and its handler must not run).
pub(crate) async fn claim_one<DB: Backend>(
    conn: &mut DB::Connection,
    q: &Queries,
    key: &PartitionKey,
    event_id: &str,
    offset: i64,
) -> Result<bool, sqlx::Error> {
    let claimed = DB::claim_events(conn, q, key, &[event_id], &[offset]).await?;
    Ok(!claimed.is_empty())
}

/// Runs `handler` for one claimed record of `group` on `conn`, as try `attempt`, and
/// classifies how it failed: the handler's `Retry` and a run past [`Handler::timeout`] are
/// transient; its `Reject` and a panic are permanent failures of the record (a panic is logged
/// here).
pub(crate) async fn handle_record<H: Handler<DB>, DB: Backend>(
    handler: &H,
    conn: &mut DB::Connection,
    group: &str,
    record: Record<'_>,
    event: H::Event,
    attempt: u32,
    schema: &str,
) -> Result<(), RecordFailure> {
    match run_handler(handler, conn, group, record, event, attempt, schema).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(HandlerError::Retry { source, after })) => {
            Err(RecordFailure::Transient { source, after })
        }
        Ok(Err(HandlerError::Reject { source })) => Err(RecordFailure::Permanent(Failure {
            kind: FailureKind::Rejected,
            error: error_chain(source.as_ref()),
            attempts: 1,
        })),
        Err(panic) => {
            tracing::error!(
                topic = %record.topic(),
                partition = record.partition(),
                offset = record.offset(),
                event_id = record.event_id(),
                "{panic}"
            );
            Err(RecordFailure::Permanent(Failure {
                kind: FailureKind::Panicked,
                error: panic,
                attempts: 1,
            }))
        }
    }
}

/// Runs `handler` for one record of `group` on `conn` as try `attempt` of its batch, catching
/// a panic (`Err(message)`) and bounding it by [`Handler::timeout`] (a time-out is returned as
/// the transient `Ok(Err(Retry…))`). `Ok(Err(…))` keeps the handler's own error.
///
/// The handler runs in a `record` span with the OpenTelemetry messaging attributes; with the
/// `otel` feature, the record's `traceparent`/`tracestate` headers are its parent.
pub(crate) async fn run_handler<H: Handler<DB>, DB: Backend>(
    handler: &H,
    conn: &mut DB::Connection,
    group: &str,
    record: Record<'_>,
    event: H::Event,
    attempt: u32,
    schema: &str,
) -> Result<Result<(), HandlerError>, String> {
    let span = tracing::debug_span!(
        "record",
        topic = %record.topic(),
        partition = record.partition(),
        offset = record.offset(),
        event_id = %record.event_id(),
        otel.kind = "consumer",
        messaging.system = "kafka",
        messaging.operation.type = "process",
        messaging.destination.name = %record.topic(),
        messaging.destination.partition.id = %record.partition(),
        messaging.kafka.offset = record.offset(),
        messaging.consumer.group.name = group,
        messaging.message.id = %record.event_id(),
    );
    #[cfg(feature = "otel")]
    crate::trace_context::adopt_parent(&span, record.headers());
    let limit = handler.timeout();
    let mut ctx = Context::new(conn, record, attempt).in_schema(schema);
    let call = tracing::Instrument::instrument(handler.handle(&mut ctx, event), span);
    match tokio::time::timeout(limit, AssertUnwindSafe(call).catch_unwind()).await {
        Ok(Ok(result)) => Ok(result),
        Ok(Err(payload)) => Err(panic_message(payload.as_ref())),
        Err(_) => Ok(Err(HandlerError::retry(TimedOut(limit)))),
    }
}

pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        format!("the handler panicked: {s}")
    } else if let Some(s) = payload.downcast_ref::<String>() {
        format!("the handler panicked: {s}")
    } else {
        "the handler panicked".to_owned()
    }
}

// ---------------------------------------------------------------------------------------------
// Types.
// ---------------------------------------------------------------------------------------------

/// What a [`PartitionWriter`] needs that is the same for every partition.
pub(crate) struct WriterConfig<H: Handler<DB>, DB: Backend> {
    /// The user's handler.
    pub(crate) handler: Arc<H>,
    /// The database pool.
    pub(crate) pool: Pool<DB>,
    /// The runtime's SQL for its schema.
    pub(crate) queries: Queries,
    /// The delivery guarantee.
    pub(crate) guarantee: Guarantee,
    /// Where event ids come from.
    pub(crate) event_id: EventId<H::Event>,
}

/// How a batch ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum BatchOutcome {
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
pub(crate) enum BatchError {
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
    /// rejected by the handler (a writer that parks failures returns this only when the
    /// record could not be parked either).
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

/// A record that failed permanently and was parked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Parked {
    /// Where the record is.
    pub(crate) at: Coordinates,
    /// Its event id, when it has one.
    pub(crate) event_id: Option<String>,
    /// What kind of failure.
    pub(crate) kind: FailureKind,
    /// The error, as text.
    pub(crate) error: String,
    /// How many times its handler ran and failed (1 unless retries were exhausted; 0 when the
    /// handler never ran: undecodable, no event id).
    pub(crate) attempts: u32,
}

/// A record's permanent failure: what is written to its dead letter.
#[derive(Debug, Clone)]
pub(crate) struct Failure {
    pub(crate) kind: FailureKind,
    pub(crate) error: String,
    pub(crate) attempts: u32,
}

/// A record of the batch, decoded and identified before the transaction opens.
struct Prepared<'m, E> {
    message: &'m OwnedMessage,
    event: Option<E>,
    id: Option<String>,
    /// Set when the record is to be parked without running its handler.
    failure: Option<Failure>,
}

/// How one record's handler call failed ([`handle_record`]).
pub(crate) enum RecordFailure {
    /// Worth retrying: the handler asked for a retry (or ran out of time). The batch rolls back.
    Transient {
        /// The cause.
        source: BoxError,
        /// The least time to wait, if the handler named one.
        after: Option<Duration>,
    },
    /// The record failed permanently.
    Permanent(Failure),
}

/// Why the fast path ended without committing.
enum Abort {
    /// Give up the batch (the caller may retry it).
    Batch(BatchError),
    /// The handler of `prepared[index]` failed permanently: run the batch again on the slow
    /// path, parking that record.
    Failed { index: usize, failure: Failure },
}

impl From<BatchError> for Abort {
    fn from(e: BatchError) -> Self {
        Abort::Batch(e)
    }
}

/// What a committed handler transaction did.
struct Applied {
    applied: usize,
    parked: Vec<Parked>,
    /// How long the transaction's `COMMIT` took.
    commit: Duration,
}
