//! The outbox's SQL per database, behind the crate-private [`OutboxSql`] trait (a supertrait
//! of the sealed [`super::Backend`]); the public face is `crate::outbox` and `crate::relay`.
#![allow(unreachable_pub)]

use async_trait::async_trait;
use sqlx::{Pool, SqlSafeStr as _, SqlStr};

/// The class of the advisory locks a PostgreSQL writer takes on its key's hash (`'outb'`), so
/// that they do not collide with the application's own advisory locks on single numbers.
pub(crate) const LOCK_CLASS: i32 = 0x6f75_7462;

/// One row the relay is to publish.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct PendingRow {
    pub seq: i64,
    pub id: String,
    pub aggregatetype: String,
    pub aggregateid: Option<String>,
    #[sqlx(rename = "type")]
    pub kind: String,
    pub payload: Option<Vec<u8>>,
    pub headers: String,
    /// The key's hash: the row's lane is `key_hash % lanes`.
    pub key_hash: i64,
    /// Seconds since the row was written.
    pub age: f64,
    /// The oldest transaction id still running in the read's snapshot (PostgreSQL's
    /// `pg_snapshot_xmin`).
    pub horizon_xmin: i64,
    /// The read's own transaction id (PostgreSQL: it has one, it updated the rows), assigned
    /// after its snapshot was taken, so above the id of every writer that drew a `seq`
    /// before: a writer draws its row's `seq` only after it has an id (`publish` makes sure).
    /// Once a later read's `horizon_xmin` reaches it, every row with a lower `seq` than this
    /// read's first one has committed (and shows) or rolled back. (The snapshot's own
    /// `pg_snapshot_xmax` would not do: it is the latest completed id + 1, and ids above it
    /// may already be running.)
    pub horizon_xmax: i64,
}

impl PendingRow {
    /// The row's lane in an outbox of `lanes` lanes.
    pub fn lane(&self, lanes: u32) -> i32 {
        (self.key_hash.rem_euclid(i64::from(lanes))) as i32
    }
}

/// One row as `trace` and `parked` show it.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
#[non_exhaustive]
pub struct OutboxEntry {
    /// The row's place in the outbox.
    pub seq: i64,
    /// The event id (sent as the `event-id` header).
    pub id: String,
    /// The topic.
    pub aggregatetype: String,
    /// The key.
    pub aggregateid: Option<String>,
    /// When the row was written, UTC, RFC 3339.
    pub created_at: String,
    /// How many times a relay sent it (more than once: duplicates, which consumers dedupe).
    pub sent_count: i32,
    /// When the broker's acknowledgement was recorded.
    pub published_at: Option<String>,
    /// The partition the broker put it in (the last acknowledged send).
    pub published_partition: Option<i32>,
    /// The offset the broker gave it (the last acknowledged send).
    pub published_offset: Option<i64>,
    /// The relay instance that recorded the acknowledgement.
    pub published_by: Option<String>,
    /// When the relay parked it as unpublishable.
    pub parked_at: Option<String>,
    /// Why it was parked.
    pub error: Option<String>,
}

/// One ledger row of an event id.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
#[non_exhaustive]
pub struct LedgerEntry {
    /// The consumer group that applied the event.
    pub consumer_group: String,
    /// The topic of the record it applied.
    pub topic: String,
    /// Its partition.
    pub partition: i32,
    /// Its offset.
    pub offset: i64,
    /// When the group's transaction applied it, UTC, RFC 3339.
    pub processed_at: String,
}

/// One lane's backlog.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
#[non_exhaustive]
pub struct LaneBacklog {
    /// The lane.
    pub lane: i64,
    /// Its unpublished, unparked rows.
    pub rows: i64,
    /// The age in seconds of its oldest one.
    pub oldest: Option<f64>,
}

/// One lane's lease.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
#[non_exhaustive]
pub struct LaneLease {
    /// The lane.
    pub lane: i32,
    /// The relay instance that holds it.
    pub owner: Option<String>,
    /// Its epoch, bumped by every new lease.
    pub epoch: i64,
    /// When the lease runs out unless renewed, UTC, RFC 3339.
    pub lease_until: Option<String>,
}

struct Templates {
    lock_key: Option<&'static str>,
    insert: &'static str,
    lanes_count: &'static str,
    lane_init: &'static str,
    acquire: &'static str,
    renew: &'static str,
    release: &'static str,
    heartbeat: &'static str,
    live_relays: &'static str,
    leave: &'static str,
    leases: &'static str,
    take: &'static str,
    mark: &'static str,
    mark_fenced: Option<&'static str>,
    park: &'static str,
    unpark: &'static str,
    cleanup: &'static str,
    backlog: &'static str,
    parked_count: &'static str,
    parked: &'static str,
    trace: &'static str,
    ledger: &'static str,
}

