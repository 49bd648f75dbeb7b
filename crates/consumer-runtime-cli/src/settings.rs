//! Configuration layering: flags win over environment variables, which win over the TOML file
//! (`--config`), which wins over the defaults. [`resolve`] is a pure function of the parsed
//! command line, an environment lookup and the file's text, so the precedence is unit-tested
//! without touching the process environment.
//!
//! The runtime's settings are one [`ConsumerOptions`] value from start to end: the file's keys
//! deserialise into it (the program's own few keys, [`PROGRAM_KEYS`], are taken out first),
//! the environment and the flags ([`GlobalArgs::overlay`](crate::args::GlobalArgs::overlay),
//! [`RunArgs::overlay`](crate::args::RunArgs::overlay)) are laid over it, and `run` hands it to
//! the runtime whole. Its defaults are the library's; the program changes only the
//! concurrency (8) and the signal handling (on).

use std::ops::Range;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;
use toml::de::{DeTable, ValueDeserializer};

use crate::CliError;
use crate::args::{
    Cli, Command, DeadLettersCommand, EventIdArg, LogFormat, MetricsAddr, OffsetsAction,
    OutboxCommand, RelayOptions, clean_topics,
};
use consumer_runtime::ConsumerOptions;
use consumer_runtime::ReplayFrom;
use consumer_runtime::config::parse_duration;

/// Looks up an environment variable (`std::env::var` in the program, a map in tests).
pub(super) type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

pub(super) const ENV_DATABASE_URL: &str = "DATABASE_URL";
pub(super) const ENV_BROKERS: &str = "KAFKA_BROKERS";
pub(super) const ENV_SCHEMA: &str = "CONSUMER_RUNTIME_SCHEMA";
pub(super) const ENV_CONFIG: &str = "CONSUMER_CONFIG";
pub(super) const ENV_GROUP: &str = "CONSUMER_GROUP";
pub(super) const ENV_TOPICS: &str = "KAFKA_TOPICS";
pub(super) const ENV_LOG_FORMAT: &str = "CONSUMER_LOG_FORMAT";
pub(super) const ENV_METRICS_ADDR: &str = "CONSUMER_METRICS_ADDR";
pub(super) const ENV_METRICS_INTERVAL: &str = "CONSUMER_METRICS_INTERVAL";

/// `run`'s number of concurrent transactions when none is given (the library's default, the
/// pool's size, would follow the pool the program sizes from it).
pub(super) const DEFAULT_CONCURRENCY: usize = 8;
/// How often the lag and ledger-size gauges are refreshed with `--metrics-addr`.
pub(super) const DEFAULT_METRICS_INTERVAL: Duration = Duration::from_secs(5);

/// The config file's keys that belong to the program, not to [`ConsumerOptions`].
pub(super) const PROGRAM_KEYS: [&str; 5] = [
    "database_url",
    "log_level",
    "log_format",
    "event_id",
    "metrics_addr",
];

/// The program's own keys of the config file, as given.
#[derive(Debug, Default)]
struct ProgramKeys {
    database_url: Option<String>,
    log_level: Option<String>,
    log_format: Option<LogFormat>,
    event_id: Option<EventIdArg>,
    metrics_addr: Option<MetricsAddr>,
}

/// The config file, read: the program's keys and the runtime's options.
#[derive(Debug, Default)]
struct FileSettings {
    /// The path, as given (empty without a file).
    name: String,
    program: ProgramKeys,
    options: ConsumerOptions,
}

/// The config file's text and the name to show in errors.
#[derive(Debug, Clone)]
pub(super) struct ConfigFile {
    /// The path, as given.
    pub(super) name: String,
    /// The contents.
    pub(super) text: String,
}

