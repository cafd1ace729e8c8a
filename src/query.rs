//! The one query module: exact top-K over the rolling window from ClickHouse, for one user or
//! a batch of users in one round trip. Used by the API's fallback, the refresher and
//! `topk top --fresh`.
//!
//! Exactness: days entirely inside the window are read from `plays_daily` when they are clean
//! (rolled up after the last flush that touched them); every other minute of the window (the
//! partial first and last day, and dirty days) comes from `plays_minute`. Both tables are read
//! with FINAL, which collapses replayed flushes and re-run rollups, and a clean day only in rows
//! of its certified rollup version or newer, so a key an older rollup still holds but the
//! minutes no longer do is not counted (ARCHITECTURE.md). Nothing is truncated: every song of
//! the user in the window takes part in the ranking.
//!
//! Every answer also says when it next changes without new plays (`Computed::changes_at`): the
//! instant the oldest play of a returned song leaves the window, or a play already stored ahead
//! of the window enters it, whichever comes first. The refresher recomputes the user then instead
//! of scanning for minutes that left the window.
//!
//! SQL is assembled only from integers and from dates formatted here, never from request text.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};

use clickhouse::Row;
use serde::Deserialize;

use crate::event::WINDOW_MINUTES;
use crate::olap::Olap;
use crate::olap::tables::date_literal;
use crate::window::{DAY_SECS, RankedSong, Window, rank};

/// How long a minute stays in the window: minute `m` leaves it at `m + WINDOW_SECS`.
const WINDOW_SECS: u32 = (WINDOW_MINUTES * 60) as u32;

/// Errors of the query module.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("ClickHouse query failed")]
    ClickHouse(#[from] clickhouse::error::Error),
}

/// One user's computed answer and when it next changes without new plays.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Computed {
    pub songs: Vec<RankedSong>,
    /// Seconds since the epoch: the earliest instant `t` at which `Window::at(t)` may give
    /// another answer with no new plays, later than the `now` of the window it was computed
    /// for; `None` when nothing stored can change it (no plays in the window or ahead of it).
    /// Early rather than late: a clean day's plays are dated from the day's start.
    pub changes_at: Option<u32>,
}

/// A row of the answer query: either a (user, song) total of the window with the oldest minute
/// it has plays in (`future == 0`), or a user's first minute with plays ahead of the window
/// (`future == 1`, in `oldest`; song and plays are 0).
#[derive(Debug, Row, Deserialize)]
struct AnswerRow {
    user_id: u64,
    song_id: u64,
    plays: u64,
    oldest: u32,
    future: u8,
}

/// What the answer query returned for one user, before ranking.
#[derive(Debug, Default)]
struct UserRows {
    /// (song, plays) of the user's top songs (the query already cut them at `limit`).
    plays: Vec<(u64, u64)>,
    /// The oldest minute (or clean day start) with plays of each of those songs.
    oldest: HashMap<u64, u32>,
    /// The first minute with plays ahead of the window, of any song.
    first_future: Option<u32>,
}

/// When an answer next changes without new plays, from `oldest_top`, the oldest minute with
/// plays of the answer's songs (or the start of the clean day holding it), and
/// `first_future`, the first minute with plays at or after the window's end. The oldest minute
/// `m` leaves at `m + WINDOW_SECS` (`Window::at` then starts at `m + 60`), which takes plays
/// from a returned song; a minute `f` ahead enters at `f` (`Window::at(f)` ends at `f + 60`),
/// which may lift any song into the answer. Songs outside the answer losing plays cannot
/// change it, so their minutes do not count.
fn changes_at(oldest_top: Option<u32>, first_future: Option<u32>) -> Option<u32> {
    let leaves = oldest_top.map(|minute| minute.saturating_add(WINDOW_SECS));
    leaves.into_iter().chain(first_future).min()
}

fn date_list(days: &[u32]) -> String {
    days.iter()
        .map(|&d| date_literal(d))
        .collect::<Vec<_>>()
        .join(", ")
}

