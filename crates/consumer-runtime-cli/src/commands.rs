//! What each subcommand does, once its settings are resolved.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use sqlx::migrate::Migrate;
use tracing::{info, warn};

use consumer_runtime::dead_letters::{DeadLetter, Redriven};
use consumer_runtime::error::redact_url;
use consumer_runtime::relay::Relay;
use consumer_runtime::{
    Backend, ConsumerOptions, Error, EventId, Handler, PartitionReplay, ReplayMode, ReplayProgress,
    ReplayRequest, Runtime, Store, StoredOffset, connect,
};

use crate::args::{EventIdArg, RelayOptions, show_properties};
use crate::settings::{
    Action, DEFAULT_CONCURRENCY, DeadLetters, PurgeTarget, RedriveTarget, ReplaySettings,
    RunSettings, Settings,
};
use crate::{App, CliError, exporter};

/// Connections for the commands that only read or move offsets.
const TOOL_POOL: u32 = 2;
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
        options,
        action,
        ..
    } = settings;
    let (schema, kafka) = (options.schema.as_str(), &options.kafka);
    match action {
        Action::Run(run) => run_consumer(app, &database_url, options, run).await,
        Action::Migrate => migrate(app, &database_url, schema).await,
        Action::Offsets { group, topic } => {
            let store = open::<DB>(&database_url, schema, TOOL_POOL).await?;
            let rows = stored_offsets(&store, &group, topic.as_deref()).await?;
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
            let store = open::<DB>(&database_url, schema, TOOL_POOL).await?;
            let find = |rows: Vec<StoredOffset>| {
                rows.into_iter()
                    .find(|r| r.topic == topic && r.partition == partition)
            };
            let old = find(store.stored_offsets(&group).await?);
            store
                .set_offsets(&group, &topic, &[(partition, offset)])
                .await?;
            let new = find(store.stored_offsets(&group).await?).ok_or_else(|| {
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
                schema,
                kafka,
                brokers,
                group,
                topic,
                configured,
            )
            .await
        }
        Action::Replay(replay) => replay_command(app, &database_url, schema, kafka, replay).await,
        Action::DeadLetters(action) => {
            let store = open::<DB>(&database_url, schema, TOOL_POOL).await?;
            dead_letters_command(app, &store, action).await
        }
        Action::Relay {
            brokers,
            relay,
            metrics_addr,
        } => {
            let store = open::<DB>(&database_url, schema, RELAY_POOL).await?;
            let _server = match &metrics_addr {
                Some(addr) => Some(serve_metrics(&addr.0).await?),
                None => None,
            };
            let relay = build_relay(&store, &brokers, kafka, &relay, true)?;
            let stop = relay.shutdown_handle();
            let stats = relay.stats_handle();
            let signals = tokio::spawn(async move {
                shutdown_signal().await;
                info!("relay: stopping (signal)");
                stop.shutdown();
            });
            let result = relay.run().await;
            signals.abort();
            result?;
            let s = stats.get();
            info!(
                published = s.published,
                sent = s.sent,
                parked = s.parked,
                fenced_lanes = s.fenced,
                "relay stopped"
            );
            Ok(())
        }
        Action::Trace { event_id } => {
            let store = open::<DB>(&database_url, schema, TOOL_POOL).await?;
            let trace = store.trace(&event_id).await?;
            if trace.outbox.is_none() && trace.applied.is_empty() {
                return Err(CliError::Usage(format!(
                    "no event `{event_id}` in the outbox or the ledger of schema `{schema}`; check the id (the record's `event-id` header) and --schema"
                )));
            }
            for line in trace.lines() {
                println!("{line}");
            }
            Ok(())
        }
        Action::OutboxStatus => {
            let store = open::<DB>(&database_url, schema, TOOL_POOL).await?;
            let leases = store.outbox_leases().await?;
            let lanes = u32::try_from(leases.len()).unwrap_or(u32::MAX).max(1);
            let backlog = store.outbox_backlog(lanes).await?;
            let table: Vec<Vec<String>> = leases
                .iter()
                .map(|l| {
                    let b = backlog.iter().find(|b| b.lane == i64::from(l.lane));
                    vec![
                        l.lane.to_string(),
                        l.owner.clone().unwrap_or_else(|| "-".into()),
                        l.epoch.to_string(),
                        l.lease_until.clone().unwrap_or_else(|| "-".into()),
                        b.map_or(0, |b| b.rows).to_string(),
                        b.and_then(|b| b.oldest)
                            .map_or_else(|| "-".into(), |s| format!("{s:.1}s")),
                    ]
                })
                .collect();
            if leases.is_empty() {
                let pending: i64 = backlog.iter().map(|b| b.rows).sum();
                println!("no relay has run on this outbox yet; {pending} unpublished rows");
            } else {
                print!(
                    "{}",
                    render_table(
                        &["lane", "owner", "epoch", "lease_until", "backlog", "oldest"],
                        &table
                    )
                );
            }
            println!("parked: {}", store.outbox_parked().await?.len());
            Ok(())
        }
        Action::OutboxParked => {
            let store = open::<DB>(&database_url, schema, TOOL_POOL).await?;
            let rows = store.outbox_parked().await?;
            let table: Vec<Vec<String>> = rows
                .iter()
                .map(|r| {
                    vec![
                        r.id.clone(),
                        r.aggregatetype.clone(),
                        r.aggregateid.clone().unwrap_or_else(|| "-".into()),
                        r.parked_at.clone().unwrap_or_default(),
                        r.error
                            .clone()
                            .unwrap_or_default()
                            .lines()
                            .next()
                            .unwrap_or_default()
                            .to_owned(),
                    ]
                })
                .collect();
            print!(
                "{}",
                render_table(&["event_id", "topic", "key", "parked_at", "error"], &table)
            );
            Ok(())
        }
        Action::OutboxRetry { event_id } => {
            let store = open::<DB>(&database_url, schema, TOOL_POOL).await?;
            if store.outbox_retry(&event_id).await? {
                println!("outbox row {event_id} is queued again for the relay");
                Ok(())
            } else {
                Err(CliError::Usage(format!(
                    "no parked outbox row has event id `{event_id}`; see `outbox parked`"
                )))
            }
        }
    }
}

