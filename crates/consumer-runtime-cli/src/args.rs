//! The command line: clap's definitions of the subcommands and their flags, the parsers of the
//! values that are not plain strings (event-id strategies, `-X` properties, limits), and the
//! overlay of the runtime's flags onto [`ConsumerOptions`] ([`GlobalArgs::overlay`],
//! [`RunArgs::overlay`]).
//!
//! A runtime option is one field of [`ConsumerOptions`] (the config file's key comes with it) and
//! one flag here: a field in [`RunArgs`] and one line in [`RunArgs::overlay`].

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::builder::{PossibleValuesParser, TypedValueParser as _};
use clap::{Args, Parser, Subcommand};

use consumer_runtime::config::parse_duration;
use consumer_runtime::{
    Assignor, ConsumerOptions, Guarantee, OffsetReset, ParkedRatio, ReplayFrom,
};

/// The whole command line. The program's name and description are set at run time from the
/// [`App`](crate::App).
#[derive(Debug, Parser)]
#[command(
    name = "consumer",
    subcommand_required = true,
    arg_required_else_help = true,
    disable_version_flag = true,
    max_term_width = 100
)]
pub(super) struct Cli {
    #[command(flatten)]
    pub(super) global: GlobalArgs,
    #[command(subcommand)]
    pub(super) command: Command,
}

/// Options every subcommand takes (before or after the subcommand's name).
#[derive(Debug, Args)]
#[command(next_help_heading = "Connection, configuration and logging (every command)")]
pub(super) struct GlobalArgs {
    /// The database with the runtime's tables and the application's:
    /// postgres://user:password@host/db or sqlite://path/to/file.db. Required by every command.
    /// The password is never printed. [env: DATABASE_URL] [config: database_url]
    #[arg(long, global = true, value_name = "URL")]
    pub(super) database_url: Option<String>,

    /// Kafka's bootstrap servers, host:port[,host:port...]. Required by run, status and replay.
    /// [env: KAFKA_BROKERS] [config: brokers]
    #[arg(long, short = 'b', global = true, value_name = "HOST:PORT")]
    pub(super) brokers: Option<String>,

    /// The schema (PostgreSQL) or table prefix (SQLite) of the runtime's tables. [default:
    /// consumer_runtime] [env: CONSUMER_RUNTIME_SCHEMA] [config: schema]
    #[arg(long, global = true, value_name = "NAME")]
    pub(super) schema: Option<String>,

    /// A TOML file of settings: database_url, log_level, log_format, event_id and metrics_addr,
    /// and the runtime's options (consumer_runtime::ConsumerOptions: brokers, group, topics =
    /// [...], batch_size, batch_wait, ..., retry_policy = { ... }, circuit_breaker = { ... }, a
    /// [kafka] table of librdkafka properties); each flag's [config: ...] names its key. Unknown
    /// keys are errors. Flags win over environment variables, which win over the file, which
    /// wins over the defaults. [env: CONSUMER_CONFIG]
    #[arg(long, global = true, value_name = "FILE")]
    pub(super) config: Option<PathBuf>,

    /// A librdkafka property passed through unchanged, as kcat does (repeatable), e.g.
    /// -X security.protocol=SASL_SSL -X sasl.mechanism=PLAIN. Wins over the [kafka] table of
    /// the config file. Values of keys containing password, secret or sasl are never printed.
    #[arg(
        short = 'X',
        global = true,
        value_name = "KEY=VALUE",
        action = clap::ArgAction::Append
    )]
    pub(super) kafka: Vec<String>,

    /// The log level (error, warn, info, debug, trace) or a tracing filter such as
    /// info,consumer_runtime=debug. Logs go to stderr. RUST_LOG, when set, wins over this flag.
    /// [default: info] [config: log_level]
    #[arg(long, global = true, value_name = "LEVEL")]
    pub(super) log_level: Option<String>,

    /// How log lines look: text (human-readable) or json (one JSON object per line, with the
    /// span fields). [default: text] [env: CONSUMER_LOG_FORMAT] [config: log_format]
    #[arg(long, global = true, value_name = "FORMAT", value_parser = log_format_parser())]
    pub(super) log_format: Option<LogFormat>,
}

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err(format!("unknown log format `{s}`; use text or json")),
        }
    }
}

