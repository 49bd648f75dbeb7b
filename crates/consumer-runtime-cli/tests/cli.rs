//! The generated consumer program, run as real processes: the `orders` example program
//! (`examples/orders/main.rs`, this crate's `orders` binary) against real PostgreSQL and a
//! librdkafka mock cluster hosted by this test process (its bootstrap address is passed with
//! `--brokers`).
//!
//! The example's handler keeps `order_events_applied.applied = applied + 1` per event id, a
//! deliberately non-idempotent counter: every check below that says "exactly once" reads it.
//! Each test uses its own topic, consumer group and runtime schema (`--schema`), created by
//! the program's own `migrate` and dropped at the end.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use consumer_runtime::StoredOffset;
use consumer_runtime::sqlx::{self, Pool, Postgres, Row};
use testkit::{Kafka, assert_exactly_once, database_url, rand_name, wait_until};

testkit::mock_broker_entry!();

/// How long any one step may take before the test fails.
const WAIT: Duration = Duration::from_secs(60);

/// A short session, so that the group forgets a departed member quickly: on the mock cluster a
/// consumer that joins right after another one of its group closed, even cleanly, waits for the
/// old member's session to expire (44 s at the default 45 s, plain rdkafka consumers alike).
const QUICK_SESSION: [&str; 4] = [
    "-X",
    "session.timeout.ms=6000",
    "-X",
    "heartbeat.interval.ms=500",
];

/// The `orders` example program, which cargo builds for this test.
fn orders_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_orders"))
}

/// A finished command: its exit status and what it printed.
#[derive(Debug)]
struct Out {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Out {
    fn assert_success(&self, what: &str) -> &Self {
        assert!(
            self.status.success(),
            "{what} failed ({}):\nstdout:\n{}\nstderr:\n{}",
            self.status,
            self.stdout,
            self.stderr
        );
        self
    }
}

/// A running `orders` process whose stdout and stderr go to files (a pipe nobody reads could
/// fill up and stall it). Dropping it kills the process if it still runs.
struct Proc {
    name: String,
    child: Child,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Proc {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM (a graceful stop).
    fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM {} failed", self.pid());
    }

    /// Sends SIGKILL (a crash) and reaps the process.
    fn kill(&mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reap the killed process");
    }

    fn is_running(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }

    /// Waits for the process to exit and returns what it printed.
    fn wait(&mut self, timeout: Duration) -> Out {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "`{}` did not exit within {timeout:?}; stderr:\n{}",
                    self.name,
                    read(&self.stderr)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        Out {
            status,
            stdout: read(&self.stdout),
            stderr: read(&self.stderr),
        }
    }

    fn stderr(&self) -> String {
        read(&self.stderr)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// An `orders` command with none of the program's environment variables inherited.
fn orders<S: AsRef<str>>(args: &[S]) -> Command {
    program(orders_bin(), args)
}

/// The same for the `orders-batch` example (`examples/orders_batch/main.rs`): the `orders`
/// program with a batch handler.
fn orders_batch<S: AsRef<str>>(args: &[S]) -> Command {
    program(Path::new(env!("CARGO_BIN_EXE_orders-batch")), args)
}

/// A command of one of the example programs with none of their environment variables
/// inherited.
fn program<S: AsRef<str>>(bin: &Path, args: &[S]) -> Command {
    let mut cmd = Command::new(bin);
    cmd.args(args.iter().map(AsRef::as_ref))
        .env_remove("DATABASE_URL")
        .env_remove("KAFKA_BROKERS")
        .env_remove("CONSUMER_GROUP")
        .env_remove("KAFKA_TOPICS")
        .env_remove("CONSUMER_RUNTIME_SCHEMA")
        .env_remove("CONSUMER_CONFIG")
        .env_remove("CONSUMER_LOG_FORMAT")
        .env_remove("CONSUMER_METRICS_ADDR")
        .env_remove("CONSUMER_METRICS_INTERVAL")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null());
    cmd
}

/// Starts `cmd`, its output going to files named after `name` in a fresh directory.
fn spawn(name: &str, mut cmd: Command) -> Proc {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("cli")
        .join(rand_name(name));
    std::fs::create_dir_all(&dir).unwrap();
    let (stdout, stderr) = (dir.join("stdout"), dir.join("stderr"));
    let child = cmd
        .stdout(File::create(&stdout).unwrap())
        .stderr(File::create(&stderr).unwrap())
        .spawn()
        .expect("start the orders example");
    Proc {
        name: name.to_owned(),
        child,
        stdout,
        stderr,
    }
}

/// Runs `cmd` to completion.
fn output(name: &str, cmd: Command) -> Out {
    spawn(name, cmd).wait(WAIT)
}

/// One test's world: a mock cluster with a topic, a consumer group, and a runtime schema
/// migrated by `orders migrate`.
struct Setup {
    kafka: Kafka,
    pool: Pool<Postgres>,
    url: String,
    schema: String,
    topic: String,
    group: String,
    /// What `orders migrate` printed.
    migrate: Out,
}

impl Setup {
    async fn new(partitions: i32) -> Setup {
        Setup::at(partitions, database_url()).await
    }

    /// The same on the PostgreSQL server at `url`.
    async fn at(partitions: i32, url: String) -> Setup {
        testkit::init_tracing();
        let kafka = Kafka::new();
        let topic = rand_name("orders");
        kafka.create_topic(&topic, partitions);
        let schema = rand_name("cli");
        let migrate = output(
            "migrate",
            orders(&["migrate", "--database-url", &url, "--schema", &schema]),
        );
        migrate.assert_success("orders migrate");
        let pool = consumer_runtime::connect::<Postgres>(&url, 4)
            .await
            .expect("PostgreSQL must be running (see README: Running the tests)");
        Setup {
            kafka,
            pool,
            url,
            schema,
            group: rand_name("g"),
            topic,
            migrate,
        }
    }

    /// `args` followed by `--database-url` and `--schema`.
    fn db_args(&self, args: &[&str]) -> Vec<String> {
        let mut v: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        v.extend(["--database-url", &self.url, "--schema", &self.schema].map(String::from));
        v
    }

    /// `orders run` for this test's group and topic, with `extra` flags.
    fn run(&self, name: &str, extra: &[&str]) -> Proc {
        let mut args = self.db_args(&["run"]);
        args.extend(
            [
                "--brokers",
                &self.kafka.bootstrap,
                "--group",
                &self.group,
                "--topic",
                &self.topic,
            ]
            .map(String::from),
        );
        args.extend(extra.iter().map(|s| s.to_string()));
        spawn(name, orders(&args))
    }

    /// `orders run` with `extra` flags, serving metrics on a free port (gauges refreshed every
    /// 200 ms) and logging JSON; returns the process and the metrics address it bound.
    async fn run_with_metrics(&self, extra: &[&str]) -> (Proc, String) {
        let mut flags = vec![
            "--metrics-addr",
            "127.0.0.1:0",
            "--metrics-interval",
            "200ms",
            "--log-format",
            "json",
        ];
        flags.extend(extra);
        flags.extend(QUICK_SESSION);
        let run = self.run("run", &flags);
        let addr = metrics_addr(&run).await;
        (run, addr)
    }

    /// The group's rows of `consumer_offsets`, as the library reads them.
    async fn stored(&self) -> Vec<StoredOffset> {
        consumer_runtime::Store::new(self.pool.clone(), &self.schema)
            .unwrap()
            .stored_offsets(&self.group)
            .await
            .unwrap()
    }

    /// `next_offset` per partition of the topic.
    async fn positions(&self) -> BTreeMap<i32, i64> {
        self.stored()
            .await
            .into_iter()
            .filter(|o| o.topic == self.topic)
            .filter_map(|o| Some((o.partition, o.next_offset?)))
            .collect()
    }

