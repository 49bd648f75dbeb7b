//! `run --metrics-addr`: the Prometheus recorder of `metrics-exporter-prometheus` (the text
//! exposition format, histograms with fixed buckets) and a minimal HTTP/1.1 responder answering
//! `GET /metrics`, and the Kubernetes-style probes `GET /healthz` (liveness: the poll loop
//! turns) and `GET /readyz` (readiness: joined to the group, the database answers), each with a
//! short JSON body.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use consumer_runtime::Health;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
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
/// How often the recorder folds recorded histogram values into its buckets between scrapes.
const UPKEEP: Duration = Duration::from_secs(5);

/// The recorder's configuration: every histogram with buckets (not as a summary), those whose
/// name ends in `_seconds` with [`SECONDS_BUCKETS`], the others with [`COUNT_BUCKETS`].
fn builder() -> PrometheusBuilder {
    PrometheusBuilder::new()
        .set_buckets(&COUNT_BUCKETS)
        .and_then(|b| {
            b.set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &SECONDS_BUCKETS)
        })
        .expect("the bucket lists are not empty")
}

/// Installs the exporter as the process's `metrics` recorder. `None` if one was installed
/// before (tests, embedding): the existing one keeps recording.
pub(super) fn install() -> Option<PrometheusHandle> {
    let recorder = builder().build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).ok().map(|()| handle)
}

/// `/healthz` fails once the poll loop has not turned for this long. It turns every 100 ms;
/// only a rebalance's database claims hold it longer (each partition's claim waits at most
/// 2 s for a locked row; a database outage during a rebalance holds it until the database is
/// back).
pub(super) const LIVENESS: Duration = Duration::from_secs(60);

/// How long `/readyz` waits for the database's answer.
const DATABASE_PROBE: Duration = Duration::from_secs(2);

/// Checks that the database answers: `Err` says why not.
pub(super) type DatabaseCheck =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>> + Send + Sync>;

/// What the probes ask: the runtime's health and the database.
#[derive(Clone)]
pub(super) struct Probes {
    pub(super) health: Health,
    pub(super) database: DatabaseCheck,
}

