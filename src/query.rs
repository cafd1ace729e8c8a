//! The one query module: exact top-K over the rolling window from ClickHouse, for one user or
//! a batch of users in one round trip. Used by the API's fallback, the refresher and
//! `topk top --fresh`.
//!
//! Exactness: days entirely inside the window are read from `plays_daily` when they are clean
//! (rolled up after the last flush that touched them); every other minute of the window (the
//! partial first and last day, and dirty days) comes from `plays_minute`. Both tables are read
//! with FINAL, which collapses replayed flushes and re-run rollups (ARCHITECTURE.md). Nothing is
//! truncated: every song of the user in the window takes part in the ranking.
//!
//! SQL is assembled only from integers and from dates formatted here, never from request text.

use std::collections::HashMap;
use std::fmt::Write as _;

use clickhouse::{Client, Row};
use serde::Deserialize;

use crate::window::{DAY_SECS, RankedSong, Window, rank};

/// Errors of the query module.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("ClickHouse query failed: {0}")]
    ClickHouse(#[from] clickhouse::error::Error),
}

#[derive(Debug, Row, Deserialize)]
struct UserSongPlays {
    user_id: u64,
    song_id: u64,
    plays: u64,
}

/// `'YYYY-MM-DD'` of a day start (seconds since the epoch).
pub fn date_literal(day: u32) -> String {
    let date = time::OffsetDateTime::from_unix_timestamp(i64::from(day)).map(|t| t.date());
    match date {
        Ok(d) => format!(
            "'{:04}-{:02}-{:02}'",
            d.year(),
            u8::from(d.month()),
            d.day()
        ),
        Err(_) => "'1970-01-01'".to_owned(),
    }
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

/// The exact top-K query.
#[derive(Clone)]
pub struct TopQuery {
    client: Client,
}

impl std::fmt::Debug for TopQuery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TopQuery")
    }
}

impl TopQuery {
    pub fn new(client: Client) -> Self {
        TopQuery { client }
    }

    /// Full days of `window` whose daily rollup is current (no flush touched the day after the
    /// start of its latest rollup). Ascending.
    pub async fn clean_days(&self, window: Window) -> Result<Vec<u32>, QueryError> {
        let days: Vec<u32> = window.full_days().collect();
        let (Some(&first), Some(&last)) = (days.first(), days.last()) else {
            return Ok(Vec::new());
        };
        let (first, last) = (date_literal(first), date_literal(last));
        let sql = format!(
            "SELECT toUInt32(toDateTime(day)) AS day_start FROM \
               (SELECT day, max(started_at) AS rolled FROM rollup_log \
                WHERE day >= {first} AND day <= {last} GROUP BY day) \
             ANY LEFT JOIN \
               (SELECT day, max(touched_at) AS touched FROM day_touches \
                WHERE day >= {first} AND day <= {last} GROUP BY day) \
             USING day \
             WHERE touched < rolled ORDER BY day_start"
        );
        Ok(self.client.query(&sql).fetch_all::<u32>().await?)
    }

    /// The inner SELECT of (user, song, plays) rows of the window for the users in `users_sql`.
    fn window_rows_sql(window: Window, clean_days: &[u32], users_sql: &str) -> String {
        let (start, end) = (window.start, window.end);
        let minutes = format!(
            "SELECT user_id, song_id, plays FROM plays_minute FINAL \
             WHERE user_id IN ({users_sql}) \
               AND minute >= toDateTime({start}) AND minute < toDateTime({end})"
        );
        if clean_days.is_empty() {
            return minutes;
        }
        let days = date_list(clean_days);
        format!(
            "SELECT user_id, song_id, plays FROM plays_daily FINAL \
             WHERE user_id IN ({users_sql}) AND day IN ({days}) \
             UNION ALL \
             {minutes} AND toDate(minute) NOT IN ({days})"
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
        let mut answers: HashMap<u64, Vec<RankedSong>> =
            users.iter().map(|&u| (u, Vec::new())).collect();
        if users.is_empty() {
            return Ok(answers);
        }
        let clean = self.clean_days(window).await?;
        let inner = Self::window_rows_sql(window, &clean, &id_list(users));
        let sql = format!(
            "SELECT user_id, song_id, sum(plays) AS plays FROM ({inner}) \
             GROUP BY user_id, song_id \
             ORDER BY user_id ASC, plays DESC, song_id ASC LIMIT {limit} BY user_id"
        );
        let rows: Vec<UserSongPlays> = self.client.query(&sql).fetch_all().await?;
        let mut grouped: HashMap<u64, Vec<(u64, u64)>> = HashMap::new();
        for row in rows {
            grouped
                .entry(row.user_id)
                .or_default()
                .push((row.song_id, row.plays));
        }
        for (user, plays) in grouped {
            answers.insert(user, rank(plays, limit));
        }
        Ok(answers)
    }

    /// Every user with at least one play in `window`, ascending (for warm-up).
    pub async fn users_in_window(&self, window: Window) -> Result<Vec<u64>, QueryError> {
        let (start, end) = (window.start, window.end);
        let sql = format!(
            "SELECT DISTINCT user_id FROM plays_minute \
             WHERE minute >= toDateTime({start}) AND minute < toDateTime({end}) ORDER BY user_id"
        );
        Ok(self.client.query(&sql).fetch_all::<u64>().await?)
    }
}

/// Start of the UTC day containing `secs`.
pub fn day_of(secs: u32) -> u32 {
    secs - secs % DAY_SECS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_are_built_from_numbers_only() {
        assert_eq!(date_literal(1_795_910_400), "'2026-11-29'");
        assert_eq!(id_list(&[1, 22, 333]), "1, 22, 333");
        assert_eq!(day_of(1_795_975_230), 1_795_910_400);
    }
}