    async fn wait_caught_up(&self, ends: &BTreeMap<i32, i64>) {
        wait_until(WAIT, "the stored offsets to reach the end", || async {
            &self.positions().await == ends
        })
        .await;
    }

    /// How often the handler applied each of this test's events (the non-idempotent counter).
    async fn applied(&self) -> HashMap<String, i64> {
        sqlx::query(
            "SELECT event_id, applied FROM order_events_applied WHERE starts_with(event_id, $1)",
        )
        .bind(format!("{}-", self.topic))
        .fetch_all(&self.pool)
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.get::<String, _>(0), i64::from(r.get::<i32, _>(1))))
        .collect()
    }

    /// (status, version) per order of this test.
    async fn orders(&self) -> HashMap<String, (String, i64)> {
        sqlx::query("SELECT order_id, status, version FROM orders WHERE starts_with(order_id, $1)")
            .bind(format!("{}-", self.topic))
            .fetch_all(&self.pool)
            .await
            .unwrap()
            .into_iter()
            .map(|r| (r.get(0), (r.get(1), r.get(2))))
            .collect()
    }

    /// Every order reached its last event: shipped, version 3.
    async fn assert_all_shipped(&self, n: usize) {
        let orders = self.orders().await;
        assert_eq!(orders.len(), n, "orders in the projection");
        for (id, state) in &orders {
            assert_eq!(state, &("shipped".to_owned(), 3), "order {id}");
        }
    }

    async fn drop_schema(self) {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP SCHEMA IF EXISTS {} CASCADE",
            self.schema
        )))
        .execute(&self.pool)
        .await
        .unwrap();
    }
}

