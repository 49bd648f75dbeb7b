//! Settings that shape the runtime's behaviour: [`ConsumerOptions`], every knob of a
//! [`Runtime`](crate::Runtime) in one value, and the types of its fields.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

/// The delivery guarantee: what a crash, a retry or a producer duplicate can do to your
/// effects. The README's "Choosing a guarantee" compares them with measured costs.
///
/// | mode | per batch | a crash can | a producer duplicate is |
/// |---|---|---|---|
/// | `AtMostOnce` | offset transaction, then handler transaction | lose the batch in flight | applied again |
/// | `AtLeastOnce` | handler transaction, then offset transaction | apply the batch in flight again | applied again |
/// | `EffectivelyOnce` | one transaction: ledger + handler + offset | neither | skipped |
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Guarantee {
    /// The stored offset is advanced in a transaction of its own *before* the handler runs, and
    /// the handler's transaction follows; there is no ledger. A crash, or a handler failure,
    /// after the first commit loses the batch (its records are counted in
    /// [`StatsSnapshot::lost`](crate::StatsSnapshot::lost) and logged); a crash never makes the
    /// runtime apply a record twice. Producer-side duplicates are different records to this
    /// mode and are applied again.
    ///
    /// Pick it for logs, metrics and samples, where a gap is acceptable and a double count is
    /// not worth a ledger row.
    AtMostOnce,
    /// The handler's transaction commits first, then the offset advances in a second
    /// transaction; there is no ledger. Nothing is ever lost. A crash between the two commits
    /// re-applies the batch in flight on restart, a failed offset commit re-applies it on
    /// retry, and producer-side duplicates are applied again.
    ///
    /// Pick it for most business events whose effects are idempotent by construction (upserts
    /// of the latest state, version-checked updates), when you would rather not keep a ledger.
    AtLeastOnce,
    /// The ledger claim, the handler's effects and the offset advance commit in one
    /// transaction. Nothing is lost and nothing is applied twice, across crashes, rebalances,
    /// zombie consumers, producer retries and replays.
    ///
    /// The default. Pick it for payments, inventory, anything that counts or charges.
    #[default]
    EffectivelyOnce,
}

impl std::str::FromStr for Guarantee {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "at-most-once" => Ok(Guarantee::AtMostOnce),
            "at-least-once" => Ok(Guarantee::AtLeastOnce),
            "effectively-once" => Ok(Guarantee::EffectivelyOnce),
            other => Err(format!(
                "unknown guarantee `{other}`; use at-most-once, at-least-once or effectively-once"
            )),
        }
    }
}

impl std::fmt::Display for Guarantee {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Guarantee::AtMostOnce => "at-most-once",
            Guarantee::AtLeastOnce => "at-least-once",
            Guarantee::EffectivelyOnce => "effectively-once",
        })
    }
}

/// Where a partition starts when the database holds no offset for it yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum OffsetReset {
    /// The oldest record still in the partition.
    #[default]
    Earliest,
    /// Only records produced after the assignment.
    Latest,
}

impl std::str::FromStr for OffsetReset {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "earliest" => Ok(OffsetReset::Earliest),
            "latest" => Ok(OffsetReset::Latest),
            other => Err(format!(
                "unknown offset reset policy `{other}`; use earliest or latest"
            )),
        }
    }
}

/// The consumer group's partition assignment strategy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Assignor {
    /// Eager `range` assignment: every rebalance revokes and reassigns every partition.
    Range,
    /// Eager `roundrobin` assignment.
    RoundRobin,
    /// Incremental `cooperative-sticky` assignment: only moved partitions are revoked.
    #[default]
    CooperativeSticky,
}

impl Assignor {
    pub(crate) fn as_kafka(self) -> &'static str {
        match self {
            Assignor::Range => "range",
            Assignor::RoundRobin => "roundrobin",
            Assignor::CooperativeSticky => "cooperative-sticky",
        }
    }
}

