//! The runtime's tables and the SQL that reads and writes them, per database.
//!
//! [`Backend`] is a sealed marker implemented for [`sqlx::Postgres`] and [`sqlx::Sqlite`]; the
//! SQL behind it is crate-private (`dialect.rs`, with each database's statements in
//! `postgres.rs` and `sqlite.rs`). [`Store`] is the handle the rest of the crate, and the admin
//! API, reach it through: a pool and the statements for one schema, prepared once.
pub(crate) mod dead_letter;
#[macro_use]
mod dialect;
pub(crate) mod outbox;
mod postgres;
mod sqlite;

use sqlx::migrate::Migrator;
use sqlx::{Pool, SqlSafeStr as _};

pub(crate) use self::dialect::{CRATE, Claim, Dialect, Parking, PartitionKey, Queries};
use crate::error::{Error, Result};

/// One row of `consumer_offsets`.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
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
    /// When the row last changed (a commit, a claim or a replay), UTC, RFC 3339.
    pub updated_at: String,
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for sqlx::Postgres {}
    impl Sealed for sqlx::Sqlite {}
}

/// Which database a URL names; the runtime picks its backend by the URL's scheme.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum DatabaseKind {
    /// `postgres://…` or `postgresql://…`.
    Postgres,
    /// `sqlite://…` or `sqlite:…` (a file; `sqlite::memory:` is refused, see
    /// [`DatabaseKind::from_url`]).
    Sqlite,
}

impl DatabaseKind {
    /// The database a URL names, by its scheme.
    ///
    /// An in-memory SQLite database is refused: its ledger and offsets would vanish with the
    /// process, so a restart would re-apply everything.
    pub fn from_url(url: &str) -> Result<DatabaseKind> {
        let scheme = url.split_once(':').map(|(s, _)| s.to_ascii_lowercase());
        match scheme.as_deref() {
            Some("postgres" | "postgresql") => Ok(DatabaseKind::Postgres),
            Some("sqlite") if url.contains(":memory:") || url.contains("mode=memory") => {
                Err(Error::Config(format!(
                    "the database URL `{url}` is an in-memory SQLite database, which forgets the \
                     ledger and offsets when the process exits; use a file, e.g. sqlite://app.db"
                )))
            }
            Some("sqlite") => Ok(DatabaseKind::Sqlite),
            _ => Err(Error::Config(format!(
                "the database URL `{}` names no supported database; use postgres://user@host/db \
                 (PostgreSQL) or sqlite://path/to/file.db (SQLite)",
                crate::error::redact_url(url)
            ))),
        }
    }
}

impl std::fmt::Display for DatabaseKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DatabaseKind::Postgres => "PostgreSQL",
            DatabaseKind::Sqlite => "SQLite",
        })
    }
}
/// A database the runtime can keep its ledger and offsets in: [`sqlx::Postgres`] or
/// [`sqlx::Sqlite`]. It is sealed: a marker naming the database in `Handler<DB>`,
/// `Runtime<H, DB>` and [`Store<DB>`]; the SQL behind it is the crate's own.
pub trait Backend: sqlx::Database + sealed::Sealed + Dialect + outbox::OutboxSql {
    /// Which database this is.
    const KIND: DatabaseKind;
}

/// The runtime's tables in one schema: a pool and the runtime's statements for that schema,
/// prepared once. Cheap to clone.
///
/// It is the admin face of the runtime's state: migrations, stored offsets, the ledger's size,
/// dead letters ([`Store::dead_letters`]) and replays ([`Store::replay`]).
///
/// ```no_run
/// use consumer_runtime::{Store, sqlx::Postgres};
///
/// # async fn run() -> Result<(), consumer_runtime::Error> {
/// let pool = consumer_runtime::connect::<Postgres>("postgres://app@db/app", 4).await?;
/// let store = Store::new(pool, "consumer_runtime")?;
/// store.migrate().await?;
/// for row in store.stored_offsets("balances").await? {
///     println!("{}/{}: {:?}", row.topic, row.partition, row.next_offset);
/// }
/// # Ok(())
/// # }
/// ```
pub struct Store<DB: Backend> {
    pool: Pool<DB>,
    queries: std::sync::Arc<Queries>,
}