/// The outbox's statements for one schema.
#[derive(Debug, Clone)]
pub struct OutboxQueries {
    /// The schema (PostgreSQL) or table prefix (SQLite).
    pub schema: String,
    /// The `LISTEN/NOTIFY` channel of the schema's outbox (PostgreSQL).
    pub channel: String,
    lock_key: Option<SqlStr>,
    insert: SqlStr,
    lanes_count: SqlStr,
    lane_init: SqlStr,
    acquire: SqlStr,
    renew: SqlStr,
    release: SqlStr,
    heartbeat: SqlStr,
    live_relays: SqlStr,
    leave: SqlStr,
    leases: SqlStr,
    take: SqlStr,
    mark: SqlStr,
    mark_fenced: Option<SqlStr>,
    park: SqlStr,
    unpark: SqlStr,
    cleanup: SqlStr,
    backlog: SqlStr,
    parked_count: SqlStr,
    parked: SqlStr,
    trace: SqlStr,
    ledger: SqlStr,
}

impl OutboxQueries {
    fn build(schema: &str, prefix: &str, t: &Templates) -> OutboxQueries {
        let q = |t: &str| sqlx::AssertSqlSafe(t.replace("{s}", prefix)).into_sql_str();
        OutboxQueries {
            schema: schema.to_owned(),
            channel: format!("{schema}_outbox"),
            lock_key: t.lock_key.map(q),
            insert: q(t.insert),
            lanes_count: q(t.lanes_count),
            lane_init: q(t.lane_init),
            acquire: q(t.acquire),
            renew: q(t.renew),
            release: q(t.release),
            heartbeat: q(t.heartbeat),
            live_relays: q(t.live_relays),
            leave: q(t.leave),
            leases: q(t.leases),
            take: q(t.take),
            mark: q(t.mark),
            mark_fenced: t.mark_fenced.map(q),
            park: q(t.park),
            unpark: q(t.unpark),
            cleanup: q(t.cleanup),
            backlog: q(t.backlog),
            parked_count: q(t.parked_count),
            parked: q(t.parked),
            trace: q(t.trace),
            ledger: q(t.ledger),
        }
    }
}

/// What `publish` inserts.
#[derive(Debug)]
pub struct NewRow<'a> {
    pub id: Option<&'a str>,
    pub topic: &'a str,
    pub key: Option<&'a str>,
    pub kind: &'a str,
    pub payload: Option<&'a [u8]>,
    pub headers: String,
    pub key_hash: i64,
}

/// One acknowledged row: its seq and where the broker put it.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Acked {
    pub s: i64,
    pub p: i32,
    pub o: i64,
}

