-- The runtime's own tables. `{s}` stands for the runtime's table prefix (default
-- `consumer_runtime_`); the runtime substitutes it before applying this file, and keeps its
-- migration history in `{s}_migrations`, apart from the application's own migrations.

-- The dedup ledger: one row per event id a consumer group has applied.
CREATE TABLE {s}processed (
    consumer_group TEXT    NOT NULL,
    event_id       TEXT    NOT NULL,
    topic          TEXT    NOT NULL,
    partition      INTEGER NOT NULL,
    "offset"       INTEGER NOT NULL,
    processed_at   TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    PRIMARY KEY (consumer_group, event_id)
) WITHOUT ROWID;

-- The source of truth for where each partition resumes (see the PostgreSQL migration).
CREATE TABLE {s}consumer_offsets (
    consumer_group TEXT    NOT NULL,
    topic          TEXT    NOT NULL,
    partition      INTEGER NOT NULL,
    next_offset    INTEGER,
    epoch          INTEGER NOT NULL DEFAULT 0,
    owner          TEXT,
    updated_at     TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    PRIMARY KEY (consumer_group, topic, partition)
);
