//! The transactional outbox and its relay, with a real database and the mock broker: rows
//! written in the application's transaction reach Kafka with their event id, once the
//! transaction commits and never if it rolls back; unpublishable rows are parked; a handler
//! emits through its context in its own transaction; and on PostgreSQL, relays share the lanes,
//! keep per-key commit order, wake on `NOTIFY`, and a relay that lost its lane while frozen
//! cannot mark its rows.
//!
//! Each test uses a schema (PostgreSQL) or a file (SQLite) of its own, so that the relays of
//! tests running at the same time never see each other's outbox.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use consumer_runtime::outbox::{self, Message, Outbox};
use consumer_runtime::relay::{Relay, RelayShutdown, RelayStatsHandle};
use consumer_runtime::sqlx::{self, Pool, Postgres};
use consumer_runtime::{Backend, Context, Handler, HandlerError, Raw, Store};
use rdkafka::Message as _;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::message::Headers as _;
use testkit::{Kafka, TestDb, rand_name, suite, wait_until};

testkit::mock_broker_entry!();

const WAIT: Duration = Duration::from_secs(60);

/// A pool of `DB` with the runtime's tables in a schema of the test's own.
async fn setup<DB: TestDb>() -> (Pool<DB>, String) {
    let pool = DB::pool().await;
    let schema = rand_name("ob");
    consumer_runtime::migrate(&pool, &schema).await.unwrap();
    (pool, schema)
}

/// One record read back from a topic.
#[derive(Debug, Clone)]
struct Read {
    partition: i32,
    offset: i64,
    key: Option<String>,
    event_id: String,
    payload: Vec<u8>,
    headers: Vec<(String, Vec<u8>)>,
}

/// Reads `topic` from the beginning until it holds `n` records (or the deadline).
fn read_topic(kafka: &Kafka, topic: &str, partitions: i32, n: usize) -> Vec<Read> {
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &kafka.bootstrap)
        .set("group.id", rand_name("reader"))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, rdkafka::Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    let mut out = Vec::new();
    while out.len() < n && std::time::Instant::now() < deadline {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
            let headers: Vec<(String, Vec<u8>)> = m
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|h| (h.key.to_owned(), h.value.unwrap_or_default().to_vec()))
                        .collect()
                })
                .unwrap_or_default();
            let event_id = headers
                .iter()
                .find(|(k, _)| k == "event-id")
                .map(|(_, v)| String::from_utf8(v.clone()).unwrap())
                .expect("every relayed record has an event-id header");
            out.push(Read {
                partition: m.partition(),
                offset: m.offset(),
                key: m.key().map(|k| String::from_utf8(k.to_vec()).unwrap()),
                event_id,
                payload: m.payload().unwrap_or_default().to_vec(),
                headers,
            });
        }
    }
    out
}

/// Starts a relay on a task of its own; the handle stops it.
fn start<DB: Backend>(
    relay: Relay<DB>,
) -> (RelayShutdown, RelayStatsHandle, tokio::task::JoinHandle<()>) {
    let stop = relay.shutdown_handle();
    let stats = relay.stats_handle();
    let task = tokio::spawn(async move { relay.run().await.expect("the relay runs") });
    (stop, stats, task)
}

async fn published<DB: Backend>(store: &Store<DB>, ids: &[String]) -> bool {
    for id in ids {
        let t = store.trace(id).await.unwrap();
        if t.outbox.is_none_or(|r| r.published_at.is_none()) {
            return false;
        }
    }
    true
}