impl std::str::FromStr for Assignor {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "range" => Ok(Assignor::Range),
            "roundrobin" => Ok(Assignor::RoundRobin),
            "cooperative-sticky" => Ok(Assignor::CooperativeSticky),
            other => Err(format!(
                "unknown assignor `{other}`; use range, roundrobin or cooperative-sticky"
            )),
        }
    }
}

/// How transient failures are retried.
///
/// In a configuration file: `{ initial_delay = "100ms", max_delay = "30s", max_attempts = 10 }`
/// (`max_attempts = "unlimited"` retries forever); a key left out keeps its default.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryPolicy {
    /// The delay before the first retry; it doubles with each attempt.
    #[serde(deserialize_with = "de::duration")]
    pub initial_delay: Duration,
    /// The longest delay between two attempts.
    #[serde(deserialize_with = "de::duration")]
    pub max_delay: Duration,
    /// How many attempts a batch gets before its failing record is treated as permanently
    /// failed; `None` retries forever.
    #[serde(deserialize_with = "de::attempts")]
    pub max_attempts: Option<u32>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            initial_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(30),
            max_attempts: Some(10),
        }
    }
}

impl RetryPolicy {
    /// The delay before retry number `attempt` (1-based): exponential, capped, with up to 50%
    /// random jitter subtracted so that many partitions do not retry in lockstep.
    pub fn delay(&self, attempt: u32) -> Duration {
        let exp = self
            .initial_delay
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(20));
        let capped = exp.min(self.max_delay);
        let jitter = (capped.as_nanos() as u64 / 2).max(1);
        capped - Duration::from_nanos(crate::util::random_u64() % jitter)
    }
}

/// When parking becomes the norm, stop the consumer instead of dead-lettering a whole topic
/// (after a bad deploy, say). The runtime counts, in the order batches commit, records parked
/// versus records applied or skipped as duplicates; it stops with
/// [`Error::CircuitOpen`](crate::Error::CircuitOpen) when either limit is reached. The records
/// of the batch that tripped it are committed (parked); nothing after them is touched.
///
/// In a configuration file: `{ max_consecutive = 100, ratio = { max_ratio = 0.5, window = 1000 } }`;
/// `"off"` turns either limit off, and a key left out keeps its default.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CircuitBreaker {
    /// Stop after this many parked records in a row (none applied in between). `None`: no
    /// limit.
    #[serde(deserialize_with = "de::consecutive")]
    pub max_consecutive: Option<u64>,
    /// Stop when more than `max_ratio` of the last `window` records were parked (checked once
    /// `window` records have been seen). `None`: no limit.
    #[serde(deserialize_with = "de::ratio")]
    pub ratio: Option<ParkedRatio>,
}

/// The ratio limit of a [`CircuitBreaker`].
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ParkedRatio {
    /// The largest tolerated share of parked records, between 0 and 1.
    #[serde(deserialize_with = "de::share")]
    pub max_ratio: f64,
    /// How many of the most recent records the share is taken over.
    pub window: u64,
}

impl Default for CircuitBreaker {
    /// 100 parked records in a row, or more than half of the last 1,000.
    fn default() -> Self {
        CircuitBreaker {
            max_consecutive: Some(100),
            ratio: Some(ParkedRatio::default()),
        }
    }
}

impl Default for ParkedRatio {
    /// More than half of the last 1,000 records.
    fn default() -> Self {
        ParkedRatio {
            max_ratio: 0.5,
            window: 1000,
        }
    }
}

impl CircuitBreaker {
    /// Never stops: every failing record is parked.
    pub fn disabled() -> Self {
        CircuitBreaker {
            max_consecutive: None,
            ratio: None,
        }
    }
}