/// Serves `GET /metrics` (and with `probes`, `/healthz` and `/readyz`) on `listener` until the
/// task is dropped. Runs the recorder's upkeep every [`UPKEEP`] meanwhile.
pub(super) async fn serve(listener: TcpListener, handle: PrometheusHandle, probes: Option<Probes>) {
    let mut upkeep = tokio::time::interval(UPKEEP);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = upkeep.tick() => {
                handle.run_upkeep();
                continue;
            }
        };
        let (stream, peer) = match accepted {
            Ok(conn) => conn,
            Err(e) => {
                debug!(error = %e, "accepting a metrics connection failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let handle = handle.clone();
        let probes = probes.clone();
        tokio::spawn(async move {
            let answer = tokio::time::timeout(
                Duration::from_secs(10),
                respond(stream, &handle, probes.as_ref()),
            );
            if let Ok(Err(e)) = answer.await {
                debug!(error = %e, %peer, "a metrics request failed");
            }
        });
    }
}

/// Reads one request head and answers it; the connection then closes.
async fn respond(
    mut stream: TcpStream,
    handle: &PrometheusHandle,
    probes: Option<&Probes>,
) -> std::io::Result<()> {
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
    let json = "application/json";
    let (status, content_type, body) = match (method, path, probes) {
        ("GET" | "HEAD", "/metrics", _) => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            handle.render(),
        ),
        ("GET" | "HEAD", "/healthz", Some(p)) => {
            let (ok, body) = liveness(&p.health);
            (
                if ok {
                    "200 OK"
                } else {
                    "503 Service Unavailable"
                },
                json,
                body,
            )
        }
        ("GET" | "HEAD", "/readyz", Some(p)) => {
            let (ok, body) = readiness(p).await;
            (
                if ok {
                    "200 OK"
                } else {
                    "503 Service Unavailable"
                },
                json,
                body,
            )
        }
        ("GET" | "HEAD", _, Some(_)) => (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "not found; the metrics are at /metrics, the probes at /healthz and /readyz\n"
                .to_owned(),
        ),
        ("GET" | "HEAD", _, None) => (
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

/// `/healthz`: whether the poll loop turned within [`LIVENESS`], and its JSON body.
fn liveness(health: &Health) -> (bool, String) {
    let since = health.since_last_poll();
    let ok = health.alive(LIVENESS);
    let body = serde_json::json!({
        "status": if ok { "ok" } else { "failing" },
        "poll_loop": match since {
            Some(d) if ok => format!("turned {} ms ago", d.as_millis()),
            Some(d) => format!("has not turned for {} s", d.as_secs()),
            None => "not running".to_owned(),
        },
    });
    (ok, format!("{body}\n"))
}

/// `/readyz`: joined to the group and the database answers (within [`DATABASE_PROBE`]); the
/// stalled partitions are listed but do not make it fail.
async fn readiness(p: &Probes) -> (bool, String) {
    let joined = p.health.joined();
    let database = match tokio::time::timeout(DATABASE_PROBE, (p.database)()).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(format!("no answer within {DATABASE_PROBE:?}")),
    };
    let ok = joined && database.is_ok();
    let stalled: Vec<String> = p
        .health
        .stalled()
        .into_iter()
        .map(|(t, partition)| format!("{t}/{partition}"))
        .collect();
    let body = serde_json::json!({
        "status": if ok { "ready" } else { "not ready" },
        "group": if joined { "joined" } else { "not joined" },
        "database": match &database {
            Ok(()) => "reachable".to_owned(),
            Err(e) => format!("unreachable: {e}"),
        },
        "stalled_partitions": stalled,
    });
    (ok, format!("{body}\n"))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    #[test]
    fn counters_gauges_and_histograms_render_in_the_text_format() {
        let recorder = builder().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            metrics::describe_counter!("consumer_records_total", "Records by outcome");
            let processed = || metrics::counter!("consumer_records_total", "group" => "g", "outcome" => "processed");
            processed().increment(5);
            // Registering the same key again shares the series.
            processed().increment(2);
            metrics::counter!("consumer_records_total", "group" => "g", "outcome" => "duplicate")
                .increment(1);
            metrics::gauge!("consumer_lag", "topic" => "a\"b\\c\nd", "partition" => "0").set(3.0);
            let seconds = metrics::histogram!("consumer_commit_duration_seconds", "group" => "g");
            seconds.record(0.00390625);
            seconds.record(0.25);
            seconds.record(20.0);
            metrics::histogram!("consumer_batch_size").record(3.0);
        });

        // One block per metric family, its `# HELP` and `# TYPE` first; the families and the
        // series within a family come in no particular order.
        let families = |text: &str| -> BTreeSet<Vec<String>> {
            text.split("\n\n")
                .filter(|block| !block.trim().is_empty())
                .map(|block| {
                    let (head, mut series): (Vec<String>, Vec<String>) = block
                        .lines()
                        .map(str::to_owned)
                        .partition(|l| l.starts_with('#'));
                    series.sort();
                    head.into_iter().chain(series).collect()
                })
                .collect()
        };
        let text = handle.render();
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
        assert_eq!(families(&text), families(expected), "{text}");
    }

    /// One request to a server on a free port: the status line and the body.
    async fn ask(addr: std::net::SocketAddr, request: &str) -> (String, String) {
        let mut conn = TcpStream::connect(addr).await.unwrap();
        conn.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        conn.read_to_string(&mut response).await.unwrap();
        let (head, body) = response.split_once("\r\n\r\n").unwrap();
        (head.lines().next().unwrap().to_owned(), body.to_owned())
    }

    #[tokio::test]
    async fn only_get_metrics_is_served_and_other_requests_are_told_where_to_go() {
        let recorder = builder().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            metrics::counter!("consumer_records_total", "outcome" => "processed").increment(4);
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(serve(listener, handle, None));

        let (status, body) = ask(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert_eq!(status, "HTTP/1.1 200 OK");
        assert!(
            body.contains("consumer_records_total{outcome=\"processed\"} 4"),
            "{body}"
        );
        let (status, body) = ask(addr, "GET / HTTP/1.1\r\n\r\n").await;
        assert_eq!(status, "HTTP/1.1 404 Not Found");
        assert_eq!(body, "not found; the metrics are at /metrics\n");
        let (status, body) = ask(addr, "POST /metrics HTTP/1.1\r\n\r\n").await;
        assert_eq!(status, "HTTP/1.1 405 Method Not Allowed");
        assert_eq!(body, "only GET /metrics\n");
        server.abort();
    }
}
