//! Safe replay: move a consumer group's stored offsets back, so that its consumers read a range
//! of a topic again.
//!
//! A replay rewrites the group's stored offsets for a topic (or one partition of it) to the
//! earliest retained record, an offset, or the first record at or after a time, in **one
//! transaction** that also bumps each partition's epoch and clears its owner. Consumers that are
//! running are fenced, reload the new position and continue from it without a restart. Records
//! that were already processed are skipped by the dedup ledger, so a replay re-applies nothing.
//!
//! Three modes ([`ReplayMode`]):
//!
//! - [`ReplayMode::DryRun`] changes nothing: it reads the range from Kafka, works out each
//!   record's event id with the runtime's own rules, and reports how many records the range
//!   holds and how many of them the ledger would skip.
//! - [`ReplayMode::Apply`] moves the offsets. Nothing is applied twice.
//! - [`ReplayMode::Rebuild`] moves the offsets **and deletes the ledger rows of the range** in
//!   the same transaction, so that the handler runs **again** for every event of the range:
//!   its effects are applied a second time. Use it only to rebuild state the handler derives
//!   (after fixing a bug in it, say), never for effects that must happen once.
//!
//! "Nothing is applied twice" rests on the ledger, so it holds for consumers under the default
//! effectively-once guarantee. At-least-once and at-most-once consumers keep no ledger: for
//! them every replay re-applies its range (a dry run shows it: nothing is already processed).
//!
//! The range of a partition is `[from, to)`: `from` is the new position, `to` the stored
//! offset before the replay. A replay only ever moves a partition **back**: a partition whose
//! stored offset is already at or before the requested position is left alone (its range is
//! empty), so a replay can never skip records that were not processed.
//!
//! Start with [`Store::replay`]; the consumer program's `replay` command is a thin wrapper around it.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::Message;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::BorrowedMessage;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaErrorCode;

use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::error::{Error, Result};
use crate::event_id::EventId;
use crate::handler::Decode;
use crate::store::{Backend, CRATE, PartitionKey, Store, StoredOffset};

/// How long a metadata, watermark or time lookup may take.
const KAFKA_TIMEOUT: Duration = Duration::from_secs(10);
/// How long reading may go without a single record (or the end of the partition) arriving.
const READ_STALL: Duration = Duration::from_secs(30);
/// Records per ledger lookup (and per progress report) in a dry run.
const CHUNK: usize = 1000;
/// How often [`Store::replay`] re-reads the stored offsets when a consumer committed between the read
/// and the replay's transaction.
const WRITE_ATTEMPTS: u32 = 50;

/// Where a replay starts.
///
/// Parses from text (the consumer program's `--from`) as `earliest`, an offset (a non-negative
/// integer, applied to every selected partition) or an RFC 3339 time such as
/// `2026-11-23T14:00:00Z` or `2026-11-23T15:00:00.250+01:00`.
///
/// ```
/// use consumer_runtime::replay::ReplayFrom;
///
/// assert_eq!("earliest".parse::<ReplayFrom>().unwrap(), ReplayFrom::Earliest);
/// assert_eq!("42".parse::<ReplayFrom>().unwrap(), ReplayFrom::Offset(42));
/// assert_eq!(
///     "1970-01-01T01:00:01.5+01:00".parse::<ReplayFrom>().unwrap(),
///     ReplayFrom::Time(1_500)
/// );
/// assert!("yesterday".parse::<ReplayFrom>().is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReplayFrom {
    /// The earliest record Kafka still holds (each partition's low watermark).
    Earliest,
    /// This offset, in every selected partition. Refused if it is beyond a partition's high
    /// watermark; an offset before the low watermark (records deleted by retention) starts at
    /// the low watermark.
    Offset(i64),
    /// The first record whose timestamp is at or after this time, in milliseconds since the
    /// Unix epoch (UTC). Refused if it is before the topic's earliest record; a time after the
    /// last record resolves to the high watermark (nothing to replay).
    Time(i64),
}

impl FromStr for ReplayFrom {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let text = s.trim();
        let refuse = |why: &str| {
            Error::Config(format!(
                "cannot replay from `{s}`: {why}; use `earliest`, an offset (a non-negative integer) or an RFC 3339 time such as 2026-11-23T14:00:00Z"
            ))
        };
        if text.eq_ignore_ascii_case("earliest") {
            return Ok(ReplayFrom::Earliest);
        }
        if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
            return text
                .parse()
                .map(ReplayFrom::Offset)
                .map_err(|_| refuse("the offset is too large"));
        }
        if text.starts_with('-') && text[1..].bytes().all(|b| b.is_ascii_digit()) {
            return Err(refuse("offsets are never negative"));
        }
        match parse_rfc3339(text) {
            Some(ms) if ms >= 0 => Ok(ReplayFrom::Time(ms)),
            Some(_) => Err(refuse("Kafka has no records before 1970")),
            None => Err(refuse("it is not a valid time, offset or `earliest`")),
        }
    }
}

impl fmt::Display for ReplayFrom {
    /// The form [`ReplayFrom::from_str`] accepts: `earliest`, the offset, or the time in
    /// RFC 3339 (UTC, milliseconds).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReplayFrom::Earliest => f.write_str("earliest"),
            ReplayFrom::Offset(n) => write!(f, "{n}"),
            ReplayFrom::Time(ms) => f.write_str(&format_rfc3339(*ms)),
        }
    }
}

