//! Run with: `cargo run --example order_pipeline` (add `-- --database-url postgres://…` for
//! PostgreSQL; the default is a fresh SQLite file). Nothing to install: Kafka is librdkafka's
//! in-process mock cluster and the payment provider a small HTTP service on a loopback port.
//!
//! The transactional outbox end to end, with an external call at the end:
//!
//! 1. `payments` carries captured payments (10% of them published twice, as a retrying
//!    producer would).
//! 2. The order service consumes `payments`. In one transaction its handler marks the order
//!    paid (`paid = paid + 1`: deliberately not idempotent) and writes an `order-paid` event to
//!    the outbox; the runtime commits both with the dedup ledger row and the offset.
//! 3. The relay publishes the outbox to `order-paid` (at least once; each record carries the
//!    row's event id in its `event-id` header).
//! 4. The billing service consumes `order-paid` and charges the order at the payment provider
//!    over HTTP, with the event id as the `Idempotency-Key`. The provider is flaky on purpose:
//!    it drops some answers after charging and refuses some calls with 503, and the billing
//!    handler fails some transactions after a successful call; each time the call is retried
//!    with the same key, and the provider answers the retry from its memory.
//! 5. The self-check: every order paid exactly once in the database, charged exactly once at
//!    the provider, and its charge recorded exactly once; the retries are counted and shown.
//!    The exit status is non-zero if anything is off.

mod provider;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use consumer_runtime::rdkafka::config::ClientConfig;
use consumer_runtime::rdkafka::message::{Header, OwnedHeaders};
use consumer_runtime::rdkafka::mocking::MockCluster;
use consumer_runtime::rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use consumer_runtime::sqlx::{self, Pool, Postgres, Sqlite};
use consumer_runtime::{Backend, Context, DatabaseKind, Handler, HandlerError, Json, Runtime};

use provider::{CallError, Flakiness, Provider};

/// The schema (PostgreSQL) or table prefix (SQLite) of the runtime's own tables.
const SCHEMA: &str = "consumer_runtime";
const PAYMENTS: &str = "payments";
const ORDER_PAID: &str = "order-paid";
const PARTITIONS: i32 = 4;
const ORDERS_GROUP: &str = "order-service";
const BILLING_GROUP: &str = "billing";
const DEFAULT_ORDERS: usize = 500;
/// How long the pipeline may take to drain before the example gives up.
const LIMIT: Duration = Duration::from_secs(120);

/// The event on `payments`.
#[derive(serde::Deserialize)]
struct PaymentCaptured {
    order_id: String,
    cents: i64,
}

/// The event the order service emits on `order-paid`, through the outbox.
#[derive(serde::Serialize, serde::Deserialize)]
struct OrderPaid {
    order_id: String,
    cents: i64,
}

/// Consumes `payments`: the order is paid, and `order-paid` is emitted, in one transaction.
struct OrderService;

/// Consumes `order-paid`: charges the order at the provider, the event id as the
/// idempotency key.
struct Billing {
    provider: SocketAddr,
    /// Charge calls made (including retries).
    calls: Arc<AtomicU64>,
    /// Answers that said "replayed": a retried call, charged by an earlier one.
    replayed: Arc<AtomicU64>,
    /// Transactions failed on purpose after a successful call.
    failed_after_call: Arc<AtomicU64>,
    /// For one event in n (by its id's hash), the first try's transaction fails after a
    /// successful call (as if the database write after it failed): the runtime rolls the
    /// batch back and runs it again, which calls again.
    fail_after_call_every: u64,
}

const PAY: &str = "UPDATE orders SET status = 'paid', paid = paid + 1 WHERE order_id = $1";
const RECORD_CHARGE: &str = "INSERT INTO order_charges (order_id, charge_id, recorded)
     VALUES ($1, $2, 1)
     ON CONFLICT (order_id) DO UPDATE SET recorded = order_charges.recorded + 1";

