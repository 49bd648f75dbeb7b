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
//!
//! The files follow them: `builder` (the settings: a [`ConsumerOptions`] value), `partitions`
//! (the state they share: `Core` and each partition's slot), `worker` (a partition's batch
//! loop and what happens to a record after a failure: retries, backoff, parking, the circuit
//! breaker), `poll` (the poll thread), `rebalance` (the rdkafka callbacks) and `background`
//! (the epoch watcher, the ledger counter, the signal listener).

mod background;
mod builder;
mod gaps;
mod health;
mod partitions;
mod poll;
mod rebalance;
mod worker;

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, mpsc as std_mpsc};

use rdkafka::ClientConfig;
use rdkafka::consumer::BaseConsumer;
use tokio::sync::{oneshot, watch};
use tracing::{info, warn};

use crate::config::{ConsumerOptions, OffsetReset};
use crate::error::{Error, Result};
use crate::event_id::EventId;
use crate::handler::{BatchHandler, Batched, Handler};
use crate::store::{Backend, check_schema};
use crate::telemetry;
use crate::unit::WriterConfig;

use background::{
    AbortOnDrop, AbortTaskOnDrop, count_ledger, learn_compaction, prune_ledger, wait_for_signal,
    watch_epochs, watch_stalls,
};
pub use builder::RuntimeBuilder;
pub use health::Health;
use health::HealthState;
use partitions::Core;
use poll::PollThread;
use rebalance::RuntimeContext;

/// Counters of what the runtime has done since it started; read them with
/// [`snapshot`](Self::snapshot).
#[derive(Debug, Default)]
pub struct Stats {
    applied: AtomicU64,
    duplicates: AtomicU64,
    lost: AtomicU64,
    parked: AtomicU64,
    batches: AtomicU64,
    retries: AtomicU64,
    fenced: AtomicU64,
    reloads: AtomicU64,
    assignments: AtomicU64,
    mirror_failures: AtomicU64,
    gaps: AtomicU64,
}

/// The [`Stats`] at one moment. Each counter is read on its own (they are not one atomic
/// snapshot), and each only grows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct StatsSnapshot {
    /// Records whose handler ran and committed.
    pub applied: u64,
    /// Records skipped because their event id was already claimed.
    pub duplicates: u64,
    /// Records lost after their offset committed (at-most-once only).
    pub lost: u64,
    /// Records that failed permanently and were parked in `dead_letters` (their batch
    /// committed without them).
    pub parked: u64,
    /// Batches committed.
    pub batches: u64,
    /// Batch attempts rolled back and retried.
    pub retries: u64,
    /// Commits refused by the fence.
    pub fenced: u64,
    /// Times a partition was reloaded after its epoch changed behind the worker: a fenced
    /// commit, or the epoch watcher noticing a replay, an offset set or another owner first.
    pub reloads: u64,
    /// Partition assignments (each one claims the partition and bumps its epoch).
    pub assignments: u64,
    /// Offset commits of the monitoring mirror to the group in Kafka that failed (per
    /// partition).
    pub mirror_failures: u64,
    /// Gaps in the offsets received on topics neither compacted nor transactional.
    pub gaps: u64,
}

impl Stats {
    /// The counters' current values.
    pub fn snapshot(&self) -> StatsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsSnapshot {
            applied: get(&self.applied),
            duplicates: get(&self.duplicates),
            lost: get(&self.lost),
            parked: get(&self.parked),
            batches: get(&self.batches),
            retries: get(&self.retries),
            fenced: get(&self.fenced),
            reloads: get(&self.reloads),
            assignments: get(&self.assignments),
            mirror_failures: get(&self.mirror_failures),
            gaps: get(&self.gaps),
        }
    }
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
    options: ConsumerOptions,
    /// `options.concurrency` within the pool's size.
    concurrency: usize,
    shutdown: Arc<watch::Sender<bool>>,
    stats: Arc<Stats>,
    health: Arc<HealthState>,
}

impl<B: BatchHandler<DB>, DB: Backend> Runtime<Batched<B>, DB> {
    /// Starts building a runtime around a [`BatchHandler`], called once per partition batch:
    /// the same as `Runtime::builder(Batched(handler))`.
    pub fn batch_builder(handler: B) -> RuntimeBuilder<Batched<B>, DB> {
        RuntimeBuilder::new(Batched(handler))
    }
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

