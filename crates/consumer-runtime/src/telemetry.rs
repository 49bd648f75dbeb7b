//! What the runtime measures, through the [`metrics`] facade (no exporter here: a program
//! installs one, as the generated consumer program does with `--metrics-addr`).
//!
//! | name | type | labels | what |
//! |---|---|---|---|
//! | [`RECORDS`] | counter | `group`, `topic`, `outcome` | records by outcome: `processed` (the handler ran and committed), `duplicate` (skipped by the ledger), `parked` (in `dead_letters`), `retried` (in a batch attempt rolled back and retried), `lost` (at-most-once) |
//! | [`BATCH_SIZE`] | histogram | `group`, `topic` | records per committed batch |
//! | [`BATCH_DURATION`] | histogram | `group`, `topic` | seconds from a batch's first attempt to its commit, waits for a free transaction and retries included |
//! | [`COMMIT_DURATION`] | histogram | `group`, `topic` | seconds the `COMMIT` of a batch's transaction took |
//! | [`LAG`] | gauge | `group`, `topic`, `partition` | high watermark − stored offset of each assigned partition |
//! | [`FENCED`] | counter | `group`, `topic` | commits refused by the fence |
//! | [`REBALANCES`] | counter | `group`, `event` | rebalance callbacks: `assigned`, `revoked`, `failed` |
//! | [`LEDGER_ROWS`] | gauge | `group` | rows of the group in the dedup ledger (`processed`) |
//! | [`MIRROR_FAILURES`] | counter | `group` | offset commits to the group in Kafka (the monitoring mirror) that failed |
//! | [`OFFSET_GAPS`] | counter | `group`, `topic` | gaps in the offsets received on a topic that is neither compacted nor known to be transactional |
//! | [`STALLED`] | gauge | `group`, `topic`, `partition` | 1 while an assigned partition has lag but has received nothing for the stall timeout, else 0 |
//! | [`LEDGER_OLDEST_AGE`] | gauge | `group` | seconds since the oldest ledger generation that holds rows started: no row is older |
//! | [`LEDGER_FLOOR`] | gauge | `group`, `topic`, `partition` | the replay floor: the offset below which retention pruned the ledger (a series appears with the first floor) |
//! | [`LEDGER_PRUNED`] | counter | `group` | ledger rows dropped by the runtime's pruning |
//!
//! Counters and histograms are updated once per batch, never per record, with handles
//! registered when a partition is assigned. The two gauges that cost something to keep
//! current are off unless [`RuntimeBuilder::metrics_refresh`](crate::RuntimeBuilder::metrics_refresh)
//! turns them on:
//! - [`LAG`] takes the high watermarks from librdkafka's statistics (`statistics.interval.ms`),
//!   which carry the high watermark of every fetch response: no request of its own to the
//!   brokers. Between two statistics the gauge moves with every commit. A partition's series
//!   appears with its first high watermark; one that has stored no offset yet counts from
//!   where the consumer started (the log start offset, or under `OffsetReset::Latest` the
//!   first high watermark seen); a revoked partition's gauge drops to 0 (its new owner
//!   reports it).
//! - [`LEDGER_ROWS`] is a `count(*)` of the group's ledger rows, refreshed at most every
//!   interval and never more often than 100 times the last count took, so that counting a
//!   ledger of many millions of rows costs at most 1% of one connection. [`LEDGER_OLDEST_AGE`]
//!   and [`LEDGER_FLOOR`] are refreshed with it (cheap reads of the generations and the
//!   offsets rows).
//!
//! Spans (`tracing`, debug level): `batch` per batch attempt (topic, partition, first and last
//! offset, size) and `record` per handler call (topic, partition, offset, event id, and the
//! OpenTelemetry messaging attributes: `messaging.system`, `messaging.destination.name`,
//! `messaging.destination.partition.id`, `messaging.kafka.offset`,
//! `messaging.consumer.group.name`, `messaging.message.id`, `messaging.operation.type`). With
//! the `otel` feature a record's `traceparent` header is the `record` span's parent (see
//! `trace_context`).

use std::sync::OnceLock;
use std::sync::atomic::{AtomicI64, Ordering};

use metrics::{Counter, Gauge, Histogram, Unit};

