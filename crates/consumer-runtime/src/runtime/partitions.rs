//! The partitions' state, shared by the poll thread, the rebalance callbacks and the workers:
//! [`Core`], each partition's [`Slot`], claiming partitions in the database and starting a
//! worker for a claimed one.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc as std_mpsc};
use std::time::{Duration, Instant};

use rdkafka::message::OwnedMessage;
use rdkafka::topic_partition_list::Offset;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::gaps::Gaps;
use super::worker::Exit;
use super::{HealthState, Stats, bump};
use crate::config::{BreakerState, ConsumerOptions, OffsetReset};
use crate::error::Error;
use crate::handler::Handler;
use crate::store::{Backend, Claim, PartitionKey, is_lock_timeout};
use crate::telemetry::PartitionMetrics;
use crate::unit::{PartitionWriter, WriterConfig};

fn instance_id() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "host".into());
    format!(
        "{host}:{}:{:08x}",
        std::process::id(),
        crate::util::random_u64() as u32
    )
}

pub(super) enum Control {
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

pub(super) struct Active {
    pub(super) generation: u64,
    pub(super) epoch: i64,
    pub(super) sender: mpsc::Sender<OwnedMessage>,
    pub(super) stop: watch::Sender<bool>,
    pub(super) task: JoinHandle<()>,
    pub(super) pending: VecDeque<OwnedMessage>,
    pub(super) paused: bool,
    /// The free room in `sender` a paused partition waits for before it resumes: half of
    /// `(batch_size − 1) × CHANNEL_BATCHES`, at least 1 (a batch size of 1 resumes as soon as
    /// there is room: its worker drains one record per transaction and would otherwise run
    /// dry while the refetch is under way).
    pub(super) resume_room: usize,
    pub(super) metrics: Arc<PartitionMetrics>,
    /// The offset the next record should have (gap detection); `None` until known.
    pub(super) expected: Option<i64>,
    /// When the partition last received a record, was assigned, or was resumed (stall
    /// detection).
    pub(super) last_record: Instant,
    /// Whether it is reported stalled.
    pub(super) stalled: bool,
}

/// A slot's key, `(topic, partition)`, seen as borrowed parts, so that the poll thread can look
/// a record's slot up without allocating its topic: `slots.get_mut(&(topic, p) as &dyn
/// TopicPartition)`. Both forms hash as `(&str, i32)` does, as `Borrow` requires.
pub(super) trait TopicPartition {
    fn parts(&self) -> (&str, i32);
}

impl TopicPartition for (String, i32) {
    fn parts(&self) -> (&str, i32) {
        (&self.0, self.1)
    }
}

impl TopicPartition for (&str, i32) {
    fn parts(&self) -> (&str, i32) {
        (self.0, self.1)
    }
}

impl<'a> std::borrow::Borrow<dyn TopicPartition + 'a> for (String, i32) {
    fn borrow(&self) -> &(dyn TopicPartition + 'a) {
        self
    }
}

impl std::hash::Hash for dyn TopicPartition + '_ {
    fn hash<S: std::hash::Hasher>(&self, state: &mut S) {
        self.parts().hash(state);
    }
}

impl PartialEq for dyn TopicPartition + '_ {
    fn eq(&self, other: &Self) -> bool {
        self.parts() == other.parts()
    }
}

impl Eq for dyn TopicPartition + '_ {}

