//! Redis: the connection pool, the key layout every reader and writer shares, reading an answer
//! and writing one with the guarded `replace_top` script.
//!
//! Keys (the `{…}` hash tag keeps one user's keys in one Redis Cluster slot):
//! - `<prefix>:{<user_id>}:songs`: sorted set, member = song_id, score = plays;
//! - `<prefix>:{<user_id>}:meta`: hash with `computed_at`, `window_start`, `window_end`, ….
//!
//! Keys are only ever built from parsed integers, never from request strings.

use std::collections::HashMap;
use std::sync::LazyLock;
use std::time::Duration;

use bb8_redis::RedisConnectionManager;
use bb8_redis::redis::{self, ErrorKind, RedisError, Script, ScriptInvocation, ServerErrorKind};
use futures::StreamExt;
use redis::IntoConnectionInfo;
use redis::cluster::ClusterClient;

use crate::config::{CachePolicyArgs, RedisArgs, RedisAuth};
use crate::telemetry::Chain;
use crate::window::{RankedSong, Source, TopSongs, Window, WindowJson, rank, rfc3339_ms};

/// The pool of multiplexed Redis connections.
pub type Pool = bb8::Pool<RedisConnectionManager>;

/// Errors building the pool.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("invalid Redis URL")]
    Url(#[source] RedisError),
    #[error("Redis error")]
    Redis(#[from] RedisError),
    #[error("no Redis connection available in time")]
    PoolTimeout,
}

/// A pool for the configured Redis. Connections are opened lazily, so a Redis that is down at
/// start-up degrades requests instead of stopping the process.
fn pool(args: &RedisArgs) -> Result<Pool, CacheError> {
    let manager = RedisConnectionManager::new(connection_info(&args.url, &args.auth)?)
        .map_err(CacheError::Url)?;
    Ok(bb8::Pool::builder()
        .max_size(args.pool_size)
        .connection_timeout(Duration::from_secs(2))
        .error_sink(Box::new(LoggedErrors))
        .build_unchecked(manager))
}

/// Logs why the pool could not open a connection: a caller only sees "no Redis connection
/// available in time", which does not tell a refused password from a server that is down.
#[derive(Debug, Clone, Copy)]
struct LoggedErrors;

impl bb8::ErrorSink<RedisError> for LoggedErrors {
    fn sink(&self, error: RedisError) {
        tracing::warn!(error = %Chain(&error), "opening a Redis connection failed");
    }

    fn boxed_clone(&self) -> Box<dyn bb8::ErrorSink<RedisError>> {
        Box::new(*self)
    }
}

/// `url` with the configured credentials (they override any in the URL, which should carry
/// none: a URL is a flag, visible in the process list).
fn connection_info(url: &str, auth: &RedisAuth) -> Result<redis::ConnectionInfo, CacheError> {
    let info = url.into_connection_info().map_err(CacheError::Url)?;
    let mut settings = info.redis_settings().clone();
    if let Some(user) = &auth.user {
        settings = settings.set_username(user);
    }
    if let Some(password) = auth.password() {
        settings = settings.set_password(password);
    }
    Ok(info.set_redis_settings(settings))
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
        let mut builder = ClusterClient::builder(nodes);
        if let Some(user) = &args.auth.user {
            builder = builder.username(user);
        }
        if let Some(password) = args.auth.password() {
            builder = builder.password(password);
        }
        let client = builder
            .connection_timeout(Duration::from_secs(2))
            .response_timeout(Duration::from_secs(10))
            .build()
            .map_err(CacheError::Url)?;
        Ok(Redis::Cluster(
            bb8::Pool::builder()
                .max_size(args.pool_size)
                .connection_timeout(Duration::from_secs(2))
                .error_sink(Box::new(LoggedErrors))
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

    /// Whether Redis answers a PING (on a cluster, the node the connection picks).
    pub async fn ping(&self) -> Result<(), CacheError> {
        let mut conn = self.get().await?;
        redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .map(drop)
            .map_err(CacheError::Redis)
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

/// Reads a user's materialised answer on a connection: the meta hash and the sorted set in one
/// round trip (see [`read_cached_on`]). `None` when the user has no meta (never computed, or
/// expired); a meta hash without the answer's fields (the refresher's tombstone of an emptied
/// answer) reads as `None` too, so a caller falls back to ClickHouse.
pub async fn read_top_on<C: redis::aio::ConnectionLike>(
    conn: &mut C,
    prefix: &str,
    user_id: u64,
    limit: usize,
) -> Result<Option<TopSongs>, CacheError> {
    Ok(read_cached_on(conn, prefix, user_id, limit)
        .await?
        .filter(|cached| !cached.tombstone)
        .map(|cached| cached.answer))
}

/// What Redis holds for a user, with the version the API judges its age by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cached {
    /// The answer as stored (`source: cache`, `stale: false`). For a tombstone: no songs, the
    /// window at its version.
    pub answer: TopSongs,
    /// The stored version (`computed_at_ms`): when the answer read ClickHouse.
    pub computed_at_ms: i64,
    /// The meta is the tombstone of an emptied answer: the user has no plays as of the version.
    pub tombstone: bool,
}

fn parse_rfc3339_ms(text: &str) -> Option<i64> {
    let time =
        time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).ok()?;
    i64::try_from(time.unix_timestamp_nanos() / 1_000_000).ok()
}

/// Reads a user's materialised answer: the meta hash and the sorted set in one round trip
/// (a transaction). `None` when the user has no meta (never computed, or expired); a tombstone
/// (only `computed_at_ms`) is an empty answer as of its version.
pub async fn read_cached_on<C: redis::aio::ConnectionLike>(
    conn: &mut C,
    prefix: &str,
    user_id: u64,
    limit: usize,
) -> Result<Option<Cached>, CacheError> {
    // MULTI/EXEC: the refresher replaces both keys in one script call, and a transaction reads
    // them at one point in time, so the meta always describes the songs read with it. Both keys
    // carry the user's hash tag: one slot, so the transaction also runs on a cluster.
    let (meta, songs): (HashMap<String, String>, Vec<(u64, u64)>) = redis::pipe()
        .atomic()
        .hgetall(meta_key(prefix, user_id))
        .zrange_withscores(songs_key(prefix, user_id), 0, -1)
        .query_async(conn)
        .await?;
    let version = meta
        .get("computed_at_ms")
        .and_then(|v| v.parse::<i64>().ok());
    let (Some(computed_at), Some(start), Some(end)) = (
        meta.get("computed_at"),
        meta.get("window_start"),
        meta.get("window_end"),
    ) else {
        let Some(version) = version else {
            return Ok(None);
        };
        return Ok(Some(Cached {
            answer: TopSongs::new(
                user_id,
                Window::at(version),
                version,
                Source::Cache,
                Vec::new(),
            ),
            computed_at_ms: version,
            tombstone: true,
        }));
    };
    Ok(Some(Cached {
        answer: TopSongs {
            user_id,
            user_id_str: user_id.to_string(),
            window: WindowJson {
                start: start.clone(),
                end: end.clone(),
            },
            computed_at: computed_at.clone(),
            source: Source::Cache,
            stale: false,
            songs: rank(songs, limit),
        },
        // A meta written by hand (an operator) may lack the version: its RFC 3339 time says the
        // same to the second; unreadable, it counts as old.
        computed_at_ms: version.unwrap_or_else(|| parse_rfc3339_ms(computed_at).unwrap_or(0)),
        tombstone: false,
    }))
}

// ---------------------------------------------------------------- writing answers
//
// The `replace_top` Lua script (`lua/replace_top.lua`) is the only writer of a user's keys: the
// refresher, the warm-up and the API's write-back after a miss all go through it.

/// `lua/replace_top.lua`: atomic, version-guarded replace of users' answers.
pub static REPLACE_TOP: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../lua/replace_top.lua")));

/// How far a stored version (`computed_at_ms`, a writer's clock) may be ahead of a reader's or a
/// writer's clock. Writers' clocks are synchronised (NTP) far within it; a version further ahead
/// was not written by a writer of this system (a hand-written or poisoned meta, a clock years
/// off): readers treat it as a miss, and `replace_top.lua` overwrites it instead of letting it
/// refuse every honest rewrite forever.
pub const MAX_VERSION_AHEAD: Duration = Duration::from_secs(300);

/// Script calls in flight on one cluster connection while a chunk is written. The connection
/// is multiplexed, so concurrent calls share round trips.
const IN_FLIGHT: usize = 256;

/// What `replace_top` did with one answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The answer was stored.
    Written,
    /// The answer was the stored one (same fingerprint): its version, times and TTLs were
    /// renewed, its songs left as they were.
    Unchanged,
    /// The answer was empty: the songs are gone, a short-lived tombstone guards the version.
    Emptied,
    /// A newer computation was already stored; nothing changed.
    Refused,
}

impl Outcome {
    fn from_reply(reply: i64) -> Result<Self, RedisError> {
        if reply == 3 || reply == 4 {
            // Written over a version more than MAX_VERSION_AHEAD in the future: not one of
            // ours (poisoned or hand-edited), so worth an operator's look.
            metrics::counter!("topk_cache_future_versions_overwritten_total").increment(1);
            tracing::warn!("a stored answer's version was far in the future; overwritten");
        }
        match reply {
            1 | 3 => Ok(Outcome::Written),
            5 => Ok(Outcome::Unchanged),
            2 | 4 => Ok(Outcome::Emptied),
            0 => Ok(Outcome::Refused),
            other => Err(RedisError::from((
                redis::ErrorKind::UnexpectedReturnType,
                "replace_top returned an unknown code",
                other.to_string(),
            ))),
        }
    }
}

/// Where and how long answers are kept.
#[derive(Debug, Clone)]
pub struct Target {
    pub prefix: String,
    pub ttl: Duration,
    pub tombstone_ttl: Duration,
}

impl Target {
    /// The keys under `prefix`, kept as `policy` says.
    pub fn new(prefix: &str, policy: &CachePolicyArgs) -> Self {
        Target {
            prefix: prefix.to_owned(),
            ttl: policy.key_ttl,
            tombstone_ttl: policy.tombstone_ttl,
        }
    }
}

/// One computed answer, as the script stores it.
#[derive(Debug, Clone)]
pub struct Answer<'a> {
    pub user_id: u64,
    pub songs: &'a [RankedSong],
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}

/// The digest `replace_top.lua` compares to tell an unchanged answer: 128 bits of XXH3 over
/// the songs in rank order, each as its id and plays (little-endian), in hex; empty for an
/// empty answer. Two different answers share one with a probability of 2^-128 per pair, far
/// below any fault the system survives; a false mismatch (another version of this function)
/// only costs a full write.
pub fn fingerprint(songs: &[RankedSong]) -> String {
    if songs.is_empty() {
        return String::new();
    }
    let mut bytes = Vec::with_capacity(songs.len() * 16);
    for song in songs {
        bytes.extend_from_slice(&song.song_id.to_le_bytes());
        bytes.extend_from_slice(&song.plays.to_le_bytes());
    }
    format!("{:032x}", xxhash_rust::xxh3::xxh3_128(&bytes))
}

/// The script call that stores `answers` (all in one slot: one user on a cluster).
fn invocation<'a>(
    target: &Target,
    answers: &[Answer<'_>],
    window: Window,
    computed_at_ms: i64,
) -> ScriptInvocation<'a> {
    let mut call = REPLACE_TOP.prepare_invoke();
    for answer in answers {
        call.key(songs_key(&target.prefix, answer.user_id))
            .key(meta_key(&target.prefix, answer.user_id));
    }
    call.arg(computed_at_ms)
        .arg(millis(target.ttl))
        .arg(millis(target.tombstone_ttl))
        .arg(rfc3339_ms(computed_at_ms))
        .arg(window.start_rfc3339())
        .arg(window.end_rfc3339())
        .arg(millis(MAX_VERSION_AHEAD));
    for answer in answers {
        call.arg(answer.songs.len()).arg(fingerprint(answer.songs));
        for song in answer.songs {
            call.arg(song.plays).arg(song.song_id);
        }
    }
    call
}

