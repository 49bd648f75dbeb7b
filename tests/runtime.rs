//! The core promise, against a real PostgreSQL and librdkafka's mock cluster: every event's
//! non-idempotent effect is applied exactly once across producer duplicates, crashes,
//! rebalances, fencing, handler errors and rewinds.

mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use consumer_runtime::rdkafka::Timestamp;
use consumer_runtime::rdkafka::message::{Header, OwnedHeaders, OwnedMessage};
use consumer_runtime::sqlx::{Pool, Postgres};
use consumer_runtime::{
    Assignor, Backend, BatchError, BatchOutcome, Error, Guarantee, PartitionKey, PartitionWriter,
    Runtime, WriterConfig,
};
use support::*;

const WAIT: Duration = Duration::from_secs(60);

fn runtime(
    kafka: &Kafka,
    pool: &Pool<Postgres>,
    handler: Counter,
    topic: &str,
) -> consumer_runtime::RuntimeBuilder<Counter, Postgres> {
    Runtime::builder(handler)
        .pool(pool.clone())
        .brokers(kafka.bootstrap.clone())
        .topic(topic)
        .handle_signals(false)
        .kafka_config("session.timeout.ms", "6000")
        .kafka_config("heartbeat.interval.ms", "500")
}

/// Waits until the stored offsets of `group` reach the end of every partition.
async fn wait_caught_up(pool: &Pool<Postgres>, group: &str, topic: &str, ends: &HashMap<i32, i64>) {
    wait_until(
        WAIT,
        "stored offsets to reach the end of the topic",
        || async {
            let stored = stored_offsets(pool, group).await;
            ends.iter()
                .all(|(p, end)| stored.get(&(topic.to_owned(), *p)) == Some(end))
        },
    )
    .await;
}

fn ends_of(records: &[(i32, String, String)]) -> HashMap<i32, i64> {
    let mut ends = HashMap::new();
    for (p, _, _) in records {
        *ends.entry(*p).or_insert(0) += 1;
    }
    ends
}

