//! The stored form of a dead letter: the `dead_letters` row, and the codec of its `headers`
//! column. The unit of work writes rows in this format when it parks a record; the admin API
//! ([`crate::dead_letters`]) reads them back.
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

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use rdkafka::Message;
use rdkafka::Timestamp;
use rdkafka::message::{Header, Headers, OwnedHeaders, OwnedMessage};
use serde_json::Value;

use crate::error::{Coordinates, FailureKind};

/// A record's headers in order, `(name, value)`; `None` for a header without a value.
pub type HeaderList = Vec<(String, Option<Vec<u8>>)>;

/// One parked record: a row of `dead_letters`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// The row's id (for `get`, `redrive` and `delete` in [`crate::dead_letters`]).
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

/// A `dead_letters` row as the database returns it, decoded by column name. The SQL of both
/// databases selects these names (PostgreSQL formats the two times with `to_char`).
#[derive(sqlx::FromRow)]
pub(crate) struct DeadLetterRow {
    id: i64,
    consumer_group: String,
    topic: String,
    partition: i32,
    offset: i64,
    key: Option<Vec<u8>>,
    headers: String,
    payload: Option<Vec<u8>>,
    timestamp_ms: Option<i64>,
    event_id: Option<String>,
    error: String,
    error_kind: String,
    attempts: i32,
    first_failed_at: String,
    last_failed_at: String,
}

impl TryFrom<DeadLetterRow> for DeadLetter {
    type Error = sqlx::Error;

    fn try_from(row: DeadLetterRow) -> Result<Self, sqlx::Error> {
        Ok(DeadLetter {
            id: row.id,
            group: row.consumer_group,
            topic: row.topic,
            partition: row.partition,
            offset: row.offset,
            key: row.key,
            headers: decode_headers(&row.headers).map_err(|e| sqlx::Error::Decode(e.into()))?,
            payload: row.payload,
            timestamp_ms: row.timestamp_ms,
            event_id: row.event_id,
            error: row.error,
            kind: row
                .error_kind
                .parse()
                .map_err(|e: String| sqlx::Error::Decode(e.into()))?,
            attempts: row.attempts.max(0) as u32,
            first_failed_at: row.first_failed_at,
            last_failed_at: row.last_failed_at,
        })
    }
}

/// Encodes a record's headers as the `headers` column holds them (see the [module](self)
/// documentation).
pub(crate) fn encode_headers(message: &OwnedMessage) -> String {
    let pairs: Vec<Value> = message
        .headers()
        .into_iter()
        .flat_map(|h| h.iter())
        .map(|h| {
            let value = match h.value {
                None => Value::Null,
                Some(bytes) => match std::str::from_utf8(bytes) {
                    Ok(text) => Value::String(text.to_owned()),
                    Err(_) => serde_json::json!({ "base64": BASE64.encode(bytes) }),
                },
            };
            Value::Array(vec![Value::String(h.key.to_owned()), value])
        })
        .collect();
    Value::Array(pairs).to_string()
}

/// Decodes the `headers` column (see the [module](self) documentation).
pub(crate) fn decode_headers(text: &str) -> Result<HeaderList, String> {
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
                        Some(Value::String(b)) if o.len() == 1 => Some(
                            BASE64
                                .decode(b)
                                .map_err(|e| bad(&format!("invalid base64: {e}")))?,
                        ),
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

#[cfg(test)]
mod tests {
    use super::*;

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
        assert!(decode_headers(r#"[["a",{"base64":"Zm9=v"}]]"#).is_err());
        assert!(decode_headers(r#"{"a":1}"#).is_err());
        assert_eq!(decode_headers("[]").unwrap(), vec![]);
    }
}
