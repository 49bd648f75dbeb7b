//! The relay: publishes the [outbox](crate::outbox)'s rows to Kafka, at least once, in commit
//! order per key, and marks them published only after the broker acknowledged them.
//!
//! ```no_run
//! use consumer_runtime::relay::Relay;
//! use sqlx::Postgres;
//!
//! # async fn run() -> Result<(), consumer_runtime::Error> {
//! let pool = consumer_runtime::connect::<Postgres>("postgres://localhost/app", 4).await?;
//! let relay = Relay::builder(pool).brokers("localhost:9092").build()?;
//! let stop = relay.shutdown_handle();
//! tokio::spawn(async move { tokio::signal::ctrl_c().await.ok(); stop.shutdown() });
//! relay.run().await
//! # }
//! ```
//!
//! **Publishing.** An idempotent producer (`enable.idempotence=true`, `acks=all`). A row is
//! marked published (with the partition and offset the broker returned) after its
//! acknowledgement; a crash between the two publishes it again, and a consumer that
//! dedupes on the `event-id` header (every consumer of this runtime does by default) applies
//! it once. The relay is at-least-once; effects are exactly-once only where a consumer
//! dedupes.
//!
//! **Order.** Rows of one key are published in commit order (see [`crate::outbox`]). The relay
//! reads every unpublished row of its lanes in `seq` order, never "rows after the last seq
//! seen", so a row that commits late is published late, never skipped. One pass covers every
//! lane held: one statement reads (and counts the send of) the oldest rows, and after the
//! broker's acknowledgements one statement (PostgreSQL; a transaction on SQLite) renews the
//! leases and marks the rows.
//!
//! **Lanes.** The outbox is split into lanes by `key_hash % lanes` (the lane count is the
//! outbox's, fixed when the first relay starts). Each lane is leased by one relay instance under
//! an epoch; the relays alive share the lanes evenly. A relay marks a lane's rows only in a
//! statement or transaction that also renews the lane's lease under its epoch, so a relay frozen past its lease (a long GC
//! pause, `SIGSTOP`) that resumes after another relay took its lane cannot mark or park any of
//! the lane's rows: it drops the lane. What it had sent meanwhile are duplicates, which the
//! consumers' ledgers suppress.
//!
//! **Wake-up.** On PostgreSQL [`crate::outbox::publish`] sends a `NOTIFY` at commit, and the
//! relay `LISTEN`s: a row is picked up at once. It polls as well (every
//! [`RelayBuilder::poll_interval`]), which covers a lost notification or connection. SQLite
//! polls.
//!
//! **Rows that can never be published** (an unknown or invalid topic, a record too large, an
//! authorization failure) are parked: marked with the error, skipped from then on, counted in
//! [`PARKED`] and listed by [`Store::outbox_parked`](crate::Store::outbox_parked). Later
//! rows of the same key are published. [`Store::outbox_retry`](crate::Store::outbox_retry)
//! puts a parked row back.
//!
//! **Clean-up.** Published rows are deleted in batches of at most
//! [`RelayBuilder::cleanup_batch`] rows per pass, once they are older than
//! [`RelayBuilder::keep_published`] (default 0: at the next pass). Keep them for a while to
//! `trace` events to the offset they were published at.
//!
//! # Metrics
//!
//! | name | type | labels | what |
//! |---|---|---|---|
//! | [`BACKLOG`] | gauge | `lane` | unpublished rows per lane |
//! | [`OLDEST`] | gauge | | age in seconds of the oldest unpublished row |
//! | [`PUBLISHED`] | counter | | rows acknowledged by the broker and marked published |
//! | [`LATENCY`] | histogram | | seconds from a row's write to its acknowledgement |
//! | [`PARKED`] | gauge | | parked rows |
//! | [`FENCED`] | counter | | lanes lost to another relay (a mark refused by the epoch) |
//! | [`LANES`] | gauge | | lanes this relay holds |

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use sqlx::Pool;
use tokio::sync::{Notify, watch};

use crate::error::{Error, Result};
use crate::store::outbox::{Acked, OutboxQueries, PendingRow};
use crate::store::{Backend, CRATE, Store};