async fn consume_all_once(batch_size: usize) {
    let pool = pg_pool().await;
    let kafka = Kafka::new();
    let topic = rand_name("dups");
    let group = rand_name("g");
    kafka.create_topic(&topic, 4);
    let (records, ids) = events_with_duplicates(&topic, 400, 4, 100);
    kafka.produce(&topic, &records);

    let counter = Counter::new(&group);
    let rt = runtime(&kafka, &pool, counter.clone(), &topic)
        .group(&group)
        .batch_size(batch_size)
        .build()
        .unwrap();
    let stats = rt.stats();
    let stop = rt.shutdown_handle();
    let task = tokio::spawn(rt.run());
    wait_caught_up(&pool, &group, &topic, &ends_of(&records)).await;
    stop.shutdown();
    task.await.unwrap().expect("clean shutdown");

    assert_exactly_once(&effect_counts(&pool, &group).await, &ids);
    assert_eq!(ledger_rows(&pool, &group).await, 400);
    assert_eq!(counter.applied(), 400);
    assert_eq!(
        stats.duplicates.load(std::sync::atomic::Ordering::Relaxed),
        100
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn producer_duplicates_are_applied_once() {
    consume_all_once(500).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn producer_duplicates_are_applied_once_with_batch_size_one() {
    consume_all_once(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn crash_mid_stream_resumes_from_database_offset_and_ignores_kafka_offsets() {
    let pool = pg_pool().await;
    let kafka = Kafka::new();
    let topic = rand_name("crash");
    let group = rand_name("g");
    kafka.create_topic(&topic, 2);
    let (records, ids) = events_with_duplicates(&topic, 1000, 2, 50);
    kafka.produce(&topic, &records);
    let ends = ends_of(&records);

    // First run: slow handler, dropped without a clean shutdown once some work committed.
    let counter = Counter::new(&group).with_delay(Duration::from_millis(1));
    let rt = runtime(&kafka, &pool, counter.clone(), &topic)
        .group(&group)
        .batch_size(50)
        .build()
        .unwrap();
    let task = tokio::spawn(rt.run());
    wait_until(WAIT, "some progress", || async { counter.applied() >= 300 }).await;
    task.abort();
    let _ = task.await;
    let stored = stored_offsets(&pool, &group).await;
    let done: i64 = stored.values().sum();
    assert!(
        done > 0 && done < records.len() as i64,
        "the crash must happen mid-stream (stored {done})"
    );

    // A bogus offset in Kafka (the end of the topic) must not make the runtime skip anything.
    kafka.commit_kafka_offsets(&group, &topic, 2, *ends.values().max().unwrap());

    let rt = runtime(&kafka, &pool, Counter::new(&group), &topic)
        .group(&group)
        .batch_size(50)
        .build()
        .unwrap();
    let stop = rt.shutdown_handle();
    let task = tokio::spawn(rt.run());
    wait_caught_up(&pool, &group, &topic, &ends).await;
    stop.shutdown();
    task.await.unwrap().unwrap();
    assert_exactly_once(&effect_counts(&pool, &group).await, &ids);
}

async fn second_instance_joins_mid_stream(assignor: Assignor) {
    let pool = pg_pool().await;
    let kafka = Kafka::new();
    let topic = rand_name("rebalance");
    let group = rand_name("g");
    kafka.create_topic(&topic, 4);
    let (records, ids) = events_with_duplicates(&topic, 2000, 4, 100);
    kafka.produce(&topic, &records);

    // Slow enough (about 7 s of work) that the second instance joins while work remains.
    let a = Counter::new(&group).with_delay(Duration::from_millis(15));
    let b = Counter::new(&group).with_delay(Duration::from_millis(15));
    let build = |c: &Counter| {
        runtime(&kafka, &pool, c.clone(), &topic)
            .group(&group)
            .batch_size(20)
            .assignor(assignor)
            .build()
            .unwrap()
    };
    let (rt_a, rt_b) = (build(&a), build(&b));
    let (stop_a, stop_b) = (rt_a.shutdown_handle(), rt_b.shutdown_handle());
    let task_a = tokio::spawn(rt_a.run());
    wait_until(WAIT, "the first instance to make progress", || async {
        a.applied() >= 200
    })
    .await;
    let task_b = tokio::spawn(rt_b.run());
    wait_caught_up(&pool, &group, &topic, &ends_of(&records)).await;
    stop_a.shutdown();
    stop_b.shutdown();
    task_a.await.unwrap().unwrap();
    task_b.await.unwrap().unwrap();

    assert!(b.applied() > 0, "the second instance never got a partition");
    assert_eq!(a.applied() + b.applied(), 2000);
    assert_exactly_once(&effect_counts(&pool, &group).await, &ids);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rebalance_with_range_assignor_applies_each_event_once() {
    second_instance_joins_mid_stream(Assignor::Range).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rebalance_with_cooperative_sticky_assignor_applies_each_event_once() {
    second_instance_joins_mid_stream(Assignor::CooperativeSticky).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rewinding_stored_offsets_reapplies_nothing() {
    let pool = pg_pool().await;
    let kafka = Kafka::new();
    let topic = rand_name("rewind");
    let group = rand_name("g");
    kafka.create_topic(&topic, 3);
    let (records, ids) = events_with_duplicates(&topic, 300, 3, 30);
    kafka.produce(&topic, &records);
    let ends = ends_of(&records);

    let counter = Counter::new(&group);
    let rt = runtime(&kafka, &pool, counter.clone(), &topic)
        .group(&group)
        .build()
        .unwrap();
    let stats = rt.stats();
    let stop = rt.shutdown_handle();
    let task = tokio::spawn(rt.run());
    wait_caught_up(&pool, &group, &topic, &ends).await;
    assert_eq!(counter.applied(), 300);

    // Rewind every partition to 0 while the consumer runs: it is fenced, reloads, re-reads
    // the whole topic, and the ledger skips every record.
    let q = <Postgres as Backend>::queries(SCHEMA).unwrap();
    let mut tx = pool.begin().await.unwrap();
    for p in 0..3 {
        let key = PartitionKey {
            group: group.clone(),
            topic: topic.clone(),
            partition: p,
        };
        Postgres::set_offset(&mut tx, &q, &key, 0).await.unwrap();
    }
    tx.commit().await.unwrap();
    wait_until(WAIT, "the rewound topic to be read again", || async {
        stats.duplicates.load(std::sync::atomic::Ordering::Relaxed) >= 30 + records.len() as u64
    })
    .await;
    wait_caught_up(&pool, &group, &topic, &ends).await;
    stop.shutdown();
    task.await.unwrap().unwrap();

    assert_eq!(counter.applied(), 300, "the replay applied something again");
    assert_exactly_once(&effect_counts(&pool, &group).await, &ids);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_groups_each_apply_every_event_once() {
    let pool = pg_pool().await;
    let kafka = Kafka::new();
    let topic = rand_name("groups");
    kafka.create_topic(&topic, 2);
    let (records, ids) = events_with_duplicates(&topic, 200, 2, 20);
    kafka.produce(&topic, &records);
    let (g1, g2) = (rand_name("g1"), rand_name("g2"));

    let mut stops = Vec::new();
    let mut tasks = Vec::new();
    for g in [&g1, &g2] {
        let rt = runtime(&kafka, &pool, Counter::new(g), &topic)
            .group(g)
            .build()
            .unwrap();
        stops.push(rt.shutdown_handle());
        tasks.push(tokio::spawn(rt.run()));
    }
    for g in [&g1, &g2] {
        wait_caught_up(&pool, g, &topic, &ends_of(&records)).await;
    }
    stops.iter().for_each(|s| s.shutdown());
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_exactly_once(&effect_counts(&pool, &g1).await, &ids);
    assert_exactly_once(&effect_counts(&pool, &g2).await, &ids);
}

// ---- The unit of work on its own: fencing and rollback -------------------------------------

fn message(topic: &str, partition: i32, offset: i64, id: &str) -> OwnedMessage {
    let headers = OwnedHeaders::new().insert(Header {
        key: "event-id",
        value: Some(id.as_bytes()),
    });
    OwnedMessage::new(
        Some(format!(r#"{{"id":"{id}"}}"#).into_bytes()),
        None,
        topic.to_owned(),
        Timestamp::now(),
        partition,
        offset,
        Some(headers),
    )
}

fn writer_config(pool: &Pool<Postgres>, handler: Counter) -> Arc<WriterConfig<Counter, Postgres>> {
    writer_config_with(pool, handler, Default::default())
}

fn writer_config_with(
    pool: &Pool<Postgres>,
    handler: Counter,
    event_id: consumer_runtime::EventId<serde_json::Value>,
) -> Arc<WriterConfig<Counter, Postgres>> {
    Arc::new(WriterConfig {
        handler: Arc::new(handler),
        pool: pool.clone(),
        queries: <Postgres as Backend>::queries(SCHEMA).unwrap(),
        guarantee: Guarantee::EffectivelyOnce,
        event_id,
    })
}

/// The set-up of a unit-of-work test: a pool, a fresh group, partition 0 of a fresh topic, and
/// the runtime's SQL.
async fn unit_setup(
    topic_prefix: &str,
) -> (
    Pool<Postgres>,
    String,
    PartitionKey,
    consumer_runtime::store::Queries,
) {
    let pool = pg_pool().await;
    let group = rand_name("g");
    let key = PartitionKey {
        group: group.clone(),
        topic: rand_name(topic_prefix),
        partition: 0,
    };
    let q = <Postgres as Backend>::queries(SCHEMA).unwrap();
    (pool, group, key, q)
}

#[tokio::test]
async fn stale_epoch_cannot_commit_and_leaves_nothing_visible() {
    let (pool, group, key, q) = unit_setup("fence").await;
    let config = writer_config(&pool, Counter::new(&group));

    let old = Postgres::claim(&pool, &q, &key, "zombie").await.unwrap();
    let mut zombie = PartitionWriter::new(config.clone(), key.clone(), old);
    let new = Postgres::claim(&pool, &q, &key, "owner").await.unwrap();
    assert!(new.epoch > old.epoch);

    let batch: Vec<_> = (0..5)
        .map(|o| message(&key.topic, 0, o, &format!("{group}-{o}")))
        .collect();
    assert_eq!(zombie.write(&batch).await.unwrap(), BatchOutcome::Fenced);
    assert!(
        effect_counts(&pool, &group).await.is_empty(),
        "a fenced batch left effects"
    );
    assert_eq!(
        ledger_rows(&pool, &group).await,
        0,
        "a fenced batch left ledger rows"
    );
    assert!(
        stored_offsets(&pool, &group).await.is_empty(),
        "a fenced batch moved the offset"
    );

    // The current owner commits the same batch.
    let mut owner = PartitionWriter::new(config, key.clone(), new);
    assert!(matches!(
        owner.write(&batch).await.unwrap(),
        BatchOutcome::Committed { applied: 5, .. }
    ));
    assert_eq!(
        stored_offsets(&pool, &group).await[&(key.topic.clone(), 0)],
        5
    );
}

#[tokio::test]
async fn handler_error_rolls_back_the_whole_batch() {
    let (pool, group, key, q) = unit_setup("rollback").await;
    for reject in [false, true] {
        let mut handler = Counter::new(&group);
        handler.fail_on = Some((format!("{group}-3"), reject));
        let claim = Postgres::claim(&pool, &q, &key, "me").await.unwrap();
        let mut writer = PartitionWriter::new(writer_config(&pool, handler), key.clone(), claim);
        let batch: Vec<_> = (0..6)
            .map(|o| message(&key.topic, 0, o, &format!("{group}-{o}")))
            .collect();
        let err = writer.write(&batch).await.unwrap_err();
        match (&err, reject) {
            (BatchError::Transient { at: Some(at), .. }, false) => assert_eq!(at.offset, 3),
            (BatchError::Permanent { at, .. }, true) => assert_eq!(at.offset, 3),
            other => panic!("unexpected error {other:?}"),
        }
        assert!(
            effect_counts(&pool, &group).await.is_empty(),
            "partial effects are visible"
        );
        assert_eq!(
            ledger_rows(&pool, &group).await,
            0,
            "ledger rows are visible"
        );
        assert_eq!(writer.position(), None);
        let offsets = consumer_runtime::store::Backend::offsets(&pool, &q, &group)
            .await
            .unwrap();
        assert_eq!(offsets[0].next_offset, None, "the offset moved");
    }
}

#[tokio::test]
async fn duplicate_ids_within_one_batch_run_the_handler_once() {
    let (pool, group, key, q) = unit_setup("inbatch").await;
    let claim = Postgres::claim(&pool, &q, &key, "me").await.unwrap();
    let mut writer = PartitionWriter::new(
        writer_config(&pool, Counter::new(&group)),
        key.clone(),
        claim,
    );
    let ids = ["a", "b", "a", "c", "b", "a"];
    let batch: Vec<_> = ids
        .iter()
        .enumerate()
        .map(|(o, id)| message(&key.topic, 0, o as i64, &format!("{group}-{id}")))
        .collect();
    let outcome = writer.write(&batch).await.unwrap();
    assert_eq!(
        outcome,
        BatchOutcome::Committed {
            applied: 3,
            duplicates: 3,
            lost: 0,
            next_offset: 6
        }
    );
    let expected: Vec<String> = ["a", "b", "c"]
        .iter()
        .map(|i| format!("{group}-{i}"))
        .collect();
    assert_exactly_once(&effect_counts(&pool, &group).await, &expected);
}

// ---- Errors a user can act on ---------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_topic_is_a_clear_error() {
    let pool = pg_pool().await;
    let kafka = Kafka::new();
    let rt = runtime(&kafka, &pool, Counter::new("x"), "no_such_topic")
        .group(rand_name("g"))
        .build()
        .unwrap();
    let err = rt.run().await.unwrap_err();
    assert!(
        matches!(err, Error::UnknownTopic { ref topic, .. } if topic == "no_such_topic"),
        "{err}"
    );
    assert!(
        err.to_string().contains("create it or fix the topic name"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_broker_is_a_clear_error() {
    let pool = pg_pool().await;
    let rt = Runtime::builder(Counter::new("x"))
        .pool(pool)
        .brokers("127.0.0.1:1")
        .group(rand_name("g"))
        .topic("t")
        .handle_signals(false)
        .startup_timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let err = rt.run().await.unwrap_err();
    assert!(matches!(err, Error::BrokerUnreachable { .. }), "{err}");
    assert!(err.to_string().contains("127.0.0.1:1"), "{err}");
}

#[tokio::test]
async fn unreachable_database_is_a_clear_error_without_the_password() {
    let err = consumer_runtime::connect::<Postgres>("postgres://app:hunter2@127.0.0.1:1/db", 1)
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, Error::DatabaseUnreachable { .. }), "{text}");
    assert!(
        text.contains("127.0.0.1:1") && !text.contains("hunter2"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_behind_the_migrations_is_refused() {
    let pool = pg_pool().await;
    let kafka = Kafka::new();
    let schema = rand_name("unmigrated");
    let rt = runtime(&kafka, &pool, Counter::new("x"), "t")
        .group(rand_name("g"))
        .schema(&schema)
        .build()
        .unwrap();
    let err = rt.run().await.unwrap_err();
    assert!(matches!(err, Error::SchemaBehind { .. }), "{err}");
    assert!(err.to_string().contains("migrate"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_record_stops_the_partition_without_advancing_past_it() {
    let pool = pg_pool().await;
    let kafka = Kafka::new();
    let topic = rand_name("reject");
    let group = rand_name("g");
    kafka.create_topic(&topic, 1);
    let (records, _) = events_with_duplicates(&topic, 10, 1, 0);
    kafka.produce(&topic, &records);
    let mut handler = Counter::new(&group);
    handler.fail_on = Some((format!("{topic}-4"), true));
    let rt = runtime(&kafka, &pool, handler, &topic)
        .group(&group)
        .batch_size(3)
        .build()
        .unwrap();
    let err = tokio::time::timeout(WAIT, rt.run())
        .await
        .expect("the runtime must stop")
        .unwrap_err();
    match &err {
        Error::RecordFailed { at, .. } => {
            assert_eq!(
                (at.topic.as_str(), at.partition, at.offset),
                (topic.as_str(), 0, 4)
            );
        }
        other => panic!("unexpected error {other}"),
    }
    // Batches [0,1,2] committed; [3,4,5] rolled back: the stored offset is 3, before offset 4.
    assert_eq!(stored_offsets(&pool, &group).await[&(topic.clone(), 0)], 3);
    assert_eq!(ledger_rows(&pool, &group).await, 3);
}

// ---- A rough throughput figure (the benchmark program measures it properly) ----------------

/// Run with `cargo test --release --test runtime rough_throughput -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a check; run it by hand"]
async fn rough_throughput() {
    let pool = pg_pool().await;
    let kafka = Kafka::new();
    let topic = rand_name("tput");
    kafka.create_topic(&topic, 8);
    let n = 20_000;
    let (records, _) = events_with_duplicates(&topic, n, 8, 0);
    kafka.produce(&topic, &records);
    for batch_size in [500, 1] {
        let group = rand_name("g");
        let rt = runtime(&kafka, &pool, Counter::new(&group), &topic)
            .group(&group)
            .batch_size(batch_size)
            .build()
            .unwrap();
        let stop = rt.shutdown_handle();
        let start = std::time::Instant::now();
        let task = tokio::spawn(rt.run());
        wait_caught_up(&pool, &group, &topic, &ends_of(&records)).await;
        let secs = start.elapsed().as_secs_f64();
        stop.shutdown();
        task.await.unwrap().unwrap();
        println!(
            "batch_size={batch_size} messages={n} seconds={secs:.2} msgs_per_s={:.0}",
            n as f64 / secs
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_shuts_down_gracefully() {
    let pool = pg_pool().await;
    let kafka = Kafka::new();
    let topic = rand_name("sigterm");
    let group = rand_name("g");
    kafka.create_topic(&topic, 2);
    let (records, ids) = events_with_duplicates(&topic, 100, 2, 0);
    kafka.produce(&topic, &records);
    let rt = runtime(&kafka, &pool, Counter::new(&group), &topic)
        .group(&group)
        .handle_signals(true)
        .build()
        .unwrap();
    let task = tokio::spawn(rt.run());
    wait_caught_up(&pool, &group, &topic, &ends_of(&records)).await;
    // The runtime installed its SIGTERM handler at startup, so this does not kill the test.
    let status = std::process::Command::new("kill")
        .args(["-TERM", &std::process::id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let result = tokio::time::timeout(WAIT, task)
        .await
        .expect("SIGTERM must stop the runtime");
    result.unwrap().expect("a graceful shutdown returns Ok");
    assert_exactly_once(&effect_counts(&pool, &group).await, &ids);
}

#[tokio::test]
async fn event_id_from_the_event_or_the_coordinates() {
    let (pool, group, key, q) = unit_setup("ids").await;
    // Payloads are {"id": …}; offsets 0 and 2 carry the same business id.
    let batch: Vec<_> = ["x", "y", "x"]
        .iter()
        .enumerate()
        .map(|(o, id)| message(&key.topic, 0, o as i64, &format!("{group}-{id}")))
        .collect();
    let strategies: [(consumer_runtime::EventId<serde_json::Value>, usize); 2] = [
        (
            consumer_runtime::EventId::from_event(|e: &serde_json::Value| {
                e["id"].as_str().map(|s| format!("biz:{s}"))
            }),
            2,
        ),
        (consumer_runtime::EventId::coordinates(), 3),
    ];
    for (i, (strategy, applied)) in strategies.into_iter().enumerate() {
        let group = format!("{group}_{i}");
        let key = PartitionKey {
            group: group.clone(),
            ..key.clone()
        };
        let config = writer_config_with(&pool, Counter::new(&group), strategy);
        let claim = Postgres::claim(&pool, &q, &key, "me").await.unwrap();
        let mut writer = PartitionWriter::new(config, key.clone(), claim);
        match writer.write(&batch).await.unwrap() {
            BatchOutcome::Committed { applied: a, .. } => assert_eq!(a, applied, "strategy {i}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(ledger_rows(&pool, &group).await, applied as i64);
    }
}
