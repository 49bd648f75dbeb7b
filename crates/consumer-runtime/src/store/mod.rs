//! The runtime's tables and the SQL that reads and writes them, per database.
//!
//! [`Backend`] is implemented for [`sqlx::Postgres`] and [`sqlx::Sqlite`]; it is sealed. Its
//! methods are the building blocks of the unit of work in [`crate::unit`]; they are public for
//! tests and tools, and hidden from the documentation.

/// Implements [`Backend`] for a database: the dialect-specific methods are given, the rest
/// (which differ only in their SQL, kept in [`Queries`]) are the same for every database.
macro_rules! impl_backend {
    ($db:ty, $row:ty; $($specific:tt)*) => {
        fn claim_from(row: $row) -> Result<Claim, sqlx::Error> {
            use sqlx::Row as _;
            Ok(Claim {
                epoch: row.try_get(0)?,
                next_offset: row.try_get(1)?,
            })
        }

        fn dead_letter_from(row: $row) -> Result<crate::dead_letters::DeadLetter, sqlx::Error> {
            use sqlx::Row as _;
            let headers: String = row.try_get(6)?;
            let kind: String = row.try_get(11)?;
            let attempts: i32 = row.try_get(12)?;
            Ok(crate::dead_letters::DeadLetter {
                id: row.try_get(0)?,
                group: row.try_get(1)?,
                topic: row.try_get(2)?,
                partition: row.try_get(3)?,
                offset: row.try_get(4)?,
                key: row.try_get(5)?,
                headers: crate::dead_letters::decode_headers(&headers)
                    .map_err(|e| sqlx::Error::Decode(e.into()))?,
                payload: row.try_get(7)?,
                timestamp_ms: row.try_get(8)?,
                event_id: row.try_get(9)?,
                error: row.try_get(10)?,
                kind: kind.parse().map_err(|e: String| sqlx::Error::Decode(e.into()))?,
                attempts: attempts.max(0) as u32,
                first_failed_at: row.try_get(13)?,
                last_failed_at: row.try_get(14)?,
            })
        }

        #[async_trait::async_trait]
        impl Backend for $db {
            $($specific)*

            async fn park(
                conn: &mut Self::Connection,
                q: &Queries,
                key: &PartitionKey,
                letter: &Parking<'_>,
            ) -> Result<(), sqlx::Error> {
                sqlx::query(q.park.clone())
                    .bind(&key.group)
                    .bind(&key.topic)
                    .bind(key.partition)
                    .bind(letter.offset)
                    .bind(letter.key)
                    .bind(&letter.headers)
                    .bind(letter.payload)
                    .bind(letter.timestamp_ms)
                    .bind(letter.event_id)
                    .bind(letter.error)
                    .bind(letter.kind.as_str())
                    .bind(i32::try_from(letter.attempts).unwrap_or(i32::MAX))
                    .execute(conn)
                    .await?;
                Ok(())
            }

            async fn unclaim(
                conn: &mut Self::Connection,
                q: &Queries,
                group: &str,
                event_id: &str,
            ) -> Result<(), sqlx::Error> {
                sqlx::query(q.unclaim.clone())
                    .bind(group)
                    .bind(event_id)
                    .execute(conn)
                    .await?;
                Ok(())
            }

            async fn dead_letters(
                pool: &Pool<Self>,
                q: &Queries,
                group: &str,
                topic: Option<&str>,
            ) -> Result<Vec<crate::dead_letters::DeadLetter>, sqlx::Error> {
                sqlx::query(q.dl_list.clone())
                    .bind(group)
                    .bind(topic)
                    .fetch_all(pool)
                    .await?
                    .into_iter()
                    .map(dead_letter_from)
                    .collect()
            }

            async fn dead_letter(
                pool: &Pool<Self>,
                q: &Queries,
                id: i64,
            ) -> Result<Option<crate::dead_letters::DeadLetter>, sqlx::Error> {
                sqlx::query(q.dl_get.clone())
                    .bind(id)
                    .fetch_optional(pool)
                    .await?
                    .map(dead_letter_from)
                    .transpose()
            }

            async fn take_dead_letter(
                conn: &mut Self::Connection,
                q: &Queries,
                id: i64,
            ) -> Result<Option<crate::dead_letters::DeadLetter>, sqlx::Error> {
                sqlx::query(q.dl_take.clone())
                    .bind(id)
                    .fetch_optional(conn)
                    .await?
                    .map(dead_letter_from)
                    .transpose()
            }

            async fn purge_dead_letters(
                pool: &Pool<Self>,
                q: &Queries,
                group: &str,
                topic: Option<&str>,
            ) -> Result<u64, sqlx::Error> {
                let done = sqlx::query(q.dl_purge.clone())
                    .bind(group)
                    .bind(topic)
                    .execute(pool)
                    .await?;
                Ok(done.rows_affected())
            }

            async fn delete_dead_letter(
                pool: &Pool<Self>,
                q: &Queries,
                id: i64,
            ) -> Result<bool, sqlx::Error> {
                let done = sqlx::query(q.dl_delete.clone())
                    .bind(id)
                    .execute(pool)
                    .await?;
                Ok(done.rows_affected() == 1)
            }

            async fn dead_letter_failed_again(
                pool: &Pool<Self>,
                q: &Queries,
                id: i64,
                kind: crate::error::FailureKind,
                error: &str,
            ) -> Result<(), sqlx::Error> {
                sqlx::query(q.dl_failed.clone())
                    .bind(id)
                    .bind(kind.as_str())
                    .bind(error)
                    .execute(pool)
                    .await?;
                Ok(())
            }

            async fn claim(
                pool: &Pool<Self>,
                q: &Queries,
                key: &PartitionKey,
                owner: &str,
            ) -> Result<Claim, sqlx::Error> {
                let row = sqlx::query(q.claim.clone())
                    .bind(&key.group)
                    .bind(&key.topic)
                    .bind(key.partition)
                    .bind(owner)
                    .fetch_one(pool)
                    .await?;
                claim_from(row)
            }

            async fn reclaim(
                pool: &Pool<Self>,
                q: &Queries,
                key: &PartitionKey,
                owner: &str,
            ) -> Result<Option<Claim>, sqlx::Error> {
                let row = sqlx::query(q.reclaim.clone())
                    .bind(&key.group)
                    .bind(&key.topic)
                    .bind(key.partition)
                    .bind(owner)
                    .fetch_optional(pool)
                    .await?;
                row.map(claim_from).transpose()
            }

            async fn advance(
                conn: &mut Self::Connection,
                q: &Queries,
                key: &PartitionKey,
                epoch: i64,
                expected: Option<i64>,
                next: i64,
            ) -> Result<bool, sqlx::Error> {
                let done = sqlx::query(q.advance.clone())
                    .bind(&key.group)
                    .bind(&key.topic)
                    .bind(key.partition)
                    .bind(epoch)
                    .bind(expected)
                    .bind(next)
                    .execute(conn)
                    .await?;
                Ok(done.rows_affected() == 1)
            }

            async fn set_offset(
                conn: &mut Self::Connection,
                q: &Queries,
                key: &PartitionKey,
                next_offset: i64,
            ) -> Result<Claim, sqlx::Error> {
                let row = sqlx::query(q.set_offset.clone())
                    .bind(&key.group)
                    .bind(&key.topic)
                    .bind(key.partition)
                    .bind(next_offset)
                    .fetch_one(conn)
                    .await?;
                claim_from(row)
            }

            async fn clear_ledger(
                conn: &mut Self::Connection,
                q: &Queries,
                key: &PartitionKey,
                from: i64,
                to: i64,
            ) -> Result<u64, sqlx::Error> {
                let done = sqlx::query(q.clear_ledger.clone())
                    .bind(&key.group)
                    .bind(&key.topic)
                    .bind(key.partition)
                    .bind(from)
                    .bind(to)
                    .execute(conn)
                    .await?;
                Ok(done.rows_affected())
            }

            async fn ledger_size(
                pool: &Pool<Self>,
                q: &Queries,
                group: &str,
            ) -> Result<i64, sqlx::Error> {
                sqlx::query_scalar(q.ledger_rows.clone())
                    .bind(group)
                    .fetch_one(pool)
                    .await
            }

            async fn offsets(
                pool: &Pool<Self>,
                q: &Queries,
                group: &str,
            ) -> Result<Vec<StoredOffset>> {
                use sqlx::Row as _;
                let rows = sqlx::query(q.offsets.clone())
                    .bind(group)
                    .fetch_all(pool)
                    .await
                    .map_err(Error::db("reading stored offsets"))?;
                rows.into_iter()
                    .map(|r| {
                        Ok(StoredOffset {
                            topic: r.try_get(0)?,
                            partition: r.try_get(1)?,
                            next_offset: r.try_get(2)?,
                            epoch: r.try_get(3)?,
                            owner: r.try_get(4)?,
                            updated_at: r.try_get(5)?,
                        })
                    })
                    .collect::<Result<_, sqlx::Error>>()
                    .map_err(Error::db("reading stored offsets"))
            }
        }
    };
}

