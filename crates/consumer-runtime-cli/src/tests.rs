//! The program's parsing, layering and error messages. Everything here is in-process and
//! needs neither PostgreSQL nor Kafka (the database tests use a SQLite file).

use std::collections::HashMap;
use std::time::Duration;

use clap::Parser as _;

use consumer_runtime::{
    ConsumerOptions, Context, DatabaseKind, Guarantee, Handler, HandlerError, Raw,
};

use super::args::{Cli, EventIdArg};
use super::settings::{Action, ConfigFile, Settings, resolve};
use super::{App, CliError, parse};

fn cli(args: &[&str]) -> Cli {
    Cli::try_parse_from(std::iter::once("orders").chain(args.iter().copied()))
        .unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

fn resolve_with(
    args: &[&str],
    env: &[(&str, &str)],
    toml: Option<&str>,
) -> Result<Settings, CliError> {
    let env: HashMap<String, String> = env
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    let lookup = move |name: &str| env.get(name).cloned();
    let file = toml.map(|text| ConfigFile {
        name: "orders.toml".into(),
        text: text.into(),
    });
    resolve(cli(args), &lookup, file.as_ref())
}

/// `run`'s settings: the runtime's options and the program's own.
fn run_settings(s: Settings) -> (ConsumerOptions, super::settings::RunSettings) {
    match s.action {
        Action::Run(r) => (s.options, r),
        other => panic!("not run: {other:?}"),
    }
}

const FILE: &str = r#"
database_url = "postgres://file@db/app"
brokers = "file:9092"
group = "file-group"
topics = ["file-a", "file-b"]
schema = "file_schema"
batch_size = 7
batch_wait = "250ms"
guarantee = "at-least-once"
event_id = "header:file-id"
retry_policy = { max_attempts = "unlimited" }

[kafka]
"session.timeout.ms" = 6000
client.id = "from-file"
"#;

/// `run` with only the required settings, as flags.
const MINIMAL_RUN: [&str; 9] = [
    "run",
    "--database-url",
    "sqlite://x.db",
    "-b",
    "k:9092",
    "-g",
    "g",
    "-t",
    "t",
];

/// How `orders` (a PostgreSQL program) refuses the command line `args`.
fn parse_err<const N: usize>(args: [&str; N]) -> CliError {
    match parse("orders", None, DatabaseKind::Postgres, args) {
        Ok(cli) => panic!("{args:?} was accepted: {:?}", cli.is_some()),
        Err(e) => e,
    }
}

#[test]
fn flags_win_over_environment_which_wins_over_the_file() {
    let env = [
        ("DATABASE_URL", "postgres://env@db/app"),
        ("KAFKA_BROKERS", "env:9092"),
        ("CONSUMER_GROUP", "env-group"),
        ("KAFKA_TOPICS", "env-a, env-b"),
        ("CONSUMER_RUNTIME_SCHEMA", "env_schema"),
    ];
    // Flags over everything.
    let s = resolve_with(
        &[
            "run",
            "--database-url",
            "postgres://flag@db/app",
            "-b",
            "flag:9092",
            "--schema",
            "flag_schema",
            "-g",
            "flag-group",
            "-t",
            "flag-a,flag-b",
            "-t",
            "flag-c",
            "--batch-size",
            "3",
            "--guarantee",
            "at-most-once",
        ],
        &env,
        Some(FILE),
    )
    .unwrap();
    assert_eq!(s.database_url, "postgres://flag@db/app");
    assert_eq!(s.options.schema, "flag_schema");
    let (o, _) = run_settings(s);
    assert_eq!(o.brokers, "flag:9092");
    assert_eq!(o.group, "flag-group");
    assert_eq!(o.topics, ["flag-a", "flag-b", "flag-c"]);
    assert_eq!(o.batch_size, 3);
    assert_eq!(o.guarantee, Guarantee::AtMostOnce);
    // Settings without a flag still come from the file.
    assert_eq!(o.batch_wait, Duration::from_millis(250));

    // The environment over the file.
    let s = resolve_with(&["run"], &env, Some(FILE)).unwrap();
    assert_eq!(s.database_url, "postgres://env@db/app");
    assert_eq!(s.options.schema, "env_schema");
    let (o, _) = run_settings(s);
    assert_eq!(o.brokers, "env:9092");
    assert_eq!(o.group, "env-group");
    assert_eq!(o.topics, ["env-a", "env-b"]);

    // The file over the defaults.
    let s = resolve_with(&["run"], &[], Some(FILE)).unwrap();
    assert_eq!(s.database_url, "postgres://file@db/app");
    assert_eq!(s.options.schema, "file_schema");
    assert_eq!(s.log_level, "info");
    let (o, r) = run_settings(s);
    assert_eq!(o.brokers, "file:9092");
    assert_eq!(o.group, "file-group");
    assert_eq!(o.topics, ["file-a", "file-b"]);
    assert_eq!(o.batch_size, 7);
    assert_eq!(o.guarantee, Guarantee::AtLeastOnce);
    assert_eq!(r.event_id, Some(EventIdArg::Header("file-id".into())));
    assert_eq!(o.retry_policy.max_attempts, None);

    // The defaults: nothing set leaves the runtime's own defaults, but for the two the
    // program sets (8 concurrent transactions, graceful stop on SIGINT and SIGTERM).
    let s = resolve_with(&MINIMAL_RUN, &[], None).unwrap();
    assert!(s.options.kafka.is_empty());
    let (o, r) = run_settings(s);
    assert_eq!(r.event_id, None);
    assert_eq!(r.metrics_addr, None);
    let mut expected = ConsumerOptions::default();
    expected.brokers = "k:9092".into();
    expected.group = "g".into();
    expected.topics = vec!["t".into()];
    expected.concurrency = Some(8);
    expected.handle_signals = true;
    assert_eq!(o, expected);
    assert_eq!(o.schema, "consumer_runtime");
}

#[test]
fn retry_and_circuit_breaker_settings_layer_and_build_the_policies() {
    use consumer_runtime::{CircuitBreaker, ParkedRatio, RetryPolicy};
    let base = MINIMAL_RUN;
    let with = |extra: &[&str], file: Option<&str>| {
        let args: Vec<&str> = base.iter().chain(extra).copied().collect();
        resolve_with(&args, &[], file).map(|s| run_settings(s).0)
    };

    // Nothing set: the library's defaults.
    let o = with(&[], None).unwrap();
    assert_eq!(o.retry_policy, RetryPolicy::default());
    assert_eq!(o.circuit_breaker, CircuitBreaker::default());

    // The file sets them; a flag wins over its key.
    let file = r#"
        retry_policy = { initial_delay = "1s", max_delay = "1m", max_attempts = 4 }
        circuit_breaker = { max_consecutive = "off", ratio = { max_ratio = 0.25, window = 200 } }
    "#;
    let o = with(&["--breaker-ratio", "90%"], Some(file)).unwrap();
    assert_eq!(
        o.retry_policy,
        RetryPolicy {
            initial_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(60),
            max_attempts: Some(4),
        }
    );
    assert_eq!(
        o.circuit_breaker,
        CircuitBreaker {
            max_consecutive: None,
            ratio: Some(ParkedRatio {
                max_ratio: 0.9,
                window: 200
            }),
        }
    );
    let o = with(
        &["--breaker-consecutive", "7", "--breaker-ratio", "off"],
        Some(file),
    )
    .unwrap();
    assert_eq!(
        o.circuit_breaker,
        CircuitBreaker {
            max_consecutive: Some(7),
            ratio: None
        }
    );
    let o = with(
        &["--breaker-ratio", "off", "--breaker-consecutive", "off"],
        None,
    )
    .unwrap();
    assert_eq!(o.circuit_breaker, CircuitBreaker::disabled());
    // A ratio given by flag over a file that turned it off keeps the default window.
    let o = with(
        &[
            "--breaker-ratio",
            "0.3",
            "--retry-delay",
            "5ms",
            "--max-attempts",
            "2",
        ],
        Some("circuit_breaker = { ratio = \"off\" }"),
    )
    .unwrap();
    assert_eq!(
        o.circuit_breaker.ratio,
        Some(ParkedRatio {
            max_ratio: 0.3,
            window: 1000
        })
    );
    assert_eq!(
        (o.retry_policy.initial_delay, o.retry_policy.max_attempts),
        (Duration::from_millis(5), Some(2))
    );

    // Bad values name the problem and the fix.
    let flag_err = |extra: &[&str]| {
        let args = std::iter::once("orders")
            .chain(base)
            .chain(extra.iter().copied());
        Cli::try_parse_from(args).unwrap_err().to_string()
    };
    let e = flag_err(&["--breaker-ratio", "1.5"]);
    assert!(
        e.contains("`1.5` is not a share") && e.contains("e.g. 50%"),
        "{e}"
    );
    let e = flag_err(&["--breaker-consecutive", "0"]);
    assert!(e.contains("from 1 up, or off"), "{e}");
    let err = |extra: &[&str], file: Option<&str>| with(extra, file).unwrap_err().to_string();
    let e = err(&[], Some("circuit_breaker = { ratio = \"most\" }"));
    assert!(
        e.contains("line 1: `circuit_breaker`") && e.contains("\"most\""),
        "{e}"
    );
    let e = err(&[], Some("\nretry_policy = { max_delay = \"5 parsecs\" }"));
    assert!(
        e.contains("line 2: `retry_policy`: `5 parsecs` is not a duration (unknown unit)"),
        "{e}"
    );
    let e = err(
        &[],
        Some("batch_size = 5\n[retry_policy]\nmax_attempts = 0\n"),
    );
    assert!(
        e.contains("line 3: `retry_policy`: `0` is not a number of attempts"),
        "{e}"
    );
    let e = err(&[], Some("circuit_breaker = { ratio = { window = 0 } }"));
    assert!(
        e.contains("`circuit_breaker.ratio.window`: must be at least 1"),
        "{e}"
    );
    let e = err(&["--retry-delay", "1m"], None);
    assert!(
        e.contains("lower --retry-delay or raise --retry-max-delay"),
        "{e}"
    );
}

#[test]
fn a_key_that_moved_into_a_table_names_its_new_place() {
    let err = |file: &str| {
        resolve_with(&MINIMAL_RUN, &[], Some(file))
            .unwrap_err()
            .to_string()
    };
    for (old, new) in [
        (
            "max_attempts = \"unlimited\"",
            "write retry_policy = { max_attempts = \"unlimited\" }",
        ),
        (
            "retry_delay = \"1s\"",
            "write retry_policy = { initial_delay = \"1s\" }",
        ),
        (
            "retry_max_delay = \"1m\"",
            "write retry_policy = { max_delay = \"1m\" }",
        ),
        (
            "breaker_consecutive = 5",
            "write circuit_breaker = { max_consecutive = 5 }",
        ),
        (
            "breaker_ratio = 0.25",
            "write circuit_breaker = { ratio = { max_ratio = 0.25 } }",
        ),
        (
            "breaker_ratio = \"off\"",
            "write circuit_breaker = { ratio = \"off\" }",
        ),
        (
            "breaker_window = 200",
            "write circuit_breaker = { ratio = { window = 200 } }",
        ),
        (
            "metrics_interval = \"10s\"",
            "write metrics_refresh = \"10s\"",
        ),
    ] {
        let e = err(&format!("batch_size = 5\n{old}\n"));
        let key = old.split(' ').next().unwrap();
        assert!(
            e.starts_with(&format!("config file `orders.toml`, line 2: `{key}`: "))
                && e.ends_with(new),
            "{old}: {e}"
        );
        // The suggestion is a file that works.
        let fixed = new.strip_prefix("write ").unwrap();
        resolve_with(&MINIMAL_RUN, &[], Some(fixed)).unwrap();
    }
    let e = err("handle_signals = false");
    assert!(
        e.contains("`handle_signals`") && e.contains("SIGTERM"),
        "{e}"
    );
}

#[test]
fn every_runtime_option_of_the_file_reaches_the_runtime() {
    use consumer_runtime::{Assignor, OffsetReset};
    let file = r#"
        batch_size = 200
        batch_wait = "50ms"
        concurrency = 4
        guarantee = "at-most-once"
        offset_reset = "latest"
        assignor = "range"
        startup_timeout = "30s"
        epoch_check_interval = "2s"
        metrics_refresh = "15s"
        metrics_addr = "127.0.0.1:0"
    "#;
    let (o, r) = run_settings(resolve_with(&MINIMAL_RUN, &[], Some(file)).unwrap());
    assert_eq!(
        (o.batch_size, o.batch_wait, o.concurrency),
        (200, Duration::from_millis(50), Some(4))
    );
    assert_eq!(
        (o.guarantee, o.offset_reset, o.assignor),
        (Guarantee::AtMostOnce, OffsetReset::Latest, Assignor::Range)
    );
    assert_eq!(
        (o.startup_timeout, o.epoch_check_interval, o.metrics_refresh),
        (
            Duration::from_secs(30),
            Duration::from_secs(2),
            Some(Duration::from_secs(15))
        )
    );
    assert!(o.handle_signals);
    assert!(r.metrics_addr.is_some());
}

#[test]
fn the_offset_mirror_and_the_stall_timeout_come_from_the_file_and_flags() {
    let (o, _) = run_settings(resolve_with(&MINIMAL_RUN, &[], None).unwrap());
    assert!(o.mirror_offsets, "the mirror is on by default");
    assert_eq!(o.stall_timeout, Some(Duration::from_secs(60)));

    let file = "mirror_offsets = false\nstall_timeout = \"off\"";
    let (o, _) = run_settings(resolve_with(&MINIMAL_RUN, &[], Some(file)).unwrap());
    assert!(!o.mirror_offsets);
    assert_eq!(o.stall_timeout, None);

    let mut flags = MINIMAL_RUN.to_vec();
    flags.extend(["--mirror-offsets", "true", "--stall-timeout", "90s"]);
    let (o, _) = run_settings(resolve_with(&flags, &[], Some(file)).unwrap());
    assert!(o.mirror_offsets, "a flag wins over the file");
    assert_eq!(o.stall_timeout, Some(Duration::from_secs(90)));
}

#[test]
fn metrics_and_log_format_settings_layer_flag_over_env_over_file() {
    use super::args::{LogFormat, MetricsAddr};
    let file = FILE.replace(
        "batch_size = 7",
        "batch_size = 7\nmetrics_addr = \"0.0.0.0:9100\"\nmetrics_refresh = \"10s\"\nlog_format = \"json\"",
    );
    let s = resolve_with(&["run"], &[], Some(&file)).unwrap();
    assert_eq!(s.log_format, LogFormat::Json);
    let (o, r) = run_settings(s);
    assert_eq!(r.metrics_addr, Some(MetricsAddr("0.0.0.0:9100".into())));
    assert_eq!(o.metrics_refresh, Some(Duration::from_secs(10)));

    let env = [
        ("CONSUMER_METRICS_ADDR", "127.0.0.1:9200"),
        ("CONSUMER_METRICS_INTERVAL", "1s"),
        ("CONSUMER_LOG_FORMAT", "text"),
    ];
    let s = resolve_with(&["run"], &env, Some(&file)).unwrap();
    assert_eq!(s.log_format, LogFormat::Text);
    let (o, r) = run_settings(s);
    assert_eq!(r.metrics_addr, Some(MetricsAddr("127.0.0.1:9200".into())));
    assert_eq!(o.metrics_refresh, Some(Duration::from_secs(1)));

    let flags = [
        "run",
        "--metrics-addr",
        "127.0.0.1:0",
        "--metrics-interval",
        "500ms",
        "--log-format",
        "json",
    ];
    let s = resolve_with(&flags, &env, Some(&file)).unwrap();
    assert_eq!(s.log_format, LogFormat::Json);
    let (o, r) = run_settings(s);
    assert_eq!(r.metrics_addr, Some(MetricsAddr("127.0.0.1:0".into())));
    assert_eq!(o.metrics_refresh, Some(Duration::from_millis(500)));

    // Off and text by default; with an address, the gauges are refreshed every 5 s.
    let s = resolve_with(&["run"], &[], Some(FILE)).unwrap();
    assert_eq!(s.log_format, LogFormat::Text);
    let (o, r) = run_settings(s);
    assert_eq!((r.metrics_addr, o.metrics_refresh), (None, None));
    let s = resolve_with(&["run", "--metrics-addr", "127.0.0.1:0"], &[], Some(FILE)).unwrap();
    assert_eq!(
        run_settings(s).0.metrics_refresh,
        Some(Duration::from_secs(5))
    );
    // Bad values name the setting.
    let err = resolve_with(&["run"], &[("CONSUMER_METRICS_ADDR", "9100")], Some(FILE))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("CONSUMER_METRICS_ADDR") && err.contains("HOST:PORT"),
        "{err}"
    );
    let err = resolve_with(&["run"], &[("CONSUMER_LOG_FORMAT", "xml")], Some(FILE))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("CONSUMER_LOG_FORMAT") && err.contains("json"),
        "{err}"
    );
    let zero = FILE.replace("batch_size = 7", "batch_size = 7\nmetrics_refresh = \"0s\"");
    let err = resolve_with(&["run"], &[], Some(&zero))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("`metrics_refresh` must be longer than 0"),
        "{err}"
    );
    let err = resolve_with(&["run", "--metrics-interval", "0s"], &[], Some(FILE))
        .unwrap_err()
        .to_string();
    assert_eq!(err, "--metrics-interval must be longer than 0");
    assert!(
        Cli::try_parse_from(["orders", "run", "--metrics-addr", "localhost"]).is_err(),
        "a port is required"
    );
}

