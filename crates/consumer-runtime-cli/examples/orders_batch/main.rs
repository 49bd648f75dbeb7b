//! Run with: `cargo run --bin orders-batch -- --help` (the consumer program; `migrate`, `run`,
//! `status`, `offsets`, `replay` and `dead-letters` need PostgreSQL and Kafka, see the README's
//! "Batch handlers").
//!
//! The `orders` program (`examples/orders/main.rs`: the same events, tables and migrations)
//! with a batch handler: one call per partition batch, and the whole batch written with ONE
//! statement, `unnest` over arrays of the batch's columns, instead of two statements per event.
//!
//! The statement counts every event in `order_events_applied` (deliberately NOT idempotently:
//! an event applied twice would show `applied = 2`) and upserts each order of the batch once,
//! from its newest event in the batch, only if that is newer than the stored row. An event
//! with a version below 1 is rejected by index (`batch.reject`): the runtime parks it in
//! `dead_letters` in the transaction that commits the rest of the batch.

use consumer_runtime::sqlx::{self, PgConnection};
use consumer_runtime::{Batch, BatchHandler, Batched, HandlerError, Json};

/// One order event.
#[derive(serde::Deserialize)]
struct OrderEvent {
    #[serde(rename = "type")]
    kind: Kind,
    order_id: String,
    version: i64,
    customer: Option<String>,
    total_cents: Option<i64>,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "lowercase")]
enum Kind {
    Placed,
    Paid,
    Shipped,
    Cancelled,
}

impl Kind {
    fn status(&self) -> &'static str {
        match self {
            Kind::Placed => "placed",
            Kind::Paid => "paid",
            Kind::Shipped => "shipped",
            Kind::Cancelled => "cancelled",
        }
    }
}

/// The batch, as one row per event: `unnest($1, $2, …)` turns these arrays back into rows.
const APPLY_BATCH: &str = "
WITH events AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::int8[], $4::text[], $5::text[], $6::int8[])
        AS e(event_id, order_id, version, status, customer, total_cents)
),
counted AS (
    -- Not idempotent on purpose: a second application of an event would make it 2.
    INSERT INTO order_events_applied (event_id, order_id, version, applied)
    SELECT event_id, order_id, version, 1 FROM events
    ON CONFLICT (event_id) DO UPDATE SET applied = order_events_applied.applied + 1
),
newest AS (
    -- Each order once (an upsert may not touch a row twice): its newest event in the batch,
    -- with the newest customer and total the batch names.
    SELECT order_id,
           max(version) AS version,
           (array_agg(status ORDER BY version DESC))[1] AS status,
           (array_agg(customer ORDER BY version DESC) FILTER (WHERE customer IS NOT NULL))[1] AS customer,
           (array_agg(total_cents ORDER BY version DESC) FILTER (WHERE total_cents IS NOT NULL))[1] AS total_cents
    FROM events
    GROUP BY order_id
)
-- The version-based update: only a newer event moves the order.
INSERT INTO orders (order_id, status, customer, total_cents, version)
SELECT order_id, status, customer, total_cents, version FROM newest
ON CONFLICT (order_id) DO UPDATE SET
    status = EXCLUDED.status,
    customer = COALESCE(EXCLUDED.customer, orders.customer),
    total_cents = COALESCE(EXCLUDED.total_cents, orders.total_cents),
    version = EXCLUDED.version,
    updated_at = now()
WHERE orders.version < EXCLUDED.version";

struct Orders;

impl BatchHandler for Orders {
    type Event = Json<OrderEvent>;

    async fn handle_batch(
        &self,
        conn: &mut PgConnection,
        batch: &Batch<'_, Json<OrderEvent>>,
    ) -> Result<(), HandlerError> {
        let n = batch.len();
        let (mut event_ids, mut order_ids, mut versions) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        let (mut statuses, mut customers, mut totals) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        for (i, (record, Json(e))) in batch.iter().enumerate() {
            if e.version < 1 {
                let why = format!(
                    "order {} has version {}; versions start at 1",
                    e.order_id, e.version
                );
                batch.reject(i, why);
                continue;
            }
            event_ids.push(record.event_id());
            order_ids.push(e.order_id.as_str());
            versions.push(e.version);
            statuses.push(e.kind.status());
            customers.push(e.customer.as_deref());
            totals.push(e.total_cents);
        }
        if event_ids.is_empty() {
            return Ok(());
        }
        sqlx::query(APPLY_BATCH)
            .bind(&event_ids)
            .bind(&order_ids)
            .bind(&versions)
            .bind(&statuses)
            .bind(&customers)
            .bind(&totals)
            .execute(conn)
            .await?;
        Ok(())
    }
}

fn main() -> std::process::ExitCode {
    consumer_runtime_cli::App::new("orders-batch", Batched(Orders))
        .about("Keeps the `orders` table up to date from order events, one statement per batch")
        .migrations(sqlx::migrate!("examples/orders/migrations"))
        .main()
}
