//! The outbox relay's scenarios.
//!
//! - `relay`: N outbox rows (written beforehand by four writers, 1,000 rows per
//!   transaction, with `outbox::Outbox::publish`) relayed to the broker by one [`Relay`] (16 lanes, batches of
//!   500): rows/s from the relay's start until the broker has acknowledged every row and the
//!   relay has marked it published. Compared with `effectively_once` in the same run (target:
//!   at least 0.8 ×).
//! - `e2e_latency` (PostgreSQL): commit in A to commit in B at a fixed offered load of 1,000
//!   events/s for 10 s. A is application code (16 writers, each with its own connection) that
//!   writes one outbox row per transaction; the
//!   relay (`LISTEN/NOTIFY`) publishes it; B is a runtime consumer whose handler sends a
//!   `NOTIFY` with the event id in its transaction, which PostgreSQL delivers only when that
//!   transaction commits. The harness's own `LISTEN` connection timestamps the notification:
//!   latency = its arrival − the moment A's `COMMIT` returned. p50, p99 and max (target: p99 <
//!   100 ms).
//!
//! Both run against a mock broker of their own (a child process, like the main one), so that
//! the records they publish do not change the main topic's ends, and start from an empty
//! outbox (vacuumed on PostgreSQL), not from the dead rows of the runs before them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use consumer_runtime::outbox::{Message, Outbox, OutboxConnection};
use consumer_runtime::relay::Relay;
use consumer_runtime::sqlx::{self, Pool, Postgres, Sqlite};
use consumer_runtime::{Context, Handler, HandlerError, Raw, Runtime};
use testkit::mock_broker::{BrokerCommand, MockBroker};

use crate::db::BenchDb;
use crate::{Cpu, Env, MOCK_BROKER_FLAG, Memory, Outcome, Ticker};

/// The relay's scenarios, after the main ones.
pub(crate) const SCENARIOS: [&str; 2] = ["relay", "e2e_latency"];
/// The topic the `relay` scenario publishes to (in its own broker).
const RELAY_TOPIC: &str = "bench-relay";
/// The topic of `e2e_latency` (in its own broker).
const E2E_TOPIC: &str = "bench-e2e";
/// The offered load of `e2e_latency`, events per second, and for how long.
const E2E_RATE: u64 = 1_000;
const E2E_SECONDS: u64 = 10;
/// Writers sharing the offered load, each with a connection of its own: one transaction per
/// event, so the commits' WAL flushes must overlap (group commit) to sustain the rate.
const E2E_WRITERS: u64 = 16;
/// The channel B's handler notifies.
const E2E_CHANNEL: &str = "bench_e2e_committed";

/// What each run of `e2e_latency` measured, for [`targets`].
static LATENCY: Mutex<Vec<Latency>> = Mutex::new(Vec::new());

#[derive(Clone, Debug)]
struct Latency {
    events: usize,
    missing: usize,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    achieved_rate: f64,
    /// Row written to marked published (the relay's share), from the outbox table.
    relay_p50_ms: f64,
    relay_p99_ms: f64,
}

/// What the relay's scenarios need of a database beyond [`BenchDb`].
pub(crate) trait RelayDb: BenchDb
where
    Self::Connection: OutboxConnection,
{
    /// `e2e_latency`, or `None` with the reason it was skipped.
    async fn e2e(env: &Env<Self>) -> anyhow::Result<Result<Outcome, &'static str>>;

    /// Empties the outbox (and on PostgreSQL vacuums it), so that each run starts from the
    /// same table, not from the dead rows of the runs before it.
    async fn empty_outbox(env: &Env<Self>) -> anyhow::Result<()>;
}

impl RelayDb for Sqlite {
    async fn empty_outbox(env: &Env<Self>) -> anyhow::Result<()> {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DELETE FROM {}_outbox",
            env.schema
        )))
        .execute(&env.pool)
        .await
        .context("emptying the outbox")?;
        Ok(())
    }

    async fn e2e(_env: &Env<Self>) -> anyhow::Result<Result<Outcome, &'static str>> {
        Ok(Err(
            "e2e_latency needs PostgreSQL (LISTEN/NOTIFY wakes the relay and timestamps B's commits)",
        ))
    }
}

