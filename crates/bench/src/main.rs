//! `bench`: the throughput and peak memory of consumer-runtime's delivery guarantees.
//!
//! ```sh
//! cargo run --release --bin bench -- --messages 200000 --partitions 8 --repeat 3 \
//!     [--database-url postgres://postgres@127.0.0.1:5432/test] [--ledger-rows K] --json FILE
//! ```
//!
//! It produces N order events (JSON, 200–500 bytes, an `event-id` header holding a UUID) into a
//! librdkafka mock cluster hosted in a child process (this program re-executed with
//! `--mock-broker P`, so that the topic the broker holds does not count in the consumer's
//! resident memory), then measures, in one run on one database,
//! each scenario of [`SCENARIOS`] with a handler that inserts one row per event (`_batch`
//! scenarios: a batch handler that inserts the whole batch with one statement), and
//! `server_limit`, the same SQL run by `pgbench` on the server. With `--repeat K` every
//! scenario runs K times, interleaved. It prints every run, each scenario's median and range,
//! and the targets (PostgreSQL, N = 200,000, P = 8) as met / not met on ratios of medians, and
//! writes the same as JSON.
//!
//! Runtime scenarios are timed from their first commit (the mock broker's group join takes
//! about 3 s and is not throughput) until the stored offsets reach the end of every partition;
//! the messages counted are those committed after the clock started. Each scenario uses a fresh
//! consumer group; the handler's table is emptied before each one. Everything lives in a schema
//! (PostgreSQL) or table prefix (SQLite) `bench_<random>` dropped at the end.

mod db;
mod relay;
mod report;
mod retention;
mod server;
mod workload;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use consumer_runtime::__bench::{self, Writer};
use consumer_runtime::rdkafka::Message as _;
use consumer_runtime::rdkafka::config::ClientConfig;
use consumer_runtime::rdkafka::consumer::{BaseConsumer, Consumer};
use consumer_runtime::rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use consumer_runtime::sqlx::{Pool, Postgres, Sqlite};
use consumer_runtime::{Batched, DatabaseKind, Guarantee, Handler, Runtime, Store};
use tokio::sync::Semaphore;

use crate::db::{BatchSink, BenchDb, Sink};
use crate::report::{Outcome, RunInfo};
use crate::workload::Workload;
use testkit::mock_broker::{self, MockBroker};

const TOPIC: &str = "bench-orders";
const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/test";
/// The runtime's default batch size, used by `sql_only_limit` and `server_limit` too.
const BATCH: usize = 500;
/// How long a scenario may wait for its first commit (the group join) before giving up.
const JOIN_LIMIT: Duration = Duration::from_secs(120);
/// How long a scenario may go without any progress before the benchmark gives up.
const STALL_LIMIT: Duration = Duration::from_secs(120);

/// Every scenario, in the order they run (in each round of `--repeat`).
const SCENARIOS: [&str; 11] = [
    "raw_consume",
    "server_limit",
    "sql_only_limit",
    "sql_only_batch_limit",
    "at_most_once",
    "at_least_once",
    "at_least_once_batch",
    "effectively_once_per_message",
    "effectively_once",
    "replay_processed",
    "effectively_once_batch",
];