/// Order events for `n` orders over `partitions` partitions: each order is placed (v1), paid
/// (v2) and shipped (v3), its events in one partition in version order, with the event id
/// `<topic>-o<i>-v<version>` in the `event-id` header. Then `dups` producer duplicates: events
/// sent again with the same id and payload, at later offsets of the same partition. Returns
/// the records (partition, event id, payload) in production order and the distinct ids.
fn order_events(
    topic: &str,
    n: usize,
    partitions: i32,
    dups: usize,
) -> (Vec<(i32, String, String)>, Vec<String>) {
    let mut records = Vec::new();
    for version in 1..=3 {
        for i in 0..n {
            let order = format!("{topic}-o{i}");
            let payload = match version {
                1 => format!(
                    r#"{{"type":"placed","order_id":"{order}","version":1,"customer":"c-{}","total_cents":{}}}"#,
                    i % 7,
                    1000 + i
                ),
                2 => format!(r#"{{"type":"paid","order_id":"{order}","version":2}}"#),
                _ => format!(r#"{{"type":"shipped","order_id":"{order}","version":3}}"#),
            };
            let partition = (i % partitions as usize) as i32;
            records.push((partition, format!("{order}-v{version}"), payload));
        }
    }
    let ids = records.iter().map(|(_, id, _)| id.clone()).collect();
    let step = (records.len() / dups.max(1)).max(1);
    let again: Vec<_> = records.iter().step_by(step).take(dups).cloned().collect();
    records.extend(again);
    (records, ids)
}

/// Records per partition: the offset after the last one, on a fresh topic.
fn ends_of(records: &[(i32, String, String)]) -> BTreeMap<i32, i64> {
    let mut ends = BTreeMap::new();
    for (p, _, _) in records {
        *ends.entry(*p).or_insert(0) += 1;
    }
    ends
}

/// Parses a table printed as a header line and rows whose cells are separated by two or more
/// spaces; a cell is keyed by its header, lowercased. The header is the first line whose first
/// cell is `first_column`; lines that do not have a cell per column (a summary) are skipped.
fn table(text: &str, first_column: &str) -> Vec<BTreeMap<String, String>> {
    let split = |line: &str| -> Vec<String> {
        line.split("  ")
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .map(String::from)
            .collect()
    };
    let mut lines = text.lines().skip_while(|l| {
        !split(l)
            .first()
            .is_some_and(|c| c.eq_ignore_ascii_case(first_column))
    });
    let header: Vec<String> = match lines.next() {
        Some(h) => split(h).into_iter().map(|c| c.to_lowercase()).collect(),
        None => panic!("no table with a `{first_column}` column in:\n{text}"),
    };
    lines
        .map(split)
        .filter(|cells| cells.len() == header.len())
        .map(|cells| header.iter().cloned().zip(cells).collect())
        .collect()
}

/// Asserts that `out` failed and that its error is one line `error: …` on stderr containing
/// every one of `needles`; the only other lines allowed on stderr are log lines (which start
/// with a timestamp).
fn assert_one_line_error(what: &str, out: &Out, needles: &[&str]) {
    assert!(
        !out.status.success(),
        "{what}: expected a failure, got {}",
        out.status
    );
    let is_log = |l: &str| l.len() > 20 && l.as_bytes()[4] == b'-' && l.as_bytes()[10] == b'T';
    let lines: Vec<&str> = out.stderr.lines().filter(|l| !is_log(l)).collect();
    assert!(
        lines.len() == 1 && lines[0].starts_with("error: "),
        "{what}: expected one line `error: …` on stderr, got:\n{}",
        out.stderr
    );
    for needle in needles {
        assert!(
            lines[0].contains(needle),
            "{what}: the error does not mention `{needle}`: {}",
            lines[0]
        );
    }
}

/// The pid in an `owner` (`host:pid:random`).
fn owner_pid(owner: &str) -> Option<u32> {
    owner.split(':').nth(1)?.parse().ok()
}

#[tokio::test]
async fn migrate_then_run_applies_every_order_event_exactly_once() {
    let s = Setup::new(4).await;
    // `migrate` names the runtime's schema version (its newest migration) and the app's, and
    // can run again.
    let runtime =
        std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../migrations/postgres"))
            .unwrap()
            .filter_map(|e| {
                let name = e.unwrap().file_name().into_string().unwrap();
                Some(name.split_once('_')?.0.to_owned())
            })
            .max()
            .expect("the runtime's migrations");
    for version in [runtime.as_str(), "20261123000002"] {
        assert!(
            s.migrate.stdout.contains(version),
            "`migrate` does not name version {version}:\n{}",
            s.migrate.stdout
        );
    }
    output("migrate-again", orders(&s.db_args(&["migrate"])))
        .assert_success("a second orders migrate");

    let (records, ids) = order_events(&s.topic, 100, 4, 30);
    s.kafka.produce(&s.topic, &records);
    // A metrics interval without an address serves nothing, and the log says so.
    let mut run = s.run("run", &["--metrics-interval", "2s"]);
    s.wait_caught_up(&ends_of(&records)).await;
    run.terminate();
    let out = run.wait(WAIT);
    out.assert_success("orders run stopped by SIGTERM");
    assert!(
        out.stderr
            .contains("a metrics interval is set but no metrics address"),
        "no warning about the metrics interval:\n{}",
        out.stderr
    );

    assert_exactly_once(&s.applied().await, &ids);
    s.assert_all_shipped(100).await;
    s.drop_schema().await;
}

#[tokio::test]
async fn status_shows_the_exact_lag_and_offsets_show_what_the_database_holds() {
    let s = Setup::new(3).await;
    let (records, ids) = order_events(&s.topic, 30, 3, 0);
    s.kafka.produce(&s.topic, &records);
    let mut run = s.run("run", &[]);
    let ends = ends_of(&records);
    s.wait_caught_up(&ends).await;
    run.terminate();
    run.wait(WAIT)
        .assert_success("orders run stopped by SIGTERM");

    // K_p more records per partition, not consumed: partition p lags by 2 + p.
    let mut more = Vec::new();
    for p in 0..3 {
        for k in 0..(2 + p) {
            let id = format!("{}-late-{p}-{k}", s.topic);
            more.push((
                p,
                id,
                r#"{"type":"paid","order_id":"late","version":1}"#.to_owned(),
            ));
        }
    }
    s.kafka.produce(&s.topic, &more);

    // The database URL and brokers from the environment this time.
    let mut status = orders(&["status", "--group", &s.group, "--schema", &s.schema]);
    status
        .env("DATABASE_URL", &s.url)
        .env("KAFKA_BROKERS", &s.kafka.bootstrap);
    let out = output("status", status);
    out.assert_success("orders status");
    let rows = table(&out.stdout, "topic");
    let stored = s.stored().await;
    assert_eq!(rows.len(), 3, "one row per partition:\n{}", out.stdout);
    for row in &rows {
        assert_eq!(row["topic"], s.topic, "{}", out.stdout);
        let p: i32 = row["partition"].parse().unwrap();
        let end = ends[&p];
        let k = i64::from(2 + p);
        let db = stored.iter().find(|o| o.partition == p).unwrap();
        assert_eq!(row["stored_offset"], end.to_string(), "{}", out.stdout);
        assert_eq!(
            row["high_watermark"],
            (end + k).to_string(),
            "{}",
            out.stdout
        );
        assert_eq!(row["lag"], k.to_string(), "{}", out.stdout);
        assert_eq!(row["epoch"], db.epoch.to_string(), "{}", out.stdout);
    }

    let out = output(
        "offsets",
        orders(&s.db_args(&["offsets", "--group", &s.group])),
    );
    out.assert_success("orders offsets");
    let rows = table(&out.stdout, "topic");
    assert_eq!(rows.len(), stored.len(), "{}", out.stdout);
    for (row, db) in rows.iter().zip(&stored) {
        assert_eq!(row["topic"], db.topic, "{}", out.stdout);
        assert_eq!(row["partition"], db.partition.to_string(), "{}", out.stdout);
        assert_eq!(
            row["next_offset"],
            db.next_offset.map_or("-".to_owned(), |o| o.to_string()),
            "{}",
            out.stdout
        );
        assert_eq!(row["epoch"], db.epoch.to_string(), "{}", out.stdout);
        assert_eq!(
            row["owner"],
            db.owner.clone().unwrap_or_else(|| "-".to_owned()),
            "{}",
            out.stdout
        );
        assert_eq!(row["updated_at"], db.updated_at, "{}", out.stdout);
    }
    assert_exactly_once(&s.applied().await, &ids);
    s.drop_schema().await;
}

#[tokio::test]
async fn a_killed_consumer_s_partitions_are_taken_over_and_every_event_applied_once() {
    let s = Setup::new(4).await;
    let (records, ids) = order_events(&s.topic, 1000, 4, 150);
    s.kafka.produce(&s.topic, &records);
    let ends = ends_of(&records);
    let total: i64 = ends.values().sum();
    let mut flags = vec!["--batch-size", "5", "--concurrency", "1"];
    flags.extend(QUICK_SESSION);
    let mut a = s.run("run-a", &flags);
    let mut b = s.run("run-b", &flags);

    // Both own partitions, and most of the work is still ahead.
    let pids: HashSet<u32> = [a.pid(), b.pid()].into();
    wait_until(WAIT, "both consumers to own partitions", || async {
        let owners: HashSet<u32> = s
            .stored()
            .await
            .iter()
            .filter_map(|o| owner_pid(o.owner.as_deref()?))
            .collect();
        owners == pids
    })
    .await;
    // Kill one while its partitions still hold plenty of work (one transaction per 5 records,
    // one at a time, keeps the stream slow enough).
    let left: i64 = s
        .stored()
        .await
        .iter()
        .filter(|o| o.owner.as_deref().and_then(owner_pid) == Some(b.pid()))
        .map(|o| ends[&o.partition] - o.next_offset.unwrap_or(0))
        .sum();
    assert!(
        left >= 100,
        "the stream is too fast to interrupt: {left} records left in the partitions of the consumer to kill"
    );
    b.kill();
    eprintln!(
        "killed {} with {left} records left in its partitions, {total} in all",
        b.pid()
    );

    s.wait_caught_up(&ends).await;
    assert!(a.is_running(), "the survivor stopped:\n{}", a.stderr());
    wait_until(WAIT, "the survivor to own every partition", || async {
        s.stored()
            .await
            .iter()
            .all(|o| o.owner.as_deref().and_then(owner_pid) == Some(a.pid()))
    })
    .await;
    a.terminate();
    a.wait(WAIT)
        .assert_success("the survivor stopped by SIGTERM");

    assert_exactly_once(&s.applied().await, &ids);
    s.assert_all_shipped(1000).await;
    s.drop_schema().await;
}

/// The broker goes away, then PostgreSQL: each time the program says in its log what it is
/// waiting for, keeps running, and goes on when it is back, with every event applied once.
/// PostgreSQL is a private server (own data directory and port), so stopping it disturbs no
/// other test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_program_says_what_it_waits_for_and_goes_on_when_it_is_back() {
    use testkit::private_pg::{PrivatePostgres, Stop};
    let dir = std::env::temp_dir().join(rand_name("consumer-runtime-cli-pg"));
    let server =
        std::sync::Arc::new(PrivatePostgres::start(&dir).expect("start a private PostgreSQL"));
    let s = Setup::at(2, server.url("postgres")).await;
    let (records, ids) = order_events(&s.topic, 600, 2, 60);
    s.kafka.produce(&s.topic, &records);
    let ends = ends_of(&records);
    let total: i64 = ends.values().sum();
    let mut flags = vec!["--batch-size", "5", "--concurrency", "1"];
    flags.extend(QUICK_SESSION);
    let mut run = s.run("run", &flags);
    let done = || async { s.positions().await.values().sum::<i64>() };
    wait_until(WAIT, "some progress", || async { done().await >= 100 }).await;

    // The only broker goes down for a while.
    s.kafka.broker_down();
    wait_until(WAIT, "the log to say it waits for the broker", || async {
        run.stderr()
            .contains("no Kafka broker is reachable; waiting for the brokers")
    })
    .await;
    assert!(
        run.is_running(),
        "the program gave up on the broker:\n{}",
        run.stderr()
    );
    s.kafka.broker_up();
    let before = done().await;
    wait_until(WAIT, "progress after the broker came back", || async {
        done().await > before
    })
    .await;

    // Then PostgreSQL stops, mid-stream, and comes back only once the program has said so.
    assert!(done().await < total, "the outage must come mid-stream");
    let srv = server.clone();
    tokio::task::spawn_blocking(move || srv.stop(Stop::Fast))
        .await
        .unwrap()
        .expect("stop PostgreSQL");
    // The log says it waits for the database, and why: the pool only says "timed out", so
    // the runtime asks the server directly.
    wait_until(WAIT, "the log to say it waits for the database, and why", || async {
        run.stderr().lines().any(|line| {
            line.contains(
                "the database is unreachable or failing; batch rolled back, waiting for the database",
            ) && line.contains("Connection refused")
        })
    })
    .await;
    assert!(
        run.is_running(),
        "the program gave up on the database:\n{}",
        run.stderr()
    );
    let srv = server.clone();
    tokio::task::spawn_blocking(move || srv.start_again())
        .await
        .unwrap()
        .expect("start PostgreSQL again");

    s.wait_caught_up(&ends).await;
    assert!(run.is_running(), "the program stopped:\n{}", run.stderr());
    run.terminate();
    run.wait(WAIT)
        .assert_success("the consumer stopped by SIGTERM");
    assert_exactly_once(&s.applied().await, &ids);
    s.assert_all_shipped(600).await;
    s.pool.close().await;
}

#[tokio::test]
async fn replay_while_running_is_exact_fences_the_consumer_and_applies_nothing_twice() {
    let s = Setup::new(2).await;
    let (records, ids) = order_events(&s.topic, 40, 2, 0);
    s.kafka.produce(&s.topic, &records);
    let first = ends_of(&records);
    let mut run = s.run("run-1", &QUICK_SESSION);
    s.wait_caught_up(&first).await;
    run.terminate();
    run.wait(WAIT)
        .assert_success("orders run stopped by SIGTERM");

    // 5 more orders (15 events) while nothing runs; an operator then skips partition 0's share
    // with `offsets set`, so the ledger knows none of them.
    let late_topic = format!("{}-late", s.topic);
    let (late, late_ids) = order_events(&late_topic, 5, 2, 0);
    s.kafka.produce(&s.topic, &late);
    let mut ends = first.clone();
    for (p, n) in ends_of(&late) {
        *ends.get_mut(&p).unwrap() += n;
    }
    let out = output(
        "offsets-set",
        orders(&s.db_args(&[
            "offsets",
            "set",
            "--group",
            &s.group,
            "--topic",
            &s.topic,
            "--partition",
            "0",
            "--offset",
            &ends[&0].to_string(),
        ])),
    );
    out.assert_success("offsets set");
    assert!(
        out.stdout
            .contains(&format!("next_offset {} → {}", first[&0], ends[&0])),
        "{}",
        out.stdout
    );

    // --dry-run from earliest: the range is everything before the stored offsets; the ledger
    // knows all of it but partition 0's skipped records. Nothing changes.
    let before = s.stored().await;
    let out = output(
        "dry-run",
        orders(&s.db_args(&[
            "replay",
            "--group",
            &s.group,
            "--topic",
            &s.topic,
            "--from",
            "earliest",
            "--dry-run",
            "--brokers",
            &s.kafka.bootstrap,
        ])),
    );
    out.assert_success("replay --dry-run");
    let rows = table(&out.stdout, "partition");
    assert_eq!(rows.len(), 2, "one row per partition:\n{}", out.stdout);
    let stored_before = [(0, ends[&0]), (1, first[&1])];
    for (p, to) in stored_before {
        let row = rows
            .iter()
            .find(|r| r["partition"] == p.to_string())
            .unwrap();
        assert_eq!(row["from"], "0", "{}", out.stdout);
        assert_eq!(row["to"], to.to_string(), "{}", out.stdout);
        assert_eq!(
            row["high_watermark"],
            ends[&p].to_string(),
            "{}",
            out.stdout
        );
        assert_eq!(row["records"], to.to_string(), "{}", out.stdout);
        assert_eq!(
            row["already_processed"],
            first[&p].to_string(),
            "{}",
            out.stdout
        );
    }
    assert_eq!(s.stored().await, before, "a dry run changes nothing");

    // A consumer runs and catches up (partition 0's skipped records stay skipped); then
    // `replay --from earliest` fences it: it reloads, re-reads both partitions from 0, applies
    // exactly the skipped records and skips everything else, without a restart.
    let mut run = s.run("run-2", &QUICK_SESSION);
    s.wait_caught_up(&ends).await;
    let skipped: Vec<String> = late
        .iter()
        .filter(|(p, _, _)| *p == 0)
        .map(|(_, id, _)| id.clone())
        .collect();
    let applied = s.applied().await;
    assert!(skipped.iter().all(|id| !applied.contains_key(id)));
    let epochs: BTreeMap<i32, i64> = s
        .stored()
        .await
        .iter()
        .map(|o| (o.partition, o.epoch))
        .collect();
    let out = output(
        "replay",
        orders(&s.db_args(&[
            "replay",
            "--group",
            &s.group,
            "--topic",
            &s.topic,
            "--from",
            "earliest",
            "--brokers",
            &s.kafka.bootstrap,
        ])),
    );
    out.assert_success("replay --from earliest");
    wait_until(
        WAIT,
        "the running consumer to reclaim the partitions and reach the end",
        || async {
            s.stored().await.iter().all(|o| {
                o.epoch >= epochs[&o.partition] + 2
                    && o.next_offset == Some(ends[&o.partition])
                    && o.owner.as_deref().and_then(owner_pid) == Some(run.pid())
            })
        },
    )
    .await;
    assert!(run.is_running(), "the consumer stopped:\n{}", run.stderr());
    let all: Vec<String> = ids.iter().chain(&late_ids).cloned().collect();
    assert_exactly_once(&s.applied().await, &all);

    // `--rebuild --from K --partition 0` re-runs the handler once per record from K on.
    let k = 30;
    let out = output(
        "rebuild",
        orders(&s.db_args(&[
            "replay",
            "--group",
            &s.group,
            "--topic",
            &s.topic,
            "--partition",
            "0",
            "--from",
            &k.to_string(),
            "--rebuild",
            "--brokers",
            &s.kafka.bootstrap,
        ])),
    );
    out.assert_success("replay --rebuild");
    let rebuilt: HashSet<String> = records
        .iter()
        .chain(&late)
        .filter(|(p, _, _)| *p == 0)
        .skip(k)
        .map(|(_, id, _)| id.clone())
        .collect();
    assert_eq!(rebuilt.len() as i64, ends[&0] - k as i64);
    wait_until(WAIT, "the rebuilt range to be applied again", || async {
        s.applied().await.values().filter(|&&n| n == 2).count() == rebuilt.len()
    })
    .await;
    s.wait_caught_up(&ends).await;
    let applied = s.applied().await;
    assert_eq!(applied.len(), all.len());
    for (id, n) in applied {
        let expected = if rebuilt.contains(&id) { 2 } else { 1 };
        assert_eq!(n, expected, "event {id}");
    }
    assert!(run.is_running(), "the consumer stopped:\n{}", run.stderr());
    run.terminate();
    run.wait(WAIT)
        .assert_success("orders run stopped by SIGTERM");
    s.drop_schema().await;
}

#[tokio::test]
async fn bad_input_fails_with_one_line_that_names_the_problem() {
    let s = Setup::new(1).await;
    let (b, g, t) = (
        s.kafka.bootstrap.as_str(),
        s.group.as_str(),
        s.topic.as_str(),
    );
    let url = s.url.as_str();
    let fresh = rand_name("cli_fresh");
    let cases: Vec<(&str, Vec<&str>, Vec<&str>)> = vec![
        (
            "an unknown flag",
            vec![
                "run",
                "--database-url",
                url,
                "--brokers",
                b,
                "--group",
                g,
                "--topic",
                t,
                "--no-such-flag",
            ],
            vec!["--no-such-flag"],
        ),
        (
            "a missing database URL",
            vec!["run", "--brokers", b, "--group", g, "--topic", t],
            vec!["--database-url", "DATABASE_URL"],
        ),
        (
            "an unreachable database",
            vec![
                "run",
                "--database-url",
                "postgres://app:hunter2@127.0.0.1:1/x",
                "--brokers",
                b,
                "--group",
                g,
                "--topic",
                t,
            ],
            vec!["127.0.0.1:1", "database"],
        ),
        (
            "an unreachable broker",
            vec![
                "run",
                "--database-url",
                url,
                "--schema",
                &s.schema,
                "--brokers",
                "127.0.0.1:1",
                "--group",
                g,
                "--topic",
                t,
            ],
            vec!["127.0.0.1:1", "broker"],
        ),
        (
            "a schema behind the migrations",
            vec![
                "run",
                "--database-url",
                url,
                "--schema",
                &fresh,
                "--brokers",
                b,
                "--group",
                g,
                "--topic",
                t,
            ],
            vec![&fresh, "migrate"],
        ),
    ];
    // All at once: the unreachable broker takes the startup timeout.
    let procs: Vec<Proc> = cases
        .iter()
        .map(|(what, args, _)| spawn(&what.replace(' ', "-"), orders(args)))
        .collect();
    for ((what, _, needles), mut proc) in cases.iter().zip(procs) {
        let out = proc.wait(WAIT);
        assert_one_line_error(what, &out, needles);
        assert!(
            !out.stderr.contains("hunter2") && !out.stdout.contains("hunter2"),
            "{what}: the password leaked:\n{}",
            out.stderr
        );
        // Usage errors (flags, settings) exit 2, everything else 1.
        let usage = what.contains("flag") || what.contains("missing");
        assert_eq!(out.status.code(), Some(if usage { 2 } else { 1 }), "{what}");
        if usage {
            assert_eq!(out.stderr.lines().count(), 1, "{what}: {}", out.stderr);
        }
    }
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)")
            .bind(&fresh)
            .fetch_one(&s.pool)
            .await
            .unwrap();
    assert!(!exists, "`run` created the schema it refused");
    s.drop_schema().await;
}