/// Everything a command needs, with every layer applied.
#[derive(Debug)]
pub(super) struct Settings {
    pub(super) database_url: String,
    /// The runtime's options: `run` hands them to the runtime whole; the other commands take
    /// the schema, the brokers and the `[kafka]` properties from them.
    pub(super) options: ConsumerOptions,
    pub(super) log_level: String,
    pub(super) log_format: LogFormat,
    pub(super) action: Action,
}
/// What to do, with the command's settings resolved.
#[derive(Debug)]
pub(super) enum Action {
    Run(RunSettings),
    Migrate,
    Offsets {
        group: String,
        topic: Option<String>,
    },
    SetOffset {
        group: String,
        topic: String,
        partition: i32,
        offset: i64,
    },
    Status {
        brokers: String,
        group: String,
        /// `--topic`, if given.
        topic: Option<String>,
        /// The configured topics (KAFKA_TOPICS or the file's `topics`), shown even before the
        /// group stored an offset for them.
        configured: Vec<String>,
    },
    Replay(ReplaySettings),
    DeadLetters(DeadLetters),
    Relay {
        brokers: String,
        relay: RelayOptions,
        metrics_addr: Option<MetricsAddr>,
    },
    Trace {
        event_id: String,
    },
    OutboxStatus,
    OutboxParked,
    OutboxRetry {
        event_id: String,
    },
}

/// `dead-letters`' subcommands, resolved.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum DeadLetters {
    List {
        group: String,
        topic: Option<String>,
    },
    Show {
        id: i64,
    },
    Redrive {
        target: RedriveTarget,
        event_id: Option<EventIdArg>,
    },
    /// Only ever built with `--yes` given.
    Purge(PurgeTarget),
}

/// Which dead letters `dead-letters redrive` runs.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum RedriveTarget {
    /// These ids, in this order.
    Ids(Vec<i64>),
    /// `--all`: every dead letter of the group (of one topic), in id order.
    All {
        group: String,
        topic: Option<String>,
    },
}

/// Which dead letters `dead-letters purge` deletes.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum PurgeTarget {
    /// The group's (of one topic).
    Group {
        group: String,
        topic: Option<String>,
    },
    /// `--id`: one row.
    Id(i64),
}

/// `run`'s settings besides the runtime's options (those are [`Settings::options`]).
#[derive(Debug)]
pub(super) struct RunSettings {
    /// `--event-id`, or the file's `event_id`; `None`: the program's own strategy.
    pub(super) event_id: Option<EventIdArg>,
    /// `--metrics-addr`: serve Prometheus metrics there.
    pub(super) metrics_addr: Option<MetricsAddr>,
    /// `--relay`: relay the outbox in the same process, with these settings.
    pub(super) relay: Option<RelayOptions>,
}

/// `replay`'s settings.
#[derive(Debug)]
pub(super) struct ReplaySettings {
    pub(super) brokers: String,
    pub(super) group: String,
    pub(super) topic: String,
    pub(super) partition: Option<i32>,
    pub(super) from: ReplayFrom,
    pub(super) dry_run: bool,
    pub(super) rebuild: bool,
    pub(super) event_id: Option<EventIdArg>,
}

/// A required setting, named the three ways it can be given.
struct Required {
    what: &'static str,
    flag: &'static str,
    env: &'static str,
    key: &'static str,
}

const DATABASE_URL: Required = Required {
    what: "database URL",
    flag: "--database-url",
    env: ENV_DATABASE_URL,
    key: "database_url",
};
const BROKERS: Required = Required {
    what: "Kafka brokers",
    flag: "--brokers",
    env: ENV_BROKERS,
    key: "brokers",
};
const GROUP: Required = Required {
    what: "consumer group",
    flag: "--group",
    env: ENV_GROUP,
    key: "group",
};
const TOPICS: Required = Required {
    what: "topic",
    flag: "--topic",
    env: ENV_TOPICS,
    key: "topics",
};

impl Required {
    fn missing(&self) -> CliError {
        CliError::Usage(format!(
            "no {} given; pass {}, set {}, or set `{}` in the config file (--config)",
            self.what, self.flag, self.env, self.key
        ))
    }