/// Rows written in a committed transaction reach the topic with their key, payload, headers
/// and event id; a rolled-back transaction's row never does; the outbox records the partition
/// and offset the broker gave each row, which `trace` shows.
async fn committed_rows_are_published_with_their_event_id_and_receipt<DB: TestDb>()
where
    for<'c> sqlx::Transaction<'c, DB>: outbox::OutboxConnection,
{
    let (pool, schema) = setup::<DB>().await;
    let kafka = Kafka::new();
    let topic = rand_name("paid");
    kafka.create_topic(&topic, 3);
    let ob = Outbox::new(&schema).unwrap();

    let mut tx = pool.begin().await.unwrap();
    let mut ids = Vec::new();
    for i in 0..3 {
        let msg = Message::new(&topic)
            .key(format!("order-{i}"))
            .payload(format!("{{\"order\":{i}}}"))
            .header("trace", "t-1")
            .kind("OrderPaid");
        ids.push(ob.publish(&mut tx, &msg).await.unwrap());
    }
    tx.commit().await.unwrap();
    let mut tx = pool.begin().await.unwrap();
    let rolled_back = ob
        .publish(&mut tx, &Message::new(&topic).key("order-x").payload("x"))
        .await
        .unwrap();
    tx.rollback().await.unwrap();

    let relay = Relay::builder(pool.clone())
        .schema(&schema)
        .brokers(&kafka.bootstrap)
        .lanes(4)
        .poll_interval(Duration::from_millis(100))
        .keep_published(Duration::from_secs(3600))
        .build()
        .unwrap();
    let (stop, stats, task) = start(relay);
    let store = Store::new(pool.clone(), &schema).unwrap();
    wait_until(WAIT, "the rows to be published", || published(&store, &ids)).await;

    let read = read_topic(&kafka, &topic, 3, 3);
    assert_eq!(read.len(), 3, "{read:?}");
    for (i, id) in ids.iter().enumerate() {
        let r = read
            .iter()
            .find(|r| &r.event_id == id)
            .expect("each row is on the topic");
        assert_eq!(r.key.as_deref(), Some(format!("order-{i}").as_str()));
        assert_eq!(r.payload, format!("{{\"order\":{i}}}").into_bytes());
        assert!(
            r.headers
                .contains(&("type".to_owned(), b"OrderPaid".to_vec()))
        );
        assert!(r.headers.contains(&("trace".to_owned(), b"t-1".to_vec())));
        let t = store.trace(id).await.unwrap();
        let row = t.outbox.clone().unwrap();
        assert_eq!(
            (
                row.published_partition,
                row.published_offset,
                row.sent_count
            ),
            (Some(r.partition), Some(r.offset), 1),
            "the receipt is where the broker put the record"
        );
        let text = t.lines().join("\n");
        assert!(
            text.contains(&format!("{topic}/{}/{}", r.partition, r.offset)),
            "{text}"
        );
    }
    assert!(read.iter().all(|r| r.event_id != rolled_back));
    assert!(store.trace(&rolled_back).await.unwrap().outbox.is_none());
    assert_eq!(stats.get().published, 3);
    stop.shutdown();
    task.await.unwrap();
}

/// A row the broker can never take (larger than the producer's limit) is parked with its
/// error and shown as parked; the next row of the same key is published anyway; and published
/// rows are cleaned up (the default keeps none), leaving only the parked one.
async fn an_unpublishable_row_is_parked_and_the_key_goes_on<DB: TestDb>()
where
    for<'c> sqlx::Transaction<'c, DB>: outbox::OutboxConnection,
{
    let (pool, schema) = setup::<DB>().await;
    let kafka = Kafka::new();
    let topic = rand_name("big");
    kafka.create_topic(&topic, 1);
    let ob = Outbox::new(&schema).unwrap();
    let mut tx = pool.begin().await.unwrap();
    let too_large = ob
        .publish(
            &mut tx,
            &Message::new(&topic).key("k").payload(vec![b'x'; 2_000_000]),
        )
        .await
        .unwrap();
    let next = ob
        .publish(&mut tx, &Message::new(&topic).key("k").payload("small"))
        .await
        .unwrap();
    tx.commit().await.unwrap();

    let relay = Relay::builder(pool.clone())
        .schema(&schema)
        .brokers(&kafka.bootstrap)
        .lanes(2)
        .poll_interval(Duration::from_millis(100))
        .build()
        .unwrap();
    let (stop, stats, task) = start(relay);
    let store = Store::new(pool.clone(), &schema).unwrap();
    wait_until(WAIT, "the large row to be parked", || async {
        store.outbox_parked().await.unwrap().len() == 1
    })
    .await;
    let parked = store.outbox_parked().await.unwrap();
    assert_eq!(parked[0].id, too_large);
    let error = parked[0].error.clone().unwrap();
    assert!(error.to_lowercase().contains("size"), "{error}");
    let read = read_topic(&kafka, &topic, 1, 1);
    assert_eq!(read.len(), 1);
    assert_eq!(read[0].event_id, next);
    // The published row is deleted; the parked one stays.
    wait_until(WAIT, "the published row to be cleaned up", || async {
        store.trace(&next).await.unwrap().outbox.is_none()
    })
    .await;
    assert!(store.trace(&too_large).await.unwrap().outbox.is_some());
    let text = store.trace(&too_large).await.unwrap().lines().join("\n");
    assert!(text.contains("parked"), "{text}");
    assert_eq!(stats.get().parked, 1);
    stop.shutdown();
    task.await.unwrap();
}