/// One scrape of `http://<addr>/metrics`: the body of a `200 OK`.
fn scrape(addr: &str) -> String {
    use std::io::{Read as _, Write as _};
    let mut conn = std::net::TcpStream::connect(addr).expect("connect to the metrics endpoint");
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(conn, "GET /metrics HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut response = String::new();
    conn.read_to_string(&mut response).unwrap();
    let (head, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP response: {response:?}"));
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    assert!(
        head.contains("Content-Type: text/plain; version=0.0.4"),
        "{head}"
    );
    body.to_owned()
}

/// The sum of the samples of metric `name` whose labels include every one of `labels`
/// (`None`: no such series).
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found = None;
    // Families are separated by blank lines.
    for line in text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let (series, value) = line.rsplit_once(' ').expect("`series value`");
        let (metric, rest) = series.split_once('{').unwrap_or((series, "}"));
        if metric != name {
            continue;
        }
        let have: Vec<(&str, &str)> = rest
            .trim_end_matches('}')
            .split("\",")
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (k, v) = p.split_once("=\"").expect("k=\"v\"");
                (k, v.trim_end_matches('"'))
            })
            .collect();
        if labels.iter().all(|l| have.contains(l)) {
            *found.get_or_insert(0.0) += value.parse::<f64>().expect("a number");
        }
    }
    found
}

