//! `topk serve` as a separate process against the real stack, under abusive clients: oversized
//! and malformed ids and limits, oversized heads, a slowloris client, idle connections left
//! open, thousands of idle connections at once, bursts beyond the in-flight bound. After each,
//! the process is alive and a normal request answers 200 with the exact seeded answer; every
//! answer was a clean 4xx or 503 (never a 500, never a hang: every client call has a deadline);
//! the process's peak RSS stays under a stated bound. With authentication on (the secret from
//! the environment), one user's token cannot read another's answer; the admin scope can. One
//! client (IP address) cannot take every connection: past `--max-connections-per-client` it is
//! answered `429` while another address is served. `/metrics` is never open to anyone with auth
//! on: an admin token on the main listener, or only on its own `--metrics-addr`.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use common::plays::{MINUTE, Play};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use topk::config::ClickHouseArgs;
use topk_aggregator::store::Store;

/// No client call of this test may take longer (a hang fails the test, it does not hang it).
const CLIENT_DEADLINE: Duration = Duration::from_secs(60);
/// The server's header read timeout in these tests.
const HEADER_READ_TIMEOUT: &str = "1s";
const MAX_CONNECTIONS: usize = 256;
const MAX_IN_FLIGHT: usize = 8;
/// The peak RSS bound of the server through every abuse below. What the bounds allow: 256
/// connections × (16 KiB head buffer + hyper's write buffer and task, ~40 KiB) ≈ 15 MiB, plus
/// 8 requests in flight, over the process's baseline (16 MiB for this debug build, measured;
/// the whole run peaks near 20 MiB). 64 MiB leaves room for allocator slack and is far below
/// what 2,000 unbounded connections each buffering a 100 KB head would take (200 MB).
const MAX_RSS_BYTES: u64 = 64 * 1024 * 1024;
const SECRET: &str = "abuse-test-secret-of-at-least-32-bytes";

/// One HTTP response, as read off the socket.
#[derive(Debug)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|_| {
            panic!(
                "{}: not JSON: {:?}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// A client error or `503`, with `{"error", "reason"}` JSON (and `Retry-After` for a 503).
    fn assert_clean_refusal(&self, status: u16, code: &str) {
        assert_eq!(self.status, status, "{self:?}");
        let body = self.json();
        assert_eq!(body["error"], code, "{body}");
        assert!(
            body["reason"].as_str().is_some_and(|r| !r.is_empty()),
            "{body}"
        );
        if status == 503 {
            assert_eq!(self.header("retry-after"), Some("5"), "{self:?}");
        }
    }
}

fn parse_reply(bytes: &[u8]) -> Option<Reply> {
    let head_end = bytes.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&bytes[..head_end]).ok()?;
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        .collect();
    Some(Reply {
        status,
        headers,
        body: bytes[head_end + 4..].to_vec(),
    })
}

/// Sends `raw` (a whole request, which should say `Connection: close`) and reads until the
/// server closes. Writing and reading run together: a server that answers early (an oversized
/// head) and closes may reset the rest of the write, and its answer must still be read.
async fn exchange(addr: SocketAddr, raw: Vec<u8>) -> Reply {
    exchange_from(None, addr, raw).await
}

/// A connection to `addr` from the source address `from` (any loopback address: the loopback
/// interface answers all of 127/8), or the default one.
async fn connect_from(from: Option<IpAddr>, addr: SocketAddr) -> TcpStream {
    match from {
        None => TcpStream::connect(addr).await.expect("connect"),
        Some(ip) => {
            let socket = TcpSocket::new_v4().expect("socket");
            socket
                .bind(SocketAddr::new(ip, 0))
                .expect("bind the source");
            socket.connect(addr).await.expect("connect")
        }
    }
}

