-- The runtime's own tables. `{s}` stands for the runtime's schema (default `consumer_runtime.`);
-- the runtime substitutes it before applying this file, and keeps its migration history in
-- `{s}_migrations`, apart from the application's own migrations.

-- The dedup ledger: one row per event id a consumer group has applied.
CREATE TABLE {s}processed (
    consumer_group TEXT        NOT NULL,
    event_id       TEXT        NOT NULL,
    topic          TEXT        NOT NULL,
    partition      INTEGER     NOT NULL,
    "offset"       BIGINT      NOT NULL,
    processed_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer_group, event_id)
);

-- The source of truth for where each partition resumes. `epoch` is bumped on every
-- assignment (and by replay); a worker whose epoch is stale can never commit. `owner` names
-- the consumer instance that last claimed the partition (NULL after a replay).
CREATE TABLE {s}consumer_offsets (
    consumer_group TEXT        NOT NULL,
    topic          TEXT        NOT NULL,
    partition      INTEGER     NOT NULL,
    next_offset    BIGINT,
    epoch          BIGINT      NOT NULL DEFAULT 0,
    owner          TEXT,
    updated_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer_group, topic, partition)
);
