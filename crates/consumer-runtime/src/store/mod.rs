//! The runtime's tables and the SQL that reads and writes them, per database.
//!
//! [`Backend`] is implemented for [`sqlx::Postgres`] and [`sqlx::Sqlite`]; it is sealed. Its
//! methods are the building blocks of the unit of work in [`crate::unit`]; they are public for
//! tests and tools, and hidden from the documentation.

mod postgres;
mod sqlite;

use async_trait::async_trait;
use sqlx::Pool;
use sqlx::migrate::Migrator;

use crate::error::{Error, Result};

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
        }
    }
}

use sqlx::SqlSafeStr as _;

struct Templates {
    claim: &'static str,
    reclaim: &'static str,
    advance: &'static str,
    claim_events: &'static str,
    set_offset: &'static str,
    offsets: &'static str,
    applied_version: &'static str,
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for sqlx::Postgres {}
    impl Sealed for sqlx::Sqlite {}
}

/// A database the runtime can keep its ledger and offsets in: PostgreSQL or SQLite.
#[async_trait]
pub trait Backend: sqlx::Database + sealed::Sealed {
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

    /// The stored offsets of a group.
    #[doc(hidden)]
    async fn offsets(pool: &Pool<Self>, q: &Queries, group: &str) -> Result<Vec<StoredOffset>>;
}

/// Opens a connection pool for `url` (`postgres://…` for [`sqlx::Postgres`], `sqlite://…` for
/// [`sqlx::Sqlite`]) with at most `max_connections` connections, and checks that it connects.
pub async fn connect<DB: Backend>(url: &str, max_connections: u32) -> Result<Pool<DB>> {
    DB::open_pool(url, max_connections)
        .await
        .map_err(|source| Error::DatabaseUnreachable {
            url: crate::error::redact_url(url),
            source,
        })
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
