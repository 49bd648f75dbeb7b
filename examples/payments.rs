//! Run with: `cargo run --example payments` (needs PostgreSQL at `DATABASE_URL`, default
//! `postgres://postgres@127.0.0.1:5432/test`; Kafka is librdkafka's in-process mock broker).
//!
//! Produces 2,000 payment events, 200 of them published twice (a producer retry), into a
//! 4-partition topic, consumes them with a handler whose effect is NOT idempotent
//! (`balance = balance + amount`, `count = count + 1`), and checks that every payment was
//! applied exactly once.

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use consumer_runtime::rdkafka::config::ClientConfig;
use consumer_runtime::rdkafka::message::{Header, OwnedHeaders};
use consumer_runtime::rdkafka::mocking::MockCluster;
use consumer_runtime::rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use consumer_runtime::sqlx::{self, Postgres};
use consumer_runtime::{Context, Handler, HandlerError, Runtime};

#[derive(serde::Deserialize)]
struct PaymentCaptured {
    payment_id: String,
    account: String,
    cents: i64,
}

struct Payments;

#[consumer_runtime::async_trait]
impl Handler for Payments {
    type Event = PaymentCaptured;

    async fn handle(
        &self,
        ctx: &mut Context<'_, Postgres>,
        p: PaymentCaptured,
    ) -> Result<(), HandlerError> {
        sqlx::query(
            "INSERT INTO example_payments (payment_id, account, cents, applied) VALUES ($1, $2, $3, 1)
             ON CONFLICT (payment_id) DO UPDATE SET applied = example_payments.applied + 1",
        )
        .bind(&p.payment_id)
        .bind(&p.account)
        .bind(p.cents)
        .execute(&mut *ctx.tx)
        .await?;
        Ok(())
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt().with_env_filter("warn").init();
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let pool = consumer_runtime::connect::<Postgres>(&url, 8).await?;
    consumer_runtime::migrate(&pool, "consumer_runtime").await?;
    sqlx::query("DROP TABLE IF EXISTS example_payments")
        .execute(&pool)
        .await?;
    sqlx::query(
        "CREATE TABLE example_payments (payment_id TEXT PRIMARY KEY, account TEXT NOT NULL,
         cents BIGINT NOT NULL, applied INTEGER NOT NULL)",
    )
    .execute(&pool)
    .await?;

    let cluster = MockCluster::new(1).context("starting the mock Kafka cluster")?;
    let topic = "payments";
    cluster.create_topic(topic, 4, 1)?;
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", cluster.bootstrap_servers())
        .create()?;
    let (n, dups) = (2_000, 200);
    for i in (0..n).chain((0..n).step_by(n / dups)) {
        let id = format!("pay-{i}");
        let payload = format!(
            r#"{{"payment_id":"{id}","account":"acct-{}","cents":{}}}"#,
            i % 50,
            100 + i
        );
        let headers = OwnedHeaders::new().insert(Header {
            key: "event-id",
            value: Some(&id),
        });
        producer
            .send(
                BaseRecord::to(topic)
                    .key(&id)
                    .payload(&payload)
                    .headers(headers),
            )
            .map_err(|(e, _)| e)
            .context("producing")?;
        producer.poll(Duration::ZERO);
    }
    producer.flush(Duration::from_secs(30))?;

    let group = format!("payments-example-{}", std::process::id());
    let runtime = Runtime::builder(Payments)
        .pool(pool.clone())
        .brokers(cluster.bootstrap_servers())
        .group(&group)
        .topic(topic)
        .build()?;
    let stats = runtime.stats();
    let stop = runtime.shutdown_handle();
    let started = Instant::now();
    let task = tokio::spawn(runtime.run());
    let total = (n + dups) as i64;
    loop {
        let stored: Option<i64> = sqlx::query_scalar(
            "SELECT sum(next_offset)::BIGINT FROM consumer_runtime.consumer_offsets WHERE consumer_group = $1",
        )
        .bind(&group)
        .fetch_one(&pool)
        .await?;
        if stored == Some(total) {
            break;
        }
        if started.elapsed() > Duration::from_secs(120) {
            bail!("timed out: stored offsets sum to {stored:?} of {total}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    stop.shutdown();
    task.await??;

    let (rows, twice): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE applied <> 1) FROM example_payments",
    )
    .fetch_one(&pool)
    .await?;
    let dup = stats.duplicates.load(std::sync::atomic::Ordering::Relaxed);
    println!(
        "| records produced | distinct payments | duplicates skipped | payments applied | applied more than once | seconds |"
    );
    println!("|---|---|---|---|---|---|");
    println!("| {total} | {n} | {dup} | {rows} | {twice} | {secs:.2} |");
    if rows != n as i64 || twice != 0 {
        bail!("effectively-once violated: {rows} payments applied, {twice} more than once");
    }
    println!("every payment applied exactly once");
    Ok(())
}
