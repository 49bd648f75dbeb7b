//! The handler transaction for a [`BatchHandler`](crate::handler::BatchHandler) (a
//! [`Batched`](crate::handler::Batched) handler): one call per batch instead of one per record.
//!
//! ```text
//! BEGIN; fence; claim (as for a per-record handler); park the records known to fail
//!   handler.handle_batch(&mut tx, every newly claimed record)
//!   Ok     -> unclaim and park the records it rejected; COMMIT
//!   Retry  -> ROLLBACK; the caller backs off and retries the batch
//!   Reject or panic (no record named) -> ROLLBACK; split:
//! ```
//!
//! A failure of the whole call names no record, so the batch is split in two halves at the
//! middle of its claimed records, and each half runs as a transaction of its own (fence over
//! that half, claim, one call, commit), the first half first; a half that fails is split
//! again. A half with a single claimed record that fails has found its culprit: it runs once
//! more with that record parked (its handler does not run again) and commits. Every half that
//! commits moves the stored offset over itself, so the offset only ever moves forward, and a
//! crash between halves resumes after the last committed one. A poison record among `n`
//! costs about `2·log2(n)` extra calls; records that fail alone are parked, everything else
//! commits once.
//!
//! A retry is blamed on no record either: it rolls the batch back for the worker to retry
//! with backoff, counted against the batch's first record. When the worker's retry policy
//! gives up on that record ([`PartitionWriter::give_up`]), the next write of the batch runs in
//! search mode: a retry then counts as a failure naming no record, so the batch is split the
//! same way and the record whose call still asks for a retry alone is parked as
//! `retries_exhausted`.

use std::panic::AssertUnwindSafe;
use std::time::Duration;

use futures_util::FutureExt as _;
use rdkafka::Message;

use super::{Applied, BatchError, Failure, PartitionWriter, Prepared, db_error, panic_message};
use crate::error::{BoxError, FailureKind, error_chain};
use crate::handler::{Batch, Decode, Handler, HandlerError, Record, TimedOut};
use crate::store::Backend;

#[cfg(test)]
mod tests;

/// How one transaction over a run of the batch ended without committing.
enum Abort {
    /// Give up the batch (the caller may retry it).
    Batch(BatchError),
    /// The call failed without naming a record: `candidates` are the indices (within the run)
    /// of the records it was called with.
    Whole {
        candidates: Vec<usize>,
        failure: Failure,
    },
}

impl From<BatchError> for Abort {
    fn from(e: BatchError) -> Self {
        Abort::Batch(e)
    }
}

