-- The orders projection: the latest state of every order, as of its newest event.
CREATE TABLE orders (
    order_id    TEXT PRIMARY KEY,
    status      TEXT NOT NULL,
    customer    TEXT,
    total_cents BIGINT,
    -- The version of the newest event applied; an older or repeated version changes nothing.
    version     BIGINT NOT NULL,
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
