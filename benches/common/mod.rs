//! Shared by the broker benchmarks: settings from the environment, unique names, synthetic
//! traffic and the consume-and-discard baseline every worker is compared with.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use futures::future::join_all;
use rdkafka::consumer::Consumer;
use rdkafka::producer::FutureRecord;

// Self-contained modules of the tests' common folder, shared rather than copied.
#[path = "../../tests/common/databases.rs"]
pub mod databases;
#[path = "../../tests/common/flags.rs"]
pub mod flags;
#[path = "../../tests/common/group.rs"]
pub mod group;

// Not every test or bench binary calls them.
#[allow(unused_imports)]
pub use databases::drop_database;

pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

pub fn unique(prefix: &str) -> String {
    format!("{prefix}_{:016x}", rand::random::<u64>())
}

/// Settings of a fresh database (named `<prefix>_<random>`) on the stack's ClickHouse.
pub fn clickhouse_args(prefix: &str) -> topk::config::ClickHouseArgs {
    topk::config::ClickHouseArgs {
        url: std::env::var("TOPK_CLICKHOUSE_URL")
            .unwrap_or_else(|_| "http://127.0.0.1:8123".into()),
        database: unique(prefix),
        user: "default".into(),
        password_file: None,
        password_env: None,
        cluster: None,
        shard_urls: Vec::new(),
        replica_urls: Vec::new(),
        quota_key: None,
    }
}

/// Settings of a fresh database on the stack's ClickHouse cluster (`scripts/stack up
/// clickhouse-cluster`, as `scripts/stack env` names it), when there is one.
pub fn cluster_args(prefix: &str) -> Option<topk::config::ClickHouseArgs> {
    let shard_urls: Vec<String> = std::env::var("TOPK_TEST_CLICKHOUSE_SHARD_URLS")
        .ok()?
        .split(',')
        .map(str::to_owned)
        .collect();
    Some(topk::config::ClickHouseArgs {
        url: shard_urls.first()?.clone(),
        cluster: Some(std::env::var("TOPK_TEST_CLICKHOUSE_CLUSTER").unwrap_or("topk".into())),
        shard_urls,
        ..clickhouse_args(prefix)
    })
}

/// Inserts `rows` minute rows for `users` users spread over the 9 days before `window` ends,
/// generated inside ClickHouse: each user repeats ~30 favourite songs out of 2,000.
pub async fn generate_minute_rows(
    olap: impl Into<topk::olap::Olap>,
    window: topk::window::Window,
    users: u64,
    rows: u64,
) {
    generate_minute_rows_over(olap, window, users, rows, 9).await;
}

/// [`generate_minute_rows`] over the `days` days before `window` ends (under 7: no answer
/// ages for a day).
pub async fn generate_minute_rows_over(
    olap: impl Into<topk::olap::Olap>,
    window: topk::window::Window,
    users: u64,
    rows: u64,
    days: u64,
) {
    let span = days * 86_400;
    let newest = u64::from(window.end) - 60;
    eprintln!("generating {rows} minute rows for {users} users over {days} days…");
    insert_generated(
        &olap.into(),
        &format!(
            "SELECT number % {users} + 1 AS user_id, \
                    ((number % {users}) * 7919 + cityHash64(number) % 30) % 2000 + 1 AS song_id, \
                    toStartOfMinute(toDateTime({newest} - (cityHash64(number, 1) % {span}))) AS minute, \
                    1 + number % 3 AS plays, intDiv(number, 100000) AS batch_id \
             FROM numbers({rows})"
        ),
    )
    .await;
}

/// Inserts the minute rows `select` generates (columns user_id, song_id, minute, plays,
/// batch_id) where topk would write them: each shard gets the rows of its own users
/// (`user_id % shards`), so one server and a cluster hold the same data.
pub async fn insert_generated(olap: &topk::olap::Olap, select: &str) {
    let shards = olap.shards().len();
    let inserts = olap.shards().iter().enumerate().map(|(index, shard)| {
        let sql = format!(
            "INSERT INTO plays_minute (user_id, song_id, minute, plays, batch_id) \
             SELECT user_id, song_id, minute, plays, batch_id FROM ({select}) \
             WHERE user_id % {shards} = {index}"
        );
        async move { shard.query(&sql).execute().await.expect("generate") }
    });
    join_all(inserts).await;
}

/// Rolls up every day the minute rows touch, as maintenance does once they are written (their
/// day touches first, on the meta server, then the rollup once those are over a second old),
/// and merges the minute table of every shard: what a long-running deployment reads. Returns
/// how many days were rolled up.
pub async fn roll_up_and_merge(olap: impl Into<topk::olap::Olap>) -> usize {
    let olap = olap.into();
    let mut days = std::collections::BTreeSet::new();
    for shard in olap.shards() {
        let of_shard: Vec<String> = shard
            .query("SELECT DISTINCT toString(toDate(minute)) FROM plays_minute")
            .fetch_all()
            .await
            .expect("days of a shard");
        days.extend(of_shard);
    }
    let days: Vec<String> = days.iter().map(|d| format!("'{d}'")).collect();
    olap.meta()
        .query(&format!(
            "INSERT INTO day_touches (day, touched_at) \
             SELECT toDate(day), now() - 5 FROM (SELECT arrayJoin([{}]) AS day)",
            days.join(",")
        ))
        .execute()
        .await
        .expect("day touches");
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let rolled = topk_maintenance::rollup(olap.clone(), &topk::clock::SystemClock, false)
        .await
        .expect("rollup");
    for shard in olap.shards() {
        shard
            .query("OPTIMIZE TABLE plays_minute FINAL")
            .execute()
            .await
            .expect("optimize");
    }
    rolled.days.len()
}