/// `--metrics-addr`: `HOST:PORT`, resolved when the program binds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct MetricsAddr(pub(super) String);

impl FromStr for MetricsAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        match s.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
                Ok(MetricsAddr(s.to_owned()))
            }
            _ => Err(format!(
                "`{s}` is not an address to listen on; write HOST:PORT, e.g. 0.0.0.0:9100 or 127.0.0.1:0 (any free port)"
            )),
        }
    }
}

/// The subcommands.
// Parsed once per process: the size of `run`'s flags does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub(super) enum Command {
    /// Consume the topics and run the handler for every record, until SIGINT or SIGTERM
    /// (graceful: in-flight batches finish, the consumer leaves its group).
    ///
    /// Checks first that the database schema is up to date (see `migrate`).
    Run(RunArgs),
    /// Apply the runtime's migrations (to --schema), then the application's own.
    ///
    /// Safe to run repeatedly and concurrently; already-applied migrations are skipped.
    Migrate,
    /// Show a consumer group's stored offsets, or move one (`offsets set`).
    ///
    /// The offsets in the database are the source of truth: the consumer resumes from them on
    /// every partition assignment, never from Kafka's committed offsets.
    Offsets(OffsetsArgs),
    /// Show each partition's stored offset, the broker's high watermark and the lag between
    /// them.
    Status(StatusArgs),
    /// Rewind a consumer group's stored offsets so that running consumers re-read a range;
    /// already-processed records are skipped by the dedup ledger.
    ///
    /// Running consumers are fenced (the partitions' epochs are bumped), reload the new
    /// position and continue from it without a restart.
    Replay(ReplayArgs),
    /// List, show, redrive or purge dead letters: records that failed permanently and were
    /// parked in the `dead_letters` table while the consumer went on.
    ///
    /// `run` parks a record that cannot be decoded, has no event id, is rejected by the
    /// handler, makes it panic or exhausts --max-attempts, in the same transaction that moves
    /// its partition's offset past it. Nothing here needs Kafka: the parked record (key,
    /// headers, payload, timestamp) is in the database.
    #[command(
        name = "dead-letters",
        subcommand_required = true,
        arg_required_else_help = true
    )]
    DeadLetters(DeadLettersArgs),
    /// Publish the transactional outbox to Kafka until SIGINT or SIGTERM: rows the
    /// application or a handler wrote with `outbox::publish` / `ctx.publish`.
    ///
    /// At least once, with an idempotent producer (enable.idempotence=true, acks=all); a row
    /// is marked published (with the partition and offset the broker returned) only after its
    /// acknowledgement. Rows of one key go out in commit order. Run several for scale-out:
    /// they share the outbox's lanes, each lane leased by one relay and fenced by an epoch.
    /// `run --relay` does the same inside the consumer.
    Relay(RelayArgs),
    /// Show an event's whole path by its event id: written to the outbox at, published to
    /// topic/partition/offset (how many times sent), applied by which consumer group at when
    /// and from where, or a copy suppressed as a duplicate.
    Trace(TraceArgs),
    /// Show the outbox's lanes and backlog, list the rows the relay parked as
    /// unpublishable, or put one back.
    #[command(subcommand_required = true, arg_required_else_help = true)]
    Outbox(OutboxArgs),
}

/// The relay's settings, for `relay` and `run --relay`.
#[derive(Debug, Clone, Default, Args)]
#[command(next_help_heading = "Outbox relay")]
pub(super) struct RelayOptions {
    /// How many lanes the outbox is split into (by key hash); fixed by the first relay, and
    /// every relay of the outbox must pass the same. [default: 16]
    #[arg(long, value_name = "N", value_parser = parse_positive)]
    pub(super) lanes: Option<usize>,

    /// Outbox rows read and sent per lane and pass. [default: 500]
    #[arg(long, value_name = "N", value_parser = parse_positive)]
    pub(super) relay_batch_size: Option<usize>,

    /// How long a lane's lease lasts without renewal: a relay that crashed or froze loses its
    /// lanes after this, e.g. 10s. [default: 10s]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub(super) lease: Option<Duration>,

    /// How often the relay looks for rows without a notification (PostgreSQL's NOTIFY wakes
    /// it at once). [default: 1s]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub(super) poll_interval: Option<Duration>,

