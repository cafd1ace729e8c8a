//! ClickHouse stopped under load (the server, or one shard of a cluster): the aggregator holds
//! its state under `--max-state-bytes`, pauses consumption instead of crashing or dropping
//! anything, and once ClickHouse is back the totals are exact. Uses a private ClickHouse started
//! by `scripts/stack` so that stopping it disturbs no other test.

mod common;

use std::time::Duration;

use common::private_stack::{PrivateStack, Spec};
use common::workload::{self, Mix, Workload};
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use tokio_util::sync::CancellationToken;
use topk::config::ClickHouseArgs;

const MAX_STATE_BYTES: u64 = 4 * 1024 * 1024;

/// Folds one snapshot into what the test watches. A snapshot resets the recorder's gauges, so
/// a gauge only shows up when it was set since the previous snapshot.
fn observe(snapshotter: &Snapshotter, max_state: &mut f64, paused_seen: &mut bool) {
    for (key, _, _, value) in snapshotter.snapshot().into_vec() {
        if let DebugValue::Gauge(v) = value {
            match key.key().name() {
                "topk_aggregator_state_bytes" => *max_state = max_state.max(v.0),
                "topk_aggregator_paused" => *paused_seen |= v.0 == 1.0,
                _ => {}
            }
        }
    }
}

/// What one outage test stops and starts, and what it checks while the outage lasts.
struct Outage<'a> {
    name: &'static str,
    /// The private stack's services, the ones `down` stops and the ones `up` starts again.
    services: &'static [&'static str],
    down: &'static [&'static str],
    up: &'static [&'static str],
    /// The stack's ClickHouse as the roles see it (a server or a cluster).
    clickhouse: &'a dyn Fn(&PrivateStack) -> ClickHouseArgs,
    /// Aggregator flags beyond the common ones.
    extra: &'static [&'static str],
}

/// What an outage test leaves for its own checks: the stack (still up), its ClickHouse, the
/// plays counted, and what `probe` read just before the outage and while it lasted.
struct Outcome {
    _stack: PrivateStack,
    clickhouse: ClickHouseArgs,
    total: u64,
    probed: (u64, u64),
}

