//! The API (`topk serve`) against real Redis and ClickHouse: answers equal the oracle and the
//! query module on a miss (written back) and on the following hit; tombstones; every degradation
//! (Redis killed, Redis or ClickHouse hanging or unreachable, both down); bad input; JWT auth;
//! metrics; the OpenAPI document fuzzed by schemathesis; the widget rendered by headless
//! Chromium; graceful shutdown.

mod common;

use std::collections::BTreeMap;
use std::net::TcpListener as StdListener;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use common::plays::{DAY, MINUTE, Play, oracle};
use rand::Rng;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use topk::cache::{Answer, Outcome, Redis, Target, replace};
use topk::clock::ManualClock;
use topk::config::{ClickHouseArgs, RedisArgs};
use topk::query::TopQuery;
use topk::window::{DEFAULT_LIMIT, MAX_LIMIT, RankedSong, Window, rank, rfc3339_ms};
use topk_aggregator::store::Store;
use topk_api::auth::Auth;
use topk_api::{ApiSettings, AppState};
use tower::ServiceExt as _;

const SECRET: &[u8] = b"test-secret-of-the-api-32-bytes-long";

/// A fixed "now" (the test's start), so the window cannot move between an answer and its oracle.
fn fixed_now() -> i64 {
    common::workload::now_ms()
}

fn settings() -> ApiSettings {
    ApiSettings {
        request_timeout: Duration::from_secs(5),
        redis_timeout: Duration::from_millis(500),
        olap_timeout: Duration::from_secs(3),
        max_age: Duration::from_secs(3600),
        ..ApiSettings::default()
    }
}

fn state(
    redis: &RedisArgs,
    clickhouse: &ClickHouseArgs,
    now: i64,
    settings: ApiSettings,
    auth: Option<Auth>,
) -> AppState {
    AppState::new(
        Redis::connect(redis).expect("redis pool"),
        &redis.prefix,
        topk::olap::Olap::open(clickhouse),
        std::sync::Arc::new(ManualClock::at(now)),
        settings,
        auth,
    )
}

/// One request through the router (no socket): status, headers, body as JSON (or text).
async fn get(
    state: &AppState,
    uri: &str,
    token: Option<&str>,
) -> (StatusCode, axum::http::HeaderMap, Value) {
    let mut request = Request::get(uri);
    if let Some(token) = token {
        request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let response = topk_api::router(state.clone())
        .oneshot(request.body(Body::empty()).expect("request"))
        .await
        .expect("infallible");
    let (parts, body) = response.into_parts();
    let bytes = axum::body::to_bytes(body, usize::MAX).await.expect("body");
    let value = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    (parts.status, parts.headers, value)
}

/// A new database holding `random_plays(users, now)` (flushed as the aggregator does), the
/// fixed `now`, its window and the plays.
async fn seeded(users: u64) -> (ClickHouseArgs, i64, Window, Vec<Play>) {
    let clickhouse = common::migrated_database().await;
    let now = fixed_now();
    let plays = random_plays(users, now);
    let store = Store::new(topk::olap::client(&clickhouse), "plays");
    common::plays::flush(&store, &plays, 0).await;
    (clickhouse, now, Window::at(now), plays)
}

/// Users 1..=`users` with random plays over nine days (some outside the window); user 1 has
/// more than 50 songs, so limits matter.
fn random_plays(users: u64, now: i64) -> Vec<Play> {
    let mut rng = rand::rng();
    let mut plays: Vec<Play> = (0..3_000)
        .map(|_| Play {
            user: rng.random_range(1..=users),
            song: rng.random_range(1..=80),
            ts: now - rng.random_range(0..9 * DAY),
        })
        .collect();
    plays.extend((1..=60).map(|song| Play {
        user: 1,
        song,
        ts: now - MINUTE,
    }));
    plays
}

/// The songs' JSON, written out field by field (not through the type's own `Serialize`).
fn songs_json(songs: &[RankedSong]) -> Value {
    songs
        .iter()
        .map(|s| {
            json!({"rank": s.rank, "song_id": s.song_id, "song_id_str": s.song_id.to_string(), "plays": s.plays})
        })
        .collect()
}

/// The API's JSON for an answer.
fn answer_json(
    user: u64,
    window: Window,
    computed_at_ms: i64,
    source: &str,
    stale: bool,
    songs: &[RankedSong],
) -> Value {
    json!({
        "user_id": user,
        "user_id_str": user.to_string(),
        "window": {"start": window.start_rfc3339(), "end": window.end_rfc3339()},
        "computed_at": rfc3339_ms(computed_at_ms),
        "source": source,
        "stale": stale,
        "songs": songs_json(songs),
    })
}

fn error_reason(body: &Value) -> &str {
    body["reason"].as_str().unwrap_or_default()
}

fn token(claims: Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET),
    )
    .expect("token")
}

fn exp_in(secs: i64) -> i64 {
    fixed_now() / 1000 + secs
}

/// A listener that accepts connections and never answers: a dependency that hangs.
fn hanging_listener() -> (StdListener, u16) {
    let listener = StdListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    (listener, port)
}

/// A ClickHouse that accepts connections and never answers, and how many connections reached
/// it (each computation or check that got through is one).
fn counting_hanging_clickhouse() -> (
    ClickHouseArgs,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let (listener, port) = hanging_listener();
    let accepted = std::sync::Arc::new(AtomicUsize::new(0));
    let counter = std::sync::Arc::clone(&accepted);
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming().flatten() {
            counter.fetch_add(1, Ordering::SeqCst);
            held.push(stream);
        }
    });
    (clickhouse_at(&format!("http://127.0.0.1:{port}")), accepted)
}

/// ClickHouse settings for a server at `url` (one that is down or hangs).
fn clickhouse_at(url: &str) -> ClickHouseArgs {
    ClickHouseArgs {
        url: url.to_owned(),
        ..common::clickhouse_args("topk")
    }
}

