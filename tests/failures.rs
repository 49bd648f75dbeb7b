//! Permanent failures: a record that cannot be applied is parked in `dead_letters` in the
//! transaction that advances the offset, the rest of its batch commits, and the consumer goes
//! on. These run the whole runtime; the unit of work's own parking (the fast and slow paths)
//! and redrive are tested inside the crate, in `crates/consumer-runtime/src/unit/tests.rs`.
//!
//! One suite, run against both backends (as in `tests/runtime.rs`): each behaviour is a generic
//! function over [`TestDb`], instantiated at the end as `postgres::<name>` and `sqlite::<name>`.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use consumer_runtime::dead_letters::DeadLetter;
use consumer_runtime::sqlx::Pool;
use consumer_runtime::{FailureKind, RetryPolicy};
use testkit::*;

testkit::mock_broker_entry!();

const WAIT: Duration = Duration::from_secs(60);

// ---- Helpers ---------------------------------------------------------------------------------

fn runtime<DB: TestDb>(
    kafka: &Kafka,
    pool: &Pool<DB>,
    handler: Counter,
    topic: &str,
    group: &str,
) -> consumer_runtime::RuntimeBuilder<Counter, DB> {
    test_runtime(kafka, pool, handler, topic).group(group)
}

async fn parked<DB: TestDb>(pool: &Pool<DB>, group: &str) -> Vec<DeadLetter> {
    store(pool).dead_letters().list(group, None).await.unwrap()
}

// ---- (a) a rejected record ---------------------------------------------------------------

/// The runtime: the consumer parks the record and keeps running; later records are applied.
async fn rejected_record_is_parked_and_the_consumer_keeps_running<DB: TestDb>() {
    let pool = DB::pool().await;
    let (kafka, topic, group, records, all) = produced("reject", 2, 20, 0);
    let bad = format!("{topic}-7");
    let mut handler = Counter::new(&group);
    handler.fail_on = Some((bad.clone(), true));
    let mut consumer = Consumer::start(&kafka, &pool, &topic, handler, |rt| rt.batch_size(100));
    let stats = consumer.stats.clone();
    consumer.wait_caught_up(&ends_of(&records)).await;

    // Still consuming: more records are applied.
    let (more, more_ids) = events_with_duplicates(&format!("{topic}-late"), 6, 2, 0);
    kafka.produce(&topic, &more);
    let mut ends = ends_of(&records);
    for (p, n) in ends_of(&more) {
        *ends.get_mut(&p).unwrap() += n;
    }
    consumer.wait_caught_up(&ends).await;
    consumer.stop().await;

    let letters = parked(&pool, &group).await;
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].event_id.as_deref(), Some(bad.as_str()));
    assert_eq!(letters[0].kind, FailureKind::Rejected);
    // Record i is at partition i % 2, offset i / 2.
    assert_eq!((letters[0].partition, letters[0].offset), (1, 3));
    assert_eq!(stats.snapshot().parked, 1);
    let mut expected: Vec<String> = all.into_iter().filter(|i| *i != bad).collect();
    expected.extend(more_ids);
    assert_exactly_once(&effect_counts(&pool, &group).await, &expected);
    assert!(!DB::in_ledger(&pool, &group, &bad).await);
    assert_eq!(ledger_rows(&pool, &group).await, expected.len() as i64);
}

// ---- Unusual records ---------------------------------------------------------------------------

