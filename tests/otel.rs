//! Trace context across Kafka (the `otel` feature): a record's `traceparent` header makes its
//! `record` span a child of the producer's span, with the OpenTelemetry messaging attributes,
//! seen through the OpenTelemetry SDK's in-memory exporter.

use std::sync::OnceLock;
use std::time::Duration;

use consumer_runtime::rdkafka::message::{Header, OwnedHeaders};
use consumer_runtime::rdkafka::producer::{BaseRecord, Producer as _};
use consumer_runtime::trace_context;
use opentelemetry::trace::{SpanKind, TraceContextExt as _, TracerProvider as _};
use opentelemetry::{SpanId, TraceId, Value};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use testkit::*;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::layer::SubscriberExt as _;

testkit::mock_broker_entry!();

/// The spans every test of this binary exports (one global subscriber: the runtime's tasks
/// run on the runtime's worker threads).
fn exporter() -> &'static InMemorySpanExporter {
    static EXPORTER: OnceLock<InMemorySpanExporter> = OnceLock::new();
    EXPORTER.get_or_init(|| {
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("otel-test")));
        tracing::subscriber::set_global_default(subscriber).expect("one global subscriber");
        exporter
    })
}

fn attribute<'s>(span: &'s SpanData, key: &str) -> Option<&'s Value> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| &kv.value)
}

