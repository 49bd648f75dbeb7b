//! What each subcommand does, once its settings are resolved.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use sqlx::Pool;
use sqlx::migrate::Migrate;
use tracing::info;

use super::args::{EventIdArg, show_properties};
use super::settings::{Action, ReplaySettings, RunSettings, Settings};
use super::{App, CliError};
use crate::config::RetryPolicy;
use crate::error::{Error, redact_url};
use crate::event_id::EventId;
use crate::handler::Handler;
use crate::replay::{PartitionReplay, ReplayMode, ReplayProgress, ReplayRequest};
use crate::runtime::Runtime;
use crate::store::{Backend, StoredOffset, check_schema, connect, set_offsets};

/// Connections for the commands that only read or move offsets.
const TOOL_POOL: u32 = 2;
/// The default number of concurrent transactions of `run`.
const DEFAULT_CONCURRENCY: usize = 8;
/// How long a Kafka metadata or watermark request may take.
const KAFKA_TIMEOUT: Duration = Duration::from_secs(10);

pub(super) async fn execute<H: Handler<DB>, DB: Backend>(
    app: App<H, DB>,
    settings: Settings,
) -> Result<(), CliError>
where
    DB::Connection: Migrate,
{
    let Settings {
        database_url,
        schema,
        kafka,
        action,
        ..
    } = settings;
    match action {
        Action::Run(run) => run_consumer(app, &database_url, schema, kafka, run).await,
        Action::Migrate => migrate(app, &database_url, &schema).await,
        Action::Offsets { group, topic } => {
            let pool = open::<DB>(&database_url, &schema, TOOL_POOL).await?;
            let rows = stored_offsets(&pool, &schema, &group, topic.as_deref()).await?;
            let table: Vec<Vec<String>> = rows
                .iter()
                .map(|r| {
                    vec![
                        r.topic.clone(),
                        r.partition.to_string(),
                        or_dash(r.next_offset),
                        r.epoch.to_string(),
                        r.owner.clone().unwrap_or_else(|| "-".into()),
                        r.updated_at.clone(),
                    ]
                })
                .collect();
            print!(
                "{}",
                render_table(
                    &[
                        "topic",
                        "partition",
                        "next_offset",
                        "epoch",
                        "owner",
                        "updated_at"
                    ],
                    &table
                )
            );
            Ok(())
        }
        Action::SetOffset {
            group,
            topic,
            partition,
            offset,
        } => {
            let pool = open::<DB>(&database_url, &schema, TOOL_POOL).await?;
            let queries = DB::queries(&schema)?;
            let old = DB::offsets(&pool, &queries, &group)
                .await?
                .into_iter()
                .find(|r| r.topic == topic && r.partition == partition);
            let claims =
                set_offsets(&pool, &schema, &group, &topic, &[(partition, offset)]).await?;
            let new = claims.first().ok_or_else(|| {
                CliError::Failed("the database returned no row for the moved offset".into())
            })?;
            println!(
                "group {group} {topic}/{partition}: next_offset {} → {} (epoch {} → {})",
                old.as_ref()
                    .map_or_else(|| "-".to_owned(), |r| or_dash(r.next_offset)),
                or_dash(new.next_offset),
                old.as_ref()
                    .map_or_else(|| "-".to_owned(), |r| r.epoch.to_string()),
                new.epoch
            );
            Ok(())
        }
        Action::Status {
            brokers,
            group,
            topic,
            configured,
        } => {
            status::<DB>(
                &database_url,
                &schema,
                kafka,
                brokers,
                group,
                topic,
                configured,
            )
            .await
        }
        Action::Replay(replay) => replay_command(app, &database_url, &schema, kafka, replay).await,
    }
}

/// Connects and checks that the runtime's tables are up to date.
async fn open<DB: Backend>(url: &str, schema: &str, size: u32) -> Result<Pool<DB>, CliError> {
    let pool = connect::<DB>(url, size).await?;
    let queries = DB::queries(schema)?;
    check_schema(&pool, &queries).await?;
    Ok(pool)
}

