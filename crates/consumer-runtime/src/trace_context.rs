//! Trace context across Kafka (cargo feature `otel`), after the W3C Trace Context format and
//! the OpenTelemetry messaging semantic conventions.
//!
//! - Consuming: a record's `traceparent` (and `tracestate`) header becomes the OpenTelemetry
//!   parent of its `record` span, so that the handler's work joins the producer's trace. The
//!   span carries the messaging attributes (`messaging.system`, `messaging.destination.name`,
//!   `messaging.destination.partition.id`, `messaging.kafka.offset`,
//!   `messaging.consumer.group.name`, `messaging.operation.type`) with or without the
//!   feature; the feature only adds the parent.
//! - Producing: [`current_headers`] gives the `traceparent`/`tracestate` headers of the current
//!   span, to put on a record you produce.
//! - The outbox: [`outbox::publish`](crate::outbox::publish) stores the current span's context
//!   in the row's headers (unless the message has a `traceparent` of its own), and the relay
//!   sends each row in a `relay` span (kind producer) that is the child of that context and
//!   the parent of the record's: a trace runs producer → relay → consumer.
//!
//! The spans reach an OpenTelemetry exporter through `tracing-opentelemetry`: the program
//! installs `tracing_opentelemetry::layer()` in its subscriber (the library installs
//! nothing). The `record` and `batch` spans are at debug level: let the layer see
//! `consumer_runtime=debug`. A header that is not a valid `traceparent` is ignored: the span
//! then has no remote parent.

use opentelemetry::Context;
use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState,
};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// The header that carries the parent span (W3C Trace Context).
pub const TRACEPARENT: &str = "traceparent";
/// The header that carries vendor-specific trace state (W3C Trace Context).
pub const TRACESTATE: &str = "tracestate";

/// The remote span context that a record's headers carry, if its `traceparent` is valid.
pub fn parent_from_headers<'a>(
    headers: impl IntoIterator<Item = (&'a str, Option<&'a [u8]>)>,
) -> Option<Context> {
    let (mut parent, mut state) = (None, None);
    for (name, value) in headers {
        let Some(value) = value.and_then(|v| std::str::from_utf8(v).ok()) else {
            continue;
        };
        if name.eq_ignore_ascii_case(TRACEPARENT) {
            parent = Some(value);
        } else if name.eq_ignore_ascii_case(TRACESTATE) {
            state = Some(value);
        }
    }
    let (trace_id, span_id, flags) = parse_traceparent(parent?)?;
    let state = state
        .and_then(|s| s.parse::<TraceState>().ok())
        .unwrap_or_default();
    let span = SpanContext::new(trace_id, span_id, flags, true, state);
    Some(Context::new().with_remote_span_context(span))
}

/// `version-traceid-parentid-flags`, each lowercase hex; version `ff` and all-zero ids are
/// invalid, and a version other than `00` may carry more fields after the flags.
fn parse_traceparent(text: &str) -> Option<(TraceId, SpanId, TraceFlags)> {
    let text = text.trim();
    let mut parts = text.split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    if !hex(version, 2) || version == "ff" || !hex(trace, 32) || !hex(span, 16) || !hex(flags, 2) {
        return None;
    }
    if version == "00" && parts.next().is_some() {
        return None;
    }
    let trace = TraceId::from_hex(trace).ok()?;
    let span = SpanId::from_hex(span).ok()?;
    let flags = TraceFlags::new(u8::from_str_radix(flags, 16).ok()? & 1);
    (trace != TraceId::INVALID && span != SpanId::INVALID).then_some((trace, span, flags))
}

/// Makes the remote context in `headers`, if any, the OpenTelemetry parent of `span` (a span
/// that no OpenTelemetry layer sees is left alone).
pub(crate) fn adopt_parent<'a>(
    span: &tracing::Span,
    headers: impl IntoIterator<Item = (&'a str, Option<&'a [u8]>)>,
) {
    if let Some(parent) = parent_from_headers(headers) {
        let _ = span.set_parent(parent);
    }
}

/// The `traceparent` (and, if not empty, `tracestate`) headers of the current `tracing`
/// span's OpenTelemetry context, to add to a record you produce; empty when there is no
/// valid current span (no OpenTelemetry layer, or outside any span).
pub fn current_headers() -> Vec<(&'static str, String)> {
    headers_of(&tracing::Span::current().context())
}

