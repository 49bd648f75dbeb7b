//! The payment provider the example calls: a small HTTP/1.1 service on a loopback port, with
//! idempotency keys the way public payment APIs have them. `POST /charges` with an
//! `Idempotency-Key` header and a JSON body charges once per key; a repeated call with the same
//! key and body answers with the first call's charge (and `"replayed":true`) and charges
//! nothing; the same key with another body is refused (422), because it is a bug in the
//! caller. A call without a key is refused (400): this provider does not take unsafe retries.
//!
//! Its flakiness is deliberate: it can charge and then drop the connection before the answer
//! (the caller cannot tell whether the charge happened, and must retry with the same key), and
//! it can refuse a call with 503 before charging. Each hits the first call of one key in n.
//!
//! Hand-rolled on tokio's `TcpListener` (one request per connection, `Connection: close`), so
//! that the example needs no HTTP dependency.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

/// What the provider has done, for the example's check.
#[derive(Debug, Default, Clone)]
pub(crate) struct Ledger {
    /// Charges per order id: the external effect. Exactly 1 each is the goal.
    pub(crate) charges: HashMap<String, u32>,
    /// Requests that carried an idempotency key already seen (answered from memory).
    pub(crate) replays: u64,
    /// Charges made whose answer was dropped on purpose.
    pub(crate) dropped_answers: u64,
    /// Calls refused with 503 before charging.
    pub(crate) refused: u64,
    /// Every request received.
    pub(crate) requests: u64,
}

/// One stored charge: the request body it answered and the answer.
struct Charge {
    body: String,
    charge_id: String,
}

#[derive(Default)]
struct State {
    by_key: HashMap<String, Charge>,
    /// Keys refused once with 503.
    refused_once: std::collections::HashSet<String>,
    ledger: Ledger,
}

/// The running provider; it stops when dropped.
pub(crate) struct Provider {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Provider {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// How often the provider misbehaves: for one key in n (chosen by the key's hash), on the
/// key's first call only (0: never). A retry of that call then goes through.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Flakiness {
    /// The charge is made, then the connection is closed without an answer.
    pub(crate) drop_answer_every: u64,
    /// The call is refused with 503 before anything is charged.
    pub(crate) refuse_every: u64,
}

/// A small stable hash (FNV-1a) that picks the keys the provider misbehaves on.
pub(crate) fn pick(key: &str, every: u64) -> bool {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    every > 0 && h.is_multiple_of(every)
}

impl Provider {
    /// Starts the provider on a free loopback port.
    pub(crate) async fn start(flakiness: Flakiness) -> anyhow::Result<Provider> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the payment provider to a loopback port")?;
        let addr = listener.local_addr()?;
        let state = Arc::new(Mutex::new(State::default()));
        let shared = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let state = shared.clone();
                tokio::spawn(async move {
                    // A broken connection is the caller's problem; it retries.
                    let _ = serve(stream, &state, flakiness).await;
                });
            }
        });
        Ok(Provider { addr, state, task })
    }

    /// The base URL, `http://127.0.0.1:PORT`.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A copy of what it has done so far.
    pub(crate) fn ledger(&self) -> Ledger {
        self.state.lock().expect("provider state").ledger.clone()
    }
}

/// What the provider answers one request with.
enum Answer {
    Respond(u16, String),
    /// Charged; the connection is closed without an answer.
    Drop,
}

