//! Ingest benchmark: events/s through the aggregator into ClickHouse, against a
//! consume-and-discard consumer on the same broker, in the same run.
//!
//! ```sh
//! scripts/stack up && eval "$(scripts/stack env)"
//! cargo bench --bench ingest                       # 1M events
//! TOPK_BENCH_EVENTS=200000 cargo bench --bench ingest
//! ```
//!
//! Each round runs three sides from a fresh consumer group until every event is consumed (the
//! baseline), counted in ClickHouse (the aggregator: flushed and committed), or consumed while
//! the same rows go into ClickHouse (the ceiling, see `ceiling_round`); rounds alternate them so
//! that a noisy neighbour hits all alike, each side once the machine is quiet. Two rates per
//! side: end to end (group join and start-up included) and steady (from the first event seen,
//! or the first commit, to the last), with the whole machine's CPU per event over the steady
//! part. Before the rounds, the aggregator's processing alone is timed on one core
//! (`process_only`); with the ceiling's CPU per event it gives the `bound`: the rate no
//! aggregator doing that processing can pass on these cores. Prints one JSON line with every
//! round and the median ratios (`TOPK_BENCH_ROUNDS`, default 3). When `scripts/stack env` names
//! a ClickHouse cluster (`TOPK_TEST_CLICKHOUSE_SHARD_URLS`), each round also runs the aggregator
//! into it (`"cluster"`: its rate over the one server's; both servers share the same 2 cores).
//!
//! The baseline is bimodal on these machines: ~1.05-1.1M events/s at ~1.5 µs of machine CPU
//! per event, or in some rounds ~0.6M at ~2.5 µs (a warm-up consume before it did not help);
//! the aggregator and the ceiling vary far less. Read the ratios with the rounds.

mod common;

use std::time::{Duration, Instant};