/// `run --metrics-addr 127.0.0.1:0 --log-format json` logs (as JSON) where it serves its
/// metrics; once it caught up, a scrape over HTTP says what the database says: records
/// processed = ledger rows, producer duplicates, parked = dead letters, lag 0 = high watermark
/// − stored offset on every partition, the ledger size, and a rebalance.
/// The address the program's metrics server bound, from its JSON log (every line must be a
/// JSON object; one names the address).
async fn metrics_addr(run: &Proc) -> String {
    let mut addr = None;
    wait_until(WAIT, "the metrics address in the log", || {
        let stderr = run.stderr();
        addr = stderr.lines().find_map(|line| {
            let v: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("a log line that is not JSON ({e}): {line}"));
            v["fields"]["addr"].as_str().map(str::to_owned)
        });
        let found = addr.is_some();
        async move { found }
    })
    .await;
    addr.unwrap()
}

/// With `--offset-reset latest` a new group skips what the topic already holds: its lag counts
/// from where it started (0), not from offset 0, until its first commit stores an offset.
#[tokio::test]
async fn lag_without_a_stored_offset_counts_from_where_the_consumer_started() {
    let s = Setup::new(2).await;
    let (old, _) = order_events(&s.topic, 30, 2, 0);
    s.kafka.produce(&s.topic, &old);
    let (mut run, addr) = s.run_with_metrics(&["--offset-reset", "latest"]).await;
    let group = s.group.as_str();
    let lag = |text: &str, p: i32| {
        sample(
            text,
            "consumer_lag",
            &[("group", group), ("partition", &p.to_string())],
        )
    };
    let mut text = String::new();
    wait_until(WAIT, "a lag series for each partition", || {
        text = scrape(&addr);
        let both = (0..2).all(|p| lag(&text, p).is_some());
        async move { both }
    })
    .await;
    assert!(
        s.positions().await.is_empty(),
        "nothing new was produced, so nothing may be stored yet"
    );
    for p in 0..2 {
        assert_eq!(lag(&text, p), Some(0.0), "partition {p}:\n{text}");
    }

    // New events are consumed from where it started; the old ones never are.
    let (new, ids) = order_events(&format!("{}-new", s.topic), 10, 2, 0);
    s.kafka.produce(&s.topic, &new);
    let mut ends = ends_of(&old);
    for (p, n) in ends_of(&new) {
        *ends.entry(p).or_default() += n;
    }
    s.wait_caught_up(&ends).await;
    run.terminate();
    run.wait(WAIT)
        .assert_success("the consumer stopped by SIGTERM");
    let new_prefix = format!("{}-new-", s.topic);
    let (new_applied, old_applied): (HashMap<_, _>, HashMap<_, _>) = s
        .applied()
        .await
        .into_iter()
        .partition(|(id, _)| id.starts_with(&new_prefix));
    assert!(
        old_applied.is_empty(),
        "old events were applied: {old_applied:?}"
    );
    assert_exactly_once(&new_applied, &ids);
    s.drop_schema().await;
}

#[tokio::test]
async fn metrics_over_http_match_the_database_once_caught_up() {
    let s = Setup::new(3).await;
    let (mut records, ids) = order_events(&s.topic, 20, 3, 6);
    // A poison record: version 0, which the handler rejects (it is parked).
    let bad_order = format!("{}-bad", s.topic);
    records.push((
        1,
        format!("{bad_order}-v0"),
        format!(r#"{{"type":"placed","order_id":"{bad_order}","version":0}}"#),
    ));
    s.kafka.produce(&s.topic, &records);
    let (mut run, addr) = s.run_with_metrics(&[]).await;

    let ends = ends_of(&records);
    s.wait_caught_up(&ends).await;
    let q = |sql: &str| {
        sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(sql.replace("{s}", &s.schema)))
            .bind(s.group.clone())
    };
    let ledger = q("SELECT count(*) FROM {s}.processed WHERE consumer_group = $1")
        .fetch_one(&s.pool)
        .await
        .unwrap();
    let dead = q("SELECT count(*) FROM {s}.dead_letters WHERE consumer_group = $1")
        .fetch_one(&s.pool)
        .await
        .unwrap();
    let group = s.group.as_str();
    let g = ("group", group);
    // The gauges refresh every 200 ms, and a batch's counters move just after its commit:
    // wait until the scrape shows the caught-up state.
    let mut text = String::new();
    wait_until(WAIT, "the metrics to show the caught-up state", || {
        text = scrape(&addr);
        let outcome = |o: &str| sample(&text, "consumer_records_total", &[g, ("outcome", o)]);
        let settled = sample(&text, "consumer_ledger_rows", &[g]) == Some(ledger as f64)
            && outcome("processed") == Some(ledger as f64)
            && outcome("parked") == Some(dead as f64)
            && (0..3).all(|p| {
                sample(&text, "consumer_lag", &[g, ("partition", &p.to_string())]) == Some(0.0)
            });
        async move { settled }
    })
    .await;
    eprintln!("scrape:\n{text}");

    let records_of = |outcome: &str| {
        sample(&text, "consumer_records_total", &[g, ("outcome", outcome)]).unwrap_or(0.0)
    };
    assert_eq!(ledger, ids.len() as i64, "ledger rows");
    assert_eq!(records_of("processed"), ledger as f64, "{text}");
    assert_eq!(records_of("duplicate"), 6.0, "{text}");
    assert_eq!(dead, 1);
    assert_eq!(records_of("parked"), dead as f64, "{text}");
    assert_eq!(records_of("retried"), 0.0, "{text}");
    assert_eq!(records_of("lost"), 0.0, "{text}");
    let positions = s.positions().await;
    for (p, end) in &ends {
        let lag = sample(&text, "consumer_lag", &[g, ("partition", &p.to_string())]);
        assert_eq!(
            lag,
            Some((end - positions[p]) as f64),
            "partition {p}: {text}"
        );
    }
    assert_eq!(
        sample(&text, "consumer_ledger_rows", &[g]),
        Some(ledger as f64)
    );
    assert!(
        sample(
            &text,
            "consumer_rebalances_total",
            &[g, ("event", "assigned")]
        ) >= Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "consumer_fenced_commits_total", &[g]),
        Some(0.0),
        "{text}"
    );
    // Every record went through exactly one committed batch.
    let total = records.len() as f64;
    assert_eq!(sample(&text, "consumer_batch_size_sum", &[g]), Some(total));
    let batches = sample(&text, "consumer_batch_size_count", &[g]).unwrap();
    assert!(batches >= 1.0, "{text}");
    for name in [
        "consumer_batch_duration_seconds_count",
        "consumer_commit_duration_seconds_count",
    ] {
        assert_eq!(sample(&text, name, &[g]), Some(batches), "{name}: {text}");
    }
    assert!(
        text.contains("# TYPE consumer_batch_duration_seconds histogram"),
        "{text}"
    );

    run.terminate();
    run.wait(WAIT)
        .assert_success("orders run stopped by SIGTERM");
    assert_exactly_once(&s.applied().await, &ids);
    s.drop_schema().await;
}