fn main() -> std::process::ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    if argv.first().map(String::as_str) == Some(MOCK_BROKER_FLAG) {
        return match mock_broker(argv.get(1).map(String::as_str)) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("bench mock broker: {e:#}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("building the tokio runtime")
        .block_on(bench_main())
}

/// The internal flag that turns this program into the mock broker's host process.
const MOCK_BROKER_FLAG: &str = "--mock-broker";

/// The child process (`--mock-broker P`): the mock cluster with the topic of `P` partitions.
fn mock_broker(partitions: Option<&str>) -> anyhow::Result<()> {
    let partitions: i32 = partitions
        .context("--mock-broker needs the partition count")?
        .parse()
        .context("--mock-broker wants a whole number")?;
    mock_broker::serve(Some((TOPIC, partitions)))
}

/// The mock broker's child process's peak resident memory (VmHWM), MB.
fn peak_rss_mb(broker: &MockBroker) -> Option<f64> {
    let kb = status_kb_of(&format!("/proc/{}/status", broker.pid()), "VmHWM:")?;
    Some(kb as f64 / 1024.0)
}

async fn bench_main() -> std::process::ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,sqlx::query=error"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let args = Args::from_command_line();
    let result = match args.kind {
        DatabaseKind::Postgres => run::<Postgres>(&args).await,
        _ => run::<Sqlite>(&args).await,
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// The throughput and peak memory of consumer-runtime's delivery guarantees, against a mock
/// Kafka cluster and PostgreSQL or SQLite.
#[derive(clap::Parser)]
#[command(
    name = "bench",
    override_usage = "cargo run --release --bin bench -- [FLAGS]"
)]
struct Cli {
    /// Messages to produce.
    #[arg(long, value_name = "N", default_value = "200000", value_parser = whole_number)]
    messages: u64,
    /// Partitions of the topic.
    #[arg(long, value_name = "P", default_value = "8", value_parser = whole_number)]
    partitions: u64,
    /// postgres://… or sqlite://FILE.
    #[arg(long, value_name = "URL", default_value = DEFAULT_URL)]
    database_url: String,
    /// Pre-fill the ledger with K unrelated rows (random UUID event ids, in the
    /// effectively_once group) before the runtime scenarios; effectively_once is then also
    /// measured on the empty ledger first, as effectively_once_empty_ledger.
    #[arg(long, value_name = "K", default_value = "0", value_parser = whole_number)]
    ledger_rows: u64,
    /// Run only these (default: all).
    #[arg(
        long,
        value_name = "A,B,…",
        value_delimiter = ',',
        value_parser = clap::builder::PossibleValuesParser::new(SCENARIOS.iter().chain(&relay::SCENARIOS))
    )]
    scenarios: Vec<String>,
    /// Run every scenario K times, interleaved (all scenarios, then all again, …), and report
    /// each one's median and range; the targets' ratios are ratios of medians.
    #[arg(long, value_name = "K", default_value = "1", value_parser = whole_number)]
    repeat: u64,
    /// Write the results as JSON.
    #[arg(long, value_name = "FILE")]
    json: Option<std::path::PathBuf>,
    /// The JSON of an earlier run with fewer messages (e.g. --messages 100000): prints each
    /// common scenario's peak RSS growth from that run to this one.
    #[arg(long, value_name = "FILE")]
    rss_baseline: Option<std::path::PathBuf>,
    #[command(flatten)]
    retention: retention::RetentionArgs,
}

/// A count: digits, `_` allowed between them (`200_000`).
fn whole_number(v: &str) -> Result<u64, String> {
    v.replace('_', "")
        .parse()
        .map_err(|_| format!("wants a whole number, not `{v}`"))
}

struct Args {
    messages: u64,
    partitions: i32,
    url: String,
    kind: DatabaseKind,
    ledger_rows: u64,
    scenarios: Vec<String>,
    repeat: u32,
    json: Option<std::path::PathBuf>,
    rss_baseline: Option<std::path::PathBuf>,
    retention: retention::RetentionArgs,
}

impl Args {
    /// The command line's arguments; on a usage error, says so and exits with status 2 (as
    /// `--help` prints the usage and exits with 0).
    fn from_command_line() -> Args {
        use clap::{CommandFactory as _, Parser as _};
        let cli = Cli::parse();
        Args::check(cli).unwrap_or_else(|e| {
            Cli::command()
                .error(clap::error::ErrorKind::ValueValidation, format!("{e:#}"))
                .exit()
        })
    }

    fn check(cli: Cli) -> anyhow::Result<Args> {
        let scenarios = if cli.scenarios.is_empty() {
            SCENARIOS.iter().map(|s| (*s).to_owned()).collect()
        } else {
            cli.scenarios
        };
        let args = Args {
            messages: cli.messages,
            partitions: i32::try_from(cli.partitions).context("--partitions is too large")?,
            kind: DatabaseKind::from_url(&cli.database_url)?,
            url: cli.database_url,
            ledger_rows: cli.ledger_rows,
            scenarios,
            repeat: u32::try_from(cli.repeat).context("--repeat is too large")?,
            json: cli.json,
            rss_baseline: cli.rss_baseline,
            retention: cli.retention,
        };
        if args.wants("replay_processed") && !args.wants("effectively_once") {
            bail!("replay_processed replays effectively_once's group; add effectively_once");
        }
        if args.messages == 0 || args.partitions <= 0 {
            bail!("--messages and --partitions must be positive");
        }
        if args.repeat == 0 {
            bail!("--repeat must be at least 1");
        }
        if args.repeat > 1 && args.ledger_rows > 0 {
            bail!(
                "--ledger-rows measures one pair of runs (empty, then pre-filled ledger); use it without --repeat"
            );
        }
        Ok(args)
    }

    fn wants(&self, scenario: &str) -> bool {
        self.scenarios.iter().any(|s| s == scenario)
    }
}

