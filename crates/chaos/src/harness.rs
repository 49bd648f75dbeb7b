//! The harness: the mock cluster, the database, the consumer processes, the fault schedule
//! and the check.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use consumer_runtime::rdkafka::config::ClientConfig;
use consumer_runtime::rdkafka::message::{Header, OwnedHeaders};
use consumer_runtime::rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use consumer_runtime::rdkafka::types::RDKafkaErrorCode;
use consumer_runtime::sqlx::{self, Pool, Postgres, Row};

use crate::Options;
use crate::consumer::{ENV_DELAY_US, ENV_SCHEMA, effects_table_sql};
use crate::rng::{Rng, mix};
use testkit::mock_broker::{self, MockBroker};
use testkit::private_pg::{PrivatePostgres, Stop};

/// What a trial leaves behind for [`finish_trial`].
pub(crate) struct TrialLogs<'a> {
    pub(crate) notes: &'a [String],
    pub(crate) dir: &'a Path,
    pub(crate) failed: bool,
    pub(crate) exits: u32,
    /// What the directory holds, for the failure line ("consumer logs", "logs").
    pub(crate) kind: &'a str,
}

/// Prints a trial's notes, then keeps its log directory (a failed trial, one whose processes
/// exited, or `--keep-logs`) or removes it; failed trials' directories go to `failed_dirs`.
pub(crate) fn finish_trial(
    trial: u32,
    logs: &TrialLogs<'_>,
    keep_logs: bool,
    failed_dirs: &mut Vec<PathBuf>,
) {
    for note in logs.notes {
        println!("  {note}");
    }
    if logs.failed {
        println!(
            "  trial {trial} FAILED; {} kept in {}",
            logs.kind,
            logs.dir.display()
        );
        failed_dirs.push(logs.dir.to_path_buf());
    } else if keep_logs || logs.exits > 0 {
        println!("  logs: {}", logs.dir.display());
    } else {
        let _ = std::fs::remove_dir_all(logs.dir);
    }
}

/// The consumers' session timeout: a SIGSTOP longer than this makes a zombie. (librdkafka's
/// mock cluster enforces it: a member silent for this long is removed from the group, and the
/// others are assigned its partitions about `session timeout - 1 s` later.)
pub(crate) const SESSION_TIMEOUT: Duration = Duration::from_millis(3000);
/// The consumers' heartbeat interval.
pub(crate) const HEARTBEAT: &str = "heartbeat.interval.ms=300";
/// Set by Ctrl-C.
pub(crate) static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Produce waves per trial.
pub(crate) const WAVES: usize = 8;
/// Seconds between waves.
pub(crate) const WAVE_GAP: f64 = 1.1;

/// The mock broker's crashes over a run, and the keys of the trials repeated after them.
pub(crate) struct BrokerRetries {
    /// Trials repeated because the mock broker died.
    pub(crate) crashes: u32,
    /// A repeated trial gets a key of its own (its event ids and effect rows carry it).
    last_key: u32,
}

impl BrokerRetries {
    pub(crate) fn new(trials: u32) -> BrokerRetries {
        BrokerRetries {
            crashes: 0,
            last_key: trials,
        }
    }
}

/// Runs trial `trial` of `trials` (`start` starts its mock broker and runs it, for a key and
/// a trial seed) until its broker lives through it: its result and the trial seed it ran
/// under. A crash is not a consumer failure: a broker must answer whatever a client sends, but
/// librdkafka's mock cluster aborts on an internal assertion now and then (seen:
/// `rd_kafka_mock_cgrp_classic_member_add: Assertion '!member->resp' failed`). The trial is
/// then not counted: its logs (`dir`) are removed and it runs again on a new broker and new
/// `what` (its topics and groups), under a new key; more than 2 + trials/10 crashes end the
/// run.
pub(crate) fn on_a_broker_that_lives<T>(
    (trial, trials, seed): (u32, u32, u64),
    (mut key, mut trial_seed): (u32, u64),
    retries: &mut BrokerRetries,
    (dir, what): (impl Fn(u32) -> PathBuf, &str),
    mut start: impl FnMut(u32, u64) -> anyhow::Result<(MockBroker, anyhow::Result<T>)>,
) -> anyhow::Result<(T, u64)> {
    loop {
        let (broker, outcome) = start(key, trial_seed)?;
        let Some(status) = broker.died() else {
            let result = outcome.with_context(|| format!("trial {trial} (seed {seed})"))?;
            return Ok((result, trial_seed));
        };
        retries.crashes += 1;
        println!(
            "trial {trial}/{trials}: the mock broker's process died ({status}); the trial is not counted and runs again on a new broker, {what}"
        );
        let _ = std::fs::remove_dir_all(dir(key));
        if retries.crashes > 2 + trials / 10 {
            bail!(
                "the mock broker died {} times; see the messages above",
                retries.crashes
            );
        }
        retries.last_key += 1;
        (key, trial_seed) = (retries.last_key, mix(trial_seed ^ 0x00b4_0ce4));
    }
}