/// A miss is computed from ClickHouse (exactly the oracle and the query module), written back,
/// and the next request is a hit with the same answer and version; any limit up to 50 is then
/// served from the cache; a user without plays gets `[]` and then the tombstone's `[]`.
#[tokio::test]
async fn miss_then_hit_equals_the_oracle() {
    let (clickhouse, now, window, plays) = seeded(8).await;
    let redis = common::redis_args();
    let expected = oracle(&plays, window, MAX_LIMIT);
    let query = TopQuery::new(topk::olap::client(&clickhouse));
    let app = state(&redis, &clickhouse, now, settings(), None);

    for user in 1..=8u64 {
        let want = expected.get(&user).cloned().unwrap_or_default();
        let fresh = query
            .top_for_user(user, window, MAX_LIMIT)
            .await
            .expect("query");
        assert_eq!(fresh, want, "query module vs oracle, user {user}");
        let uri = format!("/v1/users/{user}/top-songs");
        let (status, _, miss) = get(&app, &uri, None).await;
        assert_eq!(status, StatusCode::OK, "{miss}");
        let top10: Vec<RankedSong> = want.iter().take(10).copied().collect();
        assert_eq!(miss, answer_json(user, window, now, "olap", false, &top10));
        let (status, _, hit) = get(&app, &uri, None).await;
        assert_eq!(status, StatusCode::OK);
        let mut want_hit = miss.clone();
        want_hit["source"] = json!("cache");
        assert_eq!(
            hit, want_hit,
            "user {user}: the hit is the written-back miss"
        );
        for limit in [1, 10, 50] {
            let (status, _, hit) = get(&app, &format!("{uri}?limit={limit}"), None).await;
            assert_eq!(status, StatusCode::OK);
            assert_eq!(hit["source"], "cache");
            let limited: Vec<RankedSong> = want.iter().take(limit).copied().collect();
            assert_eq!(
                hit["songs"],
                songs_json(&limited),
                "user {user} limit {limit}"
            );
        }
    }
    assert_eq!(
        expected[&1].len(),
        MAX_LIMIT,
        "user 1 has more than 50 songs"
    );

    // No plays: `[]` from ClickHouse, written back as a tombstone, which is a hit with `[]`.
    let (status, _, miss) = get(&app, "/v1/users/999/top-songs", None).await;
    assert_eq!(
        (status, &miss["source"], &miss["songs"]),
        (StatusCode::OK, &json!("olap"), &json!([]))
    );
    let (status, _, hit) = get(&app, "/v1/users/999/top-songs", None).await;
    assert_eq!(
        (status, &hit["source"], &hit["songs"]),
        (StatusCode::OK, &json!("cache"), &json!([]))
    );
    assert_eq!(hit["window"], miss["window"]);

    // The metrics saw it all (each test is its own process under nextest).
    let (status, _, metrics) = get(&app, "/metrics", None).await;
    assert_eq!(status, StatusCode::OK);
    let metrics = metrics.as_str().expect("text");
    // Per user: one miss, then 4 hits; plus user 999's miss and hit.
    assert!(
        metrics.contains("topk_api_cache_total{result=\"miss\"} 9"),
        "{metrics}"
    );
    assert!(
        metrics.contains("topk_api_cache_total{result=\"hit\"} 33"),
        "{metrics}"
    );
    assert!(
        metrics.contains("topk_api_fallback_total{reason=\"cache_miss\"} 9"),
        "{metrics}"
    );
    assert!(
        metrics.contains("topk_api_write_back_total{outcome=\"written\"} 8"),
        "{metrics}"
    );
    assert!(
        metrics.contains("topk_api_write_back_total{outcome=\"emptied\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            "topk_api_request_seconds_count{route=\"/v1/users/{user_id}/top-songs\",source=\"cache\",status=\"200\"} 33"
        ),
        "{metrics}"
    );
    common::drop_database(&clickhouse).await;
}

/// The same traffic on one server and on the 2-shard cluster: every user's answer, on the miss
/// (computed by ClickHouse) and on the hit that follows, is the oracle's on both, byte for byte
/// the same JSON; each user's rows sit on their own shard only.
#[tokio::test]
async fn the_cluster_answers_what_one_server_answers() {
    const USERS: u64 = 40;
    let now = fixed_now();
    let window = Window::at(now);
    let plays = random_plays(USERS, now);
    let expected = oracle(&plays, window, MAX_LIMIT);
    let server = common::migrated_database().await;
    let cluster = common::migrated_cluster_database().await;
    for clickhouse in [&server, &cluster] {
        let store = Store::new(topk::olap::Olap::open(clickhouse), "plays");
        common::plays::flush(&store, &plays, 0).await;
    }
    common::assert_users_on_their_shards(&cluster, plays.len() as u64).await;
    let redis = common::redis_args();
    let on_server = state(&redis, &server, now, settings(), None);
    let on_cluster = state(&common::redis_args(), &cluster, now, settings(), None);
    for user in (1..=USERS).chain([999]) {
        let want = expected.get(&user).cloned().unwrap_or_default();
        let top10: Vec<RankedSong> = want.iter().take(DEFAULT_LIMIT).copied().collect();
        let uri = format!("/v1/users/{user}/top-songs");
        for source in ["olap", "cache"] {
            let (status, _, from_server) = get(&on_server, &uri, None).await;
            let (cluster_status, _, from_cluster) = get(&on_cluster, &uri, None).await;
            assert_eq!((status, cluster_status), (StatusCode::OK, StatusCode::OK));
            assert_eq!(
                from_cluster,
                answer_json(user, window, now, source, false, &top10),
                "user {user} from the cluster ({source})"
            );
            assert_eq!(from_server, from_cluster, "user {user} ({source})");
        }
        let (_, _, all) = get(&on_cluster, &format!("{uri}?limit={MAX_LIMIT}"), None).await;
        assert_eq!(all["songs"], songs_json(&want), "user {user}, 50 songs");
    }
    common::drop_database(&server).await;
    common::drop_database(&cluster).await;
}

/// Malformed ids, limits and routes get a 4xx with a JSON reason, before any dependency is used.
#[tokio::test]
async fn bad_input_gets_a_json_reason() {
    let clickhouse = common::clickhouse_args("unused");
    let redis = common::redis_args();
    let app = state(&redis, &clickhouse, fixed_now(), settings(), None);
    for (uri, status, needle) in [
        (
            "/v1/users/abc/top-songs",
            StatusCode::BAD_REQUEST,
            "user_id",
        ),
        ("/v1/users/-1/top-songs", StatusCode::BAD_REQUEST, "user_id"),
        (
            "/v1/users/18446744073709551616/top-songs",
            StatusCode::BAD_REQUEST,
            "user_id",
        ),
        (
            "/v1/users/1.5/top-songs",
            StatusCode::BAD_REQUEST,
            "user_id",
        ),
        (
            "/v1/users/42/top-songs?limit=0",
            StatusCode::BAD_REQUEST,
            "limit",
        ),
        (
            "/v1/users/42/top-songs?limit=51",
            StatusCode::BAD_REQUEST,
            "limit",
        ),
        (
            "/v1/users/42/top-songs?limit=ten",
            StatusCode::BAD_REQUEST,
            "limit",
        ),
        (
            "/v1/users/42/top-songs?limit=",
            StatusCode::BAD_REQUEST,
            "limit",
        ),
        (
            "/v1/users/42/top-songs?limit=%ZZ",
            StatusCode::BAD_REQUEST,
            "",
        ),
        ("/widget/abc", StatusCode::BAD_REQUEST, "user_id"),
        ("/v1/users/42", StatusCode::NOT_FOUND, "no such route"),
        (
            "/v1/me/top-songs",
            StatusCode::UNAUTHORIZED,
            "authentication is off",
        ),
    ] {
        let (got, headers, body) = get(&app, uri, None).await;
        assert_eq!(got, status, "{uri}: {body}");
        assert_eq!(headers[header::CONTENT_TYPE], "application/json", "{uri}");
        assert!(body["error"].is_string(), "{uri}: {body}");
        assert!(error_reason(&body).contains(needle), "{uri}: {body}");
    }
}

/// Redis down (killed, or never there): answers come from ClickHouse, exact, and nothing is
/// written back; `/readyz` says which dependency is missing.
#[tokio::test]
async fn redis_down_answers_from_clickhouse() {
    let (clickhouse, now, window, plays) = seeded(3).await;
    let expected = oracle(&plays, window, 10);
    let mut private = common::private_redis::PrivateRedis::start();
    let app = state(&private.args(), &clickhouse, now, settings(), None);

    let (_, _, first) = get(&app, "/v1/users/2/top-songs", None).await;
    assert_eq!(first["source"], "olap");
    let (_, _, cached) = get(&app, "/v1/users/2/top-songs", None).await;
    assert_eq!(cached["source"], "cache");

    private.kill();
    for user in 1..=3u64 {
        let (status, _, body) = get(&app, &format!("/v1/users/{user}/top-songs"), None).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["source"], "olap");
        assert_eq!(body["stale"], false);
        assert_eq!(body["songs"], songs_json(&expected[&user]), "user {user}");
    }
    let (status, _, ready) = get(&app, "/readyz", None).await;
    assert_eq!(
        (status, ready),
        (
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"redis": false, "clickhouse": true})
        )
    );
    let (status, _, health) = get(&app, "/healthz", None).await;
    assert_eq!((status, health), (StatusCode::OK, json!({"status": "ok"})));

    // Redis back (empty, on the same port): the API drops the dead connection and uses the new
    // server again. The pool may still be in its reconnect back-off for the first request (which
    // then answers from ClickHouse); within a few requests a miss is written back and read as a
    // hit. Every answer is exact meanwhile.
    let _restarted = common::private_redis::PrivateRedis::start_on(private.port);
    let mut sources = Vec::new();
    while sources.last() != Some(&json!("cache")) && sources.len() < 20 {
        let (status, _, body) = get(&app, "/v1/users/2/top-songs", None).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["songs"], songs_json(&expected[&2]));
        sources.push(body["source"].clone());
    }
    assert_eq!(sources.last(), Some(&json!("cache")), "{sources:?}");
    common::drop_database(&clickhouse).await;
}

