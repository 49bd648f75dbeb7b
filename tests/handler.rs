//! Unit tests of a handler against a real database, written the way a user writes them: only
//! the public API (`consumer_runtime::testing`), no Kafka, no runtime, no test-support module.
//! Each behaviour runs on PostgreSQL (`DATABASE_URL`, default
//! `postgres://postgres@127.0.0.1:5432/test`) and on a fresh SQLite file.

use std::str::FromStr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use consumer_runtime::sqlx::{self, Pool, Postgres, Sqlite};
use consumer_runtime::testing::{self, TestRecord};
use consumer_runtime::{Backend, Context, Handler, HandlerError, Json};

fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{prefix}-{nanos:x}-{:x}", std::process::id())
}

fn sqlite_url() -> String {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("sqlite");
    std::fs::create_dir_all(&dir).unwrap();
    format!("sqlite://{}", dir.join(unique("handler") + ".db").display())
}

const ORDERS_TABLE: &str = "CREATE TABLE IF NOT EXISTS handler_test_orders (
     id TEXT PRIMARY KEY,
     cents BIGINT NOT NULL,
     event_id TEXT NOT NULL,
     attempt BIGINT NOT NULL)";

/// A database to run the same handler tests on, with the application's table created.
trait TestDatabase: Backend {
    async fn pool() -> Pool<Self>;

    /// The order `id` as (cents, event id, attempt), if it was committed.
    async fn order_row(pool: &Pool<Self>, id: &str) -> Option<(i64, String, i64)>;
}

macro_rules! order_row {
    () => {
        async fn order_row(pool: &Pool<Self>, id: &str) -> Option<(i64, String, i64)> {
            sqlx::query_as("SELECT cents, event_id, attempt FROM handler_test_orders WHERE id = $1")
                .bind(id)
                .fetch_optional(pool)
                .await
                .unwrap()
        }
    };
}

impl TestDatabase for Postgres {
    async fn pool() -> Pool<Postgres> {
        let pool = consumer_runtime::connect::<Postgres>(&database_url(), 4)
            .await
            .expect("PostgreSQL must be running (see README: Running the tests)");
        let mut tx = pool.begin().await.unwrap();
        // Tests set up concurrently; DDL on the shared database is serialised.
        sqlx::query("SELECT pg_advisory_xact_lock(4243)")
            .execute(&mut *tx)
            .await
            .unwrap();
        sqlx::query(ORDERS_TABLE).execute(&mut *tx).await.unwrap();
        tx.commit().await.unwrap();
        pool
    }

    order_row!();
}

impl TestDatabase for Sqlite {
    async fn pool() -> Pool<Sqlite> {
        let pool = consumer_runtime::connect::<Sqlite>(&sqlite_url(), 4)
            .await
            .unwrap();
        sqlx::query(ORDERS_TABLE).execute(&pool).await.unwrap();
        pool
    }

    order_row!();
}

#[derive(serde::Deserialize)]
struct OrderPlaced {
    order: String,
    cents: i64,
}

/// Records an order; rejects a free one; writes and then asks for a retry for a negative one.
struct Orders;

/// A handler that writes its order and then sleeps far past its one-second time limit.
struct Slow;

macro_rules! handlers_for {
    ($db:ty) => {
        impl Handler<$db> for Orders {
            type Event = Json<OrderPlaced>;

            async fn handle(
                &self,
                ctx: &mut Context<'_, $db>,
                Json(o): Json<OrderPlaced>,
            ) -> Result<(), HandlerError> {
                if o.cents == 0 {
                    return Err(HandlerError::reject("an order must cost something"));
                }
                let event_id = ctx.record().event_id();
                let attempt = i64::from(ctx.attempt());
                sqlx::query(
                    "INSERT INTO handler_test_orders (id, cents, event_id, attempt) VALUES ($1, $2, $3, $4)",
                )
                .bind(&o.order)
                .bind(o.cents)
                .bind(event_id)
                .bind(attempt)
                .execute(ctx.conn())
                .await?;
                if o.cents < 0 {
                    return Err(HandlerError::retry("the refund service is down"));
                }
                Ok(())
            }
        }

        impl Handler<$db> for Slow {
            type Event = Json<OrderPlaced>;

            async fn handle(
                &self,
                ctx: &mut Context<'_, $db>,
                Json(o): Json<OrderPlaced>,
            ) -> Result<(), HandlerError> {
                sqlx::query(
                    "INSERT INTO handler_test_orders (id, cents, event_id, attempt) VALUES ($1, $2, 'slow', 1)",
                )
                .bind(&o.order)
                .bind(o.cents)
                .execute(ctx.conn())
                .await?;
                tokio::time::sleep(Duration::from_secs(30)).await;
                Ok(())
            }

            fn timeout(&self) -> Duration {
                Duration::from_secs(1)
            }
        }
    };
}