fn id_list(ids: &[u64]) -> String {
    let mut out = String::with_capacity(ids.len() * 8);
    for (i, id) in ids.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        let _ = write!(out, "{id}");
    }
    out
}

/// A full day answered by its daily rollup, and the rollup version that makes it clean.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Row, Deserialize)]
pub struct CleanDay {
    /// Start of the UTC day, seconds since the epoch.
    pub day: u32,
    pub version: u64,
}

/// The exact top-K query.
#[derive(Clone)]
pub struct TopQuery {
    olap: Olap,
    /// Clean days found by the latest lookup, the guess for the next query (shared by clones).
    last_clean: Arc<Mutex<Vec<CleanDay>>>,
}

impl std::fmt::Debug for TopQuery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TopQuery")
    }
}

impl TopQuery {
    /// The query over `olap`'s tables (a `Client` is a single server).
    pub fn new(olap: impl Into<Olap>) -> Self {
        TopQuery {
            olap: olap.into(),
            last_clean: Arc::default(),
        }
    }

    /// Full days of `window` whose daily rollup is current, with the version of that rollup:
    /// the latest rollup of the day (highest version, the rows FINAL shows) started after every
    /// flush that touched the day. Ascending. One scan over both small logs: a UNION ALL with
    /// GROUP BY costs a third less than joining them on ClickHouse 18.16.
    pub async fn clean_days(&self, window: Window) -> Result<Vec<CleanDay>, QueryError> {
        let days: Vec<u32> = window.full_days().collect();
        let (Some(&first), Some(&last)) = (days.first(), days.last()) else {
            return Ok(Vec::new());
        };
        let (first, last) = (date_literal(first), date_literal(last));
        let sql = format!(
            "SELECT toUInt32(toDateTime(day, 'UTC')) AS day_start, max(v) AS version FROM \
               (SELECT day, version AS v, started_at AS rolled, toDateTime(0) AS touched \
                FROM rollup_log WHERE day >= {first} AND day <= {last} \
                UNION ALL \
                SELECT day, toUInt64(0), toDateTime(0), touched_at \
                FROM day_touches WHERE day >= {first} AND day <= {last}) \
             GROUP BY day HAVING max(touched) < argMax(rolled, v) ORDER BY day_start"
        );
        Ok(self.olap.meta().query(&sql).fetch_all::<CleanDay>().await?)
    }

    /// The inner SELECT of (user_id, song_id, n, at) rows of the window for the users in
    /// `users_sql`, `n` plays at `at` (seconds: the minute, or a clean day's start, the earliest
    /// minute its plays can be in): clean days from `plays_daily`, every other minute from
    /// `plays_minute`. The columns are not named `plays` and `oldest` because the outer query
    /// gives those names to its aggregates, and ClickHouse would substitute them inside. The
    /// minute rows are selected by explicit time ranges so ClickHouse prunes the day partitions
    /// the rollup answers (a `NOT IN` on the day would read them all).
    ///
    /// A clean day is read only from rows of its certified rollup version or newer: a key that
    /// vanished from the minute rows before that rollup (a backfill's `REPLACE`, a prune, an
    /// erasure) has no row in it, and `FINAL` would otherwise still show the key's row from an
    /// older rollup (ReplacingMergeTree never deletes a key). With the filter a rolled-up day
    /// reads exactly as its minute rows did when the rollup started (ARCHITECTURE.md).
    fn window_rows_sql(window: Window, clean: &[CleanDay], users_sql: &str) -> String {
        let clean_days: Vec<u32> = clean.iter().map(|c| c.day).collect();
        let mut parts = Vec::with_capacity(2);
        if !clean.is_empty() {
            let days = date_list(&clean_days);
            let versions = clean
                .iter()
                .map(|c| {
                    format!(
                        "(day = {} AND version >= {})",
                        date_literal(c.day),
                        c.version
                    )
                })
                .collect::<Vec<_>>()
                .join(" OR ");
            // `day IN` as well as the per-day versions: the key condition prunes with it.
            parts.push(format!(
                "SELECT user_id, song_id, plays AS n, toUInt32(toDateTime(day, 'UTC')) AS at \
                 FROM plays_daily FINAL \
                 WHERE user_id IN ({users_sql}) AND day IN ({days}) AND ({versions})"
            ));
        }
        let ranges = minute_ranges(window, &clean_days);
        // At 23:59 UTC the window is exactly seven full days: when all of them are clean there
        // is no minute left to read, and an empty `AND ()` would be invalid SQL.
        if !ranges.is_empty() || parts.is_empty() {
            let ranges = ranges
                .iter()
                .map(|(from, to)| {
                    format!("(minute >= toDateTime({from}) AND minute < toDateTime({to}))")
                })
                .collect::<Vec<_>>();
            // Only for an empty window (never built by `Window::at`): a valid query of no rows.
            let ranges = if ranges.is_empty() {
                "0".to_owned()
            } else {
                ranges.join(" OR ")
            };
            parts.push(format!(
                "SELECT user_id, song_id, plays AS n, toUInt32(minute) AS at \
                 FROM plays_minute FINAL \
                 WHERE user_id IN ({users_sql}) AND ({ranges})"
            ));
        }
        parts.join(" UNION ALL ")
    }

