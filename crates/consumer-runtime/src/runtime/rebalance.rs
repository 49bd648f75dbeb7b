//! The rdkafka context: the rebalance callbacks (claim assigned partitions in the database and
//! start their workers; stop revoked partitions' workers after their in-flight batch) and
//! librdkafka's logs and statistics. The callbacks run on the poll thread.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaRespErr;
use tokio::task::JoinHandle;
use tracing::{debug, error, info, warn};

use super::partitions::{Claimed, Core, LOCKED_RETRY, Slot};
use crate::handler::Handler;
use crate::store::Backend;
use crate::telemetry::{self, KafkaStats, PartitionMetrics};

/// The rdkafka context: rebalance callbacks and librdkafka's logs.
pub(super) struct RuntimeContext<H: Handler<DB>, DB: Backend> {
    pub(super) core: Arc<Core<H, DB>>,
}

impl<H: Handler<DB>, DB: Backend> ClientContext for RuntimeContext<H, DB> {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => error!(target: "librdkafka", fac, "{message}"),
            RDKafkaLogLevel::Warning => warn!(target: "librdkafka", fac, "{message}"),
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                info!(target: "librdkafka", fac, "{message}")
            }
            RDKafkaLogLevel::Debug => debug!(target: "librdkafka", fac, "{message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown) {
            // librdkafka keeps reconnecting; records resume where the stored offsets say.
            warn!(target: "librdkafka", %error, "no Kafka broker is reachable; waiting for the brokers (librdkafka reconnects on its own): {reason}");
        } else {
            warn!(target: "librdkafka", %error, "{reason}");
        }
    }

    /// librdkafka's statistics (only with `metrics_refresh`): the assigned partitions' high
    /// watermarks, for their lag gauges.
    fn stats_raw(&self, statistics: &[u8]) {
        let stats: KafkaStats = match serde_json::from_slice(statistics) {
            Ok(s) => s,
            Err(e) => {
                debug!(error = %e, "unreadable librdkafka statistics");
                return;
            }
        };
        let slots = self.core.slots.lock().expect("slots lock");
        for ((topic, partition), slot) in slots.iter() {
            let Slot::Active(a) = slot else { continue };
            if let Some(p) = stats
                .topics
                .get(topic)
                .and_then(|t| t.partitions.get(&partition.to_string()))
            {
                a.metrics.set_watermarks(p.lo_offset, p.hi_offset);
            }
        }
    }
}

impl<H: Handler<DB>, DB: Backend> ConsumerContext for RuntimeContext<H, DB> {
    /// The result of a mirror commit (the runtime commits nothing else to Kafka): a failure is
    /// logged and counted, nothing more; the database holds the offsets that count.
    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        let failed: Vec<String> = offsets
            .elements()
            .iter()
            .filter(|e| e.error().is_err())
            .map(|e| format!("{}/{}", e.topic(), e.partition()))
            .collect();
        let n = match &result {
            Err(_) if failed.is_empty() => offsets.count().max(1),
            _ => failed.len(),
        };
        if n == 0 {
            return;
        }
        let group = &self.core.options.group;
        self.core
            .stats
            .mirror_failures
            .fetch_add(n as u64, Ordering::Relaxed);
        telemetry::mirror_failed(group, n as u64);
        let error = result.err().map(|e| e.to_string());
        warn!(?error, partitions = ?failed, "mirroring the stored offsets to the consumer group in Kafka failed (monitoring only: the database's offsets are unaffected; the next mirror commit tries again)");
    }

    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let core = &self.core;
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        let parts: Vec<(String, i32)> = tpl
            .elements()
            .iter()
            .map(|e| (e.topic().to_owned(), e.partition()))
            .collect();
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                info!(partitions = ?parts, cooperative, "partitions assigned");
                telemetry::rebalance(&core.options.group, "assigned");
                let claims = if parts.is_empty() {
                    Some(Vec::new())
                } else {
                    core.claim_all(&parts, false)
                };
                let result = match claims {
                    Some(claims) => {
                        let mut locked = TopicPartitionList::new();
                        let mut slots = core.slots.lock().expect("slots lock");
                        for ((topic, partition), claim) in parts.iter().zip(claims) {
                            let Claimed::Yes(claim) = claim else {
                                // Its row is locked (a frozen previous owner): assigned paused,
                                // claimed again shortly; the other partitions start now.
                                if let Err(e) =
                                    tpl.set_partition_offset(topic, *partition, core.reset_offset())
                                {
                                    error!(%e, topic, partition, "cannot set the start offset");
                                }
                                locked.add_partition(topic, *partition);
                                if let Some(Slot::Active(old)) = slots.insert(
                                    (topic.clone(), *partition),
                                    Slot::Stale {
                                        retry_at: Instant::now() + LOCKED_RETRY,
                                        takeover: true,
                                    },
                                ) {
                                    old.task.abort();
                                }
                                continue;
                            };
                            if let Err(e) = tpl.set_partition_offset(
                                topic,
                                *partition,
                                core.start_offset(&claim),
                            ) {
                                error!(%e, topic, partition, "cannot set the start offset");
                            }
                            let active = core.activate(topic, *partition, claim);
                            if let Some(Slot::Active(old)) =
                                slots.insert((topic.clone(), *partition), Slot::Active(active))
                            {
                                old.task.abort();
                            }
                        }
                        drop(slots);
                        let assigned = if cooperative {
                            consumer.incremental_assign(tpl)
                        } else {
                            consumer.assign(tpl)
                        };
                        core.health.set_joined(true);
                        // A partition this consumer paused (a full worker, a fence) and that
                        // was revoked while paused stays paused in librdkafka when it comes
                        // back: assigning clears only librdkafka's own pause, not the
                        // application's. Its new worker is empty, so resume it. A locked one
                        // stays paused until it is claimed.
                        assigned.and_then(|()| consumer.resume(tpl)).and_then(|()| {
                            if locked.count() > 0 {
                                consumer.pause(&locked)
                            } else {
                                Ok(())
                            }
                        })
                    }
                    None if cooperative => consumer.incremental_assign(&TopicPartitionList::new()),
                    None => consumer.assign(&TopicPartitionList::new()),
                };
                if let Err(e) = result {
                    error!(%e, "assigning partitions failed");
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                let lost = consumer.assignment_lost();
                if lost {
                    core.health.set_joined(false);
                }
                info!(partitions = ?parts, lost, "partitions revoked; finishing their in-flight batches");
                telemetry::rebalance(&core.options.group, "revoked");
                stop_workers(core, Some(&parts));
                if !lost {
                    // The revoked partitions' last stored offsets, while still a member.
                    mirror_revoked(core, consumer, &parts);
                }
                let result = if cooperative {
                    consumer.incremental_unassign(tpl)
                } else {
                    consumer.unassign()
                };
                if let Err(e) = result {
                    error!(%e, "unassigning partitions failed");
                }
            }
            other => {
                error!(error = ?other, "rebalance failed; dropping the assignment");
                telemetry::rebalance(&core.options.group, "failed");
                core.health.set_joined(false);
                stop_workers(core, None);
                if let Err(e) = consumer.unassign() {
                    error!(%e, "unassigning partitions failed");
                }
            }
        }
    }
}

