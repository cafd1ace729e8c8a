//! Shared helpers of the integration tests. Every test runs against the real services started
//! by `scripts/stack up` (addresses from the same `TOPK_…` variables the roles read) and uses
//! names of its own (database, topic, group, key prefix), so tests never see each other's data.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use rand::Rng;
use topk::config::{ClickHouseArgs, KafkaArgs, RedisArgs};

pub mod api_poller;
pub mod databases;
pub mod flags;
pub mod group;
pub mod plays;
pub mod private_clickhouse;
pub mod private_process;
pub mod private_redis;
pub mod private_stack;
pub mod roles;
pub mod workload;

// Not every test or bench binary calls them.
#[allow(unused_imports)]
pub use databases::{clickhouse_flags, drop_database};

/// `TOPK_TEST_SCALE` (default 1, at least 1): multiplies the work of the tests that read it; CI
/// runs 1, the full versions 10.
pub fn scale() -> usize {
    std::env::var("TOPK_TEST_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1usize)
        .max(1)
}

/// A port nothing listens on now: the OS picks it, so it is neither in use nor in a range other
/// tests pick from.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// Whether `name` is one of the package variables cargo gives a test process. They must not
/// reach a `cargo build` (build scripts that declare them `rerun-if-env-changed`, as ring does,
/// would rebuild from scratch: ~2.5 min on 2 cores) nor a child process that runs one.
pub fn is_cargo_package_var(name: &str) -> bool {
    [
        "CARGO_PKG_",
        "CARGO_MANIFEST_",
        "CARGO_CRATE_",
        "CARGO_BIN_",
    ]
    .iter()
    .any(|prefix| name.starts_with(prefix))
        || name == "CARGO_PRIMARY_PACKAGE"
        || name == "CARGO_TARGET_TMPDIR"
}

/// Cargo's package variables (see [`is_cargo_package_var`]) and the shared stack's `TOPK_…`
/// variables, which would point a role at the shared services wherever a flag is missing: gone
/// from the environment of a child that runs against a private stack.
pub fn scrub_env(command: &mut tokio::process::Command) {
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if is_cargo_package_var(&name) || name.starts_with("TOPK_") {
            command.env_remove(name.as_ref());
        }
    }
}

