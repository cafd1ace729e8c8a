//! Which users have plays in the window (ClickHouse reads): the warm-up's pages, and a
//! refresher's catch-up of a touches partition whose touches it cannot read any more.

use clickhouse::Client;

use topk::window::Window;

/// A touches partition: the users with `user_id % of == index`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserShard {
    pub index: i32,
    pub of: u32,
}

/// Up to `limit` users with plays in `window` whose id is greater than `after` (all users
/// when `None`), ascending, of `shard` only when given: the warm-up's and the catch-up's pages.
/// The `user_id > …` bound uses the primary key.
pub async fn users_page(
    client: &Client,
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
    client
        .query(&format!(
            "SELECT DISTINCT user_id FROM plays_minute \
             WHERE minute >= toDateTime({start}) AND minute < toDateTime({end}) {after} \
             ORDER BY user_id LIMIT {limit}"
        ))
        .fetch_all()
        .await
}

/// Approximate number of users with plays in `window` (the warm-up's progress bar length).
pub async fn users_estimate(
    client: &Client,
    window: Window,
) -> Result<u64, clickhouse::error::Error> {
    let (start, end) = (window.start, window.end);
    client
        .query(&format!(
            "SELECT toUInt64(uniq(user_id)) FROM plays_minute \
             WHERE minute >= toDateTime({start}) AND minute < toDateTime({end})"
        ))
        .fetch_one()
        .await
}