    /// The value, unless it is empty.
    fn check(&self, value: &str) -> Result<String, CliError> {
        if value.trim().is_empty() {
            Err(self.missing())
        } else {
            Ok(value.to_owned())
        }
    }
}

/// The environment of one resolution, and the file's name for errors.
struct Layers<'a> {
    env: Env<'a>,
    file_name: String,
}

impl Layers<'_> {
    /// An environment variable; an empty one counts as unset.
    fn env(&self, name: &str) -> Option<String> {
        (self.env)(name).filter(|v| !v.trim().is_empty())
    }

    /// Sets `field` from the environment variable `name`, if it is set.
    fn string(&self, field: &mut String, name: &str) {
        if let Some(value) = self.env(name) {
            *field = value;
        }
    }

    /// flag > env > file, for a value the environment gives as text.
    fn layered<T: std::str::FromStr<Err = String>>(
        &self,
        flag: Option<T>,
        env: &str,
        file: Option<T>,
    ) -> Result<Option<T>, CliError> {
        if flag.is_some() {
            return Ok(flag);
        }
        if let Some(text) = self.env(env) {
            return text
                .parse::<T>()
                .map(Some)
                .map_err(|e| CliError::Usage(format!("{env}: {e}")));
        }
        Ok(file)
    }

    fn bad(&self, key: &str, why: &str) -> CliError {
        CliError::Usage(format!("config file `{}`: `{key}`: {why}", self.file_name))
    }
}

/// A key the config file does not have at its top level (the flag's name, where the setting
/// is in a table of [`ConsumerOptions`]): where the setting is, and how to write `value` there.
fn moved_key(key: &str, value: &str) -> Option<String> {
    let (table, new) = match key {
        "max_attempts" => ("retry_policy", format!("{{ max_attempts = {value} }}")),
        "retry_delay" => ("retry_policy", format!("{{ initial_delay = {value} }}")),
        "retry_max_delay" => ("retry_policy", format!("{{ max_delay = {value} }}")),
        "breaker_consecutive" => (
            "circuit_breaker",
            format!("{{ max_consecutive = {value} }}"),
        ),
        "breaker_ratio" if value == "\"off\"" => ("circuit_breaker", "{ ratio = \"off\" }".into()),
        "breaker_ratio" => (
            "circuit_breaker",
            format!("{{ ratio = {{ max_ratio = {value} }} }}"),
        ),
        "breaker_window" => (
            "circuit_breaker",
            format!("{{ ratio = {{ window = {value} }} }}"),
        ),
        "metrics_interval" => {
            return Some(format!(
                "in the config file this setting is `metrics_refresh`; write metrics_refresh = {value}"
            ));
        }
        _ => return None,
    };
    Some(format!(
        "in the config file this setting is in the `{table}` table; write {table} = {new}"
    ))
}