/// Commits the stored offsets of `parts` to the group in Kafka (the monitoring mirror), once
/// their workers have stopped; asynchronous, a failure is logged by the commit callback.
fn mirror_revoked<H: Handler<DB>, DB: Backend>(
    core: &Core<H, DB>,
    consumer: &BaseConsumer<RuntimeContext<H, DB>>,
    parts: &[(String, i32)],
) {
    if !core.options.mirror_offsets {
        return;
    }
    let mut tpl = TopicPartitionList::new();
    for (topic, partition) in parts {
        if let Some(next) = core
            .revoked_stored
            .lock()
            .expect("revoked lock")
            .remove(&(topic.clone(), *partition))
            && next >= 0
        {
            let _ = tpl.add_partition_offset(topic, *partition, Offset::Offset(next));
        }
    }
    if tpl.count() > 0
        && let Err(e) = consumer.commit(&tpl, CommitMode::Async)
    {
        debug!(%e, "mirroring the revoked partitions' offsets failed");
    }
}

/// Stops the workers of `parts` (all if `None`) and waits until each has finished or rolled
/// back its in-flight batch. Their last stored offsets are kept in `core.revoked_stored` for
/// the mirror.
pub(super) fn stop_workers<H: Handler<DB>, DB: Backend>(
    core: &Core<H, DB>,
    parts: Option<&[(String, i32)]>,
) {
    let removed: Vec<((String, i32), Slot)> = {
        let mut slots = core.slots.lock().expect("slots lock");
        match parts {
            Some(parts) => parts
                .iter()
                .filter_map(|k| slots.remove(k).map(|s| (k.clone(), s)))
                .collect(),
            None => slots.drain().collect(),
        }
    };
    let mut tasks: Vec<JoinHandle<()>> = Vec::new();
    let mut metrics: Vec<((String, i32), Arc<PartitionMetrics>)> = Vec::new();
    for (key, slot) in removed {
        if let Slot::Active(a) = slot {
            a.stop.send_replace(true);
            tasks.push(a.task);
            metrics.push((key, a.metrics));
        }
    }
    if !tasks.is_empty() {
        // `None` (the async runtime is gone) means the workers were cancelled with it.
        let _ = core.block_on(async move {
            for t in tasks {
                let _ = t.await;
            }
        });
    }
    // After the last batch: the new owner reports these partitions' lag.
    let mut revoked = core.revoked_stored.lock().expect("revoked lock");
    revoked.clear();
    for ((topic, partition), m) in metrics {
        core.health.set_stalled(&topic, partition, false);
        revoked.insert((topic, partition), m.stored());
        m.revoked();
    }
}
