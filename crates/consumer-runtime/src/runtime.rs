//! The runtime: a builder, the polling thread with its rebalance callbacks, and one worker task
//! per assigned partition.
//!
//! Threads and tasks:
//! - the *poll thread* owns the rdkafka `BaseConsumer`. It polls, routes each record to its
//!   partition's worker, and runs the rebalance callbacks, which claim partitions in the
//!   database (bumping their epochs) and assign them at the stored offsets. Database calls made
//!   there block only this thread, never the async runtime.
//! - one *worker task* per assigned partition batches that partition's records and commits them
//!   through the unit of work ([`crate::unit`]), at most as many at once as the pool allows.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc as std_mpsc};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::Message;
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::OwnedMessage;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaRespErr;
use sqlx::Pool;
use tokio::sync::{Semaphore, mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tracing::{Instrument, debug, error, info, warn};

use crate::config::{Assignor, BreakerState, CircuitBreaker, Guarantee, OffsetReset, RetryPolicy};
use crate::error::{Error, Result};
use crate::event_id::EventId;
use crate::handler::Handler;
use crate::store::{Backend, Claim, PartitionKey, check_schema};
use crate::telemetry::{self, KafkaStats, PartitionMetrics};
use crate::unit::{BatchError, BatchOutcome, PartitionWriter, WriterConfig};

/// Counters of what the runtime has done since it started.
#[derive(Debug, Default)]
pub struct Stats {
    /// Records whose handler ran and committed.
    pub applied: AtomicU64,
    /// Records skipped because their event id was already claimed.
    pub duplicates: AtomicU64,
    /// Records lost after their offset committed (at-most-once only).
    pub lost: AtomicU64,
    /// Records that failed permanently and were parked in `dead_letters` (their batch
    /// committed without them).
    pub parked: AtomicU64,
    /// Batches committed.
    pub batches: AtomicU64,
    /// Batch attempts rolled back and retried.
    pub retries: AtomicU64,
    /// Commits refused by the fence.
    pub fenced: AtomicU64,
    /// Times a partition was reloaded after its epoch changed behind the worker: a fenced
    /// commit, or the epoch watcher noticing a replay, an offset set or another owner first.
    pub reloads: AtomicU64,
    /// Partition assignments (each one claims the partition and bumps its epoch).
    pub assignments: AtomicU64,
}

fn bump(counter: &AtomicU64, n: usize) {
    counter.fetch_add(n as u64, Ordering::Relaxed);
}

/// Asks a running [`Runtime`] to stop gracefully: stop fetching, finish in-flight batches,
/// leave the group.
#[derive(Debug, Clone)]
pub struct ShutdownHandle(Arc<watch::Sender<bool>>);

impl ShutdownHandle {
    /// Requests the shutdown; [`Runtime::run`] returns once it is complete.
    pub fn shutdown(&self) {
        self.0.send_replace(true);
    }
}

/// Builds a [`Runtime`]. Start with [`Runtime::builder`].
pub struct RuntimeBuilder<H: Handler<DB>, DB: Backend> {
    handler: H,
    pool: Option<Pool<DB>>,
    brokers: Option<String>,
    group: Option<String>,
    topics: Vec<String>,
    batch_size: usize,
    batch_wait: Duration,
    concurrency: Option<usize>,
    guarantee: Guarantee,
    event_id: EventId<H::Event>,
    reset: OffsetReset,
    schema: String,
    assignor: Assignor,
    retry: RetryPolicy,
    breaker: CircuitBreaker,
    kafka: Vec<(String, String)>,
    handle_signals: bool,
    startup_timeout: Duration,
    epoch_check: Duration,
    metrics_refresh: Option<Duration>,
}

impl<H: Handler<DB>, DB: Backend> RuntimeBuilder<H, DB> {
    /// The database pool holding the runtime's tables and the handler's.
    pub fn pool(mut self, pool: Pool<DB>) -> Self {
        self.pool = Some(pool);
        self
    }
    /// Kafka's bootstrap servers, `host:port[,host:port…]`.
    pub fn brokers(mut self, brokers: impl Into<String>) -> Self {
        self.brokers = Some(brokers.into());
        self
    }
    /// The consumer group. Dedup is scoped per group.
    pub fn group(mut self, group: impl Into<String>) -> Self {
        self.group = Some(group.into());
        self
    }
    /// Adds a topic to consume.
    pub fn topic(mut self, topic: impl Into<String>) -> Self {
        self.topics.push(topic.into());
        self
    }
    /// Adds topics to consume.
    pub fn topics<I: IntoIterator<Item = S>, S: Into<String>>(mut self, topics: I) -> Self {
        self.topics.extend(topics.into_iter().map(Into::into));
        self
    }
    /// The most records in one batch (one transaction) of a partition. Default 500; 1 gives
    /// one transaction per record.
    pub fn batch_size(mut self, n: usize) -> Self {
        self.batch_size = n;
        self
    }
    /// How long a partition's batch may wait to fill after its first record. Default 20 ms.
    pub fn batch_wait(mut self, wait: Duration) -> Self {
        self.batch_wait = wait;
        self
    }
    /// The most transactions open at once. Default and maximum: the pool's size (SQLite: 1).
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = Some(n);
        self
    }
    /// The delivery guarantee. Default: effectively-once.
    pub fn guarantee(mut self, guarantee: Guarantee) -> Self {
        self.guarantee = guarantee;
        self
    }
    /// Where event ids come from. Default: the `event-id` header.
    pub fn event_id(mut self, strategy: EventId<H::Event>) -> Self {
        self.event_id = strategy;
        self
    }
    /// Where a partition starts when the database has no offset for it. Default: earliest.
    pub fn offset_reset(mut self, reset: OffsetReset) -> Self {
        self.reset = reset;
        self
    }
    /// The schema (PostgreSQL) or table prefix (SQLite) of the runtime's tables. Default
    /// `consumer_runtime`.
    pub fn schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = schema.into();
        self
    }
    /// The partition assignment strategy. Default: cooperative-sticky.
    pub fn assignor(mut self, assignor: Assignor) -> Self {
        self.assignor = assignor;
        self
    }
    /// How transient failures are retried.
    pub fn retry_policy(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }
    /// When parking becomes the norm, stop. Default: 100 parked records in a row, or more
    /// than half of the last 1,000 ([`CircuitBreaker::default`]).
    pub fn circuit_breaker(mut self, breaker: CircuitBreaker) -> Self {
        self.breaker = breaker;
        self
    }
    /// Sets a librdkafka consumer property (as `kcat -X key=value`); it wins over the
    /// runtime's own settings, except that offsets are never auto-committed.
    pub fn kafka_config(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.kafka.push((key.into(), value.into()));
        self
    }
    /// Whether [`Runtime::run`] stops gracefully on SIGINT and SIGTERM. Default: true.
    pub fn handle_signals(mut self, yes: bool) -> Self {
        self.handle_signals = yes;
        self
    }
    /// How long to wait for the brokers at startup before giving up. Default 10 s.
    pub fn startup_timeout(mut self, timeout: Duration) -> Self {
        self.startup_timeout = timeout;
        self
    }

    /// How often idle partitions check the database for an epoch bumped behind their back (a
    /// replay or an explicit offset change). Default 1 s.
    pub fn epoch_check_interval(mut self, every: Duration) -> Self {
        self.epoch_check = every;
        self
    }

    /// Keeps the gauges that cost something current, every `every`: each assigned partition's
    /// lag (from librdkafka's statistics, `statistics.interval.ms`, unless a
    /// [`kafka_config`](Self::kafka_config) sets it) and the ledger size (a `count(*)` of the
    /// group's ledger rows, never more often than 100 times the last count took). Default:
    /// off. Counters and histograms are always recorded (see [`crate::telemetry`]); without a
    /// `metrics` recorder installed they cost next to nothing.
    pub fn metrics_refresh(mut self, every: Duration) -> Self {
        self.metrics_refresh = Some(every);
        self
    }

    /// Checks the configuration and builds the runtime.
    pub fn build(self) -> Result<Runtime<H, DB>> {
        let missing = |what: &str, how: &str| Error::Config(format!("no {what} given; {how}"));
        let pool = self
            .pool
            .ok_or_else(|| missing("database pool", "call .pool(…)"))?;
        let brokers = self
            .brokers
            .ok_or_else(|| missing("Kafka brokers", "call .brokers(\"host:9092\")"))?;
        let group = self
            .group
            .ok_or_else(|| missing("consumer group", "call .group(\"name\")"))?;
        if self.topics.is_empty() {
            return Err(missing("topic", "call .topic(\"name\")"));
        }
        if self.batch_size == 0 {
            return Err(Error::Config("batch size must be at least 1".into()));
        }
        if self.kafka.iter().any(|(k, v)| {
            (k == "enable.auto.commit" || k == "enable.auto.offset.store") && v != "false"
        }) {
            return Err(Error::Config(
                "enable.auto.commit and enable.auto.offset.store must stay false: offsets live in the database".into(),
            ));
        }
        let queries = DB::queries(&self.schema)?;
        let writers = DB::max_writers(&pool);
        let concurrency = self.concurrency.unwrap_or(writers).clamp(1, writers.max(1));
        let (shutdown_tx, _) = watch::channel(false);
        Ok(Runtime {
            writer: Arc::new(WriterConfig {
                handler: Arc::new(self.handler),
                pool,
                queries,
                guarantee: self.guarantee,
                event_id: self.event_id,
            }),
            brokers,
            group,
            topics: self.topics,
            batch_size: self.batch_size,
            batch_wait: self.batch_wait,
            concurrency,
            reset: self.reset,
            assignor: self.assignor,
            retry: self.retry,
            breaker: self.breaker,
            kafka: self.kafka,
            handle_signals: self.handle_signals,
            startup_timeout: self.startup_timeout,
            epoch_check: self.epoch_check,
            metrics_refresh: self.metrics_refresh,
            shutdown: Arc::new(shutdown_tx),
            stats: Arc::new(Stats::default()),
        })
    }
}