/// A group's stored offsets (of one topic, if given); an error naming the group when there are
/// none.
async fn stored_offsets<DB: Backend>(
    pool: &Pool<DB>,
    schema: &str,
    group: &str,
    topic: Option<&str>,
) -> Result<Vec<StoredOffset>, CliError> {
    let queries = DB::queries(schema)?;
    let rows = DB::offsets(pool, &queries, group).await?;
    if rows.is_empty() {
        return Err(unknown_group(group, schema));
    }
    let rows: Vec<StoredOffset> = rows
        .into_iter()
        .filter(|r| topic.is_none_or(|t| r.topic == t))
        .collect();
    if rows.is_empty() {
        return Err(CliError::Usage(format!(
            "consumer group `{group}` has no stored offsets for topic `{}`; check --topic",
            topic.unwrap_or_default()
        )));
    }
    Ok(rows)
}

fn unknown_group(group: &str, schema: &str) -> CliError {
    CliError::Usage(format!(
        "consumer group `{group}` has no stored offsets in schema `{schema}`; check --group (a group appears once its consumer has been assigned partitions)"
    ))
}

fn or_dash(v: Option<i64>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

/// The event-id strategy: `--event-id` (or the file's `event_id`), else the program's own,
/// else the `event-id` header.
fn event_id<E>(chosen: Option<EventIdArg>, program_default: Option<EventId<E>>) -> EventId<E> {
    match chosen {
        Some(EventIdArg::Header(name)) => EventId::header(name),
        Some(EventIdArg::Coordinates) => EventId::coordinates(),
        None => program_default.unwrap_or_default(),
    }
}

/// A librdkafka client configuration: the bootstrap servers, then the raw properties.
fn client_config(brokers: &str, kafka: &[(String, String)]) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", brokers);
    for (k, v) in kafka {
        config.set(k, v);
    }
    config
}

async fn run_consumer<H: Handler<DB>, DB: Backend>(
    app: App<H, DB>,
    url: &str,
    schema: String,
    kafka: Vec<(String, String)>,
    run: RunSettings,
) -> Result<(), CliError> {
    let concurrency = run.concurrency.unwrap_or(DEFAULT_CONCURRENCY);
    // The claims on assignment and the epoch watcher need connections besides the writers.
    let pool_size = u32::try_from(concurrency).unwrap_or(u32::MAX - 2) + 2;
    info!(
        database = %redact_url(url),
        brokers = %run.brokers,
        schema = %schema,
        kafka = %show_properties(&kafka),
        "{} run: connecting",
        app.name
    );
    let pool = connect::<DB>(url, pool_size).await?;
    let mut builder = Runtime::<H, DB>::builder(app.handler)
        .pool(pool)
        .brokers(run.brokers)
        .group(run.group)
        .topics(run.topics)
        .schema(schema)
        .concurrency(concurrency)
        .event_id(event_id(run.event_id, app.event_id))
        .handle_signals(true);
    if let Some(n) = run.batch_size {
        builder = builder.batch_size(n);
    }
    if let Some(wait) = run.batch_wait {
        builder = builder.batch_wait(wait);
    }
    if let Some(g) = run.guarantee {
        builder = builder.guarantee(g);
    }
    if let Some(reset) = run.offset_reset {
        builder = builder.offset_reset(reset);
    }
    if let Some(assignor) = run.assignor {
        builder = builder.assignor(assignor);
    }
    if let Some(max_attempts) = run.max_attempts {
        builder = builder.retry_policy(RetryPolicy {
            max_attempts,
            ..RetryPolicy::default()
        });
    }
    for (k, v) in kafka {
        builder = builder.kafka_config(k, v);
    }
    let runtime = builder.build()?;
    let stats = runtime.stats();
    runtime.run().await?;
    let n = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    info!(
        applied = n(&stats.applied),
        duplicates_skipped = n(&stats.duplicates),
        lost = n(&stats.lost),
        batches = n(&stats.batches),
        retries = n(&stats.retries),
        "stopped"
    );
    Ok(())
}

