//! The refresher and the warm-up against real ClickHouse and Redis (and the stack's Redis
//! Cluster): the `replace_top` script's contract, atomicity and version guard; after a cycle,
//! Redis equals the exact answer as of `computed_at` for every user (an oracle ranking the raw
//! plays, and the query module as `topk top --fresh` computes it); answers age with an injected
//! clock until the keys are gone, the ageing index saying when; racing refreshers and warm-ups;
//! the cluster. The cycles here are the engine's, handed their partitions and touches; the
//! consumer group around it is tested in `tests/refresher_group.rs`.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use bb8_redis::redis::{self, AsyncCommands};
use common::plays::{DAY, MINUTE, Play, flush, oracle};
use rand::Rng;
use tokio_util::sync::CancellationToken;
use topk::cache::{Answer, Outcome, Target, replace};
use topk::cache::{Conn, Redis, fingerprint, meta_key, songs_key};
use topk::clock::{Clock, ManualClock};
use topk::config::{ClickHouseArgs, RedisArgs};
use topk::query::TopQuery;
use topk::window::{MAX_LIMIT, RankedSong, Window, rank, rfc3339_ms};
use topk_aggregator::store::Store;
use topk_refresher::{Refresh, RefreshSettings, Refresher};

/// Partitions of the touches topic the tests' refreshers own (all of them).
const PARTITIONS: u32 = 4;

fn owned() -> Vec<i32> {
    (0..PARTITIONS as i32).collect()
}

/// The touches a flush of `plays` publishes, per partition.
fn touched(plays: &[Play]) -> BTreeMap<i32, BTreeSet<u64>> {
    let mut touched: BTreeMap<i32, BTreeSet<u64>> = BTreeMap::new();
    for play in plays {
        touched
            .entry(topk::touches::partition_of(play.user, PARTITIONS))
            .or_default()
            .insert(play.user);
    }
    touched
}

/// No touches: a cycle of the window's movement alone.
fn untouched() -> BTreeMap<i32, BTreeSet<u64>> {
    BTreeMap::new()
}

fn settings() -> RefreshSettings {
    RefreshSettings {
        batch_size: 50,
        concurrency: 2,
        cache: topk::config::CachePolicyArgs {
            key_ttl: Duration::from_secs(8 * 24 * 3600),
            tombstone_ttl: Duration::from_millis(300),
        },
        catch_up_page: 1_000,
    }
}

fn random_plays(rng: &mut impl Rng, users: u64, n: usize, now: i64) -> Vec<Play> {
    (0..n)
        .map(|_| Play {
            user: rng.random_range(1..=users),
            song: rng.random_range(1..=60),
            // Nine days back (some already out of the window) to 4 minutes ahead.
            ts: now - rng.random_range(-4 * MINUTE..9 * DAY),
        })
        .collect()
}

async fn exists(conn: &mut Conn, prefix: &str, user: u64) -> u64 {
    redis::cmd("EXISTS")
        .arg(songs_key(prefix, user))
        .arg(meta_key(prefix, user))
        .query_async(conn)
        .await
        .expect("exists")
}

struct Env {
    clickhouse: ClickHouseArgs,
    redis_args: RedisArgs,
    redis: Redis,
    store: Store,
    query: TopQuery,
    /// The test's ClickHouse: one server, or the stack's cluster.
    client: topk::olap::Olap,
}

impl Env {
    /// Every user's answer in Redis equals the oracle's as of `computed_at_ms`, at limits 10 and
    /// 50, and equals what the query module (`topk top --fresh`) computes for that instant; users
    /// without plays have no answer.
    ///
    /// Returns the number of (user, limit) answers not recomputed by the latest cycle.
    async fn assert_exact(
        &self,
        plays: &[Play],
        users: u64,
        computed_at_ms: i64,
        phase: &str,
    ) -> usize {
        let (redis, prefix, query) = (&self.redis, self.redis_args.prefix.as_str(), &self.query);
        let window = Window::at(computed_at_ms);
        let expected = oracle(plays, window, MAX_LIMIT);
        let all: Vec<u64> = (1..=users).collect();
        let fresh = query
            .top_for_users(&all, window, MAX_LIMIT)
            .await
            .expect("fresh query");
        let mut stale = 0;
        for user in 1..=users {
            let want = expected.get(&user).cloned().unwrap_or_default();
            assert_eq!(
                fresh[&user], want,
                "{phase}: query module vs oracle, user {user}"
            );
            for limit in [10, MAX_LIMIT] {
                let cached = redis.read_top(prefix, user, limit).await.expect("read");
                if want.is_empty() {
                    assert_eq!(cached, None, "{phase}: user {user} has no plays, no answer");
                    continue;
                }
                let cached = cached.unwrap_or_else(|| panic!("{phase}: user {user} not cached"));
                let want_limited: Vec<RankedSong> = want.iter().take(limit).copied().collect();
                assert_eq!(
                    cached.songs, want_limited,
                    "{phase}: user {user} limit {limit}"
                );
                // Computed by this cycle or an earlier one (a user nothing changed for is not
                // recomputed), and exact at its own version too.
                let version = cached_version(redis, prefix, user).await;
                assert!(version <= computed_at_ms, "{phase}: user {user}'s version");
                let at_version = Window::at(version);
                assert_eq!(cached.computed_at, rfc3339_ms(version), "{phase}");
                assert_eq!(cached.window.start, at_version.start_rfc3339(), "{phase}");
                assert_eq!(cached.window.end, at_version.end_rfc3339(), "{phase}");
                let then = oracle(plays, at_version, limit)
                    .remove(&user)
                    .unwrap_or_default();
                assert_eq!(cached.songs, then, "{phase}: user {user} at its version");
                if version < computed_at_ms {
                    stale += 1;
                }
            }
        }
        stale
    }
}

