//! Flushes that outlive their partitions, assignments lost behind the worker's back and replays
//! after a change of the counting rules: none may count a play twice (issue 16, items 1, 2 and 4;
//! ARCHITECTURE.md, "Exactly-once flush protocol", "Fencing" and "Rules").
//!
//! Workers run as `topk aggregate` processes (the fencing is about what a process still does
//! after its partitions are gone, and one test freezes a worker with SIGSTOP). ClickHouse is the
//! stack's; the stall of test 1 is a TCP proxy of the test's own between one worker and it, so
//! no other test is disturbed.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::workload::{self, Mix, Workload};
use rand::rngs::StdRng;
use rdkafka::producer::FutureRecord;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::Child;
use tokio::sync::watch;

/// Starts `topk aggregate` with `flags` and extra environment, logging at info to `log`.
fn aggregate(flags: &[String], env: &[(&str, &str)], log: &Path) -> Child {
    let mut command = common::topk_command(&["aggregate"], log);
    command.args(flags).envs(env.iter().copied());
    command.spawn().expect("topk starts")
}

/// The traffic of the tests with generated load.
const MIX: Mix = Mix {
    users: 100,
    songs: 20,
    dup_rate: 0.1,
    bad_rate: 0.0,
};

/// What a test here runs against: a topic of its own on a dev broker, a migrated database of
/// its own, a folder for the workers' logs and a consumer group.
struct Setup {
    broker: topk_devbroker::DevBroker,
    brokers: String,
    topic: String,
    clickhouse: topk::config::ClickHouseArgs,
    logs: tempfile::TempDir,
    group: String,
}

impl Setup {
    async fn new(partitions: i32, group: &str) -> Self {
        let (broker, topic) = common::dev_broker(partitions);
        let brokers = broker.bootstrap_servers();
        Setup {
            broker,
            brokers,
            topic,
            clickhouse: common::migrated_database().await,
            logs: tempfile::tempdir().expect("log dir"),
            group: common::unique(group),
        }
    }

    fn log(&self, name: &str) -> PathBuf {
        self.logs.path().join(name)
    }

    /// Starts a worker of the group, writing to the database through `clickhouse_url`, with
    /// `extra` flags and environment, logging to `log`.
    fn worker(
        &self,
        clickhouse_url: &str,
        extra: &[String],
        env: &[(&str, &str)],
        log: &Path,
    ) -> Child {
        let mut flags = vec![
            format!("--kafka-brokers={}", self.brokers),
            format!("--kafka-topic={}", self.topic),
            format!("--clickhouse-url={clickhouse_url}"),
            format!("--clickhouse-database={}", self.clickhouse.database),
            format!("--group={}", self.group),
        ];
        flags.extend_from_slice(extra);
        aggregate(&flags, env, log)
    }

    /// Adds `n` generated plays to `load` and produces them.
    async fn produce(&self, load: &mut Workload, rng: &mut StdRng, n: usize) {
        let added = load.add(rng, n, workload::now_ms(), MIX);
        workload::produce(&self.brokers, &self.topic, &load.messages[added]).await;
    }

    /// ClickHouse holds exactly `expected`: every play once.
    async fn assert_totals(&self, expected: &BTreeMap<(u64, u64), u64>) {
        workload::assert_same_totals(&workload::totals(&self.clickhouse).await, expected);
    }

    async fn finish(self) {
        drop(self.broker);
        common::drop_database(&self.clickhouse).await;
    }
}

fn signal(child: &Child, name: &str) {
    common::signal(child.id().expect("running"), name);
}

/// Lines of `log` containing `needle`.
fn log_lines(log: &Path, needle: &str) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|line| line.contains(needle))
        .count()
}

