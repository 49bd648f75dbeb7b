//! The generated consumer program: one call turns a [`Handler`] into a complete command-line
//! program with `run`, `migrate`, `offsets`, `status`, `replay` and `dead-letters`. It is a crate
//! of its own: an application that embeds [`consumer_runtime::Runtime`] in a service of its own
//! depends on `consumer-runtime` alone, without clap, TOML, a log subscriber or an exporter.
//!
//! ```no_run
//! # use consumer_runtime::{Context, Handler, HandlerError};
//! # struct Orders;
//! # impl Handler for Orders {
//! #     type Event = consumer_runtime::Raw;
//! #     async fn handle(&self, _: &mut Context<'_, sqlx::Postgres>, _: Self::Event) -> Result<(), HandlerError> { Ok(()) }
//! # }
//! fn main() -> std::process::ExitCode {
//!     consumer_runtime_cli::App::new("orders", Orders)
//!         .about("Keeps the orders projection up to date")
//!         .main()
//! }
//! ```
//!
//! ```text
//! orders migrate --database-url postgres://app@db/app
//! orders run -b kafka:9092 -g orders -t orders
//! orders status -g orders
//! orders replay -g orders -t orders --from 2026-11-20T08:00:00Z --dry-run
//! orders dead-letters list -g orders
//! orders dead-letters redrive 17 18
//! ```
//!
//! Settings come from flags, then environment variables (`DATABASE_URL`, `KAFKA_BROKERS`,
//! `CONSUMER_GROUP`, `KAFKA_TOPICS`, `CONSUMER_RUNTIME_SCHEMA`, `CONSUMER_LOG_FORMAT`,
//! `CONSUMER_METRICS_ADDR`, `CONSUMER_METRICS_INTERVAL`), then a TOML file given with
//! `--config` (or `CONSUMER_CONFIG`), then the defaults. The file is a
//! [`ConsumerOptions`](consumer_runtime::ConsumerOptions) in TOML, the runtime's own options
//! value, plus the program's keys `database_url`, `log_level`, `log_format`, `event_id` and
//! `metrics_addr`; the flags and variables are laid over it, and `run` hands the result to the
//! runtime whole. Logs go to stderr, tables and results to stdout. The exit status is 0 on
//! success, 2 for a usage error (flags, environment, config file) and 1 for any other failure,
//! with a one-line `error: …` on stderr.
//!
//! `run --metrics-addr HOST:PORT` serves Prometheus metrics (see [`consumer_runtime::telemetry`]) at
//! `http://HOST:PORT/metrics`; `--log-format json` writes one JSON object per log line.

mod args;
mod commands;
mod exporter;
mod settings;

use std::ffi::OsString;
use std::marker::PhantomData;
use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches};
use sqlx::migrate::{Migrate, Migrator};
use sqlx::{Postgres, Sqlite};

use consumer_runtime::{Backend, DatabaseKind, Error, EventId, Handler};

use crate::args::Cli;
use crate::settings::{ConfigFile, ENV_CONFIG, Env};

/// Why the program failed. [`CliError::exit_code`] maps it to the process's exit status.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CliError {
    /// The command line, an environment variable or the config file is wrong or incomplete
    /// (exit status 2).
    #[error("{0}")]
    Usage(String),

    /// The runtime's tables are missing or older than this program needs: run `migrate`.
    #[error(
        "the database schema `{schema}` is at migration version {applied} but this program needs version {required}; run `{program} migrate` first"
    )]
    SchemaBehind {
        /// The program's name.
        program: String,
        /// The schema (PostgreSQL) or table prefix (SQLite) of the runtime's tables.
        schema: String,
        /// The newest migration applied, or `none`.
        applied: String,
        /// The newest migration this program ships.
        required: i64,
    },

    /// The runtime, the database or Kafka failed.
    #[error(transparent)]
    Runtime(#[from] Error),

    /// The command failed for a reason of its own (an unknown consumer group, say).
    #[error("{0}")]
    Failed(String),
}

