//! The runtime's error type.

use std::fmt;

/// A boxed error from user code (a handler, a decoder, an event-id function).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// `Result` with this crate's [`Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Where a record sits in Kafka: topic, partition and offset.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Coordinates {
    /// The topic.
    pub topic: String,
    /// The partition.
    pub partition: i32,
    /// The offset.
    pub offset: i64,
}

impl fmt::Display for Coordinates {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}@{}", self.topic, self.partition, self.offset)
    }
}

/// Everything that can stop the runtime. Every variant names the problem and, where there is
/// one, the fix.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The configuration is incomplete or contradictory.
    #[error("invalid configuration: {0}")]
    Config(String),

    /// The database could not be reached when the runtime started.
    #[error(
        "cannot connect to the database at {url}: {source}; check the database URL and that the server is running"
    )]
    DatabaseUnreachable {
        /// The database URL with any password removed.
        url: String,
        /// What the driver said.
        #[source]
        source: sqlx::Error,
    },

    /// A database operation failed.
    #[error("database error while {context}: {source}")]
    Database {
        /// What the runtime was doing.
        context: &'static str,
        /// What the driver said.
        #[source]
        source: sqlx::Error,
    },

    /// The runtime's tables are missing or older than this version of the runtime.
    #[error(
        "the database schema `{schema}` is at migration version {applied} but this runtime needs version {required}; run the `migrate` command (or `consumer_runtime::migrate`) first"
    )]
    SchemaBehind {
        /// The schema (PostgreSQL) or table prefix (SQLite) of the runtime's tables.
        schema: String,
        /// The newest migration applied, or `none`.
        applied: String,
        /// The newest migration this runtime ships.
        required: i64,
    },

    /// Applying the runtime's migrations failed.
    #[error("applying the runtime's migrations to schema `{schema}` failed: {source}")]
    Migrate {
        /// The schema being migrated.
        schema: String,
        /// What the migrator said.
        #[source]
        source: sqlx::migrate::MigrateError,
    },

    /// The Kafka brokers could not be reached.
    #[error(
        "cannot reach the Kafka brokers at {brokers}: {detail}; check the bootstrap servers and that the brokers are running"
    )]
    BrokerUnreachable {
        /// The bootstrap servers that were tried.
        brokers: String,
        /// What librdkafka said.
        detail: String,
    },

    /// A replay or an offset change would move a partition below its ledger floor: the dedup
    /// ledger no longer remembers every event there (retention pruned it), so records would
    /// be applied a second time.
    #[error(
        "moving {topic}/{partition} to offset {offset} goes below its ledger floor {floor}: ledger retention has pruned the rows of events before offset {floor}, so up to {records} records ({offset}..{floor}) would be applied a second time; move it to {floor} or later, or, for a deliberate rebuild, force it with --below-floor (Store::set_offsets_below_floor, or ReplayRequest::below_floor)"
    )]
    BelowLedgerFloor {
        /// The topic.
        topic: String,
        /// The partition.
        partition: i32,
        /// The offset asked for.
        offset: i64,
        /// The partition's ledger floor.
        floor: i64,
        /// How many records lie between the offset and the floor: at most that many would be
        /// applied a second time.
        records: i64,
    },

    /// A subscribed topic does not exist.
    #[error(
        "topic `{topic}` does not exist on the brokers at {brokers}; create it or fix the topic name"
    )]
    UnknownTopic {
        /// The missing topic.
        topic: String,
        /// The bootstrap servers.
        brokers: String,
    },

    /// The brokers answered a lookup by time (ListOffsets by timestamp) with an offset that
    /// the partition's own records contradict: the record there is earlier than the time, or
    /// the record before it is not. The runtime refused to use the answer.
    #[error(
        "the Kafka brokers at {brokers} answered that the first record of {topic}/{partition} at or after {time} is at offset {answer}, but {contradiction}; refused (nothing was changed): the broker's lookup by time is wrong, so replay from an offset instead"
    )]
    BrokerAnswerContradicted {
        /// The bootstrap servers.
        brokers: String,
        /// The topic.
        topic: String,
        /// The partition.
        partition: i32,
        /// The time asked for, as RFC 3339.
        time: String,
        /// The offset the brokers answered.
        answer: i64,
        /// What the records say instead.
        contradiction: String,
    },

    /// A Kafka client operation failed.
    #[error("Kafka error while {context}: {source}")]
    Kafka {
        /// What the runtime was doing.
        context: &'static str,
        /// What librdkafka said.
        #[source]
        source: rdkafka::error::KafkaError,
    },

    /// A record failed permanently and could not be parked in `dead_letters` either (the
    /// dead-letter insert itself failed with an error that is not a passing database outage),
    /// so the runtime stopped its partition rather than skip it. The stored offset still points
    /// at (or before) this record, so nothing is lost: fix the cause and start the consumer
    /// again. (A record that fails permanently is normally parked, and the consumer goes on.)
    #[error(
        "record {at} failed permanently ({kind}): {reason}; the partition stopped before this record and its stored offset was not advanced past it"
    )]
    RecordFailed {
        /// Where the record is.
        at: Coordinates,
        /// What kind of failure it was.
        kind: FailureKind,
        /// The error, as text.
        reason: String,
    },

    /// The circuit breaker stopped the consumer: parking had become the norm.
    #[error(
        "circuit breaker open: {why}, the last of them {at} ({reason}). The consumer stopped instead of dead-lettering the rest of the topic: fix the cause (a bad deploy? a changed schema?), redrive the parked records (`dead-letters redrive --all`), and start it again"
    )]
    CircuitOpen {
        /// Which limit was reached.
        why: String,
        /// The last record parked.
        at: Coordinates,
        /// Its error.
        reason: String,
    },

    /// A handler panicked or a runtime task died unexpectedly.
    #[error("internal error: {0}")]
    Internal(String),
}

