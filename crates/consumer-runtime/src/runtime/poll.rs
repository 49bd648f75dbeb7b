//! The poll thread: it owns the rdkafka consumer, polls, routes each record to its partition's
//! worker (pausing a partition whose worker is full), and reloads fenced partitions. The
//! rebalance callbacks ([`super::rebalance`]) run inside its polls.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use rdkafka::Message;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::OwnedMessage;
use rdkafka::topic_partition_list::TopicPartitionList;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, error, info, warn};

use super::bump;
use super::partitions::{Control, Core, Slot, TopicPartition};
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
}

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
                return Ok(());
            }
            if self.core.shutting_down() {
                break;
            }
            self.handle_control();
            self.flush_pending();
            self.retry_stale();
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
        match claim.and_then(|mut c| c.pop().flatten()) {
            Some(claim) => {
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
            None => {
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

pub(super) fn single(topic: &str, partition: i32) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::with_capacity(1);
    tpl.add_partition(topic, partition);
    tpl
}
