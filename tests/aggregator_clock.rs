//! A producer whose clock runs ahead, through the real aggregator, a real broker and the real
//! ClickHouse. Kafka's CreateTime is the producer's clock: one message stamped 20 minutes
//! ahead must not move the partition's time, or a retry of an earlier play (same event_id)
//! falls outside the dedup window and is counted twice. Every message here carries a chosen
//! Kafka timestamp (`FutureRecord::timestamp`), so the outcome does not depend on when the
//! test runs; completion is the committed offset reaching the end, never a timer.

mod common;

use std::time::Duration;

use rdkafka::producer::FutureRecord;
use tokio_util::sync::CancellationToken;

const MINUTE: i64 = 60_000;

/// The dedup window of these tests: the retry comes 11 minutes after the play it repeats.
const DEDUP_WINDOW: &str = "--dedup-window=15m";

struct Setup {
    _broker: topk_devbroker::DevBroker,
    brokers: String,
    topic: String,
    clickhouse: topk::config::ClickHouseArgs,
    group: String,
    /// The honest time of the first play: an hour ago, so every play is inside the window.
    t0: i64,
}

async fn setup() -> Setup {
    let (broker, topic) = common::dev_broker(1);
    let brokers = broker.bootstrap_servers();
    Setup {
        _broker: broker,
        brokers,
        topic,
        clickhouse: common::migrated_database().await,
        group: common::unique("clock"),
        t0: common::workload::now_ms() / MINUTE * MINUTE - 60 * MINUTE,
    }
}

fn play(event_id: &str, user: u64, song: u64, at: i64) -> Vec<u8> {
    format!(r#"{{"event_id":"{event_id}","user_id":{user},"song_id":{song},"timestamp":{at}}}"#)
        .into_bytes()
}

/// Produces `(Kafka timestamp, value)` in order to partition 0.
async fn produce(setup: &Setup, messages: &[(i64, Vec<u8>)]) {
    let producer = topk::kafka::producer(&setup.brokers).expect("producer");
    for (timestamp, value) in messages {
        let delivery = producer
            .send(
                FutureRecord::<str, [u8]>::to(&setup.topic)
                    .key("0")
                    .payload(value.as_slice())
                    .timestamp(*timestamp),
                Duration::from_secs(60),
            )
            .await
            .unwrap_or_else(|(e, _)| panic!("produce: {e}"));
        assert_eq!(delivery.partition, 0);
    }
}

fn spawn_worker(
    setup: &Setup,
) -> (
    CancellationToken,
    tokio::task::JoinHandle<Result<(), topk_aggregator::AggregatorError>>,
) {
    let group = format!("--group={}", setup.group);
    let args = common::aggregator_args(
        &setup.brokers,
        &setup.topic,
        &setup.clickhouse,
        &[&group, DEDUP_WINDOW, "--flush-interval=300ms"],
    );
    let shutdown = CancellationToken::new();
    let handle = tokio::spawn(topk_aggregator::run(args, shutdown.clone()));
    (shutdown, handle)
}

/// Waits until the group committed `end` on partition 0: everything before it is in ClickHouse
/// (offsets are committed only after the counts are durable).
async fn wait_for_commit(setup: &Setup, end: i64) {
    let committed =
        common::group::wait_for_commit(&setup.brokers, &setup.group, &setup.topic, end).await;
    assert_eq!(committed, end);
}

/// The traffic of both tests: a play, one message from a producer 20 minutes ahead (its play is
/// honest: another user's, at t0), the retry of the first play 11 minutes after it, and one
/// more play behind it.
fn traffic(t0: i64) -> [(i64, Vec<u8>); 4] {
    [
        (t0, play("a", 42, 7, t0)),
        (t0 + 20 * MINUTE, play("skewed", 43, 8, t0)),
        (t0 + 11 * MINUTE, play("a", 42, 7, t0)),
        (t0 + 11 * MINUTE + 1_000, play("c", 44, 9, t0 + 11 * MINUTE)),
    ]
}

/// Runs one worker until the group committed `end` on partition 0, then stops it cleanly.
async fn count_until(setup: &Setup, end: i64) {
    let (shutdown, worker) = spawn_worker(setup);
    wait_for_commit(setup, end).await;
    shutdown.cancel();
    worker.await.expect("joins").expect("clean shutdown");
}

/// Each play once: the retry is a duplicate, the skewed producer's own play counts.
async fn assert_each_play_once(setup: &Setup) {
    let totals = common::workload::totals(&setup.clickhouse).await;
    let expected: std::collections::BTreeMap<(u64, u64), u64> =
        [((42, 7), 1), ((43, 8), 1), ((44, 9), 1)].into();
    assert_eq!(totals, expected);
    common::drop_database(&setup.clickhouse).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_clock_ahead_does_not_let_a_retry_count_twice() {
    let setup = setup().await;
    produce(&setup, &traffic(setup.t0)).await;
    count_until(&setup, 4).await;
    assert_each_play_once(&setup).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_clock_ahead_does_not_let_a_retry_count_twice_across_a_restart() {
    // The same traffic, with the worker stopped right after the skewed message: the next one
    // rebuilds the partition's time and dedup memory from the intent and the log, and must
    // reach the time the first one would have had, not the skewed producer's.
    let setup = setup().await;
    let [play_a, skewed, retry, after] = traffic(setup.t0);
    produce(&setup, &[play_a, skewed]).await;
    count_until(&setup, 2).await;
    produce(&setup, &[retry, after]).await;
    count_until(&setup, 4).await;
    assert_each_play_once(&setup).await;
}
