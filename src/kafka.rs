//! Kafka clients configured the way topk relies on them.
//!
//! Consumers never auto-commit and never auto-store offsets: a role stores and commits an offset
//! only once what it did with the message is durable (the at-least-once loop of rust-rdkafka's
//! `examples/at_least_once.rs`, made exactly-once by the aggregator's flush protocol).

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::FutureProducer;
use rdkafka::{Offset, TopicPartitionList};

/// Errors from the Kafka helpers.
#[derive(Debug, thiserror::Error)]
pub enum KafkaClientError {
    #[error("cannot create the Kafka client")]
    Create(#[source] KafkaError),
    #[error("cannot create topic {topic}")]
    CreateTopic {
        topic: String,
        #[source]
        source: KafkaError,
    },
    #[error("cannot create topic {topic}: {code}")]
    CreateTopicRefused {
        topic: String,
        code: RDKafkaErrorCode,
    },
}

/// Base client settings: loopback-friendly timeouts and quiet logs. `TOPK_KAFKA_DEBUG` turns on
/// librdkafka's own debug contexts (e.g. `cgrp,protocol` for group membership), logged at
/// `RUST_LOG=librdkafka=debug`-level detail through the process's log.
pub fn base_config(brokers: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers)
        .set("socket.keepalive.enable", "true")
        .set("log_level", "4");
    if let Some(contexts) = std::env::var("TOPK_KAFKA_DEBUG")
        .ok()
        .filter(|v| !v.is_empty())
    {
        config.set("debug", contexts).set("log_level", "7");
    }
    // Any librdkafka property, for the broker at hand: `key=value` pairs separated by commas.
    if let Ok(options) = std::env::var("TOPK_KAFKA_OPTIONS") {
        for (key, value) in options.split(',').filter_map(|pair| pair.split_once('=')) {
            config.set(key.trim(), value.trim());
        }
    }
    config
}

/// A producer that waits for the full ISR and retries without reordering.
pub fn producer(brokers: &str) -> Result<FutureProducer, KafkaClientError> {
    base_config(brokers)
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("message.timeout.ms", "30000")
        .set("max.in.flight.requests.per.connection", "1")
        // Above librdkafka's 1,000,000-byte default: a dead letter is its message plus headers,
        // and Kafka's default topic limit (1,048,588) lets messages into `plays` that the
        // default would refuse to re-send. The broker's own limit still applies (see the
        // aggregator's dead-letter fallback).
        .set("message.max.bytes", "16777216")
        .create()
        .map_err(KafkaClientError::Create)
}

/// Consumer settings of a member of `group`: manual offset store and commit, start at the
/// beginning of a partition the group never committed.
pub fn consumer_config(brokers: &str, group: &str) -> ClientConfig {
    let mut config = base_config(brokers);
    config
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "false")
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "1000")
        .set("max.poll.interval.ms", "300000")
        // librdkafka waits this long before fetching again once its local queue is full; the
        // default (1 s) leaves a consumer that drains faster idle for most of each second.
        .set("fetch.queue.backoff.ms", "10");
    config
}

/// Settings of a long-running group member (a worker): [`consumer_config`] with the group's
/// session timeout (how long a dead member keeps its partitions) and a bounded local queue.
pub fn member_config(brokers: &str, group: &str, session_timeout: Duration) -> ClientConfig {
    let mut config = consumer_config(brokers, group);
    config
        .set(
            "session.timeout.ms",
            session_timeout.as_millis().to_string(),
        )
        .set(
            "heartbeat.interval.ms",
            (session_timeout.as_millis() / 4).max(100).to_string(),
        )
        .set("queued.max.messages.kbytes", "16384");
    config
}

/// Pauses or resumes fetching on every partition assigned to `consumer` (backpressure).
/// librdkafka drops what it prefetched for paused partitions and fetches again from the consumed
/// position on resume.
pub fn pause_assignment<C: Consumer<X>, X: ConsumerContext>(
    consumer: &C,
    pause: bool,
) -> Result<(), KafkaError> {
    let assignment = consumer.assignment()?;
    if pause {
        consumer.pause(&assignment)
    } else {
        consumer.resume(&assignment)
    }
}