    /// Keep published rows this long (for `trace`) before deleting them in bounded batches,
    /// e.g. 1h. [default: 0s]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub(super) keep_published: Option<Duration>,

    /// This relay's name in the lane leases. [default: relay-PID-RANDOM]
    #[arg(long, value_name = "NAME")]
    pub(super) relay_instance: Option<String>,

    /// Do not LISTEN for the writers' notifications (PostgreSQL): poll only.
    #[arg(long)]
    pub(super) no_listen: bool,
}

/// `relay`'s flags.
#[derive(Debug, Args)]
pub(super) struct RelayArgs {
    #[command(flatten)]
    pub(super) relay: RelayOptions,

    /// Serve Prometheus metrics at http://HOST:PORT/metrics (the outbox_* series). [default:
    /// off] [env: CONSUMER_METRICS_ADDR] [config: metrics_addr]
    #[arg(long, value_name = "HOST:PORT")]
    pub(super) metrics_addr: Option<MetricsAddr>,
}

/// `trace`'s argument.
#[derive(Debug, Args)]
pub(super) struct TraceArgs {
    /// The event id (the `event-id` header of the record; what `outbox::publish` returned).
    #[arg(value_name = "EVENT_ID")]
    pub(super) event_id: String,
}

/// `outbox`' subcommands.
#[derive(Debug, Args)]
pub(super) struct OutboxArgs {
    #[command(subcommand)]
    pub(super) action: OutboxCommand,
}

/// What `outbox` does.
#[derive(Debug, Subcommand)]
pub(super) enum OutboxCommand {
    /// Each lane: the relay that holds it, its epoch and lease, its unpublished rows and the
    /// age of the oldest; then the number of parked rows.
    Status,
    /// The rows the relay parked because they can never be published (an unknown or invalid
    /// topic, a record too large), with the error.
    Parked,
    /// Put a parked row back for the relay to publish, once its cause is fixed.
    Retry(TraceArgs),
}

/// `dead-letters`' subcommands.
#[derive(Debug, Args)]
pub(super) struct DeadLettersArgs {
    #[command(subcommand)]
    pub(super) action: DeadLettersCommand,
}

/// What `dead-letters` does.
#[derive(Debug, Subcommand)]
pub(super) enum DeadLettersCommand {
    /// List a consumer group's dead letters, ordered by topic, partition and offset, with the
    /// last error cut to one line (`dead-letters show ID` prints it whole).
    List(DeadLettersListArgs),
    /// Print one dead letter: where its record was, its key, headers and payload (as UTF-8
    /// text when they are, else base64), and the error.
    Show(DeadLettersShowArgs),
    /// Run the program's current handler for parked records, exactly once each: the handler's
    /// writes, the event id's row in the dedup ledger and the removal of the dead letter
    /// commit in one transaction.
    ///
    /// One line per dead letter: applied; already applied (row removed): the ledger already
    /// held its event id (a replay or another redrive applied it), so the handler did not run;
    /// not found (already redriven or purged); failed again: … (the dead letter stays, with
    /// the new error and one more attempt); retry later: … (the handler asked for a retry;
    /// nothing changed). The exit status is 1 if any failed again or needs a retry. Redriving
    /// the same id twice, even concurrently, applies it at most once.
    Redrive(DeadLettersRedriveArgs),
    /// Delete dead letters WITHOUT applying them: their records are then dropped for good.
    /// Needs --yes.
    Purge(DeadLettersPurgeArgs),
}

/// `dead-letters list`'s flags.
#[derive(Debug, Args)]
pub(super) struct DeadLettersListArgs {
    /// The consumer group. Required. [env: CONSUMER_GROUP] [config: group]
    #[arg(long, short = 'g', value_name = "GROUP")]
    pub(super) group: Option<String>,

    /// Only this topic's dead letters. [default: every topic]
    #[arg(long, short = 't', value_name = "TOPIC")]
    pub(super) topic: Option<String>,
}

/// `dead-letters show`'s argument.
#[derive(Debug, Args)]
pub(super) struct DeadLettersShowArgs {
    /// The dead letter's id (the first column of `dead-letters list`).
    #[arg(value_name = "ID")]
    pub(super) id: i64,
}

