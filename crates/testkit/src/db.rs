//! A real database per test: PostgreSQL (the shared test database, or a private server) or a
//! fresh SQLite file, with the runtime's migrations, the non-idempotent `test_effects` table and
//! the crash-point triggers; and what tests read back from it.

use std::collections::HashMap;
use std::time::Duration;

use consumer_runtime::Backend;
use consumer_runtime::sqlx::{self, Pool, Postgres, Row, Sqlite};

use crate::{CAUGHT_UP, SCHEMA, database_url, init_tracing, rand_name, wait_until};

/// A database the behaviour suite runs against: each test gets a pool with the runtime's
/// migrations applied, the `test_effects` table, and the crash-point trigger.
#[async_trait::async_trait]
pub trait TestDb: Backend {
    /// How many batches can commit at once (SQLite: one writer), to size slow test workloads.
    const WRITERS: u32;

    /// A ready pool (PostgreSQL: the shared test database; SQLite: a fresh file).
    async fn pool() -> Pool<Self>;

    /// The non-idempotent test effect: `count = count + 1` for (group, event id).
    async fn apply_effect(
        conn: &mut Self::Connection,
        group: &str,
        event_id: &str,
    ) -> Result<(), sqlx::Error>;

    /// How often each event id's effect was applied for `group`.
    async fn effect_counts(pool: &Pool<Self>, group: &str) -> HashMap<String, i64>;

    /// Rows of the dedup ledger for `group`.
    async fn ledger_rows(pool: &Pool<Self>, group: &str) -> i64;

    /// Another owner claims `group`'s partition `topic`/`partition` in the database, as a new
    /// owner's claim on assignment would: a new epoch and `owner` (the row must exist).
    async fn claim_as(pool: &Pool<Self>, group: &str, topic: &str, partition: i32, owner: &str);

    /// Whether the dedup ledger of `group` holds `event_id`.
    async fn in_ledger(pool: &Pool<Self>, group: &str, event_id: &str) -> bool;

    /// From now on, every commit that would move `group`'s stored offset past `after_offset`
    /// fails (a database error raised by a trigger), until [`TestDb::clear_crash_point`].
    async fn set_crash_point(pool: &Pool<Self>, group: &str, after_offset: i64);

    /// Removes `group`'s crash point.
    async fn clear_crash_point(pool: &Pool<Self>, group: &str);
}

const EFFECT_SQL: &str =
    "INSERT INTO test_effects (consumer_group, event_id, count) VALUES ($1, $2, 1)
     ON CONFLICT (consumer_group, event_id) DO UPDATE SET count = test_effects.count + 1";
const EFFECTS_TABLE: &str = "CREATE TABLE IF NOT EXISTS test_effects (
     consumer_group TEXT NOT NULL,
     event_id TEXT NOT NULL,
     count INTEGER NOT NULL,
     PRIMARY KEY (consumer_group, event_id))";
const CRASH_TABLE: &str = "CREATE TABLE IF NOT EXISTS test_crash_points (
     consumer_group TEXT PRIMARY KEY,
     after_offset BIGINT NOT NULL)";