/// The outcomes of one script call that stored `expected` answers.
fn outcomes(replies: Vec<i64>, expected: usize) -> Result<Vec<Outcome>, RedisError> {
    if replies.len() != expected {
        return Err(RedisError::from((
            redis::ErrorKind::UnexpectedReturnType,
            "replace_top returned a code per user",
            format!("{} codes for {expected} users", replies.len()),
        )));
    }
    replies.into_iter().map(Outcome::from_reply).collect()
}

/// Replaces one user's answer, computed at `computed_at_ms` over `window`.
pub async fn replace(
    conn: &mut Conn,
    target: &Target,
    answer: &Answer<'_>,
    window: Window,
    computed_at_ms: i64,
) -> Result<Outcome, RedisError> {
    // EVALSHA; on NOSCRIPT (a restarted or new node) the crate loads the script and retries.
    let replies: Vec<i64> =
        invocation(target, std::slice::from_ref(answer), window, computed_at_ms)
            .invoke_async(conn)
            .await?;
    Ok(outcomes(replies, 1)?[0])
}

/// Loads the script on every node (on a cluster, every primary), so that a chunk's calls do
/// not all miss it at once.
pub async fn load_replace_top(conn: &mut Conn) -> Result<(), RedisError> {
    REPLACE_TOP
        .prepare_invoke()
        .load_async(conn)
        .await
        .map(drop)
}

