//! The messages: order events of 200–500 bytes of JSON with a UUID in an `event-id` header,
//! generated from their index so that none has to be kept in memory.
//!
//! Message `i` goes to partition `i % P` at offset `i / P`.

use std::hash::{BuildHasher, Hasher, RandomState};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use consumer_runtime::rdkafka::Timestamp;
use consumer_runtime::rdkafka::config::ClientConfig;
use consumer_runtime::rdkafka::message::{Header, OwnedHeaders, OwnedMessage};
use consumer_runtime::rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use consumer_runtime::rdkafka::types::RDKafkaErrorCode;

/// A random number from the standard library's hasher seeds (no `rand` crate needed).
pub(crate) fn random_u64() -> u64 {
    let mut h = RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    h.finish()
}

fn mix(mut x: u64) -> u64 {
    // splitmix64
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Payload sizes seen while producing.
pub(crate) struct Sizes {
    pub(crate) min: usize,
    pub(crate) max: usize,
    pub(crate) total: usize,
}

const CURRENCIES: [&str; 4] = ["EUR", "USD", "GBP", "CHF"];
const CITIES: [(&str, &str, &str); 4] = [
    ("DE", "Berlin", "10115"),
    ("FR", "Lyon", "69001"),
    ("GB", "Manchester", "M1 1AE"),
    ("US", "Portland", "97205"),
];
const PRODUCTS: [&str; 5] = [
    "Water bottle",
    "T-shirt, navy, M",
    "USB-C cable 2 m",
    "Coffee dripper",
    "Notebook A5",
];

/// Generates the benchmark's messages.
#[derive(Clone)]
pub(crate) struct Workload {
    seed: u64,
}

impl Workload {
    pub(crate) fn new(seed: u64) -> Workload {
        Workload { seed }
    }

    /// Message `i`'s event id: a random-looking version-4 UUID.
    pub(crate) fn event_id(&self, i: u64) -> String {
        let a = mix(self.seed ^ mix(i));
        let b = mix(a ^ i);
        format!(
            "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
            a >> 32,
            (a >> 16) & 0xffff,
            a & 0xfff,
            0x8000 | (b >> 48) & 0x3fff,
            b & 0xffff_ffff_ffff
        )
    }

    /// Message `i`'s payload: an `order.placed` event with one to three line items.
    pub(crate) fn payload(&self, i: u64, id: &str) -> String {
        let r = mix(self.seed.rotate_left(17) ^ i);
        let items = 1 + (r % 3) as usize;
        let (country, city, postcode) = CITIES[(r >> 8) as usize % CITIES.len()];
        let mut lines = String::new();
        let mut total = 0u64;
        for k in 0..items {
            let x = mix(r ^ k as u64);
            let qty = 1 + x % 3;
            let price = 199 + x % 9_800;
            total += qty * price;
            if k > 0 {
                lines.push(',');
            }
            lines.push_str(&format!(
                r#"{{"sku":"SKU-{:06}","name":"{}","qty":{qty},"price":{price}}}"#,
                x % 1_000_000,
                PRODUCTS[(x >> 20) as usize % PRODUCTS.len()]
            ));
        }
        format!(
            r#"{{"type":"order.placed","event_id":"{id}","order_id":"ord-{i:010}","customer_id":"cus-{:07}","placed_at":"2026-11-23T13:{:02}:{:02}.{:03}Z","currency":"{}","amount_cents":{total},"items":[{lines}],"shipping":{{"country":"{country}","city":"{city}","postcode":"{postcode}"}}}}"#,
            (r >> 16) % 10_000_000,
            (i / 60_000) % 60,
            (i / 1_000) % 60,
            i % 1_000,
            CURRENCIES[(r >> 40) as usize % CURRENCIES.len()],
        )
    }

    fn headers(id: &str) -> OwnedHeaders {
        OwnedHeaders::new().insert(Header {
            key: "event-id",
            value: Some(id.as_bytes()),
        })
    }

    /// The record at `offset` of `partition` as the consumer would see it (for the database-only
    /// scenario).
    pub(crate) fn message(
        &self,
        topic: &str,
        partition: i32,
        offset: i64,
        partitions: i32,
    ) -> OwnedMessage {
        let i = offset as u64 * partitions as u64 + partition as u64;
        let id = self.event_id(i);
        let payload = self.payload(i, &id);
        OwnedMessage::new(
            Some(payload.into_bytes()),
            Some(format!("ord-{i:010}").into_bytes()),
            topic.to_owned(),
            Timestamp::now(),
            partition,
            offset,
            Some(Self::headers(&id)),
        )
    }

    /// Produces `n` messages to `topic`, generating each as it is sent, and returns each
    /// partition's end offset and the payload sizes.
    pub(crate) fn produce(
        &self,
        brokers: &str,
        topic: &str,
        n: u64,
        partitions: i32,
    ) -> anyhow::Result<(Vec<i64>, Sizes)> {
        let producer: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            // librdkafka's mock broker keeps at most 5 MB of record batches per partition and
            // silently drops the oldest beyond that (rdkafka_mock.c, `max_size`): compressed,
            // the messages take ~70 bytes each instead of ~470, so ~75,000 fit per partition.
            .set("compression.type", "gzip")
            .set("linger.ms", "50")
            // A bounded send queue, so that producing does not leave ~50 MB of freed queue in
            // the process's heap (it would count in every scenario's resident memory).
            .set("queue.buffering.max.messages", "20000")
            .set("enable.idempotence", "true")
            .create()
            .context("creating the producer")?;
        let mut sizes = Sizes {
            min: usize::MAX,
            max: 0,
            total: 0,
        };
        let started = Instant::now();
        let mut last = Instant::now();
        for i in 0..n {
            let id = self.event_id(i);
            let payload = self.payload(i, &id);
            let key = format!("ord-{i:010}");
            sizes.min = sizes.min.min(payload.len());
            sizes.max = sizes.max.max(payload.len());
            sizes.total += payload.len();
            let partition = (i % partitions as u64) as i32;
            loop {
                let record = BaseRecord::to(topic)
                    .partition(partition)
                    .key(&key)
                    .payload(&payload)
                    .headers(Self::headers(&id));
                match producer.send(record) {
                    Ok(()) => break,
                    Err((e, _)) if e.rdkafka_error_code() == Some(RDKafkaErrorCode::QueueFull) => {
                        producer.poll(Duration::from_millis(10));
                    }
                    Err((e, _)) => bail!("producing message {i}: {e}"),
                }
            }
            producer.poll(Duration::ZERO);
            if last.elapsed() > Duration::from_secs(2) {
                last = Instant::now();
                eprintln!(
                    "  [produce] {i} / {n} ({:.0} msg/s)",
                    i as f64 / started.elapsed().as_secs_f64()
                );
            }
        }
        producer
            .flush(Duration::from_secs(120))
            .context("flushing the producer")?;
        let ends = (0..partitions)
            .map(|p| {
                producer
                    .client()
                    .fetch_watermarks(topic, p, Duration::from_secs(10))
                    .with_context(|| format!("reading the watermarks of partition {p}"))
            })
            .collect::<anyhow::Result<Vec<(i64, i64)>>>()?;
        if let Some((p, (low, _))) = ends.iter().enumerate().find(|(_, (low, _))| *low > 0) {
            bail!(
                "the mock broker dropped the first {low} records of partition {p}: it keeps at most \
                 5 MB of (compressed) batches per partition; use more partitions or fewer messages \
                 (about 75,000 per partition fit)"
            );
        }
        let ends: Vec<i64> = ends.into_iter().map(|(_, high)| high).collect();
        for (p, end) in ends.iter().enumerate() {
            let expected = (n + partitions as u64 - 1 - p as u64) / partitions as u64;
            if *end != expected as i64 {
                bail!("partition {p} holds {end} records, expected {expected}");
            }
        }
        Ok((ends, sizes))
    }
}