/// Unpublished rows per lane (gauge; label `lane`).
pub const BACKLOG: &str = "outbox_backlog_rows";
/// Age in seconds of the oldest unpublished row (gauge).
pub const OLDEST: &str = "outbox_oldest_unpublished_seconds";
/// Rows acknowledged by the broker and marked published (counter).
pub const PUBLISHED: &str = "outbox_published_total";
/// Seconds from a row's write to its acknowledgement (histogram).
pub const LATENCY: &str = "outbox_publish_latency_seconds";
/// Parked rows (gauge).
pub const PARKED: &str = "outbox_parked_rows";
/// Lanes lost to another relay (counter).
pub const FENCED: &str = "outbox_fenced_lanes_total";
/// Lanes this relay holds (gauge).
pub const LANES: &str = "outbox_lanes_owned";

/// The default number of lanes.
pub const DEFAULT_LANES: u32 = 16;

/// Builds a [`Relay`]: [`Relay::builder`].
#[must_use]
pub struct RelayBuilder<DB: Backend> {
    pool: Pool<DB>,
    schema: String,
    brokers: Option<String>,
    lanes: u32,
    batch: usize,
    lease: Duration,
    poll_interval: Duration,
    keep_published: Duration,
    cleanup_batch: i64,
    instance: Option<String>,
    listen: bool,
    producer: Vec<(String, String)>,
    pause: Option<(Arc<Notify>, Arc<Notify>)>,
}

impl<DB: Backend> std::fmt::Debug for RelayBuilder<DB> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayBuilder")
            .field("schema", &self.schema)
            .field("brokers", &self.brokers)
            .field("lanes", &self.lanes)
            .finish_non_exhaustive()
    }
}

impl<DB: Backend> RelayBuilder<DB> {
    /// The runtime's schema (default `consumer_runtime`).
    pub fn schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = schema.into();
        self
    }
    /// The Kafka bootstrap servers (required).
    pub fn brokers(mut self, brokers: impl Into<String>) -> Self {
        self.brokers = Some(brokers.into());
        self
    }
    /// How many lanes the outbox is split into (default 16). Fixed by the first relay that
    /// runs on the schema; every relay must pass the same number.
    pub fn lanes(mut self, lanes: u32) -> Self {
        self.lanes = lanes;
        self
    }
    /// Rows read and sent per lane and pass (default 500).
    pub fn batch_size(mut self, batch: usize) -> Self {
        self.batch = batch;
        self
    }
    /// How long a lane's lease lasts without renewal (default 10 s). A relay that stops
    /// renewing (crashed, frozen) loses its lanes after this.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }
    /// How often the relay looks for rows without a notification (default 1 s).
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }
    /// How long published rows are kept (for `trace`) before the clean-up deletes them
    /// (default 0).
    pub fn keep_published(mut self, keep: Duration) -> Self {
        self.keep_published = keep;
        self
    }
    /// At most how many published rows one clean-up pass deletes (default 1,000).
    pub fn cleanup_batch(mut self, rows: u32) -> Self {
        self.cleanup_batch = i64::from(rows);
        self
    }
    /// This relay's name in the lane leases (default `relay-<host>-<pid>-<random>`).
    pub fn instance(mut self, instance: impl Into<String>) -> Self {
        self.instance = Some(instance.into());
        self
    }
    /// Whether to `LISTEN` for the writers' notifications (PostgreSQL; default on). Off, the
    /// relay polls only.
    pub fn listen(mut self, listen: bool) -> Self {
        self.listen = listen;
        self
    }
    /// A librdkafka producer property. `enable.idempotence` and `acks` cannot be changed.
    pub fn producer_config(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.producer.push((key.into(), value.into()));
        self
    }
    /// Testing aid: before it marks its first batch, the relay signals `arrived` and waits
    /// for `release` (a relay "frozen" between the broker's acknowledgement and the mark).
    #[doc(hidden)]
    pub fn __pause_before_first_mark(mut self, arrived: Arc<Notify>, release: Arc<Notify>) -> Self {
        self.pause = Some((arrived, release));
        self
    }

    /// Checks the settings and creates the producer.
    pub fn build(self) -> Result<Relay<DB>> {
        let brokers = self.brokers.ok_or_else(|| {
            Error::Config("the relay needs the Kafka brokers; call .brokers(\"host:9092\")".into())
        })?;
        if self.lanes == 0 || self.lanes > 4096 {
            return Err(Error::Config(format!(
                "the relay's lane count {} is out of range; use 1 to 4096 (default {DEFAULT_LANES})",
                self.lanes
            )));
        }
        if self.batch == 0 {
            return Err(Error::Config(
                "the relay's batch size must be at least 1".into(),
            ));
        }
        if self.lease < Duration::from_millis(300) {
            return Err(Error::Config(format!(
                "the relay's lease {:?} is too short; use at least 300 ms (default 10 s)",
                self.lease
            )));
        }
        for (key, _) in &self.producer {
            if key == "enable.idempotence" || key == "acks" {
                return Err(Error::Config(format!(
                    "the relay's producer setting `{key}` is fixed (enable.idempotence=true, acks=all); remove it"
                )));
            }
        }
        let store = Store::new(self.pool, &self.schema)?;
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "1");
        for (k, v) in &self.producer {
            config.set(k, v);
        }
        let producer: FutureProducer = config
            .create()
            .map_err(Error::kafka("creating the relay's producer"))?;
        let instance = self.instance.unwrap_or_else(|| {
            format!(
                "relay-{}-{:08x}",
                std::process::id(),
                crate::util::random_u64() as u32
            )
        });
        let (stop, _) = watch::channel(false);
        Ok(Relay {
            q: DB::outbox_queries(store.schema()),
            store,
            producer,
            lanes: self.lanes,
            batch: self.batch,
            lease: self.lease,
            poll_interval: self.poll_interval,
            keep_published: self.keep_published,
            cleanup_batch: self.cleanup_batch,
            instance,
            listen: self.listen,
            stop: Arc::new(stop),
            stats: Arc::new(Counters::default()),
            pause: Mutex::new(self.pause),
            wake: Arc::new(Notify::new()),
        })
    }
}

