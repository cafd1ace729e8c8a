//! The raw event archive and the rebuild of ClickHouse from it, against the real services:
//! every produced message (malformed ones included) is archived exactly once, also across
//! `kill -9` of archivers mid-upload; an S3 outage is waited out; and after ClickHouse's data is
//! dropped, `topk backfill` from the archive (local directory and the S3-compatible server)
//! brings the totals back to the oracle's truth exactly, idempotently, and without counting
//! twice what the aggregator already wrote. `TOPK_TEST_SCALE=10` runs the full versions.

mod common;

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::Duration;

use common::workload::{self, Mix, Workload};
use rand::Rng;
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;
use topk_archive::layout::ObjectName;
use topk_archive::record::{self, Record};
use topk_archive::{ArchiveArgs, BackfillArgs, BackfillReport};

const MIX: Mix = Mix {
    users: 300,
    songs: 40,
    dup_rate: 0.1,
    bad_rate: 0.05,
};

/// The stack's S3-compatible server (`scripts/stack up s3`).
fn s3_endpoint() -> String {
    std::env::var("TOPK_S3_ENDPOINT").unwrap_or_else(|_| "http://127.0.0.1:5000".to_owned())
}

/// Creates a bucket of the test's own on the S3-compatible server at `endpoint`.
fn new_bucket(endpoint: &str) -> String {
    let bucket = common::unique("archive").replace('_', "-");
    let status = std::process::Command::new("curl")
        .args(["-sf", "-X", "PUT", &format!("{endpoint}/{bucket}")])
        .status()
        .expect("curl runs");
    assert!(
        status.success(),
        "the S3-compatible server must run at {endpoint} (scripts/stack up s3)"
    );
    bucket
}

/// Store flags: a local directory, or a bucket on an S3-compatible endpoint.
fn store_flags(url: &str, endpoint: Option<&str>) -> Vec<String> {
    let mut flags = vec![format!("--archive-url={url}")];
    if let Some(endpoint) = endpoint {
        // Secrets come from a file (or the environment), never from a flag value.
        let secret = std::env::temp_dir().join(format!("topk-test-s3-{}", std::process::id()));
        std::fs::write(&secret, "topk-test\n").expect("secret file");
        flags.extend([
            format!("--s3-endpoint={endpoint}"),
            "--s3-access-key-id=topk-test".to_owned(),
            format!("--s3-secret-access-key-file={}", secret.display()),
        ]);
    }
    flags
}

fn archive_args(brokers: &str, topic: &str, store: &[String], extra: &[&str]) -> ArchiveArgs {
    let mut argv = vec![
        format!("--kafka-brokers={brokers}"),
        format!("--kafka-topic={topic}"),
        format!("--group={}", common::unique("archive")),
        "--kafka-session-timeout=2s".to_owned(),
        "--flush-interval=300ms".to_owned(),
    ];
    argv.extend(store.iter().cloned());
    argv.extend(extra.iter().map(|s| (*s).to_owned()));
    common::flags::parse(argv)
}

fn backfill_args(
    brokers: &str,
    topic: &str,
    store: &[String],
    clickhouse: &topk::config::ClickHouseArgs,
    extra: &[String],
) -> BackfillArgs {
    let mut argv = vec![
        format!("--kafka-brokers={brokers}"),
        format!("--kafka-topic={topic}"),
        format!("--since={}", since_day()),
    ];
    argv.extend(common::clickhouse_flags(clickhouse));
    argv.extend(store.iter().cloned());
    argv.extend(extra.iter().cloned());
    common::flags::parse(argv)
}

/// The first day any generated play can fall on (plays reach 7 days back; older ones are
/// rejected as too old anyway).
fn since_day() -> String {
    let day = time::OffsetDateTime::now_utc().date() - time::Duration::days(8);
    format!(
        "{:04}-{:02}-{:02}",
        day.year(),
        u8::from(day.month()),
        day.day()
    )
}

