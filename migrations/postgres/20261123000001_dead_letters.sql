-- Dead letters: records that failed permanently (undecodable, no event id, rejected by the
-- handler, retries exhausted, handler panicked). The runtime parks a record here in the same
-- transaction that advances its partition's offset, so a record is either applied, parked, or
-- still ahead of the stored offset: never silently dropped. `{s}` is the runtime's schema.
--
-- `headers` is JSON text: an array of `[name, value]` pairs in the record's order, where
-- `value` is `null` (a header without a value), a JSON string (the value's bytes were valid
-- UTF-8), or `{"base64": "…"}` (any other bytes, standard base64 with padding). This is
-- lossless for every header a Kafka record can carry.
CREATE TABLE {s}dead_letters (
    id              BIGSERIAL   PRIMARY KEY,
    consumer_group  TEXT        NOT NULL,
    topic           TEXT        NOT NULL,
    partition       INTEGER     NOT NULL,
    "offset"        BIGINT      NOT NULL,
    key             BYTEA,
    headers         TEXT        NOT NULL DEFAULT '[]',
    payload         BYTEA,
    timestamp_ms    BIGINT,
    event_id        TEXT,
    error           TEXT        NOT NULL,
    error_kind      TEXT        NOT NULL,
    attempts        INTEGER     NOT NULL DEFAULT 1,
    first_failed_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_failed_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (consumer_group, topic, partition, "offset")
);
