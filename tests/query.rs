//! The exact rolling-window top-K against ClickHouse, compared with an oracle that ranks the
//! raw plays independently: plays over ten days, window edges, heavy users with more than 50
//! songs a day on flat distributions, late plays after a rollup, rollup re-runs, time moving
//! across days, and retention.

mod common;

use common::plays::{DAY, MINUTE, Play, oracle};
use rand::Rng;
use topk::clock::{Clock, ManualClock};
use topk::query::TopQuery;
use topk::window::Window;
use topk_aggregator::store::Store;

/// Writes plays the way the aggregator does: batches of counts with their ids, then touches.
/// `replay` writes every batch a second time, as a crashed flush would.
async fn write(store: &Store, plays: &[Play], first_offset: u64, replay: bool) {
    for (i, chunk) in plays.chunks(700).enumerate() {
        let batch = common::plays::batch(chunk, first_offset + (i as u64) * 1_000);
        for _ in 0..if replay { 2 } else { 1 } {
            store.write_counts(&[&batch]).await.expect("counts");
            store.write_touches(&[&batch]).await.expect("touches");
        }
    }
}

async fn check(query: &TopQuery, plays: &[Play], users: &[u64], window: Window, phase: &str) {
    for limit in [10, 50] {
        let expected = oracle(plays, window, limit);
        let batch = query
            .top_for_users(users, window, limit)
            .await
            .expect("batch query");
        for &user in users {
            let want = expected.get(&user).cloned().unwrap_or_default();
            assert_eq!(
                batch[&user], want,
                "{phase}: batch answer of user {user}, limit {limit}"
            );
            let single = query
                .top_for_user(user, window, limit)
                .await
                .expect("single query");
            assert_eq!(
                single, want,
                "{phase}: single answer of user {user}, limit {limit}"
            );
        }
    }
}

