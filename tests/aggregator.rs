//! The aggregator against a real broker and the real ClickHouse: every valid play counted
//! exactly once, whatever happens. Totals are compared with an oracle computed from the
//! generated traffic. Counts are reduced for CI; `TOPK_TEST_SCALE=10` runs the full versions.

mod common;

use std::time::Duration;

use common::workload::{self, Mix, Workload};
use tokio_util::sync::CancellationToken;
use topk_devbroker::DevBroker;

/// Multiplies event counts (`TOPK_TEST_SCALE`, default 1).
fn scale(n: usize) -> usize {
    n * common::scale()
}

struct Setup {
    /// The in-process dev broker, or `None` on tansu.
    broker: Option<DevBroker>,
    brokers: String,
    topic: String,
    clickhouse: topk::config::ClickHouseArgs,
}

async fn setup(partitions: i32) -> Setup {
    let (broker, topic) = common::dev_broker(partitions);
    let brokers = broker.bootstrap_servers();
    let clickhouse = common::migrated_database().await;
    Setup {
        broker: Some(broker),
        brokers,
        topic,
        clickhouse,
    }
}

/// The same with the counts on the stack's 2-shard ClickHouse cluster.
async fn setup_cluster(partitions: i32) -> Setup {
    let (broker, topic) = common::dev_broker(partitions);
    let brokers = broker.bootstrap_servers();
    let clickhouse = common::migrated_cluster_database().await;
    Setup {
        broker: Some(broker),
        brokers,
        topic,
        clickhouse,
    }
}

/// The same on the durable broker the test stack runs (tansu).
async fn setup_tansu(partitions: i32) -> Setup {
    let (brokers, topic) = common::tansu_topics(partitions).await;
    let clickhouse = common::migrated_database().await;
    Setup {
        broker: None,
        brokers,
        topic,
        clickhouse,
    }
}

fn spawn_worker(
    setup: &Setup,
    group: &str,
    extra: &[&str],
) -> (
    CancellationToken,
    tokio::task::JoinHandle<Result<(), topk_aggregator::AggregatorError>>,
) {
    let mut flags = vec![format!("--group={group}")];
    flags.extend(extra.iter().map(|s| (*s).to_owned()));
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let args = common::aggregator_args(&setup.brokers, &setup.topic, &setup.clickhouse, &flags);
    let shutdown = CancellationToken::new();
    let handle = tokio::spawn(topk_aggregator::run(args, shutdown.clone()));
    (shutdown, handle)
}

