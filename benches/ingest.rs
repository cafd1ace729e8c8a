//! Ingest benchmark: events/s through the aggregator into ClickHouse, against a
//! consume-and-discard consumer on the same broker, in the same run.
//!
//! ```sh
//! scripts/stack up && eval "$(scripts/stack env)"
//! cargo bench --bench ingest                       # 1M events
//! TOPK_BENCH_EVENTS=200000 cargo bench --bench ingest
//! ```
//!
//! Both sides start from a fresh consumer group and stop when every event is consumed (the
//! baseline) or counted in ClickHouse (the aggregator: flushed and committed), so both include
//! the group join. Prints one JSON line with both rates and their ratio.

mod common;

use std::time::{Duration, Instant};

use common::{env_or, unique};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() {
    // `cargo bench` passes `--bench`; nothing else to parse. Logs follow RUST_LOG.
    topk::telemetry::init_logging();
    let events: u64 = env_or("TOPK_BENCH_EVENTS", 1_000_000);
    // The dev broker keeps at most 5 MB per partition: 32 partitions hold 1M events.
    let partitions: i32 = env_or("TOPK_BENCH_PARTITIONS", 32);
    let users: u64 = env_or("TOPK_BENCH_USERS", 100_000);

    let broker = topk_devbroker::DevBroker::start(100).expect("mock cluster");
    let brokers = broker.bootstrap_servers();
    let topic = unique("bench_plays");
    broker.create_topic(&topic, partitions).expect("topic");
    broker
        .create_topic(&topk::config::dlq_topic(&topic), partitions)
        .expect("dlq");

    eprintln!("producing {events} events to {partitions} partitions…");
    let produce_secs = common::produce(&brokers, &topic, events, users).await;
    let baseline_secs = common::consume_and_discard(&brokers, &topic, events).await;

    // The aggregator, into a fresh database.
    let mut clickhouse = topk::config::ClickHouseArgs {
        url: std::env::var("TOPK_CLICKHOUSE_URL")
            .unwrap_or_else(|_| "http://127.0.0.1:8123".into()),
        database: unique("topk_bench"),
        user: "default".into(),
        password: String::new(),
    };
    topk::migrate::run(&clickhouse).await.expect("migrate");
    let args = {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            args: topk_aggregator::AggregatorArgs,
        }
        Cli::parse_from([
            "bench".to_owned(),
            format!("--kafka-brokers={brokers}"),
            format!("--kafka-topic={topic}"),
            format!("--clickhouse-url={}", clickhouse.url),
            format!("--clickhouse-database={}", clickhouse.database),
            format!("--group={}", unique("bench_aggregator")),
            // A short interval keeps the end of the run (waiting for the last flush) from
            // dominating a run of a few seconds.
            format!(
                "--flush-interval={}",
                std::env::var("TOPK_BENCH_FLUSH").unwrap_or_else(|_| "250ms".into())
            ),
            format!("--max-state-bytes={}", 4u64 << 30),
        ])
        .args
    };
    let shutdown = CancellationToken::new();
    let started = Instant::now();
    let worker = tokio::spawn(topk_aggregator::run(args, shutdown.clone()));
    let client = topk::olap::client(&clickhouse);
    loop {
        let total: u64 = client
            .query("SELECT sum(plays) FROM plays_minute")
            .fetch_one()
            .await
            .unwrap_or(0);
        if total >= events {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let aggregator_secs = started.elapsed().as_secs_f64();
    shutdown.cancel();
    worker.await.expect("joins").expect("clean shutdown");
    let _ = topk::olap::server_client(&clickhouse)
        .query(&format!("DROP DATABASE IF EXISTS {}", clickhouse.database))
        .execute()
        .await;
    clickhouse.database.clear();

    let baseline_rate = events as f64 / baseline_secs;
    let aggregator_rate = events as f64 / aggregator_secs;
    println!(
        "{}",
        serde_json::json!({
            "benchmark": "ingest",
            "events": events,
            "partitions": partitions,
            "produce_events_per_s": (events as f64 / produce_secs).round(),
            "baseline_consume_discard_events_per_s": baseline_rate.round(),
            "aggregator_into_clickhouse_events_per_s": aggregator_rate.round(),
            "ratio_aggregator_to_baseline": (aggregator_rate / baseline_rate * 1000.0).round() / 1000.0,
            "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        })
    );
}