/// Waits (up to `limit`) until `log` has at least `n` lines containing `needle`.
async fn wait_for_log(log: &Path, needle: &str, n: usize, limit: Duration) {
    let deadline = tokio::time::Instant::now() + limit;
    while log_lines(log, needle) < n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{n} lines with {needle:?} in {} within {limit:?}:\n{}",
            log.display(),
            std::fs::read_to_string(log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until ClickHouse holds at least `expected` plays (more is the double count the caller
/// asserts against).
async fn wait_for_at_least(
    clickhouse: &topk::config::ClickHouseArgs,
    expected: u64,
    limit: Duration,
) {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let total = workload::grand_total(clickhouse).await.unwrap_or(0);
        if total >= expected {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{total} of {expected} plays counted within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A TCP proxy in front of ClickHouse that can stall the flush intents: while `stall` is on, a
/// connection whose request is an `INSERT INTO flush_log` is held (everything the client sends
/// on it is kept, even after the client has given up and closed it) until `release`, then
/// delivered whole, as a server frozen and resumed would find it in its socket buffer. The
/// first line of the server's answer to each held request is recorded.
struct StallProxy {
    port: u16,
    stall: Arc<AtomicBool>,
    release: watch::Sender<bool>,
    held: Arc<Mutex<usize>>,
    answers: Arc<Mutex<Vec<String>>>,
}

impl StallProxy {
    async fn start(upstream: String) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let stall = Arc::new(AtomicBool::new(false));
        let (release, released) = watch::channel(false);
        let held = Arc::new(Mutex::new(0));
        let answers = Arc::new(Mutex::new(Vec::new()));
        let proxy = StallProxy {
            port,
            stall: Arc::clone(&stall),
            release,
            held: Arc::clone(&held),
            answers: Arc::clone(&answers),
        };
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let upstream = upstream.clone();
                let (stall, released) = (Arc::clone(&stall), released.clone());
                let (held, answers) = (Arc::clone(&held), Arc::clone(&answers));
                tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect(&upstream).await {
                        pump(client, server, stall, released, held, answers).await;
                    }
                });
            }
        });
        proxy
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn held(&self) -> usize {
        *self.held.lock().expect("lock")
    }

    /// Stops holding new requests and delivers the held ones.
    fn release(&self) {
        self.stall.store(false, Ordering::SeqCst);
        let _ = self.release.send(true);
    }

    fn answers(&self) -> Vec<String> {
        self.answers.lock().expect("lock").clone()
    }
}

async fn pump(
    client: TcpStream,
    server: TcpStream,
    stall: Arc<AtomicBool>,
    mut released: watch::Receiver<bool>,
    held: Arc<Mutex<usize>>,
    answers: Arc<Mutex<Vec<String>>>,
) {
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let holding = Arc::new(AtomicBool::new(false));
    let answer_of_held = {
        let holding = Arc::clone(&holding);
        tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            // The answer to the held request: its first 8 KiB (status line, headers, the
            // start of the body, where ClickHouse puts its error).
            let mut answer: Option<usize> = None;
            loop {
                let n = match server_read.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                if holding.load(Ordering::SeqCst) {
                    let text = String::from_utf8_lossy(&buf[..n]).to_string();
                    let mut answers = answers.lock().expect("lock");
                    match answer {
                        None => {
                            answer = Some(answers.len());
                            answers.push(text);
                        }
                        Some(index) if answers[index].len() < 8 * 1024 => {
                            answers[index].push_str(&text);
                        }
                        Some(_) => {}
                    }
                }
                // The client may be gone (it gave up on the held request): keep draining.
                let _ = client_write.write_all(&buf[..n]).await;
            }
        })
    };
    let mut kept: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut client_open = true;
    loop {
        if holding.load(Ordering::SeqCst) && *released.borrow() {
            if server_write.write_all(&kept).await.is_err() {
                break;
            }
            kept.clear();
            if !client_open {
                break;
            }
        }
        tokio::select! {
            read = client_read.read(&mut buf), if client_open => {
                let n = match read {
                    Ok(0) | Err(_) => { client_open = false; continue; }
                    Ok(n) => n,
                };
                let chunk = &buf[..n];
                if !holding.load(Ordering::SeqCst)
                    && stall.load(Ordering::SeqCst)
                    && contains(chunk, b"INSERT")
                    && contains(chunk, b"flush_log")
                {
                    holding.store(true, Ordering::SeqCst);
                    *held.lock().expect("lock") += 1;
                }
                if holding.load(Ordering::SeqCst) && !*released.borrow() {
                    kept.extend_from_slice(chunk);
                } else if server_write.write_all(chunk).await.is_err() {
                    break;
                }
            }
            changed = released.changed(), if holding.load(Ordering::SeqCst) && !*released.borrow() => {
                if changed.is_err() { break; }
            }
            else => break,
        }
    }
    // The whole request is delivered; wait for the server's answer (or its close).
    let _ = server_write.shutdown().await;
    let _ = answer_of_held.await;
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn upstream_address(url: &str) -> String {
    url.trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned()
}