/// Connections for a relay: reads, the lease and mark transactions, the listener.
const RELAY_POOL: u32 = 4;

/// A relay over `store`'s outbox with the command line's settings.
fn build_relay<DB: Backend>(
    store: &Store<DB>,
    brokers: &str,
    kafka: &BTreeMap<String, String>,
    o: &RelayOptions,
    all_properties: bool,
) -> Result<Relay<DB>, CliError> {
    let mut b = Relay::builder(store.pool().clone())
        .schema(store.schema())
        .brokers(brokers)
        .listen(!o.no_listen);
    if let Some(n) = o.lanes {
        b = b.lanes(u32::try_from(n).unwrap_or(u32::MAX));
    }
    if let Some(n) = o.relay_batch_size {
        b = b.batch_size(n);
    }
    if let Some(d) = o.lease {
        b = b.lease(d);
    }
    if let Some(d) = o.poll_interval {
        b = b.poll_interval(d);
    }
    if let Some(d) = o.keep_published {
        b = b.keep_published(d);
    }
    if let Some(name) = &o.relay_instance {
        b = b.instance(name);
    }
    for (k, v) in kafka {
        if all_properties || producer_property(k) {
            b = b.producer_config(k, v);
        }
    }
    Ok(b.build()?)
}

/// Whether a `-X` property of `run` also goes to the producer of `run --relay`: the
/// connection's (security, SASL, SSL, client id, sockets) and the producer's own. (`relay`
/// passes every `-X` property to its producer.)
fn producer_property(key: &str) -> bool {
    ["security.", "sasl.", "ssl.", "socket."]
        .iter()
        .any(|p| key.starts_with(p))
        || [
            "client.id",
            "message.timeout.ms",
            "request.timeout.ms",
            "linger.ms",
            "batch.size",
            "batch.num.messages",
            "compression.type",
            "message.max.bytes",
            "queue.buffering.max.messages",
            "queue.buffering.max.kbytes",
        ]
        .contains(&key)
}