#[test]
fn an_empty_environment_variable_counts_as_unset() {
    let s = resolve_with(&["migrate"], &[("DATABASE_URL", "")], Some(FILE)).unwrap();
    assert_eq!(s.database_url, "postgres://file@db/app");
}

#[test]
fn x_properties_override_the_files_kafka_table() {
    let s = resolve_with(
        &[
            "run",
            "-X",
            "client.id=from-flag",
            "-X",
            "fetch.min.bytes=1",
        ],
        &[],
        Some(FILE),
    )
    .unwrap();
    let kafka: Vec<(String, String)> = s.options.kafka.clone().into_iter().collect();
    assert_eq!(
        kafka,
        [
            ("client.id".to_owned(), "from-flag".to_owned()),
            ("fetch.min.bytes".to_owned(), "1".to_owned()),
            ("session.timeout.ms".to_owned(), "6000".to_owned()),
        ]
    );
}

#[test]
fn a_malformed_x_property_is_a_usage_error_that_hides_secrets() {
    let err = resolve_with(&["run", "-X", "session.timeout.ms"], &[], Some(FILE)).unwrap_err();
    assert!(matches!(err, CliError::Usage(_)), "{err:?}");
    assert_eq!(err.exit_code(), 2);
    assert!(err.to_string().contains("KEY=VALUE"), "{err}");
    let err = resolve_with(&["run", "-X", "sasl.password:hunter2"], &[], Some(FILE)).unwrap_err();
    assert!(!err.to_string().contains("hunter2"), "{err}");
}