/// What to replay: a group's view of a topic, or of one partition of it, from where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayRequest {
    /// The consumer group whose stored offsets move. It must have stored offsets.
    pub group: String,
    /// The topic. The group must have consumed it, and Kafka must know it.
    pub topic: String,
    /// One partition, or `None` for every partition of the topic.
    pub partition: Option<i32>,
    /// Where the replay starts.
    pub from: ReplayFrom,
    /// What to do with the range: look ([`ReplayMode::DryRun`]), move the offsets
    /// ([`ReplayMode::Apply`]) or also clear the range's ledger ([`ReplayMode::Rebuild`]).
    pub mode: ReplayMode,
    /// Whether [`ReplayMode::Apply`] may move a partition below its ledger floor, where
    /// retention pruned the ledger: the records between the start and the floor **are applied
    /// a second time**. `false` (the safe choice): such a replay is refused with
    /// [`Error::BelowLedgerFloor`], which says how many records that would be. A rebuild
    /// applies its whole range again by design and is not refused.
    pub below_floor: bool,
}

/// What [`Store::replay`] does with the range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReplayMode {
    /// Changes nothing. Reads every record of the range from Kafka and reports exactly how many
    /// there are and how many of them the ledger holds already (and would skip).
    DryRun,
    /// Moves the stored offsets back, bumps the epochs and clears the owners in one
    /// transaction: running consumers are fenced, reload and continue from the new position.
    /// The ledger skips every record already processed, so **nothing is applied twice**
    /// (under the effectively-once guarantee; the other guarantees keep no ledger, and their
    /// consumers apply the range again).
    Apply,
    /// Like [`ReplayMode::Apply`], and the same transaction deletes the ledger rows of the
    /// range, so that **the handler runs again, once, for every event of the range: its
    /// effects ARE applied a second time** (a counter counts twice, a payment is charged
    /// twice). Use it only to rebuild state the handler derives from the events, after
    /// clearing or fixing that state; never when the effects must happen once.
    Rebuild,
}

impl fmt::Display for ReplayMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ReplayMode::DryRun => "dry run",
            ReplayMode::Apply => "apply",
            ReplayMode::Rebuild => "rebuild",
        })
    }
}

/// What a replay did (or, in a dry run, would do) to one partition: its range is
/// `[from, to)`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PartitionReplay {
    /// The partition.
    pub partition: i32,
    /// The stored offset after the replay: where the group resumes.
    pub from: i64,
    /// The stored offset before the replay. A partition that has no stored offset (nothing was
    /// ever committed for it) is left alone and reported with `to == from`, the position the
    /// request resolved to.
    pub to: i64,
    /// The partition's high watermark (the offset its next record will get) when the replay
    /// looked.
    pub high_watermark: i64,
    /// The records in `[from, to)`. A dry run counts the records it read, exactly; `Apply` and
    /// `Rebuild` do not read them and report `to - from`, which is the same unless the topic is
    /// compacted or written by transactional producers.
    pub records: u64,
    /// Dry run only: how many of those records the ledger already holds (by event id, under the
    /// strategy passed to [`Store::replay`]) and would therefore skip. `records - already_processed`
    /// records would run the handler (with a ledger that is complete, none).
    pub already_processed: Option<u64>,
    /// `Rebuild` only: how many ledger rows of the range were deleted (one per event id whose
    /// first record lies in the range). That many events run the handler again.
    pub ledger_rows_cleared: u64,
    /// The partition's ledger floor ([`StoredOffset::ledger_floor`]), if retention has pruned
    /// its ledger.
    pub ledger_floor: Option<i64>,
    /// How many offsets of the range lie below the ledger floor: at most that many records
    /// would be (a forced replay: are) applied a second time, because the ledger no longer
    /// remembers them. A replay that has any is refused unless
    /// [`ReplayRequest::below_floor`] is set.
    pub below_floor: u64,
}

/// How far a dry run has read, reported to [`Store::replay`]'s `progress` callback every
/// 1,000 records and at the end of each partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReplayProgress {
    /// The partition being read.
    pub partition: i32,
    /// Records of the partition's range read so far.
    pub read: u64,
    /// The size of the range in offsets (`to - from`): what `read` reaches at the end, unless
    /// the topic is compacted or transactional.
    pub span: u64,
    /// Of the records read, how many the ledger holds already.
    pub already_processed: u64,
    /// Whether the partition is finished (`read` is then its exact record count).
    pub done: bool,
}