/// The test methods that are the same SQL on both databases.
macro_rules! impl_test_db {
    ($db:ty, $writers:literal, $ledger:literal, $offsets:literal, $pool:path) => {
        #[async_trait::async_trait]
        impl TestDb for $db {
            const WRITERS: u32 = $writers;

            async fn pool() -> Pool<$db> {
                $pool().await
            }

            async fn apply_effect(
                conn: &mut <$db as sqlx::Database>::Connection,
                group: &str,
                event_id: &str,
            ) -> Result<(), sqlx::Error> {
                sqlx::query(EFFECT_SQL)
                    .bind(group)
                    .bind(event_id)
                    .execute(conn)
                    .await?;
                Ok(())
            }

            async fn effect_counts(pool: &Pool<Self>, group: &str) -> HashMap<String, i64> {
                sqlx::query("SELECT event_id, count FROM test_effects WHERE consumer_group = $1")
                    .bind(group)
                    .fetch_all(pool)
                    .await
                    .unwrap()
                    .into_iter()
                    .map(|r| (r.get::<String, _>(0), r.get::<i32, _>(1) as i64))
                    .collect()
            }

            async fn ledger_rows(pool: &Pool<Self>, group: &str) -> i64 {
                sqlx::query_scalar(concat!(
                    "SELECT count(*) FROM ",
                    $ledger,
                    "processed WHERE group_id = (SELECT group_id FROM ",
                    $ledger,
                    "ledger_groups WHERE name = $1)"
                ))
                .bind(group)
                .fetch_one(pool)
                .await
                .unwrap()
            }

            async fn claim_as(
                pool: &Pool<Self>,
                group: &str,
                topic: &str,
                partition: i32,
                owner: &str,
            ) {
                let claimed = sqlx::query(concat!(
                    "UPDATE ",
                    $offsets,
                    " SET epoch = epoch + 1, owner = $4",
                    " WHERE consumer_group = $1 AND topic = $2 AND partition = $3"
                ))
                .bind(group)
                .bind(topic)
                .bind(partition)
                .bind(owner)
                .execute(pool)
                .await
                .unwrap();
                assert_eq!(claimed.rows_affected(), 1, "no offsets row to claim");
            }

            async fn in_ledger(pool: &Pool<Self>, group: &str, event_id: &str) -> bool {
                let n: i64 = sqlx::query_scalar(concat!(
                    "SELECT count(*) FROM ",
                    $ledger,
                    "processed WHERE group_id = (SELECT group_id FROM ",
                    $ledger,
                    "ledger_groups WHERE name = $1) AND event_id = $2"
                ))
                .bind(group)
                .bind(event_id)
                .fetch_one(pool)
                .await
                .unwrap();
                n > 0
            }

            async fn set_crash_point(pool: &Pool<Self>, group: &str, after_offset: i64) {
                sqlx::query(
                    "INSERT INTO test_crash_points (consumer_group, after_offset) VALUES ($1, $2)",
                )
                .bind(group)
                .bind(after_offset)
                .execute(pool)
                .await
                .unwrap();
            }

            async fn clear_crash_point(pool: &Pool<Self>, group: &str) {
                sqlx::query("DELETE FROM test_crash_points WHERE consumer_group = $1")
                    .bind(group)
                    .execute(pool)
                    .await
                    .unwrap();
            }
        }
    };
}

impl_test_db!(
    Postgres,
    4,
    "consumer_runtime.",
    "consumer_runtime.consumer_offsets",
    pg_pool
);
impl_test_db!(
    Sqlite,
    1,
    "consumer_runtime_",
    "consumer_runtime_consumer_offsets",
    sqlite_pool
);

/// A fresh SQLite file with the runtime's migrations applied, the test effects table and the
/// crash-point trigger.
pub async fn sqlite_pool() -> Pool<Sqlite> {
    init_tracing();
    let dir = tmp_dir().join("sqlite");
    std::fs::create_dir_all(&dir).unwrap();
    let url = format!("sqlite://{}", dir.join(rand_name("t") + ".db").display());
    let pool = consumer_runtime::connect::<Sqlite>(&url, 8)
        .await
        .expect("open the SQLite file");
    consumer_runtime::migrate(&pool, SCHEMA)
        .await
        .expect("migrate");
    for sql in [
        EFFECTS_TABLE,
        CRASH_TABLE,
        "CREATE TRIGGER test_fail_offset_commit
             BEFORE UPDATE OF next_offset ON consumer_runtime_consumer_offsets FOR EACH ROW
             WHEN EXISTS (SELECT 1 FROM test_crash_points c
                          WHERE c.consumer_group = NEW.consumer_group
                            AND NEW.next_offset > c.after_offset)
             BEGIN SELECT RAISE(ABORT, 'test crash point: the offset commit fails'); END",
        // Dead letters of groups named `unparkable…` cannot be written.
        "CREATE TRIGGER test_refuse_dead_letter
             BEFORE INSERT ON consumer_runtime_dead_letters FOR EACH ROW
             WHEN NEW.consumer_group LIKE 'unparkable%'
             BEGIN SELECT RAISE(ABORT, 'test: dead letters refused'); END",
    ] {
        sqlx::query(sql).execute(&pool).await.unwrap();
    }
    pool
}

/// A PostgreSQL pool with the runtime's migrations applied, the test effects table and the
/// crash-point trigger.
pub async fn pg_pool() -> Pool<Postgres> {
    pg_pool_at(&database_url()).await
}