/// An effectively-once Kafka consumer: build it with [`Runtime::builder`], then
/// [`Runtime::run`] it.
pub struct Runtime<H: Handler<DB>, DB: Backend> {
    writer: Arc<WriterConfig<H, DB>>,
    brokers: String,
    group: String,
    topics: Vec<String>,
    batch_size: usize,
    batch_wait: Duration,
    concurrency: usize,
    reset: OffsetReset,
    assignor: Assignor,
    retry: RetryPolicy,
    breaker: CircuitBreaker,
    kafka: Vec<(String, String)>,
    handle_signals: bool,
    startup_timeout: Duration,
    epoch_check: Duration,
    metrics_refresh: Option<Duration>,
    shutdown: Arc<watch::Sender<bool>>,
    stats: Arc<Stats>,
}

impl<H: Handler<DB>, DB: Backend> Runtime<H, DB> {
    /// Starts building a runtime around `handler`.
    pub fn builder(handler: H) -> RuntimeBuilder<H, DB> {
        RuntimeBuilder {
            handler,
            pool: None,
            brokers: None,
            group: None,
            topics: Vec::new(),
            batch_size: 500,
            batch_wait: Duration::from_millis(20),
            concurrency: None,
            guarantee: Guarantee::default(),
            event_id: EventId::default(),
            reset: OffsetReset::default(),
            schema: "consumer_runtime".to_owned(),
            assignor: Assignor::default(),
            retry: RetryPolicy::default(),
            breaker: CircuitBreaker::default(),
            kafka: Vec::new(),
            handle_signals: true,
            startup_timeout: Duration::from_secs(10),
            epoch_check: Duration::from_secs(1),
            metrics_refresh: None,
        }
    }