#[async_trait]
pub trait OutboxSql: sqlx::Database {
    /// The outbox statements for `schema` (already checked to be an identifier).
    fn outbox_queries(schema: &str) -> OutboxQueries;
    /// Inserts a row (after the key's lock, on PostgreSQL) and wakes the relays; the event id.
    async fn outbox_insert(
        conn: &mut Self::Connection,
        q: &OutboxQueries,
        row: &NewRow<'_>,
    ) -> Result<String, sqlx::Error>;
    async fn outbox_lanes_count(pool: &Pool<Self>, q: &OutboxQueries) -> Result<i64, sqlx::Error>;
    /// Creates lanes `0..lanes` (those missing), in one statement.
    async fn outbox_lane_init(
        pool: &Pool<Self>,
        q: &OutboxQueries,
        lanes: i32,
    ) -> Result<(), sqlx::Error>;
    async fn outbox_acquire(
        pool: &Pool<Self>,
        q: &OutboxQueries,
        lane: i32,
        owner: &str,
        lease_secs: f64,
    ) -> Result<Option<i64>, sqlx::Error>;
    /// Renews the leases of `held` (lane, epoch) in one statement: the lanes still held.
    async fn outbox_renew(
        conn: &mut Self::Connection,
        q: &OutboxQueries,
        owner: &str,
        held: &[(i32, i64)],
        lease_secs: f64,
    ) -> Result<Vec<i32>, sqlx::Error>;
    async fn outbox_release(
        pool: &Pool<Self>,
        q: &OutboxQueries,
        lane: i32,
        owner: &str,
        epoch: i64,
    ) -> Result<(), sqlx::Error>;
    /// Renews `me`'s presence (and forgets relays gone for an hour); how many relays are alive.
    async fn outbox_heartbeat(
        pool: &Pool<Self>,
        q: &OutboxQueries,
        me: &str,
        lease_secs: f64,
    ) -> Result<i64, sqlx::Error>;
    async fn outbox_leave(
        pool: &Pool<Self>,
        q: &OutboxQueries,
        me: &str,
    ) -> Result<(), sqlx::Error>;
    async fn outbox_leases(
        pool: &Pool<Self>,
        q: &OutboxQueries,
    ) -> Result<Vec<LaneLease>, sqlx::Error>;
    /// The next pending rows of the lanes `owner` holds from `seq >= floor`, oldest first,
    /// their sends counted (`sent_count`).
    async fn outbox_take(
        pool: &Pool<Self>,
        q: &OutboxQueries,
        lanes: i64,
        owner: &str,
        limit: i64,
        floor: i64,
    ) -> Result<Vec<PendingRow>, sqlx::Error>;
    /// Renews the leases of `held` (lane, epoch) and marks the rows of `acked` whose lanes
    /// are still held in one statement, where the database has one (PostgreSQL): the lanes
    /// still held. `None` when the database needs a transaction of `outbox_renew` and
    /// `outbox_mark`.
    async fn outbox_mark_fenced(
        pool: &Pool<Self>,
        q: &OutboxQueries,
        owner: &str,
        lease_secs: f64,
        held: &[(i32, i64)],
        lanes: i64,
        acked: &[Acked],
    ) -> Result<Option<Vec<i32>>, sqlx::Error>;
    async fn outbox_mark(
        conn: &mut Self::Connection,
        q: &OutboxQueries,
        acked: &[Acked],
        by: &str,
    ) -> Result<u64, sqlx::Error>;
    async fn outbox_park(
        conn: &mut Self::Connection,
        q: &OutboxQueries,
        seq: i64,
        error: &str,
    ) -> Result<(), sqlx::Error>;
    async fn outbox_unpark(
        pool: &Pool<Self>,
        q: &OutboxQueries,
        id: &str,
    ) -> Result<bool, sqlx::Error>;
    async fn outbox_cleanup(
        pool: &Pool<Self>,
        q: &OutboxQueries,
        keep_secs: f64,
        limit: i64,
    ) -> Result<u64, sqlx::Error>;
    async fn outbox_backlog(
        pool: &Pool<Self>,
        q: &OutboxQueries,
        lanes: i64,
    ) -> Result<Vec<LaneBacklog>, sqlx::Error>;
    async fn outbox_parked_count(pool: &Pool<Self>, q: &OutboxQueries) -> Result<i64, sqlx::Error>;
    async fn outbox_parked(
        pool: &Pool<Self>,
        q: &OutboxQueries,
    ) -> Result<Vec<OutboxEntry>, sqlx::Error>;
    async fn outbox_trace(
        pool: &Pool<Self>,
        q: &OutboxQueries,
        id: &str,
    ) -> Result<Option<OutboxEntry>, sqlx::Error>;
    async fn outbox_ledger(
        pool: &Pool<Self>,
        q: &OutboxQueries,
        id: &str,
    ) -> Result<Vec<LedgerEntry>, sqlx::Error>;
    /// Starts a task that wakes `wake` on every notification of the outbox's channel
    /// (PostgreSQL's `LISTEN`); `None` where the database has none.
    fn outbox_listen(
        pool: &Pool<Self>,
        q: &OutboxQueries,
        wake: std::sync::Arc<tokio::sync::Notify>,
    ) -> Option<tokio::task::JoinHandle<()>>;
}

