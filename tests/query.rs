//! The exact rolling-window top-K against ClickHouse, compared with an oracle that ranks the
//! raw plays independently: plays over ten days, window edges, heavy users with more than 50
//! songs a day on flat distributions, late plays after a rollup, rollup re-runs, time moving
//! across days, and retention.

mod common;

use std::collections::BTreeMap;

use common::plays::{DAY, MINUTE, Play, oracle};
use rand::Rng;
use topk::clock::{Clock, ManualClock};
use topk::query::{Computed, TopQuery};
use topk::window::{RankedSong, Window};
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
    exact_top_k_across_rollups_late_plays_and_days_on(common::migrated_database().await).await;
}

/// The same on the stack's 2-shard ClickHouse cluster: each user's rows, rollups and
/// retention on its shard, the clean-day logs on the meta server.
#[tokio::test]
async fn exact_top_k_across_rollups_late_plays_and_days_on_the_cluster() {
    let clickhouse = common::migrated_cluster_database().await;
    exact_top_k_across_rollups_late_plays_and_days_on(clickhouse.clone()).await;
}

async fn exact_top_k_across_rollups_late_plays_and_days_on(
    clickhouse: topk::config::ClickHouseArgs,
) {
    // A single server or a cluster: the same test through the same layout every role uses.
    let client = topk::olap::Olap::open(&clickhouse);
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

    let in_window = common::plays::users_in_window(client.clone(), later).await;
    let expected: Vec<u64> = oracle(&plays, later, 1).into_keys().collect();
    assert_eq!(in_window, expected);
    if clickhouse.cluster.is_some() {
        let total = common::workload::grand_total(&clickhouse)
            .await
            .expect("total");
        common::assert_users_on_their_shards(&clickhouse, total).await;
    }
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

/// When `plays` say `user`'s answer `songs` in `window` next changes without new plays, by the
/// rules of `Computed::changes_at`: the oldest minute with plays of a song of the answer leaves
/// the window (a play on a day of `clean_days` dated from the day's start, since the rollup
/// keeps no minutes), or the first minute with plays ahead of the window, of any song, enters
/// it. Also which of them it is.
fn expected_changes_at(
    plays: &[Play],
    user: u64,
    songs: &[RankedSong],
    window: Window,
    clean_days: &[u32],
) -> (Option<u32>, Cause) {
    const WINDOW_SECS: u32 = 10_080 * 60;
    let day_secs = (DAY / 1000) as u32;
    let minutes = plays
        .iter()
        .filter(|p| p.user == user)
        .map(|p| (p.song, (p.ts.div_euclid(MINUTE) * 60) as u32));
    let oldest_top = minutes
        .clone()
        .filter(|&(song, minute)| {
            window.contains(minute) && songs.iter().any(|s| s.song_id == song)
        })
        .map(|(_, minute)| {
            let day = minute - minute % day_secs;
            if clean_days.contains(&day) {
                (day, false)
            } else {
                (minute, true)
            }
        })
        .min();
    let first_future = minutes
        .filter(|&(_, minute)| minute >= window.end)
        .map(|(_, minute)| minute)
        .min();
    let leaves =
        oldest_top.map(|(minute, from_minute_row)| (minute + WINDOW_SECS, from_minute_row));
    let cause = |from_minute_row| {
        if from_minute_row {
            Cause::MinuteLeaves
        } else {
            Cause::CleanDayLeaves
        }
    };
    match (leaves, first_future) {
        (Some((t, from_minute_row)), Some(f)) if t < f => (Some(t), cause(from_minute_row)),
        (Some((t, from_minute_row)), None) => (Some(t), cause(from_minute_row)),
        (_, Some(f)) => (Some(f), Cause::Enters),
        (None, None) => (None, Cause::Nothing),
    }
}

/// What decides when an answer next changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Cause {
    /// The oldest minute row of a song of the answer leaves first: the answer changes then.
    MinuteLeaves,
    /// The start of the clean day holding the oldest play leaves first: an early recomputation.
    CleanDayLeaves,
    /// A play ahead of the window enters first (or at the same instant).
    Enters,
    /// No play in the window or ahead of it.
    Nothing,
}

