//! Refreshers as one Kafka consumer group (issue 17): `topk refresh` processes on one stack
//! (the dev broker, ClickHouse, Redis) share the users by touches partition while plays flow.
//! A new group catches every partition up and says so; with a stable group every changed user
//! is computed once per change, by one process; one refresher is `kill -9`'d between its writes
//! and its commit while another joins, and afterwards every user's answer in Redis equals the
//! query module's (`topk top --fresh`).

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::plays::{DAY, MINUTE, Play, flush};
use common::roles::{Role, Roles};
use rand::Rng;
use rand::rngs::StdRng;
use topk::cache::Redis;
use topk::clock::{Clock, SystemClock};
use topk::query::TopQuery;
use topk::window::{MAX_LIMIT, Window};
use topk_aggregator::store::Store;

const PARTITIONS: i32 = 4;
const USERS: u64 = 200;

/// What the test writes with: counts as a flush writes them, then the flush's touches.
struct Writer {
    store: Store,
    producer: rdkafka::producer::FutureProducer,
    touches_topic: String,
    next_offset: u64,
    plays: Vec<Play>,
}

impl Writer {
    /// A flush of plays for `users` (one to three each, in the last two days: nothing ages
    /// during the test), with its touches.
    async fn flush(&mut self, rng: &mut StdRng, users: &BTreeSet<u64>) {
        let now = SystemClock.now_ms();
        let plays: Vec<Play> = users
            .iter()
            .flat_map(|&user| {
                let n = rng.random_range(1..=3);
                (0..n)
                    .map(|_| Play {
                        user,
                        song: rng.random_range(1..=30),
                        ts: now - rng.random_range(60 * MINUTE..2 * DAY),
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        flush(&self.store, &plays, self.next_offset).await;
        self.next_offset += 1 << 20;
        self.plays.extend(plays);
        topk::touches::publish(&self.producer, &self.touches_topic, users)
            .await
            .expect("touches published");
    }
}

/// `count` distinct users drawn from 1..=USERS.
fn some_users(rng: &mut StdRng, count: usize) -> BTreeSet<u64> {
    let mut users = BTreeSet::new();
    while users.len() < count {
        users.insert(rng.random_range(1..=USERS));
    }
    users
}

/// Answers computed by a refresher process, all outcomes, from its `/metrics`.
async fn computed(port: u16) -> u64 {
    let (status, _, body) = common::api_poller::http_get(port, "/metrics")
        .await
        .expect("metrics answer");
    assert_eq!(status, 200);
    body.lines()
        .filter(|line| line.starts_with("topk_refresh_users_total{"))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

async fn computed_by(ports: &[u16]) -> u64 {
    let mut total = 0;
    for &port in ports {
        total += computed(port).await;
    }
    total
}

/// What the phases check against: the answers in Redis and the query module.
struct Check<'a> {
    redis: &'a Redis,
    prefix: &'a str,
    query: &'a TopQuery,
}

impl Check<'_> {
    /// Waits until every user's answer in Redis equals the query module's now (no answer for a
    /// user without plays); panics with the first difference after `limit`.
    async fn converged(&self, limit: Duration, phase: &str) {
        let (redis, prefix, query) = (self.redis, self.prefix, self.query);
        let users: Vec<u64> = (1..=USERS).collect();
        let started = std::time::Instant::now();
        loop {
            let window = Window::at(SystemClock.now_ms());
            let fresh = query
                .top_for_users(&users, window, MAX_LIMIT)
                .await
                .expect("fresh query");
            let mut difference = None;
            for &user in &users {
                let cached = redis
                    .read_top(prefix, user, MAX_LIMIT)
                    .await
                    .expect("read")
                    .map(|answer| answer.songs)
                    .unwrap_or_default();
                if cached != fresh[&user] {
                    difference = Some((user, cached, fresh[&user].clone()));
                    break;
                }
            }
            let Some((user, cached, want)) = difference else {
                return;
            };
            assert!(
                started.elapsed() < limit,
                "{phase}: user {user} has {cached:?} in Redis, the query module says {want:?}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// `rounds` flushes of 25 users each, one after the other once the previous one is in
    /// Redis: the refreshers on `ports` compute each touched user exactly once, by one process.
    async fn once_per_change(
        &self,
        writer: &mut Writer,
        rng: &mut StdRng,
        ports: &[u16],
        rounds: usize,
        phase: &str,
    ) {
        for round in 0..rounds {
            let before = computed_by(ports).await;
            let users = some_users(rng, 25);
            writer.flush(rng, &users).await;
            let phase = format!("{phase}, round {round}");
            self.converged(Duration::from_secs(30), &phase).await;
            // The answers are in Redis before the cycle's counters move: let the cycle end.
            tokio::time::sleep(Duration::from_millis(1_500)).await;
            assert_eq!(
                computed_by(ports).await - before,
                users.len() as u64,
                "{phase}: once per changed user, not once per process"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refreshers_share_the_users_and_survive_a_kill_and_a_join() {
    let (broker, topic) = common::dev_broker(PARTITIONS);
    let brokers = broker.bootstrap_servers();
    let clickhouse = common::migrated_database().await;
    let client = topk::olap::client(&clickhouse);
    let redis_args = common::redis_args();
    let redis = Redis::connect(&redis_args).expect("redis");
    let query = TopQuery::new(client.clone());
    let mut rng = common::workload::rng("refresher-group");
    let mut writer = Writer {
        store: Store::new(client.clone(), &topic),
        producer: topk::kafka::producer(&brokers).expect("producer"),
        touches_topic: topk::touches::topic(&topic),
        next_offset: 0,
        plays: Vec::new(),
    };
    // Plays before any refresher runs: only a catch-up can find them.
    let everyone: BTreeSet<u64> = (1..=USERS).collect();
    writer.flush(&mut rng, &everyone).await;

    let logs = tempfile::tempdir().expect("logs");
    let roles = Roles::new(logs.path().to_path_buf(), &[]);
    let group = common::unique("refresher");
    let refresher = |name: &'static str, port: u16| -> Role {
        roles.role(
            name,
            vec![
                "refresh".to_owned(),
                format!("--kafka-brokers={brokers}"),
                format!("--kafka-topic={topic}"),
                format!("--group={group}"),
                "--refresh-interval=1s".to_owned(),
                "--kafka-session-timeout=6s".to_owned(),
                // Most of a cycle's second is spent between its writes and its commit, where
                // the kill below lands.
                "--test-pause-before-commit=600ms".to_owned(),
                format!("--clickhouse-url={}", clickhouse.url),
                format!("--clickhouse-database={}", clickhouse.database),
                format!("--redis-url={}", redis_args.url),
                format!("--redis-prefix={}", redis_args.prefix),
                format!("--metrics-addr=127.0.0.1:{port}"),
            ],
        )
    };
    let ports: Vec<u16> = (0..4).map(|_| common::free_port()).collect();
    let mut members = vec![
        refresher("refresh-a", ports[0]),
        refresher("refresh-b", ports[1]),
        refresher("refresh-c", ports[2]),
    ];
    for member in &mut members {
        member.start();
    }

    let check = Check {
        redis: &redis,
        prefix: &redis_args.prefix,
        query: &query,
    };
    // A new group: every partition is caught up from ClickHouse, and the log says so.
    check.converged(Duration::from_secs(90), "caught up").await;
    let caught_up = common::count_log_lines(logs.path(), "touches lost", "\u{0}");
    assert!(
        caught_up >= PARTITIONS as usize,
        "each partition caught up at least once: {caught_up}"
    );

    // A stable group: each touched user is computed once, by the one process that owns it.
    tokio::time::sleep(Duration::from_secs(8)).await;
    check
        .once_per_change(&mut writer, &mut rng, &ports[..3], 3, "stable group")
        .await;

    // A kill between writes and commit, touches flowing, and a member joining.
    let users = some_users(&mut rng, 25);
    writer.flush(&mut rng, &users).await;
    common::roles::wait_for_line(
        || Some(members[1].current_log()),
        "refresh cycle done",
        Duration::from_secs(10),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(rng.random_range(1_000..1_600))).await;
    members[1].kill_9().await;
    let mut joined = refresher("refresh-d", ports[3]);
    joined.start();
    for _ in 0..3 {
        let users = some_users(&mut rng, 25);
        writer.flush(&mut rng, &users).await;
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    check
        .converged(Duration::from_secs(90), "after the kill and the join")
        .await;

    // Stable again, on the new members: once per changed user again.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let live = [ports[0], ports[2], ports[3]];
    check
        .once_per_change(&mut writer, &mut rng, &live, 2, "after the rebalance")
        .await;
    assert_eq!(
        *roles.exits().lock().unwrap(),
        Vec::<String>::new(),
        "no refresher exited on its own"
    );
    for member in members.iter_mut().chain([&mut joined]) {
        if member.child.is_some() {
            member.terminate().await;
        }
    }
    // And the query module the answers were compared with is exact: an oracle over the plays.
    let window = Window::at(SystemClock.now_ms());
    let expected = common::plays::oracle(&writer.plays, window, MAX_LIMIT);
    let users: Vec<u64> = (1..=USERS).collect();
    let fresh = query
        .top_for_users(&users, window, MAX_LIMIT)
        .await
        .expect("fresh query");
    for user in users {
        assert_eq!(
            fresh[&user],
            expected.get(&user).cloned().unwrap_or_default(),
            "user {user}"
        );
    }
    common::drop_database(&clickhouse).await;
}