    /// Its liveness and readiness, for health endpoints.
    pub fn health(&self) -> Health {
        Health(self.health.clone())
    }

    /// The settings it runs with.
    pub fn options(&self) -> &ConsumerOptions {
        &self.options
    }

    /// Consumes until a shutdown is requested (a [`ShutdownHandle`], or SIGINT/SIGTERM if
    /// [`handle_signals`](RuntimeBuilder::handle_signals) is on). A record that fails
    /// permanently is parked in `dead_letters` and the consumer goes on; it stops with
    /// [`Error::RecordFailed`] only if such a record cannot be parked.
    ///
    /// Dropping the returned future without a shutdown stops everything at once, without
    /// finishing in-flight batches (they roll back), as a crash would.
    pub async fn run(self) -> Result<()> {
        self.run_until(std::future::pending::<()>()).await
    }

    /// [`run`](Self::run), and shuts down gracefully (stop fetching, finish in-flight batches,
    /// leave the group) once `shutdown` completes, as axum's `with_graceful_shutdown` does:
    /// `runtime.run_until(tokio::signal::ctrl_c())`, or a future of the application's own
    /// shutdown. A [`ShutdownHandle`] and, if enabled, SIGINT/SIGTERM stop it as well.
    pub async fn run_until(self, shutdown: impl Future) -> Result<()> {
        let Runtime {
            writer,
            options,
            concurrency,
            shutdown: shutdown_tx,
            stats,
            health,
        } = self;
        let pool = &writer.pool;
        check_schema(pool, &writer.queries).await?;
        let strategy = writer.event_id.describe();
        if matches!(writer.event_id, EventId::Coordinates) {
            warn!(
                "event ids are the records' coordinates (topic/partition/offset): replays and restarts are safe, but producer-side duplicates (retries, double publishes) land at new offsets and WILL be applied again; use a header or a business key to catch them"
            );
        }
        info!(
            group = %options.group,
            topics = ?options.topics,
            database = <DB as sqlx::Database>::NAME,
            guarantee = %writer.guarantee,
            event_id = %strategy,
            batch_size = options.batch_size,
            concurrency,
            "starting consumer"
        );

        telemetry::describe();
        let client_config = client_config(&options);
        let (metrics_refresh, handle_signals) = (options.metrics_refresh, options.handle_signals);
        let retention = options.ledger_retention;
        let (control_tx, control_rx) = std_mpsc::channel();
        let core = Arc::new(Core::new(
            writer,
            options,
            concurrency,
            control_tx,
            shutdown_tx.clone(),
            stats,
            health,
        ));
        let context = RuntimeContext { core: core.clone() };
        let core_for_watch = core.clone();
        let consumer: BaseConsumer<RuntimeContext<H, DB>> =
            client_config.create_with_context(context).map_err(|e| {
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
            failure: None,
            last_mirror: std::time::Instant::now(),
            last_mirror_all: std::time::Instant::now(),
        };
        std::thread::Builder::new()
            .name("consumer-poll".into())
            .spawn(move || {
                let result = poll.run(ready_tx);
                let _ = done_tx.send(result);
            })
            .map_err(|e| Error::Internal(format!("cannot start the poll thread: {e}")))?;
        let guard = AbortOnDrop(Some(abort));
        let _ledger = metrics_refresh.map(|every| {
            AbortTaskOnDrop(tokio::spawn(count_ledger(core_for_watch.clone(), every)))
        });
        let _stalls = AbortTaskOnDrop(tokio::spawn(watch_stalls(core_for_watch.clone())));
        let _compaction = AbortTaskOnDrop(tokio::spawn(learn_compaction(core_for_watch.clone())));
        let _pruner = retention.map(|retention| {
            AbortTaskOnDrop(tokio::spawn(prune_ledger(
                core_for_watch.clone(),
                retention,
            )))
        });
        let watcher = tokio::spawn(watch_epochs(core_for_watch));
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
        let signal = wait_for_signal(handle_signals);
        tokio::pin!(signal);
        tokio::pin!(shutdown);
        let mut stopping = false;
        let result = loop {
            tokio::select! {
                r = &mut done_rx => break r,
                () = &mut signal, if !stopping => {
                    info!("shutdown signal received; finishing in-flight batches");
                    stopping = true;
                    shutdown_tx.send_replace(true);
                }
                _ = &mut shutdown, if !stopping => {
                    info!("shutdown requested; finishing in-flight batches");
                    stopping = true;
                    shutdown_tx.send_replace(true);
                }
            }
        };
        guard.disarm();
        result.unwrap_or_else(|_| Err(Error::Internal("the poll thread died".into())))
    }
}

/// librdkafka's `queued.max.messages.kbytes` unless the user sets it.
const QUEUED_MAX_KBYTES: &str = "16384";

/// The librdkafka client configuration: the runtime's settings, the user's properties over
/// them, and offsets never auto-committed.
fn client_config(options: &ConsumerOptions) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &options.brokers)
        .set("group.id", &options.group)
        .set("partition.assignment.strategy", options.assignor.as_kafka())
        .set("enable.partition.eof", "false")
        // librdkafka prefetches up to 64 MB by default, far ahead of a consumer bound by its
        // database; the runtime queues its own batches besides. 16 MB keeps the fetches ahead
        // of the workers (a user's `kafka` setting overrides it).
        .set("queued.max.messages.kbytes", QUEUED_MAX_KBYTES)
        .set(
            "auto.offset.reset",
            match options.offset_reset {
                OffsetReset::Earliest => "earliest",
                OffsetReset::Latest => "latest",
            },
        );
    if let Some(every) = options.metrics_refresh {
        // The lag gauges read the high watermarks from librdkafka's statistics.
        c.set(
            "statistics.interval.ms",
            every.as_millis().clamp(1, i32::MAX as u128).to_string(),
        );
    }
    for (k, v) in &options.kafka {
        c.set(k, v);
    }
    c.set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false");
    c
}

