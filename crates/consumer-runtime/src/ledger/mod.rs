//! Ledger retention: pruning the dedup ledger, and the replay floor it leaves behind.
//!
//! The ledger (`processed`) is kept in **generations**. New claims go to the newest one; a new
//! generation starts every quarter of the retention, and a generation is removed whole once its
//! successor started more than the retention ago, i.e. once every row in it is older than the
//! retention. Rows therefore live between the retention and 1.25 × the retention.
//!
//! - PostgreSQL: a generation is a partition (`processed_g<N>`), created ahead of time and
//!   attached without blocking claims, and dropped with `DETACH PARTITION … CONCURRENTLY` and
//!   `DROP TABLE`: no `DELETE` of millions of rows, no lock that holds up commits. The switch to
//!   a new generation holds the ledger's claim lock exclusively for a moment (it waits at most
//!   200 ms for claims in flight, else tries again at the next run, waiting twice as long each
//!   time it gave up, up to 10 s, so that a switch gets through even when batches always run
//!   longer; meanwhile new transactions wait behind it), so that two claims of one
//!   event id always land in the same generation, where its primary key catches the second,
//!   and a claim in a new generation sees every older generation's rows.
//! - SQLite: one table with one unique index over every generation; a generation is an id
//!   range, deleted 5,000 rows at a time, each batch a short transaction of its own.
//!
//! Dropping a generation raises the **floor** of every partition it held rows of: the offset
//! below which the ledger no longer remembers every event ([`StoredOffset::ledger_floor`](crate::StoredOffset::ledger_floor)).
//! [`Store::replay`] and [`Store::set_offsets`] refuse to move a partition below its floor
//! ([`Error::BelowLedgerFloor`]) unless forced.
//!
//! Run [`Store::prune_ledger`] yourself (the consumer program's `ledger prune`, from cron), or
//! give the runtime a retention ([`RuntimeBuilder::ledger_retention`](crate::RuntimeBuilder::ledger_retention))
//! and it prunes while it runs. On PostgreSQL one pruner at a time works on a schema (a session
//! advisory lock); the others skip their turn.

use std::time::Duration;

use tracing::info;

use crate::error::{Error, Result};
pub use crate::store::Generation;
use crate::store::{Backend, Store};

/// What one [`Store::prune_ledger`] run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PruneReport {
    /// The generation it started, if the newest one was old enough.
    pub started: Option<i32>,
    /// The generations it dropped, oldest first.
    pub dropped: Vec<i32>,
    /// The rows those generations held (PostgreSQL: the planner's estimate for partitions of
    /// 100,000 rows or more).
    pub rows_dropped: u64,
    /// Whether a step was skipped because another pruner was at work or the switch could not
    /// get the claim lock in time (200 ms at first, longer after each miss); the next run does
    /// it.
    pub skipped: bool,
}

/// How long a generation takes claims: a quarter of the retention (at least 1 ms).
pub fn generation_span(retention: Duration) -> Duration {
    (retention / 4).max(Duration::from_millis(1))
}

/// The oldest row's age, in seconds, as the generations bound it: the oldest generation's age
/// (every row in it was claimed after it started). 0 for an empty ledger.
pub fn oldest_age_seconds(generations: &[Generation]) -> f64 {
    generations
        .iter()
        .find(|g| g.rows > 0)
        .map_or(0.0, |g| g.age_seconds.max(0.0))
}

impl<DB: Backend> Store<DB> {
    /// The dedup ledger's generations, oldest first (the last one takes new claims).
    pub async fn ledger_generations(&self) -> Result<Vec<Generation>> {
        DB::generations(self.pool(), self.queries())
            .await
            .map_err(Error::db("reading the ledger's generations"))
    }

    /// Starts a new generation now, whatever the newest one's age: new claims go to it, and
    /// the one before it can be dropped once the new one is older than the retention. `false`:
    /// another pruner was at work, or claims in flight held the claim lock for longer than the
    /// switch waited (200 ms at first, longer after each miss); nothing changed.
    pub async fn start_ledger_generation(&self) -> Result<bool> {
        let Some(newest) = self
            .ledger_generations()
            .await?
            .last()
            .map(|g| g.generation)
        else {
            return Ok(false);
        };
        DB::start_generation(self.pool(), self.queries(), newest)
            .await
            .map_err(Error::db("starting a ledger generation"))
    }

    /// One pruning run with `retention`: starts a new generation if the newest is older than a
    /// quarter of the retention, then drops every generation whose rows are all older than the
    /// retention, raising the floors first. Safe to run from several processes at once, and
    /// while consumers run.
    pub async fn prune_ledger(&self, retention: Duration) -> Result<PruneReport> {
        if retention.is_zero() {
            return Err(Error::Config(
                "a ledger retention of 0 would forget every event at once; use a retention longer than any replay or redelivery, e.g. 14d".into(),
            ));
        }
        const CONTEXT: &str = "pruning the ledger";
        let (pool, q) = (self.pool(), self.queries());
        let mut report = PruneReport::default();
        let mut generations = self.ledger_generations().await?;
        let Some(newest) = generations.last().cloned() else {
            return Ok(report);
        };
        if newest.age_seconds >= generation_span(retention).as_secs_f64() {
            if DB::start_generation(pool, q, newest.generation)
                .await
                .map_err(Error::db(CONTEXT))?
            {
                report.started = Some(newest.generation + 1);
                info!(
                    generation = newest.generation + 1,
                    "ledger: a new generation takes the claims"
                );
                generations = self.ledger_generations().await?;
            } else {
                report.skipped = true;
            }
        }
        let keep = retention.as_secs_f64();
        for pair in generations.windows(2) {
            let (old, successor) = (&pair[0], &pair[1]);
            // Every row of `old` was claimed before `successor` started.
            if successor.age_seconds < keep {
                break;
            }
            match DB::drop_generation(pool, q, old.generation)
                .await
                .map_err(Error::db(CONTEXT))?
            {
                Some(rows) => {
                    info!(
                        generation = old.generation,
                        rows, "ledger: generation dropped"
                    );
                    report.dropped.push(old.generation);
                    report.rows_dropped += rows;
                }
                None => {
                    report.skipped = true;
                    break;
                }
            }
        }
        Ok(report)
    }

    /// Moves a group's stored offsets for `topic` to `positions` (partition, next offset), in
    /// one transaction, bumping each partition's epoch and clearing its owner: a consumer
    /// that is running is fenced, reloads the new position and continues from it without a
    /// restart. Records before the new position that were already processed are skipped by the
    /// ledger, so moving offsets backwards re-applies nothing.
    ///
    /// Refused with [`Error::BelowLedgerFloor`] for a position below the partition's ledger
    /// floor (where retention pruned the ledger, so records would be applied a second time);
    /// [`Store::set_offsets_below_floor`] does it anyway.
    pub async fn set_offsets(
        &self,
        group: &str,
        topic: &str,
        positions: &[(i32, i64)],
    ) -> Result<()> {
        let rows = self.stored_offsets(group).await?;
        crate::store::check_floor(&rows, topic, positions)?;
        crate::store::set_offsets_checked(
            self.pool(),
            self.queries(),
            group,
            topic,
            positions,
            false,
        )
        .await
        .map(drop)
    }
}

#[cfg(test)]
mod tests;
