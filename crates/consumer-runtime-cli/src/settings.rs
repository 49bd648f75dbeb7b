//! Configuration layering: flags win over environment variables, which win over the TOML file
//! (`--config`), which wins over the defaults. [`resolve`] is a pure function of the parsed
//! command line, an environment lookup and the file's text, so the precedence is unit-tested
//! without touching the process environment.

use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;

use crate::CliError;
use crate::args::{
    Cli, Command, DeadLettersCommand, EventIdArg, Limit, LogFormat, MaxAttempts, MetricsAddr,
    OffsetsAction, Ratio, parse_duration, parse_kafka_property,
};
use consumer_runtime::{Assignor, Guarantee, OffsetReset, ReplayFrom};

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

/// The config file: every key is optional; an unknown key is an error that names it.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    database_url: Option<String>,
    brokers: Option<String>,
    schema: Option<String>,
    log_level: Option<String>,
    log_format: Option<String>,
    group: Option<String>,
    topics: Option<Vec<String>>,
    batch_size: Option<usize>,
    batch_wait: Option<String>,
    concurrency: Option<usize>,
    guarantee: Option<String>,
    event_id: Option<String>,
    offset_reset: Option<String>,
    assignor: Option<String>,
    max_attempts: Option<FileScalar>,
    retry_delay: Option<String>,
    retry_max_delay: Option<String>,
    breaker_consecutive: Option<FileScalar>,
    breaker_ratio: Option<FileScalar>,
    breaker_window: Option<usize>,
    metrics_addr: Option<String>,
    metrics_interval: Option<String>,
    kafka: Option<toml::Table>,
}

/// A key that takes a number or a word: `max_attempts = 5` or `max_attempts = "unlimited"`,
/// `breaker_ratio = 0.5` or `breaker_ratio = "off"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum FileScalar {
    Integer(i64),
    Float(f64),
    Text(String),
}

impl FileScalar {
    fn text(&self) -> String {
        match self {
            FileScalar::Integer(n) => n.to_string(),
            FileScalar::Float(x) => x.to_string(),
            FileScalar::Text(t) => t.clone(),
        }
    }
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
    pub(super) schema: String,
    pub(super) kafka: Vec<(String, String)>,
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

/// `run`'s settings; `None` leaves the runtime's default.
#[derive(Debug)]
pub(super) struct RunSettings {
    pub(super) brokers: String,
    pub(super) group: String,
    pub(super) topics: Vec<String>,
    pub(super) batch_size: Option<usize>,
    pub(super) batch_wait: Option<Duration>,
    pub(super) concurrency: Option<usize>,
    pub(super) guarantee: Option<Guarantee>,
    pub(super) event_id: Option<EventIdArg>,
    pub(super) offset_reset: Option<OffsetReset>,
    pub(super) assignor: Option<Assignor>,
    pub(super) max_attempts: Option<Option<u32>>,
    pub(super) retry_delay: Option<Duration>,
    pub(super) retry_max_delay: Option<Duration>,
    pub(super) breaker_consecutive: Option<Option<u64>>,
    pub(super) breaker_ratio: Option<Option<f64>>,
    pub(super) breaker_window: Option<usize>,
    /// `--metrics-addr`: serve Prometheus metrics there.
    pub(super) metrics_addr: Option<MetricsAddr>,
    /// `--metrics-interval`.
    pub(super) metrics_interval: Option<Duration>,
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
    env: Option<&'static str>,
    key: &'static str,
}

const DATABASE_URL: Required = Required {
    what: "database URL",
    flag: "--database-url",
    env: Some(ENV_DATABASE_URL),
    key: "database_url",
};
const BROKERS: Required = Required {
    what: "Kafka brokers",
    flag: "--brokers",
    env: Some(ENV_BROKERS),
    key: "brokers",
};
const GROUP: Required = Required {
    what: "consumer group",
    flag: "--group",
    env: Some(ENV_GROUP),
    key: "group",
};
const TOPICS: Required = Required {
    what: "topic",
    flag: "--topic",
    env: Some(ENV_TOPICS),
    key: "topics",
};

impl Required {
    fn missing(&self) -> CliError {
        let env = self.env.map(|e| format!(", set {e}")).unwrap_or_default();
        CliError::Usage(format!(
            "no {} given; pass {}{env}, or set `{}` in the config file (--config)",
            self.what, self.flag, self.key
        ))
    }
}

/// The layers of one resolution: the environment and the parsed file.
struct Layers<'a> {
    env: Env<'a>,
    file: FileConfig,
    file_name: String,
}

