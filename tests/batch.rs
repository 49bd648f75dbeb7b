//! The whole runtime with a batch handler (`Runtime::batch_builder`), against the mock broker,
//! on both databases: one call per partition batch, every record applied exactly once (the
//! effect is `count = count + 1`), a poison record found by splitting its batch and parked,
//! and a crash between batches losing and duplicating nothing. The batch handler's unit of work
//! itself (reject by index, poison first, middle and last, panics, retries) is tested inside
//! the crate, in `crates/consumer-runtime/src/unit/batch/tests.rs`.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use consumer_runtime::sqlx::Pool;
use consumer_runtime::testing::{self, TestRecord};
use consumer_runtime::{
    Batch, BatchHandler, Batched, FailureKind, HandlerError, Json, RetryPolicy, Runtime,
    RuntimeBuilder,
};
use testkit::*;

testkit::mock_broker_entry!();

/// Applies the non-idempotent test effect for every record of its batch; rejects the whole
/// call (naming no record) when the batch holds the poison id. Records each call's size.
#[derive(Clone)]
struct BatchCounter {
    group: String,
    poison: Option<String>,
    /// Reject the poison record by index (`batch.reject`) instead of failing the whole call.
    by_index: bool,
    /// Fail the whole call with a retry (for ever) instead of a rejection.
    retry: bool,
    /// How long each call waits before returning (to give a crash time to land mid-stream).
    delay: Duration,
    sizes: Arc<Mutex<Vec<usize>>>,
}

impl BatchCounter {
    fn new(group: &str, poison: Option<String>) -> Self {
        BatchCounter {
            group: group.to_owned(),
            poison,
            by_index: false,
            retry: false,
            delay: Duration::ZERO,
            sizes: Arc::new(Mutex::new(Vec::new())),
        }
    }

    fn largest_call(&self) -> usize {
        self.sizes
            .lock()
            .unwrap()
            .iter()
            .copied()
            .max()
            .unwrap_or(0)
    }
}

impl<DB: TestDb> BatchHandler<DB> for BatchCounter {
    type Event = Json<serde_json::Value>;

    async fn handle_batch(
        &self,
        conn: &mut DB::Connection,
        batch: &Batch<'_, Json<serde_json::Value>>,
    ) -> Result<(), HandlerError> {
        self.sizes.lock().unwrap().push(batch.len());
        let mut poisoned = false;
        for (i, (record, Json(event))) in batch.iter().enumerate() {
            assert_eq!(event["id"].as_str(), Some(record.event_id()));
            if self.poison.as_deref() == Some(record.event_id()) {
                if self.by_index {
                    batch.reject(i, "test rejects this one");
                    continue;
                }
                poisoned = true;
            }
            DB::apply_effect(conn, &self.group, record.event_id()).await?;
        }
        tokio::time::sleep(self.delay).await;
        if poisoned && self.retry {
            return Err(HandlerError::retry("test fails the batch"));
        }
        if poisoned {
            return Err(HandlerError::reject("test rejects the batch"));
        }
        Ok(())
    }
}

struct Running {
    stop: consumer_runtime::ShutdownHandle,
    task: tokio::task::JoinHandle<consumer_runtime::Result<()>>,
}

type Builder<DB> = RuntimeBuilder<Batched<BatchCounter>, DB>;

fn start<DB: TestDb>(kafka: &Kafka, pool: &Pool<DB>, topic: &str, h: &BatchCounter) -> Running {
    start_with(kafka, pool, topic, h, |rt| rt)
}

fn start_with<DB: TestDb>(
    kafka: &Kafka,
    pool: &Pool<DB>,
    topic: &str,
    h: &BatchCounter,
    configure: impl FnOnce(Builder<DB>) -> Builder<DB>,
) -> Running {
    let rt = Runtime::batch_builder(h.clone())
        .pool(pool.clone())
        .brokers(kafka.bootstrap.clone())
        .topic(topic)
        .group(&h.group)
        .batch_size(40)
        .handle_signals(false)
        .kafka_config("session.timeout.ms", "6000")
        .kafka_config("heartbeat.interval.ms", "500");
    let rt = configure(rt).build().expect("build the runtime");
    Running {
        stop: rt.shutdown_handle(),
        task: tokio::spawn(rt.run()),
    }
}

async fn a_batch_handler_applies_every_record_once_and_parks_the_poison<DB: TestDb>() {
    let pool = DB::pool().await;
    let (kafka, topic, group, records, all) = produced("batchrt", 2, 300, 30);
    let bad = format!("{topic}-17");
    let handler = BatchCounter::new(&group, Some(bad.clone()));
    let running = start(&kafka, &pool, &topic, &handler);
    wait_caught_up(&pool, &group, &topic, &ends_of(&records)).await;
    running.stop.shutdown();
    running
        .task
        .await
        .unwrap()
        .expect("the runtime stops cleanly");

    let letters = store(&pool)
        .dead_letters()
        .list(&group, None)
        .await
        .unwrap();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].event_id.as_deref(), Some(bad.as_str()));
    assert_eq!(letters[0].kind, FailureKind::Rejected);
    let expected: Vec<String> = all.into_iter().filter(|i| *i != bad).collect();
    assert_exactly_once(&effect_counts(&pool, &group).await, &expected);
    assert!(!DB::in_ledger(&pool, &group, &bad).await);
    assert_eq!(ledger_rows(&pool, &group).await, expected.len() as i64);
    assert!(
        handler.largest_call() > 1,
        "the handler was called per record, not per batch"
    );
}

