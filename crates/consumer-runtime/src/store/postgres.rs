//! PostgreSQL: the runtime's tables live in their own schema (default `consumer_runtime`).

use sqlx::migrate::Migrator;
use sqlx::{PgConnection, Pool, Postgres, Transaction};

use super::dialect::{
    Claim, Crate, Dialect, Generation, Parking, PartitionKey, Queries, Templates,
};
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
///
/// Both forms also take the ledger's claim lock in shared mode ([`LEDGER_LOCK`]) in the same
/// round trip, before any statement of the transaction takes its snapshot.
const BEGIN: &str = "BEGIN; SELECT pg_advisory_xact_lock_shared(7165064479855338599); \
     SELECT set_config('idle_in_transaction_session_timeout', '1min', true) \
     WHERE coalesce(nullif(current_setting('consumer_runtime.idle_timeout_unset', true), ''), \
     (SELECT set_config('consumer_runtime.idle_timeout_unset', (source = 'default')::text, false) \
     FROM pg_show_all_settings() s WHERE s.name = 'idle_in_transaction_session_timeout')) = 'true'";

/// [`BEGIN`] for a pool made by `connect`, whose sessions already have their settings.
const BEGIN_LOCKED: &str = "BEGIN; SELECT pg_advisory_xact_lock_shared(7165064479855338599)";

/// The ledger's claim lock (a transaction-level advisory lock, `pg_advisory_xact_lock*`, on an
/// arbitrary number). Every transaction of the runtime holds it in shared mode from its
/// `BEGIN` to its end; the switch to a new ledger generation holds it exclusively for a moment
/// (at most [`SWITCH_LOCK_TIMEOUT_MS`] waiting at first, then it gives up and tries again later). So every
/// transaction sees one generation as the newest from its first snapshot to its commit, and
/// every claim in flight lands in the same generation: two claims of one event id meet in
/// that generation's primary key, and a claim in a new generation sees every row committed
/// in the older ones. The number is the same in every schema of a database (a switch in one
/// schema makes the others' new transactions wait the same moment).
pub(crate) const LEDGER_LOCK: i64 = 7_165_064_479_855_338_599;

/// How long the switch to a new generation first waits for the claim lock (and with it, how
/// long it can hold up transactions that begin while it waits): 200 ms, doubled after every
/// switch of this process that gave up, up to [`SWITCH_LOCK_TIMEOUT_MAX_MS`], so that batches
/// that always run longer than 200 ms still let a switch through, after a wait as long as the
/// longest batch in flight.
const SWITCH_LOCK_TIMEOUT_MS: u64 = 200;
/// The longest the switch waits for the claim lock.
const SWITCH_LOCK_TIMEOUT_MAX_MS: u64 = 10_000;
/// Switches of this process that gave up in a row.
static SWITCH_GAVE_UP: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

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
    claim: r#"INSERT INTO {s}consumer_offsets AS o (consumer_group, topic, partition, next_offset, epoch, owner, updated_at, group_id)
VALUES ($1, $2, $3, NULL, 1, $4, now(), (SELECT group_id FROM {s}ledger_groups WHERE name = $1))
ON CONFLICT (consumer_group, topic, partition)
DO UPDATE SET epoch = o.epoch + 1, owner = EXCLUDED.owner, updated_at = now(), group_id = EXCLUDED.group_id
RETURNING epoch, next_offset"#,
    reclaim: r#"UPDATE {s}consumer_offsets SET epoch = epoch + 1, owner = $4, updated_at = now()
WHERE consumer_group = $1 AND topic = $2 AND partition = $3 AND (owner IS NULL OR owner = $4)
RETURNING epoch, next_offset"#,
    advance: r#"UPDATE {s}consumer_offsets SET next_offset = $6, updated_at = now()
WHERE consumer_group = $1 AND topic = $2 AND partition = $3 AND epoch = $4 AND next_offset IS NOT DISTINCT FROM $5"#,
    claim_events: r#"INSERT INTO {s}processed (generation, group_id, source_id, "offset", event_id)
SELECT (SELECT max(generation) FROM {s}ledger_generations), o.group_id, o.source_id, e.off, e.id
FROM unnest($4::text[], $5::bigint[]) AS e(id, off)
LEFT JOIN {s}consumer_offsets o ON o.consumer_group = $1 AND o.topic = $2 AND o.partition = $3
WHERE NOT EXISTS (SELECT 1 FROM {s}processed p WHERE p.group_id = o.group_id AND p.event_id = e.id)
ON CONFLICT DO NOTHING
RETURNING "offset""#,
    set_offset: r#"INSERT INTO {s}consumer_offsets AS o (consumer_group, topic, partition, next_offset, epoch, owner, updated_at, group_id, high_offset)
