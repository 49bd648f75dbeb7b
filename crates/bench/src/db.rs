//! The benchmark's own SQL per database: the handler's table, the ledger pre-fill, clean-up.

use consumer_runtime::sqlx::{
    self, AssertSqlSafe, Pool, Postgres, SqlSafeStr as _, SqlStr, Sqlite,
};
use consumer_runtime::{Backend, Batch, BatchHandler, Context, Handler, HandlerError, Json};

/// The handler: one `INSERT` per event into the benchmark's table, through the runtime's
/// transaction, with a few fields of the JSON payload ([`Order`]).
pub(crate) struct Sink {
    group: String,
    insert: SqlStr,
}

impl Sink {
    pub(crate) fn new<DB: BenchDb>(schema: &str, group: &str) -> Sink {
        let table = DB::events_table(schema);
        Sink {
            group: group.to_owned(),
            insert: AssertSqlSafe(format!(
                r#"INSERT INTO {table} (consumer_group, event_id, partition, "offset", order_id, amount_cents, items, payload_bytes)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"#
            ))
            .into_sql_str(),
        }
    }
}

/// The batch handler: the same rows as [`Sink`], written with one `INSERT` per batch
/// (PostgreSQL: `unnest` of one array per column; SQLite: `json_each` of one JSON array of rows).
/// A record without an `order_id` is rejected by its index.
pub(crate) struct BatchSink {
    group: String,
    insert: SqlStr,
}

impl BatchSink {
    pub(crate) fn new<DB: BenchDb>(schema: &str, group: &str) -> BatchSink {
        BatchSink {
            group: group.to_owned(),
            insert: q(DB::batch_insert(&DB::events_table(schema))),
        }
    }
}

/// The event both sinks decode: the fields they write (the rest of the JSON is skipped, and
/// the line items are only counted).
#[derive(serde::Deserialize)]
pub(crate) struct Order {
    order_id: String,
    #[serde(default)]
    amount_cents: i64,
    #[serde(default, deserialize_with = "count")]
    items: i32,
}

/// The length of a JSON array, without keeping its elements.
fn count<'de, D: serde::Deserializer<'de>>(d: D) -> Result<i32, D::Error> {
    struct Count;
    impl<'de> serde::de::Visitor<'de> for Count {
        type Value = i32;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("an array")
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<i32, A::Error> {
            let mut n = 0;
            while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {
                n += 1;
            }
            Ok(n)
        }
    }
    d.deserialize_seq(Count)
}

impl BatchHandler<Postgres> for BatchSink {
    type Event = Json<Order>;

    async fn handle_batch(
        &self,
        conn: &mut sqlx::PgConnection,
        batch: &Batch<'_, Self::Event>,
    ) -> Result<(), HandlerError> {
        let n = batch.len();
        let (mut ids, mut partitions, mut offsets) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        let (mut orders, mut amounts, mut items, mut bytes) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        for (i, (record, Json(order))) in batch.iter().enumerate() {
            if order.order_id.is_empty() {
                batch.reject(i, "an empty order_id");
                continue;
            }
            ids.push(record.event_id());
            partitions.push(record.partition());
            offsets.push(record.offset());
            orders.push(order.order_id.as_str());
            amounts.push(order.amount_cents);
            items.push(order.items);
            bytes.push(record.payload().map_or(0, |p| p.len() as i32));
        }
        if ids.is_empty() {
            return Ok(());
        }
        sqlx::query(self.insert.clone())
            .bind(&self.group)
            .bind(&ids)
            .bind(&partitions)
            .bind(&offsets)
            .bind(&orders)
            .bind(&amounts)
            .bind(&items)
            .bind(&bytes)
            .execute(conn)
            .await?;
        Ok(())
    }
}

impl BatchHandler<Sqlite> for BatchSink {
    type Event = Json<Order>;

    async fn handle_batch(
        &self,
        conn: &mut sqlx::SqliteConnection,
        batch: &Batch<'_, Self::Event>,
    ) -> Result<(), HandlerError> {
        // One JSON array of rows, `[[event_id, partition, offset, order_id, amount, items,
        // bytes], …]`, bound as one text parameter.
        let mut rows = Vec::with_capacity(2 + batch.len() * 96);
        rows.push(b'[');
        for (i, (record, Json(order))) in batch.iter().enumerate() {
            if order.order_id.is_empty() {
                batch.reject(i, "an empty order_id");
                continue;
            }
            if rows.len() > 1 {
                rows.push(b',');
            }
            let row = (
                record.event_id(),
                record.partition(),
                record.offset(),
                &order.order_id,
                order.amount_cents,
                order.items,
                record.payload().map_or(0, <[u8]>::len),
            );
            serde_json::to_writer(&mut rows, &row).map_err(HandlerError::reject)?;
        }
        if rows.len() == 1 {
            return Ok(());
        }
        rows.push(b']');
        let rows = String::from_utf8(rows).map_err(HandlerError::reject)?;
        sqlx::query(self.insert.clone())
            .bind(&self.group)
            .bind(rows)
            .execute(conn)
            .await?;
        Ok(())
    }
}