/// `dead-letters redrive`'s arguments.
#[derive(Debug, Args)]
pub(super) struct DeadLettersRedriveArgs {
    /// The dead letters to redrive, in this order (ids from `dead-letters list`).
    #[arg(value_name = "ID", conflicts_with = "all")]
    pub(super) ids: Vec<i64>,

    /// Redrive every dead letter of the group (of one topic, with --topic), in id order (the
    /// order they were parked in).
    #[arg(long)]
    pub(super) all: bool,

    /// With --all: the consumer group. [env: CONSUMER_GROUP] [config: group]
    #[arg(long, short = 'g', value_name = "GROUP")]
    pub(super) group: Option<String>,

    /// With --all: only this topic's dead letters. [default: every topic]
    #[arg(long, short = 't', value_name = "TOPIC")]
    pub(super) topic: Option<String>,

    /// The event-id strategy, as for `run` (it must match, so that a record the consumer or a
    /// replay already applied is recognised). [default: the program's own strategy, else
    /// header:event-id] [config: event_id]
    #[arg(long, value_name = "header:NAME|coordinates")]
    pub(super) event_id: Option<EventIdArg>,
}

/// `dead-letters purge`'s flags.
#[derive(Debug, Args)]
pub(super) struct DeadLettersPurgeArgs {
    /// The consumer group whose dead letters to delete (all of them, or one topic's with
    /// --topic). Required unless --id is given. [env: CONSUMER_GROUP] [config: group]
    #[arg(long, short = 'g', value_name = "GROUP", conflicts_with = "id")]
    pub(super) group: Option<String>,

    /// Only this topic's dead letters. [default: every topic]
    #[arg(long, short = 't', value_name = "TOPIC", conflicts_with = "id")]
    pub(super) topic: Option<String>,

    /// Delete only this dead letter.
    #[arg(long, value_name = "ID")]
    pub(super) id: Option<i64>,

    /// Confirm the deletion. The records are then neither applied nor parked anywhere (only a
    /// `replay` over their offsets, while Kafka still holds them, would run them again).
    #[arg(long)]
    pub(super) yes: bool,
}

/// `run`'s flags.
#[derive(Debug, Args)]
pub(super) struct RunArgs {
    /// The consumer group. Dedup is scoped per group. Required. [env: CONSUMER_GROUP] [config:
    /// group]
    #[arg(long, short = 'g', value_name = "GROUP")]
    pub(super) group: Option<String>,

