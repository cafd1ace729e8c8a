//! `topk loadgen` speaks the public contract: every message it reports as a play validates,
//! is keyed by its user id, and the malformed ones are refused by the validator.

mod common;

use std::time::Duration;

use rdkafka::consumer::Consumer;
use rdkafka::message::Message;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_follows_the_event_contract() {
    let broker = topk_devbroker::DevBroker::start(100).expect("mock cluster");
    let kafka = common::kafka_args(&broker.bootstrap_servers());
    broker.create_topic(&kafka.topic, 4).expect("topic");
    let args = {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            args: topk_loadgen::LoadgenArgs,
        }
        Cli::parse_from([
            "loadgen",
            &format!("--kafka-brokers={}", kafka.brokers),
            &format!("--kafka-topic={}", kafka.topic),
            "--rate=1000",
            "--duration=2s",
            "--users=50",
            "--songs=20",
            "--duplicate-rate=0.05",
            "--malformed-rate=0.05",
            "--late-rate=0.2",
        ])
        .args
    };
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