use common::{MachineCpu, env_or, unique};
use rdkafka::consumer::Consumer;
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
    broker
        .create_plays_topics(&topic, partitions)
        .expect("topics");

    eprintln!("producing {events} events to {partitions} partitions…");
    let produce_secs = common::produce(&brokers, &topic, events, users).await;

    let median = |mut values: Vec<f64>| {
        values.sort_by(f64::total_cmp);
        values[values.len() / 2]
    };
    let process_us = process_only(&brokers, &topic, events).await;
    let process_us_median = median(process_us.clone());

    let rounds: usize = env_or("TOPK_BENCH_ROUNDS", 3);
    let mut results = Vec::with_capacity(rounds);
    let mut ceilings = Vec::with_capacity(rounds);
    let mut on_cluster: Vec<Rates> = Vec::with_capacity(rounds);
    for round in 0..rounds {
        common::settle().await;
        let baseline = baseline_round(&brokers, &topic, events).await;
        common::settle().await;
        let (aggregator, rows) = aggregator_round(
            &brokers,
            &topic,
            events,
            common::clickhouse_args("topk_bench"),
        )
        .await;
        if let Some(cluster) = common::cluster_args("topk_bench") {
            common::settle().await;
            let (sharded, _) = aggregator_round(&brokers, &topic, events, cluster).await;
            eprintln!(
                "round {round}: aggregator into the cluster {:.0} ev/s steady ({:.0} end to end)",
                sharded.steady, sharded.end_to_end
            );
            on_cluster.push(sharded);
        }
        common::settle().await;
        let ceiling = ceiling_round(&brokers, &topic, events, rows).await;
        eprintln!(
            "round {round}: baseline {:.0} ev/s steady ({:.0} end to end), aggregator {:.0} ev/s steady ({:.0} end to end), ceiling (consume + insert {rows} rows) {:.0} ev/s steady",
            baseline.steady,
            baseline.end_to_end,
            aggregator.steady,
            aggregator.end_to_end,
            ceiling.steady
        );
        eprintln!(
            "round {round}: machine CPU per event: baseline {:.2} µs ({:.2} cores busy), aggregator {:.2} µs ({:.2}), ceiling {:.2} µs ({:.2}); processing alone {process_us_median:.2} µs",
            baseline.cpu_us_per_event,
            baseline.busy_cores,
            aggregator.cpu_us_per_event,
            aggregator.busy_cores,
            ceiling.cpu_us_per_event,
            ceiling.busy_cores
        );
        results.push((baseline, aggregator));
        ceilings.push(ceiling);
    }
    // What the machine could give an aggregator at best: its cores divided by the CPU an event
    // costs the ceiling (broker, consumer and the rows into ClickHouse) plus the aggregator's
    // own processing of it, measured alone on one core.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let bounds: Vec<f64> = ceilings
        .iter()
        .map(|c| cores as f64 * 1e6 / (c.cpu_us_per_event + process_us_median))
        .collect();
    let ratio =
        |pick: fn(&Rates) -> f64| median(results.iter().map(|(b, a)| pick(a) / pick(b)).collect());
    let round3 = |x: f64| (x * 1000.0).round() / 1000.0;
    println!(
        "{}",
        serde_json::json!({
            "benchmark": "ingest",
            "events": events,
            "partitions": partitions,
            "rounds": rounds,
            "produce_events_per_s": (events as f64 / produce_secs).round(),
            "baseline_consume_discard_events_per_s": {
                "steady": results.iter().map(|(b, _)| b.steady.round()).collect::<Vec<_>>(),
                "end_to_end": results.iter().map(|(b, _)| b.end_to_end.round()).collect::<Vec<_>>(),
            },
            "aggregator_into_clickhouse_events_per_s": {
                "steady": results.iter().map(|(_, a)| a.steady.round()).collect::<Vec<_>>(),
                "end_to_end": results.iter().map(|(_, a)| a.end_to_end.round()).collect::<Vec<_>>(),
            },
            "ceiling_consume_and_insert_events_per_s": {
                "steady": ceilings.iter().map(|c| c.steady.round()).collect::<Vec<_>>(),
            },
            "median_ratio_ceiling_to_baseline": {
                "steady": round3(median(
                    results.iter().zip(&ceilings).map(|((b, _), c)| c.steady / b.steady).collect(),
                )),
            },
            "median_ratio_aggregator_to_baseline": {
                "steady": round3(ratio(|r| r.steady)),
                "end_to_end": round3(ratio(|r| r.end_to_end)),
            },
            "machine_busy_cores": {
                "baseline": results.iter().map(|(b, _)| round3(b.busy_cores)).collect::<Vec<_>>(),
                "aggregator": results.iter().map(|(_, a)| round3(a.busy_cores)).collect::<Vec<_>>(),
                "ceiling": ceilings.iter().map(|c| round3(c.busy_cores)).collect::<Vec<_>>(),
            },
            "machine_cpu_us_per_event": {
                "baseline": results.iter().map(|(b, _)| round3(b.cpu_us_per_event)).collect::<Vec<_>>(),
                "aggregator": results.iter().map(|(_, a)| round3(a.cpu_us_per_event)).collect::<Vec<_>>(),
                "ceiling": ceilings.iter().map(|c| round3(c.cpu_us_per_event)).collect::<Vec<_>>(),
            },
            "process_only_us_per_event": process_us.iter().map(|&us| round3(us)).collect::<Vec<_>>(),
            "bound_events_per_s": bounds.iter().map(|b| b.round()).collect::<Vec<_>>(),
            "median_ratio_bound_to_baseline": round3(median(
                results.iter().zip(&bounds).map(|((b, _), bound)| bound / b.steady).collect(),
            )),
            "cores": cores,
            "cluster": (!on_cluster.is_empty()).then(|| serde_json::json!({
                "aggregator_into_cluster_events_per_s": {
                    "steady": on_cluster.iter().map(|a| a.steady.round()).collect::<Vec<_>>(),
                    "end_to_end": on_cluster.iter().map(|a| a.end_to_end.round()).collect::<Vec<_>>(),
                },
                "median_ratio_cluster_to_one_server": {
                    "steady": round3(median(
                        results.iter().zip(&on_cluster).map(|((_, a), c)| c.steady / a.steady).collect(),
                    )),
                },
                "machine_busy_cores": on_cluster.iter().map(|c| round3(c.busy_cores)).collect::<Vec<_>>(),
            })),
        })
    );
}

/// When a side's steady part began: the instant, the events done by then and the machine's CPU
/// counters.
type First = Option<(Instant, u64, MachineCpu)>;

/// Rates of one side of a round: `end_to_end` from the start (group join included) to the
/// last event, `steady` from the first event seen to the last (start-up excluded); over the
/// steady part, the whole machine's busy cores and its CPU time per event (broker, ClickHouse
/// and client together: they share the 2 cores).
struct Rates {
    end_to_end: f64,
    steady: f64,
    busy_cores: f64,
    cpu_us_per_event: f64,
}

