//! What the crate's own tests share (compiled for tests only): a real database per test
//! (PostgreSQL at `$DATABASE_URL`, else `postgres://postgres@127.0.0.1:5432/test`, or a fresh
//! SQLite file under `target/tmp`) with the runtime's migrations and a non-idempotent effect
//! table, a counting handler with knobs to fail, and [`suite!`] to run a generic test on both
//! databases.
//!
//! The integration tests have the same in the testkit crate; they cannot be used here, because
//! the testkit is built against its own copy of this crate, whose types are not this crate's.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use sqlx::{Pool, Postgres, Row as _, Sqlite};

use crate::handler::{Context, Handler, HandlerError, Json};
use crate::store::{Backend, Queries, Store};

/// The runtime's schema in the tests.
pub(crate) const SCHEMA: &str = "consumer_runtime";

/// The runtime's SQL for [`SCHEMA`].
pub(crate) fn queries<DB: Backend>() -> Queries {
    Queries::new::<DB>(SCHEMA).expect("the test schema is a valid name")
}

/// The runtime's tables in the test schema of `pool`'s database.
pub(crate) fn store<DB: Backend>(pool: &Pool<DB>) -> Store<DB> {
    Store::new(pool.clone(), SCHEMA).expect("the test schema is a valid name")
}

/// A random lowercase name with a prefix, unique per test run.
pub(crate) fn rand_name(prefix: &str) -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos(),
    );
    format!("{prefix}_{:012x}", h.finish() & 0xffff_ffff_ffff)
}

const EFFECT_SQL: &str =
    "INSERT INTO test_effects (consumer_group, event_id, count) VALUES ($1, $2, 1)
     ON CONFLICT (consumer_group, event_id) DO UPDATE SET count = test_effects.count + 1";
const EFFECTS_TABLE: &str = "CREATE TABLE IF NOT EXISTS test_effects (
     consumer_group TEXT NOT NULL,
     event_id TEXT NOT NULL,
     count INTEGER NOT NULL,
     PRIMARY KEY (consumer_group, event_id))";

/// A database the crate's tests run against.
#[async_trait::async_trait]
pub(crate) trait TestDb: Backend {
    /// A ready pool: the runtime's migrations applied and the `test_effects` table created
    /// (PostgreSQL: the shared test database; SQLite: a fresh file).
    async fn pool() -> Pool<Self>;

    /// The non-idempotent test effect: `count = count + 1` for (group, event id).
    async fn apply_effect(
        conn: &mut Self::Connection,
        group: &str,
        event_id: &str,
    ) -> Result<(), sqlx::Error>;

    /// How often each event id's effect was applied for `group`.
    async fn effect_counts(pool: &Pool<Self>, group: &str) -> HashMap<String, i64>;
}

macro_rules! impl_test_db {
    ($db:ty, $pool:ident) => {
        #[async_trait::async_trait]
        impl TestDb for $db {
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
                    .map(|r| (r.get::<String, _>(0), i64::from(r.get::<i32, _>(1))))
                    .collect()
            }
        }
    };
}

impl_test_db!(Postgres, pg_pool);
impl_test_db!(Sqlite, sqlite_pool);

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

/// The shared test PostgreSQL, migrated, with the effect table.
async fn pg_pool() -> Pool<Postgres> {
    init_tracing();
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    let pool = crate::connect::<Postgres>(&url, 10)
        .await
        .expect("PostgreSQL must be running (see README: Running the tests)");
    crate::migrate(&pool, SCHEMA).await.expect("migrate");
    let mut tx = pool.begin().await.unwrap();
    // Tests (and other test binaries) set up concurrently; DDL on the shared database is
    // serialised (under the testkit's lock key as well).
    sqlx::query("SELECT pg_advisory_xact_lock(4242)")
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query(EFFECTS_TABLE).execute(&mut *tx).await.unwrap();
    tx.commit().await.unwrap();
    pool
}