mod postgres;
mod sqlite;

use async_trait::async_trait;
use sqlx::migrate::Migrator;
use sqlx::{Pool, Transaction};

use crate::error::{Error, FailureKind, Result};

/// A record being parked in `dead_letters` (the partition comes with it separately).
#[derive(Debug, Clone)]
#[doc(hidden)]
pub struct Parking<'a> {
    /// The record's offset.
    pub offset: i64,
    /// The record's key.
    pub key: Option<&'a [u8]>,
    /// The record's headers, encoded as [`crate::dead_letters::encode_headers`] says.
    pub headers: String,
    /// The record's payload.
    pub payload: Option<&'a [u8]>,
    /// The record's timestamp, milliseconds since the Unix epoch.
    pub timestamp_ms: Option<i64>,
    /// The record's event id, when it has one.
    pub event_id: Option<&'a str>,
    /// The error, as text.
    pub error: &'a str,
    /// What kind of failure.
    pub kind: FailureKind,
    /// How many attempts were made.
    pub attempts: u32,
}

/// A partition of a topic as seen by one consumer group.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PartitionKey {
    /// The consumer group.
    pub group: String,
    /// The topic.
    pub topic: String,
    /// The partition.
    pub partition: i32,
}

/// The result of claiming a partition: the new epoch and where to resume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claim {
    /// The epoch this worker must present to commit.
    pub epoch: i64,
    /// The stored offset to resume from, or `None` if nothing was ever committed (the reset
    /// policy decides).
    pub next_offset: Option<i64>,
}