/// As [`exchange`], from the source address `from`.
async fn exchange_from(from: Option<IpAddr>, addr: SocketAddr, raw: Vec<u8>) -> Reply {
    let run = async {
        let stream = connect_from(from, addr).await;
        let (mut read, mut write) = stream.into_split();
        let writer = tokio::spawn(async move {
            let _ = write.write_all(&raw).await;
            write // kept open until the server closes
        });
        let mut bytes = Vec::new();
        // A reset after the answer arrived ends the read like EOF.
        let _ = read.read_to_end(&mut bytes).await;
        drop(writer.await);
        bytes
    };
    let bytes = tokio::time::timeout(CLIENT_DEADLINE, run)
        .await
        .expect("the server answers and closes within the client deadline");
    parse_reply(&bytes).unwrap_or_else(|| {
        panic!(
            "no HTTP answer: {:?}",
            String::from_utf8_lossy(&bytes[..bytes.len().min(300)])
        )
    })
}

fn request(path: &str, headers: &[(&str, &str)]) -> Vec<u8> {
    let mut raw = format!("GET {path} HTTP/1.1\r\nHost: topk\r\nConnection: close\r\n");
    for (name, value) in headers {
        raw.push_str(&format!("{name}: {value}\r\n"));
    }
    raw.push_str("\r\n");
    raw.into_bytes()
}

async fn get(addr: SocketAddr, path: &str, token: Option<&str>) -> Reply {
    get_from(None, addr, path, token).await
}

async fn get_from(
    from: Option<IpAddr>,
    addr: SocketAddr,
    path: &str,
    token: Option<&str>,
) -> Reply {
    let bearer = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = bearer
        .as_deref()
        .map(|b| vec![("Authorization", b)])
        .unwrap_or_default();
    exchange_from(from, addr, request(path, &headers)).await
}

/// One `GET /healthz` on a connection kept open: the answer is read (by its
/// `Content-Length`), the connection stays open and counted by the server.
async fn held_healthz(addr: SocketAddr) -> (TcpStream, Reply) {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let run = async {
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: topk\r\n\r\n")
            .await
            .expect("write");
        let mut bytes = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            if let Some(reply) = parse_reply(&bytes) {
                let length: usize = reply
                    .header("content-length")
                    .map_or(0, |l| l.parse().expect("content-length"));
                if reply.body.len() >= length {
                    return reply;
                }
            }
            let n = stream.read(&mut buf).await.expect("read");
            assert!(
                n > 0,
                "closed before a whole answer: {:?}",
                String::from_utf8_lossy(&bytes)
            );
            bytes.extend_from_slice(&buf[..n]);
        }
    };
    let reply = tokio::time::timeout(CLIENT_DEADLINE, run)
        .await
        .expect("answered within the client deadline");
    (stream, reply)
}