/// A record without a key, one with an empty key, and a 3 MB record (beyond librdkafka's
/// default 1 MB per-partition fetch size, which it grows for a larger record) are ordinary
/// records: each is applied exactly once and nothing is parked.
async fn records_without_a_key_with_an_empty_key_or_oversized_are_applied_once<DB: TestDb>() {
    use consumer_runtime::rdkafka::message::{Header, OwnedHeaders};
    use consumer_runtime::rdkafka::producer::{BaseRecord, Producer};
    let pool = DB::pool().await;
    let kafka = Kafka::new();
    let topic = rand_name("unusual");
    let group = rand_name("g");
    kafka.create_topic(&topic, 1);
    let producer: consumer_runtime::rdkafka::producer::BaseProducer =
        consumer_runtime::rdkafka::config::ClientConfig::new()
            .set("bootstrap.servers", &kafka.bootstrap)
            .set("message.max.bytes", "10000000")
            .set(
                "batch.num.messages",
                if std::env::var_os(testkit::ONE_RECORD_PER_BATCH_ENV).is_some() {
                    "1"
                } else {
                    "10000"
                },
            )
            .create()
            .unwrap();
    let big = format!(r#"{{"blob":"{}"}}"#, "x".repeat(3_000_000));
    let ids: Vec<String> = ["nokey", "emptykey", "big"]
        .iter()
        .map(|n| format!("{topic}-{n}"))
        .collect();
    for (i, id) in ids.iter().enumerate() {
        let headers = OwnedHeaders::new().insert(Header {
            key: "event-id",
            value: Some(id.as_bytes()),
        });
        let payload = if i == 2 {
            big.as_str()
        } else {
            r#"{"small":true}"#
        };
        let mut record = BaseRecord::<str, str>::to(&topic)
            .partition(0)
            .payload(payload)
            .headers(headers);
        if i == 1 {
            record = record.key("");
        }
        producer.send(record).map_err(|(e, _)| e).unwrap();
    }
    producer.flush(Duration::from_secs(30)).unwrap();

    let mut consumer = Consumer::start(&kafka, &pool, &topic, Counter::new(&group), |rt| rt);
    let stats = consumer.stats.clone();
    consumer.wait_caught_up(&HashMap::from([(0, 3i64)])).await;
    consumer.stop().await;
    assert_exactly_once(&effect_counts(&pool, &group).await, &ids);
    assert_eq!(stats.snapshot().parked, 0);
    assert!(parked(&pool, &group).await.is_empty());
}

// ---- The circuit breaker ----------------------------------------------------------------------

/// 40 good records, then 60 undecodable ones (a bad deploy of the producer), then 40 good ones,
/// on one partition.
fn good_bad_good(topic: &str) -> (Vec<(i32, String, String)>, Vec<String>) {
    let (good, ids) = events_with_duplicates(topic, 80, 1, 0);
    let mut records: Vec<_> = good[..40].to_vec();
    records.extend((0..60).map(|i| (0, format!("{topic}-bad-{i}"), format!("not json {i}"))));
    records.extend(good[40..].iter().cloned());
    (records, ids)
}

async fn the_circuit_breaker_stops_the_consumer_when_parking_becomes_the_norm<DB: TestDb>() {
    let pool = DB::pool().await;
    let kafka = Kafka::new();
    let topic = rand_name("breaker");
    let group = rand_name("g");
    kafka.create_topic(&topic, 1);
    let (records, ids) = good_bad_good(&topic);
    kafka.produce(&topic, &records);
    let rt = runtime(&kafka, &pool, Counter::new(&group), &topic, &group)
        .batch_size(10)
        .circuit_breaker(consumer_runtime::CircuitBreaker {
            max_consecutive: Some(25),
            ratio: None,
        })
        .build()
        .unwrap();
    let err = tokio::time::timeout(WAIT, rt.run())
        .await
        .expect("the breaker must stop the consumer")
        .unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(err, consumer_runtime::Error::CircuitOpen { .. }),
        "{text}"
    );
    assert!(
        text.contains("25 records in a row were parked") && text.contains("redrive"),
        "{text}"
    );
    // It stopped inside the bad stretch: the 40 good records before it are applied, at least
    // 25 bad ones parked, and nothing after the batch that tripped it was touched.
    let letters = parked(&pool, &group).await;
    assert!(
        (25..35).contains(&letters.len()),
        "{} parked",
        letters.len()
    );
    let stored = stored_offsets(&pool, &group).await[&(topic.clone(), 0)];
    assert_eq!(stored, 40 + letters.len() as i64);
    assert_exactly_once(&effect_counts(&pool, &group).await, &ids[..40]);
}

