//! Redis: the connection pool and the key layout every reader and writer shares.
//!
//! Keys (the `{…}` hash tag keeps one user's keys in one Redis Cluster slot):
//! - `<prefix>:{<user_id>}:songs`: sorted set, member = song_id, score = plays;
//! - `<prefix>:{<user_id>}:meta`: hash with `computed_at`, `window_start`, `window_end`, ….
//!
//! Keys are only ever built from parsed integers, never from request strings.

use std::collections::HashMap;
use std::time::Duration;

use bb8_redis::RedisConnectionManager;
use bb8_redis::redis::{self, RedisError};
use redis::cluster::ClusterClient;

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

/// A pool of Redis Cluster connections (each one multiplexed and routing by slot).
pub type ClusterPool = bb8::Pool<ClusterClient>;

/// Redis as the configuration names it: one server or a cluster. Everything that reads or writes
/// answers goes through [`Redis::get`], so the same code runs against both.
#[derive(Clone)]
pub enum Redis {
    Single(Pool),
    Cluster(ClusterPool),
}

impl std::fmt::Debug for Redis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Redis::Single(_) => "Redis::Single",
            Redis::Cluster(_) => "Redis::Cluster",
        })
    }
}

/// A connection from a [`Redis`] pool. Both kinds are multiplexed: a clone shares the socket,
/// and requests issued concurrently on clones are pipelined on the wire (per node on a cluster).
#[derive(Clone)]
pub enum Conn {
    Single(redis::aio::MultiplexedConnection),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl redis::aio::ConnectionLike for Conn {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Conn::Single(conn) => conn.req_packed_command(cmd),
            Conn::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Conn::Single(conn) => conn.req_packed_commands(cmd, offset, count),
            Conn::Cluster(conn) => conn.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(conn) => conn.get_db(),
            Conn::Cluster(conn) => conn.get_db(),
        }
    }
}

fn run_error(error: bb8::RunError<RedisError>) -> CacheError {
    match error {
        bb8::RunError::User(error) => CacheError::Redis(error),
        bb8::RunError::TimedOut => CacheError::PoolTimeout,
    }
}

impl Redis {
    /// The configured Redis: a cluster when `--redis-cluster` is set (the URL is then a
    /// comma-separated list of seed nodes), one server otherwise. Connections open lazily, so
    /// a Redis that is down at start-up degrades requests instead of stopping the process.
    pub fn connect(args: &RedisArgs) -> Result<Self, CacheError> {
        if !args.cluster {
            return pool(args).map(Redis::Single);
        }
        let nodes: Vec<&str> = args
            .url
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .collect();
        let client = ClusterClient::builder(nodes)
            .connection_timeout(Duration::from_secs(2))
            .response_timeout(Duration::from_secs(10))
            .build()
            .map_err(CacheError::Url)?;
        Ok(Redis::Cluster(
            bb8::Pool::builder()
                .max_size(args.pool_size)
                .connection_timeout(Duration::from_secs(2))
                .build_unchecked(client),
        ))
    }

    /// A connection from the pool (checked out and returned at once: the pool opens, checks
    /// and replaces the multiplexed connections, and callers share one by cloning it).
    pub async fn get(&self) -> Result<Conn, CacheError> {
        Ok(match self {
            Redis::Single(pool) => Conn::Single(pool.get().await.map_err(run_error)?.clone()),
            Redis::Cluster(pool) => Conn::Cluster(pool.get().await.map_err(run_error)?.clone()),
        })
    }

    /// Reads a user's materialised answer (see [`read_top_on`]).
    pub async fn read_top(
        &self,
        prefix: &str,
        user_id: u64,
        limit: usize,
    ) -> Result<Option<TopSongs>, CacheError> {
        let mut conn = self.get().await?;
        read_top_on(&mut conn, prefix, user_id, limit).await
    }
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
/// (a transaction). `None` when the user has no meta (never computed, or expired).
pub async fn read_top(
    pool: &Pool,
    prefix: &str,
    user_id: u64,
    limit: usize,
) -> Result<Option<TopSongs>, CacheError> {
    let mut conn = pool.get().await.map_err(run_error)?;
    read_top_on(&mut *conn, prefix, user_id, limit).await
}

/// [`read_top`] on a connection. A meta hash without the answer's fields (the refresher's
/// tombstone of an emptied answer) reads as `None` too, so a caller falls back to ClickHouse.
pub async fn read_top_on<C: redis::aio::ConnectionLike>(
    conn: &mut C,
    prefix: &str,
    user_id: u64,
    limit: usize,
) -> Result<Option<TopSongs>, CacheError> {
    // MULTI/EXEC: the refresher replaces both keys in one script call, and a transaction reads
    // them at one point in time, so the meta always describes the songs read with it. Both keys
    // carry the user's hash tag: one slot, so the transaction also runs on a cluster.
    let (meta, songs): (HashMap<String, String>, Vec<(u64, u64)>) = redis::pipe()
        .atomic()
        .hgetall(meta_key(prefix, user_id))
        .zrange_withscores(songs_key(prefix, user_id), 0, -1)
        .query_async(conn)
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