    /// The answer SQL: each user's top `limit` (user, song) totals over the window's rows with
    /// the oldest minute each has plays in, then one row per user with plays ahead of the window
    /// holding the first such minute. One round trip. The part ahead reads without FINAL: a
    /// replayed row does not change a minimum. UNION ALL on ClickHouse 18.16 needs identical
    /// column types, hence the casts; the top part is wrapped so that its ORDER BY and LIMIT BY
    /// bind to it alone on every server version.
    fn answers_sql(window: Window, clean_days: &[CleanDay], users: &[u64], limit: usize) -> String {
        let users_sql = id_list(users);
        let inner = Self::window_rows_sql(window, clean_days, &users_sql);
        let end = window.end;
        format!(
            "SELECT user_id, song_id, plays, oldest, future FROM \
               (SELECT user_id, song_id, sum(n) AS plays, minIf(at, n > 0) AS oldest, \
                  toUInt8(0) AS future \
                FROM ({inner}) \
                GROUP BY user_id, song_id \
                ORDER BY user_id ASC, plays DESC, song_id ASC LIMIT {limit} BY user_id) \
             UNION ALL \
             SELECT user_id, toUInt64(0), toUInt64(0), toUInt32(min(minute)), toUInt8(1) \
             FROM plays_minute WHERE user_id IN ({users_sql}) AND minute >= toDateTime({end}) \
             GROUP BY user_id"
        )
    }

    /// Top `limit` songs of one user in `window`.
    pub async fn top_for_user(
        &self,
        user_id: u64,
        window: Window,
        limit: usize,
    ) -> Result<Vec<RankedSong>, QueryError> {
        let mut answers = self.top_for_users(&[user_id], window, limit).await?;
        Ok(answers.remove(&user_id).unwrap_or_default())
    }

    /// Top `limit` songs of each of `users` in `window`, in one round trip. Users without plays
    /// in the window map to an empty list.
    pub async fn top_for_users(
        &self,
        users: &[u64],
        window: Window,
        limit: usize,
    ) -> Result<HashMap<u64, Vec<RankedSong>>, QueryError> {
        let answers = self.answers_for_users(users, window, limit).await?;
        Ok(answers
            .into_iter()
            .map(|(user, computed)| (user, computed.songs))
            .collect())
    }

