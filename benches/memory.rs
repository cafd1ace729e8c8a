//! Memory benchmark: the aggregator's resident memory against its `--max-state-bytes` cap.
//!
//! ```sh
//! scripts/stack up && eval "$(scripts/stack env)"
//! cargo bench --bench memory                       # 2M events, caps of 32 and 128 MiB
//! TOPK_BENCH_EVENTS=500000 TOPK_BENCH_CAPS_MIB=16 cargo bench --bench memory
//! ```
//!
//! Every event is its own (user, song, minute) cell, so the state only shrinks by flushing;
//! message timestamps advance 1 ms per event (10 minutes of log time per 600k events) and the
//! dedup window is 10 s, so the cap is reached by counts, not by dedup ids. The flush interval is
//! an hour: every flush during the run is one the cap forced. For each cap, `topk aggregate`
//! runs as a child process (release build); its peak RSS (`VmHWM`) is read when every event is
//! counted, and compared with the cap and with the RSS of the same process idle on an empty
//! topic (runtime, librdkafka buffers, ClickHouse client). Prints one JSON line.

mod common;

use common::{env_or, unique};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::future::join_all;
use rdkafka::producer::FutureRecord;

/// `VmRSS` and `VmHWM` of a process, in bytes.
fn rss(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kb| kb.parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

struct Aggregator {
    child: Child,
    database: topk::config::ClickHouseArgs,
    metrics: String,
}

fn spawn_aggregator(bin: &std::path::Path, brokers: &str, topic: &str, cap: u64) -> Aggregator {
    let database = common::clickhouse_args("topk_mem");
    let port = common::free_port();
    let child = Command::new(bin)
        .args([
            "aggregate",
            &format!("--metrics-addr=127.0.0.1:{port}"),
            &format!("--kafka-brokers={brokers}"),
            &format!("--kafka-topic={topic}"),
            &format!("--clickhouse-url={}", database.url),
            &format!("--clickhouse-database={}", database.database),
            &format!("--group={}", unique("mem_aggregator")),
            "--flush-interval=1h",
            "--dedup-window=10s",
            &format!("--max-state-bytes={cap}"),
        ])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("topk aggregate starts");
    Aggregator {
        child,
        database,
        metrics: format!("http://127.0.0.1:{port}/metrics"),
    }
}

impl Aggregator {
    async fn stop(self) {
        // SIGTERM: the final flush, then exit 0.
        common::terminate(self.child).await;
        common::drop_database(&self.database).await;
    }
}

/// Events the aggregator has consumed, from its own Prometheus endpoint.
async fn consumed(metrics: &str) -> u64 {
    common::metric_sum(
        &common::scrape(metrics).await,
        "topk_aggregator_consumed_total ",
    ) as u64
}

#[tokio::main]
async fn main() {
    let events: u64 = env_or("TOPK_BENCH_EVENTS", 2_000_000);
    let caps: Vec<u64> = std::env::var("TOPK_BENCH_CAPS_MIB")
        .unwrap_or_else(|_| "32,128".into())
        .split(',')
        .filter_map(|mib| mib.trim().parse::<u64>().ok())
        .map(|mib| mib << 20)
        .collect();
    let bin = common::topk_release_bin();
    let broker = topk_devbroker::DevBroker::start(100).expect("mock cluster");
    let brokers = broker.bootstrap_servers();
    // The dev broker keeps the last 100k messages or 5 MB of a partition: enough partitions
    // (~90-byte events) that none is trimmed.
    let partitions = i32::try_from(events / 40_000 + 1).unwrap_or(64).max(8);

    // The idle process: same binary, empty topic.
    let idle_topic = unique("mem_idle");
    broker
        .create_plays_topics(&idle_topic, partitions)
        .expect("topics");
    let idle = spawn_aggregator(&bin, &brokers, &idle_topic, caps[0]);
    topk::migrate::run(&idle.database).await.expect("migrate");
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (idle_rss, _) = rss(idle.child.id());
    idle.stop().await;

    let topic = unique("mem_plays");
    broker
        .create_plays_topics(&topic, partitions)
        .expect("topics");
    eprintln!("producing {events} events to {partitions} partitions…");
    let producer = topk::kafka::producer(&brokers).expect("producer");
    let base = topk::clock::Clock::now_ms(&topk::clock::SystemClock) - (events as i64) - 60_000;
    for start in (0..events).step_by(5_000) {
        let chunk: Vec<(String, String, i64)> = (start..(start + 5_000).min(events))
            .map(|i| {
                let ts = base + i as i64;
                (
                    (i % 50_000 + 1).to_string(),
                    format!(
                        r#"{{"event_id":"m{i}","user_id":{},"song_id":{},"timestamp":{ts}}}"#,
                        i % 50_000 + 1,
                        i / 50_000 + 1
                    ),
                    ts,
                )
            })
            .collect();
        let sends = chunk.iter().map(|(key, value, ts)| {
            producer.send(
                FutureRecord::to(&topic)
                    .key(key)
                    .payload(value)
                    .timestamp(*ts),
                Duration::from_secs(60),
            )
        });
        for result in join_all(sends).await {
            result.expect("delivered");
        }
    }

    let mut runs = Vec::new();
    for &cap in &caps {
        let mut aggregator = spawn_aggregator(&bin, &brokers, &topic, cap);
        topk::migrate::run(&aggregator.database)
            .await
            .expect("migrate");
        let pid = aggregator.child.id();
        let started = Instant::now();
        // Every event consumed: the state then holds whatever the cap-forced flushes left.
        let mut last = 0;
        while last < events && started.elapsed() < Duration::from_secs(600) {
            tokio::time::sleep(Duration::from_millis(500)).await;
            if let Ok(Some(status)) = aggregator.child.try_wait() {
                panic!("topk aggregate exited early: {status}");
            }
            last = consumed(&aggregator.metrics).await;
        }
        let (_, peak) = rss(pid);
        aggregator.stop().await;
        eprintln!(
            "cap {} MiB: peak RSS {} MiB (idle {} MiB)",
            cap >> 20,
            peak >> 20,
            idle_rss >> 20
        );
        runs.push(serde_json::json!({
            "cap_bytes": cap,
            "peak_rss_bytes": peak,
            "consumed": last,
            "state_over_cap": ((peak.saturating_sub(idle_rss)) as f64 / cap as f64 * 1000.0).round() / 1000.0,
        }));
    }
    println!(
        "{}",
        serde_json::json!({
            "benchmark": "memory",
            "events": events,
            "idle_rss_bytes": idle_rss,
            "runs": runs,
        })
    );
}
