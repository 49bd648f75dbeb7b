-- The dedup ledger, upgraded in place to a layout that can be pruned in bounded batches (see
-- the PostgreSQL migration for the columns of `consumer_offsets` and the generations). `{s}` is
-- the runtime's table prefix.
--
-- SQLite has one writer at a time, so a claim can never race another claim, and the ledger is
-- one table: `id` grows with every claim (AUTOINCREMENT never reuses an id), each generation
-- records the first id it holds, and pruning a generation deletes its id range a few thousand
-- rows at a time, each batch in a short transaction of its own. The unique index on
-- `(group_id, event_id)` spans every generation.

CREATE TABLE {s}ledger_groups (
    group_id INTEGER PRIMARY KEY,
    name     TEXT NOT NULL UNIQUE
);

INSERT INTO {s}ledger_groups (name)
SELECT consumer_group FROM {s}consumer_offsets
UNION
SELECT consumer_group FROM {s}processed
ORDER BY 1;

INSERT INTO {s}consumer_offsets (consumer_group, topic, partition, next_offset, epoch)
SELECT DISTINCT p.consumer_group, p.topic, p.partition, NULL, 0
FROM {s}processed p
WHERE NOT EXISTS (SELECT 1 FROM {s}consumer_offsets o
                  WHERE o.consumer_group = p.consumer_group AND o.topic = p.topic AND o.partition = p.partition);

ALTER TABLE {s}consumer_offsets ADD COLUMN group_id INTEGER;
ALTER TABLE {s}consumer_offsets ADD COLUMN source_id INTEGER;
ALTER TABLE {s}consumer_offsets ADD COLUMN high_offset INTEGER;
ALTER TABLE {s}consumer_offsets ADD COLUMN ledger_floor INTEGER;
UPDATE {s}consumer_offsets SET
    group_id = (SELECT g.group_id FROM {s}ledger_groups g WHERE g.name = consumer_group),
    source_id = rowid,
    high_offset = next_offset;
CREATE UNIQUE INDEX {s}consumer_offsets_source_id ON {s}consumer_offsets (source_id);

CREATE TABLE {s}ledger_generations (
    generation INTEGER PRIMARY KEY,
    started_at TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    first_id   INTEGER NOT NULL
);

CREATE TABLE {s}ledger_marks (
    generation  INTEGER NOT NULL,
    source_id   INTEGER NOT NULL,
    high_offset INTEGER NOT NULL,
    PRIMARY KEY (generation, source_id)
) WITHOUT ROWID;

CREATE TABLE {s}processed_new (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    group_id     INTEGER NOT NULL,
    source_id    INTEGER NOT NULL,
    "offset"     INTEGER NOT NULL,
    processed_at TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    event_id     TEXT    NOT NULL
);
INSERT INTO {s}processed_new (group_id, source_id, "offset", processed_at, event_id)
SELECT o.group_id, o.source_id, p."offset", p.processed_at, p.event_id
FROM {s}processed p
JOIN {s}consumer_offsets o
  ON o.consumer_group = p.consumer_group AND o.topic = p.topic AND o.partition = p.partition
ORDER BY p.processed_at;

INSERT INTO {s}ledger_generations (generation, started_at, first_id)
SELECT 0, coalesce((SELECT min(processed_at) FROM {s}processed), strftime('%Y-%m-%dT%H:%M:%fZ', 'now')), 1;

DROP TABLE {s}processed;
ALTER TABLE {s}processed_new RENAME TO {s}processed;
CREATE UNIQUE INDEX {s}processed_key ON {s}processed (group_id, event_id);