    /// A topic to consume (repeatable, or comma-separated). Required. [env: KAFKA_TOPICS,
    /// comma-separated] [config: topics = ["a", "b"]]
    #[arg(
        long = "topic",
        short = 't',
        value_name = "TOPIC",
        value_delimiter = ','
    )]
    pub(super) topics: Vec<String>,

    /// The most records in one batch (one transaction) of a partition; 1 gives one transaction
    /// per record. [default: 500] [config: batch_size]
    #[arg(long, value_name = "N", value_parser = parse_positive)]
    pub(super) batch_size: Option<usize>,

    /// How long a partition's batch may wait to fill after its first record, e.g. 20ms, 1s,
    /// 500us. [default: 20ms] [config: batch_wait]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub(super) batch_wait: Option<Duration>,

    /// The most transactions open at once (the database pool holds this many connections plus
    /// two). SQLite always writes one at a time. [default: 8] [config: concurrency]
    #[arg(long, value_name = "N", value_parser = parse_positive)]
    pub(super) concurrency: Option<usize>,

    /// The delivery guarantee. at-most-once can lose the batch in flight on a crash;
    /// at-least-once can apply it twice; effectively-once does neither. [default:
    /// effectively-once] [config: guarantee]
    #[arg(long, value_name = "GUARANTEE", value_parser = guarantee_parser())]
    pub(super) guarantee: Option<Guarantee>,

    /// Where each record's event id (its key in the dedup ledger) comes from: header:NAME, or
    /// coordinates (topic/partition/offset, which cannot catch producer duplicates). [default:
    /// the program's own strategy, else header:event-id] [config: event_id]
    #[arg(long, value_name = "header:NAME|coordinates")]
    pub(super) event_id: Option<EventIdArg>,

    /// Where a partition starts when the database holds no offset for it yet. [default:
    /// earliest] [config: offset_reset]
    #[arg(long, value_name = "WHERE", value_parser = offset_reset_parser())]
    pub(super) offset_reset: Option<OffsetReset>,

    /// The consumer group's partition assignment strategy. [default: cooperative-sticky]
    /// [config: assignor]
    #[arg(long, value_name = "ASSIGNOR", value_parser = assignor_parser())]
    pub(super) assignor: Option<Assignor>,

    /// How many attempts a failing batch gets before its record counts as permanently failed
    /// and is parked in `dead_letters` (see `dead-letters`) while the consumer goes on;
    /// `unlimited` retries forever. [default: 10] [config: retry_policy.max_attempts]
    #[arg(long, value_name = "N|unlimited")]
    pub(super) max_attempts: Option<MaxAttempts>,

    /// The delay before a failing batch's first retry; it doubles with each attempt (minus up
    /// to half of it at random, so that partitions do not retry in lockstep). [default: 100ms]
    /// [config: retry_policy.initial_delay]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub(super) retry_delay: Option<Duration>,

    /// The longest delay between two attempts of a failing batch. [default: 30s] [config:
    /// retry_policy.max_delay]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub(super) retry_max_delay: Option<Duration>,

    /// Circuit breaker: stop the consumer with an error after this many records in a row were
    /// parked as dead letters (none applied in between); `off` never stops for that.
    /// [default: 100] [config: circuit_breaker.max_consecutive]
    #[arg(long, value_name = "N|off")]
    pub(super) breaker_consecutive: Option<Limit>,

    /// Circuit breaker: stop the consumer with an error when more than this share (0 to 1, or
    /// a percentage such as 50%) of the last --breaker-window records were parked; `off`
    /// never stops for that. [default: 0.5] [config: circuit_breaker.ratio.max_ratio,
    /// or circuit_breaker.ratio = "off"]
    #[arg(long, value_name = "RATIO|off")]
    pub(super) breaker_ratio: Option<Ratio>,

    /// How many of the most recent records --breaker-ratio is taken over (it is checked once
    /// that many have been seen). [default: 1000] [config: circuit_breaker.ratio.window]
    #[arg(long, value_name = "N", value_parser = parse_positive)]
    pub(super) breaker_window: Option<usize>,

    /// Serve Prometheus metrics at http://HOST:PORT/metrics (port 0: any free port; the
    /// address is logged at startup). [default: off] [env: CONSUMER_METRICS_ADDR] [config:
    /// metrics_addr]
    #[arg(long, value_name = "HOST:PORT")]
    pub(super) metrics_addr: Option<MetricsAddr>,

    /// With --metrics-addr: how often the lag and ledger-size gauges are refreshed (the
    /// ledger count never more often than 100 times it took). [default: 5s] [env:
    /// CONSUMER_METRICS_INTERVAL] [config: metrics_refresh]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub(super) metrics_interval: Option<Duration>,

    /// Also relay the outbox to Kafka in this process (what the `relay` command does), with
    /// the relay flags below.
    #[arg(long)]
    pub(super) relay: bool,

    #[command(flatten)]
    pub(super) relay_options: RelayOptions,
}

impl GlobalArgs {
    /// Lays the runtime's global flags over `options` (the file's values, the environment's on
    /// top): `--brokers`, `--schema` and each `-X`.
    pub(super) fn overlay(&self, options: &mut ConsumerOptions) -> Result<(), String> {
        set(&mut options.brokers, self.brokers.clone());
        set(&mut options.schema, self.schema.clone());
        for raw in &self.kafka {
            let (key, value) = parse_kafka_property(raw)?;
            options.kafka.insert(key, value);
        }
        Ok(())
    }
}

