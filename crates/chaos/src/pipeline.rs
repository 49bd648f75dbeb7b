//! `chaos --pipeline`: the transactional outbox end to end, under faults.
//!
//! Events enter topic `in`. Consumer service A (`chaos consumer run` with `CHAOS_ROLE=a`)
//! applies each with a non-idempotent effect (`chaos_effects`) and writes an outbox row for
//! topic `mid` in the same transaction. Several relay processes (`chaos consumer relay`) share
//! the outbox's lanes and publish to `mid`. Consumer service B (`CHAOS_ROLE=b`) applies each
//! `mid` event with a non-idempotent effect (`chaos_effects_b`, counted by the `in` event it
//! came from). Meanwhile: SIGKILL of relays and consumers, SIGSTOP of a relay past its lane
//! lease and of a consumer past its session timeout, a PostgreSQL restart, a broker outage.
//!
//! The check: every `in` event has exactly one effect in A and exactly one in B; in `mid`,
//! the first occurrences of each key's events come in the key's order; the duplicates the
//! relays produced in `mid` (expected: at-least-once) are counted and shown, and B's ledger
//! must have suppressed them.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use consumer_runtime::rdkafka::Message as _;
use consumer_runtime::rdkafka::config::ClientConfig;
use consumer_runtime::rdkafka::consumer::{BaseConsumer, Consumer as _};
use consumer_runtime::rdkafka::message::Headers as _;
use consumer_runtime::rdkafka::producer::{BaseProducer, Producer as _};
use consumer_runtime::rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use consumer_runtime::sqlx::{self, Row};

use crate::Options;
use crate::consumer::{ENV_DELAY_US, ENV_MID_TOPIC, ENV_ROLE, ENV_SCHEMA};
use crate::harness::{
    BrokerRetries, HEARTBEAT, INTERRUPTED, Proc, Rec, SESSION_TIMEOUT, WAVE_GAP, WAVES, World,
    last_lines, on_a_broker_that_lives, produce, seed_of, spawn,
};
use crate::rng::{Rng, mix};
use testkit::mock_broker::{BrokerCommand, MockBroker};
use testkit::private_pg::Stop;

/// The relays' lane lease: a relay frozen for longer has lost its lanes.
pub(crate) const RELAY_LEASE: Duration = Duration::from_millis(3000);
/// The outbox's lanes (the relays' unit of work and of order).
const LANES: u32 = 8;

