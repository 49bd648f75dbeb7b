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

/// The environment variable that points the suites at an external broker (bootstrap servers,
/// such as `127.0.0.1:19092`). Unset or empty: every test starts its own mock cluster.
pub const BROKERS_ENV: &str = "KAFKA_BROKERS";

/// With this environment variable set (to anything), the suites' producers send one record
/// per producer batch (`batch.num.messages=1`): for a broker that cannot fetch from an offset
/// inside a stored batch or reports a batch's base offset + 1 as the high watermark (tansu
/// 0.6.0's memory storage; `cargo run -p consumer-runtime-testkit --example broker_probe`
/// shows both). Kafka needs none of it, so it is off unless asked for.
pub const ONE_RECORD_PER_BATCH_ENV: &str = "KAFKA_ONE_RECORD_PER_BATCH";

/// The external broker the suites run against ([`BROKERS_ENV`]), if one is given.
pub fn external_brokers() -> Option<String> {
    std::env::var(BROKERS_ENV)
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}

/// `true` if the calling test must be skipped because it injects faults that only the mock
/// cluster can (a broker going down, request errors): under an external broker it prints
/// `skipped: <test>: <reason>` (to the terminal, past libtest's capture) and the test returns.
///
/// ```ignore
/// if testkit::mock_only("broker_outage", "takes the only broker down") { return; }
/// ```
pub fn mock_only(test: &str, reason: &str) -> bool {
    let Some(brokers) = external_brokers() else {
        return false;
    };
    use std::io::Write as _;
    // libtest captures print!/eprint!, not writes to the stderr handle: the reason is seen.
    let _ = writeln!(
        std::io::stderr(),
        "skipped: {test}: {reason}, which only the mock broker can do (running against {brokers})"
    );
    true
}

/// A test's Kafka. By default a mock cluster (librdkafka's mock broker, real protocol over
/// loopback), hosted in a child process of the test binary, so that the mock cluster's
/// occasional abort fails the test using it and nothing else. With [`BROKERS_ENV`] set, the
/// external broker it names: topics are created through the admin API and deleted when the
/// last clone is dropped (set `KAFKA_KEEP_TOPICS=1` to keep them). Clones share the one child
/// (or the one list of topics to delete).
///
/// The test binary must invoke [`mock_broker_entry!`](crate::mock_broker_entry) at its root.
#[derive(Clone, Debug)]
pub struct Kafka {
    /// The bootstrap servers.
    pub bootstrap: String,
    backing: Arc<Backing>,
}

#[derive(Debug)]
enum Backing {
    Mock(Mutex<MockBroker>),
    External(Mutex<Vec<String>>),
}

impl Drop for Backing {
    fn drop(&mut self) {
        let Backing::External(topics) = self else {
            return;
        };
        let topics = std::mem::take(topics.get_mut().unwrap_or_else(|e| e.into_inner()));
        if topics.is_empty() || std::env::var_os("KAFKA_KEEP_TOPICS").is_some() {
            return;
        }
        let Some(brokers) = external_brokers() else {
            return;
        };
        if let Err(e) = admin::delete_topics(&brokers, &topics) {
            use std::io::Write as _;
            let _ = writeln!(
                std::io::stderr(),
                "testkit: deleting topics {topics:?} from {brokers} failed: {e:#}"
            );
        }
    }
}

impl Kafka {
    /// Starts a mock cluster of one broker in a child process, or, with [`BROKERS_ENV`] set,
    /// uses the external broker it names.
    pub fn new() -> Kafka {
        if let Some(brokers) = external_brokers() {
            return Kafka {
                bootstrap: brokers,
                backing: Arc::new(Backing::External(Mutex::new(Vec::new()))),
            };
        }
        let broker = MockBroker::start_in_test().expect("start the mock broker's process");
        Kafka {
            bootstrap: broker.bootstrap.clone(),
            backing: Arc::new(Backing::Mock(Mutex::new(broker))),
        }
    }

    /// `true` if this is an external broker, not the mock cluster.
    pub fn is_external(&self) -> bool {
        matches!(*self.backing, Backing::External(_))
    }