impl Layers<'_> {
    /// An environment variable; an empty one counts as unset.
    fn env(&self, name: &str) -> Option<String> {
        (self.env)(name).filter(|v| !v.trim().is_empty())
    }

    /// flag > env > file, for a string.
    fn string(
        &self,
        flag: Option<String>,
        env: Option<&str>,
        file: Option<String>,
    ) -> Option<String> {
        flag.or_else(|| env.and_then(|e| self.env(e))).or(file)
    }

    fn required(
        &self,
        r: &Required,
        flag: Option<String>,
        file: Option<String>,
    ) -> Result<String, CliError> {
        self.string(flag, r.env, file).ok_or_else(|| r.missing())
    }

    /// flag > file, for a value the file gives as text.
    fn parsed<T: FromStr<Err = String>>(
        &self,
        flag: Option<T>,
        key: &str,
        file: Option<String>,
    ) -> Result<Option<T>, CliError> {
        match (flag, file) {
            (Some(v), _) => Ok(Some(v)),
            (None, Some(text)) => text
                .parse::<T>()
                .map(Some)
                .map_err(|e: String| self.bad(key, &e)),
            (None, None) => Ok(None),
        }
    }

    /// flag > env > file, for a value the environment and the file give as text.
    fn layered<T: FromStr<Err = String>>(
        &self,
        flag: Option<T>,
        env: &str,
        key: &str,
        file: Option<String>,
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
        self.parsed(None, key, file)
    }

    /// `--metrics-interval` > CONSUMER_METRICS_INTERVAL > `metrics_interval`; never zero.
    fn metrics_interval(&self, flag: Option<Duration>) -> Result<Option<Duration>, CliError> {
        let (interval, source) = match (flag, self.env(ENV_METRICS_INTERVAL)) {
            (Some(d), _) => (d, "--metrics-interval".to_owned()),
            (None, Some(text)) => (
                parse_duration(&text)
                    .map_err(|e| CliError::Usage(format!("{ENV_METRICS_INTERVAL}: {e}")))?,
                ENV_METRICS_INTERVAL.to_owned(),
            ),
            (None, None) => match &self.file.metrics_interval {
                Some(text) => (
                    parse_duration(text).map_err(|e| self.bad("metrics_interval", &e))?,
                    format!("config file `{}`: `metrics_interval`", self.file_name),
                ),
                None => return Ok(None),
            },
        };
        if interval.is_zero() {
            return Err(CliError::Usage(format!("{source} must be longer than 0")));
        }
        Ok(Some(interval))
    }

    fn bad(&self, key: &str, why: &str) -> CliError {
        CliError::Usage(format!("config file `{}`: `{key}`: {why}", self.file_name))
    }

    /// The topics: `--topic` > KAFKA_TOPICS (comma-separated) > the file's `topics`.
    fn topics(&self, flag: Vec<String>) -> Vec<String> {
        let clean = |v: Vec<String>| -> Vec<String> {
            v.into_iter()
                .map(|t| t.trim().to_owned())
                .filter(|t| !t.is_empty())
                .collect()
        };
        let flag = clean(flag);
        if !flag.is_empty() {
            return flag;
        }
        if let Some(env) = self.env(ENV_TOPICS) {
            return clean(env.split(',').map(str::to_owned).collect());
        }
        clean(self.file.topics.clone().unwrap_or_default())
    }

    /// The file's `[kafka]` table, flattened (`[kafka] session.timeout.ms = 6000` and
    /// `"session.timeout.ms" = "6000"` are the same property), then `-X` on top.
    fn kafka(&self, flags: &[String]) -> Result<Vec<(String, String)>, CliError> {
        let mut props = Vec::new();
        if let Some(table) = &self.file.kafka {
            self.flatten("", table, &mut props)?;
        }
        for raw in flags {
            let (k, v) = parse_kafka_property(raw).map_err(CliError::Usage)?;
            props.retain(|(key, _)| *key != k);
            props.push((k, v));
        }
        Ok(props)
    }

    fn flatten(
        &self,
        prefix: &str,
        table: &toml::Table,
        out: &mut Vec<(String, String)>,
    ) -> Result<(), CliError> {
        for (k, v) in table {
            let key = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            let value = match v {
                toml::Value::String(s) => s.clone(),
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Float(f) => f.to_string(),
                toml::Value::Boolean(b) => b.to_string(),
                toml::Value::Table(t) => {
                    self.flatten(&key, t, out)?;
                    continue;
                }
                _ => {
                    return Err(self.bad(
                        &format!("kafka.{key}"),
                        "a librdkafka property must be a string, a number or a boolean",
                    ));
                }
            };
            out.push((key, value));
        }
        Ok(())
    }
}

