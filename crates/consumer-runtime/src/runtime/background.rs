//! The background tasks beside the workers: the epoch watcher, the ledger counter, the signal
//! listener, and the guards that end them with `run`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;
use tracing::{debug, warn};

use super::partitions::{Control, Core, Slot};
use crate::handler::Handler;
use crate::store::Backend;
use crate::telemetry;

pub(super) async fn wait_for_signal(enabled: bool) {
    if !enabled {
        return std::future::pending().await;
    }
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return std::future::pending().await,
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Notices epochs changed behind a worker's back (a replay, or an offset set by an operator)
/// even while its partition is idle, and has the poll thread reload those partitions. A busy
/// partition learns the same from its next fenced commit.
pub(super) async fn watch_epochs<H: Handler<DB>, DB: Backend>(core: Arc<Core<H, DB>>) {
    let mut tick = tokio::time::interval(core.options.epoch_check_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Ok(rows) =
            DB::offsets(&core.writer.pool, &core.writer.queries, &core.options.group).await
        else {
            continue;
        };
        let stale: Vec<Control> = {
            let slots = core.slots.lock().expect("slots lock");
            rows.into_iter()
                .filter_map(|row| match slots.get(&(row.topic.clone(), row.partition)) {
                    Some(Slot::Active(a)) if row.epoch > a.epoch => Some(Control::Fenced {
                        key: core.key(&row.topic, row.partition),
                        generation: a.generation,
                    }),
                    _ => None,
                })
                .collect()
        };
        for c in stale {
            let _ = core.control.send(c);
        }
    }
}

/// Keeps the ledger size gauge current: a count every `every`, but never more often than 100
/// times the last count took (at most 1% of one connection, however large the ledger).
pub(super) async fn count_ledger<H: Handler<DB>, DB: Backend>(
    core: Arc<Core<H, DB>>,
    every: Duration,
) {
    loop {
        let started = Instant::now();
        let (pool, q, group) = (&core.writer.pool, &core.writer.queries, &core.options.group);
        match DB::ledger_size(pool, q, group).await {
            Ok(rows) => telemetry::ledger_rows(group, rows),
            Err(e) => debug!(error = %e, "counting the ledger rows failed"),
        }
        match DB::generations(pool, q).await {
            Ok(g) => telemetry::ledger_oldest_age(group, crate::ledger::oldest_age_seconds(&g)),
            Err(e) => debug!(error = %e, "reading the ledger generations failed"),
        }
        if let Ok(rows) = DB::offsets(pool, q, group).await {
            for row in rows {
                if let Some(floor) = row.ledger_floor {
                    telemetry::ledger_floor(group, &row.topic, row.partition, floor);
                }
            }
        }
        let took = started.elapsed();
        tokio::time::sleep(every.max(took.saturating_mul(100))).await;
    }
}

/// Prunes the ledger with `retention` while the runtime runs: a run every twentieth of the
/// retention (between 50 ms and 1 minute). On PostgreSQL one pruner at a time works on a
/// schema, so every instance of a group can run this; the others skip their turn.
pub(super) async fn prune_ledger<H: Handler<DB>, DB: Backend>(
    core: Arc<Core<H, DB>>,
    retention: Duration,
) {
    let store = match crate::store::Store::new(core.writer.pool.clone(), &core.options.schema) {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "ledger retention is off: the schema is refused");
            return;
        }
    };
    let every = (retention / 20).clamp(Duration::from_millis(50), Duration::from_secs(60));
    loop {
        match store.prune_ledger(retention).await {
            Ok(report) if report.rows_dropped > 0 => {
                telemetry::ledger_pruned(&core.options.group, report.rows_dropped);
            }
            Ok(_) => {}
            Err(e) => warn!(error = %e, "pruning the ledger failed; trying again at the next run"),
        }
        tokio::time::sleep(every).await;
    }
}

pub(super) struct AbortTaskOnDrop(pub(super) JoinHandle<()>);

impl Drop for AbortTaskOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Sets the abort flag if the `run` future is dropped before the poll thread finished.
pub(super) struct AbortOnDrop(pub(super) Option<Arc<AtomicBool>>);

