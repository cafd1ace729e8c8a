-- One row per completed rollup of a day: when it started reading plays_minute (server
-- clock) and the version it wrote to plays_daily.
CREATE TABLE IF NOT EXISTS rollup_log
(
    day        Date,
    version    UInt64,
    started_at DateTime,
    rows       UInt64
)
ENGINE = MergeTree
PARTITION BY toYYYYMMDD(day)
ORDER BY (day, started_at);