/// What every scenario shares.
struct Env<DB: BenchDb> {
    args_messages: u64,
    partitions: i32,
    pool: Pool<DB>,
    /// A small pool for watching stored offsets, so that watching takes no connection from
    /// the runtime under test.
    watch_pool: Pool<DB>,
    schema: String,
    brokers: String,
    workload: Workload,
    /// Each partition's end offset.
    ends: Vec<i64>,
    /// The `--repeat` round under way (1-based).
    round: AtomicU32,
    /// Notes for the report (a scenario skipped, and why), each once.
    notes: std::sync::Mutex<Vec<String>>,
}

impl<DB: BenchDb> Env<DB> {
    fn note(&self, note: String) {
        let mut notes = self.notes.lock().expect("notes lock");
        if !notes.contains(&note) {
            notes.push(note);
        }
    }

    fn round(&self) -> u32 {
        self.round.load(Ordering::Relaxed)
    }

    /// The consumer group (and ledger scope) of `scenario` in this round: a fresh one for
    /// every run.
    fn group(&self, scenario: &str) -> String {
        match self.round() {
            1 => format!("{}-{scenario}", self.schema),
            r => format!("{}-{scenario}-r{r}", self.schema),
        }
    }
}

async fn run<DB: retention::RetentionDb + relay::RelayDb>(args: &Args) -> anyhow::Result<()>
where
    Sink: Handler<DB>,
    Batched<BatchSink>: Handler<DB>,
    DB::Connection: consumer_runtime::outbox::OutboxConnection,
{
    let wall = Instant::now();
    let schema = format!("bench_{:08x}", workload::random_u64() as u32);
    let workload = Workload::new(workload::random_u64());
    let n = args.messages;
    let p = args.partitions;
    eprintln!(
        "bench: {n} messages, {p} partitions, {} ({}), schema {schema}",
        DB::LABEL,
        consumer_runtime::error::redact_url(&args.url)
    );

    let cluster = MockBroker::start(&[MOCK_BROKER_FLAG, &p.to_string()])?;
    let brokers = cluster.bootstrap.clone();
    let produced = Instant::now();
    let (ends, sizes) = workload
        .produce(&brokers, TOPIC, n, p)
        .context("producing the messages")?;
    eprintln!(
        "bench: produced {n} messages in {:.1} s; payload bytes min {} avg {:.0} max {} (plus a 36-byte event-id header and a key; gzip-compressed on the broker)",
        produced.elapsed().as_secs_f64(),
        sizes.min,
        sizes.total as f64 / n as f64,
        sizes.max
    );

    let pool = consumer_runtime::connect::<DB>(&args.url, DB::POOL_SIZE).await?;
    let watch_pool = consumer_runtime::connect::<DB>(&args.url, 2).await?;
    consumer_runtime::migrate(&pool, &schema)
        .await
        .context("creating the runtime's tables")?;
    DB::create_events(&pool, &schema)
        .await
        .context("creating the handler's table")?;
    let env = Env {
        args_messages: n,
        partitions: p,
        pool,
        watch_pool,
        schema,
        brokers,
        workload,
        ends,
        round: AtomicU32::new(1),
        notes: std::sync::Mutex::new(Vec::new()),
    };
    let mut result = Ok(Vec::new());
    for round in 1..=args.repeat {
        env.round.store(round, Ordering::Relaxed);
        if args.repeat > 1 {
            eprintln!("bench: round {round} of {}", args.repeat);
        }
        match (scenarios(&env, args).await, &mut result) {
            (Ok(mut outcomes), Ok(all)) => all.append(&mut outcomes),
            (Err(e), _) => {
                result = Err(e);
                break;
            }
            (Ok(_), Err(_)) => unreachable!("the loop stops at the first error"),
        }
    }
    if let Err(e) = DB::drop_all(&env.pool, &env.schema).await {
        eprintln!("bench: could not drop {}: {e:#}", env.schema);
    }
    let outcomes = result?;
    if let Some(mb) = peak_rss_mb(&cluster) {
        eprintln!(
            "bench: the mock broker's process peaked at {mb:.1} MB resident (not counted above)"
        );
    }
    drop(cluster);

    report::report(
        &outcomes,
        &RunInfo {
            label: DB::LABEL,
            kind: args.kind,
            messages: args.messages,
            partitions: args.partitions,
            repeat: args.repeat,
            ledger_rows: args.ledger_rows,
            json: args.json.as_deref(),
            rss_baseline: args.rss_baseline.as_deref(),
            notes: &env.notes.lock().expect("notes lock"),
        },
    )?;
    relay::targets(&outcomes);
    println!("wall time {:.1} s", wall.elapsed().as_secs_f64());
    Ok(())
}