/// Item 1: worker A's flush is stalled inside its intent insert (ClickHouse does not answer)
/// when worker B joins. A's revoke gives up on the flush, the partitions move, B resumes them
/// without seeing A's intent and cuts its own batches. Then the stalled insert reaches the
/// server. Before the fix it landed (and A's counts after it): the same offsets under two batch
/// ids. Now the server refuses it (its write deadline passed before A let the partitions go)
/// and A writes nothing more of partitions it gave up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_stalled_across_a_rebalance_counts_nothing_twice() {
    let setup = Setup::new(4, "fencing").await;
    let clickhouse = &setup.clickhouse;
    let proxy = StallProxy::start(upstream_address(&clickhouse.url)).await;
    let mut rng = workload::rng("fencing-stall");
    let mut load = Workload::new();
    let member = [
        "--flush-interval=500ms".to_owned(),
        "--kafka-session-timeout=10s".to_owned(),
    ];
    // The timeout through the environment: a binary without the setting ignores it (so the
    // same test runs against the code before the fix).
    let timeout_env = [("TOPK_AGGREGATOR_CLICKHOUSE_TIMEOUT", "2s")];

    // A alone, through the proxy, counts a first load.
    let log_a = setup.log("a.log");
    let a = setup.worker(&proxy.url(), &member, &timeout_env, &log_a);
    setup.produce(&mut load, &mut rng, 2_000).await;
    workload::wait_for_total(clickhouse, load.total(), Duration::from_secs(120)).await;

    // ClickHouse stalls for A's intents; A's next flush hangs in its intent insert.
    proxy.stall.store(true, Ordering::SeqCst);
    setup.produce(&mut load, &mut rng, 2_000).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while proxy.held() == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "A's intent insert reached the proxy"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // More traffic behind the stalled batch, so B's batches cannot coincide with A's.
    setup.produce(&mut load, &mut rng, 2_000).await;

    // B joins, straight to ClickHouse: the group takes partitions from A.
    let log_b = setup.log("b.log");
    let b = setup.worker(&clickhouse.url, &member, &timeout_env, &log_b);
    wait_for_log(&log_a, "partitions released", 1, Duration::from_secs(120)).await;
    // B has read the intents of the partitions it took (none of A's stalled one) ...
    wait_for_log(&log_b, "partition resumed", 1, Duration::from_secs(120)).await;
    // ... when the stalled insert reaches the server, with whatever A sends after it.
    proxy.release();

    wait_for_at_least(clickhouse, load.total(), Duration::from_secs(120)).await;
    common::terminate(a).await;
    common::terminate(b).await;
    setup.assert_totals(&load.truth).await;
    // The inserts held since before the rebalance reached the server after their deadline,
    // which A's revoke waited out before letting the partitions go: refused.
    let answers = proxy.answers();
    assert!(
        answers.iter().any(|answer| answer.contains("Code: 395")),
        "the intent inserts stalled past the handover must be refused by the server: {answers:?}"
    );
    setup.finish().await;
}

