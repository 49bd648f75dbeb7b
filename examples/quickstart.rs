//! The quickstart: `cargo run --example quickstart`. It needs no services: Kafka is librdkafka's
//! in-process mock cluster, and the database a fresh SQLite file (or PostgreSQL with
//! `--database-url postgres://user@host/db`).
//!
//! 1. Publishes 3,000 payment events (`--events N`) to a 4-partition topic, and 10% of them a
//!    second time with the same event id, as a producer retrying an unacknowledged send would.
//! 2. Consumes them with a handler whose effect is NOT idempotent (`applied = applied + 1`), so
//!    that any double application shows in the database.
//! 3. Crashes the consumer a third of the way through (drops it without a shutdown: its open
//!    transactions roll back), then starts a new one for the same group, which resumes from the
//!    offsets stored in the database.
//! 4. Rewinds the group to offset 0 with `consumer_runtime::set_offsets` while that consumer
//!    runs: it notices, reloads and consumes everything again (a replay), applying nothing.
//! 5. Checks in the database that every payment was applied exactly once and prints a table;
//!    exits non-zero if anything is off.

use std::collections::HashMap;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use consumer_runtime::error::redact_url;
use consumer_runtime::rdkafka::config::ClientConfig;
use consumer_runtime::rdkafka::message::{Header, OwnedHeaders};
use consumer_runtime::rdkafka::mocking::MockCluster;
use consumer_runtime::rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use consumer_runtime::sqlx::{self, Pool, Postgres, Sqlite};
use consumer_runtime::{Backend, Context, DatabaseKind, Handler, HandlerError, Json, Runtime};

/// The schema (PostgreSQL) or table prefix (SQLite) of the runtime's own tables.
const SCHEMA: &str = "consumer_runtime";
const TOPIC: &str = "payments";
const PARTITIONS: i32 = 4;
const GROUP: &str = "quickstart";
const DEFAULT_EVENTS: usize = 3_000;
/// Every 10th payment is published again this many events later (a producer retry).
const RETRY_LAG: usize = 500;
/// How long any one phase may take before the example gives up.
const LIMIT: Duration = Duration::from_secs(60);

/// The event on the topic.
#[derive(serde::Deserialize)]
struct PaymentCaptured {
    payment_id: String,
    account: String,
    cents: i64,
    currency: String,
}

/// The handler. `calls` counts its invocations, including those whose transaction later rolled
/// back; the runtime's `Stats` count the committed ones.
struct Payments {
    calls: Arc<AtomicU64>,
}

/// The effect: record the payment, and count how many times it was applied. Applying a payment
/// twice would leave `applied = 2`: the statement is deliberately not idempotent.
const APPLY: &str =
    "INSERT INTO quickstart_payments (payment_id, account, cents, currency, applied)
     VALUES ($1, $2, $3, $4, 1)
     ON CONFLICT (payment_id) DO UPDATE SET applied = quickstart_payments.applied + 1";

const CREATE_TABLE: &str = "CREATE TABLE quickstart_payments (payment_id TEXT PRIMARY KEY,
     account TEXT NOT NULL, cents BIGINT NOT NULL, currency TEXT NOT NULL, applied INTEGER NOT NULL)";

/// The example's own SQL, per database; everything else is generic over the database.
trait ExampleDb: Backend {
    /// The database's name, for the output.
    const LABEL: &'static str;
    /// The connection pool's size (SQLite writes one transaction at a time anyway).
    const POOL_SIZE: u32;
    /// (Re)creates the example's table and forgets the group's ledger and offsets, so that
    /// every run starts from scratch.
    async fn reset(pool: &Pool<Self>) -> anyhow::Result<()>;
    /// Every payment in the table with how many times it was applied.
    async fn payments(pool: &Pool<Self>) -> anyhow::Result<Vec<(String, i64)>>;
    /// How many event ids the group's dedup ledger holds.
    async fn ledger_rows(pool: &Pool<Self>) -> anyhow::Result<i64>;
}

