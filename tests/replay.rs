//! Safe replay, against real databases and librdkafka's mock cluster: a dry run counts the
//! range exactly and changes nothing; an applied replay fences a running consumer, which
//! re-reads the range without applying anything twice; a rebuild re-runs the handler exactly
//! once for the events of its range; a time resolves to the right offset; bad requests are
//! refused naming the offending value.
//!
//! One suite, run against both backends: each behaviour is a generic function over
//! [`TestDb`], instantiated at the end of this file as `postgres::<name>` and `sqlite::<name>`.

use std::collections::HashMap;
use std::time::Duration;

use consumer_runtime::rdkafka::ClientConfig;
use consumer_runtime::rdkafka::message::{Header, OwnedHeaders};
use consumer_runtime::rdkafka::producer::{BaseRecord, Producer};
use consumer_runtime::sqlx::Pool;
use consumer_runtime::{
    Backend, Error, EventId, PartitionReplay, ReplayFrom, ReplayMode, ReplayProgress,
    ReplayRequest, StoredOffset,
};
use testkit::*;

testkit::mock_broker_entry!();

const WAIT: Duration = Duration::from_secs(30);

/// The test handler's event type.
type Event = consumer_runtime::Json<serde_json::Value>;

fn kafka_config(kafka: &Kafka) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", &kafka.bootstrap);
    config
}

fn assert_send<T: Send>(_: &T) {}

/// Runs a replay with the consumers' strategy (the `event-id` header), collecting progress.
async fn replay<DB: TestDb>(
    pool: &Pool<DB>,
    kafka: &Kafka,
    group: &str,
    topic: &str,
    partition: Option<i32>,
    from: ReplayFrom,
    mode: ReplayMode,
) -> (Result<Vec<PartitionReplay>, Error>, Vec<ReplayProgress>) {
    replay_with(
        pool,
        kafka,
        EventId::default(),
        group,
        topic,
        partition,
        from,
        mode,
    )
    .await
}

#[allow(clippy::too_many_arguments)]
async fn replay_with<DB: TestDb>(
    pool: &Pool<DB>,
    kafka: &Kafka,
    event_id: EventId<Event>,
    group: &str,
    topic: &str,
    partition: Option<i32>,
    from: ReplayFrom,
    mode: ReplayMode,
) -> (Result<Vec<PartitionReplay>, Error>, Vec<ReplayProgress>) {
    let request = ReplayRequest {
        group: group.to_owned(),
        topic: topic.to_owned(),
        partition,
        from,
        mode,
        below_floor: false,
    };
    let config = kafka_config(kafka);
    let mut updates = Vec::new();
    let mut progress = |p: ReplayProgress| updates.push(p);
    let store = consumer_runtime::Store::new(pool.clone(), SCHEMA).unwrap();
    let run = store.replay(&config, &request, &event_id, &mut progress);
    // The consumer program runs it on a spawned task.
    assert_send(&run);
    let result = run.await;
    (result, updates)
}

/// The group's rows of `consumer_offsets`.
async fn rows<DB: Backend>(pool: &Pool<DB>, group: &str) -> Vec<StoredOffset> {
    consumer_runtime::Store::new(pool.clone(), SCHEMA)
        .unwrap()
        .stored_offsets(group)
        .await
        .unwrap()
}

fn epochs(rows: &[StoredOffset]) -> HashMap<i32, i64> {
    rows.iter().map(|r| (r.partition, r.epoch)).collect()
}

/// The event ids of one partition, in offset order.
fn partition_ids(records: &[(i32, String, String)], partition: i32) -> Vec<String> {
    records
        .iter()
        .filter(|(p, _, _)| *p == partition)
        .map(|(_, id, _)| id.clone())
        .collect()
}

/// A consumer with the replay suite's settings: batches of `batch_size`, and an epoch check
/// every 200 ms, so that a replay's fence is noticed at once.
fn start<DB: TestDb>(
    kafka: &Kafka,
    pool: &Pool<DB>,
    counter: Counter,
    topic: &str,
    batch_size: usize,
) -> Consumer<DB> {
    Consumer::start(kafka, pool, topic, counter, |rt| {
        rt.batch_size(batch_size)
            .epoch_check_interval(Duration::from_millis(200))
    })
}