pub(super) enum Slot {
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
pub(super) struct Core<H: Handler<DB>, DB: Backend> {
    pub(super) writer: Arc<WriterConfig<H, DB>>,
    pub(super) options: ConsumerOptions,
    /// This instance, as recorded in the claimed partitions' `owner` column.
    pub(super) owner: String,
    /// The circuit breaker's count, over all partitions (its limits are in `options`).
    pub(super) breaker: Mutex<BreakerState>,
    pub(super) permits: Arc<Semaphore>,
    pub(super) handle: tokio::runtime::Handle,
    pub(super) control: std_mpsc::Sender<Control>,
    pub(super) slots: Mutex<HashMap<(String, i32), Slot>>,
    pub(super) generation: AtomicU64,
    pub(super) shutdown: Arc<watch::Sender<bool>>,
    pub(super) stats: Arc<Stats>,
    pub(super) stale_retry: Duration,
    pub(super) health: Arc<HealthState>,
    /// Which topics' offset gaps are expected (compacted or transactional).
    pub(super) gaps: Mutex<Gaps>,
    /// The stored offsets of the partitions whose workers were stopped last (-1: none), for
    /// the mirror's last commit of them.
    pub(super) revoked_stored: Mutex<HashMap<(String, i32), i64>>,
}

impl<H: Handler<DB>, DB: Backend> Core<H, DB> {
    /// The state of a runtime that has not assigned any partition yet.
    pub(super) fn new(
        writer: Arc<WriterConfig<H, DB>>,
        options: ConsumerOptions,
        concurrency: usize,
        control: std_mpsc::Sender<Control>,
        shutdown: Arc<watch::Sender<bool>>,
        stats: Arc<Stats>,
        health: Arc<HealthState>,
    ) -> Self {
        let stale_retry = Duration::from_millis(
            options
                .kafka
                .get("session.timeout.ms")
                .and_then(|v| v.parse().ok())
                .unwrap_or(45_000u64)
                + 5_000,
        );
        Core {
            writer,
            options,
            owner: instance_id(),
            breaker: Mutex::new(BreakerState::default()),
            permits: Arc::new(Semaphore::new(concurrency)),
            handle: tokio::runtime::Handle::current(),
            control,
            slots: Mutex::new(HashMap::new()),
            generation: AtomicU64::new(0),
            shutdown,
            stats,
            stale_retry,
            health,
            gaps: Mutex::new(Gaps::default()),
            revoked_stored: Mutex::new(HashMap::new()),
        }
    }

    pub(super) fn key(&self, topic: &str, partition: i32) -> PartitionKey {
        PartitionKey {
            group: self.options.group.clone(),
            topic: topic.to_owned(),
            partition,
        }
    }

