//! The poll thread: it owns the rdkafka consumer, polls, routes each record to its partition's
//! worker (pausing a partition whose worker is full), and reloads fenced partitions. The
//! rebalance callbacks ([`super::rebalance`]) run inside its polls.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use rdkafka::Message;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::OwnedMessage;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, error, info, warn};

use super::bump;
use super::gaps::Gap;
use super::partitions::{Claimed, Control, Core, LOCKED_RETRY, Slot, TopicPartition};
use super::rebalance::{RuntimeContext, stop_workers};
use crate::error::{Error, Result};
use crate::handler::Handler;
use crate::store::{Backend, PartitionKey};

pub(super) struct PollThread<H: Handler<DB>, DB: Backend> {
    pub(super) core: Arc<Core<H, DB>>,
    pub(super) consumer: BaseConsumer<RuntimeContext<H, DB>>,
    pub(super) control: std_mpsc::Receiver<Control>,
    pub(super) abort: Arc<AtomicBool>,
    pub(super) failure: Option<Error>,
    pub(super) last_mirror: Instant,
    pub(super) last_mirror_all: Instant,
}

/// How often the mirror commits the stored offsets that moved.
const MIRROR_EVERY: Duration = Duration::from_secs(1);
/// How often the mirror commits every owned partition's stored offset again, moved or not: a
/// late commit of another member (a zombie's) cannot hold the group's offset back for longer.
const MIRROR_ALL_EVERY: Duration = Duration::from_secs(5);

impl<H: Handler<DB>, DB: Backend> PollThread<H, DB> {
    pub(super) fn run(mut self, ready: oneshot::Sender<Result<()>>) -> Result<()> {
        if let Err(e) = self.startup() {
            let _ = ready.send(Err(e));
            return Ok(());
        }
        let _ = ready.send(Ok(()));
        loop {
            if self.abort.load(Ordering::SeqCst) {
                // Crash-like stop: in-flight transactions are dropped and roll back.
                let mut slots = self.core.slots.lock().expect("slots lock");
                for (_, slot) in slots.drain() {
                    if let Slot::Active(a) = slot {
                        a.task.abort();
                    }
                }
                self.core.health.set_stopped();
                return Ok(());
            }
            if self.core.shutting_down() {
                break;
            }
            self.core.health.polled();
            self.handle_control();
            self.flush_pending();
            self.retry_stale();
            self.mirror();
            match self.consumer.poll(Duration::from_millis(100)) {
                Some(Ok(m)) => {
                    let m = m.detach();
                    self.route(m);
                }
                Some(Err(e)) => {
                    warn!(error = %e, "Kafka consumer error; librdkafka retries it (waiting for the broker)")
                }
                None => {}
            }
        }
        info!("stopping: finishing in-flight batches and leaving the group");
        stop_workers(&self.core, None);
        self.mirror_last();
        self.core.health.set_stopped();
        // Dropping the consumer (when this thread ends) closes it and leaves the group.
        self.consumer.unsubscribe();
        match self.failure.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn startup(&self) -> Result<()> {
        let options = &self.core.options;
        for topic in &options.topics {
            crate::kafka::topic_partitions(
                &self.consumer,
                topic,
                &options.brokers,
                options.startup_timeout,
            )?;
        }
        let topics: Vec<&str> = options.topics.iter().map(String::as_str).collect();
        self.consumer
            .subscribe(&topics)
            .map_err(Error::kafka("subscribing to the topics"))
    }

    fn route(&self, m: OwnedMessage) {
        let mut slots = self.core.slots.lock().expect("slots lock");
        let key: &dyn TopicPartition = &(m.topic(), m.partition());
        let Some(Slot::Active(a)) = slots.get_mut(key) else {
            return;
        };
        let offset = m.offset();
        if let Some(expected) = a.expected
            && offset > expected
        {
            self.gap(m.topic(), m.partition(), expected, offset);
        }
        a.expected = Some(offset + 1);
        a.last_record = Instant::now();
        if a.stalled {
            a.stalled = false;
            a.metrics.set_stalled(false);
            self.core
                .health
                .set_stalled(m.topic(), m.partition(), false);
            info!(
                topic = m.topic(),
                partition = m.partition(),
                offset,
                "the stalled partition receives records again"
            );
        }
        if a.paused || !a.pending.is_empty() {
            a.pending.push_back(m);
            return;
        }
        match a.sender.try_send(m) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(m)) => {
                let tpl = single(m.topic(), m.partition());
                a.pending.push_back(m);
                a.paused = true;
                debug!(partition = ?tpl, "worker busy: pausing the partition");
                if let Err(e) = self.consumer.pause(&tpl) {
                    warn!(error = %e, "pausing a busy partition failed");
                }
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }

    fn flush_pending(&self) {
        let mut slots = self.core.slots.lock().expect("slots lock");
        for ((topic, partition), slot) in slots.iter_mut() {
            let Slot::Active(a) = slot else { continue };
            if !a.paused {
                continue;
            }
            while let Some(m) = a.pending.pop_front() {
                match a.sender.try_send(m) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(m)) => {
                        a.pending.push_front(m);
                        break;
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => {
                        a.pending.clear();
                        break;
                    }
                }
            }
            // Resume only once the worker has room for a good part of the channel: every
            // pause makes librdkafka drop the partition's prefetched (already decompressed)
            // records and fetch them again on resume. The records still queued must cover
            // that refetch, so the room asked for is in batches, not a share of the channel
            // (a batch size of 1 resumes almost at once).
            if a.pending.is_empty()
                && (a.sender.capacity() >= a.resume_room || a.sender.is_closed())
            {
                a.paused = false;
                if let Err(e) = self.consumer.resume(&single(topic, *partition)) {
                    warn!(error = %e, "resuming a partition failed");
                }
            }
        }
    }

