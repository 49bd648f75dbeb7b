//! What a run prints and writes: every run of every scenario, then (with `--repeat K`) each
//! scenario's median and range, the targets as met / NOT MET (ratios of medians), and the
//! same as JSON.

use anyhow::Context as _;
use consumer_runtime::DatabaseKind;

/// One measured run of one scenario.
pub(crate) struct Outcome {
    pub(crate) scenario: String,
    /// Which of the `--repeat` rounds (1-based).
    pub(crate) round: u32,
    pub(crate) messages: u64,
    pub(crate) seconds: f64,
    pub(crate) peak_rss_mb: f64,
    pub(crate) start_rss_mb: f64,
    /// CPU seconds of this process (all threads) during the timed window.
    pub(crate) process_cpu_s: f64,
    /// How busy the whole machine's CPUs were during the timed window, percent.
    pub(crate) machine_busy_pct: f64,
    /// A note printed under the table (how a scenario was measured, or why it was skipped).
    pub(crate) note: Option<String>,
}

impl Outcome {
    pub(crate) fn rate(&self) -> f64 {
        self.messages as f64 / self.seconds.max(1e-9)
    }

    pub(crate) fn cpu_us_per_msg(&self) -> f64 {
        1e6 * self.process_cpu_s / self.messages.max(1) as f64
    }
}

/// A scenario's runs, summarised: medians, and the range of the throughput.
pub(crate) struct Summary {
    pub(crate) scenario: String,
    pub(crate) runs: usize,
    pub(crate) messages: u64,
    pub(crate) rate_median: f64,
    pub(crate) rate_min: f64,
    pub(crate) rate_max: f64,
    pub(crate) seconds_median: f64,
    /// The highest peak of its runs.
    pub(crate) peak_rss_mb: f64,
    pub(crate) cpu_us_per_msg_median: f64,
    pub(crate) machine_busy_pct_median: f64,
}

/// The median of `v` (the mean of the two middle values for an even count); 0 when empty.
pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Each scenario's summary, in the order the scenarios first ran.
pub(crate) fn summarise(outcomes: &[Outcome]) -> Vec<Summary> {
    let mut names: Vec<&str> = Vec::new();
    for o in outcomes {
        if !names.contains(&o.scenario.as_str()) {
            names.push(&o.scenario);
        }
    }
    names
        .into_iter()
        .map(|name| {
            let runs: Vec<&Outcome> = outcomes.iter().filter(|o| o.scenario == name).collect();
            let rates: Vec<f64> = runs.iter().map(|o| o.rate()).collect();
            Summary {
                scenario: name.to_owned(),
                runs: runs.len(),
                messages: runs.iter().map(|o| o.messages).max().unwrap_or(0),
                rate_median: median(rates.clone()),
                rate_min: rates.iter().copied().fold(f64::INFINITY, f64::min),
                rate_max: rates.iter().copied().fold(0.0, f64::max),
                seconds_median: median(runs.iter().map(|o| o.seconds).collect()),
                peak_rss_mb: runs.iter().map(|o| o.peak_rss_mb).fold(0.0, f64::max),
                cpu_us_per_msg_median: median(runs.iter().map(|o| o.cpu_us_per_msg()).collect()),
                machine_busy_pct_median: median(runs.iter().map(|o| o.machine_busy_pct).collect()),
            }
        })
        .collect()
}

/// One target: `a >= factor × b`, on medians.
pub(crate) struct Ratio {
    pub(crate) a: &'static str,
    pub(crate) factor: f64,
    pub(crate) b: &'static str,
    /// `None`: the target is not this database's.
    pub(crate) only: Option<DatabaseKind>,
}

/// The targets, ratios of medians (issue targets for PostgreSQL at N = 200,000, P = 8, and
/// one for SQLite).
pub(crate) const RATIOS: [Ratio; 7] = [
    Ratio {
        a: "effectively_once_batch",
        factor: 0.8,
        b: "server_limit",
        only: Some(DatabaseKind::Postgres),
    },
    Ratio {
        a: "effectively_once_batch",
        factor: 2.5,
        b: "effectively_once",
        only: Some(DatabaseKind::Postgres),
    },
    Ratio {
        a: "effectively_once",
        factor: 0.9,
        b: "sql_only_limit",
        only: Some(DatabaseKind::Postgres),
    },
    Ratio {
        a: "effectively_once_batch",
        factor: 0.85,
        b: "at_least_once_batch",
        only: Some(DatabaseKind::Postgres),
    },
    Ratio {
        a: "effectively_once",
        factor: 0.85,
        b: "at_least_once",
        only: Some(DatabaseKind::Postgres),
    },
    Ratio {
        a: "replay_processed",
        factor: 1.5,
        b: "effectively_once",
        only: None,
    },
    Ratio {
        a: "effectively_once_batch",
        factor: 3.0,
        b: "effectively_once",
        only: Some(DatabaseKind::Sqlite),
    },
];

