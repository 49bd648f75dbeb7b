//! The transactional outbox: events an application writes in its own database transaction,
//! which the [relay](crate::relay) publishes to Kafka once the transaction has committed.
//!
//! A row commits with the business change that caused it, or not at all, so no event is
//! published for a change that rolled back, and none is lost for a change that committed.
//! Every row carries a unique event id that the relay sends in the `event-id` header, the
//! header a consumer built with this runtime dedupes on by default: the duplicates the relay
//! may produce (it is at-least-once) are suppressed by the consumer's ledger, with no
//! configuration.
//!
//! ```no_run
//! use consumer_runtime::outbox::{self, Message};
//!
//! # async fn run(pool: sqlx::PgPool) -> Result<(), consumer_runtime::Error> {
//! let mut tx = pool.begin().await.map_err(|e| consumer_runtime::Error::Database { context: "begin", source: e })?;
//! // … the business change, on `&mut *tx` …
//! let event_id = outbox::publish(
//!     &mut tx,
//!     &Message::new("order-paid").key("order-17").payload(br#"{"order":17}"#.to_vec()),
//! )
//! .await?;
//! tx.commit().await.map_err(|e| consumer_runtime::Error::Database { context: "commit", source: e })?;
//! # let _ = event_id;
//! # Ok(())
//! # }
//! ```
//!
//! A handler writes rows through its context, [`Context::publish`](crate::Context::publish):
//! consuming an event, writing the database and emitting an event are then one transaction.
//!
//! The table (`outbox` in the runtime's schema) has the layout of Debezium's outbox event
//! router: `id` (the event id), `aggregatetype` (the topic), `aggregateid` (the key), `type`,
//! `payload`, so that Debezium can replace the relay (route by `aggregatetype` with
//! `route.topic.replacement=${routedByValue}`, and a binary payload converter).
//!
//! **Order.** Rows of one key are published in the order their transactions committed. On
//! PostgreSQL, [`publish`] takes a transaction-scoped advisory lock on the key's hash before
//! it inserts, so that two transactions writing the same key insert one after the other (the
//! second waits for the first to commit or roll back); SQLite has one writer at a time.
//! Rows without a key have no order.

use sqlx::{PgConnection, Postgres, Sqlite, SqliteConnection, Transaction};

use crate::error::{Error, Result};
use crate::store::outbox::NewRow;
use crate::store::{Backend, Store};

pub use crate::store::outbox::{LaneBacklog, LaneLease, LedgerEntry, OutboxEntry};

/// The schema [`publish`] writes to: the runtime's default schema.
pub const DEFAULT_SCHEMA: &str = "consumer_runtime";

/// The header the relay sends each row's event id in: the header a consumer of this runtime
/// takes its event id from by default.
pub const EVENT_ID_HEADER: &str = "event-id";

/// The header the relay sends a row's `type` in, when it is not empty.
pub const TYPE_HEADER: &str = "type";

/// One event to publish: topic, key, payload, headers, and optionally a type and an event id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    topic: String,
    key: Option<String>,
    payload: Option<Vec<u8>>,
    headers: Vec<(String, Option<Vec<u8>>)>,
    kind: String,
    event_id: Option<String>,
}

impl Message {
    /// An event for `topic`, without key, payload or headers yet.
    pub fn new(topic: impl Into<String>) -> Message {
        Message {
            topic: topic.into(),
            key: None,
            payload: None,
            headers: Vec::new(),
            kind: String::new(),
            event_id: None,
        }
    }

    /// The record key (Debezium's `aggregateid`). Rows of one key are published in commit
    /// order, and Kafka's default partitioner puts them in one partition.
    pub fn key(mut self, key: impl Into<String>) -> Message {
        self.key = Some(key.into());
        self
    }

    /// The payload's bytes.
    pub fn payload(mut self, payload: impl Into<Vec<u8>>) -> Message {
        self.payload = Some(payload.into());
        self
    }

    /// The payload as the JSON of `value`.
    pub fn json<T: serde::Serialize + ?Sized>(self, value: &T) -> Result<Message> {
        let bytes = serde_json::to_vec(value).map_err(|e| {
            Error::Config(format!("the outbox payload is not JSON-serializable: {e}"))
        })?;
        Ok(self.payload(bytes))
    }