VALUES ($1, $2, $3, $4, 1, NULL, now(), (SELECT group_id FROM {s}ledger_groups WHERE name = $1), $4)
ON CONFLICT (consumer_group, topic, partition)
DO UPDATE SET next_offset = EXCLUDED.next_offset, epoch = o.epoch + 1, owner = NULL, updated_at = now(),
    group_id = EXCLUDED.group_id, high_offset = GREATEST(o.high_offset, o.next_offset, EXCLUDED.next_offset)
WHERE $5 OR o.ledger_floor IS NULL OR EXCLUDED.next_offset >= o.ledger_floor
RETURNING epoch, next_offset"#,
    offsets: r#"SELECT topic, partition, next_offset, epoch, owner,
    to_char(updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"') AS updated_at, ledger_floor FROM {s}consumer_offsets
WHERE consumer_group = $1 ORDER BY topic, partition"#,
    applied_version: r#"SELECT max(version) FROM {s}_migrations WHERE success"#,
    ledger_known: r#"SELECT event_id FROM {s}processed
WHERE group_id = (SELECT group_id FROM {s}ledger_groups WHERE name = $1) AND event_id = ANY($2)"#,
    ensure_group: r#"INSERT INTO {s}ledger_groups (name) VALUES ($1) ON CONFLICT (name) DO NOTHING"#,
    ensure_source: r#"INSERT INTO {s}consumer_offsets (consumer_group, topic, partition, next_offset, epoch, group_id)
VALUES ($1, $2, $3, NULL, 0, (SELECT group_id FROM {s}ledger_groups WHERE name = $1))
ON CONFLICT (consumer_group, topic, partition) DO NOTHING"#,
    fence_and_claim: Some(
        r#"WITH f AS (
    UPDATE {s}consumer_offsets SET next_offset = $6, updated_at = now()
    WHERE consumer_group = $1 AND topic = $2 AND partition = $3 AND epoch = $4 AND next_offset IS NOT DISTINCT FROM $5
    RETURNING group_id, source_id
), c AS (
    INSERT INTO {s}processed (generation, group_id, source_id, "offset", event_id)
    SELECT (SELECT max(generation) FROM {s}ledger_generations), f.group_id, f.source_id, e.off, e.id
    FROM f, unnest($7::text[], $8::bigint[]) AS e(id, off)
    WHERE NOT EXISTS (SELECT 1 FROM {s}processed p WHERE p.group_id = f.group_id AND p.event_id = e.id)
    ON CONFLICT DO NOTHING
    RETURNING "offset"
)
SELECT (SELECT count(*) FROM f) AS fenced, ARRAY(SELECT "offset" FROM c) AS claimed"#,
    ),
    floor_holds: r#"SELECT o.topic, o.partition, o.next_offset, m.high_offset