#[tokio::test]
async fn exact_top_k_across_rollups_late_plays_and_days() {
    let clickhouse = common::migrated_database().await;
    let client = topk::olap::client(&clickhouse);
    let store = Store::new(client.clone(), "plays");
    let query = TopQuery::new(client.clone());
    let mut rng = common::workload::rng("query");

    let now = topk::clock::SystemClock.now_ms();
    let clock = ManualClock::at(now);
    let window = Window::at(now);
    let start_ms = i64::from(window.start) * 1000;
    let end_ms = i64::from(window.end) * 1000;

    let users: Vec<u64> = (1..=40).collect();
    let mut plays = Vec::new();
    // Spread over ten days before now.
    for _ in 0..6_000 {
        plays.push(Play {
            user: rng.random_range(3..=40),
            song: rng.random_range(1..=30),
            ts: now - rng.random_range(0..10 * DAY),
        });
    }
    // Heavy users with flat distributions: 80 songs a day, nearly equal counts, so any
    // per-day top-50 truncation would change the weekly answer.
    for user in [1u64, 2] {
        for day in 0..9 {
            for song in 1..=80u64 {
                let n = 1 + (song + day as u64 + user) % 3;
                for k in 0..n {
                    plays.push(Play {
                        user,
                        song,
                        ts: now - day * DAY - (k as i64 + 1) * 7 * MINUTE,
                    });
                }
            }
        }
    }
    // The window's edges: first minute in, last minute in, one minute before, one after.
    plays.push(Play {
        user: 3,
        song: 901,
        ts: start_ms,
    });
    plays.push(Play {
        user: 3,
        song: 902,
        ts: end_ms - 1,
    });
    plays.push(Play {
        user: 3,
        song: 903,
        ts: start_ms - 1,
    });
    plays.push(Play {
        user: 3,
        song: 904,
        ts: end_ms,
    });
    write(&store, &plays, 0, true).await;

    check(&query, &plays, &users, window, "minute rows only").await;
    let answer3 = query.top_for_user(3, window, 50).await.expect("query");
    assert!(answer3.iter().any(|s| s.song_id == 901) && answer3.iter().any(|s| s.song_id == 902));
    assert!(!answer3.iter().any(|s| s.song_id == 903 || s.song_id == 904));

    // Touches and rollup starts are server times to the second; a day touched in the very
    // second its rollup starts stays dirty (safe, but this test wants every day clean).
    tokio::time::sleep(std::time::Duration::from_millis(1_100)).await;
    let first = topk_maintenance::rollup(&client, &clock, false)
        .await
        .expect("rollup");
    assert_eq!(
        first.days.len(),
        window.full_days().count(),
        "every full day rolled up"
    );
    assert_eq!(
        query.clean_days(window).await.expect("clean").len(),
        first.days.len()
    );
    check(&query, &plays, &users, window, "after rollup").await;

    // Late plays for a day that was rolled up: exact at once, before any new rollup.
    let late_day = now - 3 * DAY;
    let late: Vec<Play> = (0..300)
        .map(|i| Play {
            user: 1 + i % 5,
            song: 1 + i % 7,
            ts: late_day - (i as i64) * MINUTE,
        })
        .collect();
    write(&store, &late, 1_000_000, false).await;
    plays.extend(&late);
    check(&query, &plays, &users, window, "late plays after rollup").await;

    let second = topk_maintenance::rollup(&client, &clock, false)
        .await
        .expect("rollup");
    assert!(
        !second.days.is_empty() && second.days.len() <= 2,
        "only the touched days: {:?}",
        second.days
    );
    check(
        &query,
        &plays,
        &users,
        window,
        "after re-rollup of the touched day",
    )
    .await;

    topk_maintenance::rollup(&client, &clock, true)
        .await
        .expect("rollup --all");
    check(&query, &plays, &users, window, "after a full re-run").await;

    // Time moves on: a day and seven hours later, songs have left the window.
    clock.advance_ms(DAY + 7 * 60 * MINUTE);
    let later = Window::at(clock.now_ms());
    check(&query, &plays, &users, later, "a day later, before rollup").await;
    topk_maintenance::rollup(&client, &clock, false)
        .await
        .expect("rollup");
    check(&query, &plays, &users, later, "a day later, after rollup").await;

    // Retention: partitions below the cut-off go; the answer stays exact.
    let report = topk_maintenance::prune(&client, &clock)
        .await
        .expect("prune");
    assert!(
        report
            .dropped
            .iter()
            .any(|(table, _)| table == "plays_minute"),
        "old minute partitions dropped: {report:?}"
    );
    assert!(
        report
            .dropped
            .iter()
            .all(|(_, p)| *p < report.cutoff_yyyymmdd)
    );
    check(&query, &plays, &users, later, "after prune").await;
    assert!(
        topk_maintenance::prune(&client, &clock)
            .await
            .expect("prune")
            .dropped
            .is_empty(),
        "prune is idempotent"
    );

    let in_window = common::plays::users_in_window(&client, later).await;
    let expected: Vec<u64> = oracle(&plays, later, 1).into_keys().collect();
    assert_eq!(in_window, expected);
    common::drop_database(&clickhouse).await;
}

/// `YYYYMMDD` of a UTC day start in seconds: the `plays_minute` partition holding that day.
fn partition_of(day: u32) -> u32 {
    let date = time::OffsetDateTime::from_unix_timestamp(i64::from(day))
        .expect("day")
        .date();
    date.year() as u32 * 10_000 + u32::from(u8::from(date.month())) * 100 + u32::from(date.day())
}

/// Plays on every minute kind of `window`: spread over its days, on each full day's first and
/// last minute, and on both sides of both edges.
fn plays_across(rng: &mut impl Rng, window: Window, users: u64) -> Vec<Play> {
    let (start_ms, end_ms) = (i64::from(window.start) * 1000, i64::from(window.end) * 1000);
    let mut plays: Vec<Play> = (0..3_000)
        .map(|_| Play {
            user: rng.random_range(1..=users),
            song: rng.random_range(1..=25),
            ts: rng.random_range(start_ms - DAY..end_ms + 5 * MINUTE),
        })
        .collect();
    for day in window.full_days() {
        let day_ms = i64::from(day) * 1000;
        for (i, ts) in [day_ms, day_ms + DAY - 1].into_iter().enumerate() {
            plays.push(Play {
                user: 1 + i as u64,
                song: 100 + i as u64,
                ts,
            });
        }
    }
    for (song, ts) in [
        (901, start_ms),
        (902, end_ms - 1),
        (903, start_ms - 1),
        (904, end_ms),
    ] {
        plays.push(Play { user: 3, song, ts });
    }
    plays
}