/// Records by outcome (counter; labels `group`, `topic`, `outcome`).
pub const RECORDS: &str = "consumer_records_total";
/// Records per committed batch (histogram; labels `group`, `topic`).
pub const BATCH_SIZE: &str = "consumer_batch_size";
/// Seconds from a batch's first attempt to its commit (histogram; labels `group`, `topic`).
pub const BATCH_DURATION: &str = "consumer_batch_duration_seconds";
/// Seconds the `COMMIT` of a batch's transaction took (histogram; labels `group`, `topic`).
pub const COMMIT_DURATION: &str = "consumer_commit_duration_seconds";
/// High watermark − stored offset (gauge; labels `group`, `topic`, `partition`).
pub const LAG: &str = "consumer_lag";
/// Commits refused by the fence (counter; labels `group`, `topic`).
pub const FENCED: &str = "consumer_fenced_commits_total";
/// Rebalance callbacks (counter; labels `group`, `event`).
pub const REBALANCES: &str = "consumer_rebalances_total";
/// Rows of the group in the dedup ledger (gauge; label `group`).
pub const LEDGER_ROWS: &str = "consumer_ledger_rows";

/// Failed commits of the offset mirror to the group in Kafka (counter; label `group`).
pub const MIRROR_FAILURES: &str = "consumer_offset_mirror_failures_total";
/// Unexplained gaps in a partition's offsets (counter; labels `group`, `topic`).
pub const OFFSET_GAPS: &str = "consumer_offset_gaps_total";
/// Whether an assigned partition is stalled (gauge, 0 or 1; labels `group`, `topic`,
/// `partition`).
pub const STALLED: &str = "consumer_partition_stalled";
/// Seconds since the oldest ledger generation holding rows started (gauge; label `group`).
pub const LEDGER_OLDEST_AGE: &str = "consumer_ledger_oldest_row_age_seconds";
/// The replay floor of each partition (gauge; labels `group`, `topic`, `partition`).
pub const LEDGER_FLOOR: &str = "consumer_ledger_floor";
/// Ledger rows dropped by pruning (counter; label `group`).
pub const LEDGER_PRUNED: &str = "consumer_ledger_pruned_rows_total";

/// Describes every metric to the installed recorder (help texts and units).
pub(crate) fn describe() {
    metrics::describe_gauge!(
        LEDGER_OLDEST_AGE,
        Unit::Seconds,
        "Age of the oldest dedup ledger generation that holds rows: no ledger row is older"
    );
    metrics::describe_gauge!(
        LEDGER_FLOOR,
        Unit::Count,
        "Replay floor: the offset below which ledger retention pruned the ledger"
    );
    metrics::describe_counter!(
        LEDGER_PRUNED,
        Unit::Count,
        "Dedup ledger rows dropped by retention pruning"
    );
    metrics::describe_counter!(
        RECORDS,
        Unit::Count,
        "Records by outcome: processed, duplicate, parked, retried, lost"
    );
    metrics::describe_histogram!(BATCH_SIZE, Unit::Count, "Records per committed batch");
    metrics::describe_histogram!(
        BATCH_DURATION,
        Unit::Seconds,
        "Time from a batch's first attempt to its commit, retries included"
    );
    metrics::describe_histogram!(
        COMMIT_DURATION,
        Unit::Seconds,
        "Time the COMMIT of a batch's transaction took"
    );
    metrics::describe_gauge!(
        LAG,
        Unit::Count,
        "High watermark minus stored offset of each assigned partition"
    );
    metrics::describe_counter!(FENCED, Unit::Count, "Commits refused by the fence");
    metrics::describe_counter!(
        REBALANCES,
        Unit::Count,
        "Rebalance callbacks: assigned, revoked, failed"
    );
    metrics::describe_gauge!(
        LEDGER_ROWS,
        Unit::Count,
        "Rows of the consumer group in the dedup ledger"
    );
    metrics::describe_counter!(
        MIRROR_FAILURES,
        Unit::Count,
        "Failed commits of the monitoring mirror of the stored offsets to the group in Kafka"
    );
    metrics::describe_counter!(
        OFFSET_GAPS,
        Unit::Count,
        "Gaps in received offsets on topics neither compacted nor transactional"
    );
    metrics::describe_gauge!(
        STALLED,
        Unit::Count,
        "1 while a partition with lag has received no record for the stall timeout"
    );
}