/// Every setting of a [`Runtime`](crate::Runtime) but the handler, the pool and the event-id
/// strategy, in one value: [`RuntimeBuilder`](crate::RuntimeBuilder)'s setters write into it,
/// [`RuntimeBuilder::options`](crate::RuntimeBuilder::options) sets all of it at once, and a
/// configuration file deserialises into it (any `serde` format). Every field has a default;
/// `brokers`, `group` and one topic must be given before
/// [`build`](crate::RuntimeBuilder::build).
///
/// ```toml
/// brokers = "kafka:9092"
/// group = "balances"
/// topics = ["payments"]
/// batch_size = 200
/// batch_wait = "50ms"                       # durations: ns, us, ms, s, m, h
/// guarantee = "at-least-once"
/// retry_policy = { max_attempts = 5, max_delay = "10s" }
/// circuit_breaker = { max_consecutive = "off" }
///
/// [kafka]
/// "session.timeout.ms" = 6000               # or session.timeout.ms = 6000
/// ```
///
/// A key the struct does not have is an error that names it, and so is a duration without a
/// unit. In code, start from the defaults and change fields:
///
/// ```
/// let mut options = consumer_runtime::ConsumerOptions::default();
/// options.batch_size = 100;
/// options.topics.push("payments".into());
/// ```
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct ConsumerOptions {
    /// Kafka's bootstrap servers, `host:port[,host:port…]`. Required.
    pub brokers: String,
    /// The consumer group. Dedup is scoped per group. Required.
    pub group: String,
    /// The topics to consume. At least one is required.
    pub topics: Vec<String>,
    /// The most records in one batch (one transaction) of a partition. Default 500; 1 gives
    /// one transaction per record.
    pub batch_size: usize,
    /// How long a partition's batch may wait to fill after its first record. Default 20 ms.
    #[serde(deserialize_with = "de::duration")]
    pub batch_wait: Duration,
    /// The most transactions open at once. Default (`None`) and maximum: the pool's size
    /// (SQLite: 1).
    pub concurrency: Option<usize>,
    /// The delivery guarantee. Default: effectively-once.
    pub guarantee: Guarantee,
    /// Where a partition starts when the database has no offset for it. Default: earliest.
    pub offset_reset: OffsetReset,
    /// The schema (PostgreSQL) or table prefix (SQLite) of the runtime's tables. Default
    /// `consumer_runtime`.
    pub schema: String,
    /// The partition assignment strategy. Default: cooperative-sticky.
    pub assignor: Assignor,
    /// How transient failures are retried. Default: [`RetryPolicy::default`].
    pub retry_policy: RetryPolicy,
    /// When parking becomes the norm, stop. Default: [`CircuitBreaker::default`].
    pub circuit_breaker: CircuitBreaker,
    /// librdkafka consumer properties (as `kcat -X key=value`); they win over the runtime's
    /// own settings, except that offsets are never auto-committed. In a file, nested tables
    /// flatten into dotted names and numbers and booleans into text.
    #[serde(deserialize_with = "de::properties")]
    pub kafka: BTreeMap<String, String>,
    /// Whether [`Runtime::run`](crate::Runtime::run) stops gracefully on SIGINT and SIGTERM.
    /// Default: false (an embedding application keeps its signals; see
    /// [`Runtime::run_until`](crate::Runtime::run_until)).
    pub handle_signals: bool,
    /// How long to wait for the brokers at startup before giving up. Default 10 s.
    #[serde(deserialize_with = "de::duration")]
    pub startup_timeout: Duration,
    /// How often idle partitions check the database for an epoch bumped behind their back (a
    /// replay or an explicit offset change). Default 1 s.
    #[serde(deserialize_with = "de::duration")]
    pub epoch_check_interval: Duration,
    /// Keeps the gauges that cost something current, this often: each assigned partition's
    /// lag and the ledger size. Default: off (`None`). See
    /// [`RuntimeBuilder::metrics_refresh`](crate::RuntimeBuilder::metrics_refresh).
    #[serde(deserialize_with = "de::some_duration")]
    pub metrics_refresh: Option<Duration>,
    /// Mirrors the stored offsets to the consumer group in Kafka, for monitoring only: after a
    /// batch commits in the database, the same next offset is committed to the group
    /// (asynchronously, at most once a second per partition, and every partition again every
    /// 5 s), so that `kafka-consumer-groups.sh`, Burrow, lag exporters and KEDA see the
    /// group's progress. The runtime never reads these offsets back: on assignment it starts
    /// where the database says. A failed mirror commit is logged and counted, and never slows
    /// or fails a batch. Default: on.
    pub mirror_offsets: bool,
    /// A partition that has lag (its high watermark is past the stored offset) but has
    /// received no record for this long is *stalled*: logged as a warning and counted in the
    /// `consumer_partition_stalled` gauge, and shown by
    /// [`Health::stalled`](crate::Health::stalled). `None` (`"off"` in a file) turns the check
    /// off. Default 60 s.
    #[serde(deserialize_with = "de::duration_or_off")]
    pub stall_timeout: Option<Duration>,
    /// How long the dedup ledger remembers an event (e.g. 14 days). Default: off (`None`),
    /// which keeps every ledger row for ever. With a retention the runtime prunes the ledger
    /// while it runs (see [`crate::ledger`]): an event whose ledger row is younger than the
    /// retention is never applied twice; one older may be, if it arrives again as a new record
    /// or a forced replay reaches it.
    #[serde(deserialize_with = "de::some_duration")]
    pub ledger_retention: Option<Duration>,
}