    fn handle_control(&mut self) {
        while let Ok(control) = self.control.try_recv() {
            match control {
                Control::Fenced { key, generation } => {
                    if self.is_current(&key, generation) {
                        bump(&self.core.stats.reloads, 1);
                        self.reload(&key.topic, key.partition, false);
                    }
                }
                Control::Failed {
                    key,
                    generation,
                    error,
                } => {
                    if self.is_current(&key, generation) {
                        error!(%error, "stopping the consumer");
                        if self.failure.is_none() {
                            self.failure = Some(error);
                        }
                        self.core.shutdown.send_replace(true);
                    }
                }
            }
        }
    }

    fn is_current(&self, key: &PartitionKey, generation: u64) -> bool {
        let slots = self.core.slots.lock().expect("slots lock");
        matches!(
            slots.get(&(key.topic.clone(), key.partition)),
            Some(Slot::Active(a)) if a.generation == generation
        )
    }

    /// After a fence: claim the partition again (only if nobody else owns it, or
    /// unconditionally on `takeover`), move the consumer to the stored offset and start a new
    /// worker; otherwise pause it and try again later.
    fn reload(&self, topic: &str, partition: i32, takeover: bool) {
        let tp = (topic.to_owned(), partition);
        let claim = self.core.claim_all(std::slice::from_ref(&tp), !takeover);
        let mut slots = self.core.slots.lock().expect("slots lock");
        if let Some(Slot::Active(old)) = slots.remove(&tp) {
            old.task.abort();
        }
        let tpl = single(topic, partition);
        match claim.and_then(|mut c| c.pop()) {
            Some(Claimed::Yes(claim)) => {
                let offset = self.core.start_offset(&claim);
                if let Err(e) =
                    self.consumer
                        .seek(topic, partition, offset, Duration::from_secs(10))
                {
                    warn!(error = %e, topic, partition, "seeking to the stored offset failed; retrying shortly");
                    let _ = self.consumer.pause(&tpl);
                    slots.insert(
                        tp,
                        Slot::Stale {
                            retry_at: Instant::now() + Duration::from_secs(1),
                            takeover,
                        },
                    );
                    return;
                }
                let active = self.core.activate(topic, partition, claim);
                slots.insert(tp, Slot::Active(active));
                drop(slots);
                if let Err(e) = self.consumer.resume(&tpl) {
                    warn!(error = %e, "resuming a partition failed");
                }
            }
            Some(Claimed::Locked) => {
                let _ = self.consumer.pause(&tpl);
                slots.insert(
                    tp,
                    Slot::Stale {
                        retry_at: Instant::now() + LOCKED_RETRY,
                        takeover,
                    },
                );
            }
            Some(Claimed::OwnedElsewhere) | None => {
                warn!(
                    topic,
                    partition,
                    "another consumer owns this partition in the database; pausing it until Kafka settles the assignment"
                );
                let _ = self.consumer.pause(&tpl);
                slots.insert(
                    tp,
                    Slot::Stale {
                        retry_at: Instant::now() + self.core.stale_retry,
                        takeover: true,
                    },
                );
            }
        }
    }