impl<H: Handler<DB>, DB: Backend> PartitionWriter<H, DB> {
    /// The handler transaction of a batch handler, with poison isolation by splitting (see the
    /// [module](self) documentation). `fence`: the offset to advance to (effectively-once;
    /// each committed half advances over itself); `ledger`: whether to claim event ids.
    /// `None`: fenced. On an error, the halves committed before it stay committed and the
    /// writer's position has moved past them.
    pub(super) async fn run_batch(
        &mut self,
        prepared: &mut [Prepared<'_, H::Event>],
        fence: Option<i64>,
        ledger: bool,
    ) -> Result<Option<Applied>, BatchError> {
        let mut total = Applied {
            applied: 0,
            parked: Vec::new(),
            commit: Duration::ZERO,
        };
        // The retry policy gave up on this batch (its call kept asking for a retry): a retry is
        // now a failure naming no record, and splitting finds the record that keeps failing.
        let exhausted = match self.park {
            true => self.given_up.first().map(|(_, f)| f.attempts),
            false => None,
        };
        // Runs still to do, as ranges of `prepared`, the next one last.
        let mut pending = vec![(0, prepared.len())];
        while let Some((lo, hi)) = pending.pop() {
            let run = &mut prepared[lo..hi];
            let end = run.last().map(|p| p.message.offset() + 1);
            let run_fence = fence.and(end);
            match self.batch_attempt(run, run_fence, ledger, exhausted).await {
                Ok(None) => return Ok(None),
                Ok(Some(done)) => {
                    total.applied += done.applied;
                    total.parked.extend(done.parked);
                    total.commit += done.commit;
                    if run_fence.is_some() {
                        self.position = run_fence;
                    }
                }
                Err(Abort::Batch(e)) => {
                    self.parked = total.parked;
                    return Err(e);
                }
                Err(Abort::Whole {
                    candidates,
                    failure,
                }) => {
                    if !self.park {
                        let at = self.coordinates(run[candidates[0]].message.offset());
                        return Err(BatchError::Permanent {
                            at,
                            kind: failure.kind,
                            source: failure.error.into(),
                        });
                    }
                    if let [culprit] = candidates[..] {
                        run[culprit].failure = Some(failure);
                        pending.push((lo, hi));
                    } else {
                        let mid = lo + candidates[candidates.len() / 2];
                        tracing::debug!(
                            topic = %self.key.topic,
                            partition = self.key.partition,
                            records = candidates.len(),
                            error = %failure.error,
                            "the batch handler failed naming no record; splitting the batch"
                        );
                        pending.push((mid, hi));
                        pending.push((lo, mid));
                    }
                }
            }
        }
        Ok(Some(total))
    }

    /// One transaction over `run`: open it (fence, claim), park the records known to fail,
    /// call the batch handler once with the newly claimed rest, park what it rejected, commit.
    /// `exhausted`: the attempts after which the retry policy gave up on the batch, if it did;
    /// then a retry counts as a failure naming no record (`retries_exhausted`).
    async fn batch_attempt(
        &self,
        run: &mut [Prepared<'_, H::Event>],
        fence: Option<i64>,
        ledger: bool,
        exhausted: Option<u32>,
    ) -> Result<Option<Applied>, Abort> {
        let cfg = &*self.config;
        let Some((mut tx, claimed)) = self.open(run, fence, ledger).await? else {
            return Ok(None);
        };
        let mut parked = Vec::new();
        let mut candidates = Vec::with_capacity(run.len());
        for (index, p) in run.iter_mut().enumerate() {
            if let Some(failure) = &p.failure {
                parked.push(
                    self.park(&mut tx, p.message, p.id.as_deref(), failure.clone())
                        .await?,
                );
                continue;
            }
            if ledger && claimed.binary_search(&index).is_err() {
                continue; // a duplicate
            }
            if p.event.is_none() {
                // Taken by an earlier call that did not give it back: decode it again.
                match H::Event::decode(p.message.payload()) {
                    Ok(e) => p.event = Some(e),
                    Err(e) => {
                        let failure = Failure {
                            kind: FailureKind::Undecodable,
                            error: error_chain(e.as_ref()),
                            attempts: 0,
                        };
                        let _ = tx.rollback().await;
                        return Err(Abort::Whole {
                            candidates: vec![index],
                            failure,
                        });
                    }
                }
            }
            candidates.push(index);
        }
        if candidates.is_empty() {
            return Ok(Some(self.commit(tx, 0, parked).await?));
        }

        let events: Vec<H::Event> = candidates
            .iter()
            .map(|&i| run[i].event.take().expect("decoded above"))
            .collect();
        let records: Vec<Record<'_>> = candidates
            .iter()
            .map(|&i| Record::new(run[i].message, run[i].id.as_deref().unwrap_or_default()))
            .collect();
        let first = run[candidates[0]].message.offset();
        let batch = Batch::new(records, events, self.attempt);
        let (result, batch) = self.call(&mut *tx, batch, first).await;
        // A call that panicked or timed out took the events with it; they are decoded again
        // if needed.
        let rejected = match batch {
            Some(batch) => {
                let (events, rejected) = batch.into_parts();
                for (&i, e) in candidates.iter().zip(events) {
                    run[i].event = Some(e);
                }
                rejected
            }
            None => Vec::new(),
        };

        let failure = match result {
            Ok(()) => None,
            Err(Failed::Retry { source, .. }) if let Some(attempts) = exhausted => Some(Failure {
                kind: FailureKind::RetriesExhausted,
                error: format!(
                    "{} (its batch failed {attempts} times)",
                    error_chain(source.as_ref())
                ),
                attempts,
            }),
            Err(Failed::Retry { source, after }) => {
                let _ = tx.rollback().await;
                return Err(Abort::Batch(BatchError::Transient {
                    // The retry policy counts attempts against the batch's first record; once
                    // it gives up (`give_up`), the batch is searched for the culprit.
                    at: Some(self.coordinates(first)),
                    infrastructure: crate::error::is_infrastructure(source.as_ref()),
                    after,
                    source,
                }));
            }
            Err(Failed::Whole(failure)) => Some(failure),
        };
        if let Some(failure) = failure {
            let _ = tx.rollback().await;
            return Err(Abort::Whole {
                candidates,
                failure,
            });
        }

        for (k, source) in &rejected {
            let (message, id) = (run[candidates[*k]].message, run[candidates[*k]].id.clone());
            let failure = Failure {
                kind: FailureKind::Rejected,
                error: error_chain(source.as_ref()),
                attempts: 1,
            };
            if !self.park {
                let _ = tx.rollback().await;
                return Err(Abort::Batch(BatchError::Permanent {
                    at: self.coordinates(message.offset()),
                    kind: failure.kind,
                    source: failure.error.into(),
                }));
            }
            if ledger {
                DB::unclaim(
                    &mut tx,
                    &cfg.queries,
                    &self.key.group,
                    id.as_deref().unwrap_or_default(),
                )
                .await
                .map_err(db_error)?;
            }
            parked.push(self.park(&mut tx, message, id.as_deref(), failure).await?);
        }
        let applied = candidates.len() - rejected.len();
        Ok(Some(self.commit(tx, applied, parked).await?))
    }

    /// Calls the batch handler under its time limit, catching a panic, and classifies how it
    /// failed. The batch comes back unless the call panicked or timed out.
    async fn call<'b>(
        &self,
        conn: &mut DB::Connection,
        batch: Batch<'b, H::Event>,
        first: i64,
    ) -> (Result<(), Failed>, Option<Batch<'b, H::Event>>) {
        let handler = &*self.config.handler;
        let records = batch.len();
        let span = tracing::debug_span!(
            "handle_batch",
            topic = %self.key.topic,
            partition = self.key.partition,
            first_offset = first,
            records
        );
        let limit = handler.timeout();
        let call = tracing::Instrument::instrument(handler.__handle_batch(conn, batch), span);
        let outcome = tokio::time::timeout(limit, AssertUnwindSafe(call).catch_unwind()).await;
        match outcome {
            Ok(Ok((result, batch))) => {
                let result = match result {
                    Ok(()) => Ok(()),
                    Err(HandlerError::Retry { source, after }) => {
                        Err(Failed::Retry { source, after })
                    }
                    Err(HandlerError::Reject { source }) => Err(Failed::Whole(Failure {
                        kind: FailureKind::Rejected,
                        error: error_chain(source.as_ref()),
                        attempts: 1,
                    })),
                };
                (result, Some(batch))
            }
            Ok(Err(payload)) => {
                let panic = panic_message(payload.as_ref());
                tracing::error!(
                    topic = %self.key.topic,
                    partition = self.key.partition,
                    first_offset = first,
                    records,
                    "{panic}"
                );
                let failure = Failure {
                    kind: FailureKind::Panicked,
                    error: panic,
                    attempts: 1,
                };
                (Err(Failed::Whole(failure)), None)
            }
            Err(_) => {
                let retry = Failed::Retry {
                    source: Box::new(TimedOut(limit)),
                    after: None,
                };
                (Err(retry), None)
            }
        }
    }
}

/// How a batch handler's call failed.
enum Failed {
    /// Transient: roll back, retry the batch.
    Retry {
        source: BoxError,
        after: Option<Duration>,
    },
    /// Permanent, naming no record: split the batch.
    Whole(Failure),
}
