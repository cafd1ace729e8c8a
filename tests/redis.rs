//! The project's Redis pool against the real server, with the contract's key layout.

mod common;

use bb8_redis::redis::AsyncCommands;

#[tokio::test]
async fn round_trip_through_the_pool() {
    let args = common::redis_args();
    let redis = topk::cache::Redis::connect(&args).expect("redis");
    let mut conn = redis.get().await.expect("connection");
    let songs = topk::cache::songs_key(&args.prefix, 42);
    let meta = topk::cache::meta_key(&args.prefix, 42);
    let _: () = conn
        .zadd_multiple(&songs, &[(31, 7), (12, 9), (12, 3)])
        .await
        .expect("zadd");
    let _: () = conn
        .hset(&meta, "computed_at", "2026-11-29T18:00:30Z")
        .await
        .expect("hset");

    let ranked: Vec<(u64, u64)> = conn
        .zrevrange_withscores(&songs, 0, 9)
        .await
        .expect("zrevrange");
    assert_eq!(ranked, vec![(7, 31), (9, 12), (3, 12)]);
    let computed_at: String = conn.hget(&meta, "computed_at").await.expect("hget");
    assert_eq!(computed_at, "2026-11-29T18:00:30Z");

    let _: () = conn.del(&[&songs, &meta]).await.expect("del");
    let left: u64 = conn.exists(&[&songs, &meta]).await.expect("exists");
    assert_eq!(left, 0);
}

/// A Redis with a password (`requirepass`) and an ACL user: a role without credentials is
/// refused (no connection), with the default user's password or the ACL user's it reads and writes, and a wrong
/// password is refused (the credentials come from `--redis-password-file` /
/// `TOPK_REDIS_PASSWORD` and `--redis-user`, never from the URL).
#[tokio::test]
async fn a_redis_with_a_password_takes_the_configured_credentials() {
    use topk::config::{RedisAuth, Secret};
    const DEFAULT_PASSWORD: &str = "default-password-of-the-test-redis";
    const ACL_PASSWORD: &str = "acl-password-of-the-topk-user";
    let server = common::private_redis::PrivateRedis::start_with(
        common::free_port(),
        &[
            "--requirepass",
            DEFAULT_PASSWORD,
            "--user",
            "topk",
            "on",
            &format!(">{ACL_PASSWORD}"),
            "~*",
            "&*",
            "+@all",
        ],
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let password_file = |name: &str, password: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, format!("{password}\n")).expect("write");
        Some(Secret::from_file(path.to_str().expect("utf-8")).expect("read"))
    };
    let connect = |auth: RedisAuth| {
        topk::cache::Redis::connect(&topk::config::RedisArgs {
            auth,
            ..server.args()
        })
        .expect("pool")
    };
    // The pool retries a refused connection until its checkout deadline (the reason is
    // logged); the same server accepts the right credentials below, so it is up.
    let refused = |error: topk::cache::CacheError| {
        assert!(
            matches!(error, topk::cache::CacheError::PoolTimeout),
            "refused: {error}"
        );
    };
    refused(
        connect(RedisAuth::default())
            .ping()
            .await
            .expect_err("no credentials"),
    );
    refused(
        connect(RedisAuth {
            password_file: password_file("wrong", "not-the-password"),
            ..RedisAuth::default()
        })
        .ping()
        .await
        .expect_err("a wrong password"),
    );
    connect(RedisAuth {
        password_file: password_file("default", DEFAULT_PASSWORD),
        ..RedisAuth::default()
    })
    .ping()
    .await
    .expect("the default user's password");

    let acl = connect(RedisAuth {
        user: Some("topk".to_owned()),
        password_file: password_file("acl", ACL_PASSWORD),
        ..RedisAuth::default()
    });
    let mut conn = acl.get().await.expect("the ACL user's password");
    let key = topk::cache::meta_key("topk_test_auth", 42);
    let _: () = conn.hset(&key, "computed_at_ms", 1).await.expect("hset");
    let stored: u64 = conn.hget(&key, "computed_at_ms").await.expect("hget");
    assert_eq!(stored, 1);
}