/// One row of `consumer_offsets`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredOffset {
    /// The topic.
    pub topic: String,
    /// The partition.
    pub partition: i32,
    /// Where the partition resumes.
    pub next_offset: Option<i64>,
    /// The current epoch.
    pub epoch: i64,
    /// The instance that last claimed the partition.
    pub owner: Option<String>,
    /// When the row last changed (a commit, a claim or a replay), UTC, RFC 3339.
    pub updated_at: String,
}

/// The runtime's SQL, with the schema (or table prefix) spliced in once.
#[derive(Debug, Clone)]
#[doc(hidden)]
pub struct Queries {
    pub(crate) schema: String,
    pub(crate) claim: sqlx::SqlStr,
    pub(crate) reclaim: sqlx::SqlStr,
    pub(crate) advance: sqlx::SqlStr,
    pub(crate) claim_events: sqlx::SqlStr,
    pub(crate) set_offset: sqlx::SqlStr,
    pub(crate) offsets: sqlx::SqlStr,
    pub(crate) applied_version: sqlx::SqlStr,
    pub(crate) ledger_known: sqlx::SqlStr,
    pub(crate) clear_ledger: sqlx::SqlStr,
    pub(crate) unclaim: sqlx::SqlStr,
    pub(crate) park: sqlx::SqlStr,
    pub(crate) dl_list: sqlx::SqlStr,
    pub(crate) dl_get: sqlx::SqlStr,
    pub(crate) dl_take: sqlx::SqlStr,
    pub(crate) dl_purge: sqlx::SqlStr,
    pub(crate) dl_delete: sqlx::SqlStr,
    pub(crate) dl_failed: sqlx::SqlStr,
    pub(crate) ledger_rows: sqlx::SqlStr,
}