/// Implements the handler and [`ExampleDb`] for a database; `$tables` is how the runtime's
/// tables are named there (`consumer_runtime.` schema or `consumer_runtime_` prefix).
macro_rules! for_database {
    ($db:ty, $name:literal, $pool_size:literal, $tables:literal) => {
        impl Handler<$db> for Payments {
            type Event = Json<PaymentCaptured>;

            async fn handle(
                &self,
                ctx: &mut Context<'_, $db>,
                Json(p): Json<PaymentCaptured>,
            ) -> Result<(), HandlerError> {
                if p.cents <= 0 {
                    return Err(HandlerError::reject("a captured payment must be positive"));
                }
                let calls = self.calls.fetch_add(1, Ordering::Relaxed) + 1;
                sqlx::query(APPLY)
                    .bind(&p.payment_id)
                    .bind(&p.account)
                    .bind(p.cents)
                    .bind(&p.currency)
                    .execute(ctx.conn())
                    .await?;
                // Some work per payment (~0.5 ms), so that the crash lands mid-stream.
                if calls % 2 == 0 {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Ok(())
            }
        }

        impl ExampleDb for $db {
            const LABEL: &'static str = $name;
            const POOL_SIZE: u32 = $pool_size;

            async fn reset(pool: &Pool<Self>) -> anyhow::Result<()> {
                sqlx::query("DROP TABLE IF EXISTS quickstart_payments")
                    .execute(pool)
                    .await?;
                sqlx::query(CREATE_TABLE).execute(pool).await?;
                for statement in [
                    concat!(
                        "DELETE FROM ",
                        $tables,
                        "processed WHERE group_id = (SELECT group_id FROM ",
                        $tables,
                        "ledger_groups WHERE name = $1)"
                    ),
                    concat!(
                        "DELETE FROM ",
                        $tables,
                        "consumer_offsets WHERE consumer_group = $1"
                    ),
                ] {
                    sqlx::query(statement).bind(GROUP).execute(pool).await?;
                }
                Ok(())
            }

            async fn payments(pool: &Pool<Self>) -> anyhow::Result<Vec<(String, i64)>> {
                Ok(sqlx::query_as(
                    "SELECT payment_id, CAST(applied AS BIGINT) FROM quickstart_payments",
                )
                .fetch_all(pool)
                .await?)
            }

            async fn ledger_rows(pool: &Pool<Self>) -> anyhow::Result<i64> {
                Ok(sqlx::query_scalar(concat!(
                    "SELECT count(*) FROM ",
                    $tables,
                    "processed WHERE group_id = (SELECT group_id FROM ",
                    $tables,
                    "ledger_groups WHERE name = $1)"
                ))
                .bind(GROUP)
                .fetch_one(pool)
                .await?)
            }
        }
    };
}

for_database!(Postgres, "PostgreSQL", 8, "consumer_runtime.");
for_database!(Sqlite, "SQLite", 4, "consumer_runtime_");

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let Some(args) = Args::parse(std::env::args().skip(1))? else {
        println!("{}", usage());
        return Ok(());
    };
    match args.kind {
        DatabaseKind::Postgres => run::<Postgres>(&args).await,
        _ => run::<Sqlite>(&args).await,
    }
}

struct Args {
    kind: DatabaseKind,
    database_url: String,
    /// The default SQLite file, deleted before the run.
    fresh_file: Option<PathBuf>,
    events: usize,
}

fn default_file() -> PathBuf {
    std::env::temp_dir().join("consumer-runtime-quickstart.db")
}

fn usage() -> String {
    format!(
        "usage: cargo run --example quickstart [-- FLAGS]

  --database-url URL  sqlite:PATH or postgres://USER@HOST/DB
                      (default: a fresh SQLite file, {});
                      in a database you name, the example recreates its table
                      quickstart_payments and clears its group's offsets and ledger
  --events N          how many payments to publish (default {DEFAULT_EVENTS}), plus 10% duplicates
  --help              this text",
        default_file().display()
    )
}

impl Args {
    /// `None` for `--help`.
    fn parse(args: impl IntoIterator<Item = String>) -> anyhow::Result<Option<Args>> {
        let mut url = None;
        let mut events = DEFAULT_EVENTS;
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            // Both `--flag value` and `--flag=value`.
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
                "--events" => {
                    let v = value()?;
                    events = v.parse().ok().filter(|n| *n > 0).with_context(|| {
                        format!("--events wants a positive whole number, not `{v}`")
                    })?;
                }
                other if other.starts_with('-') => bail!(
                    "unknown flag `{other}`; the flags are --database-url URL, --events N and --help"
                ),
                other => bail!(
                    "unexpected argument `{other}`; the flags are --database-url URL, --events N and --help"
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
            events,
        }))
    }
}

