//! Shared helpers for the integration tests: a real PostgreSQL (and SQLite) database, a
//! librdkafka mock cluster, random names, a non-idempotent test handler, and polling with a
//! deadline.
#![allow(dead_code, unreachable_pub, missing_docs)]

pub mod private_pg;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use consumer_runtime::rdkafka::config::ClientConfig;
use consumer_runtime::rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use consumer_runtime::rdkafka::message::{Header, OwnedHeaders};
use consumer_runtime::rdkafka::mocking::MockCluster;
use consumer_runtime::rdkafka::producer::{
    BaseProducer, BaseRecord, DefaultProducerContext, Producer,
};
use consumer_runtime::rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use consumer_runtime::sqlx::{self, Pool, Postgres, Row, Sqlite};
use consumer_runtime::{Backend, Context, Handler, HandlerError, Json};

pub const SCHEMA: &str = "consumer_runtime";

/// The runtime's tables in the test schema of `pool`'s database.
pub fn store<DB: Backend>(pool: &Pool<DB>) -> consumer_runtime::Store<DB> {
    consumer_runtime::Store::new(pool.clone(), SCHEMA).expect("the test schema is a valid name")
}

pub fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,librdkafka=error".into()),
        )
        .with_test_writer()
        .try_init();
}

/// A random lowercase name with a prefix, unique per test run.
pub fn rand_name(prefix: &str) -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos(),
    );
    format!("{prefix}_{:012x}", h.finish() & 0xffff_ffff_ffff)
}

/// A database the behaviour suite runs against: each test gets a pool with the runtime's
/// migrations applied, the `test_effects` table, and the crash-point trigger.
#[async_trait::async_trait]
pub trait TestDb: Backend {
    /// How many batches can commit at once (SQLite: one writer), to size slow test workloads.
    const WRITERS: u32;

    /// A ready pool (PostgreSQL: the shared test database; SQLite: a fresh file).
    async fn pool() -> Pool<Self>;

    /// The non-idempotent test effect: `count = count + 1` for (group, event id).
    async fn apply_effect(
        conn: &mut Self::Connection,
        group: &str,
        event_id: &str,
    ) -> Result<(), sqlx::Error>;

    /// How often each event id's effect was applied for `group`.
    async fn effect_counts(pool: &Pool<Self>, group: &str) -> HashMap<String, i64>;

    /// Rows of the dedup ledger for `group`.
    async fn ledger_rows(pool: &Pool<Self>, group: &str) -> i64;

    /// From now on, every commit that would move `group`'s stored offset past `after_offset`
    /// fails (a database error raised by a trigger), until [`TestDb::clear_crash_point`].
    async fn set_crash_point(pool: &Pool<Self>, group: &str, after_offset: i64);

    /// Removes `group`'s crash point.
    async fn clear_crash_point(pool: &Pool<Self>, group: &str);
}

const EFFECT_SQL: &str =
    "INSERT INTO test_effects (consumer_group, event_id, count) VALUES ($1, $2, 1)
     ON CONFLICT (consumer_group, event_id) DO UPDATE SET count = test_effects.count + 1";
const EFFECTS_TABLE: &str = "CREATE TABLE IF NOT EXISTS test_effects (
     consumer_group TEXT NOT NULL,
     event_id TEXT NOT NULL,
     count INTEGER NOT NULL,
     PRIMARY KEY (consumer_group, event_id))";
const CRASH_TABLE: &str = "CREATE TABLE IF NOT EXISTS test_crash_points (
     consumer_group TEXT PRIMARY KEY,
     after_offset BIGINT NOT NULL)";