/// A handler for the runtime's own tests: it does nothing, on either database.
#[cfg(test)]
pub(super) mod test_handler {
    use crate::{Backend, Context, Handler, HandlerError, Raw};

    pub(crate) struct Nothing;

    impl<DB: Backend> Handler<DB> for Nothing {
        type Event = Raw;
        async fn handle(&self, _: &mut Context<'_, DB>, _: Raw) -> Result<(), HandlerError> {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use rdkafka::mocking::MockCluster;
    use sqlx::Postgres;

    use super::*;

    use super::test_handler::Nothing;

    /// An application that embeds the runtime stops it with its own shutdown future: the
    /// runtime runs until that future completes, then shuts down gracefully and returns `Ok`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn run_until_runs_until_its_future_completes_then_shuts_down_gracefully() {
        let cluster = MockCluster::new(1).expect("mock cluster");
        cluster.create_topic("t", 1, 1).expect("create topic");
        let url = std::env::var("DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
        let schema = format!("lib_until_{}", std::process::id());
        let pool = crate::connect::<Postgres>(&url, 2).await.unwrap();
        crate::migrate(&pool, &schema).await.unwrap();

        let runtime = Runtime::builder(Nothing)
            .pool(pool.clone())
            .schema(&schema)
            .brokers(cluster.bootstrap_servers())
            .group("g")
            .topic("t")
            .build()
            .unwrap();
        let stats = runtime.stats();
        let (stop, stopped) = oneshot::channel::<()>();
        let run = tokio::spawn(runtime.run_until(stopped));
        let deadline = Instant::now() + Duration::from_secs(60);
        while stats.snapshot().assignments == 0 {
            assert!(!run.is_finished(), "the runtime stopped on its own");
            assert!(
                Instant::now() < deadline,
                "timed out waiting for the assignment"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            !run.is_finished(),
            "the runtime runs until its future completes"
        );

        stop.send(()).unwrap();
        let result = tokio::time::timeout(Duration::from_secs(30), run)
            .await
            .expect("run_until returns once its future completed")
            .expect("the run task");
        assert!(
            result.is_ok(),
            "a requested shutdown is not an error: {result:?}"
        );

        sqlx::query(sqlx::AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE")))
            .execute(&pool)
            .await
            .unwrap();
    }
}