    /// A header (sent after the `event-id` header, in the order added).
    pub fn header(mut self, name: impl Into<String>, value: impl Into<Vec<u8>>) -> Message {
        self.headers.push((name.into(), Some(value.into())));
        self
    }

    /// The event's type (Debezium's `type` column), sent as the `type` header.
    pub fn kind(mut self, kind: impl Into<String>) -> Message {
        self.kind = kind.into();
        self
    }

    /// The event id to send in the `event-id` header, instead of a fresh UUID: a business
    /// idempotency key. It must be unique in the outbox; a second row with the same id fails
    /// with a unique violation (and its transaction with it).
    pub fn event_id(mut self, id: impl Into<String>) -> Message {
        self.event_id = Some(id.into());
        self
    }

    /// The topic.
    pub fn topic_name(&self) -> &str {
        &self.topic
    }

    fn check(&self) -> Result<()> {
        if self.topic.is_empty() {
            return Err(Error::Config(
                "an outbox message needs a topic; pass it to Message::new".to_owned(),
            ));
        }
        if self.event_id.as_deref() == Some("") {
            return Err(Error::Config(
                "an outbox message's event id is empty; leave it unset for a fresh UUID".to_owned(),
            ));
        }
        if self.headers.iter().any(|(n, _)| n == EVENT_ID_HEADER) {
            return Err(Error::Config(format!(
                "an outbox message may not set the `{EVENT_ID_HEADER}` header itself; use Message::event_id"
            )));
        }
        Ok(())
    }
}

/// The 32-bit FNV-1a hash of a key, which assigns rows to the relay's lanes
/// (`hash % lanes`). Stable across versions and platforms.
pub fn key_hash(key: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in key {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// A connection an outbox row can be written on: `&mut Transaction<'_, Postgres>` (or
/// `Sqlite`), or the connection of one (`&mut *tx`, `&mut PgConnection`, `&mut
/// SqliteConnection`). Sealed.
pub trait OutboxConnection: Send + sealed::Sealed {
    /// The database.
    type Database: Backend;
    /// The connection.
    fn connection(&mut self) -> &mut <Self::Database as sqlx::Database>::Connection;
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for sqlx::PgConnection {}
    impl Sealed for sqlx::SqliteConnection {}
    impl Sealed for sqlx::Transaction<'_, sqlx::Postgres> {}
    impl Sealed for sqlx::Transaction<'_, sqlx::Sqlite> {}
}

impl OutboxConnection for PgConnection {
    type Database = Postgres;
    fn connection(&mut self) -> &mut PgConnection {
        self
    }
}

impl OutboxConnection for SqliteConnection {
    type Database = Sqlite;
    fn connection(&mut self) -> &mut SqliteConnection {
        self
    }
}

impl OutboxConnection for Transaction<'_, Postgres> {
    type Database = Postgres;
    fn connection(&mut self) -> &mut PgConnection {
        self
    }
}

impl OutboxConnection for Transaction<'_, Sqlite> {
    type Database = Sqlite;
    fn connection(&mut self) -> &mut SqliteConnection {
        self
    }
}

/// The outbox of one schema (PostgreSQL) or table prefix (SQLite). [`publish`] is
/// `Outbox::default().publish`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outbox {
    schema: String,
}

impl Default for Outbox {
    fn default() -> Self {
        Outbox {
            schema: DEFAULT_SCHEMA.to_owned(),
        }
    }
}

impl Outbox {
    /// The outbox in `schema`; refuses a schema that is not a plain identifier.
    pub fn new(schema: &str) -> Result<Outbox> {
        crate::util::check_identifier("schema", schema)?;
        Ok(Outbox {
            schema: schema.to_owned(),
        })
    }

    /// The schema.
    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// Writes `message` as an outbox row on `conn`, inside the caller's transaction; returns
    /// its event id. The row is published after the transaction commits, and never if it
    /// rolls back. On PostgreSQL it waits for any other open transaction that wrote the same
    /// key (see the [module](self) documentation) and wakes the relays at commit
    /// (`NOTIFY`).
    pub async fn publish<C: OutboxConnection + ?Sized>(
        &self,
        conn: &mut C,
        message: &Message,
    ) -> Result<String> {
        write::<C::Database>(conn.connection(), &self.schema, message).await
    }
}

