//! Run with: `KAFKA_BROKERS=127.0.0.1:19092 cargo run -p consumer-runtime-testkit --example broker_probe`
//!
//! Asks a broker the questions on which the suites' results against it turn, with a plain
//! librdkafka client and none of the runtime: a fresh one-partition topic gets two producer
//! batches of 10 records each (offsets 0–9 stamped an hour ago, then 10–19 stamped now), and
//! the probe prints what the broker answers next to what Kafka answers:
//!
//! 1. ListOffsets latest (the high watermark): 20.
//! 2. ListOffsets by timestamp, for half an hour ago (between the two batches' record
//!    timestamps): 10.
//! 3. A fetch from offset 5 (inside the first batch): offsets 5–19.
//! 4. A fetch from offset 15 (inside the last batch): offsets 15–19.
//! 5. A consumer that starts at the end, then a third batch of 3 records: offsets 20, 21, 22,
//!    each once.
//!
//! Without `KAFKA_BROKERS` it asks librdkafka's in-process mock cluster, which differs in 2 (it has
//! no lookup by time and answers the end). Exits non-zero if an
//! answer differs.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use consumer_runtime::rdkafka::Message as _;
use consumer_runtime::rdkafka::config::ClientConfig;
use consumer_runtime::rdkafka::consumer::{BaseConsumer, Consumer as _};
use consumer_runtime::rdkafka::mocking::MockCluster;
use consumer_runtime::rdkafka::producer::{BaseProducer, BaseRecord, Producer as _};
use consumer_runtime::rdkafka::topic_partition_list::{Offset, TopicPartitionList};

const WAIT: Duration = Duration::from_secs(10);

fn main() -> anyhow::Result<()> {
    // An external broker (topics through the admin API) or an in-process mock cluster.
    let kafka = testkit::external_brokers().map(|_| testkit::Kafka::new());
    let mock = match kafka {
        Some(_) => None,
        None => Some(MockCluster::new(1)?),
    };
    let bootstrap = match (&kafka, &mock) {
        (Some(kafka), _) => kafka.bootstrap.clone(),
        (None, Some(mock)) => mock.bootstrap_servers(),
        (None, None) => unreachable!(),
    };
    let topic = testkit::rand_name("probe");
    match (&kafka, &mock) {
        (Some(kafka), _) => kafka.create_topic(&topic, 1),
        (None, Some(mock)) => mock.create_topic(&topic, 1, 1)?,
        (None, None) => unreachable!(),
    }
    println!("broker {bootstrap}, topic {topic}: two producer batches of 10 records");

    // One batch each: the ten sends are queued long before linger.ms runs out.
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("linger.ms", "500")
        .create()?;
    let now = now_ms();
    let between = now - 30 * 60 * 1000;
    for (batch, stamp) in [(0, now - 60 * 60 * 1000), (1, now)] {
        for i in 0..10 {
            let key = format!("{}", batch * 10 + i);
            producer
                .send(
                    BaseRecord::to(&topic)
                        .partition(0)
                        .key(&key)
                        .payload(&key)
                        .timestamp(stamp),
                )
                .map_err(|(e, _)| e)?;
        }
        producer.flush(WAIT)?;
    }

    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("group.id", testkit::rand_name("probe"))
        .set("enable.auto.commit", "false")
        .create()?;
    let mut differs = 0;
    let mut check = |what: &str, got: String, kafka: &str| {
        let verdict = if got == kafka {
            "same as Kafka"
        } else {
            differs += 1;
            "DIFFERS"
        };
        println!("  {what}: {got} (Kafka: {kafka}) {verdict}");
    };

    let (_, high) = consumer.fetch_watermarks(&topic, 0, WAIT)?;
    check("ListOffsets latest", high.to_string(), "20");

    let mut at = TopicPartitionList::new();
    at.add_partition_offset(&topic, 0, Offset::Offset(between))?;
    let found = consumer.offsets_for_times(at, WAIT);
    let found = match found {
        Ok(tpl) => match tpl.find_partition(&topic, 0).map(|e| e.offset()) {
            Some(Offset::Offset(o)) => o.to_string(),
            Some(Offset::End) => "the end (no record that late)".to_owned(),
            other => format!("{other:?}"),
        },
        Err(e) => format!("error: {e}"),
    };
    check("ListOffsets by timestamp, half an hour ago", found, "10");

    for from in [5, 15] {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&topic, 0, Offset::Offset(from))?;
        consumer.assign(&tpl)?;
        let mut offsets = Vec::new();
        let deadline = Instant::now() + WAIT;
        while offsets.last() != Some(&19) && Instant::now() < deadline {
            if let Some(m) = consumer.poll(Duration::from_millis(100)) {
                offsets.push(m?.offset());
            }
        }
        let got = match (offsets.first(), offsets.last()) {
            (Some(a), Some(b)) => format!("offsets {a}–{b} ({} records)", offsets.len()),
            _ => format!("nothing within {} s", WAIT.as_secs()),
        };
        check(
            &format!("fetch from offset {from}"),
            got,
            &format!("offsets {from}–19 ({} records)", 20 - from),
        );
    }

    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&topic, 0, Offset::End)?;
    consumer.assign(&tpl)?;
    let quiet = Instant::now() + Duration::from_secs(2);
    while Instant::now() < quiet {
        if let Some(m) = consumer.poll(Duration::from_millis(100)) {
            m?;
        }
    }
    for i in 20..23 {
        let key = i.to_string();
        producer
            .send(BaseRecord::to(&topic).partition(0).key(&key).payload(&key))
            .map_err(|(e, _)| e)?;
    }
    producer.flush(WAIT)?;
    let mut offsets = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Some(m) = consumer.poll(Duration::from_millis(100)) {
            offsets.push(m?.offset().to_string());
        }
    }
    check(
        "from the end, then 3 records in one batch",
        format!("offsets {}", offsets.join(", ")),
        "offsets 20, 21, 22",
    );
    drop(consumer);
    drop(producer);
    drop(kafka); // deletes the topic on an external broker
    if differs > 0 {
        anyhow::bail!("{differs} answers differ from Kafka's");
    }
    Ok(())
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
