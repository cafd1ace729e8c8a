//! `topk loadgen`: listening traffic into Kafka, using only the public event contract (JSON
//! value, user id as the key), as an outside producer would.
//!
//! Song popularity and user activity both follow Zipf laws (a few hits and heavy listeners, a
//! long tail of both). Plays come in listening sessions: a user plays a run of songs, mostly
//! from their own favourites (so songs repeat, as they do in real listening), sometimes a
//! popular song from the whole catalogue. Optional fractions of late, duplicate (same event_id
//! re-sent) and malformed events exercise the aggregator's rules. With `--truth`, the exact
//! per-(user, song) totals of the distinct valid plays sent are written as JSON for oracle
//! checks.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use futures::future::join_all;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Zipf};
use rdkafka::producer::FutureRecord;
use tokio_util::sync::CancellationToken;
use topk::config::KafkaArgs;

/// Errors of the load generator.
#[derive(Debug, thiserror::Error)]
pub enum LoadgenError {
    #[error(transparent)]
    Kafka(#[from] topk::kafka::KafkaClientError),
    #[error("invalid distribution")]
    Distribution(#[source] rand_distr::ZipfError),
    #[error("producing failed")]
    Produce(#[source] rdkafka::error::KafkaError),
    #[error("cannot write the ground truth to {path}")]
    Truth {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// `topk loadgen`.
#[derive(Debug, Clone, clap::Args)]
pub struct LoadgenArgs {
    #[command(flatten)]
    pub kafka: KafkaArgs,
    /// Events per second.
    #[arg(long, env = "TOPK_LOADGEN_RATE", default_value_t = 200)]
    pub rate: u32,
    /// Distinct users.
    #[arg(long, default_value_t = 10_000)]
    pub users: u64,
    /// Distinct songs.
    #[arg(long, default_value_t = 5_000)]
    pub songs: u64,
    /// Zipf exponent of song popularity and of user activity.
    #[arg(long, default_value_t = 1.1)]
    pub zipf: f64,
    /// How long to run (until Ctrl-C when unset).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
    /// Seed of the generator (the same seed gives the same traffic).
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Fraction of plays that happened up to 6 days ago.
    #[arg(long, default_value_t = 0.02)]
    pub late_rate: f64,
    /// Fraction of events re-sent with the same event_id (producer retries).
    #[arg(long, default_value_t = 0.01)]
    pub duplicate_rate: f64,
    /// Fraction of malformed events (they must land in the dead-letter topic).
    #[arg(long, default_value_t = 0.001)]
    pub malformed_rate: f64,
    /// Mean number of plays in a listening session.
    #[arg(long, default_value_t = 8.0)]
    pub session_plays: f64,
    /// Write the exact ground truth here when done: per (user, song), the distinct valid plays
    /// sent (duplicates and malformed events excluded), with their time span.
    #[arg(long)]
    pub truth: Option<PathBuf>,
}

/// Songs of a user's own rotation; a session draws from it with this probability.
const FAVOURITES: u64 = 30;
const FAVOURITE_SHARE: f64 = 0.7;
/// A duplicate re-sends an event at most this long after the original (inside any sensible
/// `--dedup-window`), so that the truth can say it is not counted.
const DUPLICATE_WITHIN: Duration = Duration::from_secs(120);

/// The exact totals of what was sent, as written by `--truth`.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Truth {
    pub plays: u64,
    pub duplicates: u64,
    pub malformed: u64,
    /// Earliest and latest play timestamp, ms since the epoch.
    pub first_ms: i64,
    pub last_ms: i64,
    /// `[user_id, song_id, plays]`, ascending.
    pub totals: Vec<[u64; 3]>,
}

struct Session {
    user: u64,
    remaining: u32,
}

/// What was sent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sent {
    pub plays: u64,
    pub duplicates: u64,
    pub malformed: u64,
}

/// Rounds of re-sending the messages of a tick that failed, one second apart.
const SEND_ATTEMPTS: u32 = 30;

/// Produces `messages` until each one is delivered. A broker that restarts fails the requests
/// in flight with errors librdkafka does not retry (tansu answers `UNKNOWN_SERVER_ERROR` while
/// it shuts down); giving up would end the run and lose its truth. A failed message is re-sent
/// as is: if the broker had stored it after all, the copy has the same `event_id` and key (so
/// the same partition) and the aggregator drops it as a duplicate, so the truth stays exact.
async fn send_all(
    producer: &rdkafka::producer::FutureProducer,
    topic: &str,
    mut messages: Vec<(String, String)>,
) -> Result<(), LoadgenError> {
    for attempt in 1..=SEND_ATTEMPTS {
        let sends = messages.iter().map(|(key, value)| {
            producer.send(
                FutureRecord::to(topic).key(key).payload(value),
                Duration::from_secs(30),
            )
        });
        let results = join_all(sends).await;
        let mut failed = Vec::new();
        let mut last_error = None;
        for (message, result) in messages.into_iter().zip(results) {
            if let Err((error, _)) = result {
                failed.push(message);
                last_error = Some(error);
            }
        }
        match last_error {
            None => return Ok(()),
            Some(error) if attempt == SEND_ATTEMPTS => return Err(LoadgenError::Produce(error)),
            Some(error) => {
                tracing::warn!(
                    error = %topk::telemetry::Chain(&error),
                    failed = failed.len(),
                    attempt,
                    "delivery failed; re-sending"
                );
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
        messages = failed;
    }
    Ok(())
}

/// Produces until `duration` elapses or `shutdown` fires.
pub async fn run(args: LoadgenArgs, shutdown: CancellationToken) -> Result<Sent, LoadgenError> {
    let producer = topk::kafka::producer(&args.kafka.brokers)?;
    let song_dist =
        Zipf::new(args.songs.max(1) as f64, args.zipf).map_err(LoadgenError::Distribution)?;
    let user_dist =
        Zipf::new(args.users.max(1) as f64, args.zipf).map_err(LoadgenError::Distribution)?;
    let mut rng = StdRng::seed_from_u64(args.seed);
    // Users and songs are shuffled so that id order says nothing about popularity.
    let scramble = |rank: u64, n: u64| (rank.wrapping_mul(0x9E37_79B9_7F4A_7C15) % n) + 1;
    let tick = Duration::from_millis(100);
    let per_tick = (f64::from(args.rate) * tick.as_secs_f64()).max(1.0) as usize;
    let deadline = args.duration.map(|d| tokio::time::Instant::now() + d);
    let mut interval = tokio::time::interval(tick);
    let mut sent = Sent::default();
    let mut truth: BTreeMap<(u64, u64), u64> = BTreeMap::new();
    let (mut first_ms, mut last_ms) = (i64::MAX, i64::MIN);
    // Recently sent plays that a duplicate may re-send, with when they were sent.
    let mut recent: Vec<(String, String, tokio::time::Instant)> = Vec::new();
    let mut serial = 0u64;
    // Listening sessions in progress; each play comes from one of them, so a user's plays
    // cluster in time like real listening.
    let pool = usize::try_from(args.rate)
        .unwrap_or(usize::MAX)
        .clamp(8, 50_000);
    let session_len = |rng: &mut StdRng| {
        let p = 1.0 / args.session_plays.max(1.0);
        let mut n = 1;
        while n < 500 && !rng.random_bool(p) {
            n += 1;
        }
        n
    };
    let mut sessions: Vec<Session> = Vec::with_capacity(pool);
    let favourite_dist =
        Zipf::new(FAVOURITES as f64, args.zipf).map_err(LoadgenError::Distribution)?;
    tracing::info!(rate = args.rate, topic = %args.kafka.topic, "load generator started");
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = interval.tick() => {}
        }
        if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
            break;
        }
        let now_ms = topk::clock::Clock::now_ms(&topk::clock::SystemClock);
        let sent_at = tokio::time::Instant::now();
        recent.retain(|(_, _, at)| sent_at.duration_since(*at) < DUPLICATE_WITHIN);
        let mut messages = Vec::with_capacity(per_tick);
        for _ in 0..per_tick {
            if rng.random_bool(args.malformed_rate.clamp(0.0, 1.0)) {
                messages.push(("0".to_owned(), "{\"event_id\": \"broken\"".to_owned()));
                sent.malformed += 1;
                continue;
            }
            if !recent.is_empty() && rng.random_bool(args.duplicate_rate.clamp(0.0, 1.0)) {
                let (key, value, _) = &recent[rng.random_range(0..recent.len())];
                messages.push((key.clone(), value.clone()));
                sent.duplicates += 1;
                continue;
            }
            if sessions.len() < pool {
                let user = scramble(user_dist.sample(&mut rng) as u64, args.users.max(1));
                sessions.push(Session {
                    user,
                    remaining: session_len(&mut rng),
                });
            }
            let slot = rng.random_range(0..sessions.len());
            let user = sessions[slot].user;
            sessions[slot].remaining -= 1;
            if sessions[slot].remaining == 0 {
                sessions.swap_remove(slot);
            }
            let song = if rng.random_bool(FAVOURITE_SHARE) {
                // The user's rotation: FAVOURITES songs of their own, played Zipf-wise.
                let pick = favourite_dist.sample(&mut rng) as u64;
                scramble(user.wrapping_mul(FAVOURITES) + pick, args.songs.max(1))
            } else {
                scramble(song_dist.sample(&mut rng) as u64, args.songs.max(1))
            };
            let age = if rng.random_bool(args.late_rate.clamp(0.0, 1.0)) {
                rng.random_range(0..6 * 86_400_000)
            } else {
                rng.random_range(0..2_000)
            };
            serial += 1;
            let timestamp = now_ms - age;
            let value = serde_json::json!({
                "event_id": format!("lg-{}-{serial}", args.seed),
                "user_id": user,
                "song_id": song,
                "timestamp": timestamp,
            })
            .to_string();
            let message = (user.to_string(), value);
            if recent.len() < 1_000 {
                recent.push((message.0.clone(), message.1.clone(), sent_at));
            } else {
                let slot = rng.random_range(0..recent.len());
                recent[slot] = (message.0.clone(), message.1.clone(), sent_at);
            }
            messages.push(message);
            sent.plays += 1;
            if args.truth.is_some() {
                *truth.entry((user, song)).or_default() += 1;
                first_ms = first_ms.min(timestamp);
                last_ms = last_ms.max(timestamp);
            }
        }
        send_all(&producer, &args.kafka.topic, messages).await?;
    }
    if let Some(path) = &args.truth {
        let truth = Truth {
            plays: sent.plays,
            duplicates: sent.duplicates,
            malformed: sent.malformed,
            first_ms: if sent.plays > 0 { first_ms } else { 0 },
            last_ms: if sent.plays > 0 { last_ms } else { 0 },
            totals: truth
                .into_iter()
                .map(|((user, song), plays)| [user, song, plays])
                .collect(),
        };
        let json = serde_json::to_vec(&truth).expect("plain data serializes");
        std::fs::write(path, json).map_err(|source| LoadgenError::Truth {
            path: path.clone(),
            source,
        })?;
    }
    tracing::info!(
        plays = sent.plays,
        duplicates = sent.duplicates,
        malformed = sent.malformed,
        "load generator stopped"
    );
    Ok(sent)
}