#[derive(Debug, Default)]
struct Counters {
    published: AtomicU64,
    sent: AtomicU64,
    parked: AtomicU64,
    fenced: AtomicU64,
    lanes: AtomicU64,
}

/// What a relay has done since it started: [`Relay::stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RelayStats {
    /// Rows acknowledged and marked published.
    pub published: u64,
    /// Records sent (a row sent twice counts twice).
    pub sent: u64,
    /// Rows parked.
    pub parked: u64,
    /// Lanes lost to another relay.
    pub fenced: u64,
    /// Lanes held now.
    pub lanes: u64,
}

/// A handle that stops a running [`Relay`]: [`Relay::shutdown_handle`].
#[derive(Debug, Clone)]
pub struct RelayShutdown(Arc<watch::Sender<bool>>);

impl RelayShutdown {
    /// Asks the relay to stop: it finishes the batch in flight, releases its lanes and
    /// returns from [`Relay::run`].
    pub fn shutdown(&self) {
        self.0.send_replace(true);
    }
}

/// A live view of a relay's counters: [`Relay::stats_handle`].
#[derive(Debug, Clone)]
pub struct RelayStatsHandle(Arc<Counters>);

impl RelayStatsHandle {
    /// The counters now.
    pub fn get(&self) -> RelayStats {
        let c = &self.0;
        RelayStats {
            published: c.published.load(Ordering::Relaxed),
            sent: c.sent.load(Ordering::Relaxed),
            parked: c.parked.load(Ordering::Relaxed),
            fenced: c.fenced.load(Ordering::Relaxed),
            lanes: c.lanes.load(Ordering::Relaxed),
        }
    }
}

/// Publishes the outbox to Kafka (see the [module](self) documentation).
pub struct Relay<DB: Backend> {
    store: Store<DB>,
    q: OutboxQueries,
    producer: FutureProducer,
    lanes: u32,
    batch: usize,
    lease: Duration,
    poll_interval: Duration,
    keep_published: Duration,
    cleanup_batch: i64,
    instance: String,
    listen: bool,
    stop: Arc<watch::Sender<bool>>,
    stats: Arc<Counters>,
    pause: Mutex<Option<(Arc<Notify>, Arc<Notify>)>>,
    wake: Arc<Notify>,
}

impl<DB: Backend> std::fmt::Debug for Relay<DB> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("instance", &self.instance)
            .field("schema", &self.q.schema)
            .field("lanes", &self.lanes)
            .finish_non_exhaustive()
    }
}

