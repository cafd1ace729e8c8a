//! Redis: the connection pool and the key layout every reader and writer shares.
//!
//! Keys (the `{…}` hash tag keeps one user's keys in one Redis Cluster slot):
//! - `<prefix>:{<user_id>}:songs`: sorted set, member = song_id, score = plays;
//! - `<prefix>:{<user_id>}:meta`: hash with `computed_at`, `window_start`, `window_end`, ….
//!
//! Keys are only ever built from parsed integers, never from request strings.

use std::time::Duration;

use bb8_redis::RedisConnectionManager;
use bb8_redis::redis::RedisError;

use std::collections::HashMap;

use crate::config::RedisArgs;
use crate::window::{Source, TopSongs, WindowJson, rank};

/// The pool of multiplexed Redis connections.
pub type Pool = bb8::Pool<RedisConnectionManager>;

/// Errors building the pool.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("invalid Redis URL: {0}")]
    Url(#[source] RedisError),
    #[error("Redis error: {0}")]
    Redis(#[from] RedisError),
    #[error("no Redis connection available in time")]
    PoolTimeout,
}

/// A pool for the configured Redis. Connections are opened lazily, so a Redis that is down at
/// start-up degrades requests instead of stopping the process.
pub fn pool(args: &RedisArgs) -> Result<Pool, CacheError> {
    let manager = RedisConnectionManager::new(args.url.as_str()).map_err(CacheError::Url)?;
    Ok(bb8::Pool::builder()
        .max_size(args.pool_size)
        .connection_timeout(Duration::from_secs(2))
        .build_unchecked(manager))
}

/// Key of a user's ranked songs.
pub fn songs_key(prefix: &str, user_id: u64) -> String {
    format!("{prefix}:{{{user_id}}}:songs")
}

/// Key of a user's answer metadata.
pub fn meta_key(prefix: &str, user_id: u64) -> String {
    format!("{prefix}:{{{user_id}}}:meta")
}

/// Reads a user's materialised answer: the meta hash and the sorted set in one round trip
/// (a pipeline). `None` when the user has no meta (never computed, or expired).
pub async fn read_top(
    pool: &Pool,
    prefix: &str,
    user_id: u64,
    limit: usize,
) -> Result<Option<TopSongs>, CacheError> {
    let mut conn = pool.get().await.map_err(|e| match e {
        bb8::RunError::User(error) => CacheError::Redis(error),
        bb8::RunError::TimedOut => CacheError::PoolTimeout,
    })?;
    let (meta, songs): (HashMap<String, String>, Vec<(u64, u64)>) = bb8_redis::redis::pipe()
        .hgetall(meta_key(prefix, user_id))
        .zrange_withscores(songs_key(prefix, user_id), 0, -1)
        .query_async(&mut *conn)
        .await?;
    let (Some(computed_at), Some(start), Some(end)) = (
        meta.get("computed_at"),
        meta.get("window_start"),
        meta.get("window_end"),
    ) else {
        return Ok(None);
    };
    Ok(Some(TopSongs {
        user_id,
        window: WindowJson {
            start: start.clone(),
            end: end.clone(),
        },
        computed_at: computed_at.clone(),
        source: Source::Cache,
        stale: false,
        songs: rank(songs, limit),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_the_contract() {
        assert_eq!(songs_key("topk", 42), "topk:{42}:songs");
        assert_eq!(meta_key("topk", 42), "topk:{42}:meta");
    }
}