impl<DB: Backend> Store<DB> {
    /// Replays a consumer group's view of a topic (or of one partition) from `request.from`.
    ///
    /// Checks the request, resolves the start in each selected partition, and then, by `mode`:
    /// reports the range without changing anything ([`ReplayMode::DryRun`]), moves the stored
    /// offsets back ([`ReplayMode::Apply`]: nothing is applied twice), or also clears the ledger of
    /// the range ([`ReplayMode::Rebuild`]: **the handler's effects are applied again**, once per
    /// event). The writes are one transaction; running consumers are fenced by the bumped epochs,
    /// reload, and continue from the new positions without a restart. Returns one
    /// [`PartitionReplay`] per selected partition, in partition order.
    ///
    /// - `kafka`: the Kafka client configuration: `bootstrap.servers` and any other librdkafka
    ///   property the consumer uses (security, for instance). The replay makes its own short-lived
    ///   client from it, with a throw-away `group.id`; it never joins or commits for the group.
    /// - `event_id`: the consumer's event-id strategy, used by a dry run to work out which records
    ///   the ledger holds (the other modes ignore it). Pass the same strategy as the consumer's,
    ///   or the counts are meaningless.
    /// - `progress`: called during a dry run every 1,000 records and at the end of each partition,
    ///   so that a long dry run can show progress; never called by the other modes.
    ///
    /// Refused, with an [`Error::Config`] that names the value and the fix: a group without stored
    /// offsets, a group that never consumed the topic, a partition the topic does not have, an
    /// offset beyond a partition's high watermark, a time before the topic's earliest record. A
    /// topic Kafka does not know is an [`Error::UnknownTopic`]. A partition that has no stored
    /// offset (nothing committed yet) has nothing to replay and is left alone, as is a partition
    /// whose stored offset is at or before the requested start: a replay only moves offsets back.
    ///
    /// The Kafka calls are blocking and run on tokio's blocking threads, never on the executor.
    ///
    /// ```no_run
    /// use consumer_runtime::replay::{ReplayMode, ReplayRequest};
    /// use consumer_runtime::rdkafka::ClientConfig;
    /// use consumer_runtime::sqlx::Postgres;
    /// use consumer_runtime::{EventId, Raw, Store};
    ///
    /// # async fn run() -> Result<(), consumer_runtime::Error> {
    /// let pool = consumer_runtime::connect::<Postgres>("postgres://app@db/app", 2).await?;
    /// let store = Store::new(pool, "consumer_runtime")?;
    /// let mut kafka = ClientConfig::new();
    /// kafka.set("bootstrap.servers", "kafka:9092");
    /// let mut request = ReplayRequest {
    ///     group: "balances".into(),
    ///     topic: "payments".into(),
    ///     partition: None,
    ///     from: "2026-11-23T09:00:00Z".parse()?,
    ///     mode: ReplayMode::DryRun,
    ///     below_floor: false,
    /// };
    /// // The consumer's event-id strategy (here the default header).
    /// let event_id = EventId::<Raw>::header("event-id");
    ///
    /// // Look first: this changes nothing.
    /// let plan = store
    ///     .replay(&kafka, &request, &event_id, &mut |p| {
    ///         eprint!("\rpartition {}: {}/{} records read", p.partition, p.read, p.span)
    ///     })
    ///     .await?;
    /// for p in &plan {
    ///     println!(
    ///         "partition {}: [{}, {}) {} records, {} already processed",
    ///         p.partition, p.from, p.to, p.records, p.already_processed.unwrap_or(0)
    ///     );
    /// }
    ///
    /// // Then move the offsets: running consumers reload and re-read; the ledger skips everything
    /// // they had processed, so nothing is applied twice.
    /// request.mode = ReplayMode::Apply;
    /// store.replay(&kafka, &request, &event_id, &mut |_| {}).await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn replay<E: Decode>(
        &self,
        kafka: &ClientConfig,
        request: &ReplayRequest,
        event_id: &EventId<E>,
        progress: &mut (dyn FnMut(ReplayProgress) + Send),
    ) -> Result<Vec<PartitionReplay>> {
        let ReplayRequest { group, topic, .. } = request;
        if group.is_empty() || topic.is_empty() {
            return Err(Error::Config(
                "a replay needs a consumer group and a topic; name both".to_owned(),
            ));
        }
        self.check_schema().await?;

        // 1. The group must have stored offsets.
        let rows = self.stored_offsets(group).await?;
        if rows.is_empty() {
            return Err(Error::Config(format!(
                "no stored offsets for consumer group `{group}` in schema `{}`: it has never committed there; check the group name and the schema",
                self.schema()
            )));
        }

        // 2. Kafka must know the topic, and the group must have consumed it.
        let client = Arc::new(Reader::new(kafka)?);
        let result = with_client(self, &client, event_id, request, &rows, progress).await;
        // Closing a Kafka client blocks until its threads end: not on the executor.
        let _ = tokio::task::spawn_blocking(move || drop(client)).await;
        result
    }
}

/// [`Store::replay`], from the Kafka checks on.
async fn with_client<DB: Backend, E: Decode>(
    store: &Store<DB>,
    client: &Arc<Reader>,
    event_id: &EventId<E>,
    request: &ReplayRequest,
    rows: &[StoredOffset],
    progress: &mut (dyn FnMut(ReplayProgress) + Send),
) -> Result<Vec<PartitionReplay>> {
    let ReplayRequest {
        group,
        topic,
        partition,
        from,
        mode,
        ..
    } = request;
    let mode = *mode;
    let all_partitions = blocking({
        let (client, topic) = (client.clone(), topic.clone());
        move || client.partitions(&topic)
    })
    .await?;
    if !rows.iter().any(|r| &r.topic == topic) {
        let mut topics: Vec<&str> = rows.iter().map(|r| r.topic.as_str()).collect();
        topics.dedup();
        return Err(Error::Config(format!(
            "consumer group `{group}` has never consumed topic `{topic}` (it has stored offsets for {}); check the topic name",
            topics.join(", ")
        )));
    }

    // 3. The partitions, and where the replay starts in each.
    let selected = match partition {
        Some(p) if all_partitions.contains(p) => vec![*p],
        Some(p) => {
            return Err(Error::Config(format!(
                "topic `{topic}` has no partition {p}: it has {} partitions, 0 to {}; pick one of those, or leave the partition out to replay all",
                all_partitions.len(),
                all_partitions.len() - 1
            )));
        }
        None => all_partitions,
    };
    let starts = blocking({
        let (client, topic, from) = (client.clone(), topic.clone(), *from);
        move || client.resolve(&topic, &selected, from)
    })
    .await?;

    match mode {
        ReplayMode::DryRun => {
            let plan = plan(&starts, rows, topic);
            dry_run(store, client, group, topic, event_id, plan, progress).await
        }
        ReplayMode::Apply | ReplayMode::Rebuild => {
            write(store, group, topic, &starts, mode, request.below_floor).await
        }
    }
}

/// Where the replay starts in one partition, and the partition's watermarks.
#[derive(Debug, Clone, Copy)]
struct Start {
    partition: i32,
    high: i64,
    offset: i64,
}