    /// Top `limit` songs of each of `users` in `window` and when each answer next changes
    /// without new plays, in one round trip. Every user is in the map; users without plays in
    /// the window have no songs.
    pub async fn answers_for_users(
        &self,
        users: &[u64],
        window: Window,
        limit: usize,
    ) -> Result<HashMap<u64, Computed>, QueryError> {
        let mut answers: HashMap<u64, Computed> =
            users.iter().map(|&u| (u, Computed::default())).collect();
        if users.is_empty() {
            return Ok(answers);
        }
        // The clean-days lookup and the main query run side by side: the main query assumes
        // the clean days (and their rollup versions) of the previous lookup. If the lookup
        // confirms exactly those, the answer is what a lookup-then-query would have given;
        // otherwise the query runs again with what was just found. Latency is the longer of
        // the two round trips instead of their sum. Why that is exact: ARCHITECTURE.md.
        let assumed = self.assumed_clean_days(window);
        let (clean, rows) = tokio::try_join!(
            self.clean_days(window),
            self.fetch_rows(window, &assumed, users, limit)
        )?;
        let rows = if clean == assumed {
            rows
        } else {
            self.fetch_rows(window, &clean, users, limit).await?
        };
        if let Ok(mut last) = self.last_clean.lock() {
            *last = clean;
        }
        let mut grouped: HashMap<u64, UserRows> = HashMap::new();
        for row in rows {
            let user = grouped.entry(row.user_id).or_default();
            if row.future == 0 {
                user.plays.push((row.song_id, row.plays));
                user.oldest.insert(row.song_id, row.oldest);
            } else {
                user.first_future = Some(row.oldest);
            }
        }
        for (user, rows) in grouped {
            let songs = rank(rows.plays, limit);
            let oldest_top = songs
                .iter()
                .filter_map(|song| rows.oldest.get(&song.song_id).copied())
                .min();
            let changes_at = changes_at(oldest_top, rows.first_future);
            answers.insert(user, Computed { songs, changes_at });
        }
        Ok(answers)
    }

    async fn fetch_rows(
        &self,
        window: Window,
        clean_days: &[CleanDay],
        users: &[u64],
        limit: usize,
    ) -> Result<Vec<AnswerRow>, QueryError> {
        // Every row of a user is on the user's shard: each shard answers for its own users,
        // side by side, with the same SQL a single server runs.
        let shards = self.olap.shards();
        let queries = self
            .olap
            .by_shard(users.iter().copied(), |&user| user)
            .into_iter()
            .enumerate()
            .filter(|(_, users)| !users.is_empty())
            .map(|(shard, users)| {
                let sql = Self::answers_sql(window, clean_days, &users, limit);
                let client = &shards[shard];
                async move { client.query(&sql).fetch_all::<AnswerRow>().await }
            });
        let rows = futures::future::try_join_all(queries).await?;
        Ok(rows.into_iter().flatten().collect())
    }

    /// The full days of `window` that were clean at the previous lookup.
    fn assumed_clean_days(&self, window: Window) -> Vec<CleanDay> {
        let Ok(last) = self.last_clean.lock() else {
            return Vec::new();
        };
        let full: Vec<u32> = window.full_days().collect();
        last.iter()
            .copied()
            .filter(|c| full.contains(&c.day))
            .collect()
    }
}

