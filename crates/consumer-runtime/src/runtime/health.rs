//! What a liveness or readiness probe asks of a running [`Runtime`](super::Runtime): whether
//! its poll loop is turning, whether it has joined its consumer group, and which partitions are
//! stalled. The poll thread writes it; [`Health`] reads it.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The state the poll thread keeps for [`Health`].
#[derive(Debug)]
pub(super) struct HealthState {
    started: Instant,
    /// Milliseconds after `started` of the poll loop's last turn; 0: not polling yet.
    last_poll_ms: AtomicU64,
    joined: AtomicBool,
    stopped: AtomicBool,
    stalled: Mutex<BTreeSet<(String, i32)>>,
}

impl HealthState {
    pub(super) fn new() -> Self {
        HealthState {
            started: Instant::now(),
            last_poll_ms: AtomicU64::new(0),
            joined: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
            stalled: Mutex::new(BTreeSet::new()),
        }
    }

    /// The poll loop turned.
    pub(super) fn polled(&self) {
        let ms = self.started.elapsed().as_millis().max(1) as u64;
        self.last_poll_ms.store(ms, Ordering::Relaxed);
    }

    pub(super) fn set_joined(&self, joined: bool) {
        self.joined.store(joined, Ordering::Relaxed);
    }

    pub(super) fn set_stopped(&self) {
        self.stopped.store(true, Ordering::Relaxed);
        self.joined.store(false, Ordering::Relaxed);
    }

    pub(super) fn set_stalled(&self, topic: &str, partition: i32, stalled: bool) {
        let mut set = self.stalled.lock().unwrap_or_else(|e| e.into_inner());
        if stalled {
            set.insert((topic.to_owned(), partition));
        } else {
            set.remove(&(topic.to_owned(), partition));
        }
    }
}

/// A read-only view of a runtime's liveness and readiness, for health endpoints (the
/// generated program serves it as `/healthz` and `/readyz`). Get it with
/// [`Runtime::health`](super::Runtime::health) before `run`; cheap to clone.
#[derive(Debug, Clone)]
pub struct Health(pub(super) Arc<HealthState>);

impl Health {
    /// How long ago the poll loop last turned; `None` before it started or after it stopped.
    /// The loop turns at least every 100 ms while it is healthy (a rebalance that claims
    /// partitions in the database can hold it for the length of the claims).
    pub fn since_last_poll(&self) -> Option<Duration> {
        if self.0.stopped.load(Ordering::Relaxed) {
            return None;
        }
        match self.0.last_poll_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(
                self.0
                    .started
                    .elapsed()
                    .saturating_sub(Duration::from_millis(ms)),
            ),
        }
    }

    /// Whether the poll loop turned within `within`: the process is alive and consuming.
    pub fn alive(&self, within: Duration) -> bool {
        self.since_last_poll().is_some_and(|d| d <= within)
    }

    /// Whether the consumer has joined its group: it got an assignment (possibly empty) from
    /// the group coordinator and has not lost it or stopped since.
    pub fn joined(&self) -> bool {
        self.0.joined.load(Ordering::Relaxed)
    }

    /// The assigned partitions that have lag but have received nothing for the stall timeout
    /// ([`ConsumerOptions::stall_timeout`](crate::ConsumerOptions::stall_timeout)).
    pub fn stalled(&self) -> Vec<(String, i32)> {
        let set = self.0.stalled.lock().unwrap_or_else(|e| e.into_inner());
        set.iter().cloned().collect()
    }
}