/// Where the relay's reads start (`seq >= lo`). Every row published leaves dead entries at the
/// head of the index of unpublished rows until VACUUM removes them, and a read from the start
/// walks all of them: a backlog of 200,000 rows written in one burst made each read of 500 rows
/// take 20 ms at first and 108 ms after 150,000. The floor skips them, and is safe against rows
/// that commit late with a lower `seq`: it rises to a read's first `seq` only once a later read
/// shows that every transaction that could have drawn a lower one has ended (its
/// `horizon_xmin` has reached the first read's own transaction id; see
/// [`PendingRow::horizon_xmax`]), and then no higher than that later read's own first row. It
/// falls back to 0 when the lanes held change and every [`Floor::RESET`], which also picks up
/// rows put back with `outbox retry`.
#[derive(Debug)]
struct Floor {
    lo: i64,
    /// A read's first `seq` and its own transaction id, waiting for the horizon to pass.
    candidate: Option<(i64, i64)>,
    lanes: Vec<i32>,
    reset_at: Instant,
}

impl Floor {
    const RESET: Duration = Duration::from_secs(5);

    fn new() -> Floor {
        Floor {
            lo: 0,
            candidate: None,
            lanes: Vec::new(),
            reset_at: Instant::now(),
        }
    }

    /// The floor of the next read of the lanes of `owned`.
    fn start(&mut self, owned: &BTreeMap<i32, i64>) -> i64 {
        let lanes: Vec<i32> = owned.keys().copied().collect();
        if lanes != self.lanes || self.reset_at.elapsed() >= Self::RESET {
            self.lanes = lanes;
            self.lo = 0;
            self.candidate = None;
            self.reset_at = Instant::now();
        }
        self.lo
    }

    /// After a read from the floor that returned `rows` (in `seq` order).
    fn advance(&mut self, rows: &[PendingRow]) {
        let Some(first) = rows.first() else {
            return;
        };
        if let Some((seq, xmax)) = self.candidate
            && first.horizon_xmin >= xmax
        {
            self.lo = self.lo.max(seq.min(first.seq));
            self.candidate = None;
        }
        if self.candidate.is_none() && first.seq > self.lo {
            self.candidate = Some((first.seq, first.horizon_xmax));
        }
    }
}

/// The (lane, epoch) pairs of the lanes held, as the lease statements take them.
fn leases(owned: &BTreeMap<i32, i64>) -> Vec<(i32, i64)> {
    owned.iter().map(|(&lane, &epoch)| (lane, epoch)).collect()
}

enum Pass {
    Idle,
    Some,
    Full,
}

impl<DB: Backend> Relay<DB> {
    /// A builder for a relay over `pool`'s outbox.
    pub fn builder(pool: Pool<DB>) -> RelayBuilder<DB> {
        RelayBuilder {
            pool,
            schema: crate::outbox::DEFAULT_SCHEMA.to_owned(),
            brokers: None,
            lanes: DEFAULT_LANES,
            batch: 500,
            lease: Duration::from_secs(10),
            poll_interval: Duration::from_secs(1),
            keep_published: Duration::ZERO,
            cleanup_batch: 1000,
            instance: None,
            listen: true,
            producer: Vec::new(),
            pause: None,
        }
    }

    /// This relay's instance name.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// A handle that stops [`Relay::run`].
    pub fn shutdown_handle(&self) -> RelayShutdown {
        RelayShutdown(self.stop.clone())
    }

    /// A live view of the relay's counters.
    pub fn stats_handle(&self) -> RelayStatsHandle {
        RelayStatsHandle(self.stats.clone())
    }

    /// The counters now.
    pub fn stats(&self) -> RelayStats {
        self.stats_handle().get()
    }

