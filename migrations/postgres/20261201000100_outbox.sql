-- The transactional outbox: rows an application (or a handler) writes in its own transaction,
-- which the relay publishes to Kafka after they commit. `{s}` is the runtime's schema.
--
-- The layout is Debezium's outbox event router's: `id` (the event id, sent as the `event-id`
-- header), `aggregatetype` (the topic the row goes to: Debezium's `route.by.field`),
-- `aggregateid` (the record key), `type` (sent as the `type` header when not empty) and
-- `payload`. The other columns are the relay's own; Debezium ignores them.
--
-- `seq` orders the rows: a writer takes a transaction-scoped advisory lock on its key's hash
-- before it inserts, so two transactions that write the same key insert (and draw `seq`) in
-- the order they commit. Rows of one key therefore appear in `seq` order and in commit order,
-- and the relay never skips a row that commits late: it reads every unpublished row, never
-- "rows after the last seq seen".
CREATE TABLE {s}outbox (
    seq                 BIGSERIAL   PRIMARY KEY,
    id                  TEXT        NOT NULL UNIQUE,
    aggregatetype       TEXT        NOT NULL,
    aggregateid         TEXT,
    type                TEXT        NOT NULL DEFAULT '',
    payload             BYTEA,
    headers             TEXT        NOT NULL DEFAULT '[]',
    key_hash            BIGINT      NOT NULL,
    created_at          TIMESTAMPTZ NOT NULL DEFAULT now(),
    sent_count          INTEGER     NOT NULL DEFAULT 0,
    published_at        TIMESTAMPTZ,
    published_partition INTEGER,
    published_offset    BIGINT,
    published_by        TEXT,
    parked_at           TIMESTAMPTZ,
    error               TEXT
);

-- What the relay reads: the unpublished, unparked rows in seq order.
CREATE INDEX outbox_pending ON {s}outbox (seq) WHERE published_at IS NULL AND parked_at IS NULL;
-- What the clean-up deletes: published rows, oldest first.
CREATE INDEX outbox_published ON {s}outbox (published_at) WHERE published_at IS NOT NULL;

-- The relay's lanes: the outbox split by `key_hash % lanes`. A relay instance leases a lane
-- (owner, lease_until) under a fresh epoch; it marks rows of the lane published only in a
-- transaction that first checks that epoch, so a relay that lost its lane (frozen past its
-- lease, then resumed) cannot touch the lane's rows.
CREATE TABLE {s}outbox_lanes (
    lane        INTEGER     PRIMARY KEY,
    owner       TEXT,
    epoch       BIGINT      NOT NULL DEFAULT 0,
    lease_until TIMESTAMPTZ,
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- The relay instances alive: each one renews its row while it runs, so that the others see
-- it and hand it its share of the lanes even while it holds none.
CREATE TABLE {s}outbox_relays (
    instance   TEXT PRIMARY KEY,
    seen_until TIMESTAMPTZ NOT NULL
);