impl AbortOnDrop {
    pub(super) fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(flag) = &self.0 {
            flag.store(true, Ordering::SeqCst);
        }
    }
}

/// Finds stalled partitions: assigned, not paused by the runtime, silent (no record) for the
/// stall timeout, and behind the broker's high watermark. Only silent partitions are asked
/// about (a ListOffsets request each, from a client of its own that is no group member), at
/// most every quarter of the timeout, so a busy consumer pays nothing. A stalled partition is
/// logged once, shown by [`Health::stalled`](super::Health::stalled) and the
/// [`STALLED`](telemetry::STALLED) gauge, and cleared by its next record.
pub(super) async fn watch_stalls<H: Handler<DB>, DB: Backend>(core: Arc<Core<H, DB>>) {
    use rdkafka::consumer::{BaseConsumer, Consumer as _};

    let Some(timeout) = core.options.stall_timeout else {
        return;
    };
    let mut config = rdkafka::ClientConfig::new();
    for (k, v) in &core.options.kafka {
        config.set(k, v);
    }
    config.set("bootstrap.servers", &core.options.brokers);
    let client: Arc<BaseConsumer> = match config.create() {
        Ok(c) => Arc::new(c),
        Err(e) => {
            tracing::warn!(error = %e, "cannot create the stall check's Kafka client; stalls are not detected");
            return;
        }
    };
    let every = (timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(5));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let candidates: Vec<(String, i32, i64)> = {
            let mut slots = core.slots.lock().expect("slots lock");
            slots
                .iter_mut()
                .filter_map(|((topic, partition), slot)| {
                    let Slot::Active(a) = slot else { return None };
                    if a.paused {
                        // Paused by the runtime (a busy worker): not the broker's silence.
                        a.last_record = Instant::now();
                        return None;
                    }
                    let position = a.expected?;
                    (a.last_record.elapsed() >= timeout)
                        .then(|| (topic.clone(), *partition, position))
                })
                .collect()
        };
        if candidates.is_empty() {
            continue;
        }
        let c = client.clone();
        let asked = candidates.clone();
        let Ok(highs) = tokio::task::spawn_blocking(move || {
            asked
                .iter()
                .map(|(t, p, _)| {
                    c.fetch_watermarks(t, *p, Duration::from_secs(5))
                        .ok()
                        .map(|(_, hi)| hi)
                })
                .collect::<Vec<_>>()
        })
        .await
        else {
            continue;
        };
        let mut slots = core.slots.lock().expect("slots lock");
        for ((topic, partition, position), high) in candidates.into_iter().zip(highs) {
            let Some(high) = high else { continue };
            let Some(Slot::Active(a)) = slots.get_mut(&(topic.clone(), partition)) else {
                continue;
            };
            if a.expected != Some(position) {
                continue; // a record arrived meanwhile
            }
            let stalled = high > position;
            if stalled && !a.stalled {
                tracing::warn!(
                    topic,
                    partition,
                    position,
                    high_watermark = high,
                    lag = high - position,
                    silent = ?a.last_record.elapsed(),
                    "partition stalled: it has lag but has received no record for the stall timeout (the broker returns nothing from this offset, or its fetches fail)"
                );
            } else if !stalled && a.stalled {
                tracing::info!(topic, partition, "the partition is no longer stalled");
            }
            if stalled != a.stalled {
                a.stalled = stalled;
                a.metrics.set_stalled(stalled);
                core.health.set_stalled(&topic, partition, stalled);
            }
        }
    }
}

/// Asks the brokers which topics are compacted (their offset gaps are expected) and tells the
/// gap check; until the answer arrives, and if none does, every topic counts as not compacted.
pub(super) async fn learn_compaction<H: Handler<DB>, DB: Backend>(core: Arc<Core<H, DB>>) {
    let options = &core.options;
    let compacted = crate::kafka::compacted_topics(
        &options.brokers,
        &options.kafka,
        &options.topics,
        options.startup_timeout,
    )
    .await;
    let mut gaps = core.gaps.lock().expect("gaps lock");
    for topic in &compacted {
        gaps.set_compacted(topic, true);
    }
}