    /// A handle that stops the runtime gracefully.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle(self.shutdown.clone())
    }

    /// The runtime's counters.
    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    fn client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers)
            .set("group.id", &self.group)
            .set("partition.assignment.strategy", self.assignor.as_kafka())
            .set("enable.partition.eof", "false")
            .set(
                "auto.offset.reset",
                match self.reset {
                    OffsetReset::Earliest => "earliest",
                    OffsetReset::Latest => "latest",
                },
            );
        if let Some(every) = self.metrics_refresh {
            // The lag gauges read the high watermarks from librdkafka's statistics.
            c.set(
                "statistics.interval.ms",
                every.as_millis().clamp(1, i32::MAX as u128).to_string(),
            );
        }
        for (k, v) in &self.kafka {
            c.set(k, v);
        }
        c.set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false");
        c
    }

    /// Consumes until a shutdown is requested (a [`ShutdownHandle`], or SIGINT/SIGTERM unless
    /// disabled). A record that fails permanently is parked in `dead_letters` and the consumer
    /// goes on; it stops with [`Error::RecordFailed`] only if such a record cannot be parked.
    ///
    /// Dropping the returned future without a shutdown stops everything at once, without
    /// finishing in-flight batches (they roll back), as a crash would.
    pub async fn run(self) -> Result<()> {
        let pool = &self.writer.pool;
        check_schema(pool, &self.writer.queries).await?;
        let strategy = self.writer.event_id.describe();
        if matches!(self.writer.event_id, EventId::Coordinates) {
            warn!(
                "event ids are the records' coordinates (topic/partition/offset): replays and restarts are safe, but producer-side duplicates (retries, double publishes) land at new offsets and WILL be applied again; use a header or a business key to catch them"
            );
        }
        info!(
            group = %self.group,
            topics = ?self.topics,
            database = <DB as sqlx::Database>::NAME,
            guarantee = %self.writer.guarantee,
            event_id = %strategy,
            batch_size = self.batch_size,
            concurrency = self.concurrency,
            "starting consumer"
        );

        telemetry::describe();
        let (control_tx, control_rx) = std_mpsc::channel();
        let core = Arc::new(Core {
            writer: self.writer.clone(),
            group: self.group.clone(),
            owner: instance_id(),
            reset: self.reset,
            batch_size: self.batch_size,
            batch_wait: self.batch_wait,
            retry: self.retry.clone(),
            breaker: (self.breaker.clone(), Mutex::new(BreakerState::default())),
            permits: Arc::new(Semaphore::new(self.concurrency)),
            handle: tokio::runtime::Handle::current(),
            control: control_tx,
            slots: Mutex::new(HashMap::new()),
            generation: AtomicU64::new(0),
            shutdown: self.shutdown.clone(),
            stats: self.stats.clone(),
            stale_retry: Duration::from_millis(
                self.kafka
                    .iter()
                    .find(|(k, _)| k == "session.timeout.ms")
                    .and_then(|(_, v)| v.parse().ok())
                    .unwrap_or(45_000u64)
                    + 5_000,
            ),
        });
        let context = RuntimeContext { core: core.clone() };
        let core_for_watch = core.clone();
        let consumer: BaseConsumer<RuntimeContext<H, DB>> = self
            .client_config()
            .create_with_context(context)
            .map_err(|e| {
                Error::Config(format!("the Kafka client configuration was refused: {e}"))
            })?;

        let abort = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = oneshot::channel();
        let (done_tx, done_rx) = oneshot::channel();
        let poll = PollThread {
            core,
            consumer,
            control: control_rx,
            abort: abort.clone(),
            brokers: self.brokers.clone(),
            topics: self.topics.clone(),
            startup_timeout: self.startup_timeout,
            failure: None,
        };
        std::thread::Builder::new()
            .name("consumer-poll".into())
            .spawn(move || {
                let result = poll.run(ready_tx);
                let _ = done_tx.send(result);
            })
            .map_err(|e| Error::Internal(format!("cannot start the poll thread: {e}")))?;
        let guard = AbortOnDrop(Some(abort));
        let _ledger = self.metrics_refresh.map(|every| {
            AbortTaskOnDrop(tokio::spawn(count_ledger(core_for_watch.clone(), every)))
        });
        let watcher = tokio::spawn(watch_epochs(core_for_watch, self.epoch_check));
        let _watcher = AbortTaskOnDrop(watcher);

        match ready_rx.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                guard.disarm();
                return Err(e);
            }
            Err(_) => {}
        }
        let mut done_rx = done_rx;
        let signal = wait_for_signal(self.handle_signals);
        tokio::pin!(signal);
        let mut signalled = false;
        let result = loop {
            tokio::select! {
                r = &mut done_rx => break r,
                () = &mut signal, if !signalled => {
                    info!("shutdown signal received; finishing in-flight batches");
                    signalled = true;
                    self.shutdown.send_replace(true);
                }
            }
        };
        guard.disarm();
        result.unwrap_or_else(|_| Err(Error::Internal("the poll thread died".into())))
    }
}

async fn wait_for_signal(enabled: bool) {
    if !enabled {
        return std::future::pending().await;
    }
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return std::future::pending().await,
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Notices epochs changed behind a worker's back (a replay, or an offset set by an operator)
/// even while its partition is idle, and has the poll thread reload those partitions. A busy
/// partition learns the same from its next fenced commit.
async fn watch_epochs<H: Handler<DB>, DB: Backend>(core: Arc<Core<H, DB>>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Ok(rows) = DB::offsets(&core.writer.pool, &core.writer.queries, &core.group).await
        else {
            continue;
        };
        let stale: Vec<Control> = {
            let slots = core.slots.lock().expect("slots lock");
            rows.into_iter()
                .filter_map(|row| match slots.get(&(row.topic.clone(), row.partition)) {
                    Some(Slot::Active(a)) if row.epoch > a.epoch => Some(Control::Fenced {
                        key: core.key(&row.topic, row.partition),
                        generation: a.generation,
                    }),
                    _ => None,
                })
                .collect()
        };
        for c in stale {
            let _ = core.control.send(c);
        }
    }
}

/// Keeps the ledger size gauge current: a count every `every`, but never more often than 100
/// times the last count took (at most 1% of one connection, however large the ledger).
async fn count_ledger<H: Handler<DB>, DB: Backend>(core: Arc<Core<H, DB>>, every: Duration) {
    loop {
        let started = Instant::now();
        match DB::ledger_size(&core.writer.pool, &core.writer.queries, &core.group).await {
            Ok(rows) => telemetry::ledger_rows(&core.group, rows),
            Err(e) => debug!(error = %e, "counting the ledger rows failed"),
        }
        let took = started.elapsed();
        tokio::time::sleep(every.max(took.saturating_mul(100))).await;
    }
}