/// Counts failed mirror commits.
pub(crate) fn mirror_failed(group: &str, n: u64) {
    metrics::counter!(MIRROR_FAILURES, "group" => group.to_owned()).increment(n);
}

/// Counts an unexplained offset gap.
pub(crate) fn offset_gap(group: &str, topic: &str) {
    metrics::counter!(OFFSET_GAPS, "group" => group.to_owned(), "topic" => topic.to_owned())
        .increment(1);
}

/// Counts a rebalance callback.
pub(crate) fn rebalance(group: &str, event: &'static str) {
    metrics::counter!(REBALANCES, "group" => group.to_owned(), "event" => event).increment(1);
}

/// Sets the ledger size gauge.
pub(crate) fn ledger_rows(group: &str, rows: i64) {
    metrics::gauge!(LEDGER_ROWS, "group" => group.to_owned()).set(rows as f64);
}

/// Sets the oldest ledger row age gauge.
pub(crate) fn ledger_oldest_age(group: &str, seconds: f64) {
    metrics::gauge!(LEDGER_OLDEST_AGE, "group" => group.to_owned()).set(seconds);
}

/// Sets a partition's replay floor gauge.
pub(crate) fn ledger_floor(group: &str, topic: &str, partition: i32, floor: i64) {
    metrics::gauge!(LEDGER_FLOOR, "group" => group.to_owned(), "topic" => topic.to_owned(),
        "partition" => partition.to_string())
    .set(floor as f64);
}

/// Counts ledger rows dropped by pruning.
pub(crate) fn ledger_pruned(group: &str, rows: u64) {
    metrics::counter!(LEDGER_PRUNED, "group" => group.to_owned()).increment(rows);
}

/// The metric handles of one assigned partition, registered once per assignment so that a
/// batch only touches atomics.
pub(crate) struct PartitionMetrics {
    pub(crate) processed: Counter,
    pub(crate) duplicate: Counter,
    pub(crate) parked: Counter,
    pub(crate) retried: Counter,
    pub(crate) lost: Counter,
    pub(crate) fenced: Counter,
    pub(crate) batch_size: Histogram,
    pub(crate) batch_duration: Histogram,
    pub(crate) commit_duration: Histogram,
    /// Registered once the first high watermark is known, so that the series only ever
    /// shows a lag computed from one.
    lag: OnceLock<Gauge>,
    lag_labels: [metrics::Label; 3],
    /// The last high watermark librdkafka reported; -1: none yet.
    high_watermark: AtomicI64,
    /// The stored offset; -1: none.
    stored: AtomicI64,
    /// The offset last mirrored to the group in Kafka; -1: none.
    mirrored: AtomicI64,
    /// The stall gauge, registered the first time the partition is found stalled.
    stalled: OnceLock<Gauge>,
    /// Whether a partition with no stored offset starts at its end (`OffsetReset::Latest`).
    from_end: bool,
    /// Where the consumer started when nothing is stored: the log start offset, or the first
    /// high watermark seen if it starts at the end; -1: not known yet.
    start: AtomicI64,
}

impl PartitionMetrics {
    /// `from_end`: with no stored offset, the consumer starts at the partition's end.
    pub(crate) fn new(
        group: &str,
        topic: &str,
        partition: i32,
        stored: Option<i64>,
        from_end: bool,
    ) -> Self {
        let records = |outcome: &'static str| metrics::counter!(RECORDS, "group" => group.to_owned(), "topic" => topic.to_owned(), "outcome" => outcome);
        let labels = [
            metrics::Label::new("group", group.to_owned()),
            metrics::Label::new("topic", topic.to_owned()),
        ];
        PartitionMetrics {
            processed: records("processed"),
            duplicate: records("duplicate"),
            parked: records("parked"),
            retried: records("retried"),
            lost: records("lost"),
            fenced: metrics::counter!(FENCED, labels.iter()),
            batch_size: metrics::histogram!(BATCH_SIZE, labels.iter()),
            batch_duration: metrics::histogram!(BATCH_DURATION, labels.iter()),
            commit_duration: metrics::histogram!(COMMIT_DURATION, labels.iter()),
            lag: OnceLock::new(),
            lag_labels: [
                metrics::Label::new("group", group.to_owned()),
                metrics::Label::new("topic", topic.to_owned()),
                metrics::Label::new("partition", partition.to_string()),
            ],
            high_watermark: AtomicI64::new(-1),
            stored: AtomicI64::new(stored.unwrap_or(-1)),
            mirrored: AtomicI64::new(-1),
            stalled: OnceLock::new(),
            from_end,
            start: AtomicI64::new(-1),
        }
    }