/// A name nobody else uses: `<prefix>_<random>`.
pub fn unique(prefix: &str) -> String {
    let n: u64 = rand::rng().random();
    format!("{prefix}_{n:016x}")
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

/// ClickHouse settings pointing at `database` on the stack's server.
pub fn clickhouse_args(database: &str) -> ClickHouseArgs {
    ClickHouseArgs {
        url: env_or("TOPK_CLICKHOUSE_URL", "http://127.0.0.1:8123"),
        database: database.to_owned(),
        user: "default".to_owned(),
        password_file: None,
        password_env: None,
        cluster: None,
        shard_urls: Vec::new(),
        replica_urls: Vec::new(),
        // Every statement of the test names its database in system.query_log, where the
        // compatibility check (scripts/compat) finds the data it ran on.
        quota_key: Some(database.to_owned()),
    }
}

/// A new database with every migration applied.
pub async fn migrated_database() -> ClickHouseArgs {
    let args = clickhouse_args(&unique("topk_test"));
    topk::migrate::run(&args)
        .await
        .expect("migrations apply on a fresh database");
    args
}

/// ClickHouse settings pointing at `database` on the stack's 2-shard cluster
/// (`scripts/stack up clickhouse-cluster`): the protocol tables on shard 1.
pub fn cluster_args(database: &str) -> ClickHouseArgs {
    let shard_urls: Vec<String> = env_or(
        "TOPK_TEST_CLICKHOUSE_SHARD_URLS",
        "http://127.0.0.1:8131,http://127.0.0.1:8132",
    )
    .split(',')
    .map(str::to_owned)
    .collect();
    ClickHouseArgs {
        url: shard_urls[0].clone(),
        cluster: Some(env_or("TOPK_TEST_CLICKHOUSE_CLUSTER", "topk")),
        shard_urls,
        ..clickhouse_args(database)
    }
}

/// On a cluster: each shard holds rows of its own users only (`user_id % shards`), asked of
/// the shard directly, and the Distributed table `plays_minute_all` (queried on every server)
/// sees `total` plays, every shard's.
pub async fn assert_users_on_their_shards(args: &ClickHouseArgs, total: u64) {
    let olap = topk::olap::Olap::open(args);
    let shards = olap.shards().len() as u64;
    assert!(shards > 1, "a cluster");
    let mut users_seen = 0;
    for (index, shard) in olap.shards().iter().enumerate() {
        let users: Vec<u64> = shard
            .query("SELECT DISTINCT user_id FROM plays_minute")
            .fetch_all()
            .await
            .expect("users of a shard");
        assert!(!users.is_empty(), "shard {} holds no user", index + 1);
        for user in &users {
            assert_eq!(
                user % shards,
                index as u64,
                "user {user} on shard {}",
                index + 1
            );
        }
        users_seen += users.len();
        let through_distributed: u64 = shard
            .query("SELECT sum(plays) FROM plays_minute_all FINAL")
            .fetch_one()
            .await
            .expect("a read of the Distributed table");
        assert_eq!(
            through_distributed,
            total,
            "plays_minute_all on shard {}",
            index + 1
        );
    }
    assert!(users_seen > 0);
}

/// A new database on the stack's cluster, every migration applied on every shard.
pub async fn migrated_cluster_database() -> ClickHouseArgs {
    let args = cluster_args(&unique("topk_test"));
    topk::migrate::run(&args).await.expect(
        "migrations apply on a fresh cluster database (scripts/stack up clickhouse-cluster)",
    );
    args
}

/// Redis settings with a key prefix of the test's own.
pub fn redis_args() -> RedisArgs {
    RedisArgs {
        url: env_or("TOPK_REDIS_URL", "redis://127.0.0.1:6379"),
        prefix: unique("topk_test"),
        pool_size: 4,
        cluster: false,
        auth: Default::default(),
    }
}

/// Redis settings for the stack's 3-master Redis Cluster (`scripts/stack up redis-cluster`),
/// with a key prefix of the test's own.
pub fn redis_cluster_args() -> RedisArgs {
    RedisArgs {
        url: env_or(
            "TOPK_TEST_REDIS_CLUSTER_URLS",
            "redis://127.0.0.1:7000,redis://127.0.0.1:7001,redis://127.0.0.1:7002",
        ),
        prefix: unique("topk_test"),
        pool_size: 4,
        cluster: true,
        auth: Default::default(),
    }
}

/// The durable broker (tansu) the test stack runs beside the dev broker.
pub fn tansu_brokers() -> String {
    env_or("TOPK_TEST_TANSU_BROKERS", "127.0.0.1:9093")
}

/// A fresh plays topic of `partitions` partitions, with its dead-letter and touches topics, on
/// the stack's tansu; returns the brokers and the topic.
pub async fn tansu_topics(partitions: i32) -> (String, String) {
    let brokers = tansu_brokers();
    let topic = unique("plays");
    let topics = topk::config::all_topics(&topic);
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    topk::kafka::ensure_topics(&brokers, &names, partitions)
        .await
        .unwrap_or_else(|e| {
            panic!("tansu must run at {brokers} (TOPK_BROKER=both scripts/stack up): {e}")
        });
    (brokers, topic)
}

/// An in-process dev broker with a fresh topic of `partitions` partitions and its dead-letter and
/// touches topics; returns the broker (alive as long as the value) and the topic name. librdkafka's mock
/// keeps at most 5 MB or 100,000 messages per partition and drops the oldest beyond that
/// (`rdkafka_mock.c`), so a test's traffic must fit: ~40k of its messages per partition.
pub fn dev_broker(partitions: i32) -> (topk_devbroker::DevBroker, String) {
    let broker = topk_devbroker::DevBroker::start(100).expect("mock cluster");
    let topic = unique("plays");
    broker
        .create_plays_topics(&topic, partitions)
        .expect("topics");
    (broker, topic)
}

/// Kafka settings for `brokers` and a fresh topic name.
pub fn kafka_args(brokers: &str) -> KafkaArgs {
    KafkaArgs {
        brokers: brokers.to_owned(),
        topic: unique("plays"),
    }
}

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Path of the `topk` binary, built once per test process if it is missing or stale.
pub fn topk_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
        let mut build = Command::new(cargo);
        for (name, _) in std::env::vars_os() {
            let name = name.to_string_lossy();
            if is_cargo_package_var(&name) {
                build.env_remove(name.as_ref());
            }
        }
        let status = build
            .args(["build", "--quiet", "-p", "topk-cli", "--bin", "topk"])
            .current_dir(workspace_root())
            .status()
            .expect("cargo runs");
        assert!(status.success(), "building the topk binary failed");
        let target = std::env::var("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|_| workspace_root().join("target"));
        target.join("debug").join("topk")
    })
    .clone()
}