async fn run<DB: ExampleDb>(args: &Args) -> anyhow::Result<()>
where
    Payments: Handler<DB>,
{
    let started = Instant::now();
    let n = args.events;
    if let Some(file) = &args.fresh_file {
        remove_database_file(file)?;
    }

    let cluster = MockCluster::new(1).context("starting the mock Kafka cluster")?;
    cluster
        .create_topic(TOPIC, PARTITIONS, 1)
        .context("creating the topic")?;
    let brokers = cluster.bootstrap_servers();
    let ends = publish(&brokers, n).context("publishing the payments")?;
    let produced: i64 = ends.iter().sum();

    let location = match &args.fresh_file {
        Some(file) => file.display().to_string(),
        None => redact_url(&args.database_url),
    };
    // The error says which database could not be reached (without its password).
    let pool = consumer_runtime::connect::<DB>(&args.database_url, DB::POOL_SIZE).await?;
    consumer_runtime::migrate(&pool, SCHEMA)
        .await
        .context("creating the runtime's tables")?;
    DB::reset(&pool)
        .await
        .context("creating the example's table quickstart_payments")?;

    // 1. Consume until a third of the payments are applied, then crash: drop the running
    //    consumer without a shutdown.
    let calls = Arc::new(AtomicU64::new(0));
    let runtime = consumer(&calls, &pool, &brokers)?;
    let stats = runtime.stats();
    let mut running = Box::pin(runtime.run());
    let target = (n as u64).div_ceil(3);
    until(
        running.as_mut(),
        poll_until("a third of the payments to be applied", async || {
            let applied = stats.snapshot().applied;
            Ok((applied >= target, format!("{applied} of {target} applied")))
        }),
    )
    .await
    .context("consuming until the crash")?;
    drop(running);
    // A crashed process is gone at once; the dropped consumer's thread notices within ~100 ms,
    // aborts its workers (their open transactions roll back) and releases the handler. (It
    // also leaves the Kafka group as its client closes; after a real crash the group would
    // wait for the session timeout. Either way the new consumer resumes from the database.)
    poll_until("the crashed consumer to go away", async || {
        Ok((Arc::strong_count(&calls) == 1, "it still runs".to_owned()))
    })
    .await?;
    let committed_before_crash: i64 = DB::payments(&pool).await?.iter().map(|p| p.1).sum();
    let calls_before_crash = calls.load(Ordering::Relaxed);
    let duplicates_before_crash = stats.snapshot().duplicates;

    // 2. Restart: a new consumer for the same group resumes from the offsets in the database.
    let restarted = Instant::now();
    let calls = Arc::new(AtomicU64::new(0));
    let runtime = consumer(&calls, &pool, &brokers)?;
    let stats = runtime.stats();
    let stop = runtime.shutdown_handle();
    let mut running = Box::pin(runtime.run());
    until(running.as_mut(), wait_caught_up(&pool, &ends))
        .await
        .context("consuming after the restart")?;
    let restart_secs = restarted.elapsed().as_secs_f64();
    let duplicates = duplicates_before_crash + stats.snapshot().duplicates;
    let before_replay: i64 = DB::payments(&pool).await?.iter().map(|p| p.1).sum();

    // 3. Replay: rewind the group to offset 0 while the consumer runs. It notices within a
    //    second, reloads and consumes everything again; the ledger skips every record.
    let (calls_before, applied_before, skipped_before) = (
        calls.load(Ordering::Relaxed),
        stats.snapshot().applied,
        stats.snapshot().duplicates,
    );
    let rewind: Vec<(i32, i64)> = (0..PARTITIONS).map(|p| (p, 0)).collect();
    consumer_runtime::Store::new(pool.clone(), SCHEMA)?
        .set_offsets(GROUP, TOPIC, &rewind)
        .await
        .context("rewinding the group to offset 0")?;
    until(running.as_mut(), wait_caught_up(&pool, &ends))
        .await
        .context("replaying from offset 0")?;
    stop.shutdown();
    running.await.context("shutting the consumer down")?;
    let replay_calls = calls.load(Ordering::Relaxed) - calls_before;
    let replay_applied = stats.snapshot().applied - applied_before;
    let replay_skipped = stats.snapshot().duplicates - skipped_before;

    // 4. The database's final state.
    let applied: HashMap<String, i64> = DB::payments(&pool).await?.into_iter().collect();
    let effects: i64 = applied.values().sum();
    let more_than_once = applied.values().filter(|a| **a > 1).count();
    let never = (0..n)
        .filter(|i| !applied.contains_key(&payment_id(*i)))
        .count();
    let unknown = applied.len() - (n - never);
    let ledger = DB::ledger_rows(&pool).await?;

    let mut failures = Vec::new();
    if more_than_once > 0 {
        failures.push(format!("{more_than_once} payments applied more than once"));
    }
    if never > 0 {
        failures.push(format!("{never} payments never applied"));
    }
    if unknown > 0 {
        failures.push(format!(
            "{unknown} payments in the table that were never published"
        ));
    }
    if ledger != n as i64 {
        failures.push(format!(
            "the ledger holds {ledger} event ids for {n} distinct payments"
        ));
    }
    if replay_calls > 0 || replay_applied > 0 || effects != before_replay {
        failures.push(format!(
            "the replay ran the handler {replay_calls} times and applied {} effects",
            effects - before_replay
        ));
    }

    let row = |label: &str, value: &dyn std::fmt::Display| println!("  {label:<46}{value}");
    println!(
        "quickstart: {n} payments, {PARTITIONS} partitions, {} ({location})",
        DB::LABEL
    );
    row("events produced (incl. producer duplicates)", &produced);
    row("distinct event ids", &n);
    row("duplicates skipped by the ledger", &duplicates);
    row("effects applied", &effects);
    row(
        "crash: consumer dropped after",
        &format!(
            "{committed_before_crash} effects ({} in-flight handler calls rolled back)",
            calls_before_crash as i64 - committed_before_crash
        ),
    );
    row(
        "restart: new consumer finished the rest in",
        &format!("{restart_secs:.1} s"),
    );
    row("replay from offset 0: records skipped", &replay_skipped);
    row(
        "effects applied by the replay",
        &replay_calls.max(replay_applied),
    );
    row("payments applied more than once", &more_than_once);
    row("payments never applied", &never);
    row(
        "wall time",
        &format!("{:.1} s", started.elapsed().as_secs_f64()),
    );
    if failures.is_empty() {
        row("result", &"OK: every payment applied exactly once");
        Ok(())
    } else {
        let failures = failures.join("; ");
        row("result", &format!("FAILED: {failures}"));
        bail!("self-check failed: {failures}")
    }
}

