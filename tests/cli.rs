//! The `topk` binary's contracts: `topk top` prints the API's JSON (from ClickHouse with
//! `--fresh` or on a cache miss, from Redis otherwise), `topk migrate`, `rollup` and `prune`
//! print JSON reports, and bad arguments are refused with a clear error.

mod common;

use std::process::Output;

use bb8_redis::redis::AsyncCommands;
use topk::counting::batch::Batch;
use topk_aggregator::store::Store;

fn topk(
    args: &[&str],
    clickhouse: &topk::config::ClickHouseArgs,
    redis: &topk::config::RedisArgs,
) -> Output {
    std::process::Command::new(common::topk_bin())
        .args(args)
        .env("TOPK_CLICKHOUSE_URL", &clickhouse.url)
        .env("TOPK_CLICKHOUSE_DATABASE", &clickhouse.database)
        .env("TOPK_REDIS_URL", &redis.url)
        .env("TOPK_REDIS_PREFIX", &redis.prefix)
        .output()
        .expect("topk runs")
}

fn json(output: &Output) -> serde_json::Value {
    assert!(
        output.status.success(),
        "topk failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("stdout is JSON")
}

#[tokio::test]
async fn top_prints_the_api_json_from_clickhouse_then_from_redis() {
    let clickhouse = common::clickhouse_args(&common::unique("topk_cli"));
    let redis = common::redis_args();
    let migrated = json(&topk(&["migrate"], &clickhouse, &redis));
    assert_eq!(
        migrated["applied"],
        serde_json::json!([1, 2, 3, 4, 5, 6, 7, 8, 9])
    );

    let now_minute = topk::window::Window::at(common::workload::now_ms()).end - 60;
    let mut batch = Batch::open(0, 0, 0, None);
    batch.end_offset = 1;
    for (song, plays) in [(7u64, 31u64), (9, 12), (3, 12), (5, 1)] {
        batch.counts.insert((42, song, now_minute - 3_600), plays);
    }
    let store = Store::new(topk::olap::client(&clickhouse), "plays");
    store.write_counts(&[&batch]).await.expect("counts");
    store.write_touches(&[&batch]).await.expect("touches");

    let fresh = json(&topk(
        &["top", "42", "--limit", "3", "--fresh"],
        &clickhouse,
        &redis,
    ));
    assert_eq!(fresh["user_id"], 42);
    assert_eq!(fresh["source"], "olap");
    assert_eq!(fresh["stale"], false);
    assert_eq!(
        fresh["songs"],
        serde_json::json!([
            {"rank": 1, "song_id": 7, "song_id_str": "7", "plays": 31},
            {"rank": 2, "song_id": 3, "song_id_str": "3", "plays": 12},
            {"rank": 3, "song_id": 9, "song_id_str": "9", "plays": 12},
        ])
    );
    let start = fresh["window"]["start"].as_str().expect("start");
    let end = fresh["window"]["end"].as_str().expect("end");
    assert!(
        start.ends_with(":00Z") && end.ends_with(":00Z"),
        "{start} {end}"
    );

    // Nothing cached yet: the default path falls back to ClickHouse too.
    assert_eq!(
        json(&topk(&["top", "42"], &clickhouse, &redis))["source"],
        "olap"
    );
    // A user without plays gets an empty list.
    assert_eq!(
        json(&topk(&["top", "43", "--fresh"], &clickhouse, &redis))["songs"],
        serde_json::json!([])
    );

    // Cached: the answer comes from the two keys of the contract.
    let cache = topk::cache::Redis::connect(&redis).expect("redis");
    let mut conn = cache.get().await.expect("redis");
    let songs_key = topk::cache::songs_key(&redis.prefix, 42);
    let meta_key = topk::cache::meta_key(&redis.prefix, 42);
    let _: () = conn
        .zadd_multiple(&songs_key, &[(2, 4), (1, 5)]) // (score = plays, member = song_id)
        .await
        .expect("zadd");
    let _: () = conn
        .hset_multiple(
            &meta_key,
            &[
                ("computed_at", "2026-11-29T18:00:30Z"),
                ("window_start", start),
                ("window_end", end),
            ],
        )
        .await
        .expect("hset");
    let cached = json(&topk(&["top", "42"], &clickhouse, &redis));
    assert_eq!(cached["source"], "cache");
    assert_eq!(cached["computed_at"], "2026-11-29T18:00:30Z");
    assert_eq!(
        cached["songs"],
        serde_json::json!([{"rank": 1, "song_id": 4, "song_id_str": "4", "plays": 2}, {"rank": 2, "song_id": 5, "song_id_str": "5", "plays": 1}])
    );
    assert_eq!(
        json(&topk(&["top", "42", "--fresh"], &clickhouse, &redis))["source"],
        "olap",
        "--fresh bypasses Redis"
    );
    let _: () = conn.del(&[&songs_key, &meta_key]).await.expect("del");

    let rollup = json(&topk(&["rollup"], &clickhouse, &redis));
    assert_eq!(
        rollup["days"].as_array().map(Vec::len),
        Some(
            topk::window::Window::at(common::workload::now_ms())
                .full_days()
                .count()
        )
    );
    assert!(
        json(&topk(&["prune"], &clickhouse, &redis))["dropped"]
            .as_array()
            .is_some()
    );
    common::drop_database(&clickhouse).await;
}

#[test]
fn bad_arguments_are_refused_clearly() {
    let clickhouse = common::clickhouse_args("topk");
    let redis = common::redis_args();
    for (args, needle) in [
        (&["top", "42", "--limit", "51"][..], "from 1 to 50"),
        (&["top", "42", "--limit", "0"][..], "from 1 to 50"),
        (&["top", "-1"][..], "unexpected argument"),
        (&["top", "abc"][..], "invalid digit"),
        (
            &["aggregate", "--flush-interval", "soon"][..],
            "flush-interval",
        ),
        (&["refresh", "--refresh-interval", "0s"][..], "at least 1ms"),
        (&["refresh", "--batch-size", "0"][..], "batch-size"),
        (&["warmup", "--concurrency", "100"][..], "concurrency"),
    ] {
        let output = topk(args, &clickhouse, &redis);
        assert_eq!(output.status.code(), Some(2), "{args:?} must be refused");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
}

/// `topk warmup` (not on a terminal: plain progress lines) fills Redis; `topk top` then answers
/// from the cache with exactly what `--fresh` computes.
#[tokio::test]
async fn warmup_fills_redis_and_top_answers_from_it() {
    let clickhouse = common::migrated_database().await;
    let redis = common::redis_args();
    let now_minute = topk::window::Window::at(common::workload::now_ms()).end - 60;
    let mut batch = Batch::open(0, 0, 0, None);
    batch.end_offset = 1;
    for (user, song, plays) in [(42u64, 7u64, 3u64), (42, 9, 5), (43, 1, 1)] {
        batch.counts.insert((user, song, now_minute - 120), plays);
    }
    let store = Store::new(topk::olap::client(&clickhouse), "plays");
    store.write_counts(&[&batch]).await.expect("counts");

    let warmup = json(&topk(&["warmup"], &clickhouse, &redis));
    assert_eq!(
        warmup,
        serde_json::json!({"users": 2, "written": 2, "unchanged": 0, "emptied": 0, "refused": 0, "failed": 0, "complete": true})
    );
    let cached = json(&topk(&["top", "42"], &clickhouse, &redis));
    let fresh = json(&topk(&["top", "42", "--fresh"], &clickhouse, &redis));
    assert_eq!(cached["source"], "cache");
    assert_eq!(cached["songs"], fresh["songs"]);
    assert_eq!(
        cached["songs"],
        serde_json::json!([{"rank": 1, "song_id": 9, "song_id_str": "9", "plays": 5}, {"rank": 2, "song_id": 7, "song_id_str": "7", "plays": 3}])
    );
    common::drop_database(&clickhouse).await;
}

/// Starts `topk <args…>` with both output streams on pipes (as under `… 2>&1 | tee run.log`),
/// waits for its first log line, then closes the reading ends (tee exited) and sends SIGTERM.
/// A role that can no longer write its log must still stop (within a minute) and say how.
async fn exit_on_sigterm_after_the_log_reader_is_gone(args: &[String]) -> std::process::ExitStatus {
    use tokio::io::AsyncBufReadExt as _;
    let mut child = tokio::process::Command::new(common::topk_bin())
        .args(args)
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("topk starts");
    let mut stderr = tokio::io::BufReader::new(child.stderr.take().expect("stderr"));
    let mut first = String::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(60),
        stderr.read_line(&mut first),
    )
    .await
    .unwrap_or_else(|_| panic!("`topk {}` logs within a minute", args[0]))
    .expect("read the first log line");
    assert!(!first.is_empty(), "`topk {}` logged nothing", args[0]);
    drop(stderr);
    drop(child.stdout.take());
    common::signal(child.id().expect("running"), "TERM");
    tokio::time::timeout(std::time::Duration::from_secs(60), child.wait())
        .await
        .unwrap_or_else(|_| panic!("`topk {}` still runs a minute after SIGTERM", args[0]))
        .expect("wait")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_stop_on_sigterm_when_their_log_pipe_is_gone() {
    let clickhouse = common::migrated_database().await;
    let (broker, topic) = common::dev_broker(2);
    let brokers = broker.bootstrap_servers();
    let archive = tempfile::tempdir().expect("archive dir");
    let kafka = [
        format!("--kafka-brokers={brokers}"),
        format!("--kafka-topic={topic}"),
    ];
    let database = [
        format!("--clickhouse-url={}", clickhouse.url),
        format!("--clickhouse-database={}", clickhouse.database),
    ];
    let roles: [Vec<String>; 4] = [
        vec![
            "serve".to_owned(),
            format!("--listen=127.0.0.1:{}", common::free_port()),
        ],
        [&["aggregate".to_owned()][..], &kafka, &database].concat(),
        [
            &["archive".to_owned()][..],
            &kafka,
            &[format!("--archive-url={}", archive.path().display())],
        ]
        .concat(),
        [&["loadgen".to_owned(), "--rate=50".to_owned()][..], &kafka].concat(),
    ];
    for args in &roles {
        let exit = exit_on_sigterm_after_the_log_reader_is_gone(args).await;
        // The load generator ends by printing its report on stdout, which is gone too: it
        // exits 1 with the reason (on stderr, also gone) instead of a panic's 101.
        let expected = if args[0] == "loadgen" {
            Some(1)
        } else {
            Some(0)
        };
        assert_eq!(exit.code(), expected, "`topk {}` exited {exit:?}", args[0]);
    }
    common::drop_database(&clickhouse).await;
}

/// `topk token` mints what the API's verifier, configured by the same flags and environment,
/// accepts: for the unnamed key (no `kid`), for a key of `--auth-secret-dir` (its `kid`), with
/// `iss`/`aud` from the API's own settings; a `--ttl` beyond `--auth-max-token-lifetime` and a
/// missing key are refused.
#[test]
fn token_mints_what_the_api_accepts() {
    use topk_api::auth::{Auth, Caller};
    let dir = tempfile::tempdir().expect("dir");
    let secret: &[u8] = b"the-unnamed-secret-of-the-cli-test!";
    let named: &[u8] = b"the-named-key-k1-of-the-cli-test!!!";
    let secret_file = dir.path().join("secret");
    std::fs::write(&secret_file, [secret, b"\n"].concat()).expect("secret");
    let keys = dir.path().join("keys");
    std::fs::create_dir(&keys).expect("keys");
    std::fs::write(keys.join("k1"), named).expect("k1");
    let token = |args: &[&str], env: &[(&str, &std::path::Path)]| {
        let mut command = std::process::Command::new(common::topk_bin());
        command.arg("token").args(args);
        for name in [
            "TOPK_JWT_SECRET",
            "TOPK_API_AUTH_SECRET_FILE",
            "TOPK_API_AUTH_SECRET_DIR",
            "TOPK_API_AUTH_ISSUER",
            "TOPK_API_AUTH_AUDIENCE",
            "TOPK_API_AUTH_MAX_TOKEN_LIFETIME",
        ] {
            command.env_remove(name);
        }
        command.envs(env.iter().copied());
        command.output().expect("topk runs")
    };
    let minted = |output: Output| {
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "topk token failed: {stderr}");
        let stdout = String::from_utf8(output.stdout).expect("UTF-8");
        let jwt = stdout.strip_suffix('\n').expect("one line").to_owned();
        assert_eq!(jwt.split('.').count(), 3, "{stdout:?}");
        jwt
    };
    let caller = |auth: &Auth, jwt: &str| {
        let mut headers = axum::http::HeaderMap::new();
        let value = format!("Bearer {jwt}").parse().expect("header value");
        headers.insert(axum::http::header::AUTHORIZATION, value);
        auth.caller(&headers).map_err(|e| e.to_string())
    };
    let secret_arg = secret_file.to_str().expect("UTF-8 path");

    let jwt = minted(token(
        &["--user", "42", "--auth-secret-file", secret_arg],
        &[],
    ));
    assert_eq!(
        caller(&Auth::hs256(secret), &jwt),
        Ok(Caller {
            user_id: Some(42),
            admin: false
        })
    );
    assert_eq!(jsonwebtoken::decode_header(&jwt).expect("header").kid, None);

    // The API's settings from the environment (as in the compose deployment): the key dir and
    // the issuer; the audience by flag (forgotten in the first token).
    let verifier = Auth::key_dir(&keys)
        .expect("keys")
        .with_issuer("topk")
        .with_audience("widget");
    let jwt = minted(token(
        &["--user", "7", "--admin", "--ttl", "10m", "--kid", "k1"],
        &[
            ("TOPK_API_AUTH_SECRET_DIR", keys.as_path()),
            ("TOPK_API_AUTH_ISSUER", std::path::Path::new("topk")),
        ],
    ));
    let with_audience = minted(token(
        &[
            "--user",
            "7",
            "--admin",
            "--ttl",
            "10m",
            "--kid",
            "k1",
            "--audience",
            "widget",
        ],
        &[
            ("TOPK_API_AUTH_SECRET_DIR", keys.as_path()),
            ("TOPK_API_AUTH_ISSUER", std::path::Path::new("topk")),
        ],
    ));
    assert_eq!(
        caller(&verifier, &jwt),
        Err("token lacks the `aud` claim".to_owned())
    );
    assert_eq!(
        caller(&verifier, &with_audience),
        Ok(Caller {
            user_id: Some(7),
            admin: true
        })
    );
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    validation.set_audience(&["widget"]);
    let claims = jsonwebtoken::decode::<serde_json::Value>(
        &with_audience,
        &jsonwebtoken::DecodingKey::from_secret(named),
        &validation,
    )
    .expect("signed with k1")
    .claims;
    let iat = claims["iat"].as_u64().expect("iat");
    assert_eq!(
        claims,
        serde_json::json!({"sub": "7", "iat": iat, "exp": iat + 600, "scope": "admin", "iss": "topk", "aud": "widget"})
    );
    assert_eq!(
        jsonwebtoken::decode_header(&with_audience)
            .expect("header")
            .kid
            .as_deref(),
        Some("k1")
    );

    for (args, message) in [
        (
            &[
                "--user",
                "1",
                "--ttl",
                "25h",
                "--auth-secret-file",
                secret_arg,
            ][..],
            "a --ttl of 1day 1h is longer than --auth-max-token-lifetime (1day): the API refuses it",
        ),
        (
            &[
                "--user",
                "1",
                "--auth-max-token-lifetime",
                "30m",
                "--auth-secret-file",
                secret_arg,
            ][..],
            "a --ttl of 1h is longer than --auth-max-token-lifetime (30m): the API refuses it",
        ),
        (&["--user", "1"][..], "no key to sign with"),
        (
            &[
                "--user",
                "1",
                "--kid",
                "k2",
                "--auth-secret-dir",
                keys.to_str().expect("UTF-8"),
            ][..],
            "no key `k2` in --auth-secret-dir",
        ),
    ] {
        let output = token(args, &[]);
        assert_eq!(output.status.code(), Some(1), "{args:?} must be refused");
        assert!(output.stdout.is_empty(), "{args:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(message), "{args:?}: {stderr}");
    }
}