/// Implements the handlers and [`ExampleDb`] for a database; `$tables` is how the runtime's
/// tables are named there (`consumer_runtime.` schema or `consumer_runtime_` prefix).
macro_rules! for_database {
    ($db:ty, $name:literal, $pool_size:literal, $tables:literal) => {
        impl Handler<$db> for OrderService {
            type Event = Json<PaymentCaptured>;

            async fn handle(
                &self,
                ctx: &mut Context<'_, $db>,
                Json(p): Json<PaymentCaptured>,
            ) -> Result<(), HandlerError> {
                let updated = sqlx::query(PAY)
                    .bind(&p.order_id)
                    .execute(ctx.conn())
                    .await?
                    .rows_affected();
                if updated != 1 {
                    return Err(HandlerError::reject(format!(
                        "a payment for an unknown order {}",
                        p.order_id
                    )));
                }
                // The event for the next service, in the same transaction: it exists if and
                // only if the order is paid.
                let event = consumer_runtime::outbox::Message::new(ORDER_PAID)
                    .key(p.order_id.clone())
                    .json(&OrderPaid {
                        order_id: p.order_id,
                        cents: p.cents,
                    })
                    .map_err(HandlerError::reject)?;
                ctx.publish(&event).await?;
                Ok(())
            }
        }

        impl Handler<$db> for Billing {
            type Event = Json<OrderPaid>;

            async fn handle(
                &self,
                ctx: &mut Context<'_, $db>,
                Json(e): Json<OrderPaid>,
            ) -> Result<(), HandlerError> {
                let key = ctx.record().event_id().to_owned();
                self.calls.fetch_add(1, Ordering::Relaxed);
                let charged =
                    match provider::charge(self.provider, &key, &e.order_id, e.cents).await {
                        Ok(c) => c,
                        // Did the charge happen? Unknown: retry with the same key.
                        Err(e @ (CallError::NoAnswer(_) | CallError::Unavailable(..))) => {
                            return Err(HandlerError::retry_after(e, Duration::from_millis(20)));
                        }
                        Err(e @ CallError::Refused(..)) => return Err(HandlerError::reject(e)),
                    };
                if charged.replayed {
                    self.replayed.fetch_add(1, Ordering::Relaxed);
                }
                sqlx::query(RECORD_CHARGE)
                    .bind(&e.order_id)
                    .bind(&charged.charge_id)
                    .execute(ctx.conn())
                    .await?;
                if ctx.attempt() == 1
                    && provider::pick(&format!("fail:{key}"), self.fail_after_call_every)
                {
                    self.failed_after_call.fetch_add(1, Ordering::Relaxed);
                    // The call succeeded but this transaction will not commit: the runtime
                    // rolls it back and runs the handler again, which calls again.
                    return Err(HandlerError::retry_after(
                        "a simulated failure after the provider's answer",
                        Duration::from_millis(20),
                    ));
                }
                Ok(())
            }
        }

        impl ExampleDb for $db {
            const LABEL: &'static str = $name;
            const POOL_SIZE: u32 = $pool_size;

            async fn reset(pool: &Pool<Self>, orders: usize) -> anyhow::Result<()> {
                for statement in [
                    "DROP TABLE IF EXISTS orders",
                    "DROP TABLE IF EXISTS order_charges",
                    "CREATE TABLE orders (order_id TEXT PRIMARY KEY, cents BIGINT NOT NULL,
                         status TEXT NOT NULL, paid INTEGER NOT NULL)",
                    "CREATE TABLE order_charges (order_id TEXT PRIMARY KEY,
                         charge_id TEXT NOT NULL, recorded INTEGER NOT NULL)",
                ] {
                    sqlx::query(statement).execute(pool).await?;
                }
                for chunk in (0..orders).collect::<Vec<_>>().chunks(200) {
                    let mut tx = pool.begin().await?;
                    for i in chunk {
                        sqlx::query(
                            "INSERT INTO orders (order_id, cents, status, paid)
                             VALUES ($1, $2, 'open', 0)",
                        )
                        .bind(order_id(*i))
                        .bind(cents(*i))
                        .execute(&mut *tx)
                        .await?;
                    }
                    tx.commit().await?;
                }
                for (table, group) in [
                    ("processed", ORDERS_GROUP),
                    ("processed", BILLING_GROUP),
                    ("consumer_offsets", ORDERS_GROUP),
                    ("consumer_offsets", BILLING_GROUP),
                    ("dead_letters", ORDERS_GROUP),
                    ("dead_letters", BILLING_GROUP),
                ] {
                    // The ledger keys its rows by a short group id, not the group's name.
                    let sql = if table == "processed" {
                        format!(
                            "DELETE FROM {t}processed WHERE group_id = \
                             (SELECT group_id FROM {t}ledger_groups WHERE name = $1)",
                            t = $tables
                        )
                    } else {
                        format!("DELETE FROM {}{table} WHERE consumer_group = $1", $tables)
                    };
                    sqlx::query(sqlx::AssertSqlSafe(sql))
                        .bind(group)
                        .execute(pool)
                        .await?;
                }
                let sql = format!("DELETE FROM {}outbox WHERE aggregatetype = $1", $tables);
                sqlx::query(sqlx::AssertSqlSafe(sql))
                    .bind(ORDER_PAID)
                    .execute(pool)
                    .await?;
                // Leases of an earlier run's relay would hold the lanes for their lease.
                let sql = format!("DELETE FROM {}outbox_lanes", $tables);
                sqlx::query(sqlx::AssertSqlSafe(sql)).execute(pool).await?;
                Ok(())
            }

            async fn orders(pool: &Pool<Self>) -> anyhow::Result<Vec<(String, String, i64)>> {
                Ok(
                    sqlx::query_as("SELECT order_id, status, CAST(paid AS BIGINT) FROM orders")
                        .fetch_all(pool)
                        .await?,
                )
            }

            async fn charges(pool: &Pool<Self>) -> anyhow::Result<Vec<(String, String, i64)>> {
                Ok(sqlx::query_as(
                    "SELECT order_id, charge_id, CAST(recorded AS BIGINT) FROM order_charges",
                )
                .fetch_all(pool)
                .await?)
            }

            async fn pending_order_paid(pool: &Pool<Self>) -> anyhow::Result<i64> {
                let sql = format!(
                    "SELECT count(*) FROM {}outbox
                     WHERE aggregatetype = $1 AND published_at IS NULL AND parked_at IS NULL",
                    $tables
                );
                Ok(sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
                    .bind(ORDER_PAID)
                    .fetch_one(pool)
                    .await?)
            }
        }
    };
}

