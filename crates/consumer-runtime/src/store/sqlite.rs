//! SQLite: the runtime's tables carry a prefix (default `consumer_runtime_`) in the same
//! database file as the application's tables, so that one SQLite transaction covers both.
//! SQLite has one writer at a time: the runtime opens it in WAL mode with a busy timeout and
//! runs at most one transaction at a time.

use std::str::FromStr;

use sqlx::migrate::Migrator;
use sqlx::{Pool, Sqlite, SqliteConnection, Transaction};

use super::dialect::{Claim, Crate, Dialect, Parking, PartitionKey, Queries, Templates};
use super::{Backend, DatabaseKind, StoredOffset, substitute};
use crate::error::{Error, Result};
use crate::util::check_identifier;

static MIGRATIONS: Migrator = sqlx::migrate!("../../migrations/sqlite");

/// How every transaction of the runtime begins: a 30 s busy timeout, then `BEGIN IMMEDIATE`
/// (see [`Backend::begin`]), in one call.
const BEGIN: &str = "PRAGMA busy_timeout = 30000; BEGIN IMMEDIATE";

/// Puts the database file in WAL mode (readers never wait for the writer) if it is in SQLite's
/// default rollback-journal mode `delete`. The journal mode is the file's, kept across
/// connections and restarts, so switching once, when the runtime's tables are created, covers
/// every pool opened on the file later, the user's included. A file that someone deliberately
/// put in another mode (`truncate`, `persist`, `memory`, …) is left as it is.
async fn use_wal(pool: &Pool<Sqlite>) -> Result<(), sqlx::Error> {
    let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(pool)
        .await?;
    if mode.eq_ignore_ascii_case("delete") {
        let now: String = sqlx::query_scalar("PRAGMA journal_mode = WAL")
            .fetch_one(pool)
            .await?;
        if !now.eq_ignore_ascii_case("wal") {
            tracing::warn!(journal_mode = %now, "SQLite refused WAL mode for this database file; readers will wait for the writer");
        }
    }
    Ok(())
}

/// The columns of a dead letter, named as `DeadLetterRow` reads them.
macro_rules! dl_cols {
    () => {
        r#"id, consumer_group, topic, partition, "offset", key, headers, payload, timestamp_ms, event_id, error, error_kind, attempts, first_failed_at, last_failed_at"#
    };
}