struct AbortTaskOnDrop(JoinHandle<()>);

impl Drop for AbortTaskOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Sets the abort flag if the `run` future is dropped before the poll thread finished.
struct AbortOnDrop(Option<Arc<AtomicBool>>);

impl AbortOnDrop {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(flag) = &self.0 {
            flag.store(true, Ordering::SeqCst);
        }
    }
}

fn instance_id() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "host".into());
    format!(
        "{host}:{}:{:08x}",
        std::process::id(),
        crate::util::random_u64() as u32
    )
}

enum Control {
    Fenced {
        key: PartitionKey,
        generation: u64,
    },
    Failed {
        key: PartitionKey,
        generation: u64,
        error: Error,
    },
}

struct Active {
    generation: u64,
    epoch: i64,
    sender: mpsc::Sender<OwnedMessage>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
    pending: VecDeque<OwnedMessage>,
    paused: bool,
    /// The free room in `sender` a paused partition waits for before it resumes: half of
    /// `(batch_size − 1) × CHANNEL_BATCHES`, at least 1 (a batch size of 1 resumes as soon as
    /// there is room: its worker drains one record per transaction and would otherwise run
    /// dry while the refetch is under way).
    resume_room: usize,
    metrics: Arc<PartitionMetrics>,
}

enum Slot {
    Active(Active),
    /// No worker: the partition is paused until `retry_at`, then claimed again —
    /// unconditionally if `takeover` (another owner was recorded, but Kafka still gives us the
    /// partition after a whole session timeout), else only if nobody owns it.
    Stale {
        retry_at: Instant,
        takeover: bool,
    },
}

/// State shared by the poll thread, the rebalance callbacks and the workers.
struct Core<H: Handler<DB>, DB: Backend> {
    writer: Arc<WriterConfig<H, DB>>,
    group: String,
    owner: String,
    reset: OffsetReset,
    batch_size: usize,
    batch_wait: Duration,
    retry: RetryPolicy,
    breaker: (CircuitBreaker, Mutex<BreakerState>),
    permits: Arc<Semaphore>,
    handle: tokio::runtime::Handle,
    control: std_mpsc::Sender<Control>,
    slots: Mutex<HashMap<(String, i32), Slot>>,
    generation: AtomicU64,
    shutdown: Arc<watch::Sender<bool>>,
    stats: Arc<Stats>,
    stale_retry: Duration,
}

impl<H: Handler<DB>, DB: Backend> Core<H, DB> {
    fn key(&self, topic: &str, partition: i32) -> PartitionKey {
        PartitionKey {
            group: self.group.clone(),
            topic: topic.to_owned(),
            partition,
        }
    }

    fn shutting_down(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// Runs a future on the async runtime and waits for it on this (non-async) thread. `None`
    /// when the async runtime is shutting down (the application dropped it under the consumer)
    /// and cancelled the future.
    fn block_on<F>(&self, f: F) -> Option<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let task = self.handle.spawn(f);
        match self.handle.block_on(task) {
            Ok(output) => Some(output),
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => None,
        }
    }

    fn start_offset(&self, claim: &Claim) -> Offset {
        match claim.next_offset {
            Some(n) => Offset::Offset(n),
            None => match self.reset {
                OffsetReset::Earliest => Offset::Beginning,
                OffsetReset::Latest => Offset::End,
            },
        }
    }

    /// Claims partitions, retrying database failures until they succeed or a shutdown starts.
    fn claim_all(&self, parts: &[(String, i32)], conditional: bool) -> Option<Vec<Option<Claim>>> {
        let mut attempt = 0;
        loop {
            let pool = self.writer.pool.clone();
            let queries = self.writer.queries.clone();
            let keys: Vec<_> = parts.iter().map(|(t, p)| self.key(t, *p)).collect();
            let owner = self.owner.clone();
            let result = self.block_on(async move {
                let mut out = Vec::with_capacity(keys.len());
                for key in &keys {
                    out.push(if conditional {
                        DB::reclaim(&pool, &queries, key, &owner).await?
                    } else {
                        Some(DB::claim(&pool, &queries, key, &owner).await?)
                    });
                }
                Ok::<_, sqlx::Error>(out)
            })?;
            match result {
                Ok(claims) => return Some(claims),
                Err(e) => {
                    attempt += 1;
                    let delay = self.retry.delay(attempt);
                    warn!(error = %e, attempt, ?delay, "cannot claim partitions in the database; waiting for it");
                    if self.shutting_down() {
                        return None;
                    }
                    std::thread::sleep(delay);
                }
            }
        }
    }

    /// Starts a worker for a claimed partition.
    fn activate(self: &Arc<Self>, topic: &str, partition: i32, claim: Claim) -> Active {
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        let key = self.key(topic, partition);
        let depth = self.batch_size.saturating_mul(CHANNEL_BATCHES);
        let (sender, receiver) = mpsc::channel(depth.max(64));
        let (stop, stop_rx) = watch::channel(false);
        bump(&self.stats.assignments, 1);
        info!(
            topic,
            partition,
            epoch = claim.epoch,
            next_offset = ?claim.next_offset,
            "partition claimed"
        );
        let metrics = Arc::new(PartitionMetrics::new(
            &self.group,
            topic,
            partition,
            claim.next_offset,
            self.reset == OffsetReset::Latest,
        ));
        let writer = PartitionWriter::new(self.writer.clone(), key, claim).park_failures(true);
        let core = self.clone();
        let worker_metrics = metrics.clone();
        let task = self.handle.spawn(async move {
            let key = writer.key().clone();
            let exit = core.work(writer, receiver, stop_rx, &worker_metrics).await;
            let control = match exit {
                Exit::Stopped => return,
                Exit::Fenced => Control::Fenced { key, generation },
                Exit::Failed(error) => Control::Failed {
                    key,
                    generation,
                    error,
                },
            };
            let _ = core.control.send(control);
        });
        Active {
            generation,
            epoch: claim.epoch,
            sender,
            stop,
            task,
            pending: VecDeque::new(),
            paused: false,
            resume_room: (self.batch_size.saturating_sub(1) * CHANNEL_BATCHES / 2).max(1),
            metrics,
        }
    }