/// A consumer of the payments for the example's group.
fn consumer<DB: Backend>(
    calls: &Arc<AtomicU64>,
    pool: &Pool<DB>,
    brokers: &str,
) -> anyhow::Result<Runtime<Payments, DB>>
where
    Payments: Handler<DB>,
{
    Runtime::builder(Payments {
        calls: calls.clone(),
    })
    .pool(pool.clone())
    .brokers(brokers)
    .group(GROUP)
    .topic(TOPIC)
    // Batches of at most 100 records instead of 500: with only ~800 records per partition,
    // the crash then lands among several commits rather than before the first.
    .batch_size(100)
    // The example stops its consumers itself.
    .handle_signals(false)
    // A short session (default 45 s): the mock broker gives up on a vanished member after it,
    // and waits a second less than it for members to rejoin whenever one leaves.
    .kafka_config("session.timeout.ms", "3000")
    .kafka_config("heartbeat.interval.ms", "1000")
    .build()
    .context("building the consumer")
}

/// Waits until the group's stored offsets reach the end of every partition.
async fn wait_caught_up<DB: Backend>(pool: &Pool<DB>, ends: &[i64]) -> anyhow::Result<()> {
    poll_until(
        "the consumer to reach the end of every partition",
        async || caught_up(pool, ends).await,
    )
    .await
}