const TEMPLATES: Templates = Templates {
    claim: r#"INSERT INTO {s}consumer_offsets AS o (consumer_group, topic, partition, next_offset, epoch, owner, updated_at)
VALUES ($1, $2, $3, NULL, 1, $4, strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
ON CONFLICT (consumer_group, topic, partition)
DO UPDATE SET epoch = o.epoch + 1, owner = EXCLUDED.owner, updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')
RETURNING epoch, next_offset"#,
    reclaim: r#"UPDATE {s}consumer_offsets SET epoch = epoch + 1, owner = $4, updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')
WHERE consumer_group = $1 AND topic = $2 AND partition = $3 AND (owner IS NULL OR owner = $4)
RETURNING epoch, next_offset"#,
    advance: r#"UPDATE {s}consumer_offsets SET next_offset = $6, updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')
WHERE consumer_group = $1 AND topic = $2 AND partition = $3 AND epoch = $4 AND next_offset IS $5"#,
    claim_events: r#"INSERT INTO {s}processed (consumer_group, event_id, topic, partition, "offset")
SELECT $1, e.value ->> 0, $2, $3, e.value ->> 1 FROM json_each($4) AS e WHERE true
ON CONFLICT DO NOTHING
RETURNING "offset""#,
    set_offset: r#"INSERT INTO {s}consumer_offsets AS o (consumer_group, topic, partition, next_offset, epoch, owner, updated_at)
VALUES ($1, $2, $3, $4, 1, NULL, strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
ON CONFLICT (consumer_group, topic, partition)
DO UPDATE SET next_offset = EXCLUDED.next_offset, epoch = o.epoch + 1, owner = NULL, updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')
RETURNING epoch, next_offset"#,
    offsets: r#"SELECT topic, partition, next_offset, epoch, owner, updated_at FROM {s}consumer_offsets
WHERE consumer_group = $1 ORDER BY topic, partition"#,
    applied_version: r#"SELECT max(version) FROM {s}_migrations WHERE success"#,
    ledger_known: r#"SELECT event_id FROM {s}processed
WHERE consumer_group = $1 AND event_id IN (SELECT value FROM json_each($2))"#,
    park: r#"INSERT INTO {s}dead_letters AS d (consumer_group, topic, partition, "offset", key, headers, payload, timestamp_ms, event_id, error, error_kind, attempts)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
ON CONFLICT (consumer_group, topic, partition, "offset")
DO UPDATE SET event_id = EXCLUDED.event_id, error = EXCLUDED.error, error_kind = EXCLUDED.error_kind,
    attempts = d.attempts + EXCLUDED.attempts, last_failed_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')"#,
    dl_list: concat!(
        "SELECT ",
        dl_cols!(),
        r#" FROM {s}dead_letters WHERE consumer_group = $1 AND ($2 IS NULL OR topic = $2)
ORDER BY topic, partition, "offset""#
    ),
    dl_get: concat!("SELECT ", dl_cols!(), " FROM {s}dead_letters WHERE id = $1"),
    dl_take: concat!(
        "DELETE FROM {s}dead_letters WHERE id = $1 RETURNING ",
        dl_cols!()
    ),
    dl_purge: r#"DELETE FROM {s}dead_letters WHERE consumer_group = $1 AND ($2 IS NULL OR topic = $2)"#,
    dl_failed: r#"UPDATE {s}dead_letters SET error_kind = $2, error = $3, attempts = attempts + 1,
    last_failed_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')
WHERE id = $1"#,
};

/// The runtime's SQL for the schema `schema` (tables `schema_name`).
pub(super) fn queries(schema: &str) -> Result<Queries> {
    check_identifier("schema", schema)?;
    Ok(Queries::build(schema, &format!("{schema}_"), &TEMPLATES))
}

impl Backend for Sqlite {
    const KIND: DatabaseKind = DatabaseKind::Sqlite;
}

impl_backend! {
    Sqlite, sqlx::sqlite::SqliteRow;

    fn migrator(q: &Queries) -> Migrator {
        let schema = &q.schema;
        substitute(
            &MIGRATIONS,
            &format!("{schema}_"),
            format!("{schema}__migrations"),
        )
    }

    async fn run_migrations(pool: &Pool<Self>, q: &Queries) -> Result<()> {
        use_wal(pool).await.map_err(Error::db("switching the database file to WAL"))?;
        Self::migrator(q)
            .run(pool)
            .await
            .map_err(|source| Error::Migrate {
                schema: q.schema.clone(),
                source,
            })
    }

    async fn open_pool(
        url: &str,
        max_connections: u32,
        _: Crate,
    ) -> Result<Pool<Self>, sqlx::Error> {
        use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
        // WAL lets readers run beside the one writer; the busy timeout makes a writer wait for
        // the lock instead of failing with "database is locked".
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(std::time::Duration::from_secs(30));
        sqlx::sqlite::SqlitePoolOptions::new()
            .max_connections(max_connections)
            .connect_with(options)
            .await
    }

    async fn begin(pool: &Pool<Self>, _: Crate) -> Result<Transaction<'static, Self>, sqlx::Error> {
        // The busy timeout is the connection's, and must hold before `BEGIN IMMEDIATE` waits
        // for the write lock: set on every begin, in the same call (no extra work for the
        // connection's thread), so that it holds for a pool the user built too (sqlx's default
        // is 5 s). The connection keeps it afterwards.
        pool.begin_with(BEGIN).await
    }

    fn max_writers(_pool: &Pool<Self>, _: Crate) -> usize {
        1
    }

    async fn applied_version(pool: &Pool<Self>, q: &Queries) -> Result<Option<i64>> {
        let exists: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = $1)",
        )
        .bind(format!("{}__migrations", q.schema))
        .fetch_one(pool)
        .await
        .map_err(Error::db("reading the runtime's schema version"))?;
        if !exists {
            return Ok(None);
        }
        sqlx::query_scalar(q.applied_version.clone())
            .fetch_one(pool)
            .await
            .map_err(Error::db("reading the runtime's schema version"))
    }

    async fn ledger_known(
        pool: &Pool<Self>,
        q: &Queries,
        group: &str,
        ids: &[&str],
    ) -> Result<Vec<String>, sqlx::Error> {
        let ids = serde_json::to_string(ids).map_err(|e| sqlx::Error::Encode(e.into()))?;
        sqlx::query_scalar(q.ledger_known.clone())
            .bind(group)
            .bind(ids)
            .fetch_all(pool)
            .await
    }

    async fn claim_events(
        conn: &mut SqliteConnection,
        q: &Queries,
        key: &PartitionKey,
        ids: &[&str],
        offsets: &[i64],
    ) -> Result<Vec<i64>, sqlx::Error> {
        let pairs: Vec<(&str, i64)> = ids.iter().copied().zip(offsets.iter().copied()).collect();
        let pairs = serde_json::to_string(&pairs).map_err(|e| sqlx::Error::Encode(e.into()))?;
        let mut claimed: Vec<i64> = sqlx::query_scalar(q.claim_events.clone())
            .bind(&key.group)
            .bind(&key.topic)
            .bind(key.partition)
            .bind(pairs)
            .fetch_all(conn)
            .await?;
        claimed.sort_unstable();
        Ok(claimed)
    }
}