impl CliError {
    /// The process exit status: 2 for usage errors, 1 for everything else.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Usage(_) => 2,
            _ => 1,
        }
    }

    /// Classifies a runtime error: bad configuration is a usage error, a schema behind names
    /// the `migrate` command of this program.
    fn from_runtime(error: Error, program: &str) -> CliError {
        match error {
            Error::SchemaBehind {
                schema,
                applied,
                required,
            } => CliError::SchemaBehind {
                program: program.to_owned(),
                schema,
                applied,
                required,
            },
            Error::Config(why) => CliError::Usage(why),
            other => CliError::Runtime(other),
        }
    }
}

/// A consumer program around a [`Handler`]: `App::new("orders", Orders).main()` is a complete
/// `main`. See the [crate documentation](crate).
pub struct App<H: Handler<DB>, DB: Backend> {
    name: &'static str,
    about: Option<&'static str>,
    handler: H,
    migrations: Option<Migrator>,
    event_id: Option<EventId<H::Event>>,
    _db: PhantomData<fn() -> DB>,
}

impl<H: Handler<Postgres>> App<H, Postgres> {
    /// A program called `name` that keeps its state in PostgreSQL (`--database-url
    /// postgres://…`).
    pub fn new(name: &'static str, handler: H) -> Self {
        App::with_backend(name, handler)
    }
}

impl<H: Handler<Sqlite>> App<H, Sqlite> {
    /// A program called `name` that keeps its state in a SQLite file (`--database-url
    /// sqlite://…`).
    pub fn sqlite(name: &'static str, handler: H) -> Self {
        App::with_backend(name, handler)
    }
}

impl<H: Handler<DB>, DB: Backend> App<H, DB>
where
    DB::Connection: Migrate,
{
    fn with_backend(name: &'static str, handler: H) -> Self {
        App {
            name,
            about: None,
            handler,
            migrations: None,
            event_id: None,
            _db: PhantomData,
        }
    }

    /// The one-line description at the top of `--help`.
    pub fn about(mut self, text: &'static str) -> Self {
        self.about = Some(text);
        self
    }

    /// The application's own migrations, applied by `migrate` after the runtime's (history in
    /// sqlx's default `_sqlx_migrations` table).
    pub fn migrations(mut self, migrator: Migrator) -> Self {
        self.migrations = Some(migrator);
        self
    }

    /// The default event-id strategy in code (e.g. a business key); `--event-id` overrides it.
    pub fn event_id(mut self, strategy: EventId<H::Event>) -> Self {
        self.event_id = Some(strategy);
        self
    }

    /// Parses `std::env::args`, builds a multi-thread tokio runtime, runs the subcommand,
    /// prints a one-line `error: …` to stderr and returns a non-zero exit code on failure (2
    /// for usage errors, 1 otherwise).
    pub fn main(self) -> ExitCode {
        self.main_with_args(std::env::args_os())
    }

    /// [`App::main`] with explicit args (`args[0]` is the program name), e.g. for a binary that
    /// is the consumer program only under one of its own subcommands.
    pub fn main_with_args<I, T>(self, args: I) -> ExitCode
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        let runtime = match tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                eprintln!("error: cannot start the async runtime: {e}");
                return ExitCode::FAILURE;
            }
        };
        match runtime.block_on(self.run_args(args)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(e.exit_code())
            }
        }
    }

    /// The same as [`App::main`] for tests and embedding: explicit args (`args[0]` is the
    /// program name), and the error returned instead of printed. `--help` prints the help to
    /// stdout and returns `Ok`.
    pub async fn run_args<I, T>(self, args: I) -> Result<(), CliError>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        let env = |name: &str| std::env::var(name).ok();
        self.run_with_env(args, &env).await
    }

    async fn run_with_env<I, T>(self, args: I, env: Env<'_>) -> Result<(), CliError>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        let Some(cli) = parse(self.name, self.about, DB::KIND, args)? else {
            return Ok(());
        };
        let file = read_config_file(&cli, env)?;
        let settings = settings::resolve(cli, env, file.as_ref())?;
        init_logging(&settings.log_level, env("RUST_LOG"), settings.log_format)?;
        let program = self.name;
        commands::execute(self, settings)
            .await
            .map_err(|e| match e {
                CliError::Runtime(e) => CliError::from_runtime(e, program),
                other => other,
            })
    }
}

