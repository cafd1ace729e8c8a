//! What a consumer group committed, read by a client of the group that never joins it. Shared
//! with the benchmarks (`benches/common` includes this file), so it uses nothing else of
//! `tests/common`.

use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaResult;
use rdkafka::{Offset, TopicPartitionList};

/// A client of `group` that never joins it: it only reads what the group committed (and the
/// topic's metadata and watermarks).
pub fn reader(brokers: &str, group: &str) -> BaseConsumer {
    topk::kafka::consumer_config(brokers, group)
        .create()
        .expect("consumer")
}

/// The offsets the group of `reader` committed on `partitions` of `topic`, in that order
/// (`None` where it committed none); an error while the broker does not answer within 10 s.
pub fn committed_offsets(
    reader: &BaseConsumer,
    topic: &str,
    partitions: impl IntoIterator<Item = i32>,
) -> KafkaResult<Vec<Option<i64>>> {
    let partitions: Vec<i32> = partitions.into_iter().collect();
    let mut list = TopicPartitionList::new();
    for &partition in &partitions {
        list.add_partition(topic, partition);
    }
    let committed = reader.committed_offsets(list, Duration::from_secs(10))?;
    Ok(partitions
        .iter()
        .map(
            |&partition| match committed.find_partition(topic, partition)?.offset() {
                Offset::Offset(n) => Some(n),
                _ => None,
            },
        )
        .collect())
}

/// Waits until `group` committed at least `end` on partition 0 of `topic`; returns what it
/// committed. Bounded only so that a stall fails the test instead of hanging it (2 minutes);
/// no timing is asserted.
pub async fn wait_for_commit(brokers: &str, group: &str, topic: &str, end: i64) -> i64 {
    let reader = reader(brokers, group);
    let mut last = None;
    for _ in 0..600 {
        let committed = committed_offsets(&reader, topic, [0])
            .ok()
            .and_then(|offsets| offsets[0]);
        if let Some(n) = committed.filter(|&n| n >= end) {
            return n;
        }
        last = committed.or(last);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("the committed offset stays at {last:?}, never reaching {end}: the partition stalled");
}
