//! Dead letters: records that failed permanently, parked in `dead_letters` by the unit of work
//! in the same transaction that advanced their partition's offset (see [`crate::unit`]).
//!
//! The functions here are the library behind a consumer program's `dead-letters` command:
//! [`list`], [`get`], [`purge`], [`delete`] and [`redrive`], which runs the current handler for
//! a parked record exactly once.
//!
//! # The `headers` column
//!
//! JSON text: an array of `[name, value]` pairs in the record's order, where `value` is
//! - `null` for a header without a value,
//! - a JSON string when the value's bytes are valid UTF-8 (the string *is* the value),
//! - `{"base64": "…"}` otherwise (standard alphabet, with padding).
//!
//! so every header a Kafka record can carry round-trips exactly, and the common case (text
//! headers) stays readable in `psql` or `sqlite3`. For example
//! `[["event-id","e-42"],["trace",{"base64":"//4A"}],["empty",null]]`.

use rdkafka::Message;
use rdkafka::Timestamp;
use rdkafka::message::{Header, Headers, OwnedHeaders, OwnedMessage};
use serde_json::Value;
use sqlx::Pool;

use crate::error::{Coordinates, Error, FailureKind, Result, error_chain};
use crate::event_id::EventId;
use crate::handler::{Handler, HandlerError, Record};
use crate::store::{Backend, PartitionKey};
use crate::unit::{identify, run_handler};

/// A record's headers in order, `(name, value)`; `None` for a header without a value.
pub type HeaderList = Vec<(String, Option<Vec<u8>>)>;

/// One parked record: a row of `dead_letters`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// The row's id (for [`get`], [`redrive`], [`delete`]).
    pub id: i64,
    /// The consumer group that parked it.
    pub group: String,
    /// The record's topic.
    pub topic: String,
    /// The record's partition.
    pub partition: i32,
    /// The record's offset.
    pub offset: i64,
    /// The record's key.
    pub key: Option<Vec<u8>>,
    /// The record's headers, in order, exactly as they were: `(name, value)`.
    pub headers: HeaderList,
    /// The record's payload.
    pub payload: Option<Vec<u8>>,
    /// The record's timestamp, milliseconds since the Unix epoch.
    pub timestamp_ms: Option<i64>,
    /// The record's event id, when it had one (an undecodable record may have one from its
    /// header; a record without an id has none).
    pub event_id: Option<String>,
    /// The last error, as text.
    pub error: String,
    /// What kind of failure (stored as [`FailureKind::as_str`]).
    pub kind: FailureKind,
    /// How many times the handler ran and failed for it (0: it never ran).
    pub attempts: u32,
    /// When it was first parked, UTC, RFC 3339.
    pub first_failed_at: String,
    /// When it last failed (parked again, or a redrive failed), UTC, RFC 3339.
    pub last_failed_at: String,
}

impl DeadLetter {
    /// Where the record is.
    pub fn coordinates(&self) -> Coordinates {
        Coordinates {
            topic: self.topic.clone(),
            partition: self.partition,
            offset: self.offset,
        }
    }

    /// The record as the consumer received it (the broker's timestamp kind is not kept).
    pub fn to_message(&self) -> OwnedMessage {
        let headers = if self.headers.is_empty() {
            None
        } else {
            let mut h = OwnedHeaders::new_with_capacity(self.headers.len());
            for (name, value) in &self.headers {
                h = h.insert(Header {
                    key: name.as_str(),
                    value: value.as_deref(),
                });
            }
            Some(h)
        };
        OwnedMessage::new(
            self.payload.clone(),
            self.key.clone(),
            self.topic.clone(),
            self.timestamp_ms
                .map_or(Timestamp::NotAvailable, Timestamp::CreateTime),
            self.partition,
            self.offset,
            headers,
        )
    }
}

/// What [`redrive`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Redriven {
    /// The handler ran and committed; the event id is claimed in the ledger and the dead
    /// letter is gone, all in one transaction.
    Applied {
        /// The event id claimed.
        event_id: String,
    },
    /// The ledger already held the event id (a replay or another redrive applied it): the
    /// handler did not run, and the dead letter was deleted.
    AlreadyApplied {
        /// The event id.
        event_id: String,
    },
    /// No dead letter has this id (already redriven, or purged). Nothing changed.
    NotFound,
    /// The record failed permanently again (rejected, panicked, still undecodable or without
    /// an event id): nothing was applied, the dead letter stays, with this error, one more
    /// attempt and a new `last_failed_at`.
    Failed {
        /// What kind of failure.
        kind: FailureKind,
        /// The error.
        error: String,
    },
    /// The handler asked for a retry: nothing changed; redrive it again later.
    Retry {
        /// The error.
        error: String,
    },
}

/// A group's dead letters, of one topic or all, ordered by topic, partition and offset.
pub async fn list<DB: Backend>(
    pool: &Pool<DB>,
    schema: &str,
    group: &str,
    topic: Option<&str>,
) -> Result<Vec<DeadLetter>> {
    let q = DB::queries(schema)?;
    DB::dead_letters(pool, &q, group, topic)
        .await
        .map_err(Error::db("reading dead letters"))
}