/// The window `Window::at` gives at `secs` seconds since the epoch.
fn window_at(secs: u32) -> Window {
    Window::at(i64::from(secs) * 1000)
}

async fn check_answers(
    query: &TopQuery,
    plays: &[Play],
    users: &[u64],
    window: Window,
    clean_days: &[u32],
    phase: &str,
) -> BTreeMap<Cause, usize> {
    let mut causes = BTreeMap::new();
    for limit in [10, 50] {
        let expected = oracle(plays, window, limit);
        let answers = query
            .answers_for_users(users, window, limit)
            .await
            .expect("answers");
        assert_eq!(answers.len(), users.len(), "{phase}: every user answered");
        let tops = query
            .top_for_users(users, window, limit)
            .await
            .expect("top");
        for &user in users {
            let songs = expected.get(&user).cloned().unwrap_or_default();
            let (changes_at, cause) = expected_changes_at(plays, user, &songs, window, clean_days);
            *causes.entry(cause).or_default() += 1;
            assert_eq!(
                answers[&user],
                Computed {
                    songs: songs.clone(),
                    changes_at
                },
                "{phase}: user {user}, limit {limit}"
            );
            assert_eq!(
                tops[&user], songs,
                "{phase}: top of user {user}, limit {limit}"
            );
            let Some(changes_at) = changes_at else {
                continue;
            };
            assert!(
                changes_at >= window.end,
                "{phase}: user {user} changes after now"
            );
            let before = oracle(plays, window_at(changes_at - 1), limit);
            assert_eq!(
                before.get(&user).cloned().unwrap_or_default(),
                songs,
                "{phase}: user {user}, limit {limit}: nothing changes before {changes_at}"
            );
            if cause == Cause::MinuteLeaves {
                let after = oracle(plays, window_at(changes_at), limit);
                assert_ne!(
                    after.get(&user).cloned().unwrap_or_default(),
                    songs,
                    "{phase}: user {user}, limit {limit}: the oldest minute leaves at {changes_at}"
                );
            }
        }
    }
    causes
}