/// Runs the trials; `Ok(false)` if any event was lost or duplicated.
pub(crate) fn run(opts: Options) -> anyhow::Result<bool> {
    let seed = seed_of(&opts);
    let world = World::new(&opts, seed)?;
    println!(
        "chaos: seed={seed} trials={} events={} partitions={} consumers={} faults={} guarantee={} database={}{}",
        opts.trials,
        opts.events,
        opts.partitions,
        opts.consumers,
        opts.faults.join(","),
        opts.guarantee,
        if world.pg.is_some() {
            "private PostgreSQL"
        } else {
            "--database-url"
        },
        if world.pg.is_some() {
            ""
        } else {
            " (PostgreSQL restarts skipped: not our server)"
        }
    );
    let (mut lost, mut duplicated, mut parked) = (0u64, 0u64, 0u64);
    let mut failed_dirs = Vec::new();
    let mut retries = BrokerRetries::new(opts.trials);
    for trial in 1..=opts.trials {
        let (key, trial_seed) = (trial, mix(seed ^ mix(u64::from(trial))));
        let (result, trial_seed) = on_a_broker_that_lives(
            (trial, opts.trials, seed),
            (key, trial_seed),
            &mut retries,
            (
                |key| world.dir.join(format!("trial-{key}")),
                "topic and group",
            ),
            |key, trial_seed| {
                let topic = trial_topic(key, trial_seed);
                let broker =
                    MockBroker::start(&["mock-broker", &topic, &opts.partitions.to_string()])?;
                let outcome = Trial::run(&world, &opts, key, trial_seed, &broker.bootstrap);
                Ok((broker, outcome))
            },
        )?;
        lost += result.lost;
        duplicated += result.duplicated;
        parked += result.parked;
        println!(
            "trial {trial}/{} seed={trial_seed} events={} producer_dups={} poison={} kills={} zombies={} pg_restarts={} replays={} fenced={} exits={} lost={} duplicated={} parked={} wall={:.1}s",
            opts.trials,
            opts.events,
            result.dups,
            result.poison,
            result.kills,
            result.zombies,
            result.pg_restarts,
            result.replays,
            result.fenced,
            result.exits,
            result.lost,
            result.duplicated,
            result.parked,
            result.wall.as_secs_f64()
        );
        if opts.faults.iter().any(|f| f == "prune") {
            println!(
                "  prune: replays refused below the floor={} applied twice beyond the {} s retention={}",
                result.refused,
                crate::prune::RETENTION.as_secs(),
                result.beyond_retention
            );
        }
        let bad = result.lost > 0 || result.duplicated > 0 || result.timed_out;
        finish_trial(
            trial,
            &TrialLogs {
                notes: &result.notes,
                dir: &result.dir,
                failed: bad,
                exits: result.exits,
                kind: "consumer logs",
            },
            opts.keep_logs,
            &mut failed_dirs,
        );
    }
    if retries.crashes > 0 {
        println!("mock broker crashes (trials repeated): {}", retries.crashes);
    }
    println!(
        "trials={} lost={lost} duplicated={duplicated} parked={parked}",
        opts.trials
    );
    let ok = lost == 0 && duplicated == 0 && failed_dirs.is_empty();
    if !ok {
        println!(
            "FAILED: logs of the failed trials are in {}",
            failed_dirs
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    world.finish(ok);
    Ok(ok)
}

/// The run's seed: --seed, or one from the clock.
pub(crate) fn seed_of(opts: &Options) -> u64 {
    opts.seed.unwrap_or_else(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        mix(nanos ^ u64::from(std::process::id())) % 1_000_000_000
    })
}

/// What a whole run shares: the database and the paths.
pub(crate) struct World {
    pub(crate) exe: PathBuf,
    pub(crate) dir: PathBuf,
    pub(crate) url: String,
    pub(crate) schema: String,
    // Dropped before the async runtime it needs.
    pub(crate) pool: Pool<Postgres>,
    pub(crate) rt: tokio::runtime::Runtime,
    /// `None` with --database-url.
    pub(crate) pg: Option<PrivatePostgres>,
}

impl World {
    pub(crate) fn new(opts: &Options, seed: u64) -> anyhow::Result<World> {
        let exe = std::env::current_exe().context("finding this program's path")?;
        let dir = std::env::temp_dir().join(format!("chaos-{}-{seed}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let (pg, url, schema) = match &opts.database_url {
            Some(url) => {
                let unique = mix(seed ^ u64::from(std::process::id()) ^ 0x000c_4a05) % 1_000_000;
                (None, url.clone(), format!("chaos_{unique:06}"))
            }
            None => {
                let pg = PrivatePostgres::start(&dir.join("pg")).context(
                    "starting a private PostgreSQL server (or give --database-url URL to use an existing one; PostgreSQL restarts are then skipped)",
                )?;
                let url = pg.url("postgres");
                (Some(pg), url, "chaos".to_owned())
            }
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .context("starting the async runtime")?;
        // Ctrl-C stops the run at the next check, so that the consumers are killed and the
        // private server stopped by their guards.
        rt.spawn(async {
            if tokio::signal::ctrl_c().await.is_ok() {
                INTERRUPTED.store(true, Ordering::SeqCst);
            }
        });
        // The runtime's tables, by the consumer program itself.
        let migrate = run_tool(
            &exe,
            &dir.join("migrate.log"),
            &["migrate", "--database-url", &url, "--schema", &schema],
            Duration::from_secs(60),
        )?;
        if !migrate.0.success() {
            bail!(
                "`chaos consumer migrate` failed ({}): {}",
                migrate.0,
                migrate.1
            );
        }
        let pool = rt
            .block_on(consumer_runtime::connect::<Postgres>(&url, 4))
            .with_context(|| format!("connecting to {url}"))?;
        for table in ["chaos_effects", "chaos_effects_b"] {
            rt.block_on(
                sqlx::query(sqlx::AssertSqlSafe(effects_table_sql(&schema, table))).execute(&pool),
            )
            .with_context(|| format!("creating the {table} table"))?;
        }
        Ok(World {
            exe,
            dir,
            url,
            schema,
            rt,
            pool,
            pg,
        })
    }

    /// Drops a shared database's schema after a passing run and removes the private server's
    /// files.
    pub(crate) fn finish(self, ok: bool) {
        if self.pg.is_none() && ok {
            let sql = format!("DROP SCHEMA IF EXISTS {} CASCADE", self.schema);
            let _ = self
                .rt
                .block_on(sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&self.pool));
        }
        let World {
            dir, pg, pool, rt, ..
        } = self;
        rt.block_on(pool.close());
        drop(pg);
        let _ = std::fs::remove_dir_all(dir.join("pg"));
        let _ = std::fs::remove_file(dir.join("migrate.log"));
        // Only if nothing (kept logs) is left in it.
        let _ = std::fs::remove_dir(&dir);
    }

    /// The pids of the processes that own partitions of `topic` for `group` (empty on error).
    pub(crate) fn owner_pids(&self, group: &str, topic: &str) -> HashSet<u32> {
        let sql = format!(
            "SELECT owner FROM {}.consumer_offsets WHERE consumer_group = $1 AND topic = $2",
            self.schema
        );
        let rows = self.rt.block_on(
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(group)
                .bind(topic)
                .fetch_all(&self.pool),
        );
        rows.map(|rows| {
            rows.iter()
                .filter_map(|r| {
                    // host:pid:random
                    let owner: Option<String> = r.get(0);
                    owner?.rsplit(':').nth(1)?.parse().ok()
                })
                .collect()
        })
        .unwrap_or_default()
    }

    /// Polls a query, treating errors (the server restarting) as "not yet".
    pub(crate) fn stored_offsets(&self, group: &str, topic: &str) -> Option<HashMap<i32, i64>> {
        let sql = format!(
            "SELECT partition, next_offset FROM {}.consumer_offsets WHERE consumer_group = $1 AND topic = $2",
            self.schema
        );
        let rows = self
            .rt
            .block_on(
                sqlx::query(sqlx::AssertSqlSafe(sql))
                    .bind(group)
                    .bind(topic)
                    .fetch_all(&self.pool),
            )
            .ok()?;
        Some(
            rows.iter()
                .filter_map(|r| {
                    let next: Option<i64> = r.get(1);
                    Some((r.get::<i32, _>(0), next?))
                })
                .collect(),
        )
    }
}

/// A child process whose output goes to a log file. Dropping it kills it (SIGKILL also ends a
/// stopped process) and reaps it.
pub(crate) struct Proc {
    pub(crate) number: u32,
    pub(crate) child: Child,
    pub(crate) log: PathBuf,
    pub(crate) stopped: bool,
}

impl Proc {
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    pub(crate) fn signal(&self, signal: &str) -> anyhow::Result<()> {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .context("running kill")?;
        if !status.success() {
            bail!("kill -{signal} {} failed", self.pid());
        }
        Ok(())
    }

    /// `Some(status)` once the process has exited.
    pub(crate) fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
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

/// Starts `chaos consumer <args>` with its output in `log`.
pub(crate) fn spawn(
    exe: &Path,
    log: &Path,
    args: &[&str],
    env: &[(&str, String)],
) -> anyhow::Result<Child> {
    let out = File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let err = out.try_clone()?;
    let mut cmd = Command::new(exe);
    cmd.arg("consumer").args(args);
    for var in [
        "DATABASE_URL",
        "KAFKA_BROKERS",
        "CONSUMER_GROUP",
        "KAFKA_TOPICS",
        "CONSUMER_RUNTIME_SCHEMA",
        "CONSUMER_CONFIG",
        "RUST_LOG",
    ] {
        cmd.env_remove(var);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .with_context(|| format!("starting {} consumer", exe.display()))
}

/// Runs `chaos consumer <args>` to completion: its status and the tail of its output.
fn run_tool(
    exe: &Path,
    log: &Path,
    args: &[&str],
    timeout: Duration,
) -> anyhow::Result<(ExitStatus, String)> {
    let mut child = spawn(exe, log, args, &[])?;
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "`chaos consumer {}` did not finish within {timeout:?}; log: {}",
                args.first().unwrap_or(&""),
                log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let tail: Vec<&str> = text.lines().rev().take(3).collect();
    Ok((
        status,
        tail.into_iter().rev().collect::<Vec<_>>().join(" | "),
    ))
}

/// One record to produce.
pub(crate) struct Rec {
    pub(crate) partition: i32,
    pub(crate) id: String,
    /// The record's key (default: its id).
    pub(crate) key: Option<String>,
    pub(crate) payload: String,
}

/// A fault or a wave, at a moment of the trial.
#[derive(Debug, Clone, Copy)]
enum Action {
    Wave(usize),
    Kill,
    Freeze,
    Thaw,
    RestartPg(Stop),
    Replay,
    /// `ledger prune` from outside, as cron would (the `prune` fault).
    Prune,
}

/// What a trial found.
struct Outcome {
    dir: PathBuf,
    dups: usize,
    poison: usize,
    kills: u32,
    zombies: u32,
    pg_restarts: String,
    replays: u32,
    fenced: usize,
    exits: u32,
    lost: u64,
    duplicated: u64,
    parked: u64,
    /// `prune` only: events applied twice, the second time more than the retention after the
    /// first (allowed: their ledger row may have been pruned).
    beyond_retention: u64,
    /// Replays refused below a ledger floor.
    refused: u32,
    timed_out: bool,
    wall: Duration,
    notes: Vec<String>,
}

/// The verdict on every event of a trial.
struct Check {
    /// Valid events never applied, and poison events neither applied nor parked.
    lost: u64,
    /// Events applied more than once, and poison events applied at all.
    duplicated: u64,
    /// Poison events found in dead_letters.
    parked: u64,
    /// Valid events applied once but also parked.
    misparked: u64,
    /// Effects of event ids that were never produced.
    strangers: usize,
    /// A few of the lost and duplicated events.
    examples: Vec<String>,
}

impl Check {
    fn of(
        ids: &[String],
        poison: &HashSet<String>,
        effects: &HashMap<String, i64>,
        parked_ids: &HashSet<String>,
    ) -> Check {
        let mut c = Check {
            lost: 0,
            duplicated: 0,
            parked: 0,
            misparked: 0,
            strangers: 0,
            examples: Vec::new(),
        };
        let mut example = |text: String| {
            if c.examples.len() < 8 {
                c.examples.push(text);
            }
        };
        for id in ids {
            let applied = effects.get(id).copied().unwrap_or(0);
            let is_parked = parked_ids.contains(id);
            if poison.contains(id) {
                if applied > 0 {
                    c.duplicated += 1;
                    example(format!("poison {id} applied {applied}x"));
                } else if is_parked {
                    c.parked += 1;
                } else {
                    c.lost += 1;
                    example(format!("poison {id} neither applied nor parked"));
                }
            } else if applied == 0 {
                c.lost += 1;
                let parked = if is_parked { " (parked)" } else { "" };
                example(format!("{id} never applied{parked}"));
            } else if applied > 1 {
                c.duplicated += 1;
                example(format!("{id} applied {applied}x"));
            } else if is_parked {
                c.misparked += 1;
            }
        }
        let known: HashSet<&String> = ids.iter().collect();
        c.strangers = effects.keys().filter(|k| !known.contains(k)).count();
        c
    }
}

/// One trial's state.
struct Trial<'w> {
    world: &'w World,
    opts: &'w Options,
    trial: u32,
    dir: PathBuf,
    topic: String,
    group: String,
    bootstrap: &'w str,
    rng: Rng,
    procs: Vec<Proc>,
    spawned: u32,
    exits: u32,
    notes: Vec<String>,
    /// The replay process, while it runs.
    replaying: Option<Proc>,
    /// When to start which attempt of a failed replay.
    replay_retry: Option<(Instant, u32)>,
    replays: u32,
    /// Replays refused below a ledger floor (the `prune` fault).
    refused: u32,
    /// The final below-floor replay was not refused.
    refused_check_failed: bool,
    /// What happened when, written to `schedule.txt` next to the logs.
    schedule: Vec<String>,
    started: Instant,
}

impl<'w> Trial<'w> {
    fn log(&mut self, what: String) {
        self.schedule.push(format!(
            "{:7.2}s {what}",
            self.started.elapsed().as_secs_f64()
        ));
    }

    /// Runs trial `trial` (its key: event ids and effect rows carry it) against the mock
    /// broker at `bootstrap`, which holds the topic [`trial_topic`]`(trial, seed)`.
    fn run(
        world: &'w World,
        opts: &'w Options,
        trial: u32,
        seed: u64,
        bootstrap: &'w str,
    ) -> anyhow::Result<Outcome> {
        let started = Instant::now();
        let dir = world.dir.join(format!("trial-{trial}"));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let topic = trial_topic(trial, seed);
        let group = topic.clone();
        let mut t = Trial {
            world,
            opts,
            trial,
            dir,
            topic,
            group,
            bootstrap,
            rng: Rng::new(seed),
            procs: Vec::new(),
            spawned: 0,
            exits: 0,
            notes: Vec::new(),
            replaying: None,
            replay_retry: None,
            replays: 0,
            refused: 0,
            refused_check_failed: false,
            schedule: Vec::new(),
            started,
        };

        // The workload: ids, poison, producer duplicates, waves.
        let n = opts.events as usize;
        let mut poison = HashSet::new();
        let mut keyed: Vec<(u64, Rec)> = Vec::with_capacity(n + n / 9);
        let mut dups = 0;
        for i in 0..n {
            let id = format!("t{trial}-e{i}");
            let partition = t.rng.below(opts.partitions as u64) as i32;
            let payload = if t.rng.chance(opts.poison_ratio) {
                poison.insert(id.clone());
                if t.rng.chance(0.5) {
                    format!(r#"{{"trial":{trial},"n":{i},"poison":true}}"#)
                } else {
                    format!("not JSON: poison {id}")
                }
            } else {
                format!(r#"{{"trial":{trial},"n":{i}}}"#)
            };
            if t.rng.chance(opts.dup_ratio) {
                // A producer retry: the same record again, a little later.
                dups += 1;
                let later = (i as u64 + 1 + t.rng.below(300)) * 2 + 1;
                keyed.push((
                    later,
                    Rec {
                        partition,
                        id: id.clone(),
                        key: None,
                        payload: payload.clone(),
                    },
                ));
            }
            keyed.push((
                i as u64 * 2,
                Rec {
                    partition,
                    id,
                    key: None,
                    payload,
                },
            ));
        }
        keyed.sort_by_key(|(k, _)| *k);
        let records: Vec<Rec> = keyed.into_iter().map(|(_, r)| r).collect();
        let mut ends: HashMap<i32, i64> = (0..opts.partitions).map(|p| (p, 0)).collect();
        for r in &records {
            *ends.entry(r.partition).or_default() += 1;
        }
        let ids: Vec<String> = (0..n).map(|i| format!("t{trial}-e{i}")).collect();

        // The schedule (seconds after the consumers start).
        let mut plan: Vec<(f64, Action)> = (0..WAVES)
            .map(|w| (0.5 + w as f64 * WAVE_GAP, Action::Wave(w)))
            .collect();
        // Every draw happens whatever --faults says, so that a fault's moment depends on the
        // seed alone.
        let fault = |name: &str| opts.faults.iter().any(|f| f == name);
        let kills = if t.rng.chance(0.3) { 2 } else { 1 };
        for _ in 0..kills {
            let at = t.rng.range(4.0, 10.0);
            if fault("kill") {
                plan.push((at, Action::Kill));
            }
        }
        let at = t.rng.range(4.0, 9.0);
        if fault("zombie") {
            plan.push((at, Action::Freeze));
        }
        let (at, immediate) = (t.rng.range(5.0, 12.0), t.rng.chance(0.5));
        if world.pg.is_some() && fault("pg") {
            let how = if immediate {
                Stop::Immediate
            } else {
                Stop::Fast
            };
            plan.push((at, Action::RestartPg(how)));
        }
        let at = t.rng.range(6.0, 13.0);
        if fault("replay") {
            plan.push((at, Action::Replay));
        }
        // Long enough for the group to evict the frozen member and for the others to claim
        // (and work on) its partitions: then it resumes as a zombie with stale epochs.
        let freeze_for = SESSION_TIMEOUT.as_secs_f64() * 2.0 + t.rng.range(2.5, 5.0);
        if fault("prune") {
            // Drawn only under the fault, after every other draw: the other faults' moments
            // stay those of the seed.
            plan.push((t.rng.range(5.0, 12.0), Action::Prune));
        }

        for _ in 0..opts.consumers {
            t.start_consumer()?;
        }
        let start = Instant::now();
        let producer: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("linger.ms", "5")
            .create()
            .context("creating the producer")?;
        let per_wave = records.len().div_ceil(WAVES);
        let (mut killed, mut zombies) = (0, 0);
        let mut pg_restarts = if world.pg.is_some() || !opts.faults.iter().any(|f| f == "pg") {
            "0".to_owned()
        } else {
            "skipped".to_owned()
        };
        let mut frozen: Option<u32> = None;
        loop {
            plan.sort_by(|a, b| a.0.total_cmp(&b.0));
            if plan.is_empty() {
                break;
            }
            let (at, action) = plan.remove(0);
            t.supervise_until(start + Duration::from_secs_f64(at))?;
            match action {
                Action::Wave(w) => {
                    let lo = (w * per_wave).min(records.len());
                    let hi = ((w + 1) * per_wave).min(records.len());
                    produce(&producer, &t.topic, &records[lo..hi])?;
                    t.log(format!("wave {w}: {} records produced", hi - lo));
                }
                Action::Kill => {
                    if let Some(i) = t.pick_running(frozen) {
                        let mut p = t.procs.remove(i);
                        p.child.kill().context("SIGKILL")?;
                        p.child.wait().context("reaping a killed consumer")?;
                        t.log(format!("SIGKILL consumer {} (pid {})", p.number, p.pid()));
                        killed += 1;
                        t.start_consumer()?;
                    }
                }
                Action::Freeze => {
                    if let Some(i) = t.pick_running(frozen) {
                        t.procs[i].signal("STOP")?;
                        t.procs[i].stopped = true;
                        frozen = Some(t.procs[i].number);
                        zombies += 1;
                        let (n, pid) = (t.procs[i].number, t.procs[i].pid());
                        t.log(format!(
                            "SIGSTOP consumer {n} (pid {pid}) for {freeze_for:.1}s"
                        ));
                        plan.push((start.elapsed().as_secs_f64() + freeze_for, Action::Thaw));
                    }
                }
                Action::Thaw => {
                    if let Some(p) = t.procs.iter_mut().find(|p| Some(p.number) == frozen) {
                        p.signal("CONT")?;
                        p.stopped = false;
                        let line = format!("SIGCONT consumer {} (pid {})", p.number, p.pid());
                        t.log(line);
                    }
                    frozen = None;
                }
                Action::RestartPg(how) => {
                    if let Some(pg) = &world.pg {
                        t.log(format!("PostgreSQL stop ({how:?})"));
                        pg.restart(how).context("restarting PostgreSQL")?;
                        t.log("PostgreSQL started again".to_owned());
                        pg_restarts = format!(
                            "1({})",
                            if how == Stop::Immediate {
                                "immediate"
                            } else {
                                "fast"
                            }
                        );
                    }
                }
                Action::Replay => t.start_replay(1)?,
                Action::Prune => t.prune_from_outside()?,
            }
        }

        // The topic's real ends (the broker's high watermarks), in case a send was retried.
        for (p, end) in ends.iter_mut() {
            let (_, high) = producer
                .client()
                .fetch_watermarks(&t.topic, *p, Duration::from_secs(10))
                .context("reading the topic's high watermarks")?;
            if high != *end {
                t.notes.push(format!(
                    "partition {p} holds {high} records, {end} were sent (a producer retry?)"
                ));
                *end = high;
            }
        }

        // Catch up: every partition's stored offset at the end of the topic.
        let deadline = Instant::now() + Duration::from_secs(opts.deadline);
        let mut timed_out = false;
        loop {
            if !t.replay_pending()
                && let Some(stored) = world.stored_offsets(&t.group, &t.topic)
                && ends.iter().all(|(p, end)| stored.get(p) == Some(end))
            {
                break;
            }
            if Instant::now() > deadline {
                timed_out = true;
                let stored = world.stored_offsets(&t.group, &t.topic);
                t.notes.push(format!(
                    "timed out after {}s waiting for the stored offsets {stored:?} to reach the ends {ends:?}",
                    opts.deadline
                ));
                break;
            }
            t.supervise_until(Instant::now() + Duration::from_millis(200))?;
        }
        t.log("caught up (or timed out); SIGTERM to the consumers".to_owned());
        t.stop_all();
        if fault("prune") && !timed_out {
            t.replay_below_floor_is_refused(&ends)?;
        }

        // The check.
        let (effects, parked_ids, null_parked) = t.read_results()?;
        let mut check = Check::of(&ids, &poison, &effects, &parked_ids);
        let mut beyond_retention = 0;
        if fault("prune") {
            let beyond = t.beyond_retention()?;
            let twice: Vec<String> = ids
                .iter()
                .filter(|id| !poison.contains(*id) && effects.get(*id).copied().unwrap_or(0) > 1)
                .cloned()
                .collect();
            let (_, outside) = crate::prune::split(&twice, &beyond);
            check.duplicated -= outside;
            beyond_retention = outside;
        }
        if check.misparked > 0 {
            t.notes.push(format!(
                "{} valid events applied once but also found in dead_letters",
                check.misparked
            ));
        }
        if check.strangers > 0 {
            t.notes.push(format!(
                "{} effects for event ids never produced",
                check.strangers
            ));
        }
        if null_parked > 0 {
            t.notes
                .push(format!("{null_parked} dead letters without an event id"));
        }
        if !check.examples.is_empty() {
            t.notes.push(format!("e.g. {}", check.examples.join("; ")));
        }
        if timed_out {
            // Stalled or lost? One fresh consumer gets a minute to finish; its result is a
            // diagnosis only (the trial has failed already).
            t.log("diagnosis: one fresh consumer".to_owned());
            t.start_consumer()?;
            let until = Instant::now() + Duration::from_secs(60);
            let mut done = false;
            while Instant::now() < until && !done {
                t.supervise_until(Instant::now() + Duration::from_millis(200))?;
                done = world
                    .stored_offsets(&t.group, &t.topic)
                    .is_some_and(|stored| ends.iter().all(|(p, end)| stored.get(p) == Some(end)));
            }
            t.stop_all();
            let (effects, parked_ids, _) = t.read_results()?;
            let after = Check::of(&ids, &poison, &effects, &parked_ids);
            t.notes.push(format!(
                "diagnosis: after the timeout a fresh consumer {} the topic; then lost={} duplicated={} parked={} (so the events counted as lost above were {})",
                if done { "finished" } else { "did NOT finish" },
                after.lost,
                after.duplicated,
                after.parked,
                if after.lost == 0 { "stalled, not lost" } else { "lost or still stalled" }
            ));
        }
        let schedule = t.schedule.join("\n") + "\n";
        let _ = std::fs::write(t.dir.join("schedule.txt"), schedule);
        let (lost, duplicated, parked) = (check.lost, check.duplicated, check.parked);
        let fenced = t.count_in_logs("commit fenced");
        Ok(Outcome {
            dir: t.dir.clone(),
            dups,
            poison: poison.len(),
            kills: killed,
            zombies,
            pg_restarts,
            replays: t.replays,
            fenced,
            exits: t.exits,
            lost,
            duplicated,
            parked,
            beyond_retention,
            refused: t.refused,
            timed_out: timed_out || t.refused_check_failed,
            wall: started.elapsed(),
            notes: std::mem::take(&mut t.notes),
        })
    }

    /// The generated program's `command` with this trial's database, brokers, schema, group
    /// and topic.
    fn program_args(&self, command: &'static str) -> Vec<&str> {
        let w = self.world;
        vec![
            command,
            "--database-url",
            &w.url,
            "-b",
            self.bootstrap,
            "--schema",
            &w.schema,
            "-g",
            &self.group,
            "-t",
            &self.topic,
        ]
    }

    /// Starts one more consumer process.
    fn start_consumer(&mut self) -> anyhow::Result<()> {
        self.spawned += 1;
        let number = self.spawned;
        let batch_size = self.rng.pick(&[1u32, 10, 50, 200, 500]).to_string();
        let log = self.dir.join(format!("consumer-{number}.log"));
        let client_id = format!("client.id=chaos-{}-{number}", self.trial);
        let session = format!("session.timeout.ms={}", SESSION_TIMEOUT.as_millis());
        let w = self.world;
        let mut args = self.program_args("run");
        args.extend([
            "--batch-size",
            &batch_size,
            "--batch-wait",
            "5ms",
            "--max-attempts",
            "unlimited",
            "--guarantee",
            &self.opts.guarantee,
            "-X",
            &session,
            "-X",
            HEARTBEAT,
            "-X",
            &client_id,
        ]);
        let prune_flags = crate::prune::consumer_flags();
        if self.opts.faults.iter().any(|f| f == "prune") {
            args.extend(prune_flags.iter().map(String::as_str));
        }
        let env = [
            (ENV_SCHEMA, w.schema.clone()),
            (ENV_DELAY_US, self.opts.handler_delay_us.to_string()),
        ];
        let child = spawn(&w.exe, &log, &args, &env)?;
        self.log(format!(
            "consumer {number} started (batch size {batch_size})"
        ));
        self.procs.push(Proc {
            number,
            child,
            log,
            stopped: false,
        });
        Ok(())
    }

    /// A running, not frozen consumer, chosen by the seed among those that own partitions in
    /// the database (the `owner` column of `consumer_offsets` holds the owner's pid), if any
    /// do.
    fn pick_running(&mut self, frozen: Option<u32>) -> Option<usize> {
        let owners = self.world.owner_pids(&self.group, &self.topic);
        let mut candidates: Vec<usize> = (0..self.procs.len())
            .filter(|&i| Some(self.procs[i].number) != frozen && !self.procs[i].stopped)
            .collect();
        let owning: Vec<usize> = candidates
            .iter()
            .copied()
            .filter(|&i| owners.contains(&self.procs[i].pid()))
            .collect();
        if !owning.is_empty() {
            candidates = owning;
        }
        if candidates.is_empty() {
            return None;
        }
        Some(candidates[self.rng.below(candidates.len() as u64) as usize])
    }

    /// Sleeps until `until`, replacing any consumer that exits on its own (as a supervisor
    /// would); the exit is counted and noted.
    fn supervise_until(&mut self, until: Instant) -> anyhow::Result<()> {
        loop {
            if INTERRUPTED.load(Ordering::SeqCst) {
                bail!(
                    "interrupted (Ctrl-C); consumer logs are in {}",
                    self.dir.display()
                );
            }
            self.poll_replay()?;
            let mut i = 0;
            while i < self.procs.len() {
                if let Some(status) = self.procs[i].exited() {
                    let p = self.procs.remove(i);
                    self.exits += 1;
                    self.log(format!("consumer {} exited by itself ({status})", p.number));
                    let tail = last_lines(&p.log, 2);
                    self.notes.push(format!(
                        "consumer {} exited by itself ({status}); replaced. Its last words: {tail}",
                        p.number
                    ));
                    if self.exits > 20 {
                        bail!(
                            "consumers keep exiting ({} so far); see {}",
                            self.exits,
                            p.log.display()
                        );
                    }
                    self.start_consumer()?;
                } else {
                    i += 1;
                }
            }
            let now = Instant::now();
            if now >= until {
                return Ok(());
            }
            std::thread::sleep((until - now).min(Duration::from_millis(100)));
        }
    }

    /// Starts `chaos consumer replay --from earliest` (attempt `attempt`) while the consumers
    /// run, without waiting for it: a replay waits for the row locks of open transactions,
    /// including a frozen consumer's, so the schedule must go on (and thaw it).
    fn start_replay(&mut self, attempt: u32) -> anyhow::Result<()> {
        let w = self.world;
        let log = self.dir.join(format!("replay-{attempt}.log"));
        let mut args = self.program_args("replay");
        args.extend(["--from", "earliest"]);
        let child = spawn(&w.exe, &log, &args, &[])?;
        self.log(format!(
            "replay --from earliest started (attempt {attempt})"
        ));
        self.replaying = Some(Proc {
            number: attempt,
            child,
            log,
            stopped: false,
        });
        Ok(())
    }

    /// Notices the end of a replay, and retries a failed one (up to 5 attempts; the group
    /// may not have stored offsets yet, or the database may be restarting).
    fn poll_replay(&mut self) -> anyhow::Result<()> {
        if let Some(r) = &mut self.replaying {
            let Some(status) = r.exited() else {
                return Ok(());
            };
            let attempt = r.number;
            let tail = last_lines(&r.log, 1);
            self.replaying = None;
            if status.success() {
                self.replays += 1;
                self.log(format!("replay done: {tail}"));
            } else if crate::prune::refused_below_floor(&tail) {
                self.refused += 1;
                self.log(format!("replay refused below a ledger floor: {tail}"));
            } else if attempt < 5 {
                self.log(format!(
                    "replay attempt {attempt} failed ({status}): {tail}"
                ));
                self.replay_retry = Some((Instant::now() + Duration::from_secs(1), attempt + 1));
            } else {
                self.notes
                    .push(format!("replay failed {attempt} times; the last: {tail}"));
            }
        } else if let Some((at, attempt)) = self.replay_retry
            && Instant::now() >= at
        {
            self.replay_retry = None;
            self.start_replay(attempt)?;
        }
        Ok(())
    }

    /// Whether a replay is running or about to be retried.
    fn replay_pending(&self) -> bool {
        self.replaying.is_some() || self.replay_retry.is_some()
    }

    /// SIGTERM to every consumer (SIGCONT first to a frozen one); SIGKILL after 30 s.
    fn stop_all(&mut self) {
        for p in &mut self.procs {
            if p.stopped {
                let _ = p.signal("CONT");
                p.stopped = false;
            }
            let _ = p.signal("TERM");
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        for p in &mut self.procs {
            loop {
                if let Some(status) = p.exited() {
                    if !status.success() {
                        self.notes.push(format!(
                            "consumer {} stopped with {status}: {}",
                            p.number,
                            last_lines(&p.log, 2)
                        ));
                    }
                    break;
                }
                if Instant::now() > deadline {
                    self.notes.push(format!(
                        "consumer {} did not stop within 30 s of SIGTERM; killed",
                        p.number
                    ));
                    let _ = p.child.kill();
                    let _ = p.child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        self.procs.clear();
        self.replaying = None;
    }

    /// `ledger prune` from outside, as cron would, beside the consumers' own pruning.
    fn prune_from_outside(&mut self) -> anyhow::Result<()> {
        let w = self.world;
        let mut args = vec!["ledger"];
        let flags = crate::prune::cron_flags();
        args.extend(flags.iter().map(String::as_str));
        args.extend(["--database-url", &w.url, "--schema", &w.schema]);
        let log = self.dir.join("ledger-prune.log");
        let (status, tail) = run_tool(&w.exe, &log, &args, Duration::from_secs(60))?;
        if status.success() {
            self.log(format!("ledger prune: {tail}"));
        } else {
            self.notes
                .push(format!("ledger prune failed ({status}): {tail}"));
        }
        Ok(())
    }

    /// After the trial: once a floor exists, `replay --from earliest` must be refused, naming
    /// the floor, and change nothing.
    fn replay_below_floor_is_refused(&mut self, ends: &HashMap<i32, i64>) -> anyhow::Result<()> {
        let w = self.world;
        let sql = format!(
            "SELECT count(*) FROM {}.consumer_offsets WHERE consumer_group = $1 AND ledger_floor > 0",
            w.schema
        );
        let floors: i64 = w.rt.block_on(
            sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
                .bind(&self.group)
                .fetch_one(&w.pool),
        )?;
        if floors == 0 {
            self.notes
                .push("prune: no ledger floor yet, so no replay had to be refused".to_owned());
            return Ok(());
        }
        let mut args = self.program_args("replay");
        args.extend(["--from", "earliest"]);
        let log = self.dir.join("replay-below-floor.log");
        let (status, tail) = run_tool(&w.exe, &log, &args, Duration::from_secs(60))?;
        let unchanged = w
            .stored_offsets(&self.group, &self.topic)
            .is_some_and(|stored| ends.iter().all(|(p, end)| stored.get(p) == Some(end)));
        if status.success() || !crate::prune::refused_below_floor(&tail) || !unchanged {
            // A failure of the check: counted as lost, so that the trial fails.
            self.notes.push(format!(
                "FAILED: a replay below the ledger floor was not refused, or moved offsets ({status}): {tail}"
            ));
            self.refused_check_failed = true;
        } else {
            self.refused += 1;
            self.log(format!("replay below the floor refused: {tail}"));
        }
        Ok(())
    }

    /// The ids of events applied more than once whose applications lie further apart than the
    /// retention.
    fn beyond_retention(&self) -> anyhow::Result<HashSet<String>> {
        let w = self.world;
        let sql = crate::prune::beyond_retention_sql(&w.schema);
        let rows: Vec<String> = w.rt.block_on(
            sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
                .bind(i64::from(self.trial))
                .fetch_all(&w.pool),
        )?;
        Ok(rows.into_iter().collect())
    }

    /// The effects of this trial and the event ids of the group's dead letters (and how many
    /// have none).
    #[allow(clippy::type_complexity)]
    fn read_results(&self) -> anyhow::Result<(HashMap<String, i64>, HashSet<String>, usize)> {
        let w = self.world;
        let effects_sql = format!(
            "SELECT event_id, applied FROM {}.chaos_effects WHERE trial = $1",
            w.schema
        );
        let parked_sql = format!(
            "SELECT event_id FROM {}.dead_letters WHERE consumer_group = $1",
            w.schema
        );
        let mut last_error = None;
        // The server may just be coming back from its restart.
        for _ in 0..30 {
            let result = w.rt.block_on(async {
                let effects = sqlx::query(sqlx::AssertSqlSafe(effects_sql.clone()))
                    .bind(i64::from(self.trial))
                    .fetch_all(&w.pool)
                    .await?;
                let parked = sqlx::query(sqlx::AssertSqlSafe(parked_sql.clone()))
                    .bind(&self.group)
                    .fetch_all(&w.pool)
                    .await?;
                Ok::<_, sqlx::Error>((effects, parked))
            });
            match result {
                Ok((effects, parked)) => {
                    let effects = effects
                        .iter()
                        .map(|r| (r.get::<String, _>(0), i64::from(r.get::<i32, _>(1))))
                        .collect();
                    let mut ids = HashSet::new();
                    let mut none = 0;
                    for r in &parked {
                        match r.get::<Option<String>, _>(0) {
                            Some(id) => {
                                ids.insert(id);
                            }
                            None => none += 1,
                        }
                    }
                    return Ok((effects, ids, none));
                }
                Err(e) => {
                    last_error = Some(e);
                    std::thread::sleep(Duration::from_millis(500));
                }
            }
        }
        Err(last_error.map_or_else(
            || anyhow::anyhow!("reading the results failed"),
            anyhow::Error::from,
        ))
        .context("reading chaos_effects and dead_letters")
    }

    /// Lines containing `needle` in this trial's consumer logs.
    fn count_in_logs(&self, needle: &str) -> usize {
        std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("consumer-"))
            .map(|e| {
                std::fs::read_to_string(e.path())
                    .unwrap_or_default()
                    .lines()
                    .filter(|l| l.contains(needle))
                    .count()
            })
            .sum()
    }
}

/// The last `n` lines of a log, joined.
pub(crate) fn last_lines(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

/// Produces `records` with their id in the `event-id` header and as the key (unless they have
/// a key of their own), and waits until
/// all are acknowledged.
pub(crate) fn produce(producer: &BaseProducer, topic: &str, records: &[Rec]) -> anyhow::Result<()> {
    for r in records {
        let headers = OwnedHeaders::new().insert(Header {
            key: "event-id",
            value: Some(r.id.as_bytes()),
        });
        loop {
            let record = BaseRecord::to(topic)
                .partition(r.partition)
                .key(r.key.as_deref().unwrap_or(&r.id))
                .payload(r.payload.as_str())
                .headers(headers.clone());
            match producer.send(record) {
                Ok(()) => break,
                Err((e, _)) if e.rdkafka_error_code() == Some(RDKafkaErrorCode::QueueFull) => {
                    producer.poll(Duration::from_millis(10));
                }
                Err((e, _)) => return Err(e).context("producing a record"),
            }
        }
        producer.poll(Duration::ZERO);
    }
    producer
        .flush(Duration::from_secs(30))
        .context("flushing the producer")
}

/// The topic (and consumer group) of trial `key` with `seed`.
fn trial_topic(key: u32, seed: u64) -> String {
    format!("chaos-{key}-{seed}")
}

/// `chaos mock-broker TOPIC PARTITIONS` (hidden): the trial's mock cluster, in a child
/// process, so that a crash of the mock cluster ends one trial attempt, not the run.
pub(crate) fn mock_broker(args: Vec<std::ffi::OsString>) -> anyhow::Result<()> {
    let [topic, partitions] = args.as_slice() else {
        bail!("usage: chaos mock-broker TOPIC PARTITIONS");
    };
    let topic = topic.to_str().context("the topic is not UTF-8")?;
    let partitions: i32 = partitions
        .to_str()
        .and_then(|p| p.parse().ok())
        .context("PARTITIONS must be a whole number")?;
    mock_broker::serve(Some((topic, partitions)))
}