/// The test handler: emits one outbox row per event through its context, and fails its first
/// try when told to, after writing the row.
struct Emitter {
    topic: String,
    event_id: String,
    fail_first: bool,
}

impl<DB: Backend> Handler<DB> for Emitter {
    type Event = Raw;

    async fn handle(&self, ctx: &mut Context<'_, DB>, event: Raw) -> Result<(), HandlerError> {
        let key = ctx.record().event_id().to_owned();
        let message = Message::new(&self.topic)
            .key(key)
            .payload(event.0)
            .event_id(&self.event_id);
        ctx.publish(&message).await?;
        if self.fail_first && ctx.attempt() == 1 {
            return Err(HandlerError::retry(
                "the first try fails after the outbox write",
            ));
        }
        Ok(())
    }
}

/// A handler's outbox row commits with its transaction: a try that rolls back leaves no row,
/// the one that commits leaves it, in the runtime's schema.
async fn a_handler_emits_in_its_own_transaction<DB: TestDb>() {
    use consumer_runtime::testing::{self, TestRecord};
    let pool = DB::pool().await;
    let store = Store::new(pool.clone(), testkit::SCHEMA).unwrap();
    let emitted = rand_name("emitted");
    let handler = |fail_first| Emitter {
        topic: rand_name("t"),
        event_id: emitted.clone(),
        fail_first,
    };
    let record = || TestRecord::new(b"payload".to_vec()).event_id("e-1");
    // `testing::handle` runs one try: this one fails after writing its row, and rolls back.
    assert!(
        testing::handle(&handler(true), &pool, record())
            .await
            .is_err()
    );
    assert!(
        store.trace(&emitted).await.unwrap().outbox.is_none(),
        "the rolled-back try left no row"
    );
    testing::handle(&handler(false), &pool, record())
        .await
        .unwrap();
    let row = store
        .trace(&emitted)
        .await
        .unwrap()
        .outbox
        .expect("the committed try's row");
    assert_eq!(row.aggregateid.as_deref(), Some("e-1"));
}

suite!(
    committed_rows_are_published_with_their_event_id_and_receipt,
    an_unpublishable_row_is_parked_and_the_key_goes_on,
    a_handler_emits_in_its_own_transaction,
);

/// Reads the outbox's rows in seq order as (key, event id).
async fn seq_order(pool: &Pool<Postgres>, schema: &str) -> Vec<(String, String)> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT aggregateid, id FROM {schema}.outbox ORDER BY seq"
    )))
    .fetch_all(pool)
    .await
    .unwrap()
}