async fn serve(
    mut stream: TcpStream,
    state: &Mutex<State>,
    flakiness: Flakiness,
) -> anyhow::Result<()> {
    let request = match read_request(&mut stream).await {
        Ok(r) => r,
        Err(e) => {
            let body = format!(r#"{{"error":"{}"}}"#, json_escape(&format!("{e:#}")));
            return write_response(&mut stream, 400, &body).await;
        }
    };
    let answer = decide(&request, state, flakiness);
    match answer {
        Answer::Respond(status, body) => write_response(&mut stream, status, &body).await,
        Answer::Drop => {
            // Dropping the stream closes it: the caller sees the connection end without a
            // status line.
            drop(stream);
            Ok(())
        }
    }
}

fn decide(request: &Request, state: &Mutex<State>, flakiness: Flakiness) -> Answer {
    let mut state = state.lock().expect("provider state");
    state.ledger.requests += 1;
    if (request.method.as_str(), request.path.as_str()) != ("POST", "/charges") {
        return Answer::Respond(404, r#"{"error":"only POST /charges exists"}"#.to_owned());
    }
    let Some(key) = request.header("idempotency-key").map(str::to_owned) else {
        return Answer::Respond(
            400,
            r#"{"error":"an Idempotency-Key header is required"}"#.to_owned(),
        );
    };
    if let Some(charge) = state.by_key.get(&key) {
        if charge.body != request.body {
            return Answer::Respond(
                422,
                r#"{"error":"this Idempotency-Key was used with another request body"}"#.to_owned(),
            );
        }
        let body = format!(r#"{{"charge_id":"{}","replayed":true}}"#, charge.charge_id);
        state.ledger.replays += 1;
        return Answer::Respond(200, body);
    }
    if pick(&key, flakiness.refuse_every) && state.refused_once.insert(key.clone()) {
        state.ledger.refused += 1;
        return Answer::Respond(
            503,
            r#"{"error":"try again later (on purpose)"}"#.to_owned(),
        );
    }
    let Some(order_id) = json_string_field(&request.body, "order_id") else {
        return Answer::Respond(
            400,
            r#"{"error":"the body needs a string field order_id"}"#.to_owned(),
        );
    };
    let charge_id = format!("ch_{}", state.by_key.len() + 1);
    // Only the key's first charge gets here: a retry is answered from `by_key` above.
    let drop_answer = pick(&format!("drop:{key}"), flakiness.drop_answer_every);
    *state.ledger.charges.entry(order_id).or_default() += 1;
    state.by_key.insert(
        key,
        Charge {
            body: request.body.clone(),
            charge_id: charge_id.clone(),
        },
    );
    if drop_answer {
        state.ledger.dropped_answers += 1;
        return Answer::Drop;
    }
    Answer::Respond(
        201,
        format!(r#"{{"charge_id":"{charge_id}","replayed":false}}"#),
    )
}

/// A parsed request.
struct Request {
    method: String,
    path: String,
    /// Lower-cased names.
    headers: Vec<(String, String)>,
    body: String,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// The largest request the provider reads.
const MAX_REQUEST: usize = 64 * 1024;

async fn read_request(stream: &mut TcpStream) -> anyhow::Result<Request> {
    let mut buf = Vec::with_capacity(1024);
    let head_end = loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            break i;
        }
        if buf.len() > MAX_REQUEST {
            bail!("the request's head is larger than {MAX_REQUEST} bytes");
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            bail!("the connection closed inside the request's head");
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = std::str::from_utf8(&buf[..head_end]).context("the request's head is not UTF-8")?;
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (Some(method), Some(path), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        bail!("a malformed request line `{request_line}`");
    };
    if !version.starts_with("HTTP/1.") {
        bail!("only HTTP/1.x is served, not `{version}`");
    }
    let mut headers = Vec::new();
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            bail!("a malformed header line `{line}`");
        };
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
    }
    let length: usize = match headers.iter().find(|(n, _)| n == "content-length") {
        Some((_, v)) => v.parse().context("a malformed Content-Length")?,
        None => 0,
    };
    if length > MAX_REQUEST {
        bail!("the request's body is larger than {MAX_REQUEST} bytes");
    }
    let mut body = buf[head_end + 4..].to_vec();
    while body.len() < length {
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            bail!("the connection closed inside the request's body");
        }
        body.extend_from_slice(&chunk[..n]);
    }
    body.truncate(length);
    Ok(Request {
        method: method.to_owned(),
        path: path.to_owned(),
        headers,
        body: String::from_utf8(body).context("the request's body is not UTF-8")?,
    })
}

async fn write_response(stream: &mut TcpStream, status: u16, body: &str) -> anyhow::Result<()> {
    let reason = match status {
        200 => "OK",
        201 => "Created",
        400 => "Bad Request",
        404 => "Not Found",
        422 => "Unprocessable Content",
        503 => "Service Unavailable",
        _ => "",
    };
    let response = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await?;
    Ok(())
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn json_escape(s: &str) -> String {
    serde_json::to_string(s)
        .map(|q| q[1..q.len() - 1].to_owned())
        .unwrap_or_default()
}

fn json_string_field(body: &str, field: &str) -> Option<String> {
    let value: serde_json::Value = serde_json::from_str(body).ok()?;
    value.get(field)?.as_str().map(str::to_owned)
}

/// The answer to a charge call, as the client sees it.
#[derive(Debug)]
pub(crate) struct Charged {
    /// The provider's id of the charge.
    pub(crate) charge_id: String,
    /// Whether the provider answered from its idempotency memory (a retried call).
    pub(crate) replayed: bool,
}

/// Why a charge call did not succeed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CallError {
    /// No answer (connection refused, closed, timed out): the charge may or may not have
    /// happened; retry with the same key.
    #[error("no answer from the payment provider: {0}")]
    NoAnswer(String),
    /// The provider asked to try again later.
    #[error("the payment provider answered {0}: {1}")]
    Unavailable(u16, String),
    /// The provider refused the request; retrying it will not help.
    #[error("the payment provider refused the request with {0}: {1}")]
    Refused(u16, String),
}

/// `POST /charges` to the provider at `addr` with `key` as the idempotency key.
pub(crate) async fn charge(
    addr: SocketAddr,
    key: &str,
    order_id: &str,
    cents: i64,
) -> Result<Charged, CallError> {
    let body = format!(
        r#"{{"order_id":"{}","cents":{cents}}}"#,
        json_escape(order_id)
    );
    let call = async {
        let mut stream = TcpStream::connect(addr).await?;
        let request = format!(
            "POST /charges HTTP/1.1\r\nHost: {addr}\r\nIdempotency-Key: {key}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        Ok::<_, std::io::Error>(response)
    };
    let response = match tokio::time::timeout(Duration::from_secs(5), call).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return Err(CallError::NoAnswer(e.to_string())),
        Err(_) => return Err(CallError::NoAnswer("timed out after 5 s".to_owned())),
    };
    let text = String::from_utf8_lossy(&response);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return Err(CallError::NoAnswer(
            "the connection closed before an answer".to_owned(),
        ));
    };
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| CallError::NoAnswer(format!("a malformed status line in `{head}`")))?;
    match status {
        200 | 201 => {
            let charge_id = json_string_field(body, "charge_id").ok_or_else(|| {
                CallError::Refused(status, format!("no charge_id in the answer `{body}`"))
            })?;
            let replayed = body.contains(r#""replayed":true"#);
            Ok(Charged {
                charge_id,
                replayed,
            })
        }
        500..=599 => Err(CallError::Unavailable(status, body.to_owned())),
        _ => Err(CallError::Refused(status, body.to_owned())),
    }
}