    /// A partition's worker: batches its records and commits them, retrying transient failures.
    async fn work(
        &self,
        mut writer: PartitionWriter<H, DB>,
        mut rx: mpsc::Receiver<OwnedMessage>,
        mut stop: watch::Receiver<bool>,
        metrics: &PartitionMetrics,
    ) -> Exit {
        let mut batch = Vec::with_capacity(self.batch_size);
        loop {
            tokio::select! {
                biased;
                _ = stop.wait_for(|s| *s) => return Exit::Stopped,
                m = rx.recv() => match m {
                    Some(m) => batch.push(m),
                    None => return Exit::Stopped,
                },
            }
            let deadline = tokio::time::Instant::now() + self.batch_wait;
            while batch.len() < self.batch_size {
                match rx.try_recv() {
                    Ok(m) => {
                        batch.push(m);
                        continue;
                    }
                    Err(mpsc::error::TryRecvError::Disconnected) => break,
                    Err(mpsc::error::TryRecvError::Empty) => {}
                }
                tokio::select! {
                    biased;
                    _ = stop.wait_for(|s| *s) => return Exit::Stopped,
                    _ = tokio::time::sleep_until(deadline) => break,
                    m = rx.recv() => match m {
                        Some(m) => batch.push(m),
                        None => break,
                    },
                }
            }
            if let Some(exit) = self.commit(&mut writer, &batch, &mut stop, metrics).await {
                return exit;
            }
            batch.clear();
        }
    }

    /// Feeds a committed batch's outcomes, in offset order, to the circuit breaker; an error
    /// when it trips.
    fn check_breaker(
        &self,
        writer: &PartitionWriter<H, DB>,
        batch: &[OwnedMessage],
    ) -> Option<Error> {
        let (limits, state) = &self.breaker;
        if limits.max_consecutive.is_none() && limits.ratio.is_none() {
            return None;
        }
        let parked = writer.parked();
        let mut state = state.lock().unwrap_or_else(|e| e.into_inner());
        let mut tripped = None;
        for m in batch {
            let p = parked.iter().find(|p| p.at.offset == m.offset());
            // The first trip says why; the rest of the batch is committed all the same.
            if let Some(why) = state.record(limits, p.is_some())
                && tripped.is_none()
            {
                tripped = Some((why, p.or(parked.last())));
            }
        }
        let (why, Some(last)) = tripped? else {
            return None;
        };
        error!(why = %why, last = %last.at, "circuit breaker open: stopping the consumer");
        Some(Error::CircuitOpen {
            why,
            at: last.at.clone(),
            reason: last.error.clone(),
        })
    }