/// Two relays share the lanes (each publishes some), and every key's records reach Kafka in
/// the order their transactions committed, while writers keep committing concurrently.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_relays_share_the_lanes_and_keep_order_per_key() {
    let (pool, schema) = setup::<Postgres>().await;
    let kafka = Kafka::new();
    let topic = rand_name("ordered");
    kafka.create_topic(&topic, 4);
    let relay = |name: &str| {
        Relay::builder(pool.clone())
            .schema(&schema)
            .brokers(&kafka.bootstrap)
            .lanes(8)
            .batch_size(20)
            .lease(Duration::from_secs(2))
            .poll_interval(Duration::from_millis(100))
            .keep_published(Duration::from_secs(3600))
            .instance(name)
            .build()
            .unwrap()
    };
    let (stop_a, stats_a, task_a) = start(relay("relay-a"));
    let (stop_b, stats_b, task_b) = start(relay("relay-b"));
    // The relays share the lanes before the rows come, so that each has some to publish (the
    // one that starts first holds all eight until the other announces itself).
    wait_until(WAIT, "both relays to hold lanes", || {
        let (a, b) = (stats_a.get().lanes, stats_b.get().lanes);
        async move { a > 0 && b > 0 && a + b == 8 }
    })
    .await;
    // Four writers, each committing one row at a time for keys shared by all writers (all
    // four write the same key at about the same time): rows of one key come from several
    // transactions that race.
    let ob = Outbox::new(&schema).unwrap();
    let mut writers = Vec::new();
    for w in 0..4 {
        let pool = pool.clone();
        let ob = ob.clone();
        let topic = topic.clone();
        writers.push(tokio::spawn(async move {
            for i in 0..75 {
                let mut tx = pool.begin().await.unwrap();
                let key = format!("key-{}", i % 24);
                ob.publish(
                    &mut tx,
                    &Message::new(&topic).key(key).payload(format!("{w}-{i}")),
                )
                .await
                .unwrap();
                // Hold the transaction open a while, so that the writers' transactions of one
                // key overlap: without the writer's lock on the key, a row drawn later could
                // commit (and be published) first.
                tokio::time::sleep(Duration::from_millis(((i * 7 + w * 5) % 6) as u64)).await;
                tx.commit().await.unwrap();
            }
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    let order = seq_order(&pool, &schema).await;
    assert_eq!(order.len(), 300);
    let ids: Vec<String> = order.iter().map(|(_, id)| id.clone()).collect();
    let store = Store::new(pool.clone(), &schema).unwrap();
    wait_until(WAIT, "all rows to be published", || published(&store, &ids)).await;
    let read = read_topic(&kafka, &topic, 4, 300);
    assert!(read.len() >= 300, "{}", read.len());
    // Per key, the first copy of each event id, by offset, is in commit (= seq) order.
    let mut by_key: HashMap<String, Vec<&Read>> = HashMap::new();
    for r in &read {
        by_key.entry(r.key.clone().unwrap()).or_default().push(r);
    }
    for (key, mut records) in by_key {
        records.sort_by_key(|r| (r.partition, r.offset));
        let mut seen = std::collections::HashSet::new();
        let got: Vec<&str> = records
            .iter()
            .filter(|r| seen.insert(r.event_id.clone()))
            .map(|r| r.event_id.as_str())
            .collect();
        let want: Vec<&str> = order
            .iter()
            .filter(|(k, _)| *k == key)
            .map(|(_, id)| id.as_str())
            .collect();
        assert_eq!(got, want, "key {key} is out of commit order");
    }
    let (a, b) = (stats_a.get(), stats_b.get());
    assert!(
        a.published > 0 && b.published > 0,
        "both relays publish: {a:?} {b:?}"
    );
    assert_eq!(a.published + b.published, 300, "{a:?} {b:?}");
    let leases = store.outbox_leases().await.unwrap();
    let owners: std::collections::HashSet<_> =
        leases.iter().filter_map(|l| l.owner.clone()).collect();
    assert_eq!(owners.len(), 2, "{leases:?}");
    stop_a.shutdown();
    stop_b.shutdown();
    task_a.await.unwrap();
    task_b.await.unwrap();
}

/// A relay of one lane on PostgreSQL, started, with a topic of one partition; published rows
/// are kept, for `trace`.
struct OneLane {
    pool: Pool<Postgres>,
    topic: String,
    ob: Outbox,
    store: Store<Postgres>,
    stop: RelayShutdown,
    task: tokio::task::JoinHandle<()>,
    _kafka: Kafka,
}

impl OneLane {
    async fn start(prefix: &str, poll_interval: Option<Duration>) -> OneLane {
        let (pool, schema) = setup::<Postgres>().await;
        let kafka = Kafka::new();
        let topic = rand_name(prefix);
        kafka.create_topic(&topic, 1);
        let mut relay = Relay::builder(pool.clone())
            .schema(&schema)
            .brokers(&kafka.bootstrap)
            .lanes(1)
            .keep_published(Duration::from_secs(3600));
        if let Some(every) = poll_interval {
            relay = relay.poll_interval(every);
        }
        let (stop, stats, task) = start(relay.build().unwrap());
        wait_until(WAIT, "the relay to lease its lane", || async {
            stats.get().lanes == 1
        })
        .await;
        OneLane {
            ob: Outbox::new(&schema).unwrap(),
            store: Store::new(pool.clone(), &schema).unwrap(),
            pool,
            topic,
            stop,
            task,
            _kafka: kafka,
        }
    }

    async fn stop(self) {
        self.stop.shutdown();
        self.task.await.unwrap();
    }
}

/// A relay that polls only once a minute still publishes a new row at once: the writer's
/// `NOTIFY` wakes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn notify_wakes_the_relay_before_its_poll() {
    let relay = OneLane::start("woken", Some(Duration::from_secs(600))).await;
    let (pool, ob, store, topic) = (&relay.pool, &relay.ob, &relay.store, &relay.topic);
    let write = |payload: &'static str| {
        let (pool, ob, topic) = (pool.clone(), ob.clone(), topic.clone());
        async move {
            let mut tx = pool.begin().await.unwrap();
            let id = ob
                .publish(&mut tx, &Message::new(&topic).key("k").payload(payload))
                .await
                .unwrap();
            tx.commit().await.unwrap();
            id
        }
    };
    // The first row may be found by the pass that the listener's start-up triggers; once it
    // is published (and any wake-up left over is spent), the relay sleeps for 600 s.
    let first = write("first").await;
    wait_until(WAIT, "the first row to be published", || {
        published(store, std::slice::from_ref(&first))
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second = write("second").await;
    // Well under the 600 s poll: only the notification can have woken it.
    wait_until(
        Duration::from_secs(30),
        "the notified row to be published",
        || published(store, std::slice::from_ref(&second)),
    )
    .await;
    relay.stop().await;
}

/// A row whose transaction commits after rows with higher `seq` were published is published
/// too, and at once: the relay's reads start from a floor that rises past a `seq` only once
/// every transaction that could have drawn a lower one has ended (the floor's fallback to 0
/// comes only every 5 s, well after the deadline below).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_row_that_commits_after_later_rows_were_published_is_published_at_once() {
    let relay = OneLane::start("late", None).await;
    let (pool, ob, store, topic) = (&relay.pool, &relay.ob, &relay.store, &relay.topic);
    // The late row draws its seq first, and its transaction stays open.
    let mut late_tx = pool.begin().await.unwrap();
    let late = ob
        .publish(
            &mut late_tx,
            &Message::new(topic).key("late").payload("late"),
        )
        .await
        .unwrap();
    // Rows with higher seqs commit and are published, pass after pass.
    for round in 0..5 {
        let mut ids = Vec::new();
        for i in 0..3 {
            let mut tx = pool.begin().await.unwrap();
            let message = Message::new(topic)
                .key(format!("k{round}-{i}"))
                .payload("on time");
            ids.push(ob.publish(&mut tx, &message).await.unwrap());
            tx.commit().await.unwrap();
        }
        wait_until(WAIT, "the rows committed on time to be published", || {
            published(store, &ids)
        })
        .await;
    }
    assert!(
        !published(store, std::slice::from_ref(&late)).await,
        "an uncommitted row cannot be published"
    );
    late_tx.commit().await.unwrap();
    wait_until(
        Duration::from_secs(3),
        "the late row to be published (not skipped by the read floor until its reset)",
        || published(store, std::slice::from_ref(&late)),
    )
    .await;
    relay.stop().await;
}

/// A relay frozen after the broker acknowledged its batch, but before it marked it, loses its
/// lane when its lease runs out; another relay takes the lane (new epoch) and publishes the
/// rows. When the frozen relay resumes, the epoch fences it: it cannot mark the rows (they
/// stay marked by the new owner), and it drops the lane. Its sends were duplicates, counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_frozen_relay_cannot_mark_the_rows_of_a_lane_it_lost() {
    let (pool, schema) = setup::<Postgres>().await;
    let kafka = Kafka::new();
    let topic = rand_name("fenced");
    kafka.create_topic(&topic, 1);
    let ob = Outbox::new(&schema).unwrap();
    let mut tx = pool.begin().await.unwrap();
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(
            ob.publish(
                &mut tx,
                &Message::new(&topic).key("k").payload(format!("{i}")),
            )
            .await
            .unwrap(),
        );
    }
    tx.commit().await.unwrap();
    let arrived = Arc::new(tokio::sync::Notify::new());
    let release = Arc::new(tokio::sync::Notify::new());
    let relay = |name: &str| {
        Relay::builder(pool.clone())
            .schema(&schema)
            .brokers(&kafka.bootstrap)
            .lanes(1)
            .lease(Duration::from_secs(1))
            .poll_interval(Duration::from_millis(100))
            .keep_published(Duration::from_secs(3600))
            .instance(name)
    };
    let frozen = relay("frozen")
        .__pause_before_first_mark(arrived.clone(), release.clone())
        .build()
        .unwrap();
    let (stop_a, stats_a, task_a) = start(frozen);
    tokio::time::timeout(WAIT, arrived.notified())
        .await
        .expect("the first relay sends its batch and freezes");
    let (stop_b, _stats_b, task_b) = start(relay("successor").build().unwrap());
    let store = Store::new(pool.clone(), &schema).unwrap();
    wait_until(WAIT, "the successor to publish the lane's rows", || {
        published(&store, &ids)
    })
    .await;
    release.notify_one();
    wait_until(WAIT, "the frozen relay to find itself fenced", || async {
        stats_a.get().fenced >= 1
    })
    .await;
    for id in &ids {
        let row = store.trace(id).await.unwrap().outbox.unwrap();
        assert_eq!(row.published_by.as_deref(), Some("successor"), "{row:?}");
        assert_eq!(row.sent_count, 2, "sent by both relays: {row:?}");
    }
    assert_eq!(stats_a.get().published, 0);
    let read = read_topic(&kafka, &topic, 1, 10);
    assert_eq!(
        read.len(),
        10,
        "each row twice on the topic: the frozen relay's copies are duplicates"
    );
    stop_a.shutdown();
    stop_b.shutdown();
    task_a.await.unwrap();
    task_b.await.unwrap();
}