/// ClickHouse down: a cached answer within the max age is a plain hit; an older one is served
/// with `stale: true`; no cached answer at all is `503` with `Retry-After` and a JSON reason.
/// Redis down too: `503`. Hanging dependencies (accepting, never answering) end in the same
/// answers within their deadlines.
#[tokio::test]
async fn clickhouse_down_serves_stale_then_503() {
    let now = fixed_now();
    let window = Window::at(now);
    let redis = common::redis_args();
    let (_hanging_ch, hanging_ch_port) = hanging_listener();
    let (_hanging_redis, hanging_redis_port) = hanging_listener();
    let target = Target {
        prefix: redis.prefix.clone(),
        ttl: Duration::from_secs(600),
        tombstone_ttl: Duration::from_secs(600),
    };
    let mut conn = Redis::connect(&redis)
        .expect("pool")
        .get()
        .await
        .expect("conn");
    let fresh_songs = rank(vec![(7, 31), (9, 12), (3, 12)], MAX_LIMIT);
    let old_songs = rank(vec![(5, 2)], MAX_LIMIT);
    let old_at = now - 2 * 3_600_000;
    let old_window = Window::at(old_at);
    replace(
        &mut conn,
        &target,
        &Answer {
            user_id: 1,
            songs: &fresh_songs,
        },
        window,
        now - 60_000,
    )
    .await
    .expect("replace");
    replace(
        &mut conn,
        &target,
        &Answer {
            user_id: 2,
            songs: &old_songs,
        },
        old_window,
        old_at,
    )
    .await
    .expect("replace");

    for clickhouse_url in [
        format!("http://127.0.0.1:{}", common::free_port()),
        format!("http://127.0.0.1:{hanging_ch_port}"),
    ] {
        let clickhouse = clickhouse_at(&clickhouse_url);
        let mut short = settings();
        short.olap_timeout = Duration::from_millis(300);
        let app = state(&redis, &clickhouse, now, short.clone(), None);

        let (status, _, hit) = get(&app, "/v1/users/1/top-songs", None).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            hit,
            answer_json(1, window, now - 60_000, "cache", false, &fresh_songs),
            "{clickhouse_url}"
        );
        let (status, _, stale) = get(&app, "/v1/users/2/top-songs", None).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            stale,
            answer_json(2, old_window, old_at, "cache", true, &old_songs),
            "{clickhouse_url}"
        );
        let (status, headers, body) = get(&app, "/v1/users/3/top-songs", None).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert_eq!(headers[header::RETRY_AFTER], "5");
        assert_eq!(body["error"], "unavailable");
        assert!(error_reason(&body).contains("ClickHouse"), "{body}");
        let (status, _, ready) = get(&app, "/readyz", None).await;
        assert_eq!(
            (status, ready),
            (
                StatusCode::SERVICE_UNAVAILABLE,
                json!({"redis": true, "clickhouse": false})
            )
        );

        // Redis gone as well (unreachable, or hanging): nothing to answer with.
        for redis_url in [
            format!("redis://127.0.0.1:{}", common::free_port()),
            format!("redis://127.0.0.1:{hanging_redis_port}"),
        ] {
            let down = RedisArgs {
                url: redis_url.clone(),
                ..redis.clone()
            };
            let app = state(&down, &clickhouse, now, short.clone(), None);
            let (status, headers, body) = get(&app, "/v1/users/1/top-songs", None).await;
            assert_eq!(
                status,
                StatusCode::SERVICE_UNAVAILABLE,
                "{redis_url}: {body}"
            );
            assert_eq!(headers[header::RETRY_AFTER], "5");
            assert_eq!(body["error"], "unavailable");
        }
    }
}

