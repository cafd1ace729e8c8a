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

use crate::config::RedisArgs;

/// The pool of multiplexed Redis connections.
pub type Pool = bb8::Pool<RedisConnectionManager>;

/// Errors building the pool.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("invalid Redis URL: {0}")]
    Url(#[source] RedisError),
    #[error("Redis error: {0}")]
    Redis(#[from] RedisError),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_the_contract() {
        assert_eq!(songs_key("topk", 42), "topk:{42}:songs");
        assert_eq!(meta_key("topk", 42), "topk:{42}:meta");
    }
}