/// The test methods that are the same SQL on both databases.
macro_rules! impl_test_db {
    ($db:ty, $writers:literal, $ledger:literal, $pool:path) => {
        #[async_trait::async_trait]
        impl TestDb for $db {
            const WRITERS: u32 = $writers;

            async fn pool() -> Pool<$db> {
                $pool().await
            }

            async fn apply_effect(
                conn: &mut <$db as sqlx::Database>::Connection,
                group: &str,
                event_id: &str,
            ) -> Result<(), sqlx::Error> {
                sqlx::query(EFFECT_SQL)
                    .bind(group)
                    .bind(event_id)
                    .execute(conn)
                    .await?;
                Ok(())
            }

            async fn effect_counts(pool: &Pool<Self>, group: &str) -> HashMap<String, i64> {
                sqlx::query("SELECT event_id, count FROM test_effects WHERE consumer_group = $1")
                    .bind(group)
                    .fetch_all(pool)
                    .await
                    .unwrap()
                    .into_iter()
                    .map(|r| (r.get::<String, _>(0), r.get::<i32, _>(1) as i64))
                    .collect()
            }

            async fn ledger_rows(pool: &Pool<Self>, group: &str) -> i64 {
                sqlx::query_scalar(concat!(
                    "SELECT count(*) FROM ",
                    $ledger,
                    " WHERE consumer_group = $1"
                ))
                .bind(group)
                .fetch_one(pool)
                .await
                .unwrap()
            }

            async fn set_crash_point(pool: &Pool<Self>, group: &str, after_offset: i64) {
                sqlx::query(
                    "INSERT INTO test_crash_points (consumer_group, after_offset) VALUES ($1, $2)",
                )
                .bind(group)
                .bind(after_offset)
                .execute(pool)
                .await
                .unwrap();
            }

            async fn clear_crash_point(pool: &Pool<Self>, group: &str) {
                sqlx::query("DELETE FROM test_crash_points WHERE consumer_group = $1")
                    .bind(group)
                    .execute(pool)
                    .await
                    .unwrap();
            }
        }
    };
}

impl_test_db!(Postgres, 4, "consumer_runtime.processed", pg_pool);
impl_test_db!(Sqlite, 1, "consumer_runtime_processed", sqlite_pool);

/// A fresh SQLite file with the runtime's migrations applied, the test effects table and the
/// crash-point trigger.
pub async fn sqlite_pool() -> Pool<Sqlite> {
    init_tracing();
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("sqlite");
    std::fs::create_dir_all(&dir).unwrap();
    let url = format!("sqlite://{}", dir.join(rand_name("t") + ".db").display());
    let pool = consumer_runtime::connect::<Sqlite>(&url, 8)
        .await
        .expect("open the SQLite file");
    consumer_runtime::migrate(&pool, SCHEMA)
        .await
        .expect("migrate");
    for sql in [
        EFFECTS_TABLE,
        CRASH_TABLE,
        "CREATE TRIGGER test_fail_offset_commit
             BEFORE UPDATE OF next_offset ON consumer_runtime_consumer_offsets FOR EACH ROW
             WHEN EXISTS (SELECT 1 FROM test_crash_points c
                          WHERE c.consumer_group = NEW.consumer_group
                            AND NEW.next_offset > c.after_offset)
             BEGIN SELECT RAISE(ABORT, 'test crash point: the offset commit fails'); END",
        // Dead letters of groups named `unparkable…` cannot be written.
        "CREATE TRIGGER test_refuse_dead_letter
             BEFORE INSERT ON consumer_runtime_dead_letters FOR EACH ROW
             WHEN NEW.consumer_group LIKE 'unparkable%'
             BEGIN SELECT RAISE(ABORT, 'test: dead letters refused'); END",
    ] {
        sqlx::query(sql).execute(&pool).await.unwrap();
    }
    pool
}

/// A PostgreSQL pool with the runtime's migrations applied, the test effects table and the
/// crash-point trigger.
pub async fn pg_pool() -> Pool<Postgres> {
    pg_pool_at(&database_url()).await
}

/// [`pg_pool`] on the PostgreSQL server at `url`.
pub async fn pg_pool_at(url: &str) -> Pool<Postgres> {
    init_tracing();
    let pool = consumer_runtime::connect::<Postgres>(url, 10)
        .await
        .expect("PostgreSQL must be running (see README: Running the tests)");
    consumer_runtime::migrate(&pool, SCHEMA)
        .await
        .expect("migrate");
    let mut tx = pool.begin().await.unwrap();
    // Tests set up concurrently; DDL on the shared database is serialised.
    sqlx::query("SELECT pg_advisory_xact_lock(4242)")
        .execute(&mut *tx)
        .await
        .unwrap();
    for sql in [
        EFFECTS_TABLE,
        CRASH_TABLE,
        r#"CREATE OR REPLACE FUNCTION test_fail_offset_commit() RETURNS trigger
           LANGUAGE plpgsql AS $$
           BEGIN
             IF EXISTS (SELECT 1 FROM test_crash_points c
                        WHERE c.consumer_group = NEW.consumer_group
                          AND NEW.next_offset > c.after_offset) THEN
               RAISE EXCEPTION 'test crash point: the offset commit fails';
             END IF;
             RETURN NEW;
           END $$"#,
        "CREATE OR REPLACE TRIGGER test_fail_offset_commit
         BEFORE UPDATE OF next_offset ON consumer_runtime.consumer_offsets
         FOR EACH ROW EXECUTE FUNCTION test_fail_offset_commit()",
        // Dead letters of groups named `unparkable…` cannot be written.
        r#"CREATE OR REPLACE FUNCTION test_refuse_dead_letter() RETURNS trigger
           LANGUAGE plpgsql AS $$
           BEGIN
             IF NEW.consumer_group LIKE 'unparkable%' THEN
               RAISE EXCEPTION 'test: dead letters refused';
             END IF;
             RETURN NEW;
           END $$"#,
        "CREATE OR REPLACE TRIGGER test_refuse_dead_letter
         BEFORE INSERT ON consumer_runtime.dead_letters
         FOR EACH ROW EXECUTE FUNCTION test_refuse_dead_letter()",
    ] {
        sqlx::query(sql).execute(&mut *tx).await.unwrap();
    }
    tx.commit().await.unwrap();
    pool
}

