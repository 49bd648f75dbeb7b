//! Run with: `cargo run --release --example batch [-- --database-url URL --events N]`. It needs no
//! services: Kafka is librdkafka's in-process mock cluster, and the database a fresh SQLite file
//! (or PostgreSQL with `--database-url postgres://user@host/db`).
//!
//! A batch handler ([`BatchHandler`]): one call per partition batch, and the whole batch written
//! with ONE statement: `INSERT … SELECT FROM unnest($1, $2, $3)` on PostgreSQL, `INSERT … SELECT
//! FROM json_each($1)` on SQLite. The effect is NOT idempotent (`applied = applied + 1`), so a
//! payment applied twice would show in the table.
//!
//! It publishes `--events` payments (default 20,000) to a 4-partition topic, 5% of them a second
//! time with the same event id (a producer retry), and every 1,000th with `cents = 0`, which the
//! handler rejects by index (`batch.reject`): those are parked in `dead_letters` in the
//! transaction that commits the rest of their batch. Then it consumes everything, checks that
//! every good payment was applied exactly once and every bad one parked, and prints a table;
//! it exits non-zero if anything is off.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use consumer_runtime::rdkafka::config::ClientConfig;
use consumer_runtime::rdkafka::message::{Header, OwnedHeaders};
use consumer_runtime::rdkafka::mocking::MockCluster;
use consumer_runtime::rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use consumer_runtime::sqlx::{self, PgConnection, Pool, Postgres, Sqlite, SqliteConnection};
use consumer_runtime::{Backend, Batch, BatchHandler, DatabaseKind, HandlerError, Json, Runtime};

const SCHEMA: &str = "consumer_runtime";
const TOPIC: &str = "payments";
const PARTITIONS: i32 = 4;
const LIMIT: Duration = Duration::from_secs(120);

#[derive(serde::Deserialize)]
struct PaymentCaptured {
    payment_id: String,
    account: String,
    cents: i64,
}

/// The batch handler; `calls` and `largest` count its calls and its largest batch (clones
/// share them).
#[derive(Clone, Default)]
struct Payments {
    calls: Arc<AtomicU64>,
    largest: Arc<AtomicU64>,
}

impl Payments {
    /// The good payments of the batch, as columns; the bad ones rejected by index.
    fn columns<'b>(&self, batch: &'b Batch<'_, Json<PaymentCaptured>>) -> Columns<'b> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.largest
            .fetch_max(batch.len() as u64, Ordering::Relaxed);
        let mut c = Columns::default();
        for (i, Json(p)) in batch.events().iter().enumerate() {
            if p.cents <= 0 {
                batch.reject(i, format!("payment {} has {} cents", p.payment_id, p.cents));
                continue;
            }
            c.ids.push(&p.payment_id);
            c.accounts.push(&p.account);
            c.cents.push(p.cents);
        }
        c
    }
}

#[derive(Default)]
struct Columns<'b> {
    ids: Vec<&'b str>,
    accounts: Vec<&'b str>,
    cents: Vec<i64>,
}

impl BatchHandler<Postgres> for Payments {
    type Event = Json<PaymentCaptured>;

    async fn handle_batch(
        &self,
        conn: &mut PgConnection,
        batch: &Batch<'_, Json<PaymentCaptured>>,
    ) -> Result<(), HandlerError> {
        let c = self.columns(batch);
        sqlx::query(
            "INSERT INTO batch_example_payments (payment_id, account, cents, applied)
             SELECT id, account, cents, 1
               FROM unnest($1::text[], $2::text[], $3::int8[]) AS e(id, account, cents)
             ON CONFLICT (payment_id) DO UPDATE SET applied = batch_example_payments.applied + 1",
        )
        .bind(&c.ids)
        .bind(&c.accounts)
        .bind(&c.cents)
        .execute(conn)
        .await?;
        Ok(())
    }
}

impl BatchHandler<Sqlite> for Payments {
    type Event = Json<PaymentCaptured>;