/// A fresh SQLite file under `<target>/tmp`, migrated, with the effect table.
async fn sqlite_pool() -> Pool<Sqlite> {
    init_tracing();
    // The test binary is `<target>/<profile>/deps/…`.
    let dir = std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.parent()?.join("tmp")))
        .unwrap_or_else(std::env::temp_dir)
        .join("sqlite");
    std::fs::create_dir_all(&dir).unwrap();
    let url = format!("sqlite://{}", dir.join(rand_name("unit") + ".db").display());
    let pool = crate::connect::<Sqlite>(&url, 8)
        .await
        .expect("open the SQLite file");
    crate::migrate(&pool, SCHEMA).await.expect("migrate");
    sqlx::query(EFFECTS_TABLE).execute(&pool).await.unwrap();
    pool
}

/// How often each event id's effect was applied for `group`.
pub(crate) async fn effect_counts<DB: TestDb>(
    pool: &Pool<DB>,
    group: &str,
) -> HashMap<String, i64> {
    DB::effect_counts(pool, group).await
}

/// Rows of the dedup ledger for `group`.
pub(crate) async fn ledger_rows<DB: TestDb>(pool: &Pool<DB>, group: &str) -> i64 {
    store(pool).ledger_rows(group).await.unwrap()
}

/// Stored `next_offset` per (topic, partition) for `group`.
pub(crate) async fn stored_offsets<DB: Backend>(
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

/// Asserts that every expected event id was applied exactly once, and nothing else was.
pub(crate) fn assert_exactly_once(counts: &HashMap<String, i64>, expected: &[String]) {
    for id in expected {
        match counts.get(id) {
            Some(1) => {}
            Some(n) => panic!("event {id} was applied {n} times"),
            None => panic!("event {id} was never applied"),
        }
    }
    assert_eq!(
        counts.len(),
        expected.len(),
        "effects for unexpected event ids: {counts:?}"
    );
}

/// The test handler: applies the non-idempotent effect ([`TestDb::apply_effect`]) for its
/// group, then fails, rejects or panics on the event ids it is told to.
#[derive(Clone)]
pub(crate) struct Counter {
    /// The consumer group whose effects it writes.
    pub(crate) group: String,
    /// Handler calls that returned `Ok`.
    pub(crate) applied: Arc<AtomicU64>,
    /// Handler calls, whatever their outcome.
    pub(crate) calls: Arc<AtomicU64>,
    /// The event id whose handler returns an error after writing its effect: `true` rejects
    /// (permanent), `false` asks for a retry (transient).
    pub(crate) fail_on: Option<(String, bool)>,
    /// The event id whose handler panics after writing its effect.
    pub(crate) panic_on: Option<String>,
}

impl Counter {
    /// A handler for `group` with no failures.
    pub(crate) fn new(group: &str) -> Counter {
        Counter {
            group: group.to_owned(),
            applied: Arc::new(AtomicU64::new(0)),
            calls: Arc::new(AtomicU64::new(0)),
            fail_on: None,
            panic_on: None,
        }
    }

    /// Handler calls so far that returned `Ok`.
    pub(crate) fn applied(&self) -> u64 {
        self.applied.load(Ordering::SeqCst)
    }

    /// Handler calls so far.
    pub(crate) fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }
}

impl<DB: TestDb> Handler<DB> for Counter {
    type Event = Json<serde_json::Value>;

    async fn handle(
        &self,
        ctx: &mut Context<'_, DB>,
        _event: Json<serde_json::Value>,
    ) -> Result<(), HandlerError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let id = ctx.record().event_id();
        DB::apply_effect(ctx.conn(), &self.group, id).await?;
        if let Some((fail, reject)) = &self.fail_on
            && fail == id
        {
            return Err(if *reject {
                HandlerError::reject(format!("test rejects {id}"))
            } else {
                HandlerError::retry(format!("test fails {id}"))
            });
        }
        if self.panic_on.as_deref() == Some(id) {
            panic!("test panics on {id}");
        }
        self.applied.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// Instantiates each generic test `name::<DB>()` once per database, as `postgres::name` and
/// `sqlite::name`.
macro_rules! suite {
    ($($name:ident),* $(,)?) => {
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name::<sqlx::Postgres>().await;
                }
            )*
        }
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name::<sqlx::Sqlite>().await;
                }
            )*
        }
    };
}
pub(crate) use suite;
