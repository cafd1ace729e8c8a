//! Issue 16, item 9: every day is a UTC day whatever the ClickHouse server's timezone. On a
//! server configured with Asia/Kolkata (+05:30: day boundaries off by a non-whole hour) the
//! rollups, the clean-day lookup, the exact window query and the day partitions that prune and
//! backfill's `REPLACE PARTITION` address must all use UTC days, as on a UTC server.
//!
//! The stack's server runs in UTC, so this test starts a private ClickHouse 18.16 of its own.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::plays::{MINUTE, Play, oracle};
use common::private_clickhouse::PrivateClickHouse;
use rand::Rng;
use topk::clock::{Clock, ManualClock};
use topk::olap::tables::day_of;
use topk::query::TopQuery;
use topk::window::Window;
use topk_aggregator::store::Store;

const TIMEZONE: &str = "Asia/Kolkata";

fn yyyymmdd(secs: u32) -> String {
    let date = time::OffsetDateTime::from_unix_timestamp(i64::from(secs))
        .expect("timestamp")
        .date();
    format!(
        "{:04}{:02}{:02}",
        date.year(),
        u8::from(date.month()),
        date.day()
    )
}

/// Plays on both sides of every UTC midnight from the day before `window` to now, at the
/// offsets where a +05:30 server puts them in another day than UTC does.
fn plays_around_midnights(rng: &mut impl Rng, window: Window, now_ms: i64) -> Vec<Play> {
    const OFFSETS_MIN: [i64; 12] = [
        -6 * 60,
        -5 * 60 - 31,
        -5 * 60 - 30,
        -5 * 60 - 29,
        -1,
        0,
        1,
        5 * 60 + 29,
        5 * 60 + 30,
        5 * 60 + 31,
        12 * 60,
        18 * 60 + 31,
    ];
    let mut plays = Vec::new();
    let mut midnight = i64::from(day_of(window.start)) * 1000;
    while midnight <= now_ms {
        for offset in OFFSETS_MIN {
            let ts = midnight + offset * MINUTE + rng.random_range(0..MINUTE);
            if ts >= now_ms {
                continue;
            }
            for _ in 0..rng.random_range(1..=3) {
                plays.push(Play {
                    user: rng.random_range(1..=5),
                    song: rng.random_range(1..=7),
                    ts,
                });
            }
        }
        midnight += common::plays::DAY;
    }
    plays
}

#[derive(Debug, clickhouse::Row, serde::Deserialize)]
struct PartRange {
    part: String,
    first: u32,
    last: u32,
}

#[derive(Debug, clickhouse::Row, serde::Deserialize)]
struct DayTotal {
    day: String,
    plays: u64,
}

/// Every part of `table` holds only rows of the UTC day its partition id names.
async fn assert_utc_day_partitions(client: &clickhouse::Client, table: &str, column: &str) {
    let parts: Vec<PartRange> = client
        .query(&format!(
            "SELECT _part AS part, toUInt32(min({column})) AS first, \
             toUInt32(max({column})) AS last FROM {table} GROUP BY part ORDER BY part"
        ))
        .fetch_all()
        .await
        .expect("parts");
    assert!(!parts.is_empty(), "{table} has rows");
    for part in &parts {
        let partition = part.part.split('_').next().expect("partition id");
        assert_eq!(
            (yyyymmdd(part.first), yyyymmdd(part.last)),
            (partition.to_owned(), partition.to_owned()),
            "{table} part {} holds rows of the UTC days of its partition id only",
            part.part
        );
    }
}

#[tokio::test]
async fn days_are_utc_days_on_a_server_in_another_timezone() {
    let server = PrivateClickHouse::start(TIMEZONE).await;
    let clickhouse = server.args(&common::unique("topk_tz"));
    topk::migrate::run(&clickhouse).await.expect("migrations");
    let client = topk::olap::client(&clickhouse);
    let tz: String = client
        .query("SELECT timezone()")
        .fetch_one()
        .await
        .expect("timezone");
    assert_eq!(tz, TIMEZONE, "the private server runs in {TIMEZONE}");

    let store = Store::new(client.clone(), "plays");
    let query = TopQuery::new(client.clone());
    let mut rng = common::workload::rng("timezone");
    let now_ms = topk::clock::SystemClock.now_ms();
    let clock = ManualClock::at(now_ms);
    let window = Window::at(clock.now_ms());
    let plays = plays_around_midnights(&mut rng, window, now_ms);
    common::plays::flush(&store, &plays, 0).await;

    // Every part of the minute table lies in one UTC day: what prune's `DROP PARTITION` and
    // backfill's `REPLACE PARTITION <YYYYMMDD>` address.
    assert_utc_day_partitions(&client, "plays_minute", "minute").await;

    // Touches and rollup starts are server seconds: a touch in the very second a rollup starts
    // leaves the day dirty, and this test wants every full day clean.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let rolled = topk_maintenance::rollup(&client, &clock, false)
        .await
        .expect("rollup");
    let full_days: Vec<u32> = window.full_days().collect();
    assert_eq!(
        rolled.days.iter().map(|d| d.0).collect::<Vec<_>>(),
        full_days,
        "every full UTC day of the window rolled up"
    );

    // Each rolled-up day holds exactly the plays of its UTC day.
    let mut expected_days: BTreeMap<String, u64> = BTreeMap::new();
    for play in &plays {
        let minute = (play.ts.div_euclid(MINUTE) * 60) as u32;
        let day = day_of(minute);
        if full_days.contains(&day) {
            *expected_days
                .entry(topk::olap::tables::date_literal(day))
                .or_default() += 1;
        }
    }
    let rolled_days: BTreeMap<String, u64> = client
        .query(
            "SELECT concat('''', toString(day), '''') AS day, sum(plays) AS plays \
             FROM plays_daily FINAL GROUP BY day ORDER BY day",
        )
        .fetch_all::<DayTotal>()
        .await
        .expect("daily totals")
        .into_iter()
        .map(|d| (d.day, d.plays))
        .collect();
    assert_eq!(rolled_days, expected_days, "daily rollups are UTC days");

    let clean: Vec<u32> = query
        .clean_days(window)
        .await
        .expect("clean days")
        .iter()
        .map(|c| c.day)
        .collect();
    assert_eq!(clean, full_days, "the clean days are the window's UTC days");

    let users: Vec<u64> = (1..=5).collect();
    for limit in [3, 10] {
        let expected = oracle(&plays, window, limit);
        let answers = query
            .top_for_users(&users, window, limit)
            .await
            .expect("window query");
        for &user in &users {
            assert_eq!(
                answers[&user],
                expected.get(&user).cloned().unwrap_or_default(),
                "exact answer of user {user}, limit {limit}"
            );
        }
    }
    let in_window: BTreeSet<u64> = common::plays::users_in_window(&client, window)
        .await
        .into_iter()
        .collect();
    assert_eq!(
        in_window,
        oracle(&plays, window, 1)
            .into_keys()
            .collect::<BTreeSet<_>>()
    );

    let _ = topk::olap::server_client(&clickhouse)
        .query(&format!("DROP DATABASE IF EXISTS {}", clickhouse.database))
        .execute()
        .await;
}