/// The report before anything is read or written: each partition's range from the stored
/// offsets in `rows`.
fn plan(starts: &[Start], rows: &[StoredOffset], topic: &str) -> Vec<PartitionReplay> {
    starts
        .iter()
        .map(|s| {
            let row = rows
                .iter()
                .find(|r| r.topic == topic && r.partition == s.partition);
            let stored = row.and_then(|r| r.next_offset);
            let ledger_floor = row.and_then(|r| r.ledger_floor);
            let (from, to) = match stored {
                // Only ever back: a partition at or before the start has nothing to replay.
                Some(to) => (s.offset.min(to), to),
                None => (s.offset, s.offset),
            };
            PartitionReplay {
                partition: s.partition,
                from,
                to,
                high_watermark: s.high,
                records: (to - from) as u64,
                already_processed: None,
                ledger_rows_cleared: 0,
                ledger_floor,
                below_floor: ledger_floor.map_or(0, |f| (f.min(to) - from).max(0) as u64),
            }
        })
        .collect()
}

/// Moves the offsets (and, for a rebuild, clears the ledger of the ranges) in one transaction.
///
/// The stored offsets are read, then checked unchanged inside the transaction (the fence's own
/// statement, with the epoch and offset just read, which also locks the row), so that `to` is
/// exactly the stored offset the transaction replaced; if a consumer committed in between, the
/// transaction rolls back and the replay reads again.
async fn write<DB: Backend>(
    store: &Store<DB>,
    group: &str,
    topic: &str,
    starts: &[Start],
    mode: ReplayMode,
    below_floor: bool,
) -> Result<Vec<PartitionReplay>> {
    const CONTEXT: &str = "replaying stored offsets";
    let (pool, q) = (store.pool(), store.queries());
    for attempt in 1..=WRITE_ATTEMPTS {
        let rows = DB::offsets(pool, q, group).await?;
        let mut report = plan(starts, &rows, topic);
        if mode == ReplayMode::Apply
            && !below_floor
            && let Some(r) = report.iter().find(|r| r.below_floor > 0)
        {
            let floor = r.ledger_floor.unwrap_or(r.from);
            return Err(Error::BelowLedgerFloor {
                topic: topic.to_owned(),
                partition: r.partition,
                offset: r.from,
                floor,
                records: r.below_floor as i64,
            });
        }
        let mut tx = DB::begin(pool, CRATE).await.map_err(Error::db(CONTEXT))?;
        let mut unchanged = true;
        for r in report.iter_mut().filter(|r| r.from < r.to) {
            let key = PartitionKey {
                group: group.to_owned(),
                topic: topic.to_owned(),
                partition: r.partition,
            };
            let epoch = rows
                .iter()
                .find(|row| row.topic == topic && row.partition == r.partition)
                .map_or(0, |row| row.epoch);
            if !DB::advance(&mut tx, q, &key, epoch, Some(r.to), r.to)
                .await
                .map_err(Error::db(CONTEXT))?
            {
                unchanged = false;
                break;
            }
            match DB::set_offset(
                &mut tx,
                q,
                &key,
                r.from,
                below_floor || mode == ReplayMode::Rebuild,
            )
            .await
            {
                Ok(_) => {}
                // A prune raised the floor since the offsets were read: read them again (and
                // refuse).
                Err(sqlx::Error::RowNotFound) => {
                    unchanged = false;
                    break;
                }
                Err(e) => return Err(Error::db(CONTEXT)(e)),
            }
            if mode == ReplayMode::Rebuild {
                r.ledger_rows_cleared = DB::clear_ledger(&mut tx, q, &key, r.from, r.to)
                    .await
                    .map_err(Error::db(CONTEXT))?;
            }
        }
        if !unchanged {
            debug!(
                group,
                topic,
                attempt,
                "replay: a consumer committed since the offsets were read; reading them again"
            );
            tx.rollback().await.map_err(Error::db(CONTEXT))?;
            tokio::time::sleep(Duration::from_millis(20 * u64::from(attempt.min(10)))).await;
            continue;
        }
        tx.commit().await.map_err(Error::db(CONTEXT))?;
        for r in report.iter().filter(|r| r.from < r.to) {
            info!(
                group,
                topic,
                partition = r.partition,
                from = r.from,
                to = r.to,
                ledger_rows_cleared = r.ledger_rows_cleared,
                %mode,
                "replay: stored offset moved back"
            );
        }
        return Ok(report);
    }
    Err(Error::Config(format!(
        "the stored offsets of consumer group `{group}` for topic `{topic}` changed {WRITE_ATTEMPTS} times while the replay tried to move them; run the replay again, or stop the consumers first"
    )))
}

/// A chunk of a partition's range, read and identified on a blocking thread.
enum Read {
    Chunk {
        partition: i32,
        /// Records in the chunk, identified or not.
        records: u64,
        /// The event ids of the records that have one.
        ids: Vec<String>,
    },
    Done {
        partition: i32,
    },
}

