//! Writing answers to Redis: the `replace_top` Lua script (`lua/replace_top.lua`) and how a
//! chunk of answers is sent.

use std::sync::LazyLock;
use std::time::Duration;

use futures::StreamExt;
use redis::{ErrorKind, Script, ScriptInvocation, ServerErrorKind};
use topk::cache::{Conn, meta_key, songs_key};
use topk::window::{RankedSong, Window, rfc3339_ms};

/// `lua/replace_top.lua`: atomic, version-guarded replace of one user's answer.
pub static REPLACE_TOP: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../../../lua/replace_top.lua")));

/// Script calls in flight on one cluster connection while a chunk is written. The connection
/// is multiplexed, so concurrent calls share round trips.
const IN_FLIGHT: usize = 256;

/// What `replace_top` did with one answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The answer was stored.
    Written,
    /// The answer was empty: the songs are gone, a short-lived tombstone guards the version.
    Emptied,
    /// A newer computation was already stored; nothing changed.
    Refused,
}

impl Outcome {
    fn from_reply(reply: i64) -> Result<Self, redis::RedisError> {
        match reply {
            1 => Ok(Outcome::Written),
            2 => Ok(Outcome::Emptied),
            0 => Ok(Outcome::Refused),
            other => Err(redis::RedisError::from((
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

/// The script call that stores one answer.
fn invocation<'a>(
    target: &Target,
    answer: &Answer<'_>,
    window: Window,
    computed_at_ms: i64,
) -> ScriptInvocation<'a> {
    let mut call = REPLACE_TOP.prepare_invoke();
    call.key(songs_key(&target.prefix, answer.user_id))
        .key(meta_key(&target.prefix, answer.user_id))
        .arg(computed_at_ms)
        .arg(millis(target.ttl))
        .arg(millis(target.tombstone_ttl))
        .arg(rfc3339_ms(computed_at_ms))
        .arg(window.start_rfc3339())
        .arg(window.end_rfc3339());
    for song in answer.songs {
        call.arg(song.plays).arg(song.song_id);
    }
    call
}

/// Replaces one user's answer, computed at `computed_at_ms` over `window`.
pub async fn replace(
    conn: &mut Conn,
    target: &Target,
    answer: &Answer<'_>,
    window: Window,
    computed_at_ms: i64,
) -> Result<Outcome, redis::RedisError> {
    // EVALSHA; on NOSCRIPT (a restarted or new node) the crate loads the script and retries.
    let reply: i64 = invocation(target, answer, window, computed_at_ms)
        .invoke_async(conn)
        .await?;
    Outcome::from_reply(reply)
}

/// Loads the script on every node (on a cluster, every primary), so that a chunk's calls do
/// not all miss it at once.
pub async fn load(conn: &mut Conn) -> Result<(), redis::RedisError> {
    REPLACE_TOP
        .prepare_invoke()
        .load_async(conn)
        .await
        .map(drop)
}

/// Script calls per pipeline on one server, and pipelines in flight. A pipeline is one request
/// and must be answered within the connection's response timeout (500 ms by default): a few
/// hundred calls take a few milliseconds of Redis time, and a bounded number in flight keeps
/// the queue in front of the last one short.
const PIPELINE: usize = 250;
const PIPELINES_IN_FLIGHT: usize = 4;

/// One pipeline of EVALSHA calls.
async fn pipeline(
    mut conn: Conn,
    target: &Target,
    answers: &[Answer<'_>],
    window: Window,
    computed_at_ms: i64,
) -> Result<Vec<Outcome>, redis::RedisError> {
    let calls: Vec<ScriptInvocation<'_>> = answers
        .iter()
        .map(|answer| invocation(target, answer, window, computed_at_ms))
        .collect();
    let mut pipe = redis::pipe();
    for call in &calls {
        pipe.invoke_script(call);
    }
    let replies: Vec<i64> = match pipe.query_async(&mut conn).await {
        // The server lost its scripts (restart, SCRIPT FLUSH) since the cycle loaded it: load
        // again and resend; every call is idempotent.
        Err(error) if error.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
            load(&mut conn).await?;
            pipe.query_async(&mut conn).await?
        }
        other => other?,
    };
    replies.into_iter().map(Outcome::from_reply).collect()
}

/// Writes a chunk of answers. Returns the outcome of each answer, in no particular order, or
/// the first error.
///
/// On one server, the chunk goes as pipelines of EVALSHA calls (a few round trips). A cluster
/// pipeline may not span slots, so there the calls run concurrently on the multiplexed cluster
/// connection, which sends them to their nodes as they come (a pipeline per node on the wire).
pub async fn replace_all(
    conn: &Conn,
    target: &Target,
    answers: &[Answer<'_>],
    window: Window,
    computed_at_ms: i64,
) -> Result<Vec<Outcome>, redis::RedisError> {
    if let Conn::Single(_) = conn {
        let pipelines: Vec<Vec<Outcome>> = futures::stream::iter(answers.chunks(PIPELINE))
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
