-- Per (user, song, UTC day) totals, rolled up from plays_minute by `topk rollup`.
--
-- A rollup of a day rewrites all its rows with a new `version`; ReplacingMergeTree keeps the
-- newest, and readers use FINAL, so a re-run never double counts. A day's rows are used by
-- queries only while the day is *clean* (no flush touched it after its last rollup started,
-- see day_touches and rollup_log); otherwise queries read that day from plays_minute.
CREATE TABLE IF NOT EXISTS plays_daily
(
    user_id UInt64,
    song_id UInt64,
    day     Date,
    plays   UInt64,
    version UInt64
)
ENGINE = ReplacingMergeTree(version)
PARTITION BY toYYYYMM(day)
ORDER BY (user_id, day, song_id)
SETTINGS index_granularity = 1024;
