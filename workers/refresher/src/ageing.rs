//! The ageing index: when each user's answer next changes without new plays, so that a cycle
//! recomputes exactly the users whose answer the window's movement changes, without scanning
//! ClickHouse for the minutes that left or entered the window.
//!
//! Every computation of an answer (a refresher cycle, the warm-up) schedules its user at
//! [`topk::query::Computed::changes_at`]: the instant the oldest play of a returned song leaves
//! the window, or a play stored ahead of the window enters it. New plays do not need the index:
//! they come with a touch, and the recomputation schedules the user again.
//!
//! The index is kept per touches partition (`user_id % partitions`), so that the refresher that
//! owns a partition owns its part of the index:
//! - `<prefix>:{ageing.<p>}:due`: sorted set, member = user id, score = when the answer next
//!   changes (seconds since the epoch);
//! - `<prefix>:{ageing.<p>}:versions`: sorted set, member = user id, score = the `computed_at_ms`
//!   of the computation that scheduled it.
//!
//! `lua/schedule.lua` writes both, unless a newer computation already scheduled the user (two
//! refreshers during a rebalance, a warm-up racing a refresher): the newest computation's
//! schedule stands, as its answer does in `replace_top`. A user whose answer nothing can change
//! (no plays in the window or ahead of it) leaves the index; users who stop listening therefore
//! leave it once their last play leaves the window.

use std::collections::BTreeMap;
use std::sync::LazyLock;

use futures::StreamExt as _;
use redis::{RedisError, Script};
use topk::cache::{Conn, MAX_VERSION_AHEAD};
use topk::touches::partition_of;

/// `lua/schedule.lua`: version-guarded schedule of users of one touches partition.
pub static SCHEDULE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../lua/schedule.lua")));

/// Users per script call: the call's fixed cost is spread over them, while one call still blocks
/// Redis for well under a millisecond.
const USERS_PER_CALL: usize = 256;

/// Script calls in flight on the multiplexed connection.
const IN_FLIGHT: usize = 16;

/// Key of partition `partition`'s due times.
pub fn due_key(prefix: &str, partition: i32) -> String {
    format!("{prefix}:{{ageing.{partition}}}:due")
}

/// Key of partition `partition`'s schedule versions.
pub fn versions_key(prefix: &str, partition: i32) -> String {
    format!("{prefix}:{{ageing.{partition}}}:versions")
}

/// A user and when its answer next changes (`None`: never, without new plays).
pub type Schedule = (u64, Option<u32>);

/// Where the index lives: the key prefix and the touches topic's partition count.
#[derive(Debug, Clone)]
pub struct Ageing {
    pub prefix: String,
    pub partitions: u32,
}

impl Ageing {
    pub fn new(prefix: &str, partitions: u32) -> Self {
        Ageing {
            prefix: prefix.to_owned(),
            partitions: partitions.max(1),
        }
    }

    /// The touches partition, and so the part of the index, of `user_id`.
    pub fn partition_of(&self, user_id: u64) -> i32 {
        partition_of(user_id, self.partitions)
    }

    /// Schedules each `(user, changes_at)` of a computation made at `computed_at_ms`
    /// (`None`: the user leaves the index). Returns how many were scheduled; the others had a
    /// newer schedule.
    pub async fn schedule(
        &self,
        conn: &Conn,
        users: &[Schedule],
        computed_at_ms: i64,
    ) -> Result<u64, RedisError> {
        let mut by_partition: BTreeMap<i32, Vec<Schedule>> = BTreeMap::new();
        for &(user, changes_at) in users {
            by_partition
                .entry(self.partition_of(user))
                .or_default()
                .push((user, changes_at));
        }
        let calls: Vec<(i32, &[Schedule])> = by_partition
            .iter()
            .flat_map(|(&p, users)| users.chunks(USERS_PER_CALL).map(move |part| (p, part)))
            .collect();
        let max_ahead = i64::try_from(MAX_VERSION_AHEAD.as_millis()).unwrap_or(i64::MAX);
        let counts: Vec<Result<u64, RedisError>> = futures::stream::iter(calls)
            .map(|(partition, part)| {
                let mut conn = conn.clone();
                let mut call = SCHEDULE.prepare_invoke();
                call.key(due_key(&self.prefix, partition))
                    .key(versions_key(&self.prefix, partition))
                    .arg(computed_at_ms)
                    .arg(max_ahead);
                for &(user, changes_at) in part {
                    call.arg(user).arg(changes_at.map_or(-1, i64::from));
                }
                async move { call.invoke_async::<u64>(&mut conn).await }
            })
            .buffer_unordered(IN_FLIGHT)
            .collect()
            .await;
        counts.into_iter().sum()
    }

    /// Up to `limit` users of `partition` whose answer changes at or before `now_secs`, earliest
    /// first.
    pub async fn due(
        &self,
        conn: &mut Conn,
        partition: i32,
        now_secs: u32,
        limit: usize,
    ) -> Result<Vec<u64>, RedisError> {
        redis::cmd("ZRANGEBYSCORE")
            .arg(due_key(&self.prefix, partition))
            .arg("-inf")
            .arg(now_secs)
            .arg("LIMIT")
            .arg(0)
            .arg(limit)
            .query_async(conn)
            .await
    }

    /// When `user_id` is scheduled, and by which version (`None`: not in the index).
    pub async fn scheduled(
        &self,
        conn: &mut Conn,
        user_id: u64,
    ) -> Result<Option<(u32, i64)>, RedisError> {
        let partition = self.partition_of(user_id);
        let (due, version): (Option<f64>, Option<f64>) = redis::pipe()
            .zscore(due_key(&self.prefix, partition), user_id)
            .zscore(versions_key(&self.prefix, partition), user_id)
            .query_async(conn)
            .await?;
        Ok(due
            .zip(version)
            .map(|(due, version)| (due as u32, version as i64)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partition_keeps_its_keys_in_one_slot() {
        assert_eq!(due_key("topk", 3), "topk:{ageing.3}:due");
        assert_eq!(versions_key("topk", 3), "topk:{ageing.3}:versions");
        let ageing = Ageing::new("topk", 8);
        assert_eq!(ageing.partition_of(17), 1);
        assert_eq!(Ageing::new("topk", 0).partitions, 1);
    }
}