    async fn handle_batch(
        &self,
        conn: &mut SqliteConnection,
        batch: &Batch<'_, Json<PaymentCaptured>>,
    ) -> Result<(), HandlerError> {
        let c = self.columns(batch);
        // One JSON array of [id, account, cents] rows; `json_each` turns it back into rows.
        let rows: Vec<(&str, &str, i64)> = (0..c.ids.len())
            .map(|i| (c.ids[i], c.accounts[i], c.cents[i]))
            .collect();
        let rows = serde_json::to_string(&rows).map_err(HandlerError::reject)?;
        sqlx::query(
            "INSERT INTO batch_example_payments (payment_id, account, cents, applied)
             SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'),
                    json_extract(value, '$[2]'), 1
               FROM json_each($1) WHERE true
             ON CONFLICT (payment_id) DO UPDATE SET applied = batch_example_payments.applied + 1",
        )
        .bind(rows)
        .execute(conn)
        .await?;
        Ok(())
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let mut url = None;
    let mut events = 20_000usize;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--database-url" => url = Some(value()?),
            "--events" => {
                let v = value()?;
                events = v.parse().ok().filter(|n| *n > 0).with_context(|| {
                    format!("--events wants a positive whole number, not `{v}`")
                })?;
            }
            "--help" | "-h" => {
                println!("usage: cargo run --example batch [-- --database-url URL --events N]");
                return Ok(());
            }
            other => bail!(
                "unknown argument `{other}`; the flags are --database-url URL, --events N and --help"
            ),
        }
    }
    let (url, file) = match url {
        Some(url) => (url, None),
        None => {
            let file = std::env::temp_dir().join("consumer-runtime-batch-example.db");
            (format!("sqlite://{}", file.display()), Some(file))
        }
    };
    match DatabaseKind::from_url(&url)? {
        DatabaseKind::Postgres => run::<Postgres>(&url, None, events, 8).await,
        _ => run::<Sqlite>(&url, file, events, 4).await,
    }
}

/// The example's own table, on either database.
trait ExampleDb: Backend {
    /// (Re)creates `batch_example_payments`.
    async fn create_table(pool: &Pool<Self>) -> anyhow::Result<()>;
    /// Every payment in the table with how many times it was applied.
    async fn applied(pool: &Pool<Self>) -> anyhow::Result<HashMap<String, i64>>;
}

macro_rules! example_db {
    ($db:ty) => {
        impl ExampleDb for $db {
            async fn create_table(pool: &Pool<Self>) -> anyhow::Result<()> {
                sqlx::query("DROP TABLE IF EXISTS batch_example_payments")
                    .execute(pool)
                    .await?;
                sqlx::query(
                    "CREATE TABLE batch_example_payments (payment_id TEXT PRIMARY KEY,
                     account TEXT NOT NULL, cents BIGINT NOT NULL, applied INTEGER NOT NULL)",
                )
                .execute(pool)
                .await?;
                Ok(())
            }

            async fn applied(pool: &Pool<Self>) -> anyhow::Result<HashMap<String, i64>> {
                let rows: Vec<(String, i64)> = sqlx::query_as(
                    "SELECT payment_id, CAST(applied AS BIGINT) FROM batch_example_payments",
                )
                .fetch_all(pool)
                .await?;
                Ok(rows.into_iter().collect())
            }
        }
    };
}

example_db!(Postgres);
example_db!(Sqlite);