/// Parses the config file: the program's keys, then every other key into [`ConsumerOptions`].
/// Errors name the file, the line and the key.
fn parse_file(file: Option<&ConfigFile>) -> Result<FileSettings, CliError> {
    let Some(file) = file else {
        return Ok(FileSettings::default());
    };
    let fail = |span: Option<Range<usize>>, key: Option<&str>, message: &str| {
        let line = span
            .map(|span| {
                let upto = span.start.min(file.text.len());
                format!(", line {}", file.text[..upto].matches('\n').count() + 1)
            })
            .unwrap_or_default();
        let key = key.map(|k| format!("`{k}`: ")).unwrap_or_default();
        let message = message.trim().replace('\n', " ");
        CliError::Usage(format!("config file `{}`{line}: {key}{message}", file.name))
    };
    let root = DeTable::parse(&file.text).map_err(|e| fail(e.span(), None, e.message()))?;
    let span = root.span();
    let mut table = root.into_inner();

    for (key, value) in &table {
        let shown = file.text.get(value.span()).unwrap_or("…").trim();
        if let Some(message) = moved_key(key.get_ref(), shown) {
            return Err(fail(Some(key.span()), Some(key.get_ref()), &message));
        }
        if key.get_ref() == "handle_signals" {
            return Err(fail(
                Some(key.span()),
                Some("handle_signals"),
                "the program always stops gracefully on SIGINT and SIGTERM; remove this key",
            ));
        }
    }

    let mut text_of = |key: &'static str| -> Result<Option<Spanned<String>>, CliError> {
        let Some(value) = table.remove(key) else {
            return Ok(None);
        };
        let span = value.span();
        String::deserialize(ValueDeserializer::from(value))
            .map(|text| Some(Spanned::new(span, text)))
            .map_err(|e| fail(e.span(), Some(key), e.message()))
    };
    let database_url = text_of("database_url")?.map(Spanned::into_inner);
    let log_level = text_of("log_level")?.map(Spanned::into_inner);
    let (log_format, event_id, metrics_addr) = (
        text_of("log_format")?,
        text_of("event_id")?,
        text_of("metrics_addr")?,
    );
    let program = ProgramKeys {
        database_url,
        log_level,
        log_format: parse_key(log_format, "log_format", &fail)?,
        event_id: parse_key(event_id, "event_id", &fail)?,
        metrics_addr: parse_key(metrics_addr, "metrics_addr", &fail)?,
    };

    // The keys left are the runtime's; an error inside one names it (the error is in the value
    // of the last top-level key before it, inline, dotted or under a `[table]` header).
    let keys: Vec<(String, usize)> = table
        .keys()
        .map(|k| (k.get_ref().to_string(), k.span().start))
        .collect();
    let options = ConsumerOptions::deserialize(toml::Deserializer::from(Spanned::new(span, table)))
        .map_err(|e| {
            let span = e.span();
            let message = e.message();
            let within = span
                .as_ref()
                .and_then(|s| {
                    keys.iter()
                        .filter(|(_, start)| *start <= s.start)
                        .max_by_key(|(_, start)| *start)
                        .map(|(k, _)| k.as_str())
                })
                .filter(|key| !message.contains(&format!("`{key}")));
            match within {
                Some(key) => fail(span, Some(key), message),
                None if message.starts_with("unknown field") => {
                    let program: Vec<String> =
                        PROGRAM_KEYS.iter().map(|k| format!("`{k}`")).collect();
                    fail(
                        span,
                        None,
                        &format!(
                            "{}, or one of the program's {}",
                            // The program sets it.
                            message.replace(", `handle_signals`", ""),
                            program.join(", ")
                        ),
                    )
                }
                _ => fail(span, None, message),
            }
        })?;
    Ok(FileSettings {
        name: file.name.clone(),
        program,
        options,
    })
}

/// A program key's text, parsed; the error names the key and its line.
fn parse_key<T: std::str::FromStr<Err = String>>(
    text: Option<Spanned<String>>,
    key: &str,
    fail: &impl Fn(Option<Range<usize>>, Option<&str>, &str) -> CliError,
) -> Result<Option<T>, CliError> {
    text.map(|t| {
        t.get_ref()
            .parse()
            .map_err(|e: String| fail(Some(t.span()), Some(key), &e))
    })
    .transpose()
}

