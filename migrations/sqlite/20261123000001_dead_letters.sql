-- Dead letters: records that failed permanently, parked in the same transaction that advances
-- the offset (see the PostgreSQL migration for the columns and the `headers` encoding). `{s}`
-- is the runtime's table prefix.
CREATE TABLE {s}dead_letters (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    consumer_group  TEXT    NOT NULL,
    topic           TEXT    NOT NULL,
    partition       INTEGER NOT NULL,
    "offset"        INTEGER NOT NULL,
    key             BLOB,
    headers         TEXT    NOT NULL DEFAULT '[]',
    payload         BLOB,
    timestamp_ms    INTEGER,
    event_id        TEXT,
    error           TEXT    NOT NULL,
    error_kind      TEXT    NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 1,
    first_failed_at TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    last_failed_at  TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    UNIQUE (consumer_group, topic, partition, "offset")
);