/// Records the consumer skipped as already applied.
fn duplicates<DB: TestDb>(consumer: &Consumer<DB>) -> u64 {
    consumer.stats.snapshot().duplicates
}

/// A topic of `n` events (plus `dups` producer duplicates) over `partitions` partitions,
/// consumed to the end by a consumer that is still running.
struct Consumed<DB: TestDb> {
    pool: Pool<DB>,
    kafka: Kafka,
    topic: String,
    group: String,
    records: Vec<(i32, String, String)>,
    ids: Vec<String>,
    ends: HashMap<i32, i64>,
    consumer: Consumer<DB>,
}

async fn consumed<DB: TestDb>(n: usize, partitions: i32, dups: usize) -> Consumed<DB> {
    let pool = DB::pool().await;
    let (kafka, topic, group, records, ids) = produced("replay", partitions, n, dups);
    let ends = ends_of(&records);
    let consumer = start(&kafka, &pool, Counter::new(&group), &topic, 500);
    wait_caught_up_within(WAIT, &pool, &group, &topic, &ends).await;
    assert_eq!(consumer.counter.applied(), n as u64);
    Consumed {
        pool,
        kafka,
        topic,
        group,
        records,
        ids,
        ends,
        consumer,
    }
}

// ---- Dry run --------------------------------------------------------------------------------

async fn dry_run_counts_the_range_exactly_and_changes_nothing<DB: TestDb>() {
    let c = consumed::<DB>(300, 3, 30).await;
    c.consumer.stop().await;
    let before = rows(&c.pool, &c.group).await;

    let (report, progress) = replay(
        &c.pool,
        &c.kafka,
        &c.group,
        &c.topic,
        None,
        ReplayFrom::Earliest,
        ReplayMode::DryRun,
    )
    .await;
    let report = report.unwrap();
    assert_eq!(report.len(), 3);
    for r in &report {
        let end = c.ends[&r.partition];
        assert_eq!((r.from, r.to, r.high_watermark), (0, end, end), "{r:?}");
        assert_eq!(r.records, end as u64, "{r:?}");
        assert_eq!(r.already_processed, Some(end as u64), "{r:?}");
        assert_eq!(r.ledger_rows_cleared, 0);
        let last = progress
            .iter()
            .rfind(|p| p.partition == r.partition)
            .expect("progress for every partition");
        assert!(last.done, "{last:?}");
        assert_eq!((last.read, last.already_processed), (r.records, r.records));
    }

    // From the middle of one partition: exact too.
    let (report, _) = replay(
        &c.pool,
        &c.kafka,
        &c.group,
        &c.topic,
        Some(1),
        ReplayFrom::Offset(40),
        ReplayMode::DryRun,
    )
    .await;
    let report = report.unwrap();
    let end = c.ends[&1];
    assert_eq!(report.len(), 1);
    assert_eq!(
        (report[0].partition, report[0].from, report[0].to),
        (1, 40, end)
    );
    assert_eq!(report[0].records, (end - 40) as u64);
    assert_eq!(report[0].already_processed, Some((end - 40) as u64));

    // The count follows the event-id strategy it is given: under record coordinates none of
    // these records is in the ledger (the consumer claimed them by header).
    let (report, _) = replay_with(
        &c.pool,
        &c.kafka,
        EventId::coordinates(),
        &c.group,
        &c.topic,
        Some(1),
        ReplayFrom::Offset(40),
        ReplayMode::DryRun,
    )
    .await;
    assert_eq!(report.unwrap()[0].already_processed, Some(0));

    assert_eq!(
        rows(&c.pool, &c.group).await,
        before,
        "a dry run changed offsets"
    );
    assert_eq!(ledger_rows(&c.pool, &c.group).await, 300);
    assert_exactly_once(&effect_counts(&c.pool, &c.group).await, &c.ids);
}

// ---- Apply ----------------------------------------------------------------------------------