/// How often each event id's effect was applied for `group`.
pub async fn effect_counts<DB: TestDb>(pool: &Pool<DB>, group: &str) -> HashMap<String, i64> {
    DB::effect_counts(pool, group).await
}

/// Rows of the dedup ledger for `group`.
pub async fn ledger_rows<DB: TestDb>(pool: &Pool<DB>, group: &str) -> i64 {
    DB::ledger_rows(pool, group).await
}

/// Stored `next_offset` per (topic, partition) for `group`.
pub async fn stored_offsets<DB: Backend>(
    pool: &Pool<DB>,
    group: &str,
) -> HashMap<(String, i32), i64> {
    DB::offsets(pool, &DB::queries(SCHEMA).unwrap(), group)
        .await
        .unwrap()
        .into_iter()
        .filter_map(|o| Some(((o.topic, o.partition), o.next_offset?)))
        .collect()
}

/// The end offset of each partition after producing `records` to an empty topic.
pub fn ends_of(records: &[(i32, String, String)]) -> HashMap<i32, i64> {
    let mut ends = HashMap::new();
    for (p, _, _) in records {
        *ends.entry(*p).or_insert(0) += 1;
    }
    ends
}

/// How long a test waits for a consumer to catch up, unless it says otherwise.
pub const CAUGHT_UP: Duration = Duration::from_secs(60);

/// Waits (up to [`CAUGHT_UP`]) until the stored offsets of `group` reach the end of every
/// partition.
pub async fn wait_caught_up<DB: Backend>(
    pool: &Pool<DB>,
    group: &str,
    topic: &str,
    ends: &HashMap<i32, i64>,
) {
    wait_caught_up_within(CAUGHT_UP, pool, group, topic, ends).await;
}

/// Waits until the group's stored offsets reach the end of `records`, then stops the runtime
/// gracefully and checks that it ended without an error.
pub async fn catch_up_and_stop<DB: Backend>(
    pool: &Pool<DB>,
    group: &str,
    topic: &str,
    records: &[(i32, String, String)],
    stop: consumer_runtime::ShutdownHandle,
    task: tokio::task::JoinHandle<consumer_runtime::Result<()>>,
) {
    wait_caught_up(pool, group, topic, &ends_of(records)).await;
    stop.shutdown();
    task.await.unwrap().expect("clean shutdown");
}

/// [`wait_caught_up`] with its own deadline.
pub async fn wait_caught_up_within<DB: Backend>(
    timeout: Duration,
    pool: &Pool<DB>,
    group: &str,
    topic: &str,
    ends: &HashMap<i32, i64>,
) {
    wait_until(
        timeout,
        "stored offsets to reach the end of the topic",
        || async {
            let stored = stored_offsets(pool, group).await;
            ends.iter()
                .all(|(p, end)| stored.get(&(topic.to_owned(), *p)) == Some(end))
        },
    )
    .await;
}

/// A runtime for the test handler on `topic` of the mock cluster, with signals left alone and
/// a short session timeout so that a crashed member's partitions move quickly.
pub fn test_runtime<DB: TestDb>(
    kafka: &Kafka,
    pool: &Pool<DB>,
    handler: Counter,
    topic: &str,
) -> consumer_runtime::RuntimeBuilder<Counter, DB> {
    consumer_runtime::Runtime::builder(handler)
        .pool(pool.clone())
        .brokers(kafka.bootstrap.clone())
        .topic(topic)
        .handle_signals(false)
        .kafka_config("session.timeout.ms", "6000")
        .kafka_config("heartbeat.interval.ms", "500")
}