impl Queries {
    fn build(schema: &str, prefix: &str, templates: &Templates) -> Queries {
        let q = |t: &str| sqlx::AssertSqlSafe(t.replace("{s}", prefix)).into_sql_str();
        Queries {
            schema: schema.to_owned(),
            claim: q(templates.claim),
            reclaim: q(templates.reclaim),
            advance: q(templates.advance),
            claim_events: q(templates.claim_events),
            set_offset: q(templates.set_offset),
            offsets: q(templates.offsets),
            applied_version: q(templates.applied_version),
            ledger_known: q(templates.ledger_known),
            clear_ledger: q(CLEAR_LEDGER),
            unclaim: q(UNCLAIM),
            park: q(templates.park),
            dl_list: q(templates.dl_list),
            dl_get: q(templates.dl_get),
            dl_take: q(templates.dl_take),
            dl_purge: q(templates.dl_purge),
            dl_delete: q(DL_DELETE),
            dl_failed: q(templates.dl_failed),
            ledger_rows: q(LEDGER_ROWS),
        }
    }
}

use sqlx::SqlSafeStr as _;

/// Removes a partition's ledger rows for offsets in `[$4, $5)` (replay `--rebuild`).
const CLEAR_LEDGER: &str = r#"DELETE FROM {s}processed
WHERE consumer_group = $1 AND topic = $2 AND partition = $3 AND "offset" >= $4 AND "offset" < $5"#;

/// Undoes a record's ledger claim made earlier in the same transaction (the record is being
/// parked in `dead_letters` instead of applied).
const UNCLAIM: &str = r#"DELETE FROM {s}processed WHERE consumer_group = $1 AND event_id = $2"#;

/// Counts a group's ledger rows (the ledger size gauge).
const LEDGER_ROWS: &str = r#"SELECT count(*) FROM {s}processed WHERE consumer_group = $1"#;

/// Deletes one dead letter.
const DL_DELETE: &str = r#"DELETE FROM {s}dead_letters WHERE id = $1"#;

struct Templates {
    claim: &'static str,
    reclaim: &'static str,
    advance: &'static str,
    claim_events: &'static str,
    set_offset: &'static str,
    offsets: &'static str,
    applied_version: &'static str,
    ledger_known: &'static str,
    /// Parks a record: `$1..$12` = group, topic, partition, offset, key, headers, payload,
    /// timestamp_ms, event_id, error, error_kind, attempts. Parking the same record again (a
    /// replay, or at-least-once re-running a batch) updates the error and adds the attempts.
    park: &'static str,
    /// A group's dead letters (`$2`: a topic, or NULL for all), oldest coordinates first.
    dl_list: &'static str,
    /// One dead letter by id.
    dl_get: &'static str,
    /// Deletes one dead letter by id and returns it (redrive).
    dl_take: &'static str,
    /// Deletes a group's dead letters (`$2`: a topic, or NULL for all).
    dl_purge: &'static str,
    /// Records another failed attempt (`$1` id, `$2` kind, `$3` error).
    dl_failed: &'static str,
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for sqlx::Postgres {}
    impl Sealed for sqlx::Sqlite {}
}