/// Five records produced each inside a `publish` span of its own, with the span's context in
/// their headers, and a sixth without: each of the five is handled in a `record` span whose
/// parent is its `publish` span (same trace id, the publish span's id as parent id, a remote
/// parent), with the messaging attributes; the sixth's span has no remote parent.
async fn the_record_span_is_a_child_of_the_producer_span_with_messaging_attributes<DB: TestDb>() {
    let exporter = exporter();
    let pool = DB::pool().await;
    let kafka = Kafka::new();
    let topic = rand_name("traced");
    let group = rand_name("g");
    kafka.create_topic(&topic, 1);

    let producer = kafka.producer();
    let mut records: Vec<Record> = Vec::new();
    let mut parents: Vec<(TraceId, SpanId)> = Vec::new();
    for i in 0..6 {
        let id = format!("{topic}-{i}");
        let payload = format!(r#"{{"id":"{id}","amount_cents":{i}}}"#);
        let mut headers = OwnedHeaders::new().insert(Header {
            key: "event-id",
            value: Some(id.as_bytes()),
        });
        if i < 5 {
            let publish = tracing::info_span!("publish", otel.kind = "producer");
            let cx = publish.context();
            let sc = cx.span().span_context().clone();
            parents.push((sc.trace_id(), sc.span_id()));
            let traced = publish.in_scope(trace_context::current_headers);
            assert_eq!(
                traced.len(),
                1,
                "a traceparent (no trace state): {traced:?}"
            );
            for (name, value) in &traced {
                headers = headers.insert(Header {
                    key: name,
                    value: Some(value.as_bytes()),
                });
            }
        }
        producer
            .send(
                BaseRecord::to(&topic)
                    .partition(0)
                    .key(id.as_str())
                    .payload(payload.as_str())
                    .headers(headers),
            )
            .map_err(|(e, _)| e)
            .unwrap();
        records.push((0, id, payload));
    }
    producer.flush(Duration::from_secs(30)).unwrap();

    let consumer = Consumer::start(&kafka, &pool, &topic, Counter::new(&group), |rt| rt);
    consumer.catch_up_and_stop(&records).await;

    let spans = exporter.get_finished_spans().unwrap();
    let mut handled: Vec<&SpanData> = spans
        .iter()
        .filter(|s| {
            s.name == "record"
                && attribute(s, "messaging.destination.name") == Some(&Value::from(topic.clone()))
        })
        .collect();
    handled.sort_by_key(|s| match attribute(s, "messaging.kafka.offset") {
        Some(Value::I64(o)) => *o,
        other => panic!("a record span without its offset: {other:?}"),
    });
    assert_eq!(handled.len(), 6, "one record span per record: {handled:#?}");
    for (offset, span) in handled.iter().enumerate() {
        assert_eq!(span.span_kind, SpanKind::Consumer);
        for (key, value) in [
            ("messaging.system", Value::from("kafka")),
            ("messaging.operation.type", Value::from("process")),
            ("messaging.destination.partition.id", Value::from("0")),
            ("messaging.kafka.offset", Value::I64(offset as i64)),
            ("messaging.consumer.group.name", Value::from(group.clone())),
            (
                "messaging.message.id",
                Value::from(format!("{topic}-{offset}")),
            ),
        ] {
            assert_eq!(
                attribute(span, key),
                Some(&value),
                "{key} of offset {offset}"
            );
        }
        match parents.get(offset) {
            Some(&(trace_id, span_id)) => {
                assert_eq!(
                    span.span_context.trace_id(),
                    trace_id,
                    "offset {offset}'s trace"
                );
                assert_eq!(span.parent_span_id, span_id, "offset {offset}'s parent");
                assert!(
                    span.parent_span_is_remote,
                    "offset {offset}'s parent is remote"
                );
            }
            None => {
                assert!(
                    !span.parent_span_is_remote,
                    "no traceparent, no remote parent"
                );
                assert!(
                    parents
                        .iter()
                        .all(|(t, _)| *t != span.span_context.trace_id()),
                    "the untraced record joined a producer's trace"
                );
            }
        }
    }
    // The producer spans themselves were exported with the ids the records point to.
    for (trace_id, span_id) in &parents {
        assert!(
            spans.iter().any(|s| s.name == "publish"
                && s.span_context.span_id() == *span_id
                && s.span_context.trace_id() == *trace_id),
            "the publish span {span_id} was not exported"
        );
    }
}

/// An event published through the outbox inside a `request` span: the row keeps the span's
/// context, the relay sends it in a `relay` span that is the request span's child, and the
/// consumer handles it in a `record` span that is the relay span's child: one trace runs
/// producer → relay → consumer.
async fn a_trace_runs_from_the_outbox_through_the_relay_to_the_consumer<DB: TestDb>()
where
    DB::Connection: consumer_runtime::outbox::OutboxConnection,
{
    use consumer_runtime::outbox::{self, Message};
    use consumer_runtime::relay::Relay;

    let exporter = exporter();
    let pool = DB::pool().await;
    let kafka = Kafka::new();
    let topic = rand_name("relayed");
    let group = rand_name("g");
    kafka.create_topic(&topic, 1);

    let mut requests: Vec<(String, TraceId, SpanId)> = Vec::new();
    let mut records: Vec<Record> = Vec::new();
    for i in 0..3 {
        let id = format!("{topic}-{i}");
        let request = tracing::info_span!("request", otel.kind = "server");
        let sc = request.context().span().span_context().clone();
        requests.push((id.clone(), sc.trace_id(), sc.span_id()));
        let message = Message::new(&topic)
            .key(format!("order-{i}"))
            .json(&serde_json::json!({"id": id, "amount_cents": i}))
            .unwrap()
            .event_id(&id);
        let mut tx = pool.begin().await.unwrap();
        tracing::Instrument::instrument(outbox::publish(&mut *tx, &message), request)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        records.push((0, id, String::new()));
    }

    let relay = Relay::builder(pool.clone())
        .brokers(kafka.bootstrap.clone())
        .schema(SCHEMA)
        .build()
        .unwrap();
    let (stop, stats) = (relay.shutdown_handle(), relay.stats_handle());
    let relaying = tokio::spawn(relay.run());
    wait_until(
        Duration::from_secs(60),
        "the relay to publish the rows",
        || async { stats.get().published >= 3 },
    )
    .await;
    stop.shutdown();
    relaying.await.unwrap().unwrap();

    let consumer = Consumer::start(&kafka, &pool, &topic, Counter::new(&group), |rt| rt);
    consumer.catch_up_and_stop(&records).await;
    assert_exactly_once(
        &effect_counts(&pool, &group).await,
        &records.iter().map(|r| r.1.clone()).collect::<Vec<_>>(),
    );

    let spans = exporter.get_finished_spans().unwrap();
    let find = |name: &str, id: &str| -> &SpanData {
        let found: Vec<&SpanData> = spans
            .iter()
            .filter(|s| {
                s.name == name
                    && attribute(s, "messaging.message.id") == Some(&Value::from(id.to_owned()))
            })
            .collect();
        assert_eq!(found.len(), 1, "one {name} span for {id}: {found:#?}");
        found[0]
    };
    for (id, trace_id, request_id) in &requests {
        let relay = find("relay", id);
        let record = find("record", id);
        assert_eq!(relay.span_kind, SpanKind::Producer);
        assert_eq!(
            relay.span_context.trace_id(),
            *trace_id,
            "{id}: the relay's trace"
        );
        assert_eq!(
            relay.parent_span_id, *request_id,
            "{id}: the relay's parent"
        );
        assert_eq!(
            record.span_context.trace_id(),
            *trace_id,
            "{id}: the record's trace"
        );
        assert_eq!(
            record.parent_span_id,
            relay.span_context.span_id(),
            "{id}: the record's parent is the relay span"
        );
    }
}

suite!(
    the_record_span_is_a_child_of_the_producer_span_with_messaging_attributes,
    a_trace_runs_from_the_outbox_through_the_relay_to_the_consumer,
);