/// The version (`computed_at_ms`) of `user`'s stored answer.
async fn cached_version(redis: &Redis, prefix: &str, user: u64) -> i64 {
    let mut conn = redis.get().await.expect("connection");
    topk::cache::read_cached_on(&mut conn, prefix, user, 1)
        .await
        .expect("read")
        .expect("cached")
        .computed_at_ms
}

impl Env {
    /// The refresh (warm-up pages) over this test's ClickHouse and Redis keys.
    fn refresh(&self, settings: &RefreshSettings) -> Refresh {
        Refresh::new(
            self.client.clone(),
            self.redis.clone(),
            &self.redis_args.prefix,
            PARTITIONS,
            settings,
        )
    }

    /// A refresher on `client` over this test's Redis keys, owning every partition.
    fn refresher(
        &self,
        client: impl Into<topk::olap::Olap>,
        settings: &RefreshSettings,
    ) -> Refresher {
        Refresher::new(
            client,
            self.redis.clone(),
            &self.redis_args.prefix,
            PARTITIONS,
            settings,
        )
    }
}

async fn env(redis_args: RedisArgs) -> Env {
    env_on(redis_args, common::migrated_database().await)
}

/// The same over `clickhouse` (a migrated database: on one server or on a cluster).
fn env_on(redis_args: RedisArgs, clickhouse: topk::config::ClickHouseArgs) -> Env {
    let client = topk::olap::Olap::open(&clickhouse);
    Env {
        store: Store::new(client.clone(), "plays"),
        query: TopQuery::new(client.clone()),
        redis: Redis::connect(&redis_args).expect("redis"),
        redis_args,
        clickhouse,
        client,
    }
}

fn target(prefix: &str, tombstone_ms: u64) -> Target {
    Target {
        prefix: prefix.to_owned(),
        ttl: Duration::from_secs(3600),
        tombstone_ttl: Duration::from_millis(tombstone_ms),
    }
}