/// Which database a URL names; the runtime picks its backend by the URL's scheme.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum DatabaseKind {
    /// `postgres://…` or `postgresql://…`.
    Postgres,
    /// `sqlite://…` or `sqlite:…` (a file; `sqlite::memory:` is refused, see
    /// [`DatabaseKind::from_url`]).
    Sqlite,
}

impl DatabaseKind {
    /// The database a URL names, by its scheme.
    ///
    /// An in-memory SQLite database is refused: its ledger and offsets would vanish with the
    /// process, so a restart would re-apply everything.
    pub fn from_url(url: &str) -> Result<DatabaseKind> {
        let scheme = url.split_once(':').map(|(s, _)| s.to_ascii_lowercase());
        match scheme.as_deref() {
            Some("postgres" | "postgresql") => Ok(DatabaseKind::Postgres),
            Some("sqlite") if url.contains(":memory:") || url.contains("mode=memory") => {
                Err(Error::Config(format!(
                    "the database URL `{url}` is an in-memory SQLite database, which forgets the \
                     ledger and offsets when the process exits; use a file, e.g. sqlite://app.db"
                )))
            }
            Some("sqlite") => Ok(DatabaseKind::Sqlite),
            _ => Err(Error::Config(format!(
                "the database URL `{}` names no supported database; use postgres://user@host/db \
                 (PostgreSQL) or sqlite://path/to/file.db (SQLite)",
                crate::error::redact_url(url)
            ))),
        }
    }
}

impl std::fmt::Display for DatabaseKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DatabaseKind::Postgres => "PostgreSQL",
            DatabaseKind::Sqlite => "SQLite",
        })
    }
}

/// A database the runtime can keep its ledger and offsets in: PostgreSQL or SQLite.
#[async_trait]
pub trait Backend: sqlx::Database + sealed::Sealed {
    /// Which database this is.
    const KIND: DatabaseKind;

    /// The runtime's SQL for the schema (PostgreSQL) or table prefix (SQLite) `schema`.
    #[doc(hidden)]
    fn queries(schema: &str) -> Result<Queries>;

    /// The migrator for `schema`, with the schema substituted and its own history table.
    #[doc(hidden)]
    fn migrator(schema: &str) -> Result<Migrator>;

    /// Applies the migrator for `schema` to the database.
    #[doc(hidden)]
    async fn run_migrations(pool: &Pool<Self>, schema: &str) -> Result<()>;

    /// Opens a pool of at most `max_connections` connections (SQLite: creates the file, WAL
    /// mode, a busy timeout).
    #[doc(hidden)]
    async fn open_pool(url: &str, max_connections: u32) -> Result<Pool<Self>, sqlx::Error>;

    /// Begins a transaction that will write, with the settings the guarantees rely on, on any
    /// pool. PostgreSQL: `idle_in_transaction_session_timeout = 1min` for the transaction unless
    /// chosen elsewhere. SQLite: a 30 s busy timeout, then `BEGIN IMMEDIATE`, which takes the
    /// write lock up front, waiting for it under the busy timeout, so that a transaction that
    /// read first can never fail to upgrade to a writer.
    #[doc(hidden)]
    async fn begin(pool: &Pool<Self>) -> Result<Transaction<'static, Self>, sqlx::Error>;

    /// How many transactions may be open at once on `pool` (SQLite: one writer).
    #[doc(hidden)]
    fn max_writers(pool: &Pool<Self>) -> usize;

    /// The newest migration applied, or `None` when the runtime's tables do not exist.
    #[doc(hidden)]
    async fn applied_version(pool: &Pool<Self>, q: &Queries) -> Result<Option<i64>>;

    /// Claims a partition on assignment: creates its offsets row if needed, bumps the epoch,
    /// records `owner`, and returns the new epoch and the stored offset.
    #[doc(hidden)]
    async fn claim(
        pool: &Pool<Self>,
        q: &Queries,
        key: &PartitionKey,
        owner: &str,
    ) -> Result<Claim, sqlx::Error>;