handlers_for!(Postgres);
handlers_for!(Sqlite);

fn placed(order: &str, cents: i64) -> TestRecord {
    TestRecord::json(&serde_json::json!({ "order": order, "cents": cents }))
}

/// `testing::handle` commits what the handler wrote when it returns `Ok` (with the event id
/// and attempt 1 in its context), and rolls back on a `Retry`; an integrity violation (the
/// same order twice) comes back as `Reject`, as does a payload that does not decode.
async fn a_handler_commits_on_ok_rolls_back_on_err_and_rejects_integrity_violations<
    DB: TestDatabase,
>()
where
    Orders: Handler<DB>,
{
    let pool = DB::pool().await;
    let order = unique("o");
    testing::handle(&Orders, &pool, placed(&order, 1250).event_id("e-1"))
        .await
        .expect("the first order is applied");
    assert_eq!(
        DB::order_row(&pool, &order).await,
        Some((1250, "e-1".to_owned(), 1))
    );

    let again = testing::handle(&Orders, &pool, placed(&order, 990).event_id("e-2")).await;
    assert!(
        matches!(again, Err(HandlerError::Reject { .. })),
        "a unique violation is permanent: {again:?}"
    );
    assert_eq!(
        DB::order_row(&pool, &order).await,
        Some((1250, "e-1".to_owned(), 1)),
        "the rejected record changed nothing"
    );

    let refund = unique("o");
    let retried = testing::handle(&Orders, &pool, placed(&refund, -500)).await;
    assert!(
        matches!(retried, Err(HandlerError::Retry { .. })),
        "{retried:?}"
    );
    assert_eq!(
        DB::order_row(&pool, &refund).await,
        None,
        "a Retry rolls back what the handler wrote"
    );

    let free = testing::handle(&Orders, &pool, placed(&unique("o"), 0)).await;
    assert!(matches!(free, Err(HandlerError::Reject { .. })), "{free:?}");
    let garbage = testing::handle(&Orders, &pool, TestRecord::new("not json")).await;
    assert!(
        matches!(garbage, Err(HandlerError::Reject { .. })),
        "{garbage:?}"
    );

    // Without an explicit id, the `event-id` header is the event id, as in the runtime.
    let headed = unique("o");
    testing::handle(
        &Orders,
        &pool,
        placed(&headed, 1).header("event-id", "from-header"),
    )
    .await
    .unwrap();
    assert_eq!(
        DB::order_row(&pool, &headed).await,
        Some((1, "from-header".to_owned(), 1))
    );
}

/// A handler still running after its `timeout()` is cancelled; that is a retryable failure,
/// and what it wrote is rolled back.
async fn a_handler_past_its_timeout_is_cancelled_and_retryable<DB: TestDatabase>()
where
    Slow: Handler<DB>,
{
    let pool = DB::pool().await;
    let order = unique("o");
    let started = Instant::now();
    let result = testing::handle(&Slow, &pool, placed(&order, 100)).await;
    let took = started.elapsed();
    match result {
        Err(e @ HandlerError::Retry { .. }) => {
            assert!(e.to_string().contains("Handler::timeout"), "{e}")
        }
        other => panic!("a timed-out handler is retryable, got {other:?}"),
    }
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(10),
        "cancelled at its 1 s limit, not after its 30 s sleep: {took:?}"
    );
    assert_eq!(DB::order_row(&pool, &order).await, None);
}

// ---- The settings the guarantees rely on, on any pool ----------------------------------------

/// Reads one setting inside the handler's transaction.
struct Show {
    seen: Mutex<Option<String>>,
}

impl Show {
    fn new() -> Show {
        Show {
            seen: Mutex::new(None),
        }
    }
    fn seen(&self) -> String {
        self.seen.lock().unwrap().clone().expect("the handler ran")
    }
}

impl Handler<Postgres> for Show {
    type Event = consumer_runtime::Raw;

    async fn handle(
        &self,
        ctx: &mut Context<'_, Postgres>,
        _: consumer_runtime::Raw,
    ) -> Result<(), HandlerError> {
        let value: String = sqlx::query_scalar("SHOW idle_in_transaction_session_timeout")
            .fetch_one(ctx.conn())
            .await?;
        *self.seen.lock().unwrap() = Some(value);
        Ok(())
    }
}

impl Handler<Sqlite> for Show {
    type Event = consumer_runtime::Raw;