impl RunArgs {
    /// Lays `run`'s flags over `options` (the file's values, the environment's on top); a flag
    /// not given leaves its field alone. `--event-id` and `--metrics-addr` are the program's,
    /// not the runtime's, and are not read here.
    pub(super) fn overlay(self, options: &mut ConsumerOptions) {
        let o = options;
        set(&mut o.group, self.group);
        let topics = clean_topics(self.topics);
        set(&mut o.topics, (!topics.is_empty()).then_some(topics));
        set(&mut o.batch_size, self.batch_size);
        set(&mut o.batch_wait, self.batch_wait);
        set(&mut o.concurrency, self.concurrency.map(Some));
        set(&mut o.guarantee, self.guarantee);
        set(&mut o.offset_reset, self.offset_reset);
        set(&mut o.assignor, self.assignor);
        let retry = &mut o.retry_policy;
        set(&mut retry.max_attempts, self.max_attempts.map(|m| m.0));
        set(&mut retry.initial_delay, self.retry_delay);
        set(&mut retry.max_delay, self.retry_max_delay);
        let breaker = &mut o.circuit_breaker;
        set(
            &mut breaker.max_consecutive,
            self.breaker_consecutive.map(|l| l.0),
        );
        match self.breaker_ratio {
            Some(Ratio(None)) => breaker.ratio = None,
            Some(Ratio(Some(max_ratio))) => {
                breaker
                    .ratio
                    .get_or_insert_with(ParkedRatio::default)
                    .max_ratio = max_ratio;
            }
            None => {}
        }
        if let Some(ratio) = &mut breaker.ratio {
            set(&mut ratio.window, self.breaker_window.map(|n| n as u64));
        }
        set(&mut o.metrics_refresh, self.metrics_interval.map(Some));
    }
}

/// A flag given replaces the field.
fn set<T>(field: &mut T, flag: Option<T>) {
    if let Some(value) = flag {
        *field = value;
    }
}

/// Topic names trimmed, empty ones dropped.
pub(super) fn clean_topics(topics: Vec<String>) -> Vec<String> {
    topics
        .into_iter()
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty())
        .collect()
}

/// `offsets`' flags and its `set` subcommand.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = false)]
pub(super) struct OffsetsArgs {
    #[command(subcommand)]
    pub(super) action: Option<OffsetsAction>,

    /// The consumer group. Required. [env: CONSUMER_GROUP] [config: group]
    #[arg(long, short = 'g', value_name = "GROUP", global = true)]
    pub(super) group: Option<String>,

    /// `offsets`: show only this topic. `offsets set`: the topic (required).
    #[arg(long, short = 't', value_name = "TOPIC", global = true)]
    pub(super) topic: Option<String>,
}

/// `offsets`' subcommands.
#[derive(Debug, Subcommand)]
pub(super) enum OffsetsAction {
    /// Move one partition's stored offset (with --group and --topic), with the same fencing as
    /// `replay`: its epoch is bumped, and a running consumer reloads the new position within
    /// about a second. Moving backwards re-applies nothing (the ledger skips processed
    /// records); moving forwards skips records for good.
    Set(OffsetsSetArgs),
}

/// `offsets set`'s flags.
#[derive(Debug, Args)]
pub(super) struct OffsetsSetArgs {
    /// The partition.
    #[arg(long, short = 'p', value_name = "N")]
    pub(super) partition: i32,

    /// The new stored offset: the offset of the next record to process.
    #[arg(long, value_name = "OFFSET")]
    pub(super) offset: i64,
}

/// `status`' flags.
#[derive(Debug, Args)]
pub(super) struct StatusArgs {
    /// The consumer group. Required. [env: CONSUMER_GROUP] [config: group]
    #[arg(long, short = 'g', value_name = "GROUP")]
    pub(super) group: Option<String>,

    /// Show only this topic. [default: the topics the group has stored offsets for, and the
    /// configured topics (KAFKA_TOPICS, config: topics)]
    #[arg(long, short = 't', value_name = "TOPIC")]
    pub(super) topic: Option<String>,
}

/// `replay`'s flags.
#[derive(Debug, Args)]
pub(super) struct ReplayArgs {
    /// The consumer group. Required. [env: CONSUMER_GROUP] [config: group]
    #[arg(long, short = 'g', value_name = "GROUP")]
    pub(super) group: Option<String>,

    /// The topic to replay.
    #[arg(long, short = 't', value_name = "TOPIC")]
    pub(super) topic: String,

    /// Only this partition. [default: every partition of the topic]
    #[arg(long, short = 'p', value_name = "N")]
    pub(super) partition: Option<i32>,