/// A request that cannot finish within the request deadline is answered `503` with
/// `Retry-After` (here ClickHouse hangs longer than the whole request may take).
#[tokio::test]
async fn the_request_deadline_answers_503() {
    let (_hanging, port) = hanging_listener();
    let clickhouse = clickhouse_at(&format!("http://127.0.0.1:{port}"));
    let mut tight = settings();
    tight.olap_timeout = Duration::from_secs(30);
    tight.request_timeout = Duration::from_millis(300);
    let app = state(&common::redis_args(), &clickhouse, fixed_now(), tight, None);
    let (status, headers, body) = get(&app, "/v1/users/5/top-songs", None).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(headers[header::RETRY_AFTER], "5");
    assert!(error_reason(&body).contains("request deadline"), "{body}");
}

/// With a secret configured: own id 200, another id 403, admin scope 200, missing, garbled,
/// wrongly signed and expired tokens 401, `/v1/me` answers for the subject (string or number).
#[tokio::test]
async fn jwt_auth() {
    let (clickhouse, now, window, plays) = seeded(3).await;
    let expected = oracle(&plays, window, 10);
    let redis = common::redis_args();
    let app = state(
        &redis,
        &clickhouse,
        now,
        settings(),
        Some(Auth::hs256(SECRET)),
    );

    let own = token(json!({"sub": "2", "exp": exp_in(600)}));
    let numeric = token(json!({"sub": 3, "exp": exp_in(600)}));
    let admin = token(json!({"sub": "7", "exp": exp_in(600), "scope": "read admin"}));
    let admin_list = token(json!({"sub": "7", "exp": exp_in(600), "scope": ["admin"]}));
    let expired = token(json!({"sub": "2", "exp": exp_in(-600)}));
    let no_exp = token(json!({"sub": "2"}));
    let not_yet = token(json!({"sub": "2", "exp": exp_in(1200), "nbf": exp_in(600)}));
    let wrong_key = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({"sub": "2", "exp": exp_in(600)}),
        &jsonwebtoken::EncodingKey::from_secret(b"another secret"),
    )
    .expect("token");

    let (status, headers, body) = get(&app, "/v1/users/2/top-songs", Some(&own)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["songs"], songs_json(&expected[&2]));
    // One listener's answer: no shared cache may keep it or give it to another token.
    assert_eq!(headers[header::CACHE_CONTROL], "private, max-age=60");
    assert_eq!(headers[header::VARY], "authorization");
    let (status, _, body) = get(&app, "/v1/me/top-songs", Some(&own)).await;
    assert_eq!((status, &body["user_id"]), (StatusCode::OK, &json!(2)));
    assert_eq!(body["songs"], songs_json(&expected[&2]));
    let (status, _, body) = get(&app, "/v1/me/top-songs?limit=2", Some(&numeric)).await;
    assert_eq!((status, &body["user_id"]), (StatusCode::OK, &json!(3)));
    assert_eq!(body["songs"], songs_json(&expected[&3][..2]));

    let (status, _, body) = get(&app, "/v1/users/3/top-songs", Some(&own)).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::FORBIDDEN, Some("forbidden"))
    );
    for admin in [&admin, &admin_list] {
        let (status, _, body) = get(&app, "/v1/users/1/top-songs", Some(admin)).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["songs"], songs_json(&expected[&1]));
    }

    for (token, needle) in [
        (None, "missing bearer token"),
        (Some("not.a.jwt"), "invalid token"),
        (Some("garbage"), "invalid token"),
        (Some(wrong_key.as_str()), "invalid token"),
        (Some(expired.as_str()), "expired"),
        (Some(no_exp.as_str()), "exp"),
        (Some(not_yet.as_str()), "not valid yet"),
    ] {
        for uri in ["/v1/users/2/top-songs", "/v1/me/top-songs"] {
            let (status, headers, body) = get(&app, uri, token).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{uri} {token:?}: {body}");
            assert_eq!(headers[header::WWW_AUTHENTICATE], "Bearer");
            assert!(
                error_reason(&body).contains(needle),
                "{uri} {token:?}: {body}"
            );
        }
    }
    common::drop_database(&clickhouse).await;
}

