//! The runtime's SQL per database, behind the crate-private [`Dialect`] trait.
//!
//! Everything here is `pub` only so that it can appear in the sealed [`super::Backend`]'s
//! supertrait; the module is private, so none of it is nameable outside the crate. Use
//! [`super::Store`] to run any of it.
#![allow(unreachable_pub)]

use async_trait::async_trait;
use sqlx::migrate::Migrator;
use sqlx::{Pool, Transaction};

use super::StoredOffset;
use crate::error::{FailureKind, Result};

/// Implements [`Dialect`] for a database: the dialect-specific methods are given, the rest
/// (which differ only in their SQL, kept in [`Queries`]) are the same for every database.
macro_rules! impl_backend {
    ($db:ty, $row:ty; $($specific:tt)*) => {
        /// A statement whose first three parameters are a partition: its group, topic and
        /// number.
        fn for_partition(
            sql: sqlx::SqlStr,
            key: &PartitionKey,
        ) -> sqlx::query::Query<'static, $db, <$db as sqlx::Database>::Arguments> {
            sqlx::query(sql)
                .bind(&key.group)
                .bind(&key.topic)
                .bind(key.partition)
        }

        /// The first partition whose stored offset lies below generation `generation`'s mark
        /// (a replay or an offset change moved it back over the generation's rows, and it has
        /// not passed them again), described; `None`: the generation may go.
        async fn floor_hold(
            conn: &mut <$db as sqlx::Database>::Connection,
            q: &Queries,
            generation: i32,
        ) -> Result<Option<String>, sqlx::Error> {
            let rows: Vec<(String, i32, Option<i64>, i64)> = sqlx::query_as(q.floor_holds.clone())
                .bind(generation)
                .fetch_all(conn)
                .await?;
            Ok(rows
                .into_iter()
                .find(|(_, _, next, mark)| next.is_some_and(|n| n < *mark))
                .map(|(topic, partition, next, mark)| {
                    format!(
                        "{topic}/{partition} stands at {} below the offset {mark} its rows reach",
                        next.unwrap_or_default()
                    )
                }))
        }

        fn claim_from(row: $row) -> Result<Claim, sqlx::Error> {
            use sqlx::FromRow as _;
            Claim::from_row(&row)
        }

        fn dead_letter_from(row: $row) -> Result<crate::store::dead_letter::DeadLetter, sqlx::Error> {
            use sqlx::FromRow as _;
            crate::store::dead_letter::DeadLetterRow::from_row(&row)?.try_into()
        }

        #[async_trait::async_trait]
        impl Dialect for $db {
            $($specific)*

            async fn park(
                conn: &mut Self::Connection,
                q: &Queries,
                key: &PartitionKey,
                letter: &Parking<'_>,
            ) -> Result<(), sqlx::Error> {
                for_partition(q.park.clone(), key)
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
            ) -> Result<Vec<crate::store::dead_letter::DeadLetter>, sqlx::Error> {
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
            ) -> Result<Option<crate::store::dead_letter::DeadLetter>, sqlx::Error> {
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
            ) -> Result<Option<crate::store::dead_letter::DeadLetter>, sqlx::Error> {
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
                sqlx::query(q.ensure_group.clone())
                    .bind(&key.group)
                    .execute(pool)
                    .await?;
                let row = for_partition(q.claim.clone(), key)
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
                let row = for_partition(q.reclaim.clone(), key)
                    .bind(owner)
                    .fetch_optional(pool)
                    .await?;
                row.map(claim_from).transpose()
            }

            async fn claim_within(
                pool: &Pool<Self>,
                q: &Queries,
                key: &PartitionKey,
                owner: &str,
                conditional: bool,
                lock_timeout: std::time::Duration,
            ) -> Result<Option<Claim>, sqlx::Error> {
                // The group's short ledger key exists before its first claim (as in `claim`).
                sqlx::query(q.ensure_group.clone())
                    .bind(&key.group)
                    .execute(pool)
                    .await?;
                let mut tx = Self::begin(pool, crate::store::CRATE).await?;
                Self::set_lock_timeout(&mut tx, lock_timeout, crate::store::CRATE).await?;
                let sql = if conditional { q.reclaim.clone() } else { q.claim.clone() };
                let row = for_partition(sql, key)
                    .bind(owner)
                    .fetch_optional(&mut *tx)
                    .await?;
                tx.commit().await?;
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
                let done = for_partition(q.advance.clone(), key)
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
                below_floor: bool,
            ) -> Result<Claim, sqlx::Error> {
                sqlx::query(q.ensure_group.clone())
                    .bind(&key.group)
                    .execute(&mut *conn)
                    .await?;
                let row = for_partition(q.set_offset.clone(), key)
                    .bind(next_offset)
                    .bind(below_floor)
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
                let done = for_partition(q.clear_ledger.clone(), key)
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
                sqlx::query_as(q.offsets.clone())
                    .bind(group)
                    .fetch_all(pool)
                    .await
                    .map_err(Error::db("reading stored offsets"))
            }
        }
    };
}

