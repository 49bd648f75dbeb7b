//! The benchmark's two ledger-retention figures, `bench --retention` (instead of the other
//! scenarios):
//!
//! 1. `effectively_once_pruned_10m`: effectively_once with a ledger of `--retention-ledger-rows`
//!    rows (default 10 million) in five generations and the runtime's retention pruning on
//!    (`ledger_retention` 40 s), arranged so that a generation of 2 million rows falls due
//!    every 3 s of the measurement and the newest is switched as it starts; against
//!    `effectively_once_empty_ledger`, measured first, on an empty ledger without pruning.
//!    Target: at least 0.9 × the empty-ledger figure.
//! 2. Removing one generation of `--retention-day-rows` rows (default 1 million, "a day's
//!    worth"), side by side: the way retention does it (PostgreSQL: `DETACH PARTITION …
//!    CONCURRENTLY` and `DROP TABLE`; SQLite: bounded batches of deletes) and one `DELETE` of the
//!    same number of rows. Target (PostgreSQL): the drop under 1 s.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use consumer_runtime::sqlx::{self, AssertSqlSafe, Pool, Postgres, Sqlite};
use consumer_runtime::{Guarantee, Handler, Runtime, Store};

use super::{BATCH, Env, Memory, Outcome, TOPIC, Ticker, summary, time_until_caught_up};
use crate::db::{BenchDb, Sink};

/// `--retention` and its sizes.
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct RetentionArgs {
    /// Measure the two ledger-retention figures instead of the other scenarios.
    #[arg(long)]
    pub(crate) retention: bool,
    /// With --retention: the ledger's rows for effectively_once_pruned_10m.
    #[arg(long, value_name = "K", default_value = "10000000", value_parser = super::whole_number)]
    pub(crate) retention_ledger_rows: u64,
    /// With --retention: the rows of the generation dropped (and of the DELETE beside it).
    #[arg(long, value_name = "K", default_value = "1000000", value_parser = super::whole_number)]
    pub(crate) retention_day_rows: u64,
}

/// The retention the pruned scenario runs with.
const RETENTION: Duration = Duration::from_secs(40);
/// Generations of the pre-filled ledger.
const GENERATIONS: u64 = 5;

/// The retention-specific SQL per database.
pub(crate) trait RetentionDb: BenchDb {
    /// Sets generation `generation`'s start `secs` seconds in the past.
    async fn backdate(
        pool: &Pool<Self>,
        schema: &str,
        generation: i32,
        secs: f64,
    ) -> anyhow::Result<()>;
    /// One `DELETE` of generation `generation`'s rows; returns how many.
    async fn delete_generation(
        pool: &Pool<Self>,
        schema: &str,
        generation: i32,
    ) -> anyhow::Result<u64>;
}

fn q(sql: String) -> AssertSqlSafe<String> {
    AssertSqlSafe(sql)
}

impl RetentionDb for Postgres {
    async fn backdate(
        pool: &Pool<Self>,
        schema: &str,
        generation: i32,
        secs: f64,
    ) -> anyhow::Result<()> {
        sqlx::query(q(format!(
            "UPDATE {schema}.ledger_generations SET started_at = clock_timestamp() - make_interval(secs => $2) WHERE generation = $1"
        )))
        .bind(generation)
        .bind(secs)
        .execute(pool)
        .await?;
        Ok(())
    }

    async fn delete_generation(
        pool: &Pool<Self>,
        schema: &str,
        generation: i32,
    ) -> anyhow::Result<u64> {
        Ok(sqlx::query(q(format!(
            "DELETE FROM {schema}.processed WHERE generation = $1"
        )))
        .bind(generation)
        .execute(pool)
        .await?
        .rows_affected())
    }
}

impl RetentionDb for Sqlite {
    async fn backdate(
        pool: &Pool<Self>,
        schema: &str,
        generation: i32,
        secs: f64,
    ) -> anyhow::Result<()> {
        sqlx::query(q(format!(
            "UPDATE {schema}_ledger_generations SET started_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-' || $2 || ' seconds') WHERE generation = $1"
        )))
        .bind(generation)
        .bind(secs)
        .execute(pool)
        .await?;
        Ok(())
    }

    async fn delete_generation(
        pool: &Pool<Self>,
        schema: &str,
        generation: i32,
    ) -> anyhow::Result<u64> {
        Ok(sqlx::query(q(format!(
            "DELETE FROM {schema}_processed WHERE id >= (SELECT first_id FROM {schema}_ledger_generations WHERE generation = $1) \
             AND id < (SELECT min(first_id) FROM {schema}_ledger_generations WHERE generation > $1)"
        )))
        .bind(generation)
        .execute(pool)
        .await?
        .rows_affected())
    }
}