fn token(sub: u64, scope: &str) -> String {
    let exp = common::workload::now_ms() / 1000 + 3600;
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({"sub": sub.to_string(), "exp": exp, "scope": scope}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("token")
}

/// User 1 played song `s` `s` times for s in 1..=12, user 2 song 99 once, an hour ago (well
/// inside the window whatever the server's clock says).
fn plays(now: i64) -> Vec<Play> {
    let mut plays: Vec<Play> = (1..=12u64)
        .flat_map(|song| {
            (0..song).map(move |i| Play {
                user: 1,
                song,
                ts: now - 60 * MINUTE - i64::try_from(i).expect("small") * 1000,
            })
        })
        .collect();
    plays.push(Play {
        user: 2,
        song: 99,
        ts: now - 60 * MINUTE,
    });
    plays
}

/// User 1's exact top 10: songs 12 down to 3.
fn expected_songs() -> Value {
    let songs: Vec<Value> = (3..=12u64)
        .rev()
        .enumerate()
        .map(|(i, song)| json!({"rank": i + 1, "song_id": song, "song_id_str": song.to_string(), "plays": song}))
        .collect();
    Value::Array(songs)
}

/// A `topk serve` child process.
struct Api {
    child: tokio::process::Child,
    addr: SocketAddr,
    pid: u32,
}

impl Api {
    async fn start(
        clickhouse: &ClickHouseArgs,
        prefix: &str,
        max_in_flight: usize,
        extra: &[&str],
        log: &str,
    ) -> Self {
        let addr: SocketAddr = format!("127.0.0.1:{}", common::free_port())
            .parse()
            .expect("addr");
        let log = std::env::temp_dir().join(format!("{}.log", common::unique(log)));
        // These bounds unless `extra` sets them (a flag may be given once). One client may take
        // every connection by default here: the abuses below test the global bound.
        let defaults = [
            ("--header-read-timeout", HEADER_READ_TIMEOUT.to_owned()),
            ("--max-connections", MAX_CONNECTIONS.to_string()),
            ("--max-connections-per-client", MAX_CONNECTIONS.to_string()),
            ("--max-in-flight", max_in_flight.to_string()),
        ];
        let defaults = defaults
            .iter()
            .filter(|(flag, _)| !extra.contains(flag))
            .flat_map(|(flag, value)| [*flag, value.as_str()]);
        let child = common::topk_command(&["serve"], &log)
            .args(["--listen", &addr.to_string()])
            .args(["--clickhouse-url", &clickhouse.url])
            .args(["--clickhouse-database", &clickhouse.database])
            .args(["--redis-prefix", prefix])
            .args(defaults)
            .args(extra)
            // The secret from the environment, never a flag value.
            .env("TOPK_JWT_SECRET", SECRET)
            .spawn()
            .expect("topk serve starts");
        let pid = child.id().expect("running");
        let mut api = Api { child, addr, pid };
        // Ready when /healthz answers (bounded: a server that never listens fails here).
        for _ in 0..600 {
            api.assert_alive();
            if let Ok(Ok(stream)) =
                tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(addr)).await
            {
                drop(stream);
                assert_eq!(get(addr, "/healthz", None).await.status, 200);
                return api;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("topk serve did not listen on {addr}");
    }

    fn assert_alive(&mut self) {
        assert!(
            self.child.try_wait().expect("try_wait").is_none(),
            "topk serve exited"
        );
    }

    /// Peak resident set size (`VmHWM`), bytes.
    fn peak_rss(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid)).expect("proc status");
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM");
        kib * 1024
    }

    /// The process is alive, a normal request answers 200 with the exact seeded answer, and
    /// the peak RSS is under the bound.
    async fn assert_healthy(&mut self, after: &str, user_token: &str) {
        self.assert_alive();
        let reply = get(self.addr, "/v1/users/1/top-songs", Some(user_token)).await;
        assert_eq!(reply.status, 200, "after {after}: {reply:?}");
        let body = reply.json();
        assert_eq!(body["user_id"], 1, "after {after}");
        assert_eq!(body["songs"], expected_songs(), "after {after}");
        let rss = self.peak_rss();
        eprintln!("after {after}: peak RSS {} KiB", rss / 1024);
        assert!(
            rss < MAX_RSS_BYTES,
            "after {after}: peak RSS {rss} B over {MAX_RSS_BYTES} B"
        );
        self.assert_alive();
    }
}

/// A unique database seeded with `plays(now)` as the aggregator writes them.
async fn seeded() -> ClickHouseArgs {
    let clickhouse = common::migrated_database().await;
    let store = Store::new(topk::olap::client(&clickhouse), "plays");
    common::plays::flush(&store, &plays(common::workload::now_ms()), 0).await;
    clickhouse
}