    /// Commits one batch, retrying transient failures with backoff. `Some` ends the worker.
    async fn commit(
        &self,
        writer: &mut PartitionWriter<H, DB>,
        batch: &[OwnedMessage],
        stop: &mut watch::Receiver<bool>,
        metrics: &PartitionMetrics,
    ) -> Option<Exit> {
        let key = writer.key().clone();
        let span = tracing::debug_span!(
            "batch",
            topic = %key.topic,
            partition = key.partition,
            first_offset = batch.first().map(|m| m.offset()),
            last_offset = batch.last().map(|m| m.offset()),
            size = batch.len(),
        );
        let mut attempt = 0u32;
        let started = Instant::now();
        loop {
            let permit = tokio::select! {
                biased;
                _ = stop.wait_for(|s| *s) => return Some(Exit::Stopped),
                p = self.permits.clone().acquire_owned() => p.expect("the semaphore is never closed"),
            };
            // Once started, a batch is finished (committed or rolled back) even if a stop
            // arrives meanwhile: revocation and shutdown wait for it.
            writer.set_attempt(attempt + 1);
            let result = writer.write(batch).instrument(span.clone()).await;
            drop(permit);
            match result {
                Ok(BatchOutcome::Committed {
                    applied,
                    duplicates,
                    lost,
                    next_offset,
                }) => {
                    bump(&self.stats.applied, applied);
                    bump(&self.stats.duplicates, duplicates);
                    bump(&self.stats.lost, lost);
                    bump(&self.stats.parked, writer.parked().len());
                    bump(&self.stats.batches, 1);
                    metrics.processed.increment(applied as u64);
                    metrics.duplicate.increment(duplicates as u64);
                    metrics.lost.increment(lost as u64);
                    metrics.parked.increment(writer.parked().len() as u64);
                    metrics.batch_size.record(batch.len() as f64);
                    metrics.batch_duration.record(started.elapsed());
                    metrics.commit_duration.record(writer.commit_duration());
                    metrics.set_stored(next_offset);
                    debug!(parent: &span, applied, duplicates, parked = writer.parked().len(), next_offset, "batch committed");
                    return self.check_breaker(writer, batch).map(Exit::Failed);
                }
                Ok(BatchOutcome::Empty) => return None,
                Ok(BatchOutcome::Fenced) => {
                    bump(&self.stats.fenced, 1);
                    metrics.fenced.increment(1);
                    warn!(parent: &span, epoch = writer.epoch(), "commit fenced: the partition's epoch or offset changed (rebalance or replay); reloading");
                    return Some(Exit::Fenced);
                }
                // The writer parks failing records; this one could not be parked either.
                Err(BatchError::Permanent { at, kind, source }) => {
                    return Some(Exit::Failed(Error::RecordFailed {
                        at,
                        kind,
                        reason: source.to_string(),
                    }));
                }
                Err(BatchError::Transient {
                    at,
                    infrastructure,
                    after,
                    source,
                }) => {
                    attempt += 1;
                    bump(&self.stats.retries, 1);
                    metrics.retried.increment(batch.len() as u64);
                    if let (Some(at), false, Some(max)) =
                        (&at, infrastructure, self.retry.max_attempts)
                        && attempt >= max
                    {
                        // Park the record (with the rest of the batch committing) and go on.
                        warn!(parent: &span, attempt, error = %source, record = %at, "retries exhausted; parking the record");
                        writer.give_up(
                            at,
                            format!(
                                "{} (after {attempt} attempts)",
                                crate::error::error_chain(source.as_ref())
                            ),
                            attempt,
                        );
                        attempt = 0;
                        continue;
                    }
                    let delay = self.retry.delay(attempt).max(after.unwrap_or_default());
                    if infrastructure {
                        // A pool that timed out hides why; one direct attempt tells.
                        let cause = match source.downcast_ref::<sqlx::Error>() {
                            Some(sqlx::Error::PoolTimedOut) => {
                                crate::store::connect_error(&self.writer.pool)
                                    .await
                                    .map(|e| e.to_string())
                            }
                            _ => None,
                        };
                        warn!(parent: &span, attempt, ?delay, error = %source, cause, "the database is unreachable or failing; batch rolled back, waiting for the database before retrying");
                    } else {
                        warn!(parent: &span, attempt, ?delay, error = %source, record = ?at.map(|a| a.to_string()), "batch rolled back; retrying");
                    }
                    tokio::select! {
                        biased;
                        _ = stop.wait_for(|s| *s) => return Some(Exit::Stopped),
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }
}

enum Exit {
    Stopped,
    Fenced,
    Failed(Error),
}

/// The rdkafka context: rebalance callbacks and librdkafka's logs.
struct RuntimeContext<H: Handler<DB>, DB: Backend> {
    core: Arc<Core<H, DB>>,
}

impl<H: Handler<DB>, DB: Backend> ClientContext for RuntimeContext<H, DB> {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => error!(target: "librdkafka", fac, "{message}"),
            RDKafkaLogLevel::Warning => warn!(target: "librdkafka", fac, "{message}"),
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                info!(target: "librdkafka", fac, "{message}")
            }
            RDKafkaLogLevel::Debug => debug!(target: "librdkafka", fac, "{message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown) {
            // librdkafka keeps reconnecting; records resume where the stored offsets say.
            warn!(target: "librdkafka", %error, "no Kafka broker is reachable; waiting for the brokers (librdkafka reconnects on its own): {reason}");
        } else {
            warn!(target: "librdkafka", %error, "{reason}");
        }
    }

    /// librdkafka's statistics (only with `metrics_refresh`): the assigned partitions' high
    /// watermarks, for their lag gauges.
    fn stats_raw(&self, statistics: &[u8]) {
        let stats: KafkaStats = match serde_json::from_slice(statistics) {
            Ok(s) => s,
            Err(e) => {
                debug!(error = %e, "unreadable librdkafka statistics");
                return;
            }
        };
        let slots = self.core.slots.lock().expect("slots lock");
        for ((topic, partition), slot) in slots.iter() {
            let Slot::Active(a) = slot else { continue };
            if let Some(p) = stats
                .topics
                .get(topic)
                .and_then(|t| t.partitions.get(&partition.to_string()))
            {
                a.metrics.set_watermarks(p.lo_offset, p.hi_offset);
            }
        }
    }
}

impl<H: Handler<DB>, DB: Backend> ConsumerContext for RuntimeContext<H, DB> {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let core = &self.core;
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        let parts: Vec<(String, i32)> = tpl
            .elements()
            .iter()
            .map(|e| (e.topic().to_owned(), e.partition()))
            .collect();
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                info!(partitions = ?parts, cooperative, "partitions assigned");
                telemetry::rebalance(&core.group, "assigned");
                let claims = if parts.is_empty() {
                    Some(Vec::new())
                } else {
                    core.claim_all(&parts, false)
                };
                let result = match claims {
                    Some(claims) => {
                        let mut slots = core.slots.lock().expect("slots lock");
                        for ((topic, partition), claim) in parts.iter().zip(claims) {
                            let claim = claim.expect("unconditional claims always succeed");
                            if let Err(e) = tpl.set_partition_offset(
                                topic,
                                *partition,
                                core.start_offset(&claim),
                            ) {
                                error!(%e, topic, partition, "cannot set the start offset");
                            }
                            let active = core.activate(topic, *partition, claim);
                            if let Some(Slot::Active(old)) =
                                slots.insert((topic.clone(), *partition), Slot::Active(active))
                            {
                                old.task.abort();
                            }
                        }
                        drop(slots);
                        let assigned = if cooperative {
                            consumer.incremental_assign(tpl)
                        } else {
                            consumer.assign(tpl)
                        };
                        // A partition this consumer paused (a full worker, a fence) and that
                        // was revoked while paused stays paused in librdkafka when it comes
                        // back: assigning clears only librdkafka's own pause, not the
                        // application's. Its new worker is empty, so resume it.
                        assigned.and_then(|()| consumer.resume(tpl))
                    }
                    None if cooperative => consumer.incremental_assign(&TopicPartitionList::new()),
                    None => consumer.assign(&TopicPartitionList::new()),
                };
                if let Err(e) = result {
                    error!(%e, "assigning partitions failed");
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                let lost = consumer.assignment_lost();
                info!(partitions = ?parts, lost, "partitions revoked; finishing their in-flight batches");
                telemetry::rebalance(&core.group, "revoked");
                stop_workers(core, Some(&parts));
                let result = if cooperative {
                    consumer.incremental_unassign(tpl)
                } else {
                    consumer.unassign()
                };
                if let Err(e) = result {
                    error!(%e, "unassigning partitions failed");
                }
            }
            other => {
                error!(error = ?other, "rebalance failed; dropping the assignment");
                telemetry::rebalance(&core.group, "failed");
                stop_workers(core, None);
                if let Err(e) = consumer.unassign() {
                    error!(%e, "unassigning partitions failed");
                }
            }
        }
    }
}

/// Stops the workers of `parts` (all if `None`) and waits until each has finished or rolled
/// back its in-flight batch.
fn stop_workers<H: Handler<DB>, DB: Backend>(core: &Core<H, DB>, parts: Option<&[(String, i32)]>) {
    let removed: Vec<Slot> = {
        let mut slots = core.slots.lock().expect("slots lock");
        match parts {
            Some(parts) => parts.iter().filter_map(|k| slots.remove(k)).collect(),
            None => slots.drain().map(|(_, s)| s).collect(),
        }
    };
    let (tasks, metrics): (Vec<JoinHandle<()>>, Vec<Arc<PartitionMetrics>>) = removed
        .into_iter()
        .filter_map(|slot| match slot {
            Slot::Active(a) => {
                a.stop.send_replace(true);
                Some((a.task, a.metrics))
            }
            Slot::Stale { .. } => None,
        })
        .unzip();
    if !tasks.is_empty() {
        // `None` (the async runtime is gone) means the workers were cancelled with it.
        let _ = core.block_on(async move {
            for t in tasks {
                let _ = t.await;
            }
        });
    }
    // After the last batch: the new owner reports these partitions' lag.
    for m in metrics {
        m.revoked();
    }
}