for_database!(Postgres, "PostgreSQL", 8, "consumer_runtime.");
for_database!(Sqlite, "SQLite", 4, "consumer_runtime_");

/// The example's own SQL, per database; everything else is generic over the database.
trait ExampleDb: Backend {
    const LABEL: &'static str;
    const POOL_SIZE: u32;
    /// (Re)creates the example's tables with `orders` open orders and forgets both groups'
    /// ledgers, offsets and the outbox's `order-paid` rows.
    async fn reset(pool: &Pool<Self>, orders: usize) -> anyhow::Result<()>;
    /// Every order: id, status, how many times it was paid.
    async fn orders(pool: &Pool<Self>) -> anyhow::Result<Vec<(String, String, i64)>>;
    /// Every recorded charge: order id, charge id, how many times it was recorded.
    async fn charges(pool: &Pool<Self>) -> anyhow::Result<Vec<(String, String, i64)>>;
    /// The `order-paid` outbox rows not yet published.
    async fn pending_order_paid(pool: &Pool<Self>) -> anyhow::Result<i64>;
}

fn order_id(i: usize) -> String {
    format!("order-{i:05}")
}

fn cents(i: usize) -> i64 {
    500 + (i as i64 * 7_919) % 50_000
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // The retries are deliberate and each logs a warning; `RUST_LOG=warn` shows them.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let Some(args) = Args::parse(std::env::args().skip(1))? else {
        println!("{}", usage());
        return Ok(());
    };
    let report = match args.kind {
        DatabaseKind::Postgres => run::<Postgres>(&args).await?,
        _ => run::<Sqlite>(&args).await?,
    };
    report.print();
    report.verdict()
}

