//! A test's Kafka: a mock cluster in a child process ([`Kafka`]), and the events a test
//! produces to it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use consumer_runtime::rdkafka::config::ClientConfig;
use consumer_runtime::rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use consumer_runtime::rdkafka::message::{Header, OwnedHeaders};
use consumer_runtime::rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use consumer_runtime::rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use consumer_runtime::rdkafka::types::{RDKafkaApiKey, RDKafkaErrorCode, RDKafkaRespErr};

use crate::mock_broker::{BrokerCommand, MockBroker};
use crate::rand_name;

/// A mock Kafka cluster (librdkafka's mock broker, real protocol over loopback), hosted in a
/// child process of the test binary, so that the mock cluster's occasional abort fails the
/// test using it and nothing else. Clones share the one child; it stops when the last is
/// dropped.
///
/// The test binary must invoke [`mock_broker_entry!`](crate::mock_broker_entry) at its root.
#[derive(Clone, Debug)]
pub struct Kafka {
    /// The bootstrap servers.
    pub bootstrap: String,
    broker: Arc<Mutex<MockBroker>>,
}

impl Kafka {
    /// Starts a mock cluster of one broker in a child process.
    pub fn new() -> Kafka {
        let broker = MockBroker::start_in_test().expect("start the mock broker's process");
        Kafka {
            bootstrap: broker.bootstrap.clone(),
            broker: Arc::new(Mutex::new(broker)),
        }
    }

    fn broker(&self) -> MutexGuard<'_, MockBroker> {
        self.broker.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Carries out `command` in the mock cluster; panics, saying why, if it fails (the child
    /// died, for one).
    pub fn command(&self, command: BrokerCommand) {
        if let Err(e) = self.broker().command(&command) {
            panic!("{e:#}");
        }
    }

    /// Creates `topic` with `partitions` partitions.
    pub fn create_topic(&self, topic: &str, partitions: i32) {
        self.command(BrokerCommand::CreateTopic(topic.to_owned(), partitions));
    }

    /// The (only) broker goes down: connections are closed and new ones refused.
    pub fn broker_down(&self) {
        self.command(BrokerCommand::BrokerDown);
    }

    /// The broker comes back.
    pub fn broker_up(&self) {
        self.command(BrokerCommand::BrokerUp);
    }

    /// The next requests of `api` fail with `errors`, one each, in order.
    pub fn request_errors(&self, api: RDKafkaApiKey, errors: &[RDKafkaRespErr]) {
        self.command(BrokerCommand::RequestErrors(api, errors.to_vec()));
    }

    /// How the mock broker's process ended, if it did: a test that waits on Kafka fails at
    /// once with this rather than at its deadline.
    pub fn died(&self) -> Option<String> {
        let status = self.broker().exit_status()?;
        Some(format!("the mock broker's process died ({status})"))
    }

    /// The mock broker's process id.
    pub fn pid(&self) -> u32 {
        self.broker().pid()
    }

    /// A producer to the cluster.
    pub fn producer(&self) -> BaseProducer {
        ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .set("linger.ms", "5")
            .create()
            .expect("producer")
    }

    /// Produces `(partition, event_id, payload)` records with the id in the `event-id` header
    /// and returns once all are acknowledged.
    pub fn produce(&self, topic: &str, records: &[Record]) {
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
                            matches!(e.rdkafka_error_code(), Some(RDKafkaErrorCode::QueueFull)),
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

impl Default for Kafka {
    fn default() -> Self {
        Kafka::new()
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
) -> (Vec<Record>, Vec<String>) {
    let ids: Vec<String> = (0..n).map(|i| format!("{prefix}-{i}")).collect();
    let mut records: Vec<Record> = ids
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

/// The end offset of each partition after producing `records` to an empty topic.
pub fn ends_of(records: &[Record]) -> HashMap<i32, i64> {
    let mut ends = HashMap::new();
    for (p, _, _) in records {
        *ends.entry(*p).or_insert(0) += 1;
    }
    ends
}