/// Asserts that every expected event id was applied exactly once, and nothing else was.
pub fn assert_exactly_once(counts: &HashMap<String, i64>, expected: &[String]) {
    let mut missing = Vec::new();
    for id in expected {
        match counts.get(id) {
            Some(1) => {}
            Some(n) => panic!("event {id} was applied {n} times"),
            None => missing.push(id.clone()),
        }
    }
    assert!(
        missing.is_empty(),
        "{} events never applied, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    assert_eq!(
        counts.len(),
        expected.len(),
        "effects for unexpected event ids"
    );
}

/// Polls `cond` until it holds or `timeout` passes; panics with `what` on timeout.
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if cond().await {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A mock Kafka cluster (librdkafka's mock broker, real protocol over loopback).
pub struct Kafka {
    pub cluster: MockCluster<'static, DefaultProducerContext>,
    pub bootstrap: String,
}

impl Kafka {
    pub fn new() -> Kafka {
        let cluster = MockCluster::new(1).expect("mock cluster");
        let bootstrap = cluster.bootstrap_servers();
        Kafka { cluster, bootstrap }
    }

    pub fn create_topic(&self, topic: &str, partitions: i32) {
        self.cluster
            .create_topic(topic, partitions, 1)
            .expect("create topic");
    }

    pub fn producer(&self) -> BaseProducer {
        ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .set("linger.ms", "5")
            .create()
            .expect("producer")
    }

    /// Produces `(partition, event_id, payload)` records with the id in the `event-id` header
    /// and returns once all are acknowledged.
    pub fn produce(&self, topic: &str, records: &[(i32, String, String)]) {
        let producer = self.producer();
        for (partition, id, payload) in records {
            let headers = OwnedHeaders::new().insert(Header {
                key: "event-id",
                value: Some(id.as_bytes()),
            });
            loop {
                let record = BaseRecord::to(topic)
                    .partition(*partition)
                    .key(id.as_str())
                    .payload(payload.as_str())
                    .headers(headers.clone());
                match producer.send(record) {
                    Ok(()) => break,
                    Err((e, _)) => {
                        assert!(
                            matches!(
                                e.rdkafka_error_code(),
                                Some(consumer_runtime::rdkafka::types::RDKafkaErrorCode::QueueFull)
                            ),
                            "produce failed: {e}"
                        );
                        producer.poll(Duration::from_millis(10));
                    }
                }
            }
            producer.poll(Duration::ZERO);
        }
        producer.flush(Duration::from_secs(30)).expect("flush");
    }

    /// Joins `group`, commits `offset` for every partition of `topic` to Kafka, and leaves.
    pub fn commit_kafka_offsets(&self, group: &str, topic: &str, partitions: i32, offset: i64) {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("session.timeout.ms", "6000")
            // The same assignor as the runtime's default: the crashed runtime may still be a
            // member, and the mock broker aborts on a group whose members disagree.
            .set("partition.assignment.strategy", "cooperative-sticky")
            .create()
            .expect("consumer");
        consumer.subscribe(&[topic]).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while consumer.assignment().unwrap().count() < partitions as usize {
            assert!(
                Instant::now() < deadline,
                "the committing consumer got no assignment"
            );
            let _ = consumer.poll(Duration::from_millis(100));
        }
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition_offset(topic, p, Offset::Offset(offset))
                .unwrap();
        }
        consumer
            .commit(&tpl, CommitMode::Sync)
            .expect("commit bogus offsets to Kafka");
        let committed = consumer.committed(Duration::from_secs(10)).unwrap();
        for e in committed.elements() {
            assert_eq!(
                e.offset(),
                Offset::Offset(offset),
                "Kafka holds the bogus offset"
            );
        }
    }
}

/// A record to produce: (partition, event id, payload).
pub type Record = (i32, String, String);

/// A test's Kafka side: a fresh mock cluster holding a fresh topic named after `prefix` with
/// `partitions` partitions, filled with [`events_with_duplicates`]`(n, dups)`, and a fresh
/// consumer group name. Returns (cluster, topic, group, records, distinct event ids).
pub fn produced(
    prefix: &str,
    partitions: i32,
    n: usize,
    dups: usize,
) -> (Kafka, String, String, Vec<Record>, Vec<String>) {
    let kafka = Kafka::new();
    let topic = rand_name(prefix);
    kafka.create_topic(&topic, partitions);
    let (records, ids) = events_with_duplicates(&topic, n, partitions, dups);
    kafka.produce(&topic, &records);
    (kafka, topic, rand_name("g"), records, ids)
}

/// `n` events over `partitions` partitions, each with a unique id, plus `dups` producer-side
/// duplicates (the same id and payload again, at a later offset of the same partition).
pub fn events_with_duplicates(
    prefix: &str,
    n: usize,
    partitions: i32,
    dups: usize,
) -> (Vec<(i32, String, String)>, Vec<String>) {
    let ids: Vec<String> = (0..n).map(|i| format!("{prefix}-{i}")).collect();
    let mut records: Vec<(i32, String, String)> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let p = (i as i32) % partitions;
            (
                p,
                id.clone(),
                format!(r#"{{"id":"{id}","amount_cents":{}}}"#, 100 + i),
            )
        })
        .collect();
    let dup_records: Vec<_> = records
        .iter()
        .step_by((n / dups.max(1)).max(1))
        .take(dups)
        .cloned()
        .collect();
    records.extend(dup_records);
    (records, ids)
}