async fn migrate<H: Handler<DB>, DB: Backend>(
    app: App<H, DB>,
    url: &str,
    schema: &str,
) -> Result<(), CliError>
where
    DB::Connection: Migrate,
{
    info!(database = %redact_url(url), schema, "{} migrate", app.name);
    let pool = connect::<DB>(url, TOOL_POOL).await?;
    let version = crate::store::migrate(&pool, schema).await?;
    let applications = match &app.migrations {
        Some(migrator) => {
            migrator.run(&pool).await.map_err(|e| {
                CliError::Failed(format!("applying the application's migrations failed: {e}"))
            })?;
            match migrator.iter().map(|m| m.version).max() {
                Some(v) => format!("application migrations at version {v}"),
                None => "no application migrations".to_owned(),
            }
        }
        None => "no application migrations".to_owned(),
    };
    println!("runtime schema {schema} at version {version}; {applications}");
    Ok(())
}

/// Per topic, the high watermark of each partition; `None` for a topic the brokers do not know.
type Watermarks = BTreeMap<String, Option<BTreeMap<i32, i64>>>;

async fn status<DB: Backend>(
    url: &str,
    schema: &str,
    kafka: Vec<(String, String)>,
    brokers: String,
    group: String,
    topic: Option<String>,
    configured: Vec<String>,
) -> Result<(), CliError> {
    let pool = open::<DB>(url, schema, TOOL_POOL).await?;
    let queries = DB::queries(schema)?;
    let rows = DB::offsets(&pool, &queries, &group).await?;
    if rows.is_empty() {
        return Err(unknown_group(&group, schema));
    }
    let topics: BTreeSet<String> = match &topic {
        Some(t) => BTreeSet::from([t.clone()]),
        None => rows
            .iter()
            .map(|r| r.topic.clone())
            .chain(configured)
            .collect(),
    };
    let config = client_config(&brokers, &kafka);
    let brokers_shown = brokers.clone();
    let wanted: Vec<String> = topics.iter().cloned().collect();
    let marks = tokio::task::spawn_blocking(move || watermarks(&config, &brokers, &wanted))
        .await
        .map_err(|e| Error::Internal(format!("the watermark task failed: {e}")))??;

    let mut table = Vec::new();
    let mut total_lag = 0i64;
    for topic in &topics {
        let stored: BTreeMap<i32, &StoredOffset> = rows
            .iter()
            .filter(|r| &r.topic == topic)
            .map(|r| (r.partition, r))
            .collect();
        let high = marks.get(topic).cloned().flatten();
        let partitions: BTreeSet<i32> = stored
            .keys()
            .copied()
            .chain(high.iter().flat_map(|h| h.keys().copied()))
            .collect();
        for p in partitions {
            let row = stored.get(&p);
            let next = row.and_then(|r| r.next_offset);
            let hw = high.as_ref().and_then(|h| h.get(&p)).copied();
            let lag = match (hw, next) {
                (Some(hw), Some(next)) => {
                    total_lag += hw - next;
                    (hw - next).to_string()
                }
                _ => "-".to_owned(),
            };
            table.push(vec![
                topic.clone(),
                p.to_string(),
                or_dash(next),
                hw.map_or_else(|| "?".to_owned(), |h| h.to_string()),
                lag,
                row.map_or_else(|| "-".to_owned(), |r| r.epoch.to_string()),
                row.map_or_else(|| "-".to_owned(), |r| r.updated_at.clone()),
            ]);
        }
        if high.is_none() && partitions_empty(&table, topic) {
            return Err(Error::UnknownTopic {
                topic: topic.clone(),
                brokers: brokers_shown.clone(),
            }
            .into());
        }
        if high.is_none() {
            tracing::warn!(
                topic,
                "the brokers do not know this topic; its high watermarks are shown as ?"
            );
        }
    }
    print!(
        "{}",
        render_table(
            &[
                "topic",
                "partition",
                "stored_offset",
                "high_watermark",
                "lag",
                "epoch",
                "updated_at"
            ],
            &table
        )
    );
    println!("total lag {total_lag} over {} partitions", table.len());
    Ok(())
}