async fn scenarios<DB: retention::RetentionDb + relay::RelayDb>(
    env: &Env<DB>,
    args: &Args,
) -> anyhow::Result<Vec<Outcome>>
where
    Sink: Handler<DB>,
    Batched<BatchSink>: Handler<DB>,
    DB::Connection: consumer_runtime::outbox::OutboxConnection,
{
    if args.retention.retention {
        return retention::scenarios(env, &args.retention).await;
    }
    let mut out = Vec::new();
    let eo_group = env.group("effectively_once");
    if args.wants("raw_consume") {
        out.push(raw_consume(env).await?);
    }
    if args.wants("server_limit") {
        out.extend(server_limit(env, &args.url).await?);
    }
    if args.ledger_rows > 0 {
        if args.wants("effectively_once") {
            out.push(
                runtime_scenario(
                    env,
                    "effectively_once_empty_ledger",
                    Sink::new::<DB>(&env.schema, &format!("{eo_group}-empty")),
                    Guarantee::EffectivelyOnce,
                    BATCH,
                    false,
                )
                .await?
                .remove(0),
            );
        }
        prefill(env, &eo_group, args.ledger_rows).await?;
    }
    if args.wants("sql_only_limit") {
        let group = env.group("sql_only_limit");
        let sink = Sink::new::<DB>(&env.schema, &group);
        out.push(sql_only_limit(env, "sql_only_limit", sink).await?);
    }
    if args.wants("sql_only_batch_limit") {
        let group = env.group("sql_only_batch_limit");
        let sink = Batched(BatchSink::new::<DB>(&env.schema, &group));
        out.push(sql_only_limit(env, "sql_only_batch_limit", sink).await?);
    }
    for (name, guarantee, batch, batched) in [
        ("at_most_once", Guarantee::AtMostOnce, BATCH, false),
        ("at_least_once", Guarantee::AtLeastOnce, BATCH, false),
        ("at_least_once_batch", Guarantee::AtLeastOnce, BATCH, true),
        (
            "effectively_once_per_message",
            Guarantee::EffectivelyOnce,
            1,
            false,
        ),
        ("effectively_once", Guarantee::EffectivelyOnce, BATCH, false),
        (
            "effectively_once_batch",
            Guarantee::EffectivelyOnce,
            BATCH,
            true,
        ),
    ] {
        if args.wants(name) {
            let replay = name == "effectively_once" && args.wants("replay_processed");
            let group = env.group(name);
            let runs = if batched {
                let sink = Batched(BatchSink::new::<DB>(&env.schema, &group));
                runtime_scenario(env, name, sink, guarantee, batch, replay).await?
            } else {
                let sink = Sink::new::<DB>(&env.schema, &group);
                runtime_scenario(env, name, sink, guarantee, batch, replay).await?
            };
            out.extend(runs);
        }
    }
    out.extend(relay::scenarios(env, |s| args.wants(s)).await?);
    Ok(out)
}

/// Peak resident memory: resets the kernel's high-water mark (`VmHWM`) to the current RSS.
struct Memory {
    start_kb: u64,
}

impl Memory {
    fn reset() -> Memory {
        if std::fs::write("/proc/self/clear_refs", "5").is_err() {
            eprintln!("bench: cannot reset VmHWM (/proc/self/clear_refs); peaks are the process's");
        }
        Memory {
            start_kb: status_kb("VmRSS:").unwrap_or(0),
        }
    }

    fn finish(
        &self,
        scenario: &str,
        round: u32,
        messages: u64,
        seconds: f64,
        cpu: CpuUsed,
    ) -> Outcome {
        let peak = status_kb("VmHWM:").unwrap_or(0);
        Outcome {
            scenario: scenario.to_owned(),
            round,
            messages,
            seconds,
            peak_rss_mb: peak as f64 / 1024.0,
            start_rss_mb: self.start_kb as f64 / 1024.0,
            process_cpu_s: cpu.process_s,
            machine_busy_pct: cpu.machine_busy_pct,
            note: None,
        }
    }
}

fn status_kb(field: &str) -> Option<u64> {
    status_kb_of("/proc/self/status", field)
}