/// Whether `e` is PostgreSQL's `lock_timeout` expiring (SQLSTATE `55P03`, lock not available).
pub fn is_lock_timeout(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .and_then(|d| d.code())
        .is_some_and(|c| c == "55P03")
}

/// A record being parked in `dead_letters` (the partition comes with it separately).
#[derive(Debug, Clone)]
pub struct Parking<'a> {
    /// The record's offset.
    pub offset: i64,
    /// The record's key.
    pub key: Option<&'a [u8]>,
    /// The record's headers, encoded as `encode_headers` (in `dead_letter`) says.
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

/// One generation of the dedup ledger (see the README, "Ledger retention"): new claims go to
/// the newest; a generation is dropped whole once everything in it is older than the retention.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Generation {
    /// Its number (0: the ledger as it was before generations existed, or the first).
    pub generation: i32,
    /// When it started taking claims, UTC, RFC 3339. Every row in it was claimed at or after
    /// that time (a generation upgraded in place: its oldest row's time).
    pub started_at: String,
    /// Seconds since it started.
    pub age_seconds: f64,
    /// Its rows (PostgreSQL: the planner's estimate when the table has been analysed, an exact
    /// count otherwise; SQLite: exact).
    pub rows: i64,
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::FromRow)]
pub struct Claim {
    /// The epoch this worker must present to commit.
    pub epoch: i64,
    /// The stored offset to resume from, or `None` if nothing was ever committed (the reset
    /// policy decides).
    pub next_offset: Option<i64>,
}

/// The runtime's SQL, with the schema (or table prefix) spliced in once.
#[derive(Debug, Clone)]
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
    pub(crate) ensure_group: sqlx::SqlStr,
    pub(crate) ensure_source: sqlx::SqlStr,
    pub(crate) fence_and_claim: Option<sqlx::SqlStr>,
    pub(crate) generations: sqlx::SqlStr,
    pub(crate) mark_generation: sqlx::SqlStr,
    pub(crate) raise_floors: sqlx::SqlStr,
    pub(crate) floor_holds: sqlx::SqlStr,
    pub(crate) forget_generation: sqlx::SqlStr,
    pub(crate) forget_marks: sqlx::SqlStr,
}

impl Queries {
    /// The runtime's SQL of `DB` for the schema (PostgreSQL) or table prefix (SQLite)
    /// `schema`. Refuses a schema that is not a plain identifier.
    pub(crate) fn new<DB: super::Backend>(schema: &str) -> Result<Queries> {
        match DB::KIND {
            super::DatabaseKind::Postgres => super::postgres::queries(schema),
            super::DatabaseKind::Sqlite => super::sqlite::queries(schema),
        }
    }

    pub(super) fn build(schema: &str, prefix: &str, templates: &Templates) -> Queries {
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
            ensure_group: q(templates.ensure_group),
            ensure_source: q(templates.ensure_source),
            fence_and_claim: templates.fence_and_claim.map(q),
            generations: q(templates.generations),
            mark_generation: q(MARK_GENERATION),
            raise_floors: q(RAISE_FLOORS),
            floor_holds: q(templates.floor_holds),
            forget_generation: q(FORGET_GENERATION),
            forget_marks: q(FORGET_MARKS),
        }
    }
}

use sqlx::SqlSafeStr as _;

/// Removes a partition's ledger rows for offsets in `[$4, $5)` (replay `--rebuild`).
const CLEAR_LEDGER: &str = r#"DELETE FROM {s}processed
WHERE source_id = (SELECT source_id FROM {s}consumer_offsets WHERE consumer_group = $1 AND topic = $2 AND partition = $3)
  AND "offset" >= $4 AND "offset" < $5"#;

/// Undoes a record's ledger claim made earlier in the same transaction (the record is being
/// parked in `dead_letters` instead of applied).
const UNCLAIM: &str = r#"DELETE FROM {s}processed
WHERE group_id = (SELECT group_id FROM {s}ledger_groups WHERE name = $1) AND event_id = $2"#;

