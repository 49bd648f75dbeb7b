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

/// Which of `topics` are compacted (`cleanup.policy` contains `compact`), asked once at
/// startup with DescribeConfigs, beside the consumer's start (never delaying it). A broker
/// that does not answer (librdkafka's mock cluster does not implement the request) leaves
/// every topic counted as not compacted: a gap on it is then reported, which is the safe side.
pub(crate) async fn compacted_topics(
    brokers: &str,
    kafka: &std::collections::BTreeMap<String, String>,
    topics: &[String],
    timeout: Duration,
) -> std::collections::BTreeSet<String> {
    use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
    use rdkafka::client::DefaultClientContext;

    let mut config = rdkafka::ClientConfig::new();
    for (k, v) in kafka {
        // Only the connection's settings (security, SSL, SASL…); consumer settings would make
        // librdkafka warn on an admin client.
        if k.starts_with("security.") || k.starts_with("ssl.") || k.starts_with("sasl.") {
            config.set(k, v);
        }
    }
    config.set("bootstrap.servers", brokers);
    let admin: AdminClient<DefaultClientContext> = match config.create() {
        Ok(a) => a,
        Err(e) => {
            tracing::debug!(error = %e, "no admin client to read the topics' cleanup policy");
            return Default::default();
        }
    };
    let resources: Vec<ResourceSpecifier<'_>> =
        topics.iter().map(|t| ResourceSpecifier::Topic(t)).collect();
    let options = AdminOptions::new().request_timeout(Some(timeout));
    let answer = admin.describe_configs(&resources, &options).await;
    let mut out = std::collections::BTreeSet::new();
    match answer {
        Ok(results) => {
            for (topic, result) in topics.iter().zip(results) {
                match result {
                    Ok(resource) => {
                        if resource
                            .get("cleanup.policy")
                            .and_then(|e| e.value.as_deref())
                            .is_some_and(|v| v.contains("compact"))
                        {
                            out.insert(topic.clone());
                        }
                    }
                    Err(e) => {
                        tracing::debug!(topic, error = ?e, "cannot read the topic's cleanup policy; gaps in it will be reported")
                    }
                }
            }
        }
        Err(e) => {
            tracing::debug!(error = %e, "cannot read the topics' cleanup policy; gaps in them will be reported")
        }
    }
    out
}
