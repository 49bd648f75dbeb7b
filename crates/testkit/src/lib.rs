//! What consumer-runtime's test suites, `bench` and `chaos` share.
//!
//! - [`Kafka`]: a librdkafka mock cluster in a child process ([`mock_broker`]), with the
//!   faults tests inject (broker down and up, request errors), so that the mock cluster's
//!   occasional abort fails the one test using it instead of the whole test binary. A test
//!   binary that starts one invokes [`mock_broker_entry!`] at its root. With `KAFKA_BROKERS`
//!   set ([`BROKERS_ENV`]) it is that external broker instead: topics are created and deleted
//!   through the admin API, and a test whose faults only the mock can inject returns early
//!   saying so ([`mock_only`]).
//! - [`produced`], [`events_with_duplicates`]: a test's topic, group and events.
//! - [`TestDb`]: a real database per test (PostgreSQL or a fresh SQLite file) with the
//!   non-idempotent `test_effects` table, and [`suite!`] to run a generic test on both.
//! - [`Counter`]: the test handler. [`Consumer`]: the runtime with it, spawned, caught up,
//!   stopped or crashed.
//! - [`private_pg`]: a PostgreSQL server of a test's own, to stop and restart.
//! - [`wait_until`]: polling with a deadline.

pub mod mock_broker;
pub mod private_pg;

mod consumer;
mod counter;
mod db;
mod kafka;

use std::time::{Duration, Instant};

pub use consumer::{Consumer, test_runtime};
pub use counter::Counter;
pub use db::{
    TestDb, assert_exactly_once, effect_counts, ledger_rows, pg_pool, pg_pool_at, sqlite_pool,
    store, stored_offsets, wait_caught_up, wait_caught_up_within,
};
pub use kafka::{
    BROKERS_ENV, Kafka, ONE_RECORD_PER_BATCH_ENV, Record, ends_of, events_with_duplicates,
    external_brokers, mock_only, produced,
};

/// The runtime's schema in the tests.
pub const SCHEMA: &str = "consumer_runtime";

/// How long a test waits for a consumer to catch up, unless it says otherwise.
pub const CAUGHT_UP: Duration = Duration::from_secs(60);

/// The test PostgreSQL: `$DATABASE_URL`, else `postgres://postgres@127.0.0.1:5432/test`.
pub fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// Logs to the test's output (`RUST_LOG`, else warnings and librdkafka's errors); once per
/// process, later calls do nothing.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,librdkafka=error".into()),
        )
        .with_test_writer()
        .try_init();
}

/// A random lowercase name with a prefix, unique per test run.
pub fn rand_name(prefix: &str) -> String {
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

/// Polls `cond` until it holds or `timeout` passes; panics with `what` on timeout.
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if cond().await {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The mock broker's entry point in a test binary: invoke it once at the root of every test
/// file that starts a [`Kafka`].
///
/// [`Kafka::new`] starts the test binary again as the mock broker's child process. A test
/// binary's `main` is libtest's, so the child runs one test: the ignored
/// `testkit_mock_broker_child` this macro defines, which serves the mock cluster when the
/// environment says it is the child ([`mock_broker::CHILD_ENV`]) and does nothing otherwise.
#[macro_export]
macro_rules! mock_broker_entry {
    () => {
        #[test]
        #[ignore = "the mock broker's child process (Kafka::new starts it), not a test"]
        fn testkit_mock_broker_child() {
            $crate::mock_broker::serve_in_test();
        }
    };
}

/// Instantiates each generic behaviour test `name::<DB>()` once per backend, as
/// `postgres::name` and `sqlite::name`: one suite, run against both databases.
#[macro_export]
macro_rules! suite {
    ($($name:ident),* $(,)?) => {
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name::<consumer_runtime::sqlx::Postgres>().await;
                }
            )*
        }
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name::<consumer_runtime::sqlx::Sqlite>().await;
                }
            )*
        }
    };
}