/// The parts of `window` not covered by `clean_days` (ascending, inside the window), as
/// `[from, to)` second ranges with neighbours merged.
fn minute_ranges(window: Window, clean_days: &[u32]) -> Vec<(u32, u32)> {
    let mut ranges = Vec::new();
    let mut from = window.start;
    for &day in clean_days {
        if day > from {
            ranges.push((from, day));
        }
        from = from.max(day + DAY_SECS);
    }
    if from < window.end {
        ranges.push((from, window.end));
    }
    ranges
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_are_built_from_numbers_only() {
        assert_eq!(id_list(&[1, 22, 333]), "1, 22, 333");
    }

    /// Seconds to the `now_ms` of `Window::at`.
    fn at(secs: u32) -> Window {
        Window::at(i64::from(secs) * 1000)
    }

    #[test]
    fn the_answer_sql_reads_the_minutes_ahead_of_the_window_for_the_same_users() {
        let day = 1_795_910_400; // 2026-11-29 00:00 UTC
        let window = at(day + 3_600);
        let clean = [CleanDay {
            day: window.full_days().next().expect("a full day"),
            version: 5,
        }];
        let sql = TopQuery::answers_sql(window, &clean, &[7, 42], 10);
        let end = window.end;
        assert!(
            sql.ends_with(&format!(
                " UNION ALL SELECT user_id, toUInt64(0), toUInt64(0), toUInt32(min(minute)), \
                 toUInt8(1) FROM plays_minute WHERE user_id IN (7, 42) \
                 AND minute >= toDateTime({end}) GROUP BY user_id"
            )),
            "{sql}"
        );
        assert_eq!(
            sql.matches("user_id IN (7, 42)").count(),
            3,
            "the rollup, the minutes and the part ahead: {sql}"
        );
        assert!(sql.contains("minIf(at, n > 0) AS oldest"), "{sql}");
        assert!(
            sql.contains("toUInt32(toDateTime(day, 'UTC')) AS at FROM plays_daily FINAL"),
            "{sql}"
        );
        assert!(
            sql.contains("toUInt32(minute) AS at FROM plays_minute FINAL"),
            "{sql}"
        );
        assert!(sql.contains("LIMIT 10 BY user_id)"), "{sql}");
    }

    #[test]
    fn the_oldest_minute_of_the_answer_leaves_seven_days_later() {
        let window = at(1_795_975_230); // 2026-11-29T18:00:30Z
        let oldest = window.start;
        let changes = changes_at(Some(oldest), None).expect("a minute leaves");
        assert_eq!(changes, window.start + 7 * DAY_SECS);
        assert_eq!(
            changes, window.end,
            "the first minute leaves as the next one starts"
        );
        assert_eq!(at(changes).start, oldest + 60);
        assert!(!at(changes).contains(oldest));
        assert!(at(changes - 1).contains(oldest));
        assert_eq!(at(changes - 1), window, "nothing leaves before");
        // The current minute, the newest one a minute row of the window can have.
        let newest = window.end - 60;
        let changes = changes_at(Some(newest), None).expect("a minute leaves");
        assert_eq!(changes, newest + 10_080 * 60);
        assert!(at(changes).start > newest && at(changes - 1).start <= newest);
    }

    #[test]
    fn a_minute_ahead_enters_when_it_becomes_the_current_minute() {
        let window = at(1_795_975_230);
        for ahead in [window.end, window.end + 4 * 60] {
            let changes = changes_at(None, Some(ahead)).expect("a minute enters");
            assert_eq!(changes, ahead);
            assert!(at(changes).contains(ahead));
            assert!(!at(changes - 1).contains(ahead));
        }
    }

    #[test]
    fn the_answer_changes_at_the_earlier_of_leaving_and_entering() {
        let window = at(1_795_975_230);
        let oldest = window.start + 120;
        let leaves = oldest + 7 * DAY_SECS;
        assert_eq!(changes_at(Some(oldest), Some(leaves + 60)), Some(leaves));
        assert_eq!(
            changes_at(Some(oldest), Some(leaves - 60)),
            Some(leaves - 60)
        );
        assert_eq!(changes_at(Some(oldest), Some(leaves)), Some(leaves));
        assert_eq!(changes_at(None, None), None, "no plays: nothing changes it");
        // A clean day's plays are dated from its start: the day's first minute leaving is the
        // earliest any of them can, so the answer is recomputed then (early, never late).
        let day = window.full_days().next().expect("a full day");
        assert_eq!(changes_at(Some(day), None), Some(day + 7 * DAY_SECS));
        assert!(day + 7 * DAY_SECS >= window.end);
    }

    #[test]
    fn minute_ranges_cover_exactly_what_the_clean_days_do_not() {
        let day = 1_795_910_400; // 2026-11-29 00:00 UTC
        let window = Window::at(i64::from(day + 3_600) * 1000);
        let full: Vec<u32> = window.full_days().collect();
        assert_eq!(full.len(), 6);
        assert_eq!(minute_ranges(window, &[]), vec![(window.start, window.end)]);
        assert_eq!(
            minute_ranges(window, &full),
            vec![(window.start, full[0]), (day, window.end)]
        );
        // A dirty day in the middle is read from minute rows.
        let clean = [full[0], full[1], full[3], full[4], full[5]];
        assert_eq!(
            minute_ranges(window, &clean),
            vec![
                (window.start, full[0]),
                (full[2], full[3]),
                (day, window.end)
            ]
        );
    }
}