impl RelayDb for Postgres {
    async fn empty_outbox(env: &Env<Self>) -> anyhow::Result<()> {
        for sql in ["DELETE FROM {s}.outbox", "VACUUM {s}.outbox"] {
            sqlx::query(sqlx::AssertSqlSafe(sql.replace("{s}", &env.schema)))
                .execute(&env.pool)
                .await
                .with_context(|| format!("emptying the outbox: {sql}"))?;
        }
        Ok(())
    }

    async fn e2e(env: &Env<Self>) -> anyhow::Result<Result<Outcome, &'static str>> {
        e2e_latency(env).await.map(Ok)
    }
}

/// Runs the relay's scenarios that `wants` asks for.
pub(crate) async fn scenarios<DB: RelayDb>(
    env: &Env<DB>,
    wants: impl Fn(&str) -> bool,
) -> anyhow::Result<Vec<Outcome>>
where
    DB::Connection: OutboxConnection,
{
    let mut out = Vec::new();
    if wants("relay") {
        out.push(relay_scenario(env).await?);
    }
    if wants("e2e_latency") {
        match DB::e2e(env).await? {
            Ok(o) => out.push(o),
            Err(why) => eprintln!("bench: e2e_latency skipped: {why}"),
        }
    }
    Ok(out)
}

/// A mock broker of the scenario's own with `topic` of the main topic's partition count.
fn own_broker(env_partitions: i32, topic: &str) -> anyhow::Result<MockBroker> {
    let mut broker = MockBroker::start(&[MOCK_BROKER_FLAG, &env_partitions.to_string()])?;
    broker
        .command(&BrokerCommand::CreateTopic(
            topic.to_owned(),
            env_partitions,
        ))
        .with_context(|| format!("creating {topic}"))?;
    Ok(broker)
}

/// A payload of about the size of the main workload's (200–500 bytes of JSON).
fn payload(i: u64) -> String {
    let pad = "x".repeat((i % 300) as usize);
    format!(
        r#"{{"order_id":"order-{:06}","line":{i},"cents":{},"note":"{pad}"}}"#,
        i % 10_000,
        100 + (i % 100_000) * 7_919 % 100_000
    )
}