/// Whether the group's stored offsets are at `ends`, and where they are.
async fn caught_up<DB: Backend>(pool: &Pool<DB>, ends: &[i64]) -> anyhow::Result<(bool, String)> {
    let stored = consumer_runtime::Store::new(pool.clone(), SCHEMA)?
        .stored_offsets(GROUP)
        .await
        .context("reading the stored offsets")?;
    let positions: Vec<Option<i64>> = (0..PARTITIONS)
        .map(|p| {
            stored
                .iter()
                .find(|s| s.topic == TOPIC && s.partition == p)
                .and_then(|s| s.next_offset)
        })
        .collect();
    // `None`: nothing committed yet, which is the end of an empty partition.
    let done = positions
        .iter()
        .zip(ends)
        .all(|(s, e)| s.unwrap_or(0) == *e);
    Ok((
        done,
        format!("stored offsets {positions:?}, partition ends {ends:?}"),
    ))
}

/// Drives a running consumer until `done` completes; a consumer that stops first is an error.
async fn until<F>(
    running: Pin<&mut F>,
    done: impl Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<()>
where
    F: Future<Output = consumer_runtime::Result<()>>,
{
    tokio::select! {
        result = running => match result {
            Ok(()) => bail!("the consumer stopped on its own"),
            Err(e) => Err(e).context("the consumer failed"),
        },
        result = done => result,
    }
}

/// Calls `check` every 10 ms until it says it is done, for at most [`LIMIT`]. `check` returns
/// whether it is done and how far things are (for the error on a timeout).
async fn poll_until(
    what: &str,
    mut check: impl AsyncFnMut() -> anyhow::Result<(bool, String)>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + LIMIT;
    loop {
        let (done, progress) = check().await?;
        if done {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "timed out after {} s waiting for {what}: {progress}",
                LIMIT.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn payment_id(i: usize) -> String {
    format!("pay-{i:06}")
}

/// Publishes `n` payments, every 10th of them twice, and returns each partition's end offset.
fn publish(brokers: &str, n: usize) -> anyhow::Result<Vec<i64>> {
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .context("creating the producer")?;
    let currencies = ["EUR", "USD", "GBP", "CHF"];
    let mut sent = 0;
    let mut send = |i: usize| -> anyhow::Result<()> {
        let id = payment_id(i);
        let payload = format!(
            r#"{{"payment_id":"{id}","account":"acct-{:03}","cents":{},"currency":"{}"}}"#,
            i % 250,
            100 + (i * 7_919) % 100_000,
            currencies[i % currencies.len()],
        );
        let headers = OwnedHeaders::new().insert(Header {
            key: "event-id",
            value: Some(&id),
        });
        producer
            .send(
                BaseRecord::to(TOPIC)
                    .key(&id)
                    .payload(&payload)
                    .headers(headers),
            )
            .map_err(|(e, _)| e)
            .with_context(|| format!("sending {id}"))?;
        producer.poll(Duration::ZERO);
        sent += 1;
        Ok(())
    };
    for i in 0..n + RETRY_LAG {
        if i < n {
            send(i)?;
        }
        // A retry of an earlier send whose acknowledgement was lost: same id, new offset.
        if let Some(retried) = i.checked_sub(RETRY_LAG)
            && retried < n
            && retried % 10 == 0
        {
            send(retried)?;
        }
    }
    producer
        .flush(Duration::from_secs(30))
        .context("flushing the producer")?;
    let ends = (0..PARTITIONS)
        .map(|p| {
            producer
                .client()
                .fetch_watermarks(TOPIC, p, Duration::from_secs(10))
                .map(|(_low, high)| high)
                .with_context(|| format!("reading the end offset of {TOPIC}/{p}"))
        })
        .collect::<anyhow::Result<Vec<i64>>>()?;
    let stored: i64 = ends.iter().sum();
    if stored != sent {
        bail!("sent {sent} records but the topic holds {stored}");
    }
    Ok(ends)
}

/// Deletes a SQLite database file with its write-ahead log and shared-memory files.
fn remove_database_file(file: &std::path::Path) -> anyhow::Result<()> {
    for suffix in ["", "-wal", "-shm"] {
        let mut path = file.as_os_str().to_owned();
        path.push(suffix);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("deleting {}", path.display()));
            }
            _ => {}
        }
    }
    Ok(())
}
