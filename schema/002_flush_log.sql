-- The aggregator's flush intents: one row per batch, written *before* the batch's rows.
--
-- A batch covers the offsets [start_offset, end_offset) of one Kafka partition. After a crash
-- the aggregator finds the intent that starts at its committed offset and replays exactly that
-- range, so the replayed rows are identical to the first attempt (see ARCHITECTURE.md,
-- "Exactly-once flush protocol"). The dedup columns let a restarted worker rebuild its
-- duplicate-detection memory exactly as it was at end_offset.
CREATE TABLE IF NOT EXISTS flush_log
(
    topic             String,
    src_partition     UInt32,
    start_offset      UInt64,
    end_offset        UInt64,
    batch_id          UInt64,
    first_ts          Int64,
    max_ts            Int64,
    dedup_from        UInt64,
    dedup_from_max_ts Int64,
    events            UInt64,
    rows              UInt64,
    logged_at         DateTime
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(logged_at)
ORDER BY (topic, src_partition, start_offset, batch_id);