async fn a_disabled_circuit_breaker_parks_the_whole_bad_stretch_and_goes_on<DB: TestDb>() {
    let pool = DB::pool().await;
    let kafka = Kafka::new();
    let topic = rand_name("nobreaker");
    let group = rand_name("g");
    kafka.create_topic(&topic, 1);
    let (records, ids) = good_bad_good(&topic);
    kafka.produce(&topic, &records);
    Consumer::start(&kafka, &pool, &topic, Counter::new(&group), |rt| {
        rt.batch_size(10)
            .circuit_breaker(consumer_runtime::CircuitBreaker::disabled())
    })
    .catch_up_and_stop(&records)
    .await;
    assert_eq!(parked(&pool, &group).await.len(), 60);
    assert_exactly_once(&effect_counts(&pool, &group).await, &ids);
}

// ---- The outside world fails ------------------------------------------------------------------

/// The broker goes down mid-stream for a few seconds and then fetches fail a few times: the
/// consumer waits, reconnects and continues, and every event is applied exactly once.
async fn a_broker_outage_mid_stream_loses_and_duplicates_nothing<DB: TestDb>() {
    if testkit::mock_only(
        "a_broker_outage_mid_stream_loses_and_duplicates_nothing",
        "takes the only broker down and injects fetch errors",
    ) {
        return;
    }
    use consumer_runtime::rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    let pool = DB::pool().await;
    let (kafka, topic, group, records, ids) = produced("outage", 2, 1500, 50);
    let counter = Counter::new(&group).with_delay(Duration::from_millis(2));
    let consumer = Consumer::start(&kafka, &pool, &topic, counter.clone(), |rt| {
        rt.batch_size(50)
    });
    wait_until(WAIT, "some progress", || async { counter.applied() >= 200 }).await;

    kafka.broker_down();
    assert!(counter.applied() < 1500, "the outage must come mid-stream");
    // The outage itself lasts a fixed time: that is the scenario, not a wait for a condition.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        consumer.is_running(),
        "the consumer gave up during the outage"
    );
    kafka.broker_up();
    kafka.request_errors(
        RDKafkaApiKey::Fetch,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION; 5],
    );

    consumer.catch_up_and_stop(&records).await;
    assert_exactly_once(&effect_counts(&pool, &group).await, &ids);
}

// ---- (b) records the handler never sees ------------------------------------------------------

// ---- (c) a handler that panics ---------------------------------------------------------------

async fn a_panicking_handler_parks_its_record_and_the_consumer_keeps_running<DB: TestDb>() {
    let pool = DB::pool().await;
    let (kafka, topic, group, records, all) = produced("panic", 2, 40, 8);
    // Not one of the producer duplicates (records 0, 5, 10, …).
    let bad = format!("{topic}-6");
    let mut handler = Counter::new(&group);
    handler.panic_on = Some(bad.clone());
    let consumer = Consumer::start(&kafka, &pool, &topic, handler.clone(), |rt| {
        rt.batch_size(10)
    });
    let stats = consumer.stats.clone();
    consumer.catch_up_and_stop(&records).await;

    let letters = parked(&pool, &group).await;
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].kind, FailureKind::Panicked);
    assert_eq!(letters[0].event_id.as_deref(), Some(bad.as_str()));
    assert!(
        letters[0].error.contains(&format!("test panics on {bad}")),
        "{}",
        letters[0].error
    );
    assert_eq!(stats.snapshot().parked, 1);
    let expected: Vec<String> = all.into_iter().filter(|i| *i != bad).collect();
    assert_exactly_once(&effect_counts(&pool, &group).await, &expected);
    // Records of the panicking batch before the panic ran twice (the slow path); their
    // effects did not.
    assert!(handler.applied() >= 39);
    assert!(!DB::in_ledger(&pool, &group, &bad).await);
}

// ---- (d) retries exhausted -------------------------------------------------------------------