/// Runs the pipeline trials; `Ok(false)` if any event was lost, duplicated or out of order.
pub(crate) fn run(opts: Options) -> anyhow::Result<bool> {
    let seed = seed_of(&opts);
    let world = World::new(&opts, seed)?;
    let faults: Vec<&str> = opts
        .faults
        .iter()
        .map(String::as_str)
        .filter(|f| *f != "replay")
        .collect();
    println!(
        "chaos --pipeline: seed={seed} trials={} events={} partitions={} consumers={}+{} relays={} lanes={LANES} faults={} guarantee={} database={}{}",
        opts.trials,
        opts.events,
        opts.partitions,
        opts.consumers,
        opts.consumers,
        opts.relays,
        faults.join(","),
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
    if opts.faults.iter().any(|f| f == "replay") {
        println!("  (the replay fault belongs to the plain mode and is not injected here)");
    }
    let mut total = Totals::default();
    let mut failed_dirs = Vec::new();
    let mut retries = BrokerRetries::new(opts.trials);
    for trial in 1..=opts.trials {
        let (key, trial_seed) = (trial, mix(seed ^ mix(u64::from(trial)) ^ 0x0b1e));
        let (result, trial_seed) = on_a_broker_that_lives(
            (trial, opts.trials, seed),
            (key, trial_seed),
            &mut retries,
            (
                |key| world.dir.join(format!("pipeline-{key}")),
                "topics and groups",
            ),
            |key, trial_seed| {
                let in_topic = format!("pipe-{key}-{trial_seed}-in");
                let mut broker =
                    MockBroker::start(&["mock-broker", &in_topic, &opts.partitions.to_string()])?;
                let outcome = PTrial::run(&world, &opts, key, trial_seed, &mut broker);
                Ok((broker, outcome))
            },
        )?;
        total.add(&result);
        println!(
            "trial {trial}/{} seed={trial_seed} events={} producer_dups={} kills={} frozen_relays={} frozen_consumers={} pg_restarts={} broker_outages={} relay_lanes_fenced={} consumer_commits_fenced={} exits={} mid_records={} mid_duplicates={} order_violations={} lost={} duplicated={} wall={:.1}s",
            opts.trials,
            opts.events,
            result.dups,
            result.kills,
            result.frozen_relays,
            result.frozen_consumers,
            result.pg_restarts,
            result.outages,
            result.relay_fenced,
            result.fenced,
            result.exits,
            result.mid_records,
            result.mid_duplicates,
            result.order_violations,
            result.lost,
            result.duplicated,
            result.wall.as_secs_f64()
        );
        crate::harness::finish_trial(
            trial,
            &crate::harness::TrialLogs {
                notes: &result.notes,
                dir: &result.dir,
                failed: result.failed(),
                exits: result.exits,
                kind: "logs",
            },
            opts.keep_logs,
            &mut failed_dirs,
        );
    }
    if retries.crashes > 0 {
        println!("mock broker crashes (trials repeated): {}", retries.crashes);
    }
    println!(
        "trials={} lost={} duplicated={} order_violations={} mid_duplicates={} (relay duplicates in mid, suppressed by B's ledger)",
        opts.trials, total.lost, total.duplicated, total.order_violations, total.mid_duplicates
    );
    let ok = total.lost == 0
        && total.duplicated == 0
        && total.order_violations == 0
        && failed_dirs.is_empty();
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

#[derive(Default)]
struct Totals {
    lost: u64,
    duplicated: u64,
    order_violations: u64,
    mid_duplicates: u64,
}

impl Totals {
    fn add(&mut self, o: &Outcome) {
        self.lost += o.lost;
        self.duplicated += o.duplicated;
        self.order_violations += o.order_violations;
        self.mid_duplicates += o.mid_duplicates;
    }
}

/// What one trial found.
struct Outcome {
    dir: PathBuf,
    dups: usize,
    kills: u32,
    frozen_relays: u32,
    frozen_consumers: u32,
    pg_restarts: String,
    outages: u32,
    exits: u32,
    /// Lanes a relay lost to another (its log's "lost the lane" lines).
    relay_fenced: usize,
    /// Consumers' stale commits refused.
    fenced: usize,
    mid_records: u64,
    mid_duplicates: u64,
    order_violations: u64,
    lost: u64,
    duplicated: u64,
    timed_out: bool,
    wall: Duration,
    notes: Vec<String>,
}

impl Outcome {
    fn failed(&self) -> bool {
        self.lost > 0 || self.duplicated > 0 || self.order_violations > 0 || self.timed_out
    }
}

/// A process's part in the pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    A,
    B,
    Relay,
}

impl Part {
    fn name(self) -> &'static str {
        match self {
            Part::A => "consumer-a",
            Part::B => "consumer-b",
            Part::Relay => "relay",
        }
    }
}

/// A fault or a wave, at a moment of the trial.
#[derive(Debug, Clone, Copy)]
enum Action {
    Wave(usize),
    Kill(Part),
    Freeze(Part),
    Thaw(u32),
    RestartPg(Stop),
    BrokerDown,
    BrokerUp,
}

/// One pipeline trial's state.
struct PTrial<'w> {
    world: &'w World,
    opts: &'w Options,
    trial: u32,
    dir: PathBuf,
    in_topic: String,
    mid_topic: String,
    group_a: String,
    group_b: String,
    bootstrap: String,
    rng: Rng,
    procs: Vec<(Part, Proc)>,
    spawned: u32,
    exits: u32,
    notes: Vec<String>,
    schedule: Vec<String>,
    started: Instant,
}

/// The keys of a trial's events: about 30 events per key.
fn key_count(events: u32) -> u32 {
    (events / 30).clamp(4, 500)
}

impl<'w> PTrial<'w> {
    fn log(&mut self, what: String) {
        self.schedule.push(format!(
            "{:7.2}s {what}",
            self.started.elapsed().as_secs_f64()
        ));
    }

