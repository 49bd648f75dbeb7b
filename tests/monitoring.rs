//! What the runtime shows the tools Kafka teams already run, and what it tells about brokers
//! that misbehave: the stored offsets mirrored to the consumer group in Kafka (read back from
//! the broker with a client of the test's own, never from the runtime), a frozen previous
//! owner that delays only the partition it holds locked. (Gaps in a partition's offsets are
//! tested inside the crate: the mock cluster writes no transaction markers and cannot
//! compact, so it never leaves one.)

use std::collections::HashMap;
use std::time::{Duration, Instant};

use consumer_runtime::rdkafka::config::ClientConfig;
use consumer_runtime::rdkafka::consumer::{BaseConsumer, CommitMode, Consumer as _};
use consumer_runtime::rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use consumer_runtime::sqlx;
use testkit::*;

testkit::mock_broker_entry!();

const WAIT: Duration = Duration::from_secs(60);

/// The group's committed offsets in Kafka for `topic`'s partitions, read from the broker
/// (OffsetFetch) by a client that is not a member of the group; `None` for a partition the
/// group has committed nothing for.
fn broker_committed(
    kafka: &Kafka,
    group: &str,
    topic: &str,
    partitions: i32,
) -> HashMap<i32, Option<i64>> {
    let client: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &kafka.bootstrap)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .expect("an OffsetFetch client");
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let committed = client
        .committed_offsets(tpl, Duration::from_secs(10))
        .expect("the group's committed offsets");
    committed
        .elements()
        .iter()
        .map(|e| {
            let offset = match e.offset() {
                Offset::Offset(o) => Some(o),
                _ => None,
            };
            (e.partition(), offset)
        })
        .collect()
}