async fn a_record_that_never_stops_failing_is_parked_after_max_attempts<DB: TestDb>() {
    let pool = DB::pool().await;
    let (kafka, topic, group, records, all) = produced("retry", 1, 12, 0);
    let bad = format!("{topic}-4");
    let mut handler = Counter::new(&group);
    handler.fail_on = Some((bad.clone(), false));
    let consumer = Consumer::start(&kafka, &pool, &topic, handler, |rt| {
        rt.batch_size(5).retry_policy(RetryPolicy {
            initial_delay: Duration::from_millis(10),
            max_delay: Duration::from_millis(20),
            max_attempts: Some(3),
        })
    });
    let stats = consumer.stats.clone();
    consumer.catch_up_and_stop(&records).await;

    let letters = parked(&pool, &group).await;
    assert_eq!(letters.len(), 1, "{letters:?}");
    let l = &letters[0];
    assert_eq!((l.offset, l.kind), (4, FailureKind::RetriesExhausted));
    assert_eq!(l.attempts, 3);
    assert!(
        l.error.contains(&format!("test fails {bad}")),
        "{}",
        l.error
    );
    assert!(stats.snapshot().retries >= 3);
    let expected: Vec<String> = all.into_iter().filter(|i| *i != bad).collect();
    assert_exactly_once(&effect_counts(&pool, &group).await, &expected);
    assert!(!DB::in_ledger(&pool, &group, &bad).await);
}

/// A record retried for longer than `max.poll.interval.ms` (and the session timeout) does not
/// cost the consumer its group membership: the poll loop keeps polling while the partition's
/// worker backs off, that partition waits (order is kept), the other goes on, and nothing is
/// reassigned or fenced.
async fn retrying_longer_than_max_poll_interval_keeps_the_partitions<DB: TestDb>() {
    let pool = DB::pool().await;
    let (kafka, topic, group, records, all) = produced("long-retry", 2, 40, 0);
    let bad = format!("{topic}-4"); // partition 0, offset 2
    let mut handler = Counter::new(&group);
    handler.fail_on = Some((bad.clone(), false));
    let attempts = 16;
    let started = std::time::Instant::now();
    let mut consumer = Consumer::start(&kafka, &pool, &topic, handler, |rt| {
        rt.kafka_config("max.poll.interval.ms", "6000")
            .batch_size(5)
            .retry_policy(RetryPolicy {
                initial_delay: Duration::from_secs(1),
                max_delay: Duration::from_secs(1),
                max_attempts: Some(attempts),
            })
    });
    let stats = consumer.stats.clone();

    // While partition 0 retries, partition 1 is consumed to its end.
    let ends = ends_of(&records);
    wait_until(WAIT, "partition 1 to be caught up", || async {
        stored_offsets(&pool, &group).await.get(&(topic.clone(), 1)) == ends.get(&1)
    })
    .await;
    assert!(
        parked(&pool, &group).await.is_empty(),
        "the failing record was parked before partition 1 finished"
    );
    assert!(
        stored_offsets(&pool, &group)
            .await
            .get(&(topic.clone(), 0))
            .is_none_or(|next| *next <= 2),
        "partition 0 went past its failing record"
    );

    consumer.wait_caught_up(&ends).await;
    // 15 back-offs of 0.5–1 s each: well past the 6 s poll interval and session timeout.
    assert!(started.elapsed() > Duration::from_secs(7));
    consumer.stop().await;

    // The membership held through the back-offs. Had it been lost (every 6 s without a poll),
    // the partition's reassignment would have started the record's attempts over: several more
    // failed tries per loss. A loaded machine may fail a batch or two for reasons of its own.
    let retries = stats.snapshot().retries;
    assert!(
        (u64::from(attempts)..=u64::from(attempts) + 2).contains(&retries),
        "{retries} failed tries for {attempts} attempts: the record's attempts started over"
    );
    let letters = parked(&pool, &group).await;
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(
        (letters[0].offset, letters[0].kind, letters[0].attempts),
        (2, FailureKind::RetriesExhausted, attempts)
    );
    let expected: Vec<String> = all.into_iter().filter(|i| *i != bad).collect();
    assert_exactly_once(&effect_counts(&pool, &group).await, &expected);
}

// ---- A record that cannot be parked -------------------------------------------------------