    /// Re-claims a partition after this worker was fenced, but only if nobody else owns it
    /// (a replay clears the owner). `None`: another instance owns it.
    #[doc(hidden)]
    async fn reclaim(
        pool: &Pool<Self>,
        q: &Queries,
        key: &PartitionKey,
        owner: &str,
    ) -> Result<Option<Claim>, sqlx::Error>;

    /// The fence: moves the stored offset from `expected` to `next` if the epoch is still
    /// `epoch`. `false` means this worker no longer owns the partition.
    #[doc(hidden)]
    async fn advance(
        conn: &mut Self::Connection,
        q: &Queries,
        key: &PartitionKey,
        epoch: i64,
        expected: Option<i64>,
        next: i64,
    ) -> Result<bool, sqlx::Error>;

    /// Claims event ids in the ledger in one statement (`ids` distinct, `offsets` the offset of
    /// each id's first record). Returns the offsets whose ids were newly claimed, sorted.
    #[doc(hidden)]
    async fn claim_events(
        conn: &mut Self::Connection,
        q: &Queries,
        key: &PartitionKey,
        ids: &[&str],
        offsets: &[i64],
    ) -> Result<Vec<i64>, sqlx::Error>;

    /// Sets a partition's stored offset, bumps its epoch and clears its owner, so that a
    /// running worker is fenced and reloads (replay and explicit offset changes).
    #[doc(hidden)]
    async fn set_offset(
        conn: &mut Self::Connection,
        q: &Queries,
        key: &PartitionKey,
        next_offset: i64,
    ) -> Result<Claim, sqlx::Error>;

    /// How many rows of the dedup ledger belong to `group`.
    #[doc(hidden)]
    async fn ledger_size(pool: &Pool<Self>, q: &Queries, group: &str) -> Result<i64, sqlx::Error>;

    /// The stored offsets of a group.
    #[doc(hidden)]
    async fn offsets(pool: &Pool<Self>, q: &Queries, group: &str) -> Result<Vec<StoredOffset>>;

    /// Which of `ids` the ledger of `group` holds (in no particular order).
    #[doc(hidden)]
    async fn ledger_known(
        pool: &Pool<Self>,
        q: &Queries,
        group: &str,
        ids: &[&str],
    ) -> Result<Vec<String>, sqlx::Error>;

    /// Parks a record of `key`'s partition in `dead_letters` (upsert on its coordinates).
    #[doc(hidden)]
    async fn park(
        conn: &mut Self::Connection,
        q: &Queries,
        key: &PartitionKey,
        letter: &Parking<'_>,
    ) -> Result<(), sqlx::Error>;

    /// Deletes the ledger row of `event_id` for `group` (undoing a claim of this transaction).
    #[doc(hidden)]
    async fn unclaim(
        conn: &mut Self::Connection,
        q: &Queries,
        group: &str,
        event_id: &str,
    ) -> Result<(), sqlx::Error>;

    /// A group's dead letters, optionally of one topic, by topic, partition and offset.
    #[doc(hidden)]
    async fn dead_letters(
        pool: &Pool<Self>,
        q: &Queries,
        group: &str,
        topic: Option<&str>,
    ) -> Result<Vec<crate::dead_letters::DeadLetter>, sqlx::Error>;

    /// One dead letter by id.
    #[doc(hidden)]
    async fn dead_letter(
        pool: &Pool<Self>,
        q: &Queries,
        id: i64,
    ) -> Result<Option<crate::dead_letters::DeadLetter>, sqlx::Error>;

    /// Deletes one dead letter and returns it (in the caller's transaction).
    #[doc(hidden)]
    async fn take_dead_letter(
        conn: &mut Self::Connection,
        q: &Queries,
        id: i64,
    ) -> Result<Option<crate::dead_letters::DeadLetter>, sqlx::Error>;

