//! PostgreSQL: the runtime's tables live in their own schema (default `consumer_runtime`).

use sqlx::migrate::Migrator;
use sqlx::{PgConnection, Pool, Postgres, Transaction};

use super::dialect::{Claim, Crate, Dialect, Parking, PartitionKey, Queries, Templates};
use super::{Backend, DatabaseKind, StoredOffset, substitute};
use crate::error::{Error, Result};
use crate::util::check_identifier;

static MIGRATIONS: Migrator = sqlx::migrate!("../../migrations/postgres");

/// How every transaction of the runtime begins (one round trip, as a plain `BEGIN`).
///
/// `idle_in_transaction_session_timeout` bounds how long a consumer frozen in the middle of a
/// batch (SIGSTOP, a paused VM, a handler stuck on a call) keeps its transaction open, and with
/// it the partition's offset row locked against the next owner's claim: the server ends such a
/// session after a minute. The runtime sets it for its own transactions only
/// (`set_config(…, true)`, i.e. `SET LOCAL`), on any pool, and only where nobody chose a value:
/// the server's configuration, the role, the database, the URL's
/// `options=-c idle_in_transaction_session_timeout=…` (which may also turn it off with 0) or a
/// pool's own `after_connect`.
///
/// Whether a value was chosen is the setting's `source` in `pg_settings`, which costs about a
/// millisecond to read: it is read once per session and remembered in the session variable
/// `consumer_runtime.idle_timeout_unset`; every later transaction reads that variable only
/// (the scalar subquery is an init plan that runs only when `coalesce` needs it).
const BEGIN: &str = "BEGIN; SELECT set_config('idle_in_transaction_session_timeout', '1min', true) \
     WHERE coalesce(nullif(current_setting('consumer_runtime.idle_timeout_unset', true), ''), \
     (SELECT set_config('consumer_runtime.idle_timeout_unset', (source = 'default')::text, false) \
     FROM pg_show_all_settings() s WHERE s.name = 'idle_in_transaction_session_timeout')) = 'true'";

/// The session-level form of the setting in [`BEGIN`], applied once per session of a pool
/// made by `connect` (where nobody chose a value; a cheap `pg_settings` read once per
/// connection), so that its transactions need no statement of their own.
const IDLE_IN_TRANSACTION_SESSION_DEFAULT: &str = "SELECT set_config('idle_in_transaction_session_timeout', '1min', false) \
     FROM pg_settings WHERE name = 'idle_in_transaction_session_timeout' AND source = 'default'";

/// The mark on the sessions of a pool made by `connect`: a custom setting in the startup
/// options (`-c consumer_runtime.pool=connect`), visible in the pool's connect options.
const FROM_CONNECT_OPTION: (&str, &str) = ("consumer_runtime.pool", "connect");
const FROM_CONNECT: &str = "consumer_runtime.pool=connect";