fn partitions_empty(table: &[Vec<String>], topic: &str) -> bool {
    !table.iter().any(|row| row[0] == topic)
}

/// The high watermark of every partition of `topics` (`None` for a topic the brokers do not
/// know). Blocking: run it on a blocking thread.
fn watermarks(
    config: &ClientConfig,
    brokers: &str,
    topics: &[String],
) -> Result<Watermarks, Error> {
    let consumer: BaseConsumer = config
        .create()
        .map_err(|e| Error::Config(format!("the Kafka client configuration was refused: {e}")))?;
    let mut out = Watermarks::new();
    for topic in topics {
        let metadata = consumer
            .fetch_metadata(Some(topic), KAFKA_TIMEOUT)
            .map_err(|e| Error::BrokerUnreachable {
                brokers: brokers.to_owned(),
                detail: e.to_string(),
            })?;
        let Some(meta) = metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty())
        else {
            out.insert(topic.clone(), None);
            continue;
        };
        let mut partitions = BTreeMap::new();
        for p in meta.partitions() {
            let (_low, high) = consumer
                .fetch_watermarks(topic, p.id(), KAFKA_TIMEOUT)
                .map_err(Error::kafka("fetching high watermarks"))?;
            partitions.insert(p.id(), high);
        }
        out.insert(topic.clone(), Some(partitions));
    }
    Ok(out)
}

async fn replay_command<H: Handler<DB>, DB: Backend>(
    app: App<H, DB>,
    url: &str,
    schema: &str,
    kafka: Vec<(String, String)>,
    r: ReplaySettings,
) -> Result<(), CliError> {
    let mode = match (r.dry_run, r.rebuild) {
        (true, _) => ReplayMode::DryRun,
        (false, true) => ReplayMode::Rebuild,
        (false, false) => ReplayMode::Apply,
    };
    info!(
        database = %redact_url(url),
        brokers = %r.brokers,
        schema,
        kafka = %show_properties(&kafka),
        group = %r.group,
        topic = %r.topic,
        partition = ?r.partition,
        from = %r.from,
        mode = %mode,
        "{} replay",
        app.name
    );
    if mode == ReplayMode::Rebuild {
        tracing::warn!(
            "--rebuild: the ledger rows of the range are deleted, so the handler runs AGAIN for every record it already processed in the range"
        );
    }
    let pool = open::<DB>(url, schema, TOOL_POOL).await?;
    let config = client_config(&r.brokers, &kafka);
    let strategy = event_id(r.event_id, app.event_id);
    let request = ReplayRequest {
        group: r.group.clone(),
        topic: r.topic.clone(),
        partition: r.partition,
        from: r.from,
    };
    let mut progress = ProgressLine::new();
    let result = crate::replay::replay(
        &pool,
        schema,
        &config,
        &strategy,
        &request,
        mode,
        &mut |p| progress.report(p),
    )
    .await;
    progress.finish();
    let partitions = result?;
    print!("{}", replay_table(mode, &partitions));
    let records: u64 = partitions.iter().map(|p| p.records).sum();
    let moved = partitions.iter().filter(|p| p.from < p.to).count();
    let (group, topic, from) = (&r.group, &r.topic, r.from);
    match mode {
        ReplayMode::DryRun => {
            let skipped: u64 = partitions.iter().filter_map(|p| p.already_processed).sum();
            println!(
                "dry run, nothing changed: replaying {topic} for group {group} from {from} would re-read {records} records in {moved} partitions; the ledger would skip {skipped} of them and the handler would run for {}",
                records.saturating_sub(skipped)
            );
        }
        ReplayMode::Apply => println!(
            "replayed {topic} for group {group} from {from}: {moved} partitions moved back over {records} records; running consumers reload within a second, and the ledger skips every record already processed"
        ),
        _ => {
            let cleared: u64 = partitions.iter().map(|p| p.ledger_rows_cleared).sum();
            println!(
                "rebuilt {topic} for group {group} from {from}: {moved} partitions moved back over {records} records and {cleared} ledger rows deleted; the handler runs again for those events"
            );
        }
    }
    Ok(())
}