/// Every abuse in turn against one server process (auth on, secret from the environment).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abusive_clients_get_clean_refusals_and_the_server_stays_up_and_bounded() {
    let clickhouse = seeded().await;
    let prefix = common::unique("topk_abuse");
    let mut api = Api::start(&clickhouse, &prefix, MAX_IN_FLIGHT, &[], "api_abuse").await;
    let addr = api.addr;
    let user1 = token(1, "read");
    let user2 = token(2, "read");
    let admin = token(7, "read admin");
    api.assert_healthy("start", &user1).await;

    // Authorization: user 2's token cannot read user 1; the admin scope can; no token, 401.
    let reply = get(addr, "/v1/users/1/top-songs", Some(&user2)).await;
    reply.assert_clean_refusal(403, "forbidden");
    let reply = get(addr, "/v1/users/1/top-songs", Some(&admin)).await;
    assert_eq!(
        (reply.status, &reply.json()["songs"]),
        (200, &expected_songs())
    );
    let reply = get(addr, "/v1/users/1/top-songs", None).await;
    reply.assert_clean_refusal(401, "unauthorized");
    let reply = get(addr, "/v1/me/top-songs", Some(&user2)).await;
    assert_eq!(
        (reply.status, &reply.json()["songs"]),
        (
            200,
            &json!([{"rank": 1, "song_id": 99, "song_id_str": "99", "plays": 1}])
        )
    );

    // Malformed ids and limits: 400 with a JSON reason, before any token is looked at.
    let long_id = "9".repeat(1000);
    let bad_ids = [
        "abc",
        "-1",
        "18446744073709551616",
        "99999999999999999999999999999999",
        "1e3",
        "0x10",
        "%00",
        long_id.as_str(),
    ];
    for id in bad_ids {
        let reply = get(addr, &format!("/v1/users/{id}/top-songs"), None).await;
        reply.assert_clean_refusal(400, "bad_request");
    }
    for limit in ["1000000000000000000000000000000", "-1", "0", "51", "x", ""] {
        let reply = get(
            addr,
            &format!("/v1/users/1/top-songs?limit={limit}"),
            Some(&user1),
        )
        .await;
        reply.assert_clean_refusal(400, "bad_request");
    }
    api.assert_healthy("malformed ids and limits", &user1).await;

    // A long URI (10 KB id): 400 with a JSON reason from the URI bound.
    let reply = get(
        addr,
        &format!("/v1/users/{}/top-songs", "1".repeat(10_000)),
        None,
    )
    .await;
    reply.assert_clean_refusal(400, "bad_request");
    assert!(
        reply.json()["reason"]
            .as_str()
            .is_some_and(|r| r.contains("more than the 2048 allowed")),
        "{reply:?}"
    );
    // Heads over --max-header-bytes (16 KiB): a 100 KB path id, a 100 KB header, 1,000 small
    // headers. hyper answers `431` itself and closes, before any handler runs: that answer has
    // no JSON body (the one refusal that cannot carry one), but it is a clean 4xx, never a
    // buffered megabyte.
    let big = "a".repeat(100_000);
    let many: Vec<(String, String)> = (0..1000)
        .map(|i| (format!("X-H{i}"), "v".repeat(20)))
        .collect();
    let many: Vec<(&str, &str)> = many.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
    for raw in [
        request(&format!("/v1/users/{}/top-songs", "1".repeat(100_000)), &[]),
        request("/v1/users/1/top-songs", &[("X-Big", &big)]),
        request("/v1/users/1/top-songs", &many),
    ] {
        let reply = exchange(addr, raw).await;
        assert_eq!(reply.status, 431, "{reply:?}");
    }
    api.assert_healthy("oversized heads", &user1).await;

    // Slowloris: a head sent a byte every 200 ms (about 10 s in all) against a 1 s header read
    // timeout. The server closes the connection before the head is complete, with no answer.
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let head = request("/healthz", &[("X-Padding", "slow-slow-slow")]);
    let slowloris = async {
        let mut sent = 0;
        let mut probe = [0u8; 1];
        for byte in &head {
            if stream.write_all(&[*byte]).await.is_err() {
                break;
            }
            sent += 1;
            // The server closing shows as EOF (or a reset) on a read.
            match tokio::time::timeout(Duration::from_millis(200), stream.read(&mut probe)).await {
                Ok(Ok(0) | Err(_)) => break,
                Ok(Ok(_)) => panic!("the server answered a partial head"),
                Err(_) => {} // still open
            }
        }
        sent
    };
    let sent = tokio::time::timeout(CLIENT_DEADLINE, slowloris)
        .await
        .expect("within the client deadline");
    assert!(
        sent < head.len(),
        "the server waited for the whole slow head ({sent} bytes)"
    );
    drop(stream);
    api.assert_healthy("slowloris", &user1).await;

    // A kept-alive connection left idle after its answer is closed by the server too.
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: topk\r\n\r\n")
        .await
        .expect("write");
    let mut bytes = Vec::new();
    let closed = tokio::time::timeout(CLIENT_DEADLINE, stream.read_to_end(&mut bytes))
        .await
        .expect("the server closes the idle kept-alive connection");
    assert!(closed.is_ok(), "{closed:?}");
    let reply = parse_reply(&bytes).expect("the one answer");
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("connection"), None, "it was kept alive");
    api.assert_healthy("idle kept-alive connection", &user1)
        .await;

    // 2,000 connections opened at once and left idle (more than --max-connections 256). The
    // server holds the excess back (not accepted: the kernel's listen backlog, and past it
    // handshakes the kernel leaves unfinished) and closes each accepted idle connection after
    // the header read timeout, which frees its slot for the next. A normal request made while
    // they are all open still answers (asserted inside assert_healthy); no idle connection gets
    // an answer; the server closed at least a slot-full of them. A connection whose handshake
    // the full backlog never completed stays open on the client side only: the test stops
    // waiting for those after a deadline (they cost the server nothing).
    let connects: Vec<_> = (0..2000)
        .map(|_| {
            // A connect the full backlog drops is retried by the kernel: bounded here.
            tokio::spawn(async move {
                tokio::time::timeout(Duration::from_secs(20), TcpStream::connect(addr))
                    .await
                    .ok()
                    .and_then(Result::ok)
            })
        })
        .collect();
    let mut idle = Vec::new();
    for task in connects {
        idle.push(tokio::spawn(async move {
            let Some(mut stream) = task.await.expect("connect task") else {
                return (false, false, 0);
            };
            let mut bytes = Vec::new();
            let read =
                tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut bytes)).await;
            (true, read.is_ok(), bytes.len())
        }));
    }
    api.assert_healthy("2,000 idle connections (while open)", &user1)
        .await;
    let (mut connected, mut closed) = (0, 0);
    for task in idle {
        let (was_connected, was_closed, answered_bytes) = task.await.expect("idle task");
        assert_eq!(answered_bytes, 0, "an idle connection got an answer");
        connected += usize::from(was_connected);
        closed += usize::from(was_closed);
    }
    eprintln!("idle flood: {connected} of 2000 connected, {closed} closed by the server");
    assert!(closed >= MAX_CONNECTIONS, "{closed} closed");
    api.assert_healthy("2,000 idle connections", &user1).await;

    // A burst of 400 concurrent requests against --max-in-flight 8: each is the exact answer or
    // a 503 with a JSON reason and Retry-After, nothing else.
    let burst: Vec<_> = (0..400)
        .map(|_| {
            let user1 = user1.clone();
            tokio::spawn(async move { get(addr, "/v1/users/1/top-songs", Some(&user1)).await })
        })
        .collect();
    let (mut ok, mut shed) = (0, 0);
    for task in burst {
        let reply = task.await.expect("burst task");
        if reply.status == 200 {
            assert_eq!(reply.json()["songs"], expected_songs());
            ok += 1;
        } else {
            reply.assert_clean_refusal(503, "unavailable");
            shed += 1;
        }
    }
    eprintln!("burst of 400: {ok} answered, {shed} shed with 503");
    assert_eq!(ok + shed, 400);
    api.assert_healthy("a burst beyond the in-flight bound", &user1)
        .await;

    let Api { child, .. } = api;
    common::terminate(child).await;
    common::drop_database(&clickhouse).await;
}

