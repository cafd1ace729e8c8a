//! Which users have plays in the window (ClickHouse reads): the warm-up's pages, and a
//! refresher's catch-up of a touches partition whose touches it cannot read any more.

use topk::olap::Olap;
use topk::window::Window;

/// A touches partition: the users with `user_id % of == index`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserShard {
    pub index: i32,
    pub of: u32,
}

/// Up to `limit` users with plays in `window` whose id is greater than `after` (all users
/// when `None`), ascending, of `shard` only when given: the warm-up's and the catch-up's pages.
/// The `user_id > …` bound uses the primary key. On a cluster every shard gives its first
/// `limit` and the page is the first `limit` of their union: each user is on one shard.
pub async fn users_page(
    olap: &Olap,
    window: Window,
    shard: Option<UserShard>,
    after: Option<u64>,
    limit: usize,
) -> Result<Vec<u64>, clickhouse::error::Error> {
    let (start, end) = (window.start, window.end);
    let mut after = after.map_or(String::new(), |id| format!("AND user_id > {id}"));
    if let Some(UserShard { index, of }) = shard {
        after.push_str(&format!(" AND user_id % {of} = {index}"));
    }
    let sql = format!(
        "SELECT DISTINCT user_id FROM plays_minute \
         WHERE minute >= toDateTime({start}) AND minute < toDateTime({end}) {after} \
         ORDER BY user_id LIMIT {limit}"
    );
    let pages = olap
        .shards()
        .iter()
        .map(|shard| shard.query(&sql).fetch_all::<u64>());
    let mut users: Vec<u64> = futures::future::try_join_all(pages)
        .await?
        .into_iter()
        .flatten()
        .collect();
    users.sort_unstable();
    users.truncate(limit);
    Ok(users)
}

/// Approximate number of users with plays in `window` (the warm-up's progress bar length).
pub async fn users_estimate(olap: &Olap, window: Window) -> Result<u64, clickhouse::error::Error> {
    let (start, end) = (window.start, window.end);
    let sql = format!(
        "SELECT toUInt64(uniq(user_id)) FROM plays_minute \
         WHERE minute >= toDateTime({start}) AND minute < toDateTime({end})"
    );
    let counts = olap
        .shards()
        .iter()
        .map(|shard| shard.query(&sql).fetch_one::<u64>());
    Ok(futures::future::try_join_all(counts)
        .await?
        .into_iter()
        .sum())
}