/// The replay's table: one row per partition, range `[from, to)`.
fn replay_table(mode: ReplayMode, partitions: &[PartitionReplay]) -> String {
    let mut headers = vec!["partition", "from", "to", "high_watermark", "records"];
    match mode {
        ReplayMode::DryRun => headers.push("already_processed"),
        ReplayMode::Rebuild => headers.push("ledger_rows_cleared"),
        _ => {}
    }
    let rows: Vec<Vec<String>> = partitions
        .iter()
        .map(|p| {
            let mut row = vec![
                p.partition.to_string(),
                p.from.to_string(),
                p.to.to_string(),
                p.high_watermark.to_string(),
                p.records.to_string(),
            ];
            match mode {
                ReplayMode::DryRun => row.push(or_dash(
                    p.already_processed.and_then(|n| i64::try_from(n).ok()),
                )),
                ReplayMode::Rebuild => row.push(p.ledger_rows_cleared.to_string()),
                _ => {}
            }
            row
        })
        .collect();
    render_table(&headers, &rows)
}

/// A dry run's progress on stderr: one line rewritten with `\r` on a terminal; otherwise a
/// line per finished partition.
struct ProgressLine {
    terminal: bool,
    shown: bool,
}

impl ProgressLine {
    fn new() -> Self {
        use std::io::IsTerminal as _;
        ProgressLine {
            terminal: std::io::stderr().is_terminal(),
            shown: false,
        }
    }

    fn report(&mut self, p: ReplayProgress) {
        let percent = (p.read * 100).checked_div(p.span).unwrap_or(100).min(100);
        let text = format!(
            "partition {}: {} of {} records read ({percent}%), {} already processed{}",
            p.partition,
            p.read,
            p.span,
            p.already_processed,
            if p.done { ", done" } else { "" }
        );
        if self.terminal {
            eprint!("\r\x1b[2K{text}");
            self.shown = true;
        } else if p.done {
            eprintln!("{text}");
        }
    }

    fn finish(&mut self) {
        if self.shown {
            eprintln!();
            self.shown = false;
        }
    }
}

/// A plain-text table: columns padded to their widest cell, numbers right-aligned.
pub(super) fn render_table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let numeric: Vec<bool> = (0..headers.len())
        .map(|c| {
            rows.iter().all(|r| {
                let cell = r.get(c).map_or("", String::as_str);
                cell == "-" || cell == "?" || cell.parse::<i64>().is_ok()
            })
        })
        .collect();
    let widths: Vec<usize> = (0..headers.len())
        .map(|c| {
            rows.iter()
                .map(|r| r.get(c).map_or(0, |s| s.chars().count()))
                .chain([headers[c].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (c, cell) in cells.iter().enumerate() {
            if c > 0 {
                out.push_str("  ");
            }
            let pad = widths[c].saturating_sub(cell.chars().count());
            if numeric[c] {
                out.push_str(&" ".repeat(pad));
                out.push_str(cell);
            } else {
                out.push_str(cell);
                if c + 1 < cells.len() {
                    out.push_str(&" ".repeat(pad));
                }
            }
        }
        out.push('\n');
        out
    };
    let mut out = line(headers.to_vec());
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}