impl<DB: Backend> Clone for Store<DB> {
    fn clone(&self) -> Self {
        Store {
            pool: self.pool.clone(),
            queries: self.queries.clone(),
        }
    }
}

impl<DB: Backend> std::fmt::Debug for Store<DB> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("database", &DB::KIND)
            .field("schema", &self.queries.schema)
            .finish_non_exhaustive()
    }
}

impl<DB: Backend> Store<DB> {
    /// The runtime's tables in `schema` (PostgreSQL: a schema; SQLite: a table-name prefix)
    /// of `pool`'s database. Refuses a schema that is not a plain identifier.
    pub fn new(pool: Pool<DB>, schema: &str) -> Result<Self> {
        Ok(Store {
            queries: std::sync::Arc::new(Queries::new::<DB>(schema)?),
            pool,
        })
    }

    /// The pool.
    pub fn pool(&self) -> &Pool<DB> {
        &self.pool
    }

    /// The schema (PostgreSQL) or table prefix (SQLite).
    pub fn schema(&self) -> &str {
        &self.queries.schema
    }

    /// The statements, for the crate's own SQL calls.
    pub(crate) fn queries(&self) -> &Queries {
        &self.queries
    }

    /// Applies the runtime's migrations (see [`migrate`]); returns the newest version.
    pub async fn migrate(&self) -> Result<i64> {
        DB::run_migrations(&self.pool, &self.queries).await?;
        Ok(required_version::<DB>())
    }

    /// Checks that the runtime's tables exist and are at the version this runtime needs
    /// ([`Error::SchemaBehind`] otherwise: run the migrations).
    pub async fn check_schema(&self) -> Result<()> {
        check_schema(&self.pool, &self.queries).await
    }

    /// The stored offsets of a consumer group, by topic and partition.
    pub async fn stored_offsets(&self, group: &str) -> Result<Vec<StoredOffset>> {
        DB::offsets(&self.pool, &self.queries, group).await
    }

    /// How many rows of the dedup ledger belong to `group`.
    pub async fn ledger_rows(&self, group: &str) -> Result<i64> {
        DB::ledger_size(&self.pool, &self.queries, group)
            .await
            .map_err(Error::db("counting ledger rows"))
    }

    /// Moves a group's stored offsets for `topic` to `positions` (partition, next offset), in
    /// one transaction, bumping each partition's epoch and clearing its owner: a consumer
    /// that is running is fenced, reloads the new position and continues from it without a
    /// restart. Records before the new position that were already processed are skipped by the
    /// ledger, so moving offsets backwards re-applies nothing.
    pub async fn set_offsets(
        &self,
        group: &str,
        topic: &str,
        positions: &[(i32, i64)],
    ) -> Result<()> {
        set_offsets_with(&self.pool, &self.queries, group, topic, positions)
            .await
            .map(drop)
    }
}

/// Opens a connection pool for `url` (`postgres://…` for [`sqlx::Postgres`], `sqlite://…` for
/// [`sqlx::Sqlite`]; a SQLite file is created if missing) with at most `max_connections`
/// connections, and checks that it connects (SQLite: WAL mode, `synchronous = NORMAL`, a 30 s
/// busy timeout). A pool built by hand works as well: the settings the runtime's guarantees
/// rely on (PostgreSQL's idle-in-transaction timeout, SQLite's busy timeout) are applied to the
/// runtime's own transactions whatever the pool, and [`migrate`] switches a SQLite file to WAL.
pub async fn connect<DB: Backend>(url: &str, max_connections: u32) -> Result<Pool<DB>> {
    let kind = DatabaseKind::from_url(url)?;
    if kind != DB::KIND {
        return Err(Error::Config(format!(
            "the database URL `{}` is {kind}, but this consumer is built for {}; pass a {} URL",
            crate::error::redact_url(url),
            DB::KIND,
            DB::KIND
        )));
    }
    DB::open_pool(url, max_connections, CRATE)
        .await
        .map_err(|source| Error::DatabaseUnreachable {
            url: crate::error::redact_url(url),
            source,
        })
}

