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

mod background;
mod builder;
mod partitions;
mod poll;
mod rebalance;
mod worker;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc as std_mpsc};
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::consumer::BaseConsumer;
use tokio::sync::{Semaphore, oneshot, watch};
use tracing::{info, warn};

use crate::config::{Assignor, BreakerState, CircuitBreaker, OffsetReset, RetryPolicy};
use crate::error::{Error, Result};
use crate::event_id::EventId;
use crate::handler::Handler;
use crate::store::{Backend, check_schema};
use crate::telemetry;
use crate::unit::WriterConfig;

use background::{AbortOnDrop, AbortTaskOnDrop, count_ledger, wait_for_signal, watch_epochs};
pub use builder::RuntimeBuilder;
use partitions::{Core, instance_id};
use poll::PollThread;
use rebalance::RuntimeContext;

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
        RuntimeBuilder::new(handler)
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