/// The test handler: applies the non-idempotent effect ([`TestDb::apply_effect`]). An optional
/// per-record delay makes runs long enough to interrupt, and `applied` counts handler calls.
#[derive(Clone)]
pub struct Counter {
    pub group: String,
    pub delay: Duration,
    pub applied: Arc<AtomicU64>,
    /// Event ids whose handler returns an error (`reject` or `retry`).
    pub fail_on: Option<(String, bool)>,
    /// The event id whose handler writes its effect and then never returns.
    pub stall_on: Option<String>,
    /// Set once the handler stalls.
    pub stalled: Arc<AtomicBool>,
    /// Event ids whose handler writes its effect and then panics.
    pub panic_on: Option<String>,
    /// The event id whose handler, the first time, writes its effect and then sleeps this long
    /// (a consumer frozen mid-transaction that later wakes up).
    pub freeze_on: Option<(String, Duration)>,
    /// True while that handler sleeps.
    pub frozen: Arc<AtomicBool>,
    /// Set once that handler went to sleep.
    pub froze: Arc<AtomicBool>,
    /// Handler calls, whatever their outcome.
    pub calls: Arc<AtomicU64>,
}

impl Counter {
    pub fn new(group: &str) -> Counter {
        Counter {
            group: group.to_owned(),
            delay: Duration::ZERO,
            applied: Arc::new(AtomicU64::new(0)),
            fail_on: None,
            stall_on: None,
            stalled: Arc::new(AtomicBool::new(false)),
            panic_on: None,
            freeze_on: None,
            frozen: Arc::new(AtomicBool::new(false)),
            froze: Arc::new(AtomicBool::new(false)),
            calls: Arc::new(AtomicU64::new(0)),
        }
    }
    pub fn with_delay(mut self, d: Duration) -> Self {
        self.delay = d;
        self
    }
    pub fn applied(&self) -> u64 {
        self.applied.load(Ordering::SeqCst)
    }
}

impl<DB: TestDb> Handler<DB> for Counter {
    type Event = Json<serde_json::Value>;

    async fn handle(
        &self,
        ctx: &mut Context<'_, DB>,
        _event: Json<serde_json::Value>,
    ) -> Result<(), HandlerError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        let id = ctx.record().event_id();
        DB::apply_effect(ctx.conn(), &self.group, id).await?;
        if let Some((fail, reject)) = &self.fail_on
            && fail == id
        {
            return Err(if *reject {
                HandlerError::reject(format!("test rejects {id}"))
            } else {
                HandlerError::retry(format!("test fails {id}"))
            });
        }
        if self.panic_on.as_deref() == Some(id) {
            panic!("test panics on {id}");
        }
        if let Some((freeze, how_long)) = &self.freeze_on
            && freeze == id
            && !self.froze.swap(true, Ordering::SeqCst)
        {
            self.frozen.store(true, Ordering::SeqCst);
            tokio::time::sleep(*how_long).await;
            self.frozen.store(false, Ordering::SeqCst);
        }
        if self.stall_on.as_deref() == Some(id) {
            // The effect is written but not committed: the test now drops the runtime.
            self.stalled.store(true, Ordering::SeqCst);
            std::future::pending::<()>().await;
        }
        self.applied.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// Instantiates each generic behaviour test `name::<DB>()` once per backend, as
/// `postgres::name` and `sqlite::name`: one suite, run against both databases.
#[allow(unused_macros)] // tests/cli.rs runs processes and has no generic suite
macro_rules! suite {
    ($($name:ident),* $(,)?) => {
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name::<consumer_runtime::sqlx::Postgres>().await;
                }
            )*
        }
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name::<consumer_runtime::sqlx::Sqlite>().await;
                }
            )*
        }
    };
}
#[allow(unused_imports)]
pub(crate) use suite;