async fn run<DB: ExampleDb>(
    url: &str,
    fresh_file: Option<PathBuf>,
    n: usize,
    pool_size: u32,
) -> anyhow::Result<()>
where
    Payments: BatchHandler<DB>,
{
    if let Some(file) = &fresh_file {
        for suffix in ["", "-wal", "-shm"] {
            let mut path = file.as_os_str().to_owned();
            path.push(suffix);
            let _ = std::fs::remove_file(path);
        }
    }
    let cluster = MockCluster::new(1).context("starting the mock Kafka cluster")?;
    cluster.create_topic(TOPIC, PARTITIONS, 1)?;
    let brokers = cluster.bootstrap_servers();
    let (ends, bad) = publish(&brokers, n).context("publishing the payments")?;

    let pool = consumer_runtime::connect::<DB>(url, pool_size).await?;
    consumer_runtime::migrate(&pool, SCHEMA).await?;
    DB::create_table(&pool).await?;
    // A fresh group per run: nothing of an earlier run's ledger or offsets applies.
    let group = format!("batch-example-{}", jiff::Timestamp::now().as_millisecond());

    let handler = Payments::default();
    let runtime = Runtime::batch_builder(handler.clone())
        .pool(pool.clone())
        .brokers(&brokers)
        .group(&group)
        .topic(TOPIC)
        .handle_signals(false)
        .build()
        .context("building the consumer")?;
    let stats = runtime.stats();
    let stop = runtime.shutdown_handle();
    let started = Instant::now();
    let running = tokio::spawn(runtime.run());
    let store = consumer_runtime::Store::new(pool.clone(), SCHEMA)?;
    loop {
        let stored = store.stored_offsets(&group).await?;
        let done = (0..PARTITIONS).all(|p| {
            let at = stored.iter().find(|s| s.partition == p);
            at.and_then(|s| s.next_offset).unwrap_or(0) == ends[p as usize]
        });
        if done {
            break;
        }
        if started.elapsed() > LIMIT || running.is_finished() {
            bail!("the consumer did not reach the end of the topic: {stored:?}, ends {ends:?}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.shutdown();
    running.await?.context("the consumer failed")?;

    let applied = DB::applied(&pool).await?;
    let letters = store.dead_letters().list(&group, None).await?;
    let good = n - bad;
    let twice = applied.values().filter(|a| **a != 1).count();
    let s = stats.snapshot();
    let produced: i64 = ends.iter().sum();
    let row = |label: &str, value: &dyn std::fmt::Display| println!("  {label:<40}{value}");
    println!(
        "batch example: {n} payments, {PARTITIONS} partitions, {}",
        redact(url)
    );
    row("records produced (incl. duplicates)", &produced);
    row("payments applied", &applied.len());
    row("payments applied more than once", &twice);
    row("duplicates skipped by the ledger", &s.duplicates);
    row("bad payments parked (reject by index)", &letters.len());
    row(
        "batch handler calls",
        &handler.calls.load(Ordering::Relaxed),
    );
    row("largest batch", &handler.largest.load(Ordering::Relaxed));
    if applied.len() != good || twice > 0 || letters.len() != bad {
        row("result", &"FAILED");
        bail!(
            "expected {good} payments applied once and {bad} parked; got {} applied ({twice} not once) and {} parked",
            applied.len(),
            letters.len()
        );
    }
    row(
        "result",
        &"OK: every payment applied exactly once, every bad one parked",
    );
    Ok(())
}

fn redact(url: &str) -> String {
    consumer_runtime::error::redact_url(url)
}

/// Publishes `n` payments (every 20th a second time, every 1,000th with 0 cents) and returns
/// each partition's end offset and how many payments are bad.
fn publish(brokers: &str, n: usize) -> anyhow::Result<(Vec<i64>, usize)> {
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("queue.buffering.max.messages", "1000000")
        .create()?;
    let send = |i: usize| -> anyhow::Result<()> {
        let id = format!("pay-{i:07}");
        let cents = if i % 1000 == 999 { 0 } else { 100 + i % 5000 };
        let payload = format!(
            r#"{{"payment_id":"{id}","account":"acct-{:03}","cents":{cents}}}"#,
            i % 250
        );
        let headers = OwnedHeaders::new().insert(Header {
            key: "event-id",
            value: Some(&id),
        });
        let record = BaseRecord::to(TOPIC)
            .key(&id)
            .payload(&payload)
            .headers(headers);
        producer.send(record).map_err(|(e, _)| e)?;
        producer.poll(Duration::ZERO);
        Ok(())
    };
    for i in 0..n {
        send(i)?;
        if i % 20 == 0 {
            send(i)?;
        }
    }
    producer.flush(Duration::from_secs(30))?;
    let ends = (0..PARTITIONS)
        .map(|p| {
            let (_, high) =
                producer
                    .client()
                    .fetch_watermarks(TOPIC, p, Duration::from_secs(10))?;
            Ok(high)
        })
        .collect::<anyhow::Result<Vec<i64>>>()?;
    Ok((ends, (0..n).filter(|i| i % 1000 == 999).count()))
}