/// Issue 16, item 5. At 23:59 UTC the window `[00:00 six days ago, 24:00 today)` is exactly seven
/// full days. With all seven rolled up and clean no minute of the window is left for
/// `plays_minute`, and the query used to be sent with an empty `AND ()`: every exact query
/// failed until midnight. Time is injected at 23:59:xx of yesterday (a day whose plays are all
/// in the past, so nothing in the test depends on the wall clock's minute).
#[tokio::test]
async fn the_last_minute_of_a_utc_day_is_answered_from_seven_clean_rollups() {
    let clickhouse = common::migrated_database().await;
    let client = topk::olap::client(&clickhouse);
    let store = Store::new(client.clone(), "plays");
    let query = TopQuery::new(client.clone());
    let mut rng = common::workload::rng("query-2359");

    let today = topk::olap::tables::day_of((topk::clock::SystemClock.now_ms() / 1000) as u32);
    let midnight_ms = i64::from(today) * 1000;
    let clock = ManualClock::at(midnight_ms - 60_000 + 17_345);
    let window = Window::at(clock.now_ms());
    assert_eq!(window.end, today, "the window ends at midnight");
    assert_eq!(window.full_days().count(), 7, "seven full days at 23:59");
    assert_eq!(window.full_days().next(), Some(window.start));

    let users: Vec<u64> = (1..=12).collect();
    let plays = plays_across(&mut rng, window, 12);
    common::plays::flush(&store, &plays, 0).await;
    check(&query, &plays, &users, window, "23:59, minute rows only").await;

    // Touches and rollup starts are server seconds: a touch in the very second a rollup starts
    // leaves the day dirty, and this test wants all seven clean.
    tokio::time::sleep(std::time::Duration::from_millis(1_100)).await;
    let rolled = topk_maintenance::rollup(&client, &clock, false)
        .await
        .expect("rollup");
    assert_eq!(rolled.days.len(), 7, "every day of the window rolled up");
    let clean = query.clean_days(window).await.expect("clean days");
    assert_eq!(
        clean.iter().map(|c| c.day).collect::<Vec<_>>(),
        window.full_days().collect::<Vec<_>>(),
        "all seven days clean: no minute of the window is read from plays_minute"
    );
    // The first call finds the seven days clean beside a query that assumed none and re-runs
    // with all seven; the later calls assume them from the start. Both paths are exact.
    check(&query, &plays, &users, window, "23:59, seven clean days").await;
    let fresh = TopQuery::new(client.clone());
    check(&fresh, &plays, &users, window, "23:59, a new query module").await;

    // The last second of the day: the same window, still exact.
    clock.set(midnight_ms - 1);
    assert_eq!(Window::at(clock.now_ms()), window);
    check(&query, &plays, &users, window, "23:59:59").await;

    common::drop_database(&clickhouse).await;
}