/// If the dead letter itself cannot be written (here a trigger refuses it), the consumer stops
/// with `RecordFailed` and the stored offset stays before the record: nothing is skipped.
async fn a_record_that_cannot_be_parked_stops_the_consumer_before_it<DB: TestDb>() {
    let pool = DB::pool().await;
    let kafka = Kafka::new();
    let topic = rand_name("unparkable");
    let group = rand_name("unparkable");
    kafka.create_topic(&topic, 1);
    let (records, _) = events_with_duplicates(&topic, 10, 1, 0);
    kafka.produce(&topic, &records);
    let mut handler = Counter::new(&group);
    handler.fail_on = Some((format!("{topic}-4"), true));
    let rt = runtime(&kafka, &pool, handler, &topic, &group)
        .batch_size(3)
        .build()
        .unwrap();
    let err = tokio::time::timeout(WAIT, rt.run())
        .await
        .expect("the runtime must stop")
        .unwrap_err();
    match &err {
        consumer_runtime::Error::RecordFailed { at, kind, reason } => {
            assert_eq!((at.partition, at.offset), (0, 4), "{err}");
            assert_eq!(*kind, FailureKind::Rejected);
            assert!(reason.contains("dead letters refused"), "{err}");
        }
        other => panic!("unexpected error {other}"),
    }
    // Batches [0,1,2] committed; [3,4,5] rolled back: the stored offset is 3, before offset 4.
    assert_eq!(stored_offsets(&pool, &group).await[&(topic.clone(), 0)], 3);
    assert_eq!(ledger_rows(&pool, &group).await, 3);
    assert!(parked(&pool, &group).await.is_empty());
}

// ---- The suite, once per backend ------------------------------------------------------------

// ---- (h) integrity violations and time limits ---------------------------------------------

/// Applies the test effect with a plain `INSERT` (no `ON CONFLICT`): the record `collide.0`
/// inserts the key of `collide.1`, which is already there, and fails with a unique violation.
#[derive(Clone)]
struct Unique {
    group: String,
    collide: (String, String),
}

macro_rules! unique_for {
    ($db:ty) => {
        impl consumer_runtime::Handler<$db> for Unique {
            type Event = consumer_runtime::Json<serde_json::Value>;

            async fn handle(
                &self,
                ctx: &mut consumer_runtime::Context<'_, $db>,
                _: Self::Event,
            ) -> Result<(), consumer_runtime::HandlerError> {
                let mut id = ctx.record().event_id();
                if id == self.collide.0 {
                    id = &self.collide.1;
                }
                consumer_runtime::sqlx::query(
                    "INSERT INTO test_effects (consumer_group, event_id, count) VALUES ($1, $2, 1)",
                )
                .bind(&self.group)
                .bind(id)
                .execute(ctx.conn())
                .await?;
                Ok(())
            }
        }
    };
}

unique_for!(consumer_runtime::sqlx::Postgres);
unique_for!(consumer_runtime::sqlx::Sqlite);

/// A unique violation in a handler cannot succeed on a retry: the record is parked as
/// `rejected` after one attempt, the batch is never rolled back for a retry (so the partition
/// does not wait through the retry policy's 10 attempts), and the rest commits once.
async fn a_unique_violation_in_a_handler_parks_the_record_without_retrying<DB: TestDb>()
where
    Unique: consumer_runtime::Handler<DB>,
{
    let pool = DB::pool().await;
    let (kafka, topic, group, records, all) = produced("unique", 1, 20, 0);
    let bad = format!("{topic}-7");
    let handler = Unique {
        group: group.clone(),
        collide: (bad.clone(), format!("{topic}-2")),
    };
    let rt = consumer_runtime::Runtime::builder(handler)
        .pool(pool.clone())
        .brokers(kafka.bootstrap.clone())
        .topic(&topic)
        .group(&group)
        .handle_signals(false)
        .kafka_config("session.timeout.ms", "6000")
        .kafka_config("heartbeat.interval.ms", "500")
        .build()
        .unwrap();
    let stats = rt.stats();
    let stop = rt.shutdown_handle();
    let task = tokio::spawn(rt.run());
    wait_caught_up(&pool, &group, &topic, &ends_of(&records)).await;
    stop.shutdown();
    task.await.unwrap().expect("clean shutdown");

    let letters = parked(&pool, &group).await;
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].kind, FailureKind::Rejected);
    assert_eq!(letters[0].event_id.as_deref(), Some(bad.as_str()));
    assert_eq!(letters[0].attempts, 1, "{:?}", letters[0]);
    assert_eq!(
        stats.snapshot().retries,
        0,
        "a unique violation must not be retried"
    );
    let expected: Vec<String> = all.into_iter().filter(|i| *i != bad).collect();
    assert_exactly_once(&effect_counts(&pool, &group).await, &expected);
}