/// The release `topk` binary, built first if missing or stale: what a bench runs as a child
/// process (the bench profile builds the library crates, not the `topk-cli` binary).
pub fn topk_release_bin() -> std::path::PathBuf {
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let status =
        std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args([
                "build",
                "--release",
                "--quiet",
                "-p",
                "topk-cli",
                "--bin",
                "topk",
            ])
            .current_dir(&root)
            .status()
            .expect("cargo runs");
    assert!(status.success(), "building topk (release) failed");
    std::env::var("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| root.join("target"))
        .join("release/topk")
}

/// A port free on loopback now, for a child process's `--metrics-addr`.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// SIGTERM to a `topk` child (a role ends its work and exits), then waits for it to exit.
pub async fn terminate(mut child: std::process::Child) {
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = tokio::task::spawn_blocking(move || child.wait()).await;
}

/// The text of a Prometheus endpoint (`http://…/metrics`), empty when it does not answer.
pub async fn scrape(url: &str) -> String {
    let url = url.to_owned();
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new("curl")
            .args(["-sf", &url])
            .output()
    })
    .await
    .ok()
    .and_then(Result::ok);
    output
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// The sum of the samples whose line starts with `prefix` (a metric name, with `{` for all
/// its label sets or a space for the unlabelled one).
pub fn metric_sum(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|line| line.starts_with(prefix))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Produces `events` valid plays of `users` users and 10,000 songs spread over the last hour;
/// returns the seconds it took.
pub async fn produce(brokers: &str, topic: &str, events: u64, users: u64) -> f64 {
    let songs = 10_000;
    let now = time::OffsetDateTime::now_utc().unix_timestamp() * 1000;
    let producer = topk::kafka::producer(brokers).expect("producer");
    let started = Instant::now();
    let mut next = 0u64;
    while next < events {
        let chunk: Vec<(String, String)> = (next..(next + 5_000).min(events))
            .map(|i| {
                let user = (i * 7_919) % users + 1;
                let song = (i * 104_729) % songs + 1;
                let ts = now - ((i % 3_600) as i64) * 1000;
                (
                    user.to_string(),
                    format!(r#"{{"event_id":"e{i}","user_id":{user},"song_id":{song},"timestamp":{ts}}}"#),
                )
            })
            .collect();
        next += chunk.len() as u64;
        let sends = chunk.iter().map(|(key, value)| {
            producer.send(
                FutureRecord::to(topic).key(key).payload(value),
                Duration::from_secs(60),
            )
        });
        for result in join_all(sends).await {
            result.expect("delivered");
        }
    }
    started.elapsed().as_secs_f64()
}

/// The baseline: a fresh group consumes `events` messages and discards them; returns the
/// seconds it took (group join included).
pub async fn consume_and_discard(brokers: &str, topic: &str, events: u64) -> f64 {
    let consumer = topk::kafka::consumer(brokers, &unique("bench_baseline")).expect("consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let started = Instant::now();
    let mut seen = 0u64;
    while seen < events {
        let message = consumer.recv().await.expect("message");
        std::hint::black_box(&message);
        seen += 1;
    }
    started.elapsed().as_secs_f64()
}

/// The machine's CPU time from `/proc/stat`, for "how much of the 2 cores did a side use":
/// machine-wide on purpose, because the broker, ClickHouse and the client share the cores.
#[derive(Debug, Clone, Copy)]
pub struct MachineCpu {
    busy: u64,
    total: u64,
    at: Instant,
}

impl MachineCpu {
    /// Reads the counters now (zeros where `/proc/stat` cannot be read).
    pub fn now() -> Self {
        let (busy, total) = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|stat| {
                let fields: Vec<u64> = stat
                    .lines()
                    .next()?
                    .split_whitespace()
                    .skip(1)
                    .filter_map(|v| v.parse().ok())
                    .collect();
                // user nice system idle iowait irq softirq steal: idle and iowait are not busy.
                let total: u64 = fields.iter().take(8).sum();
                let idle = fields.get(3)? + fields.get(4)?;
                Some((total - idle, total))
            })
            .unwrap_or((0, 0));
        MachineCpu {
            busy,
            total,
            at: Instant::now(),
        }
    }

    /// Busy core-seconds of the whole machine since `self`, and the average busy cores.
    pub fn since(&self) -> (f64, f64) {
        let now = MachineCpu::now();
        let wall = (now.at - self.at).as_secs_f64();
        let (busy, total) = (now.busy - self.busy, now.total - self.total);
        if total == 0 || wall <= 0.0 {
            return (0.0, 0.0);
        }
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let busy_cores = cores * busy as f64 / total as f64;
        (busy_cores * wall, busy_cores)
    }
}

/// Waits until the machine is quiet (under 0.2 busy cores over half a second, for at most
/// 30 s), so that one side's aftermath (ClickHouse merging the parts just inserted, a broker
/// cleaning up a group) is not billed to the next side.
pub async fn settle() {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let before = MachineCpu::now();
        tokio::time::sleep(Duration::from_millis(500)).await;
        if before.since().1 < 0.2 {
            return;
        }
    }
}