/// The clap command, with the program's name, description and examples.
fn command(name: &'static str, about: Option<&'static str>, kind: DatabaseKind) -> clap::Command {
    let url = match kind {
        DatabaseKind::Sqlite => format!("sqlite://{name}.db"),
        _ => "postgres://app@db/app".to_owned(),
    };
    let mut cmd = Cli::command()
        .name(name)
        .bin_name(name)
        .after_help(examples::top(name, &url));
    if let Some(about) = about {
        cmd = cmd.about(about);
    }
    for (sub, text) in examples::subcommands(name, &url) {
        cmd = cmd.mut_subcommand(sub, |c| c.after_help(text));
    }
    let usages = [
        (
            "redrive",
            format!(
                "{name} dead-letters redrive [OPTIONS] <ID>...\n       {name} dead-letters redrive [OPTIONS] --all [-g <GROUP>] [-t <TOPIC>]"
            ),
        ),
        (
            "purge",
            format!(
                "{name} dead-letters purge [OPTIONS] [-g <GROUP>] [-t <TOPIC>] --yes\n       {name} dead-letters purge [OPTIONS] --id <ID> --yes"
            ),
        ),
    ];
    for (sub, usage) in usages {
        cmd = cmd.mut_subcommand("dead-letters", |c| {
            c.mut_subcommand(sub, |c| c.override_usage(usage))
        });
    }
    for (sub, text) in examples::dead_letters(name) {
        cmd = cmd.mut_subcommand("dead-letters", |c| {
            if sub.is_empty() {
                c.after_help(text)
            } else {
                c.mut_subcommand(sub, |c| c.after_help(text))
            }
        });
    }
    cmd
}

/// Parses the command line. `Ok(None)`: help was printed, nothing else to do.
fn parse<I, T>(
    name: &'static str,
    about: Option<&'static str>,
    kind: DatabaseKind,
    args: I,
) -> Result<Option<Cli>, CliError>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    use clap::error::ErrorKind;
    let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
    let matches = command(name, about, kind).try_get_matches_from(&args);
    let result = matches.and_then(|mut m| Cli::from_arg_matches_mut(&mut m));
    match result {
        Ok(cli) => Ok(Some(cli)),
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => {
            let _ = e.print();
            Ok(None)
        }
        Err(e)
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand | ErrorKind::MissingSubcommand
            ) =>
        {
            if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                let _ = e.print();
            }
            if args.iter().skip(1).any(|a| a == "dead-letters") {
                return Err(CliError::Usage(format!(
                    "no dead-letters command given; use one of list, show, redrive, purge (see `{name} dead-letters --help`)"
                )));
            }
            Err(CliError::Usage(format!(
                "no command given; use one of run, migrate, offsets, status, replay, dead-letters (see `{name} --help`)"
            )))
        }
        Err(e) => Err(CliError::Usage(one_line(&e.render().to_string()))),
    }
}

/// clap's multi-line error as one line: the message and its tips, without the usage.
fn one_line(rendered: &str) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut usage = false;
    for line in rendered.lines().map(str::trim) {
        // The usage runs from `Usage:` to the next blank line.
        usage = line.starts_with("Usage:") || (usage && !line.is_empty());
        if line.is_empty() || usage {
            continue;
        }
        let line = line.strip_prefix("error: ").unwrap_or(line);
        let line = match line.strip_prefix("For more") {
            Some(rest) => format!("for more{rest}"),
            None => line.to_owned(),
        };
        // A list after "…:" continues its line.
        match parts.last_mut() {
            Some(last) if last.ends_with(':') || last.ends_with(',') => {
                last.push(' ');
                last.push_str(&line);
            }
            _ => parts.push(line),
        }
    }
    parts.join("; ")
}