    /// Runs until [`RelayShutdown::shutdown`]: leases lanes, publishes their rows, cleans up
    /// published rows and keeps the metrics. A database or broker outage is waited out
    /// (logged, retried with backoff); only a configuration error (a lane count that differs
    /// from the outbox's, a schema behind) ends it early.
    pub async fn run(self) -> Result<()> {
        describe();
        self.store.check_schema().await?;
        self.init_lanes().await?;
        let mut stop = self.stop.subscribe();
        if *stop.borrow() {
            return Ok(());
        }
        let listener = self.spawn_listener();
        let mut owned: BTreeMap<i32, i64> = BTreeMap::new();
        let mut last_leases: Option<Instant> = None;
        let mut last_cleanup: Option<Instant> = None;
        let mut cleanup_behind = false;
        let mut floor = Floor::new();
        let mut last_metrics: Option<Instant> = None;
        let mut failures: u32 = 0;
        tracing::info!(instance = %self.instance, lanes = self.lanes, schema = %self.q.schema, "relay started");
        while !*stop.borrow() {
            let mut busy = false;
            let mut failed = false;
            if last_leases.is_none_or(|t| t.elapsed() >= self.lease / 3) {
                match self.maintain(&mut owned).await {
                    Ok(()) => last_leases = Some(Instant::now()),
                    Err(e) => {
                        tracing::warn!(error = %e, "relay: renewing lane leases failed; retrying");
                        failed = true;
                    }
                }
            }
            // One pass covers every lane held: a row waits for one read, one send and one
            // mark, not for a sweep of each lane's in turn.
            if !owned.is_empty() {
                match self.pass(&mut owned, &mut floor).await {
                    Ok(Pass::Idle | Pass::Some) => {}
                    Ok(Pass::Full) => busy = true,
                    Err(e) => {
                        tracing::warn!(error = %e, "relay: publishing failed; retrying");
                        failed = true;
                    }
                }
            }
            self.stats
                .lanes
                .store(owned.len() as u64, Ordering::Relaxed);
            // Every 500 ms, and at once again while the last clean-up found a full batch: the
            // deletes keep up with any publishing rate, not 1,000 rows per 500 ms.
            if cleanup_behind
                || last_cleanup.is_none_or(|t| t.elapsed() >= Duration::from_millis(500))
            {
                match DB::outbox_cleanup(
                    self.store.pool(),
                    &self.q,
                    self.keep_published.as_secs_f64(),
                    self.cleanup_batch,
                )
                .await
                {
                    Ok(n) => {
                        last_cleanup = Some(Instant::now());
                        cleanup_behind = n as i64 == self.cleanup_batch;
                        busy |= cleanup_behind;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "relay: cleaning up published rows failed");
                        cleanup_behind = false;
                        failed = true;
                    }
                }
            }
            if last_metrics.is_none_or(|t| t.elapsed() >= Duration::from_secs(2))
                && self.refresh_metrics(owned.len()).await.is_ok()
            {
                last_metrics = Some(Instant::now());
            }
            if failed {
                failures = failures.saturating_add(1);
                let backoff = Duration::from_millis(100 * 2u64.pow(failures.min(5)));
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.changed() => {}
                }
                continue;
            }
            failures = 0;
            if busy {
                continue;
            }
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(self.poll_interval) => {}
                _ = stop.changed() => {}
            }
        }
        if let Some(listener) = listener {
            listener.abort();
        }
        for (lane, epoch) in owned {
            let _ =
                DB::outbox_release(self.store.pool(), &self.q, lane, &self.instance, epoch).await;
        }
        let _ = DB::outbox_leave(self.store.pool(), &self.q, &self.instance).await;
        self.stats.lanes.store(0, Ordering::Relaxed);
        metrics::gauge!(LANES).set(0.0);
        tracing::info!(instance = %self.instance, "relay stopped");
        Ok(())
    }

    fn lost(&self, lane: i32, epoch: i64) {
        self.stats.fenced.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(FENCED).increment(1);
        tracing::warn!(lane, epoch, instance = %self.instance, "relay: lost the lane to another relay (fenced); its rows are theirs now");
    }

    async fn init_lanes(&self) -> Result<()> {
        let pool = self.store.pool();
        let context = "setting up the outbox's lanes";
        let count = || async {
            DB::outbox_lanes_count(pool, &self.q)
                .await
                .map_err(Error::db(context))
        };
        let mismatch = |existing: i64| {
            Error::Config(format!(
                "the outbox in `{}` has {existing} lanes, but this relay was given {}; pass --lanes {existing} \
                 (every relay of an outbox uses the outbox's lane count)",
                self.q.schema, self.lanes
            ))
        };
        let existing = count().await?;
        if existing == i64::from(self.lanes) {
            return Ok(());
        }
        if existing != 0 {
            return Err(mismatch(existing));
        }
        // The first relay: create the lanes (relays starting together create the same ones).
        DB::outbox_lane_init(pool, &self.q, self.lanes as i32)
            .await
            .map_err(Error::db(context))?;
        match count().await? {
            n if n == i64::from(self.lanes) => Ok(()),
            n => Err(mismatch(n)),
        }
    }

    /// Renews the lanes held, and takes or gives lanes so that every live relay holds its
    /// share.
    async fn maintain(&self, owned: &mut BTreeMap<i32, i64>) -> Result<()> {
        let pool = self.store.pool();
        let context = "leasing outbox lanes";
        let secs = self.lease.as_secs_f64();
        let live = DB::outbox_heartbeat(pool, &self.q, &self.instance, secs)
            .await
            .map_err(Error::db(context))?
            .max(1);
        let kept = self.renew(owned).await.map_err(Error::db(context))?;
        self.drop_lost(owned, &kept);
        let target = (self.lanes as usize).div_ceil(live as usize);
        while owned.len() > target {
            let (&lane, &epoch) = owned.iter().next_back().expect("not empty");
            DB::outbox_release(pool, &self.q, lane, &self.instance, epoch)
                .await
                .map_err(Error::db(context))?;
            owned.remove(&lane);
            tracing::info!(lane, "relay: released a lane for another relay");
        }
        if owned.len() < target {
            // Start at a lane of our own so that relays starting together spread out.
            let start = (crate::outbox::key_hash(self.instance.as_bytes()) % self.lanes) as i32;
            for i in 0..self.lanes as i32 {
                if owned.len() >= target {
                    break;
                }
                let lane = (start + i) % self.lanes as i32;
                if owned.contains_key(&lane) {
                    continue;
                }
                if let Some(epoch) = DB::outbox_acquire(pool, &self.q, lane, &self.instance, secs)
                    .await
                    .map_err(Error::db(context))?
                {
                    tracing::info!(lane, epoch, "relay: leased a lane");
                    owned.insert(lane, epoch);
                }
            }
        }
        metrics::gauge!(LANES).set(owned.len() as f64);
        Ok(())
    }

    /// Publishes one batch of the lanes held, oldest rows first; `owned` is renewed while the
    /// batch waits for the broker, so that a slow broker does not cost the relay its lanes,
    /// and loses the lanes found to be another relay's.
    async fn pass(&self, owned: &mut BTreeMap<i32, i64>, floor: &mut Floor) -> Result<Pass> {
        let pool = self.store.pool();
        let context = "publishing outbox rows";
        let secs = self.lease.as_secs_f64();
        let lanes = i64::from(self.lanes);
        // One statement reads the next rows of the lanes this relay holds and counts their
        // sends (so that `trace` says how many times a row went out).
        let from = floor.start(owned);
        let rows = DB::outbox_take(
            pool,
            &self.q,
            lanes,
            &self.instance,
            self.batch as i64,
            from,
        )
        .await
        .map_err(Error::db(context))?;
        if rows.is_empty() {
            return Ok(Pass::Idle);
        }
        floor.advance(&rows);
        let read_at = Instant::now();

        let outcomes = {
            let send = self.send(&rows);
            tokio::pin!(send);
            let mut renew = tokio::time::interval(self.lease / 3);
            renew.reset();
            loop {
                tokio::select! {
                    outcomes = &mut send => break outcomes,
                    _ = renew.tick() => self.renew_all(owned).await,
                }
            }
        };
        self.stats
            .sent
            .fetch_add(rows.len() as u64, Ordering::Relaxed);
        let pause = self.pause.lock().expect("not poisoned").take();
        if let Some((arrived, release)) = pause {
            arrived.notify_one();
            release.notified().await;
        }
        let mut acked = Vec::new();
        let mut parked = Vec::new();
        let mut transient = None;
        for (row, outcome) in rows.iter().zip(outcomes) {
            match outcome {
                Outcome::Acked { partition, offset } => acked.push((
                    row,
                    Acked {
                        s: row.seq,
                        p: partition,
                        o: offset,
                    },
                )),
                Outcome::Permanent(e) => parked.push((row, e)),
                Outcome::Transient(e) => transient = Some(e),
            }
        }
        // Every lane's lease is renewed and the rows of the lanes still held are marked in
        // one statement where the database has one (PostgreSQL), else in one transaction;
        // either way no row of a lane that is now another relay's is marked or parked.
        let held_before = leases(owned);
        let all: Vec<Acked> = acked.iter().map(|(_, a)| *a).collect();
        let fused = if parked.is_empty() {
            DB::outbox_mark_fenced(
                pool,
                &self.q,
                &self.instance,
                secs,
                &held_before,
                lanes,
                &all,
            )
            .await
            .map_err(Error::db(context))?
        } else {
            None
        };
        let held: Vec<i32> = match fused {
            Some(held) => held,
            None => {
                let mut tx = DB::begin(pool, CRATE).await.map_err(Error::db(context))?;
                let held = DB::outbox_renew(&mut tx, &self.q, &self.instance, &held_before, secs)
                    .await
                    .map_err(Error::db(context))?;
                let ours = |row: &PendingRow| held.contains(&row.lane(self.lanes));
                let marks: Vec<Acked> = acked
                    .iter()
                    .filter(|(row, _)| ours(row))
                    .map(|(_, a)| *a)
                    .collect();
                if !marks.is_empty() {
                    DB::outbox_mark(&mut tx, &self.q, &marks, &self.instance)
                        .await
                        .map_err(Error::db(context))?;
                }
                for (row, error) in parked.iter().filter(|(row, _)| ours(row)) {
                    DB::outbox_park(&mut tx, &self.q, row.seq, error)
                        .await
                        .map_err(Error::db(context))?;
                }
                tx.commit().await.map_err(Error::db(context))?;
                held
            }
        };
        self.drop_lost(owned, &held);
        let ours = |row: &PendingRow| held.contains(&row.lane(self.lanes));
        let waited = read_at.elapsed().as_secs_f64();
        let latency = metrics::histogram!(LATENCY);
        let mut published = 0u64;
        for (row, _) in acked.iter().filter(|(row, _)| ours(row)) {
            latency.record(row.age + waited);
            published += 1;
        }
        self.stats.published.fetch_add(published, Ordering::Relaxed);
        metrics::counter!(PUBLISHED).increment(published);
        let parked: Vec<_> = parked.into_iter().filter(|(row, _)| ours(row)).collect();
        for (row, error) in &parked {
            tracing::error!(id = %row.id, topic = %row.aggregatetype, %error, "relay: parked an outbox row that cannot be published");
        }
        self.stats
            .parked
            .fetch_add(parked.len() as u64, Ordering::Relaxed);
        if let Some(e) = transient {
            return Err(Error::Kafka {
                context: "publishing outbox rows (the unacknowledged rows are sent again)",
                source: e,
            });
        }
        Ok(if rows.len() == self.batch {
            Pass::Full
        } else {
            Pass::Some
        })
    }

    /// Renews every lane of `owned`, logging (not acting on) failures: a lane lost shows at
    /// the next mark or maintenance.
    async fn renew_all(&self, owned: &BTreeMap<i32, i64>) {
        if let Err(e) = self.renew(owned).await {
            tracing::debug!(error = %e, "relay: renewing the lanes' leases failed");
        }
    }

    /// Renews the leases of every lane of `owned` in one statement: the lanes still held.
    async fn renew(
        &self,
        owned: &BTreeMap<i32, i64>,
    ) -> std::result::Result<Vec<i32>, sqlx::Error> {
        let mut conn = self.store.pool().acquire().await?;
        let secs = self.lease.as_secs_f64();
        DB::outbox_renew(&mut conn, &self.q, &self.instance, &leases(owned), secs).await
    }

    /// Forgets (and counts as lost) the lanes of `owned` that are not in `held`.
    fn drop_lost(&self, owned: &mut BTreeMap<i32, i64>, held: &[i32]) {
        owned.retain(|&lane, &mut epoch| {
            let kept = held.contains(&lane);
            if !kept {
                self.lost(lane, epoch);
            }
            kept
        });
    }

    /// Sends the rows in order and waits for every acknowledgement.
    async fn send(&self, rows: &[PendingRow]) -> Vec<Outcome> {
        let mut pending = Vec::with_capacity(rows.len());
        for row in rows {
            let mut headers = OwnedHeaders::new_with_capacity(2).insert(Header {
                key: crate::outbox::EVENT_ID_HEADER,
                value: Some(row.id.as_bytes()),
            });
            if !row.kind.is_empty() {
                headers = headers.insert(Header {
                    key: crate::outbox::TYPE_HEADER,
                    value: Some(row.kind.as_bytes()),
                });
            }
            match crate::store::dead_letter::decode_headers(&row.headers) {
                Ok(list) => {
                    #[cfg(feature = "otel")]
                    let list = crate::trace_context::relayed(&row.aggregatetype, &row.id, list);
                    for (name, value) in &list {
                        headers = headers.insert(Header {
                            key: name,
                            value: value.as_deref(),
                        });
                    }
                }
                Err(e) => {
                    pending.push(Err(Outcome::Permanent(e)));
                    continue;
                }
            }
            let mut record: FutureRecord<'_, str, [u8]> =
                FutureRecord::to(&row.aggregatetype).headers(headers);
            if let Some(key) = &row.aggregateid {
                record = record.key(key.as_str());
            }
            if let Some(payload) = &row.payload {
                record = record.payload(payload.as_slice());
            }
            loop {
                match self.producer.send_result(record) {
                    Ok(delivery) => {
                        pending.push(Ok(delivery));
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        record = back;
                        self.producer.poll(Duration::from_millis(10));
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err((e, _)) => {
                        pending.push(Err(classify(e)));
                        break;
                    }
                }
            }
        }
        let mut out = Vec::with_capacity(pending.len());
        for p in pending {
            out.push(match p {
                Err(outcome) => outcome,
                Ok(delivery) => match delivery.await {
                    Ok(Ok(d)) => Outcome::Acked {
                        partition: d.partition,
                        offset: d.offset,
                    },
                    Ok(Err((e, _))) => classify(e),
                    Err(_) => Outcome::Transient(KafkaError::Canceled),
                },
            });
        }
        out
    }

    async fn refresh_metrics(&self, owned: usize) -> Result<()> {
        let pool = self.store.pool();
        let backlog = DB::outbox_backlog(pool, &self.q, i64::from(self.lanes))
            .await
            .map_err(Error::db("measuring the outbox"))?;
        let mut oldest: f64 = 0.0;
        let mut by_lane = vec![0i64; self.lanes as usize];
        for b in &backlog {
            if let Some(slot) = by_lane.get_mut(b.lane as usize) {
                *slot = b.rows;
            }
            oldest = oldest.max(b.oldest.unwrap_or(0.0));
        }
        for (lane, rows) in by_lane.iter().enumerate() {
            metrics::gauge!(BACKLOG, "lane" => lane.to_string()).set(*rows as f64);
        }
        metrics::gauge!(OLDEST).set(oldest);
        let parked = DB::outbox_parked_count(pool, &self.q)
            .await
            .map_err(Error::db("measuring the outbox"))?;
        metrics::gauge!(PARKED).set(parked as f64);
        metrics::gauge!(LANES).set(owned as f64);
        Ok(())
    }

    fn spawn_listener(&self) -> Option<tokio::task::JoinHandle<()>> {
        if !self.listen {
            return None;
        }
        DB::outbox_listen(self.store.pool(), &self.q, self.wake.clone())
    }
}

