//! What the runtime and the replay ask Kafka the same way.

use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};

use crate::error::{Error, Result};

/// The partitions of `topic`, sorted. [`Error::UnknownTopic`] if the cluster does not know the
/// topic (or it has no partitions), [`Error::BrokerUnreachable`] if no broker answered within
/// `timeout`. `brokers` names the cluster in those errors.
pub(crate) fn topic_partitions<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &str,
    brokers: &str,
    timeout: Duration,
) -> Result<Vec<i32>> {
    let metadata =
        consumer
            .fetch_metadata(Some(topic), timeout)
            .map_err(|e| Error::BrokerUnreachable {
                brokers: brokers.to_owned(),
                detail: e.to_string(),
            })?;
    let found = metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .filter(|t| t.error().is_none() && !t.partitions().is_empty());
    let Some(found) = found else {
        return Err(Error::UnknownTopic {
            topic: topic.to_owned(),
            brokers: brokers.to_owned(),
        });
    };
    let mut partitions: Vec<i32> = found.partitions().iter().map(|p| p.id()).collect();
    partitions.sort_unstable();
    Ok(partitions)
}