/// Both figures; returns the two throughput outcomes for the report's table.
pub(crate) async fn scenarios<DB: RetentionDb>(
    env: &Env<DB>,
    args: &RetentionArgs,
) -> anyhow::Result<Vec<Outcome>>
where
    Sink: Handler<DB>,
{
    let mut out = Vec::new();
    out.extend(
        super::runtime_scenario(
            env,
            "effectively_once_empty_ledger",
            Sink::new::<DB>(
                &env.schema,
                &format!("{}-empty", env.group("effectively_once")),
            ),
            Guarantee::EffectivelyOnce,
            BATCH,
            false,
        )
        .await?,
    );
    out.push(pruned(env, args.retention_ledger_rows).await?);
    let rate = |name: &str| {
        out.iter()
            .find(|o| o.scenario == name)
            .map(Outcome::rate)
            .unwrap_or(0.0)
    };
    let ratio =
        rate("effectively_once_pruned_10m") / rate("effectively_once_empty_ledger").max(1e-9);
    let drop = drop_vs_delete(env, args.retention_day_rows).await?;
    println!();
    println!("ledger retention ({}):", DB::LABEL);
    println!(
        "  effectively_once, {} ledger rows with pruning running vs an empty ledger without: ratio {ratio:.2} (target >= 0.9: {})",
        args.retention_ledger_rows,
        if ratio >= 0.9 { "met" } else { "NOT MET" }
    );
    println!(
        "  removing {} ledger rows: generation drop {:.3} s, DELETE of the same rows {:.3} s (target: drop < 1 s: {})",
        args.retention_day_rows,
        drop.0,
        drop.1,
        if drop.0 < 1.0 { "met" } else { "NOT MET" }
    );
    Ok(out)
}