/// Why a record failed permanently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FailureKind {
    /// The payload could not be decoded into the handler's event type.
    Undecodable,
    /// The record carries no usable event id under the configured strategy.
    MissingEventId,
    /// The handler rejected the record.
    Rejected,
    /// The handler asked for retries more often than the retry policy allows.
    RetriesExhausted,
    /// The handler panicked.
    Panicked,
}

impl fmt::Display for FailureKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FailureKind::Undecodable => "undecodable payload",
            FailureKind::MissingEventId => "no event id",
            FailureKind::Rejected => "rejected by the handler",
            FailureKind::RetriesExhausted => "retries exhausted",
            FailureKind::Panicked => "the handler panicked",
        })
    }
}

impl FailureKind {
    /// The stable name stored in `dead_letters.error_kind`: `decode`, `missing_event_id`,
    /// `rejected`, `retries_exhausted` or `panicked`.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Undecodable => "decode",
            FailureKind::MissingEventId => "missing_event_id",
            FailureKind::Rejected => "rejected",
            FailureKind::RetriesExhausted => "retries_exhausted",
            FailureKind::Panicked => "panicked",
        }
    }
}

impl std::str::FromStr for FailureKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "decode" => FailureKind::Undecodable,
            "missing_event_id" => FailureKind::MissingEventId,
            "rejected" => FailureKind::Rejected,
            "retries_exhausted" => FailureKind::RetriesExhausted,
            "panicked" => FailureKind::Panicked,
            other => {
                return Err(format!(
                    "unknown failure kind `{other}`; expected decode, missing_event_id, rejected, retries_exhausted or panicked"
                ));
            }
        })
    }
}

/// Whether a database error says the database is unavailable rather than that a statement was
/// wrong: such failures are the infrastructure's, not the record's, and are retried without
/// limit.
pub(crate) fn is_infrastructure(e: &(dyn std::error::Error + 'static)) -> bool {
    match e.downcast_ref::<sqlx::Error>() {
        Some(
            sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed
            | sqlx::Error::Protocol(_)
            | sqlx::Error::Tls(_),
        ) => true,
        Some(sqlx::Error::Database(db)) => {
            // PostgreSQL: connection exceptions, shutdown, serialization/deadlock
            // (40xxx), insufficient resources; SQLite: busy/locked.
            let code = db.code().unwrap_or_default();
            code.starts_with("08")
                || code.starts_with("57P")
                || code.starts_with("40")
                || code.starts_with("53")
                || code == "5"
                || code == "6"
        }
        _ => false,
    }
}

/// An error and its sources, joined with `: `.
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let next = s.to_string();
        if !text.ends_with(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = s.source();
    }
    text
}

impl Error {
    pub(crate) fn db(context: &'static str) -> impl FnOnce(sqlx::Error) -> Error {
        move |source| Error::Database { context, source }
    }

    pub(crate) fn kafka(context: &'static str) -> impl FnOnce(rdkafka::error::KafkaError) -> Error {
        move |source| Error::Kafka { context, source }
    }
}

/// Removes the password from a URL such as `postgres://user:secret@host/db`, so it can be shown
/// in logs and errors.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    match authority.rfind('@') {
        Some(at) => {
            let userinfo = &authority[..at];
            match userinfo.find(':') {
                Some(colon) => format!(
                    "{}{}:***{}",
                    &url[..scheme_end + 3],
                    &userinfo[..colon],
                    &rest[at..]
                ),
                None => url.to_owned(),
            }
        }
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn redact_url_hides_password_only() {
        assert_eq!(
            redact_url("postgres://app:s3cret@db:5432/x?sslmode=disable"),
            "postgres://app:***@db:5432/x?sslmode=disable"
        );
        assert_eq!(redact_url("postgres://app@db/x"), "postgres://app@db/x");
        assert_eq!(redact_url("sqlite://data.db"), "sqlite://data.db");
    }
}