    /// librdkafka reported the partition's log start offset (`lo`, -1 if unknown) and high
    /// watermark (`hi`).
    pub(crate) fn set_watermarks(&self, lo: i64, hi: i64) {
        if hi < 0 {
            return;
        }
        self.high_watermark.store(hi, Ordering::Relaxed);
        if self.from_end {
            let _ = self
                .start
                .compare_exchange(-1, hi, Ordering::Relaxed, Ordering::Relaxed);
        } else if lo >= 0 {
            self.start.store(lo, Ordering::Relaxed);
        }
        self.update_lag();
    }

    /// A batch committed: the stored offset moved.
    pub(crate) fn set_stored(&self, next_offset: i64) {
        self.stored.store(next_offset, Ordering::Relaxed);
        self.update_lag();
    }

    /// The partition was revoked: its new owner reports its lag (and whether it is stalled).
    pub(crate) fn revoked(&self) {
        if let Some(lag) = self.lag.get() {
            lag.set(0.0);
        }
        self.set_stalled(false);
    }

    /// The stored offset; -1: none.
    pub(crate) fn stored(&self) -> i64 {
        self.stored.load(Ordering::Relaxed)
    }

    /// The stored offset if it differs from the last one mirrored (or if `all`), marking it
    /// mirrored; `None` when there is nothing to mirror.
    pub(crate) fn take_mirror(&self, all: bool) -> Option<i64> {
        let stored = self.stored();
        if stored < 0 {
            return None;
        }
        let previous = self.mirrored.swap(stored, Ordering::Relaxed);
        (all || previous != stored).then_some(stored)
    }

    /// Sets the stall gauge (registered the first time the partition stalls).
    pub(crate) fn set_stalled(&self, stalled: bool) {
        match self.stalled.get() {
            Some(g) => g.set(if stalled { 1.0 } else { 0.0 }),
            None if stalled => self
                .stalled
                .get_or_init(|| metrics::gauge!(STALLED, self.lag_labels.iter()))
                .set(1.0),
            None => {}
        }
    }

    fn update_lag(&self) {
        let hw = self.high_watermark.load(Ordering::Relaxed);
        if hw < 0 {
            return;
        }
        let stored = self.stored.load(Ordering::Relaxed);
        let position = if stored >= 0 {
            stored
        } else {
            self.start.load(Ordering::Relaxed).max(0)
        };
        let lag = self
            .lag
            .get_or_init(|| metrics::gauge!(LAG, self.lag_labels.iter()));
        lag.set((hw - position).max(0) as f64);
    }
}

/// The part of librdkafka's statistics JSON the lag needs: `topics.<t>.partitions.<p>.hi_offset`.
#[derive(serde::Deserialize)]
pub(crate) struct KafkaStats {
    #[serde(default)]
    pub(crate) topics: std::collections::HashMap<String, TopicStats>,
}

/// One topic of [`KafkaStats`].
#[derive(serde::Deserialize)]
pub(crate) struct TopicStats {
    #[serde(default)]
    pub(crate) partitions: std::collections::HashMap<String, PartitionStats>,
}

/// One partition of [`TopicStats`].
#[derive(serde::Deserialize)]
pub(crate) struct PartitionStats {
    #[serde(default = "unknown")]
    pub(crate) hi_offset: i64,
    #[serde(default = "unknown")]
    pub(crate) lo_offset: i64,
}

fn unknown() -> i64 {
    -1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_high_watermarks_are_read_from_librdkafka_statistics() {
        let json = r#"{"name":"c","brokers":{},"topics":{"orders":{"topic":"orders","partitions":{
            "0":{"partition":0,"hi_offset":42,"lo_offset":-1001},
            "-1":{"partition":-1,"hi_offset":-1001}}}}}"#;
        let stats: KafkaStats = serde_json::from_str(json).unwrap();
        assert_eq!(stats.topics["orders"].partitions["0"].hi_offset, 42);
        assert_eq!(stats.topics["orders"].partitions["0"].lo_offset, -1001);
        assert_eq!(stats.topics["orders"].partitions["-1"].hi_offset, -1001);
    }
}