async fn relay_scenario<DB: RelayDb>(env: &Env<DB>) -> anyhow::Result<Outcome>
where
    DB::Connection: OutboxConnection,
{
    let name = "relay";
    let n = env.args_messages;
    eprintln!(
        "bench: {name} (writing {n} outbox rows first: 4 writers, 1,000 rows per transaction)"
    );
    DB::empty_outbox(env).await?;
    let broker = own_broker(env.partitions, RELAY_TOPIC)?;
    let written = Instant::now();
    // Four writers at once, each its quarter in transactions of 1,000 rows.
    let fill = async |from: u64, to: u64| -> anyhow::Result<()> {
        let outbox = Outbox::new(&env.schema)?;
        let mut i = from;
        while i < to {
            let mut tx = env.pool.begin().await?;
            for j in i..(i + 1000).min(to) {
                let message = Message::new(RELAY_TOPIC)
                    .key(format!("order-{:06}", j % 10_000))
                    .payload(payload(j).into_bytes());
                outbox.publish(&mut *tx, &message).await?;
            }
            tx.commit().await?;
            i = (i + 1000).min(to);
        }
        Ok(())
    };
    let q = n.div_ceil(4);
    tokio::try_join!(
        fill(0, q.min(n)),
        fill(q.min(n), (2 * q).min(n)),
        fill((2 * q).min(n), (3 * q).min(n)),
        fill((3 * q).min(n), n),
    )?;
    eprintln!(
        "  [{name}] {n} rows written in {:.1} s",
        written.elapsed().as_secs_f64()
    );

    let relay = Relay::builder(env.pool.clone())
        .brokers(&broker.bootstrap)
        .schema(&env.schema)
        .build()?;
    let stats = relay.stats_handle();
    let stop = relay.shutdown_handle();
    let memory = Memory::reset();
    let ticker = Ticker::start(name, n);
    let started = Instant::now();
    let cpu = Cpu::now();
    let task = tokio::spawn(relay.run());
    tokio::pin!(task);
    let mut last = (0, Instant::now());
    loop {
        let published = stats.get().published;
        ticker.set(published);
        if published >= n {
            break;
        }
        if published != last.0 {
            last = (published, Instant::now());
        } else if last.1.elapsed() > crate::STALL_LIMIT {
            bail!(
                "the relay made no progress for {} s at {published} of {n} rows",
                crate::STALL_LIMIT.as_secs()
            );
        }
        tokio::select! {
            r = &mut task => bail!("the relay stopped before publishing everything: {:?}", r?),
            () = tokio::time::sleep(Duration::from_millis(10)) => {}
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let cpu = cpu.since();
    drop(ticker);
    let s = stats.get();
    eprintln!(
        "  [{name}] done: published {} sent {} parked {} fenced {} (relay totals)",
        s.published, s.sent, s.parked, s.fenced
    );
    stop.shutdown();
    match tokio::time::timeout(Duration::from_secs(60), &mut task).await {
        Ok(r) => r?.context("the relay failed")?,
        Err(_) => bail!("the relay did not stop within 60 s"),
    }
    drop(broker);
    Ok(memory.finish(name, env.round(), n, secs, cpu))
}

/// B's handler: a `NOTIFY` with the record's event id, delivered when B's transaction
/// commits.
struct NotifyOnCommit;

impl Handler<Postgres> for NotifyOnCommit {
    type Event = Raw;

    async fn handle(&self, ctx: &mut Context<'_, Postgres>, _: Raw) -> Result<(), HandlerError> {
        let id = ctx.record().event_id().to_owned();
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(E2E_CHANNEL)
            .bind(id)
            .execute(ctx.conn())
            .await?;
        Ok(())
    }
}

async fn e2e_latency(env: &Env<Postgres>) -> anyhow::Result<Outcome> {
    let name = "e2e_latency";
    eprintln!(
        "bench: {name} (A commits an outbox row, the relay publishes it, B commits it; {E2E_RATE} events/s offered for {E2E_SECONDS} s)"
    );
    Postgres::empty_outbox(env).await?;
    let broker = own_broker(env.partitions, E2E_TOPIC)?;
    let outbox = Outbox::new(&env.schema)?;
    let committed_b: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let mut listener = sqlx::postgres::PgListener::connect_with(&env.watch_pool).await?;
    listener.listen(E2E_CHANNEL).await?;
    let seen = committed_b.clone();
    let listening = tokio::spawn(async move {
        while let Ok(n) = listener.recv().await {
            let at = Instant::now();
            seen.lock()
                .expect("latency map")
                .entry(n.payload().to_owned())
                .or_insert(at);
        }
    });

    let relay = Relay::builder(env.pool.clone())
        .brokers(&broker.bootstrap)
        .schema(&env.schema)
        // Kept, so that the rows' write and publish times split the latency below.
        .keep_published(Duration::from_secs(3600))
        .build()?;
    let relay_stop = relay.shutdown_handle();
    let relay_task = tokio::spawn(relay.run());
    // A group of its own per run: each run has a new broker, whose topic starts at offset 0.
    let group = format!("{}-e2e-{}", env.schema, env.round());
    let b = Runtime::builder(NotifyOnCommit)
        .pool(env.pool.clone())
        .brokers(&broker.bootstrap)
        .group(&group)
        .topic(E2E_TOPIC)
        .schema(&env.schema)
        .handle_signals(false)
        .kafka_config("session.timeout.ms", "6000")
        .kafka_config("heartbeat.interval.ms", "1000")
        // librdkafka's default fetch wait (500 ms) is a latency floor when records trickle.
        .kafka_config("fetch.wait.max.ms", "10")
        .build()?;
    let b_stop = b.shutdown_handle();
    let b_task = tokio::spawn(b.run());

    let write = async |pool: &Pool<Postgres>, i: u64| -> anyhow::Result<(String, Instant)> {
        let mut tx = pool.begin().await?;
        let message = Message::new(E2E_TOPIC)
            .key(format!("order-{:06}", i % 10_000))
            .payload(payload(i).into_bytes());
        let id = outbox.publish(&mut *tx, &message).await?;
        tx.commit().await?;
        Ok((id, Instant::now()))
    };
    // Warm-up: B joins its group (about 3 s on the mock broker) before the clock starts.
    let (warm, _) = write(&env.pool, 999_999_999).await?;
    let deadline = Instant::now() + crate::JOIN_LIMIT;
    while !committed_b.lock().expect("latency map").contains_key(&warm) {
        if Instant::now() > deadline {
            bail!(
                "the warm-up event did not reach B within {} s",
                crate::JOIN_LIMIT.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let memory = Memory::reset();
    let cpu = Cpu::now();
    let started = Instant::now();
    let per_writer = E2E_RATE * E2E_SECONDS / E2E_WRITERS;
    let period = Duration::from_micros(1_000_000 * E2E_WRITERS / E2E_RATE);
    let writer_pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(E2E_WRITERS as u32)
        .connect_with((*env.pool.connect_options()).clone())
        .await
        .context("connecting A's writers")?;
    let mut writers = Vec::new();
    for w in 0..E2E_WRITERS {
        let pool = writer_pool.clone();
        let outbox = Outbox::new(&env.schema)?;
        writers.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut out = Vec::with_capacity(per_writer as usize);
            for k in 0..per_writer {
                tick.tick().await;
                let i = w * per_writer + k;
                let mut tx = pool.begin().await?;
                let message = Message::new(E2E_TOPIC)
                    .key(format!("order-{:06}", i % 10_000))
                    .payload(payload(i).into_bytes());
                let id = outbox.publish(&mut *tx, &message).await?;
                tx.commit().await?;
                out.push((id, Instant::now()));
            }
            anyhow::Ok(out)
        }));
    }
    let mut committed_a = Vec::new();
    for w in writers {
        committed_a.extend(w.await??);
    }
    let offered_secs = started.elapsed().as_secs_f64();
    writer_pool.close().await;
    // Drain: every event reaches B, or 30 s pass.
    let drain = Instant::now() + Duration::from_secs(30);
    loop {
        let all = {
            let seen = committed_b.lock().expect("latency map");
            committed_a.iter().all(|(id, _)| seen.contains_key(id))
        };
        if all || Instant::now() > drain {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    let cpu = cpu.since();
    b_stop.shutdown();
    relay_stop.shutdown();
    let _ = tokio::time::timeout(Duration::from_secs(60), b_task).await;
    let _ = tokio::time::timeout(Duration::from_secs(60), relay_task).await;
    listening.abort();
    drop(broker);

    // The relay's share: the row's write (its transaction's start, `created_at`) to the
    // relay's mark after the broker's acknowledgement (`published_at`), from the table.
    let relay_part: (Option<f64>, Option<f64>) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY d), percentile_cont(0.99) WITHIN GROUP (ORDER BY d)
         FROM (SELECT 1000 * extract(epoch FROM published_at - created_at)::float8 AS d
               FROM {}.outbox WHERE aggregatetype = $1 AND published_at IS NOT NULL) t",
        env.schema
    )))
    .bind(E2E_TOPIC)
    .fetch_one(&env.pool)
    .await
    .context("reading the outbox's write and publish times")?;
    let seen = committed_b.lock().expect("latency map").clone();
    let mut ms: Vec<f64> = committed_a
        .iter()
        .filter_map(|(id, a)| seen.get(id).map(|b| b.saturating_duration_since(*a)))
        .map(|d| d.as_secs_f64() * 1000.0)
        .collect();
    ms.sort_by(f64::total_cmp);
    let pick = |q: f64| ms.get(((ms.len() as f64 * q) as usize).min(ms.len().saturating_sub(1)));
    let latency = Latency {
        events: committed_a.len(),
        missing: committed_a.len() - ms.len(),
        p50_ms: pick(0.50).copied().unwrap_or(f64::NAN),
        p99_ms: pick(0.99).copied().unwrap_or(f64::NAN),
        max_ms: ms.last().copied().unwrap_or(f64::NAN),
        achieved_rate: committed_a.len() as f64 / offered_secs,
        relay_p50_ms: f64::NAN,
        relay_p99_ms: f64::NAN,
    };
    eprintln!(
        "  [{name}] {} events written at {:.0}/s; reached B: {}; commit in A -> commit in B: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        latency.events,
        latency.achieved_rate,
        ms.len(),
        latency.p50_ms,
        latency.p99_ms,
        latency.max_ms
    );
    eprintln!(
        "  [{name}] of which the relay (row written -> marked published after the broker's ack, from the outbox table): p50 {:.1} ms, p99 {:.1} ms",
        relay_part.0.unwrap_or(f64::NAN),
        relay_part.1.unwrap_or(f64::NAN)
    );
    LATENCY.lock().expect("latency").push(Latency {
        relay_p50_ms: relay_part.0.unwrap_or(f64::NAN),
        relay_p99_ms: relay_part.1.unwrap_or(f64::NAN),
        ..latency
    });
    Ok(memory.finish(name, env.round(), ms.len() as u64, secs, cpu))
}