#[test]
fn an_unknown_config_key_is_named_with_its_line() {
    let err = resolve_with(
        &["migrate"],
        &[],
        Some("database_url = \"sqlite://a.db\"\nbatchsize = 5\n"),
    )
    .unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, CliError::Usage(_)), "{err:?}");
    assert!(
        text.contains("orders.toml") && text.contains("line 2") && text.contains("batchsize"),
        "{text}"
    );
    assert!(!text.contains('\n'), "{text}");
    // The known keys listed are the runtime's options and the program's own.
    assert!(
        text.contains("`batch_size`") && text.contains("`metrics_refresh`"),
        "{text}"
    );
    assert!(
        text.contains("or one of the program's `database_url`, `log_level`"),
        "{text}"
    );
}

#[test]
fn a_bad_value_in_the_config_file_names_the_key() {
    let err = resolve_with(
        &["run"],
        &[],
        Some(&format!("{FILE}\n"))
            .map(|f| f.replace("\"250ms\"", "\"250\""))
            .as_deref(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("`batch_wait`"), "{err}");
    let err =
        resolve_with(&["run"], &[], Some(&FILE.replace("at-least-once", "twice"))).unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("`guarantee`") && text.contains("effectively-once"),
        "{text}"
    );
}

#[test]
fn a_missing_required_value_names_the_flag_the_variable_and_the_key() {
    let err = resolve_with(&["migrate"], &[], None).unwrap_err();
    assert_eq!(
        err.to_string(),
        "no database URL given; pass --database-url, set DATABASE_URL, or set `database_url` in the config file (--config)"
    );
    assert_eq!(err.exit_code(), 2);
    let url = ["--database-url", "sqlite://a.db"];
    for (args, flag, variable, key) in [
        (
            ["run", "-g", "g", "-t", "t"],
            "--brokers",
            "KAFKA_BROKERS",
            "`brokers`",
        ),
        (
            ["run", "-b", "k:1", "-t", "t"],
            "--group",
            "CONSUMER_GROUP",
            "`group`",
        ),
        (
            ["run", "-b", "k:1", "-g", "g"],
            "--topic",
            "KAFKA_TOPICS",
            "`topics`",
        ),
    ] {
        let err = resolve_with(&[&args[..], &url].concat(), &[], None).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains(flag) && text.contains(variable) && text.contains(key),
            "{text}"
        );
    }
    let err = resolve_with(&[&["status", "-g", "g"][..], &url].concat(), &[], None).unwrap_err();
    assert!(err.to_string().contains("--brokers"), "{err}");
}