/// `topk <args…>` with `RUST_LOG=info`, its stdout discarded and its stderr in `log`, killed
/// (`kill -9`) when its child is dropped: to add to, then spawn or run.
pub fn topk_command<S: AsRef<std::ffi::OsStr>>(
    args: &[S],
    log: &std::path::Path,
) -> tokio::process::Command {
    let log = std::fs::File::create(log).expect("log file");
    let mut command = tokio::process::Command::new(topk_bin());
    command
        .args(args)
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .kill_on_drop(true);
    command
}

/// Starts `topk <args…>` as a child process with `RUST_LOG=info` and its stderr in `log`;
/// `kill -9` on drop.
pub fn spawn_topk<S: AsRef<std::ffi::OsStr>>(
    args: &[S],
    log: &std::path::Path,
) -> tokio::process::Child {
    topk_command(args, log).spawn().expect("topk starts")
}

/// Sends the signal `name` (`TERM`, `STOP`, `CONT`…, without the dash) to the process `pid`.
pub fn signal(pid: u32, name: &str) {
    let status = Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success(), "kill -{name} {pid}");
}

/// Sends SIGTERM to a `topk` child and asserts that it exits cleanly within a minute.
pub async fn terminate(mut child: tokio::process::Child) {
    signal(child.id().expect("running"), "TERM");
    let exit = tokio::time::timeout(std::time::Duration::from_secs(60), child.wait())
        .await
        .expect("exits")
        .expect("wait");
    assert!(exit.success(), "clean exit on SIGTERM: {exit:?}");
}

/// How many lines of the log files in `dir` contain `needle` but not `except`.
pub fn count_log_lines(dir: &std::path::Path, needle: &str, except: &str) -> usize {
    std::fs::read_dir(dir)
        .expect("logs")
        .filter_map(Result::ok)
        .filter_map(|entry| std::fs::read_to_string(entry.path()).ok())
        .map(|text| {
            text.lines()
                .filter(|line| line.contains(needle) && !line.contains(except))
                .count()
        })
        .sum()
}

/// Aggregator settings from command-line flags, exactly as `topk aggregate` parses them.
pub fn aggregator_args(
    brokers: &str,
    topic: &str,
    clickhouse: &ClickHouseArgs,
    extra: &[&str],
) -> topk_aggregator::AggregatorArgs {
    let mut argv = vec![
        format!("--kafka-brokers={brokers}"),
        format!("--kafka-topic={topic}"),
    ];
    argv.extend(clickhouse_flags(clickhouse));
    if !extra.iter().any(|flag| flag.starts_with("--group")) {
        argv.push(format!("--group={}", unique("aggregator")));
    }
    argv.extend(extra.iter().map(|s| (*s).to_owned()));
    flags::parse(argv)
}
