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