#[test]
fn global_options_go_before_or_after_the_subcommand() {
    let s = resolve_with(
        &[
            "--database-url",
            "sqlite://a.db",
            "offsets",
            "set",
            "-g",
            "g",
            "-t",
            "t",
            "-p",
            "2",
            "--offset",
            "40",
        ],
        &[],
        None,
    )
    .unwrap();
    match s.action {
        Action::SetOffset {
            group,
            topic,
            partition,
            offset,
            ..
        } => {
            assert_eq!(
                (group.as_str(), topic.as_str(), partition, offset),
                ("g", "t", 2, 40)
            );
        }
        other => panic!("{other:?}"),
    }
    let s = resolve_with(
        &["offsets", "-g", "g", "--database-url", "sqlite://a.db"],
        &[],
        None,
    )
    .unwrap();
    assert!(
        matches!(s.action, Action::Offsets { topic: None, .. }),
        "{:?}",
        s.action
    );
}

#[test]
fn dry_run_and_rebuild_are_mutually_exclusive() {
    let err = parse_err([
        "orders",
        "replay",
        "-g",
        "g",
        "-t",
        "t",
        "--from",
        "earliest",
        "--dry-run",
        "--rebuild",
    ]);
    assert_eq!(err.exit_code(), 2);
    let text = err.to_string();
    assert!(text.contains("--rebuild") && !text.contains('\n'), "{text}");
}

#[test]
fn usage_errors_are_one_line_with_the_tip() {
    let err = parse_err(["orders", "run", "--grop", "g"]);
    let text = err.to_string();
    assert!(
        text.contains("--grop") && text.contains("--group") && !text.contains('\n'),
        "{text}"
    );
    let err = parse_err(["orders", "run", "--batch-wait", "20"]);
    assert!(err.to_string().contains("20ms"), "{err}");
    let err = parse_err(["orders", "run", "--guarantee", "twice"]);
    assert!(err.to_string().contains("effectively-once"), "{err}");
}