/// `run` parks what the handler rejects and what cannot be decoded and goes on; `dead-letters`
/// lists and shows them, `redrive` fails again on an unfixed record (exit status 1), applies a
/// fixed one exactly once (its producer duplicate is `already applied`, a second redrive `not
/// found`), and `purge` needs `--yes`.
#[tokio::test]
async fn parked_records_are_listed_shown_redriven_once_and_purged() {
    let s = Setup::new(2).await;
    let (mut records, ids) = order_events(&s.topic, 4, 2, 0);
    // An order event with version 0, which the handler rejects, sent twice with the same event
    // id (a producer duplicate: both are parked); and a payload that is not JSON.
    let bad_order = format!("{}-bad", s.topic);
    let bad_id = format!("{bad_order}-v0");
    let bad = format!(r#"{{"type":"placed","order_id":"{bad_order}","version":0}}"#);
    let junk_id = format!("{}-junk", s.topic);
    records.push((0, bad_id.clone(), bad.clone()));
    records.push((1, junk_id.clone(), "not json {".to_owned()));
    records.push((1, bad_id.clone(), bad.clone()));
    s.kafka.produce(&s.topic, &records);
    let mut run = s.run("run", &QUICK_SESSION);
    s.wait_caught_up(&ends_of(&records)).await;
    run.terminate();
    let out = run.wait(WAIT);
    out.assert_success("orders run stopped by SIGTERM");
    let stopped = out
        .stderr
        .lines()
        .find(|l| l.contains("stopped"))
        .unwrap_or_else(|| panic!("no `stopped` line:\n{}", out.stderr));
    assert!(
        stopped.contains("applied=12") && stopped.contains("parked=3"),
        "{stopped}"
    );
    assert_exactly_once(&s.applied().await, &ids);

    let dl = |name: &str, args: &[&str]| {
        let mut all = vec!["dead-letters"];
        all.extend_from_slice(args);
        output(name, orders(&s.db_args(&all)))
    };
    let list = || {
        let out = dl("list", &["list", "--group", &s.group]);
        out.assert_success("dead-letters list");
        out
    };
    let out = list();
    let rows = table(&out.stdout, "id");
    assert!(out.stdout.ends_with("\n3 dead letters\n"), "{}", out.stdout);
    let mut parked: Vec<(String, String, String)> = rows
        .iter()
        .map(|r| {
            assert_eq!(r["topic"], s.topic, "{}", out.stdout);
            (
                r["event_id"].clone(),
                r["kind"].clone(),
                r["attempts"].clone(),
            )
        })
        .collect();
    parked.sort();
    let mut expected = vec![
        (bad_id.clone(), "rejected".to_owned(), "1".to_owned()),
        (bad_id.clone(), "rejected".to_owned(), "1".to_owned()),
        (junk_id.clone(), "decode".to_owned(), "0".to_owned()),
    ];
    expected.sort();
    assert_eq!(parked, expected, "{}", out.stdout);
    let id_of = |event_id: &str| -> Vec<String> {
        let mut v: Vec<String> = rows
            .iter()
            .filter(|r| r["event_id"] == event_id)
            .map(|r| r["id"].clone())
            .collect();
        v.sort_by_key(|id| id.parse::<i64>().unwrap());
        v
    };
    let (bad_ids, junk) = (id_of(&bad_id), id_of(&junk_id).remove(0));
    let rejected = rows.iter().find(|r| r["kind"] == "rejected").unwrap();
    assert!(
        rejected["error"].starts_with(&format!("order {bad_order} has version 0")),
        "{}",
        out.stdout
    );
    let out = dl("list-other", &["list", "-g", &s.group, "-t", "elsewhere"]);
    out.assert_success("dead-letters list -t");
    assert_eq!(out.stdout, "0 dead letters\n");

    let out = dl("show", &["show", &junk]);
    out.assert_success("dead-letters show");
    for needle in [
        format!("id:              {junk}\n"),
        format!("event_id:        {junk_id}\n"),
        "kind:            decode (undecodable payload)\n".to_owned(),
        format!("key (utf-8):     {junk_id}\n"),
        format!("  event-id (utf-8): {junk_id}\n"),
        "payload (utf-8, 10 bytes):\nnot json {\n".to_owned(),
    ] {
        assert!(
            out.stdout.contains(&needle),
            "{needle:?} in:\n{}",
            out.stdout
        );
    }

    // Nothing fixed: the undecodable record fails again, stays parked, one attempt more.
    let out = dl("redrive-junk", &["redrive", &junk]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        out.stdout.starts_with(&format!(
            "dead letter {junk}: failed again: undecodable payload: "
        )),
        "{}",
        out.stdout
    );
    assert_one_line_error(
        "redrive of an undecodable record",
        &out,
        &["1 of 1 dead letter"],
    );
    let rows = table(&list().stdout, "id");
    let junk_row = rows.iter().find(|r| r["id"] == junk).unwrap();
    assert_eq!(
        (junk_row["kind"].as_str(), junk_row["attempts"].as_str()),
        ("decode", "1")
    );

    // An operator fixes the rejected record's data in place; redriving both copies applies it
    // once: the second finds its event id in the ledger.
    let fixed = bad.replace(r#""version":0"#, r#""version":1"#);
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE {}.dead_letters SET payload = $1 WHERE event_id = $2",
        s.schema
    )))
    .bind(fixed.as_bytes())
    .bind(&bad_id)
    .execute(&s.pool)
    .await
    .unwrap();
    let out = dl("redrive", &["redrive", &bad_ids[0], &bad_ids[1]]);
    out.assert_success("dead-letters redrive of the fixed record");
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(
        lines[..2],
        [
            format!("dead letter {}: applied, event id {bad_id}", bad_ids[0]),
            format!(
                "dead letter {}: already applied (row removed), event id {bad_id}",
                bad_ids[1]
            ),
        ],
        "{}",
        out.stdout
    );
    assert_eq!(s.applied().await.get(&bad_id), Some(&1));
    assert_eq!(
        s.orders().await.get(&bad_order),
        Some(&("placed".to_owned(), 1))
    );
    let out = dl("redrive-again", &["redrive", &bad_ids[0]]);
    out.assert_success("a second redrive");
    assert!(
        out.stdout
            .starts_with(&format!("dead letter {}: not found\n", bad_ids[0])),
        "{}",
        out.stdout
    );
    assert_eq!(s.applied().await.get(&bad_id), Some(&1));
    let out = dl(
        "redrive-none",
        &["redrive", "--all", "-g", &s.group, "-t", "elsewhere"],
    );
    out.assert_success("redrive --all of nothing");

    // purge needs --yes; then it deletes what is left (the undecodable record).
    let out = dl("purge-no", &["purge", "--group", &s.group]);
    assert_eq!(out.status.code(), Some(2));
    assert_one_line_error(
        "purge without --yes",
        &out,
        &["--yes", "Nothing was deleted"],
    );
    assert!(list().stdout.ends_with("\n1 dead letter\n"));
    let out = dl("purge", &["purge", "--group", &s.group, "--yes"]);
    out.assert_success("dead-letters purge --yes");
    assert_eq!(
        out.stdout,
        format!(
            "removed 1 dead letter of group {} without applying it\n",
            s.group
        )
    );
    assert_eq!(list().stdout, "0 dead letters\n");
    let out = dl("show-gone", &["show", &junk]);
    assert_one_line_error("show of a purged id", &out, &[&format!("id {junk}")]);
    let out = dl("bare", &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        out.stderr.contains("use one of list, show, redrive, purge"),
        "{}",
        out.stderr
    );
    s.drop_schema().await;
}