/// Secure defaults through the router, with a key directory, an issuer and an audience: a key
/// added to the directory answers `200` once the directory is re-read (not before: a token with
/// an unknown `kid` is `401`), a token living longer than the max lifetime (by `exp`, or by
/// `exp - iat`) is `401`, and so is one without this API's `aud` or `iss`.
#[tokio::test]
async fn jwt_keys_rotate_in_and_lifetime_audience_and_issuer_are_enforced() {
    let (clickhouse, now, window, plays) = seeded(3).await;
    let expected = oracle(&plays, window, 10);
    let redis = common::redis_args();
    let keys = tempfile::tempdir().expect("key dir");
    let old_key: &[u8] = b"the-key-of-november-with-32-bytes-at-least";
    let new_key: &[u8] = b"the-key-of-december-with-32-bytes-at-least";
    std::fs::write(keys.path().join("2026-11"), old_key).expect("old key");
    let auth = Auth::hs256(SECRET)
        .with_key_dir(keys.path())
        .expect("keys")
        .with_issuer("topk")
        .with_audience("topk-api");
    let app = state(&redis, &clickhouse, now, settings(), Some(auth));
    let signed = |kid: Option<&str>, key: &[u8], claims: Value| {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
        header.kid = kid.map(str::to_owned);
        jsonwebtoken::encode(
            &header,
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(key),
        )
        .expect("token")
    };
    let claims = |extra: Value| {
        let mut claims = json!({"sub": "2", "exp": exp_in(600), "iss": "topk", "aud": "topk-api"});
        for (name, value) in extra.as_object().expect("object") {
            claims[name] = value.clone();
        }
        claims
    };
    let refused = |reason: &str| {
        (
            StatusCode::UNAUTHORIZED,
            json!({"error": "unauthorized", "reason": reason}),
        )
    };
    let ok = (StatusCode::OK, songs_json(&expected[&2]));
    let uri = "/v1/users/2/top-songs";
    let ask = |token: String| {
        let app = app.clone();
        async move {
            let (status, _, body) = get(&app, uri, Some(&token)).await;
            if status == StatusCode::OK {
                (status, body["songs"].clone())
            } else {
                (status, body)
            }
        }
    };

    assert_eq!(
        ask(signed(Some("2026-11"), old_key, claims(json!({})))).await,
        ok
    );
    assert_eq!(ask(signed(None, SECRET, claims(json!({})))).await, ok);
    // Rotation: the new key is written, tokens with its kid are issued at once. Until the
    // directory is re-read (at most every 5 s), they are refused.
    std::fs::write(keys.path().join("2026-12"), new_key).expect("new key");
    let rotated = signed(Some("2026-12"), new_key, claims(json!({})));
    assert_eq!(
        ask(rotated.clone()).await,
        refused("the token's `kid` names no key of this API")
    );
    tokio::time::sleep(topk_api::auth::KEY_DIR_REREAD).await;
    assert_eq!(ask(rotated.clone()).await, ok);
    // Signed with the old key but naming the new one: refused.
    assert_eq!(
        ask(signed(Some("2026-12"), old_key, claims(json!({})))).await,
        refused("invalid token")
    );

    let too_long = "token lives longer than 1day (`--auth-max-token-lifetime`)";
    assert_eq!(
        ask(signed(
            None,
            SECRET,
            claims(json!({"exp": exp_in(2 * 86_400)}))
        ))
        .await,
        refused(&format!("{too_long}: its `exp` is further away"))
    );
    assert_eq!(
        ask(signed(
            None,
            SECRET,
            claims(json!({"iat": exp_in(-2 * 86_400)}))
        ))
        .await,
        refused(&format!("{too_long}: `exp - iat` is longer"))
    );
    assert_eq!(
        ask(signed(
            Some("2026-12"),
            new_key,
            claims(json!({"aud": "another-api"}))
        ))
        .await,
        refused("the token's `aud` does not name this API")
    );
    let mut no_aud = claims(json!({}));
    no_aud.as_object_mut().expect("object").remove("aud");
    assert_eq!(
        ask(signed(None, SECRET, no_aud)).await,
        refused("token lacks the `aud` claim")
    );
    assert_eq!(
        ask(signed(None, SECRET, claims(json!({"iss": "someone-else"})))).await,
        refused("the token's `iss` is not this API's issuer")
    );
    common::drop_database(&clickhouse).await;
}

/// A server on a real socket with one seeded user; stops (gracefully) when dropped.
struct Server {
    addr: std::net::SocketAddr,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), topk_api::ServeError>>,
}

impl Server {
    async fn start(app: AppState) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(topk_api::serve(
            listener,
            app,
            shutdown.clone(),
            Duration::from_secs(5),
        ));
        Server {
            addr,
            shutdown,
            task,
        }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.task
            .await
            .expect("joined")
            .expect("served and drained");
    }
}

fn artifacts() -> PathBuf {
    let dir = common::workspace_root()
        .join("target")
        .join("test-artifacts");
    std::fs::create_dir_all(&dir).expect("artifact dir");
    dir
}

/// 2^53: the first integer above which a double cannot hold every integer.
const BIG_SONG: u64 = 1 << 53;

/// Headless Chromium loads the widget of a seeded user: after its script ran, the DOM holds the
/// user's top 10 (rank, song, plays) exactly as the oracle has them, and the freshness line; a
/// screenshot is kept in `target/test-artifacts/widget.png`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn widget_renders_in_headless_chromium() {
    let (clickhouse, now, window, mut plays) = seeded(2).await;
    // User 1's two most played songs have ids that a JSON number read as a double (JavaScript)
    // cannot tell apart: 2^53 + 1 would show as 2^53. The widget must show both exactly.
    let big: Vec<Play> = [(BIG_SONG + 1, 100), (BIG_SONG, 99)]
        .into_iter()
        .flat_map(|(song, n)| {
            (0..n).map(move |i| Play {
                user: 1,
                song,
                ts: now - (i + 2) * MINUTE,
            })
        })
        .collect();
    let store = Store::new(topk::olap::client(&clickhouse), "plays");
    common::plays::flush(&store, &big, 1).await;
    plays.extend(big);
    let expected = oracle(&plays, window, 10);
    assert_eq!(
        expected[&1][..2]
            .iter()
            .map(|s| s.song_id)
            .collect::<Vec<_>>(),
        [BIG_SONG + 1, BIG_SONG]
    );
    let redis = common::redis_args();
    let server = Server::start(state(&redis, &clickhouse, now, settings(), None)).await;
    let url = format!("http://{}/widget/1", server.addr);
    let profile = tempfile::tempdir().expect("profile dir");

    let chromium = |extra: &[String]| {
        let url = url.clone();
        let profile = profile.path().to_owned();
        let extra = extra.to_vec();
        tokio::task::spawn_blocking(move || {
            Command::new("chromium")
                .args([
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    "--no-first-run",
                    "--virtual-time-budget=5000",
                ])
                .arg(format!("--user-data-dir={}", profile.display()))
                .args(extra)
                .arg(&url)
                .output()
                .expect("chromium runs (Debian package `chromium`)")
        })
    };
    let dom = chromium(&["--dump-dom".to_owned()][..])
        .await
        .expect("joined");
    let dom = String::from_utf8_lossy(&dom.stdout).into_owned();
    assert!(dom.contains("data-state=\"loaded\""), "{dom}");
    // Rows as rendered: rank, song, plays.
    let rendered: Vec<(String, String, String)> = dom
        .split("<tr class=\"song\">")
        .skip(1)
        .map(|row| {
            let cells: Vec<String> = row
                .split("<td class=\"")
                .skip(1)
                .map(|cell| {
                    let text = cell.split_once('>').map_or("", |(_, rest)| rest);
                    text.split('<').next().unwrap_or_default().to_owned()
                })
                .collect();
            (cells[0].clone(), cells[1].clone(), cells[2].clone())
        })
        .collect();
    let want: Vec<(String, String, String)> = expected[&1]
        .iter()
        .map(|s| {
            (
                s.rank.to_string(),
                format!("Song {}", s.song_id),
                s.plays.to_string(),
            )
        })
        .collect();
    assert_eq!(rendered, want);
    assert!(
        dom.contains(&format!("Computed {} from olap;", rfc3339_ms(now))),
        "freshness line: {dom}"
    );

    let shot = artifacts().join("widget.png");
    let _ = std::fs::remove_file(&shot);
    let out = chromium(&[
        format!("--screenshot={}", shot.display()),
        "--window-size=480,520".to_owned(),
    ])
    .await
    .expect("joined");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let png = std::fs::read(&shot).expect("screenshot written");
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    server.stop().await;
    common::drop_database(&clickhouse).await;
}

