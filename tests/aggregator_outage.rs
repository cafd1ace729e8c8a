//! ClickHouse stopped under load: the aggregator holds its state under `--max-state-bytes`,
//! pauses consumption instead of crashing or dropping anything, and once ClickHouse is back
//! the totals are exact. Uses a private ClickHouse started by `scripts/stack` so that stopping
//! it disturbs no other test.

mod common;

use std::time::Duration;

use common::private_stack::{PrivateStack, Spec};
use common::workload::{self, Mix, Workload};
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use tokio_util::sync::CancellationToken;

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clickhouse_outage_is_backpressure_not_loss() {
    topk::telemetry::init_logging();
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder
        .install()
        .expect("the only recorder of this test process");

    let clickhouse_server = PrivateStack::start(Spec {
        name: "outage",
        services: &["clickhouse"],
        database: "topk_outage",
        ..Spec::default()
    })
    .await;
    let clickhouse = clickhouse_server.clickhouse();
    topk::migrate::run(&clickhouse).await.expect("migrate");

    let (broker, topic) = common::dev_broker(4);
    let brokers = broker.bootstrap_servers();

    let args = common::aggregator_args(
        &brokers,
        &topic,
        &clickhouse,
        &[
            &format!("--max-state-bytes={MAX_STATE_BYTES}"),
            "--flush-interval=300ms",
            // A short dedup window keeps the (unflushable) dedup memory small next to the cap.
            "--dedup-window=1s",
        ],
    );
    let shutdown = CancellationToken::new();
    let worker = tokio::spawn(topk_aggregator::run(args, shutdown.clone()));

    let mut rng = workload::rng("outage");
    let mut load = Workload::new();
    let mix = Mix {
        users: 20_000,
        songs: 2_000,
        dup_rate: 0.0,
        bad_rate: 0.01,
    };
    load.add(&mut rng, 5_000, workload::now_ms(), mix);
    workload::produce(&brokers, &topic, &load.messages).await;
    workload::wait_for_total(&clickhouse, load.total(), Duration::from_secs(60)).await;

    // Outage: ClickHouse stops while traffic keeps coming, far more than fits under the cap.
    clickhouse_server.run("down", &["clickhouse"]).await;
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

    // Back up: the worker resumes on its own (every play is then counted, exactly once).
    clickhouse_server.run("up", &["clickhouse"]).await;
    workload::wait_for_total(&clickhouse, load.total(), Duration::from_secs(120)).await;
    shutdown.cancel();
    worker.await.expect("joins").expect("clean shutdown");
    workload::assert_same_totals(&workload::totals(&clickhouse).await, &load.truth);
}