/// Counts a group's ledger rows (the ledger size gauge).
const LEDGER_ROWS: &str = r#"SELECT count(*) FROM {s}processed
WHERE group_id = (SELECT group_id FROM {s}ledger_groups WHERE name = $1)"#;

/// Records, for the generation `$1` that is ending, the highest stored offset every partition
/// ever had: each row of the generation lies below it (its transaction advanced the offset past
/// it and has committed, since the switch waits for every claim in flight).
const MARK_GENERATION: &str = r#"INSERT INTO {s}ledger_marks (generation, source_id, high_offset)
SELECT $1, source_id, CASE WHEN high_offset IS NULL OR next_offset > high_offset THEN next_offset ELSE high_offset END
FROM {s}consumer_offsets
WHERE source_id IS NOT NULL AND coalesce(next_offset, high_offset) IS NOT NULL
ON CONFLICT DO NOTHING"#;

/// Raises the floor of every partition to the mark of generation `$1`, which is being dropped
/// (before its rows go: a floor too high for a moment is safe, one too low is not).
const RAISE_FLOORS: &str = r#"UPDATE {s}consumer_offsets SET ledger_floor = m.high_offset
FROM {s}ledger_marks m
WHERE m.generation = $1 AND m.source_id = {s}consumer_offsets.source_id
  AND ({s}consumer_offsets.ledger_floor IS NULL OR {s}consumer_offsets.ledger_floor < m.high_offset)"#;

/// Forgets a dropped generation `$1`: its row and its marks.
const FORGET_GENERATION: &str = r#"DELETE FROM {s}ledger_generations WHERE generation = $1"#;
const FORGET_MARKS: &str = r#"DELETE FROM {s}ledger_marks WHERE generation <= $1"#;

/// Deletes one dead letter.
const DL_DELETE: &str = r#"DELETE FROM {s}dead_letters WHERE id = $1"#;

pub(super) struct Templates {
    pub(super) claim: &'static str,
    pub(super) reclaim: &'static str,
    pub(super) advance: &'static str,
    pub(super) claim_events: &'static str,
    pub(super) set_offset: &'static str,
    pub(super) offsets: &'static str,
    pub(super) applied_version: &'static str,
    pub(super) ledger_known: &'static str,
    /// Makes sure the group `$1` has a `group_id`.
    pub(super) ensure_group: &'static str,
    /// Makes sure the partition (`$1..$3`) has an offsets row, and with it a `source_id` (a
    /// row with no stored offset, which is what no row means): for a claim outside a batch
    /// (redrive) of a partition nothing was ever committed for.
    pub(super) ensure_source: &'static str,
    /// The fence and the claim as one statement (`$1..$8`: group, topic, partition, epoch,
    /// expected, next, ids, offsets), where the database can do that.
    pub(super) fence_and_claim: Option<&'static str>,
    /// The generations, oldest first: generation, started_at (RFC 3339), age in seconds.
    pub(super) generations: &'static str,
    /// Every partition with a mark in generation `$1`: topic, partition, next_offset, mark.
    /// PostgreSQL locks the offsets rows it reads, so that no replay moves one back between
    /// the check and the floor's rise.
    pub(super) floor_holds: &'static str,
    /// Parks a record: `$1..$12` = group, topic, partition, offset, key, headers, payload,
    /// timestamp_ms, event_id, error, error_kind, attempts. Parking the same record again (a
    /// replay, or at-least-once re-running a batch) updates the error and adds the attempts.
    pub(super) park: &'static str,
    /// A group's dead letters (`$2`: a topic, or NULL for all), oldest coordinates first.
    pub(super) dl_list: &'static str,
    /// One dead letter by id.
    pub(super) dl_get: &'static str,
    /// Deletes one dead letter by id and returns it (redrive).
    pub(super) dl_take: &'static str,
    /// Deletes a group's dead letters (`$2`: a topic, or NULL for all).
    pub(super) dl_purge: &'static str,
    /// Records another failed attempt (`$1` id, `$2` kind, `$3` error).
    pub(super) dl_failed: &'static str,
}

/// Proof that the caller is this crate: the [`Dialect`] methods that take neither a [`Queries`]
/// nor a [`PartitionKey`] take one, so that no method of it can be called from outside.
#[derive(Debug, Clone, Copy)]
pub struct Crate(());

/// The one [`Crate`] value.
pub(crate) const CRATE: Crate = Crate(());