enum Outcome {
    Acked { partition: i32, offset: i64 },
    Permanent(String),
    Transient(KafkaError),
}

/// Whether a send error can never succeed for this record (park it) or may (send again).
fn classify(e: KafkaError) -> Outcome {
    use RDKafkaErrorCode as C;
    let code = match &e {
        KafkaError::MessageProduction(code) => Some(*code),
        _ => e.rdkafka_error_code(),
    };
    match code {
        Some(
            C::UnknownTopic
            | C::UnknownTopicOrPartition
            | C::UnknownPartition
            | C::InvalidTopic
            | C::TopicAuthorizationFailed
            | C::MessageSizeTooLarge
            | C::InvalidMessageSize
            | C::InvalidRecord
            | C::InvalidMessage,
        ) => Outcome::Permanent(e.to_string()),
        _ => Outcome::Transient(e),
    }
}

fn describe() {
    use metrics::Unit;
    metrics::describe_gauge!(BACKLOG, Unit::Count, "Unpublished outbox rows per lane");
    metrics::describe_gauge!(
        OLDEST,
        Unit::Seconds,
        "Age of the oldest unpublished outbox row"
    );
    metrics::describe_counter!(
        PUBLISHED,
        Unit::Count,
        "Outbox rows acknowledged by the broker and marked published"
    );
    metrics::describe_histogram!(
        LATENCY,
        Unit::Seconds,
        "Seconds from an outbox row's write to the broker's acknowledgement"
    );
    metrics::describe_gauge!(PARKED, Unit::Count, "Outbox rows parked as unpublishable");
    metrics::describe_counter!(FENCED, Unit::Count, "Outbox lanes lost to another relay");
    metrics::describe_gauge!(LANES, Unit::Count, "Outbox lanes this relay holds");
}
