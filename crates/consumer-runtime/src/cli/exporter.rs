//! A small Prometheus exporter for `run --metrics-addr`: a [`metrics::Recorder`] keeping
//! atomics per name and labels, the text exposition format (version 0.0.4), and a minimal
//! HTTP/1.1 server answering `GET /metrics`.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use metrics::{
    Counter, Gauge, Histogram, HistogramFn, Key, KeyName, Metadata, Recorder, SharedString, Unit,
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tracing::debug;

/// Upper bounds of the buckets of histograms measured in seconds.
const SECONDS_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Upper bounds of the buckets of every other histogram (counts, such as batch sizes).
const COUNT_BUCKETS: [f64; 12] = [
    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0,
];

/// A histogram with fixed buckets: a count per bucket (not cumulative), the sum and the count.
struct Buckets {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    /// The sum of the values, as `f64` bits.
    sum: AtomicU64,
    count: AtomicU64,
}

impl Buckets {
    fn for_name(name: &str) -> Buckets {
        let bounds: &'static [f64] = if name.ends_with("_seconds") {
            &SECONDS_BUCKETS
        } else {
            &COUNT_BUCKETS
        };
        Buckets {
            bounds,
            counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0f64.to_bits()),
            count: AtomicU64::new(0),
        }
    }
}

impl HistogramFn for Buckets {
    fn record(&self, value: f64) {
        if let Some(i) = self.bounds.iter().position(|b| value <= *b) {
            self.counts[i].fetch_add(1, Ordering::Relaxed);
        }
        let _ = self
            .sum
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                Some((f64::from_bits(bits) + value).to_bits())
            });
        self.count.fetch_add(1, Ordering::Relaxed);
    }
}

/// One registered series.
#[derive(Clone)]
enum Series {
    Counter(Arc<AtomicU64>),
    /// `f64` bits.
    Gauge(Arc<AtomicU64>),
    Histogram(Arc<Buckets>),
}

impl Series {
    fn kind(&self) -> &'static str {
        match self {
            Series::Counter(_) => "counter",
            Series::Gauge(_) => "gauge",
            Series::Histogram(_) => "histogram",
        }
    }
}

/// Every series by name and labels, and the help texts.
#[derive(Default)]
pub(super) struct Registry {
    series: Mutex<HashMap<Key, Series>>,
    help: Mutex<HashMap<String, String>>,
}

impl Registry {
    fn series(&self, key: &Key, new: impl FnOnce() -> Series) -> Series {
        let mut series = self.series.lock().unwrap_or_else(|e| e.into_inner());
        series.entry(key.clone()).or_insert_with(new).clone()
    }

    fn describe(&self, key: KeyName, description: SharedString) {
        self.help
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.as_str().to_owned(), description.into_owned());
    }

    /// The text exposition format: per metric name (sorted) its `# HELP` and `# TYPE`, then
    /// its series sorted by labels.
    pub(super) fn render(&self) -> String {
        let snapshot: Vec<(Key, Series)> = self
            .series
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, s)| (k.clone(), s.clone()))
            .collect();
        let help = self.help.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mut by_name: BTreeMap<&str, Vec<(String, &Series)>> = BTreeMap::new();
        for (key, series) in &snapshot {
            by_name
                .entry(key.name())
                .or_default()
                .push((render_labels(key.labels()), series));
        }
        let mut out = String::new();
        for (name, mut series) in by_name {
            series.sort_by(|a, b| a.0.cmp(&b.0));
            if let Some(text) = help.get(name) {
                let _ = writeln!(out, "# HELP {name} {}", escape_help(text));
            }
            let _ = writeln!(out, "# TYPE {name} {}", series[0].1.kind());
            for (labels, s) in series {
                match s {
                    Series::Counter(c) => {
                        let _ = writeln!(out, "{name}{labels} {}", c.load(Ordering::Relaxed));
                    }
                    Series::Gauge(g) => {
                        let v = f64::from_bits(g.load(Ordering::Relaxed));
                        let _ = writeln!(out, "{name}{labels} {}", number(v));
                    }
                    Series::Histogram(h) => render_histogram(&mut out, name, &labels, h),
                }
            }
        }
        out
    }
}