FROM {s}consumer_offsets o JOIN {s}ledger_marks m ON m.source_id = o.source_id AND m.generation = $1
FOR UPDATE OF o"#,
    generations: r#"SELECT generation,
    to_char(started_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"') AS started_at,
    extract(epoch FROM clock_timestamp() - started_at)::float8 AS age_seconds,
    coalesce((SELECT c.reltuples::bigint FROM pg_class c WHERE c.oid = to_regclass('{s}processed_g' || generation)), -1) AS rows
FROM {s}ledger_generations ORDER BY generation"#,
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
            // Its sessions were set up once, when they connected: BEGIN and the claim lock.
            pool.begin_with(BEGIN_LOCKED).await
        } else {
            pool.begin_with(BEGIN).await
        }
    }

    async fn set_lock_timeout(
        tx: &mut Transaction<'static, Self>,
        timeout: std::time::Duration,
        _: Crate,
    ) -> Result<(), sqlx::Error> {
        sqlx::query("SELECT set_config('lock_timeout', $1, true)")
            .bind(format!("{}ms", timeout.as_millis().max(1)))
            .execute(&mut **tx)
            .await
            .map(drop)
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
        // Outside a batch (redrive): the group and the partition may have no ids yet.
        sqlx::query(q.ensure_group.clone())
            .bind(&key.group)
            .execute(&mut *conn)
            .await?;
        sqlx::query(q.ensure_source.clone())
            .bind(&key.group)
            .bind(&key.topic)
            .bind(key.partition)
            .execute(&mut *conn)
            .await?;
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

    async fn fence_and_claim(
        conn: &mut PgConnection,
        q: &Queries,
        key: &PartitionKey,
        epoch: i64,
        expected: Option<i64>,
        next: i64,
        ids: &[&str],
        offsets: &[i64],
    ) -> Result<Option<Vec<i64>>, sqlx::Error> {
        let sql = q.fence_and_claim.clone().expect("PostgreSQL has a fence-and-claim statement");
        let (fenced, mut claimed): (i64, Vec<i64>) = sqlx::query_as(sql)
            .bind(&key.group)
            .bind(&key.topic)
            .bind(key.partition)
            .bind(epoch)
            .bind(expected)
            .bind(next)
            .bind(ids)
            .bind(offsets)
            .fetch_one(conn)
            .await?;
        if fenced != 1 {
            return Ok(None);
        }
        claimed.sort_unstable();
        Ok(Some(claimed))
    }

    async fn generations(pool: &Pool<Self>, q: &Queries) -> Result<Vec<Generation>, sqlx::Error> {
        let rows: Vec<(i32, String, f64, i64)> = sqlx::query_as(q.generations.clone())
            .fetch_all(pool)
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for (generation, started_at, age_seconds, estimate) in rows {
            // Small (or never analysed) partitions are counted; large ones estimated.
            let rows = if estimate < 100_000 {
                let sql = format!(
                    "SELECT count(*) FROM {}.processed WHERE generation = $1",
                    q.schema
                );
                sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
                    .bind(generation)
                    .fetch_one(pool)
                    .await?
            } else {
                estimate
            };
            out.push(Generation {
                generation,
                started_at,
                age_seconds,
                rows,
            });
        }
        Ok(out)
    }

    async fn start_generation(
        pool: &Pool<Self>,
        q: &Queries,
        current: i32,
    ) -> Result<bool, sqlx::Error> {
        let mut conn = pool.acquire().await?;
        if !prune_lock(&mut conn, q, true).await? {
            return Ok(false);
        }
        let result = switch_generation(&mut conn, q, current).await;
        prune_lock(&mut conn, q, false).await?;
        result
    }

    async fn drop_generation(
        pool: &Pool<Self>,
        q: &Queries,
        generation: i32,
    ) -> Result<Option<u64>, sqlx::Error> {
        let mut conn = pool.acquire().await?;
        if !prune_lock(&mut conn, q, true).await? {
            return Ok(None);
        }
        let result = detach_and_drop(&mut conn, q, generation).await;
        prune_lock(&mut conn, q, false).await?;
        result
    }
}

/// Takes (`true`) or releases the session-level lock that makes one pruner at a time work on
/// a schema's ledger; `false`: another session holds it.
async fn prune_lock(conn: &mut PgConnection, q: &Queries, take: bool) -> Result<bool, sqlx::Error> {
    let sql = if take {
        "SELECT pg_try_advisory_lock(hashtext('consumer_runtime.prune:' || $1))"
    } else {
        "SELECT pg_advisory_unlock(hashtext('consumer_runtime.prune:' || $1))"
    };
    sqlx::query_scalar(sql)
        .bind(&q.schema)
        .fetch_one(conn)
        .await
}

/// Whether the table of `generation` is a partition of the ledger, and whether its detach
/// is pending (an interrupted `DETACH … CONCURRENTLY`); `None`: not attached.
async fn attachment(
    conn: &mut PgConnection,
    q: &Queries,
    generation: i32,
) -> Result<Option<bool>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT i.inhdetachpending FROM pg_inherits i \
         WHERE i.inhrelid = to_regclass($1) AND i.inhparent = to_regclass($2)",
    )
    .bind(format!("{}.processed_g{generation}", q.schema))
    .bind(format!("{}.processed", q.schema))
    .fetch_optional(conn)
    .await
}

/// Creates the partition of `generation` if it does not exist: as a table of its own, then
/// attached, which takes only a `SHARE UPDATE EXCLUSIVE` lock on the ledger (claims and commits
/// go on; `CREATE TABLE … PARTITION OF` would take an `ACCESS EXCLUSIVE` one).
async fn ensure_partition(
    conn: &mut PgConnection,
    q: &Queries,
    generation: i32,
) -> Result<(), sqlx::Error> {
    if attachment(conn, q, generation).await?.is_some() {
        return Ok(());
    }
    let s = &q.schema;
    let sql = format!(
        "CREATE TABLE IF NOT EXISTS {s}.processed_g{generation} \
         (LIKE {s}.processed INCLUDING DEFAULTS); \
         ALTER TABLE {s}.processed ATTACH PARTITION {s}.processed_g{generation} \
         FOR VALUES IN ({generation})"
    );
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
        .execute(conn)
        .await?;
    Ok(())
}