/// One dead letter by id.
pub async fn get<DB: Backend>(
    pool: &Pool<DB>,
    schema: &str,
    id: i64,
) -> Result<Option<DeadLetter>> {
    let q = DB::queries(schema)?;
    DB::dead_letter(pool, &q, id)
        .await
        .map_err(Error::db("reading a dead letter"))
}

/// Deletes a group's dead letters, of one topic or all, without applying them; returns how
/// many. Their records are then neither applied nor parked anywhere: only for records you
/// have decided to drop.
pub async fn purge<DB: Backend>(
    pool: &Pool<DB>,
    schema: &str,
    group: &str,
    topic: Option<&str>,
) -> Result<u64> {
    let q = DB::queries(schema)?;
    DB::purge_dead_letters(pool, &q, group, topic)
        .await
        .map_err(Error::db("purging dead letters"))
}

/// Deletes one dead letter without applying it; `false` if there was none.
pub async fn delete<DB: Backend>(pool: &Pool<DB>, schema: &str, id: i64) -> Result<bool> {
    let q = DB::queries(schema)?;
    DB::delete_dead_letter(pool, &q, id)
        .await
        .map_err(Error::db("deleting a dead letter"))
}

/// Runs `handler` for the parked record `id`, exactly once.
///
/// One transaction deletes the dead letter (`DELETE … RETURNING`, which also locks it against
/// a concurrent redrive), works out the event id under `strategy` (as the consumer would),
/// claims it in the group's ledger and runs the handler. It commits only if the handler
/// succeeds, so the effect, the ledger row and the removal of the dead letter happen together.
/// A second redrive, concurrent or later, finds no row ([`Redriven::NotFound`]); a record
/// whose event id the ledger already holds is not applied again
/// ([`Redriven::AlreadyApplied`]). A handler that rejects or panics leaves the dead letter in
/// place with the new error ([`Redriven::Failed`]); one that asks for a retry changes nothing
/// ([`Redriven::Retry`]). Errors are the database's.
pub async fn redrive<H: Handler<DB>, DB: Backend>(
    pool: &Pool<DB>,
    schema: &str,
    handler: &H,
    strategy: &EventId<H::Event>,
    id: i64,
) -> Result<Redriven> {
    let q = DB::queries(schema)?;
    let context = "redriving a dead letter";
    let mut tx = DB::begin(pool).await.map_err(Error::db(context))?;
    let Some(letter) = DB::take_dead_letter(&mut tx, &q, id)
        .await
        .map_err(Error::db(context))?
    else {
        tx.rollback().await.map_err(Error::db(context))?;
        return Ok(Redriven::NotFound);
    };
    let message = letter.to_message();
    let (event, event_id) = match identify(strategy, &message) {
        Ok(found) => found,
        Err((kind, source)) => {
            tx.rollback().await.map_err(Error::db(context))?;
            return failed_again::<DB>(pool, &q, id, kind, error_chain(source.as_ref())).await;
        }
    };
    let key = PartitionKey {
        group: letter.group.clone(),
        topic: letter.topic.clone(),
        partition: letter.partition,
    };
    let claimed = DB::claim_events(&mut tx, &q, &key, &[&event_id], &[letter.offset])
        .await
        .map_err(Error::db(context))?;
    if claimed.is_empty() {
        tx.commit().await.map_err(Error::db(context))?;
        return Ok(Redriven::AlreadyApplied { event_id });
    }
    let record = Record::new(&message, &event_id);
    match run_handler(handler, &mut tx, record, event, 1).await {
        Ok(Ok(())) => {
            tx.commit().await.map_err(Error::db(context))?;
            tracing::info!(id, topic = %letter.topic, partition = letter.partition, offset = letter.offset, %event_id, "dead letter redriven");
            Ok(Redriven::Applied { event_id })
        }
        Ok(Err(HandlerError::Retry { source, .. })) => {
            tx.rollback().await.map_err(Error::db(context))?;
            Ok(Redriven::Retry {
                error: error_chain(source.as_ref()),
            })
        }
        Ok(Err(HandlerError::Reject { source })) => {
            tx.rollback().await.map_err(Error::db(context))?;
            failed_again::<DB>(
                pool,
                &q,
                id,
                FailureKind::Rejected,
                error_chain(source.as_ref()),
            )
            .await
        }
        Err(panic) => {
            // The transaction may be mid-statement: dropping it rolls it back.
            drop(tx);
            failed_again::<DB>(pool, &q, id, FailureKind::Panicked, panic).await
        }
    }
}

async fn failed_again<DB: Backend>(
    pool: &Pool<DB>,
    q: &crate::store::Queries,
    id: i64,
    kind: FailureKind,
    error: String,
) -> Result<Redriven> {
    DB::dead_letter_failed_again(pool, q, id, kind, &error)
        .await
        .map_err(Error::db("recording a failed redrive"))?;
    Ok(Redriven::Failed { kind, error })
}