#[test]
fn help_lists_every_flag_with_examples() {
    let mut cmd = super::command("orders", Some("Keeps orders"), DatabaseKind::Postgres);
    cmd.build();
    let help = cmd
        .find_subcommand_mut("run")
        .unwrap()
        .render_long_help()
        .to_string();
    for needle in [
        "--database-url",
        "--brokers",
        "--schema",
        "--config",
        "-X <KEY=VALUE>",
        "--log-level",
        "--group",
        "--topic",
        "--batch-size",
        "--batch-wait",
        "--concurrency",
        "--guarantee",
        "--event-id",
        "--offset-reset",
        "--assignor",
        "--max-attempts",
        "orders run --database-url",
        "DATABASE_URL",
    ] {
        assert!(help.contains(needle), "{needle} missing from:\n{help}");
    }
    let help = cmd
        .find_subcommand_mut("replay")
        .unwrap()
        .render_long_help()
        .to_string();
    assert!(help.contains("RE-RUNS THE HANDLER"), "{help}");
    cmd.debug_assert();
}

struct Nothing;

impl Handler<sqlx::Sqlite> for Nothing {
    type Event = Raw;
    async fn handle(&self, _: &mut Context<'_, sqlx::Sqlite>, _: Raw) -> Result<(), HandlerError> {
        Ok(())
    }
}

async fn run(args: &[&str], env: &[(&str, &str)]) -> Result<(), CliError> {
    let env: HashMap<String, String> = env
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    let lookup = move |name: &str| env.get(name).cloned();
    App::sqlite("orders", Nothing)
        .run_with_env(
            ["orders", "--log-level", "error"]
                .into_iter()
                .chain(args.iter().copied()),
            &lookup,
        )
        .await
}

fn sqlite_url(test: &str) -> String {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/tmp");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("cli-{test}-{}.db", std::process::id()));
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
    format!("sqlite://{}", path.display())
}

#[tokio::test]
async fn passwords_in_database_urls_never_reach_errors() {
    let err = run(
        &["migrate"],
        &[("DATABASE_URL", "mysql://app:hunter2@db/app")],
    )
    .await
    .unwrap_err();
    assert!(!err.to_string().contains("hunter2"), "{err}");
    assert!(err.to_string().contains("app:***@db"), "{err}");
    let err = run(
        &["migrate"],
        &[("DATABASE_URL", "postgres://app:hunter2@db/app")],
    )
    .await
    .unwrap_err();
    let text = err.to_string();
    assert!(
        !text.contains("hunter2") && text.contains("built for SQLite"),
        "{text}"
    );
    assert_eq!(err.exit_code(), 2);
}

#[tokio::test]
async fn a_schema_behind_names_this_programs_migrate_command() {
    let url = sqlite_url("behind");
    let err = run(&["offsets", "-g", "g", "--database-url", &url], &[])
        .await
        .unwrap_err();
    assert!(matches!(err, CliError::SchemaBehind { .. }), "{err:?}");
    assert!(
        err.to_string().contains("run `orders migrate` first"),
        "{err}"
    );
    assert_eq!(err.exit_code(), 1);
}

#[tokio::test]
async fn offsets_of_an_unknown_group_name_the_group_and_set_moves_one() {
    let url = sqlite_url("offsets");
    run(&["migrate", "--database-url", &url], &[])
        .await
        .unwrap();
    let err = run(&["offsets", "-g", "nobody", "--database-url", &url], &[])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("consumer group `nobody`"), "{err}");
    run(
        &[
            "offsets",
            "set",
            "-g",
            "g",
            "-t",
            "t",
            "-p",
            "1",
            "--offset",
            "42",
            "--database-url",
            &url,
        ],
        &[],
    )
    .await
    .unwrap();
    let pool = consumer_runtime::connect::<sqlx::Sqlite>(&url, 1)
        .await
        .unwrap();
    let rows = consumer_runtime::Store::new(pool, "consumer_runtime")
        .unwrap()
        .stored_offsets("g")
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!((rows[0].partition, rows[0].next_offset), (1, Some(42)));
    run(&["offsets", "-g", "g", "--database-url", &url], &[])
        .await
        .unwrap();
}

#[test]
fn replay_takes_a_start_and_one_mode() {
    let s = resolve_with(
        &[
            "replay",
            "-b",
            "k:1",
            "-g",
            "g",
            "-t",
            "t",
            "-p",
            "2",
            "--from",
            "2026-11-20T08:00:00Z",
            "--dry-run",
        ],
        &[("DATABASE_URL", "sqlite://a.db")],
        None,
    )
    .unwrap();
    match s.action {
        Action::Replay(r) => {
            assert_eq!(
                (r.group.as_str(), r.topic.as_str(), r.partition),
                ("g", "t", Some(2))
            );
            assert!(r.dry_run && !r.rebuild);
            assert!(
                matches!(r.from, consumer_runtime::ReplayFrom::Time(_)),
                "{:?}",
                r.from
            );
        }
        other => panic!("{other:?}"),
    }
    let err = parse_err([
        "orders",
        "replay",
        "-g",
        "g",
        "-t",
        "t",
        "--from",
        "yesterday",
    ]);
    assert_eq!(err.exit_code(), 2);
    assert!(err.to_string().contains("RFC 3339"), "{err}");
}