impl Default for ConsumerOptions {
    fn default() -> Self {
        ConsumerOptions {
            brokers: String::new(),
            group: String::new(),
            topics: Vec::new(),
            batch_size: 500,
            batch_wait: Duration::from_millis(20),
            concurrency: None,
            guarantee: Guarantee::default(),
            offset_reset: OffsetReset::default(),
            schema: "consumer_runtime".to_owned(),
            assignor: Assignor::default(),
            retry_policy: RetryPolicy::default(),
            circuit_breaker: CircuitBreaker::default(),
            kafka: BTreeMap::new(),
            handle_signals: false,
            startup_timeout: Duration::from_secs(10),
            epoch_check_interval: Duration::from_secs(1),
            metrics_refresh: None,
            mirror_offsets: true,
            stall_timeout: Some(Duration::from_secs(60)),
            ledger_retention: None,
        }
    }
}

/// Parses a duration such as `20ms`, `1s`, `1.5s`, `500us`, `2m` or `1h` (units: ns, us or µs,
/// ms, s, m or min, h, d). A bare number is refused: its unit would be a guess. The error says
/// what is wrong and shows an example.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let text = s.trim();
    let bad = |why: &str| format!("`{s}` is not a duration ({why}); write e.g. 20ms, 1s or 500us");
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| bad("no unit"))?;
    let (number, unit) = text.split_at(split);
    if number.is_empty() {
        return Err(bad("no number"));
    }
    let nanos_per_unit: u64 = match unit.trim() {
        "ns" => 1,
        "us" | "µs" => 1_000,
        "ms" => 1_000_000,
        "s" => 1_000_000_000,
        "m" | "min" => 60_000_000_000,
        "h" => 3_600_000_000_000,
        "d" => 86_400_000_000_000,
        _ => return Err(bad("unknown unit")),
    };
    if let Ok(whole) = number.parse::<u64>() {
        let nanos = whole
            .checked_mul(nanos_per_unit)
            .ok_or_else(|| bad("too long"))?;
        return Ok(Duration::from_nanos(nanos));
    }
    let value: f64 = number.parse().map_err(|_| bad("not a number"))?;
    Duration::try_from_secs_f64(value * nanos_per_unit as f64 / 1e9).map_err(|_| bad("too long"))
}