/// Reads `--config` (or `CONSUMER_CONFIG`), if given.
fn read_config_file(cli: &Cli, env: Env<'_>) -> Result<Option<ConfigFile>, CliError> {
    let path = match &cli.global.config {
        Some(p) => p.clone(),
        None => match env(ENV_CONFIG).filter(|v| !v.trim().is_empty()) {
            Some(p) => p.into(),
            None => return Ok(None),
        },
    };
    let name = path.display().to_string();
    let text = std::fs::read_to_string(&path).map_err(|e| {
        CliError::Usage(format!(
            "cannot read the config file `{name}`: {e}; check --config (or {ENV_CONFIG})"
        ))
    })?;
    Ok(Some(ConfigFile { name, text }))
}

/// Logs on stderr, human-readable or one JSON object per line. `RUST_LOG`, when set, wins over
/// `--log-level`. A second call (tests, embedding) keeps the first subscriber.
fn init_logging(
    level: &str,
    rust_log: Option<String>,
    format: args::LogFormat,
) -> Result<(), CliError> {
    use std::io::IsTerminal as _;
    let filter = log_filter(level, rust_log)?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        args::LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        args::LogFormat::Json => builder.json().with_ansi(false).try_init(),
    };
    Ok(())
}

/// The log filter: `RUST_LOG` if set, else `--log-level` (a level or a filter).
fn log_filter(
    level: &str,
    rust_log: Option<String>,
) -> Result<tracing_subscriber::EnvFilter, CliError> {
    use tracing_subscriber::EnvFilter;
    Ok(match rust_log.filter(|v| !v.trim().is_empty()) {
        Some(directives) => EnvFilter::try_new(&directives).map_err(|e| {
            CliError::Usage(format!(
                "RUST_LOG `{directives}` is not a valid log filter: {e}"
            ))
        })?,
        None => {
            let bad = |why: String| {
                CliError::Usage(format!(
                    "--log-level `{level}` is not a log level or filter{why}; use error, warn, info, debug, trace or off, or a filter such as info,consumer_runtime=debug"
                ))
            };
            let plain = !level.contains(['=', ',', '[', ':']);
            let known = ["error", "warn", "info", "debug", "trace", "off"];
            if plain && !known.contains(&level.trim().to_ascii_lowercase().as_str()) {
                return Err(bad(String::new()));
            }
            EnvFilter::try_new(level).map_err(|e| bad(format!(" ({e})")))?
        }
    })
}

/// The examples at the end of `--help`.
mod examples {
    pub(super) fn top(p: &str, url: &str) -> String {
        format!(
            "Examples:
  {p} migrate --database-url {url}
  {p} run -b kafka:9092 -g {p} -t {p}
  {p} status -g {p}
  {p} replay -g {p} -t {p} --from earliest --dry-run
  {p} dead-letters list -g {p}

Settings: flags win over environment variables, which win over the --config file, which wins
over the defaults. Exit status: 0 on success, 2 for a usage error, 1 for any other failure."
        )
    }