impl Rates {
    fn new(events: u64, started: Instant, first: First, done: Instant) -> Self {
        let end_to_end = events as f64 / (done - started).as_secs_f64();
        match first {
            Some((at, seen, cpu)) if done > at && events > seen => {
                let (cpu_seconds, busy_cores) = cpu.since();
                Rates {
                    end_to_end,
                    steady: (events - seen) as f64 / (done - at).as_secs_f64(),
                    busy_cores,
                    cpu_us_per_event: cpu_seconds * 1e6 / (events - seen) as f64,
                }
            }
            _ => Rates {
                end_to_end,
                steady: end_to_end,
                busy_cores: 0.0,
                cpu_us_per_event: 0.0,
            },
        }
    }
}

/// Consume-and-discard with a fresh group: the most a consumer of this broker can do here.
async fn baseline_round(brokers: &str, topic: &str, events: u64) -> Rates {
    let (started, first) =
        consume_and_discard(brokers, topic, events, "bench_baseline", || ()).await;
    Rates::new(events, started, first, Instant::now())
}

/// Consumes `events` messages with a fresh group named after `group_prefix` and discards them;
/// `on_first` runs when the first arrives. Returns when it started and when (and after how
/// many, with the machine's CPU counters then) the first message came.
async fn consume_and_discard(
    brokers: &str,
    topic: &str,
    events: u64,
    group_prefix: &str,
    on_first: impl FnOnce(),
) -> (Instant, First) {
    let consumer = topk::kafka::consumer(brokers, &unique(group_prefix)).expect("consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let started = Instant::now();
    let mut on_first = Some(on_first);
    let mut first = None;
    let mut seen = 0u64;
    while seen < events {
        let message = consumer.recv().await.expect("message");
        std::hint::black_box(&message);
        seen += 1;
        if let Some(on_first) = on_first.take() {
            first = Some((Instant::now(), 1, MachineCpu::now()));
            on_first();
        }
    }
    (started, first)
}

/// The aggregator with a fresh group into a fresh database, until every event is counted
/// (flushed and committed). Its steady rate runs from the first commit seen. Progress is read
/// from the group's committed offsets (the aggregator commits only after a flush is durable),
/// not by summing ClickHouse every 50 ms, whose scans competed with the inserts measured; the
/// ClickHouse total is checked once at the end, exactly.
async fn aggregator_round(
    brokers: &str,
    topic: &str,
    events: u64,
    clickhouse: topk::config::ClickHouseArgs,
) -> (Rates, u64) {
    topk::migrate::run(&clickhouse).await.expect("migrate");
    let group = unique("bench_aggregator");
    let mut flags = common::databases::clickhouse_flags(&clickhouse);
    flags.extend([
        format!("--kafka-brokers={brokers}"),
        format!("--kafka-topic={topic}"),
        format!("--group={group}"),
        format!(
            "--flush-interval={}",
            std::env::var("TOPK_BENCH_FLUSH").unwrap_or_else(|_| "250ms".into())
        ),
        format!("--max-state-bytes={}", 4u64 << 30),
    ]);
    let args: topk_aggregator::AggregatorArgs = common::flags::parse(flags);
    let shutdown = CancellationToken::new();
    let started = Instant::now();
    let worker = tokio::spawn(topk_aggregator::run(args, shutdown.clone()));
    let watcher = common::group::reader(brokers, &group);
    let metadata = watcher
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("metadata");
    let partitions: Vec<i32> = metadata.topics()[0]
        .partitions()
        .iter()
        .map(|partition| partition.id())
        .collect();
    let mut first = None;
    loop {
        let committed: u64 =
            common::group::committed_offsets(&watcher, topic, partitions.iter().copied())
                .map(|offsets| {
                    offsets
                        .into_iter()
                        .flatten()
                        .filter_map(|offset| u64::try_from(offset).ok())
                        .sum()
                })
                .unwrap_or(0);
        if committed > 0 && first.is_none() {
            first = Some((Instant::now(), committed, MachineCpu::now()));
        }
        if committed >= events {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rates = Rates::new(events, started, first, Instant::now());
    shutdown.cancel();
    worker.await.expect("joins").expect("clean shutdown");
    let (mut total, mut rows) = (0, 0);
    for shard in topk::olap::Olap::open(&clickhouse).shards() {
        let (plays, rows_of_shard): (u64, u64) = shard
            .query("SELECT sum(plays), count() FROM plays_minute")
            .fetch_one()
            .await
            .expect("total");
        total += plays;
        rows += rows_of_shard;
    }
    assert_eq!(total, events, "every event counted exactly once");
    common::drop_database(&clickhouse).await;
    (rates, rows)
}

/// What no aggregator on this machine can beat: consume-and-discard while, from the first
/// event on, the same number of minute rows as the aggregator wrote goes into a fresh
/// ClickHouse database through the same client (in 100k-row inserts). Both must finish; the
/// steady rate runs from the first event to the later of the two. Parsing, dedup and counting
/// cost nothing here, so the gap between this and the baseline is ClickHouse's share of the
/// 2 cores.
async fn ceiling_round(brokers: &str, topic: &str, events: u64, rows: u64) -> Rates {
    let clickhouse = common::clickhouse_args("topk_bench_ceiling");
    topk::migrate::run(&clickhouse).await.expect("migrate");
    let client = topk::olap::client(&clickhouse);
    let mut inserting = None;
    let (started, first) = consume_and_discard(brokers, topic, events, "bench_ceiling", || {
        inserting = Some(tokio::spawn(insert_rows(client, rows)));
    })
    .await;
    if let Some(inserting) = inserting {
        inserting.await.expect("inserts");
    }
    let rates = Rates::new(events, started, first, Instant::now());
    common::drop_database(&clickhouse).await;
    rates
}

/// The aggregator's processing alone (validate, dedup, count: [`PartitionState::process`]) of
/// every event, one state per partition fed in the order the broker delivered them, on one
/// thread with nothing else running: µs per event, three passes over the same messages. The
/// messages are first consumed into memory with a fresh group (not timed). Flush row
/// encoding is not in it (the ceiling's inserts carry that).
async fn process_only(brokers: &str, topic: &str, events: u64) -> Vec<f64> {
    use rdkafka::Message as _;
    use topk::counting::partition::{Message, PartitionState};
    let consumer = topk::kafka::consumer(brokers, &unique("bench_process")).expect("consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let mut messages = Vec::with_capacity(events as usize);
    while (messages.len() as u64) < events {
        let message = consumer.recv().await.expect("message");
        messages.push((
            message.partition(),
            u64::try_from(message.offset()).unwrap_or(0),
            message.timestamp().to_millis(),
            message.key().map(<[u8]>::to_vec),
            message.payload().map(<[u8]>::to_vec),
        ));
    }
    drop(consumer);
    // The rules the aggregator side runs with: its defaults (and their environment overrides).
    let rules: topk::counting::CountingRules = common::flags::parse(Vec::<String>::new());
    (0..3)
        .map(|_| {
            let mut states = std::collections::HashMap::new();
            let started = Instant::now();
            for (partition, offset, timestamp, key, payload) in &messages {
                let state = states.entry(*partition).or_insert_with(|| {
                    PartitionState::new(
                        *partition,
                        rules.validator(),
                        rules.dedup_window_ms(),
                        None,
                        Vec::new(),
                    )
                });
                std::hint::black_box(state.process(Message {
                    offset: *offset,
                    timestamp: *timestamp,
                    key: key.as_deref(),
                    payload: payload.as_deref(),
                }));
            }
            let us = started.elapsed().as_secs_f64() * 1e6 / events as f64;
            drop(std::hint::black_box(states));
            us
        })
        .collect()
}

/// Inserts `rows` distinct minute rows of the last hour, 100k per insert.
async fn insert_rows(client: clickhouse::Client, rows: u64) {
    const PER_INSERT: u64 = 100_000;
    let minute = (time::OffsetDateTime::now_utc().unix_timestamp() / 60 * 60) as u32;
    for start in (0..rows).step_by(PER_INSERT as usize) {
        let mut insert = client
            .insert::<topk::olap::tables::PlayRow>("plays_minute")
            .await
            .expect("insert");
        for i in start..(start + PER_INSERT).min(rows) {
            let row = topk::olap::tables::PlayRow {
                user_id: (i * 7_919) % 100_000 + 1,
                song_id: (i * 104_729) % 10_000 + 1,
                minute: minute - (i % 60) as u32 * 60,
                plays: 1,
                batch_id: i / PER_INSERT,
            };
            insert.write(&row).await.expect("row");
        }
        insert.end().await.expect("insert ends");
    }
}
