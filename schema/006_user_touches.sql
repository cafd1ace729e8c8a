-- One row per (flush, user it wrote counts for), written by the aggregator after the counts and
-- before the offset commit, with the server's clock. The refresher reads the users touched since
-- its previous cycle (minus a safety margin) and recomputes only their answers. A replayed flush
-- writes its touches again, which only makes the refresher recompute the same users once more.
-- Partitioned by day of `touched_at` so that retention drops whole days; ordered by `touched_at`
-- because every read is a range of recent seconds.
CREATE TABLE IF NOT EXISTS user_touches
(
    user_id    UInt64,
    touched_at DateTime DEFAULT now()
)
ENGINE = MergeTree
PARTITION BY toYYYYMMDD(touched_at)
ORDER BY touched_at;