/// Issue 17 (ageing without a scan): every answer says when it next changes without new plays,
/// over minute rows, clean rollups and dirty days, with plays on the window's old edge, heavy
/// users, songs outside the top, and plays stored up to five minutes ahead.
#[tokio::test]
async fn answers_say_when_they_next_change() {
    let clickhouse = common::migrated_database().await;
    let client = topk::olap::client(&clickhouse);
    let store = Store::new(client.clone(), "plays");
    let query = TopQuery::new(client.clone());
    let mut rng = common::workload::rng("query-changes-at");

    let now = topk::clock::SystemClock.now_ms();
    let clock = ManualClock::at(now);
    let window = Window::at(now);
    let (start_ms, end_ms) = (i64::from(window.start) * 1000, i64::from(window.end) * 1000);
    // 1, 2: heavy; 3: a top song on the old edge; 4: a song outside the top on the old edge;
    // 5..=36: random; 37: only plays ahead; 38: only plays before the window; 39: only plays on
    // full days; 40: none.
    let users: Vec<u64> = (1..=40).collect();
    let mut plays = Vec::new();
    for _ in 0..6_000 {
        plays.push(Play {
            user: rng.random_range(5..=36),
            song: rng.random_range(1..=30),
            ts: now - rng.random_range(0..10 * DAY),
        });
    }
    for user in [1u64, 2] {
        for day in 0..9 {
            for song in 1..=80u64 {
                for k in 0..1 + (song + day as u64 + user) % 3 {
                    plays.push(Play {
                        user,
                        song,
                        ts: now
                            - day * DAY
                            - (k as i64 + 1) * 7 * MINUTE
                            - rng.random_range(0..MINUTE),
                    });
                }
            }
        }
    }
    // User 3's top song has a play in the window's first minute and one just before it.
    for i in 0..20 {
        plays.push(Play {
            user: 3,
            song: 901,
            ts: now - i * 3 * 60 * MINUTE,
        });
    }
    plays.push(Play {
        user: 3,
        song: 901,
        ts: start_ms,
    });
    plays.push(Play {
        user: 3,
        song: 901,
        ts: start_ms - 1,
    });
    plays.push(Play {
        user: 3,
        song: 902,
        ts: end_ms - 1,
    });
    // User 4: twelve songs of five recent plays, and one play of song 950 in the window's first
    // minute: in the top 50, so it leaves first, but not in the top 10, where it cannot matter.
    for song in 1..=12 {
        for k in 0..5 {
            plays.push(Play {
                user: 4,
                song,
                ts: now - DAY - (song as i64 * 10 + k) * MINUTE,
            });
        }
    }
    plays.push(Play {
        user: 4,
        song: 950,
        ts: start_ms + rng.random_range(0..MINUTE),
    });
    plays.push(Play {
        user: 4,
        song: 951,
        ts: start_ms - 1,
    });
    // Plays ahead of the window (the aggregator accepts up to five minutes), new songs too, for
    // some users: a play ahead enters before any minute leaves, and would hide the rest.
    let ahead: Vec<u64> = [1, 4].into_iter().chain(5..=14).collect();
    for _ in 0..30 {
        plays.push(Play {
            user: ahead[rng.random_range(0..ahead.len())],
            song: rng.random_range(1..=40),
            ts: rng.random_range(end_ms..=now + 5 * MINUTE),
        });
    }
    plays.push(Play {
        user: 37,
        song: 1,
        ts: now + 5 * MINUTE,
    });
    plays.push(Play {
        user: 38,
        song: 1,
        ts: start_ms - rng.random_range(1..2 * DAY),
    });
    // User 39 plays only on full days that stay clean: its oldest play is a rollup's.
    let full: Vec<u32> = window.full_days().collect();
    for i in 0..60 {
        let day = i64::from(full[[0, 2, 4][i % 3]]) * 1000;
        plays.push(Play {
            user: 39,
            song: 1 + i as u64 % 15,
            ts: day + rng.random_range(0..DAY),
        });
    }
    write(&store, &plays, 0, true).await;
    let causes = check_answers(&query, &plays, &users, window, &[], "minute rows only").await;
    // Every kind of instant is exercised, in every phase that can have it.
    let minute_rows_only = [Cause::MinuteLeaves, Cause::Enters, Cause::Nothing];
    assert_eq!(causes.keys().copied().collect::<Vec<_>>(), minute_rows_only);

    // Touches and rollup starts are server seconds: a touch in the second a rollup starts keeps
    // the day dirty, and this phase wants every full day clean.
    tokio::time::sleep(std::time::Duration::from_millis(1_100)).await;
    let rolled = topk_maintenance::rollup(&client, &clock, false)
        .await
        .expect("rollup");
    assert_eq!(rolled.days.iter().map(|d| d.0).collect::<Vec<_>>(), full);
    let causes = check_answers(
        &query,
        &plays,
        &users,
        window,
        &full,
        "every full day clean",
    )
    .await;
    let every_cause = [
        Cause::MinuteLeaves,
        Cause::CleanDayLeaves,
        Cause::Enters,
        Cause::Nothing,
    ];
    assert_eq!(causes.keys().copied().collect::<Vec<_>>(), every_cause);

    // Late plays make two rolled-up days dirty again: their minutes count from the minute rows.
    let dirty = [full[1], full[3]];
    let late: Vec<Play> = (0..400)
        .map(|i| Play {
            user: 1 + i % 10,
            song: 1 + i % 13,
            ts: i64::from(dirty[(i % 2) as usize]) * 1000 + rng.random_range(0..DAY),
        })
        .collect();
    write(&store, &late, 1_000_000, false).await;
    plays.extend(&late);
    let clean: Vec<u32> = full
        .iter()
        .copied()
        .filter(|d| !dirty.contains(d))
        .collect();
    assert_eq!(
        query
            .clean_days(window)
            .await
            .expect("clean days")
            .iter()
            .map(|c| c.day)
            .collect::<Vec<_>>(),
        clean
    );
    let causes = check_answers(&query, &plays, &users, window, &clean, "two dirty days").await;
    assert_eq!(causes.keys().copied().collect::<Vec<_>>(), every_cause);
    let fresh = TopQuery::new(client.clone());
    check_answers(&fresh, &plays, &users, window, &clean, "a new query module").await;
    common::drop_database(&clickhouse).await;
}
