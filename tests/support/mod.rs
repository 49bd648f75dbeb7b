//! Shared helpers for the integration tests: a real PostgreSQL (and SQLite) database, a
//! librdkafka mock cluster, random names, a non-idempotent test handler, and polling with a
//! deadline.
#![allow(dead_code, unreachable_pub, missing_docs)]

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use consumer_runtime::rdkafka::config::ClientConfig;
use consumer_runtime::rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use consumer_runtime::rdkafka::message::{Header, OwnedHeaders};
use consumer_runtime::rdkafka::mocking::MockCluster;
use consumer_runtime::rdkafka::producer::{
    BaseProducer, BaseRecord, DefaultProducerContext, Producer,
};
use consumer_runtime::rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use consumer_runtime::sqlx::{self, Pool, Postgres, Row};
use consumer_runtime::{Context, Handler, HandlerError};

pub const SCHEMA: &str = "consumer_runtime";

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

/// A PostgreSQL pool with the runtime's migrations applied and the test effects table.
pub async fn pg_pool() -> Pool<Postgres> {
    init_tracing();
    let pool = consumer_runtime::connect::<Postgres>(&database_url(), 10)
        .await
        .expect("PostgreSQL must be running (see README: Running the tests)");
    consumer_runtime::migrate(&pool, SCHEMA)
        .await
        .expect("migrate");
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("SELECT pg_advisory_xact_lock(4242)")
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS test_effects (
            consumer_group TEXT NOT NULL,
            event_id TEXT NOT NULL,
            count INTEGER NOT NULL,
            PRIMARY KEY (consumer_group, event_id))",
    )
    .execute(&mut *tx)
    .await
    .unwrap();
    tx.commit().await.unwrap();
    pool
}

/// How often each event id's effect was applied for `group`.
pub async fn effect_counts(pool: &Pool<Postgres>, group: &str) -> HashMap<String, i64> {
    sqlx::query("SELECT event_id, count FROM test_effects WHERE consumer_group = $1")
        .bind(group)
        .fetch_all(pool)
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.get::<String, _>(0), r.get::<i32, _>(1) as i64))
        .collect()
}

pub async fn ledger_rows(pool: &Pool<Postgres>, group: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM consumer_runtime.processed WHERE consumer_group = $1")
        .bind(group)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Stored `next_offset` per (topic, partition) for `group`.
pub async fn stored_offsets(pool: &Pool<Postgres>, group: &str) -> HashMap<(String, i32), i64> {
    consumer_runtime::store::Backend::offsets(
        pool,
        &<Postgres as consumer_runtime::Backend>::queries(SCHEMA).unwrap(),
        group,
    )
    .await
    .unwrap()
    .into_iter()
    .filter_map(|o| Some(((o.topic, o.partition), o.next_offset?)))
    .collect()
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

/// The non-idempotent test effect: `count = count + 1` per (group, event id). An optional
/// per-record delay makes runs long enough to interrupt, and `applied` counts handler calls.
#[derive(Clone)]
pub struct Counter {
    pub group: String,
    pub delay: Duration,
    pub applied: Arc<AtomicU64>,
    /// Event ids whose handler returns an error (`reject` or `retry`).
    pub fail_on: Option<(String, bool)>,
}

impl Counter {
    pub fn new(group: &str) -> Counter {
        Counter {
            group: group.to_owned(),
            delay: Duration::ZERO,
            applied: Arc::new(AtomicU64::new(0)),
            fail_on: None,
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

macro_rules! impl_counter {
    ($db:ty) => {
        #[consumer_runtime::async_trait]
        impl Handler<$db> for Counter {
            type Event = serde_json::Value;

            async fn handle(
                &self,
                ctx: &mut Context<'_, $db>,
                _event: serde_json::Value,
            ) -> Result<(), HandlerError> {
                if !self.delay.is_zero() {
                    tokio::time::sleep(self.delay).await;
                }
                sqlx::query(
                    "INSERT INTO test_effects (consumer_group, event_id, count) VALUES ($1, $2, 1)
                     ON CONFLICT (consumer_group, event_id) DO UPDATE SET count = test_effects.count + 1",
                )
                .bind(&self.group)
                .bind(ctx.record.event_id())
                .execute(&mut *ctx.tx)
                .await?;
                if let Some((id, reject)) = &self.fail_on {
                    if id == ctx.record.event_id() {
                        return Err(if *reject {
                            HandlerError::reject(format!("test rejects {id}"))
                        } else {
                            HandlerError::retry(format!("test fails {id}"))
                        });
                    }
                }
                self.applied.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        }
    };
}

impl_counter!(Postgres);
impl_counter!(consumer_runtime::sqlx::Sqlite);