/// The meta hash of `songs` stored at version `at` over `window`, field by field.
fn stored_meta(at: i64, window: Window, songs: &[RankedSong]) -> HashMap<String, String> {
    [
        ("computed_at_ms", at.to_string()),
        ("computed_at", rfc3339_ms(at)),
        ("window_start", window.start_rfc3339()),
        ("window_end", window.end_rfc3339()),
        ("fingerprint", fingerprint(songs)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

fn songs(list: &[(u64, u64)]) -> Vec<RankedSong> {
    rank(list.to_vec(), MAX_LIMIT)
}

#[tokio::test]
async fn replace_top_contract_and_guard() {
    let args = common::redis_args();
    let redis = Redis::connect(&args).expect("redis");
    let mut conn = redis.get().await.expect("connection");
    let prefix = args.prefix.as_str();
    let target = target(prefix, 60_000);
    let window = Window::at(common::workload::now_ms());
    let t0 = common::workload::now_ms();

    // A first answer: the two keys of the contract, with TTLs.
    let first = songs(&[(7, 31), (9, 12), (3, 12)]);
    let answer = Answer {
        user_id: 42,
        songs: &first,
    };
    assert_eq!(
        replace(&mut conn, &target, &answer, window, t0)
            .await
            .expect("replace"),
        Outcome::Written
    );
    let zset: Vec<(u64, u64)> = conn
        .zrange_withscores(songs_key(prefix, 42), 0, -1)
        .await
        .expect("zrange");
    assert_eq!(zset, vec![(3, 12), (9, 12), (7, 31)]);
    let meta: HashMap<String, String> = conn.hgetall(meta_key(prefix, 42)).await.expect("meta");
    assert_eq!(meta, stored_meta(t0, window, &first));
    for key in [songs_key(prefix, 42), meta_key(prefix, 42)] {
        let ttl: i64 = conn.pttl(&key).await.expect("pttl");
        assert!(ttl > 0 && ttl <= 3_600_000, "{key} has the TTL: {ttl}");
    }
    let read = redis
        .read_top(prefix, 42, 2)
        .await
        .expect("read")
        .expect("cached");
    assert_eq!(read.songs, first[..2].to_vec());

    // An older computation never overwrites a newer one.
    let older = songs(&[(1, 100)]);
    let stale = Answer {
        user_id: 42,
        songs: &older,
    };
    assert_eq!(
        replace(&mut conn, &target, &stale, window, t0 - 1)
            .await
            .expect("replace"),
        Outcome::Refused
    );
    assert_eq!(
        redis
            .read_top(prefix, 42, 50)
            .await
            .expect("read")
            .expect("cached")
            .songs,
        first
    );

    // The same version again is a retry: same content, nothing to rewrite.
    assert_eq!(
        replace(&mut conn, &target, &answer, window, t0)
            .await
            .expect("replace"),
        Outcome::Unchanged
    );

    // A newer computation of the same answer renews the version, the times and both TTLs and
    // leaves the songs as they are.
    let later = Window::at(t0 + 60_000);
    let _: i64 = conn
        .pexpire(songs_key(prefix, 42), 5_000)
        .await
        .expect("pexpire");
    assert_eq!(
        replace(&mut conn, &target, &answer, later, t0 + 60_000)
            .await
            .expect("replace"),
        Outcome::Unchanged
    );
    let meta: HashMap<String, String> = conn.hgetall(meta_key(prefix, 42)).await.expect("meta");
    assert_eq!(meta, stored_meta(t0 + 60_000, later, &first));
    let ttl: i64 = conn.pttl(songs_key(prefix, 42)).await.expect("pttl");
    assert!(ttl > 5_000, "the songs' TTL is renewed: {ttl}");
    let read = redis
        .read_top(prefix, 42, 50)
        .await
        .expect("read")
        .expect("cached");
    assert_eq!(read.songs, first);
    assert_eq!(read.computed_at, rfc3339_ms(t0 + 60_000));

    // Songs gone under a meta that remains (evicted by maxmemory): the same answer is written
    // in full again, not renewed over nothing.
    let _: i64 = conn.del(songs_key(prefix, 42)).await.expect("del");
    assert_eq!(
        replace(&mut conn, &target, &answer, later, t0 + 60_000)
            .await
            .expect("replace"),
        Outcome::Written
    );
    let zset: Vec<(u64, u64)> = conn
        .zrange_withscores(songs_key(prefix, 42), 0, -1)
        .await
        .expect("zrange");
    assert_eq!(zset, vec![(3, 12), (9, 12), (7, 31)]);
    let t0 = t0 + 60_000;

    // A newer one replaces the whole answer (songs not in it are gone).
    let newer = songs(&[(5, 2), (9, 13)]);
    let answer = Answer {
        user_id: 42,
        songs: &newer,
    };
    assert_eq!(
        replace(&mut conn, &target, &answer, window, t0 + 1)
            .await
            .expect("replace"),
        Outcome::Written
    );
    let read = redis
        .read_top(prefix, 42, 50)
        .await
        .expect("read")
        .expect("cached");
    assert_eq!(read.songs, newer);
    assert_eq!(read.computed_at, rfc3339_ms(t0 + 1));

    // An empty answer deletes the songs and leaves a tombstone with the version only.
    let empty = Answer {
        user_id: 42,
        songs: &[],
    };
    assert_eq!(
        replace(&mut conn, &target, &empty, window, t0 + 2)
            .await
            .expect("replace"),
        Outcome::Emptied
    );
    let zcard: u64 = conn.zcard(songs_key(prefix, 42)).await.expect("zcard");
    assert_eq!(zcard, 0);
    let meta: HashMap<String, String> = conn.hgetall(meta_key(prefix, 42)).await.expect("meta");
    assert_eq!(
        meta,
        HashMap::from([("computed_at_ms".to_owned(), (t0 + 2).to_string())])
    );
    let ttl: i64 = conn.pttl(meta_key(prefix, 42)).await.expect("pttl");
    assert!(ttl > 0 && ttl <= 60_000, "tombstone TTL {ttl}");
    assert_eq!(
        redis.read_top(prefix, 42, 10).await.expect("read"),
        None,
        "a tombstone is a miss"
    );
    // …which an older answer still in flight cannot undo.
    assert_eq!(
        replace(&mut conn, &target, &answer, window, t0 + 1)
            .await
            .expect("replace"),
        Outcome::Refused
    );
    assert_eq!(redis.read_top(prefix, 42, 10).await.expect("read"), None);

    // Without a tombstone TTL shorter than the test, the keys vanish: "no keys" in the end.
    let short = self::target(prefix, 50);
    assert_eq!(
        replace(&mut conn, &short, &empty, window, t0 + 3)
            .await
            .expect("replace"),
        Outcome::Emptied
    );
    wait_for_no_keys(&mut conn, prefix, 42).await;

    // Bad arguments are refused by the script itself.
    let bad_version = [
        "not-a-number",
        "1000",
        "1000",
        "a",
        "b",
        "c",
        "300000",
        "0",
        "",
    ];
    assert_refused_untouched(&mut conn, prefix, &[1], &bad_version).await;
    let bad_max_ahead = ["1000", "1000", "1000", "a", "b", "c", "-1", "0", ""];
    assert_refused_untouched(&mut conn, prefix, &[1], &bad_max_ahead).await;
}

/// On one server a script call stores many users' answers (`replace_all` sends them in calls of
/// several dozen): each user is guarded on its own (one refused, one emptied, the rest written in
/// the same calls), and a malformed call is refused before it writes anything.
#[tokio::test]
async fn replace_top_stores_many_users_per_call() {
    let args = common::redis_args();
    let redis = Redis::connect(&args).expect("redis");
    let mut conn = redis.get().await.expect("connection");
    let prefix = args.prefix.as_str();
    let target = target(prefix, 60_000);
    let window = Window::at(common::workload::now_ms());
    let t0 = common::workload::now_ms();

    // User 1005 already has a newer answer; user 1010's new answer is empty.
    let newer = songs(&[(77, 1)]);
    let stored = Answer {
        user_id: 1005,
        songs: &newer,
    };
    assert_eq!(
        replace(&mut conn, &target, &stored, window, t0 + 1)
            .await
            .expect("replace"),
        Outcome::Written
    );
    let lists: Vec<(u64, Vec<RankedSong>)> = (1000..1100u64)
        .map(|user| {
            let list: Vec<(u64, u64)> = if user == 1010 {
                Vec::new()
            } else {
                (1..=user % 7 + 1).map(|song| (song, user + song)).collect()
            };
            (user, songs(&list))
        })
        .collect();
    let answers: Vec<Answer<'_>> = lists
        .iter()
        .map(|(user_id, songs)| Answer {
            user_id: *user_id,
            songs,
        })
        .collect();
    let outcomes = topk::cache::replace_all(&conn, &target, &answers, window, t0)
        .await
        .expect("replace_all");
    let count = |wanted: Outcome| outcomes.iter().filter(|&&o| o == wanted).count();
    assert_eq!(
        (
            count(Outcome::Written),
            count(Outcome::Emptied),
            count(Outcome::Refused)
        ),
        (98, 1, 1)
    );
    for (user, list) in &lists {
        let read = redis.read_top(prefix, *user, 50).await.expect("read");
        match *user {
            1005 => assert_eq!(read.expect("cached").songs, newer, "the newer answer stays"),
            1010 => assert_eq!(read, None, "a tombstone"),
            _ => {
                let read = read.expect("cached");
                assert_eq!(&read.songs, list, "user {user}");
                assert_eq!(read.computed_at, rfc3339_ms(t0));
            }
        }
    }

    // Counts that do not match the arguments: refused, nothing written for any user.
    let t0 = t0.to_string();
    let short_counts = [
        t0.as_str(),
        "1000",
        "1000",
        "a",
        "b",
        "c",
        "300000",
        "1",
        "x",
        "5",
        "9",
        "2",
        "y",
        "5",
    ];
    assert_refused_untouched(&mut conn, prefix, &[1, 2], &short_counts).await;
}

/// Calls the script directly on `users`' keys with `argv`: it must refuse the call as bad
/// arguments and leave none of their keys behind.
async fn assert_refused_untouched(conn: &mut Conn, prefix: &str, users: &[u64], argv: &[&str]) {
    let mut call = redis::cmd("EVAL");
    call.arg(include_str!("../lua/replace_top.lua"))
        .arg(2 * users.len());
    for &user in users {
        call.arg(songs_key(prefix, user))
            .arg(meta_key(prefix, user));
    }
    let error = call
        .arg(argv)
        .query_async::<Vec<i64>>(conn)
        .await
        .expect_err("refused");
    assert!(error.to_string().contains("bad arguments"), "{error}");
    for &user in users {
        assert_eq!(exists(conn, prefix, user).await, 0, "user {user}");
    }
}

/// Polls until the tombstone has expired (Redis time, not a timed assertion: it only bounds
/// how long the test waits for something that must happen).
async fn wait_for_no_keys(conn: &mut Conn, prefix: &str, user: u64) {
    for _ in 0..200 {
        if exists(conn, prefix, user).await == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the keys of user {user} never expired");
}

/// Readers in transactions (as `read_top` reads) never see the songs of one version with the
/// meta of another, while writers replace the answer as fast as they can.
#[tokio::test]
async fn replace_top_is_atomic_for_readers() {
    let args = common::redis_args();
    let redis = Redis::connect(&args).expect("redis");
    let prefix = args.prefix.clone();
    let target = target(&prefix, 60_000);
    let window = Window::at(common::workload::now_ms());
    let stop = CancellationToken::new();

    // Version v stores songs 1..=20 with plays v (even v) or an empty answer (v % 10 == 9):
    // a reader can tell which version each part belongs to.
    let writer = {
        let redis = redis.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut conn = redis.get().await.expect("connection");
            let mut version = 1_000i64;
            while !stop.is_cancelled() {
                version += 1;
                let list: Vec<(u64, u64)> = if version % 10 == 9 {
                    Vec::new()
                } else {
                    (1..=20).map(|song| (song, version as u64)).collect()
                };
                let ranked = songs(&list);
                let answer = Answer {
                    user_id: 7,
                    songs: &ranked,
                };
                replace(&mut conn, &target, &answer, window, version)
                    .await
                    .expect("replace");
            }
            version
        })
    };
    let mut conn = redis.get().await.expect("connection");
    let mut seen = 0;
    for _ in 0..2_000 {
        let (meta, zset): (HashMap<String, String>, Vec<(u64, u64)>) = redis::pipe()
            .atomic()
            .hgetall(meta_key(&prefix, 7))
            .zrange_withscores(songs_key(&prefix, 7), 0, -1)
            .query_async(&mut conn)
            .await
            .expect("read");
        let Some(version) = meta.get("computed_at_ms") else {
            assert!(zset.is_empty(), "songs without meta: {zset:?}");
            continue;
        };
        let version: u64 = version.parse().expect("number");
        if version % 10 == 9 {
            assert!(zset.is_empty(), "a tombstone with songs: {zset:?}");
            assert_eq!(meta.len(), 1, "a tombstone holds only the version");
        } else {
            seen += 1;
            assert_eq!(zset.len(), 20, "version {version}: a partial set {zset:?}");
            assert!(
                zset.iter().all(|&(_, plays)| plays == version),
                "version {version}: {zset:?}"
            );
            assert_eq!(meta.len(), 5, "version {version}: {meta:?}");
        }
    }
    stop.cancel();
    let last = writer.await.expect("writer");
    assert!(
        last > 1_001 && seen > 0,
        "the writer and the readers both ran"
    );
}

/// After each cycle, every user's answer in Redis is exact as of the cycle's `computed_at`:
/// first fill, new flushes for some users, time moving by minutes and by a day.
#[tokio::test]
async fn refresh_cycles_keep_redis_exact() {
    let env = env(common::redis_args()).await;
    refresh_oracle(&env, 60 * common::scale() as u64, 3_000 * common::scale()).await;
    common::drop_database(&env.clickhouse).await;
}

/// The same cycles with the counts on the stack's 2-shard ClickHouse cluster: every answer in
/// Redis exact, as on one server.
#[tokio::test]
async fn refresh_cycles_keep_redis_exact_over_a_clickhouse_cluster() {
    let env = env_on(
        common::redis_args(),
        common::migrated_cluster_database().await,
    );
    refresh_oracle(&env, 60 * common::scale() as u64, 3_000 * common::scale()).await;
    let total = common::workload::grand_total(&env.clickhouse)
        .await
        .expect("total");
    common::assert_users_on_their_shards(&env.clickhouse, total).await;
    common::drop_database(&env.clickhouse).await;
}

/// The same cycles against the stack's 3-master Redis Cluster (`scripts/stack up redis-cluster`).
#[tokio::test]
async fn refresh_cycles_keep_a_redis_cluster_exact() {
    let env = env(common::redis_cluster_args()).await;
    let mut conn = env.redis.get().await.unwrap_or_else(|error| {
        panic!(
            "Redis Cluster at {} (scripts/stack up redis-cluster): {error}",
            env.redis_args.url
        )
    });
    // The users' keys spread over every master.
    let masters: Vec<u16> = (1..=30u64)
        .map(|user| {
            let tag = user.to_string();
            slot_owner(crc16(tag.as_bytes()) % 16_384)
        })
        .collect();
    assert!(masters.contains(&0) && masters.contains(&2));
    let pong: String = redis::cmd("PING")
        .query_async(&mut conn)
        .await
        .expect("ping");
    assert_eq!(pong, "PONG");
    refresh_oracle(&env, 30 * common::scale() as u64, 1_500 * common::scale()).await;
    common::drop_database(&env.clickhouse).await;
}

/// Which of three equal slot ranges (as `redis-cli --cluster create` assigns them) holds a slot.
fn slot_owner(slot: u16) -> u16 {
    match slot {
        0..=5460 => 0,
        5461..=10922 => 1,
        _ => 2,
    }
}

/// CRC16/XMODEM, Redis Cluster's key hash.
fn crc16(bytes: &[u8]) -> u16 {
    let mut crc = 0u16;
    for &byte in bytes {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

async fn refresh_oracle(env: &Env, users: u64, n: usize) {
    let mut rng = common::workload::rng("refresher");
    let now = common::workload::now_ms();
    let clock = ManualClock::at(now);
    let mut plays = random_plays(&mut rng, users, n, now);
    flush(&env.store, &plays, 0).await;
    let mut refresher = env.refresher(env.client.clone(), &settings());

    let report = refresher
        .cycle(&clock, &owned(), &touched(&plays))
        .await
        .expect("cycle");
    assert_eq!(report.settled, owned());
    assert_eq!(report.refreshed.failed, Vec::<u64>::new());
    assert_eq!(report.refreshed.refused, 0);
    env.assert_exact(&plays, users, clock.now_ms(), "first cycle")
        .await;

    // New plays for a few users (one flush), a minute later.
    clock.advance_ms(MINUTE);
    let more: Vec<Play> = (0..200)
        .map(|_| Play {
            user: rng.random_range(1..=users / 4),
            song: rng.random_range(1..=60),
            ts: clock.now_ms() - rng.random_range(0..3 * DAY),
        })
        .collect();
    flush(&env.store, &more, 1_000_000).await;
    plays.extend(&more);
    let report = refresher
        .cycle(&clock, &owned(), &touched(&more))
        .await
        .expect("cycle");
    assert!(
        report.users as u64 <= users,
        "only changed users: {}",
        report.users
    );
    env.assert_exact(&plays, users, clock.now_ms(), "after a flush")
        .await;

    // Time moves: minutes, then a day and some hours; plays leave the window and future
    // plays enter it, without any flush: the ageing index alone brings the users back.
    let mut due = 0;
    for step in [7 * MINUTE, DAY + 5 * 60 * MINUTE] {
        clock.advance_ms(step);
        let report = refresher
            .cycle(&clock, &owned(), &untouched())
            .await
            .expect("cycle");
        assert!(report.refreshed.failed.is_empty());
        assert_eq!(report.due, report.users, "nothing touched: {report:?}");
        due += report.due;
        env.assert_exact(&plays, users, clock.now_ms(), "time moved")
            .await;
    }
    assert!(due > 0, "a day of plays left the window");
}

/// One engine cycle over every partition.
async fn cycle(
    refresher: &mut Refresher,
    clock: &ManualClock,
    touches: BTreeMap<i32, BTreeSet<u64>>,
) -> topk_refresher::CycleReport {
    refresher
        .cycle(clock, &owned(), &touches)
        .await
        .expect("cycle")
}

/// A user who stops listening: songs drop out of the cached answer exactly when their last
/// play leaves the window, future plays come in when their minute is reached, and in the end
/// the user has no keys. Time comes from an injected clock.
#[tokio::test]
async fn answers_age_with_the_window_until_no_keys_are_left() {
    let env = env(common::redis_args()).await;
    let prefix = env.redis_args.prefix.as_str();
    let now = common::workload::now_ms();
    let clock = ManualClock::at(now);
    let window = Window::at(now);
    let start = i64::from(window.start) * 1000;
    let end = i64::from(window.end) * 1000;
    let plays = vec![
        // Song 1: three plays in the window's first minute, then gone.
        Play {
            user: 7,
            song: 1,
            ts: start,
        },
        Play {
            user: 7,
            song: 1,
            ts: start + 10,
        },
        Play {
            user: 7,
            song: 1,
            ts: start + 59_999,
        },
        // Song 2: two plays, leaving two hours later.
        Play {
            user: 7,
            song: 2,
            ts: start + 2 * 60 * MINUTE,
        },
        Play {
            user: 7,
            song: 2,
            ts: start + 2 * 60 * MINUTE + 5,
        },
        // Song 3: one play a day later.
        Play {
            user: 7,
            song: 3,
            ts: start + DAY,
        },
        // User 8: one play three minutes ahead (accepted by the aggregator, counts later).
        Play {
            user: 8,
            song: 4,
            ts: end + 2 * MINUTE,
        },
    ];
    flush(&env.store, &plays, 0).await;
    let mut refresher = env.refresher(env.client.clone(), &settings());
    let ageing = refresher.refresh().ageing.clone();
    let mut conn = env.redis.get().await.expect("connection");

    let top = |user| {
        let redis = env.redis.clone();
        async move {
            redis
                .read_top(prefix, user, 10)
                .await
                .expect("read")
                .map(|answer| {
                    answer
                        .songs
                        .iter()
                        .map(|s| (s.song_id, s.plays))
                        .collect::<Vec<_>>()
                })
        }
    };
    let scheduled = |user| {
        let (ageing, mut conn) = (&ageing, conn.clone());
        async move { ageing.scheduled(&mut conn, user).await.expect("schedule") }
    };
    let report = cycle(&mut refresher, &clock, touched(&plays)).await;
    assert_eq!((report.users, report.due), (2, 0));
    assert_eq!(top(7).await, Some(vec![(1, 3), (2, 2), (3, 1)]));
    assert_eq!(top(8).await, None, "a future play does not count yet");
    // User 7's oldest minute leaves as the next minute starts; user 8's play enters when its
    // minute is reached.
    let end_secs = window.end;
    assert_eq!(scheduled(7).await, Some((end_secs, now)));
    assert_eq!(scheduled(8).await, Some((end_secs + 120, now)));

    // Within the minute nothing is due.
    clock.advance_ms(MINUTE - 1 - (now - start).rem_euclid(MINUTE));
    assert_eq!(cycle(&mut refresher, &clock, untouched()).await.users, 0);

    // One minute later, the first minute has left the window: user 7 alone is recomputed.
    clock.set(now + MINUTE);
    let report = cycle(&mut refresher, &clock, untouched()).await;
    assert_eq!((report.users, report.due), (1, 1));
    assert_eq!(top(7).await, Some(vec![(2, 2), (3, 1)]));
    assert_eq!(top(8).await, None, "still one minute ahead");
    assert_eq!(
        scheduled(7).await,
        Some((window.start + 2 * 3_600 + 7 * 86_400, now + MINUTE)),
        "next: song 2's minute leaves"
    );

    // Two more minutes: user 8's play has entered the window, and only user 8 changed.
    clock.advance_ms(2 * MINUTE);
    assert_eq!(cycle(&mut refresher, &clock, untouched()).await.users, 1);
    assert_eq!(top(8).await, Some(vec![(4, 1)]));

    // Just before song 2's minute leaves, it is still there; just after, it is gone.
    clock.set(now + 2 * 60 * MINUTE);
    assert_eq!(cycle(&mut refresher, &clock, untouched()).await.users, 0);
    assert_eq!(top(7).await, Some(vec![(2, 2), (3, 1)]));
    clock.set(now + 2 * 60 * MINUTE + MINUTE);
    assert_eq!(cycle(&mut refresher, &clock, untouched()).await.users, 1);
    assert_eq!(top(7).await, Some(vec![(3, 1)]));

    // A day later, nothing is left: no answer at once, no keys once the tombstone expires, and
    // the user leaves the ageing index.
    clock.set(now + DAY + MINUTE);
    let report = cycle(&mut refresher, &clock, untouched()).await;
    assert_eq!(report.refreshed.emptied, 1, "{report:?}");
    assert_eq!(top(7).await, None);
    assert_eq!(scheduled(7).await, None);
    wait_for_no_keys(&mut conn, prefix, 7).await;
    assert_eq!(
        top(8).await,
        Some(vec![(4, 1)]),
        "user 8 still listened to song 4"
    );
    common::drop_database(&env.clickhouse).await;
}

/// Warm-up fills every user; two refreshers and an older warm-up racing each other leave the
/// newest answers; the guard counts the refusals.
#[tokio::test]
async fn warmup_and_racing_refreshers_never_regress() {
    let env = env(common::redis_args()).await;
    let users = 40 * common::scale() as u64;
    let mut rng = common::workload::rng("warmup");
    let now = common::workload::now_ms();
    let clock = ManualClock::at(now);
    let mut plays = random_plays(&mut rng, users, 2_000 * common::scale(), now);
    flush(&env.store, &plays, 0).await;

    // Tombstones outlive the test, so that the late warm-up below meets every version.
    let settings = RefreshSettings {
        cache: topk::config::CachePolicyArgs {
            tombstone_ttl: Duration::from_secs(600),
            ..settings().cache
        },
        ..settings()
    };
    let refresh = env.refresh(&settings);
    let report = topk_refresher::warmup(&refresh, &env.client, &clock, 7, CancellationToken::new())
        .await
        .expect("warm-up");
    let in_window = oracle(&plays, Window::at(now), 1).len() as u64;
    assert!(report.complete);
    assert_eq!(
        (report.users, report.written, report.failed),
        (in_window, in_window, 0)
    );
    env.assert_exact(&plays, users, now, "after warm-up").await;

    // Re-running is idempotent.
    let again = topk_refresher::warmup(
        &refresh,
        &env.client,
        &clock,
        1_000,
        CancellationToken::new(),
    )
    .await
    .expect("warm-up");
    // Same clock, same plays: every answer is the stored one, renewed, not rewritten.
    assert_eq!(
        (again.users, again.written, again.unchanged),
        (in_window, 0, in_window)
    );

    // New plays, then two refreshers at once, a minute later.
    let more = random_plays(&mut rng, users, 500, now);
    flush(&env.store, &more, 1_000_000).await;
    plays.extend(&more);
    clock.advance_ms(MINUTE);
    let new = || env.refresher(env.client.clone(), &settings);
    let (mut a, mut b) = (new(), new());
    let (touches, all) = (touched(&more), owned());
    let (ra, rb) = tokio::join!(
        a.cycle(&clock, &all, &touches),
        b.cycle(&clock, &all, &touches)
    );
    let (ra, rb) = (ra.expect("cycle a"), rb.expect("cycle b"));
    assert!(ra.refreshed.failed.is_empty() && rb.refreshed.failed.is_empty());
    env.assert_exact(&plays, users, clock.now_ms(), "two refreshers")
        .await;

    // A warm-up that read ClickHouse earlier (older clock) cannot overwrite anything.
    let old_clock = ManualClock::at(now);
    let late = topk_refresher::warmup(
        &refresh,
        &env.client,
        &old_clock,
        1_000,
        CancellationToken::new(),
    )
    .await
    .expect("warm-up");
    assert_eq!(late.written, 0, "{late:?}");
    assert_eq!(late.refused, late.users);
    env.assert_exact(&plays, users, clock.now_ms(), "after a late warm-up")
        .await;

    // An interrupted warm-up reports itself incomplete and leaves only whole answers.
    let cancelled = CancellationToken::new();
    cancelled.cancel();
    let stopped = topk_refresher::warmup(&refresh, &env.client, &clock, 5, cancelled)
        .await
        .expect("warm-up");
    assert!(!stopped.complete);
    common::drop_database(&env.clickhouse).await;
}

/// A warm-up of many users runs for tens of minutes; a refresher goes on meanwhile. Each page
/// computes at its own instant, so no page stores an answer older than what the refresher
/// already decided: here a user the refresher emptied (its tombstone then expired, so the guard
/// has no version left to refuse with) is not brought back by a later page, and every stored
/// answer is the query module's at its stored `computed_at`, with the version of the newest
/// computation (refresher or page).
#[tokio::test]
async fn a_long_warmup_never_stores_answers_older_than_the_refresher() {
    let env = env(common::redis_args()).await;
    let prefix = env.redis_args.prefix.as_str();
    let t = common::workload::now_ms();
    let clock = ManualClock::at(t);
    // The minute of `t`, so that plays sit at known distances from the window's start.
    let minute = t.div_euclid(MINUTE) * MINUTE;
    let window_days = 7 * DAY;
    let mut plays = vec![
        // User 1: well inside the window for the whole test.
        Play {
            user: 1,
            song: 11,
            ts: t - DAY,
        },
        Play {
            user: 1,
            song: 11,
            ts: t - DAY + 1,
        },
        Play {
            user: 1,
            song: 12,
            ts: t - 2 * DAY,
        },
        // User 2: one play in the window's third minute: it leaves the window 2 minutes after
        // `t`, and user 2 has no plays left.
        Play {
            user: 2,
            song: 21,
            ts: minute - window_days + 3 * MINUTE,
        },
        // User 3: inside; gains a play below.
        Play {
            user: 3,
            song: 31,
            ts: t - DAY,
        },
        // User 4: one play leaving the window about 14 minutes after `t`, one staying.
        Play {
            user: 4,
            song: 41,
            ts: minute - window_days + 15 * MINUTE,
        },
        Play {
            user: 4,
            song: 41,
            ts: minute - window_days + 15 * MINUTE + 1,
        },
        Play {
            user: 4,
            song: 42,
            ts: t - DAY,
        },
    ];
    flush(&env.store, &plays, 0).await;
    let settings = settings();
    let refresh = env.refresh(&settings);
    let mut refresher = env.refresher(env.client.clone(), &settings);
    let mut conn = env.redis.get().await.expect("connection");
    let mut warmup = topk_refresher::Warmup::new(&refresh, &env.client, &clock, 1);

    // Each user's answer in Redis: the query module's (and the oracle's) at the given version,
    // stored with it; `None`: no answer at all.
    let expect = |plays: Vec<Play>, want: [Option<i64>; 4], phase: &'static str| {
        let env = &env;
        async move {
            for (user, version) in (1..=4).zip(want) {
                let cached = env
                    .redis
                    .read_top(prefix, user, MAX_LIMIT)
                    .await
                    .expect("read");
                let Some(version) = version else {
                    assert_eq!(cached, None, "{phase}: user {user} has no answer");
                    continue;
                };
                let window = Window::at(version);
                let exact = env
                    .query
                    .top_for_users(&[user], window, MAX_LIMIT)
                    .await
                    .expect("query")
                    .remove(&user)
                    .unwrap_or_default();
                let oracle = oracle(&plays, window, MAX_LIMIT)
                    .remove(&user)
                    .unwrap_or_default();
                assert_eq!(
                    exact, oracle,
                    "{phase}: query module vs oracle, user {user}"
                );
                let cached = cached.unwrap_or_else(|| panic!("{phase}: user {user} not cached"));
                assert_eq!(
                    (cached.computed_at, cached.window.start, cached.window.end),
                    (
                        rfc3339_ms(version),
                        window.start_rfc3339(),
                        window.end_rfc3339()
                    ),
                    "{phase}: user {user}'s version"
                );
                assert_eq!(cached.songs, exact, "{phase}: user {user}'s answer");
            }
        }
    };
    let page = |users: &[u64], at: i64, written: u64, unchanged: u64| topk_refresher::WarmupPage {
        users: users.to_vec(),
        window: Window::at(at),
        computed_at_ms: at,
        refreshed: topk_refresher::Refreshed {
            written,
            unchanged,
            ..Default::default()
        },
    };

    // Page 1 at `t`: user 1.
    let first = warmup.page().await.expect("page").expect("a page");
    expect(plays.clone(), [Some(t), None, None, None], "page 1").await;
    assert_eq!(first, page(&[1], t, 1, 0));

    // Ten minutes later user 3 played again, and the refresher's first cycle recomputes
    // everyone: user 2's play has left the window, its answer is emptied, and the tombstone
    // expires before the warm-up reaches user 2.
    clock.set(t + 10 * MINUTE);
    let more = [Play {
        user: 3,
        song: 32,
        ts: t + 5 * MINUTE,
    }];
    flush(&env.store, &more, 100).await;
    plays.extend(more);
    // The refresher's first cycle reads every touch so far (a new group reads the topic from
    // its start).
    let cycle = refresher
        .cycle(&clock, &owned(), &touched(&plays))
        .await
        .expect("cycle");
    assert_eq!(
        (
            cycle.users,
            cycle.refreshed.written,
            cycle.refreshed.unchanged,
            cycle.refreshed.emptied
        ),
        (4, 2, 1, 1),
        "{cycle:?}"
    );
    wait_for_no_keys(&mut conn, prefix, 2).await;
    let t10 = t + 10 * MINUTE;
    let at_t10 = oracle(&plays, Window::at(t10), MAX_LIMIT);
    assert_eq!(
        (at_t10.get(&2), &at_t10[&3], &at_t10[&4]),
        (
            None,
            &songs(&[(31, 1), (32, 1)]),
            &songs(&[(41, 2), (42, 1)])
        ),
        "the scenario's answers at t + 10 min"
    );
    expect(
        plays.clone(),
        [Some(t10), None, Some(t10), Some(t10)],
        "refreshed",
    )
    .await;

    // Page 2, ten minutes on: user 2 has no plays in this page's window, so the page is user 3,
    // newer than the refresher's answer. (Computed against the window at the warm-up's start,
    // user 2 would be brought back with its old play, at a version nothing refuses any more.)
    clock.set(t + 20 * MINUTE);
    let second = warmup.page().await.expect("page").expect("a page");
    expect(
        plays.clone(),
        [Some(t10), None, Some(t + 20 * MINUTE), Some(t10)],
        "page 2",
    )
    .await;
    // Its plays are those the refresher stored: the answer is renewed at the newer version.
    assert_eq!(second, page(&[3], t + 20 * MINUTE, 0, 1));

    // Page 3: user 4, whose first song has left the window since the refresher stored it.
    clock.set(t + 30 * MINUTE);
    let third = warmup.page().await.expect("page").expect("a page");
    let t30 = Window::at(t + 30 * MINUTE);
    assert_eq!(
        oracle(&plays, t30, MAX_LIMIT)[&4],
        songs(&[(42, 1)]),
        "user 4's song 41 left"
    );
    expect(
        plays.clone(),
        [
            Some(t10),
            None,
            Some(t + 20 * MINUTE),
            Some(t + 30 * MINUTE),
        ],
        "page 3",
    )
    .await;
    assert_eq!(third, page(&[4], t + 30 * MINUTE, 1, 0));

    clock.set(t + 40 * MINUTE);
    assert_eq!(warmup.page().await.expect("page"), None);
    assert_eq!(
        warmup.report(),
        &topk_refresher::WarmupReport {
            users: 3,
            written: 2,
            unchanged: 1,
            complete: true,
            ..Default::default()
        }
    );
    assert_eq!(warmup.page().await.expect("page"), None, "done stays done");
    common::drop_database(&env.clickhouse).await;
}

/// A ClickHouse that does not answer: the cycle fails without moving its cursors and the
/// refresher goes on; nothing in Redis changes. Then the users come back exact.
#[tokio::test]
async fn a_failing_clickhouse_delays_answers_but_loses_none() {
    let env = env(common::redis_args()).await;
    let prefix = env.redis_args.prefix.as_str();
    let now = common::workload::now_ms();
    let clock = ManualClock::at(now);
    let plays = vec![Play {
        user: 5,
        song: 9,
        ts: now - MINUTE,
    }];
    flush(&env.store, &plays, 0).await;

    let broken = topk::olap::client(&common::clickhouse_args("no_such_database_for_topk"));
    let mut refresher = env.refresher(broken, &settings());
    let touches = touched(&plays);
    let report = refresher
        .cycle(&clock, &owned(), &touches)
        .await
        .expect("the cycle runs");
    assert_eq!(report.refreshed.failed, vec![5]);
    let partition = topk::touches::partition_of(5, PARTITIONS);
    let others: Vec<i32> = owned().into_iter().filter(|&p| p != partition).collect();
    assert_eq!(report.settled, others, "user 5's touches are not committed");
    assert_eq!(refresher.pending(), 1);
    assert_eq!(env.redis.read_top(prefix, 5, 10).await.expect("read"), None);
    // The pending user is retried without its touch (which the group would still hold).
    let report = refresher
        .cycle(&clock, &owned(), &untouched())
        .await
        .expect("the cycle runs");
    assert_eq!(report.refreshed.failed, vec![5]);
    // A catch-up page of a partition whose ClickHouse fails fails the cycle: nothing settles.
    refresher.catch_up(partition);
    assert!(
        refresher
            .cycle(&clock, &owned(), &untouched())
            .await
            .is_err()
    );
    assert!(refresher.catching_up(partition));
    // Revoked: forgotten, the next owner re-reads the touch.
    refresher.forget(&[partition]);
    assert_eq!(refresher.pending(), 0);
    assert!(!refresher.catching_up(partition));

    let mut refresher = env.refresher(env.client.clone(), &settings());
    let report = refresher
        .cycle(&clock, &owned(), &touches)
        .await
        .expect("cycle");
    assert_eq!(report.settled, owned());
    env.assert_exact(&plays, 5, now, "after recovery").await;
    common::drop_database(&env.clickhouse).await;
}

/// A Redis that lost its scripts (restart, SCRIPT FLUSH) between the cycle's load and a chunk:
/// the chunk's pipeline meets NOSCRIPT, loads the script again and resends. On a private
/// server, because flushing scripts is not something to do to a shared one.
#[tokio::test]
async fn a_chunk_survives_a_script_flush() {
    let server = common::private_redis::PrivateRedis::start();
    let args = server.args();
    let redis = Redis::connect(&args).expect("redis");
    let mut conn = redis.get().await.expect("the private redis-server answers");
    let target = target(&args.prefix, 60_000);
    let window = Window::at(common::workload::now_ms());
    let ranked = songs(&[(1, 2)]);
    let answers: Vec<Answer<'_>> = (1..=3)
        .map(|user_id| Answer {
            user_id,
            songs: &ranked,
        })
        .collect();
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut conn)
        .await
        .expect("flush");
    let outcomes = topk::cache::replace_all(&conn, &target, &answers, window, 5)
        .await
        .expect("written after reloading the script");
    assert_eq!(outcomes, vec![Outcome::Written; 3]);
    for user in 1..=3 {
        let read = redis.read_top(&args.prefix, user, 10).await.expect("read");
        assert_eq!(read.map(|a| a.songs), Some(ranked.clone()));
    }
    drop(server);
}