/// What the benchmark needs of a database besides the runtime's [`Backend`].
pub(crate) trait BenchDb: Backend {
    /// The database's name, for the output.
    const LABEL: &'static str;
    /// The pool's size (the runtime's default concurrency).
    const POOL_SIZE: u32;
    /// The handler's table.
    fn events_table(schema: &str) -> String;
    /// [`BatchSink`]'s one statement per batch into `table`.
    fn batch_insert(table: &str) -> String;
    /// Creates the handler's table.
    async fn create_events(pool: &Pool<Self>, schema: &str) -> anyhow::Result<()>;
    /// Empties the handler's table.
    async fn truncate_events(pool: &Pool<Self>, schema: &str) -> anyhow::Result<()>;
    /// Rows in the handler's table.
    async fn count_events(pool: &Pool<Self>, schema: &str) -> anyhow::Result<i64>;
    /// Inserts ledger rows `from..to` with random UUID event ids for `group`.
    async fn prefill(
        pool: &Pool<Self>,
        schema: &str,
        group: &str,
        from: i64,
        to: i64,
    ) -> anyhow::Result<()>;
    /// Statistics and a checkpoint after the pre-fill, as a live database would have them.
    async fn after_prefill(pool: &Pool<Self>, schema: &str) -> anyhow::Result<()>;
    /// Drops everything the run created.
    async fn drop_all(pool: &Pool<Self>, schema: &str) -> anyhow::Result<()>;
    /// The pool, if it is PostgreSQL's (`server_limit` runs pgbench against it).
    fn as_postgres(pool: &Pool<Self>) -> Option<&Pool<Postgres>>;
}

macro_rules! sink_for {
    ($db:ty) => {
        impl Handler<$db> for Sink {
            type Event = Json<Order>;

            async fn handle(
                &self,
                ctx: &mut Context<'_, $db>,
                Json(order): Json<Order>,
            ) -> Result<(), HandlerError> {
                let record = ctx.record();
                if order.order_id.is_empty() {
                    return Err(HandlerError::reject("an empty order_id"));
                }
                sqlx::query(self.insert.clone())
                    .bind(&self.group)
                    .bind(record.event_id())
                    .bind(record.partition())
                    .bind(record.offset())
                    .bind(&order.order_id)
                    .bind(order.amount_cents)
                    .bind(order.items)
                    .bind(record.payload().map_or(0, |p| p.len() as i32))
                    .execute(ctx.conn())
                    .await?;
                Ok(())
            }
        }
    };
}

sink_for!(Postgres);
sink_for!(Sqlite);

pub(crate) fn q(sql: String) -> SqlStr {
    AssertSqlSafe(sql).into_sql_str()
}

const EVENTS_COLUMNS: &str = r#"(
    consumer_group TEXT    NOT NULL,
    event_id       TEXT    NOT NULL,
    partition      INTEGER NOT NULL,
    "offset"       BIGINT  NOT NULL,
    order_id       TEXT    NOT NULL,
    amount_cents   BIGINT  NOT NULL,
    items          INTEGER NOT NULL,
    payload_bytes  INTEGER NOT NULL,
    PRIMARY KEY (consumer_group, event_id)
)"#;

impl BenchDb for Postgres {
    const LABEL: &'static str = "PostgreSQL";
    const POOL_SIZE: u32 = 8;

    fn as_postgres(pool: &Pool<Self>) -> Option<&Pool<Postgres>> {
        Some(pool)
    }

    fn events_table(schema: &str) -> String {
        format!("{schema}.bench_events")
    }

    fn batch_insert(table: &str) -> String {
        format!(
            r#"INSERT INTO {table} (consumer_group, event_id, partition, "offset", order_id, amount_cents, items, payload_bytes)
SELECT $1, r.* FROM unnest($2::text[], $3::int[], $4::bigint[], $5::text[], $6::bigint[], $7::int[], $8::int[]) AS r"#
        )
    }

    async fn create_events(pool: &Pool<Self>, schema: &str) -> anyhow::Result<()> {
        let table = Self::events_table(schema);
        sqlx::query(q(format!("CREATE TABLE {table} {EVENTS_COLUMNS}")))
            .execute(pool)
            .await?;
        Ok(())
    }

    async fn truncate_events(pool: &Pool<Self>, schema: &str) -> anyhow::Result<()> {
        let table = Self::events_table(schema);
        sqlx::query(q(format!("TRUNCATE {table}")))
            .execute(pool)
            .await?;
        Ok(())
    }

    async fn count_events(pool: &Pool<Self>, schema: &str) -> anyhow::Result<i64> {
        let table = Self::events_table(schema);
        Ok(
            sqlx::query_scalar(q(format!("SELECT count(*) FROM {table}")))
                .fetch_one(pool)
                .await?,
        )
    }

