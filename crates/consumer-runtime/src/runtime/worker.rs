//! A partition's worker, and what happens to its records: it batches them, commits each batch
//! through the unit of work ([`crate::unit`]), and decides after a failure — retry with
//! backoff, wait for the database, give a record up (park it) after `max_attempts`, or stop
//! when the circuit breaker trips.

use std::time::{Duration, Instant};

use rdkafka::Message;
use rdkafka::message::OwnedMessage;
use tokio::sync::{mpsc, watch};
use tracing::{Instrument, debug, error, warn};

use super::bump;
use super::partitions::Core;
use crate::config::RetryPolicy;
use crate::error::{Coordinates, Error};
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
            writer.set_attempt(attempt + 1);
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
                    let policy = &self.options.retry_policy;
                    let delay = match after_failure(
                        policy,
                        attempt,
                        at.as_ref(),
                        infrastructure,
                        after,
                    ) {
                        AfterFailure::Retry(delay) => delay,
                        AfterFailure::GiveUp(at) => {
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
                    };
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
}

/// What happens after a batch's `attempt`-th transient failure in a row.
#[derive(Debug, PartialEq)]
enum AfterFailure<'a> {
    /// Park this record (the rest of the batch commits without it) and write the batch again.
    GiveUp(&'a Coordinates),
    /// Roll the batch back, wait this long, and write it again.
    Retry(Duration),
}

/// The retry decision. A record's own failure (`at`) is given up on its `max_attempts`-th
/// attempt; a failure of the database (`infrastructure`), or one no record is to blame for,
/// is retried without limit: parking records because the database is down would empty the
/// topic into `dead_letters`. The wait is the policy's backoff, or the handler's
/// [`HandlerError::Retry`](crate::HandlerError::Retry) `after` if longer.
fn after_failure<'a>(
    policy: &RetryPolicy,
    attempt: u32,
    at: Option<&'a Coordinates>,
    infrastructure: bool,
    after: Option<Duration>,
) -> AfterFailure<'a> {
    if let (Some(at), false, Some(max)) = (at, infrastructure, policy.max_attempts)
        && attempt >= max
    {
        return AfterFailure::GiveUp(at);
    }
    AfterFailure::Retry(policy.delay(attempt).max(after.unwrap_or_default()))
}

pub(super) enum Exit {
    Stopped,
    Fenced,
    Failed(Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> Coordinates {
        Coordinates {
            topic: "t".into(),
            partition: 0,
            offset: 7,
        }
    }

    fn policy(max_attempts: Option<u32>) -> RetryPolicy {
        RetryPolicy {
            initial_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(1),
            max_attempts,
        }
    }

    #[test]
    fn a_failing_record_is_given_up_on_its_last_attempt_and_not_before() {
        let at = record();
        let three = policy(Some(3));
        for attempt in 1..3 {
            assert!(matches!(
                after_failure(&three, attempt, Some(&at), false, None),
                AfterFailure::Retry(_)
            ));
        }
        assert_eq!(
            after_failure(&three, 3, Some(&at), false, None),
            AfterFailure::GiveUp(&at)
        );
        assert!(matches!(
            after_failure(&policy(None), 1000, Some(&at), false, None),
            AfterFailure::Retry(_)
        ));
    }

    #[test]
    fn database_failures_and_unattributed_ones_are_retried_without_limit() {
        let at = record();
        let once = policy(Some(1));
        assert!(matches!(
            after_failure(&once, 50, Some(&at), true, None),
            AfterFailure::Retry(_)
        ));
        assert!(matches!(
            after_failure(&once, 50, None, false, None),
            AfterFailure::Retry(_)
        ));
    }

    #[test]
    fn the_wait_backs_off_up_to_the_cap_and_honours_a_longer_retry_after() {
        let p = policy(None);
        // The first retry waits 50–100 ms (up to half is jitter); later ones stop at the cap.
        let AfterFailure::Retry(first) = after_failure(&p, 1, None, false, None) else {
            panic!("retried")
        };
        assert!(first > Duration::from_millis(50) && first <= Duration::from_millis(100));
        let AfterFailure::Retry(late) = after_failure(&p, 30, None, true, None) else {
            panic!("retried")
        };
        assert!(late > Duration::from_millis(500) && late <= Duration::from_secs(1));
        let AfterFailure::Retry(asked) =
            after_failure(&p, 1, None, false, Some(Duration::from_secs(5)))
        else {
            panic!("retried")
        };
        assert_eq!(asked, Duration::from_secs(5));
    }
}
