-- One row per (flush, UTC day it wrote counts for), written by the aggregator *after* the
-- counts, with the server's clock. A day whose latest touch is not older than its latest
-- rollup start is dirty: queries read it from plays_minute until it is rolled up again.
CREATE TABLE IF NOT EXISTS day_touches
(
    day        Date,
    touched_at DateTime DEFAULT now()
)
ENGINE = MergeTree
PARTITION BY toYYYYMMDD(day)
ORDER BY (day, touched_at);
