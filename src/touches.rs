//! Touches: the users whose counts a write changed, told to the refreshers through Kafka.
//!
//! Every writer of counts (an aggregator's flush, a backfill) publishes one message per user it
//! wrote counts for to `<topic>.touches`, **after** the counts are acknowledged by ClickHouse and
//! **before** it commits (or reports) what it wrote, and waits for every delivery. The refreshers
//! consume the topic as one consumer group, so each user's touches reach exactly one of them.
//!
//! A touch is the user id in decimal, as key and payload, on partition `user_id % partitions`
//! (explicit, not the client's hash): a user's touches always land on the same partition, and
//! whoever knows the partition count (the warm-up scheduling answers) finds a user's partition
//! without Kafka's partitioner. A replayed write publishes its touches again: a refresher then
//! recomputes the user once more, which changes nothing.

use std::collections::BTreeSet;
use std::time::Duration;

use futures::future::join_all;
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::metadata::Metadata;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};

/// How long a metadata request (the touches topic's partition count) may take.
pub const METADATA_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a touch may wait in the producer before its delivery counts as failed.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(30);

/// Errors publishing touches or reading the topic.
#[derive(Debug, thiserror::Error)]
pub enum TouchError {
    #[error("cannot read the metadata of {topic}")]
    Metadata {
        topic: String,
        #[source]
        source: KafkaError,
    },
    #[error("topic {topic} does not exist (create it with `topk create-topics`)")]
    NoTopic { topic: String },
    #[error("a touch of user {user_id} was not delivered to {topic}")]
    Delivery {
        topic: String,
        user_id: u64,
        #[source]
        source: KafkaError,
    },
}

/// A touch message that is not a user id (nothing of topk's writes it).
#[derive(Debug, thiserror::Error)]
#[error("a touch is a user id in decimal, not {payload:?}")]
pub struct BadTouch {
    pub payload: String,
}

/// The touches topic of the plays topic `topic`.
pub fn topic(plays_topic: &str) -> String {
    format!("{plays_topic}.touches")
}

/// The partition of `user_id`'s touches among `partitions` (> 0).
pub fn partition_of(user_id: u64, partitions: u32) -> i32 {
    let index = user_id % u64::from(partitions.max(1));
    i32::try_from(index).unwrap_or(i32::MAX)
}

/// The user a touch names.
pub fn user_of(payload: &[u8]) -> Result<u64, BadTouch> {
    std::str::from_utf8(payload)
        .ok()
        .filter(|text| !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|text| text.parse().ok())
        .ok_or_else(|| BadTouch {
            payload: String::from_utf8_lossy(payload).chars().take(64).collect(),
        })
}

/// The number of partitions of `topic`, from the brokers' metadata.
pub async fn partitions(producer: &FutureProducer, topic: &str) -> Result<u32, TouchError> {
    let producer = producer.clone();
    let name = topic.to_owned();
    let metadata = crate::kafka::blocking(move || {
        producer
            .client()
            .fetch_metadata(Some(&name), METADATA_TIMEOUT)
    })
    .await;
    partitions_in(metadata, topic)
}

/// The number of partitions of `topic` in a metadata answer (any client's: a consumer reads it
/// through [`Consumer::fetch_metadata`](rdkafka::consumer::Consumer::fetch_metadata) with
/// [`METADATA_TIMEOUT`]).
pub fn partitions_in(metadata: KafkaResult<Metadata>, topic: &str) -> Result<u32, TouchError> {
    let metadata = metadata.map_err(|source| TouchError::Metadata {
        topic: topic.to_owned(),
        source,
    })?;
    let count = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic && t.error().is_none())
        .map(|t| t.partitions().len())
        .sum::<usize>();
    match u32::try_from(count) {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(TouchError::NoTopic {
            topic: topic.to_owned(),
        }),
    }
}

/// Publishes one touch per user of `users` to `topic` and waits for every delivery; returns how
/// many were published.
pub async fn publish(
    producer: &FutureProducer,
    topic: &str,
    users: &BTreeSet<u64>,
) -> Result<usize, TouchError> {
    if users.is_empty() {
        return Ok(0);
    }
    let partitions = partitions(producer, topic).await?;
    let texts: Vec<(u64, String)> = users.iter().map(|&u| (u, u.to_string())).collect();
    let results = join_all(texts.iter().map(|(user_id, text)| {
        let record = FutureRecord::<str, str>::to(topic)
            .partition(partition_of(*user_id, partitions))
            .key(text)
            .payload(text);
        producer.send(record, DELIVERY_TIMEOUT)
    }))
    .await;
    for ((user_id, _), result) in texts.iter().zip(results) {
        if let Err((source, _)) = result {
            return Err(TouchError::Delivery {
                topic: topic.to_owned(),
                user_id: *user_id,
                source,
            });
        }
    }
    Ok(texts.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_user_keeps_its_partition_and_every_partition_is_used() {
        assert_eq!(partition_of(0, 8), 0);
        assert_eq!(partition_of(17, 8), 1);
        assert_eq!(partition_of(u64::MAX, 8), 7);
        assert_eq!(partition_of(5, 1), 0);
        let used: BTreeSet<i32> = (0..64).map(|u| partition_of(u, 8)).collect();
        assert_eq!(used, (0..8).collect());
    }

    #[test]
    fn touches_are_decimal_user_ids() {
        assert_eq!(user_of(b"42").unwrap(), 42);
        assert_eq!(user_of(u64::MAX.to_string().as_bytes()).unwrap(), u64::MAX);
        for bad in [
            &b""[..],
            b"-1",
            b"+1",
            b"1.0",
            b" 1",
            b"18446744073709551616",
            b"\xff",
        ] {
            assert!(user_of(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_touches_topic_belongs_to_the_plays_topic() {
        assert_eq!(topic("plays"), "plays.touches");
    }
}