struct Args {
    kind: DatabaseKind,
    database_url: String,
    /// The default SQLite file, deleted before the run.
    fresh_file: Option<PathBuf>,
    orders: usize,
}

fn default_file() -> PathBuf {
    std::env::temp_dir().join("consumer-runtime-order-pipeline.db")
}

fn usage() -> String {
    format!(
        "usage: cargo run --example order_pipeline [-- FLAGS]

  --database-url URL  sqlite:PATH or postgres://USER@HOST/DB
                      (default: a fresh SQLite file, {});
                      in a database you name, the example recreates its tables orders and
                      order_charges and clears its groups' offsets and ledgers
  --orders N          how many orders to pay (default {DEFAULT_ORDERS})
  --help              this text",
        default_file().display()
    )
}

impl Args {
    /// `None` for `--help`.
    fn parse(args: impl IntoIterator<Item = String>) -> anyhow::Result<Option<Args>> {
        let mut url = None;
        let mut orders = DEFAULT_ORDERS;
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            let (flag, inline) = match arg.split_once('=') {
                Some((flag, value)) if flag.starts_with("--") => (flag, Some(value.to_owned())),
                _ => (arg.as_str(), None),
            };
            let mut value = || {
                inline
                    .clone()
                    .or_else(|| args.next())
                    .with_context(|| format!("{flag} needs a value"))
            };
            match flag {
                "--help" | "-h" => return Ok(None),
                "--database-url" => url = Some(value()?),
                "--orders" => {
                    let v = value()?;
                    orders = v.parse().ok().filter(|n| *n > 0).with_context(|| {
                        format!("--orders wants a positive whole number, not `{v}`")
                    })?;
                }
                other => bail!(
                    "unexpected argument `{other}`; the flags are --database-url URL, --orders N and --help"
                ),
            }
        }
        let (database_url, fresh_file) = match url {
            Some(url) => (url, None),
            None => {
                let file = default_file();
                (format!("sqlite://{}", file.display()), Some(file))
            }
        };
        let kind = DatabaseKind::from_url(&database_url)?;
        Ok(Some(Args {
            kind,
            database_url,
            fresh_file,
            orders,
        }))
    }
}

/// What a run found.
struct Report {
    label: &'static str,
    orders: usize,
    payments_published: usize,
    relay_published: u64,
    relay_sends: u64,
    billing_calls: u64,
    /// Answers billing got that said "replayed".
    billing_replayed: u64,
    /// Billing transactions failed on purpose after a successful call.
    failed_after_call: u64,
    provider: provider::Ledger,
    /// Orders paid 0 or more than 1 times in the database.
    paid_wrong: Vec<String>,
    /// Orders charged 0 or more than 1 times at the provider.
    charged_wrong: Vec<String>,
    /// Orders whose charge was recorded 0 or more than 1 times, or with another charge id.
    recorded_wrong: Vec<String>,
    wall: Duration,
}