fn render_histogram(out: &mut String, name: &str, labels: &str, h: &Buckets) {
    // `labels` is `{a="b"}` or empty: `le` joins the others.
    let with_le = |le: &str| match labels.strip_suffix('}') {
        Some(open) => format!("{open},le=\"{le}\"}}"),
        None => format!("{{le=\"{le}\"}}"),
    };
    let mut cumulative = 0;
    for (bound, count) in h.bounds.iter().zip(&h.counts) {
        cumulative += count.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "{name}_bucket{} {cumulative}",
            with_le(&number(*bound))
        );
    }
    let count = h.count.load(Ordering::Relaxed);
    let _ = writeln!(out, "{name}_bucket{} {count}", with_le("+Inf"));
    let sum = f64::from_bits(h.sum.load(Ordering::Relaxed));
    let _ = writeln!(out, "{name}_sum{labels} {}", number(sum));
    let _ = writeln!(out, "{name}_count{labels} {count}");
}

/// `{k="v",…}` with the values escaped, or nothing without labels.
fn render_labels<'a>(labels: impl Iterator<Item = &'a metrics::Label>) -> String {
    let all: Vec<String> = labels
        .map(|l| format!("{}=\"{}\"", l.key(), escape_label(l.value())))
        .collect();
    if all.is_empty() {
        String::new()
    } else {
        format!("{{{}}}", all.join(","))
    }
}

fn escape_label(v: &str) -> String {
    v.replace('\\', r"\\")
        .replace('"', "\\\"")
        .replace('\n', r"\n")
}

fn escape_help(v: &str) -> String {
    v.replace('\\', r"\\").replace('\n', r"\n")
}

/// A sample value as Prometheus writes it: `+Inf`, `-Inf`, `NaN`, else the shortest exact
/// decimal (`0.005`, `42`).
fn number(v: f64) -> String {
    if v.is_nan() {
        "NaN".to_owned()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.to_owned()
    } else {
        format!("{v}")
    }
}

/// The recorder: registers series in a shared [`Registry`].
pub(super) struct Exporter(pub(super) Arc<Registry>);

impl Recorder for Exporter {
    fn describe_counter(&self, key: KeyName, _: Option<Unit>, description: SharedString) {
        self.0.describe(key, description);
    }

    fn describe_gauge(&self, key: KeyName, _: Option<Unit>, description: SharedString) {
        self.0.describe(key, description);
    }

    fn describe_histogram(&self, key: KeyName, _: Option<Unit>, description: SharedString) {
        self.0.describe(key, description);
    }

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        match self
            .0
            .series(key, || Series::Counter(Arc::new(AtomicU64::new(0))))
        {
            Series::Counter(c) => Counter::from_arc(c),
            _ => Counter::noop(),
        }
    }

    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        match self.0.series(key, || {
            Series::Gauge(Arc::new(AtomicU64::new(0f64.to_bits())))
        }) {
            Series::Gauge(g) => Gauge::from_arc(g),
            _ => Gauge::noop(),
        }
    }

    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        match self.0.series(key, || {
            Series::Histogram(Arc::new(Buckets::for_name(key.name())))
        }) {
            Series::Histogram(h) => Histogram::from_arc(h),
            _ => Histogram::noop(),
        }
    }
}

/// Installs the exporter as the process's `metrics` recorder. `None` if one was installed
/// before (tests, embedding): the existing one keeps recording.
pub(super) fn install() -> Option<Arc<Registry>> {
    let registry = Arc::new(Registry::default());
    metrics::set_global_recorder(Exporter(registry.clone()))
        .ok()
        .map(|()| registry)
}

/// Serves `GET /metrics` on `listener` until the task is dropped.
pub(super) async fn serve(listener: TcpListener, registry: Arc<Registry>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                debug!(error = %e, "accepting a metrics connection failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let registry = registry.clone();
        tokio::spawn(async move {
            let answer = tokio::time::timeout(Duration::from_secs(10), respond(stream, &registry));
            if let Ok(Err(e)) = answer.await {
                debug!(error = %e, %peer, "a metrics request failed");
            }
        });
    }
}