struct PollThread<H: Handler<DB>, DB: Backend> {
    core: Arc<Core<H, DB>>,
    consumer: BaseConsumer<RuntimeContext<H, DB>>,
    control: std_mpsc::Receiver<Control>,
    abort: Arc<AtomicBool>,
    brokers: String,
    topics: Vec<String>,
    startup_timeout: Duration,
    failure: Option<Error>,
}

impl<H: Handler<DB>, DB: Backend> PollThread<H, DB> {
    fn run(mut self, ready: oneshot::Sender<Result<()>>) -> Result<()> {
        if let Err(e) = self.startup() {
            let _ = ready.send(Err(e));
            return Ok(());
        }
        let _ = ready.send(Ok(()));
        loop {
            if self.abort.load(Ordering::SeqCst) {
                // Crash-like stop: in-flight transactions are dropped and roll back.
                let mut slots = self.core.slots.lock().expect("slots lock");
                for (_, slot) in slots.drain() {
                    if let Slot::Active(a) = slot {
                        a.task.abort();
                    }
                }
                return Ok(());
            }
            if self.core.shutting_down() {
                break;
            }
            self.handle_control();
            self.flush_pending();
            self.retry_stale();
            match self.consumer.poll(Duration::from_millis(100)) {
                Some(Ok(m)) => {
                    let m = m.detach();
                    self.route(m);
                }
                Some(Err(e)) => {
                    warn!(error = %e, "Kafka consumer error; librdkafka retries it (waiting for the broker)")
                }
                None => {}
            }
        }
        info!("stopping: finishing in-flight batches and leaving the group");
        stop_workers(&self.core, None);
        // Dropping the consumer (when this thread ends) closes it and leaves the group.
        self.consumer.unsubscribe();
        match self.failure.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn startup(&self) -> Result<()> {
        for topic in &self.topics {
            let metadata = self
                .consumer
                .fetch_metadata(Some(topic), self.startup_timeout)
                .map_err(|e| Error::BrokerUnreachable {
                    brokers: self.brokers.clone(),
                    detail: e.to_string(),
                })?;
            let missing = metadata
                .topics()
                .iter()
                .find(|t| t.name() == topic)
                .is_none_or(|t| t.error().is_some() || t.partitions().is_empty());
            if missing {
                return Err(Error::UnknownTopic {
                    topic: topic.clone(),
                    brokers: self.brokers.clone(),
                });
            }
        }
        let topics: Vec<&str> = self.topics.iter().map(String::as_str).collect();
        self.consumer
            .subscribe(&topics)
            .map_err(Error::kafka("subscribing to the topics"))
    }

    fn route(&self, m: OwnedMessage) {
        let mut slots = self.core.slots.lock().expect("slots lock");
        let Some(Slot::Active(a)) = slots.get_mut(&(m.topic().to_owned(), m.partition())) else {
            return;
        };
        if a.paused || !a.pending.is_empty() {
            a.pending.push_back(m);
            return;
        }
        match a.sender.try_send(m) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(m)) => {
                let tpl = single(m.topic(), m.partition());
                a.pending.push_back(m);
                a.paused = true;
                debug!(partition = ?tpl, "worker busy: pausing the partition");
                if let Err(e) = self.consumer.pause(&tpl) {
                    warn!(error = %e, "pausing a busy partition failed");
                }
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }

    fn flush_pending(&self) {
        let mut slots = self.core.slots.lock().expect("slots lock");
        for ((topic, partition), slot) in slots.iter_mut() {
            let Slot::Active(a) = slot else { continue };
            if !a.paused {
                continue;
            }
            while let Some(m) = a.pending.pop_front() {
                match a.sender.try_send(m) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(m)) => {
                        a.pending.push_front(m);
                        break;
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => {
                        a.pending.clear();
                        break;
                    }
                }
            }
            // Resume only once the worker has room for a good part of the channel: every
            // pause makes librdkafka drop the partition's prefetched (already decompressed)
            // records and fetch them again on resume. The records still queued must cover
            // that refetch, so the room asked for is in batches, not a share of the channel
            // (a batch size of 1 resumes almost at once).
            if a.pending.is_empty()
                && (a.sender.capacity() >= a.resume_room || a.sender.is_closed())
            {
                a.paused = false;
                if let Err(e) = self.consumer.resume(&single(topic, *partition)) {
                    warn!(error = %e, "resuming a partition failed");
                }
            }
        }
    }

    fn handle_control(&mut self) {
        while let Ok(control) = self.control.try_recv() {
            match control {
                Control::Fenced { key, generation } => {
                    if self.is_current(&key, generation) {
                        bump(&self.core.stats.reloads, 1);
                        self.reload(&key.topic, key.partition, false);
                    }
                }
                Control::Failed {
                    key,
                    generation,
                    error,
                } => {
                    if self.is_current(&key, generation) {
                        error!(%error, "stopping the consumer");
                        if self.failure.is_none() {
                            self.failure = Some(error);
                        }
                        self.core.shutdown.send_replace(true);
                    }
                }
            }
        }
    }

    fn is_current(&self, key: &PartitionKey, generation: u64) -> bool {
        let slots = self.core.slots.lock().expect("slots lock");
        matches!(
            slots.get(&(key.topic.clone(), key.partition)),
            Some(Slot::Active(a)) if a.generation == generation
        )
    }