/// Writes the test effect; the first try of the record `slow_on` then sleeps past the
/// handler's 300 ms limit. Records the attempt numbers that record saw.
#[derive(Clone)]
struct Sleepy {
    group: String,
    slow_on: String,
    attempts: Arc<std::sync::Mutex<Vec<u32>>>,
}

impl<DB: TestDb> consumer_runtime::Handler<DB> for Sleepy {
    type Event = consumer_runtime::Json<serde_json::Value>;

    async fn handle(
        &self,
        ctx: &mut consumer_runtime::Context<'_, DB>,
        _: Self::Event,
    ) -> Result<(), consumer_runtime::HandlerError> {
        let id = ctx.record().event_id();
        DB::apply_effect(ctx.conn(), &self.group, id).await?;
        if id == self.slow_on {
            self.attempts.lock().unwrap().push(ctx.attempt());
            if ctx.attempt() == 1 {
                tokio::time::sleep(Duration::from_secs(30)).await;
            }
        }
        Ok(())
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(300)
    }
}

/// A handler past its time limit is cancelled and its batch rolled back and retried (a
/// transient failure, not a parked record); the retry sees `ctx.attempt() == 2`, and every
/// event is applied once.
async fn a_handler_past_its_time_limit_is_retried_and_applied_once<DB: TestDb>() {
    let pool = DB::pool().await;
    let (kafka, topic, group, records, all) = produced("timeout", 1, 20, 0);
    let handler = Sleepy {
        group: group.clone(),
        slow_on: format!("{topic}-5"),
        attempts: Arc::default(),
    };
    let rt = consumer_runtime::Runtime::builder(handler.clone())
        .pool(pool.clone())
        .brokers(kafka.bootstrap.clone())
        .topic(&topic)
        .group(&group)
        .handle_signals(false)
        .retry_policy(RetryPolicy {
            initial_delay: Duration::from_millis(50),
            ..RetryPolicy::default()
        })
        .kafka_config("session.timeout.ms", "6000")
        .kafka_config("heartbeat.interval.ms", "500")
        .build()
        .unwrap();
    let stats = rt.stats();
    let stop = rt.shutdown_handle();
    let task = tokio::spawn(rt.run());
    wait_caught_up(&pool, &group, &topic, &ends_of(&records)).await;
    stop.shutdown();
    task.await.unwrap().expect("clean shutdown");

    assert_eq!(*handler.attempts.lock().unwrap(), [1, 2]);
    assert!(stats.snapshot().retries >= 1);
    assert!(parked(&pool, &group).await.is_empty());
    assert_exactly_once(&effect_counts(&pool, &group).await, &all);
}

suite!(
    records_without_a_key_with_an_empty_key_or_oversized_are_applied_once,
    a_broker_outage_mid_stream_loses_and_duplicates_nothing,
    the_circuit_breaker_stops_the_consumer_when_parking_becomes_the_norm,
    a_disabled_circuit_breaker_parks_the_whole_bad_stretch_and_goes_on,
    rejected_record_is_parked_and_the_consumer_keeps_running,
    a_panicking_handler_parks_its_record_and_the_consumer_keeps_running,
    a_record_that_never_stops_failing_is_parked_after_max_attempts,
    retrying_longer_than_max_poll_interval_keeps_the_partitions,
    a_record_that_cannot_be_parked_stops_the_consumer_before_it,
    a_unique_violation_in_a_handler_parks_the_record_without_retrying,
    a_handler_past_its_time_limit_is_retried_and_applied_once,
);

/// PostgreSQL only: the server restarts while the consumer runs.
mod database_restart {
    use super::*;
    use consumer_runtime::sqlx::Postgres;
    use testkit::private_pg::{PrivatePostgres, Stop};