/// The switch to generation `current + 1`, under the claim lock held exclusively for a moment.
async fn switch_generation(
    conn: &mut PgConnection,
    q: &Queries,
    current: i32,
) -> Result<bool, sqlx::Error> {
    use sqlx::Connection as _;
    ensure_partition(conn, q, current + 1).await?;
    use std::sync::atomic::Ordering;
    let gave_up = SWITCH_GAVE_UP.load(Ordering::Relaxed).min(16);
    let timeout_ms = (SWITCH_LOCK_TIMEOUT_MS << gave_up).min(SWITCH_LOCK_TIMEOUT_MAX_MS);
    let mut tx = conn.begin().await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "SET LOCAL lock_timeout = '{timeout_ms}ms'"
    )))
    .execute(&mut *tx)
    .await?;
    let locked = sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(LEDGER_LOCK)
        .execute(&mut *tx)
        .await;
    match locked {
        Ok(_) => {}
        // 55P03 lock_not_available: claims in flight held it for longer; try again later.
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("55P03") => {
            tx.rollback().await?;
            SWITCH_GAVE_UP.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(
                timeout_ms,
                "ledger: claims in flight held the claim lock longer than the switch waited; it waits longer next time"
            );
            return Ok(false);
        }
        Err(e) => return Err(e),
    }
    let newest: Option<i32> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT max(generation) FROM {}.ledger_generations",
        q.schema
    )))
    .fetch_one(&mut *tx)
    .await?;
    if newest != Some(current) {
        tx.rollback().await?;
        return Ok(false);
    }
    sqlx::query(q.mark_generation.clone())
        .bind(current)
        .execute(&mut *tx)
        .await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO {}.ledger_generations (generation, started_at) VALUES ($1, clock_timestamp())",
        q.schema
    )))
    .bind(current + 1)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    SWITCH_GAVE_UP.store(0, Ordering::Relaxed);
    // The partition after it exists long before anyone switches to it.
    ensure_partition(conn, q, current + 2).await?;
    Ok(true)
}

/// Drops generation `generation`: the floors first, then `DETACH PARTITION … CONCURRENTLY`
/// (which waits for the transactions that may still read the partition but blocks none of
/// them) and `DROP TABLE` of the detached table, which nobody reads any more. Each step can be
/// repeated after an interruption.
async fn detach_and_drop(
    conn: &mut PgConnection,
    q: &Queries,
    generation: i32,
) -> Result<Option<u64>, sqlx::Error> {
    use sqlx::Connection as _;
    let s = &q.schema;
    {
        let mut tx = conn.begin().await?;
        if let Some(held) = floor_hold(&mut tx, q, generation).await? {
            tx.rollback().await?;
            tracing::warn!(
                generation,
                "ledger: generation {generation} is held: {held}; it is dropped once the partition has passed those records again"
            );
            return Ok(None);
        }
        sqlx::query(q.raise_floors.clone())
            .bind(generation)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
    }
    let estimate: Option<f32> =
        sqlx::query_scalar("SELECT reltuples FROM pg_class WHERE oid = to_regclass($1)")
            .bind(format!("{s}.processed_g{generation}"))
            .fetch_optional(&mut *conn)
            .await?;
    let rows = match estimate {
        Some(e) if e >= 100_000.0 => e as u64,
        Some(_) => {
            let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                "SELECT count(*) FROM {s}.processed_g{generation}"
            )))
            .fetch_one(&mut *conn)
            .await?;
            n as u64
        }
        None => 0,
    };
    match attachment(conn, q, generation).await? {
        Some(false) => {
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "ALTER TABLE {s}.processed DETACH PARTITION {s}.processed_g{generation} CONCURRENTLY"
            )))
            .execute(&mut *conn)
            .await?;
        }
        Some(true) => {
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "ALTER TABLE {s}.processed DETACH PARTITION {s}.processed_g{generation} FINALIZE"
            )))
            .execute(&mut *conn)
            .await?;
        }
        None => {}
    }
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DROP TABLE IF EXISTS {s}.processed_g{generation}"
    )))
    .execute(&mut *conn)
    .await?;
    sqlx::query(q.forget_marks.clone())
        .bind(generation)
        .execute(&mut *conn)
        .await?;
    sqlx::query(q.forget_generation.clone())
        .bind(generation)
        .execute(&mut *conn)
        .await?;
    Ok(Some(rows))
}
