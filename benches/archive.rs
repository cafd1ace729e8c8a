//! Archive benchmark: messages/s through the archiver into object storage, against a
//! consume-and-discard consumer on the same broker, in the same run.
//!
//! ```sh
//! cargo bench --bench archive                                    # 500k events, local directory
//! TOPK_BENCH_EVENTS=200000 cargo bench --bench archive
//! scripts/stack up s3 && eval "$(scripts/stack env)" && TOPK_BENCH_S3=1 cargo bench --bench archive
//! ```
//!
//! Both sides start from a fresh consumer group and stop when every message is consumed (the
//! baseline) or archived (objects listed in the store cover every offset; their offsets are
//! committed right after). Prints one JSON line with both rates and their ratio.

mod common;

use std::time::{Duration, Instant};

use common::{env_or, unique};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() {
    topk::telemetry::init_logging();
    let events: u64 = env_or("TOPK_BENCH_EVENTS", 500_000);
    // The dev broker keeps at most 5 MB per partition.
    let partitions: i32 = env_or("TOPK_BENCH_PARTITIONS", 16);
    let s3 = env_or("TOPK_BENCH_S3", 0u8) == 1;

    let broker = topk_devbroker::DevBroker::start(100).expect("mock cluster");
    let brokers = broker.bootstrap_servers();
    let topic = unique("bench_plays");
    broker.create_topic(&topic, partitions).expect("topic");

    eprintln!("producing {events} events to {partitions} partitions…");
    common::produce(&brokers, &topic, events, 100_000).await;
    let baseline_secs = common::consume_and_discard(&brokers, &topic, events).await;

    // The archiver, into a fresh directory (or a fresh prefix of the stack's bucket).
    let dir = tempfile::tempdir().expect("archive dir");
    let mut flags = vec![
        format!("--kafka-brokers={brokers}"),
        format!("--kafka-topic={topic}"),
        format!("--group={}", unique("bench_archive")),
        // A short age limit keeps the wait for the last batch from dominating a run of seconds.
        "--flush-interval=250ms".to_owned(),
    ];
    if s3 {
        flags.push(format!(
            "--archive-url=s3://topk-archive/{}",
            unique("bench")
        ));
    } else {
        flags.push(format!("--archive-url={}", dir.path().display()));
    }
    let args: topk_archive::ArchiveArgs = common::flags::parse(flags);
    let store = topk_archive::store::open(&args.store).expect("store");
    let shutdown = CancellationToken::new();
    let started = Instant::now();
    let worker = tokio::spawn(topk_archive::run(args, shutdown.clone()));
    let (mut objects, mut bytes);
    loop {
        let listing = topk_archive::store::list_topic(store.as_ref(), &topic)
            .await
            .unwrap_or_default();
        let archived: u64 = listing
            .values()
            .flatten()
            .map(|l| l.name.last - l.name.first + 1)
            .sum();
        objects = listing.values().map(Vec::len).sum::<usize>();
        bytes = listing.values().flatten().map(|l| l.size).sum::<u64>();
        if archived >= events {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let archive_secs = started.elapsed().as_secs_f64();
    shutdown.cancel();
    worker.await.expect("joins").expect("clean shutdown");

    let baseline_rate = events as f64 / baseline_secs;
    let archive_rate = events as f64 / archive_secs;
    println!(
        "{}",
        serde_json::json!({
            "benchmark": "archive",
            "store": if s3 { "s3 (moto)" } else { "local directory" },
            "events": events,
            "partitions": partitions,
            "objects": objects,
            "compressed_bytes": bytes,
            "baseline_consume_discard_events_per_s": baseline_rate.round(),
            "archiver_events_per_s": archive_rate.round(),
            "ratio_archiver_to_baseline": (archive_rate / baseline_rate * 1000.0).round() / 1000.0,
            "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        })
    );
}