    /// PostgreSQL restarts twice while the consumer runs, once cleanly and once as a crash
    /// (its processes killed, recovery from the WAL): the batches in flight roll back, the
    /// consumer waits for the database and goes on, and every event is applied exactly once.
    /// The server is a private one (own data directory and port, from the installed server
    /// binaries), so that the restarts disturb no other test.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn postgres_restarts_mid_stream_lose_and_duplicate_nothing() {
        let dir = std::env::temp_dir().join(rand_name("consumer-runtime-test-pg"));
        let server = Arc::new(PrivatePostgres::start(&dir).expect("start a private PostgreSQL"));
        let pool: Pool<Postgres> = pg_pool_at(&server.url("postgres")).await;
        let (kafka, topic, group, records, ids) = produced("pg-restart", 3, 3000, 100);
        let counter = Counter::new(&group).with_delay(Duration::from_millis(1));
        let consumer = Consumer::start(&kafka, &pool, &topic, counter.clone(), |rt| {
            rt.batch_size(50)
        });
        let stats = consumer.stats.clone();

        for (at_least, how) in [(300, Stop::Fast), (1200, Stop::Immediate)] {
            wait_until(WAIT, "progress before the restart", || async {
                counter.applied() >= at_least
            })
            .await;
            let s = server.clone();
            tokio::task::spawn_blocking(move || s.restart(how))
                .await
                .unwrap()
                .unwrap_or_else(|e| panic!("restarting PostgreSQL ({how:?}): {e:#}"));
            assert!(consumer.is_running(), "the consumer gave up on a restart");
        }
        assert!(
            counter.applied() < 3000,
            "the restarts must come mid-stream (raise the event count)"
        );

        consumer.catch_up_and_stop(&records).await;
        assert!(
            stats.snapshot().retries >= 1,
            "a restart mid-stream must have rolled back at least one batch"
        );
        assert_exactly_once(&effect_counts(&pool, &group).await, &ids);
        pool.close().await;
    }
}

mod frozen_transaction {
    use super::*;
    use consumer_runtime::sqlx::{self, Postgres};

    async fn idle_timeout(pool: &Pool<Postgres>) -> String {
        sqlx::query_scalar("SHOW idle_in_transaction_session_timeout")
            .fetch_one(pool)
            .await
            .unwrap()
    }

    /// `url` with `options=-c idle_in_transaction_session_timeout=<value>`.
    fn with_idle_timeout(url: &str, value: &str) -> String {
        let sep = if url.contains('?') { '&' } else { '?' };
        format!("{url}{sep}options=-c%20idle_in_transaction_session_timeout%3D{value}")
    }

    /// A consumer freezes in the middle of a batch, its transaction open (a SIGSTOP, a paused
    /// VM). The server ends that session after the idle-in-transaction timeout, so another
    /// owner's claim of the partition goes through while the consumer is still frozen. When the
    /// consumer wakes, its batch rolls back, it is fenced, and in the end every event is applied
    /// exactly once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_consumer_frozen_mid_transaction_does_not_block_the_next_owner() {
        let pool = pg_pool_at(&with_idle_timeout(&database_url(), "1000")).await;
        assert_eq!(idle_timeout(&pool).await, "1s");
        let (kafka, topic, group, records, ids) = produced("frozen", 1, 200, 0);
        let mut counter = Counter::new(&group);
        counter.freeze_on = Some((ids[50].clone(), Duration::from_secs(15)));
        let consumer = Consumer::start(&kafka, &pool, &topic, counter.clone(), |rt| {
            rt.batch_size(10)
        });
        let stats = consumer.stats.clone();
        wait_until(WAIT, "the handler to freeze", || async {
            counter.frozen.load(Ordering::SeqCst)
        })
        .await;

        // Another party takes the partition's offset row (here an offset change, which bumps
        // the epoch under the same row lock as a new owner's claim).
        let store = consumer_runtime::Store::new(pool.clone(), SCHEMA).unwrap();
        tokio::time::timeout(WAIT, store.set_offsets(&group, &topic, &[(0, 0)]))
            .await
            .expect("the claim waited for the frozen consumer")
            .unwrap();
        assert!(
            counter.frozen.load(Ordering::SeqCst),
            "the claim must go through while the consumer is still frozen"
        );

        consumer.catch_up_and_stop(&records).await;
        assert!(
            stats.snapshot().reloads >= 1,
            "the woken consumer must have been fenced"
        );
        assert_exactly_once(&effect_counts(&pool, &group).await, &ids);
    }
}