/// The relay's targets, after the main table: from the medians of the runs (`--repeat`).
pub(crate) fn targets(outcomes: &[Outcome]) {
    let summaries = crate::report::summarise(outcomes);
    let rate = |name: &str| {
        summaries
            .iter()
            .find(|s| s.scenario == name)
            .map(|s| s.rate_median)
    };
    let runs = LATENCY.lock().expect("latency").clone();
    if rate("relay").is_none() && runs.is_empty() {
        return;
    }
    println!(
        "targets of the outbox relay (this run; medians when --repeat runs them more than once):"
    );
    let line = "relay >= 0.8 x effectively_once";
    match (rate("relay"), rate("effectively_once")) {
        (Some(r), Some(e)) => {
            let ratio = r / e;
            let verdict = if ratio >= 0.8 { "met" } else { "NOT MET" };
            println!("  {line:<58} ratio {ratio:>7.2}  {verdict}");
        }
        (Some(_), None) => println!("  {line:<58} add effectively_once to --scenarios"),
        _ => {}
    }
    if !runs.is_empty() {
        let med = |f: fn(&Latency) -> f64| crate::report::median(runs.iter().map(f).collect());
        let p99 = med(|l| l.p99_ms);
        let p99_range = runs
            .iter()
            .map(|l| l.p99_ms)
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
                (lo.min(v), hi.max(v))
            });
        let missing: usize = runs.iter().map(|l| l.missing).sum();
        let events: usize = runs.iter().map(|l| l.events).sum();
        let max = runs.iter().map(|l| l.max_ms).fold(f64::NAN, f64::max);
        let line = "e2e commit A -> commit B p99 < 100 ms at 1,000/s";
        let verdict = if p99 < 100.0 && missing == 0 {
            "met"
        } else {
            "NOT MET"
        };
        println!(
            "  {line:<58} p99 {p99:>7.1}  {verdict} ({} runs, p99 range {:.1}–{:.1} ms; p50 {:.1} ms, max {:.1} ms, {events} events at {:.0}/s offered, {missing} never reached B; the relay's share: p50 {:.1} ms, p99 {:.1} ms)",
            runs.len(),
            p99_range.0,
            p99_range.1,
            med(|l| l.p50_ms),
            max,
            med(|l| l.achieved_rate),
            med(|l| l.relay_p50_ms),
            med(|l| l.relay_p99_ms)
        );
    }
}