/// Two transactions writing the same key: the second waits for the first (the writer's lock
/// on the key), so that rows of one key are drawn, and committed, in one order. (Without it,
/// the second could commit first and the relay publish it first.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_writer_waits_for_an_open_transaction_of_the_same_key() {
    let (pool, schema) = setup::<Postgres>().await;
    let ob = Outbox::new(&schema).unwrap();
    let key = rand_name("key");
    let topic = rand_name("t");
    let mut first = pool.begin().await.unwrap();
    let a = ob
        .publish(&mut first, &Message::new(&topic).key(&key).payload("a"))
        .await
        .unwrap();
    let second = {
        let (pool, ob, key, topic) = (pool.clone(), ob.clone(), key.clone(), topic.clone());
        tokio::spawn(async move {
            let mut tx = pool.begin().await.unwrap();
            let b = ob
                .publish(&mut tx, &Message::new(&topic).key(&key).payload("b"))
                .await
                .unwrap();
            tx.commit().await.unwrap();
            b
        })
    };
    // The second writer waits on the key's advisory lock.
    let objid = i64::from(outbox::key_hash(key.as_bytes()));
    wait_until(
        WAIT,
        "the second writer to wait for the key's lock",
        || async {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted
             AND classid = $1::bigint::oid AND objid = $2::bigint::oid",
            )
            .bind(0x6f75_7462_i64)
            .bind(objid)
            .fetch_one(&pool)
            .await
            .unwrap();
            waiting == 1
        },
    )
    .await;
    assert!(!second.is_finished());
    first.commit().await.unwrap();
    let b = second.await.unwrap();
    let order = seq_order(&pool, &schema).await;
    let ids: Vec<&str> = order.iter().map(|(_, id)| id.as_str()).collect();
    assert_eq!(ids, [a.as_str(), b.as_str()]);
}
