//! Run with: `cargo run --bin orders -- --help` (the consumer program; `migrate`, `run`,
//! `status`, `offsets` and `replay` need PostgreSQL and Kafka, see the README's "The consumer
//! program").
//!
//! A complete consumer program in one `main`: it keeps an `orders` projection in PostgreSQL up
//! to date from order events. Each record's payload is JSON such as
//!
//! ```json
//! {"type": "placed", "order_id": "o-17", "version": 1, "customer": "c-4", "total_cents": 2599}
//! {"type": "paid", "order_id": "o-17", "version": 2}
//! ```
//!
//! with the event id in the `event-id` header (the default; `--event-id` changes it). `type` is
//! `placed`, `paid`, `shipped` or `cancelled`; `customer` and `total_cents` may be left out of
//! later events. The handler upserts the order only if the event is newer than the stored row
//! (the version-based update: an older or repeated version changes nothing), and counts every
//! application in `order_events_applied`, deliberately NOT idempotently, so that an event
//! applied twice would show as `applied = 2`. The tables are the app's own migrations in
//! `crates/consumer-runtime-cli/examples/orders/migrations/`, applied by `orders migrate` with
//! the runtime's.

use consumer_runtime::sqlx::{self, Postgres};
use consumer_runtime::{Context, Handler, HandlerError, Json};

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

struct Orders;

impl Handler for Orders {
    type Event = Json<OrderEvent>;

    async fn handle(
        &self,
        ctx: &mut Context<'_, Postgres>,
        Json(e): Json<OrderEvent>,
    ) -> Result<(), HandlerError> {
        if e.version < 1 {
            return Err(HandlerError::reject(format!(
                "order {} has version {}; versions start at 1",
                e.order_id, e.version
            )));
        }
        // The version-based update: only a newer event moves the order.
        sqlx::query(
            "INSERT INTO orders (order_id, status, customer, total_cents, version)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (order_id) DO UPDATE SET
                 status = EXCLUDED.status,
                 customer = COALESCE(EXCLUDED.customer, orders.customer),
                 total_cents = COALESCE(EXCLUDED.total_cents, orders.total_cents),
                 version = EXCLUDED.version,
                 updated_at = now()
             WHERE orders.version < EXCLUDED.version",
        )
        .bind(&e.order_id)
        .bind(e.kind.status())
        .bind(&e.customer)
        .bind(e.total_cents)
        .bind(e.version)
        .execute(ctx.conn())
        .await?;
        // Not idempotent on purpose: a second application of this event would make it 2.
        sqlx::query(
            "INSERT INTO order_events_applied (event_id, order_id, version, applied)
             VALUES ($1, $2, $3, 1)
             ON CONFLICT (event_id) DO UPDATE SET applied = order_events_applied.applied + 1",
        )
        .bind(ctx.record().event_id())
        .bind(&e.order_id)
        .bind(e.version)
        .execute(ctx.conn())
        .await?;
        Ok(())
    }
}

fn main() -> std::process::ExitCode {
    consumer_runtime_cli::App::new("orders", Orders)
        .about("Keeps the `orders` table up to date from order events (placed, paid, shipped, cancelled)")
        .migrations(sqlx::migrate!("examples/orders/migrations"))
        .main()
}
