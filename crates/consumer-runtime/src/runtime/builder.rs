//! [`RuntimeBuilder`]: a thin face over [`ConsumerOptions`] (each setter writes one field), plus
//! the handler, the pool and the event-id strategy; `build` checks the whole.

use std::sync::Arc;
use std::time::Duration;

use sqlx::Pool;
use tokio::sync::watch;

use super::{Runtime, Stats};
use crate::config::{
    Assignor, CircuitBreaker, ConsumerOptions, Guarantee, OffsetReset, RetryPolicy,
};
use crate::error::{Error, Result};
use crate::event_id::EventId;
use crate::handler::Handler;
use crate::store::{Backend, CRATE, Queries};
use crate::unit::WriterConfig;

/// Builds a [`Runtime`]. Start with [`Runtime::builder`].
pub struct RuntimeBuilder<H: Handler<DB>, DB: Backend> {
    handler: H,
    pool: Option<Pool<DB>>,
    event_id: EventId<H::Event>,
    options: ConsumerOptions,
}

/// Builder methods that each write one field of the options: `name(Type) => field;`, or
/// `=> field: Some;` for an optional field.
macro_rules! option_setters {
    ($($(#[$doc:meta])* $name:ident($ty:ty) => $field:ident $(: $wrap:ident)?;)*) => {
        $(
            $(#[$doc])*
            pub fn $name(mut self, value: $ty) -> Self {
                self.options.$field = option_setters!(@wrap value $($wrap)?);
                self
            }
        )*
    };
    (@wrap $value:ident) => { $value };
    (@wrap $value:ident Some) => { Some($value) };
}

impl<H: Handler<DB>, DB: Backend> RuntimeBuilder<H, DB> {
    /// The defaults; see [`Runtime::builder`].
    pub(super) fn new(handler: H) -> Self {
        RuntimeBuilder {
            handler,
            pool: None,
            event_id: EventId::default(),
            options: ConsumerOptions::default(),
        }
    }

    /// Every setting at once (from a configuration file, say), replacing what earlier setters
    /// set; the pool, the handler and the event-id strategy stay. Setters called afterwards
    /// change single fields on top.
    pub fn options(mut self, options: ConsumerOptions) -> Self {
        self.options = options;
        self
    }
    /// The database pool holding the runtime's tables and the handler's.
    pub fn pool(mut self, pool: Pool<DB>) -> Self {
        self.pool = Some(pool);
        self
    }
    /// Kafka's bootstrap servers, `host:port[,host:port…]`.
    pub fn brokers(mut self, brokers: impl Into<String>) -> Self {
        self.options.brokers = brokers.into();
        self
    }
    /// The consumer group. Dedup is scoped per group.
    pub fn group(mut self, group: impl Into<String>) -> Self {
        self.options.group = group.into();
        self
    }
    /// Adds a topic to consume.
    pub fn topic(mut self, topic: impl Into<String>) -> Self {
        self.options.topics.push(topic.into());
        self
    }
    /// Adds topics to consume.
    pub fn topics<I: IntoIterator<Item = S>, S: Into<String>>(mut self, topics: I) -> Self {
        self.options
            .topics
            .extend(topics.into_iter().map(Into::into));
        self
    }
    /// Where event ids come from. Default: the `event-id` header.
    pub fn event_id(mut self, strategy: EventId<H::Event>) -> Self {
        self.event_id = strategy;
        self
    }
    /// The schema (PostgreSQL) or table prefix (SQLite) of the runtime's tables. Default
    /// `consumer_runtime`.
    pub fn schema(mut self, schema: impl Into<String>) -> Self {
        self.options.schema = schema.into();
        self
    }
    /// Sets a librdkafka consumer property (as `kcat -X key=value`); it wins over the
    /// runtime's own settings, except that offsets are never auto-committed.
    pub fn kafka_config(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.options.kafka.insert(key.into(), value.into());
        self
    }

    option_setters! {
        /// The most records in one batch (one transaction) of a partition. Default 500; 1 gives
        /// one transaction per record.
        batch_size(usize) => batch_size;
        /// How long a partition's batch may wait to fill after its first record. Default 20 ms.
        batch_wait(Duration) => batch_wait;
        /// The most transactions open at once. Default and maximum: the pool's size (SQLite:
        /// 1).
        concurrency(usize) => concurrency: Some;
        /// The delivery guarantee. Default: effectively-once.
        guarantee(Guarantee) => guarantee;
        /// Where a partition starts when the database has no offset for it. Default: earliest.
        offset_reset(OffsetReset) => offset_reset;
        /// The partition assignment strategy. Default: cooperative-sticky.
        assignor(Assignor) => assignor;
        /// How transient failures are retried.
        retry_policy(RetryPolicy) => retry_policy;
        /// When parking becomes the norm, stop. Default: 100 parked records in a row, or more
        /// than half of the last 1,000 ([`CircuitBreaker::default`]).
        circuit_breaker(CircuitBreaker) => circuit_breaker;
        /// Whether [`Runtime::run`] stops gracefully on SIGINT and SIGTERM. Default: false, so
        /// that an application embedding the runtime keeps its signals; it can stop the runtime
        /// with [`Runtime::run_until`] or a [`ShutdownHandle`](super::ShutdownHandle).
        handle_signals(bool) => handle_signals;
        /// How long to wait for the brokers at startup before giving up. Default 10 s.
        startup_timeout(Duration) => startup_timeout;
        /// How often idle partitions check the database for an epoch bumped behind their back
        /// (a replay or an explicit offset change). Default 1 s.
        epoch_check_interval(Duration) => epoch_check_interval;
        /// Keeps the gauges that cost something current, refreshed at this interval: each
        /// assigned partition's lag (from librdkafka's statistics, `statistics.interval.ms`,
        /// unless a [`kafka_config`](Self::kafka_config) sets it) and the ledger size (a `count(*)` of the
        /// group's ledger rows, never more often than 100 times the last count took). Default:
        /// off. Counters and histograms are always recorded (see [`crate::telemetry`]); without a
        /// `metrics` recorder installed they cost next to nothing.
        metrics_refresh(Duration) => metrics_refresh: Some;
        /// Whether the stored offsets are mirrored to the consumer group in Kafka, for
        /// monitoring tools only (see [`ConsumerOptions::mirror_offsets`]). Default: on.
        mirror_offsets(bool) => mirror_offsets;
        /// How long a partition with lag may receive nothing before it is reported stalled
        /// (see [`ConsumerOptions::stall_timeout`]). Default 60 s.
        stall_timeout(Duration) => stall_timeout: Some;
        /// How long the dedup ledger remembers an event, e.g. 14 days. Default: off, which keeps
        /// every row for ever. With a retention, `run` prunes the ledger in the background (a
        /// new generation every quarter of the retention; generations older than the retention
        /// dropped whole): an event whose ledger row is younger than the retention is never
        /// applied twice. See [`crate::ledger`] and the README's "Ledger retention".
        ledger_retention(Duration) => ledger_retention: Some;
    }

    /// Checks the configuration and builds the runtime.
    pub fn build(self) -> Result<Runtime<H, DB>> {
        let pool = self
            .pool
            .ok_or_else(|| missing("database pool", "call .pool(…)"))?;
        let options = self.options;
        check(&options)?;
        let queries = Queries::new::<DB>(&options.schema)?;
        let writers = DB::max_writers(&pool, CRATE);
        let concurrency = options
            .concurrency
            .unwrap_or(writers)
            .clamp(1, writers.max(1));
        let (shutdown_tx, _) = watch::channel(false);
        Ok(Runtime {
            writer: Arc::new(WriterConfig {
                handler: Arc::new(self.handler),
                pool,
                queries,
                guarantee: options.guarantee,
                event_id: self.event_id,
            }),
            options,
            concurrency,
            shutdown: Arc::new(shutdown_tx),
            stats: Arc::new(Stats::default()),
            health: Arc::new(super::HealthState::new()),
        })
    }
}

fn missing(what: &str, how: &str) -> Error {
    Error::Config(format!("no {what} given; {how}"))
}

/// The options a runtime cannot start without, and the ones it refuses.
fn check(options: &ConsumerOptions) -> Result<()> {
    if options.brokers.trim().is_empty() {
        return Err(missing("Kafka brokers", "call .brokers(\"host:9092\")"));
    }
    if options.group.trim().is_empty() {
        return Err(missing("consumer group", "call .group(\"name\")"));
    }
    if options.topics.is_empty() {
        return Err(missing("topic", "call .topic(\"name\")"));
    }
    if options.batch_size == 0 {
        return Err(Error::Config("batch size must be at least 1".into()));
    }
    if options.ledger_retention.is_some_and(|r| r.is_zero()) {
        return Err(Error::Config(
            "a ledger retention of 0 would forget every event at once; leave it off to keep the ledger for ever, or give a retention longer than any replay or redelivery, e.g. 14d".into(),
        ));
    }
    if options.epoch_check_interval.is_zero() {
        return Err(Error::Config(
            "the epoch check interval must be longer than 0".into(),
        ));
    }
    if options.kafka.iter().any(|(k, v)| {
        (k == "enable.auto.commit" || k == "enable.auto.offset.store") && v != "false"
    }) {
        return Err(Error::Config(
            "enable.auto.commit and enable.auto.offset.store must stay false: offsets live in the database".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::Sqlite;

    use crate::runtime::test_handler::Nothing;

    fn pool() -> Pool<Sqlite> {
        sqlx::SqlitePool::connect_lazy("sqlite::memory:").expect("an in-memory SQLite pool")
    }

    fn builder() -> RuntimeBuilder<Nothing, Sqlite> {
        Runtime::builder(Nothing)
    }

    fn refused(built: Result<Runtime<Nothing, Sqlite>>) -> String {
        match built {
            Ok(_) => panic!("the builder accepted an incomplete configuration"),
            Err(e) => e.to_string(),
        }
    }

    #[tokio::test]
    async fn options_set_everything_at_once_and_later_setters_change_single_fields() {
        let options: ConsumerOptions = toml::from_str(
            r#"
            brokers = "kafka:9092"
            group = "g"
            topics = ["t"]
            batch_size = 7
            concurrency = 4
            "#,
        )
        .unwrap();
        let runtime = builder()
            .batch_size(99)
            .pool(pool())
            .options(options)
            .batch_wait(Duration::from_secs(2))
            .topic("u")
            .build()
            .unwrap();
        let options = runtime.options();
        assert_eq!(
            options.batch_size, 7,
            "options replace what setters set before"
        );
        assert_eq!(options.batch_wait, Duration::from_secs(2));
        assert_eq!(options.topics, ["t", "u"]);
        assert_eq!(options.brokers, "kafka:9092");
        assert_eq!(
            options.concurrency,
            Some(4),
            "the options keep what was asked"
        );
        assert_eq!(runtime.concurrency, 1, "SQLite has one writer");
        assert!(!options.handle_signals);
    }

    #[tokio::test]
    async fn build_names_what_is_missing_or_refused() {
        let complete = || {
            builder()
                .pool(pool())
                .brokers("b:9092")
                .group("g")
                .topic("t")
        };
        assert!(complete().build().is_ok());
        let cases = [
            (
                builder().brokers("b:9092").group("g").topic("t").build(),
                "no database pool given; call .pool(…)",
            ),
            (
                builder().pool(pool()).group("g").topic("t").build(),
                "no Kafka brokers given; call .brokers(\"host:9092\")",
            ),
            (
                builder().pool(pool()).brokers("b:9092").topic("t").build(),
                "no consumer group given; call .group(\"name\")",
            ),
            (
                builder().pool(pool()).brokers("b:9092").group("g").build(),
                "no topic given; call .topic(\"name\")",
            ),
            (
                complete().batch_size(0).build(),
                "batch size must be at least 1",
            ),
            (
                complete().epoch_check_interval(Duration::ZERO).build(),
                "the epoch check interval must be longer than 0",
            ),
            (
                complete()
                    .kafka_config("enable.auto.commit", "true")
                    .build(),
                "enable.auto.commit and enable.auto.offset.store must stay false",
            ),
        ];
        for (built, expected) in cases {
            let message = refused(built);
            assert!(message.contains(expected), "{message}");
        }
    }
}