/// The configuration enums deserialise from the same words their `FromStr` takes, with its
/// messages.
macro_rules! deserialize_from_str {
    ($($ty:ty),*) => {$(
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let text = String::deserialize(d)?;
                text.parse().map_err(serde::de::Error::custom)
            }
        }
    )*};
}

deserialize_from_str!(Guarantee, OffsetReset, Assignor);

/// The `deserialize_with` functions of the options' fields.
mod de {
    use std::collections::BTreeMap;
    use std::fmt;
    use std::marker::PhantomData;
    use std::time::Duration;

    use serde::Deserialize;
    use serde::de::{self, Deserializer, MapAccess, Visitor};

    use super::ParkedRatio;

    struct DurationText;

    impl Visitor<'_> for DurationText {
        type Value = Duration;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a duration such as 20ms, 1s or 500us")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
            super::parse_duration(v).map_err(E::custom)
        }
    }

    pub(super) fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        d.deserialize_str(DurationText)
    }

    pub(super) fn some_duration<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Duration>, D::Error> {
        d.deserialize_str(DurationText).map(Some)
    }

    /// A duration, or `"off"` for `None`.
    pub(super) fn duration_or_off<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Duration>, D::Error> {
        let text = String::deserialize(d)?;
        if text == "off" {
            return Ok(None);
        }
        super::parse_duration(&text)
            .map(Some)
            .map_err(|e| de::Error::custom(format!("{e}, or off")))
    }

    /// A whole number from 1 up (also as text), or `word` for `None`.
    struct CountOr<T> {
        word: &'static str,
        what: &'static str,
        count: PhantomData<T>,
    }

    impl<T> CountOr<T> {
        fn bad<E: de::Error>(&self, shown: &dyn fmt::Display) -> E {
            E::custom(format!(
                "`{shown}` is not a number of {}; use a number from 1 up, or {}",
                self.what, self.word
            ))
        }
    }

    impl<T: TryFrom<u64>> Visitor<'_> for CountOr<T> {
        type Value = Option<T>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "a number from 1 up, or \"{}\"", self.word)
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Option<T>, E> {
            match T::try_from(v) {
                Ok(n) if v >= 1 => Ok(Some(n)),
                _ => Err(self.bad(&v)),
            }
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Option<T>, E> {
            match u64::try_from(v) {
                Ok(v) => self.visit_u64(v),
                Err(_) => Err(self.bad(&v)),
            }
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Option<T>, E> {
            if v == self.word {
                return Ok(None);
            }
            match v.trim().parse::<u64>() {
                Ok(n) => self.visit_u64(n),
                Err(_) => Err(self.bad(&v)),
            }
        }
    }

    pub(super) fn attempts<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
        d.deserialize_any(CountOr {
            word: "unlimited",
            what: "attempts",
            count: PhantomData,
        })
    }

    pub(super) fn consecutive<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        d.deserialize_any(CountOr {
            word: "off",
            what: "records",
            count: PhantomData,
        })
    }

    /// A share strictly between 0 and 1.
    pub(super) fn share<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        let r = f64::deserialize(d)?;
        if r > 0.0 && r < 1.0 {
            Ok(r)
        } else {
            Err(de::Error::custom(format!(
                "`{r}` is not a share of parked records; use a number between 0 and 1 (exclusive, e.g. 0.5)"
            )))
        }
    }

    /// A [`ParkedRatio`] table, or `"off"` for `None`.
    struct RatioOrOff;

    impl<'de> Visitor<'de> for RatioOrOff {
        type Value = Option<ParkedRatio>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a table such as { max_ratio = 0.5, window = 1000 }, or \"off\"")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
            match v {
                "off" => Ok(None),
                _ => Err(E::invalid_value(de::Unexpected::Str(v), &self)),
            }
        }
        fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
            ParkedRatio::deserialize(de::value::MapAccessDeserializer::new(map)).map(Some)
        }
    }

    pub(super) fn ratio<'de, D: Deserializer<'de>>(d: D) -> Result<Option<ParkedRatio>, D::Error> {
        d.deserialize_any(RatioOrOff)
    }

    /// librdkafka properties: a table of text, numbers and booleans; nested tables flatten into
    /// dotted names (`session = { timeout = { ms = 6000 } }` is `session.timeout.ms = "6000"`).
    struct Properties<'a> {
        prefix: String,
        out: &'a mut BTreeMap<String, String>,
    }

    impl<'de> Visitor<'de> for Properties<'_> {
        type Value = ();
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a table of librdkafka properties")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
            while let Some(key) = map.next_key::<String>()? {
                let name = if self.prefix.is_empty() {
                    key
                } else {
                    format!("{}.{key}", self.prefix)
                };
                map.next_value_seed(Property {
                    name,
                    out: &mut *self.out,
                })?;
            }
            Ok(())
        }
    }

    /// One property's value, or a nested table of them.
    struct Property<'a> {
        name: String,
        out: &'a mut BTreeMap<String, String>,
    }

    impl Property<'_> {
        fn set<E>(self, value: String) -> Result<(), E> {
            self.out.insert(self.name, value);
            Ok(())
        }
    }

    impl<'de> de::DeserializeSeed<'de> for Property<'_> {
        type Value = ();
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
            d.deserialize_any(self)
        }
    }

    impl<'de> Visitor<'de> for Property<'_> {
        type Value = ();
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(
                f,
                "`kafka.{}`: a librdkafka property must be a string, a number or a boolean",
                self.name
            )
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
            self.set(v.to_owned())
        }
        fn visit_bool<E: de::Error>(self, v: bool) -> Result<(), E> {
            self.set(v.to_string())
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
            self.set(v.to_string())
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
            self.set(v.to_string())
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
            self.set(v.to_string())
        }
        fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<(), A::Error> {
            Properties {
                prefix: self.name,
                out: self.out,
            }
            .visit_map(map)
        }
    }

    pub(super) fn properties<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<String, String>, D::Error> {
        let mut out = BTreeMap::new();
        d.deserialize_map(Properties {
            prefix: String::new(),
            out: &mut out,
        })?;
        Ok(out)
    }
}