#[tokio::test]
async fn the_config_file_comes_from_consumer_config_or_the_flag() {
    let url = sqlite_url("config");
    let path = std::env::temp_dir().join(format!("cli-config-{}.toml", std::process::id()));
    std::fs::write(
        &path,
        format!("database_url = \"{url}\"\nschema = \"from_file\"\n"),
    )
    .unwrap();
    let path = path.display().to_string();
    run(&["migrate"], &[("CONSUMER_CONFIG", &path)])
        .await
        .unwrap();
    run(&["migrate", "--config", &path], &[]).await.unwrap();
    let pool = consumer_runtime::connect::<sqlx::Sqlite>(&url, 1)
        .await
        .unwrap();
    let store = consumer_runtime::Store::new(pool, "from_file").unwrap();
    store.check_schema().await.unwrap();
    let err = run(&["migrate", "--config", "/nonexistent/orders.toml"], &[])
        .await
        .unwrap_err();
    assert_eq!(err.exit_code(), 2);
    assert!(
        err.to_string().contains("/nonexistent/orders.toml"),
        "{err}"
    );
}

#[test]
fn a_log_level_must_be_a_level_or_a_filter() {
    assert!(super::log_filter("debug", None).is_ok());
    assert!(super::log_filter("info,consumer_runtime=trace", None).is_ok());
    assert!(super::log_filter("loud", Some("warn".into())).is_ok());
    let err = super::log_filter("loud", None).unwrap_err();
    assert_eq!(err.exit_code(), 2);
    assert!(err.to_string().contains("--log-level `loud`"), "{err}");
}

fn dead_letters_action(args: &[&str], env: &[(&str, &str)]) -> super::settings::DeadLetters {
    let url = ("DATABASE_URL", "sqlite://a.db");
    let env: Vec<(&str, &str)> = env.iter().copied().chain([url]).collect();
    match resolve_with(args, &env, None).unwrap().action {
        Action::DeadLetters(d) => d,
        other => panic!("not dead-letters: {other:?}"),
    }
}

#[test]
fn dead_letters_subcommands_resolve_their_group_ids_and_targets() {
    use super::settings::{DeadLetters, PurgeTarget, RedriveTarget};
    assert_eq!(
        dead_letters_action(&["dead-letters", "list", "-g", "g", "-t", "t"], &[]),
        DeadLetters::List {
            group: "g".into(),
            topic: Some("t".into())
        }
    );
    // The group comes from the environment (or the file) like everywhere else.
    assert_eq!(
        dead_letters_action(&["dead-letters", "list"], &[("CONSUMER_GROUP", "env-g")]),
        DeadLetters::List {
            group: "env-g".into(),
            topic: None
        }
    );
    let err = resolve_with(
        &["dead-letters", "list"],
        &[("DATABASE_URL", "sqlite://a.db")],
        None,
    )
    .unwrap_err();
    assert!(err.to_string().contains("--group"), "{err}");
    assert_eq!(
        dead_letters_action(&["dead-letters", "show", "42"], &[]),
        DeadLetters::Show { id: 42 }
    );
    assert_eq!(
        dead_letters_action(&["dead-letters", "redrive", "3", "1", "2"], &[]),
        DeadLetters::Redrive {
            target: RedriveTarget::Ids(vec![3, 1, 2]),
            event_id: None
        }
    );
    assert_eq!(
        dead_letters_action(
            &[
                "dead-letters",
                "redrive",
                "--all",
                "-g",
                "g",
                "-t",
                "t",
                "--event-id",
                "header:trace"
            ],
            &[]
        ),
        DeadLetters::Redrive {
            target: RedriveTarget::All {
                group: "g".into(),
                topic: Some("t".into())
            },
            event_id: Some(EventIdArg::Header("trace".into()))
        }
    );
    // The event-id strategy falls back to the config file, as for `run` and `replay`.
    let s = resolve_with(
        &["dead-letters", "redrive", "7"],
        &[("DATABASE_URL", "sqlite://a.db")],
        Some(FILE),
    )
    .unwrap();
    assert!(
        matches!(
            &s.action,
            Action::DeadLetters(DeadLetters::Redrive { event_id: Some(EventIdArg::Header(h)), .. })
                if h == "file-id"
        ),
        "{:?}",
        s.action
    );
    assert_eq!(
        dead_letters_action(&["dead-letters", "purge", "-g", "g", "--yes"], &[]),
        DeadLetters::Purge(PurgeTarget::Group {
            group: "g".into(),
            topic: None
        })
    );
    assert_eq!(
        dead_letters_action(&["dead-letters", "purge", "--id", "9", "--yes"], &[]),
        DeadLetters::Purge(PurgeTarget::Id(9))
    );
}

#[test]
fn purge_without_yes_is_refused_and_deletes_nothing() {
    for args in [
        &["dead-letters", "purge", "-g", "g"][..],
        &["dead-letters", "purge", "-g", "g", "-t", "t"],
        &["dead-letters", "purge", "--id", "9"],
    ] {
        let err = resolve_with(args, &[("DATABASE_URL", "sqlite://a.db")], None).unwrap_err();
        assert!(matches!(err, CliError::Usage(_)), "{err:?}");
        assert_eq!(err.exit_code(), 2);
        let text = err.to_string();
        assert!(
            text.contains("--yes") && text.contains("Nothing was deleted") && !text.contains('\n'),
            "{text}"
        );
    }
    // --id is one row: no group or topic with it.
    let err = parse_err([
        "orders",
        "dead-letters",
        "purge",
        "--id",
        "9",
        "-g",
        "g",
        "--yes",
    ]);
    assert!(err.to_string().contains("--id"), "{err}");
}

#[test]
fn redrive_needs_ids_or_all_but_not_both() {
    let env = [("DATABASE_URL", "sqlite://a.db")];
    let err = resolve_with(&["dead-letters", "redrive"], &env, None).unwrap_err();
    assert_eq!(err.exit_code(), 2);
    assert!(
        err.to_string().contains("ids") && err.to_string().contains("--all"),
        "{err}"
    );
    let err = resolve_with(&["dead-letters", "redrive", "3", "-g", "g"], &env, None).unwrap_err();
    assert!(err.to_string().contains("only with --all"), "{err}");
    let err = parse_err(["orders", "dead-letters", "redrive", "3", "--all", "-g", "g"]);
    assert_eq!(err.exit_code(), 2);
    let text = err.to_string();
    assert!(
        text.contains("--all") && !text.contains('\n') && !text.contains("Usage"),
        "{text}"
    );
    let err = parse_err(["orders", "dead-letters", "redrive", "seven"]);
    assert!(err.to_string().contains("seven"), "{err}");
}