/// Starts a new ledger generation, trying again while another database user's transactions
/// hold the claim lock (the lock is the database's, shared by every schema).
async fn switch<DB: RetentionDb>(store: &Store<DB>) -> anyhow::Result<()> {
    for _ in 0..100 {
        if store.start_ledger_generation().await? {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("could not start a ledger generation in 100 attempts")
}

/// effectively_once with the pre-filled ledger and pruning on.
async fn pruned<DB: RetentionDb>(env: &Env<DB>, rows: u64) -> anyhow::Result<Outcome>
where
    Sink: Handler<DB>,
{
    let name = "effectively_once_pruned_10m";
    let store = Store::new(env.pool.clone(), &env.schema)?;
    let filler = format!("{}-filler", env.schema);
    let started = Instant::now();
    let per = rows / GENERATIONS;
    eprintln!("bench: pre-filling the ledger with {rows} rows in {GENERATIONS} generations");
    for g in 0..GENERATIONS {
        let (from, to) = (
            g * per,
            if g + 1 == GENERATIONS {
                rows
            } else {
                (g + 1) * per
            },
        );
        let chunk = 500_000u64;
        let mut at = from;
        while at < to {
            let end = (at + chunk).min(to);
            DB::prefill(&env.pool, &env.schema, &filler, at as i64, end as i64).await?;
            at = end;
        }
        if g + 1 < GENERATIONS {
            switch(&store).await?;
        }
        eprintln!(
            "  [prefill] generation {g}: {} rows ({:.0} s)",
            to - from,
            started.elapsed().as_secs_f64()
        );
    }
    DB::after_prefill(&env.pool, &env.schema).await?;
    // Generation k + 1 started RETENTION - (4 + 3k) s ago: generation k falls due 4 + 3k s
    // after the runtime starts (its first commit comes about 3 s in); the newest is older
    // than a quarter of the retention, so the first pruning run switches it.
    let generations = store.ledger_generations().await?;
    for (k, g) in generations.iter().enumerate().skip(1) {
        let due = 4.0 + 3.0 * (k as f64 - 1.0);
        DB::backdate(
            &env.pool,
            &env.schema,
            g.generation,
            RETENTION.as_secs_f64() - due,
        )
        .await?;
    }
    DB::backdate(
        &env.pool,
        &env.schema,
        generations[0].generation,
        RETENTION.as_secs_f64() * 2.0,
    )
    .await?;
    let before = store.ledger_generations().await?;
    eprintln!(
        "bench: {name} (ledger of {} rows, retention {} s, pruning every {} s)",
        before.iter().map(|g| g.rows).sum::<i64>(),
        RETENTION.as_secs(),
        RETENTION.as_secs() / 20
    );

    DB::truncate_events(&env.pool, &env.schema).await?;
    let group = format!("{}-{name}", env.schema);
    let runtime = Runtime::builder(Sink::new::<DB>(&env.schema, &group))
        .pool(env.pool.clone())
        .brokers(&env.brokers)
        .group(&group)
        .topic(TOPIC)
        .schema(&env.schema)
        .guarantee(Guarantee::EffectivelyOnce)
        .batch_size(BATCH)
        .handle_signals(false)
        .ledger_retention(RETENTION)
        .kafka_config("session.timeout.ms", "6000")
        .kafka_config("heartbeat.interval.ms", "1000")
        .build()?;
    let stats = runtime.stats();
    let stop = runtime.shutdown_handle();
    let memory = Memory::reset();
    let task = tokio::spawn(runtime.run());
    tokio::pin!(task);
    let result = async {
        let ticker = Ticker::start(name, env.args_messages);
        let timed =
            time_until_caught_up(env, &group, &ticker, &mut task, &stats, env.args_messages)
                .await?;
        drop(ticker);
        anyhow::Ok(timed)
    }
    .await;
    stop.shutdown();
    let stopped = tokio::time::timeout(Duration::from_secs(60), &mut task).await;
    let (messages, secs, cpu) = result?;
    match stopped {
        Ok(r) => r?.context("the runtime failed")?,
        Err(_) => anyhow::bail!("the runtime did not stop within 60 s"),
    }
    summary(name, &stats);
    let after = store.ledger_generations().await?;
    let dropped: Vec<i32> = before
        .iter()
        .filter(|g| !after.iter().any(|a| a.generation == g.generation))
        .map(|g| g.generation)
        .collect();
    let started_new = after
        .iter()
        .filter(|a| !before.iter().any(|g| g.generation == a.generation))
        .count();
    eprintln!(
        "  [{name}] pruning while it ran: generations {dropped:?} dropped, {started_new} started; the ledger went from {} to {} rows",
        before.iter().map(|g| g.rows).sum::<i64>(),
        after.iter().map(|g| g.rows).sum::<i64>()
    );
    let rows_written = DB::count_events(&env.pool, &env.schema).await?;
    if rows_written != env.args_messages as i64 {
        eprintln!(
            "bench: WARNING: after {name} the handler's table holds {rows_written} rows, expected {}",
            env.args_messages
        );
    }
    Ok(memory.finish(name, env.round(), messages, secs, cpu))
}

/// Seconds to remove `rows` ledger rows by dropping their generation, and by one `DELETE`, in a
/// schema of their own.
async fn drop_vs_delete<DB: RetentionDb>(env: &Env<DB>, rows: u64) -> anyhow::Result<(f64, f64)> {
    let schema = format!("{}_drop", env.schema);
    consumer_runtime::migrate(&env.pool, &schema).await?;
    let result = async {
        let store = Store::new(env.pool.clone(), &schema)?;
        let group = format!("{schema}-day");
        // Generation 0 (dropped) and 1 (deleted), `rows` each; 2 takes the claims.
        for g in 0..2 {
            let chunk = 500_000u64;
            let mut at = g * rows;
            while at < (g + 1) * rows {
                let end = (at + chunk).min((g + 1) * rows);
                DB::prefill(&env.pool, &schema, &group, at as i64, end as i64).await?;
                at = end;
            }
            switch(&store).await?;
        }
        DB::after_prefill(&env.pool, &schema).await?;
        eprintln!("bench: removing {rows} ledger rows: one DELETE, then a generation drop");
        let t = Instant::now();
        let deleted = DB::delete_generation(&env.pool, &schema, 1).await?;
        let delete_s = t.elapsed().as_secs_f64();
        anyhow::ensure!(deleted == rows, "the DELETE removed {deleted} rows, not {rows}");
        // Generation 0 falls due: its successor started two days ago, the retention is a day.
        DB::backdate(&env.pool, &schema, 1, 2.0 * 86_400.0).await?;
        let t = Instant::now();
        let report = store.prune_ledger(Duration::from_secs(86_400)).await?;
        let drop_s = t.elapsed().as_secs_f64();
        anyhow::ensure!(
            report.dropped == [0],
            "the prune dropped {:?}, not generation 0",
            report.dropped
        );
        eprintln!(
            "  [drop_vs_delete] DELETE: {deleted} rows in {delete_s:.3} s; generation drop: {} rows in {drop_s:.3} s",
            report.rows_dropped
        );
        anyhow::Ok((drop_s, delete_s))
    }
    .await;
    if let Err(e) = DB::drop_all(&env.pool, &schema).await {
        eprintln!("bench: could not drop {schema}: {e:#}");
    }
    result
}