/// Item 2: worker A is frozen (SIGSTOP) with unflushed batches; the group evicts it and B
/// counts A's partitions from their committed offsets. When A runs again its assignment is
/// lost: before the fix its revoke flushed and committed those batches (counted twice); now
/// they are dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_assignment_is_dropped_unflushed() {
    let setup = Setup::new(4, "lost").await;
    let clickhouse = &setup.clickhouse;
    let mut rng = workload::rng("fencing-lost");
    let mut load = Workload::new();
    let member = |flush: &str| {
        vec![
            format!("--flush-interval={flush}"),
            "--kafka-session-timeout=3s".to_owned(),
        ]
    };

    // B alone counts a first load (so it holds every partition) ...
    let log_b = setup.log("b.log");
    let b = setup.worker(&clickhouse.url, &member("300ms"), &[], &log_b);
    setup.produce(&mut load, &mut rng, 1_000).await;
    workload::wait_for_total(clickhouse, load.total(), Duration::from_secs(60)).await;
    // ... then A joins and B gives some partitions up to it. A never flushes by its timer
    // during the test: what it holds stays unflushed.
    let log_a = setup.log("a.log");
    let a = setup.worker(&clickhouse.url, &member("10min"), &[], &log_a);
    wait_for_log(&log_b, "partitions released", 1, Duration::from_secs(60)).await;
    // In several separate sends: B, resuming A's partitions later, reads them in several
    // fetches, and its first batch ends at the first fetch boundary its flush timer meets. Were
    // it A's end, the two batches would be the same range, hence the same id and the same rows,
    // and the double count would not show.
    for _ in 0..5 {
        setup.produce(&mut load, &mut rng, 400).await;
    }
    // A has taken up at least one partition (and counted its messages, unflushed).
    wait_for_log(&log_a, "partition resumed", 1, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    // A freezes; the group evicts it after its session and B counts everything.
    signal(&a, "STOP");
    // More traffic behind what A holds, so that B's batches of A's partitions cannot coincide
    // with A's (the same range would have the same batch id and hide the double count).
    setup.produce(&mut load, &mut rng, 2_000).await;
    workload::wait_for_total(clickhouse, load.total(), Duration::from_secs(120)).await;
    let released_before = log_lines(&log_a, "partitions released");
    signal(&a, "CONT");
    wait_for_log(
        &log_a,
        "partitions released",
        released_before + 1,
        Duration::from_secs(60),
    )
    .await;

    common::terminate(a).await;
    common::terminate(b).await;
    setup.assert_totals(&load.truth).await;
    assert!(
        log_lines(&log_a, "assignment lost") >= 1,
        "A saw its assignment lost; log:\n{}",
        std::fs::read_to_string(&log_a).unwrap_or_default()
    );
    setup.finish().await;
}