async fn applied_replay_fences_the_running_consumer_which_reapplies_nothing<DB: TestDb>() {
    let c = consumed::<DB>(300, 3, 30).await;
    let before = epochs(&rows(&c.pool, &c.group).await);
    let seen = duplicates(&c.consumer);

    let (report, progress) = replay(
        &c.pool,
        &c.kafka,
        &c.group,
        &c.topic,
        None,
        ReplayFrom::Earliest,
        ReplayMode::Apply,
    )
    .await;
    let report = report.unwrap();
    assert!(progress.is_empty(), "only a dry run reports progress");
    for r in &report {
        let end = c.ends[&r.partition];
        assert_eq!((r.from, r.to, r.records), (0, end, end as u64), "{r:?}");
        assert_eq!((r.already_processed, r.ledger_rows_cleared), (None, 0));
    }
    let after = epochs(&rows(&c.pool, &c.group).await);
    for (p, epoch) in &before {
        assert!(after[p] > *epoch, "partition {p}: epoch {epoch} not bumped");
    }

    // The consumer is fenced, reloads, reads the whole topic again and the ledger skips it all.
    wait_until(WAIT, "the replayed range to be read again", || async {
        duplicates(&c.consumer) >= seen + c.records.len() as u64
    })
    .await;
    wait_caught_up_within(WAIT, &c.pool, &c.group, &c.topic, &c.ends).await;
    assert!(
        rows(&c.pool, &c.group)
            .await
            .iter()
            .all(|r| r.owner.is_some()),
        "the running consumer reclaimed every partition"
    );
    assert_eq!(
        c.consumer.counter.applied(),
        300,
        "the replay applied something again"
    );
    c.consumer.stop().await;
    assert_exactly_once(&effect_counts(&c.pool, &c.group).await, &c.ids);
    assert_eq!(ledger_rows(&c.pool, &c.group).await, 300);
}

// ---- Rebuild --------------------------------------------------------------------------------

async fn rebuild_reruns_exactly_the_events_of_its_range_once<DB: TestDb>() {
    let c = consumed::<DB>(300, 3, 30).await;
    // Partition 1 holds 100 events at offsets 0..100, then 10 producer duplicates at
    // 100..110 of events from earlier offsets. The range [90, 110) re-runs the ten events
    // whose first record lies in it; the duplicates in it belong to events outside it (but
    // one, at offset 93, whose duplicate is also in the range and is skipped again).
    let (partition, k) = (1, 90);
    let ids = partition_ids(&c.records, partition);
    let end = ids.len() as i64;
    let first_at = |id: &String| ids.iter().position(|x| x == id).unwrap() as i64;
    let mut rerun: Vec<String> = ids[k as usize..]
        .iter()
        .filter(|id| first_at(id) >= k)
        .cloned()
        .collect();
    rerun.sort();
    rerun.dedup();
    assert_eq!(rerun.len(), 10);

    let (report, _) = replay(
        &c.pool,
        &c.kafka,
        &c.group,
        &c.topic,
        Some(partition),
        ReplayFrom::Offset(k),
        ReplayMode::Rebuild,
    )
    .await;
    let report = report.unwrap();
    assert_eq!(report.len(), 1);
    assert_eq!((report[0].from, report[0].to), (k, end));
    assert_eq!(report[0].ledger_rows_cleared, rerun.len() as u64);

    wait_until(WAIT, "the rebuilt range to run again", || async {
        c.consumer.counter.applied() >= 300 + rerun.len() as u64
    })
    .await;
    wait_caught_up_within(WAIT, &c.pool, &c.group, &c.topic, &c.ends).await;
    c.consumer.stop().await;

    let counts = effect_counts(&c.pool, &c.group).await;
    assert_eq!(counts.len(), c.ids.len());
    for id in &c.ids {
        let expected = if rerun.contains(id) { 2 } else { 1 };
        assert_eq!(counts[id], expected, "event {id}");
    }
    assert_eq!(
        ledger_rows(&c.pool, &c.group).await,
        300,
        "the ledger holds every id again"
    );
}