    fn run(
        world: &'w World,
        opts: &'w Options,
        trial: u32,
        seed: u64,
        broker: &mut MockBroker,
    ) -> anyhow::Result<Outcome> {
        let started = Instant::now();
        let dir = world.dir.join(format!("pipeline-{trial}"));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let base = format!("pipe-{trial}-{seed}");
        let in_topic = format!("{base}-in");
        let mid_topic = format!("{base}-mid");
        broker
            .command(&BrokerCommand::CreateTopic(
                mid_topic.clone(),
                opts.partitions,
            ))
            .context("creating the mid topic")?;
        let mut t = PTrial {
            world,
            opts,
            trial,
            dir,
            group_a: format!("{base}-a"),
            group_b: format!("{base}-b"),
            in_topic,
            mid_topic,
            bootstrap: broker.bootstrap.clone(),
            rng: Rng::new(seed),
            procs: Vec::new(),
            spawned: 0,
            exits: 0,
            notes: Vec::new(),
            schedule: Vec::new(),
            started,
        };

        // The workload: events of a few keys, each key in one partition of `in` in its
        // order, about 10% of them sent a second time (a producer retry).
        let n = opts.events as usize;
        let keys = key_count(opts.events);
        let mut next_seq = vec![0u64; keys as usize];
        let mut keyed: Vec<(u64, Rec)> = Vec::with_capacity(n + n / 9);
        let mut dups = 0;
        for i in 0..n {
            let id = format!("p{trial}-e{i}");
            let k = t.rng.below(u64::from(keys)) as usize;
            let seq = next_seq[k];
            next_seq[k] += 1;
            let key = format!("k{k}");
            let partition = (mix(k as u64 ^ 0x6b65_7973) % opts.partitions as u64) as i32;
            let payload = format!(r#"{{"trial":{trial},"n":{i},"key":"{key}","seq":{seq}}}"#);
            if t.rng.chance(opts.dup_ratio) {
                dups += 1;
                let later = (i as u64 + 1 + t.rng.below(300)) * 2 + 1;
                keyed.push((
                    later,
                    Rec {
                        partition,
                        id: id.clone(),
                        key: Some(key.clone()),
                        payload: payload.clone(),
                    },
                ));
            }
            keyed.push((
                i as u64 * 2,
                Rec {
                    partition,
                    id,
                    key: Some(key),
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
        let ids: Vec<String> = (0..n).map(|i| format!("p{trial}-e{i}")).collect();

        // The schedule (seconds after the processes start). Every draw happens whatever
        // --faults says, so that a fault's moment depends on the seed alone.
        let fault = |name: &str| opts.faults.iter().any(|f| f == name);
        let mut plan: Vec<(f64, Action)> = (0..WAVES)
            .map(|w| (0.5 + w as f64 * WAVE_GAP, Action::Wave(w)))
            .collect();
        let consumer_part = |r: &mut Rng| if r.chance(0.5) { Part::A } else { Part::B };
        let (at_kill_relay, at_kill_consumer) = (t.rng.range(3.0, 10.0), t.rng.range(3.0, 10.0));
        let killed_part = consumer_part(&mut t.rng);
        if fault("kill") {
            plan.push((at_kill_relay, Action::Kill(Part::Relay)));
            plan.push((at_kill_consumer, Action::Kill(killed_part)));
        }
        let (at_freeze_relay, at_freeze_consumer) = (t.rng.range(3.0, 8.0), t.rng.range(4.0, 9.0));
        let frozen_part = consumer_part(&mut t.rng);
        if fault("zombie") {
            plan.push((at_freeze_relay, Action::Freeze(Part::Relay)));
            plan.push((at_freeze_consumer, Action::Freeze(frozen_part)));
        }
        let (at_pg, immediate) = (t.rng.range(5.0, 12.0), t.rng.chance(0.5));
        if world.pg.is_some() && fault("pg") {
            let how = if immediate {
                Stop::Immediate
            } else {
                Stop::Fast
            };
            plan.push((at_pg, Action::RestartPg(how)));
        }
        let (at_down, outage) = (t.rng.range(4.0, 11.0), t.rng.range(2.0, 4.0));
        if fault("broker") {
            plan.push((at_down, Action::BrokerDown));
            plan.push((at_down + outage, Action::BrokerUp));
        }
        // Past the lease (relay) or the session timeout (consumer), and long enough for the
        // others to take over and work: then it resumes as a zombie.
        let relay_freeze = RELAY_LEASE.as_secs_f64() * 2.0 + t.rng.range(1.0, 3.0);
        let consumer_freeze = SESSION_TIMEOUT.as_secs_f64() * 2.0 + t.rng.range(2.5, 5.0);

        for _ in 0..opts.relays {
            t.start(Part::Relay)?;
        }
        for _ in 0..opts.consumers {
            t.start(Part::A)?;
            t.start(Part::B)?;
        }
        let start = Instant::now();
        let producer: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", &t.bootstrap)
            .set("linger.ms", "5")
            .set("enable.idempotence", "true")
            .create()
            .context("creating the producer")?;
        let per_wave = records.len().div_ceil(WAVES);
        let (mut kills, mut frozen_relays, mut frozen_consumers, mut outages) = (0, 0, 0, 0);
        let mut pg_restarts = if world.pg.is_some() || !fault("pg") {
            "0".to_owned()
        } else {
            "skipped".to_owned()
        };
        let mut broker_down = false;
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
                    // During an outage the producer waits for the broker (its sends are
                    // retried); the schedule goes on only once the wave is acknowledged.
                    if broker_down {
                        t.log(format!("wave {w}: waits for the broker"));
                        let up = plan
                            .iter()
                            .position(|(_, a)| matches!(a, Action::BrokerUp))
                            .map(|i| plan.remove(i));
                        if let Some((up_at, _)) = up {
                            t.supervise_until(start + Duration::from_secs_f64(up_at))?;
                            broker.command(&BrokerCommand::BrokerUp)?;
                            broker_down = false;
                            t.log("broker up".to_owned());
                        }
                    }
                    produce(&producer, &t.in_topic, &records[lo..hi])?;
                    t.log(format!("wave {w}: {} records produced", hi - lo));
                }
                Action::Kill(part) => {
                    if let Some(i) = t.pick(part) {
                        let (part, mut p) = t.procs.remove(i);
                        p.child.kill().context("SIGKILL")?;
                        p.child.wait().context("reaping a killed process")?;
                        t.log(format!(
                            "SIGKILL {} {} (pid {})",
                            part.name(),
                            p.number,
                            p.pid()
                        ));
                        kills += 1;
                        t.start(part)?;
                    }
                }
                Action::Freeze(part) => {
                    if let Some(i) = t.pick(part) {
                        let for_s = if part == Part::Relay {
                            frozen_relays += 1;
                            relay_freeze
                        } else {
                            frozen_consumers += 1;
                            consumer_freeze
                        };
                        let (_, p) = &mut t.procs[i];
                        p.signal("STOP")?;
                        p.stopped = true;
                        let (number, pid) = (p.number, p.pid());
                        t.log(format!(
                            "SIGSTOP {} {number} (pid {pid}) for {for_s:.1}s",
                            part.name()
                        ));
                        plan.push((start.elapsed().as_secs_f64() + for_s, Action::Thaw(number)));
                    }
                }
                Action::Thaw(number) => {
                    if let Some((part, p)) = t.procs.iter_mut().find(|(_, p)| p.number == number) {
                        p.signal("CONT")?;
                        p.stopped = false;
                        let line = format!("SIGCONT {} {number} (pid {})", part.name(), p.pid());
                        t.log(line);
                    }
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
                Action::BrokerDown => {
                    broker.command(&BrokerCommand::BrokerDown)?;
                    broker_down = true;
                    outages += 1;
                    t.log(format!("broker down for {outage:.1}s"));
                }
                Action::BrokerUp => {
                    if broker_down {
                        broker.command(&BrokerCommand::BrokerUp)?;
                        broker_down = false;
                        t.log("broker up".to_owned());
                    }
                }
            }
        }
        // Every process runs again (none is left frozen).
        for (part, p) in &mut t.procs {
            if p.stopped {
                p.signal("CONT")?;
                p.stopped = false;
                t.schedule
                    .push(format!("late SIGCONT {} {}", part.name(), p.number));
            }
        }

        // Catch up: A at the end of `in`, the outbox drained, B at the end of `mid` and
        // `mid` no longer growing.
        let deadline = Instant::now() + Duration::from_secs(opts.deadline);
        let mut timed_out = false;
        let mut stable_since: Option<(HashMap<i32, i64>, Instant)> = None;
        loop {
            if t.caught_up(&ends, &producer, &mut stable_since) {
                break;
            }
            if Instant::now() > deadline {
                timed_out = true;
                let a = world.stored_offsets(&t.group_a, &t.in_topic);
                let b = world.stored_offsets(&t.group_b, &t.mid_topic);
                let backlog = t.outbox_backlog();
                t.notes.push(format!(
                    "timed out after {}s: A's offsets {a:?} (ends {ends:?}), outbox backlog {backlog:?}, B's offsets {b:?} (mid ends {:?})",
                    opts.deadline,
                    stable_since.as_ref().map(|s| &s.0)
                ));
                break;
            }
            t.supervise_until(Instant::now() + Duration::from_millis(200))?;
        }
        t.log("caught up (or timed out); SIGTERM to every process".to_owned());
        t.stop_all();

        // The check.
        let effects_a = t.effects("chaos_effects")?;
        let effects_b = t.effects("chaos_effects_b")?;
        let mid = read_topic(&t.bootstrap, &t.mid_topic, opts.partitions)?;
        let (mut lost, mut duplicated) = (0u64, 0u64);
        let mut examples = Vec::new();
        for id in &ids {
            for (service, effects) in [("A", &effects_a), ("B", &effects_b)] {
                let applied = effects.get(id).copied().unwrap_or(0);
                if applied != 1 {
                    if applied == 0 {
                        lost += 1;
                    } else {
                        duplicated += 1;
                    }
                    if examples.len() < 8 {
                        examples.push(format!("{id} applied {applied}x in {service}"));
                    }
                }
            }
        }
        let known: HashSet<&String> = ids.iter().collect();
        for (service, effects) in [("A", &effects_a), ("B", &effects_b)] {
            let strangers = effects.keys().filter(|k| !known.contains(k)).count();
            if strangers > 0 {
                t.notes.push(format!(
                    "{strangers} effects in {service} for events never produced"
                ));
            }
        }
        if !examples.is_empty() {
            t.notes.push(format!("e.g. {}", examples.join("; ")));
        }
        let verdict = mid.verdict();
        for note in &verdict.notes {
            t.notes.push(note.clone());
        }
        if verdict.sources != n as u64 {
            t.notes.push(format!(
                "mid holds events of {} distinct `in` events, {n} were produced",
                verdict.sources
            ));
        }
        if !timed_out && verdict.sources != n as u64 {
            lost += (n as u64).saturating_sub(verdict.sources);
        }
        let schedule = t.schedule.join("\n") + "\n";
        let _ = std::fs::write(t.dir.join("schedule.txt"), schedule);
        let relay_fenced = t.count_in_logs("relay-", "lost the lane to another relay");
        let fenced = t.count_in_logs("consumer-", "commit fenced");
        Ok(Outcome {
            relay_fenced,
            fenced,
            dir: t.dir.clone(),
            dups,
            kills,
            frozen_relays,
            frozen_consumers,
            pg_restarts,
            outages,
            exits: t.exits,
            mid_records: verdict.records,
            mid_duplicates: verdict.duplicates,
            order_violations: verdict.order_violations,
            lost,
            duplicated,
            timed_out,
            wall: started.elapsed(),
            notes: std::mem::take(&mut t.notes),
        })
    }

    /// Whether the pipeline has drained; `stable` remembers `mid`'s ends and since when they
    /// have not moved.
    fn caught_up(
        &mut self,
        ends: &HashMap<i32, i64>,
        producer: &BaseProducer,
        stable: &mut Option<(HashMap<i32, i64>, Instant)>,
    ) -> bool {
        let w = self.world;
        let a_done = w
            .stored_offsets(&self.group_a, &self.in_topic)
            .is_some_and(|s| ends.iter().all(|(p, end)| s.get(p) == Some(end)));
        if !a_done || self.outbox_backlog() != Some(0) {
            *stable = None;
            return false;
        }
        let mut mid_ends = HashMap::new();
        for p in 0..self.opts.partitions {
            match producer
                .client()
                .fetch_watermarks(&self.mid_topic, p, Duration::from_secs(2))
            {
                Ok((_, high)) => {
                    mid_ends.insert(p, high);
                }
                Err(_) => {
                    *stable = None;
                    return false;
                }
            }
        }
        match stable {
            Some((seen, since)) if *seen == mid_ends => {
                if since.elapsed() < Duration::from_secs(2) {
                    return false;
                }
            }
            _ => {
                *stable = Some((mid_ends, Instant::now()));
                return false;
            }
        }
        w.stored_offsets(&self.group_b, &self.mid_topic)
            .is_some_and(|s| {
                mid_ends
                    .iter()
                    .all(|(p, end)| *end == 0 || s.get(p) == Some(end))
            })
    }

    /// The outbox rows not yet published (`None` while the database does not answer).
    fn outbox_backlog(&self) -> Option<i64> {
        let w = self.world;
        let sql = format!(
            "SELECT count(*) FROM {}.outbox WHERE aggregatetype = $1 AND published_at IS NULL AND parked_at IS NULL",
            w.schema
        );
        w.rt.block_on(
            sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(sql))
                .bind(&self.mid_topic)
                .fetch_one(&w.pool),
        )
        .ok()
    }

    /// Starts one more process of `part`.
    fn start(&mut self, part: Part) -> anyhow::Result<()> {
        self.spawned += 1;
        let number = self.spawned;
        let w = self.world;
        let log = self.dir.join(format!("{}-{number}.log", part.name()));
        let client_id = format!("client.id=pipe-{}-{}-{number}", self.trial, part.name());
        let session = format!("session.timeout.ms={}", SESSION_TIMEOUT.as_millis());
        let lease = format!("{}ms", RELAY_LEASE.as_millis());
        let lanes = LANES.to_string();
        let batch_size = self.rng.pick(&[1u32, 10, 50, 200]).to_string();
        let (group, topic, role) = match part {
            Part::A => (&self.group_a, &self.in_topic, "a"),
            Part::B => (&self.group_b, &self.mid_topic, "b"),
            Part::Relay => (&self.group_a, &self.in_topic, ""),
        };
        let mut args: Vec<&str> = vec![
            "--database-url",
            &w.url,
            "-b",
            &self.bootstrap,
            "--schema",
            &w.schema,
        ];
        if part == Part::Relay {
            args.insert(0, "relay");
            args.extend([
                "--lanes",
                &lanes,
                "--lease",
                &lease,
                "--poll-interval",
                "200ms",
                "-X",
                &client_id,
            ]);
        } else {
            args.insert(0, "run");
            args.extend([
                "-g",
                group,
                "-t",
                topic,
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
        }
        let env = [
            (ENV_SCHEMA, w.schema.clone()),
            (ENV_DELAY_US, self.opts.handler_delay_us.to_string()),
            (ENV_ROLE, role.to_owned()),
            (ENV_MID_TOPIC, self.mid_topic.clone()),
        ];
        let child = spawn(&w.exe, &log, &args, &env)?;
        let what = if part == Part::Relay {
            String::new()
        } else {
            format!(" (batch size {batch_size})")
        };
        self.log(format!("{} {number} started{what}", part.name()));
        self.procs.push((
            part,
            Proc {
                number,
                child,
                log,
                stopped: false,
            },
        ));
        Ok(())
    }

    /// A running, not frozen process of `part`, chosen by the seed.
    fn pick(&mut self, part: Part) -> Option<usize> {
        let candidates: Vec<usize> = (0..self.procs.len())
            .filter(|&i| self.procs[i].0 == part && !self.procs[i].1.stopped)
            .collect();
        if candidates.is_empty() {
            return None;
        }
        Some(candidates[self.rng.below(candidates.len() as u64) as usize])
    }

    /// Sleeps until `until`, replacing any process that exits on its own.
    fn supervise_until(&mut self, until: Instant) -> anyhow::Result<()> {
        loop {
            if INTERRUPTED.load(Ordering::SeqCst) {
                bail!("interrupted (Ctrl-C); logs are in {}", self.dir.display());
            }
            let mut i = 0;
            while i < self.procs.len() {
                if let Some(status) = self.procs[i].1.exited() {
                    let (part, p) = self.procs.remove(i);
                    self.exits += 1;
                    self.log(format!(
                        "{} {} exited by itself ({status})",
                        part.name(),
                        p.number
                    ));
                    let tail = last_lines(&p.log, 2);
                    self.notes.push(format!(
                        "{} {} exited by itself ({status}); replaced. Its last words: {tail}",
                        part.name(),
                        p.number
                    ));
                    if self.exits > 20 {
                        bail!(
                            "processes keep exiting ({} so far); see {}",
                            self.exits,
                            p.log.display()
                        );
                    }
                    self.start(part)?;
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

    /// SIGTERM to every process (SIGCONT first to a frozen one); SIGKILL after 30 s.
    fn stop_all(&mut self) {
        for (_, p) in &mut self.procs {
            if p.stopped {
                let _ = p.signal("CONT");
                p.stopped = false;
            }
            let _ = p.signal("TERM");
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        for (part, p) in &mut self.procs {
            loop {
                if let Some(status) = p.exited() {
                    if !status.success() {
                        self.notes.push(format!(
                            "{} {} stopped with {status}: {}",
                            part.name(),
                            p.number,
                            last_lines(&p.log, 2)
                        ));
                    }
                    break;
                }
                if Instant::now() > deadline {
                    self.notes.push(format!(
                        "{} {} did not stop within 30 s of SIGTERM; killed",
                        part.name(),
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
    }

    /// Lines containing `needle` in this trial's logs whose names start with `prefix`.
    fn count_in_logs(&self, prefix: &str, needle: &str) -> usize {
        std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
            .map(|e| {
                std::fs::read_to_string(e.path())
                    .unwrap_or_default()
                    .lines()
                    .filter(|l| l.contains(needle))
                    .count()
            })
            .sum()
    }

    /// This trial's rows of an effects table: event id → applications.
    fn effects(&self, table: &str) -> anyhow::Result<HashMap<String, i64>> {
        let w = self.world;
        let sql = format!(
            "SELECT event_id, applied FROM {}.{table} WHERE trial = $1",
            w.schema
        );
        let mut last_error = None;
        for _ in 0..30 {
            let rows = w.rt.block_on(
                sqlx::query(sqlx::AssertSqlSafe(sql.clone()))
                    .bind(i64::from(self.trial))
                    .fetch_all(&w.pool),
            );
            match rows {
                Ok(rows) => {
                    return Ok(rows
                        .iter()
                        .map(|r| (r.get::<String, _>(0), i64::from(r.get::<i32, _>(1))))
                        .collect());
                }
                Err(e) => {
                    last_error = Some(e);
                    std::thread::sleep(Duration::from_millis(500));
                }
            }
        }
        Err(last_error.map_or_else(
            || anyhow::anyhow!("reading {table} failed"),
            anyhow::Error::from,
        ))
        .with_context(|| format!("reading {table}"))
    }
}

/// One record of `mid`, as the harness reads it back.
struct MidRecord {
    partition: i32,
    event_id: Option<String>,
    key: String,
    seq: u64,
    src: String,
}

/// Everything in `mid`, per partition in offset order.
struct Mid {
    records: Vec<MidRecord>,
}

/// What `mid` shows.
struct MidVerdict {
    records: u64,
    /// Records whose event id appeared before (relay republishing).
    duplicates: u64,
    /// Keys whose first occurrences are not in the key's order (each such step counts).
    order_violations: u64,
    /// Distinct `in` events seen in `mid`.
    sources: u64,
    notes: Vec<String>,
}

impl Mid {
    fn verdict(&self) -> MidVerdict {
        let mut seen_ids = HashSet::new();
        let mut sources: HashMap<&str, &str> = HashMap::new();
        let mut last_seq: HashMap<&str, u64> = HashMap::new();
        let mut key_partition: HashMap<&str, i32> = HashMap::new();
        let (mut duplicates, mut order_violations) = (0u64, 0u64);
        let mut notes = Vec::new();
        let mut examples = Vec::new();
        let mut missing_ids = 0;
        let mut split_keys = 0;
        let mut two_ids = 0;
        for r in &self.records {
            let Some(id) = r.event_id.as_deref() else {
                missing_ids += 1;
                continue;
            };
            if *key_partition.entry(&r.key).or_insert(r.partition) != r.partition {
                split_keys += 1;
            }
            if !seen_ids.insert(id) {
                duplicates += 1;
                continue;
            }
            // A first occurrence: its key's events must come in order.
            if let Some(prev) = sources.insert(&r.src, id)
                && prev != id
            {
                two_ids += 1;
            }
            match last_seq.get(r.key.as_str()) {
                Some(&last) if r.seq <= last => {
                    order_violations += 1;
                    if examples.len() < 5 {
                        examples.push(format!("key {} seq {} after seq {last}", r.key, r.seq));
                    }
                }
                _ => {
                    last_seq.insert(&r.key, r.seq);
                }
            }
        }
        if missing_ids > 0 {
            notes.push(format!(
                "{missing_ids} records in mid without an event-id header"
            ));
        }
        if split_keys > 0 {
            notes.push(format!(
                "{split_keys} records in mid in another partition than their key's first"
            ));
        }
        if two_ids > 0 {
            notes.push(format!(
                "{two_ids} `in` events reached mid under two different event ids (two outbox rows)"
            ));
        }
        if !examples.is_empty() {
            notes.push(format!("order: {}", examples.join("; ")));
        }
        MidVerdict {
            records: self.records.len() as u64,
            duplicates,
            order_violations,
            sources: sources.len() as u64,
            notes,
        }
    }
}

/// Reads every record of `topic` (its partitions from the beginning to their high
/// watermarks).
fn read_topic(bootstrap: &str, topic: &str, partitions: i32) -> anyhow::Result<Mid> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("{topic}-check"))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .create()
        .context("creating the checking consumer")?;
    let mut ends = HashMap::new();
    let mut list = TopicPartitionList::new();
    for p in 0..partitions {
        let (_, high) = consumer
            .fetch_watermarks(topic, p, Duration::from_secs(10))
            .context("reading mid's high watermarks")?;
        if high > 0 {
            ends.insert(p, high);
            list.add_partition_offset(topic, p, Offset::Beginning)?;
        }
    }
    let mut per_partition: HashMap<i32, Vec<MidRecord>> = HashMap::new();
    if !ends.is_empty() {
        consumer
            .assign(&list)
            .context("assigning mid's partitions")?;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let done = |pp: &HashMap<i32, Vec<MidRecord>>, next: &HashMap<i32, i64>| {
        ends.iter()
            .all(|(p, end)| next.get(p).copied().unwrap_or(0) >= *end && pp.contains_key(p))
    };
    let mut next: HashMap<i32, i64> = HashMap::new();
    while !done(&per_partition, &next) {
        if Instant::now() > deadline {
            bail!("reading mid back did not finish within 60 s");
        }
        let Some(message) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let m = message.context("reading mid back")?;
        next.insert(m.partition(), m.offset() + 1);
        let payload: serde_json::Value = m
            .payload()
            .and_then(|p| serde_json::from_slice(p).ok())
            .unwrap_or_default();
        let event_id = m.headers().and_then(|h| {
            h.iter()
                .find(|h| h.key == "event-id")
                .and_then(|h| h.value)
                .map(|v| String::from_utf8_lossy(v).into_owned())
        });
        per_partition
            .entry(m.partition())
            .or_default()
            .push(MidRecord {
                partition: m.partition(),
                event_id,
                key: payload["key"].as_str().unwrap_or_default().to_owned(),
                seq: payload["seq"].as_u64().unwrap_or(0),
                src: payload["src"].as_str().unwrap_or_default().to_owned(),
            });
    }
    let mut records = Vec::new();
    let mut parts: Vec<_> = per_partition.into_iter().collect();
    parts.sort_by_key(|(p, _)| *p);
    for (_, rs) in parts {
        records.extend(rs);
    }
    Ok(Mid { records })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(partition: i32, id: &str, key: &str, seq: u64) -> MidRecord {
        MidRecord {
            partition,
            event_id: Some(id.to_owned()),
            key: key.to_owned(),
            seq,
            src: format!("src-{id}"),
        }
    }

    #[test]
    fn a_republished_batch_is_counted_as_duplicates_not_as_disorder() {
        // The relay sent 1, 2, 3, crashed before marking 2 and 3, and sent 2, 3, 4 again.
        let mid = Mid {
            records: vec![
                rec(0, "e1", "k", 1),
                rec(0, "e2", "k", 2),
                rec(0, "e3", "k", 3),
                rec(0, "e2", "k", 2),
                rec(0, "e3", "k", 3),
                rec(0, "e4", "k", 4),
            ],
        };
        let v = mid.verdict();
        assert_eq!(
            (v.records, v.duplicates, v.order_violations, v.sources),
            (6, 2, 0, 4)
        );
    }

    #[test]
    fn a_first_occurrence_after_a_later_event_of_its_key_is_a_violation() {
        let mid = Mid {
            records: vec![
                rec(0, "e1", "k", 0),
                rec(0, "e3", "k", 2),
                rec(0, "e2", "k", 1),
                rec(1, "f1", "other", 0),
            ],
        };
        let v = mid.verdict();
        assert_eq!(v.order_violations, 1);
        assert_eq!(v.duplicates, 0);
    }
}
