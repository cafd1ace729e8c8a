//! `kill -9` of aggregator processes at random moments while events flow, including inside the
//! window between a flush's writes and its offset commit: the final totals are exact.
//! `TOPK_TEST_SCALE=10` runs the full version (10× the events and 30 kills).

mod common;

use std::time::Duration;

use common::workload::{self, Mix, Workload};
use rand::Rng;
use tokio::process::Child;

fn start_worker(
    brokers: &str,
    topic: &str,
    clickhouse: &topk::config::ClickHouseArgs,
    log: &std::path::Path,
    extra: &[&str],
) -> Child {
    let mut args = vec![
        "aggregate".to_owned(),
        format!("--kafka-brokers={brokers}"),
        format!("--kafka-topic={topic}"),
        "--group=crash-test".to_owned(),
        "--kafka-session-timeout=2s".to_owned(),
        "--flush-interval=200ms".to_owned(),
    ];
    args.extend(common::clickhouse_flags(clickhouse));
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    common::spawn_topk(&args, log)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_moments_loses_and_duplicates_nothing() {
    kill_9_at_random_moments(common::migrated_database().await).await;
}

/// The same on the stack's 2-shard ClickHouse cluster: a kill between the shards' inserts
/// leaves one shard written and the other not, and the replay makes both exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_moments_on_the_cluster_loses_and_duplicates_nothing() {
    kill_9_at_random_moments(common::migrated_cluster_database().await).await;
}

async fn kill_9_at_random_moments(clickhouse: topk::config::ClickHouseArgs) {
    // The full version's 450k events need more partitions (see `common::dev_broker`).
    let (broker, topic) = common::dev_broker(if common::scale() > 1 { 32 } else { 4 });
    let brokers = broker.bootstrap_servers();
    let logs = tempfile::tempdir().expect("log dir");
    let mut rng = workload::rng("crash");
    let mut load = Workload::new();
    let mix = Mix {
        users: 400,
        songs: 50,
        dup_rate: 0.1,
        bad_rate: 0.03,
    };

    let kills = if common::scale() > 1 { 30 } else { 12 };
    // A kill proves the replay path only if it lands while the worker holds partitions and is
    // between its writes and its commit; on a loaded machine many short-lived workers never get
    // partitions. So after the planned kills, up to as many again until one such kill landed.
    let replayed = |logs: &std::path::Path| {
        common::count_log_lines(logs, "partition resumed", "replay_intents=0")
    };
    for round in 0..2 * kills {
        if round >= kills && replayed(logs.path()) > 0 {
            break;
        }
        let added = load.add(&mut rng, 1_500 * common::scale(), workload::now_ms(), mix);
        workload::produce(&brokers, &topic, &load.messages[added]).await;
        // Every other worker sleeps between its writes and its commit, so that most kills of
        // those land inside that window.
        let extra: &[&str] = if round % 2 == 0 {
            &["--test-pause-before-commit=700ms"]
        } else {
            &[]
        };
        let log = logs.path().join(format!("worker-{round:02}.log"));
        let mut child = start_worker(&brokers, &topic, &clickhouse, &log, extra);
        tokio::time::sleep(Duration::from_millis(rng.random_range(500..4_000))).await;
        child.start_kill().expect("SIGKILL");
        child.wait().await.expect("reaped");
    }

    // A last worker runs to the end and stops cleanly on SIGTERM.
    let log = logs.path().join("worker-final.log");
    let child = start_worker(&brokers, &topic, &clickhouse, &log, &[]);
    workload::wait_for_total(&clickhouse, load.total(), Duration::from_secs(180)).await;
    common::terminate(child).await;

    workload::assert_same_totals(&workload::totals(&clickhouse).await, &load.truth);

    // Proof that some kill landed between a flush's writes and its commit: a later worker
    // found recorded intents past the committed offset and replayed them.
    let replays = replayed(logs.path());
    assert!(
        replays > 0,
        "no kill landed between writes and commit; logs in {:?}",
        logs.keep()
    );
    common::drop_database(&clickhouse).await;
}