/// schemathesis (PyPI, pinned in `scripts/stack install`) fuzzes the running API from its
/// `/openapi.json`, authenticated as an admin: every response must be documented and match its
/// schema, and none may be a 5xx. Bounded examples keep it to seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_fuzzed_by_schemathesis() {
    let (clickhouse, now, _, _) = seeded(5).await;
    let redis = common::redis_args();
    let app = state(
        &redis,
        &clickhouse,
        now,
        settings(),
        Some(Auth::hs256(SECRET)),
    );
    let server = Server::start(app).await;
    let admin = token(json!({"sub": "1", "exp": exp_in(3600), "scope": "admin"}));
    let spec = format!("http://{}/openapi.json", server.addr);
    let report = artifacts().join("schemathesis.xml");
    let out = tokio::task::spawn_blocking(move || {
        Command::new("schemathesis")
            .args([
                "--no-color",
                "run",
                &spec,
                "--checks",
                "all",
                "--max-examples",
                "40",
            ])
            .args(["--header", &format!("Authorization: Bearer {admin}")])
            .args(["--report", "junit", "--report-junit-path"])
            .arg(&report)
            .args(["--seed", "1"])
            // It keeps a cache directory in its working directory.
            .current_dir(artifacts())
            .output()
            .expect("schemathesis runs (pip install schemathesis)")
    })
    .await
    .expect("joined");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "schemathesis failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    server.stop().await;
    common::drop_database(&clickhouse).await;
}

/// The OpenAPI document names every route's responses (with the error schema) and the bearer
/// scheme; it is generated from the code, so this guards what clients rely on.
#[tokio::test]
async fn openapi_documents_every_response() {
    let app = state(
        &common::redis_args(),
        &common::clickhouse_args("unused"),
        fixed_now(),
        settings(),
        None,
    );
    let (status, _, doc) = get(&app, "/openapi.json", None).await;
    assert_eq!(status, StatusCode::OK);
    let codes = |path: &str| -> Vec<String> {
        let mut codes: Vec<String> = doc["paths"][path]["get"]["responses"]
            .as_object()
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default();
        codes.sort();
        codes
    };
    assert_eq!(
        codes("/v1/users/{user_id}/top-songs"),
        ["200", "304", "400", "401", "403", "404", "503"]
    );
    assert_eq!(
        codes("/v1/me/top-songs"),
        ["200", "304", "400", "401", "503"]
    );
    for path in ["/v1/users/{user_id}/top-songs", "/v1/me/top-songs"] {
        let ok = &doc["paths"][path]["get"]["responses"]["200"]["headers"];
        for name in ["ETag", "Cache-Control", "Vary"] {
            assert!(ok[name].is_object(), "{path}: 200 documents {name}");
        }
        let params = doc["paths"][path]["get"]["parameters"]
            .as_array()
            .expect("parameters");
        assert!(
            params
                .iter()
                .any(|p| p["name"] == "If-None-Match" && p["in"] == "header"),
            "{path}: If-None-Match documented"
        );
    }
    assert_eq!(codes("/healthz"), ["200"]);
    assert_eq!(codes("/readyz"), ["200", "503"]);
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
    let required: BTreeMap<&str, Value> = ["TopSongs", "RankedSong", "ErrorBody"]
        .into_iter()
        .map(|name| (name, doc["components"]["schemas"][name]["required"].clone()))
        .collect();
    assert_eq!(
        required["RankedSong"],
        json!(["rank", "song_id", "song_id_str", "plays"])
    );
    assert_eq!(required["ErrorBody"], json!(["error", "reason"]));
    assert_eq!(
        required["TopSongs"],
        json!([
            "user_id",
            "user_id_str",
            "window",
            "computed_at",
            "source",
            "stale",
            "songs"
        ])
    );
}

/// SIGTERM's token stops the server: a request in flight finishes (drain), then `serve` returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_drains() {
    let (hanging, port) = hanging_listener();
    let clickhouse = clickhouse_at(&format!("http://127.0.0.1:{port}"));
    let mut slow = settings();
    slow.olap_timeout = Duration::from_millis(500);
    let server = Server::start(state(
        &common::redis_args(),
        &clickhouse,
        fixed_now(),
        slow,
        None,
    ))
    .await;
    let addr = server.addr;
    // A request that takes the olap deadline to answer, in flight when shutdown starts.
    let in_flight = tokio::task::spawn_blocking(move || {
        Command::new("curl")
            .args(["-s", "-w", " %{http_code}"])
            .arg(format!("http://{addr}/v1/users/5/top-songs"))
            .output()
            .expect("curl")
    });
    // The API connecting to the hanging ClickHouse proves the request is in flight.
    let listener = hanging.try_clone().expect("clone");
    let _held = tokio::task::spawn_blocking(move || listener.accept().expect("accept"))
        .await
        .expect("joined");
    server.stop().await;
    let out = in_flight.await.expect("joined");
    let out = String::from_utf8_lossy(&out.stdout);
    assert!(out.ends_with(" 503"), "answered, not cut off: {out}");
    assert!(out.contains("ClickHouse failed or did not answer"), "{out}");
}

