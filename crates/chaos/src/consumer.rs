//! The consumer processes: `chaos consumer <args…>` is the generated consumer program
//! (`run`, `migrate`, `replay`, …) of [`ChaosHandler`], whose effect is deliberately not
//! idempotent.

use std::ffi::OsString;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use consumer_runtime::sqlx::{self, Postgres};
use consumer_runtime::{Context, Handler, HandlerError, Json};

use crate::rng::{GOLDEN, mix};

/// The environment variable naming the schema of the `chaos_effects` table.
pub(crate) const ENV_SCHEMA: &str = "CHAOS_SCHEMA";
/// The environment variable with the largest random handler delay, in microseconds.
pub(crate) const ENV_DELAY_US: &str = "CHAOS_HANDLER_DELAY_US";
/// The environment variable naming the consumer's role in `chaos --pipeline`: `a` (service A:
/// counts the `in` event in `chaos_effects` and writes an outbox row for `mid` in the same
/// transaction) or `b` (service B: counts the `mid` event in `chaos_effects_b` by the `in`
/// event it came from). Unset: the plain chaos consumer.
pub(crate) const ENV_ROLE: &str = "CHAOS_ROLE";
/// The environment variable naming service A's outbox topic (`mid`).
pub(crate) const ENV_MID_TOPIC: &str = "CHAOS_MID_TOPIC";

/// A record's payload: `{"trial": 3, "n": 17}`, or with `"poison": true` for a record the
/// handler rejects. (Some poison records are not JSON at all and fail decoding.)
#[derive(serde::Deserialize)]
pub(crate) struct ChaosEvent {
    trial: i64,
    #[serde(default)]
    poison: bool,
    /// The pipeline's business key (the Kafka key of `in` and of `mid`).
    #[serde(default)]
    key: Option<String>,
    /// The event's place among the events of its key, from 0.
    #[serde(default)]
    seq: Option<u64>,
    /// In `mid`: the `in` event it came from.
    #[serde(default)]
    src: Option<String>,
}

/// What a consumer process does with an event.
enum Role {
    /// The plain chaos consumer.
    Plain,
    /// `chaos --pipeline`'s service A: effect, then an outbox row for this topic.
    A { mid_topic: String },
    /// `chaos --pipeline`'s service B: effect by source event.
    B { sql: String },
}

/// Counts every application of an event in `chaos_effects`: `applied = applied + 1`, so an
/// event applied twice shows as 2. A poison event writes its effect and is then rejected: the
/// runtime must roll the effect back and park the record.
pub(crate) struct ChaosHandler {
    sql: String,
    role: Role,
    max_delay_us: u64,
    state: AtomicU64,
}

impl ChaosHandler {
    fn from_env() -> ChaosHandler {
        let schema = std::env::var(ENV_SCHEMA).unwrap_or_else(|_| "public".to_owned());
        let max_delay_us = std::env::var(ENV_DELAY_US)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let role = match std::env::var(ENV_ROLE).as_deref() {
            Ok("a") => Role::A {
                mid_topic: std::env::var(ENV_MID_TOPIC).unwrap_or_else(|_| "mid".to_owned()),
            },
            Ok("b") => Role::B {
                sql: effect_b_sql(&schema),
            },
            _ => Role::Plain,
        };
        ChaosHandler {
            sql: effect_sql(&schema),
            role,
            max_delay_us,
            state: AtomicU64::new(u64::from(std::process::id()) << 20),
        }
    }
}

/// The effect's statement for the table in `schema`.
pub(crate) fn effect_sql(schema: &str) -> String {
    format!(
        "INSERT INTO {schema}.chaos_effects (trial, event_id, applied) VALUES ($1, $2, 1)
         ON CONFLICT (trial, event_id) DO UPDATE SET applied = {schema}.chaos_effects.applied + 1,
             last_at = now()"
    )
}

/// Service B's effect statement for the table in `schema`: counted by the `in` event the
/// `mid` event came from.
pub(crate) fn effect_b_sql(schema: &str) -> String {
    format!(
        "INSERT INTO {schema}.chaos_effects_b (trial, event_id, applied) VALUES ($1, $2, 1)
         ON CONFLICT (trial, event_id) DO UPDATE SET applied = {schema}.chaos_effects_b.applied + 1"
    )
}

/// The effects table in `schema`: `chaos_effects`, or service B's `chaos_effects_b`.
pub(crate) fn effects_table_sql(schema: &str, table: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {schema}.{table} (
             trial    BIGINT  NOT NULL,
             event_id TEXT    NOT NULL,
             applied  INTEGER NOT NULL,
             first_at TIMESTAMPTZ NOT NULL DEFAULT now(),
             last_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
             PRIMARY KEY (trial, event_id))"
    )
}

impl Handler for ChaosHandler {
    type Event = Json<ChaosEvent>;

    async fn handle(
        &self,
        ctx: &mut Context<'_, Postgres>,
        Json(e): Json<ChaosEvent>,
    ) -> Result<(), HandlerError> {
        if self.max_delay_us > 0 {
            // A small random delay widens the windows in which a kill or a stop lands
            // inside an open transaction.
            let r = mix(self.state.fetch_add(GOLDEN, Ordering::Relaxed));
            let us = r % (self.max_delay_us + 1);
            if us > 0 {
                tokio::time::sleep(Duration::from_micros(us)).await;
            }
        }
        if let Role::B { sql } = &self.role {
            let src = e
                .src
                .as_deref()
                .ok_or_else(|| HandlerError::reject("a mid event without src"))?;
            sqlx::query(sqlx::AssertSqlSafe(sql.clone()))
                .bind(e.trial)
                .bind(src)
                .execute(ctx.conn())
                .await?;
            return Ok(());
        }
        sqlx::query(sqlx::AssertSqlSafe(self.sql.clone()))
            .bind(e.trial)
            .bind(ctx.record().event_id())
            .execute(ctx.conn())
            .await?;
        if let Role::A { mid_topic } = &self.role {
            let key = e.key.clone().unwrap_or_default();
            let src = ctx.record().event_id().to_owned();
            let payload = format!(
                r#"{{"trial":{},"key":"{key}","seq":{},"src":"{src}"}}"#,
                e.trial,
                e.seq.unwrap_or(0)
            );
            emit(ctx, mid_topic, &key, payload).await?;
        }
        if e.poison {
            // The effect above must be rolled back with the record's savepoint.
            return Err(HandlerError::reject("a poison record"));
        }
        Ok(())
    }
}

/// Writes service A's outbox row for `mid` in the handler's transaction.
async fn emit(
    ctx: &mut Context<'_, Postgres>,
    topic: &str,
    key: &str,
    payload: String,
) -> Result<(), HandlerError> {
    let message = consumer_runtime::outbox::Message::new(topic)
        .key(key)
        .payload(payload.into_bytes());
    ctx.publish(&message).await?;
    Ok(())
}

/// Runs the consumer program with `args` (everything after `chaos consumer`).
pub(crate) fn main(args: Vec<OsString>) -> ExitCode {
    let app = consumer_runtime_cli::App::new("chaos-consumer", ChaosHandler::from_env()).about(
        "The chaos program's consumer: counts every application of an event, not idempotently",
    );
    app.main_with_args(std::iter::once(OsString::from("chaos-consumer")).chain(args))
}
