-- One row per event the handler applied, with a counter that is deliberately NOT idempotent
-- (`applied = applied + 1`): an event applied twice would show here as 2.
CREATE TABLE order_events_applied (
    event_id   TEXT PRIMARY KEY,
    order_id   TEXT NOT NULL,
    version    BIGINT NOT NULL,
    applied    INTEGER NOT NULL,
    applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
