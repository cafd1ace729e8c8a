//! Which users' answers may have changed since the previous cycle (ClickHouse reads).
//!
//! - *Touched*: the aggregator writes a `user_touches` row (server clock) for every user of a
//!   flush, after the counts and before the offset commit. Rows become visible when their insert
//!   finishes, which can be later than `touched_at`, so each read overlaps the previous one by a
//!   safety margin.
//! - *Moved*: as the window slides from `[s₀, e₀)` to `[s₁, e₁)`, the minutes `[s₀, s₁)` leave
//!   it and the minutes `[e₀, e₁)` enter it (plays up to 5 minutes in the future are accepted
//!   and only count once their minute is reached). The users with a row in those minutes are
//!   exactly the users whose window gained or lost plays without a new flush.

use clickhouse::Client;

use topk::window::Window;

/// The server's clock, seconds since the epoch: the cursor of the touched-users read.
pub async fn server_now(client: &Client) -> Result<u32, clickhouse::error::Error> {
    client
        .query("SELECT toUInt32(now())")
        .fetch_one::<u32>()
        .await
}

/// Users with a touch at or after `since` (server seconds).
pub async fn touched_since(
    client: &Client,
    since: u32,
) -> Result<Vec<u64>, clickhouse::error::Error> {
    client
        .query(&format!(
            "SELECT DISTINCT user_id FROM user_touches WHERE touched_at >= toDateTime({since})"
        ))
        .fetch_all()
        .await
}

/// Users with plays in the minutes that left or entered the window as it moved from
/// `previous` to `current` (nothing when it did not move forward).
pub async fn moved(
    client: &Client,
    previous: Window,
    current: Window,
) -> Result<Vec<u64>, clickhouse::error::Error> {
    if current.start <= previous.start {
        return Ok(Vec::new());
    }
    // Without FINAL: a replayed flush's duplicate rows name the same users.
    let (left_from, left_to) = (previous.start, current.start.min(previous.end));
    let (entered_from, entered_to) = (previous.end.max(current.start), current.end);
    client
        .query(&format!(
            "SELECT DISTINCT user_id FROM plays_minute \
             WHERE (minute >= toDateTime({left_from}) AND minute < toDateTime({left_to})) \
                OR (minute >= toDateTime({entered_from}) AND minute < toDateTime({entered_to}))"
        ))
        .fetch_all()
        .await
}

/// Up to `limit` users with plays in `window` whose id is greater than `after` (all users
/// when `None`), ascending: the warm-up's pages. The `user_id > …` bound uses the primary key.
pub async fn users_page(
    client: &Client,
    window: Window,
    after: Option<u64>,
    limit: usize,
) -> Result<Vec<u64>, clickhouse::error::Error> {
    let (start, end) = (window.start, window.end);
    let after = after.map_or(String::new(), |id| format!("AND user_id > {id}"));
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