    pub(super) fn subcommands(p: &str, url: &str) -> Vec<(&'static str, String)> {
        vec![
            (
                "run",
                format!(
                    "Examples:
  {p} run --database-url {url} -b kafka:9092 -g {p} -t {p}
  DATABASE_URL={url} KAFKA_BROKERS=kafka:9092 CONSUMER_GROUP={p} \\
    KAFKA_TOPICS={p},{p}-retries {p} run --batch-size 100 --batch-wait 50ms
  {p} run --config {p}.toml -X security.protocol=SASL_SSL -X sasl.password=***
  {p} run --config {p}.toml --metrics-addr 0.0.0.0:9100 --log-format json

A config file ({p}.toml):
  database_url = \"{url}\"
  brokers = \"kafka:9092\"
  group = \"{p}\"
  topics = [\"{p}\"]
  batch_size = 500
  batch_wait = \"20ms\"
  guarantee = \"effectively-once\"
  retry_policy = {{ max_attempts = 5, max_delay = \"10s\" }}
  [kafka]
  \"session.timeout.ms\" = 10000"
                ),
            ),
            (
                "migrate",
                format!(
                    "Examples:
  {p} migrate --database-url {url}
  DATABASE_URL={url} {p} migrate --schema {p}_runtime"
                ),
            ),
            (
                "offsets",
                format!(
                    "Examples:
  {p} offsets -g {p}
  {p} offsets -g {p} -t {p}
  {p} offsets set -g {p} -t {p} --partition 3 --offset 1200"
                ),
            ),
            (
                "status",
                format!(
                    "Columns: stored_offset is the next offset the group will process; lag is
high_watermark - stored_offset (\"-\" when the group stored nothing for the partition yet);
updated_at is the stored offset's last change (a commit, an assignment or a replay), UTC.

Examples:
  {p} status -b kafka:9092 -g {p}
  {p} status -b kafka:9092 -g {p} -t {p}"
                ),
            ),
            (
                "replay",
                format!(
                    "Examples:
  {p} replay -b kafka:9092 -g {p} -t {p} --from earliest --dry-run
  {p} replay -b kafka:9092 -g {p} -t {p} --partition 2 --from 1200
  {p} replay -b kafka:9092 -g {p} -t {p} --from 2026-11-20T08:00:00Z
  {p} replay -b kafka:9092 -g {p} -t {p} --from earliest --rebuild   # re-runs the handler!"
                ),
            ),
            (
                "relay",
                format!(
                    "Examples:
  {p} relay --database-url {url} -b kafka:9092
  {p} relay -b kafka:9092 --lanes 16 --keep-published 1h --metrics-addr 0.0.0.0:9101
  {p} run -b kafka:9092 -g {p} -t {p} --relay        # consume and relay in one process"
                ),
            ),
            (
                "trace",
                format!(
                    "Examples:
  {p} trace 5f0c9a1e-2b7d-4c1a-9e3f-0a6b8d2c4e71"
                ),
            ),
        ]
    }

    /// `dead-letters` (name "") and its subcommands.
    pub(super) fn dead_letters(p: &str) -> Vec<(&'static str, String)> {
        vec![
            (
                "",
                format!(
                    "Examples:
  {p} dead-letters list -g {p}
  {p} dead-letters show 17
  {p} dead-letters redrive 17 18                 # after fixing the handler (or the data)
  {p} dead-letters redrive --all -g {p} -t {p}
  {p} dead-letters purge --id 17 --yes           # drop one record for good
  {p} dead-letters purge -g {p} --yes

Every dead-letters command needs only the database (--database-url); ids are those of
`dead-letters list`."
                ),
            ),
            (
                "list",
                format!(
                    "Columns: id is the dead letter's (for show, redrive and purge --id); partition and
offset are its record's; kind is decode (undecodable payload), missing_event_id, rejected (by
the handler), retries_exhausted or panicked; attempts is how many times the handler ran and
failed for it (0: it never ran); last_failed_at is when it was parked, or a redrive last
failed, UTC; error is the last error, cut to one line.

Examples:
  {p} dead-letters list -g {p}
  {p} dead-letters list -g {p} -t {p}
  CONSUMER_GROUP={p} {p} dead-letters list"
                ),
            ),
            (
                "show",
                format!(
                    "The key, header values and payload are printed as text when they are valid UTF-8,
else as base64 (the label says which).

Examples:
  {p} dead-letters show 17"
                ),
            ),
            (
                "redrive",
                format!(
                    "Examples:
  {p} dead-letters redrive 17
  {p} dead-letters redrive 17 18 21
  {p} dead-letters redrive --all -g {p}
  {p} dead-letters redrive --all -g {p} -t {p} --event-id header:event-id

Output, one line per dead letter:
  dead letter 17: applied, event id o-42-v2
  dead letter 18: already applied (row removed), event id o-42-v2
  dead letter 19: not found
  dead letter 21: failed again: undecodable payload: expected value at line 1 column 1
  dead letter 22: retry later: connection reset"
                ),
            ),
            (
                "purge",
                format!(
                    "Examples:
  {p} dead-letters purge --id 17 --yes
  {p} dead-letters purge -g {p} -t {p} --yes
  {p} dead-letters purge -g {p} --yes"
                ),
            ),
        ]
    }
}

#[cfg(test)]
mod tests;