#[test]
fn dead_letters_help_has_every_subcommand_flag_and_examples() {
    let mut cmd = super::command("orders", None, DatabaseKind::Postgres);
    cmd.build();
    let dl = cmd.find_subcommand_mut("dead-letters").unwrap();
    let help = dl.render_long_help().to_string();
    for needle in [
        "list",
        "show",
        "redrive",
        "purge",
        "orders dead-letters list -g orders",
    ] {
        assert!(help.contains(needle), "{needle} missing from:\n{help}");
    }
    for (sub, needles) in [
        (
            "list",
            &["--group", "--topic", "Columns:", "last_failed_at"][..],
        ),
        ("show", &["<ID>", "base64"]),
        (
            "redrive",
            &[
                "--all",
                "--group",
                "--topic",
                "--event-id",
                "already applied (row removed)",
                "failed again",
                "orders dead-letters redrive --all -g orders",
            ],
        ),
        (
            "purge",
            &[
                "--yes",
                "--id",
                "--group",
                "orders dead-letters purge -g orders --yes",
            ],
        ),
    ] {
        let help = dl
            .find_subcommand_mut(sub)
            .unwrap()
            .render_long_help()
            .to_string();
        for needle in needles {
            assert!(
                help.contains(needle),
                "{sub}: {needle} missing from:\n{help}"
            );
        }
    }
}

fn letter() -> consumer_runtime::DeadLetter {
    consumer_runtime::DeadLetter {
        id: 7,
        group: "g".into(),
        topic: "orders".into(),
        partition: 2,
        offset: 41,
        key: Some(vec![0xff, 0x00]),
        headers: vec![
            ("event-id".into(), Some(b"e-7".to_vec())),
            ("trace".into(), Some(vec![0xff, 0xfe, 0x00])),
            ("empty".into(), None),
        ],
        payload: Some(b"{\"version\":0}".to_vec()),
        timestamp_ms: Some(1_763_900_961_123),
        event_id: Some("e-7".into()),
        error: "order o-7 has version 0;\n  versions start at 1".into(),
        kind: consumer_runtime::FailureKind::Rejected,
        attempts: 1,
        first_failed_at: "2026-11-23T14:09:21.123Z".into(),
        last_failed_at: "2026-11-23T14:09:21.123Z".into(),
    }
}

#[test]
fn dead_letters_print_as_a_table_and_in_full() {
    use super::commands::{dead_letters_table, one_line_cut, show_dead_letter};
    assert_eq!(one_line_cut("a\n  b\tc ", 60), "a b c");
    let long = "x ".repeat(50);
    let cut = one_line_cut(&long, 60);
    assert_eq!(cut.chars().count(), 60, "{cut}");
    assert!(cut.ends_with('…'), "{cut}");

    let mut l = letter();
    let table = dead_letters_table(std::slice::from_ref(&l));
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 2, "{table}");
    for needle in [
        "id",
        "topic",
        "partition",
        "offset",
        "event_id",
        "kind",
        "attempts",
        "last_failed_at",
        "error",
    ] {
        assert!(lines[0].contains(needle), "{table}");
    }
    assert!(
        lines[1].contains("rejected")
            && lines[1].ends_with("order o-7 has version 0; versions start at 1"),
        "{table}"
    );

    let text = show_dead_letter(&l);
    for needle in [
        "id:              7",
        "group:           g",
        "offset:          41",
        "timestamp:       1763900961123 (2025-11-23T12:29:21.123Z)",
        "kind:            rejected (rejected by the handler)",
        "key (base64):    /wA=",
        "headers:         3",
        "  event-id (utf-8): e-7",
        "  trace (base64): //4A",
        "  empty: - (no value)",
        "payload (utf-8, 13 bytes):\n{\"version\":0}\n",
        "error:           order o-7 has version 0;\n                   versions start at 1\n",
    ] {
        assert!(text.contains(needle), "{needle:?} missing from:\n{text}");
    }
    l.payload = Some(vec![0x80, b'a']);
    l.key = None;
    l.headers.clear();
    let text = show_dead_letter(&l);
    for needle in [
        "payload (base64, 2 bytes):\ngGE=\n",
        "key:             - (none)",
        "headers:         - (none)",
    ] {
        assert!(text.contains(needle), "{needle:?} missing from:\n{text}");
    }
}

#[test]
fn times_are_rfc3339_utc_to_the_millisecond() {
    use super::commands::rfc3339_from_millis;
    let shown = |ms| rfc3339_from_millis(ms).unwrap();
    assert_eq!(shown(0), "1970-01-01T00:00:00.000Z");
    assert_eq!(shown(1_709_210_096_007), "2024-02-29T12:34:56.007Z");
    assert_eq!(shown(-1), "1969-12-31T23:59:59.999Z");
    assert_eq!(rfc3339_from_millis(i64::MAX), None);
}

#[test]
fn redrive_outcomes_print_one_line_each_and_fail_the_exit_status() {
    use super::commands::{RedriveTally, redrive_line};
    use consumer_runtime::Redriven;
    let outcomes = [
        Redriven::Applied {
            event_id: "e-1".into(),
        },
        Redriven::AlreadyApplied {
            event_id: "e-1".into(),
        },
        Redriven::NotFound,
        Redriven::Failed {
            kind: consumer_runtime::FailureKind::Undecodable,
            error: "expected value\nat line 1".into(),
        },
        Redriven::Retry {
            error: "busy".into(),
        },
    ];
    let lines: Vec<String> = outcomes.iter().map(redrive_line).collect();
    assert_eq!(
        lines,
        [
            "applied, event id e-1",
            "already applied (row removed), event id e-1",
            "not found",
            "failed again: undecodable payload: expected value at line 1",
            "retry later: busy",
        ]
    );
    let mut ok = RedriveTally::default();
    for o in &outcomes[..3] {
        ok.add(o);
    }
    assert!(ok.result("orders").is_ok());
    let mut bad = RedriveTally::default();
    for o in &outcomes {
        bad.add(o);
    }
    assert_eq!(
        bad.summary(),
        "redrove 5 dead letters: 1 applied, 1 already applied, 1 not found, 1 failed again, 1 to retry later"
    );
    let err = bad.result("orders").unwrap_err();
    assert_eq!(err.exit_code(), 1);
    assert!(err.to_string().contains("2 of 5 dead letters"), "{err}");
}