/// [`pg_pool`] on the PostgreSQL server at `url`.
pub async fn pg_pool_at(url: &str) -> Pool<Postgres> {
    init_tracing();
    let pool = consumer_runtime::connect::<Postgres>(url, 10)
        .await
        .expect("PostgreSQL must be running (see README: Running the tests)");
    consumer_runtime::migrate(&pool, SCHEMA)
        .await
        .expect("migrate");
    let mut tx = pool.begin().await.unwrap();
    // Tests set up concurrently; DDL on the shared database is serialised.
    sqlx::query("SELECT pg_advisory_xact_lock(4242)")
        .execute(&mut *tx)
        .await
        .unwrap();
    for sql in [
        EFFECTS_TABLE,
        CRASH_TABLE,
        r#"CREATE OR REPLACE FUNCTION test_fail_offset_commit() RETURNS trigger
           LANGUAGE plpgsql AS $$
           BEGIN
             IF EXISTS (SELECT 1 FROM test_crash_points c
                        WHERE c.consumer_group = NEW.consumer_group
                          AND NEW.next_offset > c.after_offset) THEN
               RAISE EXCEPTION 'test crash point: the offset commit fails';
             END IF;
             RETURN NEW;
           END $$"#,
        "CREATE OR REPLACE TRIGGER test_fail_offset_commit
         BEFORE UPDATE OF next_offset ON consumer_runtime.consumer_offsets
         FOR EACH ROW EXECUTE FUNCTION test_fail_offset_commit()",
        // Dead letters of groups named `unparkable…` cannot be written.
        r#"CREATE OR REPLACE FUNCTION test_refuse_dead_letter() RETURNS trigger
           LANGUAGE plpgsql AS $$
           BEGIN
             IF NEW.consumer_group LIKE 'unparkable%' THEN
               RAISE EXCEPTION 'test: dead letters refused';
             END IF;
             RETURN NEW;
           END $$"#,
        "CREATE OR REPLACE TRIGGER test_refuse_dead_letter
         BEFORE INSERT ON consumer_runtime.dead_letters
         FOR EACH ROW EXECUTE FUNCTION test_refuse_dead_letter()",
    ] {
        sqlx::query(sql).execute(&mut *tx).await.unwrap();
    }
    tx.commit().await.unwrap();
    pool
}

/// How often each event id's effect was applied for `group`.
pub async fn effect_counts<DB: TestDb>(pool: &Pool<DB>, group: &str) -> HashMap<String, i64> {
    DB::effect_counts(pool, group).await
}

/// Rows of the dedup ledger for `group`.
pub async fn ledger_rows<DB: TestDb>(pool: &Pool<DB>, group: &str) -> i64 {
    DB::ledger_rows(pool, group).await
}

/// The runtime's tables in the test schema of `pool`'s database.
pub fn store<DB: Backend>(pool: &Pool<DB>) -> consumer_runtime::Store<DB> {
    consumer_runtime::Store::new(pool.clone(), SCHEMA).expect("the test schema is a valid name")
}

/// Stored `next_offset` per (topic, partition) for `group`.
pub async fn stored_offsets<DB: Backend>(
    pool: &Pool<DB>,
    group: &str,
) -> HashMap<(String, i32), i64> {
    store(pool)
        .stored_offsets(group)
        .await
        .unwrap()
        .into_iter()
        .filter_map(|o| Some(((o.topic, o.partition), o.next_offset?)))
        .collect()
}

/// Waits (up to [`CAUGHT_UP`]) until the stored offsets of `group` reach the end of every
/// partition.
pub async fn wait_caught_up<DB: Backend>(
    pool: &Pool<DB>,
    group: &str,
    topic: &str,
    ends: &HashMap<i32, i64>,
) {
    wait_caught_up_within(CAUGHT_UP, pool, group, topic, ends).await;
}

/// [`wait_caught_up`] with its own deadline.
pub async fn wait_caught_up_within<DB: Backend>(
    timeout: Duration,
    pool: &Pool<DB>,
    group: &str,
    topic: &str,
    ends: &HashMap<i32, i64>,
) {
    wait_until(
        timeout,
        "stored offsets to reach the end of the topic",
        || async {
            let stored = stored_offsets(pool, group).await;
            ends.iter()
                .all(|(p, end)| stored.get(&(topic.to_owned(), *p)) == Some(end))
        },
    )
    .await;
}

/// Asserts that every expected event id was applied exactly once, and nothing else was.
pub fn assert_exactly_once(counts: &HashMap<String, i64>, expected: &[String]) {
    let mut missing = Vec::new();
    for id in expected {
        match counts.get(id) {
            Some(1) => {}
            Some(n) => panic!("event {id} was applied {n} times"),
            None => missing.push(id.clone()),
        }
    }
    assert!(
        missing.is_empty(),
        "{} events never applied, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    assert_eq!(
        counts.len(),
        expected.len(),
        "effects for unexpected event ids"
    );
}

/// Where test files go: `<target>/tmp` (what Cargo calls `CARGO_TARGET_TMPDIR`) when this is a
/// test binary in `<target>/<profile>/deps`, else the system's temporary directory.
fn tmp_dir() -> std::path::PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.parent()?.join("tmp")))
        .filter(|dir| dir.is_dir())
        .unwrap_or_else(std::env::temp_dir)
}
