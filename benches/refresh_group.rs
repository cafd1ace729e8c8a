//! Refresher group benchmark: users refreshed per second by one `topk refresh` process and by
//! two in one consumer group on the same stack, and how the two split the work (issue 17).
//!
//! ```sh
//! scripts/stack up && eval "$(scripts/stack env)"
//! cargo bench --bench refresh_group                 # 100k touched users, ~20 rows each
//! TOPK_BENCH_USERS=300000 cargo bench --bench refresh_group
//! ```
//!
//! Knobs: `TOPK_BENCH_USERS` (100,000), `TOPK_BENCH_ROWS_PER_USER` (20),
//! `TOPK_BENCH_PARTITIONS` (touches partitions, 8), `TOPK_BENCH_ROUNDS` (rounds per phase, 3).
//!
//! The stack's ClickHouse (a fresh database) and Redis (a fresh prefix), the dev broker in this
//! process. Minute rows for every user are generated inside ClickHouse over the last 6 days (so
//! no answer ages during the run and every count below is exact), rolled up and merged as in
//! a long-running deployment. Release `topk refresh` processes (default settings, a 1 s
//! interval) form one new group: its first member catches every partition up from ClickHouse
//! (that warms ClickHouse's and Redis' caches; not timed). Then three phases: one member, two
//! (a second joins), one again (the second leaves with SIGTERM): the phases on one member are
//! the baseline, measured on both sides of the two-member phase on the same stack. Each phase
//! waits for the group to settle (every partition owned, by every member, from each member's
//! `topk_refresh_owned_partitions`, and no member's `topk_refresh_users_total` moving over two
//! of its cycles), then runs its rounds: every user is touched at once, as
//! flushes publish touches, and the round ends when the members' `topk_refresh_users_total`
//! have grown by exactly the number of users (more would be a user computed twice; the run
//! fails if it is). Users/s = users / (end − first touch sent).
//!
//! On 2 cores the processes share the cores with ClickHouse and Redis, which do most of the
//! work of a refresh: the second member adds a process, not a machine. Prints one JSON line.

mod common;

use common::env_or;
use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use topk::clock::{Clock, SystemClock};
use topk::window::Window;

/// One `topk refresh` process of the group.
struct Member {
    name: String,
    child: Child,
    metrics: String,
}

impl Member {
    async fn scrape(&self) -> String {
        common::scrape(&self.metrics).await
    }

    /// Answers computed so far, all outcomes.
    async fn computed(&self) -> u64 {
        common::metric_sum(&self.scrape().await, "topk_refresh_users_total{") as u64
    }

    /// Partitions owned in its last cycle (0 before its first).
    async fn owned(&self) -> u64 {
        common::metric_sum(&self.scrape().await, "topk_refresh_owned_partitions ") as u64
    }

    /// SIGTERM: it commits what it settled and leaves the group, which hands its partitions on
    /// at once.
    async fn stop(self) {
        common::terminate(self.child).await;
    }
}

/// What every member is started with.
struct Group<'a> {
    bin: &'a Path,
    logs: &'a Path,
    args: Vec<String>,
}

impl Group<'_> {
    fn start(&self, name: &str) -> Member {
        let port = common::free_port();
        let log = std::fs::File::create(self.logs.join(format!("{name}.log"))).expect("log");
        let child = Command::new(self.bin)
            .arg("refresh")
            .args(&self.args)
            .arg(format!("--metrics-addr=127.0.0.1:{port}"))
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("topk refresh starts");
        Member {
            name: name.to_owned(),
            child,
            metrics: format!("http://127.0.0.1:{port}/metrics"),
        }
    }
}

