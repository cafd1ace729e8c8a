//! The project's Redis pool against the real server, with the contract's key layout.

mod common;

use bb8_redis::redis::AsyncCommands;

#[tokio::test]
async fn round_trip_through_the_pool() {
    let args = common::redis_args();
    let pool = topk::cache::pool(&args).expect("pool");
    let mut conn = pool.get().await.expect("connection");
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