/// The runtime's SQL for one database: the methods the unit of work, the runtime and the admin
/// API are built from. It is reachable only as a supertrait of [`super::Backend`], and its
/// arguments ([`Queries`], [`PartitionKey`], [`Crate`]) cannot be made outside this crate, so nothing
/// outside the crate can call it.
#[async_trait]
pub trait Dialect: sqlx::Database {
    /// The migrator for the schema of `q`, with the schema substituted and its own history table.
    fn migrator(q: &Queries) -> Migrator;

    /// Applies the migrator for the schema of `q` to the database.
    async fn run_migrations(pool: &Pool<Self>, q: &Queries) -> Result<()>;

    /// Opens a pool of at most `max_connections` connections (SQLite: creates the file, WAL
    /// mode, a busy timeout).
    async fn open_pool(
        url: &str,
        max_connections: u32,
        _: Crate,
    ) -> Result<Pool<Self>, sqlx::Error>;

    /// Begins a transaction that will write, with the settings the guarantees rely on, on any
    /// pool. PostgreSQL: `idle_in_transaction_session_timeout = 1min` for the transaction unless
    /// chosen elsewhere. SQLite: a 30 s busy timeout, then `BEGIN IMMEDIATE`, which takes the
    /// write lock up front, waiting for it under the busy timeout, so that a transaction that
    /// read first can never fail to upgrade to a writer.
    async fn begin(pool: &Pool<Self>, _: Crate) -> Result<Transaction<'static, Self>, sqlx::Error>;

    /// How many transactions may be open at once on `pool` (SQLite: one writer).
    fn max_writers(pool: &Pool<Self>, _: Crate) -> usize;

    /// The newest migration applied, or `None` when the runtime's tables do not exist.
    async fn applied_version(pool: &Pool<Self>, q: &Queries) -> Result<Option<i64>>;

    /// Claims a partition on assignment: creates its offsets row if needed, bumps the epoch,
    /// records `owner`, and returns the new epoch and the stored offset.
    async fn claim(
        pool: &Pool<Self>,
        q: &Queries,
        key: &PartitionKey,
        owner: &str,
    ) -> Result<Claim, sqlx::Error>;

    /// [`claim`](Self::claim) (or, if `conditional`, [`reclaim`](Self::reclaim)) in a
    /// transaction of its own that waits at most `lock_timeout` for the partition's offsets row
    /// (PostgreSQL: `SET LOCAL lock_timeout`; a row locked longer fails with SQLSTATE `55P03`,
    /// see [`is_lock_timeout`]). SQLite has one writer and no row locks: its wait is the busy
    /// timeout's.
    async fn claim_within(
        pool: &Pool<Self>,
        q: &Queries,
        key: &PartitionKey,
        owner: &str,
        conditional: bool,
        lock_timeout: std::time::Duration,
    ) -> Result<Option<Claim>, sqlx::Error>;

    /// Bounds how long the statements of `tx` wait for a row lock (PostgreSQL); nothing on
    /// SQLite.
    async fn set_lock_timeout(
        tx: &mut Transaction<'static, Self>,
        timeout: std::time::Duration,
        _: Crate,
    ) -> Result<(), sqlx::Error>;

    /// Re-claims a partition after this worker was fenced, but only if nobody else owns it
    /// (a replay clears the owner). `None`: another instance owns it.
    async fn reclaim(
        pool: &Pool<Self>,
        q: &Queries,
        key: &PartitionKey,
        owner: &str,
    ) -> Result<Option<Claim>, sqlx::Error>;

    /// The fence: moves the stored offset from `expected` to `next` if the epoch is still
    /// `epoch`. `false` means this worker no longer owns the partition.
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
    async fn claim_events(
        conn: &mut Self::Connection,
        q: &Queries,
        key: &PartitionKey,
        ids: &[&str],
        offsets: &[i64],
    ) -> Result<Vec<i64>, sqlx::Error>;

    /// Sets a partition's stored offset, bumps its epoch and clears its owner, so that a
    /// running worker is fenced and reloads (replay and explicit offset changes). Unless
    /// `below_floor`, an offset below the partition's ledger floor changes nothing and is
    /// [`sqlx::Error::RowNotFound`] (checked on the locked row, so that it holds against a
    /// prune raising the floor at the same moment).
    async fn set_offset(
        conn: &mut Self::Connection,
        q: &Queries,
        key: &PartitionKey,
        next_offset: i64,
        below_floor: bool,
    ) -> Result<Claim, sqlx::Error>;

    /// How many rows of the dedup ledger belong to `group`.
    async fn ledger_size(pool: &Pool<Self>, q: &Queries, group: &str) -> Result<i64, sqlx::Error>;