/// The breaker's running state: outcomes in commit order.
#[derive(Debug, Default)]
pub(crate) struct BreakerState {
    consecutive: u64,
    window: std::collections::VecDeque<bool>,
    parked_in_window: u64,
}

impl BreakerState {
    /// Records one record's outcome; returns why the breaker trips, if it does.
    pub(crate) fn record(&mut self, limits: &CircuitBreaker, parked: bool) -> Option<String> {
        self.consecutive = if parked { self.consecutive + 1 } else { 0 };
        if let Some(r) = limits.ratio {
            self.window.push_back(parked);
            self.parked_in_window += u64::from(parked);
            while self.window.len() as u64 > r.window {
                if self.window.pop_front() == Some(true) {
                    self.parked_in_window -= 1;
                }
            }
            let seen = self.window.len() as u64;
            if seen == r.window && self.parked_in_window as f64 > r.max_ratio * seen as f64 {
                return Some(format!(
                    "{} of the last {seen} records were parked (more than {:.0}%)",
                    self.parked_in_window,
                    r.max_ratio * 100.0
                ));
            }
        }
        match limits.max_consecutive {
            Some(max) if parked && self.consecutive >= max => {
                Some(format!("{} records in a row were parked", self.consecutive))
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod breaker_tests {
    use super::*;

    #[test]
    fn consecutive_parked_records_trip_and_an_applied_one_resets() {
        let limits = CircuitBreaker {
            max_consecutive: Some(3),
            ratio: None,
        };
        let mut s = BreakerState::default();
        for parked in [true, true, false, true, true] {
            assert_eq!(s.record(&limits, parked), None);
        }
        assert!(
            s.record(&limits, true)
                .unwrap()
                .contains("3 records in a row")
        );
    }

    #[test]
    fn a_ratio_over_a_full_window_trips() {
        let limits = CircuitBreaker {
            max_consecutive: None,
            ratio: Some(ParkedRatio {
                max_ratio: 0.5,
                window: 4,
            }),
        };
        let mut s = BreakerState::default();
        // Half parked is tolerated; the window is not full before four records.
        for parked in [true, false, true, false, true, false, true] {
            assert_eq!(s.record(&limits, parked), None);
        }
        assert!(s.record(&limits, true).unwrap().contains("3 of the last 4"));
        assert_eq!(
            BreakerState::default().record(&CircuitBreaker::disabled(), true),
            None
        );
    }
}

#[cfg(test)]
mod options_tests {
    use super::*;

    fn from_toml(text: &str) -> Result<ConsumerOptions, String> {
        toml::from_str(text).map_err(|e| e.message().to_owned())
    }

    #[test]
    fn durations_need_a_unit_and_accept_the_common_ones() {
        assert_eq!(parse_duration("20ms").unwrap(), Duration::from_millis(20));
        assert_eq!(parse_duration("1s").unwrap(), Duration::from_secs(1));
        assert_eq!(parse_duration("500us").unwrap(), Duration::from_micros(500));
        assert_eq!(parse_duration("500µs").unwrap(), Duration::from_micros(500));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_duration("0ms").unwrap(), Duration::ZERO);
        for bad in ["20", "ms", "", "20 parsecs", "1.2.3s", "-1s"] {
            let err = parse_duration(bad).unwrap_err();
            assert!(err.contains("20ms"), "{bad}: {err}");
        }
    }

    #[test]
    fn an_empty_file_gives_the_defaults() {
        let options = from_toml("").unwrap();
        assert_eq!(options, ConsumerOptions::default());
        assert_eq!(options.batch_size, 500);
        assert_eq!(options.batch_wait, Duration::from_millis(20));
        assert_eq!(options.schema, "consumer_runtime");
        assert!(
            !options.handle_signals,
            "an embedded runtime leaves signals alone"
        );
        assert_eq!(options.metrics_refresh, None);
    }

    #[test]
    fn every_option_reads_from_a_toml_file() {
        let options = from_toml(
            r#"
            brokers = "kafka:9092"
            group = "balances"
            topics = ["payments", "refunds"]
            batch_size = 200
            batch_wait = "50ms"
            concurrency = 4
            guarantee = "at-least-once"
            offset_reset = "latest"
            schema = "billing"
            assignor = "range"
            handle_signals = true
            startup_timeout = "30s"
            epoch_check_interval = "1.5s"
            metrics_refresh = "15s"
            retry_policy = { initial_delay = "10ms", max_attempts = "unlimited" }
            circuit_breaker = { max_consecutive = "off", ratio = { max_ratio = 0.25 } }

            [kafka]
            "client.id" = "billing-1"
            session.timeout.ms = 6000
            enable.partition.eof = false
            "#,
        )
        .unwrap();
        assert_eq!(options.brokers, "kafka:9092");
        assert_eq!(options.group, "balances");
        assert_eq!(options.topics, ["payments", "refunds"]);
        assert_eq!(options.batch_size, 200);
        assert_eq!(options.batch_wait, Duration::from_millis(50));
        assert_eq!(options.concurrency, Some(4));
        assert_eq!(options.guarantee, Guarantee::AtLeastOnce);
        assert_eq!(options.offset_reset, OffsetReset::Latest);
        assert_eq!(options.schema, "billing");
        assert_eq!(options.assignor, Assignor::Range);
        assert!(options.handle_signals);
        assert_eq!(options.startup_timeout, Duration::from_secs(30));
        assert_eq!(options.epoch_check_interval, Duration::from_millis(1500));
        assert_eq!(options.metrics_refresh, Some(Duration::from_secs(15)));
        // A table keeps the defaults of the keys it leaves out.
        assert_eq!(
            options.retry_policy,
            RetryPolicy {
                initial_delay: Duration::from_millis(10),
                max_delay: Duration::from_secs(30),
                max_attempts: None,
            }
        );
        assert_eq!(
            options.circuit_breaker,
            CircuitBreaker {
                max_consecutive: None,
                ratio: Some(ParkedRatio {
                    max_ratio: 0.25,
                    window: 1000
                }),
            }
        );
        // Dotted keys, quoted or nested, become librdkafka's names; values become text.
        let kafka: Vec<(&str, &str)> = options
            .kafka
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            kafka,
            [
                ("client.id", "billing-1"),
                ("enable.partition.eof", "false"),
                ("session.timeout.ms", "6000"),
            ]
        );
    }

    #[test]
    fn any_serde_format_works_json_too() {
        let options: ConsumerOptions = serde_json::from_str(
            r#"{"group": "g", "batch_wait": "1s", "circuit_breaker": {"ratio": "off"},
                "kafka": {"fetch.max.bytes": 1048576}}"#,
        )
        .unwrap();
        assert_eq!(options.group, "g");
        assert_eq!(options.batch_wait, Duration::from_secs(1));
        assert_eq!(options.circuit_breaker.ratio, None);
        assert_eq!(options.circuit_breaker.max_consecutive, Some(100));
        assert_eq!(options.kafka["fetch.max.bytes"], "1048576");
    }

    #[test]
    fn an_unknown_key_is_an_error_that_names_it() {
        let err = from_toml("batch_sise = 10").unwrap_err();
        assert!(err.contains("unknown field `batch_sise`"), "{err}");
        assert!(
            err.contains("batch_size"),
            "the error lists the known keys: {err}"
        );
        let err = from_toml("retry_policy = { attempts = 3 }").unwrap_err();
        assert!(err.contains("unknown field `attempts`"), "{err}");
    }

    #[test]
    fn a_duration_without_a_unit_is_an_error_that_shows_one() {
        let err = from_toml(r#"batch_wait = "20""#).unwrap_err();
        assert!(
            err.contains("`20` is not a duration (no unit)") && err.contains("20ms"),
            "{err}"
        );
        let err = from_toml("startup_timeout = 10").unwrap_err();
        assert!(err.contains("expected a duration such as 20ms"), "{err}");
        let err = from_toml(r#"retry_policy = { max_delay = "5 parsecs" }"#).unwrap_err();
        assert!(err.contains("unknown unit"), "{err}");
    }

    #[test]
    fn enums_and_limits_say_what_they_accept() {
        let err = from_toml(r#"guarantee = "exactly-once""#).unwrap_err();
        assert!(
            err.contains("unknown guarantee `exactly-once`; use at-most-once"),
            "{err}"
        );
        let err = from_toml(r#"assignor = "sticky""#).unwrap_err();
        assert!(err.contains("unknown assignor `sticky`"), "{err}");
        let err = from_toml("retry_policy = { max_attempts = 0 }").unwrap_err();
        assert!(
            err.contains("`0` is not a number of attempts; use a number from 1 up, or unlimited"),
            "{err}"
        );
        let err = from_toml("circuit_breaker = { ratio = { max_ratio = 1.5 } }").unwrap_err();
        assert!(err.contains("not a share of parked records"), "{err}");
        let err = from_toml(r#"circuit_breaker = { ratio = "never" }"#).unwrap_err();
        assert!(err.contains(r#"or "off""#), "{err}");
        let err = from_toml("[kafka]\n\"client.id\" = [1, 2]").unwrap_err();
        assert!(
            err.contains("`kafka.client.id`: a librdkafka property must be a string"),
            "{err}"
        );
        let options = from_toml(r#"retry_policy = { max_attempts = "3" }"#).unwrap();
        assert_eq!(options.retry_policy.max_attempts, Some(3));
    }
}