    /// Where to rewind to: earliest, an offset (e.g. 1200), or an RFC 3339 time (e.g.
    /// 2026-11-20T08:00:00Z: each partition's first record at or after it).
    #[arg(long, value_name = "earliest|OFFSET|TIME", value_parser = parse_replay_from)]
    pub(super) from: ReplayFrom,

    /// Change nothing: report per partition how many records the range holds and how many of
    /// them the ledger would skip.
    #[arg(long, conflicts_with = "rebuild")]
    pub(super) dry_run: bool,

    /// DANGER: RE-RUNS THE HANDLER FOR RECORDS IT ALREADY PROCESSED. Also deletes the range's
    /// rows from the dedup ledger, in the same transaction as the rewind, so every record in
    /// the range is applied again. Only for deliberately rebuilding state whose effects are
    /// safe to repeat (e.g. a projection after a handler fix); a handler that counts or
    /// charges will count or charge twice.
    #[arg(long)]
    pub(super) rebuild: bool,

    /// The event-id strategy, as for `run` (it must match, so that --dry-run counts the
    /// ledger's rows right). [default: the program's own strategy, else header:event-id]
    /// [config: event_id]
    #[arg(long, value_name = "header:NAME|coordinates")]
    pub(super) event_id: Option<EventIdArg>,
}

/// An event-id strategy that can be named on the command line (a business key can only be
/// given in code, with [`App::event_id`](crate::App::event_id)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum EventIdArg {
    /// `header:NAME`.
    Header(String),
    /// `coordinates`.
    Coordinates,
}

impl FromStr for EventIdArg {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once(':') {
            _ if s == "coordinates" => Ok(EventIdArg::Coordinates),
            Some(("header", name)) if !name.trim().is_empty() => {
                Ok(EventIdArg::Header(name.trim().to_owned()))
            }
            _ => Err(format!(
                "unknown event-id strategy `{s}`; use header:NAME (e.g. header:event-id) or coordinates"
            )),
        }
    }
}

/// `--max-attempts`: a positive number, or `unlimited` (`None`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct MaxAttempts(pub(super) Option<u32>);

impl FromStr for MaxAttempts {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        count_or(s, "unlimited", "attempts").map(MaxAttempts)
    }
}

/// `--breaker-consecutive`: a count from 1 up, or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Limit(pub(super) Option<u64>);

impl FromStr for Limit {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        count_or(s, "off", "records").map(Limit)
    }
}

/// A whole number from 1 up, or `word` (`None`); the error says the number counts `what`.
fn count_or<T: FromStr + PartialOrd + From<u8>>(
    s: &str,
    word: &str,
    what: &str,
) -> Result<Option<T>, String> {
    if s == word {
        return Ok(None);
    }
    match s.parse::<T>() {
        Ok(n) if n >= T::from(1) => Ok(Some(n)),
        _ => Err(format!(
            "`{s}` is not a number of {what}; use a number from 1 up, or {word}"
        )),
    }
}

/// `--breaker-ratio`: a share strictly between 0 and 1 (`0.5` or `50%`), or `off`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Ratio(pub(super) Option<f64>);

impl FromStr for Ratio {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "off" {
            return Ok(Ratio(None));
        }
        let value = match s.strip_suffix('%') {
            Some(percent) => percent.trim().parse::<f64>().map(|p| p / 100.0),
            None => s.parse::<f64>(),
        };
        match value {
            Ok(r) if r > 0.0 && r < 1.0 => Ok(Ratio(Some(r))),
            _ => Err(format!(
                "`{s}` is not a share of parked records; use a number between 0 and 1 \
                 (exclusive, e.g. 0.5) or a percentage (e.g. 50%), or off"
            )),
        }
    }
}

fn parse_replay_from(s: &str) -> Result<ReplayFrom, String> {
    s.parse::<ReplayFrom>().map_err(|e| match e {
        consumer_runtime::Error::Config(why) => why,
        other => other.to_string(),
    })
}

fn parse_positive(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!("`{s}` is not a positive whole number")),
    }
}

fn guarantee_parser() -> impl clap::builder::TypedValueParser<Value = Guarantee> {
    PossibleValuesParser::new(["at-most-once", "at-least-once", "effectively-once"])
        .map(|s| s.parse::<Guarantee>().expect("a possible value"))
}