/// Answers per script call on one server: the call's fixed cost (argument tables, the Lua
/// call) is spread over them, while one call still blocks Redis for only about a millisecond.
const USERS_PER_CALL: usize = 32;

/// Script calls per pipeline on one server, and pipelines in flight. A pipeline is one request
/// and must be answered within the connection's response timeout (500 ms by default): a few
/// thousand answers take tens of milliseconds of Redis time, and a bounded number in flight keeps
/// the queue in front of the last one short.
const PIPELINE: usize = 8;
const PIPELINES_IN_FLIGHT: usize = 4;

/// One pipeline of EVALSHA calls, each storing up to `USERS_PER_CALL` answers.
async fn pipeline(
    mut conn: Conn,
    target: &Target,
    answers: &[Answer<'_>],
    window: Window,
    computed_at_ms: i64,
) -> Result<Vec<Outcome>, RedisError> {
    let calls: Vec<ScriptInvocation<'_>> = answers
        .chunks(USERS_PER_CALL)
        .map(|part| invocation(target, part, window, computed_at_ms))
        .collect();
    let mut pipe = redis::pipe();
    for call in &calls {
        pipe.invoke_script(call);
    }
    let replies: Vec<Vec<i64>> = match pipe.query_async(&mut conn).await {
        // The server lost its scripts (restart, SCRIPT FLUSH) since the cycle loaded it: load
        // again and resend; every call is idempotent.
        Err(error) if error.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
            load_replace_top(&mut conn).await?;
            pipe.query_async(&mut conn).await?
        }
        other => other?,
    };
    let mut all = Vec::with_capacity(answers.len());
    for (codes, part) in replies.into_iter().zip(answers.chunks(USERS_PER_CALL)) {
        all.extend(outcomes(codes, part.len())?);
    }
    Ok(all)
}