/// Waits until the group's offsets in Kafka equal `expected` on every partition.
async fn wait_mirrored(
    kafka: &Kafka,
    group: &str,
    topic: &str,
    expected: &HashMap<i32, i64>,
    what: &str,
) {
    let deadline = Instant::now() + WAIT;
    loop {
        let (k, g, t, n) = (
            kafka.clone(),
            group.to_owned(),
            topic.to_owned(),
            expected.len() as i32,
        );
        let seen = tokio::task::spawn_blocking(move || broker_committed(&k, &g, &t, n))
            .await
            .unwrap();
        if expected.iter().all(|(p, o)| seen.get(p) == Some(&Some(*o))) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: Kafka holds {seen:?}, the database {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn stored_of(stored: &HashMap<(String, i32), i64>, topic: &str) -> HashMap<i32, i64> {
    stored
        .iter()
        .filter(|((t, _), _)| t == topic)
        .map(|((_, p), o)| (*p, *o))
        .collect()
}

/// After catching up, the group's committed offsets that Kafka's own tools read
/// (`kafka-consumer-groups.sh`, Burrow, KEDA) equal the stored ones.
async fn the_group_offsets_in_kafka_mirror_the_stored_ones<DB: TestDb>() {
    let pool = DB::pool().await;
    let (kafka, topic, group, records, ids) = produced("mirror", 3, 300, 30);
    let mut consumer = Consumer::start(&kafka, &pool, &topic, Counter::new(&group), |rt| {
        rt.batch_size(20)
    });
    consumer.wait_caught_up(&ends_of(&records)).await;
    let stored = stored_of(&stored_offsets(&pool, &group).await, &topic);
    assert_eq!(stored, ends_of(&records));
    wait_mirrored(
        &kafka,
        &group,
        &topic,
        &stored,
        "the mirror of the stored offsets",
    )
    .await;
    consumer.stop().await;
    assert_exactly_once(&effect_counts(&pool, &group).await, &ids);
    assert_eq!(
        stored_of(&stored_offsets(&pool, &group).await, &topic),
        stored,
        "the mirror changed nothing in the database"
    );
}

testkit::suite!(the_group_offsets_in_kafka_mirror_the_stored_ones);

/// With the mirror turned off the runtime commits nothing to the group in Kafka.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_the_mirror_off_kafka_holds_no_offsets_for_the_group() {
    let pool = pg_pool().await;
    let (kafka, topic, group, records, _) = produced("nomirror", 2, 100, 0);
    let mut consumer = Consumer::start(&kafka, &pool, &topic, Counter::new(&group), |rt| {
        rt.mirror_offsets(false)
    });
    consumer.wait_caught_up(&ends_of(&records)).await;
    consumer.stop().await;
    let (k, g, t) = (kafka.clone(), group.clone(), topic.clone());
    let seen = tokio::task::spawn_blocking(move || broker_committed(&k, &g, &t, 2))
        .await
        .unwrap();
    assert_eq!(seen, HashMap::from([(0, None), (1, None)]));
}

/// A zombie (a member that owned the partition, froze, and was replaced) wakes up and
/// commits the offset it had reached to the group in Kafka, as its mirror would. The group's
/// offset in Kafka ends up at the owner's stored offset all the same: the broker refuses a
/// commit from a member of an older generation, and a late commit that lands anyway is undone
/// by the owner's next mirror commit (at the latest its periodic one, even with no new
/// records). The database's offsets never move.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_zombies_late_mirror_commit_cannot_hold_the_group_offset_back() {
    let pool = pg_pool().await;
    let (kafka, topic, group, records, ids) = produced("zombie", 1, 200, 0);

    // The zombie owns partition 0 first, then stops polling: after max.poll.interval.ms it
    // is out of the group, and the runtime gets the partition.
    let zombie: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &kafka.bootstrap)
        .set("group.id", &group)
        .set("enable.auto.commit", "false")
        .set("session.timeout.ms", "6000")
        .set("max.poll.interval.ms", "6000")
        .set("heartbeat.interval.ms", "500")
        .set("partition.assignment.strategy", "cooperative-sticky")
        .create()
        .expect("the zombie");
    zombie.subscribe(&[&topic]).unwrap();
    let deadline = Instant::now() + WAIT;
    while zombie.assignment().unwrap().count() < 1 {
        assert!(Instant::now() < deadline, "the zombie got no assignment");
        let _ = zombie.poll(Duration::from_millis(100));
    }

    let mut owner = Consumer::start(&kafka, &pool, &topic, Counter::new(&group), |rt| {
        rt.batch_size(20)
    });
    owner.wait_caught_up(&ends_of(&records)).await;
    let stored = stored_of(&stored_offsets(&pool, &group).await, &topic);
    wait_mirrored(&kafka, &group, &topic, &stored, "the owner's mirror").await;

    // The zombie wakes and commits offset 10 without polling first (it does not know it was
    // replaced).
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&topic, 0, Offset::Offset(10))
        .unwrap();
    let late = zombie.commit(&tpl, CommitMode::Sync);
    eprintln!("the zombie's late commit: {late:?}");
    wait_mirrored(
        &kafka,
        &group,
        &topic,
        &stored,
        "the group's offset to be the owner's",
    )
    .await;
    drop(zombie);

    assert_eq!(
        stored_of(&stored_offsets(&pool, &group).await, &topic),
        stored
    );
    owner.stop().await;
    assert_exactly_once(&effect_counts(&pool, &group).await, &ids);
}

/// Another member of the group's current generation commits an old offset (a commit that
/// raced the owner's): the group's offset in Kafka moves backwards only until the owner's next
/// mirror commit, which comes within seconds even with no new records.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_old_offset_committed_by_another_member_is_overwritten_by_the_owners_next_mirror() {
    let pool = pg_pool().await;
    let (kafka, topic, group, records, ids) = produced("racing", 1, 200, 0);
    let mut owner = Consumer::start(&kafka, &pool, &topic, Counter::new(&group), |rt| {
        rt.batch_size(20)
    });
    owner.wait_caught_up(&ends_of(&records)).await;
    owner.stop().await;
    let stored = stored_of(&stored_offsets(&pool, &group).await, &topic);
    wait_mirrored(&kafka, &group, &topic, &stored, "the owner's last mirror").await;

    // Back to offset 10 in Kafka (the group is empty: any client may commit), then the owner
    // again, with nothing new to consume.
    kafka.commit_kafka_offsets(&group, &topic, 1, 10);
    let owner = Consumer::start(&kafka, &pool, &topic, Counter::new(&group), |rt| rt);
    wait_mirrored(
        &kafka,
        &group,
        &topic,
        &stored,
        "the owner to overwrite the old offset",
    )
    .await;
    owner.stop().await;
    assert_eq!(
        stored_of(&stored_offsets(&pool, &group).await, &topic),
        stored
    );
    assert_exactly_once(&effect_counts(&pool, &group).await, &ids);
}