/// Encodes a record's headers as the `headers` column holds them (see the [module](self)
/// documentation).
pub fn encode_headers(message: &OwnedMessage) -> String {
    let pairs: Vec<Value> = message
        .headers()
        .into_iter()
        .flat_map(|h| h.iter())
        .map(|h| {
            let value = match h.value {
                None => Value::Null,
                Some(bytes) => match std::str::from_utf8(bytes) {
                    Ok(text) => Value::String(text.to_owned()),
                    Err(_) => serde_json::json!({ "base64": base64_encode(bytes) }),
                },
            };
            Value::Array(vec![Value::String(h.key.to_owned()), value])
        })
        .collect();
    Value::Array(pairs).to_string()
}

/// Decodes the `headers` column (see the [module](self) documentation).
pub fn decode_headers(text: &str) -> Result<HeaderList, String> {
    let bad = |why: &str| format!("malformed dead-letter headers ({why}): {text}");
    let value: Value = serde_json::from_str(text).map_err(|e| bad(&e.to_string()))?;
    let Value::Array(pairs) = value else {
        return Err(bad("not an array"));
    };
    pairs
        .into_iter()
        .map(|pair| match pair {
            Value::Array(mut kv) if kv.len() == 2 => {
                let value = kv.pop().expect("two elements");
                let Value::String(name) = kv.pop().expect("two elements") else {
                    return Err(bad("a header name is not a string"));
                };
                let value = match value {
                    Value::Null => None,
                    Value::String(s) => Some(s.into_bytes()),
                    Value::Object(o) => match o.get("base64") {
                        Some(Value::String(b)) if o.len() == 1 => {
                            Some(base64_decode(b).ok_or_else(|| bad("invalid base64"))?)
                        }
                        _ => return Err(bad("an object value must be {\"base64\": …}")),
                    },
                    _ => return Err(bad("a header value must be null, a string or an object")),
                };
                Ok((name, value))
            }
            _ => Err(bad("a header is not a [name, value] pair")),
        })
        .collect()
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn base64_encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(B64[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let bytes = text.as_bytes();
    if !bytes.len().is_multiple_of(4) {
        return None;
    }
    let mut out = Vec::with_capacity(bytes.len() / 4 * 3);
    for (i, chunk) in bytes.chunks(4).enumerate() {
        let last = i == bytes.len() / 4 - 1;
        let pad = chunk.iter().rev().take_while(|&&c| c == b'=').count();
        if pad > 2 || (pad > 0 && !last) {
            return None;
        }
        let mut n = 0u32;
        for &c in &chunk[..4 - pad] {
            let v = B64.iter().position(|&x| x == c)? as u32;
            n = (n << 6) | v;
        }
        n <<= 6 * pad as u32;
        let decoded = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&decoded[..3 - pad]);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips_every_length() {
        let data: Vec<u8> = (0..=255u8).rev().collect();
        for n in 0..40 {
            let enc = base64_encode(&data[..n]);
            assert_eq!(
                base64_decode(&enc).as_deref(),
                Some(&data[..n]),
                "{n} {enc}"
            );
        }
        assert_eq!(base64_encode(b"foobar"), "Zm9vYmFy");
        assert_eq!(base64_encode(b"fo"), "Zm8=");
        assert_eq!(base64_decode("Zm9=v"), None);
        assert_eq!(base64_decode("Z==="), None);
    }

    #[test]
    fn headers_round_trip_losslessly() {
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "event-id",
                value: Some(b"e-1".as_slice()),
            })
            .insert(Header {
                key: "bin",
                value: Some([0xff, 0xfe, 0x00, 0x80].as_slice()),
            })
            .insert(Header::<&[u8]> {
                key: "none",
                value: None,
            })
            .insert(Header {
                key: "bin",
                value: Some(b"".as_slice()),
            });
        let m = OwnedMessage::new(
            None,
            None,
            "t".into(),
            Timestamp::NotAvailable,
            0,
            0,
            Some(headers),
        );
        let text = encode_headers(&m);
        assert_eq!(
            text,
            r#"[["event-id","e-1"],["bin",{"base64":"//4AgA=="}],["none",null],["bin",""]]"#
        );
        assert_eq!(
            decode_headers(&text).unwrap(),
            vec![
                ("event-id".to_owned(), Some(b"e-1".to_vec())),
                ("bin".to_owned(), Some(vec![0xff, 0xfe, 0x00, 0x80])),
                ("none".to_owned(), None),
                ("bin".to_owned(), Some(Vec::new())),
            ]
        );
        assert!(decode_headers(r#"[["a",{"base64":"!"}]]"#).is_err());
        assert!(decode_headers(r#"{"a":1}"#).is_err());
        assert_eq!(decode_headers("[]").unwrap(), vec![]);
    }
}