    async fn prefill(
        pool: &Pool<Self>,
        schema: &str,
        group: &str,
        from: i64,
        to: i64,
    ) -> anyhow::Result<()> {
        // Into the ledger's newest generation, under the group's id; source 0 is no partition
        // (these rows are never replayed, only looked up).
        sqlx::query(q(format!(
            r#"WITH grp AS (
    INSERT INTO {schema}.ledger_groups (name) VALUES ($1)
    ON CONFLICT (name) DO UPDATE SET name = EXCLUDED.name RETURNING group_id
)
INSERT INTO {schema}.processed (generation, group_id, source_id, "offset", event_id)
SELECT (SELECT max(generation) FROM {schema}.ledger_generations), grp.group_id, 0, g,
    md5($2 || g::text)::uuid::text
FROM grp, generate_series($3::bigint, $4::bigint - 1) AS g"#
        )))
        .bind(group)
        .bind(schema)
        .bind(from)
        .bind(to)
        .execute(pool)
        .await?;
        Ok(())
    }

    async fn after_prefill(pool: &Pool<Self>, schema: &str) -> anyhow::Result<()> {
        sqlx::query(q(format!("VACUUM ANALYZE {schema}.processed")))
            .execute(pool)
            .await?;
        // Needs superuser or pg_checkpoint; a missed checkpoint only adds noise.
        if let Err(e) = sqlx::query("CHECKPOINT").execute(pool).await {
            eprintln!("bench: CHECKPOINT after the pre-fill failed ({e}); continuing");
        }
        Ok(())
    }

    async fn drop_all(pool: &Pool<Self>, schema: &str) -> anyhow::Result<()> {
        sqlx::query(q(format!("DROP SCHEMA IF EXISTS {schema} CASCADE")))
            .execute(pool)
            .await?;
        Ok(())
    }
}

impl BenchDb for Sqlite {
    const LABEL: &'static str = "SQLite";
    const POOL_SIZE: u32 = 4;

    fn as_postgres(_: &Pool<Self>) -> Option<&Pool<Postgres>> {
        None
    }

    fn events_table(schema: &str) -> String {
        format!("{schema}_bench_events")
    }

    fn batch_insert(table: &str) -> String {
        format!(
            r#"INSERT INTO {table} (consumer_group, event_id, partition, "offset", order_id, amount_cents, items, payload_bytes)
SELECT $1, r.value ->> 0, r.value ->> 1, r.value ->> 2, r.value ->> 3, r.value ->> 4, r.value ->> 5, r.value ->> 6
FROM json_each($2) AS r"#
        )
    }

    async fn create_events(pool: &Pool<Self>, schema: &str) -> anyhow::Result<()> {
        let table = Self::events_table(schema);
        sqlx::query(q(format!(
            "CREATE TABLE {table} {EVENTS_COLUMNS} WITHOUT ROWID"
        )))
        .execute(pool)
        .await?;
        Ok(())
    }

    async fn truncate_events(pool: &Pool<Self>, schema: &str) -> anyhow::Result<()> {
        let table = Self::events_table(schema);
        sqlx::query(q(format!("DELETE FROM {table}")))
            .execute(pool)
            .await?;
        Ok(())
    }

    async fn count_events(pool: &Pool<Self>, schema: &str) -> anyhow::Result<i64> {
        let table = Self::events_table(schema);
        Ok(
            sqlx::query_scalar(q(format!("SELECT count(*) FROM {table}")))
                .fetch_one(pool)
                .await?,
        )
    }

    async fn prefill(
        pool: &Pool<Self>,
        schema: &str,
        group: &str,
        from: i64,
        to: i64,
    ) -> anyhow::Result<()> {
        sqlx::query(q(format!(
            "INSERT INTO {schema}_ledger_groups (name) VALUES ($1) ON CONFLICT (name) DO NOTHING"
        )))
        .bind(group)
        .execute(pool)
        .await?;
        sqlx::query(q(format!(
            r#"WITH RECURSIVE c(x) AS (SELECT $2 UNION ALL SELECT x + 1 FROM c WHERE x + 1 < $3)
INSERT INTO {schema}_processed (group_id, source_id, "offset", event_id)
SELECT (SELECT group_id FROM {schema}_ledger_groups WHERE name = $1), 0, x, lower(hex(randomblob(16)))
FROM c WHERE true"#
        )))
        .bind(group)
        .bind(from)
        .bind(to)
        .execute(pool)
        .await?;
        Ok(())
    }

    async fn after_prefill(pool: &Pool<Self>, _schema: &str) -> anyhow::Result<()> {
        sqlx::query("ANALYZE").execute(pool).await?;
        sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
            .execute(pool)
            .await?;
        Ok(())
    }

    async fn drop_all(pool: &Pool<Self>, schema: &str) -> anyhow::Result<()> {
        for table in [
            Self::events_table(schema),
            format!("{schema}_processed"),
            format!("{schema}_ledger_groups"),
            format!("{schema}_ledger_generations"),
            format!("{schema}_ledger_marks"),
            format!("{schema}_dead_letters"),
            format!("{schema}_consumer_offsets"),
            format!("{schema}__migrations"),
        ] {
            sqlx::query(q(format!("DROP TABLE IF EXISTS {table}")))
                .execute(pool)
                .await?;
        }
        Ok(())
    }
}