/// Issue 16, item 7 (rollup side). Rows that vanish from a rolled-up day's minutes (a backfill
/// replacing the day, a later erasure) must vanish from its answers once the day is rolled up
/// again: ReplacingMergeTree never deletes a key, so the old rollup's row of a key that is no
/// longer in the minutes stayed visible through `FINAL` and was counted. A rolled-up day must
/// equal its minute rows, whatever left them.
#[tokio::test]
async fn a_rolled_up_day_forgets_keys_that_left_its_minutes() {
    let clickhouse = common::migrated_database().await;
    let client = topk::olap::client(&clickhouse);
    let store = Store::new(client.clone(), "plays");
    let query = TopQuery::new(client.clone());
    let mut rng = common::workload::rng("query-vanished");

    let now = topk::clock::SystemClock.now_ms();
    let clock = ManualClock::at(now);
    let window = Window::at(now);
    let users: Vec<u64> = (1..=12).collect();
    let mut plays = plays_across(&mut rng, window, 12);
    common::plays::flush(&store, &plays, 0).await;
    tokio::time::sleep(std::time::Duration::from_millis(1_100)).await;
    let rolled = topk_maintenance::rollup(&client, &clock, false)
        .await
        .expect("rollup");
    assert_eq!(rolled.days.len(), window.full_days().count());
    check(&query, &plays, &users, window, "rolled up").await;

    // The day's minutes are replaced, as `topk backfill` replaces them, by the same rows less
    // every play of user 4 and every play of song 7: those (user, song, day) keys vanish.
    let day = window.full_days().nth(2).expect("a full day");
    let end = day + 86_400;
    let gone = |p: &Play| {
        let minute = (p.ts.div_euclid(MINUTE) * 60) as u32;
        (day..end).contains(&minute) && (p.user == 4 || p.song == 7)
    };
    let removed = plays.iter().filter(|p| gone(p)).count();
    assert!(removed > 20, "the day held plays of user 4 and song 7");
    for sql in [
        "CREATE TABLE staging AS plays_minute".to_owned(),
        format!(
            "INSERT INTO staging SELECT * FROM plays_minute \
             WHERE minute >= toDateTime({day}) AND minute < toDateTime({end}) \
               AND user_id != 4 AND song_id != 7"
        ),
        format!(
            "ALTER TABLE plays_minute REPLACE PARTITION {} FROM staging",
            partition_of(day)
        ),
        format!(
            "INSERT INTO day_touches (day) VALUES ({})",
            topk::olap::tables::date_literal(day)
        ),
        "DROP TABLE staging".to_owned(),
    ] {
        client.query(&sql).execute().await.expect(&sql);
    }
    plays.retain(|p| !gone(p));
    check(&query, &plays, &users, window, "replaced day, dirty").await;

    tokio::time::sleep(std::time::Duration::from_millis(1_100)).await;
    let again = topk_maintenance::rollup(&client, &clock, false)
        .await
        .expect("rollup");
    assert_eq!(
        again.days.iter().map(|d| d.0).collect::<Vec<_>>(),
        [day],
        "only the replaced day"
    );
    let clean = query.clean_days(window).await.expect("clean days");
    assert!(clean.iter().any(|c| c.day == day), "the day is clean again");
    check(
        &query,
        &plays,
        &users,
        window,
        "replaced day, rolled up again",
    )
    .await;
    // Forcing every day again changes nothing.
    topk_maintenance::rollup(&client, &clock, true)
        .await
        .expect("rollup --all");
    check(&query, &plays, &users, window, "after a full re-run").await;
    common::drop_database(&clickhouse).await;
}

/// Retention is the one step that cannot be undone: a maintenance host whose clock runs a month
/// ahead must not drop days that are still inside the window by ClickHouse's clock.
#[tokio::test]
async fn prune_drops_nothing_on_a_host_clock_running_ahead() {
    let clickhouse = common::migrated_database().await;
    let client = topk::olap::client(&clickhouse);
    let store = Store::new(client.clone(), "plays");
    let now = common::workload::now_ms();
    let window = Window::at(now);
    let plays: Vec<Play> = (1..=3)
        .flat_map(|day| {
            (0..5).map(move |i| Play {
                user: 1,
                song: day as u64,
                ts: now - day * DAY - i * MINUTE,
            })
        })
        .collect();
    write(&store, &plays, 0, false).await;
    let query = TopQuery::new(client.clone());
    check(&query, &plays, &[1], window, "before prune").await;

    let ahead = ManualClock::at(now + 30 * DAY);
    let report = topk_maintenance::prune(&client, &ahead)
        .await
        .expect("prune");
    assert_eq!(report.dropped, Vec::<(String, u32)>::new(), "{report:?}");
    check(&query, &plays, &[1], Window::at(now), "after a prune ahead").await;
    common::drop_database(&clickhouse).await;
}