/// SIGINT or SIGTERM.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("install a SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Connects and checks that the runtime's tables are up to date.
async fn open<DB: Backend>(url: &str, schema: &str, size: u32) -> Result<Store<DB>, CliError> {
    let store = Store::new(connect::<DB>(url, size).await?, schema)?;
    store.check_schema().await?;
    Ok(store)
}

/// A group's stored offsets (of one topic, if given); an error naming the group when there are
/// none.
async fn stored_offsets<DB: Backend>(
    store: &Store<DB>,
    group: &str,
    topic: Option<&str>,
) -> Result<Vec<StoredOffset>, CliError> {
    let rows = store.stored_offsets(group).await?;
    if rows.is_empty() {
        return Err(unknown_group(group, store.schema()));
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
fn client_config(brokers: &str, kafka: &BTreeMap<String, String>) -> ClientConfig {
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
    mut options: ConsumerOptions,
    run: RunSettings,
) -> Result<(), CliError> {
    let concurrency = options.concurrency.unwrap_or(DEFAULT_CONCURRENCY);
    // The claims on assignment and the epoch watcher need connections besides the writers.
    let pool_size = u32::try_from(concurrency).unwrap_or(u32::MAX - 8) + 2;
    // `--relay`: the relay's reads, lease and mark transactions, and its listener.
    let pool_size = pool_size + if run.relay.is_some() { RELAY_POOL } else { 0 };
    info!(
        database = %redact_url(url),
        brokers = %options.brokers,
        schema = %options.schema,
        kafka = %show_properties(&options.kafka),
        "{} run: connecting",
        app.name
    );
    let pool = connect::<DB>(url, pool_size).await?;
    let _server = match &run.metrics_addr {
        Some(addr) => Some(serve_metrics(&addr.0).await?),
        None => {
            if options.metrics_refresh.take().is_some() {
                warn!(
                    "a metrics interval is set but no metrics address: no metrics are served; \
                     set --metrics-addr (or CONSUMER_METRICS_ADDR, metrics_addr) to serve them"
                );
            }
            None
        }
    };
    let relay = match &run.relay {
        Some(o) => {
            let store = Store::new(pool.clone(), &options.schema)?;
            Some(build_relay(
                &store,
                &options.brokers,
                &options.kafka,
                o,
                false,
            )?)
        }
        None => None,
    };
    let builder = Runtime::<H, DB>::builder(app.handler)
        .pool(pool)
        .options(options)
        .event_id(event_id(run.event_id, app.event_id));
    let runtime = builder.build()?;
    let stats = runtime.stats();
    let relay = relay.map(|relay| {
        let stop = relay.shutdown_handle();
        (stop, tokio::spawn(relay.run()))
    });
    let result = runtime.run().await;
    if let Some((stop, task)) = relay {
        stop.shutdown();
        match task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                warn!(error = %e, "the outbox relay stopped with an error");
                result?;
                return Err(e.into());
            }
            Err(e) => warn!(error = %e, "the outbox relay task failed"),
        }
    }
    result?;
    let stats = stats.snapshot();
    info!(
        applied = stats.applied,
        duplicates_skipped = stats.duplicates,
        lost = stats.lost,
        parked = stats.parked,
        batches = stats.batches,
        retries = stats.retries,
        "stopped"
    );
    Ok(())
}

/// Aborts the metrics server when `run` ends.
struct Server(tokio::task::JoinHandle<()>);