    async fn handle(
        &self,
        ctx: &mut Context<'_, Sqlite>,
        _: consumer_runtime::Raw,
    ) -> Result<(), HandlerError> {
        let value: i64 = sqlx::query_scalar("PRAGMA busy_timeout")
            .fetch_one(ctx.conn())
            .await?;
        *self.seen.lock().unwrap() = Some(value.to_string());
        Ok(())
    }
}

async fn idle_timeout_in_handler(pool: &Pool<Postgres>) -> String {
    let show = Show::new();
    testing::handle(&show, pool, TestRecord::new(""))
        .await
        .unwrap();
    show.seen()
}

/// `url` with `options=-c idle_in_transaction_session_timeout=<value>`.
fn with_idle_timeout(url: &str, value: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}options=-c%20idle_in_transaction_session_timeout%3D{value}")
}

/// The handler's transaction ends if left idle for a minute, on a pool from `connect` and on
/// one built by hand alike, unless somebody chose a value (the URL, a pool's own
/// `after_connect`), and then that choice stands, even "off". A pool from `connect` has the
/// setting on its sessions from the start (so its transactions begin with a plain BEGIN); on a
/// pool built by hand the runtime sets it in its own transactions only.
#[tokio::test]
async fn postgres_handler_transactions_bound_idle_time_on_any_pool_unless_told_otherwise() {
    use sqlx::postgres::PgPoolOptions;
    let url = database_url();
    let from_connect = consumer_runtime::connect::<Postgres>(&url, 1)
        .await
        .unwrap();
    assert_eq!(idle_timeout_in_handler(&from_connect).await, "1min");
    let session: String = sqlx::query_scalar("SHOW idle_in_transaction_session_timeout")
        .fetch_one(&from_connect)
        .await
        .unwrap();
    assert_eq!(session, "1min", "set once when the session connected");
    let by_hand = PgPoolOptions::new()
        .max_connections(1)
        .connect(&url)
        .await
        .unwrap();
    assert_eq!(idle_timeout_in_handler(&by_hand).await, "1min");
    // The same session again (the choice is remembered per session), and outside the
    // runtime's transactions the session is as it was.
    assert_eq!(idle_timeout_in_handler(&by_hand).await, "1min");
    let outside: String = sqlx::query_scalar("SHOW idle_in_transaction_session_timeout")
        .fetch_one(&by_hand)
        .await
        .unwrap();
    assert_eq!(outside, "0");

    let off = PgPoolOptions::new()
        .max_connections(1)
        .connect(&with_idle_timeout(&url, "0"))
        .await
        .unwrap();
    assert_eq!(idle_timeout_in_handler(&off).await, "0");
    let short = consumer_runtime::connect::<Postgres>(&with_idle_timeout(&url, "1500"), 1)
        .await
        .unwrap();
    assert_eq!(idle_timeout_in_handler(&short).await, "1500ms");
    let chosen = PgPoolOptions::new()
        .max_connections(1)
        .after_connect(|conn, _| {
            Box::pin(async move {
                sqlx::query("SET idle_in_transaction_session_timeout = '5min'")
                    .execute(conn)
                    .await
                    .map(drop)
            })
        })
        .connect(&url)
        .await
        .unwrap();
    assert_eq!(idle_timeout_in_handler(&chosen).await, "5min");
}

/// On a SQLite pool built by hand (sqlx's default busy timeout is 5 s), the handler's
/// transaction waits up to 30 s for the write lock, and `migrate` puts the file in WAL mode.
#[tokio::test]
async fn sqlite_handler_transactions_wait_for_the_lock_and_the_file_is_wal_on_any_pool() {
    use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};
    let options = SqliteConnectOptions::from_str(&sqlite_url())
        .unwrap()
        .create_if_missing(true);
    let pool = SqlitePoolOptions::new()
        .max_connections(2)
        .connect_with(options)
        .await
        .unwrap();
    let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(
        mode, "delete",
        "a fresh file starts in rollback-journal mode"
    );
    let show = Show::new();
    testing::handle(&show, &pool, TestRecord::new(""))
        .await
        .unwrap();
    assert_eq!(show.seen(), "30000");

    consumer_runtime::migrate(&pool, "consumer_runtime")
        .await
        .unwrap();
    let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(mode, "wal");
}

macro_rules! suite {
    ($($name:ident),* $(,)?) => {
        mod postgres {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name::<consumer_runtime::sqlx::Postgres>().await;
                }
            )*
        }
        mod sqlite {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name::<consumer_runtime::sqlx::Sqlite>().await;
                }
            )*
        }
    };
}

suite!(
    a_handler_commits_on_ok_rolls_back_on_err_and_rejects_integrity_violations,
    a_handler_past_its_timeout_is_cancelled_and_retryable,
);
