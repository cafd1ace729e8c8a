-- Every day is a UTC day whatever the server's timezone (issue 16, item 9). `toYYYYMMDD(minute)`
-- of 001 and `toYYYYMMDD(touched_at)` of 006 evaluate in the server's timezone: on a server not in
-- UTC a day partition then holds hours of two UTC days, and prune's `DROP PARTITION` and
-- backfill's `REPLACE PARTITION <YYYYMMDD>` (both address UTC days) drop or replace hours of the
-- neighbouring day. ClickHouse cannot change a partition key, nor ALTER a key column to
-- `DateTime('UTC')` (18.16: "trying to ALTER key column"), so each table is rebuilt with an
-- explicit UTC key: a copy, then one atomic RENAME that swaps the copy in, then the old table
-- is dropped. On a new database both tables are still empty and this costs nothing.
--
-- Run with no writer (as `topk migrate` is, before every role starts): a row written between
-- the copy and the RENAME would stay behind in the old table.
--
-- Idempotent when interrupted anywhere: the first statement drops an old table only a
-- completed RENAME leaves (its rows are all in the copy that replaced it); a copy interrupted
-- half-way is refilled, and the rows it holds twice collapse (plays_minute: identical rows
-- under the full ReplacingMergeTree key; user_touches: a touch read twice only recomputes a
-- user once more, as a replayed flush does).
DROP TABLE IF EXISTS plays_minute_server_tz;
CREATE TABLE IF NOT EXISTS plays_minute_utc
(
    user_id  UInt64,
    song_id  UInt64,
    minute   DateTime,
    plays    UInt64,
    batch_id UInt64
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMMDD(minute, 'UTC')
ORDER BY (user_id, song_id, minute, batch_id)
SETTINGS index_granularity = 1024;
INSERT INTO plays_minute_utc (user_id, song_id, minute, plays, batch_id)
SELECT user_id, song_id, minute, plays, batch_id FROM plays_minute;
RENAME TABLE plays_minute TO plays_minute_server_tz, plays_minute_utc TO plays_minute;
DROP TABLE IF EXISTS plays_minute_server_tz;

DROP TABLE IF EXISTS user_touches_server_tz;
CREATE TABLE IF NOT EXISTS user_touches_utc
(
    user_id    UInt64,
    touched_at DateTime DEFAULT now()
)
ENGINE = MergeTree
PARTITION BY toYYYYMMDD(touched_at, 'UTC')
ORDER BY touched_at;
INSERT INTO user_touches_utc (user_id, touched_at)
SELECT user_id, touched_at FROM user_touches;
RENAME TABLE user_touches TO user_touches_server_tz, user_touches_utc TO user_touches;
DROP TABLE IF EXISTS user_touches_server_tz;