impl Drop for Server {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Binds `--metrics-addr`, installs the exporter and serves it; logs the bound address.
async fn serve_metrics(addr: &str) -> Result<Server, CliError> {
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        CliError::Failed(format!(
            "cannot serve metrics on --metrics-addr {addr}: {e}; choose another HOST:PORT (port 0: any free port)"
        ))
    })?;
    let bound = listener
        .local_addr()
        .map_err(|e| CliError::Failed(format!("cannot serve metrics on {addr}: {e}")))?;
    let Some(handle) = exporter::install() else {
        return Err(CliError::Failed(
            "cannot serve metrics: another metrics recorder is already installed in this process"
                .into(),
        ));
    };
    info!(addr = %bound, "serving Prometheus metrics at http://{bound}/metrics");
    Ok(Server(tokio::spawn(exporter::serve(listener, handle))))
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
    let version = consumer_runtime::migrate(&pool, schema).await?;
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
    kafka: &BTreeMap<String, String>,
    brokers: String,
    group: String,
    topic: Option<String>,
    configured: Vec<String>,
) -> Result<(), CliError> {
    let store = open::<DB>(url, schema, TOOL_POOL).await?;
    let rows = store.stored_offsets(&group).await?;
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
    let config = client_config(&brokers, kafka);
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
                .map_err(|source| Error::Kafka {
                    context: "fetching high watermarks",
                    source,
                })?;
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
    kafka: &BTreeMap<String, String>,
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
        kafka = %show_properties(kafka),
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
    let store = open::<DB>(url, schema, TOOL_POOL).await?;
    let config = client_config(&r.brokers, kafka);
    let strategy = event_id(r.event_id, app.event_id);
    let request = ReplayRequest {
        group: r.group.clone(),
        topic: r.topic.clone(),
        partition: r.partition,
        from: r.from,
        mode,
    };
    let mut progress = ProgressLine::new();
    let result = store
        .replay(&config, &request, &strategy, &mut |p| progress.report(p))
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

async fn dead_letters_command<H: Handler<DB>, DB: Backend>(
    app: App<H, DB>,
    store: &Store<DB>,
    action: DeadLetters,
) -> Result<(), CliError> {
    let letters_of = store.dead_letters();
    match action {
        DeadLetters::List { group, topic } => {
            let letters = letters_of.list(&group, topic.as_deref()).await?;
            if !letters.is_empty() {
                print!("{}", dead_letters_table(&letters));
            }
            println!("{}", count(letters.len() as u64, "dead letter"));
            Ok(())
        }
        DeadLetters::Show { id } => match letters_of.get(id).await? {
            Some(letter) => {
                print!("{}", show_dead_letter(&letter));
                Ok(())
            }
            None => Err(no_such_dead_letter(id)),
        },
        DeadLetters::Redrive {
            target,
            event_id: chosen,
        } => {
            let ids = match target {
                RedriveTarget::Ids(ids) => ids,
                RedriveTarget::All { group, topic } => {
                    let mut ids: Vec<i64> = letters_of
                        .list(&group, topic.as_deref())
                        .await?
                        .iter()
                        .map(|l| l.id)
                        .collect();
                    ids.sort_unstable();
                    if ids.is_empty() {
                        println!(
                            "group {group} has no dead letters{}; nothing to redrive",
                            topic.map(|t| format!(" on topic {t}")).unwrap_or_default()
                        );
                        return Ok(());
                    }
                    ids
                }
            };
            let strategy = event_id(chosen, app.event_id);
            let mut tally = RedriveTally::default();
            for id in ids {
                let outcome = letters_of.redrive(&app.handler, &strategy, id).await?;
                println!("dead letter {id}: {}", redrive_line(&outcome));
                tally.add(&outcome);
            }
            println!("{}", tally.summary());
            tally.result(app.name)
        }
        DeadLetters::Purge(PurgeTarget::Id(id)) => {
            let removed = letters_of.delete(id).await?;
            if removed {
                println!("removed 1 dead letter (id {id}) without applying it");
            } else {
                println!("removed 0 dead letters: none has id {id} (already redriven or purged?)");
            }
            Ok(())
        }
        DeadLetters::Purge(PurgeTarget::Group { group, topic }) => {
            let removed = letters_of.purge(&group, topic.as_deref()).await?;
            println!(
                "removed {} of group {group}{} without applying {}",
                count(removed, "dead letter"),
                topic.map(|t| format!(" on topic {t}")).unwrap_or_default(),
                if removed == 1 { "it" } else { "them" }
            );
            Ok(())
        }
    }
}

fn no_such_dead_letter(id: i64) -> CliError {
    CliError::Failed(format!(
        "no dead letter has id {id} (already redriven or purged?); see `dead-letters list`"
    ))
}

/// `1 dead letter`, `3 dead letters`.
fn count(n: u64, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// The widest `error` cell of `dead-letters list`, in characters.
const ERROR_CELL: usize = 60;

/// `text` on one line (runs of whitespace, newlines included, become one space), cut to `max`
/// characters with an ellipsis.
pub(super) fn one_line_cut(text: &str, max: usize) -> String {
    let line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if line.chars().count() <= max {
        return line;
    }
    let mut cut: String = line.chars().take(max.saturating_sub(1)).collect();
    cut.truncate(cut.trim_end().len());
    cut.push('…');
    cut
}

/// `dead-letters list`'s table.
pub(super) fn dead_letters_table(letters: &[DeadLetter]) -> String {
    let rows: Vec<Vec<String>> = letters
        .iter()
        .map(|l| {
            vec![
                l.id.to_string(),
                l.topic.clone(),
                l.partition.to_string(),
                l.offset.to_string(),
                l.event_id
                    .as_deref()
                    .map_or_else(|| "-".to_owned(), |e| one_line_cut(e, ERROR_CELL)),
                l.kind.as_str().to_owned(),
                l.attempts.to_string(),
                l.last_failed_at.clone(),
                one_line_cut(&l.error, ERROR_CELL),
            ]
        })
        .collect();
    render_table(
        &[
            "id",
            "topic",
            "partition",
            "offset",
            "event_id",
            "kind",
            "attempts",
            "last_failed_at",
            "error",
        ],
        &rows,
    )
}

/// Bytes as text when they are valid UTF-8, else base64: `(label, shown)`.
fn text_or_base64(bytes: &[u8]) -> (&'static str, String) {
    match std::str::from_utf8(bytes) {
        Ok(text) => ("utf-8", text.to_owned()),
        Err(_) => ("base64", STANDARD.encode(bytes)),
    }
}

/// `dead-letters show`'s text: every field, one per line; the payload last, on lines of its
/// own.
pub(super) fn show_dead_letter(l: &DeadLetter) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let mut field = |name: &str, value: &str| {
        let _ = writeln!(out, "{:<16} {value}", format!("{name}:"));
    };
    field("id", &l.id.to_string());
    field("group", &l.group);
    field("topic", &l.topic);
    field("partition", &l.partition.to_string());
    field("offset", &l.offset.to_string());
    field(
        "timestamp",
        &l.timestamp_ms.map_or_else(
            || "-".to_owned(),
            |ms| match rfc3339_from_millis(ms) {
                Some(time) => format!("{ms} ({time})"),
                None => ms.to_string(),
            },
        ),
    );
    field("event_id", l.event_id.as_deref().unwrap_or("-"));
    field("kind", &format!("{} ({})", l.kind.as_str(), l.kind));
    field("attempts", &l.attempts.to_string());
    field("first_failed_at", &l.first_failed_at);
    field("last_failed_at", &l.last_failed_at);
    let error = l
        .error
        .lines()
        .collect::<Vec<_>>()
        .join("\n                 ");
    field("error", &error);
    match &l.key {
        None => field("key", "- (none)"),
        Some(key) => {
            let (how, shown) = text_or_base64(key);
            field(&format!("key ({how})"), &shown);
        }
    }
    if l.headers.is_empty() {
        field("headers", "- (none)");
    } else {
        field("headers", &l.headers.len().to_string());
        for (name, value) in &l.headers {
            match value {
                None => {
                    let _ = writeln!(out, "  {name}: - (no value)");
                }
                Some(v) => {
                    let (how, shown) = text_or_base64(v);
                    let _ = writeln!(out, "  {name} ({how}): {shown}");
                }
            }
        }
    }
    match &l.payload {
        None => {
            let _ = writeln!(out, "{:<16} - (none)", "payload:");
        }
        Some(payload) => {
            let (how, shown) = text_or_base64(payload);
            let _ = writeln!(out, "payload ({how}, {} bytes):", payload.len());
            let _ = writeln!(out, "{shown}");
        }
    }
    out
}

/// Milliseconds since the Unix epoch as RFC 3339 UTC, e.g. `2026-11-23T14:09:21.123Z`; `None`
/// outside the years -9999 to 9999.
pub(super) fn rfc3339_from_millis(ms: i64) -> Option<String> {
    jiff::Timestamp::from_millisecond(ms)
        .ok()
        .map(|t| format!("{t:.3}"))
}

/// One redrive's outcome, as `dead-letters redrive` prints it after `dead letter ID: `.
pub(super) fn redrive_line(outcome: &Redriven) -> String {
    match outcome {
        Redriven::Applied { event_id } => format!("applied, event id {event_id}"),
        Redriven::AlreadyApplied { event_id } => {
            format!("already applied (row removed), event id {event_id}")
        }
        Redriven::NotFound => "not found".to_owned(),
        Redriven::Failed { kind, error } => {
            format!("failed again: {kind}: {}", one_line_cut(error, usize::MAX))
        }
        Redriven::Retry { error } => {
            format!("retry later: {}", one_line_cut(error, usize::MAX))
        }
        // An outcome newer than this program: shown as the library describes it.
        other => format!("{other:?}"),
    }
}

/// What a `dead-letters redrive` did, in total.
#[derive(Debug, Default)]
pub(super) struct RedriveTally {
    applied: u64,
    already: u64,
    not_found: u64,
    failed: u64,
    retry: u64,
}

impl RedriveTally {
    pub(super) fn add(&mut self, outcome: &Redriven) {
        match outcome {
            Redriven::Applied { .. } => self.applied += 1,
            Redriven::AlreadyApplied { .. } => self.already += 1,
            Redriven::NotFound => self.not_found += 1,
            Redriven::Retry { .. } => self.retry += 1,
            Redriven::Failed { .. } => self.failed += 1,
            // An outcome newer than this program: not known to be applied, so not done.
            _ => self.retry += 1,
        }
    }

    fn total(&self) -> u64 {
        self.applied + self.already + self.not_found + self.failed + self.retry
    }

    pub(super) fn summary(&self) -> String {
        format!(
            "redrove {}: {} applied, {} already applied, {} not found, {} failed again, {} to retry later",
            count(self.total(), "dead letter"),
            self.applied,
            self.already,
            self.not_found,
            self.failed,
            self.retry
        )
    }

    /// An error (exit status 1) if any failed again or needs a retry.
    pub(super) fn result(&self, program: &str) -> Result<(), CliError> {
        let stuck = self.failed + self.retry;
        if stuck == 0 {
            return Ok(());
        }
        Err(CliError::Failed(format!(
            "{stuck} of {} not applied ({} failed again, {} to retry later); {} parked, see `{program} dead-letters show ID`",
            count(self.total(), "dead letter"),
            self.failed,
            self.retry,
            if stuck == 1 { "it stays" } else { "they stay" },
        )))
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