/// What [`report`] needs to know about the run.
pub(crate) struct RunInfo<'a> {
    pub(crate) label: &'a str,
    pub(crate) kind: DatabaseKind,
    pub(crate) messages: u64,
    pub(crate) partitions: i32,
    pub(crate) repeat: u32,
    pub(crate) ledger_rows: u64,
    pub(crate) json: Option<&'a std::path::Path>,
    pub(crate) rss_baseline: Option<&'a std::path::Path>,
    /// Notes on the run (scenarios skipped, and why).
    pub(crate) notes: &'a [String],
}

/// A target's verdict, for the table and the JSON.
struct Verdict {
    line: String,
    ratio: Option<f64>,
    met: Option<bool>,
}

fn verdicts(summaries: &[Summary], kind: DatabaseKind, ledger_rows: u64) -> Vec<Verdict> {
    let rate = |name: &str| {
        summaries
            .iter()
            .find(|s| s.scenario == name)
            .map(|s| s.rate_median)
    };
    let mut out = Vec::new();
    let mut ratio = |a: &str, factor: f64, b: &str| {
        let line = format!("{a} >= {factor} x {b}");
        match (rate(a), rate(b)) {
            (Some(x), Some(y)) if y > 0.0 => {
                let r = x / y;
                out.push(Verdict {
                    line,
                    ratio: Some(r),
                    met: Some(r >= factor),
                });
            }
            _ => out.push(Verdict {
                line,
                ratio: None,
                met: None,
            }),
        }
    };
    for r in RATIOS.iter().filter(|r| r.only.is_none_or(|k| k == kind)) {
        ratio(r.a, r.factor, r.b);
    }
    if ledger_rows > 0 {
        ratio("effectively_once", 0.8, "effectively_once_empty_ledger");
    }
    out
}