/// The `traceparent`/`tracestate` headers of `cx`'s span; empty if it has no valid span.
pub fn headers_of(cx: &Context) -> Vec<(&'static str, String)> {
    let span = cx.span();
    let sc = span.span_context();
    if !sc.is_valid() {
        return Vec::new();
    }
    let mut headers = vec![(
        TRACEPARENT,
        format!(
            "00-{}-{}-{:02x}",
            sc.trace_id(),
            sc.span_id(),
            sc.trace_flags().to_u8()
        ),
    )];
    let state = sc.trace_state().header();
    if !state.is_empty() {
        headers.push((TRACESTATE, state));
    }
    headers
}

/// Headers as the outbox keeps them.
type Headers = Vec<(String, Option<Vec<u8>>)>;

fn has_traceparent(headers: &Headers) -> bool {
    headers
        .iter()
        .any(|(n, _)| n.eq_ignore_ascii_case(TRACEPARENT))
}

/// `headers` with the current span's context added, unless they carry a `traceparent` already
/// (or there is no current span): what an outbox row stores.
pub(crate) fn with_current(headers: &Headers) -> Headers {
    let mut out = headers.clone();
    if !has_traceparent(headers) {
        for (name, value) in current_headers() {
            out.push((name.to_owned(), Some(value.into_bytes())));
        }
    }
    out
}

/// The headers the relay sends for an outbox row to `topic`: in a `relay` span (kind
/// producer, child of the row's `traceparent` if it has one), the row's trace context is
/// replaced by the relay span's, so that the consumer's `record` span is the relay span's
/// child. Unchanged when no OpenTelemetry layer sees the span.
pub(crate) fn relayed(topic: &str, event_id: &str, headers: Headers) -> Headers {
    let span = tracing::debug_span!(
        "relay",
        otel.kind = "producer",
        messaging.system = "kafka",
        messaging.operation.type = "send",
        messaging.destination.name = topic,
        messaging.message.id = event_id,
    );
    adopt_parent(
        &span,
        headers.iter().map(|(n, v)| (n.as_str(), v.as_deref())),
    );
    let own = headers_of(&span.context());
    if own.is_empty() {
        return headers;
    }
    let mut out: Headers = headers
        .into_iter()
        .filter(|(n, _)| {
            !n.eq_ignore_ascii_case(TRACEPARENT) && !n.eq_ignore_ascii_case(TRACESTATE)
        })
        .collect();
    out.extend(
        own.into_iter()
            .map(|(n, v)| (n.to_owned(), Some(v.into_bytes()))),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(cx: &Context) -> (String, String, u8, String) {
        let span = cx.span();
        let sc = span.span_context();
        (
            sc.trace_id().to_string(),
            sc.span_id().to_string(),
            sc.trace_flags().to_u8(),
            sc.trace_state().header(),
        )
    }

    #[test]
    fn a_valid_traceparent_and_tracestate_become_a_remote_parent_and_back() {
        let headers: [(&str, Option<&[u8]>); 3] = [
            ("event-id", Some(b"e-1")),
            (
                "traceparent",
                Some(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            ),
            (
                "tracestate",
                Some(b"congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"),
            ),
        ];
        let cx = parent_from_headers(headers).expect("a valid traceparent");
        assert!(cx.span().span_context().is_remote());
        assert_eq!(
            ids(&cx),
            (
                "4bf92f3577b34da6a3ce929d0e0e4736".to_owned(),
                "00f067aa0ba902b7".to_owned(),
                1,
                "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7".to_owned()
            )
        );
        assert_eq!(
            headers_of(&cx),
            vec![
                (
                    TRACEPARENT,
                    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_owned()
                ),
                (
                    TRACESTATE,
                    "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7".to_owned()
                )
            ]
        );
    }

    #[test]
    fn an_invalid_traceparent_gives_no_parent() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e47-00f067aa0ba902b7-01",
        ] {
            let headers: [(&str, Option<&[u8]>); 1] = [("traceparent", Some(bad.as_bytes()))];
            assert!(parent_from_headers(headers).is_none(), "{bad:?}");
        }
        let none: [(&str, Option<&[u8]>); 1] = [("traceparent", None)];
        assert!(parent_from_headers(none).is_none());
        // A later version may add fields after the flags.
        let later: [(&str, Option<&[u8]>); 1] = [(
            "traceparent",
            Some(b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-more"),
        )];
        assert!(parent_from_headers(later).is_some());
    }
}