    pub(super) fn shutting_down(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// Runs a future on the async runtime and waits for it on this (non-async) thread. `None`
    /// when the async runtime is shutting down (the application dropped it under the consumer)
    /// and cancelled the future.
    pub(super) fn block_on<F>(&self, f: F) -> Option<F::Output>
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

    pub(super) fn start_offset(&self, claim: &Claim) -> Offset {
        match claim.next_offset {
            Some(n) => Offset::Offset(n),
            None => self.reset_offset(),
        }
    }

    /// Where the reset policy starts a partition (never the group's offset in Kafka).
    pub(super) fn reset_offset(&self) -> Offset {
        match self.options.offset_reset {
            OffsetReset::Earliest => Offset::Beginning,
            OffsetReset::Latest => Offset::End,
        }
    }

    /// Claims partitions (all at once, each in a transaction of its own), retrying database
    /// failures until they succeed or a shutdown starts. A partition whose offsets row stays
    /// locked for [`CLAIM_LOCK_TIMEOUT`] (PostgreSQL: a frozen previous owner's open
    /// transaction) comes back [`Claimed::Locked`] and delays no other: the caller retries it
    /// alone.
    pub(super) fn claim_all(
        &self,
        parts: &[(String, i32)],
        conditional: bool,
    ) -> Option<Vec<Claimed>> {
        let mut attempt = 0;
        loop {
            let pool = self.writer.pool.clone();
            let queries = self.writer.queries.clone();
            let keys: Vec<_> = parts.iter().map(|(t, p)| self.key(t, *p)).collect();
            let owner = self.owner.clone();
            let result = self.block_on(async move {
                let claims = keys.iter().map(|key| {
                    DB::claim_within(&pool, &queries, key, &owner, conditional, CLAIM_LOCK_TIMEOUT)
                });
                let mut out = Vec::with_capacity(keys.len());
                for (key, claim) in keys.iter().zip(futures_util::future::join_all(claims).await) {
                    out.push(match claim {
                        Ok(Some(c)) => Claimed::Yes(c),
                        Ok(None) => Claimed::OwnedElsewhere,
                        Err(e) if is_lock_timeout(&e) => {
                            warn!(
                                topic = %key.topic,
                                partition = key.partition,
                                timeout = ?CLAIM_LOCK_TIMEOUT,
                                "the partition's offsets row is locked (a previous owner's transaction is still open, e.g. a frozen consumer); claiming the other partitions now and this one again shortly"
                            );
                            Claimed::Locked
                        }
                        Err(e) => return Err(e),
                    });
                }
                Ok::<_, sqlx::Error>(out)
            })?;
            match result {
                Ok(claims) => return Some(claims),
                Err(e) => {
                    attempt += 1;
                    let delay = self.options.retry_policy.delay(attempt);
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
    pub(super) fn activate(self: &Arc<Self>, topic: &str, partition: i32, claim: Claim) -> Active {
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        let key = self.key(topic, partition);
        let depth = self.options.batch_size.saturating_mul(CHANNEL_BATCHES);
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
            &self.options.group,
            topic,
            partition,
            claim.next_offset,
            self.options.offset_reset == OffsetReset::Latest,
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
            resume_room: (self.options.batch_size.saturating_sub(1) * CHANNEL_BATCHES / 2).max(1),
            metrics,
            expected: claim.next_offset,
            last_record: Instant::now(),
            stalled: false,
        }
    }
}

/// What claiming one partition gave.
pub(super) enum Claimed {
    /// Claimed: the new epoch and where to resume.
    Yes(Claim),
    /// A conditional claim found another owner recorded.
    OwnedElsewhere,
    /// The offsets row stayed locked for [`CLAIM_LOCK_TIMEOUT`]; try again later.
    Locked,
}

/// How long a claim waits for a partition's locked offsets row before it gives up for now
/// (and the partition is claimed again [`LOCKED_RETRY`] later). A healthy owner holds the row
/// only while it commits a batch.
pub(super) const CLAIM_LOCK_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a partition whose claim found its row locked waits before the next attempt.
pub(super) const LOCKED_RETRY: Duration = Duration::from_secs(1);

/// A worker's channel holds this many batches of records. When it is full the poll thread
/// pauses the partition, and librdkafka then drops that partition's prefetched records and
/// fetches and decompresses them again after the resume; a deep channel (with resuming only
/// once it is half empty) keeps those pauses rare. The cost is memory: up to
/// `batch_size × CHANNEL_BATCHES` records per assigned partition.
pub(super) const CHANNEL_BATCHES: usize = 8;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::Runtime;
    use rdkafka::mocking::MockCluster;
    use sqlx::Postgres;

    use crate::runtime::test_handler::Nothing;

    #[test]
    fn a_record_finds_its_partitions_slot_by_borrowed_topic_and_no_other() {
        let mut slots: HashMap<(String, i32), u32> = HashMap::new();
        slots.insert(("orders".to_owned(), 3), 1);
        slots.insert(("orders".to_owned(), 4), 2);
        slots.insert(("payments".to_owned(), 3), 3);
        let key: &dyn TopicPartition = &("orders", 4);
        assert_eq!(slots.get(key), Some(&2));
        *slots
            .get_mut(&("payments", 3) as &dyn TopicPartition)
            .unwrap() += 10;
        assert_eq!(slots[&("payments".to_owned(), 3)], 13);
        assert_eq!(slots.get(&("orders", 5) as &dyn TopicPartition), None);
        assert_eq!(slots.get(&("order", 3) as &dyn TopicPartition), None);
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
            crate::Store::new(pool.clone(), &schema)
                .unwrap()
                .set_offsets("g", "t", &[(0, 0)])
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