async fn dry_run<DB: Backend, E: Decode>(
    store: &Store<DB>,
    client: &Arc<Reader>,
    group: &str,
    topic: &str,
    event_id: &EventId<E>,
    mut report: Vec<PartitionReplay>,
    progress: &mut (dyn FnMut(ReplayProgress) + Send),
) -> Result<Vec<PartitionReplay>> {
    let (pool, q) = (store.pool(), store.queries());
    for r in &mut report {
        r.records = 0;
        r.already_processed = Some(0);
    }
    let ranges: Vec<(i32, i64, i64)> = report
        .iter()
        .filter(|r| r.from < r.to)
        .map(|r| (r.partition, r.from, r.to))
        .collect();
    let (tx, mut rx) = mpsc::channel(4);
    let reader = tokio::task::spawn_blocking({
        let (client, topic, event_id) = (client.clone(), topic.to_owned(), event_id.clone());
        move || client.read_ranges(&topic, &ranges, &event_id, &tx)
    });
    while let Some(read) = rx.recv().await {
        match read {
            Read::Chunk {
                partition,
                records,
                ids,
            } => {
                let mut unique: Vec<&str> = ids.iter().map(String::as_str).collect();
                unique.sort_unstable();
                unique.dedup();
                let known: HashSet<String> = DB::ledger_known(pool, q, group, &unique)
                    .await
                    .map_err(Error::db("looking up event ids in the ledger"))?
                    .into_iter()
                    .collect();
                let skipped = ids.iter().filter(|id| known.contains(*id)).count() as u64;
                let r = entry(&mut report, partition);
                r.records += records;
                let already = r.already_processed.get_or_insert(0);
                *already += skipped;
                let update = ReplayProgress {
                    partition,
                    read: r.records,
                    span: (r.to - r.from) as u64,
                    already_processed: *already,
                    done: false,
                };
                progress(update);
            }
            Read::Done { partition } => {
                let r = entry(&mut report, partition);
                progress(ReplayProgress {
                    partition,
                    read: r.records,
                    span: (r.to - r.from) as u64,
                    already_processed: r.already_processed.unwrap_or(0),
                    done: true,
                });
            }
        }
    }
    reader
        .await
        .map_err(|e| Error::Internal(format!("the replay's Kafka reader died: {e}")))??;
    Ok(report)
}

fn entry(report: &mut [PartitionReplay], partition: i32) -> &mut PartitionReplay {
    report
        .iter_mut()
        .find(|r| r.partition == partition)
        .expect("the reader reads only planned partitions")
}

/// Runs a blocking Kafka call on tokio's blocking threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Internal(format!("the replay's Kafka client died: {e}")))?
}

/// The replay's own Kafka client: it assigns partitions explicitly, never joins the group and
/// never commits.
struct Reader {
    consumer: BaseConsumer,
    brokers: String,
}