/// The in-flight bound, deterministically: with ClickHouse hanging (a listener that accepts
/// and never answers), two uncached reads hold the two slots of `--max-in-flight 2`. Each read
/// runs two queries side by side (the clean-days lookup and the rows query, `src/query.rs`), so
/// once the hung listener has accepted four connections both reads are in flight. A third read
/// is then shed at once with `503`, `Retry-After` and a JSON reason; health checks stay outside
/// the bound; the two held reads end with their own 503 once the hung connections close. The
/// request deadline is raised so the held reads cannot time out and free a slot early.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_beyond_the_in_flight_bound_are_shed_with_503() {
    let hanging = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let clickhouse = ClickHouseArgs {
        url: format!("http://{}", hanging.local_addr().expect("addr")),
        ..common::clickhouse_args("topk")
    };
    let prefix = common::unique("topk_abuse");
    let mut api = Api::start(
        &clickhouse,
        &prefix,
        2,
        &["--olap-timeout", "30s", "--request-timeout", "50s"],
        "api_shed",
    )
    .await;
    let addr = api.addr;
    let admin = token(7, "admin");
    let held: Vec<_> = [1001u64, 1002]
        .into_iter()
        .map(|user| {
            let admin = admin.clone();
            tokio::spawn(async move {
                get(addr, &format!("/v1/users/{user}/top-songs"), Some(&admin)).await
            })
        })
        .collect();
    // All four queries reached ClickHouse: both requests are in flight.
    let accepted = tokio::task::spawn_blocking(move || {
        let held: Vec<_> = (0..4)
            .map(|_| hanging.accept().expect("accept").0)
            .collect();
        (held, hanging)
    });
    let (hung, _hanging) = tokio::time::timeout(CLIENT_DEADLINE, accepted)
        .await
        .expect("both reads reach ClickHouse")
        .expect("joined");

    let reply = get(addr, "/v1/users/1003/top-songs", Some(&admin)).await;
    reply.assert_clean_refusal(503, "unavailable");
    assert!(
        reply.json()["reason"]
            .as_str()
            .is_some_and(|r| r.contains("too many requests in flight")),
        "{reply:?}"
    );
    assert_eq!(get(addr, "/healthz", None).await.status, 200);
    api.assert_alive();

    // Closing the hung connections makes the held reads fail over to their own 503.
    drop(hung);
    for task in held {
        let reply = task.await.expect("held task");
        reply.assert_clean_refusal(503, "unavailable");
    }
    api.assert_alive();
    let Api { child, .. } = api;
    common::terminate(child).await;
}