/// Why `pool` cannot hand out a connection, when it times out: a pool says only "timed out",
/// one direct connection attempt with its options says "connection refused" or "the database
/// system is starting up". `None` if that attempt succeeds or takes over 5 s.
pub(crate) async fn connect_error<DB: sqlx::Database>(pool: &Pool<DB>) -> Option<sqlx::Error> {
    use sqlx::{ConnectOptions as _, Connection as _};
    let options = pool.connect_options();
    match tokio::time::timeout(std::time::Duration::from_secs(5), options.connect()).await {
        Ok(Ok(conn)) => {
            let _ = conn.close().await;
            None
        }
        Ok(Err(e)) => Some(e),
        Err(_) => None,
    }
}

/// Moves a group's stored offsets for `topic` to `positions` (partition, next offset) in one
/// transaction, bumping each partition's epoch and clearing its owner: a consumer that is
/// running is fenced, reloads the new position and continues from it without a restart.
/// Records before the new position that were already processed are skipped by the ledger, so
/// moving offsets backwards re-applies nothing. Returns the new claims, in the given order.
async fn set_offsets_with<DB: Backend>(
    pool: &Pool<DB>,
    q: &Queries,
    group: &str,
    topic: &str,
    positions: &[(i32, i64)],
) -> Result<Vec<Claim>> {
    let context = "moving stored offsets";
    let mut tx = DB::begin(pool, CRATE).await.map_err(Error::db(context))?;
    let mut claims = Vec::with_capacity(positions.len());
    for &(partition, next_offset) in positions {
        if next_offset < 0 {
            return Err(Error::Config(format!(
                "offset {next_offset} for {topic}/{partition} is negative; offsets start at 0"
            )));
        }
        let key = PartitionKey {
            group: group.to_owned(),
            topic: topic.to_owned(),
            partition,
        };
        let claim = DB::set_offset(&mut tx, q, &key, next_offset)
            .await
            .map_err(Error::db(context))?;
        claims.push(claim);
    }
    tx.commit().await.map_err(Error::db(context))?;
    Ok(claims)
}

/// The newest migration version this runtime ships for `DB`.
pub(crate) fn required_version<DB: Backend>() -> i64 {
    Queries::new::<DB>("consumer_runtime")
        .ok()
        .and_then(|q| DB::migrator(&q).iter().map(|m| m.version).max())
        .unwrap_or(0)
}

/// Applies the runtime's migrations to `schema` (creating it if needed). Safe to run
/// concurrently and repeatedly; it never touches the application's own tables or migrations.
pub async fn migrate<DB: Backend>(pool: &Pool<DB>, schema: &str) -> Result<i64> {
    DB::run_migrations(pool, &Queries::new::<DB>(schema)?).await?;
    Ok(required_version::<DB>())
}

/// Checks that the runtime's tables exist and are at the version this runtime needs.
pub(crate) async fn check_schema<DB: Backend>(pool: &Pool<DB>, q: &Queries) -> Result<()> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_url_scheme_picks_the_database() {
        for (url, kind) in [
            ("postgres://u@h/db", DatabaseKind::Postgres),
            ("postgresql://u:p@h:5432/db", DatabaseKind::Postgres),
            ("sqlite://app.db", DatabaseKind::Sqlite),
            ("sqlite:///var/lib/app.db", DatabaseKind::Sqlite),
            ("SQLITE:app.db", DatabaseKind::Sqlite),
        ] {
            assert_eq!(DatabaseKind::from_url(url).unwrap(), kind, "{url}");
        }
    }

    #[test]
    fn unsupported_and_in_memory_urls_are_refused_with_the_fix() {
        let err = DatabaseKind::from_url("mysql://u:secret@h/db").unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("postgres://") && text.contains("sqlite://"),
            "{text}"
        );
        assert!(!text.contains("secret"), "{text}");
        let err = DatabaseKind::from_url("sqlite::memory:").unwrap_err();
        assert!(err.to_string().contains("use a file"), "{err}");
    }

    #[tokio::test]
    async fn a_url_for_the_other_database_is_refused_before_connecting() {
        let err = connect::<sqlx::Postgres>("sqlite://app.db", 1)
            .await
            .unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, Error::Config(_)), "{text}");
        assert!(
            text.contains("is SQLite") && text.contains("built for PostgreSQL"),
            "{text}"
        );
    }
}