macro_rules! impl_outbox {
    ($db:ty, $templates:expr, $sep:literal, $notify:expr, $listen:expr) => {
        #[async_trait]
        impl OutboxSql for $db {
            fn outbox_listen(
                pool: &Pool<Self>,
                q: &OutboxQueries,
                wake: std::sync::Arc<tokio::sync::Notify>,
            ) -> Option<tokio::task::JoinHandle<()>> {
                $listen(pool, q, wake)
            }

            fn outbox_queries(schema: &str) -> OutboxQueries {
                OutboxQueries::build(schema, &format!("{schema}{}", $sep), &$templates)
            }

            async fn outbox_insert(
                conn: &mut Self::Connection,
                q: &OutboxQueries,
                row: &NewRow<'_>,
            ) -> Result<String, sqlx::Error> {
                if let (Some(lock), Some(_)) = (&q.lock_key, row.key) {
                    // The key's hash is a u32; the lock takes an int4.
                    sqlx::query(lock.clone())
                        .bind(LOCK_CLASS)
                        .bind(row.key_hash as u32 as i32)
                        .execute(&mut *conn)
                        .await?;
                }
                let id: String = sqlx::query_scalar(q.insert.clone())
                    .bind(row.id)
                    .bind(row.topic)
                    .bind(row.key)
                    .bind(row.kind)
                    .bind(row.payload)
                    .bind(&row.headers)
                    .bind(row.key_hash)
                    .fetch_one(&mut *conn)
                    .await?;
                $notify(conn, q).await?;
                Ok(id)
            }

            async fn outbox_lanes_count(
                pool: &Pool<Self>,
                q: &OutboxQueries,
            ) -> Result<i64, sqlx::Error> {
                sqlx::query_scalar(q.lanes_count.clone())
                    .fetch_one(pool)
                    .await
            }

            async fn outbox_lane_init(
                pool: &Pool<Self>,
                q: &OutboxQueries,
                lanes: i32,
            ) -> Result<(), sqlx::Error> {
                sqlx::query(q.lane_init.clone())
                    .bind(lanes)
                    .execute(pool)
                    .await
                    .map(drop)
            }

            async fn outbox_acquire(
                pool: &Pool<Self>,
                q: &OutboxQueries,
                lane: i32,
                owner: &str,
                lease_secs: f64,
            ) -> Result<Option<i64>, sqlx::Error> {
                sqlx::query_scalar(q.acquire.clone())
                    .bind(lane)
                    .bind(owner)
                    .bind(lease_secs)
                    .fetch_optional(pool)
                    .await
            }

            async fn outbox_renew(
                conn: &mut Self::Connection,
                q: &OutboxQueries,
                owner: &str,
                held: &[(i32, i64)],
                lease_secs: f64,
            ) -> Result<Vec<i32>, sqlx::Error> {
                if held.is_empty() {
                    return Ok(Vec::new());
                }
                let list = serde_json::to_string(held).expect("numbers serialize");
                sqlx::query_scalar(q.renew.clone())
                    .bind(owner)
                    .bind(list)
                    .bind(lease_secs)
                    .fetch_all(conn)
                    .await
            }

            async fn outbox_release(
                pool: &Pool<Self>,
                q: &OutboxQueries,
                lane: i32,
                owner: &str,
                epoch: i64,
            ) -> Result<(), sqlx::Error> {
                sqlx::query(q.release.clone())
                    .bind(lane)
                    .bind(owner)
                    .bind(epoch)
                    .execute(pool)
                    .await
                    .map(drop)
            }

            async fn outbox_heartbeat(
                pool: &Pool<Self>,
                q: &OutboxQueries,
                me: &str,
                lease_secs: f64,
            ) -> Result<i64, sqlx::Error> {
                sqlx::query(q.heartbeat.clone())
                    .bind(me)
                    .bind(lease_secs)
                    .execute(pool)
                    .await?;
                sqlx::query_scalar(q.live_relays.clone())
                    .fetch_one(pool)
                    .await
            }

            async fn outbox_leave(
                pool: &Pool<Self>,
                q: &OutboxQueries,
                me: &str,
            ) -> Result<(), sqlx::Error> {
                sqlx::query(q.leave.clone())
                    .bind(me)
                    .execute(pool)
                    .await
                    .map(drop)
            }

            async fn outbox_leases(
                pool: &Pool<Self>,
                q: &OutboxQueries,
            ) -> Result<Vec<LaneLease>, sqlx::Error> {
                sqlx::query_as(q.leases.clone()).fetch_all(pool).await
            }

            async fn outbox_take(
                pool: &Pool<Self>,
                q: &OutboxQueries,
                lanes: i64,
                owner: &str,
                limit: i64,
                floor: i64,
            ) -> Result<Vec<PendingRow>, sqlx::Error> {
                let mut rows: Vec<PendingRow> = sqlx::query_as(q.take.clone())
                    .bind(lanes)
                    .bind(owner)
                    .bind(limit)
                    .bind(floor)
                    .fetch_all(pool)
                    .await?;
                // `UPDATE … RETURNING` returns rows in no particular order.
                rows.sort_unstable_by_key(|r| r.seq);
                Ok(rows)
            }

            async fn outbox_mark_fenced(
                pool: &Pool<Self>,
                q: &OutboxQueries,
                owner: &str,
                lease_secs: f64,
                held: &[(i32, i64)],
                lanes: i64,
                acked: &[Acked],
            ) -> Result<Option<Vec<i32>>, sqlx::Error> {
                let Some(sql) = q.mark_fenced.clone() else {
                    return Ok(None);
                };
                let acked = serde_json::to_string(acked).expect("numbers serialize");
                let held = serde_json::to_string(held).expect("numbers serialize");
                let held: String = sqlx::query_scalar(sql)
                    .bind(acked)
                    .bind(owner)
                    .bind(lease_secs)
                    .bind(held)
                    .bind(lanes)
                    .fetch_one(pool)
                    .await?;
                let held =
                    serde_json::from_str(&held).map_err(|e| sqlx::Error::Decode(Box::new(e)))?;
                Ok(Some(held))
            }

            async fn outbox_mark(
                conn: &mut Self::Connection,
                q: &OutboxQueries,
                acked: &[Acked],
                by: &str,
            ) -> Result<u64, sqlx::Error> {
                let list = serde_json::to_string(acked).expect("numbers serialize");
                let done = sqlx::query(q.mark.clone())
                    .bind(list)
                    .bind(by)
                    .execute(conn)
                    .await?;
                Ok(done.rows_affected())
            }

            async fn outbox_park(
                conn: &mut Self::Connection,
                q: &OutboxQueries,
                seq: i64,
                error: &str,
            ) -> Result<(), sqlx::Error> {
                sqlx::query(q.park.clone())
                    .bind(seq)
                    .bind(error)
                    .execute(conn)
                    .await
                    .map(drop)
            }

            async fn outbox_unpark(
                pool: &Pool<Self>,
                q: &OutboxQueries,
                id: &str,
            ) -> Result<bool, sqlx::Error> {
                let done = sqlx::query(q.unpark.clone()).bind(id).execute(pool).await?;
                Ok(done.rows_affected() == 1)
            }

            async fn outbox_cleanup(
                pool: &Pool<Self>,
                q: &OutboxQueries,
                keep_secs: f64,
                limit: i64,
            ) -> Result<u64, sqlx::Error> {
                let done = sqlx::query(q.cleanup.clone())
                    .bind(keep_secs)
                    .bind(limit)
                    .execute(pool)
                    .await?;
                Ok(done.rows_affected())
            }

            async fn outbox_backlog(
                pool: &Pool<Self>,
                q: &OutboxQueries,
                lanes: i64,
            ) -> Result<Vec<LaneBacklog>, sqlx::Error> {
                sqlx::query_as(q.backlog.clone())
                    .bind(lanes)
                    .fetch_all(pool)
                    .await
            }

            async fn outbox_parked_count(
                pool: &Pool<Self>,
                q: &OutboxQueries,
            ) -> Result<i64, sqlx::Error> {
                sqlx::query_scalar(q.parked_count.clone())
                    .fetch_one(pool)
                    .await
            }

            async fn outbox_parked(
                pool: &Pool<Self>,
                q: &OutboxQueries,
            ) -> Result<Vec<OutboxEntry>, sqlx::Error> {
                sqlx::query_as(q.parked.clone()).fetch_all(pool).await
            }

            async fn outbox_trace(
                pool: &Pool<Self>,
                q: &OutboxQueries,
                id: &str,
            ) -> Result<Option<OutboxEntry>, sqlx::Error> {
                sqlx::query_as(q.trace.clone())
                    .bind(id)
                    .fetch_optional(pool)
                    .await
            }

            async fn outbox_ledger(
                pool: &Pool<Self>,
                q: &OutboxQueries,
                id: &str,
            ) -> Result<Vec<LedgerEntry>, sqlx::Error> {
                sqlx::query_as(q.ledger.clone())
                    .bind(id)
                    .fetch_all(pool)
                    .await
            }
        }
    };
}

