//! Shared by the broker benchmarks: settings from the environment, unique names, synthetic
//! traffic and the consume-and-discard baseline every worker is compared with.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use futures::future::join_all;
use rdkafka::consumer::Consumer;
use rdkafka::producer::FutureRecord;

pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

pub fn unique(prefix: &str) -> String {
    format!("{prefix}_{:016x}", rand::random::<u64>())
}

/// Settings of a fresh database (named `<prefix>_<random>`) on the stack's ClickHouse.
pub fn clickhouse_args(prefix: &str) -> topk::config::ClickHouseArgs {
    topk::config::ClickHouseArgs {
        url: std::env::var("TOPK_CLICKHOUSE_URL")
            .unwrap_or_else(|_| "http://127.0.0.1:8123".into()),
        database: unique(prefix),
        user: "default".into(),
        password_file: None,
        password_env: None,
    }
}

/// Drops the database of `args` (a bench's fresh one); a failure only leaves it behind.
pub async fn drop_database(args: &topk::config::ClickHouseArgs) {
    let _ = topk::olap::server_client(args)
        .query(&format!("DROP DATABASE IF EXISTS {}", args.database))
        .execute()
        .await;
}

/// Inserts `rows` minute rows for `users` users spread over the 9 days before `window` ends,
/// generated inside ClickHouse: each user repeats ~30 favourite songs out of 2,000.
pub async fn generate_minute_rows(
    client: &clickhouse::Client,
    window: topk::window::Window,
    users: u64,
    rows: u64,
) {
    let span = 9 * 86_400u64;
    let newest = u64::from(window.end) - 60;
    eprintln!("generating {rows} minute rows for {users} users over 9 days…");
    client
        .query(&format!(
            "INSERT INTO plays_minute (user_id, song_id, minute, plays, batch_id) \
             SELECT number % {users} + 1, \
                    ((number % {users}) * 7919 + cityHash64(number) % 30) % 2000 + 1, \
                    toStartOfMinute(toDateTime({newest} - (cityHash64(number, 1) % {span}))), \
                    1 + number % 3, intDiv(number, 100000) \
             FROM numbers({rows})"
        ))
        .execute()
        .await
        .expect("generate");
}

/// Produces `events` valid plays of `users` users and 10,000 songs spread over the last hour;
/// returns the seconds it took.
pub async fn produce(brokers: &str, topic: &str, events: u64, users: u64) -> f64 {
    let songs = 10_000;
    let now = time::OffsetDateTime::now_utc().unix_timestamp() * 1000;
    let producer = topk::kafka::producer(brokers).expect("producer");
    let started = Instant::now();
    let mut next = 0u64;
    while next < events {
        let chunk: Vec<(String, String)> = (next..(next + 5_000).min(events))
            .map(|i| {
                let user = (i * 7_919) % users + 1;
                let song = (i * 104_729) % songs + 1;
                let ts = now - ((i % 3_600) as i64) * 1000;
                (
                    user.to_string(),
                    format!(r#"{{"event_id":"e{i}","user_id":{user},"song_id":{song},"timestamp":{ts}}}"#),
                )
            })
            .collect();
        next += chunk.len() as u64;
        let sends = chunk.iter().map(|(key, value)| {
            producer.send(
                FutureRecord::to(topic).key(key).payload(value),
                Duration::from_secs(60),
            )
        });
        for result in join_all(sends).await {
            result.expect("delivered");
        }
    }
    started.elapsed().as_secs_f64()
}

/// The baseline: a fresh group consumes `events` messages and discards them; returns the
/// seconds it took (group join included).
pub async fn consume_and_discard(brokers: &str, topic: &str, events: u64) -> f64 {
    let consumer = topk::kafka::consumer(brokers, &unique("bench_baseline")).expect("consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let started = Instant::now();
    let mut seen = 0u64;
    while seen < events {
        let message = consumer.recv().await.expect("message");
        std::hint::black_box(&message);
        seen += 1;
    }
    started.elapsed().as_secs_f64()
}