/// A previous owner frozen in the middle of a batch (here: a transaction of the test's own,
/// holding partition 0's offsets row locked) delays the new owner's claim of that partition
/// only: the other partitions are claimed and consumed to the end meanwhile, and partition 0
/// follows once the lock is gone. (SQLite has one writer and no row locks: a frozen
/// transaction there holds every write, claims included, until the busy timeout.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_frozen_owner_delays_only_the_partition_it_holds_locked() {
    let pool = pg_pool().await;
    let (kafka, topic, group, records, ids) = produced("frozen", 4, 400, 0);
    let ends = ends_of(&records);
    store(&pool)
        .set_offsets(&group, &topic, &[(0, 0), (1, 0), (2, 0), (3, 0)])
        .await
        .unwrap();
    let mut frozen = pool.begin().await.unwrap();
    sqlx::query(
        "SELECT 1 FROM consumer_runtime.consumer_offsets \
         WHERE consumer_group = $1 AND topic = $2 AND partition = 0 FOR UPDATE",
    )
    .bind(&group)
    .bind(&topic)
    .execute(&mut *frozen)
    .await
    .unwrap();

    let mut consumer = Consumer::start(&kafka, &pool, &topic, Counter::new(&group), |rt| {
        rt.batch_size(20)
    });
    let others: HashMap<i32, i64> = ends
        .iter()
        .filter(|(p, _)| **p != 0)
        .map(|(p, o)| (*p, *o))
        .collect();
    consumer.wait_caught_up_within(WAIT, &others).await;
    let stored = stored_of(&stored_offsets(&pool, &group).await, &topic);
    assert_eq!(stored[&0], 0, "partition 0 is held by the frozen owner");

    frozen.rollback().await.unwrap();
    consumer.wait_caught_up(&ends).await;
    consumer.stop().await;
    assert_exactly_once(&effect_counts(&pool, &group).await, &ids);
}

/// A partition with lag that receives nothing for the stall timeout (here: the broker fails
/// every fetch for a while) is reported stalled, and is no longer once records flow again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_partition_that_receives_nothing_while_it_has_lag_is_reported_stalled() {
    use consumer_runtime::rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

    let pool = pg_pool().await;
    let (kafka, topic, group, records, _) = produced("stall", 1, 20, 0);
    let runtime = test_runtime(&kafka, &pool, Counter::new(&group), &topic)
        .group(&group)
        .stall_timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    let (health, stats, stop) = (runtime.health(), runtime.stats(), runtime.shutdown_handle());
    let run = tokio::spawn(runtime.run());
    wait_caught_up(&pool, &group, &topic, &ends_of(&records)).await;
    assert!(
        health.stalled().is_empty(),
        "a caught-up partition is not stalled"
    );

    kafka.request_errors(
        RDKafkaApiKey::Fetch,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT; 6],
    );
    let (more, _) = events_with_duplicates("late", 20, 1, 0);
    kafka.produce(&topic, &more);
    wait_until(WAIT, "the partition to be reported stalled", || async {
        health.stalled() == vec![(topic.clone(), 0)]
    })
    .await;

    wait_caught_up(&pool, &group, &topic, &HashMap::from([(0, 40)])).await;
    wait_until(WAIT, "the stall to clear", || async {
        health.stalled().is_empty()
    })
    .await;
    assert!(health.joined() && health.alive(Duration::from_secs(5)));
    stop.shutdown();
    run.await.unwrap().unwrap();
    assert_eq!(stats.snapshot().applied, 40);
}