    fn retry_stale(&self) {
        let due: Vec<((String, i32), bool)> = {
            let slots = self.core.slots.lock().expect("slots lock");
            let now = Instant::now();
            slots
                .iter()
                .filter_map(|(k, s)| match s {
                    Slot::Stale { retry_at, takeover } if *retry_at <= now => {
                        Some((k.clone(), *takeover))
                    }
                    _ => None,
                })
                .collect()
        };
        for ((topic, partition), takeover) in due {
            self.reload(&topic, partition, takeover);
        }
    }
}

impl<H: Handler<DB>, DB: Backend> PollThread<H, DB> {
    /// A record arrived at `offset` where `expected` was due: see [`super::gaps`].
    fn gap(&self, topic: &str, partition: i32, expected: i64, offset: i64) {
        let verdict = self
            .core
            .gaps
            .lock()
            .expect("gaps lock")
            .classify(topic, expected, offset);
        match verdict {
            None => {}
            Some(Gap::Expected) => {
                debug!(
                    topic,
                    partition, expected, offset, "offset gap on a compacted or transactional topic"
                )
            }
            Some(Gap::FirstMarker) => {
                info!(
                    topic,
                    partition,
                    offset = expected,
                    "a one-offset gap (a transaction marker): the topic is written transactionally; its offset gaps are expected from now on"
                )
            }
            Some(Gap::Unexplained { missing }) => {
                bump(&self.core.stats.gaps, 1);
                crate::telemetry::offset_gap(&self.core.options.group, topic);
                warn!(
                    topic,
                    partition,
                    expected,
                    received = offset,
                    missing,
                    "gap in the partition's offsets on a topic that is neither compacted nor transactional: the broker returned no record for these offsets (retention deleting them while the consumer lagged, or a broker that skipped records); the stored offset moves past them"
                );
            }
        }
    }

    /// Commits the stored offsets that moved (every [`MIRROR_EVERY`]) or all of them (every
    /// [`MIRROR_ALL_EVERY`]) to the group in Kafka, asynchronously: the monitoring mirror.
    fn mirror(&mut self) {
        if !self.core.options.mirror_offsets || self.last_mirror.elapsed() < MIRROR_EVERY {
            return;
        }
        self.last_mirror = Instant::now();
        let all = self.last_mirror_all.elapsed() >= MIRROR_ALL_EVERY;
        if all {
            self.last_mirror_all = Instant::now();
        }
        let mut tpl = TopicPartitionList::new();
        {
            let slots = self.core.slots.lock().expect("slots lock");
            for ((topic, partition), slot) in slots.iter() {
                if let Slot::Active(a) = slot
                    && let Some(next) = a.metrics.take_mirror(all)
                {
                    let _ = tpl.add_partition_offset(topic, *partition, Offset::Offset(next));
                }
            }
        }
        if tpl.count() == 0 {
            return;
        }
        if let Err(e) = self.consumer.commit(&tpl, CommitMode::Async) {
            bump(&self.core.stats.mirror_failures, tpl.count());
            crate::telemetry::mirror_failed(&self.core.options.group, tpl.count() as u64);
            warn!(error = %e, "mirroring the stored offsets to the consumer group in Kafka failed (monitoring only: the database's offsets are unaffected)");
        }
    }

    /// At shutdown, after the last batches: the final stored offsets, committed and waited
    /// for (briefly: a failure is only logged).
    fn mirror_last(&self) {
        if !self.core.options.mirror_offsets {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        for ((topic, partition), next) in self
            .core
            .revoked_stored
            .lock()
            .expect("revoked lock")
            .iter()
        {
            if *next >= 0 {
                let _ = tpl.add_partition_offset(topic, *partition, Offset::Offset(*next));
            }
        }
        if tpl.count() > 0
            && let Err(e) = self.consumer.commit(&tpl, CommitMode::Sync)
        {
            warn!(error = %e, "mirroring the final stored offsets to the consumer group in Kafka failed (monitoring only)");
        }
    }
}

pub(super) fn single(topic: &str, partition: i32) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::with_capacity(1);
    tpl.add_partition(topic, partition);
    tpl
}
