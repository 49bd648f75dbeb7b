//! Settings that shape the runtime's behaviour.

use std::time::Duration;

/// The delivery guarantee: what a crash, a retry or a producer duplicate can do to your
/// effects. The README's "Choosing a guarantee" compares them with measured costs.
///
/// | mode | per batch | a crash can | a producer duplicate is |
/// |---|---|---|---|
/// | `AtMostOnce` | offset transaction, then handler transaction | lose the batch in flight | applied again |
/// | `AtLeastOnce` | handler transaction, then offset transaction | apply the batch in flight again | applied again |
/// | `EffectivelyOnce` | one transaction: ledger + handler + offset | neither | skipped |
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Guarantee {
    /// The stored offset is advanced in a transaction of its own *before* the handler runs, and
    /// the handler's transaction follows; there is no ledger. A crash, or a handler failure,
    /// after the first commit loses the batch (its records are counted in `Stats::lost` and
    /// logged); a crash never makes the runtime apply a record twice. Producer-side
    /// duplicates are different records to this mode and are applied again.
    ///
    /// Pick it for logs, metrics and samples, where a gap is acceptable and a double count is
    /// not worth a ledger row.
    AtMostOnce,
    /// The handler's transaction commits first, then the offset advances in a second
    /// transaction; there is no ledger. Nothing is ever lost. A crash between the two commits
    /// re-applies the batch in flight on restart, a failed offset commit re-applies it on
    /// retry, and producer-side duplicates are applied again.
    ///
    /// Pick it for most business events whose effects are idempotent by construction (upserts
    /// of the latest state, version-checked updates), when you would rather not keep a ledger.
    AtLeastOnce,
    /// The ledger claim, the handler's effects and the offset advance commit in one
    /// transaction. Nothing is lost and nothing is applied twice, across crashes, rebalances,
    /// zombie consumers, producer retries and replays.
    ///
    /// The default. Pick it for payments, inventory, anything that counts or charges.
    #[default]
    EffectivelyOnce,
}

impl std::str::FromStr for Guarantee {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "at-most-once" => Ok(Guarantee::AtMostOnce),
            "at-least-once" => Ok(Guarantee::AtLeastOnce),
            "effectively-once" => Ok(Guarantee::EffectivelyOnce),
            other => Err(format!(
                "unknown guarantee `{other}`; use at-most-once, at-least-once or effectively-once"
            )),
        }
    }
}

impl std::fmt::Display for Guarantee {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Guarantee::AtMostOnce => "at-most-once",
            Guarantee::AtLeastOnce => "at-least-once",
            Guarantee::EffectivelyOnce => "effectively-once",
        })
    }
}

/// Where a partition starts when the database holds no offset for it yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum OffsetReset {
    /// The oldest record still in the partition.
    #[default]
    Earliest,
    /// Only records produced after the assignment.
    Latest,
}

impl std::str::FromStr for OffsetReset {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "earliest" => Ok(OffsetReset::Earliest),
            "latest" => Ok(OffsetReset::Latest),
            other => Err(format!(
                "unknown offset reset policy `{other}`; use earliest or latest"
            )),
        }
    }
}

/// The consumer group's partition assignment strategy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Assignor {
    /// Eager `range` assignment: every rebalance revokes and reassigns every partition.
    Range,
    /// Eager `roundrobin` assignment.
    RoundRobin,
    /// Incremental `cooperative-sticky` assignment: only moved partitions are revoked.
    #[default]
    CooperativeSticky,
}

impl Assignor {
    pub(crate) fn as_kafka(self) -> &'static str {
        match self {
            Assignor::Range => "range",
            Assignor::RoundRobin => "roundrobin",
            Assignor::CooperativeSticky => "cooperative-sticky",
        }
    }
}

impl std::str::FromStr for Assignor {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "range" => Ok(Assignor::Range),
            "roundrobin" => Ok(Assignor::RoundRobin),
            "cooperative-sticky" => Ok(Assignor::CooperativeSticky),
            other => Err(format!(
                "unknown assignor `{other}`; use range, roundrobin or cooperative-sticky"
            )),
        }
    }
}

/// How transient failures are retried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// The delay before the first retry; it doubles with each attempt.
    pub initial_delay: Duration,
    /// The longest delay between two attempts.
    pub max_delay: Duration,
    /// How many attempts a batch gets before its failing record is treated as permanently
    /// failed; `None` retries forever.
    pub max_attempts: Option<u32>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            initial_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(30),
            max_attempts: Some(10),
        }
    }
}

impl RetryPolicy {
    /// The delay before retry number `attempt` (1-based): exponential, capped, with up to 50%
    /// random jitter subtracted so that many partitions do not retry in lockstep.
    pub fn delay(&self, attempt: u32) -> Duration {
        let exp = self
            .initial_delay
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(20));
        let capped = exp.min(self.max_delay);
        let jitter = (capped.as_nanos() as u64 / 2).max(1);
        capped - Duration::from_nanos(crate::util::random_u64() % jitter)
    }
}
