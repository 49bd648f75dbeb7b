-- The transactional outbox (see the PostgreSQL migration for the layout, which is Debezium's
-- outbox event router's). `{s}` is the runtime's table prefix. SQLite has one writer at a
-- time, so rows commit in `seq` order.
CREATE TABLE {s}outbox (
    seq                 INTEGER PRIMARY KEY AUTOINCREMENT,
    id                  TEXT    NOT NULL UNIQUE,
    aggregatetype       TEXT    NOT NULL,
    aggregateid         TEXT,
    type                TEXT    NOT NULL DEFAULT '',
    payload             BLOB,
    headers             TEXT    NOT NULL DEFAULT '[]',
    key_hash            INTEGER NOT NULL,
    created_at          TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    sent_count          INTEGER NOT NULL DEFAULT 0,
    published_at        TEXT,
    published_partition INTEGER,
    published_offset    INTEGER,
    published_by        TEXT,
    parked_at           TEXT,
    error               TEXT
);

CREATE INDEX {s}outbox_pending ON {s}outbox (seq) WHERE published_at IS NULL AND parked_at IS NULL;
CREATE INDEX {s}outbox_published ON {s}outbox (published_at) WHERE published_at IS NOT NULL;

CREATE TABLE {s}outbox_lanes (
    lane        INTEGER PRIMARY KEY,
    owner       TEXT,
    epoch       INTEGER NOT NULL DEFAULT 0,
    lease_until TEXT,
    updated_at  TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);

-- The relay instances alive: each one renews its row while it runs, so that the others see
-- it and hand it its share of the lanes even while it holds none.
CREATE TABLE {s}outbox_relays (
    instance   TEXT PRIMARY KEY,
    seen_until TEXT    NOT NULL
);
