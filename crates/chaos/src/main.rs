//! `chaos`: the crash-consistency program. It hosts a librdkafka mock cluster (in a child
//! process, one per trial), produces events
//! (with producer-side duplicates and poison records) while several consumer processes of a
//! handler with a non-idempotent effect consume them in one group, and injects faults at
//! seeded random moments: SIGKILL of a consumer, a SIGSTOP past the session timeout (a zombie
//! that must be fenced), a PostgreSQL restart and a replay from earliest. After each trial it
//! checks every event: applied exactly once, or parked if poison.
//!
//! ```text
//! cargo run --release --bin chaos -- --trials 20 --seed 42
//! ```
//!
//! The same binary is the consumer program: `chaos consumer run …` (and in `--pipeline` mode
//! `chaos consumer relay …`; hidden, the harness starts them).

mod consumer;
mod harness;
mod pipeline;
mod prune;
mod rng;

use std::process::ExitCode;

use clap::Parser;

/// The crash-consistency suite of consumer-runtime.
///
/// Each trial: a fresh topic and consumer group on a librdkafka mock cluster hosted by a child
/// process of this one (`chaos mock-broker`, one per trial); events produced in waves, about 10% of them sent twice (a producer retry: same
/// event id, same key) and about 2% poison (rejected by the handler, or not JSON); several
/// consumer processes (this binary, `chaos consumer run`) of a handler whose effect is NOT
/// idempotent (`applied = applied + 1` per event). At moments drawn from the seed one consumer
/// is killed with SIGKILL and replaced, one is frozen with SIGSTOP past the group's session
/// timeout and resumed (a zombie whose commits must be fenced), the private PostgreSQL server
/// is restarted (fast or immediate), and a replay from earliest runs while the consumers do.
/// Then every event is checked: applied exactly once, or parked in dead_letters if poison.
/// One line per trial, then `trials=N lost=L duplicated=D parked=P`; the exit status is 1 if L
/// or D is not 0 or a trial did not catch up within --deadline, 2 if the harness itself failed.
#[derive(Debug, Parser)]
#[command(name = "chaos", max_term_width = 100)]
pub(crate) struct Options {
    /// How many trials to run.
    #[arg(long, default_value_t = 5)]
    trials: u32,

    /// The seed of the workload and of the fault schedule (default: from the clock; printed, so
    /// that a run can be repeated). Process scheduling is not reproducible, so a repeated run
    /// injects the same faults at the same moments, not at the same records.
    #[arg(long)]
    seed: Option<u64>,

    /// Distinct events per trial (plus about 10% producer duplicates).
    #[arg(long, default_value_t = 3000, value_parser = clap::value_parser!(u32).range(10..))]
    events: u32,

    /// Partitions of each trial's topic.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(i32).range(1..=64))]
    partitions: i32,

    /// Consumer processes in the group.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=16))]
    consumers: u32,

    /// Use this existing PostgreSQL database instead of a private server (the runtime's tables
    /// go to a fresh schema, dropped after a passing run). PostgreSQL restarts are then skipped.
    #[arg(long, value_name = "URL")]
    database_url: Option<String>,

    /// Keep the consumers' logs of passing trials too (those of failing trials are always
    /// kept).
    #[arg(long)]
    keep_logs: bool,

    /// How long a trial may take to catch up after its faults, in seconds.
    #[arg(long, default_value_t = 120)]
    deadline: u64,

    /// The largest random delay of one handler call, in microseconds (widens crash windows).
    #[arg(long, default_value_t = 8000)]
    handler_delay_us: u64,

    /// The share of events produced a second time (a producer retry: same event id, same
    /// key, a little later in the same partition).
    #[arg(long, default_value_t = 0.10, value_parser = parse_ratio)]
    dup_ratio: f64,

    /// The share of poison events (half rejected by the handler, half not JSON).
    #[arg(long, default_value_t = 0.02, value_parser = parse_ratio)]
    poison_ratio: f64,

    /// The faults to inject, comma-separated: kill (SIGKILL a consumer and start a
    /// replacement), zombie (SIGSTOP one past the session timeout, then SIGCONT), pg (restart
    /// the private PostgreSQL, fast or immediate), replay (replay from earliest while the
    /// consumers run), prune (every consumer prunes the ledger with a 4 s retention, and the
    /// harness once more from outside, as cron would; a replay below a ledger floor must be
    /// refused, and an event applied twice counts as duplicated only if both applications
    /// lie within the retention); with --pipeline also broker (the broker down for 2 to 4 s), and kill
    /// and zombie hit relays too (a relay frozen past its lane lease). Default:
    /// kill,zombie,pg,replay, or kill,zombie,pg,broker with --pipeline.
    #[arg(long, value_delimiter = ',', value_parser = ["kill", "zombie", "pg", "replay", "prune", "broker"])]
    faults: Vec<String>,

    /// The transactional outbox end to end: events enter topic `in`; consumer service A
    /// applies each (a non-idempotent effect) and writes an outbox row in the same
    /// transaction; --relays relay processes publish the outbox to topic `mid`; consumer
    /// service B applies each `mid` event (a non-idempotent effect). Checks that every `in`
    /// event has exactly one effect in A and one in B and that per-key order holds in `mid`,
    /// and reports the relays' duplicates in `mid` (expected; B's ledger suppresses them).
    /// --consumers is then the count of each service's consumers.
    #[arg(long)]
    pipeline: bool,

    /// Relay processes in --pipeline mode.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=8))]
    relays: u32,

    /// The consumers' delivery guarantee, passed to `run --guarantee`. Only for showing that
    /// the check can fail: at-least-once applies producer duplicates, replayed records and a
    /// batch caught between its two commits (a kill, a zombie) twice; at-most-once loses a
    /// batch caught between its offset commit and its handler's.
    #[arg(long, default_value = "effectively-once", value_parser = ["effectively-once", "at-least-once", "at-most-once"])]
    guarantee: String,
}

fn parse_ratio(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err(format!("`{s}` is not a ratio from 0 to 1")),
    }
}

fn main() -> ExitCode {
    let mut args = std::env::args_os();
    let _program = args.next();
    let mut rest: Vec<_> = args.collect();
    if rest.first().is_some_and(|a| a == "consumer") {
        rest.remove(0);
        return consumer::main(rest);
    }
    if rest.first().is_some_and(|a| a == "mock-broker") {
        rest.remove(0);
        return match harness::mock_broker(rest) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::from(2)
            }
        };
    }
    let mut options = Options::parse();
    if options.faults.is_empty() {
        let default: &[&str] = if options.pipeline {
            &["kill", "zombie", "pg", "broker"]
        } else {
            &["kill", "zombie", "pg", "replay"]
        };
        options.faults = default.iter().map(|f| (*f).to_owned()).collect();
    }
    if !options.pipeline && options.faults.iter().any(|f| f == "broker") {
        eprintln!(
            "error: the broker fault is injected only with --pipeline; drop it from --faults or add --pipeline"
        );
        return ExitCode::from(2);
    }
    let result = if options.pipeline {
        pipeline::run(options)
    } else {
        harness::run(options)
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