/// Prints the runs, the medians and the targets, and writes the JSON file.
pub(crate) fn report(outcomes: &[Outcome], info: &RunInfo<'_>) -> anyhow::Result<()> {
    let summaries = summarise(outcomes);
    println!();
    println!(
        "{}, {} messages, {} partitions{}{}; runtime scenarios timed from their first commit (the mock broker's ~3 s group join excluded)",
        info.label,
        info.messages,
        info.partitions,
        if info.ledger_rows > 0 {
            format!(", ledger pre-filled with {} rows", info.ledger_rows)
        } else {
            String::new()
        },
        if info.repeat > 1 {
            format!(
                ", every scenario run {} times, interleaved (round 1 of all, then round 2, …)",
                info.repeat
            )
        } else {
            String::new()
        }
    );
    println!(
        "{:<32} {:>5} {:>10} {:>9} {:>11} {:>12} {:>13} {:>15} {:>13}",
        "scenario",
        "round",
        "messages",
        "seconds",
        "msgs_per_s",
        "peak_rss_mb",
        "start_rss_mb",
        "cpu_us_per_msg",
        "machine_busy%"
    );
    for o in outcomes {
        println!(
            "{:<32} {:>5} {:>10} {:>9.2} {:>11.0} {:>12.1} {:>13.1} {:>15.1} {:>13.0}",
            o.scenario,
            o.round,
            o.messages,
            o.seconds,
            o.rate(),
            o.peak_rss_mb,
            o.start_rss_mb,
            o.cpu_us_per_msg(),
            o.machine_busy_pct
        );
    }
    println!(
        "(peak_rss_mb is the process's VmHWM during the scenario, the consumer's and the harness's (the mock broker runs in a child process); start_rss_mb is the RSS when the scenario started; cpu_us_per_msg is this process's CPU time (all threads: Kafka client, runtime, handler, sqlx, and SQLite itself, which runs in-process; not a PostgreSQL server's, nor pgbench's) per message in the timed window; machine_busy% is the whole machine's CPU use then ({} CPUs))",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let mut notes: Vec<&str> = Vec::new();
    for o in outcomes {
        if let Some(n) = &o.note
            && !notes.contains(&n.as_str())
        {
            notes.push(n);
        }
    }
    for n in notes
        .into_iter()
        .chain(info.notes.iter().map(String::as_str))
    {
        println!("note: {n}");
    }
    if info.repeat > 1 {
        println!();
        println!(
            "medians of {} runs (msgs_per_s: median and range; cpu and busy: medians; peak_rss_mb: the highest)",
            info.repeat
        );
        println!(
            "{:<32} {:>4} {:>11} {:>19} {:>9} {:>12} {:>15} {:>13}",
            "scenario",
            "runs",
            "msgs_per_s",
            "range",
            "seconds",
            "peak_rss_mb",
            "cpu_us_per_msg",
            "machine_busy%"
        );
        for s in &summaries {
            println!(
                "{:<32} {:>4} {:>11.0} {:>19} {:>9.2} {:>12.1} {:>15.1} {:>13.0}",
                s.scenario,
                s.runs,
                s.rate_median,
                format!("{:.0}–{:.0}", s.rate_min, s.rate_max),
                s.seconds_median,
                s.peak_rss_mb,
                s.cpu_us_per_msg_median,
                s.machine_busy_pct_median
            );
        }
    }
    println!();
    let of = if info.repeat > 1 {
        format!("medians of --repeat {}", info.repeat)
    } else {
        "single runs: use --repeat 3 for medians".to_owned()
    };
    match info.kind {
        DatabaseKind::Postgres => {
            println!("targets (PostgreSQL, N = 200,000, P = 8, ratios of {of}):")
        }
        _ => println!("targets (SQLite, ratios of {of}):"),
    }
    let verdicts = verdicts(&summaries, info.kind, info.ledger_rows);
    for v in &verdicts {
        match (v.ratio, v.met) {
            (Some(r), Some(met)) => println!(
                "  {:<58} ratio {r:>7.3}  {}",
                v.line,
                if met { "met" } else { "NOT MET" }
            ),
            _ => println!("  {:<58} not measured in this run", v.line),
        }
    }
    if info.ledger_rows == 0 {
        println!(
            "  {:<58} run with --ledger-rows 10000000",
            "effectively_once (10M-row ledger) >= 0.8 x empty ledger"
        );
    }
    let peak = outcomes.iter().map(|o| o.peak_rss_mb).fold(0.0, f64::max);
    println!(
        "  {:<58} peak  {peak:>7.1}  {}",
        "peak RSS < 150 MB",
        if peak < 150.0 { "met" } else { "NOT MET" }
    );
    match info.rss_baseline {
        Some(path) => rss_growth(&summaries, path)?,
        None => println!(
            "  {:<58} run --messages 1000000 --rss-baseline <the --json of a --messages 100000 run>",
            "peak RSS grows < 20% from N=100k to N=1M"
        ),
    }
    if let Some(path) = info.json {
        let round3 = |x: f64| (x * 1000.0).round() / 1000.0;
        let round1 = |x: f64| (x * 10.0).round() / 10.0;
        let runs: Vec<serde_json::Value> = outcomes
            .iter()
            .map(|o| {
                serde_json::json!({
                    "scenario": o.scenario,
                    "round": o.round,
                    "messages": o.messages,
                    "seconds": round3(o.seconds),
                    "msgs_per_s": o.rate().round(),
                    "peak_rss_mb": round1(o.peak_rss_mb),
                    "start_rss_mb": round1(o.start_rss_mb),
                    "cpu_us_per_msg": round1(o.cpu_us_per_msg()),
                    "machine_busy_pct": o.machine_busy_pct.round(),
                    "note": o.note,
                })
            })
            .collect();
        let scenarios: Vec<serde_json::Value> = summaries
            .iter()
            .map(|s| {
                serde_json::json!({
                    "scenario": s.scenario,
                    "runs": s.runs,
                    "messages": s.messages,
                    "msgs_per_s": s.rate_median.round(),
                    "msgs_per_s_min": s.rate_min.round(),
                    "msgs_per_s_max": s.rate_max.round(),
                    "seconds": round3(s.seconds_median),
                    "peak_rss_mb": round1(s.peak_rss_mb),
                    "cpu_us_per_msg": round1(s.cpu_us_per_msg_median),
                    "machine_busy_pct": s.machine_busy_pct_median.round(),
                })
            })
            .collect();
        let targets: Vec<serde_json::Value> = verdicts
            .iter()
            .map(|v| {
                serde_json::json!({
                    "target": v.line,
                    "ratio": v.ratio.map(|r| (r * 1000.0).round() / 1000.0),
                    "met": v.met,
                })
            })
            .chain(std::iter::once(serde_json::json!({
                "target": "peak RSS < 150 MB",
                "peak_rss_mb": round1(peak),
                "met": peak < 150.0,
            })))
            .collect();
        let doc = serde_json::json!({
            "database": info.label,
            "messages": info.messages,
            "partitions": info.partitions,
            "repeat": info.repeat,
            "ledger_rows": info.ledger_rows,
            "notes": info.notes,
            "scenarios": scenarios,
            "targets": targets,
            "runs": runs,
        });
        let text = serde_json::to_string_pretty(&doc)?;
        std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

/// The growth of each scenario's peak RSS from an earlier run's JSON (fewer messages) to this
/// run. Reads this program's JSON (its `scenarios`) and the older form (an array of runs).
fn rss_growth(summaries: &[Summary], path: &std::path::Path) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the RSS baseline {}", path.display()))?;
    let doc: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a bench JSON file", path.display()))?;
    let rows = match &doc {
        serde_json::Value::Array(rows) => rows.clone(),
        serde_json::Value::Object(o) => match o.get("scenarios") {
            Some(serde_json::Value::Array(rows)) => rows.clone(),
            _ => anyhow::bail!("{} has no `scenarios` array", path.display()),
        },
        _ => anyhow::bail!("{} is not a bench JSON file", path.display()),
    };
    for s in summaries {
        let Some(base) = rows
            .iter()
            .find(|r| r["scenario"].as_str() == Some(s.scenario.as_str()))
        else {
            continue;
        };
        let (Some(base_mb), Some(base_n)) =
            (base["peak_rss_mb"].as_f64(), base["messages"].as_u64())
        else {
            continue;
        };
        let growth = 100.0 * (s.peak_rss_mb / base_mb.max(1e-9) - 1.0);
        let line = format!(
            "peak RSS grows < 20%: {} {}k -> {}k",
            s.scenario,
            base_n / 1000,
            s.messages / 1000
        );
        println!(
            "  {line:<58} {base_mb:.1} -> {:.1} MB  {growth:>+6.1}%  {}",
            s.peak_rss_mb,
            if growth < 20.0 { "met" } else { "NOT MET" }
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(scenario: &str, round: u32, messages: u64, seconds: f64) -> Outcome {
        Outcome {
            scenario: scenario.to_owned(),
            round,
            messages,
            seconds,
            peak_rss_mb: 50.0 + f64::from(round),
            start_rss_mb: 30.0,
            process_cpu_s: 1.0,
            machine_busy_pct: 90.0,
            note: None,
        }
    }

    #[test]
    fn the_median_is_the_middle_value_or_the_mean_of_the_two_middle_ones() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(vec![7.0]), 7.0);
    }

    #[test]
    fn interleaved_runs_are_summarised_per_scenario_with_their_range() {
        let outcomes = [
            run("a", 1, 1000, 1.0),
            run("b", 1, 1000, 2.0),
            run("a", 2, 1000, 0.5),
            run("b", 2, 1000, 4.0),
            run("a", 3, 1000, 0.25),
            run("b", 3, 1000, 1.0),
        ];
        let s = summarise(&outcomes);
        assert_eq!(s.len(), 2);
        assert_eq!((s[0].scenario.as_str(), s[0].runs), ("a", 3));
        assert_eq!(s[0].rate_median, 2000.0);
        assert_eq!((s[0].rate_min, s[0].rate_max), (1000.0, 4000.0));
        assert_eq!(s[1].rate_median, 500.0);
        assert_eq!(s[1].peak_rss_mb, 53.0);
    }

    #[test]
    fn targets_are_ratios_of_medians_and_a_missing_scenario_is_not_measured() {
        let outcomes = [
            run("effectively_once", 1, 1000, 1.0),
            run("effectively_once", 2, 1000, 10.0),
            run("effectively_once", 3, 1000, 2.0),
            run("effectively_once_batch", 1, 3000, 1.0),
            run("effectively_once_batch", 2, 3000, 1.0),
            run("effectively_once_batch", 3, 3000, 1.0),
        ];
        let v = verdicts(&summarise(&outcomes), DatabaseKind::Postgres, 0);
        let find = |l: &str| v.iter().find(|v| v.line == l).expect("a target");
        // Medians 500 and 3000: 6.0, though the best single runs would give 3.0.
        let batch = find("effectively_once_batch >= 2.5 x effectively_once");
        assert_eq!((batch.ratio, batch.met), (Some(6.0), Some(true)));
        let server = find("effectively_once_batch >= 0.8 x server_limit");
        assert_eq!((server.ratio, server.met), (None, None));
        assert!(
            !v.iter()
                .any(|v| v.line == "effectively_once_batch >= 3 x effectively_once"),
            "the SQLite target is not shown for PostgreSQL"
        );
    }
}
