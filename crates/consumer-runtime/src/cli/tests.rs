//! The program's parsing, layering and error messages. Everything here is in-process and
//! needs neither PostgreSQL nor Kafka (the database tests use a SQLite file).

use std::collections::HashMap;
use std::time::Duration;

use clap::Parser as _;

use super::args::{Cli, EventIdArg};
use super::settings::{Action, ConfigFile, Settings, resolve};
use super::{App, CliError, parse};
use crate::config::Guarantee;
use crate::handler::{Context, Handler, HandlerError, Raw};
use crate::store::DatabaseKind;

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

fn run_settings(s: Settings) -> super::settings::RunSettings {
    match s.action {
        Action::Run(r) => r,
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
max_attempts = "unlimited"

[kafka]
"session.timeout.ms" = 6000
client.id = "from-file"
"#;

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
    assert_eq!(s.schema, "flag_schema");
    let r = run_settings(s);
    assert_eq!(r.brokers, "flag:9092");
    assert_eq!(r.group, "flag-group");
    assert_eq!(r.topics, ["flag-a", "flag-b", "flag-c"]);
    assert_eq!(r.batch_size, Some(3));
    assert_eq!(r.guarantee, Some(Guarantee::AtMostOnce));
    // Settings without a flag still come from the file.
    assert_eq!(r.batch_wait, Some(Duration::from_millis(250)));

    // The environment over the file.
    let s = resolve_with(&["run"], &env, Some(FILE)).unwrap();
    assert_eq!(s.database_url, "postgres://env@db/app");
    assert_eq!(s.schema, "env_schema");
    let r = run_settings(s);
    assert_eq!(r.brokers, "env:9092");
    assert_eq!(r.group, "env-group");
    assert_eq!(r.topics, ["env-a", "env-b"]);

    // The file over the defaults.
    let s = resolve_with(&["run"], &[], Some(FILE)).unwrap();
    assert_eq!(s.database_url, "postgres://file@db/app");
    assert_eq!(s.schema, "file_schema");
    assert_eq!(s.log_level, "info");
    let r = run_settings(s);
    assert_eq!(r.brokers, "file:9092");
    assert_eq!(r.group, "file-group");
    assert_eq!(r.topics, ["file-a", "file-b"]);
    assert_eq!(r.batch_size, Some(7));
    assert_eq!(r.guarantee, Some(Guarantee::AtLeastOnce));
    assert_eq!(r.event_id, Some(EventIdArg::Header("file-id".into())));
    assert_eq!(r.max_attempts, Some(None));

    // The defaults: nothing set leaves the runtime's own defaults.
    let s = resolve_with(
        &[
            "run",
            "--database-url",
            "sqlite://x.db",
            "-b",
            "k:9092",
            "-g",
            "g",
            "-t",
            "t",
        ],
        &[],
        None,
    )
    .unwrap();
    assert_eq!(s.schema, "consumer_runtime");
    assert!(s.kafka.is_empty());
    let r = run_settings(s);
    assert_eq!(
        (
            r.batch_size,
            r.batch_wait,
            r.guarantee,
            r.event_id,
            r.max_attempts
        ),
        (None, None, None, None, None)
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
    let mut kafka = s.kafka.clone();
    kafka.sort();
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
    let err = resolve_with(
        &[&["run", "-g", "g", "-t", "t"][..], &url].concat(),
        &[],
        None,
    )
    .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("--brokers") && text.contains("KAFKA_BROKERS") && text.contains("`brokers`"),
        "{text}"
    );
    let err = resolve_with(
        &[&["run", "-b", "k:1", "-t", "t"][..], &url].concat(),
        &[],
        None,
    )
    .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("--group") && text.contains("CONSUMER_GROUP") && text.contains("`group`"),
        "{text}"
    );
    let err = resolve_with(
        &[&["run", "-b", "k:1", "-g", "g"][..], &url].concat(),
        &[],
        None,
    )
    .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("--topic") && text.contains("KAFKA_TOPICS") && text.contains("`topics`"),
        "{text}"
    );
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
    let err = parse(
        "orders",
        None,
        DatabaseKind::Postgres,
        [
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
        ],
    )
    .unwrap_err();
    assert_eq!(err.exit_code(), 2);
    let text = err.to_string();
    assert!(text.contains("--rebuild") && !text.contains('\n'), "{text}");
}

#[test]
fn usage_errors_are_one_line_with_the_tip() {
    let err = parse(
        "orders",
        None,
        DatabaseKind::Postgres,
        ["orders", "run", "--grop", "g"],
    )
    .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("--grop") && text.contains("--group") && !text.contains('\n'),
        "{text}"
    );
    let err = parse(
        "orders",
        None,
        DatabaseKind::Postgres,
        ["orders", "run", "--batch-wait", "20"],
    )
    .unwrap_err();
    assert!(err.to_string().contains("20ms"), "{err}");
    let err = parse(
        "orders",
        None,
        DatabaseKind::Postgres,
        ["orders", "run", "--guarantee", "twice"],
    )
    .unwrap_err();
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

#[async_trait::async_trait]
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
    let pool = crate::connect::<sqlx::Sqlite>(&url, 1).await.unwrap();
    let q = <sqlx::Sqlite as crate::Backend>::queries("consumer_runtime").unwrap();
    let rows = <sqlx::Sqlite as crate::Backend>::offsets(&pool, &q, "g")
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
                matches!(r.from, crate::replay::ReplayFrom::Time(_)),
                "{:?}",
                r.from
            );
        }
        other => panic!("{other:?}"),
    }
    let err = parse(
        "orders",
        None,
        DatabaseKind::Postgres,
        [
            "orders",
            "replay",
            "-g",
            "g",
            "-t",
            "t",
            "--from",
            "yesterday",
        ],
    )
    .unwrap_err();
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
    let pool = crate::connect::<sqlx::Sqlite>(&url, 1).await.unwrap();
    let q = <sqlx::Sqlite as crate::Backend>::queries("from_file").unwrap();
    crate::check_schema(&pool, &q).await.unwrap();
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