/// Writes a chunk of answers. Returns the outcome of each answer, in no particular order, or
/// the first error.
///
/// On one server, the chunk goes as pipelines of EVALSHA calls of many answers each (a few round
/// trips). A cluster call and pipeline may not span slots, so there each call stores one answer
/// and the calls run concurrently on the multiplexed cluster connection, which sends them to
/// their nodes as they come (a pipeline per node on the wire).
pub async fn replace_all(
    conn: &Conn,
    target: &Target,
    answers: &[Answer<'_>],
    window: Window,
    computed_at_ms: i64,
) -> Result<Vec<Outcome>, RedisError> {
    if let Conn::Single(_) = conn {
        let pipelines: Vec<Vec<Outcome>> =
            futures::stream::iter(answers.chunks(PIPELINE * USERS_PER_CALL))
                .map(|part| pipeline(conn.clone(), target, part, window, computed_at_ms))
                .buffer_unordered(PIPELINES_IN_FLIGHT)
                .collect::<Vec<_>>()
                .await
                .into_iter()
                .collect::<Result<_, _>>()?;
        return Ok(pipelines.into_iter().flatten().collect());
    }
    futures::stream::iter(answers)
        .map(|answer| {
            let mut conn = conn.clone();
            async move { replace(&mut conn, target, answer, window, computed_at_ms).await }
        })
        .buffer_unordered(IN_FLIGHT)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ranked(list: &[(u64, u64)]) -> Vec<RankedSong> {
        crate::window::rank(list.to_vec(), crate::window::MAX_LIMIT)
    }

    #[test]
    fn a_fingerprint_tells_every_change_of_songs_or_plays() {
        let answer = ranked(&[(7, 31), (9, 12), (3, 12)]);
        assert_eq!(fingerprint(&answer), fingerprint(&answer.clone()));
        assert_eq!(fingerprint(&answer).len(), 32);
        assert_eq!(fingerprint(&[]), "");
        let changes = [
            ranked(&[(7, 32), (9, 12), (3, 12)]),         // one more play
            ranked(&[(7, 31), (9, 12)]),                  // a song left
            ranked(&[(7, 31), (9, 12), (3, 12), (4, 1)]), // a song came in
            ranked(&[(7, 31), (9, 12), (5, 12)]),         // another song, same plays
            ranked(&[(12, 7), (9, 31), (3, 12)]),         // ids and plays swapped
        ];
        for changed in &changes {
            assert_ne!(fingerprint(changed), fingerprint(&answer), "{changed:?}");
        }
    }

    #[test]
    fn keys_follow_the_contract() {
        assert_eq!(songs_key("topk", 42), "topk:{42}:songs");
        assert_eq!(meta_key("topk", 42), "topk:{42}:meta");
    }
}