impl Report {
    fn print(&self) {
        let row = |label: &str, value: &dyn std::fmt::Display| println!("  {label:<54}{value}");
        println!(
            "order_pipeline: {} orders, {} (payments -> order service -> outbox -> relay -> order-paid -> billing -> payment provider)",
            self.orders, self.label
        );
        row(
            "payments published (incl. producer duplicates)",
            &self.payments_published,
        );
        row(
            "order-paid rows published by the relay (sends)",
            &format!("{} ({})", self.relay_published, self.relay_sends),
        );
        row(
            "charge calls by billing (incl. retries)",
            &self.billing_calls,
        );
        row(
            "  answers dropped by the provider after charging",
            &self.provider.dropped_answers,
        );
        row(
            "  calls refused by the provider with 503",
            &self.provider.refused,
        );
        row(
            "  retried calls answered from the idempotency memory",
            &self.provider.replays,
        );
        row(
            "answers billing got marked replayed (charged before)",
            &self.billing_replayed,
        );
        let charges: u32 = self.provider.charges.values().sum();
        row("charges made by the provider", &charges);
        row(
            "billing transactions failed after a successful call",
            &self.failed_after_call,
        );
        row("orders paid != 1 time", &self.paid_wrong.len());
        row("orders charged != 1 time", &self.charged_wrong.len());
        row(
            "orders whose charge is recorded != 1 time",
            &self.recorded_wrong.len(),
        );
        row("wall time", &format!("{:.1} s", self.wall.as_secs_f64()));
        match self.failures() {
            None => row(
                "result",
                &"OK: every order paid once, charged once, its charge recorded once",
            ),
            Some(f) => row("result", &format!("FAILED: {f}")),
        }
    }

    fn failures(&self) -> Option<String> {
        let mut out = Vec::new();
        for (what, list) in [
            ("paid", &self.paid_wrong),
            ("charged", &self.charged_wrong),
            ("recorded", &self.recorded_wrong),
        ] {
            if !list.is_empty() {
                let some: Vec<&str> = list.iter().take(3).map(String::as_str).collect();
                out.push(format!(
                    "{} orders {what} not exactly once (e.g. {})",
                    list.len(),
                    some.join(", ")
                ));
            }
        }
        (!out.is_empty()).then(|| out.join("; "))
    }

    fn verdict(&self) -> anyhow::Result<()> {
        match self.failures() {
            None => Ok(()),
            Some(f) => bail!("self-check failed: {f}"),
        }
    }
}