/// A stream consumer in `group` with a custom context (rebalance callbacks).
pub fn consumer_with_context<C: ConsumerContext + 'static>(
    config: &ClientConfig,
    context: C,
) -> Result<StreamConsumer<C>, KafkaClientError> {
    config
        .create_with_context(context)
        .map_err(KafkaClientError::Create)
}

/// A stream consumer in `group` with the default context.
pub fn consumer(brokers: &str, group: &str) -> Result<StreamConsumer, KafkaClientError> {
    consumer_config(brokers, group)
        .create()
        .map_err(KafkaClientError::Create)
}

/// Creates `topics` with `partitions` partitions each; topics that exist already are left alone.
pub async fn ensure_topics(
    brokers: &str,
    topics: &[&str],
    partitions: i32,
) -> Result<(), KafkaClientError> {
    let admin: AdminClient<DefaultClientContext> = base_config(brokers)
        .create()
        .map_err(KafkaClientError::Create)?;
    let new_topics: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|name| NewTopic::new(name, partitions, TopicReplication::Fixed(1)))
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let results = admin
        .create_topics(&new_topics, &options)
        .await
        .map_err(|source| KafkaClientError::CreateTopic {
            topic: topics.join(","),
            source,
        })?;
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => return Err(KafkaClientError::CreateTopicRefused { topic, code }),
        }
    }
    Ok(())
}

/// Runs a blocking librdkafka call (metadata, committed offsets, watermarks) off the async
/// runtime's threads. A call whose task panicked or was cancelled with the runtime reads as
/// [`KafkaError::Canceled`].
pub async fn blocking<T: Send + 'static>(
    call: impl FnOnce() -> Result<T, KafkaError> + Send + 'static,
) -> Result<T, KafkaError> {
    tokio::task::spawn_blocking(call)
        .await
        .unwrap_or(Err(KafkaError::Canceled))
}

/// The offsets `group` has committed on every partition of `topic` (0 where it never committed:
/// a member starts there). Reading them does not join the group. Blocking: call it from
/// `spawn_blocking` in async code.
pub fn committed_offsets(
    brokers: &str,
    group: &str,
    topic: &str,
    timeout: Duration,
) -> Result<BTreeMap<i32, u64>, KafkaError> {
    let consumer: BaseConsumer = consumer_config(brokers, group).create()?;
    let metadata = consumer.fetch_metadata(Some(topic), timeout)?;
    let mut list = TopicPartitionList::new();
    for t in metadata.topics() {
        for p in t.partitions() {
            list.add_partition(topic, p.id());
        }
    }
    let committed = consumer.committed_offsets(list, timeout)?;
    Ok(committed
        .elements()
        .iter()
        .map(|e| match e.offset() {
            Offset::Offset(n) => (e.partition(), u64::try_from(n).unwrap_or(0)),
            _ => (e.partition(), 0),
        })
        .collect())
}

/// Where each of `partitions` of `topic` starts for a member of `consumer`'s group: the offset
/// the group committed (`None`: it never did) and the low watermark (the oldest offset the log
/// still holds). A committed offset below the low watermark, or none over a log that lost its
/// start, means messages the group never handled are gone. Blocking: call it from
/// `spawn_blocking` in async code.
pub fn partition_starts<X: ConsumerContext, C: Consumer<X>>(
    consumer: &C,
    topic: &str,
    partitions: &[i32],
    timeout: Duration,
) -> Result<BTreeMap<i32, (Option<u64>, u64)>, KafkaError> {
    let mut list = TopicPartitionList::new();
    for &p in partitions {
        list.add_partition(topic, p);
    }
    let committed = consumer.committed_offsets(list, timeout)?;
    let mut starts = BTreeMap::new();
    for element in committed.elements() {
        let offset = match element.offset() {
            Offset::Offset(n) => u64::try_from(n).ok(),
            _ => None,
        };
        let (low, _high) = consumer.fetch_watermarks(topic, element.partition(), timeout)?;
        starts.insert(
            element.partition(),
            (offset, u64::try_from(low).unwrap_or(0)),
        );
    }
    Ok(starts)
}