fn log_format_parser() -> impl clap::builder::TypedValueParser<Value = LogFormat> {
    PossibleValuesParser::new(["text", "json"])
        .map(|s| s.parse::<LogFormat>().expect("a possible value"))
}

fn offset_reset_parser() -> impl clap::builder::TypedValueParser<Value = OffsetReset> {
    PossibleValuesParser::new(["earliest", "latest"])
        .map(|s| s.parse::<OffsetReset>().expect("a possible value"))
}

fn assignor_parser() -> impl clap::builder::TypedValueParser<Value = Assignor> {
    PossibleValuesParser::new(["cooperative-sticky", "range", "roundrobin"])
        .map(|s| s.parse::<Assignor>().expect("a possible value"))
}

/// Whether a librdkafka property's value must never be printed.
pub(super) fn is_secret_key(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    ["password", "secret", "sasl", "ssl.key.pem"]
        .iter()
        .any(|word| key.contains(word))
}

/// Parses one `-X key=value`. The error never repeats a value that might be a secret.
pub(super) fn parse_kafka_property(raw: &str) -> Result<(String, String), String> {
    let shown = if is_secret_key(raw) { "***" } else { raw };
    let Some((key, value)) = raw.split_once('=') else {
        return Err(format!(
            "malformed -X `{shown}`: expected KEY=VALUE, e.g. -X session.timeout.ms=10000"
        ));
    };
    let key = key.trim();
    if key.is_empty() || key.contains(char::is_whitespace) {
        return Err(format!(
            "malformed -X `{shown}`: the property name before `=` must be a librdkafka property such as session.timeout.ms"
        ));
    }
    Ok((key.to_owned(), value.to_owned()))
}

/// `key=value, key=***` for logs: secrets are masked.
pub(super) fn show_properties(props: &BTreeMap<String, String>) -> String {
    if props.is_empty() {
        return "none".to_owned();
    }
    props
        .iter()
        .map(|(k, v)| {
            if is_secret_key(k) {
                format!("{k}=***")
            } else {
                format!("{k}={v}")
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kafka_properties_split_at_the_first_equals_sign() {
        assert_eq!(
            parse_kafka_property("session.timeout.ms=6000").unwrap(),
            ("session.timeout.ms".into(), "6000".into())
        );
        assert_eq!(
            parse_kafka_property("sasl.jaas.config=a=b").unwrap(),
            ("sasl.jaas.config".into(), "a=b".into())
        );
        assert_eq!(
            parse_kafka_property("client.id=").unwrap(),
            ("client.id".into(), String::new())
        );
        let err = parse_kafka_property("session.timeout.ms").unwrap_err();
        assert!(
            err.contains("KEY=VALUE") && err.contains("session.timeout.ms"),
            "{err}"
        );
        assert!(parse_kafka_property("=6000").is_err());
    }

    #[test]
    fn malformed_secret_properties_are_not_echoed() {
        let err = parse_kafka_property("sasl.password:hunter2").unwrap_err();
        assert!(!err.contains("hunter2"), "{err}");
        assert_eq!(
            show_properties(&BTreeMap::from([
                ("sasl.password".into(), "hunter2".into()),
                ("ssl.key.password".into(), "k".into()),
                ("client.secret".into(), "s".into()),
                ("client.id".into(), "orders".into()),
            ])),
            "client.id=orders, client.secret=***, sasl.password=***, ssl.key.password=***"
        );
    }

    #[test]
    fn event_id_strategies_parse() {
        assert_eq!(
            "header:trace-id".parse::<EventIdArg>().unwrap(),
            EventIdArg::Header("trace-id".into())
        );
        assert_eq!(
            "coordinates".parse::<EventIdArg>().unwrap(),
            EventIdArg::Coordinates
        );
        for bad in ["header:", "header", "key", "coordinates:x"] {
            assert!(bad.parse::<EventIdArg>().is_err(), "{bad}");
        }
        assert_eq!(
            "unlimited".parse::<MaxAttempts>().unwrap(),
            MaxAttempts(None)
        );
        assert_eq!("3".parse::<MaxAttempts>().unwrap(), MaxAttempts(Some(3)));
        assert!("0".parse::<MaxAttempts>().is_err());
    }
}