fn status_kb_of(path: &str, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(path).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line[field.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// CPU time so far: this process's (all threads) and the whole machine's, in clock ticks (USER_HZ,
/// 100 per second on Linux).
#[derive(Clone, Copy)]
struct Cpu {
    process: u64,
    busy: u64,
    total: u64,
}

/// CPU used between two [`Cpu`] readings.
#[derive(Clone, Copy, Default)]
struct CpuUsed {
    process_s: f64,
    machine_busy_pct: f64,
}

impl Cpu {
    fn now() -> Cpu {
        let process = std::fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|s| {
                // Fields after the command name (which is in parentheses): utime is the 12th
                // and stime the 13th of them.
                let rest = s.rsplit_once(')')?.1.to_owned();
                let f: Vec<&str> = rest.split_whitespace().collect();
                Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
            })
            .unwrap_or(0);
        let (busy, total) = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| {
                let line = s.lines().next()?;
                let v: Vec<u64> = line
                    .split_whitespace()
                    .skip(1)
                    .filter_map(|x| x.parse().ok())
                    .collect();
                let total: u64 = v.iter().take(8).sum();
                let idle = v.get(3)? + v.get(4)?;
                Some((total - idle, total))
            })
            .unwrap_or((0, 0));
        Cpu {
            process,
            busy,
            total,
        }
    }

    fn since(&self) -> CpuUsed {
        let now = Cpu::now();
        CpuUsed {
            process_s: now.process.saturating_sub(self.process) as f64 / 100.0,
            machine_busy_pct: 100.0 * now.busy.saturating_sub(self.busy) as f64
                / now.total.saturating_sub(self.total).max(1) as f64,
        }
    }
}