    /// Deletes a group's dead letters, optionally of one topic; returns how many.
    #[doc(hidden)]
    async fn purge_dead_letters(
        pool: &Pool<Self>,
        q: &Queries,
        group: &str,
        topic: Option<&str>,
    ) -> Result<u64, sqlx::Error>;

    /// Deletes one dead letter; `false` if there was none.
    #[doc(hidden)]
    async fn delete_dead_letter(
        pool: &Pool<Self>,
        q: &Queries,
        id: i64,
    ) -> Result<bool, sqlx::Error>;

    /// Records one more failed attempt of a dead letter (a redrive that failed again).
    #[doc(hidden)]
    async fn dead_letter_failed_again(
        pool: &Pool<Self>,
        q: &Queries,
        id: i64,
        kind: FailureKind,
        error: &str,
    ) -> Result<(), sqlx::Error>;

    /// Deletes a partition's ledger rows whose first record lies in `[from, to)`; returns how
    /// many.
    #[doc(hidden)]
    async fn clear_ledger(
        conn: &mut Self::Connection,
        q: &Queries,
        key: &PartitionKey,
        from: i64,
        to: i64,
    ) -> Result<u64, sqlx::Error>;
}

/// Opens a connection pool for `url` (`postgres://…` for [`sqlx::Postgres`], `sqlite://…` for
/// [`sqlx::Sqlite`]; a SQLite file is created if missing) with at most `max_connections`
/// connections, and checks that it connects (SQLite: WAL mode, `synchronous = NORMAL`, a 30 s
/// busy timeout). A pool built by hand works as well: the settings the runtime's guarantees
/// rely on (PostgreSQL's idle-in-transaction timeout, SQLite's busy timeout) are applied to the
/// runtime's own transactions whatever the pool, and [`migrate`] switches a SQLite file to WAL.
pub async fn connect<DB: Backend>(url: &str, max_connections: u32) -> Result<Pool<DB>> {
    let kind = DatabaseKind::from_url(url)?;
    if kind != DB::KIND {
        return Err(Error::Config(format!(
            "the database URL `{}` is {kind}, but this consumer is built for {}; pass a {} URL",
            crate::error::redact_url(url),
            DB::KIND,
            DB::KIND
        )));
    }
    DB::open_pool(url, max_connections)
        .await
        .map_err(|source| Error::DatabaseUnreachable {
            url: crate::error::redact_url(url),
            source,
        })
}

/// Why `pool` cannot hand out a connection, when it times out: a pool says only "timed out",
/// one direct connection attempt with its options says "connection refused" or "the database
/// system is starting up". `None` if that attempt succeeds or takes over 5 s.
pub(crate) async fn connect_error<DB: sqlx::Database>(pool: &Pool<DB>) -> Option<sqlx::Error> {
    use sqlx::{ConnectOptions as _, Connection as _};
    let options = pool.connect_options();
    match tokio::time::timeout(std::time::Duration::from_secs(5), options.connect()).await {
        Ok(Ok(conn)) => {
            let _ = conn.close().await;
            None
        }
        Ok(Err(e)) => Some(e),
        Err(_) => None,
    }
}

/// Moves a group's stored offsets for `topic` to `positions` (partition, next offset) in one
/// transaction, bumping each partition's epoch and clearing its owner: a consumer that is
/// running is fenced, reloads the new position and continues from it without a restart.
/// Records before the new position that were already processed are skipped by the ledger, so
/// moving offsets backwards re-applies nothing. Returns the new claims, in the given order.
pub async fn set_offsets<DB: Backend>(
    pool: &Pool<DB>,
    schema: &str,
    group: &str,
    topic: &str,
    positions: &[(i32, i64)],
) -> Result<Vec<Claim>> {
    let q = DB::queries(schema)?;
    let context = "moving stored offsets";
    let mut tx = DB::begin(pool).await.map_err(Error::db(context))?;
    let mut claims = Vec::with_capacity(positions.len());
    for &(partition, next_offset) in positions {
        if next_offset < 0 {
            return Err(Error::Config(format!(
                "offset {next_offset} for {topic}/{partition} is negative; offsets start at 0"
            )));
        }
        let key = PartitionKey {
            group: group.to_owned(),
            topic: topic.to_owned(),
            partition,
        };
        let claim = DB::set_offset(&mut tx, &q, &key, next_offset)
            .await
            .map_err(Error::db(context))?;
        claims.push(claim);
    }
    tx.commit().await.map_err(Error::db(context))?;
    Ok(claims)
}

