//! The project's Kafka client code against both real brokers: a keyed message goes through a
//! consumer group with manual commits, and a restarted member resumes after the commit.

mod common;

use std::time::Duration;

use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::FutureRecord;
use rdkafka::{Offset, TopicPartitionList};
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(60);

async fn next(consumer: &StreamConsumer) -> (i32, i64, String, String) {
    let message = timeout(WAIT, consumer.recv())
        .await
        .expect("a message within 60 s")
        .expect("no consumer error");
    let text = |b: Option<&[u8]>| String::from_utf8(b.expect("present").to_vec()).expect("utf-8");
    (
        message.partition(),
        message.offset(),
        text(message.key()),
        text(message.payload()),
    )
}

async fn keyed_round_trip_with_commit(brokers: &str, topic: &str) {
    let producer = topk::kafka::producer(brokers).expect("producer");
    for i in 0..3 {
        let payload = format!("m{i}");
        producer
            .send(
                FutureRecord::to(topic).key("42").payload(&payload),
                Duration::from_secs(30),
            )
            .await
            .expect("delivered");
    }
    let group = common::unique("group");

    let consumer = topk::kafka::consumer(brokers, &group).expect("consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let (p0, o0, k0, v0) = next(&consumer).await;
    let (p1, o1, k1, v1) = next(&consumer).await;
    assert_eq!(
        (k0.as_str(), v0.as_str(), k1.as_str(), v1.as_str()),
        ("42", "m0", "42", "m1")
    );
    assert_eq!(p0, p1, "one key, one partition");
    assert_eq!(o1, o0 + 1);
    let mut offsets = TopicPartitionList::new();
    offsets
        .add_partition_offset(topic, p1, Offset::Offset(o1 + 1))
        .expect("tpl");
    consumer.commit(&offsets, CommitMode::Sync).expect("commit");
    drop(consumer);

    let resumed = topk::kafka::consumer(brokers, &group).expect("consumer");
    resumed.subscribe(&[topic]).expect("subscribe");
    let (p2, o2, k2, v2) = next(&resumed).await;
    assert_eq!(
        (p2, o2, k2.as_str(), v2.as_str()),
        (p0, o1 + 1, "42", "m2"),
        "resumes after the commit"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn dev_broker_round_trip() {
    let broker = topk_devbroker::DevBroker::start(100).expect("mock cluster");
    let topic = common::unique("plays");
    broker.create_topic(&topic, 3).expect("topic");
    keyed_round_trip_with_commit(&broker.bootstrap_servers(), &topic).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn tansu_round_trip() {
    let brokers = common::tansu_brokers();
    let topic = common::unique("plays");
    topk::kafka::ensure_topics(&brokers, &[&topic], 3)
        .await
        .unwrap_or_else(|e| {
            panic!("tansu must run at {brokers} (scripts/stack up with TOPK_BROKER=both): {e}")
        });
    // A second call is a no-op: topic creation is idempotent.
    topk::kafka::ensure_topics(&brokers, &[&topic], 3)
        .await
        .expect("idempotent");
    keyed_round_trip_with_commit(&brokers, &topic).await;
}
