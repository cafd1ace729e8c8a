//! Randomised play traffic with its exact ground truth, computed independently of the
//! aggregator (from what was generated, never by running the validator).
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::ops::Range;
use std::time::Duration;

use futures::future::join_all;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rdkafka::consumer::Consumer;
use rdkafka::message::{Headers, Message};
use rdkafka::producer::FutureRecord;

const MINUTE_MS: i64 = 60_000;
const DAY_MS: i64 = 24 * 60 * MINUTE_MS;

/// Messages to produce (key, value) and what the aggregator must make of them.
#[derive(Debug, Default, Clone)]
pub struct Workload {
    pub messages: Vec<(String, Vec<u8>)>,
    /// Exact plays per (user, song).
    pub truth: BTreeMap<(u64, u64), u64>,
    /// Messages the aggregator must dead-letter, by reason.
    pub dead: BTreeMap<String, u64>,
    next_event: u64,
}

/// The shape of generated traffic.
#[derive(Debug, Clone, Copy)]
pub struct Mix {
    pub users: u64,
    pub songs: u64,
    /// Fraction of messages that re-send an earlier play (same event_id).
    pub dup_rate: f64,
    /// Fraction of malformed messages.
    pub bad_rate: f64,
}

impl Workload {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `n` messages around `now_ms`: valid plays spread over the past 7 days (late ones
    /// included), `dup_rate` of them sent twice, `bad_rate` malformed messages of every kind.
    /// Returns where the new messages are in `messages` (to produce just those).
    pub fn add(&mut self, rng: &mut StdRng, n: usize, now_ms: i64, mix: Mix) -> Range<usize> {
        let first = self.messages.len();
        let Mix {
            users,
            songs,
            dup_rate,
            bad_rate,
        } = mix;
        let mut sent: Vec<(String, Vec<u8>)> = Vec::new();
        for _ in 0..n {
            if rng.random_bool(bad_rate) {
                let (key, value, reason) = malformed(rng, now_ms);
                self.messages.push((key, value.into_bytes()));
                *self.dead.entry(reason.to_owned()).or_default() += 1;
                continue;
            }
            if !sent.is_empty() && rng.random_bool(dup_rate) {
                let again = sent[rng.random_range(0..sent.len())].clone();
                self.messages.push(again);
                continue;
            }
            let user = rng.random_range(1..=users);
            let song = rng.random_range(1..=songs);
            let age = if rng.random_bool(0.2) {
                rng.random_range(0..7 * DAY_MS)
            } else {
                rng.random_range(0..MINUTE_MS * 5)
            };
            self.next_event += 1;
            let event_id = format!("ev-{:08}-{:x}", self.next_event, rng.random::<u32>());
            let timestamp = if rng.random_bool(0.3) {
                serde_json::Value::String(rfc3339(now_ms - age))
            } else {
                serde_json::Value::from(now_ms - age)
            };
            let value = serde_json::json!({
                "event_id": event_id, "user_id": user, "song_id": song, "timestamp": timestamp,
            })
            .to_string();
            let message = (user.to_string(), value.into_bytes());
            sent.push(message.clone());
            self.messages.push(message);
            *self.truth.entry((user, song)).or_default() += 1;
        }
        first..self.messages.len()
    }

    /// Total plays the aggregator must count.
    pub fn total(&self) -> u64 {
        self.truth.values().sum()
    }

    pub fn dead_total(&self) -> u64 {
        self.dead.values().sum()
    }
}

fn rfc3339(ms: i64) -> String {
    let at = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .expect("in range");
    at.format(&time::format_description::well_known::Rfc3339)
        .expect("formats")
}

fn malformed(rng: &mut StdRng, now_ms: i64) -> (String, String, &'static str) {
    let id = format!("bad-{:x}", rng.random::<u64>());
    match rng.random_range(0..8) {
        0 => ("1".into(), "{not json".into(), "invalid_json"),
        1 => (
            "1".into(),
            format!(r#"{{"event_id":"{id}","user_id":1,"timestamp":{now_ms}}}"#),
            "missing_field",
        ),
        2 => (
            "-5".into(),
            format!(r#"{{"event_id":"{id}","user_id":-5,"song_id":1,"timestamp":{now_ms}}}"#),
            "bad_id",
        ),
        3 => (
            "1".into(),
            format!(r#"{{"event_id":"","user_id":1,"song_id":1,"timestamp":{now_ms}}}"#),
            "bad_event_id",
        ),
        4 => (
            "1".into(),
            format!(r#"{{"event_id":"{id}","user_id":1,"song_id":1,"timestamp":"yesterday"}}"#),
            "bad_timestamp",
        ),
        5 => {
            let ts = now_ms + 3_600_000;
            (
                "1".into(),
                format!(r#"{{"event_id":"{id}","user_id":1,"song_id":1,"timestamp":{ts}}}"#),
                "future_timestamp",
            )
        }
        6 => {
            let ts = now_ms - 9 * DAY_MS;
            (
                "1".into(),
                format!(r#"{{"event_id":"{id}","user_id":1,"song_id":1,"timestamp":{ts}}}"#),
                "too_old",
            )
        }
        _ => ("1".into(), "[1, 2, 3]".into(), "invalid_json"),
    }
}

/// A seeded generator (the seed is printed so a failure can be replayed).
pub fn rng(test: &str) -> StdRng {
    let seed: u64 = std::env::var("TOPK_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("{test}: TOPK_TEST_SEED={seed}");
    StdRng::seed_from_u64(seed)
}

pub fn now_ms() -> i64 {
    i64::try_from(time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000).expect("fits")
}

/// Produces `messages` in order per key (one producer, acks=all, no reordering).
pub async fn produce(brokers: &str, topic: &str, messages: &[(String, Vec<u8>)]) {
    let producer = topk::kafka::producer(brokers).expect("producer");
    for chunk in messages.chunks(2_000) {
        let sends = chunk.iter().map(|(key, value)| {
            producer.send(
                FutureRecord::to(topic)
                    .key(key.as_str())
                    .payload(value.as_slice()),
                Duration::from_secs(60),
            )
        });
        for result in join_all(sends).await {
            result.expect("delivered");
        }
    }
}

#[derive(Debug, clickhouse::Row, serde::Deserialize)]
struct TotalRow {
    user_id: u64,
    song_id: u64,
    plays: u64,
}

/// Plays per (user, song) in ClickHouse, deduplicated by the full key as every reader must: on
/// a cluster, every shard's (a user's rows are on one shard, so the maps never overlap).
pub async fn totals(args: &topk::config::ClickHouseArgs) -> BTreeMap<(u64, u64), u64> {
    let mut totals = BTreeMap::new();
    for shard in topk::olap::Olap::open(args).shards() {
        let rows: Vec<TotalRow> = shard
            .query("SELECT user_id, song_id, sum(plays) AS plays FROM plays_minute FINAL GROUP BY user_id, song_id")
            .fetch_all()
            .await
            .expect("totals query");
        for r in rows {
            assert!(
                totals.insert((r.user_id, r.song_id), r.plays).is_none(),
                "user {} has rows on two shards",
                r.user_id
            );
        }
    }
    totals
}

/// Sum of all plays in ClickHouse, every shard's (`None` while ClickHouse does not answer).
pub async fn grand_total(args: &topk::config::ClickHouseArgs) -> Option<u64> {
    let mut total = 0;
    for shard in topk::olap::Olap::open(args).shards() {
        total += shard
            .query("SELECT sum(plays) FROM plays_minute FINAL")
            .fetch_one::<u64>()
            .await
            .ok()?;
    }
    Some(total)
}

/// Waits until ClickHouse holds at least `expected` plays, then a little longer so that an
/// over-count would show; panics after `limit`.
pub async fn wait_for_total(args: &topk::config::ClickHouseArgs, expected: u64, limit: Duration) {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let total = grand_total(args).await.unwrap_or(0);
        if total >= expected {
            tokio::time::sleep(Duration::from_millis(1_500)).await;
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {total} of {expected} plays after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Reads the dead-letter topic until `expected` messages arrived; counts them by `reason`.
pub async fn dead_letters(brokers: &str, dlq_topic: &str, expected: u64) -> BTreeMap<String, u64> {
    let consumer = topk::kafka::consumer(brokers, &super::unique("dlq-reader")).expect("consumer");
    consumer.subscribe(&[dlq_topic]).expect("subscribe");
    let mut by_reason = BTreeMap::new();
    let mut seen = std::collections::BTreeSet::new();
    while (seen.len() as u64) < expected {
        let message = tokio::time::timeout(Duration::from_secs(60), consumer.recv())
            .await
            .unwrap_or_else(|_| panic!("only {} of {expected} dead letters", seen.len()))
            .expect("no consumer error");
        let headers = message.headers().expect("dead letters carry headers");
        let header = |name: &str| {
            headers
                .iter()
                .find(|h| h.key == name)
                .and_then(|h| h.value)
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .unwrap_or_else(|| panic!("header {name} missing"))
        };
        // At-least-once: a replayed batch may send a dead letter twice; count each source once.
        if seen.insert((header("source_partition"), header("source_offset"))) {
            *by_reason.entry(header("reason")).or_insert(0) += 1;
        }
    }
    by_reason
}

/// Every touch on `touches_topic` up to its high watermarks, as (partition, user), with the
/// topic's partition count. Panics on a touch that is not a user id.
pub async fn touches(brokers: &str, touches_topic: &str) -> (u32, Vec<(i32, u64)>) {
    let brokers = brokers.to_owned();
    let topic = touches_topic.to_owned();
    tokio::task::spawn_blocking(move || {
        let consumer: rdkafka::consumer::BaseConsumer =
            topk::kafka::consumer_config(&brokers, &super::unique("touch-reader"))
                .create()
                .expect("consumer");
        let timeout = Duration::from_secs(10);
        let metadata = consumer
            .fetch_metadata(Some(&topic), timeout)
            .expect("metadata");
        let partitions: Vec<i32> = metadata.topics()[0]
            .partitions()
            .iter()
            .map(|p| p.id())
            .collect();
        let mut assignment = rdkafka::TopicPartitionList::new();
        let mut left: BTreeMap<i32, i64> = BTreeMap::new();
        for &partition in &partitions {
            let (low, high) = consumer
                .fetch_watermarks(&topic, partition, timeout)
                .expect("watermarks");
            assignment
                .add_partition_offset(&topic, partition, rdkafka::Offset::Offset(low))
                .expect("offset");
            if high > low {
                left.insert(partition, high);
            }
        }
        consumer.assign(&assignment).expect("assign");
        let mut touches = Vec::new();
        while !left.is_empty() {
            let message = consumer
                .poll(Duration::from_secs(60))
                .unwrap_or_else(|| panic!("touches stop short of {left:?}"))
                .expect("no consumer error");
            let user = topk::touches::user_of(message.payload().unwrap_or_default())
                .expect("a touch names a user");
            touches.push((message.partition(), user));
            if left
                .get(&message.partition())
                .is_some_and(|&high| message.offset() + 1 >= high)
            {
                left.remove(&message.partition());
            }
        }
        (partitions.len() as u32, touches)
    })
    .await
    .expect("touch reader")
}

/// Asserts exact equality of two totals maps, reporting only the keys that differ.
pub fn assert_same_totals(
    actual: &BTreeMap<(u64, u64), u64>,
    expected: &BTreeMap<(u64, u64), u64>,
) {
    let keys: std::collections::BTreeSet<_> = actual.keys().chain(expected.keys()).collect();
    let diff: Vec<String> = keys
        .into_iter()
        .filter(|k| actual.get(k) != expected.get(k))
        .take(20)
        .map(|k| {
            format!(
                "(user {}, song {}): counted {:?}, truth {:?}",
                k.0,
                k.1,
                actual.get(k),
                expected.get(k)
            )
        })
        .collect();
    assert!(
        diff.is_empty(),
        "totals differ from the oracle ({} of {} plays counted, {} expected); first differences:\n{}",
        actual.values().sum::<u64>(),
        expected.values().sum::<u64>(),
        expected.values().sum::<u64>(),
        diff.join("\n")
    );
}