/// Randomised traffic (duplicates, late plays, every kind of malformed message) through one
/// worker: ClickHouse totals equal the oracle and every malformed message is dead-lettered
/// once with its reason.
async fn oracle_exact_totals_and_dead_letters(setup: Setup, events: usize) {
    let mut rng = workload::rng("oracle");
    let mut load = Workload::new();
    let mix = Mix {
        users: 300,
        songs: 40,
        dup_rate: 0.1,
        bad_rate: 0.05,
    };
    load.add(&mut rng, events, workload::now_ms(), mix);
    workload::produce(&setup.brokers, &setup.topic, &load.messages).await;

    // One worker, so no failover to wait for: a 60 s session. With the default 10 s, tansu's
    // first fetch of the full version's backlog (50k messages), slowed by the tests running
    // beside it, outlasted the session; the group revoked the partitions before anything was
    // flushed, again and again, and counted nothing in 180 s (RELIABILITY.md, "The chaos
    // storm"). A fresh group name, because tansu, which outlives the test, keeps the session
    // timeout a group was formed with.
    let group = common::unique("oracle");
    let (shutdown, worker) = spawn_worker(
        &setup,
        &group,
        &["--flush-interval=500ms", "--kafka-session-timeout=60s"],
    );
    workload::wait_for_total(&setup.clickhouse, load.total(), Duration::from_secs(180)).await;
    shutdown.cancel();
    worker.await.expect("joins").expect("clean shutdown");

    workload::assert_same_totals(&workload::totals(&setup.clickhouse).await, &load.truth);
    // Every flush published the users it counted plays for to the touches topic (what the
    // refreshers consume), each user on its own partition (`user % partitions`), no other user.
    let counted: std::collections::BTreeSet<u64> =
        load.truth.keys().map(|&(user, _)| user).collect();
    let (partitions, touches) =
        workload::touches(&setup.brokers, &topk::touches::topic(&setup.topic)).await;
    for &(partition, user) in &touches {
        assert_eq!(
            partition,
            topk::touches::partition_of(user, partitions),
            "user {user}"
        );
    }
    let published: std::collections::BTreeSet<u64> = touches.iter().map(|&(_, u)| u).collect();
    assert_eq!(published, counted);
    let dlq = topk::config::dlq_topic(&setup.topic);
    assert_eq!(
        workload::dead_letters(&setup.brokers, &dlq, load.dead_total()).await,
        load.dead
    );
    assert!(
        load.dead.len() >= 7,
        "every rejection kind was exercised: {:?}",
        load.dead
    );
    if setup.clickhouse.cluster.is_some() {
        common::assert_users_on_their_shards(&setup.clickhouse, load.total()).await;
    }
    common::drop_database(&setup.clickhouse).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oracle_on_the_dev_broker() {
    // The full version's 200k events need more partitions (see `common::dev_broker`).
    let partitions = if common::scale() > 1 { 32 } else { 4 };
    oracle_exact_totals_and_dead_letters(setup(partitions).await, scale(20_000)).await;
}

/// The counts on a 2-shard cluster: exact totals, every user's rows on its shard alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oracle_on_the_cluster() {
    oracle_exact_totals_and_dead_letters(setup_cluster(4).await, scale(10_000)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oracle_on_tansu() {
    oracle_exact_totals_and_dead_letters(setup_tansu(4).await, scale(5_000)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_after_a_restart_is_not_counted() {
    let setup = setup(2).await;
    let now = workload::now_ms();
    let play = |id: &str, song: u64| {
        (
            "42".to_owned(),
            format!(r#"{{"event_id":"{id}","user_id":42,"song_id":{song},"timestamp":{now}}}"#)
                .into_bytes(),
        )
    };
    // Traffic on the other partition too, so resuming is more than a trivial case.
    let mut filler = Workload::new();
    filler.add(
        &mut workload::rng("restart-dedup"),
        500,
        now,
        Mix {
            users: 50,
            songs: 10,
            dup_rate: 0.0,
            bad_rate: 0.0,
        },
    );
    let mut first = filler.messages.clone();
    first.push(play("x-1", 7));
    workload::produce(&setup.brokers, &setup.topic, &first).await;

    let (shutdown, worker) = spawn_worker(&setup, "restart", &["--flush-interval=300ms"]);
    workload::wait_for_total(
        &setup.clickhouse,
        filler.total() + 1,
        Duration::from_secs(60),
    )
    .await;
    shutdown.cancel();
    worker.await.expect("joins").expect("clean shutdown");

    // The same event again after the restart, then a new one behind it on the same partition.
    workload::produce(
        &setup.brokers,
        &setup.topic,
        &[play("x-1", 7), play("y-1", 9)],
    )
    .await;
    let (shutdown, worker) = spawn_worker(&setup, "restart", &["--flush-interval=300ms"]);
    workload::wait_for_total(
        &setup.clickhouse,
        filler.total() + 2,
        Duration::from_secs(60),
    )
    .await;
    shutdown.cancel();
    worker.await.expect("joins").expect("clean shutdown");

    let mut truth = filler.truth.clone();
    *truth.entry((42, 7)).or_default() += 1;
    *truth.entry((42, 9)).or_default() += 1;
    workload::assert_same_totals(&workload::totals(&setup.clickhouse).await, &truth);
    common::drop_database(&setup.clickhouse).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_joining_and_leaving_mid_stream_changes_nothing() {
    let setup = setup(6).await;
    let mut rng = workload::rng("rebalance");
    let mut load = Workload::new();
    let group = common::unique("rebalance");
    let (shutdown_a, worker_a) = spawn_worker(&setup, &group, &["--flush-interval=400ms"]);

    let mut produced = 0;
    let mut worker_b = None;
    for round in 0..6 {
        let added = load.add(
            &mut rng,
            scale(3_000),
            workload::now_ms(),
            Mix {
                users: 200,
                songs: 30,
                dup_rate: 0.1,
                bad_rate: 0.02,
            },
        );
        produced += added.len();
        workload::produce(&setup.brokers, &setup.topic, &load.messages[added]).await;
        match round {
            // B joins: the group rebalances and A flushes what it gives up...
            1 => worker_b = Some(spawn_worker(&setup, &group, &["--flush-interval=400ms"])),
            // ...and B leaves again, flushing and committing on its way out.
            4 => {
                let (shutdown_b, handle_b) = worker_b.take().expect("B runs");
                shutdown_b.cancel();
                handle_b
                    .await
                    .expect("joins")
                    .expect("B shuts down cleanly");
            }
            _ => {}
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert!(produced > 0);
    workload::wait_for_total(&setup.clickhouse, load.total(), Duration::from_secs(120)).await;
    shutdown_a.cancel();
    worker_a.await.expect("joins").expect("clean shutdown");
    workload::assert_same_totals(&workload::totals(&setup.clickhouse).await, &load.truth);
    drop(setup.broker);
    common::drop_database(&setup.clickhouse).await;
}