/// The newest migration version this runtime ships for `DB`.
pub fn required_version<DB: Backend>() -> i64 {
    DB::migrator("consumer_runtime")
        .ok()
        .and_then(|m| m.iter().map(|m| m.version).max())
        .unwrap_or(0)
}

/// Applies the runtime's migrations to `schema` (creating it if needed). Safe to run
/// concurrently and repeatedly; it never touches the application's own tables or migrations.
pub async fn migrate<DB: Backend>(pool: &Pool<DB>, schema: &str) -> Result<i64> {
    DB::run_migrations(pool, schema).await?;
    Ok(required_version::<DB>())
}

/// Checks that the runtime's tables exist and are at the version this runtime needs.
pub async fn check_schema<DB: Backend>(pool: &Pool<DB>, q: &Queries) -> Result<()> {
    let required = required_version::<DB>();
    let applied = DB::applied_version(pool, q).await?;
    match applied {
        Some(v) if v >= required => Ok(()),
        other => Err(Error::SchemaBehind {
            schema: q.schema.clone(),
            applied: other.map_or_else(|| "none".to_owned(), |v| v.to_string()),
            required,
        }),
    }
}

/// Rewrites `{s}` in the embedded migrations for a schema and returns a migrator whose history
/// table is `{s}_migrations`.
fn substitute(base: &Migrator, prefix: &str, table: String) -> Migrator {
    let migrations: Vec<_> = base
        .iter()
        .map(|m| {
            sqlx::migrate::Migration::new(
                m.version,
                m.description.clone(),
                m.migration_type,
                sqlx::AssertSqlSafe(m.sql.as_str().replace("{s}", prefix)).into_sql_str(),
                m.no_tx,
            )
        })
        .collect();
    let mut migrator = Migrator::with_migrations(migrations);
    migrator.dangerous_set_table_name(table);
    migrator
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_url_scheme_picks_the_database() {
        for (url, kind) in [
            ("postgres://u@h/db", DatabaseKind::Postgres),
            ("postgresql://u:p@h:5432/db", DatabaseKind::Postgres),
            ("sqlite://app.db", DatabaseKind::Sqlite),
            ("sqlite:///var/lib/app.db", DatabaseKind::Sqlite),
            ("SQLITE:app.db", DatabaseKind::Sqlite),
        ] {
            assert_eq!(DatabaseKind::from_url(url).unwrap(), kind, "{url}");
        }
    }

    #[test]
    fn unsupported_and_in_memory_urls_are_refused_with_the_fix() {
        let err = DatabaseKind::from_url("mysql://u:secret@h/db").unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("postgres://") && text.contains("sqlite://"),
            "{text}"
        );
        assert!(!text.contains("secret"), "{text}");
        let err = DatabaseKind::from_url("sqlite::memory:").unwrap_err();
        assert!(err.to_string().contains("use a file"), "{err}");
    }

    #[tokio::test]
    async fn a_url_for_the_other_database_is_refused_before_connecting() {
        let err = connect::<sqlx::Postgres>("sqlite://app.db", 1)
            .await
            .unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, Error::Config(_)), "{text}");
        assert!(
            text.contains("is SQLite") && text.contains("built for PostgreSQL"),
            "{text}"
        );
    }
}
