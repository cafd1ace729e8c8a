//! Freshness benchmark: how long after a play is produced it shows in the answer users read,
//! as a distribution, under background load, for each pair of intervals.
//!
//! ```sh
//! scripts/stack up && eval "$(scripts/stack env)"
//! cargo bench --bench freshness                                   # 5s/5s and 60s/60s
//! TOPK_BENCH_FRESHNESS=5s/5s,2s/2s TOPK_BENCH_SECONDS=60 cargo bench --bench freshness
//! ```
//!
//! One in-process pipeline per configuration (`flush/refresh`): dev broker, aggregator,
//! refresher, and `topk loadgen` at `TOPK_BENCH_RATE` (2,000) events/s as the background. Every
//! 500 ms a probe play is produced for a user of its own, stamped with the time it was handed to
//! the producer; a poller reads the probe users' answers from Redis — the keys the API answers
//! from on a cache hit, read with the same function — every 50 ms and records when each probe
//! first shows. Probes are produced for `TOPK_BENCH_SECONDS` (90); the run then waits for the
//! last ones. Prints one JSON line with the percentiles and every sample (for the report's
//! chart).

mod common;

use common::flags::parse;
use common::{env_or, unique};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rdkafka::producer::FutureRecord;
use tokio_util::sync::CancellationToken;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

/// Probe users live far above any loadgen user id.
const PROBE_USER_BASE: u64 = 1_000_000_000_000;

