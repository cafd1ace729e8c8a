//! Plays written straight into ClickHouse (no Kafka) and the oracle that ranks them
//! independently of the query module: for tests of what reads `plays_minute`.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};

use topk::counting::batch::Batch;
use topk::window::{RankedSong, Window, rank};
use topk_aggregator::store::Store;

pub const MINUTE: i64 = 60_000;
pub const DAY: i64 = 24 * 60 * MINUTE;

/// One play: who, what, when (ms since the epoch).
#[derive(Debug, Clone, Copy)]
pub struct Play {
    pub user: u64,
    pub song: u64,
    pub ts: i64,
}

/// The oracle: count the plays whose minute lies in the window, rank, cut.
pub fn oracle(plays: &[Play], window: Window, limit: usize) -> BTreeMap<u64, Vec<RankedSong>> {
    let mut counts: HashMap<u64, HashMap<u64, u64>> = HashMap::new();
    for play in plays {
        let minute = (play.ts.div_euclid(MINUTE) * 60) as u32;
        if window.contains(minute) {
            *counts
                .entry(play.user)
                .or_default()
                .entry(play.song)
                .or_default() += 1;
        }
    }
    counts
        .into_iter()
        .map(|(user, songs)| (user, rank(songs.into_iter().collect(), limit)))
        .collect()
}

/// A flush batch of `plays` covering the offsets `[start, start + plays)`, counted per
/// (user, song, minute) as the aggregator counts them.
pub fn batch(plays: &[Play], start: u64) -> Batch {
    let mut batch = Batch::open(0, start, start as i64, None);
    batch.end_offset = start + plays.len() as u64;
    for play in plays {
        let minute = (play.ts.div_euclid(MINUTE) * 60) as u32;
        *batch
            .counts
            .entry((play.user, play.song, minute))
            .or_insert(0) += 1;
    }
    batch
}

/// Writes plays' counts exactly as the aggregator's flush does: counts, then day touches
/// (publishing the users' touches is the caller's business: most tests drive no refresher).
pub async fn flush(store: &Store, plays: &[Play], first_offset: u64) {
    let batch = batch(plays, first_offset);
    store.write_counts(&[&batch]).await.expect("counts");
    store.write_touches(&[&batch]).await.expect("day touches");
}

/// Every user's exact answer from plays per (user, song): ranked and cut as the API answers
/// at its largest limit.
pub fn ranked(
    totals: impl IntoIterator<Item = ((u64, u64), u64)>,
) -> BTreeMap<u64, Vec<RankedSong>> {
    let mut per_user: BTreeMap<u64, Vec<(u64, u64)>> = BTreeMap::new();
    for ((user, song), plays) in totals {
        per_user.entry(user).or_default().push((song, plays));
    }
    per_user
        .into_iter()
        .map(|(user, plays)| (user, rank(plays, topk::window::MAX_LIMIT)))
        .collect()
}

/// Every user with at least one row in `plays_minute` inside `window`, ascending (every
/// shard's on a cluster).
pub async fn users_in_window(olap: impl Into<topk::olap::Olap>, window: Window) -> Vec<u64> {
    let (start, end) = (window.start, window.end);
    let mut users = Vec::new();
    for shard in olap.into().shards() {
        users.extend(
            shard
                .query(&format!(
                    "SELECT DISTINCT user_id FROM plays_minute \
                     WHERE minute >= toDateTime({start}) AND minute < toDateTime({end})"
                ))
                .fetch_all::<u64>()
                .await
                .expect("users in window"),
        );
    }
    users.sort_unstable();
    users
}