/// Applies the layers: flags (already in `cli`) > environment > config file > defaults.
pub(super) fn resolve(
    cli: Cli,
    env: Env<'_>,
    file: Option<&ConfigFile>,
) -> Result<Settings, CliError> {
    let FileSettings {
        name: file_name,
        program: keys,
        mut options,
    } = parse_file(file)?;
    let layers = Layers { env, file_name };
    let g = cli.global;
    // The environment over the file, then the flags over both.
    layers.string(&mut options.brokers, ENV_BROKERS);
    layers.string(&mut options.group, ENV_GROUP);
    layers.string(&mut options.schema, ENV_SCHEMA);
    options.topics = match layers.env(ENV_TOPICS) {
        Some(topics) => clean_topics(topics.split(',').map(str::to_owned).collect()),
        None => clean_topics(options.topics),
    };
    g.overlay(&mut options).map_err(CliError::Usage)?;

    let database_url = DATABASE_URL.check(
        &g.database_url
            .or_else(|| layers.env(ENV_DATABASE_URL))
            .or(keys.database_url)
            .unwrap_or_default(),
    )?;
    let log_level = g
        .log_level
        .or(keys.log_level)
        .unwrap_or_else(|| "info".to_owned());
    let log_format = layers
        .layered(g.log_format, ENV_LOG_FORMAT, keys.log_format)?
        .unwrap_or_default();
    let brokers = |options: &ConsumerOptions| BROKERS.check(&options.brokers);
    let group = |flag: Option<String>, options: &ConsumerOptions| {
        GROUP.check(flag.as_deref().unwrap_or(&options.group))
    };
    let event_id = |flag: Option<EventIdArg>| flag.or_else(|| keys.event_id.clone());

    let action = match cli.command {
        Command::Migrate => Action::Migrate,
        Command::Run(mut r) => {
            let (interval_flag, addr_flag) = (r.metrics_interval.is_some(), r.metrics_addr.take());
            let mut refresh_source =
                format!("config file `{}`: `metrics_refresh`", layers.file_name);
            if let Some(text) = layers.env(ENV_METRICS_INTERVAL) {
                options.metrics_refresh = Some(
                    parse_duration(&text)
                        .map_err(|e| CliError::Usage(format!("{ENV_METRICS_INTERVAL}: {e}")))?,
                );
                refresh_source = ENV_METRICS_INTERVAL.to_owned();
            }
            if interval_flag {
                refresh_source = "--metrics-interval".to_owned();
            }
            let run = RunSettings {
                event_id: event_id(r.event_id.take()),
                metrics_addr: layers.layered(addr_flag, ENV_METRICS_ADDR, keys.metrics_addr)?,
                relay: r.relay.then(|| std::mem::take(&mut r.relay_options)),
            };
            r.overlay(&mut options);

            brokers(&options)?;
            GROUP.check(&options.group)?;
            if options.topics.is_empty() {
                return Err(TOPICS.missing());
            }
            // Flags refuse 0; the file's numbers are checked here.
            let ratio_window = options.circuit_breaker.ratio.map(|r| r.window);
            for (key, value) in [
                ("batch_size", Some(options.batch_size as u64)),
                ("concurrency", options.concurrency.map(|n| n as u64)),
                ("circuit_breaker.ratio.window", ratio_window),
            ] {
                if value == Some(0) {
                    return Err(layers.bad(key, "must be at least 1"));
                }
            }
            let retry = &options.retry_policy;
            if retry.initial_delay > retry.max_delay {
                return Err(CliError::Usage(format!(
                    "the retry delay ({:?}) is longer than the longest retry delay ({:?}); lower \
                     --retry-delay or raise --retry-max-delay (in the config file: \
                     retry_policy = {{ initial_delay, max_delay }})",
                    retry.initial_delay, retry.max_delay
                )));
            }
            if options.metrics_refresh.is_some_and(|d| d.is_zero()) {
                return Err(CliError::Usage(format!(
                    "{refresh_source} must be longer than 0"
                )));
            }
            // The program's own defaults.
            options.concurrency.get_or_insert(DEFAULT_CONCURRENCY);
            options.handle_signals = true;
            if run.metrics_addr.is_some() {
                options
                    .metrics_refresh
                    .get_or_insert(DEFAULT_METRICS_INTERVAL);
            }
            Action::Run(run)
        }
        Command::Offsets(o) => match o.action {
            None => Action::Offsets {
                group: group(o.group, &options)?,
                topic: o.topic,
            },
            Some(OffsetsAction::Set(set)) => Action::SetOffset {
                group: group(o.group, &options)?,
                topic: o.topic.ok_or_else(|| {
                    CliError::Usage(
                        "`offsets set` needs --topic, the topic whose offset to move".into(),
                    )
                })?,
                partition: set.partition,
                offset: set.offset,
            },
        },
        Command::Status(s) => Action::Status {
            brokers: brokers(&options)?,
            group: group(s.group, &options)?,
            configured: if s.topic.is_some() {
                Vec::new()
            } else {
                options.topics.clone()
            },
            topic: s.topic,
        },
        Command::Replay(r) => Action::Replay(ReplaySettings {
            brokers: brokers(&options)?,
            group: group(r.group, &options)?,
            topic: r.topic,
            partition: r.partition,
            from: r.from,
            dry_run: r.dry_run,
            rebuild: r.rebuild,
            event_id: event_id(r.event_id),
        }),
        Command::DeadLetters(d) => Action::DeadLetters(match d.action {
            DeadLettersCommand::List(l) => DeadLetters::List {
                group: group(l.group, &options)?,
                topic: l.topic,
            },
            DeadLettersCommand::Show(s) => DeadLetters::Show { id: s.id },
            DeadLettersCommand::Redrive(r) => DeadLetters::Redrive {
                target: if r.all {
                    RedriveTarget::All {
                        group: group(r.group, &options)?,
                        topic: r.topic,
                    }
                } else if r.ids.is_empty() {
                    return Err(CliError::Usage(
                        "`dead-letters redrive` needs the ids of the dead letters to redrive (see `dead-letters list`), or --all to redrive every dead letter of a group (--group)".into(),
                    ));
                } else if r.group.is_some() || r.topic.is_some() {
                    return Err(CliError::Usage(
                        "`dead-letters redrive`: --group and --topic choose dead letters only with --all; to redrive ids, give just the ids".into(),
                    ));
                } else {
                    RedriveTarget::Ids(r.ids)
                },
                event_id: event_id(r.event_id),
            },
            DeadLettersCommand::Purge(p) => {
                let target = match p.id {
                    Some(id) => PurgeTarget::Id(id),
                    None => PurgeTarget::Group {
                        group: group(p.group, &options)?,
                        topic: p.topic,
                    },
                };
                if !p.yes {
                    let (what, them) = match &target {
                        PurgeTarget::Id(id) => (format!("dead letter {id}"), "it"),
                        PurgeTarget::Group { group, topic: None } => {
                            (format!("every dead letter of group `{group}`"), "them")
                        }
                        PurgeTarget::Group {
                            group,
                            topic: Some(t),
                        } => (
                            format!("every dead letter of group `{group}` on topic `{t}`"),
                            "them",
                        ),
                    };
                    return Err(CliError::Usage(format!(
                        "refusing to purge without --yes: `dead-letters purge` would delete {what} for good, without applying {them}; check with `dead-letters list` (or `show ID`), then pass --yes. Nothing was deleted"
                    )));
                }
                DeadLetters::Purge(target)
            }
        }),
        Command::Relay(r) => Action::Relay {
            brokers: brokers(&options)?,
            relay: r.relay,
            metrics_addr: layers.layered(r.metrics_addr, ENV_METRICS_ADDR, keys.metrics_addr)?,
        },
        Command::Trace(t) => Action::Trace {
            event_id: t.event_id,
        },
        Command::Outbox(o) => match o.action {
            OutboxCommand::Status => Action::OutboxStatus,
            OutboxCommand::Parked => Action::OutboxParked,
            OutboxCommand::Retry(t) => Action::OutboxRetry {
                event_id: t.event_id,
            },
        },
    };
    Ok(Settings {
        database_url,
        options,
        log_level,
        log_format,
        action,
    })
}