/// A timestamp column as RFC 3339 text in UTC, as PostgreSQL prints it.
macro_rules! pg_ts {
    ($col:literal) => {
        concat!(
            "to_char(",
            $col,
            " AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')"
        )
    };
}

macro_rules! pg_entry {
    () => {
        concat!(
            "seq, id, aggregatetype, aggregateid, ",
            pg_ts!("created_at"),
            " AS created_at, sent_count, ",
            pg_ts!("published_at"),
            " AS published_at, published_partition, published_offset, published_by, ",
            pg_ts!("parked_at"),
            " AS parked_at, error FROM {s}outbox"
        )
    };
}

/// The relay's read of its lanes' next rows from `seq >= $4` (its floor), which counts their
/// sends; `$age` is the database's expression for the seconds since `created_at`, `$horizon`
/// its `horizon_xmin, horizon_xmax` (see [`PendingRow::horizon_xmin`]).
macro_rules! take {
    ($age:literal, $horizon:literal) => {
        concat!(
            "UPDATE {s}outbox SET sent_count = sent_count + 1
        WHERE seq IN (SELECT seq FROM {s}outbox
            WHERE published_at IS NULL AND parked_at IS NULL AND seq >= $4
            AND key_hash % $1 IN (SELECT lane FROM {s}outbox_lanes WHERE owner = $2)
            ORDER BY seq LIMIT $3)
        RETURNING seq, id, aggregatetype, aggregateid, type, payload, headers, key_hash, ",
            $age,
            " AS age, ",
            $horizon
        )
    };
}