/// The generated program around a batch handler (`orders-batch`, one `unnest` statement per
/// batch): every order event applied exactly once (the non-idempotent counter), the bad event
/// rejected by index and parked, its redrive (a batch of one) applied once after a fix, and a
/// replay from the earliest offset applying nothing again.
#[tokio::test]
async fn a_program_around_a_batch_handler_applies_parks_redrives_and_replays_exactly_once() {
    let s = Setup::new(2).await;
    let (mut records, ids) = order_events(&s.topic, 100, 2, 30);
    let bad_order = format!("{}-bad", s.topic);
    let bad_id = format!("{bad_order}-v0");
    let bad = format!(r#"{{"type":"placed","order_id":"{bad_order}","version":0}}"#);
    records.insert(150, (1, bad_id.clone(), bad.clone()));
    s.kafka.produce(&s.topic, &records);
    let ends = ends_of(&records);
    let run_args = |s: &Setup| {
        let mut args = s.db_args(&["run"]);
        let flags = [
            "--brokers",
            &s.kafka.bootstrap,
            "--group",
            &s.group,
            "--topic",
            &s.topic,
        ];
        args.extend(flags.map(String::from));
        args.extend(QUICK_SESSION.map(String::from));
        args
    };
    let mut run = spawn("run-batch", orders_batch(&run_args(&s)));
    s.wait_caught_up(&ends).await;
    run.terminate();
    run.wait(WAIT)
        .assert_success("orders-batch run stopped by SIGTERM");
    assert_exactly_once(&s.applied().await, &ids);
    s.assert_all_shipped(100).await;

    let dl = |name: &str, args: &[&str]| {
        let mut all = vec!["dead-letters"];
        all.extend_from_slice(args);
        output(name, orders_batch(&s.db_args(&all)))
    };
    let out = dl("list", &["list", "--group", &s.group]);
    out.assert_success("dead-letters list");
    let rows = table(&out.stdout, "id");
    assert_eq!(rows.len(), 1, "{}", out.stdout);
    assert_eq!(rows[0]["event_id"], bad_id);
    assert_eq!(rows[0]["kind"], "rejected");
    assert!(
        rows[0]["error"].starts_with(&format!("order {bad_order} has version 0")),
        "{}",
        out.stdout
    );
    let letter = rows[0]["id"].clone();
    let out = dl("redrive-bad", &["redrive", &letter]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE {}.dead_letters SET payload = $1 WHERE event_id = $2",
        s.schema
    )))
    .bind(bad.replace(r#""version":0"#, r#""version":1"#).as_bytes())
    .bind(&bad_id)
    .execute(&s.pool)
    .await
    .unwrap();
    let out = dl("redrive-fixed", &["redrive", &letter]);
    out.assert_success("dead-letters redrive of the fixed record");
    assert!(
        out.stdout
            .starts_with(&format!("dead letter {letter}: applied, event id {bad_id}")),
        "{}",
        out.stdout
    );
    let mut all = ids.clone();
    all.push(bad_id.clone());
    assert_exactly_once(&s.applied().await, &all);

    // A replay from the earliest offset re-reads everything and applies nothing again.
    let replay = s.db_args(&[
        "replay",
        "--group",
        &s.group,
        "--topic",
        &s.topic,
        "--from",
        "earliest",
        "--brokers",
        &s.kafka.bootstrap,
    ]);
    output("replay", orders_batch(&replay)).assert_success("orders-batch replay");
    let rewound: BTreeMap<i32, i64> = ends.keys().map(|p| (*p, 0)).collect();
    assert_eq!(
        s.positions().await,
        rewound,
        "the replay rewinds to offset 0"
    );
    let mut run = spawn("run-batch-2", orders_batch(&run_args(&s)));
    s.wait_caught_up(&ends).await;
    run.terminate();
    run.wait(WAIT)
        .assert_success("orders-batch run stopped by SIGTERM");
    assert_exactly_once(&s.applied().await, &all);
    s.drop_schema().await;
}

/// The terminal session in the README's "The consumer program": a database of its own
/// (`orders_demo`, recreated), a mock cluster with 620 order events (20 of them producer
/// duplicates), and the program's commands with their real output. Run with `cargo test --test
/// cli demo_session -- --ignored --nocapture`.
#[tokio::test]
#[ignore = "prints the README's terminal session; run it by hand"]
async fn demo_session() {
    let admin = consumer_runtime::connect::<Postgres>(&database_url(), 1)
        .await
        .unwrap();
    for sql in [
        "DROP DATABASE IF EXISTS orders_demo WITH (FORCE)",
        "CREATE DATABASE orders_demo",
    ] {
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(&admin)
            .await
            .unwrap();
    }
    let base = database_url();
    let url = format!("{}/orders_demo", &base[..base.rfind('/').unwrap()]);
    let kafka = Kafka::new();
    kafka.create_topic("orders", 4);
    let (records, _) = order_events("demo", 200, 4, 20);
    kafka.produce("orders", &records);
    let ends = ends_of(&records);

    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("demo");
    std::fs::create_dir_all(&dir).unwrap();
    let toml = format!(
        "brokers = \"{}\"\ngroup = \"orders-projection\"\ntopics = [\"orders\"]\nbatch_size = 100\n\n[kafka]\n\"session.timeout.ms\" = 10000\n",
        kafka.bootstrap
    );
    std::fs::write(dir.join("orders.toml"), &toml).unwrap();
    let command = |args: &[&str]| {
        let mut cmd = orders(args);
        cmd.env("DATABASE_URL", &url).current_dir(&dir);
        cmd
    };
    // What a terminal shows: stdout and stderr interleaved, in order.
    let merged = |name: &str, mut cmd: Command| {
        let log = dir.join(format!("{name}.log"));
        let file = File::create(&log).unwrap();
        let child = cmd
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap();
        Proc {
            name: name.to_owned(),
            child,
            stdout: log,
            stderr: dir.join("none"),
        }
    };
    let show_env = |env: &[(&str, &str)], args: &[&str]| {
        let prefix: String = env.iter().map(|(k, v)| format!("{k}={v} ")).collect();
        println!("$ {prefix}orders {}", args.join(" "));
        let mut cmd = command(args);
        cmd.envs(env.iter().copied());
        let out = merged("demo", cmd).wait(WAIT);
        print!("{}", out.stdout);
        if !out.status.success() {
            println!("$ echo $?\n{}", out.status.code().unwrap_or(-1));
        }
    };
    let show = |args: &[&str]| show_env(&[], args);
    let psql = |sql: &str| {
        println!("$ psql \"$DATABASE_URL\" -c \"{sql}\"");
        let out = Command::new("psql")
            .args([url.as_str(), "-c", sql])
            .output()
            .unwrap();
        print!("{}", String::from_utf8_lossy(&out.stdout));
    };

    println!("$ export DATABASE_URL={url}");
    show(&["migrate"]);
    println!("$ cat orders.toml\n{toml}");
    println!(
        "$ orders run --config orders.toml -X client.id=orders-1    # SIGTERM once it caught up"
    );
    let mut run = merged(
        "demo-run",
        command(&["run", "--config", "orders.toml", "-X", "client.id=orders-1"]),
    );
    let pool = consumer_runtime::connect::<Postgres>(&url, 2)
        .await
        .unwrap();
    let store = consumer_runtime::Store::new(pool.clone(), "consumer_runtime").unwrap();
    wait_until(WAIT, "the demo consumer to catch up", || async {
        let stored: BTreeMap<i32, i64> = store
            .stored_offsets("orders-projection")
            .await
            .map(|rows| {
                rows.into_iter()
                    .filter_map(|o| Some((o.partition, o.next_offset?)))
                    .collect()
            })
            .unwrap_or_default();
        stored == ends
    })
    .await;
    run.terminate();
    print!("{}", run.wait(WAIT).stdout);
    psql("SELECT status, count(*) FROM orders GROUP BY status");
    psql("SELECT count(*) AS events, max(applied) AS most_applications FROM order_events_applied");

    let (more, _) = order_events("late", 10, 4, 0);
    kafka.produce("orders", &more);
    println!("# ... 30 more order events are published; nothing consumes them yet");
    show(&["status", "--config", "orders.toml"]);
    // Precedence: the environment wins over the file, a flag over both.
    show_env(
        &[("CONSUMER_GROUP", "nope")],
        &["status", "--config", "orders.toml"],
    );
    show_env(
        &[("CONSUMER_GROUP", "nope")],
        &[
            "status",
            "--config",
            "orders.toml",
            "-g",
            "orders-projection",
            "-t",
            "orders",
        ],
    );
    show(&["offsets", "-g", "orders-projection"]);
    show(&[
        "replay",
        "--config",
        "orders.toml",
        "-t",
        "orders",
        "--from",
        "earliest",
        "--dry-run",
    ]);
    show(&[
        "run",
        "--config",
        "orders.toml",
        "--database-url",
        "postgres://app:hunter2@127.0.0.1:1/x",
    ]);
    show(&["run", "--config", "orders.toml", "--batch-size", "0"]);
    drop(pool);
}

/// Writes order events (partition ignored, event id, payload) to the outbox of `s`'s schema in
/// one transaction, keyed by order, with the events' own ids as event ids.
async fn write_outbox(s: &Setup, records: &[(i32, String, String)]) {
    use consumer_runtime::outbox::{Message, Outbox};
    let ob = Outbox::new(&s.schema).unwrap();
    let mut tx = s.pool.begin().await.unwrap();
    for (_, id, payload) in records {
        let order = id.rsplit_once("-v").unwrap().0;
        let message = Message::new(&s.topic)
            .key(order)
            .payload(payload.clone())
            .event_id(id);
        ob.publish(&mut tx, &message).await.unwrap();
    }
    tx.commit().await.unwrap();
}

/// `relay` publishes the outbox (written in the application's transaction) to the topic, the
/// consumer applies every event exactly once, `outbox status` shows the lanes leased by the
/// relay, and `trace` shows each event's path: written, published to topic/partition/offset,
/// applied by the group. `run --relay` does both in one process.
#[tokio::test]
async fn relay_publishes_the_outbox_and_trace_shows_the_whole_path() {
    let s = Setup::new(2).await;
    let (records, ids) = order_events(&s.topic, 5, 2, 0);
    write_outbox(&s, &records).await;
    let relay_flags = [
        "--brokers",
        &s.kafka.bootstrap,
        "--lanes",
        "4",
        "--keep-published",
        "1h",
        "--poll-interval",
        "100ms",
    ];
    let mut relay_args = vec![
        "relay",
        "--metrics-addr",
        "127.0.0.1:0",
        "--log-format",
        "json",
    ];
    relay_args.extend(relay_flags);
    let mut relay = spawn("relay", orders(&s.db_args(&relay_args)));
    let addr = metrics_addr(&relay).await;
    let mut run = s.run("run", &QUICK_SESSION);
    wait_until(WAIT, "every outbox event applied", || async {
        s.applied().await.len() == ids.len()
    })
    .await;

    let status = output("outbox-status", orders(&s.db_args(&["outbox", "status"])));
    status.assert_success("orders outbox status");
    let lanes = table(&status.stdout, "lane");
    assert_eq!(lanes.len(), 4, "{}", status.stdout);
    assert!(
        lanes.iter().all(|l| l["owner"].starts_with("relay-")),
        "{}",
        status.stdout
    );
    assert!(status.stdout.contains("parked: 0"), "{}", status.stdout);
    // The relay's metrics say the same: every row published, none left, none parked.
    wait_until(WAIT, "the relay's gauges to show an empty outbox", || {
        let text = scrape(&addr);
        let ok = sample(&text, "outbox_published_total", &[]) == Some(ids.len() as f64)
            && sample(&text, "outbox_backlog_rows", &[]) == Some(0.0)
            && sample(&text, "outbox_parked_rows", &[]) == Some(0.0)
            && sample(&text, "outbox_lanes_owned", &[]) == Some(4.0);
        async move { ok }
    })
    .await;
    let text = scrape(&addr);
    assert!(
        sample(&text, "outbox_publish_latency_seconds_count", &[]) == Some(ids.len() as f64),
        "{text}"
    );

    let trace = output("trace", orders(&s.db_args(&["trace", &ids[0]])));
    trace.assert_success("orders trace");
    for needle in [
        "written:".to_owned(),
        format!("to {}/", s.topic),
        "sent 1 time".to_owned(),
        format!("applied:   by group {}", s.group),
    ] {
        assert!(
            trace.stdout.contains(&needle),
            "no `{needle}` in:\n{}",
            trace.stdout
        );
    }
    let unknown = output(
        "trace-unknown",
        orders(&s.db_args(&["trace", "no-such-event"])),
    );
    assert_eq!(unknown.status.code(), Some(2), "{}", unknown.stderr);
    assert!(
        unknown.stderr.contains("no event `no-such-event`"),
        "{}",
        unknown.stderr
    );

    relay.terminate();
    relay
        .wait(WAIT)
        .assert_success("orders relay stopped by SIGTERM");
    run.terminate();
    run.wait(WAIT)
        .assert_success("orders run stopped by SIGTERM");
    assert_exactly_once(&s.applied().await, &ids);
    s.assert_all_shipped(5).await;

    // `run --relay`: one process consumes and relays.
    let order = format!("{}-o9", s.topic);
    let placed = (
        0,
        format!("{order}-v1"),
        format!(
            r#"{{"type":"placed","order_id":"{order}","version":1,"customer":"c-9","total_cents":900}}"#
        ),
    );
    write_outbox(&s, std::slice::from_ref(&placed)).await;
    let mut extra = vec!["--relay"];
    extra.extend(&relay_flags[2..]);
    extra.extend(QUICK_SESSION);
    let mut both = s.run("run-relay", &extra);
    wait_until(
        WAIT,
        "the event relayed and applied by one process",
        || async { s.applied().await.get(&placed.1) == Some(&1) },
    )
    .await;
    both.terminate();
    both.wait(WAIT)
        .assert_success("orders run --relay stopped by SIGTERM");
    let trace = output("trace-2", orders(&s.db_args(&["trace", &placed.1])));
    assert!(
        trace
            .stdout
            .contains(&format!("applied:   by group {}", s.group)),
        "{}",
        trace.stdout
    );
    s.drop_schema().await;
}