/// Reads one request head and answers it; the connection then closes.
async fn respond(mut stream: TcpStream, registry: &Registry) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
        if head.len() > 16 * 1024 {
            break;
        }
    }
    let text = String::from_utf8_lossy(&head);
    let mut words = text.lines().next().unwrap_or_default().split_whitespace();
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let (status, content_type, body) = match (method, path) {
        ("GET" | "HEAD", "/metrics") => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            registry.render(),
        ),
        ("GET" | "HEAD", _) => (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "not found; the metrics are at /metrics\n".to_owned(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain; charset=utf-8",
            "only GET /metrics\n".to_owned(),
        ),
    };
    let mut response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if method != "HEAD" {
        response.push_str(&body);
    }
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &'static str, labels: &[(&'static str, &'static str)]) -> Key {
        let labels: Vec<metrics::Label> = labels
            .iter()
            .map(|(k, v)| metrics::Label::new(*k, *v))
            .collect();
        Key::from_parts(name, labels)
    }

    #[test]
    fn counters_gauges_and_histograms_render_in_the_text_format() {
        let registry = Arc::new(Registry::default());
        let exporter = Exporter(registry.clone());
        let meta = Metadata::new("t", metrics::Level::INFO, None);
        exporter.describe_counter(
            "consumer_records_total".into(),
            None,
            "Records by outcome".into(),
        );
        let processed = key(
            "consumer_records_total",
            &[("group", "g"), ("outcome", "processed")],
        );
        exporter.register_counter(&processed, &meta).increment(5);
        // Registering the same key again shares the series.
        exporter.register_counter(&processed, &meta).increment(2);
        exporter
            .register_counter(
                &key(
                    "consumer_records_total",
                    &[("group", "g"), ("outcome", "duplicate")],
                ),
                &meta,
            )
            .increment(1);
        exporter
            .register_gauge(
                &key(
                    "consumer_lag",
                    &[("topic", "a\"b\\c\nd"), ("partition", "0")],
                ),
                &meta,
            )
            .set(3.0);
        let seconds = exporter.register_histogram(
            &key("consumer_commit_duration_seconds", &[("group", "g")]),
            &meta,
        );
        seconds.record(0.00390625);
        seconds.record(0.25);
        seconds.record(20.0);
        let sizes = exporter.register_histogram(&key("consumer_batch_size", &[]), &meta);
        sizes.record(3.0);

        let text = registry.render();
        let expected = r#"# TYPE consumer_batch_size histogram
consumer_batch_size_bucket{le="1"} 0
consumer_batch_size_bucket{le="2"} 0
consumer_batch_size_bucket{le="5"} 1
consumer_batch_size_bucket{le="10"} 1
consumer_batch_size_bucket{le="20"} 1
consumer_batch_size_bucket{le="50"} 1
consumer_batch_size_bucket{le="100"} 1
consumer_batch_size_bucket{le="200"} 1
consumer_batch_size_bucket{le="500"} 1
consumer_batch_size_bucket{le="1000"} 1
consumer_batch_size_bucket{le="2000"} 1
consumer_batch_size_bucket{le="5000"} 1
consumer_batch_size_bucket{le="+Inf"} 1
consumer_batch_size_sum 3
consumer_batch_size_count 1
# TYPE consumer_commit_duration_seconds histogram
consumer_commit_duration_seconds_bucket{group="g",le="0.0005"} 0
consumer_commit_duration_seconds_bucket{group="g",le="0.001"} 0
consumer_commit_duration_seconds_bucket{group="g",le="0.0025"} 0
consumer_commit_duration_seconds_bucket{group="g",le="0.005"} 1
consumer_commit_duration_seconds_bucket{group="g",le="0.01"} 1
consumer_commit_duration_seconds_bucket{group="g",le="0.025"} 1
consumer_commit_duration_seconds_bucket{group="g",le="0.05"} 1
consumer_commit_duration_seconds_bucket{group="g",le="0.1"} 1
consumer_commit_duration_seconds_bucket{group="g",le="0.25"} 2
consumer_commit_duration_seconds_bucket{group="g",le="0.5"} 2
consumer_commit_duration_seconds_bucket{group="g",le="1"} 2
consumer_commit_duration_seconds_bucket{group="g",le="2.5"} 2
consumer_commit_duration_seconds_bucket{group="g",le="5"} 2
consumer_commit_duration_seconds_bucket{group="g",le="10"} 2
consumer_commit_duration_seconds_bucket{group="g",le="+Inf"} 3
consumer_commit_duration_seconds_sum{group="g"} 20.25390625
consumer_commit_duration_seconds_count{group="g"} 3
# TYPE consumer_lag gauge
consumer_lag{topic="a\"b\\c\nd",partition="0"} 3
# HELP consumer_records_total Records by outcome
# TYPE consumer_records_total counter
consumer_records_total{group="g",outcome="duplicate"} 1
consumer_records_total{group="g",outcome="processed"} 7
"#;
        assert_eq!(text, expected);
    }

    #[test]
    fn special_values_are_written_as_prometheus_reads_them() {
        assert_eq!(number(f64::INFINITY), "+Inf");
        assert_eq!(number(f64::NEG_INFINITY), "-Inf");
        assert_eq!(number(f64::NAN), "NaN");
        assert_eq!(number(0.25), "0.25");
        assert_eq!(number(1e21), "1000000000000000000000");
    }
}