/// The per-client connection bound: a client (127.0.0.1) holding `--max-connections-per-client`
/// open connections gets `429`, `Retry-After` and a JSON reason on one more, at once, while
/// another address (127.0.0.2) is served; once the first closes one of its connections it is
/// served again. The refusals are counted in `topk_api_refused_connections_total`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_cannot_take_every_connection() {
    const PER_CLIENT: usize = 4;
    let clickhouse = common::clickhouse_args("topk");
    let prefix = common::unique("topk_abuse");
    let mut api = Api::start(
        &clickhouse,
        &prefix,
        MAX_IN_FLIGHT,
        &[
            "--max-connections-per-client",
            &PER_CLIENT.to_string(),
            // The held connections must outlive the test, idle between requests.
            "--header-read-timeout",
            "120s",
        ],
        "api_per_client",
    )
    .await;
    let addr = api.addr;
    let other: IpAddr = "127.0.0.2".parse().expect("ip");
    let admin = token(7, "admin");
    // Refusals counted by the server, asserted against its counter at the end.
    let mut refused = 0;

    // 127.0.0.1 takes its share. The connections of `Api::start` are closed, but the server
    // may not have noticed yet: a 429 while setting up is retried (and counted).
    let mut held = Vec::new();
    while held.len() < PER_CLIENT {
        let (stream, reply) = held_healthz(addr).await;
        match reply.status {
            200 => held.push(stream),
            429 if refused < 20 => {
                refused += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            _ => panic!("{reply:?}"),
        }
    }

    // One more from the same address: 429 at once, with Retry-After and the JSON reason.
    let reply = get(addr, "/healthz", None).await;
    refused += 1;
    assert_eq!(reply.status, 429, "{reply:?}");
    assert_eq!(reply.header("retry-after"), Some("5"), "{reply:?}");
    assert_eq!(
        reply.json(),
        json!({
            "error": "too_many_requests",
            "reason": format!(
                "this client already has {PER_CLIENT} connections open, the most one client \
                 may; close one or retry later"
            ),
        })
    );
    // Another address has its own share.
    let reply = get_from(Some(other), addr, "/healthz", None).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    api.assert_alive();

    // The first client closes one of its connections: it is served again (once the server
    // has seen the close; a 429 before that is retried, within a deadline).
    drop(held.pop());
    let mut waited = 0;
    loop {
        let reply = get(addr, "/healthz", None).await;
        if reply.status == 200 {
            break;
        }
        assert_eq!(reply.status, 429, "{reply:?}");
        refused += 1;
        waited += 1;
        assert!(waited < 50, "the closed connection was never given back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let reply = get_from(Some(other), addr, "/metrics", Some(&admin)).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    let metrics = String::from_utf8(reply.body).expect("text");
    assert!(
        metrics.contains(&format!("topk_api_refused_connections_total {refused}\n")),
        "{refused} refused: {metrics}"
    );
    drop(held);
    let Api { child, .. } = api;
    common::terminate(child).await;
}

/// With `--metrics-addr`, `/metrics` is served there (the API's histogram with its buckets), and
/// the main listener answers 404 for it, whatever the token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_on_their_own_address_are_not_on_the_main_listener() {
    let clickhouse = common::clickhouse_args("topk");
    let prefix = common::unique("topk_abuse");
    let metrics_addr: SocketAddr = format!("127.0.0.1:{}", common::free_port())
        .parse()
        .expect("addr");
    let mut api = Api::start(
        &clickhouse,
        &prefix,
        MAX_IN_FLIGHT,
        &["--metrics-addr", &metrics_addr.to_string()],
        "api_metrics_addr",
    )
    .await;
    let admin = token(7, "admin");
    for token in [None, Some(admin.as_str())] {
        let reply = get(api.addr, "/metrics", token).await;
        reply.assert_clean_refusal(404, "not_found");
    }
    let reply = get(metrics_addr, "/metrics", None).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    let metrics = String::from_utf8(reply.body).expect("text");
    // `Api::start`'s one /healthz, with the API's buckets; the two /metrics above unmatched.
    for line in [
        "topk_api_request_seconds_count{route=\"/healthz\",source=\"none\",status=\"200\"} 1\n",
        "topk_api_request_seconds_bucket{route=\"/healthz\",source=\"none\",status=\"200\",le=\"2.5\"} 1\n",
        "topk_api_request_seconds_count{route=\"unmatched\",source=\"none\",status=\"404\"} 2\n",
    ] {
        assert!(metrics.contains(line), "{line}: {metrics}");
    }
    api.assert_alive();
    let Api { child, .. } = api;
    common::terminate(child).await;
}

/// With auth on and no `--metrics-addr`, `/metrics` on the main listener needs an admin token:
/// 401 without a token, 403 with a user's, 200 with the admin scope.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_on_the_main_listener_need_an_admin_token_with_auth_on() {
    let clickhouse = common::clickhouse_args("topk");
    let prefix = common::unique("topk_abuse");
    let mut api = Api::start(&clickhouse, &prefix, MAX_IN_FLIGHT, &[], "api_metrics_auth").await;
    let reply = get(api.addr, "/metrics", None).await;
    reply.assert_clean_refusal(401, "unauthorized");
    let reply = get(api.addr, "/metrics", Some(&token(1, "read"))).await;
    reply.assert_clean_refusal(403, "forbidden");
    assert_eq!(
        reply.json()["reason"],
        "/metrics needs a token with the admin scope"
    );
    let reply = get(api.addr, "/metrics", Some(&token(7, "read admin"))).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(
        reply.header("content-type"),
        Some("text/plain; version=0.0.4")
    );
    let metrics = String::from_utf8(reply.body).expect("text");
    assert!(
        metrics.contains(
            "topk_api_request_seconds_count{route=\"/metrics\",source=\"none\",status=\"401\"} 1\n"
        ),
        "{metrics}"
    );
    api.assert_alive();
    let Api { child, .. } = api;
    common::terminate(child).await;
}