/// The columns of a dead letter, named as `DeadLetterRow` reads them.
macro_rules! dl_cols {
    () => {
        r#"id, consumer_group, topic, partition, "offset", key, headers, payload, timestamp_ms, event_id, error, error_kind, attempts,
    to_char(first_failed_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"') AS first_failed_at,
    to_char(last_failed_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"') AS last_failed_at"#
    };
}

const TEMPLATES: Templates = Templates {
    claim: r#"INSERT INTO {s}consumer_offsets AS o (consumer_group, topic, partition, next_offset, epoch, owner, updated_at)
VALUES ($1, $2, $3, NULL, 1, $4, now())
ON CONFLICT (consumer_group, topic, partition)
DO UPDATE SET epoch = o.epoch + 1, owner = EXCLUDED.owner, updated_at = now()
RETURNING epoch, next_offset"#,
    reclaim: r#"UPDATE {s}consumer_offsets SET epoch = epoch + 1, owner = $4, updated_at = now()
WHERE consumer_group = $1 AND topic = $2 AND partition = $3 AND (owner IS NULL OR owner = $4)
RETURNING epoch, next_offset"#,
    advance: r#"UPDATE {s}consumer_offsets SET next_offset = $6, updated_at = now()
WHERE consumer_group = $1 AND topic = $2 AND partition = $3 AND epoch = $4 AND next_offset IS NOT DISTINCT FROM $5"#,
    claim_events: r#"INSERT INTO {s}processed (consumer_group, event_id, topic, partition, "offset")
SELECT $1, e.id, $2, $3, e.off FROM unnest($4::text[], $5::bigint[]) AS e(id, off)
ON CONFLICT DO NOTHING
RETURNING "offset""#,
    set_offset: r#"INSERT INTO {s}consumer_offsets AS o (consumer_group, topic, partition, next_offset, epoch, owner, updated_at)
VALUES ($1, $2, $3, $4, 1, NULL, now())
ON CONFLICT (consumer_group, topic, partition)
DO UPDATE SET next_offset = EXCLUDED.next_offset, epoch = o.epoch + 1, owner = NULL, updated_at = now()
RETURNING epoch, next_offset"#,
    offsets: r#"SELECT topic, partition, next_offset, epoch, owner,
    to_char(updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"') AS updated_at FROM {s}consumer_offsets
WHERE consumer_group = $1 ORDER BY topic, partition"#,
    applied_version: r#"SELECT max(version) FROM {s}_migrations WHERE success"#,
    ledger_known: r#"SELECT event_id FROM {s}processed WHERE consumer_group = $1 AND event_id = ANY($2)"#,
    park: r#"INSERT INTO {s}dead_letters AS d (consumer_group, topic, partition, "offset", key, headers, payload, timestamp_ms, event_id, error, error_kind, attempts)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
ON CONFLICT (consumer_group, topic, partition, "offset")
DO UPDATE SET event_id = EXCLUDED.event_id, error = EXCLUDED.error, error_kind = EXCLUDED.error_kind,
    attempts = d.attempts + EXCLUDED.attempts, last_failed_at = now()"#,
    dl_list: concat!(
        "SELECT ",
        dl_cols!(),
        r#" FROM {s}dead_letters WHERE consumer_group = $1 AND ($2::text IS NULL OR topic = $2)
ORDER BY topic, partition, "offset""#
    ),
    dl_get: concat!("SELECT ", dl_cols!(), " FROM {s}dead_letters WHERE id = $1"),
    dl_take: concat!(
        "DELETE FROM {s}dead_letters WHERE id = $1 RETURNING ",
        dl_cols!()
    ),
    dl_purge: r#"DELETE FROM {s}dead_letters WHERE consumer_group = $1 AND ($2::text IS NULL OR topic = $2)"#,
    dl_failed: r#"UPDATE {s}dead_letters SET error_kind = $2, error = $3, attempts = attempts + 1, last_failed_at = now()
WHERE id = $1"#,
};

/// The runtime's SQL for the schema `schema` (tables `schema.name`).
pub(super) fn queries(schema: &str) -> Result<Queries> {
    check_identifier("schema", schema)?;
    Ok(Queries::build(schema, &format!("{schema}."), &TEMPLATES))
}

impl Backend for Postgres {
    const KIND: DatabaseKind = DatabaseKind::Postgres;
}

impl_backend! {
    Postgres, sqlx::postgres::PgRow;

    fn migrator(q: &Queries) -> Migrator {
        let schema = &q.schema;
        let mut m = substitute(
            &MIGRATIONS,
            &format!("{schema}."),
            format!("{schema}._migrations"),
        );
        m.create_schema(schema.to_owned());
        m
    }

    async fn run_migrations(pool: &Pool<Self>, q: &Queries) -> Result<()> {
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
        use sqlx::ConnectOptions as _;
        let options: sqlx::postgres::PgConnectOptions = url.parse()?;
        // One direct connection first: a pool hides the cause ("connection refused", "password
        // authentication failed") behind "pool timed out".
        let probe = tokio::time::timeout(std::time::Duration::from_secs(10), options.connect())
            .await
            .map_err(|_| sqlx::Error::PoolTimedOut)??;
        sqlx::Connection::close(probe).await?;
        // The pool's sessions get the settings the runtime relies on once, when they connect,
        // and carry a mark that tells `begin` so: its transactions then start with a plain
        // BEGIN. (A pool built by hand gets them in every transaction's BEGIN instead.)
        let options = options.options([FROM_CONNECT_OPTION]);
        sqlx::postgres::PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(std::time::Duration::from_secs(10))
            .after_connect(|conn, _| {
                Box::pin(async move {
                    sqlx::query(IDLE_IN_TRANSACTION_SESSION_DEFAULT)
                        .execute(conn)
                        .await
                        .map(drop)
                })
            })
            .connect_with(options)
            .await
    }

    async fn begin(pool: &Pool<Self>, _: Crate) -> Result<Transaction<'static, Self>, sqlx::Error> {
        let from_connect = pool
            .connect_options()
            .get_options()
            .is_some_and(|o| o.contains(FROM_CONNECT));
        if from_connect {
            // Its sessions were set up once, when they connected: a plain BEGIN.
            pool.begin().await
        } else {
            pool.begin_with(BEGIN).await
        }
    }

    fn max_writers(pool: &Pool<Self>, _: Crate) -> usize {
        pool.options().get_max_connections() as usize
    }

    async fn applied_version(pool: &Pool<Self>, q: &Queries) -> Result<Option<i64>> {
        let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
            .bind(format!("{}._migrations", q.schema))
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
        sqlx::query_scalar(q.ledger_known.clone())
            .bind(group)
            .bind(ids)
            .fetch_all(pool)
            .await
    }

    async fn claim_events(
        conn: &mut PgConnection,
        q: &Queries,
        key: &PartitionKey,
        ids: &[&str],
        offsets: &[i64],
    ) -> Result<Vec<i64>, sqlx::Error> {
        let mut claimed: Vec<i64> = sqlx::query_scalar(q.claim_events.clone())
            .bind(&key.group)
            .bind(&key.topic)
            .bind(key.partition)
            .bind(ids)
            .bind(offsets)
            .fetch_all(conn)
            .await?;
        claimed.sort_unstable();
        Ok(claimed)
    }
}
