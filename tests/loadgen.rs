//! `topk loadgen` speaks the public contract: every message it reports as a play validates,
//! is keyed by its user id, and the malformed ones are refused by the validator. Its ground
//! truth is what the aggregator counts.

mod common;

use common::workload;

use std::time::Duration;

use rdkafka::consumer::Consumer;
use rdkafka::message::Message;
use tokio_util::sync::CancellationToken;

fn loadgen_args(kafka: &topk::config::KafkaArgs, extra: &[&str]) -> topk_loadgen::LoadgenArgs {
    let mut argv = vec![
        format!("--kafka-brokers={}", kafka.brokers),
        format!("--kafka-topic={}", kafka.topic),
    ];
    argv.extend(extra.iter().map(|s| (*s).to_owned()));
    common::flags::parse(argv)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ground_truth_is_what_the_aggregator_counts() {
    let (broker, topic) = common::dev_broker(4);
    let brokers = broker.bootstrap_servers();
    let kafka = topk::config::KafkaArgs {
        brokers: brokers.clone(),
        topic: topic.clone(),
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let truth_path = dir.path().join("truth.json");
    let truth_flag = format!("--truth={}", truth_path.display());
    let args = loadgen_args(
        &kafka,
        &[
            "--rate=2000",
            "--duration=2s",
            "--users=200",
            "--songs=300",
            "--duplicate-rate=0.05",
            "--malformed-rate=0.02",
            "--late-rate=0.1",
            &truth_flag,
        ],
    );
    let sent = topk_loadgen::run(args, CancellationToken::new())
        .await
        .expect("runs");
    let truth: topk_loadgen::Truth =
        serde_json::from_slice(&std::fs::read(&truth_path).expect("truth written"))
            .expect("truth parses");
    assert_eq!(
        (truth.plays, truth.duplicates, truth.malformed),
        (sent.plays, sent.duplicates, sent.malformed)
    );
    assert_eq!(
        truth.totals.iter().map(|[_, _, n]| n).sum::<u64>(),
        sent.plays
    );
    // Sessions repeat songs: fewer (user, song) pairs than plays.
    assert!(
        truth.totals.len() < truth.plays as usize,
        "{}",
        truth.totals.len()
    );

    let clickhouse = common::migrated_database().await;
    let args = common::aggregator_args(&brokers, &topic, &clickhouse, &["--flush-interval=500ms"]);
    let shutdown = CancellationToken::new();
    let worker = tokio::spawn(topk_aggregator::run(args, shutdown.clone()));
    workload::wait_for_total(&clickhouse, sent.plays, Duration::from_secs(120)).await;
    shutdown.cancel();
    worker.await.expect("joins").expect("clean shutdown");
    let expected = truth
        .totals
        .iter()
        .map(|&[user, song, plays]| ((user, song), plays))
        .collect();
    workload::assert_same_totals(&workload::totals(&clickhouse).await, &expected);
    common::drop_database(&clickhouse).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_follows_the_event_contract() {
    let broker = topk_devbroker::DevBroker::start(100).expect("mock cluster");
    let kafka = common::kafka_args(&broker.bootstrap_servers());
    broker.create_topic(&kafka.topic, 4).expect("topic");
    let args = loadgen_args(
        &kafka,
        &[
            "--rate=1000",
            "--duration=2s",
            "--users=50",
            "--songs=20",
            "--duplicate-rate=0.05",
            "--malformed-rate=0.05",
            "--late-rate=0.2",
        ],
    );
    let sent = topk_loadgen::run(args, CancellationToken::new())
        .await
        .expect("runs");
    assert!(
        sent.plays > 500 && sent.duplicates > 0 && sent.malformed > 0,
        "{sent:?}"
    );

    let consumer =
        topk::kafka::consumer(&kafka.brokers, &common::unique("reader")).expect("consumer");
    consumer.subscribe(&[&kafka.topic]).expect("subscribe");
    let validator = topk::event::Validator::default();
    let total = sent.plays + sent.duplicates + sent.malformed;
    let (mut valid, mut refused) = (0u64, 0u64);
    let mut ids = std::collections::HashSet::new();
    for _ in 0..total {
        let message = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
            .await
            .expect("every sent message arrives")
            .expect("no error");
        let at = message.timestamp().to_millis().expect("timestamped");
        match validator.validate(message.payload().expect("payload"), at) {
            Ok(event) => {
                valid += 1;
                assert_eq!(message.key(), Some(event.user_id.to_string().as_bytes()));
                assert!((1..=50).contains(&event.user_id) && (1..=20).contains(&event.song_id));
                ids.insert(event.event_id);
            }
            Err(_) => refused += 1,
        }
    }
    assert_eq!(refused, sent.malformed);
    assert_eq!(valid, sent.plays + sent.duplicates);
    assert_eq!(
        ids.len() as u64,
        sent.plays,
        "duplicates re-send existing event ids"
    );
}