    /// After a fence: claim the partition again (only if nobody else owns it, or
    /// unconditionally on `takeover`), move the consumer to the stored offset and start a new
    /// worker; otherwise pause it and try again later.
    fn reload(&self, topic: &str, partition: i32, takeover: bool) {
        let tp = (topic.to_owned(), partition);
        let claim = self.core.claim_all(std::slice::from_ref(&tp), !takeover);
        let mut slots = self.core.slots.lock().expect("slots lock");
        if let Some(Slot::Active(old)) = slots.remove(&tp) {
            old.task.abort();
        }
        let tpl = single(topic, partition);
        match claim.and_then(|mut c| c.pop().flatten()) {
            Some(claim) => {
                let offset = self.core.start_offset(&claim);
                if let Err(e) =
                    self.consumer
                        .seek(topic, partition, offset, Duration::from_secs(10))
                {
                    warn!(error = %e, topic, partition, "seeking to the stored offset failed; retrying shortly");
                    let _ = self.consumer.pause(&tpl);
                    slots.insert(
                        tp,
                        Slot::Stale {
                            retry_at: Instant::now() + Duration::from_secs(1),
                            takeover,
                        },
                    );
                    return;
                }
                let active = self.core.activate(topic, partition, claim);
                slots.insert(tp, Slot::Active(active));
                drop(slots);
                if let Err(e) = self.consumer.resume(&tpl) {
                    warn!(error = %e, "resuming a partition failed");
                }
            }
            None => {
                warn!(
                    topic,
                    partition,
                    "another consumer owns this partition in the database; pausing it until Kafka settles the assignment"
                );
                let _ = self.consumer.pause(&tpl);
                slots.insert(
                    tp,
                    Slot::Stale {
                        retry_at: Instant::now() + self.core.stale_retry,
                        takeover: true,
                    },
                );
            }
        }
    }

    fn retry_stale(&self) {
        let due: Vec<((String, i32), bool)> = {
            let slots = self.core.slots.lock().expect("slots lock");
            let now = Instant::now();
            slots
                .iter()
                .filter_map(|(k, s)| match s {
                    Slot::Stale { retry_at, takeover } if *retry_at <= now => {
                        Some((k.clone(), *takeover))
                    }
                    _ => None,
                })
                .collect()
        };
        for ((topic, partition), takeover) in due {
            self.reload(&topic, partition, takeover);
        }
    }
}

/// A worker's channel holds this many batches of records. When it is full the poll thread
/// pauses the partition, and librdkafka then drops that partition's prefetched records and
/// fetches and decompresses them again after the resume; a deep channel (with resuming only
/// once it is half empty) keeps those pauses rare. The cost is memory: up to
/// `batch_size × CHANNEL_BATCHES` records per assigned partition.
const CHANNEL_BATCHES: usize = 8;

fn single(topic: &str, partition: i32) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::with_capacity(1);
    tpl.add_partition(topic, partition);
    tpl
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::mocking::MockCluster;
    use sqlx::Postgres;

    struct Nothing;

    impl Handler<Postgres> for Nothing {
        type Event = crate::Raw;
        async fn handle(
            &self,
            _ctx: &mut crate::Context<'_, Postgres>,
            _event: crate::Raw,
        ) -> std::result::Result<(), crate::HandlerError> {
            Ok(())
        }
    }

    /// The threads of this process named `consumer-poll`.
    fn poll_threads() -> usize {
        std::fs::read_dir("/proc/self/task")
            .map(|tasks| {
                tasks
                    .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
                    .filter(|name| name.trim_end() == "consumer-poll")
                    .count()
            })
            .unwrap_or(0)
    }

    fn wait(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// An application drops its async runtime (returns from `main` without a shutdown, drops a
    /// test's runtime) while the consumer's poll thread waits on the database for a partition
    /// claim: the claim is cancelled with the runtime and the poll thread ends without a panic.
    #[test]
    fn dropping_the_async_runtime_mid_claim_ends_the_poll_thread_without_a_panic() {
        let poll_panics = Arc::new(AtomicU64::new(0));
        let seen = poll_panics.clone();
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if std::thread::current().name() == Some("consumer-poll") {
                seen.fetch_add(1, Ordering::SeqCst);
            }
            previous(info);
        }));

        let cluster = MockCluster::new(1).expect("mock cluster");
        cluster.create_topic("t", 1, 1).expect("create topic");
        let url = std::env::var("DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
        let schema = format!("lib_drop_{}", std::process::id());

        // The test's own async runtime holds the partition's offset row locked.
        let test = tokio::runtime::Runtime::new().unwrap();
        let (pool, lock) = test.block_on(async {
            let pool = crate::connect::<Postgres>(&url, 2).await.unwrap();
            crate::migrate(&pool, &schema).await.unwrap();
            crate::set_offsets(&pool, &schema, "g", "t", &[(0, 0)])
                .await
                .unwrap();
            let mut lock = pool.begin().await.unwrap();
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT 1 FROM {schema}.consumer_offsets WHERE consumer_group = 'g' FOR UPDATE"
            )))
            .execute(&mut *lock)
            .await
            .unwrap();
            (pool, lock)
        });

        // The consumer's runtime: its assignment's claim waits for that lock.
        let consumer = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        consumer.block_on(async {
            let runtime = Runtime::builder(Nothing)
                .pool(crate::connect::<Postgres>(&url, 2).await.unwrap())
                .schema(&schema)
                .brokers(cluster.bootstrap_servers())
                .group("g")
                .topic("t")
                .handle_signals(false)
                .build()
                .unwrap();
            tokio::spawn(runtime.run());
        });
        wait("the claim to wait for the lock", || {
            test.block_on(async {
                sqlx::query_scalar::<_, i64>(
                    "SELECT count(*) FROM pg_stat_activity \
                     WHERE wait_event_type = 'Lock' AND strpos(query, $1) > 0",
                )
                .bind(format!("{schema}.consumer_offsets"))
                .fetch_one(&pool)
                .await
                .unwrap()
                    > 0
            })
        });
        drop(consumer);
        wait("the poll thread to end", || poll_threads() == 0);
        assert_eq!(
            poll_panics.load(Ordering::SeqCst),
            0,
            "the poll thread panicked"
        );

        test.block_on(async {
            lock.rollback().await.unwrap();
            sqlx::query(sqlx::AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE")))
                .execute(&pool)
                .await
                .unwrap();
        });
    }
}