/// Writes `user`'s plays as the aggregator would: `n` plays of each (song, n), one a minute
/// before `now`.
async fn seed_plays_per_song(
    clickhouse: &ClickHouseArgs,
    user: u64,
    now: i64,
    songs: &[(u64, i64)],
) {
    let plays: Vec<Play> = songs
        .iter()
        .flat_map(|&(song, n)| {
            (0..n).map(move |i| Play {
                user,
                song,
                ts: now - (i + 1) * MINUTE,
            })
        })
        .collect();
    let store = Store::new(topk::olap::client(clickhouse), "plays");
    common::plays::flush(&store, &plays, 0).await;
}

/// Every id in the answer is also a decimal string, exact where a JSON number is not (a
/// JavaScript client reads 2^53 + 1 as 2^53, and u64::MAX as 2^64).
#[tokio::test]
async fn ids_above_2_53_are_also_exact_decimal_strings() {
    let clickhouse = common::migrated_database().await;
    let now = fixed_now();
    let user = u64::MAX;
    seed_plays_per_song(
        &clickhouse,
        user,
        now,
        &[(BIG_SONG + 1, 3), (BIG_SONG, 2), (u64::MAX, 1)],
    )
    .await;
    let app = state(&common::redis_args(), &clickhouse, now, settings(), None);
    let (status, _, body) = get(&app, &format!("/v1/users/{user}/top-songs"), None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["user_id_str"], "18446744073709551615");
    let songs: Vec<(String, u64)> = body["songs"]
        .as_array()
        .expect("songs")
        .iter()
        .map(|s| {
            (
                s["song_id_str"].as_str().expect("string").to_owned(),
                s["plays"].as_u64().expect("plays"),
            )
        })
        .collect();
    assert_eq!(
        songs,
        [
            ("9007199254740993".to_owned(), 3),
            ("9007199254740992".to_owned(), 2),
            ("18446744073709551615".to_owned(), 1)
        ]
    );
    common::drop_database(&clickhouse).await;
}

/// A meta whose version is years ahead (written by whoever reached Redis) is not an answer of
/// this system: it is never served, and the write-back replaces it with the exact answer, which
/// later reads then get from the cache (before, it was served as fresh forever and the version
/// guard refused every honest rewrite).
#[tokio::test]
async fn a_version_from_the_future_in_redis_is_overwritten_not_served() {
    let clickhouse = common::migrated_database().await;
    let now = fixed_now();
    let user = 9;
    seed_plays_per_song(&clickhouse, user, now, &[(7, 3), (8, 1)]).await;
    let redis = common::redis_args();
    let poison = rank(vec![(666, 1_000)], MAX_LIMIT);
    let ten_years_ms = 10 * 365 * DAY;
    let stored = store_answer(&redis, user, &poison, now + ten_years_ms).await;
    assert_eq!(stored, Outcome::Written);

    let app = state(&redis, &clickhouse, now, settings(), None);
    let exact = rank(vec![(7, 3), (8, 1)], DEFAULT_LIMIT);
    let uri = format!("/v1/users/{user}/top-songs");
    let (status, _, body) = get(&app, &uri, None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body,
        answer_json(user, Window::at(now), now, "olap", false, &exact)
    );
    let (_, _, body) = get(&app, &uri, None).await;
    assert_eq!(
        body,
        answer_json(user, Window::at(now), now, "cache", false, &exact),
        "the write-back replaced the poisoned entry"
    );
    common::drop_database(&clickhouse).await;
}

/// The HS256 secret must be at least 256 bits (RFC 7518 section 3.2), and a secret file loses
/// one trailing newline and nothing else: a binary secret may end in whitespace bytes.
#[test]
fn jwt_secrets_are_long_enough_and_kept_byte_for_byte() {
    let dir = tempfile::tempdir().expect("dir");
    let file = |name: &str, bytes: &[u8]| {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).expect("write");
        path
    };
    let short = file("short", b"0123456789012345678901234567890\n");
    let error = topk_api::configured_secret(Some(&short)).expect_err("31 bytes refused");
    assert!(error.to_string().contains("31 bytes"), "{error}");
    let binary: Vec<u8> = (0u8..30).chain([b' ', b'\t']).collect();
    let kept = file("binary", &binary);
    assert_eq!(
        topk_api::configured_secret(Some(&kept)).expect("32 bytes"),
        Some(binary.clone())
    );
    let text = file("text", b"0123456789abcdef0123456789abcdef\r\n");
    assert_eq!(
        topk_api::configured_secret(Some(&text)).expect("text"),
        Some(b"0123456789abcdef0123456789abcdef".to_vec())
    );
}

/// `/readyz` needs no token and sits outside the in-flight bound: 40 concurrent calls (and a
/// loop of them) must not become 40 ClickHouse queries. Here ClickHouse accepts connections and
/// never answers; every check that reaches it is one connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_readyz_loop_checks_clickhouse_once_a_second() {
    let (clickhouse, accepted) = counting_hanging_clickhouse();
    let fast = ApiSettings {
        olap_timeout: Duration::from_millis(300),
        ..settings()
    };
    let app = state(&common::redis_args(), &clickhouse, fixed_now(), fast, None);
    let calls = (0..40).map(|_| {
        let app = app.clone();
        tokio::spawn(async move { get(&app, "/readyz", None).await })
    });
    for call in futures::future::join_all(calls).await {
        let (status, _, ready) = call.expect("joined");
        assert_eq!(
            (status, ready),
            (
                StatusCode::SERVICE_UNAVAILABLE,
                json!({"redis": true, "clickhouse": false})
            )
        );
    }
    assert_eq!(
        accepted.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "one check for 40 calls"
    );
    // Once the result is older than a second, the next call checks again.
    tokio::time::sleep(topk_api::top::READINESS_TTL).await;
    let (status, _, _) = get(&app, "/readyz", None).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        accepted.load(std::sync::atomic::Ordering::SeqCst),
        2,
        "checked again after the TTL"
    );
}