/// A rebuild while the consumer is busy committing: the range it reports ends exactly at the
/// stored offset its transaction replaced, and exactly that range runs again.
async fn rebuild_while_the_consumer_is_busy_reruns_exactly_the_reported_range<DB: TestDb>() {
    let pool = DB::pool().await;
    let (kafka, topic, group, records, ids) = produced("busy", 1, 400, 0);
    let counter = Counter::new(&group).with_delay(Duration::from_millis(3));
    let consumer = start(&kafka, &pool, counter, &topic, 10);
    wait_until(WAIT, "the consumer to be under way", || async {
        consumer.counter.applied() >= 100
    })
    .await;

    let (report, _) = replay(
        &pool,
        &kafka,
        &group,
        &topic,
        None,
        ReplayFrom::Offset(50),
        ReplayMode::Rebuild,
    )
    .await;
    let report = report.unwrap();
    let (from, to) = (report[0].from, report[0].to);
    assert_eq!(from, 50);
    assert!((100..=400).contains(&to), "{:?}", report[0]);
    assert_eq!(report[0].ledger_rows_cleared, (to - from) as u64);

    wait_until(WAIT, "the rebuilt range to run again", || async {
        consumer.counter.applied() >= 400 + (to - from) as u64
    })
    .await;
    wait_caught_up_within(WAIT, &pool, &group, &topic, &ends_of(&records)).await;
    consumer.stop().await;
    let counts = effect_counts(&pool, &group).await;
    for (offset, id) in ids.iter().enumerate() {
        let expected = if (from..to).contains(&(offset as i64)) {
            2
        } else {
            1
        };
        assert_eq!(
            counts.get(id),
            Some(&expected),
            "event {id} at offset {offset}"
        );
    }
    assert_eq!(counts.len(), 400);
    assert_eq!(ledger_rows(&pool, &group).await, 400);
}

// ---- Refusals -------------------------------------------------------------------------------

async fn bad_requests_are_refused_naming_the_value<DB: TestDb>() {
    let pool = DB::pool().await;
    let kafka = Kafka::new();
    let (topic, other) = (rand_name("replay"), rand_name("other"));
    let group = rand_name("g");
    kafka.create_topic(&topic, 2);
    kafka.create_topic(&other, 1);
    let records: Vec<_> = (0..20)
        .map(|i| (i % 2, format!("{topic}-{i}"), "{}".to_owned()))
        .collect();
    kafka.produce(&topic, &records);
    // As if the group had consumed the topic to the end.
    store(&pool)
        .set_offsets(&group, &topic, &[(0, 10), (1, 10)])
        .await
        .unwrap();
    let before = rows(&pool, &group).await;

    let refuse = |group: String, topic: String, partition: Option<i32>, from: ReplayFrom| {
        let (pool, kafka) = (&pool, &kafka);
        async move {
            let (result, _) = replay(
                pool,
                kafka,
                &group,
                &topic,
                partition,
                from,
                ReplayMode::Apply,
            )
            .await;
            result.expect_err("the request must be refused")
        }
    };

    let nobody = rand_name("nobody");
    let err = refuse(nobody.clone(), topic.clone(), None, ReplayFrom::Earliest).await;
    assert!(matches!(err, Error::Config(_)), "{err}");
    assert!(err.to_string().contains(&format!("`{nobody}`")), "{err}");

    let missing = rand_name("missing");
    let err = refuse(group.clone(), missing.clone(), None, ReplayFrom::Earliest).await;
    assert!(matches!(err, Error::UnknownTopic { .. }), "{err}");
    assert!(err.to_string().contains(&format!("`{missing}`")), "{err}");

    let err = refuse(group.clone(), other.clone(), None, ReplayFrom::Earliest).await;
    assert!(matches!(err, Error::Config(_)), "{err}");
    let text = err.to_string();
    assert!(
        text.contains(&format!("never consumed topic `{other}`")),
        "{text}"
    );

    let err = refuse(group.clone(), topic.clone(), Some(7), ReplayFrom::Earliest).await;
    let text = err.to_string();
    assert!(
        text.contains("no partition 7") && text.contains("0 to 1"),
        "{text}"
    );

    let err = refuse(
        group.clone(),
        topic.clone(),
        Some(1),
        ReplayFrom::Offset(11),
    )
    .await;
    let text = err.to_string();
    assert!(
        text.contains("offset 11") && text.contains("high watermark 10"),
        "{text}"
    );

    let day_ago = now_millis() - 86_400_000;
    let err = refuse(
        group.clone(),
        topic.clone(),
        None,
        ReplayFrom::Time(day_ago),
    )
    .await;
    let text = err.to_string();
    assert!(
        text.contains(&ReplayFrom::Time(day_ago).to_string()) && text.contains("earliest record"),
        "{text}"
    );

    let err = "last tuesday".parse::<ReplayFrom>().unwrap_err();
    assert!(err.to_string().contains("`last tuesday`"), "{err}");

    assert_eq!(
        rows(&pool, &group).await,
        before,
        "a refused replay changed offsets"
    );
}