/// Everything in the archive of `topic`: per partition, each object with its records.
async fn archived(store: &[String], topic: &str) -> BTreeMap<i32, Vec<(ObjectName, Vec<Record>)>> {
    let args: topk_archive::StoreArgs = common::flags::parse(store);
    let store = topk_archive::store::open(&args).expect("store opens");
    let listing = topk_archive::store::list_topic(store.as_ref(), topic)
        .await
        .expect("listing");
    let mut out = BTreeMap::new();
    for (partition, objects) in listing {
        let mut read = Vec::new();
        for listed in objects {
            use object_store::ObjectStoreExt as _;
            let body = store
                .get(&listed.name.path(topic))
                .await
                .expect("get")
                .bytes()
                .await
                .expect("body");
            read.push((listed.name, record::decode(&body).expect("decodes")));
        }
        out.insert(partition, read);
    }
    out
}

async fn archived_count(store: &[String], topic: &str) -> usize {
    archived(store, topic)
        .await
        .values()
        .flatten()
        .map(|(_, records)| records.len())
        .sum()
}

/// Waits until the archive holds `expected` messages; panics after `limit`.
async fn wait_for_archive(store: &[String], topic: &str, expected: usize, limit: Duration) {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let count = archived_count(store, topic).await;
        if count >= expected {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {count} of {expected} messages archived after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// The archive holds every produced message exactly once: objects of a partition tile its
/// offsets `0..n` without overlap or hole, each name matches its content, and the (key, value)
/// pairs are exactly the produced ones.
async fn assert_archive_is_exact(store: &[String], topic: &str, load: &Workload) {
    let archive = archived(store, topic).await;
    let mut got: BTreeMap<(Vec<u8>, Vec<u8>), u64> = BTreeMap::new();
    for (partition, objects) in &archive {
        let mut next = 0u64;
        for (name, records) in objects {
            assert_eq!(
                name.first, next,
                "partition {partition}: objects must tile the offsets"
            );
            let offsets: Vec<u64> = records.iter().map(|r| r.offset).collect();
            let expected: Vec<u64> = (name.first..=name.last).collect();
            assert_eq!(offsets, expected, "object {name:?} holds exactly its range");
            let max_ts = records
                .iter()
                .filter_map(|r| r.timestamp)
                .max()
                .unwrap_or(0);
            assert_eq!(name.max_ts, max_ts.max(0));
            for record in records {
                assert_eq!(record.partition, *partition);
                assert!(record.timestamp.is_some(), "broker timestamp kept");
                let key = record.key_bytes().unwrap().unwrap_or_default();
                let value = record.value_bytes().unwrap().unwrap_or_default();
                *got.entry((key, value)).or_default() += 1;
            }
            next = name.last + 1;
        }
    }
    let mut produced: BTreeMap<(Vec<u8>, Vec<u8>), u64> = BTreeMap::new();
    for (key, value) in &load.messages {
        *produced
            .entry((key.as_bytes().to_vec(), value.clone()))
            .or_default() += 1;
    }
    assert_eq!(
        got.values().sum::<u64>(),
        load.messages.len() as u64,
        "message count"
    );
    assert!(
        got == produced,
        "archived messages differ from the produced ones"
    );
}

fn start_archiver(
    brokers: &str,
    topic: &str,
    store: &[String],
    log: &std::path::Path,
    extra: &[&str],
) -> Child {
    let mut args = vec![
        "archive".to_owned(),
        format!("--kafka-brokers={brokers}"),
        format!("--kafka-topic={topic}"),
        "--group=archive-crash-test".to_owned(),
        "--kafka-session-timeout=2s".to_owned(),
        "--flush-interval=200ms".to_owned(),
        "--max-batch-messages=400".to_owned(),
    ];
    args.extend(store.iter().cloned());
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    common::spawn_topk(&args, log)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_message_archived_exactly_once_across_kill_9() {
    // The dev broker trims a partition beyond 100,000 messages or 5 MB, which would delete
    // messages before a crashed archiver's successor reads them: the full version (450k
    // messages) spreads them over more partitions.
    let (broker, topic) = common::dev_broker(if common::scale() > 1 { 32 } else { 4 });
    let brokers = broker.bootstrap_servers();
    let dir = tempfile::tempdir().expect("archive dir");
    let store = store_flags(&dir.path().display().to_string(), None);
    let logs = tempfile::tempdir().expect("log dir");
    let mut rng = workload::rng("archive-crash");
    let mut load = Workload::new();

    let kills = if common::scale() > 1 { 30 } else { 8 };
    for round in 0..kills {
        let added = load.add(&mut rng, 1_500 * common::scale(), workload::now_ms(), MIX);
        workload::produce(&brokers, &topic, &load.messages[added]).await;
        // Every other archiver sleeps between its puts and its commit, so that most kills of
        // those land after an upload and before the commit that would have covered it.
        let extra: &[&str] = if round % 2 == 0 {
            &["--test-pause-before-commit=700ms"]
        } else {
            &[]
        };
        let log = logs.path().join(format!("archiver-{round:02}.log"));
        if round == 0 {
            // One kill surely between an upload and its commit: the commit never comes, and the
            // kill follows the first object seen in the store.
            let mut child = start_archiver(
                &brokers,
                &topic,
                &store,
                &log,
                &["--test-pause-before-commit=1h"],
            );
            while archived_count(&store, &topic).await == 0 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            child.start_kill().expect("SIGKILL");
            child.wait().await.expect("reaped");
            continue;
        }
        let mut child = start_archiver(&brokers, &topic, &store, &log, extra);
        tokio::time::sleep(Duration::from_millis(rng.random_range(500..4_000))).await;
        child.start_kill().expect("SIGKILL");
        child.wait().await.expect("reaped");
    }

    let log = logs.path().join("archiver-final.log");
    let child = start_archiver(&brokers, &topic, &store, &log, &[]);
    wait_for_archive(
        &store,
        &topic,
        load.messages.len(),
        Duration::from_secs(180),
    )
    .await;
    common::terminate(child).await;

    assert_archive_is_exact(&store, &topic, &load).await;
    assert!(
        load.dead.len() >= 7,
        "every malformed kind produced: {:?}",
        load.dead
    );

    // Proof that the rewrite path ran: a later archiver found objects past the committed offset
    // (at least those of round 0) and rewrote them under the same names.
    let rewrites = common::count_log_lines(logs.path(), "partition resumed", "existing=0");
    assert!(
        rewrites > 0,
        "no kill landed between an upload and its commit; logs in {:?}",
        logs.keep()
    );
}

/// Archiver and aggregator run side by side on the same traffic until both are done.
async fn archive_and_aggregate(
    brokers: &str,
    topic: &str,
    store: &[String],
    clickhouse: &topk::config::ClickHouseArgs,
    load: &Workload,
    aggregator_group: &str,
) {
    let archiver_stop = CancellationToken::new();
    let archiver = tokio::spawn(topk_archive::run(
        archive_args(brokers, topic, store, &[]),
        archiver_stop.clone(),
    ));
    let aggregator_stop = CancellationToken::new();
    let aggregator = tokio::spawn(topk_aggregator::run(
        common::aggregator_args(
            brokers,
            topic,
            clickhouse,
            &[
                &format!("--group={aggregator_group}"),
                "--flush-interval=500ms",
            ],
        ),
        aggregator_stop.clone(),
    ));
    workload::wait_for_total(clickhouse, load.total(), Duration::from_secs(180)).await;
    wait_for_archive(store, topic, load.messages.len(), Duration::from_secs(180)).await;
    aggregator_stop.cancel();
    archiver_stop.cancel();
    aggregator
        .await
        .expect("joins")
        .expect("aggregator stops cleanly");
    archiver
        .await
        .expect("joins")
        .expect("archiver stops cleanly");
    workload::assert_same_totals(&workload::totals(clickhouse).await, &load.truth);
}

/// `(rows, plays)` of `plays_minute` as stored, without any read-side deduplication: equal
/// before and after a re-run only if the re-run changed nothing.
async fn stored(clickhouse: &topk::config::ClickHouseArgs) -> (u64, u64) {
    topk::olap::client(clickhouse)
        .query("SELECT count(), sum(plays) FROM plays_minute")
        .fetch_one::<(u64, u64)>()
        .await
        .expect("stored rows")
}

/// Drops every table of the test's database and recreates the schema: ClickHouse lost.
async fn lose_clickhouse(clickhouse: &topk::config::ClickHouseArgs) {
    topk::olap::server_client(clickhouse)
        .query(&format!("DROP DATABASE {}", clickhouse.database))
        .execute()
        .await
        .expect("database dropped");
    topk::migrate::run(clickhouse).await.expect("schema again");
    assert_eq!(workload::grand_total(clickhouse).await, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn disaster_drill_from_a_local_directory() {
    let (broker, topic) = common::dev_broker(4);
    let brokers = broker.bootstrap_servers();
    let clickhouse = common::migrated_database().await;
    let dir = tempfile::tempdir().expect("archive dir");
    let store = store_flags(&dir.path().display().to_string(), None);
    let mut load = Workload::new();
    load.add(
        &mut workload::rng("drill-local"),
        6_000 * common::scale(),
        workload::now_ms(),
        MIX,
    );
    workload::produce(&brokers, &topic, &load.messages).await;
    let group = common::unique("aggregator");
    archive_and_aggregate(&brokers, &topic, &store, &clickhouse, &load, &group).await;

    // On top of what the aggregator wrote, up to where it committed: nothing counts twice.
    let up_to = [format!("--up-to-group={group}")];
    let args = backfill_args(&brokers, &topic, &store, &clickhouse, &up_to);
    let report = topk_archive::backfill::run(&args).await.expect("backfill");
    assert_eq!(report.plays, load.total());
    workload::assert_same_totals(&workload::totals(&clickhouse).await, &load.truth);

    // ClickHouse lost: the archive alone brings every count back.
    lose_clickhouse(&clickhouse).await;
    let args = backfill_args(&brokers, &topic, &store, &clickhouse, &up_to);
    let first: BackfillReport = topk_archive::backfill::run(&args).await.expect("backfill");
    workload::assert_same_totals(&workload::totals(&clickhouse).await, &load.truth);
    assert_eq!(first.messages, load.messages.len() as u64);
    assert_eq!(first.rejected, load.dead_total());
    assert_eq!(first.plays, load.total());
    assert_eq!(first.gaps, 0);
    let after_first = stored(&clickhouse).await;
    assert_eq!(after_first.1, load.total());

    // Idempotent: a second run leaves the table exactly as it was.
    let second = topk_archive::backfill::run(&args)
        .await
        .expect("backfill again");
    assert_eq!(second, first);
    assert_eq!(stored(&clickhouse).await, after_first);

    // The replaced days are marked touched, so rollups of them are recomputed.
    let touched: u64 = topk::olap::client(&clickhouse)
        .query("SELECT uniqExact(day) FROM day_touches")
        .fetch_one()
        .await
        .expect("touches");
    assert_eq!(touched, first.days.len() as u64);
    assert_no_replace_from_an_empty_day(&clickhouse).await;
    common::drop_database(&clickhouse).await;
}

/// Every `REPLACE PARTITION` the backfills sent (the server's query log, scripts/stack's
/// `log_queries`) named a day that holds rows: a current ClickHouse refuses a replace from an
/// empty source partition, so a day the archive holds nothing for (`--since` is a day before
/// any play) must be dropped instead.
async fn assert_no_replace_from_an_empty_day(clickhouse: &topk::config::ClickHouseArgs) {
    let server = topk::olap::server_client(clickhouse);
    server
        .query("SYSTEM FLUSH LOGS")
        .execute()
        .await
        .expect("logs flushed");
    let replaced: Vec<String> = server
        .query(
            "SELECT DISTINCT extract(query, 'REPLACE PARTITION ([0-9]+)') FROM system.query_log \
             WHERE quota_key = ? AND type = 2 AND query LIKE 'ALTER TABLE plays_minute REPLACE%'",
        )
        .bind(&clickhouse.database)
        .fetch_all()
        .await
        .expect("query log");
    let dropped: u64 = server
        .query(
            "SELECT count() FROM system.query_log WHERE quota_key = ? AND type = 2 \
             AND query LIKE 'ALTER TABLE plays_minute DROP PARTITION%'",
        )
        .bind(&clickhouse.database)
        .fetch_one()
        .await
        .expect("query log");
    assert!(!replaced.is_empty(), "the backfills replaced days");
    for partition in replaced {
        let rows: u64 = topk::olap::client(clickhouse)
            .query(&format!(
                "SELECT count() FROM plays_minute WHERE toYYYYMMDD(minute, 'UTC') = {partition}"
            ))
            .fetch_one()
            .await
            .expect("rows of the day");
        assert!(
            rows > 0,
            "partition {partition} was replaced from an empty source"
        );
    }
    assert!(dropped > 0, "the day before any play was dropped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn disaster_drill_from_the_s3_compatible_server_with_the_cli() {
    let (broker, topic) = common::dev_broker(4);
    let brokers = broker.bootstrap_servers();
    let clickhouse = common::migrated_database().await;
    let endpoint = s3_endpoint();
    let store = store_flags(
        &format!("s3://{}/drill", new_bucket(&endpoint)),
        Some(&endpoint),
    );
    let mut load = Workload::new();
    load.add(
        &mut workload::rng("drill-s3"),
        4_000 * common::scale(),
        workload::now_ms(),
        MIX,
    );
    workload::produce(&brokers, &topic, &load.messages).await;
    let group = common::unique("aggregator");
    archive_and_aggregate(&brokers, &topic, &store, &clickhouse, &load, &group).await;
    assert_archive_is_exact(&store, &topic, &load).await;

    lose_clickhouse(&clickhouse).await;
    let backfill = || {
        std::process::Command::new(common::topk_bin())
            .arg("backfill")
            .args([
                format!("--kafka-brokers={brokers}"),
                format!("--kafka-topic={topic}"),
                format!("--clickhouse-url={}", clickhouse.url),
                format!("--clickhouse-database={}", clickhouse.database),
                format!("--since={}", since_day()),
                format!("--up-to-group={group}"),
            ])
            .args(&store)
            .output()
            .expect("topk backfill runs")
    };
    let output = backfill();
    assert!(
        output.status.success(),
        "topk backfill failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON report");
    assert_eq!(report["plays"], load.total());
    // Not a terminal: progress comes as plain log lines.
    assert!(String::from_utf8_lossy(&output.stderr).contains("partition replayed"));
    workload::assert_same_totals(&workload::totals(&clickhouse).await, &load.truth);
    let after_first = stored(&clickhouse).await;
    assert!(backfill().status.success());
    assert_eq!(stored(&clickhouse).await, after_first);
    common::drop_database(&clickhouse).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_s3_outage_is_waited_out_without_loss() {
    // A private S3-compatible server that is down when the archiver starts.
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
        listener.local_addr().expect("addr").port()
    };
    let endpoint = format!("http://127.0.0.1:{port}");
    let (broker, topic) = common::dev_broker(2);
    let brokers = broker.bootstrap_servers();
    let mut load = Workload::new();
    load.add(
        &mut workload::rng("s3-outage"),
        2_000,
        workload::now_ms(),
        MIX,
    );
    workload::produce(&brokers, &topic, &load.messages).await;
    let store = store_flags("s3://outage", Some(&endpoint));
    let stop = CancellationToken::new();
    let archiver = tokio::spawn(topk_archive::run(
        archive_args(&brokers, &topic, &store, &[]),
        stop.clone(),
    ));
    // Long enough for several failed uploads and retries.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(
        !archiver.is_finished(),
        "the archiver waits, it does not give up"
    );

    let mut moto = Command::new("moto_server")
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("moto_server starts (scripts/stack install)");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let created = std::process::Command::new("curl")
            .args(["-sf", "-X", "PUT", &format!("{endpoint}/outage")])
            .stdout(Stdio::null())
            .status()
            .expect("curl");
        if created.success() {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "moto did not start");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    wait_for_archive(
        &store,
        &topic,
        load.messages.len(),
        Duration::from_secs(120),
    )
    .await;
    stop.cancel();
    archiver.await.expect("joins").expect("clean stop");
    assert_archive_is_exact(&store, &topic, &load).await;
    moto.start_kill().expect("stop moto");
    moto.wait().await.expect("reaped");
}

/// The exact answers of every user with plays in `window`, ranked from the minute rows alone
/// (no rollup): what the query module and Redis must equal.
async fn minute_answers(
    clickhouse: &topk::config::ClickHouseArgs,
    window: topk::window::Window,
) -> BTreeMap<u64, Vec<topk::window::RankedSong>> {
    let rows: Vec<(u64, u64, u64)> = topk::olap::client(clickhouse)
        .query(&format!(
            "SELECT user_id, song_id, sum(plays) FROM plays_minute FINAL \
             WHERE minute >= toDateTime({}) AND minute < toDateTime({}) \
             GROUP BY user_id, song_id",
            window.start, window.end
        ))
        .fetch_all()
        .await
        .expect("minute rows");
    common::plays::ranked(
        rows.into_iter()
            .map(|(user, song, plays)| ((user, song), plays)),
    )
}

/// Issue 16, item 7. A backfill changes counts behind the refresher's back: it must publish a
/// touch for every user whose counts it replaced (present in the days before the
/// replace, whose rows may have vanished, or after it), so that the next refresher cycle
/// recomputes exactly them; and once the replaced days are rolled up again, a (user, song, day)
/// the backfill removed must not be read from the day's older rollup.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backfill_is_refreshed_and_its_rolled_up_days_forget_what_it_removed() {
    use topk::clock::ManualClock;
    use topk::query::TopQuery;
    use topk::window::{MAX_LIMIT, Window};

    let (broker, topic) = common::dev_broker(2);
    let brokers = broker.bootstrap_servers();
    let clickhouse = common::migrated_database().await;
    let client = topk::olap::client(&clickhouse);
    let dir = tempfile::tempdir().expect("archive dir");
    let store = store_flags(&dir.path().display().to_string(), None);
    let mut load = Workload::new();
    let now = workload::now_ms();
    load.add(&mut workload::rng("backfill-refresh"), 2_000, now, MIX);
    workload::produce(&brokers, &topic, &load.messages).await;
    let group = common::unique("aggregator");
    archive_and_aggregate(&brokers, &topic, &store, &clickhouse, &load, &group).await;

    // Counts the archive does not back (as a faulty writer would have left them), at noon of a
    // full day of the window: a user with nothing else, and a song of a real user.
    let clock = ManualClock::at(now);
    let window = Window::at(now);
    let day = window.full_days().nth(3).expect("a full day");
    let noon = (i64::from(day) + 43_200) * 1000;
    // The real user is the one with the most plays, surely in the window.
    let real = load
        .truth
        .iter()
        .max_by_key(|(_, n)| **n)
        .expect("plays")
        .0
        .0;
    let phantom = 1_000_001u64;
    let extra: Vec<common::plays::Play> = (0..5)
        .flat_map(|i| {
            [(phantom, 77), (real, 999_999)].map(|(user, song)| common::plays::Play {
                user,
                song,
                ts: noon + i * common::plays::MINUTE,
            })
        })
        .collect();
    let writer = topk_aggregator::store::Store::new(client.clone(), &topic);
    common::plays::flush(&writer, &extra, 1 << 40).await;

    // Day touches and rollup starts are server seconds: wait a second so that the rollup finds
    // every day clean.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let rolled = topk_maintenance::rollup(&client, &clock, false)
        .await
        .expect("rollup");
    assert_eq!(rolled.days.len(), window.full_days().count());
    let redis_args = common::redis_args();
    let redis = topk::cache::Redis::connect(&redis_args).expect("redis");
    let settings = topk_refresher::RefreshSettings {
        batch_size: 100,
        concurrency: 2,
        cache: topk::config::CachePolicyArgs {
            key_ttl: Duration::from_secs(8 * 24 * 3600),
            tombstone_ttl: Duration::from_secs(600),
        },
        catch_up_page: 100_000,
    };
    // The touches so far (the aggregator's), per partition: the backfill's come after them.
    let touches_topic = topk::touches::topic(&topic);
    let (partitions, before) = workload::touches(&brokers, &touches_topic).await;
    let owned: Vec<i32> = (0..partitions as i32).collect();
    let mut refresher = topk_refresher::Refresher::new(
        client.clone(),
        redis.clone(),
        &redis_args.prefix,
        partitions,
        &settings,
    );
    // The first cycle of a new group: every partition caught up from ClickHouse (the extra
    // counts published no touches).
    for &p in &owned {
        refresher.catch_up(p);
    }
    let first = refresher
        .cycle(&clock, &owned, &BTreeMap::new())
        .await
        .expect("first cycle");
    assert_eq!(first.settled, owned);
    let cached = |user: u64| {
        let (redis, prefix) = (redis.clone(), redis_args.prefix.clone());
        async move {
            redis
                .read_top(&prefix, user, MAX_LIMIT)
                .await
                .expect("read")
                .map(|answer| answer.songs)
        }
    };
    let phantom_songs: Vec<u64> = cached(phantom)
        .await
        .expect("the phantom user is cached")
        .iter()
        .map(|s| s.song_id)
        .collect();
    assert_eq!(phantom_songs, [77]);

    // The backfill replaces every day of the range with the archive's counts: the extra plays
    // are gone from the minutes.
    let up_to = [format!("--up-to-group={group}")];
    let args = backfill_args(&brokers, &topic, &store, &clickhouse, &up_to);
    let report = topk_archive::backfill::run(&args).await.expect("backfill");
    workload::assert_same_totals(&workload::totals(&clickhouse).await, &load.truth);
    let users: std::collections::BTreeSet<u64> = load.truth.keys().map(|&(u, _)| u).collect();
    assert!(users.contains(&real) && !users.contains(&phantom));
    assert_eq!(
        report.users_touched,
        users.len() as u64 + 1,
        "every user of the archive, and the user whose rows vanished"
    );

    // It published a touch for each of them, on the user's partition.
    let (_, after) = workload::touches(&brokers, &touches_topic).await;
    let mut skip: BTreeMap<i32, usize> = BTreeMap::new();
    for (p, _) in &before {
        *skip.entry(*p).or_default() += 1;
    }
    let mut touched: BTreeMap<i32, std::collections::BTreeSet<u64>> = BTreeMap::new();
    for (p, user) in after {
        match skip.get_mut(&p) {
            Some(n) if *n > 0 => *n -= 1,
            _ => {
                assert_eq!(p, topk::touches::partition_of(user, partitions));
                touched.entry(p).or_default().insert(user);
            }
        }
    }
    let mut want = users.clone();
    want.insert(phantom);
    assert_eq!(
        touched
            .values()
            .flatten()
            .copied()
            .collect::<std::collections::BTreeSet<u64>>(),
        want
    );

    // The next cycle recomputes exactly those users, and Redis equals the minute rows.
    let second = refresher
        .cycle(&clock, &owned, &touched)
        .await
        .expect("second cycle");
    assert_eq!(
        second.users,
        users.len() + 1,
        "the users the backfill touched"
    );
    let expected = minute_answers(&clickhouse, window).await;
    assert!(!expected.contains_key(&phantom));
    assert!(
        !expected[&real].iter().any(|s| s.song_id == 999_999),
        "the real user's extra song is gone"
    );
    assert_eq!(
        cached(phantom).await,
        None,
        "the phantom user's answer is gone"
    );
    for (&user, want) in &expected {
        assert_eq!(
            cached(user).await.as_ref(),
            Some(want),
            "Redis, user {user}"
        );
    }

    // The replaced days are dirty, then rolled up again: read from the new rollups, the
    // removed (user, song, day) keys stay removed.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let again = topk_maintenance::rollup(&client, &clock, false)
        .await
        .expect("rollup again");
    assert_eq!(again.days.len(), window.full_days().count());
    let query = TopQuery::new(client.clone());
    let clean = query.clean_days(window).await.expect("clean days");
    assert_eq!(
        clean.len(),
        window.full_days().count(),
        "every day clean again"
    );
    let mut all: Vec<u64> = expected.keys().copied().collect();
    all.push(phantom);
    for _ in 0..2 {
        // Twice: the first call re-runs with the clean days it finds, the second assumes them.
        let answers = query
            .top_for_users(&all, window, MAX_LIMIT)
            .await
            .expect("query");
        assert_eq!(answers[&phantom], [], "the phantom user has no plays");
        for (&user, want) in &expected {
            assert_eq!(
                &answers[&user], want,
                "query module from rollups, user {user}"
            );
        }
    }
    common::drop_database(&clickhouse).await;
}
