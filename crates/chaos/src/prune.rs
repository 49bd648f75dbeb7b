//! The `prune` fault: ledger retention while records flow, consumers die and replays run.
//!
//! With `--faults …,prune` every consumer runs with a short ledger retention
//! ([`RETENTION`], `run --ledger-retention`), so that generations are switched and dropped many
//! times in a trial, and the harness also prunes from outside, as cron would
//! (`ledger prune --retention`), at a moment drawn from the seed. The check then counts an event
//! applied twice as a failure only if its second application came within the retention of its
//! first (`chaos_effects.first_at` / `last_at`): that is the promise ("an event whose ledger row
//! is younger than the retention is never applied twice"). An event sent again after its row was
//! pruned is applied again by design; those are reported apart, as `beyond_retention`.
//!
//! Replays: one that would move a partition below its ledger floor must be refused (its exit
//! status is not 0 and it says `below its ledger floor`); the harness counts those as refused,
//! not failed, and after the trial runs one more `replay --from earliest`, which must be
//! refused and change nothing once any floor exists.

use std::collections::HashSet;
use std::time::Duration;

/// The consumers' ledger retention under the fault.
pub(crate) const RETENTION: Duration = Duration::from_secs(4);

/// `run`'s flags under the fault.
pub(crate) fn consumer_flags() -> [String; 2] {
    [
        "--ledger-retention".to_owned(),
        format!("{}ms", RETENTION.as_millis()),
    ]
}

/// `ledger prune`'s arguments after the program's common ones.
pub(crate) fn cron_flags() -> [String; 3] {
    [
        "prune".to_owned(),
        "--retention".to_owned(),
        format!("{}ms", RETENTION.as_millis()),
    ]
}

/// Whether a replay's last log line says it was refused below a ledger floor.
pub(crate) fn refused_below_floor(last_line: &str) -> bool {
    last_line.contains("below its ledger floor")
}

/// The event ids of trial `$1` applied more than once whose last application came more than the
/// retention after the first: outside the retention window.
pub(crate) fn beyond_retention_sql(schema: &str) -> String {
    format!(
        "SELECT event_id FROM {schema}.chaos_effects WHERE trial = $1 AND applied > 1 \
         AND last_at - first_at > make_interval(secs => {})",
        RETENTION.as_secs_f64()
    )
}

/// Splits `duplicated` ids into those inside the retention (failures) and beyond it.
pub(crate) fn split(duplicated: &[String], beyond: &HashSet<String>) -> (u64, u64) {
    let outside = duplicated.iter().filter(|id| beyond.contains(*id)).count() as u64;
    (duplicated.len() as u64 - outside, outside)
}