/// A flood of reads of uncached ids cannot queue one ClickHouse computation per read: past
/// `--max-olap-in-flight` a miss is shed at once with a `503` and its reason. Here ClickHouse
/// accepts and never answers, so the computations in flight are the ones holding slots.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misses_beyond_the_olap_bound_are_shed_at_once() {
    let (clickhouse, accepted) = counting_hanging_clickhouse();
    let bounded = ApiSettings {
        olap_timeout: Duration::from_millis(800),
        max_olap_in_flight: 2,
        ..settings()
    };
    let app = state(
        &common::redis_args(),
        &clickhouse,
        fixed_now(),
        bounded,
        None,
    );
    let calls = (1..=10u64).map(|user| {
        let app = app.clone();
        tokio::spawn(async move { get(&app, &format!("/v1/users/{user}/top-songs"), None).await })
    });
    let mut reasons = BTreeMap::new();
    for call in futures::future::join_all(calls).await {
        let (status, _, body) = call.expect("joined");
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        *reasons.entry(error_reason(&body).to_owned()).or_insert(0) += 1;
    }
    assert_eq!(
        reasons,
        BTreeMap::from([
            (
                "no cached answer, and ClickHouse failed or did not answer in time".to_owned(),
                2
            ),
            (
                "too many answers are being computed from ClickHouse right now".to_owned(),
                8
            ),
        ])
    );
    // Two computations, each the window query and the clean-day lookup beside it at most.
    assert!(
        accepted.load(std::sync::atomic::Ordering::SeqCst) <= 4,
        "{accepted:?}"
    );
}

/// Stores `songs` as `user`'s answer computed at `computed_at_ms` (and its window), as the
/// refresher would.
async fn store_answer(
    redis: &RedisArgs,
    user: u64,
    songs: &[RankedSong],
    computed_at_ms: i64,
) -> Outcome {
    let mut conn = Redis::connect(redis)
        .expect("pool")
        .get()
        .await
        .expect("conn");
    let target = Target {
        prefix: redis.prefix.clone(),
        ttl: Duration::from_secs(600),
        tombstone_ttl: Duration::from_secs(600),
    };
    let answer = Answer {
        user_id: user,
        songs,
    };
    replace(
        &mut conn,
        &target,
        &answer,
        Window::at(computed_at_ms),
        computed_at_ms,
    )
    .await
    .expect("replace")
}

/// One GET through a real socket with curl (`-i`: status line and headers), with extra request
/// headers: status, headers (names lower-cased), body.
fn curl(
    addr: std::net::SocketAddr,
    path: &str,
    headers: &[&str],
) -> (u16, BTreeMap<String, String>, String) {
    let mut command = Command::new("curl");
    command.args(["-s", "-i"]);
    for header in headers {
        command.args(["-H", header]);
    }
    let out = command
        .arg(format!("http://{addr}{path}"))
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
        .collect();
    (status, headers, body.to_owned())
}

/// HTTP caching: every answer has a strong `ETag` that changes exactly when its JSON does, an
/// `If-None-Match` naming it (exactly, weakly, in a list, or `*`) gets `304` without a body, and
/// `Cache-Control` lets the browser (not a shared cache) reuse it for `--answer-max-age`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_carry_an_etag_and_revalidate_with_304() {
    let (clickhouse, now, window, plays) = seeded(3).await;
    let expected = oracle(&plays, window, 10);
    let redis = common::redis_args();
    let mut tuned = settings();
    tuned.answer_max_age = Duration::from_secs(90);
    let server = Server::start(state(&redis, &clickhouse, now, tuned, None)).await;
    let addr = server.addr;
    let path = "/v1/users/2/top-songs";
    let run = |path: &'static str, headers: Vec<String>| {
        tokio::task::spawn_blocking(move || {
            let headers: Vec<&str> = headers.iter().map(String::as_str).collect();
            curl(addr, path, &headers)
        })
    };

    // The miss computes from ClickHouse and writes back; from then on the cached answer.
    let (status, _, _) = run(path, vec![]).await.expect("joined");
    assert_eq!(status, 200);
    let (status, headers, body) = run(path, vec![]).await.expect("joined");
    assert_eq!(status, 200, "{body}");
    let parsed: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(parsed["songs"], songs_json(&expected[&2]));
    assert_eq!(parsed["source"], "cache");
    assert_eq!(headers["cache-control"], "private, max-age=90");
    assert_eq!(headers["vary"], "authorization");
    let etag = headers["etag"].clone();
    assert_eq!(
        etag,
        format!("\"{:016x}\"", xxhash_rust::xxh3::xxh3_64(body.as_bytes())),
        "a strong tag of the body's bytes"
    );
    let (status, headers, again) = run(path, vec![]).await.expect("joined");
    assert_eq!((status, &headers["etag"], &again), (200, &etag, &body));

    for condition in [
        etag.clone(),
        format!("W/{etag}"),
        format!("\"0000000000000000\", {etag}"),
        "*".to_owned(),
    ] {
        let (status, headers, body) = run(path, vec![format!("If-None-Match: {condition}")])
            .await
            .expect("joined");
        assert_eq!(status, 304, "If-None-Match: {condition}");
        assert_eq!(body, "", "a 304 has no body");
        assert_eq!(headers["etag"], etag);
        assert_eq!(headers["cache-control"], "private, max-age=90");
    }
    let stale_tag = "If-None-Match: \"0000000000000000\"".to_owned();
    let (status, headers, other) = run(path, vec![stale_tag]).await.expect("joined");
    assert_eq!((status, &headers["etag"], &other), (200, &etag, &body));

    // Another limit is another answer: another tag.
    let (status, headers, _) = run("/v1/users/2/top-songs?limit=2", vec![])
        .await
        .expect("joined");
    assert_eq!(status, 200);
    assert_ne!(headers["etag"], etag);

    // A newer answer in Redis (the refresher's next computation): a new tag, and the old one
    // no longer revalidates.
    let newer = rank(vec![(31, 5)], MAX_LIMIT);
    let written = store_answer(&redis, 2, &newer, now + 1_000).await;
    assert_eq!(written, Outcome::Written);
    let (status, headers, changed) = run(path, vec![format!("If-None-Match: {etag}")])
        .await
        .expect("joined");
    assert_eq!(status, 200, "the answer changed: {changed}");
    let parsed: Value = serde_json::from_str(&changed).expect("json");
    assert_eq!(parsed["songs"], songs_json(&newer[..1]));
    assert_ne!(headers["etag"], etag);
    server.stop().await;
    common::drop_database(&clickhouse).await;
}
