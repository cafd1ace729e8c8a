-- Flush intents record what a replay needs besides the offsets, and carry a server-side write
-- deadline (see ARCHITECTURE.md, "Exactly-once flush protocol", "Fencing" and "Rules").
--
-- ClickHouse 18.16 has no ADD COLUMN IF NOT EXISTS: one column per statement, and the migration
-- runner counts "column with this name already exists" (code 44) on an ADD COLUMN as done, so a
-- run interrupted half-way is applied again safely.
--
-- dedup_window_ms, retention_ms: the --dedup-window and --retention the batch was decided with
-- (0 in rows written before this migration: replayed with the configured values).
ALTER TABLE flush_log ADD COLUMN dedup_window_ms Int64 DEFAULT 0;
ALTER TABLE flush_log ADD COLUMN retention_ms Int64 DEFAULT 0;
-- write_deadline: the last second (server clock) at which the server may apply the insert.
-- fence: computed by the server when it applies the insert; throwIf fails the whole insert
-- once its clock is past the deadline, so an intent insert stalled past the handover of its
-- partitions never lands. Rows without a deadline (0, older rows, merges of older parts)
-- evaluate to 0.
ALTER TABLE flush_log ADD COLUMN write_deadline DateTime DEFAULT toDateTime(0);
ALTER TABLE flush_log ADD COLUMN fence UInt8 MATERIALIZED throwIf(write_deadline != toDateTime(0) AND now() > write_deadline);
