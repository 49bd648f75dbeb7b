//! A partition's worker, and what happens to its records: it batches them, commits each batch
//! through the unit of work ([`crate::unit`]), and decides after a failure — retry with
//! backoff, wait for the database, give a record up (park it) after `max_attempts`, or stop
//! when the circuit breaker trips.

use std::time::Instant;

use rdkafka::Message;
use rdkafka::message::OwnedMessage;
use tokio::sync::{mpsc, watch};
use tracing::{Instrument, debug, error, warn};

use super::bump;
use super::partitions::Core;
use crate::error::Error;
use crate::handler::Handler;
use crate::store::Backend;
use crate::telemetry::PartitionMetrics;
use crate::unit::{BatchError, BatchOutcome, PartitionWriter};

impl<H: Handler<DB>, DB: Backend> Core<H, DB> {
    /// A partition's worker: batches its records and commits them, retrying transient failures.
    pub(super) async fn work(
        &self,
        mut writer: PartitionWriter<H, DB>,
        mut rx: mpsc::Receiver<OwnedMessage>,
        mut stop: watch::Receiver<bool>,
        metrics: &PartitionMetrics,
    ) -> Exit {
        let mut batch = Vec::with_capacity(self.options.batch_size);
        loop {
            tokio::select! {
                biased;
                _ = stop.wait_for(|s| *s) => return Exit::Stopped,
                m = rx.recv() => match m {
                    Some(m) => batch.push(m),
                    None => return Exit::Stopped,
                },
            }
            let deadline = tokio::time::Instant::now() + self.options.batch_wait;
            while batch.len() < self.options.batch_size {
                match rx.try_recv() {
                    Ok(m) => {
                        batch.push(m);
                        continue;
                    }
                    Err(mpsc::error::TryRecvError::Disconnected) => break,
                    Err(mpsc::error::TryRecvError::Empty) => {}
                }
                tokio::select! {
                    biased;
                    _ = stop.wait_for(|s| *s) => return Exit::Stopped,
                    _ = tokio::time::sleep_until(deadline) => break,
                    m = rx.recv() => match m {
                        Some(m) => batch.push(m),
                        None => break,
                    },
                }
            }
            if let Some(exit) = self.commit(&mut writer, &batch, &mut stop, metrics).await {
                return exit;
            }
            batch.clear();
        }
    }

    /// Feeds a committed batch's outcomes, in offset order, to the circuit breaker; an error
    /// when it trips.
    fn check_breaker(
        &self,
        writer: &PartitionWriter<H, DB>,
        batch: &[OwnedMessage],
    ) -> Option<Error> {
        let (limits, state) = (&self.options.circuit_breaker, &self.breaker);
        if limits.max_consecutive.is_none() && limits.ratio.is_none() {
            return None;
        }
        let parked = writer.parked();
        let mut state = state.lock().unwrap_or_else(|e| e.into_inner());
        let mut tripped = None;
        for m in batch {
            let p = parked.iter().find(|p| p.at.offset == m.offset());
            // The first trip says why; the rest of the batch is committed all the same.
            if let Some(why) = state.record(limits, p.is_some())
                && tripped.is_none()
            {
                tripped = Some((why, p.or(parked.last())));
            }
        }
        let (why, Some(last)) = tripped? else {
            return None;
        };
        error!(why = %why, last = %last.at, "circuit breaker open: stopping the consumer");
        Some(Error::CircuitOpen {
            why,
            at: last.at.clone(),
            reason: last.error.clone(),
        })
    }