    /// The stored offsets of a group.
    async fn offsets(pool: &Pool<Self>, q: &Queries, group: &str) -> Result<Vec<StoredOffset>>;

    /// Which of `ids` the ledger of `group` holds (in no particular order).
    async fn ledger_known(
        pool: &Pool<Self>,
        q: &Queries,
        group: &str,
        ids: &[&str],
    ) -> Result<Vec<String>, sqlx::Error>;

    /// Parks a record of `key`'s partition in `dead_letters` (upsert on its coordinates).
    async fn park(
        conn: &mut Self::Connection,
        q: &Queries,
        key: &PartitionKey,
        letter: &Parking<'_>,
    ) -> Result<(), sqlx::Error>;

    /// Deletes the ledger row of `event_id` for `group` (undoing a claim of this transaction).
    async fn unclaim(
        conn: &mut Self::Connection,
        q: &Queries,
        group: &str,
        event_id: &str,
    ) -> Result<(), sqlx::Error>;

    /// A group's dead letters, optionally of one topic, by topic, partition and offset.
    async fn dead_letters(
        pool: &Pool<Self>,
        q: &Queries,
        group: &str,
        topic: Option<&str>,
    ) -> Result<Vec<crate::store::dead_letter::DeadLetter>, sqlx::Error>;

    /// One dead letter by id.
    async fn dead_letter(
        pool: &Pool<Self>,
        q: &Queries,
        id: i64,
    ) -> Result<Option<crate::store::dead_letter::DeadLetter>, sqlx::Error>;

    /// Deletes one dead letter and returns it (in the caller's transaction).
    async fn take_dead_letter(
        conn: &mut Self::Connection,
        q: &Queries,
        id: i64,
    ) -> Result<Option<crate::store::dead_letter::DeadLetter>, sqlx::Error>;

    /// Deletes a group's dead letters, optionally of one topic; returns how many.
    async fn purge_dead_letters(
        pool: &Pool<Self>,
        q: &Queries,
        group: &str,
        topic: Option<&str>,
    ) -> Result<u64, sqlx::Error>;

    /// Deletes one dead letter; `false` if there was none.
    async fn delete_dead_letter(
        pool: &Pool<Self>,
        q: &Queries,
        id: i64,
    ) -> Result<bool, sqlx::Error>;

    /// Records one more failed attempt of a dead letter (a redrive that failed again).
    async fn dead_letter_failed_again(
        pool: &Pool<Self>,
        q: &Queries,
        id: i64,
        kind: FailureKind,
        error: &str,
    ) -> Result<(), sqlx::Error>;

    /// The fence and the ledger claim of a batch, in the caller's transaction: moves the
    /// stored offset from `expected` to `next` if the epoch is still `epoch` and, only then,
    /// claims `ids` (distinct; `offsets` the offset of each id's first record). `None`: fenced
    /// (nothing was claimed). PostgreSQL does both in one statement.
    #[allow(clippy::too_many_arguments)]
    async fn fence_and_claim(
        conn: &mut Self::Connection,
        q: &Queries,
        key: &PartitionKey,
        epoch: i64,
        expected: Option<i64>,
        next: i64,
        ids: &[&str],
        offsets: &[i64],
    ) -> Result<Option<Vec<i64>>, sqlx::Error>;

    /// The ledger's generations, oldest first.
    async fn generations(pool: &Pool<Self>, q: &Queries) -> Result<Vec<Generation>, sqlx::Error>;

    /// Starts the generation after `current` (creating its storage first where needed), if
    /// `current` is still the newest and no other pruner is at work. `false`: nothing done.
    async fn start_generation(
        pool: &Pool<Self>,
        q: &Queries,
        current: i32,
    ) -> Result<bool, sqlx::Error>;

    /// Drops an old generation: raises the floors to its marks, then removes its rows
    /// (PostgreSQL: detaches and drops its partition; SQLite: bounded batches of deletes), then
    /// forgets it. `None`: another pruner is at work.
    async fn drop_generation(
        pool: &Pool<Self>,
        q: &Queries,
        generation: i32,
    ) -> Result<Option<u64>, sqlx::Error>;

    /// Deletes a partition's ledger rows whose first record lies in `[from, to)`; returns how
    /// many.
    async fn clear_ledger(
        conn: &mut Self::Connection,
        q: &Queries,
        key: &PartitionKey,
        from: i64,
        to: i64,
    ) -> Result<u64, sqlx::Error>;
}
