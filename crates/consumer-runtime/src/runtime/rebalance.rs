//! The rdkafka context: the rebalance callbacks (claim assigned partitions in the database and
//! start their workers; stop revoked partitions' workers after their in-flight batch) and
//! librdkafka's logs and statistics. The callbacks run on the poll thread.

use std::sync::Arc;

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::topic_partition_list::TopicPartitionList;
use rdkafka::types::RDKafkaRespErr;
use tokio::task::JoinHandle;
use tracing::{debug, error, info, warn};

use super::partitions::{Core, Slot};
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
                        let mut slots = core.slots.lock().expect("slots lock");
                        for ((topic, partition), claim) in parts.iter().zip(claims) {
                            let claim = claim.expect("unconditional claims always succeed");
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
                        // A partition this consumer paused (a full worker, a fence) and that
                        // was revoked while paused stays paused in librdkafka when it comes
                        // back: assigning clears only librdkafka's own pause, not the
                        // application's. Its new worker is empty, so resume it.
                        assigned.and_then(|()| consumer.resume(tpl))
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
                info!(partitions = ?parts, lost, "partitions revoked; finishing their in-flight batches");
                telemetry::rebalance(&core.options.group, "revoked");
                stop_workers(core, Some(&parts));
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
                stop_workers(core, None);
                if let Err(e) = consumer.unassign() {
                    error!(%e, "unassigning partitions failed");
                }
            }
        }
    }
}

/// Stops the workers of `parts` (all if `None`) and waits until each has finished or rolled
/// back its in-flight batch.
pub(super) fn stop_workers<H: Handler<DB>, DB: Backend>(
    core: &Core<H, DB>,
    parts: Option<&[(String, i32)]>,
) {
    let removed: Vec<Slot> = {
        let mut slots = core.slots.lock().expect("slots lock");
        match parts {
            Some(parts) => parts.iter().filter_map(|k| slots.remove(k)).collect(),
            None => slots.drain().map(|(_, s)| s).collect(),
        }
    };
    let (tasks, metrics): (Vec<JoinHandle<()>>, Vec<Arc<PartitionMetrics>>) = removed
        .into_iter()
        .filter_map(|slot| match slot {
            Slot::Active(a) => {
                a.stop.send_replace(true);
                Some((a.task, a.metrics))
            }
            Slot::Stale { .. } => None,
        })
        .unzip();
    if !tasks.is_empty() {
        // `None` (the async runtime is gone) means the workers were cancelled with it.
        let _ = core.block_on(async move {
            for t in tasks {
                let _ = t.await;
            }
        });
    }
    // After the last batch: the new owner reports these partitions' lag.
    for m in metrics {
        m.revoked();
    }
}