const PG: Templates = Templates {
    lock_key: Some("SELECT pg_advisory_xact_lock($1, $2)"),
    // The transaction has its id before the row draws its `seq` (the one-time filter runs
    // first): the relay's read floor relies on it (see `take`).
    insert: "INSERT INTO {s}outbox (seq, id, aggregatetype, aggregateid, type, payload, headers, key_hash)
        SELECT nextval('{s}outbox_seq_seq'), COALESCE($1, gen_random_uuid()::text), $2, $3, $4, $5, $6, $7
        WHERE pg_current_xact_id() IS NOT NULL RETURNING id",
    lanes_count: "SELECT count(*) FROM {s}outbox_lanes",
    lane_init: "INSERT INTO {s}outbox_lanes (lane) SELECT generate_series(0, $1 - 1) ON CONFLICT (lane) DO NOTHING",
    acquire: "UPDATE {s}outbox_lanes SET owner = $2, epoch = epoch + 1,
        lease_until = now() + make_interval(secs => $3), updated_at = now()
        WHERE lane = $1 AND (owner IS NULL OR lease_until IS NULL OR lease_until < now()) RETURNING epoch",
    renew: "UPDATE {s}outbox_lanes AS x SET lease_until = now() + make_interval(secs => $3), updated_at = now()
        FROM jsonb_array_elements($2::jsonb) AS h
        WHERE x.owner = $1 AND x.lane = (h->>0)::int AND x.epoch = (h->>1)::bigint RETURNING x.lane",
    release: "UPDATE {s}outbox_lanes SET owner = NULL, lease_until = NULL, updated_at = now()
        WHERE lane = $1 AND owner = $2 AND epoch = $3",
    heartbeat: "INSERT INTO {s}outbox_relays (instance, seen_until) VALUES ($1, now() + make_interval(secs => $2))
        ON CONFLICT (instance) DO UPDATE SET seen_until = excluded.seen_until",
    live_relays: "SELECT count(*) FROM {s}outbox_relays WHERE seen_until >= now()",
    leave: "DELETE FROM {s}outbox_relays WHERE instance = $1 OR seen_until < now() - interval '1 hour'",
    leases: concat!(
        "SELECT lane, owner, epoch, ",
        pg_ts!("lease_until"),
        " AS lease_until FROM {s}outbox_lanes ORDER BY lane"
    ),
    take: take!(
        "extract(epoch FROM now() - created_at)::float8",
        "pg_snapshot_xmin(pg_current_snapshot())::text::bigint AS horizon_xmin,
        pg_current_xact_id()::text::bigint AS horizon_xmax"
    ),
    mark: "UPDATE {s}outbox AS o SET published_at = now(), published_partition = (j->>'p')::int,
        published_offset = (j->>'o')::bigint, published_by = $2
        FROM jsonb_array_elements($1::jsonb) AS j WHERE o.seq = (j->>'s')::bigint",
    mark_fenced: Some(
        "WITH l AS (
            UPDATE {s}outbox_lanes AS x SET lease_until = now() + make_interval(secs => $3), updated_at = now()
            FROM jsonb_array_elements($4::jsonb) AS h
            WHERE x.owner = $2 AND x.lane = (h->>0)::int AND x.epoch = (h->>1)::bigint
            RETURNING x.lane
        ), m AS (
            UPDATE {s}outbox AS o SET published_at = now(), published_partition = (j->>'p')::int,
                published_offset = (j->>'o')::bigint, published_by = $2
            FROM jsonb_array_elements($1::jsonb) AS j
            WHERE o.seq = (j->>'s')::bigint AND o.key_hash % $5 IN (SELECT lane FROM l)
        )
        SELECT coalesce(json_agg(lane), '[]')::text AS held FROM l",
    ),
    park: "UPDATE {s}outbox SET parked_at = now(), error = $2 WHERE seq = $1",
    unpark: "UPDATE {s}outbox SET parked_at = NULL, error = NULL WHERE id = $1 AND parked_at IS NOT NULL",
    cleanup: "DELETE FROM {s}outbox WHERE seq IN (SELECT seq FROM {s}outbox
        WHERE published_at IS NOT NULL AND published_at <= now() - make_interval(secs => $1)
        ORDER BY published_at LIMIT $2)",
    backlog: "SELECT key_hash % $1 AS lane, count(*) AS rows,
        max(extract(epoch FROM now() - created_at))::float8 AS oldest FROM {s}outbox
        WHERE published_at IS NULL AND parked_at IS NULL GROUP BY 1 ORDER BY 1",
    parked_count: "SELECT count(*) FROM {s}outbox WHERE parked_at IS NOT NULL",
    parked: concat!("SELECT ", pg_entry!(), " WHERE parked_at IS NOT NULL ORDER BY seq"),
    trace: concat!("SELECT ", pg_entry!(), " WHERE id = $1"),
    ledger: concat!(
        r#"SELECT g.name AS consumer_group, o.topic, o.partition, p."offset", "#,
        pg_ts!("p.processed_at"),
        " AS processed_at FROM {s}processed p JOIN {s}ledger_groups g ON g.group_id = p.group_id
        JOIN {s}consumer_offsets o ON o.source_id = p.source_id
        WHERE p.event_id = $1 ORDER BY p.processed_at, g.name"
    ),
};