/// Parses the config file; errors name the file, the line and (for an unknown key) the key.
fn parse_file(file: Option<&ConfigFile>) -> Result<(FileConfig, String), CliError> {
    let Some(file) = file else {
        return Ok((FileConfig::default(), String::new()));
    };
    match toml::from_str::<FileConfig>(&file.text) {
        Ok(config) => Ok((config, file.name.clone())),
        Err(e) => {
            let line = e
                .span()
                .map(|span| {
                    let upto = span.start.min(file.text.len());
                    format!(", line {}", file.text[..upto].matches('\n').count() + 1)
                })
                .unwrap_or_default();
            let message = e.message().trim().replace('\n', " ");
            Err(CliError::Usage(format!(
                "config file `{}`{line}: {message}",
                file.name
            )))
        }
    }
}

/// Applies the layers: flags (already in `cli`) > environment > config file > defaults.
pub(super) fn resolve(
    cli: Cli,
    env: Env<'_>,
    file: Option<&ConfigFile>,
) -> Result<Settings, CliError> {
    let (config, file_name) = parse_file(file)?;
    let layers = Layers {
        env,
        file: config,
        file_name,
    };
    let f = &layers.file;
    let g = cli.global;
    let database_url = layers.required(&DATABASE_URL, g.database_url, f.database_url.clone())?;
    let schema = layers
        .string(g.schema, Some(ENV_SCHEMA), f.schema.clone())
        .unwrap_or_else(|| "consumer_runtime".to_owned());
    let log_level = g
        .log_level
        .or_else(|| f.log_level.clone())
        .unwrap_or_else(|| "info".to_owned());
    let log_format = layers
        .layered(
            g.log_format,
            ENV_LOG_FORMAT,
            "log_format",
            f.log_format.clone(),
        )?
        .unwrap_or_default();
    let kafka = layers.kafka(&g.kafka)?;
    let brokers = || layers.required(&BROKERS, g.brokers.clone(), f.brokers.clone());
    let group = |flag: Option<String>| layers.required(&GROUP, flag, f.group.clone());
    let event_id = |flag: Option<EventIdArg>| layers.parsed(flag, "event_id", f.event_id.clone());

    let action = match cli.command {
        Command::Migrate => Action::Migrate,
        Command::Run(r) => {
            let topics = layers.topics(r.topics);
            if topics.is_empty() {
                return Err(TOPICS.missing());
            }
            let duration =
                |key: &str, flag: Option<Duration>, file: &Option<String>| match (flag, file) {
                    (Some(w), _) => Ok(Some(w)),
                    (None, Some(text)) => parse_duration(text)
                        .map(Some)
                        .map_err(|e| layers.bad(key, &e)),
                    (None, None) => Ok(None),
                };
            let scalar = |v: &Option<FileScalar>| v.as_ref().map(FileScalar::text);
            let positive = |key: &str, v: Option<usize>| match v {
                Some(0) => Err(layers.bad(key, "must be at least 1")),
                other => Ok(other),
            };
            Action::Run(RunSettings {
                brokers: brokers()?,
                group: group(r.group)?,
                topics,
                batch_size: r.batch_size.or(positive("batch_size", f.batch_size)?),
                batch_wait: duration("batch_wait", r.batch_wait, &f.batch_wait)?,
                concurrency: r.concurrency.or(positive("concurrency", f.concurrency)?),
                guarantee: layers.parsed(r.guarantee, "guarantee", f.guarantee.clone())?,
                event_id: event_id(r.event_id)?,
                offset_reset: layers.parsed(
                    r.offset_reset,
                    "offset_reset",
                    f.offset_reset.clone(),
                )?,
                assignor: layers.parsed(r.assignor, "assignor", f.assignor.clone())?,
                max_attempts: layers
                    .parsed(r.max_attempts, "max_attempts", scalar(&f.max_attempts))?
                    .map(|MaxAttempts(n)| n),
                retry_delay: duration("retry_delay", r.retry_delay, &f.retry_delay)?,
                retry_max_delay: duration(
                    "retry_max_delay",
                    r.retry_max_delay,
                    &f.retry_max_delay,
                )?,
                breaker_consecutive: layers
                    .parsed(
                        r.breaker_consecutive,
                        "breaker_consecutive",
                        scalar(&f.breaker_consecutive),
                    )?
                    .map(|Limit(n)| n),
                breaker_ratio: layers
                    .parsed(r.breaker_ratio, "breaker_ratio", scalar(&f.breaker_ratio))?
                    .map(|Ratio(r)| r),
                breaker_window: r
                    .breaker_window
                    .or(positive("breaker_window", f.breaker_window)?),
                metrics_addr: layers.layered(
                    r.metrics_addr,
                    ENV_METRICS_ADDR,
                    "metrics_addr",
                    f.metrics_addr.clone(),
                )?,
                metrics_interval: layers.metrics_interval(r.metrics_interval)?,
            })
        }
        Command::Offsets(o) => match o.action {
            None => Action::Offsets {
                group: group(o.group)?,
                topic: o.topic,
            },
            Some(OffsetsAction::Set(set)) => Action::SetOffset {
                group: group(o.group)?,
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
            brokers: brokers()?,
            group: group(s.group)?,
            configured: if s.topic.is_some() {
                Vec::new()
            } else {
                layers.topics(Vec::new())
            },
            topic: s.topic,
        },
        Command::Replay(r) => Action::Replay(ReplaySettings {
            brokers: brokers()?,
            group: group(r.group)?,
            topic: r.topic,
            partition: r.partition,
            from: r.from,
            dry_run: r.dry_run,
            rebuild: r.rebuild,
            event_id: event_id(r.event_id)?,
        }),
        Command::DeadLetters(d) => Action::DeadLetters(match d.action {
            DeadLettersCommand::List(l) => DeadLetters::List {
                group: group(l.group)?,
                topic: l.topic,
            },
            DeadLettersCommand::Show(s) => DeadLetters::Show { id: s.id },
            DeadLettersCommand::Redrive(r) => DeadLetters::Redrive {
                target: if r.all {
                    RedriveTarget::All {
                        group: group(r.group)?,
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
                event_id: event_id(r.event_id)?,
            },
            DeadLettersCommand::Purge(p) => {
                let target = match p.id {
                    Some(id) => PurgeTarget::Id(id),
                    None => PurgeTarget::Group {
                        group: group(p.group)?,
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
    };
    Ok(Settings {
        database_url,
        schema,
        kafka,
        log_level,
        log_format,
        action,
    })
}