/// Waits until `members` own every partition between them, each some, and their counters
/// stood still over two cycles of every member (the rebalance's catch-ups and hand-overs are
/// over: a cycle adds to the counters only when it ends). Returns when they last moved.
async fn settled(members: &[&Member], partitions: u64) -> Instant {
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut moved = Instant::now();
    let mut last = Vec::new();
    let mut cycles_then = Vec::new();
    loop {
        assert!(
            Instant::now() < deadline,
            "the group did not settle in 5 minutes"
        );
        let (mut owned, mut computed, mut cycles) = (Vec::new(), Vec::new(), Vec::new());
        for member in members {
            let text = member.scrape().await;
            owned.push(common::metric_sum(&text, "topk_refresh_owned_partitions ") as u64);
            computed.push(common::metric_sum(&text, "topk_refresh_users_total{") as u64);
            cycles.push(common::metric_sum(&text, "topk_refresh_cycle_seconds_count ") as u64);
        }
        let split = owned.iter().sum::<u64>() == partitions && owned.iter().all(|&n| n > 0);
        if computed != last || !split {
            last = computed;
            cycles_then = cycles.clone();
            moved = Instant::now();
        }
        let still = cycles
            .iter()
            .zip(&cycles_then)
            .all(|(now, then)| *now >= then + 2);
        if split && still {
            return moved;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// What one round measured.
struct Round {
    /// From the first touch sent to the last user computed.
    seconds: f64,
    /// Of which publishing the touches (every delivery acknowledged).
    publish_seconds: f64,
    /// The machine's average busy cores over the round (2 = saturated).
    busy_cores: f64,
    /// Users computed by each member.
    computed: Vec<u64>,
}

/// One round: every user touched; ends when the members computed them all.
async fn round(
    members: &[&Member],
    producer: &rdkafka::producer::FutureProducer,
    touches_topic: &str,
    users: &BTreeSet<u64>,
) -> Round {
    let mut before = Vec::new();
    for member in members {
        before.push(member.computed().await);
    }
    let cpu = common::MachineCpu::now();
    let started = Instant::now();
    topk::touches::publish(producer, touches_topic, users)
        .await
        .expect("touches published");
    let publish_seconds = started.elapsed().as_secs_f64();
    let deadline = started + Duration::from_secs(600);
    loop {
        let mut done = Vec::new();
        for (member, before) in members.iter().zip(&before) {
            done.push(member.computed().await - before);
        }
        let total: u64 = done.iter().sum();
        assert!(
            total <= users.len() as u64,
            "{total} computations for {} touched users: {done:?}",
            users.len()
        );
        if total == users.len() as u64 {
            return Round {
                seconds: started.elapsed().as_secs_f64(),
                publish_seconds,
                busy_cores: cpu.since().1,
                computed: done,
            };
        }
        assert!(Instant::now() < deadline, "round unfinished: {done:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::main]
async fn main() {
    let users: u64 = env_or("TOPK_BENCH_USERS", 100_000);
    let per_user: u64 = env_or("TOPK_BENCH_ROWS_PER_USER", 20);
    let partitions: i32 = env_or("TOPK_BENCH_PARTITIONS", 8);
    let rounds: usize = env_or("TOPK_BENCH_ROUNDS", 3).max(1);
    let bin = common::topk_release_bin();
    let logs = tempfile::tempdir().expect("log folder");

    let broker = topk_devbroker::DevBroker::start(100).expect("dev broker");
    let brokers = broker.bootstrap_servers();
    let topic = common::unique("bench_plays");
    broker
        .create_plays_topics(&topic, partitions)
        .expect("topics");
    let touches_topic = topk::touches::topic(&topic);
    let producer = topk::kafka::producer(&brokers).expect("producer");

    let args = common::clickhouse_args("topk_bench_group");
    topk::migrate::run(&args).await.expect("migrate");
    let client = topk::olap::client(&args);
    let window = Window::at(SystemClock.now_ms());
    common::generate_minute_rows_over(&client, window, users, users * per_user, 6).await;
    common::roll_up_and_merge(&client).await;
    let everyone: BTreeSet<u64> = (1..=users).collect();

    let redis_url =
        std::env::var("TOPK_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let group = Group {
        bin: &bin,
        logs: logs.path(),
        args: vec![
            format!("--kafka-brokers={brokers}"),
            format!("--kafka-topic={topic}"),
            format!("--group={}", common::unique("bench_refresher")),
            "--refresh-interval=1s".to_owned(),
            "--kafka-session-timeout=6s".to_owned(),
            format!("--clickhouse-url={}", args.url),
            format!("--clickhouse-database={}", args.database),
            format!("--redis-url={redis_url}"),
            format!("--redis-prefix={}", common::unique("topk_bench_group")),
            "--key-ttl=10m".to_owned(),
        ],
    };

    // A new group: the first member catches every partition up, every user once.
    let first = group.start("refresh-a");
    let started = Instant::now();
    let caught_up_at = settled(&[&first], partitions as u64).await;
    let catch_up_s = (caught_up_at - started).as_secs_f64();
    let caught_up = first.computed().await;
    eprintln!("catch-up: {caught_up} users in {catch_up_s:.1} s (process start included)");

    let mut phases = Vec::new();
    let mut second = None;
    for (phase, size) in [(0, 1), (1, 2), (2, 1)] {
        match (size, second.take()) {
            (2, None) => second = Some(group.start("refresh-b")),
            (_, Some(member)) => member.stop().await,
            _ => {}
        }
        let members: Vec<&Member> = std::iter::once(&first).chain(second.as_ref()).collect();
        settled(&members, partitions as u64).await;
        let mut owned = Vec::new();
        for member in &members {
            owned.push(member.owned().await);
        }
        let mut runs = Vec::new();
        for _ in 0..rounds {
            let Round {
                seconds,
                publish_seconds,
                busy_cores,
                computed,
            } = round(&members, &producer, &touches_topic, &everyone).await;
            eprintln!(
                "phase {phase}: {size} member(s), {:.0} users/s, computed {computed:?}, \
                 {busy_cores:.2} busy cores",
                users as f64 / seconds
            );
            let round2 = |x: f64| (x * 100.0).round() / 100.0;
            let computed_by: Vec<serde_json::Value> = members
                .iter()
                .zip(&computed)
                .map(|(member, &n)| {
                    serde_json::json!({
                        "member": member.name,
                        "users": n,
                        "share": round2(n as f64 / users as f64),
                    })
                })
                .collect();
            runs.push(serde_json::json!({
                "seconds": round2(seconds),
                "publish_seconds": round2(publish_seconds),
                "busy_cores": round2(busy_cores),
                "users_per_s": (users as f64 / seconds).round(),
                "computed_by": computed_by,
            }));
        }
        phases.push(serde_json::json!({
            "members": size,
            "owned_partitions": owned,
            "rounds": runs,
        }));
    }
    if let Some(member) = second {
        member.stop().await;
    }
    first.stop().await;
    common::drop_database(&args).await;

    // The median round of each phase; the baseline is the mean of the two one-member phases'
    // medians.
    let median = |phase: &serde_json::Value| {
        let mut rates: Vec<f64> = phase["rounds"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| r["users_per_s"].as_f64())
            .collect();
        rates.sort_by(f64::total_cmp);
        rates[rates.len() / 2]
    };
    let one = (median(&phases[0]) + median(&phases[2])) / 2.0;
    let two = median(&phases[1]);
    println!(
        "{}",
        serde_json::json!({
            "benchmark": "refresh_group",
            "users": users,
            "rows": users * per_user,
            "partitions": partitions,
            "catch_up": {"users": caught_up, "seconds": (catch_up_s * 10.0).round() / 10.0},
            "one_member_users_per_s": one.round(),
            "two_members_users_per_s": two.round(),
            "ratio_two_over_one": (two / one * 100.0).round() / 100.0,
            "phases": phases,
        })
    );
}