async fn measure(flush: &str, refresh: &str, seconds: u64, rate: u32) -> serde_json::Value {
    let broker = topk_devbroker::DevBroker::start(100).expect("mock cluster");
    let brokers = broker.bootstrap_servers();
    let topic = unique("fresh_plays");
    broker.create_plays_topics(&topic, 8).expect("topics");
    let redis_url =
        std::env::var("TOPK_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let clickhouse = common::clickhouse_args("topk_fresh");
    let (clickhouse_url, database) = (clickhouse.url.clone(), clickhouse.database.clone());
    let prefix = unique("topk_fresh");
    topk::migrate::run(&clickhouse).await.expect("migrate");

    let shutdown = CancellationToken::new();
    let aggregator: topk_aggregator::AggregatorArgs = parse(vec![
        format!("--kafka-brokers={brokers}"),
        format!("--kafka-topic={topic}"),
        format!("--clickhouse-url={clickhouse_url}"),
        format!("--clickhouse-database={database}"),
        format!("--group={}", unique("fresh_aggregator")),
        format!("--flush-interval={flush}"),
    ]);
    let refresher: topk_refresher::RefresherArgs = parse(vec![
        format!("--clickhouse-url={clickhouse_url}"),
        format!("--clickhouse-database={database}"),
        format!("--redis-url={redis_url}"),
        format!("--redis-prefix={prefix}"),
        format!("--refresh-interval={refresh}"),
        "--key-ttl=30m".into(),
    ]);
    let loadgen: topk_loadgen::LoadgenArgs = parse(vec![
        format!("--kafka-brokers={brokers}"),
        format!("--kafka-topic={topic}"),
        format!("--rate={rate}"),
    ]);
    let redis = topk::cache::Redis::connect(&refresher.redis).expect("redis");
    let tasks = vec![
        tokio::spawn({
            let s = shutdown.clone();
            async move {
                let _ = topk_aggregator::run(aggregator, s).await;
            }
        }),
        tokio::spawn({
            let s = shutdown.clone();
            async move {
                let _ = topk_loadgen::run(loadgen, s).await;
            }
        }),
    ];

    // The refresher's future is not `Send` (it borrows across awaits), so it runs here, beside
    // the probe loop, rather than in a task of its own.
    let refresher = topk_refresher::run(refresher, topk::clock::system(), shutdown.clone());
    let probe = probe(&brokers, &topic, &redis, &prefix, seconds, flush, refresh);
    let ((), (mut samples, lost)) = tokio::join!(
        async {
            let _ = refresher.await;
        },
        async {
            let result = probe.await;
            shutdown.cancel();
            result
        }
    );
    for task in tasks {
        let _ = task.await;
    }
    common::drop_database(&clickhouse).await;

    samples.sort_by(f64::total_cmp);
    let round = |x: f64| x.round();
    serde_json::json!({
        "flush_interval": flush,
        "refresh_interval": refresh,
        "background_events_per_s": rate,
        "probes": samples.len() + lost,
        "lost": lost,
        "p50_ms": round(percentile(&samples, 0.5)),
        "p90_ms": round(percentile(&samples, 0.9)),
        "p99_ms": round(percentile(&samples, 0.99)),
        "max_ms": round(percentile(&samples, 1.0)),
        "samples_ms": samples.iter().map(|x| x.round()).collect::<Vec<_>>(),
    })
}

/// Produces a probe play every 500 ms for `seconds`, and returns how long each took to show in
/// Redis (ms), and how many never showed.
async fn probe(
    brokers: &str,
    topic: &str,
    redis: &topk::cache::Redis,
    prefix: &str,
    seconds: u64,
    flush: &str,
    refresh: &str,
) -> (Vec<f64>, usize) {
    let producer = topk::kafka::producer(brokers).expect("producer");
    let mut pending: BTreeMap<u64, Instant> = BTreeMap::new();
    let mut samples: Vec<f64> = Vec::new();
    let started = Instant::now();
    let produce_until = started + Duration::from_secs(seconds);
    // A probe not visible after this long is reported as lost (it should never happen).
    let give_up =
        produce_until + Duration::from_secs(60) + 2 * parse_secs(flush) + 2 * parse_secs(refresh);
    let mut next_probe = started;
    let mut serial = 0u64;
    let mut lost = 0usize;
    loop {
        let now = Instant::now();
        if now >= next_probe && now < produce_until {
            serial += 1;
            let user = PROBE_USER_BASE + serial;
            let ts = topk::clock::Clock::now_ms(&topk::clock::SystemClock);
            let value = format!(
                r#"{{"event_id":"probe-{serial}","user_id":{user},"song_id":7,"timestamp":{ts}}}"#
            );
            let key = user.to_string();
            let sent_at = Instant::now();
            producer
                .send(
                    FutureRecord::to(topic).key(&key).payload(&value),
                    Duration::from_secs(10),
                )
                .await
                .expect("probe delivered");
            pending.insert(user, sent_at);
            next_probe += Duration::from_millis(500);
        }
        let mut seen = Vec::new();
        for (&user, &sent_at) in &pending {
            if let Ok(Some(answer)) = redis.read_top(prefix, user, 10).await {
                if !answer.songs.is_empty() {
                    seen.push(user);
                    samples.push(sent_at.elapsed().as_secs_f64() * 1000.0);
                }
            }
        }
        for user in seen {
            pending.remove(&user);
        }
        if now >= produce_until && pending.is_empty() {
            break;
        }
        if now >= give_up {
            lost = pending.len();
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (samples, lost)
}

fn parse_secs(text: &str) -> Duration {
    humantime::parse_duration(text).unwrap_or(Duration::from_secs(60))
}

#[tokio::main]
async fn main() {
    topk::telemetry::init_logging();
    let configs = std::env::var("TOPK_BENCH_FRESHNESS").unwrap_or_else(|_| "5s/5s,60s/60s".into());
    let seconds: u64 = env_or("TOPK_BENCH_SECONDS", 90);
    let rate: u32 = env_or("TOPK_BENCH_RATE", 2_000);
    let mut results = Vec::new();
    for config in configs.split(',') {
        let (flush, refresh) = config.split_once('/').unwrap_or((config, config));
        eprintln!("freshness with flush every {flush}, refresh every {refresh}…");
        let result = measure(flush.trim(), refresh.trim(), seconds, rate).await;
        eprintln!(
            "  p50 {} ms, p99 {} ms, max {} ms over {} probes",
            result["p50_ms"], result["p99_ms"], result["max_ms"], result["probes"]
        );
        results.push(result);
    }
    println!(
        "{}",
        serde_json::json!({ "benchmark": "freshness", "configs": results })
    );
}