/// Item 4: a flush wrote its intent and counts under `--dedup-window=10m` and died before its
/// commit; the next worker runs with `--dedup-window=1s`. The replayed batch must decide as
/// recorded (the retry 30 s later is a duplicate), or its rows, under the same batch id, would
/// replace the first attempt's with other counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_after_a_dedup_window_change_decides_as_recorded() {
    let setup = Setup::new(1, "rules").await;
    let clickhouse = &setup.clickhouse;
    let now = workload::now_ms();
    let play = |id: &str, song: u64, ts: i64| {
        format!(r#"{{"event_id":"{id}","user_id":7,"song_id":{song},"timestamp":{ts}}}"#)
    };
    // (payload, Kafka timestamp): a play, others, the first again 30 s later, one more. Each
    // message has a neighbour close behind it: the partition's clock only takes a timestamp
    // that the next message confirms.
    let first_run = [
        (play("x", 1, now - 60_000), now - 60_000),
        (play("y", 2, now - 59_000), now - 59_000),
        (play("w", 4, now - 31_000), now - 31_000),
        (play("x", 1, now - 60_000), now - 30_000),
        (play("v", 5, now - 29_000), now - 29_000),
    ];
    let producer = topk::kafka::producer(&setup.brokers).expect("producer");
    // Sent together (one producer, one partition: in order), so the first worker reads them in
    // one burst into one batch.
    let sends = first_run.iter().map(|(payload, ts)| {
        producer.send(
            FutureRecord::to(&setup.topic)
                .key("7")
                .payload(payload.as_str())
                .timestamp(*ts),
            Duration::from_secs(30),
        )
    });
    for sent in futures::future::join_all(sends).await {
        sent.expect("delivered");
    }

    // The first worker writes the batch (intent and counts) and is killed before committing.
    let log_1 = setup.log("first.log");
    let run = |window: &str, pause: Option<&str>| {
        let mut extra = vec![
            format!("--dedup-window={window}"),
            "--flush-interval=300ms".to_owned(),
        ];
        if let Some(pause) = pause {
            extra.push(format!("--test-pause-before-commit={pause}"));
        }
        extra
    };
    let mut first = setup.worker(&clickhouse.url, &run("10m", Some("10min")), &[], &log_1);
    workload::wait_for_total(clickhouse, 4, Duration::from_secs(60)).await;
    first.start_kill().expect("SIGKILL");
    first.wait().await.expect("reaped");
    let intents: Vec<(u64, u64)> = topk::olap::client(clickhouse)
        .query("SELECT start_offset, end_offset FROM flush_log FINAL ORDER BY start_offset")
        .fetch_all()
        .await
        .expect("intents");
    assert_eq!(intents, vec![(0, 5)], "one batch recorded, not committed");

    // The next worker, with a 1 s window, replays the recorded batch, then counts a new play.
    let log_2 = setup.log("second.log");
    let second = setup.worker(&clickhouse.url, &run("1s", None), &[], &log_2);
    producer
        .send(
            FutureRecord::to(&setup.topic)
                .key("7")
                .payload(play("z", 3, now - 4_000).as_str())
                .timestamp(now - 4_000),
            Duration::from_secs(30),
        )
        .await
        .expect("delivered");
    wait_for_at_least(clickhouse, 5, Duration::from_secs(60)).await;
    common::terminate(second).await;
    assert_eq!(
        log_lines(&log_2, "replay_intents=1"),
        1,
        "the second worker replayed the recorded intent; log:\n{}",
        std::fs::read_to_string(&log_2).unwrap_or_default()
    );
    let expected: BTreeMap<(u64, u64), u64> = [
        ((7, 1), 1),
        ((7, 2), 1),
        ((7, 3), 1),
        ((7, 4), 1),
        ((7, 5), 1),
    ]
    .into_iter()
    .collect();
    setup.assert_totals(&expected).await;
    setup.finish().await;
}

/// The fence migration runs again without harm: ClickHouse 18.16 has no `ADD COLUMN IF NOT
/// EXISTS`, so a run that stopped after adding a column and before recording the migration
/// must count the column as added.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fence_migration_applies_again_after_an_interrupted_run() {
    let clickhouse = common::migrated_database().await;
    let client = topk::olap::client(&clickhouse);
    // As if the run had stopped before recording anything.
    client
        .query("DROP TABLE schema_migrations")
        .execute()
        .await
        .expect("drop");
    let report = topk::migrate::run(&clickhouse)
        .await
        .expect("migrations apply again");
    assert_eq!(
        report.applied,
        (1..=topk::migrate::MIGRATIONS.len() as u32).collect::<Vec<_>>()
    );
    // The fence works: an intent past its deadline is refused, one without a deadline is not.
    let refused = client
        .query(
            "INSERT INTO flush_log (topic, src_partition, start_offset, end_offset, batch_id, \
             logged_at, write_deadline) VALUES ('t', 0, 0, 1, 1, now(), now() - 5)",
        )
        .execute()
        .await;
    assert!(
        matches!(&refused, Err(clickhouse::error::Error::BadResponse(m)) if m.contains("Code: 395")),
        "{refused:?}"
    );
    client
        .query(
            "INSERT INTO flush_log (topic, src_partition, start_offset, end_offset, batch_id, \
             logged_at) VALUES ('t', 0, 0, 1, 2, now())",
        )
        .execute()
        .await
        .expect("an intent without a deadline is taken");
    let rows: u64 = client
        .query("SELECT count() FROM flush_log")
        .fetch_one()
        .await
        .expect("count");
    assert_eq!(rows, 1);
    common::drop_database(&clickhouse).await;
}