    fn broker(&self, what: &str) -> MutexGuard<'_, MockBroker> {
        match &*self.backing {
            Backing::Mock(broker) => broker.lock().unwrap_or_else(|e| e.into_inner()),
            Backing::External(_) => panic!(
                "{what} needs the mock broker, not the external {}: start the test with `if testkit::mock_only(…) {{ return; }}`",
                self.bootstrap
            ),
        }
    }

    /// Carries out `command` in the mock cluster; panics, saying why, if it fails (the child
    /// died, for one), or if the broker is external.
    pub fn command(&self, command: BrokerCommand) {
        if let Err(e) = self.broker(&format!("{command:?}")).command(&command) {
            panic!("{e:#}");
        }
    }

    /// Creates `topic` with `partitions` partitions (through the admin API on an external
    /// broker, waiting until its metadata shows every partition).
    pub fn create_topic(&self, topic: &str, partitions: i32) {
        match &*self.backing {
            Backing::Mock(_) => {
                self.command(BrokerCommand::CreateTopic(topic.to_owned(), partitions))
            }
            Backing::External(topics) => {
                if let Err(e) = admin::create_topic(&self.bootstrap, topic, partitions) {
                    panic!("{e:#}");
                }
                topics
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(topic.to_owned());
            }
        }
    }

    /// The (only) broker goes down: connections are closed and new ones refused. Mock only.
    pub fn broker_down(&self) {
        self.command(BrokerCommand::BrokerDown);
    }

    /// The broker comes back. Mock only.
    pub fn broker_up(&self) {
        self.command(BrokerCommand::BrokerUp);
    }

    /// The next requests of `api` fail with `errors`, one each, in order. Mock only.
    pub fn request_errors(&self, api: RDKafkaApiKey, errors: &[RDKafkaRespErr]) {
        self.command(BrokerCommand::RequestErrors(api, errors.to_vec()));
    }

    /// How the mock broker's process ended, if it did: a test that waits on Kafka fails at
    /// once with this rather than at its deadline. Always `None` for an external broker.
    pub fn died(&self) -> Option<String> {
        if self.is_external() {
            return None;
        }
        let status = self.broker("died").exit_status()?;
        Some(format!("the mock broker's process died ({status})"))
    }

    /// The mock broker's process id. Mock only.
    pub fn pid(&self) -> u32 {
        self.broker("pid").pid()
    }

    /// A producer to the cluster (one record per batch with [`ONE_RECORD_PER_BATCH_ENV`]).
    pub fn producer(&self) -> BaseProducer {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.bootstrap)
            .set("linger.ms", "5");
        if std::env::var_os(ONE_RECORD_PER_BATCH_ENV).is_some() {
            config.set("batch.num.messages", "1");
        }
        config.create().expect("producer")
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

mod admin {
    //! Topics on an external broker, through the admin API.

    use std::time::{Duration, Instant};

    use anyhow::{Context as _, bail};
    use consumer_runtime::rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use consumer_runtime::rdkafka::client::DefaultClientContext;
    use consumer_runtime::rdkafka::config::ClientConfig;
    use consumer_runtime::rdkafka::consumer::{BaseConsumer, Consumer as _};
    use consumer_runtime::rdkafka::types::RDKafkaErrorCode;

    const TIMEOUT: Duration = Duration::from_secs(30);

    /// Runs `f` on a thread of its own with a runtime of its own: the admin API is async, and
    /// a test's create or drop may happen inside a runtime or outside one.
    fn on_own_runtime<T, F, Fut>(brokers: &str, f: F) -> anyhow::Result<T>
    where
        T: Send + 'static,
        F: FnOnce(AdminClient<DefaultClientContext>) -> Fut + Send + 'static,
        Fut: Future<Output = anyhow::Result<T>>,
    {
        let brokers = brokers.to_owned();
        std::thread::spawn(move || {
            let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
                .set("bootstrap.servers", &brokers)
                .create()
                .with_context(|| format!("an admin client for {brokers}"))?;
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("a runtime for the admin client")?
                .block_on(f(admin))
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the admin client's thread panicked"))?
    }

    fn options() -> AdminOptions {
        AdminOptions::new().operation_timeout(Some(TIMEOUT))
    }

    /// Creates `topic` and waits until the broker's metadata shows all its partitions.
    pub(super) fn create_topic(brokers: &str, topic: &str, partitions: i32) -> anyhow::Result<()> {
        let name = topic.to_owned();
        on_own_runtime(brokers, move |admin| async move {
            let new = NewTopic::new(&name, partitions, TopicReplication::Fixed(1));
            let results = admin
                .create_topics([&new], &options())
                .await
                .with_context(|| format!("creating topic {name}"))?;
            for r in results {
                if let Err((t, code)) = r {
                    bail!("creating topic {t} failed: {code}");
                }
            }
            Ok(())
        })?;
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .create()
            .context("a metadata client")?;
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let seen = consumer
                .fetch_metadata(Some(topic), Duration::from_secs(5))
                .ok()
                .and_then(|m| {
                    m.topics()
                        .iter()
                        .find(|t| t.name() == topic && t.error().is_none())
                        .map(|t| t.partitions().len())
                });
            if seen == Some(partitions as usize) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "topic {topic} was created on {brokers} but its metadata shows {seen:?} of {partitions} partitions after {} s",
                    TIMEOUT.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Deletes `topics`; a topic the broker no longer knows is not an error.
    pub(super) fn delete_topics(brokers: &str, topics: &[String]) -> anyhow::Result<()> {
        let topics = topics.to_vec();
        on_own_runtime(brokers, move |admin| async move {
            let names: Vec<&str> = topics.iter().map(String::as_str).collect();
            let results = admin
                .delete_topics(&names, &options())
                .await
                .context("deleting topics")?;
            for r in results {
                match r {
                    Ok(_) | Err((_, RDKafkaErrorCode::UnknownTopicOrPartition)) => {}
                    Err((t, code)) => bail!("deleting topic {t} failed: {code}"),
                }
            }
            Ok(())
        })
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