    /// Commits one batch, retrying transient failures with backoff. `Some` ends the worker.
    async fn commit(
        &self,
        writer: &mut PartitionWriter<H, DB>,
        batch: &[OwnedMessage],
        stop: &mut watch::Receiver<bool>,
        metrics: &PartitionMetrics,
    ) -> Option<Exit> {
        let key = writer.key().clone();
        let span = tracing::debug_span!(
            "batch",
            topic = %key.topic,
            partition = key.partition,
            first_offset = batch.first().map(|m| m.offset()),
            last_offset = batch.last().map(|m| m.offset()),
            size = batch.len(),
        );
        let mut attempt = 0u32;
        let started = Instant::now();
        loop {
            let permit = tokio::select! {
                biased;
                _ = stop.wait_for(|s| *s) => return Some(Exit::Stopped),
                p = self.permits.clone().acquire_owned() => p.expect("the semaphore is never closed"),
            };
            // Once started, a batch is finished (committed or rolled back) even if a stop
            // arrives meanwhile: revocation and shutdown wait for it.
            let result = writer.write(batch).instrument(span.clone()).await;
            drop(permit);
            match result {
                Ok(BatchOutcome::Committed {
                    applied,
                    duplicates,
                    lost,
                    next_offset,
                }) => {
                    bump(&self.stats.applied, applied);
                    bump(&self.stats.duplicates, duplicates);
                    bump(&self.stats.lost, lost);
                    bump(&self.stats.parked, writer.parked().len());
                    bump(&self.stats.batches, 1);
                    metrics.processed.increment(applied as u64);
                    metrics.duplicate.increment(duplicates as u64);
                    metrics.lost.increment(lost as u64);
                    metrics.parked.increment(writer.parked().len() as u64);
                    metrics.batch_size.record(batch.len() as f64);
                    metrics.batch_duration.record(started.elapsed());
                    metrics.commit_duration.record(writer.commit_duration());
                    metrics.set_stored(next_offset);
                    debug!(parent: &span, applied, duplicates, parked = writer.parked().len(), next_offset, "batch committed");
                    return self.check_breaker(writer, batch).map(Exit::Failed);
                }
                Ok(BatchOutcome::Empty) => return None,
                Ok(BatchOutcome::Fenced) => {
                    bump(&self.stats.fenced, 1);
                    metrics.fenced.increment(1);
                    warn!(parent: &span, epoch = writer.epoch(), "commit fenced: the partition's epoch or offset changed (rebalance or replay); reloading");
                    return Some(Exit::Fenced);
                }
                // The writer parks failing records; this one could not be parked either.
                Err(BatchError::Permanent { at, kind, source }) => {
                    return Some(Exit::Failed(Error::RecordFailed {
                        at,
                        kind,
                        reason: source.to_string(),
                    }));
                }
                Err(BatchError::Transient {
                    at,
                    infrastructure,
                    after,
                    source,
                }) => {
                    attempt += 1;
                    bump(&self.stats.retries, 1);
                    metrics.retried.increment(batch.len() as u64);
                    if let (Some(at), false, Some(max)) =
                        (&at, infrastructure, self.options.retry_policy.max_attempts)
                        && attempt >= max
                    {
                        // Park the record (with the rest of the batch committing) and go on.
                        warn!(parent: &span, attempt, error = %source, record = %at, "retries exhausted; parking the record");
                        writer.give_up(
                            at,
                            format!(
                                "{} (after {attempt} attempts)",
                                crate::error::error_chain(source.as_ref())
                            ),
                            attempt,
                        );
                        attempt = 0;
                        continue;
                    }
                    let delay = self
                        .options
                        .retry_policy
                        .delay(attempt)
                        .max(after.unwrap_or_default());
                    if infrastructure {
                        // A pool that timed out hides why; one direct attempt tells.
                        let cause = match source.downcast_ref::<sqlx::Error>() {
                            Some(sqlx::Error::PoolTimedOut) => {
                                crate::store::connect_error(&self.writer.pool)
                                    .await
                                    .map(|e| e.to_string())
                            }
                            _ => None,
                        };
                        warn!(parent: &span, attempt, ?delay, error = %source, cause, "the database is unreachable or failing; batch rolled back, waiting for the database before retrying");
                    } else {
                        warn!(parent: &span, attempt, ?delay, error = %source, record = ?at.map(|a| a.to_string()), "batch rolled back; retrying");
                    }
                    tokio::select! {
                        biased;
                        _ = stop.wait_for(|s| *s) => return Some(Exit::Stopped),
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }
}

pub(super) enum Exit {
    Stopped,
    Fenced,
    Failed(Error),
}