async fn run<DB: ExampleDb>(args: &Args) -> anyhow::Result<Report>
where
    OrderService: Handler<DB>,
    Billing: Handler<DB>,
{
    let started = Instant::now();
    let n = args.orders;
    if let Some(file) = &args.fresh_file {
        for path in [
            file.clone(),
            PathBuf::from(format!("{}-wal", file.display())),
            PathBuf::from(format!("{}-shm", file.display())),
        ] {
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
            }
        }
    }

    let cluster = MockCluster::new(1).context("starting the mock Kafka cluster")?;
    for topic in [PAYMENTS, ORDER_PAID] {
        cluster
            .create_topic(topic, PARTITIONS, 1)
            .with_context(|| format!("creating the topic {topic}"))?;
    }
    let brokers = cluster.bootstrap_servers();

    let pool = consumer_runtime::connect::<DB>(&args.database_url, DB::POOL_SIZE).await?;
    consumer_runtime::migrate(&pool, SCHEMA)
        .await
        .context("creating the runtime's tables")?;
    DB::reset(&pool, n)
        .await
        .context("creating the example's tables orders and order_charges")?;

    let provider = Provider::start(Flakiness {
        drop_answer_every: 10,
        refuse_every: 10,
    })
    .await?;
    let payments_published = publish(&brokers, n).context("publishing the payments")?;
    let calls = Arc::new(AtomicU64::new(0));
    let replayed = Arc::new(AtomicU64::new(0));
    let failed_after_call = Arc::new(AtomicU64::new(0));

    let orders = Runtime::builder(OrderService)
        .pool(pool.clone())
        .brokers(&brokers)
        .group(ORDERS_GROUP)
        .topic(PAYMENTS)
        .schema(SCHEMA)
        .handle_signals(false)
        .kafka_config("session.timeout.ms", "3000")
        .kafka_config("heartbeat.interval.ms", "1000")
        .build()
        .context("building the order service")?;
    let billing = Runtime::builder(Billing {
        provider: provider.addr(),
        calls: calls.clone(),
        replayed: replayed.clone(),
        failed_after_call: failed_after_call.clone(),
        fail_after_call_every: 10,
    })
    .pool(pool.clone())
    .brokers(&brokers)
    .group(BILLING_GROUP)
    .topic(ORDER_PAID)
    .schema(SCHEMA)
    // One record per transaction: a call that must be retried rolls back only its own
    // record's transaction, not a batch of calls that went through.
    .batch_size(1)
    .handle_signals(false)
    .kafka_config("session.timeout.ms", "3000")
    .kafka_config("heartbeat.interval.ms", "1000")
    .build()
    .context("building the billing service")?;
    let relay = relay(&pool, &brokers)?;

    let stops = [orders.shutdown_handle(), billing.shutdown_handle()];
    let relay_stop = relay.shutdown_handle();
    let relay_stats = relay.stats_handle();
    let services = async {
        let (a, b, r) = tokio::join!(orders.run(), billing.run(), relay.run());
        a.context("the order service failed")?;
        b.context("the billing service failed")?;
        r.context("the relay failed")?;
        anyhow::Ok(())
    };
    let drained = async {
        wait_drained::<DB>(&pool, &brokers, &cluster_ends(&brokers, PAYMENTS)?).await?;
        for s in &stops {
            s.shutdown();
        }
        relay_stop.shutdown();
        anyhow::Ok(())
    };
    let (ran, drained) = tokio::join!(services, drained);
    drained?;
    ran?;

    let relay_stats = relay_stats.get();
    let ledger = provider.ledger();
    let (mut paid_wrong, mut charged_wrong, mut recorded_wrong) = (vec![], vec![], vec![]);
    let orders: HashMap<String, (String, i64)> = DB::orders(&pool)
        .await?
        .into_iter()
        .map(|(id, status, paid)| (id, (status, paid)))
        .collect();
    let recorded: HashMap<String, (String, i64)> = DB::charges(&pool)
        .await?
        .into_iter()
        .map(|(id, charge, times)| (id, (charge, times)))
        .collect();
    for i in 0..n {
        let id = order_id(i);
        if !matches!(orders.get(&id), Some((status, 1)) if status == "paid") {
            paid_wrong.push(format!("{id}: {:?}", orders.get(&id)));
        }
        let charged = ledger.charges.get(&id).copied().unwrap_or(0);
        if charged != 1 {
            charged_wrong.push(format!("{id}: {charged}x"));
        }
        if !matches!(recorded.get(&id), Some((_, 1))) {
            recorded_wrong.push(format!("{id}: {:?}", recorded.get(&id)));
        }
    }
    Ok(Report {
        label: DB::LABEL,
        orders: n,
        payments_published,
        relay_published: relay_stats.published,
        relay_sends: relay_stats.sent,
        billing_calls: calls.load(Ordering::Relaxed),
        billing_replayed: replayed.load(Ordering::Relaxed),
        failed_after_call: failed_after_call.load(Ordering::Relaxed),
        provider: ledger,
        paid_wrong,
        charged_wrong,
        recorded_wrong,
        wall: started.elapsed(),
    })
}

/// The relay of the runtime's outbox to Kafka, in this process. (The generated program runs
/// it as `relay`, or in `run`'s process.)
fn relay<DB: Backend>(
    pool: &Pool<DB>,
    brokers: &str,
) -> anyhow::Result<consumer_runtime::relay::Relay<DB>> {
    consumer_runtime::relay::Relay::builder(pool.clone())
        .brokers(brokers)
        .schema(SCHEMA)
        // SQLite has no LISTEN/NOTIFY: the relay polls (PostgreSQL wakes it at each commit).
        .poll_interval(Duration::from_millis(100))
        .build()
        .context("building the relay")
}

/// Each partition's end offset of `topic`.
fn cluster_ends(brokers: &str, topic: &str) -> anyhow::Result<Vec<i64>> {
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .context("creating a client")?;
    (0..PARTITIONS)
        .map(|p| {
            let (_, high) = producer
                .client()
                .fetch_watermarks(topic, p, Duration::from_secs(10))
                .with_context(|| format!("reading {topic}'s high watermarks"))?;
            Ok(high)
        })
        .collect()
}