macro_rules! sqlite_now {
    () => {
        "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')"
    };
    ($offset:literal) => {
        concat!("strftime('%Y-%m-%dT%H:%M:%fZ', 'now', ", $offset, ")")
    };
}

macro_rules! sqlite_entry {
    () => {
        "seq, id, aggregatetype, aggregateid, created_at, sent_count, published_at,
        published_partition, published_offset, published_by, parked_at, error FROM {s}outbox"
    };
}

const SQLITE: Templates = Templates {
    lock_key: None,
    insert:
        "INSERT INTO {s}outbox (id, aggregatetype, aggregateid, type, payload, headers, key_hash)
        VALUES (COALESCE($1, lower(hex(randomblob(4)) || '-' || hex(randomblob(2)) || '-4' ||
            substr(hex(randomblob(2)), 2) || '-' || substr('89ab', 1 + (abs(random()) % 4), 1) ||
            substr(hex(randomblob(2)), 2) || '-' || hex(randomblob(6)))), $2, $3, $4, $5, $6, $7)
        RETURNING id",
    lanes_count: "SELECT count(*) FROM {s}outbox_lanes",
    lane_init:
        "WITH RECURSIVE n(x) AS (SELECT 0 UNION ALL SELECT x + 1 FROM n WHERE x + 1 < $1)
        INSERT INTO {s}outbox_lanes (lane) SELECT x FROM n WHERE true ON CONFLICT (lane) DO NOTHING",
    acquire: concat!(
        "UPDATE {s}outbox_lanes SET owner = $2, epoch = epoch + 1, lease_until = ",
        sqlite_now!("'+' || $3 || ' seconds'"),
        ", updated_at = ",
        sqlite_now!(),
        " WHERE lane = $1 AND (owner IS NULL OR lease_until IS NULL OR lease_until < ",
        sqlite_now!(),
        ") RETURNING epoch"
    ),
    renew: concat!(
        "UPDATE {s}outbox_lanes SET lease_until = ",
        sqlite_now!("'+' || $3 || ' seconds'"),
        ", updated_at = ",
        sqlite_now!(),
        " WHERE owner = $1 AND EXISTS (SELECT 1 FROM json_each($2) AS h
            WHERE json_extract(h.value, '$[0]') = lane AND json_extract(h.value, '$[1]') = epoch)
        RETURNING lane"
    ),
    release: concat!(
        "UPDATE {s}outbox_lanes SET owner = NULL, lease_until = NULL, updated_at = ",
        sqlite_now!(),
        " WHERE lane = $1 AND owner = $2 AND epoch = $3"
    ),
    heartbeat: concat!(
        "INSERT INTO {s}outbox_relays (instance, seen_until) VALUES ($1, ",
        sqlite_now!("'+' || $2 || ' seconds'"),
        ") ON CONFLICT (instance) DO UPDATE SET seen_until = excluded.seen_until"
    ),
    live_relays: concat!(
        "SELECT count(*) FROM {s}outbox_relays WHERE seen_until >= ",
        sqlite_now!()
    ),
    leave: concat!(
        "DELETE FROM {s}outbox_relays WHERE instance = $1 OR seen_until < ",
        sqlite_now!("'-3600 seconds'")
    ),
    leases: "SELECT lane, owner, epoch, lease_until FROM {s}outbox_lanes ORDER BY lane",
    // One writer at a time: while the relay's `UPDATE` runs no other write is open, so every
    // row below the first one it sees is visible (a horizon that is always past).
    take: take!(
        "(julianday('now') - julianday(created_at)) * 86400.0",
        "1 AS horizon_xmin, 0 AS horizon_xmax"
    ),
    mark: concat!(
        "UPDATE {s}outbox SET published_at = ",
        sqlite_now!(),
        ", published_partition = j.p, published_offset = j.o, published_by = $2
        FROM (SELECT json_extract(value, '$.s') AS s, json_extract(value, '$.p') AS p,
              json_extract(value, '$.o') AS o FROM json_each($1)) AS j
        WHERE {s}outbox.seq = j.s"
    ),
    mark_fenced: None,
    park: concat!(
        "UPDATE {s}outbox SET parked_at = ",
        sqlite_now!(),
        ", error = $2 WHERE seq = $1"
    ),
    unpark: "UPDATE {s}outbox SET parked_at = NULL, error = NULL WHERE id = $1 AND parked_at IS NOT NULL",
    cleanup: concat!(
        "DELETE FROM {s}outbox WHERE seq IN (SELECT seq FROM {s}outbox
        WHERE published_at IS NOT NULL AND published_at <= ",
        sqlite_now!("'-' || $1 || ' seconds'"),
        " ORDER BY published_at LIMIT $2)"
    ),
    backlog: "SELECT key_hash % $1 AS lane, count(*) AS rows,
        max((julianday('now') - julianday(created_at)) * 86400.0) AS oldest FROM {s}outbox
        WHERE published_at IS NULL AND parked_at IS NULL GROUP BY 1 ORDER BY 1",
    parked_count: "SELECT count(*) FROM {s}outbox WHERE parked_at IS NOT NULL",
    parked: concat!(
        "SELECT ",
        sqlite_entry!(),
        " WHERE parked_at IS NOT NULL ORDER BY seq"
    ),
    trace: concat!("SELECT ", sqlite_entry!(), " WHERE id = $1"),
    ledger: r#"SELECT g.name AS consumer_group, o.topic, o.partition, p."offset", p.processed_at
        FROM {s}processed p JOIN {s}ledger_groups g ON g.group_id = p.group_id
        JOIN {s}consumer_offsets o ON o.source_id = p.source_id
        WHERE p.event_id = $1 ORDER BY p.processed_at, g.name"#,
};