async fn user_touch_count(client: &clickhouse::Client) -> u64 {
    client
        .query("SELECT count() FROM user_touches")
        .fetch_one()
        .await
        .expect("count")
}

/// A database deployed before migration 008 on a non-UTC server holds day partitions of the
/// server's days; 008 rebuilds them as UTC days without losing or doubling a row, also when a
/// first run was interrupted after its RENAME.
#[tokio::test]
async fn migration_008_moves_existing_rows_into_utc_day_partitions() {
    let server = PrivateClickHouse::start(TIMEZONE).await;
    let clickhouse = server.args(&common::unique("topk_tz_upgrade"));
    // As a database deployed before 008.
    topk::migrate::run_through(&clickhouse, 7)
        .await
        .expect("migrations before 008");
    let client = topk::olap::client(&clickhouse);
    let store = Store::new(client.clone(), "plays");
    let mut rng = common::workload::rng("timezone-upgrade");
    let now_ms = topk::clock::SystemClock.now_ms();
    let plays = plays_around_midnights(&mut rng, Window::at(now_ms), now_ms);
    common::plays::flush(&store, &plays, 0).await;
    let totals = common::workload::totals(&clickhouse).await;
    let mut expected: BTreeMap<(u64, u64), u64> = BTreeMap::new();
    for play in &plays {
        *expected.entry((play.user, play.song)).or_default() += 1;
    }
    assert_eq!(totals, expected, "every play written before the migration");
    // The user touches the flushes of that time wrote (they no longer do: 009 drops the table).
    client
        .query("INSERT INTO user_touches (user_id) SELECT DISTINCT user_id FROM plays_minute")
        .execute()
        .await
        .expect("user touches");
    let touches = user_touch_count(&client).await;
    assert!(touches > 0);
    // The premise: before 008 a day partition of this server holds hours of two UTC days.
    let straddling: u64 = client
        .query(
            "SELECT count() FROM (SELECT _part, min(minute) AS first, max(minute) AS last \
             FROM plays_minute GROUP BY _part) \
             WHERE toDate(first, 'UTC') != toDate(last, 'UTC')",
        )
        .fetch_one()
        .await
        .expect("straddling parts");
    assert!(straddling > 0, "old partitions are {TIMEZONE} days");

    let report = topk::migrate::run_through(&clickhouse, 8)
        .await
        .expect("migrate");
    assert_eq!(report.applied, vec![8]);
    assert_utc_day_partitions(&client, "plays_minute", "minute").await;
    assert_utc_day_partitions(&client, "user_touches", "touched_at").await;
    assert_eq!(common::workload::totals(&clickhouse).await, expected);
    assert_eq!(user_touch_count(&client).await, touches);

    // A run interrupted after the RENAME of plays_minute (the old table is still there), then
    // run again from the start: nothing lost, nothing counted twice, nothing left behind.
    let migration = topk::migrate::MIGRATIONS
        .iter()
        .find(|m| m.version == 8)
        .expect("migration 008");
    let statements = topk::migrate::statements(migration.sql);
    let renamed = statements
        .iter()
        .position(|s| s.starts_with("RENAME TABLE plays_minute"))
        .expect("rename");
    for statement in statements[..=renamed].iter().chain(&statements) {
        client.query(statement).execute().await.expect("statement");
    }
    assert_utc_day_partitions(&client, "plays_minute", "minute").await;
    assert_eq!(common::workload::totals(&clickhouse).await, expected);
    assert_eq!(user_touch_count(&client).await, touches);
    let tables: Vec<String> = client
        .query("SELECT name FROM system.tables WHERE database = currentDatabase() ORDER BY name")
        .fetch_all()
        .await
        .expect("tables");
    assert!(
        tables
            .iter()
            .all(|t| !t.ends_with("_utc") && !t.ends_with("_server_tz")),
        "no table of the rebuild is left: {tables:?}"
    );
}