// ---- Time ------------------------------------------------------------------------------------

fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

async fn a_time_resolves_to_the_first_record_at_or_after_it<DB: TestDb>() {
    let pool = DB::pool().await;
    let kafka = Kafka::new();
    let topic = rand_name("replay");
    let group = rand_name("g");
    kafka.create_topic(&topic, 1);
    // Twenty records one second apart, starting an hour ago.
    let t0 = now_millis() - 3_600_000;
    let producer = kafka.producer();
    for i in 0..20i64 {
        let id = format!("{topic}-{i}");
        let headers = OwnedHeaders::new().insert(Header {
            key: "event-id",
            value: Some(id.as_bytes()),
        });
        producer
            .send(
                BaseRecord::to(&topic)
                    .partition(0)
                    .key(id.as_str())
                    .payload("{}")
                    .headers(headers)
                    .timestamp(t0 + i * 1_000),
            )
            .map_err(|(e, _)| e)
            .unwrap();
    }
    producer.flush(Duration::from_secs(30)).unwrap();
    store(&pool)
        .set_offsets(&group, &topic, &[(0, 20)])
        .await
        .unwrap();

    let (pool_, kafka_, group_, topic_) = (&pool, &kafka, &group, &topic);
    let from = |t: i64| async move {
        let (report, _) = replay(
            pool_,
            kafka_,
            group_,
            topic_,
            None,
            ReplayFrom::Time(t),
            ReplayMode::DryRun,
        )
        .await;
        let report = report.unwrap();
        assert_eq!(report.len(), 1);
        assert_eq!(report[0].records, (report[0].to - report[0].from) as u64);
        report[0].from
    };
    assert_eq!(from(t0).await, 0, "the earliest record's own time");
    assert_eq!(from(t0 + 10_000).await, 10, "a record's exact time");
    assert_eq!(from(t0 + 10_500).await, 11, "between two records");
    assert_eq!(from(t0 + 19_000).await, 19, "the last record");
    assert_eq!(
        from(t0 + 60_000).await,
        20,
        "after the last record: nothing to replay"
    );

    // Applied, from the RFC 3339 text the consumer program is given.
    let text = ReplayFrom::Time(t0 + 10_500).to_string();
    let before = epochs(&rows(&pool, &group).await);
    let (report, _) = replay(
        &pool,
        &kafka,
        &group,
        &topic,
        Some(0),
        text.parse().unwrap(),
        ReplayMode::Apply,
    )
    .await;
    let report = report.unwrap();
    assert_eq!((report[0].from, report[0].to), (11, 20));
    let after = rows(&pool, &group).await;
    assert_eq!(after[0].next_offset, Some(11));
    assert!(after[0].epoch > before[&0]);

    // Nothing to replay changes nothing (not even the epoch).
    let (report, _) = replay(
        &pool,
        &kafka,
        &group,
        &topic,
        Some(0),
        ReplayFrom::Time(t0 + 60_000),
        ReplayMode::Apply,
    )
    .await;
    let report = report.unwrap();
    assert_eq!((report[0].from, report[0].to), (11, 11));
    assert_eq!(rows(&pool, &group).await, after);
}

// ---- The suite, once per backend ------------------------------------------------------------

suite!(
    dry_run_counts_the_range_exactly_and_changes_nothing,
    applied_replay_fences_the_running_consumer_which_reapplies_nothing,
    rebuild_reruns_exactly_the_events_of_its_range_once,
    rebuild_while_the_consumer_is_busy_reruns_exactly_the_reported_range,
    bad_requests_are_refused_naming_the_value,
    a_time_resolves_to_the_first_record_at_or_after_it,
);