async fn a_crash_between_batch_calls_applies_nothing_twice<DB: TestDb>() {
    let pool = DB::pool().await;
    let (kafka, topic, group, records, all) = produced("batchcrash", 2, 400, 40);
    let mut handler = BatchCounter::new(&group, None);
    handler.delay = Duration::from_millis(100);
    let first = start(&kafka, &pool, &topic, &handler);
    // Crash (drop everything, in-flight transactions roll back) once some batches committed.
    wait_until(
        Duration::from_secs(60),
        "a first committed batch",
        || async { !stored_offsets(&pool, &group).await.is_empty() },
    )
    .await;
    first.task.abort();
    let _ = first.task.await;
    let seen: HashSet<String> = effect_counts(&pool, &group).await.into_keys().collect();
    assert!(
        seen.len() < all.len(),
        "the crash came too late to test anything"
    );

    let second = start(&kafka, &pool, &topic, &handler);
    wait_caught_up(&pool, &group, &topic, &ends_of(&records)).await;
    second.stop.shutdown();
    second
        .task
        .await
        .unwrap()
        .expect("the runtime stops cleanly");
    assert_exactly_once(&effect_counts(&pool, &group).await, &all);
    assert_eq!(ledger_rows(&pool, &group).await, all.len() as i64);
}

/// A batch whose call asks for a retry every time is retried `max_attempts` times, then split
/// to find the record that keeps failing, which is parked as `retries_exhausted`; the rest of
/// the topic is applied once and the consumer goes on.
async fn a_batch_that_never_stops_asking_for_a_retry_parks_its_culprit<DB: TestDb>() {
    let pool = DB::pool().await;
    let (kafka, topic, group, records, all) = produced("batchretry", 2, 120, 0);
    let bad = format!("{topic}-33");
    let mut handler = BatchCounter::new(&group, Some(bad.clone()));
    handler.retry = true;
    let running = start_with(&kafka, &pool, &topic, &handler, |rt| {
        rt.retry_policy(RetryPolicy {
            initial_delay: Duration::from_millis(10),
            max_delay: Duration::from_millis(20),
            max_attempts: Some(3),
        })
    });
    wait_caught_up(&pool, &group, &topic, &ends_of(&records)).await;
    running.stop.shutdown();
    running
        .task
        .await
        .unwrap()
        .expect("the runtime stops cleanly");

    let letters = store(&pool)
        .dead_letters()
        .list(&group, None)
        .await
        .unwrap();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].event_id.as_deref(), Some(bad.as_str()));
    assert_eq!(letters[0].kind, FailureKind::RetriesExhausted);
    assert_eq!(letters[0].attempts, 3);
    let expected: Vec<String> = all.into_iter().filter(|i| *i != bad).collect();
    assert_exactly_once(&effect_counts(&pool, &group).await, &expected);
    assert!(!DB::in_ledger(&pool, &group, &bad).await);
}

/// `testing::handle_batch`, the public way to unit-test a batch handler: one call, committed,
/// with the indices it rejected; a call that fails names no record and commits nothing.
async fn testing_handle_batch_commits_the_call_and_returns_the_rejected<DB: TestDb>() {
    let pool = DB::pool().await;
    let group = rand_name("g");
    let ids: Vec<String> = (0..3).map(|i| format!("{group}-{i}")).collect();
    let records = || -> Vec<TestRecord> {
        ids.iter()
            .map(|id| TestRecord::json(&serde_json::json!({ "id": id })).event_id(id))
            .collect()
    };
    let mut handler = BatchCounter::new(&group, Some(ids[1].clone()));
    let failed = testing::handle_batch(&handler, &pool, records()).await;
    assert!(
        matches!(failed, Err(HandlerError::Reject { .. })),
        "{failed:?}"
    );
    assert!(
        effect_counts(&pool, &group).await.is_empty(),
        "a failed call committed"
    );

    handler.by_index = true;
    let rejected = testing::handle_batch(&handler, &pool, records())
        .await
        .unwrap();
    assert_eq!(rejected.len(), 1);
    assert_eq!(rejected[0].0, 1);
    assert_eq!(rejected[0].1.to_string(), "test rejects this one");
    assert_exactly_once(
        &effect_counts(&pool, &group).await,
        &[ids[0].clone(), ids[2].clone()],
    );
}

suite!(
    a_batch_that_never_stops_asking_for_a_retry_parks_its_culprit,
    testing_handle_batch_commits_the_call_and_returns_the_rejected,
    a_batch_handler_applies_every_record_once_and_parks_the_poison,
    a_crash_between_batch_calls_applies_nothing_twice,
);