/// Plays flow, ClickHouse (or part of it) stops, more plays than fit under the cap flow, the
/// consumer pauses and the state stops growing; `probe` reads ClickHouse just before the
/// outage and while it lasts; then it is back and every play is counted exactly once.
async fn backpressure_through(
    outage: Outage<'_>,
    probe: impl AsyncFn(&ClickHouseArgs) -> u64,
) -> Outcome {
    topk::telemetry::init_logging();
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder
        .install()
        .expect("the only recorder of this test process");

    let stack = PrivateStack::start(Spec {
        name: outage.name,
        services: outage.services,
        database: "topk_outage",
        ..Spec::default()
    })
    .await;
    let clickhouse = (outage.clickhouse)(&stack);
    topk::migrate::run(&clickhouse).await.expect("migrate");

    let (broker, topic) = common::dev_broker(4);
    let brokers = broker.bootstrap_servers();
    let cap = format!("--max-state-bytes={MAX_STATE_BYTES}");
    let mut flags = vec![
        cap.as_str(),
        "--flush-interval=300ms",
        // A short dedup window keeps the (unflushable) dedup memory small next to the cap.
        "--dedup-window=1s",
    ];
    flags.extend(outage.extra);
    let args = common::aggregator_args(&brokers, &topic, &clickhouse, &flags);
    let shutdown = CancellationToken::new();
    let worker = tokio::spawn(topk_aggregator::run(args, shutdown.clone()));

    let mut rng = workload::rng(outage.name);
    let mut load = Workload::new();
    let mix = Mix {
        users: 20_000,
        songs: 2_000,
        dup_rate: 0.05,
        bad_rate: 0.01,
    };
    load.add(&mut rng, 5_000, workload::now_ms(), mix);
    workload::produce(&brokers, &topic, &load.messages).await;
    workload::wait_for_total(&clickhouse, load.total(), Duration::from_secs(60)).await;

    // Outage: traffic keeps coming, far more than fits under the cap.
    let before = probe(&clickhouse).await;
    stack.run("down", outage.down).await;
    let mut max_state = 0f64;
    let mut paused_seen = false;
    for _ in 0..20 {
        let added = load.add(&mut rng, 5_000, workload::now_ms(), mix);
        workload::produce(&brokers, &topic, &load.messages[added]).await;
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_millis(60)).await;
            observe(&snapshotter, &mut max_state, &mut paused_seen);
        }
    }
    // Wait for the pause, then keep watching: paused, the state must stop growing.
    let mut watch_after_pause = 30;
    for _ in 0..900 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        observe(&snapshotter, &mut max_state, &mut paused_seen);
        if paused_seen {
            watch_after_pause -= 1;
            if watch_after_pause == 0 {
                break;
            }
        }
    }
    assert!(
        paused_seen,
        "consumption paused at the cap (max state seen: {max_state} bytes)"
    );
    assert!(!worker.is_finished(), "the worker survives the outage");
    // The cap is checked after every message: it may be passed by at most one message's worth.
    assert!(
        max_state <= (MAX_STATE_BYTES + 64 * 1024) as f64,
        "state {max_state} bytes exceeded the cap of {MAX_STATE_BYTES}"
    );
    let during = probe(&clickhouse).await;

    // Back up: the worker resumes on its own (every play is then counted, exactly once).
    stack.run("up", outage.up).await;
    workload::wait_for_total(&clickhouse, load.total(), Duration::from_secs(120)).await;
    shutdown.cancel();
    worker.await.expect("joins").expect("clean shutdown");
    workload::assert_same_totals(&workload::totals(&clickhouse).await, &load.truth);
    Outcome {
        _stack: stack,
        clickhouse,
        total: load.total(),
        probed: (before, during),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clickhouse_outage_is_backpressure_not_loss() {
    let outage = Outage {
        name: "outage",
        services: &["clickhouse"],
        down: &["clickhouse"],
        up: &["clickhouse"],
        clickhouse: &PrivateStack::clickhouse,
        extra: &[],
    };
    backpressure_through(outage, async |_| 0).await;
}

/// The sum of `plays_minute` on shard 1 of a cluster, its rows read as every reader does.
async fn shard_1_total(clickhouse: &ClickHouseArgs) -> u64 {
    topk::olap::Olap::open(clickhouse).shards()[0]
        .query("SELECT sum(plays) FROM plays_minute FINAL")
        .fetch_one()
        .await
        .expect("shard 1 answers")
}

/// One shard of a 2-shard cluster stopped while plays flow: every flush then writes the other
/// shard's rows and fails on the stopped one, again and again. Consumption pauses at the cap,
/// and once the shard is back every play is counted exactly once: the rows the failed flushes
/// left on the shard that stayed up collapse with their replays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_down_is_backpressure_and_its_return_double_counts_nothing() {
    let outage = Outage {
        name: "shard-outage",
        services: &["clickhouse-cluster"],
        down: &["clickhouse-shard-2"],
        up: &["clickhouse-cluster"],
        clickhouse: &PrivateStack::clickhouse_cluster,
        // Each failed attempt gives up quickly on the stopped shard.
        extra: &["--clickhouse-timeout=2s"],
    };
    let outcome = backpressure_through(outage, shard_1_total).await;
    // No flush could finish during the outage, yet the shard that stayed up gained plays: rows
    // of flushes that failed on the other shard (partial inserts), which their replays, once
    // the shard was back, did not double (the totals above are exact).
    let (before, during) = outcome.probed;
    assert!(
        during > before,
        "partial flushes landed on shard 1 ({before} plays before the outage, {during} during)"
    );
    common::assert_users_on_their_shards(&outcome.clickhouse, outcome.total).await;
}