/// A line on stderr every 2 s while a scenario runs: how far, how fast, how long to go.
struct Ticker {
    label: String,
    done: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Ticker {
    fn start(label: &str, total: u64) -> Ticker {
        let done = Arc::new(AtomicU64::new(0));
        let name = label.to_owned();
        let label = label.to_owned();
        let counter = done.clone();
        let task = tokio::spawn(async move {
            let started = Instant::now();
            let mut first: Option<(Instant, u64)> = None;
            let mut tick = tokio::time::interval(Duration::from_secs(2));
            tick.tick().await;
            loop {
                tick.tick().await;
                let d = counter.load(Ordering::Relaxed);
                if d == 0 {
                    eprintln!(
                        "  [{label}] waiting for the first commit ({:.0} s; the mock broker's group join takes ~3 s)",
                        started.elapsed().as_secs_f64()
                    );
                    continue;
                }
                let (t0, d0) = *first.get_or_insert((Instant::now(), d));
                let secs = t0.elapsed().as_secs_f64();
                let rate = if secs > 0.5 {
                    (d - d0) as f64 / secs
                } else {
                    0.0
                };
                let eta = if rate > 0.0 {
                    format!(", ~{:.0} s to go", total.saturating_sub(d) as f64 / rate)
                } else {
                    String::new()
                };
                eprintln!(
                    "  [{label}] {d} / {total} ({:.1}%), {rate:.0} msg/s{eta}",
                    100.0 * d as f64 / total.max(1) as f64
                );
            }
        });
        Ticker {
            label: name,
            done,
            task,
        }
    }

    fn set(&self, n: u64) {
        self.done.store(n, Ordering::Relaxed);
    }

    fn add(&self, n: u64) {
        self.done.fetch_add(n, Ordering::Relaxed);
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// rdkafka alone, no database: a consumer assigned every partition from the beginning, counting
/// records until it has read them all. Timed from the first record.
async fn raw_consume<DB: BenchDb>(env: &Env<DB>) -> anyhow::Result<Outcome> {
    let name = "raw_consume";
    eprintln!("bench: {name}");
    let total = env.args_messages;
    let ticker = Ticker::start(name, total);
    let counter = ticker.done.clone();
    let memory = Memory::reset();
    let cpu = Cpu::now();
    let brokers = env.brokers.clone();
    let group = env.group(name);
    let partitions = env.partitions;
    let (count, secs) = tokio::task::spawn_blocking(move || -> anyhow::Result<(u64, f64)> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("group.id", &group)
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false")
            .create()
            .context("creating the consumer")?;
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition_offset(TOPIC, p, Offset::Beginning)?;
        }
        consumer.assign(&tpl)?;
        let mut count = 0u64;
        let mut bytes = 0usize;
        let mut start = None;
        let mut last_progress = Instant::now();
        while count < total {
            match consumer.poll(Duration::from_millis(100)) {
                Some(Ok(m)) => {
                    start.get_or_insert_with(Instant::now);
                    bytes += m.payload().map_or(0, <[u8]>::len);
                    count += 1;
                    last_progress = Instant::now();
                    if count.is_multiple_of(1000) {
                        counter.store(count, Ordering::Relaxed);
                    }
                }
                Some(Err(e)) => bail!("consuming: {e}"),
                None if last_progress.elapsed() > STALL_LIMIT => {
                    bail!("no record for {} s after {count}", STALL_LIMIT.as_secs())
                }
                None => {}
            }
        }
        std::hint::black_box(bytes);
        Ok((count, start.map_or(0.0, |s| s.elapsed().as_secs_f64())))
    })
    .await??;
    drop(ticker);
    Ok(memory.finish(name, env.round(), count, secs, cpu.since()))
}

/// The batch unit of work's SQL run by `pgbench` on the server ([`server`]); `None` (and a note)
/// when it cannot run: on SQLite, or without `pgbench`.
async fn server_limit<DB: BenchDb>(env: &Env<DB>, url: &str) -> anyhow::Result<Option<Outcome>> {
    let name = "server_limit";
    let Some(pool) = DB::as_postgres(&env.pool) else {
        env.note(format!(
            "{name} skipped: it runs pgbench, which needs PostgreSQL"
        ));
        return Ok(None);
    };
    let version = match server::available() {
        Ok(v) => v,
        Err(why) => {
            eprintln!("bench: {name} skipped: {why}");
            env.note(format!("{name} skipped: {why}"));
            return Ok(None);
        }
    };
    let clients =
        u32::try_from(__bench::max_writers(&env.pool).min(env.partitions.max(1) as usize))
            .unwrap_or(1);
    eprintln!(
        "bench: {name} ({version}, {clients} clients, {} records per transaction)",
        server::PER_TRANSACTION
    );
    DB::truncate_events(&env.pool, &env.schema).await?;
    let group = env.group(name);
    let memory = Memory::reset();
    let cpu = Cpu::now();
    let store = Store::new(pool.clone(), &env.schema)?;
    let run = server::run(&store, url, &group, TOPIC, env.args_messages, clients).await?;
    let used = cpu.since();
    let mut outcome = memory.finish(
        name,
        env.round(),
        run.messages,
        run.seconds,
        CpuUsed {
            process_s: run.client_cpu_s,
            machine_busy_pct: used.machine_busy_pct,
        },
    );
    outcome.note = Some(format!(
        "{name}: pgbench, {} clients, {} records per transaction (the runtime's own fence and ledger claim of server-generated UUIDs, one multi-row sink INSERT, COMMIT); seconds from pgbench's tps; cpu_us_per_msg is pgbench's own CPU, peak_rss_mb this idle process's",
        run.clients,
        server::PER_TRANSACTION
    ));
    check_rows(env, name, run.messages).await?;
    Ok(Some(outcome))
}

/// The runtime's exact per-batch SQL (the unit of work's write, [`Writer::write`]: the fence, the ledger claim,
/// the handler's inserts, the commit) on in-memory records in batches of [`BATCH`], every
/// partition concurrently and at most as many transactions at once as the runtime allows, with
/// no Kafka.
async fn sql_only_limit<DB: BenchDb, H: Handler<DB>>(
    env: &Env<DB>,
    name: &str,
    handler: H,
) -> anyhow::Result<Outcome> {
    eprintln!("bench: {name}");
    DB::truncate_events(&env.pool, &env.schema).await?;
    let group = env.group(name);
    let store = Store::new(env.pool.clone(), &env.schema)?;
    let handler = Arc::new(handler);
    let permits = Arc::new(Semaphore::new(__bench::max_writers(&env.pool).max(1)));
    let ticker = Arc::new(Ticker::start(name, env.args_messages));
    let memory = Memory::reset();
    let cpu = Cpu::now();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (partition, end) in (0..env.partitions).zip(env.ends.iter().copied()) {
        let mut writer =
            Writer::claim(&store, handler.clone(), &group, TOPIC, partition, "bench").await?;
        let permits = permits.clone();
        let ticker = ticker.clone();
        let workload = env.workload.clone();
        let partitions = env.partitions;
        tasks.push(tokio::spawn(async move {
            let mut applied = 0usize;
            let mut from = 0i64;
            while from < end {
                let to = (from + BATCH as i64).min(end);
                let batch: Vec<_> = (from..to)
                    .map(|offset| workload.message(TOPIC, partition, offset, partitions))
                    .collect();
                let permit = permits.acquire().await?;
                let written = writer.write(&batch).await;
                drop(permit);
                match written {
                    Ok(a) => applied += a,
                    Err(e) => bail!("partition {partition}: {e}"),
                }
                ticker.add((to - from) as u64);
                from = to;
            }
            Ok::<_, anyhow::Error>(applied)
        }));
    }
    let mut applied = 0;
    for t in tasks {
        applied += t.await??;
    }
    let secs = started.elapsed().as_secs_f64();
    let cpu = cpu.since();
    drop(ticker);
    let outcome = memory.finish(name, env.round(), applied as u64, secs, cpu);
    check_rows(env, name, env.args_messages).await?;
    Ok(outcome)
}

/// Sums the group's stored offsets (a partition without a commit counts as 0) and says whether
/// every partition is at its end.
async fn progress<DB: BenchDb>(env: &Env<DB>, group: &str) -> anyhow::Result<(u64, Vec<i64>)> {
    let stored = Store::new(env.watch_pool.clone(), &env.schema)?
        .stored_offsets(group)
        .await?;
    let positions: Vec<i64> = (0..env.partitions)
        .map(|p| {
            stored
                .iter()
                .find(|s| s.topic == TOPIC && s.partition == p)
                .and_then(|s| s.next_offset)
                .unwrap_or(0)
        })
        .collect();
    Ok((positions.iter().sum::<i64>() as u64, positions))
}

/// The records the runtime has finished with: applied, skipped or lost.
fn finished(stats: &consumer_runtime::Stats) -> u64 {
    let stats = stats.snapshot();
    stats.applied + stats.duplicates + stats.lost
}

/// Waits for the first commit (the clock starts there), then until every partition's stored
/// offset is at its end and the runtime's counters have reached `finished_target` (at-most-once
/// commits the offset before the handler's transaction, so the offsets alone end too early).
/// Returns the messages committed after the clock started and the seconds.
async fn time_until_caught_up<DB: BenchDb, F>(
    env: &Env<DB>,
    group: &str,
    ticker: &Ticker,
    running: &mut std::pin::Pin<&mut F>,
    stats: &consumer_runtime::Stats,
    finished_target: u64,
) -> anyhow::Result<(u64, f64, CpuUsed)>
where
    F: Future<Output = Result<Result<(), consumer_runtime::Error>, tokio::task::JoinError>>,
{
    // Per partition: seconds from the call (the runtime's start, or the rewind) to its first
    // commit and to its end, to show how evenly the partitions run.
    let origin = Instant::now();
    let mut first = vec![None; env.ends.len()];
    let mut caught_up = vec![None; env.ends.len()];
    let mut note = |positions: &[i64]| {
        let t = origin.elapsed().as_secs_f64();
        for (i, at) in positions.iter().enumerate() {
            if *at > 0 && first[i].is_none() {
                first[i] = Some(t);
            }
            if *at == env.ends[i] && caught_up[i].is_none() {
                caught_up[i] = Some(t);
            }
        }
    };
    let (start_sum, start, cpu) = loop {
        let (sum, positions) = progress(env, group).await?;
        note(&positions);
        if sum > 0 {
            break (sum, Instant::now(), Cpu::now());
        }
        if origin.elapsed() > JOIN_LIMIT {
            bail!("no commit within {} s", JOIN_LIMIT.as_secs());
        }
        tokio::select! {
            r = running.as_mut() => bail!("the runtime stopped before its first commit: {:?}", r?),
            () = tokio::time::sleep(Duration::from_millis(5)) => {}
        }
    };
    let mut last = (start_sum, Instant::now());
    loop {
        let (sum, positions) = progress(env, group).await?;
        note(&positions);
        ticker.set(sum);
        let done = positions.iter().zip(&env.ends).all(|(a, e)| a == e);
        if done && finished(stats) >= finished_target {
            let secs = start.elapsed().as_secs_f64();
            let cpu = cpu.since();
            let show = |v: &[Option<f64>]| {
                v.iter()
                    .map(|t| t.map_or("-".to_owned(), |t| format!("{t:.2}")))
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            eprintln!(
                "  [{}] per partition, s after start: first commit [{}], at end [{}]",
                ticker.label,
                show(&first),
                show(&caught_up)
            );
            return Ok((sum - start_sum, secs, cpu));
        }
        if sum != last.0 {
            last = (sum, Instant::now());
        } else if last.1.elapsed() > STALL_LIMIT {
            bail!("no progress for {} s at {sum}", STALL_LIMIT.as_secs());
        }
        tokio::select! {
            r = running.as_mut() => bail!("the runtime stopped before catching up: {:?}", r?),
            () = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
    }
}

/// One runtime scenario (a fresh group); with `replay`, then rewinds that group to offset 0
/// while its runtime runs and measures `replay_processed`.
async fn runtime_scenario<DB: BenchDb, H: Handler<DB>>(
    env: &Env<DB>,
    name: &str,
    handler: H,
    guarantee: Guarantee,
    batch_size: usize,
    replay: bool,
) -> anyhow::Result<Vec<Outcome>> {
    eprintln!("bench: {name} (guarantee {guarantee}, batch size {batch_size})");
    DB::truncate_events(&env.pool, &env.schema).await?;
    let group = env.group(name.trim_end_matches("_empty_ledger"));
    let group = if name.ends_with("_empty_ledger") {
        format!("{group}-empty")
    } else {
        group
    };
    let runtime = Runtime::builder(handler)
        .pool(env.pool.clone())
        .brokers(&env.brokers)
        .group(&group)
        .topic(TOPIC)
        .schema(&env.schema)
        .guarantee(guarantee)
        .batch_size(batch_size)
        .handle_signals(false)
        // A rewind is noticed within 200 ms instead of 1 s (replay_processed).
        .epoch_check_interval(Duration::from_millis(200))
        .kafka_config("session.timeout.ms", "6000")
        .kafka_config("heartbeat.interval.ms", "1000")
        .build()?;
    let stats = runtime.stats();
    let stop = runtime.shutdown_handle();
    let memory = Memory::reset();
    let task = tokio::spawn(runtime.run());
    tokio::pin!(task);
    let mut out = Vec::new();
    let result: anyhow::Result<()> = async {
        let ticker = Ticker::start(name, env.args_messages);
        let (messages, secs, cpu) =
            time_until_caught_up(env, &group, &ticker, &mut task, &stats, env.args_messages)
                .await?;
        drop(ticker);
        out.push(memory.finish(name, env.round(), messages, secs, cpu));
        summary(name, &stats);
        check_rows(env, name, env.args_messages).await?;
        if replay {
            let name = "replay_processed";
            eprintln!("bench: {name} (effectively_once's group rewound to offset 0)");
            let before = stats.snapshot().duplicates;
            let memory = Memory::reset();
            let ticker = Ticker::start(name, env.args_messages);
            let rewind: Vec<(i32, i64)> = (0..env.partitions).map(|p| (p, 0)).collect();
            consumer_runtime::Store::new(env.pool.clone(), &env.schema)?
                .set_offsets(&group, TOPIC, &rewind)
                .await?;
            let target = finished(&stats) + env.args_messages;
            let (messages, secs, cpu) =
                time_until_caught_up(env, &group, &ticker, &mut task, &stats, target).await?;
            drop(ticker);
            out.push(memory.finish(name, env.round(), messages, secs, cpu));
            let skipped = stats.snapshot().duplicates - before;
            summary(name, &stats);
            if skipped != env.args_messages {
                eprintln!(
                    "bench: WARNING: {name} skipped {skipped} records, expected {}",
                    env.args_messages
                );
            }
            check_rows(env, name, env.args_messages).await?;
        }
        Ok(())
    }
    .await;
    stop.shutdown();
    let stopped = tokio::time::timeout(Duration::from_secs(60), &mut task).await;
    result?;
    match stopped {
        Ok(r) => r?.context("the runtime failed")?,
        Err(_) => bail!("the runtime did not stop within 60 s"),
    }
    Ok(out)
}

fn summary(name: &str, stats: &consumer_runtime::Stats) {
    let stats = stats.snapshot();
    eprintln!(
        "  [{name}] done: applied {} skipped {} lost {} batches {} retries {} fenced {} (runtime totals)",
        stats.applied, stats.duplicates, stats.lost, stats.batches, stats.retries, stats.fenced,
    );
}

/// The handler's table must hold one row per message after each scenario.
async fn check_rows<DB: BenchDb>(env: &Env<DB>, name: &str, expected: u64) -> anyhow::Result<()> {
    let rows = DB::count_events(&env.pool, &env.schema).await?;
    if rows != expected as i64 {
        eprintln!(
            "bench: WARNING: after {name} the handler's table holds {rows} rows, expected {expected}"
        );
    }
    Ok(())
}

/// Fills the ledger with `k` rows of random UUID event ids in `group`, in chunks.
async fn prefill<DB: BenchDb>(env: &Env<DB>, group: &str, k: u64) -> anyhow::Result<()> {
    let started = Instant::now();
    eprintln!("bench: pre-filling the ledger with {k} rows (group {group})");
    let chunk = 500_000u64;
    let mut from = 0;
    let mut last = Instant::now();
    while from < k {
        let to = (from + chunk).min(k);
        DB::prefill(&env.pool, &env.schema, group, from as i64, to as i64).await?;
        from = to;
        if last.elapsed() > Duration::from_secs(2) || from == k {
            last = Instant::now();
            eprintln!(
                "  [prefill] {from} / {k} ({:.0} s)",
                started.elapsed().as_secs_f64()
            );
        }
    }
    DB::after_prefill(&env.pool, &env.schema).await?;
    eprintln!(
        "bench: ledger pre-filled in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