#[tokio::test]
async fn dead_letters_list_show_redrive_and_purge_on_sqlite() {
    let url = sqlite_url("dead-letters");
    let db = ["--database-url", url.as_str()];
    let with_db = |args: &[&'static str]| -> Vec<String> {
        args.iter()
            .copied()
            .chain(db)
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    async fn go(args: Vec<String>) -> Result<(), CliError> {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run(&args, &[]).await
    }
    go(with_db(&["migrate"])).await.unwrap();
    let pool = consumer_runtime::connect::<sqlx::Sqlite>(&url, 1)
        .await
        .unwrap();
    // Three parked records of group g: two with an event id (redrivable by the `Nothing`
    // handler), one without (fails again: no event id).
    for (offset, topic, headers) in [
        (5, "t", r#"[["event-id","e-5"]]"#),
        (6, "u", r#"[["event-id","e-6"]]"#),
        (7, "t", "[]"),
    ] {
        sqlx::query(
            "INSERT INTO consumer_runtime_dead_letters
                 (consumer_group, topic, partition, \"offset\", headers, payload, error, error_kind)
             VALUES ('g', $1, 0, $2, $3, x'7b7d', 'boom', 'rejected')",
        )
        .bind(topic)
        .bind(offset)
        .bind(headers)
        .execute(&pool)
        .await
        .unwrap();
    }
    let remaining = |group: &'static str| {
        let pool = pool.clone();
        async move {
            consumer_runtime::Store::new(pool.clone(), "consumer_runtime")
                .unwrap()
                .dead_letters()
                .list(group, None)
                .await
                .unwrap()
        }
    };
    assert_eq!(remaining("g").await.len(), 3);
    go(with_db(&["dead-letters", "list", "-g", "g"]))
        .await
        .unwrap();
    go(with_db(&["dead-letters", "list", "-g", "nobody"]))
        .await
        .unwrap();
    let ids: Vec<i64> = remaining("g").await.iter().map(|l| l.id).collect();
    let shown = ids[0].to_string();
    let args: Vec<String> = ["dead-letters", "show", shown.as_str()]
        .into_iter()
        .chain(db)
        .map(str::to_owned)
        .collect();
    go(args).await.unwrap();
    let err = go(with_db(&["dead-letters", "show", "999"]))
        .await
        .unwrap_err();
    assert_eq!(err.exit_code(), 1);
    assert!(err.to_string().contains("999"), "{err}");

    // --all -t t: offsets 5 (applied) and 7 (no event id: failed again, exit status 1).
    let err = go(with_db(&[
        "dead-letters",
        "redrive",
        "--all",
        "-g",
        "g",
        "-t",
        "t",
    ]))
    .await
    .unwrap_err();
    assert_eq!(err.exit_code(), 1);
    assert!(err.to_string().contains("1 of 2 dead letters"), "{err}");
    let left = remaining("g").await;
    assert_eq!(
        left.iter().map(|l| l.offset).collect::<Vec<_>>(),
        [7, 6],
        "{left:?}"
    );
    let failed = left.iter().find(|l| l.offset == 7).unwrap();
    assert_eq!(
        (failed.kind, failed.attempts),
        (consumer_runtime::FailureKind::MissingEventId, 2)
    );
    let ledger: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM consumer_runtime_processed WHERE group_id = (SELECT group_id FROM consumer_runtime_ledger_groups WHERE name = 'g') AND event_id = 'e-5'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(ledger, 1);
    // A redriven id is gone: `not found`, which is not a failure.
    let gone = ids[0].to_string();
    let args: Vec<String> = ["dead-letters", "redrive", gone.as_str()]
        .into_iter()
        .chain(db)
        .map(str::to_owned)
        .collect();
    go(args).await.unwrap();

    // purge: --id one row, then the group's rest.
    let one = failed.id.to_string();
    let args: Vec<String> = ["dead-letters", "purge", "--id", one.as_str(), "--yes"]
        .into_iter()
        .chain(db)
        .map(str::to_owned)
        .collect();
    go(args).await.unwrap();
    assert_eq!(remaining("g").await.len(), 1);
    let err = go(with_db(&["dead-letters", "purge", "-g", "g"]))
        .await
        .unwrap_err();
    assert_eq!(err.exit_code(), 2);
    assert_eq!(remaining("g").await.len(), 1);
    go(with_db(&["dead-letters", "purge", "-g", "g", "--yes"]))
        .await
        .unwrap();
    assert!(remaining("g").await.is_empty());
}

#[test]
fn the_config_file_in_runs_help_is_valid() {
    let (_, help) = super::examples::subcommands("orders", "sqlite://orders.db")
        .into_iter()
        .find(|(name, _)| *name == "run")
        .unwrap();
    let (_, example) = help.split_once("A config file (orders.toml):\n").unwrap();
    let text: String = example
        .lines()
        .map(|line| format!("{}\n", line.trim_start()))
        .collect();
    let s = resolve_with(&["run"], &[], Some(&text)).unwrap();
    assert_eq!(s.database_url, "sqlite://orders.db");
    let (o, _) = run_settings(s);
    assert_eq!(o.retry_policy.max_attempts, Some(5));
    assert_eq!(o.kafka["session.timeout.ms"], "10000");
}