/// Writes `message` as an outbox row in the runtime's default schema (`consumer_runtime`),
/// inside the caller's transaction; returns its event id. See [`Outbox::publish`] (and
/// [`Outbox::new`] for another schema).
pub async fn publish<C: OutboxConnection + ?Sized>(
    conn: &mut C,
    message: &Message,
) -> Result<String> {
    Outbox::default().publish(conn, message).await
}

pub(crate) async fn write<DB: Backend>(
    conn: &mut DB::Connection,
    schema: &str,
    message: &Message,
) -> Result<String> {
    message.check()?;
    let q = queries::<DB>(schema);
    let hash = match &message.key {
        Some(key) => key_hash(key.as_bytes()),
        // No order to keep: spread keyless rows over the lanes.
        None => crate::util::random_u64() as u32,
    };
    let headers = encode_headers(&message.headers);
    let row = NewRow {
        id: message.event_id.as_deref(),
        topic: &message.topic,
        key: message.key.as_deref(),
        kind: &message.kind,
        payload: message.payload.as_deref(),
        headers,
        key_hash: i64::from(hash),
    };
    DB::outbox_insert(conn, &q, &row)
        .await
        .map_err(Error::db("writing an outbox row"))
}

/// The outbox statements of `DB` for `schema`, built once per process and schema (a writer
/// calls [`publish`] for every event).
fn queries<DB: Backend>(schema: &str) -> std::sync::Arc<crate::store::outbox::OutboxQueries> {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex, OnceLock};
    // Keyed by (is PostgreSQL, schema).
    type Cache = Mutex<HashMap<(bool, String), Arc<crate::store::outbox::OutboxQueries>>>;
    static CACHE: OnceLock<Cache> = OnceLock::new();
    let mut cache = CACHE
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    cache
        .entry((
            matches!(DB::KIND, crate::DatabaseKind::Postgres),
            schema.to_owned(),
        ))
        .or_insert_with(|| Arc::new(DB::outbox_queries(schema)))
        .clone()
}

fn encode_headers(headers: &[(String, Option<Vec<u8>>)]) -> String {
    use rdkafka::message::{Header, OwnedHeaders, OwnedMessage, Timestamp};
    let mut owned = OwnedHeaders::new_with_capacity(headers.len());
    for (name, value) in headers {
        owned = owned.insert(Header {
            key: name,
            value: value.as_deref(),
        });
    }
    let message = OwnedMessage::new(
        None,
        None,
        String::new(),
        Timestamp::NotAvailable,
        0,
        0,
        Some(owned),
    );
    crate::store::dead_letter::encode_headers(&message)
}

/// An event's whole path: its outbox row (written, published to a topic, partition and offset,
/// how many times sent, or parked) and every consumer group that applied it: [`Store::trace`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Trace {
    /// The event id.
    pub event_id: String,
    /// Its outbox row, if the outbox still has it (published rows are deleted after
    /// the relay's `keep_published`).
    pub outbox: Option<OutboxEntry>,
    /// The consumer groups whose ledger holds it: where and when each applied it.
    pub applied: Vec<LedgerEntry>,
}