impl Reader {
    fn new(config: &ClientConfig) -> Result<Reader> {
        let brokers = config
            .get("bootstrap.servers")
            .unwrap_or_default()
            .to_owned();
        if brokers.is_empty() {
            return Err(Error::Config(
                "no Kafka brokers given for the replay; set bootstrap.servers (the consumer's --brokers)".to_owned(),
            ));
        }
        let mut config = config.clone();
        // The reader seeks around a partition; a short fetch wait keeps each look cheap (the
        // caller may set another, but not change the settings below).
        if config.get("fetch.wait.max.ms").is_none() {
            config.set("fetch.wait.max.ms", "20");
        }
        config
            .set(
                "group.id",
                format!(
                    "consumer-runtime-replay-{:08x}",
                    crate::util::random_u64() as u32
                ),
            )
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "true")
            // Positions are always explicit; an offset deleted under the reader is an error,
            // not a silent jump that would make the counts wrong.
            .set("auto.offset.reset", "error");
        let consumer = config.create().map_err(|e| {
            Error::Config(format!("the Kafka client configuration was refused: {e}"))
        })?;
        Ok(Reader { consumer, brokers })
    }

    /// The topic's partitions, sorted; [`Error::UnknownTopic`] if Kafka does not know it.
    fn partitions(&self, topic: &str) -> Result<Vec<i32>> {
        crate::kafka::topic_partitions(&self.consumer, topic, &self.brokers, KAFKA_TIMEOUT)
    }

    /// Resolves where the replay starts in each partition.
    fn resolve(&self, topic: &str, partitions: &[i32], from: ReplayFrom) -> Result<Vec<Start>> {
        let mut starts = Vec::with_capacity(partitions.len());
        let mut lows = HashMap::with_capacity(partitions.len());
        for &partition in partitions {
            let (low, high) = self
                .consumer
                .fetch_watermarks(topic, partition, KAFKA_TIMEOUT)
                .map_err(Error::kafka("reading the partitions' watermarks"))?;
            lows.insert(partition, low);
            starts.push(Start {
                partition,
                high,
                offset: low,
            });
        }
        match from {
            ReplayFrom::Earliest => {}
            ReplayFrom::Offset(n) => {
                if n < 0 {
                    return Err(Error::Config(format!(
                        "cannot replay {topic} from offset {n}: offsets are never negative; use `earliest` or an offset of at least 0"
                    )));
                }
                for s in &mut starts {
                    if n > s.high {
                        return Err(Error::Config(format!(
                            "cannot replay {topic}/{} from offset {n}: it is beyond the partition's high watermark {} (the offset of its next record); pick an offset of at most {}, or `earliest`",
                            s.partition, s.high, s.high
                        )));
                    }
                    s.offset = n.max(lows[&s.partition]);
                }
            }
            ReplayFrom::Time(t) => {
                if t < 0 {
                    return Err(Error::Config(format!(
                        "cannot replay from time {t} ms: it is before 1970; give a time since the Unix epoch"
                    )));
                }
                self.check_not_before_earliest(topic, &starts, t)?;
                let by_time = self.offsets_for_time(topic, partitions, t);
                for s in &mut starts {
                    let low = lows[&s.partition];
                    s.offset = match by_time.get(&s.partition) {
                        Some(&answer) => {
                            self.check_time_answer(topic, s.partition, low, s.high, t, answer)?;
                            answer.clamp(low, s.high)
                        }
                        None => self.search_time(topic, s.partition, low, s.high, t)?,
                    };
                }
            }
        }
        Ok(starts)
    }

    /// Refuses a time before the earliest record of the selected partitions (the record at each
    /// low watermark): the range would claim to cover time that Kafka holds nothing for.
    fn check_not_before_earliest(&self, topic: &str, starts: &[Start], t: i64) -> Result<()> {
        let mut earliest: Option<(i64, i32, i64)> = None;
        for s in starts.iter().filter(|s| s.offset < s.high) {
            let Some((offset, Some(ts))) = self.record_at(topic, s.partition, s.offset)? else {
                continue;
            };
            if earliest.is_none_or(|(e, _, _)| ts < e) {
                earliest = Some((ts, s.partition, offset));
            }
        }
        match earliest {
            Some((ts, partition, offset)) if t < ts => Err(Error::Config(format!(
                "cannot replay {topic} from {}: that is before the topic's earliest record ({}, partition {partition} offset {offset}); use `earliest` to replay everything the topic holds",
                format_rfc3339(t),
                format_rfc3339(ts)
            ))),
            _ => Ok(()),
        }
    }

    /// The broker's answer to "the first offset at or after `t`", per partition; a partition is
    /// missing when the broker had no offset for it (no record that late, or a broker that
    /// cannot look up times, such as librdkafka's mock cluster).
    fn offsets_for_time(&self, topic: &str, partitions: &[i32], t: i64) -> HashMap<i32, i64> {
        let mut tpl = TopicPartitionList::with_capacity(partitions.len());
        for &p in partitions {
            if tpl
                .add_partition_offset(topic, p, Offset::Offset(t))
                .is_err()
            {
                return HashMap::new();
            }
        }
        match self.consumer.offsets_for_times(tpl, KAFKA_TIMEOUT) {
            Ok(found) => found
                .elements()
                .iter()
                .filter(|e| e.error().is_ok())
                .filter_map(|e| match e.offset() {
                    Offset::Offset(o) if o >= 0 => Some((e.partition(), o)),
                    _ => None,
                })
                .collect(),
            Err(e) => {
                warn!(error = %e, topic, "looking up offsets by time failed; searching the records instead");
                HashMap::new()
            }
        }
    }

    /// Checks the broker's `answer` to "the first offset of `topic`/`partition` at or after
    /// time `t`" against the records themselves: the first record at or after the answer must
    /// be stamped at or after `t`, and the last record before it earlier than `t`. A
    /// contradiction is [`Error::BrokerAnswerContradicted`], naming the answer. Records
    /// without a timestamp are not held against it.
    fn check_time_answer(
        &self,
        topic: &str,
        partition: i32,
        low: i64,
        high: i64,
        t: i64,
        answer: i64,
    ) -> Result<()> {
        let refuse = |contradiction: String| Error::BrokerAnswerContradicted {
            brokers: self.brokers.clone(),
            topic: topic.to_owned(),
            partition,
            time: format_rfc3339(t),
            answer,
            contradiction,
        };
        if answer > high {
            return Err(refuse(format!("the partition's high watermark is {high}")));
        }
        let at = answer.clamp(low, high);
        if at < high
            && let Some((offset, Some(ts))) = self.record_at(topic, partition, at)?
            && ts < t
        {
            return Err(refuse(format!(
                "the record at offset {offset} is stamped {}, before that time",
                format_rfc3339(ts)
            )));
        }
        if at > low
            && let Some((offset, Some(ts))) = self.record_before(topic, partition, low, at)?
            && ts >= t
        {
            return Err(refuse(format!(
                "the record before it, at offset {offset}, is stamped {}, not before that time",
                format_rfc3339(ts)
            )));
        }
        Ok(())
    }

    /// The last record in `[low, offset)`: its offset and timestamp; `None` if there is none.
    /// Looks back 1, 2, 4, … offsets, so that a gap (compaction, transaction markers) before
    /// `offset` costs a few reads, not a scan from `low`.
    fn record_before(
        &self,
        topic: &str,
        partition: i32,
        low: i64,
        offset: i64,
    ) -> Result<Option<(i64, Option<i64>)>> {
        let mut back = 1i64;
        loop {
            let from = offset.saturating_sub(back).max(low);
            self.assign(topic, partition, from)?;
            let mut last = None;
            while let Some(m) = self.next(topic, partition, from)? {
                if m.offset() >= offset {
                    break;
                }
                last = Some((m.offset(), m.timestamp().to_millis()));
            }
            if last.is_some() || from == low {
                return Ok(last);
            }
            back = back.saturating_mul(2);
        }
    }

    /// The first offset in `[low, high]` from which a consumer reads only records stamped at or
    /// after `t` (`high` if there is none), by binary search over the records' timestamps
    /// (which Kafka keeps non-decreasing within a partition in all but unusual set-ups).
    fn search_time(&self, topic: &str, partition: i32, low: i64, high: i64, t: i64) -> Result<i64> {
        let (mut lo, mut hi) = (low, high);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match self.record_at(topic, partition, mid)? {
                Some((offset, ts)) if ts.unwrap_or(i64::MIN) < t => lo = offset + 1,
                _ => hi = mid,
            }
        }
        Ok(lo)
    }

    /// The first record at or after `offset`: its offset and timestamp; `None` at the end of
    /// the partition.
    fn record_at(
        &self,
        topic: &str,
        partition: i32,
        offset: i64,
    ) -> Result<Option<(i64, Option<i64>)>> {
        self.assign(topic, partition, offset)?;
        Ok(self
            .next(topic, partition, offset)?
            .map(|m| (m.offset(), m.timestamp().to_millis())))
    }

    fn assign(&self, topic: &str, partition: i32, offset: i64) -> Result<()> {
        const CONTEXT: &str = "positioning the replay's reader";
        let mut tpl = TopicPartitionList::with_capacity(1);
        tpl.add_partition_offset(topic, partition, Offset::Offset(offset))
            .map_err(Error::kafka(CONTEXT))?;
        self.consumer.assign(&tpl).map_err(Error::kafka(CONTEXT))
    }

    /// The next record of the assigned partition at or after `min_offset`, or `None` at its end.
    fn next(
        &self,
        topic: &str,
        partition: i32,
        min_offset: i64,
    ) -> Result<Option<BorrowedMessage<'_>>> {
        let deadline = Instant::now() + READ_STALL;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::BrokerUnreachable {
                    brokers: self.brokers.clone(),
                    detail: format!(
                        "no record of {topic}/{partition} at or after offset {min_offset} arrived within {} s",
                        READ_STALL.as_secs()
                    ),
                });
            }
            match self.consumer.poll(left.min(Duration::from_millis(500))) {
                Some(Ok(m))
                    if m.topic() == topic
                        && m.partition() == partition
                        && m.offset() >= min_offset =>
                {
                    return Ok(Some(m));
                }
                Some(Err(KafkaError::PartitionEOF(p))) if p == partition => return Ok(None),
                // Nothing yet, or a record or end of a partition looked at before.
                None | Some(Ok(_)) | Some(Err(KafkaError::PartitionEOF(_))) => {}
                Some(Err(e))
                    if matches!(
                        e.rdkafka_error_code(),
                        Some(
                            RDKafkaErrorCode::BrokerTransportFailure
                                | RDKafkaErrorCode::AllBrokersDown
                        )
                    ) =>
                {
                    warn!(error = %e, "the replay's Kafka connection failed; retrying");
                }
                Some(Err(e)) => {
                    return Err(Error::Kafka {
                        context: "reading the replay range",
                        source: e,
                    });
                }
            }
        }
    }

    /// Reads `[from, to)` of each `(partition, from, to)`, works out each record's event id
    /// with the runtime's rules, and sends the ids in chunks. Stops early if the receiver goes.
    fn read_ranges<E: Decode>(
        &self,
        topic: &str,
        ranges: &[(i32, i64, i64)],
        event_id: &EventId<E>,
        out: &mpsc::Sender<Read>,
    ) -> Result<()> {
        for &(partition, from, to) in ranges {
            self.assign(topic, partition, from)?;
            let mut ids = Vec::with_capacity(CHUNK);
            let mut records = 0u64;
            let mut unidentified = 0u64;
            loop {
                let message = match self.next(topic, partition, from)? {
                    Some(m) if m.offset() < to => m.detach(),
                    _ => break,
                };
                records += 1;
                match crate::unit::identify(event_id, &message) {
                    Ok((_, id)) => ids.push(id),
                    Err((kind, why)) => {
                        if unidentified == 0 {
                            warn!(
                                topic,
                                partition,
                                offset = message.offset(),
                                %kind,
                                error = %why,
                                "a record of the replay range has no event id under this strategy: the consumer would stop at it; it is not counted as processed"
                            );
                        }
                        unidentified += 1;
                    }
                }
                if records.is_multiple_of(CHUNK as u64) {
                    let chunk = Read::Chunk {
                        partition,
                        records: CHUNK as u64,
                        ids: std::mem::replace(&mut ids, Vec::with_capacity(CHUNK)),
                    };
                    if out.blocking_send(chunk).is_err() {
                        return Ok(());
                    }
                }
            }
            let rest = records % CHUNK as u64;
            if rest > 0
                && out
                    .blocking_send(Read::Chunk {
                        partition,
                        records: rest,
                        ids,
                    })
                    .is_err()
            {
                return Ok(());
            }
            if out.blocking_send(Read::Done { partition }).is_err() {
                return Ok(());
            }
        }
        Ok(())
    }
}

