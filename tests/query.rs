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

    let in_window = query.users_in_window(later).await.expect("users");
    let expected: Vec<u64> = oracle(&plays, later, 1).into_keys().collect();
    assert_eq!(in_window, expected);
    common::drop_database(&clickhouse).await;
}