async fn pg_notify(conn: &mut sqlx::PgConnection, q: &OutboxQueries) -> Result<(), sqlx::Error> {
    // Delivered when the transaction commits; one per transaction and channel (PostgreSQL
    // folds identical notifications of one transaction).
    sqlx::query("SELECT pg_notify($1, '')")
        .bind(&q.channel)
        .execute(conn)
        .await
        .map(drop)
}

async fn no_notify(
    _conn: &mut sqlx::SqliteConnection,
    _q: &OutboxQueries,
) -> Result<(), sqlx::Error> {
    Ok(())
}

fn pg_listen(
    pool: &Pool<sqlx::Postgres>,
    q: &OutboxQueries,
    wake: std::sync::Arc<tokio::sync::Notify>,
) -> Option<tokio::task::JoinHandle<()>> {
    let pool = pool.clone();
    let channel = q.channel.clone();
    Some(tokio::spawn(async move {
        loop {
            let listener = async {
                let mut l = sqlx::postgres::PgListener::connect_with(&pool).await?;
                l.listen(&channel).await?;
                Ok::<_, sqlx::Error>(l)
            };
            match listener.await {
                Ok(mut l) => {
                    tracing::debug!(%channel, "relay: listening for outbox notifications");
                    // A poll right after (re)connecting covers what was missed meanwhile.
                    wake.notify_one();
                    loop {
                        match l.try_recv().await {
                            Ok(Some(_)) => wake.notify_one(),
                            // The connection was lost; the listener reconnects on the next call.
                            Ok(None) => wake.notify_one(),
                            Err(e) => {
                                tracing::warn!(error = %e, "relay: LISTEN failed; polling until it reconnects");
                                break;
                            }
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "relay: cannot LISTEN for outbox notifications; polling meanwhile");
                }
            }
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        }
    }))
}

fn no_listen(
    _: &Pool<sqlx::Sqlite>,
    _: &OutboxQueries,
    _: std::sync::Arc<tokio::sync::Notify>,
) -> Option<tokio::task::JoinHandle<()>> {
    None
}

impl_outbox!(sqlx::Postgres, PG, ".", pg_notify, pg_listen);
impl_outbox!(sqlx::Sqlite, SQLITE, "_", no_notify, no_listen);
