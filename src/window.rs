//! The rolling window and the answer: the contracts of docs/contracts.md ("The window",
//! "The answer").
//!
//! The window is the 10,080 one-minute UTC buckets ending with the current minute:
//! `[current minute − 10,079 min, current minute + 1 min)`. Days are UTC days.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::event::{MINUTE_MS, WINDOW_MINUTES};

/// Seconds in a UTC day.
pub const DAY_SECS: u32 = 86_400;
/// Default and largest `limit` of an answer.
pub const DEFAULT_LIMIT: usize = 10;
pub const MAX_LIMIT: usize = 50;

/// A window of whole minutes, `[start, end)`, in seconds since the epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Window {
    pub start: u32,
    pub end: u32,
}

impl Window {
    /// The window that is current at `now_ms`.
    pub fn at(now_ms: i64) -> Self {
        let current_minute = now_ms.div_euclid(MINUTE_MS) * MINUTE_MS;
        let end = (current_minute + MINUTE_MS) / 1000;
        let start = end - WINDOW_MINUTES * 60;
        Window {
            start: to_u32(start),
            end: to_u32(end),
        }
    }

    /// Whether the minute starting at `minute` (seconds) lies inside.
    pub fn contains(&self, minute: u32) -> bool {
        self.start <= minute && minute < self.end
    }

    /// The UTC days (start of day, seconds) entirely inside the window.
    pub fn full_days(&self) -> impl Iterator<Item = u32> {
        let first = self.start.div_ceil(DAY_SECS) * DAY_SECS;
        let end = self.end;
        (first..end)
            .step_by(DAY_SECS as usize)
            .filter(move |day| day + DAY_SECS <= end)
    }

    pub fn start_rfc3339(&self) -> String {
        rfc3339(self.start)
    }

    pub fn end_rfc3339(&self) -> String {
        rfc3339(self.end)
    }
}

fn to_u32(secs: i64) -> u32 {
    u32::try_from(secs.max(0)).unwrap_or(u32::MAX)
}

/// RFC 3339 (UTC, `Z`) of a time in seconds since the epoch.
pub fn rfc3339(secs: u32) -> String {
    OffsetDateTime::from_unix_timestamp(i64::from(secs))
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_default()
}

/// RFC 3339 of a time in milliseconds, to the second.
pub fn rfc3339_ms(ms: i64) -> String {
    rfc3339(to_u32(ms.div_euclid(1000)))
}

/// One ranked song. On the wire it is a [`RankedSongJson`]: the id also as a decimal string.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct RankedSong {
    pub rank: u32,
    pub song_id: u64,
    pub plays: u64,
}

/// The JSON of one ranked song. Ids are u64, but a JavaScript client (the widget, any browser
/// app) parses JSON numbers as doubles, exact only up to 2^53: 2^53 + 1 would read as 2^53, so
/// two songs could show one id. `song_id_str` is the same id in decimal, exact for every client.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[schema(as = RankedSong)]
pub struct RankedSongJson {
    pub rank: u32,
    pub song_id: u64,
    /// `song_id` in decimal: exact for clients whose numbers are doubles (JavaScript).
    #[schema(example = "9007199254740993")]
    pub song_id_str: String,
    pub plays: u64,
}

impl Serialize for RankedSong {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        RankedSongJson {
            rank: self.rank,
            song_id: self.song_id,
            song_id_str: self.song_id.to_string(),
            plays: self.plays,
        }
        .serialize(serializer)
    }
}

/// Ranks (song, plays) pairs: plays descending, ties by song_id ascending, at most `limit`.
pub fn rank(mut plays: Vec<(u64, u64)>, limit: usize) -> Vec<RankedSong> {
    plays.retain(|&(_, n)| n > 0);
    plays.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    plays
        .into_iter()
        .take(limit)
        .enumerate()
        .map(|(i, (song_id, plays))| RankedSong {
            rank: i as u32 + 1,
            song_id,
            plays,
        })
        .collect()
}

/// Where an answer came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// Redis, as materialised by the refresher.
    Cache,
    /// Computed from ClickHouse for this request.
    Olap,
}

/// The window as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[schema(as = Window)]
pub struct WindowJson {
    pub start: String,
    pub end: String,
}

/// The API's answer (docs/contracts.md, "REST API").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TopSongs {
    pub user_id: u64,
    /// `user_id` in decimal: exact for clients whose numbers are doubles (JavaScript), which
    /// round ids above 2^53.
    #[schema(example = "42")]
    pub user_id_str: String,
    pub window: WindowJson,
    pub computed_at: String,
    pub source: Source,
    pub stale: bool,
    #[schema(value_type = Vec<RankedSongJson>)]
    pub songs: Vec<RankedSong>,
}

impl TopSongs {
    pub fn new(
        user_id: u64,
        window: Window,
        computed_at_ms: i64,
        source: Source,
        songs: Vec<RankedSong>,
    ) -> Self {
        TopSongs {
            user_id,
            user_id_str: user_id.to_string(),
            window: WindowJson {
                start: window.start_rfc3339(),
                end: window.end_rfc3339(),
            },
            computed_at: rfc3339_ms(computed_at_ms),
            source,
            stale: false,
            songs,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_is_10080_minutes_ending_with_the_current_one() {
        // 2026-11-29T18:00:30Z, as in the example of docs/contracts.md.
        let now = 1_795_975_230_000;
        let window = Window::at(now);
        assert_eq!(window.end - window.start, 10_080 * 60);
        assert_eq!(window.start_rfc3339(), "2026-11-22T18:01:00Z");
        assert_eq!(window.end_rfc3339(), "2026-11-29T18:01:00Z");
        assert!(window.contains(window.start));
        assert!(
            window.contains(window.end - 60),
            "the current minute counts"
        );
        assert!(!window.contains(window.start - 60));
        assert!(!window.contains(window.end));
    }

    #[test]
    fn full_days_are_the_days_entirely_inside() {
        let window = Window::at(1_795_975_230_000);
        let days: Vec<String> = window.full_days().map(rfc3339).collect();
        assert_eq!(
            days,
            [
                "2026-11-23T00:00:00Z",
                "2026-11-24T00:00:00Z",
                "2026-11-25T00:00:00Z",
                "2026-11-26T00:00:00Z",
                "2026-11-27T00:00:00Z",
                "2026-11-28T00:00:00Z",
            ]
        );
        // At 23:59 the window starts at 00:00 six days ago: that day is full too.
        let late = Window::at(1_795_996_799_000);
        assert_eq!(late.full_days().count(), 7);
    }

    #[test]
    fn ranking_is_plays_desc_then_song_asc() {
        let ranked = rank(vec![(9, 3), (2, 5), (4, 3), (7, 0), (1, 1)], 3);
        let ids: Vec<(u32, u64, u64)> = ranked
            .iter()
            .map(|s| (s.rank, s.song_id, s.plays))
            .collect();
        assert_eq!(ids, [(1, 2, 5), (2, 4, 3), (3, 9, 3)]);
    }
}