/// Waits until the order service has consumed every payment, the outbox holds nothing
/// unpublished and billing has consumed every `order-paid` record.
async fn wait_drained<DB: ExampleDb>(
    pool: &Pool<DB>,
    brokers: &str,
    payment_ends: &[i64],
) -> anyhow::Result<()> {
    let deadline = Instant::now() + LIMIT;
    let store = consumer_runtime::Store::new(pool.clone(), SCHEMA)?;
    let at_ends = async |group: &str, topic: &str, ends: &[i64]| -> anyhow::Result<bool> {
        let stored = store.stored_offsets(group).await?;
        Ok((0..PARTITIONS).all(|p| {
            let at = stored
                .iter()
                .find(|s| s.topic == topic && s.partition == p)
                .and_then(|s| s.next_offset)
                .unwrap_or(0);
            at == ends[p as usize]
        }))
    };
    let mut progress = String::new();
    while Instant::now() < deadline {
        let orders_done = at_ends(ORDERS_GROUP, PAYMENTS, payment_ends).await?;
        let backlog = DB::pending_order_paid(pool).await?;
        if orders_done && backlog == 0 {
            let ends = cluster_ends(brokers, ORDER_PAID)?;
            if at_ends(BILLING_GROUP, ORDER_PAID, &ends).await? {
                return Ok(());
            }
            progress = format!("billing has not reached order-paid's ends {ends:?}");
        } else {
            progress = format!(
                "order service caught up: {orders_done}; outbox rows not yet published: {backlog}"
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bail!(
        "the pipeline did not drain within {} s: {progress}",
        LIMIT.as_secs()
    )
}

/// Publishes one payment per order, every 10th twice (a producer retry with the same event
/// id); returns how many records were sent.
fn publish(brokers: &str, n: usize) -> anyhow::Result<usize> {
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .context("creating the producer")?;
    let mut sent = 0;
    for i in (0..n).chain((0..n).step_by(10)) {
        let id = format!("pay-{i:05}");
        let order = order_id(i);
        let payload = format!(r#"{{"order_id":"{order}","cents":{}}}"#, cents(i));
        let headers = OwnedHeaders::new().insert(Header {
            key: "event-id",
            value: Some(&id),
        });
        loop {
            let record = BaseRecord::to(PAYMENTS)
                .key(order.as_str())
                .payload(payload.as_str())
                .headers(headers.clone());
            match producer.send(record) {
                Ok(()) => break,
                Err((e, _))
                    if e.rdkafka_error_code()
                        == Some(consumer_runtime::rdkafka::types::RDKafkaErrorCode::QueueFull) =>
                {
                    producer.poll(Duration::from_millis(10));
                }
                Err((e, _)) => return Err(e).context("producing a payment"),
            }
        }
        sent += 1;
    }
    producer
        .flush(Duration::from_secs(30))
        .context("flushing the producer")?;
    Ok(sent)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The whole pipeline on SQLite with a flaky provider: every order is paid, charged and
    /// recorded exactly once although calls were retried (answers dropped after charging,
    /// 503s, transactions failed after the call).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_order_is_charged_once_though_calls_are_retried() {
        let file =
            std::env::temp_dir().join(format!("order-pipeline-test-{}.db", std::process::id()));
        let args = Args {
            kind: DatabaseKind::Sqlite,
            database_url: format!("sqlite://{}", file.display()),
            fresh_file: Some(file.clone()),
            orders: 120,
        };
        let report = run::<Sqlite>(&args).await.expect("the pipeline runs");
        report.print();
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", file.display()));
        }
        assert_eq!(report.failures(), None);
        // The retries happened: without them the test would prove nothing.
        assert!(report.provider.dropped_answers > 0, "no answer was dropped");
        assert!(
            report.failed_after_call > 0,
            "no transaction failed after a call"
        );
        assert!(
            report.provider.replays >= report.provider.dropped_answers + report.failed_after_call,
            "every dropped answer and failed transaction must have been retried"
        );
        assert!(report.billing_calls > report.orders as u64);
    }
}
