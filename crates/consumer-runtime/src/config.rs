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

/// When parking becomes the norm, stop the consumer instead of dead-lettering a whole topic
/// (after a bad deploy, say). The runtime counts, in the order batches commit, records parked
/// versus records applied or skipped as duplicates; it stops with
/// [`Error::CircuitOpen`](crate::Error::CircuitOpen) when either limit is reached. The records
/// of the batch that tripped it are committed (parked); nothing after them is touched.
#[derive(Debug, Clone, PartialEq)]
pub struct CircuitBreaker {
    /// Stop after this many parked records in a row (none applied in between). `None`: no
    /// limit.
    pub max_consecutive: Option<u64>,
    /// Stop when more than `max_ratio` of the last `window` records were parked (checked once
    /// `window` records have been seen). `None`: no limit.
    pub ratio: Option<ParkedRatio>,
}

/// The ratio limit of a [`CircuitBreaker`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ParkedRatio {
    /// The largest tolerated share of parked records, between 0 and 1.
    pub max_ratio: f64,
    /// How many of the most recent records the share is taken over.
    pub window: u64,
}

impl Default for CircuitBreaker {
    /// 100 parked records in a row, or more than half of the last 1,000.
    fn default() -> Self {
        CircuitBreaker {
            max_consecutive: Some(100),
            ratio: Some(ParkedRatio::default()),
        }
    }
}

impl Default for ParkedRatio {
    /// More than half of the last 1,000 records.
    fn default() -> Self {
        ParkedRatio {
            max_ratio: 0.5,
            window: 1000,
        }
    }
}

impl CircuitBreaker {
    /// Never stops: every failing record is parked.
    pub fn disabled() -> Self {
        CircuitBreaker {
            max_consecutive: None,
            ratio: None,
        }
    }
}

/// The breaker's running state: outcomes in commit order.
#[derive(Debug, Default)]
pub(crate) struct BreakerState {
    consecutive: u64,
    window: std::collections::VecDeque<bool>,
    parked_in_window: u64,
}

impl BreakerState {
    /// Records one record's outcome; returns why the breaker trips, if it does.
    pub(crate) fn record(&mut self, limits: &CircuitBreaker, parked: bool) -> Option<String> {
        self.consecutive = if parked { self.consecutive + 1 } else { 0 };
        if let Some(r) = limits.ratio {
            self.window.push_back(parked);
            self.parked_in_window += u64::from(parked);
            while self.window.len() as u64 > r.window {
                if self.window.pop_front() == Some(true) {
                    self.parked_in_window -= 1;
                }
            }
            let seen = self.window.len() as u64;
            if seen == r.window && self.parked_in_window as f64 > r.max_ratio * seen as f64 {
                return Some(format!(
                    "{} of the last {seen} records were parked (more than {:.0}%)",
                    self.parked_in_window,
                    r.max_ratio * 100.0
                ));
            }
        }
        match limits.max_consecutive {
            Some(max) if parked && self.consecutive >= max => {
                Some(format!("{} records in a row were parked", self.consecutive))
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod breaker_tests {
    use super::*;

    #[test]
    fn consecutive_parked_records_trip_and_an_applied_one_resets() {
        let limits = CircuitBreaker {
            max_consecutive: Some(3),
            ratio: None,
        };
        let mut s = BreakerState::default();
        for parked in [true, true, false, true, true] {
            assert_eq!(s.record(&limits, parked), None);
        }
        assert!(
            s.record(&limits, true)
                .unwrap()
                .contains("3 records in a row")
        );
    }

    #[test]
    fn a_ratio_over_a_full_window_trips() {
        let limits = CircuitBreaker {
            max_consecutive: None,
            ratio: Some(ParkedRatio {
                max_ratio: 0.5,
                window: 4,
            }),
        };
        let mut s = BreakerState::default();
        // Half parked is tolerated; the window is not full before four records.
        for parked in [true, false, true, false, true, false, true] {
            assert_eq!(s.record(&limits, parked), None);
        }
        assert!(s.record(&limits, true).unwrap().contains("3 of the last 4"));
        assert_eq!(
            BreakerState::default().record(&CircuitBreaker::disabled(), true),
            None
        );
    }
}
