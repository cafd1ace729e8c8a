//! `topk loadgen`: listening traffic into Kafka, using only the public event contract (JSON
//! value, user id as the key), as an outside producer would.
//!
//! Song popularity and user activity both follow Zipf laws (a few hits and heavy listeners, a
//! long tail of both); optional fractions of late, duplicate (same event_id re-sent) and
//! malformed events exercise the aggregator's rules.

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
    #[error("invalid distribution: {0}")]
    Distribution(String),
    #[error("producing failed: {0}")]
    Produce(#[source] rdkafka::error::KafkaError),
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
}

/// What was sent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sent {
    pub plays: u64,
    pub duplicates: u64,
    pub malformed: u64,
}

/// Produces until `duration` elapses or `shutdown` fires.
pub async fn run(args: LoadgenArgs, shutdown: CancellationToken) -> Result<Sent, LoadgenError> {
    let producer = topk::kafka::producer(&args.kafka.brokers)?;
    let bad = |e: rand_distr::ZipfError| LoadgenError::Distribution(e.to_string());
    let song_dist = Zipf::new(args.songs.max(1) as f64, args.zipf).map_err(bad)?;
    let user_dist = Zipf::new(args.users.max(1) as f64, args.zipf).map_err(bad)?;
    let mut rng = StdRng::seed_from_u64(args.seed);
    // Users and songs are shuffled so that id order says nothing about popularity.
    let scramble = |rank: u64, n: u64| (rank.wrapping_mul(0x9E37_79B9_7F4A_7C15) % n) + 1;
    let tick = Duration::from_millis(100);
    let per_tick = (f64::from(args.rate) * tick.as_secs_f64()).max(1.0) as usize;
    let deadline = args.duration.map(|d| tokio::time::Instant::now() + d);
    let mut interval = tokio::time::interval(tick);
    let mut sent = Sent::default();
    let mut recent: Vec<(String, String)> = Vec::new();
    let mut serial = 0u64;
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
        let mut messages = Vec::with_capacity(per_tick);
        for _ in 0..per_tick {
            if rng.random_bool(args.malformed_rate.clamp(0.0, 1.0)) {
                messages.push(("0".to_owned(), "{\"event_id\": \"broken\"".to_owned()));
                sent.malformed += 1;
                continue;
            }
            if !recent.is_empty() && rng.random_bool(args.duplicate_rate.clamp(0.0, 1.0)) {
                messages.push(recent[rng.random_range(0..recent.len())].clone());
                sent.duplicates += 1;
                continue;
            }
            let user = scramble(user_dist.sample(&mut rng) as u64, args.users.max(1));
            let song = scramble(song_dist.sample(&mut rng) as u64, args.songs.max(1));
            let age = if rng.random_bool(args.late_rate.clamp(0.0, 1.0)) {
                rng.random_range(0..6 * 86_400_000)
            } else {
                rng.random_range(0..2_000)
            };
            serial += 1;
            let value = serde_json::json!({
                "event_id": format!("lg-{}-{serial}", args.seed),
                "user_id": user,
                "song_id": song,
                "timestamp": now_ms - age,
            })
            .to_string();
            let message = (user.to_string(), value);
            if recent.len() < 1_000 {
                recent.push(message.clone());
            } else {
                let slot = rng.random_range(0..recent.len());
                recent[slot] = message.clone();
            }
            messages.push(message);
            sent.plays += 1;
        }
        let sends = messages.iter().map(|(key, value)| {
            producer.send(
                FutureRecord::to(&args.kafka.topic).key(key).payload(value),
                Duration::from_secs(30),
            )
        });
        for result in join_all(sends).await {
            result.map_err(|(error, _)| LoadgenError::Produce(error))?;
        }
    }
    tracing::info!(
        plays = sent.plays,
        duplicates = sent.duplicates,
        malformed = sent.malformed,
        "load generator stopped"
    );
    Ok(sent)
}