impl Trace {
    /// The path as lines of text, as the `trace` command prints them.
    pub fn lines(&self) -> Vec<String> {
        let mut out = vec![format!("event {}", self.event_id)];
        match &self.outbox {
            None => out.push(
                "  outbox:    no row (not written through this outbox, or published and cleaned up: \
                 keep published rows with the relay's --keep-published to trace them)"
                    .to_owned(),
            ),
            Some(row) => {
                let key = row.aggregateid.as_deref().unwrap_or("(none)");
                out.push(format!(
                    "  written:   {} for topic {}, key {key} (outbox seq {})",
                    row.created_at, row.aggregatetype, row.seq
                ));
                match (&row.published_at, row.published_partition, row.published_offset) {
                    (Some(at), Some(p), Some(o)) => {
                        let by = row.published_by.as_deref().unwrap_or("?");
                        out.push(format!(
                            "  published: {at} to {}/{p}/{o} by {by}; sent {} time{}{}",
                            row.aggregatetype,
                            row.sent_count,
                            if row.sent_count == 1 { "" } else { "s" },
                            if row.sent_count > 1 {
                                format!(
                                    " ({} possible duplicate{}, suppressed by every consumer that dedupes)",
                                    row.sent_count - 1,
                                    if row.sent_count == 2 { "" } else { "s" }
                                )
                            } else {
                                String::new()
                            }
                        ));
                    }
                    _ => match (&row.parked_at, &row.error) {
                        (Some(at), error) => out.push(format!(
                            "  parked:    {at}, not published: {}",
                            error.as_deref().unwrap_or("(no error recorded)")
                        )),
                        _ => out.push(format!(
                            "  published: not yet (sent {} time{} without an acknowledgement recorded)",
                            row.sent_count,
                            if row.sent_count == 1 { "" } else { "s" }
                        )),
                    },
                }
            }
        }
        if self.applied.is_empty() {
            out.push("  applied:   by no consumer group of this database yet".to_owned());
        }
        for a in &self.applied {
            out.push(format!(
                "  applied:   by group {} at {} from {}/{}/{}",
                a.consumer_group, a.processed_at, a.topic, a.partition, a.offset
            ));
            if let Some(row) = &self.outbox
                && let (Some(p), Some(o)) = (row.published_partition, row.published_offset)
                && row.aggregatetype == a.topic
                && (p, o) != (a.partition, a.offset)
            {
                out.push(format!(
                    "  duplicate: the copy at {}/{p}/{o} is a duplicate for group {}: its ledger suppresses it",
                    row.aggregatetype, a.consumer_group
                ));
            }
        }
        out
    }
}

impl<DB: Backend> Store<DB> {
    fn outbox_sql(&self) -> crate::store::outbox::OutboxQueries {
        DB::outbox_queries(self.schema())
    }

    /// An event's path: its outbox row and the consumer groups that applied it.
    pub async fn trace(&self, event_id: &str) -> Result<Trace> {
        let q = self.outbox_sql();
        let outbox = DB::outbox_trace(self.pool(), &q, event_id)
            .await
            .map_err(Error::db("reading the outbox"))?;
        let applied = DB::outbox_ledger(self.pool(), &q, event_id)
            .await
            .map_err(Error::db("reading the ledger"))?;
        Ok(Trace {
            event_id: event_id.to_owned(),
            outbox,
            applied,
        })
    }

    /// The outbox rows the relay parked as unpublishable, oldest first.
    pub async fn outbox_parked(&self) -> Result<Vec<OutboxEntry>> {
        DB::outbox_parked(self.pool(), &self.outbox_sql())
            .await
            .map_err(Error::db("listing parked outbox rows"))
    }

    /// Puts a parked row back for the relay to publish (after fixing its cause: creating the
    /// topic, raising the broker's size limit); `false` if no parked row has that event id.
    pub async fn outbox_retry(&self, event_id: &str) -> Result<bool> {
        DB::outbox_unpark(self.pool(), &self.outbox_sql(), event_id)
            .await
            .map_err(Error::db("retrying a parked outbox row"))
    }

    /// The unpublished rows per lane (for `lanes` lanes), lanes without any left out.
    pub async fn outbox_backlog(&self, lanes: u32) -> Result<Vec<LaneBacklog>> {
        DB::outbox_backlog(self.pool(), &self.outbox_sql(), i64::from(lanes.max(1)))
            .await
            .map_err(Error::db("measuring the outbox"))
    }

    /// The lanes' leases: which relay holds each lane, under which epoch, until when.
    pub async fn outbox_leases(&self) -> Result<Vec<LaneLease>> {
        DB::outbox_leases(self.pool(), &self.outbox_sql())
            .await
            .map_err(Error::db("reading the outbox's lanes"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_hash_is_fnv1a() {
        // The FNV-1a test vectors.
        assert_eq!(key_hash(b""), 0x811c_9dc5);
        assert_eq!(key_hash(b"a"), 0xe40c_292c);
        assert_eq!(key_hash(b"foobar"), 0xbf9c_f968);
    }

    #[test]
    fn a_message_without_topic_or_with_its_own_event_id_header_is_refused() {
        assert!(Message::new("").check().is_err());
        let err = Message::new("t")
            .header("event-id", "x")
            .check()
            .unwrap_err();
        assert!(err.to_string().contains("Message::event_id"), "{err}");
        assert!(Message::new("t").event_id("").check().is_err());
        assert!(Message::new("t").key("k").header("h", "v").check().is_ok());
    }
}