// ---- RFC 3339 -------------------------------------------------------------------------------

/// Parses an RFC 3339 time with an offset (`2026-11-23T14:00:00Z`,
/// `2026-11-23T15:00:00.250+01:00`; a lowercase `t`/`z` or a space for `T` too) into
/// milliseconds since the Unix epoch. Digits of the fraction beyond milliseconds are dropped;
/// a leap second (`:60`) reads as the second before it.
fn parse_rfc3339(s: &str) -> Option<i64> {
    // RFC 3339 needs the seconds, which the parser's wider grammar would let go.
    if s.as_bytes().get(16) != Some(&b':') {
        return None;
    }
    let t: jiff::Timestamp = s.parse().ok()?;
    Some(t.as_millisecond())
}

/// Formats milliseconds since the Unix epoch as RFC 3339 in UTC, with milliseconds.
fn format_rfc3339(ms: i64) -> String {
    match jiff::Timestamp::from_millisecond(ms) {
        Ok(t) => format!("{t:.3}"),
        Err(_) => format!("{ms} ms since the Unix epoch"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The check of a broker's answer to a lookup by time, against a real topic (librdkafka's
    /// mock cluster, which stores and serves the records' timestamps but cannot look times
    /// up itself): right answers pass, wrong ones are refused naming the answer.
    #[test]
    fn a_time_answer_that_the_records_contradict_is_refused_naming_it() {
        use rdkafka::mocking::MockCluster;
        use rdkafka::producer::{BaseProducer, BaseRecord, Producer as _};

        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic("times", 1, 1).unwrap();
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", cluster.bootstrap_servers());
        let producer: BaseProducer = config.create().unwrap();
        // Ten records one second apart: offset i is stamped t0 + i s.
        let t0 = 1_700_000_000_000i64;
        for i in 0..10i64 {
            producer
                .send(
                    BaseRecord::<(), str>::to("times")
                        .partition(0)
                        .payload("{}")
                        .timestamp(t0 + i * 1_000),
                )
                .map_err(|(e, _)| e)
                .unwrap();
        }
        producer.flush(Duration::from_secs(30)).unwrap();
        let reader = Reader::new(&config).unwrap();
        let check = |t: i64, answer: i64| reader.check_time_answer("times", 0, 0, 10, t, answer);

        for (t, answer) in [
            (t0 + 4_500, 5),
            (t0 + 5_000, 5),
            (t0 - 1, 0),
            (t0, 0),
            (t0 + 9_000, 9),
            (t0 + 60_000, 10),
        ] {
            check(t, answer).unwrap_or_else(|e| {
                panic!(
                    "the right answer {answer} for t0 + {} ms was refused: {e}",
                    t - t0
                )
            });
        }
        for (t, answer, says) in [
            // What tansu 0.6.0's memory engine answers for any time.
            (t0 + 4_500, 0, "the record at offset 0 is stamped"),
            (t0 + 4_500, 4, "the record at offset 4 is stamped"),
            (
                t0 + 4_500,
                7,
                "the record before it, at offset 6, is stamped",
            ),
            (
                t0 + 4_500,
                10,
                "the record before it, at offset 9, is stamped",
            ),
            (t0 + 4_500, 11, "the partition's high watermark is 10"),
        ] {
            let err = check(t, answer).expect_err("a wrong answer must be refused");
            assert!(
                matches!(err, Error::BrokerAnswerContradicted { answer: a, partition: 0, .. } if a == answer),
                "{err:?}"
            );
            let text = err.to_string();
            assert!(
                text.contains(&format!(
                    "times/0 at or after {} is at offset {answer}",
                    format_rfc3339(t)
                )) && text.contains(says),
                "{text}"
            );
        }
    }

    #[test]
    fn rfc3339_times_parse_to_utc_milliseconds() {
        for (text, ms) in [
            ("1970-01-01T00:00:00Z", 0),
            ("1970-01-01T00:00:00.001Z", 1),
            ("1970-01-01t00:00:01.5z", 1_500),
            ("1970-01-01 00:00:01.123456789Z", 1_123),
            ("1970-01-01T01:00:00+01:00", 0),
            ("1969-12-31T19:00:00-05:00", 0),
            ("2000-02-29T12:00:00Z", 951_825_600_000),
            ("2026-11-23T14:00:00Z", 1_795_442_400_000),
            ("2026-11-23T15:30:00.250+01:30", 1_795_442_400_250),
            ("2016-12-31T23:59:60Z", 1_483_228_799_000),
            ("1960-06-15T00:00:00Z", -301_276_800_000),
        ] {
            assert_eq!(parse_rfc3339(text), Some(ms), "{text}");
        }
    }

    #[test]
    fn malformed_times_are_refused() {
        for text in [
            "",
            "2026-11-23",
            "2026-11-23T14:00:00",
            "2026-11-23T14:00Z",
            "2026-13-01T00:00:00Z",
            "2026-02-29T00:00:00Z",
            "2026-04-31T00:00:00Z",
            "2026-11-23T24:00:00Z",
            "2026-11-23T14:60:00Z",
            "2026-11-23T14:00:61Z",
            "2026-11-23T14:00:00.Z",
            "2026-11-23T14:00:00+1:00",
            "2026-11-23T14:00:00+26:00",
            "2026-11-23T14:00:00Zjunk",
            "2026/11/23T14:00:00Z",
            "+026-11-23T14:00:00Z",
        ] {
            assert_eq!(parse_rfc3339(text), None, "{text}");
        }
    }

    #[test]
    fn formatting_round_trips_through_parsing() {
        for ms in [
            0,
            1,
            999,
            951_825_600_000,
            1_795_442_400_250,
            -301_968_000_001,
            4_102_444_799_999,
        ] {
            let text = format_rfc3339(ms);
            assert_eq!(parse_rfc3339(&text), Some(ms), "{ms} -> {text}");
        }
        assert_eq!(
            format_rfc3339(1_795_442_400_250),
            "2026-11-23T14:00:00.250Z"
        );
    }

    #[test]
    fn replay_from_parses_earliest_offsets_and_times() {
        assert_eq!(
            "earliest".parse::<ReplayFrom>().unwrap(),
            ReplayFrom::Earliest
        );
        assert_eq!(" 0 ".parse::<ReplayFrom>().unwrap(), ReplayFrom::Offset(0));
        assert_eq!(
            "2026-11-23T14:00:00Z".parse::<ReplayFrom>().unwrap(),
            ReplayFrom::Time(1_795_442_400_000)
        );
        for from in [
            ReplayFrom::Earliest,
            ReplayFrom::Offset(17),
            ReplayFrom::Time(1_795_442_400_250),
        ] {
            assert_eq!(from.to_string().parse::<ReplayFrom>().unwrap(), from);
        }
    }

    #[test]
    fn malformed_starts_are_refused_naming_the_value_and_the_fix() {
        for text in [
            "yesterday",
            "-5",
            "12abc",
            "99999999999999999999",
            "1969-12-31T23:59:59Z",
            "",
        ] {
            let err = text.parse::<ReplayFrom>().unwrap_err();
            let msg = err.to_string();
            assert!(matches!(err, Error::Config(_)), "{msg}");
            assert!(msg.contains(&format!("`{text}`")), "{msg}");
            assert!(
                msg.contains("earliest") && msg.contains("RFC 3339"),
                "{msg}"
            );
        }
    }
}
